//! Configuration reloads (SIGHUP) under traffic: a long download keeps its
//! backend, and completes intact, while backends are added, removed,
//! reweighted or drained around it; new connections follow the new
//! configuration at once.
//!
//! Each test starts a rate-limited download (curl in the client namespace),
//! learns its backend from the response's `X-Backend` header while the body
//! is still arriving, reloads, checks that the download was still running,
//! sends new requests from fixed source ports (so every run has the same
//! flows), and checks the counters and the reload log lines.
//!
//! Needs root and hugepages (or VIPGATE_HUGEPAGES=0).

use std::collections::BTreeMap;
use std::time::Duration;
use vipgate::{Download, Mode, Rig, RigOptions, Whoami, bytes_sha256};

/// 40 MiB at 8 MiB/s: about 5 s, long enough for the reloads to happen
/// while the body flows.
const DOWNLOAD_BYTES: u64 = 40 * 1024 * 1024;
const DOWNLOAD_RATE: &str = "8M";
const DOWNLOAD_SOURCE_PORT: u16 = 42000;
/// How long the download's headers may take to arrive.
const HEADERS_WITHIN: Duration = Duration::from_secs(10);
/// New requests after the reloads.
const REQUESTS: u16 = 60;
/// Requests between the first and the second reload (first test).
const PROBES: u16 = 20;

/// Two workers sharing CPU 1 of a two-CPU machine.
const TWO_WORKERS: &str = "0@0,1@1,2@1";
const ONE_WORKER: &str = "0,1";

/// The backend index of a name `backend-i`.
fn index_of(name: &str) -> usize {
    name.strip_prefix("backend-").and_then(|i| i.parse().ok()).unwrap_or_else(|| panic!("not a backend name: {name:?}"))
}

/// `count` `/whoami` requests, each on a new connection from its own
/// source port `first..first+count`; panics (with the log) unless all
/// succeed.
fn requests(rig: &Rig, first: u16, count: u16) -> Vec<Whoami> {
    let results: Vec<Result<Whoami, String>> = (first..first + count).map(|p| rig.whoami(p)).collect();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {count} requests failed: {:?}\n{}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        rig.stats(),
        rig.log_text()
    );
    results.into_iter().map(Result::unwrap).collect()
}

/// Answers per backend name.
fn split(answers: &[Whoami]) -> BTreeMap<String, usize> {
    let mut split = BTreeMap::new();
    for a in answers {
        *split.entry(a.backend.clone()).or_default() += 1;
    }
    split
}

fn total(stats: &serde_json::Value, key: &str) -> u64 {
    stats["total"][key].as_u64().unwrap_or_else(|| panic!("no total.{key} in {stats}"))
}

fn drops(stats: &serde_json::Value, reason: &str) -> u64 {
    stats["total"]["drops"][reason].as_u64().unwrap_or_else(|| panic!("no total.drops.{reason} in {stats}"))
}

/// The log's reload outcomes (applied or refused), in order.
fn reload_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("configuration reloaded") || l.contains("reload refused")).collect()
}

/// Panics, saying how the download ended, unless it is still going.
fn expect_running(mut download: Download, when: &str) -> Download {
    if download.running() {
        return download;
    }
    let at = download.elapsed().as_secs_f64();
    panic!("the download ended {when} ({at:.2} s in): {:?}", download.finish());
}

fn web(backends: &[(usize, u32)]) -> String {
    backends.iter().map(|(i, w)| format!("backend-{i}:{w}")).collect::<Vec<_>>().join(" ")
}

