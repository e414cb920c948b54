//! FullNAT, DSR and hand-off between workers.

use super::*;
use crate::snapshot::{ForwardingMode, SourcePoolSpec};

pub(super) const POOL_ADDR: u32 = ip(198, 18, 1, 100);
pub(super) const POOL_ADDR2: u32 = ip(198, 18, 1, 101);
const TUNNEL: Ipv4Cidr = Ipv4Cidr { addr: ip(198, 18, 3, 0), len: 24 };

/// The base spec with both services in `mode` (a pool `p` of `ports` for
/// FullNAT; DSR backends listen on the service port).
pub(super) fn spec_mode(mode: &ForwardingMode, ports: (u16, u16)) -> SnapshotSpec {
    let mut s = spec();
    s.source_pools = vec![SourcePoolSpec {
        name: "p".into(),
        addresses: vec![POOL_ADDR, POOL_ADDR2],
        first_port: ports.0,
        last_port: ports.1,
    }];
    for svc in &mut s.services {
        let svc = Arc::make_mut(svc);
        svc.mode = mode.clone();
        if matches!(mode, ForwardingMode::Dsr { .. }) {
            for b in &mut svc.backends {
                b.port = svc.port;
            }
        }
    }
    s
}

pub(super) fn fullnat() -> ForwardingMode {
    ForwardingMode::FullNat { pool: "p".into() }
}

pub(super) fn dsr() -> ForwardingMode {
    ForwardingMode::Dsr { tunnel_source: Some(TUNNEL) }
}

impl Rig {
    pub(super) fn with_spec(spec: &SnapshotSpec) -> Rig {
        let mut r = Rig::resolved();
        r.snap = Snapshot::build(spec).unwrap();
        r
    }

    /// Runs one frame with `headroom` free bytes before it; returns the
    /// verdict and the frame as it leaves (from its possibly new start).
    pub(super) fn run_with_headroom(&mut self, port: u16, frame: &[u8], headroom: usize) -> (Verdict, Vec<u8>) {
        let mut buf = vec![0u8; headroom];
        buf.extend_from_slice(frame);
        let mut pkts = [RxPacket::with_headroom(port, &mut buf, headroom)];
        let mut v = [Verdict::Consumed];
        self.pipe.process(&self.snap, self.now, &mut pkts, &mut v);
        let out = pkts[0].frame().to_vec();
        (v[0], out)
    }
}

/// Splits an IPIP frame into its outer header fields (checked with
/// etherparse) and the inner packet as a frame of its own, for `inspect`.
/// Returns (eth src, eth dst, outer src, outer dst, outer ttl, inner frame).
pub(super) fn decapsulate(frame: &[u8]) -> ([u8; 6], [u8; 6], u32, u32, u8, Vec<u8>) {
    let eth = etherparse::Ethernet2HeaderSlice::from_slice(frame).expect("ethernet");
    assert_eq!(eth.ether_type(), etherparse::EtherType::IPV4);
    let outer = etherparse::Ipv4HeaderSlice::from_slice(&frame[14..]).expect("outer IPv4").to_header();
    assert_eq!(outer.header_checksum, outer.calc_header_checksum(), "outer checksum");
    assert_eq!(outer.protocol, etherparse::IpNumber::IPV4, "IPIP");
    let inner_start = 14 + outer.header_len();
    let inner_len = usize::from(outer.total_len) - outer.header_len();
    let mut inner = frame[..14].to_vec();
    inner.extend_from_slice(&frame[inner_start..inner_start + inner_len]);
    (
        eth.source(),
        eth.destination(),
        u32::from_be_bytes(outer.source),
        u32::from_be_bytes(outer.destination),
        outer.time_to_live,
        inner,
    )
}

