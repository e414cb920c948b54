//! Fuzz target: the connection-tracking table under arbitrary operation
//! sequences, against a model.
//!
//! The model holds every entry the table has not handed back yet (live or
//! expired), each with a unique id (kept in `backend_addr`), its key, state,
//! flags and expiry in the table's coarse clock, computed as the module
//! documentation specifies: an entry refreshed at `t` with timeout `T`
//! expires at `(t >> 20) + ceil(T / 2^20) + 1` and is live while the coarse
//! clock is below that. What the model asserts:
//!
//! - lookup/find of a key: found exactly when the model has a live entry
//!   with that key, and it is that entry;
//! - every entry that leaves (insert's outcome, remove, expire_some, retain)
//!   is one the model holds, and leaves once: its id is then gone;
//!   `ReusedExpired` and `expire_some` hand back expired entries only,
//!   `Replaced` the live entry with the same key;
//! - `Evicted` hands back a live entry only when both candidate buckets of
//!   the new key are full of live entries after the insert (the table was
//!   full in that region), and the evicted entry expired no later than any
//!   other entry left in them; the half-open insert evicts only half-open
//!   entries (the closest to expiry among them), and refuses, changing
//!   nothing, only when the buckets are full of live entries none of which
//!   is half-open;
//! - `occupied` is the number of entries held, `count_live` the live ones,
//!   and a sweep over every slot leaves no expired entry behind;
//! - the TCP state machine follows the documented rules.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use vipgate_dataplane::flow::{FlowEntry, FlowState, FlowTable, FlowTimeouts, InsertOutcome, SLOTS_PER_BUCKET};
use vipgate_dataplane::hash::FlowKey;
use vipgate_fuzz::Input;

const UNIT: u64 = 1 << 20;
const TCP: u8 = 6;
const UDP: u8 = 17;
const SYN: u16 = 0x02;
const FIN: u16 = 0x01;
const RST: u16 = 0x04;
const ACK: u16 = 0x10;

#[derive(Clone, Copy, Debug)]
struct Model {
    key: FlowKey,
    state: FlowState,
    flags: u8,
    /// Coarse expiry.
    expiry: u64,
}

struct Rig {
    table: FlowTable,
    timeouts: FlowTimeouts,
    /// Entries held by the table, by id.
    held: HashMap<u32, Model>,
    next_id: u32,
    now: u64,
}

fn lifetime(t: &FlowTimeouts, state: FlowState, flags: u8) -> u64 {
    let ns = match state {
        FlowState::TcpSynSent => t.tcp_syn_ns,
        FlowState::TcpEstablished => t.tcp_established_ns,
        FlowState::TcpClosing if flags & FlowEntry::RESET != 0 => t.tcp_reset_ns.min(t.tcp_closing_ns),
        FlowState::TcpClosing => t.tcp_closing_ns,
        FlowState::Udp => t.udp_ns,
    };
    ns.div_ceil(UNIT) + 1
}

/// The documented state machine, written out again.
fn transition(state: FlowState, flags: u8, from_client: bool, tcp: u16) -> (FlowState, u8) {
    match state {
        FlowState::Udp => (state, flags),
        _ if tcp & RST != 0 => (FlowState::TcpClosing, flags | FlowEntry::RESET),
        FlowState::TcpClosing if tcp & SYN != 0 && tcp & ACK == 0 && from_client => (FlowState::TcpSynSent, 0),
        _ if tcp & SYN != 0 => (state, flags),
        _ if tcp & FIN != 0 => (
            FlowState::TcpClosing,
            flags | if from_client { FlowEntry::FIN_FROM_CLIENT } else { FlowEntry::FIN_FROM_BACKEND },
        ),
        FlowState::TcpSynSent => (FlowState::TcpEstablished, flags),
        _ => (state, flags),
    }
}

impl Rig {
    fn coarse(&self) -> u64 {
        self.now >> 20
    }

    fn live(&self, m: &Model) -> bool {
        m.expiry > self.coarse()
    }

    /// The live model entry with `key`: at most one.
    fn live_id(&self, key: &FlowKey) -> Option<u32> {
        let live: Vec<u32> =
            self.held.iter().filter(|(_, m)| m.key == *key && self.live(m)).map(|(id, _)| *id).collect();
        assert!(live.len() <= 1, "two live entries with key {key:?}");
        live.first().copied()
    }

    fn refresh(&mut self, id: u32) {
        let coarse = self.coarse();
        let m = self.held.get_mut(&id).expect("held");
        m.expiry = coarse + lifetime(&self.timeouts, m.state, m.flags);
    }

