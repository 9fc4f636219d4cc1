//! The metadata service at 169.254.169.254, one per flat DHCP namespace that has the Flat
//! provider's Userdata: `GET /latest/user-data`, `/latest/meta-data/instance-id`,
//! `hostname`, `local-ipv4` and `public-keys/0/openssh-key`, as EC2 and ZStack answer them.
//!
//! A guest is known by its source address alone, which the anti-spoofing rules on every
//! NIC make trustworthy (a guest sending as another's address is dropped on its port), so
//! no guest reads another's data. The agent itself serves it: a thread enters the
//! namespace only to open the listening socket (a socket stays in the namespace it was
//! made in), and a thread per service accepts on it, polling a stop flag so that a
//! service removed with its namespace lets the namespace go.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use strato_proto::AgentError;
use strato_proto::net::{GuestMetadata, METADATA_ADDRESS};

use super::host::tool_error;

/// The longest request line and headers read from a guest.
const MAX_REQUEST: usize = 8 << 10;

/// One namespace's metadata service.
#[derive(Debug)]
pub struct MetadataServer {
    guests: Arc<RwLock<HashMap<Ipv4Addr, GuestMetadata>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetadataServer {
    /// Starts serving in the named namespace `namespace` (which holds 169.254.169.254).
    pub fn start(namespace: &str) -> Result<Self, AgentError> {
        let path = format!("/run/netns/{namespace}");
        let listener = std::thread::spawn(move || -> std::io::Result<TcpListener> {
            let ns = std::fs::File::open(&path)?;
            move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))?;
            let listener = TcpListener::bind(SocketAddr::new(IpAddr::V4(METADATA_ADDRESS), 80))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .join()
        .map_err(|_| tool_error("the metadata listener's thread panicked".into()))?
        .map_err(|e| {
            tool_error(format!("cannot listen on 169.254.169.254:80 in {namespace}: {e}"))
        })?;
        let guests: Arc<RwLock<HashMap<Ipv4Addr, GuestMetadata>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (guests, stop) = (guests.clone(), stop.clone());
            std::thread::Builder::new()
                .name("metadata".into())
                .spawn(move || accept(&listener, &guests, &stop))
                .map_err(|e| tool_error(format!("cannot start the metadata service: {e}")))?
        };
        Ok(MetadataServer { guests, stop, thread: Some(thread) })
    }

    /// What each guest is told from now on.
    pub fn set(&self, guests: &[GuestMetadata]) {
        let table = guests.iter().map(|g| (g.ip, g.clone())).collect();
        *self.guests.write().expect("metadata table") = table;
    }
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept(
    listener: &TcpListener,
    guests: &RwLock<HashMap<Ipv4Addr, GuestMetadata>>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(error) = serve(stream, peer, guests) {
                    tracing::debug!(%peer, %error, "a metadata request failed");
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(error) => {
                tracing::warn!(%error, "the metadata service cannot accept");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    guests: &RwLock<HashMap<Ipv4Addr, GuestMetadata>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    let mut read = reader.by_ref().take(MAX_REQUEST as u64).read_line(&mut request_line)?;
    // The headers are read and ignored (the source address is the only credential).
    let mut header = String::new();
    while read < MAX_REQUEST {
        header.clear();
        let n = reader.by_ref().take((MAX_REQUEST - read) as u64).read_line(&mut header)?;
        read += n;
        if n == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    let path = match request_line.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["GET", path, _] => (*path).to_owned(),
        _ => return respond(stream, "400 Bad Request", b"GET only\n"),
    };
    let IpAddr::V4(source) = peer.ip() else { return respond(stream, "404 Not Found", b"") };
    let answer = guests.read().expect("metadata table").get(&source).and_then(|g| answer(g, &path));
    match answer {
        Some(body) => respond(stream, "200 OK", &body),
        None => respond(stream, "404 Not Found", b"not found\n"),
    }
}

/// What `path` answers `guest`.
fn answer(guest: &GuestMetadata, path: &str) -> Option<Vec<u8>> {
    let text = |s: String| Some(s.into_bytes());
    match path.trim_end_matches('/') {
        "/latest/user-data" => guest.user_data.clone(),
        "/latest/meta-data" => text("instance-id\nhostname\nlocal-ipv4\npublic-keys/\n".into()),
        "/latest/meta-data/instance-id" => text(guest.instance_id.to_string()),
        "/latest/meta-data/hostname" => text(guest.hostname.clone()),
        "/latest/meta-data/local-ipv4" => text(guest.ip.to_string()),
        "/latest/meta-data/public-keys" if !guest.ssh_keys.is_empty() => text("0=key\n".into()),
        "/latest/meta-data/public-keys/0/openssh-key" if !guest.ssh_keys.is_empty() => {
            text(guest.ssh_keys.join("\n") + "\n")
        }
        _ => None,
    }
}

fn respond(mut stream: TcpStream, status: &str, body: &[u8]) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_is_answered_its_own_data_only_at_known_paths() {
        let guest = GuestMetadata {
            ip: Ipv4Addr::new(10, 0, 0, 5),
            instance_id: uuid::Uuid::nil(),
            hostname: "web-1".into(),
            user_data: Some(b"#cloud-config\n".to_vec()),
            ssh_keys: vec!["ssh-ed25519 AAAA x".into()],
        };
        assert_eq!(answer(&guest, "/latest/user-data").unwrap(), b"#cloud-config\n");
        assert_eq!(answer(&guest, "/latest/meta-data/hostname/").unwrap(), b"web-1");
        assert_eq!(
            answer(&guest, "/latest/meta-data/public-keys/0/openssh-key").unwrap(),
            b"ssh-ed25519 AAAA x\n"
        );
        assert!(answer(&guest, "/etc/passwd").is_none());
    }
}
