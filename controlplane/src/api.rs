//! vipgate's gRPC API (`proto/vipgate/v1`): the `Gateway` and `ServiceManager`
//! services, their server on a Unix socket and on TCP with mutual TLS, and
//! the client helpers that `vipgatectl` uses.
//!
//! This module owns the wire types and the socket. It reads the gateway only
//! through [`GatewayView`], which the daemon implements; it never touches
//! DPDK or the dataplane's state directly, and never blocks the runtime: the
//! daemon runs it on a current-thread tokio runtime on the DPDK main lcore.
#![forbid(unsafe_code)]

mod client;
mod codec;
mod cutoff;
mod error;
mod gateway;
mod limits;
mod server;
mod services;
mod tcp;
mod view;

pub use client::{
    TlsClientFiles, TlsClientPem, connect_tls, connect_tls_channel, connect_unix, connect_unix_channel,
    connect_unix_services,
};
pub use cutoff::Connections;
pub use error::ApiError;
pub use gateway::{GatewayService, WORKER_STALL_LIMIT};
pub use limits::{
    CONCURRENCY_PER_CONNECTION, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_CONCURRENT_STREAMS, REQUEST_TIMEOUT,
};
pub use server::{BoundSocket, bind_unix, serve_bound, serve_bound_with_state, serve_unix};
pub use services::ServiceManagerService;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use services::fuzzing;
pub use tcp::{BoundTcp, HANDSHAKE_TIMEOUT, RATE_LIMIT_PER_SECOND, RATE_LIMIT_QUEUE, TcpSettings, bind_tcp, serve_tcp};
pub use view::{BondMemberView, ExceptionView, GatewayView, MempoolView, PortLink, PortStats, PortView, WorkerView};

/// The generated protobuf messages and the tonic client and server of
/// package `vipgate.v1`.
pub mod pb {
    tonic::include_proto!("vipgate.v1");
}

/// Where vipgated listens and vipgatectl connects unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vipgate/vipgated.sock";
