//! vipgate's control plane: the gRPC API, the Prometheus endpoint and the pieces behind `vipgated` and
//! `vipgatectl`.
#![forbid(unsafe_code)]

pub mod announce;
pub mod api;
pub mod config;
pub mod daemon;
pub mod health;
pub mod kernel;
pub mod metrics;
pub mod state;
pub mod stats;
pub mod store;
