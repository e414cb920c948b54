//! Route announcement with real routing daemons: vipgated (net_null ports)
//! runs in a gateway network namespace beside its own FRR or BIRD, started
//! on the example configuration in docs/examples/ (placeholders replaced);
//! an upstream router, FRR on docs/examples/upstream-frr.conf, runs in a
//! second namespace, joined by a veth. The tests create VIPs through the
//! API and watch the router's routing table: the VIP is learned, withdrawn
//! within the hold-down plus the BGP update time once no backend can take
//! new flows, and comes back with a backend; BFD is up on the session.
//!
//! Needs root, hugepages (or VIPGATE_HUGEPAGES=0), FRR (/usr/lib/frr) and
//! BIRD 2 (scripts/setup.sh installs both); fails loudly without. On a
//! kernel without the dummy driver the interface is an `ifb` one
//! (`[announce] kind = "ifb"`), which the routing daemons see the same way;
//! the test says which it uses.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vipgate::routing::{Bird, Frr, Netns, gateway_bird_conf, gateway_frr_conf, ok, router_frr_conf, run, wait_for};
use vipgate::{NullGateway, require_root, workspace_bin};

/// The hold-down the tests configure.
const HOLD_DOWN: Duration = Duration::from_secs(2);
/// Bound on what BGP adds to a withdrawal or an announcement here: zebra or
/// BIRD notice the address at once, and both sides send updates without
/// delay (advertisement-interval 0); measured well under a second, bounded
/// generously for a loaded machine.
const BGP_UPDATE: Duration = Duration::from_secs(5);
/// How long the first session may take to come up (connect retry is 5 s).
const SESSION_UP: Duration = Duration::from_secs(60);

const GW_ADDR: &str = "198.18.200.1";
const ROUTER_ADDR: &str = "198.18.200.2";
/// The static service "web" of every NullGateway.
const STATIC_VIP: &str = "198.18.100.1";
/// The VIP the tests create through the API.
const API_VIP: &str = "198.18.101.1";
/// A VIP outside `routing::VIP_RANGE`: on the interface, never exported.
const OUTSIDE_VIP: &str = "198.18.110.1";

/// The gateway's and the router's namespaces, joined by a veth:
/// 198.18.200.1/24 (gateway) and 198.18.200.2/24 (router). Names carry the
/// test's tag and the pid.
struct Topology {
    // Dropped in field order: the router first.
    router: Netns,
    gw: Netns,
}

