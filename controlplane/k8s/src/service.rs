//! What a Kubernetes Service asks of vipgate, and the vipgate services that
//! serve it.
//!
//! Owns: the class filter, the annotations (vipgate's and MetalLB's), the
//! naming of vipgate services, and the translation of a Service, its
//! EndpointSlices and the Nodes into backends. Must not: allocate
//! addresses (`ipam.rs`) or talk to the apiserver: every function here is
//! pure, so each instance of the controller computes the same state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Node, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use vipgate_controlplane::api::pb;

use crate::crd::{ForwardingMode, VipPoolSpec};
use crate::ipam::{Claim, PortKey, ServiceKey};

/// The loadBalancerClass the controller serves.
pub const CLASS: &str = "vipgate.io/gateway";

/// Annotation: the addresses asked for, comma-separated (vipgate serves
/// the first IPv4 one).
pub const ANN_IPS: &str = "vipgate.io/loadBalancerIPs";
/// Annotation: the VipPool to take the address from.
pub const ANN_POOL: &str = "vipgate.io/address-pool";
/// Annotation: the sharing key.
pub const ANN_SHARED: &str = "vipgate.io/allow-shared-ip";
/// Annotation: `nodes` (default) or `pods`.
pub const ANN_BACKENDS: &str = "vipgate.io/backends";
/// MetalLB's equivalents, honoured so that a cluster can move over
/// without editing its Services.
pub const METALLB_IPS: &str = "metallb.universe.tf/loadBalancerIPs";
/// MetalLB's address-pool annotation.
pub const METALLB_POOL: &str = "metallb.universe.tf/address-pool";
/// MetalLB's allow-shared-ip annotation.
pub const METALLB_SHARED: &str = "metallb.universe.tf/allow-shared-ip";

/// Nodes carrying this label are never backends (as cloud load
/// balancers do).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// Whether the controller serves `svc`: type LoadBalancer, and class
/// vipgate.io/gateway (or no class, with `--default-class`).
pub fn is_ours(svc: &Service, default_class: bool) -> bool {
    let Some(spec) = &svc.spec else { return false };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return false;
    }
    match spec.load_balancer_class.as_deref() {
        Some(c) => c == CLASS,
        None => default_class,
    }
}

/// Where a Service's backends come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendSource {
    /// The nodes, on the nodePort.
    Nodes,
    /// The ready pods, on the targetPort: for pod networks the gateway
    /// routes to.
    Pods,
}

/// One port of a Service: one vipgate service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// The port's name, if any.
    pub name: Option<String>,
    /// Its protocol and port.
    pub key: PortKey,
    /// The nodePort the apiserver gave it.
    pub node_port: Option<u16>,
}

/// What a LoadBalancer Service asks of vipgate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intent {
    /// namespace/name.
    pub key: ServiceKey,
    /// Its labels, for the pools' selectors.
    pub labels: BTreeMap<String, String>,
    /// The address asked for.
    pub address: Option<Ipv4Addr>,
    /// The pool asked for.
    pub pool: Option<String>,
    /// The sharing key.
    pub sharing: Option<String>,
    /// Nodes or pods.
    pub backends: BackendSource,
    /// externalTrafficPolicy Local.
    pub local: bool,
    /// With Local: the port each node answers `/healthz` on.
    pub health_check_node_port: Option<u16>,
    /// loadBalancerSourceRanges.
    pub source_ranges: Vec<String>,
    /// sessionAffinity ClientIP.
    pub client_ip_affinity: bool,
    /// TCP and UDP ports.
    pub ports: Vec<Port>,
}

impl Intent {
    /// What the address must allow: its sharing key and ports.
    pub fn claim(&self) -> Claim {
        Claim { sharing: self.sharing.clone(), ports: self.ports.iter().map(|p| p.key).collect() }
    }
}

/// Why a Service cannot be served as it is written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct IntentError {
    /// The field or annotation at fault.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> IntentError {
    IntentError { field: field.into(), reason: reason.into() }
}

fn annotation<'a>(
    svc: &'a Service,
    ours: &'static str,
    metallb: &'static str,
) -> Result<Option<(&'static str, &'a str)>, IntentError> {
    let ann = svc.metadata.annotations.as_ref();
    let get = |k: &str| ann.and_then(|a| a.get(k)).map(|v| v.trim());
    match (get(ours), get(metallb)) {
        (Some(a), Some(b)) if a != b => {
            Err(bad(format!("annotation {ours}"), format!("says {a:?} but {metallb} says {b:?}; set one of them")))
        }
        (Some(a), _) => Ok(Some((ours, a))),
        (None, Some(b)) => Ok(Some((metallb, b))),
        (None, None) => Ok(None),
    }
}

