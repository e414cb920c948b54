//! vipgate's DPDK driver: EAL, the mbuf pool, ports and queues, and the
//! worker loop that moves mbufs between the NIC and the packet core.
//!
//! Owns: every DPDK resource and its lifetime (start, clean shutdown, every
//! mbuf back in its pool). Holds no load-balancing logic: per burst it hands
//! frame bytes to [`vipgate_dataplane::pipeline::Pipeline`] and acts on the
//! verdicts. Unsafe code lives only here and in `vipgate-ffi`; each block
//! carries a SAFETY comment.

mod dataplane;
mod eal;
mod error;
mod exception;
mod handoff;
mod mempool;
mod port;
pub mod rcu;
pub mod sched;
mod worker;

pub use dataplane::{Dataplane, PortView, ShutdownReport, WorkerView};
pub use eal::Eal;
pub use error::DpdkError;
pub use exception::ExceptionCounters;
pub use mempool::Mempool;
pub use port::Port;
/// The plain data the driver is built from and reports, defined in the
/// packet core so that code without DPDK can name them too.
pub use vipgate_dataplane::driver::{BondConfig, BondMemberLink, DataplaneConfig, PortConfig, PortStats, TransmitHash};
pub use worker::{LACP_TICK, MAX_IDLE_SLEEP};

/// Packets per rx/tx burst.
pub const BURST: usize = 32;
