//! The `ServiceManager` service: the desired-state API.
//!
//! Converts requests into [`crate::state`] mutations (checking each field on
//! the way in, errors naming the field path) and hands them to the daemon
//! through a [`StateHandle`]; reads answer from the handle's current view
//! and never wait for a mutation or the disk.

use std::net::Ipv4Addr;
use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use vipgate_dataplane::admission::NewFlowLimit;

use super::pb;
use super::pb::service_manager_server::{ServiceManager, ServiceManagerServer};
use crate::config::DEFAULT_POOL_PORTS;
use crate::health::{CheckKind, HealthCheck, HealthCheckInput, HealthStatus, TargetKey};
use crate::state::{
    self, AdminState, AffinityState, BackendState, DEFAULT_OWNER, ErrorKind, MAX_BATCH, MAX_POOLS, MAX_SERVICES,
    ModeState, NewFlowLimitState, PoolState, ProtocolState, RemovalState, ServiceState, SourceRange, StateError,
    StateEventKind, StateHandle, StateView, backend_field, ops, ops::BatchOp, service_field,
};

/// The `ServiceManager` gRPC service over the daemon's [`StateHandle`].
#[derive(Debug)]
pub struct ServiceManagerService {
    state: StateHandle,
}

impl ServiceManagerService {
    /// A service applying its mutations through `state`.
    pub fn new(state: StateHandle) -> Self {
        ServiceManagerService { state }
    }

    /// The tonic server wrapper, ready for `Server::add_service`.
    pub fn into_server(self) -> ServiceManagerServer<Self> {
        ServiceManagerServer::new(self)
    }

    /// Applies `mutation`, answering with the new version and `owner`'s
    /// generation.
    async fn mutate(&self, owner: &str, mutation: state::Mutation) -> Result<Response<pb::MutationResponse>, Status> {
        let applied = self.state.mutate(mutation).await.map_err(status)?;
        let generation = applied.generations.get(owner).copied().unwrap_or(0);
        Ok(Response::new(pb::MutationResponse { version: applied.version, generation }))
    }

    /// Runs one operation as `owner` (the single-object RPCs).
    async fn one(
        &self,
        owner: String,
        cause: &'static str,
        op: BatchOp,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        let o = owner.clone();
        self.mutate(&owner, Box::new(move |c, st| ops::one(c, st, &o, cause, op))).await
    }
}

/// A request's owner: empty is [`DEFAULT_OWNER`].
fn request_owner(owner: &str) -> Result<String, Status> {
    let owner = owner.trim();
    if owner.is_empty() {
        return Ok(DEFAULT_OWNER.to_owned());
    }
    crate::checks::check_owner(owner).map_err(|r| invalid("owner", r))?;
    Ok(owner.to_owned())
}

/// An object's owner from a request: empty stays empty (the request's
/// owner fills it in); an error names `<kind>["name"].owner`.
fn object_owner(owner: &str, field: impl FnOnce() -> String) -> Result<String, Status> {
    let owner = owner.trim();
    if !owner.is_empty() {
        crate::checks::check_owner(owner).map_err(|r| invalid(field(), r))?;
    }
    Ok(owner.to_owned())
}

/// The gRPC status of a refused request.
fn status(e: StateError) -> Status {
    let code = match e.kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Unimplemented => Code::Unimplemented,
        ErrorKind::Unavailable => Code::Unavailable,
    };
    Status::new(code, e.message)
}

fn invalid(field: impl std::fmt::Display, reason: impl std::fmt::Display) -> Status {
    status(StateError::invalid(field, reason))
}

fn admin_state(v: i32, field: &str) -> Result<Option<AdminState>, Status> {
    match pb::AdminState::try_from(v) {
        Ok(pb::AdminState::Unspecified) => Ok(None),
        Ok(pb::AdminState::Enabled) => Ok(Some(AdminState::Enabled)),
        Ok(pb::AdminState::Draining) => Ok(Some(AdminState::Draining)),
        Ok(pb::AdminState::Disabled) => Ok(Some(AdminState::Disabled)),
        Err(_) => Err(invalid(field, format!("{v} is not an admin state"))),
    }
}

fn backend_from(b: &pb::Backend, service: &str, index: usize) -> Result<BackendState, Status> {
    let f = |k: &str| backend_field(service, index, k);
    Ok(BackendState {
        address: state::parse_ipv4(&b.address).map_err(|r| invalid(f("address"), r))?,
        port: state::parse_port(b.port).map_err(|r| invalid(f("port"), r))?,
        weight: state::parse_weight(b.weight).map_err(|r| invalid(f("weight"), r))?,
        admin_state: admin_state(b.admin_state, &f("admin_state"))?.unwrap_or_default(),
    })
}

