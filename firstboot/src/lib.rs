//! picoimg-firstboot: the cluster-file library shared by the builder and the device agent.
//!
//! Issue 4 fills this in (schema, validation, secret derivation, first-boot steps). Until then
//! the crate only carries the version both sides report.

/// Version of the first-boot agent, reported by the device binary and recorded in manifests.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub mod cluster;
pub mod identify;
pub mod secrets;
