//! vipgate-k8s: gives every Service of type LoadBalancer (class
//! `vipgate.io/gateway`) an address from a VipPool and pushes it, with its
//! backends, to every VipGateway's vipgated.
//!
//! `vipgate-k8s run` runs the controller (in the cluster, or on a gateway
//! host with a kubeconfig); `vipgate-k8s crds` prints the CRDs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{error, info, warn};

use vipgate_k8s::crd::{self, VipGateway, VipPool};
use vipgate_k8s::gateway::{Desired, GatewayTask, Gateways, SyncMap};
use vipgate_k8s::reconcile::{self, Ctx, World};
use vipgate_k8s::{ipam, metrics, service, status};

#[derive(Parser)]
#[command(name = "vipgate-k8s", version, about = "vipgate's Kubernetes controller")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the controller against the cluster of the kubeconfig (or the
    /// in-cluster service account).
    Run(RunArgs),
    /// Prints the CustomResourceDefinitions (YAML), for `kubectl apply -f -`.
    Crds,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The cluster's name: the gateways' objects belong to owner
    /// `k8s/NAME` and their names start with `NAME.` (a DNS label).
    #[arg(long, env = "VIPGATE_CLUSTER_NAME")]
    cluster_name: String,
    /// Also serve LoadBalancer Services that set no loadBalancerClass.
    #[arg(long, env = "VIPGATE_DEFAULT_CLASS")]
    default_class: bool,
    /// Where to serve /metrics and /healthz.
    #[arg(long, env = "VIPGATE_METRICS_ADDR", default_value = "127.0.0.1:9447")]
    metrics_addr: SocketAddr,
    /// Run only while holding the Lease `--lease-name` in
    /// `--lease-namespace` (coordination.k8s.io), so that one of several
    /// replicas writes; the others wait. A leader that loses the Lease
    /// exits, to start again as a follower.
    #[arg(long, env = "VIPGATE_LEADER_ELECT")]
    leader_elect: bool,
    /// The Lease's namespace (default: the Pod's, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "vipgate-system")]
    lease_namespace: String,
    /// The Lease's name.
    #[arg(long, default_value = "vipgate-k8s")]
    lease_name: String,
}

fn check_cluster_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--cluster-name {name:?}: must be a DNS label (1 to 63 lowercase letters, digits and '-', not starting or ending with '-')"
        ))
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => match crd::crds_yaml() {
            Ok(y) => {
                print!("{y}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vipgate-k8s: cannot print the CRDs: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn")),
                )
                .init();
            if let Err(e) = check_cluster_name(&args.cluster_name) {
                eprintln!("vipgate-k8s: {e}");
                return std::process::ExitCode::from(2);
            }
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("vipgate-k8s: cannot start the runtime: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(args)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    eprintln!("vipgate-k8s: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

/// Spawns a reflector for `api`; every change it sees sends what
/// `map` makes of the object to `out`.
fn reflect<K, T>(
    api: Api<K>,
    cfg: watcher::Config,
    out: mpsc::UnboundedSender<T>,
    mut map: impl FnMut(&K) -> Vec<T> + Send + 'static,
) -> reflector::Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    T: Send + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, cfg)).default_backoff().touched_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(obj) => {
                    for t in map(&obj) {
                        let _ = out.send(t);
                    }
                }
                Err(e) => warn!("watch: {e}"),
            }
        }
    });
    store
}

