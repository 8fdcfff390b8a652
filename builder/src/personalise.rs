//! Files put onto the boot partition of a written image or card after the build: the cluster
//! file and a node's name, through the FAT library, with no mount.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::disk::FatFile;

/// Byte offset and size of the first partition that holds a FAT filesystem (the boot
/// partition of every picoimg board). The partition table is checked first (see
/// [`crate::ptable`]): a truncated or damaged image is refused before anything is written, and
/// the FAT filesystem must fit inside its partition, so a write never grows the file.
pub fn boot_partition(image: &Path) -> Result<(u64, u64)> {
    let mut f =
        std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let size = crate::ptable::size_of(&mut f)?;
    let table = crate::ptable::read(&mut f, size).with_context(|| {
        format!(
            "{}: not a complete disk image or card with a valid partition table",
            image.display()
        )
    })?;
    for p in &table.parts {
        let mut bs = [0u8; 512];
        f.seek(SeekFrom::Start(p.start))?;
        f.read_exact(&mut bs)
            .with_context(|| format!("reading partition {} of {}", p.number, image.display()))?;
        let fat =
            bs[510..512] == [0x55, 0xaa] && (&bs[82..87] == b"FAT32" || &bs[54..57] == b"FAT");
        if !fat {
            continue;
        }
        let bps = u64::from(u16::from_le_bytes([bs[11], bs[12]]));
        let small = u64::from(u16::from_le_bytes([bs[19], bs[20]]));
        let large = u64::from(u32::from_le_bytes([bs[32], bs[33], bs[34], bs[35]]));
        let fs_bytes = bps * if small != 0 { small } else { large };
        if fs_bytes == 0 || fs_bytes > p.size {
            bail!(
                "{}: the FAT filesystem on partition {} claims {fs_bytes} bytes but the partition has {}: damaged boot partition",
                image.display(),
                p.number,
                p.size
            );
        }
        return Ok((p.start, p.size));
    }
    bail!(
        "{} has no FAT boot partition to put picoimg/ files on",
        image.display()
    )
}

/// Writes `files` (paths relative to the boot partition's root) into the image's boot
/// partition and removes the `remove` paths there; returns the paths it removed.
pub fn put_boot_files(image: &Path, files: &[FatFile<'_>], remove: &[&str]) -> Result<Vec<String>> {
    let (start, size) = boot_partition(image)?;
    crate::disk::add_fat_files(image, start, size, files, remove)
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
/// onto the boot partition of `target` (a raw image or a written device). Without `node`, a
/// node.toml left by an earlier run is removed (it would name a node of another file), and
/// this says so.
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
            path: NODE_TOML,
            data: t.as_bytes(),
        });
    }
    let stale: &[&str] = if node.is_none() { &[NODE_TOML] } else { &[] };
    for removed in put_boot_files(target, &files, stale)? {
        crate::progress::log(format!(
            "removed {removed} left by an earlier run: without --node, the node finds itself by MAC, serial or DMI UUID"
        ));
    }
    Ok(())
}

const NODE_TOML: &str = "picoimg/node.toml";
