//! Publication benchmark: a real vipgated on two net_null ports (which
//! receive packets continuously, so the workers are busy), two workers,
//! driven over its API as an operator would.
//!
//! ```text
//! cargo bench -p vipgate --bench publish -- [--services N] [--backends B]
//!     [--table-size M] [--updates U] [--creates C] [--batches K]
//!     [--batch-size S] [--lcores LIST] [--control-plane-nice N] [--smoke]
//! ```
//!
//! Phases, in order:
//! 1. `C` CreateService calls, one service each, from an empty state
//!    (default 1,000): the latency of each call.
//! 2. One Apply of `N` services with `B` backends each and Maglev tables of
//!    `M` slots (defaults 10,000, 10, 1021), replacing what phase 1 made:
//!    the call's duration, and when every worker reports its version;
//!    then the same Apply again, unchanged, and twice with one backend's
//!    weight changed in 1% of the services (changed, then back).
//! 3. `U` UpdateBackend calls (default 1,000), each changing the weight of
//!    one backend of one service: the call's latency, and the time from
//!    the call's return until every worker reports (GetCounters) a snapshot
//!    of the new version or is idle (holding none). The poll's own round
//!    trip is included, so this is an upper bound.
//! 4. `K` Batch calls (default 100), each changing the weights of `S`
//!    backends (default 100) of as many services: the call's latency.
//! 5. The state directory's size on disk and vipgated's resident memory;
//!    then vipgated is stopped and started again, and the time from its
//!    start until the API serves the same version and every worker
//!    reports it (restart to serving).
//!
//! The gateway's log says, per change, how long validation, compilation,
//! persistence and publication took; the benchmark summarises those too.
//! It reports; it does not fail on a missed target. It does fail (non-zero)
//! if the gateway misbehaves: a refused call, a worker that never reports
//! the version, a daemon that dies. `--smoke` runs a small instance (for
//! CI: 200 services of 4 backends, 50 creates, 50 updates, 10 batches of
//! 20).
//!
//! Needs root and hugepages (or VIPGATE_HUGEPAGES=0), like the tests.

use std::time::{Duration, Instant};

use tonic::transport::Channel;
use vipgate::{NULL_GATEWAY_READY_TIMEOUT, NullGateway};
use vipgate_controlplane::api::pb;
use vipgate_controlplane::api::pb::gateway_client::GatewayClient;
use vipgate_controlplane::api::pb::service_manager_client::ServiceManagerClient;
use vipgate_controlplane::api::{connect_unix, connect_unix_services};

/// How long a worker may take to report a version before the run fails.
const VISIBILITY_TIMEOUT: Duration = Duration::from_secs(10);

struct Options {
    services: u32,
    backends: u32,
    table_size: u32,
    updates: u32,
    creates: u32,
    batches: u32,
    batch_size: u32,
    lcores: String,
    /// `[eal] control_plane_nice`, when given (vipgated's default
    /// otherwise).
    control_plane_nice: Option<i32>,
}

impl Options {
    fn parse() -> Options {
        let mut o = Options {
            services: 10_000,
            backends: 10,
            table_size: 1021,
            updates: 1000,
            creates: 1000,
            batches: 100,
            batch_size: 100,
            // One worker per CPU of a 2-CPU machine; the control plane
            // shares CPU 0 with the first. Two workers on one CPU would
            // preempt each other inside the mempool's multi-producer ring
            // operations, which DPDK does not support (workers then stall
            // for whole seconds).
            lcores: "0@0,1@0,2@1".to_owned(),
            control_plane_nice: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut value = |name: &str| -> String { args.next().unwrap_or_else(|| panic!("{name} needs a value")) };
            let mut number = |name: &str| -> u32 {
                let v = value(name);
                v.parse().unwrap_or_else(|_| panic!("{name}: {v:?} is not a number"))
            };
            match a.as_str() {
                "--services" => o.services = number("--services"),
                "--backends" => o.backends = number("--backends"),
                "--table-size" => o.table_size = number("--table-size"),
                "--updates" => o.updates = number("--updates"),
                "--creates" => o.creates = number("--creates"),
                "--batches" => o.batches = number("--batches"),
                "--batch-size" => o.batch_size = number("--batch-size"),
                "--lcores" => o.lcores = value("--lcores"),
                "--control-plane-nice" => {
                    let v = value("--control-plane-nice");
                    o.control_plane_nice =
                        Some(v.parse().unwrap_or_else(|_| panic!("--control-plane-nice: {v:?} is not a number")));
                }
                "--smoke" => {
                    o.services = 200;
                    o.backends = 4;
                    o.table_size = 1021;
                    o.updates = 50;
                    o.creates = 50;
                    o.batches = 10;
                    o.batch_size = 20;
                }
                // cargo bench passes --bench to every bench binary.
                "--bench" => {}
                other => panic!(
                    "unknown argument {other:?}; usage: publish [--services N] [--backends B] [--table-size M] [--updates U] [--creates C] [--batches K] [--batch-size S] [--lcores LIST] [--control-plane-nice N] [--smoke]"
                ),
            }
        }
        assert!(o.services >= 1 && o.services <= 10_000, "--services: 1 to 10,000");
        assert!(o.backends >= 1 && o.backends <= 100, "--backends: 1 to 100");
        assert!(o.creates <= o.services, "--creates: at most --services");
        assert!(o.batch_size >= 1 && o.batch_size <= 10_000, "--batch-size: 1 to 10,000");
        o
    }
}

