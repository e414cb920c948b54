//! vipgated's configuration file: parsing, validation and what it compiles to.
//!
//! Owns: the TOML schema, every check of a single value an operator's
//! mistake can fail, the translation into EAL arguments, dataplane
//! settings and a snapshot description, and which settings a reload may
//! change. `[[services]]` and `[[source_pools]]` are parsed into the one
//! model of every service and pool ([`crate::model`]), and the rules
//! between them are [`Effective`]'s, the API's too: a refusal's field path
//! is turned into the line of that field. Everything is validated before
//! EAL starts, and every error names the file, the line and the field.
//! Must not touch DPDK.
//!
//! The reference for every key is `docs/configuration.md`.

use serde::Deserialize;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use toml::Spanned;
use vipgate_dataplane::admission::{NewFlowLimit, NewFlowLimitError};
use vipgate_dataplane::driver::{BondConfig, DataplaneConfig, PortConfig, TransmitHash};
use vipgate_dataplane::flow::{
    DEFAULT_CAPACITY as DEFAULT_FLOW_CAPACITY, FlowTimeouts, MAX_CAPACITY as MAX_FLOW_CAPACITY,
};
use vipgate_dataplane::maglev::DEFAULT_TABLE_SIZE;
use vipgate_dataplane::pipeline::PipelineConfig;
use vipgate_dataplane::route::Route;
use vipgate_dataplane::snapshot::{
    DEFAULT_MTU, Ipv4Cidr, NeighbourSpec, PortSpec, Protocol, RouteSpec, Snapshot, SnapshotSpec, VlanSpec,
};
use vipgate_dataplane::wire::EthernetAddress;

pub mod announce_settings;
pub use crate::health_check;

use announce_settings::AnnounceSettings;
use health_check::HealthCheck;

use crate::checks::{
    MAX_BACKENDS, MAX_SOURCE_RANGES, check_backend_count, check_pool_size, check_port_number, check_source_range_count,
    check_table_size, check_weight, is_unicast, parse_cidr,
};
use crate::model::{
    AdminState, AffinityState, BackendState, Effective, ModeState, PoolState, ProtocolState, Refusal, RemovalState,
    STATIC_OWNER, ServiceState, SourceRange,
};

/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/vipgate/vipgated.sock";
/// Default `[metrics] listen`: loopback only.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9469";
/// Default directory of the persisted dynamic state (`[state] dir`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vipgate";
/// Smallest port MTU (RFC 791's minimum datagram every host accepts).
pub const MIN_MTU: u16 = 576;
/// Largest port MTU: jumbo frames. The mbufs are sized for the largest
/// port MTU (the driver's `mempool::frame_room`), and each device's
/// own limit is checked when its port starts.
pub const MAX_MTU: u16 = 9000;

/// Default and bounds of `[api] max_request_bytes`: the largest gRPC
/// request message the TCP listener decodes.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Smallest `[api] max_request_bytes`.
pub const MIN_MAX_REQUEST_BYTES: usize = 1024;
/// Largest `[api] max_request_bytes`.
pub const MAX_MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;

/// Source ports of a pool when `ports` is not given.
pub const DEFAULT_POOL_PORTS: (u16, u16) = (1024, 65535);

/// `[eal] control_plane_nice` when not set: the control plane's threads get
/// about 90 % of a CPU they share with a worker (nice 0) while they have
/// work (see `vipgate_dpdk::sched`).
pub const DEFAULT_CONTROL_PLANE_NICE: i32 = -10;

/// Smallest `[eal] memory_mb`: the mbuf pool, rings and tables need this much.
pub const MIN_MEMORY_MB: u32 = 64;
/// Largest `[eal] memory_mb`: 1 TiB, more than any host runs this gateway on.
pub const MAX_MEMORY_MB: u32 = 1 << 20;
/// Smallest `[dataplane] mbufs`: the receive and transmit rings need this many.
pub const MIN_MBUFS: u32 = 1024;
/// Largest `[dataplane] mbufs`: 2^20 - 1 (about 2.3 GiB of buffers), more
/// than the rings and lcore caches of any port count can hold.
pub const MAX_MBUFS: u32 = (1 << 20) - 1;
/// Largest `[dataplane] mbuf_cache`: DPDK's RTE_MEMPOOL_CACHE_MAX_SIZE.
pub const MAX_MBUF_CACHE: u32 = 512;
/// Largest `[dataplane] idle_sleep_us`: 1 ms; at 1 Mpps a 1024-descriptor
/// receive ring fills in about 1 ms, so a longer sleep drops packets.
pub const MAX_IDLE_SLEEP_US: u32 = 1000;
/// Smallest `[dataplane] neighbour_capacity`: a few next hops and backends.
pub const MIN_NEIGHBOURS: u32 = 16;
/// Largest `[dataplane] neighbour_capacity`: 2^20 entries per worker, the
/// hosts of a /12; more only costs memory no subnet of a port can use.
pub const MAX_NEIGHBOURS: u32 = 1 << 20;
/// Largest `[dataplane.timeouts]` `tcp_established` and `udp`: 26 days, as
/// the flow table keeps expiry in a 32-bit clock of about 1 ms units.
pub const MAX_FLOW_TIMEOUT_S: u64 = 26 * 24 * 3600;
/// Largest `tcp_syn`, `tcp_closing` and `tcp_reset`: 1 hour; a half-open or
/// closing flow held longer only keeps a slot that a SYN flood can fill.
pub const MAX_TRANSIENT_TIMEOUT_S: u64 = 3600;

/// A configuration error. Its text names the file and, where it has one,
/// the line and the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid TOML, or a key of the wrong type, missing or unknown.
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// The parser's message (it includes line and column).
        message: String,
    },
    /// A value that parses but cannot be used.
    #[error("{file}:{line}: {field}: {reason}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// Path of the field, such as `services[2].backends[0].port`.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    eal: Spanned<RawEal>,
    #[serde(default)]
    dataplane: RawDataplane,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    announce: RawAnnounce,
    #[serde(default)]
    ports: Vec<Spanned<RawPort>>,
    #[serde(default)]
    vlans: Vec<Spanned<RawVlan>>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
    #[serde(default)]
    neighbours: Vec<Spanned<RawNeighbour>>,
    #[serde(default)]
    source_pools: Vec<Spanned<RawPool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: Spanned<String>,
    addresses: Spanned<Vec<Spanned<String>>>,
    ports: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNeighbour {
    address: Spanned<String>,
    mac: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEal {
    lcores: Spanned<String>,
    #[serde(default = "yes")]
    hugepages: bool,
    #[serde(default)]
    huge_unlink: bool,
    memory_mb: Option<Spanned<u32>>,
    #[serde(default = "default_prefix")]
    file_prefix: Spanned<String>,
    #[serde(default)]
    extra_args: Vec<String>,
    #[serde(default = "default_control_plane_nice")]
    control_plane_nice: Spanned<i32>,
}

fn default_control_plane_nice() -> Spanned<i32> {
    Spanned::new(0..0, DEFAULT_CONTROL_PLANE_NICE)
}

fn yes() -> bool {
    true
}

fn default_prefix() -> Spanned<String> {
    Spanned::new(0..0, "vipgate".to_owned())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    #[serde(default = "default_mbufs")]
    mbufs: Spanned<u32>,
    #[serde(default = "default_mbuf_cache")]
    mbuf_cache: Spanned<u32>,
    #[serde(default = "default_idle_sleep")]
    idle_sleep_us: Spanned<u32>,
    #[serde(default = "default_neighbours")]
    neighbour_capacity: Spanned<u32>,
    #[serde(default = "default_flow_capacity")]
    flow_capacity: Spanned<u64>,
    #[serde(default = "default_max_backends")]
    max_backends: Spanned<u64>,
    #[serde(default)]
    timeouts: RawTimeouts,
}

/// Connection-tracking timeouts, in seconds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    #[serde(default = "default_tcp_syn")]
    tcp_syn: Spanned<u64>,
    #[serde(default = "default_tcp_established")]
    tcp_established: Spanned<u64>,
    #[serde(default = "default_tcp_closing")]
    tcp_closing: Spanned<u64>,
    #[serde(default = "default_tcp_reset")]
    tcp_reset: Spanned<u64>,
    #[serde(default = "default_udp")]
    udp: Spanned<u64>,
}

fn secs(ns: u64) -> Spanned<u64> {
    Spanned::new(0..0, ns / 1_000_000_000)
}
fn default_tcp_syn() -> Spanned<u64> {
    secs(FlowTimeouts::default().tcp_syn_ns)
}
fn default_tcp_established() -> Spanned<u64> {
    secs(FlowTimeouts::default().tcp_established_ns)
}
fn default_tcp_closing() -> Spanned<u64> {
    secs(FlowTimeouts::default().tcp_closing_ns)
}
fn default_tcp_reset() -> Spanned<u64> {
    secs(FlowTimeouts::default().tcp_reset_ns)
}
fn default_udp() -> Spanned<u64> {
    secs(FlowTimeouts::default().udp_ns)
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            tcp_syn: default_tcp_syn(),
            tcp_established: default_tcp_established(),
            tcp_closing: default_tcp_closing(),
            tcp_reset: default_tcp_reset(),
            udp: default_udp(),
        }
    }
}

fn default_flow_capacity() -> Spanned<u64> {
    Spanned::new(0..0, DEFAULT_FLOW_CAPACITY as u64)
}

fn default_max_backends() -> Spanned<u64> {
    Spanned::new(0..0, vipgate_dataplane::stats::DEFAULT_SLOTS as u64)
}

fn default_mbufs() -> Spanned<u32> {
    Spanned::new(0..0, 16_383)
}
fn default_mbuf_cache() -> Spanned<u32> {
    Spanned::new(0..0, 256)
}
fn default_idle_sleep() -> Spanned<u32> {
    Spanned::new(0..0, 0)
}
fn default_neighbours() -> Spanned<u32> {
    Spanned::new(0..0, 4096)
}

