//! The IPv6 table ([`FlowTable6`]): the same code as the IPv4 table, so
//! these tests check what differs (the key, its hash, the entry) and that
//! every guarantee holds with the larger entry: lookups, expiry and
//! sweeping, eviction when full, the TCP states, half-open inserts.

use super::*;
use crate::wire::tcp::flags::{ACK, FIN, RST, SYN};
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};

const S: u64 = 1_000_000_000;
const UNIT: u64 = 1 << TIME_UNIT_SHIFT;
const TCP: u8 = 6;
const UDP: u8 = 17;
/// 2001:db8::/32, the documentation prefix: clients in 2001:db8:c::/48.
const CLIENTS: u128 = 0x2001_0db8_000c_0000_0000_0000_0000_0000;
/// 2001:db8:f::100, the VIP.
const VIP: u128 = 0x2001_0db8_000f_0000_0000_0000_0000_0100;

fn key(i: u32) -> FlowKey6 {
    FlowKey6 {
        src_addr: CLIENTS | u128::from(i >> 16),
        dst_addr: VIP,
        src_port: i as u16,
        dst_port: 443,
        protocol: TCP,
    }
}

fn udp_key(i: u32) -> FlowKey6 {
    FlowKey6 { protocol: UDP, dst_port: 53, ..key(i) }
}

/// An entry whose backend address (2001:db8:b::id) doubles as an identity.
fn entry(k: &FlowKey6, state: FlowState, id: u32) -> FlowEntry6 {
    let mut e = FlowEntry6::new(k, state);
    e.backend_addr = 0x2001_0db8_000b_0000_0000_0000_0000_0000 | u128::from(id);
    e.backend_port = 8080;
    e
}

fn id_of(e: &FlowEntry6) -> u32 {
    e.backend_addr as u32
}

fn table(capacity: usize) -> FlowTable6 {
    FlowTable6::with_seed(capacity, FlowTimeouts::default(), 42)
}

/// Live for more than the timeout, gone less than two coarse units after.
fn assert_lifetime(t: &FlowTable6, k: &FlowKey6, since: u64, timeout: u64) {
    assert!(t.find(k, since + timeout).is_some(), "{k:?} gone before {timeout} ns");
    assert!(t.find(k, since + timeout + 2 * UNIT).is_none(), "{k:?} still there after {timeout} ns");
}

#[test]
fn sizes_and_memory() {
    assert_eq!(size_of::<FlowEntry6>(), 80);
    assert_eq!(std::mem::align_of::<FlowEntry6>(), 16);
    assert_eq!(BYTES_PER_SLOT6, 88);
    assert_eq!(memory_bytes6(1_000_000), 88_000_000);
    assert_eq!(memory_bytes6(DEFAULT_CAPACITY), 88 << 20);
    for (asked, got) in [(0, 8), (9, 16), (1001, 1008)] {
        let t = table(asked);
        assert_eq!(t.capacity(), got, "capacity {asked}");
        let [(_, buckets), (_, entries)] = t.memory_regions();
        assert_eq!(buckets + entries, memory_bytes6(asked));
    }
    // The IPv4 table is unchanged by the IPv6 one.
    assert_eq!(size_of::<FlowEntry>(), 32);
    assert_eq!(BYTES_PER_SLOT, 40);
}

