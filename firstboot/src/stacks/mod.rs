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

/// What the stacks' tests share: a file that must pass the checks, the problems of one that
/// must not, and every registered stack's secrets for a checked file.
#[cfg(test)]
pub(crate) mod testing {
    use crate::cluster::{check, Checked, Problem};
    use crate::stack::Secrets;

    pub fn checked(t: &str) -> Checked {
        check(t).unwrap_or_else(|p| panic!("{p:#?}"))
    }

    pub fn problems(t: &str) -> Vec<Problem> {
        check(t).err().unwrap_or_default()
    }

    pub fn secrets(c: &Checked) -> Secrets {
        Secrets::of(super::registry(), c)
    }
}
