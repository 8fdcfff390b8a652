//! Ceph's configuration from the cluster file: the `[ceph]` section, the roles, the keys in
//! Ceph's own secret format, `ceph.conf`, the monitors' mkfs keyring and monmap arguments, and
//! reading what `ceph status --format json` prints.
//!
//! Checked against ceph/ceph (reef): the key layout of `CryptoKey::encode` (src/auth/Crypto.cc),
//! the entities and caps the monitors would otherwise generate (`_generate_bootstrap_keys` in
//! src/mon/AuthMonitor.cc), the profiles' grants (src/mon/MonCap.cc), doc/install/
//! manual-deployment.rst (ceph.conf keys, monmaptool, `ceph-mon --mkfs`), doc/mgr/
//! administrator.rst (the manager's key and caps) and src/tools/monmaptool.cc (`--addv`).

use std::collections::BTreeMap;

use base64::Engine;
use serde::Deserialize;
use toml::Spanned;

use crate::cluster::{ClusterFile, Node, Subnet, TimePolicy};
use crate::stack::Secrets;

use super::{label, SECTION};

pub const MON: &str = "ceph-mon";
pub const MGR: &str = "ceph-mgr";
pub const OSD: &str = "ceph-osd";

/// Ceph's smallest `osd_memory_target` for the cache autotuner to work with (896 MiB).
pub const MIN_OSD_MEMORY: u64 = 896 << 20;
/// Ceph's default `osd_memory_target` (4 GiB): more is never chosen automatically.
pub const MAX_OSD_MEMORY: u64 = 4 << 30;

/// The cluster file's `[ceph]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    /// The cluster's fsid (a UUID); default: derived from the cluster secret.
    pub fsid: Option<Spanned<String>>,
    /// Ceph's public network (`a.b.c.d/len`); default: the file's `[network] subnet`.
    pub public_network: Option<Spanned<String>>,
    /// Replicas of a new pool (`osd_pool_default_size`); default 3.
    pub pool_size: Option<Spanned<u32>>,
    /// Replicas a pool needs to serve I/O (`osd_pool_default_min_size`); default: more
    /// than half of `pool_size`.
    pub pool_min_size: Option<Spanned<u32>>,
    /// Bytes each OSD daemon aims to use (`osd_memory_target`); default: a third of the
    /// node's memory shared by its OSDs, between 896 MiB and 4 GiB.
    pub osd_memory_target: Option<Spanned<u64>>,
    /// The OSD devices of every `ceph-osd` node that names none of its own.
    #[serde(default)]
    pub osd_devices: Vec<Spanned<String>>,
    /// Per node (`[ceph.node.NAME]`): its own OSD devices, and the devices that may be wiped.
    #[serde(default)]
    pub node: BTreeMap<Spanned<String>, NodeSection>,
    /// `[ceph.options]`: more Ceph options for every daemon (ceph.conf `[global]`), such as
    /// `mon_warn_on_slow_ping_time = 2000`; strings, numbers or booleans. The options picoimg
    /// sets from the fields above or derives are refused here.
    #[serde(default)]
    pub options: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
}

/// Ceph options the agent writes itself: `[ceph.options]` may not set them.
pub const MANAGED_OPTIONS: &[(&str, &str)] = &[
    ("fsid", "set [ceph] fsid"),
    ("mon_host", "it lists the ceph-mon nodes' addresses"),
    ("mon_initial_members", "it lists the ceph-mon nodes"),
    ("public_network", "set [ceph] public_network"),
    ("auth_cluster_required", "cephx is always required"),
    ("auth_service_required", "cephx is always required"),
    ("auth_client_required", "cephx is always required"),
    (
        "auth_allow_insecure_global_id_reclaim",
        "insecure reclaim stays off",
    ),
    ("osd_pool_default_size", "set [ceph] pool_size"),
    ("osd_pool_default_min_size", "set [ceph] pool_min_size"),
    ("osd_memory_target", "set [ceph] osd_memory_target"),
    ("keyring", "keys are derived from the cluster secret"),
    ("key", "keys are derived from the cluster secret"),
    ("keyfile", "keys are derived from the cluster secret"),
];

