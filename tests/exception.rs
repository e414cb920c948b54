//! The exception path end to end: vipgated with a kernel interface per port
//! (net_tap devices in its own namespace, `${prefix}gw`, holding the ports'
//! MACs and addresses), between the client and backend namespaces of
//! scripts/rig.sh, with real kernel TCP stacks on both sides.
//!
//! - A plain TCP service (socat, an echo) listening on the gateway's kernel
//!   address 198.18.0.1:2222 answers the client, both ways, while a large
//!   download runs through the VIP on the fast path; the download arrives
//!   intact, the punt counters moved, and the packet accounting still adds
//!   up.
//! - The gateway's kernel reaches a backend (curl, as a health probe will)
//!   and pings the client (its own ARP through the exception path); static
//!   routes are installed in the kernel and follow a reload.
//! - Starting with a kernel interface name that is taken fails naming the
//!   field; after SIGKILL the kernel interfaces are gone, so the next start
//!   works.
//!
//! Needs root and hugepages (or VIPGATE_HUGEPAGES=0), socat, curl, ping.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use vipgate::{CLIENT_ADDR, Rig, RigOptions, backend_addr, bytes_sha256, require_root, use_hugepages, workspace_bin};

const GATEWAY_CLIENT_ADDR: &str = "198.18.0.1";
const ECHO_PORT: u16 = 2222;
const DOWNLOAD_BYTES: u64 = 40 * 1024 * 1024;
const DOWNLOAD_SOURCE_PORT: u16 = 43000;

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A process in a namespace, killed (with its group) when dropped.
struct Background(Child);

