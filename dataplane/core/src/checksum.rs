//! Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! Owns: the one's-complement arithmetic. Knows nothing of header layouts;
//! the wire modules call it with the right byte ranges.

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
