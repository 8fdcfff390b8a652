//! The Ceph stack on a node: `[ceph]` in the cluster file, the `ceph-mon`, `ceph-mgr` and
//! `ceph-osd` roles, the fsid and every cephx key derived from the cluster secret, and the
//! steps: `ceph.conf` and the node's keys, the monitor's store (`ceph-mon --mkfs` from a monmap
//! and keyring every monitor makes alike), the manager's key, and a check of every OSD device
//! before the services start. The health check waits for a monitor quorum, creates (or
//! activates) this node's OSDs, and waits for HEALTH_OK.

pub mod config;
pub mod disks;

use anyhow::{bail, Context, Result};

use crate::agent::system::Target;
use crate::cluster::{self, ClusterFile, Node, Problem};
use crate::cmd::Cmd;
use crate::stack::{self, Ctx, Form, Memo, Progress, Raw, SecretSpec, Section, Stack, Step};

pub use config::{MGR, MON, OSD};
use disks::Found;

/// The cluster file's section.
pub const SECTION: &str = "ceph";
pub const CONF: &str = "etc/ceph/ceph.conf";
pub const ADMIN_KEYRING: &str = "etc/ceph/ceph.client.admin.keyring";
pub const BOOTSTRAP_OSD_KEYRING: &str = "var/lib/ceph/bootstrap-osd/ceph.keyring";

/// HKDF labels: part of the on-disk contract; changing one changes a live cluster's keys.
pub mod label {
    pub const FSID: &str = "picoimg/v1/ceph/fsid";
    pub const MON: &str = "picoimg/v1/ceph/mon-key";
    pub const ADMIN: &str = "picoimg/v1/ceph/client-admin-key";
    pub const BOOTSTRAP_OSD: &str = "picoimg/v1/ceph/bootstrap-osd-key";
    pub const BOOTSTRAP_MDS: &str = "picoimg/v1/ceph/bootstrap-mds-key";
    pub const BOOTSTRAP_MGR: &str = "picoimg/v1/ceph/bootstrap-mgr-key";
    pub const BOOTSTRAP_RBD: &str = "picoimg/v1/ceph/bootstrap-rbd-key";
    pub const BOOTSTRAP_RBD_MIRROR: &str = "picoimg/v1/ceph/bootstrap-rbd-mirror-key";
    pub const BOOTSTRAP_RGW: &str = "picoimg/v1/ceph/bootstrap-rgw-key";
    /// Per manager: `picoimg/v1/ceph/mgr-key/<node name>`.
    pub const MGR: &str = "picoimg/v1/ceph/mgr-key";
}

const fn key(name: &'static str, label: &'static str, per_node: bool) -> SecretSpec {
    SecretSpec {
        name,
        label,
        bytes: 16,
        form: Form::Custom(config::ceph_key),
        operator: false,
        per_node,
    }
}

const SECRETS: &[SecretSpec] = &[
    SecretSpec {
        name: "ceph-fsid",
        label: label::FSID,
        bytes: 16,
        form: Form::Uuid,
        operator: false,
        per_node: false,
    },
    key("ceph-mon-key", label::MON, false),
    key("ceph-admin-key", label::ADMIN, false),
    key("ceph-bootstrap-osd-key", label::BOOTSTRAP_OSD, false),
    key("ceph-bootstrap-mds-key", label::BOOTSTRAP_MDS, false),
    key("ceph-bootstrap-mgr-key", label::BOOTSTRAP_MGR, false),
    key("ceph-bootstrap-rbd-key", label::BOOTSTRAP_RBD, false),
    key(
        "ceph-bootstrap-rbd-mirror-key",
        label::BOOTSTRAP_RBD_MIRROR,
        false,
    ),
    key("ceph-bootstrap-rgw-key", label::BOOTSTRAP_RGW, false),
    key("ceph-mgr-key", label::MGR, true),
];

pub struct Ceph;

