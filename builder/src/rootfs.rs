//! The root filesystem stage: mmdebstrap into a tarball, cached by the plan's rootfs key.
//!
//! A tarball keeps ownership and modes without needing root to read it back, and `mke2fs -d`
//! takes it directly, so no later step needs privileges or a mount. mmdebstrap's own mode
//! selection is used: `root` when run as root, `unshare` otherwise.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::cache::Cache;
use crate::cmd::Cmd;
use crate::plan::{BuildPlan, LayerSpec, RootfsSpec};
use crate::progress::Step;

/// Facts about how a cached root filesystem was made (stored beside it, copied to manifests).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootfsInfo {
    pub key: String,
    pub seconds: f64,
    /// How many times an initramfs was generated for this root, its base's included (one per
    /// kernel, unless a layer's package asks for a new one).
    pub initramfs_generations: u32,
    pub mmdebstrap_version: String,
    /// What it is, for `picoimg cache list`.
    #[serde(default)]
    pub what: String,
    /// For a stack's layer: the base root it was installed over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<Box<RootfsInfo>>,
}

/// Divert update-initramfs while packages install, so kernel, firmware and microcode packages
/// do not each regenerate it (slow under emulation); it runs once in the customize hook.
const DIVERT_INITRAMFS: &str = r#"chroot "$1" dpkg-divert --quiet --local --rename --divert /usr/sbin/update-initramfs.picoimg --add /usr/sbin/update-initramfs && printf '#!/bin/sh\n# picoimg: initramfs is generated once, at the end of the build\nexit 0\n' > "$1/usr/sbin/update-initramfs" && chmod 755 "$1/usr/sbin/update-initramfs""#;

const RESTORE_INITRAMFS: &str = r#"rm -f "$1/usr/sbin/update-initramfs" && chroot "$1" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs && if [ -x "$1/usr/sbin/update-initramfs" ] && ls "$1"/boot/vmlinu[xz]-* >/dev/null 2>&1; then chroot "$1" update-initramfs -c -k all; fi"#;

/// A layer's packages install with update-initramfs diverted to a stub that only notes the
/// request; the initramfs is made again at the end only if a package asked for it.
const DIVERT_INITRAMFS_LAYER: &str = r#"chroot "$1" dpkg-divert --quiet --local --rename --divert /usr/sbin/update-initramfs.picoimg --add /usr/sbin/update-initramfs && printf '#!/bin/sh\n# picoimg: noted; the initramfs is made again once, at the end of the layer\n: > /var/lib/picoimg-initramfs-wanted\nexit 0\n' > "$1/usr/sbin/update-initramfs" && chmod 755 "$1/usr/sbin/update-initramfs""#;

const RESTORE_INITRAMFS_LAYER: &str = r#"rm -f "$1/usr/sbin/update-initramfs" && chroot "$1" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs && if [ -e "$1/var/lib/picoimg-initramfs-wanted" ]; then rm -f "$1/var/lib/picoimg-initramfs-wanted"; chroot "$1" update-initramfs -u -k all; fi"#;

/// Whether the root filesystem of `plan` (its layer, or its base) is in the cache already.
pub fn is_cached(plan: &BuildPlan, cache: &Cache) -> bool {
    let tar = cache.rootfs(&plan.layer_key().unwrap_or_else(|| plan.rootfs_key()));
    tar.is_file() && tar.with_extension("json").is_file()
}

/// Checks that every source with an explicit URI answers for the suite, so an unreachable
/// vendor archive fails at once, by name, with `hint` (how to substitute), instead of deep in
/// mmdebstrap.
/// `hint(name)`: what to do instead when apt source `name` cannot be reached.
pub fn check_sources_reachable(plan: &BuildPlan, hint: &dyn Fn(&str) -> String) -> Result<()> {
    let spec = &plan.rootfs;
    for s in plan.all_sources() {
        let Some(uri) = &s.uri else { continue };
        if !(uri.starts_with("http://") || uri.starts_with("https://")) {
            continue;
        }
        let release = format!(
            "{}/dists/{}/InRelease",
            uri.trim_end_matches('/'),
            spec.suite
        );
        let probe = Cmd::new("curl")
            .args(["--fail", "--silent", "--show-error", "--location", "--head"])
            .args(["--max-time", "20", "--output", "/dev/null"])
            .arg(&release)
            .run();
        if let Err(e) = probe {
            anyhow::bail!(
                "apt source `{}` ({uri}) cannot be reached from this machine: {}\n{}",
                s.name,
                format!("{e:#}")
                    .lines()
                    .last()
                    .unwrap_or("")
                    .trim_start_matches("  | "),
                hint(&s.name)
            );
        }
    }
    Ok(())
}

