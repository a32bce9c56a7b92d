//! `--web-config-file`: TLS and basic authentication for the metrics endpoint, in the web
//! configuration format of node_exporter and the other Prometheus exporters (their
//! exporter-toolkit), so an operator reuses the file and the habits they have.
//!
//! Supported: `tls_server_config` (`cert_file`/`cert`, `key_file`/`key`, `client_auth_type`
//! `NoClientCert`, `VerifyClientCertIfGiven` or `RequireAndVerifyClientCert` with
//! `client_ca_file`/`client_ca`, `min_version`/`max_version` `TLS12`/`TLS13`,
//! `prefer_server_cipher_suites`), `http_server_config` (`headers`; `http2` is accepted, answers
//! are HTTP/1.1), and `basic_auth_users` (bcrypt hashes). Any other key is an error naming it, never
//! silently ignored: a security setting the file asks for and the daemon does not apply would be
//! worse than none. Relative paths are taken from the file's directory, as the exporters do. TLS is
//! rustls's (with the `ring` provider); bcrypt is the `bcrypt` crate's.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    http_server_config: Option<HttpFile>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert: Option<String>,
    cert_file: Option<PathBuf>,
    key: Option<String>,
    key_file: Option<PathBuf>,
    #[serde(default)]
    client_auth_type: ClientAuth,
    client_ca: Option<String>,
    client_ca_file: Option<PathBuf>,
    min_version: Option<TlsVersion>,
    max_version: Option<TlsVersion>,
    prefer_server_cipher_suites: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpFile {
    http2: Option<bool>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// Which client certificates are asked for and checked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
enum ClientAuth {
    /// None asked for.
    #[default]
    NoClientCert,
    /// Checked against the client CA when given; a client without one is served.
    VerifyClientCertIfGiven,
    /// Required and checked against the client CA.
    RequireAndVerifyClientCert,
}

/// A TLS version, as the exporters name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
enum TlsVersion {
    #[serde(rename = "TLS12")]
    Tls12,
    #[serde(rename = "TLS13")]
    Tls13,
}

/// Most verified credentials remembered, so a scrape does not pay bcrypt's cost each time.
const MAX_VERIFIED: usize = 64;

/// `--web-config-file PATH`: the file at PATH, loaded and checked (a bad file is a usage error
/// naming its line).
pub fn parse_web_config_file(text: &str) -> Result<Arc<WebConfig>, String> {
    WebConfig::load(Path::new(text))
        .map(Arc::new)
        .map_err(|e| format!("{e:#}"))
}

/// The endpoint's web configuration, loaded and checked.
pub struct WebConfig {
    tls: Option<Arc<rustls::ServerConfig>>,
    users: BTreeMap<String, String>,
    headers: Vec<(String, String)>,
    /// `Authorization` header values already verified (bcrypt is slow by design).
    verified: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl WebConfig {
    /// Read and check the file at `path`: every certificate and key loads, every hash is bcrypt.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the web configuration {}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, dir).with_context(|| format!("web configuration {}", path.display()))
    }

    /// The configuration `text`, whose relative paths are from `dir`.
    pub fn parse(text: &str, dir: &Path) -> anyhow::Result<Self> {
        let file: File = if text.trim().is_empty() {
            File::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| {
                // One line for the operator: the message, without a rendered snippet.
                let message = e.to_string();
                let first = message.lines().next().unwrap_or_default();
                let message = first.strip_prefix("error: ").unwrap_or(first).to_string();
                match e.location() {
                    Some(at) if !message.contains("line ") => {
                        anyhow::anyhow!("line {}: {message}", at.line())
                    }
                    _ => anyhow::anyhow!("{message}"),
                }
            })?
        };
        let users = file.basic_auth_users.unwrap_or_default();
        for (user, hash) in &users {
            if user.contains(':') {
                bail!("basic_auth_users: user name '{user}' contains ':'");
            }
            hash.parse::<bcrypt::HashParts>().with_context(|| {
                format!("basic_auth_users: the password of '{user}' is not a bcrypt hash (make one with `htpasswd -nBC 10 {user}`)")
            })?;
        }
        let headers = match file.http_server_config {
            Some(http) => {
                let _ = http.http2;
                for name in http.headers.keys() {
                    let lower = name.to_ascii_lowercase();
                    if !is_token(name)
                        || [
                            "content-type",
                            "content-length",
                            "connection",
                            "www-authenticate",
                        ]
                        .contains(&lower.as_str())
                    {
                        bail!("http_server_config.headers: '{name}' cannot be set");
                    }
                }
                if let Some((name, _)) = http.headers.iter().find(|(_, v)| v.contains(['\r', '\n']))
                {
                    bail!("http_server_config.headers: the value of '{name}' spans lines");
                }
                http.headers.into_iter().collect()
            }
            None => Vec::new(),
        };
        let tls = file
            .tls_server_config
            .map(|t| tls_config(t, dir).context("tls_server_config"))
            .transpose()?;
        Ok(Self {
            tls,
            users,
            headers,
            verified: Mutex::new(HashSet::new()),
        })
    }

    /// No TLS, no authentication, no header: plain HTTP.
    pub fn none() -> Self {
        Self {
            tls: None,
            users: BTreeMap::new(),
            headers: Vec::new(),
            verified: Mutex::new(HashSet::new()),
        }
    }

    /// Does the endpoint ask for credentials?
    pub fn asks_for_credentials(&self) -> bool {
        !self.users.is_empty()
    }

    /// The TLS configuration, when the endpoint serves HTTPS.
    pub fn tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.tls.clone()
    }

    /// Headers added to every answer.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// Does a request with this `Authorization` header value get in? Always, without
    /// `basic_auth_users`.
    pub fn authorized(&self, authorization: Option<&[u8]>) -> bool {
        if self.users.is_empty() {
            return true;
        }
        let Some(value) = authorization.and_then(|v| std::str::from_utf8(v).ok()) else {
            return false;
        };
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.contains(value) {
            return true;
        }
        drop(verified);
        let Some((user, password)) = basic_credentials(value) else {
            return false;
        };
        // An unknown user costs a check too, so the time taken does not tell who exists.
        let (hash, known) = match self.users.get(&user) {
            Some(hash) => (hash.as_str(), true),
            None => (self.users.values().next().map_or("", String::as_str), false),
        };
        let good = bcrypt::verify(&password, hash).unwrap_or(false) && known;
        if good {
            verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
            verified.insert(value.to_string());
        }
        good
    }
}

