//! The desired-state API (`ServiceManager`) against a running vipgated on
//! net_null ports: every call's success path and version, refused requests
//! that change nothing, restore after SIGTERM and after SIGKILL in the
//! middle of a stream of changes, Watch (with a reload), and a corrupt state
//! file. They need root and hugepages (or VIPGATE_HUGEPAGES=0) and fail
//! loudly without.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Channel;
use vipgate::{NULL_GATEWAY_READY_TIMEOUT, NULL_GATEWAY_STOP_TIMEOUT, NullGateway};
use vipgate_controlplane::api::connect_unix_services;
use vipgate_controlplane::api::pb;
use vipgate_controlplane::api::pb::service_manager_client::ServiceManagerClient;

type Client = ServiceManagerClient<Channel>;

/// What the tests add to [`NullGateway`]'s configuration (one static
/// service "web"): one static pool.
const STATIC_POOL: &str = "\n[[source_pools]]\nname = \"static-pool\"\naddresses = [\"198.18.1.100\"]\n";

/// A vipgated under test, not started yet, restartable on the same
/// directory (and so the same state). Dropping it kills the daemon and
/// removes its files.
fn daemon(tag: &str) -> NullGateway {
    NullGateway::builder(&format!("s{tag}")).extra_config(STATIC_POOL).build()
}

