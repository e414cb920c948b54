//! The worker loop: one per worker lcore, polling its queue on every port.
//!
//! Per iteration: load the current snapshot (once; the whole iteration uses
//! it); one rx burst per port, then one burst from each hand-off ring
//! (packets other workers received for flows this worker owns); prefetch
//! the frames; hand the burst to the pipeline; free dropped mbufs in bulk;
//! one tx burst per egress port; one enqueue per hand-off ring for packets
//! whose flow another worker owns; one enqueue on the ring to the kernel
//! interfaces for packets the pipeline punts (the exception path, see
//! `exception.rs`); send any ARP requests the pipeline asked for; then one
//! burst at most from the ring of frames the kernel sent, transmitted on
//! their ports; on bond ports, every [`LACP_TICK`] at most, a
//! transmit burst of no packets, which is how DPDK's 802.3ad bond sends
//! the LACPDUs its state machine queued (see [`Worker::drive_bonds`]);
//! declare a quiescent state, after which the control plane
//! may free a snapshot it replaced; and beat its [`Heartbeat`] (one
//! store), which the control plane reads to tell a live worker from a stuck
//! one. Nothing here
//! allocates, locks, logs or makes a system call while packets flow (an
//! optional idle sleep happens only after many empty polls, and never lasts
//! longer than [`MAX_IDLE_SLEEP`], so the heartbeat advances and a stop is
//! seen at once even when idle). DPDK is
//! crossed once per burst (rx, free, tx), never per packet: prefetch hints
//! and TSC reads are CPU intrinsics, not calls into DPDK's C wrappers.

use crate::BURST;
use crate::exception::KernelRings;
use crate::handoff::Ring;
use crate::rcu::Reader;
use arrayvec::ArrayVec;
use std::ffi::c_void;
use std::ptr::null_mut;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use vipgate_dataplane::counters::{DropReason, WorkerCounters};
use vipgate_dataplane::loaded::LoadedSnapshot;
use vipgate_dataplane::pipeline::{Pipeline, PipelineConfig, Prefetch, RxPacket, Solicitation, Verdict};
use vipgate_dataplane::snapshot::Snapshot;
use vipgate_dataplane::wire::arp;
use vipgate_ffi::rte_mbuf;

/// Empty polls in a row before an idle worker sleeps (when configured).
const IDLE_POLLS_BEFORE_SLEEP: u32 = 1024;

/// The longest an idle worker sleeps at once, whatever `idle_sleep_us`
/// says: a sleeping worker must still beat its heartbeat well within the
/// control plane's one-second staleness limit, see the stop flag soon after
/// it is set, and pick up traffic before its rx ring overflows.
pub const MAX_IDLE_SLEEP: Duration = Duration::from_millis(10);

/// Housekeeping (neighbour expiry and refresh) runs this many times a second.
const HOUSEKEEPING_HZ: u64 = 10;

/// How often at most a worker makes an empty transmit burst on each bond
/// port, so that the LACPDUs the bond's state machine queues (every 100 ms,
/// on EAL's interrupt thread) leave within this much, whatever the traffic.
/// DPDK asks for rx and tx bursts on an 802.3ad bond at least every 100 ms;
/// rx bursts happen on every iteration anyway (an idle worker sleeps
/// [`MAX_IDLE_SLEEP`] at most).
pub const LACP_TICK: Duration = Duration::from_millis(10);

/// A worker's inbox (neighbours and fragment translations from the others).
pub(crate) type Inbox = Arc<vipgate_dataplane::pipeline::Inbox>;

/// What a worker is built from, on its own lcore: the pipeline's tables are
/// allocated and first touched there, so they live on the worker's NUMA
/// node.
pub(crate) struct WorkerSetup {
    pub(crate) index: usize,
    pub(crate) queue: u16,
    pub(crate) port_ids: Vec<u16>,
    /// DPDK port ids of the bond ports (802.3ad).
    pub(crate) bond_ids: Vec<u16>,
    pub(crate) pipeline: PipelineConfig,
    pub(crate) counters: Arc<WorkerCounters>,
    pub(crate) stats: Arc<vipgate_dataplane::stats::BackendStats>,
    pub(crate) inboxes: Vec<Inbox>,
    /// This worker's reader of the published snapshot (offline until the
    /// loop starts).
    pub(crate) snapshot: Reader<Snapshot>,
    /// Where this worker says which snapshot it last loaded.
    pub(crate) loaded: Arc<LoadedSnapshot>,
    /// Where this worker says it completed another loop iteration.
    pub(crate) heartbeat: Arc<Heartbeat>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) pool: *mut vipgate_ffi::rte_mempool,
    pub(crate) idle_sleep_us: u32,
    pub(crate) tsc_hz: u64,
    /// Number of workers.
    pub(crate) workers: usize,
    /// Rings to the other workers, by destination (`None` for this one).
    pub(crate) outbound: Vec<Option<Arc<Ring>>>,
    /// Rings from the other workers.
    pub(crate) inbound: Vec<Arc<Ring>>,
    /// By dense port index: whether the port has a kernel interface.
    pub(crate) kernel_ports: Vec<bool>,
    /// The exception path's rings (to the kernel, from the kernel), when
    /// any port has a kernel interface.
    pub(crate) exception: Option<KernelRings>,
}

