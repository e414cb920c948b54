//! The workers' liveness as vipgated reports it: an idle gateway stays
//! SERVING (its sleeping workers still complete loop iterations), a worker
//! that stops making progress turns `GetHealth` NOT_SERVING with the reason,
//! and SIGTERM stops a gateway promptly whatever `idle_sleep_us` says.
//!
//! A worker is stalled from outside, with no help from vipgated: the test
//! attaches to that one thread with ptrace (`PTRACE_SEIZE`, then
//! `PTRACE_INTERRUPT`), which stops it alone while the control plane runs
//! on, as a worker stuck in a long loop would look.

use nix::sys::ptrace;
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use std::time::{Duration, Instant};
use vipgate::NullGateway;

/// The largest `[dataplane] idle_sleep_us` the configuration accepts
/// (the worker caps any sleep by itself too).
const LARGEST_IDLE_SLEEP_US: u32 = vipgate_controlplane::config::MAX_IDLE_SLEEP_US;

/// `vipgatectl health --json`.
fn health(gw: &NullGateway) -> serde_json::Value {
    let out = gw.ctl(&["--json", "health"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A gateway with one worker (lcore 1), started, answering, and its worker
/// polling (it has loaded its first snapshot, in its first loop iteration:
/// before that it builds its tables).
fn start(tag: &str, idle_sleep_us: u32) -> NullGateway {
    let mut gw = NullGateway::builder(tag).idle_sleep_us(idle_sleep_us).build();
    let spawned = Instant::now();
    gw.spawn();
    gw.wait_ready(|g| {
        let out = g.ctl(&["--json", "stats"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|s| s["workers"][0]["snapshot"]["generation"].as_u64().is_some_and(|g| g > 0))
    });
    eprintln!("worker polling {:?} after the spawn", spawned.elapsed());
    gw
}

/// The thread ids of vipgated's DPDK worker lcores (EAL names them
/// `dpdk-worker<lcore>`, `lcore-worker-<lcore>` in older releases).
fn worker_threads(pid: u32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("list vipgated's threads")
        .filter_map(|e| {
            let e = e.ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            comm.contains("worker").then(|| e.file_name().to_str()?.parse().ok())?
        })
        .collect()
}

/// Polls `health` every 100 ms until `done` holds of it, for at most
/// `within`; returns the last answer.
fn poll_health(gw: &NullGateway, within: Duration, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let h = health(gw);
        if done(&h) || Instant::now() >= deadline {
            return h;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM; asserts a clean exit within `within` and returns how long it took.
fn stop_within(gw: &mut NullGateway, within: Duration) -> Duration {
    let start = Instant::now();
    gw.signal(libc::SIGTERM);
    loop {
        if let Some(status) = gw.try_wait() {
            let took = start.elapsed();
            let log = gw.log_text();
            assert!(status.success(), "exit {status:?}:\n{log}");
            assert!(log.contains("mbuf pool at shutdown: 0 in use (at start: 0)"), "{log}");
            return took;
        }
        assert!(start.elapsed() < within, "vipgated did not stop within {within:?} of SIGTERM:\n{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_idle_gateway_stays_serving_and_stops_at_once_whatever_its_idle_sleep() {
    let mut gw = start("liv", LARGEST_IDLE_SLEEP_US);
    // Idle from the start (its ports receive nothing): the worker sleeps
    // after its first 1024 empty polls. Three seconds, well past the one
    // second a loop may take before the worker counts as stuck.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut answers = 0;
    while Instant::now() < deadline {
        let h = health(&gw);
        assert_eq!(h["status"], "SERVING", "an idle gateway is serving: {h}\n{}", gw.log_text());
        assert_eq!(h["reason"], "", "{h}");
        answers += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(answers >= 20, "only {answers} health answers in 3 s");
    let took = stop_within(&mut gw, Duration::from_secs(3));
    eprintln!("stopped {took:?} after SIGTERM with idle_sleep_us = {LARGEST_IDLE_SLEEP_US}");
}

#[test]
fn a_stalled_worker_makes_the_gateway_not_serving_until_it_runs_again() {
    let mut gw = start("stl", 50);
    assert_eq!(health(&gw)["status"], "SERVING");
    let workers = worker_threads(gw.pid());
    assert_eq!(workers.len(), 1, "one worker thread expected: {workers:?}");
    let tid = Pid::from_raw(workers[0]);

    ptrace::seize(tid, ptrace::Options::empty()).expect("PTRACE_SEIZE the worker thread");
    ptrace::interrupt(tid).expect("PTRACE_INTERRUPT the worker thread");
    waitpid(tid, Some(WaitPidFlag::__WALL)).expect("wait for the worker thread to stop");
    let stalled = Instant::now();
    let h = poll_health(&gw, Duration::from_secs(5), |h| h["status"] != "SERVING");
    let after = stalled.elapsed();
    let table = String::from_utf8(gw.ctl(&["health"]).stdout).unwrap();
    // Resumed before any assertion, so that a failure leaves a gateway that
    // stops.
    ptrace::detach(tid, None).expect("PTRACE_DETACH the worker thread");
    assert_eq!(h["status"], "NOT_SERVING", "a worker stopped for {after:?}: {h}");
    assert!(after >= Duration::from_millis(900), "NOT_SERVING after {after:?} only: {h}");
    let reason = h["reason"].as_str().unwrap();
    assert!(reason.contains("worker loop stalled: lcore 1 for "), "{reason}");
    assert!(table.contains("reason   worker loop stalled: lcore 1 for "), "{table}");
    eprintln!("NOT_SERVING {after:?} after the worker stopped: {reason}\n{table}");

    let h = poll_health(&gw, Duration::from_secs(2), |h| h["status"] == "SERVING");
    assert_eq!(h["status"], "SERVING", "the worker runs again: {h}");
    assert_eq!(h["reason"], "", "{h}");
    stop_within(&mut gw, Duration::from_secs(10));
}

/// The nice value of thread `tid` of process `pid` (field 19 of its
/// `stat`, counted after the command name's closing parenthesis).
fn nice_of(pid: u32, tid: &str) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).expect("read a thread's stat");
    let after = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    // Fields from 3 (state) on; nice is field 19.
    after.split(' ').nth(19 - 3).expect("stat has a nice field").parse().expect("a number")
}

#[test]
fn the_control_plane_threads_run_above_the_workers_priority() {
    let mut gw = start("nice", 20);
    let pid = gw.pid();
    let mut seen = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("list vipgated's threads") {
        let tid = e.expect("a thread").file_name().into_string().expect("a tid");
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
        seen.push((comm.trim().to_owned(), nice_of(pid, &tid)));
    }
    let nice =
        |pred: &dyn Fn(&str) -> bool| -> Vec<i32> { seen.iter().filter(|(c, _)| pred(c)).map(|&(_, n)| n).collect() };
    // The main thread (the API, validation, compilation) and the compile
    // pool: [eal] control_plane_nice, -10 by default.
    let main = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/comm")).unwrap();
    assert_eq!(nice_of(pid, &pid.to_string()), -10, "main thread {main:?}; every thread: {seen:?}");
    let pool = nice(&|c| c.starts_with("vg-compile"));
    assert!(!pool.is_empty() && pool.iter().all(|&n| n == -10), "compile pool {pool:?}; every thread: {seen:?}");
    // The workers keep 0.
    let workers = nice(&|c| c.contains("worker") && !c.starts_with("tokio"));
    assert!(!workers.is_empty() && workers.iter().all(|&n| n == 0), "workers {workers:?}; every thread: {seen:?}");
    assert!(gw.log_text().contains("control plane threads: nice value"), "{}", gw.log_text());
    stop_within(&mut gw, Duration::from_secs(3));
}
