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

use common::{Cleanup, core_list, ip, pcap};
use std::sync::Arc;
use std::time::Duration;
use vipgate_dataplane::counters::{DropReason, WorkerCounters};
use vipgate_dataplane::pipeline::PipelineConfig;
use vipgate_dataplane::snapshot::{
    BackendSpec, ForwardingMode, Ipv4Cidr, NeighbourSpec, PortSpec, Protocol, ServiceSpec, Snapshot, SnapshotSpec,
    SourcePoolSpec,
};
use vipgate_dataplane::wire::EthernetAddress;
use vipgate_dpdk::{Dataplane, DataplaneConfig, Eal, PortConfig};

#[test]
fn two_workers_hand_packets_to_the_flow_owner_and_every_mbuf_comes_back() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root: EAL creates /var/run/dpdk/<prefix>");
    let prefix = format!("vgho{}", std::process::id());
    let _cleanup = Cleanup(prefix.clone());

    // 256 client flows to a FullNAT service and 256 to a nat service.
    let mut frames = Vec::new();
    for i in 0..512u16 {
        let dport = if i % 2 == 0 { 80 } else { 443 };
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
            .ipv4([198, 18, 0, 2], [198, 18, 100, 1], 64)
            .tcp(30000 + i, dport, 1, 65535)
            .ack(1);
        let mut f = Vec::new();
        b.write(&mut f, &[0u8; 6]).unwrap();
        frames.push(f);
    }
    let pcap_path = format!("/tmp/{prefix}.pcap");
    std::fs::write(&pcap_path, pcap(&frames)).unwrap();

    let cpus = core_list();
    let lcores = format!("0@{},1@{},2@{}", cpus[0], cpus[cpus.len() - 1], cpus[cpus.len() - 1]);
    let args = [
        "--lcores".to_owned(),
        lcores,
        "--no-huge".to_owned(),
        "-m".to_owned(),
        "256".to_owned(),
        "--no-pci".to_owned(),
        "--file-prefix".to_owned(),
        prefix.clone(),
        "--vdev".to_owned(),
        // Two rx queues replaying the same capture.
        format!("net_pcap0,rx_pcap={pcap_path},rx_pcap={pcap_path},infinite_rx=1"),
        "--vdev".to_owned(),
        "net_null0,no-rx=1".to_owned(),
        "--log-level".to_owned(),
        "*:warning".to_owned(),
    ];
    let eal = Eal::init(&args).expect("EAL init");
    let config = DataplaneConfig {
        ports: vec![
            PortConfig { name: "in".into(), device: "net_pcap0".into(), mtu: 1500 },
            PortConfig { name: "out".into(), device: "net_null0".into(), mtu: 1500 },
        ],
        mbufs: 8191,
        mbuf_cache: 128,
        idle_sleep_us: 0,
        pipeline: PipelineConfig { flow_capacity: 1 << 16, ..PipelineConfig::default() },
    };
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
        backends: backends.iter().map(|&addr| BackendSpec { addr, port: 8080 + port, weight: 1 }).collect(),
        on_backend_removal: Default::default(),
        mode,
    };
    let spec = SnapshotSpec {
        ports: vec![
            PortSpec {
                name: "in".into(),
                mac: macs[0],
                addresses: vec![Ipv4Cidr { addr: ip(198, 18, 0, 1), len: 24 }],
                mtu: 1500,
            },
            PortSpec {
                name: "out".into(),
                mac: macs[1],
                addresses: vec![Ipv4Cidr { addr: ip(198, 18, 1, 1), len: 24 }],
                mtu: 1500,
            },
        ],
        routes: vec![],
        neighbours: backends
            .iter()
            .map(|&addr| NeighbourSpec { addr, mac: EthernetAddress([2, 0xbb, 0, 0, 0, addr as u8]) })
            .collect(),
        services: vec![
            service("web", 80, ForwardingMode::FullNat { pool: "snat".into() }),
            service("tls", 443, ForwardingMode::Nat),
        ],
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
