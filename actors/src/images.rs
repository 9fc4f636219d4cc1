//! Images: downloaded from `file://` or `http://` URLs into a backup storage directory, with
//! their size and SHA-256 recorded.
//!
//! A download goes to a temporary name and is renamed into place once complete and hashed,
//! so an image file that exists is whole. Only plain `http://` is fetched (no TLS stack in the
//! node): images come from a local mirror or the file system.

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

/// Checks that `url` is one this node can fetch.
pub fn check_url(url: &str) -> Result<(), ImageError> {
    if url.starts_with("file:///") || url.starts_with("http://") {
        Ok(())
    } else {
        Err(ImageError::BadUrl(format!("`{url}` is neither file:///... nor http://...")))
    }
}

/// Fetches `url` into `dir` as `<image>.<format>`.
pub async fn fetch(
    url: &str,
    dir: &Path,
    image: Uuid,
    format: &str,
) -> Result<Fetched, ImageError> {
    check_url(url)?;
    tokio::fs::create_dir_all(dir).await?;
    let path = dir.join(format!("{image}.{format}"));
    let part = dir.join(format!("{image}.{format}.part"));
    let mut out = tokio::fs::File::create(&part).await?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    if let Some(file) = url.strip_prefix("file://") {
        let mut input = tokio::fs::File::open(file).await?;
        loop {
            let n = input.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).await?;
            size += n as u64;
        }
    } else {
        let rest = url.trim_start_matches("http://");
        let (authority, path_part) = rest.split_once('/').unwrap_or((rest, ""));
        let addr =
            if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
        let mut stream = tokio::net::TcpStream::connect(&addr).await?;
        let request =
            format!("GET /{path_part} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
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
        let status_line =
            String::from_utf8_lossy(&head[..head.iter().position(|b| *b == b'\r').unwrap_or(0)])
                .into_owned();
        if status_line.split_whitespace().nth(1).is_none_or(|code| code != "200") {
            return Err(ImageError::Http(status_line));
        }
        let first = &head[body_start..];
        hasher.update(first);
        out.write_all(first).await?;
        size += first.len() as u64;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).await?;
            size += n as u64;
        }
    }
    out.flush().await?;
    out.sync_all().await?;
    drop(out);
    tokio::fs::rename(&part, &path).await?;
    let checksum = format!("sha256:{:x}", hasher.finalize());
    Ok(Fetched { path, size, checksum })
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
        let got =
            fetch(&format!("file://{}", source.display()), &dir.path().join("bs"), image, "raw")
                .await
                .unwrap();
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
        let got = fetch(&format!("http://{addr}/images/a.raw"), dir.path(), Uuid::new_v4(), "raw")
            .await
            .unwrap();
        assert_eq!((got.size, std::fs::read(&got.path).unwrap()), (5, b"hello".to_vec()));
    }
}
