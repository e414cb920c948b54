//! The per-value checks and parsers that the configuration file
//! ([`crate::config`]) and the API's desired state ([`crate::state`]) share:
//! names, owners, ports, weights, table sizes, counts, addresses and
//! prefixes, with the limits they enforce.
//!
//! Owns: one rule per kind of value, so that the file and the API accept
//! the same values and say the same thing about the others. Each check
//! returns the value or the reason, and the caller names the field. A leaf:
//! it uses no other module of this crate.

use std::net::Ipv4Addr;
use vipgate_dataplane::maglev::{DEFAULT_TABLE_SIZE, is_prime};
use vipgate_dataplane::route::Route;
use vipgate_dataplane::snapshot::{Ipv4Cidr, PortSpec};

/// Largest Maglev table size accepted (the largest prime below 2^24).
pub const MAX_TABLE_SIZE: u32 = 16_777_213;
/// Largest backend weight: weights are relative, and a ratio finer than
/// 1 in 65,535 is lost in any table size.
pub const MAX_WEIGHT: u32 = 65_535;
/// Most backends per service: the Maglev table holds 16-bit backend
/// indices, one value of which marks a free slot.
pub const MAX_BACKENDS: usize = vipgate_dataplane::maglev::MAX_BACKENDS;
/// Most addresses in one source pool: the snapshot indexes them in 16 bits.
pub const MAX_POOL_ADDRESSES: usize = u16::MAX as usize;
/// Most prefixes in a service's source list (`source_ranges`).
pub const MAX_SOURCE_RANGES: usize = vipgate_dataplane::sources::MAX_SOURCE_RANGES;
/// Longest service or pool name.
pub const MAX_NAME_LEN: usize = 253;
/// Longest owner.
pub const MAX_OWNER_LEN: usize = 128;

/// The netmask of an IPv4 prefix of length `len` (`24`: `0xffff_ff00`);
/// lengths above 32 count as 32.
#[must_use]
pub fn prefix_mask(len: u32) -> u32 {
    Route::mask(u8::try_from(len.min(32)).unwrap_or(32))
}

/// Checks a service or pool name: 1 to 253 letters, digits, `.`, `-`, `_`,
/// and not `.` or `..` (a name may become a path or a label). The one rule
/// of the configuration file and the API.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("is {} characters long; at most {MAX_NAME_LEN}", name.len()));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a usable name"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(format!("{name:?}: use letters, digits, '.', '-' and '_' only"));
    }
    Ok(())
}

/// Checks an owner: 1 to 128 letters, digits, `-`, `_`, `.`, `/` and `:`,
/// such as `cli` or `k8s/prod-cluster`.
pub fn check_owner(owner: &str) -> Result<(), String> {
    if owner.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if owner.len() > MAX_OWNER_LEN {
        return Err(format!("is {} characters long; at most {MAX_OWNER_LEN}", owner.len()));
    }
    if !owner.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':')) {
        return Err(format!("{owner:?}: use letters, digits, '-', '_', '.', '/' and ':' only"));
    }
    Ok(())
}

/// A TCP or UDP port number, 1 to 65535.
pub(crate) fn check_port_number(v: i64) -> Result<u16, String> {
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{v} is not a port number from 1 to 65535")),
    }
}

/// A Maglev table size: a prime from 3 to [`MAX_TABLE_SIZE`].
pub(crate) fn check_table_size(v: i64) -> Result<u32, String> {
    match u32::try_from(v) {
        Ok(n) if is_prime(n) && (3..=MAX_TABLE_SIZE).contains(&n) => Ok(n),
        _ => Err(format!("{v} is not a prime from 3 to {MAX_TABLE_SIZE} (the default is {DEFAULT_TABLE_SIZE})")),
    }
}

/// A backend weight, 0 to [`MAX_WEIGHT`].
pub(crate) fn check_weight(v: i64) -> Result<u32, String> {
    match u32::try_from(v) {
        Ok(w) if w <= MAX_WEIGHT => Ok(w),
        _ => Err(format!("{v} is not from 0 to {MAX_WEIGHT}")),
    }
}

/// A service's number of backends: at most [`MAX_BACKENDS`].
pub(crate) fn check_backend_count(n: usize) -> Result<(), String> {
    if n > MAX_BACKENDS { Err(format!("{n} backends; at most {MAX_BACKENDS} per service")) } else { Ok(()) }
}

