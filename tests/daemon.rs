//! vipgated as a process, without namespaces: it stops cleanly on SIGINT
//! as well as SIGTERM, a configuration error stops it before EAL starts
//! (nothing is created in /var/run/dpdk, the exit code is 2, and the
//! message names file, line and field), and SIGHUP reloads the
//! configuration file, or refuses it and keeps running.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vipgate::{require_root, use_hugepages, workspace_bin};

fn config(prefix: &str, socket: &Path, huge: bool) -> String {
    format!(
        r#"[eal]
lcores = "0,1"
hugepages = {huge}
file_prefix = "{prefix}"

[dataplane]
idle_sleep_us = 50
mbufs = 4095

[api]
socket = "{socket}"

[[ports]]
name = "a"
device = "net_null{prefix}a,no-rx=1"
addresses = ["198.18.0.1/24"]
kernel_interface = ""

[[ports]]
name = "b"
device = "net_null{prefix}b,no-rx=1"
addresses = ["198.18.1.1/24"]
kernel_interface = ""

[[services]]
name = "web"
vip = "198.18.100.1"
port = 80
protocol = "tcp"
backends = [ {{ address = "198.18.1.11", port = 8080 }} ]

# Off: these tests may run beside a vipgated that holds the default port;
# tests/metrics.rs covers the endpoint. (Last, so the lines above keep the
# numbers the error tests expect.)
[metrics]
listen = ""
[state]
dir = "{state_dir}"
"#,
        socket = socket.display(),
        state_dir = socket.with_file_name("state").display()
    )
}

fn stops_cleanly_on(signal: i32, name: &str) {
    require_root();
    let (mut child, socket, dir, prefix) = spawn(&format!("sig{name}"), None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "API socket never appeared");
        assert!(child.try_wait().unwrap().is_none(), "vipgated exited early: {:?}", child.wait_with_output());
        std::thread::sleep(Duration::from_millis(50));
    }
    let health = Command::new(workspace_bin("vipgatectl")).arg("--socket").arg(&socket).arg("health").output().unwrap();
    assert!(health.status.success(), "{}", String::from_utf8_lossy(&health.stderr));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let runtime_dir = Path::new("/var/run/dpdk").join(&prefix);
    let runtime_dir_left = runtime_dir.exists();
    let hugepage_files: Vec<_> = std::fs::read_dir("/dev/hugepages")
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.to_string_lossy().contains(&prefix)).collect())
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(&runtime_dir);
    for f in &hugepage_files {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!runtime_dir_left, "EAL runtime directory left behind:\n{log}");
    assert!(hugepage_files.is_empty(), "hugepage files left behind: {hugepage_files:?}");
    assert!(out.status.success(), "exit {:?}:\n{log}", out.status);
    assert!(log.contains(&format!("signal=\"{name}\"")), "{log}");
    assert!(log.contains("mbuf pool at shutdown: 0 in use (at start: 0)"), "{log}");
    assert!(!socket.exists(), "API socket left behind");
}

#[test]
fn daemon_stops_cleanly_on_sigint() {
    stops_cleanly_on(libc::SIGINT, "SIGINT");
}

#[test]
fn daemon_stops_cleanly_on_sigterm() {
    stops_cleanly_on(libc::SIGTERM, "SIGTERM");
}

#[test]
fn daemon_refuses_a_bad_config_before_eal_starts() {
    let prefix = format!("vgbad{}", std::process::id());
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    let text = config(&prefix, &dir.join("api.sock"), false).replace("port = 8080", "port = 80800");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(workspace_bin("vipgated")).arg("--config").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let want =
        format!("{}:30: services[0].backends[0].port: 80800 is not a port number from 1 to 65535", path.display());
    assert!(err.contains(&want), "wanted {want:?} in {err:?}");
    assert!(!err.contains("EAL"), "EAL started: {err}");
    assert!(!Path::new("/var/run/dpdk").join(&prefix).exists(), "EAL created its runtime directory");

    let check = Command::new(workspace_bin("vipgated")).arg("--config").arg(&path).arg("--check").output().unwrap();
    assert_eq!(check.status.code(), Some(2));
}

/// Spawns vipgated on a fresh config; returns (child, socket, dir, prefix).
fn spawn(
    tag: &str,
    socket_override: Option<&Path>,
) -> (std::process::Child, std::path::PathBuf, std::path::PathBuf, String) {
    spawn_logging(tag, socket_override, Stdio::piped())
}

