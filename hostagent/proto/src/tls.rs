//! The link's security: TLS 1.3 with a certificate on each end (rustls on ring), the agent's
//! key and certificates on disk, and the file modes that keep secrets private.
//!
//! Why: the link commands VMs. Anyone who can open it can stop, destroy or redefine every
//! guest on a host, so the agent must know it talks to its management node, the MN must know
//! it talks to the machine it enrolled, and nobody in between may read or change a frame.
//!
//! How each end decides:
//!
//! - **The agent** trusts one certificate authority, the MN's (see [`crate::pki`]), and asks
//!   every client for a certificate: rustls' WebPKI verifier accepts only a certificate that
//!   chains to that CA and is marked for client authentication. Only the MN's own certificate
//!   is; the certificates the CA issues to agents are marked for server authentication only,
//!   so a host cannot pose as the MN to another host.
//! - **The MN** pins each host's certificate: the host's record keeps the SHA-256
//!   [`Fingerprint`] of the certificate the MN issued to it, and a link whose agent presents
//!   another is refused. A host without a pin (just added, or deleted and added again) is
//!   trusted if its certificate was issued by this MN's CA, which the MN does only after a
//!   valid bootstrap secret; the MN then pins it. The pin is checked right after the TLS
//!   handshake, before anything the agent says is believed, which is why the handshake itself
//!   accepts any certificate whose owner proves it holds the key (see
//!   `CheckedAfterHandshake`): an agent waiting to enroll has no certificate from the CA
//!   yet, only a self-signed one over its key.
//!
//! An agent keeps its key (made on its first start, mode 0600), the certificate the MN issued
//! and the MN's CA certificate in `tls/` under its data directory ([`AgentIdentity`]). Only
//! TLS 1.3 is spoken, with no session resumption: every session authenticates in full.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rcgen::{CertificateParams, KeyPair, PublicKeyData};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::client::LinkError;

/// Why a key, a certificate or a secret could not be made, read or accepted.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file or directory could not be read, written or given its mode.
    #[error("cannot use {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file does not hold what it should.
    #[error("{path} holds no valid {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What it should hold (`certificate`, `private key`, ...).
        what: &'static str,
    },
    /// rustls refused a configuration (a key that does not match its certificate, say).
    #[error("the TLS configuration is invalid")]
    Rustls(#[from] rustls::Error),
    /// A certificate verifier could not be built from the CA.
    #[error("cannot build a certificate verifier on the MN's CA")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A key or certificate could not be made.
    #[error("cannot make a key or certificate")]
    Certificate(#[from] rcgen::Error),
    /// The system's random number generator failed.
    #[error("the system's random number generator failed")]
    Random,
    /// A bootstrap file is malformed.
    #[error("{path} is not a bootstrap file from `strato agent-bootstrap`: {reason}")]
    BootstrapFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The MN does not know the bootstrap secret an agent presented, or it was used already,
    /// or it expired.
    #[error(
        "the bootstrap secret is unknown, spent or expired; make a new bootstrap file with `strato agent-bootstrap`"
    )]
    SecretRefused,
    /// The agent has no certificate and was given no bootstrap file.
    #[error(
        "the agent in {dir} is not enrolled yet: start it with --bootstrap-file FILE, FILE made by `strato agent-bootstrap` on the management node"
    )]
    NotEnrolled {
        /// Its data directory.
        dir: PathBuf,
    },
    /// The public key an agent asked a certificate for is not one the MN signs.
    #[error("the agent's public key is not an ECDSA P-256 key")]
    BadPublicKey,
    /// The certificate the MN issued does not carry the agent's key.
    #[error("the certificate the MN issued is not for this agent's key")]
    WrongKey,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_owned(), source }
}

/// The crypto provider every TLS configuration here uses: rustls' ring provider.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// Fills `buf` from the system's secure random number generator.
pub(crate) fn random(buf: &mut [u8]) -> Result<(), TlsError> {
    provider().secure_random.fill(buf).map_err(|_| TlsError::Random)
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a certificate's DER encoding: what the MN pins for each host.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of `certificate`.
    pub fn of(certificate: &CertificateDer<'_>) -> Self {
        Fingerprint(Sha256::digest(certificate.as_ref()).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex(&self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An agent's public key as it travels in an enrollment: the raw ECDSA P-256 point. Agents
/// make P-256 keys only, so the MN signs nothing else.
#[derive(Debug)]
pub(crate) struct AgentPublicKey<'a>(pub(crate) &'a [u8]);

impl PublicKeyData for AgentPublicKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl AgentPublicKey<'_> {
    /// Its SubjectPublicKeyInfo, as a certificate over it carries it.
    pub(crate) fn spki(&self) -> Vec<u8> {
        self.subject_public_key_info()
    }

    /// Whether it is a well-formed uncompressed P-256 point (65 bytes, tag 4).
    pub(crate) fn is_p256(&self) -> bool {
        self.0.len() == 65 && self.0[0] == 4
    }
}

/// What the MN learns of an agent's certificate in the handshake.
#[derive(Clone, Debug)]
pub struct AgentCertificate {
    /// Its fingerprint.
    pub fingerprint: Fingerprint,
    /// Whether this MN's CA issued it (to some host; the pin says whether to this one).
    pub issued_here: bool,
    /// Its SubjectPublicKeyInfo, to check an enrolling agent asks a certificate for the key
    /// it proved it holds.
    spki: Vec<u8>,
}

impl AgentCertificate {
    /// Whether the certificate carries the raw public key `public_key`.
    pub(crate) fn carries(&self, public_key: &[u8]) -> bool {
        AgentPublicKey(public_key).spki() == self.spki
    }
}

/// The MN's end of TLS: its client certificate, and its CA to tell the certificates it
/// issued.
pub struct MnTls {
    config: Arc<ClientConfig>,
    ca: RootCertStore,
}

impl fmt::Debug for MnTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MnTls").finish_non_exhaustive()
    }
}

