//! The desired-state commands: list, service, backend, drain, pool, apply
//! and watch, on `ServiceManager`: the command line checked and turned into
//! requests, and the calls.

use std::net::Ipv4Addr;
use std::path::Path;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use vipgate_controlplane::api::{
    self, pb, pb::gateway_client::GatewayClient, pb::service_manager_client::ServiceManagerClient,
};

use crate::cli::{BackendCommand, Cli, Command, PoolCommand, ServiceCommand, ServiceSpec, StateCommand};
use crate::error::CtlError;
use crate::json::{HealthCheckJson, StateJson, json};
use crate::{apply, request, tables, watch};

/// The desired-state client.
pub(crate) type Client = ServiceManagerClient<Channel>;

/// Runs a desired-state command and returns what to print (`watch`
/// prints as it goes and returns nothing).
pub(crate) async fn run(cli: &Cli) -> Result<String, CtlError> {
    // Check the command line before connecting: a usage error is one
    // whether or not vipgated runs.
    let op = Op::parse(&cli.command)?;
    let owner = cli.owner.clone().unwrap_or_default();
    if !owner.is_empty() && matches!(op, Op::Export(_) | Op::Import(..)) {
        return Err(CtlError::Usage(
            "state export and import work on every owner's objects; leave out --owner".to_owned(),
        ));
    }
    let channel = connect(cli).await?;
    let mut client = Client::new(channel.clone());
    let response = match op {
        Op::List(traffic) => {
            let state = get_state(&mut client, &owner).await?;
            let stats = GatewayClient::new(channel)
                .get_service_stats(request(pb::GetServiceStatsRequest { service: String::new() }))
                .await
                .map_err(CtlError::Status)?
                .into_inner();
            let mut state = StateJson::from(state);
            state.join(stats);
            return if cli.json { json(&state) } else { Ok(tables::list_text(&state, traffic)) };
        }
        Op::Watch => return watch::watch(&mut client, &owner, cli.json).await,
        Op::Export(path) => return export(&mut client, &path).await,
        Op::CreateService(service) => {
            client.create_service(request(pb::CreateServiceRequest { service: Some(service), owner })).await
        }
        Op::UpdateService(service) => {
            client.update_service(request(pb::UpdateServiceRequest { service: Some(service), owner })).await
        }
        Op::DeleteService(name) => client.delete_service(request(pb::DeleteServiceRequest { name, owner })).await,
        Op::AddBackend(r) => client.add_backend(request(pb::AddBackendRequest { owner, ..r })).await,
        Op::UpdateBackend(r) => client.update_backend(request(pb::UpdateBackendRequest { owner, ..r })).await,
        Op::RemoveBackend(r) => client.remove_backend(request(pb::RemoveBackendRequest { owner, ..r })).await,
        Op::CreatePool(pool) => {
            client.create_source_pool(request(pb::CreateSourcePoolRequest { pool: Some(pool), owner })).await
        }
        Op::DeletePool(name) => client.delete_source_pool(request(pb::DeleteSourcePoolRequest { name, owner })).await,
        Op::Apply(mut r, expected, _) if owner.is_empty() => {
            r.expected_version = match expected {
                Some(v) => v,
                None => get_state(&mut client, "").await?.version,
            };
            client.apply(request(r)).await
        }
        Op::Apply(mut r, expected, generation) => {
            r.expected_version = expected.unwrap_or(0);
            r.expected_generation = match generation {
                Some(g) => g,
                None => get_state(&mut client, &owner).await?.generations.get(&owner).copied().unwrap_or(0),
            };
            r.owner = owner;
            client.apply(request(r)).await
        }
        Op::Import(mut r, expected) => {
            r.expected_version = match expected {
                Some(v) => v,
                None => get_state(&mut client, "").await?.version,
            };
            client.apply(request(r)).await
        }
    }
    .map_err(CtlError::Status)?
    .into_inner();
    if cli.json {
        json(&response)
    } else if let Some(owner) = cli.owner.as_deref().filter(|o| !o.is_empty()) {
        Ok(format!("applied: version {}, owner {owner} at generation {}\n", response.version, response.generation))
    } else {
        Ok(format!("applied: version {}\n", response.version))
    }
}

