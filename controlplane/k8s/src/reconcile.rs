//! The Service reconciler: an address from the pools, the vipgate services
//! in the desired state, and the Service's status, conditions and Events.
//!
//! Owns: the finalizer, the per-Service flow (intent, pools, allocation,
//! translation), the status it writes, and the gate that keeps the gateways
//! from getting a partial state before every Service was seen once. Must
//! not: talk to the gateways (`gateway.rs` does, from the desired state).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};
use vipgate_controlplane::api::pb;

use crate::crd::{ForwardingMode, VipPool};
use crate::gateway::{Desired, SyncMap};
use crate::ipam::{Allocator, Request, ServiceKey};
use crate::metrics::Metrics;
use crate::pools::Pools;
use crate::service::{self, Intent};

/// The finalizer that holds a Service until the gateways dropped it and
/// its address is free.
pub const FINALIZER: &str = "vipgate.io/gateway";
/// The condition the controller keeps on each Service.
pub const CONDITION: &str = "vipgate.io/Synced";
/// The field manager of the controller's writes.
pub const MANAGER: &str = "vipgate-k8s";
/// How long a deleted Service waits for the gateways before the reconcile
/// is retried.
const DELETE_WAIT: Duration = Duration::from_secs(10);

/// A reconcile that failed; it is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The apiserver refused or failed a call.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The gateways did not confirm a removal in time.
    #[error("{0}")]
    Gateways(String),
}

/// The controller's state shared by every reconcile.
pub struct Ctx {
    /// The apiserver.
    pub client: Client,
    /// The cluster's name: the vipgate owner is `k8s/NAME` and every
    /// vipgate service's name starts with it.
    pub cluster: String,
    /// Serve LoadBalancer Services without a class too.
    pub default_class: bool,
    /// Publishes Events.
    pub recorder: Recorder,
    /// EndpointSlices.
    pub slices: Store<EndpointSlice>,
    /// Nodes.
    pub nodes: Store<Node>,
    /// VipPools.
    pub pools: Store<VipPool>,
    /// Namespaces, for the pools' namespace selectors.
    pub namespaces: Store<Namespace>,
    /// Allocations and pools.
    pub world: Mutex<World>,
    /// The state the gateways get.
    pub desired: watch::Sender<Desired>,
    /// What each gateway runs.
    pub sync: watch::Receiver<SyncMap>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Failures in a row per Service, for the retry backoff.
    pub failures: Mutex<HashMap<ServiceKey, u32>>,
    /// Reconciles every Service: sent when an address is freed, so that
    /// Services waiting for one get it.
    pub retry_all: tokio::sync::mpsc::UnboundedSender<()>,
}

/// Allocations and the validated pools.
#[derive(Default)]
pub struct World {
    /// Who holds which address.
    pub ipam: Allocator,
    /// The pools as last validated.
    pub pools: Pools,
    /// Each pool's name, uid and generation when they were validated: the
    /// apiserver moves a custom resource's generation on every change of
    /// its spec, and only then (status writes leave it).
    pool_specs: Vec<(String, String, i64)>,
    /// Services the first pass has not reconciled yet; the gateways get
    /// nothing until it is empty.
    pub unseen: Option<BTreeSet<ServiceKey>>,
}

impl World {
    /// Validates the pools again if a pool came, went or had its spec
    /// changed since the last time; costs a comparison of each pool's
    /// name, uid and generation otherwise.
    pub fn refresh_pools(&mut self, store: &Store<VipPool>) -> bool {
        let mut specs: Vec<(String, String, i64)> = store
            .state()
            .iter()
            .map(|p| (p.name_any(), p.metadata.uid.clone().unwrap_or_default(), p.metadata.generation.unwrap_or(0)))
            .collect();
        specs.sort();
        if specs == self.pool_specs {
            return false;
        }
        self.pools = Pools::new(store.state().iter().map(|p| p.as_ref()));
        self.ipam.set_pools(self.pools.ranges());
        self.pool_specs = specs;
        true
    }
}

fn key_of(svc: &Service) -> ServiceKey {
    ServiceKey { namespace: svc.namespace().unwrap_or_default(), name: svc.name_any() }
}

impl Ctx {
    /// The owner of every object the controller pushes.
    pub fn owner(&self) -> String {
        format!("k8s/{}", self.cluster)
    }

