//! The compiled, immutable forwarding state a worker reads.
//!
//! Owns: turning a validated description of ports, routes and services into
//! lookup structures (service map, Maglev tables, reverse-NAT map, routes,
//! next hops per backend). Everything a worker needs per packet is
//! precomputed here, off the worker cores. Must not parse configuration files
//! or touch packets.
//!
//! Compilation is incremental: [`Snapshot::build_incremental`] takes the
//! previously published snapshot and shares (`Arc`) every compiled service
//! whose specification and dependencies (next hops through routes and
//! ports, slots, source pool index, tunnel source) came out the same, and
//! reuses the Maglev table of a service whose backends and weights did not
//! change even if something else about it did. The lookup indexes are not
//! rebuilt for a change of a few services: they are copied from the
//! previous snapshot and patched for those services only ([`SpecDelta`],
//! [`Snapshot::build_changed`]). The result is the snapshot a build from
//! scratch makes; only the work differs.

use crate::admission::{NewFlowLimit, NewFlowLimitError, SourceLimit};
use crate::maglev::{MaglevBackend, MaglevError, MaglevTable};
use crate::route::{NO_SLOT, NextHop, Route, RouteTable};
use crate::sources::{SourceRanges, SourceRangesError};
use crate::wire::EthernetAddress;
use ahash::RandomState;
use hashbrown::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Transport protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => crate::wire::ipv4::protocol::TCP,
            Protocol::Udp => crate::wire::ipv4::protocol::UDP,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// What happens to a flow whose backend left its service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnBackendRemoval {
    /// Move the flow to the backend Maglev picks now (TCP connections break
    /// at the new backend, which answers with a reset of its own; UDP
    /// exchanges simply continue there).
    #[default]
    Rehash,
    /// Answer the client's next TCP segment with a reset from the VIP and
    /// forget the flow; a UDP flow is forgotten and its packet dropped, so
    /// the next one starts a new flow.
    Reset,
}

/// What Maglev hashes to pick a new flow's backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Affinity {
    /// The flow's 5-tuple: a client's connections spread over the backends.
    #[default]
    None,
    /// The client's address alone: every connection of a client goes to
    /// the same backend while it takes new flows (Kubernetes'
    /// `sessionAffinity: ClientIP`, without its timeout). Flows are still
    /// tracked per 5-tuple.
    ClientIp,
}

impl Affinity {
    /// Lower-case name, as in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Affinity::None => "none",
            Affinity::ClientIp => "client_ip",
        }
    }
}

/// How a service's packets reach its backends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ForwardingMode {
    /// Destination NAT: the client's address is kept; replies come back
    /// through a gateway, which translates them back using configuration
    /// alone (any gateway with the same configuration can).
    #[default]
    Nat,
    /// Destination and source NAT: the source becomes an address and port
    /// of the named source pool, so backends need no route back through the
    /// gateway. Replies need the flow's state; the worker that owns it
    /// follows from the reply's destination port.
    FullNat {
        /// Name of the source pool.
        pool: String,
    },
    /// Direct server return: the client's packet is encapsulated in IPv4
    /// (IPIP, RFC 2003) to the backend, which answers the client directly.
    Dsr {
        /// Outer source addresses: a flow-dependent address from this prefix,
        /// so that the backend's NIC spreads tunnels over its queues. `None`:
        /// the egress port's address.
        tunnel_source: Option<Ipv4Cidr>,
    },
}

impl ForwardingMode {
    /// Lower-case name, as in the configuration.
    pub fn name(&self) -> &'static str {
        match self {
            ForwardingMode::Nat => "nat",
            ForwardingMode::FullNat { .. } => "fullnat",
            ForwardingMode::Dsr { .. } => "dsr",
        }
    }
}

/// A FullNAT source pool: addresses the gateway owns and the source ports
/// it may use on each. The port range is split into equal slices, one per
/// worker, so a reply's destination port names the worker holding its flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourcePoolSpec {
    /// Operator-facing name.
    pub name: String,
    /// Addresses; the gateway answers ARP for them.
    pub addresses: Vec<u32>,
    /// First source port.
    pub first_port: u16,
    /// Last source port (inclusive).
    pub last_port: u16,
}

/// An IPv4 address with prefix length, as configured on a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// Address (host byte order).
    pub addr: u32,
    /// Prefix length.
    pub len: u8,
}

/// One port as the snapshot needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// Operator-facing name.
    pub name: String,
    /// MAC address of the port.
    pub mac: EthernetAddress,
    /// Addresses of the gateway on this port.
    pub addresses: Vec<Ipv4Cidr>,
    /// Largest IP packet the port sends (its MTU, [`DEFAULT_MTU`] unless
    /// configured): a DSR packet that would exceed it once encapsulated is
    /// answered with ICMP "fragmentation needed".
    pub mtu: u16,
    /// An 802.1Q VLAN carried tagged by another port: that port's dense
    /// index (a port without a VLAN of its own, listed before every VLAN)
    /// and the VLAN's id. The interface has the carrying port's MAC (its
    /// `mac` here is ignored) and its own addresses and MTU.
    pub vlan: Option<VlanSpec>,
}

/// Where a VLAN interface's frames go: tagged on a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VlanSpec {
    /// Dense index of the port carrying the VLAN.
    pub port: u16,
    /// The VLAN id, 1 to 4094.
    pub id: u16,
}

/// The MTU of a port unless configured: Ethernet's 1500.
pub const DEFAULT_MTU: u16 = 1500;

/// A static route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    /// Destination prefix.
    pub prefix: Ipv4Cidr,
    /// Gateway; must be on a connected subnet.
    pub via: u32,
}

