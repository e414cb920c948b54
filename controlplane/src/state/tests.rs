use super::*;
use crate::checks::{check_name, check_owner};
use std::path::Path;

const CONFIG: &str = r#"
[eal]
lcores = "0,1"
hugepages = false

[[ports]]
name = "a"
device = "net_null0"
addresses = ["198.18.0.1/24"]

[[ports]]
name = "b"
device = "net_null1"
addresses = ["198.18.1.1/24"]

[[routes]]
prefix = "198.19.0.0/16"
via = "198.18.1.254"

[[source_pools]]
name = "static-pool"
addresses = ["198.18.1.100"]

[[services]]
name = "web"
vip = "198.18.100.1"
port = 80
protocol = "tcp"
backends = [ { address = "198.18.1.11", port = 8080 } ]
"#;

fn config() -> Config {
    Config::parse(Path::new("/etc/vipgate/vipgated.toml"), CONFIG).unwrap()
}

fn macs() -> Vec<EthernetAddress> {
    vec![EthernetAddress([2, 0, 0, 0, 0, 1]), EthernetAddress([2, 0, 0, 0, 0, 2])]
}

fn backend(last: u8, port: u16, weight: u32) -> BackendState {
    BackendState { address: Ipv4Addr::new(198, 18, 1, last), port, weight, admin_state: AdminState::Enabled }
}

fn service(name: &str, vip_last: u8) -> ServiceState {
    ServiceState {
        name: name.to_owned(),
        vip: Ipv4Addr::new(198, 18, 100, vip_last),
        port: 80,
        protocol: ProtocolState::Tcp,
        mode: ModeState::Nat,
        table_size: 251,
        on_backend_removal: RemovalState::Rehash,
        backends: vec![backend(20, 8080, 1), backend(21, 8080, 2)],
        health_check: None,
        new_flow_limit: None,
        source_ranges: Vec::new(),
        affinity: Default::default(),
        owner: DEFAULT_OWNER.to_owned(),
    }
}

fn pool(name: &str, last: u8) -> PoolState {
    PoolState {
        name: name.to_owned(),
        addresses: vec![Ipv4Addr::new(198, 18, 1, last)],
        first_port: 1024,
        last_port: 65535,
        owner: DEFAULT_OWNER.to_owned(),
    }
}

fn with(services: Vec<ServiceState>, pools: Vec<PoolState>) -> DesiredState {
    DesiredState {
        version: 1,
        services: services.into_iter().map(|s| (s.name.clone(), s)).collect(),
        source_pools: pools.into_iter().map(|p| (p.name.clone(), p)).collect(),
        generations: BTreeMap::new(),
    }
}

#[test]
fn a_valid_dynamic_state_compiles_with_the_static_one() {
    let mut api = service("api", 2);
    api.backends[0].admin_state = AdminState::Draining;
    api.backends[1].admin_state = AdminState::Disabled;
    let mut nat2 = service("full", 3);
    nat2.mode = ModeState::Fullnat { source_pool: "dyn-pool".to_owned() };
    nat2.backends = vec![backend(30, 8080, 1)];
    let state = with(vec![api, nat2], vec![pool("dyn-pool", 101)]);
    let spec = validate(&config(), &macs(), &state).unwrap();
    let names: Vec<_> = spec.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web", "api", "full"]);
    let api = &spec.services[1];
    // Draining: weight 0; disabled: left out.
    assert_eq!(api.backends.len(), 1);
    assert_eq!(api.backends[0].weight, 0);
    assert_eq!(spec.source_pools.len(), 2);
    let snapshot = compile(&config(), &macs(), &state).unwrap();
    assert_eq!(snapshot.services().len(), 3);
}

