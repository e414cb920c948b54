//! vipgatectl, the command-line client of vipgated's API.
//!
//! It talks gRPC to vipgated over its Unix socket (or, with `--endpoint`,
//! over TCP with mutual TLS) and prints what it reads,
//! as tables for people or, with `--json`, as a stable JSON document for
//! scripts. Exit codes: 0 success, 1 the call failed (the message says why),
//! 2 bad usage.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;
use serde::ser::SerializeMap;
use vipgate_controlplane::api::{self, ApiError, pb};

/// How long one call may take. The daemon answers from memory; a call that
/// takes longer means a hung daemon, and a script must not hang with it.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Query a running vipgated (its health and traffic counters) and change its
/// desired state: services, backends and source pools.
#[derive(Debug, Parser)]
#[command(name = "vipgatectl", version)]
struct Cli {
    /// vipgated's API socket.
    #[arg(long, global = true, value_name = "PATH", env = "VIPGATE_SOCKET", default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Talk to vipgated over TCP with mutual TLS instead of the socket, at
    /// `https://host:port` (its `[api] listen_tcp`); needs --cert, --key and
    /// --ca.
    #[arg(long, global = true, value_name = "URL", env = "VIPGATE_ENDPOINT", requires_all = ["cert", "key", "ca"])]
    endpoint: Option<String>,
    /// With --endpoint: this client's certificate (PEM), signed by the CA
    /// vipgated's `[api] client_ca` names.
    #[arg(long, global = true, value_name = "PEM", env = "VIPGATE_CERT", requires = "endpoint")]
    cert: Option<PathBuf>,
    /// With --endpoint: this client's private key (PEM).
    #[arg(long, global = true, value_name = "PEM", env = "VIPGATE_KEY", requires = "endpoint")]
    key: Option<PathBuf>,
    /// With --endpoint: the CA certificate (PEM) that signed vipgated's
    /// server certificate.
    #[arg(long, global = true, value_name = "PEM", env = "VIPGATE_CA", requires = "endpoint")]
    ca: Option<PathBuf>,
    /// Print a JSON document instead of tables (for scripts).
    #[arg(long, global = true)]
    json: bool,
    /// What to show.
    #[command(subcommand)]
    command: Command,
}

/// vipgatectl's commands.
// Parsed once per run: the size of the service variants (their many
// options) does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Whether the gateway forwards traffic, its version and uptime.
    Health,
    /// Traffic counters per worker and in total, port and mempool statistics.
    #[command(visible_alias = "counters")]
    Stats {
        /// Also list drop reasons that counted nothing (tables only; JSON
        /// always lists every reason).
        #[arg(long)]
        all: bool,
    },
    /// Every service with its backends (weight, state, active and
    /// inactive flows), and the source pools, at the current state version
    /// (like `ipvsadm -Ln`).
    #[command(visible_alias = "ls")]
    List {
        /// Traffic columns instead (connections, packets and bytes in and
        /// out), like `ipvsadm -Ln --stats`.
        #[arg(long)]
        stats: bool,
    },
    /// Create, replace or delete a dynamic service.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Add, change or remove a backend of a dynamic service.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Drain a backend: it takes no new flows, open flows continue (same as
    /// `backend update SERVICE ADDR:PORT --state draining`).
    Drain {
        /// The service's name.
        service: String,
        /// The backend, e.g. 198.18.1.11:8080.
        #[arg(value_name = "ADDR:PORT")]
        backend: String,
    },
    /// Create or delete a dynamic FullNAT source pool.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Replace the whole dynamic state (services and source pools) with the
    /// contents of a JSON file (see docs/operations.md for its format).
    ///
    /// Without --expected-version this reads the current version first
    /// (GetState) and sends it: a read-then-write that still fails with
    /// FAILED_PRECONDITION if another writer changed the state in between.
    Apply {
        /// The JSON file: {"services": [...], "source_pools": [...]}.
        file: PathBuf,
        /// Apply only if the state is still at this version; otherwise the
        /// call fails with FAILED_PRECONDITION and nothing changes.
        #[arg(long, value_name = "N")]
        expected_version: Option<u64>,
    },
    /// Print the state's version, then one line per change until
    /// interrupted (with --json: one JSON object per line).
    Watch,
}

/// `vipgatectl service ...`.
#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// Create a dynamic service; fails with ALREADY_EXISTS if the name is
    /// taken.
    Create {
        /// The service's name: letters, digits, '.', '-' and '_'.
        name: String,
        #[command(flatten)]
        spec: ServiceSpec,
    },
    /// Replace a dynamic service, backends included, with this definition.
    Update {
        /// The service's name.
        name: String,
        #[command(flatten)]
        spec: ServiceSpec,
    },
    /// Delete a dynamic service.
    Delete {
        /// The service's name.
        name: String,
    },
}

/// A service's definition on the command line.
#[derive(Debug, clap::Args)]
struct ServiceSpec {
    /// The virtual IPv4 address.
    #[arg(long, value_name = "ADDR")]
    vip: String,
    /// The virtual port, 1 to 65535.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// The protocol.
    #[arg(long, value_parser = ["tcp", "udp"])]
    protocol: String,
    /// How backends are reached (default nat).
    #[arg(long, value_parser = ["nat", "fullnat", "dsr"])]
    mode: Option<String>,
    /// fullnat: the source pool's name.
    #[arg(long, value_name = "NAME")]
    source_pool: Option<String>,
    /// dsr: the tunnel source prefix, e.g. 198.18.3.0/24.
    #[arg(long, value_name = "CIDR")]
    tunnel_source: Option<String>,
    /// The lookup table's size, a prime from 3 to 16777213 (default 65537).
    #[arg(long, value_name = "N")]
    table_size: Option<u32>,
    /// What happens to a removed backend's flows (default rehash).
    #[arg(long, value_parser = ["rehash", "reset"])]
    on_backend_removal: Option<String>,
    /// A backend, weight 1 unless given; repeat for more.
    #[arg(long = "backend", value_name = "ADDR:PORT[:WEIGHT]")]
    backends: Vec<String>,
    /// Health-check the backends this way (default: no check). The
    /// --check-* options left out take vipgated's defaults.
    #[arg(long, value_parser = ["tcp", "http", "https", "udp"])]
    check: Option<String>,
    /// Time between two probes of a backend (default 5000).
    #[arg(long, value_name = "MS", requires = "check")]
    check_interval_ms: Option<u32>,
    /// Time a probe may take, less than the interval (default 2000, or half the interval).
    #[arg(long, value_name = "MS", requires = "check")]
    check_timeout_ms: Option<u32>,
    /// Passes in a row that bring a down backend up (default 2).
    #[arg(long, value_name = "N", requires = "check")]
    check_rise: Option<u32>,
    /// Failures in a row that take an up backend down (default 3).
    #[arg(long, value_name = "N", requires = "check")]
    check_fall: Option<u32>,
    /// The port probed (default: each backend's own).
    #[arg(long, value_name = "PORT", requires = "check")]
    check_port: Option<u16>,
    /// http, https: the path (default /).
    #[arg(long, value_name = "PATH", requires = "check")]
    check_path: Option<String>,
    /// http, https: the Host header (default: the probed address:port).
    #[arg(long, value_name = "HOST", requires = "check")]
    check_host: Option<String>,
    /// http, https: the status codes that pass, e.g. 200-299,301 (default 200-399).
    #[arg(long, value_name = "CODES", requires = "check")]
    check_expect_status: Option<String>,
    /// udp: the datagram sent, in hexadecimal.
    #[arg(long, value_name = "HEX", requires = "check")]
    check_payload_hex: Option<String>,
    /// udp: the reply's expected first bytes, in hexadecimal (default: any reply).
    #[arg(long, value_name = "HEX", requires = "check")]
    check_expect_reply_hex: Option<String>,
    /// The address probes are sent from (default: the kernel's choice).
    #[arg(long, value_name = "ADDR", requires = "check")]
    check_source: Option<String>,
    /// Limit the new flows each client source opens to this many a second
    /// (default: no limit); over it, SYNs and new UDP flows are dropped.
    #[arg(long, value_name = "N")]
    new_flows_per_second: Option<u32>,
    /// New flows a source may open at once (default: the rate).
    #[arg(long, value_name = "N", requires = "new_flows_per_second")]
    new_flow_burst: Option<u32>,
    /// Clients sharing this prefix length are one source, 0 to 32 (default 32).
    #[arg(long, value_name = "LEN", requires = "new_flows_per_second")]
    new_flow_prefix_len: Option<u32>,
}

