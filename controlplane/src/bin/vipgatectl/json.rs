//! The JSON documents `--json` prints, and the shapes `apply` reads.
//!
//! Their field names and order are an interface: scripts and tests parse
//! them, so fields are only ever added. A protobuf message whose JSON form
//! is exactly its fields is printed as it is (its serde derive is in
//! build.rs); the structs here mirror the others, because their JSON differs
//! from the message's fields: enums by name rather than number, bytes in
//! hexadecimal, drops as an object, another field order, or fields joined
//! from another call.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};
use vipgate_controlplane::api::pb;
use vipgate_controlplane::link::LacpState;

use crate::error::CtlError;

/// A document, pretty-printed, with a final newline.
pub(crate) fn json(value: &impl Serialize) -> Result<String, CtlError> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    Ok(text)
}

/// `vipgatectl health --json`.
#[derive(Debug, Serialize)]
pub(crate) struct HealthJson {
    /// "SERVING", "NOT_SERVING" or "UNSPECIFIED".
    pub(crate) status: &'static str,
    /// `status == "SERVING"`, for scripts that want a boolean.
    pub(crate) serving: bool,
    pub(crate) version: String,
    pub(crate) uptime_seconds: u64,
    pub(crate) workers: u32,
    pub(crate) ports: u32,
    /// Why it is not serving; empty while it serves.
    pub(crate) reason: String,
    /// Each port's link, in port id order.
    pub(crate) links: Vec<PortLinkJson>,
    /// Every uplink port is down: no VIP is announced.
    pub(crate) uplinks_down: bool,
}

/// One port's link in `vipgatectl health --json`.
#[derive(Debug, Serialize)]
pub(crate) struct PortLinkJson {
    pub(crate) name: String,
    pub(crate) port_id: u32,
    /// "up", "down" or "unknown" (the driver does not report it).
    pub(crate) link: &'static str,
    /// Mb/s while up; 0 when down or not reported.
    pub(crate) speed_mbps: u32,
    /// "full" or "half" while up; empty otherwise.
    pub(crate) duplex: &'static str,
    /// The port reaches the routers.
    pub(crate) uplink: bool,
    /// For a bond: how many members it counts active (absent for other
    /// ports).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) active_members: Option<u32>,
    /// For a bond: its members (absent for other ports).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) members: Vec<BondMemberJson>,
}

/// One bond member in `vipgatectl health --json`.
#[derive(Debug, Serialize)]
pub(crate) struct BondMemberJson {
    pub(crate) device: String,
    pub(crate) port_id: u32,
    /// "up", "down" or "unknown".
    pub(crate) link: &'static str,
    pub(crate) speed_mbps: u32,
    /// The bond counts it active (link up): LACP runs on it.
    pub(crate) active: bool,
    /// "selected", "standby", "unselected", or "unknown" (not active).
    pub(crate) selection: &'static str,
    /// It carries traffic both ways (both sides in sync, collecting and
    /// distributing).
    pub(crate) in_use: bool,
    /// What the gateway advertises; null while not active.
    pub(crate) actor: Option<LacpPeerJson>,
    /// What the other end advertises; null while not active.
    pub(crate) partner: Option<LacpPeerJson>,
    pub(crate) rx_packets: u64,
    pub(crate) tx_packets: u64,
    pub(crate) rx_bytes: u64,
    pub(crate) tx_bytes: u64,
}

/// One side of LACP on a member.
#[derive(Debug, Serialize)]
pub(crate) struct LacpPeerJson {
    pub(crate) system: String,
    pub(crate) system_priority: u32,
    pub(crate) key: u32,
    pub(crate) port: u32,
    /// The state bits, as a number.
    pub(crate) state: u32,
    /// The names of the bits set: "activity", "short_timeout",
    /// "aggregation", "synchronization", "collecting", "distributing",
    /// "defaulted", "expired".
    pub(crate) flags: Vec<&'static str>,
}

impl From<pb::LacpPeer> for LacpPeerJson {
    fn from(p: pb::LacpPeer) -> Self {
        let flags = LacpState(p.state as u8).names();
        LacpPeerJson {
            system: p.system,
            system_priority: p.system_priority,
            key: p.key,
            port: p.port,
            state: p.state,
            flags,
        }
    }
}

