//! `picoimg flash IMAGE TARGET`: write an image to a card, eMMC or file, fast and safely.
//!
//! The image (`.img` or `.img.xz`) is read once, as a stream. With a block map beside it, only
//! the mapped ranges are written, each hashed as it passes and compared with the map's sha256
//! at the end of the range; without one, everything is written and hashed per chunk. The first
//! MiB (partition table, boot sector, the C5's u-boot) is held back and written last, after a
//! sync, so an interrupted write never leaves a card that looks bootable. Then everything
//! written is read back from the target and compared (unless `--no-verify`).

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::progress::{log, Step};

/// Bytes at the start of the target written last.
pub const HEAD: u64 = 1 << 20;
const CHUNK: usize = 1 << 20;
/// Without a block map, the written stream is hashed (and verified) in pieces of this size.
const PIECE: u64 = 64 << 20;

#[derive(Debug, Clone)]
pub struct FlashOptions {
    pub image: PathBuf,
    pub target: PathBuf,
    /// Block map (default: `<image>.bmap` or `<stem>.bmap` beside the image).
    pub bmap: Option<PathBuf>,
    pub no_bmap: bool,
    pub verify: bool,
    pub yes: bool,
    pub force: bool,
    pub cluster: Option<PathBuf>,
    pub node: Option<String>,
}

/// A block map: image size and the byte ranges that hold data, each with its sha256.
#[derive(Debug, Clone, PartialEq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    /// (start byte, end byte exclusive, sha256 hex)
    pub ranges: Vec<(u64, u64, String)>,
}

impl Bmap {
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|(a, b, _)| b - a).sum()
    }
}

fn tag<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let s = xml.find(&open)? + open.len();
    let e = xml[s..].find(&close)? + s;
    Some(xml[s..e].trim())
}

/// Parses a bmap (format 2.x, sha256: ours and bmaptool 3's), checking its own checksum.
pub fn parse_bmap(xml: &str) -> Result<Bmap> {
    let version = xml
        .split("<bmap version=\"")
        .nth(1)
        .and_then(|v| v.split('"').next())
        .context("no <bmap version=...> element")?;
    if !version.starts_with("2.") {
        bail!("bmap format {version} is not supported (2.x with sha256 is); regenerate it with `bmaptool create`");
    }
    let kind = tag(xml, "ChecksumType").unwrap_or("");
    if kind != "sha256" {
        bail!("bmap checksum type `{kind}` is not supported (sha256 is)");
    }
    if let Some(sum) = tag(xml, "BmapFileChecksum") {
        let zeroed = xml.replacen(sum, &"0".repeat(sum.len()), 1);
        let actual = hex::encode(Sha256::digest(zeroed.as_bytes()));
        if actual != sum {
            bail!("the bmap's own checksum does not match: the file is damaged or was edited");
        }
    }
    let num = |name: &str| -> Result<u64> {
        tag(xml, name)
            .with_context(|| format!("no <{name}>"))?
            .parse()
            .with_context(|| format!("<{name}> is not a number"))
    };
    let image_size = num("ImageSize")?;
    let block_size = num("BlockSize")?;
    let mut ranges = Vec::new();
    for part in xml.split("<Range").skip(1) {
        let sha = part
            .split("chksum=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .context("a <Range> has no chksum")?
            .to_owned();
        let body = part
            .split('>')
            .nth(1)
            .and_then(|s| s.split('<').next())
            .context("malformed <Range>")?
            .trim();
        let (a, b) = body.split_once('-').unwrap_or((body, body));
        let (a, b): (u64, u64) = (
            a.trim().parse().context("bad range start")?,
            b.trim().parse().context("bad range end")?,
        );
        if b < a {
            bail!("range {body} runs backwards");
        }
        let start = a * block_size;
        let end = ((b + 1) * block_size).min(image_size);
        if let Some((_, prev_end, _)) = ranges.last() {
            if start < *prev_end {
                bail!("range {body} overlaps or precedes the one before it");
            }
        }
        ranges.push((start, end, sha));
    }
    Ok(Bmap {
        image_size,
        block_size,
        ranges,
    })
}

/// The block map beside an image, if there is one.
pub fn find_bmap(image: &Path) -> Option<PathBuf> {
    let name = image.file_name()?.to_string_lossy().into_owned();
    let raw = name.strip_suffix(".xz").unwrap_or(&name);
    let stem = raw.strip_suffix(".img").unwrap_or(raw);
    [format!("{raw}.bmap"), format!("{stem}.bmap")]
        .into_iter()
        .map(|n| image.with_file_name(n))
        .find(|p| p.is_file())
}

/// The image as a stream that can skip ahead.
enum Source {
    Raw(File),
    Xz(Box<xz2::read::XzDecoder<BufReader<File>>>),
}

impl Source {
    fn open(image: &Path) -> Result<Source> {
        let f = File::open(image).with_context(|| format!("opening {}", image.display()))?;
        Ok(if image.extension().is_some_and(|e| e == "xz") {
            Source::Xz(Box::new(xz2::read::XzDecoder::new_multi_decoder(
                BufReader::with_capacity(CHUNK, f),
            )))
        } else {
            Source::Raw(f)
        })
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::Raw(f) => f.read(buf),
            Source::Xz(d) => d.read(buf),
        }
    }

    /// Reads exactly `buf.len()` bytes; `Ok(n < len)` at the end of the image.
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match self.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    }

    fn skip(&mut self, n: u64, scratch: &mut [u8]) -> std::io::Result<u64> {
        match self {
            Source::Raw(f) => {
                let here = f.stream_position()?;
                let end = f.metadata()?.len();
                let to = (here + n).min(end);
                f.seek(SeekFrom::Start(to))?;
                Ok(to - here)
            }
            Source::Xz(_) => {
                let mut left = n;
                while left > 0 {
                    let k = left.min(scratch.len() as u64) as usize;
                    let got = self.fill(&mut scratch[..k])?;
                    left -= got as u64;
                    if got < k {
                        break;
                    }
                }
                Ok(n - left)
            }
        }
    }
}