#[test]
fn each_invalid_state_is_refused_naming_the_field() {
    type Case = (&'static str, fn(&mut DesiredState), &'static str);
    let cases: &[Case] = &[
        (
            "weight",
            |s| s.services.get_mut("api").unwrap().backends[1].weight = 70_000,
            "services[\"api\"].backends[1].weight: 70000 is not from 0 to 65535",
        ),
        (
            "table size",
            |s| s.services.get_mut("api").unwrap().table_size = 1000,
            "services[\"api\"].table_size: 1000 is not a prime from 3 to 16777213",
        ),
        (
            "unknown pool",
            |s| s.services.get_mut("api").unwrap().mode = ModeState::Fullnat { source_pool: "x".to_owned() },
            "services[\"api\"].source_pool: no source pool is named \"x\"",
        ),
        (
            "vip against static",
            |s| s.services.get_mut("api").unwrap().vip = Ipv4Addr::new(198, 18, 100, 1),
            "services[\"api\"].port: 198.18.100.1:80/tcp is already served by static service \"web\" (defined in /etc/vipgate/vipgated.toml)",
        ),
        (
            "vip against dynamic",
            |s| {
                let mut o = service("other", 2);
                o.backends = vec![backend(40, 80, 1)];
                s.services.insert("other".to_owned(), o);
            },
            "198.18.100.2:80/tcp is already served by service",
        ),
        (
            "static name",
            |s| {
                let mut o = service("web", 9);
                o.backends.clear();
                s.services.insert("web".to_owned(), o);
            },
            "services[\"web\"].name: a static service named \"web\" is defined in /etc/vipgate/vipgated.toml",
        ),
        (
            "dsr port",
            |s| s.services.get_mut("api").unwrap().mode = ModeState::Dsr { tunnel_source: None },
            "services[\"api\"].backends[0].port: 8080: direct server return cannot change the port",
        ),
        (
            "backend twice",
            |s| {
                let b = s.services["api"].backends[0].clone();
                s.services.get_mut("api").unwrap().backends.push(b);
            },
            "services[\"api\"].backends[2].address: 198.18.1.20:8080 is listed twice",
        ),
        (
            "unroutable backend",
            |s| s.services.get_mut("api").unwrap().backends[0].address = Ipv4Addr::new(10, 1, 2, 3),
            "services[\"api\"].backends[0].address: no route to 10.1.2.3",
        ),
        (
            "backend is a VIP",
            |s| s.services.get_mut("api").unwrap().backends[0].address = Ipv4Addr::new(198, 18, 100, 1),
            "is an address of the gateway itself",
        ),
        (
            "shared nat backend",
            |s| s.services.get_mut("api").unwrap().backends[0] = backend(11, 8080, 1),
            "services[\"api\"].backends[0].address: 198.18.1.11:8080/tcp already serves static service \"web\"",
        ),
        (
            "pool address is a port's",
            |s| {
                s.source_pools.insert(
                    "p".to_owned(),
                    PoolState { addresses: vec![Ipv4Addr::new(198, 18, 1, 1)], ..pool("p", 1) },
                );
            },
            "source_pools[\"p\"].addresses[0]: 198.18.1.1 is an address of port \"b\"",
        ),
        (
            "pool address in static pool",
            |s| {
                s.source_pools.insert("p".to_owned(), pool("p", 100));
            },
            "source_pools[\"p\"].addresses[0]: 198.18.1.100 is already in static source pool \"static-pool\"",
        ),
        (
            "bad name",
            |s| {
                let mut o = service("a b", 7);
                o.backends.clear();
                s.services.insert("a b".to_owned(), o);
            },
            "services[\"a b\"].name: \"a b\": use letters, digits",
        ),
        (
            "vip is a port address",
            |s| s.services.get_mut("api").unwrap().vip = Ipv4Addr::new(198, 18, 0, 1),
            "services[\"api\"].vip: 198.18.0.1 is an address of port \"a\"",
        ),
        (
            "vip is a static backend",
            |s| s.services.get_mut("api").unwrap().vip = Ipv4Addr::new(198, 18, 1, 11),
            "services[\"api\"].vip: 198.18.1.11 is a backend of static service \"web\"",
        ),
        (
            "tunnel source",
            |s| {
                let a = s.services.get_mut("api").unwrap();
                a.port = 8080;
                a.mode = ModeState::Dsr { tunnel_source: Some("198.18.3.0/8".to_owned()) };
            },
            "services[\"api\"].tunnel_source: prefix length \"8\" is not a number from 16 to 32",
        ),
    ];
    for (what, change, want) in cases {
        let mut state = with(vec![service("api", 2)], vec![]);
        change(&mut state);
        let e = compile(&config(), &macs(), &state).err().unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{what}: {e}");
        assert!(e.message.contains(want), "{what}: wanted {want:?} in {:?}", e.message);
    }
}

#[test]
fn mutations_refuse_static_objects_and_missing_ones() {
    let c = config();
    let mut s = with(vec![service("api", 2)], vec![pool("dyn-pool", 101)]);
    let e = ops::delete_service(&c, &mut s, "web").unwrap_err();
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
    assert_eq!(e.message, "service \"web\" is defined in /etc/vipgate/vipgated.toml; change it there and reload");
    assert_eq!(ops::delete_service(&c, &mut s, "nope").unwrap_err().kind, ErrorKind::NotFound);
    assert_eq!(ops::create_service(&c, &mut s, service("api", 3)).unwrap_err().kind, ErrorKind::AlreadyExists);
    assert_eq!(ops::create_service(&c, &mut s, service("web", 3)).unwrap_err().kind, ErrorKind::AlreadyExists);
    assert_eq!(ops::delete_pool(&c, &mut s, "static-pool").unwrap_err().kind, ErrorKind::FailedPrecondition);
    let e = ops::remove_backend(&c, &mut s, "api", Ipv4Addr::new(198, 18, 1, 99), 80).unwrap_err();
    assert_eq!((e.kind, e.message.as_str()), (ErrorKind::NotFound, "service \"api\" has no backend 198.18.1.99:80"));
    s.services.get_mut("api").unwrap().mode = ModeState::Fullnat { source_pool: "dyn-pool".to_owned() };
    let e = ops::delete_pool(&c, &mut s, "dyn-pool").unwrap_err();
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorKind::FailedPrecondition, "source pool \"dyn-pool\" is used by service \"api\"")
    );
    let e = ops::apply(&c, &mut s, 0, vec![], vec![]).unwrap_err();
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorKind::FailedPrecondition, "expected_version 0 is not the current version 1")
    );
    let before = s.clone();
    assert_eq!(
        ops::apply(&c, &mut s, 1, vec![service("web", 5)], vec![]).unwrap_err().kind,
        ErrorKind::FailedPrecondition
    );
    assert_eq!(s, before, "a refused mutation changed the state");
}

#[test]
fn backend_updates_and_the_change_they_report() {
    let c = config();
    let mut s = with(vec![service("api", 2)], vec![]);
    let ch = ops::update_backend(
        &c,
        &mut s,
        "api",
        Ipv4Addr::new(198, 18, 1, 20),
        8080,
        Some(9),
        Some(AdminState::Draining),
    )
    .unwrap();
    assert_eq!(ch.services_changed, ["api"]);
    assert_eq!(
        s.services["api"].backends[0],
        BackendState { weight: 9, admin_state: AdminState::Draining, ..backend(20, 8080, 9) }
    );
    ops::add_backend(&c, &mut s, "api", backend(22, 8080, 1)).unwrap();
    assert_eq!(ops::add_backend(&c, &mut s, "api", backend(22, 8080, 1)).unwrap_err().kind, ErrorKind::AlreadyExists);
    ops::remove_backend(&c, &mut s, "api", Ipv4Addr::new(198, 18, 1, 21), 8080).unwrap();
    assert_eq!(s.services["api"].backends.len(), 2);
    let old = s.clone();
    let ch = ops::apply(&c, &mut s, 1, vec![service("new", 4)], vec![pool("p", 101)]).unwrap();
    assert_eq!(ch.services_changed, ["new"]);
    assert_eq!(ch.services_deleted, ["api"]);
    assert_eq!(ch.pools_changed, ["p"]);
    assert_eq!(Change::between("x", &old, &old).services_changed.len(), 0);
}

