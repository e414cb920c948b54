//! The per-service limit on new flows per client source: packets that
//! would start a flow over it are dropped as `rate_limited`; everything
//! else about the service, and other sources and services, is untouched.

use super::*;
use crate::admission::NewFlowLimit;

const SECOND: u64 = 1_000_000_000;

/// A rig whose service `svc` (0: web, tcp/80; 1: dns, udp/53) has `limit`.
fn limited(svc: usize, per_second: u32, burst: u32, prefix_len: u8) -> Rig {
    let mut r = Rig::resolved();
    let mut s = spec();
    Arc::make_mut(&mut s.services[svc]).new_flow_limit = Some(NewFlowLimit { per_second, burst, prefix_len });
    r.snap = Snapshot::build(&s).unwrap();
    r
}

/// A TCP segment from `src:sport` to the web service with these flags.
fn segment(src: u32, sport: u16, flags: u8) -> Vec<u8> {
    let mut f = to_port(0, tcp_frame((src, sport), (VIP, 80), 64, b""));
    f[14 + 20 + 13] = flags;
    tcp::Packet::new_unchecked(&mut f[14 + 20..14 + 40]).fill_checksum(src, VIP);
    f
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn syn(r: &mut Rig, src: u32, sport: u16) -> Verdict {
    r.run(0, &mut segment(src, sport, SYN))
}

#[test]
fn syns_over_a_sources_limit_are_dropped_as_rate_limited() {
    let mut r = limited(0, 1, 3, 32);
    let verdicts: Vec<Verdict> = (0..10).map(|i| syn(&mut r, CLIENT, 30000 + i)).collect();
    assert!(verdicts[..3].iter().all(|v| *v == Verdict::Transmit(1)), "{verdicts:?}");
    assert!(verdicts[3..].iter().all(|v| *v == Verdict::Drop(DropReason::RateLimited)), "{verdicts:?}");
    assert_eq!(r.pipe.counters().drops(DropReason::RateLimited), 7);
    // A nat SYN is forwarded untracked (the client's ACK creates the flow),
    // admitted or not: the table holds nothing for any of them.
    assert_eq!(r.pipe.counters().flows_created.get(), 0, "a SYN creates no flow");
    assert_eq!(r.pipe.flows().occupied(), 0);
    // A refused frame is left as it came.
    let frame = segment(CLIENT, 31000, SYN);
    let mut f = frame.clone();
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::RateLimited));
    assert_eq!(f, frame);
    // Another client is not affected.
    assert_eq!(syn(&mut r, REMOTE, 30000), Verdict::Transmit(1));
    // Nor another service (without a limit) for the same client.
    for i in 0..50 {
        let mut f = to_port(0, udp_frame((CLIENT, 40000 + i), (VIP, 53), 64, b"q"));
        assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    }
    // A second later the client may open one more (one a second).
    r.now += SECOND;
    assert_eq!(syn(&mut r, CLIENT, 32000), Verdict::Transmit(1));
    assert_eq!(syn(&mut r, CLIENT, 32001), Verdict::Drop(DropReason::RateLimited));
}

#[test]
fn established_traffic_is_never_limited() {
    let mut r = limited(0, 1, 2, 32);
    assert_eq!(syn(&mut r, CLIENT, 30000), Verdict::Transmit(1));
    assert_eq!(syn(&mut r, CLIENT, 30001), Verdict::Transmit(1));
    assert_eq!(syn(&mut r, CLIENT, 30002), Verdict::Drop(DropReason::RateLimited));
    // The client is over its limit; its open flows go on.
    for _ in 0..100 {
        for sport in [30000, 30001] {
            assert_eq!(r.run(0, &mut segment(CLIENT, sport, ACK)), Verdict::Transmit(1));
        }
    }
    // A segment without SYN of a flow the gateway does not track (picked
    // up mid-stream after a failover) is not a new flow either.
    assert_eq!(r.run(0, &mut segment(CLIENT, 39999, ACK)), Verdict::Transmit(1));
    // Nor is the backends' traffic back to the client.
    let mut reply = to_port(1, tcp_frame((BACKENDS[0], 8080), (CLIENT, 30000), 64, b""));
    assert_eq!(r.run(1, &mut reply), Verdict::Transmit(0));
    assert_eq!(r.pipe.counters().drops(DropReason::RateLimited), 1);
}

