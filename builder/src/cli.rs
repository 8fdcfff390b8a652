//! Command-line interface: argument parsing and dispatch. `main` only calls [`main`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};

use crate::build::BuildOptions;
use crate::qemu::{Accel, Net, RunOptions};
use crate::size::Bytes;

/// Build bootable OS images for cluster boards (Odroid H4, Raspberry Pi 5, Odroid C5), with a
/// cluster stack preinstalled.
///
/// Typical use: `picoimg build --board h4 --stack base`, then `picoimg run out/h4-base.img.xz`
/// to boot it in QEMU, then flash out/h4-base.img.xz with its .bmap.
#[derive(Debug, Parser)]
#[command(name = "picoimg", version, propagate_version = true)]
pub struct Cli {
    /// Directory holding boards/ and overlays/ (default: $PICOIMG_DATA_DIR, the installed
    /// share/picoimg, or the source tree).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build an image: <out>/<board>-<stack>.img.xz with .img.bmap, .manifest.json and
    /// SHA256SUMS.
    Build(BuildArgs),
    /// Show what `build` would do: the resolved plan and its hashes, as JSON.
    Plan(PlanArgs),
    /// Boot an image in QEMU with its board's profile; the serial console is on stdout.
    Run(RunArgs),
    /// List the boards, one line each.
    Boards {
        /// Also list each board's source sets (the default first).
        #[arg(long)]
        sources: bool,
        /// Print JSON (every board with its source sets) for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List the stacks and their components; the presets with the integration guide's
    /// configuration each is and the guide's parts picoimg cannot install yet.
    Stacks {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        /// Print the platform matrix instead: which board runs which stack (yes, no, or not
        /// yet), and why not.
        #[arg(long)]
        matrix: bool,
    },
    /// Print a shell completion script: `picoimg completions bash > /etc/bash_completion.d/picoimg`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `picoimg manpage | man -l -`.
    Manpage,
    /// Check the host tools and print the install line for anything missing.
    Doctor,
    /// Write or check the cluster file that nodes read on first boot.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Show or prune the build cache (root filesystems, packages, pinned files).
    Cache {
        /// The cache (default: $PICOIMG_CACHE_DIR, /var/cache/picoimg as root, else
        /// ~/.cache/picoimg).
        #[arg(long, value_name = "DIR", global = true)]
        cache: Option<PathBuf>,
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Write an image to an SD card, eMMC or USB disk (or a file): only the blocks its .bmap
    /// maps, each checked by sha256, the first MiB last, then read back and compared.
    Flash {
        /// The image: .img or .img.xz.
        image: PathBuf,
        /// Whole block device (/dev/sdX, /dev/mmcblkN) or a regular file. A file is written
        /// beside it and renamed into place when complete; an existing non-empty file is
        /// replaced only with --force.
        target: PathBuf,
        /// Block map to follow (default: the .bmap beside the image, ours or bmaptool's).
        #[arg(long, value_name = "FILE")]
        bmap: Option<PathBuf>,
        /// Write every byte even if a block map is there.
        #[arg(long, conflicts_with = "bmap")]
        no_bmap: bool,
        /// Skip reading back what was written.
        #[arg(long)]
        no_verify: bool,
        /// Do not ask before writing a device.
        #[arg(long, short)]
        yes: bool,
        /// Write a device that does not say it is removable (an internal disk), or replace an
        /// existing non-empty file.
        #[arg(long)]
        force: bool,
        /// Cluster file to put on the boot partition as picoimg/cluster.toml (checked first).
        #[arg(long, value_name = "FILE")]
        cluster: Option<PathBuf>,
        /// Node name to write to picoimg/node.toml (with --cluster).
        #[arg(long, value_name = "NAME", requires = "cluster")]
        node: Option<String>,
    },
    /// Put a cluster file (and a node's name) on the boot partition of a raw image or a
    /// written card, without mounting it.
    Personalise {
        /// A raw .img file or a block device (an .img.xz must be decompressed or flashed first).
        image: PathBuf,
        /// Cluster file to copy to picoimg/cluster.toml (checked first).
        #[arg(long, value_name = "FILE")]
        cluster: PathBuf,
        /// Node name to write to picoimg/node.toml (must be in the cluster file); without it
        /// the node finds itself by MAC, serial or DMI UUID, and a node.toml left by an
        /// earlier run is removed.
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List the cached root filesystems (base roots and stack layers) with their sizes and
    /// when a build last used them, then the other folders' sizes.
    List,
    /// Remove root filesystems no build used for DAYS, and files killed builds left behind.
    Prune {
        /// Keep what a build used within this many days.
        #[arg(
            long,
            value_name = "DAYS",
            default_value_t = 30,
            conflicts_with = "all"
        )]
        older_than: u64,
        /// Remove every cached root filesystem (packages and pinned files stay).
        #[arg(long)]
        all: bool,
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Write a complete, commented cluster file with a fresh secret (to stdout, or --out).
    Init {
        /// Cluster name (letters, digits, '-').
        #[arg(long)]
        name: String,
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// IPv4 subnet of the nodes; they get static addresses from .10 up.
        #[arg(long, default_value = "10.42.0.0/24")]
        subnet: String,
        /// The stack the nodes run (see `picoimg stacks`): its sections and roles go in.
        #[arg(long, default_value = "consul")]
        stack: String,
        /// Write to this file (mode 0600) instead of stdout; never overwrites.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Check a cluster file: every problem with its line, exit 1 if there is any.
    Check {
        /// The cluster file.
        file: PathBuf,
        /// Print JSON: {file, ok, problems: [{file, line, field, message}], warnings, cluster}.
        #[arg(long)]
        json: bool,
        /// Also check that the image's stack serves every role the file names.
        #[arg(long, value_name = "STACK")]
        stack: Option<String>,
    },
    /// Print a secret derived from the cluster secret: by default the operator token of the
    /// file's stack (Consul's management token, for CONSUL_HTTP_TOKEN).
    Token {
        /// The cluster file.
        file: PathBuf,
        /// Which secret (e.g. consul-management-token, consul-gossip-key).
        name: Option<String>,
    },
    /// Print an admin kubeconfig for the file's K3s cluster, made from the cluster file alone
    /// (its CAs and the admin's key are derived from the secret): no login on a node.
    Kubeconfig {
        /// The cluster file.
        file: PathBuf,
        /// The API's host: a k3s-server's address or one of `[k3s] tls_san` (default: the
        /// first k3s-server's address).
        #[arg(long, value_name = "HOST")]
        server: Option<String>,
        /// Write to this file (mode 0600) instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct Target {
    /// Board to build for (see `picoimg boards`). `build` takes several, comma-separated
    /// (`h4,c5`): one image each, in one run, sharing the caches. With `build --cluster`: the
    /// board of the nodes that name none.
    #[arg(long)]
    pub board: Option<String>,
    /// Stack of components to install (see `picoimg stacks`), or a list of components
    /// (`consul,docker`).
    #[arg(long, default_value = "base")]
    pub stack: String,
    /// A local copy of a component's pinned artifact (a vendor's release archive or binary),
    /// instead of downloading it; checked against the same sha256. An artifact of its own
    /// source set (Nomad's release archive) selects that set. Repeatable.
    #[arg(long, value_name = "NAME=FILE")]
    pub artifact: Vec<String>,
    /// Check the --artifact file of NAME against this sha256 instead of the pinned one: for
    /// another release than the pin (take the sum from the vendor's SHA256SUMS). Repeatable.
    #[arg(long, value_name = "NAME=SHA256")]
    pub artifact_sha256: Vec<String>,
    /// Apt mirror URL for the board's default source, instead of the distribution's default
    /// (which mmdebstrap picks, adding the -updates and -security suites).
    #[arg(long, value_name = "URL")]
    pub mirror: Option<String>,
    /// Image size instead of the board's (the root partition fills it; it grows again to the
    /// whole disk on first boot).
    #[arg(long, value_name = "SIZE")]
    pub image_size: Option<Bytes>,
    /// Source set of the board to build from (see `picoimg boards --sources`); default: the
    /// board's real sources. `debian` substitutes Debian's packages where a board has it.
    #[arg(long, value_name = "SET")]
    pub sources: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub target: Target,
    /// Output directory.
    #[arg(long, default_value = "out", value_name = "DIR")]
    pub out: PathBuf,
    /// Cache for downloaded packages and root filesystems (default: $PICOIMG_CACHE_DIR,
    /// /var/cache/picoimg as root, else ~/.cache/picoimg).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Also keep the uncompressed image (<board>-<stack>.img).
    #[arg(long)]
    pub keep_raw: bool,
    /// xz compression level, 0 (fast) to 9 (small). The image is compressed in 8 MiB blocks;
    /// blocks compressed at this level before (same contents) are taken from the cache.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(0..=9))]
    pub xz_level: u32,
    /// Write no .img.xz: the raw image (<board>-<stack>.img, sparse) with its block map is
    /// the output, for `picoimg run` or `picoimg flash` on this machine (compressing is the
    /// longest step of a rebuild).
    #[arg(long, conflicts_with = "xz_level")]
    pub no_xz: bool,
    /// Build again even if the outputs are up to date, and remake the root filesystem (base
    /// and stack layer) even if the cache has it (to pick up archive updates).
    #[arg(long)]
    pub refresh: bool,
    /// Local bootloader blob to write instead of downloading the board's (Odroid C5 u-boot).
    #[arg(long, value_name = "FILE")]
    pub uboot: Option<PathBuf>,
    /// Resolve and print what would be built (components, packages, apt sources, pinned
    /// files, roles, units) for each board, and build nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: print JSON (an array, one object per board) for scripts.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    /// Build for every board this cluster file's nodes name (`board = "c5"` in a [[node]]),
    /// one image each; nodes that name none take --board.
    #[arg(long, value_name = "FILE")]
    pub cluster: Option<PathBuf>,
    /// First-boot agent binary for the board's architecture (default: the static build beside
    /// picoimg, or in its cargo target directory, for example
    /// target/aarch64-unknown-linux-musl/release/picoimg-firstboot; or $PICOIMG_FIRSTBOOT).
    #[arg(long, value_name = "FILE")]
    pub firstboot: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Image to boot: .img or .img.xz. It is not modified unless --writable. With --cluster,
    /// one image per board the cluster file's nodes name (`board = "c5"`): each node boots its
    /// board's image, amd64 and arm64 VMs on one switch.
    #[arg(required = true, num_args = 1.., value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
    /// Board profile to use (default: from the manifest beside the image).
    #[arg(long)]
    pub board: Option<String>,
    /// Exit 0 once the image prints its ready marker on the console; non-zero, with the last
    /// 50 console lines, on timeout or when it reports failed units.
    #[arg(long)]
    pub expect_ready: bool,
    /// Seconds to wait for the ready marker (TCG emulation is slow: allow minutes).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Guest network.
    #[arg(long, value_enum, default_value_t = Net::User)]
    pub net: Net,
    /// Make the emulated disk this big (exercises growing the root partition); with --cluster,
    /// each node's system disk.
    #[arg(long, value_name = "SIZE")]
    pub disk_size: Option<Bytes>,
    /// Boot the raw image itself, keeping changes (default: a throw-away overlay).
    #[arg(long)]
    pub writable: bool,
    /// Forward this port on 127.0.0.1 to the guest's SSH port.
    #[arg(long, value_name = "PORT")]
    pub ssh_port: Option<u16>,
    /// CPU emulation. `auto` uses KVM only if a trial run of QEMU's firmware works, and
    /// restarts under TCG if QEMU reports a KVM failure during the boot.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Rehearse a cluster: boot one VM per node of this cluster file, told apart by MAC, on a
    /// private VDE switch; prints which nodes reported `picoimg: ready`.
    #[arg(long, value_name = "FILE")]
    pub cluster: Option<PathBuf>,
    /// With --cluster: boot the first N nodes of the file (default: all).
    #[arg(long, value_name = "N", requires = "cluster")]
    pub nodes: Option<usize>,
    /// With --cluster: keep the disks and console logs (<node>.log) in DIR.
    #[arg(long, value_name = "DIR", requires = "cluster")]
    pub dir: Option<PathBuf>,
    /// With --cluster: give node i SSH on 127.0.0.1:PORT+i (a second, restricted NIC).
    #[arg(long, value_name = "PORT", requires = "cluster")]
    pub ssh_port_base: Option<u16>,
    /// With --cluster: size of each extra empty disk a node's roles name (Ceph's OSD devices):
    /// thin qcow2 files in the run directory, kept if there already [default: 8GiB].
    #[arg(long, value_name = "SIZE", requires = "cluster")]
    pub data_disk_size: Option<Bytes>,
    /// Virtual CPUs of the VM, or of each VM with --cluster (default: the board profile's).
    /// Under TCG each one is a host thread.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: Option<u32>,
}

impl Target {
    fn options(self, data_dir: Option<PathBuf>) -> Result<BuildOptions> {
        Ok(BuildOptions {
            board: self.board.unwrap_or_default(),
            stack: self.stack,
            out: PathBuf::from("out"),
            mirror: self.mirror,
            cache: None,
            data_dir,
            keep_raw: false,
            xz_level: Some(6),
            refresh: false,
            image_size: self.image_size,
            sources: self.sources,
            uboot: None,
            artifacts: crate::artifact::parse_locals(&self.artifact, &self.artifact_sha256)?,
            firstboot: None,
        })
    }
}

pub fn main() -> Result<()> {
    let cli = Cli::parse();
    crate::interrupt::install()?;
    crate::cmd::set_install_hint(crate::doctor::install_hint);
    let data_dir = cli.data_dir;
    match cli.command {
        Command::Build(a) => {
            let from_file = match &a.cluster {
                Some(f) => Some(crate::cluster::boards(
                    f,
                    a.target.board.as_deref(),
                    data_dir.as_deref(),
                )?),
                None => None,
            };
            let mut o = a.target.options(data_dir)?;
            o.out = a.out;
            o.cache = a.cache;
            o.keep_raw = a.keep_raw;
            o.xz_level = (!a.no_xz).then_some(a.xz_level);
            o.refresh = a.refresh;
            o.uboot = a.uboot;
            o.firstboot = a.firstboot;
            let boards: Vec<String> = match from_file {
                Some(b) => b,
                None => o
                    .board
                    .split(',')
                    .map(str::trim)
                    .filter(|b| !b.is_empty())
                    .map(str::to_owned)
                    .collect(),
            };
            if boards.is_empty() {
                anyhow::bail!("--board is required (or --cluster FILE: the boards its nodes name)");
            }
            if a.dry_run {
                let plans = crate::build::dry_run(&o, &boards)?;
                if a.json {
                    crate::outln!("{}", serde_json::to_string_pretty(&plans)?)?;
                } else {
                    for p in &plans {
                        print_dry_run(p)?;
                    }
                }
                return Ok(());
            }
            for out in crate::build::build_boards(&o, &boards)? {
                if let Some(xz) = &out.image_xz {
                    crate::outln!("{}", xz.display())?;
                }
                crate::outln!("{}", out.bmap.display())?;
                crate::outln!("{}", out.manifest.display())?;
                if let Some(r) = out.raw {
                    crate::outln!("{}", r.display())?;
                }
            }
        }
        Command::Plan(a) => {
            if a.target.board.is_none() {
                anyhow::bail!("--board is required");
            }
            let opts = a.target.options(data_dir)?;
            let plan = crate::build::plan(&opts)?;
            let mut v = serde_json::to_value(&plan)?;
            // The image's inputs include the agent that `build` would install: without it
            // there is no image inputs hash (null), only the plan's.
            v["plan_hash"] = plan.inputs_hash().into();
            match crate::agentbin::find(plan.board.arch, opts.firstboot.as_deref()) {
                Ok(agent) => {
                    v["inputs_hash"] = crate::build::image_inputs_hash(&plan, &agent).into();
                    v["firstboot"] = serde_json::to_value(&agent)?;
                }
                Err(e) => {
                    eprintln!("picoimg: note: {e:#}; inputs_hash is null (plan_hash covers the plan without the agent)");
                    v["inputs_hash"] = serde_json::Value::Null;
                    v["firstboot"] = serde_json::Value::Null;
                }
            }
            v["rootfs_key"] = plan.rootfs_key().into();
            v["layer_key"] = plan.layer_key().into();
            if !plan.missing.is_empty() {
                // Hashes over inputs that were not all read would name no real build.
                for m in &plan.missing {
                    eprintln!("picoimg: note: {m} (a build stops here)");
                }
                for k in ["plan_hash", "inputs_hash", "rootfs_key", "layer_key"] {
                    v[k] = serde_json::Value::Null;
                }
            }
            crate::outln!("{}", serde_json::to_string_pretty(&v)?)?;
        }
        Command::Run(a) if a.cluster.is_some() => {
            crate::rehearsal::run(&crate::rehearsal::ClusterOptions {
                images: a.images,
                board: a.board,
                data_dir,
                cluster: a.cluster.unwrap_or_default(),
                nodes: a.nodes,
                dir: a.dir,
                timeout: Duration::from_secs(a.timeout),
                expect_ready: a.expect_ready,
                ssh_port_base: a.ssh_port_base,
                accel: a.accel,
                disk_size: a.disk_size.map(|b| b.0),
                data_disk_size: a
                    .data_disk_size
                    .map_or(crate::rehearsal::DATA_DISK_SIZE, |b| b.0),
                cpus: a.cpus,
            })?
        }
        Command::Run(a) => crate::qemu::run(&RunOptions {
            image: match <[PathBuf; 1]>::try_from(a.images) {
                Ok([image]) => image,
                Err(_) => {
                    anyhow::bail!("one image to boot (several only with --cluster, one per board)")
                }
            },
            board: a.board,
            data_dir,
            expect_ready: a.expect_ready,
            timeout: Duration::from_secs(a.timeout),
            net: a.net,
            disk_size: a.disk_size,
            writable: a.writable,
            ssh_port: a.ssh_port,
            accel: a.accel,
            nics: Vec::new(),
            data_disks: Vec::new(),
            cpus: a.cpus,
        })?,
        Command::Boards { sources, json } => boards(data_dir.as_deref(), sources, json)?,
        Command::Stacks { json, matrix } => {
            let data = crate::data::find(data_dir.as_deref())?;
            crate::stacks::print(&data, json, matrix)?
        }
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "picoimg", &mut out);
            crate::progress::print(format_args!("{}", String::from_utf8_lossy(&out)))?;
        }
        Command::Manpage => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut out)?;
            crate::progress::print(format_args!("{}", String::from_utf8_lossy(&out)))?;
        }
        Command::Doctor => crate::doctor::run()?,
        Command::Cache { cache, command } => cache_command(cache.as_deref(), command)?,
        Command::Cluster(ClusterCommand::Init {
            name,
            nodes,
            subnet,
            stack,
            out,
        }) => {
            // The file gets the sections and roles of the stack's components.
            let data = crate::data::find(data_dir.as_deref())?;
            let (_, comps) = crate::component::stack_roles(&data, &stack)?;
            let names: Vec<&str> = comps.iter().map(String::as_str).collect();
            crate::cluster::init(
                &picoimg_firstboot::cluster::InitOptions {
                    name: &name,
                    nodes,
                    subnet: &subnet,
                    stacks: &picoimg_firstboot::stacks::named(&names),
                },
                out.as_deref(),
            )?
        }
        Command::Cluster(ClusterCommand::Check { file, json, stack }) => {
            let roles = match &stack {
                Some(s) => {
                    let data = crate::data::find(data_dir.as_deref())?;
                    let (roles, comps) = crate::component::stack_roles(&data, s)?;
                    Some((s.clone(), roles, comps))
                }
                None => None,
            };
            crate::cluster::check(&file, json, roles.as_ref())?
        }
        Command::Cluster(ClusterCommand::Token { file, name }) => {
            crate::cluster::token(&file, name.as_deref())?
        }
        Command::Cluster(ClusterCommand::Kubeconfig { file, server, out }) => {
            crate::cluster::kubeconfig(&file, server.as_deref(), out.as_deref())?
        }
        Command::Flash {
            image,
            target,
            bmap,
            no_bmap,
            no_verify,
            yes,
            force,
            cluster,
            node,
        } => crate::flash::flash(&crate::flash::FlashOptions {
            image,
            target,
            bmap,
            no_bmap,
            verify: !no_verify,
            yes,
            force,
            cluster,
            node,
        })?,
        Command::Personalise {
            image,
            cluster,
            node,
        } => crate::cluster::personalise(&image, &cluster, node.as_deref())?,
    }
    Ok(())
}