/// Reads what `svc` asks for, or why it cannot be served as written.
pub fn intent(svc: &Service) -> Result<Intent, IntentError> {
    let key = ServiceKey {
        namespace: svc.metadata.namespace.clone().unwrap_or_default(),
        name: svc.metadata.name.clone().unwrap_or_default(),
    };
    let spec = svc.spec.clone().unwrap_or_default();
    let families = spec.ip_families.clone().unwrap_or_default();
    if !families.is_empty() && !families.iter().any(|f| f == "IPv4") {
        return Err(bad("spec.ipFamilies", "asks for IPv6 only; vipgate serves IPv4 only until IPv6 support lands"));
    }
    if spec.ip_family_policy.as_deref() == Some("RequireDualStack") {
        return Err(bad(
            "spec.ipFamilyPolicy",
            "RequireDualStack needs an IPv6 address; vipgate serves IPv4 only until IPv6 support lands (PreferDualStack is served on IPv4)",
        ));
    }
    let mut address = None;
    if let Some(ip) = spec.load_balancer_ip.as_deref().filter(|s| !s.is_empty()) {
        address = Some(parse_v4("spec.loadBalancerIP", ip)?);
    }
    if let Some((name, list)) = annotation(svc, ANN_IPS, METALLB_IPS)? {
        let field = format!("annotation {name}");
        let mut v4 = None;
        for (i, item) in list.split(',').map(str::trim).enumerate() {
            if item.is_empty() {
                return Err(bad(&field, format!("entry {i} is empty")));
            }
            if item.parse::<std::net::Ipv6Addr>().is_ok() {
                continue;
            }
            let ip = parse_v4(&field, item)?;
            v4.get_or_insert(ip);
        }
        let Some(ip) = v4 else {
            return Err(bad(field, "lists only IPv6 addresses; vipgate serves IPv4 only until IPv6 support lands"));
        };
        if let Some(a) = address
            && a != ip
        {
            return Err(bad(field, format!("asks for {ip} but spec.loadBalancerIP asks for {a}")));
        }
        address = Some(ip);
    }
    let pool = annotation(svc, ANN_POOL, METALLB_POOL)?.map(|(_, p)| p.to_owned());
    if let Some(p) = &pool
        && p.is_empty()
    {
        return Err(bad(format!("annotation {ANN_POOL}"), "is empty"));
    }
    let sharing = annotation(svc, ANN_SHARED, METALLB_SHARED)?.map(|(_, k)| k.to_owned()).filter(|k| !k.is_empty());
    let backends = match svc.metadata.annotations.as_ref().and_then(|a| a.get(ANN_BACKENDS)).map(|s| s.trim()) {
        None | Some("nodes") => BackendSource::Nodes,
        Some("pods") => BackendSource::Pods,
        Some(other) => {
            return Err(bad(
                format!("annotation {ANN_BACKENDS}"),
                format!("is {other:?}; it is \"nodes\" or \"pods\""),
            ));
        }
    };
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        ports.push(port(i, p)?);
    }
    let mut seen = BTreeSet::new();
    for p in &ports {
        if !seen.insert(p.key) {
            return Err(bad("spec.ports", format!("{} is listed twice", p.key)));
        }
    }
    let mut source_ranges = Vec::new();
    for (i, r) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
        let r = r.trim();
        if r.contains(':') {
            // An IPv6 range admits no IPv4 client: leaving it out keeps
            // the Service closed to them, as the user asked.
            continue;
        }
        let field = format!("spec.loadBalancerSourceRanges[{i}]");
        let (ip, len) = r.split_once('/').ok_or_else(|| bad(&field, format!("{r:?} is not a CIDR")))?;
        let ip = parse_v4(&field, ip)?;
        let len = len
            .parse::<u32>()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| bad(&field, format!("{r:?}: the prefix length is 0 to 32")))?;
        // Kubernetes accepts host bits ("198.18.5.7/24"); the gateway
        // wants the network.
        let mask = vipgate_controlplane::checks::prefix_mask(len);
        source_ranges.push(format!("{}/{len}", Ipv4Addr::from(u32::from(ip) & mask)));
    }
    if source_ranges.is_empty() && spec.load_balancer_source_ranges.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(bad(
            "spec.loadBalancerSourceRanges",
            "lists only IPv6 ranges; vipgate serves IPv4 only until IPv6 support lands",
        ));
    }
    Ok(Intent {
        key,
        labels: svc.metadata.labels.clone().unwrap_or_default(),
        address,
        pool,
        sharing,
        backends,
        local: spec.external_traffic_policy.as_deref() == Some("Local"),
        health_check_node_port: spec.health_check_node_port.and_then(|p| u16::try_from(p).ok()),
        source_ranges,
        client_ip_affinity: spec.session_affinity.as_deref() == Some("ClientIP"),
        ports,
    })
}

