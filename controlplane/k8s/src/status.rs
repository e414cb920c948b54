//! The status of the controller's own resources, and the triggers that
//! bring a Service's condition up to date when a gateway catches up.
//!
//! Owns: VipPool status (usage, validity, and an Event when a pool is
//! refused), VipGateway status (the Synced condition, version, count), and
//! the stream of Services whose sync state changed. Must not: write a
//! Service (its reconcile does).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::crd::{VipGateway, VipPool};
use crate::gateway::SyncMap;
use crate::ipam::ServiceKey;
use crate::reconcile::{Ctx, MANAGER, SyncState, sync_state};

/// How often the resources' status is brought up to date at most.
const PERIOD: Duration = Duration::from_millis(500);

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    old: &[Condition],
    generation: Option<i64>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: since,
        observed_generation: generation,
    }
}

fn same(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.type_ == y.type_ && x.status == y.status && x.reason == y.reason && x.message == y.message)
}

/// Keeps every VipPool's status (usage and the Valid condition) true.
pub async fn pools(ctx: Arc<Ctx>, store: Store<VipPool>) {
    let mut warned: BTreeMap<String, String> = BTreeMap::new();
    let mut known: Vec<String> = Vec::new();
    loop {
        tokio::time::sleep(PERIOD).await;
        for pool in store.state() {
            let name = pool.name_any();
            let (invalid, usage) = {
                let mut w = ctx.world.lock().expect("world lock");
                w.refresh_pools(&ctx.pools);
                (w.pools.invalid.get(&name).cloned(), w.ipam.usage(&name))
            };
            let (assigned, available) = usage.unwrap_or((0, 0));
            ctx.metrics.pool_usage(&name, assigned, available);
            let old = pool.status.clone().unwrap_or_default();
            let c = match &invalid {
                None => condition(
                    "Valid",
                    true,
                    "Valid",
                    "the pool's addresses can be assigned",
                    &old.conditions,
                    pool.metadata.generation,
                ),
                Some(why) => condition("Valid", false, "Invalid", why, &old.conditions, pool.metadata.generation),
            };
            if old.assigned == assigned && old.available == available && same(&old.conditions, std::slice::from_ref(&c))
            {
                continue;
            }
            let patch = json!({
                "apiVersion": "vipgate.io/v1alpha1", "kind": "VipPool",
                "status": { "assigned": assigned, "available": available, "conditions": [c] }
            });
            let api: Api<VipPool> = Api::all(ctx.client.clone());
            if let Err(e) = api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await {
                warn!(pool = %name, "cannot write the VipPool's status: {e}");
            }
            if let Some(why) = invalid
                && warned.get(&name) != Some(&why)
            {
                let ev = Event {
                    type_: EventType::Warning,
                    reason: "InvalidPool".into(),
                    note: Some(why.clone()),
                    action: "Validate".into(),
                    secondary: None,
                };
                if let Err(e) = ctx.recorder.publish(&ev, &pool.object_ref(&())).await {
                    warn!(pool = %name, "cannot publish an Event: {e}");
                }
                warned.insert(name.clone(), why);
            }
        }
        let now: Vec<String> = store.state().iter().map(|p| p.name_any()).collect();
        for gone in known.iter().filter(|n| !now.contains(n)) {
            ctx.metrics.pool_gone(gone);
            warned.remove(gone);
        }
        known = now;
    }
}

/// Keeps every VipGateway's status (Synced, version, services) true, with
/// a Warning Event when a push fails for a new reason and a Normal one when
/// the gateway is synced again.
pub async fn gateways(ctx: Arc<Ctx>, store: Store<VipGateway>) {
    let api: Api<VipGateway> = Api::all(ctx.client.clone());
    let mut sync: watch::Receiver<SyncMap> = ctx.sync.clone();
    let mut reported: BTreeMap<String, Option<String>> = BTreeMap::new();
    loop {
        let map = sync.borrow_and_update().clone();
        for gw in store.state() {
            let name = gw.name_any();
            let Some(s) = map.get(&name) else { continue };
            let old = gw.status.clone().unwrap_or_default();
            let c = match (&s.error, s.seq) {
                (Some(e), _) => condition("Synced", false, "PushFailed", e, &old.conditions, gw.metadata.generation),
                (None, None) => {
                    condition("Synced", false, "Connecting", "not pushed yet", &old.conditions, gw.metadata.generation)
                }
                (None, Some(_)) if !s.refused.is_empty() => {
                    let list: Vec<String> = s.refused.iter().map(|(k, why)| format!("{k}: {why}")).collect();
                    condition(
                        "Synced",
                        false,
                        "ServicesRefused",
                        &list.join("; "),
                        &old.conditions,
                        gw.metadata.generation,
                    )
                }
                (None, Some(_)) => condition(
                    "Synced",
                    true,
                    "Synced",
                    "runs the desired state",
                    &old.conditions,
                    gw.metadata.generation,
                ),
            };
            let version = if s.seq.is_some() { s.version } else { old.version };
            let services = if s.seq.is_some() { s.services } else { old.services };
            if old.version == version && old.services == services && same(&old.conditions, std::slice::from_ref(&c)) {
                continue;
            }
            let patch = json!({
                "apiVersion": "vipgate.io/v1alpha1", "kind": "VipGateway",
                "status": { "version": version, "services": services, "conditions": [c] }
            });
            if let Err(e) = api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await {
                warn!(gateway = %name, "cannot write the VipGateway's status: {e}");
            }
            let before = reported.get(&name).cloned().flatten();
            let event = match (&s.error, s.seq.is_some()) {
                (Some(e), _) if before.as_ref() != Some(e) => Some((EventType::Warning, "PushFailed", e.clone())),
                (None, true) if before.is_some() || !reported.contains_key(&name) => Some((
                    EventType::Normal,
                    "GatewaySynced",
                    format!("runs the desired state at version {}", s.version),
                )),
                _ => None,
            };
            if let Some((type_, reason, note)) = event {
                let ev =
                    Event { type_, reason: reason.into(), note: Some(note), action: "Push".into(), secondary: None };
                if let Err(e) = ctx.recorder.publish(&ev, &gw.object_ref(&())).await {
                    warn!(gateway = %name, "cannot publish an Event: {e}");
                }
                reported.insert(name.clone(), s.error.clone());
            }
        }
        if sync.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(PERIOD).await;
    }
}

/// Sends the Services whose sync state changed to their reconcile, which
/// writes their condition.
pub async fn sync_triggers(ctx: Arc<Ctx>, out: mpsc::UnboundedSender<ObjectRef<Service>>) {
    let mut sync = ctx.sync.clone();
    let mut desired = ctx.desired.subscribe();
    let mut last: BTreeMap<ServiceKey, SyncState> = BTreeMap::new();
    loop {
        tokio::select! {
            r = sync.changed() => if r.is_err() { return },
            r = desired.changed() => if r.is_err() { return },
        }
        // A burst of progress is one pass.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let d = desired.borrow_and_update().clone();
        let s = sync.borrow_and_update().clone();
        let mut now = BTreeMap::new();
        for k in d.services.keys() {
            let st = sync_state(&d, &s, k);
            if last.get(k) != Some(&st) && !matches!(st, SyncState::Pending(_)) {
                let _ = out.send(ObjectRef::new(&k.name).within(&k.namespace));
            }
            now.insert(k.clone(), st);
        }
        last = now;
    }
}
