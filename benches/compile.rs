//! Where the time of one change goes in the control plane, without a
//! daemon: for a dynamic state of `N` services with `B` backends each
//! (defaults 10,000 and 10, Maglev tables of 1021 slots), the wall time and
//! the CPU time (this thread's clock: on a shared machine, the wall time
//! includes waiting for a CPU) of each step a change takes in vipgated,
//! medians of `R` runs (default 5).
//!
//! ```text
//! cargo bench -p vipgate --bench compile -- [--services N] [--backends B] [--table-size M] [--runs R] [--commits C]
//! ```
//!
//! Steps: cloning the dynamic state (a mutation works on a copy),
//! validation (`state::validate`), a snapshot from scratch
//! (`Snapshot::build`), an incremental snapshot after one backend's weight
//! changed (`Snapshot::build_incremental` against the previous one, which
//! compares every service to find the change), the same with nothing
//! changed, the same change named by the caller (`Snapshot::delta`, then
//! `Snapshot::build_changed`), the stats slots planned for every service
//! or for the named one (`StatsSlots::plan`, `StatsSlots::plan_changed`),
//! and persisting the state (in a temporary directory): the commit of one
//! changed service to `state.redb` (`Store::commit`: its record and the
//! meta record, one transaction, two fsyncs; median and maximum of `C`
//! commits, default 200), a whole-state write (`Store::replace_all`), a
//! restart's `Store::open` with and without the integrity check, the
//! database's size, and, for comparison, the `state.json` rewrite earlier
//! versions made at every change (JSON, write, fsync, rename, fsync of the
//! directory).
//!
//! Then every step of one `UpdateBackend` (one backend's weight) as
//! vipgated's writer runs it, in order, each timed alone: the copy of the
//! dynamic state, the mutation, validation of what it touched
//! (`Effective::update`), the health plan of the touched service, the
//! description of the snapshot, the health weights, the delta of the
//! change, the stats slots, the snapshot, the slots applied, the health
//! checker and the route announcer told, and the previous snapshot freed
//! (persisting is above); with the whole-state ways they replaced in
//! parentheses. Publication (the wait
//! for the workers) needs a dataplane: `benches/publish.rs` measures it.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vipgate_controlplane::config::Config;
use vipgate_controlplane::health::{Checker, HealthStatus, TargetKey};
use vipgate_controlplane::state::{
    AdminState, BackendState, Change, DesiredState, Effective, ModeState, ProtocolState, RemovalState, ServiceState,
    apply_health, dynamic_health_targets, health_targets, ops, validate,
};
use vipgate_controlplane::stats::StatsSlots;
use vipgate_controlplane::store::Store;
use vipgate_dataplane::snapshot::Snapshot;
use vipgate_dataplane::wire::EthernetAddress;

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
"#;

fn state(services: u32, backends: u32, table_size: u32) -> DesiredState {
    let mut s = DesiredState { version: 1, ..DesiredState::default() };
    for i in 0..services {
        let name = format!("svc-{i:05}");
        s.services.insert(
            name.clone(),
            ServiceState {
                name,
                vip: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + i),
                port: 80,
                protocol: ProtocolState::Tcp,
                mode: ModeState::Nat,
                table_size,
                on_backend_removal: RemovalState::Rehash,
                backends: (0..backends)
                    .map(|j| BackendState {
                        address: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 1)) + i),
                        port: 8000 + j as u16,
                        weight: 1,
                        admin_state: AdminState::Enabled,
                    })
                    .collect(),
                health_check: None,
                new_flow_limit: None,
                source_ranges: Vec::new(),
                affinity: Default::default(),
                owner: vipgate_controlplane::state::DEFAULT_OWNER.to_owned(),
            },
        );
    }
    s
}

fn median(mut d: Vec<Duration>) -> f64 {
    d.sort();
    d[d.len() / 2].as_secs_f64() * 1e3
}

