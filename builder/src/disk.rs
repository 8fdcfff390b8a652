//! The disk image, as a plain file, with no loop device and no mount: the partition table from
//! the `gpt` crate, FAT written in place with `fatfs`, ext4 made in place by `mke2fs -E offset`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result};
use uuid::Uuid;

use crate::board::{Board, Placed, TableKind};
use crate::cmd::Cmd;

/// Identifiers written into the image, derived from the image's name and root filesystem
/// (see `BuildPlan::ids_seed`) so that the same plan always yields the same table, and an
/// overlay change keeps them (ext4 seeds its metadata checksums and directory hashes from
/// them: new ones would rewrite every metadata block, and no compressed block could be reused).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskIds {
    pub disk_guid: Uuid,
    /// Per partition, in board order.
    pub part_guids: Vec<Uuid>,
    /// Filesystem UUID of the root filesystem.
    pub root_fs_uuid: Uuid,
    /// FAT volume id (serial) of FAT partitions.
    pub fat_volume_id: u32,
    /// MBR disk identifier (bytes 440-443); MBR partitions are `PARTUUID=<id>-<nn>`.
    pub mbr_disk_id: u32,
    pub table: TableKind,
}

impl DiskIds {
    /// The PARTUUID the kernel sees for partition `index` (0-based, board order).
    pub fn partuuid(&self, index: usize) -> String {
        match self.table {
            TableKind::Gpt => self.part_guids[index].to_string(),
            TableKind::Mbr => format!("{:08x}-{:02x}", self.mbr_disk_id, index + 1),
        }
    }

    pub fn derive(seed: &str, board: &Board) -> DiskIds {
        let ns = Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("picoimg:{seed}").as_bytes());
        let id = |what: &str| Uuid::new_v5(&ns, what.as_bytes());
        let vol = id("fat-volume-id");
        let mbr = id("mbr-disk-id");
        DiskIds {
            mbr_disk_id: u32::from_le_bytes(mbr.as_bytes()[..4].try_into().expect("4 bytes")),
            table: board.disk.table,
            disk_guid: id("disk"),
            part_guids: board
                .disk
                .partitions
                .iter()
                .map(|p| id(&format!("partition:{}", p.name)))
                .collect(),
            root_fs_uuid: id("root-fs"),
            fat_volume_id: u32::from_le_bytes(vol.as_bytes()[..4].try_into().expect("4 bytes")),
        }
    }
}

/// Creates a sparse image file of the board's size with its GPT written.
pub fn create(path: &Path, board: &Board, layout: &[Placed], ids: &DiskIds) -> Result<()> {
    let size = board.disk.size.0;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating image {}", path.display()))?;
    file.set_len(size)
        .with_context(|| format!("sizing image {} to {size} bytes", path.display()))?;
    match board.disk.table {
        TableKind::Gpt => write_gpt(file, board, layout, ids).context("writing the GPT")?,
        TableKind::Mbr => write_mbr(file, board, layout, ids).context("writing the MBR")?,
    }
    Ok(())
}

/// A DOS partition table in sector 0: disk id at 440, four 16-byte entries at 446, 0x55AA.
/// Bytes 0-439 (boot code) stay zero; CHS fields hold the "use LBA" marker.
fn write_mbr(mut file: File, board: &Board, layout: &[Placed], ids: &DiskIds) -> Result<()> {
    let mut sector = [0u8; 512];
    sector[440..444].copy_from_slice(&ids.mbr_disk_id.to_le_bytes());
    for (slot, placed) in layout.iter().enumerate() {
        let p = &board.disk.partitions[placed.index];
        let e = &mut sector[446 + slot * 16..446 + slot * 16 + 16];
        e[0] = if p.bootable { 0x80 } else { 0x00 };
        e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[4] = p.kind.mbr_type();
        e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        let lba = u32::try_from(placed.start / 512).context("partition start past 2 TiB")?;
        let len = u32::try_from(placed.size / 512).context("partition size past 2 TiB")?;
        e[8..12].copy_from_slice(&lba.to_le_bytes());
        e[12..16].copy_from_slice(&len.to_le_bytes());
    }
    sector[510] = 0x55;
    sector[511] = 0xaa;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&sector)?;
    file.flush()?;
    Ok(())
}

