//! The connection-tracking table of one worker.
//!
//! Owns: which flows the worker has seen, what each was translated to
//! (backend and a hint of its place in the service, source NAT address and port),
//! its TCP state as far as timeouts need it, and when it expires. It
//! neither parses nor rewrites packets, chooses backends or allocates source
//! ports: the pipeline does, and hands this table keys, TCP flags and `now`.
//! Every entry that leaves the table (removed, replaced, evicted, or found
//! expired) is handed back to the caller exactly once, so resources tied to
//! it (a FullNAT source port) can be released. Like the rest of the packet
//! core it never allocates, locks, logs or reads a clock after
//! construction.
//!
//! # IPv4 and IPv6
//!
//! IPv6 flows have a table of their own, [`FlowTable6`], so that an IPv4
//! entry keeps its 32 bytes instead of growing to hold 128-bit addresses.
//! Both are [`FlowTableOf`], one code for either entry type
//! ([`TableEntry`]): everything below holds for both, only the entry's size
//! differs. (The pipeline does not use the IPv6 table yet: IPv6 packets are
//! punted.)
//!
//! # Memory
//!
//! All memory is allocated, and written, in [`FlowTable::new`]; nothing
//! allocates afterwards. The storage is two boxed slices, which cannot grow:
//! there is no rehash, ever. Per slot: a 32-byte [`FlowEntry`] plus 8 bytes
//! of bucket metadata, [`BYTES_PER_SLOT`] = 40 bytes. The capacity is
//! rounded up to a multiple of 8 slots, nothing more, so
//! [`memory_bytes`]`(1_000_000)` is 40,000,000 bytes (38.1 MiB), and the
//! default [`DEFAULT_CAPACITY`] of 2^20 slots takes 40 MiB and holds a
//! million live flows before the first eviction (fill tests find the first
//! eviction at about 98% of the slots).
//!
//! An IPv6 slot takes an 80-byte [`FlowEntry6`] (four 128-bit addresses:
//! client, VIP, backend, source NAT) plus the same 8 bytes of metadata,
//! [`BYTES_PER_SLOT6`] = 88 bytes: [`memory_bytes6`]`(1_000_000)` is
//! 88,000,000 bytes (83.9 MiB) and 2^20 slots take 88 MiB. An 80-byte entry
//! spans two cache lines wherever it starts, so an IPv6 hit reads one line
//! more than an IPv4 one.
//!
//! # Layout
//!
//! Bucketised cuckoo hashing with two candidate buckets per key:
//!
//! - Buckets of 8 slots. A bucket's metadata is one 64-byte cache line: 8
//!   tags (`u32`, 0 = empty) and 8 expiry times (`u32`, coarse clock). The
//!   entries live in a separate array, slot `bucket * 8 + i`, 32-byte
//!   aligned so that an entry never straddles two cache lines. A lookup
//!   reads one metadata line, scans its 8 tags, and reads an entry only on
//!   a tag match (false matches: one in 2^31 per compared slot); a hit
//!   costs two cache lines (three when the flow sits in its second bucket),
//!   a miss two metadata lines.
//! - The first bucket comes from the low half of a 64-bit keyed hash, the
//!   tag from the high half; the second is `(f(tag) - first) mod buckets`.
//!   That map is its own inverse, so an entry's other bucket is computed
//!   from its bucket and tag alone, without reading the entry (as in
//!   cuckoo filters). Subtraction modulo any bucket count (instead of xor
//!   with a power of two) lets the table take exactly the memory it is
//!   given. For about one key in `buckets` both candidates are the same
//!   bucket; such a key still fits, since room is made by moving others.
//! - Insert puts a new flow in the candidate with more free slots (two
//!   choices balance loads far better than one). When both are full of
//!   live flows it makes room by moving entries to their other bucket, a
//!   breadth-first search at most two moves deep that reads only metadata
//!   (at most 16 + 128 lines). Without moves, 8-slot buckets overflow at
//!   about 73% load; one move deep, about 91%; two, about 98%. A search
//!   that fails means the table is full in that region, so the next
//!   [`DISPLACEMENT_BACKOFF`] inserts that find both buckets full evict at
//!   once: under a flood that fills the table, an insert costs two
//!   metadata lines plus a 128th of a search, not a search.
//!
//! # Time
//!
//! Expiry is stored in a coarse clock, `now >> 20` (units of 1.048576 ms)
//! truncated to `u32`, so that 8 expiry times share a cache line with 8
//! tags. An entry refreshed at `t` with timeout `T` expires at
//! `(t >> 20) + ceil(T / 2^20) + 1`: it is live for more than `T` and less
//! than `T + 2.1 ms`.
//!
//! The coarse clock wraps every 2^32 units (52 days), so comparisons are
//! wrapping: an entry is live while `expiry - now` (mod 2^32) is between 1
//! and `H`, the longest configured timeout in units (a live entry can never
//! be further ahead). Any other difference means it expired, however long
//! ago, until `2^32 - H` units after its expiry (52 days less 15 minutes
//! with the default timeouts), when the difference comes back into range.
//! [`FlowTable::expire_some`] clears expired slots for good; a sweep that
//! covers the whole table at least every 25 days (any housekeeping does:
//! 1024 slots every 100 ms covers 2^20 slots in under two minutes) means
//! nothing ever comes back. Timeouts are capped at 2^31 units (26 days) to
//! keep that margin. `now` must never go backwards.
//!
//! # Eviction
//!
//! When a new flow finds no free slot (empty or expired) in its two buckets
//! and no room can be made, the live candidate closest to expiry is evicted
//! and handed back; [`FlowTable::insert`] always inserts the new flow.
//! Within one state this is the least recently seen flow; across states it
//! prefers half-open and closing flows (short timeouts) over established
//! ones. But an idle established flow can be closer to its expiry than a
//! fresh half-open one, so a flood of spoofed SYNs must not go through
//! that rule: [`FlowTable::insert_half_open_hashed`] evicts only half-open
//! flows ([`FlowState::TcpSynSent`]) and refuses when its candidates hold
//! none. (The pipeline does not track a SYN at all where it can: see
//! `pipeline`.)
//!
//! # Hash
//!
//! Not [`crate::hash::flow_hash`]: that hash is fixed across gateways on
//! purpose (Maglev must agree fleet-wide), so anyone can compute it offline,
//! and clients choose their source ports: a flood of chosen tuples could
//! pile into two buckets and evict a victim's flows. This table is private
//! to a worker, so its hash is keyed with random seeds drawn when the table
//! is built ([`FlowTable::with_seed`] fixes them for tests and benchmarks).
//! It is two rounds of a folded 64x64->128-bit multiply over the key packed
//! in two words, as cheap as `flow_hash`; without the seeds an attacker
//! cannot predict buckets or tags. An IPv6 key is brought to the same two
//! words by first folding each address's two halves together under two
//! more seeds (one more multiply per address), so it keeps the same
//! properties, whichever half of an address an attacker varies.
//!
//! # Handles
//!
//! A [`FlowRef`] is a slot index. It stays valid until the next call that
//! changes which flow is in which slot: [`FlowTable::insert`] and its
//! variants (which may move or evict entries), [`FlowTable::remove`] and
//! [`FlowTable::expire_some`]. Lookups, [`FlowTable::touch`] and
//! [`FlowTable::on_tcp_flags`] keep every handle valid.

use crate::hash::{FlowKey, FlowKey6};
use crate::wire::tcp::flags as tcp_flags;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::mem::size_of;

/// Slots per bucket: 8 tags and 8 expiry times fill one cache line.
pub const SLOTS_PER_BUCKET: usize = 8;

/// Memory per slot in bytes: one [`FlowEntry`] and its share of the bucket
/// metadata.
pub const BYTES_PER_SLOT: usize = size_of::<FlowEntry>() + size_of::<Bucket>() / SLOTS_PER_BUCKET;

/// Capacity for a worker when nothing else is configured: 2^20 slots, which
/// hold a million live flows without eviction, in 40 MiB.
pub const DEFAULT_CAPACITY: usize = 1 << 20;

/// Largest capacity, in slots: slot indices must fit a `u32`.
pub const MAX_CAPACITY: usize = 1 << 31;

/// Inserts that skip the room-making search after one failed: see the
/// module documentation.
pub const DISPLACEMENT_BACKOFF: u32 = 128;

/// `now >> TIME_UNIT_SHIFT` is the coarse clock expiry times are kept in.
const TIME_UNIT_SHIFT: u32 = 20;

/// Longest timeout in coarse units: wrapping comparisons need less than
/// half the clock's range.
const MAX_LIFETIME_UNITS: u32 = 1 << 31;

/// Tag of an empty slot; real tags always have their low bit set.
const EMPTY: u32 = 0;

/// Memory per slot of an IPv6 table ([`FlowTable6`]) in bytes: one
/// 80-byte [`FlowEntry6`] and its share of the bucket metadata, 88 bytes.
pub const BYTES_PER_SLOT6: usize = size_of::<FlowEntry6>() + size_of::<Bucket>() / SLOTS_PER_BUCKET;

const _: () = assert!(size_of::<FlowEntry>() <= 64);
const _: () = assert!(size_of::<FlowEntry>() == 32);
const _: () = assert!(size_of::<Bucket>() == 64);
const _: () = assert!(BYTES_PER_SLOT == 40);
const _: () = assert!(size_of::<FlowEntry6>() == 80);
const _: () = assert!(BYTES_PER_SLOT6 == 88);

/// Memory taken by an IPv4 table ([`FlowTable`]) built with `capacity`, in
/// bytes (the boxed slices; the `FlowTable` struct itself adds about a
/// hundred bytes).
#[must_use]
pub const fn memory_bytes(capacity: usize) -> usize {
    bucket_count(capacity) * SLOTS_PER_BUCKET * BYTES_PER_SLOT
}

/// Memory taken by an IPv6 table ([`FlowTable6`]) built with `capacity`, in
/// bytes, as for [`memory_bytes`].
#[must_use]
pub const fn memory_bytes6(capacity: usize) -> usize {
    bucket_count(capacity) * SLOTS_PER_BUCKET * BYTES_PER_SLOT6
}

/// Buckets for `capacity` slots: rounded up, at least one, at most
/// [`MAX_CAPACITY`] slots in all.
const fn bucket_count(capacity: usize) -> usize {
    let capacity = if capacity > MAX_CAPACITY { MAX_CAPACITY } else { capacity };
    let buckets = capacity.div_ceil(SLOTS_PER_BUCKET);
    if buckets == 0 { 1 } else { buckets }
}

/// Timeouts by state, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowTimeouts {
    /// TCP flow whose handshake has not completed (only SYNs seen).
    pub tcp_syn_ns: u64,
    /// TCP flow past its handshake.
    pub tcp_established_ns: u64,
    /// TCP flow after a FIN from either side.
    pub tcp_closing_ns: u64,
    /// TCP flow after a RST; the shorter of this and `tcp_closing_ns` applies.
    pub tcp_reset_ns: u64,
    /// UDP (and any protocol without connection state).
    pub udp_ns: u64,
}

impl Default for FlowTimeouts {
    /// SYN 30 s, established 900 s, closing 120 s, reset 10 s, UDP 300 s.
    ///
    /// From IPVS's defaults (established 15 min, FIN_WAIT and TIME_WAIT
    /// 2 min, CLOSE 10 s, UDP 5 min), except that a half-open flow gets
    /// 30 s instead of IPVS's 1 min for SYN_RECV: it is the flow a SYN flood
    /// at a FullNAT service creates (nat and dsr do not track SYNs), and the
    /// cheapest to lose (the client retransmits its SYN and goes to the
    /// same backend anyway while the snapshot is unchanged).
    fn default() -> Self {
        const SECOND: u64 = 1_000_000_000;
        FlowTimeouts {
            tcp_syn_ns: 30 * SECOND,
            tcp_established_ns: 900 * SECOND,
            tcp_closing_ns: 120 * SECOND,
            tcp_reset_ns: 10 * SECOND,
            udp_ns: 300 * SECOND,
        }
    }
}