/// The CPU time this thread has used so far.
fn cpu_now() -> Duration {
    use nix::time::{ClockId, clock_gettime};
    Duration::from(clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).expect("the thread's CPU clock"))
}

/// Milliseconds of one step: wall time, and CPU time of this thread (on a
/// shared machine, the wall time includes waiting for a CPU; the CPU time
/// does not). Medians of the runs, each taken alone.
#[derive(Clone, Copy)]
struct Ms {
    wall: f64,
    cpu: f64,
}

fn time<T>(runs: u32, mut f: impl FnMut() -> T) -> Ms {
    let (wall, cpu): (Vec<Duration>, Vec<Duration>) = (0..runs)
        .map(|_| {
            let (t, c) = (Instant::now(), cpu_now());
            std::hint::black_box(f());
            (t.elapsed(), cpu_now() - c)
        })
        .unzip();
    Ms { wall: median(wall), cpu: median(cpu) }
}

fn main() {
    let (mut services, mut backends, mut table_size, mut runs, mut commits) = (10_000u32, 10u32, 1021u32, 5u32, 200u32);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut number = || -> u32 { args.next().and_then(|v| v.parse().ok()).expect("a number") };
        match a.as_str() {
            "--services" => services = number(),
            "--backends" => backends = number(),
            "--table-size" => table_size = number(),
            "--runs" => runs = number(),
            "--commits" => commits = number(),
            "--bench" => {}
            other => panic!("unknown argument {other:?}"),
        }
    }
    let config = Config::parse(Path::new("/etc/vipgate/vipgated.toml"), CONFIG).expect("configuration");
    let macs = [EthernetAddress([2, 0, 0, 0, 0, 1]), EthernetAddress([2, 0, 0, 0, 0, 2])];
    let dynamic = state(services, backends, table_size);
    println!("{services} services x {backends} backends, Maglev tables of {table_size} slots; median of {runs} runs");

    let clone = time(runs, || dynamic.clone());
    let validated = time(runs, || validate(&config, &macs, &dynamic).expect("valid"));
    let spec = validate(&config, &macs, &dynamic).expect("valid");
    let scratch = time(runs, || Snapshot::build(&spec).expect("builds"));
    let first = Snapshot::build(&spec).expect("builds");
    let mut changed = spec.clone();
    let target = &mut Arc::make_mut(&mut changed.services[services as usize / 2]).backends[0];
    target.weight = 2;
    let one = time(runs, || Snapshot::build_incremental(&changed, Some(&first), 2).expect("builds"));
    let stats = Snapshot::build_incremental(&changed, Some(&first), 2).expect("builds").build_stats();
    let none = time(runs, || Snapshot::build_incremental(&spec, Some(&first), 2).expect("builds"));
    let name = [changed.services[services as usize / 2].name.clone()];
    let find = time(runs, || first.delta(&changed, &name, &[]).expect("a delta"));
    let delta = first.delta(&changed, &name, &[]).expect("a delta");
    let named = time(runs, || Snapshot::build_changed(&changed, &first, 2, &delta).expect("builds"));
    // The stats slots every change plans (controlplane/src/stats.rs): from
    // scratch for the first state, then against the assignment in force.
    let slot_arrays =
        vec![std::sync::Arc::new(vipgate_dataplane::stats::BackendStats::new(vipgate_dataplane::stats::DEFAULT_SLOTS))];
    let mut slots = StatsSlots::new(vipgate_dataplane::stats::DEFAULT_SLOTS, slot_arrays);
    let plan_first = time(runs, || slots.plan(&mut spec.clone()).expect("slots"));
    let plan = slots.plan(&mut spec.clone()).expect("slots");
    slots.apply(plan);
    let plan_one = time(runs, || slots.plan(&mut changed.clone()).expect("slots"));
    let plan_named = time(runs, || slots.plan_changed(&mut changed.clone(), &delta).expect("slots"));
    let spec_clone = time(runs, || changed.clone());
    let free = time(runs, || drop(Snapshot::build(&spec).expect("builds")));

    let dir = std::env::temp_dir().join(format!("vipgate-bench-compile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = persist(&dir, &dynamic, runs, commits);
    // What earlier versions did at every change: the whole state as one
    // JSON file, replaced atomically.
    let json_path = dir.join("state.json");
    let rewrite = time(runs, || {
        let tmp = dir.join(".state.json.tmp");
        let text = serde_json::to_vec(&serde_json::json!({ "format": 1, "state": &dynamic })).expect("JSON");
        let mut f = std::fs::File::create(&tmp).expect("create");
        f.write_all(&text).and_then(|()| f.sync_all()).expect("write");
        std::fs::rename(&tmp, &json_path).expect("rename");
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).expect("fsync the directory");
    });
    let json_bytes = std::fs::metadata(&json_path).map(|m| m.len()).unwrap_or(0);
    let _ = std::fs::remove_dir_all(&dir);

    println!("{:<58} {:>10} {:>13}", "", "wall", "CPU");
    let row = |what: &str, ms: Ms| println!("{what:<58} {:>10.2} ms {:>10.2} ms", ms.wall, ms.cpu);
    row("clone the dynamic state", clone);
    row("state::validate (static + dynamic -> SnapshotSpec)", validated);
    row("Snapshot::build from scratch", scratch);
    row("  (build + free, from scratch)", free);
    row(
        &format!(
            "build_incremental, one weight changed ({} reused, {} built)",
            stats.services_reused, stats.tables_built
        ),
        one,
    );
    row("build_incremental, nothing changed", none);
    row("Snapshot::delta (the changed service found by its name)", find);
    row("build_changed, one weight changed, named", named);
    row("StatsSlots::plan, first state (+ a clone of the spec)", plan_first);
    row("StatsSlots::plan, one weight changed (+ a clone of the spec)", plan_one);
    row("StatsSlots::plan_changed, the same named (+ a clone of the spec)", plan_named);
    row("  (the clone of the spec alone)", spec_clone);
    let Persisted { commit, batch, whole, open_checked, open_unchecked, bytes } = store;
    // Wall time only: the fsyncs are the disk's time, not this thread's.
    let wall = |what: &str, ms: f64| println!("{what:<58} {ms:>10.2} ms {:>13}", "-");
    wall(&format!("Store::commit, one service changed, median of {commits}"), commit.0);
    wall(&format!("Store::commit, one service changed, max of {commits}"), commit.1);
    wall("  (Store::batch alone: its records serialised)", batch);
    row("Store::replace_all (the whole state)", whole);
    wall("Store::open, with the integrity check (a restart)", open_checked);
    wall("Store::open, without the integrity check", open_unchecked);
    println!("{:<58} {:>10.1} MB", "state.redb on disk, after one whole write", bytes.0 as f64 / 1e6);
    println!("{:<58} {:>10.1} MB", format!("  and after {} more and the commits", runs), bytes.1 as f64 / 1e6);
    row(&format!("state.json rewrite, earlier versions ({:.1} MB)", json_bytes as f64 / 1e6), rewrite);
    one_backend_steps(&config, &macs, &dynamic, services, runs);
}

