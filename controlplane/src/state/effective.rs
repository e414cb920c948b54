//! The effective desired state: the static objects of the configuration
//! file and the dynamic ones of the API, validated, with the indexes that
//! make a change cost what it changes.
//!
//! Owns: every rule a dynamic service or source pool must follow, each
//! written once ([`Effective::check_service`], [`Effective::check_pool`]),
//! and the indexes those rules read: VIP:port/protocol to its service, nat
//! backend to its service, VIPs, backend addresses, pool addresses, pool
//! users. Whole validation ([`Effective::build`], at start and reload) adds
//! the objects one by one through the same rules as a change
//! ([`Effective::update`]), which removes the prior versions of the objects
//! it touched and adds their new ones: only they are checked, against the
//! indexes, in time proportional to their size.
//!
//! Every map is a persistent one ([`imbl`]): a clone shares its structure,
//! so an update works on a copy that is dropped if any rule refuses it,
//! and the version in force is never half-changed.

use std::sync::Arc;

use imbl::{HashMap as PHashMap, OrdMap};
use vipgate_dataplane::route::Route;
use vipgate_dataplane::snapshot::{
    ForwardingMode, Ipv4Cidr, PortSpec, Protocol, RouteSpec, ServiceSpec, SnapshotSpec, SourcePoolSpec,
};
use vipgate_dataplane::wire::EthernetAddress;

use super::{
    AdminState, Change, DesiredState, ErrorKind, MAX_POOLS, MAX_SERVICES, ModeState, PoolState, ServiceState,
    StateError, backend_field, pool_field, service_field,
};
use crate::checks::{
    check_backend_count, check_name, check_not_subnet_edge, check_owner, check_pool_ports, check_port_number,
    check_table_size, check_weight, is_unicast,
};
use crate::config::Config;

/// Who holds an entry of an index: a static or a dynamic object, by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Holder {
    Static(Arc<str>),
    Dynamic(Arc<str>),
}

impl Holder {
    /// `static service "web" (defined in FILE)` (with the file when given)
    /// or `service "api"`.
    fn describe(&self, kind: &str, file: Option<&str>) -> String {
        match (self, file) {
            (Holder::Static(n), Some(file)) => format!("static {kind} {n:?} (defined in {file})"),
            (Holder::Static(n), None) => format!("static {kind} {n:?}"),
            (Holder::Dynamic(n), _) => format!("{kind} {n:?}"),
        }
    }
}

/// A multiset of holders per key: an address several services use.
type Holders = PHashMap<u32, Vec<Holder>>;

fn add_holder(map: &mut Holders, key: u32, h: &Holder) {
    map.entry(key).or_default().push(h.clone());
}

fn remove_holder(map: &mut Holders, key: u32, h: &Holder) {
    if let Some(list) = map.get_mut(&key) {
        if let Some(i) = list.iter().position(|x| x == h) {
            list.swap_remove(i);
        }
        if list.is_empty() {
            map.remove(&key);
        }
    }
}

/// The validated effective state and its indexes. Cheap to clone.
#[derive(Clone)]
pub struct Effective {
    /// The configuration file, for messages.
    file: Arc<str>,
    /// The snapshot description of the static objects (ports with their
    /// MACs, routes, neighbours, static services and pools).
    base: Arc<SnapshotSpec>,
    /// Port addresses, to their port's name.
    local: Arc<std::collections::HashMap<u32, String>>,
    /// The number of workers, which share each pool's ports.
    workers: usize,
    /// Static service and pool names.
    static_services: Arc<std::collections::HashSet<String>>,
    static_pools: Arc<std::collections::HashSet<String>>,
    /// VIP:port/protocol to its service.
    listeners: PHashMap<(u32, u16, Protocol), Holder>,
    /// The backends of nat services (enabled or draining) to their
    /// service: replies of one are translated back to one VIP.
    nat_backends: PHashMap<(u32, u16, Protocol), Holder>,
    /// VIPs, to the services that use them.
    vips: Holders,
    /// Backend addresses (every mode, every admin state) to their services.
    backend_addresses: Holders,
    /// Pool addresses to their pool.
    pool_addresses: PHashMap<u32, Holder>,
    /// How many dynamic services use each pool.
    pool_users: PHashMap<String, usize>,
    /// The dynamic services and pools, compiled.
    services: OrdMap<String, Arc<ServiceSpec>>,
    pools: OrdMap<String, SourcePoolSpec>,
}