#[test]
fn fullnat_translates_source_and_destination_and_replies_come_back() {
    let mut r = Rig::with_spec(&spec_mode(&fullnat(), (20000, 20099)));
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"hello");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    let (_, edst, src, dst, ttl, sport, dport) = inspect(&f);
    assert!(src == POOL_ADDR || src == POOL_ADDR2, "source from the pool: {src:#x}");
    assert!((20000..=20099).contains(&sport), "source port from the pool: {sport}");
    assert!(BACKENDS.contains(&dst) && dport == 8080);
    assert_eq!((ttl, edst), (63, BACKEND_MACS[BACKENDS.iter().position(|&b| b == dst).unwrap()]));

    let mut reply = tcp_frame((dst, 8080), (src, sport), 64, b"world");
    assert_eq!(r.run(1, &mut reply), Verdict::Transmit(0));
    let (_, edst, rsrc, rdst, _, rsport, rdport) = inspect(&reply);
    assert_eq!((rsrc, rsport, rdst, rdport, edst), (VIP, 80, CLIENT, 40000, CLIENT_MAC));
    assert_eq!(r.pipe.counters().nat_reverse.get(), 1);

    // The same flow keeps its pair.
    let mut again = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(r.run(0, &mut again), Verdict::Transmit(1));
    assert_eq!(inspect(&again).2, src);
    assert_eq!(inspect(&again).5, sport);
}

#[test]
fn fullnat_replies_without_a_flow_or_from_another_backend_are_dropped() {
    let mut r = Rig::with_spec(&spec_mode(&fullnat(), (20000, 20099)));
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    let (_, _, src, dst, _, sport, _) = inspect(&f);
    let other = *BACKENDS.iter().find(|&&b| b != dst).unwrap();
    for (from, to) in [
        ((other, 8080), (src, sport)),
        ((dst, 8081), (src, sport)),
        ((dst, 8080), (src, sport + 1)),
        ((dst, 8080), (src, 19999)),
    ] {
        let mut reply = tcp_frame(from, to, 64, b"");
        assert_eq!(r.run(1, &mut reply), Verdict::Drop(DropReason::NoFlow), "{from:?} -> {to:?}");
    }
    // A nat-style reply (to the client) is not translated for a FullNAT service.
    let mut reply = tcp_frame((dst, 8080), (CLIENT, 40000), 64, b"");
    assert_eq!(r.run(1, &mut reply), Verdict::Drop(DropReason::NoMatch));
}

#[test]
fn fullnat_port_exhaustion_is_counted_and_ports_come_back_when_flows_expire() {
    // Two ports on each of two addresses: four flows at most.
    let mut r = Rig::with_spec(&spec_mode(&fullnat(), (20000, 20001)));
    for sport in 1..=4 {
        let mut f = udp_frame((CLIENT, sport), (VIP, 53), 64, b"q");
        assert_eq!(r.run(0, &mut f), Verdict::Transmit(1), "flow {sport}");
    }
    let mut f = udp_frame((CLIENT, 5), (VIP, 53), 64, b"q");
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::SnatExhausted));
    assert_eq!(r.pipe.counters().drops(DropReason::SnatExhausted), 1);
    assert_eq!(r.pipe.snat().free_pairs(0), 0);
    // After the UDP timeout, housekeeping sweeps the flows and frees pairs.
    r.now += r.pipe.flows().timeouts().udp_ns + 1_000_000_000;
    for _ in 0..super::SWEEP_PASSES {
        r.pipe.housekeeping(&r.snap, r.now);
    }
    assert_eq!(r.pipe.snat().free_pairs(0), 4);
    // (Neighbours aged out over that time too.)
    for (a, m) in BACKENDS.iter().zip(BACKEND_MACS) {
        r.teach(1, *a, m, GW_B_IP);
    }
    let mut f = udp_frame((CLIENT, 5), (VIP, 53), 64, b"q");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
}