/// The store's figures: milliseconds, and the database's size in bytes.
struct Persisted {
    /// Median and maximum of a commit of one changed service.
    commit: (f64, f64),
    batch: f64,
    whole: Ms,
    open_checked: f64,
    open_unchecked: f64,
    /// The database's size after the first whole write, and at the end.
    bytes: (u64, u64),
}

fn persist(dir: &Path, dynamic: &DesiredState, runs: u32, commits: u32) -> Persisted {
    let opened = |check: bool| {
        let store = Store::new(dir).with_integrity_check(check);
        let lock = store.lock().expect("lock");
        let state = store.open(&lock).expect("open");
        (store, lock, state)
    };
    let (store, lock, _) = opened(true);
    let size = || std::fs::metadata(dir.join(vipgate_controlplane::store::FILE_NAME)).map(|m| m.len()).unwrap_or(0);
    store.replace_all(dynamic).expect("written");
    let first_bytes = size();
    let whole = time(runs, || store.replace_all(dynamic).expect("written"));
    // One backend's weight at a time, in services spread over the state,
    // as UpdateBackend does.
    let mut state = dynamic.clone();
    let names: Vec<String> = state.services.keys().cloned().collect();
    let mut times = Vec::new();
    let mut batches = Vec::new();
    for i in 0..commits as usize {
        let name = &names[i * 7919 % names.len()];
        state.version += 1;
        state.services.get_mut(name).expect("service").backends[0].weight = 2 + i as u32;
        let change = Change { services_changed: vec![name.clone()], ..Change::default() };
        let t = Instant::now();
        let batch = store.batch(&state, &change).expect("batch");
        batches.push(t.elapsed());
        store.write(batch).expect("written");
        times.push(t.elapsed());
    }
    let max = times.iter().max().expect("commits").as_secs_f64() * 1e3;
    let commit = (median(times), max);
    drop((store, lock));
    let bytes = (first_bytes, size());
    // Timed without closing the database (a restart does not), nor
    // comparing what was read.
    let open = |check: bool| {
        let times = (0..runs)
            .map(|_| {
                let t = Instant::now();
                let (store, lock, read) = opened(check);
                let took = t.elapsed();
                assert_eq!(read, state);
                drop((store, lock));
                took
            })
            .collect();
        median(times)
    };
    let (open_checked, open_unchecked) = (open(true), open(false));
    Persisted { commit, batch: median(batches), whole, open_checked, open_unchecked, bytes }
}

