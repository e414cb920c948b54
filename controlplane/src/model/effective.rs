//! The effective desired state: the static objects of the configuration
//! file and the dynamic ones of the API, validated, with the indexes that
//! make a change cost what it changes.
//!
//! Owns: every cross-object rule a service or source pool must follow,
//! static or dynamic, each written once (`Effective::check_service`,
//! `Effective::check_pool`), and the indexes those rules read:
//! VIP:port/protocol to its service, nat backend to its service, VIPs,
//! backend addresses, pool addresses, pool users. The configuration file's
//! objects are added first, when the file is loaded (`Effective::statics`):
//! an error names the field path of the file's object
//! (`services[2].backends[0].address`), which the loader turns into a line.
//! Whole validation ([`Effective::build`], at start and reload) starts from
//! those and adds the dynamic objects one by one through the same rules as
//! a change ([`Effective::update`]), which removes the prior versions of the
//! objects it touched and adds their new ones: only they are checked,
//! against the indexes, in time proportional to their size. (`build` and
//! `update` read the configuration and the dynamic state, so they are
//! written in [`crate::state`], on the primitives here.)
//!
//! Every map is a persistent one ([`imbl`]): a clone shares its structure,
//! so an update works on a copy that is dropped if any rule refuses it,
//! and the version in force is never half-changed.

use std::sync::Arc;

use imbl::{GenericHashMap, OrdMap};

/// A persistent hash map with ahash's hasher: a whole-state change inserts
/// and looks up hundreds of thousands of keys (addresses, VIP:port
/// triples), which SipHash, imbl's default, made most of its validation.
/// Its seeds are random, as SipHash's were.
type PHashMap<K, V> = GenericHashMap<K, V, ahash::RandomState, imbl::shared_ptr::DefaultSharedPtr>;
use vipgate_dataplane::route::Route;
use vipgate_dataplane::snapshot::{Ipv4Cidr, PortSpec, Protocol, RouteSpec, ServiceSpec, SnapshotSpec, SourcePoolSpec};
use vipgate_dataplane::wire::EthernetAddress;

use super::{AdminState, ModeState, PoolState, ServiceState};
use crate::checks::{
    check_backend_count, check_name, check_not_subnet_edge, check_owner, check_pool_ports, check_port_number,
    check_table_size, check_weight, is_unicast,
};

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

/// Where an object being checked comes from, and so how its fields are
/// named: a static object by its index in the file (`services[2]`), a
/// dynamic one by its name (`services["web"]`).
#[derive(Clone, Copy, Debug)]
enum Origin {
    /// The configuration file's object number `.0` of its kind.
    Static(usize),
    /// An object of the API's dynamic state.
    Dynamic,
}

/// A rule's refusal: the field path (`services[2].backends[0].address`
/// for the file's objects, `services["web"].backends[0].address` for the
/// API's) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The field path.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl Refusal {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Refusal {
        Refusal { field: field.into(), reason: reason.into() }
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
    /// MACs, routes, neighbours, static services and pools, compiled).
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

impl std::fmt::Debug for Effective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Effective")
            .field("file", &self.file)
            .field("static_services", &self.static_services.len())
            .field("static_pools", &self.static_pools.len())
            .field("services", &self.services.len())
            .field("pools", &self.pools.len())
            .finish_non_exhaustive()
    }
}

impl Effective {
    /// The static objects of a configuration file (`file`): `base` holds
    /// its ports, routes and neighbours (no services or pools), `pools` and
    /// `services` its `[[source_pools]]` and `[[services]]` in file order,
    /// each checked by the same rules as a dynamic object and added, pools
    /// first. A refusal names the object by its index in the file.
    pub(crate) fn statics(
        file: &str,
        base: SnapshotSpec,
        workers: usize,
        pools: &[PoolState],
        services: &[ServiceState],
    ) -> Result<Effective, Refusal> {
        let local = base.ports.iter().flat_map(|p| p.addresses.iter().map(move |c| (c.addr, p.name.clone()))).collect();
        let mut e = Effective {
            file: file.into(),
            workers,
            local: Arc::new(local),
            static_services: Arc::default(),
            static_pools: Arc::default(),
            listeners: PHashMap::default(),
            nat_backends: PHashMap::default(),
            vips: PHashMap::default(),
            backend_addresses: PHashMap::default(),
            pool_addresses: PHashMap::default(),
            pool_users: PHashMap::default(),
            services: OrdMap::new(),
            pools: OrdMap::new(),
            base: Arc::new(base),
        };
        let none = OrdMap::new();
        for (i, p) in pools.iter().enumerate() {
            let spec = e.check_pool(Origin::Static(i), &p.name, p)?;
            let h = Holder::Static(p.name.as_str().into());
            for a in &spec.addresses {
                e.pool_addresses.insert(*a, h.clone());
            }
            Arc::make_mut(&mut e.static_pools).insert(p.name.clone());
            Arc::make_mut(&mut e.base).source_pools.push(spec);
        }
        for (i, s) in services.iter().enumerate() {
            let spec = e.check_service(Origin::Static(i), &s.name, s, &none)?;
            e.index_service(s, &Holder::Static(s.name.as_str().into()));
            Arc::make_mut(&mut e.static_services).insert(s.name.clone());
            Arc::make_mut(&mut e.base).services.push(Arc::new(spec));
        }
        Ok(e)
    }

