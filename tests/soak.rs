//! Soak under configuration churn: traffic replayed through `net_pcap`
//! while the API makes 1,000 changes (backend weights, drains, additions
//! and removals, service creates and deletes) and the configuration file is
//! rewritten and reloaded (SIGHUP) 50 times. No packet of the services that
//! nothing changes is dropped, and every mbuf comes back to the pool.
//!
//! The gateway's port "in" is `net_pcap` reading a FIFO the test writes
//! (`rx_pcap=.../in.fifo`), port "out" a `net_null` sink. The test writes
//! whole passes of a fixed packet sequence into the FIFO for as long as the
//! churn lasts, then closes it: `net_pcap` reads end-of-file and receives
//! nothing more, so the counters come to rest at a known point.
//!
//! Why the check is exact, not approximate:
//! - A FIFO loses nothing and the writer blocks while it is full, so the
//!   gateway receives exactly the packets written: `passes x PASS` packets,
//!   every pass the same sequence, with `passes x STEADY` of them for the
//!   unchanged services ("steady-web", tcp, and "steady-dns", udp). The
//!   test waits until `rx_packets` equals that number and every received
//!   packet is accounted for (rx = tx + drops + consumed).
//! - The unchanged services' per-backend `in_packets` (GetServiceStats)
//!   must then equal their packets among those received, exactly; every
//!   drop reason must be zero except `no_service` and `no_backend`, which
//!   only packets of the changed services can meet (their services come
//!   and go, or have every backend drained; each VIP keeps a service at
//!   all times, from before the first packet, so none is `no_match`); and `tx_packets` must equal
//!   `rx_packets` minus those drops. So every packet of the unchanged
//!   services was translated once and handed to the sink.
//! - Mbufs: the pool's in-use count (GetCounters, in total and per worker)
//!   is read before the first packet and again once the input has ended;
//!   they must be equal (mbufs in per-lcore caches count as free).
//!
//! Needs root and hugepages (or VIPGATE_HUGEPAGES=0); takes about a minute
//! with a debug build on two CPUs.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use tonic::transport::Channel;
use vipgate::NullGateway;
use vipgate_controlplane::api::pb;
use vipgate_controlplane::api::pb::gateway_client::GatewayClient;
use vipgate_controlplane::api::pb::service_manager_client::ServiceManagerClient;
use vipgate_controlplane::api::{connect_unix, connect_unix_services};

/// API changes (each one call that changes the desired state).
const CHANGES: usize = 1_000;
/// Configuration reloads, one every `CHANGES / RELOADS` API changes.
const RELOADS: usize = 50;
/// Dynamic services the API creates and deletes, on `DYNAMIC_VIP`, ports
/// 1000 and up.
const DYNAMIC_SLOTS: usize = 8;
/// Services in the configuration file that the reloads change (and
/// sometimes leave out), on `FILE_VIP`, ports 80 and up.
const FILE_SERVICES: usize = 4;

const STEADY_VIP: [u8; 4] = [198, 18, 100, 1];
const DYNAMIC_VIP: [u8; 4] = [198, 18, 100, 2];
const FILE_VIP: [u8; 4] = [198, 18, 100, 3];
/// Backends of the unchanged services.
const STEADY_BACKENDS: [&str; 2] = ["198.18.1.11", "198.18.1.12"];
/// Backends the changed services pick from: 198.18.1.21 to .30.
const POOL_BACKENDS: usize = 10;

/// Flows per service in the capture, and packets per flow in one pass.
const STEADY_FLOWS: usize = 32;
const CHURN_FLOWS: usize = 4;
const ROUNDS: usize = 4;

/// How long the counters may take to come to rest after the input ends.
const SETTLE_WITHIN: Duration = Duration::from_secs(30);

fn pool_backend(i: usize) -> String {
    format!("198.18.1.{}", 21 + i % POOL_BACKENDS)
}

/// splitmix64: a fixed, seeded sequence of choices, the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

// --- The capture ------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// One client flow of the capture.
struct Flow {
    service: &'static str,
    src: [u8; 4],
    sport: u16,
    vip: [u8; 4],
    dport: u16,
    proto: Proto,
}

