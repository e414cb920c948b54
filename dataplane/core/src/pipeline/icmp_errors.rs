//! ICMP errors about translated flows: destination unreachable (type 3,
//! "fragmentation needed" included) and time exceeded (type 11) that quote
//! a packet the gateway translated are translated themselves, outer and
//! quoted headers alike, and delivered to the other end of the flow (the
//! behaviour RFC 5508 asks of a NAT):
//!
//! - **towards the backend**: an error sent to a VIP quotes a reply the
//!   gateway sent from that VIP to a client (a router near the client says
//!   the reply was too big, say). The flow `client -> VIP` gives the
//!   backend (its tracked flow; for nat and dsr, Maglev's choice when none
//!   is tracked). nat: the outer destination and the quoted source become
//!   the backend's; fullnat: the quoted destination and the outer source
//!   also become the flow's source pair, so the backend sees the error come
//!   from the address it talks to; dsr: the error is encapsulated to the
//!   backend like any client packet, unchanged inside. This is what makes
//!   path MTU discovery work for the backends.
//! - **towards the client**: an error from the backend side quotes a packet
//!   the gateway forwarded to a backend. nat: sent to the client, quoting
//!   `client -> backend`; fullnat: sent to a source pair, quoting
//!   `pair -> backend`. The quoted backend becomes the VIP (and the pair the
//!   client), the outer source the VIP, the outer destination the client.
//!
//! An error whose quoted packet is no flow's, or that cannot be one (no
//! ports quoted, another protocol), is dropped as `icmp_no_flow`. Every
//! checksum is kept right: the quoted IP header's and the quoted TCP or UDP
//! checksum (incrementally, when the quote holds it), the ICMP checksum
//! (recomputed over the message) and the outer header's. None of this is on
//! the path of any other packet: the caller reaches it only for ICMP errors.

use super::*;

/// ICMP destination unreachable or time exceeded, not a fragment's tail:
/// an error that may quote a translated flow.
#[inline]
pub(super) fn is_icmp_error(l4: &[u8]) -> bool {
    l4.len() >= icmp::HEADER_LEN && matches!(l4[0], icmp::message::DEST_UNREACHABLE | icmp::message::TIME_EXCEEDED)
}

/// The error's outer header fields the translation needs, where the
/// quoted packet sits in the frame, and its header fields.
#[derive(Clone, Copy, Debug)]
struct Quoted {
    /// The outer IP header's length, TTL and total length.
    outer_hl: usize,
    ttl: u8,
    total: usize,
    /// Offset of the quoted IP header in the frame.
    at: usize,
    /// Its header length.
    hl: usize,
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    proto: u8,
}

/// Reads the packet an ICMP error quotes (the frame's outer IP header is
/// `hl` bytes, its TTL `ttl`, its total length `total`): an IPv4 TCP or
/// UDP packet, the first fragment or a whole one, with its ports quoted.
/// `None` otherwise.
fn quoted(frame: &[u8], hl: usize, ttl: u8, total: usize) -> Option<Quoted> {
    let at = ethernet::HEADER_LEN + hl + icmp::HEADER_LEN;
    let q = frame.get(at..ethernet::HEADER_LEN + total)?;
    let first = *q.first()?;
    let qhl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || qhl < ipv4::MIN_HEADER_LEN || q.len() < qhl + 8 {
        return None;
    }
    let proto = q[9];
    let fragment_offset = u16::from_be_bytes([q[6], q[7]]) & 0x1fff;
    if !matches!(proto, ipv4::protocol::TCP | ipv4::protocol::UDP) || fragment_offset != 0 {
        return None;
    }
    let be32 = |i: usize| u32::from_be_bytes([q[i], q[i + 1], q[i + 2], q[i + 3]]);
    let be16 = |i: usize| u16::from_be_bytes([q[i], q[i + 1]]);
    Some(Quoted {
        outer_hl: hl,
        ttl,
        total,
        at,
        hl: qhl,
        src: be32(12),
        dst: be32(16),
        sport: be16(qhl),
        dport: be16(qhl + 2),
        proto,
    })
}

