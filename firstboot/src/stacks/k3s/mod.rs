//! The K3s stack on a node: `[k3s]` in the cluster file, the `k3s-server` and `k3s-agent`
//! roles, the join tokens derived from the cluster secret, a step that checks the image's K3s,
//! and the health phase: the node decides how its K3s starts (the first server in file order
//! founds the cluster unless another server already answers; everyone else waits for a server
//! and joins it, one at a time), writes `/etc/rancher/k3s/config.yaml` (0600), starts K3s once
//! and waits until its node is Ready (a server: every server Ready and as many etcd members).

pub mod config;
pub mod pki;

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::agent::system::Target;
use crate::cluster::{self, ClusterFile, Node, Problem};
use crate::cmd::Cmd;
use crate::stack::{self, Ctx, Form, Memo, Progress, Raw, SecretSpec, Section, Stack, Step};

pub use config::{Mode, Role, AGENT, SERVER};

/// The cluster file's section.
pub const SECTION: &str = "k3s";
/// K3s's configuration file (its default `--config`).
pub const CONFIG: &str = "etc/rancher/k3s/config.yaml";
/// Where the k3s component installs the binary (as K3s's install script does).
pub const BINARY: &str = "usr/local/bin/k3s";
/// A server's embedded etcd: once it exists, K3s ignores `cluster-init` and `server`
/// (k3s-io/k3s docs, datastore/ha-embedded.md).
pub const DATASTORE: &str = "var/lib/rancher/k3s/server/db/etcd";
/// The kubelet's kubeconfig on every K3s node (pkg/agent/config/config.go): an agent reads its
/// own Node object with it.
pub const KUBELET_KUBECONFIG: &str = "/var/lib/rancher/k3s/agent/kubelet.kubeconfig";
pub const SERVER_UNIT: &str = "k3s.service";
pub const AGENT_UNIT: &str = "k3s-agent.service";
/// Seconds between two looks for an answering server.
const PROBE_EVERY: u64 = 5;

/// HKDF labels: part of the on-disk contract; changing one changes a live cluster's tokens.
pub mod label {
    pub const TOKEN: &str = "picoimg/v1/k3s/token";
    pub const AGENT_TOKEN: &str = "picoimg/v1/k3s/agent-token";
}

/// K3s tokens: hex of 32 derived bytes. A short token of any characters is allowed; the
/// `xxxxxx.yyyyyyyyyyyyyyyy` shape would be read as a bootstrap token (k3s docs, cli/token.md;
/// k3s-io/k3s issue 7313), which 64 hex characters can never be.
const SECRETS: &[SecretSpec] = &[
    SecretSpec {
        name: "k3s-token",
        label: label::TOKEN,
        bytes: 32,
        form: Form::Hex,
        operator: false,
        per_node: false,
    },
    SecretSpec {
        name: "k3s-agent-token",
        label: label::AGENT_TOKEN,
        bytes: 32,
        form: Form::Hex,
        operator: false,
        per_node: false,
    },
    key_secret("k3s-server-ca-key", pki::AUTHORITIES[0].label),
    key_secret("k3s-client-ca-key", pki::AUTHORITIES[1].label),
    key_secret("k3s-request-header-ca-key", pki::AUTHORITIES[2].label),
    key_secret("k3s-etcd-server-ca-key", pki::AUTHORITIES[3].label),
    key_secret("k3s-etcd-peer-ca-key", pki::AUTHORITIES[4].label),
    key_secret("k3s-service-account-key", pki::SERVICE_KEY_LABEL),
    key_secret("k3s-admin-key", pki::ADMIN_KEY_LABEL),
];

/// A P-256 private key (PEM) derived from its own label (`pki`).
const fn key_secret(name: &'static str, label: &'static str) -> SecretSpec {
    SecretSpec {
        name,
        label,
        bytes: 32,
        form: Form::Custom(pki::key_pem),
        operator: false,
        per_node: false,
    }
}