/// VIP of service `i`: 198.18.128.0 + i (198.18.128.0/17 holds 32,768).
fn vip(i: u32) -> String {
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 128, 0)) + i).to_string()
}

/// Backends of service `i`: 198.19.0.1 + i, ports 8000 + j, behind the
/// static route to 198.19.0.0/16, so every backend's next hop is the one
/// router and each (address, port) belongs to one service.
fn backend_addr(i: u32) -> String {
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 19, 0, 1)) + i).to_string()
}

fn service(o: &Options, i: u32) -> pb::Service {
    pb::Service {
        name: format!("svc-{i:05}"),
        vip: vip(i),
        port: 80,
        protocol: "tcp".to_owned(),
        mode: "nat".to_owned(),
        table_size: o.table_size,
        backends: (0..o.backends)
            .map(|j| pb::Backend {
                address: backend_addr(i),
                port: 8000 + j,
                weight: Some(1),
                admin_state: pb::AdminState::Enabled.into(),
                ..pb::Backend::default()
            })
            .collect(),
        ..pb::Service::default()
    }
}

/// Percentiles of a sample, in milliseconds.
struct Summary {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Summary {
    fn of(samples: &[Duration]) -> Summary {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
        Summary {
            n: ms.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: *ms.last().unwrap_or(&0.0),
            mean: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
        }
    }