// SAFETY: the set-up is handed to exactly one lcore; the mempool pointer
// refers to a pool usable from any lcore that outlives every worker.
unsafe impl Send for WorkerSetup {}

impl WorkerSetup {
    /// The worker, and apart from it the snapshot reader its loop passes
    /// around (a reference from the reader must not borrow the worker).
    fn build(self) -> (Worker, Reader<Snapshot>) {
        let mut pipeline = Pipeline::with_stats(self.pipeline, self.counters, self.stats);
        pipeline.join_workers(&self.inboxes, self.index);
        pipeline.set_worker(self.index, self.workers);
        if self.exception.is_some() {
            pipeline.set_kernel_ports(&self.kernel_ports);
        }
        // DPDK port id -> dense index, for packets handed over by another
        // worker (they carry the port they arrived on in `mbuf.port`).
        let max_id = self.port_ids.iter().copied().max().map_or(0, usize::from);
        let mut dense_of = vec![u16::MAX; max_id + 1];
        for (dense, &id) in self.port_ids.iter().enumerate() {
            dense_of[usize::from(id)] = dense as u16;
        }
        let regions: Vec<(usize, usize)> = pipeline.flow_memory().into_iter().collect();
        for &(addr, len) in &regions {
            advise_huge_pages(addr, len);
        }
        let collapse = start_collapse(self.index, regions, Arc::clone(&self.stop));
        let worker = Worker {
            queue: self.queue,
            port_ids: self.port_ids,
            bond_ids: self.bond_ids,
            pipeline,
            loaded: self.loaded,
            heartbeat: self.heartbeat,
            stop: self.stop,
            pool: self.pool,
            idle_sleep: Duration::from_micros(u64::from(self.idle_sleep_us)).min(MAX_IDLE_SLEEP),
            tsc_hz: self.tsc_hz,
            outbound: self.outbound,
            inbound: self.inbound,
            dense_of,
            exception: self.exception,
            collapse,
        };
        (worker, self.snapshot)
    }
}

/// A transparent huge page.
const HUGE: usize = 2 << 20;

/// The whole 2 MiB pages inside `len` bytes at `addr` (only those can be
/// huge), as a start and an end.
fn huge_span(addr: usize, len: usize) -> Option<(usize, usize)> {
    let start = addr.next_multiple_of(HUGE);
    let end = (addr + len) / HUGE * HUGE;
    (end > start).then_some((start, end))
}

/// Asks the kernel to back `len` bytes at `addr` with transparent huge
/// pages, so that lookups spread over a large flow table do not miss the
/// TLB on every packet. Cheap: it marks the range, and khugepaged (or
/// [`start_collapse`]) converts the pages already there. Advice only: if
/// the kernel declines (THP disabled) nothing changes but speed.
fn advise_huge_pages(addr: usize, len: usize) {
    let Some((start, end)) = huge_span(addr, len) else { return };
    // SAFETY: [start, end) lies inside an allocation this thread owns (the
    // flow table's boxed slices, alive for the worker's life);
    // MADV_HUGEPAGE changes how it is backed, never its contents.
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
}

/// Converts the pages already in `regions` (the worker's flow table,
/// written when it was built) into huge pages now (`MADV_COLLAPSE`, Linux
/// 6.1+) rather than whenever khugepaged gets to them, on a thread of its
/// own, one 2 MiB page at a time. A collapse is synchronous and may
/// compact memory first: on a busy host one took more than 20 s, which on
/// the worker itself held its first poll, and its stop, that long. The
/// thread stops between two pages once `stop` is set, and the worker joins
/// it before its table is freed. It runs on any CPU, not the worker's.
/// `None` if the thread could not be started (speed only is lost).
fn start_collapse(index: usize, regions: Vec<(usize, usize)>, stop: Arc<AtomicBool>) -> Option<JoinHandle<()>> {
    let spans: Vec<(usize, usize)> = regions.into_iter().filter_map(|(a, l)| huge_span(a, l)).collect();
    if spans.is_empty() {
        return None;
    }
    std::thread::Builder::new()
        .name(format!("vg-thp-{index}"))
        .spawn(move || {
            crate::sched::unpin_current_thread();
            for (start, end) in spans {
                for page in (start..end).step_by(HUGE) {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    // SAFETY: the page lies inside the worker's flow table,
                    // which the worker frees only after joining this thread;
                    // MADV_COLLAPSE changes how memory is backed, never its
                    // contents, so the worker may read and write it
                    // meanwhile.
                    unsafe { libc::madvise(page as *mut libc::c_void, HUGE, libc::MADV_COLLAPSE) };
                }
            }
        })
        .ok()
}

