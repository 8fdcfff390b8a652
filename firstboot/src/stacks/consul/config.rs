//! Consul's configuration derived from the cluster file, written with the key names of the
//! installed Consul's version, and reading what `consul members` / `raft list-peers` print.

use std::net::Ipv4Addr;

use serde::Deserialize;
use serde_json::json;
use toml::Spanned;

use crate::cluster::{ClusterFile, Node};
use crate::stack::Secrets;

use super::{label, SECTION};

/// The cluster file's `[consul]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    #[serde(default = "default_dc")]
    pub datacenter: Spanned<String>,
    /// ACLs on, default deny, with the derived management token.
    #[serde(default = "yes")]
    pub acl: bool,
}

fn default_dc() -> Spanned<String> {
    Spanned::new(0..0, "dc1".into())
}

fn yes() -> bool {
    true
}

impl Default for Section {
    fn default() -> Self {
        Section {
            datacenter: default_dc(),
            acl: true,
        }
    }
}

/// The file's `[consul]` section, or the defaults.
pub fn section(file: &ClusterFile) -> Section {
    file.stacks.get_or_default::<Section>(SECTION)
}

/// What a node is in Consul.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

pub const SERVER: &str = "consul-server";
pub const CLIENT: &str = "consul-client";

pub use crate::stack::Version;

/// The config key of the initial management token: `master` before 1.11.
pub fn initial_token_key(v: Version) -> &'static str {
    if v >= Version(1, 11, 0) {
        "initial_management"
    } else {
        "master"
    }
}

/// What this node runs: a server, a client, or no Consul at all.
pub fn role(node: &Node) -> Option<Role> {
    let has = |r: &str| node.roles.iter().any(|x| x.get_ref() == r);
    if has(SERVER) {
        Some(Role::Server)
    } else if has(CLIENT) {
        Some(Role::Client)
    } else {
        None
    }
}

/// The servers' addresses (checked: every server has a static one).
pub fn server_addresses(file: &ClusterFile) -> Vec<String> {
    file.nodes
        .iter()
        .filter(|n| role(n) == Some(Role::Server))
        .map(|n| n.address.get_ref().clone())
        .collect()
}

/// The agent configuration for `node`, as JSON (every Consul version reads it).
pub fn config(
    file: &ClusterFile,
    node: &Node,
    secrets: &Secrets,
    version: Version,
) -> anyhow::Result<serde_json::Value> {
    let c = section(file);
    let servers = server_addresses(file);
    let server = role(node) == Some(Role::Server);
    // Bind to the cluster address: with a second interface (a laptop's USB NIC, a VM's
    // management NIC) Consul would refuse to choose.
    let bind = match node.address.get_ref().parse::<Ipv4Addr>() {
        Ok(a) => a.to_string(),
        Err(_) => format!(
            "{{{{ GetPrivateInterfaces | include \"network\" \"{}\" | attr \"address\" }}}}",
            file.network.subnet.get_ref()
        ),
    };
    let mut v = json!({
        "datacenter": c.datacenter.get_ref(),
        "primary_datacenter": c.datacenter.get_ref(),
        "node_name": node.name.get_ref(),
        "data_dir": "/var/lib/consul",
        "bind_addr": bind,
        "client_addr": "127.0.0.1",
        "server": server,
        "retry_join": servers,
        "encrypt": secrets.get(label::GOSSIP)?,
        "disable_update_check": true,
        "leave_on_terminate": false,
        "rejoin_after_leave": true,
    });
    if server {
        v["bootstrap_expect"] = json!(servers.len());
    }
    if c.acl {
        let token = secrets.get(label::MANAGEMENT_TOKEN)?;
        let mut tokens = json!({ "agent": token });
        if server {
            tokens[initial_token_key(version)] = json!(token);
        }
        v["acl"] = json!({
            "enabled": true,
            "default_policy": "deny",
            "down_policy": "extend-cache",
            "enable_token_persistence": true,
            "tokens": tokens,
        });
    }
    Ok(v)
}

/// The resolved drop-in: `.consul` names go to the agent's DNS port.
pub fn resolved_dropin() -> &'static str {
    "# Written by picoimg-firstboot: .consul names are answered by the local Consul agent.\n\
     [Resolve]\nDNS=127.0.0.1:8600\nDNSSEC=false\nDomains=~consul\n"
}

/// Counts `consul operator raft list-peers` output: (voters, leader present).
pub fn raft_peers(output: &str) -> (usize, bool) {
    let mut voters = 0;
    let mut leader = false;
    for line in output.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 5 {
            continue;
        }
        if cols[3] == "leader" {
            leader = true;
        }
        if cols[4] == "true" {
            voters += 1;
        }
    }
    (voters, leader)
}

