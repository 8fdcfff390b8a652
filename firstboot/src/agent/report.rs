//! Reporting: every line goes to the console and the journal (stdout of the units), progress
//! to `/run/picoimg/status.json`, the end result to `picoimg/status.txt` on the boot
//! partition. Every string passes [`Reporter::redact`] first: the registered stacks' derived
//! secrets and the cluster secret never leave the node's root-only files.

use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::contract::{NODE_CONFIGURED, NODE_FAILED, NODE_READY, NODE_UNCONFIGURED};
use crate::fsutil::write_atomic;

use super::state::now;

pub const STATUS_JSON: &str = "run/picoimg/status.json";
/// On the boot partition.
pub const STATUS_TXT: &str = "picoimg/status.txt";

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// No cluster file: the node keeps the image's defaults.
    Unconfigured,
    /// `apply` finished; services are starting.
    Configured,
    Ready,
    Failed,
    UnknownNode,
}

#[derive(Debug, Clone, Serialize)]
struct StepLine {
    name: String,
    result: String,
    detail: String,
}

#[derive(Debug, Clone, Serialize)]
struct Status {
    state: Outcome,
    cluster: String,
    node: String,
    message: String,
    steps: Vec<StepLine>,
    updated: u64,
}

pub struct Reporter {
    /// Lines printed, kept for tests.
    pub lines: Vec<String>,
    echo: bool,
    status_json: PathBuf,
    boot: PathBuf,
    status: Status,
    /// Strings that must never be reported (`Secrets::redacted`).
    secrets: Vec<String>,
}

impl Reporter {
    pub fn new(status_json: PathBuf, boot: PathBuf, echo: bool) -> Reporter {
        Reporter {
            lines: Vec::new(),
            echo,
            status_json,
            boot,
            status: Status {
                state: Outcome::Configured,
                cluster: String::new(),
                node: String::new(),
                message: String::new(),
                steps: Vec::new(),
                updated: now(),
            },
            secrets: Vec::new(),
        }
    }

    /// The strings to redact from now on.
    pub fn hide(&mut self, secrets: Vec<String>) {
        self.secrets = secrets.into_iter().filter(|s| !s.is_empty()).collect();
    }

    pub fn set_cluster(&mut self, cluster: String) {
        self.status.cluster = self.redact(&cluster);
    }

    pub fn set_node(&mut self, node: String) {
        self.status.node = self.redact(&node);
    }

    pub fn say(&mut self, line: String) {
        let line = self.redact(&line);
        if self.echo {
            println!("{line}");
            let _ = std::io::stdout().flush();
        }
        self.lines.push(line);
    }

    pub fn redact(&self, s: &str) -> String {
        let mut s = s.to_owned();
        for secret in &self.secrets {
            s = s.replace(secret.as_str(), "<redacted>");
        }
        s
    }

    /// `picoimg: step NAME RESULT[: DETAIL]`, and the status file updated.
    pub fn step(&mut self, name: &str, result: &str, detail: &str) {
        let line = if detail.is_empty() {
            format!("picoimg: step {name} {result}")
        } else {
            format!("picoimg: step {name} {result}: {detail}")
        };
        self.say(line);
        let s = StepLine {
            name: self.redact(name),
            result: result.to_owned(),
            detail: self.redact(detail),
        };
        self.status.steps.push(s);
        self.publish(false);
    }

    /// Writes /run/picoimg/status.json (after every step) and, with `boot`, picoimg/status.txt
    /// on the boot partition (at the end only: every FAT write is a chance for a power cut to
    /// damage the partition a user must then repair).
    fn publish(&mut self, boot: bool) {
        self.status.updated = now();
        if let Ok(json) = serde_json::to_vec_pretty(&self.status) {
            let json = self.redact(&String::from_utf8_lossy(&json));
            let _ = write_atomic(&self.status_json, json.as_bytes(), 0o644);
        }
        if !boot {
            return;
        }
        let mut txt = format!(
            "# picoimg first-boot status (secrets redacted), updated {} (unix time)\nstate: {}\ncluster: {}\nnode: {}\n",
            self.status.updated,
            serde_json::to_value(self.status.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            self.status.cluster,
            self.status.node,
        );
        if !self.status.message.is_empty() {
            txt.push_str(&format!("message: {}\n", self.status.message));
        }
        for s in &self.status.steps {
            txt.push_str(&format!("step {}: {} {}\n", s.name, s.result, s.detail));
        }
        let txt = self.redact(&txt);
        if self.boot.is_dir() {
            let _ = write_atomic(&self.boot.join(STATUS_TXT), txt.as_bytes(), 0o600);
        }
    }

    /// The end of a run: its console marker, both status files.
    pub fn finish(&mut self, state: Outcome, message: String) -> Outcome {
        self.status.state = state;
        self.status.message = self.redact(&message);
        let marker = match state {
            Outcome::Ready => NODE_READY,
            Outcome::Configured => NODE_CONFIGURED,
            Outcome::Unconfigured => NODE_UNCONFIGURED,
            Outcome::Failed | Outcome::UnknownNode => NODE_FAILED,
        };
        if message.is_empty() {
            self.say(marker.to_owned());
        } else {
            self.say(format!("{marker}: {message}"));
        }
        self.publish(true);
        state
    }
}
