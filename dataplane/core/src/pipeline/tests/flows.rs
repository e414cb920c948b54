//! Connection tracking at the edges: new connections on reused client
//! ports, impossible TCP flags, and half-open connections, which must never
//! take an established flow's place in the table.

use super::modes::{dsr, fullnat, spec_mode};
use super::*;
use crate::snapshot::ForwardingMode;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;
const SYN_ACK: u8 = 0x12;

fn key(src: u32, sport: u16) -> FlowKey {
    FlowKey { src_addr: src, dst_addr: VIP, src_port: sport, dst_port: 80, protocol: 6 }
}

/// A client segment of flow `src:sport` -> VIP:80 with exactly `flags`.
fn seg(src: u32, sport: u16, flags: u8) -> Vec<u8> {
    to_port(0, with_flags(tcp_frame((src, sport), (VIP, 80), 64, b"x"), flags))
}

/// Sends a client segment with 64 bytes of headroom (DSR needs it);
/// returns the verdict and the frame as it leaves.
fn client(r: &mut Rig, src: u32, sport: u16, flags: u8) -> (Verdict, Vec<u8>) {
    r.run_with_headroom(0, &seg(src, sport, flags), 64)
}

/// Where a forwarded client segment went: the backend's address, and the
/// source (address, port) the backend sees (the client's, or the FullNAT
/// pair), whatever the mode.
fn sent_to(out: &[u8]) -> (u32, (u32, u16)) {
    if out[14 + 9] == 4 {
        let (_, _, _, outer_dst, _, inner) = super::modes::decapsulate(out);
        let (_, _, src, _, _, sport, _) = inspect(&inner);
        return (outer_dst, (src, sport));
    }
    let (_, _, src, dst, _, sport, _) = inspect(out);
    (dst, (src, sport))
}

/// Sends a client segment that must be forwarded; returns [`sent_to`].
fn forward(r: &mut Rig, src: u32, sport: u16, flags: u8) -> (u32, (u32, u16)) {
    let (v, out) = client(r, src, sport, flags);
    assert_eq!(v, Verdict::Transmit(1), "{src:#x}:{sport} flags {flags:#x}");
    sent_to(&out)
}

/// SYN, then the client's ACK; returns where the connection went.
fn connect(r: &mut Rig, sport: u16) -> (u32, (u32, u16)) {
    let to = forward(r, CLIENT, sport, SYN);
    assert_eq!(forward(r, CLIENT, sport, ACK), to, "flow {sport}: the ACK follows the SYN");
    to
}

/// The backend Maglev picks for flow `CLIENT:sport` in `snap` now.
fn maglev_pick(snap: &Snapshot, sport: u16) -> u32 {
    let svc = &snap.services()[0];
    let i = svc.maglev.lookup(flow_hash(&key(CLIENT, sport))).expect("a backend");
    svc.backends[usize::from(i)].addr
}

fn state(r: &Rig, src: u32, sport: u16) -> Option<FlowState> {
    r.pipe.flows().find(&key(src, sport), r.now).map(|f| r.pipe.flows().get(f).state)
}

/// The active and inactive gauges over every stats slot.
fn gauges(r: &Rig) -> (u64, u64) {
    let stats = r.pipe.backend_stats();
    (0..stats.capacity() as u32).map(|s| stats.read(s)).fold((0, 0), |(a, i), t| (a + t.active, i + t.inactive))
}

fn assert_gauges_add_up(r: &Rig) {
    let (a, i) = gauges(r);
    assert_eq!(a + i, r.pipe.flows().occupied() as u64, "gauges {a} + {i} against the table");
}

/// A backend's reply to the client (nat) or to the FullNAT pair `to`.
fn reply(r: &mut Rig, backend: u32, to: (u32, u16), flags: u8) -> Verdict {
    let mut f = with_flags(tcp_frame((backend, 8080), to, 64, b"y"), flags);
    r.run(1, &mut f)
}

/// A rig in `mode` with the web service's backends at `weights`.
fn rig_in(mode: &ForwardingMode, weights: [u32; 3], ports: (u16, u16)) -> Rig {
    let mut s = spec_mode(mode, ports);
    for (b, w) in Arc::make_mut(&mut s.services[0]).backends.iter_mut().zip(weights) {
        b.weight = w;
    }
    Rig::with_spec(&s)
}