impl Default for RawDataplane {
    fn default() -> Self {
        RawDataplane {
            mbufs: default_mbufs(),
            mbuf_cache: default_mbuf_cache(),
            idle_sleep_us: default_idle_sleep(),
            neighbour_capacity: default_neighbours(),
            flow_capacity: default_flow_capacity(),
            max_backends: default_max_backends(),
            timeouts: RawTimeouts::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    #[serde(default = "default_socket")]
    socket: PathBuf,
    listen_tcp: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    client_ca: Option<Spanned<String>>,
    max_request_bytes: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

/// `[announce]`: VIPs on a local interface for the routing daemon.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnnounce {
    enabled: Option<Spanned<bool>>,
    interface: Option<Spanned<String>>,
    kind: Option<Spanned<String>>,
    hold_down: Option<Spanned<f64>>,
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

impl Default for RawApi {
    fn default() -> Self {
        RawApi {
            socket: default_socket(),
            listen_tcp: None,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            max_request_bytes: None,
        }
    }
}

/// Where the API's dynamic state is persisted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    #[serde(default = "default_state_dir")]
    dir: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

impl Default for RawState {
    fn default() -> Self {
        RawState { dir: default_state_dir() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    name: Spanned<String>,
    device: Option<Spanned<String>>,
    bond: Option<Spanned<RawBond>>,
    #[serde(default)]
    addresses: Vec<Spanned<String>>,
    mtu: Option<Spanned<i64>>,
    kernel_interface: Option<Spanned<String>>,
    #[serde(default)]
    uplink: bool,
}

/// `bond = { members = [...], mode = "802.3ad", transmit_hash = "layer34" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBond {
    #[serde(default)]
    members: Vec<Spanned<String>>,
    mode: Option<Spanned<String>>,
    transmit_hash: Option<Spanned<String>>,
}

/// The only bonding mode: IEEE 802.3ad (LACP).
pub const BOND_MODE: &str = "802.3ad";

/// What a port is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortDevice {
    /// One device (`device = ...`).
    Single(Device),
    /// A bond of devices in 802.3ad mode (`bond = { ... }`).
    Bond {
        /// The members, in configuration order.
        members: Vec<Device>,
        /// How frames are spread over them.
        transmit_hash: TransmitHash,
    },
}

impl PortDevice {
    /// The devices EAL probes for it: the device, or the members.
    pub fn devices(&self) -> &[Device] {
        match self {
            PortDevice::Single(d) => std::slice::from_ref(d),
            PortDevice::Bond { members, .. } => members,
        }
    }
}

/// The name of the bond device the driver creates for port `index`: the
/// bonding driver's own prefix, and a name no configured device can take
/// (devices named `net_bonding...` are refused).
pub fn bond_device_name(index: usize) -> String {
    format!("net_bonding{index}")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVlan {
    name: Spanned<String>,
    port: Spanned<String>,
    id: Spanned<i64>,
    #[serde(default)]
    addresses: Vec<Spanned<String>>,
    mtu: Option<Spanned<i64>>,
    kernel_interface: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    prefix: Spanned<String>,
    via: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    vip: Spanned<String>,
    port: Spanned<i64>,
    protocol: Spanned<String>,
    table_size: Option<Spanned<i64>>,
    on_backend_removal: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    source_pool: Option<Spanned<String>>,
    tunnel_source: Option<Spanned<String>>,
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
    health_check: Option<Spanned<RawHealthCheck>>,
    new_flow_limit: Option<Spanned<RawNewFlowLimit>>,
    #[serde(default)]
    source_ranges: Vec<Spanned<String>>,
    affinity: Option<Spanned<String>>,
}

/// `new_flow_limit = { per_second, burst, prefix_len }` of a service: see
/// [`vipgate_dataplane::admission`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNewFlowLimit {
    per_second: Spanned<i64>,
    burst: Option<Spanned<i64>>,
    prefix_len: Option<Spanned<i64>>,
}

/// `[services.health_check]`: see [`health_check`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    kind: Option<Spanned<String>>,
    interval_ms: Option<Spanned<i64>>,
    timeout_ms: Option<Spanned<i64>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    port: Option<Spanned<i64>>,
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    expect_status: Option<Spanned<String>>,
    payload: Option<Spanned<String>>,
    payload_hex: Option<Spanned<String>>,
    expect_reply: Option<Spanned<String>>,
    expect_reply_hex: Option<Spanned<String>>,
    source: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    port: Spanned<i64>,
    weight: Option<Spanned<i64>>,
}

/// How a device string is handed to EAL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    /// A virtual device: `--vdev <args>`; `name` is what EAL probes it as.
    Virtual {
        /// Device name (before the first comma).
        name: String,
        /// Full vdev string.
        args: String,
    },
    /// A PCI device: `-a <address>`.
    Pci {
        /// Full address, `DDDD:BB:DD.F`.
        address: String,
    },
}

impl Device {
    /// The string the configuration gives it: the vdev's arguments, or the
    /// PCI address.
    pub fn eal_string(&self) -> &str {
        match self {
            Device::Virtual { args, .. } => args,
            Device::Pci { address } => address,
        }
    }

    /// The name EAL knows the probed device by.
    pub fn probed_name(&self) -> &str {
        match self {
            Device::Virtual { name, .. } => name,
            Device::Pci { address } => address,
        }
    }

    /// The kernel interface a virtual device works on, its `iface=`
    /// argument (net_tap, net_tun, net_af_packet).
    pub fn interface(&self) -> Option<&str> {
        match self {
            Device::Virtual { args, .. } => args.split(',').find_map(|a| a.trim().strip_prefix("iface=")),
            Device::Pci { .. } => None,
        }
    }
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// Lcores: the first is the main lcore, the rest run workers.
    pub lcores: Vec<u32>,
    /// The nice value of the control plane's threads (-20 to 0; the
    /// workers run at 0).
    pub control_plane_nice: i32,
    /// Arguments for `rte_eal_init` (without the program name).
    pub eal_args: Vec<String>,
    /// Dataplane settings.
    pub dataplane: DataplaneConfig,
    /// What each port is made of, in port order.
    pub port_devices: Vec<PortDevice>,
    /// Every device EAL probes, in port order (a bond's members in its
    /// order).
    pub devices: Vec<Device>,
    /// The API's Unix socket.
    pub api_socket: PathBuf,
    /// The API's TCP listener with mutual TLS, if `[api] listen_tcp` is set.
    pub api_tcp: Option<ApiTcp>,
    /// The largest request message the TCP listener decodes.
    pub api_max_request_bytes: usize,
    /// Where the Prometheus endpoint listens; `None` when `[metrics] listen
    /// = ""` turns it off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where the dynamic state (services and pools created through the API)
    /// is persisted.
    pub state_dir: PathBuf,
    /// `[announce]`: route announcement of the VIPs (a reload may change
    /// it).
    pub announce: AnnounceSettings,
    /// The names of the ports that reach the routers (`[[ports]] uplink =
    /// true`): when every one of them has its link down, no VIP is
    /// announced (see `link::uplinks_down`).
    pub uplinks: BTreeSet<String>,
    /// `[[vlans]]`, in file order: the VLAN interfaces, each a port of the
    /// snapshot after the `[[ports]]`.
    pub vlans: Vec<VlanConfig>,
    /// Ports, routes and services; port MACs are filled in once the ports
    /// are open (see [`Config::snapshot_spec`]).
    spec: SnapshotSpec,
    /// Every setting a reload may not change, as (field, value) in file
    /// order: `[eal]`, `[dataplane]`, `[api]`, then `[[ports]]`.
    fixed: Vec<(String, String)>,
    /// `[[services]]`, in file order: the one model of a service, owned by
    /// [`STATIC_OWNER`].
    services: Vec<ServiceState>,
    /// `[[source_pools]]`, in file order.
    source_pools: Vec<PoolState>,
    /// The static objects, validated by the rules of every service and
    /// pool, and indexed: where every validation of the dynamic state
    /// starts.
    statics: Effective,
}

/// A `[[vlans]]` entry: an 802.1Q VLAN a port carries, as an interface of
/// its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VlanConfig {
    /// The interface's name.
    pub name: String,
    /// The `[[ports]]` entry carrying it (its index).
    pub port: usize,
    /// The VLAN id, 1 to 4094.
    pub id: u16,
    /// Its kernel interface: a Linux VLAN interface on top of the carrying
    /// port's kernel interface; `None` without one.
    pub kernel_interface: Option<String>,
}

/// The API's TCP listener: its address and the PEM files it uses, read and
/// checked at validation.
#[derive(Clone, Debug)]
pub struct ApiTcp {
    /// `[api] listen_tcp`.
    pub addr: std::net::SocketAddr,
    /// `[api] tls_cert`: the server's certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// `[api] tls_key`: the server's private key, PEM.
    pub key_pem: Vec<u8>,
    /// `[api] client_ca`: the CA certificates client certificates must chain
    /// to, PEM.
    pub client_ca_pem: Vec<u8>,
}

/// A reload that would change a setting only a restart can change: the
/// first such field, with its running and its new value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} changed from {from} to {to}")]
pub struct RestartRequired {
    /// Path of the field, such as `ports[0].device` (or `ports` when the
    /// number of ports changed).
    pub field: String,
    /// The running value, written as in the file (strings quoted).
    pub from: String,
    /// The value in the new file.
    pub to: String,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.to_owned(), source })?;
        Config::parse(path, &text)
    }

    /// Validates configuration text; `path` is used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| match misplaced_sub_table(text) {
            // The parser's own message ("duplicate key") does not say why.
            Some((line, header)) => ConfigError::Invalid {
                file: path.to_owned(),
                line,
                field: header,
                reason: "must follow the [[services]] entry it belongs to (it applies to the service above it); it comes before any [[services]]".to_owned(),
            },
            None => ConfigError::Parse { file: path.to_owned(), message: e.to_string().trim_end().to_owned() },
        })?;
        Validator { file: path, text }.validate(raw)
    }

    /// The snapshot description with the ports' real MAC addresses.
    pub fn snapshot_spec(&self, macs: &[EthernetAddress]) -> SnapshotSpec {
        let mut spec = self.spec.clone();
        for (p, mac) in spec.ports.iter_mut().zip(macs) {
            p.mac = *mac;
        }
        spec
    }

    /// The static services, in file order, in the model of every service
    /// (owned by [`STATIC_OWNER`]).
    pub fn services(&self) -> &[ServiceState] {
        &self.services
    }

    /// The static objects, validated and indexed (with zero MACs).
    pub(crate) fn statics(&self) -> &Effective {
        &self.statics
    }

    /// Ports, as configured (MACs are zero here).
    pub fn ports(&self) -> &[PortSpec] {
        &self.spec.ports
    }

    /// The static source pools, in file order (owned by [`STATIC_OWNER`]).
    pub fn source_pools(&self) -> &[PoolState] {
        &self.source_pools
    }

    /// Static routes, as configured.
    pub fn routes(&self) -> &[RouteSpec] {
        &self.spec.routes
    }

    /// Number of dataplane workers (every lcore but the first).
    pub fn workers(&self) -> usize {
        self.lcores.len() - 1
    }

    /// Whether a running gateway can switch from `self` to `new` without a
    /// restart: services (with their backends), routes and neighbours may
    /// change; `[eal]`, `[dataplane]`, `[api]` and `[[ports]]` may not.
    /// Returns the first of those fields that differs. Values are compared
    /// as validated (defaults filled in), so writing out a default is no
    /// change.
    pub fn restart_required(&self, new: &Config) -> Option<RestartRequired> {
        // Field names line up until the number of ports, which comes before
        // the ports' own fields.
        self.fixed.iter().zip(&new.fixed).find(|(a, b)| a != b).map(|((field, from), (_, to))| RestartRequired {
            field: field.clone(),
            from: from.clone(),
            to: to.clone(),
        })
    }
}

