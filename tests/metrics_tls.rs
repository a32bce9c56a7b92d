//! `--web-config-file`: the metrics endpoint over TLS with basic authentication, as node_exporter's
//! web configuration says, scraped by a real TLS client (rustls) that trusts only the test's own
//! certificate; and a bad file refused at start.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::daemon::Daemon;
use rustls::pki_types::{CertificateDer, ServerName};

const SCHEDULER: &str = env!("CARGO_BIN_EXE_vcpu_scheduler");

/// A self-signed certificate for `localhost` and 127.0.0.1, its key, and a web configuration
/// asking for it and for user `prometheus` with `password`, written in `dir`.
fn write_config(dir: &Path, password: &str) -> CertificateDer<'static> {
    let key =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), key.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.signing_key.serialize_pem()).unwrap();
    let hash = bcrypt::hash(password, 4).unwrap();
    std::fs::write(
        dir.join("web.yml"),
        format!(
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  min_version: TLS12\nhttp_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\nbasic_auth_users:\n  prometheus: '{hash}'\n"
        ),
    )
    .unwrap();
    key.cert.der().clone()
}

/// GET /metrics from `address` over TLS, trusting `cert` only, with `credentials`: the whole
/// answer, or the error.
fn https_get(
    address: &str,
    cert: &CertificateDer<'static>,
    credentials: Option<(&str, &str)>,
) -> Result<String, std::io::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(address)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    let auth = credentials.map_or(String::new(), |(user, password)| {
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    });
    write!(
        tls,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n"
    )?;
    let mut answer = String::new();
    match tls.read_to_string(&mut answer) {
        Ok(_) => Ok(answer),
        // The server closed after its answer without a close_notify: the answer is whole.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => Ok(answer),
        Err(e) => Err(e),
    }
}

#[test]
fn metrics_are_served_over_tls_to_the_right_credentials_only() {
    let dir = tempdir();
    let cert = write_config(&dir, "s3cret");
    let web = dir.join("web.yml");
    let uri = common::test_uri("node.xml");
    let d = Daemon::start(
        SCHEDULER,
        &[
            "-c",
            &uri,
            "--metrics-address",
            "127.0.0.1:0",
            "--web-config-file",
            web.to_str().unwrap(),
            "-v",
            "0.2",
        ],
    );
    let line = d.wait_for("serving metrics at https://");
    let address = line
        .split("https://")
        .nth(1)
        .unwrap()
        .trim_end_matches("/metrics")
        .trim()
        .to_string();
    d.wait_for("cycle 2:");
    let ok = https_get(&address, &cert, Some(("prometheus", "s3cret")))
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
    assert!(ok.contains("X-Content-Type-Options: nosniff"), "{ok}");
    assert!(ok.contains("vmbalance_cycles_total "), "{ok}");
    for wrong in [
        None,
        Some(("prometheus", "guess")),
        Some(("admin", "s3cret")),
    ] {
        let denied = https_get(&address, &cert, wrong).unwrap();
        assert!(denied.starts_with("HTTP/1.1 401 Unauthorized"), "{denied}");
        assert!(denied.contains("WWW-Authenticate: Basic"), "{denied}");
        assert!(!denied.contains("vmbalance_"), "{denied}");
    }
    // Plain HTTP on the TLS port gets no page.
    let mut plain = TcpStream::connect(&address).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("vmbalance_"),
        "{answer:?}"
    );
    assert!(!d.log().contains("ERROR"), "{}", d.log());
}

#[test]
fn a_bad_web_configuration_is_a_usage_error_naming_its_line() {
    let dir = tempdir();
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: c.pem\n  cipher_suites: [x]\n",
    )
    .unwrap();
    let uri = common::test_uri("node.xml");
    let o = Command::new(SCHEDULER)
        .args(["-c", &uri, "--metrics-address", "127.0.0.1:0"])
        .args(["--web-config-file", web.to_str().unwrap(), "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cipher_suites") && err.contains("line 3"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Without --metrics-address it has nothing to configure.
    std::fs::write(&web, "").unwrap();
    let o = Command::new(SCHEDULER)
        .args(["-c", &uri, "--web-config-file", web.to_str().unwrap(), "1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--metrics-address"));
}

/// A fresh directory under the target directory's temp area.
fn tempdir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vmbalance-web-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
