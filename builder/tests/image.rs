//! Tiers 3 and 4: build the real h4-base image once per run (root, mmdebstrap, the Debian
//! archive), check it with independent tools (sfdisk, fsck.fat, e2fsck, debugfs, mtools,
//! bmaptool, sha256sum), and boot it in QEMU to the ready marker.
//!
//! Enabled with `--features image-tests` (ci/test.sh does this). The root filesystem comes
//! from the picoimg cache (PICOIMG_CACHE_DIR), so only the first run on a machine downloads.
#![cfg(feature = "image-tests")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn picoimg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_picoimg"))
}

fn tool(name: &str) -> Command {
    for dir in ["/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Command::new(p);
        }
    }
    Command::new(name)
}

fn run_ok(c: &mut Command) -> String {
    let o = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(
        o.status.success(),
        "{c:?} failed: {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Built {
    out: PathBuf,
    raw: PathBuf,
    xz: PathBuf,
    manifest: serde_json::Value,
}

/// In a run of every test (no name filter, as CI runs them), starts the arm64 images (c5, then
/// both Pi 5 sets, which share its base root) in a thread of their own, once. Their emulated
/// root filesystem is the longest build here and mostly keeps one core busy: started with the
/// first fixture it overlaps the h4 tests, instead of both test threads waiting for it later
/// with one core idle. A filtered run builds what its tests ask for, when they ask.
fn arm64_early() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let filtered = std::env::args().skip(1).any(|a| !a.starts_with('-'));
        if !filtered {
            std::thread::spawn(|| {
                c5();
                debian_sets();
            });
        }
    });
}

/// How every h4-base build of these tests is asked for (the fixture, and the rebuilds that must
/// find the same inputs): the raw image kept beside the .img.xz, compressed at level 1. The
/// default level (6) only makes the .img.xz smaller and takes five times the CPU: the block
/// compression and its cache are the same code at every level.
const H4_BASE: [&str; 9] = [
    "build",
    "--board",
    "h4",
    "--stack",
    "base",
    "--keep-raw",
    "--xz-level",
    "1",
    "--out",
];

/// Builds h4-base once for every test in this binary.
fn h4() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    arm64_early();
    BUILT.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("image-tests/out");
        let _ = std::fs::remove_dir_all(&out);
        let started = Instant::now();
        let o = picoimg()
            .args(H4_BASE)
            .arg(&out)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(o.status.success(), "picoimg build failed: {}", o.status);
        common::measured(format!(
            "h4-base built in {:.0}s",
            started.elapsed().as_secs_f64()
        ));
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("h4-base.manifest.json")).unwrap())
                .unwrap();
        Built {
            raw: out.join("h4-base.img"),
            xz: out.join("h4-base.img.xz"),
            out,
            manifest,
        }
    })
}

/// Builds h4 with the kvm component (over the cached base root) for the cluster of two
/// boards; returns the raw image.
fn h4_kvm() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("image-tests/h4-kvm");
        let _ = std::fs::remove_dir_all(&out);
        let started = Instant::now();
        let o = picoimg()
            .args([
                "build", "--board", "h4", "--stack", "kvm", "--no-xz", "--out",
            ])
            .arg(&out)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "picoimg build h4-kvm failed: {}",
            o.status
        );
        common::measured(format!(
            "h4-kvm built in {:.0}s",
            started.elapsed().as_secs_f64()
        ));
        out.join("h4-kvm.img")
    })
}

/// Copies partition `n` (1-based, placed as the manifest says) out of `raw`, sparsely.
fn partition_of(raw: &Path, manifest: &serde_json::Value, n: usize, dir: &Path) -> PathBuf {
    let p = &manifest["disk"]["partitions"][n - 1];
    let (start, size) = (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap());
    let stem = raw.file_stem().unwrap().to_string_lossy();
    let dst = dir.join(format!("{stem}-part{n}.img"));
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", raw.display()))
            .arg(format!("of={}", dst.display()))
            .args([
                "bs=1M",
                "iflag=skip_bytes,count_bytes",
                "conv=sparse",
                "status=none",
            ])
            .arg(format!("skip={start}"))
            .arg(format!("count={size}")),
    );
    dst
}

fn extract_partition(b: &Built, n: usize, dir: &Path) -> PathBuf {
    partition_of(&b.raw, &b.manifest, n, dir)
}

