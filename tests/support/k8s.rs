//! A real kube-apiserver and etcd on loopback (scripts/k8s-testenv.sh),
//! kubectl against them, and vipgate-k8s running on them.
//!
//! The apiserver has no kubelet or controller-manager: the tests create
//! the Nodes (with their status) and EndpointSlices themselves.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{repo_root, workspace_bin};

/// The node ports the apiserver hands out: the rig's backends serve HTTP
/// on 8080 and UDP on 5353, so a Service's nodePort can be theirs.
pub const NODE_PORTS: &str = "5000-8999";

/// A running apiserver and etcd; stopped on drop.
pub struct K8sEnv {
    dir: PathBuf,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
}

impl K8sEnv {
    /// Starts them in a fresh directory of their own (kept after a
    /// failure, for the logs; removed otherwise).
    pub fn start() -> K8sEnv {
        Self::start_with_service_range("198.18.128.0/24")
    }

    /// The same, with the Services' cluster IPs from `range` (inside
    /// 198.18.0.0/15): a /24 holds 254 Services.
    pub fn start_with_service_range(range: &str) -> K8sEnv {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("vipgate-k8s-{}x{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new(repo_root().join("scripts/k8s-testenv.sh"))
            .args(["start"])
            .arg(&dir)
            .env("VIPGATE_K8S_NODE_PORTS", NODE_PORTS)
            .env("VIPGATE_K8S_SERVICE_RANGE", range)
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/k8s-testenv.sh");
        assert!(
            out.status.success(),
            "scripts/k8s-testenv.sh start failed (scripts/k8s-build.sh builds the binaries once):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        K8sEnv { kubeconfig: dir.join("kubeconfig"), dir }
    }

    /// The directory with the logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs kubectl with `args`.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }

    /// Runs kubectl with `args`; panics with its output if it fails, else
    /// returns its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` of `yaml`; panics on failure.
    pub fn apply(&self, yaml: &str) -> String {
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl apply");
        use std::io::Write;
        child.stdin.take().expect("stdin").write_all(yaml.as_bytes()).expect("write yaml");
        let out = child.wait_with_output().expect("kubectl apply");
        assert!(
            out.status.success(),
            "kubectl apply failed:\n{}{}\n--- yaml ---\n{yaml}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Installs vipgate's CRDs (printed by `vipgate-k8s crds`) and waits
    /// until the apiserver serves them.
    pub fn install_crds(&self) {
        let out = Command::new(workspace_bin("vipgate-k8s")).arg("crds").output().expect("run vipgate-k8s crds");
        assert!(out.status.success(), "vipgate-k8s crds: {}", String::from_utf8_lossy(&out.stderr));
        self.apply(&String::from_utf8_lossy(&out.stdout));
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=120s",
            "crd/vippools.vipgate.io",
            "crd/vipgateways.vipgate.io",
        ]);
    }

    /// Creates Node `name` with InternalIP `address`, Ready or not.
    pub fn node(&self, name: &str, address: &str, ready: bool) {
        self.apply(&format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n"));
        self.node_status(name, address, ready);
    }

    /// Sets Node `name`'s status: its InternalIP and its Ready condition.
    pub fn node_status(&self, name: &str, address: &str, ready: bool) {
        let patch = serde_json::json!({ "status": {
            "addresses": [{ "type": "InternalIP", "address": address }],
            "conditions": [{
                "type": "Ready", "status": if ready { "True" } else { "False" },
                "reason": "Test", "message": "set by the test",
                "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"
            }]
        }});
        self.kubectl_ok(&["patch", "node", name, "--subresource=status", "--type=merge", "-p", &patch.to_string()]);
    }

    /// Waits until `check` returns Some, at most `limit`; panics with
    /// `what` and the controller's log otherwise.
    pub fn wait_for<T>(
        &self,
        limit: Duration,
        what: &str,
        log: &dyn Fn() -> String,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = check() {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: not within {limit:?}\n--- controller log ---\n{}", log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address `status.loadBalancer.ingress[0].ip` of Service `name`
    /// in `default`, if it has one.
    pub fn external_ip(&self, name: &str) -> Option<String> {
        let out = self.kubectl(&["get", "svc", name, "-o", "jsonpath={.status.loadBalancer.ingress[0].ip}"]);
        let ip = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !ip.is_empty()).then_some(ip)
    }

    /// The Events of an object, as `kubectl get events` prints their
    /// reason and note.
    pub fn events(&self, kind: &str, name: &str) -> String {
        let sel = format!("regarding.kind={kind},regarding.name={name}");
        let out = self.kubectl(&[
            "get",
            "events.events.k8s.io",
            "-A",
            "--field-selector",
            &sel,
            "-o",
            "jsonpath={range .items[*]}{.reason}: {.note}{\"\\n\"}{end}",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for K8sEnv {
    fn drop(&mut self) {
        let out = Command::new(repo_root().join("scripts/k8s-testenv.sh")).arg("stop").arg(&self.dir).output();
        match out {
            Ok(out) if out.status.success() => {
                if std::thread::panicking() {
                    eprintln!("kube-apiserver and etcd logs kept in {}", self.dir.display());
                } else {
                    let _ = std::fs::remove_dir_all(&self.dir);
                }
            }
            Ok(out) => {
                eprintln!("k8s-testenv.sh stop {}: {}", self.dir.display(), String::from_utf8_lossy(&out.stderr))
            }
            Err(e) => eprintln!("k8s-testenv.sh stop {}: {e}", self.dir.display()),
        }
    }
}

/// vipgate-k8s, running; killed on drop.
pub struct K8sController {
    child: Option<Child>,
    /// Its log.
    pub log: PathBuf,
    args: Vec<String>,
    kubeconfig: PathBuf,
}

impl K8sController {
    /// Starts `vipgate-k8s run --cluster-name CLUSTER` with `extra`
    /// arguments, its log in `dir`.
    pub fn start(env: &K8sEnv, dir: &Path, cluster: &str, extra: &[&str]) -> K8sController {
        let mut args = vec!["run".to_owned(), "--cluster-name".to_owned(), cluster.to_owned()];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        if !extra.contains(&"--metrics-addr") {
            args.extend(["--metrics-addr".to_owned(), "127.0.0.1:0".to_owned()]);
        }
        let mut c =
            K8sController { child: None, log: dir.join("vipgate-k8s.log"), args, kubeconfig: env.kubeconfig.clone() };
        c.spawn();
        c
    }

    /// Starts it again (after [`K8sController::kill`]).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("controller log");
        let child = Command::new(workspace_bin("vipgate-k8s"))
            .args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info,kube=warn,vipgate_k8s=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn vipgate-k8s");
        self.child = Some(child);
    }

    /// SIGKILLs it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics if it exited.
    pub fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!("vipgate-k8s exited ({status}):\n{}", self.log_text());
        }
    }
}

impl Drop for K8sController {
    fn drop(&mut self) {
        self.kill();
    }
}
