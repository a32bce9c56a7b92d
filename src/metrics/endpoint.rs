//! The metrics endpoint: `GET /metrics` (and a one-line index at `/`) over plain HTTP, answered
//! from its own thread with the exposition the last cycle published.
//!
//! It is built to be harmless on a hypervisor host, and for no crowd of clients to blind a
//! scraper: requests are parsed by `httparse` into a fixed 8 KiB buffer (anything larger is
//! refused); each connection is served on a thread of its own (a small stack), at most
//! [`MAX_CONNECTIONS`] at once (one more is answered 503 at once and closed); a connection that
//! has not sent its request within 2 s or does not read its answer within 5 s is dropped. So idle,
//! slow or half-open clients delay no scrape and no cycle, and bound the daemon's memory. Every
//! answer closes its connection. (Measured before: one connection at a time, a scrape beside 8
//! idle connections took 16.4 s.) With a [`WebConfig`] it serves HTTPS and asks for basic
//! authentication, as the file says.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::WebConfig;

/// Largest request accepted, headers included.
const MAX_REQUEST: usize = 8 * 1024;
/// Most headers a request may have.
const MAX_HEADERS: usize = 32;
/// Time a connection gets to send its request (a scraper sends it at once).
const REQUEST_TIME_LIMIT: Duration = Duration::from_secs(2);
/// Time a connection gets to read its answer.
const ANSWER_TIME_LIMIT: Duration = Duration::from_secs(5);
/// Longest a single read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Stack of each connection's thread: it parses into a fixed buffer and copies a page pointer.
const CONNECTION_STACK: usize = 64 * 1024;
/// Stack of a connection's thread over TLS or with basic authentication: a handshake and a
/// bcrypt check need more (64 KiB overflowed). Only the pages touched are resident.
const SECURE_CONNECTION_STACK: usize = 512 * 1024;

/// A listen address as exporters take it: `HOST:PORT`, `[IPv6]:PORT`, a host name with its port
/// (`localhost:9841`), or `:PORT` for every interface.
pub fn parse_listen_address(text: &str) -> Result<SocketAddr, String> {
    if let Some(port) = text.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("'{text}': the port must be a number from 0 to 65535"))?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Ok(address) = text.parse() {
        return Ok(address);
    }
    if text
        .rsplit_once(':')
        .is_none_or(|(_, port)| port.parse::<u16>().is_err())
    {
        return Err(format!(
            "'{text}' is not HOST:PORT (e.g. 127.0.0.1:9841, localhost:9841, [::1]:9841 or :9841)"
        ));
    }
    let mut found = text
        .to_socket_addrs()
        .map_err(|e| format!("'{text}': {e}"))?;
    found
        .next()
        .ok_or_else(|| format!("'{text}' names no address"))
}

/// What the endpoint serves: the last exposition published.
type Page = Arc<Mutex<Arc<str>>>;

/// A listening metrics endpoint.
pub struct Endpoint {
    address: SocketAddr,
    page: Page,
    https: bool,
}

impl Endpoint {
    /// Listen on `address` and serve from a thread of its own until the process ends, with TLS
    /// and authentication as `web` says.
    pub fn start(address: SocketAddr, web: Option<Arc<WebConfig>>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(address).with_context(|| {
            format!("cannot listen on {address} for metrics (is the port taken, or the address not this host's?)")
        })?;
        let address = listener
            .local_addr()
            .context("reading the metrics address")?;
        let web = web.unwrap_or_else(|| Arc::new(WebConfig::none()));
        if !address.ip().is_loopback() {
            log::warn!(
                "metrics are served on {address}, which other hosts may reach: the page names every domain, its UUID and its figures; bind to 127.0.0.1 unless scrapers elsewhere need it, and firewall the port{}",
                if web.tls().is_none() || !web.asks_for_credentials() {
                    " (or give --web-config-file for TLS and basic authentication)"
                } else {
                    ""
                }
            );
        }
        let https = web.tls().is_some();
        let page: Page = Arc::new(Mutex::new(Arc::from("")));
        let served = page.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&listener, &served, &web))
            .context("starting the metrics thread")?;
        Ok(Self {
            address,
            page,
            https,
        })
    }

    /// The URL of the metrics page.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}/metrics", self.address)
    }

    /// Where it listens (with the port the system chose, for port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serve `text` from now on.
    pub fn publish(&self, text: String) {
        let text: Arc<str> = Arc::from(text);
        *self.page.lock().unwrap_or_else(|e| e.into_inner()) = text;
    }
}

