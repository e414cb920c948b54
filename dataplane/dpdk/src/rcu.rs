//! Quiescent-state-based RCU (QSBR): how the control plane replaces the
//! value every worker reads (the [`Snapshot`](vipgate_dataplane::snapshot::Snapshot))
//! while the workers run, with no lock, reference count or locked
//! instruction on the workers' side.
//!
//! Owns: the published value, the values a publication retired until no
//! reader can still hold them, and one epoch slot per reader. Must not:
//! make a reader wait, or drop a value on a reader's thread.
//!
//! # How it works
//!
//! A [`Publisher`] and a fixed set of [`Reader`]s, one per worker, share a
//! pointer to the current value (`Arc::into_raw`), a global epoch and one
//! cache-line-padded slot per reader.
//!
//! - A reader [`load`](Reader::load)s the pointer (one Acquire load) and may
//!   use the reference until its next [`quiescent`](Reader::quiescent), at
//!   which it copies the global epoch into its own slot (one load, one
//!   store). `load` borrows the reader and `quiescent` takes it mutably, so
//!   the borrow checker ends every reference before the quiescent state that
//!   declares it gone. A reader that stops or sleeps goes
//!   [`offline`](Reader::offline) (its slot reads [`OFFLINE`]) and then holds
//!   nothing; publications never wait for it. Dropping a reader takes it
//!   offline. A new reader starts offline.
//! - The publisher [`publish`](Publisher::publish)es a new value: it swaps
//!   the pointer, bumps the epoch to `E`, and parks the old value, tagged
//!   `E`, in its list of retired values. A reader whose slot reads `E` or
//!   more has passed a quiescent state since the swap and no longer holds the
//!   old value. [`synchronize`](Publisher::synchronize) (blocking) or
//!   [`synchronize_async`](Publisher::synchronize_async) (for a tokio
//!   current-thread runtime) waits until every slot is `OFFLINE` or at least
//!   `E`, then drops every retired value tagged `E` or less, on the calling
//!   thread. A reader that neither passes a quiescent state nor goes offline
//!   makes the wait time out with [`Stalled`], which names it; the retired
//!   values are kept (never freed under a reader) until a later
//!   synchronisation finds the reader past them.
//!
//! Retired values that no synchronisation freed are dropped with the last
//! handle (publisher or reader). The owner keeps the publisher alive until
//! every reader's thread has finished, so that this is the publisher's
//! thread.
//!
//! # Memory ordering
//!
//! Publisher, for a new value: (P1) `current.swap(new, AcqRel)`; (P2)
//! `E = epoch.fetch_add(1, AcqRel) + 1`; then (P3), per scan, an Acquire
//! load of the epoch, a SeqCst fence and an Acquire load of every slot; (P4)
//! drop the old value once every slot is `OFFLINE` or `>= E`. A scan frees
//! only values tagged with at most the epoch it read first, whose swaps
//! therefore happen before its fence (a publication from another thread
//! during the scan is not covered by it).
//!
//! Reader: `load` is an Acquire load of `current`, which synchronises with
//! the Release half of the swap that stored the pointer, so the value's
//! construction happens before every read through the reference.
//! `quiescent` is (R1) `e = epoch.load(Acquire)`, (R2)
//! `slot.store(e, Release)`.
//!
//! Why a reader whose slot the publisher reads as `s >= E` cannot hold the
//! old pointer: `s` was stored by some R2 of that reader (only it writes its
//! slot), which stored what its R1 read. The epoch only grows and only by
//! RMWs, so an R1 that read `e >= E` read P2 or a later fetch_add in P2's
//! release sequence, and synchronises with P2; P1 is sequenced before P2, so
//! P1 happens before R1, and every `load` after that quiescent state
//! (sequenced after R1) reads the new pointer or a later one (read-read and
//! write-read coherence). Every use of a reference taken before R2 is
//! sequenced before R2 (the borrow ends at `quiescent(&mut self)`), and P3's
//! Acquire load of `s` synchronises with the Release store R2 (or with a
//! later Release store of the same reader, sequenced after it), so all those
//! uses happen before P4 frees the value. A slot read as `s < E` makes the
//! publisher wait, whatever the reader does.
//!
//! `OFFLINE` is the one value that is not monotonic: [`Reader::offline`]
//! stores it with Release after the reader's last use of a reference (same
//! argument as R2), but a reader coming back [`online`](Reader::online)
//! stores its epoch and then loads the pointer, while the publisher swapped
//! the pointer and then loads the slot: a store-then-load on both sides,
//! which acquire/release alone lets both sides miss. `online` therefore
//! puts a SeqCst fence between its slot store and its next `load`, and
//! every publisher scan starts with a SeqCst fence. Of the two fences, the
//! one first in the single total order of SeqCst operations makes its side's
//! store visible to the other side's load: either the publisher sees the
//! reader's epoch (and waits if it is below `E`), or the reader's `load`
//! sees the new pointer and never touches the old one.
//!
//! The epoch is a `u64` bumped once per publication and never reaches
//! `OFFLINE` (`u64::MAX`).

