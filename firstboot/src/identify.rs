//! How a node finds itself in the cluster file, in order: `picoimg.node=NAME` on the kernel
//! command line, `picoimg/node.toml` on the boot partition (written at flash time), then its
//! MAC addresses, Raspberry Pi serial number or DMI product UUID against each node's `match`.
//!
//! Everything is read below a root directory, so tests run against a temporary tree.

use std::path::Path;

use crate::cluster::{normalise_mac, ClusterFile};

/// What the node could observe about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub cmdline_node: Option<String>,
    pub node_toml: Option<String>,
    /// Normalised MAC addresses of its network interfaces (loopback excluded).
    pub macs: Vec<String>,
    pub pi_serial: Option<String>,
    pub dmi_uuid: Option<String>,
}

/// How the node was identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    CommandLine(usize),
    NodeToml(usize),
    Mac(usize, String),
    Serial(usize),
    DmiUuid(usize),
}

impl Found {
    pub fn index(&self) -> usize {
        match self {
            Found::CommandLine(i)
            | Found::NodeToml(i)
            | Found::Mac(i, _)
            | Found::Serial(i)
            | Found::DmiUuid(i) => *i,
        }
    }
}

/// Why identification failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotFound {
    /// A name was given (command line or node.toml) that the cluster file does not list.
    UnknownName { name: String, source: &'static str },
    /// Nothing matched: the facts are for `unknown-node.txt`.
    NoMatch,
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| {
            s.trim_matches(|c: char| c.is_whitespace() || c == '\0')
                .to_owned()
        })
        .filter(|s| !s.is_empty())
}

/// Reads the facts below `root`; `boot` is where the boot partition is mounted (below root).
pub fn observe(root: &Path, boot: &Path) -> Facts {
    let cmdline_node = read_trimmed(&root.join("proc/cmdline")).and_then(|c| {
        c.split_whitespace()
            .find_map(|w| w.strip_prefix("picoimg.node="))
            .map(str::to_owned)
    });
    let node_toml = crate::input::read_text(
        &boot.join("picoimg/node.toml"),
        crate::input::CONFIG_LIMIT,
        "node file",
    )
    .ok()
    .and_then(|t| t.parse::<toml::Table>().ok())
    .and_then(|t| t.get("name")?.as_str().map(str::to_owned));
    let mut macs: Vec<String> = std::fs::read_dir(root.join("sys/class/net"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name() != "lo")
        .filter_map(|e| read_trimmed(&e.path().join("address")))
        .filter_map(|m| normalise_mac(&m))
        .filter(|m| m != "00:00:00:00:00:00")
        .collect();
    macs.sort();
    let pi_serial = read_trimmed(&root.join("sys/firmware/devicetree/base/serial-number"))
        .or_else(|| read_trimmed(&root.join("proc/device-tree/serial-number")));
    let dmi_uuid =
        read_trimmed(&root.join("sys/class/dmi/id/product_uuid")).map(|s| s.to_lowercase());
    Facts {
        cmdline_node,
        node_toml,
        macs,
        pi_serial,
        dmi_uuid,
    }
}

/// Finds the node these facts describe.
pub fn identify(file: &ClusterFile, facts: &Facts) -> Result<Found, NotFound> {
    let by_name = |name: &str, source: &'static str, f: fn(usize) -> Found| {
        file.nodes
            .iter()
            .position(|n| n.name.get_ref() == name)
            .map(f)
            .ok_or_else(|| NotFound::UnknownName {
                name: name.to_owned(),
                source,
            })
    };
    if let Some(name) = &facts.cmdline_node {
        return by_name(
            name,
            "the kernel command line (picoimg.node=)",
            Found::CommandLine,
        );
    }
    if let Some(name) = &facts.node_toml {
        return by_name(name, "picoimg/node.toml", Found::NodeToml);
    }
    for (i, n) in file.nodes.iter().enumerate() {
        let Some(m) = &n.matcher else { continue };
        if let Some(mac) = m.mac.as_ref().and_then(|s| normalise_mac(s.get_ref())) {
            if facts.macs.contains(&mac) {
                return Ok(Found::Mac(i, mac));
            }
        }
        if let (Some(want), Some(have)) = (&m.serial, &facts.pi_serial) {
            if want.get_ref().trim_start_matches('0') == have.trim_start_matches('0') {
                return Ok(Found::Serial(i));
            }
        }
        if let (Some(want), Some(have)) = (&m.dmi_uuid, &facts.dmi_uuid) {
            if want.get_ref().to_lowercase() == *have {
                return Ok(Found::DmiUuid(i));
            }
        }
    }
    Err(NotFound::NoMatch)
}