#[test]
fn the_gateway_answers_arp_for_its_source_pool_addresses() {
    let mut r = Rig::with_spec(&spec_mode(&fullnat(), (20000, 20099)));
    let mut req = arp_frame(1, BACKEND_MACS[0], BACKENDS[0], [0; 6], POOL_ADDR2);
    assert_eq!(r.run(1, &mut req), Verdict::Transmit(1));
    let reply = arp::Packet::new_checked(&req[14..]).unwrap();
    assert_eq!(
        (reply.operation(), reply.sender_hw(), reply.sender_ip()),
        (arp::Operation::Reply, EthernetAddress(GW_B), POOL_ADDR2)
    );
}

#[test]
fn a_pool_change_keeps_flows_whose_pair_survives_and_forgets_the_others() {
    let mut r = Rig::with_spec(&spec_mode(&fullnat(), (20000, 20099)));
    let mut pairs = Vec::new();
    for sport in 1..=40 {
        let mut f = udp_frame((CLIENT, sport), (VIP, 53), 64, b"q");
        assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
        let (_, _, a, b, _, p, _) = inspect(&f);
        pairs.push((sport, a, p, b));
    }
    // The second address leaves the pool.
    let mut s = spec_mode(&fullnat(), (20000, 20099));
    s.source_pools[0].addresses = vec![POOL_ADDR];
    r.snap = Snapshot::build(&s).unwrap();
    for (sport, a, p, b) in pairs {
        let mut f = udp_frame((CLIENT, sport), (VIP, 53), 64, b"q");
        assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
        let (_, _, a2, _, _, p2, _) = inspect(&f);
        if a == POOL_ADDR {
            assert_eq!((a2, p2), (a, p), "flow {sport} keeps its pair");
            let mut reply = udp_frame((b, 5353), (a, p), 64, b"r");
            assert_eq!(r.run(1, &mut reply), Verdict::Transmit(0));
        } else {
            assert_eq!(a2, POOL_ADDR, "flow {sport} moved to the remaining address");
        }
    }
}

#[test]
fn dsr_encapsulates_in_ipip_with_the_client_packet_intact() {
    let mut r = Rig::with_spec(&spec_mode(&dsr(), (1024, 65535)));
    let original = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"GET / HTTP/1.1\r\n\r\n");
    let (v, out) = r.run_with_headroom(0, &original, 128);
    assert_eq!(v, Verdict::Transmit(1));
    assert_eq!(out.len(), original.len() + 20);
    let (esrc, edst, osrc, odst, ottl, inner) = decapsulate(&out);
    let b = BACKENDS.iter().position(|&a| a == odst).expect("outer destination is a backend");
    assert_eq!((esrc, edst, ottl), (GW_B, BACKEND_MACS[b], 64));
    assert_eq!(osrc & 0xffff_ff00, TUNNEL.addr, "outer source from the tunnel prefix");
    let (_, _, src, dst, ttl, sport, dport) = inspect(&inner);
    assert_eq!((src, dst, ttl, sport, dport), (CLIENT, VIP, 63, 40000, 80), "the client's packet, one hop older");
    assert_eq!(&inner[14 + 20 + 20..], b"GET / HTTP/1.1\r\n\r\n");

    // Replies do not come back through the gateway in DSR: the backend's
    // address:port is not translated.
    let mut reply = tcp_frame((odst, 80), (CLIENT, 40000), 64, b"");
    assert_eq!(r.run(1, &mut reply), Verdict::Drop(DropReason::NoMatch));
}

#[test]
fn dsr_outer_sources_vary_per_client_and_stay_per_flow() {
    let mut r = Rig::with_spec(&spec_mode(&dsr(), (1024, 65535)));
    let mut sources = std::collections::HashMap::new();
    for sport in 1000..1200u16 {
        let f = udp_frame((CLIENT, sport), (VIP, 53), 64, b"q");
        let (v, out) = r.run_with_headroom(0, &f, 64);
        assert_eq!(v, Verdict::Transmit(1));
        let src = decapsulate(&out).2;
        let (_, again) = r.run_with_headroom(0, &f, 64);
        assert_eq!(decapsulate(&again).2, src, "a flow keeps its outer source");
        sources.insert(src, sport);
    }
    assert!(sources.len() > 150, "200 flows used only {} outer sources of 256", sources.len());

    // Without a tunnel prefix the outer source is the egress port's address.
    let mut r = Rig::with_spec(&spec_mode(&ForwardingMode::Dsr { tunnel_source: None }, (1024, 65535)));
    let (_, out) = r.run_with_headroom(0, &udp_frame((CLIENT, 7), (VIP, 53), 64, b"q"), 64);
    assert_eq!(decapsulate(&out).2, GW_B_IP);
}

