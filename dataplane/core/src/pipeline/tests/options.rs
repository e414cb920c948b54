//! Per-service options: the source list (`source_denied`) and client-IP
//! affinity.

use super::modes::{deliver, dsr, fullnat, spec_mode, two_workers};
use super::*;
use crate::snapshot::{Affinity, ForwardingMode};

const ACK: u8 = 0x10;
const SYN: u8 = 0x02;

fn cidr(a: u32, len: u8) -> Ipv4Cidr {
    Ipv4Cidr { addr: a, len }
}

/// A TCP segment from `src:sport` to the web service with these flags.
fn segment(src: u32, sport: u16, flags: u8) -> Vec<u8> {
    let mut f = to_port(0, tcp_frame((src, sport), (VIP, 80), 64, b""));
    f[14 + 20 + 13] = flags;
    tcp::Packet::new_unchecked(&mut f[14 + 20..14 + 40]).fill_checksum(src, VIP);
    f
}

/// `spec` with the web service (0) serving only `ranges`.
fn with_sources(mut spec: SnapshotSpec, ranges: &[Ipv4Cidr]) -> SnapshotSpec {
    Arc::make_mut(&mut spec.services[0]).source_ranges = ranges.to_vec();
    spec
}

/// `spec` with both services' affinity set to `a`.
fn with_affinity(mut spec: SnapshotSpec, a: Affinity) -> SnapshotSpec {
    for s in &mut spec.services {
        Arc::make_mut(s).affinity = a;
    }
    spec
}

#[test]
fn a_source_outside_the_list_is_dropped_before_any_flow_and_inside_is_served() {
    for mode in [ForwardingMode::Nat, fullnat(), dsr()] {
        // CLIENT (198.18.0.2) is inside 198.18.0.0/30; REMOTE (198.19.5.5)
        // is outside every prefix.
        let spec = with_sources(spec_mode(&mode, (20000, 20099)), &[cidr(ip(10, 0, 0, 0), 8), cidr(CLIENT, 30)]);
        let mut r = Rig::with_spec(&spec);
        let frame = segment(REMOTE, 40000, ACK);
        let (v, out) = r.run_with_headroom(0, &frame, 64);
        assert_eq!(v, Verdict::Drop(DropReason::SourceDenied), "{mode:?}");
        assert_eq!(out, frame, "{mode:?}: a denied frame is left as it came");
        // A SYN too (the list is checked before the new-flow decision).
        assert_eq!(r.run_with_headroom(0, &segment(REMOTE, 40001, SYN), 64).0, Verdict::Drop(DropReason::SourceDenied));
        assert_eq!(r.pipe.counters().drops(DropReason::SourceDenied), 2, "{mode:?}");
        assert_eq!(r.pipe.counters().flows_created.get(), 0, "{mode:?}: no flow for a denied source");
        assert_eq!(r.pipe.flows().occupied(), 0, "{mode:?}");
        // Inside the list: served and tracked as usual.
        assert_eq!(r.run_with_headroom(0, &segment(CLIENT, 40000, ACK), 64).0, Verdict::Transmit(1), "{mode:?}");
        assert_eq!(r.pipe.counters().flows_created.get(), 1, "{mode:?}");
        // The other service (udp/53, no list) serves REMOTE.
        let mut f = to_port(0, udp_frame((REMOTE, 40000), (VIP, 53), 64, b"q"));
        let (v, _) = r.run_with_headroom(0, &f, 64);
        assert_eq!(v, Verdict::Transmit(1), "{mode:?}");
        assert_eq!(r.pipe.counters().drops(DropReason::SourceDenied), 2, "{mode:?}");
        // Replies from the backends are not checked: a nat reply to REMOTE
        // (as if its flow began elsewhere) is translated back.
        if mode == ForwardingMode::Nat {
            f = to_port(1, tcp_frame((BACKENDS[0], 8080), (REMOTE, 40000), 64, b""));
            assert_eq!(r.run(1, &mut f), Verdict::Transmit(0));
        }
    }
}

#[test]
fn an_empty_list_serves_everyone_and_0_0_0_0_slash_0_too() {
    for ranges in [vec![], vec![cidr(0, 0)]] {
        let mut r = Rig::with_spec(&with_sources(spec(), &ranges));
        for src in [CLIENT, REMOTE, ip(203, 0, 113, 9)] {
            assert_eq!(r.run(0, &mut segment(src, 40000, ACK)), Verdict::Transmit(1), "{ranges:?}");
        }
        assert_eq!(r.pipe.counters().drops(DropReason::SourceDenied), 0);
    }
}

