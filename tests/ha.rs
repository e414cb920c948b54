//! Active/active HA: two vipgated with the same services behind a router
//! that spreads each VIP over both (ECMP over the routes both announce over
//! BGP with BFD; topology in tests/support/ha.rs). No state is shared
//! between the gateways: a flow reaches the same backend through either
//! because their Maglev tables are identical (same backends, same hash),
//! and in nat mode either translates any reply, since reverse translation
//! comes from the configuration.
//!
//! Each test, in nat and in dsr mode:
//! 1. new connections spread over both gateways, each counting exactly
//!    those the router sent it;
//! 2. a long download runs through gateway a: the router sends the
//!    client's packets to a, and in nat mode the backends send their
//!    replies through a as well (the source port is chosen so, by asking
//!    the kernels for their multipath choice; the gateways' counters
//!    confirm it);
//! 3. a's vipgated is killed (SIGKILL) in the middle of it;
//! 4. BFD takes a out of the router's route (and the backends', in nat
//!    mode); meanwhile the bridges flood to b what is still sent to a's
//!    MAC, and b drops it (`other_host`): it takes over only what the
//!    routes give it; then b picks the flow up, on the same backend, and
//!    the download completes, every byte checked;
//! 5. new connections keep succeeding, all through b.
//!
//! Needs root, hugepages (or VIPGATE_HUGEPAGES=0), FRR and BIRD 2
//! (scripts/setup.sh), and for dsr the kernel's IPIP or
//! VIPGATE_DSR_DECAP=userspace; fails loudly without them.

use std::time::{Duration, Instant};

use vipgate::ha::{BACKENDS, HaPair};
use vipgate::{Mode, bytes_sha256};

/// The download: 24 MiB at 3 MiB/s, some 8 s.
const DOWNLOAD_BYTES: u64 = 24 << 20;
const DOWNLOAD_RATE: &str = "3M";
/// How long after the kill the router and the backends must have moved
/// to the survivor: BFD's detection time (3 x 300 ms) plus the BGP
/// withdrawal and the kernel route update, with room for a loaded machine.
const FAILOVER_BOUND: Duration = Duration::from_secs(5);

fn stat(v: &serde_json::Value, field: &str) -> u64 {
    v["stats"][field].as_u64().unwrap_or_else(|| panic!("no stats.{field} in {v}"))
}

