//! Criterion timings of the per-worker flow table (`vipgate_dataplane::flow`),
//! per operation: lookup hit, lookup miss, a burst of 32 hits hashed first and
//! probed after, insert into an empty table, and insert into a full table
//! (every insert evicts). Three sizes: `1` (one live flow in a one-bucket
//! table), `10k` and `1M` live flows, each at the same load (95% of the
//! slots, the default capacity's load with a million flows). Tables are
//! built outside the timed sections; keys are computed inline from a counter
//! (a few instructions), so no key array competes for the cache.
//!
//! `cargo bench --bench flow`
// criterion_group! defines `pub fn benches` without documentation, and an
// attribute on the macro call does not reach its expansion.
#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::{Duration, Instant};
use vipgate_dataplane::flow::{DEFAULT_CAPACITY, FlowEntry, FlowState, FlowTable, FlowTimeouts};
use vipgate_dataplane::hash::FlowKey;

/// Every flow is touched at this time: nothing expires during a benchmark.
const NOW: u64 = 1_000_000_000;
const SEED: u64 = 0x5EED;
/// Keys from this index on are never inserted by the set-up.
const MISS: u32 = 1 << 28;

/// (name, live flows, capacity in slots).
const SIZES: [(&str, u32, usize); 3] = [("1", 1, 8), ("10k", 10_000, 10_488), ("1M", 1_000_000, DEFAULT_CAPACITY)];

/// Distinct keys for distinct `i`: 65536 source ports per client address.
fn key(i: u32) -> FlowKey {
    FlowKey { src_addr: 0xC612_0000 + (i >> 16), dst_addr: 0xC613_0064, src_port: i as u16, dst_port: 443, protocol: 6 }
}

fn entry(i: u32) -> FlowEntry {
    let mut e = FlowEntry::new(&key(i), FlowState::TcpEstablished);
    e.backend_addr = 0xC612_0100 + (i & 0xFF);
    e.backend_port = 8080;
    e
}

fn table(live: u32, capacity: usize) -> FlowTable {
    let mut t = FlowTable::with_seed(capacity, FlowTimeouts::default(), SEED);
    for i in 0..live {
        let (_, outcome) = t.insert(entry(i), NOW);
        assert!(!outcome.is_eviction(), "set-up evicted at {i} of {live}");
    }
    t
}

fn lookups(c: &mut Criterion) {
    let mut g = c.benchmark_group("flow_lookup");
    g.throughput(Throughput::Elements(1));
    for (name, live, capacity) in SIZES {
        let mut t = table(live, capacity);
        let mut i = 0u32;
        g.bench_function(BenchmarkId::new("hit", name), |b| {
            b.iter(|| {
                i = if i + 1 == live { 0 } else { i + 1 };
                black_box(t.lookup(&key(black_box(i)), NOW)).unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("miss", name), |b| {
            b.iter(|| {
                i = if i + 1 == live { 0 } else { i + 1 };
                assert!(black_box(t.lookup(&key(black_box(MISS + i)), NOW)).is_none());
            })
        });
    }
    g.finish();

    // A burst: hash 32 keys, then probe them, as a burst-wise pipeline would.
    let mut g = c.benchmark_group("flow_lookup_burst32");
    g.throughput(Throughput::Elements(32));
    for (name, live, capacity) in SIZES {
        let mut t = table(live, capacity);
        let mut i = 0u32;
        g.bench_function(BenchmarkId::new("hit", name), |b| {
            b.iter(|| {
                let mut keys = [key(0); 32];
                let mut hashes = [t.hash_key(&keys[0]); 32];
                for (k, h) in keys.iter_mut().zip(hashes.iter_mut()) {
                    i = if i + 1 == live { 0 } else { i + 1 };
                    *k = key(i);
                    *h = t.hash_key(k);
                }
                for (k, h) in keys.iter().zip(hashes) {
                    black_box(t.lookup_hashed(k, h, NOW)).unwrap();
                }
            })
        });
    }
    g.finish();
}

fn inserts(c: &mut Criterion) {
    let mut g = c.benchmark_group("flow_insert");
    g.throughput(Throughput::Elements(1));
    for (name, live, capacity) in SIZES {
        // Into an empty table. With one flow: insert it and remove it again
        // (the figure includes the removal, a few instructions), so the table
        // stays empty and hot. Otherwise fill fresh tables from empty to
        // `live` flows: the mean over loads from 0 to 95%.
        g.bench_function(BenchmarkId::new("empty", name), |b| {
            if live == 1 {
                let mut t = FlowTable::with_seed(capacity, FlowTimeouts::default(), SEED);
                return b.iter(|| {
                    let (r, outcome) = t.insert(entry(black_box(0)), NOW);
                    assert!(outcome.displaced().is_none());
                    black_box(t.remove(r))
                });
            }
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0u64;
                while done < iters {
                    let mut t = FlowTable::with_seed(capacity, FlowTimeouts::default(), SEED);
                    let n = (iters - done).min(u64::from(live)) as u32;
                    let start = Instant::now();
                    for i in 0..n {
                        let _ = black_box(t.insert(entry(black_box(i)), NOW));
                    }
                    total += start.elapsed();
                    done += u64::from(n);
                }
                total
            })
        });

        // Into a full table: every slot live, every insert evicts (most
        // inserts skip the room-making search, see DISPLACEMENT_BACKOFF).
        let mut t = FlowTable::with_seed(capacity, FlowTimeouts::default(), SEED);
        let mut next = 0u32;
        while t.occupied() < t.capacity() || next < 2 * t.capacity() as u32 {
            let _ = t.insert(entry(next), NOW);
            next += 1;
        }
        g.bench_function(BenchmarkId::new("full", name), |b| {
            b.iter(|| {
                next += 1;
                let (_, outcome) = t.insert(entry(black_box(next)), NOW);
                assert!(black_box(outcome).is_eviction());
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default().sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = lookups, inserts
}
criterion_main!(benches);
