//! The dataplane's lifecycle: open ports, launch workers, publish new
//! snapshots to them, shut down and account for every mbuf.

use crate::eal::Eal;
use crate::error::{DpdkError, strerror};
use crate::exception::{Exception, ExceptionCounters, KernelPort};
use crate::handoff::Handoff;
use crate::mempool::{self, Mempool};
use crate::port::{Member, Port, read_bond, read_link, read_stats};
use crate::rcu::{Publisher, Stalled};
use crate::worker::{Heartbeat, WorkerSetup, rdtsc, worker_main};
use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vipgate_dataplane::counters::WorkerCounters;
use vipgate_dataplane::driver::{BondMemberLink, DataplaneConfig, PortLink, PortStats};
use vipgate_dataplane::loaded::LoadedSnapshot;
use vipgate_dataplane::pipeline::{PipelineConfig, worker_inboxes};
use vipgate_dataplane::snapshot::{DEFAULT_MTU, Snapshot};
use vipgate_dataplane::stats::BackendStats;
use vipgate_dataplane::wire::EthernetAddress;

/// A port as the control plane sees it.
#[derive(Clone, Debug)]
pub struct PortView {
    /// Name.
    pub name: String,
    /// DPDK port id.
    pub id: u16,
    /// MAC address.
    pub mac: EthernetAddress,
    /// The name of its kernel interface, if it has one.
    pub kernel_interface: Option<String>,
    /// For a bond: its members, in configuration order (empty for any
    /// other port).
    members: Vec<Member>,
}

impl PortView {
    /// Whether the port is a bond.
    pub fn is_bond(&self) -> bool {
        !self.members.is_empty()
    }

    /// For a bond: each member's link, whether the bond counts it active,
    /// and its LACP state, as the bonding driver last left them (empty for
    /// any other port). For the control plane's periodic poll, on the main
    /// lcore, like [`PortView::link`].
    pub fn bond_members(&self) -> Vec<BondMemberLink> {
        if self.members.is_empty() { Vec::new() } else { read_bond(self.id, &self.members) }
    }

    /// For a bond: each member's driver counters, in configuration order
    /// (empty for any other port).
    pub fn member_stats(&self) -> Vec<PortStats> {
        self.members.iter().map(|m| read_stats(m.id)).collect()
    }

    /// The driver's counters for this port.
    pub fn stats(&self) -> PortStats {
        read_stats(self.id)
    }

    /// The port's link as its driver reports it now, without waiting;
    /// `None` if the driver cannot tell. For the control plane's periodic
    /// poll, on the main lcore.
    pub fn link(&self) -> Option<PortLink> {
        read_link(self.id)
    }
}

/// A worker as the control plane sees it.
#[derive(Clone, Debug)]
pub struct WorkerView {
    /// The lcore it runs on.
    pub lcore: u32,
    /// Its counters.
    pub counters: Arc<WorkerCounters>,
    /// Its per-backend stats ([`vipgate_dataplane::stats`]).
    pub stats: Arc<BackendStats>,
    /// The snapshot it last loaded, which it updates when that changes.
    pub snapshot: Arc<LoadedSnapshot>,
    /// When it last completed a loop iteration.
    heartbeat: Arc<Heartbeat>,
    /// TSC ticks a second, to read the heartbeat.
    tsc_hz: u64,
}

impl WorkerView {
    /// How long ago the worker last completed an iteration of its loop
    /// (before its first: how long ago it was launched); `None` before it
    /// is launched. A worker that polls, busy or idle,
    /// completes one every few microseconds, one that sleeps idle at least
    /// every [`MAX_IDLE_SLEEP`](crate::MAX_IDLE_SLEEP); anything near a
    /// second means it is stuck. Two loads and a TSC read: cheap enough for
    /// every health request and metrics scrape.
    pub fn since_last_loop(&self) -> Option<Duration> {
        self.heartbeat.age(rdtsc(), self.tsc_hz)
    }

    /// True while the worker's loop runs on its lcore.
    pub fn running(&self) -> bool {
        // SAFETY: reading an lcore's state is a plain read of EAL's lcore
        // table, valid from any thread once EAL is initialised.
        unsafe { vipgate_ffi::rte_eal_get_lcore_state(self.lcore) == vipgate_ffi::RUNNING }
    }
}

/// What shutdown found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Mbufs in the pool.
    pub pool_size: u32,
    /// Mbufs in use when the pool was created.
    pub in_use_at_start: u32,
    /// Mbufs in use after workers stopped and ports were closed.
    pub in_use_at_end: u32,
}

impl ShutdownReport {
    /// True if every mbuf came back.
    pub fn balanced(&self) -> bool {
        self.in_use_at_start == self.in_use_at_end
    }
}

