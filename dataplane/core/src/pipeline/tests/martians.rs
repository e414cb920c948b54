//! Martian sources (RFC 1812 5.3.7): packets from addresses no real host
//! can have are dropped as `martian_source` before anything can forward,
//! answer, track or punt them.

use super::*;
use crate::snapshot::SourcePoolSpec;

const POOL_ADDR: u32 = ip(198, 18, 1, 100);

/// The base spec with a source pool (its address is the gateway's too).
fn spec_with_pool() -> SnapshotSpec {
    let mut s = spec();
    s.source_pools =
        vec![SourcePoolSpec { name: "p".into(), addresses: vec![POOL_ADDR], first_port: 2000, last_port: 2999 }];
    s
}

/// A resolved rig, both ports with a kernel interface, a source pool.
fn rig() -> Rig {
    let mut r = Rig::resolved();
    r.snap = Snapshot::build(&spec_with_pool()).unwrap();
    r.pipe.set_kernel_ports(&[true, true]);
    r
}

/// One address of every martian class, with its name.
const MARTIANS: [(u32, &str); 14] = [
    (ip(0, 0, 0, 0), "0.0.0.0"),
    (ip(0, 1, 2, 3), "0/8"),
    (ip(127, 0, 0, 1), "loopback"),
    (ip(127, 255, 1, 2), "127/8"),
    (ip(224, 0, 0, 5), "multicast (OSPF)"),
    (ip(239, 1, 2, 3), "multicast"),
    (ip(240, 0, 0, 1), "class E"),
    (u32::MAX, "limited broadcast"),
    (ip(198, 18, 0, 255), "client subnet broadcast"),
    (ip(198, 18, 1, 255), "backend subnet broadcast"),
    (GW_C_IP, "client port address"),
    (GW_B_IP, "backend port address"),
    (VIP, "VIP"),
    (POOL_ADDR, "pool address"),
];

fn icmp_echo(src: u32, dst: u32) -> Vec<u8> {
    let req = etherparse::Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 });
    let b = PacketBuilder::ethernet2(CLIENT_MAC, GW_C).ipv4(src.to_be_bytes(), dst.to_be_bytes(), 64).icmpv4(req);
    let mut f = Vec::new();
    b.write(&mut f, b"ping").unwrap();
    f
}

/// What a packet from a real client would get, for each kind of packet
/// the tests send from a martian: (frame builder, what it is, verdict
/// from a real client).
fn probes(src: u32) -> Vec<(Vec<u8>, &'static str, Verdict)> {
    let ack = |f: Vec<u8>| with_flags(f, 0x10);
    vec![
        (tcp_frame((src, 40000), (VIP, 80), 64, b""), "SYN to a service", Verdict::Transmit(1)),
        (ack(tcp_frame((src, 40001), (VIP, 80), 64, b"data")), "ACK to a service", Verdict::Transmit(1)),
        (udp_frame((src, 40002), (VIP, 53), 64, b"q"), "UDP to a service", Verdict::Transmit(1)),
        (
            ack(tcp_frame((src, 40003), (VIP, 81), 64, b"")),
            "ACK to no service (reset or drop)",
            Verdict::Drop(DropReason::NoService),
        ),
        (icmp_echo(src, GW_C_IP), "echo request to the gateway", Verdict::Transmit(0)),
        (icmp_echo(src, VIP), "echo request to a VIP", Verdict::Transmit(0)),
        (tcp_frame((src, 40004), (GW_C_IP, 179), 64, b""), "BGP to the gateway", Verdict::PuntControl(0)),
        (udp_frame((src, 40005), (GW_C_IP, 53), 64, b"q"), "UDP to the gateway", Verdict::Punt(0)),
        (tcp_frame((src, 40006), (REMOTE, 80), 64, b""), "TCP through the gateway", Verdict::Drop(DropReason::NoMatch)),
    ]
}

#[test]
fn the_probes_are_handled_for_a_real_client() {
    // The control: the same probes from a real client do what they say,
    // so the martian test below is not passing for another reason.
    let mut r = rig();
    for (f, what, expected) in probes(CLIENT) {
        let mut f = to_port(0, f);
        assert_eq!(r.run(0, &mut f), expected, "from a client: {what}");
    }
}

#[test]
fn every_martian_class_is_dropped_before_anything_else() {
    let mut r = rig();
    let mut sent = 0;
    for (src, class) in MARTIANS {
        for (f, what, _) in probes(src) {
            let mut f = to_port(0, f);
            let v = r.run(0, &mut f);
            sent += 1;
            assert_eq!(v, Verdict::Drop(DropReason::MartianSource), "{class} ({src:#010x}): {what}");
        }
    }
    assert_eq!(r.pipe.counters().drops(DropReason::MartianSource), sent);
    assert_eq!(r.pipe.flows().occupied(), 0, "no flow was created");
    assert_eq!(r.pipe.counters().flows_created.get(), 0);
}

