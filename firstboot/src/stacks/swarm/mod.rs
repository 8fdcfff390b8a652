//! Docker Swarm on a node: the `swarm-manager` and `swarm-worker` roles, the optional `[swarm]`
//! section (the overlay networks' address pool), and the health phase: the first manager in
//! file order founds the swarm (`docker swarm init`) unless a peer offers join tokens; every
//! other node joins with the token a manager hands over (`stacks::minted`, the handover
//! channel); then the node waits until the swarm lists every node of the file Ready with its
//! role and one leader.
//!
//! Swarm's join tokens carry a secret part the first manager draws at random (moby/swarmkit,
//! ca/config.go `GenerateJoinToken`), so they cannot be derived from the cluster secret: the
//! managers hand them over. Commands and formats checked against Docker's CLI reference
//! (`docker swarm init --advertise-addr --listen-addr --default-addr-pool
//! --default-addr-pool-mask-length`, `docker swarm join-token -q`, `docker node ls --format
//! '{{json .}}'` with Hostname, Status, ManagerStatus) and moby's `info.Swarm`
//! (`LocalNodeState`: inactive, pending, active, error, locked; `ControlAvailable`).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use toml::Spanned;

use crate::agent::system::Target;
use crate::cluster::{self, ClusterFile, Node, Problem, Subnet};
use crate::cmd::Cmd;
use crate::stack::{self, Ctx, Memo, Progress, Raw, Section as AnySection, Stack, Step};
use crate::stacks::minted::{self, Entry, Offer};

pub const SECTION: &str = "swarm";
pub const MANAGER: &str = "swarm-manager";
pub const WORKER: &str = "swarm-worker";
/// Swarm's cluster management port (managers listen, nodes join here).
pub const PORT: u16 = 2377;
/// The overlay networks' pool unless the file sets one: Docker's own default, 10.0.0.0/8,
/// overlaps most private node subnets (and picoimg's default).
pub const DEFAULT_ADDR_POOL: &str = "10.201.0.0/16";
pub const DEFAULT_MASK_LENGTH: u8 = 24;
const DOCKER: &str = "usr/bin/docker";

/// The cluster file's `[swarm]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    /// Address pool of the overlay networks (`--default-addr-pool`); default 10.201.0.0/16.
    pub default_addr_pool: Option<Spanned<String>>,
    /// Prefix length of each overlay network from the pool; default 24.
    pub mask_length: Option<Spanned<u8>>,
}

impl Section {
    pub fn pool(&self) -> &str {
        self.default_addr_pool
            .as_ref()
            .map_or(DEFAULT_ADDR_POOL, |s| s.get_ref())
    }

    pub fn mask_length(&self) -> u8 {
        self.mask_length
            .as_ref()
            .map_or(DEFAULT_MASK_LENGTH, |s| *s.get_ref())
    }
}

pub fn section(file: &ClusterFile) -> Section {
    file.stacks.get_or_default::<Section>(SECTION)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Manager,
    Worker,
}

impl Role {
    fn word(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
        }
    }
}

pub fn role(n: &Node) -> Option<Role> {
    let has = |r: &str| n.roles.iter().any(|x| x.get_ref() == r);
    if has(MANAGER) {
        Some(Role::Manager)
    } else if has(WORKER) {
        Some(Role::Worker)
    } else {
        None
    }
}

/// The managers, in file order: the first founds the swarm.
pub fn managers(file: &ClusterFile) -> Vec<&Node> {
    file.nodes
        .iter()
        .filter(|n| role(n) == Some(Role::Manager))
        .collect()
}

pub struct Swarm;

