//! The API on TCP, always with mutual TLS, with a rate limit besides the
//! limits every listener has (`limits.rs`).
//!
//! The Unix socket is protected by its file mode; a TCP listener is not, so
//! every connection must present a client certificate signed by the
//! configured CA, checked during the TLS handshake (rustls, through tonic's
//! `tls-ring` feature). A client without one never reaches the service.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use super::cutoff::Connections;
use super::error::ApiError;
use super::gateway::GatewayService;
use super::limits;
use super::services::ServiceManagerService;
use super::view::GatewayView;

/// Requests started per second over all TCP connections; more wait their
/// turn in a queue (up to [`REQUEST_TIMEOUT`](super::REQUEST_TIMEOUT)).
pub const RATE_LIMIT_PER_SECOND: u64 = 100;
/// Requests waiting for the rate limit, over all connections; when it is
/// full, a new request fails at once with RESOURCE_EXHAUSTED rather than
/// being held in memory.
pub const RATE_LIMIT_QUEUE: usize = 256;
/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the TCP listener needs: its address, PEM files already read (see
/// `config::ApiTcp`) and the request size limit.
#[derive(Clone, Debug)]
pub struct TcpSettings {
    /// The address to listen on.
    pub addr: SocketAddr,
    /// Server certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// Server private key, PEM.
    pub key_pem: Vec<u8>,
    /// CA certificates that sign client certificates, PEM.
    pub client_ca_pem: Vec<u8>,
    /// Largest request message decoded; a larger one fails with
    /// OUT_OF_RANGE (tonic's code for it).
    pub max_request_bytes: usize,
}

/// A bound TCP listener, not served yet: connections wait in the kernel's
/// backlog until [`serve_tcp`] runs.
#[derive(Debug)]
pub struct BoundTcp {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    settings: TcpSettings,
    connections: Connections,
}

impl BoundTcp {
    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counts its connections in `connections`, and ends them when that is
    /// cut; a set of its own, never cut, unless given.
    #[must_use]
    pub fn with_connections(mut self, connections: Connections) -> BoundTcp {
        self.connections = connections;
        self
    }
}

/// Binds the API's TCP listener, so that an address in use fails start-up
/// before EAL. Needs no runtime.
pub fn bind_tcp(settings: TcpSettings) -> Result<BoundTcp, ApiError> {
    let addr = settings.addr;
    let err = |source| ApiError::ListenTcp { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    let addr = listener.local_addr().map_err(err)?;
    Ok(BoundTcp { listener, addr, settings, connections: Connections::new() })
}

/// Serves the `Gateway` service on `bound` with mutual TLS until `shutdown`
/// completes. Must run inside a tokio runtime (a current-thread one is
/// enough).
pub async fn serve_tcp(
    bound: BoundTcp,
    view: Arc<dyn GatewayView>,
    state: Option<crate::state::StateHandle>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApiError> {
    let BoundTcp { listener, addr, settings, connections } = bound;
    let serve_err = |source| ApiError::ServeTcp { addr, source };
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|source| ApiError::ListenTcp { addr, source })?;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&settings.cert_pem, &settings.key_pem))
        .client_ca_root(Certificate::from_pem(&settings.client_ca_pem))
        .client_auth_optional(false)
        .timeout(HANDSHAKE_TIMEOUT);
    let rate = tower::ServiceBuilder::new()
        // The buffer makes the rate limiter shareable by every connection:
        // one global budget, and a bounded queue in front of it.
        .layer(tower::buffer::BufferLayer::new(RATE_LIMIT_QUEUE))
        .layer(tower::limit::RateLimitLayer::new(RATE_LIMIT_PER_SECOND, Duration::from_secs(1)));
    let service = GatewayService::new(view).into_server().max_decoding_message_size(settings.max_request_bytes);
    tracing::info!(%addr, "API listening on TCP with mutual TLS");
    // The limits' load shedding also refuses, rather than queues, a request
    // that finds the rate limiter's queue full.
    let builder = tonic::transport::Server::builder().tls_config(tls).map_err(serve_err)?;
    let result =
        limits::limited(builder)
            .layer(rate)
            .add_service(service)
            .add_optional_service(state.map(|s| {
                ServiceManagerService::new(s).into_server().max_decoding_message_size(settings.max_request_bytes)
            }))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener).map(move |accepted| accepted.map(|io| connections.track(io))),
                shutdown,
            )
            .await;
    tracing::info!(%addr, "API on TCP stopped");
    result.map_err(serve_err)
}
