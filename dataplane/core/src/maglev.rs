//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! Owns: building a lookup table from a set of weighted backends and looking a
//! flow hash up in it. Must not know about packets or services.
//!
//! Guarantees: the table size is prime; memory during build is O(M + N);
//! the result depends only on the set of (key, weight) pairs, never on the order
//! they are given in, nor on the machine; seeds are fixed constants.
//!
//! Those guarantees are what let several gateways share a VIP with no state
//! sync: given the same backends, every gateway builds the same table, so a
//! flow that the routers move from one gateway to another keeps its backend.
//!
//! The build, step by step:
//! 1. Backends are sorted by key. Backends of weight 0 are left out.
//! 2. Each backend gets `offset = h1(key) mod M` and
//!    `skip = h2(key) mod (M - 1) + 1`, where `h1` and `h2` are
//!    [`stable_hash`] with the fixed seeds `"mgl-offs"` and `"mgl-skip"`. Its
//!    preference list is `(offset + j * skip) mod M` for `j = 0, 1, ...`: a
//!    permutation of all slots, since `M` is prime and `0 < skip < M`.
//! 3. Weights are divided by their greatest common divisor. Backends then take
//!    turns in key order, each taking as many consecutive turns per round as
//!    its weight; a turn claims the first slot in the backend's preference
//!    list that is still free. The build stops when every slot is taken.
//!
//! Preference lists are walked on the fly (one cursor and one skip per
//! backend), never materialised as an N x M matrix.

use crate::hash::stable_hash;
use std::sync::Arc;

/// Default lookup-table size (prime).
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

/// Most backends one table can hold: slots name backends by a `u16` index,
/// and `u16::MAX` marks a free slot while the table is being built.
pub const MAX_BACKENDS: usize = u16::MAX as usize;

/// Seed of `h1`, which gives each backend its offset ("mgl-offs" in ASCII).
/// Part of the contract between gateways: changing it moves every flow.
const OFFSET_SEED: u64 = u64::from_be_bytes(*b"mgl-offs");

/// Seed of `h2`, which gives each backend its skip ("mgl-skip" in ASCII).
const SKIP_SEED: u64 = u64::from_be_bytes(*b"mgl-skip");

/// A slot not yet claimed, during the build only.
const FREE: u16 = u16::MAX;

/// One backend as Maglev sees it.
#[derive(Clone, Copy, Debug)]
pub struct MaglevBackend<'a> {
    /// Stable identity (for example `"198.18.1.11:8080"` as bytes).
    /// Permutations are derived from it, and ties are broken by it.
    pub key: &'a [u8],
    /// Relative weight; 0 means the backend gets no slots.
    pub weight: u32,
}

/// A built Maglev table: each slot names a backend by its index in the slice
/// given to [`MaglevTable::build`].
///
/// A table whose backends all have weight 0 (or that has no backends) has no
/// slots, and every lookup in it returns `None`.
#[derive(Clone, PartialEq, Eq)]
pub struct MaglevTable {
    /// Backend index per slot; empty when no backend has a weight. Shared:
    /// a snapshot compiled from a previous one reuses the tables of the
    /// services whose backends did not change (cloning a table is cheap),
    /// and a lookup reads through it exactly as through a `Box`.
    slots: Arc<[u16]>,
    /// The prime `M` the table was built with, even when `slots` is empty.
    size: u32,
    /// How many backends were given to `build`, weighted or not.
    backends: usize,
}

/// Why a table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MaglevError {
    /// The table size is not a prime number.
    #[error("table size {0} is not prime")]
    SizeNotPrime(u32),
    /// More backends than slot indices can name, or than the table has slots.
    #[error("{backends} backends do not fit a table of size {size}")]
    TooManyBackends {
        /// Backends given.
        backends: usize,
        /// Table size.
        size: u32,
    },
    /// Two backends share a key.
    #[error("two backends share the key {0:?}")]
    DuplicateKey(Vec<u8>),
}

/// One backend's walk along its preference list during the build.
struct Walker {
    /// Index of the backend in the caller's slice.
    backend: u16,
    /// The next slot of its preference list to try.
    cursor: u32,
    /// Distance between consecutive entries of its preference list.
    skip: u32,
    /// Turns it takes per round: its weight divided by the weights' gcd.
    turns: u32,
}