/// An option value as ceph.conf spells it, or why it cannot be one.
pub fn option_value(v: &toml::Value) -> Result<String, &'static str> {
    match v {
        toml::Value::String(s) if s.trim().is_empty() => {
            Err("an empty string: leave the option out")
        }
        toml::Value::String(s)
            if s.chars()
                .any(|c| c.is_control() || matches!(c, '#' | ';' | '[' | ']')) =>
        {
            Err("a ceph.conf value cannot hold a line break, '#', ';', '[' or ']'")
        }
        toml::Value::String(s) => Ok(s.trim().to_owned()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) if f.is_finite() => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        _ => Err("a string, a number or a boolean"),
    }
}

/// Whether `name` is spelt as a Ceph option (lowercase words joined by `_`).
pub fn option_name_ok(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// `[ceph.node.NAME]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// This node's OSD devices (absolute paths; stable ones such as /dev/disk/by-id/...).
    pub osd_devices: Option<Vec<Spanned<String>>>,
    /// Devices of this node whose contents may be destroyed to make an OSD. A device holding
    /// anything and not listed here is never touched.
    #[serde(default)]
    pub wipe: Vec<Spanned<String>>,
}

/// The file's `[ceph]` section, or the defaults.
pub fn section(file: &ClusterFile) -> Section {
    file.stacks.get_or_default::<Section>(SECTION)
}

/// What a node runs of Ceph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub mon: bool,
    pub mgr: bool,
    pub osd: bool,
}

impl Roles {
    pub fn any(self) -> bool {
        self.mon || self.mgr || self.osd
    }
}

fn has(node: &Node, role: &str) -> bool {
    node.roles.iter().any(|x| x.get_ref() == role)
}

/// The node's roles; `ceph-mgr` defaults to every monitor when no node names it.
pub fn roles(file: &ClusterFile, node: &Node) -> Roles {
    let named_mgr = file.nodes.iter().any(|n| has(n, MGR));
    let mon = has(node, MON);
    Roles {
        mon,
        mgr: if named_mgr { has(node, MGR) } else { mon },
        osd: has(node, OSD),
    }
}

/// The monitors: (name, address), in file order.
pub fn mons(file: &ClusterFile) -> Vec<(&str, &str)> {
    file.nodes
        .iter()
        .filter(|n| has(n, MON))
        .map(|n| (n.name.get_ref().as_str(), n.address.get_ref().as_str()))
        .collect()
}

/// The managers' names, in file order.
pub fn mgrs(file: &ClusterFile) -> Vec<&str> {
    file.nodes
        .iter()
        .filter(|n| roles(file, n).mgr)
        .map(|n| n.name.get_ref().as_str())
        .collect()
}

/// The OSD devices `node` names (its own list, else the section's), none without the role.
pub fn osd_devices(file: &ClusterFile, node: &Node) -> Vec<String> {
    if !has(node, OSD) {
        return Vec::new();
    }
    let s = section(file);
    let own = s
        .node
        .iter()
        .find(|(k, _)| k.get_ref() == node.name.get_ref())
        .and_then(|(_, v)| v.osd_devices.clone());
    own.unwrap_or(s.osd_devices)
        .iter()
        .map(|d| d.get_ref().clone())
        .collect()
}

/// The devices of `node` the file allows to be wiped.
pub fn wipe(file: &ClusterFile, node: &Node) -> Vec<String> {
    section(file)
        .node
        .iter()
        .find(|(k, _)| k.get_ref() == node.name.get_ref())
        .map(|(_, v)| v.wipe.iter().map(|d| d.get_ref().clone()).collect())
        .unwrap_or_default()
}

