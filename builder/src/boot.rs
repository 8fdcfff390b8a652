//! The boot partition, per loader: what files the board's firmware or bootloader needs, taken
//! from the root filesystem and the board folder, written with the FAT writer.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::board::{Board, Filesystem, Loader, PartType, Placed};
use crate::disk::{DiskIds, FatFile};
use crate::tarfs::{self, Found};

/// Everything the boot partition is made from.
pub struct BootInputs<'a> {
    pub board: &'a Board,
    /// The build's timestamp (`SOURCE_DATE_EPOCH`) for the files on FAT partitions.
    pub epoch: u64,
    pub layout: &'a [Placed],
    pub ids: &'a DiskIds,
    pub root_tar: &'a Path,
    /// The root filesystem as packages left it (before overlays): what package hooks wrote
    /// under a boot partition's mount point is taken from here.
    pub base_tar: &'a Path,
    /// Path of the kernel inside the root tarball (`boot/vmlinuz-<kver>`).
    pub kernel_path: &'a str,
    pub kver: &'a str,
    pub cmdline: &'a str,
    /// Image name (`c5-base`), for menu titles.
    pub name: &'a str,
    /// Device trees of the source set, relative to `usr/lib/linux-image-<kver>/`.
    pub dtbs: &'a [String],
    /// `boards/<board>/`: scripts and templates of the board.
    pub board_dir: PathBuf,
}

/// Writes the boot partition for the board's loader into the image.
pub fn write(raw: &Path, b: &BootInputs<'_>) -> Result<()> {
    let initrd = format!("boot/initrd.img-{}", b.kver);
    let dtb_paths: Vec<String> = b
        .dtbs
        .iter()
        .map(|d| format!("usr/lib/linux-image-{}/{d}", b.kver))
        .collect();
    let efi = "usr/lib/systemd/boot/efi/systemd-bootx64.efi";
    let mut wanted: Vec<&str> = vec![b.kernel_path, &initrd];
    wanted.extend(dtb_paths.iter().map(String::as_str));
    if b.board.boot.loader == Loader::SystemdBoot {
        wanted.push(efi);
    }
    let files = tarfs::read_paths(b.root_tar, &wanted)?;
    let get = |p: &str, what: &str| match files.get(p) {
        Some(Found::File(d)) => Ok(d.as_slice()),
        _ => bail!("/{p} is missing from the root filesystem ({what})"),
    };
    let kernel = get(b.kernel_path, "the kernel package")?;
    let initrd_data = get(&initrd, "initramfs-tools")?;
    let mut dtbs: Vec<(String, &[u8])> = Vec::new();
    for (rel, path) in b.dtbs.iter().zip(&dtb_paths) {
        let name = rel.rsplit('/').next().unwrap_or(rel).to_owned();
        dtbs.push((name, get(path, "the kernel package's device trees")?));
    }

    let k = Kernel {
        kernel,
        initrd: initrd_data,
        dtbs: &dtbs,
    };
    match b.board.boot.loader {
        Loader::SystemdBoot => systemd_boot(raw, b, &k, get(efi, "systemd-boot-efi")?),
        Loader::Extlinux => extlinux(raw, b, &k),
        Loader::RaspberryPi => raspberry_pi(raw, b, &k),
    }
}

/// What every loader boots: the kernel, the initrd and the device trees the board names.
struct Kernel<'a> {
    kernel: &'a [u8],
    initrd: &'a [u8],
    /// (file name, contents).
    dtbs: &'a [(String, &'a [u8])],
}

/// systemd-boot on the EFI system partition: its EFI binary as the removable-media path, one
/// loader entry, the kernel and initrd under /picoimg.
fn systemd_boot(raw: &Path, b: &BootInputs<'_>, k: &Kernel<'_>, efi: &[u8]) -> Result<()> {
    let loader_conf = "default picoimg.conf\ntimeout 0\nconsole-mode keep\n";
    let entry = format!(
        "title   picoimg {} (Linux {})\nlinux   /picoimg/vmlinuz\ninitrd  /picoimg/initrd.img\noptions {}\n",
        b.name, b.kver, b.cmdline
    );
    let esp = partition(b, |k, _| k == PartType::Esp)?;
    write_fat(
        raw,
        b,
        esp,
        &[
            FatFile {
                path: "EFI/BOOT/BOOTX64.EFI",
                data: efi,
            },
            FatFile {
                path: "loader/loader.conf",
                data: loader_conf.as_bytes(),
            },
            FatFile {
                path: "loader/entries/picoimg.conf",
                data: entry.as_bytes(),
            },
            FatFile {
                path: "picoimg/vmlinuz",
                data: k.kernel,
            },
            FatFile {
                path: "picoimg/initrd.img",
                data: k.initrd,
            },
        ],
    )
    .context("writing the EFI system partition")
}