/// A backend of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    /// Address.
    pub addr: u32,
    /// Port.
    pub port: u16,
    /// Maglev weight (0: no new flows).
    pub weight: u32,
    /// Where the workers count its traffic ([`crate::stats`]): chosen by
    /// the control plane, unique among the snapshot's backends;
    /// [`crate::stats::NO_SLOT`] to leave it uncounted.
    pub stats_slot: u32,
}

/// A service: VIP, port and protocol, and its backends. Compared as a whole
/// (`==`) by the incremental compiler: a service whose specification is
/// unchanged may be reused from the previous snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Operator-facing name.
    pub name: String,
    /// Virtual IP.
    pub vip: u32,
    /// Virtual port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Maglev table size (prime).
    pub table_size: u32,
    /// Backends.
    pub backends: Vec<BackendSpec>,
    /// What happens to the flows of a backend that leaves the service.
    pub on_backend_removal: OnBackendRemoval,
    /// How packets reach the backends.
    pub mode: ForwardingMode,
    /// The limit on new flows per client source, if any.
    pub new_flow_limit: Option<NewFlowLimit>,
    /// The client prefixes served (host bits ignored); empty: every
    /// client. At most [`crate::sources::MAX_SOURCE_RANGES`].
    pub source_ranges: Vec<Ipv4Cidr>,
    /// What picks a new flow's backend.
    pub affinity: Affinity,
}

/// A permanent neighbour entry (like `ip neigh add ... nud permanent`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeighbourSpec {
    /// On-link address.
    pub addr: u32,
    /// Its MAC.
    pub mac: EthernetAddress,
}

/// Everything a snapshot is built from.
#[derive(Clone, Debug, Default)]
pub struct SnapshotSpec {
    /// Ports in dense index order.
    pub ports: Vec<PortSpec>,
    /// Static routes.
    pub routes: Vec<RouteSpec>,
    /// Permanent neighbours.
    pub neighbours: Vec<NeighbourSpec>,
    /// Services, each shared (an `Arc`): the control plane keeps its
    /// services' descriptions and hands them over without copying them, and
    /// a compiled service keeps the one it was compiled from. Change one
    /// with `Arc::make_mut`.
    pub services: Vec<Arc<ServiceSpec>>,
    /// FullNAT source pools.
    pub source_pools: Vec<SourcePoolSpec>,
}

/// Why a snapshot could not be built. Each names the offending item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Two services share VIP, port and protocol.
    #[error("services {first:?} and {second:?} both use {vip}:{port}/{protocol}")]
    DuplicateService {
        /// First service.
        first: String,
        /// Second service.
        second: String,
        /// VIP.
        vip: std::net::Ipv4Addr,
        /// Port.
        port: u16,
        /// Protocol name.
        protocol: &'static str,
    },
    /// A backend address:port/protocol serves two services, so replies from
    /// it could not be translated back unambiguously.
    #[error(
        "backend {addr}:{port}/{protocol} is used by both {first:?} and {second:?}; replies could not be mapped back to one VIP"
    )]
    SharedBackend {
        /// Backend address.
        addr: std::net::Ipv4Addr,
        /// Backend port.
        port: u16,
        /// Protocol name.
        protocol: &'static str,
        /// First service.
        first: String,
        /// Second service.
        second: String,
    },
    /// No route reaches a backend.
    #[error("service {service:?}: no route to backend {addr}")]
    BackendUnreachable {
        /// Service.
        service: String,
        /// Backend address.
        addr: std::net::Ipv4Addr,
    },
    /// A static route's gateway is not on a connected subnet.
    #[error("route {prefix}/{len}: gateway {via} is not on any port's subnet")]
    GatewayNotOnLink {
        /// Prefix.
        prefix: std::net::Ipv4Addr,
        /// Length.
        len: u8,
        /// Gateway.
        via: std::net::Ipv4Addr,
    },
    /// A VIP is also an address of a port.
    #[error("service {service:?}: VIP {vip} is also an address of port {port:?}")]
    VipIsLocal {
        /// Service.
        service: String,
        /// VIP.
        vip: std::net::Ipv4Addr,
        /// Port name.
        port: String,
    },
    /// The Maglev table could not be built.
    #[error("service {service:?}: {source}")]
    Maglev {
        /// Service.
        service: String,
        /// Cause.
        source: MaglevError,
    },
    /// A permanent neighbour is not on any port's subnet.
    #[error("neighbour {addr} is not on any port's subnet")]
    NeighbourNotOnLink {
        /// The address.
        addr: std::net::Ipv4Addr,
    },
    /// More ports than the dataplane supports.
    #[error("{0} ports configured; at most {max} are supported", max = u16::MAX)]
    TooManyPorts(usize),
    /// A VLAN interface that names no port to carry it, a port that is
    /// itself a VLAN, an id out of 1..=4094, a VLAN listed twice on a port,
    /// or a port listed after a VLAN.
    #[error("port {port:?}: {reason}")]
    BadVlan {
        /// The VLAN interface.
        port: String,
        /// What is wrong.
        reason: String,
    },
    /// A service's limit on new flows is out of bounds.
    #[error("service {service:?}: new_flow_limit.{}: {source}", source.field())]
    NewFlowLimit {
        /// Service.
        service: String,
        /// Cause.
        source: NewFlowLimitError,
    },
    /// A service's source list is out of bounds.
    #[error("service {service:?}: source_ranges: {source}")]
    SourceRanges {
        /// Service.
        service: String,
        /// Cause.
        source: SourceRangesError,
    },
    /// A FullNAT service names a source pool that does not exist.
    #[error("service {service:?}: source pool {pool:?} does not exist")]
    UnknownPool {
        /// Service.
        service: String,
        /// The pool it names.
        pool: String,
    },
    /// A source pool is unusable: an address the gateway or another pool
    /// already uses, an empty pool, or an empty or reversed port range.
    #[error("source pool {pool:?}: {reason}")]
    BadPool {
        /// Pool.
        pool: String,
        /// What is wrong.
        reason: String,
    },
    /// A DSR backend listens on another port than the service: DSR cannot
    /// translate ports (the backend answers the client directly).
    #[error(
        "service {service:?}: backend {addr}:{port}: direct server return cannot change the port; the backend must listen on {service_port}"
    )]
    DsrPort {
        /// Service.
        service: String,
        /// Backend address.
        addr: std::net::Ipv4Addr,
        /// Backend port.
        port: u16,
        /// The service's port.
        service_port: u16,
    },
}

