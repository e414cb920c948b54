//! The IPv4 neighbour (ARP) table of one worker.
//!
//! Owns: which MAC answers for which on-link IPv4 address, entry states and
//! the rate limit on solicitations. Capacity is fixed at construction and the
//! table never allocates afterwards. It neither sends nor parses packets: the
//! pipeline asks it and acts on the answer.
//!
//! States, derived from timestamps rather than stored, so nothing has to run
//! on a timer:
//! - Incomplete: a packet needed the address, a request went out, no answer
//!   yet. Packets to it cannot be forwarded.
//! - Reachable: confirmed less than `reachable_ns` ago.
//! - Stale: confirmed longer ago. Its MAC keeps being used (as Linux does: a
//!   neighbour that went quiet is most likely still there), and the caller is
//!   asked to confirm it once per retransmit interval while traffic flows.
//!
//! Solicitations are rate limited per address: however many packets head for
//! an unresolved or stale next hop, the caller is asked for at most one ARP
//! request per `retransmit_ns`, so a flood never becomes an ARP storm. The
//! limit holds for as long as the entry stays in the table; only eviction
//! from a full table can forget it.
//!
//! Addresses are `u32` in host byte order; time is nanoseconds from any
//! monotonic origin, passed in by the caller.

use ahash::RandomState;
use hashbrown::HashMap;

/// Entries confirmed longer ago than this many times `reachable_ns` are
/// dropped by [`NeighbourTable::expire`]: a neighbour that has not answered
/// for that long (5 minutes with the default timers) is gone.
pub const STALE_LIFETIME_FACTOR: u64 = 10;

/// How long states last, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeighbourTimers {
    /// How long a confirmed entry stays Reachable before it goes Stale.
    pub reachable_ns: u64,
    /// Least time between two solicitations for one address.
    pub retransmit_ns: u64,
    /// How long an Incomplete entry stays after its last solicitation before
    /// [`NeighbourTable::expire`] drops it.
    pub incomplete_timeout_ns: u64,
}

impl Default for NeighbourTimers {
    /// 30 s reachable, 1 s between requests, 3 s for an unanswered address:
    /// Linux's defaults (`base_reachable_time`, `retrans_time`, and three
    /// probes one second apart).
    fn default() -> Self {
        const SECOND: u64 = 1_000_000_000;
        NeighbourTimers { reachable_ns: 30 * SECOND, retransmit_ns: SECOND, incomplete_timeout_ns: 3 * SECOND }
    }
}

/// What [`NeighbourTable::lookup`] tells the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[must_use]
pub struct NeighbourLookup {
    /// The MAC to send to, or `None` when the address is not resolved yet (the
    /// packet cannot be forwarded).
    pub mac: Option<[u8; 6]>,
    /// Whether the caller should send an ARP request for the address now:
    /// broadcast when `mac` is `None`; when the entry is stale, it may be
    /// unicast to `mac` instead.
    pub solicit: bool,
}

/// State of an entry at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeighbourState {
    /// Solicited, no answer yet.
    Incomplete,
    /// Confirmed less than `reachable_ns` ago.
    Reachable,
    /// Confirmed longer ago; still used, being confirmed again.
    Stale,
}

/// One entry, as listed by [`NeighbourTable::iter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeighbourEntry {
    /// The IPv4 address, host byte order.
    pub addr: u32,
    /// Its MAC, or `None` while Incomplete.
    pub mac: Option<[u8; 6]>,
    /// When the MAC was last confirmed (for an Incomplete entry: when it was
    /// created).
    pub confirmed_ns: u64,
    /// When the caller was last asked to solicit it, if ever.
    pub solicited_ns: Option<u64>,
}

impl NeighbourEntry {
    /// The entry's state at `now` under `timers`.
    pub fn state(&self, now: u64, timers: &NeighbourTimers) -> NeighbourState {
        match self.mac {
            None => NeighbourState::Incomplete,
            Some(_) if now.saturating_sub(self.confirmed_ns) < timers.reachable_ns => NeighbourState::Reachable,
            Some(_) => NeighbourState::Stale,
        }
    }

    /// Whether a solicitation may go out at `now` without breaking the rate
    /// limit.
    fn may_solicit(&self, now: u64, retransmit_ns: u64) -> bool {
        self.solicited_ns.is_none_or(|at| now.saturating_sub(at) >= retransmit_ns)
    }

