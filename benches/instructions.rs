//! Instruction counts of the packet core, for callgrind.
//!
//! `instructions <workload> <bursts>` runs that many 32-packet bursts of a
//! workload through `Pipeline::process`: `forward`, `reverse`, `drop` (nat
//! mode), `forward-fullnat`, `reverse-fullnat`, `forward-dsr`,
//! `handoff` (worker 0 of 2, every packet owned by worker 1), and
//! `fragments` (nat: 8 TCP segments of 8 flows, each in 4 fragments in
//! order: a first fragment, translated through its flow and recorded, then
//! 3 later ones rewritten from the fragment table), and `vlan` (`forward`
//! with every frame tagged 802.1Q VLAN 100 on the client port, the
//! backends behind VLAN 200 on the backend port: each packet's tag is
//! stripped on the way in and another put on on the way out).
//! `instructions established|new|prepare <flows> <bursts>` measures
//! connection tracking at scale: `flows` flows are made established first
//! (set-up, the same in both runs), then the bursts carry packets of those
//! flows, cycling (`established`), or of flows never seen (`new`, each
//! packet a new flow inserted into a table holding `flows`). Frames are
//! prepared per packet; `prepare` does only that, so its count can be
//! subtracted. `new-syn`, `new-limited` and `refused` are `new` with SYNs
//! instead of ACKs: to a service without a limit, with a limit every SYN
//! stays within, and with a limit (1 a second) all but each source's first
//! exceed.
//! The service options at 10,000 flows: `established-src1`,
//! `established-src16` and `established-affinity` are `established` to a
//! service with a source list of 1 or 16 prefixes (the clients inside
//! one) or with client-IP affinity; `new-syn-src16` and
//! `new-syn-affinity` are `new-syn` likewise; `denied-src16` is `new-syn`
//! from clients outside all 16 prefixes (dropped as `source_denied`).
//! `scripts/bench-instructions.sh` runs it under `valgrind --tool=callgrind`
//! at two burst counts and divides the difference in instructions by the
//! difference in packets, so set-up and process start cancel out. Counts are
//! repeatable on a noisy machine, unlike time.

mod common;

use common::*;
use std::hint::black_box;
use vipgate_dataplane::admission::NewFlowLimit;
use vipgate_dataplane::counters::DropReason;
use vipgate_dataplane::pipeline::Verdict;
use vipgate_dataplane::snapshot::{Affinity, ForwardingMode, Ipv4Cidr};

fn main() {
    let mut args = std::env::args().skip(1);
    let workload = args.next().unwrap_or_else(|| "forward".into());
    if matches!(
        workload.as_str(),
        "established"
            | "new"
            | "prepare"
            | "new-syn"
            | "new-limited"
            | "refused"
            | "established-src1"
            | "established-src16"
            | "established-affinity"
            | "new-syn-src16"
            | "new-syn-affinity"
            | "denied-src16"
    ) {
        let flows: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
        let bursts: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
        return at_scale(&workload, flows, bursts);
    }
    let bursts: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let fullnat = || ForwardingMode::FullNat { pool: "snat".into() };
    let dsr =
        || ForwardingMode::Dsr { tunnel_source: Some(Ipv4Cidr { addr: u32::from_be_bytes([198, 18, 3, 0]), len: 24 }) };
    let snap = match workload.as_str() {
        "forward-fullnat" | "reverse-fullnat" => snapshot_with(fullnat()),
        "forward-dsr" => snapshot_with(dsr()),
        "vlan" => snapshot_vlans(),
        _ => snapshot(),
    };
    let mut pipe = pipeline(&snap);
    let (template, ingress) = match workload.as_str() {
        "forward" | "forward-fullnat" | "forward-dsr" => (forward_burst(0), 0),
        "reverse" => (reverse_burst(), 1),
        "reverse-fullnat" => (fullnat_reply_burst(&mut pipe, &snap, &forward_burst(0)), 1),
        "drop" => (no_service_burst(), 0),
        "handoff" => {
            pipe.set_worker(0, 2);
            (foreign_burst(), 0)
        }
        "fragments" => (fragment_burst(), 0),
        "vlan" => (forward_burst(0).iter().map(|f| tag(f, 100)).collect(), 0),
        other => {
            eprintln!(
                "unknown workload {other:?}: use forward, reverse, drop, forward-fullnat, reverse-fullnat, forward-dsr, handoff, fragments or vlan"
            );
            std::process::exit(2);
        }
    };
    // Every frame has HEADROOM bytes in front, as an mbuf has.
    let template = with_headroom(&template);
    let mut frames = template.clone();
    let mut verdicts = [Verdict::Consumed; BURST];
    let (mut transmitted, mut handed) = (0u64, 0u64);
    for _ in 0..bursts {
        // Restore the frames (a 124-byte copy each, counted in the result and
        // stated in docs/performance.md).
        for (f, t) in frames.iter_mut().zip(&template) {
            f.copy_from_slice(t);
        }
        run_burst_headroom(&mut pipe, &snap, 1, black_box(&mut frames), &mut verdicts, ingress);
        transmitted += verdicts.iter().filter(|v| matches!(v, Verdict::Transmit(_))).count() as u64;
        handed += verdicts.iter().filter(|v| matches!(v, Verdict::Handoff(_))).count() as u64;
    }
    let expected = if workload == "drop" { 0 } else { (bursts * BURST) as u64 };
    assert_eq!(transmitted + handed, expected, "{workload}: every packet must be forwarded or handed off (drop: none)");
    let drops = pipe.counters().total_drops();
    let no_service = pipe.counters().drops(DropReason::NoService);
    assert_eq!(drops, if workload == "drop" { (bursts * BURST) as u64 } else { 0 }, "{workload}: drops");
    assert_eq!(no_service, drops, "{workload}: every drop is no_service");
    println!("{workload}: {bursts} bursts, {transmitted} transmitted, {handed} handed off");
}

