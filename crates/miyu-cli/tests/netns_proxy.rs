//! The proxy promise checked by the network itself: a client given `--proxy socks5h://…` sends
//! every connection through the proxy and never looks a name up.
//!
//! Two Linux network namespaces are joined by a veth pair and nothing else. The server side
//! runs `miyu-server` on its own 127.0.0.1 and `microsocks` on its veth address; only there does
//! the server's host name resolve. The client side has `lo`, its veth end and a default route
//! over it, so that anything a client sent directly would leave as a packet (and be counted)
//! instead of failing quietly for want of a route. Counters in the client namespace's nftables
//! output hook count DNS packets and every packet that is not TCP to the proxy: they read zero
//! after two proxied clients have talked, and more than zero after a client without the proxy
//! tried, which also fails with the network exit code.
//!
//! Needs root (or `CAP_NET_ADMIN` with a writable /etc) and network namespaces: without them
//! the test says it is skipped, unless `MIYU_REQUIRE_NETNS=1` (as in CI) makes that a failure.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{PATIENCE, Reaped, Server};

/// The server namespace's end of the veth pair, where the proxy listens.
const PROXY_IP: &str = "10.231.0.1";
/// The client namespace's end.
const CLIENT_IP: &str = "10.231.0.2";
/// Any port will do: nothing else lives in the server namespace.
const PROXY_PORT: u16 = 1080;
/// Known to the server namespace's /etc/hosts only.
const SERVER_NAME: &str = "miyu-server.internal";
/// The nftables table that counts what leaves the client namespace.
const TABLE: &str = "miyu_leaks";

/// The two namespaces and the files that `ip netns exec` mounts over /etc inside them; all of
/// it is removed when this is dropped, also when the test panics. Declare it before anything
/// that runs inside, so that those processes are ended first.
struct Namespaces {
    server: String,
    client: String,
    /// Whether /etc/netns was made here (and so is removed again when empty).
    made_etc_netns: bool,
}

impl Namespaces {
    fn create() -> Result<Namespaces, String> {
        if effective_uid()? != 0 {
            return Err("not running as root".into());
        }
        let pid = std::process::id();
        let made_etc_netns = !Path::new("/etc/netns").exists();
        let net = Namespaces {
            server: format!("miyu-srv-{pid}"),
            client: format!("miyu-cli-{pid}"),
            made_etc_netns,
        };
        // Pids are unique among live processes, so namespaces with ours are a dead run's.
        net.remove();

        let (server, client) = (net.server.as_str(), net.client.as_str());
        let (server_veth, client_veth) = (format!("miyus{pid}"), format!("miyuc{pid}"));
        ip(&["netns", "add", server])?;
        ip(&["netns", "add", client])?;
        // Made inside the namespaces, so the veth pair never appears in this one.
        ip(&[
            "link",
            "add",
            &server_veth,
            "netns",
            server,
            "type",
            "veth",
            "peer",
            "name",
            &client_veth,
            "netns",
            client,
        ])?;
        ip(&[
            "-n",
            server,
            "addr",
            "add",
            &format!("{PROXY_IP}/30"),
            "dev",
            &server_veth,
        ])?;
        ip(&[
            "-n",
            client,
            "addr",
            "add",
            &format!("{CLIENT_IP}/30"),
            "dev",
            &client_veth,
        ])?;
        for (namespace, veth) in [(server, &server_veth), (client, &client_veth)] {
            ip(&["-n", namespace, "link", "set", "lo", "up"])?;
            ip(&["-n", namespace, "link", "set", veth, "up"])?;
        }
        // 127.0.0.0/8 stays on the client's own lo; everything else would go out the veth.
        ip(&["-n", client, "route", "add", "default", "via", PROXY_IP])?;

        // Only the proxy's side knows the server's name.
        net.write_etc(
            server,
            &[
                ("hosts", &format!("127.0.0.1 localhost {SERVER_NAME}\n")),
                (
                    "nsswitch.conf",
                    "passwd: files\ngroup: files\nhosts: files\n",
                ),
            ],
        )?;
        // The client's side asks DNS for anything but localhost, at an address on the veth
        // where nothing answers (quickly refused): a lookup there is a packet to count. Its own
        // nsswitch.conf keeps a resolver service of this machine's out of the way.
        net.write_etc(
            client,
            &[
                ("hosts", "127.0.0.1 localhost\n::1 localhost\n"),
                (
                    "resolv.conf",
                    &format!("nameserver {PROXY_IP}\noptions timeout:1 attempts:1\n"),
                ),
                (
                    "nsswitch.conf",
                    "passwd: files\ngroup: files\nhosts: files dns\n",
                ),
            ],
        )?;
        Ok(net)
    }