/// Starts vipgated and waits until the desired-state API answers.
async fn start(d: &mut NullGateway) -> Client {
    d.spawn();
    let deadline = Instant::now() + NULL_GATEWAY_READY_TIMEOUT;
    loop {
        if let Ok(mut c) = connect_unix_services(&d.socket()).await
            && c.get_state(pb::GetStateRequest::default()).await.is_ok()
        {
            return c;
        }
        assert!(Instant::now() < deadline, "vipgated's API did not come up:\n{}", d.log_text());
        d.assert_running();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The dynamic state in the stopped daemon's state directory, read as
/// vipgated reads it at start.
fn stored(d: &NullGateway) -> vipgate_controlplane::state::DesiredState {
    let store = vipgate_controlplane::store::Store::new(&d.state_dir());
    let lock = store.lock().expect("the state directory is free: vipgated has stopped");
    store.open(&lock).expect("the stored state")
}

/// SIGTERM and a clean exit within 20 s. Waits on the runtime, so that the
/// test's open connections (and Watch streams) can see the server go away.
async fn stop(d: &mut NullGateway) -> String {
    d.signal(libc::SIGTERM);
    let deadline = Instant::now() + NULL_GATEWAY_STOP_TIMEOUT;
    let status = loop {
        if let Some(status) = d.try_wait() {
            break status;
        }
        d.assert_stop_deadline(deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let log = d.log_text();
    assert!(status.success(), "exit {status:?}:\n{log}");
    assert!(log.contains("mbuf pool at shutdown: 0 in use (at start: 0)"), "{log}");
    log
}

/// Replaces the configuration file, sends SIGHUP and waits for the reload's
/// outcome line.
async fn reload(d: &NullGateway, text: &str) -> String {
    let before = d.log_text().matches("configuration reloaded").count();
    std::fs::write(d.config_path(), text).unwrap();
    d.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = d.log_text();
        if let Some(line) = log.lines().filter(|l| l.contains("configuration reloaded")).nth(before) {
            return line.to_owned();
        }
        assert!(!log.contains("reload refused"), "{log}");
        assert!(Instant::now() < deadline, "no reload outcome:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn backend(last: u8, port: u32, weight: u32) -> pb::Backend {
    pb::Backend {
        address: format!("198.18.1.{last}"),
        port,
        weight: Some(weight),
        admin_state: pb::AdminState::Enabled.into(),
        // Output only: ignored in requests, shown by GetState.
        health: pb::HealthState::Unchecked.into(),
        health_reason: String::new(),
    }
}

/// A dynamic nat service as GetState shows it back.
fn service(name: &str, vip_last: u8, backends: Vec<pb::Backend>) -> pb::Service {
    pb::Service {
        name: name.to_owned(),
        vip: format!("198.18.100.{vip_last}"),
        port: 80,
        protocol: "tcp".to_owned(),
        mode: "nat".to_owned(),
        table_size: 251,
        on_backend_removal: "rehash".to_owned(),
        backends,
        origin: pb::Origin::Dynamic.into(),
        owner: "cli".to_owned(),
        affinity: "none".to_owned(),
        ..pb::Service::default()
    }
}

fn pool(name: &str, last: u8) -> pb::SourcePool {
    pb::SourcePool {
        name: name.to_owned(),
        addresses: vec![format!("198.18.1.{last}")],
        first_port: 1024,
        last_port: 65535,
        origin: pb::Origin::Dynamic.into(),
        owner: "cli".to_owned(),
    }
}

async fn state(c: &mut Client) -> pb::GetStateResponse {
    c.get_state(pb::GetStateRequest::default()).await.expect("GetState").into_inner()
}

fn dynamic_services(s: &pb::GetStateResponse) -> Vec<pb::Service> {
    s.services.iter().filter(|s| s.origin == i32::from(pb::Origin::Dynamic)).cloned().collect()
}

fn find<'a>(s: &'a pb::GetStateResponse, name: &str) -> &'a pb::Service {
    s.services.iter().find(|x| x.name == name).unwrap_or_else(|| panic!("no service {name:?} in {s:?}"))
}

/// Checks that a call's version is the next one and that GetState shows it.
async fn check(c: &mut Client, expect: &mut u64, v: u64, what: &str) -> pb::GetStateResponse {
    *expect += 1;
    assert_eq!(v, *expect, "{what}: version");
    let s = state(c).await;
    assert_eq!(s.version, v, "{what}: GetState's version");
    println!("{what}: version {v}");
    s
}

fn version(r: Result<tonic::Response<pb::MutationResponse>, tonic::Status>, what: &str) -> u64 {
    match r {
        Ok(r) => r.into_inner().version,
        Err(e) => panic!("{what}: {:?}: {}", e.code(), e.message()),
    }
}

#[tokio::test]
async fn every_call_succeeds_and_increments_the_version() {
    let mut d = daemon("ok");
    let mut c = start(&mut d).await;
    let s0 = state(&mut c).await;
    assert_eq!(s0.version, 0);
    assert_eq!(s0.services.len(), 1);
    assert_eq!(s0.services[0].origin, i32::from(pb::Origin::Static));
    assert_eq!(s0.source_pools[0].name, "static-pool");
    assert_eq!(s0.config_file, d.config_path().display().to_string());

    let mut expect = 0;

    let v = version(
        c.create_source_pool(pb::CreateSourcePoolRequest { pool: Some(pool("snat", 101)), ..Default::default() }).await,
        "CreateSourcePool",
    );
    let s = check(&mut c, &mut expect, v, "CreateSourcePool").await;
    assert!(s.source_pools.iter().any(|p| *p == pool("snat", 101)), "{s:?}");

    let mut api = service("api", 2, vec![backend(20, 8080, 1)]);
    api.mode = "fullnat".to_owned();
    api.source_pool = "snat".to_owned();
    let v = version(
        c.create_service(pb::CreateServiceRequest { service: Some(api.clone()), ..Default::default() }).await,
        "CreateService",
    );
    let s = check(&mut c, &mut expect, v, "CreateService").await;
    assert_eq!(*find(&s, "api"), api);

    let r = c
        .add_backend(pb::AddBackendRequest {
            service: "api".into(),
            backend: Some(backend(21, 8080, 5)),
            ..Default::default()
        })
        .await;
    let s = check(&mut c, &mut expect, version(r, "AddBackend"), "AddBackend").await;
    assert_eq!(find(&s, "api").backends[1], backend(21, 8080, 5));

    let r = c
        .update_backend(pb::UpdateBackendRequest {
            service: "api".into(),
            address: "198.18.1.21".into(),
            port: 8080,
            weight: Some(9),
            admin_state: pb::AdminState::Draining.into(),
            ..Default::default()
        })
        .await;
    let s = check(&mut c, &mut expect, version(r, "UpdateBackend"), "UpdateBackend").await;
    let b = &find(&s, "api").backends[1];
    assert_eq!((b.weight, b.admin_state), (Some(9), i32::from(pb::AdminState::Draining)));

    let r = c
        .remove_backend(pb::RemoveBackendRequest {
            service: "api".into(),
            address: "198.18.1.20".into(),
            port: 8080,
            ..Default::default()
        })
        .await;
    let s = check(&mut c, &mut expect, version(r, "RemoveBackend"), "RemoveBackend").await;
    assert_eq!(find(&s, "api").backends.len(), 1);

    let mut api2 = api.clone();
    api2.backends = vec![backend(22, 8080, 3), backend(23, 8080, 4)];
    api2.on_backend_removal = "reset".to_owned();
    let r = c.update_service(pb::UpdateServiceRequest { service: Some(api2.clone()), ..Default::default() }).await;
    let s = check(&mut c, &mut expect, version(r, "UpdateService"), "UpdateService").await;
    assert_eq!(*find(&s, "api"), api2);

    let dns = service("dns", 3, vec![backend(30, 53, 1)]);
    let r = c.create_service(pb::CreateServiceRequest { service: Some(dns), ..Default::default() }).await;
    check(&mut c, &mut expect, version(r, "CreateService dns"), "CreateService dns").await;
    let r = c.delete_service(pb::DeleteServiceRequest { name: "dns".into(), ..Default::default() }).await;
    let s = check(&mut c, &mut expect, version(r, "DeleteService"), "DeleteService").await;
    assert!(!s.services.iter().any(|x| x.name == "dns"));

    let applied = vec![service("a1", 10, vec![backend(40, 80, 1)]), service("a2", 11, vec![backend(41, 80, 2)])];
    let r = c
        .apply(pb::ApplyRequest {
            expected_version: expect,
            services: applied.clone(),
            source_pools: vec![pool("p2", 102)],
            ..Default::default()
        })
        .await;
    let s = check(&mut c, &mut expect, version(r, "Apply"), "Apply").await;
    assert_eq!(dynamic_services(&s), applied);
    assert!(s.source_pools.iter().any(|p| p.name == "p2") && !s.source_pools.iter().any(|p| p.name == "snat"));

    let r = c.delete_service(pb::DeleteServiceRequest { name: "a2".into(), ..Default::default() }).await;
    check(&mut c, &mut expect, version(r, "DeleteService a2"), "DeleteService a2").await;
    let r = c.delete_source_pool(pb::DeleteSourcePoolRequest { name: "p2".into(), ..Default::default() }).await;
    let s = check(&mut c, &mut expect, version(r, "DeleteSourcePool"), "DeleteSourcePool").await;
    assert!(!s.source_pools.iter().any(|p| p.name == "p2"));
    let log = stop(&mut d).await;
    assert!(log.contains("state changed"), "{log}");
}

type Call = Box<dyn FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = tonic::Status>>>>;

fn call<F, Fut>(f: F) -> Call
where
    F: FnOnce(Client) -> Fut + 'static,
    Fut: std::future::Future<Output = Result<tonic::Response<pb::MutationResponse>, tonic::Status>> + 'static,
{
    Box::new(move |c| {
        Box::pin(async move {
            match f(c).await {
                Ok(r) => panic!("accepted: version {}", r.into_inner().version),
                Err(e) => e,
            }
        })
    })
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_field_and_change_nothing() {
    let mut d = daemon("bad");
    let mut c = start(&mut d).await;
    // Something dynamic to conflict with and to fail to change.
    let mut api = service("api", 2, vec![backend(20, 8080, 1), backend(21, 8080, 1)]);
    api.mode = "fullnat".to_owned();
    api.source_pool = "snat".to_owned();
    version(
        c.create_source_pool(pb::CreateSourcePoolRequest { pool: Some(pool("snat", 101)), ..Default::default() }).await,
        "pool",
    );
    version(
        c.create_service(pb::CreateServiceRequest { service: Some(api.clone()), ..Default::default() }).await,
        "api",
    );
    let file = d.config_path().display().to_string();

    let create = |s: pb::Service| {
        call(move |mut c: Client| async move {
            c.create_service(pb::CreateServiceRequest { service: Some(s), ..Default::default() }).await
        })
    };
    let with = |f: fn(&mut pb::Service)| {
        let mut s = service("new", 9, vec![backend(50, 8080, 1), backend(51, 8080, 1)]);
        f(&mut s);
        s
    };
    let many_backends: Vec<pb::Backend> = (0..65_536).map(|i| backend(60, 1 + i, 1)).collect();
    let cases: Vec<(&str, Call, Code, String)> = vec![
        (
            "unknown service",
            call(|mut c: Client| async move {
                c.delete_service(pb::DeleteServiceRequest { name: "nope".into(), ..Default::default() }).await
            }),
            Code::NotFound,
            "no service is named \"nope\"".into(),
        ),
        (
            "duplicate service",
            create(service("api", 7, vec![])),
            Code::AlreadyExists,
            "service \"api\" already exists".into(),
        ),
        (
            "duplicate name of a static service",
            create(service("web", 7, vec![])),
            Code::AlreadyExists,
            format!("service \"web\" already exists (defined in {file})"),
        ),
        (
            "duplicate VIP:port against static",
            create(with(|s| s.vip = "198.18.100.1".into())),
            Code::InvalidArgument,
            format!(
                "services[\"new\"].port: 198.18.100.1:80/tcp is already served by static service \"web\" (defined in {file})"
            ),
        ),
        (
            "duplicate VIP:port against dynamic",
            create(with(|s| s.vip = "198.18.100.2".into())),
            Code::InvalidArgument,
            "services[\"new\"].port: 198.18.100.2:80/tcp is already served by service \"api\"".into(),
        ),
        (
            "bad weight",
            create(with(|s| s.backends[1].weight = Some(70_000))),
            Code::InvalidArgument,
            "services[\"new\"].backends[1].weight: 70000 is not from 0 to 65535".into(),
        ),
        (
            "non-prime table size",
            create(with(|s| s.table_size = 1000)),
            Code::InvalidArgument,
            "services[\"new\"].table_size: 1000 is not a prime from 3 to 16777213".into(),
        ),
        (
            "IPv6 VIP",
            create(with(|s| s.vip = "2001:db8::1".into())),
            Code::InvalidArgument,
            "services[\"new\"].vip: \"2001:db8::1\" is an IPv6 address; IPv6 is not supported".into(),
        ),
        (
            "IPv6 backend",
            create(with(|s| s.backends[0].address = "fd00::5".into())),
            Code::InvalidArgument,
            "services[\"new\"].backends[0].address: \"fd00::5\" is an IPv6 address; IPv6 is not supported".into(),
        ),
        (
            "unknown pool",
            create(with(|s| {
                s.mode = "fullnat".into();
                s.source_pool = "x".into();
            })),
            Code::InvalidArgument,
            "services[\"new\"].source_pool: no source pool is named \"x\"".into(),
        ),
        (
            "DSR port mismatch",
            create(with(|s| s.mode = "dsr".into())),
            Code::InvalidArgument,
            "services[\"new\"].backends[0].port: 8080: direct server return cannot change the port".into(),
        ),
        (
            "unroutable backend",
            create(with(|s| s.backends[0].address = "10.9.9.9".into())),
            Code::InvalidArgument,
            "services[\"new\"].backends[0].address: no route to 10.9.9.9".into(),
        ),
        (
            "port out of range",
            create(with(|s| s.port = 70_000)),
            Code::InvalidArgument,
            "services[\"new\"].port: 70000 is not a port number from 1 to 65535".into(),
        ),
        (
            "health check without a kind",
            create(with(|s| {
                s.health_check = Some(pb::HealthCheck { interval_ms: 1000, timeout_ms: 500, ..Default::default() })
            })),
            Code::InvalidArgument,
            "services[\"new\"].health_check.kind: is required: \"tcp\", \"http\", \"https\" or \"udp\"".into(),
        ),
        (
            "health check timeout not below the interval",
            create(with(|s| {
                s.health_check = Some(pb::HealthCheck {
                    kind: "tcp".into(),
                    interval_ms: 1000,
                    timeout_ms: 1000,
                    ..Default::default()
                })
            })),
            Code::InvalidArgument,
            "services[\"new\"].health_check.timeout_ms: 1000 must be less than interval_ms (1000)".into(),
        ),
        (
            "health check status list",
            create(with(|s| {
                s.health_check =
                    Some(pb::HealthCheck { kind: "http".into(), expect_status: "2xx".into(), ..Default::default() })
            })),
            Code::InvalidArgument,
            "services[\"new\"].health_check.expect_status: \"2xx\" in \"2xx\" is not an HTTP status code".into(),
        ),
        (
            "udp health check without a payload",
            create(with(|s| s.health_check = Some(pb::HealthCheck { kind: "udp".into(), ..Default::default() }))),
            Code::InvalidArgument,
            "services[\"new\"].health_check.payload: a udp check needs a payload to send".into(),
        ),
        (
            "health check field of another kind",
            create(with(|s| {
                s.health_check = Some(pb::HealthCheck { kind: "tcp".into(), path: "/".into(), ..Default::default() })
            })),
            Code::InvalidArgument,
            "services[\"new\"].health_check.path: is only used with kind \"http\" or \"https\", not \"tcp\"".into(),
        ),
        (
            "health check rise",
            create(with(|s| {
                s.health_check = Some(pb::HealthCheck { kind: "tcp".into(), rise: 101, ..Default::default() })
            })),
            Code::InvalidArgument,
            "services[\"new\"].health_check.rise: 101 is not from 1 to 100".into(),
        ),
        (
            "flow timeouts",
            create(with(|s| s.flow_timeouts = Some(pb::FlowTimeouts { tcp_established_s: 5, udp_s: 5 }))),
            Code::Unimplemented,
            "services[\"new\"].flow_timeouts".into(),
        ),
        (
            "oversized backends",
            create(service("big", 9, many_backends)),
            Code::InvalidArgument,
            "services[\"big\"].backends: 65536 backends; at most 65535 per service".into(),
        ),
        (
            "oversized apply",
            call(|mut c: Client| async move {
                let services = (0..10_001).map(|i| service(&format!("s{i}"), 9, vec![])).collect();
                c.apply(pb::ApplyRequest { expected_version: 2, services, source_pools: vec![], ..Default::default() })
                    .await
            }),
            Code::InvalidArgument,
            "services: 10001 services in one request; at most 10000".into(),
        ),
        (
            "version mismatch",
            call(|mut c: Client| async move {
                c.apply(pb::ApplyRequest {
                    expected_version: 1,
                    services: vec![],
                    source_pools: vec![],
                    ..Default::default()
                })
                .await
            }),
            Code::FailedPrecondition,
            "expected_version 1 is not the current version 2".into(),
        ),
        (
            "blind overwrite",
            call(|mut c: Client| async move {
                c.apply(pb::ApplyRequest {
                    expected_version: 0,
                    services: vec![],
                    source_pools: vec![],
                    ..Default::default()
                })
                .await
            }),
            Code::FailedPrecondition,
            "expected_version 0 is not the current version 2".into(),
        ),
        (
            "changing a static service",
            call(|mut c: Client| async move {
                c.add_backend(pb::AddBackendRequest {
                    service: "web".into(),
                    backend: Some(backend(70, 8080, 1)),
                    ..Default::default()
                })
                .await
            }),
            Code::FailedPrecondition,
            format!("service \"web\" is defined in {file}; change it there and reload"),
        ),
        (
            "deleting a static service",
            call(|mut c: Client| async move {
                c.delete_service(pb::DeleteServiceRequest { name: "web".into(), ..Default::default() }).await
            }),
            Code::FailedPrecondition,
            format!("service \"web\" is defined in {file}; change it there and reload"),
        ),
        (
            "deleting a static pool",
            call(|mut c: Client| async move {
                c.delete_source_pool(pb::DeleteSourcePoolRequest { name: "static-pool".into(), ..Default::default() })
                    .await
            }),
            Code::FailedPrecondition,
            format!("source pool \"static-pool\" is defined in {file}; change it there and reload"),
        ),
        (
            "pool in use",
            call(|mut c: Client| async move {
                c.delete_source_pool(pb::DeleteSourcePoolRequest { name: "snat".into(), ..Default::default() }).await
            }),
            Code::FailedPrecondition,
            "source pool \"snat\" is used by service \"api\"".into(),
        ),
        (
            "pool address taken",
            call(|mut c: Client| async move {
                c.create_source_pool(pb::CreateSourcePoolRequest { pool: Some(pool("p", 100)), ..Default::default() })
                    .await
            }),
            Code::InvalidArgument,
            "source_pools[\"p\"].addresses[0]: 198.18.1.100 is already in static source pool \"static-pool\"".into(),
        ),
        (
            "unknown backend",
            call(|mut c: Client| async move {
                c.remove_backend(pb::RemoveBackendRequest {
                    service: "api".into(),
                    address: "198.18.1.99".into(),
                    port: 8080,
                    ..Default::default()
                })
                .await
            }),
            Code::NotFound,
            "service \"api\" has no backend 198.18.1.99:8080".into(),
        ),
        (
            "duplicate backend",
            call(|mut c: Client| async move {
                c.add_backend(pb::AddBackendRequest {
                    service: "api".into(),
                    backend: Some(backend(20, 8080, 1)),
                    ..Default::default()
                })
                .await
            }),
            Code::AlreadyExists,
            "service \"api\" already has backend 198.18.1.20:8080".into(),
        ),
        (
            "bad weight on update",
            call(|mut c: Client| async move {
                c.update_backend(pb::UpdateBackendRequest {
                    service: "api".into(),
                    address: "198.18.1.20".into(),
                    port: 8080,
                    weight: Some(65_536),
                    admin_state: 0,
                    ..Default::default()
                })
                .await
            }),
            Code::InvalidArgument,
            "services[\"api\"].backends[198.18.1.20:8080].weight: 65536 is not from 0 to 65535".into(),
        ),
        (
            "a bad owner",
            call(|mut c: Client| async move {
                c.delete_service(pb::DeleteServiceRequest { name: "api".into(), owner: "a b".into() }).await
            }),
            Code::InvalidArgument,
            "owner: \"a b\": use letters, digits, '-', '_', '.', '/' and ':' only".into(),
        ),
        (
            "another owner's service",
            call(|mut c: Client| async move {
                c.delete_service(pb::DeleteServiceRequest { name: "api".into(), owner: "k8s/prod".into() }).await
            }),
            Code::FailedPrecondition,
            "service \"api\" is owned by \"cli\"; a request as owner \"k8s/prod\" cannot change it".into(),
        ),
        (
            "an object owned by someone other than the request's owner",
            create(with(|s| s.owner = "k8s/prod".into())),
            Code::InvalidArgument,
            "services[\"new\"].owner: \"k8s/prod\" is not the request's owner \"cli\"".into(),
        ),
        (
            "a stale generation",
            call(|mut c: Client| async move {
                c.apply(pb::ApplyRequest { owner: "cli".into(), expected_generation: 1, ..Default::default() }).await
            }),
            Code::FailedPrecondition,
            "expected_generation 1 is not owner \"cli\"'s current generation 2; read the state again".into(),
        ),
        (
            "a generation without an owner",
            call(|mut c: Client| async move {
                c.apply(pb::ApplyRequest { expected_version: 2, expected_generation: 2, ..Default::default() }).await
            }),
            Code::InvalidArgument,
            "expected_generation: is only used with owner".into(),
        ),
        (
            "an owner-scoped Apply listing another owner's service",
            call(|mut c: Client| async move {
                let api = service("api", 2, vec![]);
                c.apply(pb::ApplyRequest {
                    owner: "k8s/prod".into(),
                    services: vec![pb::Service { owner: String::new(), ..api }],
                    ..Default::default()
                })
                .await
            }),
            Code::FailedPrecondition,
            "service \"api\" is owned by \"cli\"; a request as owner \"k8s/prod\"".into(),
        ),
        (
            "a name listed twice in an owner-scoped Apply",
            call(|mut c: Client| async move {
                let s = service("twice", 9, vec![]);
                c.apply(pb::ApplyRequest {
                    owner: "k8s/prod".into(),
                    services: vec![s.clone(), s],
                    ..Default::default()
                })
                .await
            }),
            Code::InvalidArgument,
            "services[\"twice\"].name: is listed twice".into(),
        ),
        (
            "an empty batch",
            call(|mut c: Client| async move { c.batch(pb::BatchRequest::default()).await }),
            Code::InvalidArgument,
            "operations: a batch needs at least one operation".into(),
        ),
        (
            "an oversized batch",
            call(|mut c: Client| async move {
                let op =
                    pb::BatchOperation { operation: Some(pb::batch_operation::Operation::DeleteService("api".into())) };
                c.batch(pb::BatchRequest { operations: vec![op; 10_001], ..Default::default() }).await
            }),
            Code::InvalidArgument,
            "operations: 10001 operations in one batch; at most 10000".into(),
        ),
        (
            "a batch operation naming no operation",
            call(|mut c: Client| async move {
                c.batch(pb::BatchRequest { operations: vec![pb::BatchOperation::default()], ..Default::default() })
                    .await
            }),
            Code::InvalidArgument,
            "operations[0]: names no operation".into(),
        ),
        (
            "a batch whose second operation has a bad field",
            call(|mut c: Client| async move {
                use pb::batch_operation::Operation;
                let ops = vec![
                    Operation::CreateService(service("in-batch", 9, vec![backend(52, 8080, 1)])),
                    Operation::AddBackend(pb::AddBackendRequest {
                        service: "api".into(),
                        backend: Some(pb::Backend { address: "198.18.1.300".into(), port: 8080, ..Default::default() }),
                        ..Default::default()
                    }),
                ];
                let operations = ops.into_iter().map(|o| pb::BatchOperation { operation: Some(o) }).collect();
                c.batch(pb::BatchRequest { operations, ..Default::default() }).await
            }),
            Code::InvalidArgument,
            "operations[1]: services[\"api\"].backends[2].address: \"198.18.1.300\" is not an IPv4 address".into(),
        ),
        (
            "a batch whose last operation conflicts with the first",
            call(|mut c: Client| async move {
                use pb::batch_operation::Operation;
                let ops = vec![
                    Operation::CreateService(service("in-batch", 9, vec![backend(52, 8080, 1)])),
                    Operation::DeleteService("nope".into()),
                ];
                let operations = ops.into_iter().map(|o| pb::BatchOperation { operation: Some(o) }).collect();
                c.batch(pb::BatchRequest { operations, ..Default::default() }).await
            }),
            Code::NotFound,
            "operations[1]: no service is named \"nope\"".into(),
        ),
        (
            "a batch at a stale generation",
            call(|mut c: Client| async move {
                let op =
                    pb::BatchOperation { operation: Some(pb::batch_operation::Operation::DeleteService("api".into())) };
                c.batch(pb::BatchRequest { operations: vec![op], expected_generation: Some(7), ..Default::default() })
                    .await
            }),
            Code::FailedPrecondition,
            "expected_generation 7 is not owner \"cli\"'s current generation 2".into(),
        ),
        (
            "a backend conflicting with another service's, named at the request",
            create(with(|s| s.backends = vec![backend(11, 8080, 1)])),
            Code::InvalidArgument,
            "services[\"new\"].backends[0].address: 198.18.1.11:8080/tcp already serves static service \"web\"".into(),
        ),
    ];
    assert!(cases.len() >= 15);
    let before = state(&mut c).await;
    assert_eq!(before.version, 2);
    assert_eq!(before.generations, std::collections::HashMap::from([("cli".to_owned(), 2)]));
    for (what, f, code, want) in cases {
        let e = f(c.clone()).await;
        println!("{what}: {:?}: {}", e.code(), e.message());
        assert_eq!(e.code(), code, "{what}: {}", e.message());
        assert!(e.message().contains(&want), "{what}: wanted {want:?} in {:?}", e.message());
        assert_eq!(state(&mut c).await, before, "{what}: the state changed");
    }
    stop(&mut d).await;
    assert_eq!(stored(&d).version, 2, "nothing refused was persisted");
}

#[tokio::test]
async fn restart_restores_the_same_version_and_content_and_serves_it() {
    let mut d = daemon("restore");
    let mut c = start(&mut d).await;
    version(
        c.create_source_pool(pb::CreateSourcePoolRequest { pool: Some(pool("snat", 101)), ..Default::default() }).await,
        "pool",
    );
    let mut full = service("full", 3, vec![backend(30, 8080, 2)]);
    full.mode = "fullnat".into();
    full.source_pool = "snat".into();
    version(c.create_service(pb::CreateServiceRequest { service: Some(full), ..Default::default() }).await, "full");
    version(
        c.create_service(pb::CreateServiceRequest {
            service: Some(service("api", 2, vec![backend(20, 8080, 1)])),
            ..Default::default()
        })
        .await,
        "api",
    );
    let r = c
        .add_backend(pb::AddBackendRequest {
            service: "api".into(),
            backend: Some(backend(21, 8080, 7)),
            ..Default::default()
        })
        .await;
    version(r, "add");
    let r = c
        .update_backend(pb::UpdateBackendRequest {
            service: "api".into(),
            address: "198.18.1.20".into(),
            port: 8080,
            weight: None,
            admin_state: pb::AdminState::Disabled.into(),
            ..Default::default()
        })
        .await;
    let v = version(r, "disable");
    let before = state(&mut c).await;
    assert_eq!(before.version, v);
    drop(c);
    stop(&mut d).await;

    let mut c = start(&mut d).await;
    let after = state(&mut c).await;
    assert_eq!(after, before);
    let log = d.log_text();
    assert!(
        log.contains(&format!(
            "dynamic state restored path={} version={v} services=2 source_pools=1",
            d.state_file().display()
        )),
        "{log}"
    );
    // The dataplane serves them: the disabled backend is left out.
    assert!(log.contains("service=api vip=198.18.100.2 port=80 protocol=\"tcp\" backends=1"), "{log}");
    assert!(log.contains("service=full vip=198.18.100.3 port=80 protocol=\"tcp\" backends=1"), "{log}");
    assert!(log.contains("service=web vip=198.18.100.1"), "{log}");
    println!(
        "{}",
        log.lines().filter(|l| l.contains("service=") || l.contains("restored")).collect::<Vec<_>>().join("\n")
    );
    stop(&mut d).await;
}

/// What the client knows about the stream of changes it sends.
#[derive(Default)]
struct Progress {
    /// The version each acknowledged call returned, and the dynamic
    /// services it produced.
    acked: BTreeMap<u64, Vec<pb::Service>>,
    /// The call in flight: the version it will produce and its services.
    pending: Option<(u64, Vec<pb::Service>)>,
}

/// The `i`th change of the stream: "api" with 1 to 4 backends, weights
/// following `i`.
fn nth_service(i: u64) -> pb::Service {
    let n = 1 + (i % 4) as u8;
    service("api", 2, (0..n).map(|j| backend(20 + j, 8080, ((i * 7 + u64::from(j)) % 1000) as u32)).collect())
}

/// The time the log's committed changes spent persisting (`persist_ms`).
fn persisting(log: &str) -> Duration {
    let ms: f64 = log
        .lines()
        .filter(|l| l.contains("state changed"))
        .filter_map(|l| l.split(" persist_ms=").nth(1)?.split(' ').next()?.parse::<f64>().ok())
        .sum();
    Duration::from_secs_f64(ms / 1e3)
}

/// The owner of the services the kill test's owner-scoped Applies manage.
const KILL_OWNER: &str = "k8s/kill";

/// One call of the kill test's stream.
enum StreamCall {
    Update(pb::Service),
    Create(pb::Service),
    Delete(String),
    Batch(pb::BatchRequest),
    Apply(pb::ApplyRequest),
}

/// A service of the kill test's stream named `name` (its number `n` picks
/// a VIP:port and backends no other live one has).
fn numbered(name: &str, n: u64, owner: &str) -> pb::Service {
    let port = 1000 + (n % 50_000) as u32;
    let mut s = service(name, 3, vec![backend(40, port, 1 + (n % 7) as u32)]);
    s.port = port;
    owner.clone_into(&mut s.owner);
    s
}

/// The `i`th change of the kill test's stream, mixing every kind of change,
/// and the dynamic services after it (sorted by name, as GetState lists
/// them): "api" replaced; a service created; the oldest created one
/// deleted; a batch that replaces "api", creates one and deletes the
/// oldest batch-made one; an owner-scoped Apply replacing `KILL_OWNER`'s
/// service with another (at its generation `generation`).
fn mixed_change(i: u64, model: &[pb::Service], generation: u64) -> (Vec<pb::Service>, StreamCall) {
    let mut next = model.to_vec();
    let oldest = |prefix: &str| next.iter().filter(|s| s.name.starts_with(prefix)).map(|s| s.name.clone()).min();
    let call = match i % 5 {
        0 => {
            let s = numbered(&format!("x{i:08}"), i, "cli");
            next.push(s.clone());
            StreamCall::Create(s)
        }
        2 if oldest("x").is_some() => {
            let name = oldest("x").unwrap();
            next.retain(|s| s.name != name);
            StreamCall::Delete(name)
        }
        3 => {
            use pb::batch_operation::Operation;
            let api = nth_service(i);
            let created = numbered(&format!("b{i:08}"), i, "cli");
            let mut ops = vec![Operation::UpdateService(api.clone()), Operation::CreateService(created.clone())];
            if let Some(name) = oldest("b") {
                next.retain(|s| s.name != name);
                ops.push(Operation::DeleteService(name));
            }
            next.retain(|s| s.name != "api");
            next.push(api);
            next.push(created);
            let operations = ops.into_iter().map(|o| pb::BatchOperation { operation: Some(o) }).collect();
            StreamCall::Batch(pb::BatchRequest { operations, ..Default::default() })
        }
        4 => {
            let k = numbered(&format!("k{i:08}"), i, KILL_OWNER);
            next.retain(|s| s.owner != KILL_OWNER);
            next.push(k.clone());
            StreamCall::Apply(pb::ApplyRequest {
                owner: KILL_OWNER.into(),
                expected_generation: generation,
                services: vec![k],
                ..Default::default()
            })
        }
        _ => {
            let api = nth_service(i);
            next.retain(|s| s.name != "api");
            next.push(api.clone());
            StreamCall::Update(api)
        }
    };
    next.sort_by(|a, b| a.name.cmp(&b.name));
    (next, call)
}

/// How many times vipgated is killed. A round (a stream of changes for 10
/// to 200 ms, SIGKILL, restart) takes about half a second here (100 rounds
/// in 46 s on 2 shared vCPUs).
const KILL_ROUNDS: u32 = 100;

#[tokio::test]
async fn sigkill_during_a_stream_of_changes_never_loses_an_acknowledged_one() {
    let mut d = daemon("kill");
    let mut c = start(&mut d).await;
    let v = version(
        c.create_service(pb::CreateServiceRequest { service: Some(nth_service(0)), ..Default::default() }).await,
        "create",
    );
    let mut current = (v, vec![nth_service(0)]);
    let started = Instant::now();
    let mut seed = u64::from(std::process::id()) ^ started.elapsed().as_nanos() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let (mut streamed, mut persisting_total, mut in_flight_kept, mut in_flight_lost) =
        (Duration::ZERO, Duration::ZERO, 0u32, 0u32);
    let mut k8s_generation = 0;
    for round in 0..KILL_ROUNDS {
        let progress = Arc::new(Mutex::new(Progress::default()));
        let writer = {
            let progress = Arc::clone(&progress);
            let mut c = c.clone();
            let (mut v, mut model) = current.clone();
            let mut generation = k8s_generation;
            tokio::spawn(async move {
                for _ in 0..10_000 {
                    let (next, call) = mixed_change(v + 1, &model, generation);
                    progress.lock().unwrap().pending = Some((v + 1, next.clone()));
                    let scoped = matches!(call, StreamCall::Apply(_));
                    let answer = match call {
                        StreamCall::Update(s) => {
                            c.update_service(pb::UpdateServiceRequest { service: Some(s), ..Default::default() }).await
                        }
                        StreamCall::Create(s) => {
                            c.create_service(pb::CreateServiceRequest { service: Some(s), ..Default::default() }).await
                        }
                        StreamCall::Delete(name) => {
                            c.delete_service(pb::DeleteServiceRequest { name, ..Default::default() }).await
                        }
                        StreamCall::Batch(r) => c.batch(r).await,
                        StreamCall::Apply(r) => c.apply(r).await,
                    };
                    match answer {
                        Ok(r) => {
                            let r = r.into_inner();
                            assert_eq!(r.version, v + 1, "versions go up by one");
                            v = r.version;
                            if scoped {
                                generation = r.generation;
                            }
                            let mut p = progress.lock().unwrap();
                            p.acked.insert(v, next.clone());
                            p.pending = None;
                            model = next;
                        }
                        // The kill; anything else is a refusal the stream
                        // must never cause.
                        Err(e)
                            if matches!(
                                e.code(),
                                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                            ) =>
                        {
                            return;
                        }
                        Err(e) => panic!("change {}: refused: {e}", v + 1),
                    }
                }
            })
        };
        // xorshift: a kill at a random moment, 10 to 200 ms into the
        // stream, to the microsecond: wherever a change then is (compiled,
        // inside its commit's writes and fsyncs, published, answered).
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_micros(10_000 + seed % 190_000);
        tokio::time::sleep(delay).await;
        d.kill9();
        streamed += delay;
        persisting_total += persisting(&d.log_text());
        if let Err(e) = writer.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
        let (last_acked, pending) = {
            let p = progress.lock().unwrap();
            let last = p.acked.last_key_value().map(|(v, s)| (*v, s.clone())).unwrap_or(current.clone());
            (last, p.pending.clone())
        };
        c = start(&mut d).await;
        let restored = state(&mut c).await;
        let services = dynamic_services(&restored);
        let ok = if restored.version == last_acked.0 {
            services == last_acked.1
        } else if let Some((pv, ps)) = &pending {
            restored.version == *pv && services == *ps
        } else {
            false
        };
        println!(
            "round {round}: killed after {delay:?}, last acknowledged version {}, in flight {:?}, restored version {}",
            last_acked.0,
            pending.as_ref().map(|p| p.0),
            restored.version
        );
        assert!(
            ok,
            "restored version {} ({services:?}) is neither the last acknowledged {} nor the one in flight {:?}",
            restored.version,
            last_acked.0,
            pending.map(|p| p.0)
        );
        if pending.is_some() {
            if restored.version == last_acked.0 {
                in_flight_lost += 1;
            } else {
                in_flight_kept += 1;
            }
        }
        k8s_generation = restored.generations.get(KILL_OWNER).copied().unwrap_or(0);
        current = (restored.version, services);
    }
    // Where the kills landed: a change in flight was either committed
    // before the kill (restored though never answered) or not (the
    // previous version restored); and commits took this share of the time
    // the streams ran, so about as many kills landed inside one.
    let share = persisting_total.as_secs_f64() / streamed.as_secs_f64() * 100.0;
    println!(
        "{KILL_ROUNDS} kills in {:?}: with a change in flight, {in_flight_kept} restored it and {in_flight_lost} the version before; commits took {share:.0}% of the streams' time",
        started.elapsed()
    );
    assert!(in_flight_kept + in_flight_lost > 0, "no kill landed while a change was in flight");
    assert!(started.elapsed() < Duration::from_secs(180), "took {:?}", started.elapsed());
    stop(&mut d).await;
}

#[tokio::test]
async fn watch_sends_the_state_then_each_change_in_order_including_a_reload() {
    let mut d = daemon("watch");
    let mut c = start(&mut d).await;
    let mut stream = c.watch(pb::WatchRequest::default()).await.expect("Watch").into_inner();
    let first = stream.message().await.unwrap().expect("the initial state");
    let Some(pb::watch_event::Event::Snapshot(s)) = &first.event else {
        panic!("first event is not the state: {first:?}")
    };
    assert_eq!((first.version, s.version, s.services.len()), (0, 0, 1));

    version(
        c.create_service(pb::CreateServiceRequest {
            service: Some(service("api", 2, vec![backend(20, 8080, 1)])),
            ..Default::default()
        })
        .await,
        "create",
    );
    version(
        c.add_backend(pb::AddBackendRequest {
            service: "api".into(),
            backend: Some(backend(21, 8080, 1)),
            ..Default::default()
        })
        .await,
        "add",
    );
    version(c.delete_service(pb::DeleteServiceRequest { name: "api".into(), ..Default::default() }).await, "delete");
    let text = std::fs::read_to_string(d.config_path()).unwrap()
        + "\n[[services]]\nname = \"dns\"\nvip = \"198.18.100.9\"\nport = 53\nprotocol = \"udp\"\nbackends = [ { address = \"198.18.1.12\", port = 53 } ]\n";
    let line = reload(&d, &text).await;
    assert!(line.contains("(state version 4)"), "{line}");
    let want = [
        (1, "CreateService", vec!["api"], vec![]),
        (2, "AddBackend", vec!["api"], vec![]),
        (3, "DeleteService", vec![], vec!["api"]),
        (4, "reload", vec!["dns"], vec![]),
    ];
    for (v, cause, changed, deleted) in want {
        let e = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .unwrap();
        println!("event: version {} {:?}", e.version, e.event);
        let Some(pb::watch_event::Event::Change(ch)) = e.event else { panic!("not a change: {e:?}") };
        assert_eq!((e.version, ch.cause.as_str()), (v, cause));
        assert_eq!(ch.services_changed, changed);
        assert_eq!(ch.services_deleted, deleted);
    }
    let s = state(&mut c).await;
    assert_eq!(s.version, 4);
    assert_eq!(find(&s, "dns").origin, i32::from(pb::Origin::Static));
    stop(&mut d).await;
}

#[tokio::test]
async fn a_reload_that_conflicts_with_a_dynamic_service_is_refused() {
    let mut d = daemon("conflict");
    let mut c = start(&mut d).await;
    version(
        c.create_service(pb::CreateServiceRequest {
            service: Some(service("api", 2, vec![backend(20, 8080, 1)])),
            ..Default::default()
        })
        .await,
        "create",
    );
    let text = std::fs::read_to_string(d.config_path()).unwrap()
        + "\n[[services]]\nname = \"other\"\nvip = \"198.18.100.2\"\nport = 80\nprotocol = \"tcp\"\nbackends = [ { address = \"198.18.1.12\", port = 80 } ]\n";
    std::fs::write(d.config_path(), text).unwrap();
    d.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = d.log_text();
        if let Some(l) = log.lines().find(|l| l.contains("reload refused")) {
            break l.to_owned();
        }
        assert!(Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("{line}");
    assert!(
        line.contains("services[\"api\"].port: 198.18.100.2:80/tcp is already served by static service \"other\""),
        "{line}"
    );
    assert_eq!(state(&mut c).await.version, 1);
    stop(&mut d).await;
}

#[test]
fn a_corrupt_state_json_to_migrate_stops_the_start_naming_it() {
    let mut d = daemon("corrupt");
    std::fs::create_dir_all(d.state_dir()).unwrap();
    std::fs::write(d.legacy_state_file(), "{\"format\": 1, \"state\": {\"version\": 3, \"servi").unwrap();
    d.spawn();
    let status = d.wait();
    let log = d.log_text();
    println!("{}", log.lines().last().unwrap_or_default());
    assert_eq!(status.code(), Some(1), "{log}");
    let want = format!("vipgated: state file {}: not valid JSON", d.legacy_state_file().display());
    assert!(log.contains(&want), "wanted {want:?} in {log}");
    assert!(!log.contains("initialising EAL"), "EAL started: {log}");
    // The file is left as it was, for the operator, and nothing replaces it.
    assert!(std::fs::read_to_string(d.legacy_state_file()).unwrap().ends_with("\"servi"));
    assert!(!d.state_file().exists());
}

/// Starts vipgated on a damaged database and checks that it stops before
/// EAL, naming the file and the way back, and leaves the file as it was.
fn assert_refused_as_damaged(d: &mut NullGateway, what: &str) {
    let bytes = std::fs::read(d.state_file()).unwrap();
    d.spawn();
    let status = d.wait();
    let log = d.log_text();
    println!("{what}: {}", log.lines().last().unwrap_or_default());
    assert_eq!(status.code(), Some(1), "{what}: {log}");
    let path = d.state_file().display().to_string();
    for want in [
        format!("vipgated: state file {path}: redb cannot open it"),
        format!(
            "To recover: move {path} away, start vipgated (with no dynamic services), and restore the last export with `vipgatectl state import FILE`"
        ),
    ] {
        assert!(log.contains(&want), "{what}: wanted {want:?} in {log}");
    }
    assert!(!log.contains("initialising EAL"), "{what}: EAL started: {log}");
    assert_eq!(std::fs::read(d.state_file()).unwrap(), bytes, "{what}: the file was changed");
}

#[tokio::test]
async fn a_damaged_state_database_stops_the_start_naming_it_and_the_way_back() {
    let mut d = daemon("damaged");
    let mut c = start(&mut d).await;
    version(
        c.create_service(pb::CreateServiceRequest {
            service: Some(service("api", 2, vec![backend(20, 8080, 1)])),
            ..Default::default()
        })
        .await,
        "create",
    );
    drop(c);
    stop(&mut d).await;
    // A digit of the service's record: still valid JSON, only its page's
    // checksum tells.
    let mut bytes = std::fs::read(d.state_file()).unwrap();
    let needle = br#""name":"api","vip":"198.18.100.2""#;
    let at = bytes.windows(needle.len()).position(|w| w == needle).expect("the record is in the file");
    bytes[at + needle.len() - 2] = b'3';
    std::fs::write(d.state_file(), &bytes).unwrap();
    assert_refused_as_damaged(&mut d, "a flipped byte");
    let half = bytes.len() / 2;
    std::fs::write(d.state_file(), &bytes[..half]).unwrap();
    assert_refused_as_damaged(&mut d, "truncated");
    std::fs::write(d.state_file(), vec![0x5a; 64 * 1024]).unwrap();
    assert_refused_as_damaged(&mut d, "garbage");
    // Moved away, as the message says: vipgated starts with no dynamic
    // services.
    std::fs::rename(d.state_file(), d.state_file().with_extension("damaged")).unwrap();
    let mut c = start(&mut d).await;
    let s = state(&mut c).await;
    assert_eq!((s.version, dynamic_services(&s).len()), (0, 0));
    drop(c);
    stop(&mut d).await;
}

#[tokio::test]
async fn a_state_json_of_an_earlier_version_is_migrated_at_start() {
    use vipgate_controlplane::state::{
        AdminState, BackendState, DesiredState, ModeState, PoolState, ProtocolState, RemovalState, ServiceState,
    };
    let mut d = daemon("migrate");
    let mut old = DesiredState { version: 7, ..DesiredState::default() };
    old.services.insert(
        "api".to_owned(),
        ServiceState {
            name: "api".to_owned(),
            vip: "198.18.100.2".parse().unwrap(),
            port: 80,
            protocol: ProtocolState::Tcp,
            mode: ModeState::Nat,
            table_size: 251,
            on_backend_removal: RemovalState::Rehash,
            backends: vec![BackendState {
                address: "198.18.1.20".parse().unwrap(),
                port: 8080,
                weight: 4,
                admin_state: AdminState::Enabled,
            }],
            health_check: None,
            new_flow_limit: None,
            source_ranges: Vec::new(),
            affinity: Default::default(),
            owner: "cli".to_owned(),
        },
    );
    old.source_pools.insert(
        "snat".to_owned(),
        PoolState {
            name: "snat".to_owned(),
            addresses: vec!["198.18.1.101".parse().unwrap()],
            first_port: 1024,
            last_port: 65535,
            owner: "cli".to_owned(),
        },
    );
    std::fs::create_dir_all(d.state_dir()).unwrap();
    // As a vipgated from before owners wrote it: no owner fields.
    let mut value = serde_json::json!({ "format": 1, "state": &old });
    for kind in ["services", "source_pools"] {
        for (_, object) in value["state"][kind].as_object_mut().unwrap().iter_mut() {
            object.as_object_mut().unwrap().remove("owner");
        }
    }
    let text = value.to_string();
    assert!(!text.contains("owner"), "{text}");
    std::fs::write(d.legacy_state_file(), &text).unwrap();

    let mut c = start(&mut d).await;
    let s = state(&mut c).await;
    assert_eq!(s.version, 7);
    assert_eq!(dynamic_services(&s), [service("api", 2, vec![backend(20, 8080, 4)])]);
    assert!(s.source_pools.contains(&pool("snat", 101)), "{s:?}");
    let log = d.log_text();
    let migrated = d.state_dir().join("state.json.migrated");
    for want in [
        format!("state imported from={} to={}", d.legacy_state_file().display(), d.state_file().display()),
        format!(
            "state migrated; the old state file is kept as a backup from={} to={}",
            d.legacy_state_file().display(),
            migrated.display()
        ),
    ] {
        assert!(log.contains(&want), "wanted {want:?} in {log}");
    }
    println!(
        "{}",
        log.lines().filter(|l| l.contains("state imported") || l.contains("migrated")).collect::<Vec<_>>().join("\n")
    );
    assert!(!d.legacy_state_file().exists());
    assert_eq!(std::fs::read_to_string(&migrated).unwrap(), text, "the backup is the file as it was");

    // Changes go to the database; a restart restores them, not the backup.
    let v = version(
        c.add_backend(pb::AddBackendRequest {
            service: "api".into(),
            backend: Some(backend(21, 8080, 1)),
            ..Default::default()
        })
        .await,
        "add",
    );
    assert_eq!(v, 8);
    let before = state(&mut c).await;
    drop(c);
    stop(&mut d).await;
    let mut c = start(&mut d).await;
    assert_eq!(state(&mut c).await, before);
    assert!(!d.log_text().contains("state imported"), "imported once");
    drop(c);
    stop(&mut d).await;
}

/// `path` made immutable (`chattr +i`) until dropped: every write to it
/// fails, even an open file's, even root's (whom permissions would not
/// stop).
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(path: &std::path::Path) -> Immutable {
        chattr("+i", path);
        Immutable(path.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

fn chattr(flag: &str, path: &std::path::Path) {
    let out = std::process::Command::new("chattr").arg(flag).arg(path).output().expect("chattr (e2fsprogs) runs");
    assert!(
        out.status.success(),
        "chattr {flag} {} failed (needs root and a file system with the immutable attribute): {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_change_that_cannot_be_persisted_is_unavailable_and_changes_nothing() {
    let mut d = daemon("nodisk");
    let mut c = start(&mut d).await;
    version(
        c.create_service(pb::CreateServiceRequest {
            service: Some(service("api", 2, vec![backend(20, 8080, 1)])),
            ..Default::default()
        })
        .await,
        "create",
    );
    let before = state(&mut c).await;
    let immutable = Immutable::set(&d.state_file());
    let e = c
        .add_backend(pb::AddBackendRequest {
            service: "api".into(),
            backend: Some(backend(21, 8080, 1)),
            ..Default::default()
        })
        .await
        .expect_err("a change that cannot be written is refused");
    println!("{:?}: {}", e.code(), e.message());
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(
        e.message().contains(&d.state_file().display().to_string()) && e.message().contains("nothing was changed"),
        "{}",
        e.message()
    );
    assert_eq!(state(&mut c).await, before);
    // Fixed, the same call goes through with the next version, and so do
    // the changes after it.
    drop(immutable);
    let r = c
        .add_backend(pb::AddBackendRequest {
            service: "api".into(),
            backend: Some(backend(21, 8080, 1)),
            ..Default::default()
        })
        .await;
    assert_eq!(version(r, "add"), before.version + 1);
    let r = c
        .add_backend(pb::AddBackendRequest {
            service: "api".into(),
            backend: Some(backend(22, 8080, 1)),
            ..Default::default()
        })
        .await;
    assert_eq!(version(r, "add"), before.version + 2);
    let after = state(&mut c).await;
    drop(c);
    stop(&mut d).await;
    let stored = stored(&d);
    assert_eq!(stored.version, after.version);
    assert_eq!(stored.services["api"].backends.len(), 3);
}

#[tokio::test]
async fn a_file_that_conflicts_with_the_persisted_state_stops_the_start_before_eal() {
    let mut d = daemon("startconflict");
    let mut c = start(&mut d).await;
    version(
        c.create_service(pb::CreateServiceRequest {
            service: Some(service("api", 2, vec![backend(20, 8080, 1)])),
            ..Default::default()
        })
        .await,
        "create",
    );
    drop(c);
    stop(&mut d).await;
    let text = std::fs::read_to_string(d.config_path()).unwrap()
        + "\n[[services]]\nname = \"api\"\nvip = \"198.18.100.7\"\nport = 80\nprotocol = \"tcp\"\nbackends = [ { address = \"198.18.1.12\", port = 80 } ]\n";
    std::fs::write(d.config_path(), text).unwrap();
    d.spawn();
    let status = d.wait();
    let log = d.log_text();
    println!("{}", log.lines().last().unwrap_or_default());
    assert_eq!(status.code(), Some(1), "{log}");
    let want = format!(
        "the dynamic state in {} does not fit the configuration: services[\"api\"].name: a static service named \"api\" is defined in {}",
        d.state_file().display(),
        d.config_path().display()
    );
    assert!(log.contains(&want), "wanted {want:?} in {log}");
    assert!(!log.contains("initialising EAL"), "EAL started: {log}");
}

#[tokio::test]
async fn the_backend_capacity_is_enforced_and_a_removed_backends_slot_is_reused() {
    let mut d = NullGateway::builder("scap").dataplane_config("max_backends = 16\n").extra_config(STATIC_POOL).build();
    let mut c = start(&mut d).await;
    let mut gw = vipgate_controlplane::api::connect_unix(&d.socket()).await.expect("Gateway client");
    // The static service "web" has 1 backend: 15 slots are left.
    let fifteen = service("fifteen", 10, (0..15).map(|i| backend(20 + i, 8080, 1)).collect());
    version(
        c.create_service(pb::CreateServiceRequest { service: Some(fifteen), ..Default::default() }).await,
        "15 backends",
    );
    let before = state(&mut c).await;

    let one_more = service("one-more", 11, vec![backend(60, 8080, 1)]);
    let refused = c
        .create_service(pb::CreateServiceRequest { service: Some(one_more.clone()), ..Default::default() })
        .await
        .expect_err("a 17th backend is over [dataplane] max_backends = 16");
    println!("{:?}: {}", refused.code(), refused.message());
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("max_backends = 16"), "{}", refused.message());
    let after = state(&mut c).await;
    assert_eq!((after.version, after.services.len()), (before.version, before.services.len()), "nothing changed");

    // Deleting the 15 frees their slots (no flow counts in them).
    version(
        c.delete_service(pb::DeleteServiceRequest { name: "fifteen".to_owned(), ..Default::default() }).await,
        "delete",
    );
    version(
        c.create_service(pb::CreateServiceRequest { service: Some(one_more), ..Default::default() }).await,
        "now it fits",
    );

    let stats = gw
        .get_service_stats(pb::GetServiceStatsRequest { service: "one-more".to_owned() })
        .await
        .expect("GetServiceStats")
        .into_inner();
    assert_eq!(stats.services.len(), 1);
    let s = &stats.services[0];
    assert_eq!(
        (s.vip.as_str(), s.port, s.protocol.as_str(), s.mode.as_str(), s.table_size),
        ("198.18.100.11", 80, "tcp", "nat", 251)
    );
    assert_eq!(s.backends.len(), 1);
    assert_eq!((s.backends[0].address.as_str(), s.backends[0].port, s.backends[0].weight), ("198.18.1.60", 8080, 1));
    assert_eq!(s.backends[0].stats, Some(pb::TrafficStats::default()), "a reused slot starts from zero");
    let all = gw.get_service_stats(pb::GetServiceStatsRequest::default()).await.expect("all").into_inner();
    let names: Vec<&str> = all.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web", "one-more"], "file first, then the API's");
    let missing = gw
        .get_service_stats(pb::GetServiceStatsRequest { service: "nope".to_owned() })
        .await
        .expect_err("no such service");
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("\"nope\""), "{}", missing.message());
    stop(&mut d).await;
}

#[tokio::test]
async fn an_oversized_request_on_the_socket_is_refused_with_out_of_range_and_changes_nothing() {
    let mut d = daemon("big");
    let mut c = start(&mut d).await;
    let before = state(&mut c).await;
    // 5 MiB of services, over the default [api] max_request_bytes (4 MiB).
    let services: Vec<pb::Service> = (0..20_000u32)
        .map(|i| pb::Service { name: format!("s{i:0>250}"), ..service("x", 50, vec![backend(20, 8080, 1)]) })
        .collect();
    let r = c
        .apply(pb::ApplyRequest {
            expected_version: before.version,
            services,
            source_pools: vec![],
            ..Default::default()
        })
        .await
        .expect_err("over the limit");
    println!("{:?}: {}", r.code(), r.message());
    assert_eq!(r.code(), Code::OutOfRange, "{}", r.message());
    assert!(r.message().contains("message length too large"), "{}", r.message());
    assert_eq!(state(&mut c).await.version, before.version);
    stop(&mut d).await;
}

/// Health checks through the API on a gateway whose backends exist
/// nowhere: every check sends from 127.0.0.1, which the kernel refuses to
/// route to a non-loopback address (EINVAL at connect), so no probe ever
/// leaves this host. What is checked is the lifecycle: a check is stored,
/// persisted and shown with its defaults; backends that join a running
/// gateway start down; after a restart, restored backends start up and
/// their first probe decides.
#[tokio::test]
async fn health_checks_are_persisted_and_a_restart_starts_every_backend_up() {
    let mut d = daemon("health");
    let mut c = start(&mut d).await;
    let check = |interval_ms: u32| pb::HealthCheck {
        kind: "http".into(),
        interval_ms,
        source: "127.0.0.1".into(),
        ..Default::default()
    };
    // Probed every 200 ms; and every hour, so its first probe (at a random
    // time within the hour) practically never comes during the test.
    let mut fast = service("fast", 2, vec![backend(20, 8080, 1)]);
    fast.health_check = Some(check(200));
    let mut slow = service("slow", 3, vec![backend(30, 8080, 1)]);
    slow.health_check = Some(check(3_600_000));
    version(c.create_service(pb::CreateServiceRequest { service: Some(fast), ..Default::default() }).await, "fast");
    let v =
        version(c.create_service(pb::CreateServiceRequest { service: Some(slow), ..Default::default() }).await, "slow");

    let health = |s: &pb::GetStateResponse, name: &str| {
        let b = &find(s, name).backends[0];
        (pb::HealthState::try_from(b.health).unwrap(), b.health_reason.clone())
    };
    let s = state(&mut c).await;
    assert_eq!(
        find(&s, "slow").health_check,
        Some(pb::HealthCheck {
            kind: "http".into(),
            interval_ms: 3_600_000,
            timeout_ms: 2000,
            rise: 2,
            fall: 3,
            path: "/".into(),
            expect_status: "200-399".into(),
            source: "127.0.0.1".into(),
            ..Default::default()
        }),
        "every field in force"
    );
    // Joined a running gateway: down until a probe passes.
    assert_eq!(health(&s, "slow"), (pb::HealthState::Down, String::new()));
    assert_eq!(health(&s, "web").0, pb::HealthState::Unchecked);
    // The fast one's first probe fails (and it stays down): its reason.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = state(&mut c).await;
        let (h, reason) = health(&s, "fast");
        if !reason.is_empty() {
            assert_eq!(h, pb::HealthState::Down);
            assert!(reason.contains("cannot bind") || reason.contains("Invalid argument"), "{reason}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no probe of fast within 5 s: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state(&mut c).await.version, v, "health takes no version");
    drop(c);
    stop(&mut d).await;
    let persisted = stored(&d);
    let check = persisted.services["slow"].health_check.as_ref().expect("persisted with its check");
    assert_eq!(check.interval_ms, 3_600_000, "{check:?}");

    // Restored at start: up until the first probe says otherwise.
    let mut c = start(&mut d).await;
    let mut watch = c.watch(pb::WatchRequest::default()).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().expect("the state");
    let Some(pb::watch_event::Event::Snapshot(s)) = first.event else { panic!("{first:?}") };
    assert_eq!(s.version, v);
    assert_eq!(health(&s, "slow"), (pb::HealthState::Up, String::new()), "a restart black-holes nothing");
    // fast's probes fail at once (fall 3 x 200 ms): on a loaded machine it
    // may be down before this watch began, and the state it sent says so;
    // otherwise the watch delivers the transition.
    if health(&s, "fast").0 == pb::HealthState::Down {
        assert!(!health(&s, "fast").1.is_empty(), "down with the probe's reason: {s:?}");
    } else {
        assert_eq!(health(&s, "fast").0, pb::HealthState::Up, "restored up until its probes decide");
        let event = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let e = watch.message().await.unwrap().expect("an event");
                if let Some(pb::watch_event::Event::Health(h)) = e.event {
                    return (e.version, h);
                }
            }
        })
        .await
        .expect("fast goes down once its probes fail");
        assert_eq!((event.0, event.1.service.as_str()), (v, "fast"));
        assert_eq!(pb::HealthState::try_from(event.1.health).unwrap(), pb::HealthState::Down);
    }
    assert_eq!(health(&state(&mut c).await, "slow").0, pb::HealthState::Up);
    drop(watch);
    drop(c);
    stop(&mut d).await;
}

/// `vipgatectl` on the daemon's socket; must succeed.
fn ctl(d: &NullGateway, args: &[&str]) -> String {
    let out = std::process::Command::new(vipgate::workspace_bin("vipgatectl"))
        .arg("--socket")
        .arg(d.socket())
        .args(args)
        .env_remove("VIPGATE_ENDPOINT")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "vipgatectl {args:?}: {}\n{stdout}{stderr}", out.status);
    stdout.into_owned()
}

#[tokio::test]
async fn a_new_flow_limit_is_set_shown_persisted_and_refused_out_of_bounds() {
    // The static service has one, from the configuration file.
    let mut d = NullGateway::builder("slimit")
        .extra_config(STATIC_POOL)
        .services(
            "[[services]]\nname = \"web\"\nvip = \"198.18.100.1\"\nport = 80\nprotocol = \"tcp\"\n\
             new_flow_limit = { per_second = 9, prefix_len = 20 }\n\
             backends = [ { address = \"198.18.1.11\", port = 8080 } ]\n",
        )
        .build();
    let mut c = start(&mut d).await;
    let limit = |per_second, burst, prefix_len| Some(pb::NewFlowLimit { per_second, burst, prefix_len });
    let s = state(&mut c).await;
    assert_eq!(find(&s, "web").new_flow_limit, limit(9, 9, Some(20)), "the file's, every field in force");

    let mut svc = service("limited", 2, vec![backend(20, 8080, 1)]);
    svc.new_flow_limit = limit(100, 0, None);
    let created = version(
        c.create_service(pb::CreateServiceRequest { service: Some(svc.clone()), ..Default::default() }).await,
        "create",
    );
    assert_eq!(find(&state(&mut c).await, "limited").new_flow_limit, limit(100, 100, Some(32)));
    svc.new_flow_limit = limit(5, 10, Some(24));
    let v = version(
        c.update_service(pb::UpdateServiceRequest { service: Some(svc.clone()), ..Default::default() }).await,
        "update",
    );
    assert_eq!(v, created + 1, "a change of the limit alone is a change");
    assert_eq!(find(&state(&mut c).await, "limited").new_flow_limit, limit(5, 10, Some(24)));

    for (bad, message) in [
        (limit(0, 0, None), "services[\"limited\"].new_flow_limit.per_second: 0 is not from 1 to 1000000"),
        (
            limit(2_000_000, 0, None),
            "services[\"limited\"].new_flow_limit.per_second: 2000000 is not from 1 to 1000000",
        ),
        (limit(5, 1_000_001, None), "services[\"limited\"].new_flow_limit.burst: 1000001 is not from 1 to 1000000"),
        (
            limit(5, 0, Some(33)),
            "services[\"limited\"].new_flow_limit.prefix_len: 33 is not a prefix length from 0 to 32",
        ),
    ] {
        let mut s = svc.clone();
        s.new_flow_limit = bad;
        let e = c
            .update_service(pb::UpdateServiceRequest { service: Some(s), ..Default::default() })
            .await
            .expect_err(message);
        assert_eq!((e.code(), e.message()), (Code::InvalidArgument, message));
    }
    let s = state(&mut c).await;
    assert_eq!(s.version, v, "refused requests change nothing");
    assert_eq!(find(&s, "limited").new_flow_limit, limit(5, 10, Some(24)));

    // vipgatectl sets it with flags and shows it in the listing and JSON.
    ctl(
        &d,
        &[
            "service",
            "create",
            "ctl",
            "--vip",
            "198.18.100.3",
            "--port",
            "80",
            "--protocol",
            "tcp",
            "--backend",
            "198.18.1.30:8080",
            "--new-flows-per-second",
            "7",
            "--new-flow-prefix-len",
            "16",
        ],
    );
    let listing = ctl(&d, &["list"]);
    assert!(listing.contains("new-flows 7/s burst 7 per /16"), "{listing}");
    assert!(listing.contains("new-flows 9/s burst 9 per /20"), "{listing}");
    let json: serde_json::Value = serde_json::from_str(&ctl(&d, &["--json", "list"])).unwrap();
    let of = |name: &str| json["services"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap().clone();
    assert_eq!(of("ctl")["new_flow_limit"], serde_json::json!({ "per_second": 7, "burst": 7, "prefix_len": 16 }));
    assert_eq!(of("limited")["new_flow_limit"], serde_json::json!({ "per_second": 5, "burst": 10, "prefix_len": 24 }));
    let v = state(&mut c).await.version;

    // Persisted: a restart restores it.
    drop(c);
    stop(&mut d).await;
    let mut c = start(&mut d).await;
    let s = state(&mut c).await;
    assert_eq!(s.version, v);
    assert_eq!(find(&s, "limited").new_flow_limit, limit(5, 10, Some(24)));
    assert_eq!(find(&s, "ctl").new_flow_limit, limit(7, 7, Some(16)));
    drop(c);
    stop(&mut d).await;
}

#[tokio::test]
async fn source_ranges_and_affinity_are_set_shown_persisted_and_refused_when_bad() {
    // The static service has them, from the configuration file.
    let mut d = NullGateway::builder("sopts")
        .extra_config(STATIC_POOL)
        .services(
            "[[services]]\nname = \"web\"\nvip = \"198.18.100.1\"\nport = 80\nprotocol = \"tcp\"\n\
             source_ranges = [\"203.0.113.0/24\"]\naffinity = \"client_ip\"\n\
             backends = [ { address = \"198.18.1.11\", port = 8080 } ]\n",
        )
        .build();
    let mut c = start(&mut d).await;
    let s = state(&mut c).await;
    assert_eq!(
        (find(&s, "web").source_ranges.clone(), find(&s, "web").affinity.as_str()),
        (vec!["203.0.113.0/24".to_owned()], "client_ip")
    );

    let mut svc = service("opts", 2, vec![backend(20, 8080, 1)]);
    version(
        c.create_service(pb::CreateServiceRequest { service: Some(svc.clone()), ..Default::default() }).await,
        "create",
    );
    let shown = find(&state(&mut c).await, "opts").clone();
    assert_eq!((shown.source_ranges.len(), shown.affinity.as_str()), (0, "none"), "the defaults in force");
    svc.source_ranges = vec!["198.18.0.0/15".into(), "192.0.2.9/32".into()];
    svc.affinity = "client_ip".into();
    let v = version(
        c.update_service(pb::UpdateServiceRequest { service: Some(svc.clone()), ..Default::default() }).await,
        "update",
    );
    let shown = find(&state(&mut c).await, "opts").clone();
    assert_eq!((shown.source_ranges, shown.affinity), (svc.source_ranges.clone(), svc.affinity.clone()));

    for (ranges, affinity, message) in [
        (
            vec!["198.18.0.1/15"],
            "",
            "services[\"opts\"].source_ranges[0]: \"198.18.0.1/15\" has host bits set; the prefix is 198.18.0.0/15",
        ),
        (
            vec!["10.0.0.0/8", "nope"],
            "",
            "services[\"opts\"].source_ranges[1]: \"nope\" needs a prefix length, such as 198.18.0.1/24",
        ),
        (vec![], "ClientIP", "services[\"opts\"].affinity: \"ClientIP\" is not \"none\" or \"client_ip\""),
    ] {
        let bad = pb::Service {
            source_ranges: ranges.into_iter().map(str::to_owned).collect(),
            affinity: affinity.to_owned(),
            ..svc.clone()
        };
        let e = c
            .update_service(pb::UpdateServiceRequest { service: Some(bad), ..Default::default() })
            .await
            .expect_err(message);
        assert_eq!((e.code(), e.message()), (Code::InvalidArgument, message));
    }
    let many = pb::Service { source_ranges: vec!["10.0.0.0/8".to_owned(); 257], ..svc.clone() };
    let e = c.update_service(pb::UpdateServiceRequest { service: Some(many), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.message(), "services[\"opts\"].source_ranges: 257 prefixes; at most 256 per service");
    assert_eq!(state(&mut c).await.version, v, "refused requests change nothing");

    // Persisted: a restart restores them.
    drop(c);
    stop(&mut d).await;
    let stored = stored(&d);
    assert_eq!(
        stored.services["opts"].source_ranges.iter().map(ToString::to_string).collect::<Vec<_>>(),
        svc.source_ranges
    );
    let mut c = start(&mut d).await;
    let s = state(&mut c).await;
    assert_eq!(s.version, v);
    assert_eq!(
        (find(&s, "opts").source_ranges.clone(), find(&s, "opts").affinity.clone()),
        (svc.source_ranges, svc.affinity)
    );
    drop(c);
    stop(&mut d).await;
}

/// A controller (owner `k8s/prod`) and a person (`cli`) share the gateway:
/// the controller's owner-scoped Applies and batches replace and change its
/// objects only, at its generation; GetState and Watch filtered by owner
/// show its objects and changes only; owners and generations survive a
/// restart.
#[tokio::test]
async fn owners_share_a_gateway_and_see_only_their_own_objects() {
    use pb::batch_operation::Operation;
    const K8S: &str = "k8s/prod";
    let mut d = daemon("owners");
    let mut c = start(&mut d).await;
    version(
        c.create_service(pb::CreateServiceRequest {
            service: Some(service("by-hand", 2, vec![backend(20, 8080, 1)])),
            ..Default::default()
        })
        .await,
        "create by hand",
    );
    let mut watch = c.watch(pb::WatchRequest { owner: K8S.into() }).await.expect("Watch").into_inner();
    let first = watch.message().await.unwrap().expect("the initial state");
    let Some(pb::watch_event::Event::Snapshot(s)) = &first.event else { panic!("not the state: {first:?}") };
    assert_eq!((s.services.len(), s.source_pools.len()), (0, 0), "the controller owns nothing yet: {s:?}");
    assert_eq!(s.generations, std::collections::HashMap::from([(K8S.to_owned(), 0)]));

    let owned = |name: &str, last: u8, b: u8| pb::Service {
        owner: K8S.into(),
        ..service(name, last, vec![backend(b, 8080, 1)])
    };
    let apply = |generation: u64, services: Vec<pb::Service>| pb::ApplyRequest {
        owner: K8S.into(),
        expected_generation: generation,
        services,
        ..Default::default()
    };
    // Listed without an owner, an object takes the Apply's.
    let a = pb::Service { owner: String::new(), ..owned("k8s-a", 3, 30) };
    let r = c.apply(apply(0, vec![a, owned("k8s-b", 4, 31)])).await.expect("first Apply").into_inner();
    assert_eq!((r.version, r.generation), (2, 1));
    // The person's change is not the controller's business.
    version(
        c.update_backend(pb::UpdateBackendRequest {
            service: "by-hand".into(),
            address: "198.18.1.20".into(),
            port: 8080,
            weight: Some(5),
            ..Default::default()
        })
        .await,
        "update by hand",
    );
    // One batch: a backend for k8s-a, k8s-b deleted, k8s-c created.
    let operations = [
        Operation::AddBackend(pb::AddBackendRequest {
            service: "k8s-a".into(),
            backend: Some(backend(32, 8080, 2)),
            ..Default::default()
        }),
        Operation::DeleteService("k8s-b".into()),
        Operation::CreateService(owned("k8s-c", 5, 33)),
    ]
    .into_iter()
    .map(|o| pb::BatchOperation { operation: Some(o) })
    .collect();
    let r = c
        .batch(pb::BatchRequest { operations, owner: K8S.into(), expected_generation: Some(1) })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!((r.version, r.generation), (4, 2));
    // The next Apply from the controller's view replaces its objects only.
    let r = c.apply(apply(2, vec![owned("k8s-c", 5, 33)])).await.expect("second Apply").into_inner();
    assert_eq!((r.version, r.generation), (5, 3));

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .unwrap();
        let Some(pb::watch_event::Event::Change(ch)) = e.event else { panic!("not a change: {e:?}") };
        println!("k8s/prod watch: version {} {ch:?}", e.version);
        seen.push((e.version, ch.cause, ch.services_changed, ch.services_deleted, ch.owners));
    }
    let k8s = || vec![K8S.to_owned()];
    let names = |n: &[&str]| n.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        seen,
        [
            (2, "Apply".to_owned(), names(&["k8s-a", "k8s-b"]), vec![], k8s()),
            (4, "Batch".to_owned(), names(&["k8s-a", "k8s-c"]), names(&["k8s-b"]), k8s()),
            (5, "Apply".to_owned(), vec![], names(&["k8s-a"]), k8s()),
        ],
        "the person's change (version 3) is not sent to the controller's watch"
    );

    let mine = c.get_state(pb::GetStateRequest { owner: K8S.into() }).await.unwrap().into_inner();
    let names_of = |s: &pb::GetStateResponse| s.services.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    assert_eq!(names_of(&mine), ["k8s-c"]);
    assert_eq!(mine.generations, std::collections::HashMap::from([(K8S.to_owned(), 3)]));
    let all = state(&mut c).await;
    assert_eq!(names_of(&all), ["by-hand", "k8s-c", "web"]);
    assert_eq!(find(&all, "by-hand").owner, "cli");
    assert_eq!(find(&all, "k8s-c").owner, K8S);
    assert_eq!(find(&all, "web").owner, "", "a static service has no owner");
    let generations = std::collections::HashMap::from([("cli".to_owned(), 2), (K8S.to_owned(), 3)]);
    assert_eq!(all.generations, generations);

    drop(watch);
    stop(&mut d).await;
    let mut c = start(&mut d).await;
    let again = state(&mut c).await;
    assert_eq!((again.version, &again.generations), (5, &generations));
    assert_eq!(again.services, all.services, "owners survive a restart");
    stop(&mut d).await;
}