impl Stack for Swarm {
    fn name(&self) -> &'static str {
        "swarm"
    }

    fn section(&self) -> Option<&'static str> {
        Some(SECTION)
    }

    fn parse_section(&self, text: &str, value: &Raw<'_>) -> Result<AnySection, Vec<Problem>> {
        let s: Section = cluster::typed_section(text, SECTION, value)?;
        Ok(std::sync::Arc::new(s))
    }

    fn roles(&self) -> &'static [&'static str] {
        &[MANAGER, WORKER]
    }

    fn check(&self, text: &str, file: &ClusterFile, p: &mut Vec<Problem>) {
        check(text, file, p);
    }

    fn warnings(&self, _text: &str, file: &ClusterFile) -> Vec<Problem> {
        if managers(file).len() == 1 {
            vec![Problem {
                line: 0,
                field: "node.roles".into(),
                message: "one swarm-manager: the swarm cannot be managed while it is down; 3 \
                          managers tolerate one failure"
                    .into(),
            }]
        } else {
            Vec::new()
        }
    }

    fn init_section(&self) -> Option<&'static str> {
        Some(
            "[swarm]\n# The first swarm-manager founds the swarm; the managers hand the join tokens to the\n# other nodes, sealed with a key derived from the secret.\n# Overlay networks' pool (Docker's default 10.0.0.0/8 overlaps most node subnets):\n# default_addr_pool = \"10.201.0.0/16\"\n# mask_length = 24\n",
        )
    }

    /// Three managers where there are three nodes (one below), workers on the rest.
    fn init_roles(&self, index: u32, nodes: u32) -> Vec<&'static str> {
        let managers = if nodes < 3 { 1 } else { 3 };
        vec![if index < managers { MANAGER } else { WORKER }]
    }

    fn steps<'a>(&self, ctx: &Ctx<'a>, _t: &Target<'_>, _memo: &mut Memo) -> Result<Vec<Step<'a>>> {
        let r = role(ctx.node);
        Ok(vec![Step {
            name: "swarm".into(),
            input: stack::fingerprint(&[r.map_or("none", Role::word)]),
            reapply: true,
            apply: Box::new(move |t: &Target<'_>| {
                let Some(r) = r else {
                    return Ok("no Swarm role on this node".into());
                };
                if !t.p(DOCKER).exists() {
                    bail!("this node has a Swarm role but the image has no /{DOCKER}: build it with `--stack swarm` (or `docker,swarm`)");
                }
                Ok(format!(
                    "Docker Engine present; this {} joins the swarm once dockerd runs",
                    r.word()
                ))
            }),
        }])
    }

    fn units(&self, _file: &ClusterFile, node: &Node) -> Vec<String> {
        match role(node) {
            Some(Role::Manager) => vec!["picoimg-handover.service".into()],
            _ => Vec::new(),
        }
    }

    fn hand_over(&self, ctx: &Ctx<'_>, t: &Target<'_>, from: &Node, ask: &str) -> Result<String> {
        if ask != "join" {
            bail!("swarm answers \"join\", not {ask:?}");
        }
        let Some(r) = role(from) else {
            bail!("{} has no Swarm role", from.name.get_ref());
        };
        let info = local(t)?;
        match info.state.as_str() {
            "inactive" => return Ok(minted::NONE.into()),
            "active" if info.control => {}
            s => bail!("this manager's swarm is not ready ({s})"),
        }
        // The asker has no swarm state (a first boot or a re-flashed card): an entry of its
        // name that is Down is its old self, removed so the list shows each node once.
        for n in nodes(t)? {
            if n.hostname == *from.name.get_ref() && n.status == "Down" {
                remove(t, &n)?;
            }
        }
        let token = t
            .sys
            .run(&Cmd::new("docker").args(["swarm", "join-token", "-q", r.word()]))?;
        Offer::answer(&token, format!("{}:{PORT}", ctx.node.address.get_ref()))
    }

    fn health(
        &self,
        ctx: &Ctx<'_>,
        t: &Target<'_>,
        p: &mut dyn Progress,
    ) -> Result<Option<String>> {
        let Some(r) = role(ctx.node) else {
            return Ok(None);
        };
        health(ctx, t, p, r).map(Some)
    }
}

/// What `docker info` says of this node's swarm.
#[derive(Debug)]
struct Local {
    state: String,
    control: bool,
    cluster: String,
}

fn local(t: &Target<'_>) -> Result<Local> {
    let out = t
        .sys
        .run(&Cmd::new("docker").args(["info", "--format", "{{json .Swarm}}"]))?;
    parse_local(&out).with_context(|| format!("unreadable `docker info` Swarm: {out}"))
}

fn parse_local(out: &str) -> Option<Local> {
    let v: serde_json::Value = serde_json::from_str(out.trim()).ok()?;
    Some(Local {
        state: v["LocalNodeState"].as_str()?.to_owned(),
        control: v["ControlAvailable"].as_bool().unwrap_or(false),
        cluster: v["Cluster"]["ID"].as_str().unwrap_or_default().to_owned(),
    })
}

/// One line of `docker node ls`.
#[derive(Debug, Clone, PartialEq)]
struct Listed {
    id: String,
    hostname: String,
    status: String,
    manager: String,
}

fn nodes(t: &Target<'_>) -> Result<Vec<Listed>> {
    let out = t
        .sys
        .run(&Cmd::new("docker").args(["node", "ls", "--format", "{{json .}}"]))?;
    Ok(parse_nodes(&out))
}