/// A backend, ready for the fast path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Address.
    pub addr: u32,
    /// Port.
    pub port: u16,
    /// Where packets to it leave.
    pub next_hop: NextHop,
    /// DSR: the outer source address (the base of the tunnel source prefix,
    /// or the egress port's address); 0 in other modes.
    pub tunnel_src: u32,
    /// Its stats slot ([`BackendSpec::stats_slot`]).
    pub stats: u32,
    /// Whether it takes new flows (weight above 0). A drained, disabled or
    /// failed backend is compiled with weight 0: Maglev never picks it, and
    /// a new connection (a SYN) on a flow still tracked to it is given a
    /// fresh choice instead of reusing the old flow's backend.
    pub takes_new_flows: bool,
}

/// A service's forwarding mode, compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Destination NAT.
    Nat,
    /// Destination and source NAT from this source pool (index into
    /// [`Snapshot::source_pools`]).
    FullNat {
        /// The pool.
        pool: u16,
    },
    /// IPIP to the backend; the outer source is the backend's `tunnel_src`
    /// with the bits of `source_mask` taken from the flow.
    Dsr {
        /// Host bits of the tunnel source prefix (0: one fixed source).
        source_mask: u32,
    },
}

/// A compiled service.
#[derive(Clone, Debug)]
pub struct Service {
    /// Name.
    pub name: String,
    /// VIP.
    pub vip: u32,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Maglev lookup table (slot -> index into `backends`).
    pub maglev: MaglevTable,
    /// Backends, in configuration order.
    pub backends: Vec<Backend>,
    /// What happens to the flows of a backend that leaves the service.
    pub on_backend_removal: OnBackendRemoval,
    /// How packets reach the backends.
    pub mode: Mode,
    /// The limit on new flows per client source, if any.
    pub new_flow_limit: Option<SourceLimit>,
    /// The client addresses served: a packet from any other is dropped
    /// (`source_denied`). Empty: every client.
    pub source_ranges: SourceRanges,
    /// What picks a new flow's backend.
    pub affinity: Affinity,
    /// What it was compiled from: the incremental compiler compares it with
    /// the next specification of the service.
    spec: Arc<ServiceSpec>,
}

impl Service {
    /// The specification this service was compiled from.
    pub fn spec(&self) -> &ServiceSpec {
        &self.spec
    }

    /// Where the backend `addr:port` stands in `backends`. A scan: called
    /// only when a flow's cached position no longer matches (after a
    /// configuration change), never for the packets of a steady flow.
    pub fn position(&self, addr: u32, port: u16) -> Option<usize> {
        self.backends.iter().position(|b| b.addr == addr && b.port == port)
    }
}

/// A compiled port.
#[derive(Clone, Debug)]
pub struct Port {
    /// Name.
    pub name: String,
    /// MAC.
    pub mac: EthernetAddress,
    /// Addresses.
    pub addresses: Vec<Ipv4Cidr>,
    /// MTU.
    pub mtu: u16,
    /// For a VLAN interface: the port carrying it, and the VLAN id.
    pub vlan: Option<VlanSpec>,
}

impl Port {
    /// The port address on the same subnet as `addr`, if any.
    pub fn address_for(&self, addr: u32) -> Option<u32> {
        self.addresses.iter().find(|c| (c.addr ^ addr) & Route::mask(c.len) == 0).map(|c| c.addr)
    }

    /// The address the gateway speaks to `addr` from on this port: the one
    /// on `addr`'s subnet, else the port's first; `None` for a port with
    /// no address.
    pub fn source_for(&self, addr: u32) -> Option<u32> {
        self.address_for(addr).or_else(|| self.addresses.first().map(|c| c.addr))
    }
}

/// Where a reply from a backend is translated back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReverseNat {
    /// VIP.
    pub vip: u32,
    /// Virtual port.
    pub port: u16,
    /// The backend's stats slot, to count the reply under.
    pub stats: u32,
}

/// Packs (address, port, protocol) into one hashable word.
#[inline(always)]
pub(crate) fn l4_key(addr: u32, port: u16, protocol: u8) -> u64 {
    (u64::from(addr) << 32) | (u64::from(port) << 8) | u64::from(protocol)
}

/// Source of snapshot generations: every snapshot built in a process has
/// its own.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// The distinct next hops of a snapshot being built, in first-use order:
/// slot `i` is entry `i`. Indexed, so that 100,000 backends cost 100,000
/// hash lookups rather than a scan each.
#[derive(Default)]
struct KnownHops {
    list: Vec<NextHop>,
    index: std::collections::HashMap<(u16, u32), u32>,
}

impl KnownHops {
    /// The slot of the next hop `(port, addr)`, added if new.
    fn slot(&mut self, port: u16, addr: u32) -> u32 {
        let list = &mut self.list;
        *self.index.entry((port, addr)).or_insert_with(|| {
            let slot = list.len() as u32;
            list.push(NextHop { port, addr, slot });
            slot
        })
    }
}

/// True if a Maglev table built for `a` is the one `b` would get: same size,
/// same backends (address and port make the stable key) in the same order,
/// same weights. Nothing else a backend may carry affects the table.
fn same_maglev_inputs(a: &ServiceSpec, b: &ServiceSpec) -> bool {
    a.table_size == b.table_size
        && a.backends.len() == b.backends.len()
        && a.backends.iter().zip(&b.backends).all(|(x, y)| x.addr == y.addr && x.port == y.port && x.weight == y.weight)
}