fn link_name(state: pb::LinkState) -> &'static str {
    match state {
        pb::LinkState::Up => "up",
        pb::LinkState::Down => "down",
        pb::LinkState::Unspecified => "unknown",
    }
}

impl From<pb::BondMember> for BondMemberJson {
    fn from(m: pb::BondMember) -> Self {
        // `selection()` maps values this client does not know to Unspecified.
        let selection = match m.selection() {
            pb::LacpSelection::Selected => "selected",
            pb::LacpSelection::Standby => "standby",
            pb::LacpSelection::Unselected => "unselected",
            pb::LacpSelection::Unspecified => "unknown",
        };
        BondMemberJson {
            link: link_name(m.state()),
            device: m.device,
            port_id: m.port_id,
            speed_mbps: m.speed_mbps,
            active: m.active,
            selection,
            in_use: m.in_use,
            actor: m.actor.map(LacpPeerJson::from),
            partner: m.partner.map(LacpPeerJson::from),
            rx_packets: m.rx_packets,
            tx_packets: m.tx_packets,
            rx_bytes: m.rx_bytes,
            tx_bytes: m.tx_bytes,
        }
    }
}

impl From<pb::PortLink> for PortLinkJson {
    fn from(l: pb::PortLink) -> Self {
        // `state()` maps values this client does not know to Unspecified.
        let link = link_name(l.state());
        let duplex = match (link, l.full_duplex) {
            ("up", true) => "full",
            ("up", false) => "half",
            _ => "",
        };
        let bond = !l.members.is_empty();
        PortLinkJson {
            name: l.name,
            port_id: l.port_id,
            link,
            speed_mbps: l.speed_mbps,
            duplex,
            uplink: l.uplink,
            active_members: bond.then_some(l.active_members),
            members: l.members.into_iter().map(BondMemberJson::from).collect(),
        }
    }
}

impl From<pb::GetHealthResponse> for HealthJson {
    fn from(h: pb::GetHealthResponse) -> Self {
        // `status()` maps values this client does not know to Unspecified.
        let (status, serving) = match h.status() {
            pb::ServingStatus::Serving => ("SERVING", true),
            pb::ServingStatus::NotServing => ("NOT_SERVING", false),
            pb::ServingStatus::Unspecified => ("UNSPECIFIED", false),
        };
        HealthJson {
            status,
            serving,
            version: h.version,
            uptime_seconds: h.uptime_seconds,
            workers: h.workers,
            ports: h.ports,
            reason: h.reason,
            links: h.links.into_iter().map(PortLinkJson::from).collect(),
            uplinks_down: h.uplinks_down,
        }
    }
}

/// `vipgatectl stats --json`.
#[derive(Debug, Serialize)]
pub(crate) struct StatsJson {
    pub(crate) workers: Vec<WorkerJson>,
    pub(crate) total: CountersJson,
    pub(crate) ports: Vec<pb::PortStats>,
    pub(crate) mempool: pb::MempoolStats,
}

/// One worker: its lcore next to its counters, and the snapshot it
/// forwards with (`WorkerCounters.snapshot`: the version and generation of
/// the snapshot a worker last loaded, whether it sleeps idle, and when it
/// loaded it on the gateway host's CLOCK_MONOTONIC).
#[derive(Debug, Serialize)]
pub(crate) struct WorkerJson {
    pub(crate) lcore: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) snapshot: Option<pb::WorkerSnapshot>,
    /// TSC cycles per packet in busy iterations since start.
    pub(crate) busy_cycles_per_packet: f64,
    /// Mbufs in use in the pool this worker receives into.
    pub(crate) mempool_in_use: u64,
    #[serde(flatten)]
    pub(crate) counters: CountersJson,
}

