//! vipgate's control plane: the gRPC API and the pieces behind `vipgated` and `vipgatectl`.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod daemon;
pub mod state;
pub mod store;
