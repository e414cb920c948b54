//! What the API reads from the running gateway.
//!
//! The daemon implements [`GatewayView`]; the API server only calls it. The
//! view types are plain Rust values with no DPDK types, so the server and its
//! tests need no EAL: the daemon copies DPDK's numbers into them.

use std::sync::Arc;

use vipgate_dataplane::counters::WorkerCounters;
use vipgate_dataplane::loaded::LoadedSnapshot;

/// The gateway as the API sees it.
///
/// The server calls these methods from its request handlers, on the tokio
/// runtime's thread (on vipgated, the DPDK main lcore). They must return
/// quickly and must not block: read counters and device statistics, never
/// wait for a worker.
pub trait GatewayView: Send + Sync + 'static {
    /// The dataplane workers, in lcore order.
    fn workers(&self) -> Vec<WorkerView>;
    /// The ports with their current statistics, in port id order.
    fn ports(&self) -> Vec<PortView>;
    /// The packet buffer pool and its current occupancy.
    fn mempool(&self) -> MempoolView;
    /// Whether the gateway's workers run (whether they make progress is
    /// read from [`WorkerView::since_last_loop`]).
    fn serving(&self) -> bool;
    /// Per-service and per-backend traffic and flows, of every service or
    /// only of the one named. None by default (a view without services).
    fn service_stats(&self, only: Option<&str>) -> Vec<crate::stats::ServiceFigures> {
        let _ = only;
        Vec::new()
    }

    /// The checked backends' health and probe counts; `None` (the default)
    /// when the gateway runs no health checker.
    fn health(&self) -> Option<Arc<crate::health::HealthStatus>> {
        None
    }

    /// The route announcer's state (`None` where there is none, as in
    /// tests of the API alone).
    fn announce(&self) -> Option<crate::announce::AnnounceStatus> {
        None
    }

    /// The exception thread's counters, when any port has a kernel
    /// interface.
    fn exception(&self) -> Option<ExceptionView> {
        None
    }
}

/// The exception thread's counters: what it moved between the workers and
/// the ports' kernel interfaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExceptionView {
    /// Packets written to the kernel interfaces.
    pub kernel_tx: u64,
    /// Packets a kernel interface refused (the tap write failed).
    pub kernel_tx_failed: u64,
    /// Packets read from the kernel interfaces and given to a worker.
    pub kernel_rx: u64,
}

/// One dataplane worker.
#[derive(Clone, Debug)]
pub struct WorkerView {
    /// The EAL lcore the worker runs on.
    pub lcore: u32,
    /// The worker's live counters; the worker writes them, the API reads them.
    pub counters: Arc<WorkerCounters>,
    /// The snapshot the worker last loaded; the worker writes it, the API
    /// reads it.
    pub snapshot: Arc<LoadedSnapshot>,
    /// How long ago, when the view was taken, the worker last completed an
    /// iteration of its loop; `None` if it has not completed one yet or the
    /// view cannot tell. A worker whose loop is older than
    /// [`WORKER_STALL_LIMIT`](super::WORKER_STALL_LIMIT) makes the gateway
    /// not serving.
    pub since_last_loop: Option<std::time::Duration>,
}

/// One port and its driver's statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortView {
    /// The name the configuration gives the port.
    pub name: String,
    /// The DPDK port id.
    pub port_id: u16,
    /// The port's MAC address.
    pub mac: [u8; 6],
    /// The driver's counters (DPDK's `rte_eth_stats`), read just now.
    pub stats: PortStats,
    /// Its link as last read (every
    /// [`LINK_POLL_INTERVAL`](crate::link::LINK_POLL_INTERVAL)); `None`
    /// when the driver does not report it.
    pub link: Option<PortLink>,
    /// It reaches the routers (`[[ports]] uplink`).
    pub uplink: bool,
    /// For a bond: its members, in configuration order (empty for any
    /// other port).
    pub members: Vec<BondMemberView>,
}

impl PortView {
    /// Its link status, for [`crate::link::uplinks_down`].
    pub fn link_status(&self) -> crate::link::PortLinkStatus {
        crate::link::PortLinkStatus {
            name: self.name.clone(),
            uplink: self.uplink,
            link: self.link,
            members: self.members.iter().map(|m| m.link.clone()).collect(),
        }
    }
}

/// One member of a bond port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BondMemberView {
    /// Its link, whether the bond counts it active, and its LACP state, as
    /// last read (with the ports' links).
    pub link: crate::link::BondMemberLink,
    /// Its driver's counters, read just now: what it received and sent of
    /// the bond's traffic.
    pub stats: PortStats,
}

/// A port's driver counters (plain numbers, DPDK's `rte_eth_stats` totals),
/// shared with the driver so the daemon hands them over as they are.
pub use vipgate_dataplane::driver::PortStats;

/// A port's link as its driver reports it (DPDK's `rte_eth_link`).
pub use vipgate_dataplane::driver::PortLink;

/// The packet buffer pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MempoolView {
    /// The pool's DPDK name.
    pub name: String,
    /// Number of mbufs in the pool.
    pub size: u64,
    /// Mbufs currently taken from the pool; mbufs parked in per-lcore caches
    /// count as free, as DPDK counts them.
    pub in_use: u64,
}
