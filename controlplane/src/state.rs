//! The desired state that the API manages: dynamic services, backends and
//! source pools, their validation against the configuration file's static
//! objects, and their compilation into the dataplane's snapshot.
//!
//! Owns: the dynamic state ([`DesiredState`], persisted by
//! [`crate::store`]), what each mutation does and the errors it can fail
//! with (not found, owned by another, static), whole and incremental
//! validation ([`Effective::build`], [`Effective::update`]), and the handle
//! through which the API asks the daemon to apply a mutation. Must not
//! touch DPDK: the daemon applies mutations and publishes snapshots.
//!
//! Static and dynamic objects are one model ([`crate::model`]): static
//! ones are read from [`Config`], dynamic ones live in [`DesiredState`],
//! and [`all_services`] reads both. The rules between objects are
//! [`Effective`]'s; each error names the field path, such as
//! `services["web"].backends[1].weight`. The compiled snapshot is their
//! union; names and VIP:port/protocol are unique across both.

use crate::checks::{check_backend_count, check_port_number, check_table_size, check_weight};
use crate::config::Config;
use crate::health::{Target, TargetKey};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, mpsc, oneshot};
use vipgate_dataplane::maglev::DEFAULT_TABLE_SIZE;
use vipgate_dataplane::snapshot::{Snapshot, SnapshotSpec};
use vipgate_dataplane::wire::EthernetAddress;

/// At most this many services in one request (and in the dynamic state).
pub const MAX_SERVICES: usize = 10_000;
/// At most this many backends per service (the file's limit too).
pub use crate::checks::MAX_BACKENDS;
pub use crate::model::{
    AdminState, AffinityState, BackendState, DEFAULT_OWNER, Effective, ModeState, NewFlowLimitState, PoolState,
    ProtocolState, Refusal, RemovalState, STATIC_OWNER, ServiceState, SourceRange,
};
/// At most this many source pools.
pub const MAX_POOLS: usize = 10_000;
/// At most this many operations in one batch.
pub const MAX_BATCH: usize = 10_000;

/// The dynamic desired state: everything created through the API.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    /// 0 before the first change; plus one per applied change (API
    /// mutations and configuration reloads alike).
    pub version: u64,
    /// Dynamic services by name (a persistent map: a clone of the state
    /// shares it).
    pub services: imbl::OrdMap<String, ServiceState>,
    /// Dynamic source pools by name.
    pub source_pools: imbl::OrdMap<String, PoolState>,
    /// Each owner's generation: plus one per change to its objects. An
    /// owner stays listed once it had an object, so that its generation
    /// never goes back.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub generations: BTreeMap<String, u64>,
}

impl DesiredState {
    /// `owner`'s generation: 0 for one that never had an object.
    pub fn generation(&self, owner: &str) -> u64 {
        self.generations.get(owner).copied().unwrap_or(0)
    }

    /// Makes this the state after `change`: the next version, and the next
    /// generation of every owner whose objects it touched.
    pub fn advance(&mut self, change: &Change) {
        self.version += 1;
        for owner in &change.owners {
            *self.generations.entry(owner.clone()).or_insert(0) += 1;
        }
    }
}

/// Which gRPC status an error maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A field is not valid; the message names it.
    InvalidArgument,
    /// The named object does not exist.
    NotFound,
    /// An object of that name (or address) exists.
    AlreadyExists,
    /// Version mismatch, a static object, a pool in use.
    FailedPrecondition,
    /// A field the dataplane cannot apply yet.
    Unimplemented,
    /// The state could not be persisted, or the daemon is stopping.
    Unavailable,
    /// A fixed capacity (`[dataplane] max_backends`) would be exceeded.
    ResourceExhausted,
}

/// Why a request was refused. Nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StateError {
    /// Which status code.
    pub kind: ErrorKind,
    /// The message, naming the field or object.
    pub message: String,
}

impl StateError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> StateError {
        StateError { kind, message: message.into() }
    }

    /// `field: reason`, INVALID_ARGUMENT.
    pub fn invalid(field: impl std::fmt::Display, reason: impl std::fmt::Display) -> StateError {
        StateError::new(ErrorKind::InvalidArgument, format!("{field}: {reason}"))
    }
}

/// The field path of a service's field: `services["web"].vip`.
pub fn service_field(name: &str, field: &str) -> String {
    format!("services[{name:?}].{field}")
}

/// The field path of a backend's field: `services["web"].backends[1].weight`.
pub fn backend_field(name: &str, index: usize, field: &str) -> String {
    format!("services[{name:?}].backends[{index}].{field}")
}

pub(crate) fn pool_field(name: &str, field: &str) -> String {
    format!("source_pools[{name:?}].{field}")
}

/// Parses an IPv4 address, saying so when it is an IPv6 one.
pub fn parse_ipv4(s: &str) -> Result<Ipv4Addr, String> {
    let t = s.trim();
    if let Ok(a) = t.parse::<Ipv4Addr>() {
        return Ok(a);
    }
    if t.parse::<std::net::Ipv6Addr>().is_ok() {
        return Err(format!("{s:?} is an IPv6 address; IPv6 is not supported"));
    }
    Err(format!("{s:?} is not an IPv4 address"))
}

/// Parses a port number given as a wider integer.
pub fn parse_port(v: u32) -> Result<u16, String> {
    check_port_number(i64::from(v))
}

/// Parses a table size; 0 is the default.
pub fn parse_table_size(v: u32) -> Result<u32, String> {
    if v == 0 { Ok(DEFAULT_TABLE_SIZE) } else { check_table_size(i64::from(v)) }
}

/// Parses a weight; unset is 1.
pub fn parse_weight(v: Option<u32>) -> Result<u32, String> {
    v.map_or(Ok(1), |w| check_weight(i64::from(w)))
}