impl Background {
    fn spawn(ns: &str, cmd: &[&str]) -> Background {
        use std::os::unix::process::CommandExt;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn a background process");
        Background(child)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group our own child leads.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// A total counter from `vipgatectl --json stats`.
fn total(stats: &serde_json::Value, name: &str) -> u64 {
    stats["total"][name].as_u64().unwrap_or_else(|| panic!("no total.{name} in {stats}"))
}

/// Sends `n` bytes to the echo service on the gateway's kernel address from
/// the client namespace and checks that the same bytes come back.
fn echo_round_trip(rig: &Rig, n: usize, tag: &str) {
    let path = std::env::temp_dir().join(format!("vipgate-echo-{}-{tag}", rig.prefix));
    let data: Vec<u8> = (0..n).map(|i| ((i as u64).wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    std::fs::write(&path, &data).expect("write the echo payload");
    let script = format!(
        "socat -t 10 -T 20 - TCP:{GATEWAY_CLIENT_ADDR}:{ECHO_PORT},connect-timeout=5 < '{}' | sha256sum; sha256sum < '{}'",
        path.display(),
        path.display()
    );
    let out = rig.client(&["bash", "-c", &script]);
    let _ = std::fs::remove_file(&path);
    let text = ok(&out, &format!("echo round trip {tag}"));
    let sums: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(sums.len(), 2, "two digests expected: {text:?}");
    assert_eq!(sums[0], sums[1], "round trip {tag}: {n} bytes sent to the kernel's echo service came back changed");
}

/// Reads the stats until two readings a moment apart agree (the workers are
/// idle), then checks the accounting identity of the total.
fn settled_stats(rig: &Rig) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = rig.stats();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = rig.stats();
        if now["total"] == last["total"] {
            return now;
        }
        assert!(Instant::now() < deadline, "the counters never settled: {now}");
        last = now;
    }
}

/// The accounting identity, per worker (with hand-offs) and in total.
fn assert_accounting(stats: &serde_json::Value) {
    let get = |c: &serde_json::Value, name: &str| c[name].as_u64().unwrap_or_else(|| panic!("no {name} in {c}"));
    let drops = |c: &serde_json::Value| -> u64 {
        c["drops"].as_object().expect("drops").values().map(|v| v.as_u64().unwrap()).sum()
    };
    for w in stats["workers"].as_array().expect("workers") {
        let inflow = get(w, "rx_packets")
            + get(w, "arp_requests")
            + get(w, "fragments_released")
            + get(w, "handoff_in")
            + get(w, "from_kernel");
        let outflow =
            get(w, "tx_packets") + drops(w) + get(w, "consumed") + get(w, "handoff_out") + get(w, "to_kernel");
        assert_eq!(
            inflow, outflow,
            "worker: rx + arp_requests + fragments_released + handoff_in + from_kernel != tx + drops + consumed + handoff_out + to_kernel: {w}"
        );
    }
    let t = &stats["total"];
    let inflow = get(t, "rx_packets") + get(t, "arp_requests") + get(t, "fragments_released") + get(t, "from_kernel");
    let outflow = get(t, "tx_packets") + drops(t) + get(t, "consumed") + get(t, "to_kernel");
    assert_eq!(
        inflow, outflow,
        "rx + arp_requests + fragments_released + from_kernel != tx + drops + consumed + to_kernel: {stats}"
    );
}

#[test]
fn a_tcp_service_on_the_gateway_kernel_address_works_while_the_fast_path_carries_a_download() {
    tcp_service_during_a_download("0,1");
}

/// The same with two workers (on one CPU): punts come from both, and the
/// kernel's frames go out through the worker its interface is assigned to.
#[test]
fn a_tcp_service_on_the_gateway_kernel_address_works_with_two_workers() {
    tcp_service_during_a_download("0@0,1@1,2@1");
}

fn tcp_service_during_a_download(lcores: &str) {
    let rig = Rig::start(RigOptions { exception: true, lcores: lcores.to_owned(), ..RigOptions::default() });

    // The kernel interfaces: the ports' MACs and addresses, up.
    let stats = rig.stats();
    let ports = stats["ports"].as_array().expect("ports");
    for (port, iface, addr) in [("client", "client", "198.18.0.1/24"), ("backend", "backend", "198.18.1.1/24")] {
        let mac = ports.iter().find(|p| p["name"] == port).expect("port in stats")["mac"]
            .as_str()
            .expect("mac")
            .to_ascii_lowercase();
        let link = ok(&rig.gateway(&["ip", "-br", "link", "show", "dev", iface]), "ip link show");
        assert!(link.contains(&mac), "{iface} should have port {port}'s MAC {mac}: {link}");
        assert!(link.contains("UP"), "{iface} should be up: {link}");
        let a = ok(&rig.gateway(&["ip", "-br", "-4", "addr", "show", "dev", iface]), "ip addr show");
        assert!(a.contains(addr), "{iface} should hold {addr}: {a}");
    }

    let before = rig.stats();
    let echo = Background::spawn(
        &format!("{}gw", rig.prefix),
        &["socat", &format!("TCP-LISTEN:{ECHO_PORT},bind={GATEWAY_CLIENT_ADDR},reuseaddr,fork"), "EXEC:cat"],
    );
    // Wait for the listener.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok(&rig.gateway(&["ss", "-Hltn"]), "ss").contains(&format!("{GATEWAY_CLIENT_ADDR}:{ECHO_PORT}")) {
        assert!(Instant::now() < deadline, "the echo service did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A download at a bounded rate, so that it runs the whole time.
    let mut download = rig.start_download(DOWNLOAD_BYTES, "10M", DOWNLOAD_SOURCE_PORT);
    let backend = download.backend(Duration::from_secs(10));
    let mut during = 0;
    for (i, n) in [1000usize, 200_000, 1_000_000, 64].into_iter().enumerate() {
        let running = download.running();
        echo_round_trip(&rig, n, &i.to_string());
        if running && download.running() {
            during += 1;
        }
    }
    assert!(
        during >= 2,
        "only {during} round trips happened while the download ran; it was too short to prove anything"
    );
    let done = download.finish().expect("the download through the VIP");
    assert_eq!(done.code, "200");
    assert_eq!(done.size, DOWNLOAD_BYTES, "download size");
    assert_eq!(done.sha256, bytes_sha256(DOWNLOAD_BYTES), "the download from {backend} arrived corrupted");
    drop(echo);

    let after = settled_stats(&rig);
    let moved = |name: &str| total(&after, name) - total(&before, name);
    // At least the 1.2 MB echoed each way, in packets of at most 1500 bytes.
    assert!(moved("to_kernel") > 800, "to_kernel moved by only {}: {after}", moved("to_kernel"));
    assert!(moved("from_kernel") > 800, "from_kernel moved by only {}: {after}", moved("from_kernel"));
    assert!(moved("to_kernel_bytes") > 1_200_000, "to_kernel_bytes: {after}");
    assert!(moved("from_kernel_bytes") > 1_200_000, "from_kernel_bytes: {after}");
    // The download's data comes back from the backend (nat_reverse), the
    // client's ACKs go to it (nat_forward).
    assert!(moved("nat_reverse") > DOWNLOAD_BYTES / 1500, "the download's packets went through the fast path: {after}");
    assert_eq!(rig.drops("punt_full"), 0, "nothing this light should fill the way to the kernel: {after}");
    assert_eq!(rig.drops("local"), 0, "with kernel interfaces nothing is dropped as local: {after}");
    assert_accounting(&after);
    println!(
        "download {} bytes intact in {:?} from {backend}; to_kernel +{} from_kernel +{}",
        done.size,
        done.took,
        moved("to_kernel"),
        moved("from_kernel")
    );
    rig.teardown().assert_clean();
}

#[test]
fn the_gateway_kernel_reaches_backends_and_clients_through_the_exception_path() {
    let route = "\n[[routes]]\nprefix = \"198.19.0.0/16\"\nvia = \"198.18.1.11\"\n";
    let rig = Rig::start(RigOptions { exception: true, extra_config: route.to_owned(), ..RigOptions::default() });

    // A health probe's path: the kernel to a backend behind the backend port.
    let body = ok(
        &rig.gateway(&["curl", "-sS", "--max-time", "5", &format!("http://{}:8080/whoami", backend_addr(1))]),
        "curl from the gateway's kernel to backend-1",
    );
    assert!(body.contains("backend backend-1"), "backend-1 should answer: {body:?}");
    assert!(body.contains("client 198.18.1.1:"), "backend-1 should see the gateway's kernel address: {body:?}");

    // The kernel resolves the client itself (ARP out through the exception
    // path, the reply punted back) and its pings get their replies.
    let ping = ok(&rig.gateway(&["ping", "-c", "3", "-i", "0.2", "-W", "2", CLIENT_ADDR]), "ping the client");
    assert!(ping.contains("3 received"), "{ping}");
    let neigh = ok(&rig.gateway(&["ip", "neigh", "show", CLIENT_ADDR]), "ip neigh");
    assert!(neigh.contains("lladdr"), "the gateway's kernel should have resolved the client: {neigh}");
    // Pings to the gateway are still the fast path's.
    let echo_before = total(&rig.stats(), "icmp_echo_replies");
    ok(&rig.client(&["ping", "-c", "2", "-i", "0.2", "-W", "2", GATEWAY_CLIENT_ADDR]), "ping the gateway");
    assert!(total(&rig.stats(), "icmp_echo_replies") >= echo_before + 2, "the fast path answers pings");

    // The static route is the kernel's too, and follows a reload.
    let routes = ok(&rig.gateway(&["ip", "route", "show", "198.19.0.0/16"]), "ip route");
    assert!(routes.contains("via 198.18.1.11 dev backend"), "the kernel should have the static route: {routes:?}");
    let without = rig.config_text().replace(route.trim_start_matches('\n'), "");
    assert!(!without.contains("[[routes]]"), "the route should be gone from:\n{without}");
    rig.reload(&without);
    let routes = ok(&rig.gateway(&["ip", "route", "show", "198.19.0.0/16"]), "ip route");
    assert!(routes.trim().is_empty(), "the reload removed the route; the kernel should not keep it: {routes:?}");

    let stats = settled_stats(&rig);
    assert!(total(&stats, "from_kernel") > 0 && total(&stats, "to_kernel") > 0, "{stats}");
    assert_accounting(&stats);
    rig.teardown().assert_clean();
}

/// A vipgated on net_null ports in a namespace of its own, killed, and its
/// namespace, EAL runtime directory and hugepage files removed on drop.
struct Lone {
    ns: String,
    prefix: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Lone {
    fn new() -> Lone {
        require_root();
        let prefix = format!("vgexc{}", std::process::id());
        let ns = format!("{prefix}ns");
        let dir = std::env::temp_dir().join(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        ok(&Command::new("ip").args(["netns", "add", &ns]).output().expect("ip"), "ip netns add");
        let lone = Lone { ns, prefix, dir, child: None };
        let config = format!(
            r#"[eal]
lcores = "0,1"
hugepages = {huge}
file_prefix = "{prefix}"

[dataplane]
idle_sleep_us = 50
mbufs = 4095

[api]
socket = "{socket}"

[metrics]
listen = ""

[state]
dir = "{state}"

[[ports]]
name = "a"
device = "net_null{prefix}a,no-rx=1"
addresses = ["198.18.0.1/24"]

[[ports]]
name = "b"
device = "net_null{prefix}b,no-rx=1"
addresses = ["198.18.1.1/24"]
kernel_interface = "gwb"
"#,
            huge = use_hugepages(),
            prefix = lone.prefix,
            socket = lone.dir.join("api.sock").display(),
            state = lone.dir.join("state").display(),
        );
        std::fs::write(lone.dir.join("vipgated.toml"), config).expect("write config");
        lone
    }

    fn ip(&self, args: &[&str]) -> Output {
        Command::new("ip").args(["-n", &self.ns]).args(args).output().expect("ip")
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("vipgated.log")).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(workspace_bin("vipgated"))
            .arg("--config")
            .arg(self.dir.join("vipgated.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn vipgated");
        self.child = Some(child);
    }

    fn log(&self) -> String {
        let mut s = String::new();
        let _ = std::fs::File::open(self.dir.join("vipgated.log")).and_then(|mut f| f.read_to_string(&mut s));
        s
    }

    /// Waits for vipgated to exit; its status.
    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let pid = child.id();
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                self.child = None;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "vipgated did not exit within {within:?}:\n{}\n{}",
                self.log(),
                vipgate::thread_stacks(pid)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the log says vipgated is ready.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().contains("vipgated ready") {
            if let Some(s) = self.child.as_mut().and_then(|c| c.try_wait().expect("wait")) {
                panic!("vipgated exited ({s}) before it was ready:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "vipgated not ready within 30 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("running").id();
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
    }

    fn interface_exists(&self, name: &str) -> bool {
        self.ip(&["link", "show", "dev", name]).status.success()
    }
}

impl Drop for Lone {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
        if let Ok(d) = std::fs::read_dir("/dev/hugepages") {
            for e in d.filter_map(Result::ok) {
                if e.file_name().to_string_lossy().starts_with(&self.prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if std::thread::panicking() {
            eprintln!("vipgated log kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[test]
fn a_taken_kernel_interface_name_stops_the_start_and_a_crash_leaves_no_interface_behind() {
    let mut gw = Lone::new();

    // The default name of port "a" is taken by another interface.
    ok(&gw.ip(&["tuntap", "add", "dev", "a", "mode", "tap"]), "ip tuntap add");
    gw.spawn();
    let status = gw.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "vipgated should refuse to start:\n{}", gw.log());
    let log = gw.log();
    assert!(
        log.contains(r#"port "a": kernel interface "a" already exists"#),
        "the error should name the port and the interface (vipgated ended with {status}):\n{log}"
    );
    assert_eq!(status.code(), Some(1), "a start-up error exits with status 1:\n{log}");
    assert!(!gw.interface_exists("gwb"), "a failed start leaves no kernel interface behind:\n{log}");
    ok(&gw.ip(&["tuntap", "del", "dev", "a", "mode", "tap"]), "ip tuntap del");

    // Now it starts, with both kernel interfaces.
    gw.spawn();
    gw.wait_ready();
    assert!(gw.interface_exists("a") && gw.interface_exists("gwb"), "kernel interfaces:\n{}", gw.log());
    let a = String::from_utf8_lossy(&gw.ip(&["-br", "-4", "addr", "show", "dev", "gwb"]).stdout).into_owned();
    assert!(a.contains("198.18.1.1/24"), "gwb should hold port b's address: {a}");

    // SIGKILL: the kernel removes the interfaces with the process.
    gw.signal(libc::SIGKILL);
    gw.wait_exit(Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.interface_exists("a") || gw.interface_exists("gwb") {
        assert!(Instant::now() < deadline, "kernel interfaces left after SIGKILL");
        std::thread::sleep(Duration::from_millis(50));
    }

    // So the next start works, and a clean stop removes them too.
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", gw.prefix));
    gw.spawn();
    gw.wait_ready();
    assert!(gw.interface_exists("a"), "restart after a crash:\n{}", gw.log());
    gw.signal(libc::SIGTERM);
    let status = gw.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "clean stop:\n{}", gw.log());
    assert!(!gw.interface_exists("a") && !gw.interface_exists("gwb"), "kernel interfaces left after a clean stop");
}
