//! The registry of cluster stacks: each is a folder here implementing `crate::stack::Stack`.
//! Adding a stack means a new folder, one line below, and its component in `overlays/`.

pub mod consul;

use crate::stack::Stack;

/// Every stack this agent knows, in the order their steps and health checks run.
pub fn registry() -> &'static [&'static dyn Stack] {
    &[&consul::Consul]
}

#[cfg(test)]
mod tests;
