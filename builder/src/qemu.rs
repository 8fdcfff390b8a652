//! `picoimg run`: boot an image in QEMU with its board's profile, serial console on stdout.
//!
//! The image itself is never modified unless `--writable`: QEMU writes to a qcow2 overlay in
//! a temporary directory (which can also make the disk bigger, to exercise root growth).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::board::{Board, QemuDisk, QemuFirmware};
use crate::cmd::Cmd;
use crate::progress::log;
use crate::size::Bytes;

/// Printed on the serial console by the image's `picoimg-boot-report.service`.
pub use picoimg_firstboot::contract::{BOOT_FAILED as FAILED_MARKER, BOOT_READY as READY_MARKER};

/// Guest networking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Net {
    /// QEMU user networking: the guest reaches what the host reaches.
    User,
    /// User networking with `restrict=on`: DHCP works, nothing leaves the VM.
    Restricted,
    /// No network card.
    None,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub image: PathBuf,
    pub board: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub expect_ready: bool,
    pub timeout: Duration,
    pub net: Net,
    pub disk_size: Option<Bytes>,
    pub writable: bool,
    pub ssh_port: Option<u16>,
    pub accel: Accel,
    /// `-nic` specifications replacing `net` and `ssh_port` (cluster rehearsals).
    pub nics: Vec<String>,
    /// Extra disks (qcow2), each a virtio disk with its serial (cluster rehearsals).
    pub data_disks: Vec<DataDisk>,
    /// Virtual CPUs instead of the board profile's `qemu.cpus`.
    pub cpus: Option<u32>,
}

/// An extra empty disk of a rehearsal VM: the guest sees it as a virtio disk with this
/// serial, so udev names it /dev/disk/by-id/virtio-SERIAL.
#[derive(Debug, Clone)]
pub struct DataDisk {
    pub path: PathBuf,
    pub serial: String,
}

/// The board an image was built for: `--board`, else the manifest beside the image.
pub fn board_for(opts: &RunOptions) -> Result<Board> {
    if let Some(name) = &opts.board {
        let data = crate::data::find(opts.data_dir.as_deref())?;
        return crate::data::board(&data, name);
    }
    let name = opts
        .image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.trim_end_matches(".xz").trim_end_matches(".img");
    let manifest = opts.image.with_file_name(format!("{stem}.manifest.json"));
    let text = picoimg_firstboot::input::read_text(
        &manifest,
        picoimg_firstboot::input::BMAP_LIMIT,
        "manifest",
    )
    .with_context(|| {
        format!(
            "reading {} to learn the image's board (or pass --board NAME)",
            manifest.display()
        )
    })?;
    #[derive(serde::Deserialize)]
    struct M {
        board: Board,
    }
    let m: M =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", manifest.display()))?;
    Ok(m.board)
}

pub fn run(opts: &RunOptions) -> Result<()> {
    if !opts.image.is_file() {
        bail!("image {} does not exist", opts.image.display());
    }
    let board = board_for(opts)?;
    let forced_kvm = opts.accel == Accel::Kvm;
    let tmp = tempfile::Builder::new()
        .prefix("picoimg-run-")
        .tempdir()
        .context("creating a temporary directory")?;
    let raw = if opts.image.extension().is_some_and(|e| e == "xz") {
        if opts.writable {
            bail!("--writable needs a raw .img, not {}", opts.image.display());
        }
        let raw = tmp.path().join("disk.img");
        decompress(&opts.image, &raw)?;
        raw
    } else {
        opts.image.canonicalize()?
    };
    // QEMU boots anything; refuse what is not a disk image before starting it.
    crate::ptable::read_path(&raw).with_context(|| {
        format!(
            "{} is not a bootable disk image (a picoimg .img or .img.xz)",
            opts.image.display()
        )
    })?;
    let disk = if opts.writable {
        raw
    } else {
        let overlay = tmp.path().join("overlay.qcow2");
        let mut c = Cmd::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&raw)
            .arg(&overlay);
        if let Some(s) = opts.disk_size {
            c = c.arg(s.0.to_string());
        }
        c.run().context("creating the disk overlay")?;
        overlay
    };
    let format = if opts.writable { "raw" } else { "qcow2" };
    let mut opts = opts.clone();
    opts.accel = resolve_accel(opts.accel, &board);
    let cmd = qemu_cmd(&board, &disk, format, tmp.path(), &opts)?;
    log(format!("starting: {}", cmd.display()));
    if !opts.expect_ready {
        return cmd.run_interactive().context("running QEMU");
    }
    // One deadline for the whole run, a restart under TCG included: the timeout is the user's.
    let deadline = Instant::now() + opts.timeout;
    match expect_ready(&cmd, deadline, opts.timeout) {
        Err(Stop::Kvm(line)) if opts.accel == Accel::Kvm && !forced_kvm => {
            log(format!(
                "KVM cannot run this guest here (QEMU: {line}): restarting under TCG (software emulation)"
            ));
            opts.accel = Accel::Tcg;
            let cmd = qemu_cmd(&board, &disk, format, tmp.path(), &opts)?;
            log(format!("starting: {}", cmd.display()));
            expect_ready(&cmd, deadline, opts.timeout).map_err(Stop::into_error)
        }
        r => r.map_err(Stop::into_error),
    }
}

