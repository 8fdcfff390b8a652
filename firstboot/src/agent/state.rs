//! The agent's progress on this node (`/var/lib/picoimg/state.json`): which steps ran with
//! which input, so a power cut resumes where it stopped and a rerun does nothing.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;
use crate::stack::Memo;

pub const STATE: &str = "var/lib/picoimg/state.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub cluster_id: String,
    pub cluster_name: String,
    pub node: String,
    /// Fingerprint of the cluster file last applied.
    pub fingerprint: String,
    pub steps: BTreeMap<String, StepRecord>,
    /// What stacks keep between boots (`crate::stack::Memo`).
    #[serde(default)]
    pub memo: Memo,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepRecord {
    /// sha256 of what the step was given; a different value means the file changed for it.
    pub input: String,
    /// Unix time it completed.
    pub at: u64,
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The recorded state; `None` on a node never configured.
pub fn load(root: &Path) -> Result<Option<State>> {
    match std::fs::read(root.join(STATE)) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!("reading {STATE}: remove it to configure the node from scratch")
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context(format!("reading {STATE}")),
    }
}

/// Records `s` durably (temp file, rename, syncfs) before anything is reported.
pub fn save(root: &Path, s: &State) -> Result<()> {
    write_atomic(&root.join(STATE), &serde_json::to_vec_pretty(s)?, 0o600)
        .context("recording progress")
}
