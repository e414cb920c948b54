//! End-to-end per forwarding mode (nat, fullnat, dsr) with one and with two
//! workers: vipgated on net_tap ports, the rig of scripts/rig.sh wired for
//! the mode, real curl, socat and scripts/backend.py. Each test checks that
//! HTTP requests all succeed and are spread, that a 50 MiB download arrives
//! intact, that UDP gets its answer from the VIP, what proves the mode (the
//! peer a backend sees, where the replies travel), and with two workers that
//! every packet handed to another worker arrived there.
//!
//! Needs root and hugepages (or VIPGATE_HUGEPAGES=0); the dsr tests need
//! the kernel's IPIP or VIPGATE_DSR_DECAP=userspace (see tests/support).

use std::process::Command;
use std::time::{Duration, Instant};
use vipgate::{
    CLIENT_ADDR, CLIENT_LAN_IF, Mode, Rig, RigOptions, SOURCE_POOL_ADDR, SOURCE_POOL_PORTS, UDP_PORT, VIP, Whoami,
};

const REQUESTS: u16 = 40;
/// Fixed client source ports, so that every run has the same flows.
const FIRST_SOURCE_PORT: u16 = 41000;
const DOWNLOAD_SOURCE_PORT: u16 = 42000;
const UDP_SOURCE_PORT: u16 = 50000;
const DOWNLOAD_BYTES: u64 = 50 * 1024 * 1024;
const UPLOAD_BYTES: usize = 3 * 1024 * 1024;
const ONE_WORKER: &str = "0,1";
/// Two workers sharing CPU 1 of a two-CPU machine.
const TWO_WORKERS: &str = "0@0,1@1,2@1";

/// Downloads `n` bytes of /bytes through the VIP; returns (sha256, bytes,
/// HTTP status) or the failure.
fn download(rig: &Rig, n: u64) -> Result<(String, u64, String), String> {
    let script = format!(
        "set -o pipefail; curl -sS --max-time 120 --local-port {DOWNLOAD_SOURCE_PORT} -H 'Connection: close' \
         -w '%{{stderr}}size=%{{size_download}} code=%{{http_code}}\\n' 'http://{VIP}:{}/bytes?n={n}' | sha256sum",
        rig.http_port
    );
    let out = rig.client(&["bash", "-c", &script]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!("{}: {stderr}", out.status));
    }
    let sha = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    let line = stderr.lines().rev().find(|l| l.starts_with("size=")).ok_or_else(|| format!("no size in {stderr:?}"))?;
    let mut size = None;
    let mut code = String::new();
    for kv in line.split_whitespace() {
        match kv.split_once('=') {
            Some(("size", v)) => size = v.parse().ok(),
            Some(("code", v)) => v.clone_into(&mut code),
            _ => {}
        }
    }
    Ok((sha, size.ok_or_else(|| format!("bad size in {line:?}"))?, code))
}

