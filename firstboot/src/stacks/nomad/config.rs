//! Nomad's agent configuration from the cluster file, and reading what the `nomad` CLI prints.
//!
//! Every key was checked against hashicorp/nomad (snapshot aa026cc99c): `command/agent/config.go`
//! (`region`, `datacenter`, `name`, `data_dir`, `bind_addr`, `advertise.{http,rpc,serf}`,
//! `disable_update_check`, `leave_on_terminate`, `server.{enabled,bootstrap_expect,encrypt,
//! server_join}`, `server_join.retry_join`, `client.{enabled,server_join,cni_path}`,
//! `acl.enabled`) and `nomad/structs/config/consul.go` (`consul.{address,token}`). Nomad reads
//! `.json` files in its config directory as HCL's JSON form (blocks as objects).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::json;
use toml::Spanned;

use crate::cluster::{ClusterFile, Node};
use crate::stack::Secrets;

use super::{label, SECTION};

pub const SERVER: &str = "nomad-server";
pub const CLIENT: &str = "nomad-client";
/// Where Debian's containernetworking-plugins puts the CNI plugins (Nomad looks in
/// /opt/cni/bin unless told).
pub const CNI_PATH: &str = "/usr/lib/cni";
/// HashiCorp's package keeps Nomad's state here (its /etc/nomad.d/nomad.hcl).
pub const DATA_DIR: &str = "/opt/nomad/data";

/// The cluster file's `[nomad]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    #[serde(default = "default_dc")]
    pub datacenter: Spanned<String>,
    #[serde(default = "default_region")]
    pub region: Spanned<String>,
    /// Let the docker driver run privileged containers (off unless a job needs it).
    #[serde(default)]
    pub docker_privileged: bool,
}

fn default_dc() -> Spanned<String> {
    Spanned::new(0..0, "dc1".into())
}

fn default_region() -> Spanned<String> {
    Spanned::new(0..0, "global".into())
}

impl Default for Section {
    fn default() -> Self {
        Section {
            datacenter: default_dc(),
            region: default_region(),
            docker_privileged: false,
        }
    }
}

/// The file's `[nomad]` section, or the defaults.
pub fn section(file: &ClusterFile) -> Section {
    file.stacks.get_or_default::<Section>(SECTION)
}

/// What a node runs of Nomad (a node may be both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub server: bool,
    pub client: bool,
}

pub fn roles(node: &Node) -> Roles {
    let has = |r: &str| node.roles.iter().any(|x| x.get_ref() == r);
    Roles {
        server: has(SERVER),
        client: has(CLIENT),
    }
}

impl Roles {
    pub fn any(self) -> bool {
        self.server || self.client
    }
}

/// The servers' addresses (checked: every server has a static one).
pub fn server_addresses(file: &ClusterFile) -> Vec<String> {
    file.nodes
        .iter()
        .filter(|n| roles(n).server)
        .map(|n| n.address.get_ref().clone())
        .collect()
}

pub use crate::stack::Version;

/// `nomad acl bootstrap` with an operator-chosen secret came in 1.3.2 (CHANGELOG, GH-12520):
/// older versions cannot take the derived root token.
pub const BOOTSTRAP_SECRET: Version = Version(1, 3, 2);

