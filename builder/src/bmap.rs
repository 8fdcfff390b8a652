//! Block maps in bmaptool's format 2.0: which 4 KiB blocks of the image hold data, with a
//! sha256 per range, so flashing skips the empty space and verifies what it writes.
//!
//! Mapped ranges come from the image file's own allocation (SEEK_DATA / SEEK_HOLE), the same
//! source `bmaptool create` uses.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub const BLOCK: u64 = 4096;

/// Inclusive block ranges that hold data.
pub fn mapped_ranges(path: &Path) -> Result<Vec<(u64, u64)>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata()?.len();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match rustix::fs::seek(file.as_fd(), rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e).context("seeking to data"),
        };
        let hole = rustix::fs::seek(file.as_fd(), rustix::fs::SeekFrom::Hole(data))
            .context("seeking to hole")?;
        let first = data / BLOCK;
        let last = (hole.min(size) - 1) / BLOCK;
        match ranges.last_mut() {
            Some(r) if r.1 + 1 >= first => r.1 = r.1.max(last),
            _ => ranges.push((first, last)),
        }
        pos = hole;
    }
    Ok(ranges)
}

/// Writes the bmap XML for `image`.
pub fn create(image: &Path) -> Result<String> {
    let ranges = mapped_ranges(image)?;
    let size = std::fs::metadata(image)?.len();
    let blocks = size.div_ceil(BLOCK);
    let mapped: u64 = ranges.iter().map(|(a, b)| b - a + 1).sum();
    let mut file = File::open(image)?;
    let mut body = String::new();
    let mut buf = vec![0u8; 1 << 20];
    for (first, last) in &ranges {
        crate::interrupt::check()?;
        let start = first * BLOCK;
        let end = ((last + 1) * BLOCK).min(size);
        file.seek(SeekFrom::Start(start))?;
        let mut h = Sha256::new();
        let mut left = end - start;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..n])
                .with_context(|| format!("reading {}", image.display()))?;
            h.update(&buf[..n]);
            left -= n as u64;
        }
        let span = if first == last {
            format!("{first}")
        } else {
            format!("{first}-{last}")
        };
        body.push_str(&format!(
            "        <Range chksum=\"{}\"> {span} </Range>\n",
            hex::encode(h.finalize())
        ));
    }
    let pct = if blocks > 0 {
        mapped as f64 * 100.0 / blocks as f64
    } else {
        0.0
    };
    let zero = "0".repeat(64);
    let xml = format!(
        r#"<?xml version="1.0" ?>
<!-- Block map of an image file made by picoimg: the blocks that hold data (partition table,
     filesystem metadata, files). Only these need to be written to the target device. -->
<bmap version="2.0">
    <!-- Image size in bytes: {size} -->
    <ImageSize> {size} </ImageSize>

    <!-- Size of a block in bytes -->
    <BlockSize> {BLOCK} </BlockSize>

    <!-- Count of blocks in the image file -->
    <BlocksCount> {blocks} </BlocksCount>

    <!-- Count of mapped blocks: {mib:.1} MiB or {pct:.1}% -->
    <MappedBlocksCount> {mapped} </MappedBlocksCount>

    <!-- Type of checksum used in this file -->
    <ChecksumType> sha256 </ChecksumType>

    <!-- The checksum of this bmap file, computed with this field set to zeroes -->
    <BmapFileChecksum> {zero} </BmapFileChecksum>

    <!-- The block map: ranges of mapped blocks with the sha256 of each range -->
    <BlockMap>
{body}    </BlockMap>
</bmap>
"#,
        mib = (mapped * BLOCK) as f64 / (1024.0 * 1024.0),
    );
    let sum = hex::encode(Sha256::digest(xml.as_bytes()));
    Ok(xml.replacen(&zero, &sum, 1))
}

/// A block map as read: image size and the byte ranges that hold data, each with its sha256.
#[derive(Debug, Clone, PartialEq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    /// (start byte, end byte exclusive, sha256 hex), sorted, not overlapping, not empty.
    pub ranges: Vec<(u64, u64, String)>,
}

impl Bmap {
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|(a, b, _)| b - a).sum()
    }
}

