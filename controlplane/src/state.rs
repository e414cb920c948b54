//! The desired state that the API manages: dynamic services, backends and
//! source pools, their validation against the configuration file's static
//! objects, and their compilation into the dataplane's snapshot.
//!
//! Owns: the dynamic state's shape (persisted by [`crate::store`]), every
//! check an API request can fail (each error names the field path, such as
//! `services["web"].backends[1].weight`), what each mutation does, and the
//! handle through which the API asks the daemon to apply a mutation. Must
//! not touch DPDK: the daemon applies mutations and publishes snapshots.
//!
//! Static objects (written in the configuration file) are read from
//! [`Config`]; dynamic ones live in [`DesiredState`]. The compiled snapshot
//! is their union; names and VIP:port/protocol are unique across both.

use crate::config::{
    Config, check_backend_count, check_not_subnet_edge, check_pool_ports, check_port_number, check_table_size,
    check_weight, is_unicast, parse_cidr,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, mpsc, oneshot};
use vipgate_dataplane::admission::NewFlowLimit;
use vipgate_dataplane::maglev::DEFAULT_TABLE_SIZE;
use vipgate_dataplane::route::Route;
use vipgate_dataplane::snapshot::{
    BackendSpec, ForwardingMode, OnBackendRemoval, Protocol, ServiceSpec, Snapshot, SnapshotSpec, SourcePoolSpec,
};
use vipgate_dataplane::wire::EthernetAddress;

/// At most this many services in one request (and in the dynamic state).
pub const MAX_SERVICES: usize = 10_000;
/// At most this many backends per service (the file's limit too).
pub use crate::config::MAX_BACKENDS;
/// At most this many source pools.
pub const MAX_POOLS: usize = 10_000;
/// Longest service or pool name.
pub const MAX_NAME_LEN: usize = 253;

/// The dynamic desired state: everything created through the API.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    /// 0 before the first change; plus one per applied change (API
    /// mutations and configuration reloads alike).
    pub version: u64,
    /// Dynamic services by name.
    pub services: BTreeMap<String, ServiceState>,
    /// Dynamic source pools by name.
    pub source_pools: BTreeMap<String, PoolState>,
}

/// A dynamic service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceState {
    /// Name, unique across static and dynamic services.
    pub name: String,
    /// Virtual IP.
    pub vip: Ipv4Addr,
    /// Virtual port.
    pub port: u16,
    /// Protocol.
    pub protocol: ProtocolState,
    /// How packets reach the backends.
    pub mode: ModeState,
    /// Maglev table size (prime).
    pub table_size: u32,
    /// What happens to flows of a backend that leaves the service.
    pub on_backend_removal: RemovalState,
    /// Backends, in the order they were added.
    pub backends: Vec<BackendState>,
    /// How the backends are health-checked; `None`: they are not, and
    /// always count as healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<crate::health::HealthCheck>,
    /// The limit on new flows per client source; `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_flow_limit: Option<NewFlowLimitState>,
}

/// A service's limit on new flows per client source (see
/// [`vipgate_dataplane::admission`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewFlowLimitState {
    /// Sustained new flows a second per source.
    pub per_second: u32,
    /// New flows a source may open at once.
    pub burst: u32,
    /// Clients sharing this many leading address bits are one source.
    pub prefix_len: u8,
}

impl NewFlowLimitState {
    /// The dataplane's limit, checked; an error names
    /// `services["web"].new_flow_limit.<field>`.
    pub fn to_spec(self, service: &str) -> Result<NewFlowLimit, StateError> {
        let limit = NewFlowLimit { per_second: self.per_second, burst: self.burst, prefix_len: self.prefix_len };
        limit
            .validate()
            .map_err(|e| StateError::invalid(service_field(service, &format!("new_flow_limit.{}", e.field())), e))?;
        Ok(limit)
    }
}

impl From<NewFlowLimit> for NewFlowLimitState {
    fn from(l: NewFlowLimit) -> Self {
        NewFlowLimitState { per_second: l.per_second, burst: l.burst, prefix_len: l.prefix_len }
    }
}

/// A service's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolState {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl ProtocolState {
    /// The dataplane's protocol.
    pub fn to_spec(self) -> Protocol {
        match self {
            ProtocolState::Tcp => Protocol::Tcp,
            ProtocolState::Udp => Protocol::Udp,
        }
    }

    /// Parses `tcp` or `udp`.
    pub fn parse(s: &str) -> Result<ProtocolState, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(ProtocolState::Tcp),
            "udp" => Ok(ProtocolState::Udp),
            other => Err(format!("{other:?} is not \"tcp\" or \"udp\"")),
        }
    }
}

/// A service's forwarding mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ModeState {
    /// Destination NAT.
    Nat,
    /// Destination and source NAT from a source pool.
    Fullnat {
        /// The pool's name (static or dynamic).
        source_pool: String,
    },
    /// Direct server return.
    Dsr {
        /// Outer source prefix, such as `198.18.3.0/24`.
        tunnel_source: Option<String>,
    },
}

/// What happens to the flows of a backend that leaves the service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RemovalState {
    /// Move them to the backend Maglev picks now.
    #[default]
    Rehash,
    /// Reset them.
    Reset,
}

impl RemovalState {
    /// Parses `rehash` or `reset`.
    pub fn parse(s: &str) -> Result<RemovalState, String> {
        match s {
            "rehash" => Ok(RemovalState::Rehash),
            "reset" => Ok(RemovalState::Reset),
            other => Err(format!("{other:?} is not \"rehash\" or \"reset\"")),
        }
    }
}