/// What a build took over from the previous snapshot and what it compiled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildStats {
    /// Compiled services shared whole with the previous snapshot.
    pub services_reused: usize,
    /// Services compiled again around the previous snapshot's Maglev table
    /// (their backends' weights were unchanged, but something else, such as
    /// a next hop, the mode or the slot numbering, was not).
    pub tables_reused: usize,
    /// Maglev tables built.
    pub tables_built: usize,
}

/// The immutable forwarding state.
#[derive(Debug)]
pub struct Snapshot {
    generation: u64,
    /// Equal to the previous snapshot's when the next hops, permanent
    /// neighbours and source pools are: what a worker's per-snapshot caches
    /// are built from.
    cache_generation: u64,
    /// The desired-state version this was compiled from (0: not given).
    version: u64,
    build_stats: BuildStats,
    ports: Vec<Port>,
    /// Each port's MAC as [`mac_word`] makes it, by dense index: the
    /// destination MAC filter compares one word per packet.
    port_macs: Vec<u64>,
    /// Ports without a VLAN (the first ones): the driver's devices.
    devices: u16,
    /// VLAN interfaces by `(carrying port << 16) | VLAN id`, sorted, with
    /// their dense index.
    vlans: Vec<(u32, u16)>,
    local: HashMap<u32, u16, RandomState>,
    vips: HashSet<u32, RandomState>,
    services: HashMap<u64, u32, RandomState>,
    /// Shared with the snapshots compiled before and after this one while
    /// the service does not change.
    service_list: Vec<Arc<Service>>,
    reverse: HashMap<u64, ReverseNat, RandomState>,
    routes: RouteTable,
    /// Shared with the snapshots before and after that have the same.
    next_hops: Arc<[NextHop]>,
    static_neighbours: HashMap<u32, EthernetAddress, RandomState>,
    source_pools: Vec<SourcePoolSpec>,
    /// Source pool address -> (pool index, address index in the pool).
    pool_addresses: HashMap<u32, (u16, u16), RandomState>,
    /// One bit per [`filter_bit`] of every pool address: most packets that
    /// are not for a pool address are told so by one load and a mask,
    /// without a hash lookup.
    pool_filter: [u64; 4],
    /// The exact addresses no packet may come from (port addresses, the
    /// directed broadcasts of port subnets, VIPs, pool addresses) and
    /// their [`filter_bit`]s, as for `pool_filter`: see
    /// [`Snapshot::is_martian_source`].
    martians: HashSet<u32, RandomState>,
    martian_filter: [u64; 4],
    /// What the next incremental build compares and reuses; never read
    /// by a worker (behind a pointer, so the fields a worker reads keep
    /// their places).
    meta: Box<BuildMeta>,
}

/// What an incremental build needs from the snapshot before it, beyond
/// the forwarding state: the inputs it compares, and the indexes it
/// patches (see [`Snapshot::build_changed`]).
#[derive(Debug)]
struct BuildMeta {
    /// The specification's ports, routes and permanent neighbours.
    ports: Vec<PortSpec>,
    routes: Vec<RouteSpec>,
    neighbours: Vec<NeighbourSpec>,
    /// Next-hop slots `0..route_hops` are the static routes' gateways: they
    /// stay whatever the services do.
    route_hops: u32,
    /// Service name -> position in the service list; `None` in the
    /// astronomically unlikely case that two names share a hash.
    names: Option<Arc<NameIndex>>,
    /// VIP -> how many services use it.
    vip_users: Arc<HashMap<u32, u32>>,
}

/// A MAC address as the low six bytes of a little-endian `u64` (the top two
/// bytes zero): the same word a frame's first eight bytes give under
/// [`MAC_WORD_MASK`], so a destination MAC compares in one instruction.
pub fn mac_word(mac: [u8; 6]) -> u64 {
    let mut b = [0u8; 8];
    b[..6].copy_from_slice(&mac);
    u64::from_le_bytes(b)
}

/// The bits of a little-endian `u64` that hold its first six bytes.
pub const MAC_WORD_MASK: u64 = 0x0000_ffff_ffff_ffff;

/// Builds the Maglev table of `s`. The keys are "a.b.c.d:port", so the
/// table depends on the backends themselves, not on their order in any list
/// but the service's own, and every gateway builds the same one.
fn build_maglev(s: &ServiceSpec) -> Result<MaglevTable, SnapshotError> {
    use std::fmt::Write;
    // All keys in one buffer: one allocation per service, not per backend.
    let mut keys = String::with_capacity(s.backends.len() * 21);
    let mut ends = Vec::with_capacity(s.backends.len());
    for b in &s.backends {
        // Writing to a String cannot fail.
        let _ = write!(keys, "{}:{}", ip4(b.addr), b.port);
        ends.push(keys.len());
    }
    let mb: Vec<MaglevBackend<'_>> = s
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| MaglevBackend {
            key: &keys.as_bytes()[if i == 0 { 0 } else { ends[i - 1] }..ends[i]],
            weight: b.weight,
        })
        .collect();
    MaglevTable::build(&mb, s.table_size).map_err(|source| SnapshotError::Maglev { service: s.name.clone(), source })
}

/// From how many Maglev tables to build a compilation builds them on
/// rayon's pool, in parallel, rather than one by one on its own thread:
/// below it (a change of a few services) the wake-ups of the pool's
/// threads cost more than they save.
pub const PARALLEL_TABLES: usize = 64;