/// Returns the cached tarball of `plan`'s root filesystem: its base root, with the
/// layer (the board's non-kernel packages and the stack's) installed over it when there is
/// one; each is built first if it is not cached.
pub fn ensure(plan: &BuildPlan, cache: &Cache, refresh: bool) -> Result<(PathBuf, RootfsInfo)> {
    let spec = &plan.rootfs;
    let (base_tar, base_info) = ensure_spec(spec, cache, refresh)?;
    let (Some(layer), Some(key)) = (&plan.layer, plan.layer_key()) else {
        return Ok((base_tar, base_info));
    };
    stage(cache, &key, "layer", refresh, |tmp| {
        let cmd = layer_cmd(spec, layer, &base_tar, &cache.apt_dir(spec.arch)?, tmp);
        let (mut info, initramfs) = run_mmdebstrap(
            cmd,
            format!(
                "layer: {} package(s) over the cached base ({})",
                layer.packages.len(),
                spec.arch.as_str()
            ),
        )?;
        info.initramfs_generations = base_info.initramfs_generations + initramfs;
        info.what = format!(
            "layer {} over {}: {}",
            spec.arch.as_str(),
            &base_info.key[..12.min(base_info.key.len())],
            layer.packages.join(" ")
        );
        info.base = Some(Box::new(base_info.clone()));
        Ok((info, initramfs))
    })
}

/// Returns the cached tarball of one mmdebstrap run for `spec`, building it first if needed.
pub fn ensure_spec(
    spec: &RootfsSpec,
    cache: &Cache,
    refresh: bool,
) -> Result<(PathBuf, RootfsInfo)> {
    let key = crate::plan::json_key(spec);
    stage(cache, &key, "root filesystem", refresh, |tmp| {
        let cmd = mmdebstrap_cmd(spec, &cache.apt_dir(spec.arch)?, tmp);
        let (mut info, n) = run_mmdebstrap(
            cmd,
            format!(
                "root filesystem: mmdebstrap {} {}",
                spec.suite,
                spec.arch.as_str()
            ),
        )?;
        info.what = format!(
            "base {} {} {}, {} packages asked",
            spec.distro,
            spec.suite,
            spec.arch.as_str(),
            spec.packages.len()
        );
        Ok((info, n))
    })
}