/// A backend of a dynamic service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendState {
    /// Address.
    pub address: Ipv4Addr,
    /// Port.
    pub port: u16,
    /// Maglev weight while enabled.
    pub weight: u32,
    /// Whether it takes new flows.
    pub admin_state: AdminState,
}

/// A backend's administrative state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes new flows by its weight.
    #[default]
    Enabled,
    /// Weight 0: no new flows; open flows continue.
    Draining,
    /// Left out of the snapshot: its flows follow `on_backend_removal`.
    Disabled,
}

/// A dynamic FullNAT source pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolState {
    /// Name, unique across static and dynamic pools.
    pub name: String,
    /// Addresses.
    pub addresses: Vec<Ipv4Addr>,
    /// First source port.
    pub first_port: u16,
    /// Last source port (inclusive).
    pub last_port: u16,
}

/// Which gRPC status an error maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A field is not valid; the message names it.
    InvalidArgument,
    /// The named object does not exist.
    NotFound,
    /// An object of that name (or address) exists.
    AlreadyExists,
    /// Version mismatch, a static object, a pool in use.
    FailedPrecondition,
    /// A field the dataplane cannot apply yet.
    Unimplemented,
    /// The state could not be persisted, or the daemon is stopping.
    Unavailable,
    /// A fixed capacity (`[dataplane] max_backends`) would be exceeded.
    ResourceExhausted,
}

/// Why a request was refused. Nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StateError {
    /// Which status code.
    pub kind: ErrorKind,
    /// The message, naming the field or object.
    pub message: String,
}

impl StateError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> StateError {
        StateError { kind, message: message.into() }
    }

    /// `field: reason`, INVALID_ARGUMENT.
    pub fn invalid(field: impl std::fmt::Display, reason: impl std::fmt::Display) -> StateError {
        StateError::new(ErrorKind::InvalidArgument, format!("{field}: {reason}"))
    }
}

/// The field path of a service's field: `services["web"].vip`.
pub fn service_field(name: &str, field: &str) -> String {
    format!("services[{name:?}].{field}")
}

/// The field path of a backend's field: `services["web"].backends[1].weight`.
pub fn backend_field(name: &str, index: usize, field: &str) -> String {
    format!("services[{name:?}].backends[{index}].{field}")
}

fn pool_field(name: &str, field: &str) -> String {
    format!("source_pools[{name:?}].{field}")
}

/// Checks a service or pool name: 1 to 253 letters, digits, `.`, `-`, `_`,
/// and not `.` or `..` (a name may become a path or a label). The one rule
/// of the configuration file and the API.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("is {} characters long; at most {MAX_NAME_LEN}", name.len()));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a usable name"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(format!("{name:?}: use letters, digits, '.', '-' and '_' only"));
    }
    Ok(())
}

/// Parses an IPv4 address, saying so when it is an IPv6 one.
pub fn parse_ipv4(s: &str) -> Result<Ipv4Addr, String> {
    let t = s.trim();
    if let Ok(a) = t.parse::<Ipv4Addr>() {
        return Ok(a);
    }
    if t.parse::<std::net::Ipv6Addr>().is_ok() {
        return Err(format!("{s:?} is an IPv6 address; IPv6 is not supported"));
    }
    Err(format!("{s:?} is not an IPv4 address"))
}

/// Parses a port number given as a wider integer.
pub fn parse_port(v: u32) -> Result<u16, String> {
    check_port_number(i64::from(v))
}

/// Parses a table size; 0 is the default.
pub fn parse_table_size(v: u32) -> Result<u32, String> {
    if v == 0 { Ok(DEFAULT_TABLE_SIZE) } else { check_table_size(i64::from(v)) }
}

/// Parses a weight; unset is 1.
pub fn parse_weight(v: Option<u32>) -> Result<u32, String> {
    v.map_or(Ok(1), |w| check_weight(i64::from(w)))
}

impl ServiceState {
    /// The dataplane's service, leaving disabled backends out and giving
    /// draining ones weight 0.
    fn to_spec(&self) -> Result<ServiceSpec, StateError> {
        let mode = match &self.mode {
            ModeState::Nat => ForwardingMode::Nat,
            ModeState::Fullnat { source_pool } => ForwardingMode::FullNat { pool: source_pool.clone() },
            ModeState::Dsr { tunnel_source } => ForwardingMode::Dsr {
                tunnel_source: match tunnel_source {
                    None => None,
                    Some(t) => Some(
                        parse_cidr(t, 16)
                            .map_err(|r| StateError::invalid(service_field(&self.name, "tunnel_source"), r))?,
                    ),
                },
            },
        };
        let backends = self
            .backends
            .iter()
            .filter(|b| b.admin_state != AdminState::Disabled)
            .map(|b| BackendSpec {
                addr: u32::from(b.address),
                port: b.port,
                weight: if b.admin_state == AdminState::Draining { 0 } else { b.weight },
                stats_slot: vipgate_dataplane::stats::NO_SLOT,
            })
            .collect();
        Ok(ServiceSpec {
            name: self.name.clone(),
            vip: u32::from(self.vip),
            port: self.port,
            protocol: self.protocol.to_spec(),
            table_size: self.table_size,
            backends,
            on_backend_removal: match self.on_backend_removal {
                RemovalState::Rehash => OnBackendRemoval::Rehash,
                RemovalState::Reset => OnBackendRemoval::Reset,
            },
            mode,
            new_flow_limit: self.new_flow_limit.map(|l| l.to_spec(&self.name)).transpose()?,
        })
    }
}

