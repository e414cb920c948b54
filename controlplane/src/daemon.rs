//! The running daemon: EAL and dataplane start-up, the API, and an orderly
//! shutdown on SIGINT or SIGTERM.
//!
//! Owns: the order of start-up and shutdown. The main lcore (the thread that
//! initialised EAL) runs a current-thread tokio runtime for the control
//! plane; workers run on the other lcores.

use crate::api::{self, GatewayView, MempoolView, PortView, WorkerView};
use crate::config::Config;
use std::sync::Arc;
use tracing::{error, info};
use vipgate_dataplane::snapshot::{Snapshot, SnapshotError};
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
/// that every mbuf came back.
///
/// Order: the control-plane runtime, the signal handlers and the API socket
/// come first, so a second daemon on the same socket fails before touching
/// DPDK, and a signal during start-up stops the daemon cleanly as soon as it
/// is up. Then EAL, ports and workers; then the API is served.
pub fn run(config: &Config) -> Result<ShutdownReport, DaemonError> {
    // A current-thread runtime creates no threads: it runs on this thread,
    // which EAL makes the main lcore below.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(DaemonError::Runtime)?;
    let signals = rt.block_on(async { Signals::install() }).map_err(DaemonError::Runtime)?;
    let socket = rt.block_on(api::bind_unix(&config.api_socket))?;

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
    dataplane.launch(Arc::new(snapshot))?;
    let lcores: Vec<u32> = dataplane.workers().iter().map(|w| w.lcore).collect();
    info!(workers = ?lcores, pool_size = dataplane.pool().size(), "vipgated ready");

    let view =
        Arc::new(DaemonView { workers: dataplane.workers().to_vec(), ports, pool: Arc::clone(dataplane.pool()) });
    let served = rt.block_on(api::serve_bound(socket, view, signals.wait())).map_err(DaemonError::from);
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

/// SIGINT and SIGTERM handlers. Installed before anything else starts, so a
/// signal that arrives during start-up is kept and acted on once the daemon
/// is up, rather than killing it half-initialised.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; must run inside the runtime.
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())? })
    }

    /// Resolves on the first SIGINT or SIGTERM.
    async fn wait(mut self) {
        let name = tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        };
        info!(signal = name, "shutting down");
    }
}