/// Everything one worker owns, on its lcore.
pub(crate) struct Worker {
    /// Queue id this worker polls (rx) and sends on (tx), on every port.
    pub(crate) queue: u16,
    /// DPDK port ids, indexed by dense port index.
    pub(crate) port_ids: Vec<u16>,
    /// DPDK port ids of the bond ports, driven every [`LACP_TICK`].
    bond_ids: Vec<u16>,
    pipeline: Pipeline,
    loaded: Arc<LoadedSnapshot>,
    heartbeat: Arc<Heartbeat>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) pool: *mut vipgate_ffi::rte_mempool,
    /// How long to sleep after an empty poll once idle (zero: never);
    /// `idle_sleep_us` capped at [`MAX_IDLE_SLEEP`].
    idle_sleep: Duration,
    pub(crate) tsc_hz: u64,
    outbound: Vec<Option<Arc<Ring>>>,
    inbound: Vec<Arc<Ring>>,
    /// Dense port index by DPDK port id (`u16::MAX`: not ours).
    dense_of: Vec<u16>,
    /// Rings to and from the exception thread.
    exception: Option<KernelRings>,
    /// The thread converting the flow table to huge pages
    /// ([`start_collapse`]), joined when the loop ends.
    collapse: Option<JoinHandle<()>>,
}

/// When a worker last completed an iteration of its loop, as the TSC read
/// at that iteration's start; before its first, when it was launched (0:
/// not launched). A worker that takes over a second to build its tables
/// and start polling is thus as late as one stuck in its loop. Written by its worker only, once
/// per iteration, busy or idle; read by the control plane, which calls a
/// worker whose heartbeat is older than a second stuck. On a cache line of
/// its own, so that the store does not share a line the control plane reads
/// with the counters the worker updates per burst.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct Heartbeat(AtomicU64);

impl Heartbeat {
    /// Records an iteration that started at TSC `tsc` (or, at launch, the
    /// time from which the worker's first iteration is awaited).
    #[inline(always)]
    pub(crate) fn beat(&self, tsc: u64) {
        self.0.store(tsc, Ordering::Relaxed);
    }

    /// How long before TSC `now` the last recorded iteration started, at
    /// `hz` TSC ticks a second; `None` if the worker never completed one.
    /// A beat that reads as later than `now` (another core's TSC a few
    /// ticks ahead) is no time ago.
    pub(crate) fn age(&self, now: u64, hz: u64) -> Option<Duration> {
        let last = self.0.load(Ordering::Relaxed);
        (last != 0).then(|| ticks(now.saturating_sub(last), hz))
    }
}

/// `ticks` TSC ticks at `hz` ticks a second.
fn ticks(ticks: u64, hz: u64) -> Duration {
    let hz = hz.max(1);
    let nanos = u128::from(ticks % hz) * 1_000_000_000 / u128::from(hz);
    Duration::new(ticks / hz, nanos as u32)
}

/// Per-destination batches of packets to hand to other workers.
type HandoffBatches = Vec<ArrayVec<*mut rte_mbuf, BURST>>;

/// Packets for the kernel: (others, control protocols).
type PuntBatches = (ArrayVec<*mut rte_mbuf, BURST>, ArrayVec<*mut rte_mbuf, BURST>);

/// Converts TSC ticks to nanoseconds with a multiply and a shift.
struct Clock {
    origin: u64,
    mult: u128,
}

impl Clock {
    fn new(hz: u64) -> Clock {
        let origin = rdtsc();
        Clock { origin, mult: (1_000_000_000u128 << 32) / u128::from(hz.max(1)) }
    }

    #[inline(always)]
    fn ns(&self, tsc: u64) -> u64 {
        ((u128::from(tsc.wrapping_sub(self.origin)) * self.mult) >> 32) as u64
    }
}

#[inline(always)]
pub(crate) fn rdtsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC exists on every x86-64 CPU and has no preconditions.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // SAFETY: reading the timer has no preconditions.
        unsafe { vipgate_ffi::rte_rdtsc() }
    }
}

/// The pipeline's prefetch hints, issued as CPU prefetch instructions.
struct CpuPrefetch;

impl Prefetch for CpuPrefetch {
    #[inline(always)]
    fn prefetch(&self, addr: usize) {
        prefetch(addr as *const u8);
    }
}

/// Hints the CPU to fetch the cache line at `p` into all cache levels.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: a prefetch is a hint: it never faults, whatever `p` is, and
        // SSE (PREFETCHT0) is part of the x86-64 baseline.
        unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The address of an mbuf's first data byte.
///
/// # Safety
/// `m` must point to a valid mbuf.
#[inline(always)]
unsafe fn mtod(m: *mut rte_mbuf) -> *mut u8 {
    // SAFETY: the caller guarantees `m` is valid; buf_addr + data_off is
    // inside the mbuf's buffer by DPDK's invariants.
    unsafe { ((*m).buf_addr as *mut u8).add(usize::from((*m).data_off)) }
}

