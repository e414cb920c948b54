//! vipgate-k8s end to end: a real kube-apiserver and etcd on loopback
//! (scripts/k8s-testenv.sh), kubectl doing what a user does, vipgated on
//! net_tap with its backends in a namespace playing the nodes (each
//! address a Node's InternalIP, serving HTTP on the nodePort 8080), and
//! curl from a client namespace.
//!
//! Needs root, hugepages or --no-huge (as the other rig tests), and the
//! apiserver's binaries (scripts/k8s-build.sh, which scripts/test.sh runs).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vipgate::k8s::{K8sController, K8sEnv};
use vipgate::{Rig, RigOptions, backend_addr, require_root};

/// The VipPool's addresses: beside the rig's static VIP 198.18.100.1, in
/// the client's route to the gateway.
const POOL: &str = "198.18.100.64/28";

struct Cluster {
    ctl: K8sController,
    env: K8sEnv,
    rig: Rig,
}

impl Cluster {
    /// A rig with `nodes` backends beside the one its static services use
    /// (a backend serves one VIP in nat mode), the apiserver, the CRDs, a
    /// pool, the rig's vipgated as a VipGateway, a Node for each backend
    /// but the first, and the controller.
    fn start(nodes: usize) -> Cluster {
        Self::start_with(nodes, RigOptions::default())
    }

    /// The same with the exception path on (vipgated in the namespace
    /// `${prefix}gw`, with kernel interfaces, so that its health probes
    /// reach the nodes) and route announcement on the interface
    /// `vipgate0` there (`ifb`: this kernel has no dummy driver), with no
    /// hold-down.
    fn start_announcing(nodes: usize) -> Cluster {
        Self::start_with(
            nodes,
            RigOptions {
                exception: true,
                extra_config: "\n[announce]\nenabled = true\nkind = \"ifb\"\nhold_down = 0\n".to_owned(),
                ..Default::default()
            },
        )
    }

    fn start_with(nodes: usize, opts: RigOptions) -> Cluster {
        require_root();
        let rig = Rig::start(RigOptions { backends: nodes + 1, configured_backends: Some(1), ..opts });
        let env = K8sEnv::start();
        env.install_crds();
        env.apply(&format!(
            "apiVersion: vipgate.io/v1alpha1\nkind: VipPool\nmetadata:\n  name: default\nspec:\n  addresses: [\"{POOL}\"]\n---\n\
             apiVersion: vipgate.io/v1alpha1\nkind: VipGateway\nmetadata:\n  name: gw1\nspec:\n  endpoint: unix://{}\n",
            rig.socket.display()
        ));
        for i in 1..=nodes {
            env.node(&format!("node-{i}"), &backend_addr(i + 1), true);
        }
        let ctl = K8sController::start(&env, rig.dir(), "test", &[]);
        Cluster { ctl, env, rig }
    }

    fn log(&self) -> String {
        self.ctl.log_text()
    }

    /// Stops the controller and the apiserver, then the rig, and checks
    /// that the rig left nothing behind.
    fn teardown(self) {
        let Cluster { mut ctl, env, rig } = self;
        ctl.assert_running();
        drop(ctl);
        drop(env);
        let left = rig.teardown();
        assert!(left.namespaces.is_empty() && left.processes.is_empty(), "left behind: {left:?}");
    }

    /// `kubectl apply` of a LoadBalancer Service `name` on port 80 with
    /// nodePort 8080 and `extra` spec lines (indented 2).
    fn service(&self, name: &str, annotations: &[(&str, &str)], extra: &str) {
        self.service_ports(name, annotations, extra, &[("http", "TCP", 80, 8080)]);
    }

    /// The same with `ports` as (name, protocol, port, nodePort).
    fn service_ports(&self, name: &str, annotations: &[(&str, &str)], extra: &str, ports: &[(&str, &str, u16, u16)]) {
        let ann: String = annotations.iter().map(|(k, v)| format!("    {k}: \"{v}\"\n")).collect();
        let ann = if ann.is_empty() { String::new() } else { format!("  annotations:\n{ann}") };
        let ports: String = ports
            .iter()
            .map(|(n, proto, port, node)| match node {
                // 0: the apiserver picks the nodePort.
                0 => format!("  - name: {n}\n    port: {port}\n    targetPort: 8080\n    protocol: {proto}\n"),
                node => format!(
                    "  - name: {n}\n    port: {port}\n    targetPort: {node}\n    nodePort: {node}\n    protocol: {proto}\n"
                ),
            })
            .collect();
        self.env.apply(&format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n{ann}spec:\n  type: LoadBalancer\n  \
             loadBalancerClass: vipgate.io/gateway\n  selector: {{ app: {name} }}\n  ports:\n{ports}{extra}"
        ));
    }

    /// The names of the gateway's services.
    fn gateway_names(&self) -> Vec<String> {
        let state = self.gateway_services();
        state["services"].as_array().unwrap().iter().filter_map(|s| s["name"].as_str().map(str::to_owned)).collect()
    }

    /// vipgated's state version.
    fn gateway_version(&self) -> u64 {
        self.gateway_services()["version"].as_u64().expect("version in vipgatectl --json list")
    }

    /// Waits for VipGateway gw1's Synced condition to be True.
    fn wait_gateway_synced(&self) {
        self.env.wait_for(Duration::from_secs(30), "VipGateway gw1 Synced", &|| self.log(), || {
            let out = self.env.kubectl(&["get", "vipgateway", "gw1", "-o", "jsonpath={.status.conditions[0].status}"]);
            (String::from_utf8_lossy(&out.stdout) == "True").then_some(())
        });
    }

    /// A UDP datagram to `ip`:`port` from the client namespace: the reply.
    fn udp(&self, ip: &str, port: u16) -> Result<String, String> {
        let out = self.rig.client(&["sh", "-c", &format!("echo ping | socat -T 3 - UDP:{ip}:{port}")]);
        let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && !body.is_empty() {
            Ok(body)
        } else {
            Err(format!("{} {}", out.status, String::from_utf8_lossy(&out.stderr)))
        }
    }

    fn wait_ip(&self, name: &str, limit: Duration) -> String {
        self.env.wait_for(limit, &format!("Service {name} gets an EXTERNAL-IP"), &|| self.log(), || {
            self.env.external_ip(name)
        })
    }

    /// `GET /whoami` on `ip`:80 from the client namespace: the backend that
    /// answered.
    fn whoami(&self, ip: &str) -> Result<String, String> {
        let out = self.rig.client(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-H",
            "Connection: close",
            &format!("http://{ip}/whoami"),
        ]);
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!("{} {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
        }
        body.lines()
            .find_map(|l| l.strip_prefix("backend "))
            .map(str::to_owned)
            .ok_or_else(|| format!("no backend line in {body:?}"))
    }

    fn gateway_services(&self) -> serde_json::Value {
        let out = self.rig.ctl(&["--json", "list"]);
        assert!(out.status.success(), "vipgatectl list: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("state json")
    }
}

