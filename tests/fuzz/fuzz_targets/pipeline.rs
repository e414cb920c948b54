//! Fuzz target: `Pipeline::process` over arbitrary bursts on two workers.
//!
//! The input is a list of operations (see `Op`): bursts of frames built
//! from a few chosen fields (client to a service, backend reply, FullNAT
//! reply, ARP, ICMP, IPv6, traffic to the gateway, other protocols,
//! fragments) or taken as raw bytes, time steps, housekeeping passes and
//! snapshot swaps. The fixture is realistic: three ports (two with a kernel
//! interface), a static route, a permanent neighbour, nat, fullnat and dsr
//! services over TCP and UDP (one with a source list that narrows from
//! snapshot to snapshot, two with client-IP affinity), and a source pool. Hand-offs between the two
//! workers are delivered as the driver would.
//!
//! Oracles, after every operation:
//! - accounting, per worker: rx + arp_requests + fragments_released +
//!   handoff_in + from_kernel =
//!   tx + drops + consumed + handoff_out + to_kernel (the driver's side is
//!   counted here from the verdicts, the pipeline's drops and `consumed`
//!   are read from its counters and must match the verdicts reason by
//!   reason), and the per-backend active + inactive gauges add up to the
//!   flows the table holds;
//! - every transmitted frame has a valid IPv4 header checksum and, when the
//!   frame it came from had a valid one, a valid TCP, UDP or ICMP checksum
//!   (an IPIP packet: both headers and the inner transport), checked with
//!   etherparse and an Internet checksum written here, not the core's;
//! - no IPv4 packet with a martian source address (RFC 1812 5.3.7: 0/8,
//!   127/8, 224/4, 240/4, a port subnet's directed broadcast, the gateway's
//!   port addresses, a VIP; computed here from the fixture's spec) is ever
//!   transmitted;
//! - verdicts keep their contract: a transmit port exists, a punt goes to
//!   the ingress port's kernel interface, hand-offs name another worker and
//!   leave the frame unchanged, solicitations come from a port's address.
#![no_main]

use std::sync::{Arc, OnceLock};

use etherparse::{Ipv4HeaderSlice, TcpHeaderSlice, UdpHeaderSlice};
use libfuzzer_sys::fuzz_target;
use vipgate_dataplane::admission::NewFlowLimit;
use vipgate_dataplane::counters::{DropReason, WorkerCounters};
use vipgate_dataplane::pipeline::{NoPrefetch, Pipeline, PipelineConfig, RxPacket, Verdict, worker_inboxes};
use vipgate_dataplane::snapshot::{
    Affinity, BackendSpec, ForwardingMode, Ipv4Cidr, NeighbourSpec, OnBackendRemoval, PortSpec, Protocol, RouteSpec,
    ServiceSpec, Snapshot, SnapshotSpec, SourcePoolSpec,
};
use vipgate_dataplane::wire::EthernetAddress;
use vipgate_fuzz::{Input, internet_checksum};

const fn ip(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

const WORKERS: usize = 2;
const HEADROOM: usize = 64;
const MAX_BURST: usize = 32;
const NS: u64 = 1;
const MS: u64 = 1_000_000 * NS;
const S: u64 = 1_000 * MS;

const PORT_MACS: [[u8; 6]; 3] = [[0x02, 0xaa, 0, 0, 0, 1], [0x02, 0xaa, 0, 0, 0, 2], [0x02, 0xaa, 0, 0, 0, 3]];
const KERNEL_PORTS: [bool; 3] = [true, true, false];
const CLIENT_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 2];
const ROUTER: u32 = ip(198, 18, 0, 254);
const VIP1: u32 = ip(198, 18, 100, 1);
const VIP2: u32 = ip(198, 18, 100, 2);
const VIP3: u32 = ip(198, 18, 100, 3);
const POOL: [u32; 2] = [ip(198, 18, 1, 100), ip(198, 18, 1, 101)];
/// Few source ports (32 per worker and address), so that a burst can use
/// them up (snat_exhausted) and the workers' rebuilds stay cheap.
const POOL_PORTS: (u16, u16) = (10000, 10063);

/// Backends (address, port) of each service, in the full snapshot.
const WEB: [(u32, u16); 3] = [(ip(198, 18, 1, 11), 8080), (ip(198, 18, 1, 12), 8080), (ip(198, 18, 1, 13), 8080)];
const DNS: [(u32, u16); 2] = [(ip(198, 18, 1, 11), 5353), (ip(198, 18, 1, 12), 5353)];
const FNAT: [(u32, u16); 2] = [(ip(198, 18, 1, 21), 8443), (ip(198, 18, 1, 22), 8443)];
const DSR: [(u32, u16); 2] = [(ip(198, 18, 1, 31), 80), (ip(198, 18, 1, 32), 80)];
const FAR: [(u32, u16); 1] = [(ip(198, 19, 7, 7), 8080)];

