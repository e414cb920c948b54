//! The gRPC API end to end: `serve_unix` with a fake gateway, called through
//! `connect_unix` and through the `vipgatectl` binary.
//!
//! Every test runs on `#[tokio::test]`'s current-thread runtime, as vipgated
//! does on the DPDK main lcore, and uses its own socket directory under the
//! system temp dir, removed at the end.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vipgate_controlplane::api::{
    self, ApiError, GatewayView, MempoolView, PortLink, PortStats, PortView, WorkerView, pb,
};
use vipgate_dataplane::counters::{DropReason, WorkerCounters};
use vipgate_dataplane::loaded::LoadedSnapshot;

/// A gateway with two workers, one port and fixed counters.
struct FakeGateway {
    workers: Vec<WorkerView>,
    serving: AtomicBool,
    /// How long ago each worker last completed a loop iteration.
    since_last_loop: std::sync::Mutex<[Option<Duration>; 2]>,
    /// The port's link as last read (the port is an uplink).
    link: std::sync::Mutex<Option<PortLink>>,
}

impl FakeGateway {
    fn new() -> Arc<Self> {
        let w1 = WorkerCounters::default();
        w1.rx_packets.add(100);
        w1.rx_bytes.add(6_400);
        w1.tx_packets.add(90);
        w1.tx_bytes.add(5_760);
        w1.nat_forward.add(60);
        w1.nat_reverse.add(30);
        w1.arp_replies.add(2);
        w1.arp_requests.add(1);
        w1.icmp_echo_replies.add(4);
        w1.busy_polls.add(10);
        w1.busy_cycles.add(12_345);
        for _ in 0..3 {
            w1.count_drop(DropReason::NoService);
        }
        let w2 = WorkerCounters::default();
        w2.rx_packets.add(200);
        w2.tx_packets.add(195);
        w2.count_drop(DropReason::NoService);
        w2.count_drop(DropReason::TxFull);
        // Worker 1 forwards with version 7 (generation 3); worker 2 sleeps.
        let s1 = LoadedSnapshot::default();
        s1.record(7, 3, 1_000);
        let s2 = LoadedSnapshot::default();
        s2.record(6, 2, 2_000);
        s2.set_idle(true);
        Arc::new(FakeGateway {
            workers: vec![
                WorkerView { lcore: 1, counters: Arc::new(w1), snapshot: Arc::new(s1), since_last_loop: None },
                WorkerView { lcore: 2, counters: Arc::new(w2), snapshot: Arc::new(s2), since_last_loop: None },
            ],
            serving: AtomicBool::new(true),
            since_last_loop: std::sync::Mutex::new([Some(Duration::from_micros(3)), Some(Duration::from_millis(10))]),
            link: std::sync::Mutex::new(Some(PortLink { up: true, speed_mbps: Some(25_000), full_duplex: true })),
        })
    }
}

impl GatewayView for FakeGateway {
    fn workers(&self) -> Vec<WorkerView> {
        let ages = *self.since_last_loop.lock().unwrap();
        self.workers.iter().zip(ages).map(|(w, age)| WorkerView { since_last_loop: age, ..w.clone() }).collect()
    }

    fn ports(&self) -> Vec<PortView> {
        vec![PortView {
            name: "uplink".to_owned(),
            port_id: 0,
            mac: [0x02, 0, 0, 0, 0xab, 0x01],
            stats: PortStats {
                ipackets: 300,
                opackets: 285,
                ibytes: 19_200,
                obytes: 18_000,
                imissed: 7,
                ierrors: 1,
                oerrors: 2,
                rx_nombuf: 5,
            },
            link: *self.link.lock().unwrap(),
            uplink: true,
            members: Vec::new(),
        }]
    }

    fn mempool(&self) -> MempoolView {
        MempoolView { name: "mbuf_pool_0".to_owned(), size: 8191, in_use: 1024 }
    }

    fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }
}

