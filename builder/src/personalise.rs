//! Files put onto the boot partition of a written image or card after the build: the cluster
//! file and a node's name, through the FAT library, with no mount.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::disk::FatFile;

/// Byte offset and size of the first partition that holds a FAT filesystem (the boot
/// partition of every picoimg board), from the MBR or the GPT.
pub fn boot_partition(image: &Path) -> Result<(u64, u64)> {
    let mut f =
        std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let mut sector = [0u8; 512];
    f.read_exact(&mut sector)
        .with_context(|| format!("reading the partition table of {}", image.display()))?;
    if sector[510..512] != [0x55, 0xaa] {
        bail!(
            "{} has no partition table (no MBR signature)",
            image.display()
        );
    }
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let mut parts: Vec<(u64, u64)> = Vec::new();
    let mbr: Vec<(u8, u64, u64)> = (0..4)
        .map(|i| {
            let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
            (e[4], u32_at(e, 8) as u64, u32_at(e, 12) as u64)
        })
        .filter(|(t, _, n)| *t != 0 && *n != 0)
        .collect();
    if mbr.iter().any(|(t, _, _)| *t == 0xee) {
        let mut hdr = [0u8; 512];
        f.seek(SeekFrom::Start(512))?;
        f.read_exact(&mut hdr)?;
        if &hdr[..8] != b"EFI PART" {
            bail!("{}: protective MBR but no GPT header", image.display());
        }
        let (lba, count, size) = (u64_at(&hdr, 72), u32_at(&hdr, 80), u32_at(&hdr, 84));
        if !(128..=4096).contains(&size) || count > 1024 {
            bail!("{}: implausible GPT entry table", image.display());
        }
        let mut table = vec![0u8; count as usize * size as usize];
        f.seek(SeekFrom::Start(lba * 512))?;
        f.read_exact(&mut table)?;
        for e in table.chunks_exact(size as usize) {
            if e[..16].iter().any(|b| *b != 0) {
                let (first, last) = (u64_at(e, 32), u64_at(e, 40));
                parts.push((first * 512, (last + 1 - first) * 512));
            }
        }
    } else {
        parts.extend(mbr.iter().map(|(_, s, n)| (s * 512, n * 512)));
    }
    for (start, size) in parts {
        let mut bs = [0u8; 512];
        f.seek(SeekFrom::Start(start))?;
        if f.read_exact(&mut bs).is_err() {
            continue;
        }
        let fat =
            bs[510..512] == [0x55, 0xaa] && (&bs[82..87] == b"FAT32" || &bs[54..57] == b"FAT");
        if fat {
            return Ok((start, size));
        }
    }
    bail!(
        "{} has no FAT boot partition to put picoimg/ files on",
        image.display()
    )
}

/// Writes `files` (paths relative to the boot partition's root) into the image's boot
/// partition.
pub fn put_boot_files(image: &Path, files: &[FatFile<'_>]) -> Result<()> {
    let (start, size) = boot_partition(image)?;
    crate::disk::add_fat_files(image, start, size, files)
        .with_context(|| format!("writing to the boot partition of {}", image.display()))
}

/// Fails unless the cluster file lists `node` (the error lists the nodes it has).
pub fn check_node(
    checked: &picoimg_firstboot::cluster::Checked,
    cluster_file: &Path,
    node: &str,
) -> Result<()> {
    let nodes = &checked.file.nodes;
    if nodes.iter().any(|x| x.name.get_ref() == node) {
        return Ok(());
    }
    bail!(
        "node `{node}` is not in {} (nodes: {})",
        cluster_file.display(),
        nodes
            .iter()
            .map(|x| x.name.get_ref().as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Puts the cluster file's text as picoimg/cluster.toml and, with `node`, picoimg/node.toml
/// onto the boot partition of `target` (a raw image or a written device).
pub fn put_cluster(target: &Path, text: &str, node: Option<&str>) -> Result<()> {
    let node_toml = node.map(|n| {
        format!("# Written by picoimg: this node's name in cluster.toml.\nname = \"{n}\"\n")
    });
    let mut files = vec![FatFile {
        path: "picoimg/cluster.toml",
        data: text.as_bytes(),
    }];
    if let Some(t) = &node_toml {
        files.push(FatFile {
            path: "picoimg/node.toml",
            data: t.as_bytes(),
        });
    }
    put_boot_files(target, &files)
}
