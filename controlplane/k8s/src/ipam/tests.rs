use super::*;
use proptest::prelude::*;

fn key(name: &str) -> ServiceKey {
    ServiceKey { namespace: "default".into(), name: name.into() }
}

fn claim(sharing: Option<&str>, ports: &[u16]) -> Claim {
    Claim {
        sharing: sharing.map(str::to_owned),
        ports: ports.iter().map(|&port| PortKey { udp: false, port }).collect(),
    }
}

fn allocator(pools: &[(&str, &[&str])]) -> Allocator {
    let mut a = Allocator::default();
    a.set_pools(
        pools
            .iter()
            .map(|(n, e)| {
                (n.to_string(), PoolRanges::parse(&e.iter().map(|s| s.to_string()).collect::<Vec<_>>(), false).unwrap())
            })
            .collect(),
    );
    a
}

fn req(pools: &[&str], address: Option<&str>) -> Request {
    Request { pools: pools.iter().map(|s| s.to_string()).collect(), address: address.map(|a| a.parse().unwrap()) }
}

#[test]
fn pools_parse_cidrs_ranges_and_addresses_and_name_the_bad_entry() {
    let p = PoolRanges::parse(
        &["198.18.100.0/30".into(), "198.18.101.5-198.18.101.6".into(), "198.18.102.1".into()],
        false,
    )
    .unwrap();
    assert_eq!(p.size(), 7);
    assert!(p.contains("198.18.101.6".parse().unwrap()));
    assert!(!p.contains("198.18.101.7".parse().unwrap()));
    let bad = |e: &str| PoolRanges::parse(&["198.18.100.0/30".into(), e.into()], false).unwrap_err();
    assert_eq!(
        bad("198.18.1.1/24"),
        "addresses[1]: \"198.18.1.1/24\": has host bits set: the network is 198.18.1.0/24"
    );
    assert_eq!(
        bad("198.18.1.9-198.18.1.1"),
        "addresses[1]: \"198.18.1.9-198.18.1.1\": the range's first address is after its last"
    );
    assert_eq!(bad("2001:db8::/64"), "addresses[1]: \"2001:db8::/64\": IPv6 is not supported yet: vipgate serves IPv4");
    assert_eq!(bad("198.18.1.0/33"), "addresses[1]: \"198.18.1.0/33\": \"33\" is not a prefix length from 0 to 32");
    assert_eq!(bad("198.18.100.2"), "addresses: 198.18.100.2 overlaps 198.18.100.0-198.18.100.3");
    assert_eq!(bad("banana"), "addresses[1]: \"banana\": \"banana\" is not an IPv4 address");
    assert!(PoolRanges::parse(&["10.0.0.0/8".into()], false).unwrap_err().contains("more than the 1048576"));
    assert_eq!(PoolRanges::parse(&[], false).unwrap_err(), "addresses: must list at least one CIDR or range");
}

#[test]
fn avoid_buggy_ips_leaves_out_dot_zero_and_dot_255() {
    let p = PoolRanges::parse(&["198.18.100.0/23".into()], true).unwrap();
    assert_eq!(p.size(), 512 - 4);
    assert_eq!(p.addresses().next(), Some("198.18.100.1".parse().unwrap()));
    assert!(!p.contains("198.18.100.255".parse().unwrap()));
    assert!(!p.contains("198.18.101.0".parse().unwrap()));
}

#[test]
fn first_free_address_then_the_held_one_is_kept() {
    let mut a = allocator(&[("p", &["198.18.100.1-198.18.100.3"])]);
    let r = req(&["p"], None);
    assert_eq!(a.assign(&key("a"), &r, &claim(None, &[80])).unwrap().to_string(), "198.18.100.1");
    assert_eq!(a.assign(&key("b"), &r, &claim(None, &[80])).unwrap().to_string(), "198.18.100.2");
    // Reassigning keeps what a Service holds.
    assert_eq!(a.assign(&key("a"), &r, &claim(None, &[80, 443])).unwrap().to_string(), "198.18.100.1");
    assert_eq!(a.usage("p"), Some((2, 1)));
    assert_eq!(a.release(&key("a")).unwrap().to_string(), "198.18.100.1");
    assert_eq!(a.assign(&key("c"), &r, &claim(None, &[80])).unwrap().to_string(), "198.18.100.1");
    assert_eq!(a.assign(&key("d"), &r, &claim(None, &[80])).unwrap().to_string(), "198.18.100.3");
    assert_eq!(a.assign(&key("e"), &r, &claim(None, &[80])), Err(AllocError::Exhausted("p".into())));
}