/// [`spawn`], with vipgated's stderr (its log) sent to `log`.
fn spawn_logging(
    tag: &str,
    socket_override: Option<&Path>,
    log: Stdio,
) -> (std::process::Child, std::path::PathBuf, std::path::PathBuf, String) {
    let huge = use_hugepages();
    let prefix = format!("vg{tag}{}", std::process::id());
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = socket_override.map(Path::to_owned).unwrap_or_else(|| dir.join("api.sock"));
    let path = dir.join("vipgated.toml");
    std::fs::write(&path, config(&prefix, &socket, huge)).unwrap();
    let child = Command::new(workspace_bin("vipgated"))
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    (child, socket, dir, prefix)
}

#[test]
fn daemon_stops_cleanly_on_a_signal_sent_during_start_up() {
    require_root();
    let (mut child, socket, dir, prefix) = spawn("early", None);
    // The socket is bound right after the signal handlers are installed and
    // before EAL starts: signal at once, while the dataplane comes up.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "API socket never appeared");
        assert!(child.try_wait().unwrap().is_none(), "vipgated exited early");
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let left = Path::new("/var/run/dpdk").join(&prefix).exists();
    let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&prefix));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "exit {:?}:\n{log}", out.status);
    assert!(log.contains("signal=\"SIGTERM\""), "{log}");
    assert!(log.contains("mbuf pool at shutdown: 0 in use (at start: 0)"), "{log}");
    assert!(!left, "EAL runtime directory left behind");
}

#[test]
fn a_second_daemon_on_a_live_socket_fails_before_eal() {
    require_root();
    let (mut first, socket, dir1, prefix1) = spawn("one", None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !Command::new(workspace_bin("vipgatectl"))
        .arg("--socket")
        .arg(&socket)
        .arg("health")
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "first daemon never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (second, _, dir2, prefix2) = spawn("two", Some(&socket));
    let out = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let second_started_eal = Path::new("/var/run/dpdk").join(&prefix2).exists();
    let still_serving =
        Command::new(workspace_bin("vipgatectl")).arg("--socket").arg(&socket).arg("health").output().unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let first_exit = first.wait().unwrap();
    for (d, p) in [(&dir1, &prefix1), (&dir2, &prefix2)] {
        let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(p));
        let _ = std::fs::remove_dir_all(d);
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("already listening") && err.contains(&socket.display().to_string()), "{err}");
    assert!(!err.contains("initialising EAL"), "the second daemon started EAL: {err}");
    assert!(!second_started_eal, "the second daemon created an EAL runtime directory");
    assert!(still_serving.status.success(), "the first daemon stopped serving");
    assert!(first_exit.success());
}

