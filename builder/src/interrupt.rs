//! Ctrl-C and SIGTERM: stop running children, then let the current step fail so every
//! temporary file is removed by its owner's `Drop` on the way out.

use anyhow::Result;

use crate::cmd;

/// Installs the handler. A second interrupt exits at once.
pub fn install() -> Result<()> {
    ctrlc::set_handler(|| {
        if cmd::mark_interrupted() {
            eprintln!("picoimg: interrupted again, exiting now");
            std::process::exit(130);
        }
        eprintln!("picoimg: interrupted, cleaning up (press Ctrl-C again to exit at once)");
        for pid in cmd::running_children() {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
    })?;
    Ok(())
}

/// Whether an interrupt arrived.
pub fn requested() -> bool {
    cmd::interrupted()
}

/// Fails if an interrupt arrived; long loops call this between chunks of work.
pub fn check() -> Result<()> {
    if requested() {
        anyhow::bail!("interrupted");
    }
    Ok(())
}