impl MnTls {
    /// The MN's TLS from its CA certificate and its own certificate and key.
    pub fn new(
        ca: CertificateDer<'static>,
        certificate: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        roots.add(ca)?;
        let config = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CheckedAfterHandshake {
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_client_auth_cert(vec![certificate], key)?;
        Ok(MnTls { config: Arc::new(config), ca: roots })
    }

    /// Dials the agent at `addr` and runs the TLS handshake; returns the stream and what the
    /// agent's certificate is. Whether to believe the agent is the caller's decision (see
    /// [`crate::Link::connect`]).
    pub async fn dial(
        &self,
        addr: SocketAddr,
    ) -> Result<(TlsStream<TcpStream>, AgentCertificate), LinkError> {
        let tcp =
            TcpStream::connect(addr).await.map_err(|source| LinkError::Connect { addr, source })?;
        tcp.set_nodelay(true).map_err(|source| LinkError::Connect { addr, source })?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let stream = connector
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|source| LinkError::Handshake { addr, source })?;
        let presented = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
        let no_certificate = || LinkError::Handshake {
            addr,
            source: io::Error::other("the agent presented no certificate"),
        };
        let certificate = presented.ok_or_else(no_certificate)?;
        let parsed = ParsedCertificate::try_from(&certificate)
            .map_err(|e| LinkError::Handshake { addr, source: io::Error::other(e) })?;
        let issued_here = rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.ca,
            &[],
            UnixTime::now(),
            provider().signature_verification_algorithms.all,
        )
        .is_ok();
        let agent = AgentCertificate {
            fingerprint: Fingerprint::of(&certificate),
            issued_here,
            spki: parsed.subject_public_key_info().to_vec(),
        };
        Ok((stream, agent))
    }
}

