//! The first-boot agent: reads the cluster file from the boot partition, finds this node in it,
//! and runs named, idempotent steps, recording each in `/var/lib/picoimg/state.json` so a power
//! cut resumes where it stopped and a rerun on a configured node does nothing.
//!
//! Two phases, two units: `apply` runs before the cluster services (the base steps, then each
//! used stack's steps, then services) and `health` after them (each stack's health check, then
//! `picoimg: ready`). The agent knows stacks only through `crate::stack::Stack` and the
//! registry it is given. Everything is read and written below a root directory; commands and
//! ownership go through [`System`], so tests run every step against a temporary tree.

pub mod base;
#[cfg(test)]
pub mod fake;
pub mod http;
pub mod report;
pub mod runner;
pub mod state;
pub mod system;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cluster::{self, Checked};
use crate::identify::{self, Found, NotFound};
use crate::stack::{self, Ctx, Secrets, Stack};

pub use crate::contract::BUILD_INFO;
pub use crate::fsutil::write_atomic;
pub use base::{NETWORK_FILE, SUDOERS, TIMESYNC_DROPIN, TIME_SYNCED};
pub use report::{Outcome, STATUS_JSON};
pub use state::{State, StepRecord, STATE};
pub use system::{boot_mount, Host, System, Target};

/// The node's root-only copy of the cluster file, secret included.
pub const SAVED_COPY: &str = "etc/picoimg/cluster.toml";
/// The cluster file on the boot partition.
const BOOT_COPY: &str = "picoimg/cluster.toml";

/// Everything one run needs.
pub struct Agent<'a> {
    root: PathBuf,
    sys: &'a dyn System,
    boot: PathBuf,
    rep: report::Reporter,
    stacks: &'a [&'a dyn Stack],
}

