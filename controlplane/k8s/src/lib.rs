//! vipgate's Kubernetes controller, as a library: the binary
//! (`src/main.rs`) wires these modules to the apiserver; the tests and the
//! benchmark use them directly.
//!
//! The flow: the reflectors watch Services, EndpointSlices, Nodes,
//! Namespaces, VipPools and VipGateways; [`reconcile`] turns each Service
//! into an address ([`ipam`], from the pools of [`pools`]) and vipgate
//! services ([`service`]), kept in one desired state; [`gateway`] pushes
//! that state to every gateway in an owner-scoped Apply; [`status`] writes
//! what the gateways run back into the resources.

pub mod crd;
pub mod gateway;
pub mod ipam;
pub mod metrics;
pub mod pools;
pub mod reconcile;
pub mod service;
pub mod status;