#[test]
fn parsers_name_ipv6_and_ranges() {
    assert_eq!(parse_ipv4("2001:db8::1").unwrap_err(), "\"2001:db8::1\" is an IPv6 address; IPv6 is not supported");
    assert_eq!(parse_ipv4("nope").unwrap_err(), "\"nope\" is not an IPv4 address");
    assert_eq!(parse_port(70_000).unwrap_err(), "70000 is not a port number from 1 to 65535");
    assert_eq!(parse_table_size(0).unwrap(), DEFAULT_TABLE_SIZE);
    assert_eq!(parse_weight(None).unwrap(), 1);
    assert!(parse_weight(Some(65_536)).is_err());
}

#[test]
fn unhealthy_backends_compile_with_no_slots_and_stay_in_their_service() {
    use crate::health::TargetKey;
    let state = with(vec![service("api", 2)], vec![]);
    let key = |service: &str, last: u8| TargetKey {
        service: service.to_owned(),
        address: Ipv4Addr::new(198, 18, 1, last),
        port: 8080,
    };
    // The static web's only backend and the dynamic api's first one.
    let down = HashSet::from([key("web", 11), key("api", 20), key("nosuch", 20)]);
    let snapshot = compile_with_health(&config(), &macs(), &state, &down).unwrap();
    let slots = |name: &str| {
        let s = snapshot.services().iter().find(|s| s.name == name).unwrap();
        (s.backends.len(), s.maglev.slot_counts())
    };
    let (n, web) = slots("web");
    assert_eq!((n, web), (1, vec![0]), "kept, with no slot: its flows continue, new ones are dropped");
    let (n, api) = slots("api");
    assert_eq!(n, 2);
    assert_eq!((api[0], api[1]), (0, 251), "the healthy backend takes every slot");
    // With nothing down, compile_with_health is compile.
    let all = compile_with_health(&config(), &macs(), &state, &HashSet::new()).unwrap();
    let api = all.services().iter().find(|s| s.name == "api").unwrap().maglev.slot_counts();
    assert!(api[0] > 0 && api[1] > 0, "{api:?}");
}

/// A mutation as the daemon applies it: the change, then the objects it
/// touched validated against the indexes of the state before it.
fn mutate(
    state: &mut DesiredState,
    op: impl FnOnce(&Config, &mut DesiredState) -> Result<Change, StateError>,
) -> Result<(), StateError> {
    run(state, op).map(|_| ())
}

#[test]
fn a_conflict_is_named_at_the_service_in_the_request_whatever_the_names_order() {
    let existing = |s: &mut DesiredState| {
        s.services.insert("zz-existing".to_owned(), ServiceState { name: "zz-existing".to_owned(), ..service("x", 2) });
    };
    let mut state = with(vec![], vec![]);
    existing(&mut state);
    // The same VIP:port/protocol.
    let new = ServiceState { name: "aa-new".to_owned(), backends: vec![backend(30, 8080, 1)], ..service("x", 2) };
    let e = mutate(&mut state, |c, s| ops::create_service(c, s, new.clone())).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert_eq!(
        e.message,
        "services[\"aa-new\"].port: 198.18.100.2:80/tcp is already served by service \"zz-existing\""
    );
    let e = mutate(&mut state, |c, s| {
        ops::create_service(c, s, ServiceState { vip: Ipv4Addr::new(198, 18, 100, 9), ..new.clone() })?;
        ops::update_service(c, s, new.clone())
    })
    .unwrap_err();
    assert!(e.message.starts_with("services[\"aa-new\"].port: "), "{e}");
    // A nat backend of the other service.
    let shared = ServiceState { vip: Ipv4Addr::new(198, 18, 100, 3), ..service("aa-new", 3) };
    let e = mutate(&mut state, |c, s| ops::create_service(c, s, shared.clone())).unwrap_err();
    assert_eq!(
        e.message,
        "services[\"aa-new\"].backends[0].address: 198.18.1.20:8080/tcp already serves service \"zz-existing\"; replies could not be translated back to one VIP"
    );
    // Added one at a time, or enabled after being disabled.
    let mine = ServiceState { backends: vec![backend(30, 8080, 1)], ..shared.clone() };
    mutate(&mut state, |c, s| ops::create_service(c, s, mine.clone())).unwrap();
    let e = mutate(&mut state, |c, s| ops::add_backend(c, s, "aa-new", backend(21, 8080, 1))).unwrap_err();
    assert!(
        e.message.starts_with(
            "services[\"aa-new\"].backends[1].address: 198.18.1.21:8080/tcp already serves service \"zz-existing\""
        ),
        "{e}"
    );
    let off = BackendState { admin_state: AdminState::Disabled, ..backend(21, 8080, 1) };
    mutate(&mut state, |c, s| ops::add_backend(c, s, "aa-new", off.clone())).unwrap();
    let e = mutate(&mut state, |c, s| {
        ops::update_backend(c, s, "aa-new", Ipv4Addr::new(198, 18, 1, 21), 8080, None, Some(AdminState::Enabled))
    })
    .unwrap_err();
    assert!(
        e.message.starts_with(
            "services[\"aa-new\"].backends[1].address: 198.18.1.21:8080/tcp already serves service \"zz-existing\""
        ),
        "{e}"
    );
    // Against a static service, the same.
    let e = mutate(&mut state, |c, s| ops::add_backend(c, s, "aa-new", backend(11, 8080, 1))).unwrap_err();
    assert!(
        e.message.starts_with(
            "services[\"aa-new\"].backends[2].address: 198.18.1.11:8080/tcp already serves static service \"web\""
        ),
        "{e}"
    );
}