/// Addresses frames are built from: clients near and far, the router,
/// backends, and every kind of martian.
const ADDRS: [u32; 36] = [
    ip(198, 18, 0, 2),
    ip(198, 18, 0, 3),
    ip(198, 19, 5, 5),
    ip(203, 0, 113, 9),
    ROUTER,
    ip(198, 18, 1, 11),
    ip(198, 18, 1, 12),
    ip(198, 18, 1, 13),
    ip(198, 18, 1, 21),
    ip(198, 18, 1, 22),
    ip(198, 18, 1, 31),
    ip(198, 18, 1, 32),
    ip(198, 19, 7, 7),
    ip(198, 18, 2, 5),
    VIP1,
    VIP2,
    VIP3,
    ip(198, 18, 100, 9),
    ip(198, 18, 0, 1),
    ip(198, 18, 1, 1),
    ip(198, 18, 2, 1),
    ip(198, 18, 3, 1),
    ip(198, 18, 0, 255),
    ip(198, 18, 1, 255),
    ip(198, 18, 2, 15),
    ip(198, 18, 3, 3),
    ip(255, 255, 255, 255),
    ip(0, 0, 0, 0),
    ip(0, 1, 2, 3),
    ip(127, 0, 0, 1),
    ip(224, 0, 0, 5),
    ip(239, 1, 2, 3),
    ip(240, 0, 0, 1),
    POOL[0],
    POOL[1],
    ip(198, 18, 0, 0),
];
const L4_PORTS: [u16; 12] = [80, 53, 443, 8080, 5353, 8443, 179, 22, 3784, 40000, 10000, 10040];

fn backends(list: &[(u32, u16)], weights: &[u32]) -> Vec<BackendSpec> {
    list.iter()
        .zip(weights)
        .map(|(&(addr, port), &weight)| BackendSpec { addr, port, weight, stats_slot: slot_of(addr, port) })
        .collect()
}

/// A stats slot per backend, unique among the fixture's, within 64 slots.
fn slot_of(addr: u32, port: u16) -> u32 {
    (addr & 0x3f) ^ u32::from(port % 7)
}

fn service(name: &str, vip: u32, port: u16, protocol: Protocol, b: Vec<BackendSpec>) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        vip,
        port,
        protocol,
        table_size: 251,
        backends: b,
        on_backend_removal: OnBackendRemoval::Rehash,
        mode: ForwardingMode::Nat,
        new_flow_limit: None,
        source_ranges: Vec::new(),
        affinity: Default::default(),
    }
}

