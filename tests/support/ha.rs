//! An active/active pair of gateways for tests/ha.rs: two vipgated with the
//! same services, each in a namespace of its own with its own FRR, on two
//! shared LANs; an upstream router that learns the VIP from both over eBGP
//! with BFD and spreads flows over them (ECMP on a layer-4 hash); backends
//! on the backend LAN, each in a namespace of its own.
//!
//! ```text
//!            ${P}r  the router, and the client: 198.18.0.2 on the bridge up0;
//!                   FRR (docs/examples/upstream-frr.conf), ECMP over both
//!                    |                                 |
//!    tap ${P}ac  198.18.0.1                    tap ${P}bc  198.18.0.3
//!    ${P}ga  vipgated "a", FRR (frr.conf)      ${P}gb  vipgated "b", FRR
//!    tap ${P}ab  198.18.1.1                    tap ${P}bb  198.18.1.2
//!                    |                                 |
//!            ${P}lan  the backend LAN: the bridge br0
//!                    |                  |                  (dsr: the router's
//!            ${P}b1  198.18.1.11   ${P}b2  198.18.1.12      leg, 198.18.1.200)
//! ```
//!
//! Each gateway's ports are net_tap devices; their taps are moved out of
//! the gateway's namespace onto the bridges, while its kernel interfaces
//! (the exception path, `client` and `backend`, with the ports' addresses)
//! stay in it, where its FRR peers with the router and, in nat mode, with
//! the backends. The gateways are configured alike but for their
//! addresses: the same web service (two backends, HTTP health checks) and
//! route announcement on (`[announce]`, an ifb interface: this kernel has
//! no dummy driver).
//!
//! - nat: each backend's BIRD (docs/examples/backend-bird.conf) learns a
//!   default route from both gateways, with BFD, as one multipath route:
//!   its replies go back through either gateway, and only through live
//!   ones.
//! - dsr: the backends hold the VIP and answer the client directly, on the
//!   router's leg in the backend LAN, as in scripts/rig.sh's dsr mode
//!   (decapsulation as `VIPGATE_DSR_DECAP` says).
//!
//! The router and both backends hash flows with
//! `net.ipv4.fib_multipath_hash_policy = 1` (addresses and ports), so that
//! connections spread over both gateways and a test can choose, by its
//! source port, which gateway a connection goes through ([`HaPair::via`]).
//!
//! Needs root, hugepages (or `VIPGATE_HUGEPAGES=0`), FRR and BIRD 2
//! (scripts/setup.sh); fails loudly without them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::routing::{
    Bird, Daemon, Frr, GATEWAY_AS, Netns, example_repeating, gateway_frr_conf, ok, router_frr_conf, wait_for,
};
use crate::{Download, Mode, NullGateway, UDP_PORT, VIP, Whoami, backend_addr, repo_root};

/// The router's (and the client's) address on the upstream LAN.
pub const ROUTER_ADDR: &str = "198.18.0.2";
/// The router's leg in the backend LAN (dsr mode), where replies arrive.
pub const ROUTER_LEG_ADDR: &str = "198.18.1.200";
/// The backends' AS (the gateways' and the router's are
/// [`crate::routing`]'s).
pub const BACKEND_AS: &str = "65100";
const BACKEND_NET: &str = "198.18.1.0/24";
const CLIENT_NET: &str = "198.18.0.0/24";
/// How many backends the pair has.
pub const BACKENDS: usize = 2;
/// The backend LAN's MTU: room for the IPIP header of dsr mode.
const LAN_MTU: &str = "1520";
/// The TUN device the userspace decapsulator writes into (dsr mode).
const DECAP_TUN: &str = "vgdecap";
/// How long the routing may take to settle at the start (BGP's connect
/// retry is 5 s, and FRR 8.4 resets a BFD session once just after it comes
/// up; see tests/routing.rs).
const SETTLE: Duration = Duration::from_secs(90);

