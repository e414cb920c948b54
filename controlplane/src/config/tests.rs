use super::*;
use vipgate_dataplane::snapshot::{ForwardingMode, SourcePoolSpec};

const GOOD: &str = r#"
[eal]
lcores = "0,1"
hugepages = false
file_prefix = "vgtest"

[dataplane]
idle_sleep_us = 20
flow_capacity = 65536

[dataplane.timeouts]
udp = 60

[api]
socket = "/run/vipgate/test.sock"

[[ports]]
name = "client"
device = "net_tap0,iface=vgt-c"
addresses = ["198.18.0.1/24"]

[[ports]]
name = "backend"
device = "0000:03:00.1"
addresses = ["198.18.1.1/24"]

[[routes]]
prefix = "198.19.0.0/16"
via = "198.18.0.254"

[[services]]
name = "web"
vip = "198.18.100.1"
port = 80
protocol = "tcp"
backends = [
  { address = "198.18.1.11", port = 8080 },
  { address = "198.18.1.12", port = 8080, weight = 3 },
]

[[services]]
name = "dns"
vip = "198.18.100.1"
port = 53
protocol = "UDP"
table_size = 251
on_backend_removal = "reset"
backends = [ { address = "198.18.1.11", port = 53 } ]

[[neighbours]]
address = "198.18.1.11"
mac = "02:00:00:00:01:0b"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/vipgate/test.toml"), text)
}

#[test]
fn a_good_file_compiles_to_eal_arguments_and_a_spec() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.lcores, vec![0, 1]);
    assert_eq!(
        c.eal_args,
        [
            "-l",
            "0,1",
            "--main-lcore",
            "0",
            "--file-prefix",
            "vgtest",
            "--no-huge",
            "-m",
            "512",
            "--vdev",
            "net_tap0,iface=vgt-c",
            "-a",
            "0000:03:00.1"
        ]
    );
    assert_eq!(c.dataplane.ports[0].device, "net_tap0");
    assert_eq!(c.dataplane.ports[1].device, "0000:03:00.1");
    assert_eq!(c.dataplane.idle_sleep_us, 20);
    assert_eq!(c.dataplane.pipeline.flow_capacity, 65536);
    assert_eq!(c.dataplane.pipeline.backend_slots, vipgate_dataplane::stats::DEFAULT_SLOTS, "max_backends' default");
    assert_eq!(c.dataplane.pipeline.flow_timeouts.udp_ns, 60_000_000_000);
    assert_eq!(c.dataplane.pipeline.flow_timeouts.tcp_established_ns, FlowTimeouts::default().tcp_established_ns);
    assert_eq!(c.api_socket, PathBuf::from("/run/vipgate/test.sock"));
    assert_eq!(c.services().len(), 2);
    assert_eq!(c.services()[0].table_size, DEFAULT_TABLE_SIZE);
    assert_eq!(c.services()[0].backends[1].weight, 3);
    assert_eq!(c.services()[1].protocol, ProtocolState::Udp);
    assert_eq!(c.services()[0].on_backend_removal, RemovalState::Rehash);
    assert_eq!(c.services()[1].on_backend_removal, RemovalState::Reset);
    let macs = [EthernetAddress([2, 0, 0, 0, 0, 1]), EthernetAddress([2, 0, 0, 0, 0, 2])];
    let spec = c.snapshot_spec(&macs);
    assert_eq!(spec.ports[1].mac, macs[1]);
    assert_eq!(spec.neighbours.len(), 1);
    assert_eq!(spec.neighbours[0].mac, EthernetAddress([2, 0, 0, 0, 1, 0x0b]));
    assert!(Snapshot::build(&spec).is_ok());
}

#[test]
fn hugepages_and_vdev_only_give_no_pci_and_optional_huge_unlink() {
    let text = GOOD.replace("hugepages = false", "hugepages = true").replace("0000:03:00.1", "net_null0");
    let c = parse(&text).unwrap();
    // By default hugepage files stay linked so dpdk-proc-info and
    // dpdk-dumpcap can attach; vipgated removes them when it stops.
    assert!(!c.eal_args.contains(&"--huge-unlink".to_owned()));
    assert!(c.eal_args.contains(&"--no-pci".to_owned()));
    assert!(!c.eal_args.contains(&"-m".to_owned()));
    let c = parse(&text.replace("hugepages = true", "hugepages = true\nhuge_unlink = true")).unwrap();
    assert!(c.eal_args.contains(&"--huge-unlink".to_owned()));
}

/// Each bad input, the line the error must point at, the field it must name
/// and a fragment of the reason.
#[test]
fn every_bad_input_names_line_field_and_reason() {
    let cases: &[(&str, &str, usize, &str, &str)] = &[
        ("lcores = \"0,1\"", "lcores = \"0\"", 3, "eal.lcores", "at least two lcores"),
        ("flow_capacity = 65536", "flow_capacity = 10", 9, "dataplane.flow_capacity", "is not from 1024"),
        (
            "flow_capacity = 65536",
            "flow_capacity = 65536\nmax_backends = 8",
            10,
            "dataplane.max_backends",
            "8 is not from 16 to 16777215 (each backend takes 64 bytes of statistics per worker)",
        ),
        ("udp = 60", "udp = 0", 12, "dataplane.timeouts.udp", "0 is below the minimum 1"),
        ("udp = 60", "udp = 99999999", 12, "dataplane.timeouts.udp", "is above the maximum 2246400 (26 days)"),
        ("lcores = \"0,1\"", "lcores = \"0,x\"", 3, "eal.lcores", "not an lcore number"),
        ("lcores = \"0,1\"", "lcores = \"0,0\"", 3, "eal.lcores", "listed twice"),
        ("file_prefix = \"vgtest\"", "file_prefix = \"a b\"", 5, "eal.file_prefix", "letters, digits"),
        ("name = \"backend\"", "name = \"client\"", 23, "ports[1].name", "already named"),
        ("device = \"0000:03:00.1\"", "device = \"eth0\"", 24, "ports[1].device", "neither a virtual device"),
        ("device = \"0000:03:00.1\"", "device = \"net_tap0,iface=x\"", 24, "ports[1].device", "used by another port"),
        ("[\"198.18.1.1/24\"]", "[\"198.18.1.1\"]", 25, "ports[1].addresses[0]", "needs a prefix length"),
        ("[\"198.18.1.1/24\"]", "[\"198.18.1.300/24\"]", 25, "ports[1].addresses[0]", "not an IPv4 address"),
        ("[\"198.18.1.1/24\"]", "[\"198.18.1.1/33\"]", 25, "ports[1].addresses[0]", "1 to 32"),
        ("[\"198.18.1.1/24\"]", "[\"198.18.0.9/16\"]", 25, "ports[1].addresses[0]", "overlaps 198.18.0.1/24"),
        ("[\"198.18.1.1/24\"]", "[\"198.18.1.0/24\"]", 25, "ports[1].addresses[0]", "network or broadcast"),
        (
            "prefix = \"198.19.0.0/16\"",
            "prefix = \"198.19.0.1/16\"",
            28,
            "routes[0].prefix",
            "did you mean 198.19.0.0/16",
        ),
        ("via = \"198.18.0.254\"", "via = \"198.18.7.254\"", 29, "routes[0].via", "not on any port's subnet"),
        (
            "vip = \"198.18.100.1\"\nport = 80",
            "vip = \"198.18.0.1\"\nport = 80",
            33,
            "services[0].vip",
            "address of port \"client\"",
        ),
        ("port = 80", "port = 0", 34, "services[0].port", "not a port number"),
        ("port = 80", "port = 70000", 34, "services[0].port", "not a port number"),
        (
            "port = 53\nprotocol = \"UDP\"",
            "port = 80\nprotocol = \"tcp\"",
            44,
            "services[1].port",
            "already served by service \"web\"",
        ),
        ("protocol = \"tcp\"", "protocol = \"sctp\"", 35, "services[0].protocol", "not \"tcp\" or \"udp\""),
        (
            "on_backend_removal = \"reset\"",
            "on_backend_removal = \"drop\"",
            47,
            "services[1].on_backend_removal",
            "not \"rehash\" or \"reset\"",
        ),
        ("table_size = 251", "table_size = 250", 46, "services[1].table_size", "not a prime"),
        ("table_size = 251", "table_size = 2", 46, "services[1].table_size", "not a prime from 3"),
        ("weight = 3", "weight = 70000", 38, "services[0].backends[1].weight", "not from 0 to 65535"),
        ("weight = 3", "weight = -1", 38, "services[0].backends[1].weight", "not from 0 to 65535"),
        (
            "\"198.18.1.12\", port = 8080",
            "\"198.18.1.11\", port = 8080",
            38,
            "services[0].backends[1].address",
            "listed twice",
        ),
        (
            "\"198.18.1.12\", port = 8080",
            "\"198.20.1.12\", port = 8080",
            38,
            "services[0].backends[1].address",
            "no route to 198.20.1.12",
        ),
        (
            "\"198.18.1.12\", port = 8080",
            "\"198.18.1.1\", port = 8080",
            38,
            "services[0].backends[1].address",
            "the gateway itself",
        ),
        (
            "\"198.18.1.12\", port = 8080",
            "\"198.18.100.1\", port = 8080",
            38,
            "services[0].backends[1].address",
            "a VIP",
        ),
        (
            "\"198.18.1.12\", port = 8080",
            "\"224.0.0.1\", port = 8080",
            38,
            "services[0].backends[1].address",
            "not a unicast",
        ),
        ("vip = \"198.18.100.1\"\nport = 80", "vip = \"0.0.0.0\"\nport = 80", 33, "services[0].vip", "not a unicast"),
        ("vip = \"198.18.100.1\"\nport = 80", "vip = \"239.1.1.1\"\nport = 80", 33, "services[0].vip", "not a unicast"),
        ("[\"198.18.1.1/24\"]", "[\"198.18.1.1/24\", \"198.18.1.1/24\"]", 25, "ports[1].addresses[1]", "listed twice"),
        ("[\"198.18.1.1/24\"]", "[\"198.18.1.1/0\"]", 25, "ports[1].addresses[0]", "from 1 to 32"),
        ("[\"198.18.1.1/24\"]", "[\"127.0.0.1/8\"]", 25, "ports[1].addresses[0]", "not a unicast"),
        ("via = \"198.18.0.254\"", "via = \"198.18.0.1\"", 29, "routes[0].via", "the gateway itself"),
        ("port = 8080, weight = 3", "port = 0, weight = 3", 38, "services[0].backends[1].port", "not a port number"),
        ("name = \"dns\"", "name = \"web\"", 42, "services[1].name", "already named"),
        (
            "address = \"198.18.1.11\"\nmac",
            "address = \"198.18.9.11\"\nmac",
            51,
            "neighbours[0].address",
            "not on any port's subnet",
        ),
        (
            "address = \"198.18.1.11\"\nmac",
            "address = \"198.18.1.1\"\nmac",
            51,
            "neighbours[0].address",
            "the gateway itself",
        ),
        ("mac = \"02:00:00:00:01:0b\"", "mac = \"02:00:00:00:01\"", 52, "neighbours[0].mac", "not a MAC address"),
        ("mac = \"02:00:00:00:01:0b\"", "mac = \"01:00:5e:00:00:01\"", 52, "neighbours[0].mac", "not a unicast"),
    ];
    for (from, to, line, field, reason) in cases {
        assert!(GOOD.contains(from), "fixture lacks {from:?}");
        let text = GOOD.replacen(from, to, 1);
        let err = parse(&text).expect_err(to);
        let msg = err.to_string();
        match &err {
            ConfigError::Invalid { line: l, field: f, reason: r, file } => {
                assert_eq!(file, Path::new("/etc/vipgate/test.toml"));
                assert_eq!((l, f.as_str()), (line, *field), "{to:?}: {msg}");
                assert!(r.contains(reason), "{to:?}: {msg}");
            }
            other => panic!("{to:?}: expected Invalid, got {other:?}"),
        }
        assert!(msg.starts_with(&format!("/etc/vipgate/test.toml:{line}: {field}: ")), "{msg}");
    }
}

