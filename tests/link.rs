//! Port link state with real DPDK ports and a real client: vipgated runs in
//! a gateway namespace on two net_tap ports, "client" (`uplink = true`)
//! and "backend" (not an uplink), with `[announce]` on. The client port's
//! tap stays in the gateway's namespace, bridged with a veth to a client
//! namespace: the tap PMD reads its link from the tap's flags through a
//! socket of the namespace it was created in, so a tap moved to another
//! namespace reads down for good, while one left in place reads down
//! exactly while `ip link set <tap> down` holds.
//!
//! The test takes the links down and up by hand and checks what the
//! operator sees (`vipgatectl health`, table and JSON; the metrics; the
//! log, once per change) and what the routers would see (the VIP on
//! `vipgate0`), and that the client reaches the VIP whenever the link is
//! up.
//!
//! Needs root and hugepages (or VIPGATE_HUGEPAGES=0); fails loudly without.

use std::time::{Duration, Instant};

use vipgate::routing::{Netns, ok, run, wait_for};
use vipgate::{NullGateway, VIP};

/// Longer than any wait below: a withdrawal seen within it was not held
/// down.
const HOLD_DOWN_S: u32 = 30;
/// Bound on a link change reaching vipgate0 (two reads a second, then one
/// netlink call), generous for a loaded machine.
const LINK_EFFECT: Duration = Duration::from_secs(10);
const METRICS: &str = "127.0.0.1:9471";

/// `dummy` if the kernel can create one, else `ifb`.
fn interface_kind(ns: &Netns) -> &'static str {
    if run(&["ip", "-n", &ns.name, "link", "add", "vgprobe", "type", "dummy"]).status.success() {
        ok(&["ip", "-n", &ns.name, "link", "del", "vgprobe"]);
        "dummy"
    } else {
        eprintln!("this kernel has no dummy driver: [announce] kind = \"ifb\"");
        "ifb"
    }
}

