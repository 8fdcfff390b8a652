//! The Consul stack on a node: `[consul]` in the cluster file, the `consul-server` and
//! `consul-client` roles, the gossip key and management token derived from the cluster secret,
//! the agent configuration step, `consul.service`, and the health check (member, leader
//! elected) with the one-time DNS policy for anonymous reads.

pub mod config;

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::agent::system::Target;
use crate::cluster::{self, ClusterFile, Node, Problem};
use crate::cmd::Cmd;
use crate::stack::{self, Ctx, Form, Memo, Progress, Raw, SecretSpec, Section, Stack, Step};

pub use config::{Role, CLIENT, SERVER};

/// The cluster file's section.
pub const SECTION: &str = "consul";
/// Where the node's Consul configuration goes. Consul reads a config directory in lexical
/// order, later files winning, so this file overrides a package's defaults (`consul.hcl`).
pub const CONFIG: &str = "etc/consul.d/50-picoimg.json";
/// systemd-resolved drop-in sending `.consul` names to the local agent.
pub const RESOLVED_DROPIN: &str = "etc/systemd/resolved.conf.d/50-picoimg-consul.conf";
/// The anonymous token's id (fixed in every Consul since 1.4).
pub const ANONYMOUS_TOKEN: &str = "00000000-0000-0000-0000-000000000002";
/// The policy that lets anonymous requests (DNS) read nodes and services, nothing else.
pub const DNS_POLICY: &str = "picoimg-dns";
pub const DNS_RULES: &str =
    "node_prefix \"\" { policy = \"read\" }\nservice_prefix \"\" { policy = \"read\" }\n";
const UNIT: &str = "consul.service";

/// HKDF labels: part of the on-disk contract; changing one changes a live cluster's keys.
pub mod label {
    pub const GOSSIP: &str = "picoimg/v1/consul/gossip-key";
    pub const MANAGEMENT_TOKEN: &str = "picoimg/v1/consul/management-token";
}

const SECRETS: &[SecretSpec] = &[
    SecretSpec {
        name: "consul-gossip-key",
        label: label::GOSSIP,
        bytes: 32,
        form: Form::Base64,
        operator: false,
        per_node: false,
    },
    SecretSpec {
        name: "consul-management-token",
        label: label::MANAGEMENT_TOKEN,
        bytes: 16,
        form: Form::Uuid,
        operator: true,
        per_node: false,
    },
];

pub struct Consul;

impl Stack for Consul {
    fn name(&self) -> &'static str {
        "consul"
    }

    fn section(&self) -> Option<&'static str> {
        Some(SECTION)
    }

    fn parse_section(&self, text: &str, value: &Raw<'_>) -> Result<Section, Vec<Problem>> {
        let s: config::Section = cluster::typed_section(text, SECTION, value)?;
        Ok(std::sync::Arc::new(s))
    }

    fn roles(&self) -> &'static [&'static str] {
        &[SERVER, CLIENT]
    }

    fn accounts(&self) -> &'static [&'static str] {
        &["consul"]
    }

    fn secrets(&self) -> &'static [SecretSpec] {
        SECRETS
    }

    fn check(&self, text: &str, file: &ClusterFile, p: &mut Vec<Problem>) {
        check(text, file, p);
    }

    fn init_section(&self) -> Option<&'static str> {
        Some(
            "[consul]\ndatacenter = \"dc1\"\n# ACLs on with default deny; the management token is derived from the secret\n# (`picoimg cluster token FILE` prints it).\nacl = true\n",
        )
    }

    /// An odd number of servers: one for 1-2 nodes, three for larger clusters.
    fn init_roles(&self, index: u32, nodes: u32) -> Vec<&'static str> {
        let servers = if nodes < 3 { 1 } else { 3 };
        vec![if index < servers { SERVER } else { CLIENT }]
    }

    fn steps<'a>(&self, ctx: &Ctx<'a>, t: &Target<'_>, memo: &mut Memo) -> Result<Vec<Step<'a>>> {
        let conf = match config::role(ctx.node) {
            Some(_) => {
                let version = version(t, memo)?;
                let json = config::config(ctx.file, ctx.node, ctx.secrets, version)?;
                Some((version, serde_json::to_string_pretty(&json)?))
            }
            None => None,
        };
        let input = stack::fingerprint(&[conf.as_ref().map_or("none", |(_, c)| c.as_str())]);
        Ok(vec![Step {
            name: "consul".into(),
            input,
            reapply: false,
            apply: Box::new(move |t: &Target<'_>| apply(t, conf)),
        }])
    }

    fn units(&self, _file: &ClusterFile, node: &Node) -> Vec<String> {
        config::role(node)
            .map(|_| UNIT.into())
            .into_iter()
            .collect()
    }

    fn health(
        &self,
        ctx: &Ctx<'_>,
        t: &Target<'_>,
        p: &mut dyn Progress,
    ) -> Result<Option<String>> {
        match config::role(ctx.node) {
            None => Ok(None),
            Some(role) => health(ctx, t, p, role).map(Some),
        }
    }
}