/// A flow's state, as far as its timeout is concerned.
///
/// Tracking is loose, as in IPVS and Katran: the table does not follow
/// sequence numbers and sees only what its caller shows it (with direct
/// server return, only the client's side).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FlowState {
    /// TCP: only SYNs seen so far.
    TcpSynSent,
    /// TCP: a packet without SYN, FIN or RST was seen.
    TcpEstablished,
    /// TCP: a FIN or RST was seen.
    TcpClosing,
    /// UDP, or any protocol without connection state.
    Udp,
}

impl FlowState {
    /// The state of a new flow from its first packet: a TCP SYN starts a
    /// handshake; any other TCP packet joins a connection already under way
    /// (picked up mid-stream, say after another gateway failed), closing if
    /// it carries FIN or RST; everything else is [`FlowState::Udp`].
    #[must_use]
    pub fn of_first_packet(protocol: u8, tcp_flags: u16) -> FlowState {
        if protocol != crate::wire::ipv4::protocol::TCP {
            FlowState::Udp
        } else if tcp_flags & (tcp_flags::RST | tcp_flags::FIN) != 0 {
            FlowState::TcpClosing
        } else if tcp_flags & tcp_flags::SYN != 0 {
            FlowState::TcpSynSent
        } else {
            FlowState::TcpEstablished
        }
    }
}

/// One tracked flow: its key and what the pipeline decided for it. 32 bytes,
/// aligned so that it never straddles two cache lines.
///
/// The key is fixed at construction (a flow's bucket depends on it); the
/// other fields are the pipeline's to read and write through
/// [`FlowTable::get_mut`]. After changing `state` or `flags` by hand, call
/// [`FlowTable::touch`] so the expiry follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(32))]
pub struct FlowEntry {
    src_addr: u32,
    dst_addr: u32,
    /// Address the flow is translated to (the backend, for a forward flow).
    pub backend_addr: u32,
    /// Source address the flow is translated to (FullNAT), or 0.
    pub snat_addr: u32,
    /// Where the backend stood in its service's backend list when this entry
    /// was last checked: a hint, always verified against `backend_addr` and
    /// `backend_port`, so after a configuration change the pipeline finds
    /// the backend with one comparison while it has not moved.
    pub backend_index: u16,
    /// Low 16 bits of the flow's stats slot ([`FlowEntry::stats_slot`]).
    stats_lo: u16,
    src_port: u16,
    dst_port: u16,
    /// Port the flow is translated to (the backend's).
    pub backend_port: u16,
    /// Source port the flow is translated to (FullNAT), or 0.
    pub snat_port: u16,
    protocol: u8,
    /// State, which selects the timeout.
    pub state: FlowState,
    /// `FIN_FROM_CLIENT`, `FIN_FROM_BACKEND` and `RESET`, set by
    /// [`FlowTable::on_tcp_flags`].
    pub flags: u8,
    /// High 8 bits of the flow's stats slot.
    stats_hi: u8,
}

impl FlowEntry {
    /// Flag: the client sent a FIN.
    pub const FIN_FROM_CLIENT: u8 = 1 << 0;
    /// Flag: the backend sent a FIN.
    pub const FIN_FROM_BACKEND: u8 = 1 << 1;
    /// Flag: a RST was seen; the closing timeout is the reset timeout.
    pub const RESET: u8 = 1 << 2;

    /// The key packed in two words for the table's hash: `a = src_addr << 32
    /// | src_port << 16 | protocol`, `b = dst_addr << 32 | dst_port`.
    #[inline(always)]
    fn hash_words(key: &FlowKey, _seeds: &[u64; SEEDS]) -> (u64, u64) {
        let a = (u64::from(key.src_addr) << 32) | (u64::from(key.src_port) << 16) | u64::from(key.protocol);
        let b = (u64::from(key.dst_addr) << 32) | u64::from(key.dst_port);
        (a, b)
    }
}

/// What [`FlowEntry`] and [`FlowEntry6`] have alike, written once for both:
/// their fields have the same names, only the addresses' type differs.
macro_rules! entry_api {
    ($entry:ident, $key:ident) => {
        impl $entry {
            /// An entry for `key` in `state`, with no translation and no
            /// flags; set the public fields before inserting it.
            #[must_use]
            pub const fn new(key: &$key, state: FlowState) -> $entry {
                $entry {
                    src_addr: key.src_addr,
                    dst_addr: key.dst_addr,
                    backend_addr: 0,
                    snat_addr: 0,
                    backend_index: 0,
                    stats_lo: (crate::stats::NO_SLOT & 0xffff) as u16,
                    src_port: key.src_port,
                    dst_port: key.dst_port,
                    backend_port: 0,
                    snat_port: 0,
                    protocol: key.protocol,
                    state,
                    flags: 0,
                    stats_hi: (crate::stats::NO_SLOT >> 16) as u8,
                }
            }

            /// The stats slot the flow is counted under ([`crate::stats`]),
            /// 24 bits; [`crate::stats::NO_SLOT`] when it is not counted.
            #[inline(always)]
            #[must_use]
            pub const fn stats_slot(&self) -> u32 {
                ((self.stats_hi as u32) << 16) | self.stats_lo as u32
            }

            /// Sets the stats slot (only its low 24 bits are kept).
            #[inline(always)]
            pub const fn set_stats_slot(&mut self, slot: u32) {
                self.stats_lo = slot as u16;
                self.stats_hi = (slot >> 16) as u8;
            }

            /// Whether the flow counts as active (a TCP flow past its
            /// handshake and before any FIN or RST) rather than inactive, as
            /// IPVS counts them.
            #[inline(always)]
            #[must_use]
            pub fn is_established(&self) -> bool {
                self.state == FlowState::TcpEstablished
            }

            /// The flow's key: for a forward flow, source = client and
            /// destination = VIP, as the client sends them.
            #[must_use]
            pub const fn key(&self) -> $key {
                $key {
                    src_addr: self.src_addr,
                    dst_addr: self.dst_addr,
                    src_port: self.src_port,
                    dst_port: self.dst_port,
                    protocol: self.protocol,
                }
            }
        }

        impl TableEntry for $entry {
            type Key = $key;

            const VACANT: $entry =
                $entry::new(&$key { src_addr: 0, dst_addr: 0, src_port: 0, dst_port: 0, protocol: 0 }, FlowState::Udp);

            #[inline]
            fn flow_key(&self) -> $key {
                self.key()
            }

            #[inline]
            fn matches(&self, key: &$key) -> bool {
                self.src_addr == key.src_addr
                    && self.dst_addr == key.dst_addr
                    && self.src_port == key.src_port
                    && self.dst_port == key.dst_port
                    && self.protocol == key.protocol
            }

            #[inline(always)]
            fn tracking(&self) -> (FlowState, u8) {
                (self.state, self.flags)
            }

            #[inline(always)]
            fn set_tracking(&mut self, state: FlowState, flags: u8) {
                (self.state, self.flags) = (state, flags);
            }

            #[inline]
            fn keyed_hash(key: &$key, seeds: &[u64; SEEDS]) -> u64 {
                let (a, b) = $entry::hash_words(key, seeds);
                mix_words(a, b, seeds)
            }
        }
    };
}

entry_api!(FlowEntry, FlowKey);
entry_api!(FlowEntry6, FlowKey6);

/// One tracked IPv6 flow: [`FlowEntry`]'s fields with 128-bit addresses
/// (the backend's and the source NAT address too). 80 bytes, 16-byte
/// aligned: like any 80-byte entry it spans two cache lines.
///
/// As with [`FlowEntry`], the key is fixed at construction and the public
/// fields are the pipeline's, through [`FlowTable6::get_mut`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(16))]
pub struct FlowEntry6 {
    src_addr: u128,
    dst_addr: u128,
    /// Address the flow is translated to (the backend, for a forward flow).
    pub backend_addr: u128,
    /// Source address the flow is translated to (FullNAT), or 0.
    pub snat_addr: u128,
    src_port: u16,
    dst_port: u16,
    /// Port the flow is translated to (the backend's).
    pub backend_port: u16,
    /// Source port the flow is translated to (FullNAT), or 0.
    pub snat_port: u16,
    /// As [`FlowEntry::backend_index`]: a hint, always verified.
    pub backend_index: u16,
    /// Low 16 bits of the flow's stats slot ([`FlowEntry6::stats_slot`]).
    stats_lo: u16,
    protocol: u8,
    /// State, which selects the timeout.
    pub state: FlowState,
    /// The [`FlowEntry`] flags (`FIN_FROM_CLIENT`, `FIN_FROM_BACKEND`,
    /// `RESET`), set by [`FlowTable6::on_tcp_flags`].
    pub flags: u8,
    /// High 8 bits of the flow's stats slot.
    stats_hi: u8,
}

impl FlowEntry6 {
    /// The key brought to two words for the table's hash: each address is
    /// first folded into one word under two seeds of its own,
    /// `fold(high ^ seeds[3], low ^ seeds[4])`, so that a difference in
    /// either half reaches every bit; the ports and protocol are then placed
    /// as in the IPv4 key (`a` takes the source port and protocol, `b` the
    /// destination port).
    #[inline(always)]
    fn hash_words(key: &FlowKey6, seeds: &[u64; SEEDS]) -> (u64, u64) {
        let fold_address = |addr: u128| folded_multiply((addr >> 64) as u64 ^ seeds[3], addr as u64 ^ seeds[4]);
        let a = fold_address(key.src_addr) ^ ((u64::from(key.src_port) << 16) | u64::from(key.protocol));
        let b = fold_address(key.dst_addr) ^ u64::from(key.dst_port);
        (a, b)
    }
}

/// What a flow table holds: [`FlowEntry`] (IPv4, [`FlowTable`]) or
/// [`FlowEntry6`] (IPv6, [`FlowTable6`]). The table's code is shared; the
/// entry type brings its key, how the key is compared and hashed, and where
/// its state and flags are.
pub trait TableEntry: Copy {
    /// The 5-tuple the entry is found by.
    type Key: Copy;

    /// What a slot that never held a flow contains.
    const VACANT: Self;

    /// The entry's key.
    fn flow_key(&self) -> Self::Key;

    /// Whether the entry is `key`'s flow.
    fn matches(&self, key: &Self::Key) -> bool;

    /// State and flags, which select the timeout.
    fn tracking(&self) -> (FlowState, u8);

    /// Sets state and flags (by the table's TCP state machine).
    fn set_tracking(&mut self, state: FlowState, flags: u8);

    /// `key`'s hash under a table's secret seeds (see the module
    /// documentation): a table hashes with [`FlowTableOf::hash_key`].
    fn keyed_hash(key: &Self::Key, seeds: &[u64; SEEDS]) -> u64;
}

/// Handle on a flow in a [`FlowTable`]: a slot index. See the module
/// documentation for how long it stays valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowRef(u32);

impl FlowRef {
    /// The slot index, for diagnostics.
    #[must_use]
    pub fn slot(self) -> usize {
        self.0 as usize
    }
}

/// A key's hash under one table's seeds, from [`FlowTable::hash_key`]. Lets a
/// caller hash a whole burst first, then probe; it is meaningless for any
/// other table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowHash(u64);

/// What an insert did to make room. Every variant but `Vacant` hands back an
/// entry that left the table: release what it held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "an entry that left the table may hold a source port to release"]
pub enum InsertOutcome<E = FlowEntry> {
    /// The flow went into a slot nobody held.
    Vacant,
    /// The flow reused the slot of this expired entry.
    ReusedExpired(E),
    /// No room: this live entry, the candidate closest to expiry, was
    /// evicted. Count it.
    Evicted(E),
    /// A live entry with the same key was there and was replaced.
    Replaced(E),
}

