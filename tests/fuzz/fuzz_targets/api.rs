//! Fuzz target: the API's request conversion (`ServiceManager`'s services,
//! source pools and backends into validated state).
//!
//! The request is an `ApplyRequest`, decoded with prost from the input's
//! bytes (first byte even) or built from chosen field values, most of them
//! plausible (first byte odd). For each service, pool and backend:
//! - the conversion never panics; a refusal is INVALID_ARGUMENT (or
//!   UNIMPLEMENTED for per-service flow timeouts) with a message that names
//!   the field;
//! - what is accepted converts back (as `GetState` shows it) and in again
//!   to the same state, and back again to the same message.
//!
//! The accepted objects are then applied to an empty dynamic state over a
//! fixed configuration and compiled: that may refuse them, cleanly, never
//! panic.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::Code;
use vipgate_controlplane::api::fuzzing::{backend_from, pool_from, pool_to, service_from, service_to};
use vipgate_controlplane::api::pb;
use vipgate_controlplane::checks;
use vipgate_controlplane::config::Config;
use vipgate_controlplane::state::{self, DesiredState, ops};
use vipgate_dataplane::wire::EthernetAddress;
use vipgate_fuzz::Input;

const CONFIG: &str = r#"
[eal]
lcores = "0,1,2"

[[ports]]
name = "client"
device = "net_tap0,iface=vgf-c"
addresses = ["198.18.0.1/24"]

[[ports]]
name = "backend"
device = "net_tap1,iface=vgf-b"
addresses = ["198.18.1.1/24"]

[[routes]]
prefix = "198.19.0.0/16"
via = "198.18.0.254"

[[source_pools]]
name = "static-pool"
addresses = ["198.18.1.200"]

[[services]]
name = "static-web"
vip = "198.18.100.1"
port = 80
protocol = "tcp"
backends = [{ address = "198.18.1.11", port = 8080 }]
"#;

const MACS: [EthernetAddress; 2] = [EthernetAddress([2, 0, 0, 0, 0, 1]), EthernetAddress([2, 0, 0, 0, 0, 2])];

fn config() -> &'static Config {
    static CONFIG_ONCE: OnceLock<Config> = OnceLock::new();
    CONFIG_ONCE.get_or_init(|| Config::parse(Path::new("/etc/vipgate/fuzz.toml"), CONFIG).expect("the fixture parses"))
}

/// A string: mostly one of `choices`, else the input's bytes.
fn text(input: &mut Input<'_>, choices: &[&str]) -> String {
    let i = input.u8();
    match choices.get(usize::from(i)) {
        Some(s) => (*s).to_owned(),
        None if i >= 128 => {
            let n = usize::from(input.u8() % 80);
            String::from_utf8_lossy(input.bytes(n)).into_owned()
        }
        None => choices[usize::from(i) % choices.len()].to_owned(),
    }
}

fn number(input: &mut Input<'_>, choices: &[u32]) -> u32 {
    let i = input.u8();
    match choices.get(usize::from(i)) {
        Some(v) => *v,
        None if i >= 128 => input.u32(),
        None => choices[usize::from(i) % choices.len()],
    }
}

const ADDRESSES: &[&str] = &[
    "198.18.1.11",
    "198.18.1.12",
    "198.19.7.7",
    "198.18.100.7",
    "198.18.100.1",
    "198.18.0.1",
    "0.0.0.0",
    "255.255.255.255",
    "127.0.0.1",
    "224.0.0.1",
    "198.18.1",
    "198.18.1.011",
    " 198.18.1.13 ",
    "",
    "203.0.113.5",
    "198.18.1.200",
];

fn backend(input: &mut Input<'_>) -> pb::Backend {
    pb::Backend {
        address: text(input, ADDRESSES),
        port: number(input, &[8080, 80, 53, 0, 65535, 65536]),
        weight: match input.u8() % 4 {
            0 => None,
            1 => Some(0),
            2 => Some(1),
            _ => Some(number(input, &[3, 100, 65535, 1 << 20])),
        },
        admin_state: number(input, &[0, 1, 2, 3, 4]) as i32,
        health: number(input, &[0, 1, 2, 3]) as i32,
        health_reason: String::new(),
    }
}

fn health_check(input: &mut Input<'_>) -> pb::HealthCheck {
    pb::HealthCheck {
        interval_ms: number(input, &[0, 1000, 1, 100_000_000]),
        timeout_ms: number(input, &[0, 500, 2000, 1]),
        port: number(input, &[0, 8080, 70000]),
        kind: text(input, &["", "tcp", "http", "https", "udp", "icmp", "HTTP"]),
        rise: number(input, &[0, 1, 3, 1000]),
        fall: number(input, &[0, 1, 3, 1000]),
        path: text(input, &["", "/", "/health", "health", "/a b"]),
        host: text(input, &["", "example.test", "a\nb"]),
        expect_status: text(input, &["", "200", "200-299", "2xx", "600", "299-200"]),
        payload: {
            let n = usize::from(input.u8() % 4);
            input.bytes(n).to_vec()
        },
        expect_reply: {
            let n = usize::from(input.u8() % 4);
            input.bytes(n).to_vec()
        },
        source: text(input, &["", "198.18.1.1", "198.18.9.9", "x"]),
    }
}

