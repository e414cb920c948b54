//! Dialing vipgated's Unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::error::{ApiError, root_cause};
use super::pb::gateway_client::GatewayClient;
use super::pb::service_manager_client::ServiceManagerClient;

/// A local socket answers at once; waiting longer only hides a hung daemon.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to vipgated's API on the Unix socket `path`.
///
/// The connection is made before this returns, so a missing or dead daemon
/// is reported here (as [`ApiError::Connect`]) rather than on the first
/// call. If the connection drops later, the channel dials the same path
/// again. Calls have no deadline of their own: set one per request with
/// `tonic::Request::set_timeout` where a hung daemon must not block the
/// caller.
pub async fn connect_unix(path: &Path) -> Result<GatewayClient<Channel>, ApiError> {
    Ok(GatewayClient::new(channel_unix(path).await?))
}

/// Connects to vipgated's desired-state API (`ServiceManager`) on the Unix
/// socket `path`, with the same rules as [`connect_unix`].
pub async fn connect_unix_services(path: &Path) -> Result<ServiceManagerClient<Channel>, ApiError> {
    Ok(ServiceManagerClient::new(channel_unix(path).await?))
}

/// A channel to vipgated's Unix socket `path`, for clients of several of
/// its services on one connection; same rules as [`connect_unix`].
pub async fn connect_unix_channel(path: &Path) -> Result<Channel, ApiError> {
    channel_unix(path).await
}

async fn channel_unix(path: &Path) -> Result<Channel, ApiError> {
    let socket: PathBuf = path.to_owned();
    // The URI only fills HTTP/2's :authority; the connector ignores it and
    // always dials the socket.
    Endpoint::from_static("http://vipgated")
        .connect_timeout(CONNECT_TIMEOUT)
        .initial_stream_window_size(Some(super::limits::STREAM_WINDOW))
        .initial_connection_window_size(Some(super::limits::CONNECTION_WINDOW))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ApiError::Connect { path: path.to_owned(), reason: root_cause(&source), source })
}

/// The files a client presents and trusts when it dials vipgated over TCP.
#[derive(Clone, Debug)]
pub struct TlsClientFiles {
    /// The client's certificate, PEM.
    pub cert: PathBuf,
    /// The client's private key, PEM.
    pub key: PathBuf,
    /// The CA that signed vipgated's server certificate, PEM.
    pub ca: PathBuf,
}

/// Connects to vipgated's API over TCP with mutual TLS at `endpoint`
/// (`https://host:port`). The server's certificate must be signed by
/// `files.ca` and name the endpoint's host.
pub async fn connect_tls(endpoint: &str, files: &TlsClientFiles) -> Result<GatewayClient<Channel>, ApiError> {
    let fail = |reason: String| ApiError::ConnectTcp { endpoint: endpoint.to_owned(), reason };
    let read = |path: &Path, what: &str| {
        std::fs::read(path).map_err(|e| fail(format!("cannot read the {what} {}: {e}", path.display())))
    };
    let pem = TlsClientPem {
        cert: read(&files.cert, "client certificate")?,
        key: read(&files.key, "client key")?,
        ca: read(&files.ca, "CA certificate")?,
    };
    Ok(GatewayClient::new(connect_tls_channel(endpoint, &pem).await?))
}

/// A client's credentials for vipgated over TCP, as PEM in memory (a
/// controller reads them from a Kubernetes Secret).
#[derive(Clone)]
pub struct TlsClientPem {
    /// The client's certificate.
    pub cert: Vec<u8>,
    /// The client's private key.
    pub key: Vec<u8>,
    /// The CA that signed vipgated's server certificate.
    pub ca: Vec<u8>,
}

impl std::fmt::Debug for TlsClientPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("TlsClientPem").finish_non_exhaustive()
    }
}

/// A channel to vipgated's API over TCP with mutual TLS at `endpoint`
/// (`https://host:port`), for clients of several of its services; same
/// rules as [`connect_tls`].
pub async fn connect_tls_channel(endpoint: &str, pem: &TlsClientPem) -> Result<Channel, ApiError> {
    let fail = |reason: String| ApiError::ConnectTcp { endpoint: endpoint.to_owned(), reason };
    let tls = tonic::transport::ClientTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(&pem.cert, &pem.key))
        .ca_certificate(tonic::transport::Certificate::from_pem(&pem.ca));
    Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| fail(format!("not a URL like https://198.18.0.1:50051: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .initial_stream_window_size(Some(super::limits::STREAM_WINDOW))
        .initial_connection_window_size(Some(super::limits::CONNECTION_WINDOW))
        .tls_config(tls)
        .map_err(|e| fail(root_cause(&e)))?
        .connect()
        .await
        .map_err(|e| fail(root_cause(&e)))
}
