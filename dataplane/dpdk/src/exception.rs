//! The exception path: a kernel interface per port, and the thread that
//! moves packets between the workers and those interfaces.
//!
//! Owns: the kernel interfaces (one `net_tap` device per port that has one,
//! hot-plugged after the port started, with the port's MAC and MTU, brought
//! up by starting it; closing it removes the interface, and so does the
//! kernel when the process dies, so no stale interface survives a crash),
//! the two rings per worker (worker -> kernel, kernel -> worker) and the
//! exception thread. Must not touch the workers' queues on the physical
//! ports or their counters: a worker enqueues what its pipeline punts on its
//! ring to the kernel and transmits what it dequeues from its ring from the
//! kernel, one burst per loop iteration at most.
//!
//! Why a thread of its own: the tap device costs a system call per packet
//! (a `writev` that runs the kernel's receive path synchronously, a `readv`
//! per packet received). On the workers that would put system calls and
//! the kernel's own processing on the fast path, and a flood towards the
//! gateway's addresses would slow every flow. Here the workers only move
//! pointers through bounded SP/SC rings: a full ring to the kernel drops the
//! packet (counted as `punt_full` by the worker), and the thread takes from a
//! kernel interface only what the ring to the worker has room for (the rest
//! waits in the kernel's own queue, whose drops the kernel counts on the
//! interface). The thread runs on the control plane's CPU (it inherits the
//! main lcore's affinity), never on a worker's.

use crate::BURST;
use crate::error::{DpdkError, last_error, strerror};
use crate::handoff::Ring;
use crate::mempool::Mempool;
use crate::port::{self, Port};
use arrayvec::ArrayVec;
use std::ffi::CString;
use std::ptr::null_mut;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use vipgate_dataplane::wire::EthernetAddress;
use vipgate_ffi::rte_mbuf;

/// Entries in each ring between a worker and the exception thread (a power
/// of two; one less is usable). Bounds what a burst of punted packets can
/// queue while the kernel is slow.
pub(crate) const EXCEPTION_RING_SIZE: u32 = 1024;

/// Descriptors of a kernel interface's queue. The tap device allocates an
/// mbuf per rx descriptor up front; kernel traffic is light.
const KERNEL_DESC: u16 = 256;

/// Empty polls in a row before the exception thread sleeps.
const IDLE_POLLS_BEFORE_SLEEP: u32 = 64;

/// How long an idle exception thread sleeps between polls: the latency the
/// first packet of a quiet period gets on its way to or from the kernel.
const IDLE_SLEEP: Duration = Duration::from_micros(100);

/// One worker's rings with the exception thread.
#[derive(Debug, Clone)]
pub(crate) struct KernelRings {
    /// Punted packets, to the kernel.
    pub(crate) to_kernel: Arc<Ring>,
    /// Punted control protocols, to the kernel: served first.
    pub(crate) control: Arc<Ring>,
    /// What the kernel sent, for the worker to transmit.
    pub(crate) from_kernel: Arc<Ring>,
}

/// Most bursts taken from one worker's control ring per pass of the
/// exception thread (bounded, but far more than control traffic needs).
const CONTROL_BURSTS: usize = 4;

/// Counters of the exception thread (it is their only writer).
#[derive(Debug, Default)]
pub struct ExceptionCounters {
    /// Packets written to the kernel interfaces.
    pub kernel_tx: AtomicU64,
    /// Packets a kernel interface refused (the tap write failed); freed.
    pub kernel_tx_failed: AtomicU64,
    /// Packets read from the kernel interfaces and given to a worker.
    pub kernel_rx: AtomicU64,
    /// Packets left in the rings when the dataplane stopped; freed.
    pub dropped_at_stop: AtomicU64,
}

