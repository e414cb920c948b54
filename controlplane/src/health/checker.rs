//! The checker: one probe task per checked backend, and the rise/fall state
//! machine that turns probe outcomes into health.
//!
//! Owns: which backends are probed (they follow the desired state), when
//! (a random first delay within one interval, then every interval shortened
//! by up to a tenth), each backend's [`HealthState`], the initial state of
//! a backend, and the probe counters that the API and the metrics read.
//! Must not compile or publish snapshots: the daemon's single writer owns
//! the [`Checker`], feeds it the probe reports and publishes what changes.
//!
//! Initial state. At daemon start every backend counts as up, so that a
//! restart does not black-hole traffic; its first probe result then
//! decides at once (one failure takes it down), so a broken backend gets
//! new flows for at most one interval plus a timeout. A backend that joins
//! later (added to a service, or in a new service) counts as down until its
//! first probe succeeds, which brings it up at once. A backend that already
//! forwarded before its service got a check counts as up, like at start. A
//! changed check keeps the backend's health and restarts its counts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::probe::{first_delay, jittered, probe, random};
use crate::health_check::HealthCheck;

/// A backend of a service, as health knows it: the service's name and the
/// backend's own address and port (the check may probe another port).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetKey {
    /// The service's name.
    pub service: String,
    /// The backend's address.
    pub address: Ipv4Addr,
    /// The backend's port.
    pub port: u16,
}

impl std::fmt::Display for TargetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.service, self.address, self.port)
    }
}

/// A backend that forwards, with its service's check if it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Which backend.
    pub key: TargetKey,
    /// Its service's check; `None`: not checked (always healthy).
    pub check: Option<HealthCheck>,
}

impl Target {
    /// Where probes go: the backend's address, on the check's port or else
    /// the backend's.
    pub fn probe_addr(key: &TargetKey, check: &HealthCheck) -> SocketAddrV4 {
        SocketAddrV4::new(key.address, check.port.unwrap_or(key.port))
    }
}

/// One backend's health: up or down, and the outcomes in a row that move
/// it. A *provisional* state (see the module's doc) is decided by the
/// first outcome alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthState {
    up: bool,
    provisional: bool,
    successes: u32,
    failures: u32,
}

impl HealthState {
    /// An assumed state, which the first outcome confirms or flips.
    pub fn provisional(up: bool) -> HealthState {
        HealthState { up, provisional: true, successes: 0, failures: 0 }
    }

    /// A confirmed state with no outcome counted yet.
    pub fn confirmed(up: bool) -> HealthState {
        HealthState { up, provisional: false, successes: 0, failures: 0 }
    }

    /// Whether the backend takes new flows.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Counts one outcome; true when it changed up/down. Down to up takes
    /// `rise` successes in a row, up to down `fall` failures in a row.
    pub fn record(&mut self, success: bool, rise: u32, fall: u32) -> bool {
        if success {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
        }
        let was = self.up;
        if self.provisional {
            self.provisional = false;
            self.up = success;
        } else if !self.up && self.successes >= rise {
            self.up = true;
        } else if self.up && self.failures >= fall {
            self.up = false;
        }
        was != self.up
    }
}

/// What one probe task reports after each probe.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    /// Which backend.
    pub key: TargetKey,
    /// The task's generation: a report of a task since replaced is ignored.
    generation: u64,
    /// Success, or why it failed.
    pub outcome: Result<(), String>,
}

/// A backend that went up or down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Which backend.
    pub key: TargetKey,
    /// Its new health.
    pub up: bool,
    /// Why: the last probe's failure, or the successes that brought it up.
    pub reason: String,
}

/// One checked backend as the API and the metrics show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetStatus {
    /// The check's kind: `tcp`, `http`, `https` or `udp`.
    pub kind: &'static str,
    /// Whether it takes new flows.
    pub up: bool,
    /// Successful probes since it was first checked.
    pub probes_ok: u64,
    /// Failed probes since it was first checked.
    pub probes_failed: u64,
    /// The last failure's reason; empty once a probe succeeds.
    pub last_failure: String,
}

