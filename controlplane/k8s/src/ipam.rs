//! Address management: which Service holds which address of which pool.
//!
//! Owns: the pools' address sets, the allocations, and the sharing rule.
//! Must not: talk to the apiserver (the reconciler feeds it the pools and,
//! at start, the addresses the Services' statuses already show), or choose
//! which pools a Service may use (`pools.rs` orders them).
//!
//! An address is never given to two Services unless both carry the same
//! sharing key and no protocol and port of one is a protocol and port of
//! the other, as MetalLB's allow-shared-ip does.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

/// A Service, as `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A protocol and port a Service serves on its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    /// true: UDP; false: TCP.
    pub udp: bool,
    /// The port.
    pub port: u16,
}

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, if self.udp { "UDP" } else { "TCP" })
    }
}

/// What a Service needs from the address it gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// Its sharing key (allow-shared-ip): None shares with no one.
    pub sharing: Option<String>,
    /// The protocols and ports it serves.
    pub ports: BTreeSet<PortKey>,
}

/// One pool's addresses, as inclusive ranges of `u32`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolRanges {
    /// Sorted, disjoint, inclusive.
    pub ranges: Vec<(u32, u32)>,
    /// Leaves out addresses ending in .0 and .255, which some old clients
    /// and routers mistake for network or broadcast addresses.
    pub avoid_buggy_ips: bool,
}

/// The most addresses one pool may hold: a /12. Every free-address search
/// is linear in the pool, so the bound keeps it in milliseconds.
pub const MAX_POOL_ADDRESSES: u64 = 1 << 20;

impl PoolRanges {
    /// Parses a pool's `addresses`: each a CIDR (`198.18.100.0/24`), a
    /// range (`198.18.100.10-198.18.100.20`) or one address. The error
    /// names the entry by its index.
    pub fn parse(entries: &[String], avoid_buggy_ips: bool) -> Result<Self, String> {
        if entries.is_empty() {
            return Err("addresses: must list at least one CIDR or range".into());
        }
        let mut ranges = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let r = parse_range(e.trim()).map_err(|why| format!("addresses[{i}]: {e:?}: {why}"))?;
            ranges.push(r);
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            if w[1].0 <= w[0].1 {
                return Err(format!("addresses: {} overlaps {}", show_range(w[1]), show_range(w[0])));
            }
        }
        let pool = Self { ranges, avoid_buggy_ips };
        let size = pool.ranges.iter().map(|&(a, b)| u64::from(b - a) + 1).sum::<u64>();
        if size > MAX_POOL_ADDRESSES {
            return Err(format!("addresses: {size} addresses, more than the {MAX_POOL_ADDRESSES} a pool may hold"));
        }
        Ok(pool)
    }

    /// Whether `ip` is one of the pool's usable addresses.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        self.ranges.iter().any(|&(a, b)| a <= v && v <= b) && !(self.avoid_buggy_ips && is_buggy(v))
    }

    /// The usable addresses, in order.
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.ranges
            .iter()
            .flat_map(|&(a, b)| a..=b)
            .filter(|&v| !(self.avoid_buggy_ips && is_buggy(v)))
            .map(Ipv4Addr::from)
    }

    /// How many usable addresses it has.
    pub fn size(&self) -> u64 {
        if !self.avoid_buggy_ips {
            return self.ranges.iter().map(|&(a, b)| u64::from(b - a) + 1).sum();
        }
        self.addresses().count() as u64
    }

    /// Whether the two pools share an address.
    pub fn overlaps(&self, other: &PoolRanges) -> bool {
        self.ranges.iter().any(|&(a, b)| other.ranges.iter().any(|&(c, d)| a <= d && c <= b))
    }
}

fn is_buggy(v: u32) -> bool {
    matches!(v & 0xff, 0 | 255)
}

fn show_range((a, b): (u32, u32)) -> String {
    if a == b { Ipv4Addr::from(a).to_string() } else { format!("{}-{}", Ipv4Addr::from(a), Ipv4Addr::from(b)) }
}

