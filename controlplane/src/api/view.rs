//! What the API reads from the running gateway.
//!
//! The daemon implements [`GatewayView`]; the API server only calls it. The
//! view types are plain Rust values with no DPDK types, so the server and its
//! tests need no EAL: the daemon copies DPDK's numbers into them.

use std::sync::Arc;

use vipgate_dataplane::counters::WorkerCounters;

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
    /// Whether the gateway forwards traffic now.
    fn serving(&self) -> bool;
}

/// One dataplane worker.
#[derive(Clone, Debug)]
pub struct WorkerView {
    /// The EAL lcore the worker runs on.
    pub lcore: u32,
    /// The worker's live counters; the worker writes them, the API reads them.
    pub counters: Arc<WorkerCounters>,
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
}

/// A port's driver counters, field for field DPDK's `rte_eth_stats` totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Packets received successfully.
    pub ipackets: u64,
    /// Packets transmitted successfully.
    pub opackets: u64,
    /// Bytes received successfully.
    pub ibytes: u64,
    /// Bytes transmitted successfully.
    pub obytes: u64,
    /// Packets dropped by the NIC because the receive queues were full.
    pub imissed: u64,
    /// Packets received with errors.
    pub ierrors: u64,
    /// Packets whose transmission failed.
    pub oerrors: u64,
    /// Receive failures for lack of an mbuf.
    pub rx_nombuf: u64,
}

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
