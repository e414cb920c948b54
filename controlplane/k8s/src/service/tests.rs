use super::*;
use serde_json::json;

fn svc(v: serde_json::Value) -> Service {
    let mut base = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "web", "namespace": "shop" },
        "spec": {
            "type": "LoadBalancer", "loadBalancerClass": CLASS,
            "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080, "targetPort": 8080 }]
        }
    });
    merge(&mut base, v);
    serde_json::from_value(base).unwrap()
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn node(name: &str, ip: &str, ready: bool) -> Node {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "status": {
            "addresses": [{ "type": "Hostname", "address": name }, { "type": "InternalIP", "address": ip }],
            "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }]
        }
    }))
    .unwrap()
}

fn slice(endpoints: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": { "name": "web-1", "namespace": "shop", "labels": { "kubernetes.io/service-name": "web" } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": endpoints
    }))
    .unwrap()
}

#[test]
fn the_class_decides_which_services_are_ours() {
    assert!(is_ours(&svc(json!({})), false));
    let other = svc(json!({ "spec": { "loadBalancerClass": "example.com/other" } }));
    assert!(!is_ours(&other, false) && !is_ours(&other, true));
    let none = svc(json!({ "spec": { "loadBalancerClass": null } }));
    assert!(!is_ours(&none, false) && is_ours(&none, true));
    assert!(!is_ours(&svc(json!({ "spec": { "type": "NodePort" } })), true));
}

#[test]
fn annotations_are_read_with_their_metallb_equivalents() {
    let i = intent(&svc(json!({ "metadata": { "annotations": {
        METALLB_IPS: "2001:db8::5, 198.18.100.7", METALLB_POOL: "edge", METALLB_SHARED: "key1"
    } } })))
    .unwrap();
    assert_eq!(i.address, Some("198.18.100.7".parse().unwrap()));
    assert_eq!(i.pool.as_deref(), Some("edge"));
    assert_eq!(i.sharing.as_deref(), Some("key1"));
    let i = intent(&svc(json!({ "metadata": { "annotations": { ANN_POOL: "edge", METALLB_POOL: "edge" } } }))).unwrap();
    assert_eq!(i.pool.as_deref(), Some("edge"));
    let e = intent(&svc(json!({ "metadata": { "annotations": { ANN_POOL: "a", METALLB_POOL: "b" } } }))).unwrap_err();
    assert_eq!(
        e.to_string(),
        "annotation vipgate.io/address-pool: says \"a\" but metallb.universe.tf/address-pool says \"b\"; set one of them"
    );
}

#[test]
fn bad_input_is_refused_naming_the_field() {
    let e = |v| intent(&svc(v)).unwrap_err().to_string();
    assert_eq!(
        e(json!({ "metadata": { "annotations": { ANN_IPS: "198.18.100.300" } } })),
        "annotation vipgate.io/loadBalancerIPs: \"198.18.100.300\" is not an IPv4 address"
    );
    assert_eq!(
        e(json!({ "metadata": { "annotations": { ANN_IPS: "2001:db8::1" } } })),
        "annotation vipgate.io/loadBalancerIPs: lists only IPv6 addresses; vipgate serves IPv4 only until IPv6 support lands"
    );
    assert_eq!(
        e(
            json!({ "spec": { "loadBalancerIP": "198.18.100.5" }, "metadata": { "annotations": { ANN_IPS: "198.18.100.6" } } })
        ),
        "annotation vipgate.io/loadBalancerIPs: asks for 198.18.100.6 but spec.loadBalancerIP asks for 198.18.100.5"
    );
    assert_eq!(
        e(json!({ "spec": { "ipFamilies": ["IPv6"] } })),
        "spec.ipFamilies: asks for IPv6 only; vipgate serves IPv4 only until IPv6 support lands"
    );
    assert!(
        e(json!({ "spec": { "ipFamilyPolicy": "RequireDualStack" } }))
            .starts_with("spec.ipFamilyPolicy: RequireDualStack")
    );
    assert_eq!(
        e(json!({ "metadata": { "annotations": { ANN_BACKENDS: "vms" } } })),
        "annotation vipgate.io/backends: is \"vms\"; it is \"nodes\" or \"pods\""
    );
    assert_eq!(
        e(json!({ "spec": { "ports": [{ "port": 80, "protocol": "SCTP" }] } })),
        "spec.ports[0].protocol: SCTP is not served; vipgate serves TCP and UDP"
    );
    assert_eq!(
        e(json!({ "spec": { "loadBalancerSourceRanges": ["198.18.0.0/33"] } })),
        "spec.loadBalancerSourceRanges[0]: \"198.18.0.0/33\": the prefix length is 0 to 32"
    );
}

