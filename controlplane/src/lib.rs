//! vipgate's control plane: the gRPC API, the Prometheus endpoint and the pieces behind `vipgated` and
//! `vipgatectl`.
//!
//! No DPDK: this package (the library and `vipgatectl`) builds without DPDK's
//! headers and libraries. The daemon that drives the dataplane,
//! `vipgated`, is the package `vipgate-daemon` (`controlplane/daemon/`).
#![forbid(unsafe_code)]

pub mod announce;
pub mod api;
pub mod checks;
pub mod config;
pub mod health;
pub mod health_check;
pub mod kernel;
pub mod link;
pub mod metrics;
pub mod model;
pub mod state;
pub mod stats;
pub mod store;