/// A daemon started for a reload test, its log in a file that can be read
/// while it runs. Dropping it kills the daemon and removes its files.
struct Reloading {
    child: Option<std::process::Child>,
    socket: std::path::PathBuf,
    dir: std::path::PathBuf,
    prefix: String,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Reloading {
    /// Starts vipgated and waits until its API answers.
    fn start(tag: &str) -> Reloading {
        require_root();
        let log = std::env::temp_dir().join(format!("vg{tag}{}.log", std::process::id()));
        let file = std::fs::File::create(&log).unwrap();
        let (child, socket, dir, prefix) = spawn_logging(tag, None, Stdio::from(file));
        let config = dir.join("vipgated.toml");
        let mut d = Reloading { child: Some(child), socket, dir, prefix, config, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.health() {
            assert!(Instant::now() < deadline, "vipgated API did not come up:\n{}", d.log_text());
            assert!(
                d.child.as_mut().unwrap().try_wait().unwrap().is_none(),
                "vipgated exited early:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn health(&self) -> bool {
        Command::new(workspace_bin("vipgatectl"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("health")
            .output()
            .unwrap()
            .status
            .success()
    }

    /// The configuration file as it was written at start.
    fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).unwrap()
    }

    /// Replaces the configuration file, sends SIGHUP and waits for the
    /// `n`th reload outcome (a line with `configuration reloaded` or `reload
    /// refused`) in the log; returns that line.
    fn reload(&mut self, text: &str, n: usize) -> String {
        std::fs::write(&self.config, text).unwrap();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.as_ref().unwrap().id() as i32, libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log_text();
            let outcomes: Vec<&str> =
                log.lines().filter(|l| l.contains("configuration reloaded") || l.contains("reload refused")).collect();
            if let Some(line) = outcomes.get(n - 1) {
                return (*line).to_owned();
            }
            assert!(Instant::now() < deadline, "no outcome for reload {n} within 20 s:\n{log}");
            assert!(self.child.as_mut().unwrap().try_wait().unwrap().is_none(), "vipgated exited on SIGHUP:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then checks a clean exit with every mbuf back and nothing
    /// left behind; returns the whole log.
    fn stop(mut self) -> String {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        let log = self.log_text();
        let runtime_dir_left = Path::new("/var/run/dpdk").join(&self.prefix).exists();
        assert!(status.success(), "exit {status:?}:\n{log}");
        assert!(log.contains("mbuf pool at shutdown: 0 in use (at start: 0)"), "{log}");
        assert!(!runtime_dir_left, "EAL runtime directory left behind:\n{log}");
        assert!(!self.socket.exists(), "API socket left behind");
        log
    }
}

impl Drop for Reloading {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&self.prefix));
        if let Ok(d) = std::fs::read_dir("/dev/hugepages") {
            for f in d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&self.prefix)) {
                let _ = std::fs::remove_file(f.path());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A second service, on another VIP.
const DNS_SERVICE: &str = r#"
[[services]]
name = "dns"
vip = "198.18.100.2"
port = 53
protocol = "udp"
backends = [ { address = "198.18.1.12", port = 53 }, { address = "198.18.1.13", port = 53 } ]
"#;

#[test]
fn sighup_applies_a_changed_service_set() {
    let mut d = Reloading::start("hupok");
    let original = d.config_text();
    let line = d.reload(&(original.clone() + DNS_SERVICE), 1);
    assert!(line.contains("configuration reloaded: generation 2, 2 services in "), "{line}");
    let log = d.log_text();
    assert!(log.contains("service=dns vip=198.18.100.2 port=53 protocol=\"udp\" backends=2"), "{log}");
    assert!(d.health(), "the API stopped answering after the reload");
    // And back: one service again, generation 3.
    let line = d.reload(&original, 2);
    assert!(line.contains("configuration reloaded: generation 3, 1 services in "), "{line}");
    let log = d.stop();
    assert!(!log.contains("reload refused"), "{log}");
    println!(
        "{}",
        log.lines().filter(|l| l.contains("reload") || l.contains("service")).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn sighup_with_an_invalid_file_is_refused_and_the_daemon_keeps_running() {
    let mut d = Reloading::start("hupbad");
    let original = d.config_text();
    let bad = original.replace("port = 8080", "port = 80800");
    // The same text `vipgated --check` prints for the file.
    std::fs::write(&d.config, &bad).unwrap();
    let check = Command::new(workspace_bin("vipgated")).arg("--config").arg(&d.config).arg("--check").output().unwrap();
    assert_eq!(check.status.code(), Some(2));
    let check_err = String::from_utf8_lossy(&check.stderr);
    let reason =
        check_err.trim().strip_prefix("vipgated: configuration error: ").expect("--check's error text").to_owned();
    assert_eq!(
        reason,
        format!("{}:30: services[0].backends[0].port: 80800 is not a port number from 1 to 65535", d.config.display())
    );

    let line = d.reload(&bad, 1);
    assert!(line.contains(&format!("reload refused: {reason}; the running configuration is kept")), "{line}");
    assert!(d.health(), "the API stopped answering after a refused reload");
    // The file fixed, the next SIGHUP applies it.
    let line = d.reload(&(original + DNS_SERVICE), 2);
    assert!(line.contains("configuration reloaded: generation 2, 2 services"), "{line}");
    let log = d.stop();
    println!("{}", log.lines().filter(|l| l.contains("reload")).collect::<Vec<_>>().join("\n"));
}

#[test]
fn sighup_with_a_changed_port_device_is_refused_naming_the_field() {
    let mut d = Reloading::start("hupdev");
    let original = d.config_text();
    let from = format!("net_null{}a,no-rx=1", d.prefix);
    let to = format!("net_null{}c,no-rx=1", d.prefix);
    assert!(original.contains(&from));
    let line = d.reload(&original.replace(&from, &to), 1);
    let want =
        format!("reload refused: ports[0].device changed from \"{from}\" to \"{to}\"; restart vipgated to change it");
    assert!(line.contains(&want), "wanted {want:?} in {line:?}");
    // A service change together with a fixed one is refused as a whole.
    let line = d.reload(&(original.replace("idle_sleep_us = 50", "idle_sleep_us = 10") + DNS_SERVICE), 2);
    assert!(
        line.contains("reload refused: dataplane.idle_sleep_us changed from 50 to 10; restart vipgated to change it"),
        "{line}"
    );
    assert!(d.health());
    let log = d.stop();
    assert!(!log.contains("configuration reloaded"), "{log}");
    assert!(!log.contains("service=dns"), "the refused file's service was applied:\n{log}");
    println!("{}", log.lines().filter(|l| l.contains("reload")).collect::<Vec<_>>().join("\n"));
}