impl Effective {
    /// The static objects of `config` (ports with `macs`), indexed; no
    /// dynamic object yet.
    fn of_config(config: &Config, macs: &[EthernetAddress]) -> Effective {
        let base = config.snapshot_spec(macs);
        let local = base.ports.iter().flat_map(|p| p.addresses.iter().map(move |c| (c.addr, p.name.clone()))).collect();
        let mut e = Effective {
            file: config.path.display().to_string().into(),
            workers: config.workers(),
            local: Arc::new(local),
            static_services: Arc::new(config.services().iter().map(|s| s.name.clone()).collect()),
            static_pools: Arc::new(config.source_pools().iter().map(|p| p.name.clone()).collect()),
            listeners: PHashMap::new(),
            nat_backends: PHashMap::new(),
            vips: PHashMap::new(),
            backend_addresses: PHashMap::new(),
            pool_addresses: PHashMap::new(),
            pool_users: PHashMap::new(),
            services: OrdMap::new(),
            pools: OrdMap::new(),
            base: Arc::new(SnapshotSpec::default()),
        };
        for s in config.services() {
            e.index_service(s, &Holder::Static(s.name.as_str().into()));
        }
        for p in config.source_pools() {
            let h = Holder::Static(p.name.as_str().into());
            for a in &p.addresses {
                e.pool_addresses.insert(*a, h.clone());
            }
        }
        e.base = Arc::new(base);
        e
    }

    /// Validates the whole dynamic state against `config`: each pool, then
    /// each service, in name order, through the same rules as a change.
    pub fn build(config: &Config, macs: &[EthernetAddress], dynamic: &DesiredState) -> Result<Effective, StateError> {
        check_counts(dynamic)?;
        let mut e = Effective::of_config(config, macs);
        for (key, p) in &dynamic.source_pools {
            e.add_pool(key, p)?;
        }
        for (key, s) in &dynamic.services {
            e.add_service(key, s, dynamic)?;
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
            if let Some(n) = e.pool_users.get(name).copied().filter(|n| *n > 0) {
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
                e.add_service(name, s, next)?;
            }
        }
        Ok(e)
    }

    /// The description of the whole snapshot: the static objects, then the
    /// dynamic ones in name order.
    pub fn spec(&self) -> SnapshotSpec {
        let mut spec = (*self.base).clone();
        spec.services.reserve(self.services.len());
        spec.services.extend(self.services.values().cloned());
        spec.source_pools.extend(self.pools.values().cloned());
        spec
    }

    fn ports(&self) -> &[PortSpec] {
        &self.base.ports
    }

    fn routes(&self) -> &[RouteSpec] {
        &self.base.routes
    }

    /// Adds `s` (static or dynamic, as `h` says) to the indexes. Unchecked.
    fn index_service(&mut self, s: &ServiceSpec, h: &Holder) {
        self.listeners.insert((s.vip, s.port, s.protocol), h.clone());
        add_holder(&mut self.vips, s.vip, h);
        for b in &s.backends {
            add_holder(&mut self.backend_addresses, b.addr, h);
            if matches!(s.mode, ForwardingMode::Nat) {
                self.nat_backends.insert((b.addr, b.port, s.protocol), h.clone());
            }
        }
    }

    /// Takes dynamic service `name` (as it was: `s`) out of the indexes.
    fn remove_service(&mut self, name: &str, s: &ServiceState) {
        let h = Holder::Dynamic(name.into());
        let protocol = s.protocol.to_spec();
        let vip = u32::from(s.vip);
        if self.listeners.get(&(vip, s.port, protocol)) == Some(&h) {
            self.listeners.remove(&(vip, s.port, protocol));
        }
        remove_holder(&mut self.vips, vip, &h);
        for b in &s.backends {
            let addr = u32::from(b.address);
            remove_holder(&mut self.backend_addresses, addr, &h);
            if self.nat_backends.get(&(addr, b.port, protocol)) == Some(&h) {
                self.nat_backends.remove(&(addr, b.port, protocol));
            }
        }
        if let ModeState::Fullnat { source_pool } = &s.mode
            && let Some(n) = self.pool_users.get_mut(source_pool)
        {
            *n = n.saturating_sub(1);
        }
        self.services.remove(name);
    }

    /// Takes dynamic pool `name` (as it was: `p`) out of the indexes.
    fn remove_pool(&mut self, name: &str, p: &PoolState) {
        let h = Holder::Dynamic(name.into());
        for a in &p.addresses {
            if self.pool_addresses.get(&u32::from(*a)) == Some(&h) {
                self.pool_addresses.remove(&u32::from(*a));
            }
        }
        self.pools.remove(name);
    }

    /// Checks dynamic pool `p` (stored under `key`) against the rules and
    /// the indexes, and adds it.
    fn add_pool(&mut self, key: &str, p: &PoolState) -> Result<(), StateError> {
        let spec = self.check_pool(key, p)?;
        let h = Holder::Dynamic(key.into());
        for a in &spec.addresses {
            self.pool_addresses.insert(*a, h.clone());
        }
        self.pools.insert(key.to_owned(), spec);
        Ok(())
    }