#[test]
fn a_backend_shared_by_two_services_is_refused() {
    // The dns service becomes TCP on 8443 with web's first backend.
    let text = GOOD
        .replace("protocol = \"UDP\"", "protocol = \"tcp\"")
        .replace("port = 53\n", "port = 8443\n")
        .replace("{ address = \"198.18.1.11\", port = 53 }", "{ address = \"198.18.1.11\", port = 8080 }");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("services[1].backends[0].address") && err.contains("already serves service \"web\""), "{err}");
}

#[test]
fn syntax_and_schema_errors_name_file_and_line() {
    for (text, want) in [
        (GOOD.replace("[[ports]]\nname = \"client\"", "[[ports]]\nnme = \"client\""), "unknown field `nme`"),
        (GOOD.replacen("port = 80\n", "port = \"eighty\"\n", 1), "invalid type"),
        (GOOD.replace("lcores = \"0,1\"", "lcores = \"0,1"), "line 3"),
        ("[api]\nsocket = \"/x\"\n".to_owned(), "missing field `eal`"),
    ] {
        let err = parse(&text).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Parse { .. }), "{msg}");
        assert!(msg.starts_with("/etc/vipgate/test.toml: "), "{msg}");
        assert!(msg.contains(want), "wanted {want:?} in {msg}");
        assert!(msg.contains("line"), "{msg}");
    }
}

#[test]
fn missing_ports_and_missing_file_are_reported() {
    let text = "[eal]\nlcores = \"0,1\"\n";
    let msg = parse(text).unwrap_err().to_string();
    assert!(msg.contains("ports: no [[ports]] configured"), "{msg}");
    let msg = Config::load(Path::new("/nonexistent/vipgate.toml")).unwrap_err().to_string();
    assert!(msg.starts_with("/nonexistent/vipgate.toml: cannot read"), "{msg}");
}

#[test]
fn lcore_lists_and_devices() {
    assert_eq!(parse_lcores("0-2,5").unwrap().0, vec![0, 1, 2, 5]);
    assert_eq!(parse_lcores(" 3 , 1 ").unwrap().0, vec![3, 1]);
    assert!(parse_lcores("2-1").is_err());
    assert_eq!(parse_lcores("0@0,1@1,2@1").unwrap(), (vec![0, 1, 2], vec![Some(0), Some(1), Some(1)]));
    assert!(parse_lcores("1-2@1").is_err());
    assert!(parse_lcores("1@x").is_err());
    assert_eq!(parse_device("03:00.0").unwrap(), Device::Pci { address: "0000:03:00.0".into() });
    assert_eq!(parse_device("0000:AF:00.1").unwrap(), Device::Pci { address: "0000:af:00.1".into() });
    assert_eq!(
        parse_device("net_pcap0,rx_pcap=/tmp/x.pcap").unwrap(),
        Device::Virtual { name: "net_pcap0".into(), args: "net_pcap0,rx_pcap=/tmp/x.pcap".into() }
    );
    assert!(parse_device("0000:03:00").is_err());
}

#[test]
fn lcores_placed_on_cpus_become_an_lcores_map() {
    let c = parse(&GOOD.replace("lcores = \"0,1\"", "lcores = \"0@0,1@1,2@1\"")).unwrap();
    assert_eq!(c.lcores, vec![0, 1, 2]);
    assert_eq!(&c.eal_args[..4], ["--lcores", "0@0,1@1,2@1", "--main-lcore", "0"]);
    let c = parse(&GOOD.replace("lcores = \"0,1\"", "lcores = \"0,1,2@1\"")).unwrap();
    assert_eq!(&c.eal_args[..2], ["--lcores", "0@0,1@1,2@1"]);
}

#[test]
fn duplicate_route_prefixes_are_refused() {
    let text = GOOD.replace(
        "via = \"198.18.0.254\"\n",
        "via = \"198.18.0.254\"\n\n[[routes]]\nprefix = \"198.19.0.0/16\"\nvia = \"198.18.0.253\"\n",
    );
    let msg = parse(&text).unwrap_err().to_string();
    assert!(msg.contains(":32: routes[1].prefix: routes[0] already has this prefix"), "{msg}");
}

/// GOOD with a source pool, web in FullNAT through it and dns in DSR.
const MODES: &str = r#"
[eal]
lcores = "0,1,2"
hugepages = false

[[ports]]
name = "client"
device = "net_tap0,iface=vgt-c"
addresses = ["198.18.0.1/24"]

[[ports]]
name = "backend"
device = "net_tap1,iface=vgt-b"
addresses = ["198.18.1.1/24"]

[[source_pools]]
name = "snat"
addresses = ["198.18.1.100", "198.18.1.101"]
ports = "20000-29999"

[[services]]
name = "web"
vip = "198.18.100.1"
port = 80
protocol = "tcp"
mode = "fullnat"
source_pool = "snat"
backends = [ { address = "198.18.1.11", port = 8080 } ]

[[services]]
name = "dns"
vip = "198.18.100.1"
port = 53
protocol = "udp"
mode = "dsr"
tunnel_source = "198.18.3.0/24"
backends = [ { address = "198.18.1.11", port = 53 } ]
"#;

#[test]
fn modes_and_source_pools_compile() {
    let c = parse(MODES).unwrap();
    let spec = c.snapshot_spec(&[EthernetAddress::default(); 2]);
    assert_eq!(
        spec.source_pools,
        vec![SourcePoolSpec {
            name: "snat".into(),
            addresses: vec![0xC612_0164, 0xC612_0165],
            first_port: 20000,
            last_port: 29999
        }]
    );
    assert_eq!(spec.services[0].mode, ForwardingMode::FullNat { pool: "snat".into() });
    assert_eq!(
        spec.services[1].mode,
        ForwardingMode::Dsr { tunnel_source: Some(Ipv4Cidr { addr: 0xC612_0300, len: 24 }) }
    );
    // Without `ports`, a pool uses 1024-65535; without `mode`, nat.
    let c = parse(
        &MODES
            .replace("ports = \"20000-29999\"\n", "")
            .replace("mode = \"dsr\"\ntunnel_source = \"198.18.3.0/24\"\n", ""),
    )
    .unwrap();
    let spec = c.snapshot_spec(&[EthernetAddress::default(); 2]);
    assert_eq!((spec.source_pools[0].first_port, spec.source_pools[0].last_port), DEFAULT_POOL_PORTS);
    assert_eq!(spec.services[1].mode, ForwardingMode::Nat);
    // nat and fullnat services may share a backend: replies differ by
    // destination (the client, or a pool address).
    let shared = MODES
        .replace("mode = \"dsr\"\ntunnel_source = \"198.18.3.0/24\"\n", "")
        .replace("port = 53\nprotocol = \"udp\"", "port = 81\nprotocol = \"tcp\"")
        .replace("port = 53 }", "port = 8080 }");
    parse(&shared).unwrap();
}

#[test]
fn bad_modes_and_pools_name_line_field_and_reason() {
    let cases: &[(&str, &str, usize, &str, &str)] = &[
        ("mode = \"fullnat\"", "mode = \"snat\"", 26, "services[0].mode", "not \"nat\", \"fullnat\" or \"dsr\""),
        (
            "source_pool = \"snat\"",
            "source_pool = \"other\"",
            27,
            "services[0].source_pool",
            "no source pool is named \"other\"",
        ),
        ("source_pool = \"snat\"\n", "", 26, "services[0].source_pool", "needs source_pool"),
        ("mode = \"fullnat\"\n", "", 26, "services[0].source_pool", "only used with mode = \"fullnat\""),
        ("mode = \"dsr\"\n", "", 35, "services[1].tunnel_source", "only used with mode = \"dsr\""),
        (
            "tunnel_source = \"198.18.3.0/24\"",
            "tunnel_source = \"198.18.3.0/8\"",
            36,
            "services[1].tunnel_source",
            "from 16 to 32",
        ),
        (
            "{ address = \"198.18.1.11\", port = 53 }",
            "{ address = \"198.18.1.11\", port = 5353 }",
            37,
            "services[1].backends[0].port",
            "cannot change the port",
        ),
        ("ports = \"20000-29999\"", "ports = \"29999-20000\"", 19, "source_pools[0].ports", "not a port range"),
        ("ports = \"20000-29999\"", "ports = \"0-10\"", 19, "source_pools[0].ports", "not a port range"),
        ("ports = \"20000-29999\"", "ports = \"20000\"", 19, "source_pools[0].ports", "1 ports for 2 workers"),
        (
            "\"198.18.1.100\", \"198.18.1.101\"",
            "\"198.18.1.100\", \"198.18.1.100\"",
            18,
            "source_pools[0].addresses[1]",
            "already in source pool \"snat\"",
        ),
        (
            "\"198.18.1.100\", \"198.18.1.101\"",
            "\"198.18.1.1\"",
            18,
            "source_pools[0].addresses[0]",
            "address of port \"backend\"",
        ),
        // A pool address that is a VIP: the pools come first, so the
        // service's VIP is the one refused.
        (
            "\"198.18.1.100\", \"198.18.1.101\"",
            "\"198.18.100.1\"",
            23,
            "services[0].vip",
            "is an address of source pool \"snat\"",
        ),
        ("\"198.18.1.100\", \"198.18.1.101\"", "\"224.1.1.1\"", 18, "source_pools[0].addresses[0]", "not a unicast"),
        (
            "addresses = [\"198.18.1.100\", \"198.18.1.101\"]",
            "addresses = []",
            18,
            "source_pools[0].addresses",
            "at least one address",
        ),
        ("name = \"snat\"", "name = \" \"", 17, "source_pools[0].name", "must not be empty"),
        (
            "{ address = \"198.18.1.11\", port = 8080 }",
            "{ address = \"198.18.1.101\", port = 8080 }",
            28,
            "services[0].backends[0].address",
            "is an address of source pool \"snat\"",
        ),
    ];
    for (from, to, line, field, reason) in cases {
        assert!(MODES.contains(from), "fixture lacks {from:?}");
        let text = MODES.replacen(from, to, 1);
        let err = parse(&text).expect_err(to);
        let msg = err.to_string();
        match &err {
            ConfigError::Invalid { line: l, field: f, reason: r, .. } => {
                assert_eq!((l, f.as_str()), (line, *field), "{to:?}: {msg}");
                assert!(r.contains(reason), "{to:?}: {msg}");
            }
            other => panic!("{to:?}: expected Invalid, got {other:?}"),
        }
    }
}

