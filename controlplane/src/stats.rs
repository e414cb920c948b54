//! Per-service and per-backend statistics: which stats slot each backend
//! counts into, and the sums the API and the metrics report.
//!
//! The dataplane counts per *slot* ([`vipgate_dataplane::stats`]); this
//! module gives every backend of every compiled service a slot, keeps it for
//! as long as the backend stays in its service (whatever else changes), and
//! reuses a slot only once nothing can count into it any more:
//!
//! 1. The backend left the snapshot, and that snapshot was published (the
//!    writer commits one change at a time and waits for the workers before
//!    the next, so a slot retired by one change is safe from the next on).
//! 2. Its flow gauges are 0 on every worker: no tracked flow refers to it.
//!    Flows move to their backend's new slot with their next packet, or
//!    leave the table when they expire.
//!
//! Counters are never reset (workers are their only writers): a slot keeps
//! the values it had when it was (re)assigned as its *baseline*, and a
//! backend's figures are the slot's values since then. What a removed
//! backend counted stays in its service's totals.
//!
//! Planning is separate from applying, so a change that is refused later
//! (it cannot be persisted, say) leaves the assignment as it was.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use vipgate_dataplane::snapshot::{ForwardingMode, ServiceSpec, SnapshotSpec, SpecDelta};
use vipgate_dataplane::stats::{BackendStats, SlotTotals};

/// A backend's slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSlot {
    /// Address.
    pub addr: u32,
    /// Port.
    pub port: u16,
    /// The weight compiled into the snapshot (0: takes no new flows).
    pub weight: u32,
    /// The slot.
    pub slot: u32,
    /// The slot's values (summed over the workers) when it was assigned.
    pub baseline: SlotTotals,
}

/// A compiled service and its backends' slots, as the readers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSlots {
    /// Name.
    pub name: String,
    /// VIP.
    pub vip: u32,
    /// Port.
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// `nat`, `fullnat` or `dsr`.
    pub mode: &'static str,
    /// Maglev table size.
    pub table_size: u32,
    /// Backends, in configuration order.
    pub backends: Vec<BackendSlot>,
}

/// The assignment in force: what readers join the workers' slots with.
#[derive(Clone, Debug, Default)]
pub struct StatsLayout {
    /// Services in snapshot order.
    pub services: Vec<Arc<ServiceSlots>>,
    /// Per service, what its removed backends counted (their final values).
    /// Shared with the layouts before and after while it does not change.
    pub retired: Arc<HashMap<String, SlotTotals>>,
}

/// Why a change cannot get slots.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the change needs stats slots for {needed} more backends but only {free} are free ([dataplane] max_backends = {capacity}, counting backends removed less than a flow timeout ago)"
)]
pub struct SlotsExhausted {
    /// Slots the change needed.
    pub needed: usize,
    /// Slots free.
    pub free: usize,
    /// `[dataplane] max_backends`.
    pub capacity: u32,
}

/// A slot retired with its backend, waiting until no flow refers to it.
#[derive(Clone, Debug)]
struct Retiring {
    service: String,
    slot: u32,
    baseline: SlotTotals,
}

/// The slot assignment; owned by the control plane's single writer.
#[derive(Debug)]
pub struct StatsSlots {
    capacity: u32,
    services: HashMap<String, Arc<ServiceSlots>>,
    /// Free slots, oldest first.
    free: std::collections::VecDeque<u32>,
    /// Slots `[next_unused, capacity)` were never used.
    next_unused: u32,
    retiring: Vec<Retiring>,
    retired: Arc<HashMap<String, SlotTotals>>,
    /// The workers' slot arrays, to read baselines and gauges.
    workers: Vec<Arc<BackendStats>>,
    /// The layout in force, in the order of the snapshot in force.
    layout: Arc<StatsLayout>,
    /// What readers see; replaced on every applied change.
    published: Arc<Mutex<Arc<StatsLayout>>>,
}

/// A planned assignment: apply it once the change it belongs to is
/// committed, or drop it.
#[derive(Debug)]
pub struct SlotPlan {
    services: Planned,
    /// Free slots taken (from the front of the free list).
    from_free: usize,
    /// Unused slots taken.
    from_unused: u32,
    retired: Vec<Retiring>,
    /// Retiring slots found idle: free them with this plan.
    reclaimed: Vec<usize>,
}

