//! `picoimg run --cluster FILE --nodes N IMAGE`: a rehearsal of a cluster on this machine.
//!
//! One copy of the image gets the cluster file on its boot partition; each node boots from its
//! own qcow2 overlay of that copy, with the MAC address its `match` names (or one given here),
//! on a VDE switch over a unix socket: the nodes see each other and nothing else. With
//! `--ssh-port-base P`, node i also gets a restricted user-mode NIC with 127.0.0.1:P+i
//! forwarded to its SSH port. Each console goes to `<dir>/<node>.log`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{Cmd, Running};
use crate::progress::log;
use crate::qemu::{Accel, DataDisk, Net, RunOptions};

/// What the agent prints when a node is done (see `picoimg_firstboot::agent`).
pub use picoimg_firstboot::contract::{NODE_FAILED, NODE_READY};

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The images to boot: one, or one per board the cluster file's nodes name (`board =`);
    /// each node boots the image of its board (a node without `board` the first image).
    pub images: Vec<PathBuf>,
    /// Board profile of the first image instead of its manifest's.
    pub board: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub cluster: PathBuf,
    /// Boot the first N nodes of the file (default: all).
    pub nodes: Option<usize>,
    /// Where disks and console logs go (default: a temporary directory, removed at the end).
    pub dir: Option<PathBuf>,
    pub timeout: Duration,
    /// Exit once every node reported ready (0) or one failed (non-zero).
    pub expect_ready: bool,
    pub ssh_port_base: Option<u16>,
    pub accel: Accel,
    /// Size of each node's system disk (default: the image's); the root grows into it.
    pub disk_size: Option<u64>,
    /// Size of each extra disk a node's roles name (thin qcow2 files).
    pub data_disk_size: u64,
    /// Virtual CPUs per VM instead of the board profile's.
    pub cpus: Option<u32>,
}

/// Default size of a rehearsal's extra disks: Ceph's ceph-volume refuses devices under 5 GB.
pub const DATA_DISK_SIZE: u64 = 8 << 30;

#[derive(Debug, Clone, PartialEq)]
pub enum NodeState {
    Off,
    Booting,
    Ready(f64),
    Failed(String),
}

pub struct Node {
    pub name: String,
    pub mac: String,
    /// Which of the rehearsal's images it boots (its board's).
    pub image: usize,
    pub log: PathBuf,
    pub state: NodeState,
    pub ssh_port: Option<u16>,
    /// The extra disks its roles name, each with the path the cluster file gives it.
    pub data_disks: Vec<(String, DataDisk)>,
    dir: PathBuf,
    overlay: PathBuf,
    started: Instant,
    boot: u32,
    vm: Option<Running>,
}

enum Event {
    Line(usize, u32, String),
    Exit(usize, u32),
}

/// A VDE switch daemon, stopped on drop: gone when the drop returns (waited for, at most
/// five seconds; it is a daemon, so init reaps it).
struct Switch {
    pidfile: PathBuf,
}