struct Validator<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Validator<'_> {
    fn line(&self, span: &std::ops::Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text[..end].bytes().filter(|&b| b == b'\n').count() + 1
    }

    fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            file: self.file.to_owned(),
            line: self.line(&span),
            field: field.into(),
            reason: reason.into(),
        })
    }

    /// What port `i` is made of: `device` (one device) or `bond` (a bond
    /// of at least two), never both.
    fn port_device(&self, i: usize, p: &RawPort) -> Result<PortDevice, ConfigError> {
        let f = |k: &str| format!("ports[{i}].{k}");
        match (&p.device, &p.bond) {
            (Some(_), Some(b)) => self.err(
                b.span(),
                f("bond"),
                "a port is one device or a bond of several: set device or bond, not both",
            ),
            (None, None) => self.err(
                p.name.span(),
                f("device"),
                "missing: set device (one device), or bond (a bond of several, bond = { members = [...], mode = \"802.3ad\" })",
            ),
            (Some(d), None) => Ok(PortDevice::Single(self.device(d, &f("device"))?)),
            (None, Some(b)) => {
                let span = b.span();
                let b = b.get_ref();
                match &b.mode {
                    None => {
                        return self.err(span, f("bond.mode"), format!("missing; the only mode is {BOND_MODE:?}"));
                    }
                    Some(m) if m.get_ref() != BOND_MODE => {
                        return self.err(
                            m.span(),
                            f("bond.mode"),
                            format!("{:?} is not a supported mode; the only mode is {BOND_MODE:?} (LACP)", m.get_ref()),
                        );
                    }
                    Some(_) => {}
                }
                if b.members.len() < 2 {
                    return self.err(
                        span,
                        f("bond.members"),
                        format!(
                            "a bond needs at least two members, {} given; a port of one device sets device instead",
                            b.members.len()
                        ),
                    );
                }
                let members = b
                    .members
                    .iter()
                    .enumerate()
                    .map(|(j, m)| self.device(m, &f(&format!("bond.members[{j}]"))))
                    .collect::<Result<Vec<_>, _>>()?;
                let transmit_hash = match &b.transmit_hash {
                    None => TransmitHash::default(),
                    Some(h) => TransmitHash::parse(h.get_ref()).map_or_else(
                        || {
                            let names: Vec<&str> = TransmitHash::ALL.iter().map(|h| h.name()).collect();
                            self.err(
                                h.span(),
                                f("bond.transmit_hash"),
                                format!("{:?} is not one of {}", h.get_ref(), names.join(", ")),
                            )
                        },
                        Ok,
                    )?,
                };
                Ok(PortDevice::Bond { members, transmit_hash })
            }
        }
    }

    /// One device string (a port's device, or a bond member).
    fn device(&self, d: &Spanned<String>, field: &str) -> Result<Device, ConfigError> {
        let device = parse_device(d.get_ref()).or_else(|reason| self.err(d.span(), field, reason))?;
        if device.probed_name().starts_with("net_bonding") {
            return self.err(
                d.span(),
                field,
                "vipgate makes bonds itself, to drive and report their LACP state: give the port bond = { members = [...], mode = \"802.3ad\" } instead of a net_bonding device",
            );
        }
        Ok(device)
    }

    fn ipv4(&self, s: &Spanned<String>, field: &str) -> Result<u32, ConfigError> {
        match s.get_ref().trim().parse::<Ipv4Addr>() {
            Ok(a) => Ok(u32::from(a)),
            Err(_) => self.err(s.span(), field, format!("{:?} is not an IPv4 address", s.get_ref())),
        }
    }

    /// A refusal of the rules between objects ([`Effective::statics`]) as
    /// an error on the line of its field (or, for a field `spans` lacks,
    /// of the nearest enclosing one: a backend, a service).
    fn refusal(&self, spans: &HashMap<String, std::ops::Range<usize>>, r: Refusal) -> ConfigError {
        let mut key = r.field.as_str();
        let span = loop {
            if let Some(span) = spans.get(key) {
                break span.clone();
            }
            match key.rfind('.') {
                Some(i) => key = &key[..i],
                None => break 0..0,
            }
        };
        ConfigError::Invalid { file: self.file.to_owned(), line: self.line(&span), field: r.field, reason: r.reason }
    }

    /// `[[vlans]]`: each becomes a port of the snapshot, after the
    /// `[[ports]]` (pushed to `ports`, its subnets to `subnets`).
    fn vlans(
        &self,
        raw: &RawConfig,
        ports: &mut Vec<PortSpec>,
        subnets: &mut Vec<(Ipv4Cidr, String)>,
        kernel_interfaces: &[Option<String>],
        port_names: &HashSet<String>,
    ) -> Result<Vec<VlanConfig>, ConfigError> {
        let devices = ports.len();
        let mut vlans: Vec<VlanConfig> = Vec::new();
        let mut names = port_names.clone();
        for (i, v) in raw.vlans.iter().enumerate() {
            let v = v.get_ref();
            let f = |k: &str| format!("vlans[{i}].{k}");
            let name = v.name.get_ref().trim();
            if name.is_empty() {
                return self.err(v.name.span(), f("name"), "must not be empty");
            }
            if !names.insert(name.to_owned()) {
                return self.err(v.name.span(), f("name"), format!("another port or VLAN is already named {name:?}"));
            }
            let Some(port) = ports[..devices].iter().position(|p| p.name == v.port.get_ref().trim()) else {
                return self.err(
                    v.port.span(),
                    f("port"),
                    format!("no [[ports]] entry is named {:?}; a VLAN is carried by a port", v.port.get_ref()),
                );
            };
            let id = match u16::try_from(*v.id.get_ref()) {
                Ok(id) if (1..=4094).contains(&id) => id,
                _ => {
                    return self.err(
                        v.id.span(),
                        f("id"),
                        format!("{} is not a VLAN id from 1 to 4094", v.id.get_ref()),
                    );
                }
            };
            if let Some(j) = vlans.iter().position(|o| o.port == port && o.id == id) {
                return self.err(
                    v.id.span(),
                    f("id"),
                    format!("VLAN {id} on port {:?} is already vlans[{j}] ({:?})", ports[port].name, vlans[j].name),
                );
            }
            if v.addresses.is_empty() {
                return self.err(
                    v.name.span(),
                    f("addresses"),
                    "a VLAN interface needs at least one address (it sources ARP requests)",
                );
            }
            let mut addresses: Vec<Ipv4Cidr> = Vec::new();
            for (j, a) in v.addresses.iter().enumerate() {
                let field = format!("vlans[{i}].addresses[{j}]");
                let c = self.cidr(a, &field, 1)?;
                if !is_unicast(c.addr) {
                    return self.err(a.span(), field, format!("{} is not a unicast address", Ipv4Addr::from(c.addr)));
                }
                let mask = Route::mask(c.len);
                if c.len < 31 && (c.addr & !mask == 0 || c.addr | mask == u32::MAX) {
                    return self.err(a.span(), field, "is the network or broadcast address of its subnet");
                }
                let overlap = subnets
                    .iter()
                    .map(|(o, owner)| (*o, owner.clone()))
                    .chain(addresses.iter().map(|o| (*o, name.to_owned())))
                    .find(|(o, _)| (c.addr ^ o.addr) & Route::mask(c.len.min(o.len)) == 0);
                if let Some((o, owner)) = overlap {
                    return self.err(
                        a.span(),
                        field,
                        format!(
                            "overlaps {}/{} on {owner:?}; each port and VLAN needs its own subnet",
                            Ipv4Addr::from(o.addr),
                            o.len
                        ),
                    );
                }
                addresses.push(c);
            }
            let carrier_mtu = ports[port].mtu;
            let mtu = match &v.mtu {
                None => carrier_mtu,
                Some(m) => match u16::try_from(*m.get_ref()) {
                    Ok(x) if (MIN_MTU..=carrier_mtu).contains(&x) => x,
                    _ => {
                        return self.err(
                            m.span(),
                            f("mtu"),
                            format!(
                                "{} is not from {MIN_MTU} to {carrier_mtu} (the MTU of port {:?}, which carries it)",
                                m.get_ref(),
                                ports[port].name
                            ),
                        );
                    }
                },
            };
            let carrier_kernel = kernel_interfaces.get(port).cloned().flatten();
            let kernel = match (&v.kernel_interface, &carrier_kernel) {
                (Some(k), _) if k.get_ref().is_empty() => None,
                (Some(k), None) => {
                    return self.err(
                        k.span(),
                        f("kernel_interface"),
                        format!(
                            "port {:?} has no kernel interface to carry the VLAN's; set it there, or \"\" here",
                            ports[port].name
                        ),
                    );
                }
                (None, None) => None,
                (Some(k), Some(_)) => {
                    check_interface_name(k.get_ref())
                        .or_else(|reason| self.err(k.span(), f("kernel_interface"), reason))?;
                    Some(k.get_ref().clone())
                }
                (None, Some(_)) => {
                    check_interface_name(name).or_else(|reason| {
                        self.err(
                            v.name.span(),
                            f("kernel_interface"),
                            format!(
                                "the default kernel interface name is the VLAN's name, which is not usable: {reason}; set kernel_interface to a name of your own, or to \"\" for none"
                            ),
                        )
                    })?;
                    Some(name.to_owned())
                }
            };
            if let Some(k) = &kernel {
                let taken = kernel_interfaces.iter().flatten().any(|o| o == k)
                    || vlans.iter().any(|o| o.kernel_interface.as_ref() == Some(k));
                if taken {
                    let at = v.kernel_interface.as_ref().map_or(v.name.span(), Spanned::span);
                    return self.err(
                        at,
                        f("kernel_interface"),
                        format!("{k:?} is already another port's or VLAN's kernel interface"),
                    );
                }
            }
            for c in &addresses {
                subnets.push((*c, name.to_owned()));
            }
            ports.push(PortSpec {
                name: name.to_owned(),
                mac: EthernetAddress::default(),
                addresses,
                mtu,
                vlan: Some(VlanSpec { port: port as u16, id }),
            });
            vlans.push(VlanConfig { name: name.to_owned(), port, id, kernel_interface: kernel });
        }
        Ok(vlans)
    }

    fn cidr(&self, s: &Spanned<String>, field: &str, min_len: u8) -> Result<Ipv4Cidr, ConfigError> {
        parse_cidr(s.get_ref(), min_len).or_else(|reason| self.err(s.span(), field, reason))
    }

    fn port_number(&self, v: &Spanned<i64>, field: &str) -> Result<u16, ConfigError> {
        check_port_number(*v.get_ref()).or_else(|reason| self.err(v.span(), field, reason))
    }

    /// A number from `min` to `max`; see [`check_bounds`].
    fn bounded<T: PartialOrd + Copy + std::fmt::Display>(
        &self,
        v: &Spanned<T>,
        field: &str,
        min: T,
        max: T,
        max_means: &str,
    ) -> Result<T, ConfigError> {
        check_bounds(*v.get_ref(), min, max, max_means).or_else(|reason| self.err(v.span(), field, reason))
    }

    /// The `health_check` table of `service`, a service of `protocol`; an
    /// error names the field inside it (`services[0].health_check.timeout_ms`)
    /// on its own line, or the table's line for a missing one.
    fn health_check(
        &self,
        raw: &Spanned<RawHealthCheck>,
        field: &str,
        service: &str,
        protocol: Protocol,
    ) -> Result<HealthCheck, ConfigError> {
        use health_check::parse_hex;
        let h = raw.get_ref();
        let span_of = |name: &str| -> std::ops::Range<usize> {
            let s = match name {
                "kind" => h.kind.as_ref().map(Spanned::span),
                "interval_ms" => h.interval_ms.as_ref().map(Spanned::span),
                "timeout_ms" => h.timeout_ms.as_ref().map(Spanned::span),
                "rise" => h.rise.as_ref().map(Spanned::span),
                "fall" => h.fall.as_ref().map(Spanned::span),
                "port" => h.port.as_ref().map(Spanned::span),
                "path" => h.path.as_ref().map(Spanned::span),
                "host" => h.host.as_ref().map(Spanned::span),
                "expect_status" => h.expect_status.as_ref().map(Spanned::span),
                "payload" => h.payload.as_ref().or(h.payload_hex.as_ref()).map(Spanned::span),
                "expect_reply" => h.expect_reply.as_ref().or(h.expect_reply_hex.as_ref()).map(Spanned::span),
                "source" => h.source.as_ref().map(Spanned::span),
                _ => None,
            };
            s.unwrap_or_else(|| raw.span())
        };
        // Text or hexadecimal bytes, not both.
        let bytes = |text: &Option<Spanned<String>>,
                     hex: &Option<Spanned<String>>,
                     name: &str|
         -> Result<Option<Vec<u8>>, ConfigError> {
            match (text, hex) {
                (Some(_), Some(x)) => {
                    self.err(x.span(), format!("{field}.{name}_hex"), format!("set {name} or {name}_hex, not both"))
                }
                (Some(t), None) => Ok(Some(t.get_ref().as_bytes().to_vec())),
                (None, Some(x)) => {
                    parse_hex(x.get_ref()).map(Some).or_else(|r| self.err(x.span(), format!("{field}.{name}_hex"), r))
                }
                (None, None) => Ok(None),
            }
        };
        let input = health_check::HealthCheckInput {
            kind: h.kind.as_ref().map(|v| v.get_ref().clone()),
            interval_ms: h.interval_ms.as_ref().map(|v| *v.get_ref()),
            timeout_ms: h.timeout_ms.as_ref().map(|v| *v.get_ref()),
            rise: h.rise.as_ref().map(|v| *v.get_ref()),
            fall: h.fall.as_ref().map(|v| *v.get_ref()),
            port: h.port.as_ref().map(|v| *v.get_ref()),
            path: h.path.as_ref().map(|v| v.get_ref().clone()),
            host: h.host.as_ref().map(|v| v.get_ref().clone()),
            expect_status: h.expect_status.as_ref().map(|v| v.get_ref().clone()),
            payload: bytes(&h.payload, &h.payload_hex, "payload")?,
            expect_reply: bytes(&h.expect_reply, &h.expect_reply_hex, "expect_reply")?,
            source: h.source.as_ref().map(|v| v.get_ref().clone()),
        };
        input
            .validate()
            .and_then(|check| check.check_service_protocol(service, protocol).map(|()| check))
            .or_else(|e| self.err(span_of(e.field), format!("{field}.{}", e.field), e.reason))
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let eal = raw.eal.get_ref();
        let (lcores, cpus) =
            parse_lcores(eal.lcores.get_ref()).or_else(|reason| self.err(eal.lcores.span(), "eal.lcores", reason))?;
        if lcores.len() < 2 {
            return self.err(
                eal.lcores.span(),
                "eal.lcores",
                "needs at least two lcores: the first runs the control plane, each further one a dataplane worker",
            );
        }
        let prefix = eal.file_prefix.get_ref();
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return self.err(eal.file_prefix.span(), "eal.file_prefix", "use letters, digits, '-' and '_' only");
        }
        if let Some(m) = &eal.memory_mb {
            self.bounded(m, "eal.memory_mb", MIN_MEMORY_MB, MAX_MEMORY_MB, "1 TiB")?;
        }
        let control_plane_nice = *eal.control_plane_nice.get_ref();
        if !(-20..=0).contains(&control_plane_nice) {
            return self.err(
                eal.control_plane_nice.span(),
                "eal.control_plane_nice",
                format!(
                    "{control_plane_nice} is outside -20 to 0: the control plane runs at the workers' priority (0) or above it"
                ),
            );
        }
        let dp = &raw.dataplane;
        self.bounded(&dp.mbufs, "dataplane.mbufs", MIN_MBUFS, MAX_MBUFS, "about 2.3 GiB of buffers")?;
        self.bounded(&dp.mbuf_cache, "dataplane.mbuf_cache", 0, MAX_MBUF_CACHE, "DPDK's per-lcore cache limit")?;
        if *dp.mbuf_cache.get_ref() > *dp.mbufs.get_ref() / 4 {
            return self.err(
                dp.mbuf_cache.span(),
                "dataplane.mbuf_cache",
                format!(
                    "{} is above a quarter of dataplane.mbufs ({}): the caches would hold the pool",
                    dp.mbuf_cache.get_ref(),
                    dp.mbufs.get_ref() / 4
                ),
            );
        }
        self.bounded(&dp.idle_sleep_us, "dataplane.idle_sleep_us", 0, MAX_IDLE_SLEEP_US, "1 ms")?;
        self.bounded(
            &dp.neighbour_capacity,
            "dataplane.neighbour_capacity",
            MIN_NEIGHBOURS,
            MAX_NEIGHBOURS,
            "2^20 entries per worker",
        )?;
        let flows = *dp.flow_capacity.get_ref();
        if !(1024..=MAX_FLOW_CAPACITY as u64).contains(&flows) {
            return self.err(
                dp.flow_capacity.span(),
                "dataplane.flow_capacity",
                format!(
                    "{flows} is not from 1024 to {MAX_FLOW_CAPACITY} (each slot takes {} bytes per worker)",
                    vipgate_dataplane::flow::BYTES_PER_SLOT
                ),
            );
        }
        let max_backends = *dp.max_backends.get_ref();
        let slots_limit = u64::from(vipgate_dataplane::stats::MAX_SLOTS);
        if !(16..=slots_limit).contains(&max_backends) {
            return self.err(
                dp.max_backends.span(),
                "dataplane.max_backends",
                format!(
                    "{max_backends} is not from 16 to {slots_limit} (each backend takes {} bytes of statistics per worker)",
                    size_of::<vipgate_dataplane::stats::SlotCounters>()
                ),
            );
        }
        let t = &dp.timeouts;
        for (name, v, max, note) in [
            ("tcp_syn", &t.tcp_syn, MAX_TRANSIENT_TIMEOUT_S, "1 hour"),
            ("tcp_established", &t.tcp_established, MAX_FLOW_TIMEOUT_S, "26 days"),
            ("tcp_closing", &t.tcp_closing, MAX_TRANSIENT_TIMEOUT_S, "1 hour"),
            ("tcp_reset", &t.tcp_reset, MAX_TRANSIENT_TIMEOUT_S, "1 hour"),
            ("udp", &t.udp, MAX_FLOW_TIMEOUT_S, "26 days"),
        ] {
            self.bounded(v, &format!("dataplane.timeouts.{name}"), 1, max, note)?;
        }
        let flow_timeouts = FlowTimeouts {
            tcp_syn_ns: *t.tcp_syn.get_ref() * 1_000_000_000,
            tcp_established_ns: *t.tcp_established.get_ref() * 1_000_000_000,
            tcp_closing_ns: *t.tcp_closing.get_ref() * 1_000_000_000,
            tcp_reset_ns: *t.tcp_reset.get_ref() * 1_000_000_000,
            udp_ns: *t.udp.get_ref() * 1_000_000_000,
        };

        if raw.ports.is_empty() {
            return self.err(raw.eal.span(), "ports", "no [[ports]] configured; the gateway needs at least one");
        }
        let mut ports: Vec<PortSpec> = Vec::new();
        let mut port_devices: Vec<PortDevice> = Vec::new();
        let mut port_names = HashSet::new();
        // Port index by probed device, and by the kernel interface a vdev
        // works on (`iface=` of net_tap, net_tun, net_af_packet).
        let mut probed: HashMap<String, usize> = HashMap::new();
        let mut vdev_ifaces: HashMap<String, usize> = HashMap::new();
        let mut subnets: Vec<(Ipv4Cidr, String)> = Vec::new();
        let mut kernel_interfaces: Vec<Option<String>> = Vec::new();
        for (i, p) in raw.ports.iter().enumerate() {
            let p = p.get_ref();
            let f = |k: &str| format!("ports[{i}].{k}");
            let name = p.name.get_ref().trim();
            if name.is_empty() {
                return self.err(p.name.span(), f("name"), "must not be empty");
            }
            if !port_names.insert(name.to_owned()) {
                return self.err(p.name.span(), f("name"), format!("another port is already named {name:?}"));
            }
            let port_device = self.port_device(i, p)?;
            for ((field, span), device) in device_fields(i, p).into_iter().zip(port_device.devices()) {
                if let Some(j) = probed.insert(device.probed_name().to_owned(), i) {
                    let reason = if j == i {
                        format!("device {:?} is listed twice in port {name:?}", device.probed_name())
                    } else {
                        format!(
                            "device {:?} is used by another port, ports[{j}] ({:?}); port {name:?} needs a device of its own",
                            device.probed_name(),
                            ports[j].name
                        )
                    };
                    return self.err(span, field, reason);
                }
                if let Some(iface) = device.interface()
                    && let Some(j) = vdev_ifaces.insert(iface.to_owned(), i)
                {
                    let whose = if j == i {
                        "another device of this port".to_owned()
                    } else {
                        format!("ports[{j}] ({:?})", ports[j].name)
                    };
                    return self.err(
                        span,
                        field,
                        format!(
                            "interface {iface:?} of port {name:?} is already the interface of {whose}; two devices on one interface would run as two queues of one device"
                        ),
                    );
                }
            }
            if p.addresses.is_empty() {
                return self.err(
                    p.name.span(),
                    f("addresses"),
                    "a port needs at least one address (it sources ARP requests)",
                );
            }
            let mut addresses = Vec::new();
            for (j, a) in p.addresses.iter().enumerate() {
                let field = format!("ports[{i}].addresses[{j}]");
                let c = self.cidr(a, &field, 1)?;
                if !is_unicast(c.addr) {
                    return self.err(a.span(), field, format!("{} is not a unicast address", Ipv4Addr::from(c.addr)));
                }
                if addresses.iter().any(|o: &Ipv4Cidr| o.addr == c.addr) {
                    return self.err(a.span(), field, format!("{} is listed twice", Ipv4Addr::from(c.addr)));
                }
                let mask = Route::mask(c.len);
                if c.len < 31 && (c.addr & !mask == 0 || c.addr | mask == u32::MAX) {
                    return self.err(a.span(), field, "is the network or broadcast address of its subnet");
                }
                for (other, owner) in &subnets {
                    let m = Route::mask(c.len.min(other.len));
                    if (c.addr ^ other.addr) & m == 0 {
                        return self.err(
                            a.span(),
                            field,
                            format!(
                                "overlaps {}/{} on port {owner:?}; each port needs its own subnet",
                                Ipv4Addr::from(other.addr),
                                other.len
                            ),
                        );
                    }
                }
                addresses.push(c);
            }
            for c in &addresses {
                subnets.push((*c, name.to_owned()));
            }
            let mtu = match &p.mtu {
                None => DEFAULT_MTU,
                Some(m) => match u16::try_from(*m.get_ref()) {
                    Ok(v) if (MIN_MTU..=MAX_MTU).contains(&v) => v,
                    _ => {
                        return self.err(
                            m.span(),
                            f("mtu"),
                            format!("{} is not from {MIN_MTU} to {MAX_MTU}", m.get_ref()),
                        );
                    }
                },
            };
            let kernel = match &p.kernel_interface {
                None => {
                    // The port as Linux sees it: `ip address show uplink`,
                    // `tcpdump -i uplink`.
                    let derived = name.to_owned();
                    check_interface_name(&derived).or_else(|reason| {
                        self.err(
                            p.name.span(),
                            f("kernel_interface"),
                            format!(
                                "the default kernel interface name is the port's name, which is not usable: {reason}; set kernel_interface to a name of your own, or to \"\" for none"
                            ),
                        )
                    })?;
                    Some(derived)
                }
                Some(k) if k.get_ref().is_empty() => None,
                Some(k) => {
                    check_interface_name(k.get_ref())
                        .or_else(|reason| self.err(k.span(), f("kernel_interface"), reason))?;
                    Some(k.get_ref().clone())
                }
            };
            if let Some(k) = &kernel
                && let Some(j) = kernel_interfaces.iter().position(|o| o.as_ref() == Some(k))
            {
                let at = p.kernel_interface.as_ref().map_or(p.name.span(), Spanned::span);
                return self.err(
                    at,
                    f("kernel_interface"),
                    format!("{k:?} is already the kernel interface of ports[{j}]"),
                );
            }
            kernel_interfaces.push(kernel);
            ports.push(PortSpec { name: name.to_owned(), mac: EthernetAddress::default(), addresses, mtu, vlan: None });
            port_devices.push(port_device);
        }

        // A net_tap port's own interface and a kernel interface cannot share
        // a name: both live in the kernel.
        for (i, (p, port_device)) in raw.ports.iter().zip(&port_devices).enumerate() {
            for ((field, span), device) in device_fields(i, p.get_ref()).into_iter().zip(port_device.devices()) {
                let Some(tap) = device.interface() else { continue };
                if let Some(j) = kernel_interfaces.iter().position(|k| k.as_deref() == Some(tap)) {
                    let at = raw.ports[j].get_ref().kernel_interface.as_ref().map_or(span, Spanned::span);
                    let field = if field.ends_with(".device") { format!("ports[{i}]'s device") } else { field };
                    return self.err(
                        at,
                        format!("ports[{j}].kernel_interface"),
                        format!(
                            "{tap:?} is the interface of {field}; name the kernel interface otherwise, or \"\" for none"
                        ),
                    );
                }
            }
        }
        let devices: Vec<Device> = port_devices.iter().flat_map(|d| d.devices().iter().cloned()).collect();

        let vlans = self.vlans(&raw, &mut ports, &mut subnets, &kernel_interfaces, &port_names)?;

        let mut routes = Vec::new();
        for (i, r) in raw.routes.iter().enumerate() {
            let r = r.get_ref();
            let field = format!("routes[{i}].prefix");
            let prefix = self.cidr(&r.prefix, &field, 0)?;
            if let Some(j) = routes.iter().position(|o: &RouteSpec| o.prefix == prefix) {
                return self.err(r.prefix.span(), field, format!("routes[{j}] already has this prefix"));
            }
            if prefix.addr & !Route::mask(prefix.len) != 0 {
                return self.err(
                    r.prefix.span(),
                    field,
                    format!(
                        "host bits are set; did you mean {}/{}?",
                        Ipv4Addr::from(prefix.addr & Route::mask(prefix.len)),
                        prefix.len
                    ),
                );
            }
            let via = self.ipv4(&r.via, &format!("routes[{i}].via"))?;
            if subnets.iter().any(|(c, _)| c.addr == via) {
                return self.err(
                    r.via.span(),
                    format!("routes[{i}].via"),
                    "is an address of the gateway itself; name the next router",
                );
            }
            if !subnets.iter().any(|(c, _)| (c.addr ^ via) & Route::mask(c.len) == 0) {
                return self.err(
                    r.via.span(),
                    format!("routes[{i}].via"),
                    format!("{} is not on any port's subnet", Ipv4Addr::from(via)),
                );
            }
            routes.push(RouteSpec { prefix, via });
        }

        let local: HashSet<u32> = ports.iter().flat_map(|p| p.addresses.iter().map(|c| c.addr)).collect();
        let workers = lcores.len() - 1;
        // The static objects are parsed into the one model of a service and
        // a pool, with the checks of single values; the rules between
        // objects are `Effective`'s, below. `spans` maps each field path to
        // where it is written, to turn a refusal's field into a line.
        let mut spans: HashMap<String, std::ops::Range<usize>> = HashMap::new();
        let mut source_pools: Vec<PoolState> = Vec::new();
        for (i, p) in raw.source_pools.iter().enumerate() {
            let at = format!("source_pools[{i}]");
            let f = |k: &str| format!("{at}.{k}");
            let p = p.get_ref();
            spans.insert(at.clone(), p.name.span());
            spans.insert(f("name"), p.name.span());
            spans.insert(f("addresses"), p.addresses.span());
            check_pool_size(p.addresses.get_ref().len())
                .or_else(|reason| self.err(p.addresses.span(), f("addresses"), reason))?;
            let mut addresses = Vec::new();
            for (j, a) in p.addresses.get_ref().iter().enumerate() {
                let field = f(&format!("addresses[{j}]"));
                addresses.push(Ipv4Addr::from(self.ipv4(a, &field)?));
                spans.insert(field, a.span());
            }
            let (first_port, last_port) = match &p.ports {
                None => DEFAULT_POOL_PORTS,
                Some(r) => {
                    spans.insert(f("ports"), r.span());
                    parse_port_range(r.get_ref()).or_else(|reason| self.err(r.span(), f("ports"), reason))?
                }
            };
            let name = p.name.get_ref().trim().to_owned();
            source_pools.push(PoolState { name, addresses, first_port, last_port, owner: STATIC_OWNER.to_owned() });
        }

        let mut services: Vec<ServiceState> = Vec::new();
        for (i, s) in raw.services.iter().enumerate() {
            let at = format!("services[{i}]");
            let f = |k: &str| format!("{at}.{k}");
            let s = s.get_ref();
            spans.insert(at.clone(), s.name.span());
            spans.insert(f("name"), s.name.span());
            spans.insert(f("vip"), s.vip.span());
            spans.insert(f("port"), s.port.span());
            let name = s.name.get_ref().trim().to_owned();
            let vip = Ipv4Addr::from(self.ipv4(&s.vip, &f("vip"))?);
            let port = self.port_number(&s.port, &f("port"))?;
            let protocol = ProtocolState::parse(s.protocol.get_ref())
                .or_else(|reason| self.err(s.protocol.span(), f("protocol"), reason))?;
            let table_size = match &s.table_size {
                None => DEFAULT_TABLE_SIZE,
                Some(t) => {
                    spans.insert(f("table_size"), t.span());
                    check_table_size(*t.get_ref()).or_else(|reason| self.err(t.span(), f("table_size"), reason))?
                }
            };
            let mode = match s.mode.as_ref().map(|m| m.get_ref().as_str()) {
                None | Some("nat") => ModeState::Nat,
                Some("fullnat") => match &s.source_pool {
                    None => {
                        let at = s.mode.as_ref().map_or(s.name.span(), Spanned::span);
                        return self.err(
                            at,
                            f("source_pool"),
                            "mode \"fullnat\" needs source_pool = \"<name of a [[source_pools]] entry>\"",
                        );
                    }
                    Some(pool) => {
                        spans.insert(f("source_pool"), pool.span());
                        ModeState::Fullnat { source_pool: pool.get_ref().trim().to_owned() }
                    }
                },
                Some("dsr") => {
                    let tunnel_source = match &s.tunnel_source {
                        None => None,
                        Some(t) => {
                            spans.insert(f("tunnel_source"), t.span());
                            self.cidr(t, &f("tunnel_source"), 16)?;
                            Some(t.get_ref().trim().to_owned())
                        }
                    };
                    ModeState::Dsr { tunnel_source }
                }
                Some(other) => {
                    let m = s.mode.as_ref().expect("matched Some");
                    return self.err(m.span(), f("mode"), format!("{other:?} is not \"nat\", \"fullnat\" or \"dsr\""));
                }
            };
            if let Some(pool) = &s.source_pool
                && !matches!(mode, ModeState::Fullnat { .. })
            {
                return self.err(pool.span(), f("source_pool"), "is only used with mode = \"fullnat\"");
            }
            if let Some(t) = &s.tunnel_source
                && !matches!(mode, ModeState::Dsr { .. })
            {
                return self.err(t.span(), f("tunnel_source"), "is only used with mode = \"dsr\"");
            }
            if let Err(reason) = check_backend_count(s.backends.len()) {
                let at = s.backends.get(MAX_BACKENDS).map_or(s.name.span(), Spanned::span);
                return self.err(at, f("backends"), reason);
            }
            let mut backends = Vec::new();
            for (j, b) in s.backends.iter().enumerate() {
                let bf = |k: &str| format!("{at}.backends[{j}].{k}");
                spans.insert(format!("{at}.backends[{j}]"), b.span());
                let b = b.get_ref();
                spans.insert(bf("address"), b.address.span());
                spans.insert(bf("port"), b.port.span());
                let address = Ipv4Addr::from(self.ipv4(&b.address, &bf("address"))?);
                let port = self.port_number(&b.port, &bf("port"))?;
                let weight = match &b.weight {
                    None => 1,
                    Some(w) => {
                        spans.insert(bf("weight"), w.span());
                        check_weight(*w.get_ref()).or_else(|reason| self.err(w.span(), bf("weight"), reason))?
                    }
                };
                backends.push(BackendState { address, port, weight, admin_state: AdminState::Enabled });
            }
            let on_backend_removal = match &s.on_backend_removal {
                None => RemovalState::Rehash,
                Some(v) => RemovalState::parse(v.get_ref())
                    .or_else(|reason| self.err(v.span(), f("on_backend_removal"), reason))?,
            };
            let health_check = match &s.health_check {
                None => None,
                Some(hc) => Some(self.health_check(hc, &f("health_check"), &name, protocol.to_spec())?),
            };
            let new_flow_limit = match &s.new_flow_limit {
                None => None,
                Some(l) => {
                    let l = l.get_ref();
                    let value = |v: &Option<Spanned<i64>>| v.as_ref().map(|v| *v.get_ref());
                    match NewFlowLimit::checked(*l.per_second.get_ref(), value(&l.burst), value(&l.prefix_len)) {
                        Ok(limit) => Some(limit.into()),
                        Err(e) => {
                            let span = match e {
                                NewFlowLimitError::PerSecond(_) => Some(l.per_second.span()),
                                NewFlowLimitError::Burst(_) => l.burst.as_ref().map(Spanned::span),
                                NewFlowLimitError::PrefixLen(_) => l.prefix_len.as_ref().map(Spanned::span),
                            };
                            let field = f(&format!("new_flow_limit.{}", e.field()));
                            return self.err(span.unwrap_or_else(|| l.per_second.span()), field, e.to_string());
                        }
                    }
                }
            };
            if let Err(reason) = check_source_range_count(s.source_ranges.len()) {
                return self.err(s.source_ranges[MAX_SOURCE_RANGES].span(), f("source_ranges"), reason);
            }
            let mut source_ranges = Vec::with_capacity(s.source_ranges.len());
            for (j, r) in s.source_ranges.iter().enumerate() {
                let field = format!("{at}.source_ranges[{j}]");
                source_ranges
                    .push(SourceRange::parse(r.get_ref()).or_else(|reason| self.err(r.span(), field, reason))?);
            }
            let affinity = match &s.affinity {
                None => AffinityState::None,
                Some(a) => {
                    spans.insert(f("affinity"), a.span());
                    AffinityState::parse(a.get_ref()).or_else(|reason| self.err(a.span(), f("affinity"), reason))?
                }
            };
            services.push(ServiceState {
                name,
                vip,
                port,
                protocol,
                mode,
                table_size,
                on_backend_removal,
                backends,
                health_check,
                new_flow_limit,
                source_ranges,
                affinity,
                owner: STATIC_OWNER.to_owned(),
            });
        }

        let mut neighbours = Vec::new();
        let mut seen_neighbours = HashSet::new();
        for (i, n) in raw.neighbours.iter().enumerate() {
            let n = n.get_ref();
            let field = format!("neighbours[{i}].address");
            let addr = self.ipv4(&n.address, &field)?;
            if !subnets.iter().any(|(c, _)| (c.addr ^ addr) & Route::mask(c.len) == 0) {
                return self.err(
                    n.address.span(),
                    field,
                    format!("{} is not on any port's subnet", Ipv4Addr::from(addr)),
                );
            }
            if local.contains(&addr) {
                return self.err(n.address.span(), field, "is an address of the gateway itself");
            }
            if !seen_neighbours.insert(addr) {
                return self.err(n.address.span(), field, format!("{} is listed twice", Ipv4Addr::from(addr)));
            }
            let mac = parse_mac(n.mac.get_ref())
                .or_else(|reason| self.err(n.mac.span(), format!("neighbours[{i}].mac"), reason))?;
            neighbours.push(NeighbourSpec { addr, mac });
        }

        let base = SnapshotSpec { ports, routes, neighbours, services: Vec::new(), source_pools: Vec::new() };
        // The rules between services and pools, the API's too: an error
        // names the object's field, which `spans` places on its line.
        let statics = Effective::statics(&self.file.display().to_string(), base, workers, &source_pools, &services)
            .map_err(|r| self.refusal(&spans, r))?;
        let spec = statics.spec();
        // The dataplane's own compiler is the last word: anything it would
        // refuse at start is refused now, before EAL.
        if let Err(e) = Snapshot::build(&spec) {
            return self.err(0..0, "configuration", e.to_string());
        }

        let eal_args = eal_arguments(eal, &lcores, &cpus, &devices);
        let dataplane = DataplaneConfig {
            ports: spec
                .ports
                .iter()
                .zip(&port_devices)
                .zip(&kernel_interfaces)
                .enumerate()
                .map(|(i, ((p, d), k))| {
                    let (device, bond) = match d {
                        PortDevice::Single(d) => (d.probed_name().to_owned(), None),
                        PortDevice::Bond { members, transmit_hash } => (
                            bond_device_name(i),
                            Some(BondConfig {
                                members: members.iter().map(|m| m.probed_name().to_owned()).collect(),
                                transmit_hash: *transmit_hash,
                            }),
                        ),
                    };
                    PortConfig { name: p.name.clone(), device, bond, mtu: p.mtu, kernel_interface: k.clone() }
                })
                .collect(),
            mbufs: *dp.mbufs.get_ref(),
            mbuf_cache: *dp.mbuf_cache.get_ref(),
            idle_sleep_us: *dp.idle_sleep_us.get_ref(),
            pipeline: PipelineConfig {
                neighbour_capacity: *dp.neighbour_capacity.get_ref() as usize,
                neighbour_timers: PipelineConfig::default().neighbour_timers,
                flow_capacity: flows as usize,
                flow_timeouts,
                backend_slots: max_backends as usize,
                ..PipelineConfig::default()
            },
        };
        let (api_tcp, api_max_request_bytes) = self.api_tcp(&raw.api)?;
        let metrics_listen = self.metrics(&raw.metrics)?;
        let announce = self.announce(&raw.announce)?;
        let uplink_flags: Vec<bool> = raw.ports.iter().map(|p| p.get_ref().uplink).collect();
        let uplinks: BTreeSet<String> =
            spec.ports.iter().zip(&uplink_flags).filter(|(_, u)| **u).map(|(p, _)| p.name.clone()).collect();
        let mut fixed = fixed_settings(
            eal,
            &lcores,
            &cpus,
            dp,
            &raw.api.socket,
            &spec.ports,
            &port_devices,
            &kernel_interfaces,
            &uplink_flags,
        );
        for (i, v) in raw.vlans.iter().enumerate() {
            let v = v.get_ref();
            let spec = &spec.ports[spec.ports.len() - raw.vlans.len() + i];
            let addresses: Vec<String> =
                spec.addresses.iter().map(|c| format!("{}/{}", Ipv4Addr::from(c.addr), c.len)).collect();
            fixed.push((format!("vlans[{i}].name"), format!("{:?}", spec.name)));
            fixed.push((format!("vlans[{i}].port"), format!("{:?}", v.port.get_ref().trim())));
            fixed.push((format!("vlans[{i}].id"), v.id.get_ref().to_string()));
            fixed.push((format!("vlans[{i}].addresses"), format!("{addresses:?}")));
            fixed.push((format!("vlans[{i}].mtu"), spec.mtu.to_string()));
            let k = vlans[i].kernel_interface.as_deref().unwrap_or("");
            fixed.push((format!("vlans[{i}].kernel_interface"), format!("{k:?}")));
        }
        // In file order: after `api.socket`, before `ports`.
        let at = fixed.iter().position(|(f, _)| f == "ports").unwrap_or(fixed.len());
        let mut extra = listener_settings(&raw.api, api_max_request_bytes, metrics_listen);
        extra.push(("state.dir".to_owned(), format!("{:?}", raw.state.dir.display().to_string())));
        fixed.splice(at..at, extra);
        Ok(Config {
            path: self.file.to_owned(),
            lcores,
            control_plane_nice,
            eal_args,
            dataplane,
            port_devices,
            devices,
            api_socket: raw.api.socket,
            api_tcp,
            api_max_request_bytes,
            metrics_listen,
            state_dir: raw.state.dir,
            announce,
            uplinks,
            vlans,
            spec,
            fixed,
            services,
            source_pools,
            statics,
        })
    }

    /// `[api] listen_tcp` with its TLS files, and `max_request_bytes`.
    fn api_tcp(&self, api: &RawApi) -> Result<(Option<ApiTcp>, usize), ConfigError> {
        let max = match &api.max_request_bytes {
            None => DEFAULT_MAX_REQUEST_BYTES,
            Some(v) => match usize::try_from(*v.get_ref()) {
                Ok(n) if (MIN_MAX_REQUEST_BYTES..=MAX_MAX_REQUEST_BYTES).contains(&n) => n,
                _ => {
                    return self.err(
                        v.span(),
                        "api.max_request_bytes",
                        format!("{} is not from {MIN_MAX_REQUEST_BYTES} to {MAX_MAX_REQUEST_BYTES}", v.get_ref()),
                    );
                }
            },
        };
        let Some(listen) = &api.listen_tcp else {
            for (key, v) in [("tls_cert", &api.tls_cert), ("tls_key", &api.tls_key), ("client_ca", &api.client_ca)] {
                if let Some(v) = v {
                    return self.err(
                        v.span(),
                        format!("api.{key}"),
                        "is only used with api.listen_tcp, which is not set",
                    );
                }
            }
            return Ok((None, max));
        };
        let addr = match listen.get_ref().trim().parse::<std::net::SocketAddr>() {
            Ok(a) if a.port() != 0 => a,
            _ => {
                return self.err(
                    listen.span(),
                    "api.listen_tcp",
                    format!("{:?} is not an address and port such as \"198.18.0.1:50051\"", listen.get_ref()),
                );
            }
        };
        let mut pems = Vec::new();
        for (key, v, kind) in [
            ("tls_cert", &api.tls_cert, Pem::Certificates),
            ("tls_key", &api.tls_key, Pem::PrivateKey),
            ("client_ca", &api.client_ca, Pem::Certificates),
        ] {
            let Some(v) = v else {
                return self.err(
                    listen.span(),
                    format!("api.{key}"),
                    "is required with api.listen_tcp: the TCP listener always uses TLS with client certificates (set tls_cert, tls_key and client_ca)",
                );
            };
            let path = Path::new(v.get_ref());
            let text = match read_pem_file(path) {
                Ok(t) => t,
                Err(reason) => return self.err(v.span(), format!("api.{key}"), reason),
            };
            if let Err(reason) = kind.check(&text) {
                return self.err(v.span(), format!("api.{key}"), format!("{}: {reason}", path.display()));
            }
            pems.push(text);
        }
        let [cert_pem, key_pem, client_ca_pem]: [Vec<u8>; 3] = pems.try_into().unwrap_or_else(|_| unreachable!());
        Ok((Some(ApiTcp { addr, cert_pem, key_pem, client_ca_pem }), max))
    }

    /// `[announce]`: every key optional; see `crate::announce`.
    fn announce(&self, a: &RawAnnounce) -> Result<AnnounceSettings, ConfigError> {
        use announce_settings::{InterfaceKind, MAX_HOLD_DOWN, check_interface_name};
        let mut settings = AnnounceSettings::default();
        if let Some(v) = &a.enabled {
            settings.enabled = *v.get_ref();
        }
        if let Some(v) = &a.interface {
            check_interface_name(v.get_ref()).or_else(|reason| self.err(v.span(), "announce.interface", reason))?;
            settings.interface = v.get_ref().clone();
        }
        if let Some(v) = &a.kind {
            settings.kind =
                InterfaceKind::parse(v.get_ref()).or_else(|reason| self.err(v.span(), "announce.kind", reason))?;
        }
        if let Some(v) = &a.hold_down {
            let secs = *v.get_ref();
            if !(secs.is_finite() && (0.0..=MAX_HOLD_DOWN.as_secs_f64()).contains(&secs)) {
                return self.err(
                    v.span(),
                    "announce.hold_down",
                    format!("{secs} is not from 0 to {} seconds", MAX_HOLD_DOWN.as_secs()),
                );
            }
            settings.hold_down = std::time::Duration::from_secs_f64(secs);
        }
        Ok(settings)
    }

    /// `[metrics] listen`: an address and port, or `""` for off.
    fn metrics(&self, m: &RawMetrics) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        let Some(listen) = &m.listen else {
            return Ok(Some(DEFAULT_METRICS_LISTEN.parse().unwrap_or_else(|_| unreachable!())));
        };
        let text = listen.get_ref().trim();
        if text.is_empty() {
            return Ok(None);
        }
        match text.parse::<std::net::SocketAddr>() {
            Ok(a) => Ok(Some(a)),
            Err(_) => self.err(
                listen.span(),
                "metrics.listen",
                format!(
                    "{:?} is not an address and port such as \"127.0.0.1:9469\" (or \"\" to turn metrics off)",
                    listen.get_ref()
                ),
            ),
        }
    }
}