/// The health of every checked backend, shared with the API and the
/// metrics (read under a short lock; written by the checker).
#[derive(Debug, Default)]
pub struct HealthStatus {
    targets: Mutex<BTreeMap<TargetKey, TargetStatus>>,
}

impl HealthStatus {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<TargetKey, TargetStatus>> {
        self.targets.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of every checked backend's status, by key.
    pub fn snapshot(&self) -> BTreeMap<TargetKey, TargetStatus> {
        self.lock().clone()
    }

    /// One backend's status; `None` when it is not checked.
    pub fn get(&self, key: &TargetKey) -> Option<TargetStatus> {
        self.lock().get(key).cloned()
    }
}

struct Running {
    check: HealthCheck,
    state: HealthState,
    generation: u64,
    task: Option<AbortHandle>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The targets of a desired state and the health each checked one will
/// have, computed before the state is committed (so that its snapshot
/// already leaves out the backends that start down) and applied after.
#[derive(Debug)]
pub struct Plan {
    targets: Vec<Target>,
    down: HashSet<TargetKey>,
    /// `None`: `targets` are every target. Some: they are the targets of
    /// these services, and the others' stay as they are.
    scope: Option<HashSet<String>>,
}

impl Plan {
    /// The backends to compile with weight 0.
    pub fn down(&self) -> &HashSet<TargetKey> {
        &self.down
    }
}

/// Every probe task and health state. Owned by the daemon's writer; its
/// tasks run on the control plane's runtime and report on a channel the
/// writer reads.
pub struct Checker {
    running: HashMap<TargetKey, Running>,
    /// Every forwarding backend of the applied plans, checked or not, by
    /// service.
    known: HashMap<String, HashSet<TargetKey>>,
    /// The checked targets that are down now.
    down: HashSet<TargetKey>,
    /// False until the first plan is applied (the daemon's start).
    started: bool,
    generation: u64,
    reports: mpsc::UnboundedSender<ProbeReport>,
    status: Arc<HealthStatus>,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker").field("targets", &self.running.len()).finish_non_exhaustive()
    }
}

impl Checker {
    /// A checker with no target, publishing into `status`, and the channel
    /// its probe tasks report on.
    pub fn new(status: Arc<HealthStatus>) -> (Checker, mpsc::UnboundedReceiver<ProbeReport>) {
        let (reports, rx) = mpsc::unbounded_channel();
        let checker = Checker {
            running: HashMap::new(),
            known: HashMap::new(),
            down: HashSet::new(),
            started: false,
            generation: 0,
            reports,
            status,
        };
        (checker, rx)
    }

    /// The health `targets` (every target) would have if applied now.
    pub fn plan(&self, targets: Vec<Target>) -> Plan {
        let down = targets
            .iter()
            .filter(|t| t.check.is_some() && !self.initial_or_current(&t.key).is_up())
            .map(|t| t.key.clone())
            .collect();
        Plan { targets, down, scope: None }
    }

    /// The health the services in `scope` would have with `targets` (every
    /// target of those services, and of no other) if applied now; every
    /// other service's targets stay as they are. Costs what `scope` holds,
    /// and the backends that are down.
    pub fn plan_services(&self, targets: Vec<Target>, scope: HashSet<String>) -> Plan {
        debug_assert!(targets.iter().all(|t| scope.contains(&t.key.service)));
        let mut down: HashSet<TargetKey> = self.down.iter().filter(|k| !scope.contains(&k.service)).cloned().collect();
        down.extend(
            targets
                .iter()
                .filter(|t| t.check.is_some() && !self.initial_or_current(&t.key).is_up())
                .map(|t| t.key.clone()),
        );
        Plan { targets, down, scope: Some(scope) }
    }

