//! The running daemon: EAL and dataplane start-up, the API, configuration
//! reloads on SIGHUP, and an orderly shutdown on SIGINT or SIGTERM.
//!
//! Owns: the order of start-up and shutdown, and what a reload may change.
//! Shutdown: the API (socket and TCP) stops accepting and gets
//! `API_STOP_GRACE` (2 s) to finish its calls, then its remaining connections
//! are cut; every VIP is withdrawn; the workers stop, then the ports; the
//! mbufs are counted.
//! The main lcore (the thread that initialised EAL) runs a current-thread
//! tokio runtime for the control plane; workers run on the other lcores.
//!
//! The only package of the control plane that links DPDK (through
//! `vipgate-dpdk`): `vipgate-controlplane`, and with it `vipgatectl`, builds
//! without it.
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use vipgate_controlplane::announce::{self, AnnounceInput, Announcer, SharedAnnounceStatus};
use vipgate_controlplane::api::{self, BondMemberView, GatewayView, MempoolView, PortView, WorkerView};
use vipgate_controlplane::config::Config;
use vipgate_controlplane::health::{Checker, HealthStatus, ProbeReport, Transition};
use vipgate_controlplane::link::{self, LinkChange, MemberChange, PortLinks};
use vipgate_controlplane::state::{
    self, Applied, Change, DesiredState, ErrorKind, MutationRequest, StateError, StateHandle, StateView,
};
use vipgate_controlplane::stats::{ServiceFigures, SlotPlan, StatsReader, StatsSlots};
use vipgate_controlplane::store::{Store, StoreError};
use vipgate_controlplane::{kernel, metrics};
use vipgate_dataplane::snapshot::Snapshot;
use vipgate_dataplane::wire::EthernetAddress;
use vipgate_dpdk::{Dataplane, DpdkError, Eal, Mempool, ShutdownReport};