#[test]
fn names_dot_dotdot_and_control_characters_are_refused() {
    for bad in [".", "..", "a\0b", "a\nb", "tab\there", "wéb 😀", "a\u{7f}"] {
        assert!(check_name(bad).is_err(), "{bad:?} accepted");
    }
    assert_eq!(check_name(".").unwrap_err(), "\".\" is not a usable name");
    assert_eq!(check_name("..").unwrap_err(), "\"..\" is not a usable name");
    for good in ["web", "a.b", "...", "web-1_x", ".hidden"] {
        check_name(good).unwrap();
    }
}

#[test]
fn at_most_65535_backends_per_service_in_one_check() {
    assert_eq!(MAX_BACKENDS, 65_535);
    assert_eq!(check_backend_count(65_535), Ok(()));
    assert_eq!(check_backend_count(65_536).unwrap_err(), "65536 backends; at most 65535 per service");
    let mut big = service("api", 2);
    big.table_size = 655_373;
    big.backends = (0..65_536u32)
        .map(|i| BackendState {
            address: Ipv4Addr::new(198, 19, (i / 500) as u8, (1 + i / 2 % 250) as u8),
            port: 80 + (i % 2) as u16,
            weight: 1,
            admin_state: AdminState::Enabled,
        })
        .collect();
    let e = validate(&config(), &macs(), &with(vec![big.clone()], vec![])).unwrap_err();
    assert_eq!(e.message, "services[\"api\"].backends: 65536 backends; at most 65535 per service");
    let last = big.backends.pop().unwrap();
    let mut state = with(vec![big], vec![]);
    validate(&config(), &macs(), &state).unwrap();
    let e = ops::add_backend(&config(), &mut state, "api", last).unwrap_err();
    assert_eq!(e.message, "services[\"api\"].backends: 65536 backends; at most 65535 per service");
}