/// The Maglev tables a compilation of `services` against `previous` must
/// build (those of services with no table there to reuse: new, or with
/// other backends, weights or size), built in parallel on rayon's pool,
/// by position in `services`; `None` at every other position. Every
/// entry is `None` when fewer than [`PARALLEL_TABLES`] are needed: they
/// are built in order then, by [`compile_service`]. A table that cannot
/// be built holds its error, which the compilation reports when it
/// reaches that service, as if it had built it there.
fn prebuild_tables(
    services: &[&Arc<ServiceSpec>],
    previous: Option<&Snapshot>,
) -> Vec<Option<Result<MaglevTable, SnapshotError>>> {
    use rayon::prelude::*;
    let needed: Vec<bool> = services
        .iter()
        .map(|s| {
            let old = previous
                .and_then(|p| p.service_index(s.vip, s.port, s.protocol.number()).map(|i| &p.service_list[i as usize]));
            !old.is_some_and(|old| same_maglev_inputs(&old.spec, s))
        })
        .collect();
    if needed.iter().filter(|&&n| n).count() < PARALLEL_TABLES {
        return Vec::new();
    }
    services.par_iter().zip(needed).map(|(s, needed)| needed.then(|| build_maglev(s))).collect()
}

/// The compiled backends of `s`: each one's next hop through `routes`, its
/// next-hop slot from `slot`, its DSR tunnel source. `nat_backend` sees
/// each backend of a nat service, in order, once its own checks passed.
fn compile_backends(
    s: &ServiceSpec,
    routes: &RouteTable,
    ports: &[Port],
    mut slot: impl FnMut(u16, u32) -> u32,
    mut nat_backend: impl FnMut(&BackendSpec) -> Result<(), SnapshotError>,
) -> Result<Vec<Backend>, SnapshotError> {
    let mut backends = Vec::with_capacity(s.backends.len());
    for b in &s.backends {
        let mut next_hop = routes
            .next_hop(b.addr)
            .ok_or_else(|| SnapshotError::BackendUnreachable { service: s.name.clone(), addr: ip4(b.addr) })?;
        next_hop.slot = slot(next_hop.port, next_hop.addr);
        let mut tunnel_src = 0;
        if let ForwardingMode::Dsr { tunnel_source } = &s.mode {
            if b.port != s.port {
                return Err(SnapshotError::DsrPort {
                    service: s.name.clone(),
                    addr: ip4(b.addr),
                    port: b.port,
                    service_port: s.port,
                });
            }
            tunnel_src = match tunnel_source {
                Some(c) => c.addr & Route::mask(c.len),
                None => {
                    let port = &ports[usize::from(next_hop.port)];
                    port.source_for(next_hop.addr).unwrap_or(0)
                }
            };
        }
        if matches!(s.mode, ForwardingMode::Nat) {
            nat_backend(b)?;
        }
        backends.push(Backend {
            addr: b.addr,
            port: b.port,
            next_hop,
            tunnel_src,
            stats: b.stats_slot,
            takes_new_flows: b.weight > 0,
        });
    }
    Ok(backends)
}

/// The compiled forwarding mode of `s` against the source pools `pools`.
fn compile_mode(s: &ServiceSpec, pools: &[SourcePoolSpec]) -> Result<Mode, SnapshotError> {
    Ok(match &s.mode {
        ForwardingMode::Nat => Mode::Nat,
        ForwardingMode::FullNat { pool } => match pools.iter().position(|p| &p.name == pool) {
            Some(i) => Mode::FullNat { pool: i as u16 },
            None => return Err(SnapshotError::UnknownPool { service: s.name.clone(), pool: pool.clone() }),
        },
        ForwardingMode::Dsr { tunnel_source } => {
            Mode::Dsr { source_mask: tunnel_source.map_or(0, |c| !Route::mask(c.len)) }
        }
    })
}

/// The compiled new-flow limit of `s`, if any.
fn compile_limit(s: &ServiceSpec) -> Result<Option<SourceLimit>, SnapshotError> {
    match &s.new_flow_limit {
        None => Ok(None),
        Some(l) => {
            l.validate().map_err(|source| SnapshotError::NewFlowLimit { service: s.name.clone(), source })?;
            Ok(Some(SourceLimit::new(l)))
        }
    }
}

/// The compiled service `s` from its compiled parts: `old` itself when it
/// came out the same, else a new one around `old`'s Maglev table when the
/// table's inputs are unchanged, else around a new table.
///
/// `built` is `s`'s table built beforehand ([`prebuild_tables`]), if it
/// was: used when a table is needed, instead of building it here.
fn compile_service(
    s: &Arc<ServiceSpec>,
    backends: Vec<Backend>,
    mode: Mode,
    new_flow_limit: Option<SourceLimit>,
    old: Option<&Arc<Service>>,
    built: Option<Result<MaglevTable, SnapshotError>>,
    stats: &mut BuildStats,
) -> Result<Arc<Service>, SnapshotError> {
    if let Some(old) = old
        && (Arc::ptr_eq(&old.spec, s) || *old.spec == **s)
        && old.backends == backends
        && old.mode == mode
    {
        stats.services_reused += 1;
        return Ok(Arc::clone(old));
    }
    let maglev = match old {
        Some(old) if same_maglev_inputs(&old.spec, s) => {
            stats.tables_reused += 1;
            old.maglev.clone()
        }
        _ => {
            stats.tables_built += 1;
            match built {
                Some(table) => table?,
                None => build_maglev(s)?,
            }
        }
    };
    let source_ranges = SourceRanges::new(&s.source_ranges)
        .map_err(|source| SnapshotError::SourceRanges { service: s.name.clone(), source })?;
    Ok(Arc::new(Service {
        name: s.name.clone(),
        vip: s.vip,
        port: s.port,
        protocol: s.protocol,
        maglev,
        backends,
        on_backend_removal: s.on_backend_removal,
        mode,
        new_flow_limit,
        source_ranges,
        affinity: s.affinity,
        spec: Arc::clone(s),
    }))
}

