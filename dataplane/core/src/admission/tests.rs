use super::*;
use proptest::prelude::*;
use std::collections::HashMap;

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;

fn key(src: u32, dst_port: u16) -> FlowKey {
    FlowKey { src_addr: src, dst_addr: 0xc612_6401, src_port: 40_000, dst_port, protocol: ipv4::protocol::TCP }
}

fn limit(per_second: u32, burst: u32, prefix_len: u8) -> SourceLimit {
    let l = NewFlowLimit { per_second, burst, prefix_len };
    l.validate().unwrap();
    SourceLimit::new(&l)
}

#[test]
fn a_flow_starts_with_a_syn_without_ack_or_any_udp_datagram() {
    let t = ipv4::protocol::TCP;
    assert!(starts_flow(t, tcp::flags::SYN));
    assert!(starts_flow(t, tcp::flags::SYN | tcp::flags::FIN));
    assert!(!starts_flow(t, tcp::flags::SYN | tcp::flags::ACK));
    assert!(!starts_flow(t, tcp::flags::ACK));
    assert!(!starts_flow(t, tcp::flags::ACK | tcp::flags::PSH));
    assert!(!starts_flow(t, tcp::flags::RST));
    assert!(starts_flow(ipv4::protocol::UDP, 0));
}

#[test]
fn only_flow_starts_are_counted() {
    let mut l = NewFlowLimiter::with_seed(64, 1);
    let lim = limit(1, 1, 32);
    let k = key(0xc612_0002, 80);
    for _ in 0..10 {
        assert!(l.admit(&lim, &k, tcp::flags::ACK, 1, 0));
    }
    assert!(l.admit(&lim, &k, tcp::flags::SYN, 1, 0));
    assert!(!l.admit(&lim, &k, tcp::flags::SYN, 1, 0));
    // Established traffic passes even while the source is over its limit.
    assert!(l.admit(&lim, &k, tcp::flags::ACK, 1, 0));
}

#[test]
fn a_burst_at_once_then_the_rate() {
    let mut l = NewFlowLimiter::with_seed(DEFAULT_WIDTH, 2);
    let lim = limit(10, 5, 32);
    let k = key(0xc612_0002, 80);
    let now = 5 * SEC;
    for i in 0..5 {
        assert!(l.admit_new(&lim, &k, 1, now), "flow {i} of the burst");
    }
    assert!(!l.admit_new(&lim, &k, 1, now));
    assert!(!l.admit_new(&lim, &k, 1, now + 99 * MS));
    assert!(l.admit_new(&lim, &k, 1, now + 100 * MS));
    assert!(!l.admit_new(&lim, &k, 1, now + 100 * MS));
}

#[test]
fn a_source_over_its_limit_gets_its_rate_and_no_more() {
    let mut l = NewFlowLimiter::with_seed(DEFAULT_WIDTH, 3);
    let lim = limit(100, 20, 32);
    let k = key(0xc612_0002, 80);
    // 1000 new flows a second for 10 seconds.
    let admitted = (0..10_000u64).filter(|i| l.admit_new(&lim, &k, 1, SEC + i * MS)).count();
    // The burst, then 100 a second (the last offer is at 9.999 s).
    assert!((20 + 999..=20 + 1000).contains(&admitted), "admitted {admitted}");
}

#[test]
fn once_the_flood_stops_the_source_is_let_back_in() {
    let mut l = NewFlowLimiter::with_seed(DEFAULT_WIDTH, 4);
    let lim = limit(10, 10, 32);
    let k = key(0xc612_0002, 80);
    // 100,000 a second for 1.05 s.
    for i in 0..105_000u64 {
        l.admit_new(&lim, &k, 1, i * 10_000);
    }
    let end = 105_000 * 10_000;
    assert!(!l.admit_new(&lim, &k, 1, end));
    // One interval later one flow; a full burst once a second has passed.
    assert!(l.admit_new(&lim, &k, 1, end + 100 * MS));
    let later = end + 2 * SEC;
    assert!((0..10).all(|_| l.admit_new(&lim, &k, 1, later)));
    assert!(!l.admit_new(&lim, &k, 1, later));
}

#[test]
fn the_prefix_length_makes_a_subnet_one_source() {
    let mut l = NewFlowLimiter::with_seed(DEFAULT_WIDTH, 5);
    let lim = limit(1, 2, 24);
    assert!(l.admit_new(&lim, &key(0xc612_0a01, 80), 1, 0));
    assert!(l.admit_new(&lim, &key(0xc612_0aff, 80), 1, 0));
    assert!(!l.admit_new(&lim, &key(0xc612_0a42, 80), 1, 0), "same /24");
    assert!(l.admit_new(&lim, &key(0xc612_0b01, 80), 1, 0), "another /24");
    // /0: every client is one source.
    let all = limit(1, 1, 0);
    assert!(l.admit_new(&all, &key(0x0101_0101, 81), 1, 0));
    assert!(!l.admit_new(&all, &key(0xc612_0001, 81), 1, 0));
}

