//! The one way picoimg (the builder and the device agent) replaces a file.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` with permission bits `mode` through a temporary file in the same
/// directory, then renames it and syncs the filesystem: a failure or a power cut leaves the
/// old file or the new one, never half of one, and no temporary file after an error.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().context("path has no file name")?;
    // Unique per process, so two picoimg runs writing one output directory do not collide.
    let tmp = dir.join(format!(
        ".{}.{}.picoimg-tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        // FAT ignores modes; elsewhere the mode must hold even if umask narrowed it.
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode));
        std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The whole filesystem, not just the directory: Linux's vfat keeps directory entries and
    // the FAT in separate buffers, and a power cut after a directory fsync alone was seen to
    // leave an entry pointing at clusters already freed.
    let d = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    rustix::fs::syncfs(&d)
        .with_context(|| format!("syncing the filesystem of {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_with_its_mode_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("secret.toml");
        std::fs::write(&p, "old").expect("write");
        write_atomic(&p, b"new", 0o600).expect("replaced");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "new");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A path whose parent is a file: refused, nothing left behind.
        assert!(write_atomic(&p.join("x"), b"y", 0o644).is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
