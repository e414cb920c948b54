//! IPv4 fragments through the gateway, with the client's and the backends'
//! own kernels fragmenting and reassembling: 200 UDP exchanges of
//! 4,000-byte datagrams through the VIP in nat and in fullnat, fragmented
//! by the client's kernel (in order), then 200 more sent by the test in
//! reversed order (the first fragment last, so the others wait at the
//! gateway for it). Each reply, 4,000 bytes plus the backend's name, comes
//! back fragmented by the backend's kernel. Then a flood of first
//! fragments fills the gateway's fragment table, its drops are counted,
//! and unfragmented exchanges still pass.
//!
//! `pipeline/tests/fragments.rs` checks the rewrites byte by byte, every
//! order and the two-worker case; this test shows real stacks accept them.
//!
//! Needs root and hugepages (or VIPGATE_HUGEPAGES=0), like the other rig
//! tests.

use vipgate::{CLIENT_ADDR, Mode, Rig, RigOptions, UDP_PORT, VIP, repo_root};

const EXCHANGES: u64 = 200;
/// More first fragments than the fragment table has entries (4,096).
const FLOOD: u64 = 6000;

fn run(rig: &Rig, args: &[&str]) -> serde_json::Value {
    let script = repo_root().join("tests/python/udp_fragments.py");
    let port = UDP_PORT.to_string();
    let mut cmd = vec!["python3", script.to_str().unwrap()];
    cmd.extend_from_slice(&args[..1]);
    cmd.extend_from_slice(&["--vip", VIP, "--port", &port, "--src", CLIENT_ADDR]);
    cmd.extend_from_slice(&args[1..]);
    let out = rig.client(&cmd);
    assert!(out.status.success(), "udp_fragments.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn counter(stats: &serde_json::Value, name: &str) -> u64 {
    stats[name].as_u64().unwrap_or_else(|| panic!("no {name} in {stats}"))
}

fn fragments_pass_through(mode: Mode) {
    let rig = Rig::start(RigOptions { mode, ..Default::default() });
    let count = EXCHANGES.to_string();
    let before = rig.stats()["total"].clone();
    let in_order = run(&rig, &["exchanges", "--count", &count, "--order", "kernel"]);
    let reversed = run(&rig, &["exchanges", "--count", &count, "--order", "reversed"]);
    let mid = rig.stats()["total"].clone();
    let flood = run(&rig, &["flood", "--count", &FLOOD.to_string(), "--then", "100"]);
    let after = rig.stats()["total"].clone();
    let left = rig.teardown();
    let name = mode.name();
    println!("{name}: in order {in_order}");
    println!("{name}: reversed {reversed}");
    println!("{name}: flood {flood}");
    let delta = |a: &serde_json::Value, b: &serde_json::Value, n: &str| counter(b, n) - counter(a, n);
    for n in ["fragments_forwarded", "fragments_held", "fragments_released", "fragments_discarded"] {
        println!(
            "{name}: {n} {} during the exchanges, {} during the flood",
            delta(&before, &mid, n),
            delta(&mid, &after, n)
        );
    }
    let table_full = after["drops"]["fragment_table_full"].as_u64().expect("fragment_table_full");
    println!("{name}: fragment_table_full drops {table_full}");

    for (what, r) in [("in order", &in_order), ("reversed", &reversed)] {
        assert_eq!(
            (r["ok"].as_u64(), r["failed"].as_u64()),
            (Some(EXCHANGES), Some(0)),
            "{name} {what}: {r}\n{}",
            left.log
        );
        assert!(r["backends"].as_object().unwrap().len() > 1, "{name} {what}: one backend took every flow: {r}");
    }
    // Every exchange: the client's datagram in 3 fragments, the reply in 3.
    // In order, the 2 later ones of each are rewritten from the table; the
    // reversed requests' 2 later ones wait for their first.
    assert!(delta(&before, &mid, "fragments_forwarded") >= 2 * EXCHANGES * 2, "{mid}");
    assert_eq!(delta(&before, &mid, "fragments_held"), 2 * EXCHANGES, "{mid}");
    assert_eq!(delta(&before, &mid, "fragments_released"), 2 * EXCHANGES, "{mid}");
    assert_eq!(delta(&before, &mid, "fragments_discarded"), 0, "{mid}");
    for reason in ["fragment", "fragment_table_full", "fragment_hold_full", "malformed"] {
        assert_eq!(mid["drops"][reason].as_u64(), Some(0), "{name}: {reason} drops during the exchanges: {mid}");
    }
    // The flood fills the table; unfragmented traffic passes meanwhile.
    assert_eq!(flood["flood_sent"].as_u64(), Some(FLOOD), "{flood}");
    assert!(table_full > 0, "{name}: {FLOOD} first fragments never filled the fragment table: {after}");
    assert_eq!((flood["ok"].as_u64(), flood["failed"].as_u64()), (Some(100), Some(0)), "{name}: {flood}");
    left.assert_clean();
}

#[test]
fn fragments_of_udp_datagrams_reach_one_backend_and_back_in_nat() {
    fragments_pass_through(Mode::Nat);
}

#[test]
fn fragments_of_udp_datagrams_reach_one_backend_and_back_in_fullnat() {
    fragments_pass_through(Mode::FullNat);
}