    /// Makes `services` the vipgate services of `key` (none: removes it),
    /// with the source pools they use. The new sequence number, or the
    /// current one if nothing changed.
    fn set_desired(&self, key: &ServiceKey, services: Option<Vec<pb::Service>>, world: &World) -> u64 {
        let mut seq = 0;
        self.desired.send_if_modified(|d| {
            let same = match (&services, d.services.get(key)) {
                (None, None) => true,
                (Some(new), Some(old)) => new == old.as_ref(),
                _ => false,
            };
            if same {
                seq = d.seq;
                return false;
            }
            d.seq += 1;
            let now = Instant::now();
            // Removals are timed for a while too (see Desired::removed).
            if d.removed.values().any(|(_, at)| now.duration_since(*at) >= crate::gateway::RESYNC) {
                d.removed = d
                    .removed
                    .iter()
                    .filter(|(_, (_, at))| now.duration_since(*at) < crate::gateway::RESYNC)
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
            }
            match services {
                Some(s) => {
                    d.services.insert(key.clone(), Arc::new(s));
                    d.changed.insert(key.clone(), (d.seq, now));
                    d.removed.remove(key);
                }
                None => {
                    d.services.remove(key);
                    d.changed.remove(key);
                    d.removed.insert(key.clone(), (d.seq, now));
                }
            }
            d.source_pools = source_pools(&self.cluster, d, world);
            seq = d.seq;
            true
        });
        seq
    }

    /// Marks `key` seen by the first pass; the last one opens the gate.
    fn seen(&self, key: &ServiceKey) {
        let mut w = self.world.lock().expect("world lock");
        let Some(unseen) = &mut w.unseen else { return };
        unseen.remove(key);
        if unseen.is_empty() {
            w.unseen = None;
            drop(w);
            info!("every Service seen: the gateways get the state");
            self.desired.send_modify(|d| d.seq += 1);
        }
    }

    /// Whether the first pass is over.
    pub fn gate_open(&self) -> bool {
        self.world.lock().expect("world lock").unseen.is_none()
    }

    async fn event(&self, svc: &Service, type_: EventType, reason: &str, note: String) {
        let ev = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
        if let Err(e) = self.recorder.publish(&ev, &svc.object_ref(&())).await {
            warn!("cannot publish Event {reason} on Service {}: {e}", key_of(svc));
        }
    }

    /// Waits until every gateway runs `seq` or later, at most `limit`.
    async fn wait_synced(&self, seq: u64, limit: Duration) -> Result<(), Error> {
        let mut rx = self.sync.clone();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let lagging: Vec<String> = rx
                .borrow_and_update()
                .iter()
                .filter(|(_, s)| s.seq.is_none_or(|s| s < seq))
                .map(|(n, s)| match &s.error {
                    Some(e) => format!("{n} ({e})"),
                    None => n.clone(),
                })
                .collect();
            if lagging.is_empty() {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(Error::Gateways(format!("gateways not yet updated: {}", lagging.join(", ")))),
            }
        }
    }
}

/// The source pools the desired services use.
fn source_pools(cluster: &str, d: &Desired, world: &World) -> imbl::OrdMap<String, pb::SourcePool> {
    let used: BTreeSet<&str> =
        d.services.values().flat_map(|l| l.iter()).map(|s| s.source_pool.as_str()).filter(|p| !p.is_empty()).collect();
    let mut out = imbl::OrdMap::new();
    for (name, p) in &world.pools.valid {
        let gw_name = service::source_pool_name(cluster, name);
        if p.spec.mode != ForwardingMode::Fullnat || !used.contains(gw_name.as_str()) {
            continue;
        }
        let src = p.spec.source_addresses.clone().unwrap_or_default();
        out.insert(
            gw_name.clone(),
            pb::SourcePool {
                name: gw_name,
                addresses: src.addresses.clone(),
                first_port: src.first_port.map_or(0, u32::from),
                last_port: src.last_port.map_or(0, u32::from),
                ..Default::default()
            },
        );
    }
    out
}

/// Where a Service's vipgate services stand on the gateways.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncState {
    /// Every gateway runs them.
    Synced,
    /// Some gateway has not applied them yet.
    Pending(String),
    /// A gateway refused them, or is failing.
    Failed(String),
    /// There is no VipGateway.
    NoGateway,
}

