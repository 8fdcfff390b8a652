//! Progress for long work: an indicatif bar or spinner on a terminal, plain log lines otherwise
//! (CI logs, pipes), so output stays readable in both places.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Whether progress goes to a terminal.
pub fn is_tty() -> bool {
    std::io::stderr().is_terminal()
}

/// Prints a plain log line on stderr.
pub fn log(msg: impl std::fmt::Display) {
    eprintln!("picoimg: {msg}");
}

/// One named step of a longer job.
pub struct Step {
    name: String,
    started: Instant,
    bar: Option<ProgressBar>,
    total: u64,
    last_logged_pct: u64,
}

impl Step {
    /// Starts a step with no known size (spinner + latest output line).
    pub fn start(name: impl Into<String>) -> Step {
        let name = name.into();
        let bar = is_tty().then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {prefix} [{elapsed}] {wide_msg}")
                    .expect("static template"),
            );
            b.set_prefix(name.clone());
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        if bar.is_none() {
            log(format!("{name} ..."));
        }
        Step {
            name,
            started: Instant::now(),
            bar,
            total: 0,
            last_logged_pct: 0,
        }
    }

    /// Starts a step that moves through `total` bytes.
    pub fn bytes(name: impl Into<String>, total: u64) -> Step {
        let mut s = Step::start(name);
        s.total = total;
        if let Some(b) = &s.bar {
            b.set_length(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{elapsed}] [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
        }
        s
    }

    /// Shows a line of detail (the spinner's message; every line in plain mode if `verbose`).
    pub fn detail(&self, line: &str, verbose: bool) {
        match &self.bar {
            Some(b) => b.set_message(line.to_owned()),
            None if verbose => eprintln!("  {line}"),
            None => {}
        }
    }

    /// Sets how far through `total` the step is.
    pub fn position(&mut self, pos: u64) {
        match &self.bar {
            Some(b) => b.set_position(pos),
            None if self.total > 0 => {
                let pct = pos * 100 / self.total;
                if pct >= self.last_logged_pct + 10 {
                    self.last_logged_pct = pct - pct % 10;
                    log(format!("{}: {}%", self.name, self.last_logged_pct));
                }
            }
            None => {}
        }
    }

    /// Ends the step with its duration.
    pub fn done(self) {
        let secs = self.started.elapsed().as_secs_f64();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        log(format!("{} done in {secs:.1}s", self.name));
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Standard output was closed early (`picoimg boards | head -1`): the command ends quietly, as
/// Unix tools do.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// Writes to standard output; a closed pipe becomes [`StdoutClosed`] instead of a panic.
pub fn print(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    match o.write_fmt(args).and_then(|()| o.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}