impl Stack for Ceph {
    fn name(&self) -> &'static str {
        "ceph"
    }

    fn section(&self) -> Option<&'static str> {
        Some(SECTION)
    }

    fn parse_section(&self, text: &str, value: &Raw<'_>) -> Result<Section, Vec<Problem>> {
        let s: config::Section = cluster::typed_section(text, SECTION, value)?;
        Ok(std::sync::Arc::new(s))
    }

    fn roles(&self) -> &'static [&'static str] {
        &[MON, MGR, OSD]
    }

    fn accounts(&self) -> &'static [&'static str] {
        &["ceph"]
    }

    fn secrets(&self) -> &'static [SecretSpec] {
        SECRETS
    }

    fn check(&self, text: &str, file: &ClusterFile, p: &mut Vec<Problem>) {
        check(text, file, p);
    }

    fn warnings(&self, _text: &str, file: &ClusterFile) -> Vec<Problem> {
        if stack::used(&Ceph, file) && config::mons(file).len() == 1 {
            vec![Problem {
                line: 0,
                field: "node.roles".into(),
                message: "one ceph-mon: the cluster stops when it is lost; 3 monitors \
                          tolerate one failure"
                    .into(),
            }]
        } else {
            Vec::new()
        }
    }

    fn init_section(&self) -> Option<&'static str> {
        Some(
            "[ceph]\n# The fsid and every cephx key are derived from the secret.\n# OSD devices of every ceph-osd node (a node's own list: [ceph.node.NAME] osd_devices).\n# Only an empty device becomes an OSD; list a device under wipe to allow erasing it.\nosd_devices = [\"/dev/disk/by-id/CHANGE-ME\"]\npool_size = 3\n",
        )
    }

    /// Three monitors (and managers) where there are three nodes, an OSD on every node.
    fn init_roles(&self, index: u32, nodes: u32) -> Vec<&'static str> {
        let mons = if nodes < 3 { 1 } else { 3 };
        if index < mons {
            vec![MON, MGR, OSD]
        } else {
            vec![OSD]
        }
    }

    fn steps<'a>(&self, ctx: &Ctx<'a>, t: &Target<'_>, _memo: &mut Memo) -> Result<Vec<Step<'a>>> {
        let r = config::roles(ctx.file, ctx.node);
        if !r.any() {
            return Ok(vec![Step {
                name: "ceph".into(),
                input: stack::fingerprint(&["none"]),
                reapply: true,
                apply: Box::new(|_: &Target<'_>| Ok("no Ceph role on this node".into())),
            }]);
        }
        let file = ctx.file;
        let node = ctx.node;
        let name = node.name.get_ref().clone();
        let fsid = config::fsid(file, ctx.secrets)?;
        let devices = config::osd_devices(file, node);
        let memory = (r.osd && !devices.is_empty()).then(|| {
            config::osd_memory_target(&config::section(file), mem_total(t), devices.len())
        });
        let conf = config::ceph_conf(file, node, &fsid, memory);
        let admin = config::client_keyring("client.admin", ctx.secrets)?;
        let bootstrap = config::client_keyring("client.bootstrap-osd", ctx.secrets)?;
        let mut steps = vec![Step {
            name: "ceph".into(),
            input: stack::fingerprint(&[&conf, &admin, &bootstrap, &format!("{r:?}")]),
            reapply: false,
            apply: Box::new(move |t: &Target<'_>| {
                t.write(CONF, &conf, 0o644)?;
                if r.mon {
                    t.write(ADMIN_KEYRING, &admin, 0o600)?;
                }
                if r.osd {
                    write_ceph_owned(t, BOOTSTRAP_OSD_KEYRING, &bootstrap)?;
                }
                Ok(format!(
                    "/{CONF}{}{}",
                    if r.mon { ", admin keyring" } else { "" },
                    if r.osd { ", bootstrap-osd keyring" } else { "" }
                ))
            }),
        }];
        if r.osd {
            let wipe = config::wipe(file, node);
            let fsid = fsid.clone();
            steps.push(Step {
                name: "ceph-devices".into(),
                input: stack::fingerprint(&[&devices.join(" "), &wipe.join(" "), &fsid]),
                // Before the monitor is made: a refused device leaves nothing behind. Once
                // done, later boots leave the OSD to ceph-volume's own unit; a changed device
                // list is checked again (it only reads).
                reapply: true,
                apply: Box::new(move |t: &Target<'_>| check_devices(t, &devices, &wipe, &fsid)),
            });
        }
        if r.mon {
            let keyring = config::keyring(&config::mkfs_entities(file, ctx.secrets)?);
            let args = config::monmap_args(file, &fsid, "/var/lib/ceph/tmp/picoimg-monmap");
            let name = name.clone();
            steps.push(Step {
                name: "ceph-mon".into(),
                input: stack::fingerprint(&[&keyring, &args.join(" ")]),
                reapply: false,
                apply: Box::new(move |t: &Target<'_>| make_mon(t, &name, &keyring, &args)),
            });
        }
        if r.mgr {
            let key = config::keyring(&[config::Entity {
                name: format!("mgr.{name}"),
                key: ctx.secrets.get_for(label::MGR, &name)?.to_owned(),
                caps: config::MGR_CAPS.to_vec(),
            }]);
            let name = name.clone();
            steps.push(Step {
                name: "ceph-mgr".into(),
                input: stack::fingerprint(&[&key]),
                reapply: false,
                apply: Box::new(move |t: &Target<'_>| {
                    let rel = format!("var/lib/ceph/mgr/ceph-{name}/keyring");
                    write_ceph_owned(t, &rel, &key)?;
                    Ok(format!("mgr.{name} key in /{rel}"))
                }),
            });
        }
        Ok(steps)
    }

    fn units(&self, file: &ClusterFile, node: &Node) -> Vec<String> {
        let r = config::roles(file, node);
        let name = node.name.get_ref();
        let mut u = Vec::new();
        if r.any() {
            u.push("ceph.target".to_owned());
        }
        if r.mon {
            u.extend(["ceph-mon.target".into(), format!("ceph-mon@{name}.service")]);
        }
        if r.mgr {
            u.extend(["ceph-mgr.target".into(), format!("ceph-mgr@{name}.service")]);
        }
        if r.osd {
            u.push("ceph-osd.target".into());
        }
        u
    }

    fn devices(&self, file: &ClusterFile, node: &Node) -> Vec<String> {
        config::osd_devices(file, node)
    }

    fn health(
        &self,
        ctx: &Ctx<'_>,
        t: &Target<'_>,
        p: &mut dyn Progress,
    ) -> Result<Option<String>> {
        let r = config::roles(ctx.file, ctx.node);
        if !r.any() {
            return Ok(None);
        }
        health(ctx, t, p, r).map(Some)
    }
}

