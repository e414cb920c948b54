//! IPv4 fragments of translated traffic: every fragment of a datagram
//! follows its first, in order or not, in every mode and direction, with
//! bounded state.

use super::modes::{POOL_ADDR, POOL_ADDR2, decapsulate, dsr, fullnat, spec_mode, two_workers};
use super::*;
use crate::fragments::{DEFAULT_TIMEOUT_NS, HELD_FRAGMENTS};
use crate::snapshot::ForwardingMode;

/// Splits the IPv4 datagram in `frame` into fragments of at most `size`
/// payload bytes (a multiple of 8), each a frame with the same Ethernet
/// header and IP identification `id`; in order.
fn fragments(frame: &[u8], size: usize, id: u16) -> Vec<Vec<u8>> {
    let hl = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let payload = &frame[14 + hl..14 + total];
    let mut out = Vec::new();
    for (i, chunk) in payload.chunks(size).enumerate() {
        let offset = i * size;
        let more = offset + chunk.len() < payload.len();
        let mut f = frame[..14 + hl].to_vec();
        f.extend_from_slice(chunk);
        let b = &mut f[14..];
        b[2..4].copy_from_slice(&((hl + chunk.len()) as u16).to_be_bytes());
        b[4..6].copy_from_slice(&id.to_be_bytes());
        let flags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        b[6..8].copy_from_slice(&flags.to_be_bytes());
        ipv4::Packet::new_unchecked(&mut f[14..]).fill_checksum();
        out.push(f);
    }
    out
}

/// Joins fragments (as they leave, in any order) back into the datagram's
/// IP payload, checking each header agrees with the first's addresses.
fn reassemble(frags: &[Vec<u8>]) -> (u32, u32, Vec<u8>) {
    let mut parts: Vec<(usize, &[u8])> = Vec::new();
    let mut addrs = None;
    for f in frags {
        let ip = ipv4::Packet::new_checked(&f[14..]).expect("an IPv4 packet");
        assert!(ip.verify_checksum(), "header checksum of every fragment");
        let a = (ip.src_addr(), ip.dst_addr());
        assert_eq!(*addrs.get_or_insert(a), a, "every fragment has the same addresses");
        parts.push((usize::from(ip.frag_offset()) * 8, &f[14 + ip.header_len()..14 + usize::from(ip.total_len())]));
    }
    parts.sort_by_key(|p| p.0);
    let mut payload = Vec::new();
    for (at, bytes) in parts {
        assert_eq!(at, payload.len(), "no gap, no overlap");
        payload.extend_from_slice(bytes);
    }
    let (src, dst) = addrs.unwrap();
    (src, dst, payload)
}

/// Runs `frames` (in the order given) on `port`; returns the verdicts and
/// every frame that left: transmitted ones, then those released.
fn run_all(r: &mut Rig, port: u16, frames: &[Vec<u8>]) -> (Vec<Verdict>, Vec<(u16, Vec<u8>)>) {
    let mut verdicts = Vec::new();
    let mut out = Vec::new();
    for f in frames {
        let (v, o) = r.run_with_headroom(port, f, 64);
        if let Verdict::Transmit(p) = v {
            out.push((p, o));
        }
        verdicts.push(v);
        r.pipe.drain_released(|p, frame| out.push((p, frame.to_vec())));
    }
    (verdicts, out)
}

/// A 4,000-byte UDP datagram from the client to the dns service, in
/// fragments of 1,480 bytes.
fn client_datagram(sport: u16, id: u16) -> (Vec<u8>, Vec<Vec<u8>>) {
    let payload: Vec<u8> = (0..4000u32).map(|i| (i * 7 + u32::from(sport)) as u8).collect();
    let whole = udp_frame((CLIENT, sport), (VIP, 53), 64, &payload);
    let frags = fragments(&whole, 1480, id);
    assert_eq!(frags.len(), 3);
    (whole, frags)
}