/// Validates `dynamic` against the static objects of `config` and returns
/// the description of the whole snapshot (static ∪ dynamic), with the
/// ports' real MACs. Every error names the field path and the reason; a
/// conflict with a static object names it and the configuration file. The
/// rules are [`Effective`]'s.
pub fn validate(config: &Config, macs: &[EthernetAddress], dynamic: &DesiredState) -> Result<SnapshotSpec, StateError> {
    Ok(Effective::build(config, macs, dynamic)?.spec())
}

/// [`validate`], then the dataplane's own compiler as the last word: a
/// snapshot it refuses is INVALID_ARGUMENT with its message. Compiles from
/// scratch; see [`compile_incremental`].
pub fn compile(config: &Config, macs: &[EthernetAddress], dynamic: &DesiredState) -> Result<Snapshot, StateError> {
    compile_with_health(config, macs, dynamic, &HashSet::new())
}

/// [`compile`] with the backends in `down` (unhealthy, per the health
/// checker) given weight 0: they take no new flows, and their open flows
/// continue, as when draining.
pub fn compile_with_health(
    config: &Config,
    macs: &[EthernetAddress],
    dynamic: &DesiredState,
    down: &HashSet<TargetKey>,
) -> Result<Snapshot, StateError> {
    let mut spec = validate(config, macs, dynamic)?;
    apply_health(&mut spec, down);
    Snapshot::build_incremental(&spec, None, dynamic.version)
        .map_err(|e| StateError::new(ErrorKind::InvalidArgument, e.to_string()))
}

/// [`compile`], reusing from `previous` (the snapshot the workers read now)
/// every compiled service, and every Maglev table, that would come out the
/// same: a change to one service rebuilds that service only. The snapshot
/// carries `dynamic.version`, which the workers report once they use it.
pub fn compile_incremental(
    config: &Config,
    macs: &[EthernetAddress],
    dynamic: &DesiredState,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, StateError> {
    let spec = validate(config, macs, dynamic)?;
    Snapshot::build_incremental(&spec, previous, dynamic.version)
        .map_err(|e| StateError::new(ErrorKind::InvalidArgument, e.to_string()))
}

/// What the single writer compiles for every change: [`validate`], the
/// backends in `down` given weight 0 (see [`compile_with_health`]), every
/// backend given its stats slot from `slots`, and the snapshot built
/// reusing from `previous` what comes out the same (see
/// [`compile_incremental`]). Returns the snapshot and the slot plan to
/// apply once it is published.
///
/// `change`, when given, names every service that differs from
/// `previous` (created, changed, deleted, or with a backend whose health
/// changed): only those get slots planned and are compiled, in time
/// proportional to the change (`Snapshot::build_changed`); the others are
/// `previous`'s as they are.
pub fn compile_with_slots(
    config: &Config,
    macs: &[EthernetAddress],
    dynamic: &DesiredState,
    down: &HashSet<TargetKey>,
    slots: &crate::stats::StatsSlots,
    previous: Option<&Snapshot>,
    change: Option<&Change>,
) -> Result<(Snapshot, crate::stats::SlotPlan), StateError> {
    let effective = Effective::build(config, macs, dynamic)?;
    compile_effective(&effective, dynamic.version, down, slots, previous, change)
}

/// [`compile_with_slots`] of a state validated already: the description
/// of `effective`, the backends in `down` given weight 0, stats slots from
/// `slots`, and the snapshot of `version` built reusing from `previous`
/// what comes out the same; with `change`, only the services it names (see
/// [`compile_with_slots`]).
pub fn compile_effective(
    effective: &Effective,
    version: u64,
    down: &HashSet<TargetKey>,
    slots: &crate::stats::StatsSlots,
    previous: Option<&Snapshot>,
    change: Option<&Change>,
) -> Result<(Snapshot, crate::stats::SlotPlan), StateError> {
    let mut spec = effective.spec();
    apply_health(&mut spec, down);
    let delta = previous.zip(change).and_then(|(p, c)| p.delta(&spec, &c.services_changed, &c.services_deleted));
    let planned = match &delta {
        Some(delta) => slots.plan_changed(&mut spec, delta),
        None => slots.plan(&mut spec),
    };
    let plan = planned.map_err(|e| StateError::new(ErrorKind::ResourceExhausted, e.to_string()))?;
    let snapshot = match previous.zip(delta.as_ref()) {
        Some((previous, delta)) => Snapshot::build_changed(&spec, previous, version, delta),
        None => Snapshot::build_incremental(&spec, previous, version),
    }
    .map_err(|e| StateError::new(ErrorKind::InvalidArgument, e.to_string()))?;
    Ok((snapshot, plan))
}

/// Gives every backend in `down` weight 0.
pub fn apply_health(spec: &mut SnapshotSpec, down: &HashSet<TargetKey>) {
    if down.is_empty() {
        return;
    }
    // By service: one lookup per service, none per backend, no copy.
    let mut by_service: std::collections::HashMap<&str, Vec<(u32, u16)>> = std::collections::HashMap::new();
    for k in down {
        by_service.entry(k.service.as_str()).or_default().push((u32::from(k.address), k.port));
    }
    for s in &mut spec.services {
        let Some(list) = by_service.get(s.name.as_str()) else { continue };
        if !s.backends.iter().any(|b| b.weight != 0 && list.contains(&(b.addr, b.port))) {
            continue;
        }
        for b in &mut std::sync::Arc::make_mut(s).backends {
            if list.contains(&(b.addr, b.port)) {
                b.weight = 0;
            }
        }
    }
}

/// Every service of the desired state: the static ones of `config`, in
/// file order, then the dynamic ones of `dynamic`, in name order. One
/// model for both; [`ServiceState::is_static`] tells them apart.
pub fn all_services<'a>(config: &'a Config, dynamic: &'a DesiredState) -> impl Iterator<Item = &'a ServiceState> {
    config.services().iter().chain(dynamic.services.values())
}

/// Service `name` of the desired state, static or dynamic.
pub fn find_service<'a>(config: &'a Config, dynamic: &'a DesiredState, name: &str) -> Option<&'a ServiceState> {
    dynamic.services.get(name).or_else(|| config.services().iter().find(|s| s.name == name))
}

/// Every forwarding backend of the desired state's services, static and
/// dynamic, with its service's check. Disabled backends do not forward and
/// are not probed; draining ones are.
pub fn health_targets(config: &Config, dynamic: &DesiredState) -> Vec<Target> {
    let mut out = Vec::new();
    for s in all_services(config, dynamic) {
        push_dynamic_targets(&mut out, s);
    }
    out
}

/// The targets of the dynamic services named `names` in `dynamic` (none
/// for a name it no longer has): what
/// [`Checker::plan_services`](crate::health::Checker::plan_services) takes
/// for a change that touched those services.
pub fn dynamic_health_targets<'a>(dynamic: &DesiredState, names: impl IntoIterator<Item = &'a String>) -> Vec<Target> {
    let mut out = Vec::new();
    for name in names {
        if let Some(s) = dynamic.services.get(name) {
            push_dynamic_targets(&mut out, s);
        }
    }
    out
}