impl<E> InsertOutcome<E> {
    /// The entry that left the table, if any.
    #[must_use]
    pub fn displaced(&self) -> Option<&E> {
        match self {
            InsertOutcome::Vacant => None,
            InsertOutcome::ReusedExpired(e) | InsertOutcome::Evicted(e) | InsertOutcome::Replaced(e) => Some(e),
        }
    }

    /// Whether a live flow was evicted.
    #[must_use]
    pub fn is_eviction(&self) -> bool {
        matches!(self, InsertOutcome::Evicted(_))
    }
}

/// Metadata of one bucket: one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Bucket {
    /// Tag of each slot's key, or `EMPTY`.
    tags: [u32; SLOTS_PER_BUCKET],
    /// Expiry of each slot, coarse clock; meaningless when the tag is empty.
    expiry: [u32; SLOTS_PER_BUCKET],
}

impl Bucket {
    const EMPTY: Bucket = Bucket { tags: [EMPTY; SLOTS_PER_BUCKET], expiry: [0; SLOTS_PER_BUCKET] };

    /// Bit `i` set when slot `i` holds a live entry.
    #[inline]
    fn live_mask(&self, now: u32, horizon: u32) -> u32 {
        let mut mask = 0;
        for i in 0..SLOTS_PER_BUCKET {
            let live = (self.tags[i] != EMPTY) & is_live(self.expiry[i], now, horizon);
            mask |= u32::from(live) << i;
        }
        mask
    }
}

/// Whether an expiry time is still ahead of `now`: `expiry - now` (mod 2^32)
/// in `1..=horizon`.
#[inline]
fn is_live(expiry: u32, now: u32, horizon: u32) -> bool {
    expiry.wrapping_sub(now).wrapping_sub(1) < horizon
}

/// The coarse clock at `now`.
#[inline]
fn coarse(now: u64) -> u32 {
    (now >> TIME_UNIT_SHIFT) as u32
}

/// Lifetime of a timeout in coarse units: `ceil(T / unit) + 1`, capped.
fn lifetime_units(timeout_ns: u64) -> u32 {
    let units = timeout_ns.div_ceil(1 << TIME_UNIT_SHIFT).saturating_add(1);
    units.min(u64::from(MAX_LIFETIME_UNITS)) as u32
}

/// Timeouts converted to coarse units, indexed by state, plus 4 when the
/// RESET flag is set (a table rather than a `match`: no branch per packet).
#[derive(Clone, Copy, Debug)]
struct Lifetimes([u32; 8]);

impl Lifetimes {
    fn new(t: &FlowTimeouts) -> Lifetimes {
        let (syn, established, udp) =
            (lifetime_units(t.tcp_syn_ns), lifetime_units(t.tcp_established_ns), lifetime_units(t.udp_ns));
        let closing = lifetime_units(t.tcp_closing_ns);
        let reset = lifetime_units(t.tcp_reset_ns.min(t.tcp_closing_ns));
        let mut units = [0; 8];
        for (state, without, with) in [
            (FlowState::TcpSynSent, syn, syn),
            (FlowState::TcpEstablished, established, established),
            (FlowState::TcpClosing, closing, reset),
            (FlowState::Udp, udp, udp),
        ] {
            units[state as usize] = without;
            units[state as usize | usize::from(FlowEntry::RESET)] = with;
        }
        Lifetimes(units)
    }

    #[inline]
    fn of(&self, state: FlowState, flags: u8) -> u32 {
        self.0[state as usize | usize::from(flags & FlowEntry::RESET)]
    }

    fn longest(&self) -> u32 {
        self.0.iter().copied().max().unwrap_or(1)
    }
}

/// The loose TCP state machine: the state and flags after a segment with
/// `flags` from the client (`from_client`) or the backend.
///
/// - RST, either way: closing, with the reset timeout.
/// - SYN without ACK from the client on a closing flow: a new connection
///   reusing the port, back to SYN sent with flags cleared. Any other SYN
///   changes nothing (a retransmission, or a SYN-ACK); in particular a SYN
///   cannot shorten an established flow's timeout.
/// - FIN: closing, remembering who sent it.
/// - Anything else (ACK, data): a handshake under way is established;
///   closing stays closing (the last ACKs of a close must not reopen it).
/// - A UDP flow never changes.
fn tcp_transition(state: FlowState, flags: u8, from_client: bool, tcp: u16) -> (FlowState, u8) {
    use FlowState::*;
    if state == Udp {
        return (state, flags);
    }
    if tcp & tcp_flags::RST != 0 {
        return (TcpClosing, flags | FlowEntry::RESET);
    }
    if tcp & tcp_flags::SYN != 0 {
        if from_client && tcp & tcp_flags::ACK == 0 && state == TcpClosing {
            return (TcpSynSent, 0);
        }
        return (state, flags);
    }
    if tcp & tcp_flags::FIN != 0 {
        let fin = if from_client { FlowEntry::FIN_FROM_CLIENT } else { FlowEntry::FIN_FROM_BACKEND };
        return (TcpClosing, flags | fin);
    }
    match state {
        TcpSynSent => (TcpEstablished, flags),
        other => (other, flags),
    }
}

/// Multiplies two words into 128 bits and xors the halves.
#[inline]
const fn folded_multiply(x: u64, y: u64) -> u64 {
    let product = (x as u128).wrapping_mul(y as u128);
    (product as u64) ^ ((product >> 64) as u64)
}

/// SplitMix64's finaliser, to spread one seed into several keys.
const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Odd multiplier (2^32 / golden ratio) that decorrelates the second bucket
/// from the tag's own bits.
const ALT_MULTIPLIER: u32 = 0x9E37_79B9;

/// Finishing multiplier of the hash: digits of pi, as in `crate::hash`.
const HASH_FINISH: u64 = 0x082E_FA98_EC4E_6C89;

/// Number of secret seeds of a table's hash: three for the two-word mix
/// every key ends in, two more for folding IPv6 addresses.
pub const SEEDS: usize = 5;

/// The keyed mix of a key packed in two words, for both tables: two rounds
/// of a folded 64x64->128-bit multiply.
#[inline(always)]
fn mix_words(a: u64, b: u64, seeds: &[u64; SEEDS]) -> u64 {
    let h = folded_multiply(a ^ seeds[0], b ^ seeds[1]);
    folded_multiply(h ^ seeds[2], HASH_FINISH)
}

/// The per-worker IPv4 flow table. See the module documentation.
pub type FlowTable = FlowTableOf<FlowEntry>;

/// The per-worker IPv6 flow table: the same table, with [`FlowEntry6`]
/// entries ([`BYTES_PER_SLOT6`] bytes per slot). See the module
/// documentation.
pub type FlowTable6 = FlowTableOf<FlowEntry6>;

/// A flow table holding entries of type `E`: use [`FlowTable`] (IPv4) or
/// [`FlowTable6`] (IPv6). See the module documentation.
pub struct FlowTableOf<E> {
    buckets: Box<[Bucket]>,
    entries: Box<[E]>,
    /// `buckets.len()` as a `u64`, for the multiply-shift reductions.
    bucket_count: u64,
    seeds: [u64; SEEDS],
    timeouts: FlowTimeouts,
    lifetimes: Lifetimes,
    /// Longest lifetime in coarse units: an entry whose expiry is further
    /// ahead than this expired long ago (the clock wrapped since).
    horizon: u32,
    /// Slots holding an entry that was not handed back yet, live or expired.
    occupied: usize,
    /// Where [`FlowTable::expire_some`] resumes.
    sweep_cursor: usize,
    /// Inserts left that skip the room-making search.
    backoff: u32,
}