/// `picoimg boards`: one line per board (with `sources`, its source sets), or JSON.
/// `build --dry-run` without --json: one paragraph per board.
fn print_dry_run(p: &crate::build::DryRun) -> Result<()> {
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(" ")
        }
    };
    crate::outln!(
        "{}: board {} ({}), stack {}, sources {}",
        p.image,
        p.board,
        p.arch,
        p.stack,
        p.sources
    )?;
    crate::outln!("  components: {}", list(&p.components))?;
    crate::outln!("  base packages: {}", list(&p.base_packages))?;
    crate::outln!("  layer packages: {}", list(&p.layer_packages))?;
    for s in &p.apt_sources {
        crate::outln!(
            "  apt: {} {} {} {}",
            s.name,
            s.uri.as_deref().unwrap_or("(default mirror)"),
            s.suite.as_deref().unwrap_or("(suite of the root)"),
            s.components.join(" ")
        )?;
    }
    for a in &p.artifacts {
        crate::outln!(
            "  file: {} {} from {} (sha256 {})",
            a["component"].as_str().unwrap_or_default(),
            a["path"].as_str().unwrap_or_default(),
            a["url"].as_str().unwrap_or_default(),
            a["sha256"].as_str().unwrap_or_default()
        )?;
    }
    crate::outln!("  roles: {}", list(&p.roles))?;
    crate::outln!("  units: {}", list(&p.units))?;
    for m in &p.missing {
        crate::outln!("  missing: {m}")?;
    }
    Ok(())
}

