//! Images: downloaded from `file://`, `http://` or `https://` URLs into a backup storage
//! directory, with their size and SHA-256 recorded.
//!
//! A download goes to a temporary `.part` name and is renamed into place once complete and
//! hashed, so an image file that exists is whole. The `.part` is removed whenever the import
//! does not complete: on an error, past the size cap or the timeout, when the import is
//! cancelled, and when its future is dropped (a guard removes it), so nothing half-written
//! is left behind by any path out.
//!
//! HTTP is hyper's client (chunked bodies, a `Content-Length` that must be met, redirects),
//! not a hand-written one; `https://` is rustls on ring, the TLS stack the agent link uses,
//! verifying the server against the CA bundle the policy names (Debian's
//! `ca-certificates` by default, or a private mirror's CA).
//!
//! An import reads what the node can reach on a caller's behalf, so what it may read is the
//! server's decision ([`ImportPolicy`]), checked on the parsed URL and on the addresses its
//! host resolves to (the connection goes to the checked address, never resolved again), at
//! every redirect as at the first URL: `file://` only under configured directories (after
//! resolving symbolic links and `..`), never loopback, link-local, unspecified, multicast or
//! this node's own addresses unless allowed (so an import cannot read the API's `/metrics`
//! or a cloud's metadata service), optionally only listed hosts, at most `max_bytes`, within
//! `timeout`. A redirect goes only to `http://` or `https://`, and never from `https://` down
//! to `http://`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use url::Url;
use uuid::Uuid;

/// How many redirects an import follows.
const MAX_REDIRECTS: usize = 5;

/// Why an image could not be fetched. `field` is the request field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The URL is not one this node can fetch.
    #[error("`url`: {0}")]
    BadUrl(String),
    /// Reading or writing failed.
    #[error("fetching the image failed: {0}")]
    Io(#[from] std::io::Error),
    /// The HTTP exchange failed, or the server said no.
    #[error("the image server: {0}")]
    Http(String),
    /// The TLS handshake failed: most often a certificate this node does not trust.
    #[error("the image server's TLS: {0}")]
    Tls(String),
    /// The image is larger than the node takes.
    #[error("the image is larger than the {0} bytes this node takes")]
    TooLarge(u64),
    /// The import took longer than the node allows.
    #[error("the import did not finish within {0} s")]
    TimedOut(u64),
    /// The import was cancelled.
    #[error("the import was cancelled")]
    Cancelled,
}

/// The size and `sha256:<hex>` checksum of the file at `path` (a template the agent wrote
/// into a backup storage's directory).
pub async fn describe(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = tokio::fs::File::open(path).await?;
    let (mut hasher, mut size, mut buffer) = (Sha256::new(), 0u64, vec![0u8; 1 << 16]);
    loop {
        let read = file.read(&mut buffer).await?;
        if read == 0 {
            return Ok((size, format!("sha256:{:x}", hasher.finalize())));
        }
        hasher.update(&buffer[..read]);
        size = size.saturating_add(read as u64);
    }
}

/// A fetched image: where it is, its size and checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// Its path in the backup storage.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// `sha256:<hex>`.
    pub checksum: String,
}

/// What an import may read, set by the server's operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportPolicy {
    /// Directories `file://` URLs may name files under (none: no `file://` at all).
    pub file_dirs: Vec<PathBuf>,
    /// Hosts (`name` or `name:port`) `http://` and `https://` URLs may name; empty: any that
    /// passes the address checks.
    pub allowed_hosts: Vec<String>,
    /// Whether loopback, link-local and this node's own addresses may be fetched from.
    pub allow_local: bool,
    /// The largest image taken.
    pub max_bytes: u64,
    /// How long an import may take.
    pub timeout: std::time::Duration,
    /// The PEM bundle of the CAs `https://` servers are verified against.
    pub ca_file: PathBuf,
}

impl Default for ImportPolicy {
    fn default() -> Self {
        ImportPolicy {
            file_dirs: Vec::new(),
            allowed_hosts: Vec::new(),
            allow_local: false,
            max_bytes: 64 << 30,
            timeout: std::time::Duration::from_secs(3600),
            ca_file: "/etc/ssl/certs/ca-certificates.crt".into(),
        }
    }
}

/// Where an import reads from, once checked.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    File(PathBuf),
    Http { addr: std::net::SocketAddr, url: Url },
}

