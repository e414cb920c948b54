//! The `Gateway` service: health, counters and per-service figures, read
//! through a [`GatewayView`] and turned into the API's messages. Mounted by
//! both listeners, the Unix socket (`server.rs`) and TCP (`tcp.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};
use vipgate_dataplane::counters::{DropReason, WorkerCounters};

use super::pb;
use super::pb::gateway_server::{Gateway, GatewayServer};
use super::view::{BondMemberView, GatewayView, MempoolView, PortLink, PortView};
use crate::link::{LacpPeer, LacpSelection};

/// A worker that has not completed an iteration of its loop for this long
/// is stuck, and the gateway is not serving. A worker completes one every
/// few microseconds while it polls and at least every 10 ms while it sleeps
/// idle, so an idle gateway stays far below it.
pub const WORKER_STALL_LIMIT: Duration = Duration::from_secs(1);

/// Whether `view` serves, and why not if it does not: its workers must run,
/// and each must have completed a loop iteration within
/// [`WORKER_STALL_LIMIT`].
fn serving_status(view: &dyn GatewayView) -> Result<(), String> {
    if !view.serving() {
        return Err("the dataplane workers are not running".to_owned());
    }
    let stuck: Vec<String> = view
        .workers()
        .iter()
        .filter_map(|w| {
            let age = w.since_last_loop?;
            (age >= WORKER_STALL_LIMIT).then(|| format!("lcore {} for {:.1} s", w.lcore, age.as_secs_f64()))
        })
        .collect();
    if stuck.is_empty() { Ok(()) } else { Err(format!("worker loop stalled: {}", stuck.join(", "))) }
}

/// The `Gateway` gRPC service over a [`GatewayView`].
///
/// [`serve_unix`](super::serve_unix) is the usual way to run it; the
/// socket and the TCP listener (`tcp.rs`) both mount it, and the type is
/// public so the daemon can mount it on another server too.
pub struct GatewayService {
    view: Arc<dyn GatewayView>,
    started: Instant,
}

impl GatewayService {
    /// A service reading `view`; its uptime counts from now.
    pub fn new(view: Arc<dyn GatewayView>) -> Self {
        GatewayService { view, started: Instant::now() }
    }

    /// The tonic server wrapper, ready for `Server::add_service`.
    pub fn into_server(self) -> GatewayServer<Self> {
        GatewayServer::new(self)
    }
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn get_health(
        &self,
        _request: Request<pb::GetHealthRequest>,
    ) -> Result<Response<pb::GetHealthResponse>, Status> {
        let (status, reason) = match serving_status(self.view.as_ref()) {
            Ok(()) => (pb::ServingStatus::Serving, String::new()),
            Err(reason) => (pb::ServingStatus::NotServing, reason),
        };
        let ports = self.view.ports();
        let statuses: Vec<_> = ports.iter().map(PortView::link_status).collect();
        Ok(Response::new(pb::GetHealthResponse {
            status: status.into(),
            reason,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
            workers: count(self.view.workers().len()),
            ports: count(ports.len()),
            uplinks_down: crate::link::uplinks_down(&statuses),
            links: ports.iter().map(port_link).collect(),
        }))
    }

    async fn get_counters(
        &self,
        _request: Request<pb::GetCountersRequest>,
    ) -> Result<Response<pb::GetCountersResponse>, Status> {
        Ok(Response::new(counters_response(self.view.as_ref())))
    }

    async fn get_service_stats(
        &self,
        request: Request<pb::GetServiceStatsRequest>,
    ) -> Result<Response<pb::GetServiceStatsResponse>, Status> {
        let name = request.into_inner().service;
        let only = (!name.is_empty()).then_some(name.as_str());
        let services: Vec<pb::ServiceStats> = self.view.service_stats(only).into_iter().map(service_stats).collect();
        if services.is_empty()
            && let Some(name) = only
        {
            return Err(Status::not_found(format!("service {name:?} does not exist")));
        }
        Ok(Response::new(pb::GetServiceStatsResponse { services }))
    }
}

fn traffic(t: &vipgate_dataplane::stats::SlotTotals) -> pb::TrafficStats {
    pb::TrafficStats {
        connections: t.connections,
        in_packets: t.in_packets,
        in_bytes: t.in_bytes,
        out_packets: t.out_packets,
        out_bytes: t.out_bytes,
        active_flows: t.active,
        inactive_flows: t.inactive,
    }
}

fn service_stats(f: crate::stats::ServiceFigures) -> pb::ServiceStats {
    let s = &f.service;
    pb::ServiceStats {
        name: s.name.clone(),
        vip: std::net::Ipv4Addr::from(s.vip).to_string(),
        port: u32::from(s.port),
        protocol: s.protocol.to_owned(),
        mode: s.mode.to_owned(),
        table_size: s.table_size,
        stats: Some(traffic(&f.totals)),
        backends: f
            .backends
            .iter()
            .map(|b| pb::BackendStats {
                address: b.addr.to_string(),
                port: u32::from(b.port),
                weight: b.weight,
                stats: Some(traffic(&b.totals)),
            })
            .collect(),
    }
}

