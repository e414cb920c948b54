//! The command line: every command and option, as clap parses them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use vipgate_controlplane::api;

/// Query a running vipgated (its health and traffic counters) and change its
/// desired state: services, backends and source pools.
#[derive(Debug, Parser)]
#[command(name = "vipgatectl", version)]
pub(crate) struct Cli {
    /// vipgated's API socket.
    #[arg(long, global = true, value_name = "PATH", env = "VIPGATE_SOCKET", default_value = api::DEFAULT_SOCKET)]
    pub(crate) socket: PathBuf,
    /// Talk to vipgated over TCP with mutual TLS instead of the socket, at
    /// `https://host:port` (its `[api] listen_tcp`); needs --cert, --key and
    /// --ca.
    #[arg(long, global = true, value_name = "URL", env = "VIPGATE_ENDPOINT", requires_all = ["cert", "key", "ca"])]
    pub(crate) endpoint: Option<String>,
    /// With --endpoint: this client's certificate (PEM), signed by the CA
    /// vipgated's `[api] client_ca` names.
    #[arg(long, global = true, value_name = "PEM", env = "VIPGATE_CERT", requires = "endpoint")]
    pub(crate) cert: Option<PathBuf>,
    /// With --endpoint: this client's private key (PEM).
    #[arg(long, global = true, value_name = "PEM", env = "VIPGATE_KEY", requires = "endpoint")]
    pub(crate) key: Option<PathBuf>,
    /// With --endpoint: the CA certificate (PEM) that signed vipgated's
    /// server certificate.
    #[arg(long, global = true, value_name = "PEM", env = "VIPGATE_CA", requires = "endpoint")]
    pub(crate) ca: Option<PathBuf>,
    /// Print a JSON document instead of tables (for scripts).
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Act as this owner (default "cli"): changes create objects owned by
    /// it and may change only its objects; `list` and `watch` show only
    /// its objects; `apply` replaces only its objects. Letters, digits,
    /// '-', '_', '.', '/' and ':', e.g. k8s/prod-cluster.
    #[arg(long, global = true, value_name = "OWNER", env = "VIPGATE_OWNER")]
    pub(crate) owner: Option<String>,
    /// What to show.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// vipgatectl's commands.
// Parsed once per run: the size of the service variants (their many
// options) does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
    /// contents of a JSON file (see docs/ops/vipgatectl.md, "apply", for its
    /// format); with --owner, replace only that owner's objects.
    ///
    /// Without --expected-version (or, with --owner, --expected-generation)
    /// this reads the current one first (GetState) and sends it: a
    /// read-then-write that still fails with FAILED_PRECONDITION if another
    /// writer changed the state in between.
    Apply {
        /// The JSON file: {"services": [...], "source_pools": [...]}.
        file: PathBuf,
        /// Apply only if the state is still at this version; otherwise the
        /// call fails with FAILED_PRECONDITION and nothing changes.
        #[arg(long, value_name = "N")]
        expected_version: Option<u64>,
        /// With --owner: apply only if that owner's generation is still N.
        #[arg(long, value_name = "N")]
        expected_generation: Option<u64>,
    },
    /// Back up and restore the whole dynamic state.
    #[command(subcommand)]
    State(StateCommand),
    /// Print the state's version, then one line per change until
    /// interrupted (with --json: one JSON object per line).
    Watch,
}

/// `vipgatectl state ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum StateCommand {
    /// Write every dynamic service and source pool, with their owners, the
    /// version and the owners' generations, to a JSON file (the backup).
    Export {
        /// The file to write ("-": standard output).
        file: PathBuf,
    },
    /// Replace the whole dynamic state with an export's, in one change:
    /// every owner's objects, each with its owner (the restore, and the way
    /// to move a state to another gateway).
    Import {
        /// A file `state export` wrote.
        file: PathBuf,
        /// Import only if the state is still at this version.
        #[arg(long, value_name = "N")]
        expected_version: Option<u64>,
    },
}

