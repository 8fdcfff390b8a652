//! Where the board and overlay data live.
//!
//! In order: `--data-dir`, `$PICOIMG_DATA_DIR`, `../share/picoimg` next to the executable (an
//! installed package), then the source tree this binary was built from.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

pub fn find(explicit: Option<&Path>) -> Result<PathBuf> {
    // A directory the user named is the only one tried: falling back to another would build
    // from data they did not ask for.
    if let Some(p) = explicit {
        if !p.join("boards").is_dir() || !p.join("overlays").is_dir() {
            bail!(
                "--data-dir {}: {}; it must hold boards/ and overlays/ (the picoimg source tree does)",
                p.display(),
                if p.is_dir() {
                    "has no boards/ and overlays/"
                } else {
                    "no such directory"
                }
            );
        }
        return Ok(p.canonicalize().unwrap_or(p.to_owned()));
    }
    let mut tried = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("PICOIMG_DATA_DIR") {
        candidates.push(p.into());
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(bin) = exe.parent() {
            candidates.push(bin.join("../share/picoimg"));
        }
    }
    candidates.push(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/..")));
    for c in candidates {
        if c.join("boards").is_dir() && c.join("overlays").is_dir() {
            return Ok(c.canonicalize().unwrap_or(c));
        }
        tried.push(c.display().to_string());
    }
    bail!(
        "no picoimg data directory (boards/ and overlays/) found; tried: {}\n\
         hint: pass --data-dir or set PICOIMG_DATA_DIR to the picoimg source tree",
        tried.join(", ")
    )
}

/// The board names available, from `boards/*.toml`.
pub fn board_names(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data.join("boards"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            if p.extension()? != "toml" {
                return None;
            }
            Some(p.file_stem()?.to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    names
}

/// Whether `s` can name a board, component or stack: lowercase letters, digits and '-' (so
/// it stays one path component inside the data directory).
pub fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Loads a board by name, with an error listing the valid names.
pub fn board(data: &Path, name: &str) -> Result<crate::board::Board> {
    if !plain_name(name) {
        bail!(
            "board name {name:?} must be lowercase letters, digits and '-'; valid boards: {}",
            board_names(data).join(", ")
        );
    }
    let path = data.join("boards").join(format!("{name}.toml"));
    if !path.is_file() {
        bail!(
            "unknown board `{name}`; valid boards: {}",
            board_names(data).join(", ")
        );
    }
    crate::board::Board::load(&path)
}