/// The services of a plan: all of them, or what changed.
#[derive(Debug)]
enum Planned {
    /// Every service, by name, and their order.
    Whole { services: HashMap<String, Arc<ServiceSlots>>, order: Vec<String> },
    /// The services `delta` names as changed, in its order; the others
    /// keep theirs, and those it names as removed go.
    Changed { delta: SpecDelta, services: Vec<Arc<ServiceSlots>> },
}

/// The totals of `slot` over `workers`.
fn read(workers: &[Arc<BackendStats>], slot: u32) -> SlotTotals {
    let mut t = SlotTotals::default();
    for w in workers {
        t.add(&w.read(slot));
    }
    t
}

fn mode_name(m: &ForwardingMode) -> &'static str {
    match m {
        ForwardingMode::Nat => "nat",
        ForwardingMode::FullNat { .. } => "fullnat",
        ForwardingMode::Dsr { .. } => "dsr",
    }
}

/// Hands out slots while a plan is made: the free list first, then the
/// retiring slots found idle, then slots never used.
struct Allocator<'a> {
    available: Box<dyn Iterator<Item = u32> + 'a>,
    from_free: usize,
    from_unused: u32,
    next_unused: u32,
    capacity: u32,
    needed: usize,
    exhausted: bool,
}

impl Allocator<'_> {
    fn take(&mut self) -> u32 {
        self.needed += 1;
        if let Some(slot) = self.available.next() {
            self.from_free += 1;
            return slot;
        }
        if self.next_unused + self.from_unused < self.capacity {
            self.from_unused += 1;
            return self.next_unused + self.from_unused - 1;
        }
        self.exhausted = true;
        vipgate_dataplane::stats::NO_SLOT
    }
}

impl StatsSlots {
    /// No slot assigned yet; `workers` are the dataplane's per-worker slot
    /// arrays (all of `capacity` slots).
    pub fn new(capacity: usize, workers: Vec<Arc<BackendStats>>) -> StatsSlots {
        StatsSlots {
            capacity: capacity.min(vipgate_dataplane::stats::MAX_SLOTS as usize) as u32,
            services: HashMap::new(),
            free: std::collections::VecDeque::new(),
            next_unused: 0,
            retiring: Vec::new(),
            retired: Arc::default(),
            workers,
            layout: Arc::default(),
            published: Arc::default(),
        }
    }

    /// Where readers find the layout in force.
    pub fn reader(&self) -> StatsReader {
        StatsReader { layout: Arc::clone(&self.published), workers: self.workers.clone() }
    }

