//! Pushing the desired state to every VipGateway's vipgated.
//!
//! Owns: one task per gateway that dials it, reads its generation, and
//! sends the whole state of the controller's owner in one owner-scoped
//! Apply whenever the state changes (and every `RESYNC`, which changes
//! nothing on a gateway that runs it already); the record of what each
//! gateway runs. Must not: compute the state (`reconcile.rs`), or touch
//! another owner's objects (the Apply is scoped to the owner).
//!
//! Changes that arrive while an Apply is in flight are sent together in
//! the next one, so a burst costs a few Applies, not one each.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::Channel;
use tracing::{info, warn};
use vipgate_controlplane::api::pb;
use vipgate_controlplane::api::pb::service_manager_client::ServiceManagerClient;
use vipgate_controlplane::api::{self, TlsClientPem};

use crate::crd::VipGatewaySpec;
use crate::ipam::ServiceKey;

/// How often a gateway gets the whole state again though nothing changed:
/// it repairs a gateway whose state was changed behind the controller.
pub const RESYNC: Duration = Duration::from_secs(30);
/// The longest wait between two attempts on a failing gateway.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A call to a gateway that takes longer has failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// The state the controller wants on every gateway.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// False until the controller has seen every Service once: nothing is
    /// pushed before, so that a restart never pushes a partial state.
    pub ready: bool,
    /// Counted up by every change.
    pub seq: u64,
    /// The vipgate services of each Kubernetes Service.
    pub services: imbl::OrdMap<ServiceKey, Arc<Vec<pb::Service>>>,
    /// The source pools of the fullnat VipPools.
    pub source_pools: imbl::OrdMap<String, pb::SourcePool>,
    /// When each Service's entry last changed, by the `seq` that changed
    /// it, for the sync-latency metric.
    pub changed: imbl::OrdMap<ServiceKey, (u64, Instant)>,
    /// The same for Services whose entry was removed (deleted, or no longer
    /// of type LoadBalancer), kept for [`RESYNC`]: by then every gateway
    /// that answers has applied the removal.
    pub removed: imbl::OrdMap<ServiceKey, (u64, Instant)>,
}

/// What one gateway runs, as far as the controller knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewaySync {
    /// The `Desired::seq` the gateway last applied, if any.
    pub seq: Option<u64>,
    /// vipgated's version after that.
    pub version: u64,
    /// The vipgate services it runs for the cluster.
    pub services: u64,
    /// Why the last attempt failed, if it did.
    pub error: Option<String>,
    /// Services the gateway refused, with its reason: left out of the
    /// pushes so that the others are served.
    pub refused: BTreeMap<ServiceKey, String>,
}

/// Every gateway's sync, by VipGateway name.
pub type SyncMap = BTreeMap<String, GatewaySync>;

/// What a gateway task needs.
#[derive(Clone)]
pub struct GatewayTask {
    /// The VipGateway's name.
    pub name: String,
    /// Its spec.
    pub spec: VipGatewaySpec,
    /// The owner of the objects pushed.
    pub owner: String,
    /// The desired state.
    pub desired: watch::Receiver<Desired>,
    /// Where it reports.
    pub sync: watch::Sender<SyncMap>,
    /// Reads the credentials Secret.
    pub client: kube::Client,
    /// The sync-latency histogram.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl GatewayTask {
    fn report(&self, f: impl FnOnce(&mut GatewaySync)) {
        self.sync.send_modify(|m| f(m.entry(self.name.clone()).or_default()));
    }

