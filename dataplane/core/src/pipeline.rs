//! The per-burst packet step: classify, look up, translate, pick the next
//! hop, rewrite, and return a verdict per packet.
//!
//! Owns: the forwarding decision for one worker, and that worker's neighbour
//! and connection-tracking tables. It rewrites frames in place (NAT never
//! changes a frame's length) and never allocates, locks, logs or reads a
//! clock: time comes in as `now` (nanoseconds, monotonic). Must not touch
//! mbufs, ports or queues: the driver does that with the verdicts.
//!
//! A frame is this port's business only if its destination MAC is the
//! port's own or a group address; a unicast frame for any other MAC (which
//! a bridge floods to every port while it does not know where that MAC is)
//! is dropped as [`DropReason::OtherHost`] before anything else.
//!
//! An IPv4 packet from a martian source (RFC 1812 5.3.7, see
//! [`Snapshot::is_martian_source`]) is dropped as
//! [`DropReason::MartianSource`] right after its IPv4 header is validated:
//! every rule that forwards, translates back, answers (echo reply, RST,
//! ICMP "fragmentation needed"), tracks or punts comes after that check,
//! so nothing the fast path emits carries or answers such a packet. (A
//! packet handed to another worker is checked there, before any of them.)
//! The kernel keeps the one martian it needs: from 0.0.0.0, an unconfigured
//! host (DHCP discovery, IGMP reports), to a multicast or broadcast address
//! on a port with a kernel interface, punted as before. A TCP segment with
//! flags no connection can carry (SYN+FIN, SYN+RST, FIN without ACK, none)
//! is dropped as [`DropReason::BadTcpFlags`] as soon as its header is
//! read, whichever way it goes, before any flow is created or changed.
//!
//! A client packet to a service goes to the flow's backend: the one its
//! tracked flow already has, or for a new flow the one Maglev picks on the
//! stable flow hash, decided in one place (`Pipeline::new_flow`). Not
//! every packet starts a flow: with nat and dsr a client's SYN is forwarded
//! but not tracked (its source may be spoofed, and a flood must not take
//! the table), and the client's first ACK, or any later segment, starts the
//! flow on the same choice; FullNAT needs the flow (and its source pair)
//! from the SYN and tracks it half-open, in a slot that never evicts an
//! established flow. A SYN on a tracked flow that is over (FIN or RST
//! seen) or whose backend takes no new flows opens a new connection on a
//! reused client port: the old flow is forgotten and the SYN decided anew.
//! How a packet gets to its backend is the service's mode:
//!
//! - nat: the destination becomes the backend. Replies from a backend
//!   address:port are translated back to the VIP:port found in the
//!   snapshot's reverse map (derived from configuration, not from per-flow
//!   state, so any gateway with the same configuration can translate them).
//! - fullnat: the source also becomes a pair from the worker's slice of the
//!   service's source pool (see [`crate::snat`]); replies to that pair are
//!   translated back through the pair's binding.
//! - dsr: the frame is encapsulated in IPv4 (IPIP) to the backend, which
//!   answers the client directly. The only change of length the pipeline
//!   makes: 20 bytes prepended into the headroom the driver left.
//!
//! A tracked TCP flow also follows the reply's FIN and RST.
//!
//! A service may limit the new flows each client source opens (see
//! [`crate::admission`]): a packet that would start a flow over that limit
//! is dropped as [`DropReason::RateLimited`]; packets of tracked flows are
//! never limited.
//!
//! A service may serve only some client prefixes (its source list, see
//! [`crate::sources`]): every client packet to it from another source,
//! whether or not a flow tracks it, is dropped as
//! [`DropReason::SourceDenied`] after the TTL check and before any flow is
//! created or changed; a flow it had is forgotten, so narrowing the list
//! cuts the connections of the sources it no longer serves at once, as a
//! firewall does. Replies from backends are not checked.
//!
//! A service with client-IP affinity hashes the client's address, not its
//! 5-tuple, into Maglev: all of a client's new flows get the same backend
//! (flows are still tracked per 5-tuple, and a flow keeps its backend as
//! before).
//!
//! What the fast path does not handle and that is for the gateway itself
//! (see [`Verdict::Punt`]) goes to the kernel interface of the ingress port,
//! when it has one: the exception path.
//!
//! With several workers, each flow has one owner, computed from the client's
//! address and port (or, for a FullNAT reply, from its destination port), so
//! both directions meet the same state. A packet that arrives at another
//! worker gets [`Verdict::Handoff`] and the driver passes it to the owner.

use crate::admission::{self, NewFlowLimiter};
use crate::counters::{DropReason, WorkerCounters};
use crate::flow::{FlowEntry, FlowHash, FlowState, FlowTable, FlowTimeouts};
use crate::fragments::{FragmentKey, FragmentNote, FragmentTable, HeldFragments};
use crate::hash::{FlowKey, flow_hash};
use crate::neighbour::{NeighbourTable, NeighbourTimers};
use crate::route::NextHop;
use crate::snapshot::{Affinity, Backend, MAC_WORD_MASK, Mode, OnBackendRemoval, Service, Snapshot};
use crate::snat::{self, Binding, SnatTable};
use crate::stats::BackendStats;
use crate::wire::{self, EtherType, EthernetAddress, arp, ethernet, icmp, ipv4, ipv6, tcp, udp};
use arrayvec::ArrayVec;
use crossbeam::queue::ArrayQueue;
use std::sync::Arc;

/// Most ARP solicitations one burst (or one housekeeping pass) can ask for.
pub const MAX_SOLICITATIONS: usize = 32;

/// TTL of packets the gateway originates (echo replies).
const ORIGIN_TTL: u8 = 64;

/// One received frame: the ingress port (dense index), and its buffer:
/// free headroom, then the frame from its Ethernet header on.
#[derive(Debug)]
pub struct RxPacket<'a> {
    /// Ingress port, dense index into the snapshot's ports.
    pub port: u16,
    buf: &'a mut [u8],
    start: usize,
    end: usize,
}

impl<'a> RxPacket<'a> {
    /// A frame with no headroom (DSR encapsulation is then impossible).
    pub fn new(port: u16, frame: &'a mut [u8]) -> Self {
        let end = frame.len();
        RxPacket { port, buf: frame, start: 0, end }
    }

    /// `buf` holds `headroom` free bytes, then the frame.
    ///
    /// # Panics
    /// If `headroom` is longer than `buf`.
    pub fn with_headroom(port: u16, buf: &'a mut [u8], headroom: usize) -> Self {
        assert!(headroom <= buf.len(), "headroom {headroom} beyond a buffer of {}", buf.len());
        let end = buf.len();
        RxPacket { port, buf, start: headroom, end }
    }

    /// The frame.
    #[inline]
    pub fn frame(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The frame, mutably.
    #[inline]
    pub fn frame_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    /// Free bytes before the frame. After [`Pipeline::process`] it is
    /// smaller than it was by the bytes the pipeline prepended (20 for a DSR
    /// packet, else 0): the driver moves the frame's start back as much.
    #[inline]
    pub fn headroom(&self) -> usize {
        self.start
    }

    /// Shortens the frame to `len` bytes (an answer built in place that is
    /// shorter than the packet it answers). The driver sets the frame's
    /// length from [`RxPacket::frame`] after processing.
    fn truncate(&mut self, len: usize) {
        self.end = self.end.min(self.start + len);
    }
}

/// What to do with a frame after [`Pipeline::process`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit the (rewritten) frame on this port.
    Transmit(u16),
    /// Free it; already counted under this reason.
    Drop(DropReason),
    /// Free it; it was absorbed (an ARP reply we learned from).
    Consumed,
    /// Another worker owns this packet's flow: pass the frame, unchanged,
    /// to that worker (index among the pipelines), which processes it with
    /// [`Pipeline::process_handed_over`].
    Handoff(u16),
    /// For the gateway's kernel (the exception path): pass the frame,
    /// unchanged, to the kernel interface of this port (the ingress port).
    /// Given only on ports [`Pipeline::set_kernel_ports`] names. Punted:
    /// TCP, UDP and other IP protocols to a port address (BGP, BFD, SSH,
    /// replies to the kernel's own connections and health probes), ICMP to
    /// a port address other than the echo requests the fast path answers,
    /// IPv4 multicast and broadcast, every IPv6 frame (there is no IPv6 fast
    /// path: neighbour discovery, link-local, BGP over IPv6), and ARP replies
    /// to a port address (after the fast path learned from them: the kernel
    /// resolves its own neighbours with its own requests).
    Punt(u16),
    /// [`Verdict::Punt`] for a control protocol the gateway's kernel must
    /// never miss under a flood of other punted traffic: ARP, BGP (TCP port
    /// 179), BFD (UDP 3784, 3785, 4784), OSPF, VRRP, IPv6 neighbour
    /// discovery. The driver keeps these apart from the rest on their way to
    /// the kernel.
    PuntControl(u16),
}

/// An ARP request the driver should build and send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Solicitation {
    /// Port to send it on (a device: a VLAN interface's solicitations go
    /// out of the port carrying it, tagged).
    pub port: u16,
    /// The VLAN to tag it with, for a next hop behind a VLAN interface.
    pub vlan: Option<u16>,
    /// Our MAC on that port.
    pub sender_mac: EthernetAddress,
    /// Our address on that port's subnet.
    pub sender_ip: u32,
    /// The address to resolve.
    pub target_ip: u32,
}

/// A neighbour one worker learned, for the others. RSS hands each ARP reply
/// to one worker only; without sharing, the others would never learn it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeighbourUpdate {
    /// The neighbour's address.
    pub addr: u32,
    /// Its MAC.
    pub mac: EthernetAddress,
}

/// Entries in each worker's neighbour inbox. Updates are rare (ARP); when
/// an inbox is full the update is dropped and the peer learns the neighbour
/// from its own resolution a second later.
pub const NEIGHBOUR_INBOX: usize = 1024;

/// Entries in each worker's inbox of datagram translations (see
/// [`Pipeline::process`] on fragments). When it is full the note is lost,
/// and the datagram's later fragments wait, then are discarded.
pub const FRAGMENT_INBOX: usize = 1024;

/// What other workers tell one worker: the neighbours they learned, and
/// the translations of datagrams whose later fragments it receives.
#[derive(Debug)]
pub struct Inbox {
    neighbours: ArrayQueue<NeighbourUpdate>,
    fragments: ArrayQueue<FragmentNote>,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox { neighbours: ArrayQueue::new(NEIGHBOUR_INBOX), fragments: ArrayQueue::new(FRAGMENT_INBOX) }
    }
}

/// Creates the inboxes of `workers` pipelines: element `i` is worker `i`'s.
pub fn worker_inboxes(workers: usize) -> Vec<Arc<Inbox>> {
    (0..workers).map(|_| Arc::new(Inbox::new())).collect()
}