#[test]
fn insert_lookup_remove() {
    let mut t = table(1024);
    let k = key(1);
    let e = entry(&k, FlowState::TcpSynSent, 7);
    assert_eq!(t.lookup(&k, 0), None);
    let (r, outcome) = t.insert(e, 0);
    assert_eq!(outcome, InsertOutcome::Vacant);
    assert_eq!((t.lookup(&k, S), t.find(&k, S)), (Some(r), Some(r)));
    assert_eq!(*t.get(r), e);
    assert_eq!(t.get(r).key(), k);
    // Every part of the key counts, both halves of both addresses included.
    for other in [
        FlowKey6 { src_addr: k.src_addr ^ (1 << 64), ..k },
        FlowKey6 { src_addr: k.src_addr ^ 1, ..k },
        FlowKey6 { dst_addr: k.dst_addr ^ (1 << 100), ..k },
        FlowKey6 { dst_addr: k.dst_addr ^ 2, ..k },
        FlowKey6 { src_port: 2, ..k },
        FlowKey6 { dst_port: 80, ..k },
        FlowKey6 { protocol: UDP, ..k },
    ] {
        assert_eq!(t.lookup(&other, S), None, "{other:?}");
    }
    let h = t.hash_key(&k);
    assert_eq!(t.lookup_hashed(&k, h, S), Some(r));
    assert!(t.candidate_buckets(h).contains(&(r.slot() / SLOTS_PER_BUCKET)));
    assert_eq!(t.prefetch_addresses(h)[0], &t.buckets[t.candidate_buckets(h)[0]] as *const Bucket as usize);
    assert_eq!(t.entry_prefetch_address(h), Some(t.get(r) as *const FlowEntry6 as usize));

    t.get_mut(r).snat_port = 61000;
    t.get_mut(r).set_stats_slot(0x12_3456);
    let removed = t.remove(r).unwrap();
    assert_eq!((removed.snat_port, id_of(&removed), removed.stats_slot()), (61000, 7, 0x12_3456));
    assert_eq!(t.lookup(&k, S), None);
    assert_eq!(t.occupied(), 0);
    assert_eq!(t.remove(r), None, "a handle whose flow left removes nothing");
    // Same seed, same hash; another seed, another hash.
    assert_eq!(table(8).hash_key(&k), h);
    assert_ne!(FlowTable6::with_seed(8, FlowTimeouts::default(), 43).hash_key(&k), h);
    assert_ne!(FlowTable6::new(8, FlowTimeouts::default()).hash_key(&k), h);
}

#[test]
fn replaced_expired_swept_and_retained() {
    let d = FlowTimeouts::default();
    let mut t = table(1024);
    let (_, outcome) = t.insert(entry(&key(1), FlowState::TcpSynSent, 1), 0);
    assert_eq!(outcome, InsertOutcome::Vacant);
    let (_, outcome) = t.insert(entry(&key(1), FlowState::TcpEstablished, 2), S);
    assert_eq!(outcome, InsertOutcome::Replaced(entry(&key(1), FlowState::TcpSynSent, 1)));
    for i in 2..100 {
        let state = if i & 1 == 0 { FlowState::TcpSynSent } else { FlowState::Udp };
        let k = if i & 1 == 0 { key(i) } else { udp_key(i) };
        let _ = t.insert(entry(&k, state, i), S);
    }
    assert_lifetime(&t, &key(1), S, d.tcp_established_ns);
    assert_lifetime(&t, &key(2), S, d.tcp_syn_ns);
    assert_lifetime(&t, &udp_key(3), S, d.udp_ns);
    // 31 s later the half-open flows have expired: a sweep in small steps
    // hands each back once.
    let now = 32 * S;
    assert_eq!(t.count_live(now), 50);
    let mut handed = Vec::new();
    for _ in 0..t.capacity() / 100 + 1 {
        assert!(t.expire_some(now, 100, |e| handed.push(id_of(e))) <= 100);
    }
    handed.sort_unstable();
    assert_eq!(handed, (2..100).step_by(2).collect::<Vec<_>>());
    assert_eq!((t.occupied(), t.count_live(now)), (50, 50));
    // An expired flow's slot is handed back when a new flow reuses it.
    let mut small = table(8);
    let _ = small.insert(entry(&udp_key(1), FlowState::Udp, 1), 0);
    assert_eq!(small.lookup(&udp_key(1), 301 * S), None);
    let (_, outcome) = small.insert(entry(&udp_key(2), FlowState::Udp, 2), 301 * S);
    assert_eq!(outcome, InsertOutcome::ReusedExpired(entry(&udp_key(1), FlowState::Udp, 1)));
    // retain keeps what it is told to.
    t.retain(|e| !id_of(e).is_multiple_of(3));
    assert_eq!(t.occupied(), 50 - 17);
    assert!(t.find(&udp_key(3), now).is_none() && t.find(&udp_key(5), now).is_some());
}