/// lcore entry point given to `rte_eal_remote_launch`.
///
/// # Safety
/// `arg` must come from `Box::into_raw(Box<WorkerSetup>)` and be passed
/// exactly once.
pub(crate) unsafe extern "C" fn worker_main(arg: *mut c_void) -> i32 {
    // SAFETY: per this function's contract, `arg` is a leaked
    // Box<WorkerSetup> that nobody else owns; it is reclaimed here.
    let setup = unsafe { Box::from_raw(arg as *mut WorkerSetup) };
    let (mut worker, mut snapshot) = setup.build();
    worker.run(&mut snapshot);
    // The collapse thread reads the flow table's addresses: it ends (within
    // one page, the stop flag being set) before the table is freed.
    if let Some(t) = worker.collapse.take() {
        let _ = t.join();
    }
    // Dropping the reader takes it offline: publications stop waiting for
    // this worker.
    0
}

impl Worker {
    /// Polls until the stop flag is set. `snapshot` is loaded once per
    /// iteration and declared quiescent at the end of each; it is offline
    /// while the worker sleeps.
    fn run(&mut self, snapshot: &mut Reader<Snapshot>) {
        let nports = self.port_ids.len();
        let mut rx: [*mut rte_mbuf; BURST] = [null_mut(); BURST];
        let mut tx: Vec<ArrayVec<*mut rte_mbuf, BURST>> = vec![ArrayVec::new(); nports];
        let mut handoff: HandoffBatches = vec![ArrayVec::new(); self.outbound.len()];
        let mut punt: PuntBatches = (ArrayVec::new(), ArrayVec::new());
        let mut verdicts = [Verdict::Consumed; BURST];
        let clock = Clock::new(self.tsc_hz);
        let housekeeping_every = (self.tsc_hz / HOUSEKEEPING_HZ).max(1);
        let mut next_housekeeping = 0u64;
        let lacp_every = ((u128::from(self.tsc_hz) * LACP_TICK.as_nanos() / 1_000_000_000) as u64).max(1);
        let mut next_lacp = 0u64;
        let mut idle_polls = 0u32;
        let counters = Arc::clone(self.pipeline.counters());
        let mut loaded_generation = 0;

        snapshot.online();
        self.loaded.set_idle(false);
        while !self.stop.load(Ordering::Relaxed) {
            let start = rdtsc();
            // Valid until `quiescent` below; the borrow checker holds us to it.
            let snap = snapshot.load();
            if snap.generation() != loaded_generation {
                // Once per publication: the control plane polls this to
                // know the change is in force here.
                loaded_generation = snap.generation();
                self.loaded.record(snap.version(), loaded_generation, monotonic_ns());
            }
            if start >= next_housekeeping {
                self.pipeline.housekeeping(snap, clock.ns(start));
                self.send_solicitations(&counters);
                self.send_released(&counters);
                next_housekeeping = start + housekeeping_every;
            }
            if !self.bond_ids.is_empty() && start >= next_lacp {
                self.drive_bonds();
                next_lacp = start + lacp_every;
            }
            let mut received = 0usize;
            for dense in 0..nports {
                // SAFETY: the port is started with `self.queue` configured;
                // only this worker polls this queue; `rx` has BURST slots.
                let n = unsafe {
                    vipgate_ffi::rte_eth_rx_burst(self.port_ids[dense], self.queue, rx.as_mut_ptr(), BURST as u16)
                } as usize;
                if n == 0 {
                    continue;
                }
                received += n;
                let n = drop_chained(&mut rx[..n], &counters);
                if n == 0 {
                    continue;
                }
                self.burst(
                    snap,
                    Some(dense as u16),
                    &rx[..n],
                    clock.ns(start),
                    &mut verdicts,
                    &mut tx,
                    &mut handoff,
                    &mut punt,
                    &counters,
                );
            }
            for r in 0..self.inbound.len() {
                let n = self.inbound[r].dequeue(&mut rx);
                if n == 0 {
                    continue;
                }
                received += n;
                self.burst(
                    snap,
                    None,
                    &rx[..n],
                    clock.ns(start),
                    &mut verdicts,
                    &mut tx,
                    &mut handoff,
                    &mut punt,
                    &counters,
                );
            }
            // What the kernel sent: one burst at most per iteration, so the
            // kernel can never take the fast path's time.
            received += self.transmit_from_kernel(&mut rx, &mut tx, &counters);
            if received > 0 {
                counters.busy_polls.inc();
                counters.busy_cycles.add(rdtsc().wrapping_sub(start));
                idle_polls = 0;
            } else {
                idle_polls = idle_polls.saturating_add(1);
                if !self.idle_sleep.is_zero() && idle_polls >= IDLE_POLLS_BEFORE_SLEEP {
                    // Asleep, the worker holds no snapshot: publications
                    // do not wait for it.
                    snapshot.offline();
                    self.loaded.set_idle(true);
                    std::thread::sleep(self.idle_sleep);
                    self.loaded.set_idle(false);
                    snapshot.online();
                } else {
                    std::hint::spin_loop();
                }
            }
            snapshot.quiescent();
            // Once per iteration, busy or asleep: the control plane's sign
            // of life.
            self.heartbeat.beat(start);
        }
        snapshot.offline();
        self.loaded.set_idle(true);
    }

