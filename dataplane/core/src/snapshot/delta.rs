//! Compiling a change in proportion to the change: the previous snapshot's
//! indexes are copied and patched for the services that changed, came or
//! went, instead of being rebuilt from every service.
//!
//! A [`SpecDelta`] says which services of a specification may differ from
//! those of the snapshot it is compiled against, and where they stand in
//! both service lists (every other service keeps its relative order).
//! [`Snapshot::build_changed`] then copies the previous snapshot's hash
//! indexes (entries are `Copy`: a copy is one pass over memory, no hashing),
//! removes what the outgoing services put there, adds what the incoming
//! ones need, and shares everything else. Whatever it does not handle (a
//! change of ports, routes, neighbours or pools; a next hop that appears or
//! disappears, which renumbers the next-hop slots; any error) goes the
//! whole way, [`Snapshot::build_whole`], so the result and the errors are
//! always those of a build from scratch.

use super::*;

/// Service name -> position in a snapshot's service list. Keyed by a hash
/// of the name, so that copying it for a change copies memory only; a hit
/// is confirmed against the name at that position.
#[derive(Clone, Debug)]
pub(super) struct NameIndex {
    hasher: RandomState,
    positions: HashMap<u64, u32, RandomState>,
}

impl NameIndex {
    /// The index of `list`; `None` if two names share a hash (or a name is
    /// used twice).
    pub(super) fn build(list: &[Arc<Service>]) -> Option<NameIndex> {
        let hasher = RandomState::new();
        let mut positions = HashMap::with_capacity_and_hasher(list.len(), RandomState::new());
        for (i, s) in list.iter().enumerate() {
            if positions.insert(hasher.hash_one(s.name.as_str()), i as u32).is_some() {
                return None;
            }
        }
        Some(NameIndex { hasher, positions })
    }

    /// Where the service `name` stands in `list`, the list the index was
    /// built for.
    fn find(&self, name: &str, list: &[Arc<Service>]) -> Option<u32> {
        let &i = self.positions.get(&self.hasher.hash_one(name))?;
        (list.get(i as usize)?.name == name).then_some(i)
    }
}

/// Which services of a specification may differ from those of the
/// snapshot it is compiled against (the *previous* one), and where they
/// stand in both service lists; every service it does not name is the
/// previous one's, in the same relative order. Made by [`Snapshot::delta`]
/// (from the names of the services a change touched) or
/// [`Snapshot::diff`] (by comparing every service); used by
/// [`Snapshot::build_changed`], and by whoever keeps a list of its own in
/// snapshot order ([`SpecDelta::merge`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecDelta {
    /// The generation of the snapshot it was made against.
    base: u64,
    old_len: usize,
    new_len: usize,
    /// (position in the specification, position in the previous snapshot
    /// if the service was there), ascending.
    changed: Vec<(u32, Option<u32>)>,
    /// (position in the previous snapshot, name) of the services that are
    /// gone, ascending.
    removed: Vec<(u32, String)>,
}

impl SpecDelta {
    /// The generation of the snapshot it was made against
    /// ([`Snapshot::generation`]).
    pub fn base(&self) -> u64 {
        self.base
    }

    /// How many services the previous snapshot has.
    pub fn old_len(&self) -> usize {
        self.old_len
    }

    /// How many services the specification has.
    pub fn new_len(&self) -> usize {
        self.new_len
    }