fn push_dynamic_targets(out: &mut Vec<Target>, s: &ServiceState) {
    for b in s.backends.iter().filter(|b| b.admin_state != AdminState::Disabled) {
        out.push(Target {
            key: TargetKey { service: s.name.clone(), address: b.address, port: b.port },
            check: s.health_check.clone(),
        });
    }
}

/// What a change did, for the Watch stream and the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// What did it: the RPC's name, or `reload`.
    pub cause: String,
    /// Services created or changed.
    pub services_changed: Vec<String>,
    /// Services deleted.
    pub services_deleted: Vec<String>,
    /// Pools created or changed.
    pub pools_changed: Vec<String>,
    /// Pools deleted.
    pub pools_deleted: Vec<String>,
    /// The owners whose objects it created, changed or deleted (before and
    /// after: an object given to another owner counts for both).
    pub owners: BTreeSet<String>,
    /// The owner of each service it names (after the change; a deleted
    /// one's last owner).
    pub service_owners: BTreeMap<String, String>,
    /// The owner of each pool it names, likewise.
    pub pool_owners: BTreeMap<String, String>,
}

impl Change {
    fn new(cause: &str) -> Change {
        Change { cause: cause.to_owned(), ..Change::default() }
    }

    /// The difference between two dynamic states.
    pub fn between(cause: &str, old: &DesiredState, new: &DesiredState) -> Change {
        let mut c = Change::new(cause);
        for (k, v) in &new.services {
            c.note_service(k.clone(), old.services.get(k), Some(v));
        }
        for (k, v) in old.services.iter().filter(|(k, _)| !new.services.contains_key(*k)) {
            c.note_service(k.clone(), Some(v), None);
        }
        for (k, v) in &new.source_pools {
            c.note_pool(k.clone(), old.source_pools.get(k), Some(v));
        }
        for (k, v) in old.source_pools.iter().filter(|(k, _)| !new.source_pools.contains_key(*k)) {
            c.note_pool(k.clone(), Some(v), None);
        }
        c
    }

    /// Records service `name` going from `prior` to `now`, if that is a
    /// change.
    fn note_service(&mut self, name: String, prior: Option<&ServiceState>, now: Option<&ServiceState>) {
        let owners = (prior.map(|p| p.owner.as_str()), now.map(|n| n.owner.as_str()));
        if prior != now {
            let (changed, deleted, owner_of) =
                (&mut self.services_changed, &mut self.services_deleted, &mut self.service_owners);
            Self::note(&mut self.owners, changed, deleted, owner_of, name, owners);
        }
    }

    /// Records pool `name` going from `prior` to `now`, if that is a
    /// change.
    fn note_pool(&mut self, name: String, prior: Option<&PoolState>, now: Option<&PoolState>) {
        let owners = (prior.map(|p| p.owner.as_str()), now.map(|n| n.owner.as_str()));
        if prior != now {
            let (changed, deleted, owner_of) =
                (&mut self.pools_changed, &mut self.pools_deleted, &mut self.pool_owners);
            Self::note(&mut self.owners, changed, deleted, owner_of, name, owners);
        }
    }

    /// One object that changed: listed as changed (it exists after) or
    /// deleted, with its owner after (or its last), and both owners
    /// counted as touched.
    fn note(
        touched: &mut BTreeSet<String>,
        changed: &mut Vec<String>,
        deleted: &mut Vec<String>,
        owner_of: &mut BTreeMap<String, String>,
        name: String,
        (before, after): (Option<&str>, Option<&str>),
    ) {
        let Some(owner) = after.or(before) else { return };
        touched.extend(before.map(str::to_owned));
        touched.insert(owner.to_owned());
        if after.is_some() { changed } else { deleted }.push(name.clone());
        owner_of.insert(name, owner.to_owned());
    }

    /// Whether it changed no object.
    pub fn is_empty(&self) -> bool {
        self.services_changed.is_empty()
            && self.services_deleted.is_empty()
            && self.pools_changed.is_empty()
            && self.pools_deleted.is_empty()
    }

    /// Whether it touched an object of `owner`.
    pub fn touches(&self, owner: &str) -> bool {
        self.owners.contains(owner)
    }

    /// What it did to `owner`'s objects only.
    pub fn of_owner(&self, owner: &str) -> Change {
        let mine = |names: &[String], owners: &BTreeMap<String, String>| -> Vec<String> {
            names.iter().filter(|n| owners.get(*n).is_some_and(|o| o == owner)).cloned().collect()
        };
        Change {
            cause: self.cause.clone(),
            services_changed: mine(&self.services_changed, &self.service_owners),
            services_deleted: mine(&self.services_deleted, &self.service_owners),
            pools_changed: mine(&self.pools_changed, &self.pool_owners),
            pools_deleted: mine(&self.pools_deleted, &self.pool_owners),
            owners: self.owners.iter().filter(|o| *o == owner).cloned().collect(),
            service_owners: self
                .service_owners
                .iter()
                .filter(|(_, o)| *o == owner)
                .map(|(n, o)| (n.clone(), o.clone()))
                .collect(),
            pool_owners: self
                .pool_owners
                .iter()
                .filter(|(_, o)| *o == owner)
                .map(|(n, o)| (n.clone(), o.clone()))
                .collect(),
        }
    }
}