fn write_gpt(mut file: File, board: &Board, layout: &[Placed], ids: &DiskIds) -> Result<()> {
    const SECTOR: u64 = 512;
    let sectors = board.disk.size.0 / SECTOR;
    let mbr =
        gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(sectors - 1).unwrap_or(0xFFFF_FFFF));
    mbr.overwrite_lba0(&mut file)
        .context("writing protective MBR")?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .change_partition_count(true)
        .create_from_device(file, Some(ids.disk_guid))
        .context("creating GPT header")?;
    let mut parts = BTreeMap::new();
    for (placed, guid) in layout.iter().zip(&ids.part_guids) {
        let p = &board.disk.partitions[placed.index];
        let kind = gpt::partition_types::Type {
            guid: p.kind.gpt_guid().parse().expect("static GUID"),
            os: gpt::partition_types::OperatingSystem::None,
        };
        parts.insert(
            placed.index as u32 + 1,
            gpt::partition::Partition {
                part_type_guid: kind,
                part_guid: *guid,
                first_lba: placed.start / SECTOR,
                last_lba: (placed.start + placed.size) / SECTOR - 1,
                // Bit 2: legacy BIOS bootable.
                flags: if p.bootable { 1 << 2 } else { 0 },
                name: p.name.clone(),
            },
        );
    }
    // A standard 128-entry partition array, as every other tool writes.
    for i in parts.len() as u32 + 1..=128 {
        parts.insert(i, gpt::partition::Partition::zero());
    }
    disk.update_partitions(parts)
        .context("setting partitions")?;
    let mut file = disk.write().context("writing GPT")?;
    file.flush()?;
    Ok(())
}

/// A file to put on a FAT partition.
pub struct FatFile<'a> {
    pub path: &'a str,
    pub data: &'a [u8],
}

/// Formats a FAT32 filesystem in place in the image and writes `files` into it.
pub fn write_fat(
    image: &Path,
    placed: &Placed,
    label: &str,
    volume_id: u32,
    epoch: u64,
    files: &[FatFile<'_>],
) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    let slice = fscommon::StreamSlice::new(file, placed.start, placed.start + placed.size)?;
    let mut slice = fscommon::BufStream::new(slice);
    let mut label_bytes = [b' '; 11];
    // Kept as written: Raspberry Pi OS and Ubuntu use lowercase labels (`bootfs`, `system-boot`).
    for (d, s) in label_bytes.iter_mut().zip(label.bytes()) {
        *d = s;
    }
    fatfs::format_volume(
        &mut slice,
        fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat32)
            .volume_id(volume_id)
            .volume_label(label_bytes),
    )
    .context("formatting FAT32")?;
    slice.seek(SeekFrom::Start(0))?;
    let options = fatfs::FsOptions::new().time_provider(FixedTime::leak(epoch));
    put_files(&mut slice, options, files, &[]).map(|_| ())
}

/// Every FAT timestamp at one instant (the build's `SOURCE_DATE_EPOCH`), so two builds of the
/// same inputs write the same bytes. FAT keeps local time without a zone: this is UTC.
#[derive(Debug)]
struct FixedTime(fatfs::DateTime);

impl FixedTime {
    /// A provider for `fatfs`, which wants a `'static` one: a few bytes per filesystem written.
    fn leak(epoch: u64) -> &'static FixedTime {
        Box::leak(Box::new(FixedTime(dos_time(epoch))))
    }
}

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        self.0
    }
}