#[test]
fn sfdisk_shows_the_gpt_we_meant() {
    let b = h4();
    let json = run_ok(tool("sfdisk").arg("--json").arg(&b.raw));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let t = &v["partitiontable"];
    assert_eq!(t["label"], "gpt");
    assert_eq!(t["sectorsize"], 512);
    let parts = t["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0]["type"], "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    assert_eq!(parts[0]["start"], 2048, "ESP at 1 MiB");
    assert_eq!(parts[0]["size"], 256 * 2048, "ESP is 256 MiB");
    assert_eq!(parts[1]["type"], "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709");
    assert_eq!(parts[1]["start"], 2048 + 256 * 2048);
    for p in parts {
        assert_eq!(p["start"].as_u64().unwrap() % 2048, 0, "1 MiB aligned: {p}");
    }
    let root_uuid = b.manifest["disk"]["partitions"][1]["uuid"]
        .as_str()
        .unwrap();
    assert_eq!(parts[1]["uuid"].as_str().unwrap().to_lowercase(), root_uuid);
    run_ok(tool("sfdisk").arg("--verify").arg(&b.raw));
}

#[test]
fn filesystems_are_clean() {
    let b = h4();
    let dir = tempfile::tempdir().unwrap();
    let esp = extract_partition(b, 1, dir.path());
    let fsck = run_ok(tool("fsck.vfat").arg("-n").arg(&esp));
    assert!(
        !fsck.contains("Fixing") && !fsck.contains("Expected"),
        "{fsck}"
    );
    let root = extract_partition(b, 2, dir.path());
    let fsck = run_ok(tool("e2fsck").arg("-fn").arg(&root));
    // The manifest's root_file_bytes against what e2fsck counts in use ("n/m blocks"): the
    // files' bytes fit in the used blocks, and metadata does not make up most of them.
    let used = fsck
        .split_whitespace()
        .find_map(|w| {
            w.split_once('/')
                .filter(|_| fsck.contains(&format!("{w} blocks")))
        })
        .and_then(|(u, _)| u.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no block count from e2fsck: {fsck}"));
    let bsize: u64 = run_ok(tool("dumpe2fs").arg("-h").arg(&root))
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let files = b.manifest["root_file_bytes"].as_u64().unwrap();
    let used = used * bsize;
    assert!(
        files < used && files > used / 2,
        "files {files} B, used {used} B"
    );
    let kib: u64 = b.manifest["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["installed_size_kib"].as_u64())
        .sum();
    assert!(
        kib * 1024 > files / 2,
        "dpkg's Installed-Size sum {kib} KiB"
    );
}

#[test]
fn esp_boots_systemd_boot_with_the_root_partuuid() {
    let b = h4();
    let dir = tempfile::tempdir().unwrap();
    let esp = extract_partition(b, 1, dir.path());
    let listing = run_ok(
        Command::new("mdir")
            .arg("-i")
            .arg(&esp)
            .args(["-b", "-/", "::"]),
    );
    for f in [
        "::/EFI/BOOT/BOOTX64.EFI",
        "::/loader/loader.conf",
        "::/picoimg/vmlinuz",
        "::/picoimg/initrd.img",
    ] {
        assert!(listing.contains(f), "{f} missing:\n{listing}");
    }
    let entry = run_ok(
        Command::new("mtype")
            .arg("-i")
            .arg(&esp)
            .arg("::/loader/entries/picoimg.conf"),
    );
    let json = run_ok(tool("sfdisk").arg("--json").arg(&b.raw));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let root = v["partitiontable"]["partitions"][1]["uuid"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(entry.contains(&format!("root=PARTUUID={root}")), "{entry}");
    assert!(entry.contains("console=ttyS0,115200"), "{entry}");
    let efi = run_ok(
        Command::new("mtype")
            .arg("-i")
            .arg(&esp)
            .arg("::/EFI/BOOT/BOOTX64.EFI"),
    );
    assert!(efi.starts_with("MZ"), "BOOTX64.EFI is not a PE binary");
}

#[test]
fn root_has_overlays_and_no_per_node_identity() {
    let b = h4();
    let dir = tempfile::tempdir().unwrap();
    let root = extract_partition(b, 2, dir.path());
    let debugfs = |req: &str| run_ok(tool("debugfs").arg("-R").arg(req).arg(&root));
    let fstab = debugfs("cat /etc/fstab");
    let root_uuid = b.manifest["disk"]["partitions"][1]["uuid"]
        .as_str()
        .unwrap();
    assert!(
        fstab.contains(&format!("PARTUUID={root_uuid}\t/\text4")),
        "{fstab}"
    );
    // The ESP may appear late (slow readers, emulation under load): systemd waits 10 min for
    // it, not its default 90 s, since the first-boot agent requires the mount.
    let esp = fstab.lines().find(|l| l.contains("/boot/efi")).unwrap();
    assert!(esp.contains("x-systemd.device-timeout=10min"), "{fstab}");
    assert_eq!(debugfs("cat /etc/machine-id").trim(), "uninitialized");
    // linux-sysctl-defaults (iputils-ping's Recommends) lets every user ping.
    let sysctl = debugfs("cat /usr/lib/sysctl.d/50-default.conf");
    assert!(sysctl.contains("ping_group_range"), "{sysctl}");
    let ssh = debugfs("ls /etc/ssh");
    assert!(
        !ssh.contains("ssh_host_"),
        "host keys must be made per node:\n{ssh}"
    );
    assert!(
        debugfs("cat /etc/ssh/sshd_config.d/50-picoimg.conf").contains("PasswordAuthentication no")
    );
    let wants = debugfs("ls /etc/systemd/system/multi-user.target.wants");
    for unit in [
        "picoimg-boot-report.service",
        "systemd-networkd.service",
        "ssh.service",
    ] {
        assert!(wants.contains(unit), "{unit} not enabled:\n{wants}");
    }
    assert!(
        debugfs("stat /boot/efi").contains("Type: directory"),
        "ESP mount point"
    );
    let hook = debugfs("stat /etc/kernel/postinst.d/zz-picoimg-esp");
    assert!(hook.contains("Mode:  0755"), "{hook}");
    let stat = debugfs("stat /usr/lib/picoimg/growroot");
    assert!(
        stat.contains("Mode:  0755") && stat.contains("User:     0"),
        "{stat}"
    );
}

#[test]
fn bmaptool_copy_gives_the_raw_image() {
    let b = h4();
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("flashed.img");
    run_ok(
        Command::new("bmaptool")
            .arg("copy")
            .arg("--bmap")
            .arg(b.out.join("h4-base.img.bmap"))
            .arg(&b.xz)
            .arg(&dst),
    );
    run_ok(Command::new("cmp").arg(&b.raw).arg(&dst));
}

/// `picoimg flash` with the image's own block map writes only the mapped bytes and gives the
/// raw image back, byte for byte.
#[test]
fn picoimg_flash_gives_the_raw_image_writing_only_mapped_bytes() {
    let b = h4();
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("flashed.img");
    let o = picoimg()
        .arg("flash")
        .arg(&b.xz)
        .arg(&dst)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    run_ok(Command::new("cmp").arg(&b.raw).arg(&dst));
    let e = String::from_utf8_lossy(&o.stderr);
    let written: u64 = e
        .lines()
        .find_map(|l| {
            l.split("wrote ")
                .nth(1)?
                .split(" bytes")
                .next()?
                .parse()
                .ok()
        })
        .unwrap();
    let bmap = std::fs::read_to_string(b.out.join("h4-base.img.bmap")).unwrap();
    let mapped: u64 = bmap
        .split("<MappedBlocksCount>")
        .nth(1)
        .and_then(|x| x.split('<').next())
        .and_then(|x| x.trim().parse().ok())
        .unwrap();
    assert_eq!(written, mapped * 4096, "{e}");
}

#[test]
fn sha256sums_verify() {
    let b = h4();
    run_ok(
        Command::new("sha256sum")
            .arg("-c")
            .arg("SHA256SUMS")
            .current_dir(&b.out),
    );
    use std::os::unix::fs::PermissionsExt;
    for f in [
        "SHA256SUMS",
        "h4-base.img.xz",
        "h4-base.img.bmap",
        "h4-base.manifest.json",
    ] {
        let mode = std::fs::metadata(b.out.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o644, "{f} is {mode:o}");
    }
    let sums = std::fs::read_to_string(b.out.join("SHA256SUMS")).unwrap();
    for f in [
        "h4-base.img.xz",
        "h4-base.img.bmap",
        "h4-base.manifest.json",
    ] {
        assert!(sums.contains(f), "{f} not in SHA256SUMS");
    }
}

#[test]
fn manifest_lists_packages_and_matches_the_plan() {
    let b = h4();
    let pkgs = b.manifest["packages"].as_array().unwrap();
    let kernel = pkgs
        .iter()
        .find(|p| p["name"] == "linux-image-amd64")
        .expect("kernel listed");
    assert_eq!(kernel["architecture"], "amd64");
    assert!(!kernel["version"].as_str().unwrap().is_empty());
    assert!(pkgs.len() > 100, "{} packages", pkgs.len());
    // Package installs do not each regenerate the initramfs: it is made once in the base,
    // and once more at the end of the layer (the board's firmware) because intel-microcode's
    // initramfs hook asks for it.
    assert_eq!(
        b.manifest["rootfs"]["initramfs_generations"].as_u64(),
        Some(2)
    );
    let plan = run_ok(picoimg().args(["plan", "--board", "h4", "--stack", "base"]));
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    assert_eq!(plan["inputs_hash"], b.manifest["inputs_hash"]);
    // The apt sources it was made from, as the plan has them (h4-base: the board's firmware
    // is a layer that adds no source).
    assert!(plan["layer"]["sources"].as_array().unwrap().is_empty());
    assert_eq!(b.manifest["apt_sources"], plan["rootfs"]["sources"]);
    assert!(!b.manifest["apt_sources"].as_array().unwrap().is_empty());
    assert_eq!(b.manifest["board"]["name"], "h4");
    assert_eq!(b.manifest["picoimg_version"], env!("CARGO_PKG_VERSION"));
}

/// The image boots under OVMF to its ready marker, and grows its root to fill a bigger disk.
#[test]
fn boots_to_ready_and_grows_root() {
    let b = h4();
    let o = picoimg()
        .arg("run")
        .arg(&b.xz)
        .args([
            "--expect-ready",
            "--timeout",
            "900",
            "--net",
            "restricted",
            "--disk-size",
            "4GiB",
        ])
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "boot failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        tail(&console)
    );
    let ready = console
        .lines()
        .find(|l| l.contains("picoimg-boot: ready"))
        .expect("marker line");
    let root_bytes: u64 = ready
        .split("root_bytes=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no root size in {ready}"));
    assert!(
        root_bytes > 3_500_000_000,
        "root did not grow to the 4 GiB disk: {ready}"
    );
    eprintln!("{}", String::from_utf8_lossy(&o.stderr));
}

/// A unit that fails makes `run --expect-ready` fail and name it. The image is h4 with one
/// more component, from a copy of the data directory, whose enabled unit runs /bin/false.
#[test]
fn failed_unit_fails_the_boot_and_is_named() {
    h4(); // same packages: reuses the cached root filesystem
    let data = common::data_copy();
    let comp = data.path().join("overlays/broken");
    std::fs::create_dir_all(comp.join("rootfs/etc/systemd/system")).unwrap();
    // It also installs a pinned artifact (as a release binary from a vendor's site would
    // be), served here from 127.0.0.1: it must land in the root filesystem with its mode.
    let artifact = b"#!/bin/sh\necho picoimg test artifact\n".to_vec();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&artifact))
    };
    let url = common::serve(artifact.clone(), 2);
    std::fs::write(
        comp.join("component.toml"),
        format!(
            "description = \"a unit that fails, for tests\"\nenable = [\"picoimg-test-broken.service\"]\n\n\
             [[artifact]]\nname = \"test-tool\"\ndescription = \"a test release binary\"\n\
             path = \"/usr/local/bin/picoimg-test-tool\"\nmode = 0o750\n\
             [artifact.pins.amd64]\nurl = \"{url}\"\nsha256 = \"{sha}\"\n"
        ),
    )
    .unwrap();
    std::fs::write(
        comp.join("rootfs/etc/systemd/system/picoimg-test-broken.service"),
        "[Service]\nType=oneshot\nExecStart=/bin/false\n[Install]\nWantedBy=multi-user.target\n",
    )
    .unwrap();
    let stacks = data.path().join("overlays/stacks.toml");
    let mut text = std::fs::read_to_string(&stacks).unwrap();
    text.push_str("\n[broken]\ndescription = \"base + a failing unit\"\ncomponents = [\"base\", \"broken\"]\n");
    std::fs::write(&stacks, text).unwrap();
    let out = tempfile::tempdir().unwrap();
    run_ok(
        picoimg()
            .arg("--data-dir")
            .arg(data.path())
            .args([
                "build", "--board", "h4", "--stack", "broken", "--no-xz", "--out",
            ])
            .arg(out.path()),
    );
    let dir = tempfile::tempdir().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("h4-broken.manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["artifacts"][0]["sha256"], sha.as_str());
    assert_eq!(manifest["artifacts"][0]["source"], url.as_str());
    let root = partition_of(&out.path().join("h4-broken.img"), &manifest, 2, dir.path());
    let debugfs = |req: &str| run_ok(tool("debugfs").arg("-R").arg(req).arg(&root));
    assert_eq!(
        debugfs("cat /usr/local/bin/picoimg-test-tool").trim_end(),
        String::from_utf8_lossy(&artifact).trim_end()
    );
    let stat = debugfs("stat /usr/local/bin/picoimg-test-tool");
    assert!(
        stat.contains("Mode:  0750") && stat.contains("User:     0"),
        "{stat}"
    );
    let o = picoimg()
        .arg("run")
        .arg(out.path().join("h4-broken.img"))
        .args(["--expect-ready", "--timeout", "900", "--net", "restricted"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a failing unit still gave the ready marker"
    );
    assert!(e.contains("the image reported failed units"), "{e}");
    assert!(
        e.contains("picoimg-boot: failed unit picoimg-test-broken.service"),
        "{e}"
    );
}

/// Without a marker in time, run fails and shows the console tail.
#[test]
fn run_timeout_fails_with_console_tail() {
    let b = h4();
    let o = picoimg()
        .arg("run")
        .arg(&b.raw)
        .args(["--expect-ready", "--timeout", "3", "--net", "none"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("no ready marker within 3s") && e.contains("console lines"),
        "{e}"
    );
}

/// Ctrl-C during a build removes the temporary tree: nothing is left in --out.
#[test]
fn interrupt_leaves_no_partial_output() {
    h4(); // the root filesystem is cached, so the build quickly reaches image assembly
    let out = tempfile::tempdir().unwrap();
    let child = picoimg()
        .args(["build", "--board", "h4", "--stack", "base", "--out"])
        .arg(out.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the staging directory exists, then interrupt.
    let started = Instant::now();
    while std::fs::read_dir(out.path()).unwrap().next().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "build never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let left: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(50)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Odroid C5 (arm64, MBR, u-boot blob at byte 512), built with the Debian source set. The
// signed u-boot is Hardkernel's real file (tests/data/odroid-c5/, pinned in boards/c5.toml),
// served from a local HTTP server on 127.0.0.1 in place of its URL, which these machines
// cannot reach (only the URL is swapped, in a copy of the data directory; the pin stays).

struct C5 {
    raw: PathBuf,
    blob: Vec<u8>,
    manifest: serde_json::Value,
    _data: tempfile::TempDir,
}

fn c5() -> &'static C5 {
    static BUILT: OnceLock<C5> = OnceLock::new();
    BUILT.get_or_init(|| {
        use sha2::Digest;
        let blob = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/odroid-c5/u-boot.bin.signed"),
        )
        .unwrap();
        let sha = hex::encode(sha2::Sha256::digest(&blob));
        let board = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../boards/c5.toml"),
        )
        .unwrap();
        assert!(
            board.contains(&format!("sha256 = \"{sha}\"")),
            "boards/c5.toml does not pin the test blob's sha256 {sha}"
        );
        let url = common::serve(blob.clone(), 4);
        let data = common::data_copy();
        common::c5_blob_from(data.path(), &url, &sha);
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("image-tests/c5");
        let _ = std::fs::remove_dir_all(&out);
        let started = Instant::now();
        // No .img.xz: the h4 tests cover compression; the c5 tests read the raw image.
        let o = picoimg()
            .arg("--data-dir")
            .arg(data.path())
            .args([
                "build",
                "--board",
                "c5",
                "--stack",
                "consul",
                "--sources",
                "debian",
            ])
            .args(["--no-xz", "--out"])
            .arg(&out)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(o.status.success(), "picoimg build c5 failed: {}", o.status);
        common::measured(format!(
            "c5-consul built in {:.0}s",
            started.elapsed().as_secs_f64()
        ));
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("c5-consul.manifest.json")).unwrap())
                .unwrap();
        C5 {
            raw: out.join("c5-consul.img"),
            blob,
            manifest,
            _data: data,
        }
    })
}

