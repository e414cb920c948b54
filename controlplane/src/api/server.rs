//! The `Gateway` service and its Unix socket listener.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use vipgate_dataplane::counters::{DropReason, WorkerCounters};

use super::cutoff::Connections;
use super::error::ApiError;
use super::pb;
use super::pb::gateway_server::{Gateway, GatewayServer};
use super::services::ServiceManagerService;
use super::view::{GatewayView, MempoolView, PortView};
use crate::state::StateHandle;

/// Only the daemon's user may talk to it: the API will change the gateway's
/// configuration, so the socket is as private as the configuration file.
const SOCKET_MODE: u32 = 0o600;

/// A worker that has not completed an iteration of its loop for this long
/// is stuck, and the gateway is not serving. A worker completes one every
/// few microseconds while it polls and at least every 10 ms while it sleeps
/// idle, so an idle gateway stays far below it.
pub const WORKER_STALL_LIMIT: Duration = Duration::from_secs(1);

/// Whether `view` serves, and why not if it does not: its workers must run,
/// and each must have completed a loop iteration within
/// [`WORKER_STALL_LIMIT`].
fn serving_status(view: &dyn GatewayView) -> Result<(), String> {
    if !view.serving() {
        return Err("the dataplane workers are not running".to_owned());
    }
    let stuck: Vec<String> = view
        .workers()
        .iter()
        .filter_map(|w| {
            let age = w.since_last_loop?;
            (age >= WORKER_STALL_LIMIT).then(|| format!("lcore {} for {:.1} s", w.lcore, age.as_secs_f64()))
        })
        .collect();
    if stuck.is_empty() { Ok(()) } else { Err(format!("worker loop stalled: {}", stuck.join(", "))) }
}

/// The `Gateway` gRPC service over a [`GatewayView`].
///
/// [`serve_unix`] is the usual way to run it; the type is public so the
/// daemon can also mount it on another server (for example TCP with mTLS).
pub struct GatewayService {
    view: Arc<dyn GatewayView>,
    started: Instant,
}

impl GatewayService {
    /// A service reading `view`; its uptime counts from now.
    pub fn new(view: Arc<dyn GatewayView>) -> Self {
        GatewayService { view, started: Instant::now() }
    }

    /// The tonic server wrapper, ready for `Server::add_service`.
    pub fn into_server(self) -> GatewayServer<Self> {
        GatewayServer::new(self)
    }
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn get_health(
        &self,
        _request: Request<pb::GetHealthRequest>,
    ) -> Result<Response<pb::GetHealthResponse>, Status> {
        let (status, reason) = match serving_status(self.view.as_ref()) {
            Ok(()) => (pb::ServingStatus::Serving, String::new()),
            Err(reason) => (pb::ServingStatus::NotServing, reason),
        };
        Ok(Response::new(pb::GetHealthResponse {
            status: status.into(),
            reason,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
            workers: count(self.view.workers().len()),
            ports: count(self.view.ports().len()),
        }))
    }

    async fn get_counters(
        &self,
        _request: Request<pb::GetCountersRequest>,
    ) -> Result<Response<pb::GetCountersResponse>, Status> {
        Ok(Response::new(counters_response(self.view.as_ref())))
    }

    async fn get_service_stats(
        &self,
        request: Request<pb::GetServiceStatsRequest>,
    ) -> Result<Response<pb::GetServiceStatsResponse>, Status> {
        let name = request.into_inner().service;
        let only = (!name.is_empty()).then_some(name.as_str());
        let services: Vec<pb::ServiceStats> = self.view.service_stats(only).into_iter().map(service_stats).collect();
        if services.is_empty()
            && let Some(name) = only
        {
            return Err(Status::not_found(format!("service {name:?} does not exist")));
        }
        Ok(Response::new(pb::GetServiceStatsResponse { services }))
    }
}

fn traffic(t: &vipgate_dataplane::stats::SlotTotals) -> pb::TrafficStats {
    pb::TrafficStats {
        connections: t.connections,
        in_packets: t.in_packets,
        in_bytes: t.in_bytes,
        out_packets: t.out_packets,
        out_bytes: t.out_bytes,
        active_flows: t.active,
        inactive_flows: t.inactive,
    }
}