/// Every flow of one pass, the unchanged services' first.
fn flows() -> Vec<Flow> {
    let mut flows = Vec::new();
    let mut n = 0u16;
    let mut add = |service: &'static str, vip: [u8; 4], dport: u16, proto: Proto, count: usize| {
        for _ in 0..count {
            // Clients 198.18.0.2 to .201, source ports from 10000.
            let src = [198, 18, 0, 2 + (n % 200) as u8];
            flows.push(Flow { service, src, sport: 10_000 + n, vip, dport, proto });
            n += 1;
        }
    };
    add("steady-web", STEADY_VIP, 80, Proto::Tcp, STEADY_FLOWS);
    add("steady-dns", STEADY_VIP, 53, Proto::Udp, STEADY_FLOWS);
    for j in 0..FILE_SERVICES {
        add("file", FILE_VIP, 80 + j as u16, Proto::Tcp, CHURN_FLOWS);
    }
    for d in 0..DYNAMIC_SLOTS {
        add("dynamic", DYNAMIC_VIP, 1000 + d as u16, Proto::Tcp, CHURN_FLOWS);
    }
    flows
}

fn is_steady(service: &str) -> bool {
    service.starts_with("steady-")
}

/// One pass as pcap records: `ROUNDS` rounds over every flow. In the first
/// pass a TCP flow's first packet is a SYN; every other TCP packet is a
/// PSH+ACK with 6 bytes of data (a flow picked up mid-stream is tracked
/// too), every UDP packet a 6-byte datagram. Frames are 60 bytes or more,
/// addressed to port "in"'s MAC.
fn pass(flows: &[Flow], dst_mac: [u8; 6], first: bool) -> Vec<u8> {
    const SRC_MAC: [u8; 6] = [0x02, 0x76, 0x67, 0x00, 0x00, 0xfe];
    let mut out = Vec::new();
    let mut frame = Vec::with_capacity(128);
    for round in 0..ROUNDS {
        for (i, f) in flows.iter().enumerate() {
            frame.clear();
            let b = PacketBuilder::ethernet2(SRC_MAC, dst_mac).ipv4(f.src, f.vip, 64);
            let data = *b"soak!\n";
            let seq = 1_000 + (round as u32) * 6;
            match f.proto {
                Proto::Tcp if first && round == 0 => b.tcp(f.sport, f.dport, 999, 64_240).syn().write(&mut frame, &[]),
                Proto::Tcp => b.tcp(f.sport, f.dport, seq, 64_240).psh().ack(7_000 + i as u32).write(&mut frame, &data),
                Proto::Udp => b.udp(f.sport, f.dport).write(&mut frame, &data),
            }
            .expect("build a frame");
            frame.resize(frame.len().max(60), 0);
            let len = frame.len() as u32;
            for word in [0u32, 0, len, len] {
                out.extend_from_slice(&word.to_le_bytes());
            }
            out.extend_from_slice(&frame);
        }
    }
    out
}

/// The pcap file header: microsecond timestamps, Ethernet.
fn pcap_header() -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&0xA1B2_C3D4u32.to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&4u16.to_le_bytes());
    h.extend_from_slice(&0i32.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&65_535u32.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes());
    h
}

/// The first pass and the regular one, as [`pass`] makes them.
type Passes = (Vec<u8>, Vec<u8>);

/// Writes into the FIFO on a thread of its own: opens it (which waits for
/// vipgated's `net_pcap` to open it for reading, at start-up), writes the
/// pcap header (which `net_pcap` waits for), then, once it is given the two
/// passes, the first and the regular one over and over until `stop`.
/// Returns how many passes it wrote; closing the FIFO is the end of the
/// input.
fn start_writer(fifo: PathBuf, stop: Arc<AtomicBool>) -> (mpsc::Sender<Passes>, std::thread::JoinHandle<u64>) {
    let (tx, rx) = mpsc::channel::<Passes>();
    let handle = std::thread::spawn(move || {
        let mut f = std::fs::OpenOptions::new().write(true).open(&fifo).expect("open the FIFO for writing");
        f.write_all(&pcap_header()).expect("write the pcap header");
        let Ok((first, regular)) = rx.recv() else { return 0 };
        f.write_all(&first).expect("write the first pass");
        let mut passes = 1;
        while !stop.load(Ordering::Relaxed) {
            f.write_all(&regular).expect("write a pass");
            passes += 1;
        }
        passes
    });
    (tx, handle)
}

// --- The configuration file ---------------------------------------------------------

