//! What the agent touches on the node: commands and ownership through [`System`] (a fake in
//! tests), files below a root directory through [`Target`], and account lookups.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cmd::Cmd;
use crate::contract::BUILD_INFO;
use crate::fsutil::write_atomic;

/// Side effects that cannot happen inside a temporary root: commands and ownership.
pub trait System {
    /// Runs a command to completion and returns its stdout.
    fn run(&self, cmd: &Cmd) -> Result<String>;
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> Result<()>;
    fn sleep(&self, d: Duration);
    /// One HTTP request to a service on 127.0.0.1 (secrets go in headers or the body).
    fn http(&self, req: &super::http::Request<'_>) -> Result<super::http::Reply>;
    /// Whether `host:port` (an IP address: the cluster file's) accepts a TCP connection within
    /// `timeout`. Nothing is sent: it tells whether another node's service is up.
    fn reachable(&self, host: &str, port: u16, timeout: Duration) -> bool;
    /// Sends one line to `host:port` (another node's handover channel) and reads one line
    /// back, each bounded in size and time.
    fn exchange(&self, host: &str, port: u16, line: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        let _ = (line, timeout);
        anyhow::bail!("this system has no network to reach {host}:{port}")
    }
}

/// The real system (the agent on a node, root = `/`).
pub struct Host;

impl System for Host {
    fn run(&self, cmd: &Cmd) -> Result<String> {
        cmd.read()
    }

    fn chown(&self, path: &Path, uid: u32, gid: u32) -> Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {uid}:{gid} {}", path.display()))
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }

    fn http(&self, req: &super::http::Request<'_>) -> Result<super::http::Reply> {
        super::http::send(req)
    }

    fn reachable(&self, host: &str, port: u16, timeout: Duration) -> bool {
        host.parse::<std::net::IpAddr>().is_ok_and(|ip| {
            std::net::TcpStream::connect_timeout(&std::net::SocketAddr::new(ip, port), timeout)
                .is_ok()
        })
    }

    fn exchange(&self, host: &str, port: u16, line: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        crate::handover::exchange(host, port, line, timeout)
    }
}

/// The system being configured: its root directory and its side effects.
pub struct Target<'a> {
    pub root: &'a Path,
    pub sys: &'a dyn System,
}

impl Target<'_> {
    /// `rel` (no leading slash) below the root.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Writes `/rel` atomically with `mode`.
    pub fn write(&self, rel: &str, text: &str, mode: u32) -> Result<()> {
        write_atomic(&self.p(rel), text.as_bytes(), mode).with_context(|| format!("writing /{rel}"))
    }

    /// A user's uid and gid from `etc/passwd`.
    pub fn ids(&self, name: &str) -> Option<(u32, u32)> {
        let f = account(self.root, "etc/passwd", name)?;
        Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
    }

    /// A group's gid from `etc/group`.
    pub fn gid(&self, group: &str) -> Option<u32> {
        account(self.root, "etc/group", group)?.get(2)?.parse().ok()
    }
}

/// The fields of `name`'s line in a colon-separated account file (`etc/passwd`, `etc/group`).
fn account(root: &Path, file: &str, name: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(root.join(file)).ok()?;
    text.lines()
        .map(|l| l.split(':').map(str::to_owned).collect::<Vec<_>>())
        .find(|f| f.first().is_some_and(|n| n == name))
}

/// Where the boot partition is mounted, from the image's build information.
pub fn boot_mount(root: &Path) -> PathBuf {
    let from_info = std::fs::read(root.join(BUILD_INFO))
        .ok()
        .and_then(|b| serde_json::from_slice::<crate::contract::BuildInfo>(&b).ok())
        .and_then(|info| info.boot_mount);
    let rel = from_info.unwrap_or_else(|| {
        ["boot/firmware", "boot/efi", "boot"]
            .into_iter()
            .find(|d| root.join(d).join("picoimg").is_dir())
            .unwrap_or("boot")
            .to_owned()
    });
    root.join(rel.trim_start_matches('/'))
}