use crossbeam::utils::CachePadded;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A reader slot's value while its reader holds nothing.
pub const OFFLINE: u64 = u64::MAX;

/// Polls of the slots, after the first, that a waiting publisher spins (or,
/// asynchronously, yields to the runtime) before it sleeps between polls.
const SPINS_BEFORE_SLEEP: u32 = 64;

/// How long [`Publisher::synchronize_async`] sleeps on its own thread
/// between polls (short sleeps, which block the runtime's thread) before it
/// sleeps on tokio's timer (a millisecond at least).
const SHORT_SLEEPS_FOR: Duration = Duration::from_millis(2);

/// Sleep between two polls of the slots, once spinning is over. Workers pass
/// a quiescent state every few microseconds; tokio's timer rounds this up to
/// its 1 ms resolution.
const POLL_SLEEP: Duration = Duration::from_micros(20);

/// What the publisher and the readers share.
struct Shared<T> {
    /// The current value: `Arc::into_raw` of a value this cell holds one
    /// strong count of.
    current: AtomicPtr<T>,
    /// Bumped by every publication.
    epoch: AtomicU64,
    /// Per reader: the epoch of its last quiescent state, or [`OFFLINE`].
    /// Written only by its reader.
    slots: Box<[CachePadded<AtomicU64>]>,
    /// Values replaced by a publication and not freed yet, each tagged with
    /// the epoch its publication moved to. Publisher side only: the lock
    /// also serialises publications.
    retired: Mutex<Vec<(u64, Arc<T>)>>,
    /// `Shared<T>` owns `Arc<T>`s: it is `Send` and `Sync` only when they
    /// are, that is when `T` is `Send + Sync`.
    _owns: PhantomData<Arc<T>>,
}

impl<T> Shared<T> {
    /// The lowest epoch any online reader may still be in. Every value
    /// retired at this epoch or before is free of readers.
    ///
    /// Capped by the epoch read before the scan: a publication that lands
    /// during the scan swapped its pointer after the fence, so the scan
    /// says nothing about the value it retired.
    fn observed(&self) -> u64 {
        let now = self.epoch.load(Ordering::Acquire);
        // Pairs with the fence in `Reader::online`: see the module doc.
        fence(Ordering::SeqCst);
        self.slots.iter().map(|s| s.load(Ordering::Acquire)).fold(now, u64::min)
    }

    /// The readers that are online and have not reached `epoch`.
    fn behind(&self, epoch: u64) -> Vec<usize> {
        fence(Ordering::SeqCst);
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                let v = s.load(Ordering::Acquire);
                v != OFFLINE && v < epoch
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// The retired values, locked (which also excludes publications).
    fn retired(&self) -> MutexGuard<'_, Vec<(u64, Arc<T>)>> {
        // A panic while the lock was held cannot leave the list half
        // changed: every change is a single push or a replacement of the
        // whole list.
        self.retired.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops, on this thread, every retired value tagged `upto` or less.
    /// Returns how many it dropped.
    fn reclaim(&self, upto: u64) -> usize {
        let free: Vec<(u64, Arc<T>)> = {
            let mut retired = self.retired();
            let (free, keep) = std::mem::take(&mut *retired).into_iter().partition(|(e, _)| *e <= upto);
            *retired = keep;
            free
        };
        // Dropped outside the lock: freeing a large value takes a while.
        free.len()
    }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        // SAFETY: `current` always holds a pointer from `Arc::into_raw`
        // whose strong count this cell owns; no reader is left (this is the
        // last handle), so nothing can use it any more.
        drop(unsafe { Arc::from_raw(*self.current.get_mut()) });
    }
}

/// The control plane's side: publishes new values and frees the old ones
/// once no reader can hold them. Publications are serialised; use it from
/// the control plane's thread.
pub struct Publisher<T> {
    shared: Arc<Shared<T>>,
}

/// A worker's side: reads the current value between two quiescent states.
/// One per reader thread; not `Clone`.
pub struct Reader<T> {
    shared: Arc<Shared<T>>,
    index: usize,
    /// Mirrors whether the slot holds an epoch rather than [`OFFLINE`], so
    /// that `load` can refuse to run offline without reading the slot.
    online: bool,
}