/// A private directory for one test's socket, removed on drop (also when the
/// test fails).
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vipgate-api-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test directory");
        TestDir(dir)
    }

    /// The socket path, one level below the directory so that `serve_unix`
    /// has to create its parent.
    fn socket(&self) -> PathBuf {
        self.0.join("run").join("vipgated.sock")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `serve_unix` task.
struct Server {
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ApiError>>,
}

impl Server {
    async fn start(path: &Path, view: Arc<dyn GatewayView>) -> Self {
        let (tx, rx) = oneshot::channel::<()>();
        let owned = path.to_owned();
        let task = tokio::spawn(async move {
            api::serve_unix(&owned, view, async {
                let _ = rx.await;
            })
            .await
        });
        wait_for_socket(path).await;
        Server { shutdown: Some(tx), task }
    }

    /// Stops the server and returns how `serve_unix` ended.
    async fn stop(mut self) -> Result<(), ApiError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("serve_unix stops within 10 s of shutdown")
            .expect("the server task does not panic")
    }
}

/// Waits until something accepts connections on `path` (a file there may be
/// a stale socket the server has not replaced yet).
async fn wait_for_socket(path: &Path) {
    for _ in 0..500 {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nothing listens on {} after 5 s", path.display());
}

/// Runs vipgatectl without blocking the runtime thread, which must keep
/// serving the API while the child process talks to it.
async fn vipgatectl(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_vipgatectl"))
            .args(&args)
            .env_remove("VIPGATE_SOCKET")
            .output()
            .expect("run vipgatectl")
    })
    .await
    .expect("the vipgatectl runner does not panic")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn drops(c: &pb::PacketCounters, reason: &str) -> u64 {
    c.drops.iter().find(|d| d.reason == reason).map(|d| d.packets).unwrap_or_else(|| panic!("no {reason} entry"))
}

