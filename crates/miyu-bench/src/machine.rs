//! What the benchmark ran on, and how much CPU time and memory it and the processes it starts
//! used, read from `/proc` (Linux). Missing files make the figures absent, never the benchmark
//! fail.

use serde::Serialize;

/// The machine, as reported next to the figures.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpu_model: String,
    pub(crate) logical_cores: usize,
}

impl Machine {
    pub(crate) fn this() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let logical_cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self {
            cpu_model,
            logical_cores,
        }
    }
}

/// CPU seconds used so far (user + system) by the whole process and by the server's store
/// thread, which is the one thread that does only server work.
#[derive(Debug, Clone, Copy, Default)]
struct CpuTimes {
    process: Option<f64>,
    store_thread: Option<f64>,
    /// Every process on the machine.
    machine: Option<f64>,
}

/// Linux reports CPU time in clock ticks of 1/100 s on every platform Rust targets.
const TICKS_PER_SECOND: f64 = 100.0;

/// The name the server gives its store thread.
const STORE_THREAD_NAME: &str = "miyu-store";

impl CpuTimes {
    fn now() -> Self {
        Self {
            process: cpu_seconds("/proc/self/stat"),
            store_thread: store_thread_seconds(),
            machine: machine_busy_seconds(),
        }
    }

    /// CPU seconds used between `earlier` and `self`.
    fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        let difference = |now: Option<f64>, then: Option<f64>| Some(now? - then.unwrap_or(0.0));
        CpuTimes {
            process: difference(self.process, earlier.process),
            store_thread: difference(self.store_thread, earlier.store_thread),
            machine: difference(self.machine, earlier.machine),
        }
    }
}

fn cpu_seconds(stat_path: &str) -> Option<f64> {
    parse_cpu_ticks(&std::fs::read_to_string(stat_path).ok()?)
        .map(|ticks| ticks as f64 / TICKS_PER_SECOND)
}

/// CPU seconds (user + system) used so far by another process.
pub(crate) fn process_cpu_seconds(pid: u32) -> Option<f64> {
    cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU seconds used by the child processes this process has waited for, all together. The
/// kernel adds a child's time when it is reaped, so the difference across one `wait` is
/// exactly that child's.
pub(crate) fn waited_children_cpu_seconds() -> Option<f64> {
    parse_children_cpu_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)
        .map(|ticks| ticks as f64 / TICKS_PER_SECOND)
}

/// The high-water mark of a process's resident memory so far, in KiB; `None` once it has
/// exited.
pub(crate) fn peak_resident_kib(pid: u32) -> Option<u64> {
    parse_peak_resident_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// utime + stime from a `/proc/.../stat` line.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    sum_of_stat_fields(stat, 11)
}

/// cutime + cstime (reaped children) from a `/proc/.../stat` line.
fn parse_children_cpu_ticks(stat: &str) -> Option<u64> {
    sum_of_stat_fields(stat, 13)
}

/// The sum of two adjacent numeric fields, counted from the state field. The command name may
/// hold spaces and parentheses, so fields are counted from the last `)`.
fn sum_of_stat_fields(stat: &str, first: usize) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace().skip(first);
    let one: u64 = fields.next()?.parse().ok()?;
    let other: u64 = fields.next()?.parse().ok()?;
    Some(one + other)
}

/// `VmHWM` from `/proc/PID/status`, which the kernel gives in kB (meaning KiB).
fn parse_peak_resident_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Busy CPU seconds of the whole machine, from the first line of `/proc/stat`.
pub(crate) fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_busy_ticks(stat.lines().next()?).map(|ticks| ticks as f64 / TICKS_PER_SECOND)
}

/// user + nice + system + irq + softirq + steal: everything but idle and I/O wait.
fn parse_machine_busy_ticks(line: &str) -> Option<u64> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let [user, nice, system, _idle, _iowait, irq, softirq, steal] = ticks.try_into().ok()?;
    Some(user + nice + system + irq + softirq + steal)
}

fn store_thread_seconds() -> Option<f64> {
    let mut total = None;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if name.trim() == STORE_THREAD_NAME {
            let seconds = cpu_seconds(&path.join("stat").to_string_lossy())?;
            total = Some(total.unwrap_or(0.0) + seconds);
        }
    }
    total
}

/// CPU used during a measurement, next to the wall time it took.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct CpuUse {
    pub(crate) wall_seconds: f64,
    /// The whole process: clients and server share it (and the machine's cores).
    pub(crate) process_seconds: Option<f64>,
    /// The server's store thread alone (embedded server only).
    pub(crate) store_thread_seconds: Option<f64>,
    /// Other processes on the machine: anything well above zero disturbed the measurement.
    pub(crate) other_processes_seconds: Option<f64>,
}

/// Starts counting CPU and wall time; [`CpuMeter::stop`] reads both.
pub(crate) struct CpuMeter {
    started: std::time::Instant,
    before: CpuTimes,
}

impl CpuMeter {
    pub(crate) fn start() -> Self {
        Self {
            started: std::time::Instant::now(),
            before: CpuTimes::now(),
        }
    }

    pub(crate) fn stop(self) -> CpuUse {
        let used = CpuTimes::now().since(&self.before);
        // Ticks are hundredths of a second; more digits would only be noise.
        let ticks = |seconds: f64| (seconds * TICKS_PER_SECOND).round() / TICKS_PER_SECOND;
        CpuUse {
            wall_seconds: self.started.elapsed().as_secs_f64(),
            process_seconds: used.process.map(ticks),
            store_thread_seconds: used.store_thread.map(ticks),
            other_processes_seconds: used
                .machine
                .zip(used.process)
                .map(|(machine, process)| ticks((machine - process).max(0.0))),
        }
    }
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(process) = self.process_seconds else {
            return f.write_str("CPU use unknown");
        };
        write!(f, "CPU {process:.2} s in {:.2} s", self.wall_seconds)?;
        if self.wall_seconds > 0.0 {
            write!(f, " ({:.2} cores busy)", process / self.wall_seconds)?;
        }
        if let Some(store) = self.store_thread_seconds {
            write!(f, ", of which the server's store thread {store:.2} s")?;
        }
        if let Some(others) = self.other_processes_seconds {
            write!(f, "; other processes {others:.2} s")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        let stat = "4242 (tokio (worker) 1) S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn reaped_children_time_follows_the_process_own_time() {
        let stat = "4242 (miyu bench) S 1 2 3 4 5 6 7 8 9 10 250 75 40 2 20 0";
        assert_eq!(parse_children_cpu_ticks(stat), Some(42));
        assert_eq!(parse_children_cpu_ticks("4242 (short) S 1 2"), None);
    }

    #[test]
    fn peak_resident_memory_is_the_high_water_mark_line() {
        let status = "Name:\tmiyu\nVmPeak:\t  900000 kB\nVmHWM:\t   65432 kB\nVmRSS:\t   1000 kB\n";
        assert_eq!(parse_peak_resident_kib(status), Some(65432));
        // A process that has exited (a zombie) has no memory lines.
        assert_eq!(
            parse_peak_resident_kib("Name:\tmiyu\nState:\tZ (zombie)\n"),
            None
        );
    }

    #[test]
    fn machine_busy_time_leaves_out_idle_and_io_wait() {
        let line = "cpu  100 2 30 9000 500 4 5 6 0 0";
        assert_eq!(parse_machine_busy_ticks(line), Some(147));
        assert_eq!(parse_machine_busy_ticks("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(parse_machine_busy_ticks("cpu 1 2"), None);
    }
}