fn c5_partition(c: &C5, n: usize, dir: &Path) -> PathBuf {
    partition_of(&c.raw, &c.manifest, n, dir)
}

#[test]
fn c5_has_an_mbr_with_its_disk_id_and_boot_partition_at_4mib() {
    let c = c5();
    let v: serde_json::Value =
        serde_json::from_str(&run_ok(tool("sfdisk").arg("--json").arg(&c.raw))).unwrap();
    let t = &v["partitiontable"];
    assert_eq!(t["label"], "dos");
    let id = c.manifest["disk"]["ids"]["mbr_disk_id"].as_u64().unwrap();
    assert_eq!(t["id"], format!("0x{id:08x}"));
    let parts = t["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0]["start"], 4 * 2048, "boot partition at 4 MiB");
    assert_eq!(parts[0]["type"], "c");
    assert_eq!(parts[0]["bootable"], true);
    assert_eq!(parts[1]["type"], "83");
    assert_eq!(c.manifest["sources"], "debian");
    assert_eq!(c.manifest["blob"]["offset"], 512);
    run_ok(tool("sfdisk").arg("--verify").arg(&c.raw));
}

#[test]
fn c5_blob_sits_at_byte_512_and_the_table_survives() {
    let c = c5();
    let mut head = vec![0u8; 512 + c.blob.len()];
    use std::io::Read;
    std::fs::File::open(&c.raw)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(c.blob.len(), 3_379_200, "Hardkernel's signed u-boot");
    assert!(
        head[512..] == c.blob[..],
        "blob bytes at 512 differ from the input"
    );
    // Bytes 440-511 (disk id, partition entries, signature) are the table sfdisk reads.
    let id = c.manifest["disk"]["ids"]["mbr_disk_id"].as_u64().unwrap() as u32;
    assert_eq!(head[440..444], id.to_le_bytes(), "disk id at 440");
    let first_start = u32::from_le_bytes(head[446 + 8..446 + 12].try_into().unwrap());
    assert_eq!(first_start, 4 * 2048, "partition 1 entry intact");
    assert_eq!(head[446 + 4], 0x0c, "partition 1 type intact");
    assert_eq!(head[510..512], [0x55, 0xaa], "MBR signature");
    // The blob ends before partition 1.
    assert!(512 + c.blob.len() as u64 <= u64::from(first_start) * 512);
}

#[test]
fn c5_boot_partition_has_extlinux_boot_scr_and_an_arm64_kernel() {
    let c = c5();
    let dir = tempfile::tempdir().unwrap();
    let boot = c5_partition(c, 1, dir.path());
    let fsck = run_ok(tool("fsck.vfat").arg("-n").arg(&boot));
    assert!(!fsck.contains("Fixing"), "{fsck}");
    let listing = run_ok(
        Command::new("mdir")
            .arg("-i")
            .arg(&boot)
            .args(["-b", "-/", "::"]),
    );
    for f in [
        "::/Image",
        "::/initrd.img",
        "::/extlinux/extlinux.conf",
        "::/boot.scr",
    ] {
        assert!(listing.contains(f), "{f} missing:\n{listing}");
    }
    let conf = run_ok(
        Command::new("mtype")
            .arg("-i")
            .arg(&boot)
            .arg("::/extlinux/extlinux.conf"),
    );
    let id = c.manifest["disk"]["ids"]["mbr_disk_id"].as_u64().unwrap();
    assert!(
        conf.contains(&format!("root=PARTUUID={id:08x}-02")),
        "{conf}"
    );
    assert!(
        conf.contains("kernel /Image") && conf.contains("initrd /initrd.img"),
        "{conf}"
    );
    let scr = dir.path().join("boot.scr");
    run_ok(
        Command::new("mcopy")
            .arg("-i")
            .arg(&boot)
            .arg("::/boot.scr")
            .arg(&scr),
    );
    let info = run_ok(Command::new("dumpimage").arg("-l").arg(&scr));
    assert!(info.contains("AArch64 Linux Script"), "{info}");
    let image = dir.path().join("Image");
    run_ok(
        Command::new("mcopy")
            .arg("-i")
            .arg(&boot)
            .arg("::/Image")
            .arg(&image),
    );
    let k = std::fs::read(&image).unwrap();
    assert_eq!(&k[0x38..0x3c], b"ARM\x64", "not an arm64 Image");
    let root = c5_partition(c, 2, dir.path());
    run_ok(tool("e2fsck").arg("-fn").arg(&root));
}

/// The C5 image boots on QEMU's arm64 `virt` machine through u-boot's distro boot of its own
/// extlinux.conf (TCG: slow; one boot serves both checks), and its cross-compiled (aarch64,
/// musl) first-boot agent configures a one-server Consul from a cluster file and reports
/// `picoimg: ready` (`picoimg run --cluster --expect-ready`, on a private VDE switch).
/// A cluster of two boards, rehearsed as a user would (`picoimg run --cluster FILE c5.img
/// h4.img`, each node naming its `board`): pc0 is a C5 (arm64, u-boot and extlinux on QEMU's
/// `virt`) running a one-server Consul cluster, pc1 an H4 (amd64, OVMF) with no roles, booting
/// `h4-kvm` (the kvm component: QEMU and libvirt from Debian); both VMs on one VDE switch.
/// Checked from inside pc1 over SSH: it is x86_64, reaches pc0's address, libvirtd is active
/// and `virsh` answers; pc0 over SSH is aarch64.
#[test]
fn c5_and_h4_boot_their_own_images_on_one_switch_and_the_c5_forms_consul() {
    let c = c5();
    let h4_kvm = h4_kvm();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("image-tests/mixed-cluster");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("id_ed25519");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "picoimg-test", "-f"])
            .arg(&key),
    );
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let init = run_ok(picoimg().args([
        "cluster",
        "init",
        "--name",
        "mixed",
        "--nodes",
        "2",
        "--subnet",
        "10.78.0.0/24",
    ]));
    let text = init
        .replace("policy = \"sync\"", "policy = \"skip\"")
        .replace("dns = [\"10.78.0.1\"]", "dns = []")
        .replace(
            "# [[user]]\n# name = \"pico\"\n# ssh_keys = [\"ssh-ed25519 AAAA... you@laptop\"]",
            &format!(
                "[[user]]\nname = \"pico\"\nssh_keys = [\"{}\"]",
                pubkey.trim()
            ),
        )
        .replacen("# board = \"h4\"", "board = \"c5\"", 1)
        .replacen(
            "roles = [\"consul-client\"]\n# board = \"h4\"",
            "roles = []\nboard = \"h4\"",
            1,
        );
    assert!(
        text.contains("board = \"c5\"") && text.contains("roles = []\nboard = \"h4\""),
        "{text}"
    );
    let file = dir.join("mixed.toml");
    std::fs::write(&file, text).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut r = picoimg::rehearsal::Rehearsal::start(&picoimg::rehearsal::ClusterOptions {
        // The order given does not matter: each node boots its board's image.
        images: vec![h4_kvm.clone(), c.raw.clone()],
        board: None,
        data_dir: None,
        cluster: file.clone(),
        nodes: None,
        dir: Some(dir.join("run")),
        timeout: Duration::from_secs(1500),
        expect_ready: false,
        ssh_port_base: Some(port),
        accel: picoimg::qemu::Accel::Tcg,
        disk_size: None,
        data_disk_size: picoimg::rehearsal::DATA_DISK_SIZE,
        cpus: None,
    })
    .unwrap();
    let started = Instant::now();
    let decided = r.wait_all(Duration::from_secs(1500));
    let pc0 = std::fs::read_to_string(dir.join("run/pc0.log")).unwrap_or_default();
    let pc1 = std::fs::read_to_string(dir.join("run/pc1.log")).unwrap_or_default();
    assert!(
        decided && r.all_ready(),
        "{}\n{}\n{}",
        r.summary(),
        tail(&pc0),
        tail(&pc1)
    );
    common::measured(format!(
        "mixed c5 + h4 cluster ready {:.0}s after the VMs started",
        started.elapsed().as_secs_f64()
    ));
    assert!(
        pc0.contains("Found /extlinux/extlinux.conf"),
        "u-boot did not boot the c5 image's extlinux.conf: {}",
        tail(&pc0)
    );
    assert!(!pc0.contains("ordering cycle"), "{}", tail(&pc0));
    assert!(
        pc0.contains("picoimg: step consul ok: Consul 1.8.7"),
        "{}",
        tail(&pc0)
    );
    assert!(
        pc0.contains(
            "picoimg: step health ok: consul server: member and voter, leader elected, 1 raft voter(s)"
        ),
        "{}",
        tail(&pc0)
    );
    assert!(
        pc1.contains("BdsDxe") && pc1.contains("picoimg: ready: node pc1 of cluster mixed"),
        "{}",
        tail(&pc1)
    );
    let ssh = |p: u16, cmd: &str| {
        let mut last = String::new();
        for _ in 0..10 {
            let o = Command::new("ssh")
                .arg("-i")
                .arg(&key)
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
                .args(["-p", &p.to_string(), "pico@127.0.0.1", cmd])
                .output()
                .unwrap();
            if o.status.success() {
                return String::from_utf8_lossy(&o.stdout).into_owned();
            }
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            std::thread::sleep(Duration::from_secs(5));
        }
        panic!("`{cmd}` on port {p}: {last}");
    };
    assert_eq!(ssh(port, "uname -m").trim(), "aarch64");
    assert_eq!(ssh(port + 1, "uname -m").trim(), "x86_64");
    let ping = ssh(port + 1, "ping -c 1 -W 10 10.78.0.10");
    assert!(ping.contains("1 received"), "{ping}");
    // The kvm component (H4 only): libvirtd runs and virsh answers. What the node reports about
    // /dev/kvm under TCG is printed, not asserted (no guest is started in it).
    let virsh = ssh(
        port + 1,
        "systemctl is-active libvirtd.service && sudo virsh -c qemu:///system version \
         && sudo virsh -c qemu:///system net-list --all \
         && (test -e /dev/kvm && echo /dev/kvm present || echo no /dev/kvm)",
    );
    assert!(
        virsh.starts_with("active\n") && virsh.contains("Running hypervisor: QEMU"),
        "{virsh}"
    );
    assert!(
        virsh.contains(" default "),
        "libvirt's default network: {virsh}"
    );
    common::measured(format!(
        "kvm on pc1 (h4-kvm): {}",
        virsh.replace('\n', "; ")
    ));
    // The manifest records the aarch64 agent that did it.
    let agent = c.manifest["firstboot"]["path"].as_str().unwrap();
    assert!(agent.contains("aarch64-unknown-linux-musl"), "{agent}");
    drop(r);
}