/// What a PEM file must hold.
#[derive(Clone, Copy)]
enum Pem {
    /// One or more certificates.
    Certificates,
    /// One private key (PKCS#8, PKCS#1 or SEC1).
    PrivateKey,
}

impl Pem {
    fn check(self, text: &[u8]) -> Result<(), String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        match self {
            Pem::Certificates => {
                let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(text).collect();
                match certs {
                    Ok(c) if !c.is_empty() => Ok(()),
                    Ok(_) => Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned()),
                    Err(e) => Err(format!("is not a PEM certificate file: {e}")),
                }
            }
            Pem::PrivateKey => match PrivateKeyDer::from_pem_slice(text) {
                Ok(_) => Ok(()),
                Err(e) => Err(format!("holds no PEM private key: {e}")),
            },
        }
    }
}

/// The restart-only settings of the API's TCP listener and the metrics
/// endpoint, as (field, value), after those of [`fixed_settings`].
fn listener_settings(
    api: &RawApi,
    max_request_bytes: usize,
    metrics: Option<std::net::SocketAddr>,
) -> Vec<(String, String)> {
    let opt = |v: &Option<Spanned<String>>| {
        v.as_ref().map_or_else(|| "(not set)".to_owned(), |v| format!("{:?}", v.get_ref().trim()))
    };
    vec![
        ("api.listen_tcp".to_owned(), opt(&api.listen_tcp)),
        ("api.tls_cert".to_owned(), opt(&api.tls_cert)),
        ("api.tls_key".to_owned(), opt(&api.tls_key)),
        ("api.client_ca".to_owned(), opt(&api.client_ca)),
        ("api.max_request_bytes".to_owned(), max_request_bytes.to_string()),
        ("metrics.listen".to_owned(), format!("{:?}", metrics.map(|a| a.to_string()).unwrap_or_default())),
    ]
}

