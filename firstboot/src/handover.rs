//! The handover channel: how a node hands join material that a cluster tool minted at run time
//! (a Swarm manager's join tokens, an Incus member's token for one joiner) to another node of
//! the same cluster file, with no human and no coordinator.
//!
//! Every node that can mint such material runs `picoimg-firstboot serve`
//! (picoimg-handover.service) on TCP port [`PORT`]. A node that needs it sends one line, a
//! request sealed with ChaCha20-Poly1305 under a key derived from the cluster secret (HKDF
//! label [`KEY_LABEL`]), naming the stack, itself, what it asks, and a fresh random challenge.
//! The server opens it (a request that does not authenticate is dropped unanswered), lets the
//! stack answer, and sends one sealed line back, bound to the asking node's name and carrying
//! the challenge, so an answer cannot be read without the secret, forged, or replayed to
//! another request. The threat model is in ARCHITECTURE.md ("The handover channel").

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use serde::{Deserialize, Serialize};

/// The channel's TCP port on every node that serves it.
pub const PORT: u16 = 7441;
/// HKDF label of the channel's key: part of the on-disk contract.
pub const KEY_LABEL: &str = "picoimg/v1/handover";
/// The longest line either side reads.
pub const LINE_LIMIT: usize = 64 * 1024;
/// How many answered challenges the server remembers.
const SEEN_LIMIT: usize = 4096;
/// How long one exchange may take: minting an Incus token on a busy board takes seconds.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// One sealed line: version, nonce and ciphertext (base64).
#[derive(Serialize, Deserialize)]
struct Sealed {
    v: u32,
    n: String,
    c: String,
}

/// What a node asks for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Request {
    /// The stack that answers (`Stack::name`).
    pub stack: String,
    /// The asking node's name in the cluster file.
    pub from: String,
    /// What it asks for (the stack's own word).
    pub ask: String,
    challenge: String,
}

#[derive(Serialize, Deserialize)]
struct Reply {
    challenge: String,
    ok: Option<String>,
    err: Option<String>,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn request_aad(cluster_id: &str) -> String {
    format!("picoimg handover request v1 {cluster_id}")
}

fn reply_aad(cluster_id: &str, from: &str) -> String {
    format!("picoimg handover reply v1 {cluster_id} {from}")
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness from the kernel: {e}"))?;
    Ok(b)
}

/// Seals `plain` under `key` with `aad`: one JSON line.
fn seal(key: &[u8; 32], aad: &str, plain: &[u8]) -> Result<Vec<u8>> {
    let nonce = random::<12>()?;
    let c = ChaCha20Poly1305::new(Key::from_slice(key))
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plain,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| anyhow::anyhow!("sealing failed"))?;
    let mut line = serde_json::to_vec(&Sealed {
        v: 1,
        n: b64().encode(nonce),
        c: b64().encode(c),
    })?;
    line.push(b'\n');
    Ok(line)
}

/// Opens a line sealed by [`seal`]; an error if it was not sealed under `key` with `aad`.
fn open(key: &[u8; 32], aad: &str, line: &[u8]) -> Result<Vec<u8>> {
    let s: Sealed = serde_json::from_slice(line).context("not a handover line")?;
    if s.v != 1 {
        bail!("handover version {} (this agent speaks 1)", s.v);
    }
    let nonce = b64().decode(&s.n).context("bad nonce")?;
    if nonce.len() != 12 {
        bail!("bad nonce length");
    }
    let c = b64().decode(&s.c).context("bad ciphertext")?;
    ChaCha20Poly1305::new(Key::from_slice(key))
        .decrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &c,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| anyhow::anyhow!("it does not authenticate with this cluster's key"))
}

/// The asking side: a sealed request and what opens its answer.
pub struct Asking {
    pub line: Vec<u8>,
    challenge: String,
    aad: String,
}

impl Asking {
    pub fn new(
        key: &[u8; 32],
        cluster_id: &str,
        stack: &str,
        from: &str,
        ask: &str,
    ) -> Result<Self> {
        let challenge = b64().encode(random::<16>()?);
        let req = Request {
            stack: stack.to_owned(),
            from: from.to_owned(),
            ask: ask.to_owned(),
            challenge: challenge.clone(),
        };
        Ok(Asking {
            line: seal(key, &request_aad(cluster_id), &serde_json::to_vec(&req)?)?,
            challenge,
            aad: reply_aad(cluster_id, from),
        })
    }

