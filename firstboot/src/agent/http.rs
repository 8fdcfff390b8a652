//! A minimal HTTP/1.1 client for the node's own services on 127.0.0.1 (plain HTTP, one
//! request per connection): what the stacks use where a secret must not go on a command line
//! (a request body or header is read by nobody but the service).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// One request to a service on this node.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub method: &'a str,
    pub port: u16,
    pub path: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
    pub body: &'a str,
}

impl std::fmt::Display for Request<'_> {
    /// Method and URL only: headers and body may hold secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} http://127.0.0.1:{}{}",
            self.method, self.port, self.path
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// Largest reply read.
const LIMIT: u64 = 4 << 20;

/// Sends `req` to 127.0.0.1 and reads the whole reply (bounded in size and time).
pub fn send(req: &Request<'_>) -> Result<Reply> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, req.port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("{req}: connecting"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Length: {}\r\n",
        req.method,
        req.path,
        req.port,
        req.body.len()
    );
    for (k, v) in &req.headers {
        if [k, v].iter().any(|x| x.contains(['\r', '\n'])) {
            bail!("{req}: a header with a line break");
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !req.body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(req.body.as_bytes()))
        .with_context(|| format!("{req}: sending"))?;
    let mut raw = Vec::new();
    s.take(LIMIT)
        .read_to_end(&mut raw)
        .with_context(|| format!("{req}: reading the reply"))?;
    parse(&raw).with_context(|| format!("{req}: reading the reply"))
}

/// Parses a complete HTTP/1.1 response (Content-Length, chunked, or to the end).
pub fn parse(raw: &[u8]) -> Result<Reply> {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("no end of headers");
    };
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP status line: {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = v.parse::<usize>().ok();
        }
    }
    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else {
        match length {
            Some(n) if n <= rest.len() => rest[..n].to_vec(),
            Some(n) => bail!("body cut short: {} of {n} bytes", rest.len()),
            None => rest.to_vec(),
        }
    };
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            bail!("chunk size line without its end");
        };
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            bail!("chunk cut short");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_chunked_and_close_delimited_replies() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "hello"));
        let r = parse(
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nACL b\r\n10\r\nootstrap already\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.status, 400);
        assert_eq!(r.body, "ACL bootstrap already");
        let r = parse(b"HTTP/1.0 500 Internal Server Error\r\n\r\nNo cluster leader").unwrap();
        assert_eq!((r.status, r.body.as_str()), (500, "No cluster leader"));
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert!(parse(b"garbage").is_err());
    }

    /// A real round trip against a listener on 127.0.0.1: what was sent arrives, headers and
    /// body included, and the reply is read.
    #[test]
    fn round_trip_on_loopback() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.ends_with(b"{\"a\":1}") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let r = send(&Request {
            method: "PUT",
            port,
            path: "/v1/x",
            headers: vec![("X-Token", "t0k")],
            body: "{\"a\":1}",
        })
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        let sent = server.join().unwrap();
        assert!(sent.starts_with("PUT /v1/x HTTP/1.1\r\n"), "{sent}");
        assert!(sent.contains("\r\nX-Token: t0k\r\n") && sent.contains("Content-Length: 7"));
    }
}