#[test]
fn two_services_count_a_source_apart() {
    let mut l = NewFlowLimiter::with_seed(DEFAULT_WIDTH, 6);
    let lim = limit(1, 1, 32);
    let src = 0xc612_0002;
    assert!(l.admit_new(&lim, &key(src, 80), 1, 0));
    assert!(!l.admit_new(&lim, &key(src, 80), 1, 0));
    assert!(l.admit_new(&lim, &key(src, 443), 1, 0));
    let udp = FlowKey { protocol: ipv4::protocol::UDP, ..key(src, 80) };
    assert!(l.admit_new(&lim, &udp, 1, 0));
}

#[test]
fn a_worker_allows_its_share_of_the_rate_and_the_whole_burst() {
    let mut l = NewFlowLimiter::with_seed(DEFAULT_WIDTH, 7);
    let lim = limit(100, 10, 32);
    let k = key(0xc612_0002, 80);
    assert!((0..10).all(|_| l.admit_new(&lim, &k, 4, SEC)));
    assert!(!l.admit_new(&lim, &k, 4, SEC));
    // 25 a second on each of 4 workers: one every 40 ms.
    assert!(!l.admit_new(&lim, &k, 4, SEC + 39 * MS));
    assert!(l.admit_new(&lim, &k, 4, SEC + 40 * MS));
}

#[test]
fn each_limiter_draws_its_own_seed() {
    let (a, b) = (NewFlowLimiter::new(DEFAULT_WIDTH), NewFlowLimiter::new(DEFAULT_WIDTH));
    let lim = limit(1, 1, 32);
    let keys: Vec<FlowKey> = (0..16).map(|i| key(0xc612_0000 + i, 80)).collect();
    assert!(keys.iter().any(|k| a.slots(&lim, k) != b.slots(&lim, k)));
    // A fixed seed repeats.
    let (c, d) = (NewFlowLimiter::with_seed(DEFAULT_WIDTH, 9), NewFlowLimiter::with_seed(DEFAULT_WIDTH, 9));
    assert!(keys.iter().all(|k| c.slots(&lim, k) == d.slots(&lim, k)));
}

#[test]
fn memory_is_fixed_at_construction() {
    let l = NewFlowLimiter::new(DEFAULT_WIDTH);
    assert_eq!(l.memory_bytes(), DEPTH * DEFAULT_WIDTH * 8);
    assert_eq!(NewFlowLimiter::new(5000).width(), 8192);
    assert_eq!(NewFlowLimiter::new(usize::MAX).width(), MAX_WIDTH);
}

#[test]
fn limits_are_checked() {
    assert_eq!(
        NewFlowLimit::checked(100, None, None),
        Ok(NewFlowLimit { per_second: 100, burst: 100, prefix_len: 32 })
    );
    assert_eq!(NewFlowLimit::checked(0, None, None), Err(NewFlowLimitError::PerSecond(0)));
    assert_eq!(NewFlowLimit::checked(1_000_001, None, None), Err(NewFlowLimitError::PerSecond(1_000_001)));
    assert_eq!(NewFlowLimit::checked(-1, None, None), Err(NewFlowLimitError::PerSecond(-1)));
    assert_eq!(NewFlowLimit::checked(5, Some(0), None), Err(NewFlowLimitError::Burst(0)));
    assert_eq!(NewFlowLimit::checked(5, Some(1 << 40), None), Err(NewFlowLimitError::Burst(1 << 40)));
    assert_eq!(NewFlowLimit::checked(5, None, Some(33)), Err(NewFlowLimitError::PrefixLen(33)));
    assert_eq!(NewFlowLimit::checked(5, None, Some(-8)), Err(NewFlowLimitError::PrefixLen(-8)));
    assert_eq!(NewFlowLimitError::Burst(0).field(), "burst");
    assert_eq!(NewFlowLimitError::Burst(0).to_string(), "0 is not from 1 to 1000000");
}

/// The exact algorithm, one arrival time per source and service.
#[derive(Default)]
struct Exact(HashMap<(u32, u16), u64>);

