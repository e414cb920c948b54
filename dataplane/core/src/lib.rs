//! vipgate's packet core.
//!
//! Everything here is pure: no DPDK types, no I/O, no clock, no allocation on
//! the per-packet path. The DPDK driver (`vipgate-dpdk`) moves mbufs and hands
//! their bytes to [`pipeline::Pipeline::process`] one burst at a time; time is
//! passed in by the caller. That makes the whole load-balancing logic testable,
//! fuzzable and benchmarkable without EAL.
#![forbid(unsafe_code)]

pub mod admission;
pub mod checksum;
pub mod counters;
pub mod driver;
pub mod flow;
pub mod fragments;
pub mod hash;
pub mod loaded;
pub mod maglev;
pub mod neighbour;
pub mod pipeline;
pub mod route;
pub mod snapshot;
pub mod snat;
pub mod sources;
pub mod stats;
pub mod wire;
