//! The Prometheus endpoint: `GET /metrics` over HTTP/1, computed on each
//! scrape from the counters the API reads ([`GatewayView`]).
//!
//! Owns: the metric names, their labels and the HTTP listener. A scrape
//! reads each worker's counters once (atomic loads, no per-packet work) and
//! asks the driver for port statistics, then encodes the result with the
//! `prometheus-client` crate. Runs on the control plane's current-thread
//! tokio runtime, beside the gRPC API; it starts no thread.
//!
//! The metric list is documented in `docs/ops/metrics.md`.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use vipgate_dataplane::counters::{DropReason, WorkerCounters};
use vipgate_dataplane::stats::SlotTotals;

use crate::api::{BondMemberView, GatewayView, PortStats, PortView};
use crate::link::LacpSelection;

/// The content type of the OpenMetrics text format that `prometheus-client`
/// writes; Prometheus negotiates and parses it.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections served at once; further ones wait in the kernel's backlog.
/// A scrape takes well under a millisecond, so a few are plenty.
const MAX_CONNECTIONS: usize = 8;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the metrics endpoint could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The listen address could not be bound (in use, not local, ...).
    #[error(
        "cannot listen for metrics on {addr}: {source} (set [metrics] listen, or listen = \"\" to turn metrics off)"
    )]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Accepting connections failed.
    #[error("the metrics endpoint on {addr} failed: {source}")]
    Accept {
        /// The listen address.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// A bound metrics listener that does not serve yet: connections wait in the
/// kernel's backlog until [`serve`] runs. Binding is separate so that a
/// port in use fails start-up before EAL.
#[derive(Debug)]
pub struct BoundMetrics {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl BoundMetrics {
    /// The address actually bound (with the real port if 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Binds the metrics listener on `addr`. Needs no runtime.
pub fn bind(addr: SocketAddr) -> Result<BoundMetrics, MetricsError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    listener.set_nonblocking(true).map_err(|source| MetricsError::Bind { addr, source })?;
    let addr = listener.local_addr().map_err(|source| MetricsError::Bind { addr, source })?;
    Ok(BoundMetrics { listener, addr })
}

/// Serves `GET /metrics` on `bound` until the future is dropped. Only
/// returns on an error of the listening socket. Must run inside a tokio
/// runtime (a current-thread one is enough); each connection is a task on
/// that runtime.
pub async fn serve(bound: BoundMetrics, view: Arc<dyn GatewayView>) -> Result<(), MetricsError> {
    let BoundMetrics { listener, addr } = bound;
    let listener = TcpListener::from_std(listener).map_err(|source| MetricsError::Accept { addr, source })?;
    tracing::info!(%addr, "metrics listening on http://{addr}/metrics");
    let mut registry = Registry::default();
    register(&mut registry, view);
    let registry = Arc::new(registry);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            unreachable!("the semaphore is never closed")
        };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            // A connection that died before we took it, or a transient
            // shortage of descriptors: not the listener's fault.
            Err(e) if is_transient(&e) => {
                tracing::warn!(%addr, "metrics: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(source) => return Err(MetricsError::Accept { addr, source }),
        };
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let registry = Arc::clone(&registry);
                async move { Ok::<_, Infallible>(respond(&req, &registry)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, "metrics connection: {e}");
            }
            drop(permit);
        });
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        // EMFILE, ENFILE: out of descriptors for now.
        || matches!(e.raw_os_error(), Some(23 | 24))
}

/// Answers one request: the exposition for `GET /metrics` (and `HEAD`), 404
/// for other paths, 405 for other methods.
fn respond(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found: metrics are at /metrics\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    let text = match encode(registry) {
        Ok(t) => t,
        Err(_) => return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics\n"),
    };
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(CONTENT_TYPE));
    r
}

fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// Renders the metrics of `view` as the endpoint would serve them (for
/// tests and tools that want the text without HTTP).
pub fn render(view: Arc<dyn GatewayView>) -> String {
    let mut registry = Registry::default();
    register(&mut registry, view);
    encode(&registry).unwrap_or_default()
}

/// The gateway's collector, and the health checker's when it runs one.
fn register(registry: &mut Registry, view: Arc<dyn GatewayView>) {
    if let Some(health) = view.health() {
        registry.register_collector(Box::new(HealthCollector { health }));
    }
    registry.register_collector(Box::new(GatewayCollector { view }));
}