/// Why a boot that waits for the ready marker stopped.
enum Stop {
    /// QEMU reported that KVM cannot run the guest.
    Kvm(String),
    Other(anyhow::Error),
}

impl Stop {
    fn into_error(self) -> anyhow::Error {
        match self {
            Stop::Kvm(line) => anyhow::anyhow!(
                "QEMU stopped: KVM cannot run this guest here ({line}); run with --accel tcg"
            ),
            Stop::Other(e) => e,
        }
    }
}

/// A raw copy of an image (`.img` copied sparsely, `.img.xz` decompressed sparsely).
pub fn raw_copy(src: &Path, dst: &Path) -> Result<()> {
    if src.extension().is_some_and(|e| e == "xz") {
        return decompress(src, dst);
    }
    let mut input =
        std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut out =
        std::fs::File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    crate::output::copy_sparse(&mut input, &mut out)
        .with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}

fn decompress(src: &Path, dst: &Path) -> Result<()> {
    let input = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut dec = xz2::read::XzDecoder::new_multi_decoder(BufReader::with_capacity(1 << 20, input));
    let mut out = std::fs::File::create(dst)?;
    crate::output::copy_sparse(&mut dec, &mut out)
        .with_context(|| format!("decompressing {}", src.display()))?;
    Ok(())
}

/// CPU emulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM when it works here (checked by a short trial run), else TCG.
    Auto,
    Kvm,
    /// Software emulation: slow, works everywhere.
    Tcg,
}

/// What QEMU prints when KVM cannot run the guest (nested virtualisation without the needed
/// features); QEMU then pauses the VM instead of exiting.
const KVM_FAILURES: [&str; 3] = [
    "KVM internal error",
    "emulation failure",
    "KVM: entry failed",
];

/// Whether a line of QEMU's output says KVM failed to run the guest.
pub fn kvm_failure(line: &str) -> bool {
    KVM_FAILURES.iter().any(|m| line.contains(m))
}

/// Whether KVM can run `program`'s machine here: `/dev/kvm` may open yet fail when a vCPU is
/// set up or when the guest runs its first instructions (nested virtualisation), so a QEMU
/// that runs real firmware code (its default BIOS) must survive two seconds without a KVM
/// error.
fn kvm_works(program: &str, machine: &str) -> bool {
    let guest = if program.ends_with("aarch64") {
        "aarch64"
    } else {
        "x86_64"
    };
    if guest != std::env::consts::ARCH {
        return false;
    }
    // $PICOIMG_KVM_DEVICE: another device node (or, in tests, a file standing in for it).
    let dev = std::env::var_os("PICOIMG_KVM_DEVICE").unwrap_or_else(|| "/dev/kvm".into());
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .is_err()
    {
        return false;
    }
    let probe = Cmd::new("timeout")
        .args([
            "2", program, "-accel", "kvm", "-cpu", "host", "-machine", machine,
        ])
        .args([
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
            "-monitor",
            "none",
            "-serial",
            "none",
        ])
        .run();
    match probe {
        Ok(_) => true,
        Err(e) => {
            let e = format!("{e:#}");
            e.contains("exit status: 124") && !kvm_failure(&e)
        }
    }
}

/// `Kvm` or `Tcg`: what `accel` means for this board on this machine (`Auto` probes once).
pub fn resolve_accel(accel: Accel, board: &Board) -> Accel {
    match accel {
        Accel::Auto => {
            let program = match board.qemu.firmware {
                QemuFirmware::Ovmf => "qemu-system-x86_64",
                QemuFirmware::UbootQemu => "qemu-system-aarch64",
            };
            if kvm_works(program, &board.qemu.machine) {
                Accel::Kvm
            } else {
                Accel::Tcg
            }
        }
        a => a,
    }
}