// ---------------------------------------------------------------------------------------------
// Raspberry Pi 5 with Raspberry Pi OS, built with the Debian source set (Debian's arm64 kernel
// and raspi-firmware): the Raspberry Pi archive is not reachable here. QEMU has no Pi 5 model,
// so what the Pi firmware reads (config.txt, cmdline.txt, file names) is checked statically and
// the image is booted on `virt` through the extlinux.conf it also carries.

struct Pi {
    raw: PathBuf,
    manifest: serde_json::Value,
}

/// Builds both Pi 5 boards' `debian` source sets in one `picoimg build --board A,B` run (issue
/// 12 point 5: several boards in one run, sharing the caches; the two share one base root).
fn build_debian_sets() -> (Pi, Pi) {
    let boards = ["rpi5-raspbian", "rpi5-ubuntu"];
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("image-tests/rpi5");
    let _ = std::fs::remove_dir_all(&out);
    let started = Instant::now();
    let o = picoimg()
        .args(["build", "--board", &boards.join(","), "--stack", "base"])
        .args(["--sources", "debian", "--no-xz", "--out"])
        .arg(&out)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "picoimg build {boards:?} failed: {}",
        o.status
    );
    common::measured(format!(
        "{} built in {:.0}s",
        boards.join(" and "),
        started.elapsed().as_secs_f64()
    ));
    // stdout names each board's outputs, in order.
    let listed = String::from_utf8_lossy(&o.stdout).into_owned();
    let pi = |board: &str| {
        assert!(listed.contains(&format!("{board}-base.img\n")), "{listed}");
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join(format!("{board}-base.manifest.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(
            manifest["compression"],
            serde_json::json!({"format": "none"})
        );
        Pi {
            raw: out.join(format!("{board}-base.img")),
            manifest,
        }
    };
    // Per board: the raw image, its block map and the manifest (no .img.xz).
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    assert_eq!(sums.lines().count(), 6, "{sums}");
    assert!(!sums.contains(".img.xz"), "{sums}");
    (pi(boards[0]), pi(boards[1]))
}