fn parse_nodes(out: &str) -> Vec<Listed> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| Listed {
            id: v["ID"].as_str().unwrap_or_default().to_owned(),
            hostname: v["Hostname"].as_str().unwrap_or_default().to_owned(),
            status: v["Status"].as_str().unwrap_or_default().to_owned(),
            manager: v["ManagerStatus"].as_str().unwrap_or_default().to_owned(),
        })
        .collect()
}

/// Removes a node's Down entry (a manager is demoted first, so Raft forgets it).
fn remove(t: &Target<'_>, n: &Listed) -> Result<()> {
    if !n.manager.is_empty() {
        t.sys
            .run(&Cmd::new("docker").args(["node", "demote", &n.id]))?;
    }
    t.sys
        .run(&Cmd::new("docker").args(["node", "rm", "--force", &n.id]))?;
    Ok(())
}

fn health(ctx: &Ctx<'_>, t: &Target<'_>, p: &mut dyn Progress, r: Role) -> Result<String> {
    let file = ctx.file;
    let limit = file.firstboot.health_timeout;
    let me = ctx.node.address.get_ref();
    let info = stack::wait("dockerd", limit, 5, t, p, || {
        Ok(local(t).map_err(|e| format!("{e:#}")))
    })?;
    let how = if info.state == "inactive" {
        let peers: Vec<(String, String)> = managers(file)
            .into_iter()
            .filter(|n| n.name.get_ref() != ctx.node.name.get_ref())
            .map(|n| (n.name.get_ref().clone(), n.address.get_ref().clone()))
            .collect();
        let init = managers(file)
            .first()
            .is_some_and(|n| n.name.get_ref() == ctx.node.name.get_ref());
        let mut addr = Vec::new();
        if me != "dhcp" {
            addr = vec![
                "--advertise-addr".to_owned(),
                me.clone(),
                "--listen-addr".to_owned(),
                format!("{me}:{PORT}"),
            ];
        }
        let mut tries = 0;
        loop {
            tries += 1;
            match minted::decide(ctx, t, p, "swarm", "join", &peers, init)? {
                Entry::Found => {
                    let s = section(file);
                    t.sys.run(
                        &Cmd::new("docker")
                            .args(["swarm", "init"])
                            .args(&addr)
                            .args(["--default-addr-pool", s.pool()])
                            .args([
                                "--default-addr-pool-mask-length",
                                &s.mask_length().to_string(),
                            ]),
                    )?;
                    break "founded the swarm".to_owned();
                }
                Entry::Join { peer, offer } => {
                    let joined = t.sys.run(
                        &Cmd::new("docker")
                            .args(["swarm", "join", "--token"])
                            .hidden_arg(&offer.token)
                            .args(&addr)
                            .arg(&offer.addr),
                    );
                    let Err(e) = joined else {
                        break format!("joined through {peer}");
                    };
                    // dockerd gives up waiting after its own timeout but goes on joining in
                    // the background (a busy manager): then the wait below sees it through.
                    let state = local(t).map(|l| l.state).unwrap_or_default();
                    if state == "pending" || state == "active" {
                        p.say(format!(
                            "picoimg: swarm: joining through {peer} goes on in the background ({state})"
                        ));
                        break format!("joined through {peer}");
                    }
                    if tries >= 5 {
                        return Err(e.context(format!("joining the swarm through {peer}")));
                    }
                    p.say(format!(
                        "picoimg: swarm: joining through {peer} failed ({state}), asking again in 15 s: {e:#}"
                    ));
                    t.sys.sleep(std::time::Duration::from_secs(15));
                }
            }
        }
    } else {
        "in the swarm".to_owned()
    };
    match r {
        Role::Worker => {
            stack::wait("this node active in the swarm", limit, 5, t, p, || {
                let l = local(t)?;
                Ok(if l.state == "active" {
                    Ok(())
                } else {
                    Err(l.state)
                })
            })?;
            Ok(format!("swarm worker ({how}): active"))
        }
        Role::Manager => {
            let expected: Vec<(&str, Role)> = file
                .nodes
                .iter()
                .filter_map(|n| role(n).map(|r| (n.name.get_ref().as_str(), r)))
                .collect();
            let (leader, cluster) = stack::wait("every swarm node Ready", limit, 10, t, p, || {
                let Ok(list) = nodes(t) else {
                    return Ok(Err("the managers have no quorum yet".into()));
                };
                // Down entries of a node that is back under a new id (its old card).
                for n in &list {
                    if n.status == "Down"
                        && list
                            .iter()
                            .any(|m| m.hostname == n.hostname && m.status == "Ready")
                    {
                        let _ = remove(t, n);
                    }
                }
                Ok(swarm_state(&list, &expected)
                    .map(|leader| (leader, local(t).map(|l| l.cluster).unwrap_or_default())))
            })?;
            let short: String = cluster.chars().take(12).collect();
            Ok(format!(
                "swarm manager ({how}): {} nodes Ready, {} managers, leader {leader}, swarm {short}",
                expected.len(),
                expected.iter().filter(|(_, r)| *r == Role::Manager).count()
            ))
        }
    }
}