    /// Processes one burst: from the rx queue of port `ingress`, or (`None`)
    /// handed over by other workers, each carrying its ingress port id.
    /// The snapshot comes from the loop's reader, which must not be borrowed
    /// through `self`.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn burst(
        &mut self,
        snapshot: &Snapshot,
        ingress: Option<u16>,
        mbufs: &[*mut rte_mbuf],
        now: u64,
        verdicts: &mut [Verdict; BURST],
        tx: &mut [ArrayVec<*mut rte_mbuf, BURST>],
        handoff: &mut HandoffBatches,
        punt: &mut PuntBatches,
        counters: &WorkerCounters,
    ) {
        let n = mbufs.len();
        for &m in mbufs {
            // SAFETY: `m` came from rx_burst or a hand-off ring and is a
            // valid mbuf.
            prefetch(unsafe { mtod(m) });
        }
        let mut bytes = 0u64;
        let mut headroom = [0u16; BURST];
        let mut packets: ArrayVec<RxPacket<'_>, BURST> = ArrayVec::new();
        for (i, &m) in mbufs.iter().enumerate() {
            // SAFETY: `m` is a valid mbuf this worker owns exclusively from
            // rx_burst (or the ring) until it is sent, handed on or freed
            // below. Its buffer holds `data_off` bytes of headroom, which
            // belong to it, then `data_len` initialised bytes of its first
            // segment. No other slice aliases it: every mbuf in a burst is
            // distinct, and the slices die (with `packets`) before the mbufs
            // are handed back.
            let (port, buf) = unsafe {
                bytes += u64::from((*m).pkt_len);
                headroom[i] = (*m).data_off;
                let port = match ingress {
                    Some(p) => p,
                    None => self.dense_of.get(usize::from((*m).port)).copied().unwrap_or(u16::MAX),
                };
                let len = usize::from((*m).data_off) + usize::from((*m).data_len);
                (port, std::slice::from_raw_parts_mut((*m).buf_addr as *mut u8, len))
            };
            packets.push(RxPacket::with_headroom(port, buf, usize::from(headroom[i])));
        }
        if ingress.is_some() {
            counters.rx_packets.add(n as u64);
            counters.rx_bytes.add(bytes);
            self.pipeline.process_with(snapshot, now, &mut packets, &mut verdicts[..n], &CpuPrefetch);
        } else {
            counters.handoff_in.add(n as u64);
            self.pipeline.process_handed_over(snapshot, now, &mut packets, &mut verdicts[..n], &CpuPrefetch);
        }
        // Where each frame starts and how long it is now: the pipeline may
        // have prepended a header into the headroom (DSR) or shortened the
        // frame (an answer built in place).
        let mut span = [(0u16, 0u16); BURST];
        for (s, p) in span.iter_mut().zip(packets.iter()) {
            *s = (p.headroom() as u16, p.frame().len() as u16);
        }
        drop(packets);

        let mut free: ArrayVec<*mut rte_mbuf, BURST> = ArrayVec::new();
        for (i, (&m, v)) in mbufs.iter().zip(verdicts.iter()).enumerate() {
            match *v {
                Verdict::Transmit(p) if usize::from(p) < tx.len() => {
                    let (off, len) = span[i];
                    // SAFETY: `m` is ours; the pipeline's frame lies inside
                    // its buffer (headroom and first segment), at `off` for
                    // `len` bytes, all initialised.
                    unsafe {
                        if off != headroom[i] || len != (*m).data_len {
                            (*m).data_off = off;
                            (*m).data_len = len;
                            (*m).pkt_len = u32::from(len);
                        }
                    }
                    tx[usize::from(p)].push(m);
                }
                Verdict::Handoff(w) if self.outbound.get(usize::from(w)).is_some_and(Option::is_some) => {
                    handoff[usize::from(w)].push(m);
                }
                Verdict::Punt(p) | Verdict::PuntControl(p)
                    if self.exception.is_some() && usize::from(p) < self.port_ids.len() =>
                {
                    // SAFETY: `m` is ours; the exception thread writes it to
                    // the kernel interface of the port it names.
                    unsafe { (*m).port = self.port_ids[usize::from(p)] };
                    if matches!(*v, Verdict::PuntControl(_)) { punt.1.push(m) } else { punt.0.push(m) }
                }
                Verdict::Punt(_) | Verdict::PuntControl(_) => {
                    // No exception path: never expected (the pipeline punts
                    // only on ports the driver named).
                    counters.count_drop(DropReason::PuntFull);
                    free.push(m);
                }
                Verdict::Handoff(_) => {
                    // An owner that does not exist: never expected.
                    counters.count_drop(DropReason::Handoff);
                    free.push(m);
                }
                Verdict::Transmit(_) => {
                    // A port the snapshot names but this worker does not
                    // drive: a configuration bug, never expected.
                    counters.count_drop(DropReason::NoRoute);
                    free.push(m);
                }
                Verdict::Drop(_) | Verdict::Consumed => free.push(m),
            }
        }
        if !free.is_empty() {
            // SAFETY: every pointer is a valid mbuf owned by this worker and
            // not referenced anywhere else.
            unsafe { vipgate_ffi::rte_pktmbuf_free_bulk(free.as_mut_ptr(), free.len() as u32) };
        }
        for (dense, queue) in tx.iter_mut().enumerate() {
            if !queue.is_empty() {
                self.flush(dense, queue, counters);
            }
        }
        for (w, batch) in handoff.iter_mut().enumerate() {
            if !batch.is_empty() {
                self.hand_off(w, batch, counters);
            }
        }
        if !punt.1.is_empty() {
            self.punt(&mut punt.1, true, counters);
        }
        if !punt.0.is_empty() {
            self.punt(&mut punt.0, false, counters);
        }
        self.send_solicitations(counters);
        self.send_released(counters);
    }

    /// Passes punted packets to the exception thread, on the control ring
    /// when `control`; frees and counts what the ring refuses
    /// (`punt_full`): the fast path never waits for the kernel.
    #[inline]
    fn punt(&self, batch: &mut ArrayVec<*mut rte_mbuf, BURST>, control: bool, counters: &WorkerCounters) {
        let Some(rings) = &self.exception else { return };
        let ring = if control { &rings.control } else { &rings.to_kernel };
        // SAFETY: valid mbufs owned by this worker until enqueued.
        let lens: ArrayVec<u32, BURST> = batch.iter().map(|&m| unsafe { (*m).pkt_len }).collect();
        let sent = ring.enqueue(batch);
        counters.to_kernel.add(sent as u64);
        counters.to_kernel_bytes.add(lens[..sent].iter().map(|&l| u64::from(l)).sum());
        if control {
            counters.to_kernel_control.add(sent as u64);
        }
        if sent < batch.len() {
            // SAFETY: the mbufs the ring refused are still ours.
            unsafe { vipgate_ffi::rte_pktmbuf_free_bulk(batch.as_mut_ptr().add(sent), (batch.len() - sent) as u32) };
            counters.drops[DropReason::PuntFull as usize].add((batch.len() - sent) as u64);
        }
        batch.clear();
    }

    /// Takes one burst of frames the kernel sent out of its interfaces and
    /// transmits each on its port (the exception thread set `mbuf.port`).
    /// Returns how many it took.
    #[inline]
    fn transmit_from_kernel(
        &self,
        rx: &mut [*mut rte_mbuf; BURST],
        tx: &mut [ArrayVec<*mut rte_mbuf, BURST>],
        counters: &WorkerCounters,
    ) -> usize {
        let Some(rings) = &self.exception else { return 0 };
        let n = rings.from_kernel.dequeue(rx);
        if n == 0 {
            return 0;
        }
        let mut bytes = 0u64;
        let mut free: ArrayVec<*mut rte_mbuf, BURST> = ArrayVec::new();
        for &m in &rx[..n] {
            // SAFETY: a valid mbuf the exception thread passed on, ours now.
            let (port, len) = unsafe { ((*m).port, (*m).pkt_len) };
            bytes += u64::from(len);
            match self.dense_of.get(usize::from(port)).copied().filter(|&d| usize::from(d) < tx.len()) {
                Some(dense) => tx[usize::from(dense)].push(m),
                None => {
                    counters.count_drop(DropReason::NoRoute);
                    free.push(m);
                }
            }
        }
        counters.from_kernel.add(n as u64);
        counters.from_kernel_bytes.add(bytes);
        if !free.is_empty() {
            // SAFETY: ours, referenced nowhere else.
            unsafe { vipgate_ffi::rte_pktmbuf_free_bulk(free.as_mut_ptr(), free.len() as u32) };
        }
        for (dense, queue) in tx.iter_mut().enumerate() {
            if !queue.is_empty() {
                self.flush(dense, queue, counters);
            }
        }
        n
    }

    /// Passes a batch to worker `w`'s ring; frees and counts what does not
    /// fit.
    #[inline]
    fn hand_off(&self, w: usize, batch: &mut ArrayVec<*mut rte_mbuf, BURST>, counters: &WorkerCounters) {
        let Some(Some(ring)) = self.outbound.get(w) else { return };
        let sent = ring.enqueue(batch);
        counters.handoff_out.add(sent as u64);
        if sent < batch.len() {
            // SAFETY: the mbufs the ring refused are still ours.
            unsafe { vipgate_ffi::rte_pktmbuf_free_bulk(batch.as_mut_ptr().add(sent), (batch.len() - sent) as u32) };
            counters.drops[DropReason::Handoff as usize].add((batch.len() - sent) as u64);
        }
        batch.clear();
    }

    /// Sends a port's pending frames; frees and counts what the queue refuses.
    #[inline]
    fn flush(&self, dense: usize, queue: &mut ArrayVec<*mut rte_mbuf, BURST>, counters: &WorkerCounters) {
        let len = queue.len();
        // SAFETY: valid mbufs owned by this worker; read before handing them
        // to the driver, which may free them as soon as they are sent.
        let lens: ArrayVec<u32, BURST> = queue.iter().map(|&m| unsafe { (*m).pkt_len }).collect();
        // SAFETY: the port is started; `self.queue` is this worker's tx queue;
        // the pointers are valid mbufs whose ownership passes to the driver
        // for the first `sent` of them.
        let sent =
            unsafe { vipgate_ffi::rte_eth_tx_burst(self.port_ids[dense], self.queue, queue.as_mut_ptr(), len as u16) }
                as usize;
        counters.tx_packets.add(sent as u64);
        counters.tx_bytes.add(lens[..sent].iter().map(|&l| u64::from(l)).sum());
        if sent < len {
            // SAFETY: the unsent mbufs are still ours.
            unsafe { vipgate_ffi::rte_pktmbuf_free_bulk(queue.as_mut_ptr().add(sent), (len - sent) as u32) };
            counters.drops[DropReason::TxFull as usize].add((len - sent) as u64);
        }
        queue.clear();
    }

    /// Makes a transmit burst of no packets on each bond port. DPDK's
    /// 802.3ad bond sends the LACPDUs (and marker responses) its state
    /// machine queued for a member from inside its tx burst, before it
    /// looks at the packets it was given: a worker with nothing to send
    /// there must still call it, or the partner times the members out
    /// (3 s at the fast rate) and stops sending on them. The bond's queues
    /// of LACPDUs are multi-consumer, so every worker may do it, each on
    /// its own tx queue: no worker is the only one that keeps LACP alive.
    /// A few loads when nothing is queued, every [`LACP_TICK`].
    fn drive_bonds(&self) {
        let mut none: [*mut rte_mbuf; 1] = [null_mut()];
        for &id in &self.bond_ids {
            // SAFETY: the bond is started with `self.queue` configured;
            // only this worker sends on this queue; a burst of 0 packets
            // hands the driver nothing.
            unsafe { vipgate_ffi::rte_eth_tx_burst(id, self.queue, none.as_mut_ptr(), 0) };
        }
    }

    /// Builds and sends the ARP requests the pipeline asked for. Rare: at
    /// most once per second per unresolved neighbour.
    fn send_solicitations(&mut self, counters: &WorkerCounters) {
        let (pool, queue, port_ids) = (self.pool, self.queue, &self.port_ids);
        for s in self.pipeline.take_solicitations() {
            if let Some(&port_id) = port_ids.get(usize::from(s.port)) {
                send_arp_request(pool, port_id, queue, &s, counters);
            }
        }
    }
}