/// The epoch a publication moved to: once every reader is offline or has
/// reached it, the values that publication (and earlier ones) replaced are
/// free. Hand it to [`Publisher::synchronize`] or
/// [`Publisher::synchronize_async`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "the replaced value is freed only by a synchronisation"]
pub struct Grace {
    epoch: u64,
}

impl Grace {
    /// The epoch every online reader must reach.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// A synchronisation timed out: some readers are online and have not passed
/// a quiescent state since the publication. The replaced values are kept
/// until a later synchronisation finds those readers past them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("readers {readers:?} did not pass a quiescent state within {waited:?} (waiting for epoch {epoch})")]
pub struct Stalled {
    /// Indices of the readers still behind, in the order they were created.
    pub readers: Vec<usize>,
    /// The epoch they had to reach.
    pub epoch: u64,
    /// How long the publisher waited.
    pub waited: Duration,
}

impl<T> Publisher<T> {
    /// A cell holding `initial`, with `readers` readers (all offline until
    /// they call [`Reader::online`]), returned in slot order.
    pub fn new(initial: impl Into<Arc<T>>, readers: usize) -> (Publisher<T>, Vec<Reader<T>>) {
        let shared = Arc::new(Shared {
            current: AtomicPtr::new(Arc::into_raw(initial.into()).cast_mut()),
            epoch: AtomicU64::new(0),
            slots: (0..readers).map(|_| CachePadded::new(AtomicU64::new(OFFLINE))).collect(),
            retired: Mutex::new(Vec::new()),
            _owns: PhantomData,
        });
        let readers = (0..readers).map(|index| Reader { shared: Arc::clone(&shared), index, online: false }).collect();
        (Publisher { shared }, readers)
    }

    /// The current value, for the control plane. The `Arc` keeps it alive
    /// past later publications; drop it on the control plane's side.
    pub fn current(&self) -> Arc<T> {
        // Publications swap `current` under this lock, and only a swapped
        // out value's count is ever given up.
        let _publications = self.shared.retired();
        let p = self.shared.current.load(Ordering::Acquire);
        // SAFETY: `p` came from `Arc::into_raw`, and the cell's strong count
        // on it cannot be released while the lock is held (see above), so
        // the allocation is alive while the count is incremented.
        unsafe {
            Arc::increment_strong_count(p);
            Arc::from_raw(p)
        }
    }

    /// The current epoch: how many publications there have been.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    /// Number of readers (slots).
    pub fn readers(&self) -> usize {
        self.shared.slots.len()
    }

    /// Values replaced by a publication that no synchronisation has freed
    /// yet.
    pub fn retired(&self) -> usize {
        self.shared.retired().len()
    }

    /// Makes `value` the current value. Readers see it from their next
    /// `load` after their next quiescent state at the latest; the value it
    /// replaces is kept until a synchronisation with the returned [`Grace`]
    /// (or a later one) frees it. Never waits for a reader.
    pub fn publish(&self, value: impl Into<Arc<T>>) -> Grace {
        let new = Arc::into_raw(value.into()).cast_mut();
        let mut retired = self.shared.retired();
        // (P1) then (P2) of the module doc.
        let old = self.shared.current.swap(new, Ordering::AcqRel);
        let epoch = self.shared.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        // SAFETY: `old` came from `Arc::into_raw` and the cell owned its
        // strong count, which the swap just took out of `current`.
        retired.push((epoch, unsafe { Arc::from_raw(old) }));
        Grace { epoch }
    }

    /// Frees, without waiting, every retired value no online reader can
    /// hold. Returns how many it freed.
    pub fn try_reclaim(&self) -> usize {
        self.shared.reclaim(self.shared.observed())
    }

    /// Waits until every reader is offline or has passed a quiescent state
    /// since the publication that returned `grace`, then frees (on this
    /// thread) the values it and earlier publications replaced. Spins
    /// briefly, then polls with short sleeps. After `timeout`, returns
    /// [`Stalled`] naming the readers still behind and keeps their values.
    pub fn synchronize(&self, grace: Grace, timeout: Duration) -> Result<(), Stalled> {
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            match self.poll(grace, start, timeout) {
                Some(result) => return result,
                None if polls < SPINS_BEFORE_SLEEP => std::hint::spin_loop(),
                None => std::thread::sleep(POLL_SLEEP),
            }
            polls = polls.saturating_add(1);
        }
    }