    /// The answer in `line`: `Ok(Ok(value))`, or `Ok(Err(reason))` the other node gave.
    pub fn answer(&self, key: &[u8; 32], line: &[u8]) -> Result<Result<String, String>> {
        let plain = open(key, &self.aad, line).context("the answer is not from this cluster")?;
        let r: Reply = serde_json::from_slice(&plain).context("unreadable answer")?;
        if r.challenge != self.challenge {
            bail!("the answer is for another request (a replay?)");
        }
        Ok(match (r.ok, r.err) {
            (Some(v), _) => Ok(v),
            (None, Some(e)) => Err(e),
            (None, None) => Err("an empty answer".into()),
        })
    }
}

/// Asks node `host` through `sys` (the agent's System): see [`Asking`].
pub fn ask(
    sys: &dyn crate::agent::System,
    key: &[u8; 32],
    cluster_id: &str,
    stack: &str,
    from: &str,
    what: &str,
    host: &str,
) -> Result<Result<String, String>> {
    let a = Asking::new(key, cluster_id, stack, from, what)?;
    let back = sys.exchange(host, PORT, &a.line, TIMEOUT)?;
    a.answer(key, &back)
}

/// The serving side of one exchange: opens the request (an error: it does not come from this
/// cluster, and gets no answer), lets `handle` answer it, seals the reply for the asker.
pub fn answer(
    key: &[u8; 32],
    cluster_id: &str,
    line: &[u8],
    handle: impl FnOnce(&Request) -> Result<String>,
) -> Result<(Request, Vec<u8>, std::result::Result<(), String>)> {
    let plain = open(key, &request_aad(cluster_id), line)?;
    let req: Request = serde_json::from_slice(&plain).context("unreadable request")?;
    let (ok, err) = match handle(&req) {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let outcome = match &err {
        Some(e) => Err(e.clone()),
        None => Ok(()),
    };
    let reply = Reply {
        challenge: req.challenge.clone(),
        ok,
        err,
    };
    let line = seal(
        key,
        &reply_aad(cluster_id, &req.from),
        &serde_json::to_vec(&reply)?,
    )?;
    Ok((req, line, outcome))
}

/// Reads one line of at most [`LINE_LIMIT`] bytes (without its newline).
fn read_line(s: &TcpStream) -> Result<Vec<u8>> {
    let mut r = BufReader::new(s.take(LINE_LIMIT as u64 + 1));
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line).context("reading a line")?;
    if line.last() != Some(&b'\n') {
        bail!("no complete line within {LINE_LIMIT} bytes");
    }
    line.pop();
    Ok(line)
}

