//! The Nomad stack on a node: `[nomad]` in the cluster file, the `nomad-server` and
//! `nomad-client` roles (a node may hold both), keys derived from the cluster secret (gossip
//! key, ACL root token, the Consul tokens Nomad's agents register with), the agent
//! configuration step, `nomad.service`, and the health check: the agents' Consul tokens made
//! once, the ACL system bootstrapped with the derived root token by whichever server gets there
//! first, then servers alive with a leader and this client `ready`.

pub mod config;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::agent::http::Request;
use crate::agent::system::Target;
use crate::cluster::{self, ClusterFile, Node, Problem};
use crate::cmd::Cmd;
use crate::stack::{
    self, Ctx, Form, Memo, Progress, Raw, SecretSpec, Secrets, Section, Stack, Step,
};
use crate::stacks::consul;

pub use config::{CLIENT, SERVER};

/// The cluster file's section.
pub const SECTION: &str = "nomad";
/// The node's Nomad configuration. Nomad merges the files of /etc/nomad.d in lexical order;
/// the component replaces the package's nomad.hcl (which enables a single-node server and
/// client, something a later file cannot switch off) with one that sets nothing else.
pub const CONFIG: &str = "etc/nomad.d/50-picoimg.json";
const UNIT: &str = "nomad.service";
/// Nomad's and Consul's HTTP ports on the node.
const NOMAD_HTTP: u16 = 4646;
const CONSUL_HTTP: u16 = 8500;
/// The Consul policies Nomad's agents get.
pub const CONSUL_SERVER_POLICY: &str = "picoimg-nomad-server";
pub const CONSUL_CLIENT_POLICY: &str = "picoimg-nomad-client";

/// HKDF labels: part of the on-disk contract; changing one changes a live cluster's keys.
pub mod label {
    pub const GOSSIP: &str = "picoimg/v1/nomad/gossip-key";
    pub const ROOT_TOKEN: &str = "picoimg/v1/nomad/root-token";
    pub const CONSUL_SERVER_SECRET: &str = "picoimg/v1/nomad/consul-server-token";
    pub const CONSUL_SERVER_ACCESSOR: &str = "picoimg/v1/nomad/consul-server-accessor";
    pub const CONSUL_CLIENT_SECRET: &str = "picoimg/v1/nomad/consul-client-token";
    pub const CONSUL_CLIENT_ACCESSOR: &str = "picoimg/v1/nomad/consul-client-accessor";
}

const fn uuid(name: &'static str, label: &'static str, operator: bool) -> SecretSpec {
    SecretSpec {
        name,
        label,
        bytes: 16,
        form: Form::Uuid,
        operator,
        per_node: false,
    }
}

const SECRETS: &[SecretSpec] = &[
    // Nomad decodes `encrypt` with standard base64 (ServerConfig.EncryptBytes): 32 bytes.
    SecretSpec {
        name: "nomad-gossip-key",
        label: label::GOSSIP,
        bytes: 32,
        form: Form::Base64,
        operator: false,
        per_node: false,
    },
    // `nomad acl bootstrap` accepts only a UUID (nomad/acl_endpoint.go, helper.IsUUID).
    uuid("nomad-root-token", label::ROOT_TOKEN, true),
    uuid(
        "nomad-consul-server-token",
        label::CONSUL_SERVER_SECRET,
        false,
    ),
    uuid(
        "nomad-consul-server-accessor",
        label::CONSUL_SERVER_ACCESSOR,
        false,
    ),
    uuid(
        "nomad-consul-client-token",
        label::CONSUL_CLIENT_SECRET,
        false,
    ),
    uuid(
        "nomad-consul-client-accessor",
        label::CONSUL_CLIENT_ACCESSOR,
        false,
    ),
];

pub struct Nomad;

