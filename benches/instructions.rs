//! Instruction counts of the packet core, for callgrind.
//!
//! `instructions <workload> <bursts>` runs that many 32-packet bursts of a
//! workload (`forward`, `reverse`, `drop`) through `Pipeline::process`.
//! `scripts/bench-instructions.sh` runs it under `valgrind --tool=callgrind`
//! at two burst counts and divides the difference in instructions by the
//! difference in packets, so set-up and process start cancel out. Counts are
//! repeatable on a noisy machine, unlike time.

mod common;

use common::*;
use std::hint::black_box;
use vipgate_dataplane::pipeline::Verdict;

fn main() {
    let mut args = std::env::args().skip(1);
    let workload = args.next().unwrap_or_else(|| "forward".into());
    let bursts: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let snap = snapshot();
    let mut pipe = pipeline(&snap);
    let (template, ingress) = match workload.as_str() {
        "forward" => (forward_burst(0), 0),
        "reverse" => (reverse_burst(), 1),
        "drop" => (no_service_burst(), 0),
        other => {
            eprintln!("unknown workload {other:?}: use forward, reverse or drop");
            std::process::exit(2);
        }
    };
    let mut frames = template.clone();
    let mut verdicts = [Verdict::Consumed; BURST];
    let mut transmitted = 0u64;
    for _ in 0..bursts {
        // Restore the frames (a 64-byte copy each, counted in the result and
        // stated in docs/performance.md).
        for (f, t) in frames.iter_mut().zip(&template) {
            f.copy_from_slice(t);
        }
        run_burst(&mut pipe, &snap, 1, black_box(&mut frames), &mut verdicts, ingress);
        transmitted += verdicts.iter().filter(|v| matches!(v, Verdict::Transmit(_))).count() as u64;
    }
    println!("{workload}: {bursts} bursts, {transmitted} transmitted");
}