/// `Basic BASE64(user:password)`, decoded.
fn basic_credentials(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// Is `name` an HTTP header name (an RFC 9110 token)?
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// PEM text given inline or in a file (relative to `dir`), named `what` in errors.
fn pem(
    inline: Option<String>,
    file: Option<PathBuf>,
    dir: &Path,
    what: &str,
) -> anyhow::Result<Option<Vec<u8>>> {
    match (inline, file) {
        (Some(_), Some(_)) => bail!("give {what} or {what}_file, not both"),
        (Some(text), None) => Ok(Some(text.into_bytes())),
        (None, Some(path)) => {
            let path = dir.join(path);
            std::fs::read(&path)
                .map(Some)
                .with_context(|| format!("cannot read {what}_file {}", path.display()))
        }
        (None, None) => Ok(None),
    }
}

/// The rustls server configuration `t` asks for.
fn tls_config(t: TlsFile, dir: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let cert = pem(t.cert, t.cert_file, dir, "cert")?.context("cert_file is required")?;
    let key = pem(t.key, t.key_file, dir, "key")?.context("key_file is required")?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<_, _>>()
        .context("the certificate is not PEM")?;
    if chain.is_empty() {
        bail!("the certificate file holds no certificate");
    }
    let key = PrivateKeyDer::from_pem_slice(&key).context("the key is not a PEM private key")?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = [
        (TlsVersion::Tls12, &rustls::version::TLS12),
        (TlsVersion::Tls13, &rustls::version::TLS13),
    ]
    .into_iter()
    .filter(|(v, _)| {
        t.min_version.is_none_or(|min| *v >= min) && t.max_version.is_none_or(|max| *v <= max)
    })
    .map(|(_, v)| v)
    .collect();
    if versions.is_empty() {
        bail!("min_version is above max_version");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .context("choosing the TLS versions")?;
    let ca = pem(t.client_ca, t.client_ca_file, dir, "client_ca")?;
    let builder = match (t.client_auth_type, ca) {
        (ClientAuth::NoClientCert, None) => builder.with_no_client_auth(),
        (ClientAuth::NoClientCert, Some(_)) => {
            bail!("client_ca_file is given but client_auth_type is NoClientCert")
        }
        (_, None) => bail!(
            "client_auth_type {:?} needs client_ca_file",
            t.client_auth_type
        ),
        (auth, Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&ca) {
                roots
                    .add(c.context("the client CA is not PEM")?)
                    .context("the client CA is not a usable certificate")?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider);
            let verifier = if auth == ClientAuth::VerifyClientCertIfGiven {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(verifier.build().context("the client CA")?)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .context("the certificate and key do not go together")?;
    config.ignore_client_order = t.prefer_server_cipher_suites.unwrap_or(false);
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<WebConfig> {
        WebConfig::parse(text, Path::new("/nonexistent"))
    }

    #[test]
    fn an_empty_file_changes_nothing() {
        let c = parse("").unwrap();
        assert!(c.tls().is_none());
        assert!(c.authorized(None));
    }

    #[test]
    fn unknown_or_unsupported_keys_are_errors_naming_them() {
        let e = format!(
            "{:#}",
            parse("tls_server_config:\n  cipher_suites: [x]\n").unwrap_err()
        );
        assert!(e.contains("cipher_suites"), "{e}");
        let e = format!("{:#}", parse("basic_auth_user:\n  a: b\n").unwrap_err());
        assert!(e.contains("basic_auth_user") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn passwords_must_be_bcrypt_hashes() {
        let e = format!(
            "{:#}",
            parse("basic_auth_users:\n  alice: secret\n").unwrap_err()
        );
        assert!(e.contains("not a bcrypt hash"), "{e}");
    }

    #[test]
    fn basic_auth_lets_in_the_right_password_only() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let c = parse(&format!("basic_auth_users:\n  alice: '{hash}'\n")).unwrap();
        let header = |user: &str, pass: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
            )
        };
        assert!(c.authorized(Some(header("alice", "s3cret").as_bytes())));
        // Again, from the cache.
        assert!(c.authorized(Some(header("alice", "s3cret").as_bytes())));
        assert!(!c.authorized(Some(header("alice", "wrong").as_bytes())));
        assert!(!c.authorized(Some(header("bob", "s3cret").as_bytes())));
        assert!(!c.authorized(None));
        assert!(!c.authorized(Some(b"Bearer x")));
    }

    #[test]
    fn headers_that_would_break_the_answer_are_refused() {
        assert!(parse("http_server_config:\n  headers:\n    Content-Length: '5'\n").is_err());
        assert!(parse("http_server_config:\n  headers:\n    'X Bad': a\n").is_err());
        let c =
            parse("http_server_config:\n  http2: true\n  headers:\n    X-Frame-Options: deny\n")
                .unwrap();
        assert_eq!(c.headers(), [("X-Frame-Options".into(), "deny".into())]);
    }

    #[test]
    fn tls_needs_a_certificate_and_its_key() {
        let e = format!(
            "{:#}",
            parse("tls_server_config:\n  key_file: k.pem\n").unwrap_err()
        );
        assert!(e.contains("cert_file is required"), "{e}");
        let e = format!(
            "{:#}",
            parse("tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n").unwrap_err()
        );
        assert!(e.contains("/nonexistent/c.pem"), "{e}");
    }
}
