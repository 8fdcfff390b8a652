//! Tier 2: the real binary, bad input. Each case checks the message names the file, field or
//! fix, and that nothing is left in the output directory.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test. Every build here stops before the first-boot agent goes into an
/// image, so a stand-in ELF (picoimg itself) takes its place: no musl build needed for this
/// tier (tests/image.rs covers the real agent, and building it on demand).
fn picoimg() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_picoimg"));
    c.env("PICOIMG_FIRSTBOOT", env!("CARGO_BIN_EXE_picoimg"));
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The output directory holds nothing (or does not exist).
fn assert_no_output(out: &Path) {
    if let Ok(entries) = std::fs::read_dir(out) {
        let names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
        assert!(
            names.is_empty(),
            "left behind in {}: {names:?}",
            out.display()
        );
    }
}

/// A copy of boards/ and overlays/ whose h4 board file is edited by `edit`.
fn data_with_board(edit: impl Fn(&str) -> String) -> tempfile::TempDir {
    let dir = common::data_copy();
    let p = dir.path().join("boards/h4.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, edit(&text)).unwrap();
    dir
}

/// Runs `picoimg build ARGS` with a fresh --out and --cache, checks that it fails and leaves
/// nothing in --out, and returns its stderr.
/// Runs `c`, asserts it succeeded, returns its stdout.
fn run_ok(c: &mut std::process::Command) -> String {
    let o = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(o.status.success(), "{c:?} failed: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn refused(args: &[&str], data: Option<&Path>) -> String {
    let out = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let mut c = picoimg();
    if let Some(d) = data {
        c.arg("--data-dir").arg(d);
    }
    let o = c
        .arg("build")
        .args(args)
        .arg("--cache")
        .arg(cache.path())
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!o.status.success(), "build {args:?} succeeded");
    assert_no_output(out.path());
    stderr(&o)
}

fn build(args: &[&str], data: Option<&Path>, out: &Path) -> Output {
    let mut c = picoimg();
    if let Some(d) = data {
        c.arg("--data-dir").arg(d);
    }
    c.arg("build").args(args).arg("--out").arg(out);
    c.output().unwrap()
}

#[test]
fn boards_lists_one_line_each() {
    let o = picoimg().arg("boards").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let h4: Vec<_> = text.lines().filter(|l| l.starts_with("h4 ")).collect();
    assert_eq!(h4.len(), 1, "{text}");
    assert!(
        h4[0].contains("amd64") && h4[0].contains("Odroid H4"),
        "{text}"
    );
}

#[test]
fn help_describes_build() {
    let o = picoimg().args(["build", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--board",
        "--stack",
        "--out",
        "--mirror",
        "--cache",
        "--keep-raw",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
}

#[test]
fn unknown_board_lists_valid_names() {
    let e = refused(&["--board", "h5", "--stack", "base"], None);
    assert!(
        e.contains("unknown board `h5`") && e.contains("valid boards: ") && e.contains("h4"),
        "{e}"
    );
}

/// Several boards in one build: every board is checked before anything is built, so a wrong
/// name in second place stops the run with nothing written; per-board files are refused.
#[test]
fn several_boards_are_all_checked_before_any_is_built() {
    let e = refused(&["--board", "h4,h5", "--stack", "base"], None);
    assert!(
        e.contains("board h5") && e.contains("unknown board `h5`") && !e.contains("building"),
        "{e}"
    );
    let e = refused(&["--board", "h4,h4"], None);
    assert!(e.contains("--board names h4 twice"), "{e}");
    let e = refused(&["--board", "h4,c5", "--firstboot", "/nonexistent"], None);
    assert!(
        e.contains("--uboot and --firstboot are for one board") && e.contains("h4, c5"),
        "{e}"
    );
}

#[test]
fn unknown_stack_lists_valid_names() {
    let e = refused(&["--board", "h4", "--stack", "openstack"], None);
    assert!(
        e.contains("unknown stack `openstack`") && e.contains("valid stacks: base"),
        "{e}"
    );
}

#[test]
fn board_with_unknown_key_names_file_key_and_hint() {
    let data = data_with_board(|t| t.replace("[qemu]", "[qemu]\nbios = \"seabios\""));
    let e = refused(&["--board", "h4"], Some(data.path()));
    assert!(e.contains("boards/h4.toml"), "{e}");
    assert!(e.contains("unknown field `bios`"), "{e}");
    assert!(e.contains("hint:"), "{e}");
}

#[test]
fn board_with_wrong_type_names_the_key() {
    let data = data_with_board(|t| t.replace("cpus = 2", "cpus = \"two\""));
    let e = refused(&["--board", "h4"], Some(data.path()));
    assert!(e.contains("boards/h4.toml") && e.contains("cpus"), "{e}");
}

#[test]
fn board_with_overlapping_partitions_is_refused() {
    let data =
        data_with_board(|t| t.replace("name = \"root\"", "name = \"root\"\nstart = \"64MiB\""));
    let e = refused(&["--board", "h4"], Some(data.path()));
    assert!(e.contains("`root`") && e.contains("overlaps `esp`"), "{e}");
}

#[test]
fn board_with_partition_larger_than_image_is_refused() {
    let data = data_with_board(|t| t.replace("size = \"256MiB\"", "size = \"4GiB\""));
    let e = refused(&["--board", "h4"], Some(data.path()));
    assert!(e.contains("`esp`") && e.contains("raise disk.size"), "{e}");
}

#[test]
fn missing_host_tool_names_the_package() {
    let bin = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = picoimg()
        .env("PATH", bin.path())
        .args(["build", "--board", "h4", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("`mmdebstrap` not found"), "{e}");
    assert!(e.contains("apt-get install mmdebstrap"), "{e}");
    assert_no_output(out.path());
}

#[test]
fn unwritable_out_is_refused_with_the_flag_to_fix_it() {
    let o = build(&["--board", "h4"], None, Path::new("/proc/version/out"));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("/proc/version/out") && e.contains("--out"),
        "{e}"
    );
}

/// mmdebstrap against a broken mirror (it answers, but with garbage instead of signed
/// release files): the error shows its argv and the tail of its output, and neither the output
/// directory nor the cache keeps partial files.
#[test]
fn mmdebstrap_failure_shows_argv_and_output_tail() {
    let url = common::serve(b"this is not a release file".to_vec(), 50);
    let mirror = url.trim_end_matches("/u-boot.bin.signed").to_owned() + "/debian";
    let out = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let o = picoimg()
        .args(["build", "--board", "h4", "--mirror", &mirror, "--cache"])
        .arg(cache.path())
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("building the root filesystem with mmdebstrap"),
        "{e}"
    );
    assert!(e.contains("`mmdebstrap --variant=apt"), "{e}");
    assert!(e.contains(&mirror), "{e}");
    assert!(e.contains("  | "), "no output tail in: {e}");
    assert_no_output(out.path());
    let leftovers: Vec<_> = std::fs::read_dir(cache.path().join("rootfs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tar"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A mirror that does not answer at all is named before mmdebstrap runs.
#[test]
fn unreachable_mirror_is_named_before_mmdebstrap() {
    let out = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let o = picoimg()
        .args([
            "build",
            "--board",
            "h4",
            "--mirror",
            "http://127.0.0.1:9/debian",
            "--cache",
        ])
        .arg(cache.path())
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("(http://127.0.0.1:9/debian) cannot be reached"),
        "{e}"
    );
    assert_no_output(out.path());
}

/// The arm64 boards' Debian source sets differ only in firmware (rpi5's raspi-firmware), which
/// is a layer with their extra packages: c5, rpi5-raspbian and rpi5-ubuntu share one base root, so a cold build of the
/// second board costs a layer, not another emulated base. The Raspberry Pi boards' own
/// sources (their vendors' kernels) have bases of their own.
#[test]
fn arm64_boards_share_one_base_root() {
    let plan = |args: &[&str]| -> serde_json::Value {
        let o = picoimg()
            .args(["plan", "--stack", "base"])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let c5 = plan(&["--board", "c5"]);
    let pi = plan(&["--board", "rpi5-raspbian", "--sources", "debian"]);
    let ubuntu = plan(&["--board", "rpi5-ubuntu", "--sources", "debian"]);
    assert_eq!(c5["rootfs_key"], pi["rootfs_key"]);
    assert_eq!(c5["rootfs_key"], ubuntu["rootfs_key"]);
    assert_eq!(
        c5["layer"]["packages"],
        serde_json::json!(["linux-sysctl-defaults"]),
        "{c5}"
    );
    assert_eq!(
        pi["layer"]["packages"],
        serde_json::json!(["linux-sysctl-defaults", "raspi-firmware"])
    );
    assert_eq!(pi["layer_key"], ubuntu["layer_key"]);
    assert!(pi["rootfs"]["packages"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("linux-image-arm64")));
    let vendor = plan(&["--board", "rpi5-raspbian"]);
    assert_ne!(vendor["rootfs_key"], pi["rootfs_key"]);
}

#[test]
fn plan_is_json_with_hashes() {
    let o = picoimg()
        .args(["plan", "--board", "h4", "--stack", "base"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["name"], "h4-base");
    assert_eq!(v["plan_hash"].as_str().map(str::len), Some(64));
    // The image's inputs hash needs the first-boot agent; without one it is null, never the
    // plan's hash under the image's name.
    if v["firstboot"].is_null() {
        assert!(v["inputs_hash"].is_null(), "{v}");
    } else {
        assert_eq!(v["inputs_hash"].as_str().map(str::len), Some(64));
        assert_ne!(v["inputs_hash"], v["plan_hash"]);
    }
    let pkgs = v["rootfs"]["packages"].as_array().unwrap();
    assert!(pkgs.iter().any(|p| p == "linux-image-amd64"));
    assert!(pkgs.iter().any(|p| p == "openssh-server"));
}

#[test]
fn doctor_prints_the_install_line_for_missing_tools() {
    let empty = tempfile::tempdir().unwrap();
    let o = picoimg()
        .env("PATH", empty.path())
        .arg("doctor")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("sudo apt-get install -y"))
        .unwrap_or_else(|| panic!("no install line in:\n{text}"));
    for pkg in ["mmdebstrap", "qemu-system-x86", "bmap-tools"] {
        assert!(line.contains(pkg), "{pkg} missing from `{line}`");
    }
}

#[test]
fn image_size_too_small_for_the_layout_is_refused() {
    let e = refused(&["--board", "h4", "--image-size", "200MiB"], None);
    assert!(
        e.contains("--image-size 200MiB does not fit board `h4`"),
        "{e}"
    );
}

#[test]
fn unknown_source_set_lists_the_board_sets() {
    let e = refused(&["--board", "h4", "--sources", "ubuntu"], None);
    assert!(
        e.contains("unknown source set `ubuntu` for board `h4`; it has: debian"),
        "{e}"
    );
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

#[test]
fn blob_with_wrong_checksum_aborts_before_anything_is_built() {
    let url = common::serve(b"not the real u-boot".to_vec(), 3);
    let data = common::data_copy();
    common::c5_blob_from(data.path(), &url, &sha256_hex(b"the real u-boot"));
    let out = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let o = picoimg()
        .arg("--data-dir")
        .arg(data.path())
        .args(["build", "--board", "c5", "--cache"])
        .arg(cache.path())
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("but the board file pins"), "{e}");
    assert!(e.contains(&url), "{e}");
    assert_no_output(out.path());
    let kept: Vec<_> = std::fs::read_dir(cache.path().join("blobs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        kept.is_empty(),
        "a bad download stayed in the cache: {kept:?}"
    );
}

#[test]
fn blob_that_would_overlap_partition_one_is_refused() {
    let big = tempfile::NamedTempFile::new().unwrap();
    let bytes = vec![0x5au8; 5 << 20];
    std::fs::write(big.path(), &bytes).unwrap();
    let path = big.path().to_string_lossy().into_owned();
    // A board pinned to this (too large) blob.
    let data = common::data_copy();
    common::c5_blob_from(
        data.path(),
        "http://127.0.0.1:9/u-boot",
        &sha256_hex(&bytes),
    );
    let e = refused(&["--board", "c5", "--uboot", &path], Some(data.path()));
    assert!(
        e.contains("would overlap partition `boot` starting at 4MiB"),
        "{e}"
    );
}

#[test]
fn unpinned_blob_asks_for_a_local_file() {
    let data = common::data_copy();
    let p = data.path().join("boards/c5.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    let pin = text
        .lines()
        .find(|l| l.starts_with("sha256 = "))
        .unwrap()
        .to_owned();
    std::fs::write(&p, text.replace(&pin, "sha256 = \"\"")).unwrap();
    let e = refused(&["--board", "c5"], Some(data.path()));
    assert!(
        e.contains("no pinned sha256") && e.contains("--uboot FILE"),
        "{e}"
    );
}

/// The C5's u-boot is pinned: a local copy that is not the pinned file is refused before
/// anything is built, and an unreachable download names the offline ways in.
#[test]
fn pinned_c5_blob_refuses_another_file_and_names_the_offline_path() {
    let other = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other.path(), b"some other u-boot").unwrap();
    let e = refused(
        &["--board", "c5", "--uboot", other.path().to_str().unwrap()],
        None,
    );
    assert!(
        e.contains("but the board file pins 8c2e66919a05921d79e130cc00a977a07cf8df6b34153e66c18c3241c0809e3c"),
        "{e}"
    );
    let data = common::data_copy();
    let p = data.path().join("boards/c5.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    let url_line = text.lines().find(|l| l.starts_with("url = ")).unwrap();
    std::fs::write(
        &p,
        text.replace(url_line, "url = \"http://127.0.0.1:9/u-boot.bin.signed\""),
    )
    .unwrap();
    let e = refused(&["--board", "c5"], Some(data.path()));
    assert!(
        e.contains("--uboot FILE")
            && e.contains("blobs/8c2e66919a05921d79e130cc00a977a07cf8df6b34153e66c18c3241c0809e3c"),
        "{e}"
    );
}

/// A board whose real source cannot be reached fails at once, naming the source and the
/// substitute set, before mmdebstrap runs.
#[test]
fn unreachable_real_source_names_it_and_the_substitute() {
    let data = data_with_board(|t| {
        t.replace(
            "default_sources = \"debian\"",
            "default_sources = \"vendor\"",
        )
        .replace(
            "[disk]",
            "[sources.vendor]\ndescription = \"vendor archive\"\n\
                 [[sources.vendor.apt]]\nname = \"vendor-archive\"\n\
                 uri = \"http://127.0.0.1:9/vendor\"\ncomponents = [\"main\"]\n\
                 keyring = \"/usr/share/keyrings/debian-archive-keyring.gpg\"\n\
                 [sources.vendor.packages]\nkernel = [\"linux-image-amd64\"]\n\n[disk]",
        )
    });
    let e = refused(&["--board", "h4"], Some(data.path()));
    assert!(
        e.contains("apt source `vendor-archive` (http://127.0.0.1:9/vendor) cannot be reached"),
        "{e}"
    );
    assert!(e.contains("--sources debian"), "{e}");
    assert!(
        !e.contains("mmdebstrap --variant"),
        "mmdebstrap should not have run: {e}"
    );
}

/// The Pi 5 firmware boots only a partition with config.txt: a Pi board without one is
/// refused before anything is built.
#[test]
fn pi_board_without_config_txt_is_refused() {
    let data = data_with_board(|t| t.to_owned());
    std::fs::remove_file(data.path().join("boards/rpi5-raspbian/config.txt")).unwrap();
    let e = refused(
        &["--board", "rpi5-raspbian", "--sources", "debian"],
        Some(data.path()),
    );
    assert!(
        e.contains("boots only a FAT partition that has config.txt")
            && e.contains("config.txt is missing"),
        "{e}"
    );
}

/// `cluster init` writes a private file that `cluster check` accepts, and never overwrites.
#[test]
fn cluster_init_then_check() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lab.toml");
    let o = picoimg()
        .args(["cluster", "init", "--name", "lab", "--nodes", "3", "--out"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the file holds the cluster secret");
    let o = picoimg()
        .args(["cluster", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("3 nodes, 3 consul-server, 0 users") && out.contains(": ok"),
        "{out}"
    );
    let again = picoimg()
        .args(["cluster", "init", "--name", "lab", "--out"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(stderr(&again).contains("is not overwritten"));
}

/// `cluster check` names every problem with its line and exits non-zero.
#[test]
fn cluster_check_lists_every_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = picoimg()
        .args(["cluster", "init", "--name", "lab", "--nodes", "4"])
        .output()
        .unwrap();
    let text = String::from_utf8(good.stdout)
        .unwrap()
        .replace("address = \"10.42.0.11\"", "address = \"192.168.7.11\"")
        .replace("roles = [\"consul-client\"]", "roles = [\"consul-server\"]");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, &text).unwrap();
    let o = picoimg()
        .args(["cluster", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .position(|l| l.contains("192.168.7.11"))
        .unwrap()
        + 1;
    assert!(
        out.contains(&format!(
            "bad.toml:{line}: node[1].address: 192.168.7.11 is outside the subnet"
        )),
        "{out}"
    );
    assert!(
        out.contains("4 consul-server nodes: use an odd number"),
        "{out}"
    );
    assert!(stderr(&o).contains("2 problem(s)"), "{}", stderr(&o));
}

/// An image of `size` bytes partitioned by sfdisk from `layout`, with a FAT32 filesystem of
/// `fs_kib` KiB at 1 MiB made by mkfs.fat (with `mkfs_args`).
fn fat_disk(
    dir: &Path,
    name: &str,
    size: u64,
    layout: &[u8],
    fs_kib: u64,
    mkfs_args: &[&str],
) -> PathBuf {
    let img = dir.join(name);
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let mut sfdisk = Command::new("/usr/sbin/sfdisk")
        .args(["--quiet"])
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    sfdisk.stdin.take().unwrap().write_all(layout).unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let st = Command::new("/usr/sbin/mkfs.fat")
        .args(["-F", "32", "--offset", "2048"])
        .args(mkfs_args)
        .arg(&img)
        .arg(fs_kib.to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    img
}

/// A 40 MiB image with an MBR and one FAT32 partition at 1 MiB, made by sfdisk and mkfs.fat.
fn fat_image(dir: &Path) -> PathBuf {
    fat_disk(
        dir,
        "card.img",
        40 << 20,
        b"label: dos\nstart=2048, type=c, bootable\n",
        ((40 << 20) - (1 << 20)) / 1024,
        &["-n", "BOOT"],
    )
}

fn cluster_file(dir: &Path) -> PathBuf {
    let o = picoimg()
        .args(["cluster", "init", "--name", "lab", "--nodes", "3"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let p = dir.join("lab.toml");
    std::fs::write(&p, &o.stdout).unwrap();
    p
}

/// A cluster of two boards: `build --cluster` plans one image per board the nodes name (nodes
/// without a board take --board), and refuses a node without one, an unknown board, or a
/// `run --cluster` missing a board's image, each naming the file, line and node.
#[test]
fn a_cluster_of_two_boards_builds_and_boots_one_image_per_board() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(cluster_file(dir.path())).unwrap();
    let mixed = dir.path().join("mixed.toml");
    let text = base
        .replacen("# board = \"h4\"", "board = \"c5\"", 2)
        .replacen("board = \"c5\"", "board = \"h4\"", 1);
    std::fs::write(&mixed, &text).unwrap();
    // pc0 h4, pc1 c5, pc2 none: with --board c5 the boards are h4 then c5.
    let o = picoimg()
        .args([
            "build",
            "--dry-run",
            "--json",
            "--stack",
            "consul",
            "--board",
            "c5",
            "--cluster",
        ])
        .arg(&mixed)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let plans: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let boards: Vec<&str> = plans
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["board"].as_str().unwrap())
        .collect();
    assert_eq!(boards, ["h4", "c5"]);
    // Without --board, pc2 names no board.
    let o = picoimg()
        .args(["build", "--dry-run", "--stack", "consul", "--cluster"])
        .arg(&mixed)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let line = text.lines().position(|l| l == "name = \"pc2\"").unwrap() + 1;
    assert!(
        stderr(&o).contains(&format!("mixed.toml: line {line}: node pc2 names no board")),
        "{}",
        stderr(&o)
    );
    // An unknown board.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, text.replacen("board = \"c5\"", "board = \"c9\"", 1)).unwrap();
    let o = picoimg()
        .args([
            "build",
            "--dry-run",
            "--stack",
            "consul",
            "--board",
            "h4",
            "--cluster",
        ])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("bad.toml: line") && e.contains("node pc1: board"),
        "{e}"
    );
    assert!(e.contains("c9") && e.contains("c5"), "{e}");
    // A rehearsal given only the h4 image: pc1 (c5) has none.
    let o = picoimg()
        .args(["run", "--board", "h4", "--cluster"])
        .arg(&mixed)
        .arg("h4-consul.img")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("node pc1 is a c5 board, but no image given is for c5 (given: h4)"),
        "{}",
        stderr(&o)
    );
    // Without --cluster, one image.
    let o = picoimg().args(["run", "a.img", "b.img"]).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("one image to boot"), "{}", stderr(&o));
}

/// Runs `picoimg personalise IMG --cluster FILE [--node NAME]`.
fn personalise(img: &Path, cluster: &Path, node: Option<&str>) -> Output {
    let mut c = picoimg();
    c.arg("personalise").arg(img).arg("--cluster").arg(cluster);
    if let Some(n) = node {
        c.args(["--node", n]);
    }
    c.output().unwrap()
}

/// `personalise` writes through the FAT library; mtools reads the files back, fsck.fat finds
/// the filesystem clean.
#[test]
fn personalise_puts_cluster_and_node_on_the_boot_partition() {
    let dir = tempfile::tempdir().unwrap();
    let img = fat_image(dir.path());
    let cluster = cluster_file(dir.path());
    let o = personalise(&img, &cluster, Some("pc1"));
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |name: &str| {
        let o = Command::new("mtype")
            .arg("-i")
            .arg(format!("{}@@1M", img.display()))
            .arg(format!("::picoimg/{name}"))
            .output()
            .unwrap();
        assert!(o.status.success(), "mtype {name}: {}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(
        read("cluster.toml"),
        std::fs::read_to_string(&cluster).unwrap()
    );
    assert!(read("node.toml").contains("name = \"pc1\""));
    let part = dir.path().join("part.img");
    let st = Command::new("dd")
        .arg(format!("if={}", img.display()))
        .arg(format!("of={}", part.display()))
        .args(["bs=1M", "skip=1", "status=none"])
        .status()
        .unwrap();
    assert!(st.success());
    let fsck = Command::new("/usr/sbin/fsck.fat")
        .arg("-n")
        .arg(&part)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn personalise_refuses_bad_input_and_leaves_the_image_alone() {
    let dir = tempfile::tempdir().unwrap();
    let img = fat_image(dir.path());
    let before = std::fs::read(&img).unwrap();
    let cluster = cluster_file(dir.path());
    // A node the file does not list.
    let o = personalise(&img, &cluster, Some("pc9"));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("node `pc9` is not in"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("pc0, pc1, pc2"), "{}", stderr(&o));
    // A file with a problem: named with its line, nothing written.
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(&cluster).unwrap();
    std::fs::write(
        &bad,
        text.replace("address = \"10.42.0.11\"", "address = \"10.99.0.11\""),
    )
    .unwrap();
    let o = personalise(&img, &bad, None);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("node[1].address: 10.99.0.11 is outside the subnet"),
        "{}",
        stderr(&o)
    );
    // A compressed image.
    let o = picoimg()
        .args(["personalise", "x.img.xz", "--cluster"])
        .arg(&cluster)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is compressed"), "{}", stderr(&o));
    // Something without a FAT partition.
    let plain = dir.path().join("plain.img");
    std::fs::write(&plain, vec![0u8; 1 << 20]).unwrap();
    let o = personalise(&plain, &cluster, None);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no partition table"), "{}", stderr(&o));
    assert!(std::fs::read(&img).unwrap() == before, "image changed");
}

/// HKDF-SHA256 (RFC 5869, one block) of the cluster file's secret for `label`, salted with its
/// id, computed by Python's hmac: `print_expr` (of `okm`) printed and returned, trimmed.
fn hkdf_by_python(cluster: &Path, label: &str, print_expr: &str) -> String {
    let text = std::fs::read_to_string(cluster).unwrap();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} = \"")))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap()
            .to_owned()
    };
    let script = format!(
        "import sys,hmac,hashlib,base64\n\
         ikm=base64.b64decode(sys.argv[1]); salt=sys.argv[2].encode(); info=sys.argv[3].encode()\n\
         prk=hmac.new(salt,ikm,hashlib.sha256).digest()\n\
         okm=hmac.new(prk,info+b'\\x01',hashlib.sha256).digest()\n\
         print({print_expr})"
    );
    let py = Command::new("python3")
        .args(["-c", &script, &field("secret"), &field("id"), label])
        .output()
        .unwrap();
    assert!(py.status.success(), "{}", stderr(&py));
    String::from_utf8(py.stdout).unwrap().trim().to_owned()
}

#[test]
fn cluster_token_is_the_derived_one_and_run_cluster_checks_node_count() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster_file(dir.path());
    let o = picoimg()
        .args(["cluster", "token"])
        .arg(&cluster)
        .output()
        .unwrap();
    assert!(o.status.success());
    let token = String::from_utf8(o.stdout).unwrap();
    assert!(uuid::Uuid::parse_str(token.trim()).is_ok(), "{token}");
    // A named secret, checked against HKDF-SHA256 (RFC 5869) computed by Python's hmac: salt
    // the cluster id, info the label Consul's stack declares.
    let o = picoimg()
        .args(["cluster", "token"])
        .arg(&cluster)
        .arg("consul-gossip-key")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let gossip = String::from_utf8(o.stdout).unwrap();
    let py = hkdf_by_python(
        &cluster,
        "picoimg/v1/consul/gossip-key",
        "base64.b64encode(okm).decode()",
    );
    assert_eq!(gossip.trim(), py);
    let o = picoimg()
        .args(["cluster", "token"])
        .arg(&cluster)
        .arg("no-such-secret")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no secret named \"no-such-secret\"")
            && stderr(&o).contains("consul-gossip-key, consul-management-token"),
        "{}",
        stderr(&o)
    );
    let o = picoimg()
        .args(["run", "--nodes", "5", "--cluster"])
        .arg(&cluster)
        .arg("missing.img")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--nodes 5:") && stderr(&o).contains("lists 3 node(s)"),
        "{}",
        stderr(&o)
    );
    let o = picoimg()
        .args(["run", "--nodes", "2", "x.img"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "--nodes without --cluster");
    assert!(stderr(&o).contains("--cluster"), "{}", stderr(&o));
}

// ---- Hardening: damaged, hostile and mistaken input (each case: refused, message, nothing
// changed) ----

/// `picoimg personalise` checks the image before it writes: a truncated image, a damaged GPT
/// and a partition entry that wraps around are refused, and the file neither changes nor
/// grows.
#[test]
fn personalise_refuses_damaged_images_without_touching_them() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster_file(dir.path());
    let good = fat_image(dir.path());
    let truncated = dir.path().join("truncated.img");
    std::fs::copy(&good, &truncated).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let wrapped = dir.path().join("wrapped.img");
    std::fs::copy(&good, &wrapped).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&wrapped)
            .unwrap();
        // Partition 1 starting at sector 0xffffffff with 0xffffffff sectors.
        f.write_all_at(&[0xff; 8], 446 + 8).unwrap();
    }
    let gpt = gpt_fat_image(dir.path());
    let bad_gpt = dir.path().join("badgpt.img");
    std::fs::copy(&gpt, &bad_gpt).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&bad_gpt)
            .unwrap();
        // A byte of the first entry's name: the entries' CRC no longer matches.
        f.write_all_at(b"X", 1024 + 60).unwrap();
    }
    let cases = [
        ("truncated to 2 MiB", &truncated, "truncated image"),
        ("partition entry that wraps", &wrapped, "runs past the end"),
        (
            "GPT entries damaged",
            &bad_gpt,
            "entries' CRC does not match",
        ),
    ];
    for (what, img, message) in cases {
        let (sum, len) = (
            common::sha256_of(img),
            std::fs::metadata(img).unwrap().len(),
        );
        let o = personalise(img, &cluster, Some("pc1"));
        assert!(!o.status.success(), "{what}: succeeded");
        assert!(stderr(&o).contains(message), "{what}: {}", stderr(&o));
        assert_eq!(common::sha256_of(img), sum, "{what}: image changed");
        assert_eq!(
            std::fs::metadata(img).unwrap().len(),
            len,
            "{what}: file grew"
        );
    }
    // The undamaged GPT image takes the files, and does not grow.
    let len = std::fs::metadata(&gpt).unwrap().len();
    let o = personalise(&gpt, &cluster, Some("pc1"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::metadata(&gpt).unwrap().len(), len);
}