/// Validates `dynamic` against the static objects of `config` and returns
/// the description of the whole snapshot (static ∪ dynamic), with the
/// ports' real MACs. Every error names the field path and the reason; a
/// conflict with a static object names it and the configuration file.
pub fn validate(config: &Config, macs: &[EthernetAddress], dynamic: &DesiredState) -> Result<SnapshotSpec, StateError> {
    let file = config.path.display();
    if dynamic.services.len() > MAX_SERVICES {
        return Err(StateError::invalid(
            "services",
            format!("{} services; at most {MAX_SERVICES}", dynamic.services.len()),
        ));
    }
    if dynamic.source_pools.len() > MAX_POOLS {
        return Err(StateError::invalid(
            "source_pools",
            format!("{} source pools; at most {MAX_POOLS}", dynamic.source_pools.len()),
        ));
    }
    let mut spec = config.snapshot_spec(macs);
    let local: HashMap<u32, String> =
        spec.ports.iter().flat_map(|p| p.addresses.iter().map(move |c| (c.addr, p.name.clone()))).collect();
    let subnets: Vec<_> = spec.ports.iter().flat_map(|p| p.addresses.iter().copied()).collect();
    let routes = spec.routes.clone();
    let mut all_vips: HashSet<u32> = spec.services.iter().map(|s| s.vip).collect();
    all_vips.extend(dynamic.services.values().map(|s| u32::from(s.vip)));
    let static_services: HashSet<&str> = config.services().iter().map(|s| s.name.as_str()).collect();
    let static_pools: HashSet<&str> = config.source_pools().iter().map(|p| p.name.as_str()).collect();
    let mut pool_addresses: HashMap<u32, String> = HashMap::new();
    for p in config.source_pools() {
        for a in &p.addresses {
            pool_addresses.insert(*a, format!("static source pool {:?}", p.name));
        }
    }
    // Static backends' addresses: no dynamic VIP or pool address may be one.
    let mut static_backends: HashMap<u32, String> = HashMap::new();
    for s in config.services() {
        for b in &s.backends {
            static_backends.insert(b.addr, format!("a backend of static service {:?} (defined in {file})", s.name));
        }
    }
    // Owners by name, described only when a conflict is reported: a state of
    // 100,000 backends must not cost 100,000 formatted strings per change.
    let mut listeners: HashMap<(u32, u16, Protocol), Owner<'_>> = HashMap::new();
    let mut backend_owner: HashMap<(u32, u16, Protocol), Owner<'_>> = HashMap::new();
    for s in config.services() {
        listeners.insert((s.vip, s.port, s.protocol), Owner::Static(&s.name));
        if matches!(s.mode, ForwardingMode::Nat) {
            for b in &s.backends {
                backend_owner.insert((b.addr, b.port, s.protocol), Owner::Static(&s.name));
            }
        }
    }

    for (key, p) in &dynamic.source_pools {
        let f = |k: &str| pool_field(key, k);
        if p.name != *key {
            return Err(StateError::invalid(f("name"), format!("{:?} differs from its key", p.name)));
        }
        check_name(&p.name).map_err(|r| StateError::invalid(f("name"), r))?;
        if static_pools.contains(p.name.as_str()) {
            return Err(StateError::invalid(
                f("name"),
                format!("a static source pool named {:?} is defined in {file}", p.name),
            ));
        }
        if p.addresses.is_empty() {
            return Err(StateError::invalid(f("addresses"), "a source pool needs at least one address"));
        }
        for (j, a) in p.addresses.iter().enumerate() {
            let field = format!("source_pools[{key:?}].addresses[{j}]");
            let addr = u32::from(*a);
            if !is_unicast(addr) {
                return Err(StateError::invalid(field, format!("{a} is not a unicast address")));
            }
            check_not_subnet_edge(addr, &spec.ports).map_err(|r| StateError::invalid(&field, r))?;
            if let Some(owner) = local.get(&addr) {
                return Err(StateError::invalid(
                    field,
                    format!("{a} is an address of port {owner:?}; a pool needs addresses of its own"),
                ));
            }
            if all_vips.contains(&addr) {
                return Err(StateError::invalid(field, format!("{a} is a VIP; a pool needs addresses of its own")));
            }
            if let Some(owner) = static_backends.get(&addr) {
                return Err(StateError::invalid(field, format!("{a} is {owner}")));
            }
            if let Some(owner) = pool_addresses.insert(addr, format!("source pool {:?}", p.name)) {
                return Err(StateError::invalid(field, format!("{a} is already in {owner}")));
            }
        }
        check_pool_ports(p.first_port, p.last_port, config.workers())
            .map_err(|r| StateError::invalid(f("ports"), r))?;
        spec.source_pools.push(SourcePoolSpec {
            name: p.name.clone(),
            addresses: p.addresses.iter().map(|a| u32::from(*a)).collect(),
            first_port: p.first_port,
            last_port: p.last_port,
        });
    }

    for (key, s) in &dynamic.services {
        let f = |k: &str| service_field(key, k);
        if s.name != *key {
            return Err(StateError::invalid(f("name"), format!("{:?} differs from its key", s.name)));
        }
        check_name(&s.name).map_err(|r| StateError::invalid(f("name"), r))?;
        if static_services.contains(s.name.as_str()) {
            return Err(StateError::invalid(
                f("name"),
                format!("a static service named {:?} is defined in {file}", s.name),
            ));
        }
        let vip = u32::from(s.vip);
        if !is_unicast(vip) {
            return Err(StateError::invalid(f("vip"), format!("{} is not a unicast address", s.vip)));
        }
        check_not_subnet_edge(vip, &spec.ports).map_err(|r| StateError::invalid(f("vip"), r))?;
        if let Some(owner) = local.get(&vip) {
            return Err(StateError::invalid(
                f("vip"),
                format!("{} is an address of port {owner:?}, not a free VIP", s.vip),
            ));
        }
        if let Some(owner) = pool_addresses.get(&vip) {
            return Err(StateError::invalid(f("vip"), format!("{} is an address of {owner}", s.vip)));
        }
        if let Some(owner) = static_backends.get(&vip) {
            return Err(StateError::invalid(f("vip"), format!("{} is {owner}", s.vip)));
        }
        let port = check_port_number(i64::from(s.port)).map_err(|r| StateError::invalid(f("port"), r))?;
        let protocol = s.protocol.to_spec();
        if let Some(other) = listeners.insert((vip, port, protocol), Owner::Dynamic(&s.name)) {
            return Err(StateError::invalid(f("port"), listener_taken(s.vip, port, protocol, other, &file)));
        }
        check_table_size(i64::from(s.table_size)).map_err(|r| StateError::invalid(f("table_size"), r))?;
        if let ModeState::Fullnat { source_pool } = &s.mode
            && !static_pools.contains(source_pool.as_str())
            && !dynamic.source_pools.contains_key(source_pool)
        {
            return Err(StateError::invalid(f("source_pool"), format!("no source pool is named {source_pool:?}")));
        }
        check_backend_count(s.backends.len()).map_err(|r| StateError::invalid(f("backends"), r))?;
        let mut seen = HashSet::new();
        for (j, b) in s.backends.iter().enumerate() {
            let bf = |k: &str| backend_field(key, j, k);
            let addr = u32::from(b.address);
            if local.contains_key(&addr) || all_vips.contains(&addr) {
                return Err(StateError::invalid(
                    bf("address"),
                    format!("{} is an address of the gateway itself (a port address or a VIP)", b.address),
                ));
            }
            if !is_unicast(addr) {
                return Err(StateError::invalid(bf("address"), format!("{} is not a unicast address", b.address)));
            }
            check_not_subnet_edge(addr, &spec.ports).map_err(|r| StateError::invalid(bf("address"), r))?;
            if !subnets.iter().any(|c| (c.addr ^ addr) & Route::mask(c.len) == 0)
                && !routes.iter().any(|r| (r.prefix.addr ^ addr) & Route::mask(r.prefix.len) == 0)
            {
                return Err(StateError::invalid(
                    bf("address"),
                    format!("no route to {}: it is on no port's subnet and no route covers it", b.address),
                ));
            }
            let bport = check_port_number(i64::from(b.port)).map_err(|r| StateError::invalid(bf("port"), r))?;
            if !seen.insert((addr, bport)) {
                return Err(StateError::invalid(bf("address"), format!("{}:{bport} is listed twice", b.address)));
            }
            if matches!(s.mode, ModeState::Dsr { .. }) && bport != port {
                return Err(StateError::invalid(
                    bf("port"),
                    format!(
                        "{bport}: direct server return cannot change the port; the backend must listen on the service port {port}"
                    ),
                ));
            }
            if let Some(owner) = pool_addresses.get(&addr) {
                return Err(StateError::invalid(bf("address"), format!("{} is an address of {owner}", b.address)));
            }
            if matches!(s.mode, ModeState::Nat)
                && b.admin_state != AdminState::Disabled
                && let Some(other) = backend_owner.insert((addr, bport, protocol), Owner::Dynamic(&s.name))
            {
                return Err(StateError::invalid(bf("address"), backend_taken(b.address, bport, protocol, other)));
            }
            check_weight(i64::from(b.weight)).map_err(|r| StateError::invalid(bf("weight"), r))?;
        }
        if s.backends.len() > s.table_size as usize {
            return Err(StateError::invalid(
                f("backends"),
                format!("{} backends do not fit a table of {} slots", s.backends.len(), s.table_size),
            ));
        }
        spec.services.push(s.to_spec()?);
    }
    Ok(spec)
}