/// Parses `url` and checks that its scheme is one this node fetches (the policy is checked
/// by [`check`] and [`fetch`]).
pub fn check_url(url: &str) -> Result<Url, ImageError> {
    let parsed =
        Url::parse(url).map_err(|e| ImageError::BadUrl(format!("`{url}` is not a URL: {e}")))?;
    match parsed.scheme() {
        "file" | "http" | "https" => Ok(parsed),
        _ => Err(ImageError::BadUrl(format!(
            "`{url}` is not file:///..., http://... or https://..."
        ))),
    }
}

/// Whether `ip` is one an import must not reach unless local sources are allowed.
fn local_address(ip: std::net::IpAddr) -> bool {
    let special = match ip {
        std::net::IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| local_address(v4.into()))
        }
    };
    // An address this node can bind is one of its own.
    special || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// Checks `url` against `policy` without reading anything: what the API answers at once.
pub async fn check(url: &str, policy: &ImportPolicy) -> Result<(), ImageError> {
    resolve(&check_url(url)?, policy).await.map(drop)
}

async fn resolve(url: &Url, policy: &ImportPolicy) -> Result<Source, ImageError> {
    if url.scheme() == "file" {
        let refused = || {
            ImageError::BadUrl(format!(
                "`{url}` is not under a directory this node imports files from"
            ))
        };
        let file = url.to_file_path().map_err(|()| refused())?;
        // Resolving links and `..` first: the check is on the file that will be read.
        let real = tokio::fs::canonicalize(file).await.map_err(|_| refused())?;
        for dir in &policy.file_dirs {
            if let Ok(dir) = tokio::fs::canonicalize(dir).await
                && real.starts_with(&dir)
            {
                return Ok(Source::File(real));
            }
        }
        return Err(refused());
    }
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return Err(ImageError::BadUrl(format!("`{url}` names no host")));
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ImageError::BadUrl(format!(
            "`{host}`: credentials in an image URL are not taken (they would be stored with the image)"
        )));
    }
    let with_port = format!("{host}:{port}");
    if !policy.allowed_hosts.is_empty()
        && !policy.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host) || *h == with_port)
    {
        return Err(ImageError::BadUrl(format!("`{host}` is not a host images come from")));
    }
    let addrs: Vec<std::net::SocketAddr> = match url.host() {
        Some(url::Host::Ipv4(ip)) => vec![(ip, port).into()],
        Some(url::Host::Ipv6(ip)) => vec![(ip, port).into()],
        _ => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| ImageError::BadUrl(format!("`{host}` does not resolve: {e}")))?
            .collect(),
    };
    let addr =
        *addrs.first().ok_or_else(|| ImageError::BadUrl(format!("`{host}` does not resolve")))?;
    if !policy.allow_local && addrs.iter().any(|a| local_address(a.ip())) {
        return Err(ImageError::BadUrl(format!(
            "`{host}` is a local address (loopback, link-local or this node's own); images are not imported from it"
        )));
    }
    Ok(Source::Http { addr, url: url.clone() })
}

/// Fetches `url` into `dir` as `<image>.<format>`, as `policy` allows: refused before
/// anything is read if the URL is outside it, and stopped (its `.part` removed) past
/// `max_bytes` or `timeout`, or when `cancelled` completes.
pub async fn fetch(
    url: &str,
    dir: &Path,
    image: Uuid,
    format: &str,
    policy: &ImportPolicy,
    cancelled: impl Future<Output = ()>,
) -> Result<Fetched, ImageError> {
    let url = check_url(url)?;
    let source = resolve(&url, policy).await?;
    tokio::fs::create_dir_all(dir).await?;
    let path = dir.join(format!("{image}.{format}"));
    let mut part =
        Part::create(dir.join(format!("{image}.{format}.part")), policy.max_bytes).await?;
    let copied = tokio::select! {
        copied = tokio::time::timeout(policy.timeout, download(source, policy, &mut part)) => {
            copied.unwrap_or(Err(ImageError::TimedOut(policy.timeout.as_secs())))
        }
        () = cancelled => Err(ImageError::Cancelled),
    };
    // On any error `part` is dropped here, which removes the file.
    copied?;
    let (size, checksum) = part.finish(&path).await?;
    Ok(Fetched { path, size, checksum })
}

