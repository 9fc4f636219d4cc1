//! Images: downloaded from `file://` or `http://` URLs into a backup storage directory, with
//! their size and SHA-256 recorded.
//!
//! A download goes to a temporary name and is renamed into place once complete and hashed,
//! so an image file that exists is whole; a failed one leaves no `.part` behind. Only plain
//! `http://` is fetched (no TLS client in the node): images come from a local mirror or the
//! file system.
//!
//! An import reads what the node can reach on a caller's behalf, so what it may read is the
//! server's decision ([`ImportPolicy`]), checked on the parsed URL and on the addresses its
//! host resolves to (the connection goes to the checked address, never resolved again):
//! `file://` only under configured directories (after resolving symbolic links and `..`),
//! never loopback, link-local, unspecified, multicast or this node's own addresses unless
//! allowed (so an import cannot read the API's `/metrics` or a cloud's metadata service),
//! optionally only listed hosts, at most `max_bytes`, within `timeout`.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

/// Why an image could not be fetched. `field` is the request field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The URL is not one this node can fetch.
    #[error("`url`: {0}")]
    BadUrl(String),
    /// Reading or writing failed.
    #[error("fetching the image failed: {0}")]
    Io(#[from] std::io::Error),
    /// The HTTP server said no.
    #[error("the image server answered `{0}`")]
    Http(String),
    /// The image is larger than the node takes.
    #[error("the image is larger than the {0} bytes this node takes")]
    TooLarge(u64),
    /// The import took longer than the node allows.
    #[error("the import did not finish within {0} s")]
    TimedOut(u64),
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
    /// Hosts (`name` or `name:port`) `http://` URLs may name; empty: any that passes the
    /// address checks.
    pub allowed_hosts: Vec<String>,
    /// Whether loopback, link-local and this node's own addresses may be fetched from.
    pub allow_local: bool,
    /// The largest image taken.
    pub max_bytes: u64,
    /// How long an import may take.
    pub timeout: std::time::Duration,
}

impl Default for ImportPolicy {
    fn default() -> Self {
        ImportPolicy {
            file_dirs: Vec::new(),
            allowed_hosts: Vec::new(),
            allow_local: false,
            max_bytes: 64 << 30,
            timeout: std::time::Duration::from_secs(3600),
        }
    }
}

/// Where an import reads from, once checked.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    File(PathBuf),
    Http { addr: std::net::SocketAddr, authority: String, path: String },
}

