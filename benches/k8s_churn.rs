//! The Kubernetes controller under endpoint churn, end to end: the real
//! kube-apiserver and etcd (scripts/k8s-testenv.sh), vipgate-k8s, and a
//! vipgated on net_null whose worker is busy receiving.
//!
//! ```text
//! cargo build --release -p vipgate-daemon -p vipgate-controlplane -p vipgate-k8s
//! cargo bench -p vipgate --bench k8s_churn -- [--services N] [--endpoints E]
//!     [--rate R] [--seconds S] [--smoke]
//! ```
//!
//! 1. `N` LoadBalancer Services (default 1,000), each with one EndpointSlice
//!    of `E` ready pod endpoints (default 20; pods backends, so each
//!    endpoint is a vipgate backend), written with the Kubernetes API.
//! 2. Once the gateway runs all of them: `R` EndpointSlice updates a second
//!    (default 50) for `S` seconds (default 60), round robin over the
//!    Services, each turning one endpoint terminating or back ready.
//! 3. For each update: the time from the apiserver's answer to the write
//!    (the write is committed) to the moment the gateway's busy worker
//!    loaded a snapshot with the change, by the worker's own load stamp
//!    (CLOCK_MONOTONIC, GetCounters). The change's version is the first
//!    Watch event after the write naming the Service's vipgate service;
//!    the load is the worker's first snapshot of that version or later
//!    seen by a poll every 2 ms (a snapshot replaced within 2 ms is
//!    missed, and the next one's later stamp counts: an upper bound).
//! 4. The controller's resident memory (VmRSS, and its peak VmHWM).
//!
//! `--smoke`: 50 Services of 4 endpoints, 20 updates a second for 5 s.
//! Needs root and hugepages (or VIPGATE_HUGEPAGES=0), and scripts/k8s-build.sh.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use vipgate::NullGateway;
use vipgate::k8s::{K8sController, K8sEnv};
use vipgate_controlplane::api::pb;
use vipgate_controlplane::api::{connect_unix, connect_unix_services};

struct Options {
    services: usize,
    endpoints: usize,
    rate: u32,
    seconds: u32,
}

impl Options {
    fn parse() -> Options {
        let mut o = Options { services: 1000, endpoints: 20, rate: 50, seconds: 60 };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut value = |name: &str| -> u64 {
                args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} needs a number"))
            };
            match a.as_str() {
                "--services" => o.services = value("--services") as usize,
                "--endpoints" => o.endpoints = value("--endpoints") as usize,
                "--rate" => o.rate = value("--rate") as u32,
                "--seconds" => o.seconds = value("--seconds") as u32,
                "--smoke" => o = Options { services: 50, endpoints: 4, rate: 20, seconds: 5 },
                "--bench" => {}
                other => panic!(
                    "unknown argument {other:?}; usage: k8s_churn [--services N] [--endpoints E] [--rate R] [--seconds S] [--smoke]"
                ),
            }
        }
        assert!(o.services <= 1024 && o.endpoints <= 60, "at most 1,024 Services (the pool) of 60 endpoints");
        o
    }
}

/// The gateway's changes: version, when the Watch delivered it, and the
/// services it names.
type Changes = Arc<Mutex<Vec<(u64, i64, Vec<String>)>>>;
/// Each worker's snapshots as the polls saw them: version, load stamp.
type Loads = Arc<Mutex<BTreeMap<usize, Vec<(u64, i64)>>>>;

fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// Pod endpoint `j` of Service `i`: its own address, so that no backend
/// serves two VIPs.
fn pod(i: usize, j: usize) -> String {
    let n = 1 + i * 64 + j;
    format!("198.19.{}.{}", n / 256, n % 256)
}

fn endpoints(i: usize, e: usize, terminating: Option<usize>) -> serde_json::Value {
    serde_json::Value::Array(
        (0..e)
            .map(|j| {
                let t = terminating == Some(j);
                serde_json::json!({
                    "addresses": [pod(i, j)],
                    "conditions": { "ready": !t, "serving": true, "terminating": t }
                })
            })
            .collect(),
    )
}