    /// The services that are new or may have changed: position in the
    /// specification and, if it was there, in the previous snapshot;
    /// ascending.
    pub fn changed(&self) -> impl ExactSizeIterator<Item = (usize, Option<usize>)> + '_ {
        self.changed.iter().map(|&(i, was)| (i as usize, was.map(|p| p as usize)))
    }

    /// The services that are gone: position in the previous snapshot and
    /// name; ascending.
    pub fn removed(&self) -> impl ExactSizeIterator<Item = (usize, &str)> + '_ {
        self.removed.iter().map(|(p, n)| (*p as usize, n.as_str()))
    }

    /// True if services come or go, so that unchanged ones may stand at
    /// other positions.
    pub fn moves(&self) -> bool {
        !self.removed.is_empty() || self.changed.iter().any(|c| c.1.is_none())
    }

    /// The list after the change from `old`, a list in the previous
    /// snapshot's order: entries of unchanged services are cloned from
    /// `old`, those of removed ones left out, and the `k`th changed one
    /// (in [`SpecDelta::changed`]'s order) is `changed(k)`.
    ///
    /// # Panics
    ///
    /// If `old` does not have [`SpecDelta::old_len`] entries.
    pub fn merge<T: Clone>(&self, old: &[T], mut changed: impl FnMut(usize) -> T) -> Vec<T> {
        assert_eq!(old.len(), self.old_len, "a list in the previous snapshot's order");
        let mut out = Vec::with_capacity(self.new_len);
        let mut j = 0;
        let mut removed = self.removed.iter().map(|r| r.0 as usize).peekable();
        let mut events = self.changed.iter().enumerate().peekable();
        while out.len() < self.new_len {
            while removed.next_if_eq(&j).is_some() {
                j += 1;
            }
            match events.peek() {
                Some(&(k, &(i, was))) if i as usize == out.len() => {
                    if was.is_some() {
                        debug_assert_eq!(was, Some(j as u32));
                        j += 1;
                    }
                    out.push(changed(k));
                    events.next();
                }
                next => {
                    // A run of unchanged entries, up to the next change or
                    // removal.
                    let to_change = next.map_or(self.new_len, |(_, c)| c.0 as usize) - out.len();
                    let to_removal = removed.peek().map_or(usize::MAX, |&r| r - j);
                    let run = to_change.min(to_removal);
                    out.extend_from_slice(&old[j..j + run]);
                    j += run;
                }
            }
        }
        out
    }

    /// Where the service at position `p` of the previous snapshot (not a
    /// removed one) stands in the specification.
    fn new_position(&self, p: u32) -> u32 {
        let mut i = p - self.removed.partition_point(|r| r.0 < p) as u32;
        for &(a, was) in &self.changed {
            if was.is_none() {
                if a > i {
                    break;
                }
                i += 1;
            }
        }
        i
    }
}

impl Snapshot {
    /// The delta from this snapshot to `spec`, given the names of the
    /// services a change created or changed (`changed`) and deleted
    /// (`removed`): every other service of `spec` must be this snapshot's,
    /// in the same order. Finds each named service through an index of
    /// names (and, when services were created, one pass over `spec`'s
    /// names). `None` when the names do not fit `spec` (a service count or
    /// a position that does not add up): compile without a delta then.
    pub fn delta(&self, spec: &SnapshotSpec, changed: &[String], removed: &[String]) -> Option<SpecDelta> {
        let names = self.meta.names.as_deref()?;
        let list = &self.service_list;
        let mut gone: Vec<(u32, String)> =
            removed.iter().filter_map(|n| names.find(n, list).map(|p| (p, n.clone()))).collect();
        gone.sort_unstable();
        gone.dedup();
        let mut in_place: Vec<(u32, &str)> = Vec::new();
        let mut added: Vec<&str> = Vec::new();
        for n in changed {
            match names.find(n, list) {
                Some(p) if gone.binary_search_by_key(&p, |g| g.0).is_ok() => return None,
                Some(p) => in_place.push((p, n)),
                None => added.push(n),
            }
        }
        in_place.sort_unstable();
        in_place.dedup();
        added.sort_unstable();
        added.dedup();
        let new_len = spec.services.len();
        if list.len() - gone.len() + added.len() != new_len {
            return None;
        }
        let mut delta =
            SpecDelta { base: self.generation, old_len: list.len(), new_len, changed: Vec::new(), removed: gone };
        if !added.is_empty() {
            // Where the new services stand: one pass over the names.
            delta.changed = spec
                .services
                .iter()
                .enumerate()
                .filter(|(_, s)| added.binary_search(&s.name.as_str()).is_ok())
                .map(|(i, _)| (i as u32, None))
                .collect();
            if delta.changed.len() != added.len() {
                return None;
            }
        }
        for &(p, name) in &in_place {
            let i = delta.new_position(p);
            if spec.services.get(i as usize)?.name != name {
                return None;
            }
            delta.changed.push((i, Some(p)));
        }
        delta.changed.sort_unstable();
        Some(delta)
    }

