//! Reading the partition table of an image file or a card, strictly: MBR or GPT (header and
//! entry CRCs), every partition inside the disk, checked arithmetic throughout. `personalise`,
//! `flash --cluster` and `run` use it before they touch or boot anything.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

pub const SECTOR: u64 = 512;
/// GPT entry tables larger than this are not plausible (the usual one is 128 x 128 bytes).
const MAX_GPT_ENTRIES_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Mbr,
    Gpt,
}

/// One partition: 1-based number, byte offset and size, and its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub number: usize,
    pub start: u64,
    pub size: u64,
    /// MBR type byte, or GPT type GUID (mixed-endian, as on disk).
    pub kind: PartKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKind {
    Mbr(u8),
    Gpt([u8; 16]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub kind: Kind,
    pub parts: Vec<Part>,
    /// Size of the disk or file the table was read from.
    pub disk_size: u64,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(x)
}

fn read_at<R: Read + Seek>(r: &mut R, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    r.seek(SeekFrom::Start(offset))?;
    r.read_exact(buf)
}

/// The size of a file or block device (seeking to its end works for both).
pub fn size_of(f: &mut std::fs::File) -> Result<u64> {
    let n = f.seek(SeekFrom::End(0)).context("finding the size")?;
    f.seek(SeekFrom::Start(0))?;
    Ok(n)
}

/// Reads the partition table of the file or device at `path`.
pub fn read_path(path: &Path) -> Result<Table> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = size_of(&mut f)?;
    read(&mut f, size).with_context(|| format!("{}", path.display()))
}

/// Reads and checks the partition table of a disk of `disk_size` bytes.
pub fn read<R: Read + Seek>(r: &mut R, disk_size: u64) -> Result<Table> {
    ensure!(
        disk_size >= SECTOR,
        "{disk_size} bytes: too small to hold a partition table"
    );
    let mut mbr = [0u8; 512];
    read_at(r, 0, &mut mbr).context("reading the first sector")?;
    if mbr[510..512] != [0x55, 0xaa] {
        bail!("no partition table (no MBR signature in the first sector): not a disk image?");
    }
    let sectors = disk_size / SECTOR;
    let entries: Vec<(usize, u8, u64, u64)> = (0..4)
        .map(|i| {
            let e = &mbr[446 + 16 * i..446 + 16 * (i + 1)];
            (
                i + 1,
                e[4],
                u64::from(u32_at(e, 8)),
                u64::from(u32_at(e, 12)),
            )
        })
        .filter(|(_, t, _, n)| *t != 0 && *n != 0)
        .collect();
    if entries.iter().any(|(_, t, _, _)| *t == 0xee) {
        return read_gpt(r, disk_size);
    }
    if entries.is_empty() {
        bail!("the MBR lists no partitions");
    }
    let mut parts = Vec::new();
    for (number, t, start, count) in entries {
        ensure!(start > 0, "MBR partition {number} starts at sector 0");
        let end = start
            .checked_add(count)
            .context("partition end overflows")?;
        ensure!(
            end <= sectors,
            "MBR partition {number} (sectors {start}-{}) runs past the end of the disk ({sectors} sectors, {disk_size} bytes): truncated image?",
            end - 1
        );
        parts.push(Part {
            number,
            start: start * SECTOR,
            size: count * SECTOR,
            kind: PartKind::Mbr(t),
        });
    }
    check_overlaps(&parts)?;
    Ok(Table {
        kind: Kind::Mbr,
        parts,
        disk_size,
    })
}

fn check_overlaps(parts: &[Part]) -> Result<()> {
    for (i, a) in parts.iter().enumerate() {
        for b in &parts[i + 1..] {
            // Ends cannot overflow: both were checked against the disk size.
            if a.start < b.start + b.size && b.start < a.start + a.size {
                bail!("partitions {} and {} overlap", a.number, b.number);
            }
        }
    }
    Ok(())
}

