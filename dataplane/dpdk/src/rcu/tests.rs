//! QSBR tests on plain std threads (no EAL): readers never see a freed
//! value, every value is dropped exactly once and only on the publisher's
//! side, offline readers never hold up a publication, and a stuck reader
//! makes synchronisation time out with its index.

use super::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize};

/// Words in a canary: enough that a freed and reused buffer is noticed.
const WORDS: usize = 32;
/// What a dropped canary's words are overwritten with.
const POISON: u64 = 0xdead_dead_dead_dead;

thread_local! {
    /// Set on reader threads, so a drop there is noticed.
    static ON_READER: Cell<bool> = const { Cell::new(false) };
}

/// Drop bookkeeping shared by the canaries of one test.
#[derive(Default)]
struct Ledger {
    /// Drops per generation.
    drops: Vec<AtomicU8>,
    /// Drops that ran on a reader thread.
    on_reader: AtomicUsize,
}

impl Ledger {
    fn new(generations: usize) -> Arc<Ledger> {
        Arc::new(Ledger { drops: (0..generations).map(|_| AtomicU8::new(0)).collect(), on_reader: AtomicUsize::new(0) })
    }

    fn dropped(&self, generation: u64) -> u8 {
        self.drops[generation as usize].load(Ordering::SeqCst)
    }

    fn total(&self) -> usize {
        self.drops.iter().map(|d| usize::from(d.load(Ordering::SeqCst))).sum()
    }
}

/// A value whose every word holds its generation while it is alive, and
/// [`POISON`] once dropped.
struct Canary {
    generation: u64,
    words: Box<[u64]>,
    ledger: Arc<Ledger>,
}

impl Canary {
    fn new(generation: u64, ledger: &Arc<Ledger>) -> Canary {
        Canary { generation, words: vec![generation; WORDS].into_boxed_slice(), ledger: Arc::clone(ledger) }
    }