/// Where `key`'s services stand.
pub fn sync_state(desired: &Desired, sync: &SyncMap, key: &ServiceKey) -> SyncState {
    if sync.is_empty() {
        return SyncState::NoGateway;
    }
    let Some((seq, _)) = desired.changed.get(key) else { return SyncState::Pending("not in the desired state".into()) };
    let mut pending = Vec::new();
    for (name, s) in sync {
        if let Some(why) = s.refused.get(key) {
            return SyncState::Failed(format!("gateway {name} refused it: {why}"));
        }
        if s.seq.is_none_or(|v| v < *seq) {
            match &s.error {
                Some(e) => return SyncState::Failed(format!("gateway {name}: {e}")),
                None => pending.push(name.clone()),
            }
        }
    }
    if pending.is_empty() {
        SyncState::Synced
    } else {
        SyncState::Pending(format!("waiting for {}", pending.join(", ")))
    }
}

/// Reconciles one Service.
pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.metrics.reconciled();
    let key = key_of(&svc);
    let result = reconcile_inner(&svc, &ctx, &key).await;
    ctx.seen(&key);
    if result.is_ok() {
        ctx.failures.lock().expect("failures lock").remove(&key);
    }
    result
}

/// The retry of a failed reconcile: 1 s, doubling to 2 minutes.
pub fn error_policy(svc: Arc<Service>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.reconcile_failed();
    let key = key_of(&svc);
    let n = {
        let mut f = ctx.failures.lock().expect("failures lock");
        let n = f.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let wait = Duration::from_secs(1 << (n - 1).min(7)).min(Duration::from_secs(120));
    warn!(service = %key, "reconcile failed ({n} in a row), again in {wait:?}: {err}");
    Action::requeue(wait)
}

async fn reconcile_inner(svc: &Service, ctx: &Ctx, key: &ServiceKey) -> Result<Action, Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let has_finalizer = has_finalizer(svc);
    let ours = service::is_ours(svc, ctx.default_class);
    if svc.metadata.deletion_timestamp.is_some() || !ours {
        let held = ctx.world.lock().expect("world lock").ipam.address_of(key).is_some();
        if !has_finalizer && !held {
            return Ok(Action::await_change());
        }
        let seq = {
            let mut w = ctx.world.lock().expect("world lock");
            let freed = w.ipam.release(key);
            if let Some(ip) = freed {
                info!(service = %key, %ip, "address freed");
                let _ = ctx.retry_all.send(());
            }
            ctx.set_desired(key, None, &w)
        };
        if ctx.gate_open() {
            ctx.wait_synced(seq, DELETE_WAIT).await?;
        }
        if svc.metadata.deletion_timestamp.is_none() {
            // No longer a vipgate Service: its address and condition go.
            let status = json!({
                "apiVersion": "v1", "kind": "Service",
                "status": { "loadBalancer": { "ingress": [] }, "conditions": [] }
            });
            api.patch_status(&key.name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(status)).await?;
        }
        if has_finalizer {
            let rest: Vec<&String> = svc.finalizers().iter().filter(|f| *f != FINALIZER).collect();
            let patch = json!({ "metadata": { "finalizers": rest, "resourceVersion": svc.resource_version() } });
            api.patch(&key.name, &PatchParams::default(), &Patch::Merge(patch)).await?;
            info!(service = %key, "removed from the gateways; finalizer released");
        }
        return Ok(Action::await_change());
    }
    if !has_finalizer {
        let mut list: Vec<String> = svc.finalizers().to_vec();
        list.push(FINALIZER.into());
        let patch = json!({ "metadata": { "finalizers": list, "resourceVersion": svc.resource_version() } });
        api.patch(&key.name, &PatchParams::default(), &Patch::Merge(patch)).await?;
    }
    let intent = match service::intent(svc) {
        Ok(i) => i,
        Err(e) => {
            let msg = format!("{e}; the Service keeps what it had");
            if set_condition(svc, &api, false, "InvalidService", &msg, current_ip(svc)).await? {
                ctx.event(svc, EventType::Warning, "InvalidService", msg).await;
            }
            return Ok(Action::await_change());
        }
    };
    let slices: Vec<Arc<EndpointSlice>> = ctx.slices.state_filter(|s| {
        s.metadata.namespace.as_deref() == Some(&key.namespace)
            && s.labels().get("kubernetes.io/service-name").is_some_and(|n| *n == key.name)
    });
    let nodes = service::node_backends(ctx.nodes.state().iter().map(|n| n.as_ref()));
    let outcome = {
        let mut w = ctx.world.lock().expect("world lock");
        w.refresh_pools(&ctx.pools);
        allocate(ctx, &mut w, &intent, &slices, &nodes)
    };
    match outcome {
        Err(why) => {
            let had = current_ip(svc);
            let msg = if had.is_some() { format!("{why}; the Service keeps its address") } else { why };
            if set_condition(svc, &api, false, "AllocationFailed", &msg, had).await? {
                ctx.event(svc, EventType::Warning, "AllocationFailed", msg).await;
            }
            // A freed address, or a new pool, retries it at once; this is
            // the backstop.
            Ok(Action::requeue(Duration::from_secs(60)))
        }
        Ok((ip, pool)) => {
            let was = current_ip(svc);
            let state = sync_state(&ctx.desired.borrow(), &ctx.sync.borrow(), key);
            let (ok, reason, msg) = match &state {
                SyncState::Synced => (true, "GatewaySynced", format!("{ip} is served by every gateway")),
                SyncState::Pending(m) => (false, "Pending", format!("{ip} from VipPool {pool}: {m}")),
                SyncState::Failed(m) => (false, "GatewayFailed", m.clone()),
                SyncState::NoGateway => (false, "NoGateway", "no VipGateway exists to serve it".to_owned()),
            };
            // A pending change does not overwrite a condition already
            // written: under endpoint churn the condition would flap.
            let write = !matches!(state, SyncState::Pending(_)) || !has_condition(svc) || was != Some(ip);
            let changed = if write { set_condition(svc, &api, ok, reason, &msg, Some(ip)).await? } else { false };
            if was != Some(ip) {
                info!(service = %key, %ip, pool, "address assigned");
                ctx.event(svc, EventType::Normal, "IPAllocated", format!("{ip} from VipPool {pool}")).await;
            }
            if changed {
                match state {
                    SyncState::Synced => ctx.event(svc, EventType::Normal, "GatewaySynced", msg).await,
                    SyncState::Failed(_) => ctx.event(svc, EventType::Warning, "GatewayFailed", msg).await,
                    _ => {}
                }
            }
            Ok(Action::requeue(Duration::from_secs(600)))
        }
    }
}