#[tokio::test]
async fn health_and_counters_over_the_socket() {
    let dir = TestDir::new("calls");
    let path = dir.socket();
    let gateway = FakeGateway::new();
    let server = Server::start(&path, gateway.clone()).await;

    let mode = std::fs::metadata(&path).expect("socket exists").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    // Only the socket itself is left in the directory: no temporary name.
    let entries: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("vipgated.sock")]);

    let mut client = api::connect_unix(&path).await.expect("connect");
    let health = client.get_health(pb::GetHealthRequest {}).await.expect("GetHealth").into_inner();
    assert_eq!(health.status(), pb::ServingStatus::Serving);
    assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
    assert!(health.uptime_seconds < 60, "uptime {}", health.uptime_seconds);
    assert_eq!((health.workers, health.ports), (2, 1));

    assert_eq!(health.reason, "");
    let up = pb::PortLink {
        name: "uplink".to_owned(),
        port_id: 0,
        state: pb::LinkState::Up.into(),
        speed_mbps: 25_000,
        full_duplex: true,
        uplink: true,
        ..Default::default()
    };
    assert_eq!(health.links.as_slice(), std::slice::from_ref(&up));
    assert!(!health.uplinks_down);

    // The only uplink goes down: every uplink is down, and the gateway
    // still serves (a link is no dataplane failure).
    *gateway.link.lock().unwrap() = Some(PortLink { up: false, speed_mbps: None, full_duplex: true });
    let health = client.get_health(pb::GetHealthRequest {}).await.expect("GetHealth").into_inner();
    let down = pb::PortLink { state: pb::LinkState::Down.into(), speed_mbps: 0, full_duplex: false, ..up.clone() };
    assert_eq!((health.status(), health.links, health.uplinks_down), (pb::ServingStatus::Serving, vec![down], true));
    // A driver that cannot tell withdraws nothing.
    *gateway.link.lock().unwrap() = None;
    let health = client.get_health(pb::GetHealthRequest {}).await.expect("GetHealth").into_inner();
    assert_eq!(health.links[0].state(), pb::LinkState::Unspecified);
    assert!(!health.uplinks_down);
    *gateway.link.lock().unwrap() = Some(PortLink { up: true, speed_mbps: Some(25_000), full_duplex: true });

    gateway.serving.store(false, Ordering::Relaxed);
    let health = client.get_health(pb::GetHealthRequest {}).await.expect("GetHealth").into_inner();
    assert_eq!(health.status(), pb::ServingStatus::NotServing);
    assert_eq!(health.reason, "the dataplane workers are not running");

    let counters = client.get_counters(pb::GetCountersRequest {}).await.expect("GetCounters").into_inner();
    let lcores: Vec<u32> = counters.workers.iter().map(|w| w.lcore).collect();
    assert_eq!(lcores, [1, 2]);
    let snapshots: Vec<Option<pb::WorkerSnapshot>> = counters.workers.iter().map(|w| w.snapshot).collect();
    assert_eq!(
        snapshots,
        [
            Some(pb::WorkerSnapshot { version: 7, generation: 3, idle: false, loaded_at_monotonic_ns: 1_000 }),
            Some(pb::WorkerSnapshot { version: 6, generation: 2, idle: true, loaded_at_monotonic_ns: 2_000 }),
        ]
    );
    let w1 = counters.workers[0].counters.as_ref().expect("worker 1 counters");
    let expected = (100, 6_400, 90, 5_760, 60, 30, 2, 1, 4, 10, 12_345);
    let got = (
        w1.rx_packets,
        w1.rx_bytes,
        w1.tx_packets,
        w1.tx_bytes,
        w1.nat_forward,
        w1.nat_reverse,
        w1.arp_replies,
        w1.arp_requests,
        w1.icmp_echo_replies,
        w1.busy_polls,
        w1.busy_cycles,
    );
    assert_eq!(got, expected);
    // Every reason is listed, zero or not, in the dataplane's order.
    let reasons: Vec<&str> = w1.drops.iter().map(|d| d.reason.as_str()).collect();
    let known: Vec<&str> = DropReason::ALL.iter().map(|r| r.name()).collect();
    assert_eq!(reasons, known);
    assert_eq!(drops(w1, "no_service"), 3);
    assert_eq!(drops(w1, "tx_full"), 0);

    let total = counters.total.as_ref().expect("total");
    assert_eq!((total.rx_packets, total.tx_packets, total.rx_bytes), (300, 285, 6_400));
    assert_eq!((drops(total, "no_service"), drops(total, "tx_full"), drops(total, "malformed")), (4, 1, 0));

    let mempool = counters.mempool.as_ref().expect("mempool");
    assert_eq!((mempool.name.as_str(), mempool.size, mempool.in_use), ("mbuf_pool_0", 8191, 1024));
    assert_eq!(counters.ports.len(), 1);
    let port = &counters.ports[0];
    assert_eq!((port.name.as_str(), port.port_id, port.mac.as_str()), ("uplink", 0, "02:00:00:00:ab:01"));
    assert_eq!((port.ipackets, port.opackets, port.ibytes, port.obytes), (300, 285, 19_200, 18_000));
    assert_eq!((port.imissed, port.ierrors, port.oerrors, port.rx_nombuf), (7, 1, 2, 5));

    drop(client);
    server.stop().await.expect("clean shutdown");
    assert!(!path.exists(), "the socket file is removed after shutdown");
}

