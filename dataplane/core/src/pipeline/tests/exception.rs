//! The exception path: which packets the pipeline punts to a port's kernel
//! interface, which it keeps on the fast path, and what happens on ports
//! without a kernel interface.

use super::*;

/// A resolved rig whose ports both have a kernel interface.
fn punting() -> Rig {
    let mut r = Rig::resolved();
    r.pipe.set_kernel_ports(&[true, true]);
    r
}

fn icmp_frame(src: u32, dst: u32, icmp_type: etherparse::Icmpv4Type) -> Vec<u8> {
    let (smac, dmac) = macs_from(src);
    let b = PacketBuilder::ethernet2(smac, dmac).ipv4(src.to_be_bytes(), dst.to_be_bytes(), 64).icmpv4(icmp_type);
    let mut f = Vec::new();
    b.write(&mut f, b"payload").unwrap();
    f
}

fn ipv6_frame() -> Vec<u8> {
    let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let dst = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let b = PacketBuilder::ethernet2(CLIENT_MAC, GW_C).ipv6(src, dst, 64).udp(40000, 179);
    let mut f = Vec::new();
    b.write(&mut f, b"open").unwrap();
    f
}

fn with_protocol(mut f: Vec<u8>, protocol: u8) -> Vec<u8> {
    f[14 + 9] = protocol;
    ipv4::Packet::new_unchecked(&mut f[14..]).fill_checksum();
    f
}

/// Runs a frame and checks that it was punted (as a control protocol or
/// not, as `control` says) and left byte for byte unchanged.
fn punted_as(r: &mut Rig, port: u16, frame: Vec<u8>, control: bool, what: &str) {
    let mut f = frame.clone();
    let want = if control { Verdict::PuntControl(port) } else { Verdict::Punt(port) };
    assert_eq!(r.run(port, &mut f), want, "{what}");
    assert_eq!(f, frame, "{what}: a punted frame goes to the kernel unchanged");
}

fn run_punted(r: &mut Rig, port: u16, frame: Vec<u8>, what: &str) {
    punted_as(r, port, frame, false, what);
}

fn run_punted_control(r: &mut Rig, port: u16, frame: Vec<u8>, what: &str) {
    punted_as(r, port, frame, true, what);
}

#[test]
fn punts_traffic_for_the_gateway_that_the_fast_path_does_not_handle() {
    let mut r = punting();
    let drops_before = r.pipe.counters().total_drops();
    // SSH-like TCP and BFD-like UDP to each port's address.
    run_punted(&mut r, 0, tcp_frame((CLIENT, 40000), (GW_C_IP, 2222), 64, b""), "tcp to the client port address");
    run_punted_control(&mut r, 1, udp_frame((BACKENDS[0], 49152), (GW_B_IP, 3784), 255, b"bfd"), "bfd");
    run_punted(&mut r, 1, udp_frame((BACKENDS[0], 49152), (GW_B_IP, 161), 64, b"snmp"), "udp to the backend port");
    // A backend's answer to the kernel's own connection (a health probe) is
    // not a reply to translate back to the VIP.
    run_punted(&mut r, 1, tcp_frame((BACKENDS[0], 8080), (GW_B_IP, 41000), 64, b"HTTP/1.1 200"), "probe reply");
    run_punted(&mut r, 1, udp_frame((BACKENDS[1], 5353), (GW_B_IP, 41000), 64, b"x"), "udp probe reply");
    // TTL 1 is the kernel's business, not a forwarding error.
    run_punted_control(&mut r, 0, tcp_frame((CLIENT, 40000), (GW_C_IP, 179), 1, b""), "bgp with ttl 1");
    run_punted(&mut r, 0, tcp_frame((CLIENT, 40000), (GW_C_IP, 2222), 1, b""), "ttl 1 to the gateway");
    // An address of the other port, arriving here: the ingress port's kernel
    // interface takes it (Linux owns all its addresses on every interface).
    run_punted(&mut r, 0, tcp_frame((CLIENT, 40000), (GW_B_IP, 22), 64, b""), "the other port's address");
    // ICMP other than echo requests: the kernel's own pings' replies, errors.
    let reply = etherparse::Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id: 1, seq: 2 });
    run_punted(&mut r, 0, icmp_frame(CLIENT, GW_C_IP, reply), "echo reply");
    let unreachable = etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port);
    run_punted(&mut r, 0, icmp_frame(CLIENT, GW_C_IP, unreachable), "port unreachable");
    // Other IP protocols (OSPF, GRE) to the gateway.
    run_punted_control(&mut r, 0, with_protocol(tcp_frame((CLIENT, 1), (GW_C_IP, 2), 64, b""), 89), "ospf");
    run_punted(&mut r, 1, to_port(1, with_protocol(tcp_frame((CLIENT, 1), (GW_B_IP, 2), 64, b""), 47)), "gre");
    // Fragments of the kernel's own traffic: it reassembles them.
    let mut frag = tcp_frame((CLIENT, 40000), (GW_C_IP, 2222), 64, b"0123456789");
    frag[14 + 6] |= 0x20;
    ipv4::Packet::new_unchecked(&mut frag[14..]).fill_checksum();
    run_punted(&mut r, 0, frag, "a fragment to the gateway");
    // Multicast, limited and subnet broadcast.
    run_punted(&mut r, 0, udp_frame((CLIENT, 520), (ip(224, 0, 0, 9), 520), 1, b"rip"), "multicast");
    run_punted(&mut r, 0, udp_frame((CLIENT, 68), (u32::MAX, 67), 64, b"dhcp"), "limited broadcast");
    run_punted(&mut r, 0, udp_frame((CLIENT, 9), (ip(198, 18, 0, 255), 9), 64, b"x"), "subnet broadcast");
    // Every IPv6 frame: there is no IPv6 fast path.
    run_punted(&mut r, 0, ipv6_frame(), "ipv6");
    // Punts are not drops.
    assert_eq!(r.pipe.counters().total_drops(), drops_before);
}