/// The fsid: the file's, else the derived one.
pub fn fsid(file: &ClusterFile, secrets: &Secrets) -> anyhow::Result<String> {
    match section(file).fsid {
        Some(f) => Ok(f.get_ref().to_lowercase()),
        None => Ok(secrets.get(label::FSID)?.to_owned()),
    }
}

/// `pool_size` and `pool_min_size` with their defaults.
pub fn pool_sizes(s: &Section) -> (u32, u32) {
    let size = s.pool_size.as_ref().map_or(3, |v| *v.get_ref());
    let min = s
        .pool_min_size
        .as_ref()
        .map_or(size - size / 2, |v| *v.get_ref());
    (size, min)
}

/// A derived key in Ceph's secret format: `CryptoKey::encode` writes, little-endian, u16
/// type (1 = AES), the creation time as u32 seconds and u32 nanoseconds, u16 length (16),
/// then the key; base64 of those 28 bytes. The creation time is fixed at 0 so every node
/// writes the same key.
pub fn ceph_key(bytes: &[u8]) -> String {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(&bytes[..16]);
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A keyring entity's caps: (service, cap).
pub type Caps = &'static [(&'static str, &'static str)];

/// One entity of a keyring: name, key, caps (service, cap).
pub struct Entity {
    pub name: String,
    pub key: String,
    pub caps: Vec<(&'static str, &'static str)>,
}

/// The client entities the monitors would otherwise create with random keys at their first
/// quorum (AuthMonitor's `_generate_bootstrap_keys`), with the same caps, and their labels.
pub const CLIENTS: &[(&str, &str, Caps)] = &[
    (
        "client.admin",
        label::ADMIN,
        &[
            ("mds", "allow *"),
            ("mgr", "allow *"),
            ("mon", "allow *"),
            ("osd", "allow *"),
        ],
    ),
    (
        "client.bootstrap-mds",
        label::BOOTSTRAP_MDS,
        &[("mon", "allow profile bootstrap-mds")],
    ),
    (
        "client.bootstrap-mgr",
        label::BOOTSTRAP_MGR,
        &[("mon", "allow profile bootstrap-mgr")],
    ),
    (
        "client.bootstrap-osd",
        label::BOOTSTRAP_OSD,
        &[("mon", "allow profile bootstrap-osd")],
    ),
    (
        "client.bootstrap-rbd",
        label::BOOTSTRAP_RBD,
        &[("mon", "allow profile bootstrap-rbd")],
    ),
    (
        "client.bootstrap-rbd-mirror",
        label::BOOTSTRAP_RBD_MIRROR,
        &[("mon", "allow profile bootstrap-rbd-mirror")],
    ),
    (
        "client.bootstrap-rgw",
        label::BOOTSTRAP_RGW,
        &[("mon", "allow profile bootstrap-rgw")],
    ),
];

/// A manager's caps (doc/mgr/administrator.rst).
pub const MGR_CAPS: &[(&str, &str)] = &[
    ("mds", "allow *"),
    ("mon", "allow profile mgr"),
    ("osd", "allow *"),
];

/// Every entity of the monitors' mkfs keyring: `mon.`, the clients Ceph would generate, and
/// one `mgr.NAME` per manager, so monitors made apart from the same inputs hold the same keys.
pub fn mkfs_entities(file: &ClusterFile, secrets: &Secrets) -> anyhow::Result<Vec<Entity>> {
    let mut v = vec![Entity {
        name: "mon.".into(),
        key: secrets.get(label::MON)?.to_owned(),
        caps: vec![("mon", "allow *")],
    }];
    for (name, l, caps) in CLIENTS {
        v.push(Entity {
            name: (*name).into(),
            key: secrets.get(l)?.to_owned(),
            caps: caps.to_vec(),
        });
    }
    for m in mgrs(file) {
        v.push(Entity {
            name: format!("mgr.{m}"),
            key: secrets.get_for(label::MGR, m)?.to_owned(),
            caps: MGR_CAPS.to_vec(),
        });
    }
    Ok(v)
}

/// A keyring file (the INI form ceph-authtool writes).
pub fn keyring(entities: &[Entity]) -> String {
    let mut s = String::new();
    for e in entities {
        s.push_str(&format!("[{}]\n\tkey = {}\n", e.name, e.key));
        for (svc, cap) in &e.caps {
            s.push_str(&format!("\tcaps {svc} = \"{cap}\"\n"));
        }
    }
    s
}

/// One client's keyring (`client.admin`, `client.bootstrap-osd`).
pub fn client_keyring(name: &str, secrets: &Secrets) -> anyhow::Result<String> {
    let (n, l, caps) = CLIENTS
        .iter()
        .find(|(n, _, _)| *n == name)
        .ok_or_else(|| anyhow::anyhow!("no such Ceph client: {name}"))?;
    Ok(keyring(&[Entity {
        name: (*n).into(),
        key: secrets.get(l)?.to_owned(),
        caps: caps.to_vec(),
    }]))
}

/// A monitor's address vector: msgr2 on 3300 and the legacy protocol on 6789.
pub fn addrvec(address: &str) -> String {
    format!("[v2:{address}:3300,v1:{address}:6789]")
}

/// `monmaptool` arguments that make the initial monmap: every monitor with both addresses
/// (`--addv`; plain `--add` gives v1 only on a new map, see src/tools/monmaptool.cc).
pub fn monmap_args(file: &ClusterFile, fsid: &str, out: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "--create",
        "--clobber",
        "--fsid",
        fsid,
        "--enable-all-features",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (name, addr) in mons(file) {
        a.extend(["--addv".into(), name.into(), addrvec(addr)]);
    }
    a.push(out.into());
    a
}

/// `osd_memory_target` for a node with `mem_bytes` of memory and `osds` OSDs: the file's
/// value, else a third of the memory shared by the OSDs, within Ceph's useful range.
pub fn osd_memory_target(s: &Section, mem_bytes: u64, osds: usize) -> u64 {
    if let Some(v) = &s.osd_memory_target {
        return *v.get_ref();
    }
    (mem_bytes / 3 / osds.max(1) as u64).clamp(MIN_OSD_MEMORY, MAX_OSD_MEMORY)
}

/// Manager modules never loaded: all of Ceph 18's except the ones it keeps always on
/// (balancer, crash, devicehealth, orchestrator, pg_autoscaler, progress, rbd_support, status,
/// telemetry, volumes: not loading one of those is HEALTH_ERR, "Module 'volumes' has failed:
/// Not found or unloadable", seen on a rehearsal) and iostat (enabled on a new cluster).
pub const MGR_DISABLED_MODULES: &str = "alerts,influx,insights,localpool,mirroring,nfs,\
osd_perf_query,osd_support,prometheus,restful,selftest,snap_schedule,stats,telegraf,\
test_orchestrator,zabbix";

/// `/etc/ceph/ceph.conf` for `node`. Every value is written, with why, so the file explains
/// the cluster to whoever reads it on a node.
pub fn ceph_conf(file: &ClusterFile, node: &Node, fsid: &str, osd_memory: Option<u64>) -> String {
    let s = section(file);
    let mons = mons(file);
    let network = s
        .public_network
        .as_ref()
        .map_or(file.network.subnet.get_ref(), |v| v.get_ref());
    let (size, min) = pool_sizes(&s);
    let extra: String = s
        .options
        .iter()
        .filter_map(|(k, v)| {
            Some(format!(
                "{} = {}\n",
                k.get_ref(),
                option_value(v.get_ref()).ok()?
            ))
        })
        .collect();
    let extra = if extra.is_empty() {
        extra
    } else {
        format!("# From the cluster file's [ceph.options].\n{extra}")
    };
    let mut c = format!(
        "# Written by picoimg-firstboot from the cluster file ({} of cluster {}).\n\
         # Every node of the cluster gets the same [global] section.\n\
         [global]\n\
         fsid = {fsid}\n\
         mon_initial_members = {}\n\
         mon_host = {}\n\
         public_network = {network}\n\
         # cephx everywhere; keys are derived from the cluster secret, not generated here.\n\
         auth_cluster_required = cephx\n\
         auth_service_required = cephx\n\
         auth_client_required = cephx\n\
         # New pools: {size} replicas, I/O with {min}; replicas on different hosts.\n\
         osd_pool_default_size = {size}\n\
         osd_pool_default_min_size = {min}\n\
         osd_crush_chooseleaf_type = 1\n\
         # A new cluster enables only the manager module iostat (of those it may start with).\n\
         mgr_initial_modules = iostat\n\
         {extra}\
         \n\
         [mon]\n\
         # Only clients that reclaim their global id securely (every Ceph 14.2.20+ client).\n\
         auth_allow_insecure_global_id_reclaim = false\n\
         # Pools are not deleted by a slip of the keyboard.\n\
         mon_allow_pool_delete = false\n\
         {drift}\
         \n\
         [mgr]\n\
         # Small boards: the manager imports every module it finds at start (seconds each on\n\
         # a small CPU); these are never loaded. Remove a name and restart ceph-mgr@NAME to\n\
         # use one (`ceph mgr module enable NAME`).\n\
         mgr_disabled_modules = {MGR_DISABLED_MODULES}\n",
        node.name.get_ref(),
        file.cluster.get_ref().name.get_ref(),
        mons.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
        mons.iter()
            .map(|(_, a)| addrvec(a))
            .collect::<Vec<_>>()
            .join(","),
        drift = if file.time.policy == TimePolicy::Skip {
            "# [time] policy = \"skip\": no time source keeps the monitors' clocks together; each\n\
             # starts from its RTC, which counts whole seconds (up to 2 s apart at boot), then\n\
             # drifts: allow 3 s (Ceph warns of skew past 0.05 s; its monitor lease is 5 s).\n\
             mon_clock_drift_allowed = 3\n"
        } else {
            ""
        },
    );
    if let Some(m) = osd_memory {
        c.push_str(&format!(
            "\n[osd]\n\
             # Bytes each OSD aims to use (this node's memory, shared with its other services).\n\
             osd_memory_target = {m}\n"
        ));
    }
    c
}

/// What `ceph status --format json` says, as far as the health check reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub health: String,
    /// The health checks that are not OK (their codes).
    pub checks: Vec<String>,
    pub quorum: Vec<String>,
    pub mgr_available: bool,
    pub osds: u64,
    pub up: u64,
    pub in_: u64,
}