fn debian_sets() -> &'static (Pi, Pi) {
    static BUILT: OnceLock<(Pi, Pi)> = OnceLock::new();
    BUILT.get_or_init(build_debian_sets)
}

/// Checks what every Pi 5 image's boot partition has (clean FAT with `label`, config.txt,
/// cmdline.txt, the bcm2712 device tree, extlinux.conf and the kernel and initrd under
/// `names`); returns the extracted partition and its listing.
fn pi_boot_partition(pi: &Pi, label: &str, names: &[&str], dir: &Path) -> (PathBuf, String) {
    let boot = partition_of(&pi.raw, &pi.manifest, 1, dir);
    let fsck = run_ok(tool("fsck.vfat").arg("-n").arg(&boot));
    assert!(!fsck.contains("Fixing"), "{fsck}");
    let got = run_ok(
        tool("blkid")
            .args(["-o", "value", "-s", "LABEL"])
            .arg(&boot),
    );
    assert_eq!(got.trim(), label);
    let listing = run_ok(
        Command::new("mdir")
            .arg("-i")
            .arg(&boot)
            .args(["-b", "-/", "::"]),
    );
    let common = [
        "config.txt",
        "cmdline.txt",
        "bcm2712-rpi-5-b.dtb",
        "extlinux/extlinux.conf",
    ];
    for f in common.iter().chain(names) {
        assert!(
            listing.contains(&format!("::/{f}")),
            "{f} missing:\n{listing}"
        );
    }
    (boot, listing)
}

fn rpi5() -> &'static Pi {
    &debian_sets().0
}

fn rpi5_ubuntu() -> &'static Pi {
    &debian_sets().1
}

/// Boots an arm64 image on QEMU `virt` through u-boot's extlinux to the ready marker.
fn boots_through_extlinux(raw: &Path) {
    let o = picoimg()
        .arg("run")
        .arg(raw)
        .args(["--expect-ready", "--timeout", "1500", "--net", "restricted"])
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{} boot failed: {}\n{}",
        raw.display(),
        String::from_utf8_lossy(&o.stderr),
        tail(&console)
    );
    assert!(console.contains("picoimg-boot: ready"));
    assert!(
        console.contains("Found /extlinux/extlinux.conf"),
        "u-boot did not boot the image's extlinux.conf"
    );
    assert!(
        !console.contains("ordering cycle"),
        "systemd found an ordering cycle"
    );
    eprintln!("{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn rpi5_has_pi_gen_layout_and_what_the_firmware_reads() {
    let pi = rpi5();
    let v: serde_json::Value =
        serde_json::from_str(&run_ok(tool("sfdisk").arg("--json").arg(&pi.raw))).unwrap();
    let t = &v["partitiontable"];
    assert_eq!(t["label"], "dos");
    let id = pi.manifest["disk"]["ids"]["mbr_disk_id"].as_u64().unwrap();
    assert_eq!(t["id"], format!("0x{id:08x}"));
    let parts = t["partitions"].as_array().unwrap();
    assert_eq!(parts[0]["start"], 8 * 2048, "bootfs at 8 MiB");
    assert_eq!(parts[0]["size"], 512 * 2048, "bootfs is 512 MiB");
    assert_eq!(parts[0]["type"], "c", "FAT32 LBA");
    assert_eq!(parts[1]["type"], "83");
    assert_eq!(pi.manifest["sources"], "debian");

    let dir = tempfile::tempdir().unwrap();
    let (boot, listing) = pi_boot_partition(
        pi,
        "bootfs",
        &["kernel_2712.img", "initramfs_2712"],
        dir.path(),
    );
    assert!(
        !listing.contains("bootcode.bin") && !listing.contains("start4.elf"),
        "Pi 5 firmware is in EEPROM"
    );
    // Device tree overlays as the firmware package's kernel hook lays them out.
    assert!(listing.contains("::/overlays/README"), "{listing}");
    assert!(listing.contains(".dtbo"), "{listing}");
    let mtype = |f: &str| run_ok(Command::new("mtype").arg("-i").arg(&boot).arg(f));
    let config = mtype("::/config.txt");
    assert!(config.contains("auto_initramfs=1"), "{config}");
    assert!(
        !config.contains("arm_64bit"),
        "arm_64bit is gone on the Pi 5: {config}"
    );
    let cmdline = mtype("::/cmdline.txt");
    assert_eq!(
        cmdline.lines().count(),
        1,
        "cmdline.txt is one line: {cmdline:?}"
    );
    for want in [
        format!("root=PARTUUID={id:08x}-02"),
        "rootfstype=ext4".into(),
        "rootwait".into(),
        "console=serial0,115200".into(),
        "console=tty1".into(),
    ] {
        assert!(cmdline.contains(&want), "{want} missing from {cmdline}");
    }
    let root = partition_of(&pi.raw, &pi.manifest, 2, dir.path());
    run_ok(tool("e2fsck").arg("-fn").arg(&root));
    // The hook's copy went onto the boot partition; the mount point in the root is empty.
    let under = run_ok(
        tool("debugfs")
            .arg("-R")
            .arg("ls /boot/firmware")
            .arg(&root),
    );
    assert!(
        !under.contains("config.txt") && !under.contains("vmlinuz"),
        "{under}"
    );
    let fstab = run_ok(tool("debugfs").arg("-R").arg("cat /etc/fstab").arg(&root));
    assert!(
        fstab.contains(&format!("PARTUUID={id:08x}-01\t/boot/firmware\tvfat")),
        "{fstab}"
    );
}