/// The fixture's spec; `variant` 0 is the full one, 1 takes backends away
/// (rehash and reset paths), 2 drains or removes more (no backend, a pool
/// with other ports).
fn spec(variant: u8) -> SnapshotSpec {
    let port = |name: &str, mac: [u8; 6], addresses: Vec<Ipv4Cidr>, mtu| PortSpec {
        name: name.into(),
        mac: EthernetAddress(mac),
        addresses,
        mtu,
        vlan: None,
    };
    let (web_w, dns_w, fnat_w, dsr_w): (&[u32], &[u32], &[u32], &[u32]) = match variant {
        0 => (&[1, 1, 2], &[1, 1], &[1, 1], &[1, 1]),
        1 => (&[0, 1, 2], &[1], &[1], &[1, 1]),
        _ => (&[1], &[], &[0, 1], &[0, 0]),
    };
    let mut web = service("web", VIP1, 80, Protocol::Tcp, backends(&WEB, web_w));
    let mut dns = service("dns", VIP1, 53, Protocol::Udp, backends(&DNS, dns_w));
    dns.on_backend_removal = OnBackendRemoval::Reset;
    // A few new flows a second per /24, so that sources run over it.
    let limit = NewFlowLimit { per_second: 5, burst: 3, prefix_len: 24 };
    dns.new_flow_limit = Some(limit);
    if variant == 2 {
        web.on_backend_removal = OnBackendRemoval::Reset;
    }
    // The source list narrows from variant to variant (source_denied, and
    // tracked flows of sources no longer served are cut).
    web.source_ranges = match variant {
        0 => vec![],
        1 => vec![Ipv4Cidr { addr: ip(198, 18, 0, 0), len: 24 }, Ipv4Cidr { addr: ip(203, 0, 113, 0), len: 24 }],
        _ => vec![Ipv4Cidr { addr: ip(198, 18, 0, 2), len: 32 }],
    };
    let mut fnat = service("fnat", VIP2, 443, Protocol::Tcp, backends(&FNAT, fnat_w));
    fnat.mode = ForwardingMode::FullNat { pool: "pool".into() };
    fnat.new_flow_limit = Some(NewFlowLimit { prefix_len: 32, ..limit });
    fnat.affinity = Affinity::ClientIp;
    let mut fnat_udp = service("fnat-udp", VIP2, 53, Protocol::Udp, backends(&FNAT, &[1, 1]));
    fnat_udp.mode = ForwardingMode::FullNat { pool: "pool".into() };
    let mut dsr = service("dsr", VIP3, 80, Protocol::Tcp, backends(&DSR, dsr_w));
    dsr.mode = ForwardingMode::Dsr { tunnel_source: None };
    let mut dsr_udp = service("dsr-udp", VIP3, 53, Protocol::Udp, backends(&[(DSR[0].0, 53), (DSR[1].0, 53)], &[1, 1]));
    dsr_udp.mode = ForwardingMode::Dsr { tunnel_source: Some(Ipv4Cidr { addr: ip(198, 18, 1, 64), len: 28 }) };
    dsr_udp.affinity = Affinity::ClientIp;
    let far = service("far", VIP2, 80, Protocol::Tcp, backends(&FAR, &[1]));
    let last_port = if variant == 2 { POOL_PORTS.1 - 16 } else { POOL_PORTS.1 };
    SnapshotSpec {
        ports: vec![
            port("client", PORT_MACS[0], vec![Ipv4Cidr { addr: ip(198, 18, 0, 1), len: 24 }], 1500),
            port("backend", PORT_MACS[1], vec![Ipv4Cidr { addr: ip(198, 18, 1, 1), len: 24 }], 1500),
            port(
                "extra",
                PORT_MACS[2],
                vec![Ipv4Cidr { addr: ip(198, 18, 2, 1), len: 28 }, Ipv4Cidr { addr: ip(198, 18, 3, 1), len: 30 }],
                1400,
            ),
        ],
        routes: vec![RouteSpec { prefix: Ipv4Cidr { addr: ip(198, 19, 0, 0), len: 16 }, via: ROUTER }],
        neighbours: vec![NeighbourSpec { addr: ip(198, 18, 1, 13), mac: EthernetAddress([0x02, 0xbb, 0, 0, 0, 13]) }],
        services: [web, dns, fnat, fnat_udp, dsr, dsr_udp, far].into_iter().map(std::sync::Arc::new).collect(),
        source_pools: vec![SourcePoolSpec {
            name: "pool".into(),
            addresses: POOL.to_vec(),
            first_port: POOL_PORTS.0,
            last_port,
        }],
    }
}

struct Fixture {
    snaps: Vec<Snapshot>,
    /// Each snapshot's port addresses, by port.
    port_addresses: Vec<Vec<Vec<u32>>>,
    /// Martian sources of each snapshot, as the oracle computes them.
    martians: Vec<Martians>,
}

/// The martian source addresses of a snapshot (RFC 1812 5.3.7) besides the
/// fixed ranges: the ports' directed broadcasts, the ports' addresses, the
/// VIPs.
struct Martians {
    exact: Vec<u32>,
}

impl Martians {
    fn of(spec: &SnapshotSpec) -> Martians {
        let mut exact = Vec::new();
        for p in &spec.ports {
            for a in &p.addresses {
                exact.push(a.addr);
                // /31 and /32 have no broadcast address (RFC 3021).
                if a.len <= 30 {
                    exact.push(a.addr | (u32::MAX >> a.len));
                }
            }
        }
        exact.extend(spec.services.iter().map(|s| s.vip));
        Martians { exact }
    }

    fn contains(&self, addr: u32) -> bool {
        let first = addr >> 24;
        first == 0 || first == 127 || first >= 224 || self.exact.contains(&addr)
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let specs: Vec<SnapshotSpec> = (0..3).map(spec).collect();
        Fixture {
            snaps: specs.iter().map(|s| Snapshot::build(s).expect("the fixture's snapshot builds")).collect(),
            port_addresses: specs
                .iter()
                .map(|s| s.ports.iter().map(|p| p.addresses.iter().map(|a| a.addr).collect()).collect())
                .collect(),
            martians: specs.iter().map(Martians::of).collect(),
        }
    })
}

/// What the driver counted for one worker (its side of the identity), and
/// the verdicts the pipeline gave.
#[derive(Default)]
struct Driver {
    rx: u64,
    tx: u64,
    arp_requests: u64,
    released: u64,
    handoff_in: u64,
    handoff_out: u64,
    to_kernel: u64,
    drops: [u64; DropReason::COUNT],
    consumed: u64,
}

