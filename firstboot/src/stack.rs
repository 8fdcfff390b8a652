//! The one interface a cluster stack implements on the node. Everything
//! stack-specific comes through it: the cluster-file section it owns and its whole-file checks,
//! the node roles it serves, the secrets it derives, its configuration steps, the units it
//! starts and its health check. The core (cluster-file frame, identification, state, reporting,
//! runner, base steps) names no stack; `stacks::registry()` is the list it works through.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Result};
use base64::Engine;

use crate::agent::system::Target;
use crate::cluster::{ClusterFile, Node, Problem};

/// A stack's section of the cluster file as parsed by the stack (its own type, strict).
pub type Section = Arc<dyn Any + Send + Sync>;

/// A value of the cluster file as the parser holds it, with its span in the text.
pub type Raw<'i> = toml::Spanned<toml::de::DeValue<'i>>;

/// How a derived secret is written where it is used.
#[derive(Debug, Clone, Copy)]
pub enum Form {
    /// Standard base64 of the bytes.
    Base64,
    /// A UUID built from 16 bytes (as several cluster tools format their tokens).
    Uuid,
    /// Lowercase hex of the bytes.
    Hex,
    /// The stack's own encoding of the bytes (a tool's binary key format, ...).
    Custom(fn(&[u8]) -> String),
}

/// One secret a stack derives from the cluster secret (HKDF-SHA256, see `secrets`).
#[derive(Debug, Clone, Copy)]
pub struct SecretSpec {
    /// Short name (`<stack>-management-token`), for `picoimg cluster token FILE NAME`.
    pub name: &'static str,
    /// HKDF `info`: part of the on-disk contract, never changed for a released stack.
    pub label: &'static str,
    pub bytes: usize,
    pub form: Form,
    /// The token an operator logs in with (printed by `picoimg cluster token FILE`).
    pub operator: bool,
    /// One value per node of the file (the label gets `/<node name>` appended), for keys that
    /// belong to one daemon each.
    pub per_node: bool,
}

/// Every secret of every registered stack for one cluster, derived once. Stacks get their
/// values only from here, by label, so a secret a stack did not declare cannot be used, and
/// everything here is redacted from every report.
#[derive(Debug, Clone)]
pub struct Secrets {
    cluster: String,
    /// The handover channel's key (`crate::handover`), derived for the core, not a stack.
    handover: [u8; 32],
    /// By label (`label/node` for a per-node secret).
    values: BTreeMap<String, (SecretSpec, String)>,
}

impl Secrets {
    /// Derives every secret the stacks declare; per-node ones for each of `nodes`.
    pub fn derive(
        stacks: &[&dyn Stack],
        secret: &[u8; 32],
        cluster_id: &str,
        nodes: &[&str],
    ) -> Secrets {
        let mut values = BTreeMap::new();
        for spec in stacks.iter().flat_map(|s| s.secrets()) {
            let labels: Vec<String> = if spec.per_node {
                nodes
                    .iter()
                    .map(|n| format!("{}/{n}", spec.label))
                    .collect()
            } else {
                vec![spec.label.to_owned()]
            };
            for label in labels {
                let bytes = crate::secrets::derive(secret, cluster_id, &label, spec.bytes);
                values.insert(label, (*spec, encode(spec.form, &bytes)));
            }
        }
        let mut handover = [0u8; 32];
        handover.copy_from_slice(&crate::secrets::derive(
            secret,
            cluster_id,
            crate::handover::KEY_LABEL,
            32,
        ));
        Secrets {
            cluster: base64::engine::general_purpose::STANDARD.encode(secret),
            handover,
            values,
        }
    }

    /// Every secret of `stacks` for the checked cluster file `c` (its id, secret and nodes).
    pub fn of(stacks: &[&dyn Stack], c: &crate::cluster::Checked) -> Secrets {
        let nodes: Vec<&str> = c
            .file
            .nodes
            .iter()
            .map(|n| n.name.get_ref().as_str())
            .collect();
        Secrets::derive(
            stacks,
            &c.secret,
            c.file.cluster.get_ref().id.get_ref(),
            &nodes,
        )
    }

    /// The value for `label`; an error if no registered stack declares it.
    pub fn get(&self, label: &str) -> Result<&str> {
        match self.values.get(label) {
            Some((_, v)) => Ok(v),
            None => bail!("secret {label} is not declared by any registered stack"),
        }
    }