/// `epoch` (seconds since 1970, UTC) as a FAT date and time, clamped to FAT's 1980..=2107.
fn dos_time(epoch: u64) -> fatfs::DateTime {
    const MIN: u64 = 315_532_800; // 1980-01-01
    const MAX: u64 = 4_354_819_199; // 2107-12-31 23:59:59
    let t = epoch.clamp(MIN, MAX);
    let (days, secs) = (t / 86_400, t % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    fatfs::DateTime {
        date: fatfs::Date {
            year: year as u16,
            month: month as u16,
            day: day as u16,
        },
        time: fatfs::Time {
            hour: (secs / 3600) as u16,
            min: (secs / 60 % 60) as u16,
            sec: (secs % 60) as u16,
            millis: 0,
        },
    }
}

/// Writes (or replaces) `files` on the FAT filesystem that starts `start` bytes into `image`
/// and removes the files named in `remove` where they exist; returns those it removed.
pub fn add_fat_files(
    image: &Path,
    start: u64,
    size: u64,
    files: &[FatFile<'_>],
    remove: &[&str],
) -> Result<Vec<String>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    let slice = fscommon::StreamSlice::new(file, start, start + size)?;
    let mut slice = fscommon::BufStream::new(slice);
    let removed = put_files(&mut slice, fatfs::FsOptions::new(), files, remove)?;
    drop(slice);
    std::fs::File::open(image)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", image.display()))?;
    Ok(removed)
}

fn put_files<S: std::io::Read + Write + Seek>(
    slice: &mut S,
    options: fatfs::FsOptions,
    files: &[FatFile<'_>],
    remove: &[&str],
) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    {
        let fs =
            fatfs::FileSystem::new(&mut *slice, options).context("opening the FAT filesystem")?;
        {
            let root = fs.root_dir();
            for f in files {
                let parts: Vec<&str> = f.path.trim_start_matches('/').split('/').collect();
                let (name, dirs) = parts.split_last().expect("non-empty path");
                let mut dir = root.clone();
                for d in dirs {
                    dir = match dir.open_dir(d) {
                        Ok(x) => x,
                        Err(_) => dir.create_dir(d).with_context(|| {
                            format!("creating FAT directory {d} for {}", f.path)
                        })?,
                    };
                }
                let mut out = dir
                    .create_file(name)
                    .with_context(|| format!("creating FAT file {}", f.path))?;
                out.truncate()?;
                out.write_all(f.data).with_context(|| {
                    format!("writing FAT file {} ({} bytes)", f.path, f.data.len())
                })?;
            }
            for path in remove {
                let path = path.trim_start_matches('/');
                if root.open_file(path).is_ok() {
                    root.remove(path)
                        .with_context(|| format!("removing FAT file {path}"))?;
                    removed.push(path.to_owned());
                }
            }
        }
        // Counting free clusters also records the count in the FSInfo sector.
        fs.stats().context("counting free FAT clusters")?;
        fs.unmount().context("closing the FAT filesystem")?;
    }
    slice.flush()?;
    fix_dot_entries(slice).context("repairing FAT directory entries")?;
    slice.flush()?;
    Ok(removed)
}

/// fatfs 0.3.6 writes a long-name entry in front of the `.` and `..` entries of every new
/// directory, which the FAT specification (and `fsck.fat`) does not allow: `.` must be the
/// first entry and `..` the second. This walks the directory tree from the FAT32 root and
/// drops those long-name entries, keeping everything else in order.
fn fix_dot_entries<S: std::io::Read + Write + Seek>(disk: &mut S) -> Result<()> {
    let mut bs = [0u8; 512];
    disk.seek(SeekFrom::Start(0))?;
    disk.read_exact(&mut bs)?;
    let u16_at = |o: usize| u16::from_le_bytes([bs[o], bs[o + 1]]) as u64;
    let u32_at = |o: usize| u32::from_le_bytes([bs[o], bs[o + 1], bs[o + 2], bs[o + 3]]) as u64;
    let bps = u16_at(11);
    let spc = bs[13] as u64;
    if bps == 0 || spc == 0 || bps * spc > 1 << 20 {
        anyhow::bail!("implausible FAT geometry ({bps} bytes per sector, {spc} per cluster)");
    }
    let data_start = (u16_at(14) + bs[16] as u64 * u32_at(36)) * bps;
    let cluster_bytes = (bps * spc) as usize;
    let offset = |c: u64| -> Result<u64> {
        c.checked_sub(2)
            .and_then(|c| c.checked_mul(cluster_bytes as u64))
            .and_then(|o| o.checked_add(data_start))
            .with_context(|| format!("FAT cluster {c} is out of range"))
    };
    // (directory cluster, is the root, parent is the root)
    let mut todo = vec![(u32_at(44), true, false)];
    let mut visited = 0;
    while let Some((cluster, is_root, parent_is_root)) = todo.pop() {
        visited += 1;
        if visited > 4096 {
            anyhow::bail!("FAT directory walk did not end");
        }
        let mut buf = vec![0u8; cluster_bytes];
        disk.seek(SeekFrom::Start(offset(cluster)?))?;
        disk.read_exact(&mut buf)?;
        let entries: Vec<[u8; 32]> = buf
            .chunks_exact(32)
            .take_while(|e| e[0] != 0)
            .map(|e| e.try_into().expect("32 bytes"))
            .collect();
        let is_lfn = |e: &[u8; 32]| e[11] & 0x3f == 0x0f && e[0] != 0xe5;
        let is_dot = |e: &[u8; 32]| &e[..11] == b".          " || &e[..11] == b"..         ";
        for e in &entries {
            let dir = e[11] & 0x10 != 0 && !is_lfn(e) && e[0] != 0xe5 && !is_dot(e);
            if dir {
                let c = (u16::from_le_bytes([e[20], e[21]]) as u64) << 16
                    | u16::from_le_bytes([e[26], e[27]]) as u64;
                if c >= 2 {
                    todo.push((c, false, is_root));
                }
            }
        }
        if is_root {
            continue;
        }
        // Drop long-name entries that belong to `.` or `..`, then put those two first.
        let mut kept: Vec<[u8; 32]> = Vec::new();
        let mut pending: Vec<[u8; 32]> = Vec::new();
        for e in &entries {
            if is_lfn(e) {
                pending.push(*e);
                continue;
            }
            if !is_dot(e) {
                kept.append(&mut pending);
            }
            pending.clear();
            kept.push(*e);
        }
        kept.sort_by_key(|e| match &e[..11] {
            b".          " => 0,
            b"..         " => 1,
            _ => 2,
        });
        // `..` of a top-level directory points at cluster 0, whatever the root's cluster.
        if parent_is_root {
            for e in kept.iter_mut().filter(|e| &e[..11] == b"..         ") {
                e[20..22].fill(0);
                e[26..28].fill(0);
            }
        }
        let mut out = vec![0u8; entries.len() * 32];
        for (i, e) in kept.iter().enumerate() {
            out[i * 32..i * 32 + 32].copy_from_slice(e);
        }
        disk.seek(SeekFrom::Start(offset(cluster)?))?;
        disk.write_all(&out)?;
    }
    Ok(())
}

/// Makes the ext4 filesystem in place in the image, populated from the root tarball.
pub fn write_ext4(
    image: &Path,
    placed: &Placed,
    label: &str,
    uuid: Uuid,
    epoch: u64,
    root_tar: &Path,
) -> Result<()> {
    // Timestamps mke2fs itself sets (superblock, inode change times, lost+found) at the
    // build's epoch: e2fsprogs >= 1.47.1 reads SOURCE_DATE_EPOCH, older ones E2FSPROGS_FAKE_TIME.
    Cmd::new(crate::cmd::find_program("mke2fs").unwrap_or_else(|| "mke2fs".into()))
        .args(["-q", "-F", "-t", "ext4", "-L", label])
        .arg("-U")
        .arg(uuid.to_string())
        .arg("-E")
        .arg(format!("offset={},hash_seed={uuid}", placed.start))
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .arg("-d")
        .arg(root_tar)
        .arg(image)
        .arg(format!("{}k", placed.size / 1024))
        .run()
        .context("making the ext4 root filesystem")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// h4 with an MBR table (the ESP marked bootable, the root as plain Linux data).
    fn mbr_board() -> Board {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../boards/h4.toml"))
                .expect("h4.toml")
                .replace("table = \"gpt\"", "table = \"mbr\"")
                .replace("type = \"esp\"", "type = \"esp\"\nbootable = true")
                .replace("type = \"root-x86-64\"", "type = \"linux-data\"");
        Board::parse(&text, std::path::Path::new("test.toml")).expect("parses")
    }

    /// sfdisk (util-linux) reads our MBR: label dos, the disk id, types, offsets, boot flag.
    #[test]
    fn mbr_table_reads_back_with_sfdisk() -> Result<()> {
        let board = mbr_board();
        let layout = board.layout()?;
        let ids = DiskIds::derive("0123", &board);
        let dir = tempfile::tempdir()?;
        let img = dir.path().join("disk.img");
        create(&img, &board, &layout, &ids)?;
        let json = Cmd::new(crate::cmd::find_program("sfdisk").unwrap_or_else(|| "sfdisk".into()))
            .arg("--json")
            .arg(&img)
            .read()
            .context("sfdisk (package fdisk) reads the table")?;
        let v: serde_json::Value = serde_json::from_str(&json)?;
        let t = &v["partitiontable"];
        assert_eq!(t["label"], "dos");
        assert_eq!(t["id"], format!("0x{:08x}", ids.mbr_disk_id));
        let parts = t["partitions"].as_array().expect("partitions");
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0]["type"], "ef");
        assert_eq!(parts[0]["bootable"], true);
        assert_eq!(parts[0]["start"], 2048);
        assert_eq!(parts[1]["type"], "83");
        assert_eq!(parts[1]["start"], (layout[1].start / 512));
        assert_eq!(ids.partuuid(1), format!("{:08x}-02", ids.mbr_disk_id));
        Ok(())
    }

    /// The FAT writer's output passes `fsck.fat -n` (dosfstools), nested directories included.
    #[test]
    fn fat_partition_is_clean_for_fsck() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let img = dir.path().join("disk.img");
        let placed = Placed {
            index: 0,
            start: 1 << 20,
            size: 64 << 20,
        };
        File::create(&img)?.set_len(placed.start + placed.size)?;
        let files = [
            FatFile {
                path: "EFI/BOOT/BOOTX64.EFI",
                data: &[7u8; 5000],
            },
            FatFile {
                path: "loader/loader.conf",
                data: b"timeout 0\n",
            },
            FatFile {
                path: "loader/entries/picoimg.conf",
                data: b"title x\n",
            },
            FatFile {
                path: "picoimg/vmlinuz",
                data: &[1u8; 100_000],
            },
        ];
        write_fat(&img, &placed, "ESP", 0x1234_5678, 0, &files)?;
        let part = dir.path().join("part.img");
        let mut src = File::open(&img)?;
        src.seek(SeekFrom::Start(placed.start))?;
        std::io::copy(
            &mut std::io::Read::take(src, placed.size),
            &mut File::create(&part)?,
        )?;
        let out =
            Cmd::new(crate::cmd::find_program("fsck.fat").unwrap_or_else(|| "fsck.fat".into()))
                .arg("-n")
                .arg(&part)
                .read()
                .context("fsck.fat (package dosfstools) must accept the filesystem")?;
        assert!(
            !out.contains("Expected a valid") && !out.contains("Fixing"),
            "{out}"
        );
        assert!(!out.contains("uninitialized"), "{out}");
        let listing = Cmd::new("mdir")
            .args(["-i"])
            .arg(&part)
            .args(["-b", "-/", "::"])
            .read()?;
        assert!(listing.contains("::/loader/loader.conf"), "{listing}");
        assert!(
            listing.contains("::/loader/entries/picoimg.conf"),
            "{listing}"
        );
        Ok(())
    }

    /// FAT timestamps from an epoch: `date -u -d @1700000000` is Tue Nov 14 22:13:20 UTC 2023;
    /// before 1980 FAT cannot say, so it is 1980-01-01.
    #[test]
    fn fat_time_of_an_epoch() {
        let t = dos_time(1_700_000_000);
        assert_eq!((t.date.year, t.date.month, t.date.day), (2023, 11, 14));
        assert_eq!((t.time.hour, t.time.min, t.time.sec), (22, 13, 20));
        let t = dos_time(951_782_400); // 2000-02-29 00:00:00, a leap day
        assert_eq!((t.date.year, t.date.month, t.date.day), (2000, 2, 29));
        let t = dos_time(0);
        assert_eq!(
            (t.date.year, t.date.month, t.date.day, t.time.hour),
            (1980, 1, 1, 0)
        );
    }
}
