//! Path MTU discovery through the gateway: a router with a 1280-byte link
//! sits between the client and the gateway, the client advertises a
//! 1500-byte path (its own link's MTU), and a 20 MiB download from a nat
//! and from a fullnat backend completes only if the router's ICMP
//! "fragmentation needed", sent to the VIP, reaches the backend translated
//! (the backend's own tuple inside; `pipeline/tests/icmp_errors.rs` reads
//! the translated error back byte by byte).
//!
//! Topology: the rig's client namespace becomes the router (forwarding on),
//! joined by a veth to a namespace of the test's own, the far client
//! 198.18.5.2/24, whose side of the veth has MTU 1500 and the router's
//! 1280. The gateway routes 198.18.5.0/24 via the router (198.18.0.2).
//!
//! Needs root and hugepages (or VIPGATE_HUGEPAGES=0), like the other rig
//! tests.

use std::process::Command;

use vipgate::{CLIENT_ADDR, Mode, Rig, RigOptions, start_download};

const FAR_NET: &str = "198.18.5.0/24";
const ROUTER_SIDE: &str = "198.18.5.1";
const FAR_CLIENT: &str = "198.18.5.2";
const DOWNLOAD_BYTES: u64 = 20 * 1024 * 1024;

/// Runs `ip` with `args`; panics with its error unless it succeeds.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// The far client's namespace, deleted (with its veth) on drop.
struct Far {
    ns: String,
}

impl Far {
    /// The far client behind the rig's client namespace, which routes for
    /// it over a link whose router side has MTU 1280.
    fn start(rig: &Rig) -> Far {
        let pid = std::process::id();
        let far = Far { ns: format!("vgpmtu{pid}") };
        let router_ns = format!("{}client", rig.prefix);
        let (a, b) = (format!("vgpr{pid}"), format!("vgpf{pid}"));
        ip(&["netns", "add", &far.ns]);
        ip(&["link", "add", &a, "netns", &router_ns, "type", "veth", "peer", "name", &b, "netns", &far.ns]);
        ip(&["-n", &router_ns, "link", "set", &a, "mtu", "1280", "up"]);
        ip(&["-n", &router_ns, "addr", "add", &format!("{ROUTER_SIDE}/24"), "dev", &a]);
        ip(&["-n", &far.ns, "link", "set", &b, "mtu", "1500", "up"]);
        ip(&["-n", &far.ns, "link", "set", "lo", "up"]);
        ip(&["-n", &far.ns, "addr", "add", &format!("{FAR_CLIENT}/24"), "dev", &b]);
        ip(&["-n", &far.ns, "route", "add", "default", "via", ROUTER_SIDE]);
        let out = rig.client(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        assert!(out.status.success(), "ip_forward: {}", String::from_utf8_lossy(&out.stderr));
        far
    }
}

impl Drop for Far {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.ns]).status();
    }
}

fn icmp_errors_forwarded(rig: &Rig) -> u64 {
    rig.stats()["total"]["icmp_errors_forwarded"].as_u64().expect("icmp_errors_forwarded in vipgatectl --json stats")
}

fn path_mtu_discovery_works_through(mode: Mode) {
    let rig = Rig::start(RigOptions {
        mode,
        extra_config: format!("\n[[routes]]\nprefix = \"{FAR_NET}\"\nvia = \"{CLIENT_ADDR}\"\n"),
        ..Default::default()
    });
    if mode == Mode::Nat {
        // nat backends answer the client's own address: through the gateway.
        let out = rig.backend(&["ip", "route", "replace", FAR_NET, "via", "198.18.1.1"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let far = Far::start(&rig);
    let before = icmp_errors_forwarded(&rig);
    let download = start_download(&far.ns, rig.dir(), rig.http_port, DOWNLOAD_BYTES, "200M", 41000);
    let result = download.finish();
    let after = icmp_errors_forwarded(&rig);
    let stats = rig.stats()["total"].clone();
    let router_mtu = rig.client(&["ip", "-o", "link", "show", &format!("vgpr{}", std::process::id())]);
    drop(far);
    let left = rig.teardown();
    println!("{}", String::from_utf8_lossy(&router_mtu.stdout).trim());
    let done = result.unwrap_or_else(|e| {
        panic!(
            "{} download through a 1280-byte link failed: {e}\nicmp_errors_forwarded {before} -> {after}\n{stats}\n{}",
            mode.name(),
            left.log
        )
    });
    println!(
        "{}: {DOWNLOAD_BYTES} bytes through a 1280-byte link in {:.1} s; icmp_errors_forwarded {}",
        mode.name(),
        done.took.as_secs_f64(),
        after - before
    );
    assert_eq!((done.code.as_str(), done.size), ("200", DOWNLOAD_BYTES));
    assert_eq!(done.sha256, vipgate::bytes_sha256(DOWNLOAD_BYTES), "the download's content");
    assert!(after > before, "no fragmentation-needed error reached a backend, yet the download passed: {stats}");
    assert_eq!(stats["drops"]["icmp_no_flow"].as_u64(), Some(0), "every error matched its flow: {stats}");
    left.assert_clean();
}

#[test]
fn pmtu_a_nat_download_through_a_smaller_mtu_completes() {
    path_mtu_discovery_works_through(Mode::Nat);
}

#[test]
fn pmtu_a_fullnat_download_through_a_smaller_mtu_completes() {
    path_mtu_discovery_works_through(Mode::FullNat);
}