fn child_text<'a>(root: roxmltree::Node<'a, 'a>, name: &str) -> Result<&'a str> {
    let mut found = root.children().filter(|n| n.has_tag_name(name));
    let node = found
        .next()
        .with_context(|| format!("no <{name}> element"))?;
    if found.next().is_some() {
        bail!("more than one <{name}> element");
    }
    Ok(node.text().unwrap_or("").trim())
}

fn number(root: roxmltree::Node<'_, '_>, name: &str) -> Result<u64> {
    let t = child_text(root, name)?;
    t.parse()
        .with_context(|| format!("<{name}> \"{t}\" is not a whole number"))
}

fn block_number(s: &str, what: &str) -> Result<u64> {
    s.trim()
        .parse()
        .with_context(|| format!("<Range> {what} \"{}\" is not a block number", s.trim()))
}

/// Reads a block map in bmaptool's format 2.x (sha256), at least as strictly as bmaptool:
/// its own checksum (required), block size a power of two, every range inside `BlocksCount`,
/// sorted and disjoint, `BlocksCount` consistent with `ImageSize`, `MappedBlocksCount` equal
/// to the ranges' sum, at least one range, checked arithmetic throughout.
pub fn parse(xml: &str) -> Result<Bmap> {
    let doc = roxmltree::Document::parse(xml).context("not well-formed XML")?;
    let root = doc.root_element();
    if !root.has_tag_name("bmap") {
        bail!(
            "the root element is <{}>, not <bmap>",
            root.tag_name().name()
        );
    }
    let version = root
        .attribute("version")
        .context("<bmap> has no version attribute")?;
    if !version.starts_with("2.") {
        bail!("bmap format {version} is not supported (2.x with sha256 is); regenerate it with `bmaptool create`");
    }
    let kind = child_text(root, "ChecksumType")?;
    if kind != "sha256" {
        bail!("bmap checksum type `{kind}` is not supported (sha256 is)");
    }
    let sum = child_text(root, "BmapFileChecksum")
        .context("format 2 requires the bmap's own checksum")?;
    if sum.len() != 64 || !sum.bytes().all(|c| c.is_ascii_hexdigit()) {
        bail!("<BmapFileChecksum> \"{sum}\" is not a sha256 (64 hex digits)");
    }
    let zeroed = xml.replacen(sum, &"0".repeat(sum.len()), 1);
    if hex::encode(Sha256::digest(zeroed.as_bytes())) != sum.to_ascii_lowercase() {
        bail!("the bmap's own checksum does not match: the file is damaged or was edited");
    }
    let image_size = number(root, "ImageSize")?;
    let block_size = number(root, "BlockSize")?;
    if !block_size.is_power_of_two() {
        bail!("<BlockSize> {block_size} is not a positive power of two");
    }
    let blocks = number(root, "BlocksCount")?;
    if blocks != image_size.div_ceil(block_size) {
        bail!(
            "<BlocksCount> {blocks} does not match <ImageSize> {image_size} / <BlockSize> {block_size} (= {})",
            image_size.div_ceil(block_size)
        );
    }
    let mapped = number(root, "MappedBlocksCount")?;
    let map = root
        .children()
        .find(|n| n.has_tag_name("BlockMap"))
        .context("no <BlockMap> element")?;
    let mut ranges: Vec<(u64, u64, String)> = Vec::new();
    let mut sum_blocks: u64 = 0;
    let mut next_free: u64 = 0;
    for r in map.children().filter(|n| n.is_element()) {
        if !r.has_tag_name("Range") {
            bail!("<BlockMap> holds a <{}>, not <Range>", r.tag_name().name());
        }
        let body = r.text().unwrap_or("").trim();
        let sha = r
            .attribute("chksum")
            .with_context(|| format!("<Range> {body} has no chksum"))?;
        if sha.len() != 64 || !sha.bytes().all(|c| c.is_ascii_hexdigit()) {
            bail!("<Range> {body}: chksum \"{sha}\" is not a sha256 (64 hex digits)");
        }
        let (a, b) = match body.split_once('-') {
            Some((a, b)) => (block_number(a, "start")?, block_number(b, "end")?),
            None => {
                let a = block_number(body, "block")?;
                (a, a)
            }
        };
        if b < a {
            bail!("<Range> {body} runs backwards");
        }
        if b >= blocks {
            bail!("<Range> {body} goes past <BlocksCount> {blocks}");
        }
        if a < next_free {
            bail!("<Range> {body} overlaps or precedes the range before it");
        }
        next_free = b + 1;
        sum_blocks = sum_blocks
            .checked_add(b - a + 1)
            .context("mapped block count overflows")?;
        // In range: b < blocks = ceil(image_size / block_size), so (b + 1) * block_size fits
        // in image_size + block_size.
        let start = a.checked_mul(block_size).context("range start overflows")?;
        let end = (b + 1)
            .checked_mul(block_size)
            .context("range end overflows")?
            .min(image_size);
        ranges.push((start, end, sha.to_ascii_lowercase()));
    }
    if sum_blocks != mapped {
        bail!(
            "<MappedBlocksCount> {mapped} does not match the ranges, which map {sum_blocks} blocks"
        );
    }
    if ranges.is_empty() {
        bail!("the block map maps no blocks: nothing would be written (an empty or damaged bmap)");
    }
    Ok(Bmap {
        image_size,
        block_size,
        ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sparse_file_maps_only_data() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("img");
        let mut f = File::create(&p)?;
        f.set_len(64 * BLOCK)?;
        f.write_all(&[1u8; 10])?;
        f.seek(SeekFrom::Start(40 * BLOCK))?;
        f.write_all(&[2u8; 2 * BLOCK as usize])?;
        drop(f);
        let r = mapped_ranges(&p)?;
        assert_eq!(r.first().map(|x| x.0), Some(0));
        assert!(r.iter().any(|&(a, b)| a <= 40 && b >= 41), "{r:?}");
        let xml = create(&p)?;
        assert!(xml.contains("<ImageSize> 262144 </ImageSize>"));
        assert!(!xml.contains(&"0".repeat(64)));
        Ok(())
    }

    fn sample() -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("img");
        let mut f = File::create(&p).expect("create");
        f.set_len(64 * BLOCK).expect("size");
        f.write_all(&[1u8; 10]).expect("write");
        f.seek(SeekFrom::Start(40 * BLOCK)).expect("seek");
        f.write_all(&[2u8; 2 * BLOCK as usize]).expect("write");
        create(&p).expect("bmap")
    }

    #[test]
    fn our_bmap_reads_back() {
        let b = parse(&sample()).expect("parses");
        assert_eq!(b.image_size, 64 * BLOCK);
        assert_eq!(b.ranges[0].0, 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// No input makes the reader panic or overflow: random text, and a valid map with
        /// characters changed (digits most often, to reach the arithmetic).
        #[test]
        fn reader_never_panics_on_random_text(s in "\\PC{0,600}") {
            let _ = parse(&s);
        }

        #[test]
        fn reader_never_panics_on_mutated_maps(
            edits in proptest::collection::vec(
                (0usize..10_000, proptest::prop_oneof![
                    proptest::char::range('0', '9'),
                    proptest::char::any(),
                ]),
                1..6,
            ),
            big in proptest::option::of(proptest::num::u64::ANY),
            resign in proptest::bool::ANY,
        ) {
            let mut chars: Vec<char> = sample().chars().collect();
            for (at, c) in edits {
                let i = at % chars.len();
                chars[i] = c;
            }
            let mut text: String = chars.into_iter().collect();
            if let Some(n) = big {
                text = text.replacen("<BlockSize> 4096 ", &format!("<BlockSize> {n} "), 1);
            }
            // Half the time the map is signed again, so the checks behind its checksum run.
            if resign {
                if let Some(sum) = text
                    .split("<BmapFileChecksum> ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .map(str::to_owned)
                {
                    let zeroed = text.replacen(&sum, &"0".repeat(sum.len()), 1);
                    let fresh = hex::encode(Sha256::digest(zeroed.as_bytes()));
                    text = zeroed.replacen(&"0".repeat(sum.len()), &fresh, 1);
                }
            }
            let _ = parse(&text);
        }
    }
}