    /// Panics unless every word still says this canary's generation.
    fn check(&self) {
        for (i, &w) in self.words.iter().enumerate() {
            assert_eq!(
                w, self.generation,
                "word {i} of generation {} reads {w:#x}: freed under a reader",
                self.generation
            );
        }
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        for w in self.words.iter_mut() {
            // Volatile, so the poisoning is not optimised away as a dead
            // store before the free.
            // SAFETY: `w` is a valid, exclusive reference.
            unsafe { std::ptr::write_volatile(w, POISON) };
        }
        self.ledger.drops[self.generation as usize].fetch_add(1, Ordering::SeqCst);
        if ON_READER.with(Cell::get) {
            self.ledger.on_reader.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[test]
fn readers_never_see_a_freed_value_while_thousands_are_published() {
    const READERS: usize = 3;
    // At least this many publications, and on until every reader has made
    // this many loads (so that a broken grace period has readers to trip).
    const PUBLICATIONS: u64 = 5_000;
    const LOADS: u64 = 100_000;
    const MAX_GENERATIONS: u64 = 1_000_000;
    let ledger = Ledger::new(MAX_GENERATIONS as usize + 1);
    let (publisher, readers) = Publisher::new(Canary::new(0, &ledger), READERS);
    let stop = Arc::new(AtomicBool::new(false));
    // Publishing starts once every reader is online: a reader that is not
    // would not be waited for.
    let ready = Arc::new(std::sync::Barrier::new(READERS + 1));
    let progress: Arc<[AtomicU64]> = (0..READERS).map(|_| AtomicU64::new(0)).collect();
    let threads: Vec<_> = readers
        .into_iter()
        .map(|mut r| {
            let (stop, ready, progress) = (Arc::clone(&stop), Arc::clone(&ready), Arc::clone(&progress));
            std::thread::spawn(move || {
                ON_READER.with(|c| c.set(true));
                r.online();
                ready.wait();
                let (mut loads, mut last, mut seen) = (0u64, 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let v = r.load();
                    v.check();
                    assert!(v.generation >= last, "generation went back from {last} to {}", v.generation);
                    seen += u64::from(v.generation != last);
                    last = v.generation;
                    // Hold the reference a little, then look again.
                    for _ in 0..(loads % 64) {
                        std::hint::spin_loop();
                    }
                    v.check();
                    loads += 1;
                    progress[r.index()].store(loads, Ordering::Relaxed);
                    r.quiescent();
                    // More readers than CPUs: let the others run.
                    if loads % 64 == 0 {
                        std::thread::yield_now();
                    }
                    // Now and then, briefly offline, holding nothing.
                    if loads % 4096 == r.index() as u64 * 1024 {
                        r.offline();
                        std::hint::spin_loop();
                        r.online();
                    }
                }
                (loads, seen)
            })
        })
        .collect();
    ready.wait();

    let mut generation = 0;
    while (generation < PUBLICATIONS || progress.iter().any(|p| p.load(Ordering::Relaxed) < LOADS))
        && generation < MAX_GENERATIONS - 3
        && !threads.iter().any(|t| t.is_finished())
    {
        // Mostly one publication per grace period, sometimes three in a row
        // under one.
        let batch = if generation % 10 == 0 { 3 } else { 1 };
        let mut grace = None;
        for _ in 0..batch {
            generation += 1;
            grace = Some(publisher.publish(Canary::new(generation, &ledger)));
        }
        publisher.synchronize(grace.unwrap(), Duration::from_secs(10)).expect("readers pass quiescent states");
        assert_eq!(publisher.retired(), 0);
        assert_eq!(ledger.dropped(generation - 1), 1, "the previous value is freed by the synchronisation");
    }
    assert_eq!(publisher.current().generation, generation);
    println!("{generation} publications");
    stop.store(true, Ordering::Relaxed);
    for (i, t) in threads.into_iter().enumerate() {
        let (loads, seen) = t.join().expect("reader thread");
        println!("reader {i}: {loads} loads, {seen} generations seen");
        assert!(seen >= 10, "reader {i} saw only {seen} generations in {loads} loads");
    }
    assert_eq!(ledger.total(), generation as usize, "every replaced value dropped, the current one not yet");
    drop(publisher);
    for g in 0..=generation {
        assert_eq!(ledger.dropped(g), 1, "generation {g} dropped {} times", ledger.dropped(g));
    }
    assert_eq!(ledger.on_reader.load(Ordering::SeqCst), 0, "a value was dropped on a reader thread");
}

#[test]
fn an_offline_reader_never_blocks_publication() {
    let ledger = Ledger::new(4);
    let (publisher, mut readers) = Publisher::new(Canary::new(0, &ledger), 3);
    // Reader 0 never goes online; reader 1 goes online, then offline holding
    // nothing; reader 2 is dropped.
    readers[1].online();
    readers[1].load().check();
    readers[1].offline();
    drop(readers.pop());
    for g in 1..=3 {
        let grace = publisher.publish(Canary::new(g, &ledger));
        let t0 = Instant::now();
        publisher.synchronize(grace, Duration::from_millis(100)).expect("no online reader");
        assert!(t0.elapsed() < Duration::from_millis(50));
        assert_eq!(ledger.dropped(g - 1), 1);
    }
    // Back online, it sees the newest value.
    readers[1].online();
    assert_eq!(readers[1].load().generation, 3);
}

#[test]
fn synchronize_times_out_naming_the_reader_that_stopped_passing_quiescent_states() {
    let ledger = Ledger::new(2);
    let (publisher, mut readers) = Publisher::new(Canary::new(0, &ledger), 3);
    readers[0].online();
    readers[1].online();
    // Reader 1 holds generation 0 and stops; reader 0 keeps going.
    let held = readers[1].load().generation;
    let grace = publisher.publish(Canary::new(1, &ledger));
    readers[0].quiescent();
    let err = publisher.synchronize(grace, Duration::from_millis(30)).expect_err("reader 1 is stuck");
    assert_eq!(err.readers, vec![1]);
    assert_eq!(err.epoch, 1);
    assert!(err.waited >= Duration::from_millis(30));
    assert!(err.to_string().starts_with("readers [1] did not pass a quiescent state within"), "{err}");
    assert_eq!(ledger.dropped(0), 0, "the value a stuck reader may hold is kept");
    assert_eq!(publisher.retired(), 1);
    assert_eq!(held, 0);
    readers[1].load().check();

    readers[1].quiescent();
    assert_eq!(readers[1].load().generation, 1);
    publisher.synchronize(grace, Duration::from_millis(30)).expect("reader 1 passed");
    assert_eq!(ledger.dropped(0), 1);
    assert_eq!(publisher.retired(), 0);
}

#[test]
fn synchronize_async_keeps_a_current_thread_runtime_serving() {
    let ledger = Ledger::new(2);
    let (publisher, mut readers) = Publisher::new(Canary::new(0, &ledger), 1);
    let mut reader = readers.pop().unwrap();
    reader.online();
    let grace = publisher.publish(Canary::new(1, &ledger));
    // The reader passes its quiescent state only after 30 ms.
    let late = std::thread::spawn(move || {
        ON_READER.with(|c| c.set(true));
        reader.load().check();
        std::thread::sleep(Duration::from_millis(30));
        reader.quiescent();
        reader
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let ticks = Cell::new(0u32);
    let result = rt.block_on(async {
        let ticker = async {
            loop {
                ticks.set(ticks.get() + 1);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::select! {
            r = publisher.synchronize_async(grace, Duration::from_secs(5)) => r,
            _ = ticker => unreachable!(),
        }
    });
    result.expect("the reader passed a quiescent state");
    assert!(ticks.get() >= 5, "the runtime ran the other task only {} times while waiting", ticks.get());
    assert_eq!(ledger.dropped(0), 1);
    let reader = late.join().unwrap();
    drop(reader);
    assert_eq!(ledger.on_reader.load(Ordering::SeqCst), 0);
}

#[test]
fn synchronize_async_times_out_naming_the_reader() {
    let ledger = Ledger::new(2);
    let (publisher, mut readers) = Publisher::new(Canary::new(0, &ledger), 2);
    readers[1].online();
    let grace = publisher.publish(Canary::new(1, &ledger));
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let err =
        rt.block_on(publisher.synchronize_async(grace, Duration::from_millis(20))).expect_err("reader 1 is stuck");
    assert_eq!(err.readers, vec![1]);
    assert_eq!(ledger.dropped(0), 0);
}

#[test]
fn the_control_plane_copy_outlives_publications() {
    let ledger = Ledger::new(3);
    let (publisher, _readers) = Publisher::new(Canary::new(0, &ledger), 2);
    let kept = publisher.current();
    let grace = publisher.publish(Canary::new(1, &ledger));
    publisher.synchronize(grace, Duration::from_secs(1)).unwrap();
    assert_eq!(ledger.dropped(0), 0, "the control plane still holds it");
    kept.check();
    drop(kept);
    assert_eq!(ledger.dropped(0), 1);
    assert_eq!(publisher.current().generation, 1);
    assert_eq!(publisher.epoch(), 1);
}

#[test]
fn values_retired_under_a_reader_go_with_the_last_handle() {
    let ledger = Ledger::new(3);
    let (publisher, mut readers) = Publisher::new(Canary::new(0, &ledger), 1);
    let mut reader = readers.pop().unwrap();
    reader.online();
    let _ = publisher.publish(Canary::new(1, &ledger));
    let _ = publisher.publish(Canary::new(2, &ledger));
    assert_eq!(publisher.try_reclaim(), 0, "the reader has not passed a quiescent state");
    drop(publisher);
    assert_eq!(ledger.total(), 0);
    reader.quiescent();
    assert_eq!(reader.load().generation, 2);
    drop(reader);
    assert_eq!((ledger.dropped(0), ledger.dropped(1), ledger.dropped(2)), (1, 1, 1));
}

#[test]
#[should_panic(expected = "offline reader")]
fn load_refuses_to_run_offline() {
    let (_publisher, readers) = Publisher::new(0u64, 1);
    let _ = readers[0].load();
}