fn boards(data_dir: Option<&std::path::Path>, sources: bool, json: bool) -> Result<()> {
    let data = crate::data::find(data_dir)?;
    let mut all = Vec::new();
    for name in crate::data::board_names(&data) {
        let board = crate::data::board(&data, &name);
        if json {
            all.push(match board {
                Ok(b) => serde_json::json!({
                    "name": b.name,
                    "arch": b.arch.as_str(),
                    "description": b.description,
                    "default_sources": b.default_sources,
                    "sources": b.sources.iter().map(|(k, set)| serde_json::json!({
                        "name": k,
                        "description": set.description,
                        "default": *k == b.default_sources,
                    })).collect::<Vec<_>>(),
                }),
                Err(e) => serde_json::json!({"name": name, "error": format!("{e:#}")}),
            });
            continue;
        }
        match board {
            Ok(b) => {
                crate::outln!("{:16} {:6} {}", b.name, b.arch.as_str(), b.description)?;
                if sources {
                    let default = b.sources.get_key_value(&b.default_sources);
                    let others = b.sources.iter().filter(|(k, _)| **k != b.default_sources);
                    for (k, set) in default.into_iter().chain(others) {
                        let mark = if *k == b.default_sources {
                            " (default)"
                        } else {
                            ""
                        };
                        crate::outln!("  --sources {k}{mark}: {}", set.description)?;
                    }
                }
            }
            Err(e) => crate::outln!("{name:16} ?      (invalid: {e:#})")?,
        }
    }
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&all)?)?;
    }
    Ok(())
}