impl<'a> Agent<'a> {
    /// An agent for the registered stacks (`crate::stacks::registry`).
    pub fn new(root: &Path, sys: &'a dyn System, echo: bool) -> Agent<'a> {
        Agent::with_stacks(root, sys, echo, crate::stacks::registry())
    }

    /// An agent for `stacks` (tests register their own).
    pub fn with_stacks(
        root: &Path,
        sys: &'a dyn System,
        echo: bool,
        stacks: &'a [&'a dyn Stack],
    ) -> Agent<'a> {
        let boot = boot_mount(root);
        Agent {
            root: root.to_owned(),
            sys,
            rep: report::Reporter::new(root.join(STATUS_JSON), boot.clone(), echo),
            boot,
            stacks,
        }
    }

    /// The lines printed (console and journal through the units' StandardOutput).
    pub fn lines(&self) -> &[String] {
        &self.rep.lines
    }

    /// Reads and checks the cluster file. `None`: there is none (the node stays unconfigured).
    fn read_cluster(&mut self) -> Result<Option<(String, Checked, Secrets)>, String> {
        let path = self.boot.join(BOOT_COPY);
        let text = match crate::input::read_text(&path, crate::input::CONFIG_LIMIT, "cluster file")
        {
            Ok(t) => t,
            Err(crate::input::InputError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(None)
            }
            Err(e) => return Err(format!("reading {BOOT_COPY}: {e}")),
        };
        // A secret scrubbed from the boot copy is taken from this node's own copy, if that
        // copy is of the same cluster.
        let kept = std::fs::read_to_string(self.root.join(SAVED_COPY))
            .ok()
            .and_then(|t| cluster::check_in(&t, None, self.stacks).ok())
            .filter(|saved| {
                Some(saved.file.cluster.get_ref().id.get_ref().as_str())
                    == cluster_id_of(&text).as_deref()
            })
            .map(|saved| saved.secret);
        match cluster::check_in(&text, kept, self.stacks) {
            Ok(c) => {
                // From here on, no report carries the secret or anything derived from it.
                let secrets = Secrets::of(self.stacks, &c);
                self.rep.hide(secrets.redacted());
                for w in &c.warnings {
                    self.rep.say(format!(
                        "picoimg: warning: cluster.toml: {}: {}",
                        w.field, w.message
                    ));
                }
                Ok(Some((text, c, secrets)))
            }
            Err(problems) => {
                for p in &problems {
                    self.rep
                        .say(format!("picoimg: {}", p.located("cluster.toml")));
                }
                let first = problems
                    .first()
                    .map(|p| p.located("cluster.toml"))
                    .unwrap_or_default();
                Err(format!(
                    "{} problem(s) in {BOOT_COPY}, first {first}; fix the file (`picoimg cluster check`) and reboot",
                    problems.len()
                ))
            }
        }
    }

    /// Phase one: configure the node. Starts no cluster service unless every step before
    /// `services` succeeded.
    pub fn apply(&mut self) -> Outcome {
        self.rep
            .say(format!("picoimg: firstboot {} starting", crate::VERSION));
        let (text, checked, secrets) = match self.read_cluster() {
            Ok(Some(x)) => x,
            Ok(None) => {
                return self.rep.finish(
                    Outcome::Unconfigured,
                    format!(
                    "no {BOOT_COPY} on the boot partition; this node keeps the image's defaults"
                ),
                )
            }
            Err(msg) => return self.rep.finish(Outcome::Failed, msg),
        };
        let file = &checked.file;
        let id = file.cluster.get_ref().id.get_ref();
        self.rep
            .set_cluster(format!("{} ({id})", file.cluster.get_ref().name.get_ref()));
        let facts = identify::observe(&self.root, &self.boot);
        let found = match identify::identify(file, &facts) {
            Ok(f) => f,
            Err(NotFound::UnknownName { name, source }) => {
                return self.rep.finish(
                    Outcome::UnknownNode,
                    format!("{source} names node \"{name}\", which {BOOT_COPY} does not list"),
                )
            }
            Err(NotFound::NoMatch) => {
                let report = identify::unknown_report(&facts);
                let _ = write_atomic(
                    &self.boot.join("picoimg/unknown-node.txt"),
                    report.as_bytes(),
                    0o600,
                );
                return self.rep.finish(
                    Outcome::UnknownNode,
                    format!("this node is not in {BOOT_COPY}: nothing matched its MAC, serial or DMI UUID; what it saw is in picoimg/unknown-node.txt"),
                );
            }
        };
        let node = &file.nodes[found.index()];
        self.rep.set_node(node.name.get_ref().clone());
        if let Some(want) = &node.board {
            let built = std::fs::read(self.root.join(BUILD_INFO))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["board"].as_str().map(str::to_owned));
            if let Some(built) = built.filter(|b| b != want.get_ref()) {
                return self.rep.finish(
                    Outcome::Failed,
                    format!(
                        "{BOOT_COPY} says node {} is a {} board, but this card holds an image built for {built}: flash the {} image (picoimg build --cluster FILE builds one for each board)",
                        node.name.get_ref(),
                        want.get_ref(),
                        want.get_ref()
                    ),
                );
            }
        }
        self.rep.say(format!(
            "picoimg: this is node {} of cluster {} ({})",
            node.name.get_ref(),
            file.cluster.get_ref().name.get_ref(),
            match &found {
                Found::CommandLine(_) => "picoimg.node= on the kernel command line".to_owned(),
                Found::NodeToml(_) => "picoimg/node.toml".to_owned(),
                Found::Mac(_, m) => format!("MAC {m}"),
                Found::Serial(_) => "serial number".to_owned(),
                Found::DmiUuid(_) => "DMI product UUID".to_owned(),
            }
        ));
        let mac = match &found {
            Found::Mac(_, m) => Some(m.clone()),
            _ => facts.macs.first().cloned(),
        };
        match self.run_steps(&text, &checked, &secrets, found.index(), mac) {
            Ok(kept) if kept.is_empty() => self.rep.finish(Outcome::Configured, String::new()),
            Ok(kept) => self.rep.finish(
                Outcome::Configured,
                format!(
                    "the cluster file changed; not applied on this configured node: {} (reflash the node to apply them)",
                    kept.join(", ")
                ),
            ),
            Err(e) => self.rep.finish(Outcome::Failed, format!("{e:#}")),
        }
    }

    fn run_steps(
        &mut self,
        text: &str,
        checked: &Checked,
        secrets: &Secrets,
        index: usize,
        mac: Option<String>,
    ) -> Result<Vec<String>> {
        let file = &checked.file;
        let node = &file.nodes[index];
        let id = file.cluster.get_ref().id.get_ref().clone();
        let mut state = match state::load(&self.root)? {
            Some(s) if s.cluster_id != id => bail!(
                "this node was configured for cluster {} ({}); this file is for {} ({id}): reflash the node, or remove /{STATE} to start over",
                s.cluster_name,
                s.cluster_id,
                file.cluster.get_ref().name.get_ref()
            ),
            Some(s) => s,
            None => State {
                cluster_id: id.clone(),
                cluster_name: file.cluster.get_ref().name.get_ref().clone(),
                ..State::default()
            },
        };
        // The node's own root-only copy, secret included (the boot copy may be scrubbed).
        let full = cluster::with_secret(text, file, &base64_secret(&checked.secret));
        write_atomic(&self.root.join(SAVED_COPY), full.as_bytes(), 0o600)
            .context("keeping a copy of the cluster file")?;

        let ctx = Ctx {
            file,
            node,
            secrets,
        };
        let t = Target {
            root: &self.root,
            sys: self.sys,
        };
        let mut steps = base::before(file, node, mac)?;
        let mut units = Vec::new();
        for s in self.stacks.iter().filter(|s| stack::used(**s, file)) {
            steps.extend(
                s.steps(&ctx, &t, &mut state.memo)
                    .with_context(|| format!("planning the {} steps", s.name()))?,
            );
            units.extend(s.units(file, node));
        }
        steps.push(base::services(units));
        let kept = runner::run(steps, &t, &mut self.rep, &mut state, node.name.get_ref())?;
        if kept.is_empty() {
            state.fingerprint = cluster::fingerprint(text, file);
            state::save(&self.root, &state)?;
        }
        if file.firstboot.scrub_secret {
            self.scrub(text, file);
        }
        Ok(kept)
    }

    /// Removes the secret from the boot partition's copy. Not a reason to fail the node (its
    /// services are configured): a failure is said, and the next boot tries again.
    fn scrub(&mut self, text: &str, file: &cluster::ClusterFile) {
        let scrubbed = cluster::scrubbed(text, file);
        if scrubbed == text {
            return;
        }
        match write_atomic(&self.boot.join(BOOT_COPY), scrubbed.as_bytes(), 0o600) {
            Ok(()) => self.rep.step(
                "scrub",
                "ok",
                &format!("secret removed from {BOOT_COPY} on the boot partition (kept in /{SAVED_COPY}, root only)"),
            ),
            Err(e) => self.rep.step(
                "scrub",
                "failed",
                &format!("the secret is still in {BOOT_COPY} on the boot partition ({e:#}); the next boot tries again"),
            ),
        }
    }

    /// Phase two: wait for the node's services, then report `picoimg: ready`.
    pub fn health(&mut self) -> Outcome {
        let (_, checked, secrets) = match self.read_cluster() {
            Ok(Some(x)) => x,
            Ok(None) => return Outcome::Unconfigured,
            Err(msg) => return self.rep.finish(Outcome::Failed, msg),
        };
        let file = &checked.file;
        let id = file.cluster.get_ref().id.get_ref().clone();
        let mut state = match state::load(&self.root) {
            Ok(Some(s)) if s.cluster_id == id && !s.node.is_empty() => s,
            Ok(_) => {
                return self.rep.finish(
                    Outcome::Failed,
                    "the node is not configured: see the `apply` step lines above".into(),
                )
            }
            Err(e) => return self.rep.finish(Outcome::Failed, format!("{e:#}")),
        };
        self.rep
            .set_cluster(format!("{} ({id})", file.cluster.get_ref().name.get_ref()));
        self.rep.set_node(state.node.clone());
        let Some(node) = file.nodes.iter().find(|n| *n.name.get_ref() == state.node) else {
            return self.rep.finish(
                Outcome::Failed,
                format!("node {} is no longer in the cluster file", state.node),
            );
        };
        let ctx = Ctx {
            file,
            node,
            secrets: &secrets,
        };
        let t = Target {
            root: &self.root,
            sys: self.sys,
        };
        let mut details = Vec::new();
        for s in self.stacks.iter().filter(|s| stack::used(**s, file)) {
            let mut progress = runner::Health {
                root: &self.root,
                rep: &mut self.rep,
                state: &mut state,
            };
            match s.health(&ctx, &t, &mut progress) {
                Ok(Some(d)) => details.push(d),
                Ok(None) => {}
                Err(e) => {
                    self.rep.step("health", "failed", &format!("{e:#}"));
                    return self.rep.finish(Outcome::Failed, format!("{e:#}"));
                }
            }
        }
        let detail = if details.is_empty() {
            "no cluster services on this node".to_owned()
        } else {
            details.join("; ")
        };
        self.rep.step("health", "ok", &detail);
        self.rep.finish(
            Outcome::Ready,
            format!(
                "node {} of cluster {}",
                node.name.get_ref(),
                file.cluster.get_ref().name.get_ref()
            ),
        )
    }
}

