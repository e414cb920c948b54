//! Per-backend statistics: traffic counters and the active/inactive flow
//! gauges, which must always add up to the flows the table holds.

use super::*;
use crate::snapshot::{ForwardingMode, SourcePoolSpec};
use crate::stats::SlotTotals;
use crate::wire::tcp::flags::{ACK, FIN, RST, SYN};

/// A TCP segment with exactly `flags`.
fn segment(src: (u32, u16), dst: (u32, u16), flags: u16, payload: &[u8]) -> Vec<u8> {
    let (smac, dmac) = macs_from(src.0);
    let mut b = PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src.0.to_be_bytes(), dst.0.to_be_bytes(), 64)
        .tcp(src.1, dst.1, 1000, 64240);
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & ACK != 0 {
        b = b.ack(1);
    }
    if flags & FIN != 0 {
        b = b.fin();
    }
    if flags & RST != 0 {
        b = b.rst();
    }
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

/// IPv4 bytes of a frame (what the stats count).
fn ip_len(frame: &[u8]) -> u64 {
    (frame.len() - ethernet::HEADER_LEN) as u64
}

fn slot(r: &Rig, addr: u32, port: u16) -> SlotTotals {
    r.pipe.backend_stats().read(slot_of(addr, port))
}

/// The gauges summed over every slot.
fn gauges(r: &Rig) -> (u64, u64) {
    let stats = r.pipe.backend_stats();
    (0..stats.capacity() as u32).map(|s| stats.read(s)).fold((0, 0), |(a, i), t| (a + t.active, i + t.inactive))
}

/// Runs every housekeeping pass it takes to sweep the whole table.
fn sweep(r: &mut Rig) {
    for _ in 0..SWEEP_PASSES {
        r.pipe.housekeeping(&r.snap, r.now);
    }
}

#[test]
fn traffic_and_flow_states_are_counted_under_the_backend() {
    let mut r = Rig::resolved();
    let mut syn = segment((CLIENT, 40000), (VIP, 80), SYN, b"");
    let syn_len = ip_len(&syn);
    assert_eq!(r.run(0, &mut syn), Verdict::Transmit(1));
    let backend = inspect(&syn).3;
    let t = slot(&r, backend, 8080);
    // A SYN is forwarded, not tracked: the client's ACK starts the flow.
    assert_eq!(t, SlotTotals { in_packets: 1, in_bytes: syn_len, ..SlotTotals::default() }, "after the SYN");

    let mut ack = segment((CLIENT, 40000), (VIP, 80), ACK, b"GET / HTTP/1.0\r\n\r\n");
    let ack_len = ip_len(&ack);
    assert_eq!(r.run(0, &mut ack), Verdict::Transmit(1));
    let mut reply = segment((backend, 8080), (CLIENT, 40000), ACK, b"HTTP/1.0 200 OK\r\n\r\nhello");
    let reply_len = ip_len(&reply);
    assert_eq!(r.run(1, &mut reply), Verdict::Transmit(0));
    let t = slot(&r, backend, 8080);
    assert_eq!(
        t,
        SlotTotals {
            connections: 1,
            in_packets: 2,
            in_bytes: syn_len + ack_len,
            out_packets: 1,
            out_bytes: reply_len,
            active: 1,
            inactive: 0,
        },
        "established"
    );
    // The other backends saw nothing.
    for b in BACKENDS.iter().filter(|&&b| b != backend) {
        assert_eq!(slot(&r, *b, 8080), SlotTotals::default());
    }

    // The backend closes: inactive again; then the flow expires and is swept.
    let mut fin = segment((backend, 8080), (CLIENT, 40000), FIN | ACK, b"");
    assert_eq!(r.run(1, &mut fin), Verdict::Transmit(0));
    assert_eq!((slot(&r, backend, 8080).active, slot(&r, backend, 8080).inactive), (0, 1));
    r.now += 200 * 1_000_000_000;
    sweep(&mut r);
    assert_eq!(r.pipe.flows().occupied(), 0);
    let t = slot(&r, backend, 8080);
    assert_eq!((t.active, t.inactive, t.connections, t.out_packets), (0, 0, 1, 2));
}