#[test]
fn a_vip_or_backend_on_a_port_subnets_network_or_broadcast_address_is_refused() {
    type Case = (fn(&mut ServiceState), &'static str);
    let cases: &[Case] = &[
        (
            |s| s.vip = Ipv4Addr::new(198, 18, 1, 255),
            "services[\"api\"].vip: 198.18.1.255 is the broadcast address of 198.18.1.0/24 on port \"b\"",
        ),
        (
            |s| s.vip = Ipv4Addr::new(198, 18, 0, 0),
            "services[\"api\"].vip: 198.18.0.0 is the network address of 198.18.0.0/24 on port \"a\"",
        ),
        (
            |s| s.backends[1].address = Ipv4Addr::new(198, 18, 1, 0),
            "services[\"api\"].backends[1].address: 198.18.1.0 is the network address of 198.18.1.0/24 on port \"b\"",
        ),
        (
            |s| s.backends[0].address = Ipv4Addr::new(198, 18, 1, 255),
            "services[\"api\"].backends[0].address: 198.18.1.255 is the broadcast address of 198.18.1.0/24 on port \"b\"",
        ),
    ];
    for (change, want) in cases {
        let mut s = service("api", 2);
        change(&mut s);
        let e = validate(&config(), &macs(), &with(vec![s], vec![])).unwrap_err();
        assert_eq!(e.message, *want);
    }
}

#[test]
fn a_new_flow_limit_compiles_is_checked_and_is_optional_in_the_state_file() {
    use vipgate_dataplane::admission::NewFlowLimit;
    let mut api = service("api", 2);
    api.new_flow_limit = Some(NewFlowLimitState { per_second: 100, burst: 200, prefix_len: 24 });
    let spec = validate(&config(), &macs(), &with(vec![api.clone()], vec![])).unwrap();
    let compiled = spec.services.iter().find(|s| s.name == "api").unwrap();
    assert_eq!(compiled.new_flow_limit, Some(NewFlowLimit { per_second: 100, burst: 200, prefix_len: 24 }));
    assert_eq!(spec.services.iter().find(|s| s.name == "web").unwrap().new_flow_limit, None);
    for (limit, msg) in [
        ((0, 1, 32), "services[\"api\"].new_flow_limit.per_second: 0 is not from 1 to 1000000"),
        ((1, 0, 32), "services[\"api\"].new_flow_limit.burst: 0 is not from 1 to 1000000"),
        ((1, 1, 40), "services[\"api\"].new_flow_limit.prefix_len: 40 is not a prefix length from 0 to 32"),
    ] {
        let mut bad = api.clone();
        bad.new_flow_limit = Some(NewFlowLimitState { per_second: limit.0, burst: limit.1, prefix_len: limit.2 });
        let e = validate(&config(), &macs(), &with(vec![bad], vec![])).unwrap_err();
        assert_eq!((e.kind, e.message.as_str()), (ErrorKind::InvalidArgument, msg));
    }
    // Persisted with the limit, and read back without one (a file written
    // before limits existed).
    let text = serde_json::to_string(&api).unwrap();
    assert!(text.contains("\"new_flow_limit\":{\"per_second\":100,\"burst\":200,\"prefix_len\":24}"), "{text}");
    assert_eq!(serde_json::from_str::<ServiceState>(&text).unwrap(), api);
    let old = serde_json::to_string(&service("api", 2)).unwrap();
    assert!(!old.contains("new_flow_limit"));
    assert_eq!(serde_json::from_str::<ServiceState>(&old).unwrap().new_flow_limit, None);
}

/// A mutation as the daemon applies it, version and generations included:
/// the change, then the objects it touched validated against the indexes of
/// the state before it.
fn run(
    state: &mut DesiredState,
    op: impl FnOnce(&Config, &mut DesiredState) -> Result<Change, StateError>,
) -> Result<Change, StateError> {
    let c = config();
    let effective = Effective::build(&c, &macs(), state).expect("the state before the change is valid");
    let mut new = state.clone();
    let change = op(&c, &mut new)?;
    new.advance(&change);
    effective.update(state, &new, &change)?;
    *state = new;
    Ok(change)
}

fn owned(mut s: ServiceState, owner: &str) -> ServiceState {
    owner.clone_into(&mut s.owner);
    s
}

#[test]
fn an_owner_scoped_apply_replaces_that_owners_objects_only_at_its_generation() {
    let k8s = "k8s/prod";
    let mut state = with(vec![service("cli-svc", 2)], vec![pool("cli-pool", 101)]);
    state.version = 0;
    // The controller's first Apply: generation 0, its objects only.
    let mut full = owned(service("k8s-full", 3), k8s);
    full.mode = ModeState::Fullnat { source_pool: "k8s-pool".to_owned() };
    full.backends = vec![backend(30, 8080, 1)];
    let k8s_pool = PoolState { owner: k8s.to_owned(), ..pool("k8s-pool", 102) };
    let ch = run(&mut state, |c, s| {
        let a = ServiceState { backends: vec![backend(40, 8080, 1)], ..owned(service("k8s-a", 4), "") };
        ops::apply_owned(c, s, k8s, 0, 0, vec![a, full.clone()], vec![k8s_pool.clone()])
    })
    .unwrap();
    assert_eq!(ch.services_changed, ["k8s-a", "k8s-full"]);
    assert_eq!(ch.owners, BTreeSet::from([k8s.to_owned()]));
    assert_eq!((state.version, state.generation(k8s), state.generation(DEFAULT_OWNER)), (1, 1, 0));
    assert_eq!(state.services["k8s-a"].owner, k8s, "an object naming no owner takes the Apply's");
    assert!(state.services.contains_key("cli-svc") && state.source_pools.contains_key("cli-pool"));

    // A stale generation is refused and changes nothing.
    let before = state.clone();
    let e = run(&mut state, |c, s| ops::apply_owned(c, s, k8s, 0, 0, vec![], vec![])).unwrap_err();
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
    assert_eq!(
        e.message,
        "expected_generation 0 is not owner \"k8s/prod\"'s current generation 1; read the state again"
    );
    assert_eq!(state, before);

    // The next Apply drops k8s-a and keeps the rest; the CLI's objects stay.
    let ch =
        run(&mut state, |c, s| ops::apply_owned(c, s, k8s, 1, 0, vec![full.clone()], vec![k8s_pool.clone()])).unwrap();
    assert_eq!((ch.services_changed.len(), ch.services_deleted.clone()), (0, vec!["k8s-a".to_owned()]));
    assert_eq!((state.version, state.generation(k8s)), (2, 2));
    assert!(state.services.contains_key("cli-svc"));

    // An Apply that changes nothing takes a version but no generation.
    run(&mut state, |c, s| ops::apply_owned(c, s, k8s, 2, 0, vec![full.clone()], vec![k8s_pool.clone()])).unwrap();
    assert_eq!((state.version, state.generation(k8s)), (3, 2));

    // Another owner's object cannot be taken over, nor named in the list.
    let e = run(&mut state, |c, s| ops::apply_owned(c, s, k8s, 2, 0, vec![owned(service("cli-svc", 2), "")], vec![]))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
    assert!(e.message.starts_with("service \"cli-svc\" is owned by \"cli\"; a request as owner \"k8s/prod\""), "{e}");
    let e = run(&mut state, |c, s| ops::apply_owned(c, s, k8s, 2, 0, vec![owned(service("x", 9), "someone")], vec![]))
        .unwrap_err();
    assert_eq!(e.message, "services[\"x\"].owner: \"someone\" is not the request's owner \"k8s/prod\"");
    // A pool one of the owner's services still uses cannot be left out.
    let e = run(&mut state, |c, s| ops::apply_owned(c, s, k8s, 2, 0, vec![full.clone()], vec![])).unwrap_err();
    assert_eq!(e.message, "source pool \"k8s-pool\" is used by service \"k8s-full\", so it cannot be left out");
    // The whole-state version guard still works when given.
    let e = run(&mut state, |c, s| ops::apply_owned(c, s, k8s, 2, 1, vec![], vec![])).unwrap_err();
    assert_eq!(e.message, "expected_version 1 is not the current version 3");
    // Leaving everything out deletes the owner's objects; its generation
    // stays, and goes on.
    run(&mut state, |c, s| ops::apply_owned(c, s, k8s, 2, 3, vec![], vec![])).unwrap();
    assert_eq!(state.generation(k8s), 3);
    assert!(state.services.values().all(|s| s.owner == DEFAULT_OWNER));
    assert!(state.source_pools.values().all(|p| p.owner == DEFAULT_OWNER));
}

#[test]
fn single_object_calls_change_only_their_owners_objects() {
    let mut state = with(vec![owned(service("k8s-a", 2), "k8s/prod")], vec![]);
    let cli = |op| move |c: &Config, s: &mut DesiredState| ops::one(c, s, "", "Test", op);
    let before = state.clone();
    for op in [
        ops::BatchOp::DeleteService("k8s-a".to_owned()),
        ops::BatchOp::UpdateService(owned(service("k8s-a", 2), "")),
        ops::BatchOp::AddBackend { service: "k8s-a".to_owned(), backend: backend(40, 8080, 1) },
        ops::BatchOp::RemoveBackend { service: "k8s-a".to_owned(), address: Ipv4Addr::new(198, 18, 1, 20), port: 8080 },
        ops::BatchOp::UpdateBackend {
            service: "k8s-a".to_owned(),
            address: Ipv4Addr::new(198, 18, 1, 20),
            port: 8080,
            weight: None,
            admin_state: Some(AdminState::Draining),
        },
    ] {
        let e = run(&mut state, cli(op.clone())).unwrap_err();
        assert_eq!(e.kind, ErrorKind::FailedPrecondition, "{op:?}");
        assert_eq!(
            e.message,
            "service \"k8s-a\" is owned by \"k8s/prod\"; a request as owner \"cli\" cannot change it (send it as owner \"k8s/prod\" to change it anyway)"
        );
    }
    let e = run(&mut state, cli(ops::BatchOp::CreateService(owned(service("k8s-a", 3), "")))).unwrap_err();
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorKind::AlreadyExists, "service \"k8s-a\" already exists, owned by \"k8s/prod\"")
    );
    assert_eq!(state, before);
    // As its owner, the same call works, and counts the owner's generation.
    let drain = ops::BatchOp::UpdateBackend {
        service: "k8s-a".to_owned(),
        address: Ipv4Addr::new(198, 18, 1, 20),
        port: 8080,
        weight: None,
        admin_state: Some(AdminState::Draining),
    };
    let ch = run(&mut state, |c, s| ops::one(c, s, "k8s/prod", "UpdateBackend", drain)).unwrap();
    assert_eq!((ch.services_changed.as_slice(), state.generation("k8s/prod")), (["k8s-a".to_owned()].as_slice(), 1));
    assert_eq!(state.generation(DEFAULT_OWNER), 0);
}