#[test]
fn rpi5_boots_in_qemu_to_ready() {
    boots_through_extlinux(&rpi5().raw);
}

/// Ubuntu's names: `system-boot` and `writable`, `kernel=vmlinuz` with `initramfs initrd.img
/// followkernel`, and the root found by label.
#[test]
fn rpi5_ubuntu_has_ubuntu_names_and_root_by_label() {
    let pi = rpi5_ubuntu();
    let v: serde_json::Value =
        serde_json::from_str(&run_ok(tool("sfdisk").arg("--json").arg(&pi.raw))).unwrap();
    let parts = v["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(v["partitiontable"]["label"], "dos");
    assert_eq!(parts[0]["type"], "c");
    let dir = tempfile::tempdir().unwrap();
    let (boot, _) = pi_boot_partition(pi, "system-boot", &["vmlinuz", "initrd.img"], dir.path());
    let mtype = |f: &str| run_ok(Command::new("mtype").arg("-i").arg(&boot).arg(f));
    let config = mtype("::/config.txt");
    assert!(config.contains("kernel=vmlinuz"), "{config}");
    assert!(
        config.contains("initramfs initrd.img followkernel"),
        "{config}"
    );
    assert!(mtype("::/cmdline.txt").contains("root=LABEL=writable"));
    let root = partition_of(&pi.raw, &pi.manifest, 2, dir.path());
    run_ok(tool("e2fsck").arg("-fn").arg(&root));
    let sb = run_ok(tool("dumpe2fs").arg("-h").arg(&root));
    assert!(sb.contains("Filesystem volume name:   writable"), "{sb}");
}

#[test]
fn rpi5_ubuntu_boots_in_qemu_to_ready() {
    boots_through_extlinux(&rpi5_ubuntu().raw);
}

/// The user ci/test.sh creates for this test (with a subordinate id range).
const TEST_USER: &str = "picoimg-ci";

/// (mode, uid, gid) of every entry `debugfs ls -l DIR` lists in a root filesystem image.
fn owners(root: &Path, dir: &str) -> std::collections::BTreeMap<String, (String, u32, u32)> {
    let out = run_ok(
        tool("debugfs")
            .arg("-R")
            .arg(format!("ls -l {dir}"))
            .arg(root),
    );
    out.lines()
        .filter_map(|l| {
            // inode  mode  (ftype)  uid  gid  size  date time name
            let f: Vec<&str> = l.split_whitespace().collect();
            let mode = f.get(1)?.to_string();
            let (uid, gid) = (f.get(3)?.parse().ok()?, f.get(4)?.parse().ok()?);
            Some((f.last()?.to_string(), (mode, uid, gid)))
        })
        .filter(|(n, _)| n != "." && n != "..")
        .collect()
}

/// The README promises builds without root: a normal user's build (mmdebstrap's unshare mode)
/// has the ownership and modes of a root build: setuid sudo, /etc/shadow root:shadow 0640,
/// and every entry of /etc, /usr/bin and /usr/lib/picoimg the same, read by debugfs from
/// both images.
#[test]
fn a_normal_users_build_keeps_ownership_and_modes() {
    let passwd = run_ok(Command::new("getent").args(["passwd", TEST_USER]));
    let home = PathBuf::from(passwd.trim().split(':').nth(5).unwrap());
    let uid: u32 = passwd.split(':').nth(2).unwrap().parse().unwrap();
    let root_build = h4();
    // Everything the user needs, in a directory it owns: the data (boards/, overlays/), the
    // output. Its cache lives in its home, so later runs reuse the root filesystem.
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("user-build");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    run_ok(
        Command::new("cp")
            .arg("-r")
            .arg(repo.join("boards"))
            .arg(repo.join("overlays"))
            .arg(&work),
    );
    let agent = root_build.manifest["firstboot"]["path"]
        .as_str()
        .map(PathBuf::from);
    let agent_copy = work.join("picoimg-firstboot");
    match agent.filter(|p| p.exists()) {
        Some(p) => std::fs::copy(p, &agent_copy).map(|_| ()).unwrap(),
        None => {
            let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join("../x86_64-unknown-linux-musl/release/picoimg-firstboot");
            std::fs::copy(p, &agent_copy).unwrap();
        }
    }
    run_ok(Command::new("chown").arg("-R").arg(TEST_USER).arg(&work));
    let started = Instant::now();
    let o = Command::new("runuser")
        .args(["-u", TEST_USER, "--"])
        .arg("env")
        .arg(format!("HOME={}", home.display()))
        .arg(format!(
            "PICOIMG_CACHE_DIR={}",
            home.join(".cache/picoimg").display()
        ))
        .arg(env!("CARGO_BIN_EXE_picoimg"))
        .arg("--data-dir")
        .arg(&work)
        .args([
            "build",
            "--board",
            "h4",
            "--stack",
            "base",
            // The raw image is what the checks read: no .img.xz (the h4 tests cover it).
            "--no-xz",
            "--firstboot",
        ])
        .arg(&agent_copy)
        .arg("--out")
        .arg(work.join("out"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "build as {TEST_USER} failed: {}",
        o.status
    );
    common::measured(format!(
        "h4-base built as {TEST_USER} in {:.0}s",
        started.elapsed().as_secs_f64()
    ));
    let raw = work.join("out/h4-base.img");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join("out/h4-base.manifest.json")).unwrap())
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let user_root = partition_of(&raw, &manifest, 2, tmp.path());
    let root_root = extract_partition(root_build, 2, tmp.path());
    let stat = |root: &Path, path: &str| {
        run_ok(
            tool("debugfs")
                .arg("-R")
                .arg(format!("stat {path}"))
                .arg(root),
        )
    };
    for root in [&user_root, &root_root] {
        let sudo = stat(root, "/usr/bin/sudo");
        assert!(
            sudo.contains("Mode:  04755") && sudo.contains("User:     0   Group:     0"),
            "{}: {sudo}",
            root.display()
        );
        let shadow = stat(root, "/etc/shadow");
        assert!(
            shadow.contains("Mode:  0640") && shadow.contains("User:     0   Group:    42"),
            "{}: {shadow}",
            root.display()
        );
    }
    for dir in ["/etc", "/usr/bin", "/usr/lib/picoimg", "/etc/ssh"] {
        let (user, root) = (owners(&user_root, dir), owners(&root_root, dir));
        assert!(!user.is_empty(), "{dir}: empty listing");
        assert_eq!(user, root, "{dir}: ownership or modes differ");
        assert!(
            user.values()
                .all(|(_, u, g)| *u != uid && *g != uid && *u < 65_534),
            "{dir}: entries owned by the building user: {user:?}"
        );
    }
    run_ok(tool("e2fsck").args(["-fn"]).arg(&user_root));

    // A stack's layer built by the user over its cached base: nothing in it is the user's
    // (GNU tar reads the cached layer that goes into the image).
    let o = Command::new("runuser")
        .args(["-u", TEST_USER, "--"])
        .arg("env")
        .arg(format!("HOME={}", home.display()))
        .arg(format!(
            "PICOIMG_CACHE_DIR={}",
            home.join(".cache/picoimg").display()
        ))
        .arg(env!("CARGO_BIN_EXE_picoimg"))
        .arg("--data-dir")
        .arg(&work)
        .args([
            "build",
            "--board",
            "h4",
            "--stack",
            "consul",
            "--sources",
            "debian",
            "--no-xz",
            "--firstboot",
        ])
        .arg(&agent_copy)
        .arg("--out")
        .arg(work.join("out"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "consul build as {TEST_USER} failed: {}",
        o.status
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join("out/h4-consul.manifest.json")).unwrap())
            .unwrap();
    let layer = home.join(format!(
        ".cache/picoimg/rootfs/{}.tar",
        manifest["rootfs"]["key"].as_str().unwrap()
    ));
    assert!(
        manifest["rootfs"]["base"]["key"].is_string(),
        "{}",
        manifest["rootfs"]
    );
    let listing = run_ok(
        Command::new("tar")
            .arg("--numeric-owner")
            .arg("-tvf")
            .arg(&layer),
    );
    let mine: Vec<&str> = listing
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|o| o.split('/').any(|id| id.parse::<u32>().ok() == Some(uid)))
        })
        .collect();
    assert!(mine.is_empty(), "entries owned by {TEST_USER}: {mine:?}");
    assert!(
        listing.contains("./usr/bin/consul"),
        "consul not in the layer"
    );
}