/// The state; with an owner, that owner's objects only.
async fn get_state(client: &mut Client, owner: &str) -> Result<pb::GetStateResponse, CtlError> {
    let r = pb::GetStateRequest { owner: owner.to_owned() };
    Ok(client.get_state(request(r)).await.map_err(CtlError::Status)?.into_inner())
}

/// `state export`: every dynamic object, with its owner, the version and
/// the generations, as the file `state import` (and `apply`) reads.
async fn export(client: &mut Client, path: &Path) -> Result<String, CtlError> {
    let mut state = StateJson::from(get_state(client, "").await?);
    state.services.retain(|s| s.origin.as_deref() == Some("dynamic"));
    state.source_pools.retain(|p| p.origin.as_deref() == Some("dynamic"));
    let text = json(&state)?;
    let summary = format!(
        "exported: version {}, {} services, {} source pools",
        state.version,
        state.services.len(),
        state.source_pools.len()
    );
    if path == Path::new("-") {
        return Ok(text);
    }
    // Written next to the target and renamed over it: a backup is never
    // left half-written.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &text)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| CtlError::File(format!("cannot write {}: {e}", path.display())))?;
    Ok(format!("{summary} to {}\n", path.display()))
}

/// Dials the socket, or with --endpoint TCP with mutual TLS.
async fn connect(cli: &Cli) -> Result<Channel, CtlError> {
    let (Some(endpoint), Some(cert), Some(key), Some(ca)) = (&cli.endpoint, &cli.cert, &cli.key, &cli.ca) else {
        return Ok(api::connect_unix_channel(&cli.socket).await?);
    };
    let fail = |reason: String| CtlError::Connect { endpoint: endpoint.clone(), reason };
    let read = |path: &Path, what: &str| {
        std::fs::read(path).map_err(|e| fail(format!("cannot read the {what} {}: {e}", path.display())))
    };
    let tls = ClientTlsConfig::new()
        .identity(Identity::from_pem(read(cert, "client certificate")?, read(key, "client key")?))
        .ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?));
    let channel = Endpoint::from_shared(endpoint.clone())
        .map_err(|e| fail(format!("not a URL like https://198.18.0.1:50051: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tls_config(tls)
        .map_err(|e| fail(root_cause(&e)))?
        .connect()
        .await
        .map_err(|e| fail(root_cause(&e)))?;
    Ok(channel)
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// One call, its request checked and built from the command line.
enum Op {
    List(bool),
    Watch,
    CreateService(pb::Service),
    UpdateService(pb::Service),
    DeleteService(String),
    AddBackend(pb::AddBackendRequest),
    UpdateBackend(pb::UpdateBackendRequest),
    RemoveBackend(pb::RemoveBackendRequest),
    CreatePool(pb::SourcePool),
    DeletePool(String),
    /// The request, `--expected-version`, `--expected-generation`.
    Apply(pb::ApplyRequest, Option<u64>, Option<u64>),
    Export(std::path::PathBuf),
    Import(pb::ApplyRequest, Option<u64>),
}

impl Op {
    fn parse(command: &Command) -> Result<Op, CtlError> {
        Ok(match command {
            Command::Health | Command::Stats { .. } => unreachable!("served by the Gateway client"),
            Command::List { stats } => Op::List(*stats),
            Command::Watch => Op::Watch,
            Command::Service(ServiceCommand::Create { name, spec }) => Op::CreateService(service(name, spec)?),
            Command::Service(ServiceCommand::Update { name, spec }) => Op::UpdateService(service(name, spec)?),
            Command::Service(ServiceCommand::Delete { name }) => Op::DeleteService(name.clone()),
            Command::Backend(BackendCommand::Add { service, backend, weight }) => {
                let (address, port, _) = parse_backend(backend, "ADDR:PORT", false)?;
                Op::AddBackend(pb::AddBackendRequest {
                    service: service.clone(),
                    backend: Some(pb::Backend {
                        address,
                        port,
                        weight: *weight,
                        admin_state: pb::AdminState::Enabled.into(),
                        ..pb::Backend::default()
                    }),
                    ..Default::default()
                })
            }
            Command::Backend(BackendCommand::Update { service, backend, weight, state }) => {
                let (address, port, _) = parse_backend(backend, "ADDR:PORT", false)?;
                let admin_state = match state.as_deref() {
                    None => pb::AdminState::Unspecified,
                    Some(s) => admin_state(s).expect("clap checked the value"),
                };
                Op::UpdateBackend(pb::UpdateBackendRequest {
                    service: service.clone(),
                    address,
                    port,
                    weight: *weight,
                    admin_state: admin_state.into(),
                    ..Default::default()
                })
            }
            Command::Drain { service, backend } => {
                let (address, port, _) = parse_backend(backend, "ADDR:PORT", false)?;
                Op::UpdateBackend(pb::UpdateBackendRequest {
                    service: service.clone(),
                    address,
                    port,
                    weight: None,
                    admin_state: pb::AdminState::Draining.into(),
                    ..Default::default()
                })
            }
            Command::Backend(BackendCommand::Remove { service, backend }) => {
                let (address, port, _) = parse_backend(backend, "ADDR:PORT", false)?;
                Op::RemoveBackend(pb::RemoveBackendRequest {
                    service: service.clone(),
                    address,
                    port,
                    ..Default::default()
                })
            }
            Command::Pool(PoolCommand::Create { name, addresses, ports }) => {
                for a in addresses {
                    parse_ipv4(a).map_err(|e| CtlError::Usage(format!("--address {a}: {e}")))?;
                }
                let (first_port, last_port) = match ports {
                    None => (0, 0),
                    Some(p) => parse_ports(p).map_err(|e| CtlError::Usage(format!("--ports {p}: {e}")))?,
                };
                Op::CreatePool(pb::SourcePool {
                    name: name.clone(),
                    addresses: addresses.clone(),
                    first_port,
                    last_port,
                    origin: 0,
                    ..Default::default()
                })
            }
            Command::Pool(PoolCommand::Delete { name }) => Op::DeletePool(name.clone()),
            Command::Apply { file, expected_version, expected_generation } => {
                Op::Apply(apply::read_apply_file(file)?, *expected_version, *expected_generation)
            }
            Command::State(StateCommand::Export { file }) => Op::Export(file.clone()),
            Command::State(StateCommand::Import { file, expected_version }) => {
                Op::Import(apply::read_apply_file(file)?, *expected_version)
            }
        })
    }
}

fn service(name: &str, spec: &ServiceSpec) -> Result<pb::Service, CtlError> {
    parse_ipv4(&spec.vip).map_err(|e| CtlError::Usage(format!("--vip {}: {e}", spec.vip)))?;
    let backends = spec
        .backends
        .iter()
        .map(|b| {
            let (address, port, weight) = parse_backend(b, "--backend", true)?;
            Ok(pb::Backend {
                address,
                port,
                weight: Some(weight),
                admin_state: pb::AdminState::Enabled.into(),
                ..pb::Backend::default()
            })
        })
        .collect::<Result<Vec<_>, CtlError>>()?;
    Ok(pb::Service {
        name: name.to_owned(),
        vip: spec.vip.clone(),
        port: spec.port.into(),
        protocol: spec.protocol.clone(),
        mode: spec.mode.clone().unwrap_or_default(),
        source_pool: spec.source_pool.clone().unwrap_or_default(),
        tunnel_source: spec.tunnel_source.clone().unwrap_or_default(),
        table_size: spec.table_size.unwrap_or(0),
        on_backend_removal: spec.on_backend_removal.clone().unwrap_or_default(),
        backends,
        health_check: spec
            .check
            .as_ref()
            .map(|kind| {
                HealthCheckJson {
                    kind: kind.clone(),
                    interval_ms: spec.check_interval_ms.unwrap_or(0),
                    timeout_ms: spec.check_timeout_ms.unwrap_or(0),
                    rise: spec.check_rise.unwrap_or(0),
                    fall: spec.check_fall.unwrap_or(0),
                    port: spec.check_port.map_or(0, u32::from),
                    path: spec.check_path.clone().unwrap_or_default(),
                    host: spec.check_host.clone().unwrap_or_default(),
                    expect_status: spec.check_expect_status.clone().unwrap_or_default(),
                    payload_hex: spec.check_payload_hex.clone().unwrap_or_default(),
                    expect_reply_hex: spec.check_expect_reply_hex.clone().unwrap_or_default(),
                    source: spec.check_source.clone().unwrap_or_default(),
                }
                .into_proto("--check")
            })
            .transpose()
            .map_err(|e| {
                CtlError::Usage(
                    e.replace("--check.payload_hex", "--check-payload-hex")
                        .replace("--check.expect_reply_hex", "--check-expect-reply-hex"),
                )
            })?,
        new_flow_limit: spec.new_flows_per_second.map(|per_second| pb::NewFlowLimit {
            per_second,
            burst: spec.new_flow_burst.unwrap_or(0),
            prefix_len: spec.new_flow_prefix_len,
        }),
        source_ranges: spec.source_ranges.clone(),
        affinity: spec.affinity.clone().unwrap_or_default(),
        ..pb::Service::default()
    })
}

fn parse_ipv4(s: &str) -> Result<Ipv4Addr, String> {
    s.parse::<Ipv4Addr>().map_err(|_| format!("{s:?} is not an IPv4 address"))
}

/// `ADDR:PORT`, or with `weight` also `ADDR:PORT:WEIGHT` (weight 1 when
/// absent). The weight's range is the server's to check, so that its
/// error names the field.
fn parse_backend(s: &str, what: &str, weight: bool) -> Result<(String, u32, u32), CtlError> {
    let usage = |reason: String| CtlError::Usage(format!("{what} {s}: {reason}"));
    let form = if weight { "ADDR:PORT[:WEIGHT]" } else { "ADDR:PORT" };
    let parts: Vec<&str> = s.split(':').collect();
    let (addr, port, w) = match (parts.as_slice(), weight) {
        ([a, p], _) => (*a, *p, None),
        ([a, p, w], true) => (*a, *p, Some(*w)),
        _ => return Err(usage(format!("not {form}, e.g. 198.18.1.11:8080"))),
    };
    parse_ipv4(addr).map_err(usage)?;
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => u32::from(p),
        _ => return Err(usage(format!("port {port:?} is not from 1 to 65535"))),
    };
    let w = match w {
        None => 1,
        Some(w) => w.parse::<u32>().map_err(|_| usage(format!("weight {w:?} is not a number")))?,
    };
    Ok((addr.to_owned(), port, w))
}

/// `FIRST-LAST`.
fn parse_ports(s: &str) -> Result<(u32, u32), String> {
    let (first, last) = s.split_once('-').ok_or_else(|| "not FIRST-LAST, e.g. 1024-65535".to_owned())?;
    let port = |p: &str| match p.parse::<u16>() {
        Ok(n) if n != 0 => Ok(u32::from(n)),
        _ => Err(format!("port {p:?} is not from 1 to 65535")),
    };
    let (first, last) = (port(first)?, port(last)?);
    if first > last {
        return Err(format!("first port {first} is above last port {last}"));
    }
    Ok((first, last))
}

pub(crate) fn admin_state(s: &str) -> Option<pb::AdminState> {
    match s {
        "enabled" => Some(pb::AdminState::Enabled),
        "draining" => Some(pb::AdminState::Draining),
        "disabled" => Some(pb::AdminState::Disabled),
        _ => None,
    }
}