/// u-boot's distro boot: extlinux/extlinux.conf, the kernel as `Image`, device trees, and the
/// board's boot.scr when it has one (the C5's u-boot reads that first).
fn extlinux(raw: &Path, b: &BootInputs<'_>, k: &Kernel<'_>) -> Result<()> {
    let boot = partition(b, |_, fs| fs == Filesystem::Vfat)?;
    let fdt = k.dtbs.first().map(|(n, _)| format!("/{n}"));
    let names = ("Image", "initrd.img");
    let extlinux = extlinux_conf(b.name, b.kver, names, b.cmdline, fdt.as_deref());
    let script = match &b.board.boot.script {
        Some(file) => Some(boot_scr(&b.board_dir.join(file), b, fdt.as_deref())?),
        None => None,
    };
    let mut out = kernel_files(names, k.kernel, k.initrd, &extlinux, k.dtbs);
    if let Some(s) = &script {
        out.push(FatFile {
            path: "boot.scr",
            data: s,
        });
    }
    write_fat(raw, b, boot, &out).context("writing the boot partition")
}

/// The Raspberry Pi firmware's boot partition: config.txt, cmdline.txt, the kernel and initrd
/// under the names config.txt gives, the firmware package's device trees and overlays; and an
/// extlinux.conf for u-boot on QEMU's virt machine (the boot test).
fn raspberry_pi(raw: &Path, b: &BootInputs<'_>, k: &Kernel<'_>) -> Result<()> {
    let boot = partition(b, |_, fs| fs == Filesystem::Vfat)?;
    let mount = &b.board.disk.partitions[boot.index].mount;
    let config = std::fs::read(b.board_dir.join("config.txt"))
        .with_context(|| config_txt_missing(b.board, &b.board_dir))?;
    let cmdline_txt = format!("{}\n", b.cmdline);
    let names = (
        b.board
            .boot
            .kernel_file
            .as_deref()
            .unwrap_or("kernel_2712.img"),
        b.board
            .boot
            .initrd_file
            .as_deref()
            .unwrap_or("initramfs_2712"),
    );
    // The firmware package's kernel hook laid out the boot files (device trees,
    // overlays/) under the mount point; take them, except what this image writes
    // itself and what only older Pis read (the Pi 5 firmware is in its EEPROM).
    let hook = tarfs::read_tree(b.base_tar, mount)?;
    let older_pi = |p: &str| {
        p == "bootcode.bin"
            || (p.starts_with("start") && p.ends_with(".elf"))
            || (p.starts_with("fixup") && p.ends_with(".dat"))
    };
    let ours = |p: &str| {
        [names.0, names.1, "config.txt", "cmdline.txt"].contains(&p)
            || p.starts_with("vmlinuz-")
            || p.starts_with("initrd.img-")
    };
    let mut from_hook: Vec<(String, Vec<u8>)> = hook
        .into_iter()
        .filter(|(p, _)| !older_pi(p) && !ours(p))
        .collect();
    let has_pi5_dtb = |files: &[(String, Vec<u8>)]| {
        files
            .iter()
            .any(|(p, _)| p.starts_with("bcm2712") && p.ends_with(".dtb"))
    };
    // Without a hook (no firmware package), the kernel package's own device trees;
    // read only then, as it is another pass over the root tarball.
    let kdir = format!("usr/lib/linux-image-{}", b.kver);
    if !has_pi5_dtb(&from_hook) {
        let broadcom = tarfs::read_tree(b.root_tar, &format!("{kdir}/broadcom"))?;
        from_hook.extend(
            broadcom
                .into_iter()
                .filter(|(n, _)| n.starts_with("bcm2712") && n.ends_with(".dtb")),
        );
    }
    if !has_pi5_dtb(&from_hook) {
        bail!(
            "no bcm2712 device tree from the firmware package's hook (/{mount}) or the \
             kernel package (/{kdir}/broadcom): the Pi 5 firmware (os_check=1) will not \
             boot without one; pick packages that provide it"
        );
    }
    if !from_hook.iter().any(|(p, _)| p.starts_with("overlays/")) {
        crate::progress::log("note: no device tree overlays/ from the firmware package");
    }
    // u-boot (QEMU's virt machine) reads extlinux.conf; the Pi firmware ignores it. Its
    // console is the PL011 of `virt`, named last so it becomes /dev/console there.
    let qemu_cmdline = format!("{} console=ttyAMA0,115200", b.cmdline);
    let extlinux = extlinux_conf(b.name, b.kver, names, &qemu_cmdline, None);
    let from_hook: Vec<(String, &[u8])> = from_hook
        .iter()
        .map(|(p, d)| (p.clone(), d.as_slice()))
        .collect();
    let mut out = kernel_files(names, k.kernel, k.initrd, &extlinux, &from_hook);
    out.push(FatFile {
        path: "config.txt",
        data: &config,
    });
    out.push(FatFile {
        path: "cmdline.txt",
        data: cmdline_txt.as_bytes(),
    });
    write_fat(raw, b, boot, &out).context("writing the boot partition")
}

