//! The text for people: aligned tables and the `ipvsadm`-like listing.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use vipgate_controlplane::api::pb;

use crate::json::{
    BackendJson, BondMemberJson, CountersJson, HealthCheckJson, HealthJson, PoolJson, ServiceJson, StateJson, StatsJson,
};

/// `vipgatectl health`.
pub(crate) fn health_table(h: &HealthJson) -> String {
    let rows = [
        vec!["status".to_owned(), h.status.to_owned()],
        vec!["version".to_owned(), h.version.clone()],
        vec!["uptime".to_owned(), format_uptime(h.uptime_seconds)],
        vec!["workers".to_owned(), h.workers.to_string()],
        vec!["ports".to_owned(), h.ports.to_string()],
    ];
    let mut rows = rows.to_vec();
    if !h.reason.is_empty() {
        rows.insert(1, vec!["reason".to_owned(), h.reason.clone()]);
    }
    if h.uplinks_down {
        rows.push(vec!["uplinks".to_owned(), "all down: no VIP is announced".to_owned()]);
    }
    let mut out = table(None, &rows, 2);
    if !h.links.is_empty() {
        let links: Vec<Vec<String>> = h
            .links
            .iter()
            .map(|l| {
                vec![
                    l.name.clone(),
                    l.link.to_owned(),
                    if l.speed_mbps == 0 { "-".to_owned() } else { format_speed(l.speed_mbps) },
                    if l.duplex.is_empty() { "-".to_owned() } else { l.duplex.to_owned() },
                    if l.uplink { "yes" } else { "no" }.to_owned(),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(Some(&["port", "link", "speed", "duplex", "uplink"]), &links, 5));
    }
    let members: Vec<Vec<String>> = h
        .links
        .iter()
        .flat_map(|l| {
            l.members.iter().map(|m| {
                vec![
                    l.name.clone(),
                    m.device.clone(),
                    m.link.to_owned(),
                    lacp_summary(m),
                    m.actor.as_ref().map_or_else(|| "-".to_owned(), |p| lacp_flags(p.state)),
                    m.partner.as_ref().map_or_else(|| "-".to_owned(), |p| lacp_flags(p.state)),
                    m.rx_packets.to_string(),
                    m.tx_packets.to_string(),
                ]
            })
        })
        .collect();
    if !members.is_empty() {
        out.push('\n');
        out.push_str(&table(
            Some(&["bond", "member", "link", "lacp", "actor", "partner", "rx_packets", "tx_packets"]),
            &members,
            6,
        ));
    }
    out
}

/// LACP state bits, as Linux's bonding driver abbreviates them in
/// /proc/net/bonding: `ACT,TMO,AGG,SYNC,COL,DIST,DEF,EXP`.
fn lacp_flags(state: u32) -> String {
    const SHORT: [&str; 8] = ["ACT", "TMO", "AGG", "SYNC", "COL", "DIST", "DEF", "EXP"];
    let names: Vec<&str> = (0..8).filter(|b| state & (1 << b) != 0).map(|b| SHORT[b]).collect();
    if names.is_empty() { "-".to_owned() } else { names.join(",") }
}

/// What a bond member's LACP state means, in a few words: "in use", or
/// the first thing that keeps it from carrying traffic.
fn lacp_summary(m: &BondMemberJson) -> String {
    const SYNC_COL_DIST: u32 = 0x08 | 0x10 | 0x20;
    const DEFAULTED: u32 = 0x40;
    if m.in_use {
        return "in use".to_owned();
    }
    if m.link == "down" {
        return "link down".to_owned();
    }
    if !m.active {
        return "inactive".to_owned();
    }
    let (Some(actor), Some(partner)) = (&m.actor, &m.partner) else { return "unknown".to_owned() };
    if actor.key == 0 {
        // The bond gives a member no key while its link reads down or
        // half duplex, and runs no LACP on it.
        "no LACP (link down or half duplex)".to_owned()
    } else if actor.state & DEFAULTED != 0 {
        "no partner (no LACPDU received)".to_owned()
    } else if m.selection != "selected" {
        m.selection.to_owned()
    } else if partner.state & SYNC_COL_DIST != SYNC_COL_DIST {
        "partner not collecting/distributing".to_owned()
    } else {
        "attaching".to_owned()
    }
}

/// `10000` -> `10 Gb/s`, `2500` -> `2.5 Gb/s`, `100` -> `100 Mb/s`.
fn format_speed(mbps: u32) -> String {
    if mbps < 1000 { format!("{mbps} Mb/s") } else { format!("{} Gb/s", f64::from(mbps) / 1000.0) }
}

/// `93784` -> `1d 2h 3m 4s`.
fn format_uptime(seconds: u64) -> String {
    let (d, h, m, s) = (seconds / 86_400, seconds / 3_600 % 24, seconds / 60 % 60, seconds % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m {s}s"),
    }
}

/// `vipgatectl stats` (`all`: with the drop reasons that counted nothing).
pub(crate) fn stats_tables(stats: &StatsJson, all: bool) -> String {
    let mut out = String::new();

    // Workers, one row each, then their total.
    let header = [
        "WORKER",
        "RX_PKTS",
        "RX_BYTES",
        "TX_PKTS",
        "TX_BYTES",
        "NAT_FWD",
        "NAT_REV",
        "ARP_REPLY",
        "ARP_REQ",
        "ICMP_ECHO",
        "DROPS",
        "CONSUMED",
        "FLOWS",
        "NEW_FLOWS",
        "HANDOFF_OUT",
        "HANDOFF_IN",
        "TO_KERNEL",
        "FROM_KERNEL",
        "BUSY_POLLS",
        "BUSY_CYCLES",
    ];
    let counter_row = |label: String, c: &CountersJson| {
        let values = [
            c.rx_packets,
            c.rx_bytes,
            c.tx_packets,
            c.tx_bytes,
            c.nat_forward,
            c.nat_reverse,
            c.arp_replies,
            c.arp_requests,
            c.icmp_echo_replies,
            c.drops.total(),
            c.consumed,
            c.flows_active,
            c.flows_created,
            c.handoff_out,
            c.handoff_in,
            c.to_kernel,
            c.from_kernel,
            c.busy_polls,
            c.busy_cycles,
        ];
        std::iter::once(label).chain(values.iter().map(u64::to_string)).collect::<Vec<_>>()
    };
    let mut rows: Vec<Vec<String>> =
        stats.workers.iter().map(|w| counter_row(format!("lcore {}", w.lcore), &w.counters)).collect();
    rows.push(counter_row("total".to_owned(), &stats.total));
    out.push_str(&table(Some(&header), &rows, 1));

    // Drops by reason: the total, then each worker's share.
    let mut header = vec!["DROP_REASON".to_owned(), "TOTAL".to_owned()];
    header.extend(stats.workers.iter().map(|w| format!("LCORE {}", w.lcore)));
    let rows: Vec<Vec<String>> = stats
        .total
        .drops
        .0
        .iter()
        .filter(|(_, total)| all || *total != 0)
        .map(|(reason, total)| {
            let mut row = vec![reason.clone(), total.to_string()];
            row.extend(stats.workers.iter().map(|w| w.counters.drops.get(reason).to_string()));
            row
        })
        .collect();
    out.push('\n');
    if rows.is_empty() {
        out.push_str("no drops\n");
    } else {
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        out.push_str(&table(Some(&header), &rows, 1));
    }

    if !stats.ports.is_empty() {
        let header = [
            "PORT",
            "NAME",
            "MAC",
            "IPACKETS",
            "IBYTES",
            "IMISSED",
            "IERRORS",
            "RX_NOMBUF",
            "OPACKETS",
            "OBYTES",
            "OERRORS",
        ];
        let rows: Vec<Vec<String>> = stats
            .ports
            .iter()
            .map(|p| {
                let mut row = vec![p.port_id.to_string(), p.name.clone(), p.mac.clone()];
                let values = [p.ipackets, p.ibytes, p.imissed, p.ierrors, p.rx_nombuf, p.opackets, p.obytes, p.oerrors];
                row.extend(values.iter().map(u64::to_string));
                row
            })
            .collect();
        out.push('\n');
        out.push_str(&table(Some(&header), &rows, 3));
    }

    let m = &stats.mempool;
    let percent = if m.size == 0 { 0.0 } else { m.in_use as f64 * 100.0 / m.size as f64 };
    let _ = writeln!(out, "\nmempool {}: {} of {} mbufs in use ({percent:.1}%)", m.name, m.in_use, m.size);
    out
}

/// Aligns `rows` under `header`: the first `text_columns` columns to the
/// left, the numbers after them to the right.
fn table(header: Option<&[&str]>, rows: &[Vec<String>], text_columns: usize) -> String {
    let header: Option<Vec<String>> = header.map(|h| h.iter().map(|s| (*s).to_owned()).collect());
    let all_rows: Vec<&Vec<String>> = header.iter().chain(rows).collect();
    columns(&all_rows, |c| c >= text_columns)
}

/// Rows in columns two spaces apart, each as wide as its widest cell: the
/// columns `right` says to the right, the others to the left.
fn columns(rows: &[&Vec<String>], right: impl Fn(usize) -> bool) -> String {
    let count = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..count)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            let width = widths[c];
            let _ = if right(c) { write!(line, "{cell:>width$}") } else { write!(line, "{cell:<width$}") };
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `ipvsadm -Ln` (or with `traffic`, `ipvsadm -Ln --stats`) in
/// vipgate's terms: forwarding "Masq" is nat, "FullNat" fullnat and
/// "Tunnel" dsr (IPIP).
pub(crate) fn list_text(s: &StateJson, traffic: bool) -> String {
    let mut out = format!("vipgate state version {} (config {})\n", s.version, s.config_file);
    let mut services: Vec<&ServiceJson> = s.services.iter().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    if services.is_empty() {
        out.push_str("no services\n");
    }
    let forward = |mode: &str| match mode {
        "fullnat" => "FullNat",
        "dsr" => "Tunnel",
        _ => "Masq",
    };
    let n = |v: Option<&pb::TrafficStats>, read: fn(&pb::TrafficStats) -> u64| {
        v.map_or("-".to_owned(), |t| read(t).to_string())
    };
    let mut rows: Vec<Vec<String>> = Vec::new();
    if traffic {
        rows.push(
            ["Prot LocalAddress:Port", "", "Conns", "InPkts", "OutPkts", "InBytes", "OutBytes", "Service"]
                .map(str::to_owned)
                .to_vec(),
        );
        rows.push(["  -> RemoteAddress:Port", "", "", "", "", "", "", ""].map(str::to_owned).to_vec());
    } else {
        rows.push(["Prot LocalAddress:Port", "Mode", "Table", "", "", "Service"].map(str::to_owned).to_vec());
        rows.push(
            ["  -> RemoteAddress:Port", "Forward", "Weight", "ActiveConn", "InActConn", "State"]
                .map(str::to_owned)
                .to_vec(),
        );
    }
    for svc in services {
        let mut name = format!("{} ({}", svc.name, svc.origin.as_deref().unwrap_or(""));
        if !svc.source_pool.is_empty() {
            name.push_str(&format!(", source-pool {}", svc.source_pool));
        }
        if !svc.tunnel_source.is_empty() {
            name.push_str(&format!(", tunnel-source {}", svc.tunnel_source));
        }
        name.push_str(&format!(", on-removal {}", svc.on_backend_removal));
        if let Some(h) = &svc.health_check {
            name.push_str(&format!(", check {}", health_check_summary(h)));
        }
        if let Some(l) = &svc.new_flow_limit {
            name.push_str(&format!(", {}", new_flow_limit_summary(l)));
        }
        if !svc.source_ranges.is_empty() {
            name.push_str(&format!(", {}", source_ranges_summary(&svc.source_ranges)));
        }
        if !svc.affinity.is_empty() && svc.affinity != "none" {
            name.push_str(&format!(", affinity {}", svc.affinity));
        }
        name.push(')');
        let local = format!("{:<4} {}:{}", svc.protocol.to_uppercase(), svc.vip, svc.port);
        let st = svc.stats.as_ref();
        rows.push(if traffic {
            vec![
                local,
                String::new(),
                n(st, |t| t.connections),
                n(st, |t| t.in_packets),
                n(st, |t| t.out_packets),
                n(st, |t| t.in_bytes),
                n(st, |t| t.out_bytes),
                name,
            ]
        } else {
            vec![local, svc.mode.clone(), svc.table_size.to_string(), String::new(), String::new(), name]
        });
        let mut backends: Vec<&BackendJson> = svc.backends.iter().collect();
        backends.sort_by_key(|b| (b.address.parse::<Ipv4Addr>().ok(), b.port));
        for b in backends {
            let remote = format!("  -> {}:{}", b.address, b.port);
            let bt = b.stats.as_ref();
            rows.push(if traffic {
                vec![
                    remote,
                    String::new(),
                    n(bt, |t| t.connections),
                    n(bt, |t| t.in_packets),
                    n(bt, |t| t.out_packets),
                    n(bt, |t| t.in_bytes),
                    n(bt, |t| t.out_bytes),
                    String::new(),
                ]
            } else {
                vec![
                    remote,
                    forward(&svc.mode).to_owned(),
                    b.weight.unwrap_or(1).to_string(),
                    n(bt, |t| t.active_flows),
                    n(bt, |t| t.inactive_flows),
                    match b.health.as_str() {
                        "" | "unchecked" => b.state.clone(),
                        "down" if !b.health_reason.is_empty() => {
                            format!("{}, down ({})", b.state, b.health_reason)
                        }
                        h => format!("{}, {h}", b.state),
                    },
                ]
            });
        }
    }
    let right: &[bool] = if traffic {
        &[false, false, true, true, true, true, true, false]
    } else {
        &[false, false, true, true, true, false]
    };
    let rows: Vec<&Vec<String>> = rows.iter().collect();
    out.push_str(&columns(&rows, |c| right[c]));
    if !s.source_pools.is_empty() {
        out.push_str("source pools:\n");
    }
    let mut pools: Vec<&PoolJson> = s.source_pools.iter().collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    for p in pools {
        out.push_str(&format!(
            "  {}  {}  ports {}-{}  {}\n",
            p.name,
            p.addresses.join(","),
            p.first_port,
            p.last_port,
            p.origin.as_deref().unwrap_or("")
        ));
    }
    out
}

/// `http GET /healthz every 5000 ms (timeout 2000, rise 2, fall 3)`.
fn health_check_summary(h: &HealthCheckJson) -> String {
    let what = match h.kind.as_str() {
        "http" | "https" => format!("{} GET {} expect {}", h.kind, h.path, h.expect_status),
        "udp" => format!("udp payload {} bytes", h.payload_hex.len() / 2),
        k => k.to_owned(),
    };
    let port = if h.port == 0 { String::new() } else { format!(" port {}", h.port) };
    format!("{what}{port} every {} ms (timeout {}, rise {}, fall {})", h.interval_ms, h.timeout_ms, h.rise, h.fall)
}

/// For the listing, e.g. "sources 10.0.0.0/8 192.0.2.0/24", the first
/// three prefixes and how many more.
fn source_ranges_summary(ranges: &[String]) -> String {
    let mut s = format!("sources {}", ranges.iter().take(3).map(String::as_str).collect::<Vec<_>>().join(" "));
    if ranges.len() > 3 {
        s.push_str(&format!(" (+{} more)", ranges.len() - 3));
    }
    s
}

/// For the listing, e.g. "new-flows 100/s burst 200 per /24".
fn new_flow_limit_summary(l: &pb::NewFlowLimit) -> String {
    format!("new-flows {}/s burst {} per /{}", l.per_second, l.burst, l.prefix_len.unwrap_or(32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::PortLinkJson;

    fn link(name: &str, link: &'static str, speed_mbps: u32, uplink: bool) -> PortLinkJson {
        let duplex = if link == "up" { "full" } else { "" };
        PortLinkJson {
            name: name.to_owned(),
            port_id: 0,
            link,
            speed_mbps,
            duplex,
            uplink,
            active_members: None,
            members: Vec::new(),
        }
    }

    #[test]
    fn health_lists_bond_members_with_their_lacp_state_and_what_keeps_one_out() {
        use crate::json::LacpPeerJson;
        let peer = |state: u32| LacpPeerJson {
            system: "02:00:00:00:00:01".to_owned(),
            system_priority: 65535,
            key: 33,
            port: 1,
            state,
            flags: Vec::new(),
        };
        let member = |device: &str, active: bool, actor: u32, partner: u32, in_use: bool| BondMemberJson {
            device: device.to_owned(),
            port_id: 1,
            link: if active { "up" } else { "down" },
            speed_mbps: 0,
            active,
            selection: if active { "selected" } else { "unknown" },
            in_use,
            actor: active.then(|| peer(actor)),
            partner: active.then(|| peer(partner)),
            rx_packets: 10,
            tx_packets: 20,
            rx_bytes: 0,
            tx_bytes: 0,
        };
        let mut uplink = link("uplink", "up", 0, true);
        uplink.active_members = Some(2);
        uplink.members = vec![
            member("net_tap0", true, 0x3d, 0x3f, true),
            member("net_tap1", true, 0x0d, 0x07, false),
            member("net_tap2", true, 0x45, 0x05, false),
            member("net_tap3", false, 0, 0, false),
            {
                let mut half = member("net_tap4", true, 0x05, 0x05, false);
                half.actor.as_mut().unwrap().key = 0;
                half
            },
        ];
        let h = HealthJson {
            status: "SERVING",
            serving: true,
            version: "0.1.0".to_owned(),
            uptime_seconds: 13,
            workers: 1,
            ports: 1,
            reason: String::new(),
            links: vec![uplink],
            uplinks_down: false,
        };
        let text = health_table(&h);
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip_while(|l| !l.starts_with("bond"))
            .map(|l| l.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect())
            .collect();
        assert_eq!(
            rows[0],
            ["bond", "member", "link", "lacp", "actor", "partner", "rx_packets", "tx_packets"],
            "{text}"
        );
        assert_eq!(
            rows[1],
            ["uplink", "net_tap0", "up", "in use", "ACT,AGG,SYNC,COL,DIST", "ACT,TMO,AGG,SYNC,COL,DIST", "10", "20"],
            "{text}"
        );
        assert_eq!(rows[2][3], "partner not collecting/distributing", "{text}");
        assert_eq!(rows[3][3], "no partner (no LACPDU received)", "{text}");
        assert_eq!(rows[4][3..6], ["link down", "-", "-"], "{text}");
        assert_eq!(rows[5][3], "no LACP (link down or half duplex)", "{text}");
    }

    #[test]
    fn health_lists_each_ports_link_and_says_when_every_uplink_is_down() {
        let mut h = HealthJson {
            status: "SERVING",
            serving: true,
            version: "0.1.0".to_owned(),
            uptime_seconds: 13,
            workers: 1,
            ports: 2,
            reason: String::new(),
            links: vec![link("outside", "up", 25_000, true), link("inside", "up", 2_500, false)],
            uplinks_down: false,
        };
        assert_eq!(
            health_table(&h),
            "status   SERVING\nversion  0.1.0\nuptime   13s\nworkers  1\nports    2\n\n\
             port     link  speed     duplex  uplink\n\
             outside  up    25 Gb/s   full    yes\n\
             inside   up    2.5 Gb/s  full    no\n"
        );
        h.links = vec![link("outside", "down", 0, true), link("inside", "unknown", 0, false)];
        h.uplinks_down = true;
        let text = health_table(&h);
        assert!(text.contains("\nuplinks  all down: no VIP is announced\n"), "{text}");
        assert!(text.contains("\noutside  down     -      -       yes\n"), "{text}");
        assert!(text.contains("\ninside   unknown  -      -       no\n"), "{text}");
        assert_eq!(format_speed(100), "100 Mb/s");
    }
}
