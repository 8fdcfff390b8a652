//! The one way picoimg (the builder and the device agent) runs external programs.
//!
//! Every failure names the full argv and the tail of the program's stderr, so a user sees what
//! ran and why it failed without rerunning anything. Running children are registered so an
//! interrupt can stop them before temporary files are removed.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result};

/// How many lines of stderr an error shows.
const TAIL_LINES: usize = 20;

/// A program failed to start or exited unsuccessfully.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program is not installed (or not on PATH).
    #[error("`{program}` not found: {hint}")]
    NotFound { program: String, hint: String },
    /// The program ran and failed.
    #[error("`{argv}` failed ({status})\n{tail}")]
    Failed {
        argv: String,
        status: String,
        tail: String,
    },
}

static INSTALL_HINT: OnceLock<fn(&str) -> String> = OnceLock::new();
static SUPERVISOR: OnceLock<&'static dyn Supervisor> = OnceLock::new();

/// A program that supervises its children (the builder, whose Ctrl-C stops them) is told as
/// they start and end, and asked whether an interrupt stopped them, so their failure reads
/// "interrupted" rather than a signal number. The device agent installs none.
pub trait Supervisor: Sync {
    fn started(&self, pids: &[u32]);
    fn ended(&self, pids: &[u32]);
    fn interrupted(&self) -> bool;
}

/// Installs the process's supervisor (once; later calls are ignored).
pub fn set_supervisor(s: &'static dyn Supervisor) {
    let _ = SUPERVISOR.set(s);
}

fn interrupted() -> bool {
    SUPERVISOR.get().is_some_and(|s| s.interrupted())
}

/// Sets how a missing program's error says to install it (the builder names packages).
pub fn set_install_hint(f: fn(&str) -> String) {
    let _ = INSTALL_HINT.set(f);
}

/// Children started through [`Cmd`], reported to the supervisor while they run.
struct Registered(Vec<u32>);

impl Registered {
    fn new(pids: Vec<u32>) -> Self {
        if let Some(s) = SUPERVISOR.get() {
            s.started(&pids);
        }
        Registered(pids)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(s) = SUPERVISOR.get() {
            s.ended(&self.0);
        }
    }
}

/// A command line to run: program, arguments and extra environment.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    dir: Option<std::path::PathBuf>,
    /// Bytes written to the program's standard input (configuration that holds a secret).
    stdin: Option<Vec<u8>>,
    /// Indexes into `args` of arguments shown as `<hidden>` in errors and logs (a token the
    /// program only takes on its command line).
    hidden: Vec<usize>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            dir: None,
            stdin: None,
            hidden: Vec::new(),
        }
    }

    /// An argument that errors and logs show as `<hidden>` (a secret the program takes only
    /// on its command line).
    pub fn hidden_arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.hidden.push(self.args.len());
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Feeds `bytes` to the program's standard input.
    pub fn stdin_bytes(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs the program in `dir` instead of the current directory.
    pub fn dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.dir = Some(dir.as_ref().to_owned());
        self
    }

    /// The command line as a user would type it (for errors and logs).
    pub fn display(&self) -> String {
        std::iter::once(shell_quote(&self.program.to_string_lossy()))
            .chain(self.args.iter().enumerate().map(|(i, a)| {
                if self.hidden.contains(&i) {
                    "<hidden>".to_owned()
                } else {
                    shell_quote(&a.to_string_lossy())
                }
            }))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn expression(&self) -> duct::Expression {
        let mut e = duct::cmd(&self.program, &self.args);
        for (k, v) in &self.env {
            e = e.env(k, v);
        }
        if let Some(d) = &self.dir {
            e = e.dir(d);
        }
        if let Some(b) = &self.stdin {
            e = e.stdin_bytes(b.clone());
        }
        e.unchecked()
    }

    fn not_found(&self, err: &std::io::Error) -> Option<CommandError> {
        (err.kind() == std::io::ErrorKind::NotFound).then(|| {
            let program = self.program.to_string_lossy().into_owned();
            CommandError::NotFound {
                hint: match INSTALL_HINT.get() {
                    Some(f) => f(&program),
                    None => "install it, or put it on PATH".to_owned(),
                },
                program,
            }
        })
    }

    /// Runs to completion; returns stdout. Fails with argv and stderr tail.
    pub fn run(&self) -> Result<Vec<u8>> {
        let handle = self
            .expression()
            .stdout_capture()
            .stderr_capture()
            .start()
            .map_err(|e| self.spawn_error(e))?;
        let _reg = Registered::new(handle.pids());
        let out = handle
            .wait()
            .with_context(|| format!("waiting for `{}`", self.display()))?;
        if !out.status.success() {
            return Err(self.failed(out.status, &String::from_utf8_lossy(&out.stderr)));
        }
        Ok(out.stdout.clone())
    }

    /// Runs to completion; returns stdout as text.
    pub fn read(&self) -> Result<String> {
        let out = self.run()?;
        String::from_utf8(out).with_context(|| format!("`{}` printed non-UTF-8", self.display()))
    }

    /// Runs to completion, handing each line of combined stdout and stderr to `on_line` as it
    /// arrives (for progress); the error still carries the tail of that output.
    pub fn run_lines(&self, mut on_line: impl FnMut(&str)) -> Result<()> {
        let reader = self
            .expression()
            .stderr_to_stdout()
            .reader()
            .map_err(|e| self.spawn_error(e))?;
        let _reg = Registered::new(reader.pids());
        let mut tail = std::collections::VecDeque::with_capacity(TAIL_LINES);
        let mut buf = BufReader::new(&reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = buf
                .read_until(b'\n', &mut line)
                .with_context(|| format!("reading output of `{}`", self.display()))?;
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            on_line(text);
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(text.to_owned());
        }
        let status = reader
            .try_wait()
            .with_context(|| format!("waiting for `{}`", self.display()))?
            .map(|o| o.status);
        match status {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(self.failed(s, &Vec::from(tail).join("\n"))),
            None => anyhow::bail!("`{}` closed its output but did not exit", self.display()),
        }
    }

    /// Runs with the terminal's stdin, stdout and stderr (an interactive VM console).
    pub fn run_interactive(&self) -> Result<()> {
        let handle = self.expression().start().map_err(|e| self.spawn_error(e))?;
        let _reg = Registered::new(handle.pids());
        let out = handle
            .wait()
            .with_context(|| format!("waiting for `{}`", self.display()))?;
        if !out.status.success() {
            return Err(self.failed(out.status, ""));
        }
        Ok(())
    }

    /// Starts the program with stdout and stderr combined into a reader; the caller reads it
    /// (from any thread) and stops the program with [`Running::kill`].
    pub fn spawn_reader(&self) -> Result<Running> {
        let reader = self
            .expression()
            .stderr_to_stdout()
            .reader()
            .map_err(|e| self.spawn_error(e))?;
        let reg = Registered::new(reader.pids());
        Ok(Running {
            reader: std::sync::Arc::new(reader),
            _reg: reg,
        })
    }

    fn spawn_error(&self, e: std::io::Error) -> anyhow::Error {
        match self.not_found(&e) {
            Some(nf) => nf.into(),
            None => anyhow::Error::new(e).context(format!("starting `{}`", self.display())),
        }
    }

    fn failed(&self, status: std::process::ExitStatus, stderr: &str) -> anyhow::Error {
        let lines: Vec<&str> = stderr.lines().collect();
        let start = lines.len().saturating_sub(TAIL_LINES);
        let tail = lines[start..]
            .iter()
            .map(|l| format!("  | {l}"))
            .collect::<Vec<_>>()
            .join("\n");
        let status = if interrupted() {
            "interrupted".to_owned()
        } else {
            status.to_string()
        };
        CommandError::Failed {
            argv: self.display(),
            status,
            tail,
        }
        .into()
    }
}