    /// The value of a per-node secret for `node`.
    pub fn get_for(&self, label: &str, node: &str) -> Result<&str> {
        self.get(&format!("{label}/{node}"))
    }

    /// The value of the secret named `name` (`SecretSpec::name`; `name/node` for a per-node
    /// one).
    pub fn named(&self, name: &str) -> Option<(&SecretSpec, &str)> {
        self.values
            .iter()
            .find(|(label, (s, _))| {
                if s.per_node {
                    label
                        .strip_prefix(s.label)
                        .and_then(|n| n.strip_prefix('/'))
                        .is_some_and(|n| name.strip_prefix(s.name) == Some(&format!("/{n}")))
                } else {
                    s.name == name
                }
            })
            .map(|(_, (s, v))| (s, v.as_str()))
    }

    /// The name of every value (`name`, or `name/node` for a per-node secret), in label order.
    pub fn names(&self) -> Vec<String> {
        self.values
            .iter()
            .map(|(label, (s, _))| format!("{}{}", s.name, &label[s.label.len()..]))
            .collect()
    }

    /// Every declared secret with its value.
    pub fn specs(&self) -> impl Iterator<Item = (&SecretSpec, &str)> {
        self.values.values().map(|(s, v)| (s, v.as_str()))
    }

    /// The key of the handover channel (`crate::handover`).
    pub fn handover_key(&self) -> &[u8; 32] {
        &self.handover
    }

    /// Every string that must never be reported: the cluster secret and each derived value.
    pub fn redacted(&self) -> Vec<String> {
        std::iter::once(self.cluster.clone())
            .chain(std::iter::once(hex::encode(self.handover)))
            .chain(self.values.values().map(|(_, v)| v.clone()))
            .collect()
    }
}

/// Writes derived bytes in `form`.
pub fn encode(form: Form, bytes: &[u8]) -> String {
    match form {
        Form::Base64 => base64::engine::general_purpose::STANDARD.encode(bytes),
        Form::Hex => hex::encode(bytes),
        Form::Uuid => {
            let mut b = [0u8; 16];
            let n = bytes.len().min(16);
            b[..n].copy_from_slice(&bytes[..n]);
            uuid::Builder::from_random_bytes(b).into_uuid().to_string()
        }
        Form::Custom(f) => f(bytes),
    }
}

/// What a stack's steps and health check see of this run.
pub struct Ctx<'a> {
    pub file: &'a ClusterFile,
    pub node: &'a Node,
    pub secrets: &'a Secrets,
}

/// What a step does, given the system being configured; returns the detail for its line.
pub type Apply<'a> = Box<dyn FnOnce(&Target<'_>) -> Result<String> + 'a>;

/// One named, recorded step: it exists only together with its code.
pub struct Step<'a> {
    pub name: String,
    /// sha256 of what the step is given (see [`fingerprint`]); a different value on a later
    /// boot means its part of the cluster file changed.
    pub input: String,
    /// Whether a changed input may be applied to a node that already ran the step.
    pub reapply: bool,
    pub apply: Apply<'a>,
}