impl Worker {
    /// Sends the fragments that waited for their first and are now
    /// translated (rare: only fragments that overtook their first wait).
    fn send_released(&mut self, counters: &WorkerCounters) {
        let (pool, queue, port_ids) = (self.pool, self.queue, &self.port_ids);
        self.pipeline.drain_released(|out, frame| match port_ids.get(usize::from(out)) {
            Some(&port_id) => send_copy(pool, port_id, queue, frame, counters),
            None => counters.count_drop(DropReason::NoRoute),
        });
    }
}

/// Sends a copy of `frame` on `port_id`; counts it sent, or dropped as
/// `tx_full` when no mbuf or no queue slot is free.
fn send_copy(pool: *mut vipgate_ffi::rte_mempool, port_id: u16, queue: u16, frame: &[u8], counters: &WorkerCounters) {
    // SAFETY: the pool is alive for the worker's lifetime.
    let m = unsafe { vipgate_ffi::rte_pktmbuf_alloc(pool) };
    if m.is_null() {
        counters.count_drop(DropReason::TxFull);
        return;
    }
    // SAFETY: `m` is a freshly allocated mbuf we own; its buffer has
    // buf_len - data_off bytes of room after the data offset.
    let room = unsafe { std::slice::from_raw_parts_mut(mtod(m), usize::from((*m).buf_len - (*m).data_off)) };
    if frame.len() > room.len() {
        // SAFETY: `m` is ours and unsent.
        unsafe { vipgate_ffi::rte_pktmbuf_free(m) };
        counters.count_drop(DropReason::TooBig);
        return;
    }
    room[..frame.len()].copy_from_slice(frame);
    let mut one = [m];
    // SAFETY: `m` is ours; lengths describe the bytes just written; the
    // port is started and `queue` is this worker's tx queue.
    let sent = unsafe {
        (*m).data_len = frame.len() as u16;
        (*m).pkt_len = frame.len() as u32;
        vipgate_ffi::rte_eth_tx_burst(port_id, queue, one.as_mut_ptr(), 1)
    };
    if sent == 1 {
        counters.tx_packets.inc();
        counters.tx_bytes.add(frame.len() as u64);
    } else {
        // SAFETY: not accepted by the driver, still ours.
        unsafe { vipgate_ffi::rte_pktmbuf_free(m) };
        counters.count_drop(DropReason::TxFull);
    }
}