/// The web service's traffic on gateway `g`, per backend address:
/// (in_packets, out_packets).
fn per_backend(pair: &HaPair, g: usize) -> Vec<(String, u64, u64)> {
    pair.web(g)["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| (b["address"].as_str().unwrap_or("?").to_owned(), stat(b, "in_packets"), stat(b, "out_packets")))
        .collect()
}

/// Gateway `g`'s `other_host` drops: frames for another host's MAC.
fn other_host(pair: &HaPair, g: usize) -> u64 {
    let stats = pair.ctl_json(g, &["stats"]);
    stats["total"]["drops"]["other_host"].as_u64().unwrap_or_else(|| panic!("no other_host drops in {stats}"))
}

fn wait_until(what: &str, timeout: Duration, pair: &HaPair, mut done: impl FnMut() -> bool) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}\n{}", pair.diagnostics());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn a_transfer_survives_the_death_of_its_gateway(mode: Mode) {
    let mut pair = HaPair::start(mode);
    let (a, b) = (0, 1);
    let name = mode.name();

    // 1. Active/active: each gateway takes the connections the router
    //    sends it, and both get some.
    let connections = |g: usize| stat(&pair.web(g), "connections");
    let before = [connections(a), connections(b)];
    let mut sent = [0u64; 2];
    for sport in 42000..42040 {
        let w = pair.whoami(sport).unwrap_or_else(|e| panic!("{e}\n{}", pair.diagnostics()));
        assert!(w.backend.starts_with("backend-"), "{w:?}");
        sent[pair.via(sport)] += 1;
    }
    let took = [connections(a) - before[0], connections(b) - before[1]];
    println!("{name}: 40 connections, the router sent {sent:?} to gateways [a, b], which counted {took:?}");
    assert_eq!(took, sent, "each gateway counts exactly the connections the router sent it");
    assert!(sent[a] > 0 && sent[b] > 0, "both gateways carry connections (ECMP): {sent:?}");

    // 2. A source port whose packets go through a both ways.
    let sport = (43000..44000)
        .find(|&s| pair.via(s) == a && (mode != Mode::Nat || (1..=BACKENDS).all(|i| pair.reply_via(i, s) == a)))
        .expect("a source port routed through gateway a both ways");
    let mut download = pair.start_download(DOWNLOAD_BYTES, DOWNLOAD_RATE, sport);
    let backend = download.backend(Duration::from_secs(10));
    let backend_addr = format!("198.18.1.{}", 10 + backend.trim_start_matches("backend-").parse::<usize>().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    let s0 = [per_backend(&pair, a), per_backend(&pair, b)];
    std::thread::sleep(Duration::from_millis(1000));
    let s1 = [per_backend(&pair, a), per_backend(&pair, b)];
    let moved = |g: usize, dir: usize| -> u64 {
        s1[g].iter().zip(&s0[g]).map(|(x, y)| if dir == 0 { x.1 - y.1 } else { x.2 - y.2 }).sum()
    };
    println!(
        "{name}: download from port {sport}, served by {backend}; over 1 s gateway a forwarded {} packets in and {} out, gateway b {} and {}",
        moved(a, 0),
        moved(a, 1),
        moved(b, 0),
        moved(b, 1)
    );
    assert!(download.running(), "the download ended before the failure: make it longer");
    assert!(moved(a, 0) > 10, "the client's packets go through gateway a\n{}", pair.diagnostics());
    assert_eq!((moved(b, 0), moved(b, 1)), (0, 0), "nothing of it goes through gateway b");
    if mode == Mode::Nat {
        assert!(moved(a, 1) > 50, "the backend's replies go through gateway a (nat)");
    } else {
        assert_eq!(moved(a, 1), 0, "dsr: replies go straight to the client");
    }

    // 3. Gateway a dies.
    let b_other_host = other_host(&pair, b);
    let b_before = per_backend(&pair, b);
    let killed = Instant::now();
    pair.kill(a);
    let survivor = pair.gateways[b].client_addr.to_owned();
    let router_moved = wait_until("the router's route through b alone", FAILOVER_BOUND, &pair, || {
        pair.vip_next_hops().into_iter().collect::<Vec<_>>() == [survivor.clone()]
    }) - killed;
    let backends_moved = if mode == Mode::Nat {
        let back = pair.gateways[b].backend_addr.to_owned();
        Some(
            wait_until("the backends' default routes through b alone", FAILOVER_BOUND, &pair, || {
                (1..=BACKENDS).all(|i| pair.backend_default(i).into_iter().collect::<Vec<_>>() == [back.clone()])
            }) - killed,
        )
    } else {
        None
    };
    println!(
        "{name}: gateway a killed; the router's route to the VIP via b alone after {:.3} s{}",
        router_moved.as_secs_f64(),
        backends_moved
            .map_or(String::new(), |d| format!(", the backends' default routes after {:.3} s", d.as_secs_f64()))
    );

    // 4. b carries the flow on, to the same backend.
    wait_until("the download's packets through gateway b", Duration::from_secs(10), &pair, || {
        per_backend(&pair, b).iter().zip(&b_before).any(|(x, y)| x.0 == backend_addr && x.1 > y.1)
    });
    let picked_up = killed.elapsed();
    // Until the routes moved, the bridges flooded what was still sent to
    // a's MAC (a's tap is gone) to b as well: b dropped it, it does not
    // take over traffic the routers have not given it.
    let flooded = other_host(&pair, b) - b_other_host;
    println!(
        "{name}: gateway b dropped {flooded} frames addressed to gateway a's MAC (other_host) while the routes moved"
    );
    assert!(flooded > 0, "frames for a's MAC reach b while the routes move, and b drops them");

    // 5. New connections, all through b, all answered.
    let mut answered = 0;
    for sport in 45000..45020 {
        let w = pair
            .whoami(sport)
            .unwrap_or_else(|e| panic!("a new connection after the failure: {e}\n{}", pair.diagnostics()));
        assert!(w.backend.starts_with("backend-"), "{w:?}");
        assert_eq!(pair.via(sport), b, "the router sends everything to b");
        answered += 1;
    }
    let done = download.finish().unwrap_or_else(|e| panic!("the download failed: {e}\n{}", pair.diagnostics()));
    println!(
        "{name}: b forwarded the download's packets {:.3} s after the kill; {answered} new connections answered through b; download complete in {:.1} s: {} bytes, HTTP {}",
        picked_up.as_secs_f64(),
        done.took.as_secs_f64(),
        done.size,
        done.code
    );
    assert_eq!(done.code, "200");
    assert_eq!(done.size, DOWNLOAD_BYTES, "every byte arrived");
    assert_eq!(done.sha256, bytes_sha256(DOWNLOAD_BYTES), "and they are the right ones");
    // Only the download's backend got its packets through b (the other's
    // grew by the new connections alone, which came after).
    let b_after = per_backend(&pair, b);
    println!("{name}: gateway b per backend (address, in, out) before the kill {b_before:?}, now {b_after:?}");
    let grew: Vec<&str> = b_after.iter().zip(&b_before).filter(|(x, y)| x.1 > y.1).map(|(x, _)| x.0.as_str()).collect();
    assert!(grew.contains(&backend_addr.as_str()), "{grew:?}");
    if mode == Mode::Nat {
        let out: u64 = b_after.iter().zip(&b_before).map(|(x, y)| x.2 - y.2).sum();
        assert!(out > 100, "the backend's replies go through b once a is gone: {out}");
    }
    pair.teardown();
}

#[test]
fn nat_a_transfer_survives_the_death_of_its_gateway_and_new_connections_go_to_the_other() {
    a_transfer_survives_the_death_of_its_gateway(Mode::Nat);
}

#[test]
fn dsr_a_transfer_survives_the_death_of_its_gateway_and_new_connections_go_to_the_other() {
    a_transfer_survives_the_death_of_its_gateway(Mode::Dsr);
}