/// A health check from a request: zero and empty fields take their
/// defaults; an error names `services["web"].health_check.<field>`.
fn health_check_from(h: &pb::HealthCheck, service: &str) -> Result<HealthCheck, Status> {
    let num = |v: u32| (v != 0).then_some(i64::from(v));
    let text = |v: &str| (!v.is_empty()).then(|| v.to_owned());
    let bytes = |v: &[u8]| (!v.is_empty()).then(|| v.to_vec());
    let input = HealthCheckInput {
        kind: text(&h.kind),
        interval_ms: num(h.interval_ms),
        timeout_ms: num(h.timeout_ms),
        rise: num(h.rise),
        fall: num(h.fall),
        port: num(h.port),
        path: text(&h.path),
        host: text(&h.host),
        expect_status: text(&h.expect_status),
        payload: bytes(&h.payload),
        expect_reply: bytes(&h.expect_reply),
        source: text(&h.source),
    };
    input.validate().map_err(|e| invalid(service_field(service, &format!("health_check.{}", e.field)), e.reason))
}

/// A health check as the API shows it: every field with the value in
/// force.
fn health_check_to(h: &HealthCheck) -> pb::HealthCheck {
    let (path, host, expect_status, payload, expect_reply) = match &h.kind {
        CheckKind::Http(c) | CheckKind::Https(c) => {
            (c.path.clone(), c.host.clone().unwrap_or_default(), c.expect_status.to_string(), vec![], vec![])
        }
        CheckKind::Udp(u) => {
            (String::new(), String::new(), String::new(), u.payload.clone(), u.expect_reply.clone().unwrap_or_default())
        }
        CheckKind::Tcp => Default::default(),
    };
    pb::HealthCheck {
        interval_ms: h.interval_ms,
        timeout_ms: h.timeout_ms,
        port: h.port.map_or(0, u32::from),
        kind: h.kind.name().to_owned(),
        rise: h.rise,
        fall: h.fall,
        path,
        host,
        expect_status,
        payload,
        expect_reply,
        source: h.source.map(|a| a.to_string()).unwrap_or_default(),
    }
}

/// A backend's health as the API shows it, and the reason it is down.
fn backend_health(health: &HealthStatus, service: &str, address: Ipv4Addr, port: u16) -> (i32, String) {
    let key = TargetKey { service: service.to_owned(), address, port };
    match health.get(&key) {
        None => (pb::HealthState::Unchecked.into(), String::new()),
        Some(t) if t.up => (pb::HealthState::Up.into(), String::new()),
        Some(t) => (pb::HealthState::Down.into(), t.last_failure),
    }
}