/// Answer each connection on a thread of its own, at most [`MAX_CONNECTIONS`] at once, for ever.
fn serve(listener: &TcpListener, page: &Page, web: &Arc<WebConfig>) {
    let open = Arc::new(AtomicUsize::new(0));
    let stack = if web.tls().is_some() || web.asks_for_credentials() {
        SECURE_CONNECTION_STACK
    } else {
        CONNECTION_STACK
    };
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    open.fetch_sub(1, Ordering::SeqCst);
                    refuse(stream);
                    continue;
                }
                let (page, done, web) = (Arc::clone(page), Arc::clone(&open), Arc::clone(web));
                let spawned = std::thread::Builder::new()
                    .name("metrics-conn".into())
                    .stack_size(stack)
                    .spawn(move || {
                        if let Err(e) = answer(stream, &page, &web) {
                            log::debug!("metrics: a scrape ended early: {e}");
                        }
                        done.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    open.fetch_sub(1, Ordering::SeqCst);
                    log::debug!("metrics: cannot start a thread for a connection: {e}");
                }
            }
            Err(e) => {
                log::debug!("metrics: accepting a connection failed: {e}");
                // Out of descriptors or similar: do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Answer 503 to a connection beyond the limit, without waiting on it.
fn refuse(mut stream: TcpStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = stream.write_all(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
}

/// An answer: status line, content type, body.
struct Answer {
    status: &'static str,
    content_type: &'static str,
    body: Arc<str>,
    head_only: bool,
}

/// A connection, plain or over TLS.
trait Connection: Read + Write {}

impl<T: Read + Write> Connection for T {}

impl Answer {
    fn text(status: &'static str, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Arc::from(body),
            head_only: false,
        }
    }
}

/// Read one request from `stream` within the limits and answer it, over TLS where `web` asks.
fn answer(mut stream: TcpStream, page: &Page, web: &WebConfig) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let Some(tls) = web.tls() else {
        return exchange(&mut stream, page, web);
    };
    let connection = rustls::ServerConnection::new(tls).map_err(std::io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(connection, stream);
    exchange(&mut stream, page, web)?;
    stream.conn.send_close_notify();
    let _ = stream.flush();
    Ok(())
}

/// Read one request from `stream` within the limits and answer it.
fn exchange(stream: &mut dyn Connection, page: &Page, web: &WebConfig) -> std::io::Result<()> {
    let deadline = Instant::now() + REQUEST_TIME_LIMIT;
    let mut buf = [0u8; MAX_REQUEST];
    let mut len = 0;
    let answer = loop {
        if Instant::now() >= deadline {
            break Answer::text("408 Request Timeout", "request timeout\n");
        }
        let n = match stream.read(&mut buf[len..]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return Err(e),
        };
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                let authorization = request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                    .map(|h| h.value);
                if !web.authorized(authorization) {
                    break Answer::text("401 Unauthorized", "unauthorized\n");
                }
                break route(
                    request.method.unwrap_or(""),
                    request.path.unwrap_or(""),
                    page,
                );
            }
            Ok(httparse::Status::Partial) if len < MAX_REQUEST => continue,
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                break Answer::text("431 Request Header Fields Too Large", "request too large\n");
            }
            Err(_) => break Answer::text("400 Bad Request", "bad request\n"),
        }
    };
    send(stream, &answer, web, Instant::now() + ANSWER_TIME_LIMIT)
}

/// What a request for `path` with `method` gets.
fn route(method: &str, path: &str, page: &Page) -> Answer {
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return Answer::text("405 Method Not Allowed", "only GET and HEAD\n");
    }
    let path = path.split('?').next().unwrap_or("");
    let mut answer = match path {
        "/metrics" => Answer {
            status: "200 OK",
            content_type: prometheus::TEXT_FORMAT,
            body: page.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            head_only: false,
        },
        "/" => Answer {
            status: "200 OK",
            content_type: "text/html; charset=utf-8",
            body: Arc::from(
                "<html><head><title>vmbalance</title></head><body><a href=\"/metrics\">metrics</a></body></html>\n",
            ),
            head_only: false,
        },
        _ => Answer::text("404 Not Found", "not found; metrics are at /metrics\n"),
    };
    answer.head_only = head_only;
    answer
}

/// Write `answer` to `stream` with the headers `web` adds, giving up at `deadline`.
fn send(
    stream: &mut dyn Connection,
    answer: &Answer,
    web: &WebConfig,
    deadline: Instant,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        answer.status,
        answer.content_type,
        answer.body.len()
    );
    if answer.status.starts_with("405") {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    if answer.status.starts_with("401") {
        head.push_str("WWW-Authenticate: Basic realm=\"vmbalance\", charset=\"UTF-8\"\r\n");
    }
    for (name, value) in web.headers() {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let body: &[u8] = if answer.head_only {
        b""
    } else {
        answer.body.as_bytes()
    };
    for mut part in [head.as_bytes(), body] {
        while !part.is_empty() {
            if Instant::now() >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client did not read its answer in time",
                ));
            }
            match stream.write(part) {
                Ok(0) => return Ok(()),
                Ok(n) => part = &part[n..],
                Err(e) if is_timeout(&e) => continue,
                Err(e) => return Err(e),
            }
        }
    }
    stream.flush()
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_are_taken_as_exporters_take_them() {
        let ok = |t: &str| parse_listen_address(t).unwrap().to_string();
        assert_eq!(ok("127.0.0.1:9477"), "127.0.0.1:9477");
        assert_eq!(ok(":9477"), "0.0.0.0:9477");
        assert_eq!(ok("[::1]:9477"), "[::1]:9477");
        assert!(
            parse_listen_address("localhost:9477")
                .unwrap()
                .ip()
                .is_loopback()
        );
        for bad in ["localhost", ":", ":99999", "127.0.0.1", "no such host!:1"] {
            assert!(parse_listen_address(bad).is_err(), "{bad}");
        }
    }
}
