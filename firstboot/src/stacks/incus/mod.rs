//! Incus on a node: the `incus-member` role and the health phase. The first member in file
//! order founds the Incus cluster (`incus admin init --preseed`: the node's address, a `dir`
//! storage pool `local`, the default profile's root disk on it) unless a peer offers a token;
//! every other member asks the members for a join token over the handover channel
//! (`stacks::minted`): a member mints one for that name (`incus cluster add --quiet NAME`,
//! after removing the asker's offline entry of an earlier card and revoking a pending token),
//! and the joiner joins with it (preseed with `cluster_token`, read from standard input, never
//! a command line). Then the node waits until every member of the file is Online.
//!
//! Preseed keys checked against lxc/incus: doc/howto/cluster_form.md and shared/api/init.go,
//! cluster.go (`server_name`, `enabled`, `server_address`, `cluster_token`, `member_config`);
//! the preseed parser takes YAML, of which JSON is a subset.

use anyhow::{bail, Context, Result};

use crate::agent::system::Target;
use crate::cluster::{self, ClusterFile, Node, Problem};
use crate::cmd::Cmd;
use crate::stack::{self, Ctx, Memo, Progress, Stack, Step};
use crate::stacks::minted::{self, Entry, Offer};

pub const MEMBER: &str = "incus-member";
/// Incus's API port (cluster traffic and joins).
pub const PORT: u16 = 8443;
/// The storage pool every member gets (a directory on the root filesystem).
pub const POOL: &str = "local";
const CLIENT: &str = "usr/bin/incus";

pub fn member(n: &Node) -> bool {
    n.roles.iter().any(|r| r.get_ref() == MEMBER)
}

pub fn members(file: &ClusterFile) -> Vec<&Node> {
    file.nodes.iter().filter(|n| member(n)).collect()
}

/// `incus` with a home for its client configuration (the units have none).
fn incus() -> Cmd {
    Cmd::new("incus").env("HOME", "/root")
}

pub struct Incus;

impl Stack for Incus {
    fn name(&self) -> &'static str {
        "incus"
    }

    fn roles(&self) -> &'static [&'static str] {
        &[MEMBER]
    }

    fn check(&self, text: &str, file: &ClusterFile, p: &mut Vec<Problem>) {
        for (i, n) in file.nodes.iter().enumerate() {
            if member(n) && n.address.get_ref() == "dhcp" {
                p.push(Problem {
                    line: cluster::at(text, &n.address),
                    field: format!("node[{i}].address"),
                    message: "an incus-member needs a static address: members reach each \
                              other by address"
                        .into(),
                });
            }
        }
    }

    fn warnings(&self, _text: &str, file: &ClusterFile) -> Vec<Problem> {
        match members(file).len() {
            1 | 2 => vec![Problem {
                line: 0,
                field: "node.roles".into(),
                message: "fewer than 3 incus-members: Incus's database needs 3 to survive the \
                          loss of one"
                    .into(),
            }],
            _ => Vec::new(),
        }
    }

    fn init_roles(&self, _index: u32, _nodes: u32) -> Vec<&'static str> {
        vec![MEMBER]
    }

    fn steps<'a>(&self, ctx: &Ctx<'a>, _t: &Target<'_>, _memo: &mut Memo) -> Result<Vec<Step<'a>>> {
        let m = member(ctx.node);
        Ok(vec![Step {
            name: "incus".into(),
            input: stack::fingerprint(&[if m { MEMBER } else { "none" }]),
            reapply: true,
            apply: Box::new(move |t: &Target<'_>| {
                if !m {
                    return Ok("no Incus role on this node".into());
                }
                if !t.p(CLIENT).exists() {
                    bail!("this node is an incus-member but the image has no /{CLIENT}: build it with `--stack incus` (or `lxd`)");
                }
                Ok("Incus present; this member joins the Incus cluster once incusd runs".into())
            }),
        }])
    }

    fn units(&self, _file: &ClusterFile, node: &Node) -> Vec<String> {
        if member(node) {
            vec!["picoimg-handover.service".into()]
        } else {
            Vec::new()
        }
    }

    fn hand_over(&self, ctx: &Ctx<'_>, t: &Target<'_>, from: &Node, ask: &str) -> Result<String> {
        if ask != "join" {
            bail!("incus answers \"join\", not {ask:?}");
        }
        if !member(from) {
            bail!("{} is not an incus-member", from.name.get_ref());
        }
        if !clustered(t)? {
            return Ok(minted::NONE.into());
        }
        let name = from.name.get_ref();
        // The asker is in no cluster (a first boot or a re-flashed card): an offline entry of
        // its name is its old self. An online one is not, and keeps its place.
        if let Some((_, status)) = list(t)?.into_iter().find(|(n, _)| n == name) {
            if status == "Online" {
                bail!("{name} is an online member already");
            }
            t.sys
                .run(&incus().args(["cluster", "remove", "--force", "--yes", name]))?;
        }
        // A token minted for an earlier request of this node, not used.
        let _ = t.sys.run(&incus().args(["cluster", "revoke-token", name]));
        let token = t
            .sys
            .run(&incus().args(["cluster", "add", "--quiet", name]))?;
        Offer::answer(&token, format!("{}:{PORT}", ctx.node.address.get_ref()))
    }

    fn health(
        &self,
        ctx: &Ctx<'_>,
        t: &Target<'_>,
        p: &mut dyn Progress,
    ) -> Result<Option<String>> {
        if !member(ctx.node) {
            return Ok(None);
        }
        health(ctx, t, p).map(Some)
    }
}

fn clustered(t: &Target<'_>) -> Result<bool> {
    let out = t.sys.run(&incus().args(["query", "/1.0"]))?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("unreadable `incus query /1.0`: {out}"))?;
    Ok(v["environment"]["server_clustered"].as_bool() == Some(true))
}

