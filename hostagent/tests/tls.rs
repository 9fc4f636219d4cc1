//! The link's TLS against the real `strato-agent` binary on loopback, as an attacker would try
//! it: whoever lacks the MN's certificate is refused, whatever secret it knows; a certificate
//! from another CA, or a host's own certificate, does not make an MN; a bootstrap secret
//! enrolls once; the MN pins what it issued; and a second MN is refused while one is live,
//! until the live one closes or falls silent.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use strato_proto::codec::{read_frame, write_frame};
use strato_proto::pki::Bootstrap;
use strato_proto::tls::MnTls;
use strato_proto::{ClientHello, Handshake, Link, LinkError, PROTOCOL_VERSION, ServerHello};
use tokio::io::{AsyncRead, AsyncWrite};
use uuid::Uuid;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// What an attacker's client trusts: any server at all.
#[derive(Debug)]
struct TrustAnything;

impl ServerCertVerifier for TrustAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An attacker's TLS client: no client certificate, or `identity` (certificate, key).
fn attacker(
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> tokio_rustls::TlsConnector {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(TrustAnything));
    let config = match identity {
        Some((certificate, key)) => builder.with_client_auth_cert(vec![certificate], key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Whether the agent answered `stream`'s hello with anything at all (it must not).
async fn answered<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> bool {
    let hello =
        ClientHello { protocol: PROTOCOL_VERSION, host_uuid: Uuid::nil(), idle_timeout_ms: 5000 };
    if write_frame(&mut stream, &hello).await.is_err() {
        return false;
    }
    matches!(read_frame::<_, ServerHello>(&mut stream).await, Ok(Some(_)))
}

/// Tries the agent at `addr` with TLS `connector`; whether it answered.
async fn try_tls(connector: &tokio_rustls::TlsConnector, addr: std::net::SocketAddr) -> bool {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    match connector.connect(ServerName::IpAddress(addr.ip().into()), tcp).await {
        Ok(stream) => answered(stream).await,
        Err(_) => false,
    }
}

/// Every way in without the MN's certificate: plain TCP with the old hello, TLS without a
/// client certificate, TLS with a self-signed one. The attacker holds the bootstrap file.
async fn every_way_in_without_the_mns_certificate_is_refused(addr: std::net::SocketAddr) {
    let plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(!answered(plain).await, "plain TCP got an answer");
    assert!(!try_tls(&attacker(None), addr).await, "TLS without a certificate got an answer");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["strato-mn".to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let certificate = params.self_signed(&key).unwrap();
    let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let self_signed = attacker(Some((certificate.der().clone(), key)));
    assert!(!try_tls(&self_signed, addr).await, "a self-signed certificate got an answer");
}

#[tokio::test]
async fn a_client_with_the_bootstrap_secret_but_no_certificate_is_refused() {
    let mn = Mn::new();
    let bootstrap = mn.bootstrap(1);
    // What the attacker reads: the secret and the CA's certificate, both in the file.
    let stolen = Bootstrap::read(&bootstrap).unwrap().secret(0).unwrap();
    assert!(!stolen.secret.is_empty());
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent_on(free_port(), Some(&bootstrap), dir, &["--driver", "sim"], None);

    // Waiting to enroll, the agent shows the secret to nobody but the MN.
    every_way_in_without_the_mns_certificate_is_refused(agent.addr).await;
    // So the secret is still unspent, and the real MN enrolls the agent with it.
    let (link, _, _) = agent.link(&mn).await.unwrap();
    link.close();
    // Enrolled, it still admits nobody else.
    every_way_in_without_the_mns_certificate_is_refused(agent.addr).await;
    // The secret came from the file: it is nowhere on the agent's command line.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent.child.id())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(&stolen.secret));
}

#[tokio::test]
async fn a_client_with_a_certificate_from_another_ca_is_refused() {
    let (mn, other) = (Mn::new(), Mn::new());
    let agent = start_agent(&mn, &["--driver", "sim"]);
    // Another MN's CA, with a proper MN client certificate of its own: refused before and
    // after the agent enrolled, in the TLS handshake.
    let refused = |result: Result<Handshake, LinkError>| match result {
        Err(LinkError::Handshake { .. } | LinkError::Frame(_) | LinkError::Closed) => {}
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("another CA's MN got in"),
    };
    refused(Link::connect(&other.config(agent.addr, None)).await);
    agent.link(&mn).await.unwrap().0.close();
    refused(Link::connect(&other.config(agent.addr, None)).await);
    // The MN side refuses another MN's agent in turn: it presents a certificate this MN did
    // not issue (another MN would need its CA's key to get it through).
    let stranger = start_agent(&other, &["--driver", "sim"]);
    stranger.link(&other).await.unwrap().0.close();
    match Link::connect(&mn.config(stranger.addr, None)).await {
        Err(LinkError::Handshake { .. } | LinkError::Frame(_) | LinkError::Closed) => {}
        Err(error) => panic!("refused for another reason: {error}"),
        Ok(_) => panic!("linked to another MN's agent"),
    }
}

#[tokio::test]
async fn a_hosts_own_certificate_does_not_make_an_mn() {
    let mn = Mn::new();
    let (a, b) = (start_agent(&mn, &["--driver", "sim"]), start_agent(&mn, &["--driver", "sim"]));
    a.link(&mn).await.unwrap().0.close();
    b.link(&mn).await.unwrap().0.close();
    // Host A's certificate and key, issued by the MN's CA, as a client to host B: the CA
    // marked it for server authentication only.
    let tls = a.dir.path().join("tls");
    let read = |name: &str| std::fs::read(tls.join(name)).unwrap();
    let ca = CertificateDer::from_pem_slice(&read("ca.crt")).unwrap();
    let certificate = CertificateDer::from_pem_slice(&read("agent.crt")).unwrap();
    let key = PrivateKeyDer::from_pem_slice(&read("agent.key")).unwrap();
    let as_mn = MnTls::new(ca, certificate, key).unwrap();
    let mut config = mn.config(b.addr, None);
    config.tls = Arc::new(as_mn);
    match Link::connect(&config).await {
        Err(LinkError::Handshake { .. } | LinkError::Frame(_) | LinkError::Closed) => {}
        Err(error) => panic!("refused for another reason: {error}"),
        Ok(_) => panic!("a host's certificate opened another host's link"),
    }
}

#[tokio::test]
async fn a_bootstrap_secret_enrolls_once_and_the_mn_pins_what_it_issued() {
    let mn = Mn::new();
    let bootstrap = mn.bootstrap(1);
    // A careless copy left the file readable by everyone: the agent repairs it.
    std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let a = start_agent_on(free_port(), Some(&bootstrap), dir, &["--driver", "sim"], None);
    assert_eq!(mode(&bootstrap), 0o600, "the bootstrap file's mode was repaired");
    a.link(&mn).await.unwrap().0.close();
    let pinned_a = a.pin.lock().unwrap().expect("pinned at enrollment");
    // The agent keeps its key and certificate privately.
    assert_eq!(mode(a.dir.path()), 0o700);
    assert_eq!(mode(&a.dir.path().join("tls")), 0o700);
    assert_eq!(mode(&a.dir.path().join("tls/agent.key")), 0o600);

    // The same file on another machine: the secret is spent, so the MN refuses it.
    let dir = tempfile::tempdir().unwrap();
    let b = start_agent_on(free_port(), Some(&bootstrap), dir, &["--driver", "sim"], None);
    match b.link(&mn).await {
        Err(LinkError::Refused { reason }) => assert!(reason.contains("spent"), "{reason}"),
        other => panic!("a spent secret enrolled: {:?}", other.map(|_| ())),
    }
    assert!(!b.dir.path().join("tls/agent.crt").exists());

    // A third agent, enrolled properly, is not host A: A's pin refuses it, though its
    // certificate is from the same CA.
    let c = start_agent(&mn, &["--driver", "sim"]);
    c.link(&mn).await.unwrap().0.close();
    match Link::connect(&mn.config(c.addr, Some(pinned_a))).await {
        Err(LinkError::Untrusted { pinned, .. }) => assert_eq!(pinned, Some(pinned_a)),
        other => panic!("expected the pin to refuse it, got {:?}", other.map(|_| ())),
    }
    // A host without a pin (deleted and added again) trusts a certificate this MN issued.
    match Link::connect(&mn.config(a.addr, None)).await.unwrap() {
        Handshake::Linked { link, certificate, .. } => {
            assert_eq!(certificate, pinned_a);
            link.close();
        }
        Handshake::Enroll(_) => panic!("an enrolled agent asked to enroll"),
    }
}

#[tokio::test]
async fn a_second_mn_is_refused_while_one_is_live() {
    let mn = Mn::new();
    let agent = start_agent(&mn, &["--driver", "sim"]);
    let (first, _, _) = agent.link(&mn).await.unwrap();
    // A second MN, even with the MN's own certificate (a copy of its data directory), is
    // refused while the first is live.
    match agent.link(&mn).await {
        Err(LinkError::Refused { reason }) => {
            assert!(reason.contains("another MN session is live"), "{reason}")
        }
        other => panic!("a second MN got in: {:?}", other.map(|_| ())),
    }
    // The first still works.
    let reply = first
        .request(
            strato_proto::Command::ListDomains,
            std::time::SystemTime::now() + Duration::from_secs(5),
            None,
        )
        .await;
    assert!(reply.is_ok(), "{reply:?}");
    // Once it closes, the next MN gets in at once (its reconnect does not wait).
    first.close();
    let (second, _, _) = agent.link(&mn).await.expect("the next MN once the first closed");
    second.close();
}

#[tokio::test]
async fn a_silent_mn_session_ends_after_its_idle_time() {
    let mn = Mn::new();
    let agent = start_agent(&mn, &["--driver", "sim"]);
    agent.link(&mn).await.unwrap().0.close();
    // An MN that vanished without closing its connection: a session that says hello and
    // then nothing, with a 3 s idle time.
    let (mut silent, _) = mn.pki.tls().dial(agent.addr).await.unwrap();
    let hello =
        ClientHello { protocol: PROTOCOL_VERSION, host_uuid: Uuid::nil(), idle_timeout_ms: 3000 };
    write_frame(&mut silent, &hello).await.unwrap();
    let welcome = read_frame::<_, ServerHello>(&mut silent).await.unwrap();
    assert!(matches!(welcome, Some(ServerHello::Welcome { .. })), "{welcome:?}");
    let started = std::time::Instant::now();
    assert!(matches!(agent.link(&mn).await, Err(LinkError::Refused { .. })), "refused while live");
    // After its idle time the agent ends it, and the MN gets back in.
    let pin = Mutex::new(*agent.pin.lock().unwrap());
    let mut linked = None;
    while started.elapsed() < Duration::from_secs(10) {
        if let Ok(l) = mn.link(agent.addr, &pin).await {
            linked = Some(l);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(linked.is_some(), "the silent session never ended");
    assert!(started.elapsed() >= Duration::from_secs(2), "ended before its idle time");
    assert!(
        matches!(read_frame::<_, ServerHello>(&mut silent).await, Ok(None) | Err(_)),
        "the silent session was closed"
    );
}