pub fn qemu_cmd(
    board: &Board,
    disk: &Path,
    format: &str,
    tmp: &Path,
    opts: &RunOptions,
) -> Result<Cmd> {
    let q = &board.qemu;
    let (program, fw) = match q.firmware {
        QemuFirmware::Ovmf => {
            let code = Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd");
            let vars = Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd");
            if !code.exists() || !vars.exists() {
                bail!(
                    "OVMF firmware not found at {}: `sudo apt-get install ovmf`",
                    code.display()
                );
            }
            let my_vars = tmp.join("OVMF_VARS.fd");
            std::fs::copy(vars, &my_vars).context("copying OVMF variables")?;
            (
                "qemu-system-x86_64",
                vec![
                    "-drive".to_owned(),
                    format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        code.display()
                    ),
                    "-drive".to_owned(),
                    format!("if=pflash,format=raw,unit=1,file={}", my_vars.display()),
                ],
            )
        }
        QemuFirmware::UbootQemu => {
            let bios = Path::new("/usr/lib/u-boot/qemu_arm64/u-boot.bin");
            if !bios.exists() {
                bail!(
                    "u-boot for QEMU not found at {}: `sudo apt-get install u-boot-qemu`",
                    bios.display()
                );
            }
            (
                "qemu-system-aarch64",
                vec!["-bios".to_owned(), bios.display().to_string()],
            )
        }
    };
    let kvm = resolve_accel(opts.accel, board) == Accel::Kvm;
    if !kvm {
        log("using TCG (software emulation): expect a slow boot");
    }
    let mut c = Cmd::new(program)
        .args(["-machine", &q.machine])
        .args(["-accel", if kvm { "kvm" } else { "tcg" }])
        .args([
            "-cpu",
            q.cpu.as_deref().unwrap_or(if kvm { "host" } else { "max" }),
        ])
        .args(["-m", &q.memory])
        .args(["-smp", &opts.cpus.unwrap_or(q.cpus).to_string()])
        .arg("-no-reboot")
        // No default devices: q35's default CD-ROM on its AHCI port once hung a guest's libata
        // probe for minutes under TCG (every device we need is added explicitly below).
        .arg("-nodefaults");
    c = c.args(fw);
    let file = format!("file={},format={format}", disk.display());
    c = match q.disk {
        QemuDisk::Virtio => c.arg("-drive").arg(format!("{file},if=virtio")),
        QemuDisk::Nvme => c
            .arg("-drive")
            .arg(format!("{file},if=none,id=disk0"))
            .args(["-device", "nvme,drive=disk0,serial=picoimg0"]),
    };
    for (i, d) in opts.data_disks.iter().enumerate() {
        c = c
            .arg("-drive")
            .arg(format!(
                "file={},format=qcow2,if=none,id=data{i}",
                d.path.display()
            ))
            .args([
                "-device",
                &format!("virtio-blk-pci,drive=data{i},serial={}", d.serial),
            ]);
    }
    let fwd = opts
        .ssh_port
        .map(|p| format!(",hostfwd=tcp:127.0.0.1:{p}-:22"))
        .unwrap_or_default();
    c = match opts.net {
        _ if !opts.nics.is_empty() => {
            for n in &opts.nics {
                c = c.args(["-nic", n]);
            }
            c
        }
        Net::User => c.args(["-nic", &format!("user,model=virtio-net-pci{fwd}")]),
        Net::Restricted => c.args([
            "-nic",
            &format!("user,model=virtio-net-pci,restrict=on{fwd}"),
        ]),
        Net::None => c.args(["-nic", "none"]),
    };
    c = if opts.expect_ready {
        c.args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
    } else {
        c.args(["-nographic", "-serial", "mon:stdio"])
    };
    Ok(c)
}

/// Reads a VM's console on a thread of its own: each line (CR and trailing space removed, and
/// lines a kernel message broke apart joined again: [`Mender`]) to `each` until it returns false
/// or the console closes, then `done`.
pub fn read_console(
    reader: std::sync::Arc<duct::ReaderHandle>,
    mut each: impl FnMut(String) -> bool + Send + 'static,
    done: impl FnOnce() + Send + 'static,
) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(&*reader);
        let mut line = Vec::new();
        let mut mender = Mender::default();
        'read: loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line).replace('\r', "");
                    for l in mender.push(text.trim_end()) {
                        if !each(l) {
                            break 'read;
                        }
                    }
                }
            }
        }
        if let Some(rest) = mender.pending.take() {
            each(rest.trim_end().to_owned());
        }
        done();
    });
}

