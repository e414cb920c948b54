//! End-to-end: vipgated on net_tap ports between real network namespaces,
//! with real kernel TCP/UDP stacks, real curl and socat, and real HTTP/UDP
//! backends (scripts/backend.py). Needs root and hugepages (or
//! VIPGATE_HUGEPAGES=0); fails loudly without them.

use std::collections::BTreeMap;
use vipgate::{Rig, RigOptions, VIP, backend_addr};
use vipgate_dataplane::hash::{FlowKey, flow_hash};
use vipgate_dataplane::maglev::{DEFAULT_TABLE_SIZE, MaglevBackend, MaglevTable};

const REQUESTS: u16 = 300;
/// Client source ports are fixed so that the flows, and so the split, are
/// the same in every run; the test also checks the dataplane sent every
/// flow exactly where the packet core's Maglev table says.
const FIRST_SOURCE_PORT: u16 = 40000;

/// Sends `REQUESTS` HTTP requests, each on a new connection from its own
/// source port; returns the answering backend name per source port, or the
/// failure.
fn http_requests(rig: &Rig) -> Vec<(u16, Result<String, String>)> {
    (0..REQUESTS)
        .map(|i| {
            let sport = FIRST_SOURCE_PORT + i;
            let out = rig.client(&[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "--local-port",
                &sport.to_string(),
                "-H",
                "Connection: close",
                &format!("http://{VIP}/"),
            ]);
            let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let r = match body.strip_prefix("backend ") {
                Some(name) if out.status.success() => Ok(name.to_owned()),
                _ => Err(format!("{} {body:?} {}", out.status, String::from_utf8_lossy(&out.stderr).trim())),
            };
            (sport, r)
        })
        .collect()
}

/// The backend (1-based) the packet core's Maglev table picks for a flow.
fn predicted_backend(sport: u16, backends: usize) -> usize {
    let keys: Vec<String> = (1..=backends).map(|i| format!("{}:8080", backend_addr(i))).collect();
    let mb: Vec<MaglevBackend<'_>> = keys.iter().map(|k| MaglevBackend { key: k.as_bytes(), weight: 1 }).collect();
    let table = MaglevTable::build(&mb, DEFAULT_TABLE_SIZE).unwrap();
    let ip = |s: &str| u32::from(s.parse::<std::net::Ipv4Addr>().unwrap());
    let key =
        FlowKey { src_addr: ip(vipgate::CLIENT_ADDR), dst_addr: ip(VIP), src_port: sport, dst_port: 80, protocol: 6 };
    usize::from(table.lookup(flow_hash(&key)).unwrap()) + 1
}

#[test]
fn e2e_a_300_http_requests_to_the_vip_all_succeed() {
    let rig = Rig::start(RigOptions::default());
    let results = http_requests(&rig);
    let failures: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    let stats = rig.stats();
    let left = rig.teardown();
    assert!(
        failures.is_empty(),
        "{} of {REQUESTS} requests failed: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        left.log
    );
    assert_eq!(stats["total"]["drops"]["malformed"].as_u64().unwrap_or(0), 0, "{stats}");
    assert!(stats["total"]["nat_forward"].as_u64().unwrap() >= u64::from(REQUESTS) * 3, "{stats}");
    left.assert_clean();
}

#[test]
fn e2e_b_every_backend_gets_traffic_within_15_percent_of_even() {
    let rig = Rig::start(RigOptions::default());
    let results = http_requests(&rig);
    let left = rig.teardown();
    let mut split: BTreeMap<String, u32> = BTreeMap::new();
    for (sport, r) in &results {
        let name = r.as_ref().unwrap_or_else(|e| panic!("request from port {sport} failed: {e}"));
        let predicted = format!("backend-{}", predicted_backend(*sport, 3));
        assert_eq!(name, &predicted, "flow from port {sport} reached {name}, the Maglev table says {predicted}");
        *split.entry(name.clone()).or_default() += 1;
    }
    println!("split over {REQUESTS} connections: {split:?}");
    assert_eq!(split.len(), 3, "not every backend got traffic: {split:?}");
    let even = f64::from(REQUESTS) / 3.0;
    for (name, n) in &split {
        let off = (f64::from(*n) - even).abs() / even;
        assert!(off <= 0.15, "{name} got {n} of {REQUESTS} ({:.1}% off even): {split:?}", off * 100.0);
    }
    left.assert_clean();
}

#[test]
fn e2e_c_udp_request_and_response_through_the_vip() {
    let rig = Rig::start(RigOptions::default());
    let mut names = Vec::new();
    for i in 0..12u16 {
        let payload = format!("ping-{i}");
        let out = rig.client(&[
            "sh",
            "-c",
            &format!("printf '{payload}' | socat -T 3 - UDP4:{VIP}:5353,sourceport={},reuseaddr", 50000 + i),
        ]);
        let reply = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "socat failed: {}", String::from_utf8_lossy(&out.stderr));
        let (name, echoed) = reply.split_once(' ').unwrap_or_else(|| panic!("unexpected UDP reply {reply:?}"));
        assert_eq!(echoed, payload, "reply {reply:?}");
        assert!(name.starts_with("backend-"), "reply {reply:?}");
        names.push(name.to_owned());
    }
    names.sort();
    names.dedup();
    let stats = rig.stats();
    let left = rig.teardown();
    assert!(names.len() >= 2, "12 UDP flows all went to {names:?}");
    assert!(stats["total"]["nat_reverse"].as_u64().unwrap() >= 12, "{stats}");
    left.assert_clean();
}