impl ExceptionCounters {
    fn add(c: &AtomicU64, n: u64) {
        // Single writer: a load and a store, no locked instruction.
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
}

/// One port's kernel interface.
#[derive(Debug)]
pub(crate) struct KernelPort {
    /// The interface's name in the kernel.
    pub(crate) iface: String,
    /// The physical port's DPDK id.
    pub(crate) phys_id: u16,
    /// The tap device's EAL name (for hot-unplugging it).
    vdev: String,
    /// The tap port; `None` once closed.
    port: Option<Port>,
}

impl KernelPort {
    /// Creates kernel interface `iface` for the port `name` (DPDK id
    /// `phys_id`, dense index `dense`), with its MAC and MTU, and brings it
    /// up.
    pub(crate) fn create(
        name: &str,
        dense: usize,
        phys_id: u16,
        iface: &str,
        mac: EthernetAddress,
        mtu: u16,
        pool: &Mempool,
    ) -> Result<KernelPort, DpdkError> {
        let err =
            |reason: String| DpdkError::KernelInterface { port: name.to_owned(), iface: iface.to_owned(), reason };
        let ciface = CString::new(iface).map_err(|_| DpdkError::NulInArgument(iface.to_owned()))?;
        // SAFETY: a valid C string; if_nametoindex only reads it.
        if unsafe { libc::if_nametoindex(ciface.as_ptr()) } != 0 {
            return Err(DpdkError::KernelInterfaceExists { port: name.to_owned(), iface: iface.to_owned() });
        }
        // Short: the tap driver names a mempool after it ("mp_" + name), and
        // mempool names are at most 25 bytes.
        let vdev = format!("net_tap_vgk{dense}");
        let m = mac.0;
        let args =
            format!("iface={iface},mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]);
        let (cbus, cname, cargs) = (
            CString::new("vdev").expect("no NUL"),
            CString::new(vdev.as_str()).expect("no NUL"),
            CString::new(args).map_err(|_| DpdkError::NulInArgument(iface.to_owned()))?,
        );
        // SAFETY: EAL is initialised; the strings are valid C strings; the
        // vdev bus probes the tap driver, which creates the interface.
        let rc = unsafe { vipgate_ffi::rte_eal_hotplug_add(cbus.as_ptr(), cname.as_ptr(), cargs.as_ptr()) };
        if rc != 0 {
            return Err(err(format!("probing a tap device failed: {} ({})", strerror(rc), last_error())));
        }
        let label = format!("{name} (kernel interface {iface})");
        // DPDK 22.11's tap driver takes MTU 1504 at most, and also refuses
        // to write a frame longer than its MTU's to the kernel: above that,
        // the interface stays at the driver's maximum (the kernel then
        // advertises a TCP MSS that fits, and sends frames the port carries).
        let started = port::max_mtu_of(&label, &vdev).and_then(|max| {
            let kernel_mtu = u16::try_from(max).unwrap_or(u16::MAX).min(mtu);
            if kernel_mtu < mtu {
                tracing::warn!(
                    port = name,
                    iface,
                    mtu,
                    kernel_mtu,
                    "the kernel interface's MTU is lower than its port's: the tap driver takes no more"
                );
            }
            Port::start_with(&label, &vdev, 1, kernel_mtu, pool, (KERNEL_DESC, KERNEL_DESC))
        });
        match started {
            Ok(port) => Ok(KernelPort { iface: iface.to_owned(), phys_id, vdev, port: Some(port) }),
            Err(e) => {
                unplug(&vdev);
                Err(e)
            }
        }
    }

    /// The tap port's DPDK id.
    fn id(&self) -> u16 {
        self.port.as_ref().map_or(u16::MAX, Port::id)
    }

    /// Closes the tap port (the kernel interface disappears) and unplugs the
    /// device. The exception thread must have stopped.
    pub(crate) fn close(&mut self) {
        if let Some(port) = self.port.take() {
            port.close();
            unplug(&self.vdev);
        }
    }
}

impl Drop for KernelPort {
    fn drop(&mut self) {
        self.close();
    }
}

fn unplug(vdev: &str) {
    let (cbus, cname) = (CString::new("vdev").expect("no NUL"), CString::new(vdev).expect("no NUL"));
    // SAFETY: valid C strings; removing a device whose port is closed (or
    // that failed to start) releases what the probe allocated.
    let rc = unsafe { vipgate_ffi::rte_eal_hotplug_remove(cbus.as_ptr(), cname.as_ptr()) };
    if rc != 0 {
        tracing::debug!(vdev, reason = %strerror(rc), "removing a kernel interface's device");
    }
}

/// The exception path of a running dataplane.
#[derive(Debug)]
pub(crate) struct Exception {
    kernel: Vec<KernelPort>,
    /// Per worker: its punts, to the kernel.
    to_kernel: Vec<Arc<Ring>>,
    /// Per worker: its punted control protocols, to the kernel.
    control: Vec<Arc<Ring>>,
    /// Per worker: what the kernel sends, for the worker to transmit.
    from_kernel: Vec<Arc<Ring>>,
    counters: Arc<ExceptionCounters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What the exception thread works with.
struct Shuttle {
    /// (tap port id, physical port id) per kernel interface.
    kernel: Vec<(u16, u16)>,
    /// Tap port id by physical port id (`u16::MAX`: none).
    kernel_of: Vec<u16>,
    to_kernel: Vec<Arc<Ring>>,
    control: Vec<Arc<Ring>>,
    from_kernel: Vec<Arc<Ring>>,
    counters: Arc<ExceptionCounters>,
    stop: Arc<AtomicBool>,
}

impl Exception {
    /// The exception path for `kernel` interfaces and `workers` workers:
    /// creates the rings; the thread starts with [`Exception::start`].
    pub(crate) fn create(kernel: Vec<KernelPort>, workers: usize) -> Result<Exception, DpdkError> {
        let mut to_kernel = Vec::with_capacity(workers);
        let mut control = Vec::with_capacity(workers);
        let mut from_kernel = Vec::with_capacity(workers);
        for w in 0..workers {
            to_kernel.push(Arc::new(Ring::create(&format!("vg_to_kernel_{w}"), EXCEPTION_RING_SIZE)?));
            control.push(Arc::new(Ring::create(&format!("vg_kernel_ctl_{w}"), EXCEPTION_RING_SIZE)?));
            from_kernel.push(Arc::new(Ring::create(&format!("vg_from_kernel_{w}"), EXCEPTION_RING_SIZE)?));
        }
        Ok(Exception {
            kernel,
            to_kernel,
            control,
            from_kernel,
            counters: Arc::default(),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        })
    }

