//! The MN's certificate authority, and the one-time secrets that enroll agents with it.
//!
//! The MN keeps, in one directory (mode 0700, `pki/` under its data directory), made on its
//! first start:
//!
//! - `ca.key` (0600) and `ca.crt`: its CA, which signs the MN's client certificate and every
//!   agent's certificate;
//! - `mn.key` (0600) and `mn.crt`: the MN's client certificate, marked for client
//!   authentication only, the one certificate agents accept from a client;
//! - `bootstrap/`: one file (0600) per bootstrap secret not used yet, named by the secret's
//!   SHA-256 and holding when it expires (an expired one is forgotten when the CA is next
//!   opened). The secret itself is kept nowhere on the MN.
//!
//! Enrolling a host, the design in full:
//!
//! 1. The operator runs `strato agent-bootstrap --out FILE` on the MN ([`Pki::mint`]). FILE
//!    (0600) holds a fresh random secret and the CA's certificate. It goes to the host by
//!    whatever carries files there safely (scp), and the agent starts with
//!    `--bootstrap-file FILE`: the secret never appears on a command line or in an
//!    environment.
//! 2. The agent, holding no certificate from the MN yet, makes its key and serves TLS with a
//!    self-signed certificate over it, accepting only clients with a certificate from the CA
//!    in FILE. So it reveals the secret to the real MN only.
//! 3. The MN dials the host it was told to add. The agent sends the secret and its public key
//!    ([`crate::ServerHello::Enroll`]); the MN checks the key is the one the agent proved it
//!    holds in the handshake, spends the secret ([`Pki::enroll`]: single use, within
//!    [`BOOTSTRAP_VALIDITY`]), signs a certificate for the key (marked for server
//!    authentication, named after the host's UUID), records its fingerprint as the host's pin
//!    and sends the certificate. The agent stores it and closes the link; the MN dials again
//!    and from then on both ends authenticate with certificates.
//!
//! Spending is the removal of the secret's file, so two enrollments racing with one secret
//! cannot both win, and an MN restart forgets nothing. A host deleted and added again keeps
//! its certificate: it was issued by this CA, so the new host record trusts and pins it.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::tls::{
    AgentPublicKey, Fingerprint, MnTls, TlsError, certificate_from_pem, hex, key_from_pem,
    private_dir, private_file, private_key_der, random, read, write_private,
};

/// How long a bootstrap secret can be used after it was made.
pub const BOOTSTRAP_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// The CA's parameters. Only its name, key usages and key identifier method go into what it
/// signs, so rebuilding them (rather than parsing `ca.crt`) makes the same issuer.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "Strato management node CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    params
}

/// A leaf certificate's parameters: named `name`, for `usage` only.
fn leaf_params(name: &str, usage: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params
}

/// A certificate the MN issued to an agent.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate, PEM.
    pub certificate: String,
    /// Its fingerprint, the host's pin.
    pub fingerprint: Fingerprint,
}

/// The MN's CA, its client certificate and the bootstrap secrets not used yet.
pub struct Pki {
    dir: PathBuf,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    tls: Arc<MnTls>,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Pki {
    /// Opens the MN's CA in `dir`, making it on first use, and repairs the modes of its
    /// directory, keys and secrets.
    pub fn open(dir: &Path) -> Result<Pki, TlsError> {
        if !dir.join("ca.key").exists() {
            create(dir)?;
        }
        private_dir(dir)?;
        private_dir(&dir.join("bootstrap"))?;
        for key in ["ca.key", "mn.key"] {
            private_file(&dir.join(key))?;
        }
        sweep(&dir.join("bootstrap"))?;
        let path = |name: &str| dir.join(name);
        let ca_key = key_from_pem(&read(&path("ca.key"))?, &path("ca.key"))?;
        let ca_pem = read(&path("ca.crt"))?;
        let ca = certificate_from_pem(&ca_pem, &path("ca.crt"))?;
        let mn_key = key_from_pem(&read(&path("mn.key"))?, &path("mn.key"))?;
        let mn = certificate_from_pem(&read(&path("mn.crt"))?, &path("mn.crt"))?;
        let tls = Arc::new(MnTls::new(ca, mn, private_key_der(&mn_key))?);
        Ok(Pki { dir: dir.to_owned(), ca_pem, issuer: Issuer::new(ca_params(), ca_key), tls })
    }

    /// The MN's end of TLS.
    pub fn tls(&self) -> &Arc<MnTls> {
        &self.tls
    }

    /// Writes a bootstrap file to `out` (mode 0600) with `hosts` fresh secrets (one per host
    /// the agent serves) and the CA's certificate, and records the secrets as unused.
    pub fn mint(&self, out: &Path, hosts: usize) -> Result<(), TlsError> {
        let expires = unix_now() + BOOTSTRAP_VALIDITY.as_secs();
        let mut text = String::from(
            "# A Strato agent bootstrap file, made by `strato agent-bootstrap` on the management node.\n\
             # Start the agent with `--bootstrap-file` naming this file, and keep it private (0600).\n\
             # Each secret enrolls one host, once, within 24 hours of its making.\n",
        );
        for _ in 0..hosts.max(1) {
            let mut secret = [0u8; 32];
            random(&mut secret)?;
            let secret = hex(&secret);
            write_private(&self.secret_path(&secret), expires.to_string().as_bytes())?;
            text.push_str(&format!("secret {secret}\n"));
        }
        text.push_str(&self.ca_pem);
        write_private(out, text.as_bytes())
    }

    fn secret_path(&self, secret: &str) -> PathBuf {
        self.dir.join("bootstrap").join(hex(&Sha256::digest(secret.as_bytes())))
    }

    /// Spends `secret`: succeeds once per secret minted here, before it expires.
    fn redeem(&self, secret: &str) -> Result<(), TlsError> {
        let path = self.secret_path(secret);
        let expires = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().unwrap_or(0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(TlsError::SecretRefused),
            Err(source) => return Err(TlsError::Io { path, source }),
        };
        // Whoever removes the file spends the secret; a racing enrollment finds it gone.
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(TlsError::SecretRefused),
            Err(source) => return Err(TlsError::Io { path, source }),
        }
        if unix_now() > expires {
            return Err(TlsError::SecretRefused);
        }
        Ok(())
    }