/// The running dataplane. Owns EAL, the pool, the ports, the workers and
/// the snapshot they read.
#[derive(Debug)]
pub struct Dataplane {
    workers: Vec<WorkerView>,
    ports: Vec<Port>,
    pool: Option<Arc<Mempool>>,
    /// Rings between workers; drained after they stop, before the pool goes.
    handoff: Option<Handoff>,
    /// The kernel interfaces and the exception thread, when any port has a
    /// kernel interface; stopped after the workers, before the ports close.
    exception: Option<Exception>,
    /// The workers' snapshot, from launch on. Workers hold its readers; it
    /// outlives them (workers stop in `stop_workers`, before fields drop),
    /// so every snapshot is dropped on the control plane's thread.
    snapshots: Option<Publisher<Snapshot>>,
    stop: Arc<AtomicBool>,
    launched: bool,
    in_use_at_start: u32,
    idle_sleep_us: u32,
    pipeline: PipelineConfig,
    // Dropped last: EAL cleanup after every DPDK object is gone.
    eal: Eal,
}

impl Dataplane {
    /// How long [`Dataplane::publish`] and [`Dataplane::publish_async`]
    /// wait for every worker to pass a quiescent state. A running worker
    /// passes one per loop iteration (microseconds, a few milliseconds
    /// with housekeeping); a sleeping one does not hold up publication.
    pub const GRACE_TIMEOUT: Duration = Duration::from_secs(1);

    /// Creates the pool and starts every port with one queue per worker
    /// lcore. Workers are not running yet: see [`Dataplane::launch`].
    pub fn open(eal: Eal, config: &DataplaneConfig) -> Result<Dataplane, DpdkError> {
        let lcores = eal.worker_lcores();
        if lcores.is_empty() {
            return Err(DpdkError::NoWorkerLcore);
        }
        if Duration::from_micros(u64::from(config.idle_sleep_us)) > crate::MAX_IDLE_SLEEP {
            tracing::warn!(
                idle_sleep_us = config.idle_sleep_us,
                "idle workers sleep {:?} at most at once, not {} us",
                crate::MAX_IDLE_SLEEP,
                config.idle_sleep_us
            );
        }
        // One pool for every port: its mbufs hold the largest port's frames.
        let largest_mtu = config.ports.iter().map(|p| p.mtu).max().unwrap_or(DEFAULT_MTU);
        let pool = Arc::new(Mempool::create(
            "vipgate_mbufs",
            config.mbufs,
            config.mbuf_cache,
            mempool::data_room(largest_mtu),
        )?);
        tracing::info!(
            mbufs = pool.size(),
            data_room = pool.data_room(),
            largest_mtu,
            mib = u64::from(pool.size()) * u64::from(pool.bytes_per_mbuf()) / (1024 * 1024),
            "mbuf pool created"
        );
        let in_use_at_start = pool.in_use();
        let mut dp = Dataplane {
            workers: lcores
                .iter()
                .map(|&lcore| WorkerView {
                    lcore,
                    counters: Arc::default(),
                    stats: Arc::new(BackendStats::new(config.pipeline.backend_slots)),
                    snapshot: Arc::default(),
                    heartbeat: Arc::default(),
                    tsc_hz: eal.tsc_hz(),
                })
                .collect(),
            ports: Vec::with_capacity(config.ports.len()),
            pool: Some(pool),
            handoff: Some(Handoff::create(lcores.len())?),
            exception: None,
            snapshots: None,
            stop: Arc::new(AtomicBool::new(false)),
            launched: false,
            in_use_at_start,
            idle_sleep_us: config.idle_sleep_us,
            pipeline: config.pipeline,
            eal,
        };
        let queues = u16::try_from(lcores.len()).unwrap_or(u16::MAX);
        for p in &config.ports {
            let pool = dp.pool.as_ref().expect("pool exists until shutdown");
            let port = match &p.bond {
                None => Port::start(&p.name, &p.device, queues, p.mtu, pool)?,
                Some(bond) => Port::start_bond(&p.name, &p.device, bond, queues, p.mtu, pool)?,
            };
            dp.ports.push(port);
        }
        let mut kernel = Vec::new();
        for (dense, (p, port)) in config.ports.iter().zip(&dp.ports).enumerate() {
            if let Some(iface) = &p.kernel_interface {
                let pool = dp.pool.as_ref().expect("pool exists until shutdown");
                kernel.push(KernelPort::create(&p.name, dense, port.id(), iface, port.mac(), p.mtu, pool)?);
            }
        }
        if !kernel.is_empty() {
            dp.exception = Some(Exception::create(kernel, lcores.len())?);
        }
        Ok(dp)
    }

    /// The exception thread's counters (`None` when no port has a kernel
    /// interface).
    pub fn exception_counters(&self) -> Option<Arc<ExceptionCounters>> {
        self.exception.as_ref().map(|e| Arc::clone(e.counters()))
    }