#[test]
fn arp_replies_for_the_gateway_are_learned_and_punted_requests_are_answered() {
    let mut r = punting();
    let neighbour = ip(198, 18, 0, 77);
    let mac = [0x02, 0x77, 0, 0, 0, 1];
    // A reply to the kernel's own request: the fast path learns it, and the
    // kernel gets it too.
    let frame = arp_frame(2, mac, neighbour, GW_C, GW_C_IP);
    run_punted_control(&mut r, 0, frame, "arp reply for the port address");
    assert_eq!(r.pipe.neighbours().get(neighbour), Some(mac));
    // A reply for a VIP is the fast path's alone (the kernel does not own
    // VIPs): consumed.
    let mut f = arp_frame(2, mac, neighbour, GW_C, VIP);
    assert_eq!(r.run(0, &mut f), Verdict::Consumed);
    // A request for a port address is answered by the fast path, not
    // punted: the kernel would answer the same thing a second time.
    let mut f = arp_frame(1, mac, neighbour, [0; 6], GW_C_IP);
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(0));
    // Not ours stays not ours.
    let mut f = arp_frame(2, mac, neighbour, GW_C, ip(198, 18, 0, 99));
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::ArpNotOurs));
}

#[test]
fn service_traffic_and_pings_stay_on_the_fast_path() {
    let mut r = punting();
    // A client to the VIP, and the backend's reply to the client.
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    let (_, _, _, backend, _, _, _) = inspect(&f);
    let mut reply = tcp_frame((backend, 8080), (CLIENT, 40000), 64, b"ok");
    assert_eq!(r.run(1, &mut reply), Verdict::Transmit(0));
    // Echo requests to the gateway are answered in place.
    let req = etherparse::Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 2 });
    let mut f = icmp_frame(CLIENT, GW_C_IP, req.clone());
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(0));
    // A VIP port no service listens on, a stranger: dropped, never punted.
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 81), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::NoService));
    let mut f = tcp_frame((CLIENT, 40000), (REMOTE, 22), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::NoMatch));
    let mut f = icmp_frame(CLIENT, REMOTE, req);
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::NoMatch));
    // Other ICMP to a VIP is not the kernel's either.
    let reply = etherparse::Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id: 1, seq: 2 });
    let mut f = icmp_frame(CLIENT, VIP, reply);
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::Unsupported));
}

