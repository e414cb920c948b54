//! Pipeline tests. Frames are built and checked with etherparse, an
//! implementation independent of `crate::wire`, so a checksum or layout bug
//! in our wire code cannot hide behind itself.

use super::*;
use crate::maglev::DEFAULT_TABLE_SIZE;
use crate::snapshot::{BackendSpec, Ipv4Cidr, PortSpec, Protocol, RouteSpec, ServiceSpec, SnapshotSpec};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use proptest::prelude::*;

const GW_C: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
const GW_B: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 2];
const CLIENT_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 2];
const BACKEND_MACS: [[u8; 6]; 3] = [[0x02, 0xbb, 0, 0, 0, 11], [0x02, 0xbb, 0, 0, 0, 12], [0x02, 0xbb, 0, 0, 0, 13]];

const fn ip(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}
const GW_C_IP: u32 = ip(198, 18, 0, 1);
const GW_B_IP: u32 = ip(198, 18, 1, 1);
const CLIENT: u32 = ip(198, 18, 0, 2);
const VIP: u32 = ip(198, 18, 100, 1);
const BACKENDS: [u32; 3] = [ip(198, 18, 1, 11), ip(198, 18, 1, 12), ip(198, 18, 1, 13)];
const REMOTE: u32 = ip(198, 19, 5, 5);
const ROUTER: u32 = ip(198, 18, 0, 254);

/// A stats slot per (backend address, port), unique among the tests'
/// backends and within the default capacity.
fn slot_of(addr: u32, port: u16) -> u32 {
    (addr & 0xff) | (u32::from(port % 256) << 8)
}

fn spec() -> SnapshotSpec {
    let backends = |port| {
        BACKENDS.iter().map(|&addr| BackendSpec { addr, port, weight: 1, stats_slot: slot_of(addr, port) }).collect()
    };
    SnapshotSpec {
        ports: vec![
            PortSpec {
                name: "client".into(),
                mac: EthernetAddress(GW_C),
                addresses: vec![Ipv4Cidr { addr: GW_C_IP, len: 24 }],
                mtu: 1500,
                vlan: None,
            },
            PortSpec {
                name: "backend".into(),
                mac: EthernetAddress(GW_B),
                addresses: vec![Ipv4Cidr { addr: GW_B_IP, len: 24 }],
                mtu: 1500,
                vlan: None,
            },
        ],
        routes: vec![RouteSpec { prefix: Ipv4Cidr { addr: ip(198, 19, 0, 0), len: 16 }, via: ROUTER }],
        neighbours: vec![],
        services: vec![
            ServiceSpec {
                name: "web".into(),
                vip: VIP,
                port: 80,
                protocol: Protocol::Tcp,
                table_size: DEFAULT_TABLE_SIZE,
                backends: backends(8080),
                on_backend_removal: Default::default(),
                mode: Default::default(),
                new_flow_limit: None,
                source_ranges: Vec::new(),
                affinity: Default::default(),
            },
            ServiceSpec {
                name: "dns".into(),
                vip: VIP,
                port: 53,
                protocol: Protocol::Udp,
                table_size: 251,
                backends: backends(5353),
                on_backend_removal: Default::default(),
                mode: Default::default(),
                new_flow_limit: None,
                source_ranges: Vec::new(),
                affinity: Default::default(),
            },
        ]
        .into_iter()
        .map(Arc::new)
        .collect(),
        source_pools: vec![],
    }
}

/// A pipeline configuration with a small connection-tracking table, so the
/// many pipelines the tests create stay cheap.
fn test_config() -> PipelineConfig {
    PipelineConfig { flow_capacity: 4096, ..PipelineConfig::default() }
}

struct Rig {
    snap: Snapshot,
    pipe: Pipeline,
    now: u64,
}

impl Rig {
    fn new() -> Rig {
        let snap = Snapshot::build(&spec()).unwrap();
        let pipe = Pipeline::new(test_config(), Arc::new(WorkerCounters::default()));
        Rig { snap, pipe, now: 1_000_000_000 }
    }

    /// A rig whose neighbours (client, router, backends) are all resolved.
    fn resolved() -> Rig {
        let mut r = Rig::new();
        r.teach(0, CLIENT, CLIENT_MAC, GW_C_IP);
        r.teach(0, ROUTER, [0x02, 0xee, 0, 0, 0, 1], GW_C_IP);
        for (a, m) in BACKENDS.iter().zip(BACKEND_MACS) {
            r.teach(1, *a, m, GW_B_IP);
        }
        r
    }

    fn run(&mut self, port: u16, frame: &mut [u8]) -> Verdict {
        let mut pkts = [RxPacket::new(port, frame)];
        let mut v = [Verdict::Consumed];
        self.pipe.process(&self.snap, self.now, &mut pkts, &mut v);
        v[0]
    }

    /// Sends an ARP reply from `addr` to our address on `port`.
    fn teach(&mut self, port: u16, addr: u32, mac: [u8; 6], ours: u32) {
        let mut f = arp_frame(2, mac, addr, self.snap.ports()[usize::from(port)].mac.0, ours);
        assert_eq!(self.run(port, &mut f), Verdict::Consumed);
        assert_eq!(self.pipe.neighbours().get(addr), Some(mac));
    }
}