#[tokio::test]
async fn a_worker_without_a_loop_for_a_second_makes_the_gateway_not_serving() {
    let dir = TestDir::new("stall");
    let path = dir.socket();
    let gateway = FakeGateway::new();
    let server = Server::start(&path, gateway.clone()).await;
    let mut client = api::connect_unix(&path).await.expect("connect");
    let mut health = async |ages: [Option<Duration>; 2]| {
        *gateway.since_last_loop.lock().unwrap() = ages;
        let h = client.get_health(pb::GetHealthRequest {}).await.expect("GetHealth").into_inner();
        (h.status(), h.reason)
    };
    let ms = Duration::from_millis;
    let serving = (pb::ServingStatus::Serving, String::new());
    // Busy, asleep idle, just under the limit, or not telling: serving.
    assert_eq!(health([Some(ms(0)), Some(ms(10))]).await, serving);
    assert_eq!(health([Some(ms(999)), Some(ms(999))]).await, serving);
    assert_eq!(health([None, None]).await, serving);
    // One worker without a loop for a second or more: not serving, and
    // which one says why.
    assert_eq!(
        health([Some(ms(1)), Some(ms(1_000))]).await,
        (pb::ServingStatus::NotServing, "worker loop stalled: lcore 2 for 1.0 s".to_owned())
    );
    assert_eq!(
        health([Some(ms(4_300)), Some(ms(71 * 60_000))]).await,
        (pb::ServingStatus::NotServing, "worker loop stalled: lcore 1 for 4.3 s, lcore 2 for 4260.0 s".to_owned())
    );
    // Running again.
    assert_eq!(health([Some(ms(1)), Some(ms(2))]).await, serving);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_second_server_on_a_live_socket_is_refused() {
    let dir = TestDir::new("live");
    let path = dir.socket();
    let server = Server::start(&path, FakeGateway::new()).await;

    let second = api::serve_unix(&path, FakeGateway::new(), std::future::pending()).await;
    match second {
        Err(e @ ApiError::AlreadyListening { .. }) => {
            assert_eq!(e.to_string(), format!("another vipgated is already listening on {}", path.display()));
        }
        other => panic!("expected AlreadyListening, got {other:?}"),
    }

    // The first server is untouched and still answers.
    let mut client = api::connect_unix(&path).await.expect("connect to the first server");
    client.get_health(pb::GetHealthRequest {}).await.expect("GetHealth");
    drop(client);
    server.stop().await.expect("clean shutdown");
    assert!(!path.exists());
}

#[tokio::test]
async fn a_stale_socket_is_replaced() {
    let dir = TestDir::new("stale");
    let path = dir.socket();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // A socket file nobody listens on, as a killed vipgated leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind the stale socket"));
    assert!(path.exists());

    let server = Server::start(&path, FakeGateway::new()).await;
    let mut client = api::connect_unix(&path).await.expect("connect to the new server");
    let health = client.get_health(pb::GetHealthRequest {}).await.expect("GetHealth").into_inner();
    assert_eq!(health.workers, 2);
    drop(client);
    server.stop().await.expect("clean shutdown");
    assert!(!path.exists());
}

#[tokio::test]
async fn shutdown_does_not_wait_for_idle_clients() {
    let dir = TestDir::new("idle");
    let path = dir.socket();
    let server = Server::start(&path, FakeGateway::new()).await;
    // A client that keeps its channel open, as a controller would.
    let mut client = api::connect_unix(&path).await.expect("connect");
    client.get_health(pb::GetHealthRequest {}).await.expect("GetHealth");

    server.stop().await.expect("clean shutdown with a client connected");
    assert!(!path.exists());
    let err = client.get_health(pb::GetHealthRequest {}).await.expect_err("the server is gone");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}

#[tokio::test]
async fn a_file_that_is_not_a_socket_is_left_alone() {
    let dir = TestDir::new("file");
    let path = dir.socket();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "not a socket").unwrap();

    let result = api::serve_unix(&path, FakeGateway::new(), std::future::ready(())).await;
    assert!(matches!(result, Err(ApiError::NotASocket { .. })), "{result:?}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
}

#[tokio::test]
async fn connect_to_a_missing_socket_names_the_path() {
    let dir = TestDir::new("missing-lib");
    let path = dir.socket();
    let err = api::connect_unix(&path).await.expect_err("nothing listens");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("is vipgated running?"), "{message}");
}

