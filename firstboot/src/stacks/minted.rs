//! What the stacks whose join material is minted at run time (Swarm, Incus) share: the rule
//! that decides whether this node founds the cluster or joins one, over the handover channel
//! (`crate::handover`).
//!
//! The initialiser is the first node in file order of the stack's founding role (every node
//! computes the same). It founds only when no peer offers join material and a majority of the
//! founding nodes (itself included) say they belong to no cluster yet: a peer that is in a
//! cluster but not ready (rebooting, no quorum yet) answers "busy", which never counts. So a
//! re-flashed initialiser whose peers still run the cluster joins it instead of founding a
//! second one, and after a power loss of every node it waits for them to come back.
//! Every other node waits for a peer's offer.

use anyhow::Result;

use crate::agent::system::Target;
use crate::stack::{self, Ctx, Progress};

/// A peer's answer meaning "I am in no cluster yet".
pub const NONE: &str = "none";
/// Seconds between two rounds of asking.
const ASK_EVERY: u64 = 5;

/// Join material one node hands another: a token, and the address to join at.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Offer {
    pub token: String,
    pub addr: String,
}

impl Offer {
    /// What `Stack::hand_over` answers.
    pub fn answer(token: &str, addr: String) -> Result<String> {
        Ok(serde_json::to_string(&Offer {
            token: token.trim().to_owned(),
            addr,
        })?)
    }
}

/// How this node comes into the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// It founds it.
    Found,
    /// It joins with what `peer` offered.
    Join { peer: String, offer: Offer },
}

/// One round of asking `peers` (name, address) for `ask` in order: the first offer, or the
/// number of peers in no cluster and what every other peer said.
fn round(
    ctx: &Ctx<'_>,
    t: &Target<'_>,
    stack: &str,
    ask: &str,
    peers: &[(String, String)],
) -> (Option<Entry>, usize, Vec<String>) {
    let mut none = 0;
    let mut said = Vec::new();
    for (name, addr) in peers {
        match crate::handover::ask(
            t.sys,
            ctx.secrets.handover_key(),
            ctx.file.cluster.get_ref().id.get_ref(),
            stack,
            ctx.node.name.get_ref(),
            ask,
            addr,
        ) {
            Ok(Ok(v)) if v == NONE => none += 1,
            Ok(Ok(payload)) => match serde_json::from_str::<Offer>(&payload) {
                Ok(offer) => {
                    return (
                        Some(Entry::Join {
                            peer: name.clone(),
                            offer,
                        }),
                        none,
                        said,
                    )
                }
                Err(e) => said.push(format!("{name}: an unreadable offer ({e})")),
            },
            Ok(Err(why)) => said.push(format!("{name}: {why}")),
            Err(e) => said.push(format!("{name}: {}", short(&e))),
        }
    }
    (None, none, said)
}

fn short(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    if s.contains("Connection refused") {
        "not answering yet".to_owned()
    } else {
        s
    }
}

/// Decides, asking `peers` (the other nodes that can offer, name and address, in file
/// order) until one offers or, for the initialiser, a majority is in no cluster; bounded by
/// the file's health timeout and reported through `p`.
pub fn decide(
    ctx: &Ctx<'_>,
    t: &Target<'_>,
    p: &mut dyn Progress,
    stack: &str,
    ask: &str,
    peers: &[(String, String)],
    initialiser: bool,
) -> Result<Entry> {
    let what = if initialiser {
        format!("{stack}: a running cluster to join, or a majority to found one with")
    } else {
        format!("{stack}: a member to hand over join material")
    };
    stack::wait(
        &what,
        ctx.file.firstboot.health_timeout,
        ASK_EVERY,
        t,
        p,
        || {
            let (offer, none, said) = round(ctx, t, stack, ask, peers);
            if let Some(e) = offer {
                return Ok(Ok(e));
            }
            if initialiser && founds(none, peers.len()) {
                return Ok(Ok(Entry::Found));
            }
            let mut state = format!("{none} of {} in no cluster yet", peers.len());
            if !said.is_empty() {
                state.push_str(&format!("; {}", said.join("; ")));
            }
            Ok(Err(state))
        },
    )
}

/// Whether the initialiser founds: it and the `none` peers (of `peers`) in no cluster are a
/// majority of the founding nodes.
pub fn founds(none: usize, peers: usize) -> bool {
    (1 + none) * 2 > peers + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initialiser_founds_only_with_a_majority() {
        assert!(founds(0, 0), "alone");
        assert!(!founds(0, 2), "1 of 3");
        assert!(founds(1, 2), "2 of 3");
        assert!(!founds(1, 4), "2 of 5");
        assert!(founds(2, 4), "3 of 5");
    }
}
