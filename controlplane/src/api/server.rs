//! The API's Unix socket listener: the `Gateway` service, and
//! `ServiceManager` when the daemon gives it the state.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;

use super::cutoff::Connections;
use super::error::ApiError;
use super::gateway::GatewayService;
use super::limits::{self, DEFAULT_MAX_REQUEST_BYTES};
use super::services::ServiceManagerService;
use super::view::GatewayView;
use crate::state::StateHandle;

/// Only the daemon's user may talk to it: the API will change the gateway's
/// configuration, so the socket is as private as the configuration file.
const SOCKET_MODE: u32 = 0o600;

/// Serves the `Gateway` service on the Unix socket `path` until `shutdown`
/// completes, then removes the socket file.
///
/// Creates the socket's directory if it is missing. A socket file left behind
/// by a vipgated that died is replaced; one that a live process still listens
/// on is an [`ApiError::AlreadyListening`] error. The socket is created with
/// mode 0600 before it becomes visible at `path`, so no other user can
/// connect even for an instant.
///
/// Runs on any tokio runtime, including a current-thread one; the runtime
/// must be driven (awaited) for requests to be answered.
pub async fn serve_unix(
    path: &Path,
    view: Arc<dyn GatewayView>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApiError> {
    serve_bound(bind_unix(path).await?, view, shutdown).await
}

/// A published API socket that is not served yet. Connections wait in the
/// kernel's backlog until [`serve_bound`] runs; dropping it removes the
/// socket file.
#[derive(Debug)]
pub struct BoundSocket {
    listener: UnixListener,
    socket: SocketFile,
    max_request_bytes: usize,
    connections: Connections,
}

impl BoundSocket {
    /// Refuses request messages larger than `bytes` (`OUT_OF_RANGE`); 4 MiB
    /// unless set.
    #[must_use]
    pub fn with_max_request_bytes(mut self, bytes: usize) -> BoundSocket {
        self.max_request_bytes = bytes;
        self
    }

    /// Counts its connections in `connections`, and ends them when that is
    /// cut; a set of its own, never cut, unless given.
    #[must_use]
    pub fn with_connections(mut self, connections: Connections) -> BoundSocket {
        self.connections = connections;
        self
    }
}

/// Publishes the API socket at `path` (see [`serve_unix`] for the rules)
/// without serving it yet, so that a daemon can claim its socket, and fail
/// if another daemon holds it, before it starts anything else.
pub async fn bind_unix(path: &Path) -> Result<BoundSocket, ApiError> {
    let (listener, socket) = listen(path).await?;
    Ok(BoundSocket { listener, socket, max_request_bytes: DEFAULT_MAX_REQUEST_BYTES, connections: Connections::new() })
}

/// Serves the `Gateway` service on a socket from [`bind_unix`] until
/// `shutdown` completes, then removes the socket file.
pub async fn serve_bound(
    bound: BoundSocket,
    view: Arc<dyn GatewayView>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApiError> {
    serve_bound_with_state(bound, view, None, shutdown).await
}

/// [`serve_bound`], with the `ServiceManager` service beside `Gateway` on
/// the same socket when `state` is given.
pub async fn serve_bound_with_state(
    bound: BoundSocket,
    view: Arc<dyn GatewayView>,
    state: Option<StateHandle>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApiError> {
    let BoundSocket { listener, socket, max_request_bytes, connections } = bound;
    let incoming = UnixListenerStream::new(listener).map(move |accepted| accepted.map(|io| connections.track(io)));
    let path = socket.path.clone();
    tracing::info!(socket = %path.display(), "API listening");
    // The TCP listener's limits on memory and time, without its rate limit:
    // the socket is root's only, and the writer applies changes one at a
    // time whatever the rate.
    let result = limits::limited(tonic::transport::Server::builder())
        .add_service(GatewayService::new(view).into_server().max_decoding_message_size(max_request_bytes))
        .add_optional_service(
            state.map(|s| ServiceManagerService::new(s).into_server().max_decoding_message_size(max_request_bytes)),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    drop(socket);
    tracing::info!(socket = %path.display(), "API stopped");
    result.map_err(|source| ApiError::Serve { path, source })
}

/// The socket file this process published; dropping it removes the file.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    /// Device and inode of our socket, so that drop never removes a socket
    /// some other process put at the same path after ours was deleted.
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(socket = %self.path.display(), "cannot remove the API socket: {e}");
                }
            }
            _ => {}
        }
    }
}

/// Creates the listening socket and publishes it at `path`.
///
/// The socket is bound under a temporary name, restricted to 0600, then
/// hard-linked to `path`. The link, unlike a rename, fails if `path` exists,
/// so two daemons starting at once cannot silently take over each other's
/// socket: the loser gets `AlreadyListening`.
async fn listen(path: &Path) -> Result<(UnixListener, SocketFile), ApiError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|source| ApiError::CreateDir { path: dir.to_owned(), source })?;
    remove_stale(path).await?;

    let listen_err = |source| ApiError::Listen { path: path.to_owned(), source };
    let tmp = dir.join(format!(".vipgated.{}.tmp", std::process::id()));
    // A leftover from a crash of an earlier process with our pid.
    remove_if_socket(&tmp).map_err(listen_err)?;
    let listener = UnixListener::bind(&tmp).map_err(listen_err)?;
    let published = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(SOCKET_MODE))
        .and_then(|()| std::fs::hard_link(&tmp, path));
    let unlinked = std::fs::remove_file(&tmp);
    match published {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(ApiError::AlreadyListening { path: path.to_owned() });
        }
        Err(e) => return Err(listen_err(e)),
    }
    let meta = std::fs::symlink_metadata(path).map_err(listen_err)?;
    let socket = SocketFile { path: path.to_owned(), id: (meta.dev(), meta.ino()) };
    // Only now, with the guard in place: on error it removes our link.
    unlinked.map_err(listen_err)?;
    Ok((listener, socket))
}

/// Removes a socket file at `path` that no process listens on any more.
async fn remove_stale(path: &Path) -> Result<(), ApiError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(ApiError::Stale { path: path.to_owned(), source }),
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket { path: path.to_owned() });
    }
    match UnixStream::connect(path).await {
        // WouldBlock: a listener whose backlog is full, busy but alive.
        Ok(_) => Err(ApiError::AlreadyListening { path: path.to_owned() }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(ApiError::AlreadyListening { path: path.to_owned() }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %path.display(), "removing a stale API socket");
            remove_if_socket(path).map_err(|source| ApiError::Stale { path: path.to_owned(), source })
        }
        // Gone in the meantime: nothing to remove.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ApiError::Stale { path: path.to_owned(), source }),
    }
}

/// Removes `path` if it is a socket; anything else stays.
fn remove_if_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
