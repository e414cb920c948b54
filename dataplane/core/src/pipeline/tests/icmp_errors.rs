//! ICMP errors about translated flows, both ways, in every mode. Each
//! translated error is read back with etherparse: its checksums, its outer
//! addresses, and the quoted packet, which must be the packet as the side
//! it is delivered to sent it (addresses, ports, the quoted TCP checksum).

use super::modes::{POOL_ADDR, POOL_ADDR2, decapsulate, dsr, fullnat, spec_mode};
use super::*;
use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};

/// A router on the client's side of the gateway.
const NEAR_CLIENT: u32 = ROUTER;

fn frag_needed(mtu: u16) -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu })
}

/// An ICMP error of `kind` from `src` to `dst` quoting `quote` (an IP
/// packet, from its header on).
fn icmp_error_frame(src: u32, dst: u32, kind: Icmpv4Type, quote: &[u8]) -> Vec<u8> {
    let (smac, dmac) = macs_from(src);
    let b = PacketBuilder::ethernet2(smac, dmac).ipv4(src.to_be_bytes(), dst.to_be_bytes(), 64).icmpv4(kind);
    let mut v = Vec::with_capacity(b.size(quote.len()));
    b.write(&mut v, quote).unwrap();
    v
}

/// The quoted packet of ICMP error frame `frame` (checksums checked),
/// with its type, and the outer (src, dst, ttl).
fn read_error(frame: &[u8]) -> (Icmpv4Type, (u32, u32, u8), Vec<u8>) {
    let s = SlicedPacket::from_ethernet(frame).expect("etherparse parses the error");
    let Some(NetSlice::Ipv4(ip)) = &s.net else { panic!("not IPv4") };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "outer IPv4 checksum");
    let Some(TransportSlice::Icmpv4(icmp)) = &s.transport else { panic!("not ICMP: {:?}", s.transport) };
    assert_eq!(icmp.header().checksum, icmp.icmp_type().calc_checksum(icmp.payload()), "ICMP checksum");
    let quoted = icmp.payload().to_vec();
    let qh = etherparse::Ipv4HeaderSlice::from_slice(&quoted).expect("the quoted IPv4 header").to_header();
    assert_eq!(qh.header_checksum, qh.calc_header_checksum(), "quoted IPv4 checksum");
    (icmp.icmp_type(), (u32::from_be_bytes(h.source), u32::from_be_bytes(h.destination), h.time_to_live), quoted)
}

/// (src, sport, dst, dport) of a quoted packet.
fn tuple(q: &[u8]) -> (u32, u16, u32, u16) {
    let hl = usize::from(q[0] & 0x0f) * 4;
    let be32 = |i: usize| u32::from_be_bytes([q[i], q[i + 1], q[i + 2], q[i + 3]]);
    let be16 = |i: usize| u16::from_be_bytes([q[i], q[i + 1]]);
    (be32(12), be16(hl), be32(16), be16(hl + 2))
}

/// The TCP checksum field of a quoted packet that holds it.
fn quoted_tcp_checksum(q: &[u8]) -> u16 {
    let hl = usize::from(q[0] & 0x0f) * 4;
    u16::from_be_bytes([q[hl + 16], q[hl + 17]])
}

#[test]
fn fragmentation_needed_for_a_nat_reply_reaches_its_backend_quoting_what_the_backend_sent() {
    let mut r = Rig::resolved();
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    let backend = inspect(&f).3;
    let bi = BACKENDS.iter().position(|&b| b == backend).unwrap();
    // The backend's reply, as it sent it and as the gateway sent it on.
    let sent = tcp_frame((backend, 8080), (CLIENT, 40000), 64, &[7u8; 1400]);
    let mut out = sent.clone();
    assert_eq!(r.run(1, &mut out), Verdict::Transmit(0));
    // A router near the client quotes the translated reply: its headers
    // and 28 bytes (the TCP checksum included), or only 8 bytes (RFC 792).
    for quote_len in [20 + 28, 20 + 8] {
        let mut e = icmp_error_frame(NEAR_CLIENT, VIP, frag_needed(1280), &out[14..14 + quote_len]);
        assert_eq!(r.run(0, &mut e), Verdict::Transmit(1), "quote of {quote_len} bytes: to the backend's port");
        let eth = etherparse::Ethernet2HeaderSlice::from_slice(&e).unwrap();
        assert_eq!((eth.source(), eth.destination()), (GW_B, BACKEND_MACS[bi]));
        let (kind, outer, q) = read_error(&e);
        assert_eq!(kind, frag_needed(1280), "type, code and MTU kept");
        assert_eq!(outer, (NEAR_CLIENT, backend, 63), "from the router, to the backend");
        assert_eq!(q.len(), quote_len);
        assert_eq!(tuple(&q), (backend, 8080, CLIENT, 40000), "the backend's own tuple");
        if quote_len >= 20 + 18 {
            assert_eq!(quoted_tcp_checksum(&q), quoted_tcp_checksum(&sent[14..]), "the backend's own TCP checksum");
        }
    }
    let c = r.pipe.counters();
    assert_eq!((c.icmp_errors_forwarded.get(), c.total_drops()), (2, 0));
}

