//! Boards are data: one TOML file per board in `boards/`, parsed strictly (unknown keys are
//! errors) and checked for layout mistakes before any work starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::size::{Bytes, MIB};

/// A board file, as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Board {
    /// Short name used on the command line and in output names (`h4`).
    pub name: String,
    /// One line for `picoimg boards`.
    pub description: String,
    /// Debian architecture of the root filesystem.
    pub arch: Arch,
    /// Components every image for this board gets (before the stack's), e.g. its bootloader.
    #[serde(default)]
    pub components: Vec<String>,
    pub distro: Distro,
    /// The source set used unless `--sources` names another.
    pub default_sources: String,
    /// Named source sets: where the packages come from and which ones. The default set is
    /// what runs on the real board; others (such as `debian`) substitute packages from the
    /// Debian archive, for tests and for machines that cannot reach the real sources.
    pub sources: BTreeMap<String, SourceSet>,
    pub disk: Disk,
    pub boot: Boot,
    pub qemu: Qemu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Distro {
    /// `debian` (Ubuntu and Raspberry Pi OS come with the arm64 boards).
    pub name: String,
    /// Suite (codename) to install, e.g. `trixie`.
    pub suite: String,
    /// mmdebstrap variant; `apt` installs Essential + apt, the board and stack add the rest.
    #[serde(default = "default_variant")]
    pub variant: String,
}

fn default_variant() -> String {
    "apt".into()
}

/// One source set of a board.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSet {
    /// One line for `picoimg boards` and the manifest.
    pub description: String,
    /// Distribution and suite these sources install, when not the board's `[distro]` (a
    /// Debian substitute for an Ubuntu board installs debian trixie, not ubuntu noble).
    #[serde(default)]
    pub distro: Option<String>,
    #[serde(default)]
    pub suite: Option<String>,
    /// Apt sources; at least one.
    pub apt: Vec<Source>,
    pub packages: Packages,
    /// Device trees copied to the boot partition, as paths below the kernel's DTB directory
    /// (`/usr/lib/linux-image-<version>/`); the first is the one the loader names.
    #[serde(default)]
    pub dtbs: Vec<String>,
}

/// An apt source. `uri = "default"` means the distribution's default mirror as mmdebstrap
/// chooses it (with -updates and -security for stable suites), unless `--mirror` is given.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub name: String,
    pub uri: String,
    /// Suite of this source when it differs from the distribution's (e.g. `bullseye` for a
    /// package only an older release carries); apt prefers the distribution's versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    pub components: Vec<String>,
    /// Keyring that signs this source (a path on the build host).
    pub keyring: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Packages {
    /// Kernel image package(s).
    pub kernel: Vec<String>,
    /// Firmware and microcode packages.
    #[serde(default)]
    pub firmware: Vec<String>,
    /// Packages that provide the bootloader's files.
    #[serde(default)]
    pub bootloader: Vec<String>,
    /// Anything else the board needs.
    #[serde(default)]
    pub extra: Vec<String>,
}

impl Packages {
    pub fn all(&self) -> impl Iterator<Item = &String> {
        self.kernel
            .iter()
            .chain(&self.firmware)
            .chain(&self.bootloader)
            .chain(&self.extra)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Gpt,
    /// DOS/MBR: at most four primary partitions; needed where a boot ROM reads sector 1.
    Mbr,
}

impl std::fmt::Display for TableKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TableKind::Gpt => "GPT",
            TableKind::Mbr => "MBR",
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub table: TableKind,
    /// Size of the image file; the root partition grows to fill the real disk on first boot.
    pub size: Bytes,
    /// Partition start and size alignment.
    pub align: Bytes,
    #[serde(rename = "partition")]
    pub partitions: Vec<Partition>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartType {
    /// EFI system partition.
    Esp,
    /// Extended boot loader partition.
    Xbootldr,
    /// Root partition, x86-64 (discoverable partitions type).
    RootX86_64,
    /// Root partition, arm64.
    RootArm64,
    /// Generic Linux data.
    LinuxData,
    /// FAT32 with LBA addressing (MBR 0x0c; GPT "basic data"), e.g. a Raspberry Pi boot partition.
    Fat32,
}

impl PartType {
    pub fn gpt_guid(self) -> &'static str {
        match self {
            PartType::Esp => "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
            PartType::Xbootldr => "bc13c2ff-59e6-4262-a352-b275fd6f7172",
            PartType::RootX86_64 => "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
            PartType::RootArm64 => "b921b045-1df0-41c3-af44-4c6f280d3fae",
            PartType::LinuxData => "0fc63daf-8483-4772-8e79-3d69d8477de4",
            PartType::Fat32 => "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7",
        }
    }

