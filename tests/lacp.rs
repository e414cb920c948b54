//! An LACP bond end to end: vipgated's "client" port is a bond of two
//! net_tap members in 802.3ad mode, cabled to a partner bond of two
//! members in another namespace; many flows through the VIP use both
//! members, and a 40 MiB download survives one member's cable pulled in
//! the middle of it.
//!
//! The partner is DPDK's bonding driver in `dpdk-testpmd` (io forwarding
//! between its bond and the client's wire), in a "switch" namespace: an
//! 802.3ad state machine of its own, in another process. Not a Linux bond,
//! which would be the natural partner: kernels built without bonding (and
//! team), such as the one this test was written on, cannot make one (`ip
//! link add ... type bond` fails with "Unknown device type"), while testpmd
//! comes with DPDK, which the test needs anyway. It shows what vipgate avoids:
//! testpmd's bond sends LACPDUs only from tx bursts, which it makes only
//! when it forwards something, so a ping from the client keeps its LACP
//! alive (and before the bond converges, the client's ARP retries do);
//! vipgate's bond needs no traffic (workers make empty tx bursts on it).
//!
//! The wires. Every DPDK member is a net_tap left in the namespace its
//! process created it in: the tap PMD reads its link from the tap's flags
//! there (a tap moved to another namespace reads down for good), so a
//! member whose tap is set down reads down at once, and the bond's LACP
//! machine stops collecting and distributing on it within 100 ms (its
//! link-change event does not reach the bond in DPDK 22.11, so the bond
//! still lists it active: the test checks what matters, its LACP state and
//! the download). net_af_packet and net_pcap members would not
//! do: they report their link up whatever the interface does, so a pulled
//! cable would keep its share of the flows until LACP times out (90 s at
//! DPDK's long timeout). Each tap is joined to a veth by tc (a matchall u32
//! filter redirecting everything that enters one to the other, both ways),
//! not by a bridge, which would not forward LACPDUs (01:80:c2:00:00:02).
//! Pulling cable B sets down both its taps and its veth.
//!
//! ```text
//!  vgl{pid}g (vipgated)             vgl{pid}s (dpdk-testpmd)       vgl{pid}c
//!  bond "client" 198.18.0.1/24      bond (mode 4, l34) <-io-> tap  c0 198.18.0.2
//!   tap lga{pid} =tc= wa{pid} ---- xa{pid} =tc= tap lsa{pid}        |
//!   tap lgb{pid} =tc= wb{pid} ---- xb{pid} =tc= tap lsb{pid}   lsc{pid} =tc= xc{pid}
//!  port "backend" 198.18.1.1/24                                  vgl{pid}b
//!   tap lgk{pid} =tc= wk{pid} --------------------------------- b0 198.18.1.11
//! ```
//!
//! Needs root, hugepages (or VIPGATE_HUGEPAGES=0), tc and dpdk-testpmd;
//! fails loudly without.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vipgate::routing::{Daemon, Netns, ok, run, wait_for};
use vipgate::{NullGateway, VIP, bytes_sha256, repo_root, require_root, start_download};

const DOWNLOAD_BYTES: u64 = 40 * 1024 * 1024;
const BACKEND: &str = "198.18.1.11";
const METRICS: &str = "127.0.0.1:9473";
/// Bound on LACP converging (both sides wait 2 s before they aggregate,
/// then exchange a few LACPDUs), generous for a loaded machine.
const CONVERGE: Duration = Duration::from_secs(60);

/// Joins `a` and `b`, two interfaces of namespace `ns`, into one wire:
/// whatever enters one leaves by the other (tc ingress, mirred redirect).
fn wire(ns: &str, a: &str, b: &str) {
    for (from, to) in [(a, b), (b, a)] {
        ok(&["ip", "-n", ns, "link", "set", from, "up"]);
        // The tap PMD may have made the ingress qdisc already.
        let _ = run(&["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", from, "ingress"]);
        ok(&[
            "ip", "netns", "exec", ns, "tc", "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
            "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
        ]);
    }
}

/// Waits until interface `dev` exists in `ns` (a tap its DPDK process
/// makes at start).
fn wait_interface(ns: &str, dev: &str) {
    wait_for(&format!("{dev} in {ns}"), Duration::from_secs(30), || {
        run(&["ip", "-n", ns, "link", "show", dev]).status.success()
    });
}