/// An 80 MiB image with a GPT (sfdisk) and one 75 MiB FAT32 partition at 1 MiB (mkfs.fat).
fn gpt_fat_image(dir: &Path) -> PathBuf {
    fat_disk(
        dir,
        "gpt.img",
        80 << 20,
        b"label: gpt\nstart=2048, size=153600, type=uefi, name=esp\n",
        76800,
        &["-s", "1", "-n", "ESP"],
    )
}

/// Run again without --node, personalise removes the node.toml an earlier run left, and
/// says so.
#[test]
fn personalise_without_node_removes_a_stale_node_toml() {
    let dir = tempfile::tempdir().unwrap();
    let img = fat_image(dir.path());
    let cluster = cluster_file(dir.path());
    let o = personalise(&img, &cluster, Some("pc1"));
    assert!(o.status.success(), "{}", stderr(&o));
    let mtype = |name: &str| {
        Command::new("mtype")
            .arg("-i")
            .arg(format!("{}@@1M", img.display()))
            .arg(format!("::picoimg/{name}"))
            .output()
            .unwrap()
    };
    assert!(mtype("node.toml").status.success());
    let o = personalise(&img, &cluster, None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("removed picoimg/node.toml"),
        "{}",
        stderr(&o)
    );
    assert!(
        !mtype("node.toml").status.success(),
        "node.toml still there"
    );
    assert!(mtype("cluster.toml").status.success());
}