    /// The ports, in dense index order.
    pub fn ports(&self) -> Vec<PortView> {
        let kernel = |id: u16| {
            self.exception
                .as_ref()
                .and_then(|e| e.kernel_ports().iter().find(|k| k.phys_id == id).map(|k| k.iface.clone()))
        };
        self.ports
            .iter()
            .map(|p| PortView {
                name: p.name().to_owned(),
                id: p.id(),
                mac: p.mac(),
                kernel_interface: kernel(p.id()),
                members: p.members().to_vec(),
            })
            .collect()
    }

    /// The workers.
    pub fn workers(&self) -> &[WorkerView] {
        &self.workers
    }

    /// The mbuf pool. Clones must be dropped before [`Dataplane::shutdown`],
    /// which frees the pool only when it holds the last reference.
    pub fn pool(&self) -> &Arc<Mempool> {
        self.pool.as_ref().expect("pool exists until shutdown")
    }

    /// EAL.
    pub fn eal(&self) -> &Eal {
        &self.eal
    }

    /// Starts one worker per worker lcore, all reading `snapshot` until
    /// [`Dataplane::publish`] replaces it. Launches once.
    pub fn launch(&mut self, snapshot: Arc<Snapshot>) -> Result<(), DpdkError> {
        if self.snapshots.is_some() {
            return Err(DpdkError::AlreadyLaunched);
        }
        let port_ids: Vec<u16> = self.ports.iter().map(Port::id).collect();
        let bond_ids: Vec<u16> = self.ports.iter().filter(|p| !p.members().is_empty()).map(Port::id).collect();
        let pool = self.pool().as_ptr();
        let tsc_hz = self.eal.tsc_hz();
        type PerWorker = (u32, Arc<WorkerCounters>, Arc<BackendStats>, Arc<LoadedSnapshot>, Arc<Heartbeat>);
        let lcores: Vec<PerWorker> = self
            .workers
            .iter()
            .map(|w| {
                (
                    w.lcore,
                    Arc::clone(&w.counters),
                    Arc::clone(&w.stats),
                    Arc::clone(&w.snapshot),
                    Arc::clone(&w.heartbeat),
                )
            })
            .collect();
        let inboxes = worker_inboxes(lcores.len());
        let workers = lcores.len();
        let handoff = self.handoff.as_ref().expect("rings exist until shutdown");
        let kernel_ports: Vec<bool> = self
            .ports
            .iter()
            .map(|p| self.exception.as_ref().is_some_and(|e| e.kernel_ports().iter().any(|k| k.phys_id == p.id())))
            .collect();
        let (publisher, readers) = Publisher::new(snapshot, lcores.len());
        self.snapshots = Some(publisher);
        for ((i, (lcore, counters, stats, loaded, heartbeat)), reader) in lcores.into_iter().enumerate().zip(readers) {
            // Its first iteration is awaited from now.
            heartbeat.beat(rdtsc());
            let worker = Box::new(WorkerSetup {
                index: i,
                queue: i as u16,
                port_ids: port_ids.clone(),
                bond_ids: bond_ids.clone(),
                pipeline: self.pipeline,
                counters,
                stats,
                inboxes: inboxes.clone(),
                snapshot: reader,
                loaded,
                heartbeat,
                stop: Arc::clone(&self.stop),
                pool,
                idle_sleep_us: self.idle_sleep_us,
                tsc_hz,
                workers,
                outbound: handoff.outbound(i),
                inbound: handoff.inbound(i),
                kernel_ports: kernel_ports.clone(),
                exception: self.exception.as_ref().map(|e| e.rings(i)),
            });
            let arg = Box::into_raw(worker) as *mut c_void;
            // SAFETY: `worker_main` takes ownership of `arg` exactly once; the
            // lcore is a worker lcore in WAIT state (nothing launched yet).
            let rc = unsafe { vipgate_ffi::rte_eal_remote_launch(Some(worker_main), arg, lcore) };
            if rc != 0 {
                // SAFETY: the launch failed, so the worker never took `arg`.
                drop(unsafe { Box::from_raw(arg as *mut WorkerSetup) });
                self.stop_workers();
                return Err(DpdkError::Launch { lcore, reason: strerror(rc) });
            }
            self.launched = true;
        }
        if let Some(e) = self.exception.as_mut()
            && let Err(err) = e.start()
        {
            self.stop_workers();
            return Err(err);
        }
        Ok(())
    }