/// A service from a request, each field checked; `flow_timeouts` is
/// UNIMPLEMENTED (never stored, since the dataplane cannot apply it).
/// Backends' `health` and `health_reason` are output only and ignored.
fn service_from(s: &pb::Service) -> Result<ServiceState, Status> {
    let name = s.name.trim().to_owned();
    let f = |k: &str| service_field(&name, k);
    crate::checks::check_name(&name).map_err(|r| invalid(f("name"), r))?;
    let health_check = s.health_check.as_ref().map(|h| health_check_from(h, &name)).transpose()?;
    if s.flow_timeouts.is_some() {
        return Err(Status::unimplemented(format!(
            "{}: per-service flow timeouts are not supported by the dataplane yet; set [dataplane.timeouts]",
            f("flow_timeouts")
        )));
    }
    crate::checks::check_backend_count(s.backends.len()).map_err(|r| invalid(f("backends"), r))?;
    let mode = match s.mode.as_str() {
        "" | "nat" => ModeState::Nat,
        "fullnat" => {
            if s.source_pool.is_empty() {
                return Err(invalid(f("source_pool"), "mode \"fullnat\" needs a source_pool"));
            }
            ModeState::Fullnat { source_pool: s.source_pool.trim().to_owned() }
        }
        "dsr" => {
            ModeState::Dsr { tunnel_source: (!s.tunnel_source.is_empty()).then(|| s.tunnel_source.trim().to_owned()) }
        }
        other => return Err(invalid(f("mode"), format!("{other:?} is not \"nat\", \"fullnat\" or \"dsr\""))),
    };
    if !s.source_pool.is_empty() && !matches!(mode, ModeState::Fullnat { .. }) {
        return Err(invalid(f("source_pool"), "is only used with mode \"fullnat\""));
    }
    if !s.tunnel_source.is_empty() && !matches!(mode, ModeState::Dsr { .. }) {
        return Err(invalid(f("tunnel_source"), "is only used with mode \"dsr\""));
    }
    let on_backend_removal = if s.on_backend_removal.is_empty() {
        RemovalState::Rehash
    } else {
        RemovalState::parse(&s.on_backend_removal).map_err(|r| invalid(f("on_backend_removal"), r))?
    };
    let protocol = ProtocolState::parse(&s.protocol).map_err(|r| invalid(f("protocol"), r))?;
    if let Some(h) = &health_check {
        h.check_service_protocol(&name, protocol.to_spec())
            .map_err(|e| invalid(f(&format!("health_check.{}", e.field)), e.reason))?;
    }
    Ok(ServiceState {
        owner: object_owner(&s.owner, || f("owner"))?,
        vip: state::parse_ipv4(&s.vip).map_err(|r| invalid(f("vip"), r))?,
        port: state::parse_port(s.port).map_err(|r| invalid(f("port"), r))?,
        protocol,
        mode,
        table_size: state::parse_table_size(s.table_size).map_err(|r| invalid(f("table_size"), r))?,
        on_backend_removal,
        backends: s.backends.iter().enumerate().map(|(j, b)| backend_from(b, &name, j)).collect::<Result<_, _>>()?,
        health_check,
        new_flow_limit: s.new_flow_limit.as_ref().map(|l| new_flow_limit_from(l, &name)).transpose()?,
        source_ranges: source_ranges_from(&s.source_ranges, &name)?,
        affinity: match s.affinity.as_str() {
            "" => AffinityState::None,
            a => AffinityState::parse(a).map_err(|r| invalid(f("affinity"), r))?,
        },
        name,
    })
}

/// From how many services a request converts them on rayon's pool, in
/// parallel: a whole-state `Apply` of thousands does, on every CPU.
const PARALLEL_SERVICES: usize = 256;

/// [`service_from`] of each of `list`, in order; the error is the first
/// service's that has one, as converting them in order would find.
fn services_from(list: &[pb::Service]) -> Result<Vec<ServiceState>, Status> {
    use rayon::prelude::*;
    if list.len() < PARALLEL_SERVICES {
        return list.iter().map(service_from).collect();
    }
    // Which service fails first is found again in order, so that the
    // error does not depend on how the work was split.
    list.par_iter()
        .map(service_from)
        .collect::<Result<Vec<_>, _>>()
        .or_else(|_| list.iter().map(service_from).collect())
}

/// A source list from a request; an error names
/// `services["web"].source_ranges[i]`, or the list when it is too long.
fn source_ranges_from(ranges: &[String], service: &str) -> Result<Vec<SourceRange>, Status> {
    crate::checks::check_source_range_count(ranges.len())
        .map_err(|r| invalid(service_field(service, "source_ranges"), r))?;
    ranges
        .iter()
        .enumerate()
        .map(|(i, r)| {
            SourceRange::parse(r).map_err(|e| invalid(service_field(service, &format!("source_ranges[{i}]")), e))
        })
        .collect()
}

/// A new-flow limit from a request: `burst` 0 is `per_second`, an unset
/// `prefix_len` is 32; an error names `services["web"].new_flow_limit.<field>`.
fn new_flow_limit_from(l: &pb::NewFlowLimit, service: &str) -> Result<NewFlowLimitState, Status> {
    let burst = (l.burst != 0).then_some(i64::from(l.burst));
    NewFlowLimit::checked(i64::from(l.per_second), burst, l.prefix_len.map(i64::from))
        .map(NewFlowLimitState::from)
        .map_err(|e| invalid(service_field(service, &format!("new_flow_limit.{}", e.field())), e))
}

/// A new-flow limit as the API shows it: every field with the value in
/// force.
fn new_flow_limit_to(l: NewFlowLimitState) -> pb::NewFlowLimit {
    pb::NewFlowLimit { per_second: l.per_second, burst: l.burst, prefix_len: Some(l.prefix_len.into()) }
}