    /// The delta from this snapshot to `spec` found by comparing every
    /// service of `spec` with this snapshot's at the same position (`==`
    /// on [`ServiceSpec`]); `None` when services were added or removed (the
    /// names do not line up) or most of them changed.
    pub fn diff(&self, spec: &SnapshotSpec) -> Option<SpecDelta> {
        let n = spec.services.len();
        if n != self.service_list.len() {
            return None;
        }
        let mut changed = Vec::new();
        for (i, (s, o)) in spec.services.iter().zip(&self.service_list).enumerate() {
            if s.name != o.spec.name {
                return None;
            }
            if *s != o.spec {
                changed.push((i as u32, Some(i as u32)));
            }
        }
        if changed.len() > n / 4 + 1 {
            return None;
        }
        Some(SpecDelta { base: self.generation, old_len: n, new_len: n, changed, removed: Vec::new() })
    }

    /// Compiles `spec` against `previous`, the snapshot `delta` was made
    /// against: only the services `delta` names are read from `spec` (and
    /// compiled, each reusing what it can, as [`Snapshot::build_incremental`]
    /// does); every other one is `previous`'s, its entries in the indexes
    /// too. The work is in proportion to the change, but for copying the
    /// indexes (memory only, no hashing) and the list of services (a
    /// reference count each).
    ///
    /// The result equals [`Snapshot::build`]'s of the specification the
    /// delta describes (`previous`'s services with the named ones from
    /// `spec`), with the same errors. A change of ports, routes, permanent
    /// neighbours or source pools, a next hop that appears or disappears
    /// (the next-hop slots after it are renumbered, and every service that
    /// uses one of those), or an error compiles every service, as
    /// [`Snapshot::build_incremental`] does. A delta made against another
    /// snapshot is ignored: `spec` is then compiled whole, as it is.
    pub fn build_changed(
        spec: &SnapshotSpec,
        previous: &Snapshot,
        version: u64,
        delta: &SpecDelta,
    ) -> Result<Snapshot, SnapshotError> {
        if delta.base != previous.generation
            || delta.old_len != previous.service_list.len()
            || delta.new_len != spec.services.len()
        {
            return Snapshot::build_whole(spec, &spec.services.iter().collect::<Vec<_>>(), Some(previous), version);
        }
        #[cfg(debug_assertions)]
        assert_delta_names_every_change(spec, previous, delta);
        // Patching most of the services would cost what compiling them
        // all does, and may find half-way that it cannot.
        if delta.changed.len() + delta.removed.len() <= delta.new_len / 4 + 1
            && let Some(s) = previous.patch(spec, version, delta)
        {
            return Ok(s);
        }
        let before: Vec<&Arc<ServiceSpec>> = previous.service_list.iter().map(|s| &s.spec).collect();
        let services = delta.merge(&before, |k| &spec.services[delta.changed[k].0 as usize]);
        Snapshot::build_whole(spec, &services, Some(previous), version)
    }

    /// True if `addr` is a martian for another reason than being a VIP: a
    /// port address, a port subnet's directed broadcast, a pool address.
    fn is_martian_without_vips(&self, addr: u32) -> bool {
        self.local.contains_key(&addr)
            || self.pool_addresses.contains_key(&addr)
            || self.ports.iter().flat_map(|p| &p.addresses).any(|c| c.len < 31 && c.addr | !Route::mask(c.len) == addr)
    }