/// Frees and counts (as received, then dropped as `multi_segment`) the
/// frames of a received burst that came in a chain of mbufs: the pipeline
/// reads a frame's first segment only, and would take the rest for a
/// truncated frame. Keeps the others, in order, at the front of `rx`;
/// returns how many. One load per frame (the mbuf's first cache line, which
/// the driver just wrote); never expected to find one, as the pool's mbufs
/// hold the largest port's frames and no port scatters.
#[inline]
fn drop_chained(rx: &mut [*mut rte_mbuf], counters: &WorkerCounters) -> usize {
    let mut kept = 0;
    let mut chained: ArrayVec<*mut rte_mbuf, BURST> = ArrayVec::new();
    let mut bytes = 0u64;
    for i in 0..rx.len() {
        let m = rx[i];
        // SAFETY: a valid mbuf from rx_burst, owned by this worker.
        let (segs, len) = unsafe { ((*m).nb_segs, (*m).pkt_len) };
        if segs > 1 {
            bytes += u64::from(len);
            chained.push(m);
        } else {
            rx[kept] = m;
            kept += 1;
        }
    }
    if !chained.is_empty() {
        let n = chained.len() as u64;
        counters.rx_packets.add(n);
        counters.rx_bytes.add(bytes);
        counters.drops[DropReason::MultiSegment as usize].add(n);
        // SAFETY: ours, referenced nowhere else; freeing an mbuf frees its
        // whole chain.
        unsafe { vipgate_ffi::rte_pktmbuf_free_bulk(chained.as_mut_ptr(), chained.len() as u32) };
    }
    kept
}

