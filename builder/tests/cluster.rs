//! Tier 4, clusters: one h4 image with the consul, docker, ceph and k3s components (Consul from
//! Debian bullseye, the substitute for HashiCorp's repository; Docker and Ceph 18 from Debian
//! trixie; stand-ins for K3s's release files, which cannot be downloaded here)
//! and one cluster file for both stacks; three QEMU VMs told apart by MAC on a private VDE
//! switch (unix sockets; no host network). Assertions are made from inside the VMs over SSH (a
//! restricted user-mode NIC forwards 127.0.0.1:PORT to each VM's port 22), with the key the
//! cluster file gives user `pico`.
//!
//! The tests take turns (several TCG VMs at once on two cores would only be slower).
#![cfg(feature = "image-tests")]
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use picoimg::rehearsal::{ClusterOptions, Rehearsal};
use picoimg_firstboot::agent::{http, System, Target};
use picoimg_firstboot::stack::Secrets;
use picoimg_firstboot::stacks::{consul as consul_stack, nomad};
use sha2::Digest;

mod common;

static TURN: Mutex<()> = Mutex::new(());

struct Fixture {
    image: PathBuf,
    dir: PathBuf,
    key: PathBuf,
    cluster: PathBuf,
}

fn picoimg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_picoimg"))
}

/// K3s's release files cannot be downloaded here: the rehearsal image carries stand-ins, given
/// as offline files with their own sha256 (what a user does for another release). Nothing in
/// the rehearsal runs them: they show where the k3s component puts K3s.
const K3S_STAND_IN: &str =
    "#!/bin/sh\necho 'k3s version v1.31.4+k3s1 (picoimg stand-in, not K3s)'\n";
const K3S_IMAGES_STAND_IN: &str = "picoimg stand-in for k3s-airgap-images-amd64.tar.zst\n";

/// Builds the rehearsal image once (h4 with the consul, docker, ceph, k3s, swarm and incus
/// components, and K3s's stand-ins) and writes a three-node cluster file with a fresh SSH key.
/// Not kvm: Debian's libvirt-daemon-system starts libvirtd, virtlogd and libvirt-guests at
/// boot. With kvm and incus added to the image, the Consul + Ceph rehearsal's first round
/// took about 870 s of uptime to ready instead of 626 (how much of it was libvirt's is not
/// measured).
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cluster-tests");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let mut offline = Vec::new();
        for (name, body) in [("k3s", K3S_STAND_IN), ("k3s-images", K3S_IMAGES_STAND_IN)] {
            let file = dir.join(format!("{name}.stand-in"));
            std::fs::write(&file, body).unwrap();
            let sum = hex::encode(sha2::Sha256::digest(body.as_bytes()));
            offline.push("--artifact".to_owned());
            offline.push(format!("{name}={}", file.display()));
            offline.push("--artifact-sha256".to_owned());
            offline.push(format!("{name}={sum}"));
        }
        let started = Instant::now();
        let st = picoimg()
            .args([
                "build",
                "--board",
                "h4",
                "--stack",
                "consul,docker,ceph,k3s,swarm,incus",
                "--sources",
                "debian",
            ])
            .args(&offline)
            // The raw image is what the VMs boot and the card test flashes: no .img.xz.
            .args(["--no-xz", "--out"])
            .arg(&out)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "picoimg build h4-consul+docker+ceph+k3s+swarm+incus failed"
        );
        common::measured(format!(
            "h4-consul+docker+ceph+k3s+swarm+incus built in {:.0}s",
            started.elapsed().as_secs_f64()
        ));
        let key = dir.join("id_ed25519");
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "picoimg-test", "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(st.success());
        let cluster = cluster_file(&dir, &key, "lab", "consul,ceph", 3, "10.77.0.0/24");
        Fixture {
            image: out.join("h4-consul+docker+ceph+k3s+swarm+incus.img"),
            dir,
            key,
            cluster,
        }
    })
}

/// Three free consecutive ports on 127.0.0.1.
/// Runs a host tool; its stdout, or a panic naming it with its stderr.
fn run_ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn free_ports() -> u16 {
    for base in (20000u16..60000)
        .step_by(97)
        .skip((std::process::id() % 300) as usize)
    {
        let ok = (0..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if ok {
            return base;
        }
    }
    panic!("no free ports");
}

/// Runs a command in a VM as `pico`, through its forwarded SSH port.
/// `ssh` to the node whose SSH is forwarded to 127.0.0.1:`port`, as the cluster file's user.
fn ssh_cmd(f: &Fixture, port: u16, command: &str) -> Command {
    let mut c = Command::new("ssh");
    c.arg("-i")
        .arg(&f.key)
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=20",
            "-o",
            "LogLevel=ERROR",
        ])
        // One connection per node, kept for the commands that follow: each login costs the
        // emulated node a key exchange and a PAM session (seconds of CPU under TCG). The
        // master ends with the VM's connection (power off, power cut).
        .arg("-o")
        .arg(format!("ControlPath={}/ssh-%p.sock", f.dir.display()))
        .args(["-o", "ControlMaster=auto", "-o", "ControlPersist=300"])
        .args(["-p", &port.to_string(), "pico@127.0.0.1", command]);
    c
}

fn ssh(f: &Fixture, port: u16, command: &str) -> std::process::Output {
    ssh_cmd(f, port, command).output().unwrap()
}