#[test]
fn backend_changes_during_a_long_download_do_not_break_it() {
    let rig = Rig::start(RigOptions {
        mode: Mode::Nat,
        lcores: TWO_WORKERS.to_owned(),
        backends: 4,
        configured_backends: Some(3),
        ..RigOptions::default()
    });
    let expected_sha = bytes_sha256(DOWNLOAD_BYTES);

    let mut download = rig.start_download(DOWNLOAD_BYTES, DOWNLOAD_RATE, DOWNLOAD_SOURCE_PORT);
    let served_by = download.backend(HEADERS_WITHIN);
    let x = index_of(&served_by);
    assert!((1..=3).contains(&x), "the download went to {served_by}, which is not configured");
    println!(
        "download of {DOWNLOAD_BYTES} bytes at {DOWNLOAD_RATE}/s served by {served_by} ({:.2} s in)",
        download.elapsed().as_secs_f64()
    );
    // The first configured backend other than the download's.
    let removed = (1..=3).find(|&i| i != x).expect("three backends");
    let kept = (1..=3).find(|&i| i != x && i != removed).expect("three backends");

    // Reload 1: backend-4 joins, `removed` leaves.
    let first: Vec<(usize, u32)> = vec![(x.min(kept), 1), (x.max(kept), 1), (4, 1)];
    let line = rig.reload(&rig.config_with_web_backends(&first));
    println!("reload 1 (web: {}), {:.2} s into the download: {line}", web(&first), download.elapsed().as_secs_f64());
    let probes = requests(&rig, 43100, PROBES);
    let probe_split = split(&probes);
    println!("{PROBES} requests after reload 1: {probe_split:?}");
    assert!(
        !probe_split.contains_key(&format!("backend-{removed}")),
        "backend-{removed} was removed by reload 1 but answered: {probe_split:?}"
    );
    let download = expect_running(download, "before reload 2");

    // Reload 2: the download's backend weighs 3, the others 1.
    let second: Vec<(usize, u32)> = first.iter().map(|&(i, _)| (i, if i == x { 3 } else { 1 })).collect();
    let line = rig.reload(&rig.config_with_web_backends(&second));
    let at = download.elapsed();
    println!("reload 2 (web: {}), {:.2} s into the download: {line}", web(&second), at.as_secs_f64());
    let download = expect_running(download, "before reload 2 was applied");

    let downloaded = download.finish().unwrap_or_else(|e| panic!("the download failed: {e}\n{}", rig.log_text()));
    println!(
        "download finished after {:.2} s: {} bytes, HTTP {}, sha256 {}",
        downloaded.took.as_secs_f64(),
        downloaded.size,
        downloaded.code,
        downloaded.sha256
    );
    assert_eq!(downloaded.code, "200", "download status");
    assert_eq!(downloaded.size, DOWNLOAD_BYTES, "download length");
    assert_eq!(downloaded.sha256, expected_sha, "sha256 of the download");

    let answers = requests(&rig, 43000, REQUESTS);
    let after = split(&answers);
    println!("{REQUESTS} requests after reload 2: {after:?}");
    assert!(!after.contains_key(&format!("backend-{removed}")), "the removed backend-{removed} answered: {after:?}");
    assert!(after.get("backend-4").is_some_and(|&n| n >= 1), "the added backend-4 answered none: {after:?}");
    let heavy = after.get(&served_by).copied().unwrap_or(0);
    assert!(
        after.iter().all(|(name, &n)| name == &served_by || n < heavy),
        "{served_by} (weight 3) did not answer more than each weight-1 backend: {after:?}"
    );

    let stats = rig.stats();
    let log = rig.log_text();
    let rehashed = total(&stats, "flows_rehashed");
    println!(
        "flows_created {}, flows_rehashed {rehashed}, flows_reset {}",
        total(&stats, "flows_created"),
        total(&stats, "flows_reset")
    );
    let lines = reload_lines(&log);
    println!("reload log lines:\n  {}", lines.join("\n  "));
    assert_eq!(rehashed, 0, "a tracked flow's backend left: {stats}");
    assert_eq!(
        lines.iter().filter(|l| l.contains("configuration reloaded")).count(),
        2,
        "expected exactly 2 applied reloads:\n{log}"
    );
    assert!(!log.contains("reload refused"), "{log}");

    let left = rig.teardown();
    left.assert_clean();
}

#[test]
fn a_drained_backend_takes_no_new_connections_while_its_open_one_completes() {
    let rig = Rig::start(RigOptions { mode: Mode::FullNat, lcores: ONE_WORKER.to_owned(), ..RigOptions::default() });
    let expected_sha = bytes_sha256(DOWNLOAD_BYTES);

    let mut download = rig.start_download(DOWNLOAD_BYTES, DOWNLOAD_RATE, DOWNLOAD_SOURCE_PORT);
    let served_by = download.backend(HEADERS_WITHIN);
    let x = index_of(&served_by);
    println!(
        "download of {DOWNLOAD_BYTES} bytes at {DOWNLOAD_RATE}/s served by {served_by} ({:.2} s in)",
        download.elapsed().as_secs_f64()
    );

    // Reload: the download's backend drains (weight 0).
    let drained: Vec<(usize, u32)> = (1..=3).map(|i| (i, if i == x { 0 } else { 1 })).collect();
    let line = rig.reload(&rig.config_with_web_backends(&drained));
    let at = download.elapsed();
    println!("reload (web: {}), {:.2} s into the download: {line}", web(&drained), at.as_secs_f64());
    let download = expect_running(download, "before the reload was applied");

    let answers = requests(&rig, 44000, REQUESTS);
    let after = split(&answers);
    println!(
        "{REQUESTS} requests after the reload: {after:?} ({:.2} s into the download)",
        download.elapsed().as_secs_f64()
    );
    assert!(!after.contains_key(&served_by), "the drained {served_by} took new connections: {after:?}");
    // The drained backend's connection stayed open the whole time.
    let download = expect_running(download, "before the new requests were done");

    let downloaded = download.finish().unwrap_or_else(|e| panic!("the download failed: {e}\n{}", rig.log_text()));
    println!(
        "download finished after {:.2} s: {} bytes, HTTP {}, sha256 {}",
        downloaded.took.as_secs_f64(),
        downloaded.size,
        downloaded.code,
        downloaded.sha256
    );
    assert_eq!(downloaded.code, "200", "download status");
    assert_eq!(downloaded.size, DOWNLOAD_BYTES, "download length");
    assert_eq!(downloaded.sha256, expected_sha, "sha256 of the download");

    let stats = rig.stats();
    let log = rig.log_text();
    let (exhausted, no_flow) = (drops(&stats, "snat_exhausted"), drops(&stats, "no_flow"));
    println!(
        "flows_created {}, flows_rehashed {}, drops: snat_exhausted {exhausted}, no_flow {no_flow}",
        total(&stats, "flows_created"),
        total(&stats, "flows_rehashed")
    );
    let lines = reload_lines(&log);
    println!("reload log lines:\n  {}", lines.join("\n  "));
    assert_eq!(exhausted, 0, "{stats}");
    assert_eq!(no_flow, 0, "{stats}");
    assert_eq!(
        lines.iter().filter(|l| l.contains("configuration reloaded")).count(),
        1,
        "expected exactly 1 applied reload:\n{log}"
    );
    assert!(!log.contains("reload refused"), "{log}");

    let left = rig.teardown();
    left.assert_clean();
}
