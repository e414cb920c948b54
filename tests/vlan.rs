//! Two VLANs on one port, with real Linux VLAN interfaces on the far side.
//!
//! vipgated runs in a gateway namespace on one net_tap port, "trunk"
//! (untagged 198.18.0.1/24), carrying VLAN 100 (198.18.10.1/24, the
//! clients) and VLAN 200 (198.18.20.1/24, the backends). The tap's kernel
//! side is the trunk port of a switch whose access ports are veths to a
//! client namespace (VLAN 100) and a backend namespace (VLAN 200), so
//! every frame between client and backends crosses the port tagged.
//!
//! The switch is `tests/python/vlan_switch.py` (AF_PACKET sockets): this
//! machine's kernel has no 802.1Q support (no `8021q` module, so `ip link
//! add ... type vlan` fails, and no `act_vlan` for tc), so Linux VLAN
//! interfaces cannot be made on the far side of the tap. The switch does
//! what a real switch's access ports would; client, backends and the
//! gateway's own kernel are real stacks. For the same reason the
//! gateway's per-VLAN kernel interfaces cannot be made here: the test
//! runs without kernel interfaces, and `controlplane/src/kernel.rs`'s
//! commands for them are checked by unit tests only.
//!
//! - 300 HTTP requests from the client to the VIP, served by three
//!   backends on VLAN 200, all succeed, and the backends see the client's
//!   own address (nat).
//! - The gateway answers ARP and ping for its VLAN 100 address on VLAN
//!   100, and resolves the backends with tagged ARP requests on VLAN 200.
//! - VLAN 300, which the port does not carry, is counted as `unknown_vlan`
//!   (frames the switch injects on the trunk).
//!
//! Needs root and hugepages (or VIPGATE_HUGEPAGES=0); fails loudly without.

use std::process::Command;
use std::time::Duration;

use vipgate::routing::{Daemon, Netns, ok, run, wait_for};
use vipgate::{NullGateway, VIP, repo_root};

const REQUESTS: usize = 300;
const BACKENDS: [&str; 3] = ["198.18.20.11", "198.18.20.12", "198.18.20.13"];

fn stats(gw: &NullGateway) -> serde_json::Value {
    let out = gw.ctl(&["--json", "stats"]);
    assert!(out.status.success(), "vipgatectl stats: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON")["total"].clone()
}