/// `vipgatectl backend ...`.
#[derive(Debug, Subcommand)]
enum BackendCommand {
    /// Add a backend to a dynamic service.
    Add {
        /// The service's name.
        service: String,
        /// The backend, e.g. 198.18.1.11:8080.
        #[arg(value_name = "ADDR:PORT")]
        backend: String,
        /// Its weight, 0 to 65535 (default 1).
        #[arg(long, value_name = "W")]
        weight: Option<u32>,
    },
    /// Change a backend's weight and/or admin state.
    #[command(group = clap::ArgGroup::new("change").required(true).multiple(true).args(["weight", "state"]))]
    Update {
        /// The service's name.
        service: String,
        /// The backend, e.g. 198.18.1.11:8080.
        #[arg(value_name = "ADDR:PORT")]
        backend: String,
        /// The new weight, 0 to 65535.
        #[arg(long, value_name = "W")]
        weight: Option<u32>,
        /// The new admin state: draining takes no new flows, disabled also
        /// leaves the forwarding state.
        #[arg(long, value_parser = ["enabled", "draining", "disabled"])]
        state: Option<String>,
    },
    /// Remove a backend from a dynamic service.
    Remove {
        /// The service's name.
        service: String,
        /// The backend, e.g. 198.18.1.11:8080.
        #[arg(value_name = "ADDR:PORT")]
        backend: String,
    },
}

/// `vipgatectl pool ...`.
#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Create a dynamic FullNAT source pool.
    Create {
        /// The pool's name.
        name: String,
        /// A source IPv4 address; repeat for more.
        #[arg(long = "address", value_name = "ADDR", required = true)]
        addresses: Vec<String>,
        /// The source ports (default 1024-65535).
        #[arg(long, value_name = "FIRST-LAST")]
        ports: Option<String>,
    },
    /// Delete a dynamic source pool; fails with FAILED_PRECONDITION while a
    /// service uses it.
    Delete {
        /// The pool's name.
        name: String,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
enum CtlError {
    /// Connecting to vipgated or a call failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    /// Encoding the JSON document failed.
    #[error("cannot encode the JSON output: {0}")]
    Json(#[from] serde_json::Error),
    /// A desired-state call failed: the status code's name and the server's
    /// reason.
    #[error("{}: {}", code_name(.0.code()), status_message(.0))]
    Status(tonic::Status),
    /// Connecting over TCP with TLS failed.
    #[error("cannot connect to vipgated at {endpoint}: {reason}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The file for `apply` could not be read or parsed.
    #[error("{0}")]
    File(String),
    /// The command line is wrong in a way clap cannot see (exit 2).
    #[error("{0}")]
    Usage(String),
}

fn main() -> ExitCode {
    // Usage errors exit with clap's code 2 here.
    let cli = Cli::parse();
    // One thread is plenty for a client that makes one call at a time.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vipgatectl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let output = match runtime.block_on(run(&cli)) {
        Ok(output) => output,
        Err(e) => {
            eprintln!("vipgatectl: {e}{}", tls_hint(&cli, &e));
            return if matches!(e, CtlError::Usage(_)) { ExitCode::from(2) } else { ExitCode::FAILURE };
        }
    };
    match std::io::stdout().lock().write_all(output.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`vipgatectl stats | head`): not our failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vipgatectl: {}", CtlError::Output(e));
            ExitCode::FAILURE
        }
    }
}

/// Over TLS 1.3 the server checks the client's certificate after the
/// client considers the handshake done, so a refused certificate shows up
/// as a first call on a closed connection: say what that most likely means.
fn tls_hint(cli: &Cli, e: &CtlError) -> &'static str {
    match e {
        CtlError::Api(ApiError::Call { status, .. }) | CtlError::Status(status)
            if cli.endpoint.is_some()
                && matches!(
                    status.code(),
                    tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown
                ) =>
        {
            " (vipgated closed the connection: is --cert signed by the CA in its [api] client_ca, and --key its key?)"
        }
        _ => "",
    }
}

/// Runs the command and returns what to print.
async fn run(cli: &Cli) -> Result<String, CtlError> {
    if !matches!(cli.command, Command::Health | Command::Stats { .. }) {
        return state::run(cli).await;
    }
    let mut client = match (&cli.endpoint, &cli.cert, &cli.key, &cli.ca) {
        (Some(endpoint), Some(cert), Some(key), Some(ca)) => {
            let files = api::TlsClientFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() };
            api::connect_tls(endpoint, &files).await?
        }
        // clap refuses --endpoint without all three files.
        _ => api::connect_unix(&cli.socket).await?,
    };
    match cli.command {
        Command::Health => {
            let health = client
                .get_health(request(pb::GetHealthRequest {}))
                .await
                .map_err(|s| ApiError::call("GetHealth", s))?
                .into_inner();
            let health = HealthJson::from(health);
            if cli.json { json(&health) } else { Ok(health_table(&health)) }
        }
        Command::Stats { all } => {
            let counters = client
                .get_counters(request(pb::GetCountersRequest {}))
                .await
                .map_err(|s| ApiError::call("GetCounters", s))?
                .into_inner();
            let stats = StatsJson::from(counters);
            if cli.json { json(&stats) } else { Ok(stats_tables(&stats, all)) }
        }
        _ => unreachable!("desired-state commands run in state::run"),
    }
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

fn json(value: &impl Serialize) -> Result<String, CtlError> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    Ok(text)
}

// The JSON documents. Their field names and order are an interface: scripts
// and tests parse them, so fields are only ever added.

/// `vipgatectl health --json`.
#[derive(Debug, Serialize)]
struct HealthJson {
    /// "SERVING", "NOT_SERVING" or "UNSPECIFIED".
    status: &'static str,
    /// `status == "SERVING"`, for scripts that want a boolean.
    serving: bool,
    version: String,
    uptime_seconds: u64,
    workers: u32,
    ports: u32,
    /// Why it is not serving; empty while it serves.
    reason: String,
}

impl From<pb::GetHealthResponse> for HealthJson {
    fn from(h: pb::GetHealthResponse) -> Self {
        // `status()` maps values this client does not know to Unspecified.
        let (status, serving) = match h.status() {
            pb::ServingStatus::Serving => ("SERVING", true),
            pb::ServingStatus::NotServing => ("NOT_SERVING", false),
            pb::ServingStatus::Unspecified => ("UNSPECIFIED", false),
        };
        HealthJson {
            status,
            serving,
            version: h.version,
            uptime_seconds: h.uptime_seconds,
            workers: h.workers,
            ports: h.ports,
            reason: h.reason,
        }
    }
}