/// Input files are read only if regular and small: a device, a FIFO, a directory or a 10 GB
/// file is refused at once (bounded by `timeout`, so a regression fails instead of hanging).
#[test]
fn input_files_are_bounded_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let big = dir.path().join("big.toml");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(10_000_000_000)
        .unwrap();
    let cases: [(&str, &Path, &str); 4] = [
        ("/dev/zero", Path::new("/dev/zero"), "a character device"),
        ("a FIFO", &fifo, "a FIFO"),
        ("a directory", dir.path(), "a directory"),
        ("a 10 GB file", &big, "larger than"),
    ];
    for (what, path, message) in cases {
        let started = std::time::Instant::now();
        let o = Command::new("timeout")
            .arg("30")
            .arg(env!("CARGO_BIN_EXE_picoimg"))
            .args(["cluster", "check"])
            .arg(path)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{what}: {}", stderr(&o));
        assert!(stderr(&o).contains(message), "{what}: {}", stderr(&o));
        assert!(started.elapsed().as_secs() < 10, "{what}: took too long");
    }
    // A block map that is a FIFO, for flash.
    let img = dir.path().join("x.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let o = Command::new("timeout")
        .arg("30")
        .arg(env!("CARGO_BIN_EXE_picoimg"))
        .arg("flash")
        .arg("--bmap")
        .arg(&fifo)
        .arg(&img)
        .arg(dir.path().join("out.img"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("a FIFO"), "{}", stderr(&o));
}

/// Output into a pipe that is already closed ends the command quietly, as Unix tools do.
#[test]
fn closed_stdout_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["boards", "--sources"],
        vec!["stacks"],
        vec!["plan", "--board", "h4"],
        vec!["cluster", "init", "--name", "lab"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = picoimg()
            .args(&args)
            .current_dir(dir.path())
            .stdout(writer)
            .output()
            .unwrap();
        assert!(!stderr(&o).contains("panicked"), "{args:?}: {}", stderr(&o));
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    }
}