impl Walker {
    /// Claims the first free slot left in this backend's preference list.
    ///
    /// There is always one while the caller has not filled the table: the
    /// list visits every slot once per `size` steps.
    fn claim(&mut self, slots: &mut [u16], size: u32) {
        loop {
            let slot = self.cursor as usize;
            // `cursor + skip` could overflow for sizes above 2^31, so compare
            // before adding. No modulo: at most one subtraction is needed,
            // which keeps debug builds of the full table fast too.
            self.cursor = if self.cursor >= size - self.skip {
                self.cursor - (size - self.skip)
            } else {
                self.cursor + self.skip
            };
            if slots[slot] == FREE {
                slots[slot] = self.backend;
                return;
            }
        }
    }
}

const fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl MaglevTable {
    /// Builds the table for `backends` with `size` slots.
    ///
    /// Slots hold indices into `backends`. The mapping from slot to backend
    /// *key* depends only on the set of (key, weight) pairs, not on their
    /// order in the slice; backends of weight 0 take no slots and do not
    /// influence the others' slots.
    ///
    /// Costs O(M log M) time in the worst case and O(M + N) memory; run it on
    /// the control plane, never on a worker.
    ///
    /// # Errors
    /// [`MaglevError::SizeNotPrime`] unless `size` is prime (so at least 2),
    /// [`MaglevError::TooManyBackends`] when more than [`MAX_BACKENDS`] or
    /// more than `size` backends are given (weighted or not), and
    /// [`MaglevError::DuplicateKey`] when two backends share a key.
    pub fn build(backends: &[MaglevBackend<'_>], size: u32) -> Result<MaglevTable, MaglevError> {
        if !is_prime(size) {
            return Err(MaglevError::SizeNotPrime(size));
        }
        if backends.len() > MAX_BACKENDS || backends.len() > size as usize {
            return Err(MaglevError::TooManyBackends { backends: backends.len(), size });
        }
        // Fits: checked against MAX_BACKENDS above.
        let mut order: Vec<u16> = (0..backends.len() as u16).collect();
        order.sort_unstable_by_key(|&i| backends[usize::from(i)].key);
        if let Some(pair) =
            order.windows(2).find(|pair| backends[usize::from(pair[0])].key == backends[usize::from(pair[1])].key)
        {
            return Err(MaglevError::DuplicateKey(backends[usize::from(pair[0])].key.to_vec()));
        }

        let divisor = backends.iter().fold(0, |g, b| gcd(g, b.weight));
        if divisor == 0 {
            // No backend has a weight: nothing can be served.
            return Ok(MaglevTable { slots: Arc::default(), size, backends: backends.len() });
        }

        let modulus = u64::from(size);
        let mut walkers: Vec<Walker> = order
            .iter()
            .map(|&i| (i, &backends[usize::from(i)]))
            .filter(|(_, b)| b.weight > 0)
            .map(|(i, b)| Walker {
                backend: i,
                // Both below `size`, so they fit a u32.
                cursor: (stable_hash(b.key, OFFSET_SEED) % modulus) as u32,
                skip: (stable_hash(b.key, SKIP_SEED) % (modulus - 1) + 1) as u32,
                turns: b.weight / divisor,
            })
            .collect();

        let mut slots = vec![FREE; size as usize].into_boxed_slice();
        let mut remaining = slots.len();
        'rounds: loop {
            for walker in &mut walkers {
                for _ in 0..walker.turns {
                    walker.claim(&mut slots, size);
                    remaining -= 1;
                    if remaining == 0 {
                        break 'rounds;
                    }
                }
            }
        }
        Ok(MaglevTable { slots: slots.into(), size, backends: backends.len() })
    }

    /// The backend (index into the slice given to [`MaglevTable::build`]) for
    /// a flow hash, or `None` when no backend has a weight.
    ///
    /// Slot `floor(hash * M / 2^32)` answers: a multiply and a shift, cheaper
    /// than `hash % M` (a division of 20 to 40 cycles), and just as even,
    /// since every slot gets 65535 or 65536 of the 2^32 hashes when M is
    /// 65537. It uses the hash's high bits, which [`crate::hash::flow_hash`]
    /// mixes as well as its low ones. The reduction is part of the contract
    /// between gateways, like the table itself.
    #[inline]
    #[must_use]
    pub fn lookup(&self, hash: u32) -> Option<u16> {
        let slot = (u64::from(hash) * self.slots.len() as u64) >> 32;
        // An empty table has no slot 0, which gives the `None`.
        self.slots.get(slot as usize).copied()
    }

    /// The table size `M` it was built with.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The slots, each naming a backend by its index in the slice given to
    /// [`MaglevTable::build`]. Empty when no backend has a weight, otherwise
    /// [`MaglevTable::size`] long.
    pub fn slots(&self) -> &[u16] {
        &self.slots
    }

    /// Whether no backend has a weight, so every lookup returns `None`.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// True if both tables share one slot array: one is a clone of the
    /// other (a snapshot compiler reused it) rather than a separate build.
    pub fn shares_slots(&self, other: &MaglevTable) -> bool {
        Arc::ptr_eq(&self.slots, &other.slots)
    }

    /// How many backends were given to [`MaglevTable::build`], weighted or
    /// not.
    pub fn backend_count(&self) -> usize {
        self.backends
    }

    /// Slots held by each backend, indexed like the slice given to
    /// [`MaglevTable::build`]. Allocates; meant for the API and for tests.
    pub fn slot_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.backends];
        for &slot in self.slots.iter() {
            counts[usize::from(slot)] += 1;
        }
        counts
    }

    /// How many backends hold at least one slot.
    pub fn backend_count_with_slots(&self) -> usize {
        self.slot_counts().iter().filter(|&&c| c > 0).count()
    }
}