/// `vipgatectl stats --json`.
#[derive(Debug, Serialize)]
struct StatsJson {
    workers: Vec<WorkerJson>,
    total: CountersJson,
    ports: Vec<PortJson>,
    mempool: MempoolJson,
}

/// One worker: its lcore next to its counters, and the snapshot it
/// forwards with.
#[derive(Debug, Serialize)]
struct WorkerJson {
    lcore: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<SnapshotJson>,
    /// TSC cycles per packet in busy iterations since start.
    busy_cycles_per_packet: f64,
    /// Mbufs in use in the pool this worker receives into.
    mempool_in_use: u64,
    #[serde(flatten)]
    counters: CountersJson,
}

/// `WorkerCounters.snapshot`: the version and generation of the snapshot a
/// worker last loaded, and whether it sleeps idle.
#[derive(Debug, Serialize)]
struct SnapshotJson {
    version: u64,
    generation: u64,
    idle: bool,
    /// When the worker loaded it (the gateway host's CLOCK_MONOTONIC, ns).
    loaded_at_monotonic_ns: u64,
}

#[derive(Debug, Default, Serialize)]
struct CountersJson {
    rx_packets: u64,
    rx_bytes: u64,
    tx_packets: u64,
    tx_bytes: u64,
    nat_forward: u64,
    nat_reverse: u64,
    arp_replies: u64,
    arp_requests: u64,
    icmp_echo_replies: u64,
    busy_polls: u64,
    busy_cycles: u64,
    drops: Drops,
    consumed: u64,
    flows_created: u64,
    flows_evicted: u64,
    flows_rehashed: u64,
    flows_active: u64,
    flows_reset: u64,
    handoff_out: u64,
    handoff_in: u64,
    icmp_frag_needed: u64,
    to_kernel: u64,
    to_kernel_bytes: u64,
    from_kernel: u64,
    from_kernel_bytes: u64,
    to_kernel_control: u64,
}

/// Drops by reason, as a JSON object in the server's reason order (a map
/// type would sort the keys or lose the order).
#[derive(Debug, Default)]
struct Drops(Vec<(String, u64)>);

impl Drops {
    /// Packets dropped for `reason`; zero for a reason not listed.
    fn get(&self, reason: &str) -> u64 {
        self.0.iter().find(|(r, _)| r == reason).map_or(0, |(_, n)| *n)
    }

    fn total(&self) -> u64 {
        self.0.iter().fold(0u64, |sum, (_, n)| sum.wrapping_add(*n))
    }
}

impl Serialize for Drops {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (reason, packets) in &self.0 {
            map.serialize_entry(reason, packets)?;
        }
        map.end()
    }
}

#[derive(Debug, Serialize)]
struct PortJson {
    name: String,
    port_id: u32,
    mac: String,
    ipackets: u64,
    opackets: u64,
    ibytes: u64,
    obytes: u64,
    imissed: u64,
    ierrors: u64,
    oerrors: u64,
    rx_nombuf: u64,
}

#[derive(Debug, Default, Serialize)]
struct MempoolJson {
    name: String,
    size: u64,
    in_use: u64,
}

impl From<pb::GetCountersResponse> for StatsJson {
    fn from(r: pb::GetCountersResponse) -> Self {
        StatsJson {
            workers: r
                .workers
                .into_iter()
                .map(|w| WorkerJson {
                    lcore: w.lcore,
                    snapshot: w.snapshot.map(|s| SnapshotJson {
                        version: s.version,
                        generation: s.generation,
                        idle: s.idle,
                        loaded_at_monotonic_ns: s.loaded_at_monotonic_ns,
                    }),
                    busy_cycles_per_packet: w.busy_cycles_per_packet,
                    mempool_in_use: w.mempool_in_use,
                    counters: w.counters.map(CountersJson::from).unwrap_or_default(),
                })
                .collect(),
            total: r.total.map(CountersJson::from).unwrap_or_default(),
            ports: r.ports.into_iter().map(PortJson::from).collect(),
            mempool: r
                .mempool
                .map(|m| MempoolJson { name: m.name, size: m.size, in_use: m.in_use })
                .unwrap_or_default(),
        }
    }
}

impl From<pb::PacketCounters> for CountersJson {
    fn from(c: pb::PacketCounters) -> Self {
        CountersJson {
            rx_packets: c.rx_packets,
            rx_bytes: c.rx_bytes,
            tx_packets: c.tx_packets,
            tx_bytes: c.tx_bytes,
            nat_forward: c.nat_forward,
            nat_reverse: c.nat_reverse,
            arp_replies: c.arp_replies,
            arp_requests: c.arp_requests,
            icmp_echo_replies: c.icmp_echo_replies,
            busy_polls: c.busy_polls,
            busy_cycles: c.busy_cycles,
            drops: Drops(c.drops.into_iter().map(|d| (d.reason, d.packets)).collect()),
            consumed: c.consumed,
            flows_created: c.flows_created,
            flows_evicted: c.flows_evicted,
            flows_rehashed: c.flows_rehashed,
            flows_active: c.flows_active,
            flows_reset: c.flows_reset,
            handoff_out: c.handoff_out,
            handoff_in: c.handoff_in,
            icmp_frag_needed: c.icmp_frag_needed,
            to_kernel: c.to_kernel,
            to_kernel_bytes: c.to_kernel_bytes,
            from_kernel: c.from_kernel,
            from_kernel_bytes: c.from_kernel_bytes,
            to_kernel_control: c.to_kernel_control,
        }
    }
}

impl From<pb::PortStats> for PortJson {
    fn from(p: pb::PortStats) -> Self {
        PortJson {
            name: p.name,
            port_id: p.port_id,
            mac: p.mac,
            ipackets: p.ipackets,
            opackets: p.opackets,
            ibytes: p.ibytes,
            obytes: p.obytes,
            imissed: p.imissed,
            ierrors: p.ierrors,
            oerrors: p.oerrors,
            rx_nombuf: p.rx_nombuf,
        }
    }
}

// Tables for people.

fn health_table(h: &HealthJson) -> String {
    let rows = [
        vec!["status".to_owned(), h.status.to_owned()],
        vec!["version".to_owned(), h.version.clone()],
        vec!["uptime".to_owned(), format_uptime(h.uptime_seconds)],
        vec!["workers".to_owned(), h.workers.to_string()],
        vec!["ports".to_owned(), h.ports.to_string()],
    ];
    let mut rows = rows.to_vec();
    if !h.reason.is_empty() {
        rows.insert(1, vec!["reason".to_owned(), h.reason.clone()]);
    }
    table(None, &rows, 2)
}

/// `93784` -> `1d 2h 3m 4s`.
fn format_uptime(seconds: u64) -> String {
    let (d, h, m, s) = (seconds / 86_400, seconds / 3_600 % 24, seconds / 60 % 60, seconds % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m {s}s"),
    }
}

