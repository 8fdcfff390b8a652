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
        for pid in running {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
    })?;
    Ok(())
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
