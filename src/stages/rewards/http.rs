//! `--reward http://HOST:PORT/PATH`: each batch is POSTed as a JSON array of requests (the
//! same objects a `cmd:` process reads) and answered with a JSON array of
//! `{"reward": number}`, in order. A connection that fails or times out is retried, at most
//! `max_restarts` times in a run; an answer that is not a reward stops the run at once.
//! Plain HTTP/1.1 over a socket, which is all a verifier on this machine needs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::{clip, parse_reply, External};
use crate::config::ExternalRewardConfig;

pub struct HttpReward {
    url: String,
    host: String,
    path: String,
    /// Every address the host resolves to, tried in turn as curl tries them: `localhost` may
    /// give `::1` first, where a server listens on 127.0.0.1 alone.
    addrs: Vec<SocketAddr>,
    timeout: Duration,
    max_restarts: usize,
    retries: usize,
}

/// Why a batch failed.
enum Failure {
    /// The connection failed or timed out: worth a retry.
    Lost(anyhow::Error),
    /// The server answered something that is not a batch of rewards.
    Garbage(anyhow::Error),
}

impl HttpReward {
    pub fn new(url: &str, cfg: &ExternalRewardConfig) -> Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url}: not an http:// URL"))?;
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let with_port = if host.contains(':') {
            host.to_string()
        } else {
            format!("{host}:80")
        };
        let addrs: Vec<SocketAddr> = with_port
            .to_socket_addrs()
            .with_context(|| format!("{url}: cannot resolve {host}"))?
            .collect();
        if addrs.is_empty() {
            bail!("{url}: {host} has no address");
        }
        Ok(Self {
            url: url.to_string(),
            host: host.to_string(),
            path: path.to_string(),
            addrs,
            timeout: Duration::from_secs_f64(cfg.timeout_s),
            max_restarts: cfg.max_restarts,
            retries: 0,
        })
    }

    fn try_batch(&self, requests: &[Value]) -> std::result::Result<Vec<f64>, Failure> {
        let body = Value::from(requests.to_vec()).to_string();
        let (status, reply) = self.post(&body).map_err(Failure::Lost)?;
        if status != 200 {
            let e = anyhow!("HTTP {status}: {}", clip(&String::from_utf8_lossy(&reply)));
            // Overloaded or failing servers may recover; a 4xx other than 429 will not.
            return Err(if status >= 500 || status == 429 {
                Failure::Lost(e)
            } else {
                Failure::Garbage(e)
            });
        }
        let text = String::from_utf8_lossy(&reply);
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            Failure::Garbage(anyhow!("the reply is not JSON ({e}): {}", clip(&text)))
        })?;
        let Some(items) = v.as_array() else {
            return Err(Failure::Garbage(anyhow!(
                "expected a JSON array of {{\"reward\": number}}, got {}",
                clip(&text)
            )));
        };
        if items.len() != requests.len() {
            return Err(Failure::Garbage(anyhow!(
                "{} rewards for {} requests",
                items.len(),
                requests.len()
            )));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, r)| parse_reply(r, &format!("reply {} of {}", i + 1, items.len())))
            .collect::<Result<_>>()
            .map_err(Failure::Garbage)
    }

    /// A connection to the first of the host's addresses that takes one; else the last one's
    /// error, naming every address tried.
    fn connect(&self) -> Result<TcpStream> {
        let mut last = None;
        for addr in &self.addrs {
            match TcpStream::connect_timeout(addr, self.timeout) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        let tried: Vec<String> = self.addrs.iter().map(|a| a.to_string()).collect();
        Err(anyhow!(
            "cannot connect to {}: {}",
            tried.join(" or "),
            last.map_or_else(String::new, |e| e.to_string())
        ))
    }

    /// POSTs `body` and returns the status code and the response body.
    fn post(&self, body: &str) -> Result<(u16, Vec<u8>)> {
        let mut s = self.connect()?;
        s.set_write_timeout(Some(self.timeout))?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.path,
            self.host,
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(body.as_bytes())?;
        read_reply(&mut s, Instant::now() + self.timeout)
    }
}

/// Reads a response until it is complete (its Content-Length, its last chunk, or the end of
/// the stream), within `deadline` overall: a server that trickles bytes times out too.
fn read_reply(s: &mut TcpStream, deadline: Instant) -> Result<(u16, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Ok(reply) = parse_response(&raw) {
            if complete(&raw) {
                return Ok(reply);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no complete reply within the timeout");
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => return parse_response(&raw),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => return Err(e).context("no complete reply within the timeout"),
        }
    }
}

/// Whether `raw` holds a whole response by its own framing (Content-Length or chunked).
fn complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = &raw[end + 4..];
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    head.split("\r\n")
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|n| body.len() >= n)
}

/// Status code and body of a raw HTTP/1.x response (Content-Length, chunked, or to EOF).
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>)> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the reply has no HTTP header")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let body = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .context("the reply has no HTTP status line")?;
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        return Ok((status, dechunk(body)?));
    }
    if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        if body.len() < n {
            bail!("the reply ended after {} of {n} bytes", body.len());
        }
        return Ok((status, body[..n].to_vec()));
    }
    Ok((status, body.to_vec()))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("a chunk has no size line")?;
        let size_text = String::from_utf8_lossy(&body[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            bail!("a chunk ends early");
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or(&[]);
    }
}

impl External for HttpReward {
    fn score(&mut self, requests: &[Value]) -> Result<Vec<f64>> {
        loop {
            match self.try_batch(requests) {
                Ok(v) => return Ok(v),
                Err(Failure::Garbage(e)) => {
                    return Err(e.context(format!("{} answered garbage", self.url)))
                }
                Err(Failure::Lost(e)) => {
                    if self.retries >= self.max_restarts {
                        return Err(e.context(format!(
                            "{}: gave up after {} retries ([external_reward] max_restarts)",
                            self.url, self.retries
                        )));
                    }
                    self.retries += 1;
                    errln!(
                        "warning: reward {}: {e:#}; retrying ({} of {})",
                        self.url,
                        self.retries,
                        self.max_restarts
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_with_length_chunks_or_eof() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n[1,2]xx";
        assert_eq!(parse_response(r).unwrap(), (200, b"[1,2]".to_vec()));
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        assert_eq!(parse_response(r).unwrap(), (200, b"[1,2]".to_vec()));
        let r = b"HTTP/1.0 503 Busy\r\n\r\nlater";
        assert_eq!(parse_response(r).unwrap(), (503, b"later".to_vec()));
        assert!(parse_response(b"garbage").is_err());
    }
}
