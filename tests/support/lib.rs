//! Support for vipgate's end-to-end tests: a gateway (`vipgated` as a child
//! process) on net_tap ports, with the client and backend network
//! namespaces of `scripts/rig.sh` around it, and a guaranteed teardown.
//!
//! Tests that use it need root and either hugepages or an explicit
//! `VIPGATE_HUGEPAGES=0`; they fail loudly, never skip, when those are
//! missing. A [`Mode::Dsr`] rig also needs the kernel's IPIP (the backends
//! decapsulate with tunl0), or `VIPGATE_DSR_DECAP=userspace`, which has
//! scripts/backend.py decapsulate instead (for kernels without
//! CONFIG_NET_IPIP; see scripts/rig.sh).
//!
//! For reload tests: a rig can run more backends than its configuration
//! lists ([`RigOptions::configured_backends`]); [`Rig::config_with_web_backends`]
//! writes the configuration again with another web backend list and
//! [`Rig::reload`] applies it (SIGHUP) and waits for the outcome;
//! [`Rig::start_download`] runs a long download in the background and tells
//! which backend serves it while it runs.
//!
//! The gateway's exception path (a kernel interface per port) is off in a
//! rig unless [`RigOptions::exception`] turns it on: then vipgated runs in
//! a namespace of its own, `${prefix}gw`, where its kernel interfaces
//! (`client`, `backend`, named after the ports, with their addresses) are apart from the
//! host's and from every other rig's; [`Rig::gateway`] runs a command there,
//! as the gateway's own kernel.
//!
//! Tests of the API and the desired state, which need no traffic, use a
//! [`NullGateway`] instead: vipgated alone on net_null ports, in a temporary
//! directory, restartable on the same state.

pub mod ha;
pub mod k8s;
pub mod routing;

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The client's address in its namespace.
pub const CLIENT_ADDR: &str = "198.18.0.2";
/// The VIP every rig configures.
pub const VIP: &str = "198.18.100.1";
/// The address of the FullNAT source pool a [`Mode::FullNat`] rig
/// configures: what the backends see as their peer.
pub const SOURCE_POOL_ADDR: &str = "198.18.1.100";
/// The source ports of that pool.
pub const SOURCE_POOL_PORTS: std::ops::RangeInclusive<u16> = 20000..=39999;
/// The prefix the outer sources of a [`Mode::Dsr`] rig's tunnels come from.
pub const TUNNEL_SOURCE: &str = "198.18.3.0/24";
/// In a [`Mode::Dsr`] rig, the client's leg in the backend LAN (in the
/// client namespace), where the backends' replies arrive.
pub const CLIENT_LAN_IF: &str = "lan0";
/// The UDP service's port (the backends' too, in every mode).
pub const UDP_PORT: u16 = 5353;
/// Backend `backend-i` (1-based) listens on `198.18.1.(10+i)`.
pub fn backend_addr(i: usize) -> String {
    format!("198.18.1.{}", 10 + i)
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Panics unless running as root: the rig creates namespaces and taps.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, net_tap, hugepages); run it through scripts/test.sh as root"
    );
}

/// Whether the gateway should use hugepages. `VIPGATE_HUGEPAGES=1|0` (set
/// by scripts/setup.sh) decides; without it, hugepages must be available or
/// the test fails, telling how to proceed.
pub fn use_hugepages() -> bool {
    match std::env::var("VIPGATE_HUGEPAGES").as_deref() {
        Ok("0") => false,
        Ok("1") => {
            assert!(
                free_hugepages() >= 128,
                "VIPGATE_HUGEPAGES=1 but fewer than 128 free 2 MiB hugepages; run scripts/setup.sh"
            );
            true
        }
        _ => {
            assert!(
                free_hugepages() >= 128,
                "no free hugepages: run scripts/setup.sh (it reserves them), or set VIPGATE_HUGEPAGES=0 to test with --no-huge"
            );
            true
        }
    }
}

fn free_hugepages() -> u64 {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"));
    if !mounted {
        return 0;
    }
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Path of a binary built by the workspace (`vipgated`, `vipgatectl`):
/// `$VIPGATED_BIN`-style overrides first, then beside the test executable.
pub fn workspace_bin(name: &str) -> PathBuf {
    let env = format!("{}_BIN", name.to_ascii_uppercase());
    if let Ok(p) = std::env::var(&env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("test binary lives in target/<profile>/deps");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found; build it first (cargo build -p vipgate-daemon -p vipgate-controlplane) or set {env}",
        p.display()
    );
    p
}

/// How long [`NullGateway::wait_ready`] waits for vipgated's API.
pub const NULL_GATEWAY_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`NullGateway::stop`] waits for vipgated to exit after SIGTERM.
pub const NULL_GATEWAY_STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// A vipgated on two net_null ports, in a temporary directory of its own
/// (configuration, API socket, `[state]` directory, logs): for the tests of
/// its API, its desired state and its clients, which need no traffic.
///
/// The configuration ([`NullGateway::builder`]) is a base common to those
/// tests: `[eal]` on lcores 0,1 (unless [`NullGatewayBuilder::lcores`]) with hugepages as [`use_hugepages`] says and
/// the gateway's own file prefix, `[dataplane]` `idle_sleep_us = 50` (unless [`NullGatewayBuilder::idle_sleep_us`]) and
/// `mbufs = 4095`, `[api] socket`, `[state] dir`, the ports `a`
/// (198.18.0.1/24) and `b` (198.18.1.1/24) on net_null with `no-rx=1`
/// (unless [`NullGatewayBuilder::receiving`]), the static tcp service
/// "web" (198.18.100.1:80 to 198.18.1.11:8080), and `[metrics] listen = ""`
/// (off); what a test needs beyond it (a static source pool) it appends
/// with [`NullGatewayBuilder::extra_config`]. The ports and the services
/// can be replaced ([`NullGatewayBuilder::ports`],
/// [`NullGatewayBuilder::services`]): the gateways of an HA pair
/// ([`ha::HaPair`]) run on net_tap ports.
///
/// vipgated can be stopped and spawned again on the same directory, and so
/// with the same configuration and state; each start writes its stderr to a
/// log of its own ([`NullGateway::log_path`]). Dropping the gateway kills
/// vipgated and removes its EAL runtime directory and hugepage files, and
/// its temporary directory unless the thread is panicking: that is kept,
/// for the logs, and its path printed.
pub struct NullGateway {
    dir: PathBuf,
    prefix: String,
    child: Option<Child>,
    starts: usize,
    netns: Option<String>,
}