fn static_service_error(config: &Config, name: &str) -> StateError {
    StateError::new(
        ErrorKind::FailedPrecondition,
        format!("service {name:?} is defined in {}; change it there and reload", config.path.display()),
    )
}

fn static_pool_error(config: &Config, name: &str) -> StateError {
    StateError::new(
        ErrorKind::FailedPrecondition,
        format!("source pool {name:?} is defined in {}; change it there and reload", config.path.display()),
    )
}

fn is_static_service(config: &Config, name: &str) -> bool {
    config.services().iter().any(|s| s.name == name)
}

fn is_static_pool(config: &Config, name: &str) -> bool {
    config.source_pools().iter().any(|p| p.name == name)
}

/// Why `owner` may not change an object `holder` owns.
fn other_owner_error(kind: &str, name: &str, holder: &str, owner: &str) -> StateError {
    StateError::new(
        ErrorKind::FailedPrecondition,
        format!(
            "{kind} {name:?} is owned by {holder:?}; a request as owner {owner:?} cannot change it (send it as owner {holder:?} to change it anyway)"
        ),
    )
}

/// The mutations. Each works on the dynamic state in memory only, through a
/// [`Tx`](ops::Tx) that records what it touched; the daemon validates the result
/// ([`compile`]) before anything is persisted or published, and assigns
/// the version and the owners' generations ([`DesiredState::advance`]).
pub mod ops {
    use super::*;