/// The README's quick start builds picoimg alone: with no agent beside it, `picoimg build`
/// builds the agent from its source tree into the cache (a persistent one here, so only the
/// first run on a machine compiles), and the result is a static x86-64 program that runs.
#[test]
fn picoimg_alone_builds_the_agent_on_demand() {
    let solo = tempfile::tempdir().unwrap();
    let exe = solo.path().join("picoimg");
    std::fs::copy(env!("CARGO_BIN_EXE_picoimg"), &exe).unwrap();
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("agent-on-demand");
    let build = || {
        Command::new(&exe)
            .env_remove("PICOIMG_FIRSTBOOT")
            .args([
                "build",
                "--board",
                "h4",
                "--mirror",
                "http://127.0.0.1:9/debian",
            ])
            .arg("--cache")
            .arg(&cache)
            .arg("--out")
            .arg(solo.path().join("out"))
            .output()
            .unwrap()
    };
    let o = build();
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    // It stops at the unreachable mirror, after the agent step.
    assert!(!o.status.success());
    assert!(
        e.contains("first-boot agent for amd64") && e.contains("cannot be reached"),
        "{e}"
    );
    let agent = cache.join("agent/x86_64-unknown-linux-musl/release/picoimg-firstboot");
    let file = run_ok(Command::new("file").arg("-L").arg(&agent));
    assert!(file.contains("x86-64") && file.contains("static"), "{file}");
    let version = run_ok(Command::new(&agent).arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    // Built once: the second build finds it current (cargo leaves the file alone).
    let mtime = || std::fs::metadata(&agent).unwrap().modified().unwrap();
    let before = mtime();
    let o = build();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("first-boot agent for amd64"),
        "second run"
    );
    assert_eq!(mtime(), before, "the second build rebuilt the agent");
}

/// Packages (name, version, architecture) and paths of a root filesystem tarball.
fn root_contents(
    tar: &Path,
) -> (
    Vec<(String, String, String)>,
    std::collections::BTreeSet<String>,
) {
    let status = picoimg::tarfs::read_paths(tar, &["var/lib/dpkg/status"]).unwrap();
    let Some(picoimg::tarfs::Found::File(status)) = status.get("var/lib/dpkg/status") else {
        panic!("no dpkg status in {}", tar.display());
    };
    let packages = picoimg::tarfs::parse_dpkg_status(&String::from_utf8_lossy(status))
        .into_iter()
        .map(|p| (p.name, p.version, p.architecture))
        .collect();
    (packages, picoimg::tarfs::list(tar).unwrap())
}

/// A layer (the board's firmware and the stack's packages) over the cached base root has the
/// same packages and the same files as the root made by one mmdebstrap run with everything
/// (stack `docker`: packages from trixie only), and no package install regenerates the
/// initramfs on its own. A layer that adds a source (consul's
/// bullseye substitute) keeps the base's keyring file, which a package owns.
#[test]
fn a_stack_layer_over_the_base_equals_a_root_made_in_one_run() {
    h4(); // the base root is cached by now
    let cache = picoimg::cache::Cache::open(None).unwrap();
    let plan =
        picoimg::build::plan(&picoimg::build::BuildOptions::new("h4", "base,docker")).unwrap();
    assert!(plan.layer.is_some());
    let (layered, info) = picoimg::rootfs::ensure(&plan, &cache, false).unwrap();
    let (flat, flat_info) =
        picoimg::rootfs::ensure_spec(&plan.flat_rootfs(), &cache, false).unwrap();
    // Once in the base, once at the end of the layer (intel-microcode's hook asks; docker's
    // packages do not), once in one run.
    assert_eq!(info.initramfs_generations, 2, "{info:?}");
    assert_eq!(flat_info.initramfs_generations, 1, "{flat_info:?}");
    let (lp, lf) = root_contents(&layered);
    let (fp, ff) = root_contents(&flat);
    let only = |a: &std::collections::BTreeSet<String>, b: &std::collections::BTreeSet<String>| {
        a.difference(b).take(40).cloned().collect::<Vec<_>>()
    };
    assert!(
        lp == fp,
        "packages differ: only layered {:?}, only in one run {:?}",
        lp.iter().filter(|p| !fp.contains(p)).collect::<Vec<_>>(),
        fp.iter().filter(|p| !lp.contains(p)).collect::<Vec<_>>()
    );
    assert!(
        lf == ff,
        "files differ: only layered {:?}, only in one run {:?}",
        only(&lf, &ff),
        only(&ff, &lf)
    );
    assert!(lp.iter().any(|p| p.0 == "docker.io"));

    let mut opts = picoimg::build::BuildOptions::new("h4", "consul,docker");
    opts.sources = Some("debian".into());
    let plan = picoimg::build::plan(&opts).unwrap();
    let (layered, _) = picoimg::rootfs::ensure(&plan, &cache, false).unwrap();
    let base = cache.rootfs(&plan.rootfs_key());
    let key = "usr/share/keyrings/debian-archive-keyring.gpg";
    let read = |t: &Path| match picoimg::tarfs::read_paths(t, &[key]).unwrap().remove(key) {
        Some(picoimg::tarfs::Found::File(b)) => b,
        Some(picoimg::tarfs::Found::Symlink(to)) => format!("-> {to}").into_bytes(),
        None => panic!("no {key} in {}", t.display()),
    };
    assert!(
        read(&layered) == read(&base),
        "the layer replaced the packaged {key}"
    );
}