/// Reads the health checker's status on each scrape: one health gauge and
/// two probe counters per checked backend; nothing while no backend is
/// checked.
#[derive(Debug)]
struct HealthCollector {
    health: Arc<crate::health::HealthStatus>,
}

impl Collector for HealthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        let status = self.health.snapshot();
        // No checked backend, no health families (rather than empty ones).
        if status.is_empty() {
            return Ok(());
        }
        let backends: Vec<String> = status.keys().map(|k| format!("{}:{}", k.address, k.port)).collect();
        let labels: Vec<[(&str, &str); 3]> = status
            .iter()
            .zip(&backends)
            .map(|((k, s), b)| [("service", k.service.as_str()), ("backend", b.as_str()), ("check", s.kind)])
            .collect();
        let up: Vec<(&[(&str, &str)], i64)> =
            status.values().zip(&labels).map(|(s, l)| (&l[..], i64::from(s.up))).collect();
        gauge(
            e,
            "vipgate_backend_health",
            "1 while the backend passes its service's health check (takes new flows), 0 while it fails it.",
            &up,
        )?;
        let result_labels: Vec<[(&str, &str); 4]> = labels
            .iter()
            .flat_map(|l| [[l[0], l[1], l[2], ("result", "success")], [l[0], l[1], l[2], ("result", "failure")]])
            .collect();
        let probes: Vec<(&[(&str, &str)], u64)> = status
            .values()
            .flat_map(|s| [s.probes_ok, s.probes_failed])
            .zip(&result_labels)
            .map(|(v, l)| (&l[..], v))
            .collect();
        counter(e, "vipgate_health_probes", "Health-check probes of the backend, by result.", &probes)?;
        Ok(())
    }
}

/// Reads the gateway on each scrape.
struct GatewayCollector {
    view: Arc<dyn GatewayView>,
}

impl std::fmt::Debug for GatewayCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayCollector")
    }
}

/// One worker's counters, read once.
struct WorkerSample {
    worker: String,
    c: Values,
    /// How long ago the worker last completed a loop iteration.
    since_last_loop: Option<std::time::Duration>,
}

/// The values of [`WorkerCounters`], loaded once per scrape so every family
/// shows the same reading.
#[derive(Default)]
struct Values {
    rx_packets: u64,
    rx_bytes: u64,
    tx_packets: u64,
    tx_bytes: u64,
    handoff_out: u64,
    handoff_in: u64,
    to_kernel: u64,
    to_kernel_bytes: u64,
    to_kernel_control: u64,
    from_kernel: u64,
    from_kernel_bytes: u64,
    flows_created: u64,
    flows_evicted: u64,
    flows_rehashed: u64,
    flows_reset: u64,
    flows_active: u64,
    busy_polls: u64,
    busy_cycles: u64,
    fragments_forwarded: u64,
    fragments_held: u64,
    fragments_released: u64,
    fragments_discarded: u64,
    drops: [u64; DropReason::COUNT],
}

impl Values {
    fn read(c: &WorkerCounters) -> Values {
        let mut drops = [0; DropReason::COUNT];
        for r in DropReason::ALL {
            drops[r as usize] = c.drops(r);
        }
        Values {
            rx_packets: c.rx_packets.get(),
            rx_bytes: c.rx_bytes.get(),
            tx_packets: c.tx_packets.get(),
            tx_bytes: c.tx_bytes.get(),
            handoff_out: c.handoff_out.get(),
            handoff_in: c.handoff_in.get(),
            to_kernel: c.to_kernel.get(),
            to_kernel_bytes: c.to_kernel_bytes.get(),
            to_kernel_control: c.to_kernel_control.get(),
            from_kernel: c.from_kernel.get(),
            from_kernel_bytes: c.from_kernel_bytes.get(),
            flows_created: c.flows_created.get(),
            flows_evicted: c.flows_evicted.get(),
            flows_rehashed: c.flows_rehashed.get(),
            flows_reset: c.flows_reset.get(),
            flows_active: c.flows_active.get(),
            busy_polls: c.busy_polls.get(),
            busy_cycles: c.busy_cycles.get(),
            fragments_forwarded: c.fragments_forwarded.get(),
            fragments_held: c.fragments_held.get(),
            fragments_released: c.fragments_released.get(),
            fragments_discarded: c.fragments_discarded.get(),
            drops,
        }
    }
}

/// A per-worker counter family: name (without `_total`), help, and how to
/// read it.
type WorkerField = (&'static str, &'static str, fn(&Values) -> u64);

