//! Incremental compilation: what is reused, what is rebuilt, and that the
//! result is always the snapshot a build from scratch makes.

use super::*;
use proptest::prelude::*;

const fn ip(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

const CLIENT_PORT_IP: u32 = ip(198, 18, 0, 1);
const BACKEND_PORT_IP: u32 = ip(198, 18, 1, 1);
/// Two on-link routers; remote backends (198.19.0.0/16) are behind one.
const ROUTERS: [u32; 2] = [ip(198, 18, 1, 254), ip(198, 18, 1, 253)];

fn port(name: &str, last: u8, addr: u32) -> PortSpec {
    PortSpec {
        name: name.to_owned(),
        mac: EthernetAddress([0x02, 0, 0, 0, 0, last]),
        addresses: vec![Ipv4Cidr { addr, len: 24 }],
        mtu: DEFAULT_MTU,
        vlan: None,
    }
}

/// Service `i`: VIP 198.18.100.i:80/tcp, three backends, on-link when `i`
/// is even, behind the route when odd.
fn service(i: u8) -> ServiceSpec {
    let base = if i.is_multiple_of(2) { ip(198, 18, 1, 10 + 3 * i) } else { ip(198, 19, 0, 10 + 3 * i) };
    ServiceSpec {
        name: format!("s{i}"),
        vip: ip(198, 18, 100, i),
        port: 80,
        protocol: Protocol::Tcp,
        table_size: 251,
        backends: (0..3)
            .map(|j| BackendSpec { addr: base + j, port: 80, weight: 1, stats_slot: u32::from(i) * 3 + j })
            .collect(),
        on_backend_removal: OnBackendRemoval::Rehash,
        mode: ForwardingMode::Nat,
        new_flow_limit: None,
        source_ranges: Vec::new(),
        affinity: Default::default(),
    }
}

fn spec() -> SnapshotSpec {
    SnapshotSpec {
        ports: vec![port("client", 1, CLIENT_PORT_IP), port("backend", 2, BACKEND_PORT_IP)],
        routes: vec![RouteSpec { prefix: Ipv4Cidr { addr: ip(198, 19, 0, 0), len: 16 }, via: ROUTERS[0] }],
        neighbours: vec![],
        services: (1..=4).map(|i| Arc::new(service(i))).collect(),
        source_pools: ["pa", "pb"]
            .iter()
            .enumerate()
            .map(|(i, n)| SourcePoolSpec {
                name: (*n).to_owned(),
                addresses: vec![ip(198, 18, 1, 200 + i as u8)],
                first_port: 1024,
                last_port: 65535,
            })
            .collect(),
    }
}

fn by_name<'a>(s: &'a Snapshot, name: &str) -> &'a Arc<Service> {
    s.services().iter().find(|x| x.name == name).unwrap_or_else(|| panic!("no service {name}"))
}

/// Asserts that `a` and `b` forward alike: every table and every compiled
/// service, field by field (the generations and the version aside).
fn assert_same_forwarding(a: &Snapshot, b: &Snapshot) {
    let ports = |s: &Snapshot| -> Vec<_> {
        s.ports.iter().map(|p| (p.name.clone(), p.mac, p.addresses.clone(), p.mtu)).collect()
    };
    assert_eq!(ports(a), ports(b));
    assert_eq!(a.local, b.local);
    assert_eq!(a.vips, b.vips);
    assert_eq!(a.services, b.services);
    assert_eq!(a.reverse, b.reverse);
    assert_eq!(a.routes.routes(), b.routes.routes());
    assert_eq!(a.next_hops, b.next_hops);
    assert_eq!(a.static_neighbours, b.static_neighbours);
    assert_eq!(a.source_pools, b.source_pools);
    assert_eq!(a.pool_addresses, b.pool_addresses);
    assert_eq!(a.pool_filter, b.pool_filter);
    assert_eq!(a.martians, b.martians);
    assert_eq!(a.martian_filter, b.martian_filter);
    assert_eq!(a.port_macs, b.port_macs);
    assert_eq!(a.service_list.len(), b.service_list.len());
    for (x, y) in a.service_list.iter().zip(&b.service_list) {
        assert_eq!(x.name, y.name);
        assert_eq!((x.vip, x.port, x.protocol), (y.vip, y.port, y.protocol));
        assert_eq!(x.maglev, y.maglev, "service {}: Maglev tables differ", x.name);
        assert_eq!(x.backends, y.backends, "service {}", x.name);
        assert_eq!(x.on_backend_removal, y.on_backend_removal);
        assert_eq!(x.mode, y.mode);
        assert_eq!(x.spec, y.spec);
    }
}