    /// Runs until dropped (the supervisor aborts it when the VipGateway
    /// changes or goes).
    ///
    /// Besides the pushes, it keeps a Watch of the owner's objects open on
    /// the gateway: its end (vipgated restarted, the connection broke) or
    /// a change the controller did not make (someone edited its objects)
    /// pushes the whole state again at once, so a gateway that lost or
    /// changed the state gets it back without waiting for the resync.
    pub async fn run(mut self) {
        let mut conn: Option<ServiceManagerClient<Channel>> = None;
        let mut generation: Option<u64> = None;
        let mut pushed: Option<u64> = None;
        let mut refused: BTreeMap<ServiceKey, String> = BTreeMap::new();
        let mut watch: Option<tonic::Streaming<pb::WatchEvent>> = None;
        // The versions the controller's own Applies produced: a change at
        // any other version that touches the owner was someone else's.
        let mut own_versions: std::collections::VecDeque<u64> = Default::default();
        let mut backoff = Duration::from_millis(100);
        let mut last_push = Instant::now();
        loop {
            let desired = self.desired.borrow_and_update().clone();
            if desired.ready && (pushed != Some(desired.seq) || last_push.elapsed() >= RESYNC) {
                // Services the gateway refused stay out until they change.
                refused.retain(|k, _| desired.changed.get(k).is_some_and(|(seq, _)| pushed.is_some_and(|p| *seq <= p)));
                match self.push(&mut conn, &mut generation, &desired, &mut refused).await {
                    Ok((version, services)) => {
                        let now = Instant::now();
                        for (k, (seq, at)) in desired.changed.iter() {
                            if pushed.is_none_or(|p| *seq > p) && !refused.contains_key(k) {
                                self.metrics.observe_sync(&self.name, now - *at);
                            }
                        }
                        for (seq, at) in desired.removed.values() {
                            if pushed.is_some_and(|p| *seq > p) {
                                self.metrics.observe_sync(&self.name, now - *at);
                            }
                        }
                        if pushed.is_none() {
                            info!(gateway = %self.name, version, services, "gateway synced");
                        }
                        pushed = Some(desired.seq);
                        last_push = now;
                        backoff = Duration::from_millis(100);
                        own_versions.push_back(version);
                        while own_versions.len() > 64 {
                            own_versions.pop_front();
                        }
                        let refused = refused.clone();
                        self.report(|s| {
                            *s = GatewaySync { seq: Some(desired.seq), version, services, error: None, refused }
                        });
                    }
                    Err(e) => {
                        warn!(gateway = %self.name, "push failed: {e}; next attempt in {backoff:?}");
                        self.metrics.push_error(&self.name);
                        self.report(|s| s.error = Some(e));
                        watch = None;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            if watch.is_none()
                && let Some(client) = conn.as_mut()
            {
                match client.watch(pb::WatchRequest { owner: self.owner.clone() }).await {
                    Ok(stream) => watch = Some(stream.into_inner()),
                    Err(e) => warn!(gateway = %self.name, "cannot watch the gateway: {}", describe(&e)),
                }
            }
            let wait = RESYNC.saturating_sub(last_push.elapsed());
            let event = async {
                match watch.as_mut() {
                    Some(w) => w.message().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = self.desired.changed() => if r.is_err() { return },
                () = tokio::time::sleep(wait) => {}
                ev = event => match ev {
                    Ok(Some(pb::WatchEvent { version, event: Some(event) })) => {
                        let foreign = match event {
                            pb::watch_event::Event::Snapshot(s) => s.generations.get(&self.owner).copied() != generation,
                            pb::watch_event::Event::Change(c) => {
                                c.owners.contains(&self.owner) && !own_versions.contains(&version)
                            }
                            pb::watch_event::Event::Health(_) => false,
                        };
                        if foreign && pushed.is_some() {
                            info!(gateway = %self.name, version, "the owner's objects changed on the gateway: pushing again");
                            pushed = None;
                            generation = None;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        info!(gateway = %self.name, "connection to the gateway lost: pushing again");
                        watch = None;
                        conn = None;
                        generation = None;
                        pushed = None;
                    }
                },
            }
        }
    }

    async fn connect(&self) -> Result<ServiceManagerClient<Channel>, String> {
        let ep = self.spec.endpoint.trim();
        let channel = if let Some(path) = ep.strip_prefix("unix://") {
            api::connect_unix_channel(std::path::Path::new(path)).await.map_err(|e| match e {
                api::ApiError::Connect { path, reason, .. } => {
                    format!("cannot connect to vipgated's socket {}: {reason}", path.display())
                }
                e => e.to_string(),
            })?
        } else if ep.starts_with("https://") {
            let r =
                self.spec.credentials_secret.as_ref().ok_or(
                    "spec.credentialsSecret: an https endpoint needs the Secret with tls.crt, tls.key and ca.crt",
                )?;
            let secret = Api::<Secret>::namespaced(self.client.clone(), &r.namespace)
                .get(&r.name)
                .await
                .map_err(|e| format!("spec.credentialsSecret: cannot read Secret {}/{}: {e}", r.namespace, r.name))?;
            let data = secret.data.unwrap_or_default();
            let get = |k: &str| {
                data.get(k)
                    .map(|v| v.0.clone())
                    .ok_or_else(|| format!("spec.credentialsSecret: Secret {}/{} has no {k}", r.namespace, r.name))
            };
            let pem = TlsClientPem { cert: get("tls.crt")?, key: get("tls.key")?, ca: get("ca.crt")? };
            api::connect_tls_channel(ep, &pem).await.map_err(|e| e.to_string())?
        } else {
            return Err(format!("spec.endpoint: {ep:?} is neither https://HOST:PORT nor unix:///PATH"));
        };
        Ok(ServiceManagerClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20))
    }

    /// One Apply of `desired`, leaving out the `refused` Services; a
    /// Service the gateway refuses joins them and the Apply is tried again
    /// without it. The gateway's version and service count.
    async fn push(
        &self,
        conn: &mut Option<ServiceManagerClient<Channel>>,
        generation: &mut Option<u64>,
        desired: &Desired,
        refused: &mut BTreeMap<ServiceKey, String>,
    ) -> Result<(u64, u64), String> {
        // Each round either succeeds, or refuses one more Service, or
        // fails: it ends.
        for _ in 0..=desired.services.len() + 1 {
            if conn.is_none() {
                *conn = Some(self.connect().await?);
                *generation = None;
            }
            let client = conn.as_mut().expect("connected above");
            if generation.is_none() {
                let mut req = tonic::Request::new(pb::GetStateRequest { owner: self.owner.clone() });
                req.set_timeout(CALL_TIMEOUT);
                match client.get_state(req).await {
                    Ok(r) => *generation = Some(r.into_inner().generations.get(&self.owner).copied().unwrap_or(0)),
                    Err(e) => {
                        *conn = None;
                        return Err(describe(&e));
                    }
                }
            }
            let mut services = Vec::new();
            for (k, list) in desired.services.iter() {
                if !refused.contains_key(k) {
                    services.extend(list.iter().cloned());
                }
            }
            let count = services.len() as u64;
            let mut req = tonic::Request::new(pb::ApplyRequest {
                expected_version: 0,
                services,
                source_pools: desired.source_pools.values().cloned().collect(),
                owner: self.owner.clone(),
                expected_generation: generation.unwrap_or(0),
            });
            req.set_timeout(CALL_TIMEOUT);
            match client.apply(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    *generation = Some(r.generation);
                    return Ok((r.version, count));
                }
                Err(e) if e.code() == Code::FailedPrecondition && e.message().contains("expected_generation") => {
                    // Someone else changed the owner's objects (or the
                    // gateway lost them): read the generation again and
                    // replace them.
                    *generation = None;
                }
                Err(e)
                    if matches!(e.code(), Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists) =>
                {
                    let Some(key) = blamed(desired, e.message()) else { return Err(describe(&e)) };
                    warn!(gateway = %self.name, service = %key, "gateway refused the Service: {}", e.message());
                    refused.insert(key, e.message().to_owned());
                }
                Err(e) => {
                    if matches!(e.code(), Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled)
                    {
                        *conn = None;
                    }
                    return Err(describe(&e));
                }
            }
        }
        Err("the gateway refused every Service".into())
    }
}

fn describe(e: &tonic::Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}

/// The Kubernetes Service whose vipgate service an error names
/// (`services["NAME"].field: ...`).
fn blamed(desired: &Desired, message: &str) -> Option<ServiceKey> {
    let rest = message.split_once("services[\"")?.1;
    let name = rest.split_once("\"]")?.0;
    desired.services.iter().find(|(_, list)| list.iter().any(|s| s.name == name)).map(|(k, _)| k.clone())
}

/// Starts, restarts and stops the gateway tasks as VipGateways come,
/// change and go.
#[derive(Default)]
pub struct Gateways {
    running: BTreeMap<String, (VipGatewaySpec, tokio::task::JoinHandle<()>)>,
}

impl Gateways {
    /// Makes the running tasks those of `gateways`.
    pub fn set(&mut self, gateways: BTreeMap<String, VipGatewaySpec>, template: &GatewayTask) {
        let gone: Vec<String> = self.running.keys().filter(|n| !gateways.contains_key(*n)).cloned().collect();
        for name in gone {
            if let Some((_, task)) = self.running.remove(&name) {
                task.abort();
            }
            template.sync.send_modify(|m| {
                m.remove(&name);
            });
            info!(gateway = %name, "gateway removed");
        }
        for (name, spec) in gateways {
            if self.running.get(&name).is_some_and(|(s, _)| *s == spec) {
                continue;
            }
            if let Some((_, task)) = self.running.remove(&name) {
                task.abort();
            }
            template.sync.send_modify(|m| {
                m.insert(name.clone(), GatewaySync::default());
            });
            let task = GatewayTask { name: name.clone(), spec: spec.clone(), ..template.clone() };
            info!(gateway = %name, endpoint = %spec.endpoint, "gateway added");
            self.running.insert(name, (spec, tokio::spawn(task.run())));
        }
    }

    /// The gateways' names.
    pub fn names(&self) -> BTreeSet<String> {
        self.running.keys().cloned().collect()
    }
}
