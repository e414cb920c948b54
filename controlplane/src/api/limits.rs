//! The limits every API listener puts on its clients' memory and time, so
//! that a misbehaving client cannot exhaust the daemon, and the HTTP/2
//! windows that let a large request through in one go: on the Unix socket
//! (`server.rs`) and on TCP (`tcp.rs`, which adds a rate limit and a TLS
//! handshake timeout).

use std::time::Duration;

use tonic::transport::Server;

/// Requests in progress at once on one connection, waiting for the rate
/// limit included; one more fails at once with RESOURCE_EXHAUSTED ("Too
/// many active requests for the connection").
pub const CONCURRENCY_PER_CONNECTION: usize = 16;
/// HTTP/2 streams a client may open at once on one connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 32;
/// The longest one request may take, queueing included; then it fails with
/// CANCELLED.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 PING interval on idle connections, and how long the answer may
/// take before the connection is closed.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// tonic's default limit on a request message, which the socket keeps
/// unless the daemon sets `[api] max_request_bytes`.
pub(super) const DEFAULT_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// HTTP/2 flow-control windows, a stream's and a connection's: how much a
/// peer may send before it waits for the other side to ask for more.
/// HTTP/2's default (64 KiB) made a 2.8 MB Apply wait for 44 window
/// updates, each a wake-up of both sides; a stream's window holds a
/// default-sized request whole. The connection's bounds what one client
/// can make the daemon buffer, whatever its streams.
pub(super) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// See [`STREAM_WINDOW`].
pub(super) const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;

/// `builder` with the limits of every listener: requests in progress per
/// connection, refused rather than queued beyond it (load shedding),
/// HTTP/2 streams per connection, time per request, and keepalive.
pub(super) fn limited(builder: Server) -> Server {
    builder
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .load_shed(true)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .timeout(REQUEST_TIMEOUT)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
}
