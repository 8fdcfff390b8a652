//! `picoimg doctor`: which host tools are there, and the exact line that installs the rest.

use std::path::Path;

use anyhow::{bail, Result};

use crate::board::Arch;
use crate::cmd::{find_program, Cmd};

/// A host requirement.
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
    pub needed_for: &'static str,
}

pub const TOOLS: &[Tool] = &[
    Tool {
        program: "mmdebstrap",
        package: "mmdebstrap",
        needed_for: "build: root filesystem",
    },
    Tool {
        program: "mke2fs",
        package: "e2fsprogs",
        needed_for: "build: ext4 root (1.47.1+ with libarchive13)",
    },
    Tool {
        program: "curl",
        package: "curl",
        needed_for: "build: bootloader downloads, source checks",
    },
    Tool {
        program: "qemu-system-x86_64",
        package: "qemu-system-x86",
        needed_for: "run: x86-64 boards",
    },
    Tool {
        program: "qemu-system-aarch64",
        package: "qemu-system-arm",
        needed_for: "run: arm64 boards",
    },
    Tool {
        program: "qemu-img",
        package: "qemu-utils",
        needed_for: "run: disk overlays",
    },
    Tool {
        program: "vde_switch",
        package: "vde2",
        needed_for: "run --cluster: the rehearsal's private switch",
    },
    Tool {
        program: "ssh",
        package: "openssh-client",
        needed_for: "tests: commands inside cluster VMs",
    },
    Tool {
        program: "sfdisk",
        package: "fdisk",
        needed_for: "tests: partition table check",
    },
    Tool {
        program: "fsck.vfat",
        package: "dosfstools",
        needed_for: "tests: FAT check",
    },
    Tool {
        program: "mdir",
        package: "mtools",
        needed_for: "tests: FAT contents",
    },
    Tool {
        program: "dumpimage",
        package: "u-boot-tools",
        needed_for: "tests: boot.scr check",
    },
    Tool {
        program: "bmaptool",
        package: "bmap-tools",
        needed_for: "tests, flashing: bmap copy",
    },
];

/// Firmware files `picoimg run` needs, with their packages.
pub const FIRMWARE: &[(&str, &str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "ovmf",
        "run: x86-64 UEFI",
    ),
    (
        "/usr/lib/u-boot/qemu_arm64/u-boot.bin",
        "u-boot-qemu",
        "run: arm64 boards (u-boot)",
    ),
];

/// How to install the package that provides `program`.
pub fn install_hint(program: &str) -> String {
    let base = program.rsplit('/').next().unwrap_or(program);
    match TOOLS.iter().find(|t| t.program == base) {
        Some(t) => format!(
            "install it with `sudo apt-get install {}` (or run ci/setup-host.sh)",
            t.package
        ),
        None => "install it, or run ci/setup-host.sh".to_owned(),
    }
}

/// Whether mke2fs can populate a filesystem from a tarball (e2fsprogs 1.47.1 + libarchive).
pub fn mke2fs_reads_tar() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tar_path = dir.path().join("t.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&tar_path)?);
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, "./probe", &b"ok"[..])?;
        b.finish()?;
    }
    let img = dir.path().join("probe.img");
    let mke2fs = find_program("mke2fs").unwrap_or_else(|| "mke2fs".into());
    Cmd::new(mke2fs)
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&tar_path)
        .arg(&img)
        .arg("8M")
        .run()
        .map_err(|e| {
            anyhow::anyhow!(
                "mke2fs cannot read a tarball with -d ({e:#})\nhint: needs e2fsprogs 1.47.1 or newer \
                 and libarchive13: `sudo apt-get install e2fsprogs libarchive13` (bookworm: \
                 `-t bookworm-backports e2fsprogs`), or run ci/setup-host.sh"
            )
        })?;
    Ok(())
}

/// Checks what `build` needs before any work starts.
pub fn preflight_build(arch: Arch) -> Result<()> {
    for p in ["mmdebstrap", "mke2fs"] {
        if find_program(p).is_none() {
            bail!("`{p}` not found: {}", install_hint(p));
        }
    }
    foreign_arch_runs(Path::new(BINFMT), arch)?;
    mke2fs_reads_tar()
}

