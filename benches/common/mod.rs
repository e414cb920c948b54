//! Shared set-up of the packet-core benchmarks: a two-port gateway with one
//! TCP service of three backends (permanent neighbours, so nothing waits for
//! ARP), and bursts of client frames.

#![allow(dead_code)]

use std::sync::Arc;
use vipgate_dataplane::admission::NewFlowLimit;
use vipgate_dataplane::counters::WorkerCounters;
use vipgate_dataplane::pipeline::{Pipeline, PipelineConfig, RxPacket, Verdict};
use vipgate_dataplane::snapshot::{
    Affinity, BackendSpec, ForwardingMode, Ipv4Cidr, NeighbourSpec, PortSpec, Protocol, ServiceSpec, Snapshot,
    SnapshotSpec, SourcePoolSpec, VlanSpec,
};
use vipgate_dataplane::wire::{EthernetAddress, ethernet, ipv4, tcp};

pub(crate) const BURST: usize = 32;

const fn ip(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

pub(crate) const VIP: u32 = ip(198, 18, 100, 1);

/// The MACs of the gateway's ports ("client", "backend"): frames arriving
/// on a port are addressed to its MAC, or the pipeline drops them as
/// another host's.
pub(crate) const PORT_MACS: [EthernetAddress; 2] =
    [EthernetAddress([2, 0, 0, 0, 0, 1]), EthernetAddress([2, 0, 0, 0, 0, 2])];
pub(crate) const CLIENT_NET: u32 = ip(198, 18, 0, 0);

pub(crate) fn snapshot() -> Snapshot {
    snapshot_with(ForwardingMode::Nat)
}

/// The FullNAT source pool address of [`snapshot_with`].
pub(crate) const POOL_ADDR: u32 = ip(198, 18, 1, 100);

/// The benchmark gateway with its service in `mode` (FullNAT from a
/// one-address pool; DSR backends on the service port, tunnel sources
/// from 198.18.3.0/24).
pub(crate) fn snapshot_with(mode: ForwardingMode) -> Snapshot {
    snapshot_limited(mode, None)
}

/// [`snapshot_with`], the service limiting new flows per client source
/// with `limit`.
pub(crate) fn snapshot_limited(mode: ForwardingMode, limit: Option<NewFlowLimit>) -> Snapshot {
    snapshot_options(mode, limit, Vec::new(), Affinity::None)
}

/// [`snapshot_limited`], the service also serving only `source_ranges`
/// (empty: everyone) and picking backends with `affinity`.
pub(crate) fn snapshot_options(
    mode: ForwardingMode,
    limit: Option<NewFlowLimit>,
    source_ranges: Vec<Ipv4Cidr>,
    affinity: Affinity,
) -> Snapshot {
    Snapshot::build(&spec_options(mode, limit, source_ranges, affinity)).expect("benchmark snapshot")
}

/// The nat gateway of [`snapshot`] on VLANs: the client port carries VLAN
/// 100 (198.18.50.1/24), and the backends' subnet (198.18.1.0/24) is VLAN
/// 200 on the backend port, whose untagged network becomes 198.18.2.0/24.
/// Client frames come in tagged 100 and leave tagged 200.
pub(crate) fn snapshot_vlans() -> Snapshot {
    let mut spec = spec_options(ForwardingMode::Nat, None, Vec::new(), Affinity::None);
    let backend_net = spec.ports[1].addresses.clone();
    spec.ports[1].addresses = vec![Ipv4Cidr { addr: ip(198, 18, 2, 1), len: 24 }];
    let vlan = |name: &str, port, id, addresses| PortSpec {
        name: name.into(),
        mac: EthernetAddress::default(),
        addresses,
        mtu: 1500,
        vlan: Some(VlanSpec { port, id }),
    };
    spec.ports.push(vlan("v100", 0, 100, vec![Ipv4Cidr { addr: ip(198, 18, 50, 1), len: 24 }]));
    spec.ports.push(vlan("v200", 1, 200, backend_net));
    Snapshot::build(&spec).expect("benchmark snapshot with VLANs")
}

fn spec_options(
    mode: ForwardingMode,
    limit: Option<NewFlowLimit>,
    source_ranges: Vec<Ipv4Cidr>,
    affinity: Affinity,
) -> SnapshotSpec {
    let port = if matches!(mode, ForwardingMode::Dsr { .. }) { 80 } else { 8080 };
    let backends: Vec<u32> = (11..=13).map(|h| ip(198, 18, 1, h)).collect();
    let mut neighbours: Vec<NeighbourSpec> = backends
        .iter()
        .map(|&addr| NeighbourSpec { addr, mac: EthernetAddress([2, 0xbb, 0, 0, 0, addr as u8]) })
        .collect();
    neighbours.push(NeighbourSpec { addr: ip(198, 18, 0, 2), mac: EthernetAddress([2, 0xcc, 0, 0, 0, 2]) });
    SnapshotSpec {
        ports: vec![
            PortSpec {
                name: "client".into(),
                mac: PORT_MACS[0],
                addresses: vec![Ipv4Cidr { addr: ip(198, 18, 0, 1), len: 24 }],
                mtu: 1500,
                vlan: None,
            },
            PortSpec {
                name: "backend".into(),
                mac: PORT_MACS[1],
                addresses: vec![Ipv4Cidr { addr: ip(198, 18, 1, 1), len: 24 }],
                mtu: 1500,
                vlan: None,
            },
        ],
        routes: vec![],
        neighbours,
        services: vec![ServiceSpec {
            name: "web".into(),
            vip: VIP,
            port: 80,
            protocol: Protocol::Tcp,
            table_size: 65537,
            backends: backends
                .iter()
                .zip(0..)
                .map(|(&addr, stats_slot)| BackendSpec { addr, port, weight: 1, stats_slot })
                .collect(),
            on_backend_removal: Default::default(),
            mode,
            new_flow_limit: limit,
            source_ranges,
            affinity,
        }]
        .into_iter()
        .map(Arc::new)
        .collect(),
        source_pools: vec![SourcePoolSpec {
            name: "snat".into(),
            addresses: vec![POOL_ADDR],
            first_port: 1024,
            last_port: 65535,
        }],
    }
}

/// A pipeline whose permanent neighbours are loaded.
pub(crate) fn pipeline(snap: &Snapshot) -> Pipeline {
    let mut p = Pipeline::new(PipelineConfig::default(), Arc::new(WorkerCounters::default()));
    p.housekeeping(snap, 0);
    let _ = p.take_solicitations().count();
    p
}

/// A 64-byte TCP frame (60 bytes without FCS) from `src:sport` to
/// `dst:dport`, addressed to the MAC of port `ingress`.
pub(crate) fn tcp_frame(ingress: u16, src: u32, sport: u16, dst: u32, dport: u16) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    let mut eth = ethernet::Frame::new_unchecked(&mut f[..]);
    eth.set_dst_addr(PORT_MACS[usize::from(ingress)]);
    eth.set_src_addr(EthernetAddress([2, 0xcc, 0, 0, 0, 2]));
    eth.set_ethertype(0x0800);
    let ipb = &mut f[14..54];
    ipb[..20].copy_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    ipb[12..16].copy_from_slice(&src.to_be_bytes());
    ipb[16..20].copy_from_slice(&dst.to_be_bytes());
    ipv4::Packet::new_unchecked(&mut ipb[..]).fill_checksum();
    let t = &mut ipb[20..40];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 0x50;
    t[13] = 0x10;
    tcp::Packet::new_unchecked(&mut t[..]).fill_checksum(src, dst);
    f
}