fn pool_from(p: &pb::SourcePool) -> Result<PoolState, Status> {
    let name = p.name.trim().to_owned();
    let f = |k: &str| format!("source_pools[{name:?}].{k}");
    crate::checks::check_name(&name).map_err(|r| invalid(f("name"), r))?;
    crate::checks::check_pool_size(p.addresses.len()).map_err(|r| invalid(f("addresses"), r))?;
    let addresses = p
        .addresses
        .iter()
        .enumerate()
        .map(|(j, a)| state::parse_ipv4(a).map_err(|r| invalid(format!("source_pools[{name:?}].addresses[{j}]"), r)))
        .collect::<Result<Vec<Ipv4Addr>, _>>()?;
    let (first_port, last_port) = match (p.first_port, p.last_port) {
        (0, 0) => DEFAULT_POOL_PORTS,
        (a, b) => match (u16::try_from(a), u16::try_from(b)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return Err(invalid(f("ports"), format!("{a}-{b} is not a port range from 1 to 65535"))),
        },
    };
    let owner = object_owner(&p.owner, || f("owner"))?;
    Ok(PoolState { name, addresses, first_port, last_port, owner })
}

/// The field path of backend `address:port` of `service`, as errors name it.
fn backend_key_field(service: &str, address: &str, port: u32, field: &str) -> String {
    format!("services[{service:?}].backends[{address}:{port}].{field}")
}

/// The backend a request names by address and port, checked.
fn backend_key(service: &str, address: &str, port: u32) -> Result<(std::net::Ipv4Addr, u16), Status> {
    let f = |k: &str| backend_key_field(service, address, port, k);
    let address = state::parse_ipv4(address).map_err(|e| invalid(f("address"), e))?;
    let port = state::parse_port(port).map_err(|e| invalid(f("port"), e))?;
    Ok((address, port))
}

fn required<T>(v: Option<T>, field: &str) -> Result<T, Status> {
    v.ok_or_else(|| invalid(field, "is required"))
}

fn origin(is_static: bool) -> i32 {
    if is_static { pb::Origin::Static } else { pb::Origin::Dynamic }.into()
}

/// The API's view of a service, static or dynamic (one model).
fn service_to(s: &ServiceState, health: &HealthStatus) -> pb::Service {
    let (mode, source_pool, tunnel_source) = match &s.mode {
        ModeState::Nat => ("nat", String::new(), String::new()),
        ModeState::Fullnat { source_pool } => ("fullnat", source_pool.clone(), String::new()),
        ModeState::Dsr { tunnel_source } => ("dsr", String::new(), tunnel_source.clone().unwrap_or_default()),
    };
    pb::Service {
        name: s.name.clone(),
        vip: s.vip.to_string(),
        port: s.port.into(),
        protocol: s.protocol.to_spec().name().to_owned(),
        mode: mode.to_owned(),
        source_pool,
        tunnel_source,
        table_size: s.table_size,
        on_backend_removal: match s.on_backend_removal {
            RemovalState::Rehash => "rehash",
            RemovalState::Reset => "reset",
        }
        .to_owned(),
        backends: s
            .backends
            .iter()
            .map(|b| {
                let (health, health_reason) = backend_health(health, &s.name, b.address, b.port);
                pb::Backend {
                    address: b.address.to_string(),
                    port: b.port.into(),
                    weight: Some(b.weight),
                    admin_state: match b.admin_state {
                        AdminState::Enabled => pb::AdminState::Enabled,
                        AdminState::Draining => pb::AdminState::Draining,
                        AdminState::Disabled => pb::AdminState::Disabled,
                    }
                    .into(),
                    health,
                    health_reason,
                }
            })
            .collect(),
        origin: origin(s.is_static()),
        owner: s.owner.clone(),
        health_check: s.health_check.as_ref().map(health_check_to),
        flow_timeouts: None,
        new_flow_limit: s.new_flow_limit.map(new_flow_limit_to),
        source_ranges: s.source_ranges.iter().map(ToString::to_string).collect(),
        affinity: s.affinity.name().to_owned(),
    }
}

/// The API's view of a source pool, static or dynamic (one model).
fn pool_to(p: &PoolState) -> pb::SourcePool {
    pb::SourcePool {
        name: p.name.clone(),
        addresses: p.addresses.iter().map(ToString::to_string).collect(),
        first_port: p.first_port.into(),
        last_port: p.last_port.into(),
        origin: origin(p.is_static()),
        owner: p.owner.clone(),
    }
}

