//! The build cache, outside the checkout: downloaded .debs per architecture and root
//! filesystem tarballs keyed by the hash of what went into them.
//!
//! Default: `$PICOIMG_CACHE_DIR`, else `/var/cache/picoimg` for root, else
//! `$XDG_CACHE_HOME/picoimg` (`~/.cache/picoimg`).

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::board::Arch;

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