impl std::fmt::Debug for MaglevTable {
    // Tens of thousands of slots would drown any assertion message: show the
    // shape instead.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaglevTable")
            .field("size", &self.size)
            .field("backends", &self.backends)
            .field("filled", &!self.slots.is_empty())
            .finish_non_exhaustive()
    }
}

/// Whether `n` is prime (trial division by 6k +- 1; at most about 11,000
/// divisions for any `u32`, so fine for validating configuration).
#[must_use]
pub const fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n < 4 {
        return true;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let mut d = 5u32;
    // d <= 65537 here, so neither d * d (in u64) nor d + 2 overflows.
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("198.18.{}.{}:8080/tcp", i / 250, i % 250 + 1).into_bytes()).collect()
    }

    fn equal(keys: &[Vec<u8>]) -> Vec<MaglevBackend<'_>> {
        keys.iter().map(|k| MaglevBackend { key: k, weight: 1 }).collect()
    }

    /// The table as slot -> key, which is what must not depend on input order.
    fn slot_keys<'a>(table: &MaglevTable, backends: &[MaglevBackend<'a>]) -> Vec<&'a [u8]> {
        table.slots().iter().map(|&i| backends[usize::from(i)].key).collect()
    }

    #[test]
    fn is_prime_matches_trial_division() {
        let primes: Vec<u32> = (0..60).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59]);
        assert!(is_prime(65537));
        assert!(is_prime(655_373));
        assert!(is_prime(4_294_967_291)); // the largest u32 prime
        assert!(!is_prime(65535));
        assert!(!is_prime(65536));
        assert!(!is_prime(4_294_967_295));
        assert!(!is_prime(65521 * 65519)); // product of two large primes
    }

    /// (a) With equal weights, turn-taking gives every backend M/N slots,
    /// give or take one.
    #[test]
    fn thousand_backends_are_balanced() {
        let keys = keys(1000);
        let backends = equal(&keys);
        let table = MaglevTable::build(&backends, DEFAULT_TABLE_SIZE).unwrap();
        let counts = table.slot_counts();
        let mean = f64::from(DEFAULT_TABLE_SIZE) / 1000.0;
        let max = f64::from(*counts.iter().max().unwrap());
        let min = f64::from(*counts.iter().min().unwrap());
        assert!(max <= 1.01 * mean, "max {max} mean {mean}");
        assert!(min >= 0.99 * mean, "min {min} mean {mean}");
        assert_eq!(table.backend_count_with_slots(), 1000);
    }

    /// (b) Removing one backend moves few slots besides its own, whichever
    /// one of the hundred it is (0.50% to 0.64% of them move).
    #[test]
    fn removing_a_backend_moves_few_other_slots() {
        let keys = keys(100);
        let all = equal(&keys);
        let before = MaglevTable::build(&all, DEFAULT_TABLE_SIZE).unwrap();
        let before_keys = slot_keys(&before, &all);
        let mut worst = 0.0f64;
        for (removed, removed_key) in keys.iter().enumerate() {
            let mut rest = all.clone();
            rest.remove(removed);
            let after = MaglevTable::build(&rest, DEFAULT_TABLE_SIZE).unwrap();
            let after_keys = slot_keys(&after, &rest);
            let (mut kept, mut moved) = (0u32, 0u32);
            for (b, a) in before_keys.iter().zip(&after_keys) {
                if *b != removed_key.as_slice() {
                    kept += 1;
                    moved += u32::from(b != a);
                }
            }
            let share = f64::from(moved) / f64::from(kept);
            worst = worst.max(share);
            assert!(share <= 0.01, "removing backend {removed} moved {moved} of {kept} slots");
        }
        println!("worst disruption {:.3}%", worst * 100.0);
    }

    /// (c) Weights 1:2:4 give shares within 1% (relative) of 1/7, 2/7, 4/7.
    #[test]
    fn weights_set_the_shares() {
        let keys = keys(3);
        let backends: Vec<_> = keys.iter().zip([1, 2, 4]).map(|(k, weight)| MaglevBackend { key: k, weight }).collect();
        let table = MaglevTable::build(&backends, DEFAULT_TABLE_SIZE).unwrap();
        for (count, weight) in table.slot_counts().into_iter().zip([1.0, 2.0, 4.0]) {
            let share = f64::from(count) / f64::from(DEFAULT_TABLE_SIZE);
            let want = weight / 7.0;
            assert!((share - want).abs() <= 0.01 * want, "share {share} want {want}");
        }
    }

    /// (d) Two builds are identical, and so is the slot -> key mapping of a
    /// shuffled input.
    #[test]
    fn builds_are_deterministic_and_order_independent() {
        let keys = keys(50);
        let backends: Vec<_> =
            keys.iter().enumerate().map(|(i, k)| MaglevBackend { key: k, weight: 1 + i as u32 % 3 }).collect();
        let first = MaglevTable::build(&backends, DEFAULT_TABLE_SIZE).unwrap();
        let second = MaglevTable::build(&backends, DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(first, second);
        assert_eq!(first.slots(), second.slots());

        let mut shuffled = backends.clone();
        shuffled.reverse();
        shuffled.swap(3, 40);
        shuffled.rotate_left(17);
        let third = MaglevTable::build(&shuffled, DEFAULT_TABLE_SIZE).unwrap();
        assert_ne!(first.slots(), third.slots(), "indices follow the input order");
        assert_eq!(slot_keys(&first, &backends), slot_keys(&third, &shuffled));
    }

    /// The table is part of the contract between gateways (and between
    /// releases): a fixed configuration must keep producing these slots. The
    /// values were also produced by a separate implementation written from
    /// the description at the top of this module.
    #[test]
    fn golden_table() {
        let backends = [
            MaglevBackend { key: b"198.18.1.11:8080/tcp", weight: 1 },
            MaglevBackend { key: b"198.18.1.12:8080/tcp", weight: 1 },
            MaglevBackend { key: b"198.18.1.13:8080/tcp", weight: 2 },
        ];
        let table = MaglevTable::build(&backends, DEFAULT_TABLE_SIZE).unwrap();
        let bytes: Vec<u8> = table.slots().iter().flat_map(|s| s.to_le_bytes()).collect();
        assert_eq!(table.slots()[..16], [2, 2, 2, 0, 0, 1, 1, 2, 0, 1, 0, 2, 0, 2, 0, 1]);
        // A digest of all 65537 slots (little-endian u16s).
        assert_eq!(stable_hash(&bytes, 0), 0xAA27_B661_5668_80EA);
    }

    /// (e) Invalid sizes and backend sets are refused.
    #[test]
    fn errors() {
        let keys = keys(4);
        let backends = equal(&keys);
        for size in [0, 1, 4, 9, 65535, 65536] {
            assert_eq!(MaglevTable::build(&backends, size), Err(MaglevError::SizeNotPrime(size)));
        }
        assert_eq!(MaglevTable::build(&backends, 3), Err(MaglevError::TooManyBackends { backends: 4, size: 3 }));
        let many = vec![MaglevBackend { key: b"x", weight: 1 }; MAX_BACKENDS + 1];
        assert_eq!(
            MaglevTable::build(&many, 655_373),
            Err(MaglevError::TooManyBackends { backends: MAX_BACKENDS + 1, size: 655_373 })
        );
        let mut dup = backends.clone();
        dup.push(MaglevBackend { key: &keys[2], weight: 0 });
        assert_eq!(MaglevTable::build(&dup, 13), Err(MaglevError::DuplicateKey(keys[2].clone())));
    }

    #[test]
    fn no_weight_means_no_backend() {
        for backends in [vec![], vec![MaglevBackend { key: b"a", weight: 0 }]] {
            let table = MaglevTable::build(&backends, 13).unwrap();
            assert!(table.is_empty());
            assert_eq!(table.size(), 13);
            assert!(table.slots().is_empty());
            for hash in [0, 1, u32::MAX / 2, u32::MAX] {
                assert_eq!(table.lookup(hash), None);
            }
        }
    }

    /// Weight-0 backends neither take slots nor disturb the others, and
    /// scaling every weight changes nothing.
    #[test]
    fn zero_weights_and_common_factors_change_nothing() {
        let keys = keys(20);
        let base: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| MaglevBackend { key: k, weight: if i % 4 == 0 { 0 } else { 1 + i as u32 % 3 } })
            .collect();
        let active: Vec<_> = base.iter().copied().filter(|b| b.weight > 0).collect();
        let scaled: Vec<_> = base.iter().map(|b| MaglevBackend { weight: b.weight * 6, ..*b }).collect();
        let t_base = MaglevTable::build(&base, 1021).unwrap();
        let t_active = MaglevTable::build(&active, 1021).unwrap();
        let t_scaled = MaglevTable::build(&scaled, 1021).unwrap();
        assert_eq!(slot_keys(&t_base, &base), slot_keys(&t_active, &active));
        assert_eq!(t_base.slots(), t_scaled.slots());
        for (count, b) in t_base.slot_counts().iter().zip(&base) {
            assert_eq!(*count == 0, b.weight == 0);
        }
    }

    #[test]
    fn lookup_reduces_by_multiply_shift() {
        let keys = keys(7);
        let table = MaglevTable::build(&equal(&keys), DEFAULT_TABLE_SIZE).unwrap();
        let slots = table.slots();
        assert_eq!(table.lookup(0), Some(slots[0]));
        assert_eq!(table.lookup(u32::MAX), Some(slots[slots.len() - 1]));
        // 65535 * 65537 = 2^32 - 1: the last hash of slot 0.
        assert_eq!(table.lookup(65535), Some(slots[0]));
        assert_eq!(table.lookup(65536), Some(slots[1]));
    }

    #[test]
    fn smallest_table() {
        let backends = [MaglevBackend { key: b"a", weight: 1 }, MaglevBackend { key: b"b", weight: 1 }];
        let table = MaglevTable::build(&backends, 2).unwrap();
        assert_eq!(table.slot_counts(), [1, 1]);
    }

    fn small_primes() -> impl Strategy<Value = u32> {
        prop::sample::select(vec![2u32, 3, 5, 13, 251, 1021, 4093])
    }

    proptest! {
        /// (f) Every slot names a weighted backend, shares follow the
        /// weights exactly as turn-taking dictates, and input order does not
        /// matter.
        #[test]
        fn tables_are_full_and_proportional(
            entries in prop::collection::btree_map(
                prop::collection::vec(any::<u8>(), 0..12), 0u32..8, 1..40),
            size in small_primes(),
            rotate in any::<prop::sample::Index>(),
        ) {
            let backends: Vec<_> = entries
                .iter()
                .map(|(k, &weight)| MaglevBackend { key: k, weight })
                .collect();
            let result = MaglevTable::build(&backends, size);
            if backends.len() > size as usize {
                prop_assert_eq!(
                    result,
                    Err(MaglevError::TooManyBackends { backends: backends.len(), size })
                );
                return Ok(());
            }
            let table = result.unwrap();
            prop_assert_eq!(table.size(), size);
            let divisor = backends.iter().fold(0, |g, b| gcd(g, b.weight));
            if divisor == 0 {
                prop_assert!(table.is_empty());
                return Ok(());
            }
            prop_assert_eq!(table.slots().len(), size as usize);
            for &slot in table.slots() {
                prop_assert!(backends[usize::from(slot)].weight > 0);
            }
            // After `rounds` full rounds each backend holds exactly
            // rounds * turns slots; the last, partial round adds at most one
            // more round's worth.
            let total_turns: u64 = backends.iter().map(|b| u64::from(b.weight / divisor)).sum();
            let rounds = u64::from(size) / total_turns;
            for (count, b) in table.slot_counts().iter().zip(&backends) {
                let turns = u64::from(b.weight / divisor);
                let count = u64::from(*count);
                prop_assert!(count >= rounds * turns && count <= (rounds + 1) * turns,
                    "count {} turns {} rounds {}", count, turns, rounds);
            }

            let mut shuffled = backends.clone();
            shuffled.rotate_left(rotate.index(backends.len()));
            shuffled.reverse();
            let other = MaglevTable::build(&shuffled, size).unwrap();
            prop_assert_eq!(slot_keys(&table, &backends), slot_keys(&other, &shuffled));
        }
    }
}