/// The MN's handshake verifier: it checks that the agent's certificate parses and that the
/// agent holds its key (the handshake's signature), and leaves the decision to trust the
/// agent to the link, which compares the certificate with the host's pin right after the
/// handshake. It accepts the self-signed certificate of an agent waiting to enroll, which is
/// safe because such an agent gets nothing but a chance to present a bootstrap secret.
#[derive(Debug)]
struct CheckedAfterHandshake {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for CheckedAfterHandshake {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        ParsedCertificate::try_from(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("the link speaks TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The agent's TLS configuration: it presents `certificate` and accepts only clients with a
/// client certificate from the CA `ca`.
fn agent_config(
    ca: CertificateDer<'static>,
    certificate: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![certificate], key)?;
    // No resumption: every session shows its certificate again.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// One PEM certificate from `text` (read from `path`, for the error).
pub(crate) fn certificate_from_pem(
    text: &str,
    path: &Path,
) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(text.as_bytes())
        .map_err(|_| TlsError::Invalid { path: path.to_owned(), what: "certificate" })
}

/// A key pair from PEM `text` (read from `path`, for the error).
pub(crate) fn key_from_pem(text: &str, path: &Path) -> Result<KeyPair, TlsError> {
    KeyPair::from_pem(text)
        .map_err(|_| TlsError::Invalid { path: path.to_owned(), what: "private key" })
}

/// `key` as rustls takes it.
pub(crate) fn private_key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// Reads a file to a string.
pub(crate) fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(io_error(path))
}

/// Creates `path` (and its parents) if it is missing and makes it mode 0700: readable by
/// its owner only. A looser mode found on an existing directory is repaired, with a warning.
pub fn private_dir(path: &Path) -> Result<(), TlsError> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(io_error(path))?;
    restrict(path, 0o700)
}

/// Makes the existing file `path` mode 0600, warning if it was readable by others.
pub fn private_file(path: &Path) -> Result<(), TlsError> {
    restrict(path, 0o600)
}

fn restrict(path: &Path, mode: u32) -> Result<(), TlsError> {
    let found = std::fs::metadata(path).map_err(io_error(path))?.permissions().mode() & 0o777;
    if found & !mode != 0 {
        tracing::warn!(path = %path.display(), found = format!("{found:o}"), repaired = format!("{mode:o}"), "a private file or directory was open to others; mode repaired");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(io_error(path))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` with mode 0600, atomically: a reader sees the old content or the
/// new, never a part, and the file is never readable by others, not even for a moment.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(name);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        io::Write::write_all(&mut file, bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    written.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        TlsError::Io { path: path.to_owned(), source }
    })
}

/// An agent's key and certificates, in `tls/` under its data directory:
///
/// - `agent.key`: its ECDSA P-256 key, made on its first start (mode 0600);
/// - `agent.crt`: the certificate the MN issued for that key when it enrolled;
/// - `ca.crt`: the MN's CA certificate, the one issuer of clients it accepts.
///
/// The key never leaves the host: the agent asks the MN to sign its public key.
pub struct AgentIdentity {
    dir: PathBuf,
    key: KeyPair,
}

impl fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentIdentity").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl AgentIdentity {
    fn tls_dir(data_dir: &Path) -> PathBuf {
        data_dir.join("tls")
    }

    /// Whether the agent whose data directory is `data_dir` holds a certificate from its MN.
    pub fn is_enrolled(data_dir: &Path) -> bool {
        let dir = Self::tls_dir(data_dir);
        dir.join("agent.crt").exists() && dir.join("ca.crt").exists()
    }

    /// Opens the identity in `data_dir`, making the directory (0700) and the key (0600) on
    /// first use and repairing looser modes.
    pub fn open(data_dir: &Path) -> Result<Self, TlsError> {
        let dir = Self::tls_dir(data_dir);
        private_dir(data_dir)?;
        private_dir(&dir)?;
        let key_path = dir.join("agent.key");
        let key = match std::fs::read_to_string(&key_path) {
            Ok(text) => {
                private_file(&key_path)?;
                key_from_pem(&text, &key_path)?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = KeyPair::generate()?;
                write_private(&key_path, key.serialize_pem().as_bytes())?;
                key
            }
            Err(source) => return Err(TlsError::Io { path: key_path, source }),
        };
        Ok(AgentIdentity { dir, key })
    }

    /// The agent's raw public key, which an enrollment asks the MN to sign.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key_raw().to_vec()
    }

    /// The configuration of an enrolled agent (its certificate from the MN, and the MN's CA
    /// for clients), or `None` if it has not enrolled.
    pub fn enrolled_config(&self) -> Result<Option<Arc<ServerConfig>>, TlsError> {
        let (cert_path, ca_path) = (self.dir.join("agent.crt"), self.dir.join("ca.crt"));
        if !cert_path.exists() || !ca_path.exists() {
            return Ok(None);
        }
        let certificate = certificate_from_pem(&read(&cert_path)?, &cert_path)?;
        let ca = certificate_from_pem(&read(&ca_path)?, &ca_path)?;
        agent_config(ca, certificate, private_key_der(&self.key)).map(Some)
    }

    /// The configuration of an agent waiting to enroll with the MN whose CA certificate is
    /// `ca_pem`: a self-signed certificate over the agent's key (the MN checks that the key
    /// it is asked to sign is the one the agent proved it holds), and clients only with a
    /// certificate from that CA, so the bootstrap secret goes to the real MN alone.
    pub fn bootstrap_config(&self, ca_pem: &str) -> Result<Arc<ServerConfig>, TlsError> {
        let ca = certificate_from_pem(ca_pem, &self.dir.join("ca.crt"))?;
        let certificate =
            CertificateParams::new(vec!["strato-agent".to_owned()])?.self_signed(&self.key)?;
        agent_config(ca, certificate.der().clone(), private_key_der(&self.key))
    }

    /// Keeps the certificate the MN issued (`certificate_pem`) and its CA (`ca_pem`), and
    /// returns the enrolled configuration. Refuses a certificate for another key.
    pub fn store(
        &self,
        ca_pem: &str,
        certificate_pem: &str,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let cert_path = self.dir.join("agent.crt");
        let certificate = certificate_from_pem(certificate_pem, &cert_path)?;
        let parsed = ParsedCertificate::try_from(&certificate)?;
        if *parsed.subject_public_key_info() != *AgentPublicKey(self.key.public_key_raw()).spki() {
            return Err(TlsError::WrongKey);
        }
        let ca = certificate_from_pem(ca_pem, &self.dir.join("ca.crt"))?;
        // The CA first: the agent counts as enrolled once both files exist.
        write_private(&self.dir.join("ca.crt"), ca_pem.as_bytes())?;
        write_private(&cert_path, certificate_pem.as_bytes())?;
        agent_config(ca, certificate, private_key_der(&self.key))
    }
}