impl<E> fmt::Debug for FlowTableOf<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowTable")
            .field("capacity", &self.entries.len())
            .field("occupied", &self.occupied)
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl<E: TableEntry> FlowTableOf<E> {
    /// The table [`FlowTable::with_seed`] builds.
    #[inline(always)]
    fn build(capacity: usize, timeouts: FlowTimeouts, seed: u64) -> Self {
        let buckets = bucket_count(capacity);
        let lifetimes = Lifetimes::new(&timeouts);
        FlowTableOf {
            buckets: vec![Bucket::EMPTY; buckets].into_boxed_slice(),
            entries: vec![E::VACANT; buckets * SLOTS_PER_BUCKET].into_boxed_slice(),
            bucket_count: buckets as u64,
            seeds: [
                mix64(seed),
                mix64(seed ^ 0x5555_5555_5555_5555),
                mix64(seed.wrapping_add(0x9E37_79B9_7F4A_7C15)),
                mix64(seed ^ 0xAAAA_AAAA_AAAA_AAAA),
                mix64(seed.wrapping_sub(0x9E37_79B9_7F4A_7C15)),
            ],
            timeouts,
            lifetimes,
            horizon: lifetimes.longest(),
            occupied: 0,
            sweep_cursor: 0,
            backoff: 0,
        }
    }

    /// `key`'s hash under this table's seeds.
    #[inline]
    #[must_use]
    pub fn hash_key(&self, key: &E::Key) -> FlowHash {
        FlowHash(E::keyed_hash(key, &self.seeds))
    }

    /// The two buckets a key with this hash may live in (the same bucket
    /// twice for about one key in `capacity / 8`). A caller that prefetches
    /// can hash a burst, then touch these buckets, then look up.
    #[inline]
    #[must_use]
    pub fn candidate_buckets(&self, hash: FlowHash) -> [usize; 2] {
        let (first, tag) = self.home(hash);
        [first, self.other_bucket(first, tag)]
    }

    /// Addresses of the metadata lines of a hash's two candidate buckets, for
    /// a prefetch hint issued by the caller while earlier packets of the
    /// burst are processed. The addresses are for that hint only.
    #[inline]
    pub fn prefetch_addresses(&self, hash: FlowHash) -> [usize; 2] {
        let [a, b] = self.candidate_buckets(hash);
        [&self.buckets[a] as *const Bucket as usize, &self.buckets[b] as *const Bucket as usize]
    }

    /// Address of the first entry whose tag matches the hash, for a second
    /// prefetch hint once the buckets' metadata is in cache (a tag match is
    /// likely the flow; a miss or a stale match costs only a wasted hint).
    #[inline]
    pub fn entry_prefetch_address(&self, hash: FlowHash) -> Option<usize> {
        let (first, tag) = self.home(hash);
        for bucket in [first, self.other_bucket(first, tag)] {
            if let Some(i) = self.buckets[bucket].tags.iter().position(|&t| t == tag) {
                return Some(&self.entries[bucket * SLOTS_PER_BUCKET + i] as *const E as usize);
            }
        }
        None
    }

    /// First bucket and tag of a hash.
    #[inline]
    fn home(&self, hash: FlowHash) -> (usize, u32) {
        let first = ((hash.0 & 0xFFFF_FFFF) * self.bucket_count) >> 32;
        (first as usize, (hash.0 >> 32) as u32 | 1)
    }

    /// The other bucket of an entry with `tag` in `bucket`: an involution.
    #[inline]
    fn other_bucket(&self, bucket: usize, tag: u32) -> usize {
        let f = ((u64::from(tag.wrapping_mul(ALT_MULTIPLIER)) * self.bucket_count) >> 32) as usize;
        if f >= bucket { f - bucket } else { f + self.buckets.len() - bucket }
    }

    /// The live slot holding `key` in `bucket`, if any.
    ///
    /// A plain scan with an early exit: with the baseline x86-64 target (no
    /// AVX2) it takes fewer instructions than building a bit mask of tag
    /// matches, and inserts fill low slots first, so hits end early.
    #[inline(always)]
    fn find_in(&self, bucket: usize, tag: u32, key: &E::Key, now: u32) -> Option<usize> {
        let b = &self.buckets[bucket];
        for i in 0..SLOTS_PER_BUCKET {
            if b.tags[i] == tag {
                let slot = bucket * SLOTS_PER_BUCKET + i;
                if is_live(b.expiry[i], now, self.horizon) && self.entries[slot].matches(key) {
                    return Some(slot);
                }
            }
        }
        None
    }

    #[inline]
    fn find_slot(&self, key: &E::Key, hash: FlowHash, now: u32) -> Option<usize> {
        let (first, tag) = self.home(hash);
        self.find_in(first, tag, key, now).or_else(|| self.find_in(self.other_bucket(first, tag), tag, key, now))
    }

    #[inline]
    fn set_expiry(&mut self, slot: usize, expiry: u32) {
        self.buckets[slot / SLOTS_PER_BUCKET].expiry[slot % SLOTS_PER_BUCKET] = expiry;
    }

    /// Recomputes a slot's expiry from its entry's state, as of `now`.
    #[inline]
    fn refresh(&mut self, slot: usize, now: u32) {
        let (state, flags) = self.entries[slot].tracking();
        let expiry = now.wrapping_add(self.lifetimes.of(state, flags));
        self.set_expiry(slot, expiry);
    }

    /// The live flow with `key` at `now`, its expiry refreshed for its
    /// state (a packet was seen). Per packet.
    #[inline]
    pub fn lookup(&mut self, key: &E::Key, now: u64) -> Option<FlowRef> {
        let hash = self.hash_key(key);
        self.lookup_hashed(key, hash, now)
    }

    /// [`FlowTable::lookup`] with the hash already computed by
    /// [`FlowTable::hash_key`] for this key on this table.
    #[inline]
    pub fn lookup_hashed(&mut self, key: &E::Key, hash: FlowHash, now: u64) -> Option<FlowRef> {
        let now = coarse(now);
        let slot = self.find_slot(key, hash, now)?;
        self.refresh(slot, now);
        Some(FlowRef(slot as u32))
    }

    /// The entry behind a handle.
    #[inline]
    #[must_use]
    pub fn get(&self, flow: FlowRef) -> &E {
        &self.entries[flow.slot()]
    }

    /// The entry behind a handle, to update its translation or state (then
    /// [`FlowTable::touch`] it). Its key cannot change.
    #[inline]
    pub fn get_mut(&mut self, flow: FlowRef) -> &mut E {
        &mut self.entries[flow.slot()]
    }

    /// Restarts the flow's timeout from `now`, for its current state and
    /// flags.
    #[inline]
    pub fn touch(&mut self, flow: FlowRef, now: u64) {
        self.refresh(flow.slot(), coarse(now));
    }

    /// Feeds a TCP segment's flags (as in the header, `wire::tcp::flags`) to
    /// the flow's state machine and restarts its timeout for the new state.
    /// `from_client` is the direction. See [`FlowState`] for the rules:
    /// SYN only -> SYN sent; any other segment -> established; FIN either
    /// way -> closing; RST -> closing with the reset timeout; a client SYN on
    /// a closing flow -> SYN sent again (port reuse).
    #[inline]
    pub fn on_tcp_flags(&mut self, flow: FlowRef, from_client: bool, flags: u16, now: u64) {
        let slot = flow.slot();
        let e = &mut self.entries[slot];
        let (state, old) = e.tracking();
        let (state, new) = tcp_transition(state, old, from_client, flags);
        e.set_tracking(state, new);
        self.refresh(slot, coarse(now));
    }

    #[inline]
    fn insert_with(
        &mut self,
        entry: E,
        hash: FlowHash,
        now: u64,
        half_open: bool,
    ) -> Option<(FlowRef, InsertOutcome<E>)> {
        let now = coarse(now);
        let (state, flags) = entry.tracking();
        let expiry = now.wrapping_add(self.lifetimes.of(state, flags));
        let (first, tag) = self.home(hash);
        let second = self.other_bucket(first, tag);
        let key = entry.flow_key();

        if let Some(slot) = self.find_in(first, tag, &key, now).or_else(|| self.find_in(second, tag, &key, now)) {
            let old = std::mem::replace(&mut self.entries[slot], entry);
            self.set_expiry(slot, expiry);
            return Some((FlowRef(slot as u32), InsertOutcome::Replaced(old)));
        }

        let full = (1u32 << SLOTS_PER_BUCKET) - 1;
        let free_first = !self.buckets[first].live_mask(now, self.horizon) & full;
        let free_second = if second == first { 0 } else { !self.buckets[second].live_mask(now, self.horizon) & full };
        let (slot, outcome) = if free_first | free_second != 0 {
            let slot = if free_second.count_ones() > free_first.count_ones() {
                second * SLOTS_PER_BUCKET + free_second.trailing_zeros() as usize
            } else {
                first * SLOTS_PER_BUCKET + free_first.trailing_zeros() as usize
            };
            (slot, self.claim_free(slot))
        } else if let Some(made) = self.make_room(first, second, now) {
            made
        } else {
            let slot = if half_open {
                self.closest_half_open(first, second, now)?
            } else {
                self.closest_to_expiry(first, second, now)
            };
            (slot, InsertOutcome::Evicted(self.entries[slot]))
        };
        self.entries[slot] = entry;
        let b = &mut self.buckets[slot / SLOTS_PER_BUCKET];
        b.tags[slot % SLOTS_PER_BUCKET] = tag;
        b.expiry[slot % SLOTS_PER_BUCKET] = expiry;
        Some((FlowRef(slot as u32), outcome))
    }

    /// Takes a free slot (empty or expired) for a new occupant: what was
    /// there, as an outcome.
    #[inline]
    fn claim_free(&mut self, slot: usize) -> InsertOutcome<E> {
        if self.buckets[slot / SLOTS_PER_BUCKET].tags[slot % SLOTS_PER_BUCKET] == EMPTY {
            self.occupied += 1;
            InsertOutcome::Vacant
        } else {
            InsertOutcome::ReusedExpired(self.entries[slot])
        }
    }

    /// Moves the entry (and its metadata) in slot `from` to slot `to`.
    fn move_slot(&mut self, from: usize, to: usize) {
        self.entries[to] = self.entries[from];
        let (fb, fi) = (from / SLOTS_PER_BUCKET, from % SLOTS_PER_BUCKET);
        let (tag, expiry) = (self.buckets[fb].tags[fi], self.buckets[fb].expiry[fi]);
        let b = &mut self.buckets[to / SLOTS_PER_BUCKET];
        b.tags[to % SLOTS_PER_BUCKET] = tag;
        b.expiry[to % SLOTS_PER_BUCKET] = expiry;
    }

    /// Frees a slot of `first` or `second` (both full of live flows) by
    /// moving one flow to its other bucket, or one flow there and another
    /// out of that bucket in turn. Reads only metadata to find the path.
    /// Returns the freed slot (its old tag is left for the caller to
    /// overwrite) and what the last move displaced.
    #[cold]
    fn make_room(&mut self, first: usize, second: usize, now: u32) -> Option<(usize, InsertOutcome<E>)> {
        if self.backoff > 0 {
            self.backoff -= 1;
            return None;
        }
        let homes = [first, second];
        let homes = if first == second { &homes[..1] } else { &homes[..] };
        let full = (1u32 << SLOTS_PER_BUCKET) - 1;
        for &home in homes {
            for i in 0..SLOTS_PER_BUCKET {
                let via = self.other_bucket(home, self.buckets[home].tags[i]);
                let free = !self.buckets[via].live_mask(now, self.horizon) & full;
                if free != 0 {
                    let to = via * SLOTS_PER_BUCKET + free.trailing_zeros() as usize;
                    let outcome = self.claim_free(to);
                    let from = home * SLOTS_PER_BUCKET + i;
                    self.move_slot(from, to);
                    return Some((from, outcome));
                }
            }
        }
        for &home in homes {
            for i in 0..SLOTS_PER_BUCKET {
                let via = self.other_bucket(home, self.buckets[home].tags[i]);
                for j in 0..SLOTS_PER_BUCKET {
                    let last = self.other_bucket(via, self.buckets[via].tags[j]);
                    let free = !self.buckets[last].live_mask(now, self.horizon) & full;
                    if free != 0 {
                        let to = last * SLOTS_PER_BUCKET + free.trailing_zeros() as usize;
                        let outcome = self.claim_free(to);
                        let middle = via * SLOTS_PER_BUCKET + j;
                        let from = home * SLOTS_PER_BUCKET + i;
                        self.move_slot(middle, to);
                        self.move_slot(from, middle);
                        return Some((from, outcome));
                    }
                }
            }
        }
        self.backoff = DISPLACEMENT_BACKOFF;
        None
    }

    /// The slot of `first` or `second` whose entry expires first.
    fn closest_to_expiry(&self, first: usize, second: usize, now: u32) -> usize {
        let mut best = (u32::MAX, first * SLOTS_PER_BUCKET);
        for bucket in [first, second] {
            for (i, &expiry) in self.buckets[bucket].expiry.iter().enumerate() {
                let remaining = expiry.wrapping_sub(now);
                if remaining < best.0 {
                    best = (remaining, bucket * SLOTS_PER_BUCKET + i);
                }
            }
        }
        best.1
    }

    /// The slot of `first` or `second` (both full of live flows) whose
    /// half-open entry expires first, if any holds one. Reads the entries:
    /// only when a half-open flow finds no free slot.
    #[cold]
    fn closest_half_open(&self, first: usize, second: usize, now: u32) -> Option<usize> {
        let mut best: Option<(u32, usize)> = None;
        for bucket in [first, second] {
            for (i, &expiry) in self.buckets[bucket].expiry.iter().enumerate() {
                let slot = bucket * SLOTS_PER_BUCKET + i;
                let remaining = expiry.wrapping_sub(now);
                if self.entries[slot].tracking().0 == FlowState::TcpSynSent && best.is_none_or(|(r, _)| remaining < r) {
                    best = Some((remaining, slot));
                }
            }
        }
        best.map(|(_, slot)| slot)
    }

    /// The body of [`FlowTable::remove`].
    #[inline(always)]
    fn remove_slot(&mut self, slot: usize) -> Option<E> {
        let tag = &mut self.buckets[slot / SLOTS_PER_BUCKET].tags[slot % SLOTS_PER_BUCKET];
        if *tag == EMPTY {
            return None;
        }
        *tag = EMPTY;
        self.occupied -= 1;
        Some(self.entries[slot])
    }

    /// Keeps only the entries (live or expired, not yet handed back) for
    /// which `keep` returns true; the others are removed. Visits every slot:
    /// for configuration changes, never per packet.
    pub fn retain(&mut self, mut keep: impl FnMut(&E) -> bool) {
        for slot in 0..self.entries.len() {
            let tag = &mut self.buckets[slot / SLOTS_PER_BUCKET].tags[slot % SLOTS_PER_BUCKET];
            if *tag != EMPTY && !keep(&self.entries[slot]) {
                *tag = EMPTY;
                self.occupied -= 1;
            }
        }
    }

    /// Housekeeping, not per packet: visits the next `budget` slots (in
    /// order, wrapping, resuming where the last call stopped), clears every
    /// expired entry among them and passes it to `on_expire` (to release its
    /// source port). Returns how many it cleared. The budget counts slots
    /// visited, not entries cleared, so a call's cost is bounded whatever
    /// the table holds; see the module documentation for how often the
    /// whole table must be covered.
    pub fn expire_some(&mut self, now: u64, budget: usize, mut on_expire: impl FnMut(&E)) -> usize {
        let now = coarse(now);
        let mut cleared = 0;
        for _ in 0..budget.min(self.entries.len()) {
            let slot = self.sweep_cursor;
            self.sweep_cursor = if slot + 1 == self.entries.len() { 0 } else { slot + 1 };
            let b = &mut self.buckets[slot / SLOTS_PER_BUCKET];
            let i = slot % SLOTS_PER_BUCKET;
            if b.tags[i] != EMPTY && !is_live(b.expiry[i], now, self.horizon) {
                b.tags[i] = EMPTY;
                self.occupied -= 1;
                cleared += 1;
                on_expire(&self.entries[slot]);
            }
        }
        cleared
    }
}