#[test]
fn an_unconfigured_host_may_still_reach_the_kernel_by_broadcast() {
    // DHCP discovery and IGMP reports come from 0.0.0.0 to a broadcast or
    // multicast address: the kernel takes them on a port that has one.
    let mut r = rig();
    for dst in [u32::MAX, ip(198, 18, 0, 255), ip(224, 0, 0, 22)] {
        let mut f = to_port(0, udp_frame((0, 68), (dst, 67), 64, b"discover"));
        assert_eq!(r.run(0, &mut f), Verdict::Punt(0), "0.0.0.0 -> {dst:#010x}");
    }
    // Not without a kernel interface, not from another martian, never to a
    // service or a gateway address.
    let mut f = to_port(0, udp_frame((ip(127, 0, 0, 1), 68), (u32::MAX, 67), 64, b"x"));
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::MartianSource));
    let mut f = to_port(0, udp_frame((0, 68), (GW_C_IP, 67), 64, b"x"));
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::MartianSource));
    r.pipe.set_kernel_ports(&[false, false]);
    let mut f = to_port(0, udp_frame((0, 68), (u32::MAX, 67), 64, b"x"));
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::MartianSource));
}

#[test]
fn neighbours_of_martian_prefixes_are_not_martians() {
    let mut r = rig();
    for src in [ip(1, 0, 0, 1), ip(126, 255, 255, 254), ip(128, 0, 0, 1), ip(223, 255, 255, 254), ip(198, 18, 0, 254)] {
        let mut f = to_port(0, with_flags(tcp_frame((src, 40000), (VIP, 80), 64, b""), 0x10));
        let v = r.run(0, &mut f);
        // Off-link clients need the router, on-link ones are resolved.
        assert_ne!(v, Verdict::Drop(DropReason::MartianSource), "{src:#010x}");
    }
    // A snapshot with a /31 port subnet has no broadcast address to refuse.
    let mut s = spec_with_pool();
    s.ports[0].addresses = vec![Ipv4Cidr { addr: ip(198, 18, 0, 1), len: 31 }];
    s.routes.clear();
    let snap = Snapshot::build(&s).unwrap();
    assert!(snap.is_martian_source(ip(198, 18, 0, 1)));
    assert!(!snap.is_martian_source(ip(198, 18, 0, 0)), "the other end of a /31");
}

/// A martian source from any class (or its neighbourhood in the prefixes).
fn martian() -> impl Strategy<Value = u32> {
    prop_oneof![
        (0u32..1 << 24).prop_map(|x| x),
        (0u32..1 << 24).prop_map(|x| (127 << 24) | x),
        (0u32..1 << 28).prop_map(|x| (0xe << 28) | x),
        (0u32..1 << 28).prop_map(|x| (0xf << 28) | x),
        proptest::sample::select(MARTIANS.iter().map(|m| m.0).collect::<Vec<_>>()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever a frame with a martian source carries (TCP with any flags,
    /// UDP, ICMP; to a service, the gateway, a pool address, anywhere), on
    /// whichever port, nothing is ever transmitted for it and no flow is
    /// created; only 0.0.0.0 to a group address may reach the kernel.
    #[test]
    fn no_frame_from_a_martian_is_ever_transmitted(
        src in martian(),
        dst in proptest::sample::select(vec![VIP, GW_C_IP, GW_B_IP, POOL_ADDR, REMOTE, CLIENT, BACKENDS[0], u32::MAX, ip(198, 18, 0, 255), ip(224, 0, 0, 5)]),
        kind in 0u8..3,
        flags in any::<u8>(),
        sport in any::<u16>(),
        dport in proptest::sample::select(vec![80u16, 53, 179, 2000, 8080, 3784]),
        port in 0u16..2,
    ) {
        let mut r = rig();
        let f = match kind {
            0 => with_flags(tcp_frame((src, sport), (dst, dport), 64, b"x"), flags),
            1 => udp_frame((src, sport), (dst, dport), 64, b"x"),
            _ => icmp_echo(src, dst),
        };
        let mut f = to_port(port, f);
        let v = r.run(port, &mut f);
        prop_assert!(!matches!(v, Verdict::Transmit(_) | Verdict::Handoff(_)), "{v:?}");
        if matches!(v, Verdict::Punt(_) | Verdict::PuntControl(_)) {
            prop_assert!(src == 0 && (dst == u32::MAX || dst >> 28 == 0xe || dst == ip(198, 18, 0, 255) || dst == ip(198, 18, 1, 255)), "punted {v:?}");
        } else {
            prop_assert_eq!(v, Verdict::Drop(DropReason::MartianSource));
        }
        prop_assert_eq!(r.pipe.flows().occupied(), 0);
    }
}