#[test]
fn e2e_d_syn_to_an_unconfigured_port_gets_no_answer_and_is_counted() {
    let rig = Rig::start(RigOptions::default());
    let before = rig.drops("no_service");
    // curl exit 28 is a timeout: no SYN-ACK and no RST came back (a RST
    // would be exit 7, "connection refused").
    let out = rig.client(&["curl", "-sS", "--connect-timeout", "2", &format!("http://{VIP}:81/")]);
    let code = out.status.code();
    let after = rig.drops("no_service");
    // The configured port still works.
    let ok = rig.client(&["curl", "-sS", "--max-time", "5", &format!("http://{VIP}/")]);
    let left = rig.teardown();
    assert_eq!(code, Some(28), "expected a timeout, got {:?}: {}", code, String::from_utf8_lossy(&out.stderr));
    assert!(after > before, "no_service drops did not rise: {before} -> {after}");
    assert!(ok.status.success(), "port 80 stopped working: {}", String::from_utf8_lossy(&ok.stderr));
    left.assert_clean();
}

#[test]
fn e2e_e_teardown_leaves_nothing_even_when_a_test_fails() {
    let prefix = std::panic::catch_unwind(|| {
        let rig = Rig::start(RigOptions::default());
        let prefix = rig.prefix.clone();
        let out = rig.client(&["curl", "-sS", "--max-time", "5", &format!("http://{VIP}/")]);
        assert!(out.status.success());
        // Fail with the rig alive: Drop must clean up.
        panic!("deliberate failure in rig {prefix}");
    })
    .expect_err("the closure panics");
    let msg = prefix.downcast_ref::<String>().expect("panic message");
    let prefix = msg.rsplit(' ').next().unwrap().to_owned();
    let ns =
        String::from_utf8_lossy(&std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
            .into_owned();
    assert!(!ns.contains(&prefix), "namespaces of {prefix} left: {ns}");
    let procs = std::process::Command::new("pgrep").args(["-af", &prefix]).output().unwrap();
    let procs = String::from_utf8_lossy(&procs.stdout);
    assert!(procs.lines().all(|l| l.contains("pgrep")), "processes of {prefix} left: {procs}");
    let huge: Vec<_> = std::fs::read_dir("/dev/hugepages")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name())
                .filter(|n| n.to_string_lossy().starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(huge.is_empty(), "hugepage files of {prefix} left: {huge:?}");
    assert!(!std::path::Path::new("/var/run/dpdk").join(&prefix).exists());
}

/// Two workers (lcores 1 and 2 share CPU 1 on a two-CPU machine), so each
/// tap has two queues and the kernel spreads flows across them. Each flow
/// has one owner worker; a packet the other worker receives is handed to
/// the owner, so what must hold is that both workers forward and that every
/// request succeeds (tests/modes.rs checks the hand-off counters).
/// (On net_tap the kernel spreads ARP traffic over both queues too, so this
/// test passes even without neighbour sharing between workers; the
/// pipeline's `workers_share_what_they_learn_from_arp` test covers that.)
#[test]
fn e2e_two_workers_forward_http_and_udp() {
    let rig = Rig::start(RigOptions { lcores: "0@0,1@1,2@1".to_owned(), ..RigOptions::default() });
    let results = http_requests(&rig);
    let failures: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    let udp = rig.client(&["sh", "-c", &format!("printf two | socat -T 3 - UDP4:{VIP}:5353")]);
    let stats = rig.stats();
    let left = rig.teardown();
    assert!(
        failures.is_empty(),
        "{} of {REQUESTS} failed: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        left.log
    );
    assert!(
        String::from_utf8_lossy(&udp.stdout).ends_with(" two"),
        "UDP reply {:?}",
        String::from_utf8_lossy(&udp.stdout)
    );
    let workers = stats["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{stats}");
    for w in workers {
        assert!(w["nat_forward"].as_u64().unwrap() > 0, "a worker forwarded nothing: {stats}");
    }
    println!(
        "per-worker nat_forward: {:?}",
        workers.iter().map(|w| w["nat_forward"].as_u64().unwrap()).collect::<Vec<_>>()
    );
    left.assert_clean();
}

#[test]
fn e2e_traceroute_from_the_client_shows_the_gateway_then_the_vip() {
    let rig = Rig::start(RigOptions::default());
    let counters = |rig: &Rig| rig.stats()["total"]["icmp_time_exceeded"].as_u64().expect("icmp_time_exceeded");
    let before = counters(&rig);
    // TCP SYN probes to the service's port, numeric, one per hop: hop 1
    // expires at the gateway, which answers time exceeded from its port
    // address; hop 2 reaches a backend through the VIP, whose SYN-ACK comes
    // back from the VIP.
    let out = rig.client(&["traceroute", "-n", "-T", "-p", "80", "-q", "1", "-w", "2", "-m", "5", VIP]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let after = counters(&rig);
    let hops: Vec<Vec<String>> =
        text.lines().skip(1).map(|l| l.split_whitespace().map(str::to_owned).collect()).collect();
    let left = rig.teardown();
    println!("{text}");
    assert!(out.status.success(), "traceroute: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(hops.len(), 2, "two hops, the gateway and the VIP:\n{text}");
    assert_eq!((hops[0][0].as_str(), hops[0][1].as_str()), ("1", "198.18.0.1"), "hop 1 is the gateway's port:\n{text}");
    assert_eq!((hops[1][0].as_str(), hops[1][1].as_str()), ("2", VIP), "hop 2 is the VIP:\n{text}");
    assert_eq!(after - before, 1, "one time exceeded sent, for hop 1");
    left.assert_clean();
}
