//! K3s's configuration from the cluster file: the `[k3s]` section, the roles, the rule that
//! names the one server that initialises the cluster, and `/etc/rancher/k3s/config.yaml` for a
//! server that initialises, a server that joins and an agent.
//!
//! Config-file keys are the long names of K3s's flags (K3s documentation, installation/
//! configuration.md: "the config file ... keys are the CLI flags without the leading dashes").
//! Each key was checked against k3s-io/k3s: `pkg/cli/cmds/server.go` (`cluster-init`,
//! `server`, `token`, `agent-token`, `cluster-cidr`, `service-cidr`, `cluster-domain`,
//! `tls-san`, `disable`, `write-kubeconfig-mode`), `pkg/cli/cmds/agent.go` (`node-name`,
//! `node-ip`; the agent's own `server` and `token`), `pkg/cli/cmds/stage.go` (the items
//! `disable` takes) and `pkg/cli/server/server.go` (without `cluster-dns` K3s takes the tenth
//! address of the service CIDR; the node's name and IPs are added to the certificate's SANs by
//! K3s itself, so only the file's extra names go in `tls-san`).

use serde::Deserialize;
use toml::Spanned;

use crate::cluster::{ClusterFile, Node};
use crate::stack::Secrets;

use super::{label, SECTION};

pub const SERVER: &str = "k3s-server";
pub const AGENT: &str = "k3s-agent";
/// K3s's supervisor and API port (`https-listen-port`'s default): servers join and agents
/// register here.
pub const API_PORT: u16 = 6443;
/// K3s's defaults (pkg/cli/cmds/server.go usage strings).
pub const DEFAULT_CLUSTER_CIDR: &str = "10.42.0.0/16";
pub const DEFAULT_SERVICE_CIDR: &str = "10.43.0.0/16";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// What `disable` takes (pkg/cli/cmds/stage.go: `DisableItems`, with `runtimes` and
/// `snapshot-controller` in later releases).
pub const DISABLE_ITEMS: &[&str] = &[
    "coredns",
    "servicelb",
    "traefik",
    "local-storage",
    "metrics-server",
    "runtimes",
    "snapshot-controller",
];
/// Seconds the initialising server listens for an existing cluster before it founds one.
pub const DEFAULT_INIT_WAIT: u64 = 120;
/// Seconds between two joins (K3s has had bugs with simultaneous joins: k3s-io/k3s issues
/// 3226, 4335, 7000).
pub const JOIN_SPACING: u64 = 15;

/// The cluster file's `[k3s]` section. Every value here is the same for every node by
/// construction (one file), so the settings K3s requires to match across servers match.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    /// The K3s release the cluster runs (`v1.31.4+k3s1`): a node whose image carries another
    /// refuses to start K3s; `picoimg build --cluster` builds this release.
    pub version: Option<Spanned<String>>,
    /// Pod network (`cluster-cidr`); default 10.42.0.0/16.
    pub cluster_cidr: Option<Spanned<String>>,
    /// Service network (`service-cidr`); default 10.43.0.0/16. Cluster DNS is its tenth address.
    pub service_cidr: Option<Spanned<String>>,
    /// `cluster-domain`; default cluster.local.
    pub cluster_domain: Option<Spanned<String>>,
    /// Packaged components not to deploy (`disable`): traefik, servicelb, ...
    #[serde(default)]
    pub disable: Vec<Spanned<String>>,
    /// More names or addresses for the API server's certificate (`tls-san`), such as a
    /// load balancer's. The servers' own names and addresses are always in it.
    #[serde(default)]
    pub tls_san: Vec<Spanned<String>>,
    /// Seconds the initialising server looks for a running cluster before founding one
    /// (default 120): longer than the other servers take to boot, so a re-flashed first server
    /// joins its cluster instead of founding a second one.
    pub init_wait: Option<Spanned<u64>>,
}

impl Section {
    pub fn cluster_cidr(&self) -> &str {
        self.cluster_cidr
            .as_ref()
            .map_or(DEFAULT_CLUSTER_CIDR, |s| s.get_ref())
    }

    pub fn service_cidr(&self) -> &str {
        self.service_cidr
            .as_ref()
            .map_or(DEFAULT_SERVICE_CIDR, |s| s.get_ref())
    }

    pub fn cluster_domain(&self) -> &str {
        self.cluster_domain
            .as_ref()
            .map_or(DEFAULT_CLUSTER_DOMAIN, |s| s.get_ref())
    }