/// The agent configuration for `node`, as JSON. `consul_token`: the Consul ACL token this
/// agent registers with (the server's or the client's).
pub fn config(
    file: &ClusterFile,
    node: &Node,
    secrets: &Secrets,
    consul_token: &str,
) -> anyhow::Result<serde_json::Value> {
    let s = section(file);
    let r = roles(node);
    let servers = server_addresses(file);
    // Bind and advertise on the cluster address: a second interface would otherwise make
    // Nomad advertise the wrong one.
    let addr = node.address.get_ref();
    let mut v = json!({
        "region": s.region.get_ref(),
        "datacenter": s.datacenter.get_ref(),
        "name": node.name.get_ref(),
        "data_dir": DATA_DIR,
        "bind_addr": addr,
        "advertise": { "http": addr, "rpc": addr, "serf": addr },
        "disable_update_check": true,
        "leave_on_terminate": false,
        "acl": { "enabled": true },
        "consul": { "address": "127.0.0.1:8500", "token": consul_token },
    });
    if r.server {
        v["server"] = json!({
            "enabled": true,
            "bootstrap_expect": servers.len(),
            "encrypt": secrets.get(label::GOSSIP)?,
            "server_join": { "retry_join": servers },
        });
    }
    if r.client {
        v["client"] = json!({
            "enabled": true,
            "server_join": { "retry_join": servers },
            "cni_path": CNI_PATH,
        });
        if s.docker_privileged {
            v["plugin"] = json!({ "docker": { "config": { "allow_privileged": true } } });
        }
    }
    Ok(v)
}

/// Rows of a table the nomad CLI prints (columns separated by two or more spaces, values
/// starting where their header starts), by header name.
pub fn table(output: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = output.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    // Header cells and their start offsets; "Node Pool" is one header (single space).
    let mut cols: Vec<(usize, String)> = Vec::new();
    let mut start = None;
    let bytes = header.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let gap = bytes[i] == b' ' && bytes.get(i + 1).is_none_or(|b| *b == b' ');
        match (start, gap || bytes[i] == b'\t') {
            (None, false) => start = Some(i),
            (Some(s), true) => {
                cols.push((s, header[s..i].trim().to_owned()));
                start = None;
            }
            _ => {}
        }
        i += 1;
    }
    if let Some(s) = start {
        cols.push((s, header[s..].trim().to_owned()));
    }
    lines
        .map(|l| {
            let mut row = BTreeMap::new();
            for (k, (s, name)) in cols.iter().enumerate() {
                let end = cols.get(k + 1).map_or(l.len(), |(e, _)| (*e).min(l.len()));
                let v = l.get((*s).min(l.len())..end).unwrap_or("").trim();
                row.insert(name.clone(), v.to_owned());
            }
            row
        })
        .collect()
}

/// From `nomad server members`: (alive servers, whether one of them is the leader).
pub fn servers_alive(output: &str) -> (usize, bool) {
    let rows = table(output);
    let alive = rows
        .iter()
        .filter(|r| r.get("Status").is_some_and(|s| s == "alive"))
        .count();
    let leader = rows
        .iter()
        .any(|r| r.get("Leader").is_some_and(|s| s == "true"));
    (alive, leader)
}

/// From `nomad node status`: this node's status (`ready`, `initializing`, ...), if listed.
pub fn node_status(output: &str, name: &str) -> Option<String> {
    table(output)
        .into_iter()
        .find(|r| r.get("Name").is_some_and(|n| n == name))
        .and_then(|r| r.get("Status").cloned())
}

/// The version in Consul's `GET /v1/agent/self` answer (`Config.Version`, e.g. "1.8.7").
pub fn consul_version(agent_self: &str) -> Option<Version> {
    let v: serde_json::Value = serde_json::from_str(agent_self).ok()?;
    Version::parse(&format!("v{}", v["Config"]["Version"].as_str()?))
}

/// Consul ACL rules for Nomad agents, as HashiCorp documents them (Nomad's Consul ACL page,
/// docs/integrations/consul/acl): agents read agents and write nodes and services; servers
/// also write ACLs and, on a Consul that has the `mesh` resource (1.11 and later), the mesh.
pub fn consul_rules(server: bool, consul: Option<(u32, u32)>) -> String {
    let mut r = String::from(
        "agent_prefix \"\" { policy = \"read\" }\nnode_prefix \"\" { policy = \"write\" }\nservice_prefix \"\" { policy = \"write\" }\n",
    );
    if server {
        r.push_str("acl = \"write\"\n");
        if consul.is_some_and(|v| v >= (1, 11)) {
            r.push_str("mesh = \"write\"\n");
        }
    }
    r
}