    /// This state with the ports' real MACs (the configuration's static
    /// objects are validated with zero ones).
    pub(crate) fn with_macs(mut self, macs: &[EthernetAddress]) -> Effective {
        if !macs.is_empty() {
            for (p, mac) in Arc::make_mut(&mut self.base).ports.iter_mut().zip(macs) {
                p.mac = *mac;
            }
        }
        self
    }

    /// How many dynamic services use pool `name` now.
    pub(crate) fn pool_users(&self, name: &str) -> usize {
        self.pool_users.get(name).copied().unwrap_or(0)
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

    /// Adds service `s` (static or dynamic, as `h` says) to the indexes;
    /// checked already. Disabled backends are no nat backends.
    fn index_service(&mut self, s: &ServiceState, h: &Holder) {
        let protocol = s.protocol.to_spec();
        let vip = u32::from(s.vip);
        self.listeners.insert((vip, s.port, protocol), h.clone());
        add_holder(&mut self.vips, vip, h);
        for b in &s.backends {
            let addr = u32::from(b.address);
            add_holder(&mut self.backend_addresses, addr, h);
            if matches!(s.mode, ModeState::Nat) && b.admin_state != AdminState::Disabled {
                self.nat_backends.insert((addr, b.port, protocol), h.clone());
            }
        }
    }

    /// Takes dynamic service `name` (as it was: `s`) out of the indexes.
    pub(crate) fn remove_service(&mut self, name: &str, s: &ServiceState) {
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
    pub(crate) fn remove_pool(&mut self, name: &str, p: &PoolState) {
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
    pub(crate) fn add_pool(&mut self, key: &str, p: &PoolState) -> Result<(), Refusal> {
        let spec = self.check_pool(Origin::Dynamic, key, p)?;
        let h = Holder::Dynamic(key.into());
        for a in &spec.addresses {
            self.pool_addresses.insert(*a, h.clone());
        }
        self.pools.insert(key.to_owned(), spec);
        Ok(())
    }

    /// Checks dynamic service `s` (stored under `key`; `pools`: the
    /// dynamic pools it may use) against the rules and the indexes, and
    /// adds it.
    pub(crate) fn add_service(
        &mut self,
        key: &str,
        s: &ServiceState,
        pools: &OrdMap<String, PoolState>,
    ) -> Result<(), Refusal> {
        let spec = self.check_service(Origin::Dynamic, key, s, pools)?;
        self.index_service(s, &Holder::Dynamic(key.into()));
        if let ModeState::Fullnat { source_pool } = &s.mode {
            *self.pool_users.entry(source_pool.clone()).or_insert(0) += 1;
        }
        self.services.insert(key.to_owned(), Arc::new(spec));
        Ok(())
    }

    /// How a refusal of an object of `origin` names the holder `h` of what
    /// it conflicts with: a static object's refusal names any other by
    /// name (all of them are static); a dynamic one's says `static`, and
    /// with `file` the configuration file it is defined in.
    fn describe(&self, h: &Holder, kind: &str, origin: Origin, file: bool) -> String {
        match (origin, h) {
            (Origin::Static(_), Holder::Static(n) | Holder::Dynamic(n)) => format!("{kind} {n:?}"),
            (Origin::Dynamic, h) => h.describe(kind, file.then_some(&*self.file)),
        }
    }

    /// The rules of an object's name and owner, which a service and a
    /// source pool share; `(list, kind)` is `("services", "service")` or
    /// `("source_pools", "source pool")`, `statics` the static objects'
    /// names of that kind. Returns where the object's fields are named:
    /// `services[2]` in the file, `services["web"]` in the API.
    fn check_identity(
        &self,
        origin: Origin,
        (list, kind): (&str, &str),
        key: &str,
        name: &str,
        owner: &str,
        statics: &std::collections::HashSet<String>,
    ) -> Result<String, Refusal> {
        let at = match origin {
            Origin::Static(i) => format!("{list}[{i}]"),
            Origin::Dynamic => format!("{list}[{key:?}]"),
        };
        let field = |k: &str| format!("{at}.{k}");
        if name != key {
            return Err(Refusal::new(field("name"), format!("{name:?} differs from its key")));
        }
        check_name(name).map_err(|r| Refusal::new(field("name"), r))?;
        match origin {
            Origin::Static(_) if statics.contains(name) => {
                return Err(Refusal::new(field("name"), format!("another {kind} is already named {name:?}")));
            }
            Origin::Static(_) => {}
            Origin::Dynamic => {
                check_owner(owner).map_err(|r| Refusal::new(field("owner"), r))?;
                if statics.contains(name) {
                    return Err(Refusal::new(
                        field("name"),
                        format!("a static {kind} named {name:?} is defined in {}", self.file),
                    ));
                }
            }
        }
        Ok(at)
    }

    /// The rules of a source pool, static or dynamic (`origin`), stored
    /// under `key`.
    fn check_pool(&self, origin: Origin, key: &str, p: &PoolState) -> Result<SourcePoolSpec, Refusal> {
        let at =
            self.check_identity(origin, ("source_pools", "source pool"), key, &p.name, &p.owner, &self.static_pools)?;
        let f = |k: &str| format!("{at}.{k}");
        if p.addresses.is_empty() {
            return Err(Refusal::new(f("addresses"), "a source pool needs at least one address"));
        }
        let mut mine = std::collections::HashSet::new();
        for (j, a) in p.addresses.iter().enumerate() {
            let field = f(&format!("addresses[{j}]"));
            let addr = u32::from(*a);
            if !is_unicast(addr) {
                return Err(Refusal::new(field, format!("{a} is not a unicast address")));
            }
            check_not_subnet_edge(addr, self.ports()).map_err(|r| Refusal::new(&field, r))?;
            if let Some(port) = self.local.get(&addr) {
                return Err(Refusal::new(
                    field,
                    format!("{a} is an address of port {port:?}; a pool needs addresses of its own"),
                ));
            }
            if self.vips.contains_key(&addr) {
                return Err(Refusal::new(field, format!("{a} is a VIP; a pool needs addresses of its own")));
            }
            if let Some(h) = self.backend_addresses.get(&addr).and_then(|l| l.first()) {
                return Err(Refusal::new(
                    field,
                    format!("{a} is a backend of {}", self.describe(h, "service", origin, true)),
                ));
            }
            if !mine.insert(addr) {
                return Err(Refusal::new(field, format!("{a} is already in source pool {:?}", p.name)));
            }
            if let Some(h) = self.pool_addresses.get(&addr) {
                return Err(Refusal::new(
                    field,
                    format!("{a} is already in {}", self.describe(h, "source pool", origin, false)),
                ));
            }
        }
        check_pool_ports(p.first_port, p.last_port, self.workers).map_err(|r| Refusal::new(f("ports"), r))?;
        Ok(SourcePoolSpec {
            name: p.name.clone(),
            addresses: p.addresses.iter().map(|a| u32::from(*a)).collect(),
            first_port: p.first_port,
            last_port: p.last_port,
        })
    }

    /// The rules of a service, static or dynamic (`origin`), stored under
    /// `key`; it may use the static pools and the dynamic `pools`.
    fn check_service(
        &self,
        origin: Origin,
        key: &str,
        s: &ServiceState,
        pools: &OrdMap<String, PoolState>,
    ) -> Result<ServiceSpec, Refusal> {
        let at = self.check_identity(origin, ("services", "service"), key, &s.name, &s.owner, &self.static_services)?;
        let f = |k: &str| format!("{at}.{k}");
        let vip = u32::from(s.vip);
        if !is_unicast(vip) {
            return Err(Refusal::new(f("vip"), format!("{} is not a unicast address", s.vip)));
        }
        check_not_subnet_edge(vip, self.ports()).map_err(|r| Refusal::new(f("vip"), r))?;
        if let Some(port) = self.local.get(&vip) {
            return Err(Refusal::new(f("vip"), format!("{} is an address of port {port:?}, not a free VIP", s.vip)));
        }
        if let Some(h) = self.pool_addresses.get(&vip) {
            return Err(Refusal::new(
                f("vip"),
                format!("{} is an address of {}", s.vip, self.describe(h, "source pool", origin, false)),
            ));
        }
        if let Some(h) = self.backend_addresses.get(&vip).and_then(|l| l.first()) {
            return Err(Refusal::new(
                f("vip"),
                format!("{} is a backend of {}", s.vip, self.describe(h, "service", origin, true)),
            ));
        }
        let port = check_port_number(i64::from(s.port)).map_err(|r| Refusal::new(f("port"), r))?;
        let protocol = s.protocol.to_spec();
        if let Some(other) = self.listeners.get(&(vip, port, protocol)) {
            return Err(Refusal::new(
                f("port"),
                format!(
                    "{}:{port}/{} is already served by {}",
                    s.vip,
                    protocol.name(),
                    self.describe(other, "service", origin, true)
                ),
            ));
        }
        check_table_size(i64::from(s.table_size)).map_err(|r| Refusal::new(f("table_size"), r))?;
        if let ModeState::Fullnat { source_pool } = &s.mode
            && !self.static_pools.contains(source_pool)
            && !pools.contains_key(source_pool)
        {
            return Err(Refusal::new(f("source_pool"), format!("no source pool is named {source_pool:?}")));
        }
        check_backend_count(s.backends.len()).map_err(|r| Refusal::new(f("backends"), r))?;
        let mut seen = std::collections::HashSet::with_capacity(s.backends.len());
        let is_dsr = matches!(s.mode, ModeState::Dsr { .. });
        for (j, b) in s.backends.iter().enumerate() {
            let bf = |k: &str| format!("{at}.backends[{j}].{k}");
            let addr = u32::from(b.address);
            if self.local.contains_key(&addr) || self.vips.contains_key(&addr) || addr == vip {
                return Err(Refusal::new(
                    bf("address"),
                    format!("{} is an address of the gateway itself (a port address or a VIP)", b.address),
                ));
            }
            if !is_unicast(addr) {
                return Err(Refusal::new(bf("address"), format!("{} is not a unicast address", b.address)));
            }
            check_not_subnet_edge(addr, self.ports()).map_err(|r| Refusal::new(bf("address"), r))?;
            if !self.ports().iter().flat_map(|p| &p.addresses).any(|c| covers(c, addr))
                && !self.routes().iter().any(|r| covers(&r.prefix, addr))
            {
                return Err(Refusal::new(
                    bf("address"),
                    format!("no route to {}: it is on no port's subnet and no route covers it", b.address),
                ));
            }
            let bport = check_port_number(i64::from(b.port)).map_err(|r| Refusal::new(bf("port"), r))?;
            if !seen.insert((addr, bport)) {
                return Err(Refusal::new(bf("address"), format!("{}:{bport} is listed twice", b.address)));
            }
            if is_dsr && bport != port {
                return Err(Refusal::new(
                    bf("port"),
                    format!(
                        "{bport}: direct server return cannot change the port; the backend must listen on the service port {port}"
                    ),
                ));
            }
            if let Some(h) = self.pool_addresses.get(&addr) {
                return Err(Refusal::new(
                    bf("address"),
                    format!("{} is an address of {}", b.address, self.describe(h, "source pool", origin, false)),
                ));
            }
            if matches!(s.mode, ModeState::Nat)
                && b.admin_state != AdminState::Disabled
                && let Some(other) = self.nat_backends.get(&(addr, bport, protocol))
            {
                return Err(Refusal::new(
                    bf("address"),
                    format!(
                        "{}:{bport}/{} already serves {}; replies could not be translated back to one VIP",
                        b.address,
                        protocol.name(),
                        self.describe(other, "service", origin, false)
                    ),
                ));
            }
            check_weight(i64::from(b.weight)).map_err(|r| Refusal::new(bf("weight"), r))?;
        }
        if s.backends.len() > s.table_size as usize {
            return Err(Refusal::new(
                f("backends"),
                format!("{} backends do not fit a table of {} slots", s.backends.len(), s.table_size),
            ));
        }
        s.to_spec(&at)
    }
}

fn covers(c: &Ipv4Cidr, addr: u32) -> bool {
    (c.addr ^ addr) & Route::mask(c.len) == 0
}