/// What every u-boot style boot partition holds: the kernel and initrd under `names`,
/// extlinux/extlinux.conf, and device trees at the top.
fn kernel_files<'a>(
    names: (&'a str, &'a str),
    kernel: &'a [u8],
    initrd: &'a [u8],
    extlinux: &'a str,
    dtbs: &'a [(String, &'a [u8])],
) -> Vec<FatFile<'a>> {
    let mut out = vec![
        FatFile {
            path: names.0,
            data: kernel,
        },
        FatFile {
            path: names.1,
            data: initrd,
        },
        FatFile {
            path: "extlinux/extlinux.conf",
            data: extlinux.as_bytes(),
        },
    ];
    for (name, data) in dtbs {
        out.push(FatFile { path: name, data });
    }
    out
}

fn config_txt_missing(board: &Board, dir: &Path) -> String {
    format!(
        "board `{}` boots with the Raspberry Pi firmware, which boots only a FAT partition that \
         has config.txt, but {} is missing: add it to the board folder",
        board.name,
        dir.join("config.txt").display()
    )
}

/// Checks, before any long step, the board files the loader will need.
pub fn preflight(board: &Board, board_dir: &Path) -> Result<()> {
    if board.boot.loader == Loader::RaspberryPi && !board_dir.join("config.txt").is_file() {
        bail!("{}", config_txt_missing(board, board_dir));
    }
    if let Some(script) = &board.boot.script {
        let p = board_dir.join(script);
        if !p.is_file() {
            bail!(
                "board `{}` names boot.script = \"{script}\", but {} is missing",
                board.name,
                p.display()
            );
        }
    }
    Ok(())
}

fn partition<'a>(
    b: &'a BootInputs<'_>,
    pick: impl Fn(PartType, Filesystem) -> bool,
) -> Result<&'a Placed> {
    b.layout
        .iter()
        .find(|p| {
            let part = &b.board.disk.partitions[p.index];
            pick(part.kind, part.fs)
        })
        .context("the board has no partition for its loader")
}

/// What a user finds in `picoimg/` on the boot partition of a fresh image.
pub const PICOIMG_README: &str =
    "picoimg: put the cluster file here as cluster.toml (and, to name this node,\r\n\
node.toml with `name = \"NODE\"`), or let `picoimg flash --cluster FILE --node NODE` do it.\r\n\
At first boot the node reports its progress in status.txt (secrets redacted);\r\n\
a node that is not in the cluster file writes what it saw to unknown-node.txt.\r\n";

fn write_fat(raw: &Path, b: &BootInputs<'_>, placed: &Placed, files: &[FatFile<'_>]) -> Result<()> {
    let part = &b.board.disk.partitions[placed.index];
    let mut all: Vec<FatFile<'_>> = vec![FatFile {
        path: "picoimg/README.txt",
        data: PICOIMG_README.as_bytes(),
    }];
    all.extend(files.iter().map(|f| FatFile {
        path: f.path,
        data: f.data,
    }));
    crate::disk::write_fat(raw, placed, &part.label, b.ids.fat_volume_id, b.epoch, &all)
}

/// A u-boot distro-boot menu with one entry; `files` are the kernel and initrd names at the
/// top of the boot partition.
pub fn extlinux_conf(
    name: &str,
    kver: &str,
    files: (&str, &str),
    cmdline: &str,
    fdt: Option<&str>,
) -> String {
    let (kernel, initrd) = (format!("/{}", files.0), format!("/{}", files.1));
    let mut s = format!(
        "# picoimg {name}: u-boot distro boot\ndefault picoimg\ntimeout 1\n\nlabel picoimg\n  menu label picoimg {name} (Linux {kver})\n  kernel {kernel}\n  initrd {initrd}\n"
    );
    if let Some(f) = fdt {
        s.push_str(&format!("  fdt {f}\n"));
    }
    s.push_str(&format!("  append {cmdline}\n"));
    s
}

/// Fills the board's `boot.cmd` and wraps it as a u-boot script image.
fn boot_scr(path: &Path, b: &BootInputs<'_>, fdt: Option<&str>) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading boot script {} (boot.script in the board file)",
            path.display()
        )
    })?;
    let filled = text
        .replace("@CMDLINE@", b.cmdline)
        .replace("@KERNEL@", "Image")
        .replace("@INITRD@", "initrd.img")
        .replace(
            "@DTB@",
            fdt.map(|f| f.trim_start_matches('/')).unwrap_or(""),
        );
    Ok(crate::uimage::script(
        "picoimg boot script",
        filled.as_bytes(),
        0,
    ))
}
