//! The first-boot agent: reads the cluster file from the boot partition, finds this node in it,
//! and runs named, idempotent steps, recording each in `/var/lib/picoimg/state.json` so a power
//! cut resumes where it stopped and a rerun on a configured node does nothing.
//!
//! Two phases, two units: `apply` runs before the cluster services (hostname, hosts, network,
//! users, time, component configuration, services) and `health` after them (wait until the
//! node's services are healthy, then `picoimg: ready`). Everything is read and written below a
//! root directory; commands and ownership go through [`System`], so tests run every step
//! against a temporary tree.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cluster::{self, Checked, ClusterFile, Node, Role, TimePolicy};
use crate::cmd::Cmd;
use crate::consul;
use crate::identify::{self, Found, NotFound};
use crate::secrets;

pub const STATE: &str = "var/lib/picoimg/state.json";
pub const STATUS_JSON: &str = "run/picoimg/status.json";
/// The node's root-only copy of the cluster file, secret included.
pub const SAVED_COPY: &str = "etc/picoimg/cluster.toml";
pub use crate::contract::BUILD_INFO;
pub const NETWORK_FILE: &str = "etc/systemd/network/10-picoimg-cluster.network";
pub const TIMESYNC_DROPIN: &str = "etc/systemd/timesyncd.conf.d/50-picoimg.conf";
pub const SUDOERS: &str = "etc/sudoers.d/picoimg";
/// systemd-timesyncd creates this once the clock is synchronised.
pub const TIME_SYNCED: &str = "run/systemd/timesync/synchronized";

/// Side effects that cannot happen inside a temporary root: commands and ownership.
pub trait System {
    /// Runs a command to completion and returns its stdout.
    fn run(&self, cmd: &Cmd) -> Result<String>;
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> Result<()>;
    fn sleep(&self, d: Duration);
}

/// The real system (the agent on a node, root = `/`).
pub struct Host;

impl System for Host {
    fn run(&self, cmd: &Cmd) -> Result<String> {
        cmd.read()
    }

