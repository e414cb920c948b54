//! Admission of new flows: a service's limit on new flows per client source.
//!
//! Owns: [`NewFlowLimit`] (what the operator configures, with its bounds),
//! [`SourceLimit`] (its compiled form, in the snapshot's service),
//! [`NewFlowLimiter`] (one worker's bounded, approximate record of the new
//! flows each client source recently opened to each service), and what
//! counts as the first packet of a new flow ([`starts_flow`]). Must not:
//! allocate, lock, make a system call, log or read a clock per packet (time
//! comes in as `now`, nanoseconds, monotonic); keep state per source (the
//! memory is fixed when the limiter is made); read packet bytes (the
//! pipeline passes the flow's key).
//!
//! # The limit
//!
//! A source is a client address masked to the service's prefix length
//! (`/32` unless configured), so a `/24` counts a whole subnet as one
//! client. Each source may open `burst` new flows at once and `per_second`
//! new flows a second after that: a token bucket, run as the generic cell
//! rate algorithm (GCRA). Each source keeps a "theoretical arrival time"
//! (TAT): a new flow at `now` is admitted when `TAT - now <= tolerance`,
//! and then moves the TAT to `max(TAT, now) + interval`, where `interval`
//! is the time one flow costs and `tolerance = (burst - 1) * interval`.
//! Refused flows do not move it, so a source over its limit still gets
//! exactly its rate through. Decay is continuous: the TAT simply falls
//! behind `now`; there are no windows to rotate and nothing to sweep.
//!
//! # Workers
//!
//! Each worker has its own limiter and sees only the flows it owns; a
//! client's flows are spread evenly over the workers by its source port
//! (see [`crate::pipeline::client_owner`]). So each worker admits
//! `per_second / workers` a second from a source (together, the configured
//! rate), but the whole `burst` at once: a client within its burst is never
//! refused for how its flows happened to fall on the workers, and at worst
//! a source opens `workers * burst` flows at once.
//!
//! # The approximation
//!
//! There is no table of sources. A count-min sketch of [`DEPTH`] rows of
//! `width` cells holds TATs: a key (source, service VIP, port, protocol)
//! picks one cell per row by a keyed hash, its TAT is the least of its
//! cells, and an admitted flow raises each of its cells to at least the
//! key's new TAT (the "conservative update": cells already ahead are left
//! alone). Memory is `DEPTH * width * 8` bytes, fixed at construction:
//! 256 KiB per worker at [`DEFAULT_WIDTH`].
//!
//! Error bounds. A cell only ever moves forward, and by every key that uses
//! it, so it is never behind the exact TAT of any key that uses it: the
//! sketch never under-counts, and never admits a source beyond
//! `burst + rate * elapsed`. It over-counts when a source shares every one
//! of its cells with busier keys. A legitimate client whose `DEPTH` cells
//! are all shared with flooders held at their limit is refused as if it
//! were one of them, and admitted again as soon as one of its cells falls
//! back. With `K` sources at their limit on a worker, the chance that a
//! given other source shares all its cells with them is about
//! `(K / width) ^ DEPTH`: at 8192 cells a row, 1 in 70,000 with 500
//! flooding sources, 1 in 280 with 2000. The size was chosen for that: a
//! few hundred thousand cells would buy a few more thousand flooders at
//! the price of the worker's cache. A flood from very many sources each
//! under its limit (spoofed addresses) instead raises every cell a little:
//! past about `width` times the per-worker rate in new flows a second on a
//! worker, every cell stays ahead and the limit turns into a cap of about
//! that many new flows a second for the service on that worker, from
//! everyone; it then sheds the flood rather than passing it on.
//!
//! The hash is seeded at random when the limiter is made (unlike the flow
//! hash, nothing here has to agree between gateways), so nobody outside
//! can choose sources that land on a victim's cells.

use crate::hash::FlowKey;
use crate::wire::{ipv4, tcp};

/// Rows of the sketch: the cells each key is counted in.
pub const DEPTH: usize = 4;
/// Cells in each row of a pipeline's limiter.
pub const DEFAULT_WIDTH: usize = 8192;
/// Largest width: each row's index is taken from 16 bits of one hash.
pub const MAX_WIDTH: usize = 1 << 16;
/// Most new flows a second a limit may allow.
pub const MAX_PER_SECOND: u32 = 1_000_000;
/// Largest burst a limit may allow.
pub const MAX_BURST: u32 = 1_000_000;

