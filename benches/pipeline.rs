//! Criterion timings of the packet core: per-packet cost of a 32-packet
//! burst through `Pipeline::process` (forward DNAT, reverse translation, and
//! a drop), the stable flow hash, and Maglev table builds. Frames are
//! restored before every burst outside the timed section.
// criterion_group! defines `pub fn benches` without documentation, and an
// attribute on the macro call does not reach its expansion.
#![allow(missing_docs)]

mod common;

use common::*;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use vipgate_dataplane::counters::DropReason;
use vipgate_dataplane::hash::{FlowKey, flow_hash};
use vipgate_dataplane::maglev::{MaglevBackend, MaglevTable};
use vipgate_dataplane::pipeline::Verdict;

fn bursts(c: &mut Criterion) {
    let snap = snapshot();
    let mut g = c.benchmark_group("pipeline_burst32");
    g.throughput(Throughput::Elements(BURST as u64));
    for (name, frames, ingress) in [
        ("forward_dnat", forward_burst(0), 0u16),
        ("reverse_nat", reverse_burst(), 1),
        ("drop_no_service", no_service_burst(), 0),
    ] {
        let mut pipe = pipeline(&snap);
        let mut verdicts = [Verdict::Consumed; BURST];
        // What is timed must be what the name says: forwarded, or dropped
        // for no service (not, say, for a frame addressed to another MAC).
        run_burst(&mut pipe, &snap, 1, &mut frames.clone(), &mut verdicts, ingress);
        let want = if name == "drop_no_service" {
            Verdict::Drop(DropReason::NoService)
        } else {
            Verdict::Transmit(1 - ingress)
        };
        assert!(verdicts.iter().all(|v| *v == want), "{name}: {verdicts:?}");
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || frames.clone(),
                |f| run_burst(&mut pipe, &snap, 1, black_box(f), &mut verdicts, ingress),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// Connection tracking at scale: per-packet time for packets of established
/// flows and of new flows, with 1, 10k and 1M flows in the table. Frames are
/// prepared outside the timed section.
fn flows_at_scale(c: &mut Criterion) {
    let snap = snapshot();
    let template = flow_template();
    let mut g = c.benchmark_group("pipeline_flows");
    g.throughput(Throughput::Elements(BURST as u64));
    g.sample_size(20);
    for flows in [1u32, 10_000, 1_000_000] {
        for new in [false, true] {
            let mut pipe = pipeline(&snap);
            warm(&mut pipe, &snap, &template, flows);
            let mut verdicts = [Verdict::Consumed; BURST];
            let mut next = 0u32;
            let name = format!("{}/{flows}", if new { "new" } else { "established" });
            g.bench_function(name, |b| {
                b.iter_batched_ref(
                    || {
                        let frames: Vec<Vec<u8>> = (0..BURST as u32)
                            .map(|j| {
                                let n = next + j;
                                let id = if new { flows + n } else { n % flows };
                                let mut f = vec![0u8; template.len()];
                                prepare_frame(&template, &mut f, id);
                                f
                            })
                            .collect();
                        next += BURST as u32;
                        frames
                    },
                    |f| run_burst(&mut pipe, &snap, 1, black_box(f), &mut verdicts, 0),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let key = FlowKey { src_addr: 0xc612_0002, dst_addr: 0xc612_6401, src_port: 40000, dst_port: 80, protocol: 6 };
    c.bench_function("flow_hash", |b| b.iter(|| flow_hash(black_box(&key))));
}

fn maglev_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_build_65537");
    g.sample_size(20);
    for n in [10usize, 100, 1000] {
        let keys: Vec<String> = (0..n).map(|i| format!("198.18.{}.{}:8080", 1 + i / 250, 1 + i % 250)).collect();
        let backends: Vec<MaglevBackend<'_>> =
            keys.iter().map(|k| MaglevBackend { key: k.as_bytes(), weight: 1 }).collect();
        g.bench_with_input(BenchmarkId::from_parameter(n), &backends, |b, be| {
            b.iter(|| MaglevTable::build(black_box(be), 65537).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bursts, flows_at_scale, hashing, maglev_build);
criterion_main!(benches);