/// Uploads `n` bytes to the backends' /sha256 through the VIP: full-size
/// packets from the client towards the backends. Returns (the sha256 and
/// length the backend computed, the sha256 of what was sent).
fn upload(rig: &Rig, n: usize) -> Result<(String, String), String> {
    let path = std::env::temp_dir().join(format!("vipgate-upload-{}", rig.prefix));
    let data: Vec<u8> = (0..n).map(|i| ((i as u64).wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&path, &data).map_err(|e| format!("write {}: {e}", path.display()))?;
    let sent = Command::new("sha256sum").arg(&path).output().map_err(|e| format!("sha256sum: {e}"))?;
    let sent = String::from_utf8_lossy(&sent.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    let out = rig.client(&[
        "curl",
        "-sS",
        "--max-time",
        "60",
        "-H",
        "Connection: close",
        "-H",
        "Expect:",
        "--data-binary",
        &format!("@{}", path.display()),
        &format!("http://{VIP}:{}/sha256", rig.http_port),
    ]);
    let _ = std::fs::remove_file(&path);
    if !out.status.success() {
        return Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok((String::from_utf8_lossy(&out.stdout).trim().to_owned(), format!("{sent} {n}")))
}

/// Bytes received so far on an interface of the client namespace.
fn client_rx_bytes(rig: &Rig, ifname: &str) -> u64 {
    let out = rig.client(&["cat", &format!("/sys/class/net/{ifname}/statistics/rx_bytes")]);
    assert!(out.status.success(), "no {ifname} in the client namespace: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("rx_bytes is a number")
}

fn total(stats: &serde_json::Value, key: &str) -> u64 {
    stats["total"][key].as_u64().unwrap_or_else(|| panic!("no total.{key} in {stats}"))
}

/// The stats once every handed-off packet has been taken from its ring
/// (handoff_out == handoff_in), or after 3 s, whichever is first.
fn settled_stats(rig: &Rig) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let stats = rig.stats();
        if total(&stats, "handoff_out") == total(&stats, "handoff_in") || Instant::now() > deadline {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(mode: Mode, lcores: &str) {
    let workers = lcores.split(',').count() - 1;
    let rig = Rig::start(RigOptions { mode, lcores: lcores.to_owned(), ..RigOptions::default() });
    let expected_sha = vipgate::bytes_sha256(DOWNLOAD_BYTES);

    // 1. HTTP.
    let answers: Vec<Result<Whoami, String>> = (0..REQUESTS).map(|i| rig.whoami(FIRST_SOURCE_PORT + i)).collect();
    // Per-backend statistics right after: each request was one new flow,
    // now closed (inactive until it expires).
    let listed = rig.ctl(&["--json", "list"]);
    let listed_text = rig.ctl(&["list"]);
    let listed_traffic = rig.ctl(&["list", "--stats"]);

    // 2. A download; in dsr mode, the client's leg in the backend LAN must
    //    carry it.
    let rx_before = (mode == Mode::Dsr).then(|| client_rx_bytes(&rig, CLIENT_LAN_IF));
    let started = Instant::now();
    let downloaded = download(&rig, DOWNLOAD_BYTES);
    let took = started.elapsed();
    let rx_grew = rx_before.map(|before| client_rx_bytes(&rig, CLIENT_LAN_IF) - before);

    // An upload: full-size packets towards the backends. In dsr mode they
    // would not fit the backend port's MTU once encapsulated: the gateway
    // answers with ICMP "fragmentation needed" and the client's path MTU
    // discovery shrinks them.
    let uploaded = upload(&rig, UPLOAD_BYTES);

    // 3. UDP: socat's socket is connected to the VIP, so only a reply from
    //    VIP:5353 reaches it.
    let udp = rig.client(&[
        "sh",
        "-c",
        &format!("printf ping-modes | socat -T 3 - UDP4:{VIP}:{UDP_PORT},sourceport={UDP_SOURCE_PORT},reuseaddr"),
    ]);
    let udp_reply = String::from_utf8_lossy(&udp.stdout).into_owned();

    // 4. What proves the mode.
    let route_to_clients = rig.backend(&["ip", "route", "get", CLIENT_ADDR]);
    let http_port = rig.http_port;
    let stats = settled_stats(&rig);
    let left = rig.teardown();

    let failures: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {REQUESTS} HTTP requests failed: {:?}\n{stats}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        left.log
    );
    let answers: Vec<Whoami> = answers.into_iter().map(Result::unwrap).collect();
    let mut names: Vec<&str> = answers.iter().map(|a| a.backend.as_str()).collect();
    names.sort_unstable();
    let spread: Vec<(&str, usize)> = names.chunk_by(|a, b| a == b).map(|c| (c[0], c.len())).collect();
    println!("{} {workers} worker(s): {REQUESTS} requests answered by {spread:?}", mode.name());
    assert!(spread.len() > 1, "every request went to {spread:?}");
    check_backend_stats(mode, &listed, &listed_text, &listed_traffic, &spread);

    let (sha, size, code) = downloaded.unwrap_or_else(|e| panic!("the download failed: {e}\n{stats}\n{}", left.log));
    println!(
        "download of {DOWNLOAD_BYTES} bytes: {:.1} s ({:.0} MB/s)",
        took.as_secs_f64(),
        DOWNLOAD_BYTES as f64 / 1e6 / took.as_secs_f64()
    );
    assert_eq!(code, "200", "download status");
    assert_eq!(size, DOWNLOAD_BYTES, "download length");
    assert_eq!(sha, expected_sha, "sha256 of the download");

    let (answer, sent) = uploaded.unwrap_or_else(|e| panic!("the upload failed: {e}\n{stats}\n{}", left.log));
    assert_eq!(answer, sent, "what the backend received (sha256 and length) differs from what was sent");
    let frag_needed = total(&stats, "icmp_frag_needed");
    println!("upload of {UPLOAD_BYTES} bytes arrived intact; icmp_frag_needed {frag_needed}");
    if mode == Mode::Dsr {
        assert!(frag_needed > 0, "full-size client packets went through without path MTU discovery: {stats}");
    } else {
        assert_eq!(frag_needed, 0, "{stats}");
    }

    assert!(udp.status.success(), "socat failed: {}", String::from_utf8_lossy(&udp.stderr));
    let (name, echoed) = udp_reply.split_once(' ').unwrap_or_else(|| panic!("unexpected UDP reply {udp_reply:?}"));
    assert!(name.starts_with("backend-") && echoed == "ping-modes", "UDP reply {udp_reply:?}");

    let nat_forward = total(&stats, "nat_forward");
    let nat_reverse = total(&stats, "nat_reverse");
    println!("nat_forward {nat_forward}, nat_reverse {nat_reverse}");
    assert!(nat_forward > 0, "nothing forwarded: {stats}");
    match mode {
        Mode::Nat => {
            for a in &answers {
                assert_eq!(a.peer, format!("{CLIENT_ADDR}:{}", a.sport), "NAT keeps the client's address: {a:?}");
            }
            assert!(nat_reverse > 0, "no reply translated: {stats}");
        }
        Mode::FullNat => {
            for a in &answers {
                let (addr, port) = a.peer.split_once(':').expect("IP:PORT");
                let port: u16 = port.parse().expect("a port");
                assert_eq!(addr, SOURCE_POOL_ADDR, "the backend must see the pool address: {a:?}");
                assert!(SOURCE_POOL_PORTS.contains(&port), "source port outside the pool: {a:?}");
            }
            assert!(
                !route_to_clients.status.success(),
                "the backend namespace has a route to {CLIENT_ADDR}: {}",
                String::from_utf8_lossy(&route_to_clients.stdout)
            );
            assert!(nat_reverse > 0, "no reply translated: {stats}");
        }
        Mode::Dsr => {
            for a in &answers {
                assert_eq!(a.peer, format!("{CLIENT_ADDR}:{}", a.sport), "DSR keeps the client's address: {a:?}");
                assert_eq!(a.local, format!("{VIP}:{http_port}"), "reached on the VIP: {a:?}");
            }
            assert_eq!(nat_reverse, 0, "replies crossed the gateway: {stats}");
            let grew = rx_grew.expect("measured in dsr mode");
            println!("{CLIENT_LAN_IF} (the client's leg in the backend LAN) received {grew} bytes during the download");
            assert!(grew >= DOWNLOAD_BYTES, "{CLIENT_LAN_IF} received only {grew} bytes during the download");
        }
    }

    let per_worker = stats["workers"].as_array().expect("workers");
    assert_eq!(per_worker.len(), workers, "{stats}");
    let (out, inn) = (total(&stats, "handoff_out"), total(&stats, "handoff_in"));
    let handoff_drops = stats["total"]["drops"]["handoff"].as_u64().unwrap_or(0);
    println!("handoff_out {out}, handoff_in {inn}, handoff drops {handoff_drops}");
    assert_eq!(out, inn, "packets handed off but never taken: {stats}");
    assert_eq!(handoff_drops, 0, "hand-off rings overflowed: {stats}");
    if workers > 1 && mode != Mode::Dsr {
        assert!(out > 0, "with {workers} workers no packet crossed to its flow's owner: {stats}");
    }
    left.assert_clean();
}

/// `vipgatectl list` right after the HTTP requests: per backend of "web",
/// as many connections as requests it answered, every flow closed
/// (inactive, not active), packets in (and, except in dsr mode, out); the
/// text listings show the same figures.
fn check_backend_stats(
    mode: Mode,
    json: &std::process::Output,
    text: &std::process::Output,
    traffic: &std::process::Output,
    spread: &[(&str, usize)],
) {
    assert!(json.status.success(), "vipgatectl --json list: {}", String::from_utf8_lossy(&json.stderr));
    let state: serde_json::Value = serde_json::from_slice(&json.stdout).expect("list --json prints JSON");
    let web = state["services"].as_array().expect("services").iter().find(|s| s["name"] == "web").expect("web");
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    let traffic = String::from_utf8_lossy(&traffic.stdout).into_owned();
    println!("{text}{traffic}");
    assert!(text.contains("ActiveConn") && text.contains("InActConn"), "{text}");
    let mut connections = 0;
    for b in web["backends"].as_array().expect("backends") {
        let addr = b["address"].as_str().expect("address");
        let i: usize = addr.rsplit('.').next().and_then(|l| l.parse().ok()).map(|l: usize| l - 10).expect("198.18.1.x");
        let name = format!("backend-{i}");
        let answered = spread.iter().find(|(n, _)| *n == name).map_or(0, |(_, c)| *c) as u64;
        let st = &b["stats"];
        let get = |k: &str| st[k].as_u64().unwrap_or_else(|| panic!("no stats.{k} for {addr}: {web}"));
        assert_eq!(get("connections"), answered, "{name} answered {answered} requests: {web}");
        assert_eq!(get("active_flows"), 0, "{name}: every connection is closed: {web}");
        assert_eq!(get("inactive_flows"), answered, "{name}: closed flows stay tracked until they expire: {web}");
        if answered > 0 {
            assert!(get("in_packets") >= 3 * answered && get("in_bytes") > 0, "{name}: {web}");
            if mode == Mode::Dsr {
                assert_eq!(get("out_packets"), 0, "{name}: DSR replies bypass the gateway: {web}");
            } else {
                assert!(get("out_packets") >= 2 * answered && get("out_bytes") > 0, "{name}: {web}");
            }
        }
        let port = b["port"].as_u64().expect("port");
        let row =
            text.lines().find(|l| l.trim_start().starts_with(&format!("-> {addr}:{port} "))).expect("backend row");
        assert!(
            row.split_whitespace().collect::<Vec<_>>().ends_with(&["0", &answered.to_string(), "enabled"]),
            "{row:?} should end with ActiveConn 0, InActConn {answered}, enabled"
        );
        assert!(traffic.contains(&format!("-> {addr}:{port} ")), "{traffic}");
        connections += get("connections");
    }
    assert_eq!(connections, u64::from(REQUESTS), "{web}");
    assert_eq!(web["stats"]["connections"].as_u64(), Some(u64::from(REQUESTS)), "service total: {web}");
}

#[test]
fn mode_nat_1_worker() {
    run(Mode::Nat, ONE_WORKER);
}

#[test]
fn mode_nat_2_workers() {
    run(Mode::Nat, TWO_WORKERS);
}

#[test]
fn mode_fullnat_1_worker() {
    run(Mode::FullNat, ONE_WORKER);
}

#[test]
fn mode_fullnat_2_workers() {
    run(Mode::FullNat, TWO_WORKERS);
}

#[test]
fn mode_dsr_1_worker() {
    run(Mode::Dsr, ONE_WORKER);
}

#[test]
fn mode_dsr_2_workers() {
    run(Mode::Dsr, TWO_WORKERS);
}
