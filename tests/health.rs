//! Health checks end to end: a real vipgated between namespaces, three
//! real HTTP backends, continuous HTTP traffic through the VIP with curl.
//! vipgated runs in its own namespace with the exception path on
//! (`RigOptions::exception`): its probes leave from the gateway's kernel
//! (198.18.1.1 on its kernel interface `backend`), are sent by the DPDK
//! port, and the backends' answers are punted back to that kernel. No
//! other path reaches the backends.
//!
//! Stopping one backend takes it out of new-flow selection within fall x
//! interval (plus the timeout and some slack); after that no request fails
//! and none reaches it; bringing it back restores its share. Watch reports
//! both changes, and health never bumps the desired-state version.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use vipgate::{Rig, RigOptions, backend_addr, workspace_bin};

const INTERVAL_MS: u64 = 200;
const TIMEOUT_MS: u64 = 100;
const RISE: u64 = 2;
const FALL: u64 = 2;
/// Scheduling, the watch stream and the publication to the workers.
const SLACK: Duration = Duration::from_millis(500);
/// The address of the gateway's kernel interface `backend`.
const GATEWAY_BACKEND_ADDR: &str = "198.18.1.1";

/// Has the gateway's kernel resolve backends `backends` (1-based) with a
/// ping (ARP out and back through the exception path), so that the first
/// probe to a backend it has never talked to does not also wait for that:
/// on a loaded machine the two together can outlast a 100 ms timeout, and
/// these tests check what the first probe's success does.
fn resolve_backends(rig: &Rig, backends: &[usize]) {
    for &i in backends {
        let out = rig.gateway(&["ping", "-c", "1", "-W", "2", &backend_addr(i)]);
        assert!(
            out.status.success(),
            "the gateway's kernel cannot reach backend-{i}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A total counter from `vipgatectl --json stats`.
fn total(stats: &serde_json::Value, name: &str) -> u64 {
    stats["total"][name].as_u64().unwrap_or_else(|| panic!("no total.{name} in {stats}"))
}

/// `vipgatectl --json watch` in the background: each line, parsed, with
/// when it arrived. Killed on drop.
struct Watch {
    child: Child,
    lines: mpsc::Receiver<(Instant, serde_json::Value)>,
    backlog: std::cell::RefCell<Vec<(Instant, serde_json::Value)>>,
}

impl Watch {
    fn start(rig: &Rig) -> Watch {
        let mut child = Command::new(workspace_bin("vipgatectl"))
            .arg("--socket")
            .arg(&rig.socket)
            .args(["--json", "watch"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vipgatectl watch");
        let out = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v: serde_json::Value = serde_json::from_str(&line).expect("vipgatectl --json watch prints JSON");
                if tx.send((Instant::now(), v)).is_err() {
                    return;
                }
            }
        });
        Watch { child, lines, backlog: std::cell::RefCell::default() }
    }

    /// The first message matching `want` within `within`, with its arrival:
    /// among those that earlier calls passed over first, then new ones.
    fn wait_for(&self, within: Duration, want: impl Fn(&serde_json::Value) -> bool) -> (Instant, serde_json::Value) {
        let mut backlog = self.backlog.borrow_mut();
        if let Some(i) = backlog.iter().position(|(_, v)| want(v)) {
            return backlog.remove(i);
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, v)) if want(&v) => return (at, v),
                Ok(other) => backlog.push(other),
                Err(_) => panic!("no such watch message within {within:?}; passed over {:#?}", *backlog),
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A health event of web's backend `i` going `state` ("up" or "down").
fn health_event(i: usize, state: &'static str) -> impl Fn(&serde_json::Value) -> bool {
    move |v| {
        let h = &v["health"];
        h["service"] == "web" && h["address"] == backend_addr(i).as_str() && h["port"] == 8080 && h["health"] == state
    }
}

/// The health of web's backends in GetState, by address order.
fn web_health(rig: &Rig) -> (u64, Vec<String>) {
    let out = rig.ctl(&["--json", "list"]);
    assert!(out.status.success(), "vipgatectl list: {}", String::from_utf8_lossy(&out.stderr));
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let web = state["services"].as_array().unwrap().iter().find(|s| s["name"] == "web").expect("web is listed");
    let health = web["backends"].as_array().unwrap().iter().map(|b| b["health"].as_str().unwrap().to_owned()).collect();
    (state["version"].as_u64().unwrap(), health)
}

/// One request through the VIP: when it started, and who answered or why
/// it failed.
type Outcome = (Instant, Result<String, String>);

fn request(rig: &Rig, sport: &AtomicU16) -> Outcome {
    let started = Instant::now();
    // A new source port each time: no request reuses a tracked flow.
    let port = sport.fetch_add(1, Ordering::SeqCst);
    (started, rig.whoami(port).map(|w| w.backend))
}

fn shares(outcomes: &[Outcome]) -> [usize; 3] {
    let mut n = [0; 3];
    for (_, r) in outcomes {
        if let Ok(b) = r {
            let i: usize = b.strip_prefix("backend-").and_then(|i| i.parse().ok()).expect("backend-N");
            n[i - 1] += 1;
        }
    }
    n
}

#[test]
fn a_stopped_backend_leaves_new_flows_within_fall_intervals_and_returns_after_rise() {
    let rig = Rig::start(RigOptions {
        web_health_check: Some(format!(
            "kind = \"http\"\npath = \"/health\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = {RISE}\nfall = {FALL}"
        )),
        exception: true,
        ..RigOptions::default()
    });
    // Probes started with the daemon, before rig.sh had moved the backend
    // port's tap into the backend namespace; they pass once it has.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (version, _) = loop {
        let (version, health) = web_health(&rig);
        if health == ["up", "up", "up"] {
            break (version, health);
        }
        assert!(Instant::now() < deadline, "web's backends are not all up: {health:?}\n{}", rig.log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    let watch = Watch::start(&rig);
    watch.wait_for(Duration::from_secs(5), |v| v["snapshot"].is_object());
    let sport = AtomicU16::new(20_000);
    // GetState shows the static service's check with every field in force.
    let state: serde_json::Value = serde_json::from_slice(&rig.ctl(&["--json", "list"]).stdout).expect("JSON");
    let web = state["services"].as_array().unwrap().iter().find(|s| s["name"] == "web").expect("web");
    assert_eq!(
        web["health_check"],
        serde_json::json!({"kind": "http", "interval_ms": INTERVAL_MS, "timeout_ms": TIMEOUT_MS, "rise": RISE,
            "fall": FALL, "path": "/health", "expect_status": "200-399"})
    );
    // The probes go through the exception path: the kernel's frames out
    // (from_kernel) and the backends' answers punted to it (to_kernel).
    let punts = |stats: serde_json::Value| (total(&stats, "from_kernel"), total(&stats, "to_kernel"));
    let (from0, to0) = punts(rig.stats());
    std::thread::sleep(Duration::from_millis(3 * INTERVAL_MS));
    let (from1, to1) = punts(rig.stats());
    println!(
        "exception path during {} ms of probes: from_kernel +{}, to_kernel +{}",
        3 * INTERVAL_MS,
        from1 - from0,
        to1 - to0
    );
    // Three backends, at least two rounds: a SYN, an ACK, a request each
    // way out; a SYN-ACK and a response back.
    assert!(
        from1 - from0 >= 12 && to1 - to0 >= 12,
        "probes through the exception path: from_kernel +{}, to_kernel +{}",
        from1 - from0,
        to1 - to0
    );

    let before: Vec<Outcome> = (0..30).map(|_| request(&rig, &sport)).collect();
    assert!(before.iter().all(|(_, r)| r.is_ok()), "all up, every request passes: {before:?}");
    assert!(shares(&before).iter().all(|&n| n > 0), "every backend answers: {:?}", shares(&before));

    // Continuous traffic while backend-2 stops.
    let outcomes = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let (stopped_at, down_at, down) = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let o = request(&rig, &sport);
                outcomes.lock().unwrap().push(o);
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let stopped_at = Instant::now();
        rig.stop_backend(2);
        let (down_at, down) = watch.wait_for(Duration::from_secs(5), health_event(2, "down"));
        // Traffic goes on for a while after the change.
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::SeqCst);
        (stopped_at, down_at, down)
    });
    let took = down_at - stopped_at;
    let bound = Duration::from_millis(FALL * INTERVAL_MS + TIMEOUT_MS) + SLACK;
    println!("backend-2 down {took:?} after it stopped (bound {bound:?}): {down}");
    assert!(took <= bound, "down after {took:?}, more than fall x interval + timeout + slack ({bound:?})");
    assert_eq!(down["version"], version, "a health change takes no version: {down}");
    let reason = down["health"]["reason"].as_str().unwrap();
    assert!(reason.contains("refused"), "the reason is the probe's failure: {reason}");

    let outcomes = outcomes.into_inner().unwrap();
    let after: Vec<&Outcome> = outcomes.iter().filter(|(t, _)| *t >= down_at).collect();
    assert!(after.len() >= 10, "traffic after the change: {} requests", after.len());
    for (_, r) in &after {
        match r {
            Ok(b) => assert_ne!(b, "backend-2", "a new flow reached the stopped backend after it was marked down"),
            Err(e) => panic!("a request failed after backend-2 was marked down: {e}"),
        }
    }
    let failed_before = outcomes.iter().filter(|(t, r)| *t < down_at && r.is_err()).count();
    println!(
        "{} requests while it stopped ({failed_before} failed before it was marked down), {} after, all passed",
        outcomes.len() - after.len(),
        after.len()
    );
    let (v, health) = web_health(&rig);
    assert_eq!((v, health), (version, vec!["up".to_owned(), "down".to_owned(), "up".to_owned()]));

    // Back: rig.sh restarts it and returns once it answers; the checker
    // brings it up after `rise` probes, which may pass before rig.sh has
    // finished its own checks.
    let restarting = Instant::now();
    rig.repair();
    let answering = Instant::now();
    let (up_at, up) = watch.wait_for(Duration::from_secs(5), health_event(2, "up"));
    let bound = Duration::from_millis(RISE * INTERVAL_MS + TIMEOUT_MS) + SLACK;
    println!(
        "backend-2 up {:?} after its restart began, {:?} after rig.sh saw it answer (bound {bound:?}): {up}",
        up_at - restarting,
        up_at.saturating_duration_since(answering)
    );
    assert!(up_at > restarting, "up only once it was restarted");
    assert!(
        up_at.saturating_duration_since(answering) <= bound,
        "up {:?} after it answers, more than rise x interval + timeout + slack ({bound:?})",
        up_at.saturating_duration_since(answering)
    );
    assert_eq!(up["version"], version);
    assert_eq!(up["health"]["reason"], format!("{RISE} successful probes in a row"));

    let back: Vec<Outcome> = (0..60).map(|_| request(&rig, &sport)).collect();
    assert!(back.iter().all(|(_, r)| r.is_ok()), "{back:?}");
    let n = shares(&back);
    println!("shares after the return: {n:?}");
    assert!(n[1] >= 6, "backend-2 takes its share again: {n:?}");
    assert_eq!(web_health(&rig), (version, vec!["up".to_owned(), "up".to_owned(), "up".to_owned()]));

    let log = rig.log_text();
    assert!(log.contains("backend down: takes no new flows"), "{log}");
    assert!(log.contains("backend up: takes new flows"), "{log}");
    drop(watch);
    rig.teardown().assert_clean();
}

#[test]
fn backends_added_by_a_reload_take_no_flows_until_their_first_probe_passes() {
    let rig = Rig::start(RigOptions {
        backends: 4,
        configured_backends: Some(3),
        web_health_check: Some(format!(
            "kind = \"http\"\npath = \"/health\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = {RISE}\nfall = {FALL}"
        )),
        exception: true,
        ..RigOptions::default()
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while web_health(&rig).1 != ["up", "up", "up"] {
        assert!(Instant::now() < deadline, "web's backends are not all up: {:?}", web_health(&rig));
        std::thread::sleep(Duration::from_millis(50));
    }
    let watch = Watch::start(&rig);
    watch.wait_for(Duration::from_secs(5), |v| v["snapshot"].is_object());

    // backend-4 runs; backend-99 (198.18.1.99) does not exist: its probes
    // time out. Both join web with the reload.
    let mut text = rig.config_with_web_backends(&[(1, 1), (2, 1), (3, 1), (4, 1)]);
    text = text.replace(
        &format!("  {{ address = \"{}\", port = 8080, weight = 1 }},", backend_addr(4)),
        &format!(
            "  {{ address = \"{}\", port = 8080, weight = 1 }},\n  {{ address = \"198.18.1.99\", port = 8080, weight = 1 }},",
            backend_addr(4)
        ),
    );
    assert!(text.contains("198.18.1.99"), "{text}");
    let sport = AtomicU16::new(30_000);
    resolve_backends(&rig, &[4]);
    rig.reload(&text);
    let reloaded = Instant::now();
    // From the reload's own snapshot on, the new backends are down: no
    // request fails, although one of them does not exist.
    let first: Vec<Outcome> = (0..20).map(|_| request(&rig, &sport)).collect();
    assert!(first.iter().all(|(_, r)| r.is_ok()), "{first:?}");
    let (up_at, up) = watch.wait_for(Duration::from_secs(5), health_event(4, "up"));
    println!("backend-4 up {:?} after the reload: {up}", up_at.saturating_duration_since(reloaded));
    assert_eq!(up["health"]["reason"], "the first probe passed");
    assert!(up_at.saturating_duration_since(reloaded) <= Duration::from_millis(INTERVAL_MS + TIMEOUT_MS) + SLACK);

    let after: Vec<Outcome> = (0..80).map(|_| request(&rig, &sport)).collect();
    assert!(after.iter().all(|(_, r)| r.is_ok()), "the missing backend takes no flows: {after:?}");
    let mut n = [0usize; 4];
    for (_, r) in &after {
        let b = r.as_ref().unwrap();
        n[b.strip_prefix("backend-").and_then(|i| i.parse::<usize>().ok()).unwrap() - 1] += 1;
    }
    println!("shares after backend-4 came up: {n:?}");
    assert!(n[3] >= 5, "backend-4 takes a share once up: {n:?}");
    let (_, health) = web_health(&rig);
    assert_eq!(health, ["up", "up", "up", "up", "down"], "in the service's order");
    drop(watch);
    rig.teardown().assert_clean();
}

/// Sends one datagram to `vip:port` from each of `n` fresh sockets in the
/// client namespace and returns each reply's first word (the backend's
/// name), or "timeout".
fn udp_round(rig: &Rig, vip: &str, port: u16, n: usize) -> Vec<String> {
    const SCRIPT: &str = r#"
import socket, sys
vip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    s.connect((vip, port))
    s.send(b"ping")
    try:
        print(s.recv(2048).decode().split()[0])
    except OSError:
        print("timeout")
    s.close()
"#;
    let out = rig.client(&["python3", "-c", SCRIPT, vip, &port.to_string(), &n.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

#[test]
fn an_api_service_with_a_udp_check_reports_health_through_get_state_and_watch() {
    // echo (static) keeps backend-1; the API's service gets 2 and 3.
    let rig = Rig::start(RigOptions { configured_backends: Some(1), exception: true, ..RigOptions::default() });
    // The gateway's kernel address on the backend LAN, as an explicit source.
    let source = GATEWAY_BACKEND_ADDR.to_owned();
    resolve_backends(&rig, &[2, 3]);
    let watch = Watch::start(&rig);
    watch.wait_for(Duration::from_secs(5), |v| v["snapshot"].is_object());
    let out = rig.ctl(&[
        "service",
        "create",
        "dns",
        "--vip",
        "198.18.100.2",
        "--port",
        "5353",
        "--protocol",
        "udp",
        "--backend",
        &format!("{}:5353", backend_addr(2)),
        "--backend",
        &format!("{}:5353", backend_addr(3)),
        "--check",
        "udp",
        "--check-payload-hex",
        "70696e67",
        "--check-expect-reply-hex",
        "6261636b656e642d",
        "--check-interval-ms",
        "200",
        "--check-fall",
        "2",
        "--check-source",
        &source,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // New backends: down until their first probe passes.
    let udp_event = |i: usize, state: &'static str| {
        move |v: &serde_json::Value| {
            let h = &v["health"];
            h["service"] == "dns" && h["address"] == backend_addr(i).as_str() && h["health"] == state
        }
    };
    for i in [2, 3] {
        let (_, up) = watch.wait_for(Duration::from_secs(3), udp_event(i, "up"));
        assert_eq!(up["health"]["reason"], "the first probe passed", "{up}");
        assert_eq!(up["version"], 1, "the version of the CreateService: {up}");
    }
    let state: serde_json::Value = serde_json::from_slice(&rig.ctl(&["--json", "list"]).stdout).expect("JSON");
    let dns = state["services"].as_array().unwrap().iter().find(|s| s["name"] == "dns").expect("dns");
    assert_eq!(
        dns["health_check"],
        serde_json::json!({"kind": "udp", "interval_ms": 200, "timeout_ms": 100, "rise": 2, "fall": 2,
            "payload_hex": "70696e67", "expect_reply_hex": "6261636b656e642d", "source": source}),
        "every field in force, defaults filled in"
    );
    let replies = udp_round(&rig, "198.18.100.2", 5353, 20);
    assert!(replies.iter().all(|r| r == "backend-2" || r == "backend-3"), "{replies:?}");
    assert!(replies.iter().any(|r| r == "backend-2") && replies.iter().any(|r| r == "backend-3"), "{replies:?}");

    // backend-3 stops: its kernel answers the probes with port unreachable.
    rig.stop_backend(3);
    let (_, down) = watch.wait_for(Duration::from_secs(3), udp_event(3, "down"));
    assert_eq!(down["health"]["reason"], "UDP: port unreachable (ICMP)", "{down}");
    let replies = udp_round(&rig, "198.18.100.2", 5353, 20);
    assert!(replies.iter().all(|r| r == "backend-2"), "only backend-2 takes new flows: {replies:?}");
    let list = String::from_utf8_lossy(&rig.ctl(&["list"]).stdout).into_owned();
    // Rows with spaces squeezed: "-> ADDR:PORT Masq WEIGHT ACTIVE INACTIVE STATE".
    let row = |addr: String| -> String {
        list.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .find(|l| l.starts_with(&format!("-> {addr}:5353 ")))
            .unwrap_or_else(|| panic!("no row for {addr}:5353 in {list}"))
    };
    let down_row = row(backend_addr(3));
    assert!(down_row.starts_with(&format!("-> {}:5353 Masq 1 ", backend_addr(3))), "{list}");
    assert!(down_row.ends_with(" enabled, down (UDP: port unreachable (ICMP))"), "{list}");
    assert!(row(backend_addr(2)).ends_with(" enabled, up"), "{list}");
    assert!(list.contains(", check udp payload 4 bytes every 200 ms (timeout 100, rise 2, fall 2))"), "{list}");

    // The health check removed: every backend unchecked (and so in use).
    let out = rig.ctl(&[
        "service",
        "update",
        "dns",
        "--vip",
        "198.18.100.2",
        "--port",
        "5353",
        "--protocol",
        "udp",
        "--backend",
        &format!("{}:5353", backend_addr(2)),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let state: serde_json::Value = serde_json::from_slice(&rig.ctl(&["--json", "list"]).stdout).expect("JSON");
    let dns = state["services"].as_array().unwrap().iter().find(|s| s["name"] == "dns").expect("dns");
    assert!(dns.get("health_check").is_none(), "{dns}");
    assert_eq!(dns["backends"][0]["health"], "unchecked");
    drop(watch);
    rig.teardown().assert_clean();
}