/// Building again with the same inputs and options reuses the finished outputs (hard links of
/// h4-base's in a directory of its own, so nothing shared is touched) and says so.
#[test]
fn a_rebuild_with_the_same_inputs_reuses_the_outputs() {
    let b = h4();
    let out = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&b.out).unwrap().flatten() {
        let name = f.file_name();
        if name.to_string_lossy().starts_with("h4-base.") {
            std::fs::hard_link(f.path(), out.path().join(&name)).unwrap();
        }
    }
    std::fs::copy(b.out.join("SHA256SUMS"), out.path().join("SHA256SUMS")).unwrap();
    let before = std::fs::metadata(out.path().join("h4-base.img.xz"))
        .unwrap()
        .modified()
        .unwrap();
    let started = Instant::now();
    let o = picoimg().args(H4_BASE).arg(out.path()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("up to date:") && err.contains("--refresh builds it again"),
        "{err}"
    );
    assert!(!err.contains("compressing"), "{err}");
    common::measured(format!(
        "no-op rebuild of h4-base: {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    let after = std::fs::metadata(out.path().join("h4-base.img.xz"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
    assert!(String::from_utf8_lossy(&o.stdout).contains("h4-base.img.xz"));
}

/// Where two raw images differ, by partition and, in an ext4 partition, by file (debugfs
/// `icheck`/`ncheck`): the report a failed reproducibility check prints.
fn explain_difference(a: &Path, b: &Path, manifest: &serde_json::Value) -> String {
    let o = Command::new("cmp")
        .arg("-l")
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    let offsets: Vec<u64> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .map(|o| o - 1)
        .collect();
    let mut report = format!("{} bytes differ\n", offsets.len());
    let parts = manifest["disk"]["partitions"].as_array().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut blocks = std::collections::BTreeMap::<(usize, u64), usize>::new();
    for off in &offsets {
        let n = parts.iter().position(|p| {
            let s = p["start"].as_u64().unwrap();
            (s..s + p["size"].as_u64().unwrap()).contains(off)
        });
        match n {
            Some(n) => {
                let start = parts[n]["start"].as_u64().unwrap();
                *blocks.entry((n + 1, (off - start) / 4096)).or_default() += 1;
            }
            None => report.push_str(&format!("byte {off}: outside the partitions\n")),
        }
    }
    let mut extracted = std::collections::BTreeMap::new();
    for ((n, block), count) in blocks.iter().take(40) {
        let name = parts[n - 1]["name"].as_str().unwrap_or("?");
        let part = extracted
            .entry(*n)
            .or_insert_with(|| partition_of(a, manifest, *n, dir.path()))
            .clone();
        let icheck = Command::new("debugfs")
            .args(["-R", &format!("icheck {block}")])
            .arg(&part)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let inode = icheck
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("")
            .to_owned();
        let file = if inode.parse::<u64>().is_ok() {
            let nc = Command::new("debugfs")
                .args(["-R", &format!("ncheck {inode}")])
                .arg(&part)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            nc.lines().nth(1).unwrap_or("").to_owned()
        } else {
            "(metadata, or not ext4)".to_owned()
        };
        report.push_str(&format!(
            "partition {n} ({name}) block {block}: {count} bytes; {file}\n"
        ));
    }
    report
}

/// Issue 12 point 4: a second build of h4-base from the same root filesystem cache and inputs
/// (into another output directory, so nothing is reused from the first's outputs) gives the
/// same raw image, `.img.xz` and block map, byte for byte (`cmp`); compressed blocks come from
/// the block cache, so the second compression is quick.
#[test]
fn a_second_build_from_the_same_cache_is_bit_identical() {
    let b = h4();
    let out = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let o = picoimg().args(H4_BASE).arg(out.path()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    common::measured(format!(
        "second build of h4-base: {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    let raw = out.path().join("h4-base.img");
    let same = |x: &Path, y: &Path| {
        Command::new("cmp")
            .arg(x)
            .arg(y)
            .status()
            .unwrap()
            .success()
    };
    assert!(
        same(&b.raw, &raw),
        "the raw images differ:\n{}",
        explain_difference(&b.raw, &raw, &b.manifest)
    );
    for name in [
        "h4-base.img.xz",
        "h4-base.img.bmap",
        "h4-base.manifest.json",
    ] {
        assert!(
            same(&b.out.join(name), &out.path().join(name)),
            "{name} differs"
        );
    }
    assert!(
        err.contains("taken from the block cache") && !err.contains(", 0 of them taken"),
        "the second build compressed everything again: {err}"
    );
}

/// Issue 12 point 4, the root filesystem too: with `SOURCE_DATE_EPOCH` set, two mmdebstrap
/// runs of h4-base's root (both forced by `--refresh`, minutes apart) from the same package
/// versions give the same raw image, byte for byte (`cmp`). Its name sorts it among the first
/// tests: its mmdebstrap runs keep one core busy for minutes, better beside the others than
/// alone at the end of the run.
#[test]
fn a_root_filesystem_made_twice_with_one_source_date_epoch_gives_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let build = |out: &Path, refresh: bool| {
        let mut c = picoimg();
        c.env("SOURCE_DATE_EPOCH", "1700000000")
            .args(["build", "--board", "h4", "--stack", "base"])
            .args(["--no-xz", "--out"])
            .arg(out);
        if refresh {
            c.arg("--refresh");
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        err
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    build(&a, false);
    let second = build(&b, true);
    assert!(
        second.contains("mmdebstrap"),
        "the second build did not make its root: {second}"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("h4-base.manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["source_date_epoch"], 1_700_000_000);
    let (ra, rb) = (a.join("h4-base.img"), b.join("h4-base.img"));
    assert!(
        Command::new("cmp")
            .arg(&ra)
            .arg(&rb)
            .status()
            .unwrap()
            .success(),
        "two roots made with one SOURCE_DATE_EPOCH differ:\n{}",
        explain_difference(&ra, &rb, &manifest)
    );
}

/// SIGTERM to picoimg alone (no terminal to signal the whole group) while mmdebstrap installs:
/// the build ends with status 130, and mmdebstrap's chroot is unmounted and removed (its
/// tempdir, named on stderr, is gone and nothing is mounted under it); no cache entry is left.
#[test]
fn an_interrupt_during_mmdebstrap_leaves_no_mounts() {
    use std::io::BufRead;
    let out = tempfile::tempdir().unwrap();
    let mut child = picoimg()
        // A root nobody caches (the build never finishes), so mmdebstrap runs.
        .env("SOURCE_DATE_EPOCH", "86400")
        .args([
            "build",
            "--board",
            "h4",
            "--stack",
            "base",
            "--xz-level",
            "0",
        ])
        .arg("--out")
        .arg(out.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut log = String::new();
    let mut tempdir = None;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "mmdebstrap never reached its package installation:\n{log}"
        );
        let Ok(line) = rx.recv_timeout(Duration::from_secs(600)) else {
            panic!("no output:\n{log}")
        };
        log.push_str(&line);
        log.push('\n');
        if let Some(rest) = line.split("using ").nth(1) {
            if let Some(d) = rest.strip_suffix(" as tempdir") {
                tempdir = Some(d.to_owned());
            }
        }
        if line.contains("installing essential packages")
            || line.contains("installing remaining packages")
        {
            break;
        }
    }
    let tempdir = tempdir.expect("mmdebstrap names its tempdir");
    std::thread::sleep(Duration::from_secs(2));
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = child.wait().unwrap();
    let _ = reader.join();
    log.extend(rx.try_iter().map(|l| l + "\n"));
    assert_eq!(status.code(), Some(130), "{}", tail(&log));
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(&format!("{tempdir}/")),
        "mounts left under {tempdir}:\n{mounts}"
    );
    assert!(
        !Path::new(&tempdir).exists(),
        "{tempdir} left behind\n{}",
        tail(&log)
    );
    let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "left in the output directory: {left:?}");
}