#[test]
fn udp_flows_are_inactive_and_counted_both_ways() {
    let mut r = Rig::resolved();
    let mut q = udp_frame((CLIENT, 5000), (VIP, 53), 64, b"query");
    assert_eq!(r.run(0, &mut q), Verdict::Transmit(1));
    let backend = inspect(&q).3;
    let mut a = udp_frame((backend, 5353), (CLIENT, 5000), 64, b"answer!");
    assert_eq!(r.run(1, &mut a), Verdict::Transmit(0));
    let t = slot(&r, backend, 5353);
    assert_eq!((t.connections, t.in_packets, t.out_packets, t.active, t.inactive), (1, 1, 1, 0, 1));
    assert_eq!(t.out_bytes, ip_len(&a));
}

#[test]
fn a_flow_moves_its_count_when_rehashed_or_when_its_backend_changes_slot() {
    let mut r = Rig::resolved();
    let before: Vec<u32> = (0..300u16)
        .map(|p| {
            let b = send(&mut r, 20000 + p, true);
            send(&mut r, 20000 + p, false);
            b
        })
        .collect();
    let on = |b: u32| before.iter().filter(|&&x| x == b).count() as u64;
    for b in BACKENDS {
        assert_eq!(slot(&r, b, 8080).active, on(b), "{b:#x}");
    }
    assert_eq!(gauges(&r), (300, 0));

    // Backend 0 leaves: each of its flows moves with its next packet.
    r.snap = Snapshot::build(&spec_with(&[(BACKENDS[1], 1), (BACKENDS[2], 1)])).unwrap();
    for p in 0..300u16 {
        send(&mut r, 20000 + p, false);
    }
    assert_eq!(slot(&r, BACKENDS[0], 8080).active, 0);
    assert_eq!(slot(&r, BACKENDS[1], 8080).active + slot(&r, BACKENDS[2], 8080).active, 300);
    assert_eq!(
        slot(&r, BACKENDS[1], 8080).connections + slot(&r, BACKENDS[2], 8080).connections,
        300 - on(BACKENDS[0])
    );

    // Backend 1 gets another slot (it was removed and added back, say).
    let mut s = spec_with(&[(BACKENDS[1], 1), (BACKENDS[2], 1)]);
    Arc::make_mut(&mut s.services[0]).backends[0].stats_slot = 9999;
    r.snap = Snapshot::build(&s).unwrap();
    let on_b1 = slot(&r, BACKENDS[1], 8080).active;
    for p in 0..300u16 {
        send(&mut r, 20000 + p, false);
    }
    assert_eq!(slot(&r, BACKENDS[1], 8080).active, 0);
    assert_eq!(r.pipe.backend_stats().read(9999).active, on_b1);
    assert_eq!(gauges(&r), (300, 0));
}

#[test]
fn a_reset_flow_leaves_its_gauge() {
    let mut r = Rig::resolved();
    let mut s = spec();
    Arc::make_mut(&mut s.services[0]).on_backend_removal = crate::snapshot::OnBackendRemoval::Reset;
    r.snap = Snapshot::build(&s).unwrap();
    let before: Vec<u32> = (0..100u16).map(|p| connect(&mut r, 20000 + p)).collect();
    let gone = before.iter().filter(|&&b| b == BACKENDS[0]).count() as u64;
    Arc::make_mut(&mut s.services[0]).backends.remove(0);
    r.snap = Snapshot::build(&s).unwrap();
    for p in 0..100u16 {
        let mut f = segment((CLIENT, 20000 + p), (VIP, 80), ACK, b"");
        r.run(0, &mut f);
    }
    assert_eq!(slot(&r, BACKENDS[0], 8080).inactive + slot(&r, BACKENDS[0], 8080).active, 0);
    assert_eq!(r.pipe.counters().flows_reset.get(), gone);
    assert_eq!(gauges(&r).0 + gauges(&r).1, r.pipe.flows().occupied() as u64);
}

/// What the property test does next.
#[derive(Clone, Debug)]
enum Op {
    /// A client segment of flow `i` with `flags`.
    Client(u16, u16),
    /// A reply of flow `i` from whatever backend it was sent to, with flags.
    Reply(u16, u16),
    /// A UDP datagram of flow `i`.
    Udp(u16),
    /// A new snapshot: backend `0..3` removed (3: none), the slots of the
    /// others shifted by `shift`, the web service in FullNAT if `fullnat`.
    Reconfigure(u8, u32, bool),
    /// Time passes by `s` seconds, then a housekeeping pass or a full sweep.
    Wait(u32, bool),
}