fn respec(r: &mut Rig, mode: &ForwardingMode, weights: [u32; 3], ports: (u16, u16)) {
    let mut s = spec_mode(mode, ports);
    for (b, w) in Arc::make_mut(&mut s.services[0]).backends.iter_mut().zip(weights) {
        b.weight = w;
    }
    r.snap = Snapshot::build(&s).unwrap();
}

// ---- New connections on a tracked client port -------------------------

#[test]
fn a_syn_on_a_closed_flow_gets_a_fresh_choice() {
    let mut r = Rig::resolved();
    r.teach(1, B4, [0x02, 0xbb, 0, 0, 0, 14], GW_B_IP);
    let before: Vec<u32> = (0..200u16).map(|p| connect(&mut r, 20000 + p).0).collect();
    // A fourth backend: the tracked flows stay, Maglev now picks B4 for
    // about a quarter of their tuples.
    r.snap = Snapshot::build(&spec_with(&[(BACKENDS[0], 1), (BACKENDS[1], 1), (BACKENDS[2], 1), (B4, 1)])).unwrap();
    let moved: Vec<u16> = (0..200u16).filter(|&p| maglev_pick(&r.snap, 20000 + p) != before[usize::from(p)]).collect();
    assert!(moved.len() > 20, "only {} tuples would move", moved.len());
    for (n, &p) in moved.iter().enumerate() {
        let sport = 20000 + p;
        // The connection ends: a FIN from the client, or a RST.
        let close = if n % 2 == 0 { FIN_ACK } else { RST };
        assert_eq!(
            forward(&mut r, CLIENT, sport, close).0,
            before[usize::from(p)],
            "the close goes to the old backend"
        );
        assert_eq!(state(&r, CLIENT, sport), Some(FlowState::TcpClosing));
        // The client reuses its port for a new connection.
        let to = forward(&mut r, CLIENT, sport, SYN).0;
        assert_eq!(to, maglev_pick(&r.snap, sport), "flow {sport}: the new connection follows Maglev");
        assert_eq!(forward(&mut r, CLIENT, sport, ACK).0, to);
        assert_eq!(state(&r, CLIENT, sport), Some(FlowState::TcpEstablished));
    }
    // A SYN on a flow that is not over keeps it (a retransmission).
    let kept = (0..200u16).find(|p| !moved.contains(p)).unwrap();
    assert_eq!(forward(&mut r, CLIENT, 20000 + kept, SYN).0, before[usize::from(kept)]);
    assert_gauges_add_up(&r);
}

#[test]
fn a_syn_on_a_drained_backends_flow_gets_a_fresh_choice_and_established_flows_stay() {
    let mut r = Rig::resolved();
    let before: Vec<u32> = (0..300u16).map(|p| connect(&mut r, 20000 + p).0).collect();
    let on_b0: Vec<u16> = (0..300u16).filter(|&p| before[usize::from(p)] == BACKENDS[0]).collect();
    assert!(on_b0.len() > 50);
    // Drained (or down, or disabled: all compile to weight 0).
    r.snap = Snapshot::build(&spec_with(&[(BACKENDS[0], 0), (BACKENDS[1], 1), (BACKENDS[2], 1)])).unwrap();
    let (reused, going_on) = on_b0.split_at(on_b0.len() / 2);
    // Established flows on the drained backend keep it for their data.
    for &p in going_on {
        assert_eq!(forward(&mut r, CLIENT, 20000 + p, ACK).0, BACKENDS[0], "flow {p} left its backend");
    }
    // A SYN reusing such a tuple is a new connection.
    for &p in reused {
        let to = forward(&mut r, CLIENT, 20000 + p, SYN).0;
        assert_ne!(to, BACKENDS[0], "flow {p}: a new connection reached the drained backend");
        assert_eq!(to, maglev_pick(&r.snap, 20000 + p));
        assert_eq!(forward(&mut r, CLIENT, 20000 + p, ACK).0, to, "and its ACK follows");
    }
    for &p in going_on {
        assert_eq!(forward(&mut r, CLIENT, 20000 + p, ACK).0, BACKENDS[0]);
    }
    let b0 = r.pipe.backend_stats().read(slot_of(BACKENDS[0], 8080));
    assert_eq!(b0.active, going_on.len() as u64, "the drained backend keeps only its going flows");
    assert_eq!(r.pipe.flows().occupied(), 300);
    assert_gauges_add_up(&r);
}