impl Topology {
    fn new(tag: char) -> Topology {
        let pid = std::process::id();
        let gw = Netns::new(format!("vgann{tag}{pid}gw"));
        let router = Netns::new(format!("vgann{tag}{pid}rt"));
        let (a, b) = (format!("v{tag}{pid}g"), format!("v{tag}{pid}r"));
        ok(&["ip", "link", "add", &a, "netns", &gw.name, "type", "veth", "peer", "name", &b, "netns", &router.name]);
        for (ns, dev, addr) in [(&gw, &a, GW_ADDR), (&router, &b, ROUTER_ADDR)] {
            ok(&["ip", "-n", &ns.name, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ok(&["ip", "-n", &ns.name, "link", "set", dev, "up"]);
        }
        Topology { router, gw }
    }
}

/// `dummy` if the kernel can create one, else `ifb` (said on stderr).
fn interface_kind(ns: &Netns) -> &'static str {
    if run(&["ip", "-n", &ns.name, "link", "add", "vgprobe", "type", "dummy"]).status.success() {
        ok(&["ip", "-n", &ns.name, "link", "del", "vgprobe"]);
        "dummy"
    } else {
        eprintln!(
            "this kernel has no dummy driver: the announcement interface is an ifb one ([announce] kind = \"ifb\")"
        );
        "ifb"
    }
}

/// `vipgatectl` on the gateway's socket; must succeed.
fn ctl(gw: &NullGateway, args: &[&str]) -> String {
    let out = Command::new(workspace_bin("vipgatectl"))
        .arg("--socket")
        .arg(gw.socket())
        .args(args)
        .env_remove("VIPGATE_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vipgatectl {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metrics(ns: &Netns) -> String {
    let out = ns.exec(&["curl", "-sf", "http://127.0.0.1:9469/metrics"]);
    assert!(out.status.success(), "scrape: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A vipgated in the gateway namespace with `[announce]` on.
fn gateway(tag: &str, t: &Topology, kind: &str) -> NullGateway {
    let mut gw = NullGateway::builder(tag)
        .netns(&t.gw.name)
        .metrics_listen("127.0.0.1:9469")
        .extra_config(&format!(
            "\n[announce]\nenabled = true\nkind = \"{kind}\"\nhold_down = {}\n",
            HOLD_DOWN.as_secs_f64()
        ))
        .build();
    gw.spawn();
    gw.wait_ready(|gw| {
        Command::new(workspace_bin("vipgatectl"))
            .arg("--socket")
            .arg(gw.socket())
            .arg("list")
            .output()
            .unwrap()
            .status
            .success()
    });
    gw
}

fn router(t: &Topology, dir: PathBuf) -> Frr {
    let config = router_frr_conf(ROUTER_ADDR, &[GW_ADDR]);
    Frr::start(&t.router.name, dir, &config)
}

fn host(vip: &str) -> String {
    format!("{vip}/32")
}

/// Creates the API's services: API_VIP with two backends, and OUTSIDE_VIP
/// (outside the exported range).
fn create_services(gw: &NullGateway) {
    ctl(
        gw,
        &[
            "service",
            "create",
            "api",
            "--vip",
            API_VIP,
            "--port",
            "80",
            "--protocol",
            "tcp",
            "--backend",
            "198.18.1.21:8080",
            "--backend",
            "198.18.1.22:8080",
        ],
    );
    ctl(
        gw,
        &[
            "service",
            "create",
            "outside",
            "--vip",
            OUTSIDE_VIP,
            "--port",
            "80",
            "--protocol",
            "tcp",
            "--backend",
            "198.18.1.31:8080",
        ],
    );
}

/// Takes every backend of API_VIP out of new flows (one weight 0, one
/// removed), measures how long the router keeps the route, and checks it is
/// within [HOLD_DOWN, HOLD_DOWN + BGP_UPDATE]. Then restores a backend and
/// checks the route returns within BGP_UPDATE.
fn withdraw_and_restore(gw: &NullGateway, router: &Frr) {
    let routes = || router.bgp_routes();
    ctl(gw, &["backend", "update", "api", "198.18.1.21:8080", "--weight", "0"]);
    assert!(routes().contains(&host(API_VIP)), "one backend left: still announced");
    let t0 = Instant::now();
    ctl(gw, &["backend", "remove", "api", "198.18.1.22:8080"]);
    wait_for("the withdrawal of the API VIP", HOLD_DOWN + BGP_UPDATE + Duration::from_secs(1), || {
        !routes().contains(&host(API_VIP))
    });
    let withdrawn = t0.elapsed();
    println!(
        "route {API_VIP}/32 withdrawn at the router {:.3} s after its last backend left (hold-down {:.1} s, so {:.3} s of BGP update)",
        withdrawn.as_secs_f64(),
        HOLD_DOWN.as_secs_f64(),
        withdrawn.as_secs_f64() - HOLD_DOWN.as_secs_f64()
    );
    assert!(
        withdrawn >= HOLD_DOWN,
        "withdrawn after {withdrawn:?}, before the hold-down of {HOLD_DOWN:?}\n{}",
        router.diagnostics()
    );
    assert!(withdrawn <= HOLD_DOWN + BGP_UPDATE, "withdrawn after {withdrawn:?}");
    assert!(routes().contains(&host(STATIC_VIP)), "the other VIP stays\n{}", router.diagnostics());

    let t0 = Instant::now();
    ctl(gw, &["backend", "update", "api", "198.18.1.21:8080", "--weight", "1"]);
    wait_for("the API VIP to come back", BGP_UPDATE, || routes().contains(&host(API_VIP)));
    println!("route {API_VIP}/32 back at the router {:.3} s after a backend returned", t0.elapsed().as_secs_f64());
}

#[test]
fn frr_gateway_announces_vips_to_an_frr_router_and_withdraws_them_after_the_hold_down() {
    require_root();
    let t = Topology::new('f');
    let kind = interface_kind(&t.gw);
    let mut gw = gateway("annf", &t, kind);
    let router = router(&t, gw.dir().join("frr-router"));
    let gw_config = gateway_frr_conf("gateway", GW_ADDR, ROUTER_ADDR, "198.18.1.0/24");
    let gw_frr = Frr::start(&t.gw.name, gw.dir().join("frr-gateway"), &gw_config);

    create_services(&gw);
    let routes = || router.bgp_routes();
    wait_for("the router to learn both VIPs", SESSION_UP, || {
        routes().is_superset(&[host(STATIC_VIP), host(API_VIP)].into())
    });
    println!("router's BGP routes: {:?}", routes());
    let on_interface = t.gw.addresses("vipgate0").expect("vipgate0 exists");
    assert_eq!(on_interface, [host(STATIC_VIP), host(API_VIP), host(OUTSIDE_VIP)].into(), "vipgate0's addresses");
    assert!(!routes().contains(&host(OUTSIDE_VIP)), "a VIP outside the prefix list must not be exported");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(router.bfd_up().contains(GW_ADDR) && gw_frr.bfd_up().contains(ROUTER_ADDR)) {
        assert!(
            Instant::now() < deadline,
            "BFD not up on both sides within 20 s:\nrouter: {}\ngateway: {}",
            router.vtysh("show bfd peers"),
            gw_frr.vtysh("show bfd peers")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("{}", router.vtysh("show bfd peers brief"));
    let m = metrics(&t.gw);
    assert!(m.contains(&format!("vipgate_vip_announced{{vip=\"{API_VIP}\"}} 1")), "{m}");
    assert!(m.contains("vipgate_announce_vips 3"), "{m}");

    withdraw_and_restore(&gw, &router);

    // A flap shorter than the hold-down is not seen by the router.
    ctl(&gw, &["backend", "update", "api", "198.18.1.21:8080", "--state", "draining"]);
    let flap = Instant::now();
    std::thread::sleep(HOLD_DOWN / 4);
    ctl(&gw, &["backend", "update", "api", "198.18.1.21:8080", "--state", "enabled"]);
    while flap.elapsed() < HOLD_DOWN + Duration::from_secs(1) {
        assert!(
            routes().contains(&host(API_VIP)),
            "withdrawn during a flap shorter than the hold-down\n{}",
            router.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = metrics(&t.gw);
    assert!(m.contains(&format!("vipgate_vip_eligible{{vip=\"{API_VIP}\"}} 1")), "{m}");

    // A clean stop withdraws everything and removes the interface.
    let t0 = Instant::now();
    let status = gw.stop();
    assert!(status.success(), "vipgated: {status}\n{}", gw.log_text());
    wait_for("every route withdrawn after SIGTERM", BGP_UPDATE, || routes().is_empty());
    println!("every route withdrawn {:.3} s after SIGTERM", t0.elapsed().as_secs_f64());
    assert_eq!(t.gw.addresses("vipgate0"), None, "vipgate0 removed at shutdown");
    assert!(gw.log_text().contains("every VIP withdrawn"), "{}", gw.log_text());
}

#[test]
fn bird_gateway_announces_vips_to_an_frr_router_and_withdraws_them_after_the_hold_down() {
    require_root();
    let t = Topology::new('b');
    let kind = interface_kind(&t.gw);
    let mut gw = gateway("annb", &t, kind);
    let router = router(&t, gw.dir().join("frr-router"));
    let gw_config = gateway_bird_conf(GW_ADDR, ROUTER_ADDR);
    let bird = Bird::start(&t.gw.name, gw.dir().join("bird"), &gw_config);

    create_services(&gw);
    let routes = || router.bgp_routes();
    wait_for("the router to learn both VIPs", SESSION_UP, || {
        routes().is_superset(&[host(STATIC_VIP), host(API_VIP)].into())
    });
    println!("router's BGP routes: {:?}", routes());
    assert!(!routes().contains(&host(OUTSIDE_VIP)), "a VIP outside the filter must not be exported");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(router.bfd_up().contains(GW_ADDR) && bird.bfd_up(ROUTER_ADDR)) {
        assert!(
            Instant::now() < deadline,
            "BFD not up on both sides within 20 s:\nrouter: {}\ngateway: {}",
            router.vtysh("show bfd peers"),
            bird.birdc("show bfd sessions")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("{}", bird.birdc("show bfd sessions"));

    withdraw_and_restore(&gw, &router);

    let status = gw.stop();
    assert!(status.success(), "vipgated: {status}\n{}", gw.log_text());
    wait_for("every route withdrawn after SIGTERM", BGP_UPDATE, || routes().is_empty());
    assert_eq!(t.gw.addresses("vipgate0"), None, "vipgate0 removed at shutdown");
}

#[test]
fn announce_refuses_another_kind_of_interface_clears_stale_addresses_and_follows_reloads() {
    require_root();
    let pid = std::process::id();
    let ns = Netns::new(format!("vgannk{pid}gw"));
    let t = Topology { router: Netns::new(format!("vgannk{pid}rt")), gw: ns };
    let kind = interface_kind(&t.gw);

    // The name is taken by a veth: vipgated refuses to start, saying so.
    ok(&["ip", "-n", &t.gw.name, "link", "add", "vipgate0", "type", "veth", "peer", "name", "vipgate0p"]);
    let mut gw = NullGateway::builder("annk")
        .netns(&t.gw.name)
        .extra_config(&format!("\n[announce]\nenabled = true\nkind = \"{kind}\"\nhold_down = 0\n"))
        .build();
    gw.spawn();
    let status = gw.wait();
    assert!(!status.success(), "vipgated started on a veth named vipgate0");
    let log = gw.log_text();
    println!("veth named vipgate0: {}", log.lines().last().unwrap_or_default());
    assert!(
        log.contains(&format!(
            "interface \"vipgate0\" exists and is a veth interface, not of the configured kind \"{kind}\""
        )),
        "{log}"
    );
    assert!(t.gw.addresses("vipgate0p").is_some(), "the veth is left alone");
    ok(&["ip", "-n", &t.gw.name, "link", "del", "vipgate0"]);

    // Without CAP_NET_ADMIN (dropped from the bounding set, so the exec'd
    // vipgated lacks it although it runs as root): refused, saying so.
    let out = t.gw.exec(&[
        "setpriv",
        "--bounding-set=-net_admin",
        "--",
        workspace_bin("vipgated").to_str().unwrap(),
        "--config",
        gw.config_path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "vipgated started without CAP_NET_ADMIN: {stderr}");
    println!("without CAP_NET_ADMIN: {}", stderr.lines().last().unwrap_or_default());
    assert!(
        stderr.contains("cannot create interface \"vipgate0\": permission denied (vipgated needs CAP_NET_ADMIN"),
        "{stderr}"
    );

    // A kernel without the dummy driver: the error says so and what to do.
    if kind == "ifb" {
        let config = std::fs::read_to_string(gw.config_path()).unwrap();
        std::fs::write(gw.config_path(), config.replace("kind = \"ifb\"", "kind = \"dummy\"")).unwrap();
        let out =
            t.gw.exec(&[workspace_bin("vipgated").to_str().unwrap(), "--config", gw.config_path().to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "vipgated started with kind = \"dummy\" on a kernel without it");
        assert!(stderr.contains("this kernel has no dummy driver"), "{stderr}");
        println!("kind = \"dummy\" here: {}", stderr.lines().last().unwrap_or_default());
        assert!(stderr.contains("[announce] kind = \"ifb\""), "{stderr}");
        std::fs::write(gw.config_path(), config).unwrap();
    } else {
        println!("the kernel has the dummy driver: the no-driver error is not reachable here");
    }

    // Left over from a crash: the interface with addresses nobody wants.
    ok(&["ip", "-n", &t.gw.name, "link", "add", "vipgate0", "type", kind]);
    ok(&["ip", "-n", &t.gw.name, "addr", "add", "198.18.101.99/32", "dev", "vipgate0"]);
    ok(&["ip", "-n", &t.gw.name, "addr", "add", "198.18.7.1/24", "dev", "vipgate0"]);
    gw.spawn();
    gw.wait_ready(|gw| {
        Command::new(workspace_bin("vipgatectl"))
            .arg("--socket")
            .arg(gw.socket())
            .arg("list")
            .output()
            .unwrap()
            .status
            .success()
    });
    wait_for("vipgate0 to carry the static VIP only", Duration::from_secs(10), || {
        t.gw.addresses("vipgate0") == Some([host(STATIC_VIP)].into())
    });
    assert!(gw.log_text().contains("removed addresses left on the interface"), "{}", gw.log_text());

    // Hand edits are repaired at once (address notifications), well before
    // the 10 s resync: a VIP removed comes back, an address added goes.
    ok(&["ip", "-n", &t.gw.name, "addr", "del", &host(STATIC_VIP), "dev", "vipgate0"]);
    ok(&["ip", "-n", &t.gw.name, "addr", "add", "198.18.101.98/32", "dev", "vipgate0"]);
    let t0 = Instant::now();
    wait_for("vipgated to repair vipgate0", Duration::from_secs(3), || {
        t.gw.addresses("vipgate0") == Some([host(STATIC_VIP)].into())
    });
    println!("vipgate0 repaired {:.3} s after a hand edit", t0.elapsed().as_secs_f64());

    // The interface deleted by hand: created again with the VIP.
    ok(&["ip", "-n", &t.gw.name, "link", "del", "vipgate0"]);
    let t0 = Instant::now();
    wait_for("vipgated to create vipgate0 again", Duration::from_secs(3), || {
        t.gw.addresses("vipgate0") == Some([host(STATIC_VIP)].into())
    });
    println!("vipgate0 back {:.3} s after it was deleted by hand", t0.elapsed().as_secs_f64());

    // Reloads: another interface name moves the VIPs; off removes it.
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(gw.config_path(), config.replace("enabled = true", "enabled = true\ninterface = \"vips1\""))
        .unwrap();
    gw.signal(libc::SIGHUP);
    wait_for("the VIP to move to vips1", Duration::from_secs(10), || {
        t.gw.addresses("vips1") == Some([host(STATIC_VIP)].into()) && t.gw.addresses("vipgate0").is_none()
    });
    std::fs::write(gw.config_path(), config.replace("enabled = true", "enabled = false\ninterface = \"vips1\""))
        .unwrap();
    gw.signal(libc::SIGHUP);
    wait_for("vips1 removed", Duration::from_secs(10), || t.gw.addresses("vips1").is_none());
    let status = gw.stop();
    assert!(status.success(), "vipgated: {status}\n{}", gw.log_text());
}