/// A program started by [`Cmd::spawn_reader`]; killed on drop.
pub struct Running {
    reader: std::sync::Arc<duct::ReaderHandle>,
    _reg: Registered,
}

impl Running {
    /// The combined output, shareable with a reading thread.
    pub fn reader(&self) -> std::sync::Arc<duct::ReaderHandle> {
        self.reader.clone()
    }

    /// Stops the program and waits (at most ten seconds) until it has exited, so what it
    /// held (files, locks such as QEMU's on its disks) is free when this returns.
    pub fn kill(&self) {
        let _ = self.reader.kill();
        for _ in 0..500 {
            if !matches!(self.reader.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Quotes a word for display the way a POSIX shell would need it.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Whether `program` is on PATH (or is an existing path).
pub fn have(program: &str) -> bool {
    find_program(program).is_some()
}

/// Finds `program` on PATH, also searching the sbin directories a non-root PATH may lack.
pub fn find_program(program: &str) -> Option<std::path::PathBuf> {
    if program.contains('/') {
        return Path::new(program).exists().then(|| program.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(Into::into))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_argv_and_stderr_tail() {
        let err = Cmd::new("sh")
            .args(["-c", "echo first >&2; echo 'last words' >&2; exit 3"])
            .run()
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("sh -c 'echo first"), "{msg}");
        assert!(msg.contains("last words"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
    }

    #[test]
    fn missing_program_is_not_found_with_hint() {
        let err = Cmd::new("mmdebstrap-not-here").run().unwrap_err();
        assert!(matches!(
            err.downcast_ref::<CommandError>(),
            Some(CommandError::NotFound { .. })
        ));
    }

    #[test]
    fn run_lines_streams_and_keeps_tail() {
        let mut seen = Vec::new();
        let err = Cmd::new("sh")
            .args(["-c", "echo one; echo two >&2; exit 1"])
            .run_lines(|l| seen.push(l.to_owned()))
            .unwrap_err();
        assert_eq!(seen, ["one", "two"]);
        assert!(format!("{err}").contains("two"));
    }

    #[test]
    fn kill_returns_once_the_program_is_gone() {
        let running = Cmd::new("sleep").arg("60").spawn_reader().unwrap();
        let pid = running.reader().pids()[0];
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        running.kill();
        // Reaped, not a zombie: its /proc entry is gone.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("--x=1"), "--x=1");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