#[test]
fn fullnat_a_replaced_flow_releases_its_pair_and_moves_its_gauge() {
    let ports = (20000, 20199);
    let mut r = rig_in(&fullnat(), [1, 1, 1], ports);
    let before: Vec<(u32, (u32, u16))> = (0..100u16).map(|p| connect(&mut r, 20000 + p)).collect();
    let pairs: std::collections::HashSet<(u32, u16)> = before.iter().map(|b| b.1).collect();
    assert_eq!(pairs.len(), 100, "one pair per flow");
    // Two pool addresses of 200 ports each, all this worker's.
    let free = r.pipe.snat().free_pairs(0);
    assert_eq!(free, 2 * 200 - 100);
    respec(&mut r, &fullnat(), [0, 1, 1], ports);
    let victims: Vec<u16> = (0..100u16).filter(|&p| before[usize::from(p)].0 == BACKENDS[0]).collect();
    assert!(victims.len() > 10);
    let b0_active = r.pipe.backend_stats().read(slot_of(BACKENDS[0], 8080)).active;
    for (n, &p) in victims.iter().enumerate() {
        let (old_backend, old_pair) = before[usize::from(p)];
        let (to, pair) = forward(&mut r, CLIENT, 20000 + p, SYN);
        assert_ne!(to, old_backend);
        assert_ne!(pair, old_pair, "a new pair (the old one waits at the back of the queue)");
        assert_eq!(r.pipe.snat().free_pairs(0), free, "one pair released, one taken");
        let b0 = r.pipe.backend_stats().read(slot_of(BACKENDS[0], 8080));
        assert_eq!(b0.active, b0_active - n as u64 - 1, "the old flow left its backend's gauge");
        // The old pair is free: the old backend's late reply has no flow.
        assert_eq!(reply(&mut r, old_backend, old_pair, ACK), Verdict::Drop(DropReason::NoFlow));
        assert_eq!(forward(&mut r, CLIENT, 20000 + p, ACK), (to, pair));
        assert_gauges_add_up(&r);
    }
    assert_eq!(r.pipe.flows().occupied(), 100);
}

// ---- Impossible TCP flags ---------------------------------------------

const BAD_FLAGS: [(u8, &str); 8] = [
    (0x03, "SYN+FIN"),
    (0x06, "SYN+RST"),
    (0x13, "SYN+FIN+ACK"),
    (0x00, "no flags"),
    (0xc0, "ECE+CWR only"),
    (0x01, "FIN without ACK"),
    (0x09, "FIN+PSH without ACK"),
    (0x07, "SYN+FIN+RST"),
];

const GOOD_FLAGS: [(u8, &str); 11] = [
    (0x04, "RST"),
    (0x14, "RST+ACK"),
    (0x02, "SYN"),
    (0x12, "SYN+ACK"),
    (0x11, "FIN+ACK"),
    (0x10, "ACK"),
    (0x18, "PSH+ACK"),
    (0xc2, "SYN+ECE+CWR"),
    (0x52, "SYN+ACK+ECE"),
    (0x30, "URG+ACK"),
    (0x98, "CWR+PSH+ACK"),
];

#[test]
fn impossible_flag_combinations_are_dropped_both_ways_before_any_state_changes() {
    let mut r = Rig::resolved();
    for (i, (flags, what)) in BAD_FLAGS.iter().enumerate() {
        let (v, _) = client(&mut r, CLIENT, 30000 + i as u16, *flags);
        assert_eq!(v, Verdict::Drop(DropReason::BadTcpFlags), "client {what}");
    }
    assert_eq!(r.pipe.flows().occupied(), 0, "no flow created");
    assert_eq!(r.pipe.counters().flows_created.get(), 0);
    // On an established flow, neither the client's nor the backend's
    // impossible segment changes its state.
    let (backend, _) = connect(&mut r, 31000);
    for (flags, what) in BAD_FLAGS {
        assert_eq!(client(&mut r, CLIENT, 31000, flags).0, Verdict::Drop(DropReason::BadTcpFlags), "client {what}");
        assert_eq!(
            reply(&mut r, backend, (CLIENT, 31000), flags),
            Verdict::Drop(DropReason::BadTcpFlags),
            "backend {what}"
        );
        assert_eq!(state(&r, CLIENT, 31000), Some(FlowState::TcpEstablished), "after {what}");
    }
    assert_eq!(r.pipe.counters().drops(DropReason::BadTcpFlags), 3 * BAD_FLAGS.len() as u64);
}