/// MemTotal of /proc/meminfo in bytes (4 GiB when it cannot be read).
fn mem_total(t: &Target<'_>) -> u64 {
    std::fs::read_to_string(t.p("proc/meminfo"))
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(4 << 30, |kib| kib * 1024)
}

/// Writes a key file 0600 owned by the `ceph` user (its daemons read it), creating its
/// directory for that user too.
fn write_ceph_owned(t: &Target<'_>, rel: &str, text: &str) -> Result<()> {
    let ids = t.ids("ceph");
    if let Some(dir) = std::path::Path::new(rel).parent() {
        let d = t.p(&dir.to_string_lossy());
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        if let Some((uid, gid)) = ids {
            t.sys.chown(&d, uid, gid)?;
        }
    }
    t.write(rel, text, 0o600)?;
    if let Some((uid, gid)) = ids {
        t.sys.chown(&t.p(rel), uid, gid)?;
    }
    Ok(())
}

/// Makes this node's monitor store: the monmap of every monitor (v2 and v1 addresses) and the
/// mkfs keyring (every key the cluster starts with), then `ceph-mon --mkfs`. A store that is
/// there already is kept: a monitor is never made twice.
fn make_mon(t: &Target<'_>, name: &str, keyring: &str, monmap_args: &[String]) -> Result<String> {
    let data = format!("var/lib/ceph/mon/ceph-{name}");
    if t.p(&format!("{data}/done")).exists() {
        return Ok(format!("monitor {name}: store in /{data} kept"));
    }
    let tmp_keyring = "var/lib/ceph/tmp/picoimg-mkfs.keyring";
    let monmap = monmap_args.last().cloned().unwrap_or_default();
    write_ceph_owned(t, tmp_keyring, keyring)?;
    let made = (|| -> Result<()> {
        t.sys.run(&Cmd::new("monmaptool").args(monmap_args))?;
        if let Some((uid, gid)) = t.ids("ceph") {
            t.sys
                .chown(&t.p(monmap.trim_start_matches('/')), uid, gid)?;
        }
        // A half-made store from an interrupted mkfs: `ceph-mon --mkfs` leaves a directory
        // that is not empty alone and exits 0 ("monitor may already exist").
        let dir = t.p(&data);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some((uid, gid)) = t.ids("ceph") {
            t.sys.chown(&dir, uid, gid)?;
        }
        t.sys.run(
            &Cmd::new("ceph-mon")
                .args(["--cluster", "ceph", "--mkfs", "-i", name])
                .args(["--monmap", &monmap])
                .arg("--keyring")
                .arg(format!("/{tmp_keyring}"))
                .args(["--setuser", "ceph", "--setgroup", "ceph"]),
        )?;
        Ok(())
    })();
    let _ = std::fs::remove_file(t.p(tmp_keyring));
    let _ = std::fs::remove_file(t.p(monmap.trim_start_matches('/')));
    made.with_context(|| format!("making the store of monitor {name}"))?;
    if !t.p(&format!("{data}/store.db")).exists() {
        bail!("`ceph-mon --mkfs` made no store in /{data}");
    }
    write_ceph_owned(t, &format!("{data}/done"), "")?;
    Ok(format!("monitor {name}: store made in /{data}"))
}