impl Stack for Nomad {
    fn name(&self) -> &'static str {
        "nomad"
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
        &["nomad", "docker"]
    }

    fn secrets(&self) -> &'static [SecretSpec] {
        SECRETS
    }

    fn check(&self, text: &str, file: &ClusterFile, p: &mut Vec<Problem>) {
        check(text, file, p);
    }

    fn warnings(&self, _text: &str, file: &ClusterFile) -> Vec<Problem> {
        let servers = config::server_addresses(file).len();
        if servers == 1 {
            vec![Problem {
                line: 0,
                field: "node.roles".into(),
                message: "one nomad-server: the cluster has no quorum to survive its loss; 3 \
                          servers tolerate one failure"
                    .into(),
            }]
        } else {
            Vec::new()
        }
    }

    fn init_section(&self) -> Option<&'static str> {
        Some(
            "[nomad]\ndatacenter = \"dc1\"\nregion = \"global\"\n# ACLs are on; the root token is derived from the secret\n# (`picoimg cluster token FILE nomad-root-token` prints it).\n",
        )
    }

    /// Servers where Consul has its servers (an odd number), every node a client.
    fn init_roles(&self, index: u32, nodes: u32) -> Vec<&'static str> {
        let servers = if nodes < 3 { 1 } else { 3 };
        if index < servers {
            vec![SERVER, CLIENT]
        } else {
            vec![CLIENT]
        }
    }

    fn steps<'a>(&self, ctx: &Ctx<'a>, t: &Target<'_>, memo: &mut Memo) -> Result<Vec<Step<'a>>> {
        let r = config::roles(ctx.node);
        let conf = if r.any() {
            let version = version(t, memo)?;
            let token = ctx.secrets.get(if r.server {
                label::CONSUL_SERVER_SECRET
            } else {
                label::CONSUL_CLIENT_SECRET
            })?;
            let json = config::config(ctx.file, ctx.node, ctx.secrets, token)?;
            Some((version, serde_json::to_string_pretty(&json)?))
        } else {
            None
        };
        let input = stack::fingerprint(&[conf.as_ref().map_or("none", |(_, c)| c.as_str())]);
        Ok(vec![Step {
            name: "nomad".into(),
            input,
            reapply: false,
            apply: Box::new(move |t: &Target<'_>| apply(t, conf)),
        }])
    }

    fn units(&self, _file: &ClusterFile, node: &Node) -> Vec<String> {
        config::roles(node)
            .any()
            .then(|| UNIT.to_owned())
            .into_iter()
            .collect()
    }

    fn health(
        &self,
        ctx: &Ctx<'_>,
        t: &Target<'_>,
        p: &mut dyn Progress,
    ) -> Result<Option<String>> {
        let r = config::roles(ctx.node);
        if !r.any() {
            return Ok(None);
        }
        health(ctx, t, p, r).map(Some)
    }
}

/// Whole-file checks: an odd number of servers (at least one), servers' addresses, a Consul
/// agent on every Nomad node (Nomad registers through the local agent), the section's names.
fn check(text: &str, f: &ClusterFile, p: &mut Vec<Problem>) {
    if f.stacks.get_raw(SECTION).is_some() {
        let s = config::section(f);
        for (key, v) in [("datacenter", &s.datacenter), ("region", &s.region)] {
            let ok = !v.get_ref().is_empty()
                && v.get_ref().len() <= 63
                && v.get_ref()
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                p.push(Problem {
                    line: cluster::at(text, v),
                    field: format!("nomad.{key}"),
                    message: format!(
                        "\"{}\" is not a Nomad {key} name here: letters, digits, '-' and '_', 1-63 characters",
                        v.get_ref().escape_debug()
                    ),
                });
            }
        }
    }
    let mut servers = 0;
    for (i, n) in f.nodes.iter().enumerate() {
        let r = config::roles(n);
        if r.server && n.address.get_ref() == "dhcp" {
            p.push(Problem {
                line: cluster::at(text, &n.address),
                field: format!("node[{i}].address"),
                message: "a nomad-server needs a static address: the other nodes join the \
                          servers by address"
                    .into(),
            });
        }
        if r.any() && consul::config::role(n).is_none() {
            p.push(Problem {
                line: cluster::at(text, &n.name),
                field: format!("node[{i}].roles"),
                message: "a Nomad node also needs a Consul agent (Nomad registers its services \
                          through the local one): add \"consul-client\" (or \"consul-server\")"
                    .into(),
            });
        }
        servers += usize::from(r.server);
    }
    if !stack::used(&Nomad, f) {
        return;
    }
    if servers == 0 {
        p.push(Problem {
            line: 0,
            field: "node.roles".into(),
            message: "no node has the nomad-server role: give it to 1, 3 or 5 nodes".into(),
        });
    } else if servers % 2 == 0 {
        p.push(Problem {
            line: 0,
            field: "node.roles".into(),
            message: format!(
                "{servers} nomad-server nodes: use an odd number (1, 3, 5) so a majority survives a failure"
            ),
        });
    }
}