fn stats_tables(stats: &StatsJson, all: bool) -> String {
    let mut out = String::new();

    // Workers, one row each, then their total.
    let header = [
        "WORKER",
        "RX_PKTS",
        "RX_BYTES",
        "TX_PKTS",
        "TX_BYTES",
        "NAT_FWD",
        "NAT_REV",
        "ARP_REPLY",
        "ARP_REQ",
        "ICMP_ECHO",
        "DROPS",
        "CONSUMED",
        "FLOWS",
        "NEW_FLOWS",
        "HANDOFF_OUT",
        "HANDOFF_IN",
        "TO_KERNEL",
        "FROM_KERNEL",
        "BUSY_POLLS",
        "BUSY_CYCLES",
    ];
    let counter_row = |label: String, c: &CountersJson| {
        let values = [
            c.rx_packets,
            c.rx_bytes,
            c.tx_packets,
            c.tx_bytes,
            c.nat_forward,
            c.nat_reverse,
            c.arp_replies,
            c.arp_requests,
            c.icmp_echo_replies,
            c.drops.total(),
            c.consumed,
            c.flows_active,
            c.flows_created,
            c.handoff_out,
            c.handoff_in,
            c.to_kernel,
            c.from_kernel,
            c.busy_polls,
            c.busy_cycles,
        ];
        std::iter::once(label).chain(values.iter().map(u64::to_string)).collect::<Vec<_>>()
    };
    let mut rows: Vec<Vec<String>> =
        stats.workers.iter().map(|w| counter_row(format!("lcore {}", w.lcore), &w.counters)).collect();
    rows.push(counter_row("total".to_owned(), &stats.total));
    out.push_str(&table(Some(&header), &rows, 1));

    // Drops by reason: the total, then each worker's share.
    let mut header = vec!["DROP_REASON".to_owned(), "TOTAL".to_owned()];
    header.extend(stats.workers.iter().map(|w| format!("LCORE {}", w.lcore)));
    let rows: Vec<Vec<String>> = stats
        .total
        .drops
        .0
        .iter()
        .filter(|(_, total)| all || *total != 0)
        .map(|(reason, total)| {
            let mut row = vec![reason.clone(), total.to_string()];
            row.extend(stats.workers.iter().map(|w| w.counters.drops.get(reason).to_string()));
            row
        })
        .collect();
    out.push('\n');
    if rows.is_empty() {
        out.push_str("no drops\n");
    } else {
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        out.push_str(&table(Some(&header), &rows, 1));
    }

    if !stats.ports.is_empty() {
        let header = [
            "PORT",
            "NAME",
            "MAC",
            "IPACKETS",
            "IBYTES",
            "IMISSED",
            "IERRORS",
            "RX_NOMBUF",
            "OPACKETS",
            "OBYTES",
            "OERRORS",
        ];
        let rows: Vec<Vec<String>> = stats
            .ports
            .iter()
            .map(|p| {
                let mut row = vec![p.port_id.to_string(), p.name.clone(), p.mac.clone()];
                let values = [p.ipackets, p.ibytes, p.imissed, p.ierrors, p.rx_nombuf, p.opackets, p.obytes, p.oerrors];
                row.extend(values.iter().map(u64::to_string));
                row
            })
            .collect();
        out.push('\n');
        out.push_str(&table(Some(&header), &rows, 3));
    }

    let m = &stats.mempool;
    let percent = if m.size == 0 { 0.0 } else { m.in_use as f64 * 100.0 / m.size as f64 };
    let _ = writeln!(out, "\nmempool {}: {} of {} mbufs in use ({percent:.1}%)", m.name, m.in_use, m.size);
    out
}

/// Aligns `rows` under `header`: the first `text_columns` columns to the
/// left, the numbers after them to the right.
fn table(header: Option<&[&str]>, rows: &[Vec<String>], text_columns: usize) -> String {
    let header: Option<Vec<String>> = header.map(|h| h.iter().map(|s| (*s).to_owned()).collect());
    let all_rows: Vec<&Vec<String>> = header.iter().chain(rows).collect();
    columns(&all_rows, |c| c >= text_columns)
}

/// Rows in columns two spaces apart, each as wide as its widest cell: the
/// columns `right` says to the right, the others to the left.
fn columns(rows: &[&Vec<String>], right: impl Fn(usize) -> bool) -> String {
    let count = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..count)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            let width = widths[c];
            let _ = if right(c) { write!(line, "{cell:>width$}") } else { write!(line, "{cell:<width$}") };
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The gRPC name of a status code, as in `INVALID_ARGUMENT`.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The server's reason, or the code's meaning when it gave none.
fn status_message(status: &tonic::Status) -> String {
    if status.message().is_empty() { status.code().description().to_owned() } else { status.message().to_owned() }
}

/// The desired-state commands: list, service, backend, drain, pool, apply
/// and watch, on `ServiceManager`.
mod state {
    use std::io::Write as _;
    use std::net::Ipv4Addr;
    use std::path::Path;

    use serde::{Deserialize, Serialize};
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
    use vipgate_controlplane::api::{
        self, pb, pb::gateway_client::GatewayClient, pb::service_manager_client::ServiceManagerClient,
    };

    use super::{BackendCommand, Cli, Command, CtlError, PoolCommand, ServiceCommand, ServiceSpec, json, request};

    type Client = ServiceManagerClient<Channel>;

    /// Runs a desired-state command and returns what to print (`watch`
    /// prints as it goes and returns nothing).
    pub(super) async fn run(cli: &Cli) -> Result<String, CtlError> {
        // Check the command line before connecting: a usage error is one
        // whether or not vipgated runs.
        let op = Op::parse(&cli.command)?;
        let channel = connect(cli).await?;
        let mut client = Client::new(channel.clone());
        let version = match op {
            Op::List(traffic) => {
                let state = get_state(&mut client).await?;
                let stats = GatewayClient::new(channel)
                    .get_service_stats(request(pb::GetServiceStatsRequest { service: String::new() }))
                    .await
                    .map_err(CtlError::Status)?
                    .into_inner();
                let mut state = StateJson::from(state);
                state.join(stats);
                return if cli.json { json(&state) } else { Ok(list_text(&state, traffic)) };
            }
            Op::Watch => return watch(&mut client, cli.json).await,
            Op::CreateService(service) => {
                client
                    .create_service(request(pb::CreateServiceRequest { service: Some(service), ..Default::default() }))
                    .await
            }
            Op::UpdateService(service) => {
                client
                    .update_service(request(pb::UpdateServiceRequest { service: Some(service), ..Default::default() }))
                    .await
            }
            Op::DeleteService(name) => {
                client.delete_service(request(pb::DeleteServiceRequest { name, ..Default::default() })).await
            }
            Op::AddBackend(r) => client.add_backend(request(r)).await,
            Op::UpdateBackend(r) => client.update_backend(request(r)).await,
            Op::RemoveBackend(r) => client.remove_backend(request(r)).await,
            Op::CreatePool(pool) => {
                client
                    .create_source_pool(request(pb::CreateSourcePoolRequest { pool: Some(pool), ..Default::default() }))
                    .await
            }
            Op::DeletePool(name) => {
                client.delete_source_pool(request(pb::DeleteSourcePoolRequest { name, ..Default::default() })).await
            }
            Op::Apply(mut r, expected) => {
                r.expected_version = match expected {
                    Some(v) => v,
                    None => get_state(&mut client).await?.version,
                };
                client.apply(request(r)).await
            }
        }
        .map_err(CtlError::Status)?
        .into_inner()
        .version;
        if cli.json { json(&MutationJson { version }) } else { Ok(format!("applied: version {version}\n")) }
    }

    async fn get_state(client: &mut Client) -> Result<pb::GetStateResponse, CtlError> {
        Ok(client.get_state(request(pb::GetStateRequest::default())).await.map_err(CtlError::Status)?.into_inner())
    }

