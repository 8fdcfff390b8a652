//! The registry of cluster stacks: each is a folder here implementing `crate::stack::Stack`.
//! Adding a stack means a new folder, one line below, and its component in `overlays/`.

pub mod ceph;
pub mod consul;
pub mod incus;
pub mod k3s;
pub mod minted;
pub mod nomad;
pub mod swarm;

use crate::stack::Stack;

/// Every stack this agent knows, in the order their steps and health checks run.
pub fn registry() -> &'static [&'static dyn Stack] {
    &[
        &consul::Consul,
        &nomad::Nomad,
        &ceph::Ceph,
        &swarm::Swarm,
        &incus::Incus,
        &k3s::K3s,
    ]
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

    /// A node's root as image `name` leaves it: its build info, the cluster file `t` on the
    /// boot partition, one NIC with `mac`, and `files` (path below the root, contents).
    pub fn node_root(name: &str, t: &str, mac: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let w = |rel: &str, body: &str| {
            let p = d.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        };
        w(
            crate::contract::BUILD_INFO,
            &format!(r#"{{"name":"{name}","boot_mount":"/boot/efi"}}"#),
        );
        w("boot/efi/picoimg/cluster.toml", t);
        w("sys/class/net/enp0s2/address", &format!("{mac}\n"));
        for (rel, body) in files {
            w(rel, body);
        }
        d
    }

    /// The permission bits of `p`.
    pub fn mode(p: &std::path::Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }
}