#[test]
fn a_batch_applies_all_its_operations_as_one_version_or_none() {
    let mut state = with(vec![service("api", 2)], vec![]);
    let before = state.clone();
    let ops_list = vec![
        ops::BatchOp::CreatePool(pool("p", 101)),
        ops::BatchOp::CreateService(ServiceState {
            mode: ModeState::Fullnat { source_pool: "p".to_owned() },
            backends: vec![backend(30, 8080, 1)],
            ..service("full", 3)
        }),
        ops::BatchOp::AddBackend { service: "api".to_owned(), backend: backend(22, 8080, 1) },
        ops::BatchOp::UpdateBackend {
            service: "api".to_owned(),
            address: Ipv4Addr::new(198, 18, 1, 20),
            port: 8080,
            weight: Some(7),
            admin_state: None,
        },
        // Created and deleted in the same batch: no trace in the change.
        ops::BatchOp::CreateService(ServiceState { backends: vec![backend(50, 8080, 1)], ..service("tmp", 4) }),
        ops::BatchOp::DeleteService("tmp".to_owned()),
    ];
    // A refused operation (here the last) leaves everything as it was.
    let mut bad = ops_list.clone();
    bad.push(ops::BatchOp::RemoveBackend {
        service: "api".to_owned(),
        address: Ipv4Addr::new(198, 18, 1, 99),
        port: 1,
    });
    let e = run(&mut state, |c, s| ops::batch(c, s, "", None, bad)).unwrap_err();
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorKind::NotFound, "operations[6]: service \"api\" has no backend 198.18.1.99:1")
    );
    assert_eq!(state, before);
    // A stale generation, an empty or an oversized batch likewise.
    let e = run(&mut state, |c, s| ops::batch(c, s, "", Some(5), ops_list.clone())).unwrap_err();
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
    let e = run(&mut state, |c, s| ops::batch(c, s, "", None, vec![])).unwrap_err();
    assert_eq!(e.message, "operations: a batch needs at least one operation");
    let many = vec![ops::BatchOp::DeleteService("x".to_owned()); MAX_BATCH + 1];
    let e = run(&mut state, |c, s| ops::batch(c, s, "", None, many)).unwrap_err();
    assert_eq!(e.message, "operations: 10001 operations in one batch; at most 10000");
    assert_eq!(state, before);

    let ch = run(&mut state, |c, s| ops::batch(c, s, "", Some(0), ops_list)).unwrap();
    assert_eq!(ch.services_changed, ["api", "full"]);
    assert!(ch.services_deleted.is_empty(), "{ch:?}");
    assert_eq!(ch.pools_changed, ["p"]);
    assert_eq!((state.version, state.generation(DEFAULT_OWNER)), (2, 1));
    assert_eq!(state.services["api"].backends.len(), 3);
    assert_eq!(state.services["api"].backends[0].weight, 7);
}

#[test]
fn a_change_seen_by_one_owner_names_only_its_objects() {
    let k8s_a = ServiceState { backends: vec![backend(40, 8080, 1)], ..owned(service("k8s-a", 3), "k8s/prod") };
    let mut state = with(vec![service("cli-a", 2), k8s_a], vec![]);
    let mut next = state.clone();
    next.services.remove("cli-a");
    next.services.get_mut("k8s-a").unwrap().backends[0].weight = 9;
    next.services.insert("k8s-b".to_owned(), owned(service("k8s-b", 4), "k8s/prod"));
    let ch = Change::between("Apply", &state, &next);
    assert_eq!(ch.owners, BTreeSet::from(["cli".to_owned(), "k8s/prod".to_owned()]));
    let k8s = ch.of_owner("k8s/prod");
    assert_eq!((k8s.services_changed, k8s.services_deleted), (vec!["k8s-a".to_owned(), "k8s-b".to_owned()], vec![]));
    let cli = ch.of_owner("cli");
    assert_eq!((cli.services_changed, cli.services_deleted), (vec![], vec!["cli-a".to_owned()]));
    assert!(!ch.touches("other") && ch.touches("cli"));
    state.advance(&ch);
    assert_eq!((state.generation("cli"), state.generation("k8s/prod"), state.version), (1, 1, 2));
}

