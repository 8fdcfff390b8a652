//! Pinned downloads: files a board or component needs that no apt archive carries (the C5's
//! signed u-boot, a vendor's release binary). Each is named by URL and sha256, fetched once into
//! `<cache>/blobs/<sha256>` and checked before anything else of the build runs; offline, a local
//! copy (`--artifact NAME=FILE`, `--uboot FILE`) or a file pre-seeded at that cache path is
//! used, checked against the same sha256.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::board::Arch;
use crate::cache::Cache;
use crate::cmd::Cmd;

/// Largest pinned file taken.
pub const LIMIT: u64 = 512 << 20;

/// A file a component installs into the image (`[[artifact]]` in component.toml).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Name for `--artifact NAME=FILE` and messages (lowercase letters, digits, '-').
    pub name: String,
    pub description: String,
    /// Absolute path in the image.
    pub path: String,
    /// File mode in the image (owner root).
    #[serde(default = "executable")]
    pub mode: u32,
    /// Per architecture (`amd64`, `arm64`): where it comes from and its sha256.
    pub pins: BTreeMap<String, Pin>,
    /// The component's source sets it belongs to (empty: every set). A set of its own is the
    /// offline path for a vendor's apt repository: `--artifact NAME=FILE` selects it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<String>,
    /// The pinned file is a zip archive (a vendor's release); this member is what goes to
    /// `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zip_member: Option<String>,
}

fn executable() -> u32 {
    0o755
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    pub url: String,
    /// Hex sha256 of the file at `url`.
    pub sha256: String,
    /// The sha256 came from the user (`--artifact-sha256`), not from the component file.
    #[serde(skip)]
    pub given: bool,
}

/// Where a pinned file came from, for the manifest.
#[derive(Debug, Clone, Serialize)]
pub struct Fetched {
    pub name: String,
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// Checked against a sha256 the user gave (`--artifact-sha256`) instead of the pin.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sha256_given: bool,
    pub source: String,
}

/// A local copy of an artifact (`--artifact NAME=FILE`), with the sha256 to check it against
/// when it is not the pinned release (`--artifact-sha256 NAME=HEX`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub file: PathBuf,
    pub sha256: Option<String>,
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Artifact {
    /// Checks the declaration; `file` names the component file in messages.
    pub fn validate(&self, file: &Path) -> Result<()> {
        let at = format!("{}: artifact `{}`", file.display(), self.name);
        if !crate::data::plain_name(&self.name) {
            bail!(
                "{}: artifact name {:?}: lowercase letters, digits and '-'",
                file.display(),
                self.name
            );
        }
        let p = Path::new(&self.path);
        if !p.is_absolute()
            || p.components().any(|c| {
                matches!(
                    c,
                    std::path::Component::ParentDir | std::path::Component::CurDir
                )
            })
            || self.path.ends_with('/')
        {
            bail!(
                "{at}: path {:?} must be an absolute file path without . or ..",
                self.path
            );
        }
        if self.mode > 0o7777 {
            bail!(
                "{at}: mode {:o} is not a file mode (write it as 0o755)",
                self.mode
            );
        }
        if let Some(m) = &self.zip_member {
            if m.is_empty() || m.starts_with('/') || m.split('/').any(|c| c == "..") {
                bail!("{at}: zip_member {m:?} must be a relative path inside the archive");
            }
        }
        if self.pins.is_empty() {
            bail!("{at}: no pins: give [artifact.pins.amd64] and/or [artifact.pins.arm64] with url and sha256");
        }
        for (arch, pin) in &self.pins {
            if !matches!(arch.as_str(), "amd64" | "arm64") {
                bail!("{at}: pins.{arch}: not an architecture (amd64, arm64)");
            }
            if !is_sha256(&pin.sha256) {
                bail!(
                    "{at}: pins.{arch}.sha256 {:?} is not 64 lowercase hex digits",
                    pin.sha256
                );
            }
            if !["http://", "https://", "file:///"]
                .iter()
                .any(|s| pin.url.starts_with(s))
                || pin.url.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                bail!(
                    "{at}: pins.{arch}.url {:?} must be an http(s):// or file:/// URL",
                    pin.url
                );
            }
        }
        Ok(())
    }

    pub fn pin(&self, arch: Arch) -> Option<&Pin> {
        self.pins.get(arch.as_str())
    }

    /// Whether it is installed when its component uses source set `set`.
    pub fn in_set(&self, set: Option<&str>) -> bool {
        self.sets.is_empty() || set.is_some_and(|s| self.sets.iter().any(|x| x == s))
    }
}