struct Worker {
    pipe: Pipeline,
    counters: Arc<WorkerCounters>,
    driver: Driver,
    /// Frames other workers handed to this one: (ingress port, frame).
    inbox: Vec<(u16, Vec<u8>)>,
}

/// A received frame as the oracle needs it after processing.
struct Sent {
    port: u16,
    frame: Vec<u8>,
}

struct Rig {
    workers: Vec<Worker>,
    snap: usize,
    now: u64,
}

impl Rig {
    fn new() -> Rig {
        let inboxes = worker_inboxes(WORKERS);
        // Small tables, so that evictions and a full pool are reached and
        // each run builds its rig quickly; fixed seeds, so that a crash
        // replays exactly.
        let config = PipelineConfig {
            flow_capacity: 256,
            neighbour_capacity: 64,
            backend_slots: 64,
            new_flow_sketch_width: 64,
            seed: Some(0x5eed),
            ..Default::default()
        };
        let workers = (0..WORKERS)
            .map(|w| {
                let counters = Arc::new(WorkerCounters::default());
                let mut pipe = Pipeline::new(config, Arc::clone(&counters));
                pipe.set_worker(w, WORKERS);
                pipe.join_workers(&inboxes, w);
                pipe.set_kernel_ports(&KERNEL_PORTS);
                Worker { pipe, counters, driver: Driver::default(), inbox: Vec::new() }
            })
            .collect();
        Rig { workers, snap: 0, now: S }
    }