    fn initial_or_current(&self, key: &TargetKey) -> HealthState {
        match self.running.get(key) {
            Some(r) => r.state,
            None => {
                HealthState::provisional(!self.started || self.known.get(&key.service).is_some_and(|k| k.contains(key)))
            }
        }
    }

    /// Makes `plan` the probed set: starts the tasks of new targets and of
    /// changed checks, stops those of removed targets, leaves the others
    /// alone (their tasks, states and counts). Must run inside the runtime.
    pub fn apply(&mut self, plan: Plan) {
        let mut keep = HashSet::new();
        for target in &plan.targets {
            let Some(check) = &target.check else { continue };
            keep.insert(target.key.clone());
            if self.running.get(&target.key).is_some_and(|r| r.check == *check) {
                continue;
            }
            let state = match self.running.get(&target.key) {
                // A changed check: same health, counts start again.
                Some(r) => HealthState::confirmed(r.state.is_up()),
                None => self.initial_or_current(&target.key),
            };
            self.generation += 1;
            let generation = self.generation;
            let task = tokio::spawn(run(target.key.clone(), generation, check.clone(), self.reports.clone()));
            let previous = self.running.insert(
                target.key.clone(),
                Running { check: check.clone(), state, generation, task: Some(task.abort_handle()) },
            );
            let mut status = self.status.lock();
            let entry = status.entry(target.key.clone()).or_insert_with(|| TargetStatus {
                kind: check.kind.name(),
                up: state.is_up(),
                probes_ok: 0,
                probes_failed: 0,
                last_failure: String::new(),
            });
            entry.kind = check.kind.name();
            entry.up = state.is_up();
            drop(previous);
        }
        // What the plan replaces: every target, or those of its services.
        let replaced: Vec<TargetKey> = match &plan.scope {
            None => self.known.values().flatten().cloned().collect(),
            Some(scope) => scope.iter().filter_map(|s| self.known.get(s)).flatten().cloned().collect(),
        };
        {
            let mut status = self.status.lock();
            for k in replaced.iter().filter(|k| !keep.contains(*k)) {
                self.running.remove(k);
                status.remove(k);
                self.down.remove(k);
            }
        }
        match &plan.scope {
            None => self.known.clear(),
            Some(scope) => {
                for s in scope {
                    self.known.remove(s);
                }
            }
        }
        for t in plan.targets {
            match self.running.get(&t.key) {
                Some(r) if !r.state.is_up() => self.down.insert(t.key.clone()),
                _ => self.down.remove(&t.key),
            };
            self.known.entry(t.key.service.clone()).or_default().insert(t.key);
        }
        self.started = true;
    }

    /// Counts one probe report; returns the transition it caused, if any.
    /// A report of a removed or replaced task is ignored.
    pub fn report(&mut self, report: ProbeReport) -> Option<Transition> {
        let running = self.running.get_mut(&report.key)?;
        if running.generation != report.generation {
            return None;
        }
        let success = report.outcome.is_ok();
        let first = running.state.provisional;
        let changed = running.state.record(success, running.check.rise, running.check.fall);
        let up = running.state.is_up();
        if up {
            self.down.remove(&report.key);
        } else {
            self.down.insert(report.key.clone());
        }
        let rise = running.check.rise;
        {
            let mut status = self.status.lock();
            if let Some(s) = status.get_mut(&report.key) {
                s.up = up;
                match &report.outcome {
                    Ok(()) => {
                        s.probes_ok += 1;
                        s.last_failure.clear();
                    }
                    Err(e) => {
                        s.probes_failed += 1;
                        s.last_failure.clone_from(e);
                    }
                }
            }
        }
        changed.then(|| Transition {
            reason: match &report.outcome {
                Err(e) => e.clone(),
                Ok(()) if first => "the first probe passed".to_owned(),
                Ok(()) if rise == 1 => "1 successful probe".to_owned(),
                Ok(()) => format!("{rise} successful probes in a row"),
            },
            key: report.key,
            up,
        })
    }

