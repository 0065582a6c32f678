//! `send-file`, `files` and `download`, with a progress bar on a terminal.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use miyu_client::Client;
use miyu_client::files::{Progress, human_size};

use crate::{format_time, print_json, printable};

/// Reports a transfer's progress on stderr until told to stop: a bar with rate and time left
/// on a terminal; elsewhere a line at every tenth (so logs and scripts can follow it); nothing
/// in JSON mode.
fn report(
    verb: &'static str,
    progress: Arc<Progress>,
    json: bool,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let terminal = std::io::stderr().is_terminal();
    let task = tokio::spawn(async move {
        if json {
            let _ = stopped.await;
            return;
        }
        let started = Instant::now();
        let mut announced_resume = false;
        let mut last_tenth = None;
        let mut ticker =
            tokio::time::interval(Duration::from_millis(if terminal { 200 } else { 50 }));
        loop {
            let finished = tokio::select! {
                _ = ticker.tick() => false,
                _ = &mut stopped => true,
            };
            let (total, done, from) = (progress.total(), progress.done(), progress.resumed_from());
            if total > 0 || finished {
                if !announced_resume && total > 0 {
                    announced_resume = true;
                    if from > 0 {
                        eprintln!(
                            "resuming: {} of {} already {verb}",
                            human_size(from),
                            human_size(total)
                        );
                    }
                }
                let percent = (done * 100).checked_div(total).unwrap_or(100);
                if terminal {
                    let elapsed = started.elapsed().as_secs_f64().max(0.001);
                    let rate = (done - from.min(done)) as f64 / elapsed;
                    let left = if rate > 0.0 {
                        format!("{:.0}s left", (total - done.min(total)) as f64 / rate)
                    } else {
                        "…".into()
                    };
                    let filled = (percent / 4) as usize;
                    eprint!(
                        "\r[{}{}] {percent:>3}%  {} of {}  {}/s  {left}   ",
                        "#".repeat(filled),
                        " ".repeat(25 - filled.min(25)),
                        human_size(done),
                        human_size(total),
                        human_size(rate as u64)
                    );
                    let _ = std::io::stderr().flush();
                } else if total > 0 && last_tenth != Some(percent / 10) {
                    last_tenth = Some(percent / 10);
                    eprintln!(
                        "{verb} {percent}% ({} of {})",
                        human_size(done),
                        human_size(total)
                    );
                }
            }
            if finished {
                if terminal {
                    eprintln!();
                }
                return;
            }
        }
    });
    (stop, task)
}

async fn with_progress<T>(
    verb: &'static str,
    json: bool,
    run: impl AsyncFnOnce(Arc<Progress>) -> Result<T, miyu_client::Error>,
) -> Result<T, miyu_client::Error> {
    let progress = Arc::new(Progress::default());
    let (stop, task) = report(verb, Arc::clone(&progress), json);
    let result = run(progress).await;
    let _ = stop.send(());
    let _ = task.await;
    result
}

pub(crate) async fn send_file(
    mut client: Client,
    contact: &str,
    path: &Path,
    keep_metadata: bool,
    json: bool,
) -> anyhow::Result<()> {
    let sent = with_progress("sent", json, async |progress| {
        client
            .send_file(contact, path, keep_metadata, progress)
            .await
    })
    .await;
    client.disconnect().await;
    let sent = sent?;
    if json {
        print_json(&sent)?;
    } else {
        println!(
            "sent file {} (message #{}): {} ({}){}",
            sent.id,
            sent.message,
            printable(&sent.name),
            human_size(sent.size),
            if sent.metadata_stripped {
                ", image metadata removed"
            } else {
                ""
            }
        );
    }
    Ok(())
}

pub(crate) fn list(client: &Client, contact: &str, json: bool) -> anyhow::Result<()> {
    let files = client.files(contact)?;
    if json {
        return print_json(&files);
    }
    if files.is_empty() {
        println!("no files with {}", printable(contact));
    }
    for file in files {
        println!(
            "{:>4}  {}  {}  {}  from {}{}",
            file.id,
            format_time(file.sent_at_ms),
            printable(&file.name),
            human_size(file.size),
            printable(&file.sender),
            file.saved_path
                .map(|path| format!("  saved as {}", printable(&path)))
                .unwrap_or_default()
        );
    }
    Ok(())
}

pub(crate) async fn download(
    mut client: Client,
    contact: &str,
    file_id: i64,
    out: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let saved = with_progress("downloaded", json, async |progress| {
        client
            .download(contact, file_id, out.as_deref(), progress)
            .await
    })
    .await;
    client.disconnect().await;
    let saved = saved?;
    if json {
        print_json(&serde_json::json!({ "id": file_id, "path": saved }))?;
    } else {
        println!("saved {}", saved.display());
    }
    Ok(())
}