/// Whether the node list shows every expected node Ready in its role and one leader: the
/// leader's name, or what is missing.
fn swarm_state(list: &[Listed], expected: &[(&str, Role)]) -> Result<String, String> {
    let mut missing = Vec::new();
    for (name, r) in expected {
        let ok = list.iter().any(|n| {
            n.hostname == *name
                && n.status == "Ready"
                && (n.manager.is_empty() == (*r == Role::Worker))
        });
        if !ok {
            missing.push(format!("{name} ({})", r.word()));
        }
    }
    let leaders: Vec<&str> = list
        .iter()
        .filter(|n| n.manager == "Leader")
        .map(|n| n.hostname.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} of {} nodes Ready in their role (not yet: {})",
            expected.len() - missing.len(),
            expected.len(),
            missing.join(", ")
        ));
    }
    match leaders.as_slice() {
        [l] => Ok((*l).to_owned()),
        _ => Err(format!("{} leaders", leaders.len())),
    }
}

fn check(text: &str, f: &ClusterFile, p: &mut Vec<Problem>) {
    let mut managers = 0;
    // The last manager's line: an even count is one manager too many (or too few) there.
    let mut last = 0;
    for (i, n) in f.nodes.iter().enumerate() {
        let has = |r: &str| n.roles.iter().any(|x| x.get_ref() == r);
        if has(MANAGER) && has(WORKER) {
            p.push(Problem {
                line: cluster::at(text, &n.name),
                field: format!("node[{i}].roles"),
                message: "a swarm-manager also runs tasks: give the node \"swarm-manager\" or \
                          \"swarm-worker\", not both"
                    .into(),
            });
        }
        if has(MANAGER) {
            managers += 1;
            last = n
                .roles
                .iter()
                .find(|r| r.get_ref() == MANAGER)
                .map_or(0, |r| cluster::at(text, r));
            if n.address.get_ref() == "dhcp" {
                p.push(Problem {
                    line: cluster::at(text, &n.address),
                    field: format!("node[{i}].address"),
                    message: "a swarm-manager needs a static address: the other nodes join \
                              the managers by address"
                        .into(),
                });
            }
        }
    }
    if !stack::used(&Swarm, f) {
        return;
    }
    if managers == 0 {
        p.push(Problem {
            line: 0,
            field: "node.roles".into(),
            message: "no node has the swarm-manager role: give it to 1, 3 or 5 nodes".into(),
        });
    } else if managers % 2 == 0 {
        p.push(Problem {
            line: last,
            field: "node.roles".into(),
            message: format!(
                "{managers} swarm-manager nodes: use an odd number (1, 3, 5) so the managers' Raft keeps a majority through a failure"
            ),
        });
    }
    let s = section(f);
    let pool = s.default_addr_pool.as_ref();
    let line = pool.map_or(0, |v| cluster::at(text, v));
    match Subnet::parse(s.pool()) {
        None => p.push(Problem {
            line,
            field: "swarm.default_addr_pool".into(),
            message: format!(
                "\"{}\" is not an IPv4 network like \"10.201.0.0/16\"",
                s.pool()
            ),
        }),
        Some(net) => {
            if let Some(nodes) = Subnet::parse(f.network.subnet.get_ref()) {
                if net.overlaps(nodes) {
                    p.push(Problem {
                        line,
                        field: "swarm.default_addr_pool".into(),
                        message: format!(
                            "{} overlaps the nodes' subnet {}: pick another private range",
                            s.pool(),
                            f.network.subnet.get_ref()
                        ),
                    });
                }
            }
            let m = s.mask_length();
            if m < net.prefix || m > 29 {
                p.push(Problem {
                    line: s
                        .mask_length
                        .as_ref()
                        .map_or(line, |v| cluster::at(text, v)),
                    field: "swarm.mask_length".into(),
                    message: format!(
                        "{m}: a prefix length between the pool's ({}) and 29",
                        net.prefix
                    ),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