/// Whole-file checks: the datacenter name, an odd number of servers, servers' addresses.
fn check(text: &str, f: &ClusterFile, p: &mut Vec<Problem>) {
    if f.stacks.get_raw(SECTION).is_some() {
        let c = config::section(f);
        let dc = c.datacenter.get_ref();
        // Consul's own rule (agent/config/builder.go, Validate): ^[a-z0-9_-]+$; it also
        // becomes a DNS label (`.dc1.consul`), so at most 63 characters.
        let valid = !dc.is_empty()
            && dc.len() <= 63
            && dc
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid {
            p.push(Problem {
                line: cluster::at(text, &c.datacenter),
                field: "consul.datacenter".into(),
                message: format!(
                    "\"{}\" is not a Consul datacenter name: lowercase letters, digits, '-' and '_', 1-63 characters",
                    dc.escape_debug()
                ),
            });
        }
    }
    let mut servers = 0;
    for (i, n) in f.nodes.iter().enumerate() {
        let is_server = config::role(n) == Some(Role::Server);
        if is_server && n.address.get_ref() == "dhcp" {
            p.push(Problem {
                line: cluster::at(text, &n.address),
                field: format!("node[{i}].address"),
                message: "a consul-server needs a static address: the other nodes join the \
                          servers by address"
                    .into(),
            });
        }
        servers += usize::from(is_server);
    }
    if !stack::used(&Consul, f) {
        return;
    }
    if servers == 0 {
        p.push(Problem {
            line: 0,
            field: "node.roles".into(),
            message: "no node has the consul-server role: give it to 1, 3 or 5 nodes".into(),
        });
    }
    if servers % 2 == 0 && servers > 0 {
        p.push(Problem {
            line: 0,
            field: "node.roles".into(),
            message: format!(
                "{servers} consul-server nodes: use an odd number (1, 3, 5) so a majority survives a failure"
            ),
        });
    }
}

/// The installed Consul's version.
fn version(t: &Target<'_>, memo: &mut Memo) -> Result<config::Version> {
    stack::installed_version(
        t,
        memo,
        "usr/bin/consul",
        "consul",
        "this node has a Consul role but the image has no Consul: build it with `--stack consul` (or a stack that includes it)",
    )
}

fn apply(t: &Target<'_>, conf: Option<(config::Version, String)>) -> Result<String> {
    let Some((version, conf)) = conf else {
        return Ok("no Consul role on this node".into());
    };
    // Tokens and the gossip key: readable by root and the consul group only.
    t.write(CONFIG, &conf, 0o640)?;
    if let Some(gid) = t.gid("consul") {
        t.sys.chown(&t.p(CONFIG), 0, gid)?;
    }
    t.write(RESOLVED_DROPIN, config::resolved_dropin(), 0o644)?;
    t.sys
        .run(&Cmd::new("systemctl").args(["try-reload-or-restart", "systemd-resolved.service"]))?;
    Ok(format!(
        "Consul {version}: /{CONFIG} ({} key for the initial token)",
        config::initial_token_key(version)
    ))
}