/// Writes K3s's CAs and service-account key, derived, where K3s looks for them before it
/// makes its own (the node that founds the cluster; the others receive them from the
/// datastore when they join). Certificates 0644, keys 0600, as K3s writes them.
fn place_authorities(ctx: &Ctx<'_>, t: &Target<'_>) -> Result<()> {
    for ca in pki::AUTHORITIES {
        let key = ctx.secrets.get(ca.label)?;
        let cert = pki::ca_cert_pem(&ca, key)?;
        t.write(&format!("{}/{}.crt", pki::TLS_DIR, ca.file), &cert, 0o644)?;
        t.write(&format!("{}/{}.key", pki::TLS_DIR, ca.file), key, 0o600)?;
    }
    let service = ctx.secrets.get(pki::SERVICE_KEY_LABEL)?;
    t.write(&format!("{}/service.key", pki::TLS_DIR), service, 0o600)
}

pub struct K3s;

impl Stack for K3s {
    fn name(&self) -> &'static str {
        "k3s"
    }

    fn section(&self) -> Option<&'static str> {
        Some(SECTION)
    }

    fn parse_section(&self, text: &str, value: &Raw<'_>) -> Result<Section, Vec<Problem>> {
        let s: config::Section = cluster::typed_section(text, SECTION, value)?;
        Ok(std::sync::Arc::new(s))
    }

    fn roles(&self) -> &'static [&'static str] {
        &[SERVER, AGENT]
    }

    fn secrets(&self) -> &'static [SecretSpec] {
        SECRETS
    }

    fn check(&self, text: &str, file: &ClusterFile, p: &mut Vec<Problem>) {
        check(text, file, p);
    }

    fn warnings(&self, _text: &str, file: &ClusterFile) -> Vec<Problem> {
        if config::servers(file).len() == 1 {
            vec![Problem {
                line: 0,
                field: "node.roles".into(),
                message: "one k3s-server: etcd has no quorum to survive its loss; 3 servers \
                          tolerate one failure"
                    .into(),
            }]
        } else {
            Vec::new()
        }
    }

    fn init_section(&self) -> Option<&'static str> {
        Some(
            "[k3s]\n# The join tokens and K3s's CAs are derived from the secret; the first k3s-server founds\n# the cluster. `picoimg cluster kubeconfig FILE` gives an admin kubeconfig.\n# Pod network: K3s's default 10.42.0.0/16 would overlap picoimg's default node subnet.\ncluster_cidr = \"10.52.0.0/16\"\n# service_cidr = \"10.43.0.0/16\"\n# disable = [\"traefik\"]\n# tls_san = [\"k3s.example.lan\"]\n",
        )
    }

    /// Three servers where there are three nodes (one below), agents on the rest.
    fn init_roles(&self, index: u32, nodes: u32) -> Vec<&'static str> {
        let servers = if nodes < 3 { 1 } else { 3 };
        vec![if index < servers { SERVER } else { AGENT }]
    }

    fn steps<'a>(&self, ctx: &Ctx<'a>, _t: &Target<'_>, _memo: &mut Memo) -> Result<Vec<Step<'a>>> {
        let role = config::role(ctx.node);
        let s = config::section(ctx.file);
        let pin = s.version.as_ref().map(|v| v.get_ref().clone());
        let input = stack::fingerprint(&[
            role.map_or("none", Role::name),
            pin.as_deref().unwrap_or(""),
        ]);
        Ok(vec![Step {
            name: "k3s".into(),
            input,
            reapply: true,
            apply: Box::new(move |t: &Target<'_>| installed(t, role, pin.as_deref())),
        }])
    }

    /// None: the health phase starts K3s once it knows how (found or join).
    fn units(&self, _file: &ClusterFile, _node: &Node) -> Vec<String> {
        Vec::new()
    }

    fn health(
        &self,
        ctx: &Ctx<'_>,
        t: &Target<'_>,
        p: &mut dyn Progress,
    ) -> Result<Option<String>> {
        let Some(role) = config::role(ctx.node) else {
            return Ok(None);
        };
        health(ctx, t, p, role).map(Some)
    }
}