/// How long the API (the socket and TCP) may take to finish its calls after
/// SIGINT or SIGTERM; then every connection still open is cut. A client that
/// holds a call open and never reads the answer would otherwise keep the
/// daemon, its workers and its announced VIPs up for as long as it likes:
/// a stop must always stop. Unary calls take milliseconds, and Watch
/// streams end at the signal.
const API_STOP_GRACE: Duration = Duration::from_secs(2);

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// DPDK refused something.
    #[error(transparent)]
    Dpdk(#[from] DpdkError),
    /// The control-plane runtime could not start.
    #[error("cannot start the control-plane runtime: {0}")]
    Runtime(std::io::Error),
    /// The API failed.
    #[error(transparent)]
    Api(#[from] api::ApiError),
    /// The Prometheus endpoint failed.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    /// The persisted dynamic state could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The persisted dynamic state does not fit the configuration file.
    #[error("the dynamic state in {path} does not fit the configuration: {source}")]
    State {
        /// The state file.
        path: std::path::PathBuf,
        /// Why.
        source: StateError,
    },
    /// The route announcer's interface cannot be managed.
    #[error(transparent)]
    Announce(#[from] announce::AnnounceError),
    /// The kernel interfaces (exception path) could not be configured.
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    /// Mbufs were missing from the pool after shutdown.
    #[error("{} of {} mbufs were still in use after shutdown (expected {})", .0.in_use_at_end, .0.pool_size, .0.in_use_at_start)]
    MbufLeak(ShutdownReport),
}

struct DaemonView {
    workers: Vec<vipgate_dpdk::WorkerView>,
    ports: Vec<vipgate_dpdk::PortView>,
    pool: Arc<Mempool>,
    stats: StatsReader,
    /// The checked backends' health, for the metrics.
    health: Option<Arc<HealthStatus>>,
    announce: SharedAnnounceStatus,
    exception: Option<Arc<vipgate_dpdk::ExceptionCounters>>,
    /// Every port's link as last read by [`watch_links`].
    links: Arc<Mutex<PortLinks>>,
}

impl GatewayView for DaemonView {
    fn workers(&self) -> Vec<WorkerView> {
        self.workers
            .iter()
            .map(|w| WorkerView {
                lcore: w.lcore,
                counters: Arc::clone(&w.counters),
                snapshot: Arc::clone(&w.snapshot),
                since_last_loop: w.since_last_loop(),
            })
            .collect()
    }

    fn ports(&self) -> Vec<PortView> {
        let links = self.links.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.ports
            .iter()
            .zip(links.ports())
            .map(|(p, l)| PortView {
                name: p.name.clone(),
                port_id: p.id,
                mac: p.mac.0,
                stats: p.stats(),
                link: l.link,
                uplink: l.uplink,
                members: l
                    .members
                    .iter()
                    .zip(p.member_stats())
                    .map(|(m, stats)| BondMemberView { link: m.clone(), stats })
                    .collect(),
            })
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

    fn service_stats(&self, only: Option<&str>) -> Vec<ServiceFigures> {
        self.stats.read(only)
    }

    fn health(&self) -> Option<Arc<HealthStatus>> {
        self.health.clone()
    }

    fn announce(&self) -> Option<announce::AnnounceStatus> {
        // The announcement metrics exist only while it is on.
        let status = self.announce.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        status.enabled.then(|| status.clone())
    }

    fn exception(&self) -> Option<api::ExceptionView> {
        use std::sync::atomic::Ordering::Relaxed;
        self.exception.as_ref().map(|c| api::ExceptionView {
            kernel_tx: c.kernel_tx.load(Relaxed),
            kernel_tx_failed: c.kernel_tx_failed.load(Relaxed),
            kernel_rx: c.kernel_rx.load(Relaxed),
        })
    }
}

/// Runs the gateway until SIGINT or SIGTERM, then shuts it down and checks
/// that every mbuf came back. Each SIGHUP meanwhile reloads the
/// configuration file: services, routes, neighbours and `[announce]` may
/// change, nothing else (see [`Config::restart_required`]).
///
/// Order: the control-plane runtime, the signal handlers, the API socket and
/// the state directory's lock come first, so a second daemon on the same
/// socket or state directory fails before touching DPDK, and a signal during start-up stops (or, SIGHUP, reloads) the daemon
/// as soon as it is up. Then EAL, ports and workers; then the API is served,
/// and reloads run beside it on the same runtime.
pub fn run(config: &Config) -> Result<ShutdownReport, DaemonError> {
    // A current-thread runtime runs on this thread, which EAL makes the main
    // lcore below. Its only other threads are the blocking pool's, started
    // on demand to write the state file (`Reloader::commit`); they never
    // touch DPDK.
    //
    // Every one of those threads asks for a short scheduler slice, so that
    // it gets its CPU soon after it wakes even when a busy worker shares
    // that CPU, and for `[eal] control_plane_nice`, so that while it has
    // work it gets most of that CPU (see `vipgate_dpdk::sched`); the main
    // thread asks once EAL has started the workers' threads, which keep
    // the nice value they were started with, 0.
    //
    // The blocking pool's threads start after EAL has pinned this thread to
    // the main lcore's CPU, whose affinity they would inherit: they are
    // let run on every CPU, so that a state write need not wait for the CPU
    // of the worker that shares the main lcore's.
    let nice = config.control_plane_nice;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_start(move || control_plane_thread(nice))
        .build()
        .map_err(DaemonError::Runtime)?;
    start_compile_pool(nice);
    let signals = rt.block_on(async { Signals::install() }).map_err(DaemonError::Runtime)?;
    let socket = rt.block_on(api::bind_unix(&config.api_socket))?.with_max_request_bytes(config.api_max_request_bytes);
    // The state directory is this daemon's until it exits: a second one on
    // it stops here, before it touches anything the first one uses (the
    // announcement interface, EAL). Only then are the temporary files of an
    // interrupted write safe to remove (Store::open does).
    let store = Store::new(&config.state_dir);
    let _state_lock = store.lock()?;
    let listeners = Listeners::bind(config)?;
    // The announcement interface before EAL too: a name taken by another
    // kind of interface, or no CAP_NET_ADMIN, stops the start here. It is
    // emptied: nothing is announced before the workers forward.
    let mut announcer = rt.block_on(Announcer::start(&config.announce))?;
    // The dynamic state before EAL: a state file that cannot be read stops
    // the start here, and is never replaced by an empty state.
    let dynamic = store.open(&_state_lock)?;
    info!(
        path = %store.path().display(),
        version = dynamic.version,
        services = dynamic.services.len(),
        source_pools = dynamic.source_pools.len(),
        "dynamic state restored"
    );
    // Checked against the file before EAL too (the MACs only matter to the
    // snapshot), so a conflict stops the start before anything else.
    state::Effective::build(config, &[], &dynamic)
        .map_err(|source| DaemonError::State { path: store.path(), source })?;

    info!(version = %Eal::version(), args = %config.eal_args.join(" "), "initialising EAL");
    let eal = Eal::init(&config.eal_args)?;
    match vipgate_dpdk::sched::request_slice(vipgate_dpdk::sched::CONTROL_PLANE_SLICE)
        .and_then(|()| vipgate_dpdk::sched::current_slice())
    {
        Ok(slice) if slice.is_zero() => {
            info!("scheduler slice: the kernel's default (custom slices need Linux 6.12)");
        }
        Ok(slice) => info!(slice_us = slice.as_micros() as u64, "control plane threads: scheduler slice"),
        Err(e) => tracing::warn!("control plane threads keep the kernel's default scheduler slice: {e}"),
    }
    match vipgate_dpdk::sched::request_nice(nice).and_then(|()| vipgate_dpdk::sched::current_nice()) {
        Ok(n) => info!(nice = n, "control plane threads: nice value (the workers': 0)"),
        Err(e) => tracing::warn!(
            "control plane threads keep the workers' nice value, so they get half of a CPU they share with a worker \
             ([eal] control_plane_nice = {nice} needs CAP_SYS_NICE): {e}"
        ),
    }
    if let Err(e) = eal.init_packet_capture() {
        tracing::warn!("packet capture (dpdk-dumpcap) unavailable: {e}");
    }
    let mut dataplane = Dataplane::open(eal, &config.dataplane)?;
    let ports = dataplane.ports();
    for p in &ports {
        info!(port = %p.name, id = p.id, mac = %p.mac, kernel_interface = p.kernel_interface.as_deref().unwrap_or(""), "port started");
    }
    let macs: Vec<_> = ports.iter().map(|p| p.mac).collect();
    let mut slots = StatsSlots::new(
        config.dataplane.pipeline.backend_slots,
        dataplane.workers().iter().map(|w| Arc::clone(&w.stats)).collect(),
    );
    // Every backend starts up: its first probe decides.
    let effective = state::Effective::build(config, &macs, &dynamic)
        .map_err(|source| DaemonError::State { path: store.path(), source })?;
    let (snapshot, plan) =
        state::compile_effective(&effective, dynamic.version, &Default::default(), &slots, None, None)
            .map_err(|source| DaemonError::State { path: store.path(), source })?;
    log_services(&snapshot);
    dataplane.launch(Arc::new(snapshot))?;
    slots.apply(plan);
    // The kernel side of the exception path, once packets flow both ways.
    let commands = kernel::configure(config)?;
    if !commands.is_empty() {
        info!(commands = %some_commands(&commands), "kernel interfaces configured");
    }
    // The links, read once before anything is announced: a gateway whose
    // uplinks are all down announces nothing from the start.
    let mut links = PortLinks::new(ports.iter().map(|p| (p.name.clone(), config.uplinks.contains(&p.name))));
    log_link_changes(&links.update(&ports.iter().map(vipgate_dpdk::PortView::link).collect::<Vec<_>>()));
    log_member_changes(
        &links.update_members(&ports.iter().map(vipgate_dpdk::PortView::bond_members).collect::<Vec<_>>()),
    );
    let (uplinks_tx, mut uplinks_rx) = tokio::sync::watch::channel(links.uplinks_down());
    let links = Arc::new(Mutex::new(links));
    let lcores: Vec<u32> = dataplane.workers().iter().map(|w| w.lcore).collect();
    info!(workers = ?lcores, pool_size = dataplane.pool().size(), "vipgated ready");

    let Signals { stop, mut hup } = signals;
    let running = Arc::new(config.clone());
    let (handle, mut requests) = StateHandle::new(StateView { config: Arc::clone(&running), dynamic: dynamic.clone() });
    let (checker, mut probe_reports) = Checker::new(Arc::clone(handle.health()));
    let link_ports = ports.clone();
    let view = Arc::new(DaemonView {
        workers: dataplane.workers().to_vec(),
        ports,
        pool: Arc::clone(dataplane.pool()),
        stats: slots.reader(),
        health: Some(Arc::clone(handle.health())),
        announce: announcer.status(),
        exception: dataplane.exception_counters(),
        links: Arc::clone(&links),
    });
    // The workers forward: the eligible VIPs may be announced (every
    // backend starts up).
    let eligibility = announce::Eligibility::build(config, &dynamic, &Default::default());
    let (announce_tx, mut announce_rx) = tokio::sync::watch::channel(AnnounceInput {
        settings: config.announce.clone(),
        eligibility: eligibility.map(),
    });
    announce_rx.mark_changed();
    let mut reloader = Reloader {
        running,
        macs,
        generation: 1,
        dynamic,
        effective,
        eligibility,
        store,
        handle: handle.clone(),
        checker,
        slots,
        announce: announce_tx,
    };
    let served = rt
        .block_on(async {
            // Every backend starts up (the snapshot above has them all);
            // the first probe of each decides (see health::checker).
            reloader.start_health();
            // Two futures on one thread: the API, which ends on SIGINT or
            // SIGTERM, and the changes (reloads and API mutations, one at a
            // time, in arrival order), which never end. `select!` polls
            // both, so the API keeps answering reads while a change is
            // persisted or waits for the workers.
            let changes = async {
                loop {
                    tokio::select! {
                        Some(()) = hup.recv() => reloader.reload(&dataplane).await,
                        Some(request) = requests.recv() => reloader.mutate(request, &dataplane).await,
                        Some(report) = probe_reports.recv() => reloader.health(report, &mut probe_reports, &dataplane).await,
                        else => break,
                    }
                }
                std::future::pending::<()>().await
            };
            // Both API listeners stop together: at the signal they accept
            // nothing more and let their calls finish; after
            // API_STOP_GRACE, the connections still open are cut.
            let connections = api::Connections::new();
            let stopping = CancellationToken::new();
            let api = async {
                let socket = socket.with_connections(connections.clone());
                let unix = api::serve_bound_with_state(
                    socket,
                    Arc::clone(&view) as Arc<dyn GatewayView>,
                    Some(handle.clone()),
                    stopping.cancelled(),
                );
                let unix = async { unix.await.map_err(DaemonError::from) };
                let others = listeners.serve(view, handle.clone(), connections.clone(), stopping.cancelled());
                tokio::try_join!(unix, others).map(|((), ())| ())
            };
            let stop_then_cut = async {
                stop.wait().await;
                // Watch streams never end by themselves.
                handle.close();
                stopping.cancel();
                tokio::time::sleep(API_STOP_GRACE).await;
                let open = connections.open();
                warn!(
                    connections = open,
                    grace_ms = API_STOP_GRACE.as_millis() as u64,
                    "API grace period ran out: closing {open} connection(s) still open"
                );
                connections.cut();
                std::future::pending::<()>().await
            };
            tokio::select! {
                served = api => served,
                () = stop_then_cut => unreachable!("ends only with the API"),
                () = changes => unreachable!("the change loop never ends"),
                () = announcer.run(&mut announce_rx, &mut uplinks_rx) => unreachable!("the announcer never ends"),
                () = watch_links(&link_ports, &links, &uplinks_tx) => unreachable!("the link watch never ends"),
            }
        });
    // Withdraw every VIP first, so the routers move traffic to the other
    // gateways while this one still forwards.
    rt.block_on(announcer.shutdown());
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
    metrics: Option<metrics::BoundMetrics>,
    tcp: Option<api::BoundTcp>,
}

impl Listeners {
    fn bind(config: &Config) -> Result<Listeners, DaemonError> {
        let metrics = match config.metrics_listen {
            Some(addr) => {
                if !addr.ip().is_loopback() {
                    warn!(%addr, "[metrics] listen is not a loopback address: anyone who can reach it can read the gateway's counters");
                }
                Some(metrics::bind(addr)?)
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

    /// Serves both until `shutdown`, then the API until its connections
    /// are closed (see [`API_STOP_GRACE`]), or until one fails. The metrics
    /// endpoint is closed at `shutdown`.
    async fn serve(
        self,
        view: Arc<DaemonView>,
        state: StateHandle,
        connections: api::Connections,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), DaemonError> {
        let metrics = async {
            match self.metrics {
                Some(m) => {
                    metrics::serve(m, Arc::clone(&view) as Arc<dyn GatewayView>).await.map_err(DaemonError::from)
                }
                None => std::future::pending().await,
            }
        };
        let tcp = async {
            match self.tcp {
                Some(t) => api::serve_tcp(
                    t.with_connections(connections),
                    Arc::clone(&view) as Arc<dyn GatewayView>,
                    Some(state),
                    shutdown,
                )
                .await
                .map_err(DaemonError::from),
                None => {
                    shutdown.await;
                    Ok(())
                }
            }
        };
        tokio::select! {
            served = tcp => served,
            Err(e) = metrics => Err(e),
        }
    }
}

/// Reads every port's link every [`link::LINK_POLL_INTERVAL`], for ever,
/// on the control plane's thread (never a worker's): logs each change once,
/// keeps the latest reading in `links` for the API and the metrics, and
/// tells the announcer whether every uplink is down.
async fn watch_links(
    ports: &[vipgate_dpdk::PortView],
    links: &Mutex<PortLinks>,
    uplinks_down: &tokio::sync::watch::Sender<bool>,
) {
    let mut tick = tokio::time::interval(link::LINK_POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let readings: Vec<_> = ports.iter().map(vipgate_dpdk::PortView::link).collect();
        let members: Vec<_> = ports.iter().map(vipgate_dpdk::PortView::bond_members).collect();
        let (changes, member_changes, down) = {
            let mut links = links.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            (links.update(&readings), links.update_members(&members), links.uplinks_down())
        };
        log_link_changes(&changes);
        log_member_changes(&member_changes);
        uplinks_down.send_if_modified(|d| std::mem::replace(d, down) != down);
    }
}

/// One line per port whose link changed.
fn log_link_changes(changes: &[LinkChange]) {
    for c in changes {
        match c.to {
            Some(l) if l.up => info!(
                port = %c.port,
                uplink = c.uplink,
                speed_mbps = l.speed_mbps.unwrap_or(0),
                duplex = if l.full_duplex { "full" } else { "half" },
                "port link up"
            ),
            Some(_) => warn!(port = %c.port, uplink = c.uplink, "port link down"),
            None => warn!(port = %c.port, uplink = c.uplink, "port link unknown: its driver does not report it"),
        }
    }
}

/// One line per bond member whose link, activity or use changed.
fn log_member_changes(changes: &[MemberChange]) {
    for c in changes {
        let m = &c.to;
        let (actor, partner) = m.lacp.map_or((String::new(), String::new()), |l| {
            (l.actor.state.names().join(","), l.partner.state.names().join(","))
        });
        let link = match m.link {
            Some(l) if l.up => "up",
            Some(_) => "down",
            None => "unknown",
        };
        if m.in_use() {
            info!(port = %c.port, member = %m.device, link, %actor, %partner, "bond member in use: LACP collecting and distributing both ways");
        } else {
            warn!(
                port = %c.port,
                member = %m.device,
                link,
                active = m.active,
                selection = m.lacp.map_or("none", |l| l.selection.name()),
                %actor,
                %partner,
                "bond member not in use"
            );
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

/// The only writer of the forwarding state: applies the configuration file
/// again on SIGHUP, and the API's mutations of the dynamic state. Both
/// compile static ∪ dynamic with [`state::compile`] and publish through
/// [`Reloader::commit`], one change at a time, so they never race.
///
/// Only services (and their backends), source pools, routes and neighbours
/// may change at runtime: they make up the snapshot, which is published to
/// the running workers; and `[announce]`, which the route announcer follows.
/// Anything else (`[eal]`, `[dataplane]`, `[api]`,
/// `[state]`, `[[ports]]`) is fixed when the daemon starts; a file that
/// changes it, that is not valid, or that conflicts with the dynamic state,
/// is refused and the running configuration is kept.
struct Reloader {
    /// The configuration in force, which a reload is compared with.
    running: Arc<Config>,
    /// The ports' MAC addresses, in port order.
    macs: Vec<EthernetAddress>,
    /// 1 for the configuration the daemon started with, plus one per
    /// applied reload.
    generation: u64,
    /// The dynamic state in force (persisted).
    dynamic: DesiredState,
    /// The effective state in force (static and dynamic, validated) and
    /// its indexes, against which a change is validated.
    effective: state::Effective,
    /// Which VIPs may be announced, kept up to date service by service.
    eligibility: announce::Eligibility,
    /// Where it is persisted.
    store: Store,
    /// Where readers and watchers see it.
    handle: StateHandle,
    /// Every backend's stats slot.
    slots: StatsSlots,
    /// The health checks; the backends they find down are compiled with
    /// weight 0.
    checker: Checker,
    /// Where the route announcer learns of each published state.
    announce: tokio::sync::watch::Sender<AnnounceInput>,
}

/// The state a change would put in force: the configuration, the dynamic
/// state and their validated union.
struct Candidate {
    config: Arc<Config>,
    dynamic: DesiredState,
    effective: state::Effective,
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
        // A reload is a change like any other: it takes the next version,
        // persisted before it is applied.
        let dynamic = DesiredState { version: self.dynamic.version + 1, ..self.dynamic.clone() };
        // The file against the dynamic state: a conflict (a name or a
        // VIP:port/protocol both use) refuses the reload.
        let health = self.checker.plan(state::health_targets(&new, &dynamic));
        let compiling = Instant::now();
        let previous = dataplane.snapshot();
        let outcome = state::Effective::build(&new, &self.macs, &dynamic).and_then(|effective| {
            let compiled = state::compile_effective(
                &effective,
                dynamic.version,
                health.down(),
                &self.slots,
                previous.as_deref(),
                None,
            )?;
            Ok((effective, compiled))
        });
        drop(previous);
        let (effective, (snapshot, plan)) = match outcome {
            Ok(s) => s,
            Err(e) => {
                error!("reload refused: {e}; the running configuration is kept");
                return;
            }
        };
        let change = Change {
            cause: "reload".to_owned(),
            services_changed: new
                .services()
                .iter()
                .filter(|s| !self.running.services().iter().any(|o| o == *s))
                .map(|s| s.name.clone())
                .collect(),
            services_deleted: self
                .running
                .services()
                .iter()
                .filter(|o| !new.services().iter().any(|s| s.name == o.name))
                .map(|o| o.name.clone())
                .collect(),
            pools_changed: new
                .source_pools()
                .iter()
                .filter(|p| !self.running.source_pools().contains(p))
                .map(|p| p.name.clone())
                .collect(),
            pools_deleted: self
                .running
                .source_pools()
                .iter()
                .filter(|o| !new.source_pools().iter().any(|p| p.name == o.name))
                .map(|o| o.name.clone())
                .collect(),
            // Static objects have no owner.
            ..Change::default()
        };
        let compiled = compiling.elapsed();
        log_services(&snapshot);
        let services = snapshot.services().len();
        let old = Arc::clone(&self.running);
        let new = Arc::new(new);
        if let Err(e) = self
            .commit(
                Candidate { config: Arc::clone(&new), dynamic, effective },
                (snapshot, plan),
                compiled,
                change,
                dataplane,
            )
            .await
        {
            error!("reload refused: {e}; the running configuration is kept");
            return;
        }
        self.checker.apply(health);
        self.eligibility = announce::Eligibility::build(&self.running, &self.dynamic, self.checker.down_ref());
        self.announce_state();
        // The kernel follows the new static routes (the fast path already
        // does).
        match kernel::sync_routes(&old, &new) {
            Ok(commands) if !commands.is_empty() => {
                info!(commands = %some_commands(&commands), "kernel routes updated");
            }
            Ok(_) => {}
            Err(e) => error!("the fast path uses the reloaded routes, but the kernel's could not follow: {e}"),
        }
        self.generation += 1;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        info!(
            "configuration reloaded: generation {}, {services} services in {ms:.1} ms (state version {})",
            self.generation, self.dynamic.version
        );
    }

    /// Applies one API mutation: on a copy of the dynamic state (its maps
    /// are persistent, so the copy shares them), with only the objects it
    /// touched validated against the indexes of the state in force, then
    /// compiled and committed. Answers the caller with the new version only
    /// once it is durable and published; a refused mutation changes
    /// nothing.
    async fn mutate(&mut self, request: MutationRequest, dataplane: &Dataplane) {
        let MutationRequest { mutation, reply } = request;
        let outcome: Result<Applied, StateError> = async {
            let compiling = Instant::now();
            let mut new = self.dynamic.clone();
            let change = mutation(&self.running, &mut new)?;
            if change.is_empty() && change.cause == "Apply" {
                // An Apply of the state in force (a controller's periodic
                // push, or its restart) is no change: no version, nothing
                // written or published.
                return Ok(Applied { version: self.dynamic.version, generations: self.dynamic.generations.clone() });
            }
            new.advance(&change);
            let effective = self.effective.update(&self.dynamic, &new, &change)?;
            // Only the touched services' health targets are planned again.
            let touched: HashSet<String> =
                change.services_changed.iter().chain(&change.services_deleted).cloned().collect();
            let health = self.checker.plan_services(state::dynamic_health_targets(&new, &touched), touched.clone());
            // Only what the mutation changed is compiled again; the rest is
            // shared with the snapshot the workers read now.
            let previous = dataplane.snapshot();
            let snapshot = state::compile_effective(
                &effective,
                new.version,
                health.down(),
                &self.slots,
                previous.as_deref(),
                Some(&change),
            )?;
            drop(previous);
            let compiled = compiling.elapsed();
            let candidate = Candidate { config: Arc::clone(&self.running), dynamic: new, effective };
            self.commit(candidate, snapshot, compiled, change, dataplane).await?;
            self.checker.apply(health);
            // The announcer hears of a change only if it changes which
            // VIPs may be announced (it compares every VIP).
            if self.eligibility.refresh(
                &self.running,
                &self.dynamic,
                self.checker.down_ref(),
                touched.iter().map(String::as_str),
            ) {
                self.announce_state();
            }
            Ok(Applied { version: self.dynamic.version, generations: self.dynamic.generations.clone() })
        }
        .await;
        if let Err(e) = &outcome {
            info!(code = ?e.kind, "API change refused: {e}");
        }
        // The caller may have gone; the change stands.
        let _ = reply.send(outcome);
    }

    /// Starts probing the backends of the state in force, every one of
    /// them up until its first probe says otherwise. Runs once, on the
    /// runtime, before anything else changes the state.
    fn start_health(&mut self) {
        let plan = self.checker.plan(state::health_targets(&self.running, &self.dynamic));
        debug_assert!(plan.down().is_empty(), "every backend starts up");
        self.checker.apply(plan);
        if !self.checker.is_empty() {
            info!(targets = self.checker.len(), "health checks started");
        }
    }

    /// Counts `first` and every other probe report already waiting; if
    /// backends went up or down, compiles the state in force with the new
    /// health and publishes it, then tells watchers. A health change is no
    /// desired-state change: no version, nothing persisted.
    async fn health(
        &mut self,
        first: ProbeReport,
        more: &mut tokio::sync::mpsc::UnboundedReceiver<ProbeReport>,
        dataplane: &Dataplane,
    ) {
        let mut transitions: Vec<Transition> = self.checker.report(first).into_iter().collect();
        // A burst of reports (a rack going dark) becomes one publication.
        while let Ok(report) = more.try_recv() {
            transitions.extend(self.checker.report(report));
        }
        if transitions.is_empty() {
            return;
        }
        let start = Instant::now();
        let down = self.checker.down();
        // Only the services whose backends changed health are rebuilt.
        let touched = Change {
            cause: "health".to_owned(),
            services_changed: transitions.iter().map(|t| t.key.service.clone()).collect(),
            ..Change::default()
        };
        let previous = dataplane.snapshot();
        let outcome = state::compile_effective(
            &self.effective,
            self.dynamic.version,
            &down,
            &self.slots,
            previous.as_deref(),
            Some(&touched),
        );
        drop(previous);
        let (snapshot, plan) = match outcome {
            Ok(s) => s,
            Err(e) => {
                // The state in force compiled before; weights of 0 cannot
                // make it invalid. Kept as it is if it ever does.
                error!("health change not applied: {e}");
                return;
            }
        };
        if let Err(e) = dataplane.publish_async(snapshot).await {
            warn!("health change: published, but {e}");
        }
        self.slots.apply(plan);
        let services: HashSet<&str> = transitions.iter().map(|t| t.key.service.as_str()).collect();
        if self.eligibility.refresh(&self.running, &self.dynamic, self.checker.down_ref(), services) {
            self.announce_state();
        }
        let ms = start.elapsed().as_secs_f64() * 1e3;
        for t in transitions {
            if t.up {
                info!(service = %t.key.service, backend = %format!("{}:{}", t.key.address, t.key.port), reason = %t.reason, "backend up: takes new flows ({ms:.1} ms)");
            } else {
                warn!(service = %t.key.service, backend = %format!("{}:{}", t.key.address, t.key.port), reason = %t.reason, "backend down: takes no new flows ({ms:.1} ms)");
            }
            self.handle.publish_health(t);
        }
    }

    /// The one way a change takes effect, in this order: persist the
    /// dynamic state (atomically, fsynced), publish the snapshot to the
    /// workers, then make it the state readers and watchers see. If
    /// persisting fails nothing has changed. `compiled` is how long
    /// validating and compiling took, for the log.
    async fn commit(
        &mut self,
        Candidate { config, dynamic, effective }: Candidate,
        (snapshot, plan): (Snapshot, SlotPlan),
        compiled: std::time::Duration,
        change: Change,
        dataplane: &Dataplane,
    ) -> Result<(), StateError> {
        let start = Instant::now();
        let stats = snapshot.build_stats();
        // The records the change names are serialised here (a reload's
        // names static objects, which have none: its dynamic state changed
        // its version only); the transaction and its fsyncs run on the
        // blocking pool, and the runtime's thread keeps answering reads.
        let saved = match self.store.batch(&dynamic, &change) {
            Ok(batch) => {
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || store.write(batch)).await.unwrap_or_else(|e| {
                    Err(StoreError::Write { path: self.store.path(), source: std::io::Error::other(e) })
                })
            }
            Err(e) => Err(e),
        };
        if let Err(e) = saved {
            error!("{e}; the change is refused");
            return Err(StateError::new(ErrorKind::Unavailable, format!("{e}; nothing was changed")));
        }
        let persisted = start.elapsed();
        let published = dataplane.publish_async(snapshot).await;
        let publish = start.elapsed() - persisted;
        // Published even if a worker stalled: the new state is in force.
        if let Err(e) = published {
            warn!("state version {}: published, but {e}", dynamic.version);
        }
        self.slots.apply(plan);
        // Counts and a few names: the line stays short however many
        // services the change touches (the watchers get every name).
        let (created, changed): (Vec<&str>, Vec<&str>) =
            change.services_changed.iter().map(String::as_str).partition(|name| {
                !self.dynamic.services.contains_key(*name) && !self.running.services().iter().any(|s| s.name == *name)
            });
        fn names(list: &[String]) -> Vec<&str> {
            list.iter().map(String::as_str).collect()
        }
        let (deleted, pools_changed, pools_deleted) =
            (names(&change.services_deleted), names(&change.pools_changed), names(&change.pools_deleted));
        info!(
            version = dynamic.version,
            cause = %change.cause,
            services_created = created.len(),
            services_changed = changed.len(),
            services_deleted = deleted.len(),
            pools_changed = pools_changed.len(),
            pools_deleted = pools_deleted.len(),
            names = %some_names(&[
                ("created", &created),
                ("changed", &changed),
                ("deleted", &deleted),
                ("pools changed", &pools_changed),
                ("pools deleted", &pools_deleted),
            ]),
            services_reused = stats.services_reused,
            tables_reused = stats.tables_reused,
            tables_built = stats.tables_built,
            compile_ms = ms(compiled),
            persist_ms = ms(persisted),
            publish_ms = ms(publish),
            total_ms = ms(compiled + start.elapsed()),
            "state changed in {:.1} ms",
            (compiled + start.elapsed()).as_secs_f64() * 1e3
        );
        self.running = Arc::clone(&config);
        self.dynamic = dynamic.clone();
        self.effective = effective;
        self.handle.publish(StateView { config, dynamic }, change);
        Ok(())
    }

    /// Tells the route announcer what the state in force makes eligible:
    /// after every publication, once the health checker's state matches
    /// it (a backend that is down takes no new flows, so it does not make
    /// its VIP eligible).
    fn announce_state(&self) {
        self.announce.send_replace(AnnounceInput {
            settings: self.running.announce.clone(),
            eligibility: self.eligibility.map(),
        });
    }
}

/// Prepares a thread the control plane starts besides the main one (the
/// runtime's blocking pool, the compile pool): let run on every CPU, with
/// the control plane's short slice and nice value `nice` (see
/// `vipgate_dpdk::sched`; the main thread reports whether the kernel
/// granted them). Best effort.
fn control_plane_thread(nice: i32) {
    vipgate_dpdk::sched::unpin_current_thread();
    let _ = vipgate_dpdk::sched::request_slice(vipgate_dpdk::sched::CONTROL_PLANE_SLICE);
    let _ = vipgate_dpdk::sched::request_nice(nice);
}

/// Starts rayon's global pool, on which a change of many services builds
/// its Maglev tables (`Snapshot::build_whole`) and serialises its records:
/// one thread per CPU this process may use, counted before EAL pins the
/// main thread to one, each let run on every CPU and asking for the
/// control plane's short scheduler slice (see `vipgate_dpdk::sched`), so
/// that the work spreads over every CPU even where busy workers poll. The
/// threads sleep between changes; they never touch DPDK. If a pool
/// exists already (a test running the daemon in-process twice), it is
/// kept.
fn start_compile_pool(nice: i32) {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("vg-compile-{i}"))
        .start_handler(move |_| control_plane_thread(nice))
        .build_global();
    match built {
        Ok(()) => info!(threads, "compile pool started"),
        Err(e) => tracing::debug!("compile pool: {e}"),
    }
}

/// How many names of each list a change's log line shows.
const LOGGED_NAMES: usize = 3;

/// The first [`LOGGED_NAMES`] names of each non-empty list, after its label,
/// then how many more it has: `created a, b, c and 2997 more; deleted d`.
/// At most a few hundred bytes per list, whatever their lengths.
fn some_names(lists: &[(&str, &[&str])]) -> String {
    let mut parts = Vec::new();
    for (label, names) in lists.iter().filter(|(_, names)| !names.is_empty()) {
        parts.push(format!("{label} {}", first_few(names, ", ")));
    }
    parts.join("; ")
}

/// The first [`LOGGED_NAMES`] items joined with `separator`, then how many
/// more there are.
fn first_few(items: &[&str], separator: &str) -> String {
    let mut text = items[..items.len().min(LOGGED_NAMES)].join(separator);
    if items.len() > LOGGED_NAMES {
        text.push_str(&format!(" and {} more", items.len() - LOGGED_NAMES));
    }
    text
}

/// `ip` commands (one a line) for the log: how many, and the first few.
fn some_commands(commands: &str) -> String {
    let lines: Vec<&str> = commands.lines().collect();
    format!("{}: {}", lines.len(), first_few(&lines, "; "))
}

/// A duration in milliseconds, rounded to microseconds, for the log.
fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
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

#[cfg(test)]
mod tests {
    use super::*;
    use vipgate_controlplane::checks;

    #[test]
    fn a_change_logs_a_few_names_of_each_list_and_how_many_more() {
        let many: Vec<String> = (0..3000).map(|i| format!("svc-{i:05}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let line = some_names(&[("created", &many), ("changed", &[]), ("deleted", &["old"])]);
        assert_eq!(line, "created svc-00000, svc-00001, svc-00002 and 2997 more; deleted old");
        assert_eq!(some_names(&[("created", &many[..3]), ("deleted", &[])]), "created svc-00000, svc-00001, svc-00002");
        assert_eq!(some_names(&[("created", &[]), ("pools deleted", &[])]), "");
        // The longest names the state allows, in the largest lists: bounded.
        let long = "n".repeat(checks::MAX_NAME_LEN);
        let longs = vec![long.as_str(); 100_000];
        let lists = [("created", &longs[..]), ("changed", &longs[..]), ("deleted", &longs[..])];
        assert!(some_names(&lists).len() < 3 * (LOGGED_NAMES * (checks::MAX_NAME_LEN + 2) + 40));
    }

    #[test]
    fn kernel_commands_log_their_count_and_the_first_few() {
        let routes: String =
            (0..2000).map(|i| format!("ip route replace 198.18.{}.{}/32 via 198.18.0.2\n", i / 256, i % 256)).collect();
        assert_eq!(
            some_commands(&routes),
            "2000: ip route replace 198.18.0.0/32 via 198.18.0.2; ip route replace 198.18.0.1/32 via 198.18.0.2; \
             ip route replace 198.18.0.2/32 via 198.18.0.2 and 1997 more"
        );
        assert_eq!(some_commands("ip link set vg0 up\n"), "1: ip link set vg0 up");
    }
}