/// Allocates and puts the Service's vipgate services in the desired
/// state: its address and pool, or why it got none.
fn allocate(
    ctx: &Ctx,
    w: &mut World,
    intent: &Intent,
    slices: &[Arc<EndpointSlice>],
    nodes: &BTreeMap<String, service::NodeBackend>,
) -> Result<(Ipv4Addr, String), String> {
    let ns_labels = ctx
        .namespaces
        .get(&ObjectRef::new(&intent.key.namespace))
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    let pools = w.pools.candidates(intent, &ns_labels)?;
    if pools.is_empty() {
        return Err(match intent.address {
            Some(ip) => format!("{ip} is in no VipPool this Service may use"),
            None => "no VipPool may serve this Service (none auto-assigns to it)".into(),
        });
    }
    let request = Request { pools, address: intent.address };
    let ip = w.ipam.assign(&intent.key, &request, &intent.claim()).map_err(|e| e.to_string())?;
    let (pool_name, pool) =
        w.pools.of(ip).map(|(n, p)| (n.to_owned(), p.spec.clone())).ok_or("the address is in no pool")?;
    let refs: Vec<&EndpointSlice> = slices.iter().map(|s| s.as_ref()).collect();
    let services = service::translate(&ctx.cluster, intent, ip, &pool_name, &pool, &refs, nodes);
    debug!(service = %intent.key, count = services.len(), "desired");
    ctx.set_desired(&intent.key, Some(services), w);
    Ok((ip, pool_name))
}

/// The address the Service's status shows (its first IPv4 ingress).
pub fn current_ip(svc: &Service) -> Option<Ipv4Addr> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .iter()
        .find_map(|i| i.ip.as_deref().and_then(|ip| ip.parse().ok()))
}