    /// [`Publisher::synchronize`] for a tokio runtime, including a
    /// current-thread one. Between two polls of the slots it first yields
    /// to the runtime; then, for at most `SHORT_SLEEPS_FOR`, it sleeps
    /// `POLL_SLEEP` on the thread itself, which gives the CPU to a worker
    /// that shares it and is back as soon as that worker has passed its
    /// quiescent state (a worker does every few microseconds; tokio's timer
    /// would round each sleep up to a millisecond); after that, it sleeps
    /// on tokio's timer, so the runtime's other tasks keep running while a
    /// worker is slow. Cancelling it (dropping the future) frees nothing; a
    /// later synchronisation does.
    pub async fn synchronize_async(&self, grace: Grace, timeout: Duration) -> Result<(), Stalled> {
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            match self.poll(grace, start, timeout) {
                Some(result) => return result,
                None if polls < SPINS_BEFORE_SLEEP => tokio::task::yield_now().await,
                None if start.elapsed() < SHORT_SLEEPS_FOR => {
                    std::thread::sleep(POLL_SLEEP);
                    tokio::task::yield_now().await;
                }
                None => tokio::time::sleep(POLL_SLEEP).await,
            }
            polls = polls.saturating_add(1);
        }
    }

    /// One poll of a synchronisation: `Some` once it is over, either way.
    fn poll(&self, grace: Grace, start: Instant, timeout: Duration) -> Option<Result<(), Stalled>> {
        let observed = self.shared.observed();
        if observed >= grace.epoch {
            self.shared.reclaim(observed);
            return Some(Ok(()));
        }
        let waited = start.elapsed();
        if waited < timeout {
            return None;
        }
        // Free what is free already; keep what the laggards may hold.
        self.shared.reclaim(observed);
        Some(Err(Stalled { readers: self.shared.behind(grace.epoch), epoch: grace.epoch, waited }))
    }
}

impl<T> Drop for Publisher<T> {
    fn drop(&mut self) {
        // What is still retired after this goes with the last reader.
        self.try_reclaim();
    }
}

impl<T> std::fmt::Debug for Publisher<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("epoch", &self.epoch()).field("readers", &self.readers()).finish()
    }
}

impl<T> Reader<T> {
    /// This reader's slot number, as [`Stalled::readers`] names it.
    pub fn index(&self) -> usize {
        self.index
    }

    /// True between [`Reader::online`] and [`Reader::offline`].
    pub fn is_online(&self) -> bool {
        self.online
    }

    /// The current value. The reference lives until this reader's next
    /// [`quiescent`](Reader::quiescent) or [`offline`](Reader::offline) (or
    /// its drop), which the borrow checker enforces. One Acquire load.
    ///
    /// # Panics
    /// If the reader is offline: the publisher does not wait for offline
    /// readers, so the value could be freed under it.
    #[inline(always)]
    pub fn load(&self) -> &T {
        assert!(self.online, "rcu::Reader::load on an offline reader; call online() first");
        // SAFETY: the reader is online, so its slot holds an epoch that is
        // at most the current one, and the publisher frees a value replaced
        // at epoch E only once this slot reads OFFLINE or >= E, which takes
        // a later `quiescent`, `offline` or drop: all need `&mut self`, so
        // they cannot happen while the returned borrow of `self` lives. The
        // pointer came from `Arc::into_raw` of a live `Arc<T>`.
        unsafe { &*self.shared.current.load(Ordering::Acquire) }
    }

    /// Declares that this reader holds no reference from an earlier
    /// [`load`](Reader::load): one load of the global epoch and one store to
    /// its own slot. Does nothing while offline.
    #[inline(always)]
    pub fn quiescent(&mut self) {
        if self.online {
            // (R1) then (R2) of the module doc.
            let epoch = self.shared.epoch.load(Ordering::Acquire);
            self.shared.slots[self.index].store(epoch, Ordering::Release);
        }
    }

    /// Stops this reader: publications no longer wait for it, and
    /// [`load`](Reader::load) panics until [`Reader::online`]. For a worker
    /// about to sleep or stop.
    pub fn offline(&mut self) {
        self.shared.slots[self.index].store(OFFLINE, Ordering::Release);
        self.online = false;
    }

    /// Starts (or restarts) this reader: from here, publications wait for
    /// its quiescent states. Costs a full fence; call it when starting or
    /// waking up, not per packet.
    pub fn online(&mut self) {
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        self.shared.slots[self.index].store(epoch, Ordering::Relaxed);
        // Pairs with the fence in `Shared::observed`: see the module doc.
        fence(Ordering::SeqCst);
        self.online = true;
    }
}

impl<T> Drop for Reader<T> {
    fn drop(&mut self) {
        self.offline();
    }
}

impl<T> std::fmt::Debug for Reader<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").field("index", &self.index).field("online", &self.online).finish()
    }
}

#[cfg(test)]
mod tests;