/// One gateway of the pair.
pub struct HaGateway {
    /// "a" or "b".
    pub name: &'static str,
    /// Its namespace, `${P}g{name}`.
    pub ns: String,
    /// Its address on the upstream LAN.
    pub client_addr: &'static str,
    /// Its address on the backend LAN.
    pub backend_addr: &'static str,
    frr: Option<Frr>,
    /// Its vipgated (on net_tap ports).
    pub vipgated: NullGateway,
    killed: bool,
}

/// The pair with everything around it; dropping it stops and deletes
/// everything (daemons first, namespaces last).
pub struct HaPair {
    /// The prefix of every namespace and tap of this pair.
    pub prefix: String,
    /// The web service's mode (nat or dsr).
    pub mode: Mode,
    /// The web service's port on the VIP.
    pub http_port: u16,
    dir: PathBuf,
    router: Option<Frr>,
    servers: Vec<Daemon>,
    birds: Vec<Bird>,
    /// The two gateways, "a" then "b".
    pub gateways: Vec<HaGateway>,
    namespaces: Vec<Netns>,
}

/// The next hops of a route as `ip -j route show` prints it (one
/// `gateway`, or `nexthops`).
fn next_hops(route: &serde_json::Value) -> BTreeSet<String> {
    match route["nexthops"].as_array() {
        Some(hops) => hops.iter().filter_map(|h| h["gateway"].as_str().map(str::to_owned)).collect(),
        None => route["gateway"].as_str().map(str::to_owned).into_iter().collect(),
    }
}

fn ns_sysctl(ns: &str, settings: &[&str]) {
    let mut cmd = vec!["ip", "netns", "exec", ns, "sysctl", "-q", "-w"];
    cmd.extend_from_slice(settings);
    ok(&cmd);
}

/// A locally administered unicast MAC, at random.
fn random_mac() -> String {
    let mut b = [0u8; 5];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .expect("read /dev/urandom");
    format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4])
}

/// Whether `ifname` in `ns` is up (the net_tap PMD brings its tap up when
/// the port starts).
fn link_up(ns: &str, ifname: &str) -> bool {
    let out = crate::routing::run(&["ip", "-n", ns, "-j", "link", "show", "dev", ifname]);
    out.status.success()
        && serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v[0]["flags"].as_array().map(|f| f.iter().any(|x| x == "UP")))
            .unwrap_or(false)
}