    fn chown(&self, path: &Path, uid: u32, gid: u32) -> Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {uid}:{gid} {}", path.display()))
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// No cluster file: the node keeps the image's defaults.
    Unconfigured,
    /// `apply` finished; services are starting.
    Configured,
    Ready,
    Failed,
    UnknownNode,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub cluster_id: String,
    pub cluster_name: String,
    pub node: String,
    /// Fingerprint of the cluster file last applied.
    pub fingerprint: String,
    pub steps: BTreeMap<String, StepRecord>,
    /// `consul version` output and the binary it came from (size:mtime), so a rerun does not
    /// start a 70 MB program to learn what it already knows.
    #[serde(default)]
    pub consul_seen: Option<(String, String)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepRecord {
    /// sha256 of what the step was given; a different value means the file changed for it.
    pub input: String,
    /// Unix time it completed.
    pub at: u64,
}

#[derive(Debug, Clone, Serialize)]
struct StepLine {
    name: String,
    result: String,
    detail: String,
}

#[derive(Debug, Clone, Serialize)]
struct Status {
    state: Outcome,
    cluster: String,
    node: String,
    message: String,
    steps: Vec<StepLine>,
    updated: u64,
}

/// Everything one run needs.
pub struct Agent<'a> {
    root: PathBuf,
    sys: &'a dyn System,
    /// Lines printed (console + journal through the unit's StandardOutput), kept for tests.
    pub lines: Vec<String>,
    echo: bool,
    boot: PathBuf,
    status: Status,
    /// Strings that must never reach the boot partition or status files.
    secrets: Vec<String>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn sha(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

pub use crate::fsutil::write_atomic;

/// Where the boot partition is mounted, from the image's build information.
pub fn boot_mount(root: &Path) -> PathBuf {
    let from_info = std::fs::read(root.join(BUILD_INFO))
        .ok()
        .and_then(|b| serde_json::from_slice::<crate::contract::BuildInfo>(&b).ok())
        .and_then(|info| info.boot_mount);
    let rel = from_info.unwrap_or_else(|| {
        ["boot/firmware", "boot/efi", "boot"]
            .into_iter()
            .find(|d| root.join(d).join("picoimg").is_dir())
            .unwrap_or("boot")
            .to_owned()
    });
    root.join(rel.trim_start_matches('/'))
}

/// The fields of `name`'s line in a colon-separated account file (`etc/passwd`, `etc/group`).
fn account(root: &Path, file: &str, name: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(root.join(file)).ok()?;
    text.lines()
        .map(|l| l.split(':').map(str::to_owned).collect::<Vec<_>>())
        .find(|f| f.first().is_some_and(|n| n == name))
}

/// A user's uid and gid from `etc/passwd`.
fn lookup_ids(root: &Path, name: &str) -> Option<(u32, u32)> {
    let f = account(root, "etc/passwd", name)?;
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

fn gid_of(root: &Path, group: &str) -> Option<u32> {
    account(root, "etc/group", group)?.get(2)?.parse().ok()
}

/// One step's plan: its name, what it was given, and whether a changed input may be applied
/// to a node that already ran it.
struct Step {
    name: &'static str,
    input: String,
    reapply: bool,
}

impl<'a> Agent<'a> {
    pub fn new(root: &Path, sys: &'a dyn System, echo: bool) -> Agent<'a> {
        Agent {
            root: root.to_owned(),
            sys,
            lines: Vec::new(),
            echo,
            boot: boot_mount(root),
            status: Status {
                state: Outcome::Configured,
                cluster: String::new(),
                node: String::new(),
                message: String::new(),
                steps: Vec::new(),
                updated: now(),
            },
            secrets: Vec::new(),
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn say(&mut self, line: String) {
        let line = self.redact(&line);
        if self.echo {
            println!("{line}");
            let _ = std::io::stdout().flush();
        }
        self.lines.push(line);
    }

    fn redact(&self, s: &str) -> String {
        let mut s = s.to_owned();
        for secret in &self.secrets {
            if !secret.is_empty() {
                s = s.replace(secret.as_str(), "<redacted>");
            }
        }
        s
    }

    fn step_line(&mut self, name: &str, result: &str, detail: &str) {
        let line = if detail.is_empty() {
            format!("picoimg: step {name} {result}")
        } else {
            format!("picoimg: step {name} {result}: {detail}")
        };
        self.say(line);
        self.status.steps.push(StepLine {
            name: name.to_owned(),
            result: result.to_owned(),
            detail: self.redact(detail),
        });
        self.publish_to(false);
    }

    /// Writes /run/picoimg/status.json and picoimg/status.txt on the boot partition.
    /// Writes /run/picoimg/status.json (after every step) and, with `boot`, picoimg/status.txt
    /// on the boot partition (at the end only: every FAT write is a chance for a power cut to
    /// damage the partition a user must then repair).
    fn publish_to(&mut self, boot: bool) {
        self.status.updated = now();
        if let Ok(json) = serde_json::to_vec_pretty(&self.status) {
            let json = self.redact(&String::from_utf8_lossy(&json));
            let _ = write_atomic(&self.p(STATUS_JSON), json.as_bytes(), 0o644);
        }
        if !boot {
            return;
        }
        let mut txt = format!(
            "# picoimg first-boot status (secrets redacted), updated {} (unix time)\nstate: {}\ncluster: {}\nnode: {}\n",
            self.status.updated,
            serde_json::to_value(self.status.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            self.status.cluster,
            self.status.node,
        );
        if !self.status.message.is_empty() {
            txt.push_str(&format!("message: {}\n", self.status.message));
        }
        for s in &self.status.steps {
            txt.push_str(&format!("step {}: {} {}\n", s.name, s.result, s.detail));
        }
        let txt = self.redact(&txt);
        if self.boot.is_dir() {
            let _ = write_atomic(&self.boot.join("picoimg/status.txt"), txt.as_bytes(), 0o600);
        }
    }

    fn finish(&mut self, state: Outcome, message: String) -> Outcome {
        self.status.state = state;
        self.status.message = self.redact(&message);
        use crate::contract::{NODE_CONFIGURED, NODE_FAILED, NODE_READY, NODE_UNCONFIGURED};
        let marker = match state {
            Outcome::Ready => NODE_READY,
            Outcome::Configured => NODE_CONFIGURED,
            Outcome::Unconfigured => NODE_UNCONFIGURED,
            Outcome::Failed | Outcome::UnknownNode => NODE_FAILED,
        };
        if message.is_empty() {
            self.say(marker.to_owned());
        } else {
            self.say(format!("{marker}: {message}"));
        }
        self.publish_to(true);
        state
    }

    fn load_state(&self) -> Result<Option<State>> {
        match std::fs::read(self.p(STATE)) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("reading {STATE}: remove it to configure the node from scratch")
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context(format!("reading {STATE}")),
        }
    }

    fn save_state(&self, s: &State) -> Result<()> {
        write_atomic(&self.p(STATE), &serde_json::to_vec_pretty(s)?, 0o600)
            .context("recording progress")
    }

    /// Reads and checks the cluster file. `None`: there is none (the node stays unconfigured).
    fn read_cluster(&mut self) -> Result<Option<(String, Checked)>, String> {
        let path = self.boot.join("picoimg/cluster.toml");
        let text = match crate::input::read_text(&path, crate::input::CONFIG_LIMIT, "cluster file")
        {
            Ok(t) => t,
            Err(crate::input::InputError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(None)
            }
            Err(e) => return Err(format!("reading picoimg/cluster.toml: {e}")),
        };
        // A secret scrubbed from the boot copy is taken from this node's own copy, if that
        // copy is of the same cluster.
        let kept = std::fs::read_to_string(self.p(SAVED_COPY))
            .ok()
            .and_then(|t| cluster::check(&t).ok())
            .filter(|saved| {
                Some(saved.file.cluster.get_ref().id.get_ref().as_str())
                    == cluster_id_of(&text).as_deref()
            })
            .map(|saved| saved.secret);
        match cluster::check_with(&text, kept) {
            Ok(c) => {
                for w in &c.warnings {
                    self.say(format!(
                        "picoimg: warning: cluster.toml: {}: {}",
                        w.field, w.message
                    ));
                }
                Ok(Some((text, c)))
            }
            Err(problems) => {
                for p in &problems {
                    self.say(format!("picoimg: {}", p.located("cluster.toml")));
                }
                let first = problems
                    .first()
                    .map(|p| p.located("cluster.toml"))
                    .unwrap_or_default();
                Err(format!(
                    "{} problem(s) in picoimg/cluster.toml, first {first}; fix the file (`picoimg cluster check`) and reboot",
                    problems.len()
                ))
            }
        }
    }

    /// Phase one: configure the node. Starts no cluster service unless every step before
    /// `services` succeeded.
    pub fn apply(&mut self) -> Outcome {
        self.say(format!("picoimg: firstboot {} starting", crate::VERSION));
        let (text, checked) = match self.read_cluster() {
            Ok(Some(x)) => x,
            Ok(None) => {
                return self.finish(
                    Outcome::Unconfigured,
                    "no picoimg/cluster.toml on the boot partition; this node keeps the image's defaults".into(),
                )
            }
            Err(msg) => return self.finish(Outcome::Failed, msg),
        };
        let file = &checked.file;
        let id = file.cluster.get_ref().id.get_ref().clone();
        self.secrets = vec![
            base64_secret(&checked.secret),
            secrets::consul_gossip_key(&checked.secret, &id),
            secrets::consul_management_token(&checked.secret, &id),
        ];
        self.status.cluster = format!("{} ({id})", file.cluster.get_ref().name.get_ref());
        let facts = identify::observe(&self.root, &self.boot);
        let found = match identify::identify(file, &facts) {
            Ok(f) => f,
            Err(NotFound::UnknownName { name, source }) => {
                return self.finish(
                    Outcome::UnknownNode,
                    format!(
                        "{source} names node \"{name}\", which picoimg/cluster.toml does not list"
                    ),
                )
            }
            Err(NotFound::NoMatch) => {
                let report = identify::unknown_report(&facts);
                let _ = write_atomic(
                    &self.boot.join("picoimg/unknown-node.txt"),
                    report.as_bytes(),
                    0o600,
                );
                return self.finish(
                    Outcome::UnknownNode,
                    "this node is not in picoimg/cluster.toml: nothing matched its MAC, serial or DMI UUID; what it saw is in picoimg/unknown-node.txt".into(),
                );
            }
        };
        let node = &file.nodes[found.index()];
        self.status.node = node.name.get_ref().clone();
        self.say(format!(
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
        match self.run_steps(&text, &checked, node, &found, &facts) {
            Ok(kept) if kept.is_empty() => self.finish(Outcome::Configured, String::new()),
            Ok(kept) => self.finish(
                Outcome::Configured,
                format!(
                    "the cluster file changed; not applied on this configured node: {} (reflash the node to apply them)",
                    kept.join(", ")
                ),
            ),
            Err(e) => self.finish(Outcome::Failed, format!("{e:#}")),
        }
    }

    fn run_steps(
        &mut self,
        text: &str,
        checked: &Checked,
        node: &Node,
        found: &Found,
        facts: &identify::Facts,
    ) -> Result<Vec<String>> {
        let file = &checked.file;
        let id = file.cluster.get_ref().id.get_ref().clone();
        let fingerprint = cluster::fingerprint(text, file);
        let mut state = match self.load_state()? {
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
        write_atomic(&self.p(SAVED_COPY), full.as_bytes(), 0o600)
            .context("keeping a copy of the cluster file")?;

        let consul_role = consul::role(node);
        let consul_version = match consul_role {
            Some(_) => Some(self.consul_version(&mut state)?),
            None => None,
        };
        let mac = match found {
            Found::Mac(_, m) => Some(m.clone()),
            _ => facts.macs.first().cloned(),
        };
        let network = network_file(file, node, mac.as_deref());
        let hosts = hosts_file(file, node);
        let time_conf = timesync_dropin(file);
        let users_input = serde_json::to_string(
            &file
                .users
                .iter()
                .map(|u| {
                    (
                        u.name.get_ref(),
                        u.sudo,
                        u.ssh_keys.iter().map(|k| k.get_ref()).collect::<Vec<_>>(),
                    )
                })
                .collect::<Vec<_>>(),
        )?;
        let consul_conf = match consul_version {
            Some(v) => Some(serde_json::to_string_pretty(&consul::config(
                file,
                node,
                &checked.secret,
                v,
            ))?),
            None => None,
        };
        let units: Vec<&str> = consul_role.map(|_| "consul.service").into_iter().collect();
        let time = &file.time;
        let steps = [
            Step {
                name: "hostname",
                input: sha(&[node.name.get_ref()]),
                reapply: false,
            },
            Step {
                name: "hosts",
                input: sha(&[&hosts]),
                reapply: true,
            },
            Step {
                name: "network",
                input: sha(&[network.as_deref().unwrap_or("dhcp")]),
                reapply: false,
            },
            Step {
                name: "users",
                input: sha(&[&users_input]),
                reapply: true,
            },
            Step {
                name: "time",
                input: sha(&[
                    &format!("{:?} {}", time.policy, time.timeout),
                    time_conf.as_deref().unwrap_or(""),
                ]),
                reapply: true,
            },
            Step {
                name: "consul",
                input: sha(&[consul_conf.as_deref().unwrap_or("none")]),
                reapply: false,
            },
            Step {
                name: "services",
                input: sha(&[&units.join(" ")]),
                reapply: true,
            },
        ];
        let mut kept = Vec::new();
        for step in steps {
            match state.steps.get(step.name) {
                Some(r) if r.input == step.input => {
                    self.step_line(step.name, "ok", "already done");
                    continue;
                }
                Some(_) if !step.reapply => {
                    self.step_line(
                        step.name,
                        "kept",
                        "its part of the cluster file changed since it was applied, and changing it on a configured node is not safe",
                    );
                    kept.push(step.name.to_owned());
                    continue;
                }
                _ => {}
            }
            let result = match step.name {
                "hostname" => self.hostname(node),
                "hosts" => self
                    .write("etc/hosts", &hosts, 0o644)
                    .map(|_| String::new()),
                "network" => self.network(node, network.as_deref()),
                "users" => self.users(file),
                "time" => self.time(file, time_conf.as_deref()),
                "consul" => self.consul(consul_version, consul_conf.as_deref()),
                _ => self.services(&units),
            };
            match result {
                Ok(detail) => {
                    state.steps.insert(
                        step.name.to_owned(),
                        StepRecord {
                            input: step.input,
                            at: now(),
                        },
                    );
                    state.node = node.name.get_ref().clone();
                    self.save_state(&state)?;
                    self.step_line(step.name, "ok", &detail);
                }
                Err(e) => {
                    self.step_line(step.name, "failed", &format!("{e:#}"));
                    return Err(e.context(format!("step {}", step.name)));
                }
            }
        }
        if kept.is_empty() {
            state.fingerprint = fingerprint;
            self.save_state(&state)?;
        }
        if file.firstboot.scrub_secret {
            let boot_copy = self.boot.join("picoimg/cluster.toml");
            let scrubbed = cluster::scrubbed(text, file);
            if scrubbed != text {
                // Not a reason to fail the node (its services are configured): say so, and
                // the next boot tries again.
                match write_atomic(&boot_copy, scrubbed.as_bytes(), 0o600) {
                    Ok(()) => self.step_line(
                        "scrub",
                        "ok",
                        "secret removed from picoimg/cluster.toml on the boot partition (kept in /etc/picoimg/cluster.toml, root only)",
                    ),
                    Err(e) => self.step_line(
                        "scrub",
                        "failed",
                        &format!("the secret is still in picoimg/cluster.toml on the boot partition ({e:#}); the next boot tries again"),
                    ),
                }
            }
        }
        Ok(kept)
    }

    fn write(&self, rel: &str, text: &str, mode: u32) -> Result<()> {
        write_atomic(&self.p(rel), text.as_bytes(), mode).with_context(|| format!("writing /{rel}"))
    }

    fn hostname(&mut self, node: &Node) -> Result<String> {
        let name = node.name.get_ref();
        self.write("etc/hostname", &format!("{name}\n"), 0o644)?;
        self.sys.run(&Cmd::new("hostname").arg(name))?;
        Ok(name.clone())
    }

    fn network(&mut self, node: &Node, file: Option<&str>) -> Result<String> {
        let path = self.p(NETWORK_FILE);
        let detail = match file {
            Some(text) => {
                self.write(NETWORK_FILE, text, 0o644)?;
                format!("static {}", node.address.get_ref())
            }
            None => {
                if path.exists() {
                    std::fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
                "dhcp".to_owned()
            }
        };
        self.sys.run(&Cmd::new("networkctl").arg("reload"))?;
        if file.is_some() {
            // Services bind to the address: wait until networkd has put it on the link.
            let want = format!("inet {}/", node.address.get_ref());
            let mut seen = String::new();
            for _ in 0..60 {
                seen = self
                    .sys
                    .run(&Cmd::new("ip").args(["-o", "-4", "addr", "show"]))?;
                if seen.contains(&want) {
                    return Ok(detail);
                }
                self.sys.sleep(Duration::from_secs(1));
            }
            bail!(
                "{} is not on any interface after 60 s (is the cable in?); addresses now: {}",
                node.address.get_ref(),
                seen.lines()
                    .filter_map(|l| l.split_whitespace().nth(3))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        Ok(detail)
    }

    fn users(&mut self, file: &ClusterFile) -> Result<String> {
        let mut sudoers = String::from("# Written by picoimg-firstboot: users of the cluster file (SSH keys only, no passwords).\n");
        let mut names = Vec::new();
        for u in &file.users {
            let name = u.name.get_ref();
            match lookup_ids(&self.root, name) {
                // The cluster file's check refuses the usual system names; this image may
                // have more (accounts its packages made).
                Some((uid, _)) if uid < 1000 => bail!(
                    "user {name} is a system account of this image (uid {uid}): pick another name under [[user]]"
                ),
                Some(_) => {}
                None => {
                // `*`: no password can match, yet the account is not locked, so SSH keys work.
                self.sys.run(
                    &Cmd::new("useradd")
                        .args(["--create-home", "--shell", "/bin/bash", "--password", "*"])
                        .args(["--comment", "picoimg cluster user"])
                        .arg(name),
                    )?;
                }
            }
            let (uid, gid) = lookup_ids(&self.root, name)
                .ok_or_else(|| anyhow!("user {name} is missing from /etc/passwd after useradd"))?;
            let home = format!("home/{name}");
            let ssh = self.p(&format!("{home}/.ssh"));
            std::fs::create_dir_all(&ssh).with_context(|| format!("creating {}", ssh.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700))?;
            let keys: String = u
                .ssh_keys
                .iter()
                .map(|k| format!("{}\n", k.get_ref().trim()))
                .collect();
            let ak = ssh.join("authorized_keys");
            write_atomic(&ak, keys.as_bytes(), 0o600)?;
            for p in [self.p(&home), ssh, ak] {
                self.sys.chown(&p, uid, gid)?;
            }
            if u.sudo {
                sudoers.push_str(&format!("{name} ALL=(ALL) NOPASSWD:ALL\n"));
            }
            names.push(format!("{name} ({} keys)", u.ssh_keys.len()));
        }
        self.write(SUDOERS, &sudoers, 0o440)?;
        Ok(if names.is_empty() {
            "no users in the cluster file".into()
        } else {
            names.join(", ")
        })
    }

    fn time(&mut self, file: &ClusterFile, dropin: Option<&str>) -> Result<String> {
        if let Some(text) = dropin {
            self.write(TIMESYNC_DROPIN, text, 0o644)?;
            self.sys
                .run(&Cmd::new("systemctl").args(["try-restart", "systemd-timesyncd.service"]))?;
        }
        let t = &file.time;
        if t.policy == TimePolicy::Skip {
            return Ok("not waiting for a synchronised clock (policy skip)".into());
        }
        for waited in 0..=t.timeout {
            if self.p(TIME_SYNCED).exists() {
                return Ok(format!("clock synchronised (waited {waited} s)"));
            }
            if waited < t.timeout {
                self.sys.sleep(Duration::from_secs(1));
            }
        }
        if t.policy == TimePolicy::Require {
            bail!(
                "clock not synchronised after {} s and the policy is \"require\": check [network] ntp and the gateway",
                t.timeout
            );
        }
        Ok(format!(
            "clock not synchronised after {} s; going on (policy sync): logs and certificates may carry wrong times",
            t.timeout
        ))
    }

    fn consul_version(&mut self, state: &mut State) -> Result<consul::Version> {
        let Ok(meta) = std::fs::metadata(self.p("usr/bin/consul")) else {
            bail!("this node has a Consul role but the image has no Consul: build it with `--stack consul` (or a stack that includes it)");
        };
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let sig = format!("{}:{mtime}", meta.len());
        let out = match &state.consul_seen {
            Some((out, s)) if *s == sig => out.clone(),
            _ => {
                let out = self.sys.run(&Cmd::new("consul").arg("version"))?;
                state.consul_seen = Some((out.clone(), sig));
                out
            }
        };
        consul::Version::parse(&out)
            .ok_or_else(|| anyhow!("cannot read the Consul version from `consul version`: {out}"))
    }

    fn consul(&mut self, version: Option<consul::Version>, conf: Option<&str>) -> Result<String> {
        let (Some(version), Some(conf)) = (version, conf) else {
            return Ok("no Consul role on this node".into());
        };
        let path = self.p(consul::CONFIG);
        // Tokens and the gossip key: readable by root and the consul group only.
        self.write(consul::CONFIG, conf, 0o640)?;
        if let Some(gid) = gid_of(&self.root, "consul") {
            self.sys.chown(&path, 0, gid)?;
        }
        self.write(consul::RESOLVED_DROPIN, consul::resolved_dropin(), 0o644)?;
        self.sys.run(
            &Cmd::new("systemctl").args(["try-reload-or-restart", "systemd-resolved.service"]),
        )?;
        Ok(format!(
            "Consul {version}: /{} ({} key for the initial token)",
            consul::CONFIG,
            version.initial_token_key()
        ))
    }

    fn services(&mut self, units: &[&str]) -> Result<String> {
        if units.is_empty() {
            return Ok("no cluster services on this node".into());
        }
        self.sys
            .run(&Cmd::new("systemctl").arg("enable").args(units))?;
        // --no-block: the units are ordered after this one, so they start once it exits.
        self.sys.run(
            &Cmd::new("systemctl")
                .args(["start", "--no-block"])
                .args(units),
        )?;
        Ok(format!("enabled and started {}", units.join(" ")))
    }

    /// Phase two: wait for the node's services, then report `picoimg: ready`.
    pub fn health(&mut self) -> Outcome {
        let (_, checked) = match self.read_cluster() {
            Ok(Some(x)) => x,
            Ok(None) => return Outcome::Unconfigured,
            Err(msg) => return self.finish(Outcome::Failed, msg),
        };
        let file = &checked.file;
        let id = file.cluster.get_ref().id.get_ref().clone();
        let token = secrets::consul_management_token(&checked.secret, &id);
        self.secrets = vec![
            base64_secret(&checked.secret),
            secrets::consul_gossip_key(&checked.secret, &id),
            token.clone(),
        ];
        let state = match self.load_state() {
            Ok(Some(s)) if s.cluster_id == id && !s.node.is_empty() => s,
            Ok(_) => {
                return self.finish(
                    Outcome::Failed,
                    "the node is not configured: see the `apply` step lines above".into(),
                )
            }
            Err(e) => return self.finish(Outcome::Failed, format!("{e:#}")),
        };
        self.status.cluster = format!("{} ({id})", file.cluster.get_ref().name.get_ref());
        self.status.node = state.node.clone();
        let Some(node) = file.nodes.iter().find(|n| *n.name.get_ref() == state.node) else {
            return self.finish(
                Outcome::Failed,
                format!("node {} is no longer in the cluster file", state.node),
            );
        };
        let detail = match consul::role(node) {
            None => "no cluster services on this node".to_owned(),
            Some(role) => match self.consul_health(file, node, role, &token, state) {
                Ok(d) => d,
                Err(e) => {
                    self.step_line("health", "failed", &format!("{e:#}"));
                    return self.finish(Outcome::Failed, format!("{e:#}"));
                }
            },
        };
        self.step_line("health", "ok", &detail);
        self.finish(
            Outcome::Ready,
            format!(
                "node {} of cluster {}",
                node.name.get_ref(),
                file.cluster.get_ref().name.get_ref()
            ),
        )
    }

    fn consul_health(
        &mut self,
        file: &ClusterFile,
        node: &Node,
        role: Role,
        token: &str,
        mut state: State,
    ) -> Result<String> {
        let limit = file.firstboot.health_timeout;
        let name = node.name.get_ref();
        let consul = |args: &[&str]| {
            Cmd::new("consul")
                .args(args)
                .env("CONSUL_HTTP_TOKEN", token)
        };
        let mut last = String::new();
        // Bounded by seconds slept and by the clock, whichever is further along (the consul
        // commands themselves take time on a slow board).
        let started = std::time::Instant::now();
        let mut slept = 0;
        let mut reported = 0;
        let voters = loop {
            let members = self.sys.run(&consul(&["members"])).unwrap_or_default();
            let peers = self
                .sys
                .run(&consul(&["operator", "raft", "list-peers"]))
                .unwrap_or_default();
            let (voters, leader) = consul::raft_peers(&peers);
            if consul::member_alive(&members, name) && leader {
                break voters;
            }
            let now_state = format!(
                "{}; {voters} raft voter(s), {}",
                if consul::member_alive(&members, name) {
                    "member"
                } else {
                    "not yet a member"
                },
                if leader {
                    "leader elected"
                } else {
                    "no leader yet"
                }
            );
            let waited = slept.max(started.elapsed().as_secs());
            if now_state != last || waited >= reported + 60 {
                reported = waited;
                self.say(format!(
                    "picoimg: waiting for consul ({waited} s): {now_state}"
                ));
                last = now_state;
            }
            if waited >= limit {
                bail!(
                    "consul not healthy after {limit} s ({last}): are the servers ({}) powered and on the network?",
                    consul::server_addresses(file).join(", ")
                );
            }
            self.sys.sleep(Duration::from_secs(2));
            slept += 2;
        };
        let acl = file.consul.as_ref().is_none_or(|c| c.acl);
        if acl && role == Role::ConsulServer && !state.steps.contains_key("consul-dns-policy") {
            self.dns_policy(token)?;
            state.steps.insert(
                "consul-dns-policy".into(),
                StepRecord {
                    input: sha(&[consul::DNS_RULES]),
                    at: now(),
                },
            );
            self.save_state(&state)?;
            self.step_line(
                "consul-dns-policy",
                "ok",
                "anonymous requests may read nodes and services (DNS), nothing else",
            );
        }
        Ok(format!(
            "consul {}: member, leader elected, {voters} raft voter(s)",
            if role == Role::ConsulServer {
                "server"
            } else {
                "client"
            },
        ))
    }

    /// Lets `.consul` DNS work under default-deny ACLs: a read-only policy on the anonymous
    /// token. Every server tries; the second one finds the policy there already.
    fn dns_policy(&mut self, token: &str) -> Result<()> {
        let consul = |args: &[&str]| {
            Cmd::new("consul")
                .args(args)
                .env("CONSUL_HTTP_TOKEN", token)
        };
        let mut last = None;
        for _ in 0..10 {
            let created = self.sys.run(&consul(&[
                "acl",
                "policy",
                "create",
                "-name",
                consul::DNS_POLICY,
                "-description",
                "picoimg: DNS reads for anonymous requests",
                "-rules",
                consul::DNS_RULES,
            ]));
            let exists = match &created {
                Ok(_) => true,
                Err(e) => format!("{e:#}").contains("already exists"),
            };
            if exists {
                match self.sys.run(&consul(&[
                    "acl",
                    "token",
                    "update",
                    "-id",
                    consul::ANONYMOUS_TOKEN,
                    "-policy-name",
                    consul::DNS_POLICY,
                    "-description",
                    "Anonymous Token (picoimg: DNS reads)",
                ])) {
                    Ok(_) => return Ok(()),
                    Err(e) => last = Some(e),
                }
            } else if let Err(e) = created {
                last = Some(e);
            }
            self.sys.sleep(Duration::from_secs(3));
        }
        Err(last
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context("giving the anonymous token the DNS policy"))
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

fn hosts_file(file: &ClusterFile, node: &Node) -> String {
    let peers: Vec<(&str, &str)> = file
        .nodes
        .iter()
        .filter(|n| n.address.get_ref() != "dhcp")
        .map(|n| (n.address.get_ref().as_str(), n.name.get_ref().as_str()))
        .collect();
    crate::contract::hosts(
        "picoimg-firstboot from the cluster file",
        node.name.get_ref(),
        &peers,
    )
}

/// The networkd file for a static address (`None` for DHCP: the image's default applies).
fn network_file(file: &ClusterFile, node: &Node, mac: Option<&str>) -> Option<String> {
    let addr = node.address.get_ref();
    if addr == "dhcp" {
        return None;
    }
    let prefix = cluster::Subnet::parse(file.network.subnet.get_ref()).map_or(24, |s| s.prefix);
    let mut s =
        String::from("# Written by picoimg-firstboot: this node's cluster address.\n[Match]\n");
    match mac {
        Some(m) => s.push_str(&format!("MACAddress={m}\n")),
        None => s.push_str("Type=ether\n"),
    }
    s.push_str(&format!(
        "\n[Network]\nAddress={addr}/{prefix}\nGateway={}\n",
        file.network.gateway.get_ref()
    ));
    for d in &file.network.dns {
        s.push_str(&format!("DNS={}\n", d.get_ref()));
    }
    for n in &file.network.ntp {
        s.push_str(&format!("NTP={}\n", n.get_ref()));
    }
    Some(s)
}

fn timesync_dropin(file: &ClusterFile) -> Option<String> {
    (!file.network.ntp.is_empty()).then(|| {
        format!(
            "# Written by picoimg-firstboot from the cluster file.\n[Time]\nNTP={}\n",
            file.network
                .ntp
                .iter()
                .map(|n| n.get_ref().as_str())
                .collect::<Vec<_>>()
                .join(" ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{check, render_init, InitOptions};
    use std::cell::RefCell;
    use std::os::unix::fs::PermissionsExt;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ0b2RqZ2x0b2RqZ2x0b2RqZ2x0b2RqZ2x0b2RqZ2x0b2Rq pico@laptop";

    /// Commands are recorded; the few whose output matters answer as the real ones would.
    struct Fake {
        root: PathBuf,
        calls: RefCell<Vec<String>>,
        fail: Option<&'static str>,
        healthy: bool,
    }

    impl Fake {
        fn new(root: &Path) -> Fake {
            Fake {
                root: root.to_owned(),
                calls: RefCell::new(Vec::new()),
                fail: None,
                healthy: true,
            }
        }
        fn calls(&self) -> Vec<String> {
            self.calls.borrow().clone()
        }
    }

    impl System for Fake {
        fn run(&self, cmd: &Cmd) -> Result<String> {
            let line = cmd.display();
            self.calls.borrow_mut().push(line.clone());
            if self.fail.is_some_and(|f| line.starts_with(f)) {
                bail!("`{line}` failed (exit status: 1)");
            }
            if line.starts_with("useradd") {
                let name = line.rsplit(' ').next().unwrap();
                let mut p = std::fs::read_to_string(self.root.join("etc/passwd")).unwrap();
                p.push_str(&format!("{name}:x:1000:1000::/home/{name}:/bin/bash\n"));
                std::fs::write(self.root.join("etc/passwd"), p).unwrap();
            }
            Ok(match line.as_str() {
                "consul version" => "Consul v1.8.7\nProtocol 2 spoken by default\n".into(),
                "ip -o -4 addr show" => "2: enp0s2    inet 10.42.0.11/24 brd 10.42.0.255 scope global enp0s2\n".into(),
                "consul members" if self.healthy => "Node  Address  Status  Type  Build  Protocol  DC  Segment\npc1  10.42.0.11:8301  alive  server  1.8.7  2  dc1  <all>\n".into(),
                "consul operator raft list-peers" if self.healthy => "Node  ID  Address  State  Voter  RaftProtocol\npc0  a  10.42.0.10:8300  leader  true  3\npc1  b  10.42.0.11:8300  follower  true  3\npc2  c  10.42.0.12:8300  follower  true  3\n".into(),
                _ => String::new(),
            })
        }
        fn chown(&self, _: &Path, _: u32, _: u32) -> Result<()> {
            Ok(())
        }
        fn sleep(&self, _: Duration) {}
    }

    fn cluster_text() -> String {
        render_init(&InitOptions {
            name: "lab",
            nodes: 3,
            subnet: "10.42.0.0/24",
        })
        .unwrap()
        .replace(
            "# match = { mac = \"52:54:00:00:00:02\" }",
            "match = { mac = \"52:54:00:00:00:02\" }",
        )
        .replace(
            "# [[user]]\n# name = \"pico\"\n# ssh_keys = [\"ssh-ed25519 AAAA... you@laptop\"]",
            &format!("[[user]]\nname = \"pico\"\nssh_keys = [\"{KEY}\"]"),
        )
        .replace("policy = \"sync\"", "policy = \"skip\"")
    }

    /// A node's root: an H4-like boot mount, one NIC with pc1's MAC, Consul installed.
    fn node_root(text: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let w = |rel: &str, t: &str| {
            let p = r.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, t).unwrap();
        };
        w(
            BUILD_INFO,
            r#"{"name":"h4-consul","boot_mount":"/boot/efi"}"#,
        );
        w("boot/efi/picoimg/cluster.toml", text);
        w("sys/class/net/enp0s2/address", "52:54:00:00:00:02\n");
        w("usr/bin/consul", "");
        w("etc/passwd", "root:x:0:0:root:/root:/bin/bash\nconsul:x:100:101::/var/lib/consul:/usr/sbin/nologin\n");
        w("etc/group", "root:x:0:\nconsul:x:101:\n");
        d
    }

    fn secret_strings(text: &str) -> Vec<String> {
        let c = check(text).unwrap();
        let id = c.file.cluster.get_ref().id.get_ref().clone();
        vec![
            base64_secret(&c.secret),
            secrets::consul_gossip_key(&c.secret, &id),
            secrets::consul_management_token(&c.secret, &id),
        ]
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn apply_configures_every_step_and_scrubs_the_secret() {
        let text = cluster_text();
        let d = node_root(&text);
        let r = d.path();
        let fake = Fake::new(r);
        let mut a = Agent::new(r, &fake, false);
        assert_eq!(a.apply(), Outcome::Configured, "{:#?}", a.lines);
        for step in [
            "hostname", "hosts", "network", "users", "time", "consul", "services", "scrub",
        ] {
            assert!(
                a.lines
                    .iter()
                    .any(|l| l.starts_with(&format!("picoimg: step {step} ok"))),
                "{step}: {:#?}",
                a.lines
            );
        }
        assert_eq!(
            std::fs::read_to_string(r.join("etc/hostname")).unwrap(),
            "pc1\n"
        );
        let hosts = std::fs::read_to_string(r.join("etc/hosts")).unwrap();
        assert!(hosts.contains("10.42.0.12\tpc2"), "{hosts}");
        let net = std::fs::read_to_string(r.join(NETWORK_FILE)).unwrap();
        assert!(net.contains("MACAddress=52:54:00:00:00:02"), "{net}");
        assert!(net.contains("Address=10.42.0.11/24"), "{net}");
        // Consul: JSON that the 1.8 agent reads, with the 1.8 key name.
        let conf: serde_json::Value =
            serde_json::from_slice(&std::fs::read(r.join(consul::CONFIG)).unwrap()).unwrap();
        assert_eq!(conf["node_name"], "pc1");
        assert!(conf["acl"]["tokens"]["master"].is_string());
        assert_eq!(mode(&r.join(consul::CONFIG)), 0o640);
        let resolved = std::fs::read_to_string(r.join(consul::RESOLVED_DROPIN)).unwrap();
        assert!(resolved.contains("DNS=127.0.0.1:8600") && resolved.contains("Domains=~consul"));
        // Users: keys only.
        let ak = r.join("home/pico/.ssh/authorized_keys");
        assert_eq!(std::fs::read_to_string(&ak).unwrap().trim(), KEY);
        assert_eq!(mode(&ak), 0o600);
        assert!(std::fs::read_to_string(r.join(SUDOERS))
            .unwrap()
            .contains("pico ALL=(ALL) NOPASSWD:ALL"));
        let calls = fake.calls();
        assert!(calls.contains(&"hostname pc1".to_owned()), "{calls:#?}");
        assert!(
            calls.contains(&"systemctl enable consul.service".to_owned()),
            "{calls:#?}"
        );
        assert!(
            calls
                .iter()
                .any(|c| c.starts_with("useradd") && c.contains("'*'")),
            "{calls:#?}"
        );
        // The node keeps a root-only full copy; the boot copy loses its secret but stays valid
        // for this node.
        let saved = r.join(SAVED_COPY);
        assert_eq!(mode(&saved), 0o600);
        let saved_text = std::fs::read_to_string(&saved).unwrap();
        assert_eq!(saved_text, text);
        let boot = std::fs::read_to_string(r.join("boot/efi/picoimg/cluster.toml")).unwrap();
        assert!(boot.contains("secret = \"\""), "{boot}");
        assert!(check(&boot).is_err(), "scrubbed file alone has no secret");
        // Status files: present, and no secret in them or in the lines.
        let status: serde_json::Value =
            serde_json::from_slice(&std::fs::read(r.join(STATUS_JSON)).unwrap()).unwrap();
        assert_eq!(status["state"], "configured");
        assert_eq!(status["node"], "pc1");
        let txt = std::fs::read_to_string(r.join("boot/efi/picoimg/status.txt")).unwrap();
        assert!(txt.contains("step consul: ok"), "{txt}");
        let json = std::fs::read_to_string(r.join(STATUS_JSON)).unwrap();
        for s in secret_strings(&text) {
            assert!(!txt.contains(&s) && !json.contains(&s) && !boot.contains(&s));
            assert!(a.lines.iter().all(|l| !l.contains(&s)));
            assert!(
                calls.iter().all(|l| !l.contains(&s)),
                "secret on a command line"
            );
        }
    }

    #[test]
    fn rerun_on_a_configured_node_does_nothing() {
        let text = cluster_text();
        let d = node_root(&text);
        let r = d.path();
        assert_eq!(
            Agent::new(r, &Fake::new(r), false).apply(),
            Outcome::Configured
        );
        let fake = Fake::new(r);
        let mut a = Agent::new(r, &fake, false);
        assert_eq!(a.apply(), Outcome::Configured, "{:#?}", a.lines);
        let done = a
            .lines
            .iter()
            .filter(|l| l.ends_with(" ok: already done"))
            .count();
        assert_eq!(done, 7, "{:#?}", a.lines);
        assert!(fake.calls().is_empty(), "{:#?}", fake.calls());
    }

    #[test]
    fn a_power_cut_mid_way_resumes_where_it_stopped() {
        let text = cluster_text();
        let d = node_root(&text);
        let r = d.path();
        // First boot dies at the services step (as if the power went while enabling units).
        let mut broken = Fake::new(r);
        broken.fail = Some("systemctl enable");
        let mut a = Agent::new(r, &broken, false);
        assert_eq!(a.apply(), Outcome::Failed);
        assert!(
            a.lines
                .iter()
                .any(|l| l.starts_with("picoimg: step services failed:")),
            "{:#?}",
            a.lines
        );
        assert!(
            a.lines
                .last()
                .unwrap()
                .starts_with("picoimg: failed: step services"),
            "{:#?}",
            a.lines
        );
        // The secret stays on the boot partition until the node is configured.
        let boot = std::fs::read_to_string(r.join("boot/efi/picoimg/cluster.toml")).unwrap();
        assert_eq!(boot, text);
        let fake = Fake::new(r);
        let mut a = Agent::new(r, &fake, false);
        assert_eq!(a.apply(), Outcome::Configured, "{:#?}", a.lines);
        assert_eq!(
            a.lines
                .iter()
                .filter(|l| l.ends_with("already done"))
                .count(),
            6
        );
        assert!(a
            .lines
            .iter()
            .any(|l| l == "picoimg: step services ok: enabled and started consul.service"));
        assert!(!fake
            .calls()
            .iter()
            .any(|c| c.starts_with("useradd") || c.starts_with("hostname")));
    }

    #[test]
    fn a_changed_file_is_applied_only_where_safe() {
        let text = cluster_text();
        let d = node_root(&text);
        let r = d.path();
        assert_eq!(
            Agent::new(r, &Fake::new(r), false).apply(),
            Outcome::Configured
        );
        // The user moves pc1 to another address and adds a key: keys are safe, the address is not.
        let mut changed = std::fs::read_to_string(r.join("boot/efi/picoimg/cluster.toml"))
            .unwrap()
            .replace("10.42.0.11", "10.42.0.21");
        changed = changed.replace(
            &format!("ssh_keys = [\"{KEY}\"]"),
            &format!(
                "ssh_keys = [\"{KEY}\", \"{}\"]",
                KEY.replace("laptop", "desk")
            ),
        );
        std::fs::write(r.join("boot/efi/picoimg/cluster.toml"), &changed).unwrap();
        let fake = Fake::new(r);
        let mut a = Agent::new(r, &fake, false);
        assert_eq!(a.apply(), Outcome::Configured, "{:#?}", a.lines);
        let line = |s: &str| {
            a.lines
                .iter()
                .find(|l| l.starts_with(&format!("picoimg: step {s} ")))
                .cloned()
                .unwrap()
        };
        assert!(
            line("network").starts_with("picoimg: step network kept"),
            "{:#?}",
            a.lines
        );
        assert!(
            line("consul").starts_with("picoimg: step consul kept"),
            "{:#?}",
            a.lines
        );
        assert!(
            line("users").starts_with("picoimg: step users ok: pico (2 keys)"),
            "{:#?}",
            a.lines
        );
        assert!(
            line("hosts").starts_with("picoimg: step hosts ok"),
            "{:#?}",
            a.lines
        );
        assert!(a
            .lines
            .last()
            .unwrap()
            .contains("not applied on this configured node: network, consul"));
        let net = std::fs::read_to_string(r.join(NETWORK_FILE)).unwrap();
        assert!(net.contains("10.42.0.11/24"), "address untouched: {net}");
    }

    #[test]
    fn validation_errors_start_nothing() {
        // Two servers: an even count.
        let text = cluster_text().replacen(
            "roles = [\"consul-server\"]",
            "roles = [\"consul-client\"]",
            1,
        );
        let d = node_root(&text);
        let r = d.path();
        let fake = Fake::new(r);
        let mut a = Agent::new(r, &fake, false);
        assert_eq!(a.apply(), Outcome::Failed);
        assert!(fake.calls().is_empty(), "{:#?}", fake.calls());
        let last = a.lines.last().unwrap();
        assert!(last.starts_with("picoimg: failed: 1 problem(s) in picoimg/cluster.toml, first cluster.toml: node.roles: 2 consul-server nodes"), "{last}");
        assert!(!r.join(consul::CONFIG).exists() && !r.join(STATE).exists());
        let txt = std::fs::read_to_string(r.join("boot/efi/picoimg/status.txt")).unwrap();
        assert!(txt.contains("state: failed"), "{txt}");
        // A malformed file names its line.
        let d = node_root("schema = \"picoimg.cluster/1\"\n[cluster\nname = 1\n");
        let mut a = Agent::new(d.path(), &fake, false);
        assert_eq!(a.apply(), Outcome::Failed);
        assert!(
            a.lines
                .iter()
                .any(|l| l.starts_with("picoimg: cluster.toml:2: ")),
            "{:#?}",
            a.lines
        );
    }

    #[test]
    fn unknown_node_writes_what_it_saw() {
        let d = node_root(&cluster_text());
        let r = d.path();
        std::fs::write(
            r.join("sys/class/net/enp0s2/address"),
            "52:54:00:99:99:99\n",
        )
        .unwrap();
        let fake = Fake::new(r);
        let mut a = Agent::new(r, &fake, false);
        assert_eq!(a.apply(), Outcome::UnknownNode);
        let seen = std::fs::read_to_string(r.join("boot/efi/picoimg/unknown-node.txt")).unwrap();
        assert!(seen.contains("mac = \"52:54:00:99:99:99\""), "{seen}");
        assert!(a
            .lines
            .last()
            .unwrap()
            .starts_with("picoimg: failed: this node is not in"));
        assert!(fake.calls().is_empty());
    }

    #[test]
    fn no_cluster_file_leaves_the_node_alone_and_another_cluster_is_refused() {
        let d = node_root("");
        let r = d.path();
        std::fs::remove_file(r.join("boot/efi/picoimg/cluster.toml")).unwrap();
        let fake = Fake::new(r);
        assert_eq!(Agent::new(r, &fake, false).apply(), Outcome::Unconfigured);
        assert!(fake.calls().is_empty());

        let d = node_root(&cluster_text());
        let r = d.path();
        assert_eq!(
            Agent::new(r, &Fake::new(r), false).apply(),
            Outcome::Configured
        );
        // A file of a new cluster (new id and secret) on a configured node.
        std::fs::write(r.join("boot/efi/picoimg/cluster.toml"), cluster_text()).unwrap();
        let fake = Fake::new(r);
        let mut a = Agent::new(r, &fake, false);
        assert_eq!(a.apply(), Outcome::Failed);
        assert!(
            a.lines
                .last()
                .unwrap()
                .contains("this node was configured for cluster lab"),
            "{:#?}",
            a.lines
        );
    }

    #[test]
    fn health_waits_for_consul_then_sets_the_dns_policy_once() {
        let text = cluster_text();
        let d = node_root(&text);
        let r = d.path();
        assert_eq!(
            Agent::new(r, &Fake::new(r), false).apply(),
            Outcome::Configured
        );
        let fake = Fake::new(r);
        let mut a = Agent::new(r, &fake, false);
        assert_eq!(a.health(), Outcome::Ready, "{:#?}", a.lines);
        assert_eq!(
            a.lines.last().unwrap(),
            "picoimg: ready: node pc1 of cluster lab"
        );
        let calls = fake.calls();
        assert!(
            calls
                .iter()
                .any(|c| c.starts_with("consul acl policy create -name picoimg-dns")),
            "{calls:#?}"
        );
        assert!(calls
            .iter()
            .any(|c| c
                .starts_with("consul acl token update -id 00000000-0000-0000-0000-000000000002")));
        let status: serde_json::Value =
            serde_json::from_slice(&std::fs::read(r.join(STATUS_JSON)).unwrap()).unwrap();
        assert_eq!(status["state"], "ready");
        // Next boot: health again (the services may take a moment) but no second policy.
        let fake = Fake::new(r);
        assert_eq!(Agent::new(r, &fake, false).health(), Outcome::Ready);
        assert!(!fake.calls().iter().any(|c| c.contains("acl")));
    }

    #[test]
    fn health_gives_up_after_its_timeout() {
        let text = cluster_text().replace("health_timeout = 900", "health_timeout = 10");
        let d = node_root(&text);
        let r = d.path();
        assert_eq!(
            Agent::new(r, &Fake::new(r), false).apply(),
            Outcome::Configured
        );
        let mut fake = Fake::new(r);
        fake.healthy = false;
        let mut a = Agent::new(r, &fake, false);
        assert_eq!(a.health(), Outcome::Failed);
        let last = a.lines.last().unwrap();
        assert!(
            last.starts_with("picoimg: failed: consul not healthy after 10 s"),
            "{last}"
        );
        assert!(
            last.contains("10.42.0.10, 10.42.0.11, 10.42.0.12"),
            "{last}"
        );
        assert!(fake.calls().len() <= 14, "bounded: {}", fake.calls().len());
    }

    #[test]
    fn time_policy_require_fails_without_a_clock_and_sync_goes_on() {
        let text = cluster_text()
            .replace("policy = \"skip\"", "policy = \"require\"")
            .replace("timeout = 180", "timeout = 3");
        let d = node_root(&text);
        let r = d.path();
        let fake = Fake::new(r);
        let mut a = Agent::new(r, &fake, false);
        assert_eq!(a.apply(), Outcome::Failed);
        assert!(
            a.lines
                .iter()
                .any(|l| l
                    .starts_with("picoimg: step time failed: clock not synchronised after 3 s")),
            "{:#?}",
            a.lines
        );
        let text = text.replace("policy = \"require\"", "policy = \"sync\"");
        let d = node_root(&text);
        let r = d.path();
        let fake = Fake::new(r);
        let mut a = Agent::new(r, &fake, false);
        assert_eq!(a.apply(), Outcome::Configured);
        let d = node_root(&text);
        let r = d.path();
        std::fs::create_dir_all(r.join("run/systemd/timesync")).unwrap();
        std::fs::write(r.join(TIME_SYNCED), "").unwrap();
        let fake = Fake::new(r);
        let mut a = Agent::new(r, &fake, false);
        assert_eq!(a.apply(), Outcome::Configured);
        assert!(
            a.lines
                .iter()
                .any(|l| l == "picoimg: step time ok: clock synchronised (waited 0 s)"),
            "{:#?}",
            a.lines
        );
    }

    /// The issue's bad-input list, on a device: `picoimg: failed` with the same line and field
    /// `cluster check` names, and no command run (so no service started).
    #[test]
    fn every_kind_of_bad_file_fails_the_node_with_its_line() {
        let good = cluster_text();
        let secret_line = good
            .lines()
            .find(|l| l.starts_with("secret = "))
            .unwrap()
            .to_owned();
        let cases: Vec<(String, &str)> = vec![
            (good.replace("[network]", "[network"), "cluster.toml:"),
            (
                good.replace("acl = true", "acl = true\nacls = false"),
                "unknown field `acls`",
            ),
            (
                good.replace("picoimg.cluster/1", "picoimg.cluster/2"),
                "cluster.toml:1: schema: picoimg.cluster/2 is major version 2",
            ),
            (
                good.replace(
                    "# match = { mac = \"52:54:00:00:00:01\" }",
                    "match = { mac = \"52:54:00:00:00:02\" }",
                ),
                "node[1].match.mac: duplicate MAC 52:54:00:00:00:02",
            ),
            (
                good.replace("address = \"10.42.0.12\"", "address = \"10.43.0.12\""),
                "node[2].address: 10.43.0.12 is outside the subnet",
            ),
            (good.replace(&secret_line, ""), "cluster.secret: missing"),
        ];
        for (text, want) in cases {
            let d = node_root(&text);
            let r = d.path();
            let fake = Fake::new(r);
            let mut a = Agent::new(r, &fake, false);
            assert_eq!(a.apply(), Outcome::Failed, "{want}: {:#?}", a.lines);
            let all = a.lines.join("\n");
            assert!(all.contains(want), "want {want}:\n{all}");
            assert!(
                a.lines.last().unwrap().starts_with("picoimg: failed: "),
                "{all}"
            );
            assert!(fake.calls().is_empty(), "{want}: {:#?}", fake.calls());
            assert!(!r.join(consul::CONFIG).exists() && !r.join(STATE).exists());
        }
    }
}
