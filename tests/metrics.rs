//! vipgated's Prometheus endpoint, scraped with curl from a running daemon
//! on net_null ports: the metric families and their labels, values that
//! agree with `vipgatectl stats --json`, and a metrics port in use stopping
//! start-up before EAL.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vipgate::{NullGateway, require_root};

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A vipgated on net_null ports (a [`NullGateway`]) serving metrics on
/// `metrics` (`""`: off), spawned. With `traffic`, its ports receive null
/// frames (64 zero bytes, dropped as unsupported) as fast as the worker
/// polls, so that the counters move between reads.
fn start(tag: &str, metrics: &str, traffic: bool) -> NullGateway {
    let builder = NullGateway::builder(tag).metrics_listen(metrics);
    let mut gw = if traffic { builder.receiving() } else { builder }.build();
    gw.spawn();
    gw
}

fn wait_ready(gw: &mut NullGateway) {
    gw.wait_ready(|g| g.ctl(&["health"]).status.success());
}

fn stats(gw: &NullGateway) -> serde_json::Value {
    let out = gw.ctl(&["--json", "stats"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// SIGTERM and a clean exit with every mbuf back; the log.
fn stop(gw: &mut NullGateway) -> String {
    let status = gw.stop();
    let log = gw.log_text();
    assert!(status.success(), "exit {status:?}:\n{log}");
    assert!(log.contains("mbuf pool at shutdown: 0 in use (at start: 0)"), "{log}");
    log
}

/// One sample of the exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The exposition parsed: family types by name, and every sample.
#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// Parses the OpenMetrics / Prometheus text format (what vipgated
    /// writes: no escapes in label values beyond `\"` and `\\`, no
    /// timestamps).
    fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        let mut eof = false;
        for line in text.lines() {
            assert!(!eof, "text after # EOF: {line:?}");
            if line == "# EOF" {
                eof = true;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
                assert!(e.types.insert(name.to_owned(), kind.to_owned()).is_none(), "family {name} declared twice");
            } else if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line:?}"));
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line:?}"));
                let (name, labels) = match series.split_once('{') {
                    None => (series.to_owned(), BTreeMap::new()),
                    Some((name, rest)) => {
                        let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                        let mut labels = BTreeMap::new();
                        for pair in body.split("\",").filter(|p| !p.is_empty()) {
                            let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label: {line:?}"));
                            labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                        }
                        (name.to_owned(), labels)
                    }
                };
                e.samples.push(Sample { name, labels, value });
            }
        }
        assert!(eof, "no # EOF at the end");
        e
    }

    fn all(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The one sample of `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .all(name)
            .into_iter()
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .collect();
        assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
        found[0].value
    }
}

fn curl(url: &str) -> (String, String) {
    let out =
        Command::new("curl").args(["-sS", "--max-time", "5", "-D", "-", url]).output().expect("curl is installed");
    assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("headers and body");
    (head.to_owned(), body.to_owned())
}

/// `lo <= v <= hi` for the two `vipgatectl` reads around the scrape.
fn between(what: &str, v: f64, a: u64, b: u64) {
    let (lo, hi) = (a.min(b) as f64, a.max(b) as f64);
    assert!(lo <= v && v <= hi, "{what}: metric {v} not between the API's {a} and {b}");
}

#[test]
fn metrics_endpoint_serves_every_family_and_agrees_with_vipgatectl() {
    require_root();
    let port = free_port();
    let mut d = start("prom", &format!("127.0.0.1:{port}"), true);
    wait_ready(&mut d);
    // The worker's first packets, so that the counters move while we read.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats(&d)["total"]["rx_packets"].as_u64().unwrap() == 0 {
        assert!(Instant::now() < deadline, "no packets from port a within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = stats(&d);
    let (head, body) = curl(&format!("http://127.0.0.1:{port}/metrics"));
    let after = stats(&d);
    println!("{}", body.lines().take(40).collect::<Vec<_>>().join("\n"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        body.contains("\nnode_ipvs_connections_total 0\n") || body.contains("\nnode_ipvs_connections_total "),
        "{body}"
    );
    assert!(!body.contains("{}"), "a series written with empty braces");
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
    let m = Exposition::parse(&body);

    let counters = [
        "vipgate_worker_rx_packets",
        "vipgate_worker_rx_bytes",
        "vipgate_worker_tx_packets",
        "vipgate_worker_tx_bytes",
        "vipgate_worker_handoff_out_packets",
        "vipgate_worker_handoff_in_packets",
        "vipgate_worker_to_kernel_packets",
        "vipgate_worker_to_kernel_bytes",
        "vipgate_worker_to_kernel_control_packets",
        "vipgate_worker_from_kernel_packets",
        "vipgate_worker_from_kernel_bytes",
        "vipgate_worker_flows_created",
        "vipgate_worker_flows_evicted",
        "vipgate_worker_flows_rehashed",
        "vipgate_worker_flows_reset",
        "vipgate_worker_busy_polls",
        "vipgate_worker_busy_cycles",
        "vipgate_worker_dropped_packets",
        "vipgate_worker_fragments_forwarded_packets",
        "vipgate_worker_fragments_held_packets",
        "vipgate_worker_fragments_released_packets",
        "vipgate_worker_fragments_discarded_packets",
        "node_ipvs_connections",
        "node_ipvs_incoming_packets",
        "node_ipvs_outgoing_packets",
        "node_ipvs_incoming_bytes",
        "node_ipvs_outgoing_bytes",
        "vipgate_port_rx_packets",
        "vipgate_port_tx_packets",
        "vipgate_port_rx_bytes",
        "vipgate_port_tx_bytes",
        "vipgate_port_rx_missed_packets",
        "vipgate_port_rx_errors",
        "vipgate_port_tx_errors",
        "vipgate_port_rx_nombuf",
        "vipgate_backend_connections",
        "vipgate_backend_incoming_packets",
        "vipgate_backend_incoming_bytes",
        "vipgate_backend_outgoing_packets",
        "vipgate_backend_outgoing_bytes",
        "vipgate_service_connections",
        "vipgate_service_incoming_packets",
        "vipgate_service_incoming_bytes",
        "vipgate_service_outgoing_packets",
        "vipgate_service_outgoing_bytes",
    ];
    let gauges = [
        "vipgate_build_info",
        "vipgate_worker_flows_active",
        "vipgate_worker_busy_cycles_per_packet",
        "vipgate_worker_loop_age_seconds",
        "vipgate_mempool_size_mbufs",
        "vipgate_mempool_in_use_mbufs",
        "node_ipvs_backend_connections_active",
        "node_ipvs_backend_connections_inactive",
        "node_ipvs_backend_weight",
        "vipgate_service_flows_active",
        "vipgate_service_flows_inactive",
        "vipgate_port_link_up",
        "vipgate_port_link_speed_mbps",
        "vipgate_port_uplink",
        "vipgate_uplinks_down",
    ];
    for name in counters {
        assert_eq!(m.types.get(name).map(String::as_str), Some("counter"), "# TYPE of {name}");
        assert!(!m.all(&format!("{name}_total")).is_empty(), "no samples of {name}_total");
    }
    for name in gauges {
        assert_eq!(m.types.get(name).map(String::as_str), Some("gauge"), "# TYPE of {name}");
        assert!(!m.all(name).is_empty(), "no samples of {name}");
    }
    let mut families: Vec<&String> = m.types.keys().collect();
    families.sort();
    assert_eq!(families.len(), counters.len() + gauges.len(), "unexpected families: {families:?}");

    assert_eq!(m.get("vipgate_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);

    // The static service "web" and its one backend, with node_exporter's
    // ipvs labels.
    let ipvs = [
        ("local_address", "198.18.100.1"),
        ("local_port", "80"),
        ("local_mark", ""),
        ("proto", "TCP"),
        ("remote_address", "198.18.1.11"),
        ("remote_port", "8080"),
    ];
    assert_eq!(m.get("node_ipvs_backend_weight", &ipvs), 1.0);
    assert_eq!(m.get("node_ipvs_backend_connections_active", &ipvs), 0.0);
    assert_eq!(
        m.get("vipgate_backend_connections_total", &[("service", "web"), ("address", "198.18.1.11"), ("port", "8080")]),
        0.0
    );
    assert_eq!(m.get("vipgate_service_flows_inactive", &[("service", "web")]), 0.0);

    // net_null's links are up once started; no port is an uplink.
    for port in ["a", "b"] {
        assert_eq!(m.get("vipgate_port_link_up", &[("port", port)]), 1.0, "port {port}");
        assert_eq!(m.get("vipgate_port_uplink", &[("port", port)]), 0.0, "port {port}");
    }
    assert_eq!(m.get("vipgate_uplinks_down", &[]), 0.0);

    // Workers: one label value per lcore the API lists.
    let lcores: BTreeSet<String> =
        after["workers"].as_array().unwrap().iter().map(|w| w["lcore"].as_u64().unwrap().to_string()).collect();
    assert_eq!(lcores, BTreeSet::from(["1".to_owned()]));
    let labels_of = |name: &str, key: &str| -> BTreeSet<String> {
        m.all(name).iter().map(|s| s.labels.get(key).cloned().unwrap_or_default()).collect()
    };
    assert_eq!(labels_of("vipgate_worker_rx_packets_total", "worker"), lcores);
    assert_eq!(labels_of("vipgate_worker_flows_active", "worker"), lcores);
    assert_eq!(labels_of("vipgate_worker_loop_age_seconds", "worker"), lcores);
    for s in m.all("vipgate_worker_loop_age_seconds") {
        assert!(s.value < 1.0, "a running worker's loop is {} s old", s.value);
    }
    for (i, w) in after["workers"].as_array().unwrap().iter().enumerate() {
        let lcore = w["lcore"].as_u64().unwrap().to_string();
        let b = &before["workers"][i];
        let l = [("worker", lcore.as_str())];
        for (metric, field) in [
            ("vipgate_worker_rx_packets_total", "rx_packets"),
            ("vipgate_worker_rx_bytes_total", "rx_bytes"),
            ("vipgate_worker_tx_packets_total", "tx_packets"),
            ("vipgate_worker_tx_bytes_total", "tx_bytes"),
            ("vipgate_worker_handoff_out_packets_total", "handoff_out"),
            ("vipgate_worker_handoff_in_packets_total", "handoff_in"),
            ("vipgate_worker_to_kernel_packets_total", "to_kernel"),
            ("vipgate_worker_to_kernel_bytes_total", "to_kernel_bytes"),
            ("vipgate_worker_to_kernel_control_packets_total", "to_kernel_control"),
            ("vipgate_worker_from_kernel_packets_total", "from_kernel"),
            ("vipgate_worker_from_kernel_bytes_total", "from_kernel_bytes"),
            ("vipgate_worker_flows_created_total", "flows_created"),
            ("vipgate_worker_flows_evicted_total", "flows_evicted"),
            ("vipgate_worker_flows_rehashed_total", "flows_rehashed"),
            ("vipgate_worker_flows_reset_total", "flows_reset"),
            ("vipgate_worker_busy_polls_total", "busy_polls"),
            ("vipgate_worker_busy_cycles_total", "busy_cycles"),
            ("vipgate_worker_fragments_forwarded_packets_total", "fragments_forwarded"),
            ("vipgate_worker_fragments_held_packets_total", "fragments_held"),
            ("vipgate_worker_fragments_released_packets_total", "fragments_released"),
            ("vipgate_worker_fragments_discarded_packets_total", "fragments_discarded"),
            ("vipgate_worker_flows_active", "flows_active"),
        ] {
            between(metric, m.get(metric, &l), b[field].as_u64().unwrap(), w[field].as_u64().unwrap());
        }
        // Every drop reason the API lists, and no other.
        let reasons: BTreeSet<String> = w["drops"].as_object().unwrap().keys().cloned().collect();
        let listed: BTreeSet<String> = m
            .all("vipgate_worker_dropped_packets_total")
            .iter()
            .filter(|s| s.labels["worker"] == lcore)
            .map(|s| s.labels["reason"].clone())
            .collect();
        assert_eq!(listed, reasons);
        assert_eq!(reasons.len(), vipgate_dataplane::counters::DropReason::COUNT);
        for reason in &reasons {
            between(
                reason,
                m.get("vipgate_worker_dropped_packets_total", &[("worker", &lcore), ("reason", reason)]),
                b["drops"][reason].as_u64().unwrap(),
                w["drops"][reason].as_u64().unwrap(),
            );
        }
    }
    // The gauge is the ratio of the two counters in the same scrape.
    let cycles = m.get("vipgate_worker_busy_cycles_total", &[("worker", "1")]);
    let packets = m.get("vipgate_worker_rx_packets_total", &[("worker", "1")]);
    assert!(packets > 0.0, "no traffic on port a");
    let per_packet = m.get("vipgate_worker_busy_cycles_per_packet", &[("worker", "1")]);
    assert!((per_packet - cycles / packets).abs() < 1e-6 * per_packet.max(1.0), "{per_packet} != {cycles} / {packets}");
    between(
        "node_ipvs_incoming_packets_total",
        m.get("node_ipvs_incoming_packets_total", &[]),
        before["total"]["rx_packets"].as_u64().unwrap(),
        after["total"]["rx_packets"].as_u64().unwrap(),
    );
    between(
        "node_ipvs_connections_total",
        m.get("node_ipvs_connections_total", &[]),
        before["total"]["flows_created"].as_u64().unwrap(),
        after["total"]["flows_created"].as_u64().unwrap(),
    );

    // Ports, by name.
    let names: BTreeSet<String> =
        after["ports"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(names, BTreeSet::from(["a".to_owned(), "b".to_owned()]));
    assert_eq!(labels_of("vipgate_port_rx_packets_total", "port"), names);
    for (i, p) in after["ports"].as_array().unwrap().iter().enumerate() {
        let name = p["name"].as_str().unwrap();
        let b = &before["ports"][i];
        for (metric, field) in [
            ("vipgate_port_rx_packets_total", "ipackets"),
            ("vipgate_port_tx_packets_total", "opackets"),
            ("vipgate_port_rx_bytes_total", "ibytes"),
            ("vipgate_port_tx_bytes_total", "obytes"),
            ("vipgate_port_rx_missed_packets_total", "imissed"),
            ("vipgate_port_rx_errors_total", "ierrors"),
            ("vipgate_port_tx_errors_total", "oerrors"),
            ("vipgate_port_rx_nombuf_total", "rx_nombuf"),
        ] {
            between(metric, m.get(metric, &[("port", name)]), b[field].as_u64().unwrap(), p[field].as_u64().unwrap());
        }
    }

    // The pool cannot change size; its occupancy moves with the traffic.
    let pool = after["mempool"]["name"].as_str().unwrap();
    assert_eq!(
        m.get("vipgate_mempool_size_mbufs", &[("pool", pool)]),
        after["mempool"]["size"].as_u64().unwrap() as f64
    );
    assert_eq!(m.get("vipgate_mempool_size_mbufs", &[("pool", pool)]), 4095.0);
    let in_use = m.get("vipgate_mempool_in_use_mbufs", &[("pool", pool)]);
    assert!((0.0..=4095.0).contains(&in_use), "{in_use}");
    // An instant between two bursts may find every mbuf back in the pool
    // (in a worker's cache counts as free), so one scrape can read 0; under
    // traffic, some scrape catches a burst in flight.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut scrapes = 1;
    let mut seen = in_use;
    while seen == 0.0 {
        assert!(Instant::now() < deadline, "{scrapes} scrapes under traffic all read 0 mbufs in use");
        let (_, body) = curl(&format!("http://127.0.0.1:{port}/metrics"));
        seen = Exposition::parse(&body).get("vipgate_mempool_in_use_mbufs", &[("pool", pool)]);
        assert!((0.0..=4095.0).contains(&seen), "{seen}");
        scrapes += 1;
    }

    // Other paths.
    let (head, _) = curl(&format!("http://127.0.0.1:{port}/"));
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    let log = stop(&mut d);
    assert!(log.contains(&format!("metrics listening on http://127.0.0.1:{port}/metrics")), "{log}");
}

#[test]
fn a_metrics_port_in_use_stops_start_up_before_eal() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut d = start("promuse", &format!("127.0.0.1:{port}"), false);
    let status = d.wait();
    let log = d.log_text();
    println!("{log}");
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains(&format!("cannot listen for metrics on 127.0.0.1:{port}: Address already in use")), "{log}");
    assert!(!log.contains("initialising EAL"), "EAL started: {log}");
    assert!(!Path::new("/var/run/dpdk").join(d.file_prefix()).exists(), "EAL created its runtime directory");
    assert!(!d.socket().exists(), "the API socket was left behind");
}

#[test]
fn metrics_can_be_turned_off() {
    require_root();
    let mut d = start("promoff", "", false);
    wait_ready(&mut d);
    let log = stop(&mut d);
    assert!(log.contains("metrics endpoint off"), "{log}");
    assert!(!log.contains("metrics listening"), "{log}");
}

#[test]
fn sighup_that_moves_the_metrics_endpoint_is_refused_naming_the_field() {
    require_root();
    let port = free_port();
    let mut d = start("promhup", &format!("127.0.0.1:{port}"), false);
    wait_ready(&mut d);
    let path = d.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let other = free_port();
    std::fs::write(&path, text.replace(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{other}"))).unwrap();
    d.signal(libc::SIGHUP);
    let want = format!(
        "reload refused: metrics.listen changed from \"127.0.0.1:{port}\" to \"127.0.0.1:{other}\"; restart vipgated to change it"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.log_text().contains(&want) {
        assert!(Instant::now() < deadline, "wanted {want:?} in:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Still served where it was.
    let (head, _) = curl(&format!("http://127.0.0.1:{port}/metrics"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let log = stop(&mut d);
    println!("{}", log.lines().filter(|l| l.contains("reload")).collect::<Vec<_>>().join("\n"));
}