fn arp_frame(op: u16, sha: [u8; 6], spa: u32, tha: [u8; 6], tpa: u32) -> Vec<u8> {
    let mut f = vec![0u8; 42];
    let mut eth = ethernet::Frame::new_unchecked(&mut f[..]);
    eth.set_dst_addr(if op == 1 { EthernetAddress::BROADCAST } else { EthernetAddress(tha) });
    eth.set_src_addr(EthernetAddress(sha));
    eth.set_ethertype(EtherType::ARP);
    let o = if op == 1 { arp::Operation::Request } else { arp::Operation::Reply };
    arp::Packet::new_unchecked(eth.payload_mut()).emit(o, EthernetAddress(sha), spa, EthernetAddress(tha), tpa);
    f
}

/// The Ethernet source and destination of an IPv4 packet from `src`, as
/// its sender addresses it: a host on the backend LAN (198.18.1.0/24) sends
/// to the gateway's backend port, everything else arrives on the client
/// port (the client LAN or through the router). Frames for the other port
/// are readdressed with [`to_port`].
fn macs_from(src: u32) -> ([u8; 6], [u8; 6]) {
    if src & 0xffff_ff00 == ip(198, 18, 1, 0) { ([0x02, 0xbb, 0, 0, 0, src as u8], GW_B) } else { (CLIENT_MAC, GW_C) }
}

/// `frame`, addressed to the gateway's MAC on `port`.
fn to_port(port: u16, mut frame: Vec<u8>) -> Vec<u8> {
    frame[..6].copy_from_slice(&[GW_C, GW_B][usize::from(port)]);
    frame
}

/// `frame`, addressed to `dst`.
fn to_mac(dst: [u8; 6], mut frame: Vec<u8>) -> Vec<u8> {
    frame[..6].copy_from_slice(&dst);
    frame
}

type FrameBuilder = fn((u32, u16), (u32, u16), u8, &[u8]) -> Vec<u8>;

fn tcp_frame(src: (u32, u16), dst: (u32, u16), ttl: u8, payload: &[u8]) -> Vec<u8> {
    let (smac, dmac) = macs_from(src.0);
    let b = PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src.0.to_be_bytes(), dst.0.to_be_bytes(), ttl)
        .tcp(src.1, dst.1, 12345, 64240)
        .syn();
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

fn udp_frame(src: (u32, u16), dst: (u32, u16), ttl: u8, payload: &[u8]) -> Vec<u8> {
    let (smac, dmac) = macs_from(src.0);
    let b = PacketBuilder::ethernet2(smac, dmac).ipv4(src.0.to_be_bytes(), dst.0.to_be_bytes(), ttl).udp(src.1, dst.1);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

/// Parses a frame with etherparse and checks every checksum independently.
/// Returns (eth src, eth dst, ip src, ip dst, ttl, sport, dport).
fn inspect(frame: &[u8]) -> ([u8; 6], [u8; 6], u32, u32, u8, u16, u16) {
    let s = SlicedPacket::from_ethernet(frame).expect("etherparse parses the output");
    let eth = match s.link {
        Some(etherparse::LinkSlice::Ethernet2(e)) => e,
        other => panic!("not ethernet: {other:?}"),
    };
    let Some(NetSlice::Ipv4(ip)) = s.net else { panic!("not IPv4") };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 header checksum");
    let (src, dst) = (h.source, h.destination);
    let payload = ip.payload().payload;
    let (sport, dport) = match s.transport {
        Some(TransportSlice::Tcp(t)) => {
            let th = t.to_header();
            assert_eq!(th.checksum, th.calc_checksum_ipv4(&h, t.payload()).unwrap(), "TCP checksum");
            (t.source_port(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => {
            let uh = u.to_header();
            if uh.checksum != 0 {
                assert_eq!(uh.checksum, uh.calc_checksum_ipv4(&h, u.payload()).unwrap(), "UDP checksum");
            }
            (u.source_port(), u.destination_port())
        }
        Some(TransportSlice::Icmpv4(i)) => {
            let ih = i.header();
            assert_eq!(ih.checksum, ih.icmp_type.calc_checksum(i.payload()), "ICMP checksum");
            (0, 0)
        }
        other => panic!("unexpected transport {other:?} (payload {} bytes)", payload.len()),
    };
    (eth.source(), eth.destination(), u32::from_be_bytes(src), u32::from_be_bytes(dst), h.time_to_live, sport, dport)
}

#[test]
fn forwards_tcp_to_a_backend_and_translates_the_reply_back() {
    let mut r = Rig::resolved();
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    let (esrc, edst, src, dst, ttl, sport, dport) = inspect(&f);
    let bi = BACKENDS.iter().position(|&b| b == dst).expect("destination is a backend");
    assert_eq!((esrc, edst), (GW_B, BACKEND_MACS[bi]));
    assert_eq!((src, sport, dport, ttl), (CLIENT, 40000, 8080, 63));

    // The backend answers the client directly; the gateway restores the VIP.
    let mut reply = tcp_frame((dst, 8080), (CLIENT, 40000), 64, b"hello");
    assert_eq!(r.run(1, &mut reply), Verdict::Transmit(0));
    let (esrc, edst, src, dst, ttl, sport, dport) = inspect(&reply);
    assert_eq!((esrc, edst), (GW_C, CLIENT_MAC));
    assert_eq!((src, sport, dst, dport, ttl), (VIP, 80, CLIENT, 40000, 63));
    let c = r.pipe.counters();
    assert_eq!((c.nat_forward.get(), c.nat_reverse.get(), c.total_drops()), (1, 1, 0));
}

#[test]
fn forwards_udp_and_keeps_absent_checksum_absent() {
    let mut r = Rig::resolved();
    let mut f = udp_frame((CLIENT, 5000), (VIP, 53), 64, b"query");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    let (_, _, _, dst, _, _, dport) = inspect(&f);
    assert!(BACKENDS.contains(&dst));
    assert_eq!(dport, 5353);

    let mut f = udp_frame((CLIENT, 5001), (VIP, 53), 64, b"query");
    f[14 + 20 + 6] = 0;
    f[14 + 20 + 7] = 0;
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    assert_eq!(&f[14 + 20 + 6..14 + 20 + 8], &[0, 0]);
    inspect(&f);
}

#[test]
fn same_flow_same_backend_and_all_backends_used() {
    let mut r = Rig::resolved();
    let mut hits = [0u32; 3];
    for sport in 0..3000u16 {
        let mut seen = None;
        for _ in 0..2 {
            let mut f = tcp_frame((CLIENT, 10000 + sport), (VIP, 80), 64, b"");
            assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
            let dst = inspect(&f).3;
            assert!(seen.is_none() || seen == Some(dst), "a flow changed backend");
            seen = Some(dst);
        }
        hits[BACKENDS.iter().position(|&b| Some(b) == seen).unwrap()] += 1;
    }
    for h in hits {
        assert!((850..=1150).contains(&h), "uneven split {hits:?}");
    }
}

#[test]
fn unknown_port_of_a_vip_is_dropped_and_counted() {
    let mut r = Rig::resolved();
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 81), 64, b"");
    let before = f.clone();
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::NoService));
    assert_eq!(f, before, "a dropped frame is not modified");
    let mut f = udp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::NoService));
    assert_eq!(r.pipe.counters().drops(DropReason::NoService), 2);
}