fn parse_v4(field: &str, s: &str) -> Result<Ipv4Addr, IntentError> {
    s.trim().parse::<Ipv4Addr>().map_err(|_| {
        if s.parse::<std::net::Ipv6Addr>().is_ok() {
            bad(field, format!("{s} is IPv6; vipgate serves IPv4 only until IPv6 support lands"))
        } else {
            bad(field, format!("{s:?} is not an IPv4 address"))
        }
    })
}

fn port(i: usize, p: &ServicePort) -> Result<Port, IntentError> {
    let udp = match p.protocol.as_deref() {
        None | Some("TCP") => false,
        Some("UDP") => true,
        Some(other) => {
            return Err(bad(
                format!("spec.ports[{i}].protocol"),
                format!("{other} is not served; vipgate serves TCP and UDP"),
            ));
        }
    };
    let port = u16::try_from(p.port)
        .ok()
        .filter(|&v| v != 0)
        .ok_or_else(|| bad(format!("spec.ports[{i}].port"), "is not 1 to 65535"))?;
    Ok(Port {
        name: p.name.clone().filter(|n| !n.is_empty()),
        key: PortKey { udp, port },
        node_port: p.node_port.and_then(|n| u16::try_from(n).ok()),
    })
}

/// The vipgate service name of one port of a Service:
/// `CLUSTER.NAMESPACE.NAME.PORT`, PORT being the port's name or, for an
/// unnamed one, `tcp-80`. Namespaces, Service names and port names hold no
/// dot, so the name is unique and the same at every restart.
pub fn service_name(cluster: &str, key: &ServiceKey, port: &Port) -> String {
    let p = match &port.name {
        Some(n) => n.clone(),
        None => format!("{}-{}", if port.key.udp { "udp" } else { "tcp" }, port.key.port),
    };
    format!("{cluster}.{}.{}.{p}", key.namespace, key.name)
}

/// The vipgate source pool of a fullnat VipPool.
pub fn source_pool_name(cluster: &str, pool: &str) -> String {
    format!("{cluster}.{pool}")
}

/// A node as a backend: its InternalIP, if it is ready and not excluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeBackend {
    /// Its InternalIP.
    pub address: Ipv4Addr,
    /// Ready and not excluded.
    pub usable: bool,
}

