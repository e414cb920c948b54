//! Which snapshot each worker forwards with, for the control plane to read.
//!
//! Owns: one small record per worker, written by that worker only and read
//! by the control plane (the API's `GetCounters`): the desired-state version
//! and generation of the snapshot the worker last loaded, and whether it
//! sleeps idle, holding none. Must not: make the worker wait, or cost it
//! more than a compare per loop iteration while the snapshot is unchanged.
//!
//! The worker stores a new record only when the snapshot it loads differs
//! from the last one (one compare per iteration, two plain stores per
//! publication, no read-modify-write), so the cache line is not bounced
//! between the worker and a polling control plane while nothing changes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What one worker last loaded. Written by its worker only.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct LoadedSnapshot {
    version: AtomicU64,
    generation: AtomicU64,
    loaded_at_ns: AtomicU64,
    idle: AtomicBool,
}

/// A reading of [`LoadedSnapshot`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadedSnapshotState {
    /// The desired-state version the snapshot was compiled from
    /// ([`Snapshot::version`](crate::snapshot::Snapshot::version)); 0
    /// before the worker loaded any.
    pub version: u64,
    /// The snapshot's [`generation`](crate::snapshot::Snapshot::generation);
    /// 0 before the worker loaded any.
    pub generation: u64,
    /// When the worker loaded it: the host's monotonic clock
    /// (`CLOCK_MONOTONIC`) in nanoseconds, so another process on the host
    /// can tell how long after an event of its own the snapshot was in use;
    /// 0 before the worker loaded any.
    pub loaded_at_ns: u64,
    /// True while the worker sleeps after many empty polls (or has stopped):
    /// it holds no snapshot then, and loads the current one when it wakes,
    /// so a publication is visible to it whatever `version` says.
    pub idle: bool,
}

impl LoadedSnapshot {
    /// Records that the worker loaded the snapshot `generation`, compiled
    /// from `version`, at `loaded_at_ns` (`CLOCK_MONOTONIC`). Call only when
    /// the generation differs from the last one recorded.
    #[inline]
    pub fn record(&self, version: u64, generation: u64, loaded_at_ns: u64) {
        // The version and time first: a reader that sees the new generation
        // (Acquire) sees them or later ones.
        self.version.store(version, Ordering::Relaxed);
        self.loaded_at_ns.store(loaded_at_ns, Ordering::Relaxed);
        self.generation.store(generation, Ordering::Release);
    }

    /// Records that the worker goes to sleep (`true`) or is awake again.
    #[inline]
    pub fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::Release);
    }

    /// The record as it stands.
    pub fn read(&self) -> LoadedSnapshotState {
        let generation = self.generation.load(Ordering::Acquire);
        LoadedSnapshotState {
            version: self.version.load(Ordering::Relaxed),
            generation,
            loaded_at_ns: self.loaded_at_ns.load(Ordering::Relaxed),
            idle: self.idle.load(Ordering::Acquire),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_what_the_worker_wrote_last() {
        let l = LoadedSnapshot::default();
        assert_eq!(l.read(), LoadedSnapshotState::default());
        l.record(7, 3, 100);
        l.set_idle(true);
        assert_eq!(l.read(), LoadedSnapshotState { version: 7, generation: 3, loaded_at_ns: 100, idle: true });
        l.set_idle(false);
        l.record(8, 5, 200);
        assert_eq!(l.read(), LoadedSnapshotState { version: 8, generation: 5, loaded_at_ns: 200, idle: false });
    }

    #[test]
    fn a_record_has_a_cache_line_of_its_own() {
        assert_eq!(std::mem::align_of::<LoadedSnapshot>(), 64);
    }
}
