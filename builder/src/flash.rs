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

use crate::bmap::Bmap;
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
    /// An `.xz` read as one stream (a file whose blocks are too big to hold in memory).
    Xz(Box<xz2::read::XzDecoder<BufReader<File>>>),
    /// An `.xz` whose blocks are decoded in parallel, only those that are wanted.
    Blocks(BlockReader),
}

/// Largest `.xz` block decoded whole in memory (picoimg writes 8 MiB, xz -T 24 MiB at -6).
const MAX_BLOCK: u64 = 128 << 20;

impl Source {
    /// Opens the image; for an `.xz` in blocks, decoding starts at once on every core for the
    /// blocks that hold bytes of `wanted` (all blocks with `None`).
    fn open(image: &Path, wanted: Option<&[(u64, u64)]>) -> Result<Source> {
        let f = File::open(image).with_context(|| format!("opening {}", image.display()))?;
        if !is_xz(image) {
            return Ok(Source::Raw(f));
        }
        let len = f.metadata()?.len();
        let (blocks, total) = crate::xz::blocks(&mut &f, len)
            .with_context(|| format!("image {}", image.display()))?;
        if blocks.iter().all(|b| b.size <= MAX_BLOCK) {
            return Ok(Source::Blocks(BlockReader::new(f, blocks, total, wanted)));
        }
        Ok(Source::Xz(Box::new(
            xz2::read::XzDecoder::new_multi_decoder(BufReader::with_capacity(CHUNK, f)),
        )))
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::Raw(f) => f.read(buf),
            Source::Xz(d) => d.read(buf),
            Source::Blocks(b) => b.read(buf),
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
            Source::Blocks(b) => Ok(b.skip(n)),
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

/// The decompressed image of an `.xz` in blocks: the wanted blocks are decoded ahead on every
/// core (in order, a few at a time); reading skips over the others without decoding them.
struct BlockReader {
    blocks: Vec<crate::xz::Block>,
    /// Index into `blocks` of each decoded block, in order.
    scheduled: Vec<usize>,
    decoded: crate::pool::Ordered<Vec<u8>>,
    /// The decoded block being read: (index into `blocks`, its bytes).
    current: Option<(usize, Vec<u8>)>,
    /// How many of `scheduled` were taken from `decoded`.
    taken: usize,
    pos: u64,
    total: u64,
}

impl BlockReader {
    fn new(
        file: File,
        blocks: Vec<crate::xz::Block>,
        total: u64,
        wanted: Option<&[(u64, u64)]>,
    ) -> BlockReader {
        let scheduled: Vec<usize> = blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| {
                b.size > 0
                    && wanted.is_none_or(|w| {
                        w.iter().any(|(a, e)| *a < b.start + b.size && b.start < *e)
                    })
            })
            .map(|(i, _)| i)
            .collect();
        let file = std::sync::Arc::new(file);
        let jobs: Vec<crate::xz::Block> = scheduled.iter().map(|i| blocks[*i]).collect();
        let threads = crate::pool::threads();
        let decoded = crate::pool::ordered(jobs.len(), threads, threads * 2, move |j| {
            let b = &jobs[j];
            let mut bytes = vec![0u8; b.padded() as usize];
            file.read_exact_at(&mut bytes, b.offset)
                .with_context(|| format!("reading the .xz block at byte {}", b.offset))?;
            crate::xz::decode_block(b, &bytes)
        });
        BlockReader {
            blocks,
            scheduled,
            decoded,
            current: None,
            taken: 0,
            pos: 0,
            total,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.total || buf.is_empty() {
            return Ok(0);
        }
        let i = self
            .blocks
            .partition_point(|b| b.start + b.size <= self.pos);
        let b = self.blocks[i];
        if self.current.as_ref().is_none_or(|(c, _)| *c != i) {
            // Decoded blocks before this one were skipped over: drop them unread.
            loop {
                let Some(&next) = self.scheduled.get(self.taken) else {
                    return Err(std::io::Error::other(format!(
                        "image bytes {}.. were not scheduled for decoding",
                        self.pos
                    )));
                };
                if next > i {
                    return Err(std::io::Error::other(format!(
                        "image bytes {}.. were not scheduled for decoding",
                        self.pos
                    )));
                }
                let data = match self.decoded.next() {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => return Err(std::io::Error::other(format!("{e:#}"))),
                    None => return Err(std::io::Error::other("the decoder stopped early")),
                };
                self.taken += 1;
                if next == i {
                    self.current = Some((i, data));
                    break;
                }
            }
        }
        let (_, data) = self.current.as_ref().expect("current block");
        let at = (self.pos - b.start) as usize;
        let n = buf.len().min(data.len() - at);
        buf[..n].copy_from_slice(&data[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }

    fn skip(&mut self, n: u64) -> u64 {
        let to = self.pos.saturating_add(n).min(self.total);
        let moved = to - self.pos;
        self.pos = to;
        moved
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
    let wanted: Option<Vec<(u64, u64)>> =
        bmap.map(|b| b.ranges.iter().map(|(a, e, _)| (*a, *e)).collect());
    let mut src = Source::open(image, wanted.as_deref())?;
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
    /// For a loop device: the file behind it.
    pub backing_file: Option<PathBuf>,
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
        backing_file: Some(read_sys(&sys.join("loop/backing_file")))
            .filter(|b| !b.is_empty())
            .map(PathBuf::from),
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

/// The image and its block map, checked as far as they can be before the target is touched:
/// the image a regular file whose size (an .xz's from its index) is the map's, the map strict.
struct Inputs {
    meta: std::fs::Metadata,
    bmap_path: Option<PathBuf>,
    bmap: Option<Bmap>,
    bmap_meta: Option<std::fs::Metadata>,
    image_size: u64,
}

fn check_inputs(o: &FlashOptions) -> Result<Inputs> {
    let meta =
        std::fs::metadata(&o.image).with_context(|| format!("image {}", o.image.display()))?;
    if !meta.is_file() {
        bail!(
            "image {} is {}, not an image file",
            o.image.display(),
            picoimg_firstboot::input::kind_of(&meta)
        );
    }
    let image_size = if is_xz(&o.image) {
        let mut f =
            File::open(&o.image).with_context(|| format!("opening {}", o.image.display()))?;
        crate::xz::uncompressed_size(&mut f, meta.len())
            .with_context(|| format!("image {}", o.image.display()))?
    } else {
        meta.len()
    };
    let bmap_path = if o.no_bmap {
        None
    } else {
        o.bmap.clone().or_else(|| find_bmap(&o.image))
    };
    let (bmap, bmap_meta) = match &bmap_path {
        Some(p) => {
            let text = picoimg_firstboot::input::read_text(
                p,
                picoimg_firstboot::input::BMAP_LIMIT,
                "block map",
            )?;
            let b =
                crate::bmap::parse(&text).with_context(|| format!("block map {}", p.display()))?;
            if b.image_size != image_size {
                bail!(
                    "{} holds {image_size} bytes of image but its block map {} says {}: a truncated image, or the map of another image",
                    o.image.display(),
                    p.display(),
                    b.image_size
                );
            }
            (Some(b), std::fs::metadata(p).ok())
        }
        None => (None, None),
    };
    Ok(Inputs {
        meta,
        bmap_path,
        bmap,
        bmap_meta,
        image_size,
    })
}

fn is_xz(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "xz")
}

fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Where the image goes.
enum Target {
    /// A whole block device, written in place.
    Device,
    /// A regular file, written beside it and renamed over it (the real path, symlinks followed).
    File(PathBuf),
}

fn classify_target(o: &FlashOptions, inputs: &Inputs) -> Result<Target> {
    let t = &o.target;
    let meta = match std::fs::metadata(t) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let abs = std::path::absolute(t).unwrap_or_else(|_| t.clone());
            let parent = abs
                .parent()
                .map(|p| p.canonicalize().unwrap_or(p.to_owned()));
            if abs.starts_with("/dev") || parent.as_deref().is_some_and(|p| p.starts_with("/dev")) {
                bail!(
                    "{} does not exist: no such device (`lsblk` lists the disks); picoimg creates files only outside /dev",
                    t.display()
                );
            }
            return Ok(Target::File(abs));
        }
        Err(e) => return Err(e).with_context(|| format!("{}", t.display())),
    };
    let itself = |m: &std::fs::Metadata| {
        same_file(m, &inputs.meta) || inputs.bmap_meta.as_ref().is_some_and(|b| same_file(m, b))
    };
    if itself(&meta) {
        bail!(
            "{} is the image (or its block map) itself: writing it would destroy it; give another target",
            t.display()
        );
    }
    if meta.file_type().is_block_device() {
        let dev = device(t)?;
        if let Some(backing) = &dev.backing_file {
            if std::fs::metadata(backing).is_ok_and(|m| itself(&m)) {
                bail!(
                    "{} is a loop device backed by the image itself ({}): writing it would destroy the image",
                    t.display(),
                    backing.display()
                );
            }
        }
        if let Some(why) = refuse(&dev, t, inputs.image_size, o.force) {
            bail!("{why}");
        }
        let msg = format!(
            "{}: {}, {}{}, partitions: {}",
            t.display(),
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
                t.display()
            ))?;
        }
        return Ok(Target::Device);
    }
    if !meta.is_file() {
        bail!(
            "{} is {}: give a whole block device or a regular file",
            t.display(),
            picoimg_firstboot::input::kind_of(&meta)
        );
    }
    if meta.len() > 0 && !o.force {
        bail!(
            "{} exists and holds {} bytes: pass --force to replace it (it is replaced only once the new image is completely written)",
            t.display(),
            meta.len()
        );
    }
    Ok(Target::File(
        t.canonicalize()
            .with_context(|| format!("{}", t.display()))?,
    ))
}

/// `picoimg flash`.
pub fn flash(o: &FlashOptions) -> Result<()> {
    let inputs = check_inputs(o)?;
    let cluster = match &o.cluster {
        Some(c) => Some(crate::cluster::load(c)?),
        None if o.node.is_some() => bail!("--node needs --cluster (the file that lists the node)"),
        None => None,
    };
    if let (Some(n), Some((_, c)), Some(path)) = (&o.node, &cluster, &o.cluster) {
        crate::personalise::check_node(c, path, n)?;
    }
    let target_kind = classify_target(o, &inputs)?;
    let image_size = inputs.image_size;
    // A file target is written under a temporary name beside it and renamed into place when
    // complete: a failure or Ctrl-C leaves the old file (or nothing), never a partial image.
    let (target, tmp) = match &target_kind {
        Target::Device => (
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&o.target)
                .with_context(|| format!("opening {} for writing", o.target.display()))?,
            None,
        ),
        Target::File(path) => {
            let dir = path.parent().unwrap_or(Path::new("."));
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let tmp = tempfile::Builder::new()
                .prefix(&format!(".{name}.picoimg-"))
                .tempfile_in(dir)
                .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
            let f = tmp.as_file().try_clone()?;
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
            // Unmapped blocks stay holes.
            f.set_len(image_size)
                .with_context(|| format!("sizing {}", tmp.path().display()))?;
            (f, Some(tmp))
        }
    };
    let total = inputs.bmap.as_ref().map_or(image_size, Bmap::mapped_bytes);
    log(match &inputs.bmap_path {
        Some(p) => format!(
            "block map {}: {} of {} mapped",
            p.display(),
            human(total),
            human(image_size)
        ),
        None => format!(
            "no block map: writing the whole image ({})",
            human(image_size)
        ),
    });
    let started = std::time::Instant::now();
    let mut step = Step::bytes(format!("writing {}", o.target.display()), total);
    let written = write_image(&o.image, &target, inputs.bmap.as_ref(), &mut step)?;
    if written.image_size != image_size {
        bail!(
            "{} decoded to {} bytes, but its index says {image_size}: damaged image",
            o.image.display(),
            written.image_size
        );
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
    let written_to = tmp.as_ref().map_or(o.target.as_path(), |t| t.path());
    if let Some((text, _)) = &cluster {
        if tmp.is_none() {
            // Let the kernel see the new partitions (best effort: personalising reads the
            // table itself).
            let _ = crate::cmd::Cmd::new("blockdev")
                .arg("--rereadpt")
                .arg(&o.target)
                .run();
        }
        crate::personalise::put_cluster(written_to, text, o.node.as_deref())?;
        log("wrote picoimg/cluster.toml to the boot partition");
    }
    if let (Some(tmp), Target::File(path)) = (tmp, &target_kind) {
        crate::interrupt::check()?;
        tmp.as_file().sync_all()?;
        tmp.persist(path)
            .with_context(|| format!("renaming the written image to {}", path.display()))?;
        if let Some(dir) = path.parent() {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
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
        let b = crate::bmap::parse(&xml).unwrap();
        assert_eq!(b.image_size, 64 * 4096);
        assert_eq!(b.ranges.len(), 1);
        assert_eq!((b.ranges[0].0, b.ranges[0].1), (8192, 16384));
        let tampered = xml.replacen("<Range chksum=\"", "<Range chksum=\"0", 1);
        assert!(
            format!("{:#}", crate::bmap::parse(&tampered).unwrap_err()).contains("own checksum")
        );
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
        let b = crate::bmap::parse(&crate::bmap::create(&img).unwrap()).unwrap();
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

    /// The refusals, from device facts given as data: no test aims a write at a real disk.
    #[test]
    fn refuses_unsafe_devices_from_their_facts() {
        let card = Device {
            name: "mmcblk0".into(),
            size: 32 << 30,
            model: "SD card".into(),
            removable: true,
            partitions: vec!["mmcblk0p1".into()],
            mounts: vec![],
            holds_root: false,
            backing_file: None,
        };
        let p = Path::new("/dev/x");
        assert_eq!(refuse(&card, p, 2 << 30, false), None);
        let cases = [
            (
                Device {
                    holds_root: true,
                    removable: false,
                    ..card.clone()
                },
                true,
                "holds the running system's root filesystem",
            ),
            (
                Device {
                    mounts: vec!["/media/pi/bootfs".into()],
                    ..card.clone()
                },
                true,
                "is mounted (at /media/pi/bootfs)",
            ),
            (
                Device {
                    size: 1 << 30,
                    ..card.clone()
                },
                true,
                "less than the image",
            ),
            (
                Device {
                    removable: false,
                    ..card.clone()
                },
                false,
                "not a removable device",
            ),
        ];
        for (dev, force, message) in cases {
            let why = refuse(&dev, p, 2 << 30, force).expect("refused");
            assert!(why.contains(message), "{why}");
        }
    }
}
