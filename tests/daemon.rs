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
    let huge = use_hugepages();
    let prefix = format!("vgsig{}{name}", std::process::id());
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let path = dir.join("vipgated.toml");
    std::fs::write(&path, config(&prefix, &socket, huge)).unwrap();
    let mut child = Command::new(workspace_bin("vipgated"))
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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
    let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&prefix));
    let _ = std::fs::remove_dir_all(&dir);
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
    let want = format!("{}:28: services[0].backends[0].port: 80800 is not a port number from 1 to 65535", path.display());
    assert!(err.contains(&want), "wanted {want:?} in {err:?}");
    assert!(!err.contains("EAL"), "EAL started: {err}");
    assert!(!Path::new("/var/run/dpdk").join(&prefix).exists(), "EAL created its runtime directory");

    let check = Command::new(workspace_bin("vipgated")).arg("--config").arg(&path).arg("--check").output().unwrap();
    assert_eq!(check.status.code(), Some(2));
}