/// What `restart_required` says when GOOD is edited into `edited`.
fn restart_required(edited: &str) -> Option<String> {
    parse(GOOD).unwrap().restart_required(&parse(edited).unwrap()).map(|r| r.to_string())
}

#[test]
fn services_routes_and_neighbours_may_change_without_a_restart() {
    assert_eq!(restart_required(GOOD), None);
    let edited = GOOD
        .replace(
            "{ address = \"198.18.1.12\", port = 8080, weight = 3 },",
            "{ address = \"198.18.1.13\", port = 8081, weight = 0 },",
        )
        .replace("prefix = \"198.19.0.0/16\"", "prefix = \"198.20.0.0/16\"")
        .replace("mac = \"02:00:00:00:01:0b\"", "mac = \"02:00:00:00:01:0c\"")
        .replace("table_size = 251", "table_size = 257")
        + "\n[[services]]\nname = \"new\"\nvip = \"198.18.100.2\"\nport = 443\nprotocol = \"tcp\"\n";
    assert_eq!(parse(&edited).unwrap().services().len(), 3);
    assert_eq!(restart_required(&edited), None);
    // Writing out a default, or the same lcores another way, is no change.
    let spelled_out = GOOD
        .replace("idle_sleep_us = 20", "idle_sleep_us = 20\nmbufs = 16383\nmbuf_cache = 256")
        .replace("\"0,1\"", "\"0-1\"");
    assert_eq!(restart_required(&spelled_out), None);
}

#[test]
fn eal_dataplane_api_and_ports_need_a_restart_and_the_first_change_is_named() {
    for (from, to, want) in [
        ("lcores = \"0,1\"", "lcores = \"0,2\"", "eal.lcores changed from \"0,1\" to \"0,2\""),
        ("hugepages = false", "hugepages = true", "eal.hugepages changed from false to true"),
        (
            "file_prefix = \"vgtest\"",
            "file_prefix = \"vgtest2\"\nmemory_mb = 512",
            "eal.memory_mb changed from (not set) to 512",
        ),
        (
            "hugepages = false",
            "hugepages = false\ncontrol_plane_nice = 0",
            "eal.control_plane_nice changed from -10 to 0",
        ),
        ("flow_capacity = 65536", "flow_capacity = 131072", "dataplane.flow_capacity changed from 65536 to 131072"),
        (
            "flow_capacity = 65536",
            "flow_capacity = 65536\nmax_backends = 1000",
            "dataplane.max_backends changed from 131072 to 1000",
        ),
        ("udp = 60", "udp = 61", "dataplane.timeouts.udp changed from 60 to 61"),
        ("idle_sleep_us = 20", "idle_sleep_us = 0", "dataplane.idle_sleep_us changed from 20 to 0"),
        (
            "test.sock",
            "other.sock",
            "api.socket changed from \"/run/vipgate/test.sock\" to \"/run/vipgate/other.sock\"",
        ),
        ("name = \"client\"", "name = \"clients\"", "ports[0].name changed from \"client\" to \"clients\""),
        (
            "iface=vgt-c",
            "iface=vgt-x",
            "ports[0].device changed from \"net_tap0,iface=vgt-c\" to \"net_tap0,iface=vgt-x\"",
        ),
        ("\"0000:03:00.1\"", "\"03:00.0\"", "ports[1].device changed from \"0000:03:00.1\" to \"0000:03:00.0\""),
        (
            "[\"198.18.1.1/24\"]",
            "[\"198.18.1.1/24\", \"198.18.2.1/24\"]",
            "ports[1].addresses changed from [\"198.18.1.1/24\"] to [\"198.18.1.1/24\", \"198.18.2.1/24\"]",
        ),
    ] {
        assert!(GOOD.contains(from), "{from}");
        let edited = GOOD.replacen(from, to, 1);
        assert_eq!(restart_required(&edited).as_deref(), Some(want), "editing {from:?} into {to:?}");
    }
    let third =
        GOOD.to_owned() + "\n[[ports]]\nname = \"third\"\ndevice = \"net_null0\"\naddresses = [\"198.18.9.1/24\"]\n";
    assert_eq!(restart_required(&third).as_deref(), Some("ports changed from 2 ports to 3 ports"));
    // Several changes: the first in file order is named.
    let both = GOOD.replace("iface=vgt-c", "iface=vgt-x").replace("flow_capacity = 65536", "flow_capacity = 131072");
    assert_eq!(restart_required(&both).as_deref(), Some("dataplane.flow_capacity changed from 65536 to 131072"));
}

#[test]
fn port_mtu_defaults_to_1500_and_is_bounded() {
    let c = parse(GOOD).unwrap();
    assert!(c.ports().iter().all(|p| p.mtu == 1500));
    assert_eq!(c.dataplane.ports[1].mtu, 1500);
    let with = |mtu: &str| {
        GOOD.replacen("addresses = [\"198.18.1.1/24\"]", &format!("addresses = [\"198.18.1.1/24\"]\nmtu = {mtu}"), 1)
    };
    let c = parse(&with("1520")).unwrap();
    assert_eq!((c.ports()[1].mtu, c.dataplane.ports[1].mtu), (1520, 1520));
    let c = parse(&with("9000")).unwrap();
    assert_eq!((c.ports()[1].mtu, c.dataplane.ports[1].mtu), (9000, 9000));
    for bad in ["575", "9001", "65536", "-1"] {
        let err = parse(&with(bad)).unwrap_err().to_string();
        assert_eq!(err, format!("/etc/vipgate/test.toml:26: ports[1].mtu: {bad} is not from 576 to 9000"));
    }
    // The MTU is set on the device at start: changing it needs a restart.
    assert_eq!(restart_required(&with("1600")).as_deref(), Some("ports[1].mtu changed from 1500 to 1600"));
}

/// A directory with a CA certificate, a server certificate and key, and
/// files that are not PEM, made for one test and removed on drop.
struct TlsFiles {
    dir: PathBuf,
}

impl TlsFiles {
    fn new(tag: &str) -> TlsFiles {
        let dir = std::env::temp_dir().join(format!("vgcfg-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("garbage.pem"), "not a certificate\n").unwrap();
        TlsFiles { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// GOOD with `[api]` lines added after the socket.
    fn config(&self, api_lines: &str) -> String {
        GOOD.replacen(
            "socket = \"/run/vipgate/test.sock\"",
            &format!("socket = \"/run/vipgate/test.sock\"\n{api_lines}"),
            1,
        )
    }

    fn full(&self) -> String {
        format!(
            "listen_tcp = \"127.0.0.1:50051\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"",
            self.path("cert.pem"),
            self.path("key.pem"),
            self.path("ca.pem")
        )
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn metrics_listen_defaults_to_loopback_and_empty_turns_it_off() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9469".parse().unwrap()));
    // Before [[ports]], on line 18.
    let with = |v: &str| GOOD.replacen("[[ports]]", &format!("[metrics]\nlisten = {v}\n\n[[ports]]"), 1);
    assert_eq!(parse(&with("\"\"")).unwrap().metrics_listen, None);
    assert_eq!(parse(&with("\"0.0.0.0:9100\"")).unwrap().metrics_listen, Some("0.0.0.0:9100".parse().unwrap()));
    assert_eq!(parse(&with("\"[::1]:9469\"")).unwrap().metrics_listen, Some("[::1]:9469".parse().unwrap()));
    let err = parse(&with("\"localhost:9469\"")).unwrap_err().to_string();
    assert_eq!(
        err,
        "/etc/vipgate/test.toml:18: metrics.listen: \"localhost:9469\" is not an address and port such as \"127.0.0.1:9469\" (or \"\" to turn metrics off)"
    );
    let err = parse(&with("\"127.0.0.1\"")).unwrap_err().to_string();
    assert!(
        err.starts_with("/etc/vipgate/test.toml:18: metrics.listen: \"127.0.0.1\" is not an address and port"),
        "{err}"
    );
    let err = parse(&with("9469")).unwrap_err().to_string();
    assert!(err.contains("test.toml") && err.contains("invalid type"), "{err}");
    let err = parse(&GOOD.replacen("[[ports]]", "[metrics]\nenabled = false\n\n[[ports]]", 1)).unwrap_err().to_string();
    assert!(err.contains("unknown field `enabled`"), "{err}");
    // Restart-only.
    assert_eq!(
        restart_required(&with("\"127.0.0.1:9470\"")).as_deref(),
        Some("metrics.listen changed from \"127.0.0.1:9469\" to \"127.0.0.1:9470\"")
    );
    assert_eq!(
        restart_required(&with("\"\"")).as_deref(),
        Some("metrics.listen changed from \"127.0.0.1:9469\" to \"\"")
    );
    assert_eq!(restart_required(&with("\"127.0.0.1:9469\"")), None, "writing out the default is no change");
}

#[test]
fn api_listen_tcp_reads_its_tls_files() {
    let f = TlsFiles::new("ok");
    let c = parse(&f.config(&f.full())).unwrap();
    let tcp = c.api_tcp.expect("api_tcp");
    assert_eq!(tcp.addr, "127.0.0.1:50051".parse().unwrap());
    assert!(String::from_utf8_lossy(&tcp.cert_pem).contains("BEGIN CERTIFICATE"));
    assert!(String::from_utf8_lossy(&tcp.key_pem).contains("PRIVATE KEY"));
    assert_eq!(c.api_max_request_bytes, 4 * 1024 * 1024);
    assert!(parse(GOOD).unwrap().api_tcp.is_none());
    let c = parse(&f.config(&(f.full() + "\nmax_request_bytes = 65536"))).unwrap();
    assert_eq!(c.api_max_request_bytes, 65536);
}

#[test]
fn api_tls_errors_name_line_field_and_file() {
    let f = TlsFiles::new("bad");
    let full = f.full();
    let drop_line = |key: &str| full.lines().filter(|l| !l.starts_with(key)).collect::<Vec<_>>().join("\n");
    // Line 16 is the first added line, listen_tcp.
    for key in ["tls_cert", "tls_key", "client_ca"] {
        let err = parse(&f.config(&drop_line(key))).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "/etc/vipgate/test.toml:16: api.{key}: is required with api.listen_tcp: the TCP listener always uses TLS with client certificates (set tls_cert, tls_key and client_ca)"
            )
        );
    }
    let err = parse(&f.config(&full.replace("ca.pem", "missing.pem"))).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "/etc/vipgate/test.toml:19: api.client_ca: cannot read {}: No such file",
            f.path("missing.pem")
        )),
        "{err}"
    );
    let err = parse(&f.config(&full.replace("cert.pem", "garbage.pem"))).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "/etc/vipgate/test.toml:17: api.tls_cert: {}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            f.path("garbage.pem")
        )
    );
    // A certificate is not a key.
    let err = parse(&f.config(&full.replace("key.pem", "cert.pem"))).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "/etc/vipgate/test.toml:18: api.tls_key: {}: holds no PEM private key",
            f.path("cert.pem")
        )),
        "{err}"
    );
    let err = parse(&f.config(&full.replace("127.0.0.1:50051", "127.0.0.1"))).unwrap_err().to_string();
    assert_eq!(
        err,
        "/etc/vipgate/test.toml:16: api.listen_tcp: \"127.0.0.1\" is not an address and port such as \"198.18.0.1:50051\""
    );
    let err = parse(&f.config(&format!("tls_cert = \"{}\"", f.path("cert.pem")))).unwrap_err().to_string();
    assert_eq!(err, "/etc/vipgate/test.toml:16: api.tls_cert: is only used with api.listen_tcp, which is not set");
    for bad in ["1023", "67108865", "-1"] {
        let err = parse(&f.config(&format!("max_request_bytes = {bad}"))).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("/etc/vipgate/test.toml:16: api.max_request_bytes: {bad} is not from 1024 to 67108864")
        );
    }
}