    fn snap(&self) -> &'static Snapshot {
        &fixture().snaps[self.snap]
    }

    /// Runs a burst on worker `w` (`handed`: frames handed over by others),
    /// checks each verdict and queues hand-offs on their owners.
    fn burst(&mut self, w: usize, frames: Vec<Sent>, handed: bool) {
        let snap = self.snap();
        let martians = &fixture().martians[self.snap];
        let mut bufs: Vec<Vec<u8>> = frames
            .iter()
            .map(|s| {
                let mut b = vec![0u8; HEADROOM];
                b.extend_from_slice(&s.frame);
                b
            })
            .collect();
        let mut verdicts = vec![Verdict::Handoff(u16::MAX); frames.len()];
        let now = self.now;
        let worker = &mut self.workers[w];
        let mut outs: Vec<(usize, Vec<u8>)> = Vec::with_capacity(frames.len());
        {
            let mut pkts: Vec<RxPacket<'_>> =
                bufs.iter_mut().zip(&frames).map(|(b, s)| RxPacket::with_headroom(s.port, b, HEADROOM)).collect();
            if handed {
                worker.pipe.process_handed_over(snap, now, &mut pkts, &mut verdicts, &NoPrefetch);
            } else {
                worker.pipe.process(snap, now, &mut pkts, &mut verdicts);
            }
            for p in &pkts {
                outs.push((p.headroom(), p.frame().to_vec()));
            }
        }
        let d = &mut worker.driver;
        if handed {
            d.handoff_in += frames.len() as u64;
        } else {
            d.rx += frames.len() as u64;
        }
        let mut handoffs = Vec::new();
        for ((input, verdict), (headroom, out)) in frames.iter().zip(&verdicts).zip(outs) {
            let unchanged = headroom == HEADROOM && out == input.frame;
            match *verdict {
                Verdict::Transmit(port) => {
                    assert!(usize::from(port) < snap.ports().len(), "transmit on port {port}, which does not exist");
                    d.tx += 1;
                    check_transmitted(&input.frame, &out, martians);
                }
                Verdict::Drop(reason) => d.drops[reason as usize] += 1,
                Verdict::Consumed => d.consumed += 1,
                Verdict::Handoff(to) => {
                    assert!(to != u16::MAX, "a packet got no verdict");
                    assert!(!handed, "a handed-over packet was handed on to {to}");
                    assert!(usize::from(to) < WORKERS && usize::from(to) != w, "hand-off from {w} to {to}");
                    assert!(unchanged, "a handed-off frame was changed");
                    d.handoff_out += 1;
                    handoffs.push((usize::from(to), input.port, out));
                }
                Verdict::Punt(port) | Verdict::PuntControl(port) => {
                    assert_eq!(port, input.port, "punted to another port than the ingress one");
                    assert!(KERNEL_PORTS[usize::from(port)], "punted on port {port}, which has no kernel interface");
                    assert!(unchanged, "a punted frame was changed");
                    d.to_kernel += 1;
                }
            }
        }
        for (to, port, frame) in handoffs {
            self.workers[to].inbox.push((port, frame));
        }
        self.solicitations(w);
    }

    /// Delivers every pending hand-off, as the owners' loops would.
    fn deliver(&mut self) {
        for w in 0..WORKERS {
            let frames: Vec<Sent> = std::mem::take(&mut self.workers[w].inbox)
                .into_iter()
                .map(|(port, frame)| Sent { port, frame })
                .collect();
            if !frames.is_empty() {
                self.burst(w, frames, true);
            }
        }
    }

    /// The driver sends the ARP requests the worker asked for.
    fn solicitations(&mut self, w: usize) {
        let (snap, variant) = (self.snap(), self.snap);
        let worker = &mut self.workers[w];
        for s in worker.pipe.take_solicitations() {
            let port = &snap.ports()[usize::from(s.port)];
            assert_eq!(s.sender_mac, port.mac, "solicitation's sender MAC");
            assert!(
                fixture().port_addresses[variant][usize::from(s.port)].contains(&s.sender_ip),
                "solicitation from {:#x}, not an address of port {}",
                s.sender_ip,
                s.port
            );
            worker.driver.arp_requests += 1;
            worker.driver.tx += 1;
        }
        // And the fragments that waited for their first.
        let driver = &mut worker.driver;
        worker.pipe.drain_released(|port, frame| {
            assert!(usize::from(port) < snap.ports().len(), "a released fragment's port");
            assert!(frame.len() >= 34, "a released fragment is an IPv4 frame");
            driver.released += 1;
            driver.tx += 1;
        });
    }

    fn housekeeping(&mut self, passes: usize) {
        let (snap, now) = (self.snap(), self.now);
        for w in 0..WORKERS {
            for _ in 0..passes {
                self.workers[w].pipe.housekeeping(snap, now);
            }
            self.solicitations(w);
        }
    }

    /// The accounting identity of every worker, and the flow gauges.
    fn check_accounting(&self) {
        for (w, worker) in self.workers.iter().enumerate() {
            let c = &worker.counters;
            let d = &worker.driver;
            for r in DropReason::ALL {
                assert_eq!(c.drops(r), d.drops[r as usize], "worker {w}: drops counted as {} vs verdicts", r.name());
            }
            assert_eq!(c.consumed.get(), d.consumed, "worker {w}: consumed counted vs verdicts");
            assert_eq!(c.fragments_released.get(), d.released, "worker {w}: released fragments counted vs sent");
            let left = d.rx + d.arp_requests + d.released + d.handoff_in;
            let right = d.tx + c.total_drops() + c.consumed.get() + d.handoff_out + d.to_kernel;
            assert_eq!(
                left, right,
                "worker {w}: rx + arp_requests + handoff_in + from_kernel != tx + drops + consumed + handoff_out + to_kernel"
            );
            let stats = worker.pipe.backend_stats();
            let (active, inactive) = (0..stats.capacity() as u32)
                .map(|s| stats.read(s))
                .fold((0, 0), |(a, i), t| (a + t.active, i + t.inactive));
            assert_eq!(
                active + inactive,
                worker.pipe.flows().occupied() as u64,
                "worker {w}: active {active} + inactive {inactive} gauges vs flows in the table"
            );
        }
    }
}

/// The IPv4 packet of an untagged Ethernet frame, if it is one.
fn ipv4_of(frame: &[u8]) -> Option<&[u8]> {
    (frame.len() >= 14 + 20 && frame[12..14] == [0x08, 0x00]).then(|| &frame[14..])
}

/// Whether the transport checksum of an IPv4 packet is right (`None` when
/// it cannot be checked: no TCP, UDP or ICMP, a fragment, truncated).
fn l4_checksum_ok(packet: &[u8]) -> Option<bool> {
    let h = Ipv4HeaderSlice::from_slice(packet).ok()?;
    if h.is_fragmenting_payload() {
        return None;
    }
    let total = usize::from(h.total_len());
    let hl = h.slice().len();
    if total < hl || total > packet.len() {
        return None;
    }
    let l4 = &packet[hl..total];
    let header = h.to_header();
    match h.protocol() {
        etherparse::IpNumber::TCP => {
            let t = TcpHeaderSlice::from_slice(l4).ok()?;
            let payload = &l4[t.slice().len()..];
            Some(t.to_header().calc_checksum_ipv4(&header, payload).ok()? == t.checksum())
        }
        etherparse::IpNumber::UDP => {
            let u = UdpHeaderSlice::from_slice(l4).ok()?;
            if u.checksum() == 0 {
                return Some(true);
            }
            let payload = l4.get(8..usize::from(u.length()))?;
            Some(u.to_header().calc_checksum_ipv4(&header, payload).ok()? == u.checksum())
        }
        etherparse::IpNumber::ICMP => Some(internet_checksum(l4) == 0),
        _ => None,
    }
}