#[test]
fn a_requested_address_must_be_in_a_usable_pool_and_free() {
    let mut a = allocator(&[("p", &["198.18.100.0/29"]), ("q", &["198.18.101.0/29"])]);
    let e = a.assign(&key("a"), &req(&["p"], Some("198.18.101.1")), &claim(None, &[80])).unwrap_err();
    assert_eq!(e.to_string(), "198.18.101.1 is in no VipPool this Service may use (p)");
    a.assign(&key("a"), &req(&["p"], Some("198.18.100.5")), &claim(None, &[80])).unwrap();
    let e = a.assign(&key("b"), &req(&["p"], Some("198.18.100.5")), &claim(None, &[443])).unwrap_err();
    assert_eq!(e.to_string(), "198.18.100.5 is already used by Service default/a without a sharing key");
    // A failed request leaves the first holder alone.
    assert_eq!(a.address_of(&key("a")), Some("198.18.100.5".parse().unwrap()));
    assert_eq!(a.address_of(&key("b")), None);
}

#[test]
fn sharing_needs_one_key_and_distinct_ports() {
    let mut a = allocator(&[("p", &["198.18.100.0/29"])]);
    let r = req(&["p"], None);
    let ip = a.assign(&key("a"), &r, &claim(Some("k"), &[80])).unwrap();
    // The same key and another port: the same address.
    assert_eq!(a.assign(&key("b"), &r, &claim(Some("k"), &[443])).unwrap(), ip);
    // The same key, a port in use: another address.
    assert_ne!(a.assign(&key("c"), &r, &claim(Some("k"), &[80])).unwrap(), ip);
    let asked = req(&["p"], Some(&ip.to_string()));
    let e = a.assign(&key("d"), &asked, &claim(Some("k"), &[443])).unwrap_err();
    assert_eq!(e.to_string(), format!("{ip} is already used by Service default/b on 443/TCP too"));
    let e = a.assign(&key("d"), &asked, &claim(Some("other"), &[8080])).unwrap_err();
    assert!(e.to_string().contains("with sharing key \"k\", not \"other\""), "{e}");
    let e = a.assign(&key("d"), &asked, &claim(None, &[8080])).unwrap_err();
    assert!(e.to_string().contains("and this Service has none"), "{e}");
    assert_eq!(a.usage("p"), Some((2, 6)));
}

#[test]
fn a_service_outside_its_pools_moves() {
    let mut a = allocator(&[("p", &["198.18.100.0/30"]), ("q", &["198.18.101.0/30"])]);
    let ip = a.assign(&key("a"), &req(&["p"], None), &claim(None, &[80])).unwrap();
    assert!(a.pool_of(ip) == Some("p"));
    let moved = a.assign(&key("a"), &req(&["q"], None), &claim(None, &[80])).unwrap();
    assert_eq!(a.pool_of(moved), Some("q"));
    assert_eq!(a.usage("p"), Some((0, 4)));
}

#[derive(Clone, Debug)]
enum Op {
    Assign { service: u8, sharing: Option<u8>, port: u16, pool: u8, address: Option<u8> },
    Release { service: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..12, proptest::option::of(0u8..2), 1u16..4, 0u8..2, proptest::option::of(0u8..10)).prop_map(
            |(service, sharing, port, pool, address)| Op::Assign { service, sharing, port, pool, address }
        ),
        1 => (0u8..12).prop_map(|service| Op::Release { service }),
    ]
}

proptest! {
    /// Whatever the order of requests, two Services hold one address only
    /// if they share a key and no port, each holds an address of a pool it
    /// asked for, and a refused request changes nothing.
    #[test]
    fn no_address_is_ever_given_to_two_services_that_cannot_share(ops in proptest::collection::vec(op(), 1..80)) {
        let mut a = allocator(&[("p0", &["198.18.100.0-198.18.100.4"]), ("p1", &["198.18.100.5-198.18.100.9"])]);
        let mut claims: BTreeMap<ServiceKey, Claim> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Assign { service, sharing, port, pool, address } => {
                    let k = key(&format!("s{service}"));
                    let c = claim(sharing.map(|s| if s == 0 { "a" } else { "b" }), &[port]);
                    let r = Request {
                        pools: vec![format!("p{pool}")],
                        address: address.map(|x| Ipv4Addr::new(198, 18, 100, x)),
                    };
                    let before = a.address_of(&k);
                    match a.assign(&k, &r, &c) {
                        Ok(ip) => {
                            prop_assert!(a.pools[&r.pools[0]].contains(ip));
                            if let Some(want) = r.address { prop_assert_eq!(ip, want); }
                            claims.insert(k, c);
                        }
                        Err(_) => prop_assert_eq!(a.address_of(&k), before),
                    }
                }
                Op::Release { service } => {
                    let k = key(&format!("s{service}"));
                    a.release(&k);
                    claims.remove(&k);
                }
            }
            let held: Vec<(ServiceKey, Ipv4Addr)> = a.services().map(|(k, ip)| (k.clone(), ip)).collect();
            for (i, (k1, ip1)) in held.iter().enumerate() {
                for (k2, ip2) in &held[i + 1..] {
                    if ip1 != ip2 { continue; }
                    let (c1, c2) = (&claims[k1], &claims[k2]);
                    prop_assert!(c1.sharing.is_some() && c1.sharing == c2.sharing, "{k1} and {k2} share {ip1} without one key");
                    prop_assert!(c1.ports.is_disjoint(&c2.ports), "{k1} and {k2} share a port on {ip1}");
                }
            }
        }
    }
}
