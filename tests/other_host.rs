//! End-to-end: a real vipgated between namespaces drops frames addressed to
//! another host's MAC (`other_host`), as a bridge floods them to it after
//! forgetting where that MAC is, and forwards the same packets addressed to
//! its own MAC. The frames are written with a packet socket in the client
//! namespace, so the kernel's neighbour table cannot readdress them. Needs
//! root and hugepages (or VIPGATE_HUGEPAGES=0); fails loudly without them.

use std::time::{Duration, Instant};
use vipgate::{CLIENT_ADDR, Rig, RigOptions, VIP};

/// SYNs sent in each phase.
const SYNS: u64 = 20;
/// A unicast MAC that is not the gateway's.
const OTHER_MAC: &str = "02:00:00:00:00:01";

/// TCP SYNs to port 80, from SRC:SPORT.. (N of them, one per source port)
/// to DST, in Ethernet frames to DST_MAC out of IFNAME, with correct
/// checksums: python3 -c "$SEND_SYNS" IFNAME DST_MAC SRC DST SPORT N
const SEND_SYNS: &str = r#"
import socket, struct, sys
ifname, dst_mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", ""))
src, dst = socket.inet_aton(sys.argv[3]), socket.inet_aton(sys.argv[4])
first, n = int(sys.argv[5]), int(sys.argv[6])
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
mac = s.getsockname()[4]
for sport in range(first, first + n):
    tcp = struct.pack("!HHIIBBHHH", sport, 80, 1000, 0, 5 << 4, 0x02, 64240, 0, 0)
    tcp = tcp[:16] + struct.pack("!H", csum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    s.send((dst_mac + mac + b"\x08\x00" + ip + tcp).ljust(60, b"\0"))
"#;

fn total(stats: &serde_json::Value, counter: &str) -> u64 {
    stats["total"][counter].as_u64().unwrap_or_else(|| panic!("no total {counter} in {stats}"))
}

/// The web service's connections (flows created), from `vipgatectl --json list`.
fn web_connections(rig: &Rig) -> u64 {
    let out = rig.ctl(&["--json", "list"]);
    assert!(out.status.success(), "vipgatectl --json list: {}", String::from_utf8_lossy(&out.stderr));
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list --json prints JSON");
    let web = state["services"].as_array().expect("services").iter().find(|s| s["name"] == "web").expect("web");
    web["stats"]["connections"].as_u64().unwrap_or_else(|| panic!("no connections in {web}"))
}

fn send_syns(rig: &Rig, dst_mac: &str, first_sport: u16) {
    let out = rig.client(&[
        "python3",
        "-c",
        SEND_SYNS,
        &rig.client_if(),
        dst_mac,
        CLIENT_ADDR,
        VIP,
        &first_sport.to_string(),
        &SYNS.to_string(),
    ]);
    assert!(out.status.success(), "sending SYNs to {dst_mac} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Polls `vipgatectl --json stats` until `done` holds (5 s at most); returns
/// the last reading either way.
fn stats_until(rig: &Rig, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = rig.stats();
        if done(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn syns_to_another_hosts_mac_are_dropped_as_other_host_and_to_the_gateways_forwarded() {
    let rig = Rig::start(RigOptions::default());
    let before = rig.stats();
    let gateway_mac = before["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "client")
        .and_then(|p| p["mac"].as_str())
        .unwrap_or_else(|| panic!("no MAC for port \"client\" in {before}"))
        .to_lowercase();
    assert_ne!(gateway_mac, OTHER_MAC);
    assert_eq!(rig.drops("other_host"), 0, "nothing for other hosts yet: {before}");
    assert_eq!(web_connections(&rig), 0);

    // To another host's MAC: received, dropped, nothing reaches a backend.
    send_syns(&rig, OTHER_MAC, 41000);
    let flooded = stats_until(&rig, |s| s["total"]["drops"]["other_host"].as_u64() >= Some(SYNS));
    assert_eq!(flooded["total"]["drops"]["other_host"].as_u64(), Some(SYNS), "{flooded}");
    assert!(total(&flooded, "rx_packets") >= total(&before, "rx_packets") + SYNS, "{flooded}");
    assert_eq!(total(&flooded, "nat_forward"), total(&before, "nat_forward"), "{flooded}");
    assert_eq!(total(&flooded, "flows_created"), total(&before, "flows_created"), "{flooded}");
    assert_eq!(web_connections(&rig), 0, "no backend got a connection");

    // The same SYNs to the gateway's MAC are forwarded, one flow each.
    send_syns(&rig, &gateway_mac, 41000);
    let forwarded =
        stats_until(&rig, |s| s["total"]["nat_forward"].as_u64() >= Some(total(&flooded, "nat_forward") + SYNS));
    assert!(total(&forwarded, "nat_forward") >= total(&flooded, "nat_forward") + SYNS, "{forwarded}");
    assert_eq!(forwarded["total"]["drops"]["other_host"].as_u64(), Some(SYNS), "{forwarded}");
    // A SYN is forwarded untracked; the flow is made by the client's next
    // segment, here the RST its kernel sends to the backend's SYN-ACK (the
    // raw SYNs have no socket). So one connection per SYN shows that each
    // reached a backend, was answered and the answer came back.
    let deadline = Instant::now() + Duration::from_secs(5);
    while web_connections(&rig) < SYNS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(web_connections(&rig), SYNS, "one connection per SYN");

    let left = rig.teardown();
    left.assert_clean();
}