/// Tunables of a pipeline.
#[derive(Clone, Copy, Debug)]
pub struct PipelineConfig {
    /// Entries in the neighbour table.
    pub neighbour_capacity: usize,
    /// Neighbour timers.
    pub neighbour_timers: NeighbourTimers,
    /// Slots in the connection-tracking table (see `flow::memory_bytes`).
    pub flow_capacity: usize,
    /// Connection-tracking timeouts.
    pub flow_timeouts: FlowTimeouts,
    /// Per-backend stats slots ([`crate::stats`]) of a pipeline made with
    /// [`Pipeline::new`].
    pub backend_slots: usize,
    /// Cells per row of the new-flow limiter's sketch ([`crate::admission`]).
    pub new_flow_sketch_width: usize,
    /// Fixed seeds for the flow table's and the limiter's keyed hashes, so
    /// that a run replays exactly (tests, fuzzing, benchmarks). `None`, as
    /// a gateway runs: random seeds an attacker cannot predict.
    pub seed: Option<u64>,
    /// Entries in the fragment table ([`crate::fragments`]).
    pub fragment_entries: usize,
    /// How long a datagram's translation, or a fragment waiting for its
    /// first, is kept (ns).
    pub fragment_timeout_ns: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            neighbour_capacity: 4096,
            neighbour_timers: NeighbourTimers::default(),
            flow_capacity: crate::flow::DEFAULT_CAPACITY,
            flow_timeouts: FlowTimeouts::default(),
            backend_slots: crate::stats::DEFAULT_SLOTS,
            new_flow_sketch_width: admission::DEFAULT_WIDTH,
            seed: None,
            fragment_entries: crate::fragments::DEFAULT_ENTRIES,
            fragment_timeout_ns: crate::fragments::DEFAULT_TIMEOUT_NS,
        }
    }
}

/// Housekeeping passes it takes to sweep the whole connection-tracking
/// table for expired flows (at 10 passes a second: every 10 seconds).
const SWEEP_PASSES: usize = 100;

/// Issues memory prefetch hints for the pipeline. The packet core cannot
/// (prefetch instructions need `unsafe` in Rust), so it says what to fetch
/// and the driver does it; tests and benches without a driver use
/// [`NoPrefetch`].
pub trait Prefetch {
    /// Hints that the cache line at `addr` is about to be read.
    fn prefetch(&self, addr: usize);
}

/// A [`Prefetch`] that does nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPrefetch;

impl Prefetch for NoPrefetch {
    #[inline(always)]
    fn prefetch(&self, _addr: usize) {}
}

/// Most packets in one call of [`Pipeline::process`] classified ahead (the
/// rest are looked up when reached).
const HASH_AHEAD: usize = 64;

/// What the pass ahead of a burst learned about one packet.
#[derive(Clone, Copy, Debug)]
enum Ahead {
    /// Not examined (past `HASH_AHEAD`, or not untagged IPv4 TCP/UDP).
    Unknown,
    /// TCP or UDP to no service.
    NoService,
    /// To this service (index into the snapshot's services); the hash of
    /// its 5-tuple in the connection-tracking table. This worker owns it.
    Service(u32, FlowHash),
    /// To a service; the flow is this worker's.
    Handoff(u16),
}

/// One worker's packet step and the state it keeps between bursts.
#[derive(Debug)]
pub struct Pipeline {
    neighbours: NeighbourTable,
    /// Connection tracking: the backend each flow was given, so flows keep
    /// it when backends are added, removed or reweighted.
    flows: FlowTable,
    counters: Arc<WorkerCounters>,
    solicitations: ArrayVec<Solicitation, MAX_SOLICITATIONS>,
    /// MACs of the snapshot's known next hops, by slot: the fast path reads
    /// an array instead of the neighbour table. Refreshed by housekeeping and
    /// whenever ARP teaches a known next hop's MAC.
    next_hop_macs: Vec<Option<EthernetAddress>>,
    /// The [`Snapshot::cache_generation`] `next_hop_macs` (and the source
    /// pairs) belong to: a publication that keeps the next hops, permanent
    /// neighbours and pools keeps it, and costs the worker no rebuild.
    next_hop_generation: u64,
    /// What other workers tell this one (lock-free, bounded).
    inbox: Option<Arc<Inbox>>,
    /// Every worker's inbox, by worker index (this one's included).
    peers: Vec<Arc<Inbox>>,
    /// What the pass ahead learned about each packet of the current burst.
    ahead: [Ahead; HASH_AHEAD],
    /// This pipeline's index among the workers, and their number.
    worker: u16,
    workers: u16,
    /// True while processing packets other workers handed over: they are
    /// this worker's by construction and are never handed on.
    handed_over: bool,
    /// `workers > 1 && !handed_over`, kept so that the per-packet owner
    /// test is one load.
    may_hand_off: bool,
    /// FullNAT source pairs of this worker.
    snat: SnatTable,
    /// Per-backend traffic and flow counts of this worker.
    stats: Arc<BackendStats>,
    /// By dense port index: whether the port has a kernel interface that
    /// takes what the fast path does not handle ([`Verdict::Punt`]).
    kernel_ports: Vec<bool>,
    /// The driver's devices (dense index) with a kernel interface, as
    /// [`Pipeline::set_kernel_ports`] gave them; `kernel_ports` adds each
    /// VLAN interface, which punts to its carrying port's.
    kernel_devices: Vec<bool>,
    /// Recent new flows per client source, for services that limit them.
    admission: NewFlowLimiter,
    /// What is left of this worker's rate of ICMP errors.
    icmp_errors: IcmpErrorBudget,
    /// Translations of datagrams whose later fragments may still come.
    fragments: FragmentTable,
    /// Later fragments waiting for their first.
    held: HeldFragments,
}

/// Most ICMP errors (time exceeded) one worker sends per second, and in
/// one burst: Linux's defaults for a whole host (`icmp_msgs_per_sec`,
/// `icmp_msgs_burst`). A flood of expiring packets gets this many answers
/// a second and the rest are dropped as `ttl_exceeded`, so the gateway
/// cannot be turned into a reflector.
pub const ICMP_ERRORS_PER_SEC: u64 = 1000;
/// See [`ICMP_ERRORS_PER_SEC`].
pub const ICMP_ERRORS_BURST: u32 = 50;

/// A token bucket of ICMP errors: [`ICMP_ERRORS_BURST`] tokens, one more
/// every 1/[`ICMP_ERRORS_PER_SEC`] s.
#[derive(Debug)]
struct IcmpErrorBudget {
    tokens: u32,
    /// When the tokens were last counted (ns, the pipeline's clock).
    counted: u64,
}

impl IcmpErrorBudget {
    const NS_PER_TOKEN: u64 = 1_000_000_000 / ICMP_ERRORS_PER_SEC;

    fn new() -> Self {
        IcmpErrorBudget { tokens: ICMP_ERRORS_BURST, counted: 0 }
    }