/// Checks that `url` has a scheme this node can fetch (the policy is checked by [`fetch`]).
pub fn check_url(url: &str) -> Result<(), ImageError> {
    if url.starts_with("file:///") || url.starts_with("http://") {
        Ok(())
    } else {
        Err(ImageError::BadUrl(format!("`{url}` is neither file:///... nor http://...")))
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
    resolve(url, policy).await.map(drop)
}

async fn resolve(url: &str, policy: &ImportPolicy) -> Result<Source, ImageError> {
    check_url(url)?;
    if let Some(file) = url.strip_prefix("file://") {
        let refused = || {
            ImageError::BadUrl(format!(
                "`{url}` is not under a directory this node imports files from"
            ))
        };
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
    let rest = url.trim_start_matches("http://");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty() || authority.contains('@') || authority.chars().any(char::is_control) {
        return Err(ImageError::BadUrl(format!("`{url}` names no host")));
    }
    if !policy.allowed_hosts.is_empty() && !policy.allowed_hosts.iter().any(|h| h == authority) {
        return Err(ImageError::BadUrl(format!("`{authority}` is not a host images come from")));
    }
    let target =
        if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(&target)
        .await
        .map_err(|e| ImageError::BadUrl(format!("`{authority}` does not resolve: {e}")))?
        .collect();
    let addr = *addrs
        .first()
        .ok_or_else(|| ImageError::BadUrl(format!("`{authority}` does not resolve")))?;
    if !policy.allow_local && addrs.iter().any(|a| local_address(a.ip())) {
        return Err(ImageError::BadUrl(format!(
            "`{authority}` is a local address (loopback, link-local or this node's own); images are not imported from it"
        )));
    }
    Ok(Source::Http { addr, authority: authority.to_owned(), path: path.to_owned() })
}

/// Fetches `url` into `dir` as `<image>.<format>`, as `policy` allows: refused before
/// anything is read if the URL is outside it, and stopped (its `.part` removed) past
/// `max_bytes` or `timeout`.
pub async fn fetch(
    url: &str,
    dir: &Path,
    image: Uuid,
    format: &str,
    policy: &ImportPolicy,
) -> Result<Fetched, ImageError> {
    let source = resolve(url, policy).await?;
    tokio::fs::create_dir_all(dir).await?;
    let path = dir.join(format!("{image}.{format}"));
    let part = dir.join(format!("{image}.{format}.part"));
    let copied = tokio::time::timeout(policy.timeout, copy(&source, &part, policy.max_bytes)).await;
    let result = match copied {
        Ok(Ok(done)) => {
            tokio::fs::rename(&part, &path).await.map(|()| done).map_err(ImageError::from)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ImageError::TimedOut(policy.timeout.as_secs())),
    };
    match result {
        Ok((size, checksum)) => Ok(Fetched { path, size, checksum }),
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            Err(e)
        }
    }
}

/// Copies `source` into `part`, hashing it; at most `max_bytes`.
async fn copy(source: &Source, part: &Path, max_bytes: u64) -> Result<(u64, String), ImageError> {
    let mut out = tokio::fs::File::create(part).await?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let mut take = |bytes: &[u8], size: &mut u64| -> Result<(), ImageError> {
        *size = size
            .checked_add(bytes.len() as u64)
            .filter(|s| *s <= max_bytes)
            .ok_or(ImageError::TooLarge(max_bytes))?;
        hasher.update(bytes);
        Ok(())
    };
    match source {
        Source::File(file) => {
            let mut input = tokio::fs::File::open(file).await?;
            loop {
                let n = input.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                take(&buf[..n], &mut size)?;
                out.write_all(&buf[..n]).await?;
            }
        }
        Source::Http { addr, authority, path: path_part } => {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            let request = format!(
                "GET /{path_part} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await?;
            // Read the head, then stream the body to the file.
            let mut head = Vec::new();
            let body_start;
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    return Err(ImageError::Http(
                        "the connection closed before the headers ended".into(),
                    ));
                }
                head.extend_from_slice(&buf[..n]);
                if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    body_start = at + 4;
                    break;
                }
            }
            let status_line = String::from_utf8_lossy(
                &head[..head.iter().position(|b| *b == b'\r').unwrap_or(0)],
            )
            .into_owned();
            if status_line.split_whitespace().nth(1).is_none_or(|code| code != "200") {
                return Err(ImageError::Http(status_line));
            }
            let first = head[body_start..].to_vec();
            take(&first, &mut size)?;
            out.write_all(&first).await?;
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                take(&buf[..n], &mut size)?;
                out.write_all(&buf[..n]).await?;
            }
        }
    }
    out.flush().await?;
    out.sync_all().await?;
    Ok((size, format!("sha256:{:x}", hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_urls_are_copied_sized_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src.raw");
        std::fs::write(&source, b"hello").unwrap();
        let image = Uuid::new_v4();
        let url = format!("file://{}", source.display());
        let bs = dir.path().join("bs");
        // Outside the policy's directories (none by default): refused, nothing read.
        let refused = fetch(&url, &bs, image, "raw", &ImportPolicy::default()).await;
        assert!(matches!(refused, Err(ImageError::BadUrl(_))), "{refused:?}");
        let policy = ImportPolicy { file_dirs: vec![dir.path().to_owned()], ..Default::default() };
        // A name that leaves the directory through `..` is the file it resolves to.
        let escape = format!("file://{}/../../etc/passwd", dir.path().display());
        assert!(matches!(
            fetch(&escape, &bs, image, "raw", &policy).await,
            Err(ImageError::BadUrl(_))
        ));
        let got = fetch(&url, &bs, image, "raw", &policy).await.unwrap();
        assert_eq!(got.size, 5);
        assert_eq!(
            got.checksum,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(std::fs::read(&got.path).unwrap(), b"hello");
        assert!(matches!(check_url("ftp://x"), Err(ImageError::BadUrl(_))));
    }

    #[tokio::test]
    async fn http_urls_are_streamed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await.unwrap();
            socket.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").await.unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let url = format!("http://{addr}/images/a.raw");
        // Loopback is this node: refused unless allowed.
        let refused =
            fetch(&url, dir.path(), Uuid::new_v4(), "raw", &ImportPolicy::default()).await;
        assert!(matches!(refused, Err(ImageError::BadUrl(_))), "{refused:?}");
        let policy = ImportPolicy { allow_local: true, ..Default::default() };
        let got = fetch(&url, dir.path(), Uuid::new_v4(), "raw", &policy).await.unwrap();
        assert_eq!((got.size, std::fs::read(&got.path).unwrap()), (5, b"hello".to_vec()));
    }

    #[tokio::test]
    async fn an_endless_source_stops_at_the_cap_and_leaves_no_part() {
        let dir = tempfile::tempdir().unwrap();
        let policy = ImportPolicy {
            file_dirs: vec!["/dev".into()],
            max_bytes: 1 << 20,
            ..Default::default()
        };
        let bs = dir.path().join("bs");
        let got = fetch("file:///dev/zero", &bs, Uuid::new_v4(), "raw", &policy).await;
        assert!(matches!(got, Err(ImageError::TooLarge(_))), "{got:?}");
        assert_eq!(std::fs::read_dir(&bs).unwrap().count(), 0, "a .part was left");
        for local in ["127.0.0.1", "169.254.169.254", "0.0.0.0", "::1"] {
            assert!(local_address(local.parse().unwrap()), "{local}");
        }
        assert!(!local_address("192.0.2.7".parse().unwrap()));
    }
}
