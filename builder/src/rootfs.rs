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
use crate::plan::RootfsSpec;
use crate::progress::Step;

/// Facts about how a cached root filesystem was made (stored beside it, copied to manifests).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootfsInfo {
    pub key: String,
    pub seconds: f64,
    /// How many times an initramfs was generated (should be one per kernel).
    pub initramfs_generations: u32,
    pub mmdebstrap_version: String,
}

/// Divert update-initramfs while packages install, so kernel, firmware and microcode packages
/// do not each regenerate it (slow under emulation); it runs once in the customize hook.
const DIVERT_INITRAMFS: &str = r#"chroot "$1" dpkg-divert --quiet --local --rename --divert /usr/sbin/update-initramfs.picoimg --add /usr/sbin/update-initramfs && printf '#!/bin/sh\n# picoimg: initramfs is generated once, at the end of the build\nexit 0\n' > "$1/usr/sbin/update-initramfs" && chmod 755 "$1/usr/sbin/update-initramfs""#;

const RESTORE_INITRAMFS: &str = r#"rm -f "$1/usr/sbin/update-initramfs" && chroot "$1" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs && if [ -x "$1/usr/sbin/update-initramfs" ] && ls "$1"/boot/vmlinu[xz]-* >/dev/null 2>&1; then chroot "$1" update-initramfs -c -k all; fi"#;

/// Whether the root filesystem for `spec` is in the cache already.
pub fn is_cached(spec: &RootfsSpec, cache: &Cache) -> bool {
    let tar = cache.rootfs(&crate::plan::json_key(spec));
    tar.is_file() && tar.with_extension("json").is_file()
}

/// Checks that every source with an explicit URI answers for the suite, so an unreachable
/// vendor archive fails at once, by name, with `hint` (how to substitute), instead of deep in
/// mmdebstrap.
/// `hint(name)`: what to do instead when apt source `name` cannot be reached.
pub fn check_sources_reachable(spec: &RootfsSpec, hint: &dyn Fn(&str) -> String) -> Result<()> {
    for s in &spec.sources {
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

/// Returns the cached tarball for `spec`, building it first if needed.
pub fn ensure(spec: &RootfsSpec, cache: &Cache, refresh: bool) -> Result<(PathBuf, RootfsInfo)> {
    let key = crate::plan::json_key(spec);
    let tar = cache.rootfs(&key);
    let info_path = tar.with_extension("json");
    let _lock = cache.lock(&key)?;
    if !refresh && tar.is_file() {
        if let Some(info) = std::fs::read(&info_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<RootfsInfo>(&b).ok())
        {
            crate::progress::log(format!("root filesystem: cached ({})", tar.display()));
            return Ok((tar, info));
        }
    }
    let info = build(spec, cache, &key, &tar)?;
    let json = serde_json::to_vec_pretty(&info)?;
    crate::output::write_atomic(&info_path, &json)?;
    Ok((tar, info))
}

fn build(spec: &RootfsSpec, cache: &Cache, key: &str, tar: &Path) -> Result<RootfsInfo> {
    let started = std::time::Instant::now();
    let apt = cache.apt_dir(spec.arch)?;
    let tmp = tempfile::Builder::new()
        .prefix(".building-")
        .suffix(".tar")
        .tempfile_in(tar.parent().expect("cache dir"))
        .context("creating temporary root filesystem file")?;
    let cmd = mmdebstrap_cmd(spec, &apt, tmp.path());
    let step = Step::start(format!(
        "root filesystem: mmdebstrap {} {}",
        spec.suite,
        spec.arch.as_str()
    ));
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
    tmp.persist(tar)
        .with_context(|| format!("storing root filesystem in {}", tar.display()))?;
    let version = Cmd::new("mmdebstrap")
        .arg("--version")
        .read()
        .unwrap_or_default()
        .trim()
        .to_owned();
    Ok(RootfsInfo {
        key: key.to_owned(),
        seconds: started.elapsed().as_secs_f64(),
        initramfs_generations: initramfs,
        mmdebstrap_version: version,
    })
}

/// The mmdebstrap command line for a spec.
pub fn mmdebstrap_cmd(spec: &RootfsSpec, apt_cache: &Path, target: &Path) -> Cmd {
    let mut cmd = Cmd::new("mmdebstrap")
        .arg(format!("--variant={}", spec.variant))
        .arg(format!("--architectures={}", spec.arch.as_str()))
        .arg("--aptopt=Acquire::Retries \"3\"")
        // Documentation stays out of small-board images; copyright files stay in.
        .arg("--dpkgopt=path-exclude=/usr/share/man/*")
        .arg("--dpkgopt=path-exclude=/usr/share/doc/*")
        .arg("--dpkgopt=path-include=/usr/share/doc/*/copyright")
        .arg("--dpkgopt=path-exclude=/usr/share/info/*")
        .arg(format!("--include={}", spec.packages.join(",")))
        .arg(format!("--essential-hook={DIVERT_INITRAMFS}"))
        .arg(format!("--customize-hook={RESTORE_INITRAMFS}"))
        // The package cache: copied in before apt runs, new downloads copied back out.
        .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
        .arg(format!(
            "--setup-hook=sync-in {} /var/cache/apt/archives/",
            apt_cache.display()
        ))
        .arg(format!(
            "--customize-hook=sync-out /var/cache/apt/archives {}",
            apt_cache.display()
        ));
    // The first source is the distribution: mmdebstrap's default mirror (with -updates and
    // -security) unless it has an explicit URI, which then replaces that default.
    let (main, extra) = match spec.sources.split_first() {
        Some((m, e)) => (Some(m), e),
        None => (None, &[][..]),
    };
    if let Some(m) = main {
        cmd = cmd.arg(format!("--components={}", m.components.join(",")));
    }
    // Every other source is written into the root by a hook, keyring included at the same
    // path (apt reads signed-by on the build host now, and inside the image later).
    for s in extra {
        cmd = extra_source_hooks(cmd, spec, s);
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