const WORKER_COUNTERS: &[WorkerField] = &[
    ("vipgate_worker_rx_packets", "Packets received from all ports by the worker.", |v| v.rx_packets),
    ("vipgate_worker_rx_bytes", "Bytes received from all ports by the worker.", |v| v.rx_bytes),
    ("vipgate_worker_tx_packets", "Packets the worker handed to a port and the port accepted.", |v| v.tx_packets),
    ("vipgate_worker_tx_bytes", "Bytes of vipgate_worker_tx_packets.", |v| v.tx_bytes),
    (
        "vipgate_worker_handoff_out_packets",
        "Packets received by the worker whose flow another worker owns, handed to it.",
        |v| v.handoff_out,
    ),
    ("vipgate_worker_handoff_in_packets", "Packets the worker took from other workers' hand-off rings.", |v| {
        v.handoff_in
    }),
    (
        "vipgate_worker_to_kernel_packets",
        "Packets the worker punted to a port's kernel interface (the exception path).",
        |v| v.to_kernel,
    ),
    ("vipgate_worker_to_kernel_bytes", "Bytes of vipgate_worker_to_kernel_packets.", |v| v.to_kernel_bytes),
    (
        "vipgate_worker_to_kernel_control_packets",
        "The part of vipgate_worker_to_kernel_packets that were control protocols (ARP, BGP, BFD, OSPF, VRRP, IPv6 ND).",
        |v| v.to_kernel_control,
    ),
    (
        "vipgate_worker_from_kernel_packets",
        "Frames the kernel sent out of a port's kernel interface that the worker took to transmit.",
        |v| v.from_kernel,
    ),
    ("vipgate_worker_from_kernel_bytes", "Bytes of vipgate_worker_from_kernel_packets.", |v| v.from_kernel_bytes),
    ("vipgate_worker_flows_created", "Flows added to the worker's connection-tracking table.", |v| v.flows_created),
    ("vipgate_worker_flows_evicted", "Live flows pushed out of a full connection-tracking table.", |v| v.flows_evicted),
    ("vipgate_worker_flows_rehashed", "Flows moved to another backend after theirs left its service.", |v| {
        v.flows_rehashed
    }),
    (
        "vipgate_worker_flows_reset",
        "Flows reset because their backend left a service with on_backend_removal = \"reset\".",
        |v| v.flows_reset,
    ),
    ("vipgate_worker_busy_polls", "Worker loop iterations that received at least one packet.", |v| v.busy_polls),
    ("vipgate_worker_busy_cycles", "TSC cycles the worker spent in busy iterations (receive through transmit).", |v| {
        v.busy_cycles
    }),
    (
        "vipgate_worker_fragments_forwarded_packets",
        "Later IPv4 fragments translated as their datagram's first fragment was.",
        |v| v.fragments_forwarded,
    ),
    (
        "vipgate_worker_fragments_held_packets",
        "Later IPv4 fragments that came before their first and waited for it.",
        |v| v.fragments_held,
    ),
    ("vipgate_worker_fragments_released_packets", "Waiting fragments sent once their first was translated.", |v| {
        v.fragments_released
    }),
    (
        "vipgate_worker_fragments_discarded_packets",
        "Waiting fragments freed unsent (their first did not come in time, or their rewrite failed).",
        |v| v.fragments_discarded,
    ),
];