/// Checks the frames that left carry the whole datagram `whole` (its UDP
/// header and payload) to one backend, translated: returns the backend
/// and the datagram's new source.
fn assert_one_datagram(out: &[(u16, Vec<u8>)], whole: &[u8], port: u16) -> (u32, u32) {
    assert_eq!(out.len(), 3, "every fragment left");
    assert!(out.iter().all(|(p, _)| *p == port), "on one port");
    let frames: Vec<Vec<u8>> = out.iter().map(|(_, f)| f.clone()).collect();
    let macs: std::collections::HashSet<_> = frames.iter().map(|f| f[..12].to_vec()).collect();
    assert_eq!(macs.len(), 1, "to one MAC");
    let (src, dst, payload) = reassemble(&frames);
    assert!(frames.iter().all(|f| f[14 + 8] == 63), "TTL decremented in every fragment");
    // The reassembled UDP datagram checks out against its new addresses.
    let udp = etherparse::UdpHeaderSlice::from_slice(&payload).unwrap().to_header();
    let ip = etherparse::Ipv4Header::new(
        payload.len() as u16,
        63,
        etherparse::IpNumber::UDP,
        src.to_be_bytes(),
        dst.to_be_bytes(),
    )
    .unwrap();
    assert_eq!(udp.checksum, udp.calc_checksum_ipv4(&ip, &payload[8..]).unwrap(), "UDP checksum of the datagram");
    assert_eq!(&payload[8..], &whole[14 + 28..], "the payload, whole");
    (dst, src)
}

#[test]
fn a_datagrams_fragments_follow_its_first_to_one_backend_in_order_and_reversed() {
    for reversed in [false, true] {
        let mut r = Rig::resolved();
        let mut seen = std::collections::HashSet::new();
        for (i, sport) in (40000..40030u16).enumerate() {
            let (whole, mut frags) = client_datagram(sport, 100 + i as u16);
            if reversed {
                frags.reverse();
            }
            let (verdicts, out) = run_all(&mut r, 0, &frags);
            if reversed {
                assert_eq!(&verdicts[..2], [Verdict::Consumed; 2], "later fragments wait for their first");
            }
            let (backend, src) = assert_one_datagram(&out, &whole, 1);
            assert!(BACKENDS.contains(&backend), "to a backend: {backend:#x}");
            assert_eq!(src, CLIENT, "nat keeps the client's address");
            // The unfragmented packets of the flow go to the same backend.
            let mut f = udp_frame((CLIENT, sport), (VIP, 53), 64, b"small");
            assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
            assert_eq!(inspect(&f).3, backend, "the flow's backend");
            seen.insert(backend);
        }
        assert!(seen.len() > 1, "the flows spread over the backends");
        let c = r.pipe.counters();
        assert_eq!(c.fragments_forwarded.get(), if reversed { 0 } else { 60 });
        assert_eq!((c.fragments_held.get(), c.fragments_released.get()), if reversed { (60, 60) } else { (0, 0) });
        assert_eq!(c.nat_forward.get(), 30 * 4, "every fragment and every small packet");
        assert_eq!((c.total_drops(), c.fragments_discarded.get()), (0, 0));
        assert!(r.pipe.held_fragments().is_empty());
    }
}

#[test]
fn fragments_in_a_shuffled_order_all_leave() {
    let mut r = Rig::resolved();
    let (whole, frags) = client_datagram(41000, 7);
    // Middle, first, last.
    let order = [frags[1].clone(), frags[0].clone(), frags[2].clone()];
    let (verdicts, out) = run_all(&mut r, 0, &order);
    assert_eq!(verdicts, [Verdict::Consumed, Verdict::Transmit(1), Verdict::Transmit(1)]);
    assert_one_datagram(&out, &whole, 1);
}