    /// The checked backends that are down now.
    pub fn down(&self) -> HashSet<TargetKey> {
        self.down.clone()
    }

    /// The checked backends that are down now, without a copy.
    pub fn down_ref(&self) -> &HashSet<TargetKey> {
        &self.down
    }

    /// Whether `key` is checked and up (`None`: not checked).
    pub fn is_up(&self, key: &TargetKey) -> Option<bool> {
        self.running.get(key).map(|r| r.state.is_up())
    }

    /// The number of probe tasks.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether nothing is probed.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

/// One target's probe loop: a random first delay within one interval, then
/// a probe every interval (shortened by up to a tenth, at random), each
/// outcome reported. Ends when the checker aborts it or is gone.
async fn run(key: TargetKey, generation: u64, check: HealthCheck, reports: mpsc::UnboundedSender<ProbeReport>) {
    let target = Target::probe_addr(&key, &check);
    let interval = check.interval();
    tokio::time::sleep(first_delay(interval, random((&key, generation)))).await;
    let mut n: u64 = 0;
    loop {
        let start = Instant::now();
        let outcome = probe(&check, target).await;
        if reports.send(ProbeReport { key: key.clone(), generation, outcome }).is_err() {
            return;
        }
        n += 1;
        tokio::time::sleep_until(start + jittered(interval, random((&key, generation, n)))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Feeds `outcomes` ('+' success, '-' failure) and returns the up/down
    /// after each, as a string of 'U' and 'D'.
    fn run(mut s: HealthState, rise: u32, fall: u32, outcomes: &str) -> String {
        outcomes
            .chars()
            .map(|c| {
                s.record(c == '+', rise, fall);
                if s.is_up() { 'U' } else { 'D' }
            })
            .collect()
    }

    #[test]
    fn rise_and_fall_count_outcomes_in_a_row() {
        let up = HealthState::confirmed(true);
        let down = HealthState::confirmed(false);
        // fall 3: two failures are not enough; a success in between resets.
        assert_eq!(run(up, 2, 3, "--+--+---"), "UUUUUUUUD");
        // rise 2 after a fall; a failure in between resets.
        assert_eq!(run(down, 2, 3, "+-+-++"), "DDDDDU");
        assert_eq!(run(up, 1, 1, "-+-+"), "DUDU");
        // Up stays up on successes; down stays down on failures.
        assert_eq!(run(up, 2, 2, "+++"), "UUU");
        assert_eq!(run(down, 2, 2, "---"), "DDD");
    }

    #[test]
    fn a_provisional_state_is_decided_by_the_first_outcome() {
        assert_eq!(run(HealthState::provisional(true), 3, 3, "-+++"), "DDDU");
        assert_eq!(run(HealthState::provisional(true), 3, 3, "+--"), "UUU");
        assert_eq!(run(HealthState::provisional(false), 3, 3, "+--"), "UUU");
        assert_eq!(run(HealthState::provisional(false), 3, 3, "-++"), "DDD");
    }

    #[test]
    fn record_says_when_it_changed() {
        let mut s = HealthState::confirmed(true);
        assert!(!s.record(false, 2, 2));
        assert!(s.record(false, 2, 2));
        assert!(!s.record(false, 2, 2));
        assert!(!s.record(true, 2, 2));
        assert!(s.record(true, 2, 2));
    }

    #[test]
    fn jitter_stays_within_a_tenth_below_the_interval_and_first_probes_spread() {
        use super::super::probe::{first_delay, jittered};
        let i = Duration::from_millis(1000);
        for r in [0, 1, 499_999, 1_000_000, u64::MAX] {
            let j = jittered(i, r);
            assert!(j <= i && j >= Duration::from_millis(900), "{r}: {j:?}");
            assert!(first_delay(i, r) < i);
        }
        let firsts: HashSet<u128> = (0..100u64).map(|n| first_delay(i, random(n)).as_millis() / 100).collect();
        assert!(firsts.len() >= 8, "100 first delays fall in {} of 10 tenths of the interval", firsts.len());
    }

    #[tokio::test]
    async fn a_plan_of_some_services_replaces_their_targets_and_leaves_the_others_alone() {
        use crate::health::HealthCheckInput;
        use std::net::Ipv4Addr;
        let (mut c, _reports) = Checker::new(Arc::default());
        let check = HealthCheckInput {
            kind: Some("tcp".into()),
            interval_ms: Some(3_600_000),
            fall: Some(1),
            ..Default::default()
        }
        .validate()
        .unwrap();
        let key =
            |svc: &str, last: u8| TargetKey { service: svc.into(), address: Ipv4Addr::new(198, 18, 1, last), port: 80 };
        let t =
            |svc: &str, last: u8, checked: bool| Target { key: key(svc, last), check: checked.then(|| check.clone()) };
        c.apply(c.plan(vec![t("a", 1, true), t("a", 2, true), t("b", 3, true), t("b", 4, true)]));
        assert_eq!((c.len(), c.down().len()), (4, 0));
        // b's first backend and a's first go down.
        for k in [key("b", 3), key("a", 1)] {
            let generation = c.running[&k].generation;
            let t = c.report(ProbeReport { key: k.clone(), generation, outcome: Err("refused".into()) }).unwrap();
            assert!(!t.up);
        }
        assert_eq!(c.down(), HashSet::from([key("b", 3), key("a", 1)]));
        // A change to service a: 1 stays (same check: same task, still
        // down), 2 goes, 5 comes unchecked.
        let task = c.running[&key("a", 1)].generation;
        let plan = c.plan_services(vec![t("a", 1, true), t("a", 5, false)], HashSet::from(["a".to_owned()]));
        assert_eq!(plan.down(), &HashSet::from([key("b", 3), key("a", 1)]), "b's health is kept, a's planned");
        c.apply(plan);
        assert_eq!(c.len(), 3, "a1, b3, b4");
        assert_eq!(c.running[&key("a", 1)].generation, task, "an unchanged target keeps its task and state");
        assert!(!c.running.contains_key(&key("a", 2)) && c.running.contains_key(&key("b", 4)));
        assert_eq!(c.down(), HashSet::from([key("b", 3), key("a", 1)]));
        assert_eq!(c.known["a"], HashSet::from([key("a", 1), key("a", 5)]));
        // Service a deleted: its targets go, b's stay.
        c.apply(c.plan_services(vec![], HashSet::from(["a".to_owned()])));
        assert_eq!((c.len(), c.down()), (2, HashSet::from([key("b", 3)])));
        assert!(!c.known.contains_key("a"));
    }

    #[tokio::test]
    async fn a_target_new_after_the_start_is_down_until_its_first_probe_passes() {
        use crate::health::HealthCheckInput;
        use std::net::Ipv4Addr;
        let (mut c, _reports) = Checker::new(Arc::default());
        let check = HealthCheckInput { kind: Some("tcp".into()), interval_ms: Some(3_600_000), ..Default::default() }
            .validate()
            .unwrap();
        let key = |last: u8| TargetKey { service: "web".into(), address: Ipv4Addr::new(198, 18, 1, last), port: 80 };
        let t = |last: u8| Target { key: key(last), check: Some(check.clone()) };
        let first = c.plan(vec![t(1), t(2)]);
        assert!(first.down().is_empty(), "at the start every backend is up");
        c.apply(first);
        let reload = c.plan(vec![t(1), t(2), t(3)]);
        assert_eq!(reload.down(), &HashSet::from([key(3)]), "a backend added later starts down");
        c.apply(reload);
        assert_eq!(c.down(), HashSet::from([key(3)]));
        let scoped = c.plan_services(vec![t(1), t(2), t(3), t(4)], HashSet::from(["web".to_owned()]));
        assert_eq!(scoped.down(), &HashSet::from([key(3), key(4)]));
    }
}
