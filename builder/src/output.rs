//! Outputs, published atomically: each file is written under a temporary name in the output
//! directory and renamed into place only when complete.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::progress::Step;

/// Writes `data` to `path` (0644) through a temporary file and a rename: the shared
/// [`picoimg_firstboot::fsutil::write_atomic`].
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    picoimg_firstboot::fsutil::write_atomic(path, data, 0o644)
}

/// Bytes of image per `.xz` block. Each block is compressed on its own (in parallel), cached by
/// its contents, and decodable on its own (`flash` decodes blocks in parallel). Measured on
/// h4-base at xz -6: 8 MiB blocks cost under 1% in size against xz's own 24 MiB.
pub const XZ_BLOCK: u64 = 8 << 20;

/// What [`xz_compress`] did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Compressed {
    pub blocks: u64,
    /// Blocks taken from the block cache instead of compressed again.
    pub reused: u64,
}

/// Compresses `src` to `dst` as xz at `level` in [`XZ_BLOCK`] blocks, on every core, showing
/// progress. With `cache`, a block whose contents and level were compressed before is taken
/// from there (an overlay change rewrites a few blocks of a 2 GiB image, so a rebuild
/// compresses only those); new blocks are added to it.
pub fn xz_compress(src: &Path, dst: &Path, level: u32, cache: Option<&Path>) -> Result<Compressed> {
    let input = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let total = input.metadata()?.len();
    let input = std::sync::Arc::new(input);
    let threads = crate::pool::threads();
    let n = total.div_ceil(XZ_BLOCK) as usize;
    let cache = cache.map(Path::to_owned);
    let job_input = input.clone();
    let jobs = crate::pool::ordered(n, threads, threads * 2, move |i| {
        use std::os::unix::fs::FileExt;
        let start = i as u64 * XZ_BLOCK;
        let len = XZ_BLOCK.min(total - start) as usize;
        let mut data = vec![0u8; len];
        job_input
            .read_exact_at(&mut data, start)
            .with_context(|| format!("reading bytes {start}.. of the image"))?;
        xz_block(&data, level, cache.as_deref())
    });
    let out = File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let mut step = Step::bytes(
        format!("compressing (xz -{level}, {threads} threads)"),
        total,
    );
    let mut writer = crate::xz::Writer::start(&mut out)?;
    let mut done = Compressed::default();
    let mut pos = 0u64;
    for (i, r) in jobs.enumerate() {
        crate::interrupt::check()?;
        let (bytes, unpadded, reused) = r?;
        let size = XZ_BLOCK.min(total - i as u64 * XZ_BLOCK);
        writer
            .block(&mut out, &bytes, unpadded, size)
            .with_context(|| format!("writing {}", dst.display()))?;
        done.blocks += 1;
        done.reused += u64::from(reused);
        pos += size;
        step.position(pos);
    }
    writer
        .finish(&mut out)
        .with_context(|| format!("writing {}", dst.display()))?;
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", dst.display()))?;
    step.done();
    Ok(done)
}

/// Magic of a cached block file: then the unpadded size (u64 LE), the sha256 of the block's
/// bytes, and the bytes.
const BLOCK_MAGIC: &[u8; 8] = b"picoxzb1";

/// One block, from the cache or compressed now: (padded bytes, unpadded size, reused).
fn xz_block(data: &[u8], level: u32, cache: Option<&Path>) -> Result<(Vec<u8>, u64, bool)> {
    let Some(dir) = cache else {
        let (bytes, unpadded) = crate::xz::encode_block(data, level)?;
        return Ok((bytes, unpadded, false));
    };
    let key = hex::encode(Sha256::new().chain_update(data).finalize());
    let path = dir.join(format!("{level}-{key}"));
    if let Ok(stored) = std::fs::read(&path) {
        if let Some((bytes, unpadded)) = cached_block(&stored) {
            if let Ok(f) = File::options().append(true).open(&path) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
            return Ok((bytes.to_vec(), unpadded, true));
        }
    }
    let (bytes, unpadded) = crate::xz::encode_block(data, level)?;
    let mut stored = BLOCK_MAGIC.to_vec();
    stored.extend(unpadded.to_le_bytes());
    stored.extend(Sha256::digest(&bytes));
    stored.extend(&bytes);
    // A cache that cannot be written only costs speed next time.
    let _ = std::fs::create_dir_all(dir)
        .and_then(|()| tempfile::NamedTempFile::with_prefix_in(".building-", dir))
        .and_then(|mut t| {
            t.write_all(&stored)?;
            t.persist(&path).map_err(|e| e.error)?;
            Ok(())
        });
    Ok((bytes, unpadded, false))
}

/// A cached block's bytes and unpadded size, if the file is whole (its sha256 matches).
fn cached_block(stored: &[u8]) -> Option<(&[u8], u64)> {
    let rest = stored.strip_prefix(BLOCK_MAGIC)?;
    let (unpadded, rest) = rest.split_first_chunk::<8>()?;
    let (sum, bytes) = rest.split_first_chunk::<32>()?;
    let unpadded = u64::from_le_bytes(*unpadded);
    (Sha256::digest(bytes).as_slice() == sum && bytes.len() as u64 == unpadded.div_ceil(4) * 4)
        .then_some((bytes, unpadded))
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Updates `SHA256SUMS` in `dir`: lines for `names` are replaced, other images' lines kept.
pub fn update_sums(dir: &Path, entries: &[(String, String)]) -> Result<()> {
    let path = dir.join("SHA256SUMS");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let mut lines: Vec<String> = old
        .lines()
        .filter(|l| {
            let name = l.split_whitespace().nth(1).unwrap_or("");
            !entries
                .iter()
                .any(|(n, _)| n == name.trim_start_matches('*'))
        })
        .map(str::to_owned)
        .collect();
    for (name, sum) in entries {
        lines.push(format!("{sum}  {name}"));
    }
    lines.sort_by(|a, b| {
        a.split_whitespace()
            .nth(1)
            .cmp(&b.split_whitespace().nth(1))
    });
    let mut text = lines.join("\n");
    text.push('\n');
    write_atomic(&path, text.as_bytes())
}

/// A directory for work in progress inside the output directory (so the final renames stay on
/// one filesystem); removed on drop, including on error and interrupt.
pub fn staging_dir(out: &Path, name: &str) -> Result<tempfile::TempDir> {
    std::fs::create_dir_all(out).with_context(|| {
        format!(
            "creating output directory {} (pick another with --out)",
            out.display()
        )
    })?;
    tempfile::Builder::new()
        .prefix(&format!(".picoimg-{name}-"))
        .tempdir_in(out)
        .with_context(|| {
            format!(
                "output directory {} is not writable (pick another with --out)",
                out.display()
            )
        })
}

/// Moves `from` to `to` (same filesystem).
pub fn publish(from: &Path, to: &Path) -> Result<PathBuf> {
    std::fs::rename(from, to)
        .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
    Ok(to.to_owned())
}

/// Copies `src` to `dst`, seeking over all-zero 64 KiB blocks so `dst` stays sparse.
pub fn copy_sparse(src: &mut impl Read, dst: &mut File) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    const CHUNK: usize = 64 * 1024;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        crate::interrupt::check()?;
        let mut filled = 0;
        while filled < CHUNK {
            let n = src.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if buf[..filled].iter().all(|&b| b == 0) {
            dst.seek(SeekFrom::Current(filled as i64))?;
        } else {
            dst.write_all(&buf[..filled])?;
        }
        total += filled as u64;
        if filled < CHUNK {
            break;
        }
    }
    dst.set_len(total)?;
    Ok(total)
}