    /// `ip netns exec NAMESPACE`, to run a program inside.
    fn exec<'a>(&self, namespace: &'a str) -> [&'a str; 4] {
        ["ip", "netns", "exec", namespace]
    }

    /// `program` run inside `namespace`.
    fn command_in(&self, namespace: &str, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", namespace, program]);
        command
    }

    fn write_etc(&self, namespace: &str, files: &[(&str, &str)]) -> Result<(), String> {
        let folder = Path::new("/etc/netns").join(namespace);
        std::fs::create_dir_all(&folder).map_err(|e| format!("{}: {e}", folder.display()))?;
        for (name, text) in files {
            let path = folder.join(name);
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// Counts what leaves the client namespace other than over its loopback. Kernel
    /// housekeeping (IPv6 neighbour discovery and multicast reports) is not counted.
    fn count_client_traffic(&self) {
        let rules = format!(
            "table inet {TABLE} {{
                counter proxied {{}}
                counter dns {{}}
                counter leaked {{}}
                chain output {{
                    type filter hook output priority 0; policy accept;
                    oifname \"lo\" accept
                    icmpv6 type {{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld2-listener-report }} accept
                    udp dport 53 counter name dns
                    tcp dport 53 counter name dns
                    ip daddr {PROXY_IP} tcp dport {PROXY_PORT} counter name proxied accept
                    counter name leaked
                }}
            }}\n"
        );
        let mut nft = self
            .command_in(&self.client, "nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        nft.stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        let output = nft.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "nft cannot count the client's packets (the CI script installs nftables): {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The client namespace's counters now.
    fn traffic(&self) -> Traffic {
        let output = self
            .command_in(&self.client, "nft")
            .args(["list", "counters", "table", "inet", TABLE])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let text = String::from_utf8(output.stdout).unwrap();
        let mut traffic = Traffic::default();
        let mut current = None;
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix("counter ") {
                current = name.strip_suffix(" {").map(str::to_string);
            } else if let Some(rest) = line.strip_prefix("packets ") {
                let packets: u64 = rest.split(' ').next().unwrap().parse().unwrap();
                match current.as_deref() {
                    Some("proxied") => traffic.proxied = packets,
                    Some("dns") => traffic.dns = packets,
                    Some("leaked") => traffic.leaked = packets,
                    other => panic!("unexpected counter {other:?} in {text}"),
                }
            }
        }
        traffic
    }

    fn remove(&self) {
        for namespace in [&self.server, &self.client] {
            // Whatever still runs there (a traced proxy outlives its killed tracer).
            if let Ok(pids) = Command::new("ip")
                .args(["netns", "pids", namespace])
                .output()
            {
                for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "delete", namespace])
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(namespace));
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and with it the pair.
        self.remove();
        if self.made_etc_netns {
            // Only when empty: another run may be using it.
            let _ = std::fs::remove_dir("/etc/netns");
        }
    }
}

/// Packets counted in the client namespace, by rule.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Traffic {
    /// TCP to the proxy's address and port.
    proxied: u64,
    /// To port 53, TCP or UDP: name lookups.
    dns: u64,
    /// Anything but TCP to the proxy (lookups included).
    leaked: u64,
}

impl Traffic {
    fn since(self, earlier: Traffic) -> Traffic {
        Traffic {
            proxied: self.proxied - earlier.proxied,
            dns: self.dns - earlier.dns,
            leaked: self.leaked - earlier.leaked,
        }
    }
}