/// What a finished write did.
#[derive(Debug, Clone, Default)]
pub struct Written {
    pub bytes: u64,
    /// (start, end, sha256) of everything written, for the read-back.
    pub pieces: Vec<(u64, u64, String)>,
    pub image_size: u64,
}

/// Writes the image stream to `target` following `bmap` (or everything), first MiB last.
pub fn write_image(
    image: &Path,
    target: &File,
    bmap: Option<&Bmap>,
    step: &mut Step,
) -> Result<Written> {
    let mut src = Source::open(image)?;
    let mut buf = vec![0u8; CHUNK];
    let mut scratch = vec![0u8; CHUNK];
    let mut head = vec![0u8; HEAD as usize];
    let mut head_used = false;
    let mut pos = 0u64;
    let mut out = Written::default();
    let plan: Vec<(u64, u64, Option<String>)> = match bmap {
        Some(b) => b
            .ranges
            .iter()
            .map(|(a, e, s)| (*a, *e, Some(s.clone())))
            .collect(),
        None => Vec::new(),
    };
    let put = |off: u64, data: &[u8], head: &mut Vec<u8>, head_used: &mut bool| -> Result<()> {
        let mut off = off;
        let mut data = data;
        if off < HEAD {
            let n = ((HEAD - off) as usize).min(data.len());
            head[off as usize..off as usize + n].copy_from_slice(&data[..n]);
            *head_used = true;
            off += n as u64;
            data = &data[n..];
        }
        if !data.is_empty() {
            target
                .write_all_at(data, off)
                .with_context(|| format!("writing {} bytes at byte {off}", data.len()))?;
        }
        Ok(())
    };
    let describe = |a: u64, e: u64, bs: u64| {
        format!(
            "bmap range blocks {}-{} (bytes {a}-{})",
            a / bs,
            e.div_ceil(bs) - 1,
            e - 1
        )
    };
    if let Some(b) = bmap {
        for (a, e, sha) in &plan {
            crate::interrupt::check()?;
            let what = describe(*a, *e, b.block_size);
            if *a > pos {
                let skipped = src
                    .skip(a - pos, &mut scratch)
                    .with_context(|| format!("reading {} before {what}", image.display()))?;
                pos += skipped;
                if pos < *a {
                    bail!(
                        "{}: the image ends at byte {pos}, before {what}: truncated image?",
                        image.display()
                    );
                }
            }
            let mut h = Sha256::new();
            while pos < *e {
                let want = ((e - pos) as usize).min(CHUNK);
                let got = src
                    .fill(&mut buf[..want])
                    .with_context(|| format!("reading {} in {what}", image.display()))?;
                if got < want {
                    bail!(
                        "{}: the image ends at byte {}, inside {what}: truncated image?",
                        image.display(),
                        pos + got as u64
                    );
                }
                h.update(&buf[..got]);
                put(pos, &buf[..got], &mut head, &mut head_used)?;
                pos += got as u64;
                out.bytes += got as u64;
                step.position(out.bytes);
            }
            let actual = hex::encode(h.finalize());
            if Some(&actual) != sha.as_ref() {
                bail!("{what}: sha256 {actual} does not match the bmap's: the image or its bmap is corrupt (nothing before byte {HEAD} was written, so the target does not look bootable)");
            }
            out.pieces.push((*a, *e, actual));
        }
        // The rest of the stream is not needed, but a truncated or corrupt tail is still an
        // error worth naming for .xz (its check covers the whole stream).
        if let Source::Xz(_) = src {
            let rest = src
                .skip(u64::MAX, &mut scratch)
                .with_context(|| format!("reading the end of {}", image.display()))?;
            pos += rest;
        } else {
            pos = b.image_size.max(pos);
        }
        if pos != b.image_size {
            bail!(
                "{} is {pos} bytes but its bmap says {}: wrong bmap, or a truncated image",
                image.display(),
                b.image_size
            );
        }
        out.image_size = b.image_size;
    } else {
        loop {
            crate::interrupt::check()?;
            let start = pos;
            let mut h = Sha256::new();
            let mut done = false;
            while pos < start + PIECE {
                let got = src
                    .fill(&mut buf)
                    .with_context(|| format!("reading {} at byte {pos}", image.display()))?;
                h.update(&buf[..got]);
                put(pos, &buf[..got], &mut head, &mut head_used)?;
                pos += got as u64;
                out.bytes += got as u64;
                step.position(out.bytes);
                if got < buf.len() {
                    done = true;
                    break;
                }
            }
            if pos > start {
                out.pieces.push((start, pos, hex::encode(h.finalize())));
            }
            if done {
                break;
            }
        }
        out.image_size = pos;
    }
    target.sync_all().context("syncing the target")?;
    if head_used {
        let n = out.image_size.min(HEAD) as usize;
        // Only the mapped parts of the first MiB: unmapped bytes there stay as they were.
        for (a, e, _) in &out.pieces {
            if *a >= HEAD {
                break;
            }
            let (a, e) = (*a as usize, (*e as usize).min(n));
            target
                .write_all_at(&head[a..e], a as u64)
                .context("writing the first MiB")?;
        }
        target.sync_all().context("syncing the target")?;
    }
    Ok(out)
}

