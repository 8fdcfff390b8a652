//! `picoimg flash` against regular files and loop devices, with block maps made by bmaptool
//! (interoperability) and results compared with cmp. Loop-device cases need root: they are in
//! the root tier (feature image-tests; CI is root).
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn picoimg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_picoimg"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{c:?}: {}\n{}", o.status, stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

const SIZE: u64 = 32 << 20;

/// A sparse 32 MiB image with data at 0 (a partition-table stand-in), 5 MiB and 20 MiB; its
/// block map made by `bmaptool create`, and an .xz made by xz.
fn image(dir: &Path) -> PathBuf {
    let img = dir.join("x.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(SIZE).unwrap();
    f.write_all_at(b"\xebpicoimg-test-boot-sector", 0).unwrap();
    let data: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    f.write_all_at(&data, 5 << 20).unwrap();
    f.write_all_at(&data[..(1 << 20)], 20 << 20).unwrap();
    drop(f);
    ok(Command::new("bmaptool")
        .arg("create")
        .arg("-o")
        .arg(dir.join("x.bmap"))
        .arg(&img));
    ok(Command::new("xz").args(["-k", "-1", "-T2"]).arg(&img));
    img
}

fn flash(args: &[&std::ffi::OsStr]) -> Output {
    picoimg()
        .arg("flash")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn same(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

#[test]
fn flashes_xz_with_bmaptool_bmap_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let out = dir.path().join("card.img");
    let o = flash(&[dir.path().join("x.img.xz").as_os_str(), out.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(same(&img, &out), "flashed file differs from the image");
    // Only the mapped blocks: 4 MiB of data (+ the first block), not 32.
    let e = stderr(&o);
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
    assert_eq!(written, (4 << 20) + 4096, "{e}");
    assert!(e.contains("verifying by reading back"), "{e}");
    // And raw, without a map: every byte.
    let out2 = dir.path().join("card2.img");
    let o = flash(&["--no-bmap".as_ref(), img.as_os_str(), out2.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(same(&img, &out2));
    assert!(
        stderr(&o).contains(&format!("wrote {SIZE} bytes")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn corrupt_truncated_or_mismatched_inputs_abort_naming_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let bmap = dir.path().join("x.bmap");
    let out = dir.path().join("card.img");
    // A flipped byte inside the 5 MiB range: the range's sha256 no longer matches.
    let bad = dir.path().join("bad.img");
    std::fs::copy(&img, &bad).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
    f.write_all_at(&[0x55], (6 << 20) + 17).unwrap();
    drop(f);
    let o = flash(&[
        "--bmap".as_ref(),
        bmap.as_os_str(),
        bad.as_os_str(),
        out.as_os_str(),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("bmap range blocks 1280-2047") && e.contains("does not match"),
        "{e}"
    );
    // A file target is written beside it and renamed when complete: after a failure there is
    // nothing, not a partial image (the loop-device test checks a device's first MiB).
    assert_nothing_left(dir.path(), &out);
    // A truncated image.
    let short = dir.path().join("short.img");
    std::fs::copy(&img, &short).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap()
        .set_len(6 << 20)
        .unwrap();
    let o = flash(&[
        "--bmap".as_ref(),
        bmap.as_os_str(),
        short.as_os_str(),
        out.as_os_str(),
    ]);
    assert!(!o.status.success());
    // Found before anything is written: the image is shorter than its map says.
    assert!(
        stderr(&o).contains("truncated image") && stderr(&o).contains("short.img"),
        "{}",
        stderr(&o)
    );
    assert_nothing_left(dir.path(), &out);
    // A corrupt .xz (bytes changed in the middle of the stream).
    let xz = dir.path().join("x.img.xz");
    let mut bytes = std::fs::read(&xz).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xa5;
    }
    let cxz = dir.path().join("c.img.xz");
    std::fs::write(&cxz, bytes).unwrap();
    let o = flash(&[
        "--bmap".as_ref(),
        bmap.as_os_str(),
        cxz.as_os_str(),
        out.as_os_str(),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("c.img.xz") && e.contains("bmap range blocks"),
        "{e}"
    );
    assert_nothing_left(dir.path(), &out);
    // A bmap with a wrong range checksum but a consistent file checksum (as a buggy tool
    // would write it): the range is named.
    let text = std::fs::read_to_string(&bmap).unwrap();
    let i = text.find("<Range chksum=\"").unwrap() + 15;
    let mut wrong = text.clone();
    wrong.replace_range(i..i + 1, if &text[i..i + 1] == "0" { "1" } else { "0" });
    let sum = wrong
        .split("<BmapFileChecksum>")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .trim()
        .to_owned();
    let zeroed = wrong.replacen(&sum, &"0".repeat(sum.len()), 1);
    use sha2::Digest;
    let fixed = zeroed.replacen(
        &"0".repeat(sum.len()),
        &hex::encode(sha2::Sha256::digest(zeroed.as_bytes())),
        1,
    );
    let wrong_bmap = dir.path().join("wrong.bmap");
    std::fs::write(&wrong_bmap, fixed).unwrap();
    let o = flash(&[
        "--bmap".as_ref(),
        wrong_bmap.as_os_str(),
        img.as_os_str(),
        out.as_os_str(),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("bmap range blocks 0-0") && e.contains("does not match"),
        "{e}"
    );
    // A bmap whose own checksum is wrong.
    let text = std::fs::read_to_string(&bmap).unwrap();
    let edited = dir.path().join("edited.bmap");
    std::fs::write(
        &edited,
        text.replacen("<Range chksum=\"", "<Range chksum=\"f", 1),
    )
    .unwrap();
    let o = flash(&[
        "--bmap".as_ref(),
        edited.as_os_str(),
        img.as_os_str(),
        out.as_os_str(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("own checksum"), "{}", stderr(&o));
}

/// `target` does not exist and no temporary file of a flash is left beside it.
fn assert_nothing_left(dir: &Path, target: &Path) {
    assert!(!target.exists(), "{} left behind", target.display());
    let temps: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".picoimg-"))
        .collect();
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
}

/// Targets that must not be written: the image itself by any path, an existing file without
/// --force, a device path that does not exist. Each is refused, and neither the image, its
/// map nor the target changes.
#[test]
fn refuses_targets_it_was_not_asked_to_destroy() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let bmap = dir.path().join("x.bmap");
    let xz = dir.path().join("x.img.xz");
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let hard = dir.path().join("hard.img");
    std::fs::hard_link(&img, &hard).unwrap();
    let precious = dir.path().join("precious.db");
    std::fs::write(&precious, "years of data\n").unwrap();
    let missing_dev = PathBuf::from("/dev/picoimg-test-no-such-disk");
    let cases: Vec<(&str, Vec<&std::ffi::OsStr>, &str)> = vec![
        (
            "the image onto itself",
            vec![img.as_os_str(), img.as_os_str()],
            "is the image",
        ),
        (
            "through a symlink",
            vec![img.as_os_str(), link.as_os_str()],
            "is the image",
        ),
        (
            "through a hard link",
            vec![img.as_os_str(), hard.as_os_str()],
            "is the image",
        ),
        (
            "onto its block map",
            vec![xz.as_os_str(), bmap.as_os_str()],
            "block map) itself",
        ),
        (
            "over an existing file without --force",
            vec![xz.as_os_str(), precious.as_os_str()],
            "pass --force",
        ),
        (
            "to a device path that does not exist",
            vec![xz.as_os_str(), missing_dev.as_os_str()],
            "no such device",
        ),
    ];
    let watched = [&img, &bmap, &xz, &precious];
    for (what, args, message) in cases {
        let before: Vec<String> = watched.iter().map(|p| common::sha256_of(p)).collect();
        let o = flash(&args);
        assert!(!o.status.success(), "{what}: succeeded");
        assert!(stderr(&o).contains(message), "{what}: {}", stderr(&o));
        let after: Vec<String> = watched.iter().map(|p| common::sha256_of(p)).collect();
        assert_eq!(before, after, "{what}: a file changed");
    }
    assert!(!missing_dev.exists(), "a file was created under /dev");
    // With --force, a failed write (corrupt image) leaves the old file as it was.
    let bad = dir.path().join("bad.img.xz");
    let mut bytes = std::fs::read(&xz).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&bad, bytes).unwrap();
    let before = common::sha256_of(&precious);
    let o = flash(&[
        "--force".as_ref(),
        "--bmap".as_ref(),
        bmap.as_os_str(),
        bad.as_os_str(),
        precious.as_os_str(),
    ]);
    assert!(!o.status.success());
    assert_eq!(
        common::sha256_of(&precious),
        before,
        "the old file was damaged"
    );
    // And a good one replaces it, whole.
    let o = flash(&["--force".as_ref(), xz.as_os_str(), precious.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(same(&img, &precious));
}

/// Re-signs an edited bmap (as a buggy tool would write it), so checks past the file's own
/// checksum are reached.
fn sign(text: &str) -> String {
    use sha2::Digest;
    let sum = tag(text, "BmapFileChecksum").trim().to_owned();
    let zeroed = text.replacen(&sum, &"0".repeat(64), 1);
    zeroed.replacen(
        &"0".repeat(64),
        &hex::encode(sha2::Sha256::digest(zeroed.as_bytes())),
        1,
    )
}

/// The text of element `name` (bmaptool's comments mention the tags too: the element is the
/// occurrence followed by its closing tag).
fn tag(t: &str, name: &str) -> String {
    t.split(&format!("<{name}>"))
        .skip(1)
        .find(|rest| {
            rest.split_once('<')
                .is_some_and(|(_, after)| after.starts_with(&format!("/{name}>")))
        })
        .and_then(|rest| rest.split('<').next())
        .unwrap()
        .to_owned()
}

fn set(t: &str, name: &str, v: &str) -> String {
    t.replacen(
        &format!("<{name}>{}</{name}>", tag(t, name)),
        &format!("<{name}> {v} </{name}>"),
        1,
    )
}

fn block_map(t: &str, body: &str) -> String {
    let a = t.find("<BlockMap>").unwrap() + "<BlockMap>".len();
    let b = t.find("</BlockMap>").unwrap();
    format!("{}{body}{}", &t[..a], &t[b..])
}

/// Damaged, hostile or mismatched block maps are refused before the target exists, as
/// bmaptool refuses them.
#[test]
fn refuses_bad_block_maps_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let good = std::fs::read_to_string(dir.path().join("x.bmap")).unwrap();
    let no_sum = {
        let a = good.find("<BmapFileChecksum>").unwrap();
        let b = good.find("</BmapFileChecksum>").unwrap() + "</BmapFileChecksum>".len();
        format!("{}{}", &good[..a], &good[b..])
    };
    let sha = "0".repeat(64);
    let huge =
        format!("<Range chksum=\"{sha}\"> 18446744073709551614-18446744073709551615 </Range>");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "block size 0",
            sign(&set(&good, "BlockSize", "0")),
            "power of two",
        ),
        (
            "block size 3",
            sign(&set(&good, "BlockSize", "3")),
            "power of two",
        ),
        (
            "blocks near 2^64",
            sign(&block_map(&good, &huge)),
            "past <BlocksCount>",
        ),
        (
            "image size smaller than the ranges",
            sign(&set(&set(&good, "ImageSize", "4096"), "BlocksCount", "1")),
            "past <BlocksCount>",
        ),
        (
            "BlocksCount inconsistent with ImageSize",
            sign(&set(&good, "BlocksCount", "7")),
            "does not match <ImageSize>",
        ),
        (
            "MappedBlocksCount not the ranges' sum",
            sign(&set(&good, "MappedBlocksCount", "3")),
            "does not match the ranges",
        ),
        (
            "an empty block map",
            sign(&set(&block_map(&good, ""), "MappedBlocksCount", "0")),
            "maps no blocks",
        ),
        (
            "no own checksum",
            no_sum,
            "requires the bmap's own checksum",
        ),
        (
            "not XML",
            "<bmap version=\"2.0\"><ImageSize>".to_owned(),
            "not well-formed",
        ),
        (
            "format 1.4",
            good.replace("version=\"2.0\"", "version=\"1.4\""),
            "not supported",
        ),
    ];
    let out = dir.path().join("card.img");
    for (what, text, message) in cases {
        let m = dir.path().join("case.bmap");
        std::fs::write(&m, &text).unwrap();
        let before = common::sha256_of(&img);
        let o = flash(&[
            "--bmap".as_ref(),
            m.as_os_str(),
            img.as_os_str(),
            out.as_os_str(),
        ]);
        assert!(!o.status.success(), "{what}: succeeded");
        assert!(stderr(&o).contains(message), "{what}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{what}: {}", stderr(&o));
        assert_nothing_left(dir.path(), &out);
        assert_eq!(common::sha256_of(&img), before, "{what}: the image changed");
    }
}

// Loop devices need root: this part is in the root tier (feature image-tests, which
// ci/test.sh runs as root), so plain `cargo test` passes as a normal user.

#[cfg(feature = "image-tests")]
fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[cfg(feature = "image-tests")]
struct Loop(String);

#[cfg(feature = "image-tests")]
impl Loop {
    fn new(file: &Path) -> Loop {
        Loop(
            ok(Command::new("losetup").args(["-f", "--show"]).arg(file))
                .trim()
                .to_owned(),
        )
    }
}

#[cfg(feature = "image-tests")]
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[cfg(feature = "image-tests")]
#[test]
fn flashes_a_loop_device_and_refuses_unsafe_targets() {
    assert!(
        is_root(),
        "loop devices need root (ci/test.sh runs as root)"
    );
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let disk = dir.path().join("disk");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    let dev = Loop::new(&disk);
    let devp = Path::new(&dev.0);
    // Loop devices are not removable: refused without --force, and without --yes off a TTY.
    let o = flash(&[img.as_os_str(), devp.as_os_str()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not a removable device") && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    let o = flash(&["--force".as_ref(), img.as_os_str(), devp.as_os_str()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("pass --yes"), "{}", stderr(&o));
    let o = flash(&[
        "--force".as_ref(),
        "--yes".as_ref(),
        dir.path().join("x.img.xz").as_os_str(),
        devp.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The device's first 32 MiB are the image.
    let back = dir.path().join("back.img");
    ok(Command::new("dd")
        .arg(format!("if={}", dev.0))
        .arg(format!("of={}", back.display()))
        .args(["bs=1M", "count=32", "status=none"]));
    assert!(same(&img, &back));
    // Too small a device.
    let small = dir.path().join("small");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let sdev = Loop::new(&small);
    let o = flash(&[
        "--force".as_ref(),
        "--yes".as_ref(),
        img.as_os_str(),
        sdev.0.as_ref(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("less than the image"), "{}", stderr(&o));
    // A mounted device (ext4: this host's kernel may lack vfat).
    let fat = dir.path().join("fat");
    std::fs::File::create(&fat)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    ok(Command::new("/usr/sbin/mkfs.ext4").arg("-q").arg(&fat));
    let fdev = Loop::new(&fat);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    ok(Command::new("mount").arg(&fdev.0).arg(&mnt));
    let o = flash(&[
        "--force".as_ref(),
        "--yes".as_ref(),
        img.as_os_str(),
        fdev.0.as_ref(),
    ]);
    let _ = Command::new("umount").arg(&mnt).status();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is mounted"), "{}", stderr(&o));
    // A failed write to a device leaves its first MiB unwritten: it does not look bootable.
    let blank = dir.path().join("blank");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    let bdev = Loop::new(&blank);
    let bad = dir.path().join("bad.img");
    std::fs::copy(&img, &bad).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
    f.write_all_at(&[0x55], (6 << 20) + 17).unwrap();
    drop(f);
    let o = flash(&[
        "--force".as_ref(),
        "--yes".as_ref(),
        "--bmap".as_ref(),
        dir.path().join("x.bmap").as_os_str(),
        bad.as_os_str(),
        bdev.0.as_ref(),
    ]);
    assert!(!o.status.success());
    let mut head = vec![0u8; 1 << 20];
    std::fs::File::open(&bdev.0)
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert!(
        head.iter().all(|b| *b == 0),
        "first MiB written before the failure"
    );
    // A loop device backed by the image itself.
    let before = common::sha256_of(&img);
    let idev = Loop::new(&img);
    let o = flash(&[
        "--force".as_ref(),
        "--yes".as_ref(),
        img.as_os_str(),
        idev.0.as_ref(),
    ]);
    drop(idev);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("backed by the image itself"),
        "{}",
        stderr(&o)
    );
    assert_eq!(common::sha256_of(&img), before);
}