/// Data files stay inside the data directory and are checked: component and unit names,
/// partition names and mount points, one ESP, layout arithmetic; options that do not apply
/// are refused.
#[test]
fn data_files_and_options_are_confined_and_checked() {
    let edit = |file: &str, f: &dyn Fn(&str) -> String| {
        let dir = common::data_copy();
        let p = dir.path().join(file);
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, f(&text)).unwrap();
        dir
    };
    let cases: Vec<(&str, tempfile::TempDir, Vec<&str>, &str)> = vec![
        (
            "component name with ..",
            edit("overlays/stacks.toml", &|t| {
                t.replace(
                    "components = [\"base\", \"consul\"]",
                    "components = [\"base\", \"../../x\"]",
                )
            }),
            vec!["--board", "h4", "--stack", "consul"],
            "[consul] components: \"../../x\" is not a component",
        ),
        (
            "unit name with a path",
            edit("overlays/base/component.toml", &|t| {
                t.replace("\"ssh.service\",", "\"ssh.service\", \"../../etc/passwd\",")
            }),
            vec!["--board", "h4"],
            "not a systemd unit name",
        ),
        (
            "duplicate mount points",
            edit("boards/h4.toml", &|t| {
                t.replacen("mount = \"/boot/efi\"", "mount = \"/\"", 1)
            }),
            vec!["--board", "h4"],
            "mount point too",
        ),
        (
            "a second ESP",
            edit("boards/h4.toml", &|t| {
                t.replace("type = \"root-x86-64\"", "type = \"esp\"")
            }),
            vec!["--board", "h4"],
            "more than one has type = \"esp\"",
        ),
        (
            "a GPT name over 36 UTF-16 units",
            edit("boards/h4.toml", &|t| {
                t.replacen(
                    "name = \"root\"",
                    &format!("name = \"{}\"", "r".repeat(37)),
                    1,
                )
            }),
            vec!["--board", "h4"],
            "36 UTF-16 units",
        ),
        (
            "a start offset that overflows",
            edit("boards/h4.toml", &|t| {
                t.replacen(
                    "name = \"esp\"",
                    "name = \"esp\"\nstart = \"17592186044415MiB\"",
                    1,
                )
            }),
            vec!["--board", "h4"],
            "ends past the usable end",
        ),
    ];
    for (what, data, args, message) in cases {
        let e = refused(&args, Some(data.path()));
        assert!(e.contains(message), "{what}: {e}");
    }
    for (what, args, message) in [
        (
            "a board name with a path",
            vec!["--board", "../../etc/x"],
            "must be lowercase letters",
        ),
        (
            "--uboot for a board without a blob",
            vec!["--board", "h4", "--uboot", "/etc/hostname"],
            "no bootloader blob",
        ),
        (
            "--mirror that is not a URL",
            vec!["--board", "h4", "--mirror", "not-a-url"],
            "is not a URL",
        ),
    ] {
        let e = refused(&args, None);
        assert!(e.contains(message), "{what}: {e}");
    }
    let e = refused(
        &["--board", "h4"],
        Some(Path::new("/nonexistent-picoimg-data")),
    );
    assert!(e.contains("no such directory"), "{e}");
}

/// `picoimg run` refuses a file that is not a disk image before starting QEMU, even with a
/// manifest beside it.
#[test]
fn run_refuses_a_file_without_a_partition_table() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("notes.img");
    std::fs::write(&img, "not an image\n".repeat(100)).unwrap();
    let plan = picoimg().args(["plan", "--board", "h4"]).output().unwrap();
    assert!(plan.status.success(), "{}", stderr(&plan));
    std::fs::write(dir.path().join("notes.manifest.json"), &plan.stdout).unwrap();
    let o = picoimg()
        .arg("run")
        .arg(&img)
        .args(["--expect-ready", "--timeout", "5"])
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not a bootable disk image")
            && stderr(&o).contains("no partition table"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("starting:"), "QEMU was started");
}

/// A stand-in for qemu-system-x86_64 (first on PATH), as QEMU behaves on a machine where
/// /dev/kvm opens but cannot run the guest: the KVM probe (no serial) runs until `timeout`
/// ends it; a KVM boot prints QEMU's internal-error report and pauses; a TCG boot prints the
/// ready marker, or with FAKE_QEMU_SILENT=1 nothing, and waits. Needs OVMF (host tier).
#[cfg(feature = "image-tests")]
fn fake_qemu(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = bin.join("qemu-system-x86_64");
    std::fs::write(
        &script,
        r#"#!/bin/sh
case " $* " in
  *" -serial none "*) exec sleep 5 ;;
  *" -accel kvm "*)
    echo "KVM internal error. Suberror: 1" >&2
    echo "emulation failure" >&2
    exec sleep 600 ;;
esac
[ -n "$FAKE_QEMU_SILENT" ] || echo "picoimg-boot: ready (fake guest under TCG)"
exec sleep 600
"#,
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// A 16 MiB raw image with an MBR and one partition (enough for `run` to accept it).
#[cfg(feature = "image-tests")]
fn tiny_disk(dir: &Path) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let img = dir.join("tiny.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(16 << 20).unwrap();
    let mut e = [0u8; 16];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&2048u32.to_le_bytes());
    e[12..16].copy_from_slice(&8192u32.to_le_bytes());
    f.write_all_at(&e, 446).unwrap();
    f.write_all_at(&[0x55, 0xaa], 510).unwrap();
    img
}

#[cfg(feature = "image-tests")]
fn run_with_fake_qemu(dir: &Path, args: &[&str]) -> Command {
    let bin = fake_qemu(dir);
    let kvm = dir.join("kvm-stand-in");
    std::fs::write(&kvm, "").unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = picoimg();
    c.arg("run")
        .arg(tiny_disk(dir))
        .args(["--board", "h4"])
        .args(args)
        .env("PATH", path)
        .env("PICOIMG_KVM_DEVICE", &kvm)
        .env("TMPDIR", dir);
    c
}

/// QEMU's KVM failure (a paused VM) is noticed at once: with --accel auto, run restarts under
/// TCG and says so; with --accel kvm it stops with QEMU's message instead of waiting out the
/// timeout.
#[cfg(feature = "image-tests")]
#[test]
fn kvm_failure_falls_back_to_tcg_or_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let o = run_with_fake_qemu(dir.path(), &["--expect-ready", "--timeout", "120"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("KVM cannot run this guest here")
            && stderr(&o).contains("restarting under TCG"),
        "{}",
        stderr(&o)
    );
    assert!(
        started.elapsed().as_secs() < 60,
        "took {:?}",
        started.elapsed()
    );
    let started = std::time::Instant::now();
    let o = run_with_fake_qemu(
        dir.path(),
        &["--accel", "kvm", "--expect-ready", "--timeout", "120"],
    )
    .output()
    .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("KVM cannot run this guest here (KVM internal error"),
        "{}",
        stderr(&o)
    );
    assert!(
        started.elapsed().as_secs() < 60,
        "took {:?}",
        started.elapsed()
    );
}

