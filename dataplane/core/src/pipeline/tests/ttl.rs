//! A packet whose TTL would reach 0 here: ICMP time exceeded from the
//! ingress port's address, within the worker's rate, in every direction
//! the gateway translates.

use super::modes::{POOL_ADDR, POOL_ADDR2, dsr, fullnat, spec_mode};
use super::*;

/// Checks `out` is ICMP time exceeded in transit from `from` (MAC `gw`) to
/// `to` (MAC `to_mac`), quoting `original`'s IP header and the first 8
/// bytes after it; every checksum is checked by etherparse.
fn assert_time_exceeded(out: &[u8], original: &[u8], from: u32, gw: [u8; 6], to: u32, to_mac: [u8; 6]) {
    let s = SlicedPacket::from_ethernet(out).expect("etherparse parses the ICMP error");
    let eth = etherparse::Ethernet2HeaderSlice::from_slice(out).unwrap();
    assert_eq!((eth.source(), eth.destination()), (gw, to_mac), "MACs");
    let Some(NetSlice::Ipv4(ip)) = &s.net else { panic!("not IPv4") };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 header checksum");
    assert_eq!((u32::from_be_bytes(h.source), u32::from_be_bytes(h.destination)), (from, to));
    assert_eq!((h.time_to_live, h.protocol), (64, etherparse::IpNumber::ICMP));
    let Some(TransportSlice::Icmpv4(icmp)) = &s.transport else { panic!("not ICMP: {:?}", s.transport) };
    assert_eq!(icmp.header().checksum, icmp.icmp_type().calc_checksum(icmp.payload()), "ICMP checksum");
    assert_eq!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit)
    );
    let hl = usize::from(original[14] & 0x0f) * 4;
    assert_eq!(icmp.payload(), &original[14..14 + hl + 8], "the quoted header and the first 8 bytes after it");
    assert_eq!(out.len(), 14 + 20 + 8 + hl + 8, "the frame ends after the quote");
}

#[test]
fn a_client_packet_that_would_expire_gets_time_exceeded_from_the_ingress_port() {
    for ttl in [1, 0] {
        let mut r = Rig::resolved();
        for f in [tcp_frame((CLIENT, 40000), (VIP, 80), ttl, b"data"), udp_frame((CLIENT, 33434), (VIP, 53), ttl, b"q")]
        {
            let (v, out) = r.run_with_headroom(0, &f, 64);
            assert_eq!(v, Verdict::Transmit(0), "answered on the ingress port (ttl {ttl})");
            assert_time_exceeded(&out, &f, GW_C_IP, GW_C, CLIENT, CLIENT_MAC);
        }
        assert_eq!(r.pipe.counters().icmp_time_exceeded.get(), 2);
        assert_eq!(r.pipe.counters().drops(DropReason::TtlExceeded), 0);
        assert_eq!(r.pipe.counters().nat_forward.get(), 0, "nothing forwarded");
        assert_eq!(r.pipe.flows().occupied(), 0, "no flow created");
    }
    // TTL 2 leaves with 1.
    let mut r = Rig::resolved();
    let (v, out) = r.run_with_headroom(0, &tcp_frame((CLIENT, 40000), (VIP, 80), 2, b""), 64);
    assert_eq!((v, inspect(&out).4), (Verdict::Transmit(1), 1));
}

#[test]
fn every_mode_answers_a_client_packet_that_would_expire() {
    for mode in [fullnat(), dsr()] {
        let mut r = Rig::with_spec(&spec_mode(&mode, (20000, 20999)));
        let f = tcp_frame((CLIENT, 40000), (VIP, 80), 1, b"");
        let (v, out) = r.run_with_headroom(0, &f, 64);
        assert_eq!(v, Verdict::Transmit(0), "{mode:?}");
        assert_time_exceeded(&out, &f, GW_C_IP, GW_C, CLIENT, CLIENT_MAC);
        assert_eq!(r.pipe.flows().occupied(), 0, "{mode:?}: no flow, no source pair taken");
    }
}