#[test]
fn unchanged_services_are_shared_and_a_changed_one_is_rebuilt() {
    let mut sp = spec();
    let first = Snapshot::build(&sp).unwrap();
    assert_eq!(first.build_stats(), BuildStats { services_reused: 0, tables_reused: 0, tables_built: 4 });
    Arc::make_mut(&mut sp.services[1]).backends[2].weight = 5;
    let second = Snapshot::build_incremental(&sp, Some(&first), 7).unwrap();
    assert_eq!(second.version(), 7);
    assert_eq!(second.build_stats(), BuildStats { services_reused: 3, tables_reused: 0, tables_built: 1 });
    for name in ["s1", "s3", "s4"] {
        assert!(Arc::ptr_eq(by_name(&first, name), by_name(&second, name)), "{name} was not reused");
    }
    assert!(!Arc::ptr_eq(by_name(&first, "s2"), by_name(&second, "s2")));
    assert!(!by_name(&first, "s2").maglev.shares_slots(&by_name(&second, "s2").maglev));
    assert_same_forwarding(&second, &Snapshot::build(&sp).unwrap());
    // Nothing about the workers' caches changed.
    assert_eq!(second.cache_generation(), first.cache_generation());
    assert_ne!(second.generation(), first.generation());
}

#[test]
fn an_identical_specification_reuses_everything() {
    let sp = spec();
    let first = Snapshot::build(&sp).unwrap();
    let second = Snapshot::build_incremental(&sp, Some(&first), 1).unwrap();
    assert_eq!(second.build_stats(), BuildStats { services_reused: 4, tables_reused: 0, tables_built: 0 });
    assert!(first.services().iter().zip(second.services()).all(|(a, b)| Arc::ptr_eq(a, b)));
}

#[test]
fn a_changed_route_rebuilds_the_services_behind_it_around_their_tables() {
    let mut sp = spec();
    let first = Snapshot::build(&sp).unwrap();
    sp.routes[0].via = ROUTERS[1];
    let second = Snapshot::build_incremental(&sp, Some(&first), 2).unwrap();
    // s1 and s3 are behind the route: new next hop, same Maglev table.
    assert_eq!(second.build_stats(), BuildStats { services_reused: 2, tables_reused: 2, tables_built: 0 });
    for name in ["s1", "s3"] {
        let (old, new) = (by_name(&first, name), by_name(&second, name));
        assert!(!Arc::ptr_eq(old, new), "{name} depends on the route");
        assert!(old.maglev.shares_slots(&new.maglev), "{name}'s weights did not change");
        assert!(new.backends.iter().all(|b| b.next_hop.addr == ROUTERS[1]));
    }
    for name in ["s2", "s4"] {
        assert!(Arc::ptr_eq(by_name(&first, name), by_name(&second, name)), "{name} is on-link");
    }
    assert_ne!(second.cache_generation(), first.cache_generation(), "the next hops changed");
    assert_same_forwarding(&second, &Snapshot::build(&sp).unwrap());
}

#[test]
fn a_changed_port_address_rebuilds_the_dsr_services_sourced_from_it() {
    let mut sp = spec();
    Arc::make_mut(&mut sp.services[1]).mode = ForwardingMode::Dsr { tunnel_source: None };
    Arc::make_mut(&mut sp.services[2]).mode =
        ForwardingMode::Dsr { tunnel_source: Some(Ipv4Cidr { addr: ip(198, 18, 3, 0), len: 24 }) };
    let first = Snapshot::build(&sp).unwrap();
    assert_eq!(by_name(&first, "s2").backends[0].tunnel_src, BACKEND_PORT_IP);
    // The backend port gets another address on the same subnet.
    sp.ports[1].addresses[0].addr = ip(198, 18, 1, 2);
    let second = Snapshot::build_incremental(&sp, Some(&first), 2).unwrap();
    let s2 = by_name(&second, "s2");
    assert_eq!(s2.backends[0].tunnel_src, ip(198, 18, 1, 2));
    assert!(by_name(&first, "s2").maglev.shares_slots(&s2.maglev));
    // s3's tunnel source is its own prefix: untouched, like the NAT ones.
    for name in ["s1", "s3", "s4"] {
        assert!(Arc::ptr_eq(by_name(&first, name), by_name(&second, name)), "{name}");
    }
    assert_same_forwarding(&second, &Snapshot::build(&sp).unwrap());
}