    pub fn init_wait(&self) -> u64 {
        self.init_wait
            .as_ref()
            .map_or(DEFAULT_INIT_WAIT, |s| *s.get_ref())
    }
}

/// The file's `[k3s]` section, or the defaults.
pub fn section(file: &ClusterFile) -> Section {
    file.stacks.get_or_default::<Section>(SECTION)
}

/// What a node runs of K3s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Agent,
}

impl Role {
    /// The role's name in the cluster file.
    pub fn name(self) -> &'static str {
        match self {
            Role::Server => SERVER,
            Role::Agent => AGENT,
        }
    }

    /// The unit that runs K3s in this role (overlays/k3s).
    pub fn unit(self) -> &'static str {
        match self {
            Role::Server => super::SERVER_UNIT,
            Role::Agent => super::AGENT_UNIT,
        }
    }
}

/// The node's K3s role (checked: at most one).
pub fn role(node: &Node) -> Option<Role> {
    let has = |r: &str| node.roles.iter().any(|x| x.get_ref() == r);
    if has(SERVER) {
        Some(Role::Server)
    } else if has(AGENT) {
        Some(Role::Agent)
    } else {
        None
    }
}

/// The servers, in file order.
pub fn servers(file: &ClusterFile) -> Vec<&Node> {
    file.nodes
        .iter()
        .filter(|n| role(n) == Some(Role::Server))
        .collect()
}

/// The rule every node computes alike: the first `k3s-server` in file order initialises the
/// cluster; nobody else ever passes `cluster-init`.
pub fn initialiser(file: &ClusterFile) -> Option<&Node> {
    servers(file).into_iter().next()
}

/// Seconds node `node` waits, once a server answers, before it joins: joins one at a time,
/// in file order of the K3s nodes other than the initialiser.
pub fn join_delay(file: &ClusterFile, node: &Node) -> u64 {
    let init = initialiser(file).map(|n| n.name.get_ref().as_str());
    let rank = file
        .nodes
        .iter()
        .filter(|n| role(n).is_some() && Some(n.name.get_ref().as_str()) != init)
        .position(|n| n.name.get_ref() == node.name.get_ref())
        .unwrap_or(0);
    rank as u64 * JOIN_SPACING
}

/// How this node's K3s starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Found the cluster (`cluster-init`): only the initialiser, and only when no other server
    /// answered.
    Init,
    /// Join through the server at this address (servers and agents).
    Join(String),
}

/// The decision of the initialiser rule for `node`, given the servers that answered on the
/// API port (in the order asked). Only the initialiser may found the cluster, and only when
/// no other server answers: a re-flashed initialiser whose cluster still runs joins it.
/// Every other node joins a server that answered, the initialiser first; `None`: nobody
/// answered yet, keep waiting.
pub fn decide(file: &ClusterFile, node: &Node, answered: &[String]) -> Option<Mode> {
    let me = node.address.get_ref();
    let others: Vec<&String> = answered.iter().filter(|a| *a != me).collect();
    let init = initialiser(file)?;
    if init.name.get_ref() == node.name.get_ref() {
        return Some(match others.first() {
            Some(a) => Mode::Join((*a).clone()),
            None => Mode::Init,
        });
    }
    let preferred = others
        .iter()
        .find(|a| **a == init.address.get_ref())
        .or(others.first())?;
    Some(Mode::Join((*preferred).clone()))
}

/// The addresses a node asks (every server but itself), the initialiser first.
pub fn peers(file: &ClusterFile, node: &Node) -> Vec<String> {
    servers(file)
        .into_iter()
        .filter(|n| n.name.get_ref() != node.name.get_ref())
        .map(|n| n.address.get_ref().clone())
        .collect()
}