/// The nodes by name, as backends.
pub fn node_backends<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> BTreeMap<String, NodeBackend> {
    let mut out = BTreeMap::new();
    for n in nodes {
        let Some(name) = n.metadata.name.clone() else { continue };
        let status = n.status.as_ref();
        let address = status.and_then(|s| s.addresses.as_ref()).and_then(|a| {
            a.iter().filter(|a| a.type_ == "InternalIP").find_map(|a| a.address.parse::<Ipv4Addr>().ok())
        });
        let Some(address) = address else { continue };
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let excluded = n.metadata.labels.as_ref().is_some_and(|l| l.contains_key(EXCLUDE_LABEL));
        let deleting = n.metadata.deletion_timestamp.is_some();
        out.insert(name, NodeBackend { address, usable: ready && !excluded && !deleting });
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Readiness {
    /// Only not-ready or terminating endpoints: takes no new flows.
    Draining,
    /// At least one ready endpoint.
    Ready,
}

/// Whether an endpoint takes new connections, or only keeps its open
/// ones. An endpoint whose readiness is unset counts as ready (the
/// EndpointSlice API's rule).
fn endpoint_readiness(ep: &k8s_openapi::api::discovery::v1::Endpoint) -> Readiness {
    let c = ep.conditions.clone().unwrap_or_default();
    let ready = c.ready.unwrap_or(true) && !c.terminating.unwrap_or(false);
    if ready { Readiness::Ready } else { Readiness::Draining }
}

/// The vipgate services for `intent` at address `vip` from pool `pool`
/// (`pool_name` names it), with backends from `slices` and `nodes`.
pub fn translate(
    cluster: &str,
    intent: &Intent,
    vip: Ipv4Addr,
    pool_name: &str,
    pool: &VipPoolSpec,
    slices: &[&EndpointSlice],
    nodes: &BTreeMap<String, NodeBackend>,
) -> Vec<pb::Service> {
    let mut out = Vec::new();
    for port in &intent.ports {
        let backends: BTreeMap<(Ipv4Addr, u16), Readiness> = match intent.backends {
            BackendSource::Pods => pod_backends(port, slices),
            BackendSource::Nodes => {
                let Some(node_port) = port.node_port else {
                    // The apiserver gives every LoadBalancer port a
                    // nodePort unless allocateLoadBalancerNodePorts is
                    // false: then only pods can be backends.
                    out.push(service(cluster, intent, port, vip, pool_name, pool, BTreeMap::new()));
                    continue;
                };
                if intent.local {
                    local_nodes(port, slices, nodes).into_iter().map(|(a, r)| ((a, node_port), r)).collect()
                } else {
                    nodes.values().filter(|n| n.usable).map(|n| ((n.address, node_port), Readiness::Ready)).collect()
                }
            }
        };
        out.push(service(cluster, intent, port, vip, pool_name, pool, backends));
    }
    out
}

fn service(
    cluster: &str,
    intent: &Intent,
    port: &Port,
    vip: Ipv4Addr,
    pool_name: &str,
    pool: &VipPoolSpec,
    backends: BTreeMap<(Ipv4Addr, u16), Readiness>,
) -> pb::Service {
    let health_check = if intent.local && intent.backends == BackendSource::Nodes {
        intent.health_check_node_port.map(|p| pb::HealthCheck {
            kind: "http".into(),
            port: u32::from(p),
            path: "/healthz".into(),
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 1,
            fall: 2,
            ..Default::default()
        })
    } else {
        pool.health_check.as_ref().map(|h| pb::HealthCheck {
            kind: h.kind.clone(),
            path: h.path.clone().unwrap_or_default(),
            interval_ms: h.interval_ms.unwrap_or(0),
            timeout_ms: h.timeout_ms.unwrap_or(0),
            rise: h.rise.unwrap_or(0),
            fall: h.fall.unwrap_or(0),
            ..Default::default()
        })
    };
    pb::Service {
        name: service_name(cluster, &intent.key, port),
        vip: vip.to_string(),
        port: u32::from(port.key.port),
        protocol: if port.key.udp { "udp" } else { "tcp" }.into(),
        mode: pool.mode.as_str().into(),
        source_pool: if pool.mode == ForwardingMode::Fullnat {
            source_pool_name(cluster, pool_name)
        } else {
            String::new()
        },
        tunnel_source: if pool.mode == ForwardingMode::Dsr {
            pool.tunnel_source.clone().unwrap_or_default()
        } else {
            String::new()
        },
        backends: backends
            .into_iter()
            .map(|((a, p), r)| pb::Backend {
                address: a.to_string(),
                port: u32::from(p),
                weight: None,
                admin_state: match r {
                    Readiness::Ready => pb::AdminState::Enabled,
                    Readiness::Draining => pb::AdminState::Draining,
                } as i32,
                ..Default::default()
            })
            .collect(),
        health_check,
        source_ranges: intent.source_ranges.clone(),
        affinity: if intent.client_ip_affinity { "client_ip" } else { "" }.into(),
        ..Default::default()
    }
}

/// The slices' endpoints for `port`: the slice port whose name is the
/// Service port's (both unnamed for a one-port Service).
fn slice_port(slice: &EndpointSlice, port: &Port) -> Option<u16> {
    let want = port.name.as_deref().unwrap_or("");
    slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref().unwrap_or("") == want)
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
}

fn pod_backends(port: &Port, slices: &[&EndpointSlice]) -> BTreeMap<(Ipv4Addr, u16), Readiness> {
    let mut out = BTreeMap::new();
    for s in slices.iter().filter(|s| s.address_type == "IPv4") {
        let Some(target) = slice_port(s, port) else { continue };
        for ep in &s.endpoints {
            let r = endpoint_readiness(ep);
            if !ep.conditions.as_ref().and_then(|c| c.serving).unwrap_or(true) && r == Readiness::Draining {
                // Neither ready nor serving: it answers nothing, new or old.
                continue;
            }
            for a in ep.addresses.iter().filter_map(|a| a.parse::<Ipv4Addr>().ok()) {
                let e = out.entry((a, target)).or_insert(r);
                *e = (*e).max(r);
            }
        }
    }
    out
}

fn local_nodes(
    port: &Port,
    slices: &[&EndpointSlice],
    nodes: &BTreeMap<String, NodeBackend>,
) -> BTreeMap<Ipv4Addr, Readiness> {
    let mut out = BTreeMap::new();
    for s in slices {
        if slice_port(s, port).is_none() {
            continue;
        }
        for ep in &s.endpoints {
            let Some(node) = ep.node_name.as_ref().and_then(|n| nodes.get(n)) else { continue };
            let r = if node.usable { endpoint_readiness(ep) } else { Readiness::Draining };
            let e = out.entry(node.address).or_insert(r);
            *e = (*e).max(r);
        }
    }
    out
}

#[cfg(test)]
mod tests;