#[test]
fn without_a_kernel_interface_gateway_traffic_is_dropped_as_before() {
    // Only the client port has one.
    let mut r = Rig::resolved();
    r.pipe.set_kernel_ports(&[true, false]);
    let mut f = tcp_frame((BACKENDS[0], 40000), (GW_B_IP, 22), 64, b"");
    assert_eq!(r.run(1, &mut f), Verdict::Drop(DropReason::Local));
    // A backend's packet to the gateway's address is not translated either.
    let mut f = tcp_frame((BACKENDS[0], 8080), (GW_B_IP, 41000), 64, b"");
    assert_eq!(r.run(1, &mut f), Verdict::Drop(DropReason::Local));
    let reply = etherparse::Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id: 1, seq: 2 });
    let mut f = icmp_frame(BACKENDS[0], GW_B_IP, reply);
    assert_eq!(r.run(1, &mut f), Verdict::Drop(DropReason::Local));
    let mut f = to_port(1, ipv6_frame());
    assert_eq!(r.run(1, &mut f), Verdict::Drop(DropReason::Unsupported));
    let mut f = udp_frame((BACKENDS[0], 520), (ip(224, 0, 0, 9), 520), 1, b"rip");
    assert_eq!(r.run(1, &mut f), Verdict::Drop(DropReason::NoMatch));
    let mut f = arp_frame(2, [0x02, 0x77, 0, 0, 0, 1], ip(198, 18, 1, 77), GW_B, GW_B_IP);
    assert_eq!(r.run(1, &mut f), Verdict::Consumed);
    // The same packets on the port that has one are punted.
    let mut f = tcp_frame((CLIENT, 40000), (GW_C_IP, 22), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Punt(0));
    // A pipeline never told about kernel interfaces punts nothing.
    let mut r = Rig::resolved();
    let mut f = tcp_frame((CLIENT, 40000), (GW_C_IP, 22), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::Local));
    let mut f = ipv6_frame();
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::Unsupported));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever a TCP or UDP packet to a port address carries, it is punted
    /// unchanged on a port with a kernel interface and dropped as `local` on
    /// one without.
    #[test]
    fn any_tcp_or_udp_to_a_port_address_is_punted_or_local(
        sport in prop_oneof![Just(179u16), Just(3784u16), 1u16..],
        dport in prop_oneof![Just(179u16), Just(3784u16), Just(3785u16), Just(4784u16), 1u16..],
        ttl in 0u8.., udp in any::<bool>(), kernel in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut r = Rig::resolved();
        r.pipe.set_kernel_ports(&[kernel, kernel]);
        let build: FrameBuilder = if udp { udp_frame } else { tcp_frame };
        let frame = build((CLIENT, sport), (GW_C_IP, dport), ttl, &payload);
        let mut f = frame.clone();
        let v = r.run(0, &mut f);
        if kernel {
            let control = if udp { [3784, 3785, 4784].contains(&dport) } else { sport == 179 || dport == 179 };
            prop_assert_eq!(v, if control { Verdict::PuntControl(0) } else { Verdict::Punt(0) });
            prop_assert_eq!(f, frame);
        } else {
            prop_assert_eq!(v, Verdict::Drop(DropReason::Local));
        }
    }
}