#[test]
fn api_tls_files_must_be_regular_files_of_at_most_a_mebibyte() {
    let f = TlsFiles::new("size");
    let full = f.full();
    // A PEM file is a few kilobytes: a larger one is refused, not read whole.
    std::fs::write(f.dir.join("huge.pem"), vec![b'x'; (1 << 20) + 1]).unwrap();
    let err = parse(&f.config(&full.replace("cert.pem", "huge.pem"))).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("/etc/vipgate/test.toml:17: api.tls_cert: {} is larger than 1048576 bytes", f.path("huge.pem"))
    );
    // A device never ends (or blocks, like a FIFO): it is not read at all.
    let err = parse(&f.config(&full.replace(&f.path("key.pem"), "/dev/zero"))).unwrap_err().to_string();
    assert_eq!(err, "/etc/vipgate/test.toml:18: api.tls_key: /dev/zero is not a regular file");
}

#[test]
fn api_tcp_settings_need_a_restart() {
    let f = TlsFiles::new("restart");
    let running = parse(&f.config(&f.full())).unwrap();
    let changed = |text: String| running.restart_required(&parse(&text).unwrap()).map(|c| c.to_string());
    assert_eq!(changed(f.config(&f.full())), None);
    assert_eq!(
        changed(f.config(&f.full().replace("50051", "50052"))).as_deref(),
        Some("api.listen_tcp changed from \"127.0.0.1:50051\" to \"127.0.0.1:50052\"")
    );
    std::fs::copy(f.dir.join("ca.pem"), f.dir.join("ca2.pem")).unwrap();
    assert_eq!(
        changed(f.config(&f.full().replace("ca.pem", "ca2.pem"))),
        Some(format!("api.client_ca changed from {:?} to {:?}", f.path("ca.pem"), f.path("ca2.pem")))
    );
    assert_eq!(
        changed(f.config(&(f.full() + "\nmax_request_bytes = 1024"))).as_deref(),
        Some("api.max_request_bytes changed from 4194304 to 1024")
    );
    assert_eq!(
        changed(GOOD.to_owned()).as_deref(),
        Some("api.listen_tcp changed from \"127.0.0.1:50051\" to (not set)")
    );
}

#[test]
fn the_state_directory_defaults_and_needs_a_restart() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.state_dir, Path::new(DEFAULT_STATE_DIR));
    let with = GOOD.replacen("[[ports]]", "[state]\ndir = \"/srv/vipgate\"\n\n[[ports]]", 1);
    assert_eq!(parse(&with).unwrap().state_dir, Path::new("/srv/vipgate"));
    assert_eq!(
        restart_required(&with).as_deref(),
        Some("state.dir changed from \"/var/lib/vipgate\" to \"/srv/vipgate\"")
    );
    let unknown = GOOD.replacen("[[ports]]", "[state]\ndirectory = \"/x\"\n\n[[ports]]", 1);
    assert!(parse(&unknown).unwrap_err().to_string().contains("unknown field `directory`"));
}

const HEALTH: &str = r#"
[eal]
lcores = "0,1"
hugepages = false

[[ports]]
name = "backend"
device = "net_null0"
addresses = ["198.18.1.1/24"]

[[services]]
name = "web"
vip = "198.18.100.1"
port = 80
protocol = "tcp"
backends = [ { address = "198.18.1.11", port = 8080 } ]

[services.health_check]
kind = "http"
interval_ms = 200
timeout_ms = 100
rise = 2
fall = 2
path = "/healthz"
expect_status = "200-299,301"

[[services]]
name = "dns"
vip = "198.18.100.1"
port = 53
protocol = "udp"
backends = [ { address = "198.18.1.11", port = 53 } ]

[services.health_check]
kind = "udp"
payload_hex = "00 01"
expect_reply = "ok"
"#;

#[test]
fn health_checks_parse_with_their_defaults() {
    use crate::health::{CheckKind, HealthCheck};
    let c = parse(HEALTH).unwrap();
    let check =
        |c: &Config, name: &str| c.services().iter().find(|s| s.name == name).and_then(|s| s.health_check.clone());
    let web: HealthCheck = check(&c, "web").unwrap();
    assert_eq!((web.interval_ms, web.timeout_ms, web.rise, web.fall, web.port), (200, 100, 2, 2, None));
    let CheckKind::Http(h) = &web.kind else { panic!("{web:?}") };
    assert_eq!((h.path.as_str(), h.expect_status.to_string()), ("/healthz", "200-299,301".to_owned()));
    let dns = check(&c, "dns").unwrap();
    assert_eq!((dns.interval_ms, dns.timeout_ms, dns.rise, dns.fall), (5000, 2000, 2, 3));
    let CheckKind::Udp(u) = &dns.kind else { panic!("{dns:?}") };
    assert_eq!((u.payload.as_slice(), u.expect_reply.as_deref()), (&[0u8, 1][..], Some(&b"ok"[..])));
    // No check: none.
    let plain = parse(
        &HEALTH
            .replace("[services.health_check]\nkind = \"udp\"\npayload_hex = \"00 01\"\nexpect_reply = \"ok\"\n", ""),
    )
    .unwrap();
    assert!(check(&plain, "dns").is_none());
}

#[test]
fn bad_health_checks_name_line_field_and_reason() {
    let cases: &[(&str, &str, usize, &str, &str)] = &[
        ("kind = \"http\"", "kind = \"icmp\"", 19, "services[0].health_check.kind", "not \"tcp\", \"http\""),
        ("kind = \"http\"\n", "", 18, "services[0].health_check.kind", "is required"),
        ("interval_ms = 200", "interval_ms = 10", 20, "services[0].health_check.interval_ms", "not from 100"),
        ("timeout_ms = 100", "timeout_ms = 300", 21, "services[0].health_check.timeout_ms", "less than interval_ms"),
        ("rise = 2", "rise = 0", 22, "services[0].health_check.rise", "not from 1 to 100"),
        ("fall = 2", "fall = 1000", 23, "services[0].health_check.fall", "not from 1 to 100"),
        ("path = \"/healthz\"", "path = \"healthz\"", 24, "services[0].health_check.path", "start with '/'"),
        (
            "expect_status = \"200-299,301\"",
            "expect_status = \"200-700\"",
            25,
            "services[0].health_check.expect_status",
            "from 100 to 599",
        ),
        ("rise = 2", "rise = 2\nport = 0", 23, "services[0].health_check.port", "not a port number"),
        ("rise = 2", "rise = 2\nsource = \"nope\"", 23, "services[0].health_check.source", "not an IPv4"),
        (
            "rise = 2",
            "rise = 2\npayload = \"x\"",
            23,
            "services[0].health_check.payload",
            "only used with kind \"udp\"",
        ),
        ("rise = 2", "rise = 2\ncolour = 1", 18, "", "unknown field `colour`"),
        ("payload_hex = \"00 01\"", "payload_hex = \"0g\"", 36, "services[1].health_check.payload_hex", "hexadecimal"),
        (
            "payload_hex = \"00 01\"",
            "payload_hex = \"00\"\npayload = \"x\"",
            36,
            "services[1].health_check.payload_hex",
            "not both",
        ),
        ("payload_hex = \"00 01\"\n", "", 34, "services[1].health_check.payload", "needs a payload"),
        ("expect_reply = \"ok\"", "path = \"/\"", 37, "services[1].health_check.path", "only used with kind \"http\""),
    ];
    for (from, to, line, field, reason) in cases {
        assert!(HEALTH.contains(from), "fixture lacks {from:?}");
        let text = HEALTH.replacen(from, to, 1);
        let err = parse(&text).expect_err(to);
        let msg = err.to_string();
        match &err {
            ConfigError::Invalid { line: l, field: f, reason: r, .. } => {
                assert_eq!((l, f.as_str()), (line, *field), "{to:?}: {msg}");
                assert!(r.contains(reason), "{to:?}: {msg}");
            }
            ConfigError::Parse { message, .. } if field.is_empty() => {
                assert!(message.contains(reason), "{to:?}: {msg}");
            }
            other => panic!("{to:?}: expected Invalid, got {other:?}"),
        }
    }
}

