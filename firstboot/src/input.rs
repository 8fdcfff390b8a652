//! Reading input files safely: only regular files, never more than a limit. A path that is a
//! device, a FIFO or a huge file gets a clear refusal instead of a read that never ends.

use std::io::Read;
use std::path::Path;

/// Limit for configuration files a person writes (cluster file, node.toml, board and
/// component files, manifests).
pub const CONFIG_LIMIT: u64 = 1 << 20;
/// Limit for block maps (a 2 TiB image with a range per block would still be far smaller).
pub const BMAP_LIMIT: u64 = 64 << 20;

/// Why an input file was not read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is {kind}, not a regular file: give the path of a file")]
    NotAFile { path: String, kind: &'static str },
    #[error("{path} is larger than {limit} bytes: not a {what}")]
    TooLarge {
        path: String,
        limit: u64,
        what: &'static str,
    },
    #[error("{path} is not UTF-8 text: not a {what}")]
    NotText { path: String, what: &'static str },
}

/// What kind of file system object `meta` describes, for messages.
pub fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a regular file"
    }
}

/// Reads `path` (following symlinks) if it is a regular file of at most `limit` bytes.
/// `what` names the kind of file in messages ("cluster file").
pub fn read_bytes(path: &Path, limit: u64, what: &'static str) -> Result<Vec<u8>, InputError> {
    let shown = path.display().to_string();
    let io = |source| InputError::Io {
        path: shown.clone(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(InputError::NotAFile {
            kind: kind_of(&meta),
            path: shown,
        });
    }
    let too_large = || InputError::TooLarge {
        path: shown.clone(),
        limit,
        what,
    };
    if meta.len() > limit {
        return Err(too_large());
    }
    let f = std::fs::File::open(path).map_err(io)?;
    // The file may have been swapped or grown since the check: read at most limit + 1.
    let mut buf = Vec::with_capacity(meta.len() as usize);
    f.take(limit + 1).read_to_end(&mut buf).map_err(io)?;
    if buf.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(buf)
}

/// As [`read_bytes`], as UTF-8 text.
pub fn read_text(path: &Path, limit: u64, what: &'static str) -> Result<String, InputError> {
    String::from_utf8(read_bytes(path, limit, what)?).map_err(|_| InputError::NotText {
        path: path.display().to_string(),
        what,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_devices_fifos_directories_and_large_files() {
        let e = read_text(Path::new("/dev/zero"), CONFIG_LIMIT, "cluster file").unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        let dir = tempfile::tempdir().expect("tempdir");
        let e = read_text(dir.path(), CONFIG_LIMIT, "cluster file").unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let big = dir.path().join("big");
        let f = std::fs::File::create(&big).expect("create");
        f.set_len(10 << 30).expect("sparse 10 GiB");
        let e = read_text(&big, CONFIG_LIMIT, "cluster file").unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        let bin = dir.path().join("bin");
        std::fs::write(&bin, [0xff, 0xfe, 0]).expect("write");
        let e = read_text(&bin, CONFIG_LIMIT, "cluster file").unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "a = 1\n").expect("write");
        assert_eq!(
            read_text(&ok, CONFIG_LIMIT, "cluster file").expect("reads"),
            "a = 1\n"
        );
    }
}