/// `BURST` client->VIP frames of distinct flows.
pub(crate) fn forward_burst(seed: u16) -> Vec<Vec<u8>> {
    (0..BURST as u16)
        .map(|i| tcp_frame(0, CLIENT_NET | 2, 10_000 + seed.wrapping_mul(BURST as u16) + i, VIP, 80))
        .collect()
}

/// `BURST` backend->client reply frames.
pub(crate) fn reverse_burst() -> Vec<Vec<u8>> {
    (0..BURST as u16)
        .map(|i| tcp_frame(1, ip(198, 18, 1, 11 + (i % 3) as u8), 8080, CLIENT_NET | 2, 10_000 + i))
        .collect()
}

/// `BURST` frames for a port of the VIP that no service listens on.
pub(crate) fn no_service_burst() -> Vec<Vec<u8>> {
    (0..BURST as u16).map(|i| tcp_frame(0, CLIENT_NET | 2, 10_000 + i, VIP, 81)).collect()
}

/// Bytes of headroom in front of each frame of [`run_burst_headroom`], as
/// an mbuf has (DSR writes its outer header there).
pub(crate) const HEADROOM: usize = 64;

/// Runs one burst whose buffers hold [`HEADROOM`] free bytes, then the
/// frame.
#[inline]
pub(crate) fn run_burst_headroom(
    pipe: &mut Pipeline,
    snap: &Snapshot,
    now: u64,
    bufs: &mut [Vec<u8>],
    verdicts: &mut [Verdict; BURST],
    ingress: u16,
) {
    let mut pkts: arrayvec::ArrayVec<RxPacket<'_>, BURST> =
        bufs.iter_mut().map(|b| RxPacket::with_headroom(ingress, &mut b[..], HEADROOM)).collect();
    pipe.process(snap, now, &mut pkts, &mut verdicts[..]);
}

/// Frames with [`HEADROOM`] zero bytes in front.
pub(crate) fn with_headroom(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    frames
        .iter()
        .map(|f| {
            let mut b = vec![0u8; HEADROOM];
            b.extend_from_slice(f);
            b
        })
        .collect()
}

