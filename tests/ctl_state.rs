//! `vipgatectl`'s desired-state commands (list, service, backend, drain,
//! pool, apply, watch) against a running vipgated on net_null ports: the
//! real binary, its text and JSON output, its exit codes (1 for a refused
//! call naming the gRPC code, 2 for bad usage). Needs root and hugepages (or
//! VIPGATE_HUGEPAGES=0) and fails loudly without.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vipgate::{NullGateway, workspace_bin};

/// A vipgated under test with one static service "web" (as every
/// [`NullGateway`] has) and one static pool, as in tests/api_state.rs;
/// dropping it kills it and removes its files.
struct Daemon {
    gw: NullGateway,
}

/// `vipgatectl` on the gateway's socket.
fn vipgatectl(gw: &NullGateway) -> Command {
    let mut c = Command::new(workspace_bin("vipgatectl"));
    c.arg("--socket").arg(gw.socket()).env_remove("VIPGATE_ENDPOINT").stdin(Stdio::null());
    c
}

impl Daemon {
    fn start() -> Daemon {
        let mut gw = NullGateway::builder("ctl")
            .extra_config("\n[[source_pools]]\nname = \"static-pool\"\naddresses = [\"198.18.1.100\"]\n")
            .build();
        gw.spawn();
        gw.wait_ready(|gw| vipgatectl(gw).arg("list").output().unwrap().status.success());
        Daemon { gw }
    }

    fn ctl(&self, args: &[&str]) -> Output {
        vipgatectl(&self.gw).args(args).env_remove("VIPGATE_OWNER").output().unwrap()
    }

    /// Runs a command that must succeed and returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "vipgatectl {args:?}: {:?}\nstdout: {stdout}\nstderr: {stderr}", out.status);
        assert!(stderr.is_empty(), "vipgatectl {args:?}: stderr: {stderr}");
        println!("$ vipgatectl {}\n{stdout}", args.join(" "));
        stdout
    }

    /// Runs a command that must fail with `code` and returns its stderr.
    fn fails(&self, code: i32, args: &[&str]) -> String {
        let out = self.ctl(args);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(code), "vipgatectl {args:?}\nstdout: {stdout}\nstderr: {stderr}");
        assert!(stdout.is_empty(), "vipgatectl {args:?}: stdout: {stdout}");
        println!("$ vipgatectl {}   (exit {code})\n{stderr}", args.join(" "));
        stderr
    }

    /// Spawns `vipgatectl watch` and a thread that forwards its lines.
    fn watch(&self, json: bool) -> (Child, mpsc::Receiver<String>) {
        let mut c = vipgatectl(&self.gw);
        if json {
            c.arg("--json");
        }
        let mut child = c.arg("watch").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        (child, rx)
    }

    /// SIGTERM and a clean exit.
    fn stop(&mut self) {
        let status = self.gw.stop();
        assert!(status.success(), "exit {status:?}:\n{}", self.gw.log_text());
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Reads lines from a watcher until `n` have arrived, within 10 s.
fn lines(rx: &mpsc::Receiver<String>, n: usize, what: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => got.push(line),
            Err(e) => panic!("{what}: {e:?} after {got:?}"),
        }
    }
    got
}

/// A listing's lines with runs of spaces squeezed to one, for comparing
/// rows without depending on column widths.
fn rows(list: &str) -> Vec<String> {
    list.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect()
}

