//! IPv4 fragments of translated traffic: what each worker remembers about a
//! datagram between its fragments.
//!
//! Only a datagram's first fragment carries the TCP or UDP ports, so only it
//! can be matched to a service, a flow or a reply. The worker that
//! translates it records the translation here, keyed by what every fragment
//! of the datagram carries: source, destination, IP identification and
//! protocol (RFC 791). The later fragments look it up and get the same
//! addresses, MACs and egress port, so the whole datagram reaches the
//! backend (or the client) that its first fragment reached. vipgate never
//! reassembles: the end host does.
//!
//! Fragments that arrive before their first are copied into a small store
//! ([`HeldFragments`]) and sent once the first is translated, within a bound
//! of count and bytes; over it they are dropped and counted, and what waits
//! longer than the timeout is discarded and counted.
//!
//! Both structures are fixed in size when the pipeline is built: the packet
//! path allocates nothing here. The table's hash is keyed with a seed an
//! attacker cannot predict, and an insertion probes a bounded window, so a
//! flood of first fragments fills the table (and is counted) without making
//! any operation slower.

use crate::wire::{ethernet, ipv4};

/// Entries in a worker's fragment table by default: datagrams whose first
/// fragment was translated and whose later fragments may still come.
pub const DEFAULT_ENTRIES: usize = 4096;
/// How long a datagram's translation (unless all its fragments pass
/// sooner), or a fragment waiting for its first, is kept: 5 seconds. Fragments of one datagram leave the sender together;
/// Linux waits 30 s to reassemble, but a gateway remembering that long would
/// let a slow flood fill its table.
pub const DEFAULT_TIMEOUT_NS: u64 = 5_000_000_000;
/// Fragments a worker holds while their first fragment has not come.
pub const HELD_FRAGMENTS: usize = 64;
/// Bytes (whole frames) a worker holds while their first fragment has not
/// come: a few reversed datagrams of an ordinary size.
pub const HELD_BYTES: usize = 128 * 1024;
/// The largest frame a held fragment may be: a 9000-byte MTU, its Ethernet
/// header and a VLAN tag.
pub const HELD_FRAME: usize = 9000 + ethernet::HEADER_LEN + 4;
/// Headroom in front of each held frame, for the outer header direct server
/// return prepends.
pub const HELD_HEADROOM: usize = ipv4::MIN_HEADER_LEN;
/// Slots an insertion or a lookup visits, from the key's home slot on.
const PROBE: usize = 8;

/// What every fragment of a datagram carries (RFC 791, section 3.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    /// Source address.
    pub src: u32,
    /// Destination address.
    pub dst: u32,
    /// IP identification.
    pub id: u16,
    /// IP protocol.
    pub protocol: u8,
}

/// How the worker that translated a datagram's first fragment rewrote it,
/// so that every later fragment is rewritten the same way (no L4 header to
/// touch: the first fragment carried it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentRewrite {
    /// Egress port (dense index).
    pub out: u16,
    /// Destination MAC, then source MAC.
    pub macs: [u8; 12],
    /// The datagram's new source and destination (the inner packet's, for
    /// direct server return).
    pub src: u32,
    /// See `src`.
    pub dst: u32,
    /// Direct server return: the outer header's source and destination.
    pub tunnel: Option<(u32, u32)>,
    /// Towards a backend (`nat_forward`), not back to a client
    /// (`nat_reverse`).
    pub forward: bool,
}

/// A translation made on one worker for fragments another worker receives
/// (see *Fragments* in docs/architecture.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentNote {
    /// The datagram.
    pub key: FragmentKey,
    /// Its rewrite.
    pub rewrite: FragmentRewrite,
    /// Payload bytes of its first fragment.
    pub first_len: u32,
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    key: FragmentKey,
    /// When the entry lapses; 0 for a free slot.
    expires: u64,
    rewrite: FragmentRewrite,
    /// Payload bytes of the datagram's fragments translated so far.
    seen: u32,
    /// The datagram's payload length, once its last fragment (the one
    /// without more-fragments) was seen; 0 before.
    total: u32,
}

/// A worker's fragment table: the translations of datagrams whose later
/// fragments may still come. Fixed size, open addressing over a bounded
/// window, entries lapsing after a timeout (a lapsed slot is free).
#[derive(Debug)]
pub struct FragmentTable {
    entries: Box<[Entry]>,
    mask: usize,
    seed: u64,
    timeout: u64,
}

