//! Components (`overlays/<name>/component.toml` + `rootfs/`) and stacks (`overlays/stacks.toml`):
//! a stack is a named list of components; resolving it gives the dependency closure, in order,
//! with the platform matrix (which architectures a component supports) enforced.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::board::{Arch, Board};

/// A component file, as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentFile {
    pub description: String,
    /// Components this one needs (installed first).
    #[serde(default)]
    pub requires: Vec<String>,
    /// Architectures it supports; empty means every one.
    #[serde(default)]
    pub arch: Vec<Arch>,
    /// Boards it supports (names in boards/); empty means every board of its architectures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boards: Vec<String>,
    /// Set for a part of the integration guide picoimg cannot install yet: why, and the
    /// source it would come from. Such a component is in the platform matrix and refused by
    /// `build`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
    /// Debian packages it installs.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Cluster-file roles its nodes can take (`consul-server`): a cluster file naming a role
    /// that no component of the image serves is refused (`picoimg cluster check --stack`).
    #[serde(default)]
    pub roles: Vec<String>,
    /// Units enabled in the image (from packages or from `rootfs/`), as `systemctl enable`
    /// would, following their `[Install]` sections.
    #[serde(default)]
    pub enable: Vec<String>,
    /// Source set used unless `--sources SET` names one this component has.
    #[serde(default)]
    pub default_sources: Option<String>,
    /// Where its packages come from beyond the board's sources: the vendor's archive (what
    /// users get) and substitutes (`debian`) for builds without access to it.
    #[serde(default)]
    pub sources: BTreeMap<String, ComponentSources>,
    /// Pinned files it installs (`[[artifact]]`: name, path, mode, pins per architecture
    /// with url and sha256), fetched and checked before the root filesystem step.
    #[serde(default, rename = "artifact", skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<crate::artifact::Artifact>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentSources {
    pub description: String,
    #[serde(default)]
    pub apt: Vec<crate::board::Source>,
    #[serde(default)]
    pub packages: Vec<String>,
}

impl Component {
    /// The source set this component uses: the one `--sources` named if it has it (so
    /// `--sources debian` builds from Debian's archive alone), else its default.
    pub fn source_set(&self, asked: Option<&str>) -> Result<Option<(&str, &ComponentSources)>> {
        if self.file.sources.is_empty() {
            return Ok(None);
        }
        if let Some((k, v)) = asked.and_then(|a| self.file.sources.get_key_value(a)) {
            return Ok(Some((k.as_str(), v)));
        }
        let Some(default) = &self.file.default_sources else {
            bail!(
                "component `{}` has source sets but no `default_sources`",
                self.name
            );
        };
        match self.file.sources.get_key_value(default) {
            Some((k, v)) => Ok(Some((k.as_str(), v))),
            None => bail!(
                "component `{}`: default_sources = \"{default}\" is not one of its sets ({})",
                self.name,
                self.file
                    .sources
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

impl Component {
    /// How to build this component without its source set `except`: the options that select
    /// each other set (`--sources debian`, or `--artifact nomad=FILE` for a set that is a
    /// release archive).
    pub fn substitutes(&self, except: &str) -> Vec<String> {
        self.file
            .sources
            .keys()
            .filter(|k| *k != except)
            .map(|k| {
                match self
                    .file
                    .artifacts
                    .iter()
                    .find(|a| a.sets.len() == 1 && a.sets[0] == *k)
                {
                    Some(a) => format!("--artifact {}=FILE ({})", a.name, a.description),
                    None => format!("--sources {k}"),
                }
            })
            .collect()
    }
}

/// A resolved component: its file plus where its overlay tree is.
#[derive(Debug, Clone, Serialize)]
pub struct Component {
    pub name: String,
    #[serde(flatten)]
    pub file: ComponentFile,
    #[serde(skip)]
    pub rootfs: Option<PathBuf>,
}

/// A stack of `overlays/stacks.toml`: a named list of components; a preset also names the
/// integration guide's configuration it is, what it may add, and the guide's parts picoimg
/// cannot install yet.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Stack {
    pub description: String,
    pub components: Vec<String>,
    /// The integration guide's configuration this preset installs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guide: Option<String>,
    /// Components the configuration may add (`--stack NAME,COMPONENT`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub optional: Vec<String>,
    /// Parts of the configuration not available yet: components with `unavailable` set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_yet: Vec<String>,
}

/// The stacks a user can pick, by name. Every component a stack names (as a component, an
/// optional one or a part not available yet) must exist: checked here, so a typo in the file
/// is an error naming it.
pub fn stacks(data: &Path) -> Result<BTreeMap<String, Stack>> {
    let path = data.join("overlays/stacks.toml");
    let text = picoimg_firstboot::input::read_text(
        &path,
        picoimg_firstboot::input::CONFIG_LIMIT,
        "stacks file",
    )?;
    let all: BTreeMap<String, Stack> =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e))?;
    for (name, st) in &all {
        for (key, list) in [
            ("components", &st.components),
            ("optional", &st.optional),
            ("not_yet", &st.not_yet),
        ] {
            for c in list {
                if !is_component(data, c) {
                    bail!(
                        "{}: [{name}] {key}: {c:?} is not a component (a folder of overlays/ with a component.toml)",
                        path.display()
                    );
                }
            }
        }
        for c in &st.not_yet {
            if load(data, c)?.file.unavailable.is_none() {
                bail!(
                    "{}: [{name}] not_yet: component `{c}` can be installed (it has no `unavailable`): list it in components or optional",
                    path.display()
                );
            }
        }
    }
    Ok(all)
}

fn is_component(data: &Path, name: &str) -> bool {
    crate::data::plain_name(name)
        && data
            .join("overlays")
            .join(name)
            .join("component.toml")
            .is_file()
}

/// Whether `u` is a valid systemd unit name (systemd.unit(5)): a name of ASCII letters, digits
/// and `:-_.\\@`, at most 255 characters, with a unit type suffix; no path separators.
pub fn valid_unit_name(u: &str) -> bool {
    const TYPES: [&str; 11] = [
        "service",
        "socket",
        "device",
        "mount",
        "automount",
        "swap",
        "target",
        "path",
        "timer",
        "slice",
        "scope",
    ];
    let Some((stem, kind)) = u.rsplit_once('.') else {
        return false;
    };
    u.len() <= 255
        && !stem.is_empty()
        && TYPES.contains(&kind)
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b))
}