/// The whole state as the API shows it: static and dynamic objects sorted
/// by name, each backend with its health now; with `owner`, only that
/// owner's objects and generation.
pub(crate) fn state_response(view: &StateView, health: &HealthStatus, owner: Option<&str>) -> pb::GetStateResponse {
    let mine = |o: &str| owner.is_none_or(|owner| owner == o);
    let mut services: Vec<pb::Service> = Vec::new();
    let mut source_pools: Vec<pb::SourcePool> = Vec::new();
    if owner.is_none() {
        services.extend(view.config.services().iter().map(|s| service_to(s, health)));
        source_pools.extend(view.config.source_pools().iter().map(pool_to));
    }
    services.extend(view.dynamic.services.values().filter(|s| mine(&s.owner)).map(|s| service_to(s, health)));
    services.sort_by(|a, b| a.name.cmp(&b.name));
    source_pools.extend(view.dynamic.source_pools.values().filter(|p| mine(&p.owner)).map(pool_to));
    source_pools.sort_by(|a, b| a.name.cmp(&b.name));
    let generations = match owner {
        None => view.dynamic.generations.iter().map(|(o, g)| (o.clone(), *g)).collect(),
        Some(o) => [(o.to_owned(), view.dynamic.generation(o))].into_iter().collect(),
    };
    pb::GetStateResponse {
        version: view.dynamic.version,
        services,
        source_pools,
        config_file: view.config.path.display().to_string(),
        generations,
    }
}

/// An owner filter of GetState or Watch: empty is none.
fn owner_filter(owner: &str) -> Result<Option<String>, Status> {
    let owner = owner.trim();
    if owner.is_empty() {
        return Ok(None);
    }
    crate::checks::check_owner(owner).map_err(|r| invalid("owner", r))?;
    Ok(Some(owner.to_owned()))
}

/// A batch's operation, each field checked; an error names
/// `operations[i]` and the field.
fn batch_op(op: &pb::BatchOperation, i: usize, view: &StateView) -> Result<BatchOp, Status> {
    use pb::batch_operation::Operation;
    let at = |e: Status| Status::new(e.code(), format!("operations[{i}]: {}", e.message()));
    let Some(op) = &op.operation else {
        return Err(invalid(format!("operations[{i}]"), "names no operation"));
    };
    let op = match op {
        Operation::CreateService(s) => BatchOp::CreateService(service_from(s).map_err(at)?),
        Operation::UpdateService(s) => BatchOp::UpdateService(service_from(s).map_err(at)?),
        Operation::DeleteService(name) => BatchOp::DeleteService(name.trim().to_owned()),
        Operation::AddBackend(r) => {
            let index = view.dynamic.services.get(&r.service).map_or(0, |s| s.backends.len());
            let b =
                backend_from(&required(r.backend.clone(), "backend").map_err(at)?, &r.service, index).map_err(at)?;
            BatchOp::AddBackend { service: r.service.clone(), backend: b }
        }
        Operation::UpdateBackend(r) => {
            let (address, port, weight, admin_state) = update_backend_fields(r).map_err(at)?;
            BatchOp::UpdateBackend { service: r.service.clone(), address, port, weight, admin_state }
        }
        Operation::RemoveBackend(r) => {
            let (address, port) = backend_key(&r.service, &r.address, r.port).map_err(at)?;
            BatchOp::RemoveBackend { service: r.service.clone(), address, port }
        }
        Operation::CreateSourcePool(p) => BatchOp::CreatePool(pool_from(p).map_err(at)?),
        Operation::DeleteSourcePool(name) => BatchOp::DeletePool(name.trim().to_owned()),
    };
    Ok(op)
}

