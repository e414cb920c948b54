//! Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! Owns: the one's-complement arithmetic and the pseudo-headers. Knows
//! nothing of header layouts (save where the UDP checksum sits, for IPv6's
//! rule that it must not be zero); the wire modules call it with the right
//! byte ranges.

/// One's-complement sum of `data` as big-endian 16-bit words, not yet folded.
/// An odd trailing byte is padded with zero, as RFC 1071 says.
#[inline]
pub fn sum(data: &[u8]) -> u32 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        // Sum 32-bit big-endian halves into a 64-bit accumulator; carries are
        // folded at the end, which is equivalent for one's-complement sums.
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        acc += u64::from(u32::from_be_bytes([c[4], c[5], c[6], c[7]]));
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for w in &mut rest {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    // Fold 64 -> 32 bits keeping the carries (end-around).
    let folded = (acc & 0xffff_ffff) + (acc >> 32);
    ((folded & 0xffff_ffff) + (folded >> 32)) as u32
}

/// Folds a 32-bit partial sum to 16 bits with end-around carry.
#[inline(always)]
pub fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc as u16
}

/// Adds two partial sums.
#[inline(always)]
pub fn combine(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s + u32::from(carry)
}

/// The checksum field value for `data` (complement of the folded sum).
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

/// Partial sum of the IPv4 pseudo-header used by TCP and UDP.
#[inline]
pub fn pseudo_header_v4(src: u32, dst: u32, protocol: u8, l4_len: u16) -> u32 {
    let s = u64::from(src >> 16)
        + u64::from(src & 0xffff)
        + u64::from(dst >> 16)
        + u64::from(dst & 0xffff)
        + u64::from(protocol)
        + u64::from(l4_len);
    ((s & 0xffff_ffff) + (s >> 32)) as u32
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word of the covered
/// data changed from `old` to `new`: `HC' = ~(~HC + ~m + m')`.
///
/// Unlike eqn. 2 of RFC 1141, this never produces the "negative zero"
/// 0x0000 from a non-zero checksum through end-around carry mishaps.
#[inline(always)]
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    let acc = u32::from(!check) + u32::from(!old) + u32::from(new);
    !fold(acc)
}

/// Like [`update16`], for a 32-bit field (an IPv4 address).
#[inline(always)]
pub fn update32(check: u16, old: u32, new: u32) -> u16 {
    let acc =
        u32::from(!check) + u32::from(!(old >> 16) as u16) + u32::from(!(old as u16)) + (new >> 16) + (new & 0xffff);
    !fold(acc)
}

