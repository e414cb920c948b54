//! Flow hashing that is stable across machines, CPUs and releases.
//!
//! Several gateways with the same configuration must send a given flow to the
//! same backend, so the hashes here are specified bit for bit, with fixed
//! constants: never a randomly seeded or CPU-feature-dependent hasher (no
//! `ahash`, no `RandomState`, no SIMD or CRC instructions chosen at run time).
//! Changing any output is a breaking change for a fleet of gateways running
//! mixed releases, which is why the golden values are tested.
//!
//! Owns: [`FlowKey`] and [`FlowKey6`] (the IPv4 and IPv6 5-tuples),
//! [`flow_hash`] and [`flow_hash6`] (of an IPv4 and an IPv6 key, per
//! packet) and [`stable_hash`] (for
//! Maglev permutations, at table build time). Must not touch packet bytes:
//! callers extract the key.
//!
//! Both functions use only integer operations whose results Rust defines
//! exactly (wrapping multiplication, 64x64->128-bit multiplication, shifts,
//! xor), so they are the same on every target, whatever its endianness or
//! word size.

/// The 5-tuple of an IPv4 flow, addresses and ports in host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Source address.
    pub src_addr: u32,
    /// Destination address.
    pub dst_addr: u32,
    /// Source port (0 for protocols without ports).
    pub src_port: u16,
    /// Destination port (0 for protocols without ports).
    pub dst_port: u16,
    /// IP protocol number.
    pub protocol: u8,
}

/// The 5-tuple of an IPv6 flow, addresses and ports in host byte order (an
/// address's first byte on the wire is the most significant byte of its
/// `u128`). Kept apart from [`FlowKey`] so that an IPv4 flow's key, and the
/// IPv4 connection-tracking entry built from it, stay small.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey6 {
    /// Source address.
    pub src_addr: u128,
    /// Destination address.
    pub dst_addr: u128,
    /// Source port (0 for protocols without ports).
    pub src_port: u16,
    /// Destination port (0 for protocols without ports).
    pub dst_port: u16,
    /// IP protocol number (the upper-layer protocol, after any extension
    /// headers).
    pub protocol: u8,
}

// Fixed constants for `flow_hash`: hexadecimal digits of the fractional part
// of pi, chosen so that nobody can suspect them of being tuned. What matters
// beyond that is stated where each is used.
const FLOW_KEY_A: u64 = 0x243F_6A88_85A3_08D3;
const FLOW_KEY_B: u64 = 0x1319_8A2E_0370_7344;
const FLOW_FINISH: u64 = 0x082E_FA98_EC4E_6C89;

/// Multiplies two words into 128 bits and xors the halves together.
///
/// One 64x64->128 multiplication (a single `mul`/`umulh` pair on x86-64 and
/// AArch64) mixes every input bit into the middle of the product; folding the
/// halves brings that mixing to both ends of the result.
#[inline]
const fn folded_multiply(x: u64, y: u64) -> u64 {
    let product = (x as u128).wrapping_mul(y as u128);
    (product as u64) ^ ((product >> 64) as u64)
}