fn op() -> impl Strategy<Value = Op> {
    let flags = prop_oneof![Just(SYN), Just(ACK), Just(FIN | ACK), Just(RST), Just(SYN | ACK)];
    prop_oneof![
        6 => (0u16..48, flags.clone()).prop_map(|(i, f)| Op::Client(i, f)),
        3 => (0u16..48, flags).prop_map(|(i, f)| Op::Reply(i, f)),
        2 => (0u16..48).prop_map(Op::Udp),
        1 => (0u8..4, 0u32..3, any::<bool>()).prop_map(|(g, s, f)| Op::Reconfigure(g, s, f)),
        1 => (0u32..400, any::<bool>()).prop_map(|(s, f)| Op::Wait(s, f)),
    ]
}

fn reconfigured(gone: u8, shift: u32, fullnat: bool) -> SnapshotSpec {
    let mut s = spec();
    s.source_pools = vec![SourcePoolSpec {
        name: "p".into(),
        addresses: vec![ip(198, 18, 1, 100)],
        first_port: 2000,
        last_port: 2063,
    }];
    // Small slots (the test's table has 32): 8 per shift, 4 per service.
    for (si, svc) in s.services.iter_mut().enumerate() {
        let svc = Arc::make_mut(svc);
        for (bi, b) in svc.backends.iter_mut().enumerate() {
            b.stats_slot = shift * 8 + si as u32 * 4 + bi as u32;
        }
        if usize::from(gone) < svc.backends.len() {
            svc.backends.remove(usize::from(gone));
        }
    }
    if fullnat {
        Arc::make_mut(&mut s.services[0]).mode = ForwardingMode::FullNat { pool: "p".into() };
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    /// Whatever happens (handshakes, closes, resets, replies, backends
    /// removed, slots changed, mode changes, expiry, eviction from a small
    /// table), the gauges over all slots add up to the flows the table holds,
    /// and none ever goes below zero.
    #[test]
    fn gauges_always_add_up_to_the_tracked_flows(ops in proptest::collection::vec(op(), 1..120)) {
        let mut r = Rig::resolved();
        r.pipe = Pipeline::new(
            PipelineConfig { flow_capacity: 32, backend_slots: 32, ..test_config() },
            Arc::clone(r.pipe.counters()),
        );
        r.snap = Snapshot::build(&reconfigured(3, 0, false)).unwrap();
        for (a, m) in [(CLIENT, CLIENT_MAC), (ROUTER, [0x02, 0xee, 0, 0, 0, 1])] {
            r.teach(0, a, m, GW_C_IP);
        }
        for (a, m) in BACKENDS.iter().zip(BACKEND_MACS) {
            r.teach(1, *a, m, GW_B_IP);
        }
        let mut sent_to: std::collections::HashMap<u16, (u32, u16, u16)> = Default::default();
        for op in ops {
            match op {
                Op::Client(i, flags) => {
                    let mut f = segment((CLIENT, 30000 + i), (VIP, 80), flags, b"x");
                    if r.run(0, &mut f) == Verdict::Transmit(1) {
                        let (_, _, src, dst, _, sport, dport) = inspect(&f);
                        sent_to.insert(i, (dst, dport, if src == CLIENT { 30000 + i } else { sport }));
                        let _ = src;
                    }
                }
                Op::Reply(i, flags) => {
                    if let Some(&(b, bport, cport)) = sent_to.get(&i) {
                        let dst = if cport == 30000 + i { CLIENT } else { ip(198, 18, 1, 100) };
                        let mut f = segment((b, bport), (dst, cport), flags, b"y");
                        r.run(1, &mut f);
                    }
                }
                Op::Udp(i) => {
                    let mut f = udp_frame((CLIENT, 30000 + i), (VIP, 53), 64, b"q");
                    r.run(0, &mut f);
                }
                Op::Reconfigure(gone, shift, fullnat) => {
                    r.snap = Snapshot::build(&reconfigured(gone, shift, fullnat)).unwrap();
                }
                Op::Wait(s, full) => {
                    r.now += u64::from(s) * 1_000_000_000;
                    if full { sweep(&mut r) } else { r.pipe.housekeeping(&r.snap, r.now) }
                }
            }
            let (active, inactive) = gauges(&r);
            prop_assert!(active < 1 << 32 && inactive < 1 << 32, "a gauge went below zero: {active} {inactive}");
            prop_assert_eq!(active + inactive, r.pipe.flows().occupied() as u64);
        }
    }
}