/// The settings only a restart can change, as (field, value) in file order,
/// values written as in TOML. See [`Config::restart_required`].
#[allow(clippy::too_many_arguments)]
fn fixed_settings(
    eal: &RawEal,
    lcores: &[u32],
    cpus: &[Option<u32>],
    dp: &RawDataplane,
    socket: &Path,
    ports: &[PortSpec],
    devices: &[PortDevice],
    kernel_interfaces: &[Option<String>],
    uplinks: &[bool],
) -> Vec<(String, String)> {
    let lcores: Vec<String> =
        lcores.iter().zip(cpus).map(|(l, c)| c.map_or_else(|| l.to_string(), |c| format!("{l}@{c}"))).collect();
    let t = &dp.timeouts;
    let mut fixed = vec![
        ("eal.lcores".to_owned(), format!("{:?}", lcores.join(","))),
        ("eal.hugepages".to_owned(), eal.hugepages.to_string()),
        ("eal.huge_unlink".to_owned(), eal.huge_unlink.to_string()),
        (
            "eal.memory_mb".to_owned(),
            eal.memory_mb.as_ref().map_or_else(|| "(not set)".to_owned(), |m| m.get_ref().to_string()),
        ),
        ("eal.file_prefix".to_owned(), format!("{:?}", eal.file_prefix.get_ref())),
        ("eal.extra_args".to_owned(), format!("{:?}", eal.extra_args)),
        ("eal.control_plane_nice".to_owned(), eal.control_plane_nice.get_ref().to_string()),
        ("dataplane.mbufs".to_owned(), dp.mbufs.get_ref().to_string()),
        ("dataplane.mbuf_cache".to_owned(), dp.mbuf_cache.get_ref().to_string()),
        ("dataplane.idle_sleep_us".to_owned(), dp.idle_sleep_us.get_ref().to_string()),
        ("dataplane.neighbour_capacity".to_owned(), dp.neighbour_capacity.get_ref().to_string()),
        ("dataplane.flow_capacity".to_owned(), dp.flow_capacity.get_ref().to_string()),
        ("dataplane.max_backends".to_owned(), dp.max_backends.get_ref().to_string()),
        ("dataplane.timeouts.tcp_syn".to_owned(), t.tcp_syn.get_ref().to_string()),
        ("dataplane.timeouts.tcp_established".to_owned(), t.tcp_established.get_ref().to_string()),
        ("dataplane.timeouts.tcp_closing".to_owned(), t.tcp_closing.get_ref().to_string()),
        ("dataplane.timeouts.tcp_reset".to_owned(), t.tcp_reset.get_ref().to_string()),
        ("dataplane.timeouts.udp".to_owned(), t.udp.get_ref().to_string()),
        ("api.socket".to_owned(), format!("{:?}", socket.display().to_string())),
        ("ports".to_owned(), format!("{} port{}", ports.len(), if ports.len() == 1 { "" } else { "s" })),
    ];
    for (i, (((p, d), k), uplink)) in ports.iter().zip(devices).zip(kernel_interfaces).zip(uplinks).enumerate() {
        let addresses: Vec<String> =
            p.addresses.iter().map(|c| format!("{}/{}", Ipv4Addr::from(c.addr), c.len)).collect();
        fixed.push((format!("ports[{i}].name"), format!("{:?}", p.name)));
        match d {
            PortDevice::Single(d) => fixed.push((format!("ports[{i}].device"), format!("{:?}", d.eal_string()))),
            PortDevice::Bond { members, transmit_hash } => {
                let members: Vec<&str> = members.iter().map(Device::eal_string).collect();
                fixed.push((
                    format!("ports[{i}].bond"),
                    format!(
                        "{{ members = {members:?}, mode = {BOND_MODE:?}, transmit_hash = {:?} }}",
                        transmit_hash.name()
                    ),
                ));
            }
        }
        fixed.push((format!("ports[{i}].addresses"), format!("{addresses:?}")));
        fixed.push((format!("ports[{i}].mtu"), p.mtu.to_string()));
        fixed.push((format!("ports[{i}].kernel_interface"), format!("{:?}", k.as_deref().unwrap_or(""))));
        fixed.push((format!("ports[{i}].uplink"), uplink.to_string()));
    }
    fixed
}