impl FragmentTable {
    /// A table of at least `entries` slots (rounded up to a power of two, at
    /// least `PROBE` slots), whose entries live `timeout_ns`.
    pub fn new(entries: usize, timeout_ns: u64, seed: u64) -> FragmentTable {
        let n = entries.max(PROBE).next_power_of_two();
        FragmentTable { entries: vec![Entry::default(); n].into_boxed_slice(), mask: n - 1, seed, timeout: timeout_ns }
    }

    /// Slots in the table.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Live entries at `now` (visits every slot: for tests and stats).
    pub fn live(&self, now: u64) -> usize {
        self.entries.iter().filter(|e| e.expires > now).count()
    }

    fn home(&self, key: &FragmentKey) -> usize {
        let a = (u64::from(key.src) << 32) | u64::from(key.dst);
        let b = (u64::from(key.id) << 8) | u64::from(key.protocol);
        let h = mix(a ^ self.seed) ^ mix(b ^ self.seed.rotate_left(29));
        (h as usize) & self.mask
    }

    /// The rewrite recorded for `key`, unless it lapsed.
    pub fn lookup(&self, key: &FragmentKey, now: u64) -> Option<FragmentRewrite> {
        let home = self.home(key);
        (0..PROBE)
            .map(|i| &self.entries[(home + i) & self.mask])
            .find(|e| e.expires > now && e.key == *key)
            .map(|e| e.rewrite)
    }

    /// Whether [`FragmentTable::insert`] would find a slot for `key` now.
    pub fn has_room(&self, key: &FragmentKey, now: u64) -> bool {
        let home = self.home(key);
        (0..PROBE).map(|i| &self.entries[(home + i) & self.mask]).any(|e| e.expires <= now || e.key == *key)
    }

    /// The rewrite recorded for `key`, unless it lapsed, for a fragment
    /// of `len` payload bytes ending `end` bytes into the datagram, `last`
    /// if it is the one without more-fragments. Once the fragments
    /// translated add up to the whole datagram the entry is freed at once:
    /// a datagram holds its slot for as long as its fragments take, not for
    /// the timeout.
    pub fn take(&mut self, key: &FragmentKey, now: u64, len: u32, end: u32, last: bool) -> Option<FragmentRewrite> {
        let home = self.home(key);
        let slot = (0..PROBE).map(|i| (home + i) & self.mask).find(|&s| {
            let e = &self.entries[s];
            e.expires > now && e.key == *key
        })?;
        let e = &mut self.entries[slot];
        e.seen = e.seen.saturating_add(len);
        if last {
            e.total = end;
        }
        let rewrite = e.rewrite;
        if e.total != 0 && e.seen >= e.total {
            e.expires = 0;
        }
        Some(rewrite)
    }

    /// Records `rewrite` for `key` (replacing what `key` had), whose first
    /// fragment carried `first_len` payload bytes, in the first lapsed slot
    /// of its window when it had nothing. False when every slot of the
    /// window holds a live datagram: the table is full there.
    pub fn insert(&mut self, key: FragmentKey, rewrite: FragmentRewrite, now: u64, first_len: u32) -> bool {
        let home = self.home(&key);
        let mut free = None;
        for i in 0..PROBE {
            let slot = (home + i) & self.mask;
            let e = &self.entries[slot];
            if e.expires > now && e.key == key {
                free = Some(slot);
                break;
            }
            if e.expires <= now && free.is_none() {
                free = Some(slot);
            }
        }
        let Some(slot) = free else { return false };
        let expires = now.saturating_add(self.timeout).max(1);
        self.entries[slot] = Entry { key, expires, rewrite, seen: first_len, total: 0 };
        true
    }
}

/// MurmurHash3's 64-bit finaliser.
const fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^ (h >> 33)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Slot {
    #[default]
    Free,
    /// Waiting for its first fragment, since it came in on this port.
    Waiting { port: u16 },
    /// Rewritten, to send on port `out`; the frame starts `start` bytes
    /// into the slot (before [`HELD_HEADROOM`] if a header was prepended).
    Released { out: u16, start: usize },
}

#[derive(Clone, Copy, Debug, Default)]
struct Held {
    key: FragmentKey,
    expires: u64,
    len: usize,
    slot: Slot,
}

/// Fragments a worker keeps, as copies, until their first fragment is
/// translated: at most [`HELD_FRAGMENTS`] of them and [`HELD_BYTES`] bytes.
/// The buffer is allocated once, when the pipeline is built.
#[derive(Debug)]
pub struct HeldFragments {
    held: Box<[Held]>,
    buf: Box<[u8]>,
    bytes: usize,
    timeout: u64,
}