/// Hash of a flow's 5-tuple. Stable: the same key gives the same value on
/// every machine and in every release (golden values are tested).
///
/// Specification: pack the key into two words,
/// `a = src_addr << 32 | src_port << 16 | protocol << 8` and
/// `b = dst_addr << 32 | dst_port << 16`; then
/// `h = fold(a ^ FLOW_KEY_A, b ^ FLOW_KEY_B)`, `h = fold(h, FLOW_FINISH)`,
/// result `(h ^ h >> 32) as u32`, where `fold(x, y)` is the 128-bit product
/// of `x` and `y` with its high and low halves xored.
///
/// The hash is direction-sensitive: a reply's key (source and destination
/// swapped) hashes differently. All 32 bits are well mixed, so callers may
/// reduce it by its low bits (`& mask`) or its high bits (multiply-shift).
#[inline]
#[must_use]
pub fn flow_hash(key: &FlowKey) -> u32 {
    // The low 8 bits of `a` and the low 16 bits of `b` are always zero, and
    // both constants have bits set there: neither factor of the first
    // multiplication can be zero, so no key can make the product collapse
    // and erase the other word's contribution.
    let a = (u64::from(key.src_addr) << 32) | (u64::from(key.src_port) << 16) | (u64::from(key.protocol) << 8);
    let b = (u64::from(key.dst_addr) << 32) | (u64::from(key.dst_port) << 16);
    // A single folded multiply leaves the extreme bits of the result depending
    // on few input bits; the second round (by an odd constant) spreads them.
    let h = folded_multiply(a ^ FLOW_KEY_A, b ^ FLOW_KEY_B);
    let h = folded_multiply(h, FLOW_FINISH);
    (h ^ (h >> 32)) as u32
}

// Four more words of pi's fractional part, for `flow_hash6`: the third,
// fifth, sixth and seventh after the point (the first, second and fourth
// are `FLOW_KEY_A`, `FLOW_KEY_B` and `FLOW_FINISH`). The top bytes of the
// two xored with an address's high half (0xA4, 0xBE) lie outside every IPv6
// block in use (::/8, 2000::/3, fc00::/7, fe80::/10, ff00::/8), so that
// factor is never zero for an address in use; the two multipliers are odd.
const FLOW6_SRC_HI: u64 = 0xA409_3822_299F_31D0;
const FLOW6_SRC_MUL: u64 = 0x4528_21E6_38D0_1377;
const FLOW6_DST_HI: u64 = 0xBE54_66CF_34E9_0C6C;
const FLOW6_DST_MUL: u64 = 0xC0AC_29B7_C97C_50DD;

/// Hash of an IPv6 flow's 5-tuple, for Maglev: stable like [`flow_hash`]
/// (golden values are tested), and an independent function of it.
///
/// Specification: each address becomes one word, its high half mixed and
/// its low half xored in whole,
/// `s = fold(src_hi ^ FLOW6_SRC_HI, FLOW6_SRC_MUL) ^ src_lo` and
/// `d = fold(dst_hi ^ FLOW6_DST_HI, FLOW6_DST_MUL) ^ dst_lo` (`hi` and `lo`
/// the address's high and low 64 bits); then, as [`flow_hash`] with those
/// words in place of the IPv4 addresses' places,
/// `a = s ^ (src_port << 16 | protocol << 8)`, `b = d ^ (dst_port << 16)`,
/// `h = fold(a ^ FLOW_KEY_A, b ^ FLOW_KEY_B)`, `h = fold(h, FLOW_FINISH)`,
/// result `(h ^ h >> 32) as u32`.
///
/// Direction-sensitive, and all 32 bits well mixed, like [`flow_hash`]. No
/// address loses a bit in the first step. Unlike [`flow_hash`], the main
/// multiplication's factors are not structurally nonzero: a client can
/// pick an interface identifier that zeroes one, and so choose its backend,
/// which any client of a stable hash can do by trying source ports. Flood
/// resistance is the connection-tracking tables' keyed hash, not this one.
#[inline]
#[must_use]
pub fn flow_hash6(key: &FlowKey6) -> u32 {
    let word = |x: u128, hi_key: u64, mul: u64| folded_multiply((x >> 64) as u64 ^ hi_key, mul) ^ x as u64;
    let s = word(key.src_addr, FLOW6_SRC_HI, FLOW6_SRC_MUL);
    let d = word(key.dst_addr, FLOW6_DST_HI, FLOW6_DST_MUL);
    let a = s ^ (u64::from(key.src_port) << 16) ^ (u64::from(key.protocol) << 8);
    let b = d ^ (u64::from(key.dst_port) << 16);
    let h = folded_multiply(a ^ FLOW_KEY_A, b ^ FLOW_KEY_B);
    let h = folded_multiply(h, FLOW_FINISH);
    (h ^ (h >> 32)) as u32
}