#[test]
fn fullnat_rewrites_both_addresses_of_every_fragment_both_ways() {
    let mut r = Rig::with_spec(&spec_mode(&fullnat(), (20000, 20099)));
    let (whole, mut frags) = client_datagram(40000, 9);
    frags.reverse();
    let (_, out) = run_all(&mut r, 0, &frags);
    let (backend, pool) = assert_one_datagram(&out, &whole, 1);
    assert!(pool == POOL_ADDR || pool == POOL_ADDR2, "from the pool: {pool:#x}");
    let first = out.iter().map(|(_, f)| f).find(|f| f[14 + 6] & 0x1f == 0 && f[14 + 7] == 0).unwrap();
    let snat_port = u16::from_be_bytes([first[34], first[35]]);
    // The backend's reply, fragmented, in either order, reaches the client
    // from the VIP.
    for (id, reversed) in [(500u16, false), (501, true)] {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let reply = udp_frame((backend, 5353), (pool, snat_port), 64, &payload);
        let mut frags = fragments(&reply, 1480, id);
        if reversed {
            frags.reverse();
        }
        let (_, out) = run_all(&mut r, 1, &frags);
        assert_eq!(out.len(), 3, "reply fragments all leave");
        let frames: Vec<Vec<u8>> = out.iter().map(|(_, f)| f.clone()).collect();
        let (src, dst, bytes) = reassemble(&frames);
        assert_eq!((src, dst), (VIP, CLIENT), "from the VIP to the client");
        assert_eq!(u16::from_be_bytes([bytes[0], bytes[1]]), 53, "from the service port");
        assert_eq!(u16::from_be_bytes([bytes[2], bytes[3]]), 40000, "to the client's port");
        assert!(out.iter().all(|(p, f)| *p == 0 && f[..6] == CLIENT_MAC));
    }
    assert_eq!(r.pipe.counters().nat_reverse.get(), 6);
}

#[test]
fn nat_reply_fragments_leave_from_the_vip() {
    let mut r = Rig::resolved();
    let mut f = udp_frame((CLIENT, 40000), (VIP, 53), 64, b"q");
    assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    let backend = inspect(&f).3;
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 3) as u8).collect();
    let reply = udp_frame((backend, 5353), (CLIENT, 40000), 64, &payload);
    let mut frags = fragments(&reply, 1480, 77);
    frags.swap(0, 2);
    let (_, out) = run_all(&mut r, 1, &frags);
    let frames: Vec<Vec<u8>> = out.iter().map(|(_, f)| f.clone()).collect();
    let (src, dst, bytes) = reassemble(&frames);
    assert_eq!((src, dst), (VIP, CLIENT));
    assert_eq!(&bytes[8..], &payload[..]);
    assert_eq!(r.pipe.counters().nat_reverse.get(), 3);
}

#[test]
fn dsr_encapsulates_every_fragment_to_the_first_ones_backend() {
    let mut r = Rig::with_spec(&spec_mode(&dsr(), (20000, 20099)));
    // Fragments of 1,472 bytes: each fits the 1,500-byte MTU once
    // encapsulated.
    let payload: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
    let whole = udp_frame((CLIENT, 40000), (VIP, 53), 64, &payload);
    let mut frags = fragments(&whole, 1456, 31);
    frags.reverse();
    let (_, out) = run_all(&mut r, 0, &frags);
    assert_eq!(out.len(), frags.len());
    let outer: std::collections::HashSet<_> = out
        .iter()
        .map(|(_, f)| {
            let (_, dmac, osrc, odst, _, _) = decapsulate(f);
            (dmac, osrc, odst)
        })
        .collect();
    assert_eq!(outer.len(), 1, "one tunnel for the whole datagram: {outer:?}");
    let inner: Vec<Vec<u8>> = out.iter().map(|(_, f)| decapsulate(f).5).collect();
    let (src, dst, bytes) = reassemble(&inner);
    assert_eq!((src, dst), (CLIENT, VIP), "DSR keeps the inner addresses");
    assert_eq!(&bytes[8..], &payload[..]);

    // A fragment that no longer fits once encapsulated is dropped: it
    // carries no DF, and vipgate does not fragment.
    let big = fragments(&whole, 1480, 32);
    let (v, _) = run_all(&mut r, 0, &big[..1]);
    assert_eq!(v, [Verdict::Drop(DropReason::TooBig)]);
}