#[test]
fn reordered_source_pools_rebuild_the_fullnat_services_that_name_them() {
    let mut sp = spec();
    Arc::make_mut(&mut sp.services[0]).mode = ForwardingMode::FullNat { pool: "pb".to_owned() };
    let first = Snapshot::build(&sp).unwrap();
    assert_eq!(by_name(&first, "s1").mode, Mode::FullNat { pool: 1 });
    sp.source_pools.swap(0, 1);
    let second = Snapshot::build_incremental(&sp, Some(&first), 2).unwrap();
    assert_eq!(by_name(&second, "s1").mode, Mode::FullNat { pool: 0 });
    assert!(!Arc::ptr_eq(by_name(&first, "s1"), by_name(&second, "s1")));
    assert_eq!(second.build_stats(), BuildStats { services_reused: 3, tables_reused: 1, tables_built: 0 });
    assert_ne!(second.cache_generation(), first.cache_generation(), "the pools changed");
    assert_same_forwarding(&second, &Snapshot::build(&sp).unwrap());
}

#[test]
fn a_new_next_hop_earlier_in_the_list_renumbers_the_slots_after_it() {
    let mut sp = spec();
    let first = Snapshot::build(&sp).unwrap();
    // A new on-link backend for s1 (the first service) takes a slot before
    // every backend of s2..s4 that is on-link.
    Arc::make_mut(&mut sp.services[0]).backends.push(BackendSpec {
        addr: ip(198, 18, 1, 99),
        port: 80,
        weight: 1,
        stats_slot: 99,
    });
    let second = Snapshot::build_incremental(&sp, Some(&first), 2).unwrap();
    assert!(Arc::ptr_eq(by_name(&first, "s3"), by_name(&second, "s3")), "s3 is behind the route, slot 0");
    for name in ["s2", "s4"] {
        assert!(!Arc::ptr_eq(by_name(&first, name), by_name(&second, name)), "{name}'s slots moved");
        assert!(by_name(&first, name).maglev.shares_slots(&by_name(&second, name).maglev));
    }
    assert_same_forwarding(&second, &Snapshot::build(&sp).unwrap());
}

#[test]
fn a_backend_with_another_stats_slot_rebuilds_its_service_and_keeps_its_table() {
    let mut sp = spec();
    let first = Snapshot::build(&sp).unwrap();
    Arc::make_mut(&mut sp.services[1]).backends[2].stats_slot = 777;
    let second = Snapshot::build_incremental(&sp, Some(&first), 2).unwrap();
    let (old, new) = (by_name(&first, "s2"), by_name(&second, "s2"));
    assert!(!Arc::ptr_eq(old, new), "the workers must see the new slot");
    assert_eq!(new.backends[2].stats, 777);
    assert!(old.maglev.shares_slots(&new.maglev), "the slot is no Maglev input");
    for name in ["s1", "s3", "s4"] {
        assert!(Arc::ptr_eq(by_name(&first, name), by_name(&second, name)), "{name} did not change");
    }
    assert_same_forwarding(&second, &Snapshot::build(&sp).unwrap());
}

#[test]
fn errors_are_the_same_as_from_scratch() {
    let mut sp = spec();
    let first = Snapshot::build(&sp).unwrap();
    sp.routes.clear();
    let scratch = Snapshot::build(&sp).unwrap_err();
    let incremental = Snapshot::build_incremental(&sp, Some(&first), 2).unwrap_err();
    assert_eq!(incremental, scratch);
    assert!(matches!(incremental, SnapshotError::BackendUnreachable { .. }), "{incremental}");
}

/// What a control plane that knows its change would say: the services of
/// `new` that are new or differ from `old`'s, and those of `old` gone.
fn touched(old: &SnapshotSpec, new: &SnapshotSpec) -> (Vec<String>, Vec<String>) {
    let changed = new.services.iter().filter(|s| !old.services.contains(s)).map(|s| s.name.clone()).collect();
    let removed = old
        .services
        .iter()
        .filter(|o| !new.services.iter().any(|s| s.name == o.name))
        .map(|o| o.name.clone())
        .collect();
    (changed, removed)
}

/// `spec` with the stats slots of every service but `changed` unset: what
/// the control plane hands over when it assigned slots to those only.
fn slots_of_changed_only(spec: &SnapshotSpec, changed: &[String]) -> SnapshotSpec {
    let mut spec = spec.clone();
    for s in spec.services.iter_mut().filter(|s| !changed.contains(&s.name)) {
        for b in &mut Arc::make_mut(s).backends {
            b.stats_slot = crate::stats::NO_SLOT;
        }
    }
    spec
}