const BINFMT: &str = "/proc/sys/fs/binfmt_misc";

/// The binfmt_misc entry name that runs `arch` binaries, when it is not the host's own.
fn binfmt_name(arch: Arch) -> Option<&'static str> {
    let host = std::env::consts::ARCH;
    match arch {
        Arch::Amd64 if host != "x86_64" => Some("qemu-x86_64"),
        Arch::Arm64 if host != "aarch64" => Some("qemu-aarch64"),
        _ => None,
    }
}

/// A foreign-architecture root filesystem needs qemu-user registered with binfmt_misc.
pub fn foreign_arch_runs(binfmt: &Path, arch: Arch) -> Result<()> {
    let Some(name) = binfmt_name(arch) else {
        return Ok(());
    };
    let entry = binfmt.join(name);
    let enabled = std::fs::read_to_string(&entry)
        .map(|s| s.lines().next() == Some("enabled"))
        .unwrap_or(false);
    if !enabled {
        bail!(
            "building an {} image on this {} host needs qemu-user registered with binfmt_misc, \
             and {} is missing or disabled: run ci/setup-host.sh (it installs qemu-user-static, \
             mounts binfmt_misc and registers {name})",
            arch.as_str(),
            std::env::consts::ARCH,
            entry.display()
        );
    }
    Ok(())
}

/// Prints every check; fails if anything is missing.
pub fn run() -> Result<()> {
    let mut missing: Vec<&str> = Vec::new();
    for t in TOOLS {
        let found = find_program(t.program);
        crate::outln!(
            "{:4} {:20} {:18} {}",
            if found.is_some() { "ok" } else { "MISS" },
            t.program,
            t.package,
            t.needed_for
        )?;
        if found.is_none() && !missing.contains(&t.package) {
            missing.push(t.package);
        }
    }
    for (path, pkg, why) in FIRMWARE {
        let ok = std::path::Path::new(path).exists();
        let name = path.rsplit('/').next().unwrap_or(path);
        let mark = if ok { "ok" } else { "MISS" };
        crate::outln!("{mark:4} {name:20} {pkg:18} {why} ({path})")?;
        if !ok {
            missing.push(pkg);
        }
    }
    if find_program("mke2fs").is_some() {
        match mke2fs_reads_tar() {
            Ok(()) => crate::outln!(
                "ok   mke2fs -d TARBALL    e2fsprogs          build: ext4 root from a tarball"
            )?,
            Err(_) => {
                crate::outln!("MISS mke2fs -d TARBALL    e2fsprogs          needs e2fsprogs >= 1.47.1 and libarchive13")?;
                missing.push("libarchive13");
            }
        }
    }
    let binfmt = std::path::Path::new("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists();
    crate::outln!(
        "{:4} {:20} {:18} build: arm64 boards on x86-64 (ci/setup-host.sh registers it)",
        if binfmt { "ok" } else { "info" },
        "binfmt qemu-aarch64",
        "qemu-user-static"
    )?;
    if missing.is_empty() {
        crate::outln!("\nall host tools are present")?;
        Ok(())
    } else {
        crate::outln!(
            "\nto install what is missing:\n  sudo apt-get install -y {}",
            missing.join(" ")
        )?;
        crate::outln!("or set up everything (also binfmt and backports): sudo ci/setup-host.sh")?;
        bail!("missing: {}", missing.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binfmt_names_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let foreign = if std::env::consts::ARCH == "aarch64" {
            Arch::Amd64
        } else {
            Arch::Arm64
        };
        let e = format!("{:#}", foreign_arch_runs(dir.path(), foreign).unwrap_err());
        assert!(
            e.contains("binfmt_misc") && e.contains("ci/setup-host.sh"),
            "{e}"
        );
        let name = binfmt_name(foreign).unwrap();
        std::fs::write(
            dir.path().join(name),
            "enabled\ninterpreter /usr/libexec/qemu-binfmt/x\n",
        )
        .unwrap();
        foreign_arch_runs(dir.path(), foreign).unwrap();
        std::fs::write(dir.path().join(name), "disabled\n").unwrap();
        assert!(foreign_arch_runs(dir.path(), foreign).is_err());
    }
}
