//! The custom resources: `VipPool` (addresses and how their Services are
//! served) and `VipGateway` (a vipgated to push the Services to).
//!
//! Owns: the resources' schema, their defaults and the conditions they
//! report. Must not: hold logic beyond parsing their fields; the CRDs
//! printed by `vipgate-k8s crds` are generated from these types.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A pool of addresses for Services of type LoadBalancer, and how the
/// gateways serve the Services that get them.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "vipgate.io",
    version = "v1alpha1",
    kind = "VipPool",
    status = "VipPoolStatus",
    shortname = "vpool",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Assigned","type":"integer","jsonPath":".status.assigned"}"#,
    printcolumn = r#"{"name":"Available","type":"integer","jsonPath":".status.available"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VipPoolSpec {
    /// IPv4 CIDRs (`198.18.100.0/24`), ranges (`198.18.100.10-198.18.100.20`)
    /// or single addresses. No two pools may share an address.
    pub addresses: Vec<String>,
    /// Whether Services that name no pool get addresses from this one.
    #[serde(default = "yes")]
    #[schemars(default = "yes")]
    pub auto_assign: bool,
    /// Leaves out addresses ending in .0 and .255.
    #[serde(default)]
    pub avoid_buggy_ips: bool,
    /// Which Services may take addresses from this pool without naming
    /// it, and in which order pools are tried. Unset: every Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,
    /// How the gateways forward the pool's Services: `nat` (default),
    /// `fullnat` (needs `sourceAddresses`) or `dsr`.
    #[serde(default)]
    pub mode: ForwardingMode,
    /// fullnat: the gateways' source addresses and ports toward the
    /// backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_addresses: Option<SourceAddresses>,
    /// dsr: the tunnel's source prefix, such as `198.18.3.0/24`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_source: Option<String>,
    /// The health check of the pool's Services whose
    /// externalTrafficPolicy is Cluster (Local ones are checked on their
    /// healthCheckNodePort). Unset: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<PoolHealthCheck>,
}

fn yes() -> bool {
    true
}

/// Which Services a pool serves, as MetalLB's serviceAllocation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    /// Pools with a lower number are tried first; pools without one come
    /// after every pool with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Only Services in these namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Only Services in namespaces matching one of these selectors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace_selectors: Vec<LabelSelector>,
    /// Only Services matching one of these selectors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_selectors: Vec<LabelSelector>,
}

/// How a gateway forwards a Service's packets to its backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ForwardingMode {
    /// Destination NAT: the backends answer through the gateway.
    #[default]
    Nat,
    /// Source and destination NAT: the backends see the gateway's source
    /// addresses.
    Fullnat,
    /// Direct server return: the backends answer the clients directly.
    Dsr,
}

impl ForwardingMode {
    /// The name vipgated's API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nat => "nat",
            Self::Fullnat => "fullnat",
            Self::Dsr => "dsr",
        }
    }
}

/// A fullnat pool's source addresses on the gateways.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceAddresses {
    /// IPv4 addresses of the gateways' backend-facing side.
    pub addresses: Vec<String>,
    /// First source port; with lastPort. Unset: 1024-65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_port: Option<u16>,
    /// Last source port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_port: Option<u16>,
}

/// A health check, as vipgated's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolHealthCheck {
    /// `tcp`, `http` or `https`.
    pub kind: String,
    /// http, https: the path. Unset: `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Milliseconds between probes. Unset: vipgated's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u32>,
    /// Milliseconds a probe may take. Unset: vipgated's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u32>,
    /// Successes that bring a backend up. Unset: vipgated's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    /// Failures that take a backend down. Unset: vipgated's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
}

/// What a pool reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VipPoolStatus {
    /// Addresses held by at least one Service.
    pub assigned: u64,
    /// Addresses free.
    pub available: u64,
    /// `Valid`: whether the pool's spec is usable, and why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A vipgated that serves the cluster's LoadBalancer Services. The
/// controller pushes the same state to every gateway.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "vipgate.io",
    version = "v1alpha1",
    kind = "VipGateway",
    status = "VipGatewayStatus",
    shortname = "vgw",
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".spec.endpoint"}"#,
    printcolumn = r#"{"name":"Synced","type":"string","jsonPath":".status.conditions[?(@.type==\"Synced\")].status"}"#,
    printcolumn = r#"{"name":"Version","type":"integer","jsonPath":".status.version"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VipGatewaySpec {
    /// vipgated's API: `https://HOST:PORT` (mutual TLS, with
    /// `credentialsSecret`) or `unix:///PATH` (its socket, for a controller
    /// on the gateway's host).
    pub endpoint: String,
    /// https: the Secret with the client's `tls.crt` and `tls.key` and the
    /// CA that signed vipgated's certificate, `ca.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<SecretReference>,
}

/// A Secret, by namespace and name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SecretReference {
    /// The Secret's namespace.
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
}

/// What a gateway reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VipGatewayStatus {
    /// `Synced`: whether the gateway runs the desired state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// vipgated's state version after the last push.
    #[serde(default)]
    pub version: u64,
    /// The vipgate services the cluster has on the gateway.
    #[serde(default)]
    pub services: u64,
}

/// The CRDs as `vipgate-k8s crds` prints them: YAML documents, each after
/// a `---` line. The chart's `crds/vipgate.io.yaml` is this text.
pub fn crds_yaml() -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for crd in [VipPool::crd(), VipGateway::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_charts_crds_are_the_generated_ones() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/chart/vipgate-k8s/crds/vipgate.io.yaml");
        let chart = std::fs::read_to_string(path).expect("the chart's CRDs");
        assert!(
            chart == super::crds_yaml().unwrap(),
            "{path} differs from `vipgate-k8s crds`: regenerate it with\n  \
             cargo run -p vipgate-k8s -- crds > controlplane/k8s/chart/vipgate-k8s/crds/vipgate.io.yaml"
        );
    }
}
