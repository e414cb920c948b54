//! Jumbo frames end to end: vipgated's two ports at MTU 9000 between a
//! client and a backend namespace whose links are at 9000 too; a 20 MiB
//! download through the VIP arrives intact, and the frames that carried it
//! were jumbo frames (bytes per packet, counted by the gateway's backend
//! port and by the client's interface, far above what a 1500-byte MTU
//! allows). Also: a frame larger than a port's mbufs is dropped as
//! `multi_segment`, and a device that cannot take the MTU stops start-up
//! with the port, the MTU and the device's maximum named.
//!
//! The ports are net_pcap on veths, not net_tap: DPDK 22.11's tap driver
//! reports a 1522-byte frame limit, so ethdev refuses it any MTU above 1504
//! (the third test shows that refusal). net_pcap reports none and, on a
//! live interface, sends and receives whole frames of any size. The veths'
//! offloads are off (ethtool), so that every frame on the wire is a real
//! frame of at most the MTU with its checksums filled in, as on a NIC.
//!
//! Topology (`{pid}` = this process's pid):
//!   vgj{pid}g: vipgated, ports on gwc and gwb (veth ends, no address)
//!   vgj{pid}c: c0 198.18.0.2/24, route to the VIPs via 198.18.0.1
//!   vgj{pid}b: b0 198.18.1.11/24, backend.py on 8080; nat: route to
//!              198.18.0.0/24 via 198.18.1.1
//!
//! Needs root, hugepages (or VIPGATE_HUGEPAGES=0) and ethtool.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vipgate::{Mode, NullGateway, SOURCE_POOL_ADDR, bytes_sha256, repo_root, start_download};

const DOWNLOAD_BYTES: u64 = 20 * 1024 * 1024;
const BACKEND: &str = "198.18.1.11";
const GATEWAY_CLIENT_SIDE: &str = "198.18.0.1";
const GATEWAY_BACKEND_SIDE: &str = "198.18.1.1";

/// Runs `ip` with `args`; panics with its error unless it succeeds.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Runs `cmd` in namespace `ns`.
fn in_ns(ns: &str, cmd: &[&str]) -> Output {
    Command::new("ip").args(["netns", "exec", ns]).args(cmd).output().expect("run ip netns exec")
}