impl Exact {
    fn tat(&self, lim: &SourceLimit, k: &FlowKey) -> u64 {
        self.0.get(&(k.src_addr & lim.mask, k.dst_port)).copied().unwrap_or(0)
    }
    fn conforms(&self, lim: &SourceLimit, k: &FlowKey, workers: u16, now: u64) -> bool {
        let interval = lim.interval_ns * u64::from(workers);
        self.tat(lim, k).max(now) - now <= interval * lim.extra_burst
    }
    fn count(&mut self, lim: &SourceLimit, k: &FlowKey, workers: u16, now: u64) {
        let tat = self.tat(lim, k).max(now) + lim.interval_ns * u64::from(workers);
        self.0.insert((k.src_addr & lim.mask, k.dst_port), tat);
    }
}

proptest! {
    /// With as few cells as possible (so that keys collide all the time),
    /// every key's estimate stays at or ahead of its exact arrival time, so
    /// nothing the exact algorithm would refuse is admitted, and no source
    /// gets more than `burst + rate * elapsed` flows in any interval.
    #[test]
    fn never_under_counts(
        per_second in 1u32..2000,
        burst in 1u32..20,
        workers in 1u16..4,
        ops in prop::collection::vec((0u32..12, 0u16..2, 0u64..20 * MS), 1..400),
    ) {
        let lim = limit(per_second, burst, 32);
        let interval = lim.interval_ns * u64::from(workers);
        let mut l = NewFlowLimiter::with_seed(2, u64::from(per_second));
        let mut exact = Exact::default();
        let mut admitted: HashMap<(u32, u16), Vec<u64>> = HashMap::new();
        let mut now = 0;
        for (src, port, gap) in ops {
            now += gap;
            let k = key(0xc612_0000 + src, 80 + port);
            let conforms = exact.conforms(&lim, &k, workers, now);
            if l.admit_new(&lim, &k, workers, now) {
                prop_assert!(conforms, "admitted a flow the exact limit refuses");
                exact.count(&lim, &k, workers, now);
                admitted.entry((k.src_addr, k.dst_port)).or_default().push(now);
            }
            for s in 0..12 {
                for p in 0..2 {
                    let k = key(0xc612_0000 + s, 80 + p);
                    prop_assert!(l.estimate(&lim, &k) >= exact.tat(&lim, &k));
                }
            }
        }
        for times in admitted.values() {
            for i in 0..times.len() {
                for j in i..times.len() {
                    let n = (j - i + 1) as u64;
                    prop_assert!(n <= u64::from(burst) || (n - u64::from(burst)) * interval <= times[j] - times[i]);
                }
            }
        }
    }

    /// A source that keeps to its rate is never refused while the sketch
    /// is not contended (a few other sources, also within their limits).
    #[test]
    fn a_source_within_its_limit_is_never_refused(
        per_second in 1u32..100_000,
        burst in 1u32..50,
        workers in 1u16..8,
        seed: u64,
        ops in prop::collection::vec((0u32..8, 1u64..4), 1..300),
    ) {
        let lim = limit(per_second, burst, 32);
        let interval = lim.interval_ns * u64::from(workers);
        let mut l = NewFlowLimiter::with_seed(DEFAULT_WIDTH, seed);
        // Each source waits at least one interval between its flows.
        let mut next = [0u64; 8];
        let mut now = SEC;
        for (src, spacing) in ops {
            now += interval / 8;
            let at = now.max(next[src as usize]);
            next[src as usize] = at + spacing * interval;
            prop_assert!(l.admit_new(&lim, &key(0xc612_0000 + src * 65_537, 80), workers, at));
        }
    }

    /// A source offering ten times its rate gets its rate through, to
    /// within one flow. (With a burst of 1 a source is admitted only once
    /// its arrival time has passed, so the offers' spacing rounds the rate
    /// down: up to a tenth here.)
    #[test]
    fn a_source_over_its_limit_is_refused_at_the_right_rate(
        per_second in 1u32..1000,
        burst in 2u32..100,
        seed: u64,
    ) {
        let lim = limit(per_second, burst, 32);
        let mut l = NewFlowLimiter::with_seed(DEFAULT_WIDTH, seed);
        // Ten a flow's interval, for as long as the burst and two seconds.
        let offers = 10 * (u64::from(burst) + 2 * u64::from(per_second));
        let step = lim.interval_ns / 10;
        let k = key(0xc612_0002, 80);
        let admitted = (0..offers).filter(|i| l.admit_new(&lim, &k, 1, SEC + i * step)).count() as u64;
        let span = (offers - 1) * step;
        let expected = u64::from(burst) + span / lim.interval_ns;
        prop_assert!(admitted.abs_diff(expected) <= 1, "admitted {admitted}, expected {expected}");
    }
}