#[test]
fn dsr_without_headroom_is_dropped_and_counted() {
    let mut r = Rig::with_spec(&spec_mode(&dsr(), (1024, 65535)));
    let (v, out) = r.run_with_headroom(0, &tcp_frame((CLIENT, 1), (VIP, 80), 64, b""), 19);
    assert_eq!(v, Verdict::Drop(DropReason::NoHeadroom));
    assert_eq!(out.len(), 54, "frame untouched in length");
    assert_eq!(r.pipe.counters().drops(DropReason::NoHeadroom), 1);
}

#[test]
fn dsr_backends_must_listen_on_the_service_port() {
    let mut s = spec_mode(&dsr(), (1024, 65535));
    Arc::make_mut(&mut s.services[0]).backends[1].port = 8080;
    let e = Snapshot::build(&s).unwrap_err();
    assert!(e.to_string().contains("cannot change the port"), "{e}");
}

/// Two pipelines, workers 0 and 1 of 2, with every neighbour resolved.
pub(super) fn two_workers(spec: &SnapshotSpec) -> (Snapshot, [Rig; 2]) {
    let snap = Snapshot::build(spec).unwrap();
    let mk = |w| {
        let mut r = Rig::with_spec(spec);
        r.pipe.set_worker(w, 2);
        r
    };
    (snap, [mk(0), mk(1)])
}

/// Processes `frame` as RSS would deliver it to worker `first`, following a
/// hand-off to the owner. Returns the verdict, the worker that decided, the
/// frame as it leaves, and whether it was handed off.
pub(super) fn deliver(rigs: &mut [Rig; 2], first: usize, port: u16, frame: &[u8]) -> (Verdict, usize, Vec<u8>, bool) {
    let (v, out) = rigs[first].run_with_headroom(port, frame, 64);
    let Verdict::Handoff(w) = v else { return (v, first, out, false) };
    let w = usize::from(w);
    assert_ne!(w, first, "never handed to itself");
    assert_eq!(out, frame, "a handed-off frame is unchanged");
    let mut buf = vec![0u8; 64];
    buf.extend_from_slice(frame);
    let r = &mut rigs[w];
    let mut pkts = [RxPacket::with_headroom(port, &mut buf, 64)];
    let mut verdict = [Verdict::Consumed];
    r.pipe.process_handed_over(&r.snap, r.now, &mut pkts, &mut verdict, &NoPrefetch);
    assert!(!matches!(verdict[0], Verdict::Handoff(_)), "a handed-over packet is never handed on");
    (verdict[0], w, pkts[0].frame().to_vec(), true)
}