fn health(gw: &NullGateway) -> serde_json::Value {
    let out = gw.ctl(&["--json", "health"]);
    assert!(out.status.success(), "vipgatectl health: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("vipgatectl --json health prints JSON")
}

/// The bond's members in `vipgatectl --json health`.
fn members(h: &serde_json::Value) -> Vec<serde_json::Value> {
    let bond = h["links"].as_array().unwrap().iter().find(|l| l["name"] == "client").cloned();
    bond.and_then(|b| b["members"].as_array().cloned()).unwrap_or_else(|| panic!("no bond members in {h}"))
}

/// Each member's (rx_packets, tx_packets).
fn member_packets(gw: &NullGateway) -> Vec<(u64, u64)> {
    members(&health(gw))
        .iter()
        .map(|m| (m["rx_packets"].as_u64().unwrap(), m["tx_packets"].as_u64().unwrap()))
        .collect()
}

/// Whether both members carry traffic, as vipgate sees its side and the
/// partner's (the partner advertises its own state in its LACPDUs).
fn both_in_use(gw: &NullGateway) -> bool {
    let m = members(&health(gw));
    m.len() == 2 && m.iter().all(|m| m["in_use"] == true)
}

fn metrics(ns: &Netns) -> String {
    let out = ns.exec(&["curl", "-sf", &format!("http://{METRICS}/metrics")]);
    assert!(out.status.success(), "scrape: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One HTTP request to the VIP from client source port `sport`; whether
/// it got a 200.
fn request(client: &Netns, sport: u16) -> bool {
    let port = sport.to_string();
    let out = client.exec(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
        "--local-port",
        &port,
        &format!("http://{VIP}/whoami"),
    ]);
    String::from_utf8_lossy(&out.stdout) == "200"
}

/// dpdk-testpmd, the partner, and its EAL runtime directory, removed once
/// it is stopped (also when the test fails).
struct Partner {
    daemon: Option<Daemon>,
    prefix: String,
}

impl Drop for Partner {
    fn drop(&mut self) {
        drop(self.daemon.take());
        let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&self.prefix));
    }
}

/// dpdk-testpmd as the partner: a mode-4 bond of two net_taps (layer 3+4
/// hash) forwarding to and from a third tap, the client's wire. Its EAL
/// files are its own (`--file-prefix`), without hugepages.
fn start_partner(ns: &Netns, pid: u32, log: &Path) -> Partner {
    let prefix = format!("vgls{pid}");
    let vdevs = [
        format!("net_tap0,iface=lsa{pid}"),
        format!("net_tap1,iface=lsb{pid}"),
        "net_bonding0,mode=4,slave=net_tap0,slave=net_tap1,xmit_policy=l34".to_owned(),
        format!("net_tap2,iface=lsc{pid}"),
    ];
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "dpdk-testpmd", "--lcores", "0@0,1@0", "--no-huge", "-m", "512"]);
    cmd.args(["--no-pci", "--file-prefix", &prefix, "--log-level", "pmd.net.bonding:info"]);
    for v in &vdevs {
        cmd.args(["--vdev", v]);
    }
    // Ports 0 and 1 are the bond's members; the bond (2) and the client's
    // tap (3) forward to each other.
    cmd.args(["--", "--forward-mode=io", "--auto-start", "--portmask=0xc", "--total-num-mbufs=8192"]);
    cmd.args(["--stats-period", "600"]);
    Partner { daemon: Some(Daemon::spawn("dpdk-testpmd", &mut cmd, log)), prefix }
}

