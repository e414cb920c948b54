//! Two workers and hand-off rings under real traffic: net_pcap replays the
//! same client packets into both rx queues of one port (so every flow
//! reaches both workers, as RSS independent of flow ownership would
//! deliver them), net_null takes what is sent. The worker that does not
//! own a flow hands its packets to the owner. Checks the per-worker and
//! total accounting identities, that shutdown drains the rings, and that
//! every mbuf comes back to the pool.
//!
//! Needs root (EAL's runtime directory); runs without hugepages. EAL is
//! initialised once per process: this file holds a single test.

mod common;

use common::{Cleanup, backend_neighbours, client_frames, eal_args, ip, pcap_to_null, port_specs, write_capture};
use std::sync::Arc;
use std::time::Duration;
use vipgate_dataplane::counters::{DropReason, WorkerCounters};
use vipgate_dataplane::pipeline::PipelineConfig;
use vipgate_dataplane::snapshot::{
    BackendSpec, ForwardingMode, Protocol, ServiceSpec, Snapshot, SnapshotSpec, SourcePoolSpec,
};
use vipgate_dataplane::wire::EthernetAddress;
use vipgate_dpdk::{Dataplane, Eal};

#[test]
fn two_workers_hand_packets_to_the_flow_owner_and_every_mbuf_comes_back() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root: EAL creates /var/run/dpdk/<prefix>");
    let prefix = format!("vgho{}", std::process::id());
    let _cleanup = Cleanup(prefix.clone());

    // 256 client flows to a FullNAT service and 256 to a nat service.
    let frames = client_frames(512, |i| if i % 2 == 0 { 80 } else { 443 });
    let capture = write_capture(&prefix, &frames);

    // Two workers, and two rx queues replaying the same capture.
    let eal = Eal::init(&eal_args(&prefix, 2, 2, &capture)).expect("EAL init");
    let config = pcap_to_null(8191, PipelineConfig { flow_capacity: 1 << 16, ..PipelineConfig::default() });
    let mut dp = Dataplane::open(eal, &config).expect("open ports");
    assert_eq!(dp.workers().len(), 2);
    let macs: Vec<EthernetAddress> = dp.ports().iter().map(|p| p.mac).collect();
    let backends: Vec<u32> = (11..=13).map(|h| ip(198, 18, 1, h)).collect();
    let service = |name: &str, port, mode| ServiceSpec {
        name: name.into(),
        vip: ip(198, 18, 100, 1),
        port,
        protocol: Protocol::Tcp,
        table_size: 65537,
        backends: backends
            .iter()
            .zip(0..)
            .map(|(&addr, stats_slot)| BackendSpec { addr, port: 8080 + port, weight: 1, stats_slot })
            .collect(),
        on_backend_removal: Default::default(),
        mode,
        new_flow_limit: None,
        source_ranges: Vec::new(),
        affinity: Default::default(),
    };
    let spec = SnapshotSpec {
        ports: port_specs(&macs),
        routes: vec![],
        neighbours: backend_neighbours(11..=13),
        services: vec![
            service("web", 80, ForwardingMode::FullNat { pool: "snat".into() }),
            service("tls", 443, ForwardingMode::Nat),
        ]
        .into_iter()
        .map(Arc::new)
        .collect(),
        source_pools: vec![SourcePoolSpec {
            name: "snat".into(),
            addresses: vec![ip(198, 18, 1, 100)],
            first_port: 20000,
            last_port: 39999,
        }],
    };
    dp.launch(Arc::new(Snapshot::build(&spec).unwrap())).expect("launch");
    std::thread::sleep(Duration::from_millis(2000));

    let counters: Vec<Arc<WorkerCounters>> = dp.workers().iter().map(|w| Arc::clone(&w.counters)).collect();
    let report = dp.shutdown();

    let sum = |f: &dyn Fn(&WorkerCounters) -> u64| counters.iter().map(|c| f(c)).sum::<u64>();
    for (i, c) in counters.iter().enumerate() {
        println!(
            "worker {i}: rx {} tx {} nat_forward {} flows {} handoff_out {} handoff_in {} drops {}",
            c.rx_packets.get(),
            c.tx_packets.get(),
            c.nat_forward.get(),
            c.flows_created.get(),
            c.handoff_out.get(),
            c.handoff_in.get(),
            c.total_drops()
        );
        for r in DropReason::ALL {
            if c.drops(r) > 0 {
                println!("  drop {}: {}", r.name(), c.drops(r));
            }
        }
        assert!(c.rx_packets.get() > 5_000, "worker {i} received only {}", c.rx_packets.get());
        assert!(c.handoff_out.get() > 1_000, "worker {i} handed off only {}", c.handoff_out.get());
        // Per worker: hand-offs enter and leave the identity.
        assert_eq!(
            c.rx_packets.get() + c.arp_requests.get() + c.handoff_in.get(),
            c.tx_packets.get() + c.total_drops() + c.consumed.get() + c.handoff_out.get(),
            "worker {i}: every packet accounted for"
        );
    }
    // Each flow is created once, by its owner, although both workers see it.
    assert_eq!(sum(&|c| c.flows_created.get()), 512, "512 flows, each tracked by exactly one worker");
    assert_eq!(sum(&|c| c.drops(DropReason::SnatExhausted)), 0);
    assert_eq!(sum(&|c| c.drops(DropReason::Malformed)), 0);
    // Everything a ring accepted was taken in by its owner (or, left in the
    // ring at shutdown, taken in and dropped there).
    assert_eq!(sum(&|c| c.handoff_out.get()), sum(&|c| c.handoff_in.get()));
    assert_eq!(
        sum(&|c| c.rx_packets.get() + c.arp_requests.get()),
        sum(&|c| c.tx_packets.get() + c.total_drops() + c.consumed.get()),
        "in total the hand-offs cancel out"
    );
    assert!(report.balanced(), "mbufs missing after shutdown: {report:?}");
    assert_eq!(report.in_use_at_end, 0);
}