fn send_arp_request(
    pool: *mut vipgate_ffi::rte_mempool,
    port_id: u16,
    queue: u16,
    s: &Solicitation,
    counters: &WorkerCounters,
) {
    // SAFETY: the pool is alive for the worker's lifetime.
    let m = unsafe { vipgate_ffi::rte_pktmbuf_alloc(pool) };
    if m.is_null() {
        // Pool exhausted: the neighbour table asks again after its
        // retransmit interval.
        return;
    }
    // SAFETY: `m` is a freshly allocated mbuf we own; its buffer has
    // buf_len - data_off bytes of room after the data offset.
    let room = unsafe { std::slice::from_raw_parts_mut(mtod(m), usize::from((*m).buf_len - (*m).data_off)) };
    let Some(len) = arp::emit_request_frame_on(room, s.sender_mac, s.sender_ip, s.target_ip, s.vlan) else {
        // SAFETY: `m` is ours and unsent.
        unsafe { vipgate_ffi::rte_pktmbuf_free(m) };
        return;
    };
    let mut one = [m];
    // SAFETY: `m` is ours; lengths describe the bytes just written; the
    // port is started and `queue` is this worker's tx queue.
    let sent = unsafe {
        (*m).data_len = len as u16;
        (*m).pkt_len = len as u32;
        vipgate_ffi::rte_eth_tx_burst(port_id, queue, one.as_mut_ptr(), 1)
    };
    // Counted when built, so that rx + arp_requests = tx + drops + consumed
    // holds whether or not the queue takes it.
    counters.arp_requests.inc();
    if sent == 1 {
        counters.tx_packets.inc();
        counters.tx_bytes.add(len as u64);
    } else {
        // SAFETY: not accepted by the driver, still ours.
        unsafe { vipgate_ffi::rte_pktmbuf_free(m) };
        counters.count_drop(DropReason::TxFull);
    }
}

/// The host's `CLOCK_MONOTONIC` in nanoseconds. Read once per publication
/// (never per packet): the vDSO answers it without entering the kernel.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_ages_with_the_tsc() {
        let hz = 2_000_000_000;
        let h = Heartbeat::default();
        assert_eq!(h.age(5 * hz, hz), None, "no iteration completed yet");
        h.beat(3 * hz);
        assert_eq!(h.age(3 * hz, hz), Some(Duration::ZERO));
        assert_eq!(h.age(3 * hz + hz / 2, hz), Some(Duration::from_millis(500)));
        assert_eq!(h.age(3 * hz + 2 * hz, hz), Some(Duration::from_secs(2)));
        // Another core's TSC slightly behind the worker's.
        assert_eq!(h.age(3 * hz - 10, hz), Some(Duration::ZERO));
        assert_eq!(h.age(u64::MAX, 1), Some(Duration::from_secs(u64::MAX - 3 * hz)));
    }

    #[test]
    fn a_heartbeat_has_a_cache_line_of_its_own() {
        assert_eq!(std::mem::align_of::<Heartbeat>(), 64);
    }
}
