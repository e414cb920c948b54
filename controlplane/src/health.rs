//! Health checks run by the control plane: TCP connect, HTTP(S) GET and
//! UDP request/reply probes of every backend of a service that has a check,
//! from the gateway's kernel, on the control plane's tokio runtime.
//!
//! Owns: the check's definition and validation ([`spec`]), one probe
//! ([`probe`]), and the probe tasks with the rise/fall state machine
//! ([`checker`]). Must not touch DPDK or publish snapshots: the daemon's
//! single writer owns the [`Checker`], compiles unhealthy backends with
//! weight 0 and publishes, so the forwarding state is always the desired
//! state plus health, never raced. A health change is not a desired-state
//! change: it takes no version and is not persisted.
#![forbid(unsafe_code)]

pub mod checker;
pub mod probe;
pub mod spec;

pub use checker::{Checker, HealthState, HealthStatus, Plan, ProbeReport, Target, TargetKey, TargetStatus, Transition};
pub use spec::{CheckKind, HealthCheck, HealthCheckError, HealthCheckInput, HttpCheck, StatusRanges, UdpCheck};

use crate::config::Config;
use crate::state::{AdminState, DesiredState};
use std::net::Ipv4Addr;

/// Every forwarding backend of static ∪ dynamic services, with its
/// service's check. Disabled backends do not forward and are not probed;
/// draining ones are.
pub fn targets(config: &Config, dynamic: &DesiredState) -> Vec<Target> {
    let mut out = Vec::new();
    for s in config.services() {
        let check = config.health_check(&s.name);
        for b in &s.backends {
            out.push(Target {
                key: TargetKey { service: s.name.clone(), address: Ipv4Addr::from(b.addr), port: b.port },
                check: check.cloned(),
            });
        }
    }
    for s in dynamic.services.values() {
        push_dynamic(&mut out, s);
    }
    out
}

/// The targets of the dynamic services named `names` in `dynamic` (none
/// for a name it no longer has): what [`Checker::plan_services`] takes for
/// a change that touched those services.
pub fn dynamic_targets<'a>(dynamic: &DesiredState, names: impl IntoIterator<Item = &'a String>) -> Vec<Target> {
    let mut out = Vec::new();
    for name in names {
        if let Some(s) = dynamic.services.get(name) {
            push_dynamic(&mut out, s);
        }
    }
    out
}

fn push_dynamic(out: &mut Vec<Target>, s: &crate::state::ServiceState) {
    for b in s.backends.iter().filter(|b| b.admin_state != AdminState::Disabled) {
        out.push(Target {
            key: TargetKey { service: s.name.clone(), address: b.address, port: b.port },
            check: s.health_check.clone(),
        });
    }
}