#[test]
fn owners_follow_one_rule_and_a_state_saved_before_owners_belongs_to_cli() {
    for good in ["cli", "k8s/prod-cluster", "team_a.b:1"] {
        check_owner(good).unwrap();
    }
    assert_eq!(check_owner("").unwrap_err(), "must not be empty");
    assert_eq!(check_owner("a b").unwrap_err(), "\"a b\": use letters, digits, '-', '_', '.', '/' and ':' only");
    assert_eq!(check_owner(&"x".repeat(129)).unwrap_err(), "is 129 characters long; at most 128");
    let old = r#"{"version":3,"services":{"web":{"name":"web","vip":"198.18.100.5","port":80,"protocol":"tcp","mode":{"kind":"nat"},"table_size":251,"on_backend_removal":"rehash","backends":[]}},"source_pools":{"p":{"name":"p","addresses":["198.18.1.101"],"first_port":1024,"last_port":65535}}}"#;
    let state: DesiredState = serde_json::from_str(old).unwrap();
    assert_eq!((state.services["web"].owner.as_str(), state.source_pools["p"].owner.as_str()), ("cli", "cli"));
    assert!(state.generations.is_empty());
    // A stored owner that breaks the rule is named by validation.
    let bad = with(vec![owned(service("api", 2), "a b")], vec![]);
    let e = validate(&config(), &macs(), &bad).unwrap_err();
    assert_eq!(e.message, "services[\"api\"].owner: \"a b\": use letters, digits, '-', '_', '.', '/' and ':' only");
}

mod incremental {
    //! A change validated incrementally (only what it touched, against the
    //! indexes) is accepted exactly when the whole state after it is, and
    //! compiles to the same description.
    use super::*;
    use proptest::prelude::*;

    /// Addresses chosen so that the rules meet: backends, VIPs, pool
    /// addresses, a static backend (198.18.1.11), a static pool address
    /// (198.18.1.100), a port address (198.18.1.1), unroutable 198.20.0.1.
    const ADDRS: [[u8; 4]; 9] = [
        [198, 18, 1, 20],
        [198, 18, 1, 21],
        [198, 18, 1, 101],
        [198, 18, 100, 1],
        [198, 18, 100, 2],
        [198, 18, 1, 11],
        [198, 18, 1, 100],
        [198, 18, 1, 1],
        [198, 20, 0, 1],
    ];

    fn addr() -> impl Strategy<Value = Ipv4Addr> {
        prop::sample::select(&ADDRS[..]).prop_map(Ipv4Addr::from)
    }

    fn backend_s() -> impl Strategy<Value = BackendState> {
        (addr(), prop::sample::select(vec![80u16, 8080]), 0u32..3, 0u8..3).prop_map(|(address, port, weight, a)| {
            BackendState {
                address,
                port,
                weight,
                admin_state: [AdminState::Enabled, AdminState::Draining, AdminState::Disabled][usize::from(a)],
            }
        })
    }

    fn service_s() -> impl Strategy<Value = ServiceState> {
        (
            0usize..4,
            addr(),
            prop::sample::select(vec![80u16, 81]),
            any::<bool>(),
            0u8..4,
            prop::collection::vec(backend_s(), 0..4),
        )
            .prop_map(|(n, vip, port, udp, mode, backends)| ServiceState {
                name: format!("s{n}"),
                vip,
                port,
                protocol: if udp { ProtocolState::Udp } else { ProtocolState::Tcp },
                mode: match mode {
                    0 => ModeState::Nat,
                    1 => ModeState::Fullnat { source_pool: "p0".to_owned() },
                    2 => ModeState::Fullnat { source_pool: "static-pool".to_owned() },
                    _ => ModeState::Dsr { tunnel_source: None },
                },
                backends,
                ..service("x", 9)
            })
    }

    fn pool_s() -> impl Strategy<Value = PoolState> {
        (0usize..2, prop::collection::vec(addr(), 1..3)).prop_map(|(n, addresses)| PoolState {
            name: format!("p{n}"),
            addresses,
            ..pool("x", 1)
        })
    }