fn service(input: &mut Input<'_>) -> pb::Service {
    let n = usize::from(input.u8() % 5);
    pb::Service {
        name: text(input, &["web", "dns", " web ", "", "static-web", "a.b-c_d", "x y", "名前"]),
        vip: text(input, &["198.18.100.7", "198.18.100.8", "198.18.100.1", "198.18.0.1", "0.0.0.0", "1.2.3.4.5"]),
        port: number(input, &[80, 53, 443, 0, 65535, 65536]),
        protocol: text(input, &["tcp", "udp", "TCP", "", "sctp"]),
        mode: text(input, &["", "nat", "fullnat", "dsr", "NAT"]),
        source_pool: text(input, &["", "pool", "static-pool", "missing"]),
        tunnel_source: text(input, &["", "198.18.1.64/28", "198.18.1.64/33", "198.18.1.64", "x/1"]),
        table_size: number(input, &[0, 251, 65537, 4, 1 << 30, 7]),
        on_backend_removal: text(input, &["", "rehash", "reset", "drop"]),
        backends: (0..n).map(|_| backend(input)).collect(),
        origin: number(input, &[0, 1, 2, 9]) as i32,
        owner: text(input, &["", "cli", "k8s/prod", " k8s/prod ", "a b", "x:y.z_1-2/3"]),
        health_check: input.u8().is_multiple_of(4).then(|| health_check(input)),
        flow_timeouts: (input.u8() == 255).then_some(pb::FlowTimeouts { tcp_established_s: 1, udp_s: 1 }),
        new_flow_limit: input.u8().is_multiple_of(4).then(|| pb::NewFlowLimit {
            per_second: number(input, &[100, 0, 1, 1_000_000, 1_000_001]),
            burst: number(input, &[0, 200, 1, 1_000_001]),
            prefix_len: match input.u8() % 3 {
                0 => None,
                1 => Some(24),
                _ => Some(number(input, &[0, 32, 33, 255])),
            },
        }),
        source_ranges: (0..usize::from(input.u8() % 4))
            .map(|_| text(input, &["198.18.0.0/15", "203.0.113.7/32", "0.0.0.0/0", "10.1.2.3/8", "10.0.0.0", ""]))
            .collect(),
        affinity: text(input, &["", "none", "client_ip", "ClientIP"]),
    }
}

fn pool(input: &mut Input<'_>) -> pb::SourcePool {
    let n = usize::from(input.u8() % 4);
    pb::SourcePool {
        name: text(input, &["pool", "p2", "", "static-pool", " pool"]),
        addresses: (0..n)
            .map(|_| text(input, &["198.18.1.100", "198.18.1.101", "198.18.1.200", "10.0.0.1", ""]))
            .collect(),
        first_port: number(input, &[0, 10000, 1, 65535, 70000]),
        last_port: number(input, &[0, 10999, 1, 65535, 70000]),
        origin: 0,
        owner: text(input, &["", "cli", "k8s/prod", "é"]),
    }
}

/// A refusal must be a clean, named one.
fn check_refusal(s: &tonic::Status, what: &str) {
    assert!(
        matches!(s.code(), Code::InvalidArgument | Code::Unimplemented),
        "{what}: refused with {:?}: {}",
        s.code(),
        s.message()
    );
    assert!(!s.message().is_empty(), "{what}: a refusal without a message");
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let request = if input.u8() & 1 == 0 {
        let Ok(r) = pb::ApplyRequest::decode(input.bytes(data.len())) else { return };
        r
    } else {
        let (s, p) = (usize::from(input.u8() % 4), usize::from(input.u8() % 3));
        pb::ApplyRequest {
            expected_version: 0,
            services: (0..s).map(|_| service(&mut input)).collect(),
            source_pools: (0..p).map(|_| pool(&mut input)).collect(),
            owner: text(&mut input, &["", "k8s/prod", "cli"]),
            expected_generation: number(&mut input, &[0, 1]).into(),
        }
    };
    let mut services = Vec::new();
    for s in request.services.iter().take(64) {
        match service_from(s) {
            Ok(st) => {
                let back = service_to(&st);
                let again = service_from(&back).unwrap_or_else(|e| panic!("{back:?} shown for {s:?} is refused: {e}"));
                assert_eq!(again, st, "a service does not convert back and forth to itself");
                assert_eq!(service_to(&again), back, "a service shows differently after a round trip");
                assert_eq!(st.name, s.name.trim(), "the name");
                services.push(st);
            }
            Err(e) => check_refusal(&e, "service"),
        }
        for (i, b) in s.backends.iter().enumerate().take(8) {
            if let Err(e) = backend_from(b, &s.name, i) {
                check_refusal(&e, "backend");
            }
        }
    }
    let mut pools = Vec::new();
    for p in request.source_pools.iter().take(64) {
        match pool_from(p) {
            Ok(ps) => {
                let back = pool_to(&ps);
                let again = pool_from(&back).unwrap_or_else(|e| panic!("{back:?} shown for {p:?} is refused: {e}"));
                assert_eq!(again, ps, "a pool does not convert back and forth to itself");
                pools.push(ps);
            }
            Err(e) => check_refusal(&e, "source pool"),
        }
    }
    let mut dynamic = DesiredState::default();
    let owner = request.owner.trim();
    let applied = if owner.is_empty() || checks::check_owner(owner).is_err() {
        ops::apply(config(), &mut dynamic, request.expected_version, services, pools)
    } else {
        let generation = request.expected_generation;
        ops::apply_owned(config(), &mut dynamic, owner, generation, request.expected_version, services, pools)
    };
    if applied.is_ok() {
        // Ok or a clean refusal; a panic is the finding.
        let _ = state::compile(config(), &MACS, &dynamic);
    }
});