#[test]
fn each_port_is_one_vipgate_service_with_a_stable_name() {
    let s = svc(json!({ "spec": { "ports": [
        { "name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080 },
        { "name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053 }
    ] } }));
    let i = intent(&s).unwrap();
    let names: Vec<String> = i.ports.iter().map(|p| service_name("prod", &i.key, p)).collect();
    assert_eq!(names, ["prod.shop.web.http", "prod.shop.web.dns"]);
    let unnamed = intent(&svc(json!({ "spec": { "ports": [{ "port": 443, "nodePort": 30443 }] } }))).unwrap();
    assert_eq!(service_name("prod", &unnamed.key, &unnamed.ports[0]), "prod.shop.web.tcp-443");
}

fn backends(s: &pb::Service) -> Vec<(String, u32, i32)> {
    s.backends.iter().map(|b| (b.address.clone(), b.port, b.admin_state)).collect()
}

const ENABLED: i32 = pb::AdminState::Enabled as i32;
const DRAINING: i32 = pb::AdminState::Draining as i32;

#[test]
fn cluster_policy_serves_every_ready_node_on_the_node_port() {
    let i = intent(&svc(json!({}))).unwrap();
    let nodes = node_backends(&[
        node("n1", "198.18.1.2", true),
        node("n2", "198.18.1.3", false),
        node("n3", "198.18.1.4", true),
    ]);
    let out = translate("prod", &i, "198.18.100.64".parse().unwrap(), "p", &VipPoolSpec::default(), &[], &nodes);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].vip, "198.18.100.64");
    assert_eq!(out[0].mode, "nat");
    assert_eq!(backends(&out[0]), [("198.18.1.2".into(), 30080, ENABLED), ("198.18.1.4".into(), 30080, ENABLED)]);
    assert!(out[0].health_check.is_none());
}

#[test]
fn local_policy_serves_the_nodes_with_endpoints_and_drains_terminating_ones() {
    let i =
        intent(&svc(json!({ "spec": { "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000 } }))).unwrap();
    let nodes = node_backends(&[
        node("n1", "198.18.1.2", true),
        node("n2", "198.18.1.3", true),
        node("n3", "198.18.1.4", true),
    ]);
    let s = slice(json!([
        { "addresses": ["10.0.0.1"], "nodeName": "n1", "conditions": { "ready": true } },
        { "addresses": ["10.0.0.2"], "nodeName": "n2", "conditions": { "ready": false, "serving": true, "terminating": true } },
    ]));
    let out = translate("prod", &i, "198.18.100.64".parse().unwrap(), "p", &VipPoolSpec::default(), &[&s], &nodes);
    assert_eq!(backends(&out[0]), [("198.18.1.2".into(), 30080, ENABLED), ("198.18.1.3".into(), 30080, DRAINING)]);
    let hc = out[0].health_check.as_ref().unwrap();
    assert_eq!((hc.kind.as_str(), hc.port, hc.path.as_str()), ("http", 32000, "/healthz"));
}

#[test]
fn pods_backends_are_the_endpoints_on_the_target_port() {
    let i = intent(&svc(json!({ "metadata": { "annotations": { ANN_BACKENDS: "pods" } } }))).unwrap();
    let s = slice(json!([
        { "addresses": ["198.18.2.10"], "conditions": { "ready": true } },
        { "addresses": ["198.18.2.11"], "conditions": { "ready": false, "serving": true, "terminating": true } },
        { "addresses": ["198.18.2.12"], "conditions": { "ready": false, "serving": false } },
        { "addresses": ["198.18.2.13"] },
    ]));
    let pool =
        VipPoolSpec { mode: ForwardingMode::Dsr, tunnel_source: Some("198.18.3.0/24".into()), ..Default::default() };
    let out = translate("prod", &i, "198.18.100.64".parse().unwrap(), "p", &pool, &[&s], &BTreeMap::new());
    assert_eq!(
        backends(&out[0]),
        [
            ("198.18.2.10".into(), 8080, ENABLED),
            ("198.18.2.11".into(), 8080, DRAINING),
            ("198.18.2.13".into(), 8080, ENABLED)
        ]
    );
    assert_eq!((out[0].mode.as_str(), out[0].tunnel_source.as_str()), ("dsr", "198.18.3.0/24"));
}

#[test]
fn fullnat_services_name_their_pools_source_pool() {
    let i = intent(&svc(json!({}))).unwrap();
    let pool = VipPoolSpec { mode: ForwardingMode::Fullnat, ..Default::default() };
    let out = translate("prod", &i, "198.18.100.64".parse().unwrap(), "edge", &pool, &[], &BTreeMap::new());
    assert_eq!((out[0].mode.as_str(), out[0].source_pool.as_str()), ("fullnat", "prod.edge"));
}

#[test]
fn excluded_and_deleted_nodes_are_no_backends() {
    let mut excluded = node("n1", "198.18.1.2", true);
    excluded.metadata.labels = Some([(EXCLUDE_LABEL.to_owned(), String::new())].into());
    let nodes = node_backends(&[excluded]);
    assert!(!nodes["n1"].usable);
}

#[test]
fn source_ranges_lose_their_host_bits_and_client_ip_affinity_is_carried() {
    let i = intent(&svc(json!({ "spec": {
        "loadBalancerSourceRanges": ["198.18.5.7/24", "2001:db8::/32", "198.18.9.0/32"],
        "sessionAffinity": "ClientIP"
    } })))
    .unwrap();
    assert_eq!(i.source_ranges, ["198.18.5.0/24", "198.18.9.0/32"]);
    let out =
        translate("prod", &i, "198.18.100.64".parse().unwrap(), "p", &VipPoolSpec::default(), &[], &BTreeMap::new());
    assert_eq!(out[0].source_ranges, ["198.18.5.0/24", "198.18.9.0/32"]);
    assert_eq!(out[0].affinity, "client_ip");
    let plain = intent(&svc(json!({}))).unwrap();
    let out = translate(
        "prod",
        &plain,
        "198.18.100.64".parse().unwrap(),
        "p",
        &VipPoolSpec::default(),
        &[],
        &BTreeMap::new(),
    );
    assert!(out[0].source_ranges.is_empty());
    assert_eq!(out[0].affinity, "");
}