/// The members as the cluster lists them: (name, status).
fn list(t: &Target<'_>) -> Result<Vec<(String, String)>> {
    let out = t
        .sys
        .run(&incus().args(["query", "/1.0/cluster/members?recursion=1"]))?;
    parse_members(&out).with_context(|| format!("unreadable member list: {out}"))
}

fn parse_members(out: &str) -> Option<Vec<(String, String)>> {
    let v: serde_json::Value = serde_json::from_str(out).ok()?;
    v.as_array()?
        .iter()
        .map(|m| {
            Some((
                m["server_name"].as_str()?.to_owned(),
                m["status"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// The founder's preseed: its address, the `local` pool, the default profile's root disk.
pub fn found_preseed(name: &str, addr: &str) -> String {
    serde_json::json!({
        "config": {"core.https_address": format!("{addr}:{PORT}")},
        "storage_pools": [{"name": POOL, "driver": "dir"}],
        "profiles": [{"name": "default", "devices": {
            "root": {"path": "/", "pool": POOL, "type": "disk"}
        }}],
        "cluster": {"server_name": name, "enabled": true},
    })
    .to_string()
}

/// A joiner's preseed: its own address, the token, the `local` pool's per-member source.
pub fn join_preseed(name: &str, addr: &str, token: &str) -> String {
    serde_json::json!({
        "cluster": {
            "server_name": name,
            "enabled": true,
            "server_address": format!("{addr}:{PORT}"),
            "cluster_token": token,
            "member_config": [
                {"entity": "storage-pool", "name": POOL, "key": "source", "value": ""}
            ],
        },
    })
    .to_string()
}

fn health(ctx: &Ctx<'_>, t: &Target<'_>, p: &mut dyn Progress) -> Result<String> {
    let file = ctx.file;
    let limit = file.firstboot.health_timeout;
    let name = ctx.node.name.get_ref();
    let me = ctx.node.address.get_ref();
    let was = stack::wait("incusd", limit, 5, t, p, || {
        Ok(clustered(t).map_err(|e| format!("{e:#}")))
    })?;
    let how = if was {
        "a member".to_owned()
    } else {
        let peers: Vec<(String, String)> = members(file)
            .into_iter()
            .filter(|n| n.name.get_ref() != name)
            .map(|n| (n.name.get_ref().clone(), n.address.get_ref().clone()))
            .collect();
        let init = members(file)
            .first()
            .is_some_and(|n| n.name.get_ref() == name);
        let mut tries = 0;
        loop {
            tries += 1;
            match minted::decide(ctx, t, p, "incus", "join", &peers, init)? {
                Entry::Found => {
                    t.sys.run(
                        &incus()
                            .args(["admin", "init", "--preseed"])
                            .stdin_bytes(found_preseed(name, me)),
                    )?;
                    break "founded the cluster".to_owned();
                }
                Entry::Join { peer, offer } => {
                    let joined = t.sys.run(
                        &incus()
                            .args(["admin", "init", "--preseed"])
                            .stdin_bytes(join_preseed(name, me, &offer.token)),
                    );
                    match joined {
                        Ok(_) => break format!("joined through {peer}"),
                        // The command gave up, the daemon did not: the node is a member.
                        Err(_) if clustered(t).unwrap_or(false) => {
                            break format!("joined through {peer}")
                        }
                        // Two joins at once can collide in the members' database: ask again
                        // (a new token), a bounded number of times.
                        Err(e) if tries < 5 => {
                            p.say(format!(
                                "picoimg: incus: joining through {peer} failed, asking again in 15 s: {e:#}"
                            ));
                            t.sys.sleep(std::time::Duration::from_secs(15));
                        }
                        Err(e) => return Err(e.context(format!("joining through {peer}"))),
                    }
                }
            }
        }
    };
    let expected: Vec<&str> = members(file)
        .into_iter()
        .map(|n| n.name.get_ref().as_str())
        .collect();
    stack::wait("every Incus member Online", limit, 10, t, p, || {
        let Ok(listed) = list(t) else {
            return Ok(Err("the member list does not answer yet".into()));
        };
        let waiting: Vec<&str> = expected
            .iter()
            .filter(|e| !listed.iter().any(|(n, s)| n == *e && s == "Online"))
            .copied()
            .collect();
        Ok(if waiting.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} of {} members Online (not yet: {})",
                expected.len() - waiting.len(),
                expected.len(),
                waiting.join(", ")
            ))
        })
    })?;
    Ok(format!(
        "incus member ({how}): {} members Online",
        expected.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_lists_and_preseeds_read_as_incus_writes_them() {
        let out = r#"[{"server_name":"pc0","url":"https://10.77.0.10:8443","database":true,"status":"Online","message":"Fully operational"},{"server_name":"pc1","status":"Offline"}]"#;
        assert_eq!(
            parse_members(out).unwrap(),
            [
                ("pc0".into(), "Online".into()),
                ("pc1".into(), "Offline".into())
            ]
        );
        assert!(parse_members("Error: not clustered").is_none());
        let j: serde_json::Value =
            serde_json::from_str(&join_preseed("pc1", "10.77.0.11", "tok")).unwrap();
        assert_eq!(j["cluster"]["server_address"], "10.77.0.11:8443");
        assert_eq!(j["cluster"]["cluster_token"], "tok");
        let f: serde_json::Value =
            serde_json::from_str(&found_preseed("pc0", "10.77.0.10")).unwrap();
        assert_eq!(f["config"]["core.https_address"], "10.77.0.10:8443");
        assert_eq!(f["profiles"][0]["devices"]["root"]["pool"], "local");
    }
}
