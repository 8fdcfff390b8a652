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

/// Compresses `src` to `dst` with multi-threaded xz, showing progress.
pub fn xz_compress(src: &Path, dst: &Path, level: u32) -> Result<()> {
    let input = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let total = input.metadata()?.len();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let stream = xz2::stream::MtStreamBuilder::new()
        .threads(threads)
        .preset(level)
        .check(xz2::stream::Check::Crc64)
        .encoder()
        .context("setting up the xz encoder")?;
    let out = File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut enc = xz2::write::XzEncoder::new_stream(BufWriter::with_capacity(1 << 20, out), stream);
    let mut step = Step::bytes(
        format!("compressing (xz -{level}, {threads} threads)"),
        total,
    );
    let mut reader = std::io::BufReader::with_capacity(4 << 20, input);
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0u64;
    loop {
        crate::interrupt::check()?;
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        enc.write_all(&buf[..n])
            .with_context(|| format!("writing {}", dst.display()))?;
        done += n as u64;
        step.position(done);
    }
    let w = enc.finish().context("finishing xz stream")?;
    w.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", dst.display()))?;
    step.done();
    Ok(())
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