/// The service that holds a VIP:port/protocol or a backend, while
/// [`validate`] looks for conflicts.
#[derive(Clone, Copy)]
enum Owner<'a> {
    /// A static service, by name.
    Static(&'a str),
    /// A dynamic service, by name.
    Dynamic(&'a str),
}

impl Owner<'_> {
    /// `static service "web" (defined in FILE)` (the file when given) or
    /// `service "api"`.
    fn describe(self, file: Option<&dyn std::fmt::Display>) -> String {
        match (self, file) {
            (Owner::Static(n), Some(file)) => format!("static service {n:?} (defined in {file})"),
            (Owner::Static(n), None) => format!("static service {n:?}"),
            (Owner::Dynamic(n), _) => format!("service {n:?}"),
        }
    }
}

/// Why a VIP:port/protocol that `other` serves cannot be taken.
fn listener_taken(
    vip: Ipv4Addr,
    port: u16,
    protocol: Protocol,
    other: Owner<'_>,
    file: &dyn std::fmt::Display,
) -> String {
    format!("{vip}:{port}/{} is already served by {}", protocol.name(), other.describe(Some(file)))
}

/// Why a nat backend that `other` (a nat service) has cannot be taken.
fn backend_taken(address: Ipv4Addr, port: u16, protocol: Protocol, other: Owner<'_>) -> String {
    format!(
        "{address}:{port}/{} already serves {}; replies could not be translated back to one VIP",
        protocol.name(),
        other.describe(None)
    )
}