/// Whether the Service carries the controller's finalizer.
pub fn has_finalizer(svc: &Service) -> bool {
    svc.finalizers().iter().any(|f| f == FINALIZER)
}

fn has_condition(svc: &Service) -> bool {
    svc.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| c.iter().any(|c| c.type_ == CONDITION))
}

/// Writes the Service's address and condition if either differs from its
/// status. Whether the condition's status or reason changed.
async fn set_condition(
    svc: &Service,
    api: &Api<Service>,
    ok: bool,
    reason: &str,
    message: &str,
    ip: Option<Ipv4Addr>,
) -> Result<bool, Error> {
    let status = if ok { "True" } else { "False" };
    let old =
        svc.status.as_ref().and_then(|s| s.conditions.as_ref()).and_then(|c| c.iter().find(|c| c.type_ == CONDITION));
    let same_condition = old.is_some_and(|c| c.status == status && c.reason == reason && c.message == message);
    let flipped = old.is_none_or(|c| c.status != status || c.reason != reason);
    if same_condition && current_ip(svc) == ip {
        return Ok(false);
    }
    let since = match old {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(k8s_openapi::jiff::Timestamp::now()),
    };
    let condition = Condition {
        type_: CONDITION.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.chars().take(32 * 1024).collect(),
        last_transition_time: since,
        observed_generation: svc.metadata.generation,
    };
    let ingress: Vec<serde_json::Value> =
        ip.iter().map(|ip| json!({ "ip": ip.to_string(), "ipMode": "VIP" })).collect();
    let patch = json!({
        "apiVersion": "v1", "kind": "Service",
        "status": { "loadBalancer": { "ingress": ingress }, "conditions": [condition] }
    });
    api.patch_status(&svc.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await?;
    Ok(flipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{VipPoolSpec, VipPoolStatus};
    use kube::runtime::{reflector, watcher};

    fn pool(name: &str, generation: i64, addresses: &str, assigned: u64) -> VipPool {
        let mut p = VipPool::new(name, VipPoolSpec { addresses: vec![addresses.to_owned()], ..VipPoolSpec::default() });
        p.metadata.uid = Some(format!("uid-{name}"));
        p.metadata.generation = Some(generation);
        p.status = Some(VipPoolStatus { assigned, available: 16 - assigned, conditions: vec![] });
        p
    }

    #[test]
    fn pools_are_validated_again_only_when_one_comes_goes_or_has_its_spec_changed() {
        let (store, mut writer) = reflector::store::<VipPool>();
        let mut world = World::default();
        let mut event = |e: watcher::Event<VipPool>| writer.apply_watcher_event(&e);
        event(watcher::Event::Apply(pool("a", 1, "198.18.100.64/28", 0)));
        assert!(world.refresh_pools(&store), "a new pool");
        assert_eq!(world.pools.ranges().len(), 1);
        assert!(!world.refresh_pools(&store), "nothing changed");
        // A status write (the controller's own) leaves the generation.
        event(watcher::Event::Apply(pool("a", 1, "198.18.100.64/28", 3)));
        assert!(!world.refresh_pools(&store), "only the status changed");
        // A spec change moves it.
        event(watcher::Event::Apply(pool("a", 2, "198.18.100.80/28", 3)));
        assert!(world.refresh_pools(&store), "the spec changed");
        assert!(!world.refresh_pools(&store));
        event(watcher::Event::Apply(pool("b", 1, "198.18.101.0/28", 0)));
        assert!(world.refresh_pools(&store), "a second pool");
        assert_eq!(world.pools.ranges().len(), 2);
        event(watcher::Event::Delete(pool("b", 1, "198.18.101.0/28", 0)));
        assert!(world.refresh_pools(&store), "a pool went");
        assert_eq!(world.pools.ranges().len(), 1);
        // Deleted and created again under the same name: a new uid.
        event(watcher::Event::Delete(pool("a", 2, "198.18.100.80/28", 3)));
        let mut again = pool("a", 2, "198.18.100.64/28", 0);
        again.metadata.uid = Some("uid-a-again".to_owned());
        event(watcher::Event::Apply(again));
        assert!(world.refresh_pools(&store), "a pool recreated with the same name and generation");
    }
}