/// Reads back every written piece from `target` and compares its sha256.
pub fn verify(target: &File, written: &Written, step: &mut Step) -> Result<()> {
    // Drop cached pages so the read comes from the device, not from memory.
    let _ = rustix::fs::fadvise(target, 0, None, rustix::fs::Advice::DontNeed);
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0;
    for (a, e, sha) in &written.pieces {
        crate::interrupt::check()?;
        let mut h = Sha256::new();
        let mut off = *a;
        while off < *e {
            let n = ((e - off) as usize).min(CHUNK);
            target
                .read_exact_at(&mut buf[..n], off)
                .with_context(|| format!("reading back {n} bytes at byte {off}"))?;
            h.update(&buf[..n]);
            off += n as u64;
            done += n as u64;
            step.position(done);
        }
        if hex::encode(h.finalize()) != *sha {
            bail!("read-back of bytes {a}-{} differs from what was written: the target is failing or was changed meanwhile", e - 1);
        }
    }
    Ok(())
}

/// A block device, as sysfs describes it.
#[derive(Debug, Clone)]
pub struct Device {
    pub name: String,
    pub size: u64,
    pub model: String,
    pub removable: bool,
    pub partitions: Vec<String>,
    /// Mount points of the device or its partitions.
    pub mounts: Vec<String>,
    pub holds_root: bool,
}