/// The conflicts of `s`, a dynamic service as a request makes it, with
/// every other service (static, or dynamic in `state`): its VIP:port/protocol
/// when `listener`, and `backends` (index in `s`, backend) when `s` is nat.
/// [`validate`] finds the same conflicts over the whole state, but in name
/// order; this names the service in the request, whichever name sorts
/// first. One pass over the services and backends, allocating for the
/// request's backends only.
fn check_conflicts<'b>(
    config: &Config,
    state: &DesiredState,
    s: &ServiceState,
    listener: bool,
    backends: impl Iterator<Item = (usize, &'b BackendState)>,
) -> Result<(), StateError> {
    let protocol = s.protocol.to_spec();
    let others = state.services.values().filter(|o| o.name != s.name);
    if listener {
        let key = (u32::from(s.vip), s.port, protocol);
        let other = config
            .services()
            .iter()
            .find(|o| (o.vip, o.port, o.protocol) == key)
            .map(|o| Owner::Static(&o.name))
            .or_else(|| {
                others
                    .clone()
                    .find(|o| (u32::from(o.vip), o.port, o.protocol.to_spec()) == key)
                    .map(|o| Owner::Dynamic(&o.name))
            });
        if let Some(other) = other {
            let file = config.path.display();
            return Err(StateError::invalid(
                service_field(&s.name, "port"),
                listener_taken(s.vip, s.port, protocol, other, &file),
            ));
        }
    }
    if !matches!(s.mode, ModeState::Nat) {
        return Ok(());
    }
    // Sorted for a binary search: no hashing per backend of the state, and
    // one comparison when a request adds one backend.
    let mut mine: Vec<((u32, u16), usize)> = backends
        .filter(|(_, b)| b.admin_state != AdminState::Disabled)
        .map(|(j, b)| ((u32::from(b.address), b.port), j))
        .collect();
    if mine.is_empty() {
        return Ok(());
    }
    mine.sort_unstable();
    // The first backend of `s` that another service has, as `validate`
    // would name it.
    let statics = config
        .services()
        .iter()
        .filter(|o| o.protocol == protocol && matches!(o.mode, ForwardingMode::Nat))
        .flat_map(|o| o.backends.iter().map(|b| ((b.addr, b.port), Owner::Static(&o.name))));
    let dynamics =
        others.filter(|o| o.protocol.to_spec() == protocol && matches!(o.mode, ModeState::Nat)).flat_map(|o| {
            o.backends
                .iter()
                .filter(|b| b.admin_state != AdminState::Disabled)
                .map(|b| ((u32::from(b.address), b.port), Owner::Dynamic(&o.name)))
        });
    let first = statics
        .chain(dynamics)
        .filter_map(|(key, owner)| {
            let i = mine.binary_search_by_key(&key, |(k, _)| *k).ok()?;
            Some((mine[i].1, key, owner))
        })
        .min_by_key(|(j, _, _)| *j);
    match first {
        None => Ok(()),
        Some((j, (addr, port), other)) => Err(StateError::invalid(
            backend_field(&s.name, j, "address"),
            backend_taken(Ipv4Addr::from(addr), port, protocol, other),
        )),
    }
}

/// [`validate`], then the dataplane's own compiler as the last word: a
/// snapshot it refuses is INVALID_ARGUMENT with its message. Compiles from
/// scratch; see [`compile_incremental`].
pub fn compile(config: &Config, macs: &[EthernetAddress], dynamic: &DesiredState) -> Result<Snapshot, StateError> {
    compile_with_health(config, macs, dynamic, &HashSet::new())
}

/// [`compile`] with the backends in `down` (unhealthy, per the health
/// checker) given weight 0: they take no new flows, and their open flows
/// continue, as when draining.
pub fn compile_with_health(
    config: &Config,
    macs: &[EthernetAddress],
    dynamic: &DesiredState,
    down: &HashSet<crate::health::TargetKey>,
) -> Result<Snapshot, StateError> {
    let mut spec = validate(config, macs, dynamic)?;
    apply_health(&mut spec, down);
    Snapshot::build_incremental(&spec, None, dynamic.version)
        .map_err(|e| StateError::new(ErrorKind::InvalidArgument, e.to_string()))
}

