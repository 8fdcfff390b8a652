//! What is on an OSD device, decided before anything is written to it. An OSD is created only
//! on an empty device (no signature `wipefs` knows: partition tables, filesystems, LVM, RAID;
//! no partitions; not mounted; not the system disk); a device holding an OSD of this cluster's
//! fsid is activated, never recreated; anything else is left alone and reported, unless the
//! cluster file lists the device under `wipe`. Never the system disk, even then.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::agent::system::Target;
use crate::cmd::Cmd;

/// What a device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Nothing: an OSD may be made on it.
    Empty,
    /// An OSD of this cluster (`ceph.cluster_fsid` tag): activate it.
    Ours { id: String, osd_fsid: String },
    /// The disk this node runs from (or one holding a partition of it): never an OSD, even
    /// when listed under `wipe`.
    SystemDisk,
    /// Something else, described for the report.
    Other(String),
}

/// Signatures `wipefs --no-act --json DEV` lists (type and label), described.
pub fn signatures(json: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    v.pointer("/signatures")
        .and_then(|s| s.as_array())
        .map(|a| {
            a.iter()
                .map(|s| {
                    let ty = s.get("type").and_then(|t| t.as_str()).unwrap_or("unknown");
                    match s.get("label").and_then(|l| l.as_str()) {
                        Some(l) if !l.is_empty() => format!("{ty} (label \"{l}\")"),
                        _ => ty.to_owned(),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// From `lsblk --json -o NAME,TYPE,MOUNTPOINTS DEV`: the device's children (partitions,
/// LVM volumes) and every mount point on it or them.
pub fn lsblk(json: &str) -> (Vec<String>, Vec<String>) {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let mut children = Vec::new();
    let mut mounts = Vec::new();
    fn walk(d: &serde_json::Value, depth: usize, c: &mut Vec<String>, m: &mut Vec<String>) {
        if depth > 0 {
            c.push(format!(
                "{} ({})",
                d.get("name").and_then(|x| x.as_str()).unwrap_or("?"),
                d.get("type").and_then(|x| x.as_str()).unwrap_or("?")
            ));
        }
        for key in ["mountpoints", "mountpoint"] {
            match d.get(key) {
                Some(serde_json::Value::Array(a)) => m.extend(
                    a.iter()
                        .filter_map(|x| x.as_str())
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                ),
                Some(serde_json::Value::String(s)) if !s.is_empty() => m.push(s.clone()),
                _ => {}
            }
        }
        if let Some(kids) = d.get("children").and_then(|k| k.as_array()) {
            for k in kids {
                walk(k, depth + 1, c, m);
            }
        }
    }
    if let Some(devs) = v.pointer("/blockdevices").and_then(|b| b.as_array()) {
        for d in devs {
            walk(d, 0, &mut children, &mut mounts);
        }
    }
    mounts.dedup();
    (children, mounts)
}

/// From `ceph-volume lvm list DEV --format json`: this cluster's OSD on the device (id, osd
/// fsid), and the fsids of other clusters' OSDs.
pub fn lvm_osds(json: &str, fsid: &str) -> (Option<(String, String)>, Vec<String>) {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let mut ours = None;
    let mut others = Vec::new();
    if let Some(m) = v.as_object() {
        for vols in m.values() {
            for vol in vols.as_array().into_iter().flatten() {
                let tag = |k: &str| {
                    vol.pointer(&format!("/tags/{k}"))
                        .and_then(|x| x.as_str())
                        .unwrap_or_default()
                        .to_owned()
                };
                if vol.get("type").and_then(|t| t.as_str()) != Some("block") {
                    continue;
                }
                let cluster = tag("ceph.cluster_fsid");
                if cluster.eq_ignore_ascii_case(fsid) {
                    ours = Some((tag("ceph.osd_id"), tag("ceph.osd_fsid")));
                } else if !others.contains(&cluster) {
                    others.push(cluster);
                }
            }
        }
    }
    (ours, others)
}

/// The facts about one device, as the commands gave them.
pub struct Facts<'a> {
    pub device: &'a str,
    pub system_disk: bool,
    pub wipefs: &'a str,
    pub lsblk: &'a str,
    pub lvm_list: &'a str,
}

/// Decides what a device holds. Our own OSD first (it is an LVM member, which would otherwise
/// count as "something"), then anything at all makes it not empty.
pub fn classify(f: &Facts<'_>, fsid: &str) -> Found {
    if f.system_disk {
        return Found::SystemDisk;
    }
    let (ours, others) = lvm_osds(f.lvm_list, fsid);
    if let Some((id, osd_fsid)) = ours {
        return Found::Ours { id, osd_fsid };
    }
    if !others.is_empty() {
        return Found::Other(format!(
            "an OSD of another Ceph cluster (fsid {})",
            others.join(", ")
        ));
    }
    let (children, mounts) = lsblk(f.lsblk);
    let sigs = signatures(f.wipefs);
    let mut what = Vec::new();
    if !sigs.is_empty() {
        what.push(format!("signatures: {}", sigs.join(", ")));
    }
    if !children.is_empty() {
        what.push(format!("holds {}", children.join(", ")));
    }
    if !mounts.is_empty() {
        what.push(format!("mounted at {}", mounts.join(", ")));
    }
    if what.is_empty() {
        Found::Empty
    } else {
        Found::Other(what.join("; "))
    }
}

/// The kernel name of the disk `/` is on (`nvme0n1` for `/dev/nvme0n1p2`), if found.
fn system_disk(t: &Target<'_>) -> Option<String> {
    let src = t
        .sys
        .run(&Cmd::new("findmnt").args(["-n", "-o", "SOURCE", "/"]))
        .ok()?;
    if src.trim().is_empty() {
        return None;
    }
    let out = t
        .sys
        .run(
            &Cmd::new("lsblk")
                .args(["-n", "-s", "-o", "NAME,TYPE"])
                .arg(src.trim()),
        )
        .ok()?;
    // `-s` lists the device and then its parents: the disk is the one of type disk.
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next()?.trim_start_matches(|c: char| !c.is_alphanumeric());
            (w.next()? == "disk").then(|| name.to_owned())
        })
        .next()
}

/// Waits (bounded) for `device` to appear, and returns its kernel name.
pub fn wait_for(t: &Target<'_>, device: &str, seconds: u64) -> Result<String> {
    for waited in 0..=seconds {
        if let Ok(p) = std::fs::canonicalize(t.p(device.trim_start_matches('/'))) {
            if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
                return Ok(name.to_owned());
            }
        }
        if waited < seconds {
            t.sys.sleep(Duration::from_secs(1));
        }
    }
    bail!("{device} does not exist on this node (waited {seconds} s): is the disk attached, and is the path in the cluster file right?")
}

/// Gathers the facts about `device` and decides.
pub fn inspect(t: &Target<'_>, device: &str, fsid: &str) -> Result<Found> {
    let name = wait_for(t, device, 60)?;
    let system = system_disk(t).is_some_and(|d| d == name);
    let dev = Path::new(device);
    let wipefs = t
        .sys
        .run(&Cmd::new("wipefs").args(["--no-act", "--json"]).arg(dev))
        .with_context(|| format!("reading the signatures on {device}"))?;
    let lsblk = t
        .sys
        .run(
            &Cmd::new("lsblk")
                .args(["--json", "-o", "NAME,TYPE,MOUNTPOINTS"])
                .arg(dev),
        )
        .with_context(|| format!("listing what is on {device}"))?;
    // No OSD there: ceph-volume says so and exits non-zero.
    let lvm_list = t
        .sys
        .run(
            &Cmd::new("ceph-volume")
                .args(["lvm", "list", "--format", "json"])
                .arg(dev),
        )
        .unwrap_or_default();
    Ok(classify(
        &Facts {
            device,
            system_disk: system,
            wipefs: &wipefs,
            lsblk: &lsblk,
            lvm_list: &lvm_list,
        },
        fsid,
    ))
}
