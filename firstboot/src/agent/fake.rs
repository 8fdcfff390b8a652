//! A fake `System` for tests: commands and HTTP requests are recorded; the few whose output
//! matters answer as the real ones would.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};

use super::http::{Reply, Request};
use super::System;
use crate::cmd::Cmd;

/// A test's answer to a command line: `Some(output)`, or `None` for the built-in answer.
pub type Answer = Box<dyn Fn(&str) -> Option<String>>;

/// Commands are recorded; the few whose output matters answer as the real ones would.
pub struct Fake {
    root: PathBuf,
    pub calls: RefCell<Vec<String>>,
    /// Commands starting with this fail.
    pub fail: Option<&'static str>,
    /// Whether the services answer as healthy.
    pub healthy: bool,
    /// Answers to HTTP requests (default: nothing listens).
    #[allow(clippy::type_complexity)]
    pub http: Box<dyn Fn(&Request<'_>) -> Result<Reply>>,
    /// A test's own answer to a command line (after it is recorded), before the built-in ones.
    pub answer: Answer,
    /// The pauses asked for, in seconds (nothing sleeps).
    pub slept: RefCell<Vec<u64>>,
    /// Whether `host:port` answers, given the pauses so far (default: nothing answers).
    #[allow(clippy::type_complexity)]
    pub reachable: Box<dyn Fn(&str, u16, &[u64]) -> bool>,
}

impl Fake {
    pub fn new(root: &Path) -> Fake {
        Fake {
            root: root.to_owned(),
            calls: RefCell::new(Vec::new()),
            fail: None,
            healthy: true,
            http: Box::new(|r| bail!("{r}: connection refused")),
            answer: Box::new(|_| None),
            slept: RefCell::new(Vec::new()),
            reachable: Box::new(|_, _, _| false),
        }
    }
    pub fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }
}

impl System for Fake {
    fn run(&self, cmd: &Cmd) -> Result<String> {
        let line = cmd.display();
        self.calls.borrow_mut().push(line.clone());
        if self.fail.is_some_and(|f| line.starts_with(f)) {
            bail!("`{line}` failed (exit status: 1)");
        }
        if let Some(out) = (self.answer)(&line) {
            return Ok(out);
        }
        // `ceph-mon --mkfs -i NAME` makes the monitor's store.
        if let Some(rest) = line.strip_prefix("ceph-mon --cluster ceph --mkfs -i ") {
            let name = rest.split(' ').next().unwrap();
            let db = self
                .root
                .join(format!("var/lib/ceph/mon/ceph-{name}/store.db"));
            std::fs::create_dir_all(db).unwrap();
        }
        // Consul writes its node ID (its raft server ID; `b` in the peer list below) when it
        // first starts.
        if line.starts_with("systemctl start") && line.contains(" consul.service") {
            let id = self.root.join("var/lib/consul/node-id");
            if !id.exists() {
                std::fs::create_dir_all(id.parent().unwrap()).unwrap();
                std::fs::write(id, "b").unwrap();
            }
        }
        if line.starts_with("useradd") {
            let name = line.rsplit(' ').next().unwrap();
            let mut p = std::fs::read_to_string(self.root.join("etc/passwd")).unwrap();
            p.push_str(&format!("{name}:x:1000:1000::/home/{name}:/bin/bash\n"));
            std::fs::write(self.root.join("etc/passwd"), p).unwrap();
        }
        Ok(match line.as_str() {
            "consul version" => "Consul v1.8.7\nProtocol 2 spoken by default\n".into(),
            "ip -o -4 addr show" => "2: enp0s2    inet 10.42.0.11/24 brd 10.42.0.255 scope global enp0s2\n".into(),
            "consul members" if self.healthy => "Node  Address  Status  Type  Build  Protocol  DC  Segment\npc1  10.42.0.11:8301  alive  server  1.8.7  2  dc1  <all>\n".into(),
            "nomad version" => "Nomad v1.9.7\nBuildDate 2025-03-11T09:07:15Z\nRevision f869597f5\n".into(),
            "nomad server members" if self.healthy => "Name        Address     Port  Status  Leader  Raft Version  Build  Datacenter  Region\npc0.global  10.42.0.10  4648  alive   true    3             1.9.7  dc1         global\npc1.global  10.42.0.11  4648  alive   false   3             1.9.7  dc1         global\npc2.global  10.42.0.12  4648  alive   false   3             1.9.7  dc1         global\n".into(),
            "nomad node status" if self.healthy => "ID        Node Pool  DC   Name  Class   Drain  Eligibility  Status\n1f3b4c5d  default    dc1  pc1   <none>  false  eligible     ready\n".into(),
            "consul operator raft list-peers" if self.healthy => "Node  ID  Address  State  Voter  RaftProtocol\npc0  a  10.42.0.10:8300  leader  true  3\npc1  b  10.42.0.11:8300  follower  true  3\npc2  c  10.42.0.12:8300  follower  true  3\n".into(),
            _ => String::new(),
        })
    }
    fn chown(&self, _: &Path, _: u32, _: u32) -> Result<()> {
        Ok(())
    }
    fn sleep(&self, d: Duration) {
        self.slept.borrow_mut().push(d.as_secs());
    }
    fn http(&self, req: &Request<'_>) -> Result<Reply> {
        self.calls.borrow_mut().push(format!("{req} {}", req.body));
        (self.http)(req)
    }
    fn reachable(&self, host: &str, port: u16, _: Duration) -> bool {
        self.calls
            .borrow_mut()
            .push(format!("connect {host}:{port}"));
        (self.reachable)(host, port, &self.slept.borrow())
    }
}