/// Rewrites one end of the quoted packet at `q.at` in `frame` (`end`:
/// its source or its destination) to `addr:port`: the quoted IP header
/// (checksum updated), and the quoted TCP or UDP header's port and, when
/// the quote holds it, its checksum.
fn rewrite_quoted(frame: &mut [u8], q: &Quoted, end: Endpoint, addr: u32, port: u16) {
    let (old_addr, old_port, port_at) = match end {
        Endpoint::Src => (q.src, q.sport, 0),
        Endpoint::Dst => (q.dst, q.dport, 2),
    };
    {
        let mut ip = ipv4::Packet::new_unchecked(&mut frame[q.at..q.at + q.hl]);
        match end {
            Endpoint::Src => ip.set_src_addr(addr),
            Endpoint::Dst => ip.set_dst_addr(addr),
        }
    }
    let l4 = &mut frame[q.at + q.hl..];
    l4[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
    let check_at = if q.proto == ipv4::protocol::TCP { 16 } else { 6 };
    if l4.len() >= check_at + 2 {
        let c = u16::from_be_bytes([l4[check_at], l4[check_at + 1]]);
        // A UDP checksum of 0 means none.
        if q.proto == ipv4::protocol::TCP || c != 0 {
            let mut n = crate::checksum::update32(c, old_addr, addr);
            n = crate::checksum::update16(n, old_port, port);
            if q.proto == ipv4::protocol::UDP && n == 0 {
                n = 0xffff;
            }
            l4[check_at..check_at + 2].copy_from_slice(&n.to_be_bytes());
        }
    }
}

impl Pipeline {
    /// An ICMP error (see [`is_icmp_error`]) to `dst`, not for the gateway
    /// itself, whose outer IP header is `hl` bytes, its TTL
    /// `ttl`, its total length `total`: translated and delivered if it
    /// quotes a flow the gateway translated, else dropped as
    /// `icmp_no_flow`. See the module documentation.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn icmp_error(
        &mut self,
        snap: &Snapshot,
        now: u64,
        p: &mut RxPacket<'_>,
        dst: u32,
        hl: usize,
        ttl: u8,
        total: usize,
    ) -> Verdict {
        let Some(q) = quoted(p.frame(), hl, ttl, total) else {
            return Verdict::Drop(DropReason::IcmpNoFlow);
        };
        if snap.is_vip(dst) {
            return self.icmp_error_to_backend(snap, now, p, &q);
        }
        if let Some((pool, addr_index)) = snap.source_pool_address(dst) {
            return self.icmp_error_to_client_fullnat(snap, now, p, &q, pool, addr_index);
        }
        self.icmp_error_to_client_nat(snap, now, p, &q)
    }

    /// An error sent to a VIP, quoting `VIP -> client`: to the flow's
    /// backend.
    fn icmp_error_to_backend(&mut self, snap: &Snapshot, now: u64, p: &mut RxPacket<'_>, q: &Quoted) -> Verdict {
        let (hl, ttl, total) = (q.outer_hl, q.ttl, q.total);
        let Some(svc) = snap.service(q.src, q.sport, q.proto) else {
            return Verdict::Drop(DropReason::IcmpNoFlow);
        };
        let key = FlowKey { src_addr: q.dst, dst_addr: q.src, src_port: q.dport, dst_port: q.sport, protocol: q.proto };
        if let Some(w) = self.foreign_owner(key.src_addr, key.src_port, key.protocol) {
            return Verdict::Handoff(w);
        }
        if ttl <= 1 {
            // Never an ICMP error about an ICMP error.
            return Verdict::Drop(DropReason::TtlExceeded);
        }
        let fullnat = matches!(svc.mode, Mode::FullNat { .. });
        let (backend, snat_addr, snat_port) = match self.flows.lookup(&key, now) {
            Some(flow) => {
                let e = *self.flows.get(flow);
                let b = svc
                    .backends
                    .get(usize::from(e.backend_index))
                    .filter(|b| b.addr == e.backend_addr && b.port == e.backend_port)
                    .or_else(|| svc.position(e.backend_addr, e.backend_port).map(|i| &svc.backends[i]));
                match b {
                    Some(b) if fullnat == (e.snat_addr != 0) => (b, e.snat_addr, e.snat_port),
                    _ => return Verdict::Drop(DropReason::IcmpNoFlow),
                }
            }
            // A FullNAT flow is always tracked: its source pair is the flow's.
            None if fullnat => return Verdict::Drop(DropReason::IcmpNoFlow),
            // nat and dsr forward a connection's SYN untracked: the backend is
            // Maglev's choice, as it was for the SYN.
            None => match svc.maglev.lookup(pick_hash(svc, &key, flow_hash(&key))) {
                Some(i) => (&svc.backends[usize::from(i)], 0, 0),
                None => return Verdict::Drop(DropReason::IcmpNoFlow),
            },
        };
        let Some(mac) = self.resolve(snap, backend.next_hop, now) else {
            return Verdict::Drop(DropReason::NoNeighbour);
        };
        let out = backend.next_hop.port;
        let icmp_at = ethernet::HEADER_LEN + hl;
        match svc.mode {
            Mode::Nat | Mode::FullNat { .. } => {
                let f = p.frame_mut();
                rewrite_quoted(f, q, Endpoint::Src, backend.addr, backend.port);
                if fullnat {
                    rewrite_quoted(f, q, Endpoint::Dst, snat_addr, snat_port);
                }
                fill_icmp_checksum(&mut f[icmp_at..icmp_at + total - hl]);
                let (eth, rest) = f.split_at_mut(ethernet::HEADER_LEN);
                let mut ip = ipv4::Packet::new_unchecked(&mut rest[..hl]);
                ip.set_dst_addr(backend.addr);
                if fullnat {
                    ip.set_src_addr(snat_addr);
                }
                ip.set_ttl(ttl - 1);
                set_macs(eth, snap, out, mac);
            }
            Mode::Dsr { source_mask } => {
                // The error travels to the backend as the client's packets
                // do, quoting what the backend sent from the VIP.
                let t = Tuple {
                    src: key.src_addr,
                    dst: key.dst_addr,
                    sport: key.src_port,
                    dport: key.dst_port,
                    proto: ipv4::protocol::ICMP,
                    ttl,
                    tcp_flags: 0,
                };
                if let Err(verdict) = dsr_encapsulate(p, snap, backend, source_mask, mac, t, total, &self.counters) {
                    return verdict;
                }
            }
        }
        self.counters.icmp_errors_forwarded.inc();
        Verdict::Transmit(out)
    }

    /// An error from the backend side to a client, quoting `client ->
    /// backend` (nat): to the client, quoting `client -> VIP`.
    fn icmp_error_to_client_nat(&mut self, snap: &Snapshot, now: u64, p: &mut RxPacket<'_>, q: &Quoted) -> Verdict {
        let Some(rev) = snap.reverse(q.dst, q.dport, q.proto) else {
            return Verdict::Drop(DropReason::IcmpNoFlow);
        };
        if let Some(w) = self.foreign_owner(q.src, q.sport, q.proto) {
            return Verdict::Handoff(w);
        }
        self.icmp_error_to_client(snap, now, p, q, (rev.vip, rev.port), None)
    }

    /// An error from the backend side to a FullNAT source pair, quoting
    /// `pair -> backend`: to the pair's client, quoting `client -> VIP`.
    fn icmp_error_to_client_fullnat(
        &mut self,
        snap: &Snapshot,
        now: u64,
        p: &mut RxPacket<'_>,
        q: &Quoted,
        pool: u16,
        addr_index: u16,
    ) -> Verdict {
        if self.workers > 1 && !self.handed_over {
            match snap.source_pools().get(usize::from(pool)).and_then(|s| snat::owner_of(s, q.sport, self.workers)) {
                Some(w) if w != self.worker => return Verdict::Handoff(w),
                Some(_) => {}
                None => return Verdict::Drop(DropReason::IcmpNoFlow),
            }
        }
        let Some(b) = self.snat.binding(pool, addr_index, q.sport).copied() else {
            return Verdict::Drop(DropReason::IcmpNoFlow);
        };
        if b.backend_addr != q.dst || b.backend_port != q.dport || b.key.protocol != q.proto {
            return Verdict::Drop(DropReason::IcmpNoFlow);
        }
        let client = (b.key.src_addr, b.key.src_port);
        self.icmp_error_to_client(snap, now, p, q, (b.key.dst_addr, b.key.dst_port), Some(client))
    }

    /// The common end of both ways to a client: the quoted backend becomes
    /// `vip`, the quoted source `client` (FullNAT), the outer source the VIP
    /// and the outer destination the client.
    fn icmp_error_to_client(
        &mut self,
        snap: &Snapshot,
        now: u64,
        p: &mut RxPacket<'_>,
        q: &Quoted,
        vip: (u32, u16),
        client: Option<(u32, u16)>,
    ) -> Verdict {
        let (hl, ttl) = (q.outer_hl, q.ttl);
        if ttl <= 1 {
            return Verdict::Drop(DropReason::TtlExceeded);
        }
        let to = client.map_or(q.src, |c| c.0);
        let Some(nh) = snap.routes().next_hop(to) else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        let Some(mac) = self.resolve(snap, nh, now) else {
            return Verdict::Drop(DropReason::NoNeighbour);
        };
        let icmp_at = ethernet::HEADER_LEN + hl;
        let f = p.frame_mut();
        let len = q.total - hl;
        rewrite_quoted(f, q, Endpoint::Dst, vip.0, vip.1);
        if let Some((addr, port)) = client {
            rewrite_quoted(f, q, Endpoint::Src, addr, port);
        }
        fill_icmp_checksum(&mut f[icmp_at..icmp_at + len]);
        let (eth, rest) = f.split_at_mut(ethernet::HEADER_LEN);
        let mut ip = ipv4::Packet::new_unchecked(&mut rest[..hl]);
        ip.set_src_addr(vip.0);
        ip.set_dst_addr(to);
        ip.set_ttl(ttl - 1);
        set_macs(eth, snap, nh.port, mac);
        self.counters.icmp_errors_forwarded.inc();
        Verdict::Transmit(nh.port)
    }
}
