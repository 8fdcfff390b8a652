//! Raw bootloader blobs (the C5's signed u-boot): fetched by URL into the cache, checked by
//! sha256, or taken from a local file; written at their offset without touching sector 0.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::Digest;

use crate::board::{Blob, Board, Placed};
use crate::cache::Cache;

/// Where a blob came from, for the manifest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlobInfo {
    pub offset: u64,
    pub size: u64,
    pub sha256: String,
    pub source: String,
}

/// The blob's bytes: `--uboot FILE` if given, else the cached or downloaded file at `url`;
/// either must match the board's sha256 when it is pinned (nothing unverified is downloaded).
pub fn fetch(blob: &Blob, local: Option<&Path>, cache: &Cache) -> Result<(Vec<u8>, BlobInfo)> {
    if blob.sha256.is_empty() {
        // Not pinned yet (a board being brought up): only a file the user chose.
        let Some(p) = local else {
            bail!(
                "{} has no pinned sha256 in the board file, so it cannot be downloaded safely: \
                 download {} yourself, check it, and pass it with --uboot FILE (or pin boot.blob.sha256)",
                blob.description,
                blob.url
            );
        };
        let data =
            picoimg_firstboot::input::read_bytes(p, crate::artifact::LIMIT, "bootloader blob")
                .with_context(|| format!("reading --uboot {}", p.display()))?;
        return Ok((
            data.clone(),
            BlobInfo {
                offset: blob.offset.0,
                size: data.len() as u64,
                sha256: hex::encode(sha2::Sha256::digest(&data)),
                source: format!("local file {} (board file pins no sha256)", p.display()),
            },
        ));
    }
    let named = crate::artifact::Named {
        what: &blob.description,
        pinned_by: "the board file",
        flag: "--uboot FILE",
    };
    let (data, source) = crate::artifact::fetch(&named, &blob.url, &blob.sha256, local, cache)?;
    Ok((
        data.clone(),
        BlobInfo {
            offset: blob.offset.0,
            size: data.len() as u64,
            sha256: blob.sha256.clone(),
            source,
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
