//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::time::Duration;

/// Serves `body` over HTTP on 127.0.0.1 (any path) for at most `max` requests, standing in for
/// a vendor download site or a mirror. Returns a URL ending in `/u-boot.bin.signed`.
pub fn serve(body: Vec<u8>, max: usize) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max) {
            let Ok(mut s) = stream else { continue };
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let mut req = [0u8; 4096];
            let _ = s.read(&mut req);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    format!("http://{addr}/u-boot.bin.signed")
}

/// A copy of the repository's boards/ and overlays/ in a temporary directory (a `--data-dir`).
pub fn data_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(repo.join("boards"))
        .arg(repo.join("overlays"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    dir
}

/// Points the c5 board of a data copy at a blob served from `url`, pinned to `sha256`.
pub fn c5_blob_from(data: &std::path::Path, url: &str, sha256: &str) {
    let p = data.join("boards/c5.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    let start = text.find("url = ").unwrap();
    let end = text[start..].find("\n[qemu]").unwrap() + start;
    let text = format!(
        "{}url = \"{url}\"\nsha256 = \"{sha256}\"\n{}",
        &text[..start],
        &text[end..]
    );
    std::fs::write(&p, text).unwrap();
}

/// sha256 of a file's contents, hex (to show a file did not change).
pub fn sha256_of(p: &std::path::Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

/// Writes a measurement (a build's or a boot's time, what a node reports) straight to the test
/// process's stderr, past the test harness's capture of `eprintln!`, so a passing run's log
/// keeps it as a `measured: ...` line.
pub fn measured(line: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr().lock(), "measured: {line}");
}