/// `vipgatectl service ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum ServiceCommand {
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
pub(crate) struct ServiceSpec {
    /// The virtual IPv4 address.
    #[arg(long, value_name = "ADDR")]
    pub(crate) vip: String,
    /// The virtual port, 1 to 65535.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) port: u16,
    /// The protocol.
    #[arg(long, value_parser = ["tcp", "udp"])]
    pub(crate) protocol: String,
    /// How backends are reached (default nat).
    #[arg(long, value_parser = ["nat", "fullnat", "dsr"])]
    pub(crate) mode: Option<String>,
    /// fullnat: the source pool's name.
    #[arg(long, value_name = "NAME")]
    pub(crate) source_pool: Option<String>,
    /// dsr: the tunnel source prefix, e.g. 198.18.3.0/24.
    #[arg(long, value_name = "CIDR")]
    pub(crate) tunnel_source: Option<String>,
    /// The lookup table's size, a prime from 3 to 16777213 (default 65537).
    #[arg(long, value_name = "N")]
    pub(crate) table_size: Option<u32>,
    /// What happens to a removed backend's flows (default rehash).
    #[arg(long, value_parser = ["rehash", "reset"])]
    pub(crate) on_backend_removal: Option<String>,
    /// A backend, weight 1 unless given; repeat for more.
    #[arg(long = "backend", value_name = "ADDR:PORT[:WEIGHT]")]
    pub(crate) backends: Vec<String>,
    /// Health-check the backends this way (default: no check). The
    /// --check-* options left out take vipgated's defaults.
    #[arg(long, value_parser = ["tcp", "http", "https", "udp"])]
    pub(crate) check: Option<String>,
    /// Time between two probes of a backend (default 5000).
    #[arg(long, value_name = "MS", requires = "check")]
    pub(crate) check_interval_ms: Option<u32>,
    /// Time a probe may take, less than the interval (default 2000, or half the interval).
    #[arg(long, value_name = "MS", requires = "check")]
    pub(crate) check_timeout_ms: Option<u32>,
    /// Passes in a row that bring a down backend up (default 2).
    #[arg(long, value_name = "N", requires = "check")]
    pub(crate) check_rise: Option<u32>,
    /// Failures in a row that take an up backend down (default 3).
    #[arg(long, value_name = "N", requires = "check")]
    pub(crate) check_fall: Option<u32>,
    /// The port probed (default: each backend's own).
    #[arg(long, value_name = "PORT", requires = "check")]
    pub(crate) check_port: Option<u16>,
    /// http, https: the path (default /).
    #[arg(long, value_name = "PATH", requires = "check")]
    pub(crate) check_path: Option<String>,
    /// http, https: the Host header (default: the probed address:port).
    #[arg(long, value_name = "HOST", requires = "check")]
    pub(crate) check_host: Option<String>,
    /// http, https: the status codes that pass, e.g. 200-299,301 (default 200-399).
    #[arg(long, value_name = "CODES", requires = "check")]
    pub(crate) check_expect_status: Option<String>,
    /// udp: the datagram sent, in hexadecimal.
    #[arg(long, value_name = "HEX", requires = "check")]
    pub(crate) check_payload_hex: Option<String>,
    /// udp: the reply's expected first bytes, in hexadecimal (default: any reply).
    #[arg(long, value_name = "HEX", requires = "check")]
    pub(crate) check_expect_reply_hex: Option<String>,
    /// The address probes are sent from (default: the kernel's choice).
    #[arg(long, value_name = "ADDR", requires = "check")]
    pub(crate) check_source: Option<String>,
    /// Limit the new flows each client source opens to this many a second
    /// (default: no limit); over it, SYNs and new UDP flows are dropped.
    #[arg(long, value_name = "N")]
    pub(crate) new_flows_per_second: Option<u32>,
    /// New flows a source may open at once (default: the rate).
    #[arg(long, value_name = "N", requires = "new_flows_per_second")]
    pub(crate) new_flow_burst: Option<u32>,
    /// Clients sharing this prefix length are one source, 0 to 32 (default 32).
    #[arg(long, value_name = "LEN", requires = "new_flows_per_second")]
    pub(crate) new_flow_prefix_len: Option<u32>,
    /// Serve only clients in this prefix, e.g. 203.0.113.0/24; repeat for
    /// more (at most 256). Default: every client. Others are dropped
    /// (source_denied), tracked connections too.
    #[arg(long = "source-range", value_name = "CIDR")]
    pub(crate) source_ranges: Vec<String>,
    /// What picks a new connection's backend: none (the connection's
    /// addresses and ports; default) or client_ip (the client's address:
    /// all its connections reach one backend).
    #[arg(long, value_parser = ["none", "client_ip"])]
    pub(crate) affinity: Option<String>,
}

/// `vipgatectl backend ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum BackendCommand {
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
pub(crate) enum PoolCommand {
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
