//! Raw bootloader blobs (the C5's signed u-boot): fetched by URL into the cache, checked by
//! sha256, or taken from a local file; written at their offset without touching sector 0.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::board::{Blob, Board, Placed};
use crate::cache::Cache;
use crate::cmd::Cmd;

/// Where a blob came from, for the manifest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlobInfo {
    pub offset: u64,
    pub size: u64,
    pub sha256: String,
    pub source: String,
}

/// Largest blob taken (a bootloader is a few MiB).
const BLOB_LIMIT: u64 = 64 << 20;

/// The blob's bytes: `--uboot FILE` if given, else the cached or downloaded file at `url`;
/// either must match the board's sha256 when it is pinned (no unverified bootloader goes into
/// an image).
pub fn fetch(blob: &Blob, local: Option<&Path>, cache: &Cache) -> Result<(Vec<u8>, BlobInfo)> {
    if let Some(p) = local {
        let data = picoimg_firstboot::input::read_bytes(p, BLOB_LIMIT, "bootloader blob")
            .with_context(|| format!("reading --uboot {}", p.display()))?;
        let sum = hex::encode(Sha256::digest(&data));
        if !blob.sha256.is_empty() && sum != blob.sha256 {
            bail!(
                "--uboot {} has sha256 {sum}, but the board file pins {} for {}: not the file the board needs (it comes from {})",
                p.display(),
                blob.sha256,
                blob.description,
                blob.url
            );
        }
        return Ok((
            data.clone(),
            BlobInfo {
                offset: blob.offset.0,
                size: data.len() as u64,
                sha256: sum,
                source: format!("local file {}", p.display()),
            },
        ));
    }
    if blob.sha256.is_empty() {
        bail!(
            "{} has no pinned sha256 in the board file, so it cannot be downloaded safely: \
             download {} yourself, check it, and pass it with --uboot FILE (or pin boot.blob.sha256)",
            blob.description,
            blob.url
        );
    }
    let dir = cache.root().join("blobs");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let cached: PathBuf = dir.join(&blob.sha256);
    if !cached.is_file() {
        let tmp = tempfile::Builder::new()
            .prefix(".download-")
            .tempfile_in(&dir)
            .context("creating a download file")?;
        Cmd::new("curl")
            .args([
                "--fail",
                "--silent",
                "--show-error",
                "--location",
                "--retry",
                "2",
                "--output",
            ])
            .arg(tmp.path())
            .arg(&blob.url)
            .run()
            .with_context(|| {
                format!(
                    "downloading {} from {}; offline, pass a copy with --uboot FILE, or put it in the cache as {} (it is checked against sha256 {} either way)",
                    blob.description,
                    blob.url,
                    cached.display(),
                    blob.sha256
                )
            })?;
        let got = crate::output::sha256_file(tmp.path())?;
        if got != blob.sha256 {
            bail!(
                "{} from {} has sha256 {got}, but the board file pins {}: refusing to use it",
                blob.description,
                blob.url,
                blob.sha256
            );
        }
        tmp.persist(&cached)
            .with_context(|| format!("storing {}", cached.display()))?;
    }
    let data = std::fs::read(&cached).with_context(|| format!("reading {}", cached.display()))?;
    let got = hex::encode(Sha256::digest(&data));
    if got != blob.sha256 {
        bail!(
            "cached {} is corrupt (sha256 {got}); delete {} and build again",
            blob.description,
            cached.display()
        );
    }
    Ok((
        data.clone(),
        BlobInfo {
            offset: blob.offset.0,
            size: data.len() as u64,
            sha256: got,
            source: blob.url.clone(),
        },
    ))
}

/// Checks the blob fits between its offset and the first partition.
pub fn check_fits(board: &Board, layout: &[Placed], blob: &Blob, size: u64) -> Result<()> {
    let first = layout.iter().min_by_key(|p| p.start).expect("a partition");
    let end = blob.offset.0 + size;
    if end > first.start {
        bail!(
            "{} ({size} bytes at offset {}) would overlap partition `{}` starting at {}: \
             move the partition (disk.partition start) or check the blob",
            blob.description,
            blob.offset.0,
            board.disk.partitions[first.index].name,
            crate::size::Bytes(first.start)
        );
    }
    Ok(())
}

/// Writes the blob into the image at its offset.
pub fn write(image: &Path, offset: u64, data: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(data).context("writing the bootloader blob")?;
    f.flush()?;
    Ok(())
}
