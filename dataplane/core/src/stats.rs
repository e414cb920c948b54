//! Per-backend traffic statistics.
//!
//! Every backend of every service has a *stats slot*: an index, chosen by the
//! control plane and carried in the snapshot ([`crate::snapshot::Backend`]
//! and [`crate::snapshot::ReverseNat`]), into a fixed-size array of
//! [`SlotCounters`] that each worker owns ([`BackendStats`]). A worker counts
//! into the slot of the backend a packet goes to or comes from; the control
//! plane sums a slot over the workers. Per-service figures are sums over the
//! service's backends.
//!
//! Flows remember their slot (see [`crate::flow::FlowEntry::stats_slot`]),
//! so the two flow gauges (`active`, `inactive`) are exact: a flow is counted
//! under its slot from the moment it enters a worker's table until the moment
//! it leaves it (expiry sweep, eviction, replacement, reset), and moves with
//! it when it is rehashed to another backend or when its backend's slot
//! changes. `active` counts TCP flows in the established state, `inactive`
//! every other flow (handshake, closing, UDP), as IPVS counts them.
//!
//! A slot is the control plane's to reuse only when no flow of any worker
//! refers to it any more: its gauges are 0 everywhere and no published
//! snapshot names it. Counters are never reset (workers are their only
//! writers); the control plane keeps a baseline when it reuses a slot.
//!
//! Updates follow [`crate::counters`]: a relaxed load and a relaxed store by
//! the single writer, exact and cheap.

use crate::counters::Counter;

/// The slot value meaning "not counted": larger than any capacity.
pub const NO_SLOT: u32 = MAX_SLOTS;

/// Largest number of slots: flow entries keep a slot in 24 bits.
pub const MAX_SLOTS: u32 = (1 << 24) - 1;

/// Default number of slots per worker (the most backends, over all services,
/// that can be configured at once): 8 MiB per worker.
pub const DEFAULT_SLOTS: usize = 131_072;

/// The counters of one backend on one worker. One cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct SlotCounters {
    /// New flows sent to the backend (IPVS `conns`).
    pub connections: Counter,
    /// Packets from clients to the backend (IPVS `inpkts`).
    pub in_packets: Counter,
    /// IPv4 bytes (header included, as received) of `in_packets`.
    pub in_bytes: Counter,
    /// Packets from the backend back to clients (IPVS `outpkts`; none in
    /// DSR mode, where replies bypass the gateway).
    pub out_packets: Counter,
    /// IPv4 bytes of `out_packets`.
    pub out_bytes: Counter,
    /// Tracked TCP flows in the established state (a gauge).
    pub active: Counter,
    /// Every other tracked flow: TCP handshake or closing, UDP (a gauge).
    pub inactive: Counter,
}

/// A plain copy of [`SlotCounters`], for summing and subtracting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotTotals {
    /// See [`SlotCounters::connections`].
    pub connections: u64,
    /// See [`SlotCounters::in_packets`].
    pub in_packets: u64,
    /// See [`SlotCounters::in_bytes`].
    pub in_bytes: u64,
    /// See [`SlotCounters::out_packets`].
    pub out_packets: u64,
    /// See [`SlotCounters::out_bytes`].
    pub out_bytes: u64,
    /// See [`SlotCounters::active`].
    pub active: u64,
    /// See [`SlotCounters::inactive`].
    pub inactive: u64,
}

impl SlotTotals {
    /// Adds `other`, field by field.
    pub fn add(&mut self, other: &SlotTotals) {
        self.connections += other.connections;
        self.in_packets += other.in_packets;
        self.in_bytes += other.in_bytes;
        self.out_packets += other.out_packets;
        self.out_bytes += other.out_bytes;
        self.active += other.active;
        self.inactive += other.inactive;
    }

    /// The counters (not the gauges) since `baseline`; the gauges as they
    /// are.
    #[must_use]
    pub fn since(&self, baseline: &SlotTotals) -> SlotTotals {
        SlotTotals {
            connections: self.connections.wrapping_sub(baseline.connections),
            in_packets: self.in_packets.wrapping_sub(baseline.in_packets),
            in_bytes: self.in_bytes.wrapping_sub(baseline.in_bytes),
            out_packets: self.out_packets.wrapping_sub(baseline.out_packets),
            out_bytes: self.out_bytes.wrapping_sub(baseline.out_bytes),
            active: self.active,
            inactive: self.inactive,
        }
    }
}