/// The table's functions that are not inlined, written once and compiled
/// for each entry type as plain (not generic) functions of this crate. A
/// generic function is compiled anew in every crate and code unit that
/// calls it, which moves code between units and changes what the compiler
/// inlines in the packet path; these keep their place, so the IPv4 table
/// compiles as it did before there was an IPv6 one. Everything inlined per
/// packet is generic, in `impl<E: TableEntry> FlowTableOf<E>`.
macro_rules! out_of_line_api {
    ($entry:ty, $key:ty) => {
        impl FlowTableOf<$entry> {
            /// A table of at least `capacity` slots (rounded up to a
            /// multiple of 8, at least 8, at most [`MAX_CAPACITY`]), with a
            /// hash keyed from the operating system's randomness. This is
            /// the only allocation the table ever makes:
            /// [`memory_bytes`]`(capacity)` bytes for an IPv4 table,
            /// [`memory_bytes6`]`(capacity)` for an IPv6 one, all written
            /// here so the fast path never takes a first-touch page fault.
            #[must_use]
            pub fn new(capacity: usize, timeouts: FlowTimeouts) -> Self {
                Self::build(capacity, timeouts, random_seed())
            }

            /// Like `new`, with the hash keyed from `seed`: for tests and
            /// benchmarks that must be reproducible. Do not use a
            /// predictable seed in production (see the module
            /// documentation).
            #[must_use]
            pub fn with_seed(capacity: usize, timeouts: FlowTimeouts, seed: u64) -> Self {
                Self::build(capacity, timeouts, seed)
            }

            /// Number of slots: the most flows the table can hold.
            #[must_use]
            pub fn capacity(&self) -> usize {
                self.entries.len()
            }

            /// Where the table's memory lies, as (address, length in
            /// bytes), so the DPDK driver can ask the kernel to back it with
            /// huge pages. The addresses are for that advice only.
            pub fn memory_regions(&self) -> [(usize, usize); 2] {
                [
                    (self.buckets.as_ptr() as usize, size_of_val(&*self.buckets)),
                    (self.entries.as_ptr() as usize, size_of_val(&*self.entries)),
                ]
            }

            /// Occupied slots: an upper bound on live flows (expired ones
            /// count until they are swept or reused).
            pub fn occupied(&self) -> usize {
                self.occupied
            }

            /// Live flows at `now`. Visits every slot: for statistics and
            /// tests, never per packet.
            #[must_use]
            pub fn count_live(&self, now: u64) -> usize {
                let now = coarse(now);
                self.buckets.iter().map(|b| b.live_mask(now, self.horizon).count_ones() as usize).sum()
            }

            /// The timeouts this table was built with.
            #[must_use]
            pub fn timeouts(&self) -> &FlowTimeouts {
                &self.timeouts
            }

            /// The live flow with `key` at `now`, without refreshing it: for
            /// inspection, not for packets.
            #[must_use]
            pub fn find(&self, key: &$key, now: u64) -> Option<FlowRef> {
                self.find_slot(key, self.hash_key(key), coarse(now)).map(|slot| FlowRef(slot as u32))
            }

            /// Inserts a flow at `now`, live for its state's timeout. Never
            /// refuses: a live flow with the same key is replaced; otherwise
            /// the flow goes to a free (empty or expired) slot of its
            /// buckets, or to one made free by moving other flows, or,
            /// failing that, takes the slot of the candidate closest to
            /// expiry. The outcome hands back whatever left the table.
            ///
            /// Bounded work: at most 2 + 16 + 128 metadata lines and 3
            /// entries.
            #[inline]
            #[must_use = "an entry that left the table may hold a source port to release"]
            pub fn insert(&mut self, entry: $entry, now: u64) -> (FlowRef, InsertOutcome<$entry>) {
                let hash = self.hash_key(&entry.key());
                self.insert_hashed(entry, hash, now)
            }

            /// `insert` with the hash already computed by `hash_key` for
            /// this entry's key on this table.
            #[must_use = "an entry that left the table may hold a source port to release"]
            pub fn insert_hashed(
                &mut self,
                entry: $entry,
                hash: FlowHash,
                now: u64,
            ) -> (FlowRef, InsertOutcome<$entry>) {
                match self.insert_with(entry, hash, now, false) {
                    Some(done) => done,
                    None => unreachable!("an insert that may evict any flow always finds a slot"),
                }
            }

            /// `insert_hashed` for a half-open flow (a connection not proved
            /// yet, whose source may be spoofed): it takes a free slot, or
            /// one made free by moving other flows, or evicts the half-open
            /// candidate ([`FlowState::TcpSynSent`]) closest to expiry; it
            /// never evicts a flow in any other state. `None`, with nothing
            /// changed, when both candidate buckets hold only such flows:
            /// half-open flows can fill free slots and take each other's,
            /// never an established flow's.
            #[must_use = "an entry that left the table may hold a source port to release"]
            pub fn insert_half_open_hashed(
                &mut self,
                entry: $entry,
                hash: FlowHash,
                now: u64,
            ) -> Option<(FlowRef, InsertOutcome<$entry>)> {
                self.insert_with(entry, hash, now, true)
            }

            /// Removes a flow and hands its entry back; `None` if the slot
            /// holds no entry (a handle used after its flow left).
            pub fn remove(&mut self, flow: FlowRef) -> Option<$entry> {
                self.remove_slot(flow.slot())
            }
        }
    };
}

out_of_line_api!(FlowEntry, FlowKey);
out_of_line_api!(FlowEntry6, FlowKey6);

