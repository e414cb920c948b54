//! The Prometheus exposition of a fake gateway, without EAL or HTTP: exact
//! names, labels and values (`metrics::render` is what `/metrics` serves).

use std::sync::Arc;

use vipgate_controlplane::api::{ExceptionView, GatewayView, MempoolView, PortStats, PortView, WorkerView};
use vipgate_controlplane::metrics;
use vipgate_controlplane::stats::{BackendFigures, ServiceFigures, ServiceSlots};
use vipgate_dataplane::counters::{DropReason, WorkerCounters};
use vipgate_dataplane::stats::SlotTotals;

struct Fake {
    workers: Vec<WorkerView>,
    exception: Option<ExceptionView>,
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
            link: Some(vipgate_controlplane::api::PortLink { up: true, speed_mbps: Some(10_000), full_duplex: true }),
            uplink: true,
            members: Vec::new(),
        }]
    }
    fn mempool(&self) -> MempoolView {
        MempoolView { name: "vipgate_mbufs".to_owned(), size: 16_383, in_use: 2_046 }
    }
    fn exception(&self) -> Option<ExceptionView> {
        self.exception
    }
    fn serving(&self) -> bool {
        true
    }
    fn service_stats(&self, only: Option<&str>) -> Vec<ServiceFigures> {
        let t = |connections, active, inactive| SlotTotals {
            connections,
            in_packets: connections * 10,
            in_bytes: connections * 1000,
            out_packets: connections * 8,
            out_bytes: connections * 4000,
            active,
            inactive,
        };
        let backend = |last: u8, weight, totals| BackendFigures {
            addr: std::net::Ipv4Addr::new(198, 18, 1, last),
            port: 8080,
            weight,
            totals,
        };
        let service = Arc::new(ServiceSlots {
            name: "web".to_owned(),
            vip: u32::from(std::net::Ipv4Addr::new(198, 18, 100, 1)),
            port: 80,
            protocol: "tcp",
            mode: "nat",
            table_size: 251,
            backends: vec![],
        });
        let figures = ServiceFigures {
            service,
            // Includes 1 connection of a removed backend.
            totals: t(8, 5, 1),
            backends: vec![backend(11, 2, t(4, 3, 1)), backend(12, 0, t(3, 2, 0))],
        };
        if only.is_some_and(|n| n != "web") { vec![] } else { vec![figures] }
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
            WorkerView {
                lcore: 1,
                counters: Arc::new(a),
                snapshot: Arc::default(),
                since_last_loop: Some(std::time::Duration::from_millis(5)),
            },
            WorkerView { lcore: 3, counters: Arc::new(b), snapshot: Arc::default(), since_last_loop: None },
        ],
        exception: None,
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
        "# TYPE vipgate_worker_loop_age_seconds gauge",
        "vipgate_worker_loop_age_seconds{worker=\"1\"} 0.005",
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
        "# TYPE vipgate_port_link_up gauge",
        "vipgate_port_link_up{port=\"uplink\"} 1",
        "vipgate_port_link_speed_mbps{port=\"uplink\"} 10000",
        "vipgate_port_uplink{port=\"uplink\"} 1",
        "vipgate_uplinks_down 0",
        "vipgate_mempool_size_mbufs{pool=\"vipgate_mbufs\"} 16383",
        "vipgate_mempool_in_use_mbufs{pool=\"vipgate_mbufs\"} 2046",
        // node_exporter's ipvs backend families, its labels.
        "# TYPE node_ipvs_backend_connections_active gauge",
        "node_ipvs_backend_connections_active{local_address=\"198.18.100.1\",local_port=\"80\",local_mark=\"\",proto=\"TCP\",remote_address=\"198.18.1.11\",remote_port=\"8080\"} 3",
        "node_ipvs_backend_connections_inactive{local_address=\"198.18.100.1\",local_port=\"80\",local_mark=\"\",proto=\"TCP\",remote_address=\"198.18.1.11\",remote_port=\"8080\"} 1",
        "node_ipvs_backend_weight{local_address=\"198.18.100.1\",local_port=\"80\",local_mark=\"\",proto=\"TCP\",remote_address=\"198.18.1.12\",remote_port=\"8080\"} 0",
        "vipgate_backend_connections_total{service=\"web\",address=\"198.18.1.12\",port=\"8080\"} 3",
        "vipgate_backend_incoming_packets_total{service=\"web\",address=\"198.18.1.11\",port=\"8080\"} 40",
        "vipgate_backend_outgoing_bytes_total{service=\"web\",address=\"198.18.1.11\",port=\"8080\"} 16000",
        "vipgate_service_connections_total{service=\"web\"} 8",
        "vipgate_service_incoming_bytes_total{service=\"web\"} 8000",
        "vipgate_service_flows_active{service=\"web\"} 5",
        "vipgate_service_flows_inactive{service=\"web\"} 1",
    ] {
        assert!(lines.contains(&want), "missing {want:?} in:\n{text}");
    }
    // A worker whose loop age is unknown has no sample.
    assert!(!text.contains("vipgate_worker_loop_age_seconds{worker=\"3\"}"), "{text}");
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
    assert_eq!(seen.len(), 60);
}

#[test]
fn the_exception_thread_counters_appear_only_with_kernel_interfaces() {
    let text = metrics::render(fake());
    assert!(!text.contains("vipgate_exception_"), "no kernel interface, no exception families:\n{text}");
    let c = WorkerCounters::default();
    c.to_kernel.add(7);
    c.to_kernel_bytes.add(700);
    c.to_kernel_control.add(2);
    c.from_kernel.add(5);
    c.from_kernel_bytes.add(500);
    let gw = Arc::new(Fake {
        workers: vec![WorkerView { lcore: 1, counters: Arc::new(c), snapshot: Arc::default(), since_last_loop: None }],
        exception: Some(ExceptionView { kernel_tx: 6, kernel_tx_failed: 1, kernel_rx: 5 }),
    });
    let text = metrics::render(gw);
    let lines: Vec<&str> = text.lines().collect();
    for want in [
        "vipgate_worker_to_kernel_packets_total{worker=\"1\"} 7",
        "vipgate_worker_to_kernel_bytes_total{worker=\"1\"} 700",
        "vipgate_worker_to_kernel_control_packets_total{worker=\"1\"} 2",
        "vipgate_worker_from_kernel_packets_total{worker=\"1\"} 5",
        "vipgate_worker_from_kernel_bytes_total{worker=\"1\"} 500",
        "# TYPE vipgate_exception_kernel_tx_packets counter",
        "vipgate_exception_kernel_tx_packets_total 6",
        "vipgate_exception_kernel_tx_failed_packets_total 1",
        "vipgate_exception_kernel_rx_packets_total 5",
    ] {
        assert!(lines.contains(&want), "missing {want:?} in:\n{text}");
    }
}