fn ctl(gw: &NullGateway, args: &[&str]) -> String {
    let out = gw.ctl(args);
    assert!(out.status.success(), "vipgatectl {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn health(gw: &NullGateway) -> serde_json::Value {
    serde_json::from_str(&ctl(gw, &["--json", "health"])).expect("vipgatectl --json health prints JSON")
}

/// The `links` entry of port `name` in `vipgatectl --json health`.
fn link_of(h: &serde_json::Value, name: &str) -> serde_json::Value {
    h["links"].as_array().unwrap().iter().find(|l| l["name"] == name).cloned().unwrap_or_else(|| panic!("{h}"))
}

fn metrics(ns: &Netns) -> String {
    let out = ns.exec(&["curl", "-sf", &format!("http://{METRICS}/metrics")]);
    assert!(out.status.success(), "scrape: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn vip_on_vipgate0(ns: &Netns) -> bool {
    ns.addresses("vipgate0").is_some_and(|a| a.contains(&format!("{VIP}/32")))
}

/// One echo request from the client to the VIP, answered by the gateway's
/// fast path.
fn ping(client: &Netns) -> bool {
    client.exec(&["ping", "-c", "1", "-W", "1", VIP]).status.success()
}

/// Log lines about port `port`'s link going `what` ("up" or "down").
fn link_lines(gw: &NullGateway, port: &str, what: &str) -> usize {
    gw.log_text()
        .lines()
        .filter(|l| l.contains(&format!("port link {what}")) && l.contains(&format!("port={port}")))
        .count()
}

#[test]
fn every_uplink_down_withdraws_the_vips_at_once_and_a_link_back_announces_them() {
    let pid = std::process::id();
    let gw_ns = Netns::new(format!("vglk{pid}gw"));
    let client_ns = Netns::new(format!("vglk{pid}cl"));
    let (client_tap, backend_tap) = (format!("lkc{pid}"), format!("lkb{pid}"));
    let kind = interface_kind(&gw_ns);
    let mut gw = NullGateway::builder("lk")
        .netns(&gw_ns.name)
        .metrics_listen(METRICS)
        .ports(&format!(
            "[[ports]]\nname = \"client\"\ndevice = \"net_tap0,iface={client_tap}\"\naddresses = [\"198.18.0.1/24\"]\n\
             kernel_interface = \"\"\nuplink = true\n\n\
             [[ports]]\nname = \"backend\"\ndevice = \"net_tap1,iface={backend_tap}\"\naddresses = [\"198.18.1.1/24\"]\n\
             kernel_interface = \"\"\n"
        ))
        .extra_config(&format!("\n[announce]\nenabled = true\nkind = \"{kind}\"\nhold_down = {HOLD_DOWN_S}\n"))
        .build();
    gw.spawn();
    gw.wait_ready(|gw| gw.ctl(&["health"]).status.success());

    // The client's wire: the tap, left in the gateway's namespace, bridged
    // with a veth whose other end is the client's interface. The tap's
    // kernel side gets a MAC of its own (net_tap gives it the port's,
    // which the bridge would then keep for itself).
    let (bridge, veth, client_if) = (format!("lkbr{pid}"), format!("lkv{pid}"), format!("lkx{pid}"));
    let g = gw_ns.name.as_str();
    ok(&["ip", "-n", g, "link", "add", &bridge, "type", "bridge"]);
    ok(&["ip", "-n", g, "link", "add", &veth, "type", "veth", "peer", "name", &client_if, "netns", &client_ns.name]);
    ok(&["ip", "-n", g, "link", "set", &client_tap, "address", "02:00:00:00:6c:01"]);
    for dev in [&client_tap, &veth] {
        ok(&["ip", "-n", g, "link", "set", dev, "master", &bridge]);
        ok(&["ip", "-n", g, "link", "set", dev, "up"]);
    }
    ok(&["ip", "-n", g, "link", "set", &bridge, "up"]);
    let c = client_ns.name.as_str();
    ok(&["ip", "-n", c, "addr", "add", "198.18.0.2/24", "dev", &client_if]);
    ok(&["ip", "-n", c, "link", "set", &client_if, "up"]);
    ok(&["ip", "-n", c, "route", "add", "198.18.100.0/24", "via", "198.18.0.1"]);

    wait_for("the VIP on vipgate0", LINK_EFFECT, || vip_on_vipgate0(&gw_ns));
    wait_for("the client to reach the VIP", LINK_EFFECT, || ping(&client_ns));
    let h = health(&gw);
    println!("health with every link up: {h}");
    let client = link_of(&h, "client");
    assert_eq!((client["link"].as_str(), client["uplink"].as_bool()), (Some("up"), Some(true)), "{h}");
    assert_eq!(link_of(&h, "backend")["uplink"], false, "{h}");
    assert_eq!(h["uplinks_down"], false, "{h}");

    // A port that does not reach the routers going down changes nothing
    // in the announcement.
    ok(&["ip", "-n", g, "link", "set", &backend_tap, "down"]);
    wait_for("the backend port's link to read down", LINK_EFFECT, || {
        link_of(&health(&gw), "backend")["link"] == "down"
    });
    assert!(vip_on_vipgate0(&gw_ns), "withdrawn for a port that is not an uplink");
    assert_eq!(health(&gw)["uplinks_down"], false);

    // The only uplink goes down: the VIP leaves vipgate0 at once, not
    // after the hold-down.
    let t0 = Instant::now();
    ok(&["ip", "-n", g, "link", "set", &client_tap, "down"]);
    wait_for("the VIP to leave vipgate0", LINK_EFFECT, || !vip_on_vipgate0(&gw_ns));
    println!(
        "VIP withdrawn {:.3} s after the uplink went down (hold-down {HOLD_DOWN_S} s)",
        t0.elapsed().as_secs_f64()
    );
    let h = health(&gw);
    assert_eq!(link_of(&h, "client")["link"], "down", "{h}");
    assert_eq!((h["uplinks_down"].as_bool(), h["serving"].as_bool()), (Some(true), Some(true)), "{h}");
    let table = ctl(&gw, &["health"]);
    println!("{table}");
    assert!(table.contains("uplinks  all down: no VIP is announced"), "{table}");
    assert!(
        table.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["client", "down", "-", "-", "yes"]),
        "{table}"
    );
    let m = metrics(&gw_ns);
    for want in [
        "vipgate_port_link_up{port=\"client\"} 0",
        "vipgate_port_link_up{port=\"backend\"} 0",
        "vipgate_port_uplink{port=\"client\"} 1",
        "vipgate_uplinks_down 1",
        &format!("vipgate_vip_announced{{vip=\"{VIP}\"}} 0"),
        // Only the announcement changed: the VIP keeps its backend.
        &format!("vipgate_vip_eligible{{vip=\"{VIP}\"}} 1"),
    ] {
        assert!(m.lines().any(|l| l == want), "{want} missing:\n{m}");
    }
    assert!(!ping(&client_ns), "the client reached the VIP over a link that is down");
    assert!(ctl(&gw, &["list"]).contains(VIP), "the service is kept");

    // Further reads of the same link log nothing more.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(link_lines(&gw, "client", "down"), 1, "{}", gw.log_text());
    assert_eq!(link_lines(&gw, "backend", "down"), 1, "{}", gw.log_text());
    assert!(!vip_on_vipgate0(&gw_ns));

    // The link is back: so is the VIP, and the client reaches it.
    let t0 = Instant::now();
    ok(&["ip", "-n", g, "link", "set", &client_tap, "up"]);
    wait_for("the VIP back on vipgate0", LINK_EFFECT, || vip_on_vipgate0(&gw_ns));
    println!("VIP announced {:.3} s after the uplink came back", t0.elapsed().as_secs_f64());
    let h = health(&gw);
    assert_eq!((link_of(&h, "client")["link"].as_str(), h["uplinks_down"].as_bool()), (Some("up"), Some(false)), "{h}");
    assert!(metrics(&gw_ns).lines().any(|l| l == "vipgate_uplinks_down 0"));
    wait_for("the client to reach the VIP again", LINK_EFFECT, || ping(&client_ns));
    // At start, and once back.
    assert_eq!(link_lines(&gw, "client", "up"), 2, "{}", gw.log_text());
    let log = gw.log_text();
    assert_eq!(log.matches("every uplink port is down").count(), 1, "{log}");
    assert_eq!(log.matches("an uplink port is up").count(), 1, "{log}");

    let status = gw.stop();
    assert!(status.success(), "vipgated: {status}\n{}", gw.log_text());
}