/// The bit of `addr` in a 256-bit address filter.
#[inline(always)]
fn filter_bit(addr: u32) -> usize {
    (addr.wrapping_mul(0x9E37_79B1) >> 24) as usize
}

/// The 256-bit filter of `addrs`: bit [`filter_bit`] of each is set.
fn address_filter<'a>(addrs: impl Iterator<Item = &'a u32>) -> [u64; 4] {
    addrs.fold([0u64; 4], |mut f, &a| {
        f[filter_bit(a) / 64] |= 1 << (filter_bit(a) % 64);
        f
    })
}

/// True if `addr` is in a prefix no packet may come from (RFC 1812 5.3.7,
/// RFC 1122 3.2.1.3): 0.0.0.0/8 ("this network"), 127.0.0.0/8 (loopback),
/// 224.0.0.0/4 (multicast) and 240.0.0.0/4 (class E, with the limited
/// broadcast 255.255.255.255). One shift and two compares.
#[inline(always)]
#[must_use]
pub fn is_martian_prefix(addr: u32) -> bool {
    let octet = addr >> 24;
    octet == 0 || octet == 127 || octet >= 224
}

fn ip4(a: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(a)
}

impl Snapshot {
    /// Compiles a snapshot from scratch. Fails, naming the culprit, on
    /// anything the fast path could not serve correctly.
    pub fn build(spec: &SnapshotSpec) -> Result<Snapshot, SnapshotError> {
        Snapshot::build_incremental(spec, None, 0)
    }

    /// Compiles a snapshot, reusing from `previous` (normally the snapshot
    /// the workers read now) every compiled service that comes out the
    /// same, and every Maglev table whose backends and weights are the same.
    /// `version` is the desired-state version the specification describes,
    /// carried for the workers to report. The result equals
    /// [`Snapshot::build`]'s (apart from `version` and the generations);
    /// the same errors are reported.
    ///
    /// Finds what changed by comparing every service of `spec` with the
    /// previous one at the same position ([`Snapshot::diff`]); a caller
    /// that knows which services a change touched saves that comparison
    /// with [`Snapshot::delta`] and [`Snapshot::build_changed`].
    pub fn build_incremental(
        spec: &SnapshotSpec,
        previous: Option<&Snapshot>,
        version: u64,
    ) -> Result<Snapshot, SnapshotError> {
        match previous {
            Some(p) => match p.diff(spec) {
                Some(delta) => Snapshot::build_changed(spec, p, version, &delta),
                None => Snapshot::build_whole(spec, &spec.services.iter().collect::<Vec<_>>(), previous, version),
            },
            None => Snapshot::build_whole(spec, &spec.services.iter().collect::<Vec<_>>(), None, version),
        }
    }