#[test]
fn other_destinations_are_classified() {
    let mut r = Rig::resolved();
    let mut f = tcp_frame((CLIENT, 1), (GW_C_IP, 22), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::Local));
    let mut f = tcp_frame((CLIENT, 1), (ip(198, 18, 50, 1), 80), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::NoMatch));
    // A backend talking from a port no service uses is not a reply.
    let mut f = tcp_frame((BACKENDS[0], 9999), (CLIENT, 40000), 64, b"");
    assert_eq!(r.run(1, &mut f), Verdict::Drop(DropReason::NoMatch));
    let mut f = tcp_frame((BACKENDS[0], 8080), (ip(203, 0, 113, 1), 40000), 64, b"");
    assert_eq!(r.run(1, &mut f), Verdict::Drop(DropReason::NoRoute));
}

#[test]
fn replies_to_remote_clients_go_through_the_static_route() {
    let mut r = Rig::resolved();
    let mut f = tcp_frame((BACKENDS[1], 8080), (REMOTE, 5555), 64, b"");
    assert_eq!(r.run(1, &mut f), Verdict::Transmit(0));
    let (_, edst, src, dst, _, sport, _) = inspect(&f);
    assert_eq!((edst, src, sport, dst), ([0x02, 0xee, 0, 0, 0, 1], VIP, 80, REMOTE));
}

/// Without headroom for an ICMP answer (tests/ttl.rs has the answers).
#[test]
fn ttl_expiry_is_dropped() {
    let mut r = Rig::resolved();
    for ttl in [0, 1] {
        let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), ttl, b"");
        assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::TtlExceeded));
    }
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 2, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    assert_eq!(inspect(&f).4, 1);
}

#[test]
fn unresolved_next_hop_drops_and_solicits_once_per_interval() {
    let mut r = Rig::new();
    for _ in 0..5 {
        let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
        assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::NoNeighbour));
    }
    let sol: Vec<_> = r.pipe.take_solicitations().collect();
    assert_eq!(sol.len(), 1, "{sol:?}");
    assert_eq!(sol[0].port, 1);
    assert_eq!(sol[0].sender_ip, GW_B_IP);
    assert_eq!(sol[0].sender_mac, EthernetAddress(GW_B));
    assert!(BACKENDS.contains(&sol[0].target_ip));
    assert_eq!(r.pipe.take_solicitations().count(), 0);
}

#[test]
fn housekeeping_resolves_backends_and_gateways_ahead_of_traffic() {
    let mut r = Rig::new();
    r.pipe.housekeeping(&r.snap, r.now);
    let mut targets: Vec<u32> = r.pipe.take_solicitations().map(|s| s.target_ip).collect();
    targets.sort();
    let mut want = vec![ROUTER, BACKENDS[0], BACKENDS[1], BACKENDS[2]];
    want.sort();
    assert_eq!(targets, want);
    // Rate-limited: nothing new within the retransmit interval.
    r.pipe.housekeeping(&r.snap, r.now + 1000);
    assert_eq!(r.pipe.take_solicitations().count(), 0);
}