#[test]
fn a_weight_change_named_by_the_caller_patches_the_indexes_and_shares_the_rest() {
    let mut sp = spec();
    let first = Snapshot::build(&sp).unwrap();
    // s2 is on-link: its backends are next hops of their own.
    Arc::make_mut(&mut sp.services[1]).backends[2].weight = 5;
    let delta = first.delta(&sp, &["s2".to_owned()], &[]).unwrap();
    assert_eq!(delta.changed().collect::<Vec<_>>(), vec![(1, Some(1))]);
    assert!(!delta.moves());
    let second = Snapshot::build_changed(&slots_of_changed_only(&sp, &["s2".to_owned()]), &first, 3, &delta).unwrap();
    assert_eq!(second.build_stats(), BuildStats { services_reused: 3, tables_reused: 0, tables_built: 1 });
    assert!(Arc::ptr_eq(&first.next_hops, &second.next_hops), "patched, not rebuilt");
    assert!(Arc::ptr_eq(&first.meta.vip_users, &second.meta.vip_users));
    for name in ["s1", "s3", "s4"] {
        assert!(Arc::ptr_eq(by_name(&first, name), by_name(&second, name)), "{name} was not reused");
    }
    assert_eq!(second.cache_generation(), first.cache_generation());
    assert_eq!(second.version(), 3);
    assert_same_forwarding(&second, &Snapshot::build(&sp).unwrap());
    // Without the names, the same by comparing every service.
    assert_eq!(first.diff(&sp), Some(delta));
    let third = Snapshot::build_incremental(&sp, Some(&first), 3).unwrap();
    assert!(Arc::ptr_eq(&first.next_hops, &third.next_hops));
    assert_same_forwarding(&third, &second);
}

#[test]
fn services_created_and_deleted_by_name_move_the_others() {
    let mut sp = spec();
    let first = Snapshot::build(&sp).unwrap();
    // s1 (behind the route) goes; s7 (behind it too) comes between s2 and s3.
    sp.services.remove(0);
    sp.services.insert(1, Arc::new(service(7)));
    let delta = first.delta(&sp, &["s7".to_owned()], &["s1".to_owned()]).unwrap();
    assert!(delta.moves());
    assert_eq!(delta.changed().collect::<Vec<_>>(), vec![(1, None)]);
    assert_eq!(delta.removed().collect::<Vec<_>>(), vec![(0, "s1")]);
    assert_eq!(delta.merge(&["a", "b", "c", "d"], |_| "new"), vec!["b", "new", "c", "d"]);
    let second = Snapshot::build_changed(&sp, &first, 2, &delta).unwrap();
    assert!(Arc::ptr_eq(&first.next_hops, &second.next_hops), "no next hop came or went");
    assert_same_forwarding(&second, &Snapshot::build(&sp).unwrap());
    assert_eq!(second.service_index(service(7).vip, 80, Protocol::Tcp.number()), Some(1));
    assert!(!second.is_vip(service(1).vip) && !second.is_martian_source(service(1).vip));
    // The names are found at their new places by the next change.
    Arc::make_mut(&mut sp.services[3]).backends[0].weight = 0;
    let delta = second.delta(&sp, &["s4".to_owned()], &[]).unwrap();
    assert_eq!(delta.changed().collect::<Vec<_>>(), vec![(3, Some(3))]);
    let third = Snapshot::build_changed(&sp, &second, 3, &delta).unwrap();
    assert_same_forwarding(&third, &Snapshot::build(&sp).unwrap());
    // Names that do not fit the specification give no delta.
    assert_eq!(third.delta(&sp, &["nope".to_owned()], &[]), None);
    assert_eq!(third.delta(&sp, &[], &["s2".to_owned()]), None);
}