    /// Compiles every service of `services` (the services of `spec`, or
    /// stand-ins for them), reusing from `previous` what comes out the same.
    fn build_whole(
        spec: &SnapshotSpec,
        services: &[&Arc<ServiceSpec>],
        previous: Option<&Snapshot>,
        version: u64,
    ) -> Result<Snapshot, SnapshotError> {
        if spec.ports.len() > usize::from(u16::MAX) {
            return Err(SnapshotError::TooManyPorts(spec.ports.len()));
        }
        let devices = spec.ports.iter().take_while(|p| p.vlan.is_none()).count();
        let mut vlans = Vec::new();
        for p in &spec.ports[devices..] {
            let bad = |reason: String| SnapshotError::BadVlan { port: p.name.clone(), reason };
            let Some(v) = p.vlan else {
                return Err(bad("a port without a VLAN must come before every VLAN interface".into()));
            };
            if usize::from(v.port) >= devices {
                return Err(bad(format!("carried by port {}, which is not a port without a VLAN", v.port)));
            }
            if !(1..=4094).contains(&v.id) {
                return Err(bad(format!("VLAN id {} is not from 1 to 4094", v.id)));
            }
            let key = (u32::from(v.port) << 16) | u32::from(v.id);
            if vlans.iter().any(|&(k, _)| k == key) {
                return Err(bad(format!("VLAN {} is already on port {}", v.id, v.port)));
            }
            vlans.push((key, (devices + vlans.len()) as u16));
        }
        vlans.sort_unstable();
        let ports: Vec<Port> = spec
            .ports
            .iter()
            .map(|p| Port {
                name: p.name.clone(),
                // A VLAN interface sends from the MAC of the port carrying it.
                mac: p.vlan.map_or(p.mac, |v| spec.ports[usize::from(v.port)].mac),
                addresses: p.addresses.clone(),
                mtu: p.mtu,
                vlan: p.vlan,
            })
            .collect();

        let mut local = HashMap::with_hasher(RandomState::new());
        let mut routes = Vec::new();
        let mut next_hops = KnownHops::default();
        for (i, p) in ports.iter().enumerate() {
            for c in &p.addresses {
                local.insert(c.addr, i as u16);
                routes.push(Route { prefix: c.addr, len: c.len, port: i as u16, via: None, slot: NO_SLOT });
            }
        }
        let connected = RouteTable::new(routes.clone());
        for r in &spec.routes {
            let Some(hop) = connected.lookup(r.via) else {
                return Err(SnapshotError::GatewayNotOnLink {
                    prefix: ip4(r.prefix.addr),
                    len: r.prefix.len,
                    via: ip4(r.via),
                });
            };
            let slot = next_hops.slot(hop.port, r.via);
            routes.push(Route { prefix: r.prefix.addr, len: r.prefix.len, port: hop.port, via: Some(r.via), slot });
        }
        let route_hops = next_hops.list.len() as u32;
        let routes = RouteTable::new(routes);
        let mut static_neighbours = HashMap::with_hasher(RandomState::new());
        for n in &spec.neighbours {
            if connected.lookup(n.addr).is_none() {
                return Err(SnapshotError::NeighbourNotOnLink { addr: ip4(n.addr) });
            }
            static_neighbours.insert(n.addr, n.mac);
        }

        let all_vips: HashSet<u32> = services.iter().map(|s| s.vip).collect();
        let mut pool_addresses = HashMap::with_hasher(RandomState::new());
        for (pi, pool) in spec.source_pools.iter().enumerate() {
            let bad = |reason: String| SnapshotError::BadPool { pool: pool.name.clone(), reason };
            if pool.addresses.is_empty() {
                return Err(bad("has no addresses".to_owned()));
            }
            if pool.addresses.len() > usize::from(u16::MAX) || spec.source_pools.len() > usize::from(u16::MAX) {
                return Err(bad("too many pools or addresses".to_owned()));
            }
            if pool.first_port == 0 || pool.first_port > pool.last_port {
                return Err(bad(format!("port range {}-{} is empty or starts at 0", pool.first_port, pool.last_port)));
            }
            for (ai, &a) in pool.addresses.iter().enumerate() {
                if local.contains_key(&a) || all_vips.contains(&a) {
                    return Err(bad(format!("{} is already a port address or a VIP", ip4(a))));
                }
                if pool_addresses.insert(a, (pi as u16, ai as u16)).is_some() {
                    return Err(bad(format!("{} is in more than one pool (or twice in this one)", ip4(a))));
                }
            }
        }
        let total_backends: usize = services.iter().map(|s| s.backends.len()).sum();
        let mut vips = HashSet::with_capacity_and_hasher(services.len(), RandomState::new());
        let mut vip_users: HashMap<u32, u32> = HashMap::with_capacity(services.len());
        let mut service_map = HashMap::with_capacity_and_hasher(services.len(), RandomState::new());
        let mut reverse: HashMap<u64, ReverseNat, RandomState> =
            HashMap::with_capacity_and_hasher(total_backends, RandomState::new());
        let mut reverse_owner: HashMap<u64, usize> = HashMap::with_capacity(total_backends);
        let mut service_list = Vec::with_capacity(services.len());
        let mut stats = BuildStats::default();
        let mut tables = prebuild_tables(services, previous);
        for (si, &s) in services.iter().enumerate() {
            if let Some(&port) = local.get(&s.vip) {
                return Err(SnapshotError::VipIsLocal {
                    service: s.name.clone(),
                    vip: ip4(s.vip),
                    port: ports[usize::from(port)].name.clone(),
                });
            }
            let proto = s.protocol.number();
            let key = l4_key(s.vip, s.port, proto);
            if let Some(&other) = service_map.get(&key) {
                return Err(SnapshotError::DuplicateService {
                    first: services[other as usize].name.clone(),
                    second: s.name.clone(),
                    vip: ip4(s.vip),
                    port: s.port,
                    protocol: s.protocol.name(),
                });
            }
            // Replies of nat flows are found by the backend's address;
            // FullNAT replies by their source-pool destination, and dsr
            // replies never pass the gateway.
            let backends = compile_backends(
                s,
                &routes,
                &ports,
                |port, addr| next_hops.slot(port, addr),
                |b| {
                    let rkey = l4_key(b.addr, b.port, proto);
                    if let Some(&owner) = reverse_owner.get(&rkey) {
                        return Err(SnapshotError::SharedBackend {
                            addr: ip4(b.addr),
                            port: b.port,
                            protocol: s.protocol.name(),
                            first: services[owner].name.clone(),
                            second: s.name.clone(),
                        });
                    }
                    reverse_owner.insert(rkey, si);
                    reverse.insert(rkey, ReverseNat { vip: s.vip, port: s.port, stats: b.stats_slot });
                    Ok(())
                },
            )?;
            let mode = compile_mode(s, &spec.source_pools)?;
            let new_flow_limit = compile_limit(s)?;
            vips.insert(s.vip);
            *vip_users.entry(s.vip).or_insert(0) += 1;
            service_map.insert(key, si as u32);
            // The same service at the same VIP:port/protocol last time.
            let old = previous.and_then(|p| p.service_index(s.vip, s.port, proto).map(|i| &p.service_list[i as usize]));
            let built = tables.get_mut(si).and_then(Option::take);
            service_list.push(compile_service(s, backends, mode, new_flow_limit, old, built, &mut stats)?);
        }
        let mut martians: HashSet<u32, RandomState> = HashSet::with_hasher(RandomState::new());
        for p in &ports {
            for c in &p.addresses {
                martians.insert(c.addr);
                // /31 and /32 have no broadcast address (RFC 3021).
                if c.len < 31 {
                    martians.insert(c.addr | !Route::mask(c.len));
                }
            }
        }
        martians.extend(vips.iter().copied());
        martians.extend(pool_addresses.keys().copied());
        let generation = NEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
        let next_hops: Arc<[NextHop]> = next_hops.list.into();
        let source_pools = spec.source_pools.clone();
        let cache_generation = match previous {
            Some(p)
                if p.next_hops == next_hops
                    && p.static_neighbours == static_neighbours
                    && p.source_pools == source_pools =>
            {
                p.cache_generation
            }
            _ => generation,
        };
        let names = NameIndex::build(&service_list).map(Arc::new);
        Ok(Snapshot {
            generation,
            cache_generation,
            version,
            build_stats: stats,
            port_macs: ports.iter().map(|p| mac_word(p.mac.0)).collect(),
            devices: devices as u16,
            vlans,
            ports,
            local,
            vips,
            services: service_map,
            service_list,
            reverse,
            routes,
            next_hops,
            static_neighbours,
            source_pools,
            pool_filter: address_filter(pool_addresses.keys()),
            martian_filter: address_filter(martians.iter()),
            martians,
            pool_addresses,
            meta: Box::new(BuildMeta {
                ports: spec.ports.clone(),
                routes: spec.routes.clone(),
                neighbours: spec.neighbours.clone(),
                route_hops,
                names,
                vip_users: Arc::new(vip_users),
            }),
        })
    }

