//! The MN's end of a link: one TLS connection to an agent, requests multiplexed by id, pushed
//! events, heartbeats, and the enrollment of an agent that has no certificate yet.
//!
//! [`Link::connect`] dials, runs the TLS handshake, decides whether to believe the agent
//! (its certificate must be the host's pin, or, for a host without a pin, one this MN's CA
//! issued; see [`crate::tls`]), handshakes and starts two tasks: a reader that routes
//! responses to their waiting callers and events to the event channel, and a heartbeat that
//! pings every `interval` and closes the link after `failures` pings in a row go unanswered
//! within `timeout` (TCP alone can take minutes to notice a cut cable). When the link closes
//! for any reason, every waiting request fails with [`LinkError::Closed`] and
//! [`Link::closed`] resolves; reconnecting is the caller's decision (the host actor's, with
//! its backoff). An agent waiting to enroll is handed back as an [`Enrollment`] instead: the
//! caller spends its secret, pins the certificate it issues, and dials again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::client::TlsStream;
use uuid::Uuid;

use crate::codec::{FrameError, read_frame, write_frame};
use crate::msg::{
    AgentError, AgentEvent, ClientHello, Command, DomainInfo, EnrollReply, FromAgent, HostFacts,
    PROTOCOL_VERSION, Reply, Request, ServerHello, ToAgent,
};
use crate::tls::{Fingerprint, MnTls};

/// How to reach, trust and watch an agent.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// The agent's address.
    pub addr: SocketAddr,
    /// The MN's TLS: its client certificate and its CA.
    pub tls: Arc<MnTls>,
    /// The certificate pinned for this host; `None` trusts a certificate this MN's CA issued.
    pub pin: Option<Fingerprint>,
    /// The host UUID the MN knows the agent as.
    pub host_uuid: Uuid,
    /// How long dialing and the handshake may take.
    pub connect_timeout: Duration,
    /// How often to ping.
    pub ping_interval: Duration,
    /// How long a ping may go unanswered.
    pub ping_timeout: Duration,
    /// Unanswered pings in a row that close the link.
    pub ping_failures: u32,
}

impl LinkConfig {
    /// How long the agent should wait for the MN's next frame: longer than the MN takes to
    /// give up on a silent agent, so the agent never drops a healthy MN first.
    pub fn idle_timeout(&self) -> Duration {
        (self.ping_interval + self.ping_timeout).saturating_mul(self.ping_failures.max(1) + 1)
    }
}

/// Why a link or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The agent could not be reached.
    #[error("cannot connect to the agent at {addr}")]
    Connect {
        /// Where we dialed.
        addr: SocketAddr,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed: the agent refused the MN's certificate (it was enrolled by
    /// another MN, or is not a Strato agent), or spoke no TLS.
    #[error("the TLS handshake with the agent at {addr} failed")]
    Handshake {
        /// Where we dialed.
        addr: SocketAddr,
        /// Why it failed (rustls' alert).
        #[source]
        source: std::io::Error,
    },
    /// The agent's certificate is not the host's.
    #[error(
        "the agent at {addr} presented certificate {presented}, which is not {}",
        match pinned { Some(pin) => format!("the one pinned for this host ({pin})"), None => "one this MN issued".to_owned() }
    )]
    Untrusted {
        /// Where we dialed.
        addr: SocketAddr,
        /// What it presented.
        presented: Fingerprint,
        /// What the host's pin is.
        pinned: Option<Fingerprint>,
    },
    /// The agent refused the handshake.
    #[error("the agent refused the link: {reason}")]
    Refused {
        /// The agent's reason.
        reason: String,
    },
    /// The connection broke or the handshake was malformed.
    #[error("the link failed")]
    Frame(#[from] FrameError),
    /// The link closed before the answer came.
    #[error("the link to the agent closed before it answered")]
    Closed,
    /// No answer before the deadline.
    #[error("the agent did not answer `{command}` before its deadline")]
    Timeout {
        /// The command.
        command: &'static str,
    },
    /// The agent answered with an error.
    #[error("the agent failed `{command}`: {error}")]
    Agent {
        /// The command.
        command: &'static str,
        /// What the agent said.
        error: AgentError,
    },
}