#[test]
fn two_vlans_on_one_port_carry_clients_and_backends_and_unknown_vlans_are_counted() {
    let pid = std::process::id();
    let gw_ns = Netns::new(format!("vgvl{pid}gw"));
    let client = Netns::new(format!("vgvl{pid}cl"));
    let backends = Netns::new(format!("vgvl{pid}be"));
    let tap = format!("vlt{pid}");
    let mut gw = NullGateway::builder("vl")
        .netns(&gw_ns.name)
        .ports(&format!(
            "[[ports]]\nname = \"trunk\"\ndevice = \"net_tap0,iface={tap}\"\naddresses = [\"198.18.0.1/24\"]\n\
             kernel_interface = \"\"\n\n\
             [[vlans]]\nname = \"clients\"\nport = \"trunk\"\nid = 100\naddresses = [\"198.18.10.1/24\"]\n\n\
             [[vlans]]\nname = \"servers\"\nport = \"trunk\"\nid = 200\naddresses = [\"198.18.20.1/24\"]\n"
        ))
        .services(&format!(
            "[[services]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\nbackends = [\n{}\n]\n",
            BACKENDS.iter().map(|b| format!("  {{ address = \"{b}\", port = 8080 }},")).collect::<Vec<_>>().join("\n")
        ))
        .build();
    gw.spawn();
    gw.wait_ready(|gw| gw.ctl(&["health"]).status.success());

    // The switch in the gateway's namespace: the tap is its trunk, a veth
    // to each namespace an access port.
    let g = gw_ns.name.as_str();
    let (c_sw, c_if, b_sw, b_if) =
        (format!("vls{pid}c"), format!("vlc{pid}"), format!("vls{pid}b"), format!("vlb{pid}"));
    ok(&["ip", "-n", g, "link", "add", &c_sw, "type", "veth", "peer", "name", &c_if, "netns", &client.name]);
    ok(&["ip", "-n", g, "link", "add", &b_sw, "type", "veth", "peer", "name", &b_if, "netns", &backends.name]);
    for dev in [&tap, &c_sw, &b_sw] {
        // Ports of a switch: no address, no IPv6 chatter of their own.
        let _ = gw_ns.exec(&["sysctl", "-qw", &format!("net.ipv6.conf.{dev}.disable_ipv6=1")]);
        ok(&["ip", "-n", g, "link", "set", dev, "up"]);
    }
    let switch_script = repo_root().join("tests/python/vlan_switch.py");
    let mut switch = Command::new("ip");
    switch.args(["netns", "exec", g, "python3"]).arg(&switch_script).args([
        "--trunk",
        &tap,
        "--access",
        &format!("{c_sw}:100"),
        "--access",
        &format!("{b_sw}:200"),
        "--trace",
    ]);
    let switch_log = gw.dir().join("switch.log");
    let mut _switch = Daemon::spawn("vlan_switch.py", &mut switch, &switch_log);
    wait_for("the switch's ports", Duration::from_secs(10), || {
        std::fs::read_to_string(&switch_log).is_ok_and(|t| t.contains("trunk "))
    });
    // The switch copies frames between sockets: the hosts must send them
    // with their checksums filled in (a veth leaves that to the receiving
    // stack otherwise).
    for (ns, dev) in [(&client, &c_if), (&backends, &b_if)] {
        let out = ns.exec(&["ethtool", "-K", dev, "tx", "off"]);
        assert!(out.status.success(), "ethtool -K {dev} tx off: {}", String::from_utf8_lossy(&out.stderr));
    }
    let c = client.name.as_str();
    ok(&["ip", "-n", c, "addr", "add", "198.18.10.2/24", "dev", &c_if]);
    ok(&["ip", "-n", c, "link", "set", &c_if, "up"]);
    ok(&["ip", "-n", c, "route", "add", "198.18.100.0/24", "via", "198.18.10.1"]);
    let b = backends.name.as_str();
    for addr in BACKENDS {
        ok(&["ip", "-n", b, "addr", "add", &format!("{addr}/24"), "dev", &b_if]);
    }
    ok(&["ip", "-n", b, "link", "set", &b_if, "up"]);
    ok(&["ip", "-n", b, "route", "add", "default", "via", "198.18.20.1"]);

    // Three backends, one per address.
    let script = repo_root().join("scripts/backend.py");
    let _servers: Vec<Daemon> = BACKENDS
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let name = format!("backend-{}", i + 1);
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", b, "python3"]).arg(&script).args([
                "--name",
                &name,
                "--bind",
                addr,
                "--http-port",
                "8080",
                "--udp-port",
                "5353",
            ]);
            Daemon::spawn(&name, &mut cmd, &gw.dir().join(format!("{name}.log")))
        })
        .collect();
    for addr in BACKENDS {
        wait_for(&format!("backend {addr} listening"), Duration::from_secs(20), || {
            backends.exec(&["curl", "-sf", "-o", "/dev/null", &format!("http://{addr}:8080/health")]).status.success()
        });
    }

    // The first request waits for ARP on both VLANs (bounded, and the
    // gateway's counters told if it does not come).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !client
        .exec(&["curl", "-sf", "--max-time", "2", "-o", "/dev/null", &format!("http://{VIP}/")])
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the VIP never answered the client on VLAN 100: {}\nswitch:\n{}",
            stats(&gw),
            std::fs::read_to_string(&switch_log).unwrap_or_default()
        );
    }

    // 300 requests from the client on VLAN 100 to the VIP, served on
    // VLAN 200.
    let loop_ =
        format!("for i in $(seq {REQUESTS}); do curl -s --max-time 2 http://{VIP}/whoami || echo FAILED; echo; done");
    let out = client.exec(&["bash", "-c", &loop_]);
    let text = String::from_utf8_lossy(&out.stdout);
    let answered = text.lines().filter(|l| l.starts_with("backend ")).count();
    let mut per_backend = std::collections::BTreeMap::new();
    for l in text.lines().filter(|l| l.starts_with("backend ")) {
        *per_backend.entry(l.to_owned()).or_insert(0) += 1;
    }
    let clients: std::collections::BTreeSet<&str> =
        text.lines().filter_map(|l| l.strip_prefix("client ")).map(|c| c.split(':').next().unwrap()).collect();

    // The gateway's own address on VLAN 100 answers ARP and ping there.
    let ping = client.exec(&["ping", "-c", "3", "-W", "1", "198.18.10.1"]);
    let neighbour = run(&["ip", "-n", c, "neigh", "show", "198.18.10.1"]);

    // VLAN 300: not carried.
    let before = stats(&gw)["drops"]["unknown_vlan"].as_u64().expect("unknown_vlan");
    let inject = gw_ns.exec(&["python3", switch_script.to_str().unwrap(), "--trunk", &tap, "--inject", "300:5"]);
    assert!(inject.status.success(), "inject: {}", String::from_utf8_lossy(&inject.stderr));
    wait_for("VLAN 300's frames counted", Duration::from_secs(5), || {
        stats(&gw)["drops"]["unknown_vlan"].as_u64().unwrap() >= before + 5
    });
    let after = stats(&gw);
    _switch.assert_running(&switch_log);
    let unknown = after["drops"]["unknown_vlan"].as_u64().unwrap() - before;

    println!("{answered} of {REQUESTS} requests answered: {per_backend:?}; clients seen by the backends: {clients:?}");
    println!(
        "ping of the gateway's VLAN 100 address: {}",
        String::from_utf8_lossy(&ping.stdout).lines().last().unwrap_or("")
    );
    println!("the client's neighbour: {}", String::from_utf8_lossy(&neighbour.stdout).trim());
    println!("VLAN 300: {unknown} frames counted as unknown_vlan");
    let log = gw.log_text();
    drop(gw);
    assert_eq!(answered, REQUESTS, "every request answered:\n{text}\n{after}\n{log}");
    assert_eq!(per_backend.len(), 3, "every backend served: {per_backend:?}");
    assert_eq!(clients, ["198.18.10.2"].into(), "nat keeps the client's address");
    assert!(ping.status.success(), "the gateway answers ping on VLAN 100");
    assert!(String::from_utf8_lossy(&neighbour.stdout).contains("lladdr"), "resolved by ARP on VLAN 100");
    assert_eq!(unknown, 5, "VLAN 300's frames counted as unknown_vlan: {after}");
    assert_eq!(after["drops"]["malformed"].as_u64(), Some(0), "{after}");
}