/// Partial sum of the IPv6 pseudo-header (RFC 8200 section 8.1) used by
/// TCP, UDP and ICMPv6: both addresses, the upper-layer length as 32 bits
/// and the next-header value. `l4_len` is the length of the upper-layer
/// message (its header and payload), not the IPv6 payload length when
/// extension headers sit in between.
#[inline]
pub fn pseudo_header_v6(src: &[u8; 16], dst: &[u8; 16], next_header: u8, l4_len: u32) -> u32 {
    let mut s: u64 = u64::from(l4_len >> 16) + u64::from(l4_len & 0xffff) + u64::from(next_header);
    for w in src.chunks_exact(2).chain(dst.chunks_exact(2)) {
        s += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    // 35 terms of at most 16 bits: the sum fits in 22 bits.
    s as u32
}

/// The checksum field value for an upper-layer message over IPv6: `data` is
/// the whole message (header and payload) with its checksum field holding
/// zero. For UDP use [`udp_v6`], which maps a computed zero to 0xffff.
///
/// A message longer than `u32::MAX` bytes cannot occur (IPv6 jumbograms are
/// not supported); its length is truncated to 32 bits.
#[inline]
pub fn checksum_v6(src: &[u8; 16], dst: &[u8; 16], next_header: u8, data: &[u8]) -> u16 {
    !fold(combine(pseudo_header_v6(src, dst, next_header, data.len() as u32), sum(data)))
}

/// True if the checksum of an upper-layer message over IPv6 verifies: the
/// sum of the pseudo-header and `data` (checksum field included) is
/// all ones.
#[inline]
pub fn verify_v6(src: &[u8; 16], dst: &[u8; 16], next_header: u8, data: &[u8]) -> bool {
    fold(combine(pseudo_header_v6(src, dst, next_header, data.len() as u32), sum(data))) == 0xffff
}

/// IP protocol number of TCP, for the pseudo-header.
const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP, for the pseudo-header.
const PROTO_UDP: u8 = 17;
/// IPv6 next-header number of ICMPv6, for the pseudo-header.
const PROTO_ICMPV6: u8 = 58;

/// The TCP checksum over IPv6 for `segment` (header and payload, checksum
/// field zero).
#[inline]
pub fn tcp_v6(src: &[u8; 16], dst: &[u8; 16], segment: &[u8]) -> u16 {
    checksum_v6(src, dst, PROTO_TCP, segment)
}

/// The UDP checksum over IPv6 for `datagram` (header and payload, checksum
/// field zero). A computed zero is returned as 0xffff: over IPv6 the UDP
/// checksum is mandatory and zero means "none" (RFC 8200 section 8.1).
#[inline]
pub fn udp_v6(src: &[u8; 16], dst: &[u8; 16], datagram: &[u8]) -> u16 {
    match checksum_v6(src, dst, PROTO_UDP, datagram) {
        0 => 0xffff,
        c => c,
    }
}

/// The ICMPv6 checksum (RFC 4443 section 2.3) for `message` (checksum field
/// zero).
#[inline]
pub fn icmpv6(src: &[u8; 16], dst: &[u8; 16], message: &[u8]) -> u16 {
    checksum_v6(src, dst, PROTO_ICMPV6, message)
}

/// True if a TCP segment's checksum over IPv6 verifies.
#[inline]
pub fn verify_tcp_v6(src: &[u8; 16], dst: &[u8; 16], segment: &[u8]) -> bool {
    verify_v6(src, dst, PROTO_TCP, segment)
}

/// True if a UDP datagram's checksum over IPv6 verifies. A zero checksum
/// field ("none") does not verify: RFC 8200 makes it mandatory over IPv6.
/// `datagram` must be at least 8 bytes long for the zero test; a shorter one
/// does not verify.
#[inline]
pub fn verify_udp_v6(src: &[u8; 16], dst: &[u8; 16], datagram: &[u8]) -> bool {
    match datagram.get(6..8) {
        Some([0, 0]) | None => false,
        Some(_) => verify_v6(src, dst, PROTO_UDP, datagram),
    }
}

/// True if an ICMPv6 message's checksum verifies.
#[inline]
pub fn verify_icmpv6(src: &[u8; 16], dst: &[u8; 16], message: &[u8]) -> bool {
    verify_v6(src, dst, PROTO_ICMPV6, message)
}

/// Like [`update32`], for a 128-bit field (an IPv6 address in a
/// pseudo-header, as NAT66 rewrites it): RFC 1624 eqn. 3 over its eight
/// 16-bit words.
#[inline(always)]
pub fn update128(check: u16, old: &[u8; 16], new: &[u8; 16]) -> u16 {
    let mut acc = u32::from(!check);
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        acc += u32::from(!u16::from_be_bytes([o[0], o[1]])) + u32::from(u16::from_be_bytes([n[0], n[1]]));
    }
    // 17 terms of at most 16 bits: no overflow.
    !fold(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deliberately naive RFC 1071 implementation, independent of `sum`.
    fn reference(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        let mut i = 0;
        while i < data.len() {
            let hi = u32::from(data[i]) << 8;
            let lo = data.get(i + 1).map_or(0, |b| u32::from(*b));
            acc += hi | lo;
            while acc > 0xffff {
                acc = (acc & 0xffff) + (acc >> 16);
            }
            i += 2;
        }
        !(acc as u16)
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3 example bytes: sum is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // A real IPv4 header whose checksum field (0xb861) is correct.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr), 0);
        let mut zeroed = hdr;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(checksum(&zeroed), 0xb861);
    }

    // 2001:db8::1 and 2001:db8::2:3.
    const V6_SRC: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const V6_DST: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 3];

    #[test]
    fn pseudo_header_v6_matches_naive_layout() {
        // The pseudo-header laid out as bytes (RFC 8200 figure in 8.1).
        let mut ph = Vec::new();
        ph.extend_from_slice(&V6_SRC);
        ph.extend_from_slice(&V6_DST);
        ph.extend_from_slice(&0x0001_0203u32.to_be_bytes());
        ph.extend_from_slice(&[0, 0, 0, 17]);
        assert_eq!(fold(pseudo_header_v6(&V6_SRC, &V6_DST, 17, 0x0001_0203)), fold(sum(&ph)));
    }

    #[test]
    fn tcp_v6_matches_etherparse() {
        let mut h = etherparse::TcpHeader::new(40000, 443, 0x0102_0304, 65535);
        h.syn = true;
        let payload = b"hello, v6";
        let want = h.calc_checksum_ipv6_raw(V6_SRC, V6_DST, payload).unwrap();
        h.checksum = 0;
        let mut seg = h.to_bytes().to_vec();
        seg.extend_from_slice(payload);
        assert_eq!(tcp_v6(&V6_SRC, &V6_DST, &seg), want);
        seg[16..18].copy_from_slice(&want.to_be_bytes());
        assert!(verify_tcp_v6(&V6_SRC, &V6_DST, &seg));
        seg[20] ^= 1;
        assert!(!verify_tcp_v6(&V6_SRC, &V6_DST, &seg));
    }

    #[test]
    fn udp_v6_matches_etherparse() {
        for payload in [&b""[..], b"x", b"odd length!", b"even length!"] {
            let h = etherparse::UdpHeader::with_ipv6_checksum(
                5353,
                53,
                &etherparse::Ipv6Header { source: V6_SRC, destination: V6_DST, ..Default::default() },
                payload,
            )
            .unwrap();
            let mut d = h.to_bytes().to_vec();
            d.extend_from_slice(payload);
            assert!(verify_udp_v6(&V6_SRC, &V6_DST, &d));
            d[6..8].copy_from_slice(&[0, 0]);
            assert_eq!(udp_v6(&V6_SRC, &V6_DST, &d), h.checksum);
            // Zero means "no checksum", which IPv6 does not allow.
            assert!(!verify_udp_v6(&V6_SRC, &V6_DST, &d));
        }
        assert!(!verify_udp_v6(&V6_SRC, &V6_DST, &[0; 7]));
    }

    #[test]
    fn udp_v6_zero_becomes_all_ones() {
        // Find a payload word that makes the computed checksum zero.
        let mut d = vec![0x13, 0x89, 0x00, 0x35, 0x00, 0x0a, 0, 0, 0, 0];
        let c = checksum_v6(&V6_SRC, &V6_DST, 17, &d);
        // Adding the current checksum value to the sum drives it to all ones.
        d[8..10].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum_v6(&V6_SRC, &V6_DST, 17, &d), 0);
        assert_eq!(udp_v6(&V6_SRC, &V6_DST, &d), 0xffff);
        d[6..8].copy_from_slice(&[0xff, 0xff]);
        assert!(verify_udp_v6(&V6_SRC, &V6_DST, &d));
    }

    #[test]
    fn icmpv6_matches_etherparse() {
        let t = etherparse::Icmpv6Type::EchoRequest(etherparse::IcmpEchoHeader { id: 0x1234, seq: 9 });
        let payload = b"ping";
        let want = t.calc_checksum(V6_SRC, V6_DST, payload).unwrap();
        let mut m = vec![128, 0, 0, 0, 0x12, 0x34, 0, 9];
        m.extend_from_slice(payload);
        assert_eq!(icmpv6(&V6_SRC, &V6_DST, &m), want);
        m[2..4].copy_from_slice(&want.to_be_bytes());
        assert!(verify_icmpv6(&V6_SRC, &V6_DST, &m));
        assert!(!verify_icmpv6(&V6_DST, &V6_SRC, &[129, 0, 0, 0, 0x12, 0x34, 0, 9]));
    }

    proptest::proptest! {
        #[test]
        fn update128_matches_recompute(
            src in proptest::array::uniform16(proptest::num::u8::ANY),
            new in proptest::array::uniform16(proptest::num::u8::ANY),
            dst in proptest::array::uniform16(proptest::num::u8::ANY),
            data in proptest::collection::vec(proptest::num::u8::ANY, 8..80),
        ) {
            let c = checksum_v6(&src, &dst, 6, &data);
            let c2 = update128(c, &src, &new);
            // Verify with the checksum added to the sum (either zero form).
            let s = combine(combine(pseudo_header_v6(&new, &dst, 6, data.len() as u32), sum(&data)), u32::from(c2));
            proptest::prop_assert_eq!(fold(s), 0xffff);
        }
    }

    proptest::proptest! {
        #[test]
        fn sum_matches_reference(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            proptest::prop_assert_eq!(checksum(&data), reference(&data));
        }

        #[test]
        fn incremental_update_matches_recompute(
            mut data in proptest::collection::vec(proptest::num::u8::ANY, 4..64),
            word in 0usize..30,
            new16 in proptest::num::u16::ANY,
            new32 in proptest::num::u32::ANY,
        ) {
            let len = data.len() & !1;
            data.truncate(len);
            let at = (word * 2) % (len - 2);
            let c = checksum(&data);
            let old16 = u16::from_be_bytes([data[at], data[at + 1]]);
            data[at..at + 2].copy_from_slice(&new16.to_be_bytes());
            let c16 = update16(c, old16, new16);
            // One's-complement has two zeros; the checksum must verify either way.
            proptest::prop_assert_eq!(fold(combine(sum(&data), u32::from(c16))), 0xffff);

            if len >= 6 {
                let at = (word * 2) % (len - 4);
                let c = checksum(&data);
                let old32 = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
                data[at..at + 4].copy_from_slice(&new32.to_be_bytes());
                let c32 = update32(c, old32, new32);
                proptest::prop_assert_eq!(fold(combine(sum(&data), u32::from(c32))), 0xffff);
            }
        }
    }
}