fn rss(pid: u32) -> (String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field =
        |k: &str| status.lines().find(|l| l.starts_with(k)).map(|l| l[k.len()..].trim().to_owned()).unwrap_or_default();
    (field("VmRSS:"), field("VmHWM:"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn main() {
    let o = Options::parse();
    // Cluster IPs for up to 4,094 Services, clear of the pool and the rig.
    let env = K8sEnv::start_with_service_range("198.18.128.0/20");
    env.install_crds();
    let mut gw = NullGateway::builder("k8sb")
        .lcores("0,1")
        .receiving()
        .extra_config("\n[[routes]]\nprefix = \"198.19.0.0/16\"\nvia = \"198.18.1.254\"\n")
        .build();
    gw.spawn();
    gw.wait_ready(|g| g.ctl(&["health"]).status.success());
    env.apply(&format!(
        "apiVersion: vipgate.io/v1alpha1\nkind: VipPool\nmetadata:\n  name: bench\nspec:\n  addresses: [\"198.18.104.0/22\"]\n---\n\
         apiVersion: vipgate.io/v1alpha1\nkind: VipGateway\nmetadata:\n  name: gw\nspec:\n  endpoint: unix://{}\n",
        gw.socket().display()
    ));
    let dir = gw.dir().to_owned();
    let ctl = K8sController::start(&env, &dir, "bench", &[]);
    let pid = ctl.pid().expect("the controller runs");
    println!(
        "{} Services x {} endpoints (pods backends), then {} EndpointSlice updates a second for {} s",
        o.services, o.endpoints, o.rate, o.seconds
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&env.kubeconfig).expect("kubeconfig"),
            &Default::default(),
        )
        .await
        .expect("kube config");
        let client = Client::try_from(config).expect("kube client");
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
        let t0 = Instant::now();
        futures_util::stream::iter(0..o.services)
            .map(|i| {
                let (services, slices) = (services.clone(), slices.clone());
                let e = o.endpoints;
                async move {
                    let svc: Service = serde_json::from_value(serde_json::json!({
                        "metadata": { "name": format!("s{i}") },
                        "spec": { "type": "LoadBalancer", "loadBalancerClass": "vipgate.io/gateway",
                                  "ports": [{ "name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP" }] },
                    }))
                    .unwrap();
                    let mut svc = svc;
                    svc.metadata.annotations = Some([("vipgate.io/backends".to_owned(), "pods".to_owned())].into());
                    services.create(&PostParams::default(), &svc).await.expect("create Service");
                    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
                        "metadata": { "name": format!("s{i}-1"), "labels": { "kubernetes.io/service-name": format!("s{i}") } },
                        "addressType": "IPv4",
                        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
                        "endpoints": endpoints(i, e, None),
                    }))
                    .unwrap();
                    slices.create(&PostParams::default(), &slice).await.expect("create EndpointSlice");
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
        println!("created in {:.1} s", t0.elapsed().as_secs_f64());

        let mut sm = connect_unix_services(&gw.socket()).await.expect("connect");
        let mut gc = connect_unix(&gw.socket()).await.expect("connect");
        let owner = "k8s/bench".to_owned();
        let ready = Instant::now();
        loop {
            let st = sm.get_state(pb::GetStateRequest { owner: owner.clone() }).await.expect("GetState").into_inner();
            let full = st.services.iter().filter(|s| s.backends.len() == o.endpoints).count();
            if full == o.services {
                break;
            }
            assert!(ready.elapsed() < Duration::from_secs(300), "only {full} of {} services on the gateway", o.services);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!("all on the gateway {:.1} s after the last write; controller RSS {:?}", ready.elapsed().as_secs_f64(), rss(pid));

        // The gateway's changes, and the worker's loads.
        let changes: Changes = Arc::default();
        let mut stream = sm.watch(pb::WatchRequest { owner: owner.clone() }).await.expect("Watch").into_inner();
        let c = Arc::clone(&changes);
        let watcher = tokio::spawn(async move {
            while let Ok(Some(ev)) = stream.message().await {
                if let Some(pb::watch_event::Event::Change(ch)) = ev.event {
                    c.lock().unwrap().push((ev.version, monotonic_ns(), ch.services_changed));
                }
            }
        });
        let loads: Loads = Arc::default();
        let l = Arc::clone(&loads);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = Arc::clone(&stop);
        let poller = tokio::spawn(async move {
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                let r = gc.get_counters(pb::GetCountersRequest {}).await.expect("GetCounters").into_inner();
                {
                    let mut seen = l.lock().unwrap();
                    for (w, c) in r.workers.iter().enumerate() {
                        let Some(s) = c.snapshot.as_ref().filter(|s| !s.idle) else { continue };
                        let list = seen.entry(w).or_default();
                        if list.last().is_none_or(|(v, _)| *v != s.version) {
                            list.push((s.version, s.loaded_at_monotonic_ns as i64));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });

        // The churn.
        let total = (o.rate * o.seconds) as usize;
        let period = Duration::from_secs_f64(1.0 / f64::from(o.rate));
        let mut writes: Vec<(String, i64)> = Vec::with_capacity(total);
        let start = tokio::time::Instant::now();
        let mut terminating: BTreeMap<usize, usize> = BTreeMap::new();
        for n in 0..total {
            tokio::time::sleep_until(start + period * n as u32).await;
            let i = n % o.services;
            let round = n / o.services;
            let t = if round.is_multiple_of(2) { Some(round / 2 % o.endpoints) } else { None };
            match t {
                Some(j) => terminating.insert(i, j),
                None => terminating.remove(&i),
            };
            let patch = serde_json::json!({ "endpoints": endpoints(i, o.endpoints, t) });
            slices.patch(&format!("s{i}-1"), &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch EndpointSlice");
            writes.push((format!("bench.default.s{i}.http"), monotonic_ns()));
        }
        let late = start.elapsed().as_secs_f64() - f64::from(o.seconds);
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        poller.await.unwrap();
        watcher.abort();
        let (rss_now, rss_peak) = rss(pid);

        let changes = changes.lock().unwrap().clone();
        let loads = loads.lock().unwrap().clone();
        let mut latencies = Vec::new();
        let mut missing = 0;
        for (name, written) in &writes {
            let Some((version, _, _)) = changes.iter().find(|(_, at, names)| at > written && names.contains(name)) else {
                missing += 1;
                continue;
            };
            let loaded = loads
                .values()
                .filter_map(|list| list.iter().find(|(v, _)| v >= version).map(|(_, at)| *at))
                .max();
            match loaded {
                Some(at) => latencies.push(Duration::from_nanos((at - written).max(0) as u64)),
                None => missing += 1,
            }
        }
        latencies.sort();
        println!(
            "{} updates in {:.1} s ({} behind schedule at the end), {} gateway versions (Applies that changed something)",
            writes.len(),
            o.seconds as f64 + late,
            if late > 0.5 { format!("{late:.1} s") } else { "none".into() },
            changes.len()
        );
        println!(
            "apiserver write -> worker loaded: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} measured, {} not seen)",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.9).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            latencies.len(),
            missing
        );
        println!("controller RSS {rss_now} (peak {rss_peak})");
        assert_eq!(missing, 0, "every update reached the gateway");
    });
    drop(rt);
    drop(ctl);
    drop(env);
    let status = gw.stop();
    assert!(status.success(), "vipgated exited with {status}");
}