/// Before anything starts: every OSD device is empty, this cluster's OSD, or allowed to be
/// wiped; anything else fails the node with the device and what is on it.
fn check_devices(
    t: &Target<'_>,
    devices: &[String],
    wipe: &[String],
    fsid: &str,
) -> Result<String> {
    let mut said = Vec::new();
    let mut refused = Vec::new();
    for d in devices {
        match disks::inspect(t, d, fsid)? {
            Found::Empty => said.push(format!("{d} empty")),
            Found::Ours { id, .. } => said.push(format!("{d} holds osd.{id} of this cluster")),
            Found::SystemDisk => {
                refused.push(format!("{d}: this node's system disk: never used for an OSD"))
            }
            Found::Other(what) if wipe.contains(d) => {
                said.push(format!("{d} holds {what}: will be wiped (listed under wipe)"))
            }
            Found::Other(what) => refused.push(format!(
                "{d} is not empty ({what}): left untouched; if its contents may be destroyed, list it under [ceph.node.NAME] wipe"
            )),
        }
    }
    if !refused.is_empty() {
        bail!("{}", refused.join("; "));
    }
    Ok(said.join(", "))
}

/// Creates, activates (or wipes and creates) the OSD on `device`, deciding again from what
/// is on it now.
fn make_osd(t: &Target<'_>, device: &str, wipe: bool, fsid: &str) -> Result<String> {
    let found = disks::inspect(t, device, fsid)?;
    let create = || {
        t.sys.run(
            &Cmd::new("ceph-volume")
                .args(["lvm", "create", "--bluestore", "--data"])
                .arg(device),
        )
    };
    match found {
        Found::Ours { id, osd_fsid } => {
            t.sys.run(
                &Cmd::new("ceph-volume")
                    .args(["lvm", "activate", "--bluestore"])
                    .args([&id, &osd_fsid]),
            )?;
            Ok(format!("osd.{id} on {device} activated (made before)"))
        }
        Found::Empty => {
            create()?;
            Ok(format!("OSD created on {device}"))
        }
        Found::SystemDisk => bail!("{device} is this node's system disk: never used for an OSD"),
        Found::Other(what) if wipe => {
            t.sys.run(
                &Cmd::new("ceph-volume")
                    .args(["lvm", "zap", "--destroy"])
                    .arg(device),
            )?;
            create()?;
            Ok(format!("{device} wiped ({what}) and an OSD created on it"))
        }
        Found::Other(what) => bail!("{device} is not empty ({what}): left untouched"),
    }
}

/// The image's `ceph-status` (the ceph component's overlay: `ceph status --format json`
/// through librados, a fifth of the `ceph` command's CPU) with the key this node has: the
/// admin key on monitors, else the bootstrap-osd key (its profile reads the maps and status),
/// else the manager's.
pub const STATUS: &str = "/usr/lib/picoimg/ceph-status";