/// Makes a [`NullGateway`]; see [`NullGateway::builder`].
#[must_use]
pub struct NullGatewayBuilder {
    tag: String,
    extra: String,
    dataplane: String,
    netns: Option<String>,
    metrics: String,
    lcores: String,
    receiving: bool,
    ports: Option<String>,
    services: Option<String>,
    idle_sleep_us: u32,
    mbufs: u32,
    api: String,
    eal: String,
}

impl NullGatewayBuilder {
    /// Appends keys to `[eal]` (such as `control_plane_nice = 0`).
    pub fn eal(mut self, toml: &str) -> Self {
        self.eal.push_str(toml);
        self.eal.push('\n');
        self
    }

    /// Appends TOML to the base configuration, after the service "web".
    pub fn extra_config(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self
    }

    /// Serves metrics on `addr` (`[metrics] listen`; off by default).
    pub fn metrics_listen(mut self, addr: &str) -> Self {
        addr.clone_into(&mut self.metrics);
        self
    }

    /// Sets `[dataplane] idle_sleep_us` (50 unless set).
    pub fn idle_sleep_us(mut self, us: u32) -> Self {
        self.idle_sleep_us = us;
        self
    }

    /// Sets `[dataplane] mbufs` (4095 unless set): ports whose queues take
    /// more, such as a bond's members, each with rx queues of their own.
    pub fn mbufs(mut self, mbufs: u32) -> Self {
        self.mbufs = mbufs;
        self
    }

    /// Adds TOML lines to the `[api]` section (say `listen_tcp` and its
    /// TLS files).
    pub fn api_config(mut self, toml: &str) -> Self {
        self.api.push_str(toml);
        self
    }

    /// Adds TOML lines to the `[dataplane]` section.
    pub fn dataplane_config(mut self, toml: &str) -> Self {
        self.dataplane.push_str(toml);
        self
    }

    /// Runs vipgated inside the network namespace `name` (`ip netns exec`,
    /// which execs it: the pid and signals are vipgated's own). The test
    /// owns the namespace; the API socket and the files stay in the
    /// temporary directory, reachable from outside.
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// Runs vipgated on `lcores` (`[eal] lcores`, such as `0@0,1@1,2@1` for
    /// two workers sharing CPU 1) instead of `0,1` (one worker).
    pub fn lcores(mut self, lcores: &str) -> Self {
        self.lcores = lcores.to_owned();
        self
    }

    /// Lets the net_null ports receive: each rx burst returns a full burst
    /// of (malformed, dropped) packets, so the workers never idle, as on a
    /// loaded gateway. By default they receive nothing (`no-rx=1`).
    pub fn receiving(mut self) -> Self {
        self.receiving = true;
        self
    }

    /// Replaces the two net_null ports with `toml` (`[[ports]]` sections):
    /// for a gateway on other ports, net_tap ones say ({prefix} in it is
    /// replaced by the gateway's file prefix, unique to it).
    pub fn ports(mut self, toml: &str) -> Self {
        self.ports = Some(toml.to_owned());
        self
    }

    /// Replaces the static service "web" with `toml` (`[[services]]`
    /// sections, or nothing).
    pub fn services(mut self, toml: &str) -> Self {
        self.services = Some(toml.to_owned());
        self
    }

    /// Checks for root ([`require_root`]) and hugepages ([`use_hugepages`]),
    /// makes the temporary directory afresh and writes the configuration.
    /// vipgated does not run yet: see [`NullGateway::spawn`].
    pub fn build(self) -> NullGateway {
        require_root();
        let huge = use_hugepages();
        let prefix = format!("vg{}{}", self.tag, std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the gateway's temporary directory");
        let gw = NullGateway { dir, prefix, child: None, starts: 0, netns: self.netns };
        let config = format!(
            r#"[eal]
lcores = "{lcores}"
hugepages = {huge}
file_prefix = "{prefix}"
{eal}
[dataplane]
idle_sleep_us = {idle_sleep_us}
mbufs = {mbufs}
{dataplane}

[api]
socket = "{socket}"
{api}

[state]
dir = "{state}"

# Off unless asked for: a NullGateway never holds the default metrics port
# by surprise (tests/metrics.rs covers the endpoint).
[metrics]
listen = "{metrics}"

{ports}
{services}
{extra}"#,
            prefix = gw.prefix,
            socket = gw.socket().display(),
            state = gw.dir.join("state").display(),
            extra = self.extra,
            eal = self.eal,
            dataplane = self.dataplane,
            api = self.api,
            idle_sleep_us = self.idle_sleep_us,
            mbufs = self.mbufs,
            metrics = self.metrics,
            lcores = self.lcores,
            ports = self.ports.map_or_else(
                || {
                    let rx = if self.receiving { "" } else { ",no-rx=1" };
                    format!(
                        "[[ports]]\nname = \"a\"\ndevice = \"net_null{prefix}a{rx}\"\naddresses = [\"198.18.0.1/24\"]\nkernel_interface = \"\"\n\n\
                         [[ports]]\nname = \"b\"\ndevice = \"net_null{prefix}b{rx}\"\naddresses = [\"198.18.1.1/24\"]\nkernel_interface = \"\"\n",
                        prefix = gw.prefix
                    )
                },
                |p| p.replace("{prefix}", &gw.prefix)
            ),
            services = self.services.unwrap_or_else(|| {
                "[[services]]\nname = \"web\"\nvip = \"198.18.100.1\"\nport = 80\nprotocol = \"tcp\"\n\
                 backends = [ { address = \"198.18.1.11\", port = 8080 } ]\n"
                    .to_owned()
            }),
        );
        std::fs::write(gw.config_path(), config).expect("write the gateway's configuration");
        gw
    }
}

impl NullGateway {
    /// A gateway whose file prefix (EAL's, its hugepage files', its
    /// net_null devices') and temporary directory are `vg{tag}{pid}`: the
    /// tag tells the gateways of one test binary apart, and should be short.
    pub fn builder(tag: &str) -> NullGatewayBuilder {
        NullGatewayBuilder {
            tag: tag.to_owned(),
            extra: String::new(),
            dataplane: String::new(),
            netns: None,
            metrics: String::new(),
            lcores: "0,1".to_owned(),
            receiving: false,
            ports: None,
            services: None,
            idle_sleep_us: 50,
            mbufs: 4095,
            api: String::new(),
            eal: String::new(),
        }
    }

