//! Route announcement and health checks together, over the exception path:
//! a real vipgated (net_tap ports, its kernel interfaces in its own
//! namespace `${prefix}gw`) between the rig's client and backend
//! namespaces, with its own routing daemon (FRR on docs/examples/frr.conf,
//! or BIRD on docs/examples/bird.conf) in that namespace, and the client
//! namespace as the upstream router (FRR on docs/examples/upstream-frr.conf),
//! peering with the gateway's kernel address 198.18.0.1 on the client LAN.
//! The client has no static route to the VIPs (rig.sh `--no-vip-route`): it
//! reaches the VIP only through the route it learns.
//!
//! BGP and BFD run between the two kernels through the DPDK ports: the
//! router's packets to 198.18.0.1 are punted to the gateway's kernel as
//! control traffic, the gateway daemon's packets leave through the port.
//! The services on the VIP have health checks, sent by vipgated from the
//! same kernel through the backend port. Stopping every backend marks them
//! down, and the VIP is withdrawn at the router after the hold-down plus
//! the BGP update time; one backend back, the route returns and the client
//! reaches the VIP through it again.
//!
//! Needs root, hugepages (or VIPGATE_HUGEPAGES=0), FRR (/usr/lib/frr) and,
//! for the BIRD test, BIRD 2 (scripts/setup.sh installs both); fails loudly
//! without. The kernel here has no dummy driver: the announcement interface
//! is an `ifb` one (`[announce] kind = "ifb"`).

use std::time::{Duration, Instant};

use vipgate::routing::{Bird, Frr, gateway_bird_conf, gateway_frr_conf, router_frr_conf};
use vipgate::{CLIENT_ADDR, Rig, RigOptions, VIP};

/// The hold-down the tests configure.
const HOLD_DOWN: Duration = Duration::from_secs(2);
/// Bound on what BGP adds to a withdrawal or an announcement (both sides
/// send updates at once, advertisement-interval 0; measured well under a
/// second, bounded generously for a loaded machine).
const BGP_UPDATE: Duration = Duration::from_secs(5);
/// How long the session may take to come up (connect retry is 5 s).
const SESSION_UP: Duration = Duration::from_secs(60);
/// How early, at most, the withdrawal may be seen against the moment the
/// test saw every backend down: the hold-down starts when vipgated marks
/// the last one down, a little before the test's poll of GetState sees it.
const POLL_SKEW: Duration = Duration::from_millis(300);

const INTERVAL_MS: u64 = 200;
const TIMEOUT_MS: u64 = 100;
const RISE: u64 = 2;
const FALL: u64 = 2;
/// Scheduling on a loaded machine, the API and the publication.
const SLACK: Duration = Duration::from_millis(1000);

/// The gateway's kernel address on the client LAN: the BGP peer.
const GW_ADDR: &str = "198.18.0.1";
/// The router: the client namespace.
const ROUTER_ADDR: &str = CLIENT_ADDR;
const BACKENDS: usize = 3;

/// The gateway's routing daemon.
enum GatewayDaemon {
    Frr(Frr),
    Bird(Bird),
}

impl GatewayDaemon {
    fn bfd_up(&self) -> bool {
        match self {
            GatewayDaemon::Frr(f) => f.bfd_up().contains(ROUTER_ADDR),
            GatewayDaemon::Bird(b) => b.bfd_up(ROUTER_ADDR),
        }
    }

    fn diagnostics(&self) -> String {
        match self {
            GatewayDaemon::Frr(f) => f.diagnostics(),
            GatewayDaemon::Bird(b) => {
                format!("{}\n{}", b.birdc("show protocols all upstream1"), b.birdc("show bfd sessions"))
            }
        }
    }
}

fn host(vip: &str) -> String {
    format!("{vip}/32")
}