    /// Retiring slots no flow refers to any more: they can be reused now.
    fn reclaimable(&self) -> Vec<usize> {
        self.retiring
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                let t = read(&self.workers, r.slot);
                t.active == 0 && t.inactive == 0
            })
            .map(|(i, _)| i)
            .collect()
    }

    fn allocator<'a>(&'a self, reclaimed: &'a [usize]) -> Allocator<'a> {
        Allocator {
            available: Box::new(self.free.iter().copied().chain(reclaimed.iter().map(|&i| self.retiring[i].slot))),
            from_free: 0,
            from_unused: 0,
            next_unused: self.next_unused,
            capacity: self.capacity,
            needed: 0,
            exhausted: false,
        }
    }

    fn free_at_start(&self, reclaimed: &[usize]) -> usize {
        self.free.len() + reclaimed.len() + (self.capacity - self.next_unused) as usize
    }

    /// The slots of `s` (written into it): the one each backend has if it
    /// stays in its service, else one from `alloc`. The slots of backends
    /// that left go to `retired`.
    fn plan_service(
        &self,
        shared: &mut Arc<ServiceSpec>,
        alloc: &mut Allocator<'_>,
        retired: &mut Vec<Retiring>,
    ) -> Arc<ServiceSlots> {
        let old = self.services.get(&shared.name);
        // Unchanged backends (the common case) keep their slots; the
        // description is copied only if a slot must be written into it.
        if let Some(old) = old
            && old.backends.len() == shared.backends.len()
            && old.backends.iter().zip(&shared.backends).all(|(o, b)| o.addr == b.addr && o.port == b.port)
        {
            let same = old.vip == shared.vip
                && old.port == shared.port
                && old.protocol == shared.protocol.name()
                && old.mode == mode_name(&shared.mode)
                && old.table_size == shared.table_size
                && old.backends.iter().zip(&shared.backends).all(|(o, b)| o.weight == b.weight);
            if old.backends.iter().zip(&shared.backends).any(|(o, b)| o.slot != b.stats_slot) {
                for (b, o) in Arc::make_mut(shared).backends.iter_mut().zip(&old.backends) {
                    b.stats_slot = o.slot;
                }
            }
            if same {
                return Arc::clone(old);
            }
            let s = &**shared;
            return Arc::new(ServiceSlots {
                name: s.name.clone(),
                vip: s.vip,
                port: s.port,
                protocol: s.protocol.name(),
                mode: mode_name(&s.mode),
                table_size: s.table_size,
                backends: old
                    .backends
                    .iter()
                    .zip(&s.backends)
                    .map(|(o, b)| BackendSlot { weight: b.weight, ..o.clone() })
                    .collect(),
            });
        }
        let s = Arc::make_mut(shared);
        let (protocol, mode) = (s.protocol.name(), mode_name(&s.mode));
        let (name, vip, port, table_size) = (s.name.clone(), s.vip, s.port, s.table_size);
        let service = |backends| Arc::new(ServiceSlots { name, vip, port, protocol, mode, table_size, backends });
        let kept: HashMap<(u32, u16), &BackendSlot> =
            old.map(|o| o.backends.iter().map(|b| ((b.addr, b.port), b)).collect()).unwrap_or_default();
        let mut backends = Vec::with_capacity(s.backends.len());
        for b in &mut s.backends {
            let slot = match kept.get(&(b.addr, b.port)) {
                Some(o) => BackendSlot { weight: b.weight, ..(*o).clone() },
                None => {
                    let slot = alloc.take();
                    BackendSlot {
                        addr: b.addr,
                        port: b.port,
                        weight: b.weight,
                        slot,
                        baseline: read(&self.workers, slot),
                    }
                }
            };
            b.stats_slot = slot.slot;
            backends.push(slot);
        }
        if let Some(old) = old {
            let now: std::collections::HashSet<(u32, u16)> = backends.iter().map(|b| (b.addr, b.port)).collect();
            retired.extend(old.backends.iter().filter(|b| !now.contains(&(b.addr, b.port))).map(|b| Retiring {
                service: s.name.clone(),
                slot: b.slot,
                baseline: b.baseline,
            }));
        }
        service(backends)
    }

    /// Gives every backend of `spec` its slot (written into the spec): the
    /// one it has if it stays in its service, else a free one. Changes
    /// nothing here until [`StatsSlots::apply`].
    pub fn plan(&self, spec: &mut SnapshotSpec) -> Result<SlotPlan, SlotsExhausted> {
        let reclaimed = self.reclaimable();
        let mut alloc = self.allocator(&reclaimed);
        let mut services = HashMap::with_capacity(spec.services.len());
        let mut order = Vec::with_capacity(spec.services.len());
        let mut retired = Vec::new();
        for s in &mut spec.services {
            let slots = self.plan_service(s, &mut alloc, &mut retired);
            order.push(s.name.clone());
            services.insert(s.name.clone(), slots);
        }
        if alloc.exhausted {
            return Err(SlotsExhausted {
                needed: alloc.needed,
                free: self.free_at_start(&reclaimed),
                capacity: self.capacity,
            });
        }
        // Services gone: all their backends retire.
        for (name, old) in &self.services {
            if !services.contains_key(name) {
                retired.extend(old.backends.iter().map(|b| Retiring {
                    service: name.clone(),
                    slot: b.slot,
                    baseline: b.baseline,
                }));
            }
        }
        let (from_free, from_unused) = (alloc.from_free, alloc.from_unused);
        drop(alloc);
        Ok(SlotPlan { services: Planned::Whole { services, order }, from_free, from_unused, retired, reclaimed })
    }

    /// [`StatsSlots::plan`] for the services `delta` names only (changed
    /// or new: slots written into them; removed: their slots retire); the
    /// other services of `spec` keep theirs and are not read. The work is
    /// in proportion to the change. `delta` must be made against the
    /// snapshot whose slots are in force (the one the last applied plan
    /// was made with); if the layout in force does not fit it, every
    /// service is planned ([`StatsSlots::plan`]).
    pub fn plan_changed(&self, spec: &mut SnapshotSpec, delta: &SpecDelta) -> Result<SlotPlan, SlotsExhausted> {
        let layout = &self.layout.services;
        let fits = layout.len() == delta.old_len()
            && spec.services.len() == delta.new_len()
            && delta.removed().all(|(p, name)| layout[p].name == name)
            && delta.changed().all(|(i, was)| was.is_none_or(|p| layout[p].name == spec.services[i].name));
        if !fits {
            return self.plan(spec);
        }
        let reclaimed = self.reclaimable();
        let mut alloc = self.allocator(&reclaimed);
        let mut retired = Vec::new();
        let services: Vec<Arc<ServiceSlots>> =
            delta.changed().map(|(i, _)| self.plan_service(&mut spec.services[i], &mut alloc, &mut retired)).collect();
        if alloc.exhausted {
            return Err(SlotsExhausted {
                needed: alloc.needed,
                free: self.free_at_start(&reclaimed),
                capacity: self.capacity,
            });
        }
        for (p, name) in delta.removed() {
            retired.extend(layout[p].backends.iter().map(|b| Retiring {
                service: name.to_owned(),
                slot: b.slot,
                baseline: b.baseline,
            }));
        }
        let (from_free, from_unused) = (alloc.from_free, alloc.from_unused);
        drop(alloc);
        Ok(SlotPlan {
            services: Planned::Changed { delta: delta.clone(), services },
            from_free,
            from_unused,
            retired,
            reclaimed,
        })
    }

    /// Makes `plan` the assignment in force and shows it to readers. Call
    /// once its snapshot is published.
    pub fn apply(&mut self, plan: SlotPlan) {
        let SlotPlan { services: planned, from_free, from_unused, retired, reclaimed } = plan;
        let order = match planned {
            Planned::Whole { services, order } => {
                let gone: Vec<String> = self.services.keys().filter(|n| !services.contains_key(*n)).cloned().collect();
                self.services = services;
                let layout = order.iter().map(|n| Arc::clone(&self.services[n])).collect();
                self.forget(&gone);
                layout
            }
            Planned::Changed { delta, services } => {
                let gone: Vec<String> = delta.removed().map(|(_, n)| n.to_owned()).collect();
                for name in &gone {
                    self.services.remove(name);
                }
                for s in &services {
                    self.services.insert(s.name.clone(), Arc::clone(s));
                }
                let layout = delta.merge(&self.layout.services, |k| Arc::clone(&services[k]));
                self.forget(&gone);
                layout
            }
        };
        // The free list first, then the reclaimed slots, in the order
        // `plan` handed them out; reclaimed ones not taken join the list.
        let mut reclaimed_slots = Vec::with_capacity(reclaimed.len());
        for &i in reclaimed.iter().rev() {
            let r = self.retiring.swap_remove(i);
            let final_values = read(&self.workers, r.slot).since(&r.baseline);
            if self.services.contains_key(&r.service) {
                Arc::make_mut(&mut self.retired).entry(r.service.clone()).or_default().add(&SlotTotals {
                    active: 0,
                    inactive: 0,
                    ..final_values
                });
            }
            reclaimed_slots.push(r.slot);
        }
        reclaimed_slots.reverse();
        self.free.extend(reclaimed_slots);
        self.free.drain(..from_free);
        self.next_unused += from_unused;
        self.retiring.extend(retired);
        self.layout = Arc::new(StatsLayout { services: order, retired: Arc::clone(&self.retired) });
        *self.published.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::clone(&self.layout);
    }

    /// Drops what removed backends of the services `gone` counted.
    fn forget(&mut self, gone: &[String]) {
        if gone.iter().any(|n| self.retired.contains_key(n)) {
            let retired = Arc::make_mut(&mut self.retired);
            for name in gone {
                retired.remove(name);
            }
        }
    }

    /// Slots in use or retiring, for diagnostics and tests.
    pub fn used(&self) -> usize {
        self.next_unused as usize - self.free.len()
    }
}