fn read_sys(p: &Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Describes the whole-disk block device `path` (refuses partitions).
pub fn device(path: &Path) -> Result<Device> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    let rdev = meta.rdev();
    let (maj, min) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{maj}:{min}"))
        .with_context(|| format!("{} ({maj}:{min}) is not in /sys/dev/block", path.display()))?;
    let name = sys
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if sys.join("partition").exists() {
        let disk = sys
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        bail!(
            "{} is a partition ({name}); flash the whole device, /dev/{disk}",
            path.display()
        );
    }
    let mut devs = vec![format!("{maj}:{min}")];
    let mut partitions = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&sys) {
        for e in rd.flatten() {
            if e.path().join("partition").exists() {
                partitions.push(e.file_name().to_string_lossy().into_owned());
                devs.push(read_sys(&e.path().join("dev")));
            }
        }
    }
    partitions.sort();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounts: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 4 && devs.iter().any(|d| d == f[2])).then(|| f[4].to_owned())
        })
        .collect();
    let root = std::fs::metadata("/").map(|m| m.dev()).unwrap_or(0);
    let root = format!("{}:{}", rustix::fs::major(root), rustix::fs::minor(root));
    let holds_root = devs.contains(&root) || mounts.iter().any(|m| m == "/");
    let sectors: u64 = read_sys(&sys.join("size")).parse().unwrap_or(0);
    Ok(Device {
        size: sectors * 512,
        model: [
            read_sys(&sys.join("device/vendor")),
            read_sys(&sys.join("device/model")),
        ]
        .join(" ")
        .trim()
        .to_owned(),
        // The kernel's flag, or a USB-attached disk, or an SD card in a built-in slot (which
        // the mmc driver reports as not removable).
        removable: read_sys(&sys.join("removable")) == "1"
            || sys.to_string_lossy().contains("/usb")
            || read_sys(&sys.join("device/type")) == "SD",
        partitions,
        mounts,
        holds_root,
        name,
    })
}

/// Why `dev` must not be written, if it must not.
pub fn refuse(dev: &Device, path: &Path, image_size: u64, force: bool) -> Option<String> {
    let p = path.display();
    if dev.holds_root {
        return Some(format!(
            "{p} holds the running system's root filesystem: refusing to overwrite it"
        ));
    }
    if !dev.mounts.is_empty() {
        return Some(format!(
            "{p} is mounted (at {}): unmount it first",
            dev.mounts.join(", ")
        ));
    }
    if dev.size < image_size {
        return Some(format!(
            "{p} holds {} bytes, less than the image's {image_size}",
            dev.size
        ));
    }
    if !dev.removable && !force {
        return Some(format!(
            "{p} ({}) is not a removable device (an internal disk?): pass --force if you are sure",
            if dev.model.is_empty() {
                "no model"
            } else {
                &dev.model
            }
        ));
    }
    None
}