    #[derive(Clone, Debug)]
    enum Step {
        Put(ServiceState),
        Delete(usize),
        PutPool(PoolState),
        DeletePool(usize),
        /// Several at once, as an Apply or a batch.
        Many(Vec<ServiceState>, Option<PoolState>),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => service_s().prop_map(Step::Put),
            1 => (0usize..4).prop_map(Step::Delete),
            2 => pool_s().prop_map(Step::PutPool),
            1 => (0usize..2).prop_map(Step::DeletePool),
            1 => (prop::collection::vec(service_s(), 1..3), prop::option::of(pool_s())).prop_map(|(s, p)| Step::Many(s, p)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn agrees_with_whole_validation(steps in prop::collection::vec(step(), 1..24)) {
            let c = config();
            let mut state = DesiredState::default();
            let mut effective = Effective::build(&c, &macs(), &state).unwrap();
            for step in steps {
                let mut next = state.clone();
                match step {
                    Step::Put(s) => { next.services.insert(s.name.clone(), s); }
                    Step::Delete(n) => { next.services.remove(&format!("s{n}")); }
                    Step::PutPool(p) => { next.source_pools.insert(p.name.clone(), p); }
                    Step::DeletePool(n) => { next.source_pools.remove(&format!("p{n}")); }
                    Step::Many(services, pool) => {
                        for s in services { next.services.insert(s.name.clone(), s); }
                        if let Some(p) = pool { next.source_pools.insert(p.name.clone(), p); }
                    }
                }
                let change = Change::between("test", &state, &next);
                let incremental = effective.update(&state, &next, &change);
                let whole = Effective::build(&c, &macs(), &next);
                prop_assert_eq!(
                    incremental.is_ok(),
                    whole.is_ok(),
                    "incremental {:?}, whole {:?}",
                    incremental.as_ref().err(),
                    whole.as_ref().err()
                );
                if let (Ok(i), Ok(w)) = (incremental, whole) {
                    let (i_spec, w_spec) = (i.spec(), w.spec());
                    prop_assert_eq!(&i_spec.services, &w_spec.services);
                    prop_assert_eq!(&i_spec.source_pools, &w_spec.source_pools);
                    effective = i;
                    state = next;
                }
            }
        }
    }
}

#[test]
fn announce_eligibility_kept_service_by_service_equals_the_whole_computation() {
    use crate::announce::{Eligibility, eligibility};
    use crate::health::TargetKey;
    let c = config();
    // Two services on one VIP, one on another.
    let shared = ServiceState { port: 81, backends: vec![backend(40, 8080, 1)], ..service("shared", 2) };
    let mut state = with(vec![service("api", 2), shared, service("other", 3)], vec![]);
    let none = HashSet::new();
    let mut e = Eligibility::build(&c, &state, &none);
    assert_eq!(e.map(), eligibility(&c, &state, &none));
    type Step = Box<dyn Fn(&mut DesiredState)>;
    let mut steps: Vec<Step> = vec![
        // api drains all its backends: the VIP stays eligible through shared.
        Box::new(|s| {
            for b in &mut s.services.get_mut("api").unwrap().backends {
                b.admin_state = AdminState::Draining;
            }
        }),
        // shared goes: the VIP is no longer eligible.
        Box::new(|s| {
            s.services.remove("shared");
        }),
        // other moves to a new VIP.
        Box::new(|s| s.services.get_mut("other").unwrap().vip = Ipv4Addr::new(198, 18, 100, 7)),
    ];
    for (i, step) in steps.drain(..).enumerate() {
        let mut next = state.clone();
        step(&mut next);
        let change = Change::between("test", &state, &next);
        let names = change.services_changed.iter().chain(&change.services_deleted).map(String::as_str);
        let before = e.map();
        let changed = e.refresh(&c, &next, &none, names);
        assert_eq!(e.map(), eligibility(&c, &next, &none), "step {i}");
        assert_eq!(changed, e.map() != before, "step {i}: refresh says whether the map changed");
        state = next;
    }
    // Steps 1 and 2 change the map; step 0 (the VIP stays eligible
    // through another service) is checked above to report no change.
    // A backend down: only its service is computed again; one of two
    // down changes nothing the announcer sees.
    let down =
        HashSet::from([TargetKey { service: "other".into(), address: Ipv4Addr::new(198, 18, 1, 20), port: 8080 }]);
    assert!(!e.refresh(&c, &state, &down, ["other"]), "other still has a backend up");
    assert_eq!(e.map(), eligibility(&c, &state, &down));
    let down2 = HashSet::from([
        TargetKey { service: "other".into(), address: Ipv4Addr::new(198, 18, 1, 20), port: 8080 },
        TargetKey { service: "other".into(), address: Ipv4Addr::new(198, 18, 1, 21), port: 8080 },
    ]);
    assert!(e.refresh(&c, &state, &down2, ["other"]), "other's VIP is no longer eligible");
    let map = e.map();
    assert_eq!(map, eligibility(&c, &state, &down2));
    assert_eq!(map.get(&Ipv4Addr::new(198, 18, 100, 7)), Some(&false));
    assert_eq!(map.get(&Ipv4Addr::new(198, 18, 100, 1)), Some(&true), "the static service's VIP");
}

/// One rule, one wording: a mistake in a file's service and the same one
/// in an API's service are refused by the same rule of `Effective`, with
/// the same reason; the file names the line and the index, the API the
/// key.
#[test]
fn a_rule_refuses_a_file_and_an_api_service_alike() {
    use crate::config::ConfigError;
    // The field, the mistake in an API's service, as written in a file,
    // and a part of the reason.
    type Case = (&'static str, fn(&mut ServiceState), &'static str, &'static str);
    let cases: [Case; 3] = [
        ("vip", |s| s.vip = Ipv4Addr::new(198, 18, 0, 1), "vip = \"198.18.0.1\"", "not a free VIP"),
        (
            "backends[1].address",
            |s| s.backends[1].address = Ipv4Addr::new(198, 20, 0, 5),
            "{ address = \"198.20.0.5\", port = 8080 }",
            "no route to 198.20.0.5",
        ),
        (
            "backends[1].address",
            |s| s.backends[1] = backend(20, 8080, 2),
            "{ address = \"198.18.1.20\", port = 8080 }",
            "listed twice",
        ),
    ];
    for (field, edit, written, reason) in cases {
        let mut dynamic = service("x", 9);
        edit(&mut dynamic);
        let api = Effective::build(&config(), &macs(), &with(vec![dynamic], vec![])).expect_err(field);
        let api_prefix = format!("services[\"x\"].{field}: ");
        assert!(api.message.starts_with(&api_prefix), "{api}");
        let api_reason = &api.message[api_prefix.len()..];
        assert!(api_reason.contains(reason), "{api}");

        let second =
            if field == "vip" { "{ address = \"198.18.1.21\", port = 8080 }".to_owned() } else { written.to_owned() };
        let vip = if field == "vip" { written.to_owned() } else { "vip = \"198.18.100.9\"".to_owned() };
        let text = format!(
            "{CONFIG}\n[[services]]\nname = \"x\"\n{vip}\nport = 80\nprotocol = \"tcp\"\ntable_size = 251\nbackends = [\n  {{ address = \"198.18.1.20\", port = 8080 }},\n  {second},\n]\n"
        );
        let line = text.lines().count() - text.lines().rev().position(|l| l.contains(written)).expect("written");
        match Config::parse(Path::new("/etc/vipgate/vipgated.toml"), &text) {
            Err(ConfigError::Invalid { line: l, field: f, reason: r, .. }) => {
                assert_eq!((l, f.as_str()), (line, format!("services[1].{field}").as_str()), "{r}");
                assert_eq!(r, api_reason, "the file and the API word {field} alike");
            }
            other => panic!("{field}: expected Invalid, got {other:?}"),
        }
    }
}