/// A worker's counters, or their total.
#[derive(Debug, Default, Serialize)]
pub(crate) struct CountersJson {
    pub(crate) rx_packets: u64,
    pub(crate) rx_bytes: u64,
    pub(crate) tx_packets: u64,
    pub(crate) tx_bytes: u64,
    pub(crate) nat_forward: u64,
    pub(crate) nat_reverse: u64,
    pub(crate) arp_replies: u64,
    pub(crate) arp_requests: u64,
    pub(crate) icmp_echo_replies: u64,
    pub(crate) busy_polls: u64,
    pub(crate) busy_cycles: u64,
    pub(crate) drops: Drops,
    pub(crate) consumed: u64,
    pub(crate) flows_created: u64,
    pub(crate) flows_evicted: u64,
    pub(crate) flows_rehashed: u64,
    pub(crate) flows_active: u64,
    pub(crate) flows_reset: u64,
    pub(crate) handoff_out: u64,
    pub(crate) handoff_in: u64,
    pub(crate) icmp_frag_needed: u64,
    pub(crate) icmp_time_exceeded: u64,
    pub(crate) icmp_errors_forwarded: u64,
    pub(crate) fragments_forwarded: u64,
    pub(crate) fragments_held: u64,
    pub(crate) fragments_released: u64,
    pub(crate) fragments_discarded: u64,
    pub(crate) to_kernel: u64,
    pub(crate) to_kernel_bytes: u64,
    pub(crate) from_kernel: u64,
    pub(crate) from_kernel_bytes: u64,
    pub(crate) to_kernel_control: u64,
}

/// Drops by reason, as a JSON object in the server's reason order (a map
/// type would sort the keys or lose the order).
#[derive(Debug, Default)]
pub(crate) struct Drops(pub(crate) Vec<(String, u64)>);

impl Drops {
    /// Packets dropped for `reason`; zero for a reason not listed.
    pub(crate) fn get(&self, reason: &str) -> u64 {
        self.0.iter().find(|(r, _)| r == reason).map_or(0, |(_, n)| *n)
    }

    /// Packets dropped for any reason.
    pub(crate) fn total(&self) -> u64 {
        self.0.iter().fold(0u64, |sum, (_, n)| sum.wrapping_add(*n))
    }
}

impl Serialize for Drops {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (reason, packets) in &self.0 {
            map.serialize_entry(reason, packets)?;
        }
        map.end()
    }
}

impl From<pb::GetCountersResponse> for StatsJson {
    fn from(r: pb::GetCountersResponse) -> Self {
        StatsJson {
            workers: r
                .workers
                .into_iter()
                .map(|w| WorkerJson {
                    lcore: w.lcore,
                    snapshot: w.snapshot,
                    busy_cycles_per_packet: w.busy_cycles_per_packet,
                    mempool_in_use: w.mempool_in_use,
                    counters: w.counters.map(CountersJson::from).unwrap_or_default(),
                })
                .collect(),
            total: r.total.map(CountersJson::from).unwrap_or_default(),
            ports: r.ports,
            mempool: r.mempool.unwrap_or_default(),
        }
    }
}

impl From<pb::PacketCounters> for CountersJson {
    fn from(c: pb::PacketCounters) -> Self {
        CountersJson {
            rx_packets: c.rx_packets,
            rx_bytes: c.rx_bytes,
            tx_packets: c.tx_packets,
            tx_bytes: c.tx_bytes,
            nat_forward: c.nat_forward,
            nat_reverse: c.nat_reverse,
            arp_replies: c.arp_replies,
            arp_requests: c.arp_requests,
            icmp_echo_replies: c.icmp_echo_replies,
            busy_polls: c.busy_polls,
            busy_cycles: c.busy_cycles,
            drops: Drops(c.drops.into_iter().map(|d| (d.reason, d.packets)).collect()),
            consumed: c.consumed,
            flows_created: c.flows_created,
            flows_evicted: c.flows_evicted,
            flows_rehashed: c.flows_rehashed,
            flows_active: c.flows_active,
            flows_reset: c.flows_reset,
            handoff_out: c.handoff_out,
            handoff_in: c.handoff_in,
            icmp_frag_needed: c.icmp_frag_needed,
            icmp_time_exceeded: c.icmp_time_exceeded,
            icmp_errors_forwarded: c.icmp_errors_forwarded,
            fragments_forwarded: c.fragments_forwarded,
            fragments_held: c.fragments_held,
            fragments_released: c.fragments_released,
            fragments_discarded: c.fragments_discarded,
            to_kernel: c.to_kernel,
            to_kernel_bytes: c.to_kernel_bytes,
            from_kernel: c.from_kernel,
            from_kernel_bytes: c.from_kernel_bytes,
            to_kernel_control: c.to_kernel_control,
        }
    }
}

// The desired state: `list --json` prints these, and `apply` reads the same
// shapes (without `origin`, or with origin "dynamic").