    /// The kernel interfaces.
    pub(crate) fn kernel_ports(&self) -> &[KernelPort] {
        &self.kernel
    }

    /// Worker `w`'s rings.
    pub(crate) fn rings(&self, w: usize) -> KernelRings {
        KernelRings {
            to_kernel: Arc::clone(&self.to_kernel[w]),
            control: Arc::clone(&self.control[w]),
            from_kernel: Arc::clone(&self.from_kernel[w]),
        }
    }

    /// The exception thread's counters.
    pub(crate) fn counters(&self) -> &Arc<ExceptionCounters> {
        &self.counters
    }

    /// Starts the exception thread.
    pub(crate) fn start(&mut self) -> Result<(), DpdkError> {
        let max_id = self.kernel.iter().map(|k| usize::from(k.phys_id)).max().unwrap_or(0);
        let mut kernel_of = vec![u16::MAX; max_id + 1];
        for k in &self.kernel {
            kernel_of[usize::from(k.phys_id)] = k.id();
        }
        let shuttle = Shuttle {
            kernel: self.kernel.iter().map(|k| (k.id(), k.phys_id)).collect(),
            kernel_of,
            to_kernel: self.to_kernel.clone(),
            control: self.control.clone(),
            from_kernel: self.from_kernel.clone(),
            counters: Arc::clone(&self.counters),
            stop: Arc::clone(&self.stop),
        };
        let thread = std::thread::Builder::new()
            .name("vg-exception".to_owned())
            .spawn(move || {
                // It forwards packets, like a worker: the workers' nice
                // value, not the control plane's it would inherit.
                let _ = crate::sched::request_nice(0);
                shuttle.run();
            })
            .map_err(|e| DpdkError::KernelInterface {
                port: "(all)".to_owned(),
                iface: "(all)".to_owned(),
                reason: format!("cannot start the exception thread: {e}"),
            })?;
        self.thread = Some(thread);
        Ok(())
    }