    /// [`Snapshot::build_changed`]'s way for a change that keeps the ports,
    /// routes, neighbours, pools and next hops: `None` for anything else,
    /// errors included.
    fn patch(&self, spec: &SnapshotSpec, version: u64, delta: &SpecDelta) -> Option<Snapshot> {
        let meta = &*self.meta;
        if spec.ports != meta.ports
            || spec.routes != meta.routes
            || spec.neighbours != meta.neighbours
            || spec.source_pools != self.source_pools
        {
            return None;
        }
        // The static routes' gateways: their slots stay whatever the
        // services do.
        let pinned: std::collections::HashMap<(u16, u32), u32> =
            self.next_hops[..meta.route_hops as usize].iter().map(|h| ((h.port, h.addr), h.slot)).collect();
        let is_pinned = |h: &NextHop| pinned.contains_key(&(h.port, h.addr));
        let mut services = self.services.clone();
        let mut reverse: Option<HashMap<u64, ReverseNat, RandomState>> = None;
        let mut vip_change: Vec<(u32, i64)> = Vec::new();

        // Out: the services that go, and the previous versions of the
        // changed ones.
        let outgoing = (delta.removed.iter().map(|r| (r.0, true)))
            .chain(delta.changed.iter().filter_map(|c| c.1).map(|p| (p, false)));
        for (p, gone) in outgoing {
            let o = &self.service_list[p as usize];
            let proto = o.protocol.number();
            if services.remove(&l4_key(o.vip, o.port, proto)) != Some(p) {
                return None;
            }
            vip_change.push((o.vip, -1));
            if o.mode == Mode::Nat {
                let reverse = reverse.get_or_insert_with(|| self.reverse.clone());
                for b in &o.backends {
                    reverse.remove(&l4_key(b.addr, b.port, proto))?;
                }
            }
            // A service that goes must not take a next hop with it.
            if gone && !o.backends.iter().all(|b| is_pinned(&b.next_hop)) {
                return None;
            }
        }
        if delta.moves() {
            for p in services.values_mut() {
                *p = delta.new_position(*p);
            }
        }

        // In: the new versions.
        let mut stats = BuildStats { services_reused: delta.new_len - delta.changed.len(), ..BuildStats::default() };
        let mut compiled = Vec::with_capacity(delta.changed.len());
        for &(i, was) in &delta.changed {
            let s = &spec.services[i as usize];
            let old = was.map(|p| &self.service_list[p as usize]);
            if self.local.contains_key(&s.vip) || self.pool_addresses.contains_key(&s.vip) {
                return None;
            }
            let proto = s.protocol.number();
            if services.insert(l4_key(s.vip, s.port, proto), i).is_some() {
                return None;
            }
            vip_change.push((s.vip, 1));
            // The next-hop list stays as it is if this service's next hops
            // (the static routes' gateways aside) are the ones its previous
            // version had, first used in the same order: the list is the
            // gateways, then each service's next hops in first-use order,
            // without repeats.
            let mut before: Vec<(u16, u32)> = Vec::new();
            let mut slots = std::collections::HashMap::new();
            for b in old.map_or(&[][..], |o| &o.backends) {
                let h = b.next_hop;
                if !is_pinned(&h) && slots.insert((h.port, h.addr), h.slot).is_none() {
                    before.push((h.port, h.addr));
                }
            }
            let mut seen = std::collections::HashSet::new();
            let mut after: Vec<(u16, u32)> = Vec::new();
            let backends = compile_backends(
                s,
                &self.routes,
                &self.ports,
                |port, addr| {
                    if let Some(&slot) = pinned.get(&(port, addr)) {
                        return slot;
                    }
                    if seen.insert((port, addr)) {
                        after.push((port, addr));
                    }
                    slots.get(&(port, addr)).copied().unwrap_or(NO_SLOT)
                },
                |_| Ok(()),
            )
            .ok()?;
            if after != before {
                return None;
            }
            if matches!(s.mode, ForwardingMode::Nat) {
                let reverse = reverse.get_or_insert_with(|| self.reverse.clone());
                for b in &s.backends {
                    let entry = ReverseNat { vip: s.vip, port: s.port, stats: b.stats_slot };
                    if reverse.insert(l4_key(b.addr, b.port, proto), entry).is_some() {
                        return None;
                    }
                }
            }
            let mode = compile_mode(s, &self.source_pools).ok()?;
            let new_flow_limit = compile_limit(s).ok()?;
            compiled.push(compile_service(s, backends, mode, new_flow_limit, old, None, &mut stats).ok()?);
        }

        // VIPs that came or went.
        vip_change.sort_unstable_by_key(|c| c.0);
        let mut net: Vec<(u32, i64)> = Vec::new();
        for (vip, d) in vip_change {
            match net.last_mut() {
                Some(last) if last.0 == vip => last.1 += d,
                _ => net.push((vip, d)),
            }
        }
        net.retain(|c| c.1 != 0);
        let (vips, martians, martian_filter, vip_users) = if net.is_empty() {
            (self.vips.clone(), self.martians.clone(), self.martian_filter, Arc::clone(&meta.vip_users))
        } else {
            let (mut vips, mut martians, mut users) =
                (self.vips.clone(), self.martians.clone(), (*meta.vip_users).clone());
            for (vip, d) in net {
                let count = i64::from(users.get(&vip).copied().unwrap_or(0)) + d;
                if count < 0 {
                    return None;
                }
                if count == 0 {
                    users.remove(&vip);
                    vips.remove(&vip);
                    if !self.is_martian_without_vips(vip) {
                        martians.remove(&vip);
                    }
                } else {
                    users.insert(vip, count as u32);
                    vips.insert(vip);
                    martians.insert(vip);
                }
            }
            let filter = address_filter(martians.iter());
            (vips, martians, filter, Arc::new(users))
        };

        let names = match &meta.names {
            Some(index) if delta.moves() => {
                let mut positions = index.positions.clone();
                for (_, name) in &delta.removed {
                    positions.remove(&index.hasher.hash_one(name.as_str()));
                }
                for p in positions.values_mut() {
                    *p = delta.new_position(*p);
                }
                let mut unique = true;
                for &(i, was) in &delta.changed {
                    if was.is_none() {
                        let name = spec.services[i as usize].name.as_str();
                        unique &= positions.insert(index.hasher.hash_one(name), i).is_none();
                    }
                }
                unique.then(|| Arc::new(NameIndex { hasher: index.hasher.clone(), positions }))
            }
            names => names.clone(),
        };

        Some(Snapshot {
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            cache_generation: self.cache_generation,
            version,
            build_stats: stats,
            ports: self.ports.clone(),
            port_macs: self.port_macs.clone(),
            devices: self.devices,
            vlans: self.vlans.clone(),
            local: self.local.clone(),
            vips,
            services,
            service_list: delta.merge(&self.service_list, |k| Arc::clone(&compiled[k])),
            reverse: reverse.unwrap_or_else(|| self.reverse.clone()),
            routes: self.routes.clone(),
            next_hops: Arc::clone(&self.next_hops),
            static_neighbours: self.static_neighbours.clone(),
            source_pools: self.source_pools.clone(),
            pool_addresses: self.pool_addresses.clone(),
            pool_filter: self.pool_filter,
            martians,
            martian_filter,
            meta: Box::new(BuildMeta {
                ports: meta.ports.clone(),
                routes: meta.routes.clone(),
                neighbours: meta.neighbours.clone(),
                route_hops: meta.route_hops,
                names,
                vip_users,
            }),
        })
    }
}

/// Checks, in debug builds, the promise a delta's maker gives: every
/// service it does not name is the previous snapshot's, in the same order.
/// Stats slots aside: a caller that knows what changed assigns slots to
/// the changed services only, and the others keep theirs.
#[cfg(debug_assertions)]
fn assert_delta_names_every_change(spec: &SnapshotSpec, previous: &Snapshot, delta: &SpecDelta) {
    let before: Vec<Option<&ServiceSpec>> = previous.service_list.iter().map(|s| Some(&*s.spec)).collect();
    for (s, old) in spec.services.iter().zip(delta.merge(&before, |_| None)) {
        let Some(old) = old else { continue };
        let same = s.backends.len() == old.backends.len() && {
            let mut s = (**s).clone();
            for (b, o) in s.backends.iter_mut().zip(&old.backends) {
                b.stats_slot = o.stats_slot;
            }
            s == *old
        };
        assert!(same, "service {:?} changed, but the delta does not name it", s.name);
    }
}