    /// The MBR partition type byte.
    pub fn mbr_type(self) -> u8 {
        match self {
            PartType::Esp => 0xef,
            PartType::Xbootldr => 0xea,
            PartType::Fat32 => 0x0c,
            PartType::RootX86_64 | PartType::RootArm64 | PartType::LinuxData => 0x83,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    Vfat,
    Ext4,
}

/// A partition size: bytes, or "fill" for the rest of the image (last partition only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartSize {
    Fixed(Bytes),
    Fill,
}

impl Serialize for PartSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PartSize::Fixed(b) => s.serialize_u64(b.0),
            PartSize::Fill => s.serialize_str("fill"),
        }
    }
}

impl<'de> Deserialize<'de> for PartSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(PartSize::Fixed(Bytes(n))),
            Raw::Str(s) if s == "fill" => Ok(PartSize::Fill),
            Raw::Str(s) => Bytes::parse(&s)
                .map(PartSize::Fixed)
                .map_err(|e| serde::de::Error::custom(format!("{e}, or \"fill\""))),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// Name in the partition table (GPT) and in error messages.
    pub name: String,
    #[serde(rename = "type")]
    pub kind: PartType,
    pub fs: Filesystem,
    /// Filesystem label.
    pub label: String,
    pub size: PartSize,
    /// Start offset; by default right after the previous partition (aligned).
    #[serde(default)]
    pub start: Option<Bytes>,
    /// Where the running system mounts it.
    pub mount: String,
    /// Marked bootable (MBR active flag; GPT legacy-BIOS-bootable attribute), which some
    /// firmware and u-boot's distro boot look for.
    #[serde(default)]
    pub bootable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loader {
    /// systemd-boot as the removable-media path `EFI/BOOT/BOOTX64.EFI` on the ESP, with a
    /// loader entry; kernel and initrd on the ESP.
    SystemdBoot,
    /// u-boot: `extlinux/extlinux.conf` (distro boot) on the first FAT partition with `Image`,
    /// `initrd.img` and the device trees; plus `boot.scr` when the board has a script.
    Extlinux,
    /// The Raspberry Pi firmware: `config.txt` (from the board folder), `cmdline.txt`, the
    /// kernel as `kernel_2712.img`, `initramfs_2712`, `bcm2712*.dtb` and `overlays/`, laid out
    /// as the raspi-firmware kernel hook does; plus an extlinux.conf for u-boot (QEMU).
    RaspberryPi,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    pub loader: Loader,
    /// Kernel command line; the builder adds `root=PARTUUID=...`.
    pub cmdline: String,
    /// A u-boot script in the board's folder (`boards/<board>/<file>`), compiled to `boot.scr`.
    /// `@CMDLINE@`, `@KERNEL@`, `@INITRD@` and `@DTB@` are replaced by the image's values.
    #[serde(default)]
    pub script: Option<String>,
    /// A bootloader written raw onto the disk, outside any partition.
    #[serde(default)]
    pub blob: Option<Blob>,
    /// How the kernel finds the root filesystem: by partition UUID (default) or by label.
    #[serde(default)]
    pub root: RootBy,
    /// File names of the kernel and initrd on the boot partition, where the loader lets the
    /// board choose (raspberry-pi: `kernel_2712.img` and `initramfs_2712` unless set).
    #[serde(default)]
    pub kernel_file: Option<String>,
    #[serde(default)]
    pub initrd_file: Option<String>,
}

/// How `root=` names the root filesystem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RootBy {
    /// `root=PARTUUID=...`: the partition table's id of the root partition.
    #[default]
    Partuuid,
    /// `root=LABEL=...`: the root filesystem's label.
    Label,
}

/// A raw bootloader blob, fetched by URL into the cache and checked by sha256.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Blob {
    /// What it is, for messages.
    pub description: String,
    /// Byte offset on the disk (at least 512: sector 0 keeps the partition table).
    pub offset: Bytes,
    pub url: String,
    /// Hex sha256 of the file at `url`; a download that does not match aborts the build.
    /// Empty means not pinned yet: the build then needs `--uboot FILE`.
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QemuFirmware {
    /// x86-64 UEFI (package ovmf), as pflash.
    Ovmf,
    /// Debian's u-boot for QEMU's arm64 `virt` machine (package u-boot-qemu), as -bios; it
    /// boots the image's own extlinux.conf.
    UbootQemu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QemuDisk {
    Virtio,
    Nvme,
}

/// How `picoimg run` emulates the board.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Qemu {
    pub machine: String,
    #[serde(default)]
    pub cpu: Option<String>,
    pub firmware: QemuFirmware,
    pub memory: String,
    pub cpus: u32,
    pub disk: QemuDisk,
}