#[test]
fn static_neighbours_resolve_without_arp_and_are_never_overridden() {
    let mut s = spec();
    s.neighbours = BACKENDS
        .iter()
        .zip(BACKEND_MACS)
        .map(|(&addr, mac)| crate::snapshot::NeighbourSpec { addr, mac: EthernetAddress(mac) })
        .collect();
    let snap = Snapshot::build(&s).unwrap();
    let mut r = Rig { snap, pipe: Pipeline::new(test_config(), Arc::new(WorkerCounters::default())), now: 1 };
    r.pipe.housekeeping(&r.snap, r.now);
    let targets: Vec<u32> = r.pipe.take_solicitations().map(|s| s.target_ip).collect();
    assert_eq!(targets, vec![ROUTER], "only the router needs ARP");
    // A spoofed ARP reply does not move a permanent entry.
    let mut f = arp_frame(2, [0x02, 0x66, 0x66, 0x66, 0x66, 0x66], BACKENDS[0], GW_B, GW_B_IP);
    assert_eq!(r.run(1, &mut f), Verdict::Consumed);
    assert_eq!(r.pipe.neighbours().get(BACKENDS[0]), Some(BACKEND_MACS[0]));
    // Still fresh long after the reachable time, thanks to housekeeping.
    r.now += 3600 * 1_000_000_000;
    r.pipe.housekeeping(&r.snap, r.now);
    assert!(r.pipe.take_solicitations().all(|s| !BACKENDS.contains(&s.target_ip)));
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    r.teach(0, CLIENT, CLIENT_MAC, GW_C_IP);
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));

    let mut bad = spec();
    bad.neighbours = vec![crate::snapshot::NeighbourSpec { addr: ip(198, 20, 0, 1), mac: EthernetAddress(CLIENT_MAC) }];
    assert!(matches!(Snapshot::build(&bad), Err(crate::snapshot::SnapshotError::NeighbourNotOnLink { .. })));
}

#[test]
fn cached_next_hop_macs_follow_arp_and_expiry() {
    let mut r = Rig::resolved();
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    let (_, mac, _, dst, _, _, _) = inspect(&f);
    let i = BACKENDS.iter().position(|&b| b == dst).unwrap();
    assert_eq!(mac, BACKEND_MACS[i]);

    // The backend moves to another MAC: the very next packet follows it.
    let moved = [0x02, 0xbb, 0xee, 0, 0, i as u8];
    r.teach(1, dst, moved, GW_B_IP);
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    assert_eq!(inspect(&f).1, moved);

    // Long silence: the neighbour expires, the cache empties, packets wait
    // for ARP again and one solicitation goes out.
    r.now += 3600 * 1_000_000_000;
    r.pipe.housekeeping(&r.snap, r.now);
    let _ = r.pipe.take_solicitations().count();
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::NoNeighbour));
    r.teach(1, dst, moved, GW_B_IP);
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
}

#[test]
fn a_new_snapshot_keeps_what_the_worker_learned() {
    let mut r = Rig::resolved();
    // Same configuration, new snapshot (a reload): the learned MACs carry
    // over to the new snapshot's slots without waiting for ARP.
    r.snap = Snapshot::build(&spec()).unwrap();
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    assert_eq!(r.pipe.take_solicitations().count(), 0);
}

#[test]
fn workers_share_what_they_learn_from_arp() {
    let snap = Snapshot::build(&spec()).unwrap();
    let inboxes = worker_inboxes(2);
    let mut a = Rig {
        snap: Snapshot::build(&spec()).unwrap(),
        pipe: Pipeline::new(test_config(), Arc::new(WorkerCounters::default())),
        now: 1,
    };
    let mut b = Rig { snap, pipe: Pipeline::new(test_config(), Arc::new(WorkerCounters::default())), now: 1 };
    a.pipe.join_workers(&inboxes, 0);
    b.pipe.join_workers(&inboxes, 1);
    // Only worker a sees the ARP replies (RSS put them on its queue).
    a.teach(0, CLIENT, CLIENT_MAC, GW_C_IP);
    for (addr, mac) in BACKENDS.iter().zip(BACKEND_MACS) {
        a.teach(1, *addr, mac, GW_B_IP);
    }
    // Worker b forwards without ARPing itself.
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    assert_eq!(b.run(0, &mut f), Verdict::Transmit(1));
    let (_, mac, _, dst, _, _, _) = inspect(&f);
    assert_eq!(mac, BACKEND_MACS[BACKENDS.iter().position(|&x| x == dst).unwrap()]);
    let mut reply = tcp_frame((dst, 8080), (CLIENT, 40000), 64, b"");
    assert_eq!(b.run(1, &mut reply), Verdict::Transmit(0));
    assert_eq!(b.pipe.take_solicitations().count(), 0);
    assert!(inboxes[1].neighbours.is_empty() && inboxes[0].neighbours.is_empty());
}