fn cache_command(dir: Option<&std::path::Path>, command: CacheCommand) -> Result<()> {
    use crate::size::approx;
    let cache = crate::cache::Cache::open(dir)?;
    match command {
        CacheCommand::List => {
            crate::outln!("cache {}", cache.root().display())?;
            let now = std::time::SystemTime::now();
            let entries = cache.entries()?;
            crate::outln!("{:<12}  {:>10}  {:>9}  WHAT", "ROOTFS", "SIZE", "USED")?;
            for e in &entries {
                let days = now
                    .duration_since(e.last_used)
                    .map_or(0, |d| d.as_secs() / 86_400);
                let what = match &e.info {
                    None => "unfinished (no facts file)".to_owned(),
                    Some(i) if i.what.is_empty() => format!(
                        "made {:.0} s by {} (before picoimg described entries)",
                        i.seconds, i.mmdebstrap_version
                    ),
                    Some(i) => i.what.clone(),
                };
                crate::outln!(
                    "{:<12}  {:>10}  {:>9}  {what}",
                    &e.key[..12.min(e.key.len())],
                    approx(e.bytes),
                    format!("{days} d ago"),
                )?;
            }
            let total: u64 = entries.iter().map(|e| e.bytes).sum();
            crate::outln!("{} root filesystem(s), {}", entries.len(), approx(total))?;
            for f in cache.folders()? {
                crate::outln!(
                    "{:<12}  {:>10}  {} file(s)",
                    f.name,
                    approx(f.bytes),
                    f.files
                )?;
            }
        }
        CacheCommand::Prune {
            older_than,
            all,
            dry_run,
        } => {
            let limit = (!all).then(|| std::time::Duration::from_secs(older_than * 86_400));
            let gone = cache.prune(limit, dry_run)?;
            let verb = if dry_run { "would remove" } else { "removed" };
            for (what, bytes) in &gone {
                crate::outln!("{verb} {what}: {}", approx(*bytes))?;
            }
            let total: u64 = gone.iter().map(|(_, b)| b).sum();
            crate::outln!("{verb} {} item(s), {}", gone.len(), approx(total))?;
        }
    }
    Ok(())
}
