//! `picoimg build`: plan, root filesystem, overlays, disk image, outputs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::board::{Board, Filesystem, Placed};
use crate::disk::DiskIds;
use crate::plan::BuildPlan;
use crate::progress::{log, Step};
use crate::rootfs::RootfsInfo;
use crate::size::Bytes;
use crate::tarfs::{self, Changes, Found};

/// What to build and where.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub board: String,
    pub stack: String,
    pub out: PathBuf,
    pub mirror: Option<String>,
    pub cache: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub keep_raw: bool,
    /// xz level of the `.img.xz`; `None`: no `.img.xz`, the raw image is the output.
    pub xz_level: Option<u32>,
    pub refresh: bool,
    pub image_size: Option<Bytes>,
    /// Source set of the board (`None`: its default).
    pub sources: Option<String>,
    /// A local file instead of the board's bootloader blob download.
    pub uboot: Option<PathBuf>,
    /// Local copies of components' pinned artifacts, by name (`--artifact NAME=FILE`), with
    /// the user's sha256 where given (`--artifact-sha256 NAME=HEX`).
    pub artifacts: std::collections::BTreeMap<String, crate::artifact::Local>,
    /// The first-boot agent binary (default: found as `agentbin` describes).
    pub firstboot: Option<PathBuf>,
}

impl BuildOptions {
    /// Whether the raw image is an output: with `--keep-raw`, or as the image itself without
    /// an `.img.xz`.
    pub fn writes_raw(&self) -> bool {
        self.keep_raw || self.xz_level.is_none()
    }

    /// `board` and `stack` with every other option at its default (as the CLI's).
    pub fn new(board: &str, stack: &str) -> BuildOptions {
        BuildOptions {
            board: board.to_owned(),
            stack: stack.to_owned(),
            out: PathBuf::from("out"),
            mirror: None,
            cache: None,
            data_dir: None,
            keep_raw: false,
            xz_level: Some(6),
            refresh: false,
            image_size: None,
            sources: None,
            uboot: None,
            artifacts: Default::default(),
            firstboot: None,
        }
    }
}

/// `<name>.manifest.json`: what is in an image and what made it.
#[derive(Debug, Serialize)]
pub struct Manifest {
    pub picoimg_version: String,
    pub name: String,
    pub board: Board,
    pub stack: String,
    /// The source set the packages came from (`debian` marks a substitute build where the
    /// board's default set is another).
    pub sources: String,
    pub components: Vec<String>,
    pub inputs_hash: String,
    /// The first-boot agent installed as /usr/lib/picoimg/picoimg-firstboot.
    pub firstboot: crate::agentbin::AgentBinary,
    pub rootfs: RootfsInfo,
    pub kernel: String,
    pub kernel_cmdline: String,
    /// The raw bootloader written outside the partitions, if the board has one.
    pub blob: Option<crate::blob::BlobInfo>,
    /// The components' pinned artifacts installed into the root filesystem.
    pub artifacts: Vec<crate::artifact::Fetched>,
    pub disk: DiskManifest,
    /// How the `.img.xz` was compressed (a rebuild with another level is not a no-op).
    pub compression: Compression,
    /// Bytes in the root filesystem's regular files: what a stack adds to an image is the
    /// difference between two manifests' values.
    pub root_file_bytes: u64,
    /// The timestamp of every file and filesystem field the build wrote: set
    /// `SOURCE_DATE_EPOCH` to it to rebuild the same bytes from the same root filesystem.
    pub source_date_epoch: u64,
    /// Every apt source the root filesystem was made from (the base's, then the stack
    /// layer's), with suites, components and keyring sha256s: with `packages`' versions, what
    /// a rebuild needs.
    pub apt_sources: Vec<crate::plan::SourceSpec>,
    pub packages: Vec<tarfs::Package>,
}

/// How the image was compressed: `xz` with its level, or `none` (the raw image only).
#[derive(Debug, Serialize)]
pub struct Compression {
    pub format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<u32>,
}