#[test]
fn a_delta_that_needs_a_new_next_hop_compiles_everything_the_same() {
    let mut sp = spec();
    let first = Snapshot::build(&sp).unwrap();
    Arc::make_mut(&mut sp.services[0]).backends.push(BackendSpec {
        addr: ip(198, 18, 1, 99),
        port: 80,
        weight: 1,
        stats_slot: 99,
    });
    let delta = first.delta(&sp, &["s1".to_owned()], &[]).unwrap();
    let second = Snapshot::build_changed(&slots_of_changed_only(&sp, &["s1".to_owned()]), &first, 2, &delta).unwrap();
    assert!(!Arc::ptr_eq(&first.next_hops, &second.next_hops));
    assert_same_forwarding(&second, &Snapshot::build(&sp).unwrap());
    // A conflict with a service the delta does not name is found too.
    let mut bad = sp.clone();
    Arc::make_mut(&mut bad.services[2]).vip = bad.services[3].vip;
    let delta = second.delta(&bad, &["s3".to_owned()], &[]).unwrap();
    assert_eq!(Snapshot::build_changed(&bad, &second, 3, &delta).unwrap_err(), Snapshot::build(&bad).unwrap_err());
}

/// One edit of the specification; the numbers pick what it touches.
#[derive(Clone, Debug)]
enum Edit {
    Weight(u8, u8, u8),
    AddBackend(u8, u8),
    RemoveBackend(u8, u8),
    TableSize(u8),
    Mode(u8, u8),
    Removal(u8),
    AddService(u8),
    RemoveService(u8),
    Route(u8),
    DropRoute,
    PortAddress(u8),
    SwapPools,
    Neighbour(u8),
    /// Moves a service to another VIP (one that others may use), on a
    /// port of its own.
    Vip(u8, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<u8>(), any::<u8>(), 0u8..4).prop_map(|(s, b, w)| Edit::Weight(s, b, w)),
        (any::<u8>(), any::<u8>()).prop_map(|(s, a)| Edit::AddBackend(s, a)),
        (any::<u8>(), any::<u8>()).prop_map(|(s, b)| Edit::RemoveBackend(s, b)),
        any::<u8>().prop_map(Edit::TableSize),
        (any::<u8>(), 0u8..5).prop_map(|(s, m)| Edit::Mode(s, m)),
        any::<u8>().prop_map(Edit::Removal),
        (1u8..12).prop_map(Edit::AddService),
        any::<u8>().prop_map(Edit::RemoveService),
        (0u8..2).prop_map(Edit::Route),
        Just(Edit::DropRoute),
        (1u8..4).prop_map(Edit::PortAddress),
        Just(Edit::SwapPools),
        (0u8..3).prop_map(Edit::Neighbour),
        (any::<u8>(), 1u8..5).prop_map(|(s, v)| Edit::Vip(s, v)),
    ]
}