    /// Enrolls host `host`: spends `secret` and issues a certificate for the agent's raw
    /// ECDSA P-256 `public_key`. The caller pins [`Issued::fingerprint`] before the agent
    /// gets the certificate.
    pub fn enroll(&self, secret: &str, public_key: &[u8], host: Uuid) -> Result<Issued, TlsError> {
        let key = AgentPublicKey(public_key);
        if !key.is_p256() {
            return Err(TlsError::BadPublicKey);
        }
        let certificate = leaf_params(&host.to_string(), ExtendedKeyUsagePurpose::ServerAuth)
            .signed_by(&key, &self.issuer)?;
        self.redeem(secret)?;
        Ok(Issued {
            certificate: certificate.pem(),
            fingerprint: Fingerprint::of(certificate.der()),
        })
    }
}

/// Makes the unused secrets in `secrets` private and forgets the expired ones. A secret
/// spent by another process meanwhile is simply gone.
fn sweep(secrets: &Path) -> Result<(), TlsError> {
    let io = |source| TlsError::Io { path: secrets.to_owned(), source };
    let now = unix_now();
    for entry in std::fs::read_dir(secrets).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let expires = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().unwrap_or(0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(TlsError::Io { path, source }),
        };
        let kept = if now > expires {
            std::fs::remove_file(&path).map_err(|source| TlsError::Io { path, source })
        } else {
            private_file(&path)
        };
        match kept {
            Err(TlsError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Makes the CA and the MN's certificate in a fresh directory beside `dir` and renames it to
/// `dir`, so a process opening the CA at the same moment finds all of it or none.
fn create(dir: &Path) -> Result<(), TlsError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    private_dir(parent)?;
    let mut nonce = [0u8; 8];
    random(&mut nonce)?;
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent.join(format!(".{name}.new-{}", hex(&nonce)));
    let made = (|| {
        private_dir(&tmp.join("bootstrap"))?;
        let ca_key = KeyPair::generate()?;
        let ca = ca_params().self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params(), &ca_key);
        let mn_key = KeyPair::generate()?;
        let mn = leaf_params("Strato management node", ExtendedKeyUsagePurpose::ClientAuth)
            .signed_by(&mn_key, &issuer)?;
        write_private(&tmp.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
        write_private(&tmp.join("ca.crt"), ca.pem().as_bytes())?;
        write_private(&tmp.join("mn.key"), mn_key.serialize_pem().as_bytes())?;
        write_private(&tmp.join("mn.crt"), mn.pem().as_bytes())?;
        match std::fs::rename(&tmp, dir) {
            Ok(()) => Ok(()),
            // Another process made it first: use theirs.
            Err(_) if dir.join("ca.key").exists() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(())
            }
            Err(source) => Err(TlsError::Io { path: dir.to_owned(), source }),
        }
    })();
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    } else {
        tracing::info!(dir = %dir.display(), "made the MN's certificate authority");
    }
    made
}

/// One bootstrap secret and the CA it trusts, as an agent serving one host needs them.
#[derive(Clone)]
pub struct BootstrapSecret {
    /// The secret.
    pub secret: String,
    /// The MN's CA certificate, PEM.
    pub ca_pem: String,
}