/// Removes the `.part` files in backup storage `dir`: what imports a previous process was
/// running when it stopped left (only a running import writes one, and none runs yet when
/// the node starts). Returns how many were removed.
pub fn remove_partial_imports(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "part") {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The file an import writes to: hashed and counted as it is written, at most `max_bytes`,
/// removed when dropped unless [`Part::finish`] renamed it into place.
struct Part {
    path: PathBuf,
    file: tokio::fs::File,
    hasher: Sha256,
    size: u64,
    max_bytes: u64,
    kept: bool,
}

impl Part {
    async fn create(path: PathBuf, max_bytes: u64) -> Result<Part, ImageError> {
        let file = tokio::fs::File::create(&path).await?;
        Ok(Part { path, file, hasher: Sha256::new(), size: 0, max_bytes, kept: false })
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        self.size = self
            .size
            .checked_add(bytes.len() as u64)
            .filter(|s| *s <= self.max_bytes)
            .ok_or(ImageError::TooLarge(self.max_bytes))?;
        self.hasher.update(bytes);
        self.file.write_all(bytes).await?;
        Ok(())
    }

    /// Makes the file durable and renames it to `path`; returns its size and checksum.
    async fn finish(mut self, path: &Path) -> Result<(u64, String), ImageError> {
        self.file.flush().await?;
        self.file.sync_all().await?;
        tokio::fs::rename(&self.path, path).await?;
        self.kept = true;
        Ok((self.size, format!("sha256:{:x}", self.hasher.clone().finalize())))
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Copies `source` into `part`, following redirects (each checked against `policy`).
async fn download(
    mut source: Source,
    policy: &ImportPolicy,
    part: &mut Part,
) -> Result<(), ImageError> {
    for _ in 0..=MAX_REDIRECTS {
        let (addr, url) = match source {
            Source::File(file) => {
                let mut input = tokio::fs::File::open(file).await?;
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = input.read(&mut buf).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    part.write(&buf[..n]).await?;
                }
            }
            Source::Http { addr, url } => (addr, url),
        };
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let next = if url.scheme() == "https" {
            let tls = tls_connector(policy)?;
            let name = match url.host() {
                Some(url::Host::Ipv4(ip)) => {
                    ServerName::IpAddress(std::net::IpAddr::from(ip).into())
                }
                Some(url::Host::Ipv6(ip)) => {
                    ServerName::IpAddress(std::net::IpAddr::from(ip).into())
                }
                _ => ServerName::try_from(url.host_str().unwrap_or_default().to_owned())
                    .map_err(|e| ImageError::BadUrl(format!("`{url}`: {e}")))?,
            };
            let stream =
                tls.connect(name, tcp).await.map_err(|e| ImageError::Tls(e.to_string()))?;
            get(stream, &url, part).await?
        } else {
            get(tcp, &url, part).await?
        };
        let Some(location) = next else {
            return Ok(());
        };
        let target = url.join(&location).map_err(|e| {
            ImageError::Http(format!("a redirect to `{location}`, which is not a URL: {e}"))
        })?;
        if !matches!(target.scheme(), "http" | "https")
            || (url.scheme() == "https" && target.scheme() == "http")
        {
            return Err(ImageError::BadUrl(format!(
                "`{url}` redirects to `{target}`, which an import does not follow (only http(s), never from https to http)"
            )));
        }
        source = resolve(&target, policy).await?;
    }
    Err(ImageError::Http(format!("more than {MAX_REDIRECTS} redirects")))
}

/// The TLS client for `https://` imports, trusting the CAs in `policy.ca_file`.
fn tls_connector(policy: &ImportPolicy) -> Result<tokio_rustls::TlsConnector, ImageError> {
    let unreadable = |e: &dyn std::fmt::Display| {
        ImageError::Tls(format!("the CA bundle {} cannot be read: {e}", policy.ca_file.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&policy.ca_file).map_err(|e| unreadable(&e))? {
        // A bundle may hold certificates rustls cannot use; the others still count.
        let _ = roots.add(cert.map_err(|e| unreadable(&e))?);
    }
    if roots.is_empty() {
        return Err(unreadable(&"it holds no usable certificate"));
    }
    let config = rustls::ClientConfig::builder_with_provider(strato_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ImageError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Aborts a spawned task when dropped: the connection of an import that stopped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// GETs `url` over `stream` and streams a `200`'s body into `part`; returns the `Location`
/// of a redirect.
async fn get<S>(stream: S, url: &Url, part: &mut Part) -> Result<Option<String>, ImageError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let http = |e: hyper::Error| ImageError::Http(e.to_string());
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(http)?;
    let _connection = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let authority = match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_owned(),
    };
    let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
    let request = hyper::Request::get(target)
        .header(header::HOST, authority)
        .header(header::USER_AGENT, concat!("strato/", env!("CARGO_PKG_VERSION")))
        .body(Empty::new())
        .map_err(|e| ImageError::BadUrl(format!("`{url}`: {e}")))?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    if status.is_redirection() {
        return match response.headers().get(header::LOCATION).map(|l| l.to_str()) {
            Some(Ok(location)) => Ok(Some(location.to_owned())),
            _ => Err(ImageError::Http(format!("answered `{status}` with no usable Location"))),
        };
    }
    if status != hyper::StatusCode::OK {
        return Err(ImageError::Http(format!("answered `{status}`")));
    }
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(http)?.into_data() {
            part.write(&data).await?;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Never completes: an import nobody cancels.
    fn uncancelled() -> std::future::Pending<()> {
        std::future::pending()
    }

    /// Serves each of `responses`, in order, to one connection each, on loopback.
    async fn serve(responses: Vec<Vec<u8>>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for response in responses {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await.unwrap();
                let _ = socket.write_all(&response).await;
            }
        });
        addr
    }

    fn left_in(dir: &Path) -> Vec<std::fs::DirEntry> {
        std::fs::read_dir(dir).map(|d| d.flatten().collect()).unwrap_or_default()
    }

    fn local() -> ImportPolicy {
        ImportPolicy { allow_local: true, ..Default::default() }
    }

    #[tokio::test]
    async fn file_urls_are_copied_sized_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src.raw");
        std::fs::write(&source, b"hello").unwrap();
        let image = Uuid::new_v4();
        let url = format!("file://{}", source.display());
        let bs = dir.path().join("bs");
        // Outside the policy's directories (none by default): refused, nothing read.
        let refused = fetch(&url, &bs, image, "raw", &ImportPolicy::default(), uncancelled()).await;
        assert!(matches!(refused, Err(ImageError::BadUrl(_))), "{refused:?}");
        let policy = ImportPolicy { file_dirs: vec![dir.path().to_owned()], ..Default::default() };
        // A name that leaves the directory through `..` is the file it resolves to.
        let escape = format!("file://{}/../../etc/passwd", dir.path().display());
        assert!(matches!(
            fetch(&escape, &bs, image, "raw", &policy, uncancelled()).await,
            Err(ImageError::BadUrl(_))
        ));
        let got = fetch(&url, &bs, image, "raw", &policy, uncancelled()).await.unwrap();
        assert_eq!(got.size, 5);
        assert_eq!(
            got.checksum,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(std::fs::read(&got.path).unwrap(), b"hello");
        for bad in ["ftp://x/y", "not a url", "http://user:secret@192.0.2.7/i"] {
            assert!(matches!(check(bad, &policy).await, Err(ImageError::BadUrl(_))), "{bad}");
        }
    }

    #[tokio::test]
    async fn http_bodies_are_decoded_and_must_be_whole() {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n";
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello";
        let missing = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        let addr = serve(vec![chunked.to_vec(), short.to_vec(), missing.to_vec()]).await;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("http://{addr}/images/a.raw");
        // Loopback is this node: refused unless allowed.
        let refused =
            fetch(&url, dir.path(), Uuid::new_v4(), "raw", &ImportPolicy::default(), uncancelled())
                .await;
        assert!(matches!(refused, Err(ImageError::BadUrl(_))), "{refused:?}");
        let got = fetch(&url, dir.path(), Uuid::new_v4(), "raw", &local(), uncancelled()).await;
        let got = got.unwrap();
        assert_eq!((got.size, std::fs::read(&got.path).unwrap()), (5, b"hello".to_vec()));
        std::fs::remove_file(&got.path).unwrap();
        // A body shorter than its Content-Length is a failed import, not a smaller image.
        let cut = fetch(&url, dir.path(), Uuid::new_v4(), "raw", &local(), uncancelled()).await;
        assert!(matches!(cut, Err(ImageError::Http(_))), "{cut:?}");
        let gone = fetch(&url, dir.path(), Uuid::new_v4(), "raw", &local(), uncancelled()).await;
        assert!(matches!(&gone, Err(ImageError::Http(e)) if e.contains("404")), "{gone:?}");
        assert!(left_in(dir.path()).is_empty(), "{:?}", left_in(dir.path()));
    }

    #[tokio::test]
    async fn every_redirect_is_checked_like_the_first_url() {
        let target = serve(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()]).await;
        let to = |location: String| {
            format!("HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n")
                .into_bytes()
        };
        let first = serve(vec![
            to(format!("http://{target}/real")),
            to(format!("http://{target}/real")),
            to("file:///etc/passwd".into()),
        ])
        .await;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("http://{first}/i");
        // Only the first host is allowed: the redirect's host is refused.
        let only_first = ImportPolicy { allowed_hosts: vec![first.to_string()], ..local() };
        let refused =
            fetch(&url, dir.path(), Uuid::new_v4(), "raw", &only_first, uncancelled()).await;
        assert!(matches!(refused, Err(ImageError::BadUrl(_))), "{refused:?}");
        let got = fetch(&url, dir.path(), Uuid::new_v4(), "raw", &local(), uncancelled()).await;
        assert_eq!(std::fs::read(got.unwrap().path).unwrap(), b"ok");
        // A redirect to a file is never followed, whatever the file directories.
        let files = ImportPolicy { file_dirs: vec!["/etc".into()], ..local() };
        let file = fetch(&url, dir.path(), Uuid::new_v4(), "raw", &files, uncancelled()).await;
        assert!(matches!(file, Err(ImageError::BadUrl(_))), "{file:?}");
    }

    #[tokio::test]
    async fn https_servers_are_verified_against_the_policys_cas() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // Handshakes the client refuses end here.
                    let Ok(mut tls) = acceptor.accept(socket).await else { return };
                    let mut request = [0u8; 4096];
                    let _ = tls.read(&mut request).await;
                    let _ =
                        tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret").await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let trusting = ImportPolicy { ca_file, ..local() };
        let url = format!("https://localhost:{port}/i.raw");
        let got = fetch(&url, dir.path(), Uuid::new_v4(), "raw", &trusting, uncancelled()).await;
        assert_eq!(std::fs::read(got.unwrap().path).unwrap(), b"secret");
        // The system's CAs never issued this certificate.
        let system = fetch(&url, dir.path(), Uuid::new_v4(), "raw", &local(), uncancelled()).await;
        assert!(matches!(system, Err(ImageError::Tls(_))), "{system:?}");
        // A name the certificate does not carry.
        let other = format!("https://127.0.0.1:{port}/i.raw");
        let wrong =
            fetch(&other, dir.path(), Uuid::new_v4(), "raw", &trusting, uncancelled()).await;
        assert!(matches!(wrong, Err(ImageError::Tls(_))), "{wrong:?}");
        assert_eq!(left_in(dir.path()).len(), 2, "the CA and the one image");
    }

    #[tokio::test]
    async fn an_import_stops_at_the_cap_when_cancelled_or_dropped_and_leaves_no_part() {
        let dir = tempfile::tempdir().unwrap();
        let bs = dir.path().join("bs");
        let zero = |max_bytes| ImportPolicy {
            file_dirs: vec!["/dev".into()],
            max_bytes,
            ..Default::default()
        };
        let (capped, endless) = (zero(1 << 20), zero(u64::MAX));
        let got = fetch("file:///dev/zero", &bs, Uuid::new_v4(), "raw", &capped, uncancelled());
        assert!(matches!(got.await, Err(ImageError::TooLarge(_))));
        assert!(left_in(&bs).is_empty(), "a .part was left");
        let soon = tokio::time::sleep(std::time::Duration::from_millis(100));
        let got = fetch("file:///dev/zero", &bs, Uuid::new_v4(), "raw", &endless, soon).await;
        assert!(matches!(got, Err(ImageError::Cancelled)), "{got:?}");
        assert!(left_in(&bs).is_empty(), "a cancelled import left a .part");
        let running =
            fetch("file:///dev/zero", &bs, Uuid::new_v4(), "raw", &endless, uncancelled());
        let dropped = tokio::time::timeout(std::time::Duration::from_millis(100), running).await;
        assert!(dropped.is_err());
        assert!(left_in(&bs).is_empty(), "a dropped import left a .part");
        // What a killed process left is removed when the next one starts.
        std::fs::write(bs.join("a.qcow2.part"), b"half").unwrap();
        std::fs::write(bs.join("b.qcow2"), b"whole").unwrap();
        assert_eq!(remove_partial_imports(&bs).unwrap(), 1);
        assert_eq!(left_in(&bs).len(), 1);
        for local in ["127.0.0.1", "169.254.169.254", "0.0.0.0", "::1"] {
            assert!(local_address(local.parse().unwrap()), "{local}");
        }
        assert!(!local_address("192.0.2.7".parse().unwrap()));
    }
}
