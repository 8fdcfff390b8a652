//! What the builder and the nodes agree on, defined once: the build information every image
//! carries, the console lines that rehearsals and boot tests wait for, and the hosts file.

use serde::{Deserialize, Serialize};

/// Where the build information is, below an image's root.
pub const BUILD_INFO: &str = "etc/picoimg/build.json";

/// `/etc/picoimg/build.json`: written by `picoimg build`, read by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// `<board>-<stack>`.
    pub name: String,
    /// Where the boot partition (which holds `picoimg/cluster.toml`) is mounted.
    pub boot_mount: Option<String>,
    pub board: String,
    pub stack: String,
    pub picoimg_version: String,
    pub inputs_hash: String,
}

/// The agent's last line when a node is configured and its services are healthy.
pub const NODE_READY: &str = "picoimg: ready";
/// The agent's last line when it stopped on a problem.
pub const NODE_FAILED: &str = "picoimg: failed";
/// The agent's last line of the apply phase (health follows).
pub const NODE_CONFIGURED: &str = "picoimg: configured";
/// The agent's line when there is no cluster file (the node stays as built).
pub const NODE_UNCONFIGURED: &str = "picoimg: unconfigured";
/// The boot report's lines (`overlays/base/rootfs/usr/lib/picoimg/boot-report` prints them).
pub const BOOT_READY: &str = "picoimg-boot: ready";
pub const BOOT_FAILED: &str = "picoimg-boot: failed";

/// `/etc/hosts` for a machine called `hostname`, with `peers` (address, name) after the
/// loopback lines; `writer` names what wrote it.
pub fn hosts(writer: &str, hostname: &str, peers: &[(&str, &str)]) -> String {
    let mut s = format!(
        "# Written by {writer}.\n127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    );
    for (addr, name) in peers {
        s.push_str(&format!("{addr}\t{name}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shell script that prints the boot report uses the markers defined here.
    #[test]
    fn boot_report_prints_the_markers() {
        let script = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../overlays/base/rootfs/usr/lib/picoimg/boot-report"
        ))
        .expect("boot-report");
        assert!(script.contains(&format!("echo \"{BOOT_READY} (")));
        assert!(script.contains(&format!("echo \"{BOOT_FAILED} unit")));
    }
}