/// One cached stage: `<cache>/rootfs/<key>.tar` and its facts beside it, made by `make` into a
/// temporary file that is renamed into place only when complete (an error or Ctrl-C leaves
/// nothing behind), under the key's lock.
fn stage(
    cache: &Cache,
    key: &str,
    what: &str,
    refresh: bool,
    make: impl FnOnce(&Path) -> Result<(RootfsInfo, u32)>,
) -> Result<(PathBuf, RootfsInfo)> {
    let tar = cache.rootfs(key);
    let info_path = tar.with_extension("json");
    let _lock = cache.lock(key)?;
    if !refresh && tar.is_file() {
        if let Some(info) = std::fs::read(&info_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<RootfsInfo>(&b).ok())
        {
            crate::progress::log(format!("{what}: cached ({})", tar.display()));
            cache.touch(key);
            return Ok((tar, info));
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix(".building-")
        .suffix(".tar")
        .tempfile_in(tar.parent().expect("cache dir"))
        .context("creating temporary root filesystem file")?;
    let (mut info, _) = make(tmp.path())?;
    info.key = key.to_owned();
    tmp.persist(&tar)
        .with_context(|| format!("storing the {what} in {}", tar.display()))?;
    let json = serde_json::to_vec_pretty(&info)?;
    crate::output::write_atomic(&info_path, &json)?;
    Ok((tar, info))
}

/// Runs one mmdebstrap command with progress; returns its facts and how many initramfs
/// images it generated.
fn run_mmdebstrap(cmd: Cmd, title: String) -> Result<(RootfsInfo, u32)> {
    let started = std::time::Instant::now();
    let step = Step::start(title);
    let mut initramfs = 0;
    cmd.run_lines(|line| {
        if line.contains("update-initramfs: Generating") {
            initramfs += 1;
        }
        let important =
            line.starts_with("I: ") || line.starts_with("W: ") || line.starts_with("E: ");
        step.detail(line, important);
    })
    .context("building the root filesystem with mmdebstrap")?;
    step.done();
    let version = Cmd::new("mmdebstrap")
        .arg("--version")
        .read()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let info = RootfsInfo {
        key: String::new(),
        seconds: started.elapsed().as_secs_f64(),
        initramfs_generations: initramfs,
        mmdebstrap_version: version,
        what: String::new(),
        base: None,
    };
    Ok((info, initramfs))
}

/// What every mmdebstrap run of picoimg's shares: architecture, apt and dpkg options.
fn mmdebstrap_common(variant: &str, spec: &RootfsSpec) -> Cmd {
    Cmd::new("mmdebstrap")
        .arg(format!("--variant={variant}"))
        .arg(format!("--architectures={}", spec.arch.as_str()))
        .arg("--aptopt=Acquire::Retries \"3\"")
        // Documentation stays out of small-board images; copyright files stay in.
        .arg("--dpkgopt=path-exclude=/usr/share/man/*")
        .arg("--dpkgopt=path-exclude=/usr/share/doc/*")
        .arg("--dpkgopt=path-include=/usr/share/doc/*/copyright")
        .arg("--dpkgopt=path-exclude=/usr/share/info/*")
}

/// The package cache: copied in before apt runs, new downloads copied back out.
fn apt_cache_hooks(cmd: Cmd, apt_cache: &Path) -> Cmd {
    cmd.arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
        .arg(format!(
            "--setup-hook=sync-in {} /var/cache/apt/archives/",
            apt_cache.display()
        ))
        .arg(format!(
            "--customize-hook=sync-out /var/cache/apt/archives {}",
            apt_cache.display()
        ))
        .arg(KEEP_ARCHIVES_ROOTS)
}

/// sync-in copies the cache folder's owner onto the archives folder: a normal user's in
/// unshare mode. It is root's in the image.
const KEEP_ARCHIVES_ROOTS: &str = "--customize-hook=chown 0:0 \"$1\"/var/cache/apt/archives && if [ -e \"$1\"/var/cache/apt/archives/lock ]; then chown 0:0 \"$1\"/var/cache/apt/archives/lock; fi";

/// The distribution's suite and mirror arguments (the same for a base and its layers).
fn suite_and_mirror(mut cmd: Cmd, spec: &RootfsSpec, target: &Path) -> Cmd {
    let main = spec.sources.first();
    if let Some(m) = main {
        cmd = cmd.arg(format!("--components={}", m.components.join(",")));
    }
    cmd = cmd.arg(&spec.suite).arg(target);
    if let Some(m) = main {
        if let Some(uri) = &m.uri {
            for suite in [spec.suite.clone(), format!("{}-updates", spec.suite)] {
                cmd = cmd.arg(format!(
                    "deb [signed-by={}] {uri} {suite} {}",
                    m.keyring.display(),
                    m.components.join(" ")
                ));
            }
        }
    }
    cmd
}

/// A stack's layer: mmdebstrap's documented way to refine a chroot tarball (variant custom,
/// the base unpacked by a setup hook), the layer's sources added by hooks before mmdebstrap's
/// `apt-get update`, then the layer's packages installed with apt outside and dpkg inside the
/// root, the way mmdebstrap installs its own.
pub fn layer_cmd(
    spec: &RootfsSpec,
    layer: &LayerSpec,
    base_tar: &Path,
    apt_cache: &Path,
    target: &Path,
) -> Cmd {
    let mut cmd = mmdebstrap_common("custom", spec)
        // Device nodes are mmdebstrap's to make (unshare mode cannot mknod).
        .arg("--skip=tar-in/mknod")
        .arg(format!("--setup-hook=tar-in {} /", base_tar.display()))
        .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
        .arg(format!(
            "--setup-hook=sync-in {} /var/cache/apt/archives/",
            apt_cache.display()
        ));
    for s in &layer.sources {
        // A keyring a base package installed stays the package's file.
        let keyring = s.keyring.display().to_string();
        cmd = cmd
            .arg(format!(
                "--setup-hook=mkdir -p \"$1\"$(dirname {keyring}) && {{ [ -e \"$1\"{keyring} ] || [ -L \"$1\"{keyring} ] || cp {keyring} \"$1\"{keyring}; }}"
            ))
            .arg(format!("--setup-hook={}", extra_source_script(spec, s)));
    }
    let install = format!(
        "APT_CONFIG=\"$MMDEBSTRAP_APT_CONFIG\" apt-get --yes -o Dir::Bin::dpkg=env -o DPkg::Options::=--unset=TMPDIR -o DPkg::Options::=dpkg install {}",
        layer.packages.join(" ")
    );
    cmd = cmd
        .arg(format!("--essential-hook={DIVERT_INITRAMFS_LAYER}"))
        .arg(format!("--customize-hook={install}"))
        .arg(format!("--customize-hook={RESTORE_INITRAMFS_LAYER}"))
        .arg(format!(
            "--customize-hook=sync-out /var/cache/apt/archives {}",
            apt_cache.display()
        ))
        .arg(KEEP_ARCHIVES_ROOTS);
    suite_and_mirror(cmd, spec, target)
}

/// The mmdebstrap command line for a spec.
pub fn mmdebstrap_cmd(spec: &RootfsSpec, apt_cache: &Path, target: &Path) -> Cmd {
    let mut cmd = mmdebstrap_common(&spec.variant, spec)
        .arg(format!("--include={}", spec.packages.join(",")))
        .arg(format!("--essential-hook={DIVERT_INITRAMFS}"))
        .arg(format!("--customize-hook={RESTORE_INITRAMFS}"));
    cmd = apt_cache_hooks(cmd, apt_cache);
    // The first source is the distribution: mmdebstrap's default mirror (with -updates and
    // -security) unless it has an explicit URI, which then replaces that default. Every other
    // source is written into the root by a hook, keyring included at the same path (apt reads
    // signed-by on the build host now, and inside the image later).
    for s in spec.sources.iter().skip(1) {
        cmd = extra_source_hooks(cmd, spec, s);
    }
    suite_and_mirror(cmd, spec, target)
}

/// Hooks adding one more apt source to the root: its keyring, its list file and, for another
/// suite of the distribution's archive, a low pin so only packages missing from the
/// distribution's own suite come from it.
fn extra_source_hooks(cmd: Cmd, spec: &RootfsSpec, s: &crate::plan::SourceSpec) -> Cmd {
    let keyring = s.keyring.display().to_string();
    let keydir = s
        .keyring
        .parent()
        .map_or("/".into(), |d| d.display().to_string());
    cmd.arg(format!("--setup-hook=mkdir -p \"$1\"{keydir}"))
        .arg(format!("--setup-hook=copy-in {keyring} {keydir}/"))
        .arg(format!("--setup-hook={}", extra_source_script(spec, s)))
}

/// The shell hook (`$1` = the root) that writes one extra source's list and pin.
fn extra_source_script(spec: &RootfsSpec, s: &crate::plan::SourceSpec) -> String {
    let keyring = s.keyring.display().to_string();
    let suite = s.suite.clone().unwrap_or_else(|| spec.suite.clone());
    let uri = match &s.uri {
        Some(u) => format!("uri='{u}'"),
        // Another suite of the distribution's own mirror: the one mmdebstrap chose.
        None => "uri=$(sed -n 's/^deb \\(\\[[^]]*\\] \\)\\{0,1\\}\\([^ ]*\\) .*/\\2/p' \"$1\"/etc/apt/sources.list | head -n 1); \
                 [ -n \"$uri\" ] || { echo 'no mirror in sources.list to add the suite to' >&2; exit 1; }"
            .to_owned(),
    };
    let list = format!("\"$1\"/etc/apt/sources.list.d/picoimg-{}.list", s.name);
    let mut script = format!(
        "set -e; {uri}; printf 'deb [signed-by={keyring}] %s {suite} {}\\n' \"$uri\" > {list}",
        s.components.join(" ")
    );
    if s.suite.as_ref().is_some_and(|x| *x != spec.suite) {
        script.push_str(&format!(
            "; printf 'Package: *\\nPin: release n={suite}\\nPin-Priority: 100\\n' > \"$1\"/etc/apt/preferences.d/picoimg-{}",
            s.name
        ));
    }
    script
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::board::Arch;
    use crate::plan::SourceSpec;

    fn spec(uri: Option<&str>) -> RootfsSpec {
        RootfsSpec {
            recipe: 1,
            arch: Arch::Amd64,
            distro: "debian".into(),
            suite: "trixie".into(),
            variant: "apt".into(),
            source_date_epoch: None,
            sources: vec![SourceSpec {
                name: "debian".into(),
                uri: uri.map(Into::into),
                suite: None,
                components: vec!["main".into(), "non-free-firmware".into()],
                keyring: "/k.gpg".into(),
                keyring_sha256: Some(String::new()),
            }],
            packages: vec!["linux-image-amd64".into(), "systemd-sysv".into()],
        }
    }

    #[test]
    fn default_mirror_is_left_to_mmdebstrap() {
        let c = mmdebstrap_cmd(&spec(None), Path::new("/c"), Path::new("/t.tar")).display();
        assert!(c.contains("--components=main,non-free-firmware"), "{c}");
        assert!(c.ends_with("trixie /t.tar"), "{c}");
        assert!(
            c.contains("--include=linux-image-amd64,systemd-sysv"),
            "{c}"
        );
    }

    #[test]
    fn explicit_mirror_gets_suite_and_updates() {
        let c = mmdebstrap_cmd(
            &spec(Some("http://127.0.0.1:3142/debian")),
            Path::new("/c"),
            Path::new("/t.tar"),
        )
        .display();
        assert!(c.contains("'deb [signed-by=/k.gpg] http://127.0.0.1:3142/debian trixie main non-free-firmware'"), "{c}");
        assert!(c.contains("trixie-updates"), "{c}");
    }

    /// A layer: the base unpacked first, the layer's source added (its keyring only where the
    /// base has none), packages installed by apt from outside, the initramfs made again only
    /// if asked, and the new downloads kept after the install.
    #[test]
    fn a_layer_refines_the_base_tarball() {
        let s = spec(None);
        let layer = LayerSpec {
            recipe: 1,
            sources: vec![SourceSpec {
                name: "debian-bullseye".into(),
                uri: None,
                suite: Some("bullseye".into()),
                components: vec!["main".into()],
                keyring: "/usr/share/keyrings/k.gpg".into(),
                keyring_sha256: Some(String::new()),
            }],
            packages: vec!["consul".into(), "docker.io".into()],
        };
        let cmd = layer_cmd(
            &s,
            &layer,
            Path::new("/b.tar"),
            Path::new("/c"),
            Path::new("/t.tar"),
        );
        let args: Vec<String> = cmd.display().split(" '--").map(str::to_owned).collect();
        let c = cmd.display();
        assert!(c.starts_with("mmdebstrap --variant=custom "), "{c}");
        let pos = |needle: &str| {
            args.iter()
                .position(|a| a.contains(needle))
                .unwrap_or_else(|| panic!("{needle} in {c}"))
        };
        assert!(pos("tar-in /b.tar /") < pos("sync-in /c"));
        assert!(pos("/usr/share/keyrings/k.gpg ] || cp") < pos("Pin: release n=bullseye"));
        assert!(pos("install consul docker.io") < pos("sync-out /var/cache/apt/archives /c"));
        assert!(pos("install consul docker.io") < pos("picoimg-initramfs-wanted\" ]; then"));
        assert!(!c.contains("--include"), "{c}");
        assert!(c.ends_with("trixie /t.tar"), "{c}");
    }

    /// Consul's substitute: bullseye of the mirror mmdebstrap picked, pinned below trixie.
    #[test]
    fn another_suite_of_the_default_mirror_comes_through_a_hook() {
        let mut s = spec(None);
        s.sources.push(SourceSpec {
            name: "debian-bullseye".into(),
            uri: None,
            suite: Some("bullseye".into()),
            components: vec!["main".into()],
            keyring: "/usr/share/keyrings/k.gpg".into(),
            keyring_sha256: Some(String::new()),
        });
        let cmd = mmdebstrap_cmd(&s, Path::new("/c"), Path::new("/t.tar"));
        let c = cmd.display();
        assert!(
            c.contains("copy-in /usr/share/keyrings/k.gpg /usr/share/keyrings/"),
            "{c}"
        );
        assert!(c.contains("Pin: release n=bullseye"), "{c}");
        assert!(c.ends_with("trixie /t.tar"), "{c}");
        // The hook is valid shell that writes the list from the chosen mirror.
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("etc/apt/sources.list.d")).unwrap();
        std::fs::create_dir_all(r.join("etc/apt/preferences.d")).unwrap();
        std::fs::write(
            r.join("etc/apt/sources.list"),
            "deb http://mirror.example/debian trixie main\n",
        )
        .unwrap();
        crate::cmd::Cmd::new("sh")
            .args(["-c", &extra_source_script(&s, &s.sources[1]), "hook"])
            .arg(r)
            .run()
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(r.join("etc/apt/sources.list.d/picoimg-debian-bullseye.list")).unwrap(),
            "deb [signed-by=/usr/share/keyrings/k.gpg] http://mirror.example/debian bullseye main\n"
        );
        assert!(
            std::fs::read_to_string(r.join("etc/apt/preferences.d/picoimg-debian-bullseye"))
                .unwrap()
                .contains("Pin-Priority: 100")
        );
    }
}