    /// The file prefix: EAL's (its runtime directory and hugepage files)
    /// and the temporary directory's name.
    pub fn file_prefix(&self) -> &str {
        &self.prefix
    }

    /// The temporary directory, for a test's own files too.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// The configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("vipgated.toml")
    }

    /// The `[state]` directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The state database in the `[state]` directory.
    pub fn state_file(&self) -> PathBuf {
        self.state_dir().join("state.redb")
    }

    /// The state file of earlier versions, which vipgated migrates.
    pub fn legacy_state_file(&self) -> PathBuf {
        self.state_dir().join("state.json")
    }

    /// The log (stderr) of the latest start: `vipgated.N.log`, N counting
    /// [`NullGateway::spawn`]s from 1.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("vipgated.{}.log", self.starts))
    }

    /// The latest start's log so far (empty if there is none).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts vipgated on the configuration file, with a new log, and
    /// returns at once; see [`NullGateway::wait_ready`].
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "vipgated is already running");
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).expect("create vipgated's log");
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(workspace_bin("vipgated"));
                c
            }
            None => Command::new(workspace_bin("vipgated")),
        };
        let child = command
            .arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn vipgated");
        self.child = Some(child);
    }

    /// Polls `ready` every 50 ms until it is true; panics, with the log, if
    /// vipgated exits first or [`NULL_GATEWAY_READY_TIMEOUT`] passes.
    pub fn wait_ready(&mut self, mut ready: impl FnMut(&NullGateway) -> bool) {
        let deadline = Instant::now() + NULL_GATEWAY_READY_TIMEOUT;
        while !ready(self) {
            assert!(
                Instant::now() < deadline,
                "vipgated's API did not come up within {NULL_GATEWAY_READY_TIMEOUT:?}:\n{}",
                self.log_text()
            );
            self.assert_running();
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panics, with the log, if vipgated has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_wait() {
            panic!("vipgated exited early ({status}):\n{}", self.log_text());
        }
    }

    /// Runs vipgatectl on the API socket with `args`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(workspace_bin("vipgatectl"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .env_remove("VIPGATE_ENDPOINT")
            .stdin(Stdio::null())
            .output()
            .expect("run vipgatectl")
    }

    /// vipgated's pid. Panics unless it runs.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("vipgated is running").id()
    }

    /// Sends `signal` to vipgated. Panics unless it runs.
    pub fn signal(&self, signal: i32) {
        let pid = self.pid();
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill({pid}, {signal}) failed");
    }

    /// Replaces the configuration file with `new_text`, sends SIGHUP and
    /// waits for the outcome, as [`Rig::reload`] does; returns the log's
    /// `configuration reloaded` line.
    pub fn reload(&self, new_text: &str) -> String {
        reload_config(&self.config_path(), self.pid(), || self.log_text(), new_text)
    }

    /// SIGKILL, then waits for the process to be gone.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.take().expect("vipgated is running").wait();
    }

    /// vipgated's exit status once it has exited (it is then no longer
    /// running: [`NullGateway::spawn`] may start it again); `None` while it
    /// runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut().expect("vipgated was spawned").try_wait().expect("try_wait on vipgated");
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Waits, without a deadline, for vipgated to exit: for a start that
    /// must fail.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.take().expect("vipgated was spawned").wait().expect("wait for vipgated")
    }

    /// SIGTERM, then waits (polling every 20 ms) for vipgated to exit and
    /// returns its status; panics, with the log, if it has not exited within
    /// [`NULL_GATEWAY_STOP_TIMEOUT`] (and `Drop` kills it).
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + NULL_GATEWAY_STOP_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            self.assert_stop_deadline(deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics, with the log and every thread's stack, once `deadline` (of
    /// a stop) has passed.
    pub fn assert_stop_deadline(&self, deadline: Instant) {
        assert!(
            Instant::now() < deadline,
            "vipgated did not stop within {NULL_GATEWAY_STOP_TIMEOUT:?} of SIGTERM:\n{}\n{}",
            self.log_text(),
            thread_stacks(self.pid())
        );
    }
}

/// Every thread's stack of process `pid`, by gdb in batch mode, for the
/// message of a test that found the process hung; says so when gdb is
/// missing or fails.
pub fn thread_stacks(pid: u32) -> String {
    let out = Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-nx", "-ex", "thread apply all bt"])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let stacks: Vec<&str> = text.lines().filter(|l| l.starts_with("Thread ") || l.starts_with('#')).collect();
            format!("--- threads of pid {pid} (gdb) ---\n{}", stacks.join("\n"))
        }
        Ok(o) => format!("(gdb could not read pid {pid}'s stacks: {})", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => format!("(no stacks of pid {pid}: gdb: {e})"),
    }
}

