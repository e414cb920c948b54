//! IPv4 routes of the gateway: connected prefixes of its ports plus static
//! routes, longest prefix first.
//!
//! Owns: next-hop selection for a destination. A gateway has a handful of
//! routes (its connected subnets and a few static ones), so lookup is a scan
//! of a list sorted by prefix length, which for under a few dozen entries is
//! faster than any trie. Must not know about packets.

/// Marks a next hop that has no slot among the snapshot's known next hops
/// (a destination on a connected subnet).
pub const NO_SLOT: u32 = u32::MAX;

/// Where a packet to some destination leaves the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// Dense port index (configuration order).
    pub port: u16,
    /// The address whose MAC the frame goes to: the destination itself on a
    /// connected route, else the route's gateway.
    pub addr: u32,
    /// Index among the snapshot's known next hops (backends and route
    /// gateways), whose MACs a worker keeps in an array; [`NO_SLOT`] if none.
    pub slot: u32,
}

/// One route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Network address (host bits zero).
    pub prefix: u32,
    /// Prefix length, 0..=32.
    pub len: u8,
    /// Outgoing port.
    pub port: u16,
    /// Gateway, or `None` for a connected route.
    pub via: Option<u32>,
    /// The gateway's known-next-hop slot ([`NO_SLOT`] for connected routes).
    pub slot: u32,
}

impl Route {
    /// Netmask for a prefix length.
    #[inline(always)]
    pub fn mask(len: u8) -> u32 {
        if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) }
    }

    /// True if `addr` is inside this route's prefix.
    #[inline(always)]
    pub fn contains(&self, addr: u32) -> bool {
        addr & Self::mask(self.len) == self.prefix
    }
}

/// Routes sorted by descending prefix length.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Builds a table; host bits of each prefix are cleared. Among routes of
    /// equal length and prefix, the first given wins.
    pub fn new(mut routes: Vec<Route>) -> Self {
        for r in &mut routes {
            r.prefix &= Route::mask(r.len);
        }
        // Stable sort keeps the given order among equal lengths.
        routes.sort_by_key(|r| core::cmp::Reverse(r.len));
        RouteTable { routes }
    }

    /// The route for `dst`, longest prefix first.
    #[inline]
    pub fn lookup(&self, dst: u32) -> Option<&Route> {
        self.routes.iter().find(|r| r.contains(dst))
    }

    /// Where to send a packet for `dst`.
    #[inline]
    pub fn next_hop(&self, dst: u32) -> Option<NextHop> {
        self.lookup(dst).map(|r| NextHop { port: r.port, addr: r.via.unwrap_or(dst), slot: r.slot })
    }

    /// All routes, longest prefix first.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ip(a: u8, b: u8, c: u8, d: u8) -> u32 {
        u32::from_be_bytes([a, b, c, d])
    }

    #[test]
    fn longest_prefix_wins() {
        let t = RouteTable::new(vec![
            Route { prefix: 0, len: 0, port: 0, via: Some(ip(198, 18, 0, 254)), slot: 0 },
            Route { prefix: ip(198, 18, 0, 0), len: 24, port: 0, via: None, slot: NO_SLOT },
            Route { prefix: ip(198, 18, 1, 77), len: 24, port: 1, via: None, slot: NO_SLOT },
            Route { prefix: ip(198, 19, 0, 0), len: 16, port: 1, via: Some(ip(198, 18, 1, 254)), slot: 1 },
        ]);
        assert_eq!(t.next_hop(ip(198, 18, 0, 9)), Some(NextHop { port: 0, addr: ip(198, 18, 0, 9), slot: NO_SLOT }));
        assert_eq!(t.next_hop(ip(198, 18, 1, 11)), Some(NextHop { port: 1, addr: ip(198, 18, 1, 11), slot: NO_SLOT }));
        assert_eq!(t.next_hop(ip(198, 19, 7, 7)), Some(NextHop { port: 1, addr: ip(198, 18, 1, 254), slot: 1 }));
        assert_eq!(t.next_hop(ip(198, 20, 0, 1)), Some(NextHop { port: 0, addr: ip(198, 18, 0, 254), slot: 0 }));
        assert_eq!(t.routes()[0].prefix, ip(198, 18, 0, 0));
    }

    #[test]
    fn no_default_no_route() {
        let t = RouteTable::new(vec![Route { prefix: ip(198, 18, 0, 0), len: 24, port: 0, via: None, slot: NO_SLOT }]);
        assert_eq!(t.next_hop(ip(198, 18, 2, 1)), None);
        assert!(Route { prefix: 0, len: 0, port: 0, via: None, slot: NO_SLOT }.contains(ip(1, 2, 3, 4)));
        assert!(
            Route { prefix: ip(198, 18, 0, 5), len: 32, port: 0, via: None, slot: NO_SLOT }.contains(ip(198, 18, 0, 5))
        );
    }
}
