//! vipgated as a process, without namespaces: it stops cleanly on SIGINT
//! as well as SIGTERM, and a configuration error stops it before EAL starts
//! (nothing is created in /var/run/dpdk, the exit code is 2, and the
//! message names file, line and field).

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

[[ports]]
name = "b"
device = "net_null{prefix}b,no-rx=1"
addresses = ["198.18.1.1/24"]

[[services]]
name = "web"
vip = "198.18.100.1"
port = 80
protocol = "tcp"
backends = [ {{ address = "198.18.1.11", port = 8080 }} ]
"#,
        socket = socket.display()
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
        format!("{}:28: services[0].backends[0].port: 80800 is not a port number from 1 to 65535", path.display());
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
        .stderr(Stdio::piped())
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