/// What the agent said in its welcome.
#[derive(Clone, Debug, PartialEq)]
pub struct Welcome {
    /// The host's facts.
    pub facts: HostFacts,
    /// Every domain the hypervisor has.
    pub domains: Vec<DomainInfo>,
}

/// How a handshake ended, when it did not fail.
#[derive(Debug)]
pub enum Handshake {
    /// The link is up.
    Linked {
        /// The link.
        link: Link,
        /// The agent's welcome (boxed: it carries the host's facts and every domain).
        welcome: Box<Welcome>,
        /// Events the agent pushes.
        events: mpsc::UnboundedReceiver<AgentEvent>,
        /// The agent's certificate: the host's pin, or, for a host without one, a
        /// certificate this MN issued, which the caller pins now.
        certificate: Fingerprint,
    },
    /// The agent holds no certificate yet and presented a bootstrap secret.
    Enroll(Box<Enrollment>),
}

/// An agent waiting for its certificate, on the TLS session it asked in. Its public key is
/// the key it proved it holds in the handshake.
pub struct Enrollment {
    stream: TlsStream<TcpStream>,
    secret: String,
    public_key: Vec<u8>,
    addr: SocketAddr,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Enrollment {
    /// The bootstrap secret the agent presented.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The agent's raw public key.
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// Sends the agent its certificate and waits (up to 10 s) for it to store it and close
    /// the link, so the next dial finds it enrolled.
    pub async fn issue(mut self, certificate: String) -> Result<(), LinkError> {
        write_frame(&mut self.stream, &EnrollReply::Issued { certificate }).await?;
        let stored = tokio::time::timeout(
            Duration::from_secs(10),
            read_frame::<_, FromAgent>(&mut self.stream),
        )
        .await;
        match stored {
            Ok(Ok(None)) | Ok(Err(_)) => Ok(()),
            Ok(Ok(Some(_))) | Err(_) => Err(LinkError::Closed),
        }
    }

    /// Tells the agent why it gets no certificate, and closes the link.
    pub async fn refuse(mut self, reason: String) {
        let _ = write_frame(&mut self.stream, &EnrollReply::Refused { reason }).await;
        let _ = self.stream.shutdown().await;
    }
}

type Pending = Arc<Mutex<HashMap<Uuid, oneshot::Sender<Result<Reply, AgentError>>>>>;

/// An open link. Cheap to clone; the link closes when [`Link::close`] is called, the
/// connection fails, or the heartbeat gives up.
#[derive(Clone, Debug)]
pub struct Link {
    out: mpsc::UnboundedSender<ToAgent>,
    pending: Pending,
    closed: watch::Receiver<bool>,
    close: Arc<watch::Sender<bool>>,
    rtt_us: Arc<AtomicU64>,
    /// When the last heartbeat was answered (Unix ms; 0: none yet).
    last_pong_ms: Arc<AtomicU64>,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Resolves once `closed` says the link is closed (dropping the borrow at once: it must not
/// live across the awaits of the tasks that select on it).
async fn wait_closed(closed: &mut watch::Receiver<bool>) {
    let _ = closed.wait_for(|c| *c).await;
}

impl Link {
    /// Dials the agent, runs the TLS handshake, checks the agent's certificate, handshakes,
    /// and starts the link's tasks on the current tokio runtime.
    pub async fn connect(config: &LinkConfig) -> Result<Handshake, LinkError> {
        let addr = config.addr;
        let connect = async {
            let (stream, agent) = config.tls.dial(addr).await?;
            let (mut reader, mut writer) = tokio::io::split(stream);
            let hello = ClientHello {
                protocol: PROTOCOL_VERSION,
                host_uuid: config.host_uuid,
                idle_timeout_ms: config.idle_timeout().as_millis() as u64,
            };
            // In TLS 1.3 the agent's verdict on the MN's certificate (an alert) arrives with
            // the first read: a failure here is the handshake's.
            let in_handshake = |error: FrameError| match error {
                FrameError::Io(source) => LinkError::Handshake { addr, source },
                other => LinkError::Frame(other),
            };
            write_frame(&mut writer, &hello).await.map_err(in_handshake)?;
            match read_frame::<_, ServerHello>(&mut reader).await.map_err(in_handshake)? {
                Some(ServerHello::Welcome { facts, domains, .. }) => {
                    let trusted = match config.pin {
                        Some(pin) => pin == agent.fingerprint,
                        None => agent.issued_here,
                    };
                    if !trusted {
                        return Err(LinkError::Untrusted {
                            addr,
                            presented: agent.fingerprint,
                            pinned: config.pin,
                        });
                    }
                    Ok(Ok((reader, writer, Welcome { facts, domains }, agent.fingerprint)))
                }
                Some(ServerHello::Enroll { secret, public_key }) => {
                    let mut stream = reader.unsplit(writer);
                    if !agent.carries(&public_key) {
                        let reason =
                            "the public key to sign is not the one in the agent's certificate"
                                .to_owned();
                        let _ = write_frame(
                            &mut stream,
                            &EnrollReply::Refused { reason: reason.clone() },
                        )
                        .await;
                        return Err(LinkError::Refused { reason });
                    }
                    Ok(Err(Enrollment { stream, secret, public_key, addr }))
                }
                Some(ServerHello::Refused { reason }) => Err(LinkError::Refused { reason }),
                None => Err(LinkError::Closed),
            }
        };
        let (mut reader, mut writer, welcome, certificate) =
            match tokio::time::timeout(config.connect_timeout, connect).await {
                Ok(Ok(Ok(linked))) => linked,
                Ok(Ok(Err(enrollment))) => return Ok(Handshake::Enroll(Box::new(enrollment))),
                Ok(Err(error)) => return Err(error),
                Err(_) => {
                    return Err(LinkError::Connect {
                        addr,
                        source: std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "handshake timed out",
                        ),
                    });
                }
            };

        let (out, mut out_rx) = mpsc::unbounded_channel::<ToAgent>();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (close, closed) = watch::channel(false);
        let close = Arc::new(close);
        let pending: Pending = Arc::default();
        let rtt_us = Arc::new(AtomicU64::new(0));
        let last_pong_ms = Arc::new(AtomicU64::new(unix_ms(SystemTime::now())));
        let (pong_tx, mut pong_rx) = mpsc::unbounded_channel::<u64>();

        // Writer: everything the MN sends goes through one task, in order.
        let mut closed_w = closed.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = out_rx.recv() => {
                        let Some(message) = message else { break };
                        if write_frame(&mut writer, &message).await.is_err() {
                            break;
                        }
                    }
                    () = wait_closed(&mut closed_w) => break,
                }
            }
            // Tell the agent the session is over (TLS close_notify), so it frees its one
            // MN session at once.
            let _ = writer.shutdown().await;
        });

        // Reader: routes responses, events and pongs; closes the link when the stream ends.
        let (pending_r, close_r) = (pending.clone(), close.clone());
        let mut closed_r = closed.clone();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    frame = read_frame::<_, FromAgent>(&mut reader) => frame,
                    () = wait_closed(&mut closed_r) => break,
                };
                match frame {
                    Ok(Some(FromAgent::Response(response))) => {
                        let waiter = pending_r.lock().expect("pending lock").remove(&response.id);
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(response.result);
                        }
                    }
                    Ok(Some(FromAgent::Event(event))) => {
                        let _ = events_tx.send(event);
                    }
                    Ok(Some(FromAgent::Pong { seq })) => {
                        let _ = pong_tx.send(seq);
                    }
                    Ok(None) => {
                        tracing::warn!(%addr, "agent closed the link");
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%addr, error = &error as &dyn std::error::Error, "link read failed");
                        break;
                    }
                }
            }
            close_r.send_replace(true);
            // Every request still waiting hears that the link is gone.
            pending_r.lock().expect("pending lock").clear();
        });

        // Heartbeat.
        let (out_h, close_h, rtt_h) = (out.clone(), close.clone(), rtt_us.clone());
        let pong_h = last_pong_ms.clone();
        let mut closed_h = closed.clone();
        let (interval, timeout, failures) =
            (config.ping_interval, config.ping_timeout, config.ping_failures.max(1));
        tokio::spawn(async move {
            let mut seq = 0u64;
            let mut missed = 0u32;
            loop {
                seq += 1;
                let sent = Instant::now();
                if out_h.send(ToAgent::Ping { seq }).is_err() {
                    break;
                }
                let answered = tokio::select! {
                    answer = tokio::time::timeout(timeout, async {
                        while let Some(got) = pong_rx.recv().await {
                            if got == seq {
                                return true;
                            }
                        }
                        false
                    }) => matches!(answer, Ok(true)),
                    () = wait_closed(&mut closed_h) => break,
                };
                if answered {
                    missed = 0;
                    rtt_h.store(sent.elapsed().as_micros() as u64, Ordering::Relaxed);
                    pong_h.store(unix_ms(SystemTime::now()), Ordering::Relaxed);
                } else {
                    missed += 1;
                    tracing::warn!(%addr, missed, "agent missed a heartbeat");
                    if missed >= failures {
                        tracing::warn!(%addr, "closing the link: too many missed heartbeats");
                        close_h.send_replace(true);
                        break;
                    }
                }
                let rest = interval.saturating_sub(sent.elapsed());
                tokio::select! {
                    () = tokio::time::sleep(rest) => {}
                    () = wait_closed(&mut closed_h) => break,
                }
            }
        });

        let link = Link { out, pending, closed, close, rtt_us, last_pong_ms };
        Ok(Handshake::Linked { link, welcome: Box::new(welcome), events, certificate })
    }

    /// Sends `command` and waits for the answer until `deadline`.
    pub async fn request(
        &self,
        command: Command,
        deadline: SystemTime,
        job_id: Option<Uuid>,
    ) -> Result<Reply, LinkError> {
        self.request_with_id(Uuid::new_v4(), command, deadline, job_id).await
    }

    /// [`Link::request`] with a caller-chosen id: sending the same id again (after a
    /// reconnect, say) gets the first result without the agent acting twice.
    pub async fn request_with_id(
        &self,
        id: Uuid,
        command: Command,
        deadline: SystemTime,
        job_id: Option<Uuid>,
    ) -> Result<Reply, LinkError> {
        let name = command.name();
        if self.is_closed() {
            return Err(LinkError::Closed);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        let request = Request { id, deadline_unix_ms: unix_ms(deadline), job_id, command };
        if self.out.send(ToAgent::Request(request)).is_err() {
            self.pending.lock().expect("pending lock").remove(&id);
            return Err(LinkError::Closed);
        }
        let wait = deadline.duration_since(SystemTime::now()).unwrap_or_default();
        let result = tokio::time::timeout(wait, rx).await;
        match result {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(error))) => Err(LinkError::Agent { command: name, error }),
            Ok(Err(_)) => Err(LinkError::Closed),
            Err(_) => {
                self.pending.lock().expect("pending lock").remove(&id);
                Err(LinkError::Timeout { command: name })
            }
        }
    }

    /// Whether the link has closed.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Resolves once the link has closed.
    pub async fn closed(&self) {
        wait_closed(&mut self.closed.clone()).await;
    }

    /// Closes the link.
    pub fn close(&self) {
        self.close.send_replace(true);
    }

    /// When the agent last answered a heartbeat (or the link opened), in Unix ms.
    pub fn last_heartbeat_unix_ms(&self) -> u64 {
        self.last_pong_ms.load(Ordering::Relaxed)
    }

    /// The last heartbeat's round-trip time.
    pub fn rtt(&self) -> Duration {
        Duration::from_micros(self.rtt_us.load(Ordering::Relaxed))
    }
}