#[test]
fn tcp_flags_drive_timeouts() {
    let d = FlowTimeouts::default();
    let mut t = table(64);
    let k = key(1);
    let (r, _) = t.insert(entry(&k, FlowState::TcpSynSent, 1), 0);
    t.on_tcp_flags(r, true, ACK, S);
    assert_eq!(t.get(r).state, FlowState::TcpEstablished);
    assert!(t.get(r).is_established());
    assert_lifetime(&t, &k, S, d.tcp_established_ns);
    t.on_tcp_flags(r, false, FIN | ACK, 2 * S);
    assert_eq!((t.get(r).state, t.get(r).flags), (FlowState::TcpClosing, FlowEntry::FIN_FROM_BACKEND));
    assert_lifetime(&t, &k, 2 * S, d.tcp_closing_ns);
    t.on_tcp_flags(r, true, SYN, 3 * S);
    assert_eq!((t.get(r).state, t.get(r).flags), (FlowState::TcpSynSent, 0));
    assert_lifetime(&t, &k, 3 * S, d.tcp_syn_ns);
    t.on_tcp_flags(r, false, RST, 4 * S);
    assert_eq!(t.get(r).flags, FlowEntry::RESET);
    assert_lifetime(&t, &k, 4 * S, d.tcp_reset_ns);
    // A state set by hand, then touched.
    t.get_mut(r).state = FlowState::Udp;
    t.touch(r, 5 * S);
    assert_lifetime(&t, &k, 5 * S, d.udp_ns);
}

#[test]
fn full_candidates_evict_the_flow_closest_to_expiry() {
    let mut t = table(8); // one bucket: every key competes for it
    for i in 0..8 {
        let _ = t.insert(entry(&key(i), FlowState::TcpEstablished, i), u64::from(i) * S);
    }
    let (r, outcome) = t.insert(entry(&key(100), FlowState::TcpEstablished, 100), 10 * S);
    assert_eq!(outcome, InsertOutcome::Evicted(entry(&key(0), FlowState::TcpEstablished, 0)));
    assert_eq!(id_of(t.get(r)), 100);
    assert_eq!(t.occupied(), 8);
    // Inserts never refuse and never exceed the capacity.
    let mut t = table(64);
    let mut evicted = 0;
    for i in 0..1000 {
        let (r, outcome) = t.insert(entry(&key(i), FlowState::TcpEstablished, i), S);
        evicted += usize::from(outcome.is_eviction());
        assert_eq!(t.find(&key(i), S), Some(r));
    }
    assert_eq!((t.occupied(), t.count_live(S), evicted), (64, 64, 1000 - 64));
}

#[test]
fn half_open_inserts_evict_only_half_open_flows() {
    let mut t = table(8);
    let half = |t: &mut FlowTable6, i: u32, now: u64| {
        let k = key(i);
        let h = t.hash_key(&k);
        t.insert_half_open_hashed(entry(&k, FlowState::TcpSynSent, i), h, now)
    };
    for i in 10..14 {
        let _ = t.insert(entry(&key(i), FlowState::TcpEstablished, i), 0);
    }
    for i in 0..4 {
        let (_, outcome) = half(&mut t, i, (880 + u64::from(i)) * S).expect("a free slot");
        assert_eq!(outcome, InsertOutcome::Vacant);
    }
    // Established flows 10 s from expiry stay; the oldest half-open goes.
    let (_, outcome) = half(&mut t, 100, 890 * S).expect("a half-open victim");
    assert_eq!(outcome.displaced().map(id_of), Some(0));
    assert!(outcome.is_eviction());
    for i in 10..14 {
        assert!(t.find(&key(i), 890 * S).is_some(), "flow {i}");
    }
    // Only established flows: refused, nothing changed.
    let mut t = table(8);
    for i in 0..8 {
        let _ = t.insert(entry(&key(i), FlowState::TcpEstablished, i), 0);
    }
    assert_eq!(half(&mut t, 100, 890 * S), None);
    assert_eq!((t.find(&key(100), 890 * S), t.count_live(890 * S)), (None, 8));
}

/// Chi-square statistic of `counts` against a uniform distribution.
fn chi_square(counts: &[u32], total: u32) -> f64 {
    let expected = f64::from(total) / counts.len() as f64;
    counts.iter().map(|&c| (f64::from(c) - expected).powi(2) / expected).sum()
}