    /// Takes back an entry the table handed back: held, and now gone.
    fn handed_back(&mut self, e: &FlowEntry, what: &str) -> Model {
        let id = e.backend_addr;
        let m = self.held.remove(&id).unwrap_or_else(|| panic!("{what}: entry {id} handed back twice or never held"));
        assert_eq!(m.key, e.key(), "{what}: entry {id}'s key");
        assert_eq!((m.state, m.flags), (e.state, e.flags), "{what}: entry {id}'s state");
        m
    }

    /// Looks `key` up in the table and checks it against the model; returns
    /// the id found.
    fn check_lookup(&mut self, key: &FlowKey, refresh: bool) -> Option<u32> {
        let expected = self.live_id(key);
        let found = if refresh { self.table.lookup(key, self.now) } else { self.table.find(key, self.now) };
        let got = found.map(|r| self.table.get(r).backend_addr);
        assert_eq!(got, expected, "lookup of {key:?} at {}", self.now);
        if refresh && let Some(id) = got {
            self.refresh(id);
        }
        got
    }

    fn insert(&mut self, key: FlowKey, state: FlowState, half_open: bool) {
        let id = self.next_id;
        self.next_id += 1;
        let was_live = self.live_id(&key);
        let mut e = FlowEntry::new(&key, state);
        e.backend_addr = id;
        let (r, outcome) = if half_open {
            let before = (self.table.occupied(), self.table.count_live(self.now));
            match self.table.insert_half_open_hashed(e, self.table.hash_key(&key), self.now) {
                Some(done) => done,
                None => {
                    assert!(was_live.is_none(), "a half-open insert refused a key it holds");
                    assert_eq!(
                        before,
                        (self.table.occupied(), self.table.count_live(self.now)),
                        "a refusal changed the table"
                    );
                    self.check_full_region(&key, None, true);
                    return;
                }
            }
        } else {
            self.table.insert(e, self.now)
        };
        assert_eq!(self.table.get(r).backend_addr, id, "insert's handle");
        match outcome {
            InsertOutcome::Replaced(old) => {
                assert_eq!(Some(old.backend_addr), was_live, "replaced an entry that was not the live one");
                self.handed_back(&old, "replaced");
            }
            other => {
                assert!(was_live.is_none(), "a live entry with the same key was not replaced ({other:?})");
                match other {
                    InsertOutcome::ReusedExpired(old) => {
                        let m = self.handed_back(&old, "reused");
                        assert!(!self.live(&m), "a live entry was reused as expired");
                    }
                    InsertOutcome::Evicted(old) => {
                        let m = self.handed_back(&old, "evicted");
                        assert!(self.live(&m), "an expired entry was reported evicted");
                        if half_open {
                            assert_eq!(
                                m.state,
                                FlowState::TcpSynSent,
                                "a half-open insert evicted a {:?} flow",
                                m.state
                            );
                        }
                        self.check_full_region(&key, Some(&m), half_open);
                    }
                    InsertOutcome::Vacant | InsertOutcome::Replaced(_) => {}
                }
            }
        }
        let expiry = self.coarse() + lifetime(&self.timeouts, state, 0);
        self.held.insert(id, Model { key, state, flags: 0, expiry });
    }

    /// An eviction (`evicted`) or a refusal (`None`) is allowed only when
    /// the key's two buckets hold live entries in every slot; an eviction
    /// takes the one closest to expiry (among the half-open ones for a
    /// half-open insert), and a half-open insert is refused only when none
    /// of them is half-open.
    fn check_full_region(&self, key: &FlowKey, evicted: Option<&Model>, half_open: bool) {
        let [a, b] = self.table.candidate_buckets(self.table.hash_key(key));
        let slots = if a == b { SLOTS_PER_BUCKET } else { 2 * SLOTS_PER_BUCKET };
        let mut in_region = 0;
        for m in self.held.values().filter(|m| self.live(m) && m.key != *key) {
            let r = self.table.find(&m.key, self.now).expect("a live model entry is in the table");
            let bucket = r.slot() / SLOTS_PER_BUCKET;
            if bucket != a && bucket != b {
                continue;
            }
            in_region += 1;
            let candidate = !half_open || m.state == FlowState::TcpSynSent;
            match evicted {
                Some(e) => assert!(
                    !candidate || e.expiry <= m.expiry,
                    "evicted an entry expiring at {} while one expiring at {} stayed",
                    e.expiry,
                    m.expiry
                ),
                None => assert!(!candidate, "a half-open insert was refused while a half-open entry could go"),
            }
        }
        // After an eviction the new entry (not in the model yet) holds the
        // evicted one's slot.
        let expected = if evicted.is_some() { slots - 1 } else { slots };
        assert_eq!(in_region, expected, "evicted or refused while the key's buckets had a free slot");
    }