#[test]
fn legal_flag_combinations_pass_both_ways() {
    let mut r = Rig::resolved();
    for (i, (flags, what)) in GOOD_FLAGS.iter().enumerate() {
        let (backend, _) = forward(&mut r, CLIENT, 32000 + i as u16, *flags);
        assert_eq!(reply(&mut r, backend, (CLIENT, 32000 + i as u16), *flags), Verdict::Transmit(0), "backend {what}");
    }
    assert_eq!(r.pipe.counters().drops(DropReason::BadTcpFlags), 0);
}

// ---- Half-open connections --------------------------------------------

/// A spoofed client address off-link (through the router), one per `i`.
fn spoofed(i: u32) -> (u32, u16) {
    (ip(198, 19, 0, 0) | (i >> 4 & 0xffff), 1024 + (i & 0xf) as u16)
}

/// Establishes `n` flows, floods `syns` spoofed SYNs into a table of
/// `capacity` slots, and checks that every established flow is still there
/// on its backend with its pair.
fn flood(mode: &ForwardingMode, capacity: usize, n: u16, syns: u32) -> Rig {
    let ports = (20000, 20199);
    let mut r = rig_in(mode, [1, 1, 1], ports);
    r.pipe = Pipeline::new(PipelineConfig { flow_capacity: capacity, ..test_config() }, Arc::clone(r.pipe.counters()));
    for (a, m) in [(CLIENT, CLIENT_MAC), (ROUTER, [0x02, 0xee, 0, 0, 0, 1])] {
        r.teach(0, a, m, GW_C_IP);
    }
    for (a, m) in BACKENDS.iter().zip(BACKEND_MACS) {
        r.teach(1, *a, m, GW_B_IP);
    }
    let established: Vec<(u32, (u32, u16))> = (0..n).map(|p| connect(&mut r, 20000 + p)).collect();
    let occupied = r.pipe.flows().occupied();
    assert_eq!(occupied, usize::from(n));
    // Idle connections (keepalives far apart): closer to their expiry than
    // a new half-open flow is to its own.
    r.now += 880 * 1_000_000_000;
    let mut forwarded = 0u32;
    for i in 0..syns {
        let (src, sport) = spoofed(i);
        let (v, _) = client(&mut r, src, sport, SYN);
        forwarded += u32::from(v == Verdict::Transmit(1));
        r.now += 1000;
    }
    for p in 0..n {
        assert_eq!(state(&r, CLIENT, 20000 + p), Some(FlowState::TcpEstablished), "{}: flow {p} lost", mode.name());
        assert_eq!(forward(&mut r, CLIENT, 20000 + p, ACK), established[usize::from(p)], "{}: flow {p}", mode.name());
    }
    if matches!(mode, ForwardingMode::FullNat { .. }) {
        // Half-open flows take free slots and pairs, never an established
        // flow's, and every pair is held by exactly one tracked flow.
        assert!(forwarded > 0);
        assert_eq!(r.pipe.snat().free_pairs(0) + r.pipe.flows().occupied(), 2 * 200, "pairs against flows");
        assert!(r.pipe.flows().occupied() <= capacity);
    } else {
        assert_eq!(forwarded, syns, "{}: every SYN is forwarded", mode.name());
        assert_eq!(r.pipe.flows().occupied(), occupied, "{}: the flood took no slot", mode.name());
        assert_eq!(r.pipe.counters().flows_evicted.get(), 0);
    }
    assert_gauges_add_up(&r);
    r
}

#[test]
fn a_syn_flood_never_evicts_established_flows() {
    for mode in [ForwardingMode::Nat, dsr(), fullnat()] {
        flood(&mode, 64, 40, 5000);
    }
}