/// Whether `consul operator raft list-peers` lists the server with raft ID `id` (the agent's
/// `node-id`) as a voter. By ID, not name: a re-flashed server comes back with a new node ID
/// at the old address, and until the leader drops the old entry, that entry is listed under
/// the same name. The new one is added as a non-voter; the leader's autopilot promotes it
/// once it has been healthy for `server_stabilization_time`.
pub fn raft_voter(output: &str, id: &str) -> bool {
    !id.is_empty()
        && output.lines().skip(1).any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.get(1) == Some(&id) && cols.get(4) == Some(&"true")
        })
}

/// Where the agent keeps its node ID (`data_dir` above), which is its raft server ID.
pub const NODE_ID: &str = "var/lib/consul/node-id";

/// Whether `consul members` lists `node` as alive.
pub fn member_alive(output: &str, node: &str) -> bool {
    output.lines().skip(1).any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.first() == Some(&node) && cols.get(2) == Some(&"alive")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{check, render_init, InitOptions};
    use crate::stack::Secrets;

    fn lab() -> crate::cluster::Checked {
        let t = render_init(&InitOptions {
            name: "lab",
            nodes: 3,
            subnet: "10.42.0.0/24",
            stacks: &crate::stacks::named(&["consul"]),
        })
        .unwrap();
        check(&t).unwrap()
    }

    #[test]
    fn versions_and_token_keys() {
        let v = Version::parse("Consul v1.8.7\nRevision \nProtocol 2 spoken by default").unwrap();
        assert_eq!(v, Version(1, 8, 7));
        assert_eq!(initial_token_key(v), "master");
        let v = Version::parse("Consul v1.20.2\nRevision 33e5727a").unwrap();
        assert_eq!(initial_token_key(v), "initial_management");
        assert_eq!(
            initial_token_key(Version::parse("Consul v1.11.0+ent").unwrap()),
            "initial_management"
        );
        assert_eq!(Version::parse("nothing here"), None);
    }

    #[test]
    fn server_config_has_expect_join_encrypt_and_version_keyed_token() {
        let c = lab();
        let node = &c.file.nodes[1];
        let secrets = Secrets::of(crate::stacks::registry(), &c);
        let old = config(&c.file, node, &secrets, Version(1, 8, 7)).unwrap();
        assert_eq!(old["bootstrap_expect"], 3);
        assert_eq!(old["server"], true);
        assert_eq!(old["bind_addr"], "10.42.0.11");
        assert_eq!(
            old["retry_join"],
            json!(["10.42.0.10", "10.42.0.11", "10.42.0.12"])
        );
        assert_eq!(old["encrypt"], secrets.get(label::GOSSIP).unwrap());
        let token = secrets.get(label::MANAGEMENT_TOKEN).unwrap();
        assert_eq!(old["acl"]["default_policy"], "deny");
        assert_eq!(old["acl"]["tokens"]["master"], token);
        assert!(old["acl"]["tokens"].get("initial_management").is_none());
        let new = config(&c.file, node, &secrets, Version(1, 20, 1)).unwrap();
        assert_eq!(new["acl"]["tokens"]["initial_management"], token);
        assert!(new["acl"]["tokens"].get("master").is_none());
    }

    #[test]
    fn parses_raft_peers_and_members() {
        let peers = "Node  ID                                    Address          State     Voter  RaftProtocol\n\
                     pc0   1b1c...                               10.42.0.10:8300  leader    true   3\n\
                     pc1   2c2d...                               10.42.0.11:8300  follower  true   3\n\
                     pc2   3d3e...                               10.42.0.12:8300  follower  false  3\n";
        assert_eq!(raft_peers(peers), (2, true));
        assert!(raft_voter(peers, "1b1c..."));
        assert!(!raft_voter(peers, "3d3e..."), "listed as a non-voter");
        assert!(!raft_voter(peers, "9f9f..."), "not listed");
        assert!(!raft_voter(peers, ""), "no node ID yet");
        let members = "Node  Address          Status  Type    Build  Protocol  DC   Segment\n\
                       pc0   10.42.0.10:8301  alive   server  1.8.7  2         dc1  <all>\n\
                       pc1   10.42.0.11:8301  failed  server  1.8.7  2         dc1  <all>\n";
        assert!(member_alive(members, "pc0"));
        assert!(!member_alive(members, "pc1"));
        assert!(!member_alive(members, "pc9"));
    }
}