    /// One mutation in progress: the state it changes, and the prior value
    /// of every object it touched, from which [`Tx::finish`] makes the
    /// [`Change`] (names and owners) in time proportional to what was
    /// touched.
    pub struct Tx<'a> {
        config: &'a Config,
        state: &'a mut DesiredState,
        /// Who asks: the owner of what it creates, and the only owner whose
        /// objects it may change.
        owner: String,
        services: BTreeMap<String, Option<ServiceState>>,
        pools: BTreeMap<String, Option<PoolState>>,
    }

    impl<'a> Tx<'a> {
        /// A mutation of `state` by `owner` (checked with
        /// [`check_owner`](crate::checks::check_owner) by the caller; empty
        /// is [`DEFAULT_OWNER`]).
        pub fn new(config: &'a Config, state: &'a mut DesiredState, owner: &str) -> Tx<'a> {
            let owner = if owner.is_empty() { DEFAULT_OWNER } else { owner };
            Tx { config, state, owner: owner.to_owned(), services: BTreeMap::new(), pools: BTreeMap::new() }
        }

        /// The state as changed so far.
        pub fn state(&self) -> &DesiredState {
            self.state
        }

        fn touch_service(&mut self, name: &str) {
            if !self.services.contains_key(name) {
                self.services.insert(name.to_owned(), self.state.services.get(name).cloned());
            }
        }

        fn touch_pool(&mut self, name: &str) {
            if !self.pools.contains_key(name) {
                self.pools.insert(name.to_owned(), self.state.source_pools.get(name).cloned());
            }
        }

        /// The change: every touched object whose value differs from its
        /// prior one, and the owners of those objects (before and after).
        pub fn finish(self, cause: &str) -> Change {
            let mut c = Change::new(cause);
            for (name, prior) in self.services {
                let now = self.state.services.get(&name);
                c.note_service(name, prior.as_ref(), now);
            }
            for (name, prior) in self.pools {
                let now = self.state.source_pools.get(&name);
                c.note_pool(name, prior.as_ref(), now);
            }
            c
        }

        /// Refuses unless the owner's generation is `expected`.
        pub fn expect_generation(&self, expected: u64) -> Result<(), StateError> {
            let current = self.state.generation(&self.owner);
            if expected != current {
                return Err(StateError::new(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "expected_generation {expected} is not owner {:?}'s current generation {current}; read the state again",
                        self.owner
                    ),
                ));
            }
            Ok(())
        }

        /// The dynamic service `name` if this owner may change it.
        fn own_service(&self, name: &str) -> Result<&ServiceState, StateError> {
            if is_static_service(self.config, name) {
                return Err(static_service_error(self.config, name));
            }
            let s = self
                .state
                .services
                .get(name)
                .ok_or_else(|| StateError::new(ErrorKind::NotFound, format!("no service is named {name:?}")))?;
            if s.owner != self.owner {
                return Err(other_owner_error("service", name, &s.owner, &self.owner));
            }
            Ok(s)
        }

        /// Stamps `owner` on an object of a request: empty is this owner,
        /// another is refused.
        fn owned(&self, kind: &str, name: &str, owner: &mut String) -> Result<(), StateError> {
            if owner.is_empty() {
                owner.clone_from(&self.owner);
            } else if *owner != self.owner {
                return Err(StateError::invalid(
                    format!("{kind}[{name:?}].owner"),
                    format!("{owner:?} is not the request's owner {:?}", self.owner),
                ));
            }
            Ok(())
        }

        /// Refuses a new `kind` named `name` that exists already: static
        /// (`is_static`) or dynamic, owned by `holder`.
        fn check_new(&self, kind: &str, name: &str, is_static: bool, holder: Option<&str>) -> Result<(), StateError> {
            let exists = |what: String| {
                StateError::new(ErrorKind::AlreadyExists, format!("{kind} {name:?} already exists{what}"))
            };
            if is_static {
                return Err(exists(format!(" (defined in {})", self.config.path.display())));
            }
            match holder {
                None => Ok(()),
                Some(o) if o == self.owner => Err(exists(String::new())),
                Some(o) => Err(exists(format!(", owned by {o:?}"))),
            }
        }

        /// Adds a service.
        pub fn create_service(&mut self, mut s: ServiceState) -> Result<(), StateError> {
            self.owned("services", &s.name, &mut s.owner)?;
            let holder = self.state.services.get(&s.name).map(|o| o.owner.as_str());
            self.check_new("service", &s.name, is_static_service(self.config, &s.name), holder)?;
            self.touch_service(&s.name);
            self.state.services.insert(s.name.clone(), s);
            Ok(())
        }

        /// Replaces a service, backends included.
        pub fn update_service(&mut self, mut s: ServiceState) -> Result<(), StateError> {
            self.own_service(&s.name)?;
            self.owned("services", &s.name, &mut s.owner)?;
            self.touch_service(&s.name);
            self.state.services.insert(s.name.clone(), s);
            Ok(())
        }

        /// Deletes a service.
        pub fn delete_service(&mut self, name: &str) -> Result<(), StateError> {
            self.own_service(name)?;
            self.touch_service(name);
            self.state.services.remove(name);
            Ok(())
        }

        /// Adds a backend to a service.
        pub fn add_backend(&mut self, service: &str, b: BackendState) -> Result<(), StateError> {
            let s = self.own_service(service)?;
            if s.backends.iter().any(|o| o.address == b.address && o.port == b.port) {
                return Err(StateError::new(
                    ErrorKind::AlreadyExists,
                    format!("service {service:?} already has backend {}:{}", b.address, b.port),
                ));
            }
            check_backend_count(s.backends.len() + 1)
                .map_err(|r| StateError::invalid(service_field(service, "backends"), r))?;
            self.touch_service(service);
            if let Some(s) = self.state.services.get_mut(service) {
                s.backends.push(b);
            }
            Ok(())
        }

        fn backend_index(&self, service: &str, address: Ipv4Addr, port: u16) -> Result<usize, StateError> {
            let s = self.own_service(service)?;
            s.backends.iter().position(|b| b.address == address && b.port == port).ok_or_else(|| {
                StateError::new(ErrorKind::NotFound, format!("service {service:?} has no backend {address}:{port}"))
            })
        }

        /// Changes a backend's weight and/or admin state.
        pub fn update_backend(
            &mut self,
            service: &str,
            address: Ipv4Addr,
            port: u16,
            weight: Option<u32>,
            admin_state: Option<AdminState>,
        ) -> Result<(), StateError> {
            let i = self.backend_index(service, address, port)?;
            self.touch_service(service);
            if let Some(s) = self.state.services.get_mut(service) {
                if let Some(w) = weight {
                    s.backends[i].weight = w;
                }
                if let Some(a) = admin_state {
                    s.backends[i].admin_state = a;
                }
            }
            Ok(())
        }

        /// Removes a backend.
        pub fn remove_backend(&mut self, service: &str, address: Ipv4Addr, port: u16) -> Result<(), StateError> {
            let i = self.backend_index(service, address, port)?;
            self.touch_service(service);
            if let Some(s) = self.state.services.get_mut(service) {
                s.backends.remove(i);
            }
            Ok(())
        }

        /// Adds a source pool.
        pub fn create_pool(&mut self, mut p: PoolState) -> Result<(), StateError> {
            self.owned("source_pools", &p.name, &mut p.owner)?;
            let holder = self.state.source_pools.get(&p.name).map(|o| o.owner.as_str());
            self.check_new("source pool", &p.name, is_static_pool(self.config, &p.name), holder)?;
            self.touch_pool(&p.name);
            self.state.source_pools.insert(p.name.clone(), p);
            Ok(())
        }

        /// Deletes a source pool no service uses.
        pub fn delete_pool(&mut self, name: &str) -> Result<(), StateError> {
            if is_static_pool(self.config, name) {
                return Err(static_pool_error(self.config, name));
            }
            let p = self
                .state
                .source_pools
                .get(name)
                .ok_or_else(|| StateError::new(ErrorKind::NotFound, format!("no source pool is named {name:?}")))?;
            if p.owner != self.owner {
                return Err(other_owner_error("source pool", name, &p.owner, &self.owner));
            }
            if let Some(user) = pool_user(self.state, name) {
                return Err(StateError::new(
                    ErrorKind::FailedPrecondition,
                    format!("source pool {name:?} is used by service {user:?}"),
                ));
            }
            self.touch_pool(name);
            self.state.source_pools.remove(name);
            Ok(())
        }

        /// Replaces this owner's objects with `services` and `pools` (each
        /// owned by this owner, or by none), leaving other owners' alone.
        pub fn replace_owned(&mut self, services: Vec<ServiceState>, pools: Vec<PoolState>) -> Result<(), StateError> {
            let mut listed_services = HashSet::new();
            for s in &services {
                if !listed_services.insert(s.name.as_str()) {
                    return Err(StateError::invalid(service_field(&s.name, "name"), "is listed twice"));
                }
            }
            let mut listed_pools = HashSet::new();
            for p in &pools {
                if !listed_pools.insert(p.name.as_str()) {
                    return Err(StateError::invalid(pool_field(&p.name, "name"), "is listed twice"));
                }
            }
            let gone: Vec<String> = self
                .state
                .services
                .values()
                .filter(|s| s.owner == self.owner && !listed_services.contains(s.name.as_str()))
                .map(|s| s.name.clone())
                .collect();
            for name in gone {
                self.touch_service(&name);
                self.state.services.remove(&name);
            }
            for mut s in services {
                self.owned("services", &s.name, &mut s.owner)?;
                if is_static_service(self.config, &s.name) {
                    return Err(static_service_error(self.config, &s.name));
                }
                if let Some(o) = self.state.services.get(&s.name) {
                    if o.owner != self.owner {
                        return Err(other_owner_error("service", &s.name, &o.owner, &self.owner));
                    }
                    if *o == s {
                        continue;
                    }
                }
                self.touch_service(&s.name);
                self.state.services.insert(s.name.clone(), s);
            }
            let gone: Vec<String> = self
                .state
                .source_pools
                .values()
                .filter(|p| p.owner == self.owner && !listed_pools.contains(p.name.as_str()))
                .map(|p| p.name.clone())
                .collect();
            for name in gone {
                if let Some(user) = pool_user(self.state, &name) {
                    return Err(StateError::new(
                        ErrorKind::FailedPrecondition,
                        format!("source pool {name:?} is used by service {user:?}, so it cannot be left out"),
                    ));
                }
                self.touch_pool(&name);
                self.state.source_pools.remove(&name);
            }
            for mut p in pools {
                self.owned("source_pools", &p.name, &mut p.owner)?;
                if is_static_pool(self.config, &p.name) {
                    return Err(static_pool_error(self.config, &p.name));
                }
                if let Some(o) = self.state.source_pools.get(&p.name) {
                    if o.owner != self.owner {
                        return Err(other_owner_error("source pool", &p.name, &o.owner, &self.owner));
                    }
                    if *o == p {
                        continue;
                    }
                }
                self.touch_pool(&p.name);
                self.state.source_pools.insert(p.name.clone(), p);
            }
            Ok(())
        }

        /// Runs one operation of a batch.
        pub fn run(&mut self, op: BatchOp) -> Result<(), StateError> {
            match op {
                BatchOp::CreateService(s) => self.create_service(s),
                BatchOp::UpdateService(s) => self.update_service(s),
                BatchOp::DeleteService(name) => self.delete_service(&name),
                BatchOp::AddBackend { service, backend } => self.add_backend(&service, backend),
                BatchOp::UpdateBackend { service, address, port, weight, admin_state } => {
                    self.update_backend(&service, address, port, weight, admin_state)
                }
                BatchOp::RemoveBackend { service, address, port } => self.remove_backend(&service, address, port),
                BatchOp::CreatePool(p) => self.create_pool(p),
                BatchOp::DeletePool(name) => self.delete_pool(&name),
            }
        }
    }

    /// A service that uses pool `name`.
    fn pool_user(state: &DesiredState, name: &str) -> Option<String> {
        state
            .services
            .values()
            .find(|s| matches!(&s.mode, ModeState::Fullnat { source_pool } if source_pool == name))
            .map(|s| s.name.clone())
    }

    /// One operation of a [`batch`].
    #[derive(Clone, Debug, PartialEq)]
    pub enum BatchOp {
        /// [`Tx::create_service`].
        CreateService(ServiceState),
        /// [`Tx::update_service`].
        UpdateService(ServiceState),
        /// [`Tx::delete_service`].
        DeleteService(String),
        /// [`Tx::add_backend`].
        AddBackend {
            /// The service.
            service: String,
            /// The new backend.
            backend: BackendState,
        },
        /// [`Tx::update_backend`].
        UpdateBackend {
            /// The service.
            service: String,
            /// The backend's address.
            address: Ipv4Addr,
            /// The backend's port.
            port: u16,
            /// The new weight, if any.
            weight: Option<u32>,
            /// The new admin state, if any.
            admin_state: Option<AdminState>,
        },
        /// [`Tx::remove_backend`].
        RemoveBackend {
            /// The service.
            service: String,
            /// The backend's address.
            address: Ipv4Addr,
            /// The backend's port.
            port: u16,
        },
        /// [`Tx::create_pool`].
        CreatePool(PoolState),
        /// [`Tx::delete_pool`].
        DeletePool(String),
    }

    /// Runs `ops` in order as `owner`, all or none (the caller drops the
    /// state on an error), after checking the owner's generation when
    /// `expected_generation` is given. An error names the operation:
    /// `operations[3]: ...`.
    pub fn batch(
        config: &Config,
        state: &mut DesiredState,
        owner: &str,
        expected_generation: Option<u64>,
        ops: Vec<BatchOp>,
    ) -> Result<Change, StateError> {
        if ops.is_empty() {
            return Err(StateError::invalid("operations", "a batch needs at least one operation"));
        }
        if ops.len() > MAX_BATCH {
            return Err(StateError::invalid(
                "operations",
                format!("{} operations in one batch; at most {MAX_BATCH}", ops.len()),
            ));
        }
        let mut tx = Tx::new(config, state, owner);
        if let Some(g) = expected_generation {
            tx.expect_generation(g)?;
        }
        for (i, op) in ops.into_iter().enumerate() {
            tx.run(op).map_err(|e| StateError::new(e.kind, format!("operations[{i}]: {}", e.message)))?;
        }
        Ok(tx.finish("Batch"))
    }

    /// Replaces the whole dynamic state if its version is `expected`. Each
    /// object keeps the owner it names ([`DEFAULT_OWNER`] when it names
    /// none).
    pub fn apply(
        config: &Config,
        state: &mut DesiredState,
        expected: u64,
        services: Vec<ServiceState>,
        pools: Vec<PoolState>,
    ) -> Result<Change, StateError> {
        if expected != state.version {
            return Err(StateError::new(
                ErrorKind::FailedPrecondition,
                format!("expected_version {expected} is not the current version {}", state.version),
            ));
        }
        let mut new =
            DesiredState { version: state.version, generations: state.generations.clone(), ..DesiredState::default() };
        for mut s in services {
            if s.owner.is_empty() {
                DEFAULT_OWNER.clone_into(&mut s.owner);
            }
            if is_static_service(config, &s.name) {
                return Err(static_service_error(config, &s.name));
            }
            if new.services.contains_key(&s.name) {
                return Err(StateError::invalid(service_field(&s.name, "name"), "is listed twice"));
            }
            new.services.insert(s.name.clone(), s);
        }
        for mut p in pools {
            if p.owner.is_empty() {
                DEFAULT_OWNER.clone_into(&mut p.owner);
            }
            if is_static_pool(config, &p.name) {
                return Err(static_pool_error(config, &p.name));
            }
            if new.source_pools.contains_key(&p.name) {
                return Err(StateError::invalid(pool_field(&p.name, "name"), "is listed twice"));
            }
            new.source_pools.insert(p.name.clone(), p);
        }
        let change = Change::between("Apply", state, &new);
        *state = new;
        Ok(change)
    }

    /// Replaces `owner`'s objects if its generation is `expected_generation`
    /// (and the version is `expected_version`, unless that is 0); other
    /// owners' objects stay as they are.
    pub fn apply_owned(
        config: &Config,
        state: &mut DesiredState,
        owner: &str,
        expected_generation: u64,
        expected_version: u64,
        services: Vec<ServiceState>,
        pools: Vec<PoolState>,
    ) -> Result<Change, StateError> {
        if expected_version != 0 && expected_version != state.version {
            return Err(StateError::new(
                ErrorKind::FailedPrecondition,
                format!("expected_version {expected_version} is not the current version {}", state.version),
            ));
        }
        let mut tx = Tx::new(config, state, owner);
        tx.expect_generation(expected_generation)?;
        tx.replace_owned(services, pools)?;
        Ok(tx.finish("Apply"))
    }

    /// Runs one operation as `owner`: the single-object RPCs.
    pub fn one(
        config: &Config,
        state: &mut DesiredState,
        owner: &str,
        cause: &str,
        op: BatchOp,
    ) -> Result<Change, StateError> {
        let mut tx = Tx::new(config, state, owner);
        tx.run(op)?;
        Ok(tx.finish(cause))
    }

    /// Adds a service (as [`DEFAULT_OWNER`] unless it names its owner).
    pub fn create_service(config: &Config, state: &mut DesiredState, s: ServiceState) -> Result<Change, StateError> {
        let owner = s.owner.clone();
        one(config, state, &owner, "CreateService", BatchOp::CreateService(s))
    }

    /// Replaces a service, backends included, as the owner it names.
    pub fn update_service(config: &Config, state: &mut DesiredState, s: ServiceState) -> Result<Change, StateError> {
        let owner = s.owner.clone();
        one(config, state, &owner, "UpdateService", BatchOp::UpdateService(s))
    }

    /// Deletes a service of [`DEFAULT_OWNER`].
    pub fn delete_service(config: &Config, state: &mut DesiredState, name: &str) -> Result<Change, StateError> {
        one(config, state, DEFAULT_OWNER, "DeleteService", BatchOp::DeleteService(name.to_owned()))
    }

    /// Adds a backend to a service of [`DEFAULT_OWNER`].
    pub fn add_backend(
        config: &Config,
        state: &mut DesiredState,
        service: &str,
        backend: BackendState,
    ) -> Result<Change, StateError> {
        let op = BatchOp::AddBackend { service: service.to_owned(), backend };
        one(config, state, DEFAULT_OWNER, "AddBackend", op)
    }

    /// Changes a backend of a service of [`DEFAULT_OWNER`].
    pub fn update_backend(
        config: &Config,
        state: &mut DesiredState,
        service: &str,
        address: Ipv4Addr,
        port: u16,
        weight: Option<u32>,
        admin_state: Option<AdminState>,
    ) -> Result<Change, StateError> {
        let op = BatchOp::UpdateBackend { service: service.to_owned(), address, port, weight, admin_state };
        one(config, state, DEFAULT_OWNER, "UpdateBackend", op)
    }

    /// Removes a backend of a service of [`DEFAULT_OWNER`].
    pub fn remove_backend(
        config: &Config,
        state: &mut DesiredState,
        service: &str,
        address: Ipv4Addr,
        port: u16,
    ) -> Result<Change, StateError> {
        let op = BatchOp::RemoveBackend { service: service.to_owned(), address, port };
        one(config, state, DEFAULT_OWNER, "RemoveBackend", op)
    }

    /// Adds a source pool (as [`DEFAULT_OWNER`] unless it names its owner).
    pub fn create_pool(config: &Config, state: &mut DesiredState, p: PoolState) -> Result<Change, StateError> {
        let owner = p.owner.clone();
        one(config, state, &owner, "CreateSourcePool", BatchOp::CreatePool(p))
    }

    /// Deletes a source pool of [`DEFAULT_OWNER`] that no service uses.
    pub fn delete_pool(config: &Config, state: &mut DesiredState, name: &str) -> Result<Change, StateError> {
        one(config, state, DEFAULT_OWNER, "DeleteSourcePool", BatchOp::DeletePool(name.to_owned()))
    }
}