fn stdout(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The health of every backend of the services on the VIP (web and echo),
/// from GetState.
fn vip_health(rig: &Rig) -> Vec<String> {
    let state: serde_json::Value =
        serde_json::from_str(&stdout(&rig.ctl(&["--json", "list"]), "vipgatectl list")).expect("JSON");
    state["services"]
        .as_array()
        .expect("services")
        .iter()
        .filter(|s| s["vip"] == VIP)
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .map(|b| b["health"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// Polls `done` every 20 ms; returns when it became true, or panics after
/// `timeout` with `what` and the diagnostics.
fn wait_until(what: &str, timeout: Duration, diag: impl Fn() -> String, mut done: impl FnMut() -> bool) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}\n{}", diag());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The client's kernel route to the VIP (`ip -j route show VIP/32`): the
/// one its FRR installed from BGP, if any.
fn client_route(rig: &Rig) -> Option<serde_json::Value> {
    let out = stdout(&rig.client(&["ip", "-j", "route", "show", &host(VIP)]), "ip route show");
    let routes: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Null);
    routes.as_array().and_then(|a| a.first().cloned())
}

fn announce_over_the_exception_path(with_bird: bool) {
    let check = |kind: &str, lines: &str| {
        format!(
            "kind = \"{kind}\"\n{lines}\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = {RISE}\nfall = {FALL}"
        )
    };
    let rig = Rig::start(RigOptions {
        backends: BACKENDS,
        exception: true,
        client_vip_route: false,
        web_health_check: Some(check("http", "path = \"/health\"")),
        // "ping" answered by "backend-N ping".
        echo_health_check: Some(check("udp", "payload_hex = \"70696e67\"\nexpect_reply_hex = \"6261636b656e642d\"")),
        extra_config: format!(
            "\n[announce]\nenabled = true\nkind = \"ifb\"\nhold_down = {}\n",
            HOLD_DOWN.as_secs_f64()
        ),
        ..RigOptions::default()
    });
    let (client_ns, gw_ns) = (format!("{}client", rig.prefix), format!("{}gw", rig.prefix));
    // Before any BGP: the client has no way to the VIP.
    assert_eq!(client_route(&rig), None, "the client must have no route to the VIP before BGP");
    let get = rig.client(&["ip", "route", "get", VIP]);
    assert!(!get.status.success(), "the client reaches the VIP without BGP: {}", String::from_utf8_lossy(&get.stdout));
    let before = rig.stats();

    let router = Frr::start(&client_ns, rig.dir().join("frr-router"), &router_frr_conf(ROUTER_ADDR, &[GW_ADDR]));
    let gateway = if with_bird {
        GatewayDaemon::Bird(Bird::start(&gw_ns, rig.dir().join("bird"), &gateway_bird_conf(GW_ADDR, ROUTER_ADDR)))
    } else {
        GatewayDaemon::Frr(Frr::start(
            &gw_ns,
            rig.dir().join("frr-gateway"),
            &gateway_frr_conf("gateway", GW_ADDR, ROUTER_ADDR, "198.18.1.0/24"),
        ))
    };
    let diag = || format!("router:\n{}\ngateway:\n{}", router.diagnostics(), gateway.diagnostics());
    // The router's view of the session: whether it is Established, and how
    // many times it has gone down so far.
    let session = || {
        let v: serde_json::Value =
            serde_json::from_str(&router.vtysh(&format!("show bgp neighbors {GW_ADDR} json"))).expect("vtysh json");
        let n = &v[GW_ADDR];
        (n["bgpState"] == "Established", n["connectionsDropped"].as_u64().unwrap_or(0))
    };
    let established = || session().0;

    // The session, BFD and the VIP's route, all over the exception path.
    let started = Instant::now();
    wait_until("the router to learn the VIP", SESSION_UP, diag, || router.bgp_routes().contains(&host(VIP)));
    assert!(established(), "BGP session not Established\n{}", diag());
    println!("router learned {VIP}/32 {:.3} s after the daemons started", started.elapsed().as_secs_f64());
    // Up on both sides, and steady for a few BFD detection times: from
    // here on the session must hold, so that what the router sees next is
    // the withdrawal alone, not a reset. FRR before 10.2 (bookworm has
    // 8.4) resets a BFD-enabled session once just after it comes up: bgpd
    // moves the BFD session to the source address it has just learned,
    // which takes BFD down (fixed upstream in FRR's bgpd, pull request
    // 17344); the router then counts one drop. Over a plain veth
    // (tests/announce.rs) it does the same.
    let mut steady_since = Instant::now();
    let mut last_drops = session().1;
    wait_until("BGP and BFD up on both sides, steady for 3 s", SESSION_UP, diag, || {
        let (up, drops) = session();
        if !(up && drops == last_drops && router.bfd_up().contains(GW_ADDR) && gateway.bfd_up()) {
            steady_since = Instant::now();
            last_drops = drops;
        }
        steady_since.elapsed() >= Duration::from_secs(3)
    });
    let drops = last_drops;
    println!("session resets at start-up: {drops}");
    println!("{}", router.vtysh("show bfd peers brief"));
    let after = rig.stats();
    let moved = |name: &str| {
        after["total"][name].as_u64().unwrap_or_else(|| panic!("no total.{name}"))
            - before["total"][name].as_u64().unwrap_or_else(|| panic!("no total.{name}"))
    };
    println!(
        "exception path: to_kernel +{} (control +{}), from_kernel +{}",
        moved("to_kernel"),
        moved("to_kernel_control"),
        moved("from_kernel")
    );
    assert!(moved("to_kernel_control") > 0, "BGP and BFD reach the gateway's kernel as control punts: {after}");
    assert!(moved("from_kernel") > 0, "the gateway daemon's packets leave through the ports: {after}");
    assert_eq!(rig.drops("punt_full"), 0, "{after}");

    // The client's kernel uses the learned route.
    wait_until("the learned route in the client's kernel", Duration::from_secs(5), diag, || {
        client_route(&rig).is_some()
    });
    let route = client_route(&rig).expect("a route");
    assert_eq!(route["gateway"], GW_ADDR, "{route}");
    assert_eq!(route["protocol"], "bgp", "{route}");
    let get = stdout(&rig.client(&["ip", "route", "get", VIP]), "ip route get");
    assert!(get.contains(&format!("via {GW_ADDR}")), "the client goes to the VIP through the learned route: {get}");
    for sport in 41000..41010 {
        let w = rig.whoami(sport).unwrap_or_else(|e| panic!("the VIP over the learned route: {e}\n{}", rig.log_text()));
        assert!(w.backend.starts_with("backend-"), "{w:?}");
    }

    // Every backend stops: health marks them down, then the VIP goes.
    let stopped = Instant::now();
    for i in 1..=BACKENDS {
        rig.stop_backend(i);
    }
    let down_at = wait_until("every backend of the VIP marked down", Duration::from_secs(10), diag, || {
        vip_health(&rig).iter().all(|h| h == "down")
    });
    let marked = down_at - stopped;
    let withdrawn_at = wait_until("the withdrawal at the router", HOLD_DOWN + BGP_UPDATE + SLACK, diag, || {
        !router.bgp_routes().contains(&host(VIP))
    });
    let withdrawn = withdrawn_at - down_at;
    println!(
        "every backend marked down {:.3} s after they stopped (bound {:.3} s); route withdrawn at the router {:.3} s later (hold-down {:.1} s, so {:.3} s of BGP update)",
        marked.as_secs_f64(),
        (Duration::from_millis(FALL * INTERVAL_MS + TIMEOUT_MS) + SLACK).as_secs_f64(),
        withdrawn.as_secs_f64(),
        HOLD_DOWN.as_secs_f64(),
        withdrawn.as_secs_f64() - HOLD_DOWN.as_secs_f64()
    );
    assert!(marked <= Duration::from_millis(FALL * INTERVAL_MS + TIMEOUT_MS) + SLACK, "marked down after {marked:?}");
    assert!(
        withdrawn + POLL_SKEW >= HOLD_DOWN,
        "withdrawn {withdrawn:?} after the backends were down: before the hold-down"
    );
    assert!(withdrawn <= HOLD_DOWN + BGP_UPDATE, "withdrawn {withdrawn:?} after the backends were down\n{}", diag());
    wait_until("the route gone from the client's kernel", Duration::from_secs(2), diag, || {
        client_route(&rig).is_none()
    });
    let get = rig.client(&["ip", "route", "get", VIP]);
    assert!(!get.status.success(), "the client still has a way to the VIP: {}", String::from_utf8_lossy(&get.stdout));
    // The route went, not the session.
    assert_eq!(session(), (true, drops), "the session must stay up while the VIP is withdrawn\n{}", diag());
    assert!(router.bfd_up().contains(GW_ADDR), "BFD must stay up\n{}", diag());

    // One backend back: the route returns, the VIP works again through it.
    let restarting = Instant::now();
    rig.restart_backend(1);
    let answering = Instant::now();
    let back_at = wait_until(
        "the route back at the router",
        Duration::from_millis(RISE * INTERVAL_MS + TIMEOUT_MS) + SLACK + BGP_UPDATE,
        diag,
        || router.bgp_routes().contains(&host(VIP)),
    );
    println!(
        "route back at the router {:.3} s after backend-1's restart began, {:.3} s after it answered",
        (back_at - restarting).as_secs_f64(),
        back_at.saturating_duration_since(answering).as_secs_f64()
    );
    assert_eq!(vip_health(&rig).iter().filter(|h| *h == "up").count(), 2, "backend-1 up in web and echo");
    wait_until("the route back in the client's kernel", Duration::from_secs(2), diag, || client_route(&rig).is_some());
    for sport in 41100..41110 {
        let w = rig.whoami(sport).unwrap_or_else(|e| panic!("the VIP over the route learned again: {e}"));
        assert_eq!(w.backend, "backend-1", "only backend-1 runs: {w:?}");
    }
    assert_eq!(session(), (true, drops), "the session must have stayed up throughout\n{}", diag());

    let log = rig.log_text();
    assert!(log.contains("backend down: takes no new flows"), "{log}");
    drop(gateway);
    drop(router);
    rig.teardown().assert_clean();
}

#[test]
fn an_frr_router_learns_the_vip_from_the_gateway_frr_over_the_exception_path_and_follows_its_health() {
    announce_over_the_exception_path(false);
}

#[test]
fn an_frr_router_learns_the_vip_from_the_gateway_bird_over_the_exception_path_and_follows_its_health() {
    announce_over_the_exception_path(true);
}