/// The installed Nomad's version; older than 1.3.2 cannot take the derived root token.
fn version(t: &Target<'_>, memo: &mut Memo) -> Result<config::Version> {
    let v = stack::installed_version(
        t,
        memo,
        "usr/bin/nomad",
        "nomad",
        "this node has a Nomad role but the image has no Nomad: build it with `--stack nomad`",
    )?;
    if v < config::BOOTSTRAP_SECRET {
        bail!(
            "Nomad {v} cannot take a derived ACL root token (it needs {} or later): build with a newer Nomad",
            config::BOOTSTRAP_SECRET
        );
    }
    Ok(v)
}

fn apply(t: &Target<'_>, conf: Option<(config::Version, String)>) -> Result<String> {
    let Some((version, conf)) = conf else {
        return Ok("no Nomad role on this node".into());
    };
    // The gossip key and the Consul token: root and the nomad group only.
    t.write(CONFIG, &conf, 0o640)?;
    if let Some(gid) = t.gid("nomad") {
        t.sys.chown(&t.p(CONFIG), 0, gid)?;
    }
    Ok(format!("Nomad {version}: /{CONFIG}"))
}

fn health(ctx: &Ctx<'_>, t: &Target<'_>, p: &mut dyn Progress, r: config::Roles) -> Result<String> {
    let limit = ctx.file.firstboot.health_timeout;
    let root = ctx.secrets.get(label::ROOT_TOKEN)?;
    // 1. The Consul token Nomad's agent registers with (Consul is healthy: its check ran first).
    if consul::config::section(ctx.file).acl {
        let token = ConsulToken::plan(t, ctx.secrets, r.server)?;
        p.once(
            &format!("nomad-consul-{}-token", token.role),
            &stack::fingerprint(&[&token.rules]),
            &mut || token.make(t),
        )?;
    }
    // 2. The ACL system, bootstrapped with the derived root token by the first server.
    if r.server {
        p.once(
            "nomad-acl-bootstrap",
            &stack::fingerprint(&["bootstrap"]),
            &mut || bootstrap(t, limit, root),
        )?;
    }
    // 3. Servers alive with a leader; this client ready.
    let expect = config::server_addresses(ctx.file).len();
    let nomad = |args: &[&str]| Cmd::new("nomad").args(args).env("NOMAD_TOKEN", root);
    let name = ctx.node.name.get_ref().clone();
    let (alive, _) = stack::wait("nomad servers", limit, 2, t, p, || {
        let out = t
            .sys
            .run(&nomad(&["server", "members"]))
            .unwrap_or_default();
        let (alive, leader) = config::servers_alive(&out);
        Ok(if alive >= expect && leader {
            Ok((alive, leader))
        } else {
            Err(format!(
                "{alive} of {expect} server(s) alive, {}",
                if leader {
                    "leader elected"
                } else {
                    "no leader yet"
                }
            ))
        })
    })
    .map_err(|e| {
        e.context(format!(
            "are the nomad servers ({}) powered and on the network?",
            config::server_addresses(ctx.file).join(", ")
        ))
    })?;
    if r.client {
        stack::wait("this nomad client", limit, 2, t, p, || {
            let out = t.sys.run(&nomad(&["node", "status"])).unwrap_or_default();
            Ok(match config::node_status(&out, &name) {
                Some(s) if s == "ready" => Ok(()),
                Some(s) => Err(format!("node {name} is {s}")),
                None => Err(format!("node {name} not registered yet")),
            })
        })?;
    }
    Ok(format!(
        "nomad {}: {alive} server(s) alive, leader elected{}",
        match (r.server, r.client) {
            (true, true) => "server and client",
            (true, false) => "server",
            _ => "client",
        },
        if r.client { ", client ready" } else { "" }
    ))
}

/// Bootstraps Nomad's ACL system with the derived root token (`POST /v1/acl/bootstrap` with
/// `BootstrapSecret`, Nomad 1.3.2+; the token travels in the body, never on a command line),
/// until it succeeds or says it was done already; "No cluster leader" (or no answer yet) is
/// retried within `limit` seconds.
fn bootstrap(t: &Target<'_>, limit: u64, root: &str) -> Result<String> {
    let body = serde_json::json!({ "BootstrapSecret": root }).to_string();
    let req = Request {
        method: "POST",
        port: NOMAD_HTTP,
        path: "/v1/acl/bootstrap",
        headers: Vec::new(),
        body: &body,
    };
    let started = Instant::now();
    let mut slept = 0;
    loop {
        let last = match t.sys.http(&req) {
            Ok(r) if r.status == 200 => {
                return Ok("ACL system bootstrapped with the derived root token".into())
            }
            Ok(r) if r.body.contains("bootstrap already done") => {
                return Ok("ACL system already bootstrapped (by another server)".into())
            }
            Ok(r) => format!("HTTP {}: {}", r.status, r.body.trim()),
            Err(e) => format!("{e:#}"),
        };
        if slept.max(started.elapsed().as_secs()) >= limit {
            bail!("bootstrapping Nomad's ACLs: still failing after {limit} s: {last}");
        }
        t.sys.sleep(Duration::from_secs(3));
        slept += 3;
    }
}