/// A partition placed on the disk: byte offsets, aligned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placed {
    pub index: usize,
    pub start: u64,
    pub size: u64,
}

/// Bytes GPT needs at the end of the disk for the backup table (33 sectors).
pub const GPT_TAIL: u64 = 33 * 512;

impl Board {
    /// Reads and checks a board file.
    pub fn load(path: &Path) -> Result<Board> {
        let text = picoimg_firstboot::input::read_text(
            path,
            picoimg_firstboot::input::CONFIG_LIMIT,
            "board file",
        )?;
        Board::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Board> {
        let board: Board = toml::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {}\nhint: see boards/h4.toml for every key a board file takes",
                path.display(),
                e.to_string().trim_end()
            )
        })?;
        board
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
        Ok(board)
    }

    fn validate(&self) -> Result<()> {
        if !self.sources.contains_key(&self.default_sources) {
            bail!(
                "default_sources = \"{}\" names no [sources.{}] set (sets: {})",
                self.default_sources,
                self.default_sources,
                self.sources.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        for (name, set) in &self.sources {
            if set.apt.is_empty() {
                bail!("sources.{name}.apt is empty: add at least one [[sources.{name}.apt]]");
            }
            if set.packages.kernel.is_empty() {
                bail!(
                    "sources.{name}.packages.kernel is empty: name the kernel package, e.g. \"linux-image-{}\"",
                    self.arch.as_str()
                );
            }
            self.check_kernel_arch(name, set)?;
        }
        let mut names = std::collections::BTreeSet::new();
        let mut mounts = std::collections::BTreeSet::new();
        for p in &self.disk.partitions {
            if !names.insert(&p.name) {
                bail!(
                    "disk.partition: two partitions are named `{}`: give each its own name",
                    p.name
                );
            }
            if !mounts.insert(&p.mount) {
                bail!(
                    "disk.partition `{}`: mount = \"{}\" is another partition's mount point too",
                    p.name,
                    p.mount
                );
            }
            if !p.mount.starts_with('/')
                || p.mount.split('/').any(|c| c == ".." || c == ".")
                || p.mount.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                bail!(
                    "disk.partition `{}`: mount = {:?} must be an absolute path without `..` or spaces",
                    p.name,
                    p.mount
                );
            }
            // GPT partition names are 36 UTF-16 code units.
            if p.name.is_empty()
                || p.name.encode_utf16().count() > 36
                || p.name.chars().any(char::is_control)
            {
                bail!(
                    "disk.partition name {:?} must be 1-36 characters (a GPT name is 36 UTF-16 units), without control characters",
                    p.name
                );
            }
        }
        let roots: Vec<_> = self
            .disk
            .partitions
            .iter()
            .filter(|p| p.mount == "/")
            .collect();
        if roots.len() != 1 {
            bail!(
                "disk.partition: exactly one partition must have mount = \"/\" (found {})",
                roots.len()
            );
        }
        if roots[0].fs != Filesystem::Ext4 {
            bail!(
                "disk.partition `{}`: the root filesystem must be ext4",
                roots[0].name
            );
        }
        if self.boot.loader == Loader::SystemdBoot
            && !self
                .disk
                .partitions
                .iter()
                .any(|p| p.kind == PartType::Esp && p.fs == Filesystem::Vfat)
        {
            bail!("boot.loader = \"systemd-boot\" needs a partition with type = \"esp\" and fs = \"vfat\"");
        }
        if self.boot.loader == Loader::Extlinux
            && !self
                .disk
                .partitions
                .iter()
                .any(|p| p.fs == Filesystem::Vfat)
        {
            bail!("boot.loader = \"extlinux\" needs a FAT partition (fs = \"vfat\") to boot from");
        }
        if let Some(b) = &self.boot.blob {
            if b.offset.0 < 512 || !b.offset.0.is_multiple_of(512) {
                bail!(
                    "boot.blob.offset = {}: must be a multiple of 512 and at least 512 (sector 0 holds the partition table)",
                    b.offset
                );
            }
            if self.disk.table == TableKind::Gpt && b.offset.0 < 34 * 512 {
                bail!(
                    "boot.blob.offset = {} overlaps the GPT header and entries (sectors 1-33); \
                     use disk.table = \"mbr\" for boards whose boot ROM reads sector 1",
                    b.offset
                );
            }
            if !b.sha256.is_empty()
                && (b.sha256.len() != 64 || !b.sha256.bytes().all(|c| c.is_ascii_hexdigit()))
            {
                bail!("boot.blob.sha256 = \"{}\": must be 64 hex digits", b.sha256);
            }
        }
        for p in &self.disk.partitions {
            let max = match p.fs {
                Filesystem::Vfat => 11,
                Filesystem::Ext4 => 16,
            };
            if p.label.len() > max || !p.label.is_ascii() {
                bail!(
                    "disk.partition `{}`: label \"{}\" must be at most {max} ASCII characters for {:?}",
                    p.name,
                    p.label,
                    p.fs
                );
            }
        }
        if self
            .disk
            .partitions
            .iter()
            .filter(|p| p.kind == PartType::Esp)
            .count()
            > 1
        {
            bail!("disk.partition: more than one has type = \"esp\"; firmware expects one EFI system partition");
        }
        if self.disk.align.0 == 0 || !self.disk.align.0.is_multiple_of(512) {
            bail!(
                "disk.align = {}: must be a multiple of 512 bytes, e.g. \"1MiB\"",
                self.disk.align
            );
        }
        self.layout()?;
        Ok(())
    }

    /// The source set `name` (default: `default_sources`), or an error listing the sets.
    pub fn source_set(&self, name: Option<&str>) -> Result<(&str, &SourceSet)> {
        let name = name.unwrap_or(&self.default_sources);
        match self.sources.get_key_value(name) {
            Some((k, v)) => Ok((k.as_str(), v)),
            None => bail!(
                "unknown source set `{name}` for board `{}`; it has: {}",
                self.name,
                self.sources.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// A kernel package built for another architecture is a board-file mistake.
    fn check_kernel_arch(&self, set_name: &str, set: &SourceSet) -> Result<()> {
        let foreign: &[&str] = match self.arch {
            Arch::Amd64 => &["arm64", "aarch64", "armhf", "rpi", "raspi", "meson"],
            Arch::Arm64 => &["amd64", "x86", "686"],
        };
        for k in &set.packages.kernel {
            if let Some(tag) = foreign.iter().find(|t| k.contains(*t)) {
                bail!(
                    "sources.{set_name}.packages.kernel `{k}` looks like a kernel for another \
                     architecture (`{tag}`), but arch = \"{}\"; pick a {} kernel package",
                    self.arch.as_str(),
                    self.arch.as_str()
                );
            }
        }
        Ok(())
    }

    /// Places every partition: aligned starts, "fill" up to the end of the image, and no
    /// overlaps or overruns.
    pub fn layout(&self) -> Result<Vec<Placed>> {
        let align = self.disk.align.0;
        let disk_size = self.disk.size.0;
        if !disk_size.is_multiple_of(512) {
            bail!(
                "disk.size = {}: must be a multiple of 512 bytes",
                self.disk.size
            );
        }
        let tail = match self.disk.table {
            TableKind::Gpt => GPT_TAIL,
            TableKind::Mbr => 0,
        };
        let usable_end = (disk_size - tail.min(disk_size)) / align * align;
        if self.disk.table == TableKind::Mbr && disk_size / 512 > u32::MAX as u64 {
            bail!(
                "disk.size = {}: an MBR disk can address at most 2 TiB",
                self.disk.size
            );
        }
        let mut placed: Vec<Placed> = Vec::new();
        let mut next = align.max(MIB);
        let n = self.disk.partitions.len();
        if n == 0 {
            bail!("disk: no [[disk.partition]]");
        }
        if self.disk.table == TableKind::Mbr && n > 4 {
            bail!(
                "disk.table = \"mbr\" takes at most 4 partitions (found {n}); use fewer or \"gpt\""
            );
        }
        for (i, p) in self.disk.partitions.iter().enumerate() {
            let start = match p.start {
                Some(s) if s.0 % align != 0 => bail!(
                    "disk.partition `{}`: start = {} is not aligned to disk.align = {}",
                    p.name,
                    s,
                    self.disk.align
                ),
                Some(s) => s.0,
                None => next,
            };
            let size = match p.size {
                PartSize::Fixed(b) if b.0 == 0 || b.0 % align != 0 => bail!(
                    "disk.partition `{}`: size = {} must be a non-zero multiple of disk.align = {}",
                    p.name,
                    b,
                    self.disk.align
                ),
                PartSize::Fixed(b) => b.0,
                PartSize::Fill if i + 1 != n => bail!(
                    "disk.partition `{}`: size = \"fill\" is only allowed on the last partition",
                    p.name
                ),
                PartSize::Fill => {
                    if start >= usable_end {
                        bail!(
                            "disk.partition `{}` starts at {} but the image is only {}: raise disk.size",
                            p.name,
                            Bytes(start),
                            self.disk.size
                        );
                    }
                    usable_end - start
                }
            };
            let end = start.checked_add(size).filter(|e| *e <= usable_end);
            let Some(end) = end else {
                bail!(
                    "disk.partition `{}` ({} at {}) ends past the usable end of a {} image ({}): \
                     shrink the partition or raise disk.size",
                    p.name,
                    Bytes(size),
                    Bytes(start),
                    self.disk.size,
                    Bytes(usable_end)
                );
            };
            for q in &placed {
                if start < q.start + q.size && q.start < end {
                    let other = &self.disk.partitions[q.index].name;
                    bail!(
                        "disk.partition `{}` ({}..{}) overlaps `{other}` ({}..{}): fix its start or size",
                        p.name,
                        Bytes(start),
                        Bytes(end),
                        Bytes(q.start),
                        Bytes(q.start + q.size)
                    );
                }
            }
            placed.push(Placed {
                index: i,
                start,
                size,
            });
            // end <= usable_end, which is a multiple of align.
            next = end.div_ceil(align) * align;
        }
        Ok(placed)
    }

    pub fn root_partition(&self) -> (usize, &Partition) {
        self.disk
            .partitions
            .iter()
            .enumerate()
            .find(|(_, p)| p.mount == "/")
            .expect("validated: one root partition")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn h4_text() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../boards/h4.toml"))
            .expect("boards/h4.toml")
    }

    fn parse(text: &str) -> Result<Board> {
        Board::parse(text, Path::new("boards/test.toml"))
    }

    #[test]
    fn board_round_trips_through_json() {
        let b = parse(&h4_text()).expect("h4 parses");
        let json = serde_json::to_string(&b).expect("serialises");
        let back: Board = serde_json::from_str(&json).expect("parses back");
        assert_eq!(back.layout().expect("layout"), b.layout().expect("layout"));
    }

    #[test]
    fn h4_parses_and_lays_out() {
        let b = parse(&h4_text()).expect("h4 parses");
        let l = b.layout().expect("layout");
        assert_eq!(l[0].start, MIB);
        assert_eq!(l[1].start, l[0].start + l[0].size);
        assert!(l[1].start + l[1].size <= b.disk.size.0 - GPT_TAIL);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let t = h4_text().replace("[boot]", "[boot]\ncolour = \"red\"");
        let e = format!("{:#}", parse(&t).unwrap_err());
        assert!(e.contains("boards/test.toml"), "{e}");
        assert!(e.contains("colour"), "{e}");
        assert!(e.contains("hint"), "{e}");
    }

    #[test]
    fn missing_field_is_named() {
        let t = h4_text().replace("arch = \"amd64\"\n", "");
        let e = format!("{:#}", parse(&t).unwrap_err());
        assert!(e.contains("missing field `arch`"), "{e}");
        assert!(e.contains("boards/test.toml"), "{e}");
    }

    #[test]
    fn wrong_type_is_rejected() {
        let t = h4_text().replace("cpus = 2", "cpus = \"two\"");
        let e = format!("{:#}", parse(&t).unwrap_err());
        assert!(e.contains("cpus"), "{e}");
    }

    #[test]
    fn overlapping_partitions_are_rejected() {
        let t = h4_text().replace("name = \"root\"", "name = \"root\"\nstart = \"128MiB\"");
        let e = format!("{:#}", parse(&t).unwrap_err());
        assert!(e.contains("overlaps `esp`"), "{e}");
    }

    #[test]
    fn partition_larger_than_image_is_rejected() {
        let t = h4_text().replace("size = \"256MiB\"", "size = \"64GiB\"");
        let e = format!("{:#}", parse(&t).unwrap_err());
        assert!(e.contains("ends past the usable end"), "{e}");
    }

    #[test]
    fn foreign_kernel_is_rejected() {
        let t = h4_text().replace("\"linux-image-amd64\"", "\"linux-image-arm64\"");
        let e = format!("{:#}", parse(&t).unwrap_err());
        assert!(e.contains("another architecture"), "{e}");
    }
}