/// [`compile`], reusing from `previous` (the snapshot the workers read now)
/// every compiled service, and every Maglev table, that would come out the
/// same: a change to one service rebuilds that service only. The snapshot
/// carries `dynamic.version`, which the workers report once they use it.
pub fn compile_incremental(
    config: &Config,
    macs: &[EthernetAddress],
    dynamic: &DesiredState,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, StateError> {
    let spec = validate(config, macs, dynamic)?;
    Snapshot::build_incremental(&spec, previous, dynamic.version)
        .map_err(|e| StateError::new(ErrorKind::InvalidArgument, e.to_string()))
}

/// What the single writer compiles for every change: [`validate`], the
/// backends in `down` given weight 0 (see [`compile_with_health`]), every
/// backend given its stats slot from `slots`, and the snapshot built
/// reusing from `previous` what comes out the same (see
/// [`compile_incremental`]). Returns the snapshot and the slot plan to
/// apply once it is published.
///
/// `change`, when given, names every service that differs from
/// `previous` (created, changed, deleted, or with a backend whose health
/// changed): only those get slots planned and are compiled, in time
/// proportional to the change (`Snapshot::build_changed`); the others are
/// `previous`'s as they are.
pub fn compile_with_slots(
    config: &Config,
    macs: &[EthernetAddress],
    dynamic: &DesiredState,
    down: &HashSet<crate::health::TargetKey>,
    slots: &crate::stats::StatsSlots,
    previous: Option<&Snapshot>,
    change: Option<&Change>,
) -> Result<(Snapshot, crate::stats::SlotPlan), StateError> {
    let mut spec = validate(config, macs, dynamic)?;
    apply_health(&mut spec, down);
    let delta = previous.zip(change).and_then(|(p, c)| p.delta(&spec, &c.services_changed, &c.services_deleted));
    let planned = match &delta {
        Some(delta) => slots.plan_changed(&mut spec, delta),
        None => slots.plan(&mut spec),
    };
    let plan = planned.map_err(|e| StateError::new(ErrorKind::ResourceExhausted, e.to_string()))?;
    let snapshot = match previous.zip(delta.as_ref()) {
        Some((previous, delta)) => Snapshot::build_changed(&spec, previous, dynamic.version, delta),
        None => Snapshot::build_incremental(&spec, previous, dynamic.version),
    }
    .map_err(|e| StateError::new(ErrorKind::InvalidArgument, e.to_string()))?;
    Ok((snapshot, plan))
}

/// Gives every backend in `down` weight 0.
pub fn apply_health(spec: &mut SnapshotSpec, down: &HashSet<crate::health::TargetKey>) {
    if down.is_empty() {
        return;
    }
    for s in &mut spec.services {
        for b in &mut s.backends {
            let key =
                crate::health::TargetKey { service: s.name.clone(), address: Ipv4Addr::from(b.addr), port: b.port };
            if down.contains(&key) {
                b.weight = 0;
            }
        }
    }
}

/// What a change did, for the Watch stream and the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// What did it: the RPC's name, or `reload`.
    pub cause: String,
    /// Services created or changed.
    pub services_changed: Vec<String>,
    /// Services deleted.
    pub services_deleted: Vec<String>,
    /// Pools created or changed.
    pub pools_changed: Vec<String>,
    /// Pools deleted.
    pub pools_deleted: Vec<String>,
}

impl Change {
    fn new(cause: &str) -> Change {
        Change { cause: cause.to_owned(), ..Change::default() }
    }

    /// The difference between two dynamic states.
    pub fn between(cause: &str, old: &DesiredState, new: &DesiredState) -> Change {
        let mut c = Change::new(cause);
        for (k, v) in &new.services {
            if old.services.get(k) != Some(v) {
                c.services_changed.push(k.clone());
            }
        }
        c.services_deleted = old.services.keys().filter(|k| !new.services.contains_key(*k)).cloned().collect();
        for (k, v) in &new.source_pools {
            if old.source_pools.get(k) != Some(v) {
                c.pools_changed.push(k.clone());
            }
        }
        c.pools_deleted = old.source_pools.keys().filter(|k| !new.source_pools.contains_key(*k)).cloned().collect();
        c
    }
}

fn static_service_error(config: &Config, name: &str) -> StateError {
    StateError::new(
        ErrorKind::FailedPrecondition,
        format!("service {name:?} is defined in {}; change it there and reload", config.path.display()),
    )
}

fn static_pool_error(config: &Config, name: &str) -> StateError {
    StateError::new(
        ErrorKind::FailedPrecondition,
        format!("source pool {name:?} is defined in {}; change it there and reload", config.path.display()),
    )
}

fn is_static_service(config: &Config, name: &str) -> bool {
    config.services().iter().any(|s| s.name == name)
}

fn is_static_pool(config: &Config, name: &str) -> bool {
    config.source_pools().iter().any(|p| p.name == name)
}

/// The dynamic service `name`, or why it cannot be changed.
fn dynamic_service<'a>(
    config: &Config,
    state: &'a mut DesiredState,
    name: &str,
) -> Result<&'a mut ServiceState, StateError> {
    if is_static_service(config, name) {
        return Err(static_service_error(config, name));
    }
    state
        .services
        .get_mut(name)
        .ok_or_else(|| StateError::new(ErrorKind::NotFound, format!("no service is named {name:?}")))
}

/// The mutations. Each changes `state` in memory only; the daemon validates
/// the result as a whole ([`compile`]) before anything is persisted or
/// published, and assigns the version.
pub mod ops {
    use super::*;

    /// Replaces the whole dynamic state if its version is `expected`.
    pub fn apply(
        config: &Config,
        state: &mut DesiredState,
        expected: u64,
        services: Vec<ServiceState>,
        pools: Vec<PoolState>,
    ) -> Result<Change, StateError> {
        if expected != state.version {
            return Err(StateError::new(
                ErrorKind::FailedPrecondition,
                format!("expected_version {expected} is not the current version {}", state.version),
            ));
        }
        let mut new = DesiredState { version: state.version, ..DesiredState::default() };
        for s in services {
            if is_static_service(config, &s.name) {
                return Err(static_service_error(config, &s.name));
            }
            if new.services.contains_key(&s.name) {
                return Err(StateError::invalid(service_field(&s.name, "name"), "is listed twice"));
            }
            new.services.insert(s.name.clone(), s);
        }
        for p in pools {
            if is_static_pool(config, &p.name) {
                return Err(static_pool_error(config, &p.name));
            }
            if new.source_pools.contains_key(&p.name) {
                return Err(StateError::invalid(pool_field(&p.name, "name"), "is listed twice"));
            }
            new.source_pools.insert(p.name.clone(), p);
        }
        let change = Change::between("Apply", state, &new);
        *state = new;
        Ok(change)
    }