impl HaPair {
    /// Builds everything and returns once the routing has settled: the
    /// router has the VIP through both gateways, every backend (nat) its
    /// default route through both, both gateways see both backends up, and
    /// all of it has held for 3 s.
    pub fn start(mode: Mode) -> HaPair {
        assert!(matches!(mode, Mode::Nat | Mode::Dsr), "an HA pair runs nat or dsr, not {mode:?}");
        crate::require_root();
        let prefix = format!("vgh{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("vipgate-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("the pair's directory");
        let decap = (mode == Mode::Dsr).then(crate::dsr_decap);
        if decap == Some("kernel") {
            // Before the backends' namespaces exist: each gets its tunl0.
            let loaded =
                Path::new("/sys/module/ipip").exists() || crate::routing::run(&["modprobe", "ipip"]).status.success();
            assert!(
                loaded,
                "dsr with VIPGATE_DSR_DECAP=kernel needs the kernel's IPIP (modprobe ipip failed); use VIPGATE_DSR_DECAP=userspace on a kernel without it"
            );
        }
        let ns = |suffix: &str| Netns::new(format!("{prefix}{suffix}"));
        let (router_ns, lan_ns) = (ns("r"), ns("lan"));
        let mut pair = HaPair {
            prefix: prefix.clone(),
            mode,
            http_port: mode.http_port(),
            dir,
            router: None,
            servers: Vec::new(),
            birds: Vec::new(),
            gateways: Vec::new(),
            namespaces: vec![router_ns, lan_ns],
        };
        let (r, lan) = (pair.namespaces[0].name.clone(), pair.namespaces[1].name.clone());

        // The two LANs: bridges with fixed MACs (a bridge otherwise takes
        // its ports' lowest, which changes when a gateway's tap goes).
        ok(&["ip", "-n", &r, "link", "add", "up0", "address", &random_mac(), "type", "bridge"]);
        ok(&["ip", "-n", &r, "addr", "add", &format!("{ROUTER_ADDR}/24"), "dev", "up0"]);
        ok(&["ip", "-n", &r, "link", "set", "up0", "up"]);
        ns_sysctl(&r, &["net.ipv4.fib_multipath_hash_policy=1"]);
        ok(&["ip", "-n", &lan, "link", "add", "br0", "mtu", LAN_MTU, "address", &random_mac(), "type", "bridge"]);
        ok(&["ip", "-n", &lan, "link", "set", "br0", "up"]);
        if mode == Mode::Dsr {
            ns_sysctl(&r, &["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]);
            pair.lan_veth(&r, "lan0", "vrouter");
            ok(&["ip", "-n", &r, "addr", "add", &format!("{ROUTER_LEG_ADDR}/24"), "dev", "lan0"]);
        }

        for (name, client_addr, backend_addr) in [("a", "198.18.0.1", "198.18.1.1"), ("b", "198.18.0.3", "198.18.1.2")]
        {
            pair.start_gateway(name, client_addr, backend_addr);
        }
        for i in 1..=BACKENDS {
            pair.start_backend(i, decap);
        }

        // Routing: the gateways' FRR, the router's, the backends' BIRD.
        for g in 0..2 {
            let gw = &pair.gateways[g];
            let config = gateway_frr_conf(&format!("gateway-{}", gw.name), gw.client_addr, ROUTER_ADDR, BACKEND_NET);
            let frr = Frr::start(&gw.ns, pair.dir.join(format!("frr-{}", gw.name)), &config);
            pair.gateways[g].frr = Some(frr);
        }
        let gateway_addrs: Vec<&str> = pair.gateways.iter().map(|g| g.client_addr).collect();
        let config = router_frr_conf(ROUTER_ADDR, &gateway_addrs);
        pair.router = Some(Frr::start(&r, pair.dir.join("frr-router"), &config));
        if mode == Mode::Nat {
            let gateways: Vec<&str> = pair.gateways.iter().map(|g| g.backend_addr).collect();
            for i in 1..=BACKENDS {
                let config = example_repeating(
                    "backend-bird.conf",
                    &[("@ROUTER_ID@", &backend_addr(i)), ("@LOCAL_AS@", BACKEND_AS), ("@GATEWAY_AS@", GATEWAY_AS)],
                    ("@GATEWAY@", &gateways),
                );
                let bird = Bird::start(&pair.backend_ns(i), pair.dir.join(format!("bird-b{i}")), &config);
                pair.birds.push(bird);
            }
        }
        pair.settle();
        pair
    }

    /// A veth from the backend LAN's bridge (`peer`, in `${P}lan`) to
    /// `ifname` in `ns`, both ends up, with the LAN's MTU.
    fn lan_veth(&self, ns: &str, ifname: &str, peer: &str) {
        let lan = &self.namespaces[1].name;
        ok(&[
            "ip", "-n", lan, "link", "add", peer, "mtu", LAN_MTU, "type", "veth", "peer", "name", ifname, "netns", ns,
            "mtu", LAN_MTU,
        ]);
        ok(&["ip", "-n", lan, "link", "set", peer, "master", "br0", "up"]);
        ok(&["ip", "-n", ns, "link", "set", ifname, "up"]);
    }

    /// Gateway `name`: its namespace, its vipgated, and its two taps moved
    /// onto the bridges.
    fn start_gateway(&mut self, name: &'static str, client_addr: &'static str, backend_addr: &'static str) {
        let p = &self.prefix;
        let gns = Netns::new(format!("{p}g{name}"));
        let (client_tap, backend_tap) = (format!("{p}{name}c"), format!("{p}{name}b"));
        let ports = format!(
            "[[ports]]\nname = \"client\"\ndevice = \"net_tap0,iface={client_tap}\"\naddresses = [\"{client_addr}/24\"]\n\n\
             [[ports]]\nname = \"backend\"\ndevice = \"net_tap1,iface={backend_tap}\"\naddresses = [\"{backend_addr}/24\"]\n"
        );
        let mode = match self.mode {
            Mode::Dsr => format!("mode = \"dsr\"\ntunnel_source = \"{}\"\n", crate::TUNNEL_SOURCE),
            _ => String::new(),
        };
        let backends: Vec<String> = (1..=BACKENDS)
            .map(|i| format!("  {{ address = \"{}\", port = {} }},", crate::backend_addr(i), crate::BACKEND_HTTP_PORT))
            .collect();
        let services = format!(
            "[[services]]\nname = \"web\"\nvip = \"{VIP}\"\nport = {}\nprotocol = \"tcp\"\n{mode}backends = [\n{}\n]\n\n\
             [services.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval_ms = 300\ntimeout_ms = 200\nrise = 2\nfall = 2\n",
            self.http_port,
            backends.join("\n")
        );
        let mut vipgated = NullGateway::builder(&format!("h{name}"))
            .netns(&gns.name)
            .ports(&ports)
            .services(&services)
            .extra_config("\n[announce]\nenabled = true\nkind = \"ifb\"\nhold_down = 1\n")
            .build();
        vipgated.spawn();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(link_up(&gns.name, &client_tap) && link_up(&gns.name, &backend_tap)) {
            vipgated.assert_running();
            assert!(Instant::now() < deadline, "gateway {name}'s taps did not come up:\n{}", vipgated.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        // A tap is moved only once up: the PMD's ioctls by name fail once
        // it is in another namespace. On a bridge, a port's own MAC is the
        // bridge's, so the kernel side of each tap gets a MAC of its own
        // (the gateway keeps the port's).
        let (r, lan) = (self.namespaces[0].name.clone(), self.namespaces[1].name.clone());
        for (tap, to, bridge, mtu) in [(&client_tap, &r, "up0", "1500"), (&backend_tap, &lan, "br0", LAN_MTU)] {
            ok(&["ip", "-n", &gns.name, "link", "set", "dev", tap, "netns", to]);
            ok(&["ip", "-n", to, "link", "set", "dev", tap, "address", &random_mac(), "mtu", mtu]);
            ok(&["ip", "-n", to, "link", "set", "dev", tap, "master", bridge, "up"]);
        }
        vipgated.wait_ready(|g| g.ctl(&["health"]).status.success());
        self.gateways.push(HaGateway {
            name,
            ns: gns.name.clone(),
            client_addr,
            backend_addr,
            frr: None,
            vipgated,
            killed: false,
        });
        self.namespaces.push(gns);
    }

    /// The namespace of backend `i` (1-based).
    pub fn backend_ns(&self, i: usize) -> String {
        format!("{}b{i}", self.prefix)
    }

    /// Backend `i`: its namespace on the LAN, set up for the mode, and
    /// scripts/backend.py answering on its address (and on the VIP in dsr).
    fn start_backend(&mut self, i: usize, decap: Option<&str>) {
        let bns = Netns::new(self.backend_ns(i));
        let (name, addr) = (bns.name.clone(), backend_addr(i));
        if self.mode == Mode::Dsr {
            // Before the veth exists, so that it is created with default's
            // values.
            ns_sysctl(
                &name,
                &[
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    "net.ipv4.conf.all.arp_ignore=1",
                    "net.ipv4.conf.all.arp_announce=2",
                ],
            );
        } else {
            ns_sysctl(&name, &["net.ipv4.fib_multipath_hash_policy=1"]);
        }
        self.lan_veth(&name, "eth0", &format!("vb{i}"));
        ok(&["ip", "-n", &name, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        let mut args: Vec<String> =
            ["python3", "scripts/backend.py", "--name", &format!("backend-{i}"), "--bind", &addr]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
        if self.mode == Mode::Dsr {
            ok(&["ip", "-n", &name, "addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
            ok(&["ip", "-n", &name, "route", "add", CLIENT_NET, "via", ROUTER_LEG_ADDR, "dev", "eth0"]);
            let decap_if = if decap == Some("userspace") {
                ok(&["ip", "-n", &name, "tuntap", "add", "dev", DECAP_TUN, "mode", "tun"]);
                args.extend(["--ipip-decap".to_owned(), DECAP_TUN.to_owned()]);
                DECAP_TUN
            } else {
                "tunl0"
            };
            ok(&["ip", "-n", &name, "link", "set", decap_if, "up"]);
            ns_sysctl(&name, &[&format!("net.ipv4.conf.{decap_if}.rp_filter=0")]);
            args.extend(["--bind".to_owned(), VIP.to_owned()]);
        }
        args.extend(
            ["--http-port", &crate::BACKEND_HTTP_PORT.to_string(), "--udp-port", &UDP_PORT.to_string()]
                .map(str::to_owned),
        );
        let out = self.dir.join(format!("backend-{i}.log"));
        let mut server = Daemon::spawn(
            &format!("backend-{i}"),
            Command::new("ip").args(["netns", "exec", &name]).args(&args).current_dir(repo_root()),
            &out,
        );
        let url = format!("http://{addr}:{}/health", crate::BACKEND_HTTP_PORT);
        wait_for(&format!("backend-{i} to answer on {url}"), Duration::from_secs(20), || {
            server.assert_running(&out);
            crate::routing::run(&["ip", "netns", "exec", &name, "curl", "-s", "--max-time", "1", &url]).stdout
                == b"ok\n"
        });
        self.servers.push(server);
        self.namespaces.push(bns);
    }

    /// Waits (at most [`SETTLE`]) until the routing is complete and has
    /// held for 3 s: see [`HaPair::start`].
    fn settle(&self) {
        let all_gateways: BTreeSet<String> = self.gateways.iter().map(|g| g.client_addr.to_owned()).collect();
        let all_backend_side: BTreeSet<String> = self.gateways.iter().map(|g| g.backend_addr.to_owned()).collect();
        let complete = || {
            self.vip_next_hops() == all_gateways
                && (self.mode != Mode::Nat || (1..=BACKENDS).all(|i| self.backend_default(i) == all_backend_side))
                && (0..2).all(|g| self.health(g).iter().all(|h| h == "up"))
        };
        let deadline = Instant::now() + SETTLE;
        let mut since: Option<Instant> = None;
        loop {
            if complete() {
                let s = *since.get_or_insert_with(Instant::now);
                if s.elapsed() >= Duration::from_secs(3) {
                    return;
                }
            } else {
                since = None;
            }
            assert!(
                Instant::now() < deadline,
                "the pair's routing did not settle within {SETTLE:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The routes, sessions and health, for a failure message.
    pub fn diagnostics(&self) -> String {
        let mut s = format!("router VIP next hops: {:?}\n", self.vip_next_hops());
        if let Some(r) = &self.router {
            s += &r.diagnostics();
        }
        for i in 1..=BACKENDS {
            if self.mode == Mode::Nat {
                s += &format!("\nbackend {i} default route: {:?}", self.backend_default(i));
            }
            if let Some(b) = self.birds.get(i - 1) {
                s += &format!("\n{}", b.birdc("show protocols"));
            }
        }
        for (g, gw) in self.gateways.iter().enumerate() {
            if !gw.killed {
                let stats = gw.vipgated.ctl(&["stats"]);
                s += &format!(
                    "\ngateway {}: health {:?}\n{}",
                    gw.name,
                    self.health(g),
                    String::from_utf8_lossy(&stats.stdout)
                );
            }
        }
        s
    }

    /// The next hops of the router's route to the VIP (none without one).
    pub fn vip_next_hops(&self) -> BTreeSet<String> {
        self.route_next_hops(&self.namespaces[0].name, &format!("{VIP}/32"))
    }

    /// The next hops of backend `i`'s default route.
    pub fn backend_default(&self, i: usize) -> BTreeSet<String> {
        self.route_next_hops(&self.backend_ns(i), "default")
    }

    fn route_next_hops(&self, ns: &str, prefix: &str) -> BTreeSet<String> {
        let out = ok(&["ip", "-n", ns, "-j", "route", "show", prefix]);
        let routes: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or(serde_json::Value::Null);
        routes.as_array().and_then(|a| a.first()).map(next_hops).unwrap_or_default()
    }

    /// The gateway (index) through which the router sends a connection
    /// from source port `sport` to the web service, by the kernel's own
    /// multipath choice (`ip route get ... sport`).
    pub fn via(&self, sport: u16) -> usize {
        let out = ok(&[
            "ip",
            "-n",
            &self.namespaces[0].name,
            "route",
            "get",
            VIP,
            "from",
            ROUTER_ADDR,
            "ipproto",
            "tcp",
            "sport",
            &sport.to_string(),
            "dport",
            &self.http_port.to_string(),
        ]);
        self.gateway_named_in(&out, |g| g.client_addr)
    }

    /// The gateway (index) through which backend `i` sends its replies on
    /// a connection from the client's source port `sport` (nat mode).
    pub fn reply_via(&self, i: usize, sport: u16) -> usize {
        let out = ok(&[
            "ip",
            "-n",
            &self.backend_ns(i),
            "route",
            "get",
            ROUTER_ADDR,
            "from",
            &backend_addr(i),
            "ipproto",
            "tcp",
            "sport",
            &crate::BACKEND_HTTP_PORT.to_string(),
            "dport",
            &sport.to_string(),
        ]);
        self.gateway_named_in(&out, |g| g.backend_addr)
    }

    fn gateway_named_in(&self, route: &str, addr: impl Fn(&HaGateway) -> &str) -> usize {
        self.gateways
            .iter()
            .position(|g| route.contains(&format!("via {} ", addr(g))))
            .unwrap_or_else(|| panic!("the route goes through no gateway: {route}"))
    }

    /// `vipgatectl --json ARGS` on gateway `g`, parsed.
    pub fn ctl_json(&self, g: usize, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.gateways[g].vipgated.ctl(&full);
        assert!(out.status.success(), "vipgatectl {args:?} on gateway {g}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("vipgatectl --json prints JSON")
    }

    /// The web service as gateway `g` lists it (`list --json`), with its
    /// traffic (`stats`) and its backends'.
    pub fn web(&self, g: usize) -> serde_json::Value {
        let list = self.ctl_json(g, &["list"]);
        list["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "web").cloned())
            .unwrap_or_else(|| panic!("gateway {g} lists no web service: {list}"))
    }

    /// The health of the web service's backends on gateway `g`.
    pub fn health(&self, g: usize) -> Vec<String> {
        self.web(g)["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| b["health"].as_str().unwrap_or("?").to_owned())
            .collect()
    }

    /// A new connection's `GET /whoami` from the client (the router), from
    /// source port `sport`.
    pub fn whoami(&self, sport: u16) -> Result<Whoami, String> {
        crate::whoami(&self.namespaces[0].name, self.http_port, sport)
    }

    /// A download of `n` bytes from the client (see [`crate::start_download`]).
    pub fn start_download(&self, n: u64, rate: &str, sport: u16) -> Download {
        crate::start_download(&self.namespaces[0].name, &self.dir, self.http_port, n, rate, sport)
    }

    /// Kills gateway `g`'s vipgated (SIGKILL): its ports, and so its taps
    /// on the LANs and its kernel interfaces, are gone at once; its FRR
    /// stays, cut off.
    pub fn kill(&mut self, g: usize) {
        self.gateways[g].vipgated.kill9();
        self.gateways[g].killed = true;
    }

    /// Stops every gateway still running (SIGTERM) and checks that each
    /// exits cleanly with every mbuf back in its pool; then drops the rest.
    pub fn teardown(mut self) {
        self.router = None;
        self.servers.clear();
        self.birds.clear();
        for gw in &mut self.gateways {
            gw.frr = None;
            if gw.killed {
                continue;
            }
            let status = gw.vipgated.stop();
            let log = gw.vipgated.log_text();
            assert!(status.success(), "gateway {} did not exit cleanly ({status}):\n{log}", gw.name);
            assert!(
                log.contains("mbuf pool at shutdown: 0 in use (at start: 0)"),
                "gateway {} did not report every mbuf back in its pool:\n{log}",
                gw.name
            );
        }
    }
}

impl Drop for HaPair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the pair's files are kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