#[test]
fn fragmentation_needed_for_a_fullnat_reply_reaches_its_backend_from_the_flows_source_pair() {
    let mut r = Rig::with_spec(&spec_mode(&fullnat(), (20000, 20099)));
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    let (_, _, pair, backend, _, pair_port, _) = inspect(&f);
    assert!(pair == POOL_ADDR || pair == POOL_ADDR2);
    let sent = udp_or_tcp_reply(backend, (pair, pair_port));
    let mut out = sent.clone();
    assert_eq!(r.run(1, &mut out), Verdict::Transmit(0));
    assert_eq!(tuple(&out[14..]), (VIP, 80, CLIENT, 40000));
    let mut e = icmp_error_frame(NEAR_CLIENT, VIP, frag_needed(1280), &out[14..14 + 48]);
    assert_eq!(r.run(0, &mut e), Verdict::Transmit(1));
    let (kind, outer, q) = read_error(&e);
    assert_eq!(kind, frag_needed(1280));
    assert_eq!(outer, (pair, backend, 63), "from the address the backend talks to");
    assert_eq!(tuple(&q), (backend, 8080, pair, pair_port), "the backend's own tuple");
    assert_eq!(quoted_tcp_checksum(&q), quoted_tcp_checksum(&sent[14..]));
}

/// The backend's TCP reply to `to`, 1400 bytes of payload.
fn udp_or_tcp_reply(backend: u32, to: (u32, u16)) -> Vec<u8> {
    tcp_frame((backend, 8080), to, 64, &[9u8; 1400])
}

#[test]
fn an_error_for_a_dsr_reply_is_tunnelled_to_the_flows_backend_unchanged() {
    let mut r = Rig::with_spec(&spec_mode(&dsr(), (1024, 65535)));
    let client_packet = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    let (v, out) = r.run_with_headroom(0, &client_packet, 64);
    assert_eq!(v, Verdict::Transmit(1));
    let backend = decapsulate(&out).3;
    // The backend answered the client directly, from the VIP.
    let reply = tcp_frame((VIP, 80), (CLIENT, 40000), 63, &[7u8; 1400]);
    let e = icmp_error_frame(NEAR_CLIENT, VIP, frag_needed(1280), &reply[14..14 + 48]);
    let (v, out) = r.run_with_headroom(0, &e, 64);
    assert_eq!(v, Verdict::Transmit(1));
    let (_, _, _, outer_dst, _, inner) = decapsulate(&out);
    assert_eq!(outer_dst, backend, "the flow's backend");
    let (kind, outer, q) = read_error(&inner);
    assert_eq!((kind, outer), (frag_needed(1280), (NEAR_CLIENT, VIP, 63)));
    assert_eq!(q, &reply[14..14 + 48], "quoted as the backend sent it");
}

#[test]
fn an_error_from_the_backend_side_reaches_the_client_quoting_the_vip() {
    // nat: the backend's host says the port is unreachable (a UDP service).
    let mut r = Rig::resolved();
    let mut f = udp_frame((CLIENT, 5353), (VIP, 53), 64, b"q");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    let (_, _, _, backend, _, _, bport) = inspect(&f);
    let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let mut e = icmp_error_frame(backend, CLIENT, unreachable.clone(), &f[14..14 + 28]);
    assert_eq!(r.run(1, &mut e), Verdict::Transmit(0));
    let eth = etherparse::Ethernet2HeaderSlice::from_slice(&e).unwrap();
    assert_eq!((eth.source(), eth.destination()), (GW_C, CLIENT_MAC));
    let (kind, outer, q) = read_error(&e);
    assert_eq!(
        (kind, outer),
        (unreachable.clone(), (VIP, CLIENT, 63)),
        "from the VIP: the client never sees a backend"
    );
    assert_eq!(tuple(&q), (CLIENT, 5353, VIP, 53), "the client's own tuple");
    let original = udp_frame((CLIENT, 5353), (VIP, 53), 64, b"q");
    assert_eq!(&q[26..28], &original[14 + 26..14 + 28], "the client's own UDP checksum");
    assert_ne!(bport, 53);

    // fullnat: to the source pair, quoting pair -> backend.
    let mut r = Rig::with_spec(&spec_mode(&fullnat(), (20000, 20099)));
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    let (_, _, pair, backend, _, _, _) = inspect(&f);
    let exceeded = Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit);
    let mut e = icmp_error_frame(backend, pair, exceeded.clone(), &f[14..14 + 40]);
    assert_eq!(r.run(1, &mut e), Verdict::Transmit(0));
    let (kind, outer, q) = read_error(&e);
    assert_eq!((kind, outer), (exceeded, (VIP, CLIENT, 63)));
    assert_eq!(tuple(&q), (CLIENT, 40000, VIP, 80));
    let sent = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(quoted_tcp_checksum(&q), quoted_tcp_checksum(&sent[14..]), "the client's own TCP checksum");
    assert_eq!(r.pipe.counters().icmp_errors_forwarded.get(), 1);
}