fn parse_range(e: &str) -> Result<(u32, u32), String> {
    let addr = |s: &str| -> Result<u32, String> {
        s.trim().parse::<Ipv4Addr>().map(u32::from).map_err(|_| {
            if s.contains(':') {
                "IPv6 is not supported yet: vipgate serves IPv4".to_owned()
            } else {
                format!("{s:?} is not an IPv4 address")
            }
        })
    };
    if let Some((ip, len)) = e.split_once('/') {
        let base = addr(ip)?;
        let len: u32 = len
            .parse()
            .ok()
            .filter(|&l| l <= 32)
            .ok_or_else(|| format!("{len:?} is not a prefix length from 0 to 32"))?;
        let mask = vipgate_controlplane::checks::prefix_mask(len);
        if base & !mask != 0 {
            return Err(format!("has host bits set: the network is {}/{len}", Ipv4Addr::from(base & mask)));
        }
        return Ok((base, base | !mask));
    }
    if let Some((a, b)) = e.split_once('-') {
        let (a, b) = (addr(a)?, addr(b)?);
        if a > b {
            return Err("the range's first address is after its last".into());
        }
        return Ok((a, b));
    }
    let a = addr(e)?;
    Ok((a, a))
}

/// Why a Service got no address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// No pool serves the Service.
    #[error("no VipPool may serve this Service{0}")]
    NoPool(String),
    /// The Service asked for an address outside every pool it may use.
    #[error("{ip} is in no VipPool this Service may use ({pools})")]
    NotInPool {
        /// The address asked for.
        ip: Ipv4Addr,
        /// The pools it may use.
        pools: String,
    },
    /// The address asked for is another Service's.
    #[error("{ip} is already used by Service {holder}{why}")]
    InUse {
        /// The address asked for.
        ip: Ipv4Addr,
        /// The Service that has it.
        holder: ServiceKey,
        /// Why they cannot share.
        why: String,
    },
    /// Every address of the pools is taken.
    #[error("no address is free in VipPool {0}")]
    Exhausted(String),
}

/// Where an allocation may come from: the pools in order of preference,
/// and the addresses asked for, if any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// Pool names, most preferred first. Every one is in the allocator.
    pub pools: Vec<String>,
    /// Addresses asked for (spec.loadBalancerIP or the loadBalancerIPs
    /// annotation; vipgate serves one IPv4 address a Service, the first).
    pub address: Option<Ipv4Addr>,
}

#[derive(Clone, Debug)]
struct Holder {
    service: ServiceKey,
    claim: Claim,
}

/// The allocations of every pool.
#[derive(Clone, Debug, Default)]
pub struct Allocator {
    pools: BTreeMap<String, PoolRanges>,
    by_address: BTreeMap<Ipv4Addr, Vec<Holder>>,
    by_service: BTreeMap<ServiceKey, Ipv4Addr>,
}

impl Allocator {
    /// Replaces the pools. Allocations stay, even outside every pool (a
    /// pool shrunk under a Service): the reconciler moves such Services
    /// when it next sees them.
    pub fn set_pools(&mut self, pools: BTreeMap<String, PoolRanges>) {
        self.pools = pools;
    }

    /// The pool that holds `ip`.
    pub fn pool_of(&self, ip: Ipv4Addr) -> Option<&str> {
        self.pools.iter().find(|(_, p)| p.contains(ip)).map(|(n, _)| n.as_str())
    }

    /// The address `service` holds.
    pub fn address_of(&self, service: &ServiceKey) -> Option<Ipv4Addr> {
        self.by_service.get(service).copied()
    }

    /// Records that `service` holds `ip`, as its status says, without any
    /// check: at start, before anything is allocated, so that a restart
    /// never moves an address. The caller refuses a second holder that
    /// cannot share (see [`Allocator::conflict`]).
    pub fn restore(&mut self, service: ServiceKey, ip: Ipv4Addr, claim: Claim) {
        self.release(&service);
        self.by_address.entry(ip).or_default().push(Holder { service: service.clone(), claim });
        self.by_service.insert(service, ip);
    }