#[test]
fn many_unresolved_next_hops_are_all_solicited_over_successive_passes() {
    // 100 backends, none answering: more than one pass can ask for.
    let mut s = spec();
    Arc::make_mut(&mut s.services[0]).backends = (0..100u32)
        .map(|i| BackendSpec { addr: ip(198, 18, 1, 100) + i, port: 8080, weight: 1, stats_slot: i })
        .collect();
    let snap = Snapshot::build(&s).unwrap();
    let mut pipe = Pipeline::new(test_config(), Arc::new(WorkerCounters::default()));
    let mut asked = std::collections::HashSet::new();
    for pass in 0..8u64 {
        pipe.housekeeping(&snap, 1 + pass * 100_000_000);
        asked.extend(pipe.take_solicitations().map(|s| s.target_ip));
    }
    for i in 0..100u32 {
        assert!(asked.contains(&(ip(198, 18, 1, 100) + i)), "backend {i} never solicited");
    }
}

#[test]
fn answers_arp_for_own_addresses_and_vips_only() {
    let mut r = Rig::new();
    for (port, target, mac) in [(0u16, GW_C_IP, GW_C), (0, VIP, GW_C), (1, GW_B_IP, GW_B), (1, VIP, GW_B)] {
        let mut f = arp_frame(1, CLIENT_MAC, ip(198, 18, port as u8, 77), [0; 6], target);
        assert_eq!(r.run(port, &mut f), Verdict::Transmit(port));
        let s = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(NetSlice::Arp(a)) = s.net else { panic!("not ARP") };
        assert_eq!(a.operation(), etherparse::ArpOperation::REPLY);
        assert_eq!(a.sender_hw_addr(), &mac);
        assert_eq!(a.sender_protocol_addr(), &target.to_be_bytes());
        assert_eq!(a.target_hw_addr(), &CLIENT_MAC);
        assert_eq!(&f[0..6], &CLIENT_MAC);
        assert_eq!(&f[6..12], &mac);
        // The requester was learned.
        assert_eq!(r.pipe.neighbours().get(ip(198, 18, port as u8, 77)), Some(CLIENT_MAC));
    }
    // Not ours: the other port's address, or a stranger's.
    let mut f = arp_frame(1, CLIENT_MAC, CLIENT, [0; 6], GW_B_IP);
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::ArpNotOurs));
    let mut f = arp_frame(1, CLIENT_MAC, CLIENT, [0; 6], ip(198, 18, 0, 99));
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::ArpNotOurs));
    assert_eq!(r.pipe.counters().arp_replies.get(), 4);
}

#[test]
fn off_link_arp_senders_are_not_learned() {
    let mut r = Rig::new();
    let mut f = arp_frame(1, CLIENT_MAC, ip(198, 19, 0, 1), [0; 6], GW_C_IP);
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(0));
    assert_eq!(r.pipe.neighbours().get(ip(198, 19, 0, 1)), None);
}

#[test]
fn answers_ping_to_own_address_and_vip() {
    let mut r = Rig::new();
    for target in [GW_C_IP, VIP] {
        let b = PacketBuilder::ethernet2(CLIENT_MAC, GW_C)
            .ipv4(CLIENT.to_be_bytes(), target.to_be_bytes(), 5)
            .icmpv4_echo_request(7, 9);
        let mut f = Vec::new();
        b.write(&mut f, b"ping-payload").unwrap();
        assert_eq!(r.run(0, &mut f), Verdict::Transmit(0));
        let (esrc, edst, src, dst, ttl, _, _) = inspect(&f);
        assert_eq!((esrc, edst, src, dst, ttl), (GW_C, CLIENT_MAC, target, CLIENT, ORIGIN_TTL));
        let s = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(TransportSlice::Icmpv4(i)) = s.transport else { panic!() };
        assert!(matches!(i.icmp_type(), etherparse::Icmpv4Type::EchoReply(e) if e.id == 7 && e.seq == 9));
    }
    assert_eq!(r.pipe.counters().icmp_echo_replies.get(), 2);
}

#[test]
fn fragments_bad_checksums_and_unsupported_types_are_dropped() {
    let mut r = Rig::resolved();
    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    f[14 + 9] = 1; // an ICMP fragment
    f[14 + 6] |= 0x20; // more fragments
    let mut ip = ipv4::Packet::new_unchecked(&mut f[14..]);
    ip.fill_checksum();
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::Fragment));

    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    f[14 + 10] ^= 0xff;
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::Malformed));

    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    f[12] = 0x86;
    f[13] = 0xdd;
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::Unsupported));

    let mut f = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    f[14 + 9] = 47; // GRE to a VIP
    ipv4::Packet::new_unchecked(&mut f[14..]).fill_checksum();
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::Unsupported));
}

#[test]
fn every_truncation_is_dropped_as_malformed_without_panicking() {
    let mut r = Rig::resolved();
    let whole = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    for len in 0..whole.len() {
        let mut f = whole[..len].to_vec();
        let v = r.run(0, &mut f);
        assert_eq!(v, Verdict::Drop(DropReason::Malformed), "length {len}");
    }
    let whole = arp_frame(1, CLIENT_MAC, CLIENT, [0; 6], GW_C_IP);
    for len in 0..whole.len() {
        let mut f = whole[..len].to_vec();
        assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::Malformed), "arp length {len}");
    }
}