/// An IPv6 frame to the gateway whose payload is `l4`, after a header
/// saying `next_header` and the payload's true length.
fn ipv6_with(next_header: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = ipv6_frame();
    f[14 + 6] = next_header;
    f[14 + 4..14 + 6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
    f.truncate(14 + 40);
    f.extend_from_slice(l4);
    f
}

/// An IPv6 frame whose payload is a chain of 8-byte extension headers of
/// the types in `chain` (the first named by the fixed header), then an
/// 8-byte UDP header. `units` is each header's length field (8-octet units
/// past the first 8), its bytes zero.
fn ipv6_chain(chain: &[u8], units: u8) -> Vec<u8> {
    let mut payload = Vec::new();
    for (i, _) in chain.iter().enumerate() {
        let next = chain.get(i + 1).copied().unwrap_or(17);
        payload.push(next);
        payload.push(units);
        payload.resize(payload.len() + 6 + usize::from(units) * 8, 0);
    }
    payload.extend_from_slice(&[0x9c, 0x40, 0x00, 0xb3, 0x00, 0x08, 0x00, 0x00]);
    ipv6_with(chain.first().copied().unwrap_or(17), &payload)
}

/// IPv6 for the kernel is punted only if its header and extension chain
/// are sound. Chains past the walk's bounds, hop-by-hop out of place, a
/// payload length longer than the frame and a truncation at any byte are
/// dropped as `malformed` and counted; IPsec and "no next header" are the
/// kernel's to judge.
#[test]
fn malformed_ipv6_for_the_kernel_is_dropped_and_counted() {
    use crate::wire::ipv6::{MAX_EXTENSION_HEADERS, next_header as nh};
    let mut r = punting();
    let malformed = |r: &Rig| r.pipe.counters().drops(DropReason::Malformed);
    let drop = |r: &mut Rig, mut f: Vec<u8>, what: &str| {
        let before = malformed(r);
        assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::Malformed), "{what}");
        assert_eq!(malformed(r), before + 1, "{what}: counted");
    };
    // Sound: the most headers the walk follows; hop-by-hop first; IPsec
    // and no next header, which the walk does not follow.
    let most = ipv6_chain(&[nh::DEST_OPTIONS; MAX_EXTENSION_HEADERS], 0);
    run_punted(&mut r, 0, most.clone(), "8 destination options headers");
    run_punted(&mut r, 0, ipv6_chain(&[nh::HOP_BY_HOP, nh::ROUTING, nh::DEST_OPTIONS], 0), "hop-by-hop first");
    run_punted(&mut r, 0, ipv6_with(nh::ESP, &[0; 16]), "esp");
    run_punted(&mut r, 0, ipv6_with(nh::NO_NEXT_HEADER, &[]), "no next header");
    // Not sound.
    drop(&mut r, ipv6_chain(&[nh::DEST_OPTIONS; MAX_EXTENSION_HEADERS + 1], 0), "one header past the bound");
    drop(&mut r, ipv6_chain(&[nh::HOP_BY_HOP; 40], 0), "40 hop-by-hop headers");
    drop(&mut r, ipv6_chain(&[nh::DEST_OPTIONS, nh::HOP_BY_HOP], 0), "hop-by-hop not first");
    drop(&mut r, ipv6_chain(&[nh::DEST_OPTIONS], 64), "a 520-byte header");
    let mut lying = most.clone();
    let len = u16::from_be_bytes([lying[18], lying[19]]) + 1;
    lying[18..20].copy_from_slice(&len.to_be_bytes());
    drop(&mut r, lying, "a payload length one byte longer than the frame");
    for cut in 0..most.len() {
        drop(&mut r, most[..cut].to_vec(), &format!("truncated to {cut} bytes"));
    }
}

#[test]
fn control_protocols_are_punted_apart_from_the_rest() {
    let mut r = punting();
    // BGP both ways, BFD single hop, echo and multihop; not other ports.
    run_punted_control(&mut r, 0, tcp_frame((CLIENT, 179), (GW_C_IP, 40000), 64, b""), "bgp from the peer's 179");
    run_punted_control(&mut r, 0, tcp_frame((CLIENT, 40000), (GW_C_IP, 179), 64, b""), "bgp to our 179");
    for port in [3784, 3785, 4784] {
        run_punted_control(&mut r, 0, udp_frame((CLIENT, 49152), (GW_C_IP, port), 255, b"bfd"), "bfd");
    }
    run_punted(&mut r, 0, udp_frame((CLIENT, 3784), (GW_C_IP, 9), 64, b"x"), "udp from 3784 is not bfd");
    run_punted(&mut r, 0, tcp_frame((CLIENT, 40000), (GW_C_IP, 22), 64, b""), "ssh");
    // VRRP to its multicast group.
    run_punted_control(&mut r, 0, with_protocol(udp_frame((CLIENT, 1), (ip(224, 0, 0, 18), 2), 255, b""), 112), "vrrp");
    // A later fragment of a BGP segment carries no ports: not control.
    let mut frag = tcp_frame((CLIENT, 40000), (GW_C_IP, 179), 64, b"0123456789");
    frag[14 + 6] = 0x00;
    frag[14 + 7] = 0x10; // offset 16 x 8 bytes
    ipv4::Packet::new_unchecked(&mut frag[14..]).fill_checksum();
    run_punted(&mut r, 0, frag, "a later fragment");
    // IPv6: neighbour discovery (ICMPv6 133 to 137), BGP; not other ICMPv6.
    for t in 133u8..=137 {
        run_punted_control(&mut r, 0, ipv6_with(58, &[t, 0, 0, 0, 0, 0, 0, 0]), "neighbour discovery");
    }
    run_punted(&mut r, 0, ipv6_with(58, &[128, 0, 0, 0, 0, 0, 0, 0]), "icmpv6 echo");
    let mut bgp6 = vec![0u8; 20];
    bgp6[2..4].copy_from_slice(&179u16.to_be_bytes());
    run_punted_control(&mut r, 0, ipv6_with(6, &bgp6), "bgp over ipv6");
    run_punted(&mut r, 0, ipv6_frame(), "other ipv6");
    // Truncated: no ICMPv6 type to read.
    run_punted(&mut r, 0, ipv6_with(58, &[]), "truncated icmpv6");
}