/// Keys whose addresses differ only in the high 64 bits, or only in the low
/// 64 bits (of the source, then of the destination), spread evenly over the
/// buckets and get distinct tags, and a single bit flipped anywhere in
/// either address moves about half of the hash's bits.
#[test]
fn addresses_differing_in_either_half_spread_evenly() {
    const BUCKETS: usize = 1024;
    const FLOWS: u32 = 1 << 16;
    let t = FlowTable6::with_seed(BUCKETS * SLOTS_PER_BUCKET, FlowTimeouts::default(), 7);
    let base = key(0);
    type Variant = (&'static str, fn(u128) -> FlowKey6);
    let variants: [Variant; 4] = [
        ("source, high half", |i| FlowKey6 { src_addr: CLIENTS | (i << 64), ..key(0) }),
        ("source, low half", |i| FlowKey6 { src_addr: CLIENTS | i, ..key(0) }),
        ("destination, high half", |i| FlowKey6 { dst_addr: VIP | (i << 64), ..key(0) }),
        ("destination, low half", |i| FlowKey6 { dst_addr: VIP ^ (i << 16), ..key(0) }),
    ];
    for (name, make) in variants {
        let mut counts = vec![0u32; BUCKETS];
        let mut tags = HashSet::new();
        for i in 0..FLOWS {
            let (first, tag) = t.home(t.hash_key(&make(u128::from(i))));
            counts[first] += 1;
            tags.insert(tag);
        }
        // 1023 degrees of freedom: mean 1023, standard deviation about 45.
        let chi2 = chi_square(&counts, FLOWS);
        assert!((750.0..1300.0).contains(&chi2), "{name}: chi-square {chi2}");
        // 2^16 tags drawn from 2^31: about one collision expected.
        assert!(tags.len() as u32 >= FLOWS - 8, "{name}: {} distinct tags", tags.len());
    }
    let h = t.hash_key(&base).0;
    for bit in 0..128 {
        for k in [
            FlowKey6 { src_addr: base.src_addr ^ (1 << bit), ..base },
            FlowKey6 { dst_addr: base.dst_addr ^ (1 << bit), ..base },
        ] {
            let flipped = (h ^ t.hash_key(&k).0).count_ones();
            assert!((12..=52).contains(&flipped), "bit {bit} of {k:?}: {flipped} bits flipped");
        }
    }
}

#[test]
fn default_capacity_holds_a_million_flows() {
    if cfg!(debug_assertions) {
        return; // a million inserts: release builds only
    }
    let mut t = FlowTable6::new(DEFAULT_CAPACITY, FlowTimeouts::default());
    for i in 0..1_000_000u32 {
        // Clients spread over the low half, ports over the high half.
        let k = FlowKey6 {
            src_addr: CLIENTS | (u128::from(i % 4099) << 64) | u128::from(i.wrapping_mul(0x9E37_79B9)),
            ..key(i)
        };
        let (_, outcome) = t.insert(entry(&k, FlowState::TcpEstablished, i), S);
        assert!(!outcome.is_eviction(), "eviction after {i} flows");
    }
    assert_eq!(t.count_live(S), 1_000_000);
}

/// Short timeouts, so that sequences cross them often.
fn short_timeouts() -> FlowTimeouts {
    FlowTimeouts { tcp_syn_ns: 2 * S, tcp_established_ns: 9 * S, tcp_closing_ns: 4 * S, tcp_reset_ns: S, udp_ns: 6 * S }
}

/// 2001:db8 keys from a small set, TCP or UDP, that differ in the high half,
/// the low half, or the ports.
fn small_key(i: u8) -> FlowKey6 {
    let k = if i & 1 == 0 { key(0) } else { udp_key(0) };
    match i % 3 {
        0 => FlowKey6 { src_addr: k.src_addr | (u128::from(i) << 64), ..k },
        1 => FlowKey6 { src_addr: k.src_addr | u128::from(i), ..k },
        _ => FlowKey6 { src_port: u16::from(i), ..k },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any sequence of inserts (full and half-open), lookups, TCP segments,
    /// removals and sweeps on tables large or too small for their keys:
    /// a lookup finds exactly the live flow a hash map with the documented
    /// timeouts holds (the map forgets what the table hands back); every
    /// entry leaves exactly once; capacity is never exceeded;
    /// an eviction takes a live candidate with the nearest expiry.
    #[test]
    fn every_entry_is_accounted_for(
        capacity in prop_oneof![1usize..48, Just(512usize)],
        ops in prop::collection::vec((0u8..40, 0u8..8, 0..3 * S), 1..300),
        seed in any::<u64>(),
    ) {
        let timeouts = short_timeouts();
        let lifetimes = Lifetimes::new(&timeouts);
        let mut t = FlowTable6::with_seed(capacity, timeouts, seed);
        // id -> (entry as the table should hold it, expiry in coarse units).
        let mut held: HashMap<u32, (FlowEntry6, u64)> = HashMap::new();
        let expiry = |e: &FlowEntry6, now: u64| (now >> TIME_UNIT_SHIFT) + u64::from(lifetimes.of(e.state, e.flags));
        let mut now = 0;
        for (n, (k, action, dt)) in ops.into_iter().enumerate() {
            let id = n as u32 + 1;
            now += dt;
            let k = small_key(k);
            let live = held.iter().find(|(_, (e, exp))| e.key() == k && now >> TIME_UNIT_SHIFT < *exp).map(|(id, _)| *id);
            match action {
                0 => {
                    let got = t.lookup(&k, now);
                    // The map holds exactly what the table holds.
                    prop_assert_eq!(got.map(|r| id_of(t.get(r))), live);
                    if let Some(r) = got {
                        let e = t.remove(r).unwrap();
                        prop_assert_eq!(held.remove(&id_of(&e)).map(|(h, _)| h), Some(e));
                    }
                }
                1 => {
                    t.expire_some(now, t.capacity(), |e| {
                        let (h, exp) = held.remove(&id_of(e)).expect("held");
                        assert_eq!(h, *e);
                        assert!(now >> TIME_UNIT_SHIFT >= exp, "handed back while live");
                    });
                }
                2 | 3 => {
                    if let Some(r) = t.lookup(&k, now) {
                        let flags = [ACK, FIN | ACK, RST, SYN][usize::from(n as u8 & 3)];
                        t.on_tcp_flags(r, action == 2, flags, now);
                        let slot = held.get_mut(&id_of(t.get(r))).expect("held");
                        (slot.0.state, slot.0.flags) = tcp_transition(slot.0.state, slot.0.flags, action == 2, flags);
                        slot.1 = expiry(&slot.0, now);
                        prop_assert_eq!(*t.get(r), slot.0);
                    }
                }
                _ => {
                    let state = FlowState::of_first_packet(k.protocol, [SYN, ACK][usize::from(action & 1)]);
                    let e = entry(&k, state, id);
                    let h = t.hash_key(&k);
                    let cands = t.candidate_buckets(h);
                    let before: Vec<(u32, u32)> = cands
                        .iter()
                        .flat_map(|&b| (0..SLOTS_PER_BUCKET).map(move |i| (b, i)))
                        .map(|(b, i)| (id_of(&t.entries[b * SLOTS_PER_BUCKET + i]), t.buckets[b].expiry[i]))
                        .collect();
                    let done = if action == 4 { t.insert_half_open_hashed(e, h, now) } else { Some(t.insert_hashed(e, h, now)) };
                    let Some((r, outcome)) = done else {
                        // Refused: only a half-open insert, and only when no
                        // candidate is half-open or free.
                        prop_assert_eq!(action, 4);
                        prop_assert_eq!(t.find(&k, now).map(|r| id_of(t.get(r))), live);
                        continue;
                    };
                    prop_assert_eq!(*t.get(r), e);
                    if let Some(gone) = outcome.displaced() {
                        prop_assert!(held.remove(&id_of(gone)).is_some());
                    }
                    if let InsertOutcome::Replaced(gone) = outcome {
                        prop_assert_eq!(Some(id_of(&gone)), live);
                    }
                    if let InsertOutcome::Evicted(gone) = outcome {
                        let c = coarse(now);
                        let victim = before.iter().find(|&&(id, _)| id == id_of(&gone)).unwrap();
                        prop_assert!(is_live(victim.1, c, t.horizon));
                        if action == 4 {
                            prop_assert_eq!(gone.state, FlowState::TcpSynSent);
                        } else {
                            let nearest = before.iter().map(|&(_, exp)| exp.wrapping_sub(c)).min().unwrap();
                            prop_assert_eq!(victim.1.wrapping_sub(c), nearest);
                        }
                    }
                    held.insert(id, (e, expiry(&e, now)));
                }
            }
            prop_assert!(t.occupied() <= t.capacity());
            prop_assert_eq!(t.occupied(), held.len());
        }
        // Everything left is handed back by sweeps once it expires.
        t.expire_some(now + 100 * S, t.capacity(), |e| assert!(held.remove(&id_of(e)).is_some()));
        prop_assert!(held.is_empty());
        prop_assert_eq!(t.occupied(), 0);
    }
}