/// sha256 over `parts`, each terminated by a zero byte: a step's input fingerprint.
pub fn fingerprint(parts: &[&str]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// Small values a stack keeps between boots (in state.json), by key.
pub type Memo = BTreeMap<String, String>;

/// A version as a tool's `version` command prints it (`Tool v1.8.7`, `Tool v1.9.7+ent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    pub fn parse(output: &str) -> Option<Version> {
        let v = output
            .split_whitespace()
            .find_map(|w| w.strip_prefix('v'))?;
        let v = v.split(['+', '-']).next()?;
        let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
        Some(Version(
            it.next()??,
            it.next()??,
            it.next().flatten().unwrap_or(0),
        ))
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// The version of the program installed at `/rel` (`PROGRAM version`), run once per binary:
/// its output is remembered in `memo` with the binary's size and mtime, so a rerun does not
/// start a large program to learn what it already knows. `missing`: the error when the image
/// has no such binary.
pub fn installed_version(
    t: &Target<'_>,
    memo: &mut Memo,
    rel: &str,
    program: &str,
    missing: &str,
) -> anyhow::Result<Version> {
    let Ok(meta) = std::fs::metadata(t.p(rel)) else {
        bail!("{missing}");
    };
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let sig = format!("{}:{mtime}", meta.len());
    let key = format!("{program}/version");
    let out = match memo.get(&key).and_then(|m| m.split_once('\n')) {
        Some((s, out)) if s == sig => out.to_owned(),
        _ => {
            let out = t.sys.run(&crate::cmd::Cmd::new(program).arg("version"))?;
            memo.insert(key, format!("{sig}\n{out}"));
            out
        }
    };
    Version::parse(&out)
        .ok_or_else(|| anyhow::anyhow!("cannot read the version from `{program} version`: {out}"))
}

/// What a health check reports through, and how it runs one-time actions (recorded like
/// steps, so a later boot skips them).
pub trait Progress {
    fn say(&mut self, line: String);
    fn once(
        &mut self,
        name: &str,
        input: &str,
        f: &mut dyn FnMut() -> Result<String>,
    ) -> Result<()>;
}

/// Polls `f` every `every` seconds until it gives `Ok(Ok(value))`, bounded by `limit` seconds
/// (by the seconds slept and by the clock, whichever is further along); `Ok(Err(state))` is
/// "not yet", reported through `p` when it changes and at least once a minute. A poll that
/// itself took long (a CLI starting an interpreter on a busy board) stretches the pause to
/// three times its duration, so the checking never takes more than a quarter of the CPU from
/// the services it waits for.
pub fn wait<T>(
    what: &str,
    limit: u64,
    every: u64,
    t: &Target<'_>,
    p: &mut dyn Progress,
    mut f: impl FnMut() -> Result<Result<T, String>>,
) -> Result<T> {
    let started = std::time::Instant::now();
    let mut slept = 0;
    let mut reported = 0;
    let mut last = String::new();
    loop {
        let polled = std::time::Instant::now();
        let now = match f()? {
            Ok(v) => return Ok(v),
            Err(state) => state,
        };
        let pause = every.max(3 * polled.elapsed().as_secs());
        let waited = slept.max(started.elapsed().as_secs());
        if now != last || waited >= reported + 60 {
            reported = waited;
            p.say(format!("picoimg: waiting for {what} ({waited} s): {now}"));
            last = now;
        }
        if waited >= limit {
            bail!("{what} not done after {limit} s: {last}");
        }
        t.sys.sleep(std::time::Duration::from_secs(pause));
        slept += pause;
    }
}

/// A cluster stack on the node. See the module documentation.
pub trait Stack: Sync {
    /// The stack's name (the component that installs it has the same name).
    fn name(&self) -> &'static str;

    /// The cluster-file section it owns (`[<stack>]`), if any.
    fn section(&self) -> Option<&'static str> {
        None
    }

    /// Parses its section strictly (unknown keys refused), every problem with its line;
    /// `crate::cluster::typed_section` does this for a `Deserialize` type.
    fn parse_section(&self, text: &str, value: &Raw<'_>) -> Result<Section, Vec<Problem>> {
        let _ = (text, value);
        Err(vec![Problem {
            line: 0,
            field: self.section().unwrap_or_default().into(),
            message: "this stack takes no section".into(),
        }])
    }

    /// The node roles it serves (`<stack>-server`, ...). Each role belongs to one stack.
    fn roles(&self) -> &'static [&'static str];

    /// System accounts its packages create: refused as [[user]] names.
    fn accounts(&self) -> &'static [&'static str] {
        &[]
    }

    /// The secrets it derives from the cluster secret.
    fn secrets(&self) -> &'static [SecretSpec] {
        &[]
    }

    /// Whole-file checks (role counts, addresses its roles need, its section's values).
    fn check(&self, text: &str, file: &ClusterFile, p: &mut Vec<Problem>);

    /// Whole-file warnings: the file works, but the user should know (one server, ...).
    fn warnings(&self, text: &str, file: &ClusterFile) -> Vec<Problem> {
        let _ = (text, file);
        Vec::new()
    }

    /// Its commented section for `picoimg cluster init` (without it the defaults apply).
    fn init_section(&self) -> Option<&'static str> {
        None
    }

    /// The roles node `index` of `nodes` gets in `picoimg cluster init`'s file.
    fn init_roles(&self, index: u32, nodes: u32) -> Vec<&'static str>;

    /// Its configuration steps for this node, in order (run after the base steps and before
    /// the services start). Only called when the cluster file uses the stack.
    fn steps<'a>(&self, ctx: &Ctx<'a>, t: &Target<'_>, memo: &mut Memo) -> Result<Vec<Step<'a>>>;

    /// The units to enable and start on this node (none without one of its roles).
    fn units(&self, file: &ClusterFile, node: &Node) -> Vec<String>;

    /// The block devices this node's roles use besides its system disk (absolute paths as the
    /// file names them): a rehearsal gives its VM an empty disk for each.
    fn devices(&self, file: &ClusterFile, node: &Node) -> Vec<String> {
        let _ = (file, node);
        Vec::new()
    }

    /// Answers node `from`'s request `ask` on the handover channel (`crate::handover`): the
    /// join material this node mints for it (a stack whose members mint tokens at run time).
    /// `Err` is the reason told to the asking node (never a secret).
    fn hand_over(&self, ctx: &Ctx<'_>, t: &Target<'_>, from: &Node, ask: &str) -> Result<String> {
        let _ = (ctx, t, from, ask);
        bail!("the {} stack hands nothing over", self.name())
    }

    /// Waits until its services on this node are healthy; `None` if the node has none of
    /// its roles. Bounded by the file's `[firstboot] health_timeout`.
    fn health(&self, ctx: &Ctx<'_>, t: &Target<'_>, p: &mut dyn Progress)
        -> Result<Option<String>>;
}

