//! The API's errors. Each message names the socket path and, where there is
//! one, the operator's next step.

use std::io;
use std::path::PathBuf;

/// Why serving or calling the API failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The socket's directory did not exist and could not be created.
    #[error("cannot create the directory {} for the API socket: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A process accepts connections on the socket path: most likely another
    /// vipgated. Its socket is left alone.
    #[error("another vipgated is already listening on {}", path.display())]
    AlreadyListening {
        /// The socket path.
        path: PathBuf,
    },
    /// Something other than a socket is at the socket path; it is never
    /// deleted, since it is not ours.
    #[error("{} exists and is not a socket; remove it or choose another socket path", path.display())]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// A socket file was at the path and could not be checked or removed.
    #[error("cannot replace the existing socket {}: {source}", path.display())]
    Stale {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Creating, restricting or publishing the listening socket failed.
    #[error("cannot listen on {}: {source}", path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The gRPC server stopped with an error.
    #[error("the API server on {} failed: {source}", path.display())]
    Serve {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: tonic::transport::Error,
    },
    /// The API's TCP listener could not be bound.
    #[error("cannot listen for the API on TCP {addr}: {source} (set [api] listen_tcp)")]
    ListenTcp {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// The gRPC server on TCP stopped with an error.
    #[error("the API server on TCP {addr} failed: {source}")]
    ServeTcp {
        /// The listen address.
        addr: std::net::SocketAddr,
        /// The underlying error.
        source: tonic::transport::Error,
    },
    /// The client could not reach vipgated over TCP, or its TLS files could
    /// not be read.
    #[error("cannot connect to vipgated at {endpoint}: {reason}")]
    ConnectTcp {
        /// The endpoint, such as `https://198.18.0.1:50051`.
        endpoint: String,
        /// What went wrong, in words.
        reason: String,
    },
    /// The client could not reach vipgated on the socket.
    #[error("cannot connect to vipgated at {}: {reason} — is vipgated running? (set --socket)", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The root cause in words, e.g. "No such file or directory (os
        /// error 2)"; the transport error alone only says "transport error".
        reason: String,
        /// The underlying error.
        source: tonic::transport::Error,
    },
    /// vipgated answered a call with an error status.
    #[error("{call} failed: {}", status_reason(status))]
    Call {
        /// The call, e.g. "GetCounters".
        call: &'static str,
        /// The server's status; its message is the server's reason.
        status: tonic::Status,
    },
}

impl ApiError {
    /// Wraps the status a call on `call` returned.
    pub fn call(call: &'static str, status: tonic::Status) -> Self {
        ApiError::Call { call, status }
    }
}

/// The server's reason, or the meaning of the status code when the server
/// gave none.
///
/// A status the client made up from a transport failure (such as a TLS
/// alert from the server after the handshake) carries the failure as its
/// source: its root cause is added, since the status alone only says
/// "operation was canceled" or "transport error".
fn status_reason(status: &tonic::Status) -> String {
    let reason =
        if status.message().is_empty() { status.code().description().to_owned() } else { status.message().to_owned() };
    match std::error::Error::source(status) {
        Some(source) => format!("{reason}: {}", root_cause(source)),
        None => reason,
    }
}

/// The innermost error of a chain, in words.
pub(super) fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
