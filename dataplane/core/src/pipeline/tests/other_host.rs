//! The destination MAC filter: a port takes frames addressed to its own MAC
//! or to a group address; unicast frames for any other MAC (flooded by a
//! bridge that forgot where that MAC is) are dropped as `other_host` before
//! anything else happens to them.

use super::*;

/// A unicast MAC that is none of the gateway's.
const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The IPv4 multicast MAC of 224.0.0.18 (VRRP).
const VRRP_GROUP: [u8; 6] = [0x01, 0x00, 0x5e, 0, 0, 0x12];

fn echo_request(dst_mac: [u8; 6], dst: u32) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, dst_mac)
        .ipv4(CLIENT.to_be_bytes(), dst.to_be_bytes(), 64)
        .icmpv4_echo_request(7, 9);
    let mut f = Vec::new();
    b.write(&mut f, b"ping").unwrap();
    f
}

fn ipv6_udp(dst_mac: [u8; 6]) -> Vec<u8> {
    let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let dst = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let b = PacketBuilder::ethernet2(CLIENT_MAC, dst_mac).ipv6(src, dst, 64).udp(40000, 5000);
    let mut f = Vec::new();
    b.write(&mut f, b"x").unwrap();
    f
}

#[test]
fn frames_for_another_host_are_dropped_and_counted_before_anything_else() {
    let mut r = Rig::resolved();
    r.pipe.set_kernel_ports(&[true, true]);
    let consumed_before = r.pipe.counters().consumed.get();
    let stranger = ip(198, 18, 0, 77);
    let moved = [0x02, 0x66, 0, 0, 0, 1];
    // Each would be forwarded, answered, learned from or punted if it were
    // addressed to the port.
    let cases: Vec<(u16, Vec<u8>, &str)> = vec![
        (0, to_mac(OTHER, tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"")), "a client's SYN to the VIP"),
        (0, to_mac(OTHER, udp_frame((CLIENT, 5000), (VIP, 53), 64, b"q")), "a client's UDP to the VIP"),
        (1, to_mac(OTHER, tcp_frame((BACKENDS[0], 8080), (CLIENT, 40000), 64, b"")), "a backend's reply"),
        // The other port's MAC is, on this port's segment, another host's.
        (0, to_mac(GW_B, tcp_frame((CLIENT, 40001), (VIP, 80), 64, b"")), "the other port's MAC"),
        (0, to_mac(OTHER, arp_frame(1, CLIENT_MAC, stranger, [0; 6], GW_C_IP)), "a unicast ARP request"),
        (1, to_mac(OTHER, arp_frame(2, moved, BACKENDS[0], GW_B, GW_B_IP)), "an ARP reply"),
        (0, echo_request(OTHER, GW_C_IP), "a ping to the port address"),
        (0, echo_request(OTHER, VIP), "a ping to the VIP"),
        (0, to_mac(OTHER, tcp_frame((CLIENT, 40000), (GW_C_IP, 22), 64, b"")), "ssh to the gateway"),
        (0, to_mac(OTHER, tcp_frame((CLIENT, 40000), (GW_C_IP, 179), 64, b"")), "bgp to the gateway"),
        (0, ipv6_udp(OTHER), "ipv6"),
    ];
    for (port, frame, what) in &cases {
        let mut f = frame.clone();
        assert_eq!(r.run(*port, &mut f), Verdict::Drop(DropReason::OtherHost), "{what}");
        assert_eq!(&f, frame, "{what}: a dropped frame is not modified");
    }
    let n = cases.len() as u64;
    let c = r.pipe.counters();
    assert_eq!(c.drops(DropReason::OtherHost), n);
    assert_eq!(c.total_drops(), n, "counted under other_host only");
    let untouched = [
        c.nat_forward.get(),
        c.nat_reverse.get(),
        c.arp_replies.get(),
        c.icmp_echo_replies.get(),
        c.flows_created.get(),
        c.consumed.get() - consumed_before,
    ];
    assert_eq!(untouched, [0; 6], "nat_forward, nat_reverse, arp_replies, icmp_echo_replies, flows_created, consumed");
    assert_eq!(r.pipe.take_solicitations().count(), 0);
    assert_eq!(r.pipe.neighbours().get(stranger), None, "nothing learned from another host's ARP request");
    assert_eq!(r.pipe.neighbours().get(BACKENDS[0]), Some(BACKEND_MACS[0]), "nor from its ARP reply");

    // The same SYN to the port's own MAC is forwarded as before.
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(&f[..6], &GW_C);
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    assert!(BACKENDS.contains(&inspect(&f).3));
    assert_eq!(r.pipe.counters().nat_forward.get(), 1);
    assert_eq!(r.pipe.counters().drops(DropReason::OtherHost), n);
}

