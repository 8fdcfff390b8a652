//! Root filesystem tarballs: read files out of them and write a new one with overlays, generated
//! files and unit links applied, without unpacking anything to disk (so no root is needed and
//! ownership stays exact).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Normalises a tar member or absolute path to `a/b/c` (no leading `./` or `/`).
pub fn norm(p: &str) -> String {
    p.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_owned()
}

/// An entry read from a tarball.
#[derive(Debug, Clone)]
pub enum Found {
    File(Vec<u8>),
    Symlink(String),
}

/// Reads the given paths (files or symlinks) from a tarball in one pass.
pub fn read_paths(tar: &Path, wanted: &[&str]) -> Result<BTreeMap<String, Found>> {
    let wanted: BTreeSet<String> = wanted.iter().map(|p| norm(p)).collect();
    let mut out = BTreeMap::new();
    each_entry(tar, |path, entry| {
        if wanted.contains(path) {
            let kind = entry.header().entry_type();
            if kind.is_symlink() {
                let target = entry
                    .link_name()?
                    .map(|l| l.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.insert(path.to_owned(), Found::Symlink(target));
            } else if kind.is_file() {
                let mut buf = Vec::new();
                entry.read_to_end(&mut buf)?;
                out.insert(path.to_owned(), Found::File(buf));
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// Reads every regular file below `dir`, at any depth: path relative to `dir` -> contents.
pub fn read_tree(tar: &Path, dir: &str) -> Result<BTreeMap<String, Vec<u8>>> {
    let prefix = format!("{}/", norm(dir));
    let mut out = BTreeMap::new();
    each_entry(tar, |path, entry| {
        if let Some(rel) = path.strip_prefix(&prefix) {
            if !rel.is_empty() && entry.header().entry_type().is_file() {
                let mut buf = Vec::new();
                entry.read_to_end(&mut buf)?;
                out.insert(rel.to_owned(), buf);
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// Bytes in the tarball's regular files (a hard link's data counted once, at its first name).
pub fn file_bytes(tar: &Path) -> Result<u64> {
    let mut total = 0;
    each_entry(tar, |_, entry| {
        if entry.header().entry_type().is_file() {
            total += entry.header().size()?;
        }
        Ok(())
    })?;
    Ok(total)
}

/// Lists every path in the tarball (normalised).
pub fn list(tar: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    each_entry(tar, |path, _| {
        out.insert(path.to_owned());
        Ok(())
    })?;
    Ok(out)
}

fn each_entry(
    tar: &Path,
    mut f: impl FnMut(&str, &mut tar::Entry<'_, BufReader<File>>) -> Result<()>,
) -> Result<()> {
    let file = File::open(tar).with_context(|| format!("opening {}", tar.display()))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    for entry in archive
        .entries()
        .with_context(|| format!("reading {}", tar.display()))?
    {
        let mut entry = entry.with_context(|| format!("reading {}", tar.display()))?;
        let path = norm(&entry.path()?.to_string_lossy());
        f(&path, &mut entry)?;
    }
    Ok(())
}

/// A file to put into the image.
#[derive(Debug, Clone)]
pub enum NewEntry {
    File { data: Vec<u8>, mode: u32 },
    Symlink { target: String },
    Dir { mode: u32 },
}

/// Changes to apply on top of a base tarball.
#[derive(Debug, Default)]
pub struct Changes {
    /// Path (normalised) -> new content; replaces any base entry at that path.
    pub entries: BTreeMap<String, NewEntry>,
    /// Base entries to drop: exact paths, or prefixes ending in `*`.
    pub remove: Vec<String>,
}

impl Changes {
    pub fn file(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) {
        self.entries.insert(
            norm(path),
            NewEntry::File {
                data: data.into(),
                mode,
            },
        );
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entries.insert(
            norm(path),
            NewEntry::Symlink {
                target: target.to_owned(),
            },
        );
    }

    /// Adds every file, link and directory below `dir` at the same path in the image, owned
    /// by root, with the source's permission bits.
    pub fn add_tree(&mut self, dir: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let abs = dir.join(&rel);
            let mut names: Vec<_> = std::fs::read_dir(&abs)
                .with_context(|| format!("reading overlay {}", abs.display()))?
                .collect::<std::io::Result<_>>()?;
            names.sort_by_key(|e| e.file_name());
            for e in names {
                let r = rel.join(e.file_name());
                let key = norm(&r.to_string_lossy());
                let meta = std::fs::symlink_metadata(e.path())?;
                let mode = meta.permissions().mode() & 0o7777;
                if meta.file_type().is_symlink() {
                    let t = std::fs::read_link(e.path())?;
                    self.symlink(&key, &t.to_string_lossy());
                } else if meta.is_dir() {
                    self.entries.insert(key, NewEntry::Dir { mode: 0o755 });
                    stack.push(r);
                } else {
                    let data = std::fs::read(e.path())
                        .with_context(|| format!("reading overlay file {}", e.path().display()))?;
                    // git keeps only the executable bit: normalise to 0644 / 0755.
                    let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                    self.file(&key, data, mode);
                }
            }
        }
        Ok(())
    }

    /// Whether `path` (normalised) is removed: `dir/*` removes what is below `dir` but not
    /// `dir` itself (a mount point stays); `name*` removes names that start with `name`.
    fn removes(&self, path: &str) -> bool {
        self.remove.iter().any(|r| {
            let r = r.trim_start_matches("./").trim_start_matches('/');
            match r.strip_suffix('*') {
                Some(prefix) => path.starts_with(prefix),
                None => path == norm(r),
            }
        })
    }
}

/// What [`apply`] read on its way through the tree.
#[derive(Debug, Default)]
pub struct Applied {
    /// The entries asked for (`keep`) as the new tree has them.
    pub found: BTreeMap<String, Found>,
    /// Bytes in the new tree's regular files, as [`file_bytes`] counts them.
    pub file_bytes: u64,
}

/// Writes `out` = `base` with `changes` applied. Base entries replaced or removed are skipped;
/// new directories come before their contents; existing directories are kept as they are.
/// In the same pass it keeps the files and symlinks named in `keep` and counts the file bytes,
/// so the new tree is not read again for them.
pub fn apply(
    base: &Path,
    changes: &Changes,
    out: &Path,
    mtime: u64,
    keep: &[&str],
) -> Result<Applied> {
    let keep: BTreeSet<String> = keep.iter().map(|p| norm(p)).collect();
    let mut applied = Applied::default();
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
    let mut present = BTreeSet::new();
    let src = File::open(base).with_context(|| format!("opening {}", base.display()))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, src));
    for entry in archive
        .entries()
        .with_context(|| format!("reading {}", base.display()))?
    {
        crate::interrupt::check()?;
        let mut entry = entry.with_context(|| format!("reading {}", base.display()))?;
        let path = norm(&entry.path()?.to_string_lossy());
        let is_dir = entry.header().entry_type().is_dir();
        let replaced = match changes.entries.get(&path) {
            Some(NewEntry::Dir { .. }) => !is_dir,
            Some(_) => true,
            None => false,
        };
        if replaced || changes.removes(&path) {
            continue;
        }
        present.insert(path.clone());
        let mut header = entry.header().clone();
        // Extended attributes (file capabilities a package's postinst set with setcap) travel
        // as pax records; they are written again before the entry. Long names and the other
        // pax records are re-emitted by the builder from the full path and the header.
        let xattrs = xattrs(&mut entry).with_context(|| format!("reading {path}'s xattrs"))?;
        if !xattrs.is_empty() {
            builder
                .append_pax_extensions(xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .with_context(|| format!("copying {path}'s xattrs"))?;
        }
        let name = if path.is_empty() {
            ".".to_owned()
        } else {
            format!("./{path}")
        };
        if entry.header().entry_type().is_symlink() || entry.header().entry_type().is_hard_link() {
            let link = entry
                .link_name()?
                .map(|l| l.into_owned())
                .unwrap_or_default();
            if keep.contains(&path) && entry.header().entry_type().is_symlink() {
                applied.found.insert(
                    path.clone(),
                    Found::Symlink(link.to_string_lossy().into_owned()),
                );
            }
            builder
                .append_link(&mut header, &name, link)
                .with_context(|| format!("copying {path}"))?;
        } else {
            if entry.header().entry_type().is_file() {
                applied.file_bytes += entry.header().size()?;
            }
            if keep.contains(&path) && entry.header().entry_type().is_file() {
                let mut data = Vec::new();
                entry
                    .read_to_end(&mut data)
                    .with_context(|| format!("reading {path}"))?;
                builder
                    .append_data(&mut header, &name, data.as_slice())
                    .with_context(|| format!("copying {path}"))?;
                applied.found.insert(path.clone(), Found::File(data));
            } else {
                builder
                    .append_data(&mut header, &name, &mut entry)
                    .with_context(|| format!("copying {path}"))?;
            }
        }
    }
    // Parents first: BTreeMap order puts "a" before "a/b".
    for (path, new) in &changes.entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        let name = format!("./{path}");
        match new {
            NewEntry::Dir { mode } => {
                if present.contains(path) {
                    continue;
                }
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                builder.append_data(&mut h, &name, std::io::empty())?;
            }
            NewEntry::File { data, mode } => {
                ensure_parents(&mut builder, &mut present, changes, path, mtime)?;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                builder.append_data(&mut h, &name, data.as_slice())?;
                applied.file_bytes += data.len() as u64;
                if keep.contains(path) {
                    applied
                        .found
                        .insert(path.clone(), Found::File(data.clone()));
                }
            }
            NewEntry::Symlink { target } => {
                ensure_parents(&mut builder, &mut present, changes, path, mtime)?;
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                builder.append_link(&mut h, &name, target)?;
                if keep.contains(path) {
                    applied
                        .found
                        .insert(path.clone(), Found::Symlink(target.clone()));
                }
            }
        }
    }
    builder
        .into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(applied)
}

/// An entry's extended attributes, as the pax records GNU tar and libarchive write them
/// (`SCHILY.xattr.<name>`, which mke2fs -d reads back).
fn xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(pax) = entry.pax_extensions()? {
        for ext in pax {
            let ext = ext?;
            let key = ext.key().context("a pax record's key is not UTF-8")?;
            if key.starts_with("SCHILY.xattr.") {
                out.push((key.to_owned(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

/// Adds directory entries for parents that neither the base nor the changes have.
fn ensure_parents(
    builder: &mut tar::Builder<BufWriter<File>>,
    present: &mut BTreeSet<String>,
    changes: &Changes,
    path: &str,
    mtime: u64,
) -> Result<()> {
    let mut parents = Vec::new();
    let mut p = Path::new(path).parent();
    while let Some(dir) = p {
        let d = dir.to_string_lossy().into_owned();
        if d.is_empty() || present.contains(&d) || changes.entries.contains_key(&d) {
            break;
        }
        parents.push(d);
        p = dir.parent();
    }
    for d in parents.into_iter().rev() {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(0o755);
        h.set_mtime(mtime);
        h.set_size(0);
        builder.append_data(&mut h, format!("./{d}"), std::io::empty())?;
        present.insert(d);
    }
    Ok(())
}

/// An installed package, from the image's dpkg status file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// dpkg's estimate of the space it takes (`Installed-Size`, KiB).
    pub installed_size_kib: Option<u64>,
}

/// Parses `/var/lib/dpkg/status`: the installed packages, sorted by name.
pub fn parse_dpkg_status(text: &str) -> Vec<Package> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let field = |name: &str| {
            para.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_owned())
        };
        if field("Status").as_deref() != Some("install ok installed") {
            continue;
        }
        if let (Some(name), Some(version), Some(architecture)) =
            (field("Package"), field("Version"), field("Architecture"))
        {
            out.push(Package {
                name,
                version,
                architecture,
                installed_size_kib: field("Installed-Size").and_then(|v| v.parse().ok()),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The `[Install]` section of a unit file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Install {
    pub wanted_by: Vec<String>,
    pub required_by: Vec<String>,
    pub alias: Vec<String>,
    pub also: Vec<String>,
    pub default_instance: Option<String>,
}

pub fn parse_install(unit: &str) -> Install {
    let mut inst = Install::default();
    let mut in_install = false;
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_install = line == "[Install]";
            continue;
        }
        if !in_install || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let words = v.split_whitespace().map(str::to_owned);
        match k.trim() {
            "WantedBy" => inst.wanted_by.extend(words),
            "RequiredBy" => inst.required_by.extend(words),
            "Alias" => inst.alias.extend(words),
            "Also" => inst.also.extend(words),
            "DefaultInstance" => inst.default_instance = Some(v.trim().to_owned()),
            _ => {}
        }
    }
    inst
}

const UNIT_DIRS: [&str; 3] = [
    "etc/systemd/system",
    "usr/lib/systemd/system",
    "lib/systemd/system",
];

/// Enables units the way `systemctl enable` does: `.wants`/`.requires` links and aliases in
/// `/etc/systemd/system`, following `Also=`. Unit files come from `changes` first, then from
/// the base tarball.
pub fn enable_units(base: &Path, changes: &mut Changes, units: &[String]) -> Result<()> {
    // The unit files of every named unit, read from the base in one pass (a unit that only an
    // `Also=` names costs another pass, if any does).
    let mut files = UnitFiles {
        looked_up: BTreeSet::new(),
        found: BTreeMap::new(),
    };
    let in_changes = |name: &str| {
        UNIT_DIRS
            .iter()
            .any(|d| changes.entries.contains_key(&format!("{d}/{name}")))
    };
    files.fetch(
        base,
        units
            .iter()
            .map(|u| unit_file_name(u))
            .filter(|n| !in_changes(n)),
    )?;
    let mut todo: Vec<String> = units.to_vec();
    let mut done = BTreeSet::new();
    while let Some(unit) = todo.pop() {
        if !done.insert(unit.clone()) {
            continue;
        }
        let file_name = unit_file_name(&unit);
        let (path, text) = find_unit(base, changes, &mut files, &file_name)?;
        let inst = parse_install(&text);
        if inst.wanted_by.is_empty() && inst.required_by.is_empty() && inst.alias.is_empty() {
            bail!("unit `{unit}` has no [Install] section to enable it by");
        }
        let target = format!("/{path}");
        for (deps, kind) in [(&inst.wanted_by, "wants"), (&inst.required_by, "requires")] {
            for t in deps {
                changes.symlink(&format!("etc/systemd/system/{t}.{kind}/{unit}"), &target);
            }
        }
        for a in &inst.alias {
            changes.symlink(&format!("etc/systemd/system/{a}"), &target);
        }
        todo.extend(inst.also.iter().cloned());
    }
    Ok(())
}

/// The file a unit is defined by: template instances (serial-getty@ttyS0.service) use the
/// template's file.
fn unit_file_name(unit: &str) -> String {
    match unit.split_once('@') {
        Some((pre, rest)) if !rest.starts_with('.') => {
            let suffix = rest.rsplit_once('.').map(|x| x.1).unwrap_or("service");
            format!("{pre}@.{suffix}")
        }
        _ => unit.to_owned(),
    }
}

/// Unit files read from the base tarball, by path.
struct UnitFiles {
    /// File names already looked for.
    looked_up: BTreeSet<String>,
    found: BTreeMap<String, Found>,
}

impl UnitFiles {
    /// Reads every unit directory's copy of `names` not looked for yet, in one pass.
    fn fetch(&mut self, base: &Path, names: impl Iterator<Item = String>) -> Result<()> {
        let new: Vec<String> = names.filter(|n| self.looked_up.insert(n.clone())).collect();
        if new.is_empty() {
            return Ok(());
        }
        let candidates: Vec<String> = new
            .iter()
            .flat_map(|n| UNIT_DIRS.iter().map(move |d| format!("{d}/{n}")))
            .collect();
        let refs: Vec<&str> = candidates.iter().map(String::as_str).collect();
        self.found.extend(read_paths(base, &refs)?);
        Ok(())
    }
}

fn find_unit(
    base: &Path,
    changes: &Changes,
    files: &mut UnitFiles,
    name: &str,
) -> Result<(String, String)> {
    for dir in UNIT_DIRS {
        let p = format!("{dir}/{name}");
        if let Some(NewEntry::File { data, .. }) = changes.entries.get(&p) {
            return Ok((p, String::from_utf8_lossy(data).into_owned()));
        }
    }
    files.fetch(base, std::iter::once(name.to_owned()))?;
    for dir in UNIT_DIRS {
        let c = format!("{dir}/{name}");
        if let Some(Found::File(data)) = files.found.get(&c) {
            return Ok((c, String::from_utf8_lossy(data).into_owned()));
        }
    }
    bail!("unit `{name}` to enable is in no overlay and no installed package")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_section() {
        let i = parse_install(
            "[Unit]\nWantedBy=nope\n[Install]\nWantedBy=multi-user.target\nAlso=a.socket b.service\nAlias=dbus-x.service\n",
        );
        assert_eq!(i.wanted_by, ["multi-user.target"]);
        assert_eq!(i.also, ["a.socket", "b.service"]);
        assert_eq!(i.alias, ["dbus-x.service"]);
    }

    /// `dir/*` empties a mount point but keeps the directory itself.
    #[test]
    fn removing_below_a_mount_point_keeps_it() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let base = dir.path().join("base.tar");
        {
            let mut b = tar::Builder::new(File::create(&base)?);
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, "./boot/firmware/", std::io::empty())?;
            let mut h = tar::Header::new_gnu();
            h.set_size(3);
            h.set_mode(0o644);
            b.append_data(&mut h, "./boot/firmware/config.txt", &b"x=1"[..])?;
            b.finish()?;
        }
        let mut c = Changes::default();
        c.remove.push("boot/firmware/*".into());
        let out = dir.path().join("out.tar");
        apply(&base, &c, &out, 0, &[])?;
        let all = list(&out)?;
        assert!(all.contains("boot/firmware"), "{all:?}");
        assert!(!all.contains("boot/firmware/config.txt"), "{all:?}");
        Ok(())
    }

    #[test]
    fn dpkg_status() {
        let s = "Package: b\nStatus: install ok installed\nVersion: 2\nArchitecture: all\n\n\
                 Package: a\nStatus: install ok installed\nArchitecture: amd64\nInstalled-Size: 1234\nVersion: 1:1.0\n\n\
                 Package: gone\nStatus: deinstall ok config-files\nVersion: 1\nArchitecture: all\n";
        let p = parse_dpkg_status(s);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "a");
        assert_eq!(p[0].version, "1:1.0");
        assert_eq!(p[0].installed_size_kib, Some(1234));
        assert_eq!(p[1].installed_size_kib, None);
    }

    #[test]
    fn apply_replaces_removes_and_adds() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let base = dir.path().join("base.tar");
        {
            let mut b = tar::Builder::new(File::create(&base)?);
            for (p, d) in [
                ("./etc/hostname", "old\n"),
                ("./etc/ssh/ssh_host_rsa_key", "secret"),
            ] {
                let mut h = tar::Header::new_gnu();
                h.set_size(d.len() as u64);
                h.set_mode(0o600);
                b.append_data(&mut h, p, d.as_bytes())?;
            }
            b.finish()?;
        }
        let mut c = Changes::default();
        c.file("/etc/hostname", "h4\n", 0o644);
        c.file("/usr/lib/picoimg/new/tool", "#!/bin/sh\n", 0o755);
        c.remove.push("/etc/ssh/ssh_host_*".into());
        c.symlink("vmlinuz", "boot/vmlinuz-6.1");
        let out = dir.path().join("out.tar");
        let keep = ["etc/hostname", "vmlinuz", "etc/ssh/ssh_host_rsa_key"];
        let applied = apply(&base, &c, &out, 0, &keep)?;
        let all = list(&out)?;
        assert!(!all.contains("etc/ssh/ssh_host_rsa_key"));
        assert!(all.contains("usr/lib/picoimg/new"), "{all:?}");
        let got = read_paths(&out, &keep)?;
        assert!(matches!(got.get("etc/hostname"), Some(Found::File(d)) if d == b"h4\n"));
        // What apply kept on its way is what a second pass over its output reads.
        assert_eq!(format!("{got:?}"), format!("{:?}", applied.found));
        assert_eq!(applied.file_bytes, file_bytes(&out)?);
        assert_eq!(applied.file_bytes, 3 + 10);
        Ok(())
    }

    /// A file capability (what `setcap cap_net_raw+p` stores, as some packages' postinst
    /// scripts do) survives apply: GNU tar lists it from the output, and mke2fs -d puts it on
    /// the inode, where debugfs reads it.
    #[test]
    fn apply_keeps_extended_attributes() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let base = dir.path().join("base.tar");
        // security.capability v2, cap_net_raw (bit 13) permitted: what `setcap cap_net_raw+p`
        // stores.
        let cap: [u8; 20] = [
            0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        {
            let mut b = tar::Builder::new(File::create(&base)?);
            for d in ["./", "./usr/", "./usr/bin/"] {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(0o755);
                b.append_data(&mut h, d, std::io::empty())?;
            }
            b.append_pax_extensions([("SCHILY.xattr.security.capability", &cap[..])])?;
            let mut h = tar::Header::new_gnu();
            h.set_size(4);
            h.set_mode(0o755);
            b.append_data(&mut h, "./usr/bin/ping", &b"ping"[..])?;
            b.finish()?;
        }
        let mut c = Changes::default();
        c.file("/etc/hostname", "h4\n", 0o644);
        let out = dir.path().join("out.tar");
        apply(&base, &c, &out, 0, &[])?;
        let listed = crate::cmd::Cmd::new("tar")
            .args(["--xattrs", "--xattrs-include=*", "-tvvf"])
            .arg(&out)
            .read()?;
        assert!(
            listed.contains("x: 20 security.capability"),
            "tar lists no capability: {listed}"
        );
        let img = dir.path().join("fs.img");
        File::create(&img)?.set_len(16 << 20)?;
        let find = |p: &str| crate::cmd::find_program(p).unwrap_or_else(|| p.into());
        crate::cmd::Cmd::new(find("mke2fs"))
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(&out)
            .arg(&img)
            .run()?;
        let ea = crate::cmd::Cmd::new(find("debugfs"))
            .args(["-R", "ea_list /usr/bin/ping"])
            .arg(&img)
            .read()?;
        assert!(
            ea.contains("security.capability (20) = 00 00 00 02 00 20"),
            "{ea}"
        );
        Ok(())
    }
}