/// The first `[services.…]` or `[[services.…]]` header (such as
/// `[services.health_check]`) that comes before any `[[services]]`, with
/// its 1-based line: TOML then makes `services` a table, not the array of
/// services.
fn misplaced_sub_table(text: &str) -> Option<(usize, String)> {
    for (i, line) in text.lines().enumerate() {
        let header = line.split('#').next().unwrap_or("").trim();
        if !header.starts_with('[') {
            continue;
        }
        let key: String = header.chars().filter(|c| !matches!(c, '[' | ']') && !c.is_whitespace()).collect();
        if key == "services" && header.starts_with("[[") {
            return None;
        }
        if key.starts_with("services.") {
            return Some((i + 1, header.to_owned()));
        }
    }
    None
}

/// Parses an EAL lcore list such as `0,1`, `0-3` or `0,2-3`, where an
/// lcore may be placed on a CPU with `lcore@cpu` (`0@0,1@1,2@1` runs lcores
/// 1 and 2 on CPU 1). The first lcore given is the main lcore. Returns the
/// lcores and, per lcore, its CPU if one was given.
fn parse_lcores(s: &str) -> Result<(Vec<u32>, Vec<Option<u32>>), String> {
    let mut out = Vec::new();
    let mut cpus = Vec::new();
    for item in s.split(',').map(str::trim) {
        let (part, cpu) = match item.split_once('@') {
            Some((l, c)) => match c.trim().parse::<u32>() {
                Ok(c) if !l.contains('-') => (l.trim(), Some(c)),
                _ => return Err(format!("{item:?}: write a single lcore on a CPU as \"lcore@cpu\", such as \"2@1\"")),
            },
            None => (item, None),
        };
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (Ok(a), Ok(b)) = (a.trim().parse::<u32>(), b.trim().parse::<u32>()) else {
            return Err(format!("{part:?} is not an lcore number or range (write lists like \"0,1\" or \"0-3\")"));
        };
        if a > b {
            return Err(format!("range {part:?} is backwards"));
        }
        if b >= 128 {
            return Err(format!("lcore {b} is beyond the 128 this build supports"));
        }
        for l in a..=b {
            if out.contains(&l) {
                return Err(format!("lcore {l} is listed twice"));
            }
            out.push(l);
            cpus.push(cpu);
        }
    }
    Ok((out, cpus))
}