/// Asserts that `list` has each of `want` as a whole row (spaces squeezed).
fn has_rows(list: &str, want: &[&str]) {
    let rows = rows(list);
    for w in want {
        assert!(rows.iter().any(|r| r == w), "no row {w:?} in:\n{list}");
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn vipgatectl_manages_the_desired_state() {
    let mut d = Daemon::start();

    // The start: only the static objects, version 0.
    let list = d.ok(&["list"]);
    assert!(list.starts_with("vipgate state version 0 (config "), "{list}");
    has_rows(
        &list,
        &[
            "Prot LocalAddress:Port Mode Table Service",
            "-> RemoteAddress:Port Forward Weight ActiveConn InActConn State",
            "TCP 198.18.100.1:80 nat 65537 web (static, on-removal rehash)",
            "-> 198.18.1.11:8080 Masq 1 0 0 enabled",
        ],
    );
    assert!(list.contains("source pools:\n  static-pool  198.18.1.100  ports 1024-65535  static\n"), "{list}");
    let traffic = d.ok(&["list", "--stats"]);
    has_rows(
        &traffic,
        &[
            "Prot LocalAddress:Port Conns InPkts OutPkts InBytes OutBytes Service",
            "TCP 198.18.100.1:80 0 0 0 0 0 web (static, on-removal rehash)",
            "-> 198.18.1.11:8080 0 0 0 0 0",
        ],
    );

    // Pool, fullnat service with two backends, and each backend command;
    // each prints the version it produced.
    assert_eq!(
        d.ok(&["pool", "create", "snat", "--address", "198.18.1.101", "--ports", "1024-65535"]),
        "applied: version 1\n"
    );
    let out = d.ok(&["pool", "create", "snat2", "--address", "198.18.1.102", "--address", "198.18.1.103"]);
    assert_eq!(out, "applied: version 2\n");
    let out = d.ok(&[
        "service",
        "create",
        "api",
        "--vip",
        "198.18.100.2",
        "--port",
        "80",
        "--protocol",
        "tcp",
        "--mode",
        "fullnat",
        "--source-pool",
        "snat",
        "--table-size",
        "251",
        "--backend",
        "198.18.1.20:8080",
        "--backend",
        "198.18.1.21:8080:5",
    ]);
    assert_eq!(out, "applied: version 3\n");
    assert_eq!(d.ok(&["backend", "add", "api", "198.18.1.22:8080", "--weight", "3"]), "applied: version 4\n");
    assert_eq!(
        d.ok(&["--json", "backend", "update", "api", "198.18.1.22:8080", "--weight", "9"]),
        "{\n  \"version\": 5,\n  \"generation\": 5\n}\n"
    );
    assert_eq!(d.ok(&["drain", "api", "198.18.1.21:8080"]), "applied: version 6\n");
    assert_eq!(d.ok(&["backend", "update", "api", "198.18.1.20:8080", "--state", "disabled"]), "applied: version 7\n");
    assert_eq!(d.ok(&["backend", "remove", "api", "198.18.1.20:8080"]), "applied: version 8\n");

    let list = d.ok(&["ls"]);
    assert!(list.starts_with("vipgate state version 8 (config "), "{list}");
    has_rows(
        &list,
        &[
            "TCP 198.18.100.2:80 fullnat 251 api (dynamic, source-pool snat, on-removal rehash)",
            "-> 198.18.1.21:8080 FullNat 5 0 0 draining",
            "-> 198.18.1.22:8080 FullNat 9 0 0 enabled",
        ],
    );
    assert!(!list.contains("198.18.1.20:"), "{list}");
    assert!(list.contains("  snat  198.18.1.101  ports 1024-65535  dynamic\n"), "{list}");
    assert!(list.contains("  snat2  198.18.1.102,198.18.1.103  ports 1024-65535  dynamic\n"), "{list}");

    let state = json(&d.ok(&["--json", "list"]));
    assert_eq!(state["version"], 8);
    let api = state["services"].as_array().unwrap().iter().find(|s| s["name"] == "api").expect("api listed");
    assert_eq!(api["origin"], "dynamic");
    assert_eq!(api["mode"], "fullnat");
    assert_eq!(api["source_pool"], "snat");
    assert_eq!(api["table_size"], 251);
    let zero = serde_json::json!({
        "connections": 0, "in_packets": 0, "in_bytes": 0, "out_packets": 0, "out_bytes": 0,
        "active_flows": 0, "inactive_flows": 0
    });
    assert_eq!(
        api["backends"],
        serde_json::json!([
            {"address": "198.18.1.21", "port": 8080, "weight": 5, "state": "draining", "health": "unchecked", "stats": zero},
            {"address": "198.18.1.22", "port": 8080, "weight": 9, "state": "enabled", "health": "unchecked", "stats": zero},
        ])
    );
    assert_eq!(api["stats"], zero);
    let web = state["services"].as_array().unwrap().iter().find(|s| s["name"] == "web").expect("web listed");
    assert_eq!(web["origin"], "static");

    // Apply with the expected version, then again with the stale one.
    let file = d.gw.dir().join("apply.json");
    std::fs::write(
        &file,
        r#"{
  "services": [
    {"name": "api", "protocol": "tcp", "vip": "198.18.100.2", "port": 80, "mode": "fullnat",
     "source_pool": "snat", "table_size": 251,
     "stats": {"connections": 7, "active_flows": 1},
     "backends": [{"address": "198.18.1.30", "port": 8080, "weight": 2, "stats": {"in_packets": 3}},
                  {"address": "198.18.1.31", "port": 8080, "state": "draining"}]},
    {"name": "dns", "protocol": "udp", "vip": "198.18.100.3", "port": 53,
     "backends": [{"address": "198.18.1.40", "port": 53}]}
  ],
  "source_pools": [{"name": "snat", "addresses": ["198.18.1.101"]}]
}
"#,
    )
    .unwrap();
    let file = file.to_str().unwrap();
    assert_eq!(d.ok(&["apply", file, "--expected-version", "8"]), "applied: version 9\n");
    let stderr = d.fails(1, &["apply", file, "--expected-version", "8"]);
    assert!(stderr.starts_with("vipgatectl: FAILED_PRECONDITION: "), "{stderr}");
    // The same state again is no change: no new version.
    assert_eq!(d.ok(&["apply", file]), "applied: version 9\n");
    // Without --expected-version: read-then-write.
    let applied = std::fs::read_to_string(file).unwrap();
    std::fs::write(
        file,
        applied.replace(r#""address": "198.18.1.40", "port": 53"#, r#""address": "198.18.1.40", "port": 5353"#),
    )
    .unwrap();
    assert_eq!(d.ok(&["apply", file]), "applied: version 10\n");
    let list = d.ok(&["list"]);
    has_rows(
        &list,
        &[
            "UDP 198.18.100.3:53 nat 65537 dns (dynamic, on-removal rehash)",
            "-> 198.18.1.31:8080 FullNat 1 0 0 draining",
        ],
    );
    assert!(!list.contains("snat2"), "apply replaced the dynamic pools: {list}");

    // Refused by the server: exit 1, the code's name and the field path.
    let stderr = d.fails(
        1,
        &[
            "service",
            "create",
            "bad",
            "--vip",
            "198.18.100.9",
            "--port",
            "80",
            "--protocol",
            "tcp",
            "--backend",
            "198.18.1.11:80",
            "--backend",
            "198.18.1.12:80:70000",
        ],
    );
    assert!(stderr.starts_with("vipgatectl: INVALID_ARGUMENT: "), "{stderr}");
    assert!(stderr.contains("backends[1].weight") && stderr.contains("70000"), "{stderr}");
    let stderr = d.fails(1, &["backend", "remove", "nope", "198.18.1.11:80"]);
    assert!(stderr.starts_with("vipgatectl: NOT_FOUND: "), "{stderr}");
    let stderr = d.fails(1, &["--json", "pool", "delete", "snat"]);
    assert!(stderr.starts_with("vipgatectl: FAILED_PRECONDITION: "), "{stderr}");

    // Usage errors: exit 2, nothing sent.
    let stderr = d.fails(
        2,
        &[
            "service",
            "create",
            "x",
            "--vip",
            "198.18.100.9",
            "--port",
            "80",
            "--protocol",
            "tcp",
            "--backend",
            "198.18.1.11:80:x",
        ],
    );
    assert_eq!(stderr, "vipgatectl: --backend 198.18.1.11:80:x: weight \"x\" is not a number\n");
    let stderr = d.fails(2, &["drain", "api", "198.18.1.300:80"]);
    assert_eq!(stderr, "vipgatectl: ADDR:PORT 198.18.1.300:80: \"198.18.1.300\" is not an IPv4 address\n");
    let stderr = d.fails(2, &["pool", "create", "p", "--address", "198.18.1.1", "--ports", "2000-1000"]);
    assert!(stderr.contains("--ports 2000-1000: first port 2000 is above last port 1000"), "{stderr}");
    let stderr = d.fails(2, &["backend", "update", "api", "198.18.1.30:8080"]);
    assert!(stderr.contains("<--weight <W>|--state <STATE>>"), "{stderr}");
    d.fails(2, &["service", "create", "x", "--vip", "198.18.100.9", "--port", "80", "--protocol", "sctp"]);
    d.fails(2, &["frobnicate"]);
    assert!(d.ok(&["list"]).starts_with("vipgate state version 10 "), "usage errors changed nothing");

    // Watch, text and JSON: the state, then the changes made meanwhile.
    let (mut text_watch, text_rx) = d.watch(false);
    let (mut json_watch, json_rx) = d.watch(true);
    assert_eq!(lines(&text_rx, 1, "text watch")[0], "version 10: state with 3 services, 2 source pools");
    let first = lines(&json_rx, 1, "json watch").remove(0);
    println!("watch --json, first line:\n{first}");
    let first = json(&first);
    assert_eq!(first["version"], 10);
    assert_eq!(first["snapshot"]["services"].as_array().unwrap().len(), 3);
    assert_eq!(d.ok(&["pool", "create", "p3", "--address", "198.18.1.104"]), "applied: version 11\n");
    assert_eq!(d.ok(&["service", "delete", "dns"]), "applied: version 12\n");
    let changes = lines(&text_rx, 2, "text watch");
    println!("watch:\n{}", changes.join("\n"));
    assert_eq!(
        changes,
        ["version 11: CreateSourcePool; pools changed: p3", "version 12: DeleteService; services deleted: dns"]
    );
    let changes = lines(&json_rx, 2, "json watch");
    println!("watch --json:\n{}", changes.join("\n"));
    let changes: Vec<serde_json::Value> = changes.iter().map(|l| json(l)).collect();
    assert_eq!(changes[0]["version"], 11);
    assert_eq!(changes[0]["change"]["cause"], "CreateSourcePool");
    assert_eq!(changes[0]["change"]["pools_changed"], serde_json::json!(["p3"]));
    assert_eq!(changes[1]["version"], 12);
    assert_eq!(changes[1]["change"]["services_deleted"], serde_json::json!(["dns"]));
    assert!(text_watch.try_wait().unwrap().is_none(), "watch exited early");
    json_watch.kill().unwrap();
    json_watch.wait().unwrap();

    // Delete everything dynamic: only the static objects remain.
    assert_eq!(d.ok(&["service", "delete", "api"]), "applied: version 13\n");
    assert_eq!(d.ok(&["pool", "delete", "snat"]), "applied: version 14\n");
    assert_eq!(d.ok(&["pool", "delete", "p3"]), "applied: version 15\n");
    let state = json(&d.ok(&["--json", "list"]));
    assert_eq!(state["version"], 15);
    assert!(state["services"].as_array().unwrap().iter().all(|s| s["origin"] == "static"), "{state}");
    assert!(state["source_pools"].as_array().unwrap().iter().all(|p| p["origin"] == "static"), "{state}");
    d.stop();

    // The text watcher was still running: vipgated going away ends it with
    // exit 1 and a reason.
    let out = text_watch.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    println!("watch after vipgated stopped: {:?}: {stderr}", out.status);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("vipgatectl: "), "{stderr}");
}

/// The `--check*` options of `service create`: what vipgatectl refuses
/// itself (exit 2) and what vipgated refuses naming the field (exit 1).
/// Only refused checks here: an accepted one would start probing the
/// backends from this host, and these tests' backends exist nowhere.
#[test]
fn vipgatectl_service_health_check_options_are_checked() {
    let mut d = Daemon::start();
    let create = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "service",
            "create",
            "hc",
            "--vip",
            "198.18.100.9",
            "--port",
            "80",
            "--protocol",
            "tcp",
            "--backend",
            "198.18.1.40:8080",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    let run = |code: i32, extra: &[&str]| {
        let args = create(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        d.fails(code, &refs)
    };
    let e = run(2, &["--check-interval-ms", "1000"]);
    assert!(e.contains("--check"), "{e}");
    let e = run(2, &["--check", "icmp"]);
    assert!(e.contains("invalid value 'icmp'"), "{e}");
    let e = run(2, &["--check", "udp", "--check-payload-hex", "zz"]);
    assert!(e.contains("--check-payload-hex: \"zz\" is not hexadecimal bytes"), "{e}");
    let e = run(1, &["--check", "tcp", "--check-interval-ms", "1000", "--check-timeout-ms", "1000"]);
    assert!(
        e.contains(
            "INVALID_ARGUMENT: services[\"hc\"].health_check.timeout_ms: 1000 must be less than interval_ms (1000)"
        ),
        "{e}"
    );
    let e = run(1, &["--check", "http", "--check-expect-status", "600"]);
    assert!(e.contains("services[\"hc\"].health_check.expect_status: \"600\" in \"600\" is not an HTTP status"), "{e}");
    let e = run(1, &["--check", "udp"]);
    assert!(e.contains("services[\"hc\"].health_check.payload: a udp check needs a payload to send"), "{e}");
    // Nothing was created.
    assert!(!d.ok(&["list"]).contains(" hc\n"));
    d.stop();
}

/// Two owners through vipgatectl: `--owner` scopes apply, list and changes;
/// `state export` writes every owner's objects and `state import` puts
/// them back in one change, owners included.
#[test]
fn owners_and_state_export_and_import() {
    let d = Daemon::start();
    let dir = d.gw.dir().to_owned();
    d.ok(&[
        "service",
        "create",
        "by-hand",
        "--vip",
        "198.18.100.2",
        "--port",
        "80",
        "--protocol",
        "tcp",
        "--backend",
        "198.18.1.20:8080",
    ]);
    let k8s_file = dir.join("k8s.json");
    std::fs::write(
        &k8s_file,
        r#"{"services": [{"name": "k8s-a", "protocol": "tcp", "vip": "198.18.100.3", "port": 80,
             "backends": [{"address": "198.18.1.30", "port": 8080}]}],
            "source_pools": [{"name": "k8s-pool", "addresses": ["198.18.1.101"]}]}"#,
    )
    .unwrap();
    let k8s_path = k8s_file.to_str().unwrap();
    assert_eq!(
        d.ok(&["--owner", "k8s/prod", "apply", k8s_path]),
        "applied: version 2, owner k8s/prod at generation 1\n"
    );
    // Applied again at a stale generation: refused, naming it.
    let e = d.fails(1, &["--owner", "k8s/prod", "apply", k8s_path, "--expected-generation", "0"]);
    assert!(
        e.contains("FAILED_PRECONDITION: expected_generation 0 is not owner \"k8s/prod\"'s current generation 1"),
        "{e}"
    );
    // The person cannot change the controller's service by mistake.
    let e = d.fails(1, &["backend", "update", "k8s-a", "198.18.1.30:8080", "--weight", "3"]);
    assert!(
        e.contains("service \"k8s-a\" is owned by \"k8s/prod\"; a request as owner \"cli\" cannot change it"),
        "{e}"
    );
    assert_eq!(
        d.ok(&["--owner", "k8s/prod", "backend", "update", "k8s-a", "198.18.1.30:8080", "--weight", "3"]),
        "applied: version 3, owner k8s/prod at generation 2\n"
    );
    let mine: serde_json::Value = serde_json::from_str(&d.ok(&["--owner", "k8s/prod", "--json", "list"])).unwrap();
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["services"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(names(&mine), ["k8s-a"]);
    assert_eq!(mine["generations"], serde_json::json!({"k8s/prod": 2}));
    let all: serde_json::Value = serde_json::from_str(&d.ok(&["--json", "list"])).unwrap();
    assert_eq!(names(&all), ["by-hand", "k8s-a", "web"]);
    assert_eq!(all["generations"], serde_json::json!({"cli": 1, "k8s/prod": 2}));

    // The backup.
    let backup = dir.join("backup.json");
    let backup_path = backup.to_str().unwrap();
    assert_eq!(
        d.ok(&["state", "export", backup_path]),
        format!("exported: version 3, 2 services, 1 source pools to {backup_path}\n")
    );
    let e = d.fails(2, &["--owner", "k8s/prod", "state", "export", backup_path]);
    assert!(e.contains("state export and import work on every owner's objects; leave out --owner"), "{e}");
    // Everything dynamic is deleted, then imported back in one change.
    let empty = dir.join("empty.json");
    std::fs::write(&empty, "{}").unwrap();
    assert_eq!(d.ok(&["apply", empty.to_str().unwrap()]), "applied: version 4\n");
    assert_eq!(names(&serde_json::from_str(&d.ok(&["--json", "list"])).unwrap()), ["web"]);
    assert_eq!(d.ok(&["state", "import", backup_path]), "applied: version 5\n");
    let restored: serde_json::Value = serde_json::from_str(&d.ok(&["--json", "list"])).unwrap();
    let strip = |v: &serde_json::Value| {
        let mut v = v.clone();
        for s in v["services"].as_array_mut().unwrap() {
            s.as_object_mut().unwrap().remove("stats");
            for b in s["backends"].as_array_mut().unwrap() {
                b.as_object_mut().unwrap().remove("stats");
            }
        }
        (v["services"].clone(), v["source_pools"].clone())
    };
    assert_eq!(strip(&restored), strip(&all), "the same objects, with their owners");
    assert_eq!(restored["services"][1]["owner"], "k8s/prod");
    // Each owner's objects changed twice more (deleted, imported).
    assert_eq!(restored["generations"], serde_json::json!({"cli": 3, "k8s/prod": 4}));
}
