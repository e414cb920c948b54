//! The plain data the DPDK driver (`vipgate-dpdk`) is built from and
//! reports: how to build the dataplane, each port's settings, and a port's
//! driver counters and link.
//!
//! They live here, beside the packet core, rather than in the driver, so
//! that the configuration and the API (and the client built on them) can
//! name them without linking DPDK. Nothing here touches a device.

use crate::pipeline::PipelineConfig;

/// One port to open.
#[derive(Clone, Debug)]
pub struct PortConfig {
    /// Operator-facing name.
    pub name: String,
    /// The device's name after EAL probing: a vdev name such as `net_tap0`
    /// or a PCI address such as `0000:03:00.0`.
    pub device: String,
    /// The port's MTU (set on the device at start).
    pub mtu: u16,
    /// The name of the port's kernel interface (the exception path), or
    /// `None` for none.
    pub kernel_interface: Option<String>,
}

/// How to build the dataplane.
#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    /// Ports in dense index order.
    pub ports: Vec<PortConfig>,
    /// Mbufs in the pool.
    pub mbufs: u32,
    /// Per-lcore mbuf cache.
    pub mbuf_cache: u32,
    /// Idle workers sleep this long after many empty polls (0: never).
    pub idle_sleep_us: u32,
    /// Pipeline tunables.
    pub pipeline: PipelineConfig,
}

/// Counters kept by a port's driver (hardware or PMD): the totals of
/// DPDK's `rte_eth_stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Packets received.
    pub ipackets: u64,
    /// Packets sent.
    pub opackets: u64,
    /// Bytes received.
    pub ibytes: u64,
    /// Bytes sent.
    pub obytes: u64,
    /// Packets dropped by the hardware because rx queues were full.
    pub imissed: u64,
    /// Receive errors.
    pub ierrors: u64,
    /// Transmit errors.
    pub oerrors: u64,
    /// Receive mbuf allocation failures.
    pub rx_nombuf: u64,
}

/// A port's link as its driver reports it (DPDK's `rte_eth_link`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortLink {
    /// The link is up (carrier, and for a tap: its kernel side up).
    pub up: bool,
    /// The negotiated speed in Mb/s; `None` when the driver does not say
    /// (or the link is down).
    pub speed_mbps: Option<u32>,
    /// Full duplex (meaningless while the link is down).
    pub full_duplex: bool,
}