#[test]
fn fullnat_half_open_flows_only_ever_evict_each_other() {
    // 40 of 64 slots established: the flood fills the rest, then takes
    // half-open slots from older half-open flows.
    let r = flood(&fullnat(), 64, 40, 5000);
    let c = r.pipe.counters();
    assert!(c.flows_evicted.get() > 0, "half-open flows were evicted by newer ones");
    assert!(c.drops(DropReason::SnatExhausted) + c.flows_evicted.get() > 0);
}

#[test]
fn syn_then_ack_creates_one_flow_on_the_syns_backend() {
    for mode in [ForwardingMode::Nat, dsr()] {
        let mut r = rig_in(&mode, [1, 1, 1], (20000, 20199));
        for p in 0..50u16 {
            let to = forward(&mut r, CLIENT, 20000 + p, SYN);
            // Retransmissions go to the same backend and take nothing.
            assert_eq!(forward(&mut r, CLIENT, 20000 + p, SYN), to);
            assert_eq!(forward(&mut r, CLIENT, 20000 + p, SYN), to);
            assert_eq!(r.pipe.flows().occupied(), usize::from(p), "{}: a SYN took a slot", mode.name());
            assert_eq!(forward(&mut r, CLIENT, 20000 + p, ACK), to);
            assert_eq!(r.pipe.flows().occupied(), usize::from(p) + 1);
            let f = r.pipe.flows().find(&key(CLIENT, 20000 + p), r.now).expect("tracked");
            assert_eq!(r.pipe.flows().get(f).backend_addr, to.0);
        }
        assert_eq!(r.pipe.counters().flows_created.get(), 50, "{}", mode.name());
        assert_gauges_add_up(&r);
    }
}

#[test]
fn backend_answers_to_a_half_open_connection_pass_and_track_nothing() {
    // nat: the SYN-ACK and a RST are translated from configuration.
    let mut r = Rig::resolved();
    let (b, _) = forward(&mut r, CLIENT, 20000, SYN);
    assert_eq!(reply(&mut r, b, (CLIENT, 20000), SYN_ACK), Verdict::Transmit(0));
    assert_eq!(r.pipe.flows().occupied(), 0);
    let (b2, _) = forward(&mut r, CLIENT, 20001, SYN);
    assert_eq!(reply(&mut r, b2, (CLIENT, 20001), RST | ACK), Verdict::Transmit(0));
    assert_eq!(r.pipe.flows().occupied(), 0);
    assert_gauges_add_up(&r);
}

#[test]
fn fullnat_a_half_open_flow_holds_one_pair_through_retransmissions_and_answers() {
    let mut r = rig_in(&fullnat(), [1, 1, 1], (20000, 20199));
    // Two pool addresses of 200 ports each, all this worker's.
    let all = 2 * 200;
    let (b, pair) = forward(&mut r, CLIENT, 20000, SYN);
    assert_eq!(state(&r, CLIENT, 20000), Some(FlowState::TcpSynSent));
    for _ in 0..3 {
        assert_eq!(forward(&mut r, CLIENT, 20000, SYN), (b, pair), "a retransmission keeps its pair");
    }
    assert_eq!(r.pipe.snat().free_pairs(0), all - 1);
    assert_eq!(reply(&mut r, b, pair, SYN_ACK), Verdict::Transmit(0), "the SYN-ACK reaches the client");
    assert_eq!(forward(&mut r, CLIENT, 20000, ACK), (b, pair));
    assert_eq!(state(&r, CLIENT, 20000), Some(FlowState::TcpEstablished));

    // A half-open connection the backend refuses: its RST closes the flow,
    // which expires and frees the pair exactly once.
    let (b2, pair2) = forward(&mut r, CLIENT, 20001, SYN);
    assert_eq!(reply(&mut r, b2, pair2, RST | ACK), Verdict::Transmit(0));
    assert_eq!(state(&r, CLIENT, 20001), Some(FlowState::TcpClosing));
    assert_eq!(r.pipe.snat().free_pairs(0), all - 2);
    r.now += 1000 * 1_000_000_000;
    for _ in 0..SWEEP_PASSES {
        r.pipe.housekeeping(&r.snap, r.now);
    }
    assert_eq!(r.pipe.flows().occupied(), 0);
    assert_eq!(r.pipe.snat().free_pairs(0), all, "both pairs released, once each");
    assert_gauges_add_up(&r);
}
