//! The exception path under a flood: net_pcap replays, as fast as the
//! worker takes them, client packets to a VIP interleaved with UDP packets
//! to the gateway's own address, which the pipeline punts to the port's
//! kernel interface (a real net_tap device). The way to the kernel is far
//! slower than the replay, so its ring fills: the excess must be counted as
//! `punt_full` drops while every fast-path packet is still forwarded, and
//! while every BFD packet among the flood (one per replayed capture) still
//! reaches the kernel on the control protocols' own ring; frames
//! the kernel sends out of its interface must reach the wire; the per-worker
//! accounting must add up exactly; at shutdown every mbuf comes back and the
//! kernel interface is gone.
//!
//! Needs root (EAL's runtime directory, a network namespace, net_tap). The
//! test runs in a network namespace of its own (unshare), so the kernel
//! interface never meets the host's. EAL is initialised once per process:
//! this file holds a single test.

mod common;

use common::{
    Cleanup, PCAP_PORT_MAC, backend_neighbours, client_frames, eal_args, ip, pcap_to_null, port_specs, write_capture,
};
use std::sync::Arc;
use std::time::Duration;
use vipgate_dataplane::counters::DropReason;
use vipgate_dataplane::pipeline::PipelineConfig;
use vipgate_dataplane::snapshot::{BackendSpec, Protocol, ServiceSpec, Snapshot, SnapshotSpec};
use vipgate_dataplane::wire::EthernetAddress;
use vipgate_dpdk::{Dataplane, Eal};

/// Frames the test writes into the kernel interface, as the kernel would
/// send them.
const FROM_KERNEL_FRAMES: u64 = 200;

fn if_index(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// Sends `n` Ethernet frames out of interface `ifindex` with a packet
/// socket: to the kernel they are frames it transmits on that interface,
/// which the tap device hands to DPDK.
fn send_from_kernel(ifindex: u32, n: u64) {
    // SAFETY: plain socket(2); the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
        .udp(3784, 49152);
    let mut frame = Vec::new();
    b.write(&mut frame, &[0u8; 24]).unwrap();
    // SAFETY: all-zero is a valid sockaddr_ll; the fields are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    for _ in 0..n {
        // SAFETY: `frame` and `addr` are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, frame.len() as isize, "sendto: {}", std::io::Error::last_os_error());
        // The kernel's own queue towards the tap holds 1000 frames; pace
        // the writes so none is dropped there.
        std::thread::sleep(Duration::from_micros(200));
    }
    // SAFETY: our descriptor.
    unsafe { libc::close(fd) };
}

