//! The first-boot agent binary that goes into every image: a static musl build of the
//! `picoimg-firstboot` crate for the board's architecture.
//!
//! Looked up, in order: `--firstboot FILE`, `$PICOIMG_FIRSTBOOT`, beside the running
//! `picoimg` (`picoimg-firstboot-<triple>`, as a release archive ships it), an installed layout
//! (`../lib/picoimg/<triple>/picoimg-firstboot`), and the cargo target directory the running
//! `picoimg` was built in (`<target>/<triple>/{release,debug}/picoimg-firstboot`). When none is
//! there, `picoimg build` builds it from the source tree this `picoimg` was built from, into
//! the cache ([`find_or_build`]): `cargo build --release` of picoimg alone, or `cargo install
//! --path builder`, gives a picoimg that builds images.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::board::Arch;

/// The Rust target the agent is built for on boards of `arch`.
pub fn triple(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "x86_64-unknown-linux-musl",
        Arch::Arm64 => "aarch64-unknown-linux-musl",
    }
}

/// ELF `e_machine` of `arch`.
fn elf_machine(arch: Arch) -> u16 {
    match arch {
        Arch::Amd64 => 0x3e,
        Arch::Arm64 => 0xb7,
    }
}

/// The agent binary chosen for a build.
#[derive(Debug, Clone, Serialize)]
pub struct AgentBinary {
    pub path: PathBuf,
    pub sha256: String,
    #[serde(skip)]
    pub bytes: Vec<u8>,
}

fn candidates(arch: Arch) -> Vec<PathBuf> {
    let t = triple(arch);
    let mut out = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            out.push(dir.join(format!("picoimg-firstboot-{t}")));
            out.push(dir.join("../lib/picoimg").join(t).join("picoimg-firstboot"));
            // <target>/<profile>/picoimg, or <target>/<profile>/deps/<test binary>
            for target in dir.ancestors().skip(1).take(2) {
                for profile in ["release", "debug"] {
                    out.push(target.join(t).join(profile).join("picoimg-firstboot"));
                }
            }
        }
    }
    out
}

/// The agent named by `--firstboot` or `$PICOIMG_FIRSTBOOT` (true), or the first candidate
/// that exists (false).
fn locate(arch: Arch, explicit: Option<&Path>) -> Option<(PathBuf, bool)> {
    let env = std::env::var_os("PICOIMG_FIRSTBOOT").map(PathBuf::from);
    match explicit.map(Path::to_path_buf).or(env) {
        Some(p) => Some((p, true)),
        None => candidates(arch)
            .into_iter()
            .find(|p| p.is_file())
            .map(|p| (p, false)),
    }
}

/// Finds and checks the agent for `arch` (without building it).
pub fn find(arch: Arch, explicit: Option<&Path>) -> Result<AgentBinary> {
    match locate(arch, explicit) {
        Some((path, named)) => load(arch, path, named),
        None => bail!(
            "no picoimg-firstboot binary for {} boards yet: `picoimg build` builds it from the \
             source tree (`cargo build --release -p picoimg-firstboot --target {t}`), or pass \
             --firstboot FILE",
            arch.as_str(),
            t = triple(arch)
        ),
    }
}

/// The workspace this picoimg was built from, if it is still there (it holds firstboot/).
pub fn source_tree() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join("firstboot/Cargo.toml")
        .is_file()
        .then(|| root.canonicalize().ok())
        .flatten()
}

/// The agent for `arch`: found as [`find`] does, else built from the source tree into
/// `<cache>/agent` (cargo rebuilds only what changed, so later builds take a second).
pub fn find_or_build(
    arch: Arch,
    explicit: Option<&Path>,
    cache: &crate::cache::Cache,
) -> Result<AgentBinary> {
    if let Some((path, named)) = locate(arch, explicit) {
        return load(arch, path, named);
    }
    let t = triple(arch);
    let Some(src) = source_tree() else {
        bail!(
            "no picoimg-firstboot binary for {} boards, and no source tree to build it from: \
             pass --firstboot FILE (a static build of picoimg-firstboot for {t})",
            arch.as_str()
        );
    };
    let target_dir = cache.root().join("agent");
    let step = crate::progress::Step::start(format!(
        "first-boot agent for {} (cargo build --target {t}, cached in {})",
        arch.as_str(),
        target_dir.display()
    ));
    // In the source tree, so its .cargo/config.toml (rust-lld for the musl targets) applies.
    crate::cmd::Cmd::new("cargo")
        .dir(&src)
        .args(["build", "--release", "--locked", "-p", "picoimg-firstboot", "--target", t])
        .arg("--target-dir")
        .arg(&target_dir)
        .run_lines(|l| step.detail(l, false))
        .with_context(|| {
            format!(
                "building the first-boot agent from {} (it needs the Rust target: `rustup target add {t}`; ci/setup-host.sh adds it)",
                src.display()
            )
        })?;
    step.done();
    load(
        arch,
        target_dir.join(t).join("release/picoimg-firstboot"),
        false,
    )
}

fn load(arch: Arch, path: PathBuf, named: bool) -> Result<AgentBinary> {
    let bytes = std::fs::read(&path)
        .with_context(|| format!("reading the first-boot agent {}", path.display()))?;
    let machine = (bytes.len() > 20 && bytes.starts_with(b"\x7fELF"))
        .then(|| u16::from_le_bytes([bytes[18], bytes[19]]));
    if machine != Some(elf_machine(arch)) {
        bail!(
            "{} is not an {} ELF program (the {} agent is built with --target {}){}",
            path.display(),
            arch.as_str(),
            arch.as_str(),
            triple(arch),
            if named { "" } else { "; rebuild it" }
        );
    }
    Ok(AgentBinary {
        sha256: hex::encode(Sha256::digest(&bytes)),
        path,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_architecture_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent");
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[18] = 0x3e;
        std::fs::write(&p, &elf).unwrap();
        assert_eq!(find(Arch::Amd64, Some(&p)).unwrap().sha256.len(), 64);
        let e = format!("{:#}", find(Arch::Arm64, Some(&p)).unwrap_err());
        assert!(e.contains("is not an arm64 ELF program"), "{e}");
        assert!(e.contains("aarch64-unknown-linux-musl"), "{e}");
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        assert!(find(Arch::Amd64, Some(&p)).is_err());
    }
}
