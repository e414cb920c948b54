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

/// Query a running vipgated: its health and its traffic counters.
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
            return ExitCode::FAILURE;
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
        CtlError::Api(ApiError::Call { status, .. })
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

/// One worker: its lcore next to its counters.
#[derive(Debug, Serialize)]
struct WorkerJson {
    lcore: u32,
    #[serde(flatten)]
    counters: CountersJson,
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
    let columns = all_rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| all_rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in all_rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            let width = widths[c];
            let _ = if c < text_columns { write!(line, "{cell:<width$}") } else { write!(line, "{cell:>width$}") };
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