/// Joins a console line that a kernel message broke apart. The kernel writes to the serial
/// port directly, so its message can land in the middle of a line userspace is writing (seen:
/// `picoimg-firstboot[504]: picoimg: [   26.100692] Bridge firewalling registered`, then
/// `failed: step ceph-devices: ...` on the next line, which hid the node's `picoimg: failed`
/// from the rehearsal). A kernel timestamp (`[    26.100692] `) after the start of a line marks
/// the break: the message goes out as a line of its own, and the text before it waits for the
/// next line that does not start with a timestamp (a few lines at most).
#[derive(Default)]
pub struct Mender {
    pending: Option<String>,
    waited: u32,
}

impl Mender {
    /// The lines to hand on for one console line.
    pub fn push(&mut self, line: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(head) = self.pending.take() {
            if stamp_at(line, 0) && self.waited < 8 {
                // Another kernel message before the rest of the broken line.
                self.waited += 1;
                self.pending = Some(head);
                out.push(line.to_owned());
                return out;
            }
            if stamp_at(line, 0) {
                out.push(head.trim_end().to_owned());
            } else {
                return self.split(&format!("{head}{line}"), out);
            }
        }
        self.split(line, out)
    }

    fn split(&mut self, line: &str, mut out: Vec<String>) -> Vec<String> {
        match kernel_stamp_after_start(line) {
            Some(at) => {
                self.pending = Some(line[..at].to_owned());
                self.waited = 0;
                out.push(line[at..].to_owned());
            }
            None => out.push(line.to_owned()),
        }
        out
    }
}

/// The first kernel timestamp in `line` after its own leading one (a forwarded journal line
/// starts with one).
fn kernel_stamp_after_start(line: &str) -> Option<usize> {
    let from = if stamp_at(line, 0) {
        line.find("] ").map(|i| i + 2).unwrap_or(line.len())
    } else {
        0
    };
    (from.max(1)..line.len())
        .filter(|&i| line.as_bytes()[i] == b'[')
        .find(|&i| stamp_at(line, i))
}

/// Whether a kernel timestamp (`[`, spaces, digits, `.`, six digits, `] `) starts at byte `i`
/// of `line`.
fn stamp_at(line: &str, i: usize) -> bool {
    let b = line.as_bytes();
    if b.get(i) != Some(&b'[') {
        return false;
    }
    let mut j = i + 1;
    while b.get(j) == Some(&b' ') {
        j += 1;
    }
    let digits = |j: &mut usize| {
        let start = *j;
        while b.get(*j).is_some_and(u8::is_ascii_digit) {
            *j += 1;
        }
        *j - start
    };
    if digits(&mut j) == 0 || b.get(j) != Some(&b'.') {
        return false;
    }
    j += 1;
    digits(&mut j) == 6 && b.get(j) == Some(&b']') && b.get(j + 1) == Some(&b' ')
}

/// Streams the console to stdout until the ready marker (Ok), the failed marker, QEMU's exit
/// or `deadline` (Err with the last 50 console lines, naming the `timeout` the run was given),
/// or QEMU's report that KVM failed.
fn expect_ready(cmd: &Cmd, deadline: Instant, timeout: Duration) -> Result<(), Stop> {
    let child = cmd
        .spawn_reader()
        .context("starting QEMU")
        .map_err(Stop::Other)?;
    let (tx, rx) = mpsc::channel::<Option<String>>();
    let end = tx.clone();
    read_console(
        child.reader(),
        move |line| tx.send(Some(line)).is_ok(),
        move || {
            let _ = end.send(None);
        },
    );
    let started = Instant::now();
    let mut tail: VecDeque<String> = VecDeque::with_capacity(50);
    let stdout = std::io::stdout();
    let outcome: Result<()> = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if crate::interrupt::requested() {
            break Err(anyhow::anyhow!("interrupted"));
        }
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(Some(line)) => {
                let _ = writeln!(stdout.lock(), "{line}");
                if tail.len() == 50 {
                    tail.pop_front();
                }
                tail.push_back(line.clone());
                if kvm_failure(&line) {
                    child.kill();
                    return Err(Stop::Kvm(line));
                }
                if line.contains(READY_MARKER) {
                    log(format!(
                        "ready marker after {:.1}s",
                        started.elapsed().as_secs_f64()
                    ));
                    break Ok(());
                }
                if line.contains(FAILED_MARKER) {
                    // The report lists failed units after the marker; give it a moment.
                    let until = Instant::now() + Duration::from_secs(3);
                    while let Ok(Some(l)) =
                        rx.recv_timeout(until.saturating_duration_since(Instant::now()))
                    {
                        let _ = writeln!(stdout.lock(), "{l}");
                        tail.push_back(l);
                    }
                    break Err(anyhow::anyhow!("the image reported failed units"));
                }
            }
            Ok(None) => break Err(anyhow::anyhow!("QEMU exited before the ready marker")),
            Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                break Err(anyhow::anyhow!(
                    "no ready marker within {}s",
                    timeout.as_secs()
                ))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(anyhow::anyhow!("QEMU exited before the ready marker"))
            }
        }
    };
    child.kill();
    outcome.map_err(|e| {
        let lines: Vec<String> = tail.into_iter().collect();
        Stop::Other(anyhow::anyhow!(
            "{e:#}\nlast {} console lines:\n{}",
            lines.len(),
            lines.join("\n")
        ))
    })
}