#[test]
fn a_prefix_length_counts_a_subnet_as_one_source() {
    let mut r = limited(0, 1, 2, 24);
    let neighbour = ip(198, 18, 0, 3);
    assert_eq!(syn(&mut r, CLIENT, 30000), Verdict::Transmit(1));
    assert_eq!(syn(&mut r, neighbour, 30000), Verdict::Transmit(1));
    assert_eq!(syn(&mut r, CLIENT, 30001), Verdict::Drop(DropReason::RateLimited));
    assert_eq!(syn(&mut r, neighbour, 30001), Verdict::Drop(DropReason::RateLimited));
    // 198.19.5.0/24 is another source.
    assert_eq!(syn(&mut r, REMOTE, 30000), Verdict::Transmit(1));
    assert_eq!(syn(&mut r, REMOTE + 1, 30000), Verdict::Transmit(1));
    assert_eq!(syn(&mut r, REMOTE + 2, 30000), Verdict::Drop(DropReason::RateLimited));
}

#[test]
fn each_service_has_its_own_limit() {
    let mut r = Rig::resolved();
    let mut s = spec();
    Arc::make_mut(&mut s.services[0]).new_flow_limit = Some(NewFlowLimit { per_second: 1, burst: 1, prefix_len: 32 });
    Arc::make_mut(&mut s.services[1]).new_flow_limit = Some(NewFlowLimit { per_second: 1, burst: 2, prefix_len: 32 });
    r.snap = Snapshot::build(&s).unwrap();
    assert_eq!(syn(&mut r, CLIENT, 30000), Verdict::Transmit(1));
    assert_eq!(syn(&mut r, CLIENT, 30001), Verdict::Drop(DropReason::RateLimited));
    // UDP: each datagram without a tracked flow is a new flow.
    let dns = |r: &mut Rig, sport| r.run(0, &mut to_port(0, udp_frame((CLIENT, sport), (VIP, 53), 64, b"q")));
    assert_eq!(dns(&mut r, 40000), Verdict::Transmit(1));
    assert_eq!(dns(&mut r, 40001), Verdict::Transmit(1));
    assert_eq!(dns(&mut r, 40002), Verdict::Drop(DropReason::RateLimited));
    // A tracked UDP flow goes on.
    assert_eq!(dns(&mut r, 40000), Verdict::Transmit(1));
    assert_eq!(r.pipe.counters().drops(DropReason::RateLimited), 2);
}

#[test]
fn a_service_without_a_limit_never_limits() {
    let mut r = Rig::resolved();
    for i in 0..2000u16 {
        assert_eq!(syn(&mut r, CLIENT, 10000 + i), Verdict::Transmit(1));
    }
    assert_eq!(r.pipe.counters().drops(DropReason::RateLimited), 0);
}

#[test]
fn each_worker_takes_its_share_of_the_rate() {
    // 4 workers: this one admits the whole burst, then 1 a second of 4.
    let mut r = limited(0, 4, 2, 32);
    r.pipe.set_worker(0, 4);
    let mine: Vec<u16> = (1000..u16::MAX).filter(|&p| client_owner(CLIENT, p, 6, 4) == 0).take(4).collect();
    let run = |r: &mut Rig, sport: u16| {
        let mut f = segment(CLIENT, sport, SYN);
        let mut pkts = [RxPacket::new(0, &mut f)];
        let mut v = [Verdict::Consumed];
        r.pipe.process(&r.snap, r.now, &mut pkts, &mut v);
        v[0]
    };
    assert_eq!(run(&mut r, mine[0]), Verdict::Transmit(1));
    assert_eq!(run(&mut r, mine[1]), Verdict::Transmit(1));
    assert_eq!(run(&mut r, mine[2]), Verdict::Drop(DropReason::RateLimited));
    r.now += SECOND - 1;
    assert_eq!(run(&mut r, mine[2]), Verdict::Drop(DropReason::RateLimited));
    r.now += 1;
    assert_eq!(run(&mut r, mine[2]), Verdict::Transmit(1));
}

#[test]
fn a_new_connection_on_a_closed_flows_tuple_counts_against_the_limit() {
    let mut r = limited(0, 1, 1, 32);
    // One connection, admitted, then closed by the client's RST.
    assert_eq!(syn(&mut r, CLIENT, 30000), Verdict::Transmit(1));
    assert_eq!(r.run(0, &mut segment(CLIENT, 30000, ACK)), Verdict::Transmit(1));
    assert_eq!(r.run(0, &mut segment(CLIENT, 30000, 0x04)), Verdict::Transmit(1));
    // A SYN reusing the closed flow's tuple is a new connection (a fresh
    // Maglev choice): within the same second it is over the limit, as on
    // any other tuple.
    assert_eq!(syn(&mut r, CLIENT, 30000), Verdict::Drop(DropReason::RateLimited));
    assert_eq!(syn(&mut r, CLIENT, 30001), Verdict::Drop(DropReason::RateLimited));
}