    /// Checks dynamic service `s` (stored under `key`, in state `state`)
    /// against the rules and the indexes, and adds it.
    fn add_service(&mut self, key: &str, s: &ServiceState, state: &DesiredState) -> Result<(), StateError> {
        let spec = self.check_service(key, s, state)?;
        let h = Holder::Dynamic(key.into());
        self.listeners.insert((spec.vip, spec.port, spec.protocol), h.clone());
        add_holder(&mut self.vips, spec.vip, &h);
        let protocol = spec.protocol;
        for b in &s.backends {
            let addr = u32::from(b.address);
            add_holder(&mut self.backend_addresses, addr, &h);
            if matches!(s.mode, ModeState::Nat) && b.admin_state != AdminState::Disabled {
                self.nat_backends.insert((addr, b.port, protocol), h.clone());
            }
        }
        if let ModeState::Fullnat { source_pool } = &s.mode {
            *self.pool_users.entry(source_pool.clone()).or_insert(0) += 1;
        }
        self.services.insert(key.to_owned(), Arc::new(spec));
        Ok(())
    }

    /// The rules of a dynamic source pool.
    fn check_pool(&self, key: &str, p: &PoolState) -> Result<SourcePoolSpec, StateError> {
        let f = |k: &str| pool_field(key, k);
        if p.name != key {
            return Err(StateError::invalid(f("name"), format!("{:?} differs from its key", p.name)));
        }
        check_name(&p.name).map_err(|r| StateError::invalid(f("name"), r))?;
        check_owner(&p.owner).map_err(|r| StateError::invalid(f("owner"), r))?;
        if self.static_pools.contains(&p.name) {
            return Err(StateError::invalid(
                f("name"),
                format!("a static source pool named {:?} is defined in {}", p.name, self.file),
            ));
        }
        if p.addresses.is_empty() {
            return Err(StateError::invalid(f("addresses"), "a source pool needs at least one address"));
        }
        let mut mine = std::collections::HashSet::new();
        for (j, a) in p.addresses.iter().enumerate() {
            let field = format!("source_pools[{key:?}].addresses[{j}]");
            let addr = u32::from(*a);
            if !is_unicast(addr) {
                return Err(StateError::invalid(field, format!("{a} is not a unicast address")));
            }
            check_not_subnet_edge(addr, self.ports()).map_err(|r| StateError::invalid(&field, r))?;
            if let Some(port) = self.local.get(&addr) {
                return Err(StateError::invalid(
                    field,
                    format!("{a} is an address of port {port:?}; a pool needs addresses of its own"),
                ));
            }
            if self.vips.contains_key(&addr) {
                return Err(StateError::invalid(field, format!("{a} is a VIP; a pool needs addresses of its own")));
            }
            if let Some(h) = self.backend_addresses.get(&addr).and_then(|l| l.first()) {
                return Err(StateError::invalid(
                    field,
                    format!("{a} is a backend of {}", h.describe("service", Some(&self.file))),
                ));
            }
            if !mine.insert(addr) {
                return Err(StateError::invalid(field, format!("{a} is already in source pool {:?}", p.name)));
            }
            if let Some(h) = self.pool_addresses.get(&addr) {
                return Err(StateError::invalid(
                    field,
                    format!("{a} is already in {}", h.describe("source pool", None)),
                ));
            }
        }
        check_pool_ports(p.first_port, p.last_port, self.workers).map_err(|r| StateError::invalid(f("ports"), r))?;
        Ok(SourcePoolSpec {
            name: p.name.clone(),
            addresses: p.addresses.iter().map(|a| u32::from(*a)).collect(),
            first_port: p.first_port,
            last_port: p.last_port,
        })
    }