#[test]
fn with_two_workers_both_directions_of_every_flow_meet_one_owner_in_every_mode() {
    for mode in [ForwardingMode::Nat, fullnat(), dsr()] {
        let (_, mut rigs) = two_workers(&spec_mode(&mode, (20000, 29999)));
        let mut handed = 0;
        for sport in 1000..1400u16 {
            // RSS is free to deliver either direction to either worker.
            let first = usize::from(sport % 3 == 0);
            // Past the handshake: a segment that is tracked in every mode.
            let f = with_flags(tcp_frame((CLIENT, sport), (VIP, 80), 64, b""), 0x10);
            let (v, owner, out, h) = deliver(&mut rigs, first, 0, &f);
            handed += usize::from(h);
            assert_eq!(v, Verdict::Transmit(1), "{} flow {sport}", mode.name());
            let key = FlowKey { src_addr: CLIENT, dst_addr: VIP, src_port: sport, dst_port: 80, protocol: 6 };
            assert!(rigs[owner].pipe.flows().find(&key, rigs[owner].now).is_some(), "the owner tracks the flow");
            assert!(
                rigs[1 - owner].pipe.flows().find(&key, rigs[1 - owner].now).is_none(),
                "the other worker does not"
            );
            if matches!(mode, ForwardingMode::Dsr { .. }) {
                continue;
            }
            let (_, _, src, dst, _, s, d) = inspect(&out);
            let mut reply = tcp_frame((dst, d), (src, s), 64, b"");
            tcp::Packet::new_unchecked(&mut reply[34..]).fill_checksum(dst, src);
            let (rv, rowner, rout, _) = deliver(&mut rigs, usize::from(sport % 2 == 0), 1, &reply);
            assert_eq!((rv, rowner), (Verdict::Transmit(0), owner), "{} reply of flow {sport}", mode.name());
            let (_, _, rsrc, rdst, _, rs, rd) = inspect(&rout);
            assert_eq!((rsrc, rs, rdst, rd), (VIP, 80, CLIENT, sport));
        }
        assert!(handed > 100, "{}: only {handed} of 400 flows needed a hand-off", mode.name());
    }
}