const NS_PER_SECOND: u64 = 1_000_000_000;

/// A service's limit on new flows per client source, as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewFlowLimit {
    /// Sustained new flows a second per source, 1 to [`MAX_PER_SECOND`].
    pub per_second: u32,
    /// New flows a source may open at once, 1 to [`MAX_BURST`].
    pub burst: u32,
    /// Clients sharing this many leading address bits are one source, 0 to
    /// 32.
    pub prefix_len: u8,
}

/// Why a [`NewFlowLimit`] cannot be used. The text is the reason; the
/// field it concerns is [`NewFlowLimitError::field`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NewFlowLimitError {
    /// `per_second` out of bounds.
    #[error("{0} is not from 1 to {MAX_PER_SECOND}")]
    PerSecond(i64),
    /// `burst` out of bounds.
    #[error("{0} is not from 1 to {MAX_BURST}")]
    Burst(i64),
    /// `prefix_len` out of bounds.
    #[error("{0} is not a prefix length from 0 to 32")]
    PrefixLen(i64),
}

impl NewFlowLimitError {
    /// The field the error is about: `per_second`, `burst` or `prefix_len`.
    pub fn field(&self) -> &'static str {
        match self {
            NewFlowLimitError::PerSecond(_) => "per_second",
            NewFlowLimitError::Burst(_) => "burst",
            NewFlowLimitError::PrefixLen(_) => "prefix_len",
        }
    }
}

impl NewFlowLimit {
    /// A limit from the values a configuration gives (wider than the
    /// fields, so that no value is cut before it is checked): `burst`
    /// defaults to `per_second` (one second's worth), `prefix_len` to 32.
    pub fn checked(per_second: i64, burst: Option<i64>, prefix_len: Option<i64>) -> Result<Self, NewFlowLimitError> {
        let per_second = u32::try_from(per_second).map_err(|_| NewFlowLimitError::PerSecond(per_second))?;
        let burst = match burst {
            None => per_second,
            Some(b) => u32::try_from(b).map_err(|_| NewFlowLimitError::Burst(b))?,
        };
        let prefix_len = match prefix_len {
            None => 32,
            Some(p) => u8::try_from(p).map_err(|_| NewFlowLimitError::PrefixLen(p))?,
        };
        let limit = NewFlowLimit { per_second, burst, prefix_len };
        limit.validate()?;
        Ok(limit)
    }

    /// Checks every field's bounds.
    pub fn validate(&self) -> Result<(), NewFlowLimitError> {
        if !(1..=MAX_PER_SECOND).contains(&self.per_second) {
            return Err(NewFlowLimitError::PerSecond(self.per_second.into()));
        }
        if !(1..=MAX_BURST).contains(&self.burst) {
            return Err(NewFlowLimitError::Burst(self.burst.into()));
        }
        if self.prefix_len > 32 {
            return Err(NewFlowLimitError::PrefixLen(self.prefix_len.into()));
        }
        Ok(())
    }
}

/// A [`NewFlowLimit`] compiled for the packet path: no division and no
/// shift by a variable amount left to do per packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceLimit {
    /// Applied to the client address to get its source.
    pub mask: u32,
    /// Time one new flow costs a source on a single worker, in ns.
    pub interval_ns: u64,
    /// Flows beyond the first a source may open at once.
    pub extra_burst: u64,
}

impl SourceLimit {
    /// The compiled form of a valid `limit`.
    pub fn new(limit: &NewFlowLimit) -> Self {
        let mask = crate::route::Route::mask(limit.prefix_len);
        SourceLimit {
            mask,
            // Rounded up: never more than the configured rate.
            interval_ns: NS_PER_SECOND.div_ceil(u64::from(limit.per_second.max(1))),
            extra_burst: u64::from(limit.burst.max(1) - 1),
        }
    }
}

/// Whether a client packet with no tracked flow starts a new one: a TCP
/// SYN without ACK, or any UDP datagram. A TCP segment without SYN is a
/// flow picked up mid-stream (another gateway's, after a failover) and is
/// not counted.
#[inline(always)]
#[must_use]
pub fn starts_flow(protocol: u8, tcp_flags: u16) -> bool {
    protocol != ipv4::protocol::TCP || tcp_flags & (tcp::flags::SYN | tcp::flags::ACK) == tcp::flags::SYN
}