#[test]
fn a_bond_converges_spreads_flows_over_both_members_and_survives_one_pulled() {
    require_root();
    for (tool, install) in [("tc", "iproute2"), ("dpdk-testpmd", "dpdk-dev")] {
        assert!(
            run(&["sh", "-c", &format!("command -v {tool}")]).status.success(),
            "this test needs {tool} (apt-get install {install})"
        );
    }
    let pid = std::process::id();
    let gw_ns = Netns::new(format!("vgl{pid}g"));
    let sw_ns = Netns::new(format!("vgl{pid}s"));
    let client_ns = Netns::new(format!("vgl{pid}c"));
    let backend_ns = Netns::new(format!("vgl{pid}b"));
    for ns in [&gw_ns, &sw_ns, &client_ns, &backend_ns] {
        // No IPv6 chatter (router solicitations, DAD) on the wires.
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]);
    }
    let (g, s, c, b) = (gw_ns.name.as_str(), sw_ns.name.as_str(), client_ns.name.as_str(), backend_ns.name.as_str());
    let n = |p: &str| format!("{p}{pid}");
    for (here, there, ns) in [("wa", "xa", s), ("wb", "xb", s), ("wk", "b0", b)] {
        let there = if there == "b0" { there.to_owned() } else { n(there) };
        ok(&["ip", "-n", g, "link", "add", &n(here), "type", "veth", "peer", "name", &there, "netns", ns]);
    }
    ok(&["ip", "-n", s, "link", "add", &n("xc"), "type", "veth", "peer", "name", "c0", "netns", c]);
    ok(&["ip", "-n", c, "addr", "add", "198.18.0.2/24", "dev", "c0"]);
    ok(&["ip", "-n", c, "link", "set", "c0", "up"]);
    ok(&["ip", "-n", c, "route", "add", "198.18.100.0/24", "via", "198.18.0.1"]);
    ok(&["ip", "-n", b, "addr", "add", &format!("{BACKEND}/24"), "dev", "b0"]);
    ok(&["ip", "-n", b, "link", "set", "b0", "up"]);
    ok(&["ip", "-n", b, "route", "add", "198.18.0.0/24", "via", "198.18.1.1"]);

    let mut gw = NullGateway::builder("lacp")
        // Two workers (sharing CPU 1): the bond and its members have two
        // queues each, and both workers make the bond's empty tx bursts.
        .lcores("0@0,1@1,2@1")
        .netns(g)
        .metrics_listen(METRICS)
        // Each member has rx queues of its own, filled from the pool.
        .mbufs(8191)
        .ports(&format!(
            "[[ports]]\nname = \"client\"\n\
             bond = {{ members = [\"net_tap0,iface={a}\", \"net_tap1,iface={b}\"], mode = \"802.3ad\" }}\n\
             addresses = [\"198.18.0.1/24\"]\nkernel_interface = \"\"\nuplink = true\n\n\
             [[ports]]\nname = \"backend\"\ndevice = \"net_tap2,iface={k}\"\naddresses = [\"198.18.1.1/24\"]\n\
             kernel_interface = \"\"\n",
            a = n("lga"),
            b = n("lgb"),
            k = n("lgk"),
        ))
        .services(&format!(
            "[[services]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\n\
             backends = [ {{ address = \"{BACKEND}\", port = 8080 }} ]\n"
        ))
        .build();
    gw.spawn();
    gw.wait_ready(|gw| gw.ctl(&["health"]).status.success());

    let partner_log = gw.dir().join("testpmd.log");
    let mut partner = start_partner(&sw_ns, pid, &partner_log);
    let backend_log = gw.dir().join("backend.log");
    let _backend =
        Daemon::spawn(
            "backend.py",
            Command::new("ip")
                .args(["netns", "exec", b, "python3"])
                .arg(repo_root().join("scripts/backend.py"))
                .args(["--name", "backend-1", "--bind", BACKEND, "--http-port", "8080", "--udp-port", "5353"]),
            &backend_log,
        );
    for (ns, tap, veth) in [
        (g, n("lga"), n("wa")),
        (g, n("lgb"), n("wb")),
        (g, n("lgk"), n("wk")),
        (s, n("lsa"), n("xa")),
        (s, n("lsb"), n("xb")),
        (s, n("lsc"), n("xc")),
    ] {
        wait_interface(ns, &tap);
        wire(ns, &tap, &veth);
    }
    partner.daemon.as_mut().expect("testpmd").assert_running(&partner_log);
    // Keeps the partner's tx bursts, and so its LACPDUs, going.
    let _keepalive = Daemon::spawn(
        "ping",
        Command::new("ip").args(["netns", "exec", c, "ping", "-i", "0.05", VIP]),
        &gw.dir().join("ping.log"),
    );

    // LACP converges: both members in sync, collecting and distributing on
    // both sides.
    let t0 = Instant::now();
    wait_for("both bond members in use", CONVERGE, || both_in_use(&gw));
    println!("LACP converged in {:.1} s", t0.elapsed().as_secs_f64());
    let h = health(&gw);
    println!("health: {h}");
    let bond = h["links"].as_array().unwrap().iter().find(|l| l["name"] == "client").cloned().unwrap();
    assert_eq!((bond["link"].as_str(), bond["active_members"].as_u64()), (Some("up"), Some(2)), "{h}");
    for m in members(&h) {
        for side in ["actor", "partner"] {
            let flags: Vec<&str> = m[side]["flags"].as_array().unwrap().iter().filter_map(|f| f.as_str()).collect();
            for want in ["synchronization", "collecting", "distributing"] {
                assert!(flags.contains(&want), "{side} of {} lacks {want}: {m}", m["device"]);
            }
        }
        assert_eq!(m["selection"], "selected", "{m}");
        assert_ne!(m["partner"]["system"], "00:00:00:00:00:00", "{m}");
    }
    let table = String::from_utf8_lossy(&gw.ctl(&["health"]).stdout).into_owned();
    println!("{table}");
    assert_eq!(table.lines().filter(|l| l.starts_with("client") && l.contains(" in use ")).count(), 2, "{table}");

    // Many flows: both members carry some, both ways.
    let before = member_packets(&gw);
    let served = (0..48u16).filter(|i| request(&client_ns, 41000 + i)).count();
    assert!(served >= 46, "only {served} of 48 requests through the VIP were answered");
    let after = member_packets(&gw);
    let deltas: Vec<(u64, u64)> = before.iter().zip(&after).map(|(b, a)| (a.0 - b.0, a.1 - b.1)).collect();
    println!("48 flows: (rx, tx) packets per member {deltas:?}");
    for (i, (rx, tx)) in deltas.iter().enumerate() {
        assert!(*rx >= 10 && *tx >= 10, "member {i} carried too little of 48 flows: {deltas:?}");
    }

    // A 40 MiB download; the member that carries it to the client loses
    // its cable in the middle.
    let mut download = start_download(c, gw.dir(), 80, DOWNLOAD_BYTES, "4M", 45000);
    assert_eq!(download.backend(Duration::from_secs(20)), "backend-1");
    let before = member_packets(&gw);
    std::thread::sleep(Duration::from_secs(1));
    let after = member_packets(&gw);
    let busy = usize::from(after[1].1 - before[1].1 > after[0].1 - before[0].1);
    let (tap, veth, far_tap) = if busy == 0 { ("lga", "wa", "lsa") } else { ("lgb", "wb", "lsb") };
    assert!(download.running(), "the download ended before a member could be pulled");
    println!("pulling member {busy} ({}) at {:.1} s", n(tap), download.elapsed().as_secs_f64());
    ok(&["ip", "-n", g, "link", "set", &n(tap), "down"]);
    ok(&["ip", "-n", g, "link", "set", &n(veth), "down"]);
    ok(&["ip", "-n", s, "link", "set", &n(far_tap), "down"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let last = loop {
        let last = members(&health(&gw))[busy].clone();
        // Out of the aggregate: the bond's LACP machine saw the link down
        // (its key goes to 0) and stopped collecting and distributing on
        // it. Whether the bond also drops it from its active members
        // depends on the member's link-change event reaching it.
        if last["link"] == "down" && last["in_use"] == false {
            break last;
        }
        assert!(Instant::now() < deadline, "the pulled member does not read down and out of use: {last}");
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("pulled member: {last}");
    let flags = last["actor"]["flags"].as_array().map(|f| f.iter().filter_map(|f| f.as_str()).collect::<Vec<_>>());
    assert!(flags.is_none_or(|f| !f.contains(&"distributing") && !f.contains(&"collecting")), "{last}");
    let h = health(&gw);
    let bond = h["links"].as_array().unwrap().iter().find(|l| l["name"] == "client").cloned().unwrap();
    assert_eq!(bond["link"], "up", "{h}");
    assert_eq!(members(&h)[1 - busy]["in_use"], true, "{h}");
    let done = download.finish().expect("the download completes with one member pulled");
    println!("downloaded {} bytes in {:.1} s", done.size, done.took.as_secs_f64());
    assert_eq!((done.code.as_str(), done.size), ("200", DOWNLOAD_BYTES));
    assert_eq!(done.sha256, bytes_sha256(DOWNLOAD_BYTES), "the download's content");

    // What the metrics show with one member out.
    let m = metrics(&gw_ns);
    let pulled_dev = if busy == 0 { "net_tap0" } else { "net_tap1" };
    for want in [
        format!("vipgate_bond_member_link_up{{port=\"client\",member=\"{pulled_dev}\"}} 0"),
        format!("vipgate_bond_member_in_use{{port=\"client\",member=\"{pulled_dev}\"}} 0"),
    ] {
        assert!(m.lines().any(|l| l == want), "{want} missing:\n{m}");
    }
    assert!(m.contains("vipgate_bond_active_members{port=\"client\"} "), "{m}");
    assert!(m.contains("vipgate_bond_member_lacp_partner_state{"), "{m}");
    assert!(m.contains("vipgate_bond_member_tx_packets_total{"), "{m}");

    // The cable back: LACP brings the member back into the aggregate.
    ok(&["ip", "-n", s, "link", "set", &n(far_tap), "up"]);
    ok(&["ip", "-n", g, "link", "set", &n(veth), "up"]);
    ok(&["ip", "-n", g, "link", "set", &n(tap), "up"]);
    let t0 = Instant::now();
    wait_for("both bond members in use again", CONVERGE, || both_in_use(&gw));
    println!("member back in use {:.1} s after its cable", t0.elapsed().as_secs_f64());
    assert!(gw.log_text().contains("bond member in use"), "{}", gw.log_text());

    partner.daemon.as_mut().expect("testpmd").assert_running(&partner_log);
    let status = gw.stop();
    assert!(status.success(), "vipgated: {status}\n{}", gw.log_text());
}