/// A mutation the API asks the daemon to apply to a copy of the dynamic
/// state (the running configuration gives the static objects).
pub type Mutation = Box<dyn FnOnce(&Config, &mut DesiredState) -> Result<Change, StateError> + Send>;

/// One mutation and where its outcome goes.
pub struct MutationRequest {
    /// The change.
    pub mutation: Mutation,
    /// The new version, or why nothing changed.
    pub reply: oneshot::Sender<Result<Applied, StateError>>,
}

/// What an applied mutation produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The new version.
    pub version: u64,
    /// Every owner's generation after it.
    pub generations: BTreeMap<String, u64>,
}

/// What readers see: the configuration in force (the static objects) and
/// the dynamic state, at one version.
#[derive(Clone, Debug)]
pub struct StateView {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// The dynamic state; its `version` is the current version.
    pub dynamic: DesiredState,
}

/// One event of the Watch stream.
#[derive(Clone, Debug)]
pub struct StateEvent {
    /// The version it produced (a change) or the version in force (a
    /// health transition, which takes none).
    pub version: u64,
    /// What happened.
    pub kind: StateEventKind,
}

/// What a [`StateEvent`] reports.
#[derive(Clone, Debug)]
pub enum StateEventKind {
    /// An applied change of the desired state.
    Change(Change),
    /// A backend went up or down.
    Health(crate::health::Transition),
}