fn effective_uid() -> Result<u32, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| "no effective uid in /proc/self/status".into())
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The namespaces, or `None` after saying why the test is skipped. With
/// `MIYU_REQUIRE_NETNS=1` not having them fails the test instead.
fn namespaces_or_skip() -> Option<Namespaces> {
    match Namespaces::create() {
        Ok(net) => Some(net),
        Err(why) if std::env::var("MIYU_REQUIRE_NETNS").is_ok_and(|v| v == "1") => {
            panic!("MIYU_REQUIRE_NETNS=1, but network namespaces cannot be set up: {why}")
        }
        Err(why) => {
            // Past the test harness's capture, so that a skip is seen in a normal run.
            let _ = writeln!(
                std::io::stderr(),
                "skipped: needs root and network namespaces ({why})"
            );
            None
        }
    }
}

/// Runs a command to its end, killing it and failing the test if that takes over PATIENCE.
fn run_bounded(mut command: Command) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let (done, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match output.recv_timeout(PATIENCE) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("{command:?} did not end within {PATIENCE:?}");
        }
    }
}

/// `miyu` run inside the client namespace.
struct ClientSide<'a> {
    net: &'a Namespaces,
    root: PathBuf,
}

impl ClientSide<'_> {
    fn run(&self, profile: &str, args: &[&str]) -> Output {
        let mut command = common::miyu_command_via(&self.net.exec(&self.net.client));
        command
            .arg("--profile")
            .arg(self.root.join(profile))
            .args(args);
        run_bounded(command)
    }

    fn ok(&self, profile: &str, args: &[&str]) -> String {
        let output = self.run(profile, args);
        assert!(
            output.status.success(),
            "{profile}: miyu {args:?} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs a command that must fail for want of the network (exit code 3), and returns what it
    /// printed on stderr.
    fn network_error(&self, profile: &str, args: &[&str]) -> String {
        let output = self.run(profile, args);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(
            output.status.code(),
            Some(3),
            "{profile}: miyu {args:?} should have failed with a network error: {stderr}"
        );
        stderr
    }

    /// The bodies of a conversation, as in `common::conversation`.
    fn conversation(&self, profile: &str, contact: &str) -> Vec<String> {
        self.ok(profile, &["messages", contact])
            .lines()
            .map(|line| {
                line.split_once("  ")
                    .map_or(line, |(_, rest)| rest)
                    .to_string()
            })
            .collect()
    }
}

/// Starts the proxy in the server namespace and returns once it listens: `strace` reports
/// its `listen` call, the event itself (microsocks prints nothing when it is ready).
fn start_proxy(net: &Namespaces) -> Reaped {
    let mut proxy = net
        .command_in(&net.server, "strace")
        .args(["-f", "-qq", "-e", "trace=listen", "-e", "signal=none"])
        .args(["microsocks", "-i", PROXY_IP, "-p", &PROXY_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("strace runs (the CI script installs it)");
    let mut lines = BufReader::new(proxy.stderr.take().unwrap()).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("listen(") && line.contains("= 0") => break,
            Some(Ok(line)) if line.contains("listen(") => panic!("the proxy cannot listen: {line}"),
            Some(Ok(_)) => {}
            Some(Err(error)) => panic!("reading the proxy's trace: {error}"),
            None => panic!("microsocks ended before it listened (the CI script installs it)"),
        }
    }
    // Keep draining, so that nothing the proxy writes later can block it.
    std::thread::spawn(move || lines.for_each(drop));
    Reaped(proxy)
}

#[test]
fn a_proxied_client_reaches_its_server_only_through_the_proxy_across_network_namespaces() {
    let Some(net) = namespaces_or_skip() else {
        return;
    };
    net.count_client_traffic();
    let root = tempfile::tempdir().unwrap();

    let server = Server::start_via(
        &net.exec(&net.server),
        &root.path().join("server"),
        "127.0.0.1:0",
        &[],
    );
    assert!(server.listen.ip().is_loopback(), "{}", server.address);
    let by_name = server
        .address
        .replacen(&server.listen.ip().to_string(), SERVER_NAME, 1);
    let _proxy = start_proxy(&net);
    let proxy_url = format!("socks5h://{PROXY_IP}:{PROXY_PORT}");
    let clients = ClientSide {
        net: &net,
        root: root.path().to_path_buf(),
    };

    // Two accounts, each told the proxy once; their profiles remember it.
    let before = net.traffic();
    for name in ["alice", "bob"] {
        clients.ok(
            name,
            &[
                "--proxy", &proxy_url, "init", "--server", &by_name, "--name", name,
            ],
        );
    }
    let link = clients.ok("alice", &["invite"]);
    clients.ok("bob", &["accept", link.trim(), "--name", "alice"]);
    clients.ok("alice", &["sync"]);
    clients.ok("bob", &["sync"]);
    clients.ok("alice", &["send", "bob", "hello through the proxy"]);
    clients.ok("bob", &["sync"]);
    clients.ok("bob", &["send", "alice", "and back the same way"]);
    clients.ok("alice", &["sync"]);
    assert_eq!(
        clients.conversation("alice", "bob"),
        ["me: hello through the proxy", "bob: and back the same way"]
    );
    assert_eq!(
        clients.conversation("bob", "alice"),
        [
            "alice: hello through the proxy",
            "me: and back the same way"
        ]
    );
    // Files travel over HTTPS to the blob endpoints: through the proxy as well.
    let file = root.path().join("notes.txt");
    std::fs::write(&file, "a file through the proxy\n".repeat(10_000)).unwrap();
    clients.ok("alice", &["send-file", "bob", file.to_str().unwrap()]);
    clients.ok("bob", &["sync"]);
    let listed: serde_json::Value =
        serde_json::from_str(&clients.ok("bob", &["--json", "files", "alice"])).unwrap();
    let id = listed[0]["id"].as_i64().unwrap().to_string();
    let received = root.path().join("received.txt");
    clients.ok(
        "bob",
        &[
            "download",
            "alice",
            &id,
            "--out",
            received.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read(&received).unwrap(),
        std::fs::read(&file).unwrap()
    );
    let proxied = net.traffic().since(before);
    eprintln!("packets out of the client namespace, proxied clients: {proxied:?}");
    assert!(
        proxied.proxied > 0,
        "the counters saw no traffic: {proxied:?}"
    );
    assert_eq!(
        (proxied.dns, proxied.leaked),
        (0, 0),
        "proxied clients sent packets past the proxy: {proxied:?}"
    );

    // Controls, so that the zeros above could have been otherwise. The same client without the
    // proxy cannot resolve the server's name, and its lookup is counted.
    let before = net.traffic();
    let stderr = clients.network_error("carol", &["init", "--server", &by_name, "--name", "carol"]);
    assert!(stderr.contains(SERVER_NAME), "{stderr}");
    let direct = net.traffic().since(before);
    eprintln!("packets out of the client namespace, a direct client: {direct:?}");
    assert!(
        direct.dns > 0 && direct.leaked > 0,
        "a direct client's lookup went uncounted: {direct:?}"
    );
    // Named by address, the server's loopback is the client's own, where nothing listens.
    clients.network_error(
        "dave",
        &["init", "--server", &server.address, "--name", "dave"],
    );
    // A proxied profile told to connect directly fails the same way, and with its proxy back
    // it works again without a packet past the proxy.
    let before = net.traffic();
    clients.network_error("alice", &["--no-proxy", "sync"]);
    let direct = net.traffic().since(before);
    assert!(direct.dns > 0, "{direct:?}");
    let before = net.traffic();
    clients.ok(
        "alice",
        &["--proxy", &proxy_url, "send", "bob", "proxied again"],
    );
    clients.ok("bob", &["sync"]);
    let proxied = net.traffic().since(before);
    assert_eq!((proxied.dns, proxied.leaked), (0, 0), "{proxied:?}");
    assert_eq!(
        clients
            .conversation("bob", "alice")
            .last()
            .map(String::as_str),
        Some("alice: proxied again")
    );

    server.terminate();
}