/// Replaces the configuration file `config` (a temporary file renamed over
/// it), sends SIGHUP to vipgated (`pid`) and waits, at most 10 s, until its
/// log (`log` reads it) has one more `configuration reloaded` line than
/// before; returns that line. Panics, with the log, if a `reload refused`
/// line appears instead or the deadline passes.
fn reload_config(config: &Path, pid: u32, log_text: impl Fn() -> String, new_text: &str) -> String {
    const RELOADED: &str = "configuration reloaded";
    const REFUSED: &str = "reload refused";
    // Only whole lines: vipgated may be writing the last one.
    let lines = |log: &str, what: &str| -> Vec<String> {
        let whole = log.rfind('\n').map_or("", |end| &log[..end]);
        whole.lines().filter(|l| l.contains(what)).map(str::to_owned).collect()
    };
    let before = log_text();
    let (reloaded, refused) = (lines(&before, RELOADED).len(), lines(&before, REFUSED).len());

    let tmp = config.with_extension("toml.tmp");
    std::fs::write(&tmp, new_text).expect("write the new configuration");
    std::fs::rename(&tmp, config).expect("rename the new configuration into place");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0, "SIGHUP to vipgated failed");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = log_text();
        if let Some(line) = lines(&log, REFUSED).get(refused) {
            panic!(
                "vipgated refused the reload: {line}\n--- new configuration ---\n{new_text}\n--- vipgated log ---\n{log}"
            );
        }
        if let Some(line) = lines(&log, RELOADED).get(reloaded) {
            return line.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no reload outcome within 10 s of SIGHUP\n--- new configuration ---\n{new_text}\n--- vipgated log ---\n{log}\n{}",
            thread_stacks(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for NullGateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&self.prefix));
        if let Ok(d) = std::fs::read_dir("/dev/hugepages") {
            for f in d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&self.prefix)) {
                let _ = std::fs::remove_file(f.path());
            }
        }
        if std::thread::panicking() {
            eprintln!("vipgated's files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// How the rig's two services reach their backends (the services' `mode`,
/// and `scripts/rig.sh up --mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Destination NAT; the backends route the client network back through
    /// the gateway.
    #[default]
    Nat,
    /// Source and destination NAT, the source from the pool
    /// [`SOURCE_POOL_ADDR`]; the backends have no route to the clients.
    FullNat,
    /// Direct server return: IPIP to the backend, which holds the VIP and
    /// answers the client directly, on the client's leg in the backend LAN.
    Dsr,
}

impl Mode {
    /// The name in the configuration and on rig.sh's command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Nat => "nat",
            Mode::FullNat => "fullnat",
            Mode::Dsr => "dsr",
        }
    }

    /// The web service's port: 80, except in DSR, where the backends (on
    /// 8080) must listen on the service's port.
    pub fn http_port(self) -> u16 {
        if self == Mode::Dsr { BACKEND_HTTP_PORT } else { 80 }
    }
}

/// The port the backends serve HTTP on.
const BACKEND_HTTP_PORT: u16 = 8080;

/// The name of a rig's client tap interface (rig.sh's `--client-if`).
fn client_if(prefix: &str) -> String {
    format!("{prefix}c")
}

/// What a rig is configured with beyond the defaults.
#[derive(Clone, Debug)]
pub struct RigOptions {
    /// Number of HTTP/UDP backends: rig.sh starts `backend-1..backend-N`.
    pub backends: usize,
    /// How many of them (`backend-1..backend-K`) the generated
    /// configuration lists in both services; `None`: all. The others run,
    /// ready for a reload to add them (see [`Rig::config_with_web_backends`]).
    pub configured_backends: Option<usize>,
    /// Extra TOML appended to the generated configuration.
    pub extra_config: String,
    /// `[eal] lcores`: the first is the control plane, the others workers.
    pub lcores: String,
    /// The mode of both services, and how the rig is wired for it.
    pub mode: Mode,
    /// The web service's `[services.health_check]` lines (TOML, without
    /// the header); `None`: no check. Its probes leave from the gateway's
    /// kernel, so they reach the backends only with
    /// [`RigOptions::exception`].
    pub web_health_check: Option<String>,
    /// The same for the UDP service "echo" (on the same VIP).
    pub echo_health_check: Option<String>,
    /// Whether the ports have kernel interfaces (the exception path); if so
    /// vipgated runs in the namespace `${prefix}gw`.
    pub exception: bool,
    /// Whether the client namespace gets a static route to the VIPs
    /// (198.18.100.0/24 via the gateway, 198.18.0.1); without it (rig.sh
    /// `--no-vip-route`) the client reaches a VIP only through a route it
    /// learns, from BGP say.
    pub client_vip_route: bool,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            backends: 3,
            configured_backends: None,
            extra_config: String::new(),
            lcores: "0,1".to_owned(),
            mode: Mode::Nat,
            web_health_check: None,
            echo_health_check: None,
            exception: false,
            client_vip_route: true,
        }
    }
}

/// How a DSR rig's backends decapsulate: `VIPGATE_DSR_DECAP=kernel`
/// (default: the kernel's tunl0) or `userspace` (scripts/backend.py).
fn dsr_decap() -> &'static str {
    match std::env::var("VIPGATE_DSR_DECAP").as_deref() {
        Err(_) | Ok("" | "kernel") => "kernel",
        Ok("userspace") => "userspace",
        Ok(other) => panic!("VIPGATE_DSR_DECAP must be \"kernel\" or \"userspace\", not {other:?}"),
    }
}

/// A running gateway with its namespaces. Call [`Rig::teardown`] at the end
/// of a test to check that nothing was left behind; if the test panics
/// first, `Drop` still tears everything down.
pub struct Rig {
    /// Unique prefix of this rig's namespaces, interfaces and files.
    pub prefix: String,
    /// The API socket.
    pub socket: PathBuf,
    /// Where the gateway's stderr goes.
    pub log: PathBuf,
    /// The services' mode.
    pub mode: Mode,
    /// The web service's port on the VIP (see [`Mode::http_port`]).
    pub http_port: u16,
    /// rig.sh up's arguments, for [`Rig::repair`].
    up_args: Vec<String>,
    /// Whether the exception path is on ([`RigOptions::exception`]).
    pub exception: bool,
    dir: PathBuf,
    config_path: PathBuf,
    config: ConfigTemplate,
    child: Option<Child>,
    torn_down: bool,
}