/// How many events a slow Watch subscriber may fall behind before it is
/// ended.
const EVENT_BACKLOG: usize = 1024;

struct Shared {
    current: Arc<StateView>,
    events: broadcast::Sender<Arc<StateEvent>>,
}

/// The health of the checked backends, which the checker writes and the
/// API reads.
pub type SharedHealth = Arc<crate::health::HealthStatus>;

/// The API's side of the state: reads the current view without waiting,
/// sends mutations to the daemon (one writer, in order) and subscribes to
/// changes. Cheap to clone.
#[derive(Clone)]
pub struct StateHandle {
    requests: mpsc::Sender<MutationRequest>,
    shared: Arc<Mutex<Shared>>,
    /// True once the daemon stops: Watch streams end, so that the server's
    /// graceful shutdown does not wait for them forever.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
    /// The checked backends' health.
    health: SharedHealth,
}

impl std::fmt::Debug for StateHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateHandle").finish_non_exhaustive()
    }
}

impl StateHandle {
    /// A handle showing `view`, and the receiving end of its mutations,
    /// which the daemon (the only writer) serves.
    pub fn new(view: StateView) -> (StateHandle, mpsc::Receiver<MutationRequest>) {
        let (requests, rx) = mpsc::channel(64);
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let (closing, _) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Mutex::new(Shared { current: Arc::new(view), events }));
        let health = SharedHealth::default();
        (StateHandle { requests, shared, closing: Arc::new(closing), health }, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state in force now.
    pub fn current(&self) -> Arc<StateView> {
        Arc::clone(&self.lock().current)
    }

    /// The state in force now and every change after it, with no gap.
    pub fn subscribe(&self) -> (Arc<StateView>, broadcast::Receiver<Arc<StateEvent>>) {
        let shared = self.lock();
        (Arc::clone(&shared.current), shared.events.subscribe())
    }

    /// The checked backends' health, which the daemon's checker writes.
    pub fn health(&self) -> &SharedHealth {
        &self.health
    }

    /// Tells subscribers that a backend went up or down. The daemon calls
    /// it once the snapshot with that health is published; the version is
    /// the one in force (health takes none).
    pub fn publish_health(&self, transition: crate::health::Transition) {
        let shared = self.lock();
        let version = shared.current.dynamic.version;
        // No subscriber is no error.
        let _ = shared.events.send(Arc::new(StateEvent { version, kind: StateEventKind::Health(transition) }));
    }

    /// Ends every Watch stream, now and later: the daemon is stopping.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`StateHandle::close`] was called.
    pub async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        // An error means the sender is gone, which is closed too.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Asks the daemon to apply `mutation`; answers once it is durable and
    /// published, with the new version and generations.
    pub async fn mutate(&self, mutation: Mutation) -> Result<Applied, StateError> {
        let (reply, answer) = oneshot::channel();
        let gone = || StateError::new(ErrorKind::Unavailable, "vipgated is stopping; try again");
        self.requests.send(MutationRequest { mutation, reply }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Makes `view` the current state and tells subscribers of `change`.
    /// The daemon calls it after the state is durable and published.
    pub fn publish(&self, view: StateView, change: Change) {
        let mut shared = self.lock();
        let version = view.dynamic.version;
        shared.current = Arc::new(view);
        // No subscriber is no error.
        let _ = shared.events.send(Arc::new(StateEvent { version, kind: StateEventKind::Change(change) }));
    }
}

impl From<Refusal> for StateError {
    fn from(r: Refusal) -> StateError {
        StateError::invalid(r.field, r.reason)
    }
}

/// Whole and incremental validation of the dynamic state, on top of the
/// configuration's static objects: the rules are [`Effective`]'s.
impl Effective {
    /// Validates the whole dynamic state against `config`: each pool, then
    /// each service, in name order, through the same rules as a change,
    /// starting from the configuration's static objects (validated when it
    /// was loaded), with the ports' real MACs.
    pub fn build(config: &Config, macs: &[EthernetAddress], dynamic: &DesiredState) -> Result<Effective, StateError> {
        check_counts(dynamic)?;
        let mut e = config.statics().clone().with_macs(macs);
        for (key, p) in &dynamic.source_pools {
            e.add_pool(key, p)?;
        }
        for (key, s) in &dynamic.services {
            e.add_service(key, s, &dynamic.source_pools)?;
        }
        Ok(e)
    }

    /// The effective state after `change`, which turned `prior` into
    /// `next`: the prior versions of the objects it touched leave the
    /// indexes, then their new versions are checked and added, pools
    /// first. Costs what the change touched. `self` is left as it was.
    pub fn update(&self, prior: &DesiredState, next: &DesiredState, change: &Change) -> Result<Effective, StateError> {
        check_counts(next)?;
        let mut e = self.clone();
        let services = change.services_changed.iter().chain(&change.services_deleted);
        let pools = change.pools_changed.iter().chain(&change.pools_deleted);
        for name in services.clone() {
            if let Some(s) = prior.services.get(name) {
                e.remove_service(name, s);
            }
        }
        for name in pools.clone() {
            if let Some(p) = prior.source_pools.get(name) {
                e.remove_pool(name, p);
            }
        }
        for name in &change.pools_deleted {
            let n = e.pool_users(name);
            if n > 0 {
                let user = next
                    .services
                    .values()
                    .find(|s| matches!(&s.mode, ModeState::Fullnat { source_pool } if source_pool == name))
                    .map_or_else(|| format!("{n} services"), |s| format!("service {:?}", s.name));
                return Err(StateError::new(
                    ErrorKind::FailedPrecondition,
                    format!("source pool {name:?} is used by {user}"),
                ));
            }
        }
        for name in &change.pools_changed {
            if let Some(p) = next.source_pools.get(name) {
                e.add_pool(name, p)?;
            }
        }
        for name in &change.services_changed {
            if let Some(s) = next.services.get(name) {
                e.add_service(name, s, &next.source_pools)?;
            }
        }
        Ok(e)
    }
}

fn check_counts(dynamic: &DesiredState) -> Result<(), StateError> {
    if dynamic.services.len() > MAX_SERVICES {
        return Err(StateError::invalid(
            "services",
            format!("{} services; at most {MAX_SERVICES}", dynamic.services.len()),
        ));
    }
    if dynamic.source_pools.len() > MAX_POOLS {
        return Err(StateError::invalid(
            "source_pools",
            format!("{} source pools; at most {MAX_POOLS}", dynamic.source_pools.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