/// The Consul policy and token Nomad's servers (or clients) register with: the token's ids are
/// derived, so every node of a kind makes the same one and whichever comes first creates it.
/// Everything goes over Consul's HTTP API on 127.0.0.1:8500 with the derived management token
/// in a header (no secret on a command line).
pub struct ConsulToken<'a> {
    /// "server" or "client".
    pub role: &'static str,
    pub policy: &'static str,
    /// The policy's rules, for this Consul's version.
    pub rules: String,
    /// The running Consul's version, when it said.
    pub consul: Option<stack::Version>,
    management: &'a str,
    secret: &'a str,
    accessor: &'a str,
}

impl<'a> ConsulToken<'a> {
    /// Asks the local Consul for its version (the rules depend on it) and picks the ids.
    pub fn plan(t: &Target<'_>, secrets: &'a Secrets, server: bool) -> Result<ConsulToken<'a>> {
        let management = secrets.get(consul::label::MANAGEMENT_TOKEN)?;
        let (role, policy, secret, accessor) = if server {
            (
                "server",
                CONSUL_SERVER_POLICY,
                label::CONSUL_SERVER_SECRET,
                label::CONSUL_SERVER_ACCESSOR,
            )
        } else {
            (
                "client",
                CONSUL_CLIENT_POLICY,
                label::CONSUL_CLIENT_SECRET,
                label::CONSUL_CLIENT_ACCESSOR,
            )
        };
        let consul = t
            .sys
            .http(&consul_request("GET", "/v1/agent/self", management, ""))
            .ok()
            .filter(|r| r.status == 200)
            .and_then(|r| config::consul_version(&r.body));
        Ok(ConsulToken {
            role,
            policy,
            rules: config::consul_rules(server, consul.map(|v| (v.0, v.1))),
            consul,
            management,
            secret: secrets.get(secret)?,
            accessor: secrets.get(accessor)?,
        })
    }

    /// Creates the policy (`PUT /v1/acl/policy`) and the token with the derived ids
    /// (`PUT /v1/acl/token`). Either one being there already counts as done: another node made
    /// it first.
    pub fn make(&self, t: &Target<'_>) -> Result<String> {
        let policy = serde_json::json!({
            "Name": self.policy,
            "Description": "picoimg: Nomad agents",
            "Rules": self.rules,
        })
        .to_string();
        let r = t.sys.http(&consul_request(
            "PUT",
            "/v1/acl/policy",
            self.management,
            &policy,
        ))?;
        // Consul refuses a second policy of one name with "... already exists" (tier 4 makes
        // each policy twice against Consul 1.8.7 on a booted node).
        if r.status != 200 && !r.body.contains("already exists") {
            bail!(
                "creating the Consul policy {}: HTTP {}: {}",
                self.policy,
                r.status,
                r.body.trim()
            );
        }
        let token = serde_json::json!({
            "AccessorID": self.accessor,
            "SecretID": self.secret,
            "Description": "picoimg: Nomad agents",
            "Policies": [{ "Name": self.policy }],
        })
        .to_string();
        let r = t.sys.http(&consul_request(
            "PUT",
            "/v1/acl/token",
            self.management,
            &token,
        ))?;
        // Consul refuses a second token with the same ids: 500 "Invalid Token: AccessorID is
        // already in use" (Consul 1.8.7, seen on a booted node).
        if r.status != 200
            && !r.body.contains("already in use")
            && !r.body.contains("already exists")
        {
            bail!(
                "creating the Consul token for Nomad (policy {}): HTTP {}: {}",
                self.policy,
                r.status,
                r.body.trim()
            );
        }
        Ok(format!(
            "Consul token for Nomad {}s (policy {}{}) in place",
            self.role,
            self.policy,
            self.consul
                .map(|v| format!(", Consul {v}"))
                .unwrap_or_default()
        ))
    }
}

fn consul_request<'a>(
    method: &'a str,
    path: &'a str,
    token: &'a str,
    body: &'a str,
) -> Request<'a> {
    Request {
        method,
        port: CONSUL_HTTP,
        path,
        headers: vec![("X-Consul-Token", token)],
        body,
    }
}

#[cfg(test)]
mod tests;
