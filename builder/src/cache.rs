//! The build cache, outside the checkout: downloaded .debs per architecture and root
//! filesystem tarballs keyed by the hash of what went into them.
//!
//! Default: `$PICOIMG_CACHE_DIR`, else `/var/cache/picoimg` for root, else
//! `$XDG_CACHE_HOME/picoimg` (`~/.cache/picoimg`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::board::Arch;
use crate::rootfs::RootfsInfo;

/// One cached root filesystem (a base root or a stack's layer).
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub tar: PathBuf,
    pub bytes: u64,
    /// When a build last used (or made) it.
    pub last_used: SystemTime,
    /// Its facts, if the entry is complete.
    pub info: Option<RootfsInfo>,
}

/// Everything else in the cache, by folder: package downloads per architecture, pinned
/// files, first-boot agents, and temporary files a killed build left.
#[derive(Debug, Clone)]
pub struct Folder {
    pub name: String,
    pub files: u64,
    pub bytes: u64,
}

pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn open(dir: Option<&Path>) -> Result<Cache> {
        let root = match dir {
            Some(d) => d.to_owned(),
            None => default_dir(),
        };
        for sub in ["apt", "rootfs"] {
            std::fs::create_dir_all(root.join(sub)).with_context(|| {
                format!(
                    "creating cache directory {} (pick another with --cache DIR)",
                    root.join(sub).display()
                )
            })?;
        }
        let root = root.canonicalize().unwrap_or(root);
        Ok(Cache { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Downloaded packages for one architecture (and arch: all).
    pub fn apt_dir(&self, arch: Arch) -> Result<PathBuf> {
        let d = self.root.join("apt").join(arch.as_str());
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(d)
    }

    /// Path of a cached root filesystem tarball.
    pub fn rootfs(&self, key: &str) -> PathBuf {
        self.root.join("rootfs").join(format!("{key}.tar"))
    }

    /// Compressed `.xz` blocks by level and contents (see [`crate::output::xz_compress`]).
    pub fn xz_dir(&self) -> PathBuf {
        self.root.join("xz")
    }

    /// Marks a cached root filesystem as used now (what `prune` goes by).
    pub fn touch(&self, key: &str) {
        let json = self.rootfs(key).with_extension("json");
        if let Ok(f) = File::options().append(true).open(&json) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// The cached root filesystems, most recently used first.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let dir = self.root.join("rootfs");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = e?.path();
            let (Some(key), Some("tar")) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            if key.starts_with('.') {
                continue;
            }
            let json = path.with_extension("json");
            let meta = std::fs::metadata(&path)?;
            let info = std::fs::read(&json)
                .ok()
                .and_then(|b| serde_json::from_slice::<RootfsInfo>(&b).ok());
            let last_used = std::fs::metadata(&json)
                .and_then(|m| m.modified())
                .or_else(|_| meta.modified())?;
            out.push(Entry {
                key: key.to_owned(),
                tar: path.clone(),
                bytes: meta.len(),
                last_used,
                info,
            });
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.last_used));
        Ok(out)
    }

    /// The other folders' sizes, and the temporary files builds left behind.
    pub fn folders(&self) -> Result<Vec<Folder>> {
        let mut out = Vec::new();
        let mut dirs: Vec<(String, PathBuf)> = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.root.join("apt")) {
            for e in rd.flatten() {
                dirs.push((format!("apt/{}", e.file_name().to_string_lossy()), e.path()));
            }
        }
        dirs.push(("blobs".into(), self.root.join("blobs")));
        dirs.push(("xz".into(), self.xz_dir()));
        dirs.push(("agent".into(), self.root.join("agent")));
        dirs.sort();
        for (name, d) in dirs {
            let (files, bytes) = tree_size(&d);
            out.push(Folder { name, files, bytes });
        }
        let left = self.leftovers();
        out.push(Folder {
            name: "unfinished".into(),
            files: left.len() as u64,
            bytes: left.iter().map(|(_, b)| b).sum(),
        });
        Ok(out)
    }

    /// Temporary files of builds that were killed (`.building-*`, `.download-*`).
    fn leftovers(&self) -> Vec<(PathBuf, u64)> {
        let mut out = Vec::new();
        for d in [
            self.root.join("rootfs"),
            self.root.join("blobs"),
            self.xz_dir(),
        ] {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".building-") || name.starts_with(".download-") {
                    out.push((e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)));
                }
            }
        }
        out
    }

    /// Removes the root filesystems not used for `older_than` (all with `None`), waiting for
    /// a build that holds one; and temporary files no build is writing (older than a day, or
    /// all with `None`). Returns what went, with sizes; `dry_run` only says it.
    pub fn prune(&self, older_than: Option<Duration>, dry_run: bool) -> Result<Vec<(String, u64)>> {
        let now = SystemTime::now();
        let old =
            |t: SystemTime, limit: Duration| now.duration_since(t).is_ok_and(|age| age >= limit);
        let mut gone = Vec::new();
        for e in self.entries()? {
            if older_than.is_some_and(|d| !old(e.last_used, d)) {
                continue;
            }
            let what = e
                .info
                .as_ref()
                .map_or("unfinished entry".to_owned(), |i| i.what.clone());
            if !dry_run {
                let _lock = self.lock(&e.key)?;
                for p in [e.tar.clone(), e.tar.with_extension("json")] {
                    match std::fs::remove_file(&p) {
                        Ok(()) => {}
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                        Err(err) => {
                            return Err(err).with_context(|| format!("removing {}", p.display()))
                        }
                    }
                }
                let _ =
                    std::fs::remove_file(self.root.join("rootfs").join(format!("{}.lock", e.key)));
            }
            gone.push((
                format!("rootfs {} ({what})", &e.key[..12.min(e.key.len())]),
                e.bytes,
            ));
        }
        // Compressed blocks, by when a build last used them.
        let (mut files, mut bytes) = (0, 0);
        for e in std::fs::read_dir(self.xz_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(m) = e.metadata() else { continue };
            if e.file_name().to_string_lossy().starts_with('.') || !m.is_file() {
                continue;
            }
            if older_than.is_some_and(|d| !old(m.modified().unwrap_or(now), d)) {
                continue;
            }
            if !dry_run {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(err) => {
                        return Err(err).with_context(|| format!("removing {}", e.path().display()))
                    }
                }
            }
            files += 1;
            bytes += m.len();
        }
        if files > 0 {
            gone.push((format!("xz blocks ({files} compressed blocks)"), bytes));
        }
        for (p, bytes) in self.leftovers() {
            let modified = std::fs::metadata(&p)
                .and_then(|m| m.modified())
                .unwrap_or(now);
            if older_than.is_none() || old(modified, Duration::from_secs(24 * 3600)) {
                if !dry_run {
                    std::fs::remove_file(&p)
                        .with_context(|| format!("removing {}", p.display()))?;
                }
                gone.push((format!("unfinished {}", p.display()), bytes));
            }
        }
        Ok(gone)
    }

    /// Takes the cache lock for one key; two builds of the same root filesystem wait for each
    /// other instead of running mmdebstrap twice.
    pub fn lock(&self, key: &str) -> Result<File> {
        let p = self.root.join("rootfs").join(format!("{key}.lock"));
        let f = File::create(&p).with_context(|| format!("creating lock {}", p.display()))?;
        f.lock()
            .with_context(|| format!("locking {}", p.display()))?;
        Ok(f)
    }
}

/// Files and bytes below `d` (0 when it does not exist).
fn tree_size(d: &Path) -> (u64, u64) {
    let mut files = 0;
    let mut bytes = 0;
    let mut stack = vec![d.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => {
                    files += 1;
                    bytes += m.len();
                }
                Err(_) => {}
            }
        }
    }
    (files, bytes)
}

fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PICOIMG_CACHE_DIR") {
        return d.into();
    }
    if rustix::process::geteuid().is_root() {
        return "/var/cache/picoimg".into();
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| "/tmp".into())
        .join("picoimg")
}
