//! The Prometheus exposition of a fake gateway, without EAL or HTTP: exact
//! names, labels and values (`metrics::render` is what `/metrics` serves).

use std::sync::Arc;

use vipgate_controlplane::api::{GatewayView, MempoolView, PortStats, PortView, WorkerView};
use vipgate_controlplane::metrics;
use vipgate_dataplane::counters::{DropReason, WorkerCounters};

struct Fake {
    workers: Vec<WorkerView>,
}

impl GatewayView for Fake {
    fn workers(&self) -> Vec<WorkerView> {
        self.workers.clone()
    }
    fn ports(&self) -> Vec<PortView> {
        vec![PortView {
            name: "uplink".to_owned(),
            port_id: 0,
            mac: [2, 0, 0, 0, 0, 1],
            stats: PortStats {
                ipackets: 300,
                opackets: 285,
                ibytes: 19_200,
                obytes: 18_000,
                imissed: 7,
                ierrors: 1,
                oerrors: 2,
                rx_nombuf: 5,
            },
        }]
    }
    fn mempool(&self) -> MempoolView {
        MempoolView { name: "vipgate_mbufs".to_owned(), size: 16_383, in_use: 2_046 }
    }
    fn serving(&self) -> bool {
        true
    }
}

fn fake() -> Arc<Fake> {
    let a = WorkerCounters::default();
    a.rx_packets.add(100);
    a.rx_bytes.add(6_400);
    a.tx_packets.add(90);
    a.tx_bytes.add(5_760);
    a.flows_created.add(12);
    a.flows_active.set(9);
    a.handoff_out.add(4);
    a.busy_polls.add(10);
    a.busy_cycles.add(25_000);
    a.count_drop(DropReason::NoService);
    a.count_drop(DropReason::NoService);
    let b = WorkerCounters::default();
    b.rx_packets.add(200);
    b.handoff_in.add(4);
    b.flows_created.add(3);
    b.count_drop(DropReason::TxFull);
    Arc::new(Fake {
        workers: vec![
            WorkerView { lcore: 1, counters: Arc::new(a), snapshot: Arc::default() },
            WorkerView { lcore: 3, counters: Arc::new(b), snapshot: Arc::default() },
        ],
    })
}

#[test]
fn exposition_of_a_fake_gateway() {
    let text = metrics::render(fake());
    let lines: Vec<&str> = text.lines().collect();
    for want in [
        "# TYPE vipgate_build_info gauge",
        &format!("vipgate_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
        "# TYPE vipgate_worker_rx_packets counter",
        "vipgate_worker_rx_packets_total{worker=\"1\"} 100",
        "vipgate_worker_rx_packets_total{worker=\"3\"} 200",
        "vipgate_worker_rx_bytes_total{worker=\"1\"} 6400",
        "vipgate_worker_tx_bytes_total{worker=\"1\"} 5760",
        "vipgate_worker_handoff_out_packets_total{worker=\"1\"} 4",
        "vipgate_worker_handoff_in_packets_total{worker=\"3\"} 4",
        "vipgate_worker_flows_created_total{worker=\"1\"} 12",
        "# TYPE vipgate_worker_flows_active gauge",
        "vipgate_worker_flows_active{worker=\"1\"} 9",
        "vipgate_worker_busy_polls_total{worker=\"1\"} 10",
        "vipgate_worker_busy_cycles_total{worker=\"1\"} 25000",
        "vipgate_worker_busy_cycles_per_packet{worker=\"1\"} 250.0",
        "vipgate_worker_busy_cycles_per_packet{worker=\"3\"} 0.0",
        "vipgate_worker_dropped_packets_total{worker=\"1\",reason=\"no_service\"} 2",
        "vipgate_worker_dropped_packets_total{worker=\"3\",reason=\"tx_full\"} 1",
        "vipgate_worker_dropped_packets_total{worker=\"3\",reason=\"no_service\"} 0",
        "node_ipvs_connections_total 15",
        "node_ipvs_incoming_packets_total 300",
        "node_ipvs_outgoing_packets_total 90",
        "node_ipvs_incoming_bytes_total 6400",
        "node_ipvs_outgoing_bytes_total 5760",
        "vipgate_port_rx_packets_total{port=\"uplink\"} 300",
        "vipgate_port_tx_packets_total{port=\"uplink\"} 285",
        "vipgate_port_rx_bytes_total{port=\"uplink\"} 19200",
        "vipgate_port_tx_bytes_total{port=\"uplink\"} 18000",
        "vipgate_port_rx_missed_packets_total{port=\"uplink\"} 7",
        "vipgate_port_rx_errors_total{port=\"uplink\"} 1",
        "vipgate_port_tx_errors_total{port=\"uplink\"} 2",
        "vipgate_port_rx_nombuf_total{port=\"uplink\"} 5",
        "vipgate_mempool_size_mbufs{pool=\"vipgate_mbufs\"} 16383",
        "vipgate_mempool_in_use_mbufs{pool=\"vipgate_mbufs\"} 2046",
    ] {
        assert!(lines.contains(&want), "missing {want:?} in:\n{text}");
    }
    // Every reason for every worker.
    let drops = lines.iter().filter(|l| l.starts_with("vipgate_worker_dropped_packets_total{")).count();
    assert_eq!(drops, 2 * DropReason::COUNT);
    assert_eq!(lines.last(), Some(&"# EOF"));
    // Each family once; every sample belongs to the family declared above it.
    let mut family = "";
    let mut seen = std::collections::HashSet::new();
    for l in &lines {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            family = rest.split(' ').next().unwrap();
            assert!(seen.insert(family), "{family} declared twice");
        } else if !l.starts_with('#') {
            assert!(l.starts_with(family), "{l} outside its family {family}");
        }
    }
    assert_eq!(seen.len(), 31);
}