/// The oracle on one transmitted frame (`input`: the frame as received).
fn check_transmitted(input: &[u8], out: &[u8], martians: &Martians) {
    if let Some(packet) = ipv4_of(input) {
        let src = u32::from_be_bytes([packet[12], packet[13], packet[14], packet[15]]);
        assert!(
            !martians.contains(src),
            "a packet from martian source {} was transmitted",
            std::net::Ipv4Addr::from(src)
        );
    }
    let Some(packet) = ipv4_of(out) else { return };
    let h = Ipv4HeaderSlice::from_slice(packet).expect("a transmitted IPv4 header parses");
    assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum(), "transmitted IPv4 header checksum");
    let input_ok = ipv4_of(input).and_then(l4_checksum_ok);
    if h.protocol() == etherparse::IpNumber::IPV4 {
        // DSR: IPIP around the client's packet.
        let inner = &packet[h.slice().len()..usize::from(h.total_len())];
        let ih = Ipv4HeaderSlice::from_slice(inner).expect("the inner IPv4 header parses");
        assert_eq!(ih.header_checksum(), ih.to_header().calc_header_checksum(), "inner IPv4 header checksum");
        if input_ok == Some(true) {
            assert_eq!(l4_checksum_ok(inner), Some(true), "inner transport checksum");
        }
        return;
    }
    // A packet the gateway built in answer to another protocol (ICMP
    // "fragmentation needed") must be right whatever came in; one forwarded
    // or answered in place keeps a right checksum right.
    let input_proto = ipv4_of(input).filter(|p| p.len() > 9).map(|p| p[9]);
    let built = input_proto != Some(h.protocol().0);
    if (built || input_ok == Some(true))
        && let Some(ok) = l4_checksum_ok(packet)
    {
        assert!(ok, "transmitted transport checksum (protocol {:?}, input's {input_ok:?})", h.protocol());
    }
}

/// Builds frames from a few chosen fields.
struct Build<'a, 'b> {
    input: &'a mut Input<'b>,
}

fn pseudo_sum(src: u32, dst: u32, proto: u8, l4: &[u8]) -> u16 {
    let mut buf = Vec::with_capacity(12 + l4.len());
    buf.extend_from_slice(&src.to_be_bytes());
    buf.extend_from_slice(&dst.to_be_bytes());
    buf.extend_from_slice(&[0, proto]);
    buf.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    buf.extend_from_slice(l4);
    internet_checksum(&buf)
}

impl Build<'_, '_> {
    fn addr(&mut self) -> u32 {
        match self.input.u8() {
            255 => self.input.u32(),
            i => ADDRS[usize::from(i) % ADDRS.len()],
        }
    }

    fn l4_port(&mut self) -> u16 {
        match self.input.u8() {
            255 => self.input.u16(),
            254 => POOL_PORTS.0 + self.input.u16() % (POOL_PORTS.1 - POOL_PORTS.0 + 1),
            i => L4_PORTS[usize::from(i) % L4_PORTS.len()],
        }
    }

    /// The destination MAC: mostly the ingress port's.
    fn dst_mac(&mut self, port: u16) -> [u8; 6] {
        match self.input.u8() % 8 {
            0 => [0xff; 6],
            1 => [0x01, 0x00, 0x5e, 0, 0, 5],
            2 => [0x02, 0xee, 0, 0, 0, 9],
            3 => PORT_MACS[usize::from(port + 1) % PORT_MACS.len()],
            _ => PORT_MACS[usize::from(port)],
        }
    }

    fn payload(&mut self) -> Vec<u8> {
        let len = match self.input.u8() {
            0..=199 => 0,
            200..=249 => usize::from(self.input.u8()),
            // Around the MTU, for DSR's "fragmentation needed".
            _ => 1400 + usize::from(self.input.u8()),
        };
        (0..len).map(|i| i as u8).collect()
    }