fn health(ctx: &Ctx<'_>, t: &Target<'_>, p: &mut dyn Progress, role: Role) -> Result<String> {
    let file = ctx.file;
    let token = ctx.secrets.get(label::MANAGEMENT_TOKEN)?;
    let limit = file.firstboot.health_timeout;
    let name = ctx.node.name.get_ref();
    let consul = |args: &[&str]| {
        Cmd::new("consul")
            .args(args)
            .env("CONSUL_HTTP_TOKEN", token)
    };
    let mut last = String::new();
    // Bounded by seconds slept and by the clock, whichever is further along (the consul
    // commands themselves take time on a slow board).
    let started = Instant::now();
    let mut slept = 0;
    let mut reported = 0;
    let voters = loop {
        let members = t.sys.run(&consul(&["members"])).unwrap_or_default();
        let peers = t
            .sys
            .run(&consul(&["operator", "raft", "list-peers"]))
            .unwrap_or_default();
        let (voters, leader) = config::raft_peers(&peers);
        let member = config::member_alive(&members, name);
        // A server counts only once it votes: a re-flashed server rejoins as a non-voter and
        // the cluster has its full fault tolerance again only when autopilot promotes it.
        let voter = role != Role::Server || {
            let id = std::fs::read_to_string(t.p(config::NODE_ID)).unwrap_or_default();
            config::raft_voter(&peers, id.trim())
        };
        if member && leader && voter {
            break voters;
        }
        let now_state = format!(
            "{}; {voters} raft voter(s), {}{}",
            if member { "member" } else { "not yet a member" },
            if leader {
                "leader elected"
            } else {
                "no leader yet"
            },
            if voter || !(member && leader) {
                ""
            } else {
                "; this server is not yet a voter (the leader promotes a healthy server after server_stabilization_time)"
            }
        );
        let waited = slept.max(started.elapsed().as_secs());
        if now_state != last || waited >= reported + 60 {
            reported = waited;
            p.say(format!(
                "picoimg: waiting for consul ({waited} s): {now_state}"
            ));
            last = now_state;
        }
        if waited >= limit {
            bail!(
                "consul not healthy after {limit} s ({last}): are the servers ({}) powered and on the network?",
                config::server_addresses(file).join(", ")
            );
        }
        t.sys.sleep(Duration::from_secs(2));
        slept += 2;
    };
    if config::section(file).acl && role == Role::Server {
        p.once(
            "consul-dns-policy",
            &stack::fingerprint(&[DNS_RULES]),
            &mut || {
                dns_policy(t, token)?;
                Ok("anonymous requests may read nodes and services (DNS), nothing else".into())
            },
        )?;
    }
    Ok(format!(
        "consul {}, leader elected, {voters} raft voter(s)",
        if role == Role::Server {
            "server: member and voter"
        } else {
            "client: member"
        },
    ))
}

/// Lets `.consul` DNS work under default-deny ACLs: a read-only policy on the anonymous
/// token. Every server tries; the second one finds the policy there already.
fn dns_policy(t: &Target<'_>, token: &str) -> Result<()> {
    let consul = |args: &[&str]| {
        Cmd::new("consul")
            .args(args)
            .env("CONSUL_HTTP_TOKEN", token)
    };
    let mut last = None;
    for _ in 0..10 {
        let created = t.sys.run(&consul(&[
            "acl",
            "policy",
            "create",
            "-name",
            DNS_POLICY,
            "-description",
            "picoimg: DNS reads for anonymous requests",
            "-rules",
            DNS_RULES,
        ]));
        let exists = match &created {
            Ok(_) => true,
            Err(e) => format!("{e:#}").contains("already exists"),
        };
        if exists {
            match t.sys.run(&consul(&[
                "acl",
                "token",
                "update",
                "-id",
                ANONYMOUS_TOKEN,
                "-policy-name",
                DNS_POLICY,
                "-description",
                "Anonymous Token (picoimg: DNS reads)",
            ])) {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        } else if let Err(e) = created {
            last = Some(e);
        }
        t.sys.sleep(Duration::from_secs(3));
    }
    Err(last
        .unwrap_or_else(|| anyhow!("no attempt made"))
        .context("giving the anonymous token the DNS policy"))
}

#[cfg(test)]
mod tests;