/// Whether the cluster file uses `stack`: a node has one of its roles, or its section is there.
pub fn used(stack: &dyn Stack, file: &ClusterFile) -> bool {
    stack
        .section()
        .is_some_and(|s| file.stacks.get_raw(s).is_some())
        || file
            .nodes
            .iter()
            .flat_map(|n| &n.roles)
            .any(|r| stack.roles().contains(&r.get_ref().as_str()))
}

/// The typed sections of the stacks, by section name.
#[derive(Clone, Default)]
pub struct Sections(BTreeMap<&'static str, Section>);

impl std::fmt::Debug for Sections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Sections {
    pub fn insert(&mut self, name: &'static str, s: Section) {
        self.0.insert(name, s);
    }

    pub fn get_raw(&self, name: &str) -> Option<&Section> {
        self.0.get(name)
    }

    /// The section `name` as the stack's type `T` (None: absent).
    pub fn get<T: Any>(&self, name: &str) -> Option<&T> {
        self.0.get(name).and_then(|s| s.downcast_ref::<T>())
    }

    /// The section `name`, or `T`'s defaults when the file has none.
    pub fn get_or_default<T: Any + Clone + Default>(&self, name: &str) -> T {
        self.get::<T>(name).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::fake::Fake;
    use std::time::Duration;

    struct Lines(Vec<String>);
    impl Progress for Lines {
        fn say(&mut self, line: String) {
            self.0.push(line);
        }
        fn once(&mut self, _: &str, _: &str, f: &mut dyn FnMut() -> Result<String>) -> Result<()> {
            f().map(|_| ())
        }
    }

    #[test]
    fn a_slow_poll_stretches_the_pause_and_the_limit_holds() {
        let dir = tempfile::tempdir().unwrap();
        let sys = Fake::new(dir.path());
        let t = Target {
            root: dir.path(),
            sys: &sys,
        };
        let mut p = Lines(Vec::new());
        let mut n = 0;
        // The first poll takes a second of real time, the next ones none; done at the fourth.
        let v = wait("a thing", 600, 5, &t, &mut p, || {
            n += 1;
            if n == 1 {
                std::thread::sleep(Duration::from_millis(1100));
            }
            Ok(if n == 4 {
                Ok(n)
            } else {
                Err(format!("poll {n}"))
            })
        })
        .unwrap();
        assert_eq!(v, 4);
        assert_eq!(*sys.slept.borrow(), [5, 5, 5]);
        let sys = Fake::new(dir.path());
        let t = Target {
            root: dir.path(),
            sys: &sys,
        };
        let mut n = 0;
        wait("a thing", 600, 1, &t, &mut p, || {
            n += 1;
            if n == 1 {
                std::thread::sleep(Duration::from_millis(2100));
            }
            Ok(if n == 2 {
                Ok(())
            } else {
                Err("not yet".into())
            })
        })
        .unwrap();
        assert_eq!(*sys.slept.borrow(), [6], "3 x the 2 s the poll took");
        // Never done: it gives up once the pauses reach the limit, naming the last state.
        let err = wait("a thing", 20, 5, &t, &mut p, || {
            Ok::<Result<(), String>, _>(Err("still not".into()))
        })
        .unwrap_err();
        assert_eq!(format!("{err}"), "a thing not done after 20 s: still not");
        assert!(p
            .0
            .iter()
            .any(|l| l == "picoimg: waiting for a thing (0 s): still not"));
    }
}
