//! Health checks run by the control plane: TCP connect, HTTP(S) GET and
//! UDP request/reply probes of every backend of a service that has a check,
//! from the gateway's kernel, on the control plane's tokio runtime.
//!
//! Owns: one probe ([`probe`]), and the probe tasks with the rise/fall
//! state machine ([`checker`]). The check's definition and validation is a
//! setting, [`crate::health_check`], re-exported here; the targets
//! of the desired state are [`crate::state::health_targets`]. Must not
//! touch DPDK or publish snapshots: the daemon's single writer owns the
//! [`Checker`], compiles unhealthy backends with weight 0 and publishes, so
//! the forwarding state is always the desired state plus health, never
//! raced. A health change is not a desired-state
//! change: it takes no version and is not persisted.
#![forbid(unsafe_code)]

pub mod checker;
pub mod probe;

pub use crate::health_check::{
    CheckKind, HealthCheck, HealthCheckError, HealthCheckInput, HttpCheck, StatusRanges, UdpCheck,
};
pub use checker::{Checker, HealthState, HealthStatus, Plan, ProbeReport, Target, TargetKey, TargetStatus, Transition};