/// Everything the generated configuration is made of, kept so that
/// [`Rig::config_with_web_backends`] can write it again with another web
/// backend list and nothing else changed.
#[derive(Clone, Debug)]
struct ConfigTemplate {
    /// `[eal]` through the source pools: what comes before the services.
    head: String,
    /// The services' `mode` (and `source_pool` or `tunnel_source`) lines.
    service_mode: String,
    http_port: u16,
    /// The echo (UDP) service's backends, 1-based.
    udp_backends: Vec<usize>,
    /// The web service's health check section, complete with its header.
    web_health_check: String,
    /// The same for the echo service.
    echo_health_check: String,
    extra: String,
}

impl ConfigTemplate {
    /// The whole configuration, the web service listing `web` as (backend
    /// index, 1-based, weight), in that order.
    fn render(&self, web: &[(usize, u32)]) -> String {
        let web: Vec<String> = web
            .iter()
            .map(|&(i, w)| {
                format!("  {{ address = \"{}\", port = {BACKEND_HTTP_PORT}, weight = {w} }},", backend_addr(i))
            })
            .collect();
        let udp: Vec<String> = self
            .udp_backends
            .iter()
            .map(|&i| format!("  {{ address = \"{}\", port = {UDP_PORT} }},", backend_addr(i)))
            .collect();
        format!(
            r#"{head}
[[services]]
name = "web"
vip = "{VIP}"
port = {http_port}
protocol = "tcp"
{service_mode}backends = [
{web}
]
{web_health_check}
[[services]]
name = "echo"
vip = "{VIP}"
port = {UDP_PORT}
protocol = "udp"
{service_mode}backends = [
{udp}
]
{echo_health_check}
{extra}
"#,
            head = self.head,
            http_port = self.http_port,
            service_mode = self.service_mode,
            web = web.join("\n"),
            udp = udp.join("\n"),
            web_health_check = self.web_health_check,
            echo_health_check = self.echo_health_check,
            extra = self.extra,
        )
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Starts a rig's vipgated on `config` (in the rig's gateway namespace
/// with the exception path), its output to `log` (appended to, on a
/// restart).
fn spawn_vipgated(prefix: &str, exception: bool, config: &Path, log: &Path, append: bool) -> Child {
    let mut command = if exception {
        // `ip netns exec` execs vipgated: the child is vipgated itself.
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &format!("{prefix}gw")]).arg(workspace_bin("vipgated"));
        c
    } else {
        Command::new(workspace_bin("vipgated"))
    };
    let logfile = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(log)
        .expect("log file");
    command
        .arg("--config")
        .arg(config)
        .env("VIPGATE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(logfile.try_clone().expect("log fd"))
        .stderr(logfile)
        .spawn()
        .expect("spawn vipgated")
}

/// What teardown found.
#[derive(Debug)]
pub struct Leftovers {
    /// The gateway's exit status.
    pub exit: Option<std::process::ExitStatus>,
    /// Namespaces of this rig still present.
    pub namespaces: Vec<String>,
    /// Hugepage files of this rig still present.
    pub hugepage_files: Vec<PathBuf>,
    /// Processes still running that belong to this rig.
    pub processes: Vec<String>,
    /// EAL's runtime directory was still there after vipgated exited.
    pub runtime_dir_left: bool,
    /// The gateway's log.
    pub log: String,
}

impl Rig {
    /// Starts vipgated and brings the rig up around it.
    pub fn start(opts: RigOptions) -> Rig {
        require_root();
        let huge = use_hugepages();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("vgt{}x{n}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("vipgate-{prefix}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let socket = dir.join("api.sock");
        let log = dir.join("vipgated.log");
        let configured = opts.configured_backends.unwrap_or(opts.backends);
        assert!(
            (1..=opts.backends).contains(&configured),
            "configured_backends {configured} must be from 1 to backends ({})",
            opts.backends
        );
        let http_port = opts.mode.http_port();
        let (pools, service_mode) = match opts.mode {
            Mode::Nat => (String::new(), String::new()),
            Mode::FullNat => (
                format!(
                    "[[source_pools]]\nname = \"snat\"\naddresses = [\"{SOURCE_POOL_ADDR}\"]\nports = \"{}-{}\"\n",
                    SOURCE_POOL_PORTS.start(),
                    SOURCE_POOL_PORTS.end()
                ),
                "mode = \"fullnat\"\nsource_pool = \"snat\"\n".to_owned(),
            ),
            Mode::Dsr => (String::new(), format!("mode = \"dsr\"\ntunnel_source = \"{TUNNEL_SOURCE}\"\n")),
        };
        let client_if = client_if(&prefix);
        let head = format!(
            r#"[eal]
lcores = "{lcores}"
hugepages = {huge}
file_prefix = "{prefix}"

[dataplane]
idle_sleep_us = 20
mbufs = 8191

[api]
socket = "{socket}"

# Off: these tests may run beside a vipgated that holds the default port;
# tests/metrics.rs covers the endpoint.
[metrics]
listen = ""
[state]
dir = "{state_dir}"

[[ports]]
name = "client"
device = "net_tap{n}0,iface={client_if}"
addresses = ["198.18.0.1/24"]
{kernel}
[[ports]]
name = "backend"
device = "net_tap{n}1,iface={prefix}b"
addresses = ["198.18.1.1/24"]
{kernel}
{pools}"#,
            socket = socket.display(),
            state_dir = dir.join("state").display(),
            lcores = opts.lcores,
            // Default names (the ports' names) in the rig's own
            // gateway namespace; none at all without the exception path.
            kernel = if opts.exception { "" } else { "kernel_interface = \"\"\n" },
        );
        let health_check = |lines: &Option<String>| match lines {
            None => String::new(),
            Some(lines) => format!("\n[services.health_check]\n{lines}\n"),
        };
        let (web_health_check, echo_health_check) =
            (health_check(&opts.web_health_check), health_check(&opts.echo_health_check));
        let template = ConfigTemplate {
            head,
            service_mode,
            http_port,
            udp_backends: (1..=configured).collect(),
            web_health_check,
            echo_health_check,
            extra: opts.extra_config.clone(),
        };
        let config = template.render(&(1..=configured).map(|i| (i, 1)).collect::<Vec<_>>());
        let config_path = dir.join("vipgated.toml");
        std::fs::write(&config_path, config).expect("write config");

        if opts.exception {
            let gateway_ns = format!("{prefix}gw");
            // The namespace goes with the rig (rig.sh down deletes it, also
            // when this test fails before rig.sh up).
            for args in
                [vec!["netns", "add", gateway_ns.as_str()], vec!["-n", gateway_ns.as_str(), "link", "set", "lo", "up"]]
            {
                let out = Command::new("ip").args(&args).output().expect("run ip");
                assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let child = spawn_vipgated(&prefix, opts.exception, &config_path, &log, false);
        let mut up_args: Vec<String> = [
            "up",
            "--prefix",
            &prefix,
            "--client-if",
            &client_if,
            "--backend-if",
            &format!("{prefix}b"),
            "--backends",
            &opts.backends.to_string(),
            "--wait",
            "30",
            "--mode",
            opts.mode.name(),
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        if opts.mode == Mode::Dsr {
            up_args.extend(["--dsr-decap".to_owned(), dsr_decap().to_owned()]);
        }
        if !opts.client_vip_route {
            up_args.push("--no-vip-route".to_owned());
        }
        if opts.exception {
            up_args.push("--gateway-ns".to_owned());
        }
        let mut rig = Rig {
            prefix: prefix.clone(),
            socket,
            log,
            mode: opts.mode,
            http_port,
            up_args: up_args.clone(),
            exception: opts.exception,
            dir,
            config_path,
            config: template,
            child: Some(child),
            torn_down: false,
        };

        let up = Command::new(repo_root().join("scripts/rig.sh")).args(&up_args).output().expect("run scripts/rig.sh");
        if !up.status.success() {
            let hint = if opts.mode == Mode::Dsr {
                format!("(rig.sh got --dsr-decap {} from VIPGATE_DSR_DECAP=kernel|userspace)\n", dsr_decap())
            } else {
                String::new()
            };
            panic!(
                "rig.sh up failed:\n{}{}{hint}\n--- vipgated log ---\n{}",
                String::from_utf8_lossy(&up.stdout),
                String::from_utf8_lossy(&up.stderr),
                rig.log_text()
            );
        }
        rig.wait_for_api();
        rig
    }

    /// Stops vipgated (SIGTERM) and starts it again on the same
    /// configuration, and the same state unless `wipe_state` (a gateway
    /// replaced by a new machine), then repairs the rig around it (its tap
    /// ports are new) and waits for its API: a gateway restart.
    pub fn restart_gateway(&mut self, wipe_state: bool) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if wipe_state {
            let _ = std::fs::remove_dir_all(self.dir.join("state"));
        }
        self.child = Some(spawn_vipgated(&self.prefix, self.exception, &self.config_path, &self.log, true));
        self.repair();
        self.wait_for_api();
    }

    fn wait_for_api(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.ctl(&["health"]).status.success() {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("vipgated exited early ({status}):\n{}", self.log_text());
            }
            assert!(Instant::now() < deadline, "vipgated API did not come up within 20 s:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `rig.sh up` again with the same settings: it restarts the
    /// backends that are not running (see [`Rig::stop_backend`]) and
    /// repairs what else is missing. Panics with rig.sh's output if it
    /// fails.
    pub fn repair(&self) {
        let up = Command::new(repo_root().join("scripts/rig.sh")).args(&self.up_args).output().expect("run rig.sh up");
        assert!(
            up.status.success(),
            "rig.sh up (repair) failed:\n{}{}",
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        );
    }

    /// Runs `rig.sh up --only-backend i` with the same settings: restarts
    /// backend `i` (1-based) alone if it is not running, and returns once
    /// it answers; the other backends stay as they are. Panics with
    /// rig.sh's output if it fails.
    pub fn restart_backend(&self, i: usize) {
        let up = Command::new(repo_root().join("scripts/rig.sh"))
            .args(&self.up_args)
            .args(["--only-backend", &i.to_string()])
            .output()
            .expect("run rig.sh up --only-backend");
        assert!(
            up.status.success(),
            "rig.sh up --only-backend {i} failed:\n{}{}",
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        );
    }

    /// Stops backend `i` (1-based; `backend-i`) with SIGKILL and waits until
    /// its process is gone: its address stays, so its kernel refuses new
    /// connections.
    pub fn stop_backend(&self, i: usize) {
        let pidfile = Path::new("/run/vipgate-rig").join(&self.prefix).join(format!("backend-{i}.pid"));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()))
            .trim()
            .parse()
            .expect("a pid");
        // SAFETY: kill(2) on the backend's pid, which rig.sh wrote.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill backend-{i} (pid {pid})");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() {
            // Reaped by its parent (`ip netns exec`, itself rig.sh's
            // orphan); a zombie counts as gone.
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if state.split_whitespace().nth(2) == Some("Z") {
                break;
            }
            assert!(Instant::now() < deadline, "backend-{i} (pid {pid}) did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The gateway's log so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Runs vipgatectl against this rig's gateway.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(workspace_bin("vipgatectl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run vipgatectl")
    }

    /// `vipgatectl --json stats`, parsed.
    pub fn stats(&self) -> serde_json::Value {
        let out = self.ctl(&["--json", "stats"]);
        assert!(out.status.success(), "vipgatectl stats failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("vipgatectl --json stats prints JSON")
    }

    /// A total drop counter by reason name.
    pub fn drops(&self, reason: &str) -> u64 {
        self.stats()["total"]["drops"][reason].as_u64().unwrap_or(0)
    }

    /// The configuration file vipgated runs with (as last written by
    /// [`Rig::start`] or [`Rig::reload`]).
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config_path).expect("read the rig's configuration")
    }

    /// The rig's generated configuration with the web service's backend list
    /// replaced by `backends`: (backend index, 1-based as in
    /// [`backend_addr`], weight), in that order. Everything else, the echo
    /// service included, is as [`Rig::start`] generated it. For
    /// [`Rig::reload`].
    pub fn config_with_web_backends(&self, backends: &[(usize, u32)]) -> String {
        self.config.render(backends)
    }

    /// Replaces the configuration file (a temporary file renamed over it),
    /// sends SIGHUP to vipgated and waits, at most 10 s, until its log has
    /// one more `configuration reloaded` line than before; returns that
    /// line. Panics, with the log, if a `reload refused` line appears
    /// instead or the deadline passes.
    pub fn reload(&self, new_text: &str) -> String {
        let pid = self.child.as_ref().expect("vipgated is running").id();
        reload_config(&self.config_path, pid, || self.log_text(), new_text)
    }

    /// `GET /whoami` through the VIP on a new connection from client source
    /// port `sport`: see [`whoami`].
    pub fn whoami(&self, sport: u16) -> Result<Whoami, String> {
        whoami(&format!("{}client", self.prefix), self.http_port, sport)
    }

    /// Starts downloading `n` bytes of `/bytes` through the VIP in the
    /// background from the client namespace: see [`start_download`].
    pub fn start_download(&self, n: u64, rate: &str, sport: u16) -> Download {
        start_download(&format!("{}client", self.prefix), &self.dir, self.http_port, n, rate, sport)
    }

    /// The rig's temporary directory (configuration, log, state), removed
    /// at teardown: for a test's own files, such as its routing daemons'.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The client's interface in the client namespace: the gateway's
    /// "client" port's tap, moved there.
    pub fn client_if(&self) -> String {
        client_if(&self.prefix)
    }

    /// Runs a command in the client namespace.
    pub fn client(&self, cmd: &[&str]) -> Output {
        self.in_namespace("client", cmd)
    }

    /// Runs a command in the backend namespace: where the backends run in
    /// nat and fullnat modes; the backend LAN (a bridge, no address) in dsr
    /// mode, where backend `i` has a namespace of its own, `b<i>` for
    /// [`Rig::in_namespace`].
    pub fn backend(&self, cmd: &[&str]) -> Output {
        self.in_namespace("backend", cmd)
    }

    /// Runs a command in the gateway's namespace, as its own kernel would
    /// (only with [`RigOptions::exception`]).
    pub fn gateway(&self, cmd: &[&str]) -> Output {
        assert!(self.exception, "the gateway has a namespace of its own only with RigOptions::exception");
        self.in_namespace("gw", cmd)
    }

    /// Runs a command in this rig's namespace `${prefix}{suffix}` (client,
    /// backend, or `b<i>` in dsr mode).
    pub fn in_namespace(&self, suffix: &str, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &format!("{}{suffix}", self.prefix)])
            .args(cmd)
            .output()
            .expect("ip netns exec")
    }

    /// Stops everything and reports what was left behind.
    pub fn teardown(mut self) -> Leftovers {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Leftovers {
        self.torn_down = true;
        let mut exit = None;
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match child.try_wait() {
                    Ok(Some(s)) => {
                        exit = Some(s);
                        break;
                    }
                    _ if Instant::now() > deadline => {
                        let _ = child.kill();
                        exit = child.wait().ok();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        let _ = Command::new(repo_root().join("scripts/rig.sh")).args(["down", "--prefix", &self.prefix]).output();
        let log = self.log_text();
        // vipgated removes its EAL runtime directory when it stops cleanly;
        // after a failure, remove what it left.
        let runtime_dir = Path::new("/var/run/dpdk").join(&self.prefix);
        let runtime_dir_left = runtime_dir.exists();
        let _ = std::fs::remove_dir_all(&runtime_dir);
        let _ = std::fs::remove_dir_all(&self.dir);

        let namespaces = String::from_utf8_lossy(
            &Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default(),
        )
        .lines()
        .filter(|l| l.starts_with(&self.prefix))
        .map(str::to_owned)
        .collect();
        let hugepage_files = std::fs::read_dir("/dev/hugepages")
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&self.prefix)))
                    .collect()
            })
            .unwrap_or_default();
        let processes = String::from_utf8_lossy(
            &Command::new("pgrep").args(["-af", &self.prefix]).output().map(|o| o.stdout).unwrap_or_default(),
        )
        .lines()
        .filter(|l| !l.contains("pgrep"))
        .map(str::to_owned)
        .collect();
        for f in &hugepage_files {
            let _ = std::fs::remove_file(f);
        }
        Leftovers { exit, namespaces, hugepage_files, processes, runtime_dir_left, log }
    }
}