/// A component whose artifact, limited to one of its source sets, is given as a local copy
/// (`--artifact NAME=FILE`) uses that set: the offline path replaces the vendor's repository.
pub fn prefer_sets(
    components: &mut [crate::component::Component],
    locals: &BTreeMap<String, Local>,
) {
    for c in components.iter_mut() {
        let chosen = c
            .file
            .artifacts
            .iter()
            .find(|a| locals.contains_key(&a.name) && a.sets.len() == 1)
            .map(|a| a.sets[0].clone());
        if let Some(set) = chosen {
            c.file.default_sources = Some(set);
        }
    }
}

/// A local copy with a sha256 of the user's replaces the artifact's pin for `arch` (another
/// release than the pinned one): the plan, the inputs hash and the manifest record that sum.
pub fn apply_given_sums(
    components: &mut [crate::component::Component],
    arch: Arch,
    locals: &BTreeMap<String, Local>,
) -> Result<()> {
    for (name, local) in locals {
        let Some(sum) = &local.sha256 else { continue };
        let file = std::path::absolute(&local.file)
            .with_context(|| format!("--artifact {name}={}", local.file.display()))?;
        for a in components
            .iter_mut()
            .flat_map(|c| c.file.artifacts.iter_mut())
            .filter(|a| a.name == *name)
        {
            a.pins.insert(
                arch.as_str().to_owned(),
                Pin {
                    url: format!("file://{}", file.display()),
                    sha256: sum.clone(),
                    given: true,
                },
            );
        }
    }
    Ok(())
}

/// The artifacts `c` installs with the source set `asked` resolves to.
pub fn active<'c>(
    c: &'c crate::component::Component,
    asked: Option<&str>,
) -> Result<Vec<&'c Artifact>> {
    let set = c.source_set(asked)?.map(|(n, _)| n);
    Ok(c.file.artifacts.iter().filter(|a| a.in_set(set)).collect())
}

/// Every component's active artifacts, with the component's name.
fn active_all<'c>(
    components: &'c [crate::component::Component],
    asked: Option<&str>,
) -> Result<Vec<(&'c str, &'c Artifact)>> {
    let mut all = Vec::new();
    for c in components {
        all.extend(active(c, asked)?.into_iter().map(|a| (c.name.as_str(), a)));
    }
    Ok(all)
}

/// The member `name` of the zip archive `data`, bounded by [`LIMIT`].
pub fn unzip(data: &[u8], name: &str, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(data))
        .with_context(|| format!("{what} is not a zip archive"))?;
    let names: Vec<String> = z.file_names().map(str::to_owned).collect();
    let mut f = z.by_name(name).map_err(|_| {
        anyhow::anyhow!(
            "{what} has no member {name:?} (it has: {})",
            names.join(", ")
        )
    })?;
    if f.size() > LIMIT {
        bail!(
            "{what}: member {name} is {} bytes, more than {LIMIT}",
            f.size()
        );
    }
    let mut out = Vec::with_capacity(f.size() as usize);
    f.by_ref()
        .take(LIMIT)
        .read_to_end(&mut out)
        .with_context(|| format!("unpacking {name} from {what}"))?;
    Ok(out)
}

/// Which file, pinned where, for messages.
pub struct Named<'a> {
    /// What it is (`Hardkernel's signed u-boot for the Odroid C5`).
    pub what: &'a str,
    /// Who pins it (`the board file`, `component \`nomad\``).
    pub pinned_by: &'a str,
    /// The option that takes a local copy (`--uboot FILE`).
    pub flag: &'a str,
}