/// The backend, weight and admin state of an UpdateBackend request,
/// checked; at least one of the two is set.
fn update_backend_fields(
    r: &pb::UpdateBackendRequest,
) -> Result<(Ipv4Addr, u16, Option<u32>, Option<AdminState>), Status> {
    let f = |k: &str| backend_key_field(&r.service, &r.address, r.port, k);
    let (address, port) = backend_key(&r.service, &r.address, r.port)?;
    let weight = r.weight.map(|w| state::parse_weight(Some(w)).map_err(|e| invalid(f("weight"), e))).transpose()?;
    let admin = admin_state(r.admin_state, &f("admin_state"))?;
    if weight.is_none() && admin.is_none() {
        return Err(invalid(f("weight"), "set weight, admin_state or both"));
    }
    Ok((address, port, weight, admin))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ServiceManager for ServiceManagerService {
    async fn get_state(&self, request: Request<pb::GetStateRequest>) -> Result<Response<pb::GetStateResponse>, Status> {
        let owner = owner_filter(&request.into_inner().owner)?;
        Ok(Response::new(state_response(&self.state.current(), self.state.health(), owner.as_deref())))
    }

    async fn apply(&self, request: Request<pb::ApplyRequest>) -> Result<Response<pb::MutationResponse>, Status> {
        let r = request.into_inner();
        if r.services.len() > MAX_SERVICES {
            return Err(invalid(
                "services",
                format!("{} services in one request; at most {MAX_SERVICES}", r.services.len()),
            ));
        }
        if r.source_pools.len() > MAX_POOLS {
            return Err(invalid(
                "source_pools",
                format!("{} source pools in one request; at most {MAX_POOLS}", r.source_pools.len()),
            ));
        }
        let services = services_from(&r.services)?;
        let pools = r.source_pools.iter().map(pool_from).collect::<Result<Vec<_>, _>>()?;
        let expected = r.expected_version;
        match owner_filter(&r.owner)? {
            None => {
                if r.expected_generation != 0 {
                    return Err(invalid("expected_generation", "is only used with owner"));
                }
                self.mutate(DEFAULT_OWNER, Box::new(move |c, s| ops::apply(c, s, expected, services, pools))).await
            }
            Some(owner) => {
                let (o, generation) = (owner.clone(), r.expected_generation);
                self.mutate(
                    &owner,
                    Box::new(move |c, s| ops::apply_owned(c, s, &o, generation, expected, services, pools)),
                )
                .await
            }
        }
    }

    async fn batch(&self, request: Request<pb::BatchRequest>) -> Result<Response<pb::MutationResponse>, Status> {
        let r = request.into_inner();
        if r.operations.is_empty() {
            return Err(invalid("operations", "a batch needs at least one operation"));
        }
        if r.operations.len() > MAX_BATCH {
            return Err(invalid(
                "operations",
                format!("{} operations in one batch; at most {MAX_BATCH}", r.operations.len()),
            ));
        }
        let owner = request_owner(&r.owner)?;
        let view = self.state.current();
        let ops =
            r.operations.iter().enumerate().map(|(i, op)| batch_op(op, i, &view)).collect::<Result<Vec<_>, _>>()?;
        drop(view);
        let (o, generation) = (owner.clone(), r.expected_generation);
        self.mutate(&owner, Box::new(move |c, s| ops::batch(c, s, &o, generation, ops))).await
    }

    async fn create_service(
        &self,
        request: Request<pb::CreateServiceRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        let r = request.into_inner();
        let owner = request_owner(&r.owner)?;
        let s = service_from(&required(r.service, "service")?)?;
        self.one(owner, "CreateService", BatchOp::CreateService(s)).await
    }

    async fn update_service(
        &self,
        request: Request<pb::UpdateServiceRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        let r = request.into_inner();
        let owner = request_owner(&r.owner)?;
        let s = service_from(&required(r.service, "service")?)?;
        self.one(owner, "UpdateService", BatchOp::UpdateService(s)).await
    }

    async fn delete_service(
        &self,
        request: Request<pb::DeleteServiceRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        let r = request.into_inner();
        let owner = request_owner(&r.owner)?;
        self.one(owner, "DeleteService", BatchOp::DeleteService(r.name)).await
    }

    async fn add_backend(
        &self,
        request: Request<pb::AddBackendRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        let r = request.into_inner();
        let owner = request_owner(&r.owner)?;
        let service = r.service;
        let index = self.state.current().dynamic.services.get(&service).map_or(0, |s| s.backends.len());
        let backend = backend_from(&required(r.backend, "backend")?, &service, index)?;
        self.one(owner, "AddBackend", BatchOp::AddBackend { service, backend }).await
    }

    async fn update_backend(
        &self,
        request: Request<pb::UpdateBackendRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        let r = request.into_inner();
        let owner = request_owner(&r.owner)?;
        let (address, port, weight, admin_state) = update_backend_fields(&r)?;
        let op = BatchOp::UpdateBackend { service: r.service, address, port, weight, admin_state };
        self.one(owner, "UpdateBackend", op).await
    }

    async fn remove_backend(
        &self,
        request: Request<pb::RemoveBackendRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        let r = request.into_inner();
        let owner = request_owner(&r.owner)?;
        let (address, port) = backend_key(&r.service, &r.address, r.port)?;
        self.one(owner, "RemoveBackend", BatchOp::RemoveBackend { service: r.service, address, port }).await
    }

    async fn create_source_pool(
        &self,
        request: Request<pb::CreateSourcePoolRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        let r = request.into_inner();
        let owner = request_owner(&r.owner)?;
        let p = pool_from(&required(r.pool, "pool")?)?;
        self.one(owner, "CreateSourcePool", BatchOp::CreatePool(p)).await
    }

    async fn delete_source_pool(
        &self,
        request: Request<pb::DeleteSourcePoolRequest>,
    ) -> Result<Response<pb::MutationResponse>, Status> {
        let r = request.into_inner();
        let owner = request_owner(&r.owner)?;
        self.one(owner, "DeleteSourcePool", BatchOp::DeletePool(r.name)).await
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let owner = owner_filter(&request.into_inner().owner)?;
        let (view, mut events) = self.state.subscribe();
        let first = pb::WatchEvent {
            version: view.dynamic.version,
            event: Some(pb::watch_event::Event::Snapshot(state_response(&view, self.state.health(), owner.as_deref()))),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move {
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                let event = tokio::select! {
                    e = events.recv() => e,
                    () = state.closed() => return,
                    () = tx.closed() => return,
                };
                // With an owner: its changes only, and its services' health.
                let event = match (event, &owner) {
                    (Ok(e), Some(owner)) => match &e.kind {
                        StateEventKind::Change(c) if !c.touches(owner) => continue,
                        StateEventKind::Change(c) => Ok(std::sync::Arc::new(state::StateEvent {
                            version: e.version,
                            kind: StateEventKind::Change(c.of_owner(owner)),
                        })),
                        StateEventKind::Health(t)
                            if state
                                .current()
                                .dynamic
                                .services
                                .get(&t.key.service)
                                .is_none_or(|s| s.owner != *owner) =>
                        {
                            continue;
                        }
                        StateEventKind::Health(_) => Ok(e),
                    },
                    (event, _) => event,
                };
                let item = match event {
                    Ok(e) => Ok(pb::WatchEvent {
                        version: e.version,
                        event: Some(match &e.kind {
                            StateEventKind::Change(c) => pb::watch_event::Event::Change(pb::Change {
                                cause: c.cause.clone(),
                                services_changed: c.services_changed.clone(),
                                services_deleted: c.services_deleted.clone(),
                                pools_changed: c.pools_changed.clone(),
                                pools_deleted: c.pools_deleted.clone(),
                                owners: c.owners.iter().cloned().collect(),
                            }),
                            StateEventKind::Health(t) => pb::watch_event::Event::Health(pb::HealthChange {
                                service: t.key.service.clone(),
                                address: t.key.address.to_string(),
                                port: t.key.port.into(),
                                health: if t.up { pb::HealthState::Up } else { pb::HealthState::Down }.into(),
                                reason: t.reason.clone(),
                            }),
                        }),
                    }),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        Err(Status::aborted(format!("the watcher fell {n} changes behind; watch again")))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(protocol: &str, check: pb::HealthCheck) -> pb::Service {
        pb::Service {
            name: "svc".to_owned(),
            vip: "198.18.100.1".to_owned(),
            port: 53,
            protocol: protocol.to_owned(),
            health_check: Some(check),
            ..pb::Service::default()
        }
    }

    #[test]
    fn a_health_check_of_the_other_protocol_needs_a_port() {
        for kind in ["tcp", "http", "https"] {
            let check = pb::HealthCheck { kind: kind.to_owned(), ..pb::HealthCheck::default() };
            let e = service_from(&service("udp", check.clone())).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(
                e.message().starts_with(&format!(
                    "services[\"svc\"].health_check.kind: \"{kind}\" probes over TCP, but service \"svc\" is udp"
                )) && e.message().contains("kind = \"udp\" with a payload"),
                "{e:?}"
            );
            service_from(&service("tcp", check.clone())).unwrap();
            service_from(&service("udp", pb::HealthCheck { port: 8053, ..check })).unwrap();
        }
        let udp = pb::HealthCheck { kind: "udp".to_owned(), payload: b"ping".to_vec(), ..pb::HealthCheck::default() };
        let e = service_from(&service("tcp", udp.clone())).unwrap_err();
        assert!(
            e.message().starts_with(
                "services[\"svc\"].health_check.kind: \"udp\" probes over UDP, but service \"svc\" is tcp"
            ),
            "{e:?}"
        );
        service_from(&service("udp", udp.clone())).unwrap();
        service_from(&service("tcp", pb::HealthCheck { port: 7, ..udp })).unwrap();
    }

    #[test]
    fn names_follow_the_one_rule() {
        for bad in [".", "..", "a\0b", "wéb 😀"] {
            let e = service_from(&pb::Service { name: bad.to_owned(), ..service("tcp", pb::HealthCheck::default()) })
                .unwrap_err();
            assert!(e.message().starts_with(&format!("services[{bad:?}].name: ")), "{e:?}");
        }
    }

    #[test]
    fn at_most_65535_backends_per_service() {
        let b = pb::Backend { address: "198.18.1.11".to_owned(), port: 80, ..pb::Backend::default() };
        let s = pb::Service { backends: vec![b; 65_536], health_check: None, ..service("tcp", Default::default()) };
        let e = service_from(&s).unwrap_err();
        assert_eq!(e.message(), "services[\"svc\"].backends: 65536 backends; at most 65535 per service");
    }

    #[test]
    fn source_ranges_and_affinity_are_checked_and_shown_as_given() {
        let with = |ranges: &[&str], affinity: &str| pb::Service {
            source_ranges: ranges.iter().map(|r| (*r).to_owned()).collect(),
            affinity: affinity.to_owned(),
            health_check: None,
            ..service("tcp", Default::default())
        };
        let too_many: Vec<&str> = vec!["10.0.0.0/8"; 257];
        let cases: [(pb::Service, &str); 7] = [
            (
                with(&["10.0.0.0/8", "10.1.2.3"], ""),
                "services[\"svc\"].source_ranges[1]: \"10.1.2.3\" needs a prefix length, such as 198.18.0.1/24",
            ),
            (
                with(&["10.0.0.0/33"], ""),
                "services[\"svc\"].source_ranges[0]: prefix length \"33\" is not a number from 0 to 32",
            ),
            (with(&["ten/8"], ""), "services[\"svc\"].source_ranges[0]: \"ten\" is not an IPv4 address"),
            (
                with(&["192.0.2.0/24", "198.18.5.7/24"], ""),
                "services[\"svc\"].source_ranges[1]: \"198.18.5.7/24\" has host bits set; the prefix is 198.18.5.0/24",
            ),
            (with(&too_many, ""), "services[\"svc\"].source_ranges: 257 prefixes; at most 256 per service"),
            (with(&[], "ClientIP"), "services[\"svc\"].affinity: \"ClientIP\" is not \"none\" or \"client_ip\""),
            (with(&[], "sticky"), "services[\"svc\"].affinity: \"sticky\" is not \"none\" or \"client_ip\""),
        ];
        for (s, message) in cases {
            let e = service_from(&s).unwrap_err();
            assert_eq!((e.code(), e.message()), (Code::InvalidArgument, message));
        }
        let ok = service_from(&with(&["203.0.113.0/24", "0.0.0.0/0", "192.0.2.9/32"], "client_ip")).unwrap();
        assert_eq!(ok.affinity, AffinityState::ClientIp);
        let shown = service_to(&ok, &HealthStatus::default());
        assert_eq!(shown.source_ranges, ["203.0.113.0/24", "0.0.0.0/0", "192.0.2.9/32"]);
        assert_eq!(shown.affinity, "client_ip");
        // Empty: none, every client; GetState shows the value in force.
        let plain = service_from(&with(&[], "")).unwrap();
        assert_eq!((plain.affinity, plain.source_ranges.len()), (AffinityState::None, 0));
        assert_eq!(service_to(&plain, &HealthStatus::default()).affinity, "none");
        assert_eq!(service_from(&with(&[], "none")).unwrap(), plain);
        assert_eq!(service_from(&with(&too_many[..256], "")).unwrap().source_ranges.len(), 256);
    }
}

/// The request conversions, public for the fuzz targets (`tests/fuzz`)
/// only: the feature `fuzzing` is off in every build of the gateway.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// A service from a request, as `CreateService` and `Apply` convert it.
    pub fn service_from(s: &pb::Service) -> Result<ServiceState, Status> {
        super::service_from(s)
    }

    /// A source pool from a request, as `CreateSourcePool` and `Apply`
    /// convert it.
    pub fn pool_from(p: &pb::SourcePool) -> Result<PoolState, Status> {
        super::pool_from(p)
    }

    /// A backend from an `AddBackend` request (`index`: its place in the
    /// service, for error paths).
    pub fn backend_from(b: &pb::Backend, service: &str, index: usize) -> Result<BackendState, Status> {
        super::backend_from(b, service, index)
    }

    /// A dynamic service as `GetState` shows it (no health known).
    pub fn service_to(s: &ServiceState) -> pb::Service {
        super::service_to(s, &HealthStatus::default())
    }

    /// A dynamic source pool as `GetState` shows it.
    pub fn pool_to(p: &PoolState) -> pb::SourcePool {
        super::pool_to(p)
    }
}