    /// The rules of a dynamic service.
    fn check_service(&self, key: &str, s: &ServiceState, state: &DesiredState) -> Result<ServiceSpec, StateError> {
        let f = |k: &str| service_field(key, k);
        if s.name != key {
            return Err(StateError::invalid(f("name"), format!("{:?} differs from its key", s.name)));
        }
        check_name(&s.name).map_err(|r| StateError::invalid(f("name"), r))?;
        check_owner(&s.owner).map_err(|r| StateError::invalid(f("owner"), r))?;
        if self.static_services.contains(&s.name) {
            return Err(StateError::invalid(
                f("name"),
                format!("a static service named {:?} is defined in {}", s.name, self.file),
            ));
        }
        let vip = u32::from(s.vip);
        if !is_unicast(vip) {
            return Err(StateError::invalid(f("vip"), format!("{} is not a unicast address", s.vip)));
        }
        check_not_subnet_edge(vip, self.ports()).map_err(|r| StateError::invalid(f("vip"), r))?;
        if let Some(port) = self.local.get(&vip) {
            return Err(StateError::invalid(
                f("vip"),
                format!("{} is an address of port {port:?}, not a free VIP", s.vip),
            ));
        }
        if let Some(h) = self.pool_addresses.get(&vip) {
            return Err(StateError::invalid(
                f("vip"),
                format!("{} is an address of {}", s.vip, h.describe("source pool", None)),
            ));
        }
        if let Some(h) = self.backend_addresses.get(&vip).and_then(|l| l.first()) {
            return Err(StateError::invalid(
                f("vip"),
                format!("{} is a backend of {}", s.vip, h.describe("service", Some(&self.file))),
            ));
        }
        let port = check_port_number(i64::from(s.port)).map_err(|r| StateError::invalid(f("port"), r))?;
        let protocol = s.protocol.to_spec();
        if let Some(other) = self.listeners.get(&(vip, port, protocol)) {
            return Err(StateError::invalid(
                f("port"),
                format!(
                    "{}:{port}/{} is already served by {}",
                    s.vip,
                    protocol.name(),
                    other.describe("service", Some(&self.file))
                ),
            ));
        }
        check_table_size(i64::from(s.table_size)).map_err(|r| StateError::invalid(f("table_size"), r))?;
        if let ModeState::Fullnat { source_pool } = &s.mode
            && !self.static_pools.contains(source_pool)
            && !state.source_pools.contains_key(source_pool)
        {
            return Err(StateError::invalid(f("source_pool"), format!("no source pool is named {source_pool:?}")));
        }
        check_backend_count(s.backends.len()).map_err(|r| StateError::invalid(f("backends"), r))?;
        let mut seen = std::collections::HashSet::with_capacity(s.backends.len());
        let is_dsr = matches!(s.mode, ModeState::Dsr { .. });
        for (j, b) in s.backends.iter().enumerate() {
            let bf = |k: &str| backend_field(key, j, k);
            let addr = u32::from(b.address);
            if self.local.contains_key(&addr) || self.vips.contains_key(&addr) || addr == vip {
                return Err(StateError::invalid(
                    bf("address"),
                    format!("{} is an address of the gateway itself (a port address or a VIP)", b.address),
                ));
            }
            if !is_unicast(addr) {
                return Err(StateError::invalid(bf("address"), format!("{} is not a unicast address", b.address)));
            }
            check_not_subnet_edge(addr, self.ports()).map_err(|r| StateError::invalid(bf("address"), r))?;
            if !self.ports().iter().flat_map(|p| &p.addresses).any(|c| covers(c, addr))
                && !self.routes().iter().any(|r| covers(&r.prefix, addr))
            {
                return Err(StateError::invalid(
                    bf("address"),
                    format!("no route to {}: it is on no port's subnet and no route covers it", b.address),
                ));
            }
            let bport = check_port_number(i64::from(b.port)).map_err(|r| StateError::invalid(bf("port"), r))?;
            if !seen.insert((addr, bport)) {
                return Err(StateError::invalid(bf("address"), format!("{}:{bport} is listed twice", b.address)));
            }
            if is_dsr && bport != port {
                return Err(StateError::invalid(
                    bf("port"),
                    format!(
                        "{bport}: direct server return cannot change the port; the backend must listen on the service port {port}"
                    ),
                ));
            }
            if let Some(h) = self.pool_addresses.get(&addr) {
                return Err(StateError::invalid(
                    bf("address"),
                    format!("{} is an address of {}", b.address, h.describe("source pool", None)),
                ));
            }
            if matches!(s.mode, ModeState::Nat)
                && b.admin_state != AdminState::Disabled
                && let Some(other) = self.nat_backends.get(&(addr, bport, protocol))
            {
                return Err(StateError::invalid(
                    bf("address"),
                    format!(
                        "{}:{bport}/{} already serves {}; replies could not be translated back to one VIP",
                        b.address,
                        protocol.name(),
                        other.describe("service", None)
                    ),
                ));
            }
            check_weight(i64::from(b.weight)).map_err(|r| StateError::invalid(bf("weight"), r))?;
        }
        if s.backends.len() > s.table_size as usize {
            return Err(StateError::invalid(
                f("backends"),
                format!("{} backends do not fit a table of {} slots", s.backends.len(), s.table_size),
            ));
        }
        s.to_spec()
    }
}

fn covers(c: &Ipv4Cidr, addr: u32) -> bool {
    (c.addr ^ addr) & Route::mask(c.len) == 0
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