/// Whole-file checks: an odd number of servers (at least one), servers' addresses, one K3s
/// role a node, the section's values.
fn check(text: &str, f: &ClusterFile, p: &mut Vec<Problem>) {
    if stack::used(&K3s, f) {
        check_section(text, f, p);
    }
    let mut servers = 0;
    let mut agents = 0;
    for (i, n) in f.nodes.iter().enumerate() {
        let has = |r: &str| n.roles.iter().any(|x| x.get_ref() == r);
        if has(SERVER) && has(AGENT) {
            p.push(Problem {
                line: cluster::at(text, &n.name),
                field: format!("node[{i}].roles"),
                message: "a k3s-server runs an agent itself: give the node \"k3s-server\" or \
                          \"k3s-agent\", not both"
                    .into(),
            });
        }
        match config::role(n) {
            Some(Role::Server) => {
                servers += 1;
                if n.address.get_ref() == "dhcp" {
                    p.push(Problem {
                        line: cluster::at(text, &n.address),
                        field: format!("node[{i}].address"),
                        message: "a k3s-server needs a static address: the other nodes join \
                                  the servers by address"
                            .into(),
                    });
                }
            }
            Some(Role::Agent) => agents += 1,
            None => {}
        }
    }
    if !stack::used(&K3s, f) {
        return;
    }
    if servers == 0 {
        p.push(Problem {
            line: 0,
            field: "node.roles".into(),
            message: format!(
                "no node has the k3s-server role{}: give it to 1, 3 or 5 nodes",
                if agents > 0 {
                    " (agents join a server)"
                } else {
                    ""
                }
            ),
        });
    } else if servers % 2 == 0 {
        p.push(Problem {
            line: 0,
            field: "node.roles".into(),
            message: format!(
                "{servers} k3s-server nodes: use an odd number (1, 3, 5) so etcd keeps a majority through a failure"
            ),
        });
    }
}

fn check_section(text: &str, f: &ClusterFile, p: &mut Vec<Problem>) {
    let s = config::section(f);
    let mut push = |line: usize, field: &str, message: String| {
        p.push(Problem {
            line,
            field: format!("k3s.{field}"),
            message,
        })
    };
    if let Some(v) = &s.version {
        if !config::version_ok(v.get_ref()) {
            push(
                cluster::at(text, v),
                "version",
                format!(
                    "\"{}\" is not a K3s release name: write it as K3s tags it, such as \"v1.31.4+k3s1\"",
                    v.get_ref().escape_debug()
                ),
            );
        }
    }
    let subnet = cluster::Subnet::parse(f.network.subnet.get_ref());
    // Each network with its line (0: K3s's default, the file does not set it).
    let mut nets = Vec::new();
    for (key, given, value) in [
        ("cluster_cidr", &s.cluster_cidr, s.cluster_cidr()),
        ("service_cidr", &s.service_cidr, s.service_cidr()),
    ] {
        let line = given.as_ref().map_or(0, |v| cluster::at(text, v));
        match cluster::Subnet::parse(value) {
            Some(n) => nets.push((key, line, n)),
            None => push(
                line,
                key,
                format!(
                    "\"{}\" is not an IPv4 network: write it as a.b.c.d/len with the host bits zero (len 8-30)",
                    value.escape_debug()
                ),
            ),
        }
    }
    if let [(a, la, na), (b, lb, nb)] = nets[..] {
        if na.overlaps(nb) {
            // Said where the file sets one (the service network if both are set).
            let (field, line, other) = if lb > 0 || la == 0 {
                (b, lb, a)
            } else {
                (a, la, b)
            };
            push(
                line,
                field,
                format!("overlaps {other}: pods and services need separate networks"),
            );
        }
    }
    if let Some(subnet) = subnet {
        for (key, line, n) in &nets {
            if n.overlaps(subnet) {
                push(
                    *line,
                    key,
                    format!(
                        "{}overlaps the nodes' network {}: {} (K3s routes this range inside the cluster)",
                        if *line == 0 { "K3s's default " } else { "" },
                        f.network.subnet.get_ref(),
                        if *line == 0 {
                            format!("set [k3s] {key} to a free range, such as \"10.52.0.0/16\"")
                        } else {
                            "pick another".to_owned()
                        }
                    ),
                );
            }
        }
    }
    if let Some(d) = &s.cluster_domain {
        if !config::san_ok(d.get_ref()) || d.get_ref().parse::<std::net::Ipv4Addr>().is_ok() {
            push(
                cluster::at(text, d),
                "cluster_domain",
                format!(
                    "\"{}\" is not a DNS domain (letters, digits and '-' in dot-separated labels)",
                    d.get_ref().escape_debug()
                ),
            );
        }
    }
    for d in &s.disable {
        if !config::DISABLE_ITEMS.contains(&d.get_ref().as_str()) {
            push(
                cluster::at(text, d),
                "disable",
                format!(
                    "\"{}\" is not a component K3s can leave out: one of {}",
                    d.get_ref().escape_debug(),
                    config::DISABLE_ITEMS.join(", ")
                ),
            );
        }
    }
    for n in &s.tls_san {
        if !config::san_ok(n.get_ref()) {
            push(
                cluster::at(text, n),
                "tls_san",
                format!(
                    "\"{}\" is neither a DNS name nor an IPv4 address",
                    n.get_ref().escape_debug()
                ),
            );
        }
    }
    if let Some(w) = &s.init_wait {
        if !(10..=3600).contains(w.get_ref()) {
            push(
                cluster::at(text, w),
                "init_wait",
                "seconds between 10 and 3600: longer than the other servers take to boot".into(),
            );
        }
    }
}