impl Drop for Switch {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            for _ in 0..250 {
                if rustix::process::test_kill_process(pid).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

// Fields drop in order: the VMs (in `nodes`) stop first, then the switch (which reads its
// pid file), then the temporary directory holding both goes.
pub struct Rehearsal {
    pub nodes: Vec<Node>,
    pub dir: PathBuf,
    _switch: Switch,
    _tmp: Option<tempfile::TempDir>,
    /// One per image: its copy with the cluster file, its board and accelerator.
    bases: Vec<Base>,
    socket: PathBuf,
    disk_size: Option<u64>,
    cpus: Option<u32>,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
}

/// An image of the rehearsal: the copy every overlay of its nodes sits on.
struct Base {
    path: PathBuf,
    board: crate::board::Board,
    accel: Accel,
}

/// For each node of `file` (the first `count`), the index in `boards` (the images' boards, in
/// the order given) of the image it boots: its `board`'s, or the first image's when it names
/// none. A board with no image is an error naming the node and the file.
pub fn images_for_nodes(
    file: &picoimg_firstboot::cluster::ClusterFile,
    count: usize,
    boards: &[String],
    cluster: &std::path::Path,
) -> Result<Vec<usize>> {
    file.nodes
        .iter()
        .take(count)
        .map(|n| match &n.board {
            None => Ok(0),
            Some(b) => boards.iter().position(|x| x == b.get_ref()).with_context(|| {
                format!(
                    "{}: node {} is a {} board, but no image given is for {} (given: {}): add its image, e.g. `picoimg run --cluster {} IMAGE...` with out/{}-STACK.img",
                    cluster.display(),
                    n.name.get_ref(),
                    b.get_ref(),
                    b.get_ref(),
                    boards.join(", "),
                    cluster.display(),
                    b.get_ref()
                )
            }),
        })
        .collect()
}

/// The MAC a rehearsal VM gets when its node has no `match.mac`.
pub fn rehearsal_mac(index: usize) -> String {
    format!("52:54:00:70:00:{:02x}", index + 1)
}

/// A node's system disk: a qcow2 overlay over the rehearsal's copy of the image (replacing
/// any there), `size` bytes if given.
fn system_disk(base: &std::path::Path, overlay: &std::path::Path, size: Option<u64>) -> Result<()> {
    let mut c = Cmd::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(overlay);
    if let Some(s) = size {
        c = c.arg(s.to_string());
    }
    c.run().context("creating a node's disk overlay")?;
    Ok(())
}

/// The serial a rehearsal disk gets for the device path the cluster file names:
/// `/dev/disk/by-id/virtio-SERIAL` keeps its serial (so the path exists in the VM as written);
/// any other path gets `picoimg-dN` and is named differently in the VM.
pub fn data_disk_serial(device: &str, index: usize) -> (String, bool) {
    match device.strip_prefix("/dev/disk/by-id/virtio-") {
        // virtio-blk serials are at most 20 bytes.
        Some(s)
            if !s.is_empty()
                && s.len() <= 20
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
        {
            (s.to_owned(), true)
        }
        _ => (format!("picoimg-d{index}"), false),
    }
}

/// The extra disks node `node` gets: one per device its roles name, thin qcow2 files in its
/// run directory. A disk file already there is kept (a re-run rehearsal keeps its data).
fn data_disks(
    file: &picoimg_firstboot::cluster::ClusterFile,
    node: &picoimg_firstboot::cluster::Node,
    dir: &std::path::Path,
    size: u64,
) -> Result<Vec<(String, DataDisk)>> {
    let mut devices: Vec<String> = Vec::new();
    for s in picoimg_firstboot::stacks::registry() {
        for d in s.devices(file, node) {
            if !devices.contains(&d) {
                devices.push(d);
            }
        }
    }
    let mut out = Vec::new();
    for (i, device) in devices.into_iter().enumerate() {
        let (serial, same) = data_disk_serial(&device, i);
        let path = dir.join(format!("data-{serial}.qcow2"));
        if path.exists() {
            log(format!(
                "{}: {device}: keeping {}",
                node.name.get_ref(),
                path.display()
            ));
        } else {
            Cmd::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&path)
                .arg(size.to_string())
                .run()
                .context("creating a rehearsal data disk")?;
        }
        if !same {
            log(format!(
                "{}: {device} cannot be given that name in a VM: its disk is /dev/disk/by-id/virtio-{serial} there (name disks /dev/disk/by-id/virtio-SERIAL in a rehearsal's file)",
                node.name.get_ref()
            ));
        }
        out.push((device, DataDisk { path, serial }));
    }
    Ok(out)
}

/// The cluster file as the rehearsal's nodes read it: nodes without a MAC match get their
/// VM's MAC (a line after their `name`), everything else as written.
fn with_vm_macs(
    text: &str,
    file: &picoimg_firstboot::cluster::ClusterFile,
    n: usize,
) -> (String, Vec<String>) {
    let mut inserts: Vec<(usize, String)> = Vec::new();
    let mut macs = Vec::new();
    for (i, node) in file.nodes.iter().take(n).enumerate() {
        let have = node
            .matcher
            .as_ref()
            .and_then(|m| m.mac.as_ref())
            .and_then(|m| picoimg_firstboot::cluster::normalise_mac(m.get_ref()));
        match have {
            Some(m) => macs.push(m),
            None if node.matcher.is_none() => {
                let mac = rehearsal_mac(i);
                let end = node.name.span().end;
                let eol = text[end..].find('\n').map_or(text.len(), |x| end + x);
                inserts.push((
                    eol,
                    format!("\nmatch = {{ mac = \"{mac}\" }}   # added by picoimg run"),
                ));
                macs.push(mac);
            }
            // Matched by serial or DMI UUID only: QEMU cannot fake those; the VM gets a MAC
            // the node will not recognise and reports itself unknown.
            None => macs.push(rehearsal_mac(i)),
        }
    }
    let mut out = text.to_owned();
    for (at, s) in inserts.into_iter().rev() {
        out.insert_str(at, &s);
    }
    (out, macs)
}

impl Rehearsal {
    /// Prepares the disks and the switch, and boots every node.
    pub fn start(o: &ClusterOptions) -> Result<Rehearsal> {
        let (text, checked) = crate::cluster::load(&o.cluster)?;
        let count = o.nodes.unwrap_or(checked.file.nodes.len());
        if count == 0 || count > checked.file.nodes.len() {
            bail!(
                "--nodes {count}: {} lists {} node(s)",
                o.cluster.display(),
                checked.file.nodes.len()
            );
        }
        if !crate::cmd::have("vde_switch") {
            bail!("`vde_switch` not found: `sudo apt-get install vde2` (ci/setup-host.sh does)");
        }
        if o.images.is_empty() {
            bail!("no image to boot");
        }
        let mut boards = Vec::new();
        for (i, image) in o.images.iter().enumerate() {
            let run = RunOptions {
                image: image.clone(),
                board: if i == 0 { o.board.clone() } else { None },
                data_dir: o.data_dir.clone(),
                expect_ready: true,
                timeout: o.timeout,
                net: Net::None,
                disk_size: None,
                writable: false,
                ssh_port: None,
                accel: o.accel,
                nics: Vec::new(),
                data_disks: Vec::new(),
                cpus: o.cpus,
            };
            boards.push(crate::qemu::board_for(&run)?);
        }
        let names: Vec<String> = boards.iter().map(|b| b.name.clone()).collect();
        let image_of = images_for_nodes(&checked.file, count, &names, &o.cluster)?;
        let (tmp, dir) = match &o.dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                (None, d.canonicalize()?)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("picoimg-cluster-")
                    .tempdir()
                    .context("creating a temporary directory")?;
                let p = t.path().to_owned();
                (Some(t), p)
            }
        };
        // One copy of each image, with the cluster file; every node's overlay sits on its
        // board's copy.
        let (rehearsal_text, macs) = with_vm_macs(&text, &checked.file, count);
        let mut bases = Vec::new();
        for (i, (image, board)) in o.images.iter().zip(boards).enumerate() {
            let path = if i == 0 {
                dir.join("base.img")
            } else {
                dir.join(format!("base-{}.img", board.name))
            };
            log(format!("preparing {}", path.display()));
            crate::qemu::raw_copy(image, &path)?;
            crate::personalise::put_boot_files(
                &path,
                &[crate::disk::FatFile {
                    path: "picoimg/cluster.toml",
                    data: rehearsal_text.as_bytes(),
                }],
                &[],
            )?;
            let accel = crate::qemu::resolve_accel(o.accel, &board);
            bases.push(Base { path, board, accel });
        }
        let socket = dir.join("switch");
        let pidfile = dir.join("switch.pid");
        Cmd::new("vde_switch")
            .arg("--sock")
            .arg(&socket)
            .arg("--daemon")
            .arg("--pidfile")
            .arg(&pidfile)
            .run()
            .context("starting the VDE switch")?;
        let switch = Switch { pidfile };
        let (tx, rx) = mpsc::channel();
        let mut nodes = Vec::new();
        for (i, node) in checked.file.nodes.iter().take(count).enumerate() {
            let name = node.name.get_ref().clone();
            let ndir = dir.join(&name);
            std::fs::create_dir_all(&ndir)?;
            let overlay = ndir.join("disk.qcow2");
            system_disk(&bases[image_of[i]].path, &overlay, o.disk_size)?;
            let data_disks = data_disks(&checked.file, node, &ndir, o.data_disk_size)?;
            nodes.push(Node {
                data_disks,
                log: dir.join(format!("{name}.log")),
                name,
                mac: macs[i].clone(),
                image: image_of[i],
                state: NodeState::Off,
                ssh_port: o.ssh_port_base.map(|p| p + i as u16),
                dir: ndir,
                overlay,
                started: Instant::now(),
                boot: 0,
                vm: None,
            });
        }
        let mut r = Rehearsal {
            nodes,
            bases,
            disk_size: o.disk_size,
            cpus: o.cpus,
            dir,
            _tmp: tmp,
            socket,
            tx,
            rx,
            _switch: switch,
        };
        for i in 0..r.nodes.len() {
            r.power_on(i)?;
        }
        Ok(r)
    }

    /// Boots node `i` from its overlay (again, after a power cut).
    pub fn power_on(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        node.boot += 1;
        let mut nics = vec![format!(
            "vde,sock={},model=virtio-net-pci,mac={}",
            self.socket.display(),
            node.mac
        )];
        if let Some(p) = node.ssh_port {
            nics.push(format!(
                "user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{p}-:22"
            ));
        }
        let run = RunOptions {
            image: node.overlay.clone(),
            board: None,
            data_dir: None,
            expect_ready: true,
            timeout: Duration::ZERO,
            net: Net::None,
            disk_size: None,
            writable: false,
            ssh_port: None,
            accel: self.bases[node.image].accel,
            nics,
            data_disks: node.data_disks.iter().map(|(_, d)| d.clone()).collect(),
            cpus: self.cpus,
        };
        let cmd = crate::qemu::qemu_cmd(
            &self.bases[node.image].board,
            &node.overlay,
            "qcow2",
            &node.dir,
            &run,
        )?;
        let vm = cmd.spawn_reader().context("starting QEMU")?;
        let reader = vm.reader();
        let mut logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .with_context(|| format!("opening {}", node.log.display()))?;
        let _ = writeln!(logf, "==== picoimg run: power on (boot {}) ====", node.boot);
        let (tx, end) = (self.tx.clone(), self.tx.clone());
        let boot = node.boot;
        crate::qemu::read_console(
            reader,
            move |line| {
                let _ = writeln!(logf, "{line}");
                tx.send(Event::Line(i, boot, line)).is_ok()
            },
            move || {
                let _ = end.send(Event::Exit(i, boot));
            },
        );
        node.vm = Some(vm);
        node.state = NodeState::Booting;
        node.started = Instant::now();
        log(format!(
            "{}: powered on (MAC {}{}), console in {}",
            node.name,
            node.mac,
            node.ssh_port
                .map(|p| format!(", ssh 127.0.0.1:{p}"))
                .unwrap_or_default(),
            node.log.display()
        ));
        Ok(())
    }

    /// Replaces node `i`'s system disk with a fresh copy of the image (as after a dead card is
    /// replaced and flashed again); its extra disks are kept. The node must be off.
    pub fn reflash(&mut self, i: usize) -> Result<()> {
        if self.nodes[i].vm.is_some() {
            bail!("{} is running: power it off first", self.nodes[i].name);
        }
        system_disk(
            &self.bases[self.nodes[i].image].path,
            &self.nodes[i].overlay,
            self.disk_size,
        )?;
        log(format!(
            "{}: system disk replaced by a fresh copy of the image",
            self.nodes[i].name
        ));
        Ok(())
    }

    /// Pulls the plug on node `i` (QEMU killed: no shutdown, no flush).
    pub fn power_cut(&mut self, i: usize) {
        if let Some(vm) = self.nodes[i].vm.take() {
            vm.kill();
        }
        self.nodes[i].state = NodeState::Off;
        log(format!("{}: power cut", self.nodes[i].name));
    }

    /// Handles console lines until `until` says stop (it sees each node's index and line) or
    /// the timeout passes. Returns whether `until` stopped it.
    pub fn watch(
        &mut self,
        timeout: Duration,
        mut until: impl FnMut(&[Node], usize, &str) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if crate::interrupt::requested() {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.rx.recv_timeout(left.min(Duration::from_millis(500))) {
                Ok(Event::Line(i, boot, line)) if boot == self.nodes[i].boot => {
                    let node = &mut self.nodes[i];
                    if line.contains(NODE_READY) && node.state == NodeState::Booting {
                        node.state = NodeState::Ready(node.started.elapsed().as_secs_f64());
                        log(format!(
                            "{}: ready after {:.0} s",
                            node.name,
                            node.started.elapsed().as_secs_f64()
                        ));
                    } else if crate::qemu::kvm_failure(&line) {
                        node.state = NodeState::Failed(format!(
                            "QEMU stopped: KVM cannot run this guest here ({line}); rerun with --accel tcg"
                        ));
                        if let Some(vm) = node.vm.take() {
                            vm.kill();
                        }
                        log(format!("{}: QEMU: {line}", node.name));
                    } else if let Some(at) = line.find(NODE_FAILED) {
                        node.state = NodeState::Failed(line[at..].to_owned());
                        log(format!("{}: {}", node.name, &line[at..]));
                    }
                    if until(&self.nodes, i, &line) {
                        return true;
                    }
                }
                Ok(Event::Exit(i, boot)) if boot == self.nodes[i].boot => {
                    let node = &mut self.nodes[i];
                    if node.vm.is_some() {
                        node.vm = None;
                        if !matches!(node.state, NodeState::Failed(_)) {
                            node.state = NodeState::Failed("QEMU exited".into());
                        }
                        log(format!("{}: QEMU exited", node.name));
                    }
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    /// Waits (bounded) until node `i`'s QEMU has exited (after a shutdown inside the VM);
    /// returns whether it did.
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.nodes[i].vm.is_some()
            && Instant::now() < deadline
            && !crate::interrupt::requested()
        {
            self.watch(Duration::from_secs(1), |_, _, _| false);
        }
        if self.nodes[i].vm.is_none() {
            self.nodes[i].state = NodeState::Off;
            return true;
        }
        false
    }

    /// Waits until every running node has reported ready or failed.
    pub fn wait_all(&mut self, timeout: Duration) -> bool {
        let decided = |nodes: &[Node]| {
            nodes
                .iter()
                .all(|n| matches!(n.state, NodeState::Ready(_) | NodeState::Failed(_)))
        };
        if decided(&self.nodes) {
            return true;
        }
        self.watch(timeout, |nodes, _, _| decided(nodes))
    }

    /// One line per node: name, MAC, state.
    pub fn summary(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let state = match &n.state {
                    NodeState::Off => "off".to_owned(),
                    NodeState::Booting => "no report yet".to_owned(),
                    NodeState::Ready(s) => format!("ready after {s:.0} s"),
                    NodeState::Failed(m) => m.clone(),
                };
                format!(
                    "{:12} {}  {state}  (console: {})",
                    n.name,
                    n.mac,
                    n.log.display()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn all_ready(&self) -> bool {
        self.nodes
            .iter()
            .all(|n| matches!(n.state, NodeState::Ready(_)))
    }
}

/// `picoimg run --cluster`.
pub fn run(o: &ClusterOptions) -> Result<()> {
    let mut r = Rehearsal::start(o)?;
    let decided = r.wait_all(o.timeout);
    crate::outln!("{}", r.summary())?;
    let _ = std::io::stdout().flush();
    if o.expect_ready {
        if r.all_ready() {
            return Ok(());
        }
        bail!(
            "{} of {} nodes ready{}; see the console logs in {}{}",
            r.nodes
                .iter()
                .filter(|n| matches!(n.state, NodeState::Ready(_)))
                .count(),
            r.nodes.len(),
            if decided { "" } else { " before the timeout" },
            r.dir.display(),
            if o.dir.is_none() {
                " (removed on exit: pass --dir to keep them)"
            } else {
                ""
            }
        );
    }
    log("the cluster keeps running: Ctrl-C stops every node");
    r.watch(Duration::from_secs(u64::MAX / 4), |_, _, _| false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_without_a_mac_get_their_vm_mac_in_the_rehearsal_copy() {
        let text =
            picoimg_firstboot::cluster::render_init(&picoimg_firstboot::cluster::InitOptions {
                name: "lab",
                nodes: 3,
                subnet: "10.42.0.0/24",
                stacks: &picoimg_firstboot::stacks::named(&["consul"]),
            })
            .unwrap()
            .replace(
                "# match = { mac = \"52:54:00:00:00:02\" }",
                "match = { mac = \"52:54:00:00:00:02\" }",
            );
        let c = picoimg_firstboot::cluster::check(&text).unwrap();
        let (out, macs) = with_vm_macs(&text, &c.file, 3);
        assert_eq!(
            macs,
            [
                "52:54:00:70:00:01",
                "52:54:00:00:00:02",
                "52:54:00:70:00:03"
            ]
        );
        let again = picoimg_firstboot::cluster::check(&out).expect("still valid");
        let m = |i: usize| {
            again.file.nodes[i]
                .matcher
                .as_ref()
                .unwrap()
                .mac
                .as_ref()
                .unwrap()
                .get_ref()
                .clone()
        };
        assert_eq!(m(0), "52:54:00:70:00:01");
        assert_eq!(m(2), "52:54:00:70:00:03");
    }
}