/// SIGTERM ends `run` like Ctrl-C: QEMU stopped, the temporary directory removed.
#[cfg(feature = "image-tests")]
#[test]
fn sigterm_ends_run_and_removes_its_temporary_directory() {
    for args in [
        vec!["--accel", "tcg", "--expect-ready", "--timeout", "600"],
        vec!["--accel", "tcg"],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = run_with_fake_qemu(dir.path(), &args)
            .env("FAKE_QEMU_SILENT", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let temp_dirs = || -> Vec<String> {
            std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("picoimg-run-"))
                .collect()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while temp_dirs().is_empty() || !has_child_named(child.id(), "sleep") {
            assert!(
                std::time::Instant::now() < deadline,
                "{args:?}: QEMU never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{args:?}: still running"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        assert!(!status.success(), "{args:?}");
        assert!(temp_dirs().is_empty(), "{args:?}: left {:?}", temp_dirs());
    }
}

/// Whether process `pid` has a child (the fake QEMU execs sleep) named `name`.
#[cfg(feature = "image-tests")]
fn has_child_named(pid: u32, name: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .any(|c| std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|n| n.trim() == name))
}

/// For scripts and shells: JSON from boards, stacks and cluster check; completions for three
/// shells; a man page from the same definitions as --help.
#[test]
fn json_completions_and_man_page() {
    let json = |args: &[&str]| -> serde_json::Value {
        let o = picoimg().args(args).output().unwrap();
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&o.stdout)))
    };
    let boards = json(&["boards", "--json"]);
    let h4 = boards
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "h4")
        .unwrap();
    assert_eq!(h4["arch"], "amd64");
    assert!(h4["sources"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["default"] == true));
    let stacks = json(&["stacks", "--json"]);
    assert!(stacks
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "consul" && s["components"].as_array().unwrap().len() >= 2));
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster_file(dir.path());
    let v = json(&["cluster", "check", "--json", cluster.to_str().unwrap()]);
    assert_eq!(v["ok"], true, "{v}");
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(&cluster).unwrap();
    std::fs::write(
        &bad,
        text.replace("acl = true", "acl = \"yes\"")
            .replace("consul-server", "consul-client"),
    )
    .unwrap();
    let o = picoimg()
        .args(["cluster", "check", "--json"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let p = &v["problems"][0];
    assert_eq!(p["field"], "consul.acl");
    assert!(p["line"].as_u64().unwrap() > 0);
    assert_eq!(p["file"], bad.to_str().unwrap());
    // A problem of the whole file is printed without a line 0.
    let t = text.replace("consul-server", "consul-client");
    std::fs::write(&bad, t).unwrap();
    let o = picoimg()
        .args(["cluster", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!(
            "{}: node.roles: no node has the consul-server role",
            bad.display()
        )),
        "{out}"
    );
    assert!(!out.contains(":0:"), "{out}");
    for shell in ["bash", "zsh", "fish"] {
        let o = picoimg().args(["completions", shell]).output().unwrap();
        assert!(o.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&o.stdout);
        assert!(
            script.contains("picoimg") && script.contains("personalise"),
            "{shell}"
        );
    }
    let bash = picoimg().args(["completions", "bash"]).output().unwrap();
    let f = dir.path().join("picoimg.bash");
    std::fs::write(&f, &bash.stdout).unwrap();
    let st = Command::new("bash").arg("-n").arg(&f).status().unwrap();
    assert!(st.success(), "bash -n rejects the completion script");
    let man = picoimg().arg("manpage").output().unwrap();
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(
        man.contains(".TH picoimg 1") && man.contains("personalise"),
        "{man}"
    );
}

/// Roles are served by components (component.toml `roles`): a file naming a role the stack
/// does not serve is refused with the node's line.
#[test]
fn cluster_check_with_a_stack_refuses_roles_it_does_not_serve() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster_file(dir.path());
    let o = picoimg()
        .args(["cluster", "check", "--stack", "base"])
        .arg(&cluster)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    let text = std::fs::read_to_string(&cluster).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("roles = [\"consul-server\"]"))
        .unwrap()
        + 1;
    assert!(
        out.contains(&format!(
            "lab.toml:{line}: node[0].roles: role `consul-server` is not served by stack `base`"
        )),
        "{out}"
    );
    let o = picoimg()
        .args(["cluster", "check", "--stack", "consul"])
        .arg(&cluster)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A component's pinned artifact: an unreachable download names the offline ways in, a local
/// copy that is not the pinned file is refused, an unknown name lists the known ones, all
/// before anything is built; `plan` shows the pin.
#[test]
fn component_artifacts_are_checked_before_anything_is_built() {
    let data = common::data_copy();
    let comp = data.path().join("overlays/tool");
    std::fs::create_dir_all(&comp).unwrap();
    let pinned = sha256_hex(b"the release");
    std::fs::write(
        comp.join("component.toml"),
        format!(
            "description = \"a release binary\"\n\n[[artifact]]\nname = \"tool\"\n\
             description = \"the tool release\"\npath = \"/usr/local/bin/tool\"\n\
             [artifact.pins.amd64]\nurl = \"http://127.0.0.1:9/tool\"\nsha256 = \"{pinned}\"\n"
        ),
    )
    .unwrap();
    let stacks = data.path().join("overlays/stacks.toml");
    let mut text = std::fs::read_to_string(&stacks).unwrap();
    text.push_str("\n[tool]\ndescription = \"base + tool\"\ncomponents = [\"base\", \"tool\"]\n");
    std::fs::write(&stacks, text).unwrap();
    let target = ["--board", "h4", "--stack", "tool"];
    let e = refused(&target, Some(data.path()));
    assert!(
        e.contains("artifact `tool`")
            && e.contains("--artifact tool=FILE")
            && e.contains(&format!("blobs/{pinned}")),
        "{e}"
    );
    let wrong = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong.path(), b"not the release").unwrap();
    let arg = format!("tool={}", wrong.path().display());
    let e = refused(
        &[&target[..], &["--artifact", &arg]].concat(),
        Some(data.path()),
    );
    assert!(
        e.contains(&format!("but component `tool` pins {pinned}")),
        "{e}"
    );
    let e = refused(
        &[&target[..], &["--artifact", "other=/dev/null"]].concat(),
        Some(data.path()),
    );
    assert!(
        e.contains("--artifact other: no component") && e.contains("it has: tool"),
        "{e}"
    );
    // No pin for the board's architecture.
    let e = refused(&["--board", "c5", "--stack", "tool"], Some(data.path()));
    assert!(e.contains("has no pin for arm64 (pins: amd64)"), "{e}");
    // A bad declaration names the file and the key.
    let toml = comp.join("component.toml");
    let t = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        t.replace("/usr/local/bin/tool", "usr/local/bin/tool"),
    )
    .unwrap();
    let e = refused(&target, Some(data.path()));
    assert!(
        e.contains("overlays/tool/component.toml: artifact `tool`: path"),
        "{e}"
    );
    std::fs::write(&toml, t).unwrap();
    let o = picoimg()
        .arg("--data-dir")
        .arg(data.path())
        .arg("plan")
        .args(target)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let comps = plan["components"].as_array().unwrap();
    let tool = comps.iter().find(|c| c["name"] == "tool").unwrap();
    assert_eq!(tool["artifacts"][0]["sha256"], pinned.as_str());
    assert_eq!(tool["artifacts"][0]["path"], "/usr/local/bin/tool");
}