/// The step: the image has K3s (the release the file pins, if it pins one).
fn installed(t: &Target<'_>, role: Option<Role>, pin: Option<&str>) -> Result<String> {
    let Some(role) = role else {
        return Ok("no K3s role on this node".into());
    };
    if !t.p(BINARY).exists() {
        bail!(
            "this node has a K3s role but the image has no /{BINARY}: build it with `--stack k3s`"
        );
    }
    let out = t
        .sys
        .run(&Cmd::new(format!("/{BINARY}")).arg("--version"))?;
    let release = config::installed_release(&out)
        .with_context(|| format!("cannot read the release from `k3s --version`: {out}"))?
        .to_owned();
    if let Some(pin) = pin {
        if pin != release {
            bail!(
                "the cluster file pins K3s {pin} ([k3s] version) but this image has {release}: \
                 flash an image built with {pin}, or change the pin"
            );
        }
    }
    Ok(format!(
        "K3s {release} ({}); it starts once the node knows whether to found or join",
        role.name()
    ))
}

/// The servers among `peers` that accept a connection on K3s's port now.
fn answering(t: &Target<'_>, peers: &[String]) -> Vec<String> {
    peers
        .iter()
        .filter(|a| t.sys.reachable(a, config::API_PORT, Duration::from_secs(3)))
        .cloned()
        .collect()
}

/// How this node's K3s starts (see [`config::decide`]), waiting as the rule says: the
/// initialiser listens `init_wait` seconds for a running cluster; every other node waits
/// (bounded by the health timeout) for a server, then its turn to join.
fn decide(ctx: &Ctx<'_>, t: &Target<'_>, p: &mut dyn Progress) -> Result<Mode> {
    let file = ctx.file;
    let node = ctx.node;
    let peers = config::peers(file, node);
    let init = config::initialiser(file).context("no k3s-server in the cluster file")?;
    if init.name.get_ref() == node.name.get_ref() {
        if t.p(DATASTORE).exists() {
            // This node's etcd exists: K3s starts from it and ignores cluster-init.
            return Ok(Mode::Init);
        }
        let wait = config::section(file).init_wait();
        let mut waited = 0;
        loop {
            let found = answering(t, &peers);
            if let Some(mode) = config::decide(file, node, &found).filter(|m| *m != Mode::Init) {
                return Ok(mode);
            }
            if peers.is_empty() || waited >= wait {
                return Ok(Mode::Init);
            }
            if waited % 30 == 0 {
                p.say(format!(
                    "picoimg: k3s: looking for a running cluster before founding one ({waited} of {wait} s): no other server ({}) answers on port {}",
                    peers.join(", "),
                    config::API_PORT
                ));
            }
            t.sys.sleep(Duration::from_secs(PROBE_EVERY));
            waited += PROBE_EVERY;
        }
    }
    let limit = file.firstboot.health_timeout;
    let mode = stack::wait("a K3s server to join", limit, PROBE_EVERY, t, p, || {
        let found = answering(t, &peers);
        Ok(config::decide(file, node, &found).ok_or_else(|| {
            format!(
                "no server answers on port {} yet (asked {})",
                config::API_PORT,
                peers.join(", ")
            )
        }))
    })?;
    let delay = config::join_delay(file, node);
    if delay > 0 {
        p.say(format!(
            "picoimg: k3s: joining in {delay} s (one node at a time, in file order)"
        ));
        t.sys.sleep(Duration::from_secs(delay));
    }
    Ok(mode)
}