/// The bond ports' families, only when some port is a bond: per bond its
/// active members, per member its link, LACP state and traffic.
fn encode_bonds(e: &mut DescriptorEncoder, ports: &[PortView]) -> std::fmt::Result {
    let bonds: Vec<&PortView> = ports.iter().filter(|p| !p.members.is_empty()).collect();
    if bonds.is_empty() {
        return Ok(());
    }
    let bond_labels: Vec<[(&str, &str); 1]> = bonds.iter().map(|p| [("port", p.name.as_str())]).collect();
    let active_rows: Vec<(&[(&str, &str)], i64)> = bonds
        .iter()
        .zip(&bond_labels)
        .map(|(p, l)| (&l[..], p.members.iter().filter(|m| m.link.active).count() as i64))
        .collect();
    gauge(
        e,
        "vipgate_bond_active_members",
        "Members the bond counts active (link up, LACP running on them), as last read (twice a second).",
        &active_rows,
    )?;
    let members: Vec<(&BondMemberView, [(&str, &str); 2])> = bonds
        .iter()
        .flat_map(|p| p.members.iter().map(|m| (m, [("port", p.name.as_str()), ("member", m.link.device.as_str())])))
        .collect();
    type MemberGauge = (&'static str, &'static str, fn(&BondMemberView) -> Option<i64>);
    let gauges: [MemberGauge; 5] = [
        ("vipgate_bond_member_link_up", "1 while the member's link is up, 0 while it is down.", |m| {
            m.link.link.map(|l| i64::from(l.up))
        }),
        (
            "vipgate_bond_member_in_use",
            "1 while the member carries traffic both ways: selected, and both LACP sides in sync, collecting and distributing.",
            |m| Some(i64::from(m.link.in_use())),
        ),
        ("vipgate_bond_member_lacp_selected", "1 while LACP's selection attaches the member to the aggregate.", |m| {
            m.link.lacp.map(|l| i64::from(l.selection == LacpSelection::Selected))
        }),
        (
            "vipgate_bond_member_lacp_actor_state",
            "The LACP state bits the gateway advertises on the member (IEEE 802.1AX: 0x08 synchronization, 0x10 collecting, 0x20 distributing, 0x40 defaulted); absent while the member is not active.",
            |m| m.link.lacp.map(|l| i64::from(l.actor.state.0)),
        ),
        (
            "vipgate_bond_member_lacp_partner_state",
            "The LACP state bits the member's partner advertises, as last received; absent while the member is not active.",
            |m| m.link.lacp.map(|l| i64::from(l.partner.state.0)),
        ),
    ];
    for (name, help, read) in gauges {
        let rows: Vec<(&[(&str, &str)], i64)> = members.iter().filter_map(|(m, l)| Some((&l[..], read(m)?))).collect();
        gauge(e, name, help, &rows)?;
    }
    type MemberCounter = (&'static str, &'static str, fn(&PortStats) -> u64);
    let counters: [MemberCounter; 4] = [
        ("vipgate_bond_member_rx_packets", "Packets the member's driver received.", |s| s.ipackets),
        ("vipgate_bond_member_tx_packets", "Packets the member's driver sent.", |s| s.opackets),
        ("vipgate_bond_member_rx_bytes", "Bytes the member's driver received.", |s| s.ibytes),
        ("vipgate_bond_member_tx_bytes", "Bytes the member's driver sent.", |s| s.obytes),
    ];
    for (name, help, read) in counters {
        let rows: Vec<(&[(&str, &str)], u64)> = members.iter().map(|(m, l)| (&l[..], read(&m.stats))).collect();
        counter(e, name, help, &rows)?;
    }
    Ok(())
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(&[(&str, &str)], u64)],
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    // A single series without labels is written as `name_total 5`, not
    // `name_total{} 5`.
    if let &[(&[], value)] = rows {
        return ConstCounter::new(value).encode(family);
    }
    for (labels, value) in rows {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(&[(&str, &str)], V)],
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    // As for counters: a single series without labels has no `{}`.
    if let &[(&[], value)] = rows {
        return ConstGauge::new(value).encode(family);
    }
    for (labels, value) in rows {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// A per-service or per-backend counter: name (without `_total`), help, and
/// how to read it.
type TrafficField = (&'static str, &'static str, fn(&SlotTotals) -> u64);

const TRAFFIC_COUNTERS: [TrafficField; 5] = [
    ("connections", "Flows created towards", |t| t.connections),
    ("incoming_packets", "Packets from clients to", |t| t.in_packets),
    ("incoming_bytes", "IPv4 bytes from clients to", |t| t.in_bytes),
    ("outgoing_packets", "Packets back to clients from (none in DSR mode)", |t| t.out_packets),
    ("outgoing_bytes", "IPv4 bytes back to clients from (none in DSR mode)", |t| t.out_bytes),
];

impl GatewayCollector {
    /// Per-service and per-backend families: node_exporter's ipvs backend
    /// gauges (same names and labels) and vipgate's counters.
    fn encode_services(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let services = self.view.service_stats(None);
        struct Row {
            service: String,
            vip: String,
            port: String,
            proto: &'static str,
            address: String,
            bport: String,
        }
        let mut rows = Vec::new();
        let mut values = Vec::new();
        for s in &services {
            let proto = if s.service.protocol == "udp" { "UDP" } else { "TCP" };
            for b in &s.backends {
                rows.push(Row {
                    service: s.service.name.clone(),
                    vip: std::net::Ipv4Addr::from(s.service.vip).to_string(),
                    port: s.service.port.to_string(),
                    proto,
                    address: b.addr.to_string(),
                    bport: b.port.to_string(),
                });
                values.push((b.weight, b.totals));
            }
        }
        let ipvs_labels: Vec<[(&str, &str); 6]> = rows
            .iter()
            .map(|r| {
                [
                    ("local_address", r.vip.as_str()),
                    ("local_port", r.port.as_str()),
                    ("local_mark", ""),
                    ("proto", r.proto),
                    ("remote_address", r.address.as_str()),
                    ("remote_port", r.bport.as_str()),
                ]
            })
            .collect();
        let ipvs = |read: &dyn Fn(&(u32, SlotTotals)) -> u64| -> Vec<(&[(&str, &str)], u64)> {
            ipvs_labels.iter().zip(&values).map(|(l, v)| (&l[..], read(v))).collect()
        };
        gauge(
            e,
            "node_ipvs_backend_connections_active",
            "Tracked TCP flows in the established state, per backend.",
            &ipvs(&|v| v.1.active),
        )?;
        gauge(
            e,
            "node_ipvs_backend_connections_inactive",
            "Other tracked flows (TCP handshakes and closes, UDP), per backend.",
            &ipvs(&|v| v.1.inactive),
        )?;
        gauge(
            e,
            "node_ipvs_backend_weight",
            "The backend's weight in force (0 while draining).",
            &ipvs(&|v| u64::from(v.0)),
        )?;

        let backend_labels: Vec<[(&str, &str); 3]> = rows
            .iter()
            .map(|r| [("service", r.service.as_str()), ("address", r.address.as_str()), ("port", r.bport.as_str())])
            .collect();
        let service_labels: Vec<[(&str, &str); 1]> =
            services.iter().map(|s| [("service", s.service.name.as_str())]).collect();
        let per_service = |read: fn(&SlotTotals) -> u64| -> Vec<(&[(&str, &str)], u64)> {
            service_labels.iter().zip(&services).map(|(l, s)| (&l[..], read(&s.totals))).collect()
        };
        for (name, help, read) in TRAFFIC_COUNTERS {
            let per_backend: Vec<(&[(&str, &str)], u64)> =
                backend_labels.iter().zip(&values).map(|(l, v)| (&l[..], read(&v.1))).collect();
            counter(e, &format!("vipgate_backend_{name}"), &format!("{help} the backend."), &per_backend)?;
            counter(
                e,
                &format!("vipgate_service_{name}"),
                &format!("{help} the service's backends (removed backends included)."),
                &per_service(read),
            )?;
        }
        gauge(
            e,
            "vipgate_service_flows_active",
            "Tracked TCP flows in the established state.",
            &per_service(|t| t.active),
        )?;
        gauge(
            e,
            "vipgate_service_flows_inactive",
            "Other tracked flows (TCP handshakes and closes, UDP).",
            &per_service(|t| t.inactive),
        )?;
        Ok(())
    }
}

impl Collector for GatewayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        gauge(
            e,
            "vipgate_build_info",
            "vipgated's version; the value is always 1.",
            &[(&[("version", env!("CARGO_PKG_VERSION"))], 1_i64)],
        )?;

        let samples: Vec<WorkerSample> = self
            .view
            .workers()
            .iter()
            .map(|w| WorkerSample {
                worker: w.lcore.to_string(),
                c: Values::read(&w.counters),
                since_last_loop: w.since_last_loop,
            })
            .collect();
        let labels: Vec<[(&str, &str); 1]> = samples.iter().map(|s| [("worker", s.worker.as_str())]).collect();
        let per_worker = |read: fn(&Values) -> u64| -> Vec<(&[(&str, &str)], u64)> {
            samples.iter().zip(&labels).map(|(s, l)| (&l[..], read(&s.c))).collect()
        };
        for (name, help, read) in WORKER_COUNTERS {
            counter(e, name, help, &per_worker(*read))?;
        }
        gauge(
            e,
            "vipgate_worker_flows_active",
            "Occupied connection-tracking slots of the worker (updated by housekeeping; expired flows count until swept).",
            &per_worker(|v| v.flows_active),
        )?;
        let per_packet: Vec<(&[(&str, &str)], f64)> = samples
            .iter()
            .zip(&labels)
            .map(|(s, l)| {
                let p = if s.c.rx_packets == 0 { 0.0 } else { s.c.busy_cycles as f64 / s.c.rx_packets as f64 };
                (&l[..], p)
            })
            .collect();
        gauge(
            e,
            "vipgate_worker_busy_cycles_per_packet",
            "vipgate_worker_busy_cycles divided by vipgate_worker_rx_packets since start (0 before the first packet).",
            &per_packet,
        )?;

        let loop_age: Vec<(&[(&str, &str)], f64)> =
            samples.iter().zip(&labels).filter_map(|(s, l)| Some((&l[..], s.since_last_loop?.as_secs_f64()))).collect();
        gauge(
            e,
            "vipgate_worker_loop_age_seconds",
            "Time since the worker last completed an iteration of its loop (a few microseconds busy, up to 10 ms asleep idle; 1 s or more makes the gateway NOT_SERVING).",
            &loop_age,
        )?;

        let drop_labels: Vec<[(&str, &str); 2]> = samples
            .iter()
            .flat_map(|s| DropReason::ALL.iter().map(move |r| [("worker", s.worker.as_str()), ("reason", r.name())]))
            .collect();
        let drop_rows: Vec<(&[(&str, &str)], u64)> = samples
            .iter()
            .flat_map(|s| DropReason::ALL.iter().map(move |r| s.c.drops[*r as usize]))
            .zip(&drop_labels)
            .map(|(v, l)| (&l[..], v))
            .collect();
        counter(e, "vipgate_worker_dropped_packets", "Packets the worker dropped, by reason.", &drop_rows)?;

        // node_exporter's ipvs collector names, summed over the workers, so
        // dashboards written for IPVS work unchanged.
        let sum = |read: fn(&Values) -> u64| samples.iter().fold(0u64, |a, s| a.wrapping_add(read(&s.c)));
        let none: &[(&str, &str)] = &[];
        counter(
            e,
            "node_ipvs_connections",
            "Flows created by all workers (vipgate_worker_flows_created summed).",
            &[(none, sum(|v| v.flows_created))],
        )?;
        counter(
            e,
            "node_ipvs_incoming_packets",
            "Packets received by all workers (vipgate_worker_rx_packets summed).",
            &[(none, sum(|v| v.rx_packets))],
        )?;
        counter(
            e,
            "node_ipvs_outgoing_packets",
            "Packets sent by all workers (vipgate_worker_tx_packets summed).",
            &[(none, sum(|v| v.tx_packets))],
        )?;
        counter(
            e,
            "node_ipvs_incoming_bytes",
            "Bytes received by all workers (vipgate_worker_rx_bytes summed).",
            &[(none, sum(|v| v.rx_bytes))],
        )?;
        counter(
            e,
            "node_ipvs_outgoing_bytes",
            "Bytes sent by all workers (vipgate_worker_tx_bytes summed).",
            &[(none, sum(|v| v.tx_bytes))],
        )?;

        self.encode_services(e)?;

        let ports: Vec<PortView> = self.view.ports();
        let port_labels: Vec<[(&str, &str); 1]> = ports.iter().map(|p| [("port", p.name.as_str())]).collect();
        type PortField = (&'static str, &'static str, fn(&PortView) -> u64);
        let port_fields: [PortField; 8] = [
            ("vipgate_port_rx_packets", "Packets the port's driver received (ipackets).", |p| p.stats.ipackets),
            ("vipgate_port_tx_packets", "Packets the port's driver sent (opackets).", |p| p.stats.opackets),
            ("vipgate_port_rx_bytes", "Bytes the port's driver received (ibytes).", |p| p.stats.ibytes),
            ("vipgate_port_tx_bytes", "Bytes the port's driver sent (obytes).", |p| p.stats.obytes),
            (
                "vipgate_port_rx_missed_packets",
                "Packets the NIC dropped because the receive queues were full (imissed).",
                |p| p.stats.imissed,
            ),
            ("vipgate_port_rx_errors", "Erroneous packets received (ierrors).", |p| p.stats.ierrors),
            ("vipgate_port_tx_errors", "Packets the port failed to send (oerrors).", |p| p.stats.oerrors),
            ("vipgate_port_rx_nombuf", "Receive buffer allocation failures (rx_nombuf).", |p| p.stats.rx_nombuf),
        ];
        for (name, help, read) in port_fields {
            let rows: Vec<(&[(&str, &str)], u64)> =
                ports.iter().zip(&port_labels).map(|(p, l)| (&l[..], read(p))).collect();
            counter(e, name, help, &rows)?;
        }
        // Ports whose driver does not report a link have no link series.
        let link_rows: Vec<(&[(&str, &str)], i64)> =
            ports.iter().zip(&port_labels).filter_map(|(p, l)| Some((&l[..], i64::from(p.link?.up)))).collect();
        gauge(
            e,
            "vipgate_port_link_up",
            "1 while the port's link is up, 0 while it is down, as last read (twice a second).",
            &link_rows,
        )?;
        let speed_rows: Vec<(&[(&str, &str)], i64)> = ports
            .iter()
            .zip(&port_labels)
            .filter_map(|(p, l)| Some((&l[..], i64::from(p.link.filter(|l| l.up)?.speed_mbps?))))
            .collect();
        gauge(
            e,
            "vipgate_port_link_speed_mbps",
            "The negotiated speed of the port's link while it is up.",
            &speed_rows,
        )?;
        let uplink_rows: Vec<(&[(&str, &str)], i64)> =
            ports.iter().zip(&port_labels).map(|(p, l)| (&l[..], i64::from(p.uplink))).collect();
        gauge(
            e,
            "vipgate_port_uplink",
            "1 if the port reaches the routers ([[ports]] uplink = true), else 0.",
            &uplink_rows,
        )?;
        encode_bonds(e, &ports)?;
        let statuses: Vec<_> = ports.iter().map(PortView::link_status).collect();
        gauge(
            e,
            "vipgate_uplinks_down",
            "1 while every uplink port's link is down (no VIP is announced then), else 0; always 0 without uplinks.",
            &[(none, i64::from(crate::link::uplinks_down(&statuses)))],
        )?;

        if let Some(a) = self.view.announce() {
            let announced = a.vips.values().filter(|v| v.announced).count() as i64;
            gauge(
                e,
                "vipgate_announce_vips",
                "VIPs on the announcement interface ([announce] interface), held-down ones included.",
                &[(none, announced)],
            )?;
            let vips: Vec<String> = a.vips.keys().map(ToString::to_string).collect();
            let labels: Vec<[(&str, &str); 1]> = vips.iter().map(|v| [("vip", v.as_str())]).collect();
            let announced_rows: Vec<(&[(&str, &str)], i64)> =
                labels.iter().zip(a.vips.values()).map(|(l, v)| (&l[..], i64::from(v.announced))).collect();
            gauge(
                e,
                "vipgate_vip_announced",
                "1 while the VIP is on the announcement interface (eligible, or within its hold-down), else 0.",
                &announced_rows,
            )?;
            let eligible_rows: Vec<(&[(&str, &str)], i64)> =
                labels.iter().zip(a.vips.values()).map(|(l, v)| (&l[..], i64::from(v.eligible))).collect();
            gauge(
                e,
                "vipgate_vip_eligible",
                "1 while at least one backend of one of the VIP's services can take new flows, else 0.",
                &eligible_rows,
            )?;
            counter(
                e,
                "vipgate_announce_errors",
                "Failed attempts to bring the announcement interface to the wanted state (each is retried).",
                &[(none, a.errors)],
            )?;
        }

        let pool = self.view.mempool();
        let pool_labels = [("pool", pool.name.as_str())];
        gauge(e, "vipgate_mempool_size_mbufs", "Mbufs in the packet buffer pool.", &[(&pool_labels[..], pool.size)])?;
        gauge(
            e,
            "vipgate_mempool_in_use_mbufs",
            "Mbufs taken from the packet buffer pool (per-lcore caches count as free).",
            &[(&pool_labels[..], pool.in_use)],
        )?;

        // Only when some port has a kernel interface.
        if let Some(x) = self.view.exception() {
            let none: &[(&str, &str)] = &[];
            counter(
                e,
                "vipgate_exception_kernel_tx_packets",
                "Packets the exception thread wrote to the ports' kernel interfaces.",
                &[(none, x.kernel_tx)],
            )?;
            counter(
                e,
                "vipgate_exception_kernel_tx_failed_packets",
                "Packets a kernel interface refused (freed).",
                &[(none, x.kernel_tx_failed)],
            )?;
            counter(
                e,
                "vipgate_exception_kernel_rx_packets",
                "Packets the exception thread read from the kernel interfaces and gave to a worker.",
                &[(none, x.kernel_rx)],
            )?;
        }
        Ok(())
    }
}
