//! The controller's Prometheus metrics and their HTTP endpoint.
//!
//! Owns: the metric families and `GET /metrics`. Must not: decide
//! anything; the reconciler and the gateway tasks count into it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing::warn;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GatewayLabel {
    gateway: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    pool: String,
}

/// The controller's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    reconcile_errors: Counter,
    push_errors: Family<GatewayLabel, Counter>,
    sync_seconds: Family<GatewayLabel, Histogram>,
    pool_assigned: Family<PoolLabel, Gauge>,
    pool_available: Family<PoolLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("vipgate_k8s");
        let reconciles = Counter::default();
        let reconcile_errors = Counter::default();
        let push_errors = Family::<GatewayLabel, Counter>::default();
        let sync_seconds = Family::<GatewayLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
        });
        let pool_assigned = Family::<PoolLabel, Gauge>::default();
        let pool_available = Family::<PoolLabel, Gauge>::default();
        registry.register("reconciles", "Services reconciled", reconciles.clone());
        registry.register("reconcile_errors", "Reconciles that failed and were retried", reconcile_errors.clone());
        registry.register("push_errors", "Failed pushes to a gateway", push_errors.clone());
        registry.register(
            "sync_seconds",
            "From the controller seeing a Service's change to a gateway having applied it",
            sync_seconds.clone(),
        );
        registry.register("pool_assigned_addresses", "A VipPool's addresses in use", pool_assigned.clone());
        registry.register("pool_available_addresses", "A VipPool's free addresses", pool_available.clone());
        Self { registry, reconciles, reconcile_errors, push_errors, sync_seconds, pool_assigned, pool_available }
    }
}

impl Metrics {
    /// Counts a reconcile.
    pub fn reconciled(&self) {
        self.reconciles.inc();
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self) {
        self.reconcile_errors.inc();
    }

    /// Counts a failed push.
    pub fn push_error(&self, gateway: &str) {
        self.push_errors.get_or_create(&GatewayLabel { gateway: gateway.to_owned() }).inc();
    }

    /// Records how long a change took to reach `gateway`.
    pub fn observe_sync(&self, gateway: &str, took: Duration) {
        self.sync_seconds.get_or_create(&GatewayLabel { gateway: gateway.to_owned() }).observe(took.as_secs_f64());
    }

    /// Sets a pool's usage.
    pub fn pool_usage(&self, pool: &str, assigned: u64, available: u64) {
        let l = PoolLabel { pool: pool.to_owned() };
        self.pool_assigned.get_or_create(&l).set(i64::try_from(assigned).unwrap_or(i64::MAX));
        self.pool_available.get_or_create(&l).set(i64::try_from(available).unwrap_or(i64::MAX));
    }

    /// Forgets a pool that went.
    pub fn pool_gone(&self, pool: &str) {
        let l = PoolLabel { pool: pool.to_owned() };
        self.pool_assigned.remove(&l);
        self.pool_available.remove(&l);
    }

    fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            warn!("cannot encode the metrics: {e}");
        }
        text
    }
}

/// Serves `GET /metrics` (and `/healthz`) on `listener` until the runtime
/// stops.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let metrics = Arc::clone(&metrics);
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, metrics.encode()),
                        "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
                        _ => (StatusCode::NOT_FOUND, "not found: try /metrics\n".to_owned()),
                    };
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = status;
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Binds the metrics endpoint, so a taken port fails the start.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::Metrics;

    /// `docs/kubernetes.md`'s "Metrics" section names every family the
    /// controller exports, and no other. The families are read from what
    /// the endpoint serves once every recording method has been called (a
    /// labelled family is not written before its first series: a new one
    /// needs its method called here); the section names each as its sample
    /// (`X_total` for a counter), with its labels in braces.
    #[test]
    fn the_kubernetes_guide_lists_every_metric_family_and_only_those() {
        let m = Metrics::default();
        m.reconciled();
        m.reconcile_failed();
        m.push_error("gw");
        m.observe_sync("gw", std::time::Duration::from_millis(20));
        m.pool_usage("pool", 1, 2);
        let code: BTreeSet<String> = m
            .encode()
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|rest| match rest.split_once(' ') {
                Some((name, "counter")) => format!("{name}_total"),
                Some((name, _)) => name.to_owned(),
                None => panic!("# TYPE without a type: {rest}"),
            })
            .collect();
        assert!(!code.is_empty(), "no family rendered");
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/kubernetes.md");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let section: Vec<&str> =
            text.lines().skip_while(|l| *l != "## Metrics").skip(1).take_while(|l| !l.starts_with("## ")).collect();
        assert!(!section.is_empty(), "no \"## Metrics\" section in {}", path.display());
        let docs: BTreeSet<String> = section
            .join("\n")
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|s| s.starts_with("vipgate_k8s_"))
            .map(|s| s.split('{').next().unwrap_or(s).to_owned())
            .collect();
        let undocumented: Vec<&String> = code.difference(&docs).collect();
        let unknown: Vec<&String> = docs.difference(&code).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "the controller's metrics and docs/kubernetes.md \"## Metrics\" disagree\n  exported, not documented: {undocumented:?}\n  documented, not exported: {unknown:?}"
        );
    }
}
