//! IPv4 fragments of translated traffic (see [`crate::fragments`] and
//! *Fragments* in docs/architecture.md).
//!
//! - A first fragment takes the path of an unfragmented packet: it carries
//!   the ports, so it finds its service, flow or reply, and its flow's
//!   owner translates it. The translation is then recorded under the
//!   datagram's key in the fragment table of the datagram's *fragment
//!   owner*: the worker chosen from the source and destination addresses
//!   alone, the only fields (with the protocol) that a NIC's RSS can hash
//!   for every fragment. When the flow's owner is another worker, it sends
//!   the translation to the fragment owner's inbox.
//! - A later fragment goes to the fragment owner (handed over when another
//!   worker received it), which rewrites it from the table: the same
//!   addresses, MACs and port as the first. Its TTL is decremented; one
//!   that would expire is dropped without an answer (only a first fragment
//!   is ever answered, RFC 1812 section 4.3.2.7).
//! - A later fragment whose first has not been translated yet waits, as a
//!   copy, and is sent when the translation arrives; see
//!   [`crate::fragments::HeldFragments`] for the bounds.
//!
//! Fragments for the gateway's own addresses go to its kernel, which
//! reassembles them; ICMP fragments and those of other protocols are
//! dropped as before.

use super::*;
use crate::fragments::FragmentRewrite;

impl Pipeline {
    /// A later fragment of a TCP or UDP datagram (`offset` its place, in
    /// 8-byte units), not for the gateway's kernel (the caller punts those).
    /// Out of line: unfragmented packets never get here.
    #[inline(never)]
    pub(super) fn fragment(
        &mut self,
        snap: &Snapshot,
        now: u64,
        p: &mut RxPacket<'_>,
        key: FragmentKey,
        offset: u16,
    ) -> Verdict {
        let in_port = p.port;
        if key.protocol == ipv4::protocol::TCP && offset == 1 {
            // It would overwrite the TCP header the first fragment's
            // checks and translation were made on (RFC 1858, section 3.2).
            return Verdict::Drop(DropReason::Malformed);
        }
        if !self.handed_over
            && let Some(w) = self.foreign_fragment_owner(&key)
        {
            return Verdict::Handoff(w);
        }
        let (len, end, last) = payload_span(p.frame());
        if let Some(rewrite) = self.fragments.take(&key, now, len, end, last) {
            return match rewrite_fragment(p, &rewrite, snap) {
                Ok(out) => {
                    self.count_fragment(&rewrite);
                    Verdict::Transmit(out)
                }
                Err(reason) => Verdict::Drop(reason),
            };
        }
        match self.held.hold(key, in_port, p.frame(), now) {
            Ok(()) => {
                self.counters.fragments_held.inc();
                Verdict::Consumed
            }
            Err(_) => Verdict::Drop(DropReason::FragmentHoldFull),
        }
    }

    /// Before a datagram's first fragment is translated (as an
    /// unfragmented packet is): its translation can only be recorded if
    /// this worker's table has room, when this worker owns the later
    /// fragments. Otherwise they could never follow, and the first is
    /// dropped (returned) before anything, a flow or a source pair, is made
    /// for it.
    #[inline(never)]
    pub(super) fn first_fragment(&self, key: &FragmentKey, now: u64) -> Option<Verdict> {
        let local = self.foreign_fragment_owner(key).is_none();
        (local && !self.fragments.has_room(key, now)).then_some(Verdict::Drop(DropReason::FragmentTableFull))
    }