/// Every step of one `UpdateBackend` (a weight) as the daemon's writer
/// runs it, timed one by one against the same state.
fn one_backend_steps(config: &Config, macs: &[EthernetAddress], dynamic: &DesiredState, services: u32, runs: u32) {
    use vipgate_dataplane::stats::{BackendStats, DEFAULT_SLOTS};
    let name = format!("svc-{:05}", services / 2);
    let address = dynamic.services[&name].backends[0].address;
    let mut rows: Vec<(String, Ms)> = Vec::new();
    let mut step = |what: &str, ms: Ms| rows.push((what.to_owned(), ms));

    // The state in force, compiled and its slots applied, as after the
    // previous change.
    let workers = vec![std::sync::Arc::new(BackendStats::new(DEFAULT_SLOTS))];
    let mut slots = StatsSlots::new(DEFAULT_SLOTS, workers);
    let mut spec = validate(config, macs, dynamic).expect("valid");
    let plan = slots.plan(&mut spec).expect("slots");
    slots.apply(plan);
    let previous = Snapshot::build(&spec).expect("builds");
    let (mut checker, _reports) = Checker::new(std::sync::Arc::new(HealthStatus::default()));
    checker.apply(checker.plan(health_targets(config, dynamic)));

    let effective = Effective::build(config, macs, dynamic).expect("valid");
    let mut eligibility = vipgate_controlplane::announce::Eligibility::build(config, dynamic, &Default::default());
    step("clone the dynamic state (persistent maps)", time(runs, || dynamic.clone()));
    let mutate = |state: &mut DesiredState| {
        ops::update_backend(config, state, &name, address, 8000, Some(2), None).expect("mutation")
    };
    let mut new = dynamic.clone();
    step("ops::update_backend (+ the copy it works on)", time(runs, || mutate(&mut new.clone())));
    let change = mutate(&mut new);
    new.advance(&change);
    step(
        "Effective::update (what it touched, against the indexes)",
        time(runs, || effective.update(dynamic, &new, &change).expect("valid")),
    );
    step("  (state::validate, the whole state)", time(runs, || validate(config, macs, &new).expect("valid")));
    let effective = effective.update(dynamic, &new, &change).expect("valid");
    let touched_set: std::collections::HashSet<String> = change.services_changed.iter().cloned().collect();
    let plan_touched = || checker.plan_services(dynamic_health_targets(&new, &touched_set), touched_set.clone());
    step("health: the touched service's targets + Checker::plan_services", time(runs, plan_touched));
    step("  (health: every target + Checker::plan)", time(runs, || checker.plan(health_targets(config, &new))));
    let health_plan = plan_touched();
    step("Effective::spec (the whole description, cloned)", time(runs, || effective.spec()));
    let mut spec = effective.spec();
    step("apply_health, no backend down", time(runs, || apply_health(&mut spec, health_plan.down())));
    let one_down: std::collections::HashSet<TargetKey> =
        [TargetKey { service: name.clone(), address, port: 8001 }].into_iter().collect();
    step("  (apply_health, one backend down)", time(runs, || apply_health(&mut spec.clone(), &one_down)));
    step("  (the clone of the spec alone)", time(runs, || spec.clone()));
    let touched = [name.clone()];
    step(
        "Snapshot::delta (the service, by name)",
        time(runs, || previous.delta(&spec, &touched, &[]).expect("a delta")),
    );
    let delta = previous.delta(&spec, &touched, &[]).expect("a delta");
    step(
        "StatsSlots::plan_changed (+ a clone of the spec)",
        time(runs, || slots.plan_changed(&mut spec.clone(), &delta).expect("slots")),
    );
    step(
        "  (StatsSlots::plan, every service, + a clone of the spec)",
        time(runs, || slots.plan(&mut spec.clone()).expect("slots")),
    );
    let plan = slots.plan_changed(&mut spec, &delta).expect("slots");
    step(
        "Snapshot::build_changed",
        time(runs, || Snapshot::build_changed(&spec, &previous, new.version, &delta).expect("builds")),
    );
    // Comparing needs every service's slots: a plan of them all.
    let mut complete = spec.clone();
    drop(slots.plan(&mut complete).expect("slots"));
    step(
        "  (Snapshot::build_incremental, comparing every service)",
        time(runs, || Snapshot::build_incremental(&complete, Some(&previous), new.version).expect("builds")),
    );
    let snapshot = Snapshot::build_changed(&spec, &previous, new.version, &delta).expect("builds");
    // Plans made against the same assignment: one weight takes no slot,
    // so applying them one after the other is the same work each time.
    let mut plans = (0..runs)
        .map(|_| slots.plan_changed(&mut spec.clone(), &delta).expect("slots"))
        .collect::<Vec<_>>()
        .into_iter();
    step("StatsSlots::apply", time(runs, || slots.apply(plans.next().expect("a plan"))));
    drop(plan);
    step("commit: the copies of the new state it keeps", time(runs, || (new.clone(), effective.clone())));
    step(
        "Checker::apply of the touched service's plan (no checks configured)",
        time(runs, || {
            checker.apply(checker.plan_services(dynamic_health_targets(&new, &touched_set), touched_set.clone()))
        }),
    );
    step(
        "announce::Eligibility::refresh + map (every VIP)",
        time(runs, || {
            eligibility.refresh(config, &new, checker.down_ref(), touched.iter().map(String::as_str));
            eligibility.map()
        }),
    );
    step(
        "  (announce::eligibility, the whole state)",
        time(runs, || vipgate_controlplane::announce::eligibility(config, &new, &checker.down())),
    );
    let delta = snapshot.delta(&spec, &touched, &[]).expect("a delta");
    let snapshots: Vec<Snapshot> =
        (0..runs).map(|_| Snapshot::build_changed(&spec, &snapshot, new.version, &delta).expect("builds")).collect();
    let mut snapshots = snapshots.into_iter();
    step("free the previous snapshot", time(runs, || drop(snapshots.next())));
    drop(previous);

    println!();
    println!("one UpdateBackend (a weight) at {services} services, step by step as vipgated's writer runs it:");
    for (what, ms) in rows {
        println!("{what:<58} {:>10.3} ms {:>10.3} ms", ms.wall, ms.cpu);
    }
}