#[test]
fn a_reply_that_would_expire_gets_time_exceeded_back_to_its_backend() {
    // nat: the reply of a backend, translated back from configuration.
    let mut r = Rig::resolved();
    let f = tcp_frame((BACKENDS[1], 8080), (CLIENT, 40000), 1, b"");
    let (v, out) = r.run_with_headroom(1, &f, 64);
    assert_eq!(v, Verdict::Transmit(1), "answered on the backend's port");
    assert_time_exceeded(&out, &f, GW_B_IP, GW_B, BACKENDS[1], BACKEND_MACS[1]);

    // fullnat: the reply to a source pair of a live flow.
    let mut r = Rig::with_spec(&spec_mode(&fullnat(), (20000, 20999)));
    let syn = tcp_frame((CLIENT, 40000), (VIP, 80), 64, b"");
    let (v, out) = r.run_with_headroom(0, &syn, 64);
    assert_eq!(v, Verdict::Transmit(1));
    let (_, _, pair, backend, _, pair_port, bport) = inspect(&out);
    assert!(pair == POOL_ADDR || pair == POOL_ADDR2);
    let i = BACKENDS.iter().position(|b| *b == backend).unwrap();
    let reply = tcp_frame((backend, bport), (pair, pair_port), 1, b"");
    let (v, out) = r.run_with_headroom(1, &reply, 64);
    assert_eq!(v, Verdict::Transmit(1));
    assert_time_exceeded(&out, &reply, GW_B_IP, GW_B, backend, BACKEND_MACS[i]);
    assert_eq!(r.pipe.counters().icmp_time_exceeded.get(), 1);
    // A reply to a pair no flow holds is no flow's: not answered.
    let stray = tcp_frame((backend, bport), (pair, pair_port.wrapping_add(1)), 1, b"");
    let (v, _) = r.run_with_headroom(1, &stray, 64);
    assert_eq!(v, Verdict::Drop(DropReason::NoFlow));
}

#[test]
fn without_headroom_for_the_answer_an_expiring_packet_is_dropped_unchanged() {
    let mut r = Rig::resolved();
    let f = tcp_frame((CLIENT, 40000), (VIP, 80), 1, b"");
    for headroom in [0, 27] {
        let (v, out) = r.run_with_headroom(0, &f, headroom);
        assert_eq!(v, Verdict::Drop(DropReason::TtlExceeded), "headroom {headroom}");
        assert_eq!(out, f, "unchanged");
    }
    let (v, _) = r.run_with_headroom(0, &f, 28);
    assert_eq!(v, Verdict::Transmit(0), "28 bytes are enough");
}

#[test]
fn time_exceeded_answers_are_rate_limited_per_worker() {
    let mut r = Rig::resolved();
    let f = udp_frame((CLIENT, 33434), (VIP, 53), 1, b"probe");
    let answer = |r: &mut Rig| r.run_with_headroom(0, &f, 64).0 == Verdict::Transmit(0);
    // A burst at one instant: ICMP_ERRORS_BURST answers, then drops.
    let burst = (0..200).filter(|_| answer(&mut r)).count();
    assert_eq!(burst, ICMP_ERRORS_BURST as usize);
    assert_eq!(r.pipe.counters().drops(DropReason::TtlExceeded), 200 - u64::from(ICMP_ERRORS_BURST));
    // One more per 1/ICMP_ERRORS_PER_SEC s.
    let per_token = 1_000_000_000 / ICMP_ERRORS_PER_SEC;
    r.now += per_token - 1;
    assert!(!answer(&mut r), "not yet");
    r.now += 1;
    assert!(answer(&mut r), "a token earned");
    assert!(!answer(&mut r));
    // A long pause refills the bucket to its burst, no more.
    r.now += 3_600 * 1_000_000_000;
    let after_pause = (0..200).filter(|_| answer(&mut r)).count();
    assert_eq!(after_pause, ICMP_ERRORS_BURST as usize);
    // A flood at ten times the rate for a second gets the rate, not more.
    r.now += 1_000_000_000;
    let (mut answered, step) = (0, per_token / 10);
    for _ in 0..10 * ICMP_ERRORS_PER_SEC {
        r.now += step;
        answered += u64::from(answer(&mut r));
    }
    assert!(
        (ICMP_ERRORS_PER_SEC..=ICMP_ERRORS_PER_SEC + u64::from(ICMP_ERRORS_BURST)).contains(&answered),
        "{answered} answers in one second of flood"
    );
}