/// The services of the configuration file at reload `r` (0: the start):
/// the two unchanged ones, always the same text, and `FILE_SERVICES` whose
/// backends and weights change every reload; service `j` is left out of
/// the file at every reload `r` with `r % 5 == j + 1`, and back at the next.
fn file_services(r: usize) -> String {
    let steady = |name: &str, port: u16, proto: &str, bport: u16| {
        let backends: Vec<String> =
            STEADY_BACKENDS.iter().map(|a| format!("{{ address = \"{a}\", port = {bport} }}")).collect();
        format!(
            "[[services]]\nname = \"{name}\"\nvip = \"198.18.100.1\"\nport = {port}\nprotocol = \"{proto}\"\nbackends = [{}]\n\n",
            backends.join(", ")
        )
    };
    let mut text = steady("steady-web", 80, "tcp", 8080) + &steady("steady-dns", 53, "udp", 5353);
    for j in 0..FILE_SERVICES {
        if r > 0 && r % 5 == j + 1 {
            continue;
        }
        // Two or three backends, shifting with r; one drained (weight 0)
        // at some reloads.
        let count = 2 + (r + j) % 2;
        let backends: Vec<String> = (0..count)
            .map(|k| {
                let weight = if (r + j + k).is_multiple_of(7) { 0 } else { 1 + (r + k) % 3 };
                format!("{{ address = \"{}\", port = {}, weight = {weight} }}", pool_backend(r + j + k), 8100 + j)
            })
            .collect();
        text += &format!(
            "[[services]]\nname = \"file-{j}\"\nvip = \"198.18.100.3\"\nport = {}\nprotocol = \"tcp\"\nbackends = [{}]\n\n",
            80 + j,
            backends.join(", ")
        );
    }
    text
}

/// The permanent neighbours of every backend (no ARP on net_null).
fn neighbours() -> String {
    let mut addrs: Vec<String> = STEADY_BACKENDS.iter().map(|a| (*a).to_owned()).collect();
    addrs.extend((0..POOL_BACKENDS).map(pool_backend));
    addrs
        .iter()
        .map(|a| {
            let last: u8 = a.rsplit('.').next().unwrap().parse().unwrap();
            format!("[[neighbours]]\naddress = \"{a}\"\nmac = \"02:76:67:01:00:{last:02x}\"\n\n")
        })
        .collect()
}

/// The configuration file at reload `r`: the start's with the `[[services]]`
/// part of [`file_services`]`(r)`. The services come last in the file the
/// gateway was built with (its `services` and then `extra` parts), so the
/// text before the first `[[services]]` stays as it is.
fn config_at(initial: &str, r: usize) -> String {
    let head = &initial[..initial.find("[[services]]").expect("the configuration has services")];
    format!("{head}{}\n{}", file_services(r), neighbours())
}

// --- The API changes ----------------------------------------------------------------

/// What the test believes one dynamic service slot holds.
#[derive(Default)]
struct Slot {
    exists: bool,
    /// Backend index in the pool -> (weight, draining).
    backends: BTreeMap<usize, (u32, bool)>,
}

