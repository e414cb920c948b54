//! The files `vipgatectl apply` reads: the shapes `list --json` prints
//! (without `origin`, or with origin "dynamic"), checked and turned into
//! an `Apply` request.

use std::path::Path;

use serde::Deserialize;
use vipgate_controlplane::api::pb;

use crate::error::CtlError;
use crate::json::{PoolJson, ServiceJson};
use crate::state::admin_state;

/// The file `vipgatectl apply` and `state import` read. An export (and
/// `list --json`) has a version, a configuration file and generations
/// too: they are read and ignored (the state's version and generations
/// are vipgated's to count).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyFile {
    #[serde(default)]
    services: Vec<ServiceJson>,
    #[serde(default)]
    source_pools: Vec<PoolJson>,
    #[serde(default, rename = "version")]
    _version: Option<u64>,
    #[serde(default, rename = "config_file")]
    _config_file: Option<String>,
    #[serde(default, rename = "generations")]
    _generations: Option<std::collections::BTreeMap<String, u64>>,
}

/// Reads an apply file into the request (its `expected_version` still 0).
pub(crate) fn read_apply_file(path: &Path) -> Result<pb::ApplyRequest, CtlError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| CtlError::File(format!("cannot read {}: {e}", path.display())))?;
    let file: ApplyFile = serde_json::from_str(&text)
        .map_err(|e| CtlError::File(format!("{}: not a valid apply file: {e}", path.display())))?;
    let bad = |what: String| CtlError::File(format!("{}: {what}", path.display()));
    let dynamic = |origin: &Option<String>, what: String| match origin.as_deref() {
        None | Some("dynamic") => Ok(()),
        Some(o) => Err(bad(format!("{what}.origin: {o:?}: apply takes dynamic objects only"))),
    };
    let mut services = Vec::with_capacity(file.services.len());
    for (i, s) in file.services.into_iter().enumerate() {
        dynamic(&s.origin, format!("services[{i}]"))?;
        let mut backends = Vec::with_capacity(s.backends.len());
        for (j, b) in s.backends.into_iter().enumerate() {
            let state = admin_state(&b.state).ok_or_else(|| {
                bad(format!("services[{i}].backends[{j}].state: {:?} is not enabled, draining or disabled", b.state))
            })?;
            backends.push(pb::Backend {
                address: b.address,
                port: b.port,
                weight: b.weight,
                admin_state: state.into(),
                ..pb::Backend::default()
            });
        }
        services.push(pb::Service {
            name: s.name,
            vip: s.vip,
            port: s.port,
            protocol: s.protocol,
            mode: s.mode,
            source_pool: s.source_pool,
            tunnel_source: s.tunnel_source,
            table_size: s.table_size,
            on_backend_removal: s.on_backend_removal,
            backends,
            health_check: s
                .health_check
                .map(|h| h.into_proto(&format!("services[{i}].health_check")))
                .transpose()
                .map_err(bad)?,
            new_flow_limit: s.new_flow_limit,
            source_ranges: s.source_ranges,
            affinity: s.affinity,
            owner: s.owner,
            ..pb::Service::default()
        });
    }
    let mut source_pools = Vec::with_capacity(file.source_pools.len());
    for (i, p) in file.source_pools.into_iter().enumerate() {
        dynamic(&p.origin, format!("source_pools[{i}]"))?;
        source_pools.push(pb::SourcePool {
            name: p.name,
            addresses: p.addresses,
            first_port: p.first_port,
            last_port: p.last_port,
            origin: 0,
            owner: p.owner,
        });
    }
    Ok(pb::ApplyRequest { services, source_pools, ..Default::default() })
}