/// `/etc/rancher/k3s/config.yaml` for `node` in `mode`. Servers hold both tokens (agents join
/// with the agent token and cannot join as servers); agents hold only the agent token.
pub fn render(
    file: &ClusterFile,
    node: &Node,
    secrets: &Secrets,
    mode: &Mode,
) -> anyhow::Result<String> {
    let s = section(file);
    let mut y = Yaml::default();
    y.comment("Written by picoimg-firstboot from the cluster file; K3s reads it at start.");
    y.scalar("node-name", node.name.get_ref());
    y.scalar("node-ip", node.address.get_ref());
    match mode {
        Mode::Init => y.boolean("cluster-init", true),
        Mode::Join(addr) => y.scalar("server", &format!("https://{addr}:{API_PORT}")),
    }
    // A joining node gets the full token: K3s checks the CA the server presents against its
    // hash before it sends the password. The founder keeps the short form (always accepted,
    // docs cli/token.md); it places the derived CAs itself.
    let ca = super::pki::server_ca();
    let ca_cert = super::pki::ca_cert_pem(&ca, secrets.get(ca.label)?)?;
    let token = |user: &str, password: &str| match mode {
        Mode::Init => password.to_owned(),
        Mode::Join(_) => super::pki::full_token(&ca_cert, user, password),
    };
    match role(node) {
        Some(Role::Server) => {
            y.scalar("token", &token("server", secrets.get(label::TOKEN)?));
            y.scalar("agent-token", secrets.get(label::AGENT_TOKEN)?);
            y.scalar("cluster-cidr", s.cluster_cidr());
            y.scalar("service-cidr", s.service_cidr());
            y.scalar("cluster-domain", s.cluster_domain());
            y.list("disable", s.disable.iter().map(|d| d.get_ref().as_str()));
            y.list("tls-san", s.tls_san.iter().map(|d| d.get_ref().as_str()));
            y.scalar("write-kubeconfig-mode", "0600");
        }
        Some(Role::Agent) => y.scalar("token", &token("node", secrets.get(label::AGENT_TOKEN)?)),
        None => anyhow::bail!("node {} has no K3s role", node.name.get_ref()),
    }
    Ok(y.0)
}

/// A small YAML writer: strings double-quoted as JSON quotes them (valid YAML), lists in block
/// style; nothing else is needed.
#[derive(Default)]
struct Yaml(String);

impl Yaml {
    fn comment(&mut self, c: &str) {
        self.0.push_str(&format!("# {c}\n"));
    }

    fn scalar(&mut self, key: &str, v: &str) {
        self.0.push_str(&format!("{key}: {}\n", quoted(v)));
    }

    fn boolean(&mut self, key: &str, v: bool) {
        self.0.push_str(&format!("{key}: {v}\n"));
    }

    fn list<'a>(&mut self, key: &str, items: impl Iterator<Item = &'a str>) {
        let items: Vec<&str> = items.collect();
        if items.is_empty() {
            return;
        }
        self.0.push_str(&format!("{key}:\n"));
        for i in items {
            self.0.push_str(&format!("  - {}\n", quoted(i)));
        }
    }
}

fn quoted(v: &str) -> String {
    serde_json::Value::String(v.to_owned()).to_string()
}

/// Whether `v` is a K3s release name: `v1.31.4+k3s1`.
pub fn version_ok(v: &str) -> bool {
    let Some(rest) = v.strip_prefix('v') else {
        return false;
    };
    let Some((semver, build)) = rest.split_once("+k3s") else {
        return false;
    };
    let parts: Vec<&str> = semver.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && !build.is_empty()
        && build.bytes().all(|b| b.is_ascii_digit())
}

/// The release in `k3s --version`'s output (`k3s version v1.31.4+k3s1 (a1b2c3d4)`).
pub fn installed_release(output: &str) -> Option<&str> {
    output.split_whitespace().find(|w| version_ok(w))
}

/// Whether `name` can go in the API certificate: a DNS name or an IPv4 address.
pub fn san_ok(name: &str) -> bool {
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// From `k3s kubectl get nodes -o json` (or `get node NAME -o json`): (name, Ready, whether it
/// is an etcd member) of each node.
pub fn nodes(json: &str) -> Option<Vec<(String, bool, bool)>> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    // A list (`get nodes`) or one Node (`get node NAME`).
    let one = [v.clone()];
    let items = match v["items"].as_array() {
        Some(items) => items.as_slice(),
        None if v["kind"] == "Node" => &one[..],
        None => return None,
    };
    Some(
        items
            .iter()
            .filter_map(|n| {
                let name = n["metadata"]["name"].as_str()?.to_owned();
                let ready = n["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                });
                // K3s labels its etcd members (pkg/etcd: "node-role.kubernetes.io/etcd"); the
                // value is "true", its presence is what counts.
                let etcd = !n["metadata"]["labels"]["node-role.kubernetes.io/etcd"].is_null();
                Some((name, ready, etcd))
            })
            .collect(),
    )
}