/// One pinned file's bytes: `local` if given, else the cache's copy, else downloaded into the
/// cache. Whatever the source, it must have `sha256`.
pub fn fetch(
    n: &Named<'_>,
    url: &str,
    sha256: &str,
    local: Option<&Path>,
    cache: &Cache,
) -> Result<(Vec<u8>, String)> {
    let Named {
        what,
        pinned_by,
        flag,
    } = *n;
    if let Some(p) = local {
        let data = picoimg_firstboot::input::read_bytes(p, LIMIT, "pinned file")
            .with_context(|| format!("reading {flag} {}", p.display()))?;
        let sum = hex::encode(Sha256::digest(&data));
        if sum != sha256 {
            bail!(
                "{flag} {} has sha256 {sum}, but {pinned_by} pins {sha256} for {what}: not the file the build needs (it comes from {url})",
                p.display()
            );
        }
        return Ok((data, format!("local file {}", p.display())));
    }
    let cached = cached_path(cache, sha256)?;
    if !cached.is_file() {
        let dir = cached.parent().expect("cache dir");
        let tmp = tempfile::Builder::new()
            .prefix(".download-")
            .tempfile_in(dir)
            .context("creating a download file")?;
        Cmd::new("curl")
            .args([
                "--fail",
                "--silent",
                "--show-error",
                "--location",
                "--retry",
                "2",
                "--max-filesize",
                &LIMIT.to_string(),
                "--output",
            ])
            .arg(tmp.path())
            .arg(url)
            .run()
            .with_context(|| {
                format!(
                    "downloading {what} from {url}; offline, pass a copy with {flag}, or put it in the cache as {} (it is checked against sha256 {sha256} either way)",
                    cached.display(),
                )
            })?;
        let got = crate::output::sha256_file(tmp.path())?;
        if got != sha256 {
            bail!("{what} from {url} has sha256 {got}, but {pinned_by} pins {sha256}: refusing to use it");
        }
        tmp.persist(&cached)
            .with_context(|| format!("storing {}", cached.display()))?;
    }
    let data = picoimg_firstboot::input::read_bytes(&cached, LIMIT, "pinned file")
        .with_context(|| format!("reading {}", cached.display()))?;
    let got = hex::encode(Sha256::digest(&data));
    if got != sha256 {
        bail!(
            "cached {what} is corrupt (sha256 {got}); delete {} and build again",
            cached.display()
        );
    }
    Ok((data, url.to_owned()))
}

/// `<cache>/blobs/<sha256>`: where a pinned file is kept (and can be pre-seeded).
pub fn cached_path(cache: &Cache, sha256: &str) -> Result<PathBuf> {
    if !is_sha256(sha256) {
        bail!("{sha256:?} is not a sha256");
    }
    let dir = cache.root().join("blobs");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.join(sha256))
}

/// `--artifact NAME=FILE` values, each name once.
pub fn parse_locals(args: &[String], sums: &[String]) -> Result<BTreeMap<String, Local>> {
    let mut out = BTreeMap::new();
    for a in args {
        let Some((name, file)) = a
            .split_once('=')
            .filter(|(n, f)| !n.is_empty() && !f.is_empty())
        else {
            bail!("--artifact {a:?}: write NAME=FILE (see `picoimg plan` for the artifacts a build takes)");
        };
        let local = Local {
            file: PathBuf::from(file),
            sha256: None,
        };
        if out.insert(name.to_owned(), local).is_some() {
            bail!("--artifact {name}: given twice");
        }
    }
    for a in sums {
        let Some((name, sum)) = a.split_once('=') else {
            bail!("--artifact-sha256 {a:?}: write NAME=SHA256 (64 hex digits, from the vendor's SHA256SUMS)");
        };
        let sum = sum.trim().to_ascii_lowercase();
        if !is_sha256(&sum) {
            bail!("--artifact-sha256 {name}: {sum:?} is not a sha256 (64 hex digits, from the vendor's SHA256SUMS)");
        }
        let Some(local) = out.get_mut(name) else {
            bail!(
                "--artifact-sha256 {name}: give the file too (--artifact {name}=FILE): a sum of your own is for a local copy of another release than the pinned one"
            );
        };
        if local.sha256.replace(sum).is_some() {
            bail!("--artifact-sha256 {name}: given twice");
        }
    }
    Ok(out)
}