/// A seed from the operating system's randomness: std's `RandomState` holds
/// keys drawn from the OS once per thread, advanced for every instance, so
/// hashing a constant with a fresh one gives an unpredictable word.
fn random_seed() -> u64 {
    RandomState::new().hash_one(0x666C_6F77_u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tcp::flags::{ACK, FIN, PSH, RST, SYN};
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    const S: u64 = 1_000_000_000;
    /// One unit of the coarse clock, in nanoseconds.
    const UNIT: u64 = 1 << TIME_UNIT_SHIFT;
    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const VIP: u32 = 0xC613_0064; // 198.19.0.100

    fn key(i: u32) -> FlowKey {
        FlowKey { src_addr: 0xC612_0000 | (i >> 16), dst_addr: VIP, src_port: i as u16, dst_port: 443, protocol: TCP }
    }

    fn udp_key(i: u32) -> FlowKey {
        FlowKey { protocol: UDP, dst_port: 53, ..key(i) }
    }

    /// An entry whose backend address doubles as an identity.
    fn entry(k: &FlowKey, state: FlowState, id: u32) -> FlowEntry {
        let mut e = FlowEntry::new(k, state);
        e.backend_addr = id;
        e.backend_port = 8080;
        e
    }

    fn table(capacity: usize) -> FlowTable {
        FlowTable::with_seed(capacity, FlowTimeouts::default(), 42)
    }

    /// A deterministic xorshift generator.
    fn rng(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    fn random_key(r: u64) -> FlowKey {
        FlowKey { src_addr: r as u32, dst_addr: VIP, src_port: (r >> 32) as u16, dst_port: 443, protocol: TCP }
    }

    #[test]
    fn sizes_and_memory() {
        assert_eq!(size_of::<FlowEntry>(), 32);
        assert_eq!(std::mem::align_of::<FlowEntry>(), 32);
        assert_eq!(size_of::<Bucket>(), 64);
        assert_eq!(std::mem::align_of::<Bucket>(), 64);
        assert_eq!(BYTES_PER_SLOT, 40);
        assert_eq!(memory_bytes(1_000_000), 40_000_000);
        assert_eq!(memory_bytes(DEFAULT_CAPACITY), 40 << 20);
        for (asked, got) in [(0, 8), (1, 8), (8, 8), (9, 16), (1000, 1000), (1001, 1008)] {
            let t = table(asked);
            assert_eq!(t.capacity(), got, "capacity {asked}");
            assert_eq!(memory_bytes(asked), got * BYTES_PER_SLOT);
            assert_eq!(
                t.buckets.len() * size_of::<Bucket>() + t.entries.len() * size_of::<FlowEntry>(),
                memory_bytes(asked)
            );
        }
        assert_eq!(bucket_count(usize::MAX) * SLOTS_PER_BUCKET, MAX_CAPACITY);
    }

    #[test]
    fn insert_lookup_remove() {
        let mut t = table(1024);
        let k = key(1);
        let e = entry(&k, FlowState::TcpSynSent, 7);
        assert_eq!(t.lookup(&k, 0), None);
        let (r, outcome) = t.insert(e, 0);
        assert_eq!(outcome, InsertOutcome::Vacant);
        assert_eq!(t.occupied(), 1);
        assert_eq!(t.lookup(&k, S), Some(r));
        assert_eq!(t.find(&k, S), Some(r));
        assert_eq!(*t.get(r), e);
        assert_eq!(t.get(r).key(), k);
        assert_eq!(t.lookup(&key(2), S), None);
        assert_eq!(t.lookup(&FlowKey { protocol: UDP, ..k }, S), None, "the protocol is part of the key");

        t.get_mut(r).snat_port = 61000;
        assert_eq!(t.get(t.find(&k, S).unwrap()).snat_port, 61000);

        let removed = t.remove(r).unwrap();
        assert_eq!(removed.snat_port, 61000);
        assert_eq!(removed.backend_addr, 7);
        assert_eq!(t.lookup(&k, S), None);
        assert_eq!(t.occupied(), 0);
        assert_eq!(t.remove(r), None, "a handle whose flow left removes nothing");
        assert_eq!(t.occupied(), 0);
    }

    #[test]
    fn hashed_variants_agree_with_plain_ones() {
        let mut t = table(1024);
        let k = key(3);
        let h = t.hash_key(&k);
        let (r, _) = t.insert_hashed(entry(&k, FlowState::Udp, 1), h, 0);
        assert_eq!(t.lookup(&k, 1), Some(r));
        assert_eq!(t.lookup_hashed(&k, h, 1), Some(r));
        assert!(t.candidate_buckets(h).contains(&(r.slot() / SLOTS_PER_BUCKET)));
        // Same seed, same hash; another seed, another hash.
        assert_eq!(table(8).hash_key(&k), h);
        assert_ne!(FlowTable::with_seed(8, FlowTimeouts::default(), 43).hash_key(&k), h);
        assert_ne!(FlowTable::new(8, FlowTimeouts::default()).hash_key(&k), h);
    }

    #[test]
    fn second_bucket_is_an_involution() {
        for capacity in [8, 16, 24, 1000, 4096, 1 << 20] {
            let t = table(capacity);
            let n = t.buckets.len();
            let mut next = rng(capacity as u64);
            for _ in 0..2000 {
                let (first, tag) = t.home(t.hash_key(&random_key(next())));
                assert!(first < n);
                assert_eq!(tag & 1, 1, "tags are never EMPTY");
                let second = t.other_bucket(first, tag);
                assert!(second < n);
                assert_eq!(t.other_bucket(second, tag), first);
            }
        }
    }

    #[test]
    fn inserting_a_live_key_replaces_it() {
        let mut t = table(64);
        let k = key(1);
        let (r1, _) = t.insert(entry(&k, FlowState::TcpSynSent, 1), 0);
        let (r2, outcome) = t.insert(entry(&k, FlowState::TcpEstablished, 2), S);
        assert_eq!(r1, r2);
        assert_eq!(outcome, InsertOutcome::Replaced(entry(&k, FlowState::TcpSynSent, 1)));
        assert_eq!(outcome.displaced().unwrap().backend_addr, 1);
        assert_eq!(t.occupied(), 1);
        // The new entry's timeout applies (established, not SYN).
        assert_eq!(t.find(&k, 100 * S).map(|r| t.get(r).backend_addr), Some(2));
    }

    /// Live for more than the timeout, gone less than two coarse units after.
    fn assert_lifetime(t: &FlowTable, k: &FlowKey, since: u64, timeout: u64) {
        assert!(t.find(k, since + timeout).is_some(), "{k:?} gone before {timeout} ns");
        assert!(t.find(k, since + timeout + 2 * UNIT).is_none(), "{k:?} still there after {timeout} ns");
    }

    #[test]
    fn timeouts_by_state() {
        let d = FlowTimeouts::default();
        assert_eq!(
            (d.tcp_syn_ns, d.tcp_established_ns, d.tcp_closing_ns, d.tcp_reset_ns, d.udp_ns),
            (30 * S, 900 * S, 120 * S, 10 * S, 300 * S)
        );
        let mut t = table(64);
        let t0 = 5 * S + 123_456;
        let cases = [
            (key(1), FlowState::TcpSynSent, d.tcp_syn_ns),
            (key(2), FlowState::TcpEstablished, d.tcp_established_ns),
            (key(3), FlowState::TcpClosing, d.tcp_closing_ns),
            (udp_key(4), FlowState::Udp, d.udp_ns),
        ];
        for (i, (k, state, _)) in cases.iter().enumerate() {
            let _ = t.insert(entry(k, *state, i as u32), t0);
        }
        for (k, _, timeout) in &cases {
            assert_lifetime(&t, k, t0, *timeout);
        }
    }

    #[test]
    fn lifetime_bounds_hold_at_every_phase_of_the_coarse_clock() {
        let timeouts = FlowTimeouts { udp_ns: 3 * UNIT + 17, ..FlowTimeouts::default() };
        let k = udp_key(1);
        for phase in [0, 1, UNIT / 2, UNIT - 1] {
            let mut t = FlowTable::with_seed(8, timeouts, 1);
            let t0 = 1000 * UNIT + phase;
            let _ = t.insert(entry(&k, FlowState::Udp, 1), t0);
            assert_lifetime(&t, &k, t0, timeouts.udp_ns);
        }
        // A zero timeout still lives until the end of the current unit.
        let mut t = FlowTable::with_seed(8, FlowTimeouts { udp_ns: 0, ..timeouts }, 1);
        let _ = t.insert(entry(&k, FlowState::Udp, 1), 10 * UNIT);
        assert!(t.find(&k, 11 * UNIT - 1).is_some());
        assert!(t.find(&k, 11 * UNIT).is_none());
    }

    #[test]
    fn lookup_refreshes_and_find_does_not() {
        let mut t = table(64);
        let k = udp_key(1);
        let _ = t.insert(entry(&k, FlowState::Udp, 1), 0);
        assert!(t.find(&k, 200 * S).is_some());
        assert!(t.lookup(&k, 250 * S).is_some());
        assert_lifetime(&t, &k, 250 * S, 300 * S);
    }

    #[test]
    fn tcp_state_machine() {
        use FlowState::*;
        let (c, b) = (true, false);
        let fin_c = FlowEntry::FIN_FROM_CLIENT;
        let fin_b = FlowEntry::FIN_FROM_BACKEND;
        let rst = FlowEntry::RESET;
        let cases = [
            // (state, flags, from_client, tcp flags) -> (state, flags)
            ((TcpSynSent, 0, c, SYN), (TcpSynSent, 0)),
            ((TcpSynSent, 0, b, SYN | ACK), (TcpSynSent, 0)),
            ((TcpSynSent, 0, c, ACK), (TcpEstablished, 0)),
            ((TcpSynSent, 0, b, ACK | PSH), (TcpEstablished, 0)),
            ((TcpEstablished, 0, c, ACK), (TcpEstablished, 0)),
            ((TcpEstablished, 0, c, SYN), (TcpEstablished, 0)),
            ((TcpEstablished, 0, c, FIN | ACK), (TcpClosing, fin_c)),
            ((TcpClosing, fin_c, b, FIN | ACK), (TcpClosing, fin_c | fin_b)),
            ((TcpClosing, fin_c | fin_b, c, ACK), (TcpClosing, fin_c | fin_b)),
            ((TcpEstablished, 0, b, RST), (TcpClosing, rst)),
            ((TcpSynSent, 0, c, RST | ACK), (TcpClosing, rst)),
            ((TcpClosing, fin_c, c, RST), (TcpClosing, fin_c | rst)),
            ((TcpClosing, fin_c | fin_b, c, SYN), (TcpSynSent, 0)),
            ((TcpClosing, rst, c, SYN), (TcpSynSent, 0)),
            ((TcpClosing, rst, b, SYN), (TcpClosing, rst)),
            ((TcpClosing, rst, c, SYN | ACK), (TcpClosing, rst)),
            ((TcpClosing, rst, c, SYN | RST), (TcpClosing, rst)),
            ((Udp, 0, c, FIN | RST), (Udp, 0)),
        ];
        for ((state, flags, from_client, tcp), want) in cases {
            assert_eq!(
                tcp_transition(state, flags, from_client, tcp),
                want,
                "{state:?} {flags:#x} {from_client} {tcp:#x}"
            );
        }

        assert_eq!(FlowState::of_first_packet(TCP, SYN), TcpSynSent);
        assert_eq!(FlowState::of_first_packet(TCP, ACK), TcpEstablished);
        assert_eq!(FlowState::of_first_packet(TCP, FIN | ACK), TcpClosing);
        assert_eq!(FlowState::of_first_packet(TCP, RST), TcpClosing);
        assert_eq!(FlowState::of_first_packet(UDP, SYN), Udp);
    }

    #[test]
    fn tcp_flags_drive_timeouts() {
        let d = FlowTimeouts::default();
        let mut t = table(64);
        let k = key(1);
        let (r, _) = t.insert(entry(&k, FlowState::TcpSynSent, 1), 0);
        assert_lifetime(&t, &k, 0, d.tcp_syn_ns);
        t.on_tcp_flags(r, true, ACK, S);
        assert_eq!(t.get(r).state, FlowState::TcpEstablished);
        assert_lifetime(&t, &k, S, d.tcp_established_ns);
        t.on_tcp_flags(r, false, FIN | ACK, 2 * S);
        assert_eq!((t.get(r).state, t.get(r).flags), (FlowState::TcpClosing, FlowEntry::FIN_FROM_BACKEND));
        assert_lifetime(&t, &k, 2 * S, d.tcp_closing_ns);
        // The last ACK of the close keeps it closing.
        t.on_tcp_flags(r, true, ACK, 3 * S);
        assert_lifetime(&t, &k, 3 * S, d.tcp_closing_ns);
        // Port reuse: a new SYN from the client starts over.
        t.on_tcp_flags(r, true, SYN, 4 * S);
        assert_eq!((t.get(r).state, t.get(r).flags), (FlowState::TcpSynSent, 0));
        assert_lifetime(&t, &k, 4 * S, d.tcp_syn_ns);
        // RST: the short timeout.
        t.on_tcp_flags(r, false, RST, 5 * S);
        assert_lifetime(&t, &k, 5 * S, d.tcp_reset_ns);
        // Re-SYN after a reset.
        t.on_tcp_flags(r, true, SYN, 6 * S);
        assert_eq!(t.get(r).state, FlowState::TcpSynSent);
        assert_lifetime(&t, &k, 6 * S, d.tcp_syn_ns);
    }

    #[test]
    fn reset_timeout_never_exceeds_closing() {
        let timeouts = FlowTimeouts { tcp_closing_ns: 4 * S, tcp_reset_ns: 10 * S, ..FlowTimeouts::default() };
        let mut t = FlowTable::with_seed(64, timeouts, 1);
        let k = key(1);
        let (r, _) = t.insert(entry(&k, FlowState::TcpEstablished, 1), 0);
        t.on_tcp_flags(r, true, RST, S);
        assert_lifetime(&t, &k, S, 4 * S);
    }

    #[test]
    fn touch_follows_a_state_set_by_hand() {
        let mut t = table(64);
        let k = key(1);
        let (r, _) = t.insert(entry(&k, FlowState::TcpSynSent, 1), 0);
        t.get_mut(r).state = FlowState::TcpEstablished;
        t.touch(r, 10 * S);
        assert_lifetime(&t, &k, 10 * S, FlowTimeouts::default().tcp_established_ns);
    }

    #[test]
    fn expired_flows_miss_and_their_slot_is_handed_back_on_reuse() {
        let mut t = table(8); // one bucket: every key competes for it
        let k = udp_key(1);
        let old = entry(&k, FlowState::Udp, 1);
        let _ = t.insert(old, 0);
        let late = 301 * S;
        assert_eq!(t.lookup(&k, late), None);
        assert_eq!(t.find(&k, late), None);
        assert_eq!(t.count_live(late), 0);
        assert_eq!(t.occupied(), 1, "expired, not handed back yet");
        let new = entry(&k, FlowState::Udp, 2);
        let (r, outcome) = t.insert(new, late);
        assert_eq!(outcome, InsertOutcome::ReusedExpired(old));
        assert!(!outcome.is_eviction());
        assert_eq!(t.occupied(), 1);
        assert_eq!(t.lookup(&k, late), Some(r));
        assert_eq!(t.get(r).backend_addr, 2);
    }

    /// Keys whose two candidate buckets are exactly `first` and `second`.
    fn keys_with_buckets(t: &FlowTable, first: usize, second: usize, n: usize) -> Vec<FlowKey> {
        (0u32..).map(key).filter(|k| t.candidate_buckets(t.hash_key(k)) == [first, second]).take(n).collect()
    }

    #[test]
    fn full_candidates_evict_the_flow_closest_to_expiry() {
        // One bucket.
        let mut t = table(8);
        for i in 0..8 {
            let _ = t.insert(entry(&key(i), FlowState::TcpEstablished, i), u64::from(i) * S);
        }
        let (r, outcome) = t.insert(entry(&key(100), FlowState::TcpEstablished, 100), 10 * S);
        assert_eq!(outcome, InsertOutcome::Evicted(entry(&key(0), FlowState::TcpEstablished, 0)));
        assert!(outcome.is_eviction());
        assert_eq!(t.get(r).backend_addr, 100);
        assert_eq!(t.find(&key(0), 10 * S), None);
        for i in (1..8).chain([100]) {
            assert!(t.find(&key(i), 10 * S).is_some(), "flow {i}");
        }
        assert_eq!(t.occupied(), 8);

        // The oldest flow is kept when it expires later: a half-open flow seen
        // after it goes first (what a SYN flood meets).
        let (r, _) = t.insert(entry(&key(200), FlowState::TcpSynSent, 200), 11 * S);
        let (_, outcome) = t.insert(entry(&key(201), FlowState::TcpEstablished, 201), 12 * S);
        assert_eq!(outcome.displaced().map(|e| e.backend_addr), Some(200));
        // The evicted flow's handle now names the flow that took its slot.
        assert_eq!(t.get(r).backend_addr, 201);

        // Two buckets: all sixteen candidates of the key compete.
        let mut t = table(16);
        let keys = keys_with_buckets(&t, 0, 1, 17);
        assert_eq!(keys.len(), 17);
        for (i, k) in keys[..16].iter().enumerate() {
            let (_, outcome) = t.insert(entry(k, FlowState::TcpEstablished, i as u32), S);
            assert_eq!(outcome, InsertOutcome::Vacant);
        }
        // Refreshed in an order unrelated to slots: key 5 is seen first.
        for j in 0..16u64 {
            let i = (j * 7 + 5) % 16;
            assert!(t.lookup(&keys[i as usize], (10 + j) * S).is_some());
        }
        let (_, outcome) = t.insert(entry(&keys[16], FlowState::TcpEstablished, 16), 30 * S);
        assert_eq!(outcome.displaced().map(|e| e.backend_addr), Some(5));
        assert!(outcome.is_eviction());
    }

    #[test]
    fn half_open_inserts_evict_only_half_open_flows() {
        let mut t = table(8);
        let half = |t: &mut FlowTable, i: u32, now: u64| {
            let k = key(i);
            let h = t.hash_key(&k);
            t.insert_half_open_hashed(entry(&k, FlowState::TcpSynSent, i), h, now)
        };
        // Idle established flows (10 s from expiry at 890 s) and a closing
        // one; half-open flows (20 s and more from it) take the free slots.
        let _ = t.insert(entry(&key(10), FlowState::TcpEstablished, 10), 0);
        let _ = t.insert(entry(&key(11), FlowState::TcpEstablished, 11), 0);
        let _ = t.insert(entry(&key(12), FlowState::TcpEstablished, 12), 0);
        for i in 0..4 {
            let (_, outcome) = half(&mut t, i, (880 + u64::from(i)) * S).expect("a free slot");
            assert_eq!(outcome, InsertOutcome::Vacant);
        }
        let _ = t.insert(entry(&key(13), FlowState::TcpClosing, 13), 885 * S);
        // The half-open flow closest to expiry makes way, not the others.
        let now = 890 * S;
        let (r, outcome) = half(&mut t, 100, now).expect("a half-open victim");
        assert!(outcome.is_eviction());
        assert_eq!(outcome.displaced().map(|e| e.backend_addr), Some(0), "the oldest half-open flow");
        assert_eq!(t.get(r).backend_addr, 100);
        for i in 10..14 {
            assert!(t.find(&key(i), now).is_some(), "flow {i}");
        }
        // Only flows past their handshake left: refused, nothing changed.
        let mut t = table(8);
        for i in 0..8 {
            let _ = t.insert(entry(&key(i), FlowState::TcpEstablished, i), 0);
        }
        assert_eq!(half(&mut t, 100, 890 * S), None);
        assert_eq!(t.find(&key(100), 890 * S), None);
        for i in 0..8 {
            assert!(t.find(&key(i), 890 * S).is_some(), "flow {i}");
        }
        // The same insert for an established flow evicts the oldest.
        let (_, outcome) = t.insert(entry(&key(100), FlowState::TcpEstablished, 100), 890 * S);
        assert!(outcome.is_eviction());
    }

    #[test]
    fn full_candidates_reuse_an_expired_slot_before_evicting() {
        let mut t = table(8);
        let _ = t.insert(entry(&key(0), FlowState::TcpSynSent, 0), 0); // expires after 30 s
        for i in 1..8 {
            let _ = t.insert(entry(&key(i), FlowState::TcpEstablished, i), S);
        }
        let (_, outcome) = t.insert(entry(&key(100), FlowState::TcpEstablished, 100), 40 * S);
        assert_eq!(outcome, InsertOutcome::ReusedExpired(entry(&key(0), FlowState::TcpSynSent, 0)));
        assert_eq!(t.count_live(40 * S), 8);
    }

    #[test]
    fn new_flows_are_always_inserted() {
        let mut t = table(64);
        let mut evicted = 0;
        for i in 0..1000 {
            let k = key(i);
            let (r, outcome) = t.insert(entry(&k, FlowState::TcpEstablished, i), S);
            evicted += usize::from(outcome.is_eviction());
            assert_eq!(t.find(&k, S), Some(r));
            assert_eq!(t.get(r).backend_addr, i);
            assert!(t.occupied() <= t.capacity());
        }
        assert_eq!(t.occupied(), 64);
        assert_eq!(t.count_live(S), 64);
        assert_eq!(evicted, 1000 - 64);
    }

    #[test]
    fn a_failed_search_backs_off() {
        // Two buckets: every key's candidates are both of them (or one), so
        // once they are full no move can help.
        let mut t = table(16);
        let mut next = 0;
        while t.occupied() < 16 {
            let _ = t.insert(entry(&key(next), FlowState::TcpEstablished, next), 0);
            next += 1;
        }
        assert_eq!(t.backoff, 0);
        let _ = t.insert(entry(&key(next), FlowState::TcpEstablished, next), 0);
        assert_eq!(t.backoff, DISPLACEMENT_BACKOFF);
        let _ = t.insert(entry(&key(next + 1), FlowState::TcpEstablished, next), 0);
        assert_eq!(t.backoff, DISPLACEMENT_BACKOFF - 1);
    }

    #[test]
    fn expire_some_sweeps_incrementally() {
        let mut t = table(1024);
        for i in 0..100 {
            let state = if i & 1 == 0 { FlowState::TcpSynSent } else { FlowState::TcpEstablished };
            let _ = t.insert(entry(&key(i), state, i), 0);
        }
        let now = 31 * S; // SYN sent flows have expired.
        assert_eq!(t.count_live(now), 50);
        let mut handed = Vec::new();
        let mut visits = 0;
        while visits < t.capacity() {
            let freed = t.expire_some(now, 100, |e| handed.push(e.backend_addr));
            assert!(freed <= 100);
            visits += 100;
        }
        handed.sort_unstable();
        assert_eq!(handed, (0..100).step_by(2).collect::<Vec<_>>());
        assert_eq!(t.occupied(), 50);
        assert_eq!(t.count_live(now), 50);
        // A second pass finds nothing; live flows are untouched.
        assert_eq!(t.expire_some(now, usize::MAX, |_| panic!("nothing left to expire")), 0);
        for i in (1..100).step_by(2) {
            assert!(t.find(&key(i), now).is_some());
        }
    }

    #[test]
    fn the_coarse_clock_wraps() {
        // The coarse clock wraps when `now` crosses 2^52 ns (about 52 days).
        let wrap = 1u64 << (32 + TIME_UNIT_SHIFT);
        let t0 = wrap - 10 * S;
        assert_eq!((coarse(wrap - 1), coarse(wrap)), (u32::MAX, 0));
        assert!(coarse(t0) > u32::MAX - 10_000, "t0 is 10 s (about 9537 units) before the wrap");
        let mut t = table(64);
        let k = udp_key(1);
        let (r, _) = t.insert(entry(&k, FlowState::Udp, 1), t0);
        assert_lifetime(&t, &k, t0, 300 * S);
        // A refresh before the wrap, checked after it; and the other way.
        assert_eq!(t.lookup(&k, t0 + 5 * S), Some(r));
        assert_lifetime(&t, &k, t0 + 5 * S, 300 * S);
        assert_eq!(t.lookup(&k, wrap + 5 * S), Some(r));
        assert_lifetime(&t, &k, wrap + 5 * S, 300 * S);
        // The sweep after the wrap clears it.
        assert_eq!(t.expire_some(wrap + 400 * S, 64, |_| {}), 1);
        assert_eq!(t.occupied(), 0);
    }

    #[test]
    fn expired_flows_stay_expired_until_the_clock_comes_round() {
        const DAY: u64 = 86_400 * S;
        let mut t = table(64);
        let k = udp_key(1);
        let _ = t.insert(entry(&k, FlowState::Udp, 1), 0);
        for day in [1, 10, 25, 27, 30, 40, 50] {
            assert!(t.find(&k, day * DAY).is_none(), "day {day}");
        }
        // The documented limit: an entry never swept reappears once the
        // coarse clock comes round (2^32 units, about 52 days, after its
        // expiry)...
        let round = 1u64 << (32 + TIME_UNIT_SHIFT);
        assert!(t.find(&k, round + 100 * S).is_some());
        // ... which any sweep in between prevents.
        assert_eq!(t.expire_some(50 * DAY, 64, |_| {}), 1);
        assert!(t.find(&k, round + 100 * S).is_none());
    }

    #[test]
    fn huge_timeouts_are_capped() {
        let timeouts = FlowTimeouts { udp_ns: u64::MAX, ..FlowTimeouts::default() };
        let mut t = FlowTable::with_seed(8, timeouts, 1);
        assert_eq!(t.horizon, MAX_LIFETIME_UNITS);
        let k = udp_key(1);
        let _ = t.insert(entry(&k, FlowState::Udp, 1), 0);
        assert!(t.find(&k, 20 * 86_400 * S).is_some());
        assert!(t.find(&k, (u64::from(MAX_LIFETIME_UNITS) + 1) << TIME_UNIT_SHIFT).is_none());
    }

    /// Millions of lookups, inserts, removals, state changes and sweeps on a
    /// table far smaller than the key space: the storage never moves or
    /// grows, and the table never holds more than its capacity.
    #[test]
    fn memory_never_moves_or_grows() {
        const OPS: u64 = 10_000_000;
        let timeouts =
            FlowTimeouts { tcp_syn_ns: 5 * S, tcp_established_ns: 90 * S, tcp_closing_ns: 10 * S, ..model_timeouts() };
        let mut t = FlowTable::with_seed(4096, timeouts, 42);
        let (buckets, entries) = (t.buckets.as_ptr(), t.entries.as_ptr());
        let (bucket_len, entry_len) = (t.buckets.len(), t.entries.len());
        let mut next = rng(7);
        let mut now = 0u64;
        let mut evicted = 0u64;
        let (mut removed, mut expired) = (0u64, 0);
        for op in 0..OPS {
            let r = next();
            // Quiet phases, 4 ms between packets on average: each of 8192
            // keys comes back about every 30 s, so flows expire, get swept
            // and reused. Busy phases, 0.25 ms: twice as many flows are live
            // as the table holds.
            now += r % if (op >> 20) & 1 == 0 { 8_000_000 } else { 500_000 };
            let k = FlowKey { src_port: (r >> 32) as u16 % 8192, ..key(0) };
            match t.lookup(&k, now) {
                Some(f) if r >> 60 == 0 => {
                    t.remove(f).unwrap();
                    removed += 1;
                }
                Some(f) => {
                    t.on_tcp_flags(f, r & 1 == 0, [ACK, ACK, ACK, ACK, ACK, SYN, FIN, RST][(r >> 8) as usize & 7], now)
                }
                None => {
                    let (_, outcome) = t.insert(entry(&k, FlowState::of_first_packet(TCP, SYN), op as u32), now);
                    evicted += u64::from(outcome.is_eviction());
                }
            }
            if op % 1024 == 0 {
                expired += t.expire_some(now, 256, |_| {});
                assert!(t.occupied() <= t.capacity());
            }
        }
        assert_eq!((t.buckets.as_ptr(), t.entries.as_ptr()), (buckets, entries));
        assert_eq!((t.buckets.len(), t.entries.len()), (bucket_len, entry_len));
        assert!(t.occupied() <= t.capacity());
        println!("{OPS} operations: {evicted} evicted, {removed} removed, {expired} swept; {} occupied", t.occupied());
        assert!(evicted > 0 && removed > 0 && expired > 0, "every way out was taken");
    }

    /// How full the table gets with random keys before the first live flow
    /// is evicted. The design target is 90%; about 97% is typical.
    #[test]
    fn load_factor_before_the_first_eviction() {
        let capacity = if cfg!(debug_assertions) { 1 << 16 } else { DEFAULT_CAPACITY };
        for seed in 1..=3 {
            let mut t = FlowTable::with_seed(capacity, FlowTimeouts::default(), seed);
            let mut next = rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut inserts = 0u32;
            loop {
                let (_, outcome) = t.insert(entry(&random_key(next()), FlowState::TcpEstablished, inserts), S);
                if outcome.is_eviction() {
                    break;
                }
                inserts += 1;
            }
            let load = t.count_live(S) as f64 / t.capacity() as f64;
            println!("capacity {capacity}, seed {seed}: first eviction at {:.2}% load", load * 100.0);
            assert!(load >= 0.90, "first eviction at {load}");
        }
    }

    #[test]
    fn default_capacity_holds_a_million_flows() {
        if cfg!(debug_assertions) {
            return; // a million inserts: release builds only
        }
        let mut t = FlowTable::new(DEFAULT_CAPACITY, FlowTimeouts::default());
        let mut next = rng(99);
        let mut keys = HashSet::new();
        while keys.len() < 1_000_000 {
            let k = random_key(next());
            if keys.insert(k) {
                let (_, outcome) = t.insert(entry(&k, FlowState::TcpEstablished, 0), S);
                assert!(!outcome.is_eviction(), "eviction after {} flows", keys.len());
            }
        }
        assert_eq!(t.count_live(S), 1_000_000);
    }

    // ---- Model-based tests ----

    const KEYS: u32 = 12;

    fn model_key(i: u32) -> FlowKey {
        if i & 1 == 0 { key(i) } else { udp_key(i) }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert { key: u32, state: FlowState },
        Lookup(u32),
        Find(u32),
        Flags { key: u32, from_client: bool, flags: u16 },
        SetState { key: u32, state: FlowState },
        Remove(u32),
        Advance(u64),
        Sweep(usize),
    }

    fn state() -> impl Strategy<Value = FlowState> {
        prop_oneof![
            Just(FlowState::TcpSynSent),
            Just(FlowState::TcpEstablished),
            Just(FlowState::TcpClosing),
            Just(FlowState::Udp)
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        let k = 0..KEYS;
        let flags = prop::sample::select(vec![SYN, SYN | ACK, ACK, ACK | PSH, FIN | ACK, RST, RST | ACK]);
        prop_oneof![
            4 => (k.clone(), state()).prop_map(|(key, state)| Op::Insert { key, state }),
            4 => k.clone().prop_map(Op::Lookup),
            1 => k.clone().prop_map(Op::Find),
            3 => (k.clone(), any::<bool>(), flags).prop_map(|(key, from_client, flags)| Op::Flags { key, from_client, flags }),
            1 => (k.clone(), state()).prop_map(|(key, state)| Op::SetState { key, state }),
            1 => k.prop_map(Op::Remove),
            // Sub-unit steps probe the boundaries; long ones cross timeouts.
            2 => (0..2 * UNIT).prop_map(Op::Advance),
            2 => (0..3 * S).prop_map(Op::Advance),
            1 => (0..12 * S).prop_map(Op::Advance),
            1 => (0usize..300).prop_map(Op::Sweep),
        ]
    }

    /// Model timeouts: short, so that sequences cross them often.
    fn model_timeouts() -> FlowTimeouts {
        FlowTimeouts {
            tcp_syn_ns: 2 * S,
            tcp_established_ns: 9 * S,
            tcp_closing_ns: 4 * S,
            tcp_reset_ns: S,
            udp_ns: 6 * S,
        }
    }

    /// The reference: every entry the table still holds (live or expired,
    /// not yet handed back), by identity, with its expiry computed as the
    /// module documentation specifies, in a clock that never wraps.
    struct Model {
        timeouts: FlowTimeouts,
        held: HashMap<u32, (FlowEntry, u64)>,
    }

    impl Model {
        fn expiry(&self, e: &FlowEntry, now: u64) -> u64 {
            let t = &self.timeouts;
            let timeout = match e.state {
                FlowState::TcpSynSent => t.tcp_syn_ns,
                FlowState::TcpEstablished => t.tcp_established_ns,
                FlowState::TcpClosing if e.flags & FlowEntry::RESET != 0 => t.tcp_reset_ns.min(t.tcp_closing_ns),
                FlowState::TcpClosing => t.tcp_closing_ns,
                FlowState::Udp => t.udp_ns,
            };
            (now >> TIME_UNIT_SHIFT) + timeout.div_ceil(UNIT) + 1
        }

        fn live(&self, key: &FlowKey, now: u64) -> Option<u32> {
            let mut found = self.held.iter().filter(|(_, (e, exp))| e.key() == *key && now >> TIME_UNIT_SHIFT < *exp);
            let id = found.next().map(|(id, _)| *id);
            assert!(found.next().is_none(), "two live entries for {key:?}");
            id
        }

        fn live_count(&self, now: u64) -> usize {
            self.held.values().filter(|(_, exp)| now >> TIME_UNIT_SHIFT < *exp).count()
        }

        fn refresh(&mut self, id: u32, now: u64) {
            let e = self.held[&id].0;
            let expiry = self.expiry(&e, now);
            self.held.get_mut(&id).unwrap().1 = expiry;
        }

        /// An entry the table handed back as expired: the model must hold it
        /// and agree it expired.
        fn take_expired(&mut self, e: &FlowEntry, now: u64) -> Result<(), TestCaseError> {
            let id = e.backend_addr;
            let (held, exp) = self.held.remove(&id).ok_or_else(|| TestCaseError::fail(format!("unknown {e:?}")))?;
            prop_assert_eq!(held, *e);
            prop_assert!(now >> TIME_UNIT_SHIFT >= exp, "{:?} handed back while live", e);
            Ok(())
        }
    }

    fn start_time() -> impl Strategy<Value = u64> {
        let wrap = 1u64 << (32 + TIME_UNIT_SHIFT);
        prop_oneof![Just(0), wrap - 20 * S..wrap + 20 * S, 0..1u64 << 60]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// With room for every key, the table behaves exactly like a hash map
        /// with the documented timeouts, across the coarse clock's wrap.
        #[test]
        fn matches_a_hash_map_model(start in start_time(), ops in prop::collection::vec(op(), 1..200), seed in any::<u64>()) {
            let timeouts = model_timeouts();
            let mut t = FlowTable::with_seed(256, timeouts, seed);
            let mut m = Model { timeouts, held: HashMap::new() };
            let mut now = start;
            let mut next_id = 0u32;
            for op in ops {
                match op {
                    Op::Insert { key, state } => {
                        let k = model_key(key);
                        let e = entry(&k, state, next_id);
                        next_id += 1;
                        let (r, outcome) = t.insert(e, now);
                        match (m.live(&k, now), outcome) {
                            (Some(old), InsertOutcome::Replaced(got)) => {
                                prop_assert_eq!(got, m.held.remove(&old).unwrap().0);
                            }
                            (None, InsertOutcome::Vacant) => {}
                            (None, InsertOutcome::ReusedExpired(got)) => m.take_expired(&got, now)?,
                            (want, got) => prop_assert!(false, "live {:?}, outcome {:?}", want, got),
                        }
                        prop_assert_eq!(*t.get(r), e);
                        let expiry = m.expiry(&e, now);
                        m.held.insert(e.backend_addr, (e, expiry));
                    }
                    Op::Lookup(key) | Op::Find(key) => {
                        let k = model_key(key);
                        let got = if matches!(op, Op::Lookup(_)) { t.lookup(&k, now) } else { t.find(&k, now) };
                        let want = m.live(&k, now);
                        prop_assert_eq!(got.map(|r| t.get(r).backend_addr), want);
                        if let (Op::Lookup(_), Some(id)) = (&op, want) {
                            m.refresh(id, now);
                        }
                    }
                    Op::Flags { key, from_client, flags } => {
                        let k = model_key(key);
                        let want = m.live(&k, now);
                        let got = t.lookup(&k, now);
                        prop_assert_eq!(got.map(|r| t.get(r).backend_addr), want);
                        if let (Some(r), Some(id)) = (got, want) {
                            t.on_tcp_flags(r, from_client, flags, now);
                            let e = &mut m.held.get_mut(&id).unwrap().0;
                            (e.state, e.flags) = tcp_transition(e.state, e.flags, from_client, flags);
                            m.refresh(id, now);
                            prop_assert_eq!(*t.get(r), m.held[&id].0);
                        }
                    }
                    Op::SetState { key, state } => {
                        let k = model_key(key);
                        if let (Some(r), Some(id)) = (t.lookup(&k, now), m.live(&k, now)) {
                            t.get_mut(r).state = state;
                            t.touch(r, now);
                            m.held.get_mut(&id).unwrap().0.state = state;
                            m.refresh(id, now);
                        }
                    }
                    Op::Remove(key) => {
                        let k = model_key(key);
                        let want = m.live(&k, now).map(|id| m.held.remove(&id).unwrap().0);
                        let got = t.lookup(&k, now).and_then(|r| t.remove(r));
                        prop_assert_eq!(got, want);
                    }
                    Op::Advance(dt) => now += dt,
                    Op::Sweep(budget) => {
                        let mut handed = Vec::new();
                        let cleared = t.expire_some(now, budget, |e| handed.push(*e));
                        prop_assert_eq!(cleared, handed.len());
                        for e in &handed {
                            m.take_expired(e, now)?;
                        }
                    }
                }
                prop_assert_eq!(t.occupied(), m.held.len());
                prop_assert_eq!(t.count_live(now), m.live_count(now));
            }
        }

        /// Tables too small for their keys: every insert lands, capacity is
        /// never exceeded, every entry leaves exactly once (handed back by
        /// an insert, a removal or a sweep), and an evicted entry is always
        /// a live candidate with the nearest expiry.
        #[test]
        fn small_tables_account_for_every_entry(
            capacity in 1usize..48,
            ops in prop::collection::vec((0u32..200, 0u8..8, 0..2 * S), 1..400),
            seed in any::<u64>(),
        ) {
            let mut t = FlowTable::with_seed(capacity, model_timeouts(), seed);
            let mut held: HashMap<u32, FlowKey> = HashMap::new();
            let mut now = 0;
            for (id, (k, action, dt)) in ops.into_iter().enumerate() {
                // Identities start at 1: vacant slots hold zeros.
                let id = id as u32 + 1;
                now += dt;
                let k = model_key(k);
                match action {
                    0 => {
                        if let Some(r) = t.lookup(&k, now) {
                            let e = t.remove(r).unwrap();
                            prop_assert_eq!(held.remove(&e.backend_addr), Some(k));
                        }
                    }
                    1 => {
                        for e in sweep(&mut t, now) {
                            prop_assert!(held.remove(&e.backend_addr).is_some());
                        }
                    }
                    _ => {
                        let state = FlowState::of_first_packet(k.protocol, [SYN, ACK][usize::from(action & 1)]);
                        let e = entry(&k, state, id);
                        // The candidates' expiries before the insert, to check
                        // the eviction choice.
                        let cands = t.candidate_buckets(t.hash_key(&k));
                        let before: Vec<(u32, u32)> = cands
                            .iter()
                            .flat_map(|&b| (0..SLOTS_PER_BUCKET).map(move |i| (b, i)))
                            .map(|(b, i)| (t.entries[b * SLOTS_PER_BUCKET + i].backend_addr, t.buckets[b].expiry[i]))
                            .collect();
                        let (r, outcome) = t.insert(e, now);
                        prop_assert_eq!(*t.get(r), e);
                        prop_assert_eq!(t.find(&k, now), Some(r));
                        if let Some(gone) = outcome.displaced() {
                            prop_assert!(held.remove(&gone.backend_addr).is_some());
                        }
                        if let InsertOutcome::Evicted(gone) = outcome {
                            let c = coarse(now);
                            let nearest = before.iter().map(|&(_, exp)| exp.wrapping_sub(c)).min().unwrap();
                            let victim = before.iter().find(|&&(id, _)| id == gone.backend_addr).unwrap();
                            prop_assert!(is_live(victim.1, c, t.horizon));
                            prop_assert_eq!(victim.1.wrapping_sub(c), nearest);
                        }
                        held.insert(id, k);
                    }
                }
                prop_assert!(t.occupied() <= t.capacity());
                prop_assert_eq!(t.occupied(), held.len());
            }
            // Everything left is handed back by sweeps once it expires.
            let later = now + 100 * S;
            for e in sweep(&mut t, later) {
                prop_assert!(held.remove(&e.backend_addr).is_some());
            }
            prop_assert!(held.is_empty());
            prop_assert_eq!(t.occupied(), 0);
        }
    }

    fn sweep(t: &mut FlowTable, now: u64) -> Vec<FlowEntry> {
        let mut handed = Vec::new();
        t.expire_some(now, t.capacity(), |e| handed.push(*e));
        handed
    }
}

#[cfg(test)]
mod tests6;