    /// Eviction order from a full table: Incomplete first, then Stale, then
    /// Reachable; the least recently confirmed first within a state; the
    /// address breaks ties, so the choice does not depend on the hash map's
    /// (randomly seeded) iteration order.
    fn eviction_rank(&self, now: u64, timers: &NeighbourTimers) -> (u8, u64, u32) {
        let state = match self.state(now, timers) {
            NeighbourState::Incomplete => 0,
            NeighbourState::Stale => 1,
            NeighbourState::Reachable => 2,
        };
        (state, self.confirmed_ns, self.addr)
    }
}

/// IPv4 neighbours of one worker, with a fixed capacity.
#[derive(Debug)]
pub struct NeighbourTable {
    /// The entries, keyed by address; `addr` inside repeats the key so that
    /// entries can be listed and ranked without copying keys around.
    entries: HashMap<u32, NeighbourEntry, RandomState>,
    /// Most entries held at once.
    capacity: usize,
    timers: NeighbourTimers,
}

impl NeighbourTable {
    /// A table that holds at most `capacity` entries (at least 1: a capacity
    /// of 0 is raised to 1, since a table that forgets every address at once
    /// could not rate-limit solicitations).
    ///
    /// All memory is allocated here. The map is reserved for twice the
    /// capacity: removals leave tombstones in a hashbrown table, and when they
    /// use up its spare room an insert rehashes, in place if the entries
    /// fill at most half of the map, otherwise by growing (allocating).
    /// Keeping the entries at or below half guarantees the in-place path.
    ///
    /// The hasher is ahash with random keys: addresses are learnt from ARP
    /// packets that anyone on the link can send, and unpredictable hashing
    /// keeps them from forcing collisions.
    pub fn new(capacity: usize, timers: NeighbourTimers) -> Self {
        let capacity = capacity.max(1);
        NeighbourTable {
            entries: HashMap::with_capacity_and_hasher(capacity.saturating_mul(2), RandomState::new()),
            capacity,
            timers,
        }
    }

    /// The MAC for `addr`, and whether to solicit it. Called per packet (or
    /// per burst and next hop).
    ///
    /// - Unknown address: an Incomplete entry is created (evicting one if the
    ///   table is full) and the caller is asked to solicit.
    /// - Incomplete: no MAC; solicit again once per retransmit interval.
    /// - Reachable: the MAC, no solicitation.
    /// - Stale: the MAC all the same; solicit once per retransmit interval
    ///   until [`NeighbourTable::learn`] confirms it.
    #[inline]
    pub fn lookup(&mut self, addr: u32, now: u64) -> NeighbourLookup {
        let timers = self.timers;
        if let Some(entry) = self.entries.get_mut(&addr) {
            let unconfirmed = entry.state(now, &timers) != NeighbourState::Reachable;
            let solicit = unconfirmed && entry.may_solicit(now, timers.retransmit_ns);
            if solicit {
                entry.solicited_ns = Some(now);
            }
            return NeighbourLookup { mac: entry.mac, solicit };
        }
        self.insert(NeighbourEntry { addr, mac: None, confirmed_ns: now, solicited_ns: Some(now) }, now);
        NeighbourLookup { mac: None, solicit: true }
    }

    /// Records that `addr` is at `mac`, as of `now`: the entry becomes (or
    /// stays) Reachable. Called for ARP replies and for ARP requests
    /// addressed to us, whose sender we will answer anyway. A new address
    /// evicts an entry when the table is full.
    pub fn learn(&mut self, addr: u32, mac: [u8; 6], now: u64) {
        if let Some(entry) = self.entries.get_mut(&addr) {
            entry.mac = Some(mac);
            entry.confirmed_ns = now;
            return;
        }
        self.insert(NeighbourEntry { addr, mac: Some(mac), confirmed_ns: now, solicited_ns: None }, now);
    }