    /// Identifies this snapshot among all built in the process.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Identifies what a worker's per-snapshot caches are built from (the
    /// next hops and their slots, the permanent neighbours, the source
    /// pools): a snapshot compiled incrementally keeps its predecessor's
    /// value when all three are unchanged, so a worker rebuilds those
    /// caches only when it changes.
    pub fn cache_generation(&self) -> u64 {
        self.cache_generation
    }

    /// The desired-state version this snapshot was compiled from (0 when
    /// built without one).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// What the build reused from the previous snapshot.
    pub fn build_stats(&self) -> BuildStats {
        self.build_stats
    }

    /// Ports in dense index order: the driver's devices, then the VLAN
    /// interfaces they carry.
    pub fn ports(&self) -> &[Port] {
        &self.ports
    }

    /// How many of [`Snapshot::ports`] are devices (carry no VLAN of their
    /// own): a dense index below it is a driver's port.
    #[inline(always)]
    pub fn devices(&self) -> u16 {
        self.devices
    }

    /// True if some port carries a VLAN.
    #[inline(always)]
    pub fn has_vlans(&self) -> bool {
        !self.vlans.is_empty()
    }

    /// The VLAN interface for VLAN `id` on device `port`, if configured.
    pub fn vlan_interface(&self, port: u16, id: u16) -> Option<u16> {
        let key = (u32::from(port) << 16) | u32::from(id);
        self.vlans.binary_search_by_key(&key, |&(k, _)| k).ok().map(|i| self.vlans[i].1)
    }

    /// Port `port`'s MAC as [`mac_word`] makes it; `None` for a port the
    /// snapshot does not have.
    #[inline(always)]
    pub fn port_mac_word(&self, port: u16) -> Option<u64> {
        self.port_macs.get(usize::from(port)).copied()
    }

    /// Services in configuration order. Each is shared with the snapshots
    /// before and after this one that compiled it the same.
    pub fn services(&self) -> &[Arc<Service>] {
        &self.service_list
    }

    /// The routes.
    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// Distinct next hops of all backends and static-route gateways: the
    /// neighbours the workers resolve ahead of traffic. Entry `i` has slot `i`.
    pub fn known_next_hops(&self) -> &[NextHop] {
        &self.next_hops
    }

    /// Permanent neighbours: (address, MAC).
    pub fn static_neighbours(&self) -> impl Iterator<Item = (u32, EthernetAddress)> + '_ {
        self.static_neighbours.iter().map(|(a, m)| (*a, *m))
    }

    /// True if `addr` has a permanent neighbour entry.
    #[inline]
    pub fn is_static_neighbour(&self, addr: u32) -> bool {
        self.static_neighbours.contains_key(&addr)
    }

    /// The service listening on `vip:port/protocol`.
    #[inline]
    pub fn service(&self, vip: u32, port: u16, protocol: u8) -> Option<&Service> {
        self.services.get(&l4_key(vip, port, protocol)).map(|&i| &*self.service_list[i as usize])
    }

    /// The index (into [`Snapshot::services`]) of the service listening on
    /// `vip:port/protocol`.
    #[inline]
    pub fn service_index(&self, vip: u32, port: u16, protocol: u8) -> Option<u32> {
        self.services.get(&l4_key(vip, port, protocol)).copied()
    }

    /// Where a reply from `backend:port/protocol` is translated back to.
    #[inline]
    pub fn reverse(&self, backend: u32, port: u16, protocol: u8) -> Option<ReverseNat> {
        self.reverse.get(&l4_key(backend, port, protocol)).copied()
    }

    /// FullNAT source pools, in configuration order.
    pub fn source_pools(&self) -> &[SourcePoolSpec] {
        &self.source_pools
    }

    /// If `addr` is a source pool address: (pool index, address index).
    #[inline]
    pub fn source_pool_address(&self, addr: u32) -> Option<(u16, u16)> {
        let bit = filter_bit(addr);
        if self.pool_filter[bit / 64] & (1 << (bit % 64)) == 0 {
            return None;
        }
        self.pool_addresses.get(&addr).copied()
    }

    /// True if the gateway answers ARP for `addr` on any port: a VIP or a
    /// source pool address.
    #[inline]
    pub fn answers_arp_for(&self, addr: u32) -> bool {
        self.vips.contains(&addr) || self.pool_addresses.contains_key(&addr)
    }

    /// True if `addr` is a VIP of any service.
    #[inline]
    pub fn is_vip(&self, addr: u32) -> bool {
        self.vips.contains(&addr)
    }

    /// True if no packet may arrive from `addr` (a "martian" source, RFC
    /// 1812 5.3.7): a fixed prefix ([`is_martian_prefix`]), a port
    /// address, the directed broadcast of a port's subnet, a VIP or a
    /// source pool address. Nearly every source is told apart by the first
    /// octet and one filter word; only the few whose filter bit is set pay
    /// a hash lookup.
    #[inline(always)]
    pub fn is_martian_source(&self, addr: u32) -> bool {
        if is_martian_prefix(addr) {
            return true;
        }
        let bit = filter_bit(addr);
        self.martian_filter[bit / 64] & (1 << (bit % 64)) != 0 && self.martians.contains(&addr)
    }

    /// The port owning gateway address `addr`.
    #[inline]
    pub fn local_port(&self, addr: u32) -> Option<u16> {
        self.local.get(&addr).copied()
    }
}

mod delta;
use delta::NameIndex;
pub use delta::SpecDelta;

#[cfg(test)]
mod tests;