impl Agent<'_> {
    /// The handover server (`picoimg-firstboot serve`, picoimg-handover.service): answers the
    /// other nodes' requests for join material through the used stacks' `Stack::hand_over`
    /// until the process is stopped. Returns only if it cannot start.
    pub fn serve(&mut self) -> Result<()> {
        let (_, checked, secrets) = match self.read_cluster() {
            Ok(Some(x)) => x,
            Ok(None) => bail!("no {BOOT_COPY}: this node serves nothing"),
            Err(msg) => bail!("{msg}"),
        };
        let file = &checked.file;
        let id = file.cluster.get_ref().id.get_ref().clone();
        let state = match state::load(&self.root)? {
            Some(s) if s.cluster_id == id && !s.node.is_empty() => s,
            _ => bail!("the node is not configured yet (picoimg-firstboot apply)"),
        };
        let node = file
            .nodes
            .iter()
            .find(|n| *n.name.get_ref() == state.node)
            .with_context(|| format!("node {} is no longer in the cluster file", state.node))?;
        let listener =
            std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, crate::handover::PORT))
                .with_context(|| format!("listening on port {}", crate::handover::PORT))?;
        let ctx = Ctx {
            file,
            node,
            secrets: &secrets,
        };
        let t = Target {
            root: &self.root,
            sys: self.sys,
        };
        let stacks = self.stacks;
        let rep = &self.rep;
        println!(
            "picoimg: handover: node {} serving on port {}",
            node.name.get_ref(),
            crate::handover::PORT
        );
        crate::handover::serve(
            &listener,
            secrets.handover_key(),
            &id,
            |req| {
                let s = stacks
                    .iter()
                    .find(|s| s.name() == req.stack && stack::used(**s, file))
                    .with_context(|| format!("this cluster file does not use {}", req.stack))?;
                let from = file
                    .nodes
                    .iter()
                    .find(|n| *n.name.get_ref() == req.from)
                    .with_context(|| format!("{} is not a node of the cluster file", req.from))?;
                s.hand_over(&ctx, &t, from, &req.ask)
            },
            |line| {
                println!("{}", rep.redact(&line));
                let _ = std::io::Write::flush(&mut std::io::stdout());
            },
        );
        Ok(())
    }
}

fn base64_secret(s: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn cluster_id_of(text: &str) -> Option<String> {
    let t: toml::Table = text.parse().ok()?;
    Some(t.get("cluster")?.get("id")?.as_str()?.to_owned())
}

#[cfg(test)]
mod tests;