#[test]
fn announce_defaults_keys_and_bad_values() {
    use crate::config::announce_settings::{AnnounceSettings, DEFAULT_HOLD_DOWN, InterfaceKind};
    let c = parse(GOOD).unwrap();
    assert_eq!(c.announce, AnnounceSettings::default());
    assert!(!c.announce.enabled, "off unless asked for");
    assert_eq!((c.announce.interface.as_str(), c.announce.hold_down), ("vipgate0", DEFAULT_HOLD_DOWN));

    let text = format!("{GOOD}\n[announce]\nenabled = true\ninterface = \"vips\"\nkind = \"ifb\"\nhold_down = 2.5\n");
    let c = parse(&text).unwrap();
    assert_eq!(
        c.announce,
        AnnounceSettings {
            enabled: true,
            interface: "vips".to_owned(),
            kind: InterfaceKind::Ifb,
            hold_down: std::time::Duration::from_millis(2500)
        }
    );
    let c = parse(&format!("{GOOD}\n[announce]\nhold_down = 0\n")).unwrap();
    assert_eq!(c.announce.hold_down, std::time::Duration::ZERO);

    let line = GOOD.lines().count() + 3;
    for (body, field, reason) in [
        ("interface = \"\"", "announce.interface", "must not be empty"),
        ("interface = \"a-very-long-name0\"", "announce.interface", "longer than 15 bytes"),
        ("interface = \"a/b\"", "announce.interface", "not a valid interface name"),
        ("kind = \"veth\"", "announce.kind", "not an interface kind"),
        ("hold_down = -1", "announce.hold_down", "not from 0 to 3600 seconds"),
        ("hold_down = 3601", "announce.hold_down", "not from 0 to 3600 seconds"),
        ("hold_down = nan", "announce.hold_down", "not from 0 to 3600 seconds"),
    ] {
        let err = parse(&format!("{GOOD}\n[announce]\n{body}\n")).expect_err(body);
        match &err {
            ConfigError::Invalid { line: l, field: f, reason: r, .. } => {
                assert_eq!((*l, f.as_str()), (line, field), "{body}: {err}");
                assert!(r.contains(reason), "{body}: {err}");
            }
            other => panic!("{body}: expected Invalid, got {other:?}"),
        }
    }
    let err = parse(&format!("{GOOD}\n[announce]\nhold_down_s = 3\n")).unwrap_err().to_string();
    assert!(err.contains("unknown field `hold_down_s`"), "{err}");
}

#[test]
fn announce_can_change_on_reload() {
    let old = parse(GOOD).unwrap();
    let new = parse(&format!("{GOOD}\n[announce]\nenabled = true\nhold_down = 1\n")).unwrap();
    assert_eq!(old.restart_required(&new), None);
}

#[test]
fn vip_eligibility_needs_one_backend_that_takes_new_flows_in_any_service_of_the_vip() {
    use crate::state::{AdminState, BackendState, DesiredState, ModeState, ProtocolState, RemovalState, ServiceState};
    use std::net::Ipv4Addr;
    let config = parse(GOOD).unwrap();
    let backend = |last: u8, weight: u32, admin_state: AdminState| BackendState {
        address: Ipv4Addr::new(198, 18, 1, last),
        port: 8080,
        weight,
        admin_state,
    };
    let service = |name: &str, vip: Ipv4Addr, port: u16, backends: Vec<BackendState>| ServiceState {
        name: name.to_owned(),
        vip,
        port,
        protocol: ProtocolState::Tcp,
        mode: ModeState::Nat,
        table_size: 251,
        on_backend_removal: RemovalState::Rehash,
        backends,
        health_check: None,
        new_flow_limit: None,
        source_ranges: Vec::new(),
        affinity: Default::default(),
        owner: crate::state::DEFAULT_OWNER.to_owned(),
    };
    let none = std::collections::HashSet::new();
    let (a, b, c) = (Ipv4Addr::new(198, 18, 101, 1), Ipv4Addr::new(198, 18, 101, 2), Ipv4Addr::new(198, 18, 101, 3));
    let mut dynamic = DesiredState::default();
    for s in [
        // Two services share VIP a: one without a live backend is enough.
        service("a-web", a, 80, vec![backend(20, 0, AdminState::Enabled), backend(21, 5, AdminState::Draining)]),
        service("a-alt", a, 81, vec![backend(22, 1, AdminState::Enabled)]),
        service("b-web", b, 80, vec![backend(23, 1, AdminState::Disabled), backend(24, 1, AdminState::Draining)]),
        service("c-web", c, 80, vec![]),
    ] {
        dynamic.services.insert(s.name.clone(), s);
    }
    let e = crate::announce::eligibility(&config, &dynamic, &none);
    let expected: std::collections::BTreeMap<Ipv4Addr, bool> =
        [(Ipv4Addr::new(198, 18, 100, 1), true), (a, true), (b, false), (c, false)].into_iter().collect();
    assert_eq!(e, expected);
    let live = crate::announce::backends_taking_new_flows(&config, &dynamic, &none);
    let a_web = live.iter().find(|s| s.service == "a-web").unwrap();
    assert!(a_web.taking_new_flows.is_empty(), "weight 0 and draining take no new flows");
    let web = live.iter().find(|s| s.service == "web").unwrap();
    assert_eq!(web.taking_new_flows.len(), 2, "static backends, weights 1 and 3");
    // The only live backend of VIP a fails its health check: a goes.
    let down = std::collections::HashSet::from([crate::health::TargetKey {
        service: "a-alt".to_owned(),
        address: Ipv4Addr::new(198, 18, 1, 22),
        port: 8080,
    }]);
    assert!(!crate::announce::eligibility(&config, &dynamic, &down)[&a], "down takes no new flows");
    assert!(crate::announce::eligibility(&config, &dynamic, &down)[&Ipv4Addr::new(198, 18, 100, 1)]);
    dynamic.services.remove("a-alt");
    assert!(!crate::announce::eligibility(&config, &dynamic, &none)[&a]);
}

#[test]
fn kernel_interfaces_default_to_the_port_name_and_can_be_named_or_turned_off() {
    let c = parse(GOOD).unwrap();
    let names: Vec<Option<&str>> = c.dataplane.ports.iter().map(|p| p.kernel_interface.as_deref()).collect();
    assert_eq!(names, [Some("client"), Some("backend")]);
    let with = |k: &str| {
        GOOD.replacen(
            "addresses = [\"198.18.1.1/24\"]",
            &format!("addresses = [\"198.18.1.1/24\"]\nkernel_interface = {k}"),
            1,
        )
    };
    let c = parse(&with("\"uplink.0\"")).unwrap();
    assert_eq!(c.dataplane.ports[1].kernel_interface.as_deref(), Some("uplink.0"));
    let c = parse(&with("\"\"")).unwrap();
    assert_eq!(c.dataplane.ports[1].kernel_interface, None);
    for (bad, reason) in [
        ("\"sixteen-bytes-xx\"", "not 1 to 15 bytes"),
        ("\"a b\"", "contains ' '"),
        ("\"a/b\"", "contains '/'"),
        ("\"..\"", "not a usable interface name"),
        ("\"client\"", "already the kernel interface of ports[0]"),
        ("\"vgt-c\"", "is the interface of ports[0]'s device"),
    ] {
        let err = parse(&with(bad)).unwrap_err().to_string();
        assert!(err.starts_with("/etc/vipgate/test.toml:26: ports[1].kernel_interface: "), "{bad}: {err}");
        assert!(err.contains(reason), "{bad}: {err}");
    }
    // A port name too long for the default name: the error says what to do.
    let long = GOOD.replacen("name = \"backend\"", "name = \"backend-uplink-22\"", 1);
    let err = parse(&long).unwrap_err().to_string();
    assert!(
        err.contains("ports[1].kernel_interface: the default kernel interface name is the port's name, which is not usable: \"backend-uplink-22\" is not 1 to 15 bytes")
            && err.contains("set kernel_interface to a name of your own, or to \"\" for none"),
        "{err}"
    );
    // Fixed at start, like the rest of a port.
    let edited = with("\"other\"");
    assert_eq!(
        restart_required(&edited).as_deref(),
        Some("ports[1].kernel_interface changed from \"backend\" to \"other\"")
    );
}

#[test]
fn uplinks_are_the_ports_marked_so_and_none_by_default() {
    assert!(parse(GOOD).unwrap().uplinks.is_empty());
    let marked = GOOD.replacen("addresses = [\"198.18.0.1/24\"]", "addresses = [\"198.18.0.1/24\"]\nuplink = true", 1);
    let c = parse(&marked).unwrap();
    assert_eq!(c.uplinks, ["client".to_owned()].into());
    let err = parse(&marked.replace("uplink = true", "uplink = \"yes\"")).unwrap_err().to_string();
    assert!(err.contains("invalid type: string \"yes\", expected a boolean"), "{err}");
    // Fixed at start, like the rest of a port.
    assert_eq!(restart_required(&marked).as_deref(), Some("ports[0].uplink changed from false to true"));
}

