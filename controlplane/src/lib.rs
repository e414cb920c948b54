//! vipgate's control plane: the gRPC API and the pieces behind `vipgated` and `vipgatectl`.

pub mod api;
pub mod config;
pub mod daemon;