/// `--stack` takes a list of components, resolved with what they require; the image is named
/// after them; a name that is no component is refused.
#[test]
fn stack_can_be_a_list_of_components() {
    let o = picoimg()
        .args([
            "plan",
            "--board",
            "h4",
            "--stack",
            "consul,docker",
            "--sources",
            "debian",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(plan["name"], "h4-consul+docker");
    let names: Vec<&str> = plan["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["systemd-boot", "base", "consul", "docker"]);
    // The stack's packages are a layer over the base root every stack of the board shares,
    // with the board's firmware (stack `base`: the firmware alone).
    let base = picoimg()
        .args(["plan", "--board", "h4", "--stack", "base"])
        .output()
        .unwrap();
    let base: serde_json::Value = serde_json::from_slice(&base.stdout).unwrap();
    assert_eq!(plan["rootfs_key"], base["rootfs_key"]);
    assert_eq!(
        base["layer"]["packages"],
        serde_json::json!([
            "firmware-intel-graphics",
            "firmware-realtek",
            "intel-microcode",
            "linux-sysctl-defaults"
        ]),
        "{base}"
    );
    for p in base["layer"]["packages"].as_array().unwrap() {
        assert!(plan["layer"]["packages"].as_array().unwrap().contains(p));
        assert!(!plan["rootfs"]["packages"].as_array().unwrap().contains(p));
    }
    assert_eq!(plan["layer_key"].as_str().map(str::len), Some(64));
    assert_eq!(plan["layer"]["sources"][0]["suite"], "bullseye");
    let pkgs = plan["layer"]["packages"].to_string();
    for p in [
        "\"docker.io\"",
        "\"docker-cli\"",
        "\"containernetworking-plugins\"",
        "\"consul\"",
    ] {
        assert!(pkgs.contains(p), "{p} in {pkgs}");
    }
    let e = refused(&["--board", "h4", "--stack", "consul,dokcer"], None);
    assert!(
        e.contains("--stack consul,dokcer: \"dokcer\" is neither a component"),
        "{e}"
    );
}

/// The nomad stack: listed with its components; its cluster file (from `cluster init --stack
/// nomad`) checks, and is refused for a consul image with the line of a nomad role; the build
/// stops before anything runs when HashiCorp's repository is missing or unreachable, naming it
/// and saying there is no substitute.
#[test]
fn nomad_stack_is_listed_its_file_checks_and_an_unreachable_repository_stops_the_build() {
    let o = picoimg().arg("stacks").output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("nomad") && l.ends_with("[base, consul, docker, nomad, ceph]")),
        "{out}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lab.toml");
    let o = picoimg()
        .args([
            "cluster", "init", "--name", "lab", "--stack", "nomad", "--out",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("[nomad]") && text.contains("[consul]"),
        "{text}"
    );
    let o = picoimg()
        .args(["cluster", "check", "--stack", "nomad"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains("3 nodes, 3 consul-server, 3 nomad-server, 3 nomad-client"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = picoimg()
        .args(["cluster", "check", "--stack", "consul"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let line = text
        .lines()
        .position(|l| l.contains("\"nomad-server\""))
        .unwrap()
        + 1;
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!(
            "lab.toml:{line}: node[0].roles: role `nomad-server` is not served by stack `consul`"
        )),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Without HashiCorp's keyring on the host: refused at plan time, even with --sources debian
    // (Consul has a Debian substitute, Nomad has none).
    let data = common::data_copy();
    let e = refused(
        &["--board", "c5", "--stack", "nomad", "--sources", "debian"],
        Some(data.path()),
    );
    assert!(
        e.contains("component `nomad` source set `hashicorp` (apt source `hashicorp`, https://apt.releases.hashicorp.com)")
            && e.contains("or build without it: --artifact nomad=FILE"),
        "{e}"
    );
    // `plan` still resolves the stack with every package and source, says what is missing,
    // and gives no hashes (they would name no real build).
    let o = picoimg()
        .arg("--data-dir")
        .arg(data.path())
        .args(["plan", "--board", "c5", "--stack", "nomad"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(plan["name"], "c5-nomad");
    let pkgs = plan["layer"]["packages"].to_string();
    for p in [
        "\"nomad\"",
        "\"consul\"",
        "\"docker.io\"",
        "\"containernetworking-plugins\"",
    ] {
        assert!(pkgs.contains(p), "{p} in {pkgs}");
    }
    let hashicorp = plan["layer"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "hashicorp")
        .expect("HashiCorp's repository in the plan");
    assert_eq!(hashicorp["uri"], "https://apt.releases.hashicorp.com");
    assert!(hashicorp["keyring_sha256"].is_null());
    for k in ["plan_hash", "inputs_hash", "rootfs_key", "layer_key"] {
        assert!(plan[k].is_null(), "{k}: {}", plan[k]);
    }
    let note = stderr(&o);
    assert!(
        note.contains("cannot read its keyring /usr/share/keyrings/hashicorp-archive-keyring.gpg")
            && note.contains("(a build stops here)"),
        "{note}"
    );
    // With a keyring but no route to the repository: named before mmdebstrap runs.
    let keyring = dir.path().join("hashicorp.gpg");
    std::fs::write(&keyring, b"not checked before the probe").unwrap();
    let comp = data.path().join("overlays/nomad/component.toml");
    let t = std::fs::read_to_string(&comp).unwrap();
    std::fs::write(
        &comp,
        t.replace(
            "https://apt.releases.hashicorp.com",
            "http://127.0.0.1:9/hashicorp",
        )
        .replace(
            "/usr/share/keyrings/hashicorp-archive-keyring.gpg",
            keyring.to_str().unwrap(),
        ),
    )
    .unwrap();
    let e = refused(
        &["--board", "h4", "--stack", "nomad", "--sources", "debian"],
        Some(data.path()),
    );
    assert!(
        e.contains("apt source `hashicorp` (http://127.0.0.1:9/hashicorp) cannot be reached")
            && e.contains("hint: build component `nomad` without it: --artifact nomad=FILE"),
        "{e}"
    );
    assert!(!e.contains("mmdebstrap --variant"), "{e}");
}

/// A zip with one member `name` holding `body`, made by Python's zipfile (deflated), as
/// HashiCorp's release archives are.
fn python_zip(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    let zip = dir.join("release.zip");
    let o = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys,zipfile\n\
             with zipfile.ZipFile(sys.argv[1],'w',zipfile.ZIP_DEFLATED) as z: z.writestr(sys.argv[2], sys.argv[3])",
        ])
        .arg(&zip)
        .args([name, body])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    zip
}

/// Nomad's offline path: `--artifact nomad=ZIP` selects the release set, so HashiCorp's apt
/// repository is not needed; the archive must be the pinned one (checked before anything runs).
#[test]
fn nomad_release_archive_is_the_offline_path_and_must_match_its_pin() {
    let dir = tempfile::tempdir().unwrap();
    let zip = python_zip(dir.path(), "nomad", "#!/bin/sh\necho Nomad v1.11.1\n");
    let arg = format!("nomad={}", zip.display());
    // Not HashiCorp's archive: refused against the real pin.
    let e = refused(
        &[
            "--board",
            "h4",
            "--stack",
            "nomad",
            "--sources",
            "debian",
            "--artifact",
            &arg,
        ],
        None,
    );
    assert!(
        e.contains("but component `nomad` pins 8e8fbc9c3ddae39a63f7ed70a99bb4b936bb6e88ed9160ce0e9d36ff2909c1f3"),
        "{e}"
    );
    // Pinned to this archive (a data copy): the plan uses the release set and no HashiCorp
    // repository (so no keyring is needed).
    let data = common::data_copy();
    let comp = data.path().join("overlays/nomad/component.toml");
    let t = std::fs::read_to_string(&comp).unwrap();
    std::fs::write(
        &comp,
        t.replace(
            "8e8fbc9c3ddae39a63f7ed70a99bb4b936bb6e88ed9160ce0e9d36ff2909c1f3",
            &sha256_hex(&std::fs::read(&zip).unwrap()),
        ),
    )
    .unwrap();
    let o = picoimg()
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "plan",
            "--board",
            "h4",
            "--stack",
            "nomad",
            "--sources",
            "debian",
        ])
        .args(["--artifact", &arg])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let nomad = plan["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "nomad")
        .unwrap();
    assert_eq!(nomad["sources"], "release");
    assert_eq!(nomad["artifacts"][0]["path"], "/usr/bin/nomad");
    let srcs = format!("{}{}", plan["rootfs"]["sources"], plan["layer"]["sources"]);
    assert!(!srcs.contains("hashicorp"), "{srcs}");

    // Another release than the pin: the user gives its sha256 (from HashiCorp's SHA256SUMS);
    // the plan records that sum, and the file is checked against it before anything runs.
    let sum = sha256_hex(&std::fs::read(&zip).unwrap());
    let o = picoimg()
        .args([
            "plan",
            "--board",
            "h4",
            "--stack",
            "nomad",
            "--sources",
            "debian",
        ])
        .args(["--artifact", &arg, "--artifact-sha256"])
        .arg(format!("nomad={}", sum.to_uppercase()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let a = &plan["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "nomad")
        .unwrap()["artifacts"][0];
    assert_eq!(a["sha256"], sum.as_str());
    assert_eq!(a["sha256_given"], true);
    let wrong = "0".repeat(64);
    let e = refused(
        &[
            "--board",
            "h4",
            "--stack",
            "nomad",
            "--sources",
            "debian",
            "--artifact",
            &arg,
            "--artifact-sha256",
            &format!("nomad={wrong}"),
        ],
        None,
    );
    assert!(
        e.contains(&format!(
            "has sha256 {sum}, but --artifact-sha256 nomad pins {wrong}"
        )),
        "{e}"
    );
}

/// The cache keys of a layered root: the base key follows only the base (the board's set and
/// stack `base`), the layer key follows the base and everything the layer adds: its packages,
/// its sources and their keyrings' contents.
#[test]
fn layer_keys_follow_the_base_the_sources_and_the_keyrings() {
    let data = common::data_copy();
    let keyring = data.path().join("bullseye.gpg");
    std::fs::write(&keyring, b"key one").unwrap();
    let consul = data.path().join("overlays/consul/component.toml");
    let original = std::fs::read_to_string(&consul).unwrap();
    let edit = |f: &dyn Fn(String) -> String| {
        std::fs::write(&consul, f(original.clone())).unwrap();
    };
    let with_keyring = |t: String| {
        t.replace(
            "keyring = \"/usr/share/keyrings/debian-archive-keyring.gpg\"",
            &format!("keyring = \"{}\"", keyring.display()),
        )
    };
    let keys = || {
        let o = picoimg()
            .arg("--data-dir")
            .arg(data.path())
            .args([
                "plan",
                "--board",
                "h4",
                "--stack",
                "consul",
                "--sources",
                "debian",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (
            v["rootfs_key"].as_str().unwrap().to_owned(),
            v["layer_key"].as_str().unwrap().to_owned(),
        )
    };
    edit(&with_keyring);
    let (base, layer) = keys();
    // The keyring's bytes: a new layer on the same base.
    std::fs::write(&keyring, b"key two").unwrap();
    let (b2, l2) = keys();
    assert_eq!(b2, base);
    assert_ne!(l2, layer);
    // The layer's source (another suite): a new layer on the same base.
    edit(&|t| with_keyring(t).replace("suite = \"bullseye\"", "suite = \"bookworm\""));
    let (b3, l3) = keys();
    assert_eq!(b3, base);
    assert!(l3 != layer && l3 != l2);
    // The layer's packages.
    edit(&|t| {
        with_keyring(t).replace(
            "packages = [\"consul\"]\n\n[[sources.debian.apt]]",
            "packages = [\"consul\", \"jq\"]\n\n[[sources.debian.apt]]",
        )
    });
    let (b4, l4) = keys();
    assert_eq!(b4, base);
    assert!(![&layer, &l2, &l3].contains(&&l4));
    // The base (a package of stack `base`): a new base, and so a new layer.
    edit(&with_keyring);
    let base_comp = data.path().join("overlays/base/component.toml");
    let t = std::fs::read_to_string(&base_comp).unwrap();
    std::fs::write(&base_comp, t.replace("\"less\",", "\"less\", \"jq\",")).unwrap();
    let (b5, l5) = keys();
    assert_ne!(b5, base);
    assert!(![&layer, &l2, &l3, &l4].contains(&&l5));
}

/// `picoimg cache list` shows each cached root with its size, age and what it is;
/// `prune` removes what no build used for the given days and files killed builds left,
/// `--dry-run` only says so, `--all` empties the root filesystems.
#[test]
fn cache_list_and_prune() {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let day = std::time::Duration::from_secs(86_400);
    let entry = |key: &str, what: &str, bytes: usize, age_days: u32| {
        std::fs::write(rootfs.join(format!("{key}.tar")), vec![0u8; bytes]).unwrap();
        let json = rootfs.join(format!("{key}.json"));
        std::fs::write(
            &json,
            serde_json::json!({"key": key, "seconds": 1.0, "initramfs_generations": 1,
                "mmdebstrap_version": "mmdebstrap 1.5.5", "what": what})
            .to_string(),
        )
        .unwrap();
        let f = std::fs::File::options().append(true).open(&json).unwrap();
        f.set_modified(std::time::SystemTime::now() - day * age_days)
            .unwrap();
    };
    let base = "a".repeat(64);
    let layer = "b".repeat(64);
    entry(
        &base,
        "base debian trixie amd64, 30 packages asked",
        3 << 20,
        1,
    );
    entry(&layer, "layer amd64 over aaaaaaaaaaaa: consul", 1 << 20, 45);
    // Compressed image blocks: one used today, one 45 days ago.
    let xz = dir.path().join("xz");
    std::fs::create_dir_all(&xz).unwrap();
    std::fs::write(xz.join(format!("6-{}", "c".repeat(64))), vec![1u8; 4096]).unwrap();
    let old_block = xz.join(format!("6-{}", "d".repeat(64)));
    std::fs::write(&old_block, vec![1u8; 8192]).unwrap();
    std::fs::File::options()
        .append(true)
        .open(&old_block)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - day * 45)
        .unwrap();
    let left = rootfs.join(".building-x.tar");
    std::fs::write(&left, b"half").unwrap();
    std::fs::File::options()
        .append(true)
        .open(&left)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - day * 2)
        .unwrap();
    let cache = |args: &[&str]| {
        let o = picoimg()
            .arg("cache")
            .args(args)
            .arg("--cache")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let list = cache(&["list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert!(
        lines[2].starts_with("aaaaaaaaaaaa")
            && lines[2].contains("3.0 MiB")
            && lines[2].contains("1 d ago")
            && lines[2].ends_with("base debian trixie amd64, 30 packages asked"),
        "{list}"
    );
    assert!(
        lines[3].starts_with("bbbbbbbbbbbb")
            && lines[3].contains("45 d ago")
            && lines[3].ends_with(": consul"),
        "{list}"
    );
    assert!(list.contains("2 root filesystem(s), 4.0 MiB"), "{list}");
    assert!(
        list.lines()
            .any(|l| l.starts_with("xz") && l.ends_with("2 file(s)")),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with("unfinished") && l.ends_with("1 file(s)")),
        "{list}"
    );
    let dry = cache(&["prune", "--dry-run"]);
    assert!(
        dry.contains(
            "would remove rootfs bbbbbbbbbbbb (layer amd64 over aaaaaaaaaaaa: consul): 1.0 MiB"
        ),
        "{dry}"
    );
    assert!(
        dry.contains("would remove xz blocks (1 compressed blocks): 8.0 KiB"),
        "{dry}"
    );
    assert!(dry.contains("would remove 3 item(s)"), "{dry}");
    assert!(rootfs.join(format!("{layer}.tar")).exists() && old_block.exists());
    let pruned = cache(&["prune"]);
    assert!(pruned.contains("removed 3 item(s)"), "{pruned}");
    assert!(!old_block.exists());
    assert!(
        !rootfs.join(format!("{layer}.tar")).exists()
            && !rootfs.join(format!("{layer}.json")).exists()
    );
    assert!(!left.exists());
    assert!(rootfs.join(format!("{base}.tar")).exists());
    let all = cache(&["prune", "--all"]);
    assert!(all.contains("removed 2 item(s), 3.0 MiB"), "{all}");
    assert_eq!(std::fs::read_dir(&xz).unwrap().count(), 0);
    assert!(!rootfs.join(format!("{base}.tar")).exists());
}

/// The k3s component's artifacts: K3s's release binary and air-gap images per architecture
/// (the plan names the release's files), each fetched from its pin and checked before
/// anything is built, or given as an offline file that must match the pin (or a sha256 the
/// user gives). K3s's download site is not reachable here: the fetch is served from
/// 127.0.0.1 through a data copy whose pins point there; the real pins are only read.
#[test]
fn k3s_release_artifacts_are_pinned_fetched_and_checked() {
    let plan = |board: &str, data: Option<&Path>, extra: &[&str]| -> serde_json::Value {
        let mut c = picoimg();
        if let Some(d) = data {
            c.arg("--data-dir").arg(d);
        }
        let o = c
            .args(["plan", "--board", board, "--stack", "k3s"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        p["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "k3s")
            .unwrap()["artifacts"]
            .clone()
    };
    let release = "https://github.com/k3s-io/k3s/releases/download/v1.31.4%2Bk3s1/";
    for (board, binary, images) in [
        ("h4", "k3s", "k3s-airgap-images-amd64.tar.zst"),
        ("c5", "k3s-arm64", "k3s-airgap-images-arm64.tar.zst"),
    ] {
        let a = plan(board, None, &[]);
        assert_eq!(a[0]["name"], "k3s");
        assert_eq!(a[0]["path"], "/usr/local/bin/k3s");
        assert_eq!(a[0]["mode"], 0o755);
        assert_eq!(a[0]["url"], format!("{release}{binary}"));
        assert_eq!(a[1]["name"], "k3s-images");
        assert_eq!(
            a[1]["path"],
            "/var/lib/rancher/k3s/agent/images/k3s-airgap-images.tar.zst"
        );
        assert_eq!(a[1]["mode"], 0o644);
        assert_eq!(a[1]["url"], format!("{release}{images}"));
    }
    // Fetched from the pin's URL (here 127.0.0.1): a file that is not the pinned one is
    // refused, naming what it got, before anything is built.
    let data = common::data_copy();
    let comp = data.path().join("overlays/k3s/component.toml");
    let text = std::fs::read_to_string(&comp).unwrap();
    let stand_in = b"#!/bin/sh\necho k3s version v1.31.4+k3s1 (stand-in)\n".to_vec();
    let url = common::serve(b"not the release".to_vec(), 4);
    let pinned_amd64 = "74897e4af26ea383ce50f445752f40ca63a0aef0d90994fb74073c43063eeeb2";
    std::fs::write(
        &comp,
        text.replace(&format!("{release}k3s\""), &format!("{url}\"")),
    )
    .unwrap();
    let e = refused(&["--board", "h4", "--stack", "k3s"], Some(data.path()));
    assert!(
        e.contains(&format!(
            "from {url} has sha256 {}",
            sha256_hex(b"not the release")
        )) && e.contains(&format!("but component `k3s` pins {pinned_amd64}")),
        "{e}"
    );
    // Offline: a local copy must be the pinned file...
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k3s");
    std::fs::write(&file, &stand_in).unwrap();
    let arg = format!("k3s={}", file.display());
    let e = refused(
        &["--board", "h4", "--stack", "k3s", "--artifact", &arg],
        None,
    );
    assert!(
        e.contains(&format!("but component `k3s` pins {pinned_amd64}")),
        "{e}"
    );
    // ...or match the sha256 the user gives for another release.
    let sum = sha256_hex(&stand_in);
    let a = plan(
        "h4",
        None,
        &[
            "--artifact",
            &arg,
            "--artifact-sha256",
            &format!("k3s={sum}"),
        ],
    );
    assert_eq!(a[0]["sha256"], sum.as_str());
    assert_eq!(a[0]["sha256_given"], true);
}

/// `openssl ARGS`: its stdout; the test fails on a non-zero exit.
fn openssl(args: &[&str]) -> String {
    let o = Command::new("openssl").args(args).output().unwrap();
    assert!(o.status.success(), "openssl {args:?}: {}", stderr(&o));
    String::from_utf8(o.stdout).unwrap()
}

/// `picoimg cluster kubeconfig` (issue 14 point 5): an admin kubeconfig from the cluster file
/// alone. Checked with openssl: the admin certificate verifies as a TLS client against the
/// client CA the founding node places (the same derivation), it is `system:admin` in
/// `system:masters` (what K3s's own admin is, k3s pkg/daemons/control/deps/deps.go), its key
/// is HKDF-SHA256 of the admin label reduced modulo P-256's order (computed by Python), and
/// the trusted CA is byte for byte the server-ca.crt the founder writes. No K3s runs here, so
/// a kubectl against a live API is not part of this.
#[test]
fn cluster_kubeconfig_gives_a_derived_admin_that_openssl_verifies() {
    use picoimg_firstboot::stacks::k3s::pki;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("lab.toml");
    let o = picoimg()
        .args([
            "cluster", "init", "--name", "lab", "--stack", "k3s", "--out",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = d.join("kube.yaml");
    let o = picoimg()
        .args(["cluster", "kubeconfig"])
        .arg(&file)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let kc = std::fs::read_to_string(&out).unwrap();
    assert!(
        kc.contains("\n    server: https://10.42.0.10:6443\n"),
        "{kc}"
    );
    assert!(kc.contains("\ncurrent-context: lab\n"), "{kc}");
    // The same bytes on stdout, and on every run.
    let o = picoimg()
        .args(["cluster", "kubeconfig"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8(o.stdout).unwrap(), kc);
    let field = |k: &str| -> Vec<u8> {
        use base64::Engine;
        let v = kc
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{k}: ")))
            .unwrap();
        base64::engine::general_purpose::STANDARD.decode(v).unwrap()
    };
    let put = |name: &str, bytes: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (ca, crt, key) = (
        put("ca.crt", &field("certificate-authority-data")),
        put("admin.crt", &field("client-certificate-data")),
        put("admin.key", &field("client-key-data")),
    );
    // What the founding node writes (the k3s stack's own derivation, as the node runs it).
    let c = picoimg_firstboot::cluster::check(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let stacks = [&picoimg_firstboot::stacks::k3s::K3s as &dyn picoimg_firstboot::stack::Stack];
    let s = picoimg_firstboot::stack::Secrets::of(&stacks, &c);
    let founder = |ca: pki::Authority| pki::ca_cert_pem(&ca, s.get(ca.label).unwrap()).unwrap();
    assert_eq!(
        std::fs::read_to_string(&ca).unwrap(),
        founder(pki::server_ca())
    );
    let client_ca = put("client-ca.crt", founder(pki::client_ca()).as_bytes());
    assert_eq!(
        openssl(&[
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            &client_ca,
            &crt
        ]),
        format!("{crt}: OK\n")
    );
    let subject = openssl(&["x509", "-in", &crt, "-noout", "-subject", "-issuer"]);
    assert_eq!(
        subject,
        "subject=O = system:masters, CN = system:admin\nissuer=CN = picoimg-k3s-client-ca\n"
    );
    assert_eq!(
        openssl(&["x509", "-in", &crt, "-noout", "-pubkey"]),
        openssl(&["pkey", "-in", &key, "-pubout"])
    );
    // The private scalar: HKDF-SHA256 (salt the cluster id, info the label), mod n.
    let want = hkdf_by_python(
        &file,
        pki::ADMIN_KEY_LABEL,
        "'%064x' % (int.from_bytes(okm,'big') % \
         0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551)",
    );
    let dump = openssl(&["pkey", "-in", &key, "-noout", "-text"]);
    let priv_hex: String = dump
        .split("priv:")
        .nth(1)
        .unwrap()
        .split("pub:")
        .next()
        .unwrap()
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect();
    // openssl prints the scalar's bytes; a leading zero byte may be dropped.
    assert_eq!(
        format!("{:0>64}", priv_hex.trim_start_matches("00")),
        want,
        "{dump}"
    );
    // Another server of the file, or a name the certificate does not carry.
    let o = picoimg()
        .args(["cluster", "kubeconfig", "--server", "10.42.0.11"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("server: https://10.42.0.11:6443"));
    let o = picoimg()
        .args(["cluster", "kubeconfig", "--server", "k3s.lab.lan"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("--server k3s.lab.lan") && e.contains("tls_san") && e.contains("10.42.0.12"),
        "{e}"
    );
    // A file without K3s says what kubeconfig is for.
    let consul = cluster_file(d);
    let o = picoimg()
        .args(["cluster", "kubeconfig"])
        .arg(&consul)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no node has the k3s-server role"),
        "{}",
        stderr(&o)
    );
}

/// The integration guide's configurations are presets: `picoimg stacks` names the guide's
/// configuration of each, its components, and the guide's parts picoimg cannot install yet,
/// each with the source it would come from; the JSON says the same for scripts.
#[test]
fn stacks_lists_the_guides_presets_and_what_is_not_yet_available() {
    let out = run_ok(picoimg().arg("stacks"));
    for (preset, comps, guide) in [
        ("k8s", "[base, consul, k3s, ceph]", "Configuration 1"),
        (
            "nomad",
            "[base, consul, docker, nomad, ceph]",
            "Configuration 2",
        ),
        ("edgex", "[base, consul, ceph]", "Configuration 4"),
    ] {
        let at = out
            .lines()
            .position(|l| l.starts_with(&format!("{preset} ")) && l.ends_with(comps))
            .unwrap_or_else(|| panic!("{preset} {comps}:\n{out}"));
        assert!(out.lines().nth(at + 1).unwrap().contains(guide), "{out}");
    }
    assert!(
        out.contains("not yet: traefik: Traefik Labs publishes"),
        "{out}"
    );
    assert!(
        out.contains("not yet: edgex: EdgeX Foundry runs as container images"),
        "{out}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&run_ok(picoimg().args(["stacks", "--json"]))).unwrap();
    let k8s = v
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "k8s")
        .unwrap();
    assert_eq!(
        k8s["components"],
        serde_json::json!(["base", "consul", "k3s", "ceph"])
    );
    let harbor = k8s["not_yet"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["component"] == "harbor")
        .unwrap();
    assert!(
        harbor["why"]
            .as_str()
            .unwrap()
            .contains("harbor-offline-installer"),
        "{harbor}"
    );
    // A stack that names a component that does not exist is an error naming the file's entry.
    let data = common::data_copy();
    let stacks = data.path().join("overlays/stacks.toml");
    let text = std::fs::read_to_string(&stacks).unwrap();
    std::fs::write(
        &stacks,
        text.replace(
            "not_yet = [\"traefik\", \"harbor\"]\n\n[nomad]",
            "not_yet = [\"traefik\", \"harbour\"]\n\n[nomad]",
        ),
    )
    .unwrap();
    let o = picoimg()
        .arg("--data-dir")
        .arg(data.path())
        .arg("stacks")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("stacks.toml: [k8s] not_yet: \"harbour\" is not a component"),
        "{}",
        stderr(&o)
    );
}

/// The platform matrix is data (each component's `arch` and `boards`) and enforced: `stacks
/// --matrix` prints board x stack with the reasons, and a build of a pair the matrix refuses
/// stops at once, before any tool runs or any output is written, naming the matrix.
#[test]
fn the_platform_matrix_is_printed_and_enforced() {
    let out = run_ok(picoimg().args(["stacks", "--matrix"]));
    let header = out.lines().next().unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["stack", "c5", "h4", "rpi5-raspbian", "rpi5-ubuntu"],
        "{out}"
    );
    let row = |s: &str| -> Vec<String> {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(s))
            .unwrap_or_else(|| panic!("no row {s}:\n{out}"));
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .skip(1)
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(row("kvm"), ["no", "yes", "no", "no"], "{out}");
    assert_eq!(row("proxmox"), ["no", "not yet", "no", "no"], "{out}");
    assert_eq!(row("nomad"), ["yes", "yes", "yes", "yes"], "{out}");
    assert!(
        out.contains(
            "kvm on c5, rpi5-raspbian, rpi5-ubuntu: component `kvm` runs on h4 only (amd64)"
        ),
        "{out}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&run_ok(picoimg().args(["stacks", "--matrix", "--json"]))).unwrap();
    let proxmox = v["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "proxmox")
        .unwrap();
    assert_eq!(proxmox["boards"]["h4"]["mark"], "not yet");
    assert_eq!(proxmox["boards"]["c5"]["builds"], false);
    for (board, stack, says) in [
        ("c5", "proxmox", "component `proxmox` runs on h4 only (amd64): board `c5` is arm64 (the platform matrix: `picoimg stacks --matrix`)"),
        ("rpi5-ubuntu", "nomad,kvm", "component `kvm` runs on h4 only (amd64): board `rpi5-ubuntu` is arm64"),
        ("h4", "proxmox", "component `proxmox` is not available in picoimg yet: Proxmox VE's packages"),
    ] {
        let started = std::time::Instant::now();
        let e = refused(&["--board", board, "--stack", stack], None);
        assert!(e.contains(says), "{board} {stack}: {e}");
        assert!(!e.contains("mmdebstrap"), "{e}");
        eprintln!("{board} {stack}: refused in {:.3}s", started.elapsed().as_secs_f64());
    }
}

/// `build --dry-run --json` resolves every board x stack the matrix allows, without building:
/// the components (a preset's and the board's own), the packages of the base root and the
/// layer, the apt sources, roles and units; a pair the matrix refuses is refused the same way.
/// A stack list may name stacks: `nomad,kvm` is the nomad preset plus kvm.
#[test]
fn dry_run_resolves_every_board_and_stack() {
    let v: serde_json::Value =
        serde_json::from_str(&run_ok(picoimg().args(["stacks", "--matrix", "--json"]))).unwrap();
    let boards: Vec<&str> = v["boards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap())
        .collect();
    let mut resolved = 0;
    let mut yes = 0;
    for s in v["stacks"].as_array().unwrap() {
        let stack = s["name"].as_str().unwrap();
        // Every board at once, as `build --board a,b` takes them; then each board alone.
        let dry = |boards: &[&str]| {
            picoimg()
                .args(["build", "--dry-run", "--json", "--stack", stack])
                .args(["--board", &boards.join(",")])
                .output()
                .unwrap()
        };
        let started = std::time::Instant::now();
        let all = dry(&boards);
        eprintln!(
            "dry run of {stack} on {} boards: {:.3}s",
            boards.len(),
            started.elapsed().as_secs_f64()
        );
        for b in &boards {
            let builds = s["boards"][b]["builds"] == true;
            yes += usize::from(builds);
            let o = dry(&[b]);
            if !builds {
                assert!(!o.status.success(), "{stack} on {b} should be refused");
                assert!(
                    !all.status.success(),
                    "{stack}: a refused board refuses the run"
                );
                let e = stderr(&o);
                assert!(
                    e.contains("picoimg stacks --matrix")
                        || e.contains("not available in picoimg yet"),
                    "{e}"
                );
                continue;
            }
            assert!(o.status.success(), "{stack} on {b}: {}", stderr(&o));
            let plans: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let p = &plans[0];
            assert_eq!(p["board"], *b);
            assert_eq!(p["stack"], stack);
            assert!(
                p["components"].as_array().unwrap().contains(&"base".into()),
                "{p}"
            );
            assert!(
                p["base_packages"].to_string().contains("linux-image-"),
                "{p}"
            );
            assert!(
                p["units"].to_string().contains("picoimg-firstboot.service"),
                "{p}"
            );
            assert!(!p["apt_sources"].as_array().unwrap().is_empty(), "{p}");
            resolved += 1;
        }
    }
    assert_eq!(resolved, yes);
    assert!(yes > 7 * boards.len(), "{yes}");
    let p: serde_json::Value = serde_json::from_str(&run_ok(picoimg().args([
        "build",
        "--dry-run",
        "--json",
        "--board",
        "h4",
        "--stack",
        "nomad,kvm",
    ])))
    .unwrap();
    let p = &p[0];
    assert_eq!(
        p["components"],
        serde_json::json!([
            "systemd-boot",
            "base",
            "consul",
            "docker",
            "nomad",
            "ceph",
            "kvm"
        ])
    );
    for r in ["ceph-mon", "consul-server", "nomad-client"] {
        assert!(p["roles"].as_array().unwrap().contains(&r.into()), "{p}");
    }
    assert!(
        p["layer_packages"]
            .as_array()
            .unwrap()
            .contains(&"libvirt-daemon-system".into()),
        "{p}"
    );
    assert!(
        p["units"]
            .as_array()
            .unwrap()
            .contains(&"docker.service".into()),
        "{p}"
    );
    let text = run_ok(picoimg().args(["build", "--dry-run", "--board", "c5", "--stack", "k8s"]));
    assert!(
        text.starts_with("c5-k8s: board c5 (arm64), stack k8s, sources debian"),
        "{text}"
    );
}