impl Compression {
    fn of(opts: &BuildOptions) -> Compression {
        Compression {
            format: if opts.xz_level.is_some() {
                "xz"
            } else {
                "none"
            },
            level: opts.xz_level,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct DiskManifest {
    pub size: u64,
    pub ids: DiskIds,
    pub partitions: Vec<PartManifest>,
}

#[derive(Debug, Serialize)]
pub struct PartManifest {
    pub number: usize,
    pub name: String,
    pub start: u64,
    pub size: u64,
    pub type_guid: String,
    pub uuid: String,
}

/// Paths of a finished build.
#[derive(Debug)]
pub struct Outputs {
    /// `None` with `--no-xz`.
    pub image_xz: Option<PathBuf>,
    pub bmap: PathBuf,
    pub manifest: PathBuf,
    pub raw: Option<PathBuf>,
}

/// Resolves board, stack and options into a plan (no side effects but reading files).
pub fn plan(opts: &BuildOptions) -> Result<BuildPlan> {
    Ok(resolve(opts)?.1)
}

/// The data directory, the plan and its components, each resolved once.
fn resolve(opts: &BuildOptions) -> Result<(PathBuf, BuildPlan, Vec<crate::component::Component>)> {
    let data = crate::data::find(opts.data_dir.as_deref())?;
    let mut board = crate::data::board(&data, &opts.board)?;
    if let Some(size) = opts.image_size {
        board.disk.size = size;
        board
            .layout()
            .with_context(|| format!("--image-size {size} does not fit board `{}`", board.name))?;
    }
    if opts.uboot.is_some() && board.boot.blob.is_none() {
        bail!(
            "--uboot: board `{}` has no bootloader blob to replace (only boards with boot.blob, such as c5, take it)",
            board.name
        );
    }
    if let Some(m) = &opts.mirror {
        check_mirror(m)?;
    }
    let mut components = crate::component::resolve(&data, &opts.stack, &board)?;
    crate::artifact::prefer_sets(&mut components, &opts.artifacts);
    crate::artifact::apply_given_sums(&mut components, board.arch, &opts.artifacts)?;
    crate::artifact::check_plan(
        &components,
        board.arch,
        opts.sources.as_deref(),
        &opts.artifacts,
    )?;
    // Stack `base`'s components make the base root every stack of the board shares.
    let base: Vec<String> = crate::component::resolve(&data, "base", &board)
        .context("resolving stack `base` (the root every stack is layered on)")?
        .into_iter()
        .map(|c| c.name)
        .collect();
    let plan = BuildPlan::new(
        board,
        &opts.stack,
        &components,
        &base,
        opts.mirror.as_deref(),
        opts.sources.as_deref(),
    )?;
    Ok((data, plan, components))
}

/// `--mirror` must be an http(s) or file URL apt can use.
fn check_mirror(m: &str) -> Result<()> {
    let rest = ["http://", "https://", "file:///"]
        .iter()
        .find_map(|p| m.strip_prefix(p));
    let ok = rest
        .is_some_and(|r| !r.is_empty() && !r.starts_with('/') || m.starts_with("file:///"))
        && !m.chars().any(|c| c.is_whitespace() || c.is_control());
    if !ok {
        bail!(
            "--mirror {m:?} is not a URL: give an http://, https:// or file:/// URL of a Debian mirror (e.g. http://HOST/debian)"
        );
    }
    Ok(())
}

/// Hash of everything that goes into an image: the plan and the first-boot agent.
pub fn image_inputs_hash(plan: &BuildPlan, agent: &crate::agentbin::AgentBinary) -> String {
    crate::plan::json_key(&(plan.inputs_hash(), &agent.sha256))
}

/// What `build --dry-run` shows of one board's build: the resolved plan, without building or
/// touching the network, the cache or the agent.
#[derive(Debug, serde::Serialize)]
pub struct DryRun {
    pub image: String,
    pub board: String,
    pub arch: &'static str,
    pub stack: String,
    /// The board's source set.
    pub sources: String,
    pub components: Vec<String>,
    /// Packages of the base root (the set's kernel and stack `base`'s) and of the layer over it.
    pub base_packages: Vec<String>,
    pub layer_packages: Vec<String>,
    /// Every apt source, the base's then the layer's (`uri: null` is the distribution's
    /// default mirror as mmdebstrap picks it).
    pub apt_sources: Vec<crate::plan::SourceSpec>,
    /// Pinned files, with the component that installs each.
    pub artifacts: Vec<serde_json::Value>,
    /// Cluster-file roles the image's components serve.
    pub roles: Vec<String>,
    /// Units enabled in the image.
    pub units: Vec<String>,
    pub rootfs_key: String,
    pub layer_key: Option<String>,
    /// Inputs that could not be read (a build stops on them).
    pub missing: Vec<String>,
}

/// Resolves every board's plan as `build` would, and builds nothing.
pub fn dry_run(opts: &BuildOptions, boards: &[String]) -> Result<Vec<DryRun>> {
    boards
        .iter()
        .map(|b| {
            let mut o = opts.clone();
            o.board.clone_from(b);
            let (_, plan, comps) = resolve(&o).with_context(|| format!("board {b}"))?;
            let mut roles: Vec<String> = comps.iter().flat_map(|c| c.file.roles.clone()).collect();
            roles.sort();
            roles.dedup();
            Ok(DryRun {
                image: plan.name.clone(),
                board: plan.board.name.clone(),
                arch: plan.board.arch.as_str(),
                stack: plan.stack.clone(),
                sources: plan.sources.clone(),
                components: plan.components.iter().map(|c| c.name.clone()).collect(),
                base_packages: plan.rootfs.packages.clone(),
                layer_packages: plan
                    .layer
                    .as_ref()
                    .map(|l| l.packages.clone())
                    .unwrap_or_default(),
                apt_sources: plan.all_sources().cloned().collect(),
                artifacts: plan
                    .components
                    .iter()
                    .flat_map(|c| {
                        c.artifacts.iter().map(move |a| {
                            serde_json::json!({
                                "component": c.name, "name": a.name, "path": a.path,
                                "url": a.url, "sha256": a.sha256,
                            })
                        })
                    })
                    .collect(),
                roles,
                units: plan
                    .components
                    .iter()
                    .flat_map(|c| c.enable.clone())
                    .collect(),
                rootfs_key: plan.rootfs_key(),
                layer_key: plan.layer_key(),
                missing: plan.missing.clone(),
            })
        })
        .collect()
}

/// Builds one image per board of `boards` with the same stack and options, one after another
/// in one run: every plan is resolved and checked first (so a wrong board name or an
/// unreachable artifact stops the run before hours of work), then the images share the
/// package, root filesystem and block caches. Stops at the first failure, naming the board.
pub fn build_boards(opts: &BuildOptions, boards: &[String]) -> Result<Vec<Outputs>> {
    if boards.len() > 1 && (opts.uboot.is_some() || opts.firstboot.is_some()) {
        bail!("--uboot and --firstboot are for one board (one bootloader, one architecture): build {} one at a time", boards.join(", "));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut each = Vec::new();
    for b in boards {
        if !seen.insert(b.as_str()) {
            bail!("--board names {b} twice");
        }
        let mut o = opts.clone();
        o.board.clone_from(b);
        resolve(&o)
            .and_then(|(_, plan, _)| plan.require_complete())
            .with_context(|| format!("board {b}"))?;
        each.push(o);
    }
    let n = each.len();
    let mut out = Vec::new();
    for (i, o) in each.iter().enumerate() {
        if n > 1 {
            log(format!("board {} ({} of {n})", o.board, i + 1));
        }
        out.push(
            build(o).with_context(|| format!("building board {} ({} of {n})", o.board, i + 1))?,
        );
    }
    Ok(out)
}

/// Builds one image: a sequence of named stages over one [`Build`] (what the plan resolved,
/// the cache and the staging directory), each stage taking what the earlier ones made.
pub fn build(opts: &BuildOptions) -> Result<Outputs> {
    let b = Build::start(opts)?;
    let inputs = b.inputs()?;
    if let Some(done) = b.reuse(&inputs)? {
        return Ok(done);
    }
    let root = b.root_filesystem()?;
    let tree = b.overlays(&inputs, &root)?;
    let raw = b.disk_image(&inputs, &root, &tree)?;
    b.outputs(inputs, root, tree, &raw)
}

/// What every stage of one build reads.
struct Build<'a> {
    opts: &'a BuildOptions,
    data: PathBuf,
    plan: BuildPlan,
    components: Vec<crate::component::Component>,
    cache: crate::cache::Cache,
    staging: tempfile::TempDir,
    layout: Vec<Placed>,
    ids: DiskIds,
}

/// Stage 1: the files from outside the archive, fetched and checked before the long work,
/// and the hash of everything that goes into the image.
struct Inputs {
    blob: Option<(u64, Vec<u8>, crate::blob::BlobInfo)>,
    artifacts: Vec<(crate::artifact::Fetched, Vec<u8>, u32)>,
    agent: crate::agentbin::AgentBinary,
    hash: String,
}

/// Stage 2: the cached root filesystem (base, or a stack's layer over it).
struct Root {
    tar: PathBuf,
    info: RootfsInfo,
    /// The build's one timestamp (see [`source_date_epoch`]).
    epoch: u64,
}

/// Stage 3: the image's root tree (the cached root with overlays, generated files and unit
/// links) and what was read from it.
struct Tree {
    tar: PathBuf,
    kernel_path: String,
    kver: String,
    cmdline: String,
    packages: Vec<crate::tarfs::Package>,
    file_bytes: u64,
}

impl<'a> Build<'a> {
    fn start(opts: &'a BuildOptions) -> Result<Build<'a>> {
        let (data, plan, components) = resolve(opts)?;
        plan.require_complete()?;
        crate::doctor::preflight_build(plan.board.arch).context("checking host tools")?;
        let staging = crate::output::staging_dir(&opts.out, &plan.name)?;
        let cache = crate::cache::Cache::open(opts.cache.as_deref())?;
        log(format!(
            "building {} (board {}, stack {})",
            plan.name, plan.board.name, plan.stack
        ));
        let layout = plan.board.layout()?;
        crate::boot::preflight(&plan.board, &data.join("boards").join(&plan.board.name))?;
        let ids = DiskIds::derive(&plan.ids_seed(), &plan.board);
        Ok(Build {
            opts,
            data,
            plan,
            components,
            cache,
            staging,
            layout,
            ids,
        })
    }

    fn inputs(&self) -> Result<Inputs> {
        let board = &self.plan.board;
        // The bootloader blob is fetched and checked before the long root filesystem step.
        let blob = match &board.boot.blob {
            Some(blob) => {
                let (data, info) =
                    crate::blob::fetch(blob, self.opts.uboot.as_deref(), &self.cache)?;
                crate::blob::check_fits(board, &self.layout, blob, data.len() as u64)?;
                Some((blob.offset.0, data, info))
            }
            None => None,
        };
        // So are the components' pinned artifacts (release binaries no apt archive carries).
        let artifacts = crate::artifact::fetch_all(
            &self.components,
            board.arch,
            self.opts.sources.as_deref(),
            &self.opts.artifacts,
            &self.cache,
        )?;
        // The agent is part of every image's inputs.
        let agent = crate::agentbin::find_or_build(
            board.arch,
            self.opts.firstboot.as_deref(),
            &self.cache,
        )?;
        let hash = image_inputs_hash(&self.plan, &agent);
        log(format!(
            "inputs {} (first-boot agent {})",
            &hash[..12],
            agent.path.display()
        ));
        Ok(Inputs {
            blob,
            artifacts,
            agent,
            hash,
        })
    }

    /// The outputs of an earlier build with the same inputs, unless `--refresh`.
    fn reuse(&self, inputs: &Inputs) -> Result<Option<Outputs>> {
        if self.opts.refresh {
            return Ok(None);
        }
        let done = up_to_date(self.opts, &self.plan.name, &inputs.hash)?;
        if let Some(done) = &done {
            log(format!(
                "up to date: {} was built from the same inputs ({}); --refresh builds it again",
                done.image().display(),
                &inputs.hash[..12]
            ));
        }
        Ok(done)
    }

    fn root_filesystem(&self) -> Result<Root> {
        if self.opts.refresh || !crate::rootfs::is_cached(&self.plan, &self.cache) {
            let others: Vec<&str> = self
                .plan
                .board
                .sources
                .keys()
                .map(String::as_str)
                .filter(|k| *k != self.plan.sources)
                .collect();
            let hint = match others.as_slice() {
            [] => "hint: check the network or pass --mirror".to_owned(),
            sets => format!(
                "hint: build from substitute packages with {} (the manifest records it), or check the network",
                sets.iter().map(|s| format!("--sources {s}")).collect::<Vec<_>>().join(" or ")
            ),
        };
            // A component's own source: its substitute set if it has one, else say there is none.
            let hint_for = |source: &str| {
                // The component whose chosen set brings this source.
                let owner = self.components.iter().find(|c| {
                    c.source_set(self.opts.sources.as_deref())
                        .ok()
                        .flatten()
                        .is_some_and(|(_, set)| set.apt.iter().any(|a| a.name == source))
                });
                match owner {
                    Some(c) => {
                        let chosen = c
                            .source_set(self.opts.sources.as_deref())
                            .ok()
                            .flatten()
                            .map_or("", |(n, _)| n);
                        let others = c.substitutes(chosen);
                        if others.is_empty() {
                            format!(
                            "hint: component `{}` has no substitute source set; it needs this repository (check the network, or build a stack without it)",
                            c.name
                        )
                        } else {
                            format!(
                                "hint: build component `{}` without it: {}",
                                c.name,
                                others.join(" or ")
                            )
                        }
                    }
                    None => hint.clone(),
                }
            };
            crate::rootfs::check_sources_reachable(&self.plan, &hint_for)?;
        }
        let (tar, info) = crate::rootfs::ensure(&self.plan, &self.cache, self.opts.refresh)?;
        let epoch = source_date_epoch(&tar)?;
        Ok(Root { tar, info, epoch })
    }

    fn overlays(&self, inputs: &Inputs, root: &Root) -> Result<Tree> {
        let (board, plan) = (&self.plan.board, &self.plan);
        let (root_index, root_part) = board.root_partition();
        let root_arg = match board.boot.root {
            crate::board::RootBy::Partuuid => {
                format!("root=PARTUUID={}", self.ids.partuuid(root_index))
            }
            crate::board::RootBy::Label => format!("root=LABEL={}", root_part.label),
        };
        let cmdline = format!("{root_arg} {}", board.boot.cmdline);

        let step = Step::start("applying overlays");
        let mut changes = Changes::default();
        let mut enable = Vec::new();
        for c in &self.components {
            if let Some(dir) = &c.rootfs {
                changes
                    .add_tree(dir)
                    .with_context(|| format!("component `{}`", c.name))?;
            }
            enable.extend(c.file.enable.iter().cloned());
        }
        for (a, data, mode) in &inputs.artifacts {
            changes.file(a.path.trim_start_matches('/'), data.clone(), *mode);
        }
        generated_files(&mut changes, plan, &self.layout, &self.ids, &inputs.hash)?;
        changes.file(
            "usr/lib/picoimg/picoimg-firstboot",
            inputs.agent.bytes.clone(),
            0o755,
        );
        tarfs::enable_units(&root.tar, &mut changes, &enable).context("enabling units")?;
        let tar = self.staging.path().join("root.tar");
        // One pass: the new tree written, its kernel link and package list kept, its bytes
        // counted.
        let applied = tarfs::apply(
            &root.tar,
            &changes,
            &tar,
            root.epoch,
            &["vmlinuz", "var/lib/dpkg/status"],
        )?;
        step.done();
        let found = &applied.found;
        let kernel_path = match found.get("vmlinuz") {
            Some(Found::Symlink(t)) => tarfs::norm(t),
            _ => bail!(
                "the root filesystem has no /vmlinuz link: is a kernel package ({}) installed?",
                plan.source_set().packages.kernel.join(", ")
            ),
        };
        let kver = kernel_path
            .rsplit_once("vmlinuz-")
            .map(|x| x.1.to_owned())
            .with_context(|| format!("cannot read a kernel version from {kernel_path}"))?;
        let packages = match found.get("var/lib/dpkg/status") {
            Some(Found::File(d)) => tarfs::parse_dpkg_status(&String::from_utf8_lossy(d)),
            _ => bail!("the root filesystem has no dpkg status file"),
        };
        let file_bytes = applied.file_bytes;
        Ok(Tree {
            tar,
            kernel_path,
            kver,
            cmdline,
            packages,
            file_bytes,
        })
    }

    fn disk_image(&self, inputs: &Inputs, root: &Root, tree: &Tree) -> Result<PathBuf> {
        let board = &self.plan.board;
        let raw = self.staging.path().join(format!("{}.img", self.plan.name));
        let step = Step::start(format!(
            "disk image ({} {})",
            board.disk.size, board.disk.table
        ));
        crate::disk::create(&raw, board, &self.layout, &self.ids)?;
        if let Some((offset, data, _)) = &inputs.blob {
            crate::blob::write(&raw, *offset, data)?;
        }
        crate::boot::write(
            &raw,
            &crate::boot::BootInputs {
                board,
                epoch: root.epoch,
                layout: &self.layout,
                ids: &self.ids,
                root_tar: &tree.tar,
                base_tar: &root.tar,
                kernel_path: &tree.kernel_path,
                kver: &tree.kver,
                cmdline: &tree.cmdline,
                name: &self.plan.name,
                dtbs: &self.plan.source_set().dtbs,
                board_dir: self.data.join("boards").join(&board.name),
            },
        )?;
        let (ri, rp) = board.root_partition();
        let root_placed = self
            .layout
            .iter()
            .find(|p| p.index == ri)
            .expect("root placed");
        crate::disk::write_ext4(
            &raw,
            root_placed,
            &rp.label,
            self.ids.root_fs_uuid,
            root.epoch,
            &tree.tar,
        )?;
        std::fs::remove_file(&tree.tar).ok();
        step.done();
        Ok(raw)
    }

    fn outputs(self, inputs: Inputs, root: Root, tree: Tree, raw: &Path) -> Result<Outputs> {
        let (opts, plan, board) = (self.opts, &self.plan, &self.plan.board);
        let staging = self.staging.path();
        let step = Step::start("block map");
        let bmap = crate::bmap::create(raw)?;
        step.done();
        if let Some(level) = opts.xz_level {
            let xz = staging.join(format!("{}.img.xz", plan.name));
            let packed = crate::output::xz_compress(raw, &xz, level, Some(&self.cache.xz_dir()))?;
            log(format!(
                "compressed {} blocks, {} of them taken from the block cache",
                packed.blocks, packed.reused
            ));
        }
        let manifest = Manifest {
            picoimg_version: plan.picoimg_version.clone(),
            name: plan.name.clone(),
            board: board.clone(),
            stack: plan.stack.clone(),
            sources: plan.sources.clone(),
            components: self.components.iter().map(|c| c.name.clone()).collect(),
            inputs_hash: inputs.hash.clone(),
            firstboot: inputs.agent,
            rootfs: root.info,
            kernel: tree.kver,
            kernel_cmdline: tree.cmdline,
            blob: inputs.blob.map(|(_, _, info)| info),
            artifacts: inputs.artifacts.into_iter().map(|(a, _, _)| a).collect(),
            disk: DiskManifest {
                size: board.disk.size.0,
                partitions: self
                    .layout
                    .iter()
                    .map(|p| PartManifest {
                        number: p.index + 1,
                        name: board.disk.partitions[p.index].name.clone(),
                        start: p.start,
                        size: p.size,
                        type_guid: board.disk.partitions[p.index].kind.gpt_guid().to_owned(),
                        uuid: self.ids.partuuid(p.index),
                    })
                    .collect(),
                ids: self.ids.clone(),
            },
            compression: Compression::of(opts),
            root_file_bytes: tree.file_bytes,
            source_date_epoch: root.epoch,
            apt_sources: plan.all_sources().cloned().collect(),
            packages: tree.packages,
        };
        let names = OutputNames::new(&plan.name);
        std::fs::write(staging.join(&names.bmap), &bmap)?;
        std::fs::write(
            staging.join(&names.manifest),
            serde_json::to_vec_pretty(&manifest)?,
        )?;

        let mut sums = Vec::new();
        let publish = names.files(opts);
        for n in &publish {
            sums.push((n.clone(), crate::output::sha256_file(&staging.join(n))?));
        }
        for n in &publish {
            crate::output::publish(&staging.join(n), &opts.out.join(n))?;
        }
        crate::output::update_sums(&opts.out, &sums)?;
        let done = names.outputs(opts);
        log(format!("wrote {}", done.image().display()));
        Ok(done)
    }
}

/// The finished outputs of an earlier build with these inputs and options, if they are all
/// there and match `SHA256SUMS`.
fn up_to_date(opts: &BuildOptions, name: &str, inputs_hash: &str) -> Result<Option<Outputs>> {
    let names = OutputNames::new(name);
    let Ok(text) = std::fs::read(opts.out.join(&names.manifest)) else {
        return Ok(None);
    };
    let Ok(old) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return Ok(None);
    };
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    if old["inputs_hash"] != inputs_hash
        || old["compression"] != serde_json::to_value(Compression::of(opts))?
        || epoch.is_some_and(|e| old["source_date_epoch"].as_u64() != Some(e))
    {
        return Ok(None);
    }
    let sums = std::fs::read_to_string(opts.out.join("SHA256SUMS")).unwrap_or_default();
    for f in &names.files(opts) {
        let listed = sums.lines().find_map(|l| {
            let (sum, n) = l.split_once("  ")?;
            (n.trim_start_matches('*') == f.as_str()).then_some(sum)
        });
        let path = opts.out.join(f);
        match listed {
            Some(sum) if path.is_file() && crate::output::sha256_file(&path)? == sum => {}
            _ => return Ok(None),
        }
    }
    Ok(Some(names.outputs(opts)))
}

impl Outputs {
    /// The image a user flashes: the `.img.xz`, or the raw image without one.
    pub fn image(&self) -> &Path {
        self.image_xz
            .as_deref()
            .or(self.raw.as_deref())
            .expect("outputs without an .img.xz keep the raw image (OutputNames::outputs)")
    }
}

/// File names of one image's outputs.
pub struct OutputNames {
    pub raw: String,
    pub xz: String,
    pub bmap: String,
    pub manifest: String,
}

impl OutputNames {
    pub fn new(name: &str) -> Self {
        OutputNames {
            raw: format!("{name}.img"),
            xz: format!("{name}.img.xz"),
            bmap: format!("{name}.img.bmap"),
            manifest: format!("{name}.manifest.json"),
        }
    }

    /// The files a build with `opts` publishes (and `SHA256SUMS` lists): the `.img.xz` unless
    /// `--no-xz`, the block map, the manifest, and the raw image with `--keep-raw` or
    /// `--no-xz`.
    pub fn files(&self, opts: &BuildOptions) -> Vec<String> {
        let mut f = Vec::new();
        if opts.xz_level.is_some() {
            f.push(self.xz.clone());
        }
        f.extend([self.bmap.clone(), self.manifest.clone()]);
        if opts.writes_raw() {
            f.push(self.raw.clone());
        }
        f
    }

    fn outputs(&self, opts: &BuildOptions) -> Outputs {
        Outputs {
            image_xz: opts.xz_level.map(|_| opts.out.join(&self.xz)),
            bmap: opts.out.join(&self.bmap),
            manifest: opts.out.join(&self.manifest),
            raw: opts.writes_raw().then(|| opts.out.join(&self.raw)),
        }
    }
}

/// The one timestamp of everything the build writes (overlay files, FAT entries, ext4
/// metadata): `SOURCE_DATE_EPOCH` when set, else when the cached root filesystem was made, so
/// two builds from the same cache entry and inputs give the same bytes.
fn source_date_epoch(root_tar: &Path) -> Result<u64> {
    if let Some(v) = std::env::var_os("SOURCE_DATE_EPOCH") {
        let v = v.to_string_lossy();
        return v.trim().parse().with_context(|| {
            format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds since 1970: set it to one (`date +%s`) or unset it")
        });
    }
    let made = std::fs::metadata(root_tar)
        .and_then(|m| m.modified())
        .with_context(|| format!("reading the time of {}", root_tar.display()))?;
    Ok(made
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()))
}

/// Files every image gets from its plan: hostname, fstab, machine-id, build info.
fn generated_files(
    changes: &mut Changes,
    plan: &BuildPlan,
    layout: &[Placed],
    ids: &DiskIds,
    inputs_hash: &str,
) -> Result<()> {
    let board = &plan.board;
    changes.file("etc/hostname", format!("{}\n", board.name), 0o644);
    changes.file(
        "etc/hosts",
        picoimg_firstboot::contract::hosts("picoimg build", &board.name, &[]),
        0o644,
    );
    // Each node makes its own machine id on first boot (and systemd applies presets then).
    changes.file("etc/machine-id", "uninitialized\n", 0o444);
    changes.remove.push("var/lib/dbus/machine-id".into());
    changes.remove.push("var/lib/systemd/random-seed".into());
    // Host keys are made per node on first boot (openssh's sshd-keygen.service in trixie).
    changes.remove.push("etc/ssh/ssh_host_*".into());
    let mut fstab = String::from("# <file system> <mount point> <type> <options> <dump> <pass>\n");
    for p in layout {
        let part = &board.disk.partitions[p.index];
        let (fs, opts, pass) = match part.fs {
            Filesystem::Ext4 if part.mount == "/" => ("ext4", "rw,errors=remount-ro", 1),
            // The device may appear late: an SD card in a slow reader, or a VM under heavy
            // emulation, where udev needed more than systemd's default 90 s and the boot
            // partition's mount (which the first-boot agent requires) failed.
            Filesystem::Ext4 => ("ext4", "rw,nofail,x-systemd.device-timeout=10min", 2),
            // flush: write FAT changes early; boards lose power without a shutdown.
            Filesystem::Vfat => (
                "vfat",
                "umask=0077,flush,nofail,x-systemd.device-timeout=10min",
                2,
            ),
        };
        fstab.push_str(&format!(
            "PARTUUID={}\t{}\t{fs}\t{opts}\t0\t{pass}\n",
            ids.partuuid(p.index),
            part.mount
        ));
    }
    changes.file("etc/fstab", fstab, 0o644);
    for p in layout {
        let part = &board.disk.partitions[p.index];
        if part.mount != "/" {
            let mount = tarfs::norm(&part.mount);
            // What packages put there (the raspi-firmware hook's files) goes onto the
            // partition itself; in the root filesystem it would only be hidden by the mount.
            if part.fs == Filesystem::Vfat {
                changes.remove.push(format!("{mount}/*"));
            }
            changes
                .entries
                .insert(mount, tarfs::NewEntry::Dir { mode: 0o755 });
        }
    }
    // The agent reads its cluster file from the first FAT partition, and waits for its mount.
    let boot_mount = layout
        .iter()
        .map(|p| &board.disk.partitions[p.index])
        .find(|p| p.fs == Filesystem::Vfat)
        .map(|p| p.mount.clone());
    if let Some(m) = &boot_mount {
        changes.file(
            "etc/systemd/system/picoimg-firstboot.service.d/boot-mount.conf",
            format!("# Written by picoimg build: the cluster file is on the boot partition.\n[Unit]\nRequiresMountsFor={m}\n"),
            0o644,
        );
    }
    let info = picoimg_firstboot::contract::BuildInfo {
        name: plan.name.clone(),
        boot_mount,
        board: board.name.clone(),
        stack: plan.stack.clone(),
        picoimg_version: plan.picoimg_version.clone(),
        inputs_hash: inputs_hash.to_owned(),
    };
    changes.file(
        picoimg_firstboot::contract::BUILD_INFO,
        serde_json::to_vec_pretty(&info)?,
        0o644,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An earlier build's outputs count only when its inputs hash and compression level are
    /// this build's and every file is there with the sum SHA256SUMS gives it.
    #[test]
    fn up_to_date_needs_the_same_inputs_level_and_intact_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = BuildOptions::new("h4", "base");
        opts.out = dir.path().to_owned();
        let names = OutputNames::new("h4-base");
        let write = |name: &str, body: &[u8]| std::fs::write(dir.path().join(name), body).unwrap();
        write(
            &names.manifest,
            br#"{"inputs_hash": "abc", "compression": {"format": "xz", "level": 6}}"#,
        );
        write(&names.xz, b"image");
        write(&names.bmap, b"map");
        let sums: Vec<(String, String)> = [&names.xz, &names.bmap, &names.manifest]
            .iter()
            .map(|n| {
                let s = crate::output::sha256_file(&dir.path().join(n)).unwrap();
                (n.to_string(), s)
            })
            .collect();
        crate::output::update_sums(dir.path(), &sums).unwrap();
        assert!(up_to_date(&opts, "h4-base", "abc").unwrap().is_some());
        assert!(up_to_date(&opts, "h4-base", "abd").unwrap().is_none());
        opts.xz_level = Some(1);
        assert!(up_to_date(&opts, "h4-base", "abc").unwrap().is_none());
        // Without xz: the raw image is an output, and the manifest says "none".
        opts.xz_level = None;
        assert!(up_to_date(&opts, "h4-base", "abc").unwrap().is_none());
        opts.xz_level = Some(6);
        opts.keep_raw = true;
        assert!(up_to_date(&opts, "h4-base", "abc").unwrap().is_none());
        opts.keep_raw = false;
        write(&names.bmap, b"map, damaged");
        assert!(up_to_date(&opts, "h4-base", "abc").unwrap().is_none());
        std::fs::remove_file(dir.path().join(&names.bmap)).unwrap();
        assert!(up_to_date(&opts, "h4-base", "abc").unwrap().is_none());
    }
}