async fn run(args: RunArgs) -> Result<(), String> {
    let client = Client::try_default().await.map_err(|e| format!("cannot reach the Kubernetes API: {e}"))?;
    let metrics = Arc::new(metrics::Metrics::default());
    let listener =
        metrics::bind(args.metrics_addr).await.map_err(|e| format!("--metrics-addr {}: {e}", args.metrics_addr))?;
    match listener.local_addr() {
        Ok(addr) => info!("serving /metrics and /healthz on http://{addr}"),
        Err(e) => warn!("the metrics endpoint's address: {e}"),
    }
    tokio::spawn(metrics::serve(listener, Arc::clone(&metrics)));
    if args.leader_elect {
        lead(&client, &args).await?;
    }

    // Everything that changes a Service's backends or addresses triggers
    // its reconcile: its EndpointSlices one Service, the rest all of them.
    let (one_tx, one_rx) = mpsc::unbounded_channel::<ObjectRef<Service>>();
    let (all_tx, all_rx) = mpsc::unbounded_channel::<()>();
    let slices = reflect(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default(), one_tx.clone(), |s| {
        let ns = s.namespace().unwrap_or_default();
        s.labels().get("kubernetes.io/service-name").map(|n| ObjectRef::new(n).within(&ns)).into_iter().collect()
    });
    let mut node_seen: BTreeMap<String, String> = BTreeMap::new();
    let nodes =
        reflect(Api::<Node>::all(client.clone()), watcher::Config::default(), all_tx.clone(), move |n: &Node| {
            // Only what makes a node a backend: not every heartbeat.
            let b = service::node_backends([n]);
            let now = format!("{b:?}");
            if node_seen.insert(n.name_any(), now.clone()).as_deref() == Some(now.as_str()) { vec![] } else { vec![()] }
        });
    let (pool_tx, mut pool_rx) = mpsc::unbounded_channel::<()>();
    let pools = reflect(Api::<VipPool>::all(client.clone()), watcher::Config::default(), pool_tx, |_| vec![()]);
    let namespaces =
        reflect(Api::<Namespace>::all(client.clone()), watcher::Config::default(), all_tx.clone(), |_| vec![()]);
    let (gw_tx, mut gw_rx) = mpsc::unbounded_channel::<()>();
    let gateways = reflect(Api::<VipGateway>::all(client.clone()), watcher::Config::default(), gw_tx, |_| vec![()]);
    let ready = |what: &'static str| move |e: reflector::store::WriterDropped| format!("cannot list the {what}: {e}");
    slices.wait_until_ready().await.map_err(ready("EndpointSlices"))?;
    nodes.wait_until_ready().await.map_err(ready("Nodes"))?;
    pools.wait_until_ready().await.map_err(ready("VipPools"))?;
    namespaces.wait_until_ready().await.map_err(ready("Namespaces"))?;
    gateways.wait_until_ready().await.map_err(ready("VipGateways"))?;

    // The allocations the Services' statuses show come back before
    // anything is allocated, so that a restart never moves an address.
    let svc_api = Api::<Service>::all(client.clone());
    let list = svc_api.list(&Default::default()).await.map_err(|e| format!("cannot list the Services: {e}"))?;
    let mut world = World::default();
    world.refresh_pools(&pools);
    let mut unseen = BTreeSet::new();
    let mut restored: Vec<&Service> =
        list.items.iter().filter(|s| service::is_ours(s, args.default_class) || reconcile::has_finalizer(s)).collect();
    // The oldest keeps a disputed address.
    restored.sort_by_key(|s| s.metadata.creation_timestamp.as_ref().map(|t| t.0));
    for s in restored {
        let key = ipam::ServiceKey { namespace: s.namespace().unwrap_or_default(), name: s.name_any() };
        unseen.insert(key.clone());
        let Some(ip) = reconcile::current_ip(s) else { continue };
        let claim = service::intent(s)
            .map(|i| i.claim())
            .unwrap_or_else(|_| ipam::Claim { sharing: None, ports: Default::default() });
        match world.ipam.conflict(&key, ip, &claim) {
            None => world.ipam.restore(key, ip, claim),
            Some(e) => warn!(service = %key, "status shows {ip}, but {e}: it gets another address"),
        }
    }
    info!(
        services = unseen.len(),
        addresses = world.ipam.services().count(),
        "allocations restored from the Services' status"
    );
    world.unseen = if unseen.is_empty() { None } else { Some(unseen) };

    let (desired_tx, desired_rx) = watch::channel(Desired::default());
    let (sync_tx, sync_rx) = watch::channel(SyncMap::new());
    let reporter = Reporter { controller: "vipgate-k8s".into(), instance: std::env::var("POD_NAME").ok() };
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        cluster: args.cluster_name.clone(),
        default_class: args.default_class,
        recorder: Recorder::new(client.clone(), reporter),
        slices,
        nodes,
        pools: pools.clone(),
        namespaces,
        world: Mutex::new(world),
        desired: desired_tx,
        sync: sync_rx.clone(),
        metrics: Arc::clone(&metrics),
        failures: Mutex::new(Default::default()),
        retry_all: all_tx.clone(),
    });

    // The gateways follow the VipGateways; they push only once the gate
    // is open (every Service seen once).
    let gated = gated(desired_rx, Arc::clone(&ctx));
    let template = GatewayTask {
        name: String::new(),
        spec: Default::default(),
        owner: ctx.owner(),
        desired: gated,
        sync: sync_tx,
        client: client.clone(),
        metrics: Arc::clone(&metrics),
    };
    let gw_store = gateways.clone();
    tokio::spawn(async move {
        let mut running = Gateways::default();
        loop {
            let specs: BTreeMap<String, crd::VipGatewaySpec> =
                gw_store.state().iter().map(|g| (g.name_any(), g.spec.clone())).collect();
            running.set(specs, &template);
            if gw_rx.recv().await.is_none() {
                return;
            }
            while gw_rx.try_recv().is_ok() {}
        }
    });
    let pool_ctx = Arc::clone(&ctx);
    let all_from_pools = all_tx.clone();
    tokio::spawn(async move {
        while pool_rx.recv().await.is_some() {
            while pool_rx.try_recv().is_ok() {}
            let changed = pool_ctx.world.lock().expect("world lock").refresh_pools(&pool_ctx.pools);
            if changed {
                let _ = all_from_pools.send(());
            }
        }
    });
    tokio::spawn(status::pools(Arc::clone(&ctx), pools.clone()));
    tokio::spawn(status::gateways(Arc::clone(&ctx), gateways.clone()));
    // A gateway's progress reconciles the Services whose sync state it
    // changed, which writes their conditions.
    tokio::spawn(status::sync_triggers(Arc::clone(&ctx), one_tx.clone()));

    let all_stream = UnboundedReceiverStream::new(all_rx);
    let one_stream = UnboundedReceiverStream::new(one_rx);
    info!(cluster = %args.cluster_name, owner = %ctx.owner(), default_class = args.default_class, "controller started");
    Controller::new(svc_api, watcher::Config::default())
        .reconcile_on(one_stream)
        .reconcile_all_on(all_stream)
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                match e {
                    kube::runtime::controller::Error::ObjectNotFound(_) => {}
                    e => warn!("controller: {e}"),
                }
            }
        })
        .await;
    info!("stopped");
    Ok(())
}

