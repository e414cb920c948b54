//! The VipPools as the allocator sees them: validated, free of overlaps,
//! and ordered for a Service.
//!
//! Owns: a pool's validation (its addresses, mode and source addresses),
//! the overlap rule (the older pool keeps the addresses), and which pools
//! a Service may use, in order. Must not: allocate (`ipam.rs`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use kube::core::{Selector, SelectorExt};

use crate::crd::{ForwardingMode, VipPool, VipPoolSpec};
use crate::ipam::PoolRanges;
use crate::service::Intent;

/// A pool that passed validation.
#[derive(Clone, Debug)]
pub struct ValidPool {
    /// Its spec.
    pub spec: VipPoolSpec,
    /// Its addresses.
    pub ranges: PoolRanges,
    namespaces: Vec<String>,
    namespace_selectors: Vec<Selector>,
    service_selectors: Vec<Selector>,
}

/// Every pool, valid or with the reason it is not.
#[derive(Clone, Debug, Default)]
pub struct Pools {
    /// The valid pools by name.
    pub valid: BTreeMap<String, ValidPool>,
    /// The invalid ones by name, with why.
    pub invalid: BTreeMap<String, String>,
}

impl Pools {
    /// Validates `pools`. Where two overlap, the one created first (then
    /// the first by name) keeps its addresses and the other is invalid.
    pub fn new<'a>(pools: impl IntoIterator<Item = &'a VipPool>) -> Self {
        let mut list: Vec<&VipPool> = pools.into_iter().collect();
        list.sort_by(|a, b| {
            (a.metadata.creation_timestamp.as_ref().map(|t| t.0), &a.metadata.name)
                .cmp(&(b.metadata.creation_timestamp.as_ref().map(|t| t.0), &b.metadata.name))
        });
        let mut out = Pools::default();
        for p in list {
            let Some(name) = p.metadata.name.clone() else { continue };
            match validate(&p.spec) {
                Err(why) => {
                    out.invalid.insert(name, why);
                }
                Ok(v) => {
                    if let Some((other, _)) = out.valid.iter().find(|(_, o)| o.ranges.overlaps(&v.ranges)) {
                        out.invalid.insert(name, format!("addresses: overlap VipPool {other}'s, which is older"));
                    } else {
                        out.valid.insert(name, v);
                    }
                }
            }
        }
        out
    }

    /// The address ranges of the valid pools, for the allocator.
    pub fn ranges(&self) -> BTreeMap<String, PoolRanges> {
        self.valid.iter().map(|(n, p)| (n.clone(), p.ranges.clone())).collect()
    }

    /// The pools `intent` may take an address from, most preferred first:
    /// the one it names, else every auto-assigning pool whose selectors
    /// admit it, by priority, then name.
    pub fn candidates(
        &self,
        intent: &Intent,
        namespace_labels: &BTreeMap<String, String>,
    ) -> Result<Vec<String>, String> {
        if let Some(name) = &intent.pool {
            if let Some(why) = self.invalid.get(name) {
                return Err(format!("VipPool {name} is not valid: {why}"));
            }
            return match self.valid.get(name) {
                Some(_) => Ok(vec![name.clone()]),
                None => Err(format!("VipPool {name} does not exist")),
            };
        }
        let mut list: Vec<(&String, &ValidPool)> =
            self.valid.iter().filter(|(_, p)| p.spec.auto_assign && p.admits(intent, namespace_labels)).collect();
        list.sort_by_key(|(n, p)| {
            let prio = p.spec.service_allocation.as_ref().and_then(|a| a.priority);
            (prio.is_none(), prio, (*n).clone())
        });
        // An address asked for may come from any pool that admits the
        // Service, auto-assigning or not.
        if let Some(ip) = intent.address {
            let holder = self.valid.iter().find(|(_, p)| p.ranges.contains(ip) && p.admits(intent, namespace_labels));
            if let Some((n, _)) = holder
                && !list.iter().any(|(m, _)| m == &n)
            {
                list.insert(0, (n, &self.valid[n]));
            }
        }
        Ok(list.into_iter().map(|(n, _)| n.clone()).collect())
    }

    /// The pool holding `ip`.
    pub fn of(&self, ip: Ipv4Addr) -> Option<(&str, &ValidPool)> {
        self.valid.iter().find(|(_, p)| p.ranges.contains(ip)).map(|(n, p)| (n.as_str(), p))
    }
}

impl ValidPool {
    fn admits(&self, intent: &Intent, namespace_labels: &BTreeMap<String, String>) -> bool {
        (self.namespaces.is_empty() || self.namespaces.contains(&intent.key.namespace))
            && (self.namespace_selectors.is_empty()
                || self.namespace_selectors.iter().any(|s| s.matches(namespace_labels)))
            && (self.service_selectors.is_empty() || self.service_selectors.iter().any(|s| s.matches(&intent.labels)))
    }
}

fn validate(spec: &VipPoolSpec) -> Result<ValidPool, String> {
    let ranges = PoolRanges::parse(&spec.addresses, spec.avoid_buggy_ips)?;
    match spec.mode {
        ForwardingMode::Fullnat => {
            let src = spec.source_addresses.as_ref().ok_or("mode fullnat needs sourceAddresses")?;
            if src.addresses.is_empty() {
                return Err("sourceAddresses.addresses: must list at least one IPv4 address".into());
            }
            for (i, a) in src.addresses.iter().enumerate() {
                a.parse::<Ipv4Addr>()
                    .map_err(|_| format!("sourceAddresses.addresses[{i}]: {a:?} is not an IPv4 address"))?;
            }
            if let (Some(f), Some(l)) = (src.first_port, src.last_port)
                && f > l
            {
                return Err(format!("sourceAddresses: firstPort {f} is after lastPort {l}"));
            }
            if src.first_port.is_some() != src.last_port.is_some() {
                return Err("sourceAddresses: set firstPort and lastPort together".into());
            }
        }
        ForwardingMode::Dsr | ForwardingMode::Nat => {
            if spec.source_addresses.is_some() {
                return Err(format!("sourceAddresses: only mode fullnat uses them, not {}", spec.mode.as_str()));
            }
        }
    }
    if spec.tunnel_source.is_some() && spec.mode != ForwardingMode::Dsr {
        return Err(format!("tunnelSource: only mode dsr uses it, not {}", spec.mode.as_str()));
    }
    if let Some(h) = &spec.health_check
        && !matches!(h.kind.as_str(), "tcp" | "http" | "https")
    {
        return Err(format!("healthCheck.kind: {:?} is not tcp, http or https", h.kind));
    }
    let alloc = spec.service_allocation.clone().unwrap_or_default();
    let selectors = |list: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector], field: &str| {
        list.iter()
            .enumerate()
            .map(|(i, s)| Selector::try_from(s.clone()).map_err(|e| format!("serviceAllocation.{field}[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(ValidPool {
        spec: spec.clone(),
        ranges,
        namespaces: alloc.namespaces.clone(),
        namespace_selectors: selectors(&alloc.namespace_selectors, "namespaceSelectors")?,
        service_selectors: selectors(&alloc.service_selectors, "serviceSelectors")?,
    })
}