/// `GET /whoami` on the VIP's port `http_port`, on a new connection from
/// source port `sport`, with curl (5 s at most) in the namespace `ns`: who
/// answered, and the peer and local addresses the backend saw.
pub fn whoami(ns: &str, http_port: u16, sport: u16) -> Result<Whoami, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sS", "--max-time", "5", "--local-port", &sport.to_string()])
        .args(["-H", "Connection: close", &format!("http://{VIP}:{http_port}/whoami")])
        .output()
        .expect("ip netns exec curl");
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!("port {sport}: {} {body:?} {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    // "backend NAME\nclient IP:PORT\nlocal IP:PORT\n"
    let field = |key: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
            .map(str::to_owned)
            .ok_or_else(|| format!("port {sport}: no {key:?} line in {body:?}"))
    };
    Ok(Whoami { sport, backend: field("backend")?, peer: field("client")?, local: field("local")? })
}

/// Starts downloading `n` bytes of `/bytes` from the VIP's port `http_port`
/// in the background: curl in the namespace `ns` from source port `sport`,
/// at most `rate` (e.g. `8M`: curl's `--limit-rate`, and the backend's own
/// pace, `&rate=`, since curl's limit alone is hidden by the socket
/// buffers for megabytes), its body piped into
/// sha256sum and its response headers written to a file in `dir` as they
/// arrive, so that [`Download::backend`] can tell who serves it while the
/// body still flows.
pub fn start_download(ns: &str, dir: &Path, http_port: u16, n: u64, rate: &str, sport: u16) -> Download {
    let headers = dir.join(format!("download-{sport}.headers"));
    let _ = std::fs::remove_file(&headers);
    let script = format!(
        "set -o pipefail; curl -sS --max-time 120 --limit-rate {rate} --local-port {sport} -H 'Connection: close' \
         -D '{headers}' -w '%{{stderr}}size=%{{size_download}} code=%{{http_code}}\\n' \
         'http://{VIP}:{http_port}/bytes?n={n}&rate={rate}' | sha256sum",
        headers = headers.display(),
    );
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "bash", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that Drop can stop curl and sha256sum
        // along with the shell.
        .process_group(0)
        .spawn()
        .expect("start the download");
    Download { child: Some(child), headers, n, started: Instant::now() }
}

