//! The DPDK driver under real traffic: net_pcap replays client packets
//! (built with etherparse) into the NAT path, net_null takes what is sent.
//! Checks the per-worker counters, then that shutdown stops the worker,
//! closes both ports and gets every mbuf back into the pool.
//!
//! Needs root (EAL's runtime directory); runs without hugepages
//! (`--no-huge`) so it also runs where none are reserved. EAL is
//! initialised once per process: this file holds a single test.

mod common;

use common::{Cleanup, backend_neighbours, client_frames, eal_args, ip, pcap_to_null, port_specs, write_capture};
use std::sync::Arc;
use std::time::Duration;
use vipgate_dataplane::counters::DropReason;
use vipgate_dataplane::pipeline::PipelineConfig;
use vipgate_dataplane::snapshot::{BackendSpec, Protocol, ServiceSpec, Snapshot, SnapshotSpec};
use vipgate_dataplane::wire::EthernetAddress;
use vipgate_dpdk::{Dataplane, Eal};

#[test]
fn forwards_replayed_traffic_and_returns_every_mbuf_at_shutdown() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root: EAL creates /var/run/dpdk/<prefix>");
    let prefix = format!("vgdrv{}", std::process::id());
    let _cleanup = Cleanup(prefix.clone());

    // 64 TCP flows and 64 packets that no rule takes (an unconfigured port).
    let frames = client_frames(128, |i| if i % 2 == 0 { 80 } else { 81 });
    let capture = write_capture(&prefix, &frames);

    let eal = Eal::init(&eal_args(&prefix, 1, 1, &capture)).expect("EAL init");
    let config = pcap_to_null(4095, PipelineConfig::default());
    let mut dp = Dataplane::open(eal, &config).expect("open ports");
    assert_eq!(dp.workers().len(), 1);
    let macs: Vec<EthernetAddress> = dp.ports().iter().map(|p| p.mac).collect();
    let backends: Vec<u32> = (11..=13).map(|h| ip(198, 18, 1, h)).collect();
    let spec = SnapshotSpec {
        ports: port_specs(&macs),
        routes: vec![],
        neighbours: backend_neighbours(11..=13),
        services: vec![ServiceSpec {
            name: "web".into(),
            vip: ip(198, 18, 100, 1),
            port: 80,
            protocol: Protocol::Tcp,
            table_size: 65537,
            backends: backends
                .iter()
                .zip(0..)
                .map(|(&addr, stats_slot)| BackendSpec { addr, port: 8080, weight: 1, stats_slot })
                .collect(),
            on_backend_removal: Default::default(),
            mode: Default::default(),
            new_flow_limit: None,
            source_ranges: Vec::new(),
            affinity: Default::default(),
        }]
        .into_iter()
        .map(Arc::new)
        .collect(),
        source_pools: vec![],
    };
    dp.launch(Arc::new(Snapshot::build(&spec).unwrap())).expect("launch");
    std::thread::sleep(Duration::from_millis(1500));

    let c = Arc::clone(&dp.workers()[0].counters);
    let in_use_while_running = dp.pool().in_use();
    let report = dp.shutdown();

    let (rx, tx, fwd, no_service) =
        (c.rx_packets.get(), c.tx_packets.get(), c.nat_forward.get(), c.drops(DropReason::NoService));
    println!(
        "rx {rx} tx {tx} nat_forward {fwd} no_service {no_service} in use while running {in_use_while_running}; {report:?}"
    );
    for r in DropReason::ALL {
        if c.drops(r) > 0 {
            println!("drop {}: {}", r.name(), c.drops(r));
        }
    }
    assert!(rx > 10_000, "the worker received only {rx} packets");
    assert_eq!(c.drops(DropReason::Malformed), 0);
    assert_eq!(c.drops(DropReason::NoNeighbour), 0, "permanent neighbours resolve backends");
    // Half the replayed packets are for port 80, half for 81.
    assert!(fwd.abs_diff(no_service) <= 64, "forwarded {fwd} vs no_service {no_service}");
    assert_eq!(rx + c.arp_requests.get(), tx + c.total_drops() + c.consumed.get(), "every packet accounted for");
    assert!(in_use_while_running > 0);
    assert!(report.balanced(), "mbufs missing after shutdown: {report:?}");
    assert_eq!(report.in_use_at_end, 0);
}