fn ssh_ok(f: &Fixture, port: u16, command: &str) -> String {
    // Bounded retries: sshd may still be generating host keys on a slow TCG boot.
    let mut last = None;
    for _ in 0..10 {
        let o = ssh(f, port, command);
        if o.status.success() {
            return String::from_utf8_lossy(&o.stdout).into_owned();
        }
        last = Some(o);
        std::thread::sleep(Duration::from_secs(5));
    }
    let o = last.unwrap();
    panic!(
        "`{command}` on port {port}: {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Docker on a booted node (Nomad's task driver): the daemon answers, and a container runs from
/// an image made on the node with `docker import` (no registry is reachable here): dash and the
/// two libraries it needs, no network.
fn assert_docker_runs_a_container(f: &Fixture, port: u16) {
    let info = ssh_ok(
        f,
        port,
        "sudo docker info --format '{{.ServerVersion}} {{.Driver}} cgroup{{.CgroupVersion}}'",
    );
    assert!(
        info.contains("overlay2") && info.contains("cgroup2"),
        "{info}"
    );
    let out = ssh_ok(
        f,
        port,
        "cd /tmp && sudo tar -chf mini.tar -C / usr/bin/dash lib64/ld-linux-x86-64.so.2 \
         usr/lib/x86_64-linux-gnu/libc.so.6 && sudo docker import mini.tar picoimg/mini:1 >/dev/null \
         && sudo docker run --rm --network none picoimg/mini:1 /usr/bin/dash -c 'echo hello from a container'",
    );
    assert_eq!(out.trim(), "hello from a container", "{out}");
    let cni = ssh_ok(f, port, "ls /usr/lib/cni");
    assert!(cni.lines().any(|l| l == "bridge"), "CNI plugins: {cni}");
}

/// Copies the host file `local` to `remote` on the node (through ssh's standard input).
fn ssh_put(f: &Fixture, port: u16, local: &Path, remote: &str) {
    let o = ssh_cmd(f, port, &format!("cat > {remote}"))
        .stdin(std::fs::File::open(local).unwrap())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "copying {} to {remote} on port {port}: {}",
        local.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The page the rehearsal's Swarm service serves.
const WEB_PAGE: &str = "picoimg swarm web\n";

/// Roots made on the host from its busybox-static (no registry or image server is reachable
/// here): `web.tar`, a Docker image root whose busybox httpd serves WEB_PAGE from /www, and an
/// Incus image as its metadata tarball and root tarball (the same root).
fn busybox_images(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let root = dir.join("busybox-root");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("www")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static on the host");
    std::fs::write(root.join("www/index.html"), WEB_PAGE).unwrap();
    let meta = dir.join("busybox-meta");
    let _ = std::fs::remove_dir_all(&meta);
    std::fs::create_dir_all(&meta).unwrap();
    std::fs::write(
        meta.join("metadata.yaml"),
        "architecture: x86_64\ncreation_date: 1700000000\nproperties:\n  description: picoimg busybox\n",
    )
    .unwrap();
    let web = dir.join("web.tar");
    let rootfs = dir.join("rootfs.tar");
    let metatar = dir.join("meta.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&web)
            .arg("."),
    );
    std::fs::copy(&web, &rootfs).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&meta)
            .arg("-cf")
            .arg(&metatar)
            .arg("metadata.yaml"),
    );
    (web, metatar, rootfs)
}

/// The swarm as node `ask` lists it (the nodes' SSH ports start at `port`): three nodes
/// Ready, all managers, one leader; and every node in that one swarm. Returns the swarm's id.
fn assert_swarm_formed(f: &Fixture, port: u16, ask: u16) -> String {
    let ls = ssh_ok(
        f,
        port + ask,
        "sudo docker node ls --format '{{.Hostname}} {{.Status}} {{.ManagerStatus}}'",
    );
    let mut lines: Vec<&str> = ls.lines().collect();
    lines.sort();
    assert_eq!(lines.len(), 3, "{ls}");
    for (i, l) in lines.iter().enumerate() {
        assert!(l.starts_with(&format!("pc{i} Ready ")), "{ls}");
    }
    assert_eq!(ls.matches(" Leader").count(), 1, "{ls}");
    assert_eq!(ls.matches(" Reachable").count(), 2, "{ls}");
    let ids: Vec<String> = (0..3u16)
        .map(|i| {
            ssh_ok(
                f,
                port + i,
                "sudo docker info --format '{{.Swarm.Cluster.ID}}'",
            )
            .trim()
            .to_owned()
        })
        .collect();
    assert!(
        !ids[0].is_empty() && ids.iter().all(|i| *i == ids[0]),
        "{ids:?}"
    );
    ids[0].clone()
}

/// Every Incus member ONLINE, as node `port` lists them.
fn assert_incus_formed(f: &Fixture, port: u16) {
    let l = ssh_ok(f, port, "sudo incus cluster list --format csv");
    let mut names: Vec<&str> = l
        .lines()
        .filter(|l| l.contains(",ONLINE,"))
        .map(|l| l.split(',').next().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["pc0", "pc1", "pc2"], "{l}");
}

/// A service of one replica per node (`--mode global`) from an image imported on every node,
/// published on port 8080: each node's address answers through the routing mesh (asked from
/// pc0 for every node's address; `url` names what was asked).
fn assert_swarm_serves(f: &Fixture, port: u16, web: &Path) {
    for i in 0..3u16 {
        ssh_put(f, port + i, web, "/tmp/web.tar");
        ssh_ok(
            f,
            port + i,
            "sudo docker import /tmp/web.tar picoimg/web:1 >/dev/null",
        );
    }
    ssh_ok(
        f,
        port,
        "sudo docker service create --detach --quiet --name web --mode global \
         --publish published=8080,target=80 picoimg/web:1 /bin/busybox httpd -f -p 80 -h /www",
    );
    let mut last = String::new();
    for _ in 0..60 {
        last = ssh_ok(
            f,
            port,
            "sudo docker service ps web --filter desired-state=running --format '{{.Node}} {{.CurrentState}}'",
        );
        if last.lines().filter(|l| l.contains(" Running ")).count() == 3 {
            break;
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    assert_eq!(
        last.lines().filter(|l| l.contains(" Running ")).count(),
        3,
        "{last}"
    );
    for n in 0..3 {
        let url = format!("http://10.77.0.1{n}:8080/");
        let mut got = String::new();
        for _ in 0..12 {
            // bash's /dev/tcp: the node has no HTTP client (busybox-static's wget crashes there).
            let o = ssh(
                f,
                port,
                &format!(
                    "timeout 20 bash -c 'exec 3<>/dev/tcp/10.77.0.1{n}/8080; \
                     printf \"GET / HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3' | tail -n 1"
                ),
            );
            got = String::from_utf8_lossy(&o.stdout).into_owned();
            if got == WEB_PAGE {
                break;
            }
            std::thread::sleep(Duration::from_secs(5));
        }
        assert_eq!(got, WEB_PAGE, "{url} through pc0");
    }
}

/// The node's loopback Consul API through an SSH tunnel: HTTP requests for port 8500 go to the
/// tunnel's end on 127.0.0.1; nothing else is allowed.
struct Tunnel {
    port: u16,
}

impl System for Tunnel {
    fn run(&self, cmd: &picoimg_firstboot::cmd::Cmd) -> anyhow::Result<String> {
        anyhow::bail!("no command expected here: {}", cmd.display())
    }
    fn chown(&self, path: &Path, _: u32, _: u32) -> anyhow::Result<()> {
        anyhow::bail!("no chown expected here: {}", path.display())
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
    fn http(&self, req: &http::Request<'_>) -> anyhow::Result<http::Reply> {
        anyhow::ensure!(req.port == 8500, "only Consul's API is tunnelled: {req}");
        http::send(&http::Request {
            port: self.port,
            ..req.clone()
        })
    }
    fn reachable(&self, _: &str, _: u16, _: Duration) -> bool {
        false
    }
}

/// Nomad's Consul policies and tokens, made by the nomad stack's own code (the step its health
/// check runs on a Nomad node) against the real Consul 1.8.7 of node `port`, reached through an
/// SSH tunnel to the node's 127.0.0.1:8500 (Nomad itself cannot be had here). Twice per role:
/// the second time is what a node that comes second sees. Then Consul's CLI on the node checks
/// what it holds and enforces: the tokens with their derived ids and policies, a service
/// registration allowed for both, ACL reads only for the servers' token, KV writes for neither.
fn assert_nomads_consul_tokens_work(f: &Fixture, cluster: &Path, port: u16) {
    let text = std::fs::read_to_string(cluster).unwrap();
    let stacks = picoimg_firstboot::stacks::registry();
    let c = picoimg_firstboot::cluster::check_in(&text, None, stacks).unwrap();
    let secrets = Secrets::of(stacks, &c);
    let local = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut tunnel = Command::new("ssh")
        .arg("-i")
        .arg(&f.key)
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .args(["-N", "-L", &format!("127.0.0.1:{local}:127.0.0.1:8500")])
        .args(["-p", &port.to_string(), "pico@127.0.0.1"])
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", local)).is_err() {
        assert!(tunnel.try_wait().unwrap().is_none(), "the SSH tunnel ended");
        assert!(
            Instant::now() < deadline,
            "no SSH tunnel to Consul after 60 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let tunnel = Kill(tunnel);
    let sys = Tunnel { port: local };
    let root = tempfile::tempdir().unwrap();
    let t = Target {
        root: root.path(),
        sys: &sys,
    };
    let consul = ssh_ok(f, port, "consul version");
    let version = consul
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v'))
        .unwrap()
        .to_owned();
    for server in [true, false] {
        for _ in 0..2 {
            let token = nomad::ConsulToken::plan(&t, &secrets, server).unwrap();
            let done = token.make(&t).unwrap();
            assert!(done.contains(&format!("Consul {version})")), "{done}");
        }
    }
    drop(tunnel);
    let management = secrets.get(consul_stack::label::MANAGEMENT_TOKEN).unwrap();
    let as_token =
        |token: &str, cmd: &str| ssh(f, port, &format!("CONSUL_HTTP_TOKEN={token} {cmd}"));
    for (policy, secret, accessor, acl_read) in [
        (
            nomad::CONSUL_SERVER_POLICY,
            nomad::label::CONSUL_SERVER_SECRET,
            nomad::label::CONSUL_SERVER_ACCESSOR,
            true,
        ),
        (
            nomad::CONSUL_CLIENT_POLICY,
            nomad::label::CONSUL_CLIENT_SECRET,
            nomad::label::CONSUL_CLIENT_ACCESSOR,
            false,
        ),
    ] {
        let (secret, accessor) = (secrets.get(secret).unwrap(), secrets.get(accessor).unwrap());
        let read = ssh_ok(
            f,
            port,
            &format!("CONSUL_HTTP_TOKEN={management} consul acl token read -id {accessor}"),
        );
        assert!(
            read.contains(&format!("SecretID:         {secret}"))
                || read
                    .lines()
                    .any(|l| l.starts_with("SecretID:") && l.contains(secret)),
            "{read}"
        );
        assert!(read.contains(policy), "{read}");
        let probe = format!("picoimg-probe-{}", &accessor[..8]);
        let reg = as_token(secret, &format!("consul services register -name={probe}"));
        assert!(
            reg.status.success(),
            "{policy}: service registration refused: {reg:?}"
        );
        let dereg = as_token(secret, &format!("consul services deregister -id={probe}"));
        assert!(dereg.status.success(), "{policy}: {dereg:?}");
        let acl = as_token(secret, "consul acl policy list");
        assert_eq!(
            acl.status.success(),
            acl_read,
            "{policy}: acl policy list: {acl:?}"
        );
        let kv = as_token(secret, "consul kv put picoimg/nomad-probe yes");
        assert!(!kv.status.success(), "{policy}: a KV write was allowed");
    }
}

/// Consul's management token for `cluster`, as `picoimg cluster token` prints it.
fn consul_token(cluster: &Path) -> String {
    run_ok(picoimg().args(["cluster", "token"]).arg(cluster))
        .trim()
        .to_owned()
}

/// A formed Consul cluster of the three nodes of `cluster` (10.77.0.10-12), checked from
/// inside node `port`.
fn assert_consul_formed(f: &Fixture, cluster: &Path, port: u16) {
    let token = consul_token(cluster);
    // Membership is gossip, eventually consistent: a node that is ready by its own view can
    // still be `leaving` in another's for a while. Seen after the shutdown and re-flash: pc1's
    // Consul 1.8.7 exited on "agent: timeout starting DNS servers" (a one-second limit, missed
    // under TCG), systemd restarted it, and pc0 still listed pc1 as `leaving` when every node
    // was ready. So the members are read until all three are alive, for at most 5 minutes.
    let started = Instant::now();
    let members = loop {
        let members = ssh_ok(f, port, "consul members");
        let alive = members.lines().filter(|l| l.contains(" alive ")).count();
        if alive == 3 || started.elapsed() > Duration::from_secs(300) {
            break members;
        }
        std::thread::sleep(Duration::from_secs(10));
    };
    if started.elapsed() > Duration::from_secs(15) {
        common::measured(format!(
            "consul: every member alive in node {port}'s view {:.0}s after the nodes were ready",
            started.elapsed().as_secs_f64()
        ));
    }
    let alive: Vec<&str> = members.lines().filter(|l| l.contains(" alive ")).collect();
    assert_eq!(alive.len(), 3, "consul members:\n{members}");
    let peers = ssh_ok(
        f,
        port,
        &format!("CONSUL_HTTP_TOKEN={token} consul operator raft list-peers"),
    );
    let voters = peers
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(4) == Some("true"))
        .count();
    let leaders = peers
        .lines()
        .filter(|l| l.split_whitespace().nth(3) == Some("leader"))
        .count();
    assert_eq!((voters, leaders), (3, 1), "raft peers:\n{peers}");
    // The node's normal resolver (glibc -> resolved stub -> ~consul -> 127.0.0.1:8600).
    let hosts = ssh_ok(
        f,
        port,
        "getent ahostsv4 consul.service.consul | awk '{print $1}' | sort -u",
    );
    let addrs: Vec<&str> = hosts.lines().collect();
    assert_eq!(addrs, ["10.77.0.10", "10.77.0.11", "10.77.0.12"], "{hosts}");
    // ACLs: default deny for the anonymous token, the derived management token may write.
    let anon = ssh(f, port, "consul kv put picoimg/anonymous yes");
    assert!(!anon.status.success(), "anonymous KV write was allowed");
    let err = String::from_utf8_lossy(&anon.stderr);
    assert!(
        err.contains("Permission denied") || err.contains("403"),
        "{err}"
    );
    let put = ssh_ok(
        f,
        port,
        &format!("CONSUL_HTTP_TOKEN={token} consul kv put picoimg/with-token yes"),
    );
    assert!(put.contains("Success"), "{put}");
}

/// A rehearsal of the first `nodes` nodes of `cluster` under TCG, its disks and consoles in
/// `dir`, node i's SSH on 127.0.0.1:`port`+i.
fn rehearsal_options(
    f: &Fixture,
    cluster: &Path,
    nodes: usize,
    dir: &Path,
    port: u16,
) -> ClusterOptions {
    ClusterOptions {
        images: vec![f.image.clone()],
        board: None,
        data_dir: None,
        cluster: cluster.to_owned(),
        nodes: Some(nodes),
        dir: Some(dir.to_owned()),
        timeout: Duration::from_secs(1500),
        expect_ready: false,
        ssh_port_base: Some(port),
        accel: picoimg::qemu::Accel::Tcg,
        disk_size: None,
        data_disk_size: picoimg::rehearsal::DATA_DISK_SIZE,
        cpus: None,
    }
}

/// The root filesystem of a GPT disk image as e2fsprogs address it: `IMAGE?offset=BYTES`, the
/// offset of the partition named `root` as sfdisk reads the table.
fn root_partition(image: &Path) -> String {
    let table: serde_json::Value =
        serde_json::from_str(&run_ok(Command::new("sfdisk").arg("-J").arg(image))).unwrap();
    let start = table["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "root")
        .and_then(|p| p["start"].as_u64())
        .unwrap();
    format!("{}?offset={}", image.display(), start * 512)
}

fn switch_alive(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("switch.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// `picoimg flash --cluster --node` onto a file, then boot it: the node takes its name from
/// picoimg/node.toml (its MAC is in no `match`) and forms a one-server cluster.
#[test]
fn flashed_and_personalised_card_boots_as_its_node() {
    let f = fixture();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = f.dir.join("flash");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let init = picoimg()
        .args([
            "cluster",
            "init",
            "--name",
            "solo",
            "--nodes",
            "1",
            "--subnet",
            "10.0.2.0/24",
        ])
        .output()
        .unwrap();
    // User-mode networking's subnet: the node's static address is the one QEMU expects.
    let text = String::from_utf8(init.stdout)
        .unwrap()
        .replace("name = \"pc0\"", "name = \"edge7\"")
        .replace("address = \"10.0.2.10\"", "address = \"10.0.2.15\"")
        .replace("gateway = \"10.0.2.1\"", "gateway = \"10.0.2.2\"")
        .replace("dns = [\"10.0.2.1\"]", "dns = []")
        .replace("policy = \"sync\"", "policy = \"skip\"");
    let cluster = dir.join("solo.toml");
    std::fs::write(&cluster, text).unwrap();
    let card = dir.join("card.img");
    // The raw image with its block map beside it (image.rs flashes an .img.xz).
    let o = picoimg()
        .arg("flash")
        .arg(&f.image)
        .arg(&card)
        .arg("--cluster")
        .arg(&cluster)
        .args(["--node", "edge7"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // As if the card had lost power in an earlier first boot after systemd recorded it
    // (machine-id committed) and before the SSH host keys reached the disk: an empty key and
    // ssh-keygen's temporary file. Debian makes host keys on the first boot only; without
    // picoimg's sshd-keygen drop-in sshd fails and the boot reports a failed unit.
    let root = root_partition(&card);
    let empty = dir.join("empty");
    std::fs::write(&empty, "").unwrap();
    let id = dir.join("machine-id");
    std::fs::write(&id, "0123456789abcdef0123456789abcdef\n").unwrap();
    let cmds = dir.join("debugfs.cmds");
    std::fs::write(
        &cmds,
        format!(
            "rm /etc/machine-id\nwrite {} /etc/machine-id\n\
             write {e} /etc/ssh/ssh_host_ed25519_key\n\
             write {e} /etc/ssh/ssh_host_rsa_key.6unRS1Cwvz\n",
            id.display(),
            e = empty.display()
        ),
    )
    .unwrap();
    run_ok(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&cmds)
            .arg(&root),
    );
    let ls = |path: &str| {
        run_ok(
            Command::new("debugfs")
                .args(["-R", &format!("ls -l {path}")])
                .arg(&root),
        )
    };
    let before = ls("/etc/ssh");
    assert!(
        before.contains("ssh_host_ed25519_key\n") && before.contains("ssh_host_rsa_key.6unRS1Cwvz"),
        "{before}"
    );
    let o = picoimg()
        .args([
            "run",
            "--board",
            "h4",
            "--accel",
            "tcg",
            "--net",
            "restricted",
            "--writable",
        ])
        .args(["--expect-ready", "--timeout", "900"])
        .arg(&card)
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        console
    );
    assert!(
        console.contains("picoimg: this is node edge7 of cluster solo (picoimg/node.toml)"),
        "{console}"
    );
    assert!(
        console.contains("picoimg: ready: node edge7 of cluster solo"),
        "{console}"
    );
    // The host keys were made again and flushed: on the card afterwards, each private key
    // loads with ssh-keygen (the host's) and the temporary file is gone.
    assert!(
        console.contains(
            "picoimg: host key /etc/ssh/ssh_host_ed25519_key does not load: making it again"
        ),
        "{console}"
    );
    let after = ls("/etc/ssh");
    assert!(!after.contains(".6unRS1Cwvz"), "{after}");
    for kind in ["rsa", "ecdsa", "ed25519"] {
        let out = dir.join(format!("ssh_host_{kind}_key"));
        let _ = std::fs::remove_file(&out);
        run_ok(
            Command::new("debugfs")
                .args([
                    "-R",
                    &format!("dump -p /etc/ssh/ssh_host_{kind}_key {}", out.display()),
                ])
                .arg(&root),
        );
        run_ok(Command::new("ssh-keygen").arg("-y").arg("-f").arg(&out));
    }
}

/// A cluster file for `nodes` nodes of `stacks` on `subnet` from `picoimg cluster init`, in
/// `dir`: user `pico` with `key`, and no time source or DNS server (the switch has none). With
/// Ceph, each OSD is on the VM's extra disk (virtio serial osd0) and the health timeout is one
/// for TCG (managers load their modules for minutes there).
fn cluster_file(
    dir: &Path,
    key: &Path,
    name: &str,
    stacks: &str,
    nodes: u32,
    subnet: &str,
) -> PathBuf {
    let init = run_ok(
        picoimg()
            .args(["cluster", "init", "--name", name, "--stack", stacks])
            .args(["--nodes", &nodes.to_string(), "--subnet", subnet]),
    );
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let gateway = subnet.replace(".0/24", ".1");
    let mut text = init
        .replace(
            "# [[user]]\n# name = \"pico\"\n# ssh_keys = [\"ssh-ed25519 AAAA... you@laptop\"]",
            &format!(
                "[[user]]\nname = \"pico\"\nssh_keys = [\"{}\"]",
                pubkey.trim()
            ),
        )
        .replace("policy = \"sync\"", "policy = \"skip\"")
        .replace(&format!("dns = [\"{gateway}\"]"), "dns = []");
    assert!(
        text.contains("name = \"pico\"") && text.contains("dns = []"),
        "{text}"
    );
    if text.contains("\n[ceph]\n") {
        text = text
            .replace("/dev/disk/by-id/CHANGE-ME", "/dev/disk/by-id/virtio-osd0")
            .replace("health_timeout = 900", "health_timeout = 2700");
        if nodes == 1 {
            text = text.replace("pool_size = 3", "pool_size = 1");
        }
        // Emulation only: three TCG VMs on two host cores answer heartbeat pings in 1-4 s while
        // they boot, and Ceph warns (OSD_SLOW_PING_TIME) on the largest of the 1, 5 and 15
        // minute averages past 1 s by default (src/mon/PGMap.cc), so a rehearsal would wait up
        // to 15 minutes after the boot for an average to fall. A board answers in
        // milliseconds; the rehearsal raises the threshold through the file's [ceph.options],
        // as a user may.
        text = text.replace(
            "pool_size = 3\n",
            "pool_size = 3\n\n[ceph.options]\nmon_warn_on_slow_ping_time = 10000\n",
        );
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn ceph_rehearsal(f: &Fixture, cluster: &Path, nodes: usize, dir: &Path, port: u16) -> Rehearsal {
    let _ = std::fs::remove_dir_all(dir);
    Rehearsal::start(&ClusterOptions {
        timeout: Duration::from_secs(3000),
        // The monitors warn below 30% free space on their disk (mon_data_avail_warn): the
        // image's 2 GiB root is grown to 4 GiB, as a card would be.
        disk_size: Some(4 << 30),
        // The board's two virtual CPUs: with one each, the first boot took 1264 s instead of
        // 1140 (a busy VM cannot use the core an idle one leaves).
        ..rehearsal_options(f, cluster, nodes, dir, port)
    })
    .unwrap()
}

/// The last 40 console lines of each node, for a failure message.
fn console_tails(r: &Rehearsal) -> String {
    r.nodes
        .iter()
        .map(|n| {
            let t = std::fs::read_to_string(&n.log).unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(40).collect();
            format!(
                "---- {}\n{}",
                n.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect()
}

fn wait_ready(r: &mut Rehearsal, what: &str) -> Duration {
    let started = Instant::now();
    let decided = r.wait_all(Duration::from_secs(3000));
    if !decided || !r.all_ready() {
        panic!(
            "{what}: not every node reported ready:\n{}\n{}",
            r.summary(),
            console_tails(r)
        );
    }
    started.elapsed()
}

/// Asks the monitors (and admin sockets) of the node at `port` several things in one Python
/// process with librados (tests/data/ceph-ask.py): the `ceph` command takes about 50 s a call
/// on these VMs. Each answer is checked for success; their outputs are returned in order.
fn ceph_ask(f: &Fixture, port: u16, requests: serde_json::Value) -> Vec<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ceph-ask.py");
    let out = ssh_cmd(f, port, &format!("sudo python3 - '{requests}'"))
        .stdin(std::fs::File::open(script).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ceph-ask on port {port}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    for (q, a) in requests.as_array().unwrap().iter().zip(&answers) {
        assert_eq!(a["ret"], 0, "{q} -> {a}");
    }
    answers.into_iter().map(|mut a| a["out"].take()).collect()
}

/// What the cluster must look like: HEALTH_OK, three monitors in quorum, a manager active,
/// three OSDs up and in, each on its own host (`status` and `osd tree`, asked of the
/// monitors); returns the fsid.
fn assert_ceph_healthy(f: &Fixture, port: u16) -> String {
    let a = ceph_ask(
        f,
        port,
        serde_json::json!([
            {"mon": {"prefix": "status", "format": "json"}},
            {"mon": {"prefix": "osd tree", "format": "json"}},
        ]),
    );
    let (s, tree) = (&a[0], &a[1]);
    assert_eq!(s["health"]["status"], "HEALTH_OK", "{s:#}");
    assert_eq!(
        s["quorum_names"],
        serde_json::json!(["pc0", "pc1", "pc2"]),
        "{s:#}"
    );
    assert_eq!(s["mgrmap"]["available"], true, "{s:#}");
    assert_eq!(s["osdmap"]["num_osds"], 3, "{s:#}");
    assert_eq!(s["osdmap"]["num_up_osds"], 3, "{s:#}");
    assert_eq!(s["osdmap"]["num_in_osds"], 3, "{s:#}");
    let mut hosts: Vec<(String, usize)> = tree["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["type"] == "host")
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_owned(),
                n["children"].as_array().map_or(0, |c| c.len()),
            )
        })
        .collect();
    hosts.sort();
    assert_eq!(
        hosts,
        [("pc0".into(), 1), ("pc1".into(), 1), ("pc2".into(), 1)],
        "{tree:#}"
    );
    s["fsid"].as_str().unwrap().to_owned()
}

/// Three VMs from the one rehearsal image, each with an empty 8 GiB disk, form a Consul
/// cluster and a Ceph cluster by themselves, from one cluster file (`picoimg cluster init
/// --stack consul,ceph`).
///
/// Consul: three alive members and raft voters with one leader, `.consul` names through the
/// node's resolver, ACLs that deny the anonymous token and let the derived one write, a Docker
/// container run from an image imported on the node, and the nomad stack's own step making
/// Nomad's Consul policies and tokens against the booted Consul. Ceph: monitors in quorum from
/// monitor stores made apart, managers and OSDs with the derived keys (read back by
/// ceph-authtool and the monitors), HEALTH_OK, and an object written on one node read back on
/// another. Then all three are shut down, pc2's system disk is replaced by a fresh copy of the
/// image (its OSD disk kept, as after a dead card), and all three boot again; pc2 loses power
/// in the middle of that first boot (Consul configured, Ceph's configuration written, its
/// monitor not yet made) and resumes from its recorded steps: the same fsid and keys,
/// HEALTH_OK, pc2's OSD activated, not made again, the object still there, and the Consul
/// cluster formed again.
///
/// The power cut is in the second round because there it costs one node's reboot: in the
/// first, every node's health check waited for the cut node's Consul (bootstrap_expect = 3)
/// before its own OSD, which made that round six minutes longer under TCG.
///
/// About 21-25 minutes under TCG on two cores (each round took 565-630 s from the VMs' start to
/// the last node's ready line). The rehearsal raises `mon_warn_on_slow_ping_time` (emulation
/// only, see `cluster_file`).
#[test]
fn three_nodes_form_consul_and_ceph_clusters_through_a_shutdown_a_reflash_and_a_power_cut() {
    let f = fixture();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let port = free_ports();
    let cluster = f.cluster.clone();
    let dir = f.dir.join("ceph");
    let mut r = ceph_rehearsal(f, &cluster, 3, &dir, port);
    let started = Instant::now();
    wait_ready(&mut r, "first boot");
    common::measured(format!(
        "ceph: three nodes ready {:.0}s after the VMs started",
        started.elapsed().as_secs_f64()
    ));
    // Each console is in its own log, with the node's step lines.
    let log = std::fs::read_to_string(dir.join("pc2.log")).unwrap();
    assert!(
        log.contains("picoimg: this is node pc2 of cluster lab (MAC 52:54:00:70:00:03)"),
        "{log}"
    );
    let health = log
        .lines()
        .find(|l| l.contains("picoimg: step health ok: "))
        .unwrap_or_else(|| panic!("no health line: {log}"));
    assert!(
        health.contains("consul server: member and voter, leader elected")
            && health.contains("ceph HEALTH_OK, 3 mons, 3 osds up"),
        "{health}"
    );
    assert_consul_formed(f, &cluster, port);
    assert_docker_runs_a_container(f, port + 1);
    assert_nomads_consul_tokens_work(f, &cluster, port + 2);
    // The secret is gone from the boot partitions' copies but the nodes still have it.
    let secret_line = std::fs::read_to_string(&cluster)
        .unwrap()
        .lines()
        .find(|l| l.starts_with("secret = "))
        .unwrap()
        .to_owned();
    let on_node = ssh_ok(
        f,
        port,
        "sudo cat /etc/picoimg/cluster.toml /boot/efi/picoimg/cluster.toml",
    );
    assert_eq!(on_node.matches(&secret_line).count(), 1, "{on_node}");
    assert!(on_node.contains("secret = \"\""), "{on_node}");
    let modes = ssh_ok(
        f,
        port,
        "sudo stat -c '%a %U' /etc/picoimg/cluster.toml /var/lib/picoimg/state.json \
         /etc/ceph/ceph.client.admin.keyring /etc/ceph/ceph.conf",
    );
    assert_eq!(modes, "600 root\n600 root\n600 root\n644 root\n");
    // ceph-crash waits for a crash key (none is derived): systemd skipped it, its dumps stay.
    let crash = ssh_ok(
        f,
        port,
        "systemctl show -p ConditionResult -p ActiveState ceph-crash.service",
    );
    assert!(
        crash.contains("ConditionResult=no") && crash.contains("ActiveState=inactive"),
        "{crash}"
    );
    // The first boot's presets enabled nothing the build left off (base's 99-picoimg.preset):
    // not K3s's units on a node without K3s roles, nor a socket beside its service.
    let off = ssh_ok(
        f,
        port,
        "systemctl is-enabled k3s.service k3s-agent.service ssh.socket cni-dhcp.socket || true",
    );
    assert_eq!(off, "disabled\n".repeat(4), "{off}");
    // A rerun on a configured node: every step already done, and quick.
    let rerun = ssh_ok(
        f,
        port + 1,
        "sudo bash -c 'time -p /usr/lib/picoimg/picoimg-firstboot apply' 2>&1",
    );
    let steps: Vec<&str> = rerun
        .lines()
        .filter(|l| l.contains("picoimg: step "))
        .collect();
    assert!(
        steps.len() >= 10 && steps.iter().all(|l| l.ends_with("ok: already done")),
        "{rerun}"
    );
    let secs: f64 = rerun
        .lines()
        .find_map(|l| l.strip_prefix("real "))
        .and_then(|s| s.trim().parse().ok())
        .unwrap();
    common::measured(format!(
        "firstboot rerun on a configured node: {secs:.2}s (TCG)"
    ));

    let fsid = assert_ceph_healthy(f, port);
    // Every key as derived (the library's own derivation, read back by Ceph's tools).
    let text = std::fs::read_to_string(&cluster).unwrap();
    let c =
        picoimg_firstboot::cluster::check_in(&text, None, picoimg_firstboot::stacks::registry())
            .unwrap();
    let secrets = Secrets::of(picoimg_firstboot::stacks::registry(), &c);
    use picoimg_firstboot::stacks::ceph::label;
    assert_eq!(fsid, secrets.get(label::FSID).unwrap());
    // ceph-authtool (Debian's ceph-common 18.2) reads the derived admin keyring back.
    let admin = ssh_ok(
        f,
        port,
        "sudo ceph-authtool /etc/ceph/ceph.client.admin.keyring -n client.admin --print-key",
    );
    assert_eq!(admin.trim(), secrets.get(label::ADMIN).unwrap());
    // The monitors hold the keys of the mkfs keyring, with their caps (asked on pc2 and pc0);
    // the file's [ceph.options] reached the running manager (its admin socket answers); a
    // pool for the data check.
    let mgr1 = ceph_ask(
        f,
        port + 2,
        serde_json::json!([{"mon": {"prefix": "auth get-key", "entity": "mgr.pc1", "format": "json"}}]),
    );
    assert_eq!(mgr1[0]["key"], secrets.get_for(label::MGR, "pc1").unwrap());
    let a = ceph_ask(
        f,
        port,
        serde_json::json!([
            {"mon": {"prefix": "auth get", "entity": "client.bootstrap-osd", "format": "json"}},
            {"asok": "/var/run/ceph/ceph-mgr.pc0.asok",
             "cmd": {"prefix": "config get", "var": "mon_warn_on_slow_ping_time"}},
            {"mon": {"prefix": "osd pool create", "pool": "picoimg-test", "pg_num": 8}},
            {"mon": {"prefix": "osd pool application enable", "pool": "picoimg-test", "app": "rados"}},
        ]),
    );
    let bootstrap = &a[0][0];
    assert_eq!(
        bootstrap["key"],
        secrets.get(label::BOOTSTRAP_OSD).unwrap(),
        "{bootstrap}"
    );
    assert_eq!(
        bootstrap["caps"]["mon"], "allow profile bootstrap-osd",
        "{bootstrap}"
    );
    let ping: f64 = a[1]["mon_warn_on_slow_ping_time"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{}", a[1]));
    assert_eq!(ping, 10000.0, "{}", a[1]);
    // Data: an object written through pc0, read back through pc2, same checksum.
    ssh_ok(
        f,
        port,
        "head -c 4194304 /dev/urandom > /tmp/obj && sudo rados -p picoimg-test put obj /tmp/obj",
    );
    let sum = |p: u16, cmd: &str| {
        ssh_ok(f, p, cmd)
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    let written = sum(port, "sha256sum /tmp/obj");
    let read = sum(
        port + 2,
        "sudo rados -p picoimg-test get obj /tmp/back && sha256sum /tmp/back",
    );
    assert_eq!(written, read);

    // Every node shut down; pc2's card dies and is replaced by a fresh copy of the image, its
    // OSD disk kept; all three boot again. pc2 loses power in the middle of that first boot,
    // once its Ceph configuration is written and before its monitor is made; booted again, it
    // resumes from its recorded steps.
    for i in 0..3u16 {
        let _ = ssh(f, port + i, "sudo systemctl poweroff");
    }
    for i in 0..3 {
        assert!(
            r.wait_exit(i, Duration::from_secs(600)),
            "pc{i} did not power off"
        );
    }
    r.reflash(2).unwrap();
    let again = Instant::now();
    for i in 0..3 {
        r.power_on(i).unwrap();
    }
    let cut = r.watch(Duration::from_secs(1500), |_, i, line| {
        i == 2 && line.contains("picoimg: step ceph ok")
    });
    assert!(
        cut,
        "re-flashed pc2 never wrote its Ceph configuration:\n{}\n{}",
        r.summary(),
        console_tails(&r)
    );
    r.power_cut(2);
    r.power_on(2).unwrap();
    wait_ready(
        &mut r,
        "after a shutdown of every node, pc2 re-flashed and cut",
    );
    common::measured(format!(
        "ceph: ready again {:.0}s after the VMs were powered on again (pc2 cut on the way)",
        again.elapsed().as_secs_f64()
    ));
    assert_eq!(assert_ceph_healthy(f, port), fsid);
    assert_consul_formed(f, &cluster, port + 2);
    let read = sum(
        port + 2,
        "sudo rados -p picoimg-test get obj /tmp/back2 && sha256sum /tmp/back2",
    );
    assert_eq!(written, read);
    let log = std::fs::read_to_string(dir.join("pc1.log")).unwrap();
    let second = log.split("power on (boot 2)").nth(1).unwrap();
    assert!(
        second.contains("picoimg: step ceph-mon ok: already done"),
        "{second}"
    );
    assert!(!second.contains("OSD created"), "{second}");
    // pc2: boot 2 is the re-flashed card's first boot, cut after its `ceph` step; boot 3
    // resumes there.
    let log = std::fs::read_to_string(dir.join("pc2.log")).unwrap();
    let cut_boot = log
        .split("power on (boot 2)")
        .nth(1)
        .unwrap()
        .split("power on (boot 3)")
        .next()
        .unwrap();
    assert!(
        cut_boot.contains("picoimg: step ceph ok: /etc/ceph/ceph.conf"),
        "{cut_boot}"
    );
    let resumed = log.split("power on (boot 3)").nth(1).unwrap();
    for done in [
        "step hostname ok: already done",
        "step network ok: already done",
        "step consul ok: already done",
        "step ceph ok: already done",
        "step ceph-mon ok: monitor pc2: store made",
        "step ceph-devices ok: /dev/disk/by-id/virtio-osd0 holds osd.",
        "activated (made before)",
        "ceph HEALTH_OK, 3 mons, 3 osds up",
        "picoimg: ready: node pc2 of cluster lab",
    ] {
        assert!(resumed.contains(done), "{done}: {resumed}");
    }
    assert!(!resumed.contains("OSD created"), "{resumed}");
    drop(r);
    assert!(!switch_alive(&dir), "the VDE switch outlived the rehearsal");
}

/// Three VMs from the rehearsal image form a Docker swarm and an Incus cluster by themselves
/// (`picoimg cluster init --stack swarm`, Ceph's roles left out): pc0, the first manager and
/// member in file order, founds both; pc1 and pc2 join with the tokens it hands over on the
/// handover channel. Checked over SSH: three managers Ready with one leader and one swarm id
/// on every node, a global service of an image imported on each node answering on every
/// node's address through the routing mesh, three Incus members ONLINE, a container created
/// through pc0 on pc1 and listed by pc2, no join token in any journal or console. Then pc0's
/// card dies: it is powered off, re-flashed with a fresh copy of the image and booted while
/// the others run; the founder joins the swarm and the Incus cluster that still run instead of
/// founding second ones (the same swarm id, its old entry gone, the container still listed).
#[test]
fn three_nodes_form_a_swarm_and_an_incus_cluster_and_a_reflashed_founder_joins_both() {
    let f = fixture();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let port = free_ports();
    let dir = f.dir.join("swarm");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = swarm_cluster_file(f, &dir);
    let mut r = Rehearsal::start(&ClusterOptions {
        // Incus keeps its storage pool on the root filesystem.
        disk_size: Some(4 << 30),
        ..rehearsal_options(f, &cluster, 3, &dir, port)
    })
    .unwrap();
    let started = Instant::now();
    wait_ready(&mut r, "swarm and incus, first boot");
    common::measured(format!(
        "swarm and incus: three nodes ready {:.0}s after the VMs started",
        started.elapsed().as_secs_f64()
    ));
    let log = |i: usize| std::fs::read_to_string(dir.join(format!("pc{i}.log"))).unwrap();
    let pc0 = log(0);
    assert!(
        pc0.contains("swarm manager (founded the swarm): 3 nodes Ready, 3 managers")
            && pc0.contains("incus member (founded the cluster): 3 members Online"),
        "{pc0}"
    );
    for i in [1, 2] {
        let l = log(i);
        assert!(
            l.contains("swarm manager (joined through pc0)")
                && l.contains("incus member (joined through pc0)"),
            "{l}"
        );
    }
    let swarm = assert_swarm_formed(f, port, 1);
    let (web, meta, rootfs) = busybox_images(&dir);
    assert_swarm_serves(f, port, &web);
    assert_incus_formed(f, port + 2);
    // A container created through pc0 on pc1, listed by pc2.
    ssh_put(f, port, &meta, "/tmp/meta.tar");
    ssh_put(f, port, &rootfs, "/tmp/rootfs.tar");
    ssh_ok(
        f,
        port,
        "sudo incus image import /tmp/meta.tar /tmp/rootfs.tar --alias picoimg-mini >/dev/null \
         && sudo incus create picoimg-mini c1 --target pc1 >/dev/null",
    );
    let listed = ssh_ok(f, port + 2, "sudo incus list --format csv -c nL");
    assert_eq!(listed.trim(), "c1,pc1", "{listed}");
    // No join token reached a console or a journal.
    let tokens = ssh_ok(
        f,
        port,
        "sudo docker swarm join-token -q manager; sudo docker swarm join-token -q worker",
    );
    for i in 0..3u16 {
        let journal = ssh_ok(f, port + i, "sudo journalctl -b --no-pager -o cat");
        for t in tokens.lines() {
            assert!(
                !journal.contains(t.trim()),
                "pc{i}'s journal shows a join token"
            );
        }
        assert!(
            !log(i as usize).contains("SWMTKN-"),
            "pc{i}'s console shows a join token"
        );
    }

    // pc0's card dies while the others run: off, a fresh copy of the image, on again.
    let _ = ssh(f, port, "sudo systemctl poweroff");
    assert!(
        r.wait_exit(0, Duration::from_secs(600)),
        "pc0 did not power off"
    );
    r.reflash(0).unwrap();
    let again = Instant::now();
    r.power_on(0).unwrap();
    wait_ready(&mut r, "pc0 re-flashed");
    common::measured(format!(
        "swarm and incus: re-flashed pc0 ready {:.0}s after it was powered on",
        again.elapsed().as_secs_f64()
    ));
    let whole = log(0);
    let second = whole.split("power on (boot 2)").nth(1).unwrap();
    assert!(
        second.contains("swarm manager (joined through pc")
            && second.contains("incus member (joined through pc"),
        "{second}"
    );
    assert_eq!(assert_swarm_formed(f, port, 0), swarm);
    assert_incus_formed(f, port);
    let listed = ssh_ok(f, port, "sudo incus list --format csv -c nL");
    assert_eq!(listed.trim(), "c1,pc1", "{listed}");
    drop(r);
    assert!(!switch_alive(&dir), "the VDE switch outlived the rehearsal");
}

/// The swarm rehearsal's cluster file: `cluster init --stack swarm` (managers and Incus
/// members) without Ceph's roles and sections.
fn swarm_cluster_file(f: &Fixture, dir: &Path) -> PathBuf {
    let path = cluster_file(dir, &f.key, "swarm", "swarm", 3, "10.77.0.0/24");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = String::new();
    let mut skip = false;
    for line in text.lines() {
        if line.starts_with('[') {
            skip = line.starts_with("[ceph");
        }
        if !skip {
            out.push_str(&line.replace("\"ceph-mon\", \"ceph-mgr\", \"ceph-osd\", ", ""));
            out.push('\n');
        }
    }
    assert!(!out.contains("\"ceph-"), "{out}");
    std::fs::write(&path, out).unwrap();
    path
}

/// A node whose OSD disk holds a filesystem refuses it: the node reports failed naming the
/// device and what is on it, and the filesystem and its file are intact (checked after the
/// run by e2fsck and debugfs on the disk's contents).
///
/// Run through the command a user types, `picoimg run --cluster FILE --nodes 1`: its summary
/// line once the node has reported, the VM kept running for a look over SSH, then Ctrl-C stops
/// the VM and the switch.
#[test]
fn a_node_refuses_an_osd_disk_that_holds_a_filesystem() {
    let f = fixture();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let port = free_ports();
    let cluster = cluster_file(&f.dir, &f.key, "solo-store", "ceph", 1, "10.78.0.0/24");
    let dir = f.dir.join("ceph-refuse");
    let _ = std::fs::remove_dir_all(&dir);
    // The disk the rehearsal would make, made first: ext4 labelled "photos" with one file.
    let node_dir = dir.join("pc0");
    std::fs::create_dir_all(&node_dir).unwrap();
    let raw = dir.join("photos.raw");
    let run = run_ok;
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "photos"])
        .arg(&raw));
    let photo = dir.join("holiday.txt");
    std::fs::write(&photo, "a file the user keeps\n").unwrap();
    run(Command::new("debugfs")
        .arg("-w")
        .arg("-R")
        .arg(format!("write {} holiday.txt", photo.display()))
        .arg(&raw));
    let disk = node_dir.join("data-osd0.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(&raw)
        .arg(&disk));
    let mut child = picoimg()
        .args(["run", "--accel", "tcg", "--timeout", "1500", "--nodes", "1"])
        .arg("--cluster")
        .arg(&cluster)
        .arg("--dir")
        .arg(&dir)
        .args(["--ssh-port-base", &port.to_string()])
        .arg(&f.image)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Ctrl-C, then wait (bounded) for picoimg to stop the VM and the switch and exit.
    let stop = |child: &mut std::process::Child| {
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        panic!("picoimg run did not stop within 60 s of Ctrl-C");
    };
    // The summary: one line for the one node once it has reported.
    let mut summary = String::new();
    let read = BufReader::new(child.stdout.take().unwrap()).read_line(&mut summary);
    if !summary.contains("failed") {
        stop(&mut child);
        let log = std::fs::read_to_string(node_dir.with_extension("log")).unwrap_or_default();
        panic!("pc0 did not fail ({read:?}): {summary}\n{log}");
    }
    assert!(summary.starts_with("pc0 "), "{summary}");
    assert!(
        summary.contains("/dev/disk/by-id/virtio-osd0 is not empty (signatures: ext4 (label \"photos\")): left untouched"),
        "{summary}"
    );
    // Nothing of Ceph made or started on it.
    let units = ssh_ok(f, port, "systemctl is-active ceph-mon@pc0 || true");
    assert_eq!(units.trim(), "inactive", "{units}");
    let store = ssh_ok(
        f,
        port,
        "sudo test -e /var/lib/ceph/mon/ceph-pc0/store.db && echo made || echo none",
    );
    assert_eq!(store.trim(), "none", "{store}");
    let st = stop(&mut child);
    assert!(st.success() || st.code() == Some(130), "picoimg run: {st}");
    assert!(!switch_alive(&dir), "the VDE switch outlived picoimg run");
    let back = dir.join("back.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-O", "raw"])
        .arg(&disk)
        .arg(&back));
    run(Command::new("e2fsck").args(["-f", "-n"]).arg(&back));
    let text = run(Command::new("debugfs")
        .arg("-R")
        .arg("cat holiday.txt")
        .arg(&back));
    assert_eq!(text, "a file the user keeps\n");
}

/// Where the k3s component puts K3s, read from the rehearsal image's root filesystem with
/// debugfs: the release binary (here a stand-in) at /usr/local/bin/k3s, 0755; kubectl, crictl
/// and ctr as links to it; the air-gap images where K3s imports them; our own server and agent
/// units (not enabled: the first-boot agent enables one once the node knows how it starts); the
/// health check ordered after them; no config.yaml yet (a node writes it, 0600, at first boot);
/// the manifest records the files with the sha256 they were given.
#[test]
fn the_k3s_component_puts_k3s_where_k3s_expects_it() {
    let f = fixture();
    let root = root_partition(&f.image);
    let debugfs = |request: &str| run_ok(Command::new("debugfs").arg("-R").arg(request).arg(&root));
    let stat = |path: &str| debugfs(&format!("stat {path}"));
    let k3s = stat("/usr/local/bin/k3s");
    assert!(
        k3s.contains("Mode:  0755") && k3s.contains("User:     0   Group:     0"),
        "{k3s}"
    );
    assert_eq!(debugfs("cat /usr/local/bin/k3s"), K3S_STAND_IN);
    for link in ["kubectl", "crictl", "ctr"] {
        let s = stat(&format!("/usr/local/bin/{link}"));
        assert!(
            s.contains("Type: symlink") && s.contains("Fast link dest: \"k3s\""),
            "{link}: {s}"
        );
    }
    let images = "/var/lib/rancher/k3s/agent/images/k3s-airgap-images.tar.zst";
    assert!(stat(images).contains("Mode:  0644"), "{}", stat(images));
    assert_eq!(debugfs(&format!("cat {images}")), K3S_IMAGES_STAND_IN);
    for (unit, run) in [
        ("k3s.service", "k3s server"),
        ("k3s-agent.service", "k3s agent"),
    ] {
        let text = debugfs(&format!("cat /etc/systemd/system/{unit}"));
        assert!(
            text.contains(&format!("\nExecStart=/usr/local/bin/{run}\n")),
            "{text}"
        );
        assert!(
            text.contains("\nConditionPathExists=/etc/rancher/k3s/config.yaml\n"),
            "{text}"
        );
        assert!(
            text.contains("\nType=notify\n") && text.contains("\nDelegate=yes\n"),
            "{text}"
        );
        let wants = debugfs(&format!(
            "stat /etc/systemd/system/multi-user.target.wants/{unit}"
        ));
        assert!(
            !wants.contains("Type: symlink"),
            "{unit} is enabled in the image: {wants}"
        );
    }
    let drop_in = debugfs("cat /etc/systemd/system/picoimg-firstboot-health.service.d/k3s.conf");
    assert!(
        drop_in.contains("After=k3s.service k3s-agent.service"),
        "{drop_in}"
    );
    let config = stat("/etc/rancher/k3s/config.yaml");
    assert!(
        !config.contains("Mode:"),
        "config.yaml in the image: {config}"
    );
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(f.image.with_extension("manifest.json")).unwrap(),
    )
    .unwrap();
    let artifacts = manifest["artifacts"].as_array().unwrap();
    for (name, body) in [("k3s", K3S_STAND_IN), ("k3s-images", K3S_IMAGES_STAND_IN)] {
        let a = artifacts.iter().find(|a| a["name"] == name).unwrap();
        assert_eq!(
            a["sha256"],
            hex::encode(sha2::Sha256::digest(body.as_bytes())),
            "{a}"
        );
    }
}