#[test]
fn ethernet_padding_is_carried_but_ignored() {
    let mut r = Rig::resolved();
    let mut f = udp_frame((CLIENT, 5000), (VIP, 53), 64, b"q");
    f.resize(60, 0xee);
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    inspect(&f);
    assert!(f[f.len() - 4..].iter().all(|&b| b == 0xee));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random bytes, with or without a plausible header prefix, never panic
    /// and always get exactly one verdict; drops are counted.
    #[test]
    fn arbitrary_frames_never_panic(mut tail in proptest::collection::vec(any::<u8>(), 0..120), kind in 0u8..4, port in 0u16..3) {
        let mut r = Rig::resolved();
        let mut f = match kind {
            0 => Vec::new(),
            1 => tcp_frame((CLIENT, 1), (VIP, 80), 64, b"")[..34].to_vec(),
            2 => arp_frame(1, CLIENT_MAC, CLIENT, [0; 6], GW_C_IP)[..22].to_vec(),
            _ => udp_frame((CLIENT, 1), (VIP, 53), 64, b"")[..14].to_vec(),
        };
        f.append(&mut tail);
        // Addressed to the port it arrives on (a port the snapshot does not
        // know has no MAC: only group frames, like the ARP request, pass).
        if matches!(kind, 1 | 3) && port < 2 {
            f = to_port(port, f);
        }
        let v = r.run(port, &mut f);
        let drops = r.pipe.counters().total_drops();
        prop_assert_eq!(matches!(v, Verdict::Drop(_)), drops == 1);
    }

    /// Forward then reverse translation is the identity on the client's view:
    /// the client sees its reply come from exactly the VIP:port it sent to,
    /// with valid checksums, for TCP and UDP.
    #[test]
    fn forward_then_reverse_is_identity_for_the_client(
        sport in 1u16.., client_host in 2u8..250, udp in any::<bool>(), payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut r = Rig::resolved();
        let client = ip(198, 18, 0, client_host);
        r.teach(0, client, CLIENT_MAC, GW_C_IP);
        let (vport, make): (u16, FrameBuilder) =
            if udp { (53, udp_frame) } else { (80, tcp_frame) };
        let mut f = make((client, sport), (VIP, vport), 64, &payload);
        prop_assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
        let (_, _, src, backend, _, s1, bport) = inspect(&f);
        prop_assert_eq!((src, s1), (client, sport));
        prop_assert!(BACKENDS.contains(&backend));

        let mut reply = make((backend, bport), (client, sport), 64, &payload);
        prop_assert_eq!(r.run(1, &mut reply), Verdict::Transmit(0));
        let (_, _, rsrc, rdst, _, rsport, rdport) = inspect(&reply);
        prop_assert_eq!((rsrc, rsport, rdst, rdport), (VIP, vport, client, sport));
    }
}

/// The web service with these (address, weight) backends on port 8080.
fn spec_with(backends: &[(u32, u32)]) -> SnapshotSpec {
    let mut s = spec();
    Arc::make_mut(&mut s.services[0]).backends = backends
        .iter()
        .map(|&(addr, weight)| BackendSpec { addr, port: 8080, weight, stats_slot: slot_of(addr, 8080) })
        .collect();
    s
}

/// Sends one TCP segment of flow `sport` (client -> VIP:80) and returns the
/// backend address it was sent to.
fn send(r: &mut Rig, sport: u16, flags_syn: bool) -> u32 {
    let mut f = tcp_frame((CLIENT, sport), (VIP, 80), 64, b"");
    if !flags_syn {
        f[14 + 20 + 13] = 0x10; // ACK only
        let (src, dst) = (CLIENT, VIP);
        let l4 = &mut f[14 + 20..];
        tcp::Packet::new_unchecked(&mut l4[..20]).fill_checksum(src, dst);
    }
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1), "flow {sport}");
    inspect(&f).3
}

/// Opens flow `sport` with a handshake (SYN, then the client's ACK, which
/// is when the flow is tracked) and returns its backend.
fn connect(r: &mut Rig, sport: u16) -> u32 {
    let b = send(r, sport, true);
    assert_eq!(send(r, sport, false), b, "flow {sport}: the ACK follows the SYN");
    b
}

/// [`tcp_frame`] with exactly the TCP flags `flags` (checksum refilled).
fn with_flags(mut f: Vec<u8>, flags: u8) -> Vec<u8> {
    let hl = usize::from(f[14] & 0x0f) * 4;
    let (src, dst) =
        (ipv4::Packet::new_unchecked(&f[14..]).src_addr(), ipv4::Packet::new_unchecked(&f[14..]).dst_addr());
    let l4 = &mut f[14 + hl..];
    l4[13] = flags;
    let len = l4.len();
    tcp::Packet::new_unchecked(&mut l4[..len]).fill_checksum(src, dst);
    f
}

const B4: u32 = ip(198, 18, 1, 14);