    /// Adds a service.
    pub fn create_service(config: &Config, state: &mut DesiredState, s: ServiceState) -> Result<Change, StateError> {
        if is_static_service(config, &s.name) {
            return Err(StateError::new(
                ErrorKind::AlreadyExists,
                format!("service {:?} already exists (defined in {})", s.name, config.path.display()),
            ));
        }
        if state.services.contains_key(&s.name) {
            return Err(StateError::new(ErrorKind::AlreadyExists, format!("service {:?} already exists", s.name)));
        }
        check_conflicts(config, state, &s, true, s.backends.iter().enumerate())?;
        let mut c = Change::new("CreateService");
        c.services_changed.push(s.name.clone());
        state.services.insert(s.name.clone(), s);
        Ok(c)
    }

    /// Replaces a service, backends included.
    pub fn update_service(config: &Config, state: &mut DesiredState, s: ServiceState) -> Result<Change, StateError> {
        dynamic_service(config, state, &s.name)?;
        check_conflicts(config, state, &s, true, s.backends.iter().enumerate())?;
        let slot = dynamic_service(config, state, &s.name)?;
        let mut c = Change::new("UpdateService");
        c.services_changed.push(s.name.clone());
        *slot = s;
        Ok(c)
    }

    /// Deletes a service.
    pub fn delete_service(config: &Config, state: &mut DesiredState, name: &str) -> Result<Change, StateError> {
        dynamic_service(config, state, name)?;
        state.services.remove(name);
        let mut c = Change::new("DeleteService");
        c.services_deleted.push(name.to_owned());
        Ok(c)
    }

    /// Adds a backend to a service.
    pub fn add_backend(
        config: &Config,
        state: &mut DesiredState,
        service: &str,
        b: BackendState,
    ) -> Result<Change, StateError> {
        let s = dynamic_service(config, state, service)?;
        if s.backends.iter().any(|o| o.address == b.address && o.port == b.port) {
            return Err(StateError::new(
                ErrorKind::AlreadyExists,
                format!("service {service:?} already has backend {}:{}", b.address, b.port),
            ));
        }
        check_backend_count(s.backends.len() + 1)
            .map_err(|r| StateError::invalid(service_field(service, "backends"), r))?;
        let j = s.backends.len();
        check_conflicts(config, state, &state.services[service], false, std::iter::once((j, &b)))?;
        dynamic_service(config, state, service)?.backends.push(b);
        let mut c = Change::new("AddBackend");
        c.services_changed.push(service.to_owned());
        Ok(c)
    }

    fn backend_index(s: &ServiceState, service: &str, address: Ipv4Addr, port: u16) -> Result<usize, StateError> {
        s.backends.iter().position(|b| b.address == address && b.port == port).ok_or_else(|| {
            StateError::new(ErrorKind::NotFound, format!("service {service:?} has no backend {address}:{port}"))
        })
    }

    /// Changes a backend's weight and/or admin state.
    pub fn update_backend(
        config: &Config,
        state: &mut DesiredState,
        service: &str,
        address: Ipv4Addr,
        port: u16,
        weight: Option<u32>,
        admin_state: Option<AdminState>,
    ) -> Result<Change, StateError> {
        let s = dynamic_service(config, state, service)?;
        let i = backend_index(s, service, address, port)?;
        if let Some(a) = admin_state {
            // Enabled again, it may take a backend another service took.
            let b = BackendState { admin_state: a, ..s.backends[i].clone() };
            check_conflicts(config, state, &state.services[service], false, std::iter::once((i, &b)))?;
        }
        let s = dynamic_service(config, state, service)?;
        if let Some(w) = weight {
            s.backends[i].weight = w;
        }
        if let Some(a) = admin_state {
            s.backends[i].admin_state = a;
        }
        let mut c = Change::new("UpdateBackend");
        c.services_changed.push(service.to_owned());
        Ok(c)
    }

    /// Removes a backend.
    pub fn remove_backend(
        config: &Config,
        state: &mut DesiredState,
        service: &str,
        address: Ipv4Addr,
        port: u16,
    ) -> Result<Change, StateError> {
        let s = dynamic_service(config, state, service)?;
        let i = backend_index(s, service, address, port)?;
        s.backends.remove(i);
        let mut c = Change::new("RemoveBackend");
        c.services_changed.push(service.to_owned());
        Ok(c)
    }

    /// Adds a source pool.
    pub fn create_pool(config: &Config, state: &mut DesiredState, p: PoolState) -> Result<Change, StateError> {
        if is_static_pool(config, &p.name) {
            return Err(StateError::new(
                ErrorKind::AlreadyExists,
                format!("source pool {:?} already exists (defined in {})", p.name, config.path.display()),
            ));
        }
        if state.source_pools.contains_key(&p.name) {
            return Err(StateError::new(ErrorKind::AlreadyExists, format!("source pool {:?} already exists", p.name)));
        }
        let mut c = Change::new("CreateSourcePool");
        c.pools_changed.push(p.name.clone());
        state.source_pools.insert(p.name.clone(), p);
        Ok(c)
    }

