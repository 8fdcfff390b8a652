//! The build plan: board + resolved stack + options, fully resolved and serialisable. Its hashes
//! key the caches: the root filesystem stage by what goes into mmdebstrap, the whole image by
//! everything.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::board::{Arch, Board};
use crate::component::Component;

/// Bumped when the way picoimg drives mmdebstrap changes (invalidates cached root filesystems).
const ROOTFS_RECIPE: u32 = 1;

/// Bumped when the way a stack's layer is installed over a base changes.
const LAYER_RECIPE: u32 = 1;

/// The board's firmware, bootloader and extra packages and the stack's, installed over a cached
/// base root (`RootfsSpec`): what a second stack, or a second board of the same architecture,
/// costs is apt for these only.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSpec {
    pub recipe: u32,
    /// Sources the layer adds (keyrings included), beyond the base's.
    pub sources: Vec<SourceSpec>,
    /// Packages beyond the base's; sorted, de-duplicated.
    pub packages: Vec<String>,
}

/// What mmdebstrap is asked for: the base root of a board's source set (its sources, its kernel
/// and the packages of stack `base`). Two boards with equal specs share one cached root
/// filesystem.
#[derive(Debug, Clone, Serialize)]
pub struct RootfsSpec {
    pub recipe: u32,
    pub arch: Arch,
    pub distro: String,
    pub suite: String,
    pub variant: String,
    pub sources: Vec<SourceSpec>,
    /// Sorted, de-duplicated.
    pub packages: Vec<String>,
    /// `SOURCE_DATE_EPOCH` when it is set: mmdebstrap then makes the root reproducibly (file
    /// times clamped to it), and it is a different root than one made without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_date_epoch: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceSpec {
    pub name: String,
    /// `None`: the distribution's default mirror as mmdebstrap picks it.
    pub uri: Option<String>,
    /// A suite other than the root filesystem's (only that suite is added, pinned low).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    pub components: Vec<String>,
    pub keyring: std::path::PathBuf,
    /// `None` when the keyring cannot be read (the plan lists it in `missing`).
    pub keyring_sha256: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ComponentSpec {
    pub name: String,
    /// The component's source set, for components with their own sources.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sources: Option<String>,
    pub enable: Vec<String>,
    /// sha256 over the overlay tree (paths, modes, contents, link targets).
    pub overlay_sha256: Option<String>,
    /// Its pinned artifacts for the board's architecture.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<PlannedArtifact>,
}

/// One pinned artifact as the plan (and so the inputs hash) records it.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedArtifact {
    pub name: String,
    pub path: String,
    pub mode: u32,
    pub url: String,
    pub sha256: String,
    /// The sha256 is the user's (`--artifact-sha256`), not the component's pin.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sha256_given: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BuildPlan {
    pub picoimg_version: String,
    pub name: String,
    pub board: Board,
    pub stack: String,
    /// The board's source set this plan uses.
    pub sources: String,
    pub components: Vec<ComponentSpec>,
    pub rootfs: RootfsSpec,
    /// The layer over `rootfs`: the board's non-kernel packages and the stack's (none when
    /// both are empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<LayerSpec>,
    /// Inputs that could not be read (a vendor's keyring that is not installed): the plan is
    /// shown, but nothing is built from it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

impl BuildPlan {
    /// `base`: the names of the components of stack `base` on this board, whose packages go
    /// into the base root with the source set's kernel; every other component's packages and
    /// sources, and the set's firmware, bootloader and extra packages, form the layer.
    pub fn new(
        board: Board,
        stack: &str,
        components: &[Component],
        base: &[String],
        mirror: Option<&str>,
        sources: Option<&str>,
    ) -> Result<BuildPlan> {
        let (set_name, set) = board.source_set(sources)?;
        let set_name = set_name.to_owned();
        let set = set.clone();
        let mut packages: BTreeSet<String> = set.packages.all().cloned().collect();
        // The base root has the source set's kernel, not its firmware, bootloader or extra
        // packages: those go into the layer with the stack's, so boards of one architecture
        // whose sets differ only there share one base (an emulated arm64 base is the longest
        // step of a build: c5, and rpi5's Debian sets, make it once).
        let mut base_packages: BTreeSet<String> = set.packages.kernel.iter().cloned().collect();
        // Board sources first (the first is the distribution), then each component's.
        let mut apt: Vec<(crate::board::Source, Option<String>)> =
            set.apt.iter().map(|s| (s.clone(), None)).collect();
        let mut component_sets = Vec::new();
        for c in components {
            packages.extend(c.file.packages.iter().cloned());
            if base.contains(&c.name) {
                base_packages.extend(c.file.packages.iter().cloned());
            }
            let chosen = c.source_set(sources)?;
            if let Some((name, cs)) = chosen {
                packages.extend(cs.packages.iter().cloned());
                for s in &cs.apt {
                    if !apt.iter().any(|(a, _)| a.name == s.name) {
                        let others = c.substitutes(name);
                        let hint = if others.is_empty() {
                            format!(
                                "; component `{}` has no substitute source set: it cannot be built without this repository",
                                c.name
                            )
                        } else {
                            format!(", or build without it: {}", others.join(" or "))
                        };
                        apt.push((s.clone(), Some(format!("{}:{name}:{hint}", c.name))));
                    }
                }
            }
            component_sets.push(chosen.map(|(n, _)| n.to_owned()));
        }
        let mut missing = Vec::new();
        let mut sources = apt
            .iter()
            .map(|(s, owner)| {
                let bytes = std::fs::read(&s.keyring).with_context(|| {
                    if let Some(owner) = owner {
                        let mut parts = owner.splitn(3, ':');
                        let (comp, set, hint) = (
                            parts.next().unwrap_or_default(),
                            parts.next().unwrap_or_default(),
                            parts.next().unwrap_or_default(),
                        );
                        return format!(
                            "component `{comp}` source set `{set}` (apt source `{}`, {}): cannot read its keyring {}: install it as the vendor documents{hint}",
                            s.name,
                            s.uri,
                            s.keyring.display()
                        );
                    }
                    let others: Vec<String> = board
                        .sources
                        .keys()
                        .filter(|k| **k != set_name)
                        .map(|k| format!("--sources {k}"))
                        .collect();
                    let alt = if others.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ", or build from substitute packages with {}",
                            others.join(" or ")
                        )
                    };
                    format!(
                        "board `{}` source `{}`: cannot read its keyring {}: install the package \
                         that provides it, or fix `keyring` in the board file{alt}",
                        board.name,
                        s.name,
                        s.keyring.display()
                    )
                });
                // A missing keyring leaves the plan readable (`picoimg plan` shows it and
                // what is missing); `build` stops on it before anything runs.
                let keyring_sha256 = match bytes {
                    Ok(b) => Some(hex::encode(Sha256::digest(&b))),
                    Err(e) => {
                        missing.push(format!("{e:#}"));
                        None
                    }
                };
                let uri = match (s.uri.as_str(), mirror) {
                    ("default", Some(m)) => Some(m.to_owned()),
                    ("default", None) => None,
                    (u, _) => Some(u.to_owned()),
                };
                Ok(SourceSpec {
                    name: s.name.clone(),
                    uri,
                    suite: s.suite.clone(),
                    components: s.components.clone(),
                    keyring: s.keyring.clone(),
                    keyring_sha256,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let comps = components
            .iter()
            .zip(component_sets)
            .map(|(c, sources)| {
                Ok(ComponentSpec {
                    name: c.name.clone(),
                    sources: sources.clone(),
                    enable: c.file.enable.clone(),
                    overlay_sha256: c.rootfs.as_deref().map(tree_hash).transpose()?,
                    artifacts: c
                        .file
                        .artifacts
                        .iter()
                        .filter(|a| a.in_set(sources.as_deref()))
                        .filter_map(|a| {
                            a.pin(board.arch).map(|pin| PlannedArtifact {
                                name: a.name.clone(),
                                path: a.path.clone(),
                                mode: a.mode,
                                url: pin.url.clone(),
                                sha256: pin.sha256.clone(),
                                sha256_given: pin.given,
                            })
                        })
                        .collect(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // The board's sources come first in `sources`, then the components' (the layer's).
        let board_sources = set.apt.len();
        let layer_sources = sources.split_off(board_sources.min(sources.len()));
        let layer_packages: Vec<String> = packages.difference(&base_packages).cloned().collect();
        let layer =
            (!layer_packages.is_empty() || !layer_sources.is_empty()).then_some(LayerSpec {
                recipe: LAYER_RECIPE,
                sources: layer_sources,
                packages: layer_packages,
            });
        Ok(BuildPlan {
            picoimg_version: env!("CARGO_PKG_VERSION").to_owned(),
            // A component list (`consul,docker`) names the image `<board>-consul+docker`.
            name: format!("{}-{}", board.name, stack.replace(',', "+")),
            rootfs: RootfsSpec {
                recipe: ROOTFS_RECIPE,
                arch: board.arch,
                distro: set
                    .distro
                    .clone()
                    .unwrap_or_else(|| board.distro.name.clone()),
                suite: set
                    .suite
                    .clone()
                    .unwrap_or_else(|| board.distro.suite.clone()),
                variant: board.distro.variant.clone(),
                source_date_epoch: std::env::var("SOURCE_DATE_EPOCH")
                    .ok()
                    .and_then(|v| v.trim().parse().ok()),
                sources,
                packages: base_packages.into_iter().collect(),
            },
            layer,
            board,
            stack: stack.to_owned(),
            sources: set_name,
            components: comps,
            missing,
        })
    }

    /// Stops on the first input the plan could not read (what `build` needs before it starts).
    pub fn require_complete(&self) -> Result<()> {
        match self.missing.first() {
            Some(m) => bail!("{m}"),
            None => Ok(()),
        }
    }

    /// The source set in use.
    pub fn source_set(&self) -> &crate::board::SourceSet {
        &self.board.sources[&self.sources]
    }

    /// Key of the cached base root filesystem.
    pub fn rootfs_key(&self) -> String {
        json_key(&self.rootfs)
    }

    /// Key of the cached stack layer: the base's key and what the layer adds.
    pub fn layer_key(&self) -> Option<String> {
        self.layer
            .as_ref()
            .map(|l| json_key(&(self.rootfs_key(), l)))
    }

    /// What the image's disk and filesystem identifiers derive from: its name and its root
    /// filesystem's packages, not its overlays (so a rebuild after an overlay change keeps them).
    pub fn ids_seed(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            self.layer_key().unwrap_or_else(|| self.rootfs_key())
        )
    }

    /// The same root made by one mmdebstrap run with every package and source (what a layered
    /// root is compared with).
    pub fn flat_rootfs(&self) -> RootfsSpec {
        let mut flat = self.rootfs.clone();
        if let Some(l) = &self.layer {
            flat.sources.extend(l.sources.iter().cloned());
            flat.packages.extend(l.packages.iter().cloned());
            flat.packages.sort();
            flat.packages.dedup();
        }
        flat
    }

    /// Every apt source the build uses: the base's, then the layer's.
    pub fn all_sources(&self) -> impl Iterator<Item = &SourceSpec> {
        self.rootfs
            .sources
            .iter()
            .chain(self.layer.iter().flat_map(|l| l.sources.iter()))
    }

    /// Hash of the plan: every input of the image but the first-boot agent (the image's
    /// inputs hash, `build::image_inputs_hash`, adds the agent).
    pub fn inputs_hash(&self) -> String {
        json_key(self)
    }
}

pub fn json_key<T: Serialize>(v: &T) -> String {
    let json = serde_json::to_vec(v).expect("plan serialises");
    hex::encode(Sha256::digest(json))
}

/// sha256 over a directory tree: relative paths, file modes, contents and link targets, in
/// sorted order, so any change to an overlay changes the image's inputs hash.
pub fn tree_hash(root: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let mut stack = vec![root.to_owned()];
    let mut files = Vec::new();
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            }
            files.push(e.path());
        }
    }
    files.sort();
    for p in files {
        use std::os::unix::fs::PermissionsExt;
        let rel = p.strip_prefix(root).expect("under root");
        let meta = std::fs::symlink_metadata(&p)?;
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        h.update(meta.permissions().mode().to_le_bytes());
        if meta.file_type().is_symlink() {
            h.update(std::fs::read_link(&p)?.to_string_lossy().as_bytes());
        } else if meta.is_file() {
            h.update(std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?);
        }
        h.update([0]);
    }
    Ok(hex::encode(h.finalize()))
}