#[test]
fn a_loadbalancer_service_gets_an_address_from_the_pool_and_is_served_by_every_node() {
    let c = Cluster::start(3);
    // The controller is up once the gateway reports synced.
    c.wait_gateway_synced();
    let applied = Instant::now();
    c.service("web", &[], "");
    let ip = c.wait_ip("web", Duration::from_secs(2));
    println!("EXTERNAL-IP {ip} {:?} after kubectl apply", applied.elapsed());
    println!("{}", c.env.kubectl_ok(&["get", "svc", "web"]));
    assert!(
        ip.starts_with("198.18.100.") && (64..80).contains(&ip.rsplit('.').next().unwrap().parse::<u32>().unwrap()),
        "{ip} is not from {POOL}"
    );
    let mut by_backend: BTreeMap<String, u32> = BTreeMap::new();
    let mut failures = Vec::new();
    // The gateway may apply the push a moment after the status is written.
    c.env.wait_for(Duration::from_secs(2), "the first request through the VIP", &|| c.log(), || c.whoami(&ip).ok());
    for _ in 0..300 {
        match c.whoami(&ip) {
            Ok(b) => *by_backend.entry(b).or_default() += 1,
            Err(e) => failures.push(e),
        }
    }
    println!("300 requests through {ip}: {by_backend:?}, {} failed", failures.len());
    assert!(failures.is_empty(), "{} of 300 requests failed: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    assert_eq!(by_backend.len(), 3, "every node serves: {by_backend:?}");
    let described = c.env.kubectl_ok(&["describe", "svc", "web"]);
    println!("{described}");
    assert!(described.contains("IPAllocated"), "kubectl describe shows the IPAllocated Event:\n{described}");
    let state = c.gateway_services();
    let names: Vec<&str> = state["services"].as_array().unwrap().iter().filter_map(|s| s["name"].as_str()).collect();
    assert!(names.contains(&"test.default.web.http"), "the gateway has the service: {names:?}");
    c.teardown();
}

#[test]
fn an_address_goes_to_one_service_unless_they_share_a_key_and_is_freed_when_its_service_goes() {
    let c = Cluster::start(2);
    c.wait_gateway_synced();
    let wanted = "198.18.100.70";
    c.service("first", &[("vipgate.io/loadBalancerIPs", wanted)], "");
    assert_eq!(c.wait_ip("first", Duration::from_secs(2)), wanted);
    // The same address without a sharing key: refused, with an Event.
    c.service_ports("second", &[("metallb.universe.tf/loadBalancerIPs", wanted)], "", &[("http", "TCP", 80, 0)]);
    let events = c.env.wait_for(Duration::from_secs(5), "AllocationFailed on Service second", &|| c.log(), || {
        let e = c.env.events("Service", "second");
        e.contains("AllocationFailed").then_some(e)
    });
    println!("Events of Service second:\n{events}");
    assert!(
        events.contains(&format!("{wanted} is already used by Service default/first without a sharing key")),
        "{events}"
    );
    assert_eq!(c.env.external_ip("second"), None, "the second Service has no address");
    println!("{}", c.env.kubectl_ok(&["get", "svc"]));

    // Two Services with one sharing key and distinct ports share one
    // address, and both are served.
    let shared = [("vipgate.io/allow-shared-ip", "team-a")];
    c.service_ports("web", &shared, "", &[("http", "TCP", 80, 8081)]);
    c.service_ports("dns", &shared, "", &[("dns", "UDP", 53, 5353)]);
    let web_ip = c.wait_ip("web", Duration::from_secs(2));
    let dns_ip = c.wait_ip("dns", Duration::from_secs(2));
    assert_eq!(web_ip, dns_ip, "the sharing Services have one address");
    let reply = c.env.wait_for(Duration::from_secs(3), "a UDP reply through the shared address", &|| c.log(), || {
        c.udp(&dns_ip, 53).ok()
    });
    println!("UDP through {dns_ip}:53: {reply:?}");
    assert!(reply.starts_with("backend-") && reply.ends_with("ping"), "{reply}");
    let names = c.gateway_names();
    assert!(
        names.contains(&"test.default.web.http".to_owned()) && names.contains(&"test.default.dns.dns".to_owned()),
        "{names:?}"
    );

    // The first goes: within 2 s its service leaves the gateway, and the
    // address is free, so the Service waiting for it gets it.
    c.env.kubectl_ok(&["delete", "svc", "first", "--wait=false"]);
    let gone = Instant::now();
    c.env.wait_for(Duration::from_secs(2), "first's service leaves the gateway", &|| c.log(), || {
        (!c.gateway_names().contains(&"test.default.first.http".to_owned())).then_some(())
    });
    c.env.wait_for(Duration::from_secs(2), "Service first is deleted (finalizer released)", &|| c.log(), || {
        (!c.env.kubectl(&["get", "svc", "first"]).status.success()).then_some(())
    });
    println!("first deleted and off the gateway in {:?}", gone.elapsed());
    assert_eq!(
        c.wait_ip("second", Duration::from_secs(3)),
        wanted,
        "the freed address goes to the Service that asked for it"
    );
    let pool = c.env.kubectl_ok(&["get", "vippool", "default"]);
    println!("{pool}");
    c.teardown();
}

#[test]
fn a_controller_restart_moves_no_address_and_changes_nothing_on_the_gateway() {
    let mut c = Cluster::start(2);
    c.wait_gateway_synced();
    for name in ["one", "two", "three"] {
        c.service_ports(name, &[], "", &[("http", "TCP", 80, 0)]);
    }
    let before: Vec<String> = ["one", "two", "three"].iter().map(|n| c.wait_ip(n, Duration::from_secs(3))).collect();
    // Let the pushes settle, then note the gateway's version.
    std::thread::sleep(Duration::from_secs(1));
    let version = c.gateway_version();
    c.ctl.kill();
    // While it is down, a new Service arrives: after the restart it must
    // get an address none of the others had.
    c.service_ports("four", &[], "", &[("http", "TCP", 80, 0)]);
    c.ctl.spawn();
    let four = c.wait_ip("four", Duration::from_secs(15));
    let after: Vec<String> = ["one", "two", "three"].iter().map(|n| c.env.external_ip(n).unwrap_or_default()).collect();
    println!("addresses before {before:?}, after {after:?}, the new Service's {four}");
    assert_eq!(before, after, "no address moved");
    assert!(!before.contains(&four), "{four} was already given");
    // The restarted controller pushes the same state plus the new
    // Service: one new version, not one per Service or a replace.
    std::thread::sleep(Duration::from_secs(1));
    let v = c.gateway_version();
    println!("gateway version {version} before the restart, {v} after it and the new Service");
    assert_eq!(v, version + 1, "the restart itself changed nothing on the gateway");
    c.teardown();
}

#[test]
fn a_terminating_endpoint_drains_its_backend_and_no_request_fails() {
    let c = Cluster::start(3);
    c.wait_gateway_synced();
    c.service("pods", &[("vipgate.io/backends", "pods")], "");
    let slice = |terminating: bool| {
        let eps: String = (2..=4)
            .map(|i| {
                let t = i == 3 && terminating;
                format!(
                    "- addresses: [\"{}\"]\n  conditions: {{ ready: {}, serving: true, terminating: {} }}\n",
                    backend_addr(i),
                    !t,
                    t
                )
            })
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: pods-1\n  namespace: default\n  labels:\n    \
             kubernetes.io/service-name: pods\naddressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n{eps}"
        )
    };
    c.env.apply(&slice(false));
    let ip = c.wait_ip("pods", Duration::from_secs(2));
    let states = |c: &Cluster| -> BTreeMap<String, String> {
        let state = c.gateway_services();
        let svc = state["services"].as_array().unwrap().iter().find(|s| s["name"] == "test.default.pods.http").cloned();
        svc.map(|s| {
            s["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| (b["address"].as_str().unwrap_or("").to_owned(), b["state"].as_str().unwrap_or("").to_owned()))
                .collect()
        })
        .unwrap_or_default()
    };
    c.env.wait_for(Duration::from_secs(2), "three enabled pod backends", &|| c.log(), || {
        (states(&c).len() == 3).then_some(())
    });
    c.env.wait_for(Duration::from_secs(2), "the first request", &|| c.log(), || c.whoami(&ip).ok());
    // Requests run on while the endpoint turns terminating.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ns, url, flag) = (format!("{}client", c.rig.prefix), format!("http://{ip}/whoami"), stop.clone());
    let load = std::thread::spawn(move || {
        let (mut ok, mut failed) = (0u32, Vec::new());
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "curl", "-sS", "--max-time", "5", "-H", "Connection: close", &url])
                .output()
                .expect("curl");
            if out.status.success() { ok += 1 } else { failed.push(String::from_utf8_lossy(&out.stderr).into_owned()) }
        }
        (ok, failed)
    });
    std::thread::sleep(Duration::from_millis(500));
    let changed = Instant::now();
    c.env.apply(&slice(true));
    let drained = backend_addr(3);
    c.env.wait_for(Duration::from_secs(1), "the terminating endpoint's backend drains", &|| c.log(), || {
        (states(&c).get(&drained).map(String::as_str) == Some("draining")).then_some(())
    });
    println!("{drained} draining {:?} after the EndpointSlice update", changed.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    println!("{ok} requests during the change, {} failed", failed.len());
    assert!(ok > 10, "requests ran: {ok}");
    assert!(failed.is_empty(), "no request fails: {failed:?}");
    // New connections avoid the draining backend.
    let mut seen = BTreeMap::<String, u32>::new();
    for _ in 0..60 {
        *seen.entry(c.whoami(&ip).expect("request")).or_default() += 1;
    }
    assert!(!seen.contains_key("backend-3"), "the draining backend takes no new connections: {seen:?}");
    c.teardown();
}