/// One worker's record of recent new flows per source and service: a
/// count-min sketch of GCRA arrival times (see the module's description).
#[derive(Clone)]
pub struct NewFlowLimiter {
    /// `DEPTH` rows of `width` cells, row after row: theoretical arrival
    /// times, ns.
    cells: Box<[u64]>,
    /// `width - 1` (the width is a power of two).
    index_mask: u64,
    /// Cells a row.
    width: usize,
    hasher: ahash::RandomState,
}

impl std::fmt::Debug for NewFlowLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The seed stays out of logs.
        f.debug_struct("NewFlowLimiter").field("depth", &DEPTH).field("width", &self.width).finish_non_exhaustive()
    }
}

impl NewFlowLimiter {
    /// A limiter of `width` cells a row (rounded up to a power of two, 2
    /// to [`MAX_WIDTH`]), its hash seeded at random.
    pub fn new(width: usize) -> Self {
        Self::with_hasher(width, ahash::RandomState::new())
    }

    /// [`NewFlowLimiter::new`] with a fixed seed, for tests that must be
    /// repeatable.
    pub fn with_seed(width: usize, seed: u64) -> Self {
        Self::with_hasher(width, ahash::RandomState::with_seeds(seed, !seed, seed.rotate_left(32), 0x5eed))
    }

    fn with_hasher(width: usize, hasher: ahash::RandomState) -> Self {
        let width = width.clamp(2, MAX_WIDTH).next_power_of_two();
        NewFlowLimiter {
            cells: vec![0; DEPTH * width].into_boxed_slice(),
            index_mask: (width - 1) as u64,
            width,
            hasher,
        }
    }

    /// Cells a row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Bytes of the sketch.
    pub fn memory_bytes(&self) -> usize {
        self.cells.len() * std::mem::size_of::<u64>()
    }

    /// Whether the packet of a client flow with no tracked flow, `key` to a
    /// service limited by `limit`, may start one, on a worker of `workers`.
    /// Packets that do not start a flow ([`starts_flow`]) always may and
    /// are not counted; a new flow that may is counted.
    #[inline]
    pub fn admit(&mut self, limit: &SourceLimit, key: &FlowKey, tcp_flags: u16, workers: u16, now: u64) -> bool {
        !starts_flow(key.protocol, tcp_flags) || self.admit_new(limit, key, workers, now)
    }

    /// Counts one new flow of `key`'s source to `key`'s service, if its
    /// limit allows it; false (nothing counted) if not.
    #[inline]
    pub fn admit_new(&mut self, limit: &SourceLimit, key: &FlowKey, workers: u16, now: u64) -> bool {
        let interval = limit.interval_ns.saturating_mul(u64::from(workers.max(1)));
        let tolerance = interval.saturating_mul(limit.extra_burst);
        let slots = self.slots(limit, key);
        let tat = slots.iter().map(|&i| self.cells[i]).min().unwrap_or(0);
        let base = tat.max(now);
        if base - now > tolerance {
            return false;
        }
        let next = base.saturating_add(interval);
        for i in slots {
            let c = &mut self.cells[i];
            *c = (*c).max(next);
        }
        true
    }

    /// The estimated theoretical arrival time of `key`'s source at its
    /// service (ns; at most `now` when it has opened nothing lately).
    pub fn estimate(&self, limit: &SourceLimit, key: &FlowKey) -> u64 {
        self.slots(limit, key).iter().map(|&i| self.cells[i]).min().unwrap_or(0)
    }

    /// The cell of each row for `key`'s source and service.
    #[inline(always)]
    fn slots(&self, limit: &SourceLimit, key: &FlowKey) -> [usize; DEPTH] {
        let source = u64::from(key.src_addr & limit.mask);
        let service = (u64::from(key.dst_addr) << 24) | (u64::from(key.dst_port) << 8) | u64::from(key.protocol);
        let h = self.hasher.hash_one((u128::from(source) << 64) | u128::from(service));
        let width = self.width;
        std::array::from_fn(|row| row * width + ((h >> (16 * row)) & self.index_mask) as usize)
    }
}

#[cfg(test)]
mod tests;