#[tokio::test]
async fn vipgatectl_json_output() {
    let dir = TestDir::new("ctl-json");
    let path = dir.socket();
    let socket = path.to_str().expect("UTF-8 temp dir");
    let server = Server::start(&path, FakeGateway::new()).await;

    let out = vipgatectl(&["--socket", socket, "--json", "stats"]).await;
    assert!(out.status.success(), "stats failed: {}", text(&out.stderr));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats --json is JSON");
    assert_eq!(stats["workers"][0]["lcore"], 1);
    assert_eq!(stats["workers"][0]["rx_packets"], 100);
    assert_eq!(stats["workers"][0]["busy_cycles"], 12_345);
    assert_eq!(stats["workers"][0]["drops"]["no_service"], 3);
    assert_eq!(stats["workers"][0]["drops"]["malformed"], 0);
    assert_eq!(stats["workers"][1]["lcore"], 2);
    assert_eq!(
        stats["workers"][0]["snapshot"],
        serde_json::json!({"version": 7, "generation": 3, "idle": false, "loaded_at_monotonic_ns": 1000})
    );
    // busy_cycles / (rx_packets + handoff_in), and the pool's figure.
    let per_packet = stats["workers"][0]["busy_cycles_per_packet"].as_f64().expect("a number");
    let (rx, handoff_in) =
        (stats["workers"][0]["rx_packets"].as_f64().unwrap(), stats["workers"][0]["handoff_in"].as_f64().unwrap());
    assert!((per_packet - 12_345.0 / (rx + handoff_in)).abs() < 1e-9, "{per_packet}");
    assert_eq!(stats["workers"][1]["mempool_in_use"], 1024);
    assert_eq!(stats["workers"][1]["snapshot"]["idle"], true);
    assert_eq!(stats["total"]["rx_packets"], 300);
    assert_eq!(stats["total"]["drops"]["no_service"], 4);
    assert_eq!(stats["total"]["drops"]["tx_full"], 1);
    assert!(stats["total"].get("lcore").is_none());
    let reasons: Vec<&str> =
        stats["total"]["drops"].as_object().expect("drops is an object").keys().map(String::as_str).collect();
    assert_eq!(reasons.len(), DropReason::COUNT);
    assert_eq!(stats["ports"][0]["name"], "uplink");
    assert_eq!(stats["ports"][0]["mac"], "02:00:00:00:ab:01");
    assert_eq!(stats["ports"][0]["imissed"], 7);
    assert_eq!(stats["ports"][0]["rx_nombuf"], 5);
    assert_eq!(stats["mempool"]["name"], "mbuf_pool_0");
    assert_eq!(stats["mempool"]["size"], 8191);
    assert_eq!(stats["mempool"]["in_use"], 1024);

    // `counters` is an alias, and flags may follow the command.
    let out = vipgatectl(&["counters", "--socket", socket, "--json"]).await;
    assert!(out.status.success(), "counters failed: {}", text(&out.stderr));
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).expect("counters --json is JSON");
    assert_eq!(again, stats);

    let out = vipgatectl(&["--socket", socket, "--json", "health"]).await;
    assert!(out.status.success(), "health failed: {}", text(&out.stderr));
    let health: serde_json::Value = serde_json::from_slice(&out.stdout).expect("health --json is JSON");
    assert_eq!(health["status"], "SERVING");
    assert_eq!(health["serving"], true);
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(health["workers"], 2);
    assert_eq!(health["ports"], 1);
    assert!(health["uptime_seconds"].is_u64());

    server.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn vipgatectl_tables() {
    let dir = TestDir::new("ctl-table");
    let path = dir.socket();
    let socket = path.to_str().expect("UTF-8 temp dir");
    let server = Server::start(&path, FakeGateway::new()).await;

    let out = vipgatectl(&["--socket", socket, "stats"]).await;
    assert!(out.status.success(), "stats failed: {}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("lcore 1"), "{table}");
    assert!(table.contains("total"), "{table}");
    assert!(table.contains("no_service"), "{table}");
    assert!(table.contains("uplink"), "{table}");
    assert!(table.contains("mbuf_pool_0: 1024 of 8191"), "{table}");
    // Reasons that counted nothing are hidden unless asked for.
    assert!(!table.contains("malformed"), "{table}");
    let out = vipgatectl(&["--socket", socket, "stats", "--all"]).await;
    assert!(text(&out.stdout).contains("malformed"), "{}", text(&out.stdout));

    let out = vipgatectl(&["--socket", socket, "health"]).await;
    assert!(out.status.success(), "health failed: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("SERVING"), "{}", text(&out.stdout));

    server.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn vipgatectl_takes_the_socket_from_the_environment() {
    let dir = TestDir::new("ctl-env");
    let path = dir.socket();
    let server = Server::start(&path, FakeGateway::new()).await;

    let env_path = path.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_vipgatectl"))
            .args(["--json", "health"])
            .env("VIPGATE_SOCKET", &env_path)
            .output()
            .expect("run vipgatectl")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "health failed: {}", text(&out.stderr));

    server.stop().await.expect("clean shutdown");
}

/// A server whose every call fails, to see what vipgatectl makes of it.
struct FailingGateway;

#[tonic::async_trait]
impl pb::gateway_server::Gateway for FailingGateway {
    async fn get_health(
        &self,
        _: tonic::Request<pb::GetHealthRequest>,
    ) -> Result<tonic::Response<pb::GetHealthResponse>, tonic::Status> {
        Err(tonic::Status::unavailable("the dataplane is restarting"))
    }

    async fn get_counters(
        &self,
        _: tonic::Request<pb::GetCountersRequest>,
    ) -> Result<tonic::Response<pb::GetCountersResponse>, tonic::Status> {
        Err(tonic::Status::unavailable("the dataplane is restarting"))
    }

    async fn get_service_stats(
        &self,
        _: tonic::Request<pb::GetServiceStatsRequest>,
    ) -> Result<tonic::Response<pb::GetServiceStatsResponse>, tonic::Status> {
        Err(tonic::Status::unavailable("the dataplane is restarting"))
    }
}

#[tokio::test]
async fn vipgatectl_prints_the_servers_reason() {
    let dir = TestDir::new("ctl-status");
    let path = dir.socket();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::gateway_server::GatewayServer::new(FailingGateway))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), async {
                let _ = rx.await;
            }),
    );

    let socket = path.to_str().expect("UTF-8 temp dir");
    let out = vipgatectl(&["--socket", socket, "stats"]).await;
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "vipgatectl: GetCounters failed: the dataplane is restarting\n");
    assert!(out.stdout.is_empty());

    let _ = tx.send(());
    server.await.expect("server task").expect("server");
}

