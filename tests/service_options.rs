//! End-to-end: a service's source list and client-IP affinity, through
//! vipgated on net_tap ports (the rig of scripts/rig.sh, nat, two workers)
//! with real curl. The client namespace gets a second address, so that one
//! source can be served while the other is refused.
//!
//! Needs root and hugepages (or VIPGATE_HUGEPAGES=0).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vipgate::{CLIENT_ADDR, Rig, RigOptions, VIP};

/// The client namespace's second address.
const OTHER_CLIENT: &str = "198.18.0.3";
/// Two workers sharing CPU 1 of a two-CPU machine: a client's connections
/// are owned by both, by source port.
const TWO_WORKERS: &str = "0@0,1@1,2@1";
const CONNECTIONS: u16 = 50;

/// `GET /whoami` through the VIP from `source:sport`; the answering
/// backend's name, or why not.
fn backend_for(rig: &Rig, source: &str, sport: u16) -> Result<String, String> {
    let out = rig.client(&[
        "curl",
        "-sS",
        "--max-time",
        "3",
        "--interface",
        source,
        "--local-port",
        &sport.to_string(),
        "-H",
        "Connection: close",
        &format!("http://{VIP}:{}/whoami", rig.http_port),
    ]);
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!("{source}:{sport}: {} {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    let peer = body.lines().find_map(|l| l.strip_prefix("client ")).unwrap_or_default();
    assert!(peer.starts_with(&format!("{source}:")), "nat keeps the client's address: {body:?}");
    body.lines()
        .find_map(|l| l.strip_prefix("backend "))
        .map(str::to_owned)
        .ok_or_else(|| format!("no backend line in {body:?}"))
}

/// The distinct backends that answered `CONNECTIONS` connections from
/// `source`, one per source port; panics, with the log, if one fails.
fn backends_seen(rig: &Rig, source: &str, first_port: u16) -> Vec<String> {
    let mut seen: Vec<String> = (0..CONNECTIONS)
        .map(|i| backend_for(rig, source, first_port + i).unwrap_or_else(|e| panic!("{e}\n{}", rig.log_text())))
        .collect();
    seen.sort_unstable();
    seen.dedup();
    seen
}

/// The rig's configuration as it started, with `lines` added to the web
/// service (the first `[[services]]`).
fn web_with(rig: &Rig, lines: &str) -> String {
    let text = rig.config_with_web_backends(&[(1, 1), (2, 1), (3, 1)]);
    let web = text.find("name = \"web\"").expect("the web service");
    let at = web + text[web..].find("protocol = \"tcp\"\n").expect("its protocol line") + "protocol = \"tcp\"\n".len();
    format!("{}{lines}\n{}", &text[..at], &text[at..])
}

#[test]
fn a_source_list_refuses_one_client_and_affinity_keeps_a_client_on_one_backend() {
    let rig = Rig::start(RigOptions { lcores: TWO_WORKERS.to_owned(), ..RigOptions::default() });
    let add = rig.client(&["ip", "addr", "add", &format!("{OTHER_CLIENT}/24"), "dev", &rig.client_if()]);
    assert!(add.status.success(), "ip addr add: {}", String::from_utf8_lossy(&add.stderr));

    // Before: both sources are served, and one client's connections spread.
    let spread = backends_seen(&rig, CLIENT_ADDR, 41000);
    assert!(spread.len() > 1, "without affinity one client's connections spread: {spread:?}");
    backend_for(&rig, OTHER_CLIENT, 41000).unwrap_or_else(|e| panic!("{e}\n{}", rig.log_text()));
    assert_eq!(rig.drops("source_denied"), 0);

    // A slow download from the other source (2 MB at 200 kB/s: about 10 s
    // if left alone), in flight while the list narrows: its connection is
    // cut (curl gives up once nothing arrives for 3 s).
    let download = Command::new("ip")
        .args(["netns", "exec", &format!("{}client", rig.prefix), "curl", "-sS", "-o", "/dev/null"])
        .args(["-w", "%{size_download}"])
        .args(["--interface", OTHER_CLIENT, "--local-port", "43000", "--max-time", "30"])
        .args(["--speed-limit", "1", "--speed-time", "3", "--limit-rate", "200K"])
        .arg(format!("http://{VIP}:{}/bytes?n=2000000&rate=200K", rig.http_port))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the download");
    std::thread::sleep(Duration::from_secs(1));

    // Only CLIENT_ADDR, and all of a client's connections to one backend.
    rig.reload(&web_with(&rig, &format!("source_ranges = [\"{CLIENT_ADDR}/32\"]\naffinity = \"client_ip\"")));
    let listed = String::from_utf8_lossy(&rig.ctl(&["list"]).stdout).into_owned();
    assert!(listed.contains(&format!("sources {CLIENT_ADDR}/32")) && listed.contains("affinity client_ip"), "{listed}");

    let started = Instant::now();
    let cut = download.wait_with_output().expect("wait for the download");
    let got: u64 = String::from_utf8_lossy(&cut.stdout).trim().parse().unwrap_or(0);
    println!(
        "the download from {OTHER_CLIENT} ended {:.1} s after the reload: {}, {got} of 2000000 bytes",
        started.elapsed().as_secs_f64(),
        cut.status
    );
    assert!(!cut.status.success() && got < 2_000_000, "a download from a source no longer served went on to its end");

    let refused = backend_for(&rig, OTHER_CLIENT, 44000);
    assert!(refused.is_err(), "{OTHER_CLIENT} is outside the list, yet {refused:?}");
    let denied = rig.drops("source_denied");
    println!("source_denied {denied}");
    assert!(denied > 0, "{}", rig.stats());

    let sticky = backends_seen(&rig, CLIENT_ADDR, 45000);
    println!("{CONNECTIONS} connections from {CLIENT_ADDR} with client-IP affinity: {sticky:?}");
    assert_eq!(sticky.len(), 1, "{sticky:?}");

    // The whole client LAN: the other source is served again, its
    // connections on one backend too.
    rig.reload(&web_with(&rig, "source_ranges = [\"198.18.0.0/24\"]\naffinity = \"client_ip\""));
    let other = backends_seen(&rig, OTHER_CLIENT, 46000);
    println!("{CONNECTIONS} connections from {OTHER_CLIENT}: {other:?}");
    assert_eq!(other.len(), 1, "{other:?}");

    rig.teardown().assert_clean();
}