#[test]
fn narrowing_the_list_cuts_tracked_flows_of_sources_it_no_longer_serves() {
    for mode in [ForwardingMode::Nat, fullnat(), dsr()] {
        let base = spec_mode(&mode, (20000, 20099));
        let mut r = Rig::with_spec(&base);
        for (src, sport) in [(CLIENT, 40000), (REMOTE, 40000), (REMOTE, 40001)] {
            assert_eq!(r.run_with_headroom(0, &segment(src, sport, ACK), 64).0, Verdict::Transmit(1), "{mode:?}");
        }
        assert_eq!(r.pipe.flows().occupied(), 3);
        let free = r.pipe.snat.free_pairs(0);
        // Only the client LAN now.
        r.snap = Snapshot::build(&with_sources(base.clone(), &[cidr(ip(198, 18, 0, 0), 24)])).unwrap();
        for sport in [40000, 40001] {
            assert_eq!(
                r.run_with_headroom(0, &segment(REMOTE, sport, ACK), 64).0,
                Verdict::Drop(DropReason::SourceDenied),
                "{mode:?}: a tracked flow of a now-denied source"
            );
        }
        assert_eq!(r.pipe.flows().occupied(), 1, "{mode:?}: the denied flows are forgotten");
        let gauges: u64 = BACKENDS
            .iter()
            .flat_map(|&b| [slot_of(b, 8080), slot_of(b, 80)])
            .map(|slot| {
                let c = r.pipe.backend_stats().read(slot);
                c.active + c.inactive
            })
            .sum();
        assert_eq!(gauges, 1, "{mode:?}: the gauges follow the table");
        if matches!(mode, ForwardingMode::FullNat { .. }) {
            assert_eq!(r.pipe.snat.free_pairs(0), free + 2, "their source pairs are freed");
        }
        // The flow of the source still served goes on.
        assert_eq!(r.run_with_headroom(0, &segment(CLIENT, 40000, ACK), 64).0, Verdict::Transmit(1));
        // Widened again: the source starts a new flow.
        r.snap = Snapshot::build(&base).unwrap();
        assert_eq!(r.run_with_headroom(0, &segment(REMOTE, 40000, ACK), 64).0, Verdict::Transmit(1));
        assert_eq!(r.pipe.flows().occupied(), 2, "{mode:?}");
    }
}

/// The backend a packet was sent to, whatever the mode.
fn backend_of(out: &[u8]) -> u32 {
    let ip = &out[14..];
    let outer_dst = u32::from_be_bytes([ip[16], ip[17], ip[18], ip[19]]);
    assert!(BACKENDS.contains(&outer_dst), "sent to a backend");
    outer_dst
}

/// The backends chosen for `ports` connections (SYNs) from `client`, one
/// per source port, across two workers as RSS would spread them.
fn chosen(spec: &SnapshotSpec, client: u32, ports: u16) -> Vec<u32> {
    let (_, mut rigs) = two_workers(spec);
    (0..ports)
        .map(|i| {
            let frame = segment(client, 30000 + i * 7, SYN);
            let (v, _, out, _) = deliver(&mut rigs, usize::from(i % 2), 0, &frame);
            assert_eq!(v, Verdict::Transmit(1));
            backend_of(&out)
        })
        .collect()
}

#[test]
fn with_client_ip_affinity_every_connection_of_a_client_reaches_one_backend() {
    for mode in [ForwardingMode::Nat, fullnat(), dsr()] {
        let base = spec_mode(&mode, (20000, 29999));
        // Without affinity one client's connections spread (the test can
        // tell the two apart).
        let mut spread = chosen(&base, CLIENT, 100);
        spread.sort_unstable();
        spread.dedup();
        assert_eq!(spread.len(), 3, "{mode:?}: without affinity");

        let sticky = with_affinity(base, Affinity::ClientIp);
        let mut firsts = Vec::new();
        for k in 0..40u32 {
            let client = REMOTE + k * 257;
            let got = chosen(&sticky, client, 50);
            assert!(got.iter().all(|&b| b == got[0]), "{mode:?}: client {k}: {got:?}");
            firsts.push(got[0]);
        }
        // Different clients spread over the backends.
        firsts.sort_unstable();
        firsts.dedup();
        assert_eq!(firsts.len(), 3, "{mode:?}: clients spread");
    }
}

#[test]
fn affinity_keeps_tracked_flows_and_moves_a_client_together_when_its_backend_drains() {
    let base = with_affinity(spec(), Affinity::ClientIp);
    let mut r = Rig::with_spec(&base);
    let to = |r: &mut Rig, sport: u16, flags: u8| {
        let mut f = segment(CLIENT, sport, flags);
        assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
        backend_of(&f)
    };
    let first = to(&mut r, 30000, ACK);
    for sport in 30001..30020 {
        assert_eq!(to(&mut r, sport, ACK), first);
    }
    // Its backend drains: tracked flows stay, new connections all move to
    // one other backend.
    let mut drained = base.clone();
    for b in &mut Arc::make_mut(&mut drained.services[0]).backends {
        if b.addr == first {
            b.weight = 0;
        }
    }
    r.snap = Snapshot::build(&drained).unwrap();
    assert_eq!(to(&mut r, 30000, ACK), first, "a tracked flow keeps its backend");
    let moved = to(&mut r, 31000, SYN);
    assert_ne!(moved, first);
    for sport in 31001..31020 {
        assert_eq!(to(&mut r, sport, SYN), moved);
    }
}