/// Why a fragment could not be held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldRefused {
    /// The store holds its most fragments or bytes already.
    Full,
    /// The frame is longer than [`HELD_FRAME`].
    TooLong,
}

impl HeldFragments {
    /// An empty store whose fragments wait at most `timeout_ns`.
    pub fn new(timeout_ns: u64) -> HeldFragments {
        HeldFragments {
            held: vec![Held::default(); HELD_FRAGMENTS].into_boxed_slice(),
            buf: vec![0; HELD_FRAGMENTS * (HELD_HEADROOM + HELD_FRAME)].into_boxed_slice(),
            bytes: 0,
            timeout: timeout_ns,
        }
    }

    /// Fragments held now (waiting or released and not yet sent).
    pub fn len(&self) -> usize {
        self.held.iter().filter(|h| h.slot != Slot::Free).count()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0 && self.len() == 0
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Copies `frame`, received on `port`, to wait for `key`'s first
    /// fragment.
    pub fn hold(&mut self, key: FragmentKey, port: u16, frame: &[u8], now: u64) -> Result<(), HoldRefused> {
        if frame.len() > HELD_FRAME {
            return Err(HoldRefused::TooLong);
        }
        if self.bytes + frame.len() > HELD_BYTES {
            return Err(HoldRefused::Full);
        }
        let Some(i) = self.held.iter().position(|h| h.slot == Slot::Free) else {
            return Err(HoldRefused::Full);
        };
        let at = i * (HELD_HEADROOM + HELD_FRAME) + HELD_HEADROOM;
        self.buf[at..at + frame.len()].copy_from_slice(frame);
        self.held[i] =
            Held { key, expires: now.saturating_add(self.timeout), len: frame.len(), slot: Slot::Waiting { port } };
        self.bytes += frame.len();
        Ok(())
    }

    /// Rewrites, with `rewrite`, every fragment waiting for `key`, and
    /// marks it for sending. `rewrite` gets the ingress port, the slot's
    /// buffer and the frame's start in it (after [`HELD_HEADROOM`] bytes of
    /// headroom), and gives the egress port and the frame's new start (it
    /// may prepend a header), or nothing: the fragment is then freed (the
    /// caller counts why). Returns how many were released, and how many
    /// refused.
    pub fn release(
        &mut self,
        key: &FragmentKey,
        mut rewrite: impl FnMut(u16, &mut [u8], usize) -> Option<(u16, usize)>,
    ) -> (usize, usize) {
        let (mut released, mut refused) = (0, 0);
        if self.bytes == 0 {
            // Nothing waits (nearly always): no slot to visit.
            return (released, refused);
        }
        for (i, h) in self.held.iter_mut().enumerate() {
            let Slot::Waiting { port } = h.slot else { continue };
            if h.key != *key {
                continue;
            }
            let at = i * (HELD_HEADROOM + HELD_FRAME);
            let buf = &mut self.buf[at..at + HELD_HEADROOM + h.len];
            match rewrite(port, buf, HELD_HEADROOM) {
                Some((out, start)) if start <= HELD_HEADROOM => {
                    h.slot = Slot::Released { out, start };
                    released += 1;
                }
                _ => {
                    self.bytes -= h.len;
                    h.slot = Slot::Free;
                    refused += 1;
                }
            }
        }
        (released, refused)
    }

    /// Hands each released fragment (its egress port and frame) to `send`,
    /// and frees it. Returns how many.
    pub fn drain_released(&mut self, mut send: impl FnMut(u16, &[u8])) -> usize {
        let mut n = 0;
        for (i, h) in self.held.iter_mut().enumerate() {
            let Slot::Released { out, start } = h.slot else { continue };
            let at = i * (HELD_HEADROOM + HELD_FRAME);
            send(out, &self.buf[at + start..at + HELD_HEADROOM + h.len]);
            self.bytes -= h.len;
            h.slot = Slot::Free;
            n += 1;
        }
        n
    }

    /// Frees what waited for its first fragment past the timeout. Returns
    /// how many.
    pub fn expire(&mut self, now: u64) -> usize {
        let mut n = 0;
        for h in self.held.iter_mut() {
            if matches!(h.slot, Slot::Waiting { .. }) && h.expires <= now {
                self.bytes -= h.len;
                h.slot = Slot::Free;
                n += 1;
            }
        }
        n
    }
}