/// Loads one component by name.
pub fn load(data: &Path, name: &str) -> Result<Component> {
    if !crate::data::plain_name(name) {
        bail!(
            "component name {name:?} must be lowercase letters, digits and '-' (a folder in overlays/)"
        );
    }
    let dir = data.join("overlays").join(name);
    let path = dir.join("component.toml");
    let text = picoimg_firstboot::input::read_text(
        &path,
        picoimg_firstboot::input::CONFIG_LIMIT,
        "component file",
    )?;
    let file: ComponentFile = toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {}\nhint: see overlays/base/component.toml for the keys a component takes",
            path.display(),
            e.to_string().trim_end()
        )
    })?;
    for u in &file.enable {
        if !valid_unit_name(u) {
            bail!(
                "{}: enable: {u:?} is not a systemd unit name (like \"consul.service\"; see systemd.unit(5))",
                path.display()
            );
        }
    }
    for a in &file.artifacts {
        a.validate(&path)?;
        if let Some(bad) = a.sets.iter().find(|s| !file.sources.contains_key(*s)) {
            bail!(
                "{}: artifact `{}`: sets names {bad:?}, which is not one of the component's source sets ({})",
                path.display(),
                a.name,
                file.sources.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    for d in &file.requires {
        if !crate::data::plain_name(d) {
            bail!(
                "{}: requires: {d:?} is not a component name (lowercase letters, digits, '-')",
                path.display()
            );
        }
    }
    let rootfs = dir.join("rootfs");
    Ok(Component {
        name: name.to_owned(),
        file,
        rootfs: rootfs.is_dir().then_some(rootfs),
    })
}

/// The roles the components of `stack` serve, with the components' names (no board needed:
/// roles do not depend on the architecture).
pub fn stack_roles(data: &Path, stack: &str) -> Result<(Vec<String>, Vec<String>)> {
    let comps = closure(data, stack, None)?;
    let mut roles: Vec<String> = comps.iter().flat_map(|c| c.file.roles.clone()).collect();
    roles.sort();
    roles.dedup();
    Ok((roles, comps.into_iter().map(|c| c.name).collect()))
}

/// The components a stack names, with everything they require, in dependency order; with a
/// board, its own components first and the platform matrix enforced.
fn closure(data: &Path, stack: &str, board: Option<&Board>) -> Result<Vec<Component>> {
    closure_in(data, &stacks(data)?, stack, board)
}

/// [`closure`] with the stacks file already read.
fn closure_in(
    data: &Path,
    all: &BTreeMap<String, Stack>,
    stack: &str,
    board: Option<&Board>,
) -> Result<Vec<Component>> {
    let mut listed: Vec<String> = Vec::new();
    let wanted = match all.get(stack) {
        Some(st) => &st.components,
        // A list of stacks and components (`consul,docker`, `nomad,kvm`: a preset and what it
        // may add), each with what it requires. A stack's name means the stack (a stack named
        // after a component is `base` and that component).
        None if stack.contains(',') => {
            for item in stack.split(',').map(str::trim) {
                if let Some(st) = all.get(item) {
                    listed.extend(st.components.iter().cloned());
                } else if is_component(data, item) {
                    listed.push(item.to_owned());
                } else {
                    bail!(
                        "--stack {stack}: {item:?} is neither a component (a folder of overlays/ with a component.toml) nor a stack ({})",
                        all.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                }
            }
            &listed
        }
        None => bail!(
            "unknown stack `{stack}`; valid stacks: {} (or a list of components and stacks, like consul,docker)",
            all.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    };
    let mut out: Vec<Component> = Vec::new();
    let mut visiting = Vec::new();
    if let Some(b) = board {
        for name in &b.components {
            visit(data, name, board, &mut out, &mut visiting)
                .with_context(|| format!("board `{}` component `{name}`", b.name))?;
        }
    }
    for name in wanted {
        visit(data, name, board, &mut out, &mut visiting)
            .with_context(|| format!("resolving stack `{stack}`"))?;
    }
    Ok(out)
}

/// Whether component `c` runs on `board` (its `arch` and `boards`), and if not, why (said of
/// the component, the same for every board it does not run on).
pub fn supports(c: &Component, board: &Board) -> std::result::Result<(), String> {
    let arches = || {
        c.file
            .arch
            .iter()
            .map(|a| a.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !c.file.arch.is_empty() && !c.file.arch.contains(&board.arch) {
        return Err(match c.file.boards.as_slice() {
            [] => format!("component `{}` runs on {} boards only", c.name, arches()),
            b => format!(
                "component `{}` runs on {} only ({})",
                c.name,
                b.join(", "),
                arches()
            ),
        });
    }
    if !c.file.boards.is_empty() && !c.file.boards.contains(&board.name) {
        return Err(format!(
            "component `{}` runs on {} only",
            c.name,
            c.file.boards.join(", ")
        ));
    }
    Ok(())
}

/// Why the platform matrix refuses a stack on a board (what `stacks --matrix` tells apart).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refused {
    /// A component does not run on the board; `why` is said of the component (the same for
    /// every board it does not run on).
    #[error("{why}: board `{board}` is {arch} (the platform matrix: `picoimg stacks --matrix`)")]
    NotOnBoard {
        why: String,
        board: String,
        arch: &'static str,
    },
    /// A part of the guide picoimg cannot install yet.
    #[error("component `{component}` is not available in picoimg yet: {why}")]
    NotYet { component: String, why: String },
}

/// One cell of the platform matrix: `stack` (with `all`, the stacks file read once) resolved
/// for `board` as `build` resolves it; `Err` with the refusal, or any other error as text.
pub fn cell(
    data: &Path,
    all: &BTreeMap<String, Stack>,
    stack: &str,
    board: &Board,
) -> std::result::Result<(), Result<Refused, String>> {
    match closure_in(data, all, stack, Some(board)) {
        Ok(_) => Ok(()),
        Err(e) => Err(e
            .chain()
            .find_map(|c| c.downcast_ref::<Refused>().cloned())
            .ok_or_else(|| format!("{e:#}"))),
    }
}

/// Resolves a stack for a board: the components in dependency order (each once).
pub fn resolve(data: &Path, stack: &str, board: &Board) -> Result<Vec<Component>> {
    closure(data, stack, Some(board))
}

fn visit(
    data: &Path,
    name: &str,
    board: Option<&Board>,
    out: &mut Vec<Component>,
    visiting: &mut Vec<String>,
) -> Result<()> {
    if out.iter().any(|c| c.name == name) {
        return Ok(());
    }
    if visiting.iter().any(|v| v == name) {
        bail!(
            "component dependency cycle: {} -> {name}",
            visiting.join(" -> ")
        );
    }
    let c = load(data, name)?;
    if let Some(board) = board {
        if let Err(why) = supports(&c, board) {
            return Err(Refused::NotOnBoard {
                why,
                board: board.name.clone(),
                arch: board.arch.as_str(),
            }
            .into());
        }
        if let Some(why) = &c.file.unavailable {
            return Err(Refused::NotYet {
                component: name.to_owned(),
                why: why.clone(),
            }
            .into());
        }
    }
    visiting.push(name.to_owned());
    for dep in &c.file.requires {
        visit(data, dep, board, out, visiting)
            .with_context(|| format!("component `{name}` requires `{dep}`"))?;
    }
    visiting.pop();
    out.push(c);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
    }

    fn h4() -> Board {
        Board::load(&data().join("boards/h4.toml")).expect("h4")
    }

    #[test]
    fn base_stack_resolves() {
        let c = resolve(&data(), "base", &h4()).expect("resolves");
        let names: Vec<_> = c.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["systemd-boot", "base"]);
        assert!(c.iter().all(|c| c.rootfs.is_some()));
    }

    /// Builder and node agree: each stack the agent registers is a component of the same
    /// name serving exactly the stack's roles, and its units are ordered after the agent by
    /// the component's own drop-ins (not by the base units).
    #[test]
    fn every_node_stack_has_its_component_with_the_same_roles_and_drop_ins() {
        for st in picoimg_firstboot::stacks::registry() {
            let c = load(&data(), st.name()).expect("the stack's component");
            let mut want: Vec<String> = st.roles().iter().map(|r| r.to_string()).collect();
            let mut have = c.file.roles.clone();
            want.sort();
            have.sort();
            assert_eq!(have, want, "component {} roles", st.name());
            let rootfs = c.rootfs.expect("overlay tree");
            let health = rootfs.join(format!(
                "etc/systemd/system/picoimg-firstboot-health.service.d/{}.conf",
                st.name()
            ));
            let text = std::fs::read_to_string(&health).expect("health drop-in");
            assert!(text.contains("After="), "{}", health.display());
        }
        let base = load(&data(), "base").expect("base");
        for unit in [
            "picoimg-firstboot.service",
            "picoimg-firstboot-health.service",
        ] {
            let text = std::fs::read_to_string(
                base.rootfs
                    .as_ref()
                    .expect("base tree")
                    .join("usr/lib/systemd/system")
                    .join(unit),
            )
            .expect("unit");
            for st in picoimg_firstboot::stacks::registry() {
                assert!(
                    !text.contains(&format!("{}.service", st.name())),
                    "{unit} names stack {}",
                    st.name()
                );
            }
        }
    }

    /// The programs the agent runs from its stacks' overlays are there, executable.
    #[test]
    fn the_agents_helpers_are_in_their_overlays() {
        use std::os::unix::fs::PermissionsExt;
        let ceph = load(&data(), "ceph").expect("ceph");
        let helper = ceph
            .rootfs
            .expect("ceph tree")
            .join(picoimg_firstboot::stacks::ceph::STATUS.trim_start_matches('/'));
        let mode = std::fs::metadata(&helper)
            .unwrap_or_else(|e| panic!("{}: {e}", helper.display()))
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o111,
            0o111,
            "{} is not executable",
            helper.display()
        );
    }

    /// The ESP hook copies what /vmlinuz and /initrd.img point to.
    #[test]
    fn esp_sync_copies_the_current_kernel() {
        let root = tempfile::tempdir().expect("tempdir");
        let esp = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        std::fs::create_dir(r.join("boot")).expect("mkdir");
        std::fs::write(r.join("boot/vmlinuz-6.99"), "kernel").expect("write");
        std::fs::write(r.join("boot/initrd.img-6.99"), "initrd").expect("write");
        std::os::unix::fs::symlink("boot/vmlinuz-6.99", r.join("vmlinuz")).expect("link");
        std::os::unix::fs::symlink("boot/initrd.img-6.99", r.join("initrd.img")).expect("link");
        let script = data().join("overlays/systemd-boot/rootfs/usr/lib/picoimg/esp-sync");
        crate::cmd::Cmd::new(script)
            .env("PICOIMG_ROOT", r)
            .env("PICOIMG_ESP", esp.path())
            .run()
            .expect("esp-sync runs");
        let got = |n: &str| std::fs::read_to_string(esp.path().join("picoimg").join(n)).expect(n);
        assert_eq!(got("vmlinuz"), "kernel");
        assert_eq!(got("initrd.img"), "initrd");
    }

    #[test]
    fn unknown_stack_lists_valid_ones() {
        let e = format!(
            "{:#}",
            resolve(&data(), "kubernetes-9000", &h4()).unwrap_err()
        );
        assert!(e.contains("unknown stack `kubernetes-9000`"), "{e}");
        assert!(e.contains("base"), "{e}");
    }
}