/// Waits until this instance holds the Lease, then watches it: losing it
/// ends the process (its restart waits as a follower), so that two
/// instances never write at once.
async fn lead(client: &Client, args: &RunArgs) -> Result<(), String> {
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| format!("{}-{}", nix_hostname(), std::process::id()));
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&args.lease_namespace)
        .with_identity(&identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await
        .map_err(|e| format!("Lease {}/{}: {e}", args.lease_namespace, args.lease_name))?;
    let (mut leader, _task) = manager.watch().await;
    info!(lease = %format!("{}/{}", args.lease_namespace, args.lease_name), %identity, "waiting to lead");
    while !*leader.borrow_and_update() {
        leader.changed().await.map_err(|_| "the Lease manager stopped".to_owned())?;
    }
    info!(%identity, "leading");
    tokio::spawn(async move {
        loop {
            if leader.changed().await.is_err() || !*leader.borrow_and_update() {
                error!("lost the Lease: exiting, to start again as a follower");
                std::process::exit(1);
            }
        }
    });
    Ok(())
}

fn nix_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "vipgate-k8s".into())
}

/// The desired state as the gateways see it: held back until every
/// Service was seen once, so that a restarting controller never pushes a
/// partial state.
fn gated(mut rx: watch::Receiver<Desired>, ctx: Arc<Ctx>) -> watch::Receiver<Desired> {
    let (tx, out) = watch::channel(Desired::default());
    tokio::spawn(async move {
        loop {
            if ctx.gate_open() {
                let mut d = rx.borrow_and_update().clone();
                d.ready = true;
                let _ = tx.send(d);
            } else {
                let _ = rx.borrow_and_update();
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    out
}