#[test]
fn fullnat_pairs_come_from_the_workers_own_slice() {
    let (_, mut rigs) = two_workers(&spec_mode(&fullnat(), (20000, 29999)));
    for sport in 1..200u16 {
        let (v, owner, out, _) = deliver(&mut rigs, 0, 0, &udp_frame((CLIENT, sport), (VIP, 53), 64, b"q"));
        assert_eq!(v, Verdict::Transmit(1));
        let p = inspect(&out).5;
        let slice = if owner == 0 { 20000..=24999 } else { 25000..=29999 };
        assert!(slice.contains(&p), "worker {owner} used port {p}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// In every mode, what the client sees is its own flow: replies (nat and
    /// fullnat) come from exactly the VIP:port it sent to, and a DSR packet
    /// reaches the backend with the client's addresses and ports intact.
    /// Every checksum verifies with etherparse.
    #[test]
    fn the_client_sees_its_own_flow_in_every_mode(
        sport in 1u16.., client_host in 2u8..250, udp in any::<bool>(), mode in 0u8..3,
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mode = [ForwardingMode::Nat, fullnat(), dsr()][usize::from(mode)].clone();
        let mut r = Rig::with_spec(&spec_mode(&mode, (1024, 65535)));
        let client = ip(198, 18, 0, client_host);
        r.teach(0, client, CLIENT_MAC, GW_C_IP);
        let (vport, make): (u16, FrameBuilder) = if udp { (53, udp_frame) } else { (80, tcp_frame) };
        let f = make((client, sport), (VIP, vport), 64, &payload);
        let (v, out) = r.run_with_headroom(0, &f, 64);
        prop_assert_eq!(v, Verdict::Transmit(1));
        if let ForwardingMode::Dsr { .. } = mode {
            let (_, _, _, backend, _, inner) = decapsulate(&out);
            prop_assert!(BACKENDS.contains(&backend));
            let (_, _, src, dst, _, s, d) = inspect(&inner);
            prop_assert_eq!((src, s, dst, d), (client, sport, VIP, vport));
            return Ok(());
        }
        let (_, _, src, backend, _, s1, bport) = inspect(&out);
        prop_assert!(BACKENDS.contains(&backend));
        let mut reply = make((backend, bport), (src, s1), 64, &payload);
        prop_assert_eq!(r.run(1, &mut reply), Verdict::Transmit(0));
        let (_, _, rsrc, rdst, _, rsport, rdport) = inspect(&reply);
        prop_assert_eq!((rsrc, rsport, rdst, rdport), (VIP, vport, client, sport));
    }
}

#[test]
fn dsr_packets_too_big_once_encapsulated_get_icmp_fragmentation_needed() {
    let mut r = Rig::with_spec(&spec_mode(&dsr(), (1024, 65535)));
    // 1480 bytes of IP fit a 1500 MTU once encapsulated; 1481 do not.
    let fits = tcp_frame((CLIENT, 40000), (VIP, 80), 64, &[7u8; 1480 - 40]);
    let (v, out) = r.run_with_headroom(0, &fits, 64);
    assert_eq!((v, out.len()), (Verdict::Transmit(1), 14 + 1500));

    // etherparse's builder sets DF.
    let big = tcp_frame((CLIENT, 40001), (VIP, 80), 64, &[7u8; 1481 - 40]);
    let (v, out) = r.run_with_headroom(0, &big, 64);
    assert_eq!(v, Verdict::Transmit(0), "answered on the ingress port");
    assert_eq!(r.pipe.counters().icmp_frag_needed.get(), 1);
    assert_eq!(out.len(), 14 + 20 + 8 + 20 + 8, "the answer quotes the IP header and 8 bytes");
    let s = SlicedPacket::from_ethernet(&out).expect("etherparse parses the ICMP error");
    let Some(NetSlice::Ipv4(ip)) = &s.net else { panic!("not IPv4") };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum());
    assert_eq!((u32::from_be_bytes(h.source), u32::from_be_bytes(h.destination)), (GW_C_IP, CLIENT));
    let Some(TransportSlice::Icmpv4(icmp)) = &s.transport else { panic!("not ICMP: {:?}", s.transport) };
    assert_eq!(icmp.header().checksum, icmp.icmp_type().calc_checksum(icmp.payload()), "ICMP checksum");
    match icmp.icmp_type() {
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu },
        ) => {
            assert_eq!(next_hop_mtu, 1480)
        }
        other => panic!("not fragmentation needed: {other:?}"),
    }
    assert_eq!(icmp.payload(), &big[14..14 + 28], "the quoted header and the first 8 bytes of TCP");
    let eth = etherparse::Ethernet2HeaderSlice::from_slice(&out).unwrap();
    assert_eq!((eth.source(), eth.destination()), (GW_C, CLIENT_MAC));

    // Without DF the packet is dropped: vipgate does not fragment.
    let mut no_df = big.clone();
    no_df[14 + 6] &= !0x40;
    ipv4::Packet::new_unchecked(&mut no_df[14..]).fill_checksum();
    let (v, _) = r.run_with_headroom(0, &no_df, 64);
    assert_eq!(v, Verdict::Drop(DropReason::TooBig));

    // A larger MTU on the backend port lets the same packet through.
    let mut s = spec_mode(&dsr(), (1024, 65535));
    s.ports[1].mtu = 1600;
    let mut r = Rig::with_spec(&s);
    let (v, out) = r.run_with_headroom(0, &big, 64);
    assert_eq!((v, out.len()), (Verdict::Transmit(1), 14 + 1501));
}