/// A resolved rig whose fragment table has 16 entries.
fn small_table_rig() -> Rig {
    let config = PipelineConfig { fragment_entries: 16, ..test_config() };
    let mut r = Rig {
        snap: Snapshot::build(&spec()).unwrap(),
        pipe: Pipeline::new(config, Arc::new(WorkerCounters::default())),
        now: 1_000_000_000,
    };
    r.teach(0, CLIENT, CLIENT_MAC, GW_C_IP);
    for (a, m) in BACKENDS.iter().zip(BACKEND_MACS) {
        r.teach(1, *a, m, GW_B_IP);
    }
    r
}

#[test]
fn a_full_fragment_table_drops_first_fragments_but_not_other_traffic() {
    let mut r = small_table_rig();
    let capacity = r.pipe.fragment_table().capacity();
    let (mut sent, mut full) = (0, 0);
    for id in 0..2000u16 {
        let (_, frags) = client_datagram(40000, id);
        match r.run_with_headroom(0, &frags[0], 64).0 {
            Verdict::Transmit(1) => sent += 1,
            Verdict::Drop(DropReason::FragmentTableFull) => full += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(sent <= capacity && sent >= capacity / 2, "{sent} first fragments fill {capacity} entries");
    assert_eq!(full, 2000 - sent);
    assert_eq!(r.pipe.counters().drops(DropReason::FragmentTableFull), full as u64);
    // Unfragmented traffic is untouched.
    for sport in 1000..1100 {
        let mut f = udp_frame((CLIENT, sport), (VIP, 53), 64, b"q");
        assert_eq!(r.run(0, &mut f), Verdict::Transmit(1));
    }
    // Entries lapse: after the timeout a first fragment finds room again.
    r.now += DEFAULT_TIMEOUT_NS;
    let (_, frags) = client_datagram(40001, 9999);
    assert_eq!(r.run_with_headroom(0, &frags[0], 64).0, Verdict::Transmit(1));
}

#[test]
fn a_datagrams_entry_is_freed_when_its_last_byte_has_gone() {
    let mut r = small_table_rig();
    // Far more whole datagrams than the table has entries, within one
    // timeout: each frees its entry when its last fragment goes, in order
    // or not.
    for id in 0..1000u16 {
        let (whole, mut frags) = client_datagram(40000 + id % 50, id);
        if id % 3 == 1 {
            frags.reverse();
        } else if id % 3 == 2 {
            frags.swap(1, 2);
        }
        let (_, out) = run_all(&mut r, 0, &frags);
        assert_one_datagram(&out, &whole, 1);
        assert_eq!(r.pipe.fragment_table().live(r.now), 0, "datagram {id}: its entry is freed");
    }
    assert_eq!(r.pipe.counters().drops(DropReason::FragmentTableFull), 0);
    // A datagram whose middle fragment is lost keeps its entry until the
    // timeout.
    let (_, frags) = client_datagram(41000, 5000);
    run_all(&mut r, 0, &[frags[0].clone(), frags[2].clone()]);
    assert_eq!(r.pipe.fragment_table().live(r.now), 1);
    assert_eq!(r.pipe.fragment_table().live(r.now + DEFAULT_TIMEOUT_NS), 0);
}

#[test]
fn waiting_fragments_are_bounded_and_discarded_after_the_timeout() {
    let mut r = Rig::resolved();
    let mut held = 0;
    for id in 0..(HELD_FRAGMENTS as u16 + 40) {
        let (_, frags) = client_datagram(40000, id);
        match r.run_with_headroom(0, &frags[2], 64).0 {
            Verdict::Consumed => held += 1,
            Verdict::Drop(DropReason::FragmentHoldFull) => {}
            other => panic!("{other:?}"),
        }
    }
    // 64 slots, 128 KiB: the byte bound (1,062-byte last fragments) is
    // not reached before the count bound.
    assert_eq!(held, HELD_FRAGMENTS);
    let c = r.pipe.counters();
    assert_eq!((c.fragments_held.get(), c.consumed.get() >= held as u64), (held as u64, true));
    assert_eq!(c.drops(DropReason::FragmentHoldFull), 40);
    r.now += DEFAULT_TIMEOUT_NS;
    r.pipe.housekeeping(&r.snap, r.now);
    assert_eq!(r.pipe.counters().fragments_discarded.get(), held as u64);
    assert!(r.pipe.held_fragments().is_empty());
    // The byte bound: jumbo fragments, 8,034-byte frames.
    let payload = vec![7u8; 30000];
    let mut held = 0;
    for id in 0..40u16 {
        let whole = udp_frame((CLIENT, 40000), (VIP, 53), 64, &payload);
        let frags = fragments(&whole, 8000, 1000 + id);
        if r.run_with_headroom(0, &frags[1], 64).0 == Verdict::Consumed {
            held += 1;
        }
    }
    assert_eq!(held, crate::fragments::HELD_BYTES / 8034);
    assert!(r.pipe.held_fragments().bytes() <= crate::fragments::HELD_BYTES);
}

#[test]
fn later_fragments_that_cannot_be_trusted_or_translated_are_dropped() {
    let mut r = Rig::resolved();
    // A TCP fragment at offset 8 bytes would rewrite the TCP header.
    let whole = tcp_frame((CLIENT, 40000), (VIP, 80), 64, &[0u8; 100]);
    let mut f = fragments(&whole, 8, 5)[1].clone();
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::Malformed));
    // A later fragment whose TTL would expire gets no answer.
    let (_, frags) = client_datagram(40000, 6);
    assert_eq!(r.run_with_headroom(0, &frags[0], 64).0, Verdict::Transmit(1));
    let mut late = frags[1].clone();
    late[14 + 8] = 1;
    ipv4::Packet::new_unchecked(&mut late[14..]).fill_checksum();
    assert_eq!(r.run(0, &mut late), Verdict::Drop(DropReason::TtlExceeded));
    // A first fragment whose TTL would expire is answered, and records
    // nothing for the later ones.
    let (_, frags) = client_datagram(40001, 7);
    let mut first = frags[0].clone();
    first[14 + 8] = 1;
    ipv4::Packet::new_unchecked(&mut first[14..]).fill_checksum();
    assert_eq!(r.run_with_headroom(0, &first, 64).0, Verdict::Transmit(0), "time exceeded to the client");
    assert_eq!(r.run_with_headroom(0, &frags[1], 64).0, Verdict::Consumed, "waits (and will be discarded)");
    // ICMP fragments are not translated.
    let mut f = udp_frame((CLIENT, 40000), (VIP, 53), 64, &[0u8; 64]);
    f[14 + 9] = 1;
    f[14 + 6] = 0x20;
    ipv4::Packet::new_unchecked(&mut f[14..]).fill_checksum();
    assert_eq!(r.run(0, &mut f), Verdict::Drop(DropReason::Fragment));
}