    /// Why `service` with `claim` may not use `ip`, if it may not.
    pub fn conflict(&self, service: &ServiceKey, ip: Ipv4Addr, claim: &Claim) -> Option<AllocError> {
        for h in self.by_address.get(&ip).into_iter().flatten() {
            if &h.service == service {
                continue;
            }
            let why = match (&h.claim.sharing, &claim.sharing) {
                (Some(a), Some(b)) if a == b => match h.claim.ports.intersection(&claim.ports).next() {
                    None => continue,
                    Some(p) => format!(" on {p} too"),
                },
                (Some(a), Some(b)) => format!(" with sharing key {a:?}, not {b:?}"),
                (None, _) => " without a sharing key".to_owned(),
                (Some(a), None) => format!(" with sharing key {a:?}, and this Service has none"),
            };
            return Some(AllocError::InUse { ip, holder: h.service.clone(), why });
        }
        None
    }

    /// Gives `service` an address for `request`: the one it holds if that
    /// still fits, else the one asked for, else the first address of the
    /// preferred pools that it may share (same key, no common port), else
    /// the first free one.
    pub fn assign(&mut self, service: &ServiceKey, request: &Request, claim: &Claim) -> Result<Ipv4Addr, AllocError> {
        let in_pools =
            |this: &Self, ip: Ipv4Addr| request.pools.iter().any(|p| this.pools.get(p).is_some_and(|r| r.contains(ip)));
        if let Some(ip) = self.address_of(service)
            && request.address.is_none_or(|want| want == ip)
            && in_pools(self, ip)
            && self.conflict(service, ip, claim).is_none()
        {
            self.restore(service.clone(), ip, claim.clone());
            return Ok(ip);
        }
        if request.pools.is_empty() {
            return Err(AllocError::NoPool(String::new()));
        }
        if let Some(ip) = request.address {
            if !in_pools(self, ip) {
                return Err(AllocError::NotInPool { ip, pools: request.pools.join(", ") });
            }
            if let Some(e) = self.conflict(service, ip, claim) {
                return Err(e);
            }
            self.restore(service.clone(), ip, claim.clone());
            return Ok(ip);
        }
        for name in &request.pools {
            let Some(pool) = self.pools.get(name) else { continue };
            // An address this sharing key already uses comes first, so that
            // Services meant to share do.
            if claim.sharing.is_some() {
                let shared = self
                    .by_address
                    .iter()
                    .filter(|(ip, holders)| pool.contains(**ip) && !holders.is_empty())
                    .map(|(ip, _)| *ip)
                    .find(|ip| self.conflict(service, *ip, claim).is_none());
                if let Some(ip) = shared {
                    self.restore(service.clone(), ip, claim.clone());
                    return Ok(ip);
                }
            }
            let free = pool
                .addresses()
                .find(|ip| self.by_address.get(ip).is_none_or(|h| h.iter().all(|h| &h.service == service)));
            if let Some(ip) = free {
                self.restore(service.clone(), ip, claim.clone());
                return Ok(ip);
            }
        }
        Err(AllocError::Exhausted(request.pools.join(", ")))
    }

    /// Frees `service`'s address, if it has one.
    pub fn release(&mut self, service: &ServiceKey) -> Option<Ipv4Addr> {
        let ip = self.by_service.remove(service)?;
        if let Some(holders) = self.by_address.get_mut(&ip) {
            holders.retain(|h| &h.service != service);
            if holders.is_empty() {
                self.by_address.remove(&ip);
            }
        }
        Some(ip)
    }

    /// A pool's usage: addresses in use and addresses free.
    pub fn usage(&self, pool: &str) -> Option<(u64, u64)> {
        let ranges = self.pools.get(pool)?;
        let used = self.by_address.keys().filter(|ip| ranges.contains(**ip)).count() as u64;
        Some((used, ranges.size().saturating_sub(used)))
    }

    /// Every Service holding an address.
    pub fn services(&self) -> impl Iterator<Item = (&ServiceKey, Ipv4Addr)> {
        self.by_service.iter().map(|(k, ip)| (k, *ip))
    }
}

#[cfg(test)]
mod tests;
