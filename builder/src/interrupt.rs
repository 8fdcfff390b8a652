//! Ctrl-C and SIGTERM: stop running children, then let the current step fail so every
//! temporary file is removed by its owner's `Drop` on the way out. The registry of running
//! children lives here, in the builder: the command wrapper reports to it
//! ([`crate::cmd::Supervisor`]); the device agent has none.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::Result;

use crate::cmd;

static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

struct Children;

impl cmd::Supervisor for Children {
    fn started(&self, pids: &[u32]) {
        if let Ok(mut c) = CHILDREN.lock() {
            c.extend(pids);
        }
    }

    fn ended(&self, pids: &[u32]) {
        if let Ok(mut c) = CHILDREN.lock() {
            c.retain(|p| !pids.contains(p));
        }
    }

    fn interrupted(&self) -> bool {
        requested()
    }
}

static SUPERVISOR: Children = Children;

/// Installs the handler and the child registry. A second interrupt exits at once.
pub fn install() -> Result<()> {
    cmd::set_supervisor(&SUPERVISOR);
    ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("picoimg: interrupted again, exiting now");
            std::process::exit(130);
        }
        eprintln!("picoimg: interrupted, cleaning up (press Ctrl-C again to exit at once)");
        let running = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
        // The children and everything they started, as a terminal's Ctrl-C would reach them
        // (a SIGTERM or SIGINT sent to picoimg alone does not): mmdebstrap, told alone, waits
        // for its setup process to finish installing before it cleans up, and a second
        // interrupt would then leave its chroot's mounts behind.
        for pid in with_descendants(&running) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
    })?;
    Ok(())
}

/// `pids` and all their descendants, from /proc (parents first).
fn with_descendants(pids: &[u32]) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // /proc/PID/stat: "pid (comm) state ppid ...", comm may hold spaces and parentheses.
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((pid, ppid));
        }
    }
    let mut out: Vec<u32> = pids.to_vec();
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        for (c, pp) in &parent_of {
            if *pp == p && !out.contains(c) {
                out.push(*c);
            }
        }
        i += 1;
    }
    out
}

/// Whether an interrupt arrived.
pub fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails if an interrupt arrived; long loops call this between chunks of work.
pub fn check() -> Result<()> {
    if requested() {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shell's child and grandchild are found from the shell's pid.
    #[test]
    fn descendants_of_a_process_tree() {
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sh -c 'sleep 31' & wait"])
            .spawn()
            .expect("sh");
        std::thread::sleep(std::time::Duration::from_millis(300));
        let all = with_descendants(&[sh.id()]);
        let _ = sh.kill();
        for p in &all[1..] {
            if let Some(pid) = rustix::process::Pid::from_raw(*p as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        let _ = sh.wait();
        // sh, sleep 30, sh -c, sleep 31.
        assert!(all.len() >= 4, "{all:?}");
        assert_eq!(all[0], sh.id());
    }
}