fn status_cmd(file: &ClusterFile, node: &Node) -> Cmd {
    let r = config::roles(file, node);
    let c = Cmd::new(STATUS).args(["--connect-timeout", "20"]);
    if r.mon {
        c
    } else if r.osd {
        c.args(["--name", "client.bootstrap-osd", "--keyring"])
            .arg(format!("/{BOOTSTRAP_OSD_KEYRING}"))
    } else {
        let name = node.name.get_ref();
        c.args(["--name", &format!("mgr.{name}"), "--keyring"])
            .arg(format!("/var/lib/ceph/mgr/ceph-{name}/keyring"))
    }
}

fn health(ctx: &Ctx<'_>, t: &Target<'_>, p: &mut dyn Progress, r: config::Roles) -> Result<String> {
    let file = ctx.file;
    let limit = file.firstboot.health_timeout;
    let mons = config::mons(file);
    let fsid = config::fsid(file, ctx.secrets)?;
    let cmd = status_cmd(file, ctx.node);
    let status = || -> Result<config::Status, String> {
        let out = t
            .sys
            .run(&cmd)
            .map_err(|e| format!("no answer from the monitors yet ({})", short(&e)))?;
        config::status(&out).ok_or_else(|| "unreadable `ceph status`".to_owned())
    };
    // 1. A monitor quorum (OSDs are made through it).
    // ceph-status is a Python program (a second or two of CPU on a small board): every 15 s.
    stack::wait("a Ceph monitor quorum", limit, 15, t, p, || {
        Ok((|| {
            let s = status()?;
            if s.quorum.len() * 2 > mons.len() {
                Ok(())
            } else {
                Err(format!(
                    "{} of {} monitors in quorum",
                    s.quorum.len(),
                    mons.len()
                ))
            }
        })())
    })
    .map_err(|e| {
        e.context(format!(
            "are the monitors ({}) powered and on the network?",
            mons.iter()
                .map(|(n, a)| format!("{n} {a}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    // 2. This node's OSDs: made once (recorded), activated if they exist.
    if r.osd {
        let wipe = config::wipe(file, ctx.node);
        for d in config::osd_devices(file, ctx.node) {
            let allowed = wipe.contains(&d);
            p.once(
                &format!("ceph-osd {d}"),
                &stack::fingerprint(&[&d, &fsid]),
                &mut || make_osd(t, &d, allowed, &fsid),
            )?;
        }
    }
    // 3. HEALTH_OK: every monitor in quorum, a manager active, every OSD up and in.
    let expect: usize = file
        .nodes
        .iter()
        .map(|n| config::osd_devices(file, n).len())
        .sum();
    let name = ctx.node.name.get_ref();
    let mut restarted = None;
    let s = stack::wait("Ceph HEALTH_OK", limit, 15, t, p, || {
        Ok((|| {
            let s = status()?;
            let ok = s.health == "HEALTH_OK"
                && s.quorum.len() == mons.len()
                && s.mgr_available
                && s.up as usize >= expect
                && s.in_ as usize >= expect;
            if ok {
                return Ok(s);
            }
            if r.mon
                && restarted.is_none()
                && s.quorum.len() == mons.len()
                && s.checks.iter().any(|c| c == "SLOW_OPS")
            {
                restarted = unstick_monitor(t, name);
            }
            Err(format!(
                "{}{}, {} of {} monitors in quorum, {}, {} of {expect} OSDs up, {} in{}",
                s.health,
                if s.checks.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", s.checks.join(", "))
                },
                s.quorum.len(),
                mons.len(),
                if s.mgr_available {
                    "a manager active"
                } else {
                    "no manager active yet"
                },
                s.up,
                s.in_,
                restarted.as_deref().unwrap_or_default()
            ))
        })())
    })?;
    Ok(format!(
        "ceph HEALTH_OK, {} mons, {} osds up",
        s.quorum.len(),
        s.up
    ))
}

/// An operation older than this on this node's monitor, with every monitor in quorum, is
/// stuck, not slow.
const STUCK_OP_SECS: f64 = 300.0;

/// Restarts this node's monitor when it holds an operation stuck for minutes while every
/// monitor is in quorum, and says so. Seen under load (three VMs on two emulated cores): a
/// peon forwards a daemon's log message to the leader, an election follows, the message is
/// sent again and never answered; the op stays in flight and SLOW_OPS keeps the cluster from
/// HEALTH_OK until the monitor restarts (it rejoins the quorum from its store in seconds).
/// At most once per health check (the caller keeps the result).
fn unstick_monitor(t: &Target<'_>, name: &str) -> Option<String> {
    let ops = t
        .sys
        .run(&Cmd::new("ceph").args(["daemon", &format!("mon.{name}"), "ops"]))
        .ok()?;
    let age = config::oldest_op_age(&ops).filter(|a| *a > STUCK_OP_SECS)?;
    t.sys
        .run(&Cmd::new("systemctl").args(["restart", &format!("ceph-mon@{name}")]))
        .ok()?;
    Some(format!(
        "; monitor {name} restarted: an operation in it was stuck for {age:.0} s"
    ))
}

/// The last line of an error (without the command wrapper's `  | ` before a line of the
/// program's stderr), for a progress line.
fn short(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    s.lines()
        .last()
        .unwrap_or_default()
        .trim_start_matches([' ', '|'])
        .chars()
        .take(160)
        .collect()
}

/// Whole-file checks: monitors (odd, at least one, static addresses), every OSD node names a
/// device, devices are absolute /dev paths, the pool size fits the OSD hosts, the section's
/// values and per-node entries.
fn check(text: &str, f: &ClusterFile, p: &mut Vec<Problem>) {
    if !stack::used(&Ceph, f) {
        return;
    }
    let s = config::section(f);
    let mut push = |line: usize, field: String, message: String| {
        p.push(Problem {
            line,
            field,
            message,
        })
    };
    let mut mons = 0;
    let mut osd_hosts = 0;
    for (i, n) in f.nodes.iter().enumerate() {
        let r = config::roles(f, n);
        if r.mon {
            mons += 1;
            if n.address.get_ref() == "dhcp" {
                push(
                    cluster::at(text, &n.address),
                    format!("node[{i}].address"),
                    "a ceph-mon needs a static address: every daemon finds the monitors by address (mon_host)".into(),
                );
            }
        }
        if r.osd {
            if config::osd_devices(f, n).is_empty() {
                push(
                    cluster::at(text, &n.name),
                    format!("node[{i}].roles"),
                    format!(
                        "{} is a ceph-osd node but names no device: set [ceph] osd_devices or [ceph.node.{}] osd_devices",
                        n.name.get_ref(),
                        n.name.get_ref()
                    ),
                );
            } else {
                osd_hosts += 1;
            }
        }
    }
    if mons == 0 {
        push(
            0,
            "node.roles".into(),
            "no node has the ceph-mon role: give it to 1, 3 or 5 nodes".into(),
        );
    } else if mons % 2 == 0 {
        push(
            0,
            "node.roles".into(),
            format!("{mons} ceph-mon nodes: use an odd number (1, 3, 5) so a majority survives a failure"),
        );
    }
    let mut device = |v: &toml::Spanned<String>, field: String| {
        let d = v.get_ref();
        let ok = d.starts_with("/dev/")
            && d.len() > 5
            && !d.split('/').any(|c| c == ".." || c == ".")
            && !d.chars().any(|c| c.is_whitespace() || c.is_control());
        if !ok {
            push(
                cluster::at(text, v),
                field,
                format!(
                    "\"{}\" is not a device path: an absolute path under /dev, best a stable one such as /dev/disk/by-id/...",
                    d.escape_debug()
                ),
            );
        }
    };
    for (j, d) in s.osd_devices.iter().enumerate() {
        device(d, format!("ceph.osd_devices[{j}]"));
    }
    for (name, ns) in &s.node {
        for (j, d) in ns.osd_devices.iter().flatten().enumerate() {
            device(d, format!("ceph.node.{}.osd_devices[{j}]", name.get_ref()));
        }
        for (j, d) in ns.wipe.iter().enumerate() {
            device(d, format!("ceph.node.{}.wipe[{j}]", name.get_ref()));
        }
    }
    let mut push = |line: usize, field: String, message: String| {
        p.push(Problem {
            line,
            field,
            message,
        })
    };
    for (name, ns) in &s.node {
        let field = format!("ceph.node.{}", name.get_ref());
        let Some(n) = f.nodes.iter().find(|n| n.name.get_ref() == name.get_ref()) else {
            push(
                cluster::at(text, name),
                field,
                format!("no [[node]] is named \"{}\"", name.get_ref().escape_debug()),
            );
            continue;
        };
        if ns.osd_devices.is_some() && !config::roles(f, n).osd {
            push(
                cluster::at(text, name),
                format!("{field}.osd_devices"),
                format!("{} does not have the ceph-osd role", name.get_ref()),
            );
        }
        let devices = config::osd_devices(f, n);
        for (j, w) in ns.wipe.iter().enumerate() {
            if !devices.contains(w.get_ref()) {
                push(
                    cluster::at(text, w),
                    format!("{field}.wipe[{j}]"),
                    format!(
                        "{} is not one of {}'s OSD devices: only a device it uses may be wiped",
                        w.get_ref(),
                        name.get_ref()
                    ),
                );
            }
        }
        let mut seen = Vec::new();
        for d in ns.osd_devices.iter().flatten() {
            if seen.contains(&d.get_ref()) {
                push(
                    cluster::at(text, d),
                    format!("{field}.osd_devices"),
                    format!("{} is listed twice", d.get_ref()),
                );
            }
            seen.push(d.get_ref());
        }
    }
    if let Some(v) = &s.fsid {
        if uuid::Uuid::parse_str(v.get_ref()).is_err() {
            push(
                cluster::at(text, v),
                "ceph.fsid".into(),
                "not a UUID: leave it out to derive one from the secret".into(),
            );
        }
    }
    if let Some(v) = &s.public_network {
        match cluster::Subnet::parse(v.get_ref()) {
            None => push(
                cluster::at(text, v),
                "ceph.public_network".into(),
                "not an IPv4 subnet (a.b.c.d/len)".into(),
            ),
            Some(net) => {
                for (name, addr) in config::mons(f) {
                    let inside = addr.parse().map(|a| net.host(a)).unwrap_or(true);
                    if !inside {
                        push(
                            cluster::at(text, v),
                            "ceph.public_network".into(),
                            format!("monitor {name} ({addr}) is outside it"),
                        );
                    }
                }
            }
        }
    }
    let (size, min) = config::pool_sizes(&s);
    if let Some(v) = &s.pool_size {
        if !(1..=10).contains(v.get_ref()) {
            push(
                cluster::at(text, v),
                "ceph.pool_size".into(),
                "between 1 and 10 replicas".into(),
            );
        }
    }
    if size as usize > osd_hosts {
        push(
            s.pool_size.as_ref().map_or(0, |v| cluster::at(text, v)),
            "ceph.pool_size".into(),
            format!(
                "pools keep {size} replicas on different hosts but {osd_hosts} node(s) have OSDs: \
                 the cluster could never be healthy; add OSD nodes or set pool_size = {}",
                osd_hosts.max(1)
            ),
        );
    }
    if min == 0 || min > size {
        push(
            s.pool_min_size.as_ref().map_or(0, |v| cluster::at(text, v)),
            "ceph.pool_min_size".into(),
            format!("between 1 and pool_size ({size})"),
        );
    }
    for (k, v) in &s.options {
        let field = format!("ceph.options.{}", k.get_ref());
        if let Some((_, why)) = config::MANAGED_OPTIONS
            .iter()
            .find(|(m, _)| m == k.get_ref())
        {
            push(
                cluster::at(text, k),
                field,
                format!("picoimg writes this option itself ({why}): remove it here"),
            );
        } else if !config::option_name_ok(k.get_ref()) {
            push(
                cluster::at(text, k),
                field,
                "not a Ceph option name (lowercase words joined by '_', as `ceph config ls` prints them)"
                    .into(),
            );
        } else if let Err(why) = config::option_value(v.get_ref()) {
            push(cluster::at(text, v), field, why.into());
        }
    }
    if let Some(v) = &s.osd_memory_target {
        if *v.get_ref() < config::MIN_OSD_MEMORY {
            push(
                cluster::at(text, v),
                "ceph.osd_memory_target".into(),
                format!(
                    "at least {} bytes (896 MiB), Ceph's smallest useful value",
                    config::MIN_OSD_MEMORY
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests;