/// The text of `picoimg/unknown-node.txt`: what the node saw, and how to name it.
pub fn unknown_report(facts: &Facts) -> String {
    let mut s = String::from(
        "# picoimg: this node is not in picoimg/cluster.toml.\n\
         # Add a [[node]] whose `match` names one of the values below, or flash it with\n\
         # `picoimg flash ... --node NAME`, or add picoimg.node=NAME to the kernel command line.\n",
    );
    for m in &facts.macs {
        s.push_str(&format!("mac = \"{m}\"\n"));
    }
    if let Some(x) = &facts.pi_serial {
        s.push_str(&format!("serial = \"{x}\"\n"));
    }
    if let Some(x) = &facts.dmi_uuid {
        s.push_str(&format!("dmi_uuid = \"{x}\"\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{check, render_init, InitOptions};

    fn file_with_matches() -> ClusterFile {
        let t = render_init(&InitOptions {
            name: "lab",
            nodes: 3,
            subnet: "10.42.0.0/24",
            stacks: &crate::stacks::named(&["consul"]),
        })
        .unwrap()
        .replace("# match = { mac = \"52:54:00:00:00:02\" }", "match = { mac = \"52:54:00:00:00:02\" }")
        .replace(
            "# match = { mac = \"52:54:00:00:00:03\" }",
            "match = { serial = \"10000000deadbeef\", dmi_uuid = \"4C4C4544-0000-1000-8000-ABCDEF012345\" }",
        );
        check(&t).unwrap().file
    }

    fn root() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn command_line_wins_over_node_toml_and_mac() {
        let r = root();
        write(
            r.path(),
            "proc/cmdline",
            "root=/dev/vda2 picoimg.node=pc2 quiet\n",
        );
        write(r.path(), "boot/picoimg/node.toml", "name = \"pc0\"\n");
        write(
            r.path(),
            "sys/class/net/eth0/address",
            "52:54:00:00:00:02\n",
        );
        let facts = observe(r.path(), &r.path().join("boot"));
        assert_eq!(
            identify(&file_with_matches(), &facts),
            Ok(Found::CommandLine(2))
        );
    }

    #[test]
    fn node_toml_then_mac_then_serial_then_dmi() {
        let f = file_with_matches();
        let r = root();
        write(r.path(), "boot/picoimg/node.toml", "name = \"pc0\"\n");
        assert_eq!(
            identify(&f, &observe(r.path(), &r.path().join("boot"))),
            Ok(Found::NodeToml(0))
        );

        let r = root();
        write(r.path(), "sys/class/net/lo/address", "00:00:00:00:00:00\n");
        write(
            r.path(),
            "sys/class/net/enp1s0/address",
            "52:54:00:00:00:02\n",
        );
        let got = identify(&f, &observe(r.path(), &r.path().join("boot")));
        assert_eq!(got, Ok(Found::Mac(1, "52:54:00:00:00:02".into())));

        let r = root();
        write(
            r.path(),
            "proc/device-tree/serial-number",
            "10000000deadbeef\0",
        );
        assert_eq!(
            identify(&f, &observe(r.path(), &r.path().join("boot"))),
            Ok(Found::Serial(2))
        );

        let r = root();
        write(
            r.path(),
            "sys/class/dmi/id/product_uuid",
            "4c4c4544-0000-1000-8000-abcdef012345\n",
        );
        assert_eq!(
            identify(&f, &observe(r.path(), &r.path().join("boot"))),
            Ok(Found::DmiUuid(2))
        );
    }

    #[test]
    fn unknown_name_and_no_match_are_reported() {
        let f = file_with_matches();
        let r = root();
        write(r.path(), "proc/cmdline", "picoimg.node=pc9");
        let e = identify(&f, &observe(r.path(), &r.path().join("boot"))).unwrap_err();
        assert!(matches!(e, NotFound::UnknownName { ref name, .. } if name == "pc9"));

        let r = root();
        write(
            r.path(),
            "sys/class/net/eth0/address",
            "52:54:00:aa:bb:cc\n",
        );
        let facts = observe(r.path(), &r.path().join("boot"));
        assert_eq!(identify(&f, &facts), Err(NotFound::NoMatch));
        let report = unknown_report(&facts);
        assert!(report.contains("mac = \"52:54:00:aa:bb:cc\""), "{report}");
        assert!(report.contains("picoimg flash"), "{report}");
    }
}