/// The client's transport: one line to `host:port`, one line back.
pub fn exchange(host: &str, port: u16, line: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    let ip: IpAddr = host
        .parse()
        .with_context(|| format!("{host} is not an IP address"))?;
    let mut s = TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(5))
        .with_context(|| format!("connecting to {host}:{port}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(line)
        .with_context(|| format!("sending to {host}:{port}"))?;
    read_line(&s).with_context(|| format!("reading the answer of {host}:{port}"))
}

/// Serves the channel on `listener`, one connection at a time (each bounded by [`TIMEOUT`]),
/// until the process ends. `log` gets one line per request, naming the asker and the outcome,
/// never the answer.
pub fn serve(
    listener: &TcpListener,
    key: &[u8; 32],
    cluster_id: &str,
    mut handle: impl FnMut(&Request) -> Result<String>,
    mut log: impl FnMut(String),
) {
    // Challenges answered since the server started (the newest SEEN_LIMIT): a recorded
    // request sent again is refused.
    let mut seen = std::collections::VecDeque::new();
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        let peer = s
            .peer_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.ip().to_string());
        let _ = s.set_read_timeout(Some(TIMEOUT));
        let _ = s.set_write_timeout(Some(TIMEOUT));
        let line = match read_line(&s) {
            Ok(l) => l,
            Err(e) => {
                log(format!("picoimg: handover: {peer}: {e:#}"));
                continue;
            }
        };
        let fresh = |req: &Request| -> Result<String> {
            if seen.contains(&req.challenge) {
                bail!("a repeated request (a replay?)");
            }
            if seen.len() == SEEN_LIMIT {
                seen.pop_front();
            }
            seen.push_back(req.challenge.clone());
            handle(req)
        };
        match answer(key, cluster_id, &line, fresh) {
            Ok((req, reply, outcome)) => {
                let _ = s.write_all(&reply);
                log(format!(
                    "picoimg: handover: {} ({peer}) asked {} for {}: {}",
                    req.from,
                    req.stack,
                    req.ask,
                    match outcome {
                        Ok(()) => "answered".to_owned(),
                        Err(e) => format!("told: {e}"),
                    }
                ));
            }
            Err(e) => log(format!("picoimg: handover: {peer}: request dropped: {e:#}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    #[test]
    fn an_answer_reaches_only_its_asker_of_this_cluster() {
        let a = Asking::new(&KEY, "c1", "swarm", "pc2", "tokens").unwrap();
        let (req, reply, outcome) = answer(&KEY, "c1", &a.line[..a.line.len() - 1], |r| {
            assert_eq!(
                (r.stack.as_str(), r.from.as_str(), r.ask.as_str()),
                ("swarm", "pc2", "tokens")
            );
            Ok("the token".into())
        })
        .unwrap();
        assert_eq!(req.from, "pc2");
        assert_eq!(outcome, Ok(()));
        let reply = &reply[..reply.len() - 1];
        assert_eq!(a.answer(&KEY, reply).unwrap(), Ok("the token".into()));
        // Neither side's line shows the token or the asker in the clear.
        assert!(!String::from_utf8_lossy(reply).contains("token"));
        // Another request's answer (the same asker) is refused: a replay.
        let b = Asking::new(&KEY, "c1", "swarm", "pc2", "tokens").unwrap();
        assert!(format!("{:#}", b.answer(&KEY, reply).unwrap_err()).contains("another request"));
        // Another key, or another cluster id, cannot open either line.
        assert!(answer(&[8; 32], "c1", &a.line[..a.line.len() - 1], |_| Ok(
            String::new()
        ))
        .is_err());
        assert!(answer(&KEY, "c2", &a.line[..a.line.len() - 1], |_| Ok(
            String::new()
        ))
        .is_err());
        assert!(a.answer(&[8; 32], reply).is_err());
        // An answer meant for pc2 is not accepted by pc3's request (bound to the asker).
        let c = Asking::new(&KEY, "c1", "swarm", "pc3", "tokens").unwrap();
        assert!(c.answer(&KEY, reply).is_err());
        // A flipped bit in the ciphertext fails authentication.
        let mut s: serde_json::Value = serde_json::from_slice(reply).unwrap();
        let mut ct = b64().decode(s["c"].as_str().unwrap()).unwrap();
        ct[0] ^= 1;
        s["c"] = b64().encode(ct).into();
        assert!(a.answer(&KEY, &serde_json::to_vec(&s).unwrap()).is_err());
    }

    #[test]
    fn a_refusal_travels_as_a_reason() {
        let a = Asking::new(&KEY, "c1", "incus", "pc1", "join").unwrap();
        let (_, reply, outcome) = answer(&KEY, "c1", &a.line[..a.line.len() - 1], |_| {
            bail!("no cluster here yet")
        })
        .unwrap();
        assert_eq!(outcome, Err("no cluster here yet".into()));
        assert_eq!(
            a.answer(&KEY, &reply[..reply.len() - 1]).unwrap(),
            Err("no cluster here yet".into())
        );
    }

    /// Over a real socket on 127.0.0.1: the server answers, and a line over the limit is
    /// refused without an answer.
    #[test]
    fn the_transport_carries_one_line_each_way() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            serve(&l, &KEY, "c1", |r| Ok(format!("hello {}", r.from)), |_| {});
        });
        let a = Asking::new(&KEY, "c1", "swarm", "pc1", "tokens").unwrap();
        let back = exchange("127.0.0.1", port, &a.line, Duration::from_secs(10)).unwrap();
        assert_eq!(a.answer(&KEY, &back).unwrap(), Ok("hello pc1".into()));
        // The same request again (a replay): told so, not answered.
        let back = exchange("127.0.0.1", port, &a.line, Duration::from_secs(10)).unwrap();
        assert_eq!(
            a.answer(&KEY, &back).unwrap(),
            Err("a repeated request (a replay?)".into())
        );
        let big = vec![b'x'; LINE_LIMIT + 10];
        assert!(exchange("127.0.0.1", port, &big, Duration::from_secs(10)).is_err());
    }
}