#[test]
fn a_gateway_that_restarts_without_its_state_gets_it_again_within_5_s() {
    let mut c = Cluster::start(2);
    c.wait_gateway_synced();
    c.service("web", &[], "");
    let ip = c.wait_ip("web", Duration::from_secs(2));
    c.env.wait_for(Duration::from_secs(2), "the first request", &|| c.log(), || c.whoami(&ip).ok());
    // A restart with its state: it serves at once, nothing to push.
    c.rig.restart_gateway(false);
    let restarted = Instant::now();
    c.env.wait_for(Duration::from_secs(5), "served again after a restart", &|| c.log(), || c.whoami(&ip).ok());
    println!("served again {:?} after a restart with its state", restarted.elapsed());
    // A restart that lost the state (a new machine): the controller sees
    // the connection go and pushes the whole state again.
    c.rig.restart_gateway(true);
    let restarted = Instant::now();
    c.env.wait_for(Duration::from_secs(5), "served again after a restart without state", &|| c.log(), || {
        c.whoami(&ip).ok()
    });
    println!("served again {:?} after a restart without its state", restarted.elapsed());
    let lost = c.log().matches("connection to the gateway lost: pushing again").count();
    assert!(lost >= 2, "the controller saw both restarts and pushed again ({lost})");
    // Someone edits the controller's objects behind its back: it puts
    // them back.
    let out = c.rig.ctl(&["--owner", "k8s/test", "service", "delete", "test.default.web.http"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let edited = Instant::now();
    c.env.wait_for(Duration::from_secs(5), "the deleted service put back", &|| c.log(), || {
        c.gateway_names().contains(&"test.default.web.http".to_owned()).then_some(())
    });
    println!("put back {:?} after someone deleted it", edited.elapsed());
    c.teardown();
}

#[test]
fn bad_input_gets_an_event_and_disturbs_nothing_else() {
    let c = Cluster::start(2);
    c.wait_gateway_synced();
    c.service("good", &[], "");
    let good = c.wait_ip("good", Duration::from_secs(2));
    let wait_event = |kind: &str, name: &str, reason: &str| {
        c.env.wait_for(Duration::from_secs(5), &format!("{reason} Event on {kind} {name}"), &|| c.log(), || {
            let e = c.env.events(kind, name);
            e.contains(reason).then_some(e)
        })
    };
    // An address outside every pool.
    c.service_ports("outside", &[("vipgate.io/loadBalancerIPs", "198.18.99.1")], "", &[("http", "TCP", 80, 0)]);
    let e = wait_event("Service", "outside", "AllocationFailed");
    println!("outside: {e}");
    assert!(e.contains("198.18.99.1 is in no VipPool this Service may use"), "{e}");
    // A malformed annotation.
    c.service_ports("malformed", &[("vipgate.io/loadBalancerIPs", "198.18.100.300")], "", &[("http", "TCP", 80, 0)]);
    let e = wait_event("Service", "malformed", "InvalidService");
    println!("malformed: {e}");
    assert!(e.contains("annotation vipgate.io/loadBalancerIPs: \"198.18.100.300\" is not an IPv4 address"), "{e}");
    // An IPv6 address asked for: vipgate serves IPv4 only, and says so.
    c.service_ports("six", &[("vipgate.io/loadBalancerIPs", "2001:db8::1")], "", &[("http", "TCP", 80, 0)]);
    let e = wait_event("Service", "six", "InvalidService");
    println!("six: {e}");
    assert!(
        e.contains("annotation vipgate.io/loadBalancerIPs: lists only IPv6 addresses; vipgate serves IPv4 only"),
        "{e}"
    );
    assert_eq!(c.env.external_ip("six"), None, "no address for an IPv6-only request");
    // A pool overlapping the first.
    c.env.apply("apiVersion: vipgate.io/v1alpha1\nkind: VipPool\nmetadata:\n  name: overlap\nspec:\n  addresses: [\"198.18.100.72-198.18.100.90\"]\n");
    let e = wait_event("VipPool", "overlap", "InvalidPool");
    println!("overlap: {e}");
    assert!(e.contains("addresses: overlap VipPool default's, which is older"), "{e}");
    let status = c.env.kubectl_ok(&[
        "get",
        "vippool",
        "overlap",
        "-o",
        "jsonpath={.status.conditions[0].reason}: {.status.conditions[0].message}",
    ]);
    assert_eq!(status, "Invalid: addresses: overlap VipPool default's, which is older");
    // A gateway whose endpoint is down.
    c.env.apply("apiVersion: vipgate.io/v1alpha1\nkind: VipGateway\nmetadata:\n  name: down\nspec:\n  endpoint: unix:///nonexistent/vipgated.sock\n");
    let e = wait_event("VipGateway", "down", "PushFailed");
    println!("down: {e}");
    assert!(e.contains("/nonexistent/vipgated.sock"), "{e}");
    let status = c.env.kubectl_ok(&[
        "get",
        "vipgateway",
        "down",
        "-o",
        "jsonpath={.status.conditions[0].status} {.status.conditions[0].reason}",
    ]);
    assert_eq!(status, "False PushFailed");
    // Nothing else was disturbed: the good Service keeps its address and
    // is served, and the working gateway stays synced.
    assert_eq!(c.env.external_ip("good").as_deref(), Some(good.as_str()));
    c.whoami(&good).expect("the good Service is still served");
    let gw1 = c.env.kubectl_ok(&["get", "vipgateway", "gw1", "-o", "jsonpath={.status.conditions[0].status}"]);
    assert_eq!(gw1, "True");
    println!("{}", c.env.kubectl_ok(&["get", "svc,vippool,vipgateway"]));
    c.env.kubectl_ok(&["delete", "vipgateway", "down"]);
    c.teardown();
}

#[test]
fn both_gateways_of_an_ha_pair_receive_identical_state() {
    require_root();
    let env = K8sEnv::start();
    env.install_crds();
    let pair = vipgate::ha::HaPair::start(vipgate::Mode::Nat);
    let mut yaml = format!(
        "apiVersion: vipgate.io/v1alpha1\nkind: VipPool\nmetadata:\n  name: default\nspec:\n  addresses: [\"{POOL}\"]\n"
    );
    for g in &pair.gateways {
        yaml.push_str(&format!(
            "---\napiVersion: vipgate.io/v1alpha1\nkind: VipGateway\nmetadata:\n  name: gw-{}\nspec:\n  endpoint: unix://{}\n",
            g.name,
            g.vipgated.socket().display()
        ));
    }
    env.apply(&yaml);
    for i in 1..=3 {
        env.node(&format!("node-{i}"), &format!("198.18.1.{}", 200 + i), true);
    }
    let cluster = format!("ha{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("vipgate-k8s-{cluster}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ctl = K8sController::start(&env, &dir, &cluster, &[]);
    let owner = format!("k8s/{cluster}");
    for (name, port) in [("web", 80), ("api", 443), ("dns", 53)] {
        let proto = if name == "dns" { "UDP" } else { "TCP" };
        env.apply(&format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: LoadBalancer\n  \
             loadBalancerClass: vipgate.io/gateway\n  ports:\n  - name: p\n    port: {port}\n    protocol: {proto}\n"
        ));
    }
    let log = || std::fs::read_to_string(&ctl.log).unwrap_or_default();
    let owned = |g: usize| {
        let v = pair.ctl_json(g, &["--owner", &owner, "list"]);
        let mut services: Vec<serde_json::Value> = v["services"].as_array().cloned().unwrap_or_default();
        for s in &mut services {
            // Traffic counters differ between gateways; the state does not.
            s.as_object_mut().unwrap().remove("stats");
            for b in s["backends"].as_array_mut().into_iter().flatten() {
                b.as_object_mut().unwrap().remove("stats");
            }
        }
        services
    };
    let (a, b) = env.wait_for(Duration::from_secs(10), "both gateways list the three Services' services", &log, || {
        let (a, b) = (owned(0), owned(1));
        (a.len() == 3 && a == b).then_some((a, b))
    });
    println!("gateway a: {}", serde_json::to_string(&a).unwrap());
    assert_eq!(a, b, "identical state on both gateways");
    for s in &a {
        assert_eq!(s["backends"].as_array().map(Vec::len), Some(3), "every node is a backend: {s}");
    }
    drop(ctl);
    drop(env);
    pair.teardown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_charts_manifests_are_accepted_by_the_apiserver() {
    let env = K8sEnv::start();
    env.kubectl_ok(&["create", "namespace", "vipgate-system"]);
    let manifests = vipgate::repo_root().join("controlplane/k8s/deploy/vipgate-k8s.yaml");
    // A server-side dry run: the CRDs, RBAC, ServiceAccount and
    // Deployment are validated and admitted, nothing is stored.
    let out = env.kubectl_ok(&["apply", "--dry-run=server", "-f", manifests.to_str().unwrap()]);
    println!("{out}");
    for kind in [
        "customresourcedefinition",
        "serviceaccount",
        "clusterrole",
        "clusterrolebinding",
        "role",
        "rolebinding",
        "deployment",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(kind) && l.ends_with("created (server dry run)")),
            "the apiserver admits a {kind}:\n{out}"
        );
    }
}

/// Runs a command; panics with its output if it fails.
fn run(cmd: &[&str]) {
    let out = std::process::Command::new(cmd[0]).args(&cmd[1..]).output().expect(cmd[0]);
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate it
/// signed, and a second CA that signed nothing, with openssl, in `dir`.
fn make_pki(dir: &std::path::Path) {
    let p = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    for ca in ["ca", "other-ca"] {
        let mut cmd = vec!["openssl", "req", "-x509", "-days", "2", "-subj"];
        let subj = format!("/CN=vipgate test {ca}");
        let (key, pem) = (p(&format!("{ca}.key")), p(&format!("{ca}.pem")));
        cmd.push(&subj);
        cmd.extend(ec);
        cmd.extend(["-keyout", &key, "-out", &pem]);
        run(&cmd);
    }
    for (leaf, ext) in [("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")] {
        let (key, csr, pem) = (p(&format!("{leaf}.key")), p(&format!("{leaf}.csr")), p(&format!("{leaf}.pem")));
        let subj = format!("/CN=vipgate test {leaf}");
        let mut cmd = vec!["openssl", "req", "-subj", &subj, "-addext", ext];
        cmd.extend(ec);
        cmd.extend(["-keyout", &key, "-out", &csr]);
        run(&cmd);
        let (ca, ca_key) = (p("ca.pem"), p("ca.key"));
        run(&[
            "openssl",
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-copy_extensions",
            "copy",
            "-out",
            &pem,
        ]);
    }
}

#[test]
fn a_gateway_over_mutual_tls_is_synced_and_one_with_the_wrong_ca_gets_an_event() {
    require_root();
    let env = K8sEnv::start();
    let dir = std::env::temp_dir().join(format!("vipgate-k8s-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    make_pki(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let d = dir.display();
    let mut gw = vipgate::NullGateway::builder("k8stls")
        .api_config(&format!(
            "listen_tcp = \"127.0.0.1:{port}\"\ntls_cert = \"{d}/server.pem\"\ntls_key = \"{d}/server.key\"\nclient_ca = \"{d}/ca.pem\"\n"
        ))
        .build();
    gw.spawn();
    gw.wait_ready(|g| g.ctl(&["health"]).status.success());
    env.install_crds();
    env.kubectl_ok(&["create", "namespace", "vipgate-system"]);
    let secret = |name: &str, ca: &str| {
        let files = [
            format!("--from-file=tls.crt={d}/client.pem"),
            format!("--from-file=tls.key={d}/client.key"),
            format!("--from-file=ca.crt={d}/{ca}"),
        ];
        env.kubectl_ok(&["-n", "vipgate-system", "create", "secret", "generic", name, &files[0], &files[1], &files[2]]);
    };
    secret("gw-client", "ca.pem");
    secret("gw-client-wrong-ca", "other-ca.pem");
    env.apply(&format!(
        "apiVersion: vipgate.io/v1alpha1\nkind: VipPool\nmetadata:\n  name: default\nspec:\n  addresses: [\"{POOL}\"]\n---\n\
         apiVersion: vipgate.io/v1alpha1\nkind: VipGateway\nmetadata:\n  name: tls\nspec:\n  endpoint: https://127.0.0.1:{port}\n  \
         credentialsSecret: {{ namespace: vipgate-system, name: gw-client }}\n---\n\
         apiVersion: vipgate.io/v1alpha1\nkind: VipGateway\nmetadata:\n  name: wrong-ca\nspec:\n  endpoint: https://127.0.0.1:{port}\n  \
         credentialsSecret: {{ namespace: vipgate-system, name: gw-client-wrong-ca }}\n"
    ));
    env.node("node-1", "198.18.1.21", true);
    let mut ctl = K8sController::start(&env, &dir, "tls", &[]);
    let log = || std::fs::read_to_string(dir.join("vipgate-k8s.log")).unwrap_or_default();
    env.apply(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  type: LoadBalancer\n  \
         loadBalancerClass: vipgate.io/gateway\n  ports:\n  - name: http\n    port: 80\n",
    );
    env.wait_for(Duration::from_secs(10), "the Service on the gateway over mutual TLS", &log, || {
        let out = gw.ctl(&["--json", "--owner", "k8s/tls", "list"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["services"].as_array()?.iter().any(|s| s["name"] == "tls.default.web.http")).then_some(())
    });
    let synced = env.wait_for(Duration::from_secs(10), "VipGateway tls Synced", &log, || {
        let s = env.kubectl_ok(&[
            "get",
            "vipgateway",
            "tls",
            "-o",
            "jsonpath={.status.conditions[0].status} {.status.version}",
        ]);
        s.starts_with("True").then_some(s)
    });
    println!("VipGateway tls: {synced}");
    let e = env.wait_for(Duration::from_secs(10), "PushFailed on VipGateway wrong-ca", &log, || {
        let e = env.events("VipGateway", "wrong-ca");
        e.contains("PushFailed").then_some(e)
    });
    println!("wrong-ca: {e}");
    assert!(e.to_lowercase().contains("certificate"), "the Event names the certificate problem: {e}");
    println!("{}", env.kubectl_ok(&["get", "vipgateway"]));
    ctl.assert_running();
    drop(ctl);
    drop(env);
    let status = gw.stop();
    assert!(status.success(), "vipgated exited with {status}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn source_ranges_refuse_other_clients_and_client_ip_affinity_keeps_a_client_on_one_node() {
    let c = Cluster::start(3);
    c.wait_gateway_synced();
    let other = "198.18.0.3";
    let add = c.rig.client(&["ip", "addr", "add", &format!("{other}/24"), "dev", &c.rig.client_if()]);
    assert!(add.status.success(), "ip addr add: {}", String::from_utf8_lossy(&add.stderr));
    // Host bits, as Kubernetes allows them: the controller sends the
    // network.
    c.service(
        "web",
        &[],
        "  loadBalancerSourceRanges: [\"198.18.0.3/32\", \"198.18.7.9/24\"]\n  sessionAffinity: ClientIP\n",
    );
    let ip = c.wait_ip("web", Duration::from_secs(2));
    let from = |src: &str| -> Result<String, String> {
        let out = c.rig.client(&[
            "curl",
            "-sS",
            "--interface",
            src,
            "--max-time",
            "2",
            "-H",
            "Connection: close",
            &format!("http://{ip}/whoami"),
        ]);
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        body.lines().find_map(|l| l.strip_prefix("backend ")).map(str::to_owned).ok_or(body)
    };
    c.env.wait_for(Duration::from_secs(3), "the allowed client is served", &|| c.log(), || from(other).ok());
    let denied_before = c.rig.drops("source_denied");
    let refused = from(vipgate::CLIENT_ADDR);
    let denied = c.rig.drops("source_denied") - denied_before;
    println!("from {}: {refused:?}; source_denied +{denied}", vipgate::CLIENT_ADDR);
    assert!(refused.is_err(), "a client outside loadBalancerSourceRanges gets no answer");
    assert!(denied > 0, "source_denied rises");
    let mut seen = BTreeMap::<String, u32>::new();
    for _ in 0..50 {
        *seen.entry(from(other).expect("the allowed client")).or_default() += 1;
    }
    println!("50 connections from {other} with sessionAffinity ClientIP: {seen:?}");
    assert_eq!(seen.len(), 1, "one client's connections reach one node: {seen:?}");
    let svc = c.gateway_services();
    let web =
        svc["services"].as_array().unwrap().iter().find(|s| s["name"] == "test.default.web.http").unwrap().clone();
    println!("on the gateway: source_ranges {} affinity {}", web["source_ranges"], web["affinity"]);
    assert_eq!(web["source_ranges"], serde_json::json!(["198.18.0.3/32", "198.18.7.0/24"]));
    c.teardown();
}

#[test]
fn of_two_leader_electing_controllers_one_leads_and_the_other_takes_over_when_it_dies() {
    let env = K8sEnv::start();
    env.install_crds();
    env.kubectl_ok(&["create", "namespace", "vipgate-system"]);
    let dir = std::env::temp_dir().join(format!("vipgate-k8s-lease-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (da, db) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let args = ["--leader-elect", "--lease-namespace", "vipgate-system"];
    let mut a = K8sController::start(&env, &da, "lease", &args);
    let started = Instant::now();
    let leading = |c: &K8sController| c.log_text().contains("leading");
    env.wait_for(Duration::from_secs(20), "the first controller leads", &|| a.log_text(), || leading(&a).then_some(()));
    let mut b = K8sController::start(&env, &db, "lease", &args);
    std::thread::sleep(Duration::from_secs(5));
    assert!(!leading(&b), "the second waits while the first holds the Lease:\n{}", b.log_text());
    assert!(b.log_text().contains("waiting to lead"), "{}", b.log_text());
    let holder = env.kubectl_ok(&[
        "-n",
        "vipgate-system",
        "get",
        "lease",
        "vipgate-k8s",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    println!("Lease held by {holder} ({:?} after the first start)", started.elapsed());
    a.kill();
    let killed = Instant::now();
    env.wait_for(Duration::from_secs(40), "the second controller takes over", &|| b.log_text(), || {
        leading(&b).then_some(())
    });
    println!("the second leads {:?} after the first was killed", killed.elapsed());
    b.assert_running();
    drop(b);
    drop(env);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The addresses on the gateway's announcement interface `vipgate0`.
fn announced(c: &Cluster) -> Vec<String> {
    let out = c.rig.gateway(&["ip", "-4", "-o", "addr", "show", "dev", "vipgate0"]);
    assert!(out.status.success(), "ip addr show vipgate0: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .map(|a| a.split('/').next().unwrap_or(a).to_owned())
        .collect()
}

#[test]
fn a_deleted_service_leaves_the_gateway_and_vipgate0_and_frees_its_address_within_2_s() {
    let c = Cluster::start_announcing(2);
    c.wait_gateway_synced();
    let static_vip = "198.18.100.1";
    let before = announced(&c);
    assert_eq!(before, vec![static_vip.to_owned()], "only the static service's VIP at first");
    c.service("web", &[], "");
    let ip = c.wait_ip("web", Duration::from_secs(2));
    c.env.wait_for(Duration::from_secs(2), "the Service's VIP on vipgate0", &|| c.log(), || {
        announced(&c).contains(&ip).then_some(())
    });
    c.env.wait_for(Duration::from_secs(2), "the first request through the VIP", &|| c.log(), || c.whoami(&ip).ok());
    println!("{ip} served and on vipgate0: {:?}", announced(&c));
    // The pool's (assigned, available) addresses, once its status is
    // written (the controller writes it every 500 ms, so it may lag).
    let pool_status = || -> Option<(u64, u64)> {
        let out =
            c.env.kubectl_ok(&["get", "vippool", "default", "-o", "jsonpath={.status.assigned} {.status.available}"]);
        let (a, b) = out.trim().split_once(' ')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    c.env.wait_for(Duration::from_secs(5), "the pool's status shows the address taken", &|| c.log(), || {
        (pool_status() == Some((1, 15))).then_some(())
    });

    c.env.kubectl_ok(&["delete", "svc", "web", "--wait=false"]);
    let deleted = Instant::now();
    c.env.wait_for(Duration::from_secs(2), "web's service leaves the gateway", &|| c.log(), || {
        (!c.gateway_names().contains(&"test.default.web.http".to_owned())).then_some(())
    });
    c.env.wait_for(Duration::from_secs(2), "web's VIP leaves vipgate0", &|| c.log(), || {
        (!announced(&c).contains(&ip)).then_some(())
    });
    c.env.wait_for(Duration::from_secs(2), "the address is free in the pool", &|| c.log(), || {
        (pool_status() == Some((0, 16))).then_some(())
    });
    let took = deleted.elapsed();
    println!("kubectl delete svc web: off the gateway, off vipgate0 and free in the pool {took:?} later");
    assert!(took <= Duration::from_secs(2), "{took:?}");
    assert_eq!(announced(&c), vec![static_vip.to_owned()], "the static VIP stays announced");
    assert!(c.whoami(&ip).is_err(), "{ip} no longer answers");
    println!("{}", c.env.kubectl_ok(&["get", "vippool", "default"]));
    // The controller's metrics tell the same story, once it has taken the
    // gateway's answer to the removal (it may still be reading it).
    let synced = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("vipgate_k8s_sync_seconds_count{gateway=\"gw1\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_some_and(|n| n >= 2.0)
    };
    let metrics = c.env.wait_for(Duration::from_secs(2), "both changes synced in the metrics", &|| c.log(), || {
        Some(controller_metrics(&c)).filter(|m| synced(m))
    });
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in the controller's metrics:\n{metrics}"))
    };
    println!(
        "controller metrics: reconciles {}, sync_seconds count {}, pool available {}",
        value("vipgate_k8s_reconciles_total "),
        value("vipgate_k8s_sync_seconds_count{gateway=\"gw1\"} "),
        value("vipgate_k8s_pool_available_addresses{pool=\"default\"} ")
    );
    assert!(value("vipgate_k8s_reconciles_total ") >= 2.0, "web's creation and deletion were reconciled");
    assert_eq!(value("vipgate_k8s_reconcile_errors_total "), 0.0);
    assert!(value("vipgate_k8s_sync_seconds_count{gateway=\"gw1\"} ") >= 2.0, "both changes synced to gw1");
    assert_eq!(value("vipgate_k8s_pool_available_addresses{pool=\"default\"} "), 16.0);
    assert_eq!(value("vipgate_k8s_pool_assigned_addresses{pool=\"default\"} "), 0.0);
    c.teardown();
}

/// `GET /metrics` of the controller, at the address it logged.
fn controller_metrics(c: &Cluster) -> String {
    let log = c.log();
    let url = log
        .lines()
        .find_map(|l| l.split("serving /metrics and /healthz on ").nth(1))
        .map(|u| format!("{}/metrics", u.trim()))
        .unwrap_or_else(|| panic!("the controller logged no metrics address:\n{log}"));
    let out = std::process::Command::new("curl").args(["-sS", "--max-time", "5", &url]).output().expect("curl");
    assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An HTTP server in the backend namespace on `addr`:`port` answering
/// `GET /healthz` with 200, as kube-proxy does on a node with endpoints
/// of the Service; killed on drop.
struct Healthz {
    child: std::process::Child,
    _dir: PathBuf,
}

impl Healthz {
    fn start(c: &Cluster, addr: &str, port: u16) -> Healthz {
        let dir = c.rig.dir().join(format!("healthz-{addr}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("healthz"), "ok\n").unwrap();
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &format!("{}backend", c.rig.prefix), "python3", "-m", "http.server"])
            .args(["--bind", addr, "--directory"])
            .arg(&dir)
            .arg(port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start python3 -m http.server");
        let h = Healthz { child, _dir: dir };
        let url = format!("http://{addr}:{port}/healthz");
        c.env.wait_for(Duration::from_secs(10), &format!("{url} answers"), &|| c.log(), || {
            let out = c.rig.backend(&["curl", "-sf", "--max-time", "1", &url]);
            out.status.success().then_some(())
        });
        h
    }
}

impl Drop for Healthz {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn with_the_local_policy_only_nodes_with_endpoints_serve_each_checked_on_its_healthz() {
    let c = Cluster::start_announcing(3);
    c.wait_gateway_synced();
    const HEALTH_PORT: u16 = 8099;
    let (node1, node2, node3) = (backend_addr(2), backend_addr(3), backend_addr(4));
    let mut healthz = vec![Healthz::start(&c, &node1, HEALTH_PORT), Healthz::start(&c, &node2, HEALTH_PORT)];
    c.service("local", &[], &format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {HEALTH_PORT}\n"));
    // Endpoints on node-1 and node-2; none on node-3.
    let eps: String = [("node-1", 2), ("node-2", 3)]
        .iter()
        .map(|(node, i)| {
            format!(
                "- addresses: [\"{}\"]\n  nodeName: {node}\n  conditions: {{ ready: true, serving: true, terminating: false }}\n",
                backend_addr(*i)
            )
        })
        .collect();
    c.env.apply(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: local-1\n  namespace: default\n  labels:\n    \
         kubernetes.io/service-name: local\naddressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n{eps}"
    ));
    let ip = c.wait_ip("local", Duration::from_secs(2));
    let service = |c: &Cluster| -> Option<serde_json::Value> {
        c.gateway_services()["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "test.default.local.http")
            .cloned()
    };
    // The gateway's service: the two nodes with endpoints, on the nodePort,
    // each checked over HTTP on the healthCheckNodePort at /healthz.
    let svc = c.env.wait_for(Duration::from_secs(5), "two node backends, both up", &|| c.log(), || {
        service(&c).filter(|s| {
            let b = s["backends"].as_array().unwrap();
            b.len() == 2 && b.iter().all(|b| b["health"] == "up")
        })
    });
    println!("the gateway's service: {svc}");
    let mut addrs: Vec<&str> =
        svc["backends"].as_array().unwrap().iter().filter_map(|b| b["address"].as_str()).collect();
    addrs.sort_unstable();
    assert_eq!(addrs, vec![node1.as_str(), node2.as_str()], "only the nodes with endpoints: {svc}");
    assert!(!addrs.contains(&node3.as_str()));
    let check = &svc["health_check"];
    assert_eq!(
        (check["kind"].as_str(), check["port"].as_u64(), check["path"].as_str()),
        (Some("http"), Some(u64::from(HEALTH_PORT)), Some("/healthz")),
        "{svc}"
    );
    let spread = |n: usize| -> BTreeMap<String, u32> {
        let mut by: BTreeMap<String, u32> = BTreeMap::new();
        for _ in 0..n {
            let b = c.whoami(&ip).unwrap_or_else(|e| panic!("a request through {ip} failed: {e}\n{}", c.log()));
            *by.entry(b).or_default() += 1;
        }
        by
    };
    c.env.wait_for(Duration::from_secs(2), "the first request", &|| c.log(), || c.whoami(&ip).ok());
    let both = spread(60);
    println!("60 requests with both nodes healthy: {both:?}");
    assert_eq!(both.len(), 2, "both nodes with endpoints serve: {both:?}");

    // node-2's /healthz stops answering (its kube-proxy would say 503):
    // the gateway's probes mark it down and it gets no new connection.
    drop(healthz.pop());
    let down = Instant::now();
    c.env.wait_for(Duration::from_secs(10), "node-2 marked down by its /healthz probe", &|| c.log(), || {
        service(&c).filter(|s| {
            s["backends"].as_array().unwrap().iter().any(|b| b["address"] == node2.as_str() && b["health"] == "down")
        })
    });
    println!("node-2 down {:?} after its /healthz stopped", down.elapsed());
    let one = spread(30);
    println!("30 requests with node-2's /healthz gone: {one:?}");
    assert_eq!(one.len(), 1, "only node-1 serves: {one:?}");
    drop(healthz);
    c.teardown();
}