// FNV-1a, 64-bit variant: the offset basis and prime from the FNV
// specification.
const FNV_OFFSET_BASIS: u64 = 0xCBF2_9CE4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01B3;

/// MurmurHash3's 64-bit finaliser: a bijection on `u64` with full avalanche
/// (every input bit flips every output bit with probability close to 1/2).
#[inline]
const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^= h >> 33;
    h
}

/// Plain 64-bit FNV-1a starting from `basis`.
#[inline]
fn fnv1a(bytes: &[u8], basis: u64) -> u64 {
    bytes.iter().fold(basis, |h, &byte| (h ^ u64::from(byte)).wrapping_mul(FNV_PRIME))
}

/// Seeded 64-bit hash of a byte string, stable on every machine and in every
/// release (golden values are tested). Maglev derives each backend's
/// permutation from it, at table build time only.
///
/// Specification: `fmix64(fnv1a_64(bytes, basis = FNV_OFFSET_BASIS ^
/// fmix64(seed)))`, where `fnv1a_64` is FNV-1a with the standard 64-bit prime
/// and `fmix64` is MurmurHash3's 64-bit finaliser. With seed 0 this is
/// exactly `fmix64` of standard FNV-1a-64.
///
/// Why this and not SipHash: both well-known parts are a few lines, need no
/// dependency and are trivially reproduced in any language (a second
/// implementation, say in a test tool, must agree bit for bit). FNV-1a's own
/// weakness, poor avalanche in its last bytes (keys like `...:8080` and
/// `...:8081` differ only there), is removed by the finaliser. Resistance to
/// chosen inputs is not needed: backend keys come from the operator's
/// configuration, not from packets.
#[must_use]
pub fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    // The seed goes through the finaliser first so that seeds differing in one
    // bit start from unrelated states: Maglev needs its two hashes (offset and
    // skip) to be independent.
    fmix64(fnv1a(bytes, FNV_OFFSET_BASIS ^ fmix64(seed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src_addr: u32, dst_addr: u32, src_port: u16, dst_port: u16, protocol: u8) -> FlowKey {
        FlowKey { src_addr, dst_addr, src_port, dst_port, protocol }
    }

    /// The golden values of a stable hash: part of the contract between
    /// gateways.
    fn assert_golden<K: core::fmt::Debug>(cases: &[(K, u32)], hash: fn(&K) -> u32) {
        for (k, want) in cases {
            assert_eq!(hash(k), *want, "{k:?}");
        }
    }

    /// A fixed-seed xorshift generator: deterministic statistical tests.
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// For `samples` keys from `random`, flips each of `bits` input bits
    /// alone: every flip must change the hash, and each output bit must
    /// flip with a probability within `tolerance` of 1/2. Returns the worst
    /// bias seen.
    fn assert_avalanche<K: Copy + core::fmt::Debug>(
        bits: usize,
        samples: u32,
        tolerance: f64,
        mut random: impl FnMut() -> K,
        flip: impl Fn(&mut K, usize),
        hash: fn(&K) -> u32,
    ) -> f64 {
        let mut flips = vec![[0u32; 32]; bits];
        for _ in 0..samples {
            let base = random();
            let h = hash(&base);
            for (bit, counts) in flips.iter_mut().enumerate() {
                let mut k = base;
                flip(&mut k, bit);
                let diff = h ^ hash(&k);
                assert_ne!(diff, 0, "flipping input bit {bit} of {base:?} left the hash unchanged");
                for (out, count) in counts.iter_mut().enumerate() {
                    *count += (diff >> out) & 1;
                }
            }
        }
        let mut worst = 0.0f64;
        for (bit, counts) in flips.iter().enumerate() {
            for (out, &count) in counts.iter().enumerate() {
                let p = f64::from(count) / f64::from(samples);
                worst = worst.max((p - 0.5).abs());
                assert!((p - 0.5).abs() <= tolerance, "input bit {bit} flips output bit {out} with probability {p}");
            }
        }
        worst
    }

    /// 198.18.0.0/15 addresses, as the test rig uses.
    const CLIENT: u32 = 0xC612_0001; // 198.18.0.1
    const VIP: u32 = 0xC613_0064; // 198.19.0.100

    #[test]
    fn flow_hash_golden_values() {
        // These values are part of the contract between gateways: if this
        // test fails, the hash changed and gateways of different releases
        // would disagree on backends. They were also computed by a separate
        // implementation written from the specification on `flow_hash`.
        let cases = [
            (FlowKey::default(), 0x3E84_DB21),
            (key(CLIENT, VIP, 40000, 80, 6), 0xEC47_1C12),
            (key(CLIENT, VIP, 40001, 80, 6), 0x3F22_7910),
            (key(CLIENT, VIP, 40000, 80, 17), 0xE7DC_568E),
            (key(VIP, CLIENT, 80, 40000, 6), 0x1F78_87E7),
            (key(u32::MAX, u32::MAX, u16::MAX, u16::MAX, u8::MAX), 0xDBE0_EA64),
        ];
        assert_golden(&cases, flow_hash);
    }

    /// 2001:db8::/32 addresses.
    const CLIENT6: u128 = 0x2001_0db8_0000_0000_0000_0000_0000_0001; // 2001:db8::1
    const VIP6: u128 = 0x2001_0db8_0001_0000_0000_0000_0000_0064; // 2001:db8:1::64

    fn key6(src_addr: u128, dst_addr: u128, src_port: u16, dst_port: u16, protocol: u8) -> FlowKey6 {
        FlowKey6 { src_addr, dst_addr, src_port, dst_port, protocol }
    }

    #[test]
    fn flow_hash6_golden_values() {
        // The same contract as `flow_hash_golden_values`. Computed by a
        // separate implementation written from the specification on
        // `flow_hash6` (Python integers, 128-bit products masked).
        let cases = [
            (FlowKey6::default(), 0x88B6_1927),
            (key6(CLIENT6, VIP6, 40000, 80, 6), 0x701F_F265),
            (key6(CLIENT6, VIP6, 40001, 80, 6), 0x3116_FF44),
            (key6(CLIENT6, VIP6, 40000, 80, 17), 0x5D55_3DC1),
            (key6(VIP6, CLIENT6, 80, 40000, 6), 0x875B_EEA2),
            (key6(u128::MAX, u128::MAX, u16::MAX, u16::MAX, u8::MAX), 0x848F_C508),
        ];
        assert_golden(&cases, flow_hash6);
    }

    /// Every one of the 296 input bits, flipped alone, changes the hash,
    /// and over many random keys flips each output bit about half the time.
    #[test]
    fn every_input_bit_of_an_ipv6_key_avalanches() {
        let mut next = xorshift(0x2545_F491_4F6C_DD1D);
        let wide = |a: u64, b: u64| (u128::from(a) << 64) | u128::from(b);
        let random = move || {
            let (r1, r2, r3, r4, r5) = (next(), next(), next(), next(), next());
            key6(wide(r1, r2), wide(r3, r4), r5 as u16, (r5 >> 16) as u16, (r5 >> 32) as u8)
        };
        let flip = |k: &mut FlowKey6, bit: usize| match bit {
            0..128 => k.src_addr ^= 1 << bit,
            128..256 => k.dst_addr ^= 1 << (bit - 128),
            256..272 => k.src_port ^= 1 << (bit - 256),
            272..288 => k.dst_port ^= 1 << (bit - 272),
            _ => k.protocol ^= 1 << (bit - 288),
        };
        // 2000 samples: a fair coin stays within 0.5 +- 0.07 with
        // probability far above 1 - 1e-9 per cell.
        assert_avalanche(296, 2000, 0.07, random, flip, flow_hash6);
    }

    /// Clients that differ only in the low bits of their address's low half
    /// (one /64, as SLAAC hosts do) or only in the high half (prefixes of
    /// many sites), sequential ports, one VIP: both ends of the hash spread
    /// them evenly over 1024 buckets.
    #[test]
    fn ipv6_clients_of_one_prefix_or_many_spread_evenly() {
        const BUCKETS: usize = 1024;
        const FLOWS: u32 = 1 << 18;
        for (name, step) in [("low half", 1u128), ("high half", 1u128 << 64)] {
            let mut low = vec![0u32; BUCKETS];
            let mut high = vec![0u32; BUCKETS];
            for i in 0..FLOWS {
                let client = CLIENT6 + u128::from(i >> 8) * step;
                let h = flow_hash6(&key6(client, VIP6, 40000 + (i & 0xff) as u16, 443, 6));
                low[h as usize % BUCKETS] += 1;
                high[(h >> 22) as usize] += 1;
            }
            // Expected 256 per bucket: 1023 degrees of freedom, mean 1023,
            // standard deviation about 45.
            for (end, counts) in [("low bits", &low), ("high bits", &high)] {
                let chi2 = chi_square(counts, FLOWS);
                assert!((750.0..1300.0).contains(&chi2), "{name}, {end}: chi-square {chi2}");
            }
        }
    }

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        assert_eq!(fnv1a(b"", FNV_OFFSET_BASIS), 0xCBF2_9CE4_8422_2325);
        assert_eq!(fnv1a(b"a", FNV_OFFSET_BASIS), 0xAF63_DC4C_8601_EC8C);
        assert_eq!(fnv1a(b"foobar", FNV_OFFSET_BASIS), 0x8594_4171_F739_67E8);
    }

    #[test]
    fn seed_zero_is_finalised_plain_fnv1a() {
        assert_eq!(fmix64(0), 0);
        assert_eq!(stable_hash(b"foobar", 0), fmix64(0x8594_4171_F739_67E8));
    }

    /// Same contract as `flow_hash_golden_values`, for Maglev permutations.
    #[test]
    fn stable_hash_golden_values() {
        // Maglev's offset seed, spelled as in `maglev`.
        const MGL_OFFS: u64 = u64::from_be_bytes(*b"mgl-offs");
        assert_eq!(MGL_OFFS, 0x6D67_6C2D_6F66_6673);
        let cases: [(&[u8], u64, u64); 5] = [
            (b"", 0, 0xEFD0_1F60_BA99_2926),
            (b"", 1, 0x85BA_D54D_DA0E_0188),
            (b"198.18.1.11:8080/tcp", 0, 0xBCCC_9D44_94AA_5B99),
            (b"198.18.1.11:8080/tcp", MGL_OFFS, 0x4647_647D_1D27_8939),
            (b"198.18.1.12:8080/tcp", MGL_OFFS, 0x6C44_9D40_135F_EAE7),
        ];
        for (bytes, seed, want) in cases {
            assert_eq!(stable_hash(bytes, seed), want, "{bytes:?} seed {seed:#x}");
        }
    }

    /// Every one of the 104 input bits, flipped alone, changes the hash; over
    /// many random keys each flip changes each output bit with probability
    /// close to 1/2 (strict avalanche).
    #[test]
    fn every_input_bit_avalanches() {
        let mut next = xorshift(0x9E37_79B9_7F4A_7C15);
        let random = move || {
            let (r1, r2) = (next(), next());
            key(r1 as u32, (r1 >> 32) as u32, r2 as u16, (r2 >> 16) as u16, (r2 >> 32) as u8)
        };
        let flip = |k: &mut FlowKey, bit: usize| match bit {
            0..32 => k.src_addr ^= 1 << bit,
            32..64 => k.dst_addr ^= 1 << (bit - 32),
            64..80 => k.src_port ^= 1 << (bit - 64),
            80..96 => k.dst_port ^= 1 << (bit - 80),
            _ => k.protocol ^= 1 << (bit - 96),
        };
        // With 4000 samples a fair coin stays within 0.5 +- 0.05 with
        // probability far above 1 - 1e-9 per cell.
        let worst = assert_avalanche(104, 4000, 0.05, random, flip, flow_hash);
        println!("worst avalanche bias {worst}");
    }

    #[test]
    fn every_field_influences_the_hash() {
        let base = key(CLIENT, VIP, 40000, 80, 6);
        let h = flow_hash(&base);
        let variants = [
            FlowKey { src_addr: CLIENT + 1, ..base },
            FlowKey { dst_addr: VIP + 1, ..base },
            FlowKey { src_port: 40001, ..base },
            FlowKey { dst_port: 443, ..base },
            FlowKey { protocol: 17, ..base },
        ];
        for v in variants {
            assert_ne!(flow_hash(&v), h, "{v:?}");
        }
    }

    /// Chi-square statistic of `counts` against a uniform distribution.
    fn chi_square(counts: &[u32], total: u32) -> f64 {
        let expected = f64::from(total) / counts.len() as f64;
        counts.iter().map(|&c| (f64::from(c) - expected).powi(2) / expected).sum()
    }

    /// One million flows from 16 clients, sequential source ports, to one
    /// VIP: the worst case for a weak hash, since only a few low bits vary.
    /// Both ends of the hash must spread them evenly over 1024 buckets.
    #[test]
    fn sequential_ports_spread_evenly() {
        const BUCKETS: usize = 1024;
        const FLOWS: u32 = 1 << 20;
        let mut low = vec![0u32; BUCKETS];
        let mut high = vec![0u32; BUCKETS];
        for i in 0..FLOWS {
            let h = flow_hash(&key(CLIENT + (i >> 16), VIP, i as u16, 443, 6));
            low[h as usize % BUCKETS] += 1;
            high[(h >> 22) as usize] += 1;
        }
        // 1023 degrees of freedom: mean 1023, standard deviation about 45.
        // Six standard deviations either way: too uniform would betray a hash
        // that maps sequential inputs to sequential buckets.
        for (name, counts) in [("low bits", &low), ("high bits", &high)] {
            let chi2 = chi_square(counts, FLOWS);
            assert!((750.0..1300.0).contains(&chi2), "{name}: chi-square {chi2}");
            // Expected 1024 per bucket, standard deviation 32.
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(*min >= 1024 - 6 * 32 && *max <= 1024 + 6 * 32, "{name}: min {min} max {max}");
        }
    }

    #[test]
    fn stable_hash_seeds_and_bytes_matter() {
        let k = b"198.18.1.11:8080/tcp";
        assert_ne!(stable_hash(k, 1), stable_hash(k, 2));
        assert_ne!(stable_hash(k, 1), stable_hash(b"198.18.1.11:8081/tcp", 1));
        // Length matters even when the extra byte is zero.
        assert_ne!(stable_hash(b"", 7), stable_hash(b"\0", 7));
    }

    /// Keys that differ only in their last byte still get unrelated hashes:
    /// each output bit differs in about half of the pairs.
    #[test]
    fn stable_hash_avalanches_on_the_last_byte() {
        let mut counts = [0u32; 64];
        let pairs = 2000u32;
        for i in 0..pairs {
            let a = format!("198.18.{}.{}:8080/tcp", i / 250, i % 250);
            let mut b = a.clone().into_bytes();
            *b.last_mut().unwrap() ^= 1;
            let diff = stable_hash(a.as_bytes(), 42) ^ stable_hash(&b, 42);
            for (bit, c) in counts.iter_mut().enumerate() {
                *c += ((diff >> bit) & 1) as u32;
            }
        }
        for (bit, &c) in counts.iter().enumerate() {
            let p = f64::from(c) / f64::from(pairs);
            assert!((0.42..=0.58).contains(&p), "output bit {bit}: {p}");
        }
    }
}