    /// An IPv4 frame around `l4` (whose checksum is filled in here unless
    /// `proto` has none we know).
    fn ipv4(&mut self, port: u16, src: u32, dst: u32, proto: u8, mut l4: Vec<u8>) -> Vec<u8> {
        let shape = self.input.u8();
        let ttl = [64, 1, 0, 2, 255, 64, 64, 64][usize::from(shape & 7)];
        // Bits 3-4: DF, MF / offset (a fragment); bit 5: options.
        let frag: u16 = match (shape >> 3) & 3 {
            0 | 1 => 0,
            2 => 0x4000,
            _ => [0x2000, 0x0010, 0x2010, 0x4000][usize::from(self.input.u8() & 3)],
        };
        let options: &[u8] = if shape & 0x20 != 0 { &[1, 1, 1, 0] } else { &[] };
        let csum_offset = match proto {
            6 => Some(16),
            17 => Some(6),
            1 => Some(2),
            _ => None,
        };
        if let Some(o) = csum_offset
            && l4.len() >= o + 2
        {
            l4[o..o + 2].copy_from_slice(&[0, 0]);
            let c = if proto == 1 { internet_checksum(&l4) } else { pseudo_sum(src, dst, proto, &l4) };
            let c = if proto == 17 && c == 0 { 0xffff } else { c };
            l4[o..o + 2].copy_from_slice(&c.to_be_bytes());
        }
        let hl = 20 + options.len();
        let mut f = Vec::with_capacity(14 + hl + l4.len());
        f.extend_from_slice(&self.dst_mac(port));
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        f.push(0x40 | (hl / 4) as u8);
        f.push(0);
        f.extend_from_slice(&((hl + l4.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34]);
        f.extend_from_slice(&frag.to_be_bytes());
        f.push(ttl);
        f.push(proto);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&src.to_be_bytes());
        f.extend_from_slice(&dst.to_be_bytes());
        f.extend_from_slice(options);
        let c = internet_checksum(&f[14..14 + hl]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&l4);
        f
    }

