//! The running daemon: EAL and dataplane start-up, the API, configuration
//! reloads on SIGHUP, and an orderly shutdown on SIGINT or SIGTERM.
//!
//! Owns: the order of start-up and shutdown, and what a reload may change.
//! The main lcore (the thread that initialised EAL) runs a current-thread
//! tokio runtime for the control plane; workers run on the other lcores.

use crate::api::{self, GatewayView, MempoolView, PortView, WorkerView};
use crate::config::Config;
use std::sync::Arc;
use std::time::Instant;
use tracing::{error, info, warn};
use vipgate_dataplane::snapshot::{Snapshot, SnapshotError};
use vipgate_dataplane::wire::EthernetAddress;
use vipgate_dpdk::{Dataplane, DpdkError, Eal, Mempool, ShutdownReport};

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// DPDK refused something.
    #[error(transparent)]
    Dpdk(#[from] DpdkError),
    /// The forwarding state could not be compiled.
    #[error("cannot compile the forwarding state: {0}")]
    Snapshot(#[from] SnapshotError),
    /// The control-plane runtime could not start.
    #[error("cannot start the control-plane runtime: {0}")]
    Runtime(std::io::Error),
    /// The API failed.
    #[error(transparent)]
    Api(#[from] api::ApiError),
    /// The Prometheus endpoint failed.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// Mbufs were missing from the pool after shutdown.
    #[error("{} of {} mbufs were still in use after shutdown (expected {})", .0.in_use_at_end, .0.pool_size, .0.in_use_at_start)]
    MbufLeak(ShutdownReport),
}

struct DaemonView {
    workers: Vec<vipgate_dpdk::WorkerView>,
    ports: Vec<vipgate_dpdk::PortView>,
    pool: Arc<Mempool>,
}

impl GatewayView for DaemonView {
    fn workers(&self) -> Vec<WorkerView> {
        self.workers.iter().map(|w| WorkerView { lcore: w.lcore, counters: Arc::clone(&w.counters) }).collect()
    }

    fn ports(&self) -> Vec<PortView> {
        self.ports
            .iter()
            .map(|p| PortView { name: p.name.clone(), port_id: p.id, mac: p.mac.0, stats: p.stats() })
            .collect()
    }

    fn mempool(&self) -> MempoolView {
        MempoolView {
            name: self.pool.name().to_owned(),
            size: u64::from(self.pool.size()),
            in_use: u64::from(self.pool.in_use()),
        }
    }

    fn serving(&self) -> bool {
        self.workers.iter().all(vipgate_dpdk::WorkerView::running)
    }
}

/// Runs the gateway until SIGINT or SIGTERM, then shuts it down and checks
/// that every mbuf came back. Each SIGHUP meanwhile reloads the
/// configuration file: services, routes and neighbours may change, nothing
/// else (see [`Config::restart_required`]).
///
/// Order: the control-plane runtime, the signal handlers and the API socket
/// come first, so a second daemon on the same socket fails before touching
/// DPDK, and a signal during start-up stops (or, SIGHUP, reloads) the daemon
/// as soon as it is up. Then EAL, ports and workers; then the API is served,
/// and reloads run beside it on the same runtime.
pub fn run(config: &Config) -> Result<ShutdownReport, DaemonError> {
    // A current-thread runtime creates no threads: it runs on this thread,
    // which EAL makes the main lcore below.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(DaemonError::Runtime)?;
    let signals = rt.block_on(async { Signals::install() }).map_err(DaemonError::Runtime)?;
    let socket = rt.block_on(api::bind_unix(&config.api_socket))?;
    let listeners = Listeners::bind(config)?;

    info!(version = %Eal::version(), args = %config.eal_args.join(" "), "initialising EAL");
    let eal = Eal::init(&config.eal_args)?;
    if let Err(e) = eal.init_packet_capture() {
        tracing::warn!("packet capture (dpdk-dumpcap) unavailable: {e}");
    }
    let mut dataplane = Dataplane::open(eal, &config.dataplane)?;
    let ports = dataplane.ports();
    for p in &ports {
        info!(port = %p.name, id = p.id, mac = %p.mac, "port started");
    }
    let macs: Vec<_> = ports.iter().map(|p| p.mac).collect();
    let snapshot = Snapshot::build(&config.snapshot_spec(&macs))?;
    log_services(&snapshot);
    dataplane.launch(Arc::new(snapshot))?;
    let lcores: Vec<u32> = dataplane.workers().iter().map(|w| w.lcore).collect();
    info!(workers = ?lcores, pool_size = dataplane.pool().size(), "vipgated ready");

    let view = Arc::new(DaemonView { workers: dataplane.workers().to_vec(), ports, pool: Arc::clone(dataplane.pool()) });
    let Signals { stop, mut hup } = signals;
    let mut reloader = Reloader { running: config.clone(), macs, generation: 1 };
    let served = rt
        .block_on(async {
            // Two futures on one thread: the API, which ends on SIGINT or
            // SIGTERM, and the reloads, which never end. `select!` polls
            // both, so the API keeps answering while a reload waits for the
            // workers.
            let reloads = async {
                while hup.recv().await.is_some() {
                    reloader.reload(&dataplane).await;
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                served = api::serve_bound(socket, Arc::clone(&view) as Arc<dyn GatewayView>, stop.wait()) => served.map_err(DaemonError::from),
                failed = listeners.serve(view) => Err(failed),
                () = reloads => unreachable!("the reload loop never ends"),
            }
        });
    drop(rt);
    if let Err(e) = &served {
        error!("{e}; shutting down");
    }

    info!("stopping workers and ports");
    let report = dataplane.shutdown();
    info!(
        pool_size = report.pool_size,
        in_use_at_start = report.in_use_at_start,
        in_use_at_end = report.in_use_at_end,
        "mbuf pool at shutdown: {} in use (at start: {})",
        report.in_use_at_end,
        report.in_use_at_start
    );
    served?;
    if !report.balanced() {
        return Err(DaemonError::MbufLeak(report));
    }
    Ok(report)
}

/// The TCP listeners besides the API socket: the Prometheus endpoint and
/// the API over TCP with mutual TLS, each optional. Bound before EAL, like
/// the socket, so an address in use stops the daemon before it touches
/// DPDK; served on the control-plane runtime beside the socket.
struct Listeners {
    metrics: Option<crate::metrics::BoundMetrics>,
    tcp: Option<api::BoundTcp>,
}

impl Listeners {
    fn bind(config: &Config) -> Result<Listeners, DaemonError> {
        let metrics = match config.metrics_listen {
            Some(addr) => {
                if !addr.ip().is_loopback() {
                    warn!(%addr, "[metrics] listen is not a loopback address: anyone who can reach it can read the gateway's counters");
                }
                Some(crate::metrics::bind(addr)?)
            }
            None => {
                info!("metrics endpoint off ([metrics] listen = \"\")");
                None
            }
        };
        let tcp = match &config.api_tcp {
            Some(t) => Some(api::bind_tcp(api::TcpSettings {
                addr: t.addr,
                cert_pem: t.cert_pem.clone(),
                key_pem: t.key_pem.clone(),
                client_ca_pem: t.client_ca_pem.clone(),
                max_request_bytes: config.api_max_request_bytes,
            })?),
            None => None,
        };
        Ok(Listeners { metrics, tcp })
    }

    /// Serves both until one fails; never returns otherwise. Dropping the
    /// future (when the API socket's server ends) closes them.
    async fn serve(self, view: Arc<DaemonView>) -> DaemonError {
        let metrics = async {
            match self.metrics {
                Some(m) => {
                    crate::metrics::serve(m, Arc::clone(&view) as Arc<dyn GatewayView>).await.map_err(DaemonError::from)
                }
                None => std::future::pending().await,
            }
        };
        let tcp = async {
            match self.tcp {
                Some(t) => api::serve_tcp(t, Arc::clone(&view) as Arc<dyn GatewayView>, std::future::pending())
                    .await
                    .map_err(DaemonError::from),
                None => std::future::pending().await,
            }
        };
        match tokio::try_join!(metrics, tcp) {
            Err(e) => e,
            Ok(((), ())) => unreachable!("the listeners only return on errors"),
        }
    }
}

/// Logs each service of a snapshot, one line each.
fn log_services(snapshot: &Snapshot) {
    for s in snapshot.services() {
        info!(
            service = %s.name,
            vip = %std::net::Ipv4Addr::from(s.vip),
            port = s.port,
            protocol = s.protocol.name(),
            backends = s.backends.len(),
            table_size = s.maglev.size(),
            "service"
        );
    }
}

/// Applies the configuration file again on SIGHUP. Only services (and their
/// backends), routes and neighbours may change at runtime: they make up the
/// snapshot, which is published to the running workers. Anything else
/// (`[eal]`, `[dataplane]`, `[api]`, `[[ports]]`) is fixed when the daemon
/// starts; a file that changes it, or that is not valid, is refused and the
/// running configuration is kept.
struct Reloader {
    /// The configuration in force, which a reload is compared with.
    running: Config,
    /// The ports' MAC addresses, in port order.
    macs: Vec<EthernetAddress>,
    /// 1 for the configuration the daemon started with, plus one per
    /// applied reload.
    generation: u64,
}

impl Reloader {
    /// Reads `running.path` again and, if it is valid and changes only what
    /// may change, publishes its snapshot. Logs the outcome; never fails.
    ///
    /// Reading the file and compiling the snapshot run on the runtime's
    /// thread (a few milliseconds); waiting for the workers to leave the old
    /// snapshot yields to the runtime.
    async fn reload(&mut self, dataplane: &Dataplane) {
        let start = Instant::now();
        let path = self.running.path.clone();
        info!(path = %path.display(), "SIGHUP: reloading the configuration");
        let new = match Config::load(&path) {
            Ok(new) => new,
            Err(e) => {
                error!("reload refused: {e}; the running configuration is kept");
                return;
            }
        };
        if let Some(change) = self.running.restart_required(&new) {
            error!("reload refused: {change}; restart vipgated to change it");
            return;
        }
        let snapshot = match Snapshot::build(&new.snapshot_spec(&self.macs)) {
            Ok(s) => s,
            Err(e) => {
                error!("reload refused: cannot compile the forwarding state: {e}; the running configuration is kept");
                return;
            }
        };
        log_services(&snapshot);
        let services = snapshot.services().len();
        let published = dataplane.publish_async(snapshot).await;
        // Published even if a worker stalled: the new state is in force.
        self.running = new;
        self.generation += 1;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        match published {
            Ok(()) => info!("configuration reloaded: generation {}, {services} services in {ms:.1} ms", self.generation),
            Err(e) => warn!("configuration reloaded: generation {}, {services} services in {ms:.1} ms; but {e}", self.generation),
        }
    }
}

/// The signal handlers: SIGINT and SIGTERM stop the daemon, SIGHUP reloads
/// its configuration. Installed before anything else starts, so a signal
/// that arrives during start-up is kept and acted on once the daemon is up,
/// rather than killing it half-initialised (SIGHUP's default action would).
struct Signals {
    /// SIGINT and SIGTERM, which end the API future.
    stop: StopSignals,
    /// SIGHUP, which the reload loop waits on.
    hup: tokio::signal::unix::Signal,
}

/// SIGINT and SIGTERM.
struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; must run inside the runtime.
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            stop: StopSignals { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())? },
            hup: signal(SignalKind::hangup())?,
        })
    }
}

impl StopSignals {
    /// Resolves on the first SIGINT or SIGTERM.
    async fn wait(mut self) {
        let name = tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        };
        info!(signal = name, "shutting down");
    }
}