#[test]
fn a_flood_towards_the_kernel_is_dropped_and_counted_without_stalling_the_fast_path() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root: EAL, network namespaces, net_tap");
    // SAFETY: unshare(2) moves this process (whose only thread is this
    // one so far, besides the test harness's, which do no networking) into
    // a fresh network namespace; every thread EAL starts later inherits it.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());

    let prefix = format!("vgexcdrv{}", std::process::id());
    let _cleanup = Cleanup(prefix.clone());
    let iface = format!("vgk{}", std::process::id() % 10_000_000);

    // Per 128 frames: 8 to the VIP (the fast path), 120 UDP to the port's
    // own address, of which one BFD packet (UDP 3784) and 119 to the discard
    // port. Fifteen punts per fast-path packet: the worker punts far faster
    // than a tap device takes packets, even in a debug build.
    let fast = client_frames(8, |_| 80);
    let mut frames = Vec::new();
    for (i, f) in fast.into_iter().enumerate() {
        frames.push(f);
        for j in 0..15u16 {
            let dport = if i == 0 && j == 0 { 3784 } else { 9 };
            let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], PCAP_PORT_MAC)
                .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
                .udp(40000 + i as u16 * 16 + j, dport);
            let mut p = Vec::new();
            b.write(&mut p, &[0u8; 18]).unwrap();
            frames.push(p);
        }
    }
    assert_eq!(frames.len(), 128);
    let capture = write_capture(&prefix, &frames);

    let eal = Eal::init(&eal_args(&prefix, 1, 1, &capture)).expect("EAL init");
    let mut config = pcap_to_null(8191, PipelineConfig { flow_capacity: 4096, ..PipelineConfig::default() });
    config.ports[0].kernel_interface = Some(iface.clone());
    let mut dp = Dataplane::open(eal, &config).expect("open ports");
    let ports = dp.ports();
    assert_eq!(ports[0].kernel_interface.as_deref(), Some(iface.as_str()));
    assert_eq!(ports[1].kernel_interface, None);
    let ifindex = if_index(&iface);
    assert_ne!(ifindex, 0, "kernel interface {iface} should exist once the port is open");
    let macs: Vec<EthernetAddress> = ports.iter().map(|p| p.mac).collect();
    let spec = SnapshotSpec {
        ports: port_specs(&macs),
        routes: vec![],
        neighbours: backend_neighbours(11..=13),
        services: vec![ServiceSpec {
            name: "web".into(),
            vip: ip(198, 18, 100, 1),
            port: 80,
            protocol: Protocol::Tcp,
            table_size: 251,
            backends: (11..=13)
                .map(|h| BackendSpec { addr: ip(198, 18, 1, h), port: 8080, weight: 1, stats_slot: u32::from(h) })
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
    // The control plane's CPU (the main lcore's, where the exception thread
    // runs) is also busy with other work, as under an attack: two spinning
    // threads take most of it, so the kernel side surely falls behind the
    // flood, while the worker's CPU is untouched.
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let busy = Arc::clone(&busy);
            let cpu = common::core_list()[0];
            std::thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within
                // it; sched_setaffinity(0) pins this thread only.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
                while busy.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    dp.launch(Arc::new(Snapshot::build(&spec).unwrap())).expect("launch");
    let c = Arc::clone(&dp.workers()[0].counters);
    std::thread::sleep(Duration::from_millis(500));
    let rx_early = c.rx_packets.get();
    send_from_kernel(ifindex, FROM_KERNEL_FRAMES);
    std::thread::sleep(Duration::from_millis(1000));
    let rx_late = c.rx_packets.get();
    let exception = dp.exception_counters().expect("the exception path is on");
    busy.store(false, std::sync::atomic::Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }

    let report = dp.shutdown();
    assert!(report.balanced(), "mbufs missing after shutdown: {report:?}");
    assert_eq!(if_index(&iface), 0, "the kernel interface must be gone after shutdown");

    let rx = c.rx_packets.get();
    let punt_full = c.drops(DropReason::PuntFull);
    let to_kernel = c.to_kernel.get();
    let from_kernel = c.from_kernel.get();
    let nat_forward = c.nat_forward.get();
    let control = c.to_kernel_control.get();
    let kernel_tx = exception.kernel_tx.load(std::sync::atomic::Ordering::Relaxed);
    let at_stop = exception.dropped_at_stop.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "rx {rx} nat_forward {nat_forward} to_kernel {to_kernel} (control {control}) punt_full {punt_full} from_kernel {from_kernel} \
         kernel_tx {kernel_tx} dropped_at_stop {at_stop}; rx rate while punting {:.0}/s",
        (rx_late - rx_early) as f64 / 1.0
    );

    // The flood overflowed the way to the kernel, and that was counted.
    assert!(to_kernel > 0, "some punted packets reached the ring: {to_kernel}");
    assert!(punt_full > 0, "the flood should have filled the ring to the kernel");
    assert_eq!(kernel_tx + at_stop + exception.kernel_tx_failed.load(std::sync::atomic::Ordering::Relaxed), to_kernel);
    // Every packet punted or forwarded, and the fast path got its sixteenth
    // of what arrived (give or take where the replay stopped), however slow
    // the kernel was.
    assert_eq!(nat_forward + to_kernel + punt_full, rx, "every packet forwarded or punted");
    assert!(nat_forward.abs_diff(rx / 16) <= 8, "fast path {nat_forward} of {rx}");
    assert_eq!(c.total_drops(), punt_full, "no drop but punt_full");
    // Not one BFD packet lost to the flood: one per 128 frames received.
    let bfd = rx / frames.len() as u64;
    assert!(control.abs_diff(bfd) <= 1, "{control} control packets to the kernel, {bfd} BFD packets received");
    // The fast path kept going while the kernel lagged: the worker kept
    // taking the replay at a rate no kernel write per packet could follow.
    assert!(rx_late - rx_early > 20_000, "the worker received only {} packets in 1 s", rx_late - rx_early);
    // What the kernel sent left on the wire (plus whatever the kernel sent
    // by itself: IPv6 neighbour discovery and the like).
    assert!(from_kernel >= FROM_KERNEL_FRAMES, "from_kernel {from_kernel} < {FROM_KERNEL_FRAMES}");
    // Exact accounting with the exception path's terms.
    assert_eq!(
        rx + c.arp_requests.get() + c.handoff_in.get() + from_kernel,
        c.tx_packets.get() + c.total_drops() + c.consumed.get() + c.handoff_out.get() + to_kernel,
        "rx + arp_requests + handoff_in + from_kernel = tx + drops + consumed + handoff_out + to_kernel"
    );
}