/// `vipgatectl list --json`.
#[derive(Debug, Serialize)]
pub(crate) struct StateJson {
    pub(crate) version: u64,
    pub(crate) config_file: String,
    pub(crate) services: Vec<ServiceJson>,
    pub(crate) source_pools: Vec<PoolJson>,
    /// Each owner's generation.
    pub(crate) generations: std::collections::BTreeMap<String, u64>,
}

/// A service.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServiceJson {
    pub(crate) name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) origin: Option<String>,
    /// Who manages it (dynamic services); empty in a file: the caller.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) owner: String,
    pub(crate) protocol: String,
    pub(crate) vip: String,
    pub(crate) port: u32,
    #[serde(default)]
    pub(crate) mode: String,
    #[serde(default)]
    pub(crate) source_pool: String,
    #[serde(default)]
    pub(crate) tunnel_source: String,
    #[serde(default)]
    pub(crate) table_size: u32,
    #[serde(default)]
    pub(crate) on_backend_removal: String,
    #[serde(default)]
    pub(crate) backends: Vec<BackendJson>,
    /// Output only (`list --json`, from `GetServiceStats`); `apply`
    /// ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) stats: Option<pb::TrafficStats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) health_check: Option<HealthCheckJson>,
    /// The limit on new flows per client source. In `apply`, `burst` 0 or
    /// absent is the rate, and `prefix_len` absent is 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) new_flow_limit: Option<pb::NewFlowLimit>,
    /// The client prefixes served; absent or empty: every client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) source_ranges: Vec<String>,
    /// "none" or "client_ip"; absent in `apply`: "none".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) affinity: String,
}

/// A service's health check. Zero and empty fields take vipgated's
/// defaults; `list` shows every field in force. UDP bytes are written
/// in hexadecimal.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthCheckJson {
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) interval_ms: u32,
    #[serde(default)]
    pub(crate) timeout_ms: u32,
    #[serde(default)]
    pub(crate) rise: u32,
    #[serde(default)]
    pub(crate) fall: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) port: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) host: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) expect_status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) payload_hex: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) expect_reply_hex: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) source: String,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl From<pb::HealthCheck> for HealthCheckJson {
    fn from(h: pb::HealthCheck) -> Self {
        HealthCheckJson {
            kind: h.kind,
            interval_ms: h.interval_ms,
            timeout_ms: h.timeout_ms,
            rise: h.rise,
            fall: h.fall,
            port: h.port,
            path: h.path,
            host: h.host,
            expect_status: h.expect_status,
            payload_hex: hex(&h.payload),
            expect_reply_hex: hex(&h.expect_reply),
            source: h.source,
        }
    }
}

impl HealthCheckJson {
    /// The message; `field` names the check in an error (`--check`,
    /// `services[0].health_check`).
    pub(crate) fn into_proto(self, field: &str) -> Result<pb::HealthCheck, String> {
        let bytes = |s: &str, name: &str| {
            vipgate_controlplane::config::health_check::parse_hex(s).map_err(|e| format!("{field}.{name}: {e}"))
        };
        Ok(pb::HealthCheck {
            payload: bytes(&self.payload_hex, "payload_hex")?,
            expect_reply: bytes(&self.expect_reply_hex, "expect_reply_hex")?,
            kind: self.kind,
            interval_ms: self.interval_ms,
            timeout_ms: self.timeout_ms,
            rise: self.rise,
            fall: self.fall,
            port: self.port,
            path: self.path,
            host: self.host,
            expect_status: self.expect_status,
            source: self.source,
        })
    }
}

impl StateJson {
    /// Adds each service's and backend's figures (a disabled backend is
    /// not in the forwarding state and gets none).
    pub(crate) fn join(&mut self, stats: pb::GetServiceStatsResponse) {
        let mut by_name: std::collections::HashMap<String, pb::ServiceStats> =
            stats.services.into_iter().map(|s| (s.name.clone(), s)).collect();
        for svc in &mut self.services {
            let Some(s) = by_name.remove(&svc.name) else { continue };
            svc.stats = s.stats;
            let mut backends: std::collections::HashMap<(String, u32), pb::BackendStats> =
                s.backends.into_iter().map(|b| ((b.address.clone(), b.port), b)).collect();
            for b in &mut svc.backends {
                b.stats = backends.remove(&(b.address.clone(), b.port)).and_then(|b| b.stats);
            }
        }
    }
}