    /// Housekeeping, every second or so, never per packet (it visits every
    /// entry): drops Incomplete entries not solicited for
    /// `incomplete_timeout_ns`, that is, those no packet has needed lately,
    /// and entries unconfirmed for [`STALE_LIFETIME_FACTOR`] times
    /// `reachable_ns`.
    ///
    /// An entry solicited less than `retransmit_ns` ago is kept whatever its
    /// age: dropping it would let the next packet to that address solicit
    /// again at once, breaking the rate limit.
    pub fn expire(&mut self, now: u64) {
        let timers = self.timers;
        let stale_ns = timers.reachable_ns.saturating_mul(STALE_LIFETIME_FACTOR);
        self.entries.retain(|_, entry| {
            let age = match entry.mac {
                None => {
                    let since = entry.solicited_ns.unwrap_or(entry.confirmed_ns);
                    now.saturating_sub(since) < timers.incomplete_timeout_ns
                }
                Some(_) => now.saturating_sub(entry.confirmed_ns) < stale_ns,
            };
            age || !entry.may_solicit(now, timers.retransmit_ns)
        });
    }

    /// The MAC known for `addr` (Reachable or Stale), without changing
    /// anything; for the API, not for forwarding.
    pub fn get(&self, addr: u32) -> Option<[u8; 6]> {
        self.entries.get(&addr).and_then(|entry| entry.mac)
    }

    /// The state of `addr` at `now`, if it has an entry.
    pub fn state(&self, addr: u32, now: u64) -> Option<NeighbourState> {
        self.entries.get(&addr).map(|entry| entry.state(now, &self.timers))
    }

    /// Forgets `addr`; returns whether it had an entry.
    pub fn remove(&mut self, addr: u32) -> bool {
        self.entries.remove(&addr).is_some()
    }

    /// Forgets every entry, keeping the memory.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Most entries held at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The timers the table was built with.
    pub fn timers(&self) -> &NeighbourTimers {
        &self.timers
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = NeighbourEntry> + '_ {
        self.entries.values().copied()
    }