#[test]
fn dsr_fragmentation_needed_follows_a_jumbo_backend_ports_mtu() {
    // Both ports at 9000: 8980 bytes of IP fit once encapsulated, 8981 do
    // not, and the client is told the 8980 left for it.
    let mut s = spec_mode(&dsr(), (1024, 65535));
    s.ports[0].mtu = 9000;
    s.ports[1].mtu = 9000;
    let mut r = Rig::with_spec(&s);
    let fits = tcp_frame((CLIENT, 40000), (VIP, 80), 64, &vec![7u8; 8980 - 40]);
    let (v, out) = r.run_with_headroom(0, &fits, 128);
    assert_eq!((v, out.len()), (Verdict::Transmit(1), 14 + 9000));
    let (_, _, _, _, _, inner) = decapsulate(&out);
    assert_eq!(inner[14..].len(), 8980, "the client's packet, whole");

    let big = tcp_frame((CLIENT, 40001), (VIP, 80), 64, &vec![7u8; 8981 - 40]);
    let (v, out) = r.run_with_headroom(0, &big, 128);
    assert_eq!(v, Verdict::Transmit(0), "answered on the ingress port");
    assert_eq!(r.pipe.counters().icmp_frag_needed.get(), 1);
    let s = SlicedPacket::from_ethernet(&out).expect("etherparse parses the ICMP error");
    let Some(TransportSlice::Icmpv4(icmp)) = &s.transport else { panic!("not ICMP: {:?}", s.transport) };
    assert_eq!(icmp.header().checksum, icmp.icmp_type().calc_checksum(icmp.payload()), "ICMP checksum");
    match icmp.icmp_type() {
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu },
        ) => assert_eq!(next_hop_mtu, 8980),
        other => panic!("not fragmentation needed: {other:?}"),
    }

    // A jumbo client port in front of a 1500-byte backend port: the
    // backend port's MTU decides.
    let mut s = spec_mode(&dsr(), (1024, 65535));
    s.ports[0].mtu = 9000;
    let mut r = Rig::with_spec(&s);
    let (v, out) = r.run_with_headroom(0, &big, 128);
    assert_eq!(v, Verdict::Transmit(0));
    let s = SlicedPacket::from_ethernet(&out).expect("etherparse parses the ICMP error");
    let Some(TransportSlice::Icmpv4(icmp)) = &s.transport else { panic!("not ICMP: {:?}", s.transport) };
    assert!(matches!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1480 },
        )
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random bytes after a plausible header prefix never panic in any
    /// mode, as worker 0 or 1 of 2 or as the only worker, handed over or
    /// not, with or without headroom: exactly one verdict, and a drop is
    /// counted.
    #[test]
    fn arbitrary_frames_never_panic_in_any_mode(
        mut tail in proptest::collection::vec(any::<u8>(), 0..120), kind in 0u8..6, mode in 0u8..3,
        worker in 0usize..3, headroom in prop_oneof![Just(0usize), Just(64usize)], handed in any::<bool>(),
    ) {
        let mode = [ForwardingMode::Nat, fullnat(), dsr()][usize::from(mode)].clone();
        let mut r = Rig::with_spec(&spec_mode(&mode, (20000, 20099)));
        if worker < 2 {
            r.pipe.set_worker(worker, 2);
        }
        let mut f = match kind {
            0 => tcp_frame((CLIENT, 1), (VIP, 80), 64, b"")[..34].to_vec(),
            1 => udp_frame((CLIENT, 1), (VIP, 53), 64, b"")[..34].to_vec(),
            2 => tcp_frame((BACKENDS[0], 8080), (POOL_ADDR, 20001), 64, b"")[..34].to_vec(),
            3 => udp_frame((BACKENDS[1], 80), (CLIENT, 9), 64, b"")[..34].to_vec(),
            4 => arp_frame(1, CLIENT_MAC, CLIENT, [0; 6], POOL_ADDR)[..22].to_vec(),
            _ => Vec::new(),
        };
        f.append(&mut tail);
        // Backends' frames arrive on the backend port, addressed to it.
        let port = if matches!(kind, 2 | 3) { 1 } else { 0 };
        let mut buf = vec![0u8; headroom];
        buf.extend_from_slice(&f);
        let mut pkts = [RxPacket::with_headroom(port, &mut buf, headroom)];
        let mut v = [Verdict::Consumed];
        if handed {
            r.pipe.process_handed_over(&r.snap, r.now, &mut pkts, &mut v, &NoPrefetch);
        } else {
            r.pipe.process(&r.snap, r.now, &mut pkts, &mut v);
        }
        let drops = r.pipe.counters().total_drops();
        prop_assert_eq!(matches!(v[0], Verdict::Drop(_)), drops == 1);
        if handed {
            prop_assert!(!matches!(v[0], Verdict::Handoff(_)), "handed-over packets are never handed on");
        }
    }
}