/// One worker's slots. The worker writes them, anyone reads them.
#[derive(Debug)]
pub struct BackendStats {
    slots: Box<[SlotCounters]>,
}

impl BackendStats {
    /// `capacity` slots, all zero (capped at [`MAX_SLOTS`]).
    #[must_use]
    pub fn new(capacity: usize) -> BackendStats {
        let capacity = capacity.min(MAX_SLOTS as usize);
        BackendStats { slots: (0..capacity).map(|_| SlotCounters::default()).collect() }
    }

    /// Number of slots.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The slot's counters; `None` for [`NO_SLOT`] or any index beyond the
    /// capacity (such a backend is simply not counted).
    #[inline(always)]
    pub fn slot(&self, slot: u32) -> Option<&SlotCounters> {
        self.slots.get(slot as usize)
    }

    /// A copy of the slot's values (zero for a slot beyond the capacity).
    #[must_use]
    pub fn read(&self, slot: u32) -> SlotTotals {
        let Some(s) = self.slot(slot) else { return SlotTotals::default() };
        SlotTotals {
            connections: s.connections.get(),
            in_packets: s.in_packets.get(),
            in_bytes: s.in_bytes.get(),
            out_packets: s.out_packets.get(),
            out_bytes: s.out_bytes.get(),
            active: s.active.get(),
            inactive: s.inactive.get(),
        }
    }

    /// Counts a packet from a client towards the backend of `slot`.
    #[inline(always)]
    pub fn count_in(&self, slot: u32, bytes: usize) {
        if let Some(s) = self.slot(slot) {
            s.in_packets.inc();
            s.in_bytes.add(bytes as u64);
        }
    }

    /// Counts a packet from the backend of `slot` back to a client.
    #[inline(always)]
    pub fn count_out(&self, slot: u32, bytes: usize) {
        if let Some(s) = self.slot(slot) {
            s.out_packets.inc();
            s.out_bytes.add(bytes as u64);
        }
    }

    /// A flow entered the table under `slot`; `new` when it is a new
    /// connection (not a flow moving between slots).
    #[inline(always)]
    pub fn flow_in(&self, slot: u32, established: bool, new: bool) {
        if let Some(s) = self.slot(slot) {
            if new {
                s.connections.inc();
            }
            gauge(s, established).inc();
        }
    }

    /// A flow left `slot` (it left the table, or moved to another slot).
    #[inline(always)]
    pub fn flow_out(&self, slot: u32, established: bool) {
        if let Some(s) = self.slot(slot) {
            let g = gauge(s, established);
            g.set(g.get().wrapping_sub(1));
        }
    }

    /// A flow of `slot` entered or left the established state.
    #[inline(always)]
    pub fn flow_changed(&self, slot: u32, was_established: bool, established: bool) {
        if was_established != established {
            self.flow_out(slot, was_established);
            self.flow_in(slot, established, false);
        }
    }
}

#[inline(always)]
fn gauge(s: &SlotCounters, established: bool) -> &Counter {
    if established { &s.active } else { &s.inactive }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_one_cache_line_and_out_of_range_slots_are_ignored() {
        assert_eq!(core::mem::size_of::<SlotCounters>(), 64);
        let s = BackendStats::new(4);
        s.count_in(3, 100);
        s.count_in(4, 100);
        s.count_in(NO_SLOT, 100);
        s.count_out(3, 60);
        assert_eq!(
            s.read(3),
            SlotTotals { in_packets: 1, in_bytes: 100, out_packets: 1, out_bytes: 60, ..SlotTotals::default() }
        );
        assert_eq!(s.read(4), SlotTotals::default());
    }

    #[test]
    fn gauges_follow_flows_in_out_and_between_states() {
        let s = BackendStats::new(2);
        s.flow_in(1, false, true);
        s.flow_in(1, true, true);
        s.flow_changed(1, false, true);
        assert_eq!((s.read(1).active, s.read(1).inactive, s.read(1).connections), (2, 0, 2));
        s.flow_out(1, true);
        s.flow_changed(1, true, true);
        assert_eq!((s.read(1).active, s.read(1).inactive), (1, 0));
        let base = s.read(1);
        s.count_in(1, 10);
        let since = s.read(1).since(&base);
        assert_eq!((since.in_packets, since.in_bytes, since.active), (1, 10, 1));
    }
}