    /// Inserts an entry for an address not in the table, evicting one first
    /// if the table is full.
    ///
    /// Choosing the victim scans every entry, O(capacity). That cost is paid
    /// only when a new address arrives at a full table, which a table sized
    /// for the link's next hops should rarely see; keeping an ordered index
    /// instead would cost on every lookup.
    fn insert(&mut self, entry: NeighbourEntry, now: u64) {
        if self.entries.len() >= self.capacity {
            let timers = self.timers;
            let victim = self.entries.values().min_by_key(|e| e.eviction_rank(now, &timers)).map(|e| e.addr);
            if let Some(victim) = victim {
                self.entries.remove(&victim);
            }
        }
        self.entries.insert(entry.addr, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;
    const GW: u32 = 0xC612_0001; // 198.18.0.1
    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

    fn table(capacity: usize) -> NeighbourTable {
        NeighbourTable::new(capacity, NeighbourTimers::default())
    }

    #[test]
    fn miss_solicits_once_per_retransmit_interval() {
        let mut t = table(16);
        let t0 = 5 * S;
        assert_eq!(t.lookup(GW, t0), NeighbourLookup { mac: None, solicit: true });
        assert_eq!(t.state(GW, t0), Some(NeighbourState::Incomplete));
        for dt in [0, 1, MS, 999 * MS] {
            assert_eq!(t.lookup(GW, t0 + dt), NeighbourLookup { mac: None, solicit: false });
        }
        assert!(t.lookup(GW, t0 + S).solicit);
        assert!(!t.lookup(GW, t0 + S + 1).solicit);
        assert!(t.lookup(GW, t0 + 2 * S + 500 * MS).solicit);
        assert_eq!(t.len(), 1);
    }

    /// A flood to an unresolved next hop: one packet per millisecond for ten
    /// seconds asks for exactly ten requests.
    #[test]
    fn flood_gives_one_request_per_second() {
        let mut t = table(16);
        let solicits = (0..10_000u64).filter(|i| t.lookup(GW, i * MS).solicit).count();
        assert_eq!(solicits, 10);
    }

    #[test]
    fn learn_makes_a_hit() {
        let mut t = table(16);
        assert!(t.lookup(GW, 0).solicit);
        t.learn(GW, MAC, 100 * MS);
        assert_eq!(t.lookup(GW, 200 * MS), NeighbourLookup { mac: Some(MAC), solicit: false });
        assert_eq!(t.get(GW), Some(MAC));
        assert_eq!(t.state(GW, 200 * MS), Some(NeighbourState::Reachable));

        // Learning an unknown address (an ARP request to us) also works.
        t.learn(GW + 1, [2, 0, 0, 0, 0, 2], S);
        assert_eq!(t.lookup(GW + 1, S), NeighbourLookup { mac: Some([2, 0, 0, 0, 0, 2]), solicit: false });
    }

    #[test]
    fn stale_keeps_forwarding_and_resolicits_rate_limited() {
        let mut t = table(16);
        t.learn(GW, MAC, 0);
        let timers = NeighbourTimers::default();
        let stale = timers.reachable_ns;
        assert_eq!(t.lookup(GW, stale - 1), NeighbourLookup { mac: Some(MAC), solicit: false });
        assert_eq!(t.state(GW, stale), Some(NeighbourState::Stale));
        assert_eq!(t.lookup(GW, stale), NeighbourLookup { mac: Some(MAC), solicit: true });
        assert_eq!(t.lookup(GW, stale + 10 * MS), NeighbourLookup { mac: Some(MAC), solicit: false });
        assert!(t.lookup(GW, stale + S).solicit);
        // The answer comes: reachable again, no more requests.
        let new_mac = [2, 0, 0, 0, 0, 9];
        t.learn(GW, new_mac, stale + S + MS);
        assert_eq!(t.lookup(GW, stale + 3 * S), NeighbourLookup { mac: Some(new_mac), solicit: false });
    }

    #[test]
    fn get_does_not_change_anything() {
        let mut t = table(16);
        assert_eq!(t.get(GW), None);
        assert!(t.is_empty());
        assert!(t.lookup(GW, 0).solicit);
        assert_eq!(t.get(GW), None, "incomplete entries have no MAC");
        t.learn(GW, MAC, 0);
        let before: Vec<_> = t.iter().collect();
        assert_eq!(t.get(GW), Some(MAC));
        assert_eq!(t.iter().collect::<Vec<_>>(), before);
        assert_eq!(before, [NeighbourEntry { addr: GW, mac: Some(MAC), confirmed_ns: 0, solicited_ns: Some(0) }]);
    }

    #[test]
    fn expire_drops_unanswered_and_long_stale_entries() {
        let mut t = table(16);
        let timers = *t.timers();
        t.learn(GW, MAC, 0);
        assert!(t.lookup(GW + 1, 0).solicit);
        // Still wanted: solicited again at 2 s, so it survives 3 s.
        assert!(t.lookup(GW + 1, 2 * S).solicit);
        t.expire(3 * S);
        assert_eq!(t.state(GW + 1, 3 * S), Some(NeighbourState::Incomplete));
        t.expire(5 * S);
        assert_eq!(t.state(GW + 1, 5 * S), None);
        // A stale entry lives until ten reachable times.
        let end = timers.reachable_ns * STALE_LIFETIME_FACTOR;
        t.expire(end - 1);
        assert_eq!(t.get(GW), Some(MAC));
        t.expire(end);
        assert!(t.is_empty());
    }

    /// Dropping an incomplete entry must not let a new one solicit sooner
    /// than the retransmit interval, even when retransmit_ns exceeds
    /// incomplete_timeout_ns.
    #[test]
    fn expire_keeps_the_rate_limit() {
        let timers = NeighbourTimers { reachable_ns: 30 * S, retransmit_ns: 5 * S, incomplete_timeout_ns: S };
        let mut t = NeighbourTable::new(16, timers);
        assert!(t.lookup(GW, 0).solicit);
        t.expire(4 * S);
        assert!(!t.lookup(GW, 4 * S).solicit);
        t.expire(5 * S);
        assert!(t.is_empty());
        assert!(t.lookup(GW, 5 * S).solicit);
    }

    /// A long-stale entry still in use is dropped only once its last
    /// solicitation is a retransmit interval old.
    #[test]
    fn expire_keeps_recently_solicited_stale_entries() {
        let mut t = table(16);
        t.learn(GW, MAC, 0);
        let end = t.timers().reachable_ns * STALE_LIFETIME_FACTOR;
        assert!(t.lookup(GW, end - S / 2).solicit);
        t.expire(end);
        assert_eq!(t.get(GW), Some(MAC));
        assert!(!t.lookup(GW, end).solicit);
        t.expire(end + S / 2);
        assert!(t.is_empty());
        assert!(t.lookup(GW, end + S / 2).solicit);
    }

    #[test]
    fn eviction_prefers_incomplete_then_stale_then_oldest() {
        let mut t = table(3);
        t.learn(1, MAC, 0);
        t.learn(2, MAC, 20 * S);
        assert!(t.lookup(3, 21 * S).solicit); // incomplete, the newest
        t.learn(4, MAC, 22 * S);
        assert_eq!(t.state(3, 22 * S), None, "the incomplete entry goes first");
        assert_eq!(t.len(), 3);
        // At 31 s entry 1 is stale, 2 and 4 reachable.
        t.learn(5, MAC, 31 * S);
        assert_eq!(t.get(1), None, "then the stale one");
        // All reachable now: the least recently confirmed goes.
        t.learn(6, MAC, 32 * S);
        assert_eq!(t.get(2), None);
        let mut left: Vec<_> = t.iter().map(|e| e.addr).collect();
        left.sort_unstable();
        assert_eq!(left, [4, 5, 6]);
    }

    /// Heavy churn: evictions and expiries leave tombstones in the map, which
    /// eventually force a rehash; it must happen in place. (The map's own
    /// `capacity()` is no witness here: it counts free room left, which
    /// tombstones use up without any allocation, so the bytes allocated are
    /// what is checked.)
    #[test]
    fn capacity_is_never_exceeded_and_memory_never_grows() {
        let mut t = table(64);
        assert!(t.entries.capacity() >= 128);
        let reserved = t.entries.allocation_size();
        let mut now = 0;
        for i in 0..200_000u32 {
            now += 100 * MS / 7;
            let addr = i.wrapping_mul(2_654_435_761) >> 8;
            match i % 3 {
                0 => t.learn(addr, MAC, now),
                1 => {
                    let _ = t.lookup(addr, now);
                }
                _ => {
                    let _ = t.lookup(i % 50, now);
                }
            }
            if i % 1000 == 0 {
                t.expire(now);
            }
            assert!(t.len() <= t.capacity());
            assert_eq!(t.entries.allocation_size(), reserved, "reallocated after {i} operations");
        }
        assert_eq!(t.len(), 64);
    }

    #[test]
    fn zero_capacity_holds_one_entry() {
        let mut t = table(0);
        assert_eq!(t.capacity(), 1);
        t.learn(1, MAC, 0);
        t.learn(2, MAC, 0);
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(2), Some(MAC));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Lookup(u32),
        Learn(u32),
        Expire,
    }

    fn ops() -> impl Strategy<Value = Vec<(Op, u64)>> {
        let op = prop_oneof![
            6 => (0u32..8).prop_map(Op::Lookup),
            2 => (0u32..8).prop_map(Op::Learn),
            1 => Just(Op::Expire),
        ];
        // Mostly packets close together, sometimes long silences that let
        // entries go stale and expire.
        let gap = prop_oneof![4 => 0..3 * S / 2, 1 => 0..400 * S];
        prop::collection::vec((op, gap), 1..300)
    }

    proptest! {
        /// With room for every address, solicitations for one address are
        /// always at least the retransmit interval apart, whatever the
        /// sequence of lookups, learns and expiries.
        #[test]
        fn solicitations_are_rate_limited(ops in ops()) {
            let mut t = table(8);
            let retransmit = t.timers().retransmit_ns;
            let mut last = [None::<u64>; 8];
            let mut now = 0;
            for (op, dt) in ops {
                now += dt;
                match op {
                    Op::Lookup(a) => {
                        if t.lookup(a, now).solicit {
                            if let Some(prev) = last[a as usize] {
                                prop_assert!(now - prev >= retransmit);
                            }
                            last[a as usize] = Some(now);
                        }
                    }
                    Op::Learn(a) => t.learn(a, MAC, now),
                    Op::Expire => t.expire(now),
                }
            }
        }

        /// A small table under the same operations never exceeds its
        /// capacity nor reallocates.
        #[test]
        fn small_tables_stay_within_capacity(ops in ops(), capacity in 1usize..6) {
            let mut t = table(capacity);
            let reserved = t.entries.allocation_size();
            let mut now = 0;
            for (op, dt) in ops {
                now += dt;
                match op {
                    Op::Lookup(a) => {
                        let _ = t.lookup(a, now);
                    }
                    Op::Learn(a) => t.learn(a, MAC, now),
                    Op::Expire => t.expire(now),
                }
                prop_assert!(t.len() <= capacity);
                prop_assert_eq!(t.entries.allocation_size(), reserved);
            }
        }
    }
}