/// The replies to a FullNAT forward burst, as its backends send them: run
/// `forward` through `pipe` once (creating the flows and their source
/// pairs) and answer each translated frame.
pub(crate) fn fullnat_reply_burst(pipe: &mut Pipeline, snap: &Snapshot, forward: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut frames = forward.to_vec();
    let mut verdicts = [Verdict::Consumed; BURST];
    run_burst(pipe, snap, 1, &mut frames, &mut verdicts, 0);
    assert!(verdicts.iter().all(|v| matches!(v, Verdict::Transmit(1))), "{verdicts:?}");
    frames
        .iter()
        .map(|f| {
            let be32 = |o: usize| u32::from_be_bytes([f[o], f[o + 1], f[o + 2], f[o + 3]]);
            let be16 = |o: usize| u16::from_be_bytes([f[o], f[o + 1]]);
            tcp_frame(1, be32(30), be16(36), be32(26), be16(34))
        })
        .collect()
}

/// `BURST` client->VIP frames of distinct flows that worker 1 of 2 owns.
pub(crate) fn foreign_burst() -> Vec<Vec<u8>> {
    (10_000u16..)
        .filter(|&p| vipgate_dataplane::pipeline::client_owner(CLIENT_NET | 2, p, 6, 2) == 1)
        .take(BURST)
        .map(|p| tcp_frame(0, CLIENT_NET | 2, p, VIP, 80))
        .collect()
}

/// Runs one burst through the pipeline.
#[inline]
pub(crate) fn run_burst(
    pipe: &mut Pipeline,
    snap: &Snapshot,
    now: u64,
    frames: &mut [Vec<u8>],
    verdicts: &mut [Verdict; BURST],
    ingress: u16,
) {
    let mut pkts: arrayvec::ArrayVec<RxPacket<'_>, BURST> =
        frames.iter_mut().map(|f| RxPacket::new(ingress, &mut f[..])).collect();
    pipe.process(snap, now, &mut pkts, &mut verdicts[..]);
}

/// The client address and port of flow `id` (1M distinct tuples inside
/// 198.18.0.0/15: 20 addresses from 198.18.16.0, 50,000 ports each).
pub(crate) fn flow_client(id: u32) -> (u32, u16) {
    (u32::from_be_bytes([198, 18, 16, 0]) + id / 50_000, 10_000 + (id % 50_000) as u16)
}

/// Writes flow `id`'s client->VIP:80 frame into `out` by patching the
/// template's source address and port and updating both checksums
/// incrementally: a few dozen instructions, the same for every packet (the
/// `prepare` workload measures exactly this, to subtract it).
#[inline]
pub(crate) fn prepare_frame(template: &[u8], out: &mut [u8], id: u32) {
    use vipgate_dataplane::checksum::{update16, update32};
    out.copy_from_slice(template);
    let (addr, port) = flow_client(id);
    let old_addr = u32::from_be_bytes([out[26], out[27], out[28], out[29]]);
    let old_port = u16::from_be_bytes([out[34], out[35]]);
    out[26..30].copy_from_slice(&addr.to_be_bytes());
    let ip_sum = update32(u16::from_be_bytes([out[24], out[25]]), old_addr, addr);
    out[24..26].copy_from_slice(&ip_sum.to_be_bytes());
    out[34..36].copy_from_slice(&port.to_be_bytes());
    let tcp_sum = update16(update32(u16::from_be_bytes([out[50], out[51]]), old_addr, addr), old_port, port);
    out[50..52].copy_from_slice(&tcp_sum.to_be_bytes());
}

/// A template frame for `prepare_frame` (flow 0).
pub(crate) fn flow_template() -> Vec<u8> {
    let (addr, port) = flow_client(0);
    tcp_frame(0, addr, port, VIP, 80)
}

/// [`flow_template`] as a SYN (the first packet of a connection) instead of
/// an ACK.
pub(crate) fn syn_template() -> Vec<u8> {
    let mut f = flow_template();
    f[14 + 20 + 13] = 0x02;
    let (src, _) = flow_client(0);
    tcp::Packet::new_unchecked(&mut f[14 + 20..14 + 40]).fill_checksum(src, VIP);
    f
}

/// Runs `flows` flows once through the pipeline, so they are established.
pub(crate) fn warm(pipe: &mut Pipeline, snap: &Snapshot, template: &[u8], flows: u32) {
    let mut frames = vec![vec![0u8; template.len()]; BURST];
    let mut verdicts = [Verdict::Consumed; BURST];
    let mut id = 0;
    while id < flows {
        let n = (flows - id).min(BURST as u32) as usize;
        for (j, f) in frames.iter_mut().take(n).enumerate() {
            prepare_frame(template, f, id + j as u32);
        }
        let mut pkts: arrayvec::ArrayVec<RxPacket<'_>, BURST> =
            frames.iter_mut().take(n).map(|f| RxPacket::new(0, &mut f[..])).collect();
        pipe.process(snap, 1, &mut pkts, &mut verdicts[..n]);
        id += n as u32;
    }
}
