//! The SHA-256 digest of a whole file, which both ends of a copy between hosts compute: the
//! copy is sealed only when the bytes that arrived are the bytes that left, so a volume
//! moved between local storages is proven identical before its source is deleted.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// The size and lowercase-hex SHA-256 of the file at `path` (read in 1 MiB blocks).
pub fn file_sha256(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, crate::tls::hex(&hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_what_the_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let (size, sha) = file_sha256(&path).unwrap();
        assert_eq!(size, 3);
        assert_eq!(sha, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        std::fs::write(&path, b"abd").unwrap();
        assert_ne!(file_sha256(&path).unwrap().1, sha);
    }
}