fn service_stats(f: crate::stats::ServiceFigures) -> pb::ServiceStats {
    let s = &f.service;
    pb::ServiceStats {
        name: s.name.clone(),
        vip: std::net::Ipv4Addr::from(s.vip).to_string(),
        port: u32::from(s.port),
        protocol: s.protocol.to_owned(),
        mode: s.mode.to_owned(),
        table_size: s.table_size,
        stats: Some(traffic(&f.totals)),
        backends: f
            .backends
            .iter()
            .map(|b| pb::BackendStats {
                address: b.addr.to_string(),
                port: u32::from(b.port),
                weight: b.weight,
                stats: Some(traffic(&b.totals)),
            })
            .collect(),
    }
}

/// Reads every counter once. The total is summed from the values put in the
/// response, so it always equals the sum of the rows even while workers keep
/// counting.
fn counters_response(view: &dyn GatewayView) -> pb::GetCountersResponse {
    let pool = view.mempool();
    let workers: Vec<pb::WorkerCounters> = view
        .workers()
        .iter()
        .map(|w| {
            let c = &w.counters;
            let packets = c.rx_packets.get() + c.handoff_in.get();
            pb::WorkerCounters {
                lcore: w.lcore,
                counters: Some(packet_counters(c)),
                snapshot: Some(worker_snapshot(w.snapshot.read())),
                mempool_in_use: pool.in_use,
                busy_cycles_per_packet: if packets == 0 { 0.0 } else { c.busy_cycles.get() as f64 / packets as f64 },
            }
        })
        .collect();
    let mut total = zero_counters();
    for w in &workers {
        if let Some(c) = &w.counters {
            add_counters(&mut total, c);
        }
    }
    let MempoolView { name, size, in_use } = pool;
    pb::GetCountersResponse {
        workers,
        total: Some(total),
        mempool: Some(pb::MempoolStats { name, size, in_use }),
        ports: view.ports().into_iter().map(port_stats).collect(),
    }
}

/// A snapshot of one worker's counters, with every drop reason listed.
fn worker_snapshot(s: vipgate_dataplane::loaded::LoadedSnapshotState) -> pb::WorkerSnapshot {
    pb::WorkerSnapshot {
        version: s.version,
        generation: s.generation,
        idle: s.idle,
        loaded_at_monotonic_ns: s.loaded_at_ns,
    }
}

fn packet_counters(c: &WorkerCounters) -> pb::PacketCounters {
    pb::PacketCounters {
        rx_packets: c.rx_packets.get(),
        rx_bytes: c.rx_bytes.get(),
        tx_packets: c.tx_packets.get(),
        tx_bytes: c.tx_bytes.get(),
        nat_forward: c.nat_forward.get(),
        nat_reverse: c.nat_reverse.get(),
        arp_replies: c.arp_replies.get(),
        arp_requests: c.arp_requests.get(),
        icmp_echo_replies: c.icmp_echo_replies.get(),
        busy_polls: c.busy_polls.get(),
        busy_cycles: c.busy_cycles.get(),
        drops: DropReason::ALL
            .iter()
            .map(|&r| pb::DropCount { reason: r.name().to_owned(), packets: c.drops(r) })
            .collect(),
        consumed: c.consumed.get(),
        flows_created: c.flows_created.get(),
        flows_evicted: c.flows_evicted.get(),
        flows_rehashed: c.flows_rehashed.get(),
        flows_active: c.flows_active.get(),
        flows_reset: c.flows_reset.get(),
        handoff_out: c.handoff_out.get(),
        handoff_in: c.handoff_in.get(),
        icmp_frag_needed: c.icmp_frag_needed.get(),
        to_kernel: c.to_kernel.get(),
        to_kernel_bytes: c.to_kernel_bytes.get(),
        from_kernel: c.from_kernel.get(),
        from_kernel_bytes: c.from_kernel_bytes.get(),
        to_kernel_control: c.to_kernel_control.get(),
    }
}

/// All counters at zero, drops listed in the same order as
/// [`packet_counters`] lists them.
fn zero_counters() -> pb::PacketCounters {
    packet_counters(&WorkerCounters::default())
}