impl fmt::Debug for BootstrapSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapSecret").finish_non_exhaustive()
    }
}

/// A bootstrap file as an agent reads it.
#[derive(Debug)]
pub struct Bootstrap {
    secrets: Vec<String>,
    ca_pem: String,
}

impl Bootstrap {
    /// Reads the bootstrap file at `path`, repairing its mode to 0600.
    pub fn read(path: &Path) -> Result<Bootstrap, TlsError> {
        private_file(path)?;
        let text = read(path)?;
        let bad = |reason: &str| TlsError::BootstrapFile {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let secrets: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("secret "))
            .map(|s| s.trim().to_owned())
            .collect();
        if secrets.is_empty() {
            return Err(bad("it holds no secret"));
        }
        let begin = text
            .find("-----BEGIN CERTIFICATE-----")
            .ok_or_else(|| bad("it holds no CA certificate"))?;
        let end = "-----END CERTIFICATE-----";
        let stop = text[begin..].find(end).ok_or_else(|| bad("its CA certificate is cut short"))?;
        let ca_pem = format!("{}\n", &text[begin..begin + stop + end.len()]);
        certificate_from_pem(&ca_pem, path)?;
        Ok(Bootstrap { secrets, ca_pem })
    }

    /// The secret for host `index` of the agent (the only one, for an agent of one host).
    pub fn secret(&self, index: usize) -> Option<BootstrapSecret> {
        let secret = self.secrets.get(index)?.clone();
        Some(BootstrapSecret { secret, ca_pem: self.ca_pem.clone() })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_ca_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let pki_dir = dir.path().join("mn").join("pki");
        let first = Pki::open(&pki_dir).unwrap();
        assert_eq!(mode(&pki_dir), 0o700);
        assert_eq!(mode(&pki_dir.join("ca.key")), 0o600);
        assert_eq!(mode(&pki_dir.join("mn.key")), 0o600);
        assert_eq!(mode(&pki_dir.join("bootstrap")), 0o700);
        // Loosened modes are repaired at the next open, and the CA is the same.
        std::fs::set_permissions(pki_dir.join("ca.key"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        std::fs::set_permissions(&pki_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let again = Pki::open(&pki_dir).unwrap();
        assert_eq!(mode(&pki_dir.join("ca.key")), 0o600);
        assert_eq!(mode(&pki_dir), 0o700);
        assert_eq!(first.ca_pem, again.ca_pem);
    }

    #[test]
    fn a_secret_enrolls_once_and_only_a_p256_key() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::open(&dir.path().join("pki")).unwrap();
        let file = dir.path().join("bootstrap");
        pki.mint(&file, 2).unwrap();
        assert_eq!(mode(&file), 0o600);
        let bootstrap = Bootstrap::read(&file).unwrap();
        let (a, b) = (bootstrap.secret(0).unwrap(), bootstrap.secret(1).unwrap());
        assert!(bootstrap.secret(2).is_none());
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.ca_pem, pki.ca_pem);
        let key = KeyPair::generate().unwrap();
        let host = Uuid::new_v4();
        assert!(matches!(pki.enroll(&a.secret, b"not a key", host), Err(TlsError::BadPublicKey)));
        let issued = pki.enroll(&a.secret, key.public_key_raw(), host).unwrap();
        assert!(issued.certificate.contains("BEGIN CERTIFICATE"));
        // Spent: the same secret enrolls nothing more; the other one still works once.
        assert!(matches!(
            pki.enroll(&a.secret, key.public_key_raw(), host),
            Err(TlsError::SecretRefused)
        ));
        assert!(matches!(
            pki.enroll("00", key.public_key_raw(), host),
            Err(TlsError::SecretRefused)
        ));
        pki.enroll(&b.secret, key.public_key_raw(), Uuid::new_v4()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("pki/bootstrap")).unwrap().count(), 0);
    }

    #[test]
    fn an_expired_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::open(&dir.path().join("pki")).unwrap();
        let file = dir.path().join("bootstrap");
        pki.mint(&file, 1).unwrap();
        let secret = Bootstrap::read(&file).unwrap().secret(0).unwrap().secret;
        std::fs::write(pki.secret_path(&secret), "1").unwrap();
        let key = KeyPair::generate().unwrap();
        assert!(matches!(
            pki.enroll(&secret, key.public_key_raw(), Uuid::new_v4()),
            Err(TlsError::SecretRefused)
        ));
        // One left unused past its time is forgotten when the CA is opened next.
        pki.mint(&file, 1).unwrap();
        let unused = Bootstrap::read(&file).unwrap().secret(0).unwrap().secret;
        std::fs::write(pki.secret_path(&unused), "1").unwrap();
        Pki::open(&dir.path().join("pki")).unwrap();
        assert!(!pki.secret_path(&unused).exists());
    }
}