/// What a written config.yaml says about how K3s starts.
fn written_mode(text: &str) -> Option<Mode> {
    text.lines().find_map(|l| {
        if l.trim() == "cluster-init: true" {
            return Some(Mode::Init);
        }
        let url: String = serde_json::from_str(l.strip_prefix("server: ")?).ok()?;
        let host = url.strip_prefix("https://")?.rsplit_once(':')?.0.to_owned();
        Some(Mode::Join(host))
    })
}

fn health(ctx: &Ctx<'_>, t: &Target<'_>, p: &mut dyn Progress, role: Role) -> Result<String> {
    let file = ctx.file;
    let name = ctx.node.name.get_ref();
    // 1. How K3s starts: decided once, then kept (K3s keeps its datastore either way).
    let mode = match std::fs::read_to_string(t.p(CONFIG))
        .ok()
        .and_then(|text| written_mode(&text))
    {
        Some(m) => m,
        None => {
            let mode = decide(ctx, t, p)?;
            if mode == Mode::Init {
                place_authorities(ctx, t).context("placing the derived K3s CAs")?;
            }
            let text = config::render(file, ctx.node, ctx.secrets, &mode)?;
            t.write(CONFIG, &text, 0o600)?;
            mode
        }
    };
    let how = match &mode {
        Mode::Init => "founded the cluster".to_owned(),
        Mode::Join(a) => format!("joined through {a}"),
    };
    let unit = role.unit();
    p.once(
        &format!("k3s-start {unit}"),
        &stack::fingerprint(&[unit]),
        &mut || {
            t.sys
                .run(&Cmd::new("systemctl").args(["enable", "--now", "--no-block", unit]))?;
            Ok(format!("{unit} enabled and started ({how})"))
        },
    )?;
    // 2. Ready: a server sees every K3s node of the file Ready and one etcd member per server;
    //    an agent sees its own node Ready (its kubelet's credentials may read nodes).
    let limit = file.firstboot.health_timeout;
    let expected: Vec<String> = file
        .nodes
        .iter()
        .filter(|n| config::role(n).is_some())
        .map(|n| n.name.get_ref().clone())
        .collect();
    let servers = config::servers(file).len();
    let kubectl = |args: &[&str]| {
        let mut c = Cmd::new(format!("/{BINARY}")).arg("kubectl");
        if role == Role::Agent {
            c = c.args(["--kubeconfig", KUBELET_KUBECONFIG]);
        }
        c.args(args)
    };
    match role {
        Role::Server => {
            let cmd = kubectl(&["get", "nodes", "-o", "json"]);
            let (ready, etcd) = stack::wait("every K3s node Ready", limit, 10, t, p, || {
                let Ok(out) = t.sys.run(&cmd) else {
                    return Ok(Err("the API does not answer yet".into()));
                };
                let Some(nodes) = config::nodes(&out) else {
                    return Ok(Err("unreadable `kubectl get nodes`".into()));
                };
                let waiting: Vec<&str> = expected
                    .iter()
                    .filter(|e| !nodes.iter().any(|(n, r, _)| n == *e && *r))
                    .map(String::as_str)
                    .collect();
                let etcd = nodes.iter().filter(|(_, _, e)| *e).count();
                if waiting.is_empty() && etcd == servers {
                    Ok(Ok((expected.len(), etcd)))
                } else {
                    Ok(Err(format!(
                        "{} of {} nodes Ready{}, {etcd} of {servers} etcd members",
                        expected.len() - waiting.len(),
                        expected.len(),
                        if waiting.is_empty() {
                            String::new()
                        } else {
                            format!(" (not yet: {})", waiting.join(", "))
                        }
                    )))
                }
            })?;
            Ok(format!(
                "k3s server ({how}): {ready} nodes Ready, {etcd} etcd members"
            ))
        }
        Role::Agent => {
            let cmd = kubectl(&["get", "node", name, "-o", "json"]);
            stack::wait("this K3s node Ready", limit, 10, t, p, || {
                let Ok(out) = t.sys.run(&cmd) else {
                    return Ok(Err("not registered yet".into()));
                };
                match config::nodes(&out).as_deref() {
                    Some([(_, true, _)]) => Ok(Ok(())),
                    Some(_) => Ok(Err("registered, not Ready yet".into())),
                    None => Ok(Err("unreadable `kubectl get node`".into())),
                }
            })?;
            Ok(format!("k3s agent ({how}): node Ready"))
        }
    }
}

#[cfg(test)]
mod tests;