/// Reads every counter once. The total is summed from the values put in the
/// response, so it always equals the sum of the rows even while workers keep
/// counting.
fn counters_response(view: &dyn GatewayView) -> pb::GetCountersResponse {
    let pool = view.mempool();
    let workers: Vec<pb::WorkerCounters> = view
        .workers()
        .iter()
        .map(|w| {
            let c = &w.counters;
            let packets = c.rx_packets.get() + c.handoff_in.get();
            pb::WorkerCounters {
                lcore: w.lcore,
                counters: Some(packet_counters(c)),
                snapshot: Some(worker_snapshot(w.snapshot.read())),
                mempool_in_use: pool.in_use,
                busy_cycles_per_packet: if packets == 0 { 0.0 } else { c.busy_cycles.get() as f64 / packets as f64 },
            }
        })
        .collect();
    let mut total = zero_counters();
    for w in &workers {
        if let Some(c) = &w.counters {
            add_counters(&mut total, c);
        }
    }
    let MempoolView { name, size, in_use } = pool;
    pb::GetCountersResponse {
        workers,
        total: Some(total),
        mempool: Some(pb::MempoolStats { name, size, in_use }),
        ports: view.ports().into_iter().map(port_stats).collect(),
    }
}

/// A snapshot of one worker's counters, with every drop reason listed.
fn worker_snapshot(s: vipgate_dataplane::loaded::LoadedSnapshotState) -> pb::WorkerSnapshot {
    pb::WorkerSnapshot {
        version: s.version,
        generation: s.generation,
        idle: s.idle,
        loaded_at_monotonic_ns: s.loaded_at_ns,
    }
}

fn packet_counters(c: &WorkerCounters) -> pb::PacketCounters {
    pb::PacketCounters {
        rx_packets: c.rx_packets.get(),
        rx_bytes: c.rx_bytes.get(),
        tx_packets: c.tx_packets.get(),
        tx_bytes: c.tx_bytes.get(),
        nat_forward: c.nat_forward.get(),
        nat_reverse: c.nat_reverse.get(),
        arp_replies: c.arp_replies.get(),
        arp_requests: c.arp_requests.get(),
        icmp_echo_replies: c.icmp_echo_replies.get(),
        busy_polls: c.busy_polls.get(),
        busy_cycles: c.busy_cycles.get(),
        drops: DropReason::ALL
            .iter()
            .map(|&r| pb::DropCount { reason: r.name().to_owned(), packets: c.drops(r) })
            .collect(),
        consumed: c.consumed.get(),
        flows_created: c.flows_created.get(),
        flows_evicted: c.flows_evicted.get(),
        flows_rehashed: c.flows_rehashed.get(),
        flows_active: c.flows_active.get(),
        flows_reset: c.flows_reset.get(),
        handoff_out: c.handoff_out.get(),
        handoff_in: c.handoff_in.get(),
        icmp_frag_needed: c.icmp_frag_needed.get(),
        icmp_time_exceeded: c.icmp_time_exceeded.get(),
        icmp_errors_forwarded: c.icmp_errors_forwarded.get(),
        fragments_forwarded: c.fragments_forwarded.get(),
        fragments_held: c.fragments_held.get(),
        fragments_released: c.fragments_released.get(),
        fragments_discarded: c.fragments_discarded.get(),
        to_kernel: c.to_kernel.get(),
        to_kernel_bytes: c.to_kernel_bytes.get(),
        from_kernel: c.from_kernel.get(),
        from_kernel_bytes: c.from_kernel_bytes.get(),
        to_kernel_control: c.to_kernel_control.get(),
    }
}

/// All counters at zero, drops listed in the same order as
/// [`packet_counters`] lists them.
fn zero_counters() -> pb::PacketCounters {
    packet_counters(&WorkerCounters::default())
}