    /// A datagram's first fragment was translated into `p` (from the
    /// client: `forward`), to leave on port `out`: records the translation
    /// for its later fragments, here or at their owner. `original` is its
    /// source, destination and protocol as it arrived.
    #[inline(never)]
    pub(super) fn record_fragment(
        &mut self,
        snap: &Snapshot,
        now: u64,
        p: &RxPacket<'_>,
        original: (u32, u32, u8),
        out: u16,
        forward: bool,
    ) {
        let frame = p.frame();
        // Direct server return prepended an IPIP header: the datagram's
        // own header follows it.
        let tunnelled = frame[ethernet::HEADER_LEN + 9] == ipv4::protocol::IPIP;
        let inner = if tunnelled { ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN } else { ethernet::HEADER_LEN };
        let id = ipv4::Packet::new_unchecked(&frame[inner..]).ident();
        let key = FragmentKey { src: original.0, dst: original.1, id, protocol: original.2 };
        let first_len = u32::from(ipv4::Packet::new_unchecked(&frame[inner..]).total_len())
            .saturating_sub(u32::from(frame[inner] & 0x0f) * 4);
        let note = FragmentNote { key, rewrite: rewrite_of(frame, tunnelled, out, forward), first_len };
        match self.foreign_fragment_owner(&key) {
            None => self.adopt_fragment(snap, note, now),
            Some(w) => {
                if let Some(inbox) = self.peers.get(usize::from(w)) {
                    // Full: the later fragments wait at their owner, then
                    // are discarded and counted there.
                    let _ = inbox.fragments.push(note);
                }
            }
        }
    }

    /// Records a datagram's translation and releases what waited for it.
    pub(super) fn adopt_fragment(&mut self, snap: &Snapshot, note: FragmentNote, now: u64) {
        if !self.fragments.insert(note.key, note.rewrite, now, note.first_len) {
            // Only from another worker's note (a local first fragment
            // checked for room): its later fragments wait, then are
            // discarded and counted.
            return;
        }
        let counters = &self.counters;
        let rewrite = note.rewrite;
        let table = &mut self.fragments;
        let (released, refused) = self.held.release(&note.key, |port, buf, start| {
            let mut p = RxPacket::with_headroom(port, buf, start);
            let (len, end, last) = payload_span(p.frame());
            // Counted towards the whole datagram, so that its entry is freed
            // once every fragment has gone.
            let _ = table.take(&note.key, now, len, end, last);
            rewrite_fragment(&mut p, &rewrite, snap).ok().map(|out| (out, p.start))
        });
        if released > 0 {
            let c = if rewrite.forward { &counters.nat_forward } else { &counters.nat_reverse };
            c.add(released as u64);
        }
        counters.fragments_discarded.add(refused as u64);
    }

    /// Takes in the translations other workers made for datagrams whose
    /// later fragments this worker receives.
    #[cold]
    #[inline(never)]
    pub(super) fn adopt_fragment_notes(&mut self, snap: &Snapshot, now: u64) {
        let Some(inbox) = self.inbox.clone() else { return };
        while let Some(note) = inbox.fragments.pop() {
            self.adopt_fragment(snap, note, now);
        }
    }

    /// The worker that owns `key`'s later fragments when it is not this
    /// one: chosen from the addresses alone, as a NIC's RSS spreads
    /// fragments.
    fn foreign_fragment_owner(&self, key: &FragmentKey) -> Option<u16> {
        if self.workers <= 1 {
            return None;
        }
        let w = fragment_owner(key.src, key.dst, self.workers);
        (w != self.worker).then_some(w)
    }

    fn count_fragment(&self, rewrite: &FragmentRewrite) {
        self.counters.fragments_forwarded.inc();
        if rewrite.forward {
            self.counters.nat_forward.inc();
        } else {
            self.counters.nat_reverse.inc();
        }
    }

    /// Hands each fragment that waited for its first and is now
    /// translated (its egress port and frame) to `send`, which transmits
    /// it; the driver calls this after each burst and each housekeeping
    /// pass. Counted in `fragments_released` (they are packets the worker
    /// sends without having received them in this burst).
    pub fn drain_released(&mut self, send: impl FnMut(u16, &[u8])) {
        if self.held.is_empty() {
            return;
        }
        let n = self.held.drain_released(send);
        self.counters.fragments_released.add(n as u64);
    }

    /// The fragment table (for tests and stats).
    pub fn fragment_table(&self) -> &FragmentTable {
        &self.fragments
    }