#[test]
fn group_addresses_are_processed_as_before() {
    let mut r = Rig::resolved();
    r.pipe.set_kernel_ports(&[true, false]);
    // A broadcast ARP request for the port address is answered.
    let mut f = arp_frame(1, CLIENT_MAC, ip(198, 18, 0, 77), [0; 6], GW_C_IP);
    assert_eq!(&f[..6], &[0xff; 6]);
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(0));
    assert_eq!(r.pipe.counters().arp_replies.get(), 1);
    // VRRP to its group, with the group's multicast MAC: punted as before.
    let vrrp = to_mac(VRRP_GROUP, udp_frame((CLIENT, 1), (ip(224, 0, 0, 18), 2), 255, b""));
    let mut vrrp = vrrp;
    vrrp[14 + 9] = 112;
    ipv4::Packet::new_unchecked(&mut vrrp[14..]).fill_checksum();
    assert_eq!(r.run(0, &mut vrrp), Verdict::PuntControl(0));
    // IPv6 to the all-nodes group's MAC: punted.
    let mut f = ipv6_udp([0x33, 0x33, 0, 0, 0, 1]);
    assert_eq!(r.run(0, &mut f), Verdict::Punt(0));
    // RIP to its group on the port without a kernel interface: classified
    // as before (no_match), not other_host.
    let mut f = to_mac([0x01, 0x00, 0x5e, 0, 0, 9], udp_frame((BACKENDS[0], 520), (ip(224, 0, 0, 9), 520), 1, b"rip"));
    assert_eq!(r.run(1, &mut f), Verdict::Drop(DropReason::NoMatch));
    // The filter decides only whether a frame is the port's business: a
    // packet to the VIP in a frame to a group address goes on as any other.
    for group in [VRRP_GROUP, [0xff; 6]] {
        let mut f = to_mac(group, tcp_frame((CLIENT, 40000), (VIP, 80), 64, b""));
        assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    }
    assert_eq!(r.pipe.counters().drops(DropReason::OtherHost), 0);
    assert_eq!(r.pipe.counters().total_drops(), 1, "the RIP packet only");
}

#[test]
fn the_receiving_worker_checks_and_hands_over_only_what_is_for_the_port() {
    let mut a = Rig::resolved();
    let mut b = Rig::resolved();
    a.pipe.set_worker(0, 2);
    b.pipe.set_worker(1, 2);
    let sport = (40000u16..).find(|&p| client_owner(CLIENT, p, 6, 2) == 1).unwrap();
    // For another host: dropped where it arrived, never handed over.
    let mut f = to_mac(OTHER, tcp_frame((CLIENT, sport), (VIP, 80), 64, b""));
    assert_eq!(a.run(0, &mut f), Verdict::Drop(DropReason::OtherHost));
    // For the port: handed to the owner, which forwards it.
    let frame = tcp_frame((CLIENT, sport), (VIP, 80), 64, b"");
    let mut f = frame.clone();
    assert_eq!(a.run(0, &mut f), Verdict::Handoff(1));
    assert_eq!(f, frame);
    let mut pkts = [RxPacket::new(0, &mut f)];
    let mut v = [Verdict::Consumed];
    b.pipe.process_handed_over(&b.snap, b.now, &mut pkts, &mut v, &NoPrefetch);
    assert_eq!(v[0], Verdict::Transmit(1));
    // The owner does not check again: whatever is handed over passed the
    // filter on the worker that received it (here a frame that could not
    // have, to show that the check is not repeated).
    let mut f = to_mac(OTHER, tcp_frame((CLIENT, sport + 1), (VIP, 80), 64, b""));
    let mut pkts = [RxPacket::new(0, &mut f)];
    b.pipe.process_handed_over(&b.snap, b.now, &mut pkts, &mut v, &NoPrefetch);
    assert_eq!(v[0], Verdict::Transmit(1));
    assert_eq!(a.pipe.counters().drops(DropReason::OtherHost), 1);
    assert_eq!(b.pipe.counters().total_drops(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Whatever the frame and the port, it is dropped as other_host exactly
    /// when its destination is unicast and not the port's MAC (a port the
    /// snapshot does not know has none), and such a frame leaves unchanged
    /// with that one drop counted.
    #[test]
    fn a_frame_is_other_hosts_iff_its_destination_is_unicast_and_not_the_ports(
        dst in prop_oneof![
            any::<[u8; 6]>(),
            any::<[u8; 6]>().prop_map(|mut m| { m[0] &= 0xfe; m }),
            Just(GW_C),
            Just(GW_B),
            Just([0xff; 6]),
        ],
        kind in 0u8..5, port in 0u16..3, kernel in any::<bool>(),
    ) {
        let mut r = Rig::resolved();
        r.pipe.set_kernel_ports(&[kernel, kernel]);
        let frame = to_mac(dst, match kind {
            0 => tcp_frame((CLIENT, 40000), (VIP, 80), 64, b""),
            1 => udp_frame((CLIENT, 5000), (VIP, 53), 64, b"q"),
            2 => tcp_frame((BACKENDS[0], 8080), (CLIENT, 40000), 64, b""),
            3 => arp_frame(1, CLIENT_MAC, ip(198, 18, 0, 77), [0; 6], GW_C_IP),
            _ => echo_request(dst, GW_C_IP),
        });
        let mut f = frame.clone();
        let v = r.run(port, &mut f);
        let own = r.snap.ports().get(usize::from(port)).map(|p| p.mac.0);
        let other = dst[0] & 1 == 0 && own != Some(dst);
        prop_assert_eq!(v == Verdict::Drop(DropReason::OtherHost), other, "{:?} on port {}: {:?}", dst, port, v);
        let c = r.pipe.counters();
        prop_assert_eq!(c.drops(DropReason::OtherHost), u64::from(other));
        if other {
            prop_assert_eq!(f, frame);
            prop_assert_eq!(c.total_drops(), 1);
        }
    }
}