    /// Takes a token if there is one at `now`.
    fn take(&mut self, now: u64) -> bool {
        let earned = now.saturating_sub(self.counted) / Self::NS_PER_TOKEN;
        if earned > 0 {
            let tokens = (u64::from(self.tokens) + earned).min(u64::from(ICMP_ERRORS_BURST));
            self.tokens = tokens as u32;
            // A full bucket earns nothing while it waits.
            self.counted =
                if self.tokens == ICMP_ERRORS_BURST { now } else { self.counted + earned * Self::NS_PER_TOKEN };
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

impl Pipeline {
    /// A pipeline counting into `counters`, with its own per-backend stats
    /// of `config.backend_slots` slots.
    pub fn new(config: PipelineConfig, counters: Arc<WorkerCounters>) -> Self {
        let stats = Arc::new(BackendStats::new(config.backend_slots));
        Self::with_stats(config, counters, stats)
    }

    /// A pipeline counting into `counters` and, per backend, into `stats`
    /// (which only this pipeline may write).
    pub fn with_stats(config: PipelineConfig, counters: Arc<WorkerCounters>, stats: Arc<BackendStats>) -> Self {
        Pipeline {
            neighbours: NeighbourTable::new(config.neighbour_capacity, config.neighbour_timers),
            flows: match config.seed {
                Some(seed) => FlowTable::with_seed(config.flow_capacity, config.flow_timeouts, seed),
                None => FlowTable::new(config.flow_capacity, config.flow_timeouts),
            },
            counters,
            solicitations: ArrayVec::new(),
            next_hop_macs: Vec::new(),
            next_hop_generation: 0,
            inbox: None,
            peers: Vec::new(),
            ahead: [Ahead::Unknown; HASH_AHEAD],
            worker: 0,
            workers: 1,
            handed_over: false,
            may_hand_off: false,
            snat: SnatTable::new(0, 1),
            stats,
            kernel_ports: Vec::new(),
            kernel_devices: Vec::new(),
            admission: match config.seed {
                Some(seed) => NewFlowLimiter::with_seed(config.new_flow_sketch_width, seed),
                None => NewFlowLimiter::new(config.new_flow_sketch_width),
            },
            icmp_errors: IcmpErrorBudget::new(),
            fragments: FragmentTable::new(
                config.fragment_entries,
                config.fragment_timeout_ns,
                config.seed.unwrap_or_else(|| {
                    std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), 0x66_72_61_67_u64)
                }),
            ),
            held: HeldFragments::new(config.fragment_timeout_ns),
        }
    }

    /// Names the ports (by dense index) that have a kernel interface: what
    /// the fast path does not handle and is for the gateway is punted to it
    /// ([`Verdict::Punt`]). On other ports such packets are dropped (as
    /// `local`, or `unsupported` for IPv6) and ARP replies for the gateway
    /// are consumed, as without an exception path. Call before processing.
    pub fn set_kernel_ports(&mut self, ports: &[bool]) {
        self.kernel_devices.clear();
        self.kernel_devices.extend_from_slice(ports);
        self.kernel_ports.clear();
        self.kernel_ports.extend_from_slice(ports);
        // The VLAN interfaces are added from the next snapshot.
        self.next_hop_generation = 0;
    }

    /// Whether packets for the gateway that arrive on `port` go to its
    /// kernel interface.
    #[inline(always)]
    fn punts(&self, port: u16) -> bool {
        self.kernel_ports.get(usize::from(port)).copied().unwrap_or(false)
    }

    /// Makes this pipeline worker `worker` of `workers`: it then owns the
    /// flows of its share of clients and its slice of every source pool,
    /// and hands other packets to their owners. Call before processing.
    ///
    /// # Panics
    /// If `worker >= workers` or `workers` exceeds `u16::MAX`.
    pub fn set_worker(&mut self, worker: usize, workers: usize) {
        assert!(worker < workers && workers <= usize::from(u16::MAX), "worker {worker} of {workers}");
        self.worker = worker as u16;
        self.workers = workers as u16;
        self.may_hand_off = workers > 1;
        self.snat = SnatTable::new(self.worker, self.workers);
        // Rebuild the per-snapshot state (source pools) on the next burst.
        self.next_hop_generation = 0;
    }

    /// This worker's FullNAT source pairs.
    pub fn snat(&self) -> &SnatTable {
        &self.snat
    }

    /// Joins this pipeline, worker `me`, to the others: `inboxes[me]`
    /// receives what they learn (neighbours, and translations of datagrams
    /// whose later fragments this worker receives); every other inbox
    /// receives what this one learns. `inboxes` has one inbox per worker,
    /// by the index [`Pipeline::set_worker`] gives.
    pub fn join_workers(&mut self, inboxes: &[Arc<Inbox>], me: usize) {
        self.inbox = inboxes.get(me).cloned();
        self.peers = inboxes.to_vec();
    }

    /// The counters this pipeline writes.
    pub fn counters(&self) -> &Arc<WorkerCounters> {
        &self.counters
    }

    /// The per-backend stats this pipeline writes.
    pub fn backend_stats(&self) -> &Arc<BackendStats> {
        &self.stats
    }

    /// The neighbour table.
    pub fn neighbours(&self) -> &NeighbourTable {
        &self.neighbours
    }

    /// The connection-tracking table.
    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    /// Where the connection-tracking table's memory lies (address, bytes),
    /// for the driver's huge-page advice.
    pub fn flow_memory(&self) -> [(usize, usize); 2] {
        self.flows.memory_regions()
    }

    /// Processes a burst: one verdict per packet, frames rewritten in place.
    /// Drops are counted here; the driver counts rx, tx and tx-full drops.
    ///
    /// `verdicts` must be at least as long as `packets`.
    pub fn process(&mut self, snap: &Snapshot, now: u64, packets: &mut [RxPacket<'_>], verdicts: &mut [Verdict]) {
        self.process_with(snap, now, packets, verdicts, &NoPrefetch);
    }

    /// [`Pipeline::process`], first hashing every TCP/UDP packet's flow and
    /// prefetching its connection-tracking buckets through `prefetch`, so
    /// the table's cache misses overlap instead of stalling packet by packet.
    pub fn process_with<P: Prefetch>(
        &mut self,
        snap: &Snapshot,
        now: u64,
        packets: &mut [RxPacket<'_>],
        verdicts: &mut [Verdict],
        prefetch: &P,
    ) {
        self.handed_over = false;
        self.process_burst(snap, now, packets, verdicts, prefetch);
    }

    /// [`Pipeline::process_with`] for packets other workers handed to this
    /// one ([`Verdict::Handoff`]): they are processed as this worker's own,
    /// and never handed on.
    pub fn process_handed_over<P: Prefetch>(
        &mut self,
        snap: &Snapshot,
        now: u64,
        packets: &mut [RxPacket<'_>],
        verdicts: &mut [Verdict],
        prefetch: &P,
    ) {
        self.handed_over = true;
        self.may_hand_off = false;
        self.process_burst(snap, now, packets, verdicts, prefetch);
        self.handed_over = false;
        self.may_hand_off = self.workers > 1;
    }

    #[inline]
    fn process_burst<P: Prefetch>(
        &mut self,
        snap: &Snapshot,
        now: u64,
        packets: &mut [RxPacket<'_>],
        verdicts: &mut [Verdict],
        prefetch: &P,
    ) {
        if snap.cache_generation() != self.next_hop_generation {
            self.adopt(snap, now);
        }
        self.drain_inbox(snap, now);
        // First stage: classify each packet once (the main pass reuses the
        // result) and, for client packets to a service, hash the 5-tuple and
        // prefetch the flow's two candidate buckets. Replies and strays are
        // not worth a hash: they do not meet the table with their own tuple.
        for (i, p) in packets.iter().enumerate().take(HASH_AHEAD) {
            self.ahead[i] = match flow_key_of(p.frame()) {
                None => Ahead::Unknown,
                Some(key) => match snap.service_index(key.dst_addr, key.dst_port, key.protocol) {
                    None => Ahead::NoService,
                    Some(svc) => {
                        if let Some(w) = self.foreign_owner(key.src_addr, key.src_port, key.protocol) {
                            self.ahead[i] = Ahead::Handoff(w);
                            continue;
                        }
                        let hash = self.flows.hash_key(&key);
                        for addr in self.flows.prefetch_addresses(hash) {
                            prefetch.prefetch(addr);
                        }
                        Ahead::Service(svc, hash)
                    }
                },
            };
        }
        // Second stage: the first packets' metadata has arrived by now;
        // fetch the entries their tags point at.
        for a in self.ahead.iter().take(packets.len().min(HASH_AHEAD)) {
            if let Ahead::Service(_, hash) = *a
                && let Some(addr) = self.flows.entry_prefetch_address(hash)
            {
                prefetch.prefetch(addr);
            }
        }
        // Interfaces past the devices are VLANs (none without VLANs): a
        // frame sent on one is tagged and leaves by its port. An untagged
        // transmit pays one compare.
        let devices = snap.devices();
        for (i, (p, v)) in packets.iter_mut().zip(verdicts.iter_mut()).enumerate() {
            let ahead = self.ahead.get(i).copied().unwrap_or(Ahead::Unknown);
            let mut verdict = self.process_one(snap, now, p, ahead);
            match verdict {
                Verdict::Transmit(port) if port >= devices => {
                    verdict = tag_egress(snap, p, port);
                    if let Verdict::Drop(reason) = verdict {
                        self.counters.count_drop(reason);
                    }
                }
                Verdict::Drop(reason) => self.counters.count_drop(reason),
                Verdict::Consumed => self.counters.consumed.inc(),
                // Only punted frames are classified: the fast path pays
                // nothing for it.
                Verdict::Punt(port) if is_control_protocol(p.frame()) => verdict = Verdict::PuntControl(port),
                Verdict::Transmit(_) | Verdict::Handoff(_) | Verdict::Punt(_) | Verdict::PuntControl(_) => {}
            }
            *v = verdict;
        }
    }

    /// ARP requests to send, collected since the last call.
    pub fn take_solicitations(&mut self) -> arrayvec::Drain<'_, Solicitation, MAX_SOLICITATIONS> {
        self.solicitations.drain(..)
    }

    /// Periodic work (not per packet): expires neighbours and asks to resolve
    /// every known next hop that is unresolved or stale, so the first packet
    /// of a flow rarely waits for ARP.
    pub fn housekeeping(&mut self, snap: &Snapshot, now: u64) {
        if snap.cache_generation() != self.next_hop_generation {
            self.adopt(snap, now);
        }
        self.neighbours.expire(now);
        let discarded = self.held.expire(now);
        self.counters.fragments_discarded.add(discarded as u64);
        let budget = self.flows.capacity().div_ceil(SWEEP_PASSES);
        let (snat, stats) = (&mut self.snat, &self.stats);
        self.flows.expire_some(now, budget, |e| {
            if e.snat_addr != 0 {
                snat.release(e.snat_addr, e.snat_port);
            }
            stats.flow_out(e.stats_slot(), e.is_established());
        });
        self.counters.flows_active.set(self.flows.occupied() as u64);
        // Permanent entries are re-asserted every pass, so they never age out.
        for (addr, mac) in snap.static_neighbours() {
            self.neighbours.learn(addr, mac.0, now);
        }
        for (slot, nh) in snap.known_next_hops().iter().enumerate() {
            if self.solicitations.is_full() {
                // No room to ask: only refresh the MAC, and leave this
                // address's once-per-interval solicitation for a pass (or a
                // packet) that can send it, so no next hop is starved.
                self.next_hop_macs[slot] = self.neighbours.get(nh.addr).map(EthernetAddress);
                continue;
            }
            let found = self.neighbours.lookup(nh.addr, now);
            self.next_hop_macs[slot] = found.mac.map(EthernetAddress);
            if found.solicit {
                self.queue_solicitation(snap, *nh);
            }
        }
    }

    /// Takes in the neighbours other workers learned. One atomic load when
    /// the inbox is empty, which is nearly always.
    #[inline]
    fn drain_inbox(&mut self, snap: &Snapshot, now: u64) {
        let Some(inbox) = &self.inbox else { return };
        if !inbox.fragments.is_empty() {
            self.adopt_fragment_notes(snap, now);
        }
        let Some(inbox) = &self.inbox else { return };
        while let Some(u) = inbox.neighbours.pop() {
            if snap.is_static_neighbour(u.addr) {
                continue;
            }
            self.neighbours.learn(u.addr, u.mac.0, now);
            for (slot, nh) in snap.known_next_hops().iter().enumerate() {
                if nh.addr == u.addr {
                    self.next_hop_macs[slot] = Some(u.mac);
                }
            }
        }
    }

    /// Sizes the next-hop MAC cache for a new snapshot and fills it from the
    /// neighbour table. Runs once per snapshot change, never per packet.
    #[cold]
    #[inline(never)]
    fn adopt(&mut self, snap: &Snapshot, now: u64) {
        let known = snap.known_next_hops();
        self.next_hop_macs.clear();
        self.next_hop_macs.extend(known.iter().map(|nh| self.neighbours.get(nh.addr).map(EthernetAddress)));
        for (addr, mac) in snap.static_neighbours() {
            self.neighbours.learn(addr, mac.0, now);
            for (slot, nh) in known.iter().enumerate() {
                if nh.addr == addr {
                    self.next_hop_macs[slot] = Some(mac);
                }
            }
        }
        if !self.snat.built_for(snap.source_pools()) {
            self.rebuild_snat(snap);
        }
        // A VLAN interface punts to the kernel interface of the port that
        // carries it (where the kernel has the VLAN's own interface).
        let devices = &self.kernel_devices;
        self.kernel_ports.clear();
        self.kernel_ports.extend(snap.ports().iter().enumerate().map(|(i, p)| {
            let device = p.vlan.map_or(i, |v| usize::from(v.port));
            devices.get(device).copied().unwrap_or(false)
        }));
        self.next_hop_generation = snap.cache_generation();
    }

    /// Rebuilds the FullNAT source pairs for the snapshot's pools, keeping
    /// every tracked flow whose pair is still this worker's and forgetting
    /// the others (their pool or address is gone). Visits the whole flow
    /// table: runs when the pools change, never per packet.
    #[cold]
    #[inline(never)]
    fn rebuild_snat(&mut self, snap: &Snapshot) {
        let pools = snap.source_pools();
        let (snat, stats) = (&self.snat, &self.stats);
        let mut claims = Vec::new();
        self.flows.retain(|e| {
            if e.snat_addr == 0 {
                return true;
            }
            let keep = snat.would_own(pools, e.snat_addr, e.snat_port);
            if keep {
                let binding = Binding {
                    key: e.key(),
                    backend_addr: e.backend_addr,
                    backend_port: e.backend_port,
                    stats: e.stats_slot(),
                    live: true,
                };
                claims.push((e.snat_addr, e.snat_port, binding));
            } else {
                stats.flow_out(e.stats_slot(), e.is_established());
            }
            keep
        });
        self.snat.rebuild(pools, &claims);
    }

    /// The worker owning client `addr:port`'s flow when it is not this one
    /// (and this packet may be handed on).
    #[inline(always)]
    fn foreign_owner(&self, addr: u32, port: u16, protocol: u8) -> Option<u16> {
        if !self.may_hand_off {
            return None;
        }
        let w = client_owner(addr, port, protocol, self.workers);
        (w != self.worker).then_some(w)
    }

    #[inline]
    fn process_one(&mut self, snap: &Snapshot, now: u64, p: &mut RxPacket<'_>, ahead: Ahead) -> Verdict {
        let ethertype = match ethernet::Frame::new_checked(p.frame()) {
            Ok(eth) => eth.ethertype(),
            Err(_) => return Verdict::Drop(DropReason::Malformed),
        };
        // The destination MAC filter sits here, and not in the pass ahead:
        // every received packet reaches this point exactly once on the
        // worker that received it (the pass ahead sees only the first
        // HASH_AHEAD of a call), before it is forwarded, answered, punted or
        // handed over. A packet another worker handed over passed it there
        // and arrives unchanged, so it is not checked twice. The pass ahead
        // may hash and prefetch for a frame dropped here; such frames are
        // rare, and checking there too would tax every other packet.
        if !self.handed_over && !addressed_to_port(snap, p.port, p.frame()) {
            return Verdict::Drop(DropReason::OtherHost);
        }
        // IPv4 first, with one compare: nearly every packet is IPv4, and a
        // match over all the EtherTypes would test them in value order.
        if ethertype == EtherType::IPV4 {
            return self.ipv4(snap, now, p, ahead);
        }
        self.not_ipv4(snap, now, p, ethertype, ahead)
    }

    /// [`Pipeline::process_one`] for any EtherType but IPv4: out of line and
    /// cold, so that an IPv4 packet's dispatch is the one compare above.
    #[cold]
    #[inline(never)]
    fn not_ipv4(&mut self, snap: &Snapshot, now: u64, p: &mut RxPacket<'_>, ethertype: u16, ahead: Ahead) -> Verdict {
        match ethertype {
            EtherType::ARP => {
                let port = p.port;
                self.arp(snap, now, port, p.frame_mut())
            }
            EtherType::IPV6 if self.punts(p.port) => ipv6_to_kernel(p.frame(), p.port),
            EtherType::VLAN => self.tagged(snap, now, p, ahead),
            // Stacked tags (802.1ad outside): no interface is a VLAN in a
            // VLAN.
            EtherType::QINQ => Verdict::Drop(DropReason::UnknownVlan),
            _ => Verdict::Drop(DropReason::Unsupported),
        }
    }

    // Always inlined into `process_one`: its second caller, the VLAN path,
    // must not make every untagged packet pay a call.
    #[inline(always)]
    fn ipv4(&mut self, snap: &Snapshot, now: u64, p: &mut RxPacket<'_>, ahead: Ahead) -> Verdict {
        if let Ahead::Handoff(w) = ahead {
            // The owner validates it.
            return Verdict::Handoff(w);
        }
        let in_port = p.port;
        let (eth, rest) = p.buf[p.start..p.end].split_at_mut(ethernet::HEADER_LEN);
        let Ok(ip) = ipv4::Packet::new_checked(&*rest) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        if !ip.verify_checksum() {
            return Verdict::Drop(DropReason::Malformed);
        }
        let (src, dst, proto, ttl) = (ip.src_addr(), ip.dst_addr(), ip.protocol(), ip.ttl());
        // Before anything can answer, forward, track or punt the packet:
        // see the module documentation on martian sources.
        if snap.is_martian_source(src) {
            if src == 0 && self.punts(in_port) && Self::is_group(snap, in_port, dst) {
                return Verdict::Punt(in_port);
            }
            return Verdict::Drop(DropReason::MartianSource);
        }
        let (hl, total) = (ip.header_len(), usize::from(ip.total_len()));
        let fragment = ip.is_fragment();
        let (hdr, l4) = rest.split_at_mut(hl);
        let l4 = &mut l4[..total - hl];
        match proto {
            ipv4::protocol::TCP | ipv4::protocol::UDP => {
                // Whether it is for the gateway's kernel is asked only once
                // it is no service's: the fast path pays nothing for it.
                if fragment {
                    let h = ipv4::Packet::new_unchecked(&*hdr);
                    let key = FragmentKey { src, dst, id: h.ident(), protocol: proto };
                    let offset = h.frag_offset();
                    if self.for_kernel(snap, in_port, dst) {
                        // The kernel reassembles what is its own.
                        return Verdict::Punt(in_port);
                    }
                    if offset != 0 {
                        return self.fragment(snap, now, p, key, offset);
                    }
                    // A first fragment: translated below as an unfragmented
                    // packet would be, and its translation recorded.
                    if let Some(v) = self.first_fragment(&key, now) {
                        return v;
                    }
                }
                let ports = if proto == ipv4::protocol::TCP {
                    tcp::Packet::new_checked(&*l4).map(|t| (t.src_port(), t.dst_port()))
                } else if fragment && l4.len() >= udp::HEADER_LEN {
                    // Its length field counts the whole datagram; the first
                    // fragment holds the header.
                    let u = udp::Packet::new_unchecked(&*l4);
                    Ok((u.src_port(), u.dst_port()))
                } else {
                    udp::Packet::new_checked(&*l4).map(|u| (u.src_port(), u.dst_port()))
                };
                let Ok((sport, dport)) = ports else {
                    return Verdict::Drop(DropReason::Malformed);
                };
                let tcp_flags = if proto == ipv4::protocol::TCP {
                    let flags = tcp::Packet::new_unchecked(&*l4).flags();
                    // Either way, before any flow is created or changed.
                    if is_bad_tcp_flags(flags) {
                        return Verdict::Drop(DropReason::BadTcpFlags);
                    }
                    flags
                } else {
                    0
                };

                // The pass ahead read the same bytes, so its answer stands.
                let (svc, hash) = match ahead {
                    Ahead::Service(i, hash) => (snap.services().get(i as usize).map(|s| &**s), Some(hash)),
                    Ahead::NoService => (None, None),
                    Ahead::Unknown | Ahead::Handoff(_) => (snap.service(dst, dport, proto), None),
                };
                if let Some(svc) = svc {
                    if hash.is_none()
                        && let Some(w) = self.foreign_owner(src, sport, proto)
                    {
                        return Verdict::Handoff(w);
                    }
                    if ttl <= 1 {
                        return self.time_exceeded(p, snap, now, src, hl);
                    }
                    let key =
                        FlowKey { src_addr: src, dst_addr: dst, src_port: sport, dst_port: dport, protocol: proto };
                    // Every client packet, tracked or not, before any flow
                    // is created or changed.
                    if !svc.source_ranges.allows(src) {
                        self.source_denied(&key, hash, now);
                        return Verdict::Drop(DropReason::SourceDenied);
                    }
                    let (backend, snat_addr, snat_port) = match self.backend_for(svc, &key, hash, tcp_flags, now) {
                        Choice::Backend(c) => (&svc.backends[usize::from(c.index)], c.snat_addr, c.snat_port),
                        Choice::None => return Verdict::Drop(DropReason::NoBackend),
                        Choice::Exhausted => return Verdict::Drop(DropReason::SnatExhausted),
                        Choice::Limited => return Verdict::Drop(DropReason::RateLimited),
                        Choice::Reset => {
                            if proto != ipv4::protocol::TCP {
                                return Verdict::Drop(DropReason::NoBackend);
                            }
                            // A segment carrying a RST is never answered.
                            if tcp_flags & tcp::flags::RST != 0 {
                                return Verdict::Drop(DropReason::NoBackend);
                            }
                            reset_in_place(eth, hdr, l4, snap, in_port);
                            self.counters.flows_reset.inc();
                            return Verdict::Transmit(in_port);
                        }
                    };
                    let Some(mac) = self.resolve(snap, backend.next_hop, now) else {
                        return Verdict::Drop(DropReason::NoNeighbour);
                    };
                    let out = backend.next_hop.port;
                    match svc.mode {
                        Mode::Nat => {
                            rewrite_l4(proto, l4, Endpoint::Dst, dst, backend.addr, backend.port);
                            let mut ip = ipv4::Packet::new_unchecked(&mut *hdr);
                            ip.set_dst_addr(backend.addr);
                            ip.set_ttl(ttl - 1);
                            set_macs(eth, snap, out, mac);
                        }
                        Mode::FullNat { .. } => {
                            rewrite_l4(proto, l4, Endpoint::Dst, dst, backend.addr, backend.port);
                            rewrite_l4(proto, l4, Endpoint::Src, src, snat_addr, snat_port);
                            let mut ip = ipv4::Packet::new_unchecked(&mut *hdr);
                            ip.set_dst_addr(backend.addr);
                            ip.set_src_addr(snat_addr);
                            ip.set_ttl(ttl - 1);
                            set_macs(eth, snap, out, mac);
                        }
                        Mode::Dsr { source_mask } => {
                            let t = Tuple { src, dst, sport, dport, proto, ttl, tcp_flags };
                            if let Err(verdict) =
                                dsr_encapsulate(p, snap, backend, source_mask, mac, t, total, &self.counters)
                            {
                                return verdict;
                            }
                        }
                    }
                    self.counters.nat_forward.inc();
                    self.stats.count_in(backend.stats, total);
                    if fragment {
                        self.record_fragment(snap, now, p, (src, dst, proto), out, true);
                    }
                    return Verdict::Transmit(out);
                }

                if let Some((pool, addr_index)) = snap.source_pool_address(dst) {
                    let t = Tuple { src, dst, sport, dport, proto, ttl, tcp_flags };
                    if ttl <= 1 || fragment {
                        return self.fullnat_reply_rare(snap, now, p, t, pool, addr_index, hl, total, fragment);
                    }
                    return self.fullnat_reply(snap, now, eth, hdr, l4, t, pool, addr_index);
                }

                if let Some(rev) = snap.reverse(src, sport, proto) {
                    if snap.local_port(dst).is_some() || dst >> 28 == 0xe || dst == u32::MAX {
                        // From a backend's address and port, but to the
                        // gateway: a reply to the kernel's own connection (a
                        // health probe), not one to translate (a client is
                        // never the gateway).
                        if self.punts(in_port) {
                            return Verdict::Punt(in_port);
                        }
                        return Verdict::Drop(Self::unmatched(snap, dst, DropReason::NoService));
                    }
                    if let Some(w) = self.foreign_owner(dst, dport, proto) {
                        return Verdict::Handoff(w);
                    }
                    if ttl <= 1 {
                        return self.time_exceeded(p, snap, now, src, hl);
                    }
                    // The reply's flow, as the client sees it. The
                    // translation comes from configuration, so a reply is
                    // translated even without an entry (a flow another
                    // gateway started); an entry only follows the TCP state.
                    if proto == ipv4::protocol::TCP {
                        let key = FlowKey {
                            src_addr: dst,
                            dst_addr: rev.vip,
                            src_port: dport,
                            dst_port: rev.port,
                            protocol: proto,
                        };
                        if let Some(flow) = self.flows.lookup(&key, now) {
                            self.on_tcp_flags(flow, false, tcp_flags, now);
                        }
                    }
                    let Some(nh) = snap.routes().next_hop(dst) else {
                        return Verdict::Drop(DropReason::NoRoute);
                    };
                    let Some(mac) = self.resolve(snap, nh, now) else {
                        return Verdict::Drop(DropReason::NoNeighbour);
                    };
                    rewrite_l4(proto, l4, Endpoint::Src, src, rev.vip, rev.port);
                    let mut ip = ipv4::Packet::new_unchecked(&mut *hdr);
                    ip.set_src_addr(rev.vip);
                    ip.set_ttl(ttl - 1);
                    set_macs(eth, snap, nh.port, mac);
                    self.counters.nat_reverse.inc();
                    self.stats.count_out(rev.stats, total);
                    if fragment {
                        self.record_fragment(snap, now, p, (src, dst, proto), nh.port, false);
                    }
                    return Verdict::Transmit(nh.port);
                }
                if self.for_kernel(snap, in_port, dst) {
                    return Verdict::Punt(in_port);
                }
                Verdict::Drop(Self::unmatched(snap, dst, DropReason::NoService))
            }
            ipv4::protocol::ICMP => {
                let local = snap.local_port(dst).is_some();
                let to_kernel = self.punts(in_port) && (local || Self::is_group(snap, in_port, dst));
                // The fast path answers echo requests to the gateway's
                // addresses itself; the kernel gets every other message (its
                // own pings' replies, errors about its own connections).
                if to_kernel && !(local && !fragment && is_echo_request(l4)) {
                    return Verdict::Punt(in_port);
                }
                // An error about a flow the gateway translated goes to the
                // flow's other end (see `icmp_errors`); every other ICMP
                // error not for the gateway itself is no flow's.
                if !local && !fragment && icmp_errors::is_icmp_error(l4) {
                    return self.icmp_error(snap, now, p, dst, hl, ttl, total);
                }
                if !snap.is_vip(dst) && !local {
                    return Verdict::Drop(DropReason::NoMatch);
                }
                if fragment {
                    return Verdict::Drop(DropReason::Fragment);
                }
                let Ok(mut msg) = icmp::Packet::new_checked(&mut *l4) else {
                    return Verdict::Drop(DropReason::Malformed);
                };
                if msg.msg_type() != icmp::message::ECHO_REQUEST || msg.code() != 0 {
                    return Verdict::Drop(Self::unmatched(snap, dst, DropReason::Unsupported));
                }
                // Echo reply in place, back to the sender's MAC on the
                // ingress port.
                msg.set_type_code(icmp::message::ECHO_REPLY, 0);
                let mut ip = ipv4::Packet::new_unchecked(&mut *hdr);
                ip.swap_addrs();
                ip.set_ttl(ORIGIN_TTL);
                let sender = ethernet::Frame::new_unchecked(&*eth).src_addr();
                set_macs(eth, snap, in_port, sender);
                self.counters.icmp_echo_replies.inc();
                Verdict::Transmit(in_port)
            }
            _ if self.for_kernel(snap, in_port, dst) => Verdict::Punt(in_port),
            _ => Verdict::Drop(Self::unmatched(snap, dst, DropReason::Unsupported)),
        }
    }

    /// [`Pipeline::fullnat_reply`] for a reply that expires here (answered
    /// with time exceeded) or is a first fragment (recorded for the
    /// datagram's later fragments): cold, so that the common reply pays one
    /// test for both.
    #[cold]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn fullnat_reply_rare(
        &mut self,
        snap: &Snapshot,
        now: u64,
        p: &mut RxPacket<'_>,
        t: Tuple,
        pool: u16,
        addr_index: u16,
        hl: usize,
        total: usize,
        fragment: bool,
    ) -> Verdict {
        let (eth, rest) = p.buf[p.start..p.end].split_at_mut(ethernet::HEADER_LEN);
        let (hdr, l4) = rest.split_at_mut(hl);
        let l4 = &mut l4[..total - hl];
        let v = self.fullnat_reply(snap, now, eth, hdr, l4, t, pool, addr_index);
        if v == Verdict::Drop(DropReason::TtlExceeded) {
            // Not counted yet: answered, or counted, here.
            return self.time_exceeded(p, snap, now, t.src, hl);
        }
        if fragment && let Verdict::Transmit(out) = v {
            self.record_fragment(snap, now, p, (t.src, t.dst, t.proto), out, false);
        }
        v
    }

    /// A TCP or UDP packet from `src` (IP header `hl` bytes long) whose TTL
    /// would reach 0 here: answered with ICMP time exceeded from the
    /// ingress port's address (traceroute shows the gateway), within this
    /// worker's budget of ICMP errors ([`ICMP_ERRORS_PER_SEC`]); otherwise,
    /// or without the headroom the answer needs, dropped as
    /// `ttl_exceeded`. Out of line: the fast path never gets here.
    #[inline(never)]
    fn time_exceeded(&mut self, p: &mut RxPacket<'_>, snap: &Snapshot, now: u64, src: u32, hl: usize) -> Verdict {
        let in_port = p.port;
        let from = snap.ports().get(usize::from(in_port)).and_then(|q| q.source_for(src));
        let Some(from) = from else {
            return Verdict::Drop(DropReason::TtlExceeded);
        };
        if p.start < ICMP_ERROR_GROWTH || !self.icmp_errors.take(now) {
            return Verdict::Drop(DropReason::TtlExceeded);
        }
        time_exceeded_in_place(p, snap, in_port, hl, from);
        self.counters.icmp_time_exceeded.inc();
        Verdict::Transmit(in_port)
    }

    /// A reply to a FullNAT source pair: its binding names the client's
    /// flow, and only the pair's owner has it. Out of line, so that the nat
    /// path stays compact.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn fullnat_reply(
        &mut self,
        snap: &Snapshot,
        now: u64,
        eth: &mut [u8],
        hdr: &mut [u8],
        l4: &mut [u8],
        t: Tuple,
        pool: u16,
        addr_index: u16,
    ) -> Verdict {
        let Tuple { src, dst, sport, dport, proto, ttl, tcp_flags } = t;
        if self.may_hand_off {
            match snap.source_pools().get(usize::from(pool)).and_then(|p| snat::owner_of(p, dport, self.workers)) {
                Some(w) if w != self.worker => return Verdict::Handoff(w),
                Some(_) => {}
                None => return Verdict::Drop(DropReason::NoFlow),
            }
        }
        let Some(b) = self.snat.binding(pool, addr_index, dport).copied() else {
            return Verdict::Drop(DropReason::NoFlow);
        };
        if b.backend_addr != src || b.backend_port != sport || b.key.protocol != proto {
            return Verdict::Drop(DropReason::NoFlow);
        }
        if ttl <= 1 {
            // The caller answers it (it holds the whole frame).
            return Verdict::Drop(DropReason::TtlExceeded);
        }
        if proto == ipv4::protocol::TCP
            && let Some(flow) = self.flows.lookup(&b.key, now)
        {
            self.on_tcp_flags(flow, false, tcp_flags, now);
        }
        let client = b.key.src_addr;
        let Some(nh) = snap.routes().next_hop(client) else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        let Some(mac) = self.resolve(snap, nh, now) else {
            return Verdict::Drop(DropReason::NoNeighbour);
        };
        rewrite_l4(proto, l4, Endpoint::Src, src, b.key.dst_addr, b.key.dst_port);
        rewrite_l4(proto, l4, Endpoint::Dst, dst, client, b.key.src_port);
        let mut ip = ipv4::Packet::new_unchecked(&mut *hdr);
        ip.set_src_addr(b.key.dst_addr);
        ip.set_dst_addr(client);
        ip.set_ttl(ttl - 1);
        set_macs(eth, snap, nh.port, mac);
        self.counters.nat_reverse.inc();
        self.stats.count_out(b.stats, hdr.len() + l4.len());
        Verdict::Transmit(nh.port)
    }

    /// The backend of a client packet's flow: the one its tracked flow has,
    /// or for a new flow the one Maglev picks ([`Pipeline::new_flow`]). A
    /// flow keeps its backend when backends are added, removed or
    /// reweighted (weight 0 drains: Maglev stops picking the backend, its
    /// flows go on); a flow whose backend left the service is moved to the
    /// backend Maglev picks. A SYN (without ACK) on a tracked flow whose
    /// connection is over (FIN or RST seen), or whose backend takes no new
    /// flows, opens a new connection on a reused client port: the old flow
    /// is forgotten and the new one decided afresh.
    #[inline]
    fn backend_for(
        &mut self,
        svc: &Service,
        key: &FlowKey,
        ahead: Option<FlowHash>,
        tcp_flags: u16,
        now: u64,
    ) -> Choice {
        // The hash computed ahead is of the packet's own 5-tuple, which for
        // a client packet is exactly `key`.
        let hash = ahead.unwrap_or_else(|| self.flows.hash_key(key));
        let fullnat = matches!(svc.mode, Mode::FullNat { .. });
        if let Some(flow) = self.flows.lookup_hashed(key, hash, now) {
            let e = *self.flows.get(flow);
            if fullnat != (e.snat_addr != 0) || (is_opening(key.protocol, tcp_flags) && !Self::reusable(svc, &e)) {
                // The service changed mode under this flow, or a new
                // connection reuses its tuple: start afresh.
                self.forget(flow);
                return self.new_flow(svc, key, hash, tcp_flags, now);
            }
            let hinted = svc
                .backends
                .get(usize::from(e.backend_index))
                .filter(|b| b.addr == e.backend_addr && b.port == e.backend_port);
            let index = match hinted {
                Some(_) => e.backend_index,
                None => {
                    let (i, moved) = match svc.position(e.backend_addr, e.backend_port) {
                        Some(i) => (i, false),
                        None if svc.on_backend_removal == OnBackendRemoval::Reset => {
                            self.forget(flow);
                            return Choice::Reset;
                        }
                        None => match svc.maglev.lookup(pick_hash(svc, key, flow_hash(key))) {
                            Some(i) => (usize::from(i), true),
                            None => return Choice::None,
                        },
                    };
                    let b = svc.backends[i];
                    let entry = self.flows.get_mut(flow);
                    entry.backend_index = i as u16;
                    entry.backend_addr = b.addr;
                    entry.backend_port = b.port;
                    if moved {
                        self.counters.flows_rehashed.inc();
                        if fullnat {
                            self.snat.rebind(e.snat_addr, e.snat_port, b.addr, b.port, b.stats);
                        }
                    }
                    i as u16
                }
            };
            // The flow is counted under its backend's current slot: it
            // moves with a rehash, or when its backend's slot changed.
            let slot = svc.backends[usize::from(index)].stats;
            if slot != e.stats_slot() {
                self.move_stats(flow, &e, slot, fullnat);
            }
            if key.protocol == ipv4::protocol::TCP {
                self.on_tcp_flags(flow, true, tcp_flags, now);
            }
            return Choice::Backend(Chosen { index, snat_port: e.snat_port, snat_addr: e.snat_addr });
        }
        self.new_flow(svc, key, hash, tcp_flags, now)
    }

    /// Whether a client's SYN on tracked flow `e` belongs to the flow (a
    /// retransmission while the handshake or connection goes on, to a
    /// backend that still takes new flows) rather than opening a new
    /// connection on the same client port. Runs for SYNs only.
    #[cold]
    #[inline(never)]
    fn reusable(svc: &Service, e: &FlowEntry) -> bool {
        if e.state == FlowState::TcpClosing {
            return false;
        }
        let same = |b: &&Backend| b.addr == e.backend_addr && b.port == e.backend_port;
        let backend = svc.backends.get(usize::from(e.backend_index)).filter(same);
        let backend = backend.or_else(|| svc.backends.iter().find(same));
        backend.is_some_and(|b| b.takes_new_flows)
    }

    /// The new-flow decision: every client packet that no tracked flow
    /// takes comes here, once, and nowhere else. Maglev picks the backend.
    ///
    /// - A TCP SYN opens a connection that is not proved yet (its source
    ///   may be spoofed): with nat and dsr it is forwarded on Maglev's
    ///   choice but not tracked, and the client's first ACK (or any later
    ///   segment) creates the flow on the same choice. With fullnat the
    ///   backend's SYN-ACK needs a source pair, so the flow is tracked from
    ///   the SYN, half-open, in a slot that never evicts a flow past its
    ///   handshake ([`FlowTable::insert_half_open_hashed`]); no such slot is
    ///   a drop as `snat_exhausted` (the client retransmits).
    /// - Anything else is tracked at once; a FullNAT flow also takes a
    ///   source pair from this worker's slice of the pool.
    ///
    /// The service's new-flow limit is checked here, first: a nat or dsr
    /// connection comes here twice, with its SYN (`opening`, untracked) and
    /// with its first ACK (tracked), and the limiter counts only the SYN.
    #[inline]
    fn new_flow(&mut self, svc: &Service, key: &FlowKey, hash: FlowHash, tcp_flags: u16, now: u64) -> Choice {
        // The service's limit on new flows per source, before Maglev: every
        // new connection comes here, a SYN reusing a closed flow's tuple too.
        if let Some(limit) = &svc.new_flow_limit
            && !self.admission.admit(limit, key, tcp_flags, self.workers, now)
        {
            return Choice::Limited;
        }
        let spread = flow_hash(key);
        let Some(i) = svc.maglev.lookup(pick_hash(svc, key, spread)) else { return Choice::None };
        let b = svc.backends[usize::from(i)];
        let opening = is_opening(key.protocol, tcp_flags);
        let mut entry = FlowEntry::new(key, FlowState::of_first_packet(key.protocol, tcp_flags));
        entry.backend_addr = b.addr;
        entry.backend_port = b.port;
        entry.backend_index = i;
        entry.set_stats_slot(b.stats);
        let outcome = if let Mode::FullNat { pool } = svc.mode {
            let binding = Binding { key: *key, backend_addr: b.addr, backend_port: b.port, stats: b.stats, live: true };
            // The other half of the hash than Maglev's slot choice.
            let Some((addr, port)) = self.snat.allocate(pool, spread.rotate_left(16), binding) else {
                return Choice::Exhausted;
            };
            entry.snat_addr = addr;
            entry.snat_port = port;
            if opening {
                let Some((_, outcome)) = self.flows.insert_half_open_hashed(entry, hash, now) else {
                    self.snat.release(addr, port);
                    return Choice::Exhausted;
                };
                outcome
            } else {
                self.flows.insert_hashed(entry, hash, now).1
            }
        } else if opening {
            return Choice::Backend(Chosen { index: i, snat_port: 0, snat_addr: 0 });
        } else {
            self.flows.insert_hashed(entry, hash, now).1
        };
        self.counters.flows_created.inc();
        self.stats.flow_in(b.stats, entry.is_established(), true);
        if outcome.is_eviction() {
            self.counters.flows_evicted.inc();
        }
        if let Some(old) = outcome.displaced() {
            if old.snat_addr != 0 {
                self.snat.release(old.snat_addr, old.snat_port);
            }
            self.stats.flow_out(old.stats_slot(), old.is_established());
        }
        Choice::Backend(Chosen { index: i, snat_port: entry.snat_port, snat_addr: entry.snat_addr })
    }

    /// A client packet from a source its service does not serve: a flow
    /// it has (the list narrowed since the flow began) is forgotten, so the
    /// connection is cut at once and its FullNAT pair freed. Runs for
    /// denied packets only.
    #[cold]
    #[inline(never)]
    fn source_denied(&mut self, key: &FlowKey, ahead: Option<FlowHash>, now: u64) {
        let hash = ahead.unwrap_or_else(|| self.flows.hash_key(key));
        if let Some(flow) = self.flows.lookup_hashed(key, hash, now) {
            self.forget(flow);
        }
    }

    /// Removes a flow, frees its source pair and stops counting it.
    fn forget(&mut self, flow: crate::flow::FlowRef) {
        if let Some(e) = self.flows.remove(flow) {
            if e.snat_addr != 0 {
                self.snat.release(e.snat_addr, e.snat_port);
            }
            self.stats.flow_out(e.stats_slot(), e.is_established());
        }
    }

    /// Moves a flow's count (entry `e`) to stats slot `slot`; a FullNAT
    /// flow's source pair follows, so replies are counted there too. Runs
    /// after a configuration change, never for the packets of a steady flow.
    #[cold]
    #[inline(never)]
    fn move_stats(&mut self, flow: crate::flow::FlowRef, e: &FlowEntry, slot: u32, fullnat: bool) {
        // `e` is the entry as looked up; the TCP state changes only after.
        let established = e.is_established();
        self.stats.flow_out(e.stats_slot(), established);
        self.stats.flow_in(slot, established, false);
        let entry = self.flows.get_mut(flow);
        entry.set_stats_slot(slot);
        if fullnat {
            self.snat.rebind(e.snat_addr, e.snat_port, entry.backend_addr, entry.backend_port, slot);
        }
    }

    /// Feeds a TCP segment's flags to the flow's state machine and keeps
    /// its backend's active/inactive gauges in step.
    #[inline(always)]
    fn on_tcp_flags(&mut self, flow: crate::flow::FlowRef, from_client: bool, flags: u16, now: u64) {
        let before = self.flows.get(flow).is_established();
        self.flows.on_tcp_flags(flow, from_client, flags, now);
        let e = self.flows.get(flow);
        if e.is_established() != before {
            self.stats.flow_changed(e.stats_slot(), before, !before);
        }
    }

    /// The drop reason for a packet no rule took: `if_vip` when addressed to
    /// a VIP, `Local` when addressed to the gateway, else `NoMatch`.
    #[inline]
    fn unmatched(snap: &Snapshot, dst: u32, if_vip: DropReason) -> DropReason {
        if snap.is_vip(dst) {
            if_vip
        } else if snap.local_port(dst).is_some() {
            DropReason::Local
        } else {
            DropReason::NoMatch
        }
    }

    /// True if a packet to `dst` that arrived on `port` goes to the port's
    /// kernel interface: the port has one, and `dst` is a port address
    /// (of any port: Linux owns its addresses on every interface), or a
    /// multicast or broadcast address. Never for a VIP or a pool address,
    /// which validation keeps apart from port addresses.
    #[inline]
    fn for_kernel(&self, snap: &Snapshot, port: u16, dst: u32) -> bool {
        self.punts(port) && (snap.local_port(dst).is_some() || Self::is_group(snap, port, dst))
    }

    /// True if `dst` is a multicast, limited broadcast or subnet broadcast
    /// address of port `port` (what routing protocols, DHCP and the like
    /// send, and only the kernel takes).
    #[inline]
    fn is_group(snap: &Snapshot, port: u16, dst: u32) -> bool {
        if dst >> 28 == 0xe || dst == u32::MAX {
            return true;
        }
        snap.ports().get(usize::from(port)).is_some_and(|p| {
            p.addresses.iter().any(|c| c.len < 31 && dst == c.addr | !crate::route::Route::mask(c.len))
        })
    }

    fn arp(&mut self, snap: &Snapshot, now: u64, in_port: u16, frame: &mut [u8]) -> Verdict {
        let Some(port) = snap.ports().get(usize::from(in_port)) else {
            return Verdict::Drop(DropReason::NoMatch);
        };
        let (eth, rest) = frame.split_at_mut(ethernet::HEADER_LEN);
        let mut pkt = match arp::Packet::new_checked(&mut *rest) {
            Ok(p) => p,
            Err(wire::Error::Truncated) => return Verdict::Drop(DropReason::Malformed),
            Err(_) => return Verdict::Drop(DropReason::Unsupported),
        };
        let (op, sha, spa, tpa) = (pkt.operation(), pkt.sender_hw(), pkt.sender_ip(), pkt.target_ip());
        let ours = snap.local_port(tpa) == Some(in_port) || snap.answers_arp_for(tpa);

        // RFC 826 merge: refresh a sender we know; add it if the packet is
        // for us. Only on-link unicast senders are believed.
        // Permanent entries are never overridden by what the wire says.
        if spa != 0
            && !sha.is_multicast()
            && port.address_for(spa).is_some()
            && (ours || self.neighbours.get(spa).is_some())
            && !snap.is_static_neighbour(spa)
        {
            self.neighbours.learn(spa, sha.0, now);
            for (slot, nh) in snap.known_next_hops().iter().enumerate() {
                if nh.addr == spa {
                    self.next_hop_macs[slot] = Some(sha);
                }
            }
            let me = self.inbox.as_ref();
            for peer in self.peers.iter().filter(|q| me.is_none_or(|m| !Arc::ptr_eq(m, q))) {
                // Full: the peer resolves the neighbour itself shortly.
                let _ = peer.neighbours.push(NeighbourUpdate { addr: spa, mac: sha });
            }
        }

        match op {
            arp::Operation::Request if ours => {
                pkt.emit(arp::Operation::Reply, port.mac, tpa, sha, spa);
                let mut eth = ethernet::Frame::new_unchecked(&mut *eth);
                eth.set_dst_addr(sha);
                eth.set_src_addr(port.mac);
                self.counters.arp_replies.inc();
                Verdict::Transmit(in_port)
            }
            // Learned from above; the kernel gets the replies to its own
            // requests (for a port address) too.
            arp::Operation::Reply if self.punts(in_port) && snap.local_port(tpa) == Some(in_port) => {
                Verdict::Punt(in_port)
            }
            arp::Operation::Reply if ours => Verdict::Consumed,
            arp::Operation::Request | arp::Operation::Reply => Verdict::Drop(DropReason::ArpNotOurs),
            arp::Operation::Unknown(_) => Verdict::Drop(DropReason::Unsupported),
        }
    }

    /// The MAC of a next hop, starting resolution when it is unknown or
    /// stale. Never waits. A known next hop (backend, route gateway) is an
    /// array read; only destinations on connected subnets, and known next
    /// hops not resolved yet, consult the neighbour table.
    #[inline(always)]
    fn resolve(&mut self, snap: &Snapshot, nh: NextHop, now: u64) -> Option<EthernetAddress> {
        let cached = self.next_hop_macs.get(nh.slot as usize).copied();
        if let Some(Some(mac)) = cached {
            return Some(mac);
        }
        let found = self.neighbours.lookup(nh.addr, now);
        if found.solicit {
            self.queue_solicitation(snap, nh);
        }
        let mac = found.mac.map(EthernetAddress);
        if let Some(slot) = cached.and(self.next_hop_macs.get_mut(nh.slot as usize)) {
            *slot = mac;
        }
        mac
    }

    fn queue_solicitation(&mut self, snap: &Snapshot, nh: NextHop) {
        let Some(port) = snap.ports().get(usize::from(nh.port)) else { return };
        let Some(sender_ip) = port.source_for(nh.addr) else {
            return;
        };
        let (out, vlan) = match port.vlan {
            Some(v) => (v.port, Some(v.id)),
            None => (nh.port, None),
        };
        // When full, the neighbour table's retransmit timer asks again later.
        let _ = self.solicitations.try_push(Solicitation {
            port: out,
            vlan,
            sender_mac: port.mac,
            sender_ip,
            target_ip: nh.addr,
        });
    }
}

/// An IPv6 frame for the kernel of `port` (there is no IPv6 fast path
/// yet): punted if its header and extension-header chain are sound, else
/// dropped as `malformed`. The chain is walked within the bounds of
/// [`ipv6::walk_extensions`], so a flood of chains no host sends (too
/// many or too long headers, hop-by-hop out of place, a lying payload
/// length, a truncation) stops here instead of in the kernel. A chain the
/// walk does not follow to its end (ESP, AH, no next header) is the
/// kernel's to judge: IPsec to the gateway goes on working.
fn ipv6_to_kernel(frame: &[u8], port: u16) -> Verdict {
    let Some(Ok(packet)) = frame.get(ethernet::HEADER_LEN..).map(ipv6::Packet::new_checked) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    match packet.upper_layer() {
        Ok(_) | Err(ipv6::ExtError::NoNextHeader | ipv6::ExtError::Unsupported(_)) => Verdict::Punt(port),
        Err(_) => Verdict::Drop(DropReason::Malformed),
    }
}

/// The 5-tuple of an IPv4 TCP or UDP frame, untagged or with one 802.1Q
/// tag, read with every bound checked and nothing else validated: only for
/// computing hashes ahead; the main pass validates the packet in full and
/// decides what it is. An untagged frame pays nothing for the tagged case,
/// which is tried only when the untagged reading fails.
#[inline]
fn flow_key_of(frame: &[u8]) -> Option<FlowKey> {
    let key = key_after::<{ ethernet::HEADER_LEN }>(frame);
    if key.is_some() {
        return key;
    }
    tagged_flow_key_of(frame)
}

/// [`flow_key_of`] for a frame with one 802.1Q tag.
#[cold]
#[inline(never)]
fn tagged_flow_key_of(frame: &[u8]) -> Option<FlowKey> {
    if frame.get(12..14)? != EtherType::VLAN.to_be_bytes() {
        return None;
    }
    key_after::<{ ethernet::HEADER_LEN + wire::vlan::HEADER_LEN }>(frame)
}

/// The 5-tuple of an IPv4 TCP or UDP packet whose EtherType field ends at
/// byte `L` of the frame and whose IPv4 header starts there.
#[inline(always)]
fn key_after<const L: usize>(frame: &[u8]) -> Option<FlowKey> {
    // The EtherType and a minimal IPv4 header, bounds-checked once.
    let h = frame.get(..L + 20)?;
    if h[L - 2..L] != [0x08, 0x00] || h[L] >> 4 != 4 {
        return None;
    }
    let protocol = h[L + 9];
    if protocol != ipv4::protocol::TCP && protocol != ipv4::protocol::UDP {
        return None;
    }
    // A later fragment carries no ports: what sits there is payload.
    if h[L + 6] & 0x1f != 0 || h[L + 7] != 0 {
        return None;
    }
    let at = L + usize::from(h[L] & 0x0f) * 4;
    let l4 = frame.get(at..at + 4)?;
    Some(FlowKey {
        src_addr: u32::from_be_bytes([h[L + 12], h[L + 13], h[L + 14], h[L + 15]]),
        dst_addr: u32::from_be_bytes([h[L + 16], h[L + 17], h[L + 18], h[L + 19]]),
        src_port: u16::from_be_bytes([l4[0], l4[1]]),
        dst_port: u16::from_be_bytes([l4[2], l4[3]]),
        protocol,
    })
}

/// True if a frame for the gateway's kernel (untagged, or with one 802.1Q
/// tag) carries a control protocol that must get through a flood of other
/// punted traffic: ARP; over IPv4 or IPv6
/// (without extension headers), BGP (TCP port 179 either way), BFD (UDP to
/// 3784 single hop, 3785 echo, 4784 multihop), OSPF (89), VRRP (112); IPv6
/// neighbour discovery (ICMPv6 133 to 137). Every read is bounds-checked;
/// a truncated frame is not control traffic.
fn is_control_protocol(frame: &[u8]) -> bool {
    const BGP: u16 = 179;
    const BFD: [u16; 3] = [3784, 3785, 4784];
    let be16 = |at: usize| frame.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let l4 = |proto: u8, at: usize| match proto {
        ipv4::protocol::TCP => be16(at) == Some(BGP) || be16(at + 2) == Some(BGP),
        ipv4::protocol::UDP => be16(at + 2).is_some_and(|p| BFD.contains(&p)),
        89 | 112 => true,
        _ => false,
    };
    // One 802.1Q tag (a VLAN interface's frame, punted as it came) is
    // looked through.
    let tagged = be16(12) == Some(EtherType::VLAN);
    let (type_at, eth) = if tagged { (16, ethernet::HEADER_LEN + 4) } else { (12, ethernet::HEADER_LEN) };
    match be16(type_at) {
        Some(EtherType::ARP) => true,
        Some(EtherType::IPV4) => {
            let Some(&vihl) = frame.get(eth) else { return false };
            let Some(&proto) = frame.get(eth + 9) else { return false };
            // A later fragment has no L4 header.
            let offset = be16(eth + 6).map_or(0, |f| f & 0x1fff);
            offset == 0 && l4(proto, eth + usize::from(vihl & 0x0f) * 4)
        }
        Some(EtherType::IPV6) => {
            const IPV6_HEADER: usize = 40;
            match frame.get(eth + 6) {
                Some(58) => frame.get(eth + IPV6_HEADER).is_some_and(|t| (133..=137).contains(t)),
                Some(&next) => l4(next, eth + IPV6_HEADER),
                None => false,
            }
        }
        _ => false,
    }
}

/// Bit `f` is set for each combination `f` of the six classic TCP flags
/// (FIN, SYN, RST, PSH, ACK, URG: the low bits of the flags word) that no
/// connection can carry: SYN with FIN or RST, FIN without ACK, and none of
/// the six at all (ECE, CWR and NS alone count as none).
const BAD_TCP_FLAGS: u64 = {
    let (fin, syn, rst, ack) = (tcp::flags::FIN, tcp::flags::SYN, tcp::flags::RST, tcp::flags::ACK);
    let mut mask = 0u64;
    let mut f = 0u16;
    while f < 64 {
        let bad = (f & syn != 0 && f & (fin | rst) != 0) || (f & fin != 0 && f & ack == 0) || f == 0;
        if bad {
            mask |= 1 << f;
        }
        f += 1;
    }
    mask
};

/// True if a TCP segment with `flags` is impossible ([`BAD_TCP_FLAGS`]):
/// one shift and one test.
#[inline(always)]
fn is_bad_tcp_flags(flags: u16) -> bool {
    (BAD_TCP_FLAGS >> (flags & 0x3f)) & 1 != 0
}

/// True if a client's segment opens a TCP connection: SYN without ACK.
#[inline(always)]
fn is_opening(protocol: u8, tcp_flags: u16) -> bool {
    protocol == ipv4::protocol::TCP && tcp_flags & (tcp::flags::SYN | tcp::flags::ACK) == tcp::flags::SYN
}

/// True if `l4` starts with an ICMP echo request (type 8, code 0), the one
/// message the fast path answers for the gateway's addresses.
#[inline]
fn is_echo_request(l4: &[u8]) -> bool {
    l4.len() >= icmp::HEADER_LEN && l4[0] == icmp::message::ECHO_REQUEST && l4[1] == 0
}

/// The header fields of a TCP or UDP packet the pipeline decides on.
#[derive(Clone, Copy)]
struct Tuple {
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    ttl: u8,
    tcp_flags: u16,
}

/// The backend a client packet goes to: its index in the service's
/// backends, and for FullNAT the flow's source pair (else zeros). Eight
/// bytes, so a [`Choice`] comes back in registers.
#[derive(Clone, Copy)]
struct Chosen {
    index: u16,
    snat_port: u16,
    snat_addr: u32,
}

/// The backend decision for a client packet.
enum Choice {
    /// Forward to this backend.
    Backend(Chosen),
    /// The service has no backend that takes new flows.
    None,
    /// A new FullNAT flow found no free source pair.
    Exhausted,
    /// A new flow over its service's limit for the client's source.
    Limited,
    /// The flow's backend left a service whose policy is to reset such
    /// flows; the flow is already forgotten.
    Reset,
}

/// The hash Maglev picks a new flow's backend by: `spread`, the flow hash
/// of `key`, or with client-IP affinity the flow hash of `key` without the
/// client's port, so that every connection of a client (to this service)
/// gets the same choice on every worker and every gateway.
#[inline(always)]
fn pick_hash(svc: &Service, key: &FlowKey, spread: u32) -> u32 {
    match svc.affinity {
        Affinity::None => spread,
        Affinity::ClientIp => flow_hash(&FlowKey { src_port: 0, ..*key }),
    }
}

/// The worker of `workers` that owns the flows of client `addr:port` over
/// `protocol`. Both directions of a flow give the same answer: the client is
/// the source of its requests and the destination of the replies (nat mode).
/// A multiply-shift of the three fields: every input bit reaches the high
/// half, which picks the worker without a division.
#[inline(always)]
#[must_use]
pub fn client_owner(addr: u32, port: u16, protocol: u8, workers: u16) -> u16 {
    let x =
        ((u64::from(addr) << 32) | (u64::from(port) << 8) | u64::from(protocol)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (((x >> 32) * u64::from(workers)) >> 32) as u16
}

/// Bits that vary a DSR tunnel's outer source with the client, so that the
/// backend's NIC spreads tunnels over its queues with RSS.
#[inline(always)]
fn tunnel_spread(addr: u32, port: u16) -> u32 {
    ((((u64::from(addr) << 16) ^ u64::from(port)).wrapping_mul(0xD6E8_FEB8_6659_FD93)) >> 32) as u32
}

/// DSR: decrements the inner TTL and encapsulates the packet in IPIP to
/// `backend` (see [`encapsulate`]). A packet that would exceed the egress
/// port's MTU once encapsulated is not sent: with DF set, the client gets
/// ICMP "fragmentation needed" advertising the MTU left for it (path MTU
/// discovery, RFC 1191), the `Err` verdict; without DF it is dropped as
/// `too_big`. Out of line, so that the nat path stays compact.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn dsr_encapsulate(
    p: &mut RxPacket<'_>,
    snap: &Snapshot,
    backend: &Backend,
    source_mask: u32,
    mac: EthernetAddress,
    t: Tuple,
    total: usize,
    counters: &WorkerCounters,
) -> Result<(), Verdict> {
    const OUTER: usize = ipv4::MIN_HEADER_LEN;
    let Some(port) = snap.ports().get(usize::from(backend.next_hop.port)) else {
        return Err(Verdict::Drop(DropReason::NoRoute));
    };
    if total + OUTER > usize::from(port.mtu) {
        let ip = ipv4::Packet::new_unchecked(&p.buf[p.start + ethernet::HEADER_LEN..p.end]);
        if !ip.dont_frag() {
            return Err(Verdict::Drop(DropReason::TooBig));
        }
        let hl = ip.header_len();
        let in_port = p.port;
        let Some(from) = snap.ports().get(usize::from(in_port)).and_then(|q| q.source_for(t.src)) else {
            return Err(Verdict::Drop(DropReason::TooBig));
        };
        frag_needed_in_place(p, snap, in_port, hl, port.mtu - OUTER as u16, from);
        counters.icmp_frag_needed.inc();
        return Err(Verdict::Transmit(in_port));
    }
    let Ok(total_len) = u16::try_from(total + OUTER) else {
        return Err(Verdict::Drop(DropReason::Unsupported));
    };
    if p.start < OUTER {
        return Err(Verdict::Drop(DropReason::NoHeadroom));
    }
    let mut ip = ipv4::Packet::new_unchecked(&mut p.buf[p.start + ethernet::HEADER_LEN..p.end]);
    ip.set_ttl(t.ttl - 1);
    let outer = ipv4::Header {
        tos: ip.tos(),
        total_len,
        dont_frag: ip.dont_frag(),
        ttl: ORIGIN_TTL,
        protocol: ipv4::protocol::IPIP,
        src: backend.tunnel_src | (tunnel_spread(t.src, t.sport) & source_mask),
        dst: backend.addr,
    };
    let done = encapsulate(p, &outer, mac, port.mac);
    debug_assert!(done, "headroom checked above");
    Ok(())
}

/// Turns the packet into ICMP destination unreachable, "fragmentation
/// needed and DF set" (type 3, code 4) with next-hop MTU `mtu` (RFC 1191),
/// from `from` back to the packet's sender on the ingress port. It quotes
/// the packet's IP header and the first 8 bytes of its payload (RFC 792),
/// and the frame shrinks to fit. The caller guarantees the packet is longer
/// than the answer (it exceeded an MTU of at least 576).
fn frag_needed_in_place(p: &mut RxPacket<'_>, snap: &Snapshot, in_port: u16, hl: usize, mtu: u16, from: u32) {
    const ICMP_HEADER: usize = 8;
    let quoted = hl + 8;
    let ip_at = ethernet::HEADER_LEN;
    let icmp_at = ip_at + ipv4::MIN_HEADER_LEN;
    let f = p.frame_mut();
    let client = ipv4::Packet::new_unchecked(&f[ip_at..]).src_addr();
    f.copy_within(ip_at..ip_at + quoted, icmp_at + ICMP_HEADER);
    let icmp_len = ICMP_HEADER + quoted;
    let (ip, msg) = f[ip_at..icmp_at + icmp_len].split_at_mut(ipv4::MIN_HEADER_LEN);
    write_icmp_error(ip, msg, [3, 4, 0, 0, 0, 0, (mtu >> 8) as u8, mtu as u8], from, client);
    let (eth, _) = f.split_at_mut(ethernet::HEADER_LEN);
    let sender = ethernet::Frame::new_unchecked(&*eth).src_addr();
    set_macs(eth, snap, in_port, sender);
    // At least Ethernet's minimum frame (60 bytes without FCS).
    p.truncate((icmp_at + icmp_len).max(60));
}

/// Writes an ICMP error: its 8-byte header `head` (type, code, the
/// checksum's place, 4 bytes of the type's own) at the start of `msg`,
/// which holds the quote after it, the checksum over `msg`, and in `ip` an
/// IPv4 header from `from` to `to` carrying it (TTL 64, no DF).
fn write_icmp_error(ip: &mut [u8], msg: &mut [u8], head: [u8; 8], from: u32, to: u32) {
    msg[..8].copy_from_slice(&head);
    fill_icmp_checksum(msg);
    ipv4::Header {
        tos: 0,
        total_len: (ipv4::MIN_HEADER_LEN + msg.len()) as u16,
        dont_frag: false,
        ttl: ORIGIN_TTL,
        protocol: ipv4::protocol::ICMP,
        src: from,
        dst: to,
    }
    .emit(ip);
}

/// Writes a fresh checksum into ICMP message `msg` (its header, then what
/// it carries), computed over the whole message.
fn fill_icmp_checksum(msg: &mut [u8]) {
    msg[2..4].copy_from_slice(&[0, 0]);
    let c = crate::checksum::checksum(msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
}

/// How much longer than its quoted part an ICMP error is: its IPv4 and
/// ICMP headers.
const ICMP_ERROR_GROWTH: usize = ipv4::MIN_HEADER_LEN + 8;

/// Turns the packet into ICMP time exceeded in transit (type 11, code 0)
/// from `from` back to its sender on the ingress port, quoting its IP
/// header (`hl` bytes) and the first 8 bytes of its payload (RFC 792). The
/// quoted bytes stay where they are: the new Ethernet, IPv4 and ICMP
/// headers are written in front of them, over the old Ethernet header and
/// [`ICMP_ERROR_GROWTH`] bytes of headroom, which the caller has checked,
/// and the frame ends after the quote. The packet carries at least 8 bytes
/// after its IP header (a TCP or UDP header, checked).
fn time_exceeded_in_place(p: &mut RxPacket<'_>, snap: &Snapshot, in_port: u16, hl: usize, from: u32) {
    const ICMP_HEADER: usize = 8;
    let quoted = hl + 8;
    let ip_at = p.start + ethernet::HEADER_LEN;
    debug_assert!(p.start >= ICMP_ERROR_GROWTH && ip_at + quoted <= p.end);
    let sender = ethernet::Frame::new_unchecked(&p.buf[p.start..ip_at]).src_addr();
    let client = ipv4::Packet::new_unchecked(&p.buf[ip_at..p.end]).src_addr();
    let start = p.start - ICMP_ERROR_GROWTH;
    let icmp_at = ip_at - ICMP_HEADER;
    let icmp_len = ICMP_HEADER + quoted;
    let new_ip_at = start + ethernet::HEADER_LEN;
    let (ip, msg) = p.buf[new_ip_at..icmp_at + icmp_len].split_at_mut(ipv4::MIN_HEADER_LEN);
    write_icmp_error(ip, msg, [11, 0, 0, 0, 0, 0, 0, 0], from, client);
    let eth = &mut p.buf[start..new_ip_at];
    ethernet::Frame::new_unchecked(&mut *eth).set_ethertype(EtherType::IPV4);
    set_macs(eth, snap, in_port, sender);
    p.start = start;
    p.end = icmp_at + icmp_len;
}

/// Prepends an Ethernet header and the outer IPv4 header `outer` in front of
/// the packet's IPv4 header, in the headroom: the old Ethernet header is
/// overwritten, the inner packet does not move. False (nothing changed) if
/// the headroom is too small. Always inlined: direct server return's
/// per-packet path must not pay a call for it (the fragment path shares it).
#[inline(always)]
fn encapsulate(p: &mut RxPacket<'_>, outer: &ipv4::Header, dst: EthernetAddress, src: EthernetAddress) -> bool {
    let Some(start) = p.start.checked_sub(ipv4::MIN_HEADER_LEN) else {
        return false;
    };
    let b = &mut p.buf[start..];
    let mut eth = ethernet::Frame::new_unchecked(&mut b[..ethernet::HEADER_LEN]);
    eth.set_dst_addr(dst);
    eth.set_src_addr(src);
    eth.set_ethertype(EtherType::IPV4);
    outer.emit(&mut b[ethernet::HEADER_LEN..]);
    p.start = start;
    true
}

/// Turns a client's TCP segment into the VIP's reset of that connection,
/// in place, addressed back to the client on the port it came in on (RFC
/// 9293 section 3.10.7.1: a RST answering a segment with ACK takes its
/// sequence number from that ACK; otherwise it acknowledges the segment).
/// The frame keeps its length; bytes past the new IP total length are
/// zeroed Ethernet padding.
fn reset_in_place(eth: &mut [u8], hdr: &mut [u8], l4: &mut [u8], snap: &Snapshot, in_port: u16) {
    let (src_port, dst_port, seq, ack, flags) = {
        let t = tcp::Packet::new_unchecked(&*l4);
        (t.src_port(), t.dst_port(), t.seq(), t.ack(), t.flags())
    };
    let seg_len = (l4.len() - tcp::Packet::new_unchecked(&*l4).header_len()) as u32
        + u32::from(flags & tcp::flags::SYN != 0)
        + u32::from(flags & tcp::flags::FIN != 0);
    let (rst_seq, rst_ack, rst_flags) = if flags & tcp::flags::ACK != 0 {
        (ack, 0, tcp::flags::RST)
    } else {
        (0, seq.wrapping_add(seg_len), tcp::flags::RST | tcp::flags::ACK)
    };
    // TCP: a bare 20-byte header.
    l4.fill(0);
    let t = &mut l4[..tcp::MIN_HEADER_LEN];
    t[0..2].copy_from_slice(&dst_port.to_be_bytes());
    t[2..4].copy_from_slice(&src_port.to_be_bytes());
    t[4..8].copy_from_slice(&rst_seq.to_be_bytes());
    t[8..12].copy_from_slice(&rst_ack.to_be_bytes());
    t[12..14].copy_from_slice(&((5u16 << 12) | rst_flags).to_be_bytes());
    // IP: swap the addresses, a fresh TTL, no options' worth of payload.
    let mut ip = ipv4::Packet::new_unchecked(&mut *hdr);
    ip.swap_addrs();
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let hl = ip.header_len();
    hdr[2..4].copy_from_slice(&((hl + tcp::MIN_HEADER_LEN) as u16).to_be_bytes());
    hdr[8] = ORIGIN_TTL;
    ipv4::Packet::new_unchecked(&mut *hdr).fill_checksum();
    tcp::Packet::new_unchecked(&mut l4[..tcp::MIN_HEADER_LEN]).fill_checksum(src, dst);
    let sender = ethernet::Frame::new_unchecked(&*eth).src_addr();
    set_macs(eth, snap, in_port, sender);
}

/// Which end of a flow a rewrite changes.
#[derive(Clone, Copy)]
enum Endpoint {
    Src,
    Dst,
}

/// Rewrites the port of one endpoint of a TCP or UDP header and fixes its
/// checksum for that and for the pseudo-header address change `old -> new`.
/// The caller has already checked the header with `new_checked`.
#[inline(always)]
fn rewrite_l4(proto: u8, l4: &mut [u8], end: Endpoint, old_addr: u32, new_addr: u32, new_port: u16) {
    if proto == ipv4::protocol::TCP {
        let mut t = tcp::Packet::new_unchecked(l4);
        t.update_checksum_for_addr(old_addr, new_addr);
        match end {
            Endpoint::Src => t.set_src_port(new_port),
            Endpoint::Dst => t.set_dst_port(new_port),
        }
    } else {
        let mut u = udp::Packet::new_unchecked(l4);
        u.update_checksum_for_addr(old_addr, new_addr);
        match end {
            Endpoint::Src => u.set_src_port(new_port),
            Endpoint::Dst => u.set_dst_port(new_port),
        }
    }
}

/// Whether `frame` (at least an Ethernet header long) is for `port`: its
/// destination MAC is the port's own, or a group address (the I/G bit set:
/// broadcast, multicast). A unicast frame for another MAC reached this port
/// only because the segment flooded it, as a bridge does with a destination
/// it has not learned; like a Linux host (`PACKET_OTHERHOST`) the gateway
/// takes no part in it. A port the snapshot does not know has no MAC of its
/// own, so only group frames pass. The destination is read as one word (the
/// header is in cache, about to be read anyway) and compared with the
/// port's MAC word from the snapshot; the I/G bit is the lowest bit of the
/// first byte, so of the little-endian word.
#[inline(always)]
fn addressed_to_port(snap: &Snapshot, port: u16, frame: &[u8]) -> bool {
    let Some(head) = frame.first_chunk::<8>() else { return false };
    let dst = u64::from_le_bytes(*head) & MAC_WORD_MASK;
    snap.port_mac_word(port) == Some(dst) || dst & 1 != 0
}

/// Sets the Ethernet addresses for transmission on `port` to `dst`.
#[inline(always)]
fn set_macs(eth: &mut [u8], snap: &Snapshot, port: u16, dst: EthernetAddress) {
    let mut f = ethernet::Frame::new_unchecked(eth);
    f.set_dst_addr(dst);
    if let Some(p) = snap.ports().get(usize::from(port)) {
        f.set_src_addr(p.mac);
    }
}

mod fragments;
mod icmp_errors;
mod vlan;
pub use fragments::fragment_owner;
use vlan::tag_egress;

#[cfg(test)]
mod tests;