#[test]
fn fragments_for_the_gateway_go_to_its_kernel() {
    let mut r = Rig::resolved();
    r.pipe.set_kernel_ports(&[true, true]);
    let payload = [0u8; 3000];
    let whole = udp_frame((CLIENT, 40000), (GW_C_IP, 4789), 64, &payload);
    for f in fragments(&whole, 1480, 3) {
        assert_eq!(r.run_with_headroom(0, &f, 64).0, Verdict::Punt(0));
    }
}

#[test]
fn with_two_workers_every_fragment_reaches_the_worker_that_chose_the_backend() {
    for mode in [ForwardingMode::Nat, fullnat()] {
        let (_, mut rigs) = two_workers(&spec_mode(&mode, (20000, 29999)));
        let inboxes = worker_inboxes(2);
        for (w, r) in rigs.iter_mut().enumerate() {
            r.pipe.join_workers(&inboxes, w);
        }
        let mut remote = 0;
        for (i, sport) in (40000..40040u16).enumerate() {
            let (whole, mut frags) = client_datagram(sport, 200 + i as u16);
            if i % 2 == 1 {
                frags.reverse();
            }
            let mut out = Vec::new();
            for (j, f) in frags.iter().enumerate() {
                // RSS may put any fragment on either worker.
                let first = (i + j) % 2;
                let (v, w, o, _) = super::modes::deliver(&mut rigs, first, 0, f);
                match v {
                    Verdict::Transmit(p) => out.push((p, o)),
                    Verdict::Consumed => {}
                    other => panic!("{}: {other:?}", mode.name()),
                }
                let _ = w;
                // Each worker's next burst takes in its inbox; then what
                // waited is released.
                for r in rigs.iter_mut() {
                    let mut none: [RxPacket<'_>; 0] = [];
                    r.pipe.process(&r.snap, r.now, &mut none, &mut []);
                    r.pipe.drain_released(|p, frame| out.push((p, frame.to_vec())));
                }
            }
            let (backend, _) = assert_one_datagram(&out, &whole, 1);
            assert!(BACKENDS.contains(&backend));
            let fowner = usize::from(fragment_owner(CLIENT, VIP, 2));
            let fkey = crate::fragments::FragmentKey { src: CLIENT, dst: VIP, id: 200 + i as u16, protocol: 17 };
            let (table, now) = (rigs[fowner].pipe.fragment_table(), rigs[fowner].now);
            assert!(table.lookup(&fkey, now).is_none(), "a whole datagram's entry is freed");
            assert_eq!(rigs[1 - fowner].pipe.fragment_table().live(now), 0, "only the fragment owner had one");
            let owner = usize::from(client_owner(CLIENT, sport, 17, 2));
            remote += usize::from(owner != fowner);
        }
        assert!(remote > 0, "{}: some flows' owners are not their fragments' owner", mode.name());
    }
}

proptest! {
    /// Whatever a fragment carries (offsets, flags, lengths, protocols), to
    /// a VIP, a client or a pool address, in any order, the pipeline does
    /// not panic, and every packet is counted once.
    #[test]
    fn arbitrary_fragments_never_panic_and_are_counted(
        frames in proptest::collection::vec(
            (any::<u16>(), 0u16..0x4000, proptest::collection::vec(any::<u8>(), 0..64), 0usize..3, any::<bool>(), 0u8..3),
            1..24,
        ),
        fullnat_mode in any::<bool>(),
    ) {
        let mut r = if fullnat_mode { Rig::with_spec(&spec_mode(&fullnat(), (20000, 20099))) } else { Rig::resolved() };
        let consumed_before = r.pipe.counters().consumed.get();
        let (mut sent, mut transmitted, mut packets) = (0u64, 0u64, 0u64);
        for (id, flags, payload, to, tcp, ttl) in frames {
            let dst = [VIP, CLIENT, POOL_ADDR][to];
            let src = if to == 0 { CLIENT } else { BACKENDS[0] };
            let mut f = if tcp {
                tcp_frame((src, 40000), (dst, 80), 64, &payload)
            } else {
                udp_frame((src, 5353), (dst, 53), 64, &payload)
            };
            {
                let b = &mut f[14..];
                b[4..6].copy_from_slice(&(id % 4).to_be_bytes());
                b[6..8].copy_from_slice(&(flags | 0x2000).to_be_bytes());
                b[8] = ttl;
            }
            ipv4::Packet::new_unchecked(&mut f[14..]).fill_checksum();
            let port = if to == 0 { 0 } else { 1 };
            let (v, _) = r.run_with_headroom(port, &f, 64);
            packets += 1;
            match v {
                Verdict::Transmit(_) => transmitted += 1,
                Verdict::Drop(_) | Verdict::Consumed => {}
                other => prop_assert!(false, "verdict {:?}", other),
            }
            r.pipe.drain_released(|_, _| sent += 1);
        }
        r.now += DEFAULT_TIMEOUT_NS;
        r.pipe.housekeeping(&r.snap, r.now);
        let c = r.pipe.counters();
        prop_assert_eq!(sent, c.fragments_released.get());
        // Every packet is counted once: transmitted, dropped under one
        // reason, or held (consumed); and every held one was sent or
        // discarded.
        let consumed = c.consumed.get() - consumed_before;
        prop_assert_eq!(packets, transmitted + c.total_drops() + consumed);
        prop_assert_eq!(consumed, c.fragments_held.get());
        prop_assert_eq!(c.fragments_held.get(), sent + c.fragments_discarded.get());
        prop_assert!(r.pipe.held_fragments().is_empty());
    }
}