/// Adds `c` into `total`. Counters wrap like the dataplane's own.
fn add_counters(total: &mut pb::PacketCounters, c: &pb::PacketCounters) {
    let pairs = [
        (&mut total.rx_packets, c.rx_packets),
        (&mut total.rx_bytes, c.rx_bytes),
        (&mut total.tx_packets, c.tx_packets),
        (&mut total.tx_bytes, c.tx_bytes),
        (&mut total.nat_forward, c.nat_forward),
        (&mut total.nat_reverse, c.nat_reverse),
        (&mut total.arp_replies, c.arp_replies),
        (&mut total.arp_requests, c.arp_requests),
        (&mut total.icmp_echo_replies, c.icmp_echo_replies),
        (&mut total.busy_polls, c.busy_polls),
        (&mut total.busy_cycles, c.busy_cycles),
        (&mut total.consumed, c.consumed),
        (&mut total.flows_created, c.flows_created),
        (&mut total.flows_evicted, c.flows_evicted),
        (&mut total.flows_rehashed, c.flows_rehashed),
        (&mut total.flows_active, c.flows_active),
        (&mut total.flows_reset, c.flows_reset),
        (&mut total.handoff_out, c.handoff_out),
        (&mut total.handoff_in, c.handoff_in),
        (&mut total.icmp_frag_needed, c.icmp_frag_needed),
        (&mut total.icmp_time_exceeded, c.icmp_time_exceeded),
        (&mut total.icmp_errors_forwarded, c.icmp_errors_forwarded),
        (&mut total.fragments_forwarded, c.fragments_forwarded),
        (&mut total.fragments_held, c.fragments_held),
        (&mut total.fragments_released, c.fragments_released),
        (&mut total.fragments_discarded, c.fragments_discarded),
        (&mut total.to_kernel, c.to_kernel),
        (&mut total.to_kernel_bytes, c.to_kernel_bytes),
        (&mut total.from_kernel, c.from_kernel),
        (&mut total.from_kernel_bytes, c.from_kernel_bytes),
        (&mut total.to_kernel_control, c.to_kernel_control),
    ];
    for (sum, value) in pairs {
        *sum = sum.wrapping_add(value);
    }
    // Both lists come from `packet_counters`, so the same index is the same
    // reason.
    for (sum, d) in total.drops.iter_mut().zip(&c.drops) {
        sum.packets = sum.packets.wrapping_add(d.packets);
    }
}

fn port_stats(p: PortView) -> pb::PortStats {
    let s = p.stats;
    pb::PortStats {
        name: p.name,
        port_id: p.port_id.into(),
        mac: format_mac(p.mac),
        ipackets: s.ipackets,
        opackets: s.opackets,
        ibytes: s.ibytes,
        obytes: s.obytes,
        imissed: s.imissed,
        ierrors: s.ierrors,
        oerrors: s.oerrors,
        rx_nombuf: s.rx_nombuf,
    }
}

fn link_state(link: Option<PortLink>) -> pb::LinkState {
    match link {
        None => pb::LinkState::Unspecified,
        Some(l) if l.up => pb::LinkState::Up,
        Some(_) => pb::LinkState::Down,
    }
}

fn port_link(p: &PortView) -> pb::PortLink {
    let up = p.link.filter(|l| l.up);
    pb::PortLink {
        name: p.name.clone(),
        port_id: p.port_id.into(),
        state: link_state(p.link).into(),
        speed_mbps: up.and_then(|l| l.speed_mbps).unwrap_or(0),
        full_duplex: up.is_some_and(|l| l.full_duplex),
        uplink: p.uplink,
        active_members: count(p.members.iter().filter(|m| m.link.active).count()),
        members: p.members.iter().map(bond_member).collect(),
    }
}

fn bond_member(m: &BondMemberView) -> pb::BondMember {
    let l = &m.link;
    let peer = |p: &LacpPeer| pb::LacpPeer {
        system: format_mac(p.system),
        system_priority: p.system_priority.into(),
        key: p.key.into(),
        port: p.port.into(),
        state: p.state.0.into(),
    };
    let selection = match l.lacp.map(|x| x.selection) {
        None => pb::LacpSelection::Unspecified,
        Some(LacpSelection::Unselected) => pb::LacpSelection::Unselected,
        Some(LacpSelection::Standby) => pb::LacpSelection::Standby,
        Some(LacpSelection::Selected) => pb::LacpSelection::Selected,
    };
    pb::BondMember {
        device: l.device.clone(),
        port_id: l.port_id.into(),
        state: link_state(l.link).into(),
        speed_mbps: l.link.filter(|x| x.up).and_then(|x| x.speed_mbps).unwrap_or(0),
        active: l.active,
        selection: selection.into(),
        actor: l.lacp.map(|x| peer(&x.actor)),
        partner: l.lacp.map(|x| peer(&x.partner)),
        in_use: l.in_use(),
        rx_packets: m.stats.ipackets,
        tx_packets: m.stats.opackets,
        rx_bytes: m.stats.ibytes,
        tx_bytes: m.stats.obytes,
    }
}

/// `02:00:00:00:00:01`, the form the proto documents.
fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_lower_case_hex_pairs() {
        assert_eq!(format_mac([0x02, 0, 0xab, 0xcd, 0x0e, 0xff]), "02:00:ab:cd:0e:ff");
    }

    #[test]
    fn total_lists_drops_in_reason_order() {
        let a = WorkerCounters::default();
        a.count_drop(DropReason::NoService);
        a.rx_packets.add(5);
        let b = WorkerCounters::default();
        b.count_drop(DropReason::NoService);
        b.count_drop(DropReason::TxFull);
        b.rx_packets.add(7);
        let mut total = zero_counters();
        add_counters(&mut total, &packet_counters(&a));
        add_counters(&mut total, &packet_counters(&b));
        assert_eq!(total.rx_packets, 12);
        let names: Vec<_> = total.drops.iter().map(|d| d.reason.as_str()).collect();
        let expected: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names, expected);
        assert_eq!(total.drops[DropReason::NoService as usize].packets, 2);
        assert_eq!(total.drops[DropReason::TxFull as usize].packets, 1);
    }
}
