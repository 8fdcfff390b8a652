//! The registry of cluster stacks: each is a folder here implementing `crate::stack::Stack`.
//! Adding a stack means a new folder, one line below, and its component in `overlays/`.

pub mod ceph;
pub mod consul;
pub mod k3s;
pub mod nomad;

use crate::stack::Stack;

/// Every stack this agent knows, in the order their steps and health checks run.
pub fn registry() -> &'static [&'static dyn Stack] {
    &[&consul::Consul, &nomad::Nomad, &ceph::Ceph, &k3s::K3s]
}

/// The registered stacks among `names` (e.g. the components of an image), in registry order.
pub fn named(names: &[&str]) -> Vec<&'static dyn Stack> {
    registry()
        .iter()
        .copied()
        .filter(|s| names.contains(&s.name()))
        .collect()
}

#[cfg(test)]
mod tests;