#[test]
fn errors_that_quote_no_flow_are_dropped_and_counted() {
    let mut r = Rig::resolved();
    let reply = tcp_frame((VIP, 80), (CLIENT, 40000), 63, b"");
    let icmp_packet = icmp_error_frame(CLIENT, VIP, frag_needed(1280), &reply[14..14 + 28]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // To a VIP port no service listens on.
        (
            "no service",
            icmp_error_frame(
                NEAR_CLIENT,
                VIP,
                frag_needed(1280),
                &tcp_frame((VIP, 81), (CLIENT, 1), 63, b"")[14..14 + 28],
            ),
        ),
        // Quoting fewer than 8 bytes after the header: no ports.
        ("short quote", icmp_error_frame(NEAR_CLIENT, VIP, frag_needed(1280), &reply[14..14 + 24])),
        // Quoting an ICMP packet.
        ("quotes ICMP", icmp_error_frame(NEAR_CLIENT, VIP, frag_needed(1280), &icmp_packet[14..14 + 28])),
        // From the backend side, about a packet to no backend.
        (
            "no reverse",
            icmp_error_frame(
                BACKENDS[0],
                CLIENT,
                frag_needed(1280),
                &tcp_frame((CLIENT, 1), (BACKENDS[0], 9999), 63, b"")[14..14 + 28],
            ),
        ),
        // To a source pool address: not FullNAT here, but a pool of no flow.
    ];
    for (what, mut e) in cases {
        let port = if what == "no reverse" { 1 } else { 0 };
        assert_eq!(r.run(port, &mut e), Verdict::Drop(DropReason::IcmpNoFlow), "{what}");
    }
    assert_eq!(r.pipe.counters().drops(DropReason::IcmpNoFlow), 4);

    // fullnat: an error to a VIP for a flow never seen, and one to a pair
    // no flow holds.
    let mut r = Rig::with_spec(&spec_mode(&fullnat(), (20000, 20099)));
    let mut e = icmp_error_frame(NEAR_CLIENT, VIP, frag_needed(1280), &reply[14..14 + 28]);
    assert_eq!(r.run(0, &mut e), Verdict::Drop(DropReason::IcmpNoFlow), "no tracked fullnat flow");
    let stray = tcp_frame((POOL_ADDR, 20001), (BACKENDS[0], 8080), 63, b"");
    let mut e = icmp_error_frame(BACKENDS[0], POOL_ADDR, frag_needed(1280), &stray[14..14 + 28]);
    assert_eq!(r.run(1, &mut e), Verdict::Drop(DropReason::IcmpNoFlow), "a pair no flow holds");
}

proptest! {
    /// Whatever an ICMP error to a VIP, a client or a pool address quotes,
    /// the pipeline does not panic, gives a verdict, and counts it.
    #[test]
    fn arbitrary_quotes_never_panic_and_are_counted(
        quote in proptest::collection::vec(any::<u8>(), 0..120),
        head in any::<[u8; 20]>(),
        to in 0usize..3,
        kind in 0u8..2,
        fullnat_mode in any::<bool>(),
    ) {
        let mut r = if fullnat_mode { Rig::with_spec(&spec_mode(&fullnat(), (20000, 20099))) } else { Rig::resolved() };
        // Half the time a plausible IPv4 TCP header, then the random rest.
        let mut q = quote;
        if head[0] & 1 == 0 {
            let mut h = head;
            h[0] = 0x45;
            h[9] = 6;
            h[12..16].copy_from_slice(&VIP.to_be_bytes());
            h[16..20].copy_from_slice(&CLIENT.to_be_bytes());
            q.splice(0..0, h);
        }
        let dst = [VIP, CLIENT, POOL_ADDR][to];
        let icmp = if kind == 0 { frag_needed(1280) } else { Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit) };
        let e = icmp_error_frame(NEAR_CLIENT, dst, icmp, &q);
        let (v, _) = r.run_with_headroom(0, &e, 64);
        let c = r.pipe.counters();
        match v {
            Verdict::Transmit(_) => prop_assert_eq!(c.icmp_errors_forwarded.get(), 1),
            Verdict::Drop(reason) => prop_assert_eq!(c.drops(reason), 1),
            other => prop_assert!(false, "verdict {:?}", other),
        }
    }
}