/// Adds `c` into `total`. Counters wrap like the dataplane's own.
fn add_counters(total: &mut pb::PacketCounters, c: &pb::PacketCounters) {
    let pairs = [
        (&mut total.rx_packets, c.rx_packets),
        (&mut total.rx_bytes, c.rx_bytes),
        (&mut total.tx_packets, c.tx_packets),
        (&mut total.tx_bytes, c.tx_bytes),
        (&mut total.nat_forward, c.nat_forward),
        (&mut total.nat_reverse, c.nat_reverse),
        (&mut total.arp_replies, c.arp_replies),
        (&mut total.arp_requests, c.arp_requests),
        (&mut total.icmp_echo_replies, c.icmp_echo_replies),
        (&mut total.busy_polls, c.busy_polls),
        (&mut total.busy_cycles, c.busy_cycles),
        (&mut total.consumed, c.consumed),
        (&mut total.flows_created, c.flows_created),
        (&mut total.flows_evicted, c.flows_evicted),
        (&mut total.flows_rehashed, c.flows_rehashed),
        (&mut total.flows_active, c.flows_active),
        (&mut total.flows_reset, c.flows_reset),
        (&mut total.handoff_out, c.handoff_out),
        (&mut total.handoff_in, c.handoff_in),
        (&mut total.icmp_frag_needed, c.icmp_frag_needed),
        (&mut total.to_kernel, c.to_kernel),
        (&mut total.to_kernel_bytes, c.to_kernel_bytes),
        (&mut total.from_kernel, c.from_kernel),
        (&mut total.from_kernel_bytes, c.from_kernel_bytes),
        (&mut total.to_kernel_control, c.to_kernel_control),
    ];
    for (sum, value) in pairs {
        *sum = sum.wrapping_add(value);
    }
    // Both lists come from `packet_counters`, so the same index is the same
    // reason.
    for (sum, d) in total.drops.iter_mut().zip(&c.drops) {
        sum.packets = sum.packets.wrapping_add(d.packets);
    }
}

fn port_stats(p: PortView) -> pb::PortStats {
    let s = p.stats;
    pb::PortStats {
        name: p.name,
        port_id: p.port_id.into(),
        mac: format_mac(p.mac),
        ipackets: s.ipackets,
        opackets: s.opackets,
        ibytes: s.ibytes,
        obytes: s.obytes,
        imissed: s.imissed,
        ierrors: s.ierrors,
        oerrors: s.oerrors,
        rx_nombuf: s.rx_nombuf,
    }
}

/// `02:00:00:00:00:01`, the form the proto documents.
fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

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

/// tonic's default limit on a request message.
pub(super) const DEFAULT_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

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
    let result = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(super::tcp::CONCURRENCY_PER_CONNECTION)
        .load_shed(true)
        .max_concurrent_streams(super::tcp::MAX_CONCURRENT_STREAMS)
        .timeout(super::tcp::REQUEST_TIMEOUT)
        .http2_keepalive_interval(Some(super::tcp::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(super::tcp::KEEPALIVE_TIMEOUT))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_lower_case_hex_pairs() {
        assert_eq!(format_mac([0x02, 0, 0xab, 0xcd, 0x0e, 0xff]), "02:00:ab:cd:0e:ff");
    }

    #[test]
    fn total_lists_drops_in_reason_order() {
        let a = WorkerCounters::default();
        a.count_drop(DropReason::NoService);
        a.rx_packets.add(5);
        let b = WorkerCounters::default();
        b.count_drop(DropReason::NoService);
        b.count_drop(DropReason::TxFull);
        b.rx_packets.add(7);
        let mut total = zero_counters();
        add_counters(&mut total, &packet_counters(&a));
        add_counters(&mut total, &packet_counters(&b));
        assert_eq!(total.rx_packets, 12);
        let names: Vec<_> = total.drops.iter().map(|d| d.reason.as_str()).collect();
        let expected: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names, expected);
        assert_eq!(total.drops[DropReason::NoService as usize].packets, 2);
        assert_eq!(total.drops[DropReason::TxFull as usize].packets, 1);
    }
}