/// Runs `cmd` in namespace `ns`; panics with its output unless it succeeds.
fn ok_in(ns: &str, cmd: &[&str]) -> String {
    let out = in_ns(ns, cmd);
    assert!(
        out.status.success(),
        "{ns}: {}: {}{}",
        cmd.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The namespaces, their veths and the backend; deleted and stopped on
/// drop, also when the test fails.
struct Net {
    gw: String,
    client: String,
    backend: String,
    backend_pid: Option<i32>,
}

impl Net {
    /// The three namespaces, joined by veths of MTU `link_mtu` with their
    /// offloads off; `nat`: the backend routes the clients via the gateway.
    fn create(link_mtu: u16, nat: bool) -> Net {
        let out = Command::new("ethtool").arg("--version").output();
        assert!(
            out.is_ok_and(|o| o.status.success()),
            "this test needs ethtool (apt-get install ethtool; scripts/setup.sh installs it)"
        );
        let pid = std::process::id();
        let net = Net {
            gw: format!("vgj{pid}g"),
            client: format!("vgj{pid}c"),
            backend: format!("vgj{pid}b"),
            backend_pid: None,
        };
        let mtu = link_mtu.to_string();
        for ns in [&net.gw, &net.client, &net.backend] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            // No IPv6 chatter (router solicitations, DAD) on the links.
            ok_in(ns, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]);
        }
        for (gw_if, ns, peer) in [("gwc", &net.client, "c0"), ("gwb", &net.backend, "b0")] {
            ip(&["-n", &net.gw, "link", "add", gw_if, "mtu", &mtu, "type", "veth", "peer", "name", peer, "netns", ns]);
            ip(&["-n", ns, "link", "set", peer, "mtu", &mtu]);
            for (n, dev) in [(&net.gw, gw_if), (ns, peer)] {
                ok_in(n, &["ethtool", "-K", dev, "tx", "off", "tso", "off", "gso", "off", "gro", "off"]);
                ip(&["-n", n, "link", "set", dev, "up"]);
            }
            // The gateway's side belongs to DPDK: its kernel keeps quiet.
            ip(&["-n", &net.gw, "link", "set", gw_if, "arp", "off"]);
        }
        ip(&["-n", &net.client, "addr", "add", "198.18.0.2/24", "dev", "c0"]);
        ip(&["-n", &net.client, "route", "add", "198.18.100.0/24", "via", GATEWAY_CLIENT_SIDE]);
        ip(&["-n", &net.backend, "addr", "add", &format!("{BACKEND}/24"), "dev", "b0"]);
        if nat {
            ip(&["-n", &net.backend, "route", "add", "198.18.0.0/24", "via", GATEWAY_BACKEND_SIDE]);
        }
        net
    }

    /// Starts scripts/backend.py in the backend namespace (HTTP on 8080)
    /// and waits until it listens.
    fn start_backend(&mut self, dir: &std::path::Path) {
        let pid_file = dir.join("backend.pid");
        let log = std::fs::File::create(dir.join("backend.log")).expect("backend log");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.backend, "python3"])
            .arg(repo_root().join("scripts/backend.py"))
            .args(["--name", "backend-1", "--bind", BACKEND, "--http-port", "8080", "--udp-port", "5353"])
            .arg("--pid-file")
            .arg(&pid_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start backend.py");
        let deadline = Instant::now() + Duration::from_secs(20);
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse().ok()) {
                break pid;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("backend.py exited ({status}): {}", std::fs::read_to_string(dir.join("backend.log")).unwrap());
            }
            assert!(Instant::now() < deadline, "backend.py did not start within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        };
        self.backend_pid = Some(pid);
    }

    /// Bytes and packets received by `dev` in `ns`, from its kernel's
    /// counters.
    fn rx(&self, ns: &str, dev: &str) -> (u64, u64) {
        let read = |what: &str| -> u64 {
            ok_in(ns, &["cat", &format!("/sys/class/net/{dev}/statistics/{what}")]).trim().parse().expect("a number")
        };
        (read("rx_bytes"), read("rx_packets"))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(pid) = self.backend_pid.take() {
            // SAFETY: kill(2) on the backend's pid, which it wrote itself.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for ns in [&self.gw, &self.client, &self.backend] {
            // Deleting a namespace deletes its veth ends, and their peers.
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// A gateway in `net`'s gateway namespace, on net_pcap ports over gwc and
/// gwb at `mtu`, serving the VIP's port 80 from the backend in `mode`;
/// with `kernel`, each port has its kernel interface (named after it).
fn gateway(net: &Net, tag: &str, mtu: u16, mode: Mode, kernel: bool) -> NullGateway {
    let kernel = if kernel { "" } else { "kernel_interface = \"\"\n" };
    let (service_mode, pool) = match mode {
        Mode::Nat => (String::new(), String::new()),
        Mode::FullNat => (
            "mode = \"fullnat\"\nsource_pool = \"snat\"\n".to_owned(),
            format!(
                "[[source_pools]]\nname = \"snat\"\naddresses = [\"{SOURCE_POOL_ADDR}\"]\nports = \"20000-39999\"\n"
            ),
        ),
        Mode::Dsr => unreachable!("not tested here"),
    };
    let mut gw = NullGateway::builder(tag)
        .netns(&net.gw)
        .ports(&format!(
            "[[ports]]\nname = \"client\"\ndevice = \"net_pcap{{prefix}}c,iface=gwc\"\naddresses = [\"{GATEWAY_CLIENT_SIDE}/24\"]\n\
             mtu = {mtu}\n{kernel}\n\
             [[ports]]\nname = \"backend\"\ndevice = \"net_pcap{{prefix}}b,iface=gwb\"\naddresses = [\"{GATEWAY_BACKEND_SIDE}/24\"]\n\
             mtu = {mtu}\n{kernel}"
        ))
        .services(&format!(
            "[[services]]\nname = \"web\"\nvip = \"{}\"\nport = 80\nprotocol = \"tcp\"\n{service_mode}\
             backends = [ {{ address = \"{BACKEND}\", port = 8080 }} ]\n",
            vipgate::VIP
        ))
        .extra_config(&pool)
        .build();
    gw.spawn();
    gw.wait_ready(|g| g.ctl(&["health"]).status.success());
    gw
}

fn stats(gw: &NullGateway) -> serde_json::Value {
    let out = gw.ctl(&["--json", "stats"]);
    assert!(out.status.success(), "vipgatectl stats: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("stats JSON")
}

fn drops(stats: &serde_json::Value, reason: &str) -> u64 {
    stats["total"]["drops"][reason].as_u64().unwrap_or_else(|| panic!("no drop reason {reason} in {stats}"))
}

/// (ibytes, ipackets) of the gateway's port `name`, from its driver.
fn port_rx(stats: &serde_json::Value, name: &str) -> (u64, u64) {
    let p = stats["ports"].as_array().expect("ports").iter().find(|p| p["name"] == name).expect("the port");
    (p["ibytes"].as_u64().expect("ibytes"), p["ipackets"].as_u64().expect("ipackets"))
}

/// Pings `to` from `ns` with `size` bytes of payload, DF set; true if
/// answered.
fn ping(ns: &str, to: &str, size: u16, count: u8) -> bool {
    in_ns(
        ns,
        &[
            "ping",
            "-q",
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            &size.to_string(),
            to,
        ],
    )
    .status
    .success()
}

fn jumbo_download(mode: Mode) {
    vipgate::require_root();
    let mut net = Net::create(9000, mode == Mode::Nat);
    // nat also runs the exception path: the ports' kernel interfaces.
    let kernel = mode == Mode::Nat;
    let mut gw = gateway(&net, &format!("j{}", mode.name()), 9000, mode, kernel);
    net.start_backend(gw.dir());
    // Both sides announce themselves (the gateway learns the sender of an
    // ARP request for its address) and the gateway answers a full-size
    // echo on each port.
    assert!(ping(&net.client, GATEWAY_CLIENT_SIDE, 9000 - 28, 2), "a 9000-byte ping to the client port");
    assert!(ping(&net.backend, GATEWAY_BACKEND_SIDE, 9000 - 28, 2), "a 9000-byte ping to the backend port");

    if kernel {
        // The kernel interfaces: at most what DPDK 22.11's tap driver
        // takes (1504), and the exception path works both ways.
        for iface in ["client", "backend"] {
            let link = ok_in(&net.gw, &["ip", "-o", "link", "show", "dev", iface]);
            assert!(link.contains(" mtu 1504 "), "{iface}: {link}");
        }
        assert!(
            ping(&net.gw, "198.18.0.2", 1504 - 28, 2),
            "a full-size ping from the gateway's kernel: {}",
            stats(&gw)
        );
    }

    let before = stats(&gw);
    let client_before = net.rx(&net.client, "c0");
    let download = start_download(&net.client, gw.dir(), 80, DOWNLOAD_BYTES, "1000M", 43000);
    let result = download.finish();
    let after = stats(&gw);
    let client_after = net.rx(&net.client, "c0");
    let done = result.unwrap_or_else(|e| panic!("{} download failed: {e}\n{after}\n{}", mode.name(), gw.log_text()));
    assert_eq!((done.code.as_str(), done.size), ("200", DOWNLOAD_BYTES));
    assert_eq!(done.sha256, bytes_sha256(DOWNLOAD_BYTES), "the download's content");

    // What proves the frame size: bytes per packet. With a 1500-byte MTU
    // no frame exceeds 1514 bytes, so neither average can pass 1514.
    let (b0, p0) = port_rx(&before, "backend");
    let (b1, p1) = port_rx(&after, "backend");
    let gateway_avg = (b1 - b0) / (p1 - p0).max(1);
    let client_avg = (client_after.0 - client_before.0) / (client_after.1 - client_before.1).max(1);
    println!(
        "{}: {DOWNLOAD_BYTES} bytes in {:.1} s; backend port: {} packets, {gateway_avg} bytes each on average; \
         client c0: {} packets, {client_avg} bytes each on average",
        mode.name(),
        done.took.as_secs_f64(),
        p1 - p0,
        client_after.1 - client_before.1
    );
    assert!(gateway_avg > 6000, "the backend's frames averaged {gateway_avg} bytes: not jumbo frames\n{after}");
    assert!(client_avg > 6000, "the client's frames averaged {client_avg} bytes: not jumbo frames");
    for reason in ["multi_segment", "malformed", "too_big"] {
        assert_eq!(drops(&after, reason), 0, "{reason} drops: {after}");
    }
    let status = gw.stop();
    assert!(status.success(), "vipgated's exit ({status}): every mbuf back?\n{}", gw.log_text());
    let log = gw.log_text();
    assert!(log.contains("data_room=9344"), "the pool's mbufs hold 9216-byte frames:\n{log}");
}

#[test]
fn jumbo_a_nat_download_at_mtu_9000_uses_9000_byte_frames() {
    jumbo_download(Mode::Nat);
}

#[test]
fn jumbo_a_fullnat_download_at_mtu_9000_uses_9000_byte_frames() {
    jumbo_download(Mode::FullNat);
}

#[test]
fn jumbo_frames_larger_than_the_ports_mbufs_are_dropped_as_multi_segment() {
    vipgate::require_root();
    // The links carry 9000, the gateway's ports are at 1500: its mbufs keep
    // DPDK's default 2048 bytes, and net_pcap receives a larger frame into
    // a chain of them.
    let net = Net::create(9000, true);
    let mut gw = gateway(&net, "jseg", 1500, Mode::Nat, false);
    assert!(ping(&net.client, GATEWAY_CLIENT_SIDE, 1500 - 28, 2), "a 1500-byte ping is answered");
    let before = stats(&gw);
    assert!(!ping(&net.client, GATEWAY_CLIENT_SIDE, 8000, 3), "an 8028-byte ping must not be answered");
    let after = stats(&gw);
    let (seg, malformed) = (
        drops(&after, "multi_segment") - drops(&before, "multi_segment"),
        drops(&after, "malformed") - drops(&before, "malformed"),
    );
    println!("3 pings of 8028 bytes to a 1500-byte port: multi_segment {seg}, malformed {malformed}");
    assert_eq!((seg, malformed), (3, 0), "{after}");
    let status = gw.stop();
    assert!(status.success(), "vipgated's exit ({status}): every mbuf back?\n{}", gw.log_text());
    assert!(gw.log_text().contains("data_room=2176"), "a 1500-byte configuration keeps DPDK's default mbufs");
}

#[test]
fn jumbo_a_device_that_cannot_take_the_mtu_stops_start_up_naming_it() {
    vipgate::require_root();
    let pid = std::process::id();
    let mut gw = NullGateway::builder("jtap")
        .ports(&format!(
            "[[ports]]\nname = \"big\"\ndevice = \"net_tap_vgj{pid},iface=vgj{pid}t\"\naddresses = [\"198.18.0.1/24\"]\n\
             mtu = 9000\nkernel_interface = \"\"\n\n\
             [[ports]]\nname = \"b\"\ndevice = \"net_null{{prefix}}b,no-rx=1\"\naddresses = [\"198.18.1.1/24\"]\nkernel_interface = \"\"\n"
        ))
        .build();
    gw.spawn();
    let status = gw.wait();
    let log = gw.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    // DPDK 22.11's tap driver: 1522-byte frames, so MTU 1504 at most.
    let expected =
        format!("port \"big\": setting the MTU failed: device net_tap_vgj{pid} cannot take MTU 9000: its MTU is from ");
    assert!(log.contains(&expected) && log.contains(" to 1504 (max_mtu 65535, max_rx_pktlen 1522)"), "{log}");
}