/// A backend of a service.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackendJson {
    pub(crate) address: String,
    pub(crate) port: u32,
    /// Unset in a file means 1.
    #[serde(default)]
    pub(crate) weight: Option<u32>,
    /// "enabled", "draining" or "disabled".
    #[serde(default = "enabled")]
    pub(crate) state: String,
    /// Output only (`list --json`); `apply` ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) stats: Option<pb::TrafficStats>,
    /// Output only: "unchecked", "up" or "down" (ignored by apply).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) health: String,
    /// Output only: why it is down.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) health_reason: String,
}

fn enabled() -> String {
    "enabled".to_owned()
}

/// A FullNAT source pool.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PoolJson {
    pub(crate) name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) origin: Option<String>,
    /// Who manages it (dynamic pools); empty in a file: the caller.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) owner: String,
    pub(crate) addresses: Vec<String>,
    #[serde(default)]
    pub(crate) first_port: u32,
    #[serde(default)]
    pub(crate) last_port: u32,
}

impl From<pb::GetStateResponse> for StateJson {
    fn from(s: pb::GetStateResponse) -> Self {
        StateJson {
            version: s.version,
            config_file: s.config_file,
            services: s.services.into_iter().map(ServiceJson::from).collect(),
            source_pools: s.source_pools.into_iter().map(PoolJson::from).collect(),
            generations: s.generations.into_iter().collect(),
        }
    }
}

impl From<pb::Service> for ServiceJson {
    fn from(s: pb::Service) -> Self {
        ServiceJson {
            origin: Some(origin_name(s.origin).to_owned()),
            owner: s.owner,
            name: s.name,
            protocol: s.protocol,
            vip: s.vip,
            port: s.port,
            mode: s.mode,
            source_pool: s.source_pool,
            tunnel_source: s.tunnel_source,
            table_size: s.table_size,
            on_backend_removal: s.on_backend_removal,
            backends: s
                .backends
                .into_iter()
                .map(|b| BackendJson {
                    state: admin_state_name(b.admin_state).to_owned(),
                    address: b.address,
                    port: b.port,
                    weight: Some(b.weight.unwrap_or(1)),
                    stats: None,
                    health: health_name(b.health).to_owned(),
                    health_reason: b.health_reason,
                })
                .collect(),
            stats: None,
            health_check: s.health_check.map(HealthCheckJson::from),
            new_flow_limit: s.new_flow_limit,
            source_ranges: s.source_ranges,
            affinity: s.affinity,
        }
    }
}

impl From<pb::SourcePool> for PoolJson {
    fn from(p: pb::SourcePool) -> Self {
        PoolJson {
            origin: Some(origin_name(p.origin).to_owned()),
            owner: p.owner,
            name: p.name,
            addresses: p.addresses,
            first_port: p.first_port,
            last_port: p.last_port,
        }
    }
}

/// The name `list` shows for a backend's admin state.
fn admin_state_name(state: i32) -> &'static str {
    match pb::AdminState::try_from(state) {
        Ok(pb::AdminState::Draining) => "draining",
        Ok(pb::AdminState::Disabled) => "disabled",
        Ok(pb::AdminState::Enabled | pb::AdminState::Unspecified) => "enabled",
        Err(_) => "unknown",
    }
}

fn origin_name(origin: i32) -> &'static str {
    match pb::Origin::try_from(origin) {
        Ok(pb::Origin::Static) => "static",
        Ok(pb::Origin::Dynamic) => "dynamic",
        _ => "unspecified",
    }
}

/// The name of a backend's health: "unchecked", "up", "down", or empty
/// for a value this client does not know.
pub(crate) fn health_name(h: i32) -> &'static str {
    match pb::HealthState::try_from(h) {
        Ok(pb::HealthState::Unchecked) => "unchecked",
        Ok(pb::HealthState::Up) => "up",
        Ok(pb::HealthState::Down) => "down",
        _ => "",
    }
}

/// One Watch message with --json.
#[derive(Debug, Serialize)]
pub(crate) struct WatchJson {
    pub(crate) version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) snapshot: Option<StateJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) change: Option<pb::Change>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) health: Option<HealthChangeJson>,
}

/// A backend that went up or down.
#[derive(Debug, Serialize)]
pub(crate) struct HealthChangeJson {
    pub(crate) service: String,
    pub(crate) address: String,
    pub(crate) port: u32,
    pub(crate) health: String,
    pub(crate) reason: String,
}