    /// Deletes a source pool no service uses.
    pub fn delete_pool(config: &Config, state: &mut DesiredState, name: &str) -> Result<Change, StateError> {
        if is_static_pool(config, name) {
            return Err(static_pool_error(config, name));
        }
        if !state.source_pools.contains_key(name) {
            return Err(StateError::new(ErrorKind::NotFound, format!("no source pool is named {name:?}")));
        }
        let user = state
            .services
            .values()
            .find(|s| matches!(&s.mode, ModeState::Fullnat { source_pool } if source_pool == name))
            .map(|s| s.name.clone());
        if let Some(user) = user {
            return Err(StateError::new(
                ErrorKind::FailedPrecondition,
                format!("source pool {name:?} is used by service {user:?}"),
            ));
        }
        state.source_pools.remove(name);
        let mut c = Change::new("DeleteSourcePool");
        c.pools_deleted.push(name.to_owned());
        Ok(c)
    }
}

/// A mutation the API asks the daemon to apply to a copy of the dynamic
/// state (the running configuration gives the static objects).
pub type Mutation = Box<dyn FnOnce(&Config, &mut DesiredState) -> Result<Change, StateError> + Send>;

/// One mutation and where its outcome goes.
pub struct MutationRequest {
    /// The change.
    pub mutation: Mutation,
    /// The new version, or why nothing changed.
    pub reply: oneshot::Sender<Result<u64, StateError>>,
}

/// What readers see: the configuration in force (the static objects) and
/// the dynamic state, at one version.
#[derive(Clone, Debug)]
pub struct StateView {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// The dynamic state; its `version` is the current version.
    pub dynamic: DesiredState,
}

/// One event of the Watch stream.
#[derive(Clone, Debug)]
pub struct StateEvent {
    /// The version it produced (a change) or the version in force (a
    /// health transition, which takes none).
    pub version: u64,
    /// What happened.
    pub kind: StateEventKind,
}

/// What a [`StateEvent`] reports.
#[derive(Clone, Debug)]
pub enum StateEventKind {
    /// An applied change of the desired state.
    Change(Change),
    /// A backend went up or down.
    Health(crate::health::Transition),
}

/// How many events a slow Watch subscriber may fall behind before it is
/// ended.
const EVENT_BACKLOG: usize = 1024;

struct Shared {
    current: Arc<StateView>,
    events: broadcast::Sender<Arc<StateEvent>>,
}

/// The health of the checked backends, which the checker writes and the
/// API reads.
pub type SharedHealth = Arc<crate::health::HealthStatus>;

/// The API's side of the state: reads the current view without waiting,
/// sends mutations to the daemon (one writer, in order) and subscribes to
/// changes. Cheap to clone.
#[derive(Clone)]
pub struct StateHandle {
    requests: mpsc::Sender<MutationRequest>,
    shared: Arc<Mutex<Shared>>,
    /// True once the daemon stops: Watch streams end, so that the server's
    /// graceful shutdown does not wait for them forever.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
    /// The checked backends' health.
    health: SharedHealth,
}

impl std::fmt::Debug for StateHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateHandle").finish_non_exhaustive()
    }
}

impl StateHandle {
    /// A handle showing `view`, and the receiving end of its mutations,
    /// which the daemon (the only writer) serves.
    pub fn new(view: StateView) -> (StateHandle, mpsc::Receiver<MutationRequest>) {
        let (requests, rx) = mpsc::channel(64);
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let (closing, _) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Mutex::new(Shared { current: Arc::new(view), events }));
        let health = SharedHealth::default();
        (StateHandle { requests, shared, closing: Arc::new(closing), health }, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state in force now.
    pub fn current(&self) -> Arc<StateView> {
        Arc::clone(&self.lock().current)
    }

    /// The state in force now and every change after it, with no gap.
    pub fn subscribe(&self) -> (Arc<StateView>, broadcast::Receiver<Arc<StateEvent>>) {
        let shared = self.lock();
        (Arc::clone(&shared.current), shared.events.subscribe())
    }

    /// The checked backends' health, which the daemon's checker writes.
    pub fn health(&self) -> &SharedHealth {
        &self.health
    }

    /// Tells subscribers that a backend went up or down. The daemon calls
    /// it once the snapshot with that health is published; the version is
    /// the one in force (health takes none).
    pub fn publish_health(&self, transition: crate::health::Transition) {
        let shared = self.lock();
        let version = shared.current.dynamic.version;
        // No subscriber is no error.
        let _ = shared.events.send(Arc::new(StateEvent { version, kind: StateEventKind::Health(transition) }));
    }

    /// Ends every Watch stream, now and later: the daemon is stopping.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`StateHandle::close`] was called.
    pub async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        // An error means the sender is gone, which is closed too.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Asks the daemon to apply `mutation`; answers once it is durable and
    /// published, with the new version.
    pub async fn mutate(&self, mutation: Mutation) -> Result<u64, StateError> {
        let (reply, answer) = oneshot::channel();
        let gone = || StateError::new(ErrorKind::Unavailable, "vipgated is stopping; try again");
        self.requests.send(MutationRequest { mutation, reply }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Makes `view` the current state and tells subscribers of `change`.
    /// The daemon calls it after the state is durable and published.
    pub fn publish(&self, view: StateView, change: Change) {
        let mut shared = self.lock();
        let version = view.dynamic.version;
        shared.current = Arc::new(view);
        // No subscriber is no error.
        let _ = shared.events.send(Arc::new(StateEvent { version, kind: StateEventKind::Change(change) }));
    }
}

#[cfg(test)]
mod tests;