/// `frame` tagged 802.1Q with VLAN `id`.
fn tag(frame: &[u8], id: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&[0x81, 0x00]);
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// `BURST` fragments: 8 client->VIP TCP segments of 20 + 108 bytes, of 8
/// flows, each split into 4 fragments of 32 bytes, in order.
fn fragment_burst() -> Vec<Vec<u8>> {
    const PARTS: usize = 4;
    const PART: usize = 32;
    let mut out = Vec::with_capacity(BURST);
    for i in 0..(BURST / PARTS) as u16 {
        let whole =
            tcp_frame(0, u32::from_be_bytes([198, 18, 0, 2]), 20_000 + i, u32::from_be_bytes([198, 18, 100, 1]), 80);
        let mut segment = whole[34..54].to_vec();
        segment.extend((0..PARTS * PART - segment.len()).map(|b| b as u8));
        for part in 0..PARTS {
            let mut f = whole[..34].to_vec();
            f.extend_from_slice(&segment[part * PART..(part + 1) * PART]);
            let ip = &mut f[14..34];
            ip[2..4].copy_from_slice(&((20 + PART) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&(1000 + i).to_be_bytes());
            let more = if part + 1 < PARTS { 0x2000 } else { 0 };
            ip[6..8].copy_from_slice(&((part * PART / 8) as u16 | more).to_be_bytes());
            vipgate_dataplane::wire::ipv4::Packet::new_unchecked(&mut f[14..]).fill_checksum();
            out.push(f);
        }
    }
    out
}

/// The connection-tracking workloads at scale (see the module comment).
fn at_scale(workload: &str, flows: u32, bursts: u32) {
    // new-limited: every SYN is checked against a limit it stays within;
    // refused: all but each source's first are over it.
    let limit = match workload {
        "new-limited" => Some(NewFlowLimit { per_second: 1_000_000, burst: 1_000_000, prefix_len: 32 }),
        "refused" => Some(NewFlowLimit { per_second: 1, burst: 1, prefix_len: 32 }),
        _ => None,
    };
    // The clients (flow_client) are in 198.18.16.0/24: the lists hold it,
    // or (denied) only prefixes around it.
    let prefix = |c: u8| Ipv4Cidr { addr: u32::from_be_bytes([198, 18, c, 0]), len: 24 };
    let sixteen = |with_clients: bool| -> Vec<Ipv4Cidr> {
        (0..16u8).map(|i| prefix(if with_clients && i == 8 { 16 } else { 2 * i + 32 })).collect()
    };
    let sources = match workload {
        "established-src1" => vec![prefix(16)],
        "established-src16" | "new-syn-src16" => sixteen(true),
        "denied-src16" => sixteen(false),
        _ => Vec::new(),
    };
    let affinity = if workload.ends_with("-affinity") { Affinity::ClientIp } else { Affinity::None };
    let snap = snapshot_options(ForwardingMode::Nat, limit, sources, affinity);
    let mut pipe = pipeline(&snap);
    // The flows set up first are established (ACKs, never limited); the
    // measured packets of the SYN workloads open connections.
    warm(&mut pipe, &snap, &flow_template(), flows);
    // Only the measured packets' denials (the set-up's ACKs are denied too).
    let denied_in_warm = pipe.counters().drops(DropReason::SourceDenied);
    let syn = matches!(
        workload,
        "new-syn" | "new-limited" | "refused" | "new-syn-src16" | "new-syn-affinity" | "denied-src16"
    );
    let template = if syn { syn_template() } else { flow_template() };
    let cycle = workload == "prepare" || workload.starts_with("established");
    let mut frames = vec![vec![0u8; template.len()]; BURST];
    let mut verdicts = [Verdict::Consumed; BURST];
    let mut transmitted = 0u64;
    for b in 0..bursts {
        for (j, f) in frames.iter_mut().enumerate() {
            let n = b * BURST as u32 + j as u32;
            let id = if cycle { n % flows.max(1) } else { flows + n };
            prepare_frame(&template, f, id);
        }
        if workload == "prepare" {
            black_box(&mut frames);
            continue;
        }
        let mut pkts: arrayvec::ArrayVec<vipgate_dataplane::pipeline::RxPacket<'_>, BURST> =
            frames.iter_mut().map(|f| vipgate_dataplane::pipeline::RxPacket::new(0, &mut f[..])).collect();
        pipe.process(&snap, 1, black_box(&mut pkts), &mut verdicts);
        transmitted += verdicts.iter().filter(|v| matches!(v, Verdict::Transmit(_))).count() as u64;
    }
    let packets = u64::from(bursts) * BURST as u64;
    let limited = pipe.counters().drops(DropReason::RateLimited);
    let denied = pipe.counters().drops(DropReason::SourceDenied) - denied_in_warm;
    match workload {
        "prepare" => {}
        "denied-src16" => assert_eq!((transmitted, denied), (0, packets), "{workload}: every packet denied"),
        // At most one admitted SYN per client address (20 of them).
        "refused" => {
            assert!(limited + 20 >= packets && transmitted + limited == packets, "{workload}: {limited} limited")
        }
        _ => assert_eq!((transmitted, limited + denied), (packets, 0), "{workload}: every packet forwarded"),
    }
    println!(
        "{workload} {flows}: {bursts} bursts, {transmitted} transmitted, {limited} rate-limited, {} flows created",
        pipe.counters().flows_created.get()
    );
}