fn apply(sp: &mut SnapshotSpec, e: &Edit) {
    let n = sp.services.len();
    let pick = |i: u8| if n == 0 { None } else { Some(usize::from(i) % n) };
    match *e {
        Edit::Weight(s, b, w) => {
            if let Some(s) = pick(s) {
                let bs = &mut Arc::make_mut(&mut sp.services[s]).backends;
                if !bs.is_empty() {
                    let l = bs.len();
                    bs[usize::from(b) % l].weight = u32::from(w);
                }
            }
        }
        Edit::AddBackend(s, a) => {
            if let Some(s) = pick(s) {
                let addr = if a.is_multiple_of(2) { ip(198, 18, 1, 100 + a % 50) } else { ip(198, 19, 1, a) };
                let svc = Arc::make_mut(&mut sp.services[s]);
                if !svc.backends.iter().any(|b| b.addr == addr) {
                    svc.backends.push(BackendSpec { addr, port: 80, weight: 1, stats_slot: 1000 + u32::from(a) });
                }
            }
        }
        Edit::RemoveBackend(s, b) => {
            if let Some(s) = pick(s) {
                let bs = &mut Arc::make_mut(&mut sp.services[s]).backends;
                if !bs.is_empty() {
                    let l = bs.len();
                    bs.remove(usize::from(b) % l);
                }
            }
        }
        Edit::TableSize(s) => {
            if let Some(s) = pick(s) {
                let t = &mut Arc::make_mut(&mut sp.services[s]).table_size;
                *t = if *t == 251 { 509 } else { 251 };
            }
        }
        Edit::Mode(s, m) => {
            if let Some(s) = pick(s) {
                Arc::make_mut(&mut sp.services[s]).mode = match m {
                    0 => ForwardingMode::Nat,
                    1 => ForwardingMode::FullNat { pool: "pa".to_owned() },
                    2 => ForwardingMode::FullNat { pool: "pb".to_owned() },
                    3 => ForwardingMode::Dsr { tunnel_source: None },
                    _ => ForwardingMode::Dsr { tunnel_source: Some(Ipv4Cidr { addr: ip(198, 18, 3, 0), len: 24 }) },
                };
            }
        }
        Edit::Removal(s) => {
            if let Some(s) = pick(s) {
                let r = &mut Arc::make_mut(&mut sp.services[s]).on_backend_removal;
                *r = if *r == OnBackendRemoval::Rehash { OnBackendRemoval::Reset } else { OnBackendRemoval::Rehash };
            }
        }
        Edit::AddService(i) => {
            if !sp.services.iter().any(|s| s.name == format!("s{i}")) {
                // Inserted in the middle, as a new name sorts among others.
                let at = usize::from(i) % (n + 1);
                sp.services.insert(at, Arc::new(service(i)));
            }
        }
        Edit::RemoveService(s) => {
            if let Some(s) = pick(s) {
                sp.services.remove(s);
            }
        }
        Edit::Route(r) => {
            let route =
                RouteSpec { prefix: Ipv4Cidr { addr: ip(198, 19, 0, 0), len: 16 }, via: ROUTERS[usize::from(r)] };
            sp.routes = vec![route];
        }
        Edit::DropRoute => sp.routes.clear(),
        Edit::PortAddress(last) => sp.ports[1].addresses[0].addr = ip(198, 18, 1, last),
        Edit::SwapPools => sp.source_pools.swap(0, 1),
        Edit::Neighbour(k) => {
            sp.neighbours = (0..k)
                .map(|i| NeighbourSpec {
                    addr: ROUTERS[usize::from(i) % 2],
                    mac: EthernetAddress([2, 0xee, 0, 0, 0, i]),
                })
                .collect();
        }
        Edit::Vip(s, v) => {
            if let Some(s) = pick(s) {
                let svc = Arc::make_mut(&mut sp.services[s]);
                svc.vip = ip(198, 18, 100, v);
                svc.port = 1000 + s as u16;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// After any sequence of edits, each compiled incrementally from the
    /// last snapshot that built (as the daemon does: a refused change keeps
    /// the one in force), the result equals a build from scratch, and so do
    /// the errors.
    #[test]
    fn incremental_equals_from_scratch(
        edits in proptest::collection::vec(edit(), 1..24),
        chain_named in proptest::collection::vec(any::<bool>(), 1..8),
    ) {
        let mut sp = spec();
        let mut current = Snapshot::build(&sp).unwrap();
        for (k, e) in edits.iter().enumerate() {
            let mut next = sp.clone();
            apply(&mut next, e);
            let scratch = Snapshot::build(&next);
            // As a control plane that knows which services it touched
            // compiles it, with slots assigned to those only; then once
            // more naming one service too many.
            let (changed, removed) = touched(&sp, &next);
            let delta = current.delta(&next, &changed, &removed);
            prop_assert!(delta.is_some(), "the names fit");
            let named = Snapshot::build_changed(&slots_of_changed_only(&next, &changed), &current, 1, delta.as_ref().unwrap());
            let mut more = changed.clone();
            more.extend(next.services.first().map(|s| s.name.clone()));
            let delta = current.delta(&next, &more, &removed).unwrap();
            let more_named = Snapshot::build_changed(&next, &current, 1, &delta);
            for other in [&named, &more_named] {
                match (&scratch, other) {
                    (Ok(s), Ok(i)) => assert_same_forwarding(i, s),
                    (Err(s), Err(i)) => prop_assert_eq!(i, s),
                    (s, i) => prop_assert!(false, "from scratch {:?}, named {:?}", s.as_ref().map(|_| ()), i.as_ref().map(|_| ())),
                }
            }
            // Half the time the named build is the one the next change
            // is compiled against, as in the daemon, where patched
            // snapshots follow each other.
            if chain_named[k % chain_named.len()] && let Ok(n) = named {
                current = n;
                sp = next;
                continue;
            }
            let incremental = Snapshot::build_incremental(&next, Some(&current), 1);
            match (scratch, incremental) {
                (Ok(s), Ok(i)) => {
                    assert_same_forwarding(&i, &s);
                    let st = i.build_stats();
                    prop_assert_eq!(st.services_reused + st.tables_reused + st.tables_built, next.services.len());
                    // Every service that came out the same is the
                    // previous snapshot's, shared.
                    for new in i.services() {
                        let old = current.service(new.vip, new.port, new.protocol.number());
                        let same = old.is_some_and(|o| o.spec == new.spec && o.backends == new.backends && o.mode == new.mode);
                        prop_assert_eq!(same, old.is_some_and(|o| std::ptr::eq(o, &**new)), "service {}", new.name);
                    }
                    if i.next_hops == current.next_hops
                        && i.static_neighbours == current.static_neighbours
                        && i.source_pools == current.source_pools
                    {
                        prop_assert_eq!(i.cache_generation(), current.cache_generation());
                    } else {
                        prop_assert_ne!(i.cache_generation(), current.cache_generation());
                    }
                    current = i;
                    sp = next;
                }
                (Err(s), Err(i)) => prop_assert_eq!(i, s),
                (s, i) => prop_assert!(false, "from scratch {:?}, incremental {:?}", s.map(|_| ()), i.map(|_| ())),
            }
        }
    }
}

#[test]
fn a_ports_mac_word_is_the_masked_first_eight_bytes_of_a_frame_to_it() {
    let snap = Snapshot::build(&spec()).unwrap();
    for (i, p) in snap.ports().iter().enumerate() {
        let mut frame = [0xa5u8; 14];
        frame[..6].copy_from_slice(&p.mac.0);
        let head = u64::from_le_bytes(frame[..8].try_into().unwrap());
        assert_eq!(snap.port_mac_word(i as u16), Some(head & MAC_WORD_MASK), "port {}", p.name);
        assert_eq!(mac_word(p.mac.0) & 1, u64::from(p.mac.0[0] & 1), "the I/G bit is the word's lowest");
    }
    assert_eq!(snap.port_mac_word(snap.ports().len() as u16), None);
    assert_eq!(mac_word([0xff; 6]), MAC_WORD_MASK);
}

#[test]
fn a_changed_new_flow_limit_recompiles_the_service_around_its_table() {
    use crate::admission::{NewFlowLimit, SourceLimit};
    let mut sp = spec();
    let first = Snapshot::build(&sp).unwrap();
    assert_eq!(by_name(&first, "s2").new_flow_limit, None);
    let limit = NewFlowLimit { per_second: 100, burst: 200, prefix_len: 24 };
    Arc::make_mut(&mut sp.services[1]).new_flow_limit = Some(limit);
    let second = Snapshot::build_incremental(&sp, Some(&first), 2).unwrap();
    assert_eq!(second.build_stats(), BuildStats { services_reused: 3, tables_reused: 1, tables_built: 0 });
    let s2 = by_name(&second, "s2");
    assert_eq!(s2.new_flow_limit, Some(SourceLimit::new(&limit)));
    assert_eq!(s2.new_flow_limit.unwrap().mask, 0xffff_ff00);
    assert_eq!(s2.new_flow_limit.unwrap().interval_ns, 10_000_000);
    assert_eq!(s2.spec().new_flow_limit, Some(limit));
    // Removing it is a change too.
    Arc::make_mut(&mut sp.services[1]).new_flow_limit = None;
    let third = Snapshot::build_incremental(&sp, Some(&second), 3).unwrap();
    assert_eq!(by_name(&third, "s2").new_flow_limit, None);
    assert!(!Arc::ptr_eq(by_name(&second, "s2"), by_name(&third, "s2")));
}

#[test]
fn a_new_flow_limit_out_of_bounds_is_refused() {
    use crate::admission::NewFlowLimit;
    let mut sp = spec();
    Arc::make_mut(&mut sp.services[2]).new_flow_limit = Some(NewFlowLimit { per_second: 0, burst: 1, prefix_len: 32 });
    let e = Snapshot::build(&sp).unwrap_err();
    assert_eq!(e.to_string(), "service \"s3\": new_flow_limit.per_second: 0 is not from 1 to 1000000");
    Arc::make_mut(&mut sp.services[2]).new_flow_limit = Some(NewFlowLimit { per_second: 1, burst: 1, prefix_len: 33 });
    let e = Snapshot::build(&sp).unwrap_err();
    assert_eq!(e.to_string(), "service \"s3\": new_flow_limit.prefix_len: 33 is not a prefix length from 0 to 32");
}

/// `spec()` with `n` services of three backends each (behind the route),
/// named `m0000` and on.
fn many_services(n: u32) -> SnapshotSpec {
    let mut sp = spec();
    sp.services = (0..n)
        .map(|i| {
            Arc::new(ServiceSpec {
                name: format!("m{i:04}"),
                vip: ip(198, 18, 100, 0) + i,
                backends: (0..3)
                    .map(|j| BackendSpec {
                        addr: ip(198, 19, 1, 0) + 4 * i + j,
                        port: 80,
                        weight: 1 + j,
                        stats_slot: 3 * i + j,
                    })
                    .collect(),
                // The rest as every test service: port 80/tcp, 251 slots,
                // nat, rehash, no options.
                ..service(1)
            })
        })
        .collect();
    sp
}

/// A build that needs at least `PARALLEL_TABLES` Maglev tables builds them
/// on rayon's pool: each is the one built alone, incremental builds reuse
/// what they reused before, and of two tables that cannot be built the
/// error names the first, as a build in order does.
#[test]
fn many_tables_built_in_parallel_are_those_built_one_by_one() {
    let n = 3 * PARALLEL_TABLES as u32;
    let mut sp = many_services(n);
    let first = Snapshot::build(&sp).unwrap();
    assert_eq!(first.build_stats().tables_built, n as usize);
    for s in &sp.services {
        assert_eq!(by_name(&first, &s.name).maglev, build_maglev(s).unwrap(), "service {}", s.name);
    }
    // More than a quarter of them changed: compiled whole, the others'
    // tables (and services) reused.
    let changed = 2 * PARALLEL_TABLES;
    for s in &mut sp.services[..changed] {
        Arc::make_mut(s).backends[0].weight = 5;
    }
    let second = Snapshot::build_incremental(&sp, Some(&first), 2).unwrap();
    assert_same_forwarding(&second, &Snapshot::build(&sp).unwrap());
    let st = second.build_stats();
    assert_eq!((st.tables_built, st.services_reused), (changed, n as usize - changed));
    // Fewer than PARALLEL_TABLES to build: in order, the same result.
    for s in &mut sp.services[..PARALLEL_TABLES / 2] {
        Arc::make_mut(s).backends[1].weight = 7;
    }
    let third = Snapshot::build_incremental(&sp, Some(&second), 3).unwrap();
    assert_same_forwarding(&third, &Snapshot::build(&sp).unwrap());
    // Two tables that cannot be built (251 -> 250 is no prime): the
    // first is reported, whichever thread built it.
    let mut bad = many_services(n);
    for k in [150, 70] {
        Arc::make_mut(&mut bad.services[k]).table_size = 250;
    }
    for _ in 0..8 {
        match Snapshot::build(&bad) {
            Err(SnapshotError::Maglev { service, .. }) => assert_eq!(service, "m0070"),
            other => panic!("expected m0070's table error, got {:?}", other.map(|_| ())),
        }
    }
}

#[test]
fn changed_sources_or_affinity_recompile_the_service_around_its_table() {
    let mut sp = spec();
    let first = Snapshot::build(&sp).unwrap();
    assert!(by_name(&first, "s2").source_ranges.is_empty());
    assert_eq!(by_name(&first, "s2").affinity, Affinity::None);
    let s = Arc::make_mut(&mut sp.services[1]);
    s.source_ranges = vec![Ipv4Cidr { addr: ip(203, 0, 113, 77), len: 24 }];
    s.affinity = Affinity::ClientIp;
    let second = Snapshot::build_incremental(&sp, Some(&first), 2).unwrap();
    assert_eq!(second.build_stats(), BuildStats { services_reused: 3, tables_reused: 1, tables_built: 0 });
    let s2 = by_name(&second, "s2");
    assert_eq!(s2.source_ranges.intervals(), [(ip(203, 0, 113, 0), ip(203, 0, 113, 255))]);
    assert_eq!(s2.affinity, Affinity::ClientIp);
    // Back to none: a change too.
    let s = Arc::make_mut(&mut sp.services[1]);
    s.source_ranges.clear();
    let third = Snapshot::build_incremental(&sp, Some(&second), 3).unwrap();
    assert!(by_name(&third, "s2").source_ranges.is_empty());
    assert!(!Arc::ptr_eq(by_name(&second, "s2"), by_name(&third, "s2")));
}

#[test]
fn a_source_list_out_of_bounds_is_refused() {
    use crate::sources::MAX_SOURCE_RANGES;
    let mut sp = spec();
    Arc::make_mut(&mut sp.services[2]).source_ranges = vec![Ipv4Cidr { addr: 0, len: 8 }; MAX_SOURCE_RANGES + 1];
    let e = Snapshot::build(&sp).unwrap_err();
    assert_eq!(e.to_string(), "service \"s3\": source_ranges: 257 prefixes; at most 256");
    Arc::make_mut(&mut sp.services[2]).source_ranges = vec![Ipv4Cidr { addr: 0, len: 33 }];
    let e = Snapshot::build(&sp).unwrap_err();
    assert_eq!(e.to_string(), "service \"s3\": source_ranges: prefix length 33 is not from 0 to 32");
}