/// A source pool's number of addresses: at most [`MAX_POOL_ADDRESSES`].
pub(crate) fn check_pool_size(n: usize) -> Result<(), String> {
    if n > MAX_POOL_ADDRESSES {
        Err(format!("{n} addresses; at most {MAX_POOL_ADDRESSES} per source pool"))
    } else {
        Ok(())
    }
}

/// An address a VIP, backend or pool may have: not the network or
/// broadcast address of a port's subnet (a /31 or /32 has neither), where
/// no host can be.
pub(crate) fn check_not_subnet_edge(addr: u32, ports: &[PortSpec]) -> Result<(), String> {
    for p in ports {
        for c in p.addresses.iter().filter(|c| c.len < 31) {
            let mask = Route::mask(c.len);
            if (addr ^ c.addr) & mask != 0 {
                continue;
            }
            let what = if addr & !mask == 0 {
                "network"
            } else if addr | mask == u32::MAX {
                "broadcast"
            } else {
                continue;
            };
            return Err(format!(
                "{} is the {what} address of {}/{} on port {:?}",
                Ipv4Addr::from(addr),
                Ipv4Addr::from(addr & mask),
                c.len,
                p.name
            ));
        }
    }
    Ok(())
}

/// A source pool's port range must give each worker a slice of its own.
pub(crate) fn check_pool_ports(first_port: u16, last_port: u16, workers: usize) -> Result<(), String> {
    if first_port == 0 || first_port > last_port {
        return Err(format!("{first_port}-{last_port} is not a port range from 1 to 65535 with first <= last"));
    }
    let span = usize::from(last_port - first_port) + 1;
    if span < workers {
        return Err(format!(
            "{first_port}-{last_port} is {span} ports for {workers} workers; each worker needs a slice of its own"
        ));
    }
    Ok(())
}

/// Parses an IPv4 prefix `a.b.c.d/len` with `len` from `min_len` to 32.
pub(crate) fn parse_cidr(s: &str, min_len: u8) -> Result<Ipv4Cidr, String> {
    let Some((a, l)) = s.trim().split_once('/') else {
        return Err(format!("{s:?} needs a prefix length, such as 198.18.0.1/24"));
    };
    let Ok(addr) = a.parse::<Ipv4Addr>() else {
        return Err(format!("{a:?} is not an IPv4 address"));
    };
    match l.parse::<u8>() {
        Ok(len) if (min_len..=32).contains(&len) => Ok(Ipv4Cidr { addr: u32::from(addr), len }),
        _ => Err(format!("prefix length {l:?} is not a number from {min_len} to 32")),
    }
}

/// A service's number of source prefixes: at most [`MAX_SOURCE_RANGES`].
pub(crate) fn check_source_range_count(n: usize) -> Result<(), String> {
    if n > MAX_SOURCE_RANGES { Err(format!("{n} prefixes; at most {MAX_SOURCE_RANGES} per service")) } else { Ok(()) }
}

/// Parses a prefix of a service's source list, `a.b.c.d/len` with `len`
/// from 0 to 32 and no host bits set: `198.18.5.7/24` is refused, naming
/// `198.18.5.0/24`, rather than taken to mean it.
pub(crate) fn parse_source_range(s: &str) -> Result<Ipv4Cidr, String> {
    let c = parse_cidr(s, 0)?;
    let network = c.addr & Route::mask(c.len);
    if network != c.addr {
        return Err(format!("{:?} has host bits set; the prefix is {}/{}", s.trim(), Ipv4Addr::from(network), c.len));
    }
    Ok(c)
}

/// True for addresses a host can own: not 0.0.0.0/8, loopback, multicast,
/// reserved or limited broadcast.
pub(crate) fn is_unicast(addr: u32) -> bool {
    let a = Ipv4Addr::from(addr);
    !(a.octets()[0] == 0 || a.is_loopback() || a.is_multicast() || a.is_broadcast() || a.octets()[0] >= 240)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_masks() {
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(1), 0x8000_0000);
        assert_eq!(prefix_mask(24), 0xffff_ff00);
        assert_eq!(prefix_mask(31), 0xffff_fffe);
        assert_eq!(prefix_mask(32), u32::MAX);
        assert_eq!(prefix_mask(33), u32::MAX, "above 32 counts as 32");
        assert_eq!(prefix_mask(u32::MAX), u32::MAX);
    }
}
