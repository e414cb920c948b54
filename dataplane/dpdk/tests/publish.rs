//! Snapshot publication under traffic: net_pcap replays client packets
//! into the NAT path while the control plane publishes 1,000 snapshots,
//! alternating between two service sets, half with the blocking and half
//! with the async synchronisation. No packet may be lost to a publication:
//! every packet is still counted exactly once (rx + arp_requests = tx +
//! drops + consumed), the only drops are those the snapshot in force asks
//! for, and every mbuf returns at shutdown.
//!
//! Needs root (EAL's runtime directory); runs without hugepages
//! (`--no-huge`). EAL is initialised once per process: this file holds a
//! single test.

mod common;

use common::{Cleanup, backend_neighbours, client_frames, eal_args, ip, pcap_to_null, port_specs, write_capture};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vipgate_dataplane::counters::DropReason;
use vipgate_dataplane::pipeline::PipelineConfig;
use vipgate_dataplane::snapshot::{BackendSpec, Protocol, ServiceSpec, Snapshot, SnapshotSpec};
use vipgate_dataplane::wire::EthernetAddress;
use vipgate_dpdk::{Dataplane, Eal};

/// Snapshots published while traffic runs.
const PUBLICATIONS: usize = 1_000;

/// A service on the VIP, `port`, over `backends` (host parts of
/// 198.18.1.0/24), with a small Maglev table so that a thousand snapshots
/// build quickly.
fn service(name: &str, port: u16, backends: &[u8], backend_port: u16) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        vip: ip(198, 18, 100, 1),
        port,
        protocol: Protocol::Tcp,
        table_size: 1021,
        backends: backends
            .iter()
            .map(|&h| BackendSpec { addr: ip(198, 18, 1, h), port: backend_port, weight: 1, stats_slot: u32::from(h) })
            .collect(),
        on_backend_removal: Default::default(),
        mode: Default::default(),
        new_flow_limit: None,
        source_ranges: Vec::new(),
        affinity: Default::default(),
    }
}

#[test]
fn a_thousand_publications_under_traffic_lose_no_packet() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root: EAL creates /var/run/dpdk/<prefix>");
    let prefix = format!("vgpub{}", std::process::id());
    let _cleanup = Cleanup(prefix.clone());

    // 64 TCP flows to port 80 and 64 to port 81, which only one of the two
    // service sets serves.
    let frames = client_frames(128, |i| if i % 2 == 0 { 80 } else { 81 });
    let capture = write_capture(&prefix, &frames);

    let eal = Eal::init(&eal_args(&prefix, 1, 1, &capture)).expect("EAL init");
    let config = pcap_to_null(4095, PipelineConfig::default());
    let mut dp = Dataplane::open(eal, &config).expect("open ports");
    assert_eq!(dp.workers().len(), 1);
    assert!(dp.snapshot().is_none(), "no snapshot before launch");
    let macs: Vec<EthernetAddress> = dp.ports().iter().map(|p| p.mac).collect();
    // Every backend of either set is a permanent neighbour, so no packet
    // waits for ARP.
    let spec = |services: Vec<ServiceSpec>| SnapshotSpec {
        ports: port_specs(&macs),
        routes: vec![],
        neighbours: backend_neighbours(11..=14),
        services: services.into_iter().map(Arc::new).collect(),
        source_pools: vec![],
    };
    // A: port 80 over three backends; port 81 unserved (`no_service`).
    // B: a fourth backend on port 80 (port 80's flows, tracked under A
    // before the first publication, keep their backends), and port 81
    // served, so a packet to port 81 is forwarded or dropped depending on
    // the snapshot the worker is using.
    let a = spec(vec![service("web", 80, &[11, 12, 13], 8080)]);
    let b = spec(vec![service("web", 80, &[11, 12, 13, 14], 8080), service("alt", 81, &[11, 12], 8081)]);

    dp.launch(Arc::new(Snapshot::build(&a).unwrap())).expect("launch");
    // The worker builds its tables on its lcore first: wait (bounded) for
    // its first packets.
    let c = Arc::clone(&dp.workers()[0].counters);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.rx_packets.get() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let rx_before = c.rx_packets.get();
    assert!(rx_before > 0, "no traffic within 10 s of the launch");

    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..PUBLICATIONS {
        let next = Snapshot::build(if i % 2 == 0 { &b } else { &a }).unwrap();
        let generation = next.generation();
        let t0 = Instant::now();
        if i % 4 < 2 {
            dp.publish(next).unwrap_or_else(|e| panic!("publication {i}: {e}"));
        } else {
            rt.block_on(dp.publish_async(next)).unwrap_or_else(|e| panic!("publication {i} (async): {e}"));
        }
        slowest = slowest.max(t0.elapsed());
        assert_eq!(dp.snapshot().map(|s| s.generation()), Some(generation));
    }
    let publishing = start.elapsed();
    let rx_during = c.rx_packets.get() - rx_before;
    // The last snapshot published is A; let it serve a while.
    std::thread::sleep(Duration::from_millis(200));

    let in_use_while_running = dp.pool().in_use();
    let report = dp.shutdown();

    let (rx, tx, fwd, no_service) =
        (c.rx_packets.get(), c.tx_packets.get(), c.nat_forward.get(), c.drops(DropReason::NoService));
    println!(
        "{PUBLICATIONS} publications in {publishing:?} (slowest {slowest:?}), {rx_during} packets received meanwhile; \
         rx {rx} tx {tx} nat_forward {fwd} no_service {no_service} flows_rehashed {} in use while running \
         {in_use_while_running}; {report:?}",
        c.flows_rehashed.get()
    );
    for r in DropReason::ALL {
        if c.drops(r) > 0 {
            println!("drop {}: {}", r.name(), c.drops(r));
        }
    }
    assert!(rx_during > 1_000, "the worker received only {rx_during} packets during the publications");
    for r in DropReason::ALL {
        if r != DropReason::NoService {
            assert_eq!(c.drops(r), 0, "drops for {}: only port 81 under snapshot A may be dropped", r.name());
        }
    }
    assert_eq!(rx + c.arp_requests.get(), tx + c.total_drops() + c.consumed.get(), "every packet accounted for");
    assert_eq!(fwd + no_service, rx, "every packet forwarded or refused by the snapshot in force");
    // Port 81 was served part of the time (B) and refused the rest (A).
    assert!(fwd > rx / 2 && no_service > 0, "forwarded {fwd}, no_service {no_service} of {rx}");
    assert!(in_use_while_running > 0);
    assert!(report.balanced(), "mbufs missing after shutdown: {report:?}");
    assert_eq!(report.in_use_at_end, 0);
}