    /// Stops the thread (the workers must have stopped), frees what is left
    /// in the rings, and closes the kernel interfaces.
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut buf = [null_mut::<rte_mbuf>(); BURST];
        for ring in self.to_kernel.iter().chain(&self.control).chain(&self.from_kernel) {
            loop {
                let n = ring.dequeue(&mut buf);
                if n == 0 {
                    break;
                }
                // SAFETY: the mbufs came out of the ring, which held the only
                // reference to them; nobody else uses the ring any more.
                unsafe { vipgate_ffi::rte_pktmbuf_free_bulk(buf.as_mut_ptr(), n as u32) };
                ExceptionCounters::add(&self.counters.dropped_at_stop, n as u64);
            }
        }
        for k in &mut self.kernel {
            k.close();
        }
    }
}

impl Drop for Exception {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shuttle {
    fn run(self) {
        let mut buf = [null_mut::<rte_mbuf>(); BURST];
        let mut batches: Vec<ArrayVec<*mut rte_mbuf, BURST>> = vec![ArrayVec::new(); self.kernel.len()];
        let workers = self.from_kernel.len().max(1);
        let mut idle = 0u32;
        while !self.stop.load(Ordering::Relaxed) {
            let mut work = 0usize;
            // Worker -> kernel: every worker's control protocols first (a
            // few bursts each), then one burst of the rest from each.
            let control = self.control.iter().flat_map(|r| std::iter::repeat_n(r, CONTROL_BURSTS));
            for ring in control.chain(&self.to_kernel) {
                let n = ring.dequeue(&mut buf);
                if n == 0 {
                    continue;
                }
                work += n;
                for &m in &buf[..n] {
                    // SAFETY: a valid mbuf the worker passed on; its `port`
                    // is the physical port it arrived on.
                    let phys = unsafe { (*m).port };
                    let tap = self.kernel_of.get(usize::from(phys)).copied().unwrap_or(u16::MAX);
                    match self.kernel.iter().position(|&(id, _)| id == tap) {
                        Some(k) => batches[k].push(m),
                        None => {
                            // SAFETY: ours, referenced nowhere else.
                            unsafe { vipgate_ffi::rte_pktmbuf_free(m) };
                            ExceptionCounters::add(&self.counters.kernel_tx_failed, 1);
                        }
                    }
                }
                for (k, batch) in batches.iter_mut().enumerate() {
                    if !batch.is_empty() {
                        self.send(self.kernel[k].0, batch);
                    }
                }
            }
            // Kernel -> worker: only what the worker's ring has room for;
            // the rest waits in the kernel's queue.
            for (k, &(tap, phys)) in self.kernel.iter().enumerate() {
                let ring = &self.from_kernel[k % workers];
                let room = ring.free_count().min(BURST);
                if room == 0 {
                    continue;
                }
                // SAFETY: the tap port is started with queue 0, which only
                // this thread polls; `buf` has room for `room` pointers.
                let n = unsafe { vipgate_ffi::rte_eth_rx_burst(tap, 0, buf.as_mut_ptr(), room as u16) } as usize;
                if n == 0 {
                    continue;
                }
                work += n;
                for &m in &buf[..n] {
                    // SAFETY: fresh mbufs from rx_burst, ours; the worker
                    // transmits each on the port it names.
                    unsafe { (*m).port = phys };
                }
                // The only producer: the room counted above is still there.
                let sent = ring.enqueue(&buf[..n]);
                if sent < n {
                    // SAFETY: the refused mbufs are still ours.
                    unsafe { vipgate_ffi::rte_pktmbuf_free_bulk(buf.as_mut_ptr().add(sent), (n - sent) as u32) };
                }
                ExceptionCounters::add(&self.counters.kernel_rx, sent as u64);
            }
            if work > 0 {
                idle = 0;
            } else {
                idle = idle.saturating_add(1);
                if idle >= IDLE_POLLS_BEFORE_SLEEP {
                    std::thread::sleep(IDLE_SLEEP);
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }

    /// Writes a batch to a kernel interface; frees and counts what it
    /// refuses.
    fn send(&self, tap: u16, batch: &mut ArrayVec<*mut rte_mbuf, BURST>) {
        let len = batch.len();
        // SAFETY: the tap port is started with queue 0, which only this
        // thread uses; the mbufs pass to the driver for the first `sent`.
        let sent = unsafe { vipgate_ffi::rte_eth_tx_burst(tap, 0, batch.as_mut_ptr(), len as u16) } as usize;
        ExceptionCounters::add(&self.counters.kernel_tx, sent as u64);
        if sent < len {
            // SAFETY: the unsent mbufs are still ours.
            unsafe { vipgate_ffi::rte_pktmbuf_free_bulk(batch.as_mut_ptr().add(sent), (len - sent) as u32) };
            ExceptionCounters::add(&self.counters.kernel_tx_failed, (len - sent) as u64);
        }
        batch.clear();
    }
}