#[test]
fn vipgatectl_reports_a_missing_daemon() {
    let dir = TestDir::new("ctl-missing");
    let path = dir.socket();
    let out = Command::new(env!("CARGO_BIN_EXE_vipgatectl"))
        .arg("--socket")
        .arg(&path)
        .arg("stats")
        .env_remove("VIPGATE_SOCKET")
        .output()
        .expect("run vipgatectl");
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&format!("cannot connect to vipgated at {}", path.display())), "{stderr}");
    assert!(stderr.contains("is vipgated running?"), "{stderr}");
    // One readable line, not a debug dump.
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn vipgatectl_usage_errors_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_vipgatectl")).arg("frobnicate").output().expect("run vipgatectl");
    assert_eq!(out.status.code(), Some(2));
}

/// Sends request bodies as given, bytes that need not be valid protobuf.
struct RawCodec;

struct RawEncoder;

struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = prost::bytes::Buf::remaining(src);
        Ok(Some(prost::bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

#[tokio::test]
async fn an_undecodable_request_is_invalid_argument_with_the_decoders_message() {
    let dir = TestDir::new("undecodable");
    let path = dir.socket();
    let server = Server::start(&path, FakeGateway::new()).await;
    let channel = api::connect_unix_channel(&path).await.expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    let method = tonic::codegen::http::uri::PathAndQuery::from_static("/vipgate.v1.Gateway/GetServiceStats");
    for (body, want) in [
        // Field 1 (`service`, a string) holding bytes that are not UTF-8.
        (vec![0x0a, 0x02, 0xff, 0xfe], "GetServiceStatsRequest.service: invalid string value: data is not UTF-8"),
        // Field 1 with wire type 7, which does not exist.
        (vec![0x0f, 0x00], "invalid wire type value: 7"),
        // A length that runs past the end of the message.
        (vec![0x0a, 0x09, b'w'], "buffer underflow"),
    ] {
        grpc.ready().await.expect("ready");
        let status = grpc
            .unary(tonic::Request::new(body.clone()), method.clone(), RawCodec)
            .await
            .expect_err("an undecodable request is refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{body:02x?}: {status:?}");
        assert!(status.message().contains(want), "{body:02x?}: wanted {want:?} in {:?}", status.message());
    }
    // A valid body still works on the same connection.
    grpc.ready().await.expect("ready");
    let ok = grpc.unary(tonic::Request::new(Vec::new()), method, RawCodec).await.expect("an empty request is valid");
    assert!(ok.into_inner().is_empty(), "the fake gateway has no services");
    drop(grpc);
    server.stop().await.expect("clean shutdown");
}