#[test]
fn established_flows_keep_their_backend_when_a_backend_is_added() {
    let mut r = Rig::resolved();
    r.teach(1, B4, [0x02, 0xbb, 0, 0, 0, 14], GW_B_IP);
    let before: Vec<u32> = (0..600u16).map(|p| connect(&mut r, 20000 + p)).collect();

    let grown = spec_with(&[(BACKENDS[0], 1), (BACKENDS[1], 1), (BACKENDS[2], 1), (B4, 1)]);
    // Without state, Maglev would move about a quarter of these flows.
    let mut fresh = Rig {
        snap: Snapshot::build(&grown).unwrap(),
        pipe: Pipeline::new(test_config(), Arc::new(WorkerCounters::default())),
        now: 1,
    };
    fresh.teach(0, CLIENT, CLIENT_MAC, GW_C_IP);
    for (a, m) in BACKENDS.iter().zip(BACKEND_MACS).chain([(&B4, [0x02, 0xbb, 0, 0, 0, 14])]) {
        fresh.teach(1, *a, m, GW_B_IP);
    }
    let stateless: Vec<u32> = (0..600u16).map(|p| send(&mut fresh, 20000 + p, true)).collect();
    let would_move = before.iter().zip(&stateless).filter(|(a, b)| a != b).count();
    assert!(would_move > 60, "the new backend would take only {would_move} of 600 flows");

    r.snap = Snapshot::build(&grown).unwrap();
    for (p, b) in before.iter().enumerate() {
        assert_eq!(send(&mut r, 20000 + p as u16, false), *b, "flow {p} changed backend");
    }
    // New flows do reach the new backend.
    let new_to_b4 = (0..300u16).filter(|p| send(&mut r, 40000 + p, true) == B4).count();
    assert!(new_to_b4 > 30, "{new_to_b4} of 300 new flows went to the new backend");
    assert_eq!(r.pipe.counters().flows_rehashed.get(), 0);
}

#[test]
fn weight_zero_drains_a_backend_and_a_removed_backend_is_rehashed() {
    let mut r = Rig::resolved();
    let before: Vec<u32> = (0..300u16).map(|p| connect(&mut r, 20000 + p)).collect();
    let on_b0 = before.iter().filter(|&&b| b == BACKENDS[0]).count();
    assert!(on_b0 > 50);

    // Drain backend 0: its flows go on, no new flow reaches it.
    r.snap = Snapshot::build(&spec_with(&[(BACKENDS[0], 0), (BACKENDS[1], 1), (BACKENDS[2], 1)])).unwrap();
    for (p, b) in before.iter().enumerate() {
        assert_eq!(send(&mut r, 20000 + p as u16, false), *b, "drained: flow {p} moved");
    }
    for p in 0..300u16 {
        assert_ne!(send(&mut r, 40000 + p, true), BACKENDS[0], "a new flow reached the drained backend");
    }

    // Remove backend 0: its flows move to live backends, the others stay.
    r.snap = Snapshot::build(&spec_with(&[(BACKENDS[1], 1), (BACKENDS[2], 1)])).unwrap();
    for (p, b) in before.iter().enumerate() {
        let now_on = send(&mut r, 20000 + p as u16, false);
        if *b == BACKENDS[0] {
            assert_ne!(now_on, BACKENDS[0]);
        } else {
            assert_eq!(now_on, *b, "flow {p} on a remaining backend moved");
        }
    }
    assert_eq!(r.pipe.counters().flows_rehashed.get(), on_b0 as u64);
}

#[test]
fn a_full_flow_table_still_forwards_new_flows() {
    let snap = Snapshot::build(&spec()).unwrap();
    let config = PipelineConfig { flow_capacity: 64, ..PipelineConfig::default() };
    let mut r = Rig { snap, pipe: Pipeline::new(config, Arc::new(WorkerCounters::default())), now: 1 };
    r.teach(0, CLIENT, CLIENT_MAC, GW_C_IP);
    for (a, m) in BACKENDS.iter().zip(BACKEND_MACS) {
        r.teach(1, *a, m, GW_B_IP);
    }
    // Segments past the handshake: each starts a tracked flow.
    for p in 0..1000u16 {
        send(&mut r, 20000 + p, false);
    }
    let c = r.pipe.counters();
    assert_eq!(c.flows_created.get(), 1000);
    assert!(c.flows_evicted.get() >= 1000 - 64, "evicted {}", c.flows_evicted.get());
    assert!(r.pipe.flows().occupied() <= r.pipe.flows().capacity());
}

#[test]
fn udp_flows_expire_and_then_follow_maglev_again() {
    let mut r = Rig::resolved();
    r.teach(1, B4, [0x02, 0xbb, 0, 0, 0, 14], GW_B_IP);
    let udp = |r: &mut Rig, sport: u16| {
        let mut f = udp_frame((CLIENT, sport), (VIP, 53), 64, b"q");
        assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
        inspect(&f).3
    };
    let before: Vec<u32> = (0..200u16).map(|p| udp(&mut r, 30000 + p)).collect();
    let mut grown = spec();
    Arc::make_mut(&mut grown.services[1]).backends.push(BackendSpec {
        addr: B4,
        port: 5353,
        weight: 1,
        stats_slot: slot_of(B4, 5353),
    });
    r.snap = Snapshot::build(&grown).unwrap();
    // Within the UDP timeout the flows stay put.
    r.now += 60 * 1_000_000_000;
    for (p, b) in before.iter().enumerate() {
        assert_eq!(udp(&mut r, 30000 + p as u16), *b);
    }
    // After it, they are new flows, and some land on the new backend.
    r.now += 400 * 1_000_000_000;
    r.teach(0, CLIENT, CLIENT_MAC, GW_C_IP);
    for (a, m) in BACKENDS.iter().zip(BACKEND_MACS).chain([(&B4, [0x02, 0xbb, 0, 0, 0, 14])]) {
        r.teach(1, *a, m, GW_B_IP);
    }
    let moved = (0..200u16).filter(|&p| udp(&mut r, 30000 + p) == B4).count();
    assert!(moved > 20, "only {moved} expired flows re-balanced onto the new backend");
}