/// The plan-time checks: every artifact has a pin for `arch`, and every `--artifact` name is
/// one of them.
pub fn check_plan(
    components: &[crate::component::Component],
    arch: Arch,
    asked: Option<&str>,
    locals: &BTreeMap<String, Local>,
) -> Result<()> {
    let all = active_all(components, asked)?;
    for name in locals.keys() {
        if !all.iter().any(|(_, a)| a.name == *name) {
            let known: Vec<&str> = all.iter().map(|(_, a)| a.name.as_str()).collect();
            bail!(
                "--artifact {name}: no component of this build has an artifact of that name ({})",
                if known.is_empty() {
                    "it has none".to_owned()
                } else {
                    format!("it has: {}", known.join(", "))
                }
            );
        }
    }
    for (comp, a) in all {
        if a.pin(arch).is_none() {
            bail!(
                "component `{comp}`: artifact `{}` has no pin for {} (pins: {})",
                a.name,
                arch.as_str(),
                a.pins.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(())
}

/// Fetches every artifact of `components` for `arch` (local copies from `locals`), before the
/// root filesystem step.
pub fn fetch_all(
    components: &[crate::component::Component],
    arch: Arch,
    asked: Option<&str>,
    locals: &BTreeMap<String, Local>,
    cache: &Cache,
) -> Result<Vec<(Fetched, Vec<u8>, u32)>> {
    check_plan(components, arch, asked, locals)?;
    let all = active_all(components, asked)?;
    let mut out = Vec::new();
    for (comp, a) in all {
        let pin = a
            .pin(arch)
            .with_context(|| format!("artifact `{}`: no pin for {}", a.name, arch.as_str()))?;
        let named = Named {
            what: &a.description,
            pinned_by: &if pin.given {
                format!("--artifact-sha256 {}", a.name)
            } else {
                format!("component `{comp}`")
            },
            flag: &format!("--artifact {}=FILE", a.name),
        };
        let (data, source) = fetch(
            &named,
            &pin.url,
            &pin.sha256,
            locals.get(&a.name).map(|l| l.file.as_path()),
            cache,
        )
        .with_context(|| format!("component `{comp}`: artifact `{}`", a.name))?;
        // Checked as downloaded (the archive's sha256), then unpacked.
        let data = match &a.zip_member {
            Some(m) => unzip(&data, m, &a.description)
                .with_context(|| format!("component `{comp}`: artifact `{}`", a.name))?,
            None => data,
        };
        out.push((
            Fetched {
                name: a.name.clone(),
                path: a.path.clone(),
                size: data.len() as u64,
                sha256: pin.sha256.clone(),
                sha256_given: pin.given,
                source,
            },
            data,
            a.mode,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Named<'static> = Named {
        what: "the test file",
        pinned_by: "the test",
        flag: "--artifact t=FILE",
    };

    fn sum(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    #[test]
    fn fetches_checks_caches_and_takes_local_copies() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(Some(&dir.path().join("cache"))).unwrap();
        let src = dir.path().join("nomad.zip");
        std::fs::write(&src, b"release bytes").unwrap();
        let good = sum(b"release bytes");
        let url = format!("file://{}", src.display());
        // Downloaded (curl, file:// URL) and kept under its sha256.
        let (data, from) = fetch(&T, &url, &good, None, &cache).unwrap();
        assert_eq!(data, b"release bytes");
        assert_eq!(from, url);
        assert!(cached_path(&cache, &good).unwrap().is_file());
        // Now offline: the cached copy serves.
        std::fs::remove_file(&src).unwrap();
        let (data, _) = fetch(&T, &url, &good, None, &cache).unwrap();
        assert_eq!(data, b"release bytes");
        // A download with another sum is refused and not cached.
        let other = dir.path().join("other");
        std::fs::write(&other, b"tampered").unwrap();
        let pinned = sum(b"what was pinned");
        let e = fetch(
            &T,
            &format!("file://{}", other.display()),
            &pinned,
            None,
            &cache,
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains(&sum(b"tampered")) && msg.contains(&pinned),
            "{msg}"
        );
        assert!(!cached_path(&cache, &pinned).unwrap().exists());
        // An unreachable URL names both offline ways in.
        let e = fetch(&T, "http://127.0.0.1:9/x", &pinned, None, &cache).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("--artifact t=FILE") && msg.contains(&format!("blobs/{pinned}")),
            "{msg}"
        );
        // A local copy: checked against the same pin.
        let e = fetch(&T, "http://127.0.0.1:9/x", &pinned, Some(&other), &cache).unwrap_err();
        assert!(format!("{e:#}").contains("but the test pins"), "{e:#}");
        let right = dir.path().join("right");
        std::fs::write(&right, b"what was pinned").unwrap();
        let (data, from) =
            fetch(&T, "http://127.0.0.1:9/x", &pinned, Some(&right), &cache).unwrap();
        assert_eq!(data, b"what was pinned");
        assert!(from.starts_with("local file"));
    }

    /// A release archive made by Python's zipfile (deflated): the member comes out whole; a
    /// missing member or a file that is no zip names what is wrong.
    #[test]
    fn unzips_one_member_of_a_release_archive() {
        let dir = tempfile::tempdir().unwrap();
        let zip = dir.path().join("r.zip");
        let body = "#!/bin/sh\necho nomad\n".repeat(100);
        let o = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys,zipfile\n\
                 with zipfile.ZipFile(sys.argv[1],'w',zipfile.ZIP_DEFLATED) as z:\n z.writestr('LICENSE.txt','x')\n z.writestr('nomad', sys.argv[2])",
            ])
            .arg(&zip)
            .arg(&body)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let data = std::fs::read(&zip).unwrap();
        assert_eq!(
            unzip(&data, "nomad", "the archive").unwrap(),
            body.as_bytes()
        );
        let e = unzip(&data, "consul", "the archive")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no member \"consul\"") && e.contains("LICENSE.txt, nomad"),
            "{e}"
        );
        let e = unzip(b"not a zip", "nomad", "the archive")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a zip archive"), "{e}");
    }

    #[test]
    fn declarations_are_checked() {
        let ok = Artifact {
            name: "nomad".into(),
            description: "Nomad".into(),
            path: "/usr/bin/nomad".into(),
            mode: 0o755,
            sets: Vec::new(),
            zip_member: None,
            pins: [(
                "amd64".to_owned(),
                Pin {
                    url: "https://example.invalid/nomad.zip".into(),
                    sha256: "a".repeat(64),
                    given: false,
                },
            )]
            .into(),
        };
        let f = Path::new("overlays/nomad/component.toml");
        ok.validate(f).unwrap();
        type Edit = Box<dyn Fn(&mut Artifact)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|a| a.name = "No Good".into()), "artifact name"),
            (
                Box::new(|a| a.path = "usr/bin/x".into()),
                "absolute file path",
            ),
            (
                Box::new(|a| a.path = "/usr/../etc/x".into()),
                "absolute file path",
            ),
            (Box::new(|a| a.mode = 0o17777), "not a file mode"),
            (Box::new(|a| a.pins.clear()), "no pins"),
            (
                Box::new(|a| {
                    let p = a.pins.remove("amd64").unwrap();
                    a.pins.insert("riscv64".into(), p);
                }),
                "not an architecture",
            ),
            (
                Box::new(|a| a.pins.get_mut("amd64").unwrap().sha256 = "ABC".into()),
                "64 lowercase hex",
            ),
            (
                Box::new(|a| a.pins.get_mut("amd64").unwrap().url = "ftp://x/y".into()),
                "http(s)://",
            ),
        ];
        for (edit, want) in cases {
            let mut a = ok.clone();
            edit(&mut a);
            let e = a.validate(f).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains("overlays/nomad/component.toml"),
                "{want}: {e}"
            );
        }
        assert!(parse_locals(&["x".into()], &[]).is_err());
        assert!(parse_locals(&["a=1".into(), "a=2".into()], &[]).is_err());
        assert_eq!(
            parse_locals(&["a=/f".into()], &[]).unwrap()["a"],
            Local {
                file: PathBuf::from("/f"),
                sha256: None
            }
        );
        let sum = "AB".repeat(32);
        assert_eq!(
            parse_locals(&["a=/f".into()], &[format!("a={sum}")]).unwrap()["a"].sha256,
            Some("ab".repeat(32))
        );
        for (sums, want) in [
            (
                vec![format!("b={sum}")],
                "give the file too (--artifact b=FILE)",
            ),
            (vec!["a=abc".to_owned()], "is not a sha256"),
            (vec![sum.clone()], "write NAME=SHA256"),
            (vec![format!("a={sum}"), format!("a={sum}")], "given twice"),
        ] {
            let e = parse_locals(&["a=/f".into()], &sums)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