    fn print(&self, what: &str) {
        println!(
            "{what:<44} n={:<6} p50 {:>8.3} ms  p90 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms  mean {:>8.3} ms",
            self.n, self.p50, self.p90, self.p99, self.max, self.mean
        );
    }
}

/// The host's CLOCK_MONOTONIC in nanoseconds, the clock the workers stamp
/// their snapshot loads with.
fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// How long after `returned_ns` (CLOCK_MONOTONIC) the last busy worker
/// loaded a snapshot of `version` or later, by the workers' own stamps; 0
/// when every worker had loaded it before the call returned (publication
/// waits for the workers before the call answers). Idle workers hold no
/// snapshot and are left out.
async fn loaded_after_return(gw: &mut GatewayClient<Channel>, version: u64, returned_ns: i64) -> Duration {
    let r = gw.get_counters(pb::GetCountersRequest {}).await.expect("GetCounters").into_inner();
    let latest = r
        .workers
        .iter()
        .filter_map(|w| w.snapshot.as_ref())
        .filter(|s| !s.idle)
        .map(|s| {
            assert!(s.version >= version, "a busy worker still has version {} < {version}", s.version);
            s.loaded_at_monotonic_ns as i64
        })
        .max()
        .unwrap_or(0);
    Duration::from_nanos((latest - returned_ns).max(0) as u64)
}

/// Polls GetCounters until every worker reports a snapshot of `version` or
/// later, or is idle. Returns how many polls it took.
async fn wait_visible(gw: &mut GatewayClient<Channel>, version: u64) -> u32 {
    let start = Instant::now();
    let mut polls = 0;
    loop {
        polls += 1;
        let r = gw.get_counters(pb::GetCountersRequest {}).await.expect("GetCounters").into_inner();
        assert!(!r.workers.is_empty(), "GetCounters lists no worker");
        let visible = r.workers.iter().all(|w| {
            let s = w.snapshot.as_ref().expect("WorkerCounters.snapshot is set by vipgated");
            s.version >= version || s.idle
        });
        if visible {
            return polls;
        }
        assert!(
            start.elapsed() < VISIBILITY_TIMEOUT,
            "version {version} not visible to every worker after {VISIBILITY_TIMEOUT:?}: {:?}",
            r.workers.iter().map(|w| w.snapshot).collect::<Vec<_>>()
        );
    }
}

/// The durations vipgated logged for the changes in `log` after the first
/// `skip` changes: (validate+compile, persist, publish, total) in ms.
fn logged_phases(log: &str, skip: usize) -> Vec<[f64; 4]> {
    let field = |line: &str, name: &str| -> Option<f64> {
        let at = line.find(&format!("{name}="))? + name.len() + 1;
        line[at..].split([' ', ',']).next()?.trim_end_matches("ms").parse().ok()
    };
    log.lines()
        .filter(|l| l.contains("state changed"))
        .skip(skip)
        .filter_map(|l| {
            Some([field(l, "compile_ms")?, field(l, "persist_ms")?, field(l, "publish_ms")?, field(l, "total_ms")?])
        })
        .collect()
}

fn print_phases(what: &str, phases: &[[f64; 4]]) {
    if phases.is_empty() {
        println!("{what}: the gateway logged no phase durations");
        return;
    }
    let names = ["validate+compile", "persist (redb commit, fsyncs)", "publish (RCU grace)", "total in vipgated"];
    for (k, name) in names.iter().enumerate() {
        let d: Vec<Duration> = phases.iter().map(|p| Duration::from_secs_f64(p[k] / 1e3)).collect();
        Summary::of(&d).print(&format!("  {what}: {name}"));
    }
}

fn main() {
    let o = Options::parse();
    let route = "\n[[routes]]\nprefix = \"198.19.0.0/16\"\nvia = \"198.18.1.254\"\n";
    let mut builder = NullGateway::builder("pub").lcores(&o.lcores).receiving().extra_config(route);
    if let Some(n) = o.control_plane_nice {
        builder = builder.eal(&format!("control_plane_nice = {n}"));
    }
    let mut gw = builder.build();
    gw.spawn();
    // The client asks for a short scheduler slice, as vipgated's control
    // plane does: on this machine it shares a CPU with a busy worker, where
    // a real client (an operator's shell, a controller) would not be, and
    // each of its wake-ups would otherwise wait out the worker's slice.
    let slice = vipgate_dpdk::sched::request_slice(vipgate_dpdk::sched::CONTROL_PLANE_SLICE)
        .and_then(|()| vipgate_dpdk::sched::current_slice());
    println!("client scheduler slice: {slice:?}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(async {
        let (mut sm, mut gc) = serving(&mut gw, |_| true).await;
        let workers = gc.get_counters(pb::GetCountersRequest {}).await.expect("GetCounters").into_inner().workers;
        println!(
            "vipgated on net_null (receiving), lcores {}, control_plane_nice {}: {} workers; {} services x {} backends, Maglev tables of {} slots",
            o.lcores,
            o.control_plane_nice.map_or_else(|| "default".to_owned(), |n| n.to_string()),
            workers.len(),
            o.services,
            o.backends,
            o.table_size
        );
        run(&o, &mut gw, &mut sm, &mut gc).await;
    });
    // The clients' connections live on the runtime: closed with it, so that
    // vipgated's graceful shutdown does not wait for them.
    drop(rt);
    let status = gw.stop();
    assert!(status.success(), "vipgated exited with {status}:\n{}", gw.log_text());
}