    fn tcp(&mut self, sport: u16, dport: u16) -> Vec<u8> {
        let flags = match self.input.u8() {
            0..=63 => 0x02,   // SYN
            64..=127 => 0x10, // ACK
            128..=159 => 0x18,
            160..=175 => 0x11, // FIN ACK
            176..=191 => 0x04, // RST
            192..=199 => 0x12, // SYN ACK
            _ => self.input.u8(),
        };
        let mut t = Vec::with_capacity(20);
        t.extend_from_slice(&sport.to_be_bytes());
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&1000u32.to_be_bytes());
        t.extend_from_slice(&1u32.to_be_bytes());
        t.extend_from_slice(&[0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
        t.extend_from_slice(&self.payload());
        t
    }

    fn udp(&mut self, sport: u16, dport: u16) -> Vec<u8> {
        let payload = self.payload();
        let mut u = Vec::with_capacity(8 + payload.len());
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(&payload);
        u
    }

    fn arp(&mut self, port: u16, op: u16, sender: u32, target: u32) -> Vec<u8> {
        let sha = if self.input.u8() & 1 == 0 { CLIENT_MAC } else { [0x02, 0xbb, 0, 0, 0, sender as u8] };
        let dst = if op == 1 { [0xff; 6] } else { self.dst_mac(port) };
        let mut f = Vec::with_capacity(42);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&sha);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4]);
        f.extend_from_slice(&op.to_be_bytes());
        f.extend_from_slice(&sha);
        f.extend_from_slice(&sender.to_be_bytes());
        f.extend_from_slice(if op == 1 { &[0; 6] } else { &PORT_MACS[usize::from(port)] });
        f.extend_from_slice(&target.to_be_bytes());
        f
    }

    /// One frame and its ingress port.
    fn frame(&mut self) -> Sent {
        let port = u16::from(self.input.u8() % 3);
        let kind = self.input.u8() % 14;
        let mut frame = match kind {
            // A client to a service (any address, any port).
            0..=2 => {
                let (src, dst) = (self.addr(), self.addr());
                let (sport, dport) = (self.l4_port(), self.l4_port());
                if kind == 1 {
                    let l4 = self.udp(sport, dport);
                    self.ipv4(port, src, dst, 17, l4)
                } else {
                    let l4 = self.tcp(sport, dport);
                    self.ipv4(port, src, dst, 6, l4)
                }
            }
            // A backend's reply (nat) or a FullNAT reply to the pool.
            3 | 4 => {
                let (src, dst) = (self.addr(), self.addr());
                let (sport, dport) = (self.l4_port(), self.l4_port());
                let l4 = if self.input.u8() & 1 == 0 { self.tcp(sport, dport) } else { self.udp(sport, dport) };
                self.ipv4(port, src, dst, if l4.len() >= 20 && kind == 3 { 6 } else { 17 }, l4)
            }
            // ICMP: echo requests and other types.
            5 => {
                let (src, dst) = (self.addr(), self.addr());
                let ty = if self.input.u8() < 200 { 8 } else { self.input.u8() };
                let mut l4 = vec![ty, 0, 0, 0, 0x12, 0x34, 0, 1];
                l4.extend_from_slice(&self.payload());
                self.ipv4(port, src, dst, 1, l4)
            }
            // ARP requests and replies.
            6 | 7 => {
                let (sender, target) = (self.addr(), self.addr());
                self.arp(port, if kind == 6 { 1 } else { 2 }, sender, target)
            }
            // IPv6 (neighbour discovery or not).
            8 => {
                let mut f = self.dst_mac(port).to_vec();
                f.extend_from_slice(&CLIENT_MAC);
                f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 8, 58, 255]);
                f.extend_from_slice(&[0; 32]);
                f.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
                f
            }
            // Other IP protocols (GRE, OSPF, IPIP).
            9 => {
                let (src, dst) = (self.addr(), self.addr());
                let proto = self.input.pick(&[47, 89, 4, 112]);
                let l4 = self.payload();
                self.ipv4(port, src, dst, proto, l4)
            }
            // Raw bytes, the destination MAC optionally made the port's.
            _ => {
                let len = usize::from(self.input.u16() % 1600);
                let mut f = self.input.bytes(len).to_vec();
                if kind < 13 && f.len() >= 6 {
                    f[..6].copy_from_slice(&PORT_MACS[usize::from(port)]);
                }
                f
            }
        };
        // A few bit flips after the checksums were computed.
        let flips = match self.input.u8() {
            0..=229 => 0,
            n => 1 + usize::from(n % 3),
        };
        for _ in 0..flips {
            let (at, x) = (usize::from(self.input.u16()), self.input.u8());
            if !frame.is_empty() {
                let i = at % frame.len();
                frame[i] ^= x;
            }
        }
        Sent { port, frame }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut rig = Rig::new();
    // Teach the first worker the usual neighbours half the time, so that
    // most inputs reach forwarding without finding ARP first.
    if input.u8() & 1 == 0 {
        let mut frames = Vec::new();
        for (port, addr, ours) in [
            (0, ip(198, 18, 0, 2), ip(198, 18, 0, 1)),
            (0, ROUTER, ip(198, 18, 0, 1)),
            (1, WEB[0].0, ip(198, 18, 1, 1)),
            (1, WEB[1].0, ip(198, 18, 1, 1)),
            (1, FNAT[0].0, ip(198, 18, 1, 1)),
            (1, FNAT[1].0, ip(198, 18, 1, 1)),
            (1, DSR[0].0, ip(198, 18, 1, 1)),
            (1, DSR[1].0, ip(198, 18, 1, 1)),
        ] {
            let mut f = Vec::with_capacity(42);
            f.extend_from_slice(&PORT_MACS[port]);
            f.extend_from_slice(&[0x02, 0xbb, 0, 0, 0, addr as u8]);
            f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
            f.extend_from_slice(&[0x02, 0xbb, 0, 0, 0, addr as u8]);
            f.extend_from_slice(&addr.to_be_bytes());
            f.extend_from_slice(&PORT_MACS[port]);
            f.extend_from_slice(&ours.to_be_bytes());
            frames.push(Sent { port: port as u16, frame: f });
        }
        rig.burst(0, frames, false);
    }
    let mut ops = 0;
    while !input.is_empty() && ops < 64 {
        ops += 1;
        match input.u8() % 8 {
            0..=3 => {
                let w = input.choose(WORKERS);
                let n = 1 + input.choose(MAX_BURST);
                let frames: Vec<Sent> = (0..n).map(|_| Build { input: &mut input }.frame()).collect();
                rig.burst(w, frames, false);
                rig.deliver();
            }
            4 => {
                // Time goes forward: milliseconds, seconds, or past every
                // flow and neighbour timeout.
                let step = match input.u8() % 4 {
                    0 => u64::from(input.u16()) * MS,
                    1 | 2 => u64::from(input.u8()) * S,
                    _ => u64::from(input.u16()) * S,
                };
                rig.now += step;
            }
            5 => {
                // A few passes, or as many as sweep the whole flow table
                // (the sweep is the costly part of an input).
                let passes = match input.u8() {
                    n @ 0..=239 => 1 + usize::from(n % 4),
                    _ => 100,
                };
                rig.housekeeping(passes);
            }
            6 => rig.snap = input.choose(fixture().snaps.len()),
            _ => {
                // A single client packet on the worker that owns it is the
                // most common case: a burst of one.
                let w = input.choose(WORKERS);
                let f = Build { input: &mut input }.frame();
                rig.burst(w, vec![f], false);
                rig.deliver();
            }
        }
        rig.check_accounting();
    }
});