    /// Dials the socket, or with --endpoint TCP with mutual TLS.
    async fn connect(cli: &Cli) -> Result<Channel, CtlError> {
        let (Some(endpoint), Some(cert), Some(key), Some(ca)) = (&cli.endpoint, &cli.cert, &cli.key, &cli.ca) else {
            return Ok(api::connect_unix_channel(&cli.socket).await?);
        };
        let fail = |reason: String| CtlError::Connect { endpoint: endpoint.clone(), reason };
        let read = |path: &Path, what: &str| {
            std::fs::read(path).map_err(|e| fail(format!("cannot read the {what} {}: {e}", path.display())))
        };
        let tls = ClientTlsConfig::new()
            .identity(Identity::from_pem(read(cert, "client certificate")?, read(key, "client key")?))
            .ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?));
        let channel = Endpoint::from_shared(endpoint.clone())
            .map_err(|e| fail(format!("not a URL like https://198.18.0.1:50051: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .tls_config(tls)
            .map_err(|e| fail(root_cause(&e)))?
            .connect()
            .await
            .map_err(|e| fail(root_cause(&e)))?;
        Ok(channel)
    }

    fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
        let mut cause = err;
        while let Some(next) = cause.source() {
            cause = next;
        }
        cause.to_string()
    }

    /// One call, its request checked and built from the command line.
    enum Op {
        List(bool),
        Watch,
        CreateService(pb::Service),
        UpdateService(pb::Service),
        DeleteService(String),
        AddBackend(pb::AddBackendRequest),
        UpdateBackend(pb::UpdateBackendRequest),
        RemoveBackend(pb::RemoveBackendRequest),
        CreatePool(pb::SourcePool),
        DeletePool(String),
        Apply(pb::ApplyRequest, Option<u64>),
    }

    impl Op {
        fn parse(command: &Command) -> Result<Op, CtlError> {
            Ok(match command {
                Command::Health | Command::Stats { .. } => unreachable!("served by the Gateway client"),
                Command::List { stats } => Op::List(*stats),
                Command::Watch => Op::Watch,
                Command::Service(ServiceCommand::Create { name, spec }) => Op::CreateService(service(name, spec)?),
                Command::Service(ServiceCommand::Update { name, spec }) => Op::UpdateService(service(name, spec)?),
                Command::Service(ServiceCommand::Delete { name }) => Op::DeleteService(name.clone()),
                Command::Backend(BackendCommand::Add { service, backend, weight }) => {
                    let (address, port, _) = parse_backend(backend, "ADDR:PORT", false)?;
                    Op::AddBackend(pb::AddBackendRequest {
                        service: service.clone(),
                        backend: Some(pb::Backend {
                            address,
                            port,
                            weight: *weight,
                            admin_state: pb::AdminState::Enabled.into(),
                            ..pb::Backend::default()
                        }),
                        ..Default::default()
                    })
                }
                Command::Backend(BackendCommand::Update { service, backend, weight, state }) => {
                    let (address, port, _) = parse_backend(backend, "ADDR:PORT", false)?;
                    let admin_state = match state.as_deref() {
                        None => pb::AdminState::Unspecified,
                        Some(s) => admin_state(s).expect("clap checked the value"),
                    };
                    Op::UpdateBackend(pb::UpdateBackendRequest {
                        service: service.clone(),
                        address,
                        port,
                        weight: *weight,
                        admin_state: admin_state.into(),
                        ..Default::default()
                    })
                }
                Command::Drain { service, backend } => {
                    let (address, port, _) = parse_backend(backend, "ADDR:PORT", false)?;
                    Op::UpdateBackend(pb::UpdateBackendRequest {
                        service: service.clone(),
                        address,
                        port,
                        weight: None,
                        admin_state: pb::AdminState::Draining.into(),
                        ..Default::default()
                    })
                }
                Command::Backend(BackendCommand::Remove { service, backend }) => {
                    let (address, port, _) = parse_backend(backend, "ADDR:PORT", false)?;
                    Op::RemoveBackend(pb::RemoveBackendRequest {
                        service: service.clone(),
                        address,
                        port,
                        ..Default::default()
                    })
                }
                Command::Pool(PoolCommand::Create { name, addresses, ports }) => {
                    for a in addresses {
                        parse_ipv4(a).map_err(|e| CtlError::Usage(format!("--address {a}: {e}")))?;
                    }
                    let (first_port, last_port) = match ports {
                        None => (0, 0),
                        Some(p) => parse_ports(p).map_err(|e| CtlError::Usage(format!("--ports {p}: {e}")))?,
                    };
                    Op::CreatePool(pb::SourcePool {
                        name: name.clone(),
                        addresses: addresses.clone(),
                        first_port,
                        last_port,
                        origin: 0,
                        owner: String::new(),
                    })
                }
                Command::Pool(PoolCommand::Delete { name }) => Op::DeletePool(name.clone()),
                Command::Apply { file, expected_version } => Op::Apply(read_apply_file(file)?, *expected_version),
            })
        }
    }

    fn service(name: &str, spec: &ServiceSpec) -> Result<pb::Service, CtlError> {
        parse_ipv4(&spec.vip).map_err(|e| CtlError::Usage(format!("--vip {}: {e}", spec.vip)))?;
        let backends = spec
            .backends
            .iter()
            .map(|b| {
                let (address, port, weight) = parse_backend(b, "--backend", true)?;
                Ok(pb::Backend {
                    address,
                    port,
                    weight: Some(weight),
                    admin_state: pb::AdminState::Enabled.into(),
                    ..pb::Backend::default()
                })
            })
            .collect::<Result<Vec<_>, CtlError>>()?;
        Ok(pb::Service {
            name: name.to_owned(),
            vip: spec.vip.clone(),
            port: spec.port.into(),
            protocol: spec.protocol.clone(),
            mode: spec.mode.clone().unwrap_or_default(),
            source_pool: spec.source_pool.clone().unwrap_or_default(),
            tunnel_source: spec.tunnel_source.clone().unwrap_or_default(),
            table_size: spec.table_size.unwrap_or(0),
            on_backend_removal: spec.on_backend_removal.clone().unwrap_or_default(),
            backends,
            health_check: spec
                .check
                .as_ref()
                .map(|kind| {
                    HealthCheckJson {
                        kind: kind.clone(),
                        interval_ms: spec.check_interval_ms.unwrap_or(0),
                        timeout_ms: spec.check_timeout_ms.unwrap_or(0),
                        rise: spec.check_rise.unwrap_or(0),
                        fall: spec.check_fall.unwrap_or(0),
                        port: spec.check_port.map_or(0, u32::from),
                        path: spec.check_path.clone().unwrap_or_default(),
                        host: spec.check_host.clone().unwrap_or_default(),
                        expect_status: spec.check_expect_status.clone().unwrap_or_default(),
                        payload_hex: spec.check_payload_hex.clone().unwrap_or_default(),
                        expect_reply_hex: spec.check_expect_reply_hex.clone().unwrap_or_default(),
                        source: spec.check_source.clone().unwrap_or_default(),
                    }
                    .into_proto("--check")
                })
                .transpose()
                .map_err(|e| {
                    CtlError::Usage(
                        e.replace("--check.payload_hex", "--check-payload-hex")
                            .replace("--check.expect_reply_hex", "--check-expect-reply-hex"),
                    )
                })?,
            new_flow_limit: spec.new_flows_per_second.map(|per_second| pb::NewFlowLimit {
                per_second,
                burst: spec.new_flow_burst.unwrap_or(0),
                prefix_len: spec.new_flow_prefix_len,
            }),
            ..pb::Service::default()
        })
    }

    fn parse_ipv4(s: &str) -> Result<Ipv4Addr, String> {
        s.parse::<Ipv4Addr>().map_err(|_| format!("{s:?} is not an IPv4 address"))
    }

    /// `ADDR:PORT`, or with `weight` also `ADDR:PORT:WEIGHT` (weight 1 when
    /// absent). The weight's range is the server's to check, so that its
    /// error names the field.
    fn parse_backend(s: &str, what: &str, weight: bool) -> Result<(String, u32, u32), CtlError> {
        let usage = |reason: String| CtlError::Usage(format!("{what} {s}: {reason}"));
        let form = if weight { "ADDR:PORT[:WEIGHT]" } else { "ADDR:PORT" };
        let parts: Vec<&str> = s.split(':').collect();
        let (addr, port, w) = match (parts.as_slice(), weight) {
            ([a, p], _) => (*a, *p, None),
            ([a, p, w], true) => (*a, *p, Some(*w)),
            _ => return Err(usage(format!("not {form}, e.g. 198.18.1.11:8080"))),
        };
        parse_ipv4(addr).map_err(usage)?;
        let port = match port.parse::<u16>() {
            Ok(p) if p != 0 => u32::from(p),
            _ => return Err(usage(format!("port {port:?} is not from 1 to 65535"))),
        };
        let w = match w {
            None => 1,
            Some(w) => w.parse::<u32>().map_err(|_| usage(format!("weight {w:?} is not a number")))?,
        };
        Ok((addr.to_owned(), port, w))
    }

    /// `FIRST-LAST`.
    fn parse_ports(s: &str) -> Result<(u32, u32), String> {
        let (first, last) = s.split_once('-').ok_or_else(|| "not FIRST-LAST, e.g. 1024-65535".to_owned())?;
        let port = |p: &str| match p.parse::<u16>() {
            Ok(n) if n != 0 => Ok(u32::from(n)),
            _ => Err(format!("port {p:?} is not from 1 to 65535")),
        };
        let (first, last) = (port(first)?, port(last)?);
        if first > last {
            return Err(format!("first port {first} is above last port {last}"));
        }
        Ok((first, last))
    }

    fn admin_state(s: &str) -> Option<pb::AdminState> {
        match s {
            "enabled" => Some(pb::AdminState::Enabled),
            "draining" => Some(pb::AdminState::Draining),
            "disabled" => Some(pb::AdminState::Disabled),
            _ => None,
        }
    }

    fn admin_state_name(state: i32) -> &'static str {
        match pb::AdminState::try_from(state) {
            Ok(pb::AdminState::Draining) => "draining",
            Ok(pb::AdminState::Disabled) => "disabled",
            Ok(pb::AdminState::Enabled | pb::AdminState::Unspecified) => "enabled",
            Err(_) => "unknown",
        }
    }

    fn origin_name(origin: i32) -> &'static str {
        match pb::Origin::try_from(origin) {
            Ok(pb::Origin::Static) => "static",
            Ok(pb::Origin::Dynamic) => "dynamic",
            _ => "unspecified",
        }
    }

    // The JSON documents: `list --json` prints them, and `apply` reads the
    // same shapes (without `origin`, or with origin "dynamic"). Their field
    // names are an interface: fields are only ever added.

    /// `vipgatectl list --json`.
    #[derive(Debug, Serialize)]
    struct StateJson {
        version: u64,
        config_file: String,
        services: Vec<ServiceJson>,
        source_pools: Vec<PoolJson>,
    }

    /// The file `vipgatectl apply` reads.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ApplyFile {
        #[serde(default)]
        services: Vec<ServiceJson>,
        #[serde(default)]
        source_pools: Vec<PoolJson>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ServiceJson {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<String>,
        protocol: String,
        vip: String,
        port: u32,
        #[serde(default)]
        mode: String,
        #[serde(default)]
        source_pool: String,
        #[serde(default)]
        tunnel_source: String,
        #[serde(default)]
        table_size: u32,
        #[serde(default)]
        on_backend_removal: String,
        #[serde(default)]
        backends: Vec<BackendJson>,
        /// Output only (`list --json`); `apply` ignores it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stats: Option<TrafficJson>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health_check: Option<HealthCheckJson>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        new_flow_limit: Option<NewFlowLimitJson>,
    }

    /// A service's limit on new flows per client source. In `apply`,
    /// `burst` 0 or absent is the rate, and `prefix_len` absent is 32.
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NewFlowLimitJson {
        per_second: u32,
        #[serde(default)]
        burst: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix_len: Option<u32>,
    }

    impl From<pb::NewFlowLimit> for NewFlowLimitJson {
        fn from(l: pb::NewFlowLimit) -> Self {
            NewFlowLimitJson { per_second: l.per_second, burst: l.burst, prefix_len: l.prefix_len }
        }
    }

    impl NewFlowLimitJson {
        fn into_proto(self) -> pb::NewFlowLimit {
            pb::NewFlowLimit { per_second: self.per_second, burst: self.burst, prefix_len: self.prefix_len }
        }

        /// For the listing, e.g. "new-flows 100/s burst 200 per /24".
        fn summary(&self) -> String {
            format!("new-flows {}/s burst {} per /{}", self.per_second, self.burst, self.prefix_len.unwrap_or(32))
        }
    }

    /// Traffic and flows (`GetServiceStats`), as `list --json` prints them.
    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct TrafficJson {
        connections: u64,
        in_packets: u64,
        in_bytes: u64,
        out_packets: u64,
        out_bytes: u64,
        active_flows: u64,
        inactive_flows: u64,
    }

    impl From<pb::TrafficStats> for TrafficJson {
        fn from(t: pb::TrafficStats) -> Self {
            TrafficJson {
                connections: t.connections,
                in_packets: t.in_packets,
                in_bytes: t.in_bytes,
                out_packets: t.out_packets,
                out_bytes: t.out_bytes,
                active_flows: t.active_flows,
                inactive_flows: t.inactive_flows,
            }
        }
    }

    /// A service's health check. Zero and empty fields take vipgated's
    /// defaults; `list` shows every field in force. UDP bytes are written
    /// in hexadecimal.
    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct HealthCheckJson {
        kind: String,
        #[serde(default)]
        interval_ms: u32,
        #[serde(default)]
        timeout_ms: u32,
        #[serde(default)]
        rise: u32,
        #[serde(default)]
        fall: u32,
        #[serde(default, skip_serializing_if = "is_zero")]
        port: u32,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        path: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        host: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        expect_status: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        payload_hex: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        expect_reply_hex: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        source: String,
    }

    fn is_zero(v: &u32) -> bool {
        *v == 0
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    impl From<pb::HealthCheck> for HealthCheckJson {
        fn from(h: pb::HealthCheck) -> Self {
            HealthCheckJson {
                kind: h.kind,
                interval_ms: h.interval_ms,
                timeout_ms: h.timeout_ms,
                rise: h.rise,
                fall: h.fall,
                port: h.port,
                path: h.path,
                host: h.host,
                expect_status: h.expect_status,
                payload_hex: hex(&h.payload),
                expect_reply_hex: hex(&h.expect_reply),
                source: h.source,
            }
        }
    }

    impl StateJson {
        /// Adds each service's and backend's figures (a disabled backend is
        /// not in the forwarding state and gets none).
        fn join(&mut self, stats: pb::GetServiceStatsResponse) {
            let mut by_name: std::collections::HashMap<String, pb::ServiceStats> =
                stats.services.into_iter().map(|s| (s.name.clone(), s)).collect();
            for svc in &mut self.services {
                let Some(s) = by_name.remove(&svc.name) else { continue };
                svc.stats = s.stats.map(TrafficJson::from);
                let mut backends: std::collections::HashMap<(String, u32), pb::BackendStats> =
                    s.backends.into_iter().map(|b| ((b.address.clone(), b.port), b)).collect();
                for b in &mut svc.backends {
                    b.stats =
                        backends.remove(&(b.address.clone(), b.port)).and_then(|b| b.stats).map(TrafficJson::from);
                }
            }
        }
    }

    impl HealthCheckJson {
        fn into_proto(self, field: &str) -> Result<pb::HealthCheck, String> {
            let bytes = |s: &str, name: &str| {
                vipgate_controlplane::health::spec::parse_hex(s).map_err(|e| format!("{field}.{name}: {e}"))
            };
            Ok(pb::HealthCheck {
                payload: bytes(&self.payload_hex, "payload_hex")?,
                expect_reply: bytes(&self.expect_reply_hex, "expect_reply_hex")?,
                kind: self.kind,
                interval_ms: self.interval_ms,
                timeout_ms: self.timeout_ms,
                rise: self.rise,
                fall: self.fall,
                port: self.port,
                path: self.path,
                host: self.host,
                expect_status: self.expect_status,
                source: self.source,
            })
        }

        /// `http GET /healthz every 5000 ms (timeout 2000, rise 2, fall 3)`.
        fn summary(&self) -> String {
            let what = match self.kind.as_str() {
                "http" | "https" => format!("{} GET {} expect {}", self.kind, self.path, self.expect_status),
                "udp" => format!("udp payload {} bytes", self.payload_hex.len() / 2),
                k => k.to_owned(),
            };
            let port = if self.port == 0 { String::new() } else { format!(" port {}", self.port) };
            format!(
                "{what}{port} every {} ms (timeout {}, rise {}, fall {})",
                self.interval_ms, self.timeout_ms, self.rise, self.fall
            )
        }
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct BackendJson {
        address: String,
        port: u32,
        /// Unset in a file means 1.
        #[serde(default)]
        weight: Option<u32>,
        /// "enabled", "draining" or "disabled".
        #[serde(default = "enabled")]
        state: String,
        /// Output only (`list --json`); `apply` ignores it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stats: Option<TrafficJson>,
        /// Output only: "unchecked", "up" or "down" (ignored by apply).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        health: String,
        /// Output only: why it is down.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        health_reason: String,
    }

    fn health_name(h: i32) -> &'static str {
        match pb::HealthState::try_from(h) {
            Ok(pb::HealthState::Unchecked) => "unchecked",
            Ok(pb::HealthState::Up) => "up",
            Ok(pb::HealthState::Down) => "down",
            _ => "",
        }
    }

    fn enabled() -> String {
        "enabled".to_owned()
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PoolJson {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<String>,
        addresses: Vec<String>,
        #[serde(default)]
        first_port: u32,
        #[serde(default)]
        last_port: u32,
    }

    /// What a mutating command prints with --json.
    #[derive(Debug, Serialize)]
    struct MutationJson {
        version: u64,
    }

    impl From<pb::GetStateResponse> for StateJson {
        fn from(s: pb::GetStateResponse) -> Self {
            StateJson {
                version: s.version,
                config_file: s.config_file,
                services: s.services.into_iter().map(ServiceJson::from).collect(),
                source_pools: s.source_pools.into_iter().map(PoolJson::from).collect(),
            }
        }
    }

    impl From<pb::Service> for ServiceJson {
        fn from(s: pb::Service) -> Self {
            ServiceJson {
                origin: Some(origin_name(s.origin).to_owned()),
                name: s.name,
                protocol: s.protocol,
                vip: s.vip,
                port: s.port,
                mode: s.mode,
                source_pool: s.source_pool,
                tunnel_source: s.tunnel_source,
                table_size: s.table_size,
                on_backend_removal: s.on_backend_removal,
                backends: s
                    .backends
                    .into_iter()
                    .map(|b| BackendJson {
                        state: admin_state_name(b.admin_state).to_owned(),
                        address: b.address,
                        port: b.port,
                        weight: Some(b.weight.unwrap_or(1)),
                        stats: None,
                        health: health_name(b.health).to_owned(),
                        health_reason: b.health_reason,
                    })
                    .collect(),
                stats: None,
                health_check: s.health_check.map(HealthCheckJson::from),
                new_flow_limit: s.new_flow_limit.map(NewFlowLimitJson::from),
            }
        }
    }

    impl From<pb::SourcePool> for PoolJson {
        fn from(p: pb::SourcePool) -> Self {
            PoolJson {
                origin: Some(origin_name(p.origin).to_owned()),
                name: p.name,
                addresses: p.addresses,
                first_port: p.first_port,
                last_port: p.last_port,
            }
        }
    }

    fn read_apply_file(path: &Path) -> Result<pb::ApplyRequest, CtlError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CtlError::File(format!("cannot read {}: {e}", path.display())))?;
        let file: ApplyFile = serde_json::from_str(&text)
            .map_err(|e| CtlError::File(format!("{}: not a valid apply file: {e}", path.display())))?;
        let bad = |what: String| CtlError::File(format!("{}: {what}", path.display()));
        let dynamic = |origin: &Option<String>, what: String| match origin.as_deref() {
            None | Some("dynamic") => Ok(()),
            Some(o) => Err(bad(format!("{what}.origin: {o:?}: apply takes dynamic objects only"))),
        };
        let mut services = Vec::with_capacity(file.services.len());
        for (i, s) in file.services.into_iter().enumerate() {
            dynamic(&s.origin, format!("services[{i}]"))?;
            let mut backends = Vec::with_capacity(s.backends.len());
            for (j, b) in s.backends.into_iter().enumerate() {
                let state = admin_state(&b.state).ok_or_else(|| {
                    bad(format!(
                        "services[{i}].backends[{j}].state: {:?} is not enabled, draining or disabled",
                        b.state
                    ))
                })?;
                backends.push(pb::Backend {
                    address: b.address,
                    port: b.port,
                    weight: b.weight,
                    admin_state: state.into(),
                    ..pb::Backend::default()
                });
            }
            services.push(pb::Service {
                name: s.name,
                vip: s.vip,
                port: s.port,
                protocol: s.protocol,
                mode: s.mode,
                source_pool: s.source_pool,
                tunnel_source: s.tunnel_source,
                table_size: s.table_size,
                on_backend_removal: s.on_backend_removal,
                backends,
                health_check: s
                    .health_check
                    .map(|h| h.into_proto(&format!("services[{i}].health_check")))
                    .transpose()
                    .map_err(bad)?,
                new_flow_limit: s.new_flow_limit.map(NewFlowLimitJson::into_proto),
                ..pb::Service::default()
            });
        }
        let mut source_pools = Vec::with_capacity(file.source_pools.len());
        for (i, p) in file.source_pools.into_iter().enumerate() {
            dynamic(&p.origin, format!("source_pools[{i}]"))?;
            source_pools.push(pb::SourcePool {
                name: p.name,
                addresses: p.addresses,
                first_port: p.first_port,
                last_port: p.last_port,
                origin: 0,
                owner: String::new(),
            });
        }
        Ok(pb::ApplyRequest { expected_version: 0, services, source_pools, ..Default::default() })
    }

    /// The `ipvsadm -Ln`-like listing.
    /// `ipvsadm -Ln` (or with `traffic`, `ipvsadm -Ln --stats`) in
    /// vipgate's terms: forwarding "Masq" is nat, "FullNat" fullnat and
    /// "Tunnel" dsr (IPIP).
    fn list_text(s: &StateJson, traffic: bool) -> String {
        let mut out = format!("vipgate state version {} (config {})\n", s.version, s.config_file);
        let mut services: Vec<&ServiceJson> = s.services.iter().collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        if services.is_empty() {
            out.push_str("no services\n");
        }
        let forward = |mode: &str| match mode {
            "fullnat" => "FullNat",
            "dsr" => "Tunnel",
            _ => "Masq",
        };
        let n =
            |v: Option<&TrafficJson>, read: fn(&TrafficJson) -> u64| v.map_or("-".to_owned(), |t| read(t).to_string());
        let mut rows: Vec<Vec<String>> = Vec::new();
        if traffic {
            rows.push(
                ["Prot LocalAddress:Port", "", "Conns", "InPkts", "OutPkts", "InBytes", "OutBytes", "Service"]
                    .map(str::to_owned)
                    .to_vec(),
            );
            rows.push(["  -> RemoteAddress:Port", "", "", "", "", "", "", ""].map(str::to_owned).to_vec());
        } else {
            rows.push(["Prot LocalAddress:Port", "Mode", "Table", "", "", "Service"].map(str::to_owned).to_vec());
            rows.push(
                ["  -> RemoteAddress:Port", "Forward", "Weight", "ActiveConn", "InActConn", "State"]
                    .map(str::to_owned)
                    .to_vec(),
            );
        }
        for svc in services {
            let mut name = format!("{} ({}", svc.name, svc.origin.as_deref().unwrap_or(""));
            if !svc.source_pool.is_empty() {
                name.push_str(&format!(", source-pool {}", svc.source_pool));
            }
            if !svc.tunnel_source.is_empty() {
                name.push_str(&format!(", tunnel-source {}", svc.tunnel_source));
            }
            name.push_str(&format!(", on-removal {}", svc.on_backend_removal));
            if let Some(h) = &svc.health_check {
                name.push_str(&format!(", check {}", h.summary()));
            }
            if let Some(l) = &svc.new_flow_limit {
                name.push_str(&format!(", {}", l.summary()));
            }
            name.push(')');
            let local = format!("{:<4} {}:{}", svc.protocol.to_uppercase(), svc.vip, svc.port);
            let st = svc.stats.as_ref();
            rows.push(if traffic {
                vec![
                    local,
                    String::new(),
                    n(st, |t| t.connections),
                    n(st, |t| t.in_packets),
                    n(st, |t| t.out_packets),
                    n(st, |t| t.in_bytes),
                    n(st, |t| t.out_bytes),
                    name,
                ]
            } else {
                vec![local, svc.mode.clone(), svc.table_size.to_string(), String::new(), String::new(), name]
            });
            let mut backends: Vec<&BackendJson> = svc.backends.iter().collect();
            backends.sort_by_key(|b| (b.address.parse::<Ipv4Addr>().ok(), b.port));
            for b in backends {
                let remote = format!("  -> {}:{}", b.address, b.port);
                let bt = b.stats.as_ref();
                rows.push(if traffic {
                    vec![
                        remote,
                        String::new(),
                        n(bt, |t| t.connections),
                        n(bt, |t| t.in_packets),
                        n(bt, |t| t.out_packets),
                        n(bt, |t| t.in_bytes),
                        n(bt, |t| t.out_bytes),
                        String::new(),
                    ]
                } else {
                    vec![
                        remote,
                        forward(&svc.mode).to_owned(),
                        b.weight.unwrap_or(1).to_string(),
                        n(bt, |t| t.active_flows),
                        n(bt, |t| t.inactive_flows),
                        match b.health.as_str() {
                            "" | "unchecked" => b.state.clone(),
                            "down" if !b.health_reason.is_empty() => {
                                format!("{}, down ({})", b.state, b.health_reason)
                            }
                            h => format!("{}, {h}", b.state),
                        },
                    ]
                });
            }
        }
        let right: &[bool] = if traffic {
            &[false, false, true, true, true, true, true, false]
        } else {
            &[false, false, true, true, true, false]
        };
        let rows: Vec<&Vec<String>> = rows.iter().collect();
        out.push_str(&super::columns(&rows, |c| right[c]));
        if !s.source_pools.is_empty() {
            out.push_str("source pools:\n");
        }
        let mut pools: Vec<&PoolJson> = s.source_pools.iter().collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        for p in pools {
            out.push_str(&format!(
                "  {}  {}  ports {}-{}  {}\n",
                p.name,
                p.addresses.join(","),
                p.first_port,
                p.last_port,
                p.origin.as_deref().unwrap_or("")
            ));
        }
        out
    }

    /// One Watch message with --json.
    #[derive(Debug, Serialize)]
    struct WatchJson {
        version: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        snapshot: Option<StateJson>,
        #[serde(skip_serializing_if = "Option::is_none")]
        change: Option<ChangeJson>,
        #[serde(skip_serializing_if = "Option::is_none")]
        health: Option<HealthChangeJson>,
    }

    /// A backend that went up or down.
    #[derive(Debug, Serialize)]
    struct HealthChangeJson {
        service: String,
        address: String,
        port: u32,
        health: String,
        reason: String,
    }

    #[derive(Debug, Serialize)]
    struct ChangeJson {
        cause: String,
        services_changed: Vec<String>,
        services_deleted: Vec<String>,
        pools_changed: Vec<String>,
        pools_deleted: Vec<String>,
    }

    /// Prints each Watch message as one line, flushed at once, until the
    /// stream ends (an error) or the reader goes away.
    async fn watch(client: &mut Client, as_json: bool) -> Result<String, CtlError> {
        // No deadline: the stream lasts until interrupted.
        let mut stream = client.watch(pb::WatchRequest::default()).await.map_err(CtlError::Status)?.into_inner();
        let mut stdout = std::io::stdout();
        loop {
            let event = match stream.message().await {
                Ok(Some(e)) => e,
                Ok(None) => {
                    return Err(CtlError::Status(tonic::Status::unavailable("vipgated ended the watch stream")));
                }
                Err(status) => return Err(CtlError::Status(status)),
            };
            let version = event.version;
            let line = match event.event {
                Some(pb::watch_event::Event::Snapshot(s)) => {
                    let s = StateJson::from(s);
                    if as_json {
                        serde_json::to_string(&WatchJson { version, snapshot: Some(s), change: None, health: None })?
                    } else {
                        format!(
                            "version {version}: state with {} services, {} source pools",
                            s.services.len(),
                            s.source_pools.len()
                        )
                    }
                }
                Some(pb::watch_event::Event::Change(c)) => {
                    let c = ChangeJson {
                        cause: c.cause,
                        services_changed: c.services_changed,
                        services_deleted: c.services_deleted,
                        pools_changed: c.pools_changed,
                        pools_deleted: c.pools_deleted,
                    };
                    if as_json {
                        serde_json::to_string(&WatchJson { version, snapshot: None, change: Some(c), health: None })?
                    } else {
                        let mut line = format!("version {version}: {}", c.cause);
                        for (what, names) in [
                            ("services changed", &c.services_changed),
                            ("services deleted", &c.services_deleted),
                            ("pools changed", &c.pools_changed),
                            ("pools deleted", &c.pools_deleted),
                        ] {
                            if !names.is_empty() {
                                line.push_str(&format!("; {what}: {}", names.join(", ")));
                            }
                        }
                        line
                    }
                }
                Some(pb::watch_event::Event::Health(h)) => {
                    let h = HealthChangeJson {
                        service: h.service,
                        address: h.address,
                        port: h.port,
                        health: health_name(h.health).to_owned(),
                        reason: h.reason,
                    };
                    if as_json {
                        serde_json::to_string(&WatchJson { version, snapshot: None, change: None, health: Some(h) })?
                    } else {
                        format!(
                            "version {version}: health {} {}:{} {}: {}",
                            h.service, h.address, h.port, h.health, h.reason
                        )
                    }
                }
                None => format!("version {version}: (an event this vipgatectl does not know)"),
            };
            let written = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
            match written {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(String::new()),
                Err(e) => return Err(CtlError::Output(e)),
            }
        }
    }
}