#[test]
fn replies_drive_the_tcp_state_of_the_flow() {
    let mut r = Rig::resolved();
    let backend = send(&mut r, 20000, true);
    send(&mut r, 20000, false);
    let key = FlowKey { src_addr: CLIENT, dst_addr: VIP, src_port: 20000, dst_port: 80, protocol: 6 };
    let state = |r: &Rig| r.pipe.flows().find(&key, r.now).map(|f| r.pipe.flows().get(f).state);
    assert_eq!(state(&r), Some(FlowState::TcpEstablished));
    // The backend closes: FIN from the server side.
    let mut fin = tcp_frame((backend, 8080), (CLIENT, 20000), 64, b"");
    fin[14 + 20 + 13] = 0x11; // FIN|ACK
    let l4 = &mut fin[14 + 20..];
    tcp::Packet::new_unchecked(&mut l4[..20]).fill_checksum(backend, CLIENT);
    assert_eq!(r.run(1, &mut fin), Verdict::Transmit(0));
    assert_eq!(state(&r), Some(FlowState::TcpClosing));
    assert_eq!(
        r.pipe.flows().find(&key, r.now).map(|f| r.pipe.flows().get(f).flags & FlowEntry::FIN_FROM_BACKEND),
        Some(FlowEntry::FIN_FROM_BACKEND)
    );
}

#[test]
fn reset_policy_answers_a_removed_backends_flows_with_a_tcp_reset() {
    use crate::snapshot::OnBackendRemoval;
    let mut r = Rig::resolved();
    let mut s = spec();
    Arc::make_mut(&mut s.services[0]).on_backend_removal = OnBackendRemoval::Reset;
    r.snap = Snapshot::build(&s).unwrap();
    let before: Vec<u32> = (0..100u16).map(|p| connect(&mut r, 20000 + p)).collect();
    let victim = before.iter().position(|&b| b == BACKENDS[0]).expect("a flow on backend 0") as u16;

    let mut gone = s.clone();
    Arc::make_mut(&mut gone.services[0]).backends.remove(0);
    r.snap = Snapshot::build(&gone).unwrap();

    // An ACK segment (seq 12345, ack 777) of the victim's flow comes back as
    // the VIP's reset: seq = the segment's ack, RST only.
    let mut f = tcp_frame((CLIENT, 20000 + victim), (VIP, 80), 64, b"payload bytes");
    {
        let l4 = &mut f[14 + 20..];
        l4[8..12].copy_from_slice(&777u32.to_be_bytes());
        l4[13] = 0x10;
        let len = l4.len();
        tcp::Packet::new_unchecked(&mut l4[..len]).fill_checksum(CLIENT, VIP);
    }
    let frame_len = f.len();
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(0));
    assert_eq!(f.len(), frame_len, "the frame keeps its length");
    let (esrc, edst, src, dst, ttl, sport, dport) = inspect(&f);
    assert_eq!(
        (esrc, edst, src, sport, dst, dport, ttl),
        (GW_C, CLIENT_MAC, VIP, 80, CLIENT, 20000 + victim, ORIGIN_TTL)
    );
    let s2 = SlicedPacket::from_ethernet(&f).unwrap();
    let Some(TransportSlice::Tcp(t)) = s2.transport else { panic!("not TCP") };
    assert!(t.rst() && !t.ack() && !t.syn(), "flags");
    assert_eq!(t.sequence_number(), 777);
    assert!(t.payload().is_empty());
    assert_eq!(r.pipe.counters().flows_reset.get(), 1);

    // The flow is forgotten: the client's next SYN reaches a live backend.
    assert_ne!(send(&mut r, 20000 + victim, true), BACKENDS[0]);
    // A SYN (no ACK) on a flow of the removed backend opens a new
    // connection: Maglev picks a live backend, no reset.
    let other =
        before.iter().enumerate().filter(|(_, b)| **b == BACKENDS[0]).map(|(i, _)| i as u16).find(|&i| i != victim);
    let o = other.expect("a second flow on backend 0");
    assert_ne!(send(&mut r, 20000 + o, true), BACKENDS[0]);
    assert_eq!(r.pipe.counters().flows_reset.get(), 1);
    // Flows on the remaining backends are untouched.
    for (p, b) in before.iter().enumerate() {
        if *b != BACKENDS[0] {
            assert_eq!(send(&mut r, 20000 + p as u16, false), *b);
        }
    }
}

mod exception;
mod flows;
mod fragments;
mod icmp_errors;
mod martians;
mod modes;
mod options;
mod other_host;
mod ratelimit;
mod stats;
mod ttl;
mod vlan;