/// The line, field and reason of a file refused as invalid.
fn refused(text: &str) -> (usize, String, String) {
    match parse(text) {
        Err(ConfigError::Invalid { line, field, reason, .. }) => (line, field, reason),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn every_duration_and_size_is_bounded_and_the_error_gives_the_bound() {
    let dp = |keys: &str| GOOD.replacen("idle_sleep_us = 20", keys, 1);
    let timeouts = |keys: &str| GOOD.replacen("udp = 60", keys, 1);
    let eal = |keys: &str| GOOD.replacen("hugepages = false", &format!("hugepages = false\n{keys}"), 1);
    let cases: Vec<(String, usize, &str, &str)> = vec![
        (dp("idle_sleep_us = 4294967295"), 8, "dataplane.idle_sleep_us", "4294967295 is above the maximum 1000 (1 ms)"),
        (dp("idle_sleep_us = 1001"), 8, "dataplane.idle_sleep_us", "1001 is above the maximum 1000"),
        (dp("mbufs = 4294967295"), 8, "dataplane.mbufs", "4294967295 is above the maximum 1048575"),
        (dp("mbufs = 1000"), 8, "dataplane.mbufs", "1000 is below the minimum 1024"),
        (dp("mbuf_cache = 513"), 8, "dataplane.mbuf_cache", "513 is above the maximum 512"),
        (dp("neighbour_capacity = 4294967295"), 8, "dataplane.neighbour_capacity", "is above the maximum 1048576"),
        (dp("neighbour_capacity = 8"), 8, "dataplane.neighbour_capacity", "8 is below the minimum 16"),
        (eal("memory_mb = 4294967295"), 5, "eal.memory_mb", "4294967295 is above the maximum 1048576 (1 TiB)"),
        (eal("memory_mb = 63"), 5, "eal.memory_mb", "63 is below the minimum 64"),
        (eal("control_plane_nice = -21"), 5, "eal.control_plane_nice", "-21 is outside -20 to 0"),
        (eal("control_plane_nice = 5"), 5, "eal.control_plane_nice", "5 is outside -20 to 0: the control plane runs"),
        (timeouts("udp = 0"), 12, "dataplane.timeouts.udp", "0 is below the minimum 1"),
        (timeouts("udp = 2246401"), 12, "dataplane.timeouts.udp", "2246401 is above the maximum 2246400 (26 days)"),
        (timeouts("tcp_syn = 3601"), 12, "dataplane.timeouts.tcp_syn", "3601 is above the maximum 3600 (1 hour)"),
        (timeouts("tcp_closing = 86400"), 12, "dataplane.timeouts.tcp_closing", "is above the maximum 3600"),
        (timeouts("tcp_reset = 86400"), 12, "dataplane.timeouts.tcp_reset", "is above the maximum 3600"),
    ];
    for (text, line, field, reason) in &cases {
        let (l, f, r) = refused(text);
        assert_eq!((l, f.as_str()), (*line, *field), "{r}");
        assert!(r.contains(reason), "wanted {reason:?} in {r:?}");
    }
    // Each maximum itself is accepted.
    let c = parse(&dp("idle_sleep_us = 1000\nmbufs = 1048575\nneighbour_capacity = 1048576")).unwrap();
    assert_eq!((c.dataplane.idle_sleep_us, c.dataplane.mbufs), (1000, 1_048_575));
    parse(&timeouts("udp = 2246400\ntcp_syn = 3600\ntcp_closing = 3600\ntcp_reset = 3600\ntcp_established = 2246400"))
        .unwrap();
    parse(&eal("memory_mb = 1048576")).unwrap();
    // The control plane's nice value: -10 unless set; both ends accepted.
    assert_eq!(parse(GOOD).unwrap().control_plane_nice, -10);
    assert_eq!(parse(&eal("control_plane_nice = -20")).unwrap().control_plane_nice, -20);
    assert_eq!(parse(&eal("control_plane_nice = 0")).unwrap().control_plane_nice, 0);
    // The command line shows the same message.
    let msg = parse(&dp("idle_sleep_us = 4294967295")).unwrap_err().to_string();
    assert_eq!(msg, "/etc/vipgate/test.toml:8: dataplane.idle_sleep_us: 4294967295 is above the maximum 1000 (1 ms)");
}

#[test]
fn two_ports_on_one_tap_interface_are_refused_naming_both() {
    let text = GOOD.replacen("device = \"0000:03:00.1\"", "device = \"net_tap1,iface=vgt-c\"", 1);
    let (line, field, reason) = refused(&text);
    assert_eq!((line, field.as_str()), (24, "ports[1].device"), "{reason}");
    assert!(
        reason.contains("port \"backend\"") && reason.contains("ports[0] (\"client\")") && reason.contains("\"vgt-c\""),
        "{reason}"
    );
    // The same device twice names both ports too.
    let text = GOOD.replacen("device = \"0000:03:00.1\"", "device = \"net_tap0,iface=other\"", 1);
    let (_, field, reason) = refused(&text);
    assert_eq!(field, "ports[1].device");
    assert!(reason.contains("ports[0] (\"client\")"), "{reason}");
    // A PCI address written twice, once short: one device.
    let text = GOOD.replacen("device = \"net_tap0,iface=vgt-c\"", "device = \"03:00.1\"", 1);
    let (_, field, reason) = refused(&text);
    assert_eq!(field, "ports[1].device");
    assert!(reason.contains("ports[0] (\"client\")"), "{reason}");
    // Taps on interfaces of their own are fine.
    parse(&GOOD.replacen("device = \"0000:03:00.1\"", "device = \"net_tap1,iface=vgt-b\"", 1)).unwrap();
}

#[test]
fn a_conflict_names_the_later_service_by_its_field_and_the_earlier_by_name() {
    // The file's order decides, not the names' order.
    let text = GOOD
        .replacen("name = \"web\"", "name = \"zz-existing\"", 1)
        .replacen("name = \"dns\"", "name = \"aa-new\"", 1)
        .replacen("port = 53\nprotocol = \"UDP\"", "port = 80\nprotocol = \"tcp\"", 1);
    let msg = parse(&text).unwrap_err().to_string();
    assert!(
        msg.contains("services[1].port: 198.18.100.1:80/tcp is already served by service \"zz-existing\""),
        "{msg}"
    );
}

#[test]
fn a_health_check_of_the_other_protocol_needs_a_port() {
    // dns is UDP: a tcp, http or https check of its own port can only fail.
    for kind in ["tcp", "http", "https"] {
        let text = HEALTH.replacen(
            "kind = \"udp\"\npayload_hex = \"00 01\"\nexpect_reply = \"ok\"",
            &format!("kind = \"{kind}\""),
            1,
        );
        let (line, field, reason) = refused(&text);
        assert_eq!((line, field.as_str()), (35, "services[1].health_check.kind"), "{reason}");
        assert!(
            reason.contains(&format!("\"{kind}\" probes over TCP, but service \"dns\" is udp"))
                && reason.contains("kind = \"udp\" with a payload")
                && reason.contains("set port"),
            "{reason}"
        );
        // With a port of its own (a TCP port the backends listen on), it is
        // a check of that port.
        let with_port = HEALTH.replacen(
            "kind = \"udp\"\npayload_hex = \"00 01\"\nexpect_reply = \"ok\"",
            &format!("kind = \"{kind}\"\nport = 8053"),
            1,
        );
        parse(&with_port).unwrap();
    }
    // web is TCP: a udp check of its port can only fail.
    let text = HEALTH.replacen(
        "kind = \"http\"\ninterval_ms = 200\ntimeout_ms = 100\nrise = 2\nfall = 2\npath = \"/healthz\"\nexpect_status = \"200-299,301\"",
        "kind = \"udp\"\npayload = \"ping\"",
        1,
    );
    let (line, field, reason) = refused(&text);
    assert_eq!((line, field.as_str()), (19, "services[0].health_check.kind"), "{reason}");
    assert!(reason.contains("\"udp\" probes over UDP, but service \"web\" is tcp"), "{reason}");
    assert!(reason.contains("kind = \"tcp\", \"http\" or \"https\""), "{reason}");
    parse(&text.replacen("payload = \"ping\"", "payload = \"ping\"\nport = 7", 1)).unwrap();
}

#[test]
fn service_and_pool_names_follow_the_api_rule() {
    for (bad, reason) in [
        ("\"wéb 😀\"", "use letters, digits"),
        ("\"a\\u0000b\"", "use letters, digits"),
        ("\"a\\nb\"", "use letters, digits"),
        ("\".\"", "\".\" is not a usable name"),
        ("\"..\"", "\"..\" is not a usable name"),
        (&format!("\"{}\"", "a".repeat(254)), "at most 253"),
    ] {
        let text = GOOD.replacen("name = \"web\"", &format!("name = {bad}"), 1);
        let (line, field, r) = refused(&text);
        assert_eq!((line, field.as_str()), (32, "services[0].name"), "{bad}: {r}");
        assert!(r.contains(reason), "{bad}: {r}");
    }
    let (line, field, r) = refused(&MODES.replacen("name = \"snat\"", "name = \"..\"", 1));
    assert_eq!((line, field.as_str()), (17, "source_pools[0].name"), "{r}");
    assert!(r.contains("not a usable name"), "{r}");
}

#[test]
fn a_sub_table_of_services_before_any_service_says_where_it_belongs() {
    let text = GOOD.replacen(
        "[[services]]\nname = \"web\"",
        "[services.health_check]\nkind = \"tcp\"\n\n[[services]]\nname = \"web\"",
        1,
    );
    let msg = parse(&text).unwrap_err().to_string();
    assert_eq!(
        msg,
        "/etc/vipgate/test.toml:31: [services.health_check]: must follow the [[services]] entry it belongs to (it applies to the service above it); it comes before any [[services]]"
    );
    // No service at all: the same.
    let text = format!("{}\n[services.health_check]\nkind = \"tcp\"\n", GOOD.split("[[services]]").next().unwrap());
    let msg = parse(&text).unwrap_err().to_string();
    assert!(msg.starts_with("/etc/vipgate/test.toml:32: [services.health_check]: must follow"), "{msg}");
}

#[test]
fn at_most_65535_backends_per_service() {
    let backends = |n: usize| {
        (0..n)
            .map(|i| format!("{{ address = \"198.19.{}.{}\", port = {} }}", i / 500, 1 + i / 2 % 250, 80 + i % 2))
            .collect::<Vec<_>>()
    };
    let text = |n: usize| {
        GOOD.replacen("table_size = 251", "table_size = 655373", 1).replacen(
            "backends = [ { address = \"198.18.1.11\", port = 53 } ]",
            &format!("backends = [\n{}\n]", backends(n).join(",\n")),
            1,
        )
    };
    // Named at the first backend beyond the limit, on line 49 + 65535.
    let (line, field, reason) = refused(&text(65_536));
    assert_eq!((line, field.as_str()), (65_584, "services[1].backends"), "{reason}");
    assert_eq!(reason, "65536 backends; at most 65535 per service");
    parse(&text(65_535)).unwrap();
}

#[test]
fn a_vip_or_backend_on_a_subnets_network_or_broadcast_address_is_refused() {
    let cases = [
        ("vip = \"198.18.100.1\"\nport = 80", "vip = \"198.18.1.255\"\nport = 80", 33, "services[0].vip"),
        ("vip = \"198.18.100.1\"\nport = 80", "vip = \"198.18.1.0\"\nport = 80", 33, "services[0].vip"),
        (
            "{ address = \"198.18.1.11\", port = 8080 }",
            "{ address = \"198.18.1.255\", port = 8080 }",
            37,
            "services[0].backends[0].address",
        ),
        (
            "{ address = \"198.18.1.11\", port = 8080 }",
            "{ address = \"198.18.1.0\", port = 8080 }",
            37,
            "services[0].backends[0].address",
        ),
    ];
    for (from, to, line, field) in cases {
        let (l, f, r) = refused(&GOOD.replacen(from, to, 1));
        assert_eq!((l, f.as_str()), (line, field), "{to}: {r}");
        assert!(
            r.contains("the network address of 198.18.1.0/24 on port \"backend\"")
                || r.contains("the broadcast address of 198.18.1.0/24 on port \"backend\""),
            "{to}: {r}"
        );
    }
}

#[test]
fn at_most_65535_addresses_per_source_pool() {
    let pool = |n: u32| {
        let addresses: Vec<String> = (0..n).map(|i| format!("\"{}\"", Ipv4Addr::from(0xC613_0001 + i))).collect();
        MODES.replacen(
            "addresses = [\"198.18.1.100\", \"198.18.1.101\"]",
            &format!("addresses = [{}]", addresses.join(", ")),
            1,
        )
    };
    let (line, field, reason) = refused(&pool(65_536));
    assert_eq!((line, field.as_str()), (18, "source_pools[0].addresses"), "{reason}");
    assert_eq!(reason, "65536 addresses; at most 65535 per source pool");
    parse(&pool(65_535)).unwrap();
}

#[test]
fn a_new_flow_limit_compiles_with_its_defaults() {
    use vipgate_dataplane::admission::NewFlowLimit;
    let limited = |limit: &str| GOOD.replacen("protocol = \"tcp\"", &format!("protocol = \"tcp\"\n{limit}"), 1);
    let c = parse(&limited("new_flow_limit = { per_second = 100, burst = 200, prefix_len = 24 }")).unwrap();
    assert_eq!(
        c.services()[0].new_flow_limit,
        Some(NewFlowLimit { per_second: 100, burst: 200, prefix_len: 24 }.into())
    );
    assert_eq!(c.services()[1].new_flow_limit, None);
    // burst defaults to a second's worth, prefix_len to 32.
    let c = parse(&limited("new_flow_limit = { per_second = 50 }")).unwrap();
    assert_eq!(c.services()[0].new_flow_limit, Some(NewFlowLimit { per_second: 50, burst: 50, prefix_len: 32 }.into()));
    // As a table of its own, and /0: all clients together.
    let c = parse(&GOOD.replacen(
        "[[services]]\nname = \"dns\"",
        "[services.new_flow_limit]\nper_second = 1000000\nburst = 1\nprefix_len = 0\n\n[[services]]\nname = \"dns\"",
        1,
    ))
    .unwrap();
    assert_eq!(
        c.services()[0].new_flow_limit,
        Some(NewFlowLimit { per_second: 1_000_000, burst: 1, prefix_len: 0 }.into())
    );
    // A change of the limit is a change of the service: a reload applies it.
    let old = parse(GOOD).unwrap();
    assert!(old.restart_required(&c).is_none());
}

#[test]
fn a_bad_new_flow_limit_names_line_field_and_reason() {
    let cases = [
        ("{ per_second = 0 }", "new_flow_limit.per_second", "0 is not from 1 to 1000000"),
        ("{ per_second = 1000001 }", "new_flow_limit.per_second", "1000001 is not from 1 to 1000000"),
        ("{ per_second = -5 }", "new_flow_limit.per_second", "-5 is not from 1 to 1000000"),
        ("{ per_second = 10, burst = 0 }", "new_flow_limit.burst", "0 is not from 1 to 1000000"),
        ("{ per_second = 10, burst = 5000000000 }", "new_flow_limit.burst", "5000000000 is not from 1 to 1000000"),
        ("{ per_second = 10, prefix_len = 33 }", "new_flow_limit.prefix_len", "33 is not a prefix length from 0 to 32"),
        ("{ per_second = 10, prefix_len = -1 }", "new_flow_limit.prefix_len", "-1 is not a prefix length"),
    ];
    for (value, field, reason) in cases {
        let text = GOOD.replacen("protocol = \"tcp\"", &format!("protocol = \"tcp\"\nnew_flow_limit = {value}"), 1);
        let line = text[..text.find("new_flow_limit").unwrap()].lines().count() + 1;
        let msg = parse(&text).expect_err(value).to_string();
        assert!(
            msg.starts_with(&format!("/etc/vipgate/test.toml:{line}: services[0].{field}: {reason}")),
            "{value}: {msg}"
        );
    }
    // Unknown and missing keys are schema errors, with the line.
    for (value, what) in
        [("{ per_second = 10, rate = 3 }", "unknown field `rate`"), ("{ burst = 3 }", "missing field `per_second`")]
    {
        let text = GOOD.replacen("protocol = \"tcp\"", &format!("protocol = \"tcp\"\nnew_flow_limit = {value}"), 1);
        let line = text[..text.find("new_flow_limit").unwrap()].lines().count() + 1;
        let msg = parse(&text).expect_err(value).to_string();
        assert!(msg.starts_with("/etc/vipgate/test.toml: ") && msg.contains(&format!("line {line}")), "{msg}");
        assert!(msg.contains(what), "{msg}");
    }
}

#[test]
fn source_ranges_and_affinity_compile_into_the_spec() {
    use vipgate_dataplane::snapshot::{Affinity, Ipv4Cidr};
    let with = |opts: &str| GOOD.replacen("protocol = \"tcp\"", &format!("protocol = \"tcp\"\n{opts}"), 1);
    let c = parse(&with("source_ranges = [\"203.0.113.0/24\", \" 198.18.0.0/15 \", \"192.0.2.7/32\", \"0.0.0.0/0\"]\naffinity = \"client_ip\"")).unwrap();
    let s = &c.services()[0];
    assert_eq!(
        s.source_ranges.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["203.0.113.0/24", "198.18.0.0/15", "192.0.2.7/32", "0.0.0.0/0"]
    );
    assert_eq!(s.affinity, AffinityState::ClientIp);
    let spec = c.snapshot_spec(&[]);
    let web = spec.services.iter().find(|x| x.name == s.name).unwrap();
    assert_eq!(web.source_ranges[0], Ipv4Cidr { addr: u32::from(Ipv4Addr::new(203, 0, 113, 0)), len: 24 });
    assert_eq!(web.affinity, Affinity::ClientIp);
    // Left out: every client, the 5-tuple.
    assert!(c.services()[1].source_ranges.is_empty());
    assert_eq!(c.services()[1].affinity, AffinityState::None);
    let c = parse(&with("affinity = \"none\"\nsource_ranges = []")).unwrap();
    assert_eq!((c.services()[0].affinity, c.services()[0].source_ranges.len()), (AffinityState::None, 0));
    // A change of either is a change of the service: a reload applies it.
    assert!(parse(GOOD).unwrap().restart_required(&c).is_none());
}

#[test]
fn bad_source_ranges_and_affinity_name_line_field_and_reason() {
    let too_many = format!("source_ranges = [{}]", vec!["\"10.0.0.0/8\""; 257].join(",\n"));
    let cases: [(&str, &str, &str, &str); 9] = [
        (
            "source_ranges = [\"10.0.0.0/8\", \"10.1.2.3\"]",
            "10.1.2.3",
            "source_ranges[1]",
            "\"10.1.2.3\" needs a prefix length",
        ),
        (
            "source_ranges = [\"10.0.0.0/33\"]",
            "10.0.0.0/33",
            "source_ranges[0]",
            "prefix length \"33\" is not a number from 0 to 32",
        ),
        ("source_ranges = [\"10.0.0/8\"]", "10.0.0/8", "source_ranges[0]", "\"10.0.0\" is not an IPv4 address"),
        ("source_ranges = [\"\"]", "source_ranges = [", "source_ranges[0]", "\"\" needs a prefix length"),
        (
            "source_ranges = [\"198.18.0.0/15\",\n\"198.18.5.7/24\"]",
            "198.18.5.7/24",
            "source_ranges[1]",
            "\"198.18.5.7/24\" has host bits set; the prefix is 198.18.5.0/24",
        ),
        (&too_many, "\"10.0.0.0/8\"];", "source_ranges", "257 prefixes; at most 256 per service"),
        ("affinity = \"ClientIP\"", "affinity", "affinity", "\"ClientIP\" is not \"none\" or \"client_ip\""),
        ("affinity = \"\"", "affinity", "affinity", "\"\" is not \"none\" or \"client_ip\""),
        ("affinity = \"source\"", "affinity", "affinity", "\"source\" is not \"none\" or \"client_ip\""),
    ];
    for (opts, at, field, reason) in cases {
        let text = GOOD.replacen("protocol = \"tcp\"", &format!("protocol = \"tcp\"\n{opts}"), 1);
        // The line of the offending value: the last element for a list too long.
        let pos = if field == "source_ranges" { text.rfind("\"10.0.0.0/8\"").unwrap() } else { text.find(at).unwrap() };
        let line = text[..pos].lines().count() + usize::from(text[..pos].ends_with('\n'));
        let msg = parse(&text).expect_err(opts).to_string();
        assert!(
            msg.starts_with(&format!("/etc/vipgate/test.toml:{line}: services[0].{field}: {reason}")),
            "{field}: {msg}"
        );
    }
    // 256 is the bound, not more than it.
    let text = GOOD.replacen(
        "protocol = \"tcp\"",
        &format!("protocol = \"tcp\"\nsource_ranges = [{}]", vec!["\"10.0.0.0/8\""; 256].join(", ")),
        1,
    );
    assert_eq!(parse(&text).unwrap().services()[0].source_ranges.len(), 256);
}

/// [`GOOD`] with `vlans` inserted after the ports.
fn with_vlans(vlans: &str) -> String {
    GOOD.replacen("[[routes]]", &format!("{vlans}\n[[routes]]"), 1)
}

const TWO_VLANS: &str = r#"
[[vlans]]
name = "c100"
port = "client"
id = 100
addresses = ["198.18.10.1/24"]

[[vlans]]
name = "b200"
port = "backend"
id = 200
addresses = ["198.18.20.1/24"]
mtu = 1400
kernel_interface = ""
"#;

#[test]
fn vlans_become_interfaces_after_the_ports() {
    let c = parse(&with_vlans(TWO_VLANS)).unwrap();
    let spec = c.snapshot_spec(&[EthernetAddress([2, 0, 0, 0, 0, 1]), EthernetAddress([2, 0, 0, 0, 0, 2])]);
    let names: Vec<&str> = spec.ports.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["client", "backend", "c100", "b200"]);
    assert_eq!(spec.ports[2].vlan, Some(VlanSpec { port: 0, id: 100 }));
    assert_eq!((spec.ports[3].vlan, spec.ports[3].mtu), (Some(VlanSpec { port: 1, id: 200 }), 1400));
    assert_eq!(spec.ports[2].mtu, 1500, "the carrying port's MTU by default");
    // Only the [[ports]] are devices.
    assert_eq!(c.dataplane.ports.len(), 2);
    // The client port has a kernel interface: its VLAN gets one, named as
    // the VLAN; the other VLAN asked for none.
    let kernel: Vec<Option<&str>> = c.vlans.iter().map(|v| v.kernel_interface.as_deref()).collect();
    assert_eq!(kernel, [Some("c100"), None]);
    assert_eq!((c.vlans[0].port, c.vlans[0].id), (0, 100));
    // The snapshot compiles: each VLAN has its carrying port's MAC.
    let snap = Snapshot::build(&spec).unwrap();
    assert_eq!(snap.ports()[2].mac, EthernetAddress([2, 0, 0, 0, 0, 1]));
    // A backend on a VLAN's subnet is on link.
    let on_vlan = with_vlans(TWO_VLANS).replace("198.18.1.12", "198.18.20.12");
    parse(&on_vlan).unwrap();
    // Fixed at start.
    let running = parse(&with_vlans(TWO_VLANS)).unwrap();
    let edited = parse(&with_vlans(&TWO_VLANS.replace("id = 100", "id = 101"))).unwrap();
    let e = running.restart_required(&edited).map(|e| e.to_string());
    assert_eq!(e.as_deref(), Some("vlans[0].id changed from 100 to 101"));
}

#[test]
fn bad_vlans_name_line_field_and_reason() {
    let cases: Vec<(String, &str, &str)> = vec![
        (
            TWO_VLANS.replace("port = \"client\"", "port = \"uplink\""),
            "vlans[0].port",
            "no [[ports]] entry is named \"uplink\"",
        ),
        (TWO_VLANS.replace("id = 100", "id = 4095"), "vlans[0].id", "4095 is not a VLAN id from 1 to 4094"),
        (TWO_VLANS.replace("id = 100", "id = 0"), "vlans[0].id", "0 is not a VLAN id from 1 to 4094"),
        (
            TWO_VLANS.replace("port = \"backend\"\nid = 200", "port = \"client\"\nid = 100"),
            "vlans[1].id",
            "VLAN 100 on port \"client\" is already vlans[0] (\"c100\")",
        ),
        (
            TWO_VLANS.replace("name = \"b200\"", "name = \"client\""),
            "vlans[1].name",
            "another port or VLAN is already named \"client\"",
        ),
        (
            TWO_VLANS.replace("198.18.20.1/24", "198.18.1.9/24"),
            "vlans[1].addresses[0]",
            "overlaps 198.18.1.1/24 on \"backend\"",
        ),
        (TWO_VLANS.replace("mtu = 1400", "mtu = 1600"), "vlans[1].mtu", "1600 is not from 576 to 1500"),
        (
            TWO_VLANS.replace("addresses = [\"198.18.10.1/24\"]\n", ""),
            "vlans[0].addresses",
            "needs at least one address",
        ),
        (
            TWO_VLANS.replace("name = \"c100\"", "name = \"c100\"\nkernel_interface = \"client\""),
            "vlans[0].kernel_interface",
            "\"client\" is already another port's or VLAN's kernel interface",
        ),
    ];
    for (vlans, field, reason) in cases {
        let (_, f, r) = refused(&with_vlans(&vlans));
        assert_eq!(f, field, "{r}");
        assert!(r.contains(reason), "{field}: {r}");
    }
    // A kernel interface for a VLAN whose port has none.
    let no_kernel = with_vlans(&TWO_VLANS.replace("kernel_interface = \"\"", "kernel_interface = \"vb200\""))
        .replace("device = \"0000:03:00.1\"", "device = \"0000:03:00.1\"\nkernel_interface = \"\"");
    let (_, f, r) = refused(&no_kernel);
    assert_eq!(f, "vlans[1].kernel_interface");
    assert!(r.contains("port \"backend\" has no kernel interface"), "{r}");
}

/// GOOD with its backend port (line 24, `device = "0000:03:00.1"`) made of
/// `port`: one or more lines in its place.
fn backend_port(port: &str) -> String {
    GOOD.replacen("device = \"0000:03:00.1\"", port, 1)
}

const BOND: &str = "bond = { members = [\"net_tap1,iface=vgt-b0\", \"net_tap2,iface=vgt-b1\"], mode = \"802.3ad\" }";

#[test]
fn a_bond_port_probes_its_members_and_is_an_ordinary_port_to_the_rest() {
    let c = parse(&backend_port(BOND)).unwrap();
    let p = &c.dataplane.ports[1];
    assert_eq!((p.name.as_str(), p.device.as_str(), p.mtu), ("backend", "net_bonding1", 1500));
    assert_eq!(
        p.bond,
        Some(BondConfig {
            members: vec!["net_tap1".to_owned(), "net_tap2".to_owned()],
            transmit_hash: TransmitHash::Layer34
        })
    );
    assert_eq!(p.kernel_interface.as_deref(), Some("backend"));
    assert_eq!(c.dataplane.ports[0].bond, None);
    // EAL probes the members (the bond is made at start), in order.
    let vdevs: Vec<&str> = c.eal_args.windows(2).filter(|w| w[0] == "--vdev").map(|w| w[1].as_str()).collect();
    assert_eq!(vdevs, ["net_tap0,iface=vgt-c", "net_tap1,iface=vgt-b0", "net_tap2,iface=vgt-b1"]);
    assert!(c.eal_args.contains(&"--no-pci".to_owned()), "{:?}", c.eal_args);
    assert_eq!(c.devices.len(), 3);
    assert!(matches!(&c.port_devices[1], PortDevice::Bond { members, .. } if members.len() == 2));
    // Its addresses and MTU are the port's, as for any port.
    assert_eq!(c.ports()[1].addresses.len(), 1);

    let layer2 = BOND.replace("mode = \"802.3ad\"", "mode = \"802.3ad\", transmit_hash = \"layer2\"");
    let c = parse(&backend_port(&layer2)).unwrap();
    assert_eq!(c.dataplane.ports[1].bond.as_ref().unwrap().transmit_hash, TransmitHash::Layer2);

    // A bond's members are fixed at start, like a device.
    let three = BOND.replace("\"net_tap2,iface=vgt-b1\"", "\"net_tap2,iface=vgt-b1\", \"net_tap3,iface=vgt-b2\"");
    let mut was = backend_port(BOND);
    was.push('\n');
    let edited = backend_port(&three);
    let old = parse(&was).unwrap();
    let change = old.restart_required(&parse(&edited).unwrap()).map(|r| r.to_string()).unwrap();
    assert!(change.contains("ports[1].bond changed"), "{change}");
    assert!(change.contains("net_tap3,iface=vgt-b2"), "{change}");
}

#[test]
fn every_bad_bond_names_its_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "device = \"0000:03:00.1\"\nbond = { members = [\"net_null1\", \"net_null2\"], mode = \"802.3ad\" }",
            "ports[1].bond",
            "set device or bond, not both",
        ),
        ("", "ports[1].device", "missing: set device (one device), or bond"),
        (
            "bond = { members = [\"net_null1\", \"net_null2\"] }",
            "ports[1].bond.mode",
            "missing; the only mode is \"802.3ad\"",
        ),
        (
            "bond = { members = [\"net_null1\", \"net_null2\"], mode = \"active-backup\" }",
            "ports[1].bond.mode",
            "\"active-backup\" is not a supported mode",
        ),
        (
            "bond = { members = [\"net_null1\"], mode = \"802.3ad\" }",
            "ports[1].bond.members",
            "at least two members, 1 given",
        ),
        ("bond = { mode = \"802.3ad\" }", "ports[1].bond.members", "at least two members, 0 given"),
        (
            "bond = { members = [\"net_null1\", \"eth0\"], mode = \"802.3ad\" }",
            "ports[1].bond.members[1]",
            "neither a virtual device",
        ),
        (
            "bond = { members = [\"net_null1\", \"net_null1,no-rx=1\"], mode = \"802.3ad\" }",
            "ports[1].bond.members[1]",
            "listed twice in port \"backend\"",
        ),
        (
            "bond = { members = [\"net_null1\", \"net_tap0,iface=x\"], mode = \"802.3ad\" }",
            "ports[1].bond.members[1]",
            "used by another port, ports[0]",
        ),
        (
            "bond = { members = [\"net_tap1,iface=vgt-c\", \"net_null2\"], mode = \"802.3ad\" }",
            "ports[1].bond.members[0]",
            "already the interface of ports[0]",
        ),
        (
            "bond = { members = [\"net_tap1,iface=b\", \"net_tap2,iface=b\"], mode = \"802.3ad\" }",
            "ports[1].bond.members[1]",
            "already the interface of another device of this port",
        ),
        (
            "bond = { members = [\"net_null1\", \"net_null2\"], mode = \"802.3ad\", transmit_hash = \"layer3+4\" }",
            "ports[1].bond.transmit_hash",
            "\"layer3+4\" is not one of layer2, layer23, layer34",
        ),
        (
            "device = \"net_bonding0,mode=4,slave=net_null1\"",
            "ports[1].device",
            "give the port bond = { members = [...], mode = \"802.3ad\" } instead",
        ),
        (
            "bond = { members = [\"net_null1\", \"net_bonding3\"], mode = \"802.3ad\" }",
            "ports[1].bond.members[1]",
            "vipgate makes bonds itself",
        ),
    ];
    for (port, field, reason) in cases {
        let (line, f, r) = refused(&backend_port(port));
        assert_eq!(&f, field, "{port}: {r}");
        assert!(r.contains(reason), "{port}: {r}");
        assert!((22..=25).contains(&line), "{port}: line {line}");
    }
    // A key a bond does not have.
    let err = parse(&backend_port(
        "bond = { members = [\"net_null1\", \"net_null2\"], mode = \"802.3ad\", lacp_rate = \"fast\" }",
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("unknown field `lacp_rate`"), "{err}");
    // A bond member's interface is no kernel interface's name either.
    let clash = backend_port("bond = { members = [\"net_tap1,iface=client\", \"net_null2\"], mode = \"802.3ad\" }");
    let (_, f, r) = refused(&clash);
    assert_eq!(f, "ports[0].kernel_interface", "{r}");
    assert!(r.contains("\"client\" is the interface of ports[1].bond.members[0]"), "{r}");
}