    /// The snapshot the workers read now (`None` before launch). The `Arc`
    /// is the control plane's own reference: holding it keeps that snapshot
    /// alive after a publication replaces it, and it is dropped wherever the
    /// caller drops it, never on a worker.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshots.as_ref().map(Publisher::current)
    }

    /// Replaces the workers' snapshot: each worker uses it from its next
    /// loop iteration (within one burst). Blocks until every worker has
    /// passed a quiescent state, at most [`Dataplane::GRACE_TIMEOUT`], then
    /// drops the replaced snapshot on this thread.
    ///
    /// On [`DpdkError::Stalled`] the new snapshot is in place all the same;
    /// only the old one is kept, until a later publication finds the
    /// stalled workers past it.
    pub fn publish(&self, snapshot: Snapshot) -> Result<(), DpdkError> {
        let publisher = self.snapshots.as_ref().ok_or(DpdkError::NotLaunched)?;
        let grace = publisher.publish(snapshot);
        publisher.synchronize(grace, Self::GRACE_TIMEOUT).map_err(|e| self.stalled(e))
    }

    /// [`Dataplane::publish`] for the control plane's tokio runtime: waits
    /// for the workers' quiescent states without blocking the runtime (it
    /// yields, then sleeps on tokio's timer between polls).
    pub async fn publish_async(&self, snapshot: Snapshot) -> Result<(), DpdkError> {
        let publisher = self.snapshots.as_ref().ok_or(DpdkError::NotLaunched)?;
        let grace = publisher.publish(snapshot);
        publisher.synchronize_async(grace, Self::GRACE_TIMEOUT).await.map_err(|e| self.stalled(e))
    }

    /// Names the lcores of the readers a synchronisation waited for in vain.
    fn stalled(&self, e: Stalled) -> DpdkError {
        let lcores = e.readers.iter().filter_map(|&i| self.workers.get(i).map(|w| w.lcore)).collect();
        DpdkError::Stalled { lcores, waited: e.waited }
    }

    /// Waits for every worker's function to return (the stop flag set).
    /// A worker returns within one loop iteration; one that has not after
    /// [`Self::STOP_REPORT_EVERY`] is named in the log, with its lcore's
    /// state and how long ago it last completed an iteration, and again
    /// every so often, so that a stop that hangs says where.
    fn wait_workers(&self) {
        let start = Instant::now();
        let mut report_at = Self::STOP_REPORT_EVERY;
        loop {
            let running: Vec<&WorkerView> = self.workers.iter().filter(|w| w.running()).collect();
            if running.is_empty() {
                return;
            }
            if start.elapsed() >= report_at {
                for w in running {
                    tracing::warn!(
                        lcore = w.lcore,
                        waited_ms = start.elapsed().as_millis() as u64,
                        last_loop_ms = w.since_last_loop().map(|d| d.as_millis() as u64),
                        "stopping: a worker has not returned yet"
                    );
                }
                report_at += Self::STOP_REPORT_EVERY;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// How often a stop names the workers it still waits for.
    const STOP_REPORT_EVERY: Duration = Duration::from_secs(2);

    fn stop_workers(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if self.launched {
            self.wait_workers();
            // SAFETY: called from the main lcore; every worker launched
            // above has returned (waited for just before), so this only
            // collects their return values.
            unsafe { vipgate_ffi::rte_eal_mp_wait_lcore() };
            self.launched = false;
        }
        // Then the exception thread; its rings are drained and the kernel
        // interfaces closed (they disappear from the kernel).
        if let Some(mut e) = self.exception.take() {
            e.stop();
        }
        // The workers' ring handles are gone with them; what is left in the
        // rings goes back to the pool.
        if let Some(handoff) = self.handoff.take() {
            let counters: Vec<Arc<WorkerCounters>> = self.workers.iter().map(|w| Arc::clone(&w.counters)).collect();
            handoff.drain(&counters);
        }
    }

    /// Stops the workers, stops and closes every port, and reports whether
    /// every mbuf came back to the pool. Then frees the pool and cleans up
    /// EAL.
    pub fn shutdown(mut self) -> ShutdownReport {
        self.stop_workers();
        for port in self.ports.drain(..) {
            port.close();
        }
        let pool = self.pool.take().expect("pool exists until shutdown");
        let report = ShutdownReport {
            pool_size: pool.size(),
            in_use_at_start: self.in_use_at_start,
            in_use_at_end: pool.in_use(),
        };
        if let Err(shared) = Arc::try_unwrap(pool) {
            // Someone still holds the pool: leaking it is safe, freeing it
            // under their feet is not.
            tracing::warn!(pool = shared.name(), "mbuf pool still referenced at shutdown; not freeing it");
            std::mem::forget(shared);
        }
        report
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        // Also on error paths: workers first, then ports, then the pool;
        // `eal` is dropped last by field order.
        self.stop_workers();
        for port in self.ports.drain(..) {
            port.close();
        }
        if let Some(pool) = self.pool.take()
            && let Err(shared) = Arc::try_unwrap(pool)
        {
            std::mem::forget(shared);
        }
    }
}