/// Parses `ceph status --format json` (reef: `health.status`, `health.checks`, `quorum_names`,
/// `mgrmap.available`, `osdmap.{num_osds,num_up_osds,num_in_osds}`).
pub fn status(json: &str) -> Option<Status> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let n = |p: &str| v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
    Some(Status {
        health: v.pointer("/health/status")?.as_str()?.to_owned(),
        checks: v
            .pointer("/health/checks")
            .and_then(|c| c.as_object())
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default(),
        quorum: v
            .pointer("/quorum_names")
            .and_then(|q| q.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        mgr_available: v
            .pointer("/mgrmap/available")
            .and_then(|x| x.as_bool())
            .unwrap_or(false),
        osds: n("/osdmap/num_osds"),
        up: n("/osdmap/num_up_osds"),
        in_: n("/osdmap/num_in_osds"),
    })
}

/// The age in seconds of the oldest operation a daemon has in flight, from
/// `ceph daemon NAME ops` (JSON: `ops[].age`); None without any.
pub fn oldest_op_age(json: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v.pointer("/ops")?
        .as_array()?
        .iter()
        .filter_map(|o| o.get("age").and_then(|a| a.as_f64()))
        .reduce(f64::max)
}

/// Whether `s` is a public network Ceph can use: an IPv4 subnet.
pub fn valid_network(s: &str) -> bool {
    Subnet::parse(s).is_some()
}