    /// The fragments waiting for their first (for tests and stats).
    pub fn held_fragments(&self) -> &HeldFragments {
        &self.held
    }
}

/// A fragment's payload: its length, where it ends in the datagram, and
/// whether it is the last (more-fragments clear). `frame` is a valid IPv4
/// frame.
fn payload_span(frame: &[u8]) -> (u32, u32, bool) {
    let ip = ipv4::Packet::new_unchecked(&frame[ethernet::HEADER_LEN..]);
    let len = u32::from(ip.total_len()).saturating_sub(ip.header_len() as u32);
    let end = u32::from(ip.frag_offset()) * 8 + len;
    (len, end, !ip.more_frags())
}

/// The worker, of `workers`, that owns the later fragments of datagrams
/// from `src` to `dst`.
#[must_use]
pub fn fragment_owner(src: u32, dst: u32, workers: u16) -> u16 {
    let h = (u64::from(src) << 32 | u64::from(dst)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((h >> 32) % u64::from(workers.max(1))) as u16
}

/// The rewrite a translated first fragment got, read from the frame as it
/// leaves: MACs, addresses, and for direct server return (`tunnelled`: an
/// outer header was prepended) the outer header's addresses.
fn rewrite_of(frame: &[u8], tunnelled: bool, out: u16, forward: bool) -> FragmentRewrite {
    let mut macs = [0; 12];
    macs.copy_from_slice(&frame[..12]);
    let ip = ipv4::Packet::new_unchecked(&frame[ethernet::HEADER_LEN..]);
    let (src, dst, tunnel) = if tunnelled {
        let inner = ipv4::Packet::new_unchecked(&frame[ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN..]);
        (inner.src_addr(), inner.dst_addr(), Some((ip.src_addr(), ip.dst_addr())))
    } else {
        (ip.src_addr(), ip.dst_addr(), None)
    };
    FragmentRewrite { out, macs, src, dst, tunnel, forward }
}

/// Rewrites later fragment `p` (a valid IPv4 packet) as its datagram's
/// first was: addresses, TTL, MACs, and the outer header for direct server
/// return. Returns the egress port.
fn rewrite_fragment(p: &mut RxPacket<'_>, rewrite: &FragmentRewrite, snap: &Snapshot) -> Result<u16, DropReason> {
    let ip_at = p.start + ethernet::HEADER_LEN;
    let mut ip = ipv4::Packet::new_unchecked(&mut p.buf[ip_at..p.end]);
    let ttl = ip.ttl();
    if ttl <= 1 {
        return Err(DropReason::TtlExceeded);
    }
    ip.set_ttl(ttl - 1);
    ip.set_src_addr(rewrite.src);
    ip.set_dst_addr(rewrite.dst);
    let (tos, total) = (ip.tos(), ip.total_len());
    let Some((src, dst)) = rewrite.tunnel else {
        p.buf[p.start..p.start + 12].copy_from_slice(&rewrite.macs);
        return Ok(rewrite.out);
    };
    let Some(port) = snap.ports().get(usize::from(rewrite.out)) else {
        return Err(DropReason::NoRoute);
    };
    let outer_len = usize::from(total) + ipv4::MIN_HEADER_LEN;
    if outer_len > usize::from(port.mtu) {
        // Fragments carry no DF: vipgate does not fragment.
        return Err(DropReason::TooBig);
    }
    let outer = ipv4::Header {
        tos,
        total_len: outer_len as u16,
        dont_frag: false,
        ttl: ORIGIN_TTL,
        protocol: ipv4::protocol::IPIP,
        src,
        dst,
    };
    let mac = |at: usize| {
        let mut m = [0; 6];
        m.copy_from_slice(&rewrite.macs[at..at + 6]);
        EthernetAddress(m)
    };
    if !encapsulate(p, &outer, mac(0), mac(6)) {
        return Err(DropReason::NoHeadroom);
    }
    Ok(rewrite.out)
}