fn read_gpt<R: Read + Seek>(r: &mut R, disk_size: u64) -> Result<Table> {
    let sectors = disk_size / SECTOR;
    ensure!(
        sectors >= 34,
        "protective MBR, but the disk is too small for a GPT"
    );
    let mut hdr = [0u8; 512];
    read_at(r, SECTOR, &mut hdr).context("reading the GPT header")?;
    ensure!(
        &hdr[..8] == b"EFI PART",
        "protective MBR but no GPT header at sector 1"
    );
    let hsize = u32_at(&hdr, 12) as usize;
    ensure!(
        (92..=512).contains(&hsize),
        "GPT header size {hsize} is not between 92 and 512"
    );
    let mut h = hdr[..hsize].to_vec();
    h[16..20].fill(0);
    ensure!(
        crc32fast::hash(&h) == u32_at(&hdr, 16),
        "the GPT header's CRC does not match: damaged or truncated image"
    );
    let (current, backup) = (u64_at(&hdr, 24), u64_at(&hdr, 32));
    let (first_usable, last_usable) = (u64_at(&hdr, 40), u64_at(&hdr, 48));
    let (entries_lba, count, esize) = (u64_at(&hdr, 72), u32_at(&hdr, 80), u32_at(&hdr, 84));
    ensure!(
        current == 1,
        "the GPT header says it is at sector {current}, not 1"
    );
    ensure!(
        backup < sectors,
        "the GPT's backup header is at sector {backup}, past the end of the disk ({sectors} sectors, {disk_size} bytes): truncated image?"
    );
    ensure!(
        first_usable <= last_usable && last_usable < sectors,
        "the GPT's usable sectors {first_usable}-{last_usable} do not fit a disk of {sectors} sectors: truncated image?"
    );
    ensure!(
        esize >= 128 && esize.is_power_of_two(),
        "GPT entry size {esize} is not 128 or a larger power of two"
    );
    let table_bytes = u64::from(count) * u64::from(esize);
    ensure!(
        table_bytes <= MAX_GPT_ENTRIES_BYTES,
        "GPT entry table of {count} x {esize} bytes is implausibly large"
    );
    let table_start = entries_lba
        .checked_mul(SECTOR)
        .filter(|_| entries_lba >= 2)
        .context("GPT entry table position is out of range")?;
    ensure!(
        table_start
            .checked_add(table_bytes)
            .is_some_and(|e| e <= disk_size),
        "the GPT entry table (sector {entries_lba}) runs past the end of the disk: truncated image?"
    );
    let mut table = vec![0u8; table_bytes as usize];
    read_at(r, table_start, &mut table).context("reading the GPT entries")?;
    ensure!(
        crc32fast::hash(&table) == u32_at(&hdr, 88),
        "the GPT entries' CRC does not match: damaged image"
    );
    let mut parts = Vec::new();
    for (i, e) in table.chunks_exact(esize as usize).enumerate() {
        if e[..16].iter().all(|b| *b == 0) {
            continue;
        }
        let number = i + 1;
        let (first, last) = (u64_at(e, 32), u64_at(e, 40));
        ensure!(
            first <= last && first >= first_usable && last <= last_usable,
            "GPT partition {number} (sectors {first}-{last}) is outside the usable sectors {first_usable}-{last_usable}"
        );
        let mut kind = [0u8; 16];
        kind.copy_from_slice(&e[..16]);
        parts.push(Part {
            number,
            start: first * SECTOR,
            size: (last - first + 1) * SECTOR,
            kind: PartKind::Gpt(kind),
        });
    }
    ensure!(!parts.is_empty(), "the GPT lists no partitions");
    check_overlaps(&parts)?;
    Ok(Table {
        kind: Kind::Gpt,
        parts,
        disk_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A 4 MiB disk with one MBR partition at 1 MiB of `count` sectors.
    fn mbr_disk(count: u32) -> Vec<u8> {
        let mut d = vec![0u8; 4 << 20];
        d[510] = 0x55;
        d[511] = 0xaa;
        let e = &mut d[446..462];
        e[4] = 0x0c;
        e[8..12].copy_from_slice(&2048u32.to_le_bytes());
        e[12..16].copy_from_slice(&count.to_le_bytes());
        d
    }

    #[test]
    fn mbr_partition_inside_and_past_the_end() {
        let d = mbr_disk(2048);
        let t = read(&mut Cursor::new(&d), d.len() as u64).expect("valid");
        assert_eq!(t.parts[0].start, 1 << 20);
        assert_eq!(t.parts[0].size, 1 << 20);
        let d = mbr_disk(8192);
        let e = read(&mut Cursor::new(&d), d.len() as u64).unwrap_err();
        assert!(format!("{e:#}").contains("runs past the end"), "{e:#}");
        let d = mbr_disk(u32::MAX);
        assert!(read(&mut Cursor::new(&d), d.len() as u64).is_err());
    }

    #[test]
    fn no_signature_is_no_table() {
        let d = vec![b'x'; 4096];
        let e = read(&mut Cursor::new(&d), 4096).unwrap_err();
        assert!(format!("{e:#}").contains("no partition table"), "{e:#}");
    }

    /// A GPT disk made by the `gpt` crate (as `picoimg build` makes them): 8 MiB, one
    /// partition.
    fn gpt_disk() -> Vec<u8> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("d.img");
        let f = std::fs::File::create(&p).expect("create");
        f.set_len(8 << 20).expect("size");
        let mbr = gpt::mbr::ProtectiveMBR::with_lb_size(((8 << 20) / 512 - 1) as u32);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .expect("open");
        mbr.overwrite_lba0(&mut f).expect("pmbr");
        let mut disk = gpt::GptConfig::new()
            .writable(true)
            .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
            .create_from_device(f, None)
            .expect("gpt");
        disk.add_partition("boot", 2 << 20, gpt::partition_types::EFI, 0, None)
            .expect("partition");
        disk.write().expect("write");
        std::fs::read(&p).expect("read")
    }

    #[test]
    fn gpt_reads_and_damage_is_refused() {
        let d = gpt_disk();
        let t = read(&mut Cursor::new(&d), d.len() as u64).expect("valid GPT");
        assert_eq!(t.kind, Kind::Gpt);
        assert_eq!(t.parts.len(), 1);
        assert_eq!(t.parts[0].size, 2 << 20);
        let cases: [(&str, usize, &str); 3] = [
            ("header byte", 512 + 40, "header's CRC"),
            ("entry byte", 1024 + 35, "entries' CRC"),
            ("signature", 512, "no GPT header"),
        ];
        for (what, at, message) in cases {
            let mut bad = d.clone();
            bad[at] ^= 0x40;
            let e = read(&mut Cursor::new(&bad), bad.len() as u64).expect_err(what);
            assert!(format!("{e:#}").contains(message), "{what}: {e:#}");
        }
        let cut = &d[..4 << 20];
        let e = read(&mut Cursor::new(cut), cut.len() as u64).expect_err("truncated");
        assert!(format!("{e:#}").contains("truncated image"), "{e:#}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// No disk makes the reader panic or overflow: MBR and GPT sectors with random bytes
        /// written over them (the CRCs are recomputed half the time, to reach the checks
        /// behind them).
        #[test]
        fn reader_never_panics(
            gpt in proptest::bool::ANY,
            fix_crcs in proptest::bool::ANY,
            edits in proptest::collection::vec((0usize..2048, 0u8..=255), 1..24),
            len in 0usize..(8 << 20),
        ) {
            let mut d = if gpt { gpt_disk() } else { mbr_disk(2048) };
            for (at, b) in edits {
                let i = at % 2048;
                if i < d.len() {
                    d[i] = b;
                }
            }
            if gpt && fix_crcs {
                let hsize = (u32_at(&d, 512 + 12) as usize).clamp(92, 512);
                let esize = u32_at(&d, 512 + 84) as usize;
                let count = u32_at(&d, 512 + 80) as usize;
                if let Some(n) = esize.checked_mul(count).filter(|n| *n <= 16384) {
                    let crc = crc32fast::hash(&d[1024..1024 + n]);
                    d[512 + 88..512 + 92].copy_from_slice(&crc.to_le_bytes());
                }
                d[512 + 16..512 + 20].fill(0);
                let crc = crc32fast::hash(&d[512..512 + hsize]);
                d[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
            }
            let size = (len as u64).min(d.len() as u64);
            let _ = read(&mut Cursor::new(&d), size);
            let _ = read(&mut Cursor::new(&d), u64::MAX);
        }
    }
}
