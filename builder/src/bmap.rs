//! Block maps in bmaptool's format 2.0: which 4 KiB blocks of the image hold data, with a
//! sha256 per range, so flashing skips the empty space and verifies what it writes.
//!
//! Mapped ranges come from the image file's own allocation (SEEK_DATA / SEEK_HOLE), the same
//! source `bmaptool create` uses.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context, Result};
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
}