/// What the API and the metrics read: the layout in force and the workers'
/// slots. Cheap to clone.
#[derive(Clone, Debug)]
pub struct StatsReader {
    layout: Arc<Mutex<Arc<StatsLayout>>>,
    workers: Vec<Arc<BackendStats>>,
}

/// One backend's figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendFigures {
    /// Address.
    pub addr: Ipv4Addr,
    /// Port.
    pub port: u16,
    /// Compiled weight.
    pub weight: u32,
    /// Since the backend joined its service (gauges: now).
    pub totals: SlotTotals,
}

/// One service's figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFigures {
    /// The service and its slots.
    pub service: Arc<ServiceSlots>,
    /// Its backends' figures plus what removed backends counted.
    pub totals: SlotTotals,
    /// Per backend, in configuration order.
    pub backends: Vec<BackendFigures>,
}

impl StatsReader {
    /// A reader of nothing, for an API without a dataplane.
    pub fn empty() -> StatsReader {
        StatsReader { layout: Arc::default(), workers: Vec::new() }
    }

    /// Every service's figures, or only `only`'s.
    pub fn read(&self, only: Option<&str>) -> Vec<ServiceFigures> {
        let layout = Arc::clone(&self.layout.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        layout
            .services
            .iter()
            .filter(|s| only.is_none_or(|n| n == s.name))
            .map(|s| {
                let mut totals = layout.retired.get(&s.name).copied().unwrap_or_default();
                let backends: Vec<BackendFigures> = s
                    .backends
                    .iter()
                    .map(|b| {
                        let t = read(&self.workers, b.slot).since(&b.baseline);
                        totals.add(&t);
                        BackendFigures { addr: Ipv4Addr::from(b.addr), port: b.port, weight: b.weight, totals: t }
                    })
                    .collect();
                ServiceFigures { service: Arc::clone(s), totals, backends }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vipgate_dataplane::snapshot::{BackendSpec, Protocol, ServiceSpec};
    use vipgate_dataplane::stats::NO_SLOT;

    fn service(name: &str, backends: &[(u32, u16)]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            vip: 0xC612_6401,
            port: 80,
            protocol: Protocol::Tcp,
            table_size: 251,
            backends: backends
                .iter()
                .map(|&(addr, port)| BackendSpec { addr, port, weight: 1, stats_slot: NO_SLOT })
                .collect(),
            on_backend_removal: Default::default(),
            mode: Default::default(),
            new_flow_limit: None,
            source_ranges: Vec::new(),
            affinity: Default::default(),
        }
    }

    fn spec(services: Vec<ServiceSpec>) -> SnapshotSpec {
        SnapshotSpec { services: services.into_iter().map(Arc::new).collect(), ..SnapshotSpec::default() }
    }

    fn slots(s: &SnapshotSpec) -> Vec<Vec<u32>> {
        s.services.iter().map(|s| s.backends.iter().map(|b| b.stats_slot).collect()).collect()
    }

    #[test]
    fn backends_keep_their_slot_and_new_ones_get_unique_free_ones() {
        let workers = vec![Arc::new(BackendStats::new(8)), Arc::new(BackendStats::new(8))];
        let mut st = StatsSlots::new(8, workers);
        let mut s = spec(vec![service("a", &[(1, 80), (2, 80)]), service("b", &[(3, 80)])]);
        let p = st.plan(&mut s).unwrap();
        st.apply(p);
        assert_eq!(slots(&s), vec![vec![0, 1], vec![2]]);

        // A backend added to a, one removed from b: the others keep theirs.
        let mut s2 = spec(vec![service("a", &[(9, 80), (1, 80), (2, 80)]), service("b", &[])]);
        let p = st.plan(&mut s2).unwrap();
        st.apply(p);
        assert_eq!(slots(&s2), vec![vec![3, 0, 1], vec![]]);
        assert_eq!(st.used(), 4, "slot 2 retires, it is not free yet");
    }

    #[test]
    fn a_retired_slot_is_reused_only_once_no_flow_counts_in_it_and_its_figures_stay_with_the_service() {
        let workers = vec![Arc::new(BackendStats::new(4)), Arc::new(BackendStats::new(4))];
        let mut st = StatsSlots::new(3, workers.clone());
        let reader = st.reader();
        let mut s = spec(vec![service("a", &[(1, 80), (2, 80), (3, 80)])]);
        let p = st.plan(&mut s).unwrap();
        st.apply(p);
        // Backend 2 (slot 1) has an open flow on worker 1 and counted traffic.
        workers[1].flow_in(1, true, true);
        workers[1].count_in(1, 100);
        let mut s2 = spec(vec![service("a", &[(1, 80), (3, 80)])]);
        let p = st.plan(&mut s2).unwrap();
        st.apply(p);
        // Full: the retiring slot still has a flow.
        let mut s3 = spec(vec![service("a", &[(1, 80), (3, 80), (4, 80)])]);
        assert_eq!(st.plan(&mut s3).unwrap_err(), SlotsExhausted { needed: 1, free: 0, capacity: 3 });
        let mut s4 = spec(vec![service("a", &[(1, 80), (3, 80), (4, 80), (5, 80)])]);
        assert_eq!(
            st.plan(&mut s4).unwrap_err().to_string(),
            "the change needs stats slots for 2 more backends but only 0 are free ([dataplane] max_backends = 3, counting backends removed less than a flow timeout ago)"
        );
        // The flow leaves: the slot is reused, with a baseline, and what
        // the removed backend counted stays in the service's totals.
        workers[1].flow_out(1, true);
        let p = st.plan(&mut s3).unwrap();
        st.apply(p);
        assert_eq!(slots(&s3), vec![vec![0, 2, 1]]);
        let f = reader.read(Some("a"));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].backends[2].totals, SlotTotals::default(), "the new backend starts from zero");
        assert_eq!((f[0].totals.connections, f[0].totals.in_bytes, f[0].totals.active), (1, 100, 0));
    }

    #[test]
    fn a_plan_of_the_changed_services_only_is_the_plan_of_them_all() {
        use vipgate_dataplane::snapshot::{Ipv4Cidr, PortSpec, Snapshot};
        use vipgate_dataplane::wire::EthernetAddress;
        const NET: u32 = 0x0a00_0000;
        let svc = |name: &str, vip: u32, backends: &[u32]| ServiceSpec {
            vip: 0xC612_6400 + vip,
            ..service(name, &backends.iter().map(|&b| (NET + b, 80)).collect::<Vec<_>>())
        };
        let on_a_port = |services| SnapshotSpec {
            ports: vec![PortSpec {
                name: "p".into(),
                mac: EthernetAddress([2, 0, 0, 0, 0, 1]),
                addresses: vec![Ipv4Cidr { addr: NET + 254, len: 24 }],
                mtu: 1500,
                vlan: None,
            }],
            ..spec(services)
        };
        let workers = vec![Arc::new(BackendStats::new(16))];
        let (mut whole, mut named) = (StatsSlots::new(16, workers.clone()), StatsSlots::new(16, workers));
        let mut first = on_a_port(vec![svc("a", 1, &[1, 2]), svc("b", 2, &[3]), svc("c", 3, &[4])]);
        whole.apply(whole.plan(&mut first.clone()).unwrap());
        named.apply(named.plan(&mut first).unwrap());
        let mut snapshot = Snapshot::build(&first).unwrap();

        let mut reweighted = svc("c", 3, &[4]);
        reweighted.backends[0].weight = 3;
        let steps = [
            // b gets a backend and loses one; c's weight changes.
            (vec![svc("a", 1, &[1, 2]), svc("b", 2, &[5, 6]), reweighted.clone()], vec!["b", "c"], vec![]),
            // a goes; d comes between b and c.
            (vec![svc("b", 2, &[5, 6]), svc("d", 4, &[1, 7]), reweighted], vec!["d"], vec!["a"]),
        ];
        for (services, changed, removed) in steps {
            let next = on_a_port(services);
            let names = |v: Vec<&str>| v.into_iter().map(str::to_owned).collect::<Vec<_>>();
            let delta = snapshot.delta(&next, &names(changed), &names(removed)).unwrap();
            let (mut all, mut some) = (next.clone(), next.clone());
            let planned = whole.plan(&mut all).unwrap();
            let planned_changed = named.plan_changed(&mut some, &delta).unwrap();
            assert!(matches!(planned_changed.services, Planned::Changed { .. }));
            for (i, _) in delta.changed() {
                assert_eq!(all.services[i].backends, some.services[i].backends, "{}", all.services[i].name);
            }
            whole.apply(planned);
            named.apply(planned_changed);
            assert_eq!(whole.layout.services, named.layout.services);
            assert_eq!(whole.services, named.services);
            assert_eq!(whole.retired, named.retired);
            assert_eq!(
                (&whole.free, whole.next_unused, whole.retiring.len()),
                (&named.free, named.next_unused, named.retiring.len())
            );
            snapshot = Snapshot::build(&all).unwrap();
        }
    }

    #[test]
    fn a_plan_that_is_not_applied_changes_nothing() {
        let mut st = StatsSlots::new(8, vec![Arc::new(BackendStats::new(8))]);
        let mut s = spec(vec![service("a", &[(1, 80)])]);
        let p = st.plan(&mut s).unwrap();
        st.apply(p);
        let mut refused = spec(vec![service("a", &[(5, 80), (6, 80)]), service("c", &[(7, 80)])]);
        let _ = st.plan(&mut refused).unwrap();
        let mut again = spec(vec![service("a", &[(1, 80), (5, 80)])]);
        let p = st.plan(&mut again).unwrap();
        st.apply(p);
        assert_eq!(slots(&again), vec![vec![0, 1]]);
    }
}
