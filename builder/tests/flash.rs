//! `picoimg flash` against regular files and loop devices, with block maps made by bmaptool
//! (interoperability) and results compared with cmp. Loop-device cases need root (CI is root).
#![allow(clippy::unwrap_used)]

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
    // Nothing of the first MiB was written: the target does not look bootable.
    let head = std::fs::read(&out).unwrap();
    assert!(
        head[..4096].iter().all(|b| *b == 0),
        "first block written before the failure"
    );
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
    assert!(
        stderr(&o).contains("truncated image")
            && stderr(&o).contains("bmap range blocks 1280-2047"),
        "{}",
        stderr(&o)
    );
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

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

struct Loop(String);

impl Loop {
    fn new(file: &Path) -> Loop {
        Loop(
            ok(Command::new("losetup").args(["-f", "--show"]).arg(file))
                .trim()
                .to_owned(),
        )
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

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
    // The device that holds / (this machine's system disk).
    let root = root_disk().expect("/ is on a block device here");
    let o = flash(&[
        "--force".as_ref(),
        "--yes".as_ref(),
        img.as_os_str(),
        root.as_os_str(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("holds the running system's root filesystem"),
        "{}",
        stderr(&o)
    );
}

/// /dev/<disk> holding the root filesystem.
fn root_disk() -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata("/").ok()?.dev();
    let (maj, min) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{maj}:{min}")).ok()?;
    let disk = if sys.join("partition").exists() {
        sys.parent()?.to_owned()
    } else {
        sys
    };
    Some(PathBuf::from("/dev").join(disk.file_name()?))
}