#[derive(Default, Debug)]
struct ChangeCounts(BTreeMap<&'static str, usize>);

/// Slot `d`'s backends listen on port `9000 + d`: a backend address and
/// port serve one service only (replies are translated back by them).
fn dyn_port(d: usize) -> u32 {
    9000 + d as u32
}

fn backend(i: usize, d: usize, weight: u32) -> pb::Backend {
    pb::Backend { address: pool_backend(i), port: dyn_port(d), weight: Some(weight), ..Default::default() }
}

/// Makes one API change to slot `d`, chosen by `rng` from what the slot
/// holds; returns its kind.
async fn change(api: &mut ServiceManagerClient<Channel>, slots: &mut [Slot], d: usize, rng: &mut Rng) -> &'static str {
    let name = format!("dyn-{d}");
    let others_exist = slots.iter().enumerate().any(|(i, s)| i != d && s.exists);
    let slot = &mut slots[d];
    if !slot.exists {
        let picks: Vec<usize> = (0..2 + rng.below(2)).map(|k| (d + 3 * k + rng.below(2)) % POOL_BACKENDS).collect();
        slot.backends = picks.iter().map(|&i| (i, (1, false))).collect();
        let service = pb::Service {
            name: name.clone(),
            vip: "198.18.100.2".to_owned(),
            port: 1000 + d as u32,
            protocol: "tcp".to_owned(),
            backends: slot.backends.keys().map(|&i| backend(i, d, 1)).collect(),
            ..Default::default()
        };
        api.create_service(pb::CreateServiceRequest { service: Some(service), ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
        slot.exists = true;
        return "create service";
    }
    let present: Vec<usize> = slot.backends.keys().copied().collect();
    let pick = present[rng.below(present.len())];
    // What to do: 0 deletes the service while another slot's exists (the
    // VIP has a service at all times: packets to an address that is no
    // VIP are `no_match`), 1-6 set a weight, 7-10 drain or undrain, 11-15
    // add a backend when one is free, the rest remove one while more than
    // one is left; what cannot be done sets a weight.
    let roll = match rng.below(20) {
        0 if others_exist => 0,
        0 => 1,
        11..=15 if present.len() < POOL_BACKENDS => 11,
        11.. if present.len() > 1 => 16,
        11.. => 1,
        r => r,
    };
    let (kind, result) = match roll {
        0 => {
            slot.exists = false;
            slot.backends.clear();
            (
                "delete service",
                api.delete_service(pb::DeleteServiceRequest { name: name.clone(), ..Default::default() })
                    .await
                    .map(drop),
            )
        }
        1..=6 => {
            let weight = 1 + rng.below(5) as u32;
            slot.backends.insert(pick, (weight, false));
            let r = pb::UpdateBackendRequest {
                service: name.clone(),
                address: pool_backend(pick),
                port: dyn_port(d),
                weight: Some(weight),
                admin_state: pb::AdminState::Enabled as i32,
                ..Default::default()
            };
            ("set weight", api.update_backend(r).await.map(drop))
        }
        7..=10 => {
            let draining = !slot.backends[&pick].1;
            slot.backends.get_mut(&pick).unwrap().1 = draining;
            let state = if draining { pb::AdminState::Draining } else { pb::AdminState::Enabled };
            let r = pb::UpdateBackendRequest {
                service: name.clone(),
                address: pool_backend(pick),
                port: dyn_port(d),
                weight: None,
                admin_state: state as i32,
                ..Default::default()
            };
            (if draining { "drain" } else { "undrain" }, api.update_backend(r).await.map(drop))
        }
        11 => {
            let new = (0..POOL_BACKENDS).find(|i| !slot.backends.contains_key(&((pick + 1 + i) % POOL_BACKENDS)));
            let new = (pick + 1 + new.expect("a free backend")) % POOL_BACKENDS;
            slot.backends.insert(new, (1, false));
            let r = pb::AddBackendRequest {
                service: name.clone(),
                backend: Some(backend(new, d, 1)),
                ..Default::default()
            };
            ("add backend", api.add_backend(r).await.map(drop))
        }
        _ => {
            slot.backends.remove(&pick);
            let r = pb::RemoveBackendRequest {
                service: name.clone(),
                address: pool_backend(pick),
                port: dyn_port(d),
                ..Default::default()
            };
            ("remove backend", api.remove_backend(r).await.map(drop))
        }
    };
    result.unwrap_or_else(|e| panic!("{kind} on {name}: {e}"));
    kind
}

// --- Reading the gateway ---------------------------------------------------------------

async fn counters(gw: &mut GatewayClient<Channel>) -> pb::GetCountersResponse {
    gw.get_counters(pb::GetCountersRequest {}).await.expect("GetCounters").into_inner()
}

fn drops(c: &pb::PacketCounters) -> BTreeMap<String, u64> {
    c.drops.iter().map(|d| (d.reason.clone(), d.packets)).collect()
}

fn accounted(c: &pb::PacketCounters) -> bool {
    let dropped: u64 = c.drops.iter().map(|d| d.packets).sum();
    c.rx_packets + c.arp_requests + c.fragments_released + c.from_kernel
        == c.tx_packets + dropped + c.consumed + c.to_kernel
}

/// Sets its flag when dropped, including while unwinding.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn mkfifo(path: &Path) {
    let out = Command::new("mkfifo").arg(path).output().expect("run mkfifo");
    assert!(out.status.success(), "mkfifo {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn no_packet_of_an_unchanged_service_is_dropped_under_api_changes_and_reloads() {
    let started = Instant::now();
    let ports = "[[ports]]\nname = \"in\"\ndevice = \"net_pcap{prefix}in,rx_pcap=FIFO\"\naddresses = [\"198.18.0.1/24\"]\n\
                 kernel_interface = \"\"\n\n[[ports]]\nname = \"out\"\ndevice = \"net_null{prefix}out,no-rx=1\"\n\
                 addresses = [\"198.18.1.1/24\"]\nkernel_interface = \"\"\n";
    // The FIFO lives in the gateway's directory, which is named after its
    // prefix: known once built, so the port is written with a placeholder
    // and the file rewritten.
    let mut gw =
        NullGateway::builder("soak").ports(ports).services(&file_services(0)).extra_config(&neighbours()).build();
    let fifo = gw.dir().join("in.fifo");
    let initial = std::fs::read_to_string(gw.config_path()).unwrap().replace("FIFO", &fifo.display().to_string());
    std::fs::write(gw.config_path(), &initial).unwrap();
    mkfifo(&fifo);

    let stop = Arc::new(AtomicBool::new(false));
    let (to_writer, writer) = start_writer(fifo.clone(), Arc::clone(&stop));
    gw.spawn();

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (mut api, mut stats) = rt.block_on(async {
        let deadline = Instant::now() + vipgate::NULL_GATEWAY_READY_TIMEOUT;
        loop {
            if let (Ok(mut a), Ok(s)) = (connect_unix_services(&gw.socket()).await, connect_unix(&gw.socket()).await)
                && a.get_state(pb::GetStateRequest::default()).await.is_ok()
            {
                return (a, s);
            }
            assert!(Instant::now() < deadline, "vipgated's API did not come up:\n{}", gw.log_text());
            gw.assert_running();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    // Before the first packet: the pool's idle level, and port "in"'s MAC.
    let idle = rt.block_on(counters(&mut stats));
    let idle_in_use = idle.mempool.as_ref().expect("mempool stats").in_use;
    let idle_per_worker: Vec<u64> = idle.workers.iter().map(|w| w.mempool_in_use).collect();
    assert_eq!(idle.total.as_ref().unwrap().rx_packets, 0, "packets before the capture started");
    let mac_text = &idle.ports.iter().find(|p| p.name == "in").expect("port in").mac;
    let mac: Vec<u8> = mac_text.split(':').map(|x| u8::from_str_radix(x, 16).unwrap()).collect();
    let dst_mac: [u8; 6] = mac.try_into().expect("a MAC of six bytes");

    let flows = flows();
    let pass_len = flows.len() * ROUNDS;
    let steady_per_pass: BTreeMap<&str, u64> =
        flows.iter().filter(|f| is_steady(f.service)).fold(BTreeMap::new(), |mut m, f| {
            *m.entry(f.service).or_default() += ROUNDS as u64;
            m
        });
    // Every dynamic slot's service exists before the first packet, so
    // that the dynamic VIP is one from the start (the churn keeps one
    // service on it at all times).
    let mut rng = Rng(0x50A4);
    let mut slots: Vec<Slot> = (0..DYNAMIC_SLOTS).map(|_| Slot::default()).collect();
    rt.block_on(async {
        for d in 0..DYNAMIC_SLOTS {
            assert_eq!(change(&mut api, &mut slots, d, &mut rng).await, "create service");
        }
    });
    to_writer.send((pass(&flows, dst_mac, true), pass(&flows, dst_mac, false))).unwrap();

    // The churn: 1,000 API changes on this thread, a reload every 20 of
    // them on another, both while the capture plays.
    let done = AtomicUsize::new(0);
    let aborted = AtomicBool::new(false);
    let mut counts = ChangeCounts::default();
    let mut reload_times = Vec::new();
    std::thread::scope(|scope| {
        let reloader = scope.spawn(|| {
            let mut times = Vec::new();
            for r in 1..=RELOADS {
                while done.load(Ordering::Relaxed) < (r - 1) * (CHANGES / RELOADS) {
                    if aborted.load(Ordering::Relaxed) {
                        return times;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                let t = Instant::now();
                gw.reload(&config_at(&initial, r));
                times.push(t.elapsed());
            }
            times
        });
        // A failed change must not leave the reload thread waiting for
        // the next one (the scope would never end).
        let _abort_on_panic = SetOnDrop(&aborted);
        rt.block_on(async {
            for i in 0..CHANGES {
                let d = rng.below(DYNAMIC_SLOTS);
                let kind = change(&mut api, &mut slots, d, &mut rng).await;
                *counts.0.entry(kind).or_default() += 1;
                done.store(i + 1, Ordering::Relaxed);
            }
        });
        reload_times = reloader.join().expect("the reload thread");
    });
    let churn = started.elapsed();

    // End the input and wait until every packet written is received and
    // accounted for.
    stop.store(true, Ordering::Relaxed);
    let passes = writer.join().expect("the FIFO writer");
    let sent = passes * pass_len as u64;
    let deadline = Instant::now() + SETTLE_WITHIN;
    let end = loop {
        let c = rt.block_on(counters(&mut stats));
        let t = c.total.as_ref().unwrap();
        let pool_back = c.mempool.as_ref().unwrap().in_use == idle_in_use;
        if t.rx_packets == sent && accounted(t) && pool_back {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "after {SETTLE_WITHIN:?}: rx_packets {} of {sent} written, accounted {}, mempool in use {} (idle {idle_in_use}); log: {}",
            t.rx_packets,
            accounted(t),
            c.mempool.as_ref().unwrap().in_use,
            gw.log_path().display()
        );
        gw.assert_running();
        std::thread::sleep(Duration::from_millis(50));
    };
    let services = rt
        .block_on(stats.get_service_stats(pb::GetServiceStatsRequest { service: String::new() }))
        .unwrap()
        .into_inner();
    let total = end.total.as_ref().unwrap();
    let drops = drops(total);
    let in_port = end.ports.iter().find(|p| p.name == "in").unwrap();

    let reloads_applied = gw.log_text().lines().filter(|l| l.contains("configuration reloaded")).count();
    let slowest_reload = reload_times.iter().max().copied().unwrap_or_default();
    println!(
        "soak: {passes} passes of {pass_len} packets = {sent} packets ({} to the unchanged services) in {:.1} s; \
         {CHANGES} API changes {:?}; {reloads_applied} reloads (slowest {:.0} ms)",
        passes * steady_per_pass.values().sum::<u64>(),
        churn.as_secs_f64(),
        counts.0,
        slowest_reload.as_secs_f64() * 1e3
    );
    println!(
        "counters: rx {} tx {} consumed {} port in ipackets {} imissed {} rx_nombuf {}; drops {:?}",
        total.rx_packets,
        total.tx_packets,
        total.consumed,
        in_port.ipackets,
        in_port.imissed,
        in_port.rx_nombuf,
        drops.iter().filter(|(_, n)| **n > 0).collect::<BTreeMap<_, _>>()
    );

    assert_eq!(counts.0.values().sum::<usize>(), CHANGES);
    assert_eq!(reloads_applied, RELOADS, "applied reloads: see {}", gw.log_path().display());
    assert!(passes >= 2, "the capture played {passes} passes: the churn outran the traffic");
    assert_eq!(in_port.ipackets, sent, "port in received other than what was written");
    assert_eq!((in_port.imissed, in_port.rx_nombuf, in_port.ierrors), (0, 0, 0), "port in lost packets");
    for (reason, n) in &drops {
        if reason != "no_service" && reason != "no_backend" {
            assert_eq!(*n, 0, "{n} packets dropped as {reason}: {drops:?}");
        }
    }
    let churn_drops = drops["no_service"] + drops["no_backend"];
    assert_eq!(
        total.tx_packets,
        total.rx_packets - churn_drops,
        "packets neither sent nor dropped for a changed service"
    );
    for (name, per_pass) in &steady_per_pass {
        let s = services.services.iter().find(|s| s.name == *name).unwrap_or_else(|| panic!("no service {name}"));
        let per_backend: Vec<u64> = s.backends.iter().map(|b| b.stats.as_ref().unwrap().in_packets).collect();
        println!("{name}: {per_backend:?} packets per backend, {} expected in all", passes * per_pass);
        assert_eq!(s.backends.len(), STEADY_BACKENDS.len(), "{name}'s backends: {s:?}");
        assert_eq!(per_backend.iter().sum::<u64>(), passes * per_pass, "{name} lost packets: {s:?}");
        assert!(per_backend.iter().all(|&n| n > 0), "{name}: a backend got nothing: {per_backend:?}");
    }
    let end_per_worker: Vec<u64> = end.workers.iter().map(|w| w.mempool_in_use).collect();
    assert_eq!(end_per_worker, idle_per_worker, "mbufs in use per worker, after the traffic and before it");
    println!(
        "mempool in use: {idle_in_use} before the traffic, {} after; took {:.1} s in all",
        end.mempool.as_ref().unwrap().in_use,
        started.elapsed().as_secs_f64()
    );

    // The API's graceful stop waits for open connections: close the
    // test's first.
    drop((api, stats, rt));
    let status = gw.stop();
    let log = gw.log_text();
    assert!(status.success(), "vipgated exited with {status:?}:\n{log}");
    assert!(!log.contains("reload refused"), "{log}");
}
