//! picoimg-firstboot: the cluster-file library shared by the builder and the device agent
//! (schema, validation, secret derivation, node identification), the command wrapper both
//! use, the stack interface and registry, and the first-boot steps the device runs (`agent`).

/// Version of the first-boot agent, reported by the device binary and recorded in manifests.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub mod agent;
pub mod cluster;
pub mod cmd;
pub mod contract;
pub mod fsutil;
pub mod handover;
pub mod identify;
pub mod input;
pub mod secrets;
pub mod stack;
pub mod stacks;