#[cfg(test)]
mod tests {
    /// The console lines of a rehearsal where a kernel message broke the agent's failure line
    /// apart (CI, cluster.rs, the OSD refusal): joined again, the marker is on one line.
    #[test]
    fn a_line_broken_by_a_kernel_message_is_joined_again() {
        let mut m = Mender::default();
        let mut out = Vec::new();
        for l in [
            "[   26.139688] picoimg-firstboot[504]: picoimg: step ceph-devices failed: x",
            "[   26.146322] picoimg-firstboot[504]: picoimg: [   26.100692] Bridge firewalling registered",
            "[   26.150000] audit: type=1130",
            "failed: step ceph-devices: /dev/disk/by-id/virtio-osd0 is not empty",
            "pc0 login: ",
        ] {
            out.extend(m.push(l));
        }
        assert_eq!(
            out,
            [
                "[   26.139688] picoimg-firstboot[504]: picoimg: step ceph-devices failed: x",
                "[   26.100692] Bridge firewalling registered",
                "[   26.150000] audit: type=1130",
                "[   26.146322] picoimg-firstboot[504]: picoimg: failed: step ceph-devices: /dev/disk/by-id/virtio-osd0 is not empty",
                "pc0 login: ",
            ]
        );
        assert!(out[3].contains(picoimg_firstboot::contract::NODE_FAILED));
    }

    /// Lines without a timestamp in their middle pass as they are; brackets that are not a
    /// kernel timestamp do not break anything; a broken line whose rest never comes is let go.
    #[test]
    fn other_lines_pass_unchanged() {
        let mut m = Mender::default();
        for l in [
            "[  OK  ] Started ssh.service",
            "picoimg: step users ok: pico [1 keys]",
            "BdsDxe: loading Boot0001 [x] [ 1.5] [12.123456]",
            "[    0.000000] Linux version 6.12",
        ] {
            assert_eq!(m.push(l), [l]);
        }
        let mut m = Mender::default();
        assert_eq!(m.push("head [    1.000000] k"), ["[    1.000000] k"]);
        for i in 0..8 {
            let l = format!("[    2.00000{i}] more");
            assert_eq!(m.push(&l), std::slice::from_ref(&l));
        }
        assert_eq!(
            m.push("[    3.000000] late"),
            ["head", "[    3.000000] late"]
        );
    }

    use super::*;

    fn h4() -> Board {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../boards/h4.toml"));
        Board::load(path).unwrap()
    }

    fn smp(cpus: Option<u32>) -> String {
        let tmp = tempfile::tempdir().unwrap();
        let opts = RunOptions {
            image: tmp.path().join("disk.img"),
            board: None,
            data_dir: None,
            expect_ready: true,
            timeout: Duration::ZERO,
            net: Net::None,
            disk_size: None,
            writable: false,
            ssh_port: None,
            accel: Accel::Tcg,
            nics: Vec::new(),
            data_disks: Vec::new(),
            cpus,
        };
        let cmd = qemu_cmd(&h4(), &opts.image, "raw", tmp.path(), &opts).unwrap();
        let argv = cmd.display();
        let at = argv.find("-smp ").expect("-smp") + 5;
        argv[at..].split_whitespace().next().unwrap().to_owned()
    }

    #[test]
    fn cpus_replace_the_board_profiles_count() {
        assert_eq!(smp(None), h4().qemu.cpus.to_string());
        assert_eq!(smp(Some(1)), "1");
    }
}