    fn check_counts(&self) {
        assert_eq!(self.table.occupied(), self.held.len(), "occupied vs entries held");
        let live = self.held.values().filter(|m| self.live(m)).count();
        assert_eq!(self.table.count_live(self.now), live, "count_live");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    // Timeouts from 1 to 64 coarse units, so that time steps cross them.
    let mut t = || (1 + u64::from(input.u8() % 64)) * UNIT - u64::from(input.u8()) * 1000;
    let timeouts =
        FlowTimeouts { tcp_syn_ns: t(), tcp_established_ns: t(), tcp_closing_ns: t(), tcp_reset_ns: t(), udp_ns: t() };
    let capacity = [8, 16, 24, 64][input.choose(4)];
    let seed = u64::from(input.u32());
    let mut rig = Rig {
        table: FlowTable::with_seed(capacity, timeouts, seed),
        timeouts,
        held: HashMap::new(),
        next_id: 1,
        now: (u64::from(input.u16()) << 20) + u64::from(input.u16()),
    };
    // A small key space, so that keys meet again.
    let key = |i: u8| FlowKey {
        src_addr: 0xc612_0000 | u32::from(i >> 3),
        dst_addr: 0xc612_6401,
        src_port: 40000 + u16::from(i & 7),
        dst_port: 80,
        protocol: if i & 0x40 != 0 { UDP } else { TCP },
    };
    let mut ops = 0;
    while !input.is_empty() && ops < 512 {
        ops += 1;
        match input.u8() % 10 {
            0..=2 => {
                let k = key(input.u8());
                let (state, half_open) = if k.protocol == UDP {
                    (FlowState::Udp, false)
                } else {
                    let flags = input.u8();
                    // The half-open insert is for SYN-only flows, as the
                    // pipeline uses it.
                    let state = FlowState::of_first_packet(TCP, u16::from(flags & 0x7f));
                    (state, flags & 0x80 != 0 && state == FlowState::TcpSynSent)
                };
                rig.insert(k, state, half_open);
            }
            3 => {
                rig.check_lookup(&key(input.u8()), true);
            }
            4 => {
                rig.check_lookup(&key(input.u8()), false);
            }
            5 => {
                let k = key(input.u8());
                if let Some(id) = rig.check_lookup(&k, false) {
                    let r = rig.table.find(&k, rig.now).expect("found just now");
                    let e = rig.table.remove(r).expect("a found entry is removed");
                    assert_eq!(e.backend_addr, id, "removed another entry");
                    rig.handed_back(&e, "removed");
                    assert_eq!(rig.table.remove(r), None, "a slot removed twice");
                }
            }
            6 => {
                let k = key(input.u8());
                let (from_client, flags) = (input.u8() & 1 == 0, u16::from(input.u8()));
                if let Some(id) = rig.check_lookup(&k, false) {
                    let r = rig.table.find(&k, rig.now).expect("found just now");
                    if input.u8() & 1 == 0 {
                        rig.table.touch(r, rig.now);
                    } else {
                        rig.table.on_tcp_flags(r, from_client, flags, rig.now);
                        let m = rig.held.get_mut(&id).expect("held");
                        (m.state, m.flags) = transition(m.state, m.flags, from_client, flags);
                        let e = rig.table.get(r);
                        assert_eq!((e.state, e.flags), (m.state, m.flags), "state after flags {flags:#x}");
                    }
                    rig.refresh(id);
                }
            }
            7 => {
                // Time goes forward by up to 80 coarse units.
                rig.now += u64::from(input.u16()) * (UNIT / 800);
            }
            8 => {
                let budget = usize::from(input.u8());
                let mut expired = Vec::new();
                let n = rig.table.expire_some(rig.now, budget, |e| expired.push(*e));
                assert_eq!(n, expired.len(), "expire_some's count");
                for e in &expired {
                    let m = rig.handed_back(e, "expired");
                    assert!(!rig.live(&m), "expire_some took a live entry");
                }
                if budget >= rig.table.capacity() {
                    assert!(rig.held.values().all(|m| rig.live(m)), "a full sweep left an expired entry");
                }
            }
            _ => {
                // Retain: drop the entries whose id has this bit.
                let bit = 1u32 << (input.u8() % 8);
                let mut dropped = Vec::new();
                rig.table.retain(|e| {
                    let keep = e.backend_addr & bit == 0;
                    if !keep {
                        dropped.push(*e);
                    }
                    keep
                });
                for e in &dropped {
                    rig.handed_back(e, "retain");
                }
                assert!(rig.held.keys().all(|id| id & bit == 0), "retain kept an entry it was told to drop");
            }
        }
        rig.check_counts();
    }
});