async fn run(
    o: &Options,
    gw: &mut NullGateway,
    sm: &mut ServiceManagerClient<Channel>,
    gc: &mut GatewayClient<Channel>,
) {
    // How busy the workers are: packets and busy polls over one second.
    let counters = |r: &pb::GetCountersResponse| -> Vec<(u32, u64, u64)> {
        r.workers
            .iter()
            .map(|w| {
                let c = w.counters.clone().unwrap_or_default();
                (w.lcore, c.rx_packets, c.busy_polls)
            })
            .collect()
    };
    let before = counters(&gc.get_counters(pb::GetCountersRequest {}).await.expect("GetCounters").into_inner());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = counters(&gc.get_counters(pb::GetCountersRequest {}).await.expect("GetCounters").into_inner());
    for ((lcore, rx0, busy0), (_, rx1, busy1)) in before.iter().zip(&after) {
        println!(
            "worker on lcore {lcore}: {:.2} Mpps received, {} busy polls in 1 s",
            (rx1 - rx0) as f64 / 1e6,
            busy1 - busy0
        );
    }

    // The poll's own round trip, for reading the visibility figures.
    let mut rtt = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        gc.get_counters(pb::GetCountersRequest {}).await.expect("GetCounters");
        rtt.push(t.elapsed());
    }
    Summary::of(&rtt).print("GetCounters round trip (the poll)");

    // Phase 1: CreateService, one at a time, from an empty state.
    let changes_before = gw.log_text().matches("state changed").count();
    let mut create = Vec::new();
    for i in 0..o.creates {
        let t = Instant::now();
        sm.create_service(pb::CreateServiceRequest { service: Some(service(o, i)), ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("CreateService {i}: {e}"));
        create.push(t.elapsed());
    }
    if !create.is_empty() {
        Summary::of(&create).print(&format!("CreateService x{} (state growing 0..{})", o.creates, o.creates));
        print_phases("CreateService", &logged_phases(&gw.log_text(), changes_before));
    }

    // Phase 2: one Apply of everything.
    let version = sm.get_state(pb::GetStateRequest::default()).await.expect("GetState").into_inner().version;
    let request = pb::ApplyRequest {
        expected_version: version,
        services: (0..o.services).map(|i| service(o, i)).collect(),
        source_pools: vec![],
        ..Default::default()
    };
    let bytes = prost::Message::encoded_len(&request);
    let changes_before = gw.log_text().matches("state changed").count();
    let t = Instant::now();
    let applied = sm.apply(request).await.unwrap_or_else(|e| panic!("Apply: {e}")).into_inner().version;
    let apply = t.elapsed();
    let returned = Instant::now();
    let apply_polls = wait_visible(gc, applied).await;
    let apply_visible = returned.elapsed();
    let state_bytes = std::fs::metadata(gw.state_file()).map(|m| m.len()).unwrap_or(0);
    println!(
        "Apply of {} services x {} backends ({:.1} MB request): {:.1} ms; visible to every worker {:.3} ms after it returned ({apply_polls} polls); state file {:.1} MB",
        o.services,
        o.backends,
        bytes as f64 / 1e6,
        apply.as_secs_f64() * 1e3,
        apply_visible.as_secs_f64() * 1e3,
        state_bytes as f64 / 1e6
    );
    print_phases("Apply", &logged_phases(&gw.log_text(), changes_before));

    // Phase 2b: the same state applied again, as a controller re-pushes
    // it, unchanged; then with the weight of one backend changed in 1% of
    // the services, and back.
    let changed = (o.services / 100).max(1);
    for (what, weight) in [("unchanged", 1), ("1% of services changed", 2), ("1% of services changed back", 1)] {
        let version = sm.get_state(pb::GetStateRequest::default()).await.expect("GetState").into_inner().version;
        let mut services: Vec<pb::Service> = (0..o.services).map(|i| service(o, i)).collect();
        for s in &mut services[..changed as usize] {
            s.backends[0].weight = Some(weight);
        }
        let request = pb::ApplyRequest { expected_version: version, services, ..Default::default() };
        let changes_before = gw.log_text().matches("state changed").count();
        let t = Instant::now();
        sm.apply(request).await.unwrap_or_else(|e| panic!("Apply ({what}): {e}"));
        let apply = t.elapsed();
        println!("Apply again, {what}: {:.1} ms", apply.as_secs_f64() * 1e3);
        print_phases(&format!("Apply {what}"), &logged_phases(&gw.log_text(), changes_before));
    }

    // Phase 3: single-backend changes.
    let mut weights = vec![1u32; (o.services * o.backends) as usize];
    let mut calls = Vec::new();
    let mut visible = Vec::new();
    let mut loaded = Vec::new();
    let mut polls = Vec::new();
    let changes_before = gw.log_text().matches("state changed").count();
    for k in 0..o.updates {
        let i = (u64::from(k) * 7919 % u64::from(o.services)) as u32;
        let j = k % o.backends;
        let w = &mut weights[(i * o.backends + j) as usize];
        *w = if *w == 1 { 2 } else { 1 };
        let t = Instant::now();
        let version = sm
            .update_backend(pb::UpdateBackendRequest {
                service: format!("svc-{i:05}"),
                address: backend_addr(i),
                port: 8000 + j,
                weight: Some(*w),
                admin_state: pb::AdminState::Unspecified.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("UpdateBackend {k}: {e}"))
            .into_inner()
            .version;
        let returned = Instant::now();
        let returned_ns = monotonic_ns();
        calls.push(returned - t);
        polls.push(wait_visible(gc, version).await);
        visible.push(returned.elapsed());
        loaded.push(loaded_after_return(gc, version, returned_ns).await);
    }
    if !calls.is_empty() {
        Summary::of(&calls).print(&format!("UpdateBackend x{} call latency", o.updates));
        Summary::of(&visible).print("  visible to every worker after return (bound)");
        Summary::of(&loaded).print("  loaded by the last worker after return");
        let before = loaded.iter().filter(|d| d.is_zero()).count();
        println!("  loaded by every worker before the call returned: {before} of {}", loaded.len());
        let one_poll = polls.iter().filter(|&&p| p == 1).count();
        println!("  visible at the first poll after the call returned: {one_poll} of {}", polls.len());
        print_phases("UpdateBackend", &logged_phases(&gw.log_text(), changes_before));
    }
    gw.assert_running();

    // Phase 4: batches of changes to many backends in one call.
    let mut batches = Vec::new();
    let changes_before = gw.log_text().matches("state changed").count();
    for k in 0..o.batches {
        let operations = (0..o.batch_size)
            .map(|n| {
                let m = u64::from(k) * u64::from(o.batch_size) + u64::from(n);
                let i = (m * 7919 % u64::from(o.services)) as u32;
                let j = (m % u64::from(o.backends)) as u32;
                let w = &mut weights[(i * o.backends + j) as usize];
                *w = if *w == 1 { 2 } else { 1 };
                pb::BatchOperation {
                    operation: Some(pb::batch_operation::Operation::UpdateBackend(pb::UpdateBackendRequest {
                        service: format!("svc-{i:05}"),
                        address: backend_addr(i),
                        port: 8000 + j,
                        weight: Some(*w),
                        ..Default::default()
                    })),
                }
            })
            .collect();
        let t = Instant::now();
        sm.batch(pb::BatchRequest { operations, ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("Batch {k}: {e}"));
        batches.push(t.elapsed());
    }
    if !batches.is_empty() {
        Summary::of(&batches).print(&format!("Batch of {} backend changes x{} call latency", o.batch_size, o.batches));
        print_phases("Batch", &logged_phases(&gw.log_text(), changes_before));
    }

    // The state on disk and the daemon's memory with the whole state.
    let version = sm.get_state(pb::GetStateRequest::default()).await.expect("GetState").into_inner().version;
    let state_dir = gw.state_file().parent().expect("the state directory").to_owned();
    println!(
        "state directory {}: {:.1} MB on disk; vipgated RSS {:.1} MB",
        state_dir.display(),
        disk_usage(&state_dir) as f64 / 1e6,
        rss_bytes(gw.pid()) as f64 / 1e6
    );

    // Phase 5: restart with the state persisted, from spawn to serving:
    // the API answers with the same version and every worker reports it.
    let status = gw.stop();
    assert!(status.success(), "vipgated exited with {status}:\n{}", gw.log_text());
    let t = Instant::now();
    gw.spawn();
    let (mut sm2, mut gc2) = serving(gw, |s| s.version == version).await;
    wait_visible(&mut gc2, version).await;
    let restart = t.elapsed();
    println!(
        "restart with {} services x {} backends persisted, spawn to serving version {version}: {:.1} ms; vipgated RSS {:.1} MB",
        o.services,
        o.backends,
        restart.as_secs_f64() * 1e3,
        rss_bytes(gw.pid()) as f64 / 1e6
    );
    sm2.get_state(pb::GetStateRequest::default()).await.expect("GetState after restart");
}

/// Connects both clients once vipgated's API answers GetState with a state
/// `ready` accepts; fails if vipgated exits or takes longer than
/// [`NULL_GATEWAY_READY_TIMEOUT`].
async fn serving(
    gw: &mut NullGateway,
    ready: impl Fn(&pb::GetStateResponse) -> bool,
) -> (ServiceManagerClient<Channel>, GatewayClient<Channel>) {
    let deadline = Instant::now() + NULL_GATEWAY_READY_TIMEOUT;
    loop {
        if let (Ok(mut sm), Ok(gc)) = (connect_unix_services(&gw.socket()).await, connect_unix(&gw.socket()).await)
            && sm.get_state(pb::GetStateRequest::default()).await.is_ok_and(|r| ready(&r.into_inner()))
        {
            return (sm, gc);
        }
        assert!(Instant::now() < deadline, "vipgated's API did not come up:\n{}", gw.log_text());
        gw.assert_running();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Bytes the files under `dir` take on disk (allocated blocks).
fn disk_usage(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum())
        .unwrap_or(0)
}

/// A process's resident set size.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