/// `v` from `min` to `max`, or why not, naming the bound crossed and, for
/// the maximum, what it means (`max_means`, such as "1 ms").
pub(crate) fn check_bounds<T: PartialOrd + std::fmt::Display>(
    v: T,
    min: T,
    max: T,
    max_means: &str,
) -> Result<T, String> {
    if v < min {
        Err(format!("{v} is below the minimum {min}"))
    } else if v > max {
        Err(format!("{v} is above the maximum {max} ({max_means})"))
    } else {
        Ok(v)
    }
}

/// The largest TLS file `[api]` reads: a certificate chain or a CA bundle
/// is a few kilobytes.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Reads a PEM file of at most [`MAX_PEM_BYTES`]. Anything but a regular
/// file is refused before it is opened: a device such as /dev/zero never
/// ends, and opening a FIFO blocks.
fn read_pem_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    if !std::fs::metadata(path).map_err(cannot)?.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut text = Vec::new();
    std::fs::File::open(path).and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut text)).map_err(cannot)?;
    if text.len() as u64 > MAX_PEM_BYTES {
        return Err(format!("{} is larger than {MAX_PEM_BYTES} bytes", path.display()));
    }
    Ok(text)
}

/// Parses a port range `first-last` (or a single port).
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    match (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
        (Ok(a), Ok(b)) if a >= 1 && a <= b => Ok((a, b)),
        _ => Err(format!("{s:?} is not a port range like \"1024-65535\" (from 1 to 65535, first <= last)")),
    }
}

