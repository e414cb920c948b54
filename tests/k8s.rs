//! vipgate-k8s end to end: a real kube-apiserver and etcd on loopback
//! (scripts/k8s-testenv.sh), kubectl doing what a user does, vipgated on
//! net_tap with its backends in a namespace playing the nodes (each
//! address a Node's InternalIP, serving HTTP on the nodePort 8080), and
//! curl from a client namespace.
//!
//! Needs root, hugepages or --no-huge (as the other rig tests), and the
//! apiserver's binaries (scripts/k8s-build.sh, which scripts/test.sh runs).

use std::collections::BTreeMap;
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
        require_root();
        let rig = Rig::start(RigOptions { backends: nodes + 1, configured_backends: Some(1), ..Default::default() });
        let env = K8sEnv::start(rig.dir());
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

    /// `kubectl apply` of a LoadBalancer Service `name` on port 80 with
    /// nodePort 8080 and `extra` spec lines (indented 2).
    fn service(&self, name: &str, annotations: &[(&str, &str)], extra: &str) {
        let ann: String = annotations.iter().map(|(k, v)| format!("    {k}: \"{v}\"\n")).collect();
        let ann = if ann.is_empty() { String::new() } else { format!("  annotations:\n{ann}") };
        self.env.apply(&format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n{ann}spec:\n  type: LoadBalancer\n  \
             loadBalancerClass: vipgate.io/gateway\n  selector: {{ app: {name} }}\n  ports:\n  - name: http\n    port: 80\n    \
             targetPort: 8080\n    nodePort: 8080\n    protocol: TCP\n{extra}"
        ));
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
    let mut c = Cluster::start(3);
    // The controller is up once the gateway reports synced.
    c.env.wait_for(Duration::from_secs(30), "VipGateway gw1 Synced", &|| c.log(), || {
        let out = c.env.kubectl(&["get", "vipgateway", "gw1", "-o", "jsonpath={.status.conditions[0].status}"]);
        (String::from_utf8_lossy(&out.stdout) == "True").then_some(())
    });
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
    c.ctl.assert_running();
    c.rig.teardown();
}
