//! The one model of a service and a source pool, whatever its origin:
//! the configuration file's static objects and the API's dynamic ones are
//! both [`ServiceState`] and [`PoolState`] (a static one is owned by
//! [`STATIC_OWNER`]), and every rule between them lives in one place,
//! [`Effective`].
//!
//! Owns: the objects' shape (persisted by [`crate::store`] for the dynamic
//! ones), their compilation into the dataplane's specs, and the effective
//! state with its rules and indexes ([`effective`]). A refusal names the
//! field path ([`Refusal`]); the configuration file turns it into
//! `FILE:LINE: field`, the API into the request's field path. Uses only
//! [`crate::checks`] and [`crate::health_check`]: the configuration file
//! and the desired state both build on it.

use crate::checks::{check_source_range_count, parse_cidr, parse_source_range};
use crate::health_check::HealthCheck;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use vipgate_dataplane::admission::NewFlowLimit;
use vipgate_dataplane::snapshot::{
    Affinity, BackendSpec, ForwardingMode, Ipv4Cidr, OnBackendRemoval, Protocol, ServiceSpec,
};

pub mod effective;

pub use effective::{Effective, Refusal};

/// The owner of a dynamic object created without one: a person with
/// vipgatectl.
pub const DEFAULT_OWNER: &str = "cli";

/// The owner of every static object (a service or pool of the
/// configuration file): empty, which [`check_owner`](crate::checks::check_owner)
/// refuses, so that no API owner can be it.
pub const STATIC_OWNER: &str = "";

fn default_owner() -> String {
    DEFAULT_OWNER.to_owned()
}

/// A service: a dynamic one (of the API) or a static one (of the
/// configuration file, owned by [`STATIC_OWNER`]).
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
    pub health_check: Option<HealthCheck>,
    /// The limit on new flows per client source; `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_flow_limit: Option<NewFlowLimitState>,
    /// The client prefixes served; empty: every client. Records saved
    /// before the field existed have none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<SourceRange>,
    /// What picks a new flow's backend; records saved before the field
    /// existed have [`AffinityState::None`].
    #[serde(default, skip_serializing_if = "AffinityState::is_none")]
    pub affinity: AffinityState,
    /// Who manages it ([`check_owner`](crate::checks::check_owner));
    /// objects saved before owners existed are [`DEFAULT_OWNER`]'s.
    #[serde(default = "default_owner")]
    pub owner: String,
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
    /// `<at>.new_flow_limit.<field>`, `at` being the service's field path.
    pub(crate) fn to_spec(self, at: &str) -> Result<NewFlowLimit, Refusal> {
        let limit = NewFlowLimit { per_second: self.per_second, burst: self.burst, prefix_len: self.prefix_len };
        limit
            .validate()
            .map_err(|e| Refusal { field: format!("{at}.new_flow_limit.{}", e.field()), reason: e.to_string() })?;
        Ok(limit)
    }
}

impl From<NewFlowLimit> for NewFlowLimitState {
    fn from(l: NewFlowLimit) -> Self {
        NewFlowLimitState { per_second: l.per_second, burst: l.burst, prefix_len: l.prefix_len }
    }
}

/// A prefix of a service's source list, written `a.b.c.d/len` (stored
/// so too), without host bits (`parse_source_range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SourceRange {
    /// The network address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0 to 32.
    pub len: u8,
}

impl SourceRange {
    /// Parses `a.b.c.d/len`; the reason when it is not a prefix without
    /// host bits.
    pub fn parse(s: &str) -> Result<SourceRange, String> {
        parse_source_range(s).map(|c| SourceRange { addr: Ipv4Addr::from(c.addr), len: c.len })
    }
}

impl TryFrom<String> for SourceRange {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        SourceRange::parse(&s)
    }
}

impl From<SourceRange> for String {
    fn from(r: SourceRange) -> String {
        r.to_string()
    }
}

impl std::fmt::Display for SourceRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What picks a new flow's backend (see
/// [`vipgate_dataplane::snapshot::Affinity`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AffinityState {
    /// The flow's 5-tuple.
    #[default]
    None,
    /// The client's address: all its connections reach one backend.
    ClientIp,
}

impl AffinityState {
    /// Parses `none` or `client_ip`.
    pub fn parse(s: &str) -> Result<AffinityState, String> {
        match s {
            "none" => Ok(AffinityState::None),
            "client_ip" => Ok(AffinityState::ClientIp),
            other => Err(format!("{other:?} is not \"none\" or \"client_ip\"")),
        }
    }

    /// The name `parse` takes.
    pub fn name(self) -> &'static str {
        self.to_spec().name()
    }

    /// True for the default, [`AffinityState::None`].
    pub fn is_none(&self) -> bool {
        *self == AffinityState::None
    }

    /// The dataplane's affinity.
    pub fn to_spec(self) -> Affinity {
        match self {
            AffinityState::None => Affinity::None,
            AffinityState::ClientIp => Affinity::ClientIp,
        }
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

/// A FullNAT source pool: a dynamic one (of the API) or a static one (of
/// the configuration file, owned by [`STATIC_OWNER`]).
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
    /// Who manages it ([`check_owner`](crate::checks::check_owner)).
    #[serde(default = "default_owner")]
    pub owner: String,
}

impl PoolState {
    /// Whether it is a static pool, of the configuration file.
    pub fn is_static(&self) -> bool {
        self.owner == STATIC_OWNER
    }
}

impl ServiceState {
    /// Whether it is a static service, of the configuration file.
    pub fn is_static(&self) -> bool {
        self.owner == STATIC_OWNER
    }

    /// The dataplane's service, leaving disabled backends out and giving
    /// draining ones weight 0; an error names the field under `at`, the
    /// service's field path.
    pub(crate) fn to_spec(&self, at: &str) -> Result<ServiceSpec, Refusal> {
        let mode = match &self.mode {
            ModeState::Nat => ForwardingMode::Nat,
            ModeState::Fullnat { source_pool } => ForwardingMode::FullNat { pool: source_pool.clone() },
            ModeState::Dsr { tunnel_source } => ForwardingMode::Dsr {
                tunnel_source: match tunnel_source {
                    None => None,
                    Some(t) => Some(
                        parse_cidr(t, 16).map_err(|reason| Refusal { field: format!("{at}.tunnel_source"), reason })?,
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
            new_flow_limit: self.new_flow_limit.map(|l| l.to_spec(at)).transpose()?,
            source_ranges: {
                check_source_range_count(self.source_ranges.len())
                    .map_err(|reason| Refusal { field: format!("{at}.source_ranges"), reason })?;
                self.source_ranges.iter().map(|r| Ipv4Cidr { addr: u32::from(r.addr), len: r.len }).collect()
            },
            affinity: self.affinity.to_spec(),
        })
    }
}