/// Parses a unicast MAC address written as six colon-separated hex bytes.
fn parse_mac(s: &str) -> Result<EthernetAddress, String> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address like 02:00:00:00:00:01"));
    }
    for (b, p) in mac.iter_mut().zip(&parts) {
        *b = match u8::from_str_radix(p, 16) {
            Ok(v) if p.len() == 2 => v,
            _ => return Err(format!("{s:?} is not a MAC address like 02:00:00:00:00:01")),
        };
    }
    let mac = EthernetAddress(mac);
    if mac.is_multicast() || mac == EthernetAddress::default() {
        return Err(format!("{s:?} is not a unicast MAC address"));
    }
    Ok(mac)
}

/// A Linux network interface name: 1 to 15 bytes (IFNAMSIZ less the NUL) of
/// letters, digits, `-`, `_` and `.`, and not `.` or `..`.
pub(crate) fn check_interface_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 15 {
        return Err(format!("{s:?} is not 1 to 15 bytes long (Linux interface names are at most 15)"));
    }
    if s == "." || s == ".." {
        return Err(format!("{s:?} is not a usable interface name"));
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("{s:?} contains {c:?}; use letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

/// Classifies a device string: a vdev (`net_...`) or a PCI address.
fn parse_device(s: &str) -> Result<Device, String> {
    let s = s.trim();
    if s.starts_with("net_") {
        let name = s.split(',').next().unwrap_or(s).to_owned();
        return Ok(Device::Virtual { name, args: s.to_owned() });
    }
    let full = if s.matches(':').count() == 1 { format!("0000:{s}") } else { s.to_owned() };
    let ok = full.len() == 12
        && full.char_indices().all(|(i, c)| match i {
            4 | 7 => c == ':',
            10 => c == '.',
            _ => c.is_ascii_hexdigit(),
        });
    if ok {
        Ok(Device::Pci { address: full.to_ascii_lowercase() })
    } else {
        Err(format!(
            "{s:?} is neither a virtual device (net_tap0,iface=..., net_pcap0,..., net_null0, ...) nor a PCI address (0000:03:00.0)"
        ))
    }
}

/// The field and span of each device of port `i`, in the order of
/// [`PortDevice::devices`]: its `device`, or each of its bond's members.
fn device_fields(i: usize, p: &RawPort) -> Vec<(String, std::ops::Range<usize>)> {
    match (&p.device, &p.bond) {
        (Some(d), _) => vec![(format!("ports[{i}].device"), d.span())],
        (None, Some(b)) => b
            .get_ref()
            .members
            .iter()
            .enumerate()
            .map(|(j, m)| (format!("ports[{i}].bond.members[{j}]"), m.span()))
            .collect(),
        (None, None) => Vec::new(),
    }
}

fn eal_arguments(eal: &RawEal, lcores: &[u32], cpus: &[Option<u32>], devices: &[Device]) -> Vec<String> {
    // With any lcore placed on a CPU, EAL needs --lcores (which also lets
    // several lcores share a CPU); otherwise -l, where lcore N runs on CPU N.
    let (flag, list): (&str, Vec<String>) = if cpus.iter().any(Option::is_some) {
        ("--lcores", lcores.iter().zip(cpus).map(|(l, c)| format!("{l}@{}", c.unwrap_or(*l))).collect())
    } else {
        ("-l", lcores.iter().map(u32::to_string).collect())
    };
    let mut args = vec![
        flag.to_owned(),
        list.join(","),
        "--main-lcore".to_owned(),
        lcores[0].to_string(),
        "--file-prefix".to_owned(),
        eal.file_prefix.get_ref().clone(),
    ];
    if eal.hugepages {
        if eal.huge_unlink {
            // Hugepage files are unlinked right after mapping: nothing is
            // left in /dev/hugepages even after SIGKILL, but secondary
            // processes (dpdk-proc-info, dpdk-dumpcap) cannot attach.
            args.push("--huge-unlink".to_owned());
        }
    } else {
        args.push("--no-huge".to_owned());
    }
    let memory = eal.memory_mb.as_ref().map(|m| *m.get_ref()).or((!eal.hugepages).then_some(512));
    if let Some(m) = memory {
        args.push("-m".to_owned());
        args.push(m.to_string());
    }
    if !devices.iter().any(|d| matches!(d, Device::Pci { .. })) {
        // Never probe (and grab) the host's PCI NICs when none is configured.
        args.push("--no-pci".to_owned());
    }
    for d in devices {
        match d {
            Device::Virtual { args: v, .. } => {
                args.push("--vdev".to_owned());
                args.push(v.clone());
            }
            Device::Pci { address } => {
                args.push("-a".to_owned());
                args.push(address.clone());
            }
        }
    }
    args.extend(eal.extra_args.iter().cloned());
    args
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod doc_keys;