fn human(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// `picoimg flash`.
pub fn flash(o: &FlashOptions) -> Result<()> {
    if !o.image.is_file() {
        bail!("image {} does not exist", o.image.display());
    }
    let bmap_path = if o.no_bmap {
        None
    } else {
        o.bmap.clone().or_else(|| find_bmap(&o.image))
    };
    let bmap = match &bmap_path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading block map {}", p.display()))?;
            Some(parse_bmap(&text).with_context(|| format!("block map {}", p.display()))?)
        }
        None => None,
    };
    let cluster = match &o.cluster {
        Some(c) => Some(crate::cluster::load(c)?),
        None if o.node.is_some() => bail!("--node needs --cluster (the file that lists the node)"),
        None => None,
    };
    if let (Some(n), Some((_, c)), Some(path)) = (&o.node, &cluster, &o.cluster) {
        crate::personalise::check_node(c, path, n)?;
    }
    let meta = std::fs::metadata(&o.target);
    let is_block = meta.as_ref().is_ok_and(|m| m.file_type().is_block_device());
    // The size to check the target against: the map's, or a raw image's own (an .xz without a
    // map tells its size only once decompressed).
    let image_size = bmap.as_ref().map(|b| b.image_size).or_else(|| {
        (o.image.extension().is_none_or(|e| e != "xz"))
            .then(|| std::fs::metadata(&o.image).map(|m| m.len()).ok())
            .flatten()
    });
    if is_block {
        let dev = device(&o.target)?;
        if let Some(why) = refuse(&dev, &o.target, image_size.unwrap_or(0), o.force) {
            bail!("{why}");
        }
        let msg = format!(
            "{}: {}, {}{}, partitions: {}",
            o.target.display(),
            if dev.model.is_empty() {
                "unknown model"
            } else {
                &dev.model
            },
            human(dev.size),
            if dev.removable { ", removable" } else { "" },
            if dev.partitions.is_empty() {
                "none".to_owned()
            } else {
                dev.partitions.join(" ")
            }
        );
        log(&msg);
        if !o.yes {
            confirm(&format!(
                "write {} to {}, destroying everything on it? [y/N] ",
                o.image.display(),
                o.target.display()
            ))?;
        }
    } else if meta.as_ref().is_ok_and(|m| !m.is_file()) {
        bail!(
            "{} is neither a block device nor a regular file",
            o.target.display()
        );
    }
    let target = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(!is_block)
        .truncate(false)
        .open(&o.target)
        .with_context(|| format!("opening {} for writing", o.target.display()))?;
    if !is_block {
        // A file target is the image: old contents go, unmapped blocks are holes.
        target.set_len(0)?;
        if let Some(s) = image_size {
            target.set_len(s)?;
        }
    }
    let total = bmap.as_ref().map_or(0, Bmap::mapped_bytes);
    log(match &bmap_path {
        Some(p) => format!(
            "block map {}: {} of {} mapped",
            p.display(),
            human(total),
            human(image_size.unwrap_or(0))
        ),
        None => "no block map: writing the whole image".to_owned(),
    });
    let started = std::time::Instant::now();
    let mut step = Step::bytes(format!("writing {}", o.target.display()), total);
    let written = write_image(&o.image, &target, bmap.as_ref(), &mut step)?;
    if !is_block {
        target.set_len(written.image_size)?;
        target.sync_all()?;
    }
    step.done();
    log(format!(
        "wrote {} bytes in {:.1}s",
        written.bytes,
        started.elapsed().as_secs_f64()
    ));
    if o.verify {
        let mut step = Step::bytes("verifying by reading back", written.bytes);
        verify(&target, &written, &mut step)?;
        step.done();
    }
    drop(target);
    if let Some((text, _)) = &cluster {
        if is_block {
            // Let the kernel see the new partitions (best effort: personalising reads the
            // table itself).
            let _ = crate::cmd::Cmd::new("blockdev")
                .arg("--rereadpt")
                .arg(&o.target)
                .run();
        }
        crate::personalise::put_cluster(&o.target, text, o.node.as_deref())?;
        log("wrote picoimg/cluster.toml to the boot partition");
    }
    log(format!("{} is ready", o.target.display()));
    Ok(())
}

fn confirm(question: &str) -> Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        bail!("not asking on a non-terminal: pass --yes to confirm the write");
    }
    eprint!("{question}");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        bail!("not confirmed; nothing written");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_our_bmap_and_checks_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(64 * 4096).unwrap();
        f.write_all_at(&[7u8; 5000], 8192).unwrap();
        drop(f);
        let xml = crate::bmap::create(&p).unwrap();
        let b = parse_bmap(&xml).unwrap();
        assert_eq!(b.image_size, 64 * 4096);
        assert_eq!(b.ranges.len(), 1);
        assert_eq!((b.ranges[0].0, b.ranges[0].1), (8192, 16384));
        let tampered = xml.replacen("<Range chksum=\"", "<Range chksum=\"0", 1);
        assert!(format!("{:#}", parse_bmap(&tampered).unwrap_err()).contains("own checksum"));
    }

    #[test]
    fn head_is_written_last_and_only_mapped_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("x.img");
        let f = File::create(&img).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"MBR!", 0).unwrap();
        f.write_all_at(&[9u8; 4096], 3 << 20).unwrap();
        drop(f);
        let b = parse_bmap(&crate::bmap::create(&img).unwrap()).unwrap();
        let out = dir.path().join("t.img");
        let t = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&out)
            .unwrap();
        t.set_len(8 << 20).unwrap();
        let mut step = Step::bytes("test", b.mapped_bytes());
        let w = write_image(&img, &t, Some(&b), &mut step).unwrap();
        assert_eq!(w.bytes, b.mapped_bytes());
        verify(&t, &w, &mut step).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    }
}
