//! A service's source allow-list: the client prefixes it serves.
//!
//! Owns: [`SourceRanges`], compiled once per snapshot from the configured
//! prefixes (host bits masked off, overlapping and adjacent prefixes merged
//! into disjoint address intervals, sorted), and the per-packet question
//! "is this client address inside?", a binary search over at most
//! [`MAX_SOURCE_RANGES`] intervals. Must not allocate, lock or log when
//! asked; an empty list allows every source and costs one comparison.

use crate::snapshot::Ipv4Cidr;

/// Most prefixes a service's source list may hold. A binary search over
/// 256 intervals is at most 8 steps.
pub const MAX_SOURCE_RANGES: usize = 256;

/// Why a list of prefixes cannot be compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceRangesError {
    /// More than [`MAX_SOURCE_RANGES`] prefixes.
    #[error("{0} prefixes; at most {MAX_SOURCE_RANGES}")]
    TooMany(usize),
    /// A prefix length above 32.
    #[error("prefix length {0} is not from 0 to 32")]
    PrefixLen(u8),
}

/// The client addresses a service accepts, as disjoint inclusive intervals
/// `(first, last)` sorted by `first`, with no two adjacent. Empty: every
/// address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceRanges {
    ranges: Box<[(u32, u32)]>,
}

impl SourceRanges {
    /// Compiles `prefixes`; their host bits are ignored.
    pub fn new(prefixes: &[Ipv4Cidr]) -> Result<SourceRanges, SourceRangesError> {
        if prefixes.len() > MAX_SOURCE_RANGES {
            return Err(SourceRangesError::TooMany(prefixes.len()));
        }
        let mut spans = Vec::with_capacity(prefixes.len());
        for p in prefixes {
            if p.len > 32 {
                return Err(SourceRangesError::PrefixLen(p.len));
            }
            let mask = crate::route::Route::mask(p.len);
            spans.push((p.addr & mask, p.addr | !mask));
        }
        spans.sort_unstable();
        let mut ranges: Vec<(u32, u32)> = Vec::with_capacity(spans.len());
        for (first, last) in spans {
            match ranges.last_mut() {
                // Overlapping or adjacent: one interval.
                Some(prev) if u64::from(first) <= u64::from(prev.1) + 1 => prev.1 = prev.1.max(last),
                _ => ranges.push((first, last)),
            }
        }
        Ok(SourceRanges { ranges: ranges.into_boxed_slice() })
    }

    /// True if the list is empty: every source is allowed.
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The disjoint intervals the list compiled to.
    pub fn intervals(&self) -> &[(u32, u32)] {
        &self.ranges
    }

    /// True if a packet from `addr` may reach the service: the list is
    /// empty, or `addr` is inside one of its prefixes.
    #[inline(always)]
    pub fn allows(&self, addr: u32) -> bool {
        self.ranges.is_empty() || self.contains(addr)
    }

    /// True if `addr` is inside one of the prefixes (never, for an empty
    /// list).
    #[inline]
    pub fn contains(&self, addr: u32) -> bool {
        // The first interval starting above `addr`; the one before it is
        // the only one that can hold it.
        let i = self.ranges.partition_point(|r| r.0 <= addr);
        i > 0 && addr <= self.ranges[i - 1].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        let (a, l) = s.split_once('/').unwrap();
        Ipv4Cidr { addr: u32::from(a.parse::<std::net::Ipv4Addr>().unwrap()), len: l.parse().unwrap() }
    }

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<std::net::Ipv4Addr>().unwrap())
    }

    #[test]
    fn empty_allows_everyone_and_contains_nothing() {
        let r = SourceRanges::new(&[]).unwrap();
        assert!(r.allows(ip("1.2.3.4")) && r.allows(0) && r.allows(u32::MAX));
        assert!(!r.contains(ip("1.2.3.4")));
    }

    #[test]
    fn prefixes_are_masked_merged_and_bounded() {
        let r = SourceRanges::new(&[
            cidr("198.18.5.77/24"),
            cidr("198.18.6.0/24"),
            cidr("10.0.0.0/8"),
            cidr("10.1.0.0/16"),
            cidr("192.0.2.1/32"),
        ])
        .unwrap();
        assert_eq!(
            r.intervals(),
            [
                (ip("10.0.0.0"), ip("10.255.255.255")),
                (ip("192.0.2.1"), ip("192.0.2.1")),
                (ip("198.18.5.0"), ip("198.18.6.255")),
            ]
        );
        for yes in ["10.0.0.0", "10.255.255.255", "192.0.2.1", "198.18.5.0", "198.18.6.255"] {
            assert!(r.allows(ip(yes)), "{yes}");
        }
        for no in ["9.255.255.255", "11.0.0.0", "192.0.2.0", "192.0.2.2", "198.18.4.255", "198.18.7.0", "0.0.0.0"] {
            assert!(!r.allows(ip(no)), "{no}");
        }
        let all = SourceRanges::new(&[cidr("0.0.0.0/0"), cidr("255.255.255.255/32")]).unwrap();
        assert_eq!(all.intervals(), [(0, u32::MAX)]);
        assert_eq!(
            SourceRanges::new(&vec![cidr("10.0.0.0/8"); MAX_SOURCE_RANGES + 1]),
            Err(SourceRangesError::TooMany(MAX_SOURCE_RANGES + 1))
        );
        assert!(SourceRanges::new(&vec![cidr("10.0.0.0/8"); MAX_SOURCE_RANGES]).is_ok());
        assert_eq!(SourceRanges::new(&[Ipv4Cidr { addr: 0, len: 33 }]), Err(SourceRangesError::PrefixLen(33)));
    }

    proptest! {
        /// The compiled list answers as a scan of the prefixes does.
        #[test]
        fn agrees_with_a_scan(
            prefixes in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..40),
            probes in proptest::collection::vec(any::<u32>(), 64),
        ) {
            let prefixes: Vec<Ipv4Cidr> = prefixes.into_iter().map(|(addr, len)| Ipv4Cidr { addr, len }).collect();
            let r = SourceRanges::new(&prefixes).unwrap();
            let inside = |a: u32| prefixes.iter().any(|p| (a ^ p.addr) & crate::route::Route::mask(p.len) == 0);
            // Probe each prefix's edges and their neighbours too.
            let edges = prefixes.iter().flat_map(|p| {
                let m = crate::route::Route::mask(p.len);
                let (lo, hi) = (p.addr & m, p.addr | !m);
                [lo, hi, lo.wrapping_sub(1), hi.wrapping_add(1)]
            });
            for a in probes.into_iter().chain(edges) {
                prop_assert_eq!(r.contains(a), inside(a), "{}", std::net::Ipv4Addr::from(a));
                prop_assert_eq!(r.allows(a), prefixes.is_empty() || inside(a));
            }
            for w in r.intervals().windows(2) {
                prop_assert!(u64::from(w[0].1) + 1 < u64::from(w[1].0), "{:?}", w);
            }
        }
    }
}