/// One `/whoami` answer (see [`Rig::whoami`]).
#[derive(Clone, Debug)]
pub struct Whoami {
    /// The client source port the request was sent from.
    pub sport: u16,
    /// The answering backend's name, `backend-i`.
    pub backend: String,
    /// The peer the backend saw, `IP:PORT`.
    pub peer: String,
    /// The address the backend was reached on, `IP:PORT`.
    pub local: String,
}

/// The byte at offset i of scripts/backend.py's `/bytes` body is
/// `i % BYTES_PATTERN_MODULUS`.
pub const BYTES_PATTERN_MODULUS: usize = 251;

/// The sha256 (hex) of the first `n` bytes of backend.py's `/bytes`
/// pattern, generated here from its definition and hashed by sha256sum.
pub fn bytes_sha256(n: u64) -> String {
    let mut child =
        Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("run sha256sum");
    // A whole number of periods, so every chunk continues the pattern.
    let chunk: Vec<u8> = (0..BYTES_PATTERN_MODULUS * 256).map(|i| (i % BYTES_PATTERN_MODULUS) as u8).collect();
    let mut stdin = child.stdin.take().expect("stdin");
    let mut left = n;
    while left > 0 {
        let take = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
        stdin.write_all(&chunk[..take]).expect("write to sha256sum");
        left -= take as u64;
    }
    drop(stdin);
    let out = child.wait_with_output().expect("sha256sum");
    assert!(out.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("a digest").to_owned()
}

/// A download started by [`Rig::start_download`]. Dropping it before
/// [`Download::finish`] kills it (curl, sha256sum and their shell).
pub struct Download {
    child: Option<Child>,
    headers: PathBuf,
    /// The number of bytes asked for.
    pub n: u64,
    started: Instant,
}

/// How a [`Download`] ended.
#[derive(Clone, Debug)]
pub struct Downloaded {
    /// The sha256 (hex) of the body received.
    pub sha256: String,
    /// Bytes of body received (curl's `size_download`).
    pub size: u64,
    /// The HTTP status.
    pub code: String,
    /// From the start to the end of the download.
    pub took: Duration,
}

impl Download {
    /// The backend serving the download, from its response's `X-Backend`
    /// header; waits for the headers, at most `timeout`. Panics if they do
    /// not come or the download ends without them.
    pub fn backend(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.headers).unwrap_or_default();
            if let Some(name) = text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case("x-backend").then(|| v.trim().to_owned())
            }) {
                return name;
            }
            if !self.running() {
                let out = self.child.take().expect("the download's process").wait_with_output();
                panic!("the download ended without an X-Backend header (headers: {text:?}): {out:?}");
            }
            assert!(Instant::now() < deadline, "no X-Backend header within {timeout:?} (headers so far: {text:?})");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the download is still going.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// How long since it started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for the download to end (curl gives up after 120 s); returns
    /// what arrived, or how it failed.
    pub fn finish(mut self) -> Result<Downloaded, String> {
        let out = self.child.take().expect("the download's process").wait_with_output().expect("wait for the download");
        let took = self.started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(format!("{}: {stderr}", out.status));
        }
        let sha256 = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned();
        let line =
            stderr.lines().rev().find(|l| l.starts_with("size=")).ok_or_else(|| format!("no size in {stderr:?}"))?;
        let mut size = None;
        let mut code = String::new();
        for kv in line.split_whitespace() {
            match kv.split_once('=') {
                Some(("size", v)) => size = v.parse().ok(),
                Some(("code", v)) => v.clone_into(&mut code),
                _ => {}
            }
        }
        Ok(Downloaded { sha256, size: size.ok_or_else(|| format!("bad size in {line:?}"))?, code, took })
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                // SAFETY: kill(2) on the process group our own child leads.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            }
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.headers);
    }
}

impl Leftovers {
    /// Asserts a clean exit with every mbuf returned and nothing left over.
    pub fn assert_clean(&self) {
        assert!(self.namespaces.is_empty(), "namespaces left: {:?}", self.namespaces);
        assert!(self.hugepage_files.is_empty(), "hugepage files left: {:?}", self.hugepage_files);
        assert!(self.processes.is_empty(), "processes left: {:?}", self.processes);
        assert!(!self.runtime_dir_left, "vipgated left its EAL runtime directory behind");
        assert!(
            self.exit.is_some_and(|s| s.success()),
            "vipgated did not exit cleanly ({:?}):\n{}",
            self.exit,
            self.log
        );
        assert!(
            self.log.contains("mbuf pool at shutdown: 0 in use (at start: 0)"),
            "vipgated did not report every mbuf back in the pool:\n{}",
            self.log
        );
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if !self.torn_down {
            let left = self.shutdown();
            if !left.namespaces.is_empty() || !left.processes.is_empty() {
                eprintln!("rig {}: leftovers after a failed test: {left:?}", self.prefix);
            }
        }
    }
}
