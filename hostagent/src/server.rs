//! The agent's end of the link: accepts the MN over TLS, checks the handshake, enrolls when it
//! has no certificate yet, runs commands at most once per id and never past their deadline,
//! answers pings and pushes domain events.
//!
//! Only the MN gets in: the TLS handshake requires a client certificate from the MN's CA
//! marked for client authentication (see [`strato_proto::tls`]), so neither a client without
//! one (whatever secret it knows) nor a host's certificate nor another CA's opens a session.
//!
//! One live MN session at a time. A second client with a valid MN certificate, while a
//! session is live, is refused with a reason (after a short grace, [`SESSION_GRACE`], for the
//! MN's own reconnect, whose old session may end a moment after the new one arrives). It is
//! refused rather than let in to take over, because one MN commands a host: a second MN
//! process on a copy of the data directory must not drive the same guests, and a restarted MN
//! needs no takeover, since its old session ends when its process does (the kernel closes
//! the connection), or, when the MN vanished without closing it (a power cut, a partition),
//! when the session has been silent for the idle time the MN set in its hello (longer than
//! the MN itself waits for a silent agent).
//!
//! Commands run concurrently (each on its own task; driver calls on the blocking pool), so a
//! slow `start` does not hold up a ping. Results are remembered by command id (the last
//! [`REMEMBERED`] ids): a repeated id, even while the first is still running, gets the first
//! result and the driver is not called again. Frames are read by a task of their own, so
//! waiting for an event or the idle timer never cuts a frame in half.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use strato_proto::client::unix_ms;
use strato_proto::codec::{read_frame, write_frame};
use strato_proto::{
    AgentError, AgentErrorCode, AgentEvent, ClientHello, Command, EnrollReply, FromAgent,
    HostFacts, PROTOCOL_VERSION, Reply, Request, Response, ServerHello, ToAgent,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OnceCell, Semaphore, broadcast, mpsc};
use uuid::Uuid;

use crate::credentials::Credentials;
use crate::driver::Driver;
use crate::net::Network;
use crate::volumes;

/// How many command results the agent remembers for repeats.
pub const REMEMBERED: usize = 65_536;

/// How long a second MN session waits for the live one to end before it is refused.
pub const SESSION_GRACE: Duration = Duration::from_secs(1);

/// How long the TLS handshake and the MN's hello may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Outcome = Result<Reply, AgentError>;

/// Results by command id, bounded.
#[derive(Default)]
struct Memory {
    results: HashMap<Uuid, Arc<OnceCell<Outcome>>>,
    order: VecDeque<Uuid>,
}

/// One agent serving one host.
pub struct Agent {
    credentials: Credentials,
    /// One permit: the live MN session holds it.
    session: Arc<Semaphore>,
    /// Where the live session comes from, for the refusal of a second one.
    live_peer: Mutex<Option<SocketAddr>>,
    driver: Arc<dyn Driver>,
    network: Arc<dyn Network>,
    events: broadcast::Sender<AgentEvent>,
    memory: Mutex<Memory>,
    label: String,
    /// Set to stop serving: the listener and every link close.
    stop: tokio::sync::watch::Sender<bool>,
    /// Where every executed command is appended, one JSON line each, when set.
    journal: Option<Mutex<std::fs::File>>,
    /// One lock per domain: commands that change a domain run one at a time, in arrival
    /// order, even when the MN gave up waiting on an earlier one (a lost link, a deadline)
    /// and sent the next while the driver still runs the first.
    domain_locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
    /// How shared storage is mounted.
    mounter: Arc<dyn crate::mount::Mounter>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("label", &self.label).finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent for `driver` and `network`, authenticating with `credentials`.
    pub fn new(
        label: &str,
        credentials: Credentials,
        driver: Arc<dyn Driver>,
        network: Arc<dyn Network>,
    ) -> Arc<Self> {
        Self::build(label, credentials, driver, network, None)
    }

    /// Like [`Agent::new`], and appends every command it executes to the file at `journal`:
    /// one JSON line with the command id, job, name, domain, start and end (Unix ms) and
    /// whether it succeeded. The chaos runs read it to check that no id ran twice and that
    /// no two jobs changed one domain at once.
    pub fn journaled(
        label: &str,
        credentials: Credentials,
        driver: Arc<dyn Driver>,
        network: Arc<dyn Network>,
        journal: &std::path::Path,
    ) -> std::io::Result<Arc<Self>> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(journal)?;
        Ok(Self::build(label, credentials, driver, network, Some(Mutex::new(file))))
    }

    fn build(
        label: &str,
        credentials: Credentials,
        driver: Arc<dyn Driver>,
        network: Arc<dyn Network>,
        journal: Option<Mutex<std::fs::File>>,
    ) -> Arc<Self> {
        let (events, _) = broadcast::channel(4096);
        driver.watch(events.clone());
        let (stop, _) = tokio::sync::watch::channel(false);
        Arc::new(Agent {
            credentials,
            session: Arc::new(Semaphore::new(1)),
            live_peer: Mutex::default(),
            driver,
            network,
            events,
            memory: Mutex::default(),
            label: label.to_owned(),
            stop,
            journal,
            domain_locks: Mutex::default(),
            mounter: Arc::new(crate::mount::Nfs4),
        })
    }

    /// The agent, mounting shared storage with `mounter` (NFS version 4 by default). Call it
    /// on a new agent, before it serves.
    pub fn with_mounter(mut self: Arc<Self>, mounter: Arc<dyn crate::mount::Mounter>) -> Arc<Self> {
        Arc::get_mut(&mut self).expect("a new agent, not yet shared").mounter = mounter;
        self
    }

    /// Stops serving: the listener closes and every link is cut, as if the agent died.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// Accepts links on `listener` until [`Agent::shutdown`] or the end of the process.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let mut stop = self.stop.subscribe();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.wait_for(|s| *s) => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let agent = self.clone();
                    tokio::spawn(async move { agent.link(stream, peer).await });
                }
                Err(error) => {
                    tracing::warn!(host = %self.label, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn link(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.credentials.config());
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                tracing::info!(host = %self.label, %peer, "the client left during the TLS handshake");
                return;
            }
            Ok(Err(error)) => {
                tracing::warn!(host = %self.label, %peer, %error, "TLS handshake refused: only the MN's certificate opens the link");
                return;
            }
            Err(_) => {
                tracing::warn!(host = %self.label, %peer, "no TLS handshake within 10 s");
                return;
            }
        };
        let (mut reader, mut writer) = tokio::io::split(stream);
        let hello = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            read_frame::<_, ClientHello>(&mut reader),
        )
        .await
        {
            Ok(Ok(Some(hello))) => hello,
            Ok(Ok(None)) => return,
            Ok(Err(error)) => {
                tracing::warn!(host = %self.label, %peer, error = &error as &dyn std::error::Error, "bad handshake");
                return;
            }
            Err(_) => {
                tracing::warn!(host = %self.label, %peer, "no handshake within 10 s");
                return;
            }
        };
        if hello.protocol != PROTOCOL_VERSION {
            let reason = format!(
                "protocol mismatch: the MN speaks version {}, this agent speaks {PROTOCOL_VERSION}",
                hello.protocol
            );
            refuse(&self.label, peer, &mut writer, reason).await;
            return;
        }
        let permit = match tokio::time::timeout(SESSION_GRACE, self.session.clone().acquire_owned())
            .await
        {
            Ok(Ok(permit)) => permit,
            _ => {
                let live = *self.live_peer.lock().expect("live peer lock");
                let from = live.map_or_else(String::new, |p| format!(" (from {p})"));
                let reason = format!(
                    "another MN session is live on this agent{from}: one MN commands a host at a time"
                );
                refuse(&self.label, peer, &mut writer, reason).await;
                return;
            }
        };
        *self.live_peer.lock().expect("live peer lock") = Some(peer);
        if let Some(secret) = self.credentials.waiting() {
            self.enroll(&mut reader, &mut writer, secret, peer).await;
        } else {
            let idle = Duration::from_millis(hello.idle_timeout_ms);
            self.serve_session(reader, writer, &hello, idle, peer).await;
        }
        *self.live_peer.lock().expect("live peer lock") = None;
        drop(permit);
    }

    /// Asks the MN for a certificate with the bootstrap secret, and stores what it issues.
    async fn enroll<R, W>(&self, reader: &mut R, writer: &mut W, secret: String, peer: SocketAddr)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        tracing::info!(host = %self.label, %peer, "asking the MN for a certificate with the bootstrap secret");
        let asked = ServerHello::Enroll { secret, public_key: self.credentials.public_key() };
        if write_frame(writer, &asked).await.is_err() {
            return;
        }
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame::<_, EnrollReply>(reader)).await {
            Ok(Ok(Some(EnrollReply::Issued { certificate }))) => {
                match self.credentials.enroll(&certificate) {
                    Ok(()) => {
                        tracing::info!(host = %self.label, %peer, "enrolled: the MN's certificate is stored; the bootstrap file is spent and can be deleted")
                    }
                    Err(error) => {
                        tracing::error!(host = %self.label, error = &error as &dyn std::error::Error, "cannot keep the certificate the MN issued")
                    }
                }
            }
            Ok(Ok(Some(EnrollReply::Refused { reason }))) => {
                tracing::error!(host = %self.label, %peer, %reason, "the MN refused to enroll this agent");
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                tracing::warn!(host = %self.label, %peer, "the MN did not answer the enrollment");
            }
        }
        let _ = tokio::io::AsyncWriteExt::shutdown(writer).await;
    }

    /// Serves one MN session until it closes, falls silent for `idle`, or the agent stops.
    async fn serve_session<R, W>(
        self: &Arc<Self>,
        mut reader: R,
        mut writer: W,
        hello: &ClientHello,
        idle: Duration,
        peer: SocketAddr,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        // Subscribe before listing, so no change falls between the list and the events.
        let mut events = self.events.subscribe();
        let driver = self.driver.clone();
        let network = self.network.clone();
        let welcome = tokio::task::spawn_blocking(move || {
            Ok::<_, AgentError>((facts(&*driver, &*network)?, driver.list()?))
        })
        .await;
        let (facts, domains) = match welcome {
            Ok(Ok(welcome)) => welcome,
            Ok(Err(error)) => {
                let reason = format!("the agent cannot read its hypervisor: {error}");
                refuse(&self.label, peer, &mut writer, reason).await;
                return;
            }
            Err(_) => return,
        };
        tracing::info!(host = %self.label, %peer, mn_host = %hello.host_uuid, domains = domains.len(), "MN linked");
        if write_frame(
            &mut writer,
            &ServerHello::Welcome { protocol: PROTOCOL_VERSION, facts, domains },
        )
        .await
        .is_err()
        {
            return;
        }

        let (out, mut out_rx) = mpsc::unbounded_channel::<FromAgent>();
        let writer_task = tokio::spawn(async move {
            while let Some(frame) = out_rx.recv().await {
                if write_frame(&mut writer, &frame).await.is_err() {
                    break;
                }
            }
        });
        let (frames_tx, mut frames) = mpsc::channel(64);
        let reader_task = tokio::spawn(async move {
            loop {
                let frame = read_frame::<_, ToAgent>(&mut reader).await;
                let end = !matches!(frame, Ok(Some(_)));
                if frames_tx.send(frame).await.is_err() || end {
                    break;
                }
            }
        });
        let mut stop = self.stop.subscribe();
        let mut heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                () = tokio::time::sleep_until(heard + idle) => {
                    tracing::warn!(host = %self.label, %peer, idle_ms = idle.as_millis() as u64, "nothing from the MN for its idle time; ending the session");
                    break;
                }
                frame = frames.recv() => {
                    heard = tokio::time::Instant::now();
                    match frame {
                        Some(Ok(Some(ToAgent::Ping { seq }))) => {
                            let _ = out.send(FromAgent::Pong { seq });
                        }
                        Some(Ok(Some(ToAgent::Request(request)))) => {
                            let (agent, out) = (self.clone(), out.clone());
                            tokio::spawn(async move {
                                let id = request.id;
                                let result = agent.execute(request).await;
                                let _ = out.send(FromAgent::Response(Response { id, result }));
                            });
                        }
                        Some(Ok(None)) | None => break,
                        Some(Err(error)) => {
                            tracing::warn!(host = %self.label, %peer, error = &error as &dyn std::error::Error, "link read failed");
                            break;
                        }
                    }
                }
                event = events.recv() => match event {
                    Ok(event) => {
                        let _ = out.send(FromAgent::Event(event));
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        // The MN reconciles from a full list on its next (re)connect; tell it
                        // now by closing the link rather than leaving it with a gap.
                        tracing::warn!(host = %self.label, missed, "events lagged; closing the link so the MN resyncs");
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            }
        }
        reader_task.abort();
        writer_task.abort();
        tracing::info!(host = %self.label, %peer, "MN link closed");
    }

    /// Runs a request once per id; repeats get the first result. A read of a file's bytes
    /// is not remembered: it changes nothing, so a repeat may read again, and keeping
    /// megabytes per answer for 65,536 ids would be gigabytes.
    async fn execute(self: Arc<Self>, request: Request) -> Outcome {
        if matches!(request.command, Command::ReadFile { .. }) {
            return self.run(request).await;
        }
        let cell = {
            let mut memory = self.memory.lock().expect("memory lock");
            match memory.results.get(&request.id) {
                Some(cell) => cell.clone(),
                None => {
                    let cell = Arc::new(OnceCell::new());
                    memory.results.insert(request.id, cell.clone());
                    memory.order.push_back(request.id);
                    while memory.order.len() > REMEMBERED {
                        if let Some(old) = memory.order.pop_front() {
                            memory.results.remove(&old);
                        }
                    }
                    cell
                }
            }
        };
        let agent = self.clone();
        cell.get_or_init(|| agent.run(request)).await.clone()
    }

    async fn run(self: Arc<Self>, request: Request) -> Outcome {
        let name = request.command.name();
        // Wait for this domain's earlier commands first; the deadline is checked after.
        let domain = request.command.domain();
        let domain_lock = domain.map(|uuid| {
            self.domain_locks.lock().expect("domain locks").entry(uuid).or_default().clone()
        });
        let _turn = match &domain_lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        };
        if unix_ms(SystemTime::now()) > request.deadline_unix_ms {
            tracing::warn!(host = %self.label, command = name, id = %request.id, job = ?request.job_id, "refused: past its deadline");
            return Err(AgentError::new(
                AgentErrorCode::DeadlineExceeded,
                format!("`{name}` arrived after its deadline; nothing was done"),
            ));
        }
        let started = std::time::Instant::now();
        let started_ms = unix_ms(SystemTime::now());
        let result = match request.command {
            Command::CacheImage { image, source, cache_dir } => {
                volumes::cache_image(image, &source, &cache_dir).await
            }
            Command::CreateRootVolume { volume, backing, dir } => {
                volumes::create_root_volume(volume, &backing, &dir).await
            }
            Command::CreateDataVolume { volume, size, dir } => {
                volumes::create_data_volume(volume, size, &dir).await
            }
            Command::SnapshotVolume { top, new_top } => {
                volumes::snapshot_volume(&top, &new_top).await
            }
            Command::RebaseVolume { top, base } => {
                volumes::rebase_volume(&top, base.as_deref()).await
            }
            Command::ResizeVolume { path, size } => volumes::resize_volume(&path, size).await,
            Command::FlattenVolume { source, dest } => {
                volumes::flatten_volume(&source, &dest).await
            }
            Command::DeleteVolume { path } => volumes::delete_volume(&path).await,
            Command::DescribeVolume { path, .. } => volumes::describe_once_made(&path).await,
            Command::MarkStorage { path } => volumes::mark_storage(&path).await,
            Command::StorageCapacity { dir } => volumes::storage_capacity(&dir).await,
            Command::SweepPartialCopies { dir, older_than_secs } => {
                volumes::sweep_partial_copies(&dir, Duration::from_secs(older_than_secs)).await
            }
            Command::MountStorage { url, mount_point } => {
                let mounter = self.mounter.clone();
                tokio::task::spawn_blocking(move || {
                    mounter.mount(&url, std::path::Path::new(&mount_point)).map(|()| Reply::Done)
                })
                .await
                .unwrap_or_else(|e| {
                    Err(AgentError::new(AgentErrorCode::Driver, format!("mounting panicked: {e}")))
                })
            }
            Command::DigestFile { path } => volumes::digest_file(&path).await,
            Command::ReadFile { path, offset, len } => volumes::read_file(&path, offset, len).await,
            Command::WriteFile { path, transfer, offset, data } => {
                volumes::write_file(&path, transfer, offset, &data).await
            }
            Command::SealFile { path, transfer, size, sha256 } => {
                volumes::seal_file(&path, transfer, size, &sha256).await
            }
            Command::CleanImageCache { cache_dir, volume_dirs, grace_secs } => {
                let grace = Duration::from_secs(grace_secs);
                volumes::clean_image_cache(&cache_dir, &volume_dirs, grace).await.map(|c| {
                    Reply::CacheCleaned {
                        deleted: c.deleted,
                        kept: c.kept,
                        volumes_read: c.volumes_read,
                    }
                })
            }
            command => {
                let driver = self.driver.clone();
                let network = self.network.clone();
                tokio::task::spawn_blocking(move || drive(&*driver, &*network, command))
                    .await
                    .unwrap_or_else(|e| {
                        Err(AgentError::new(
                            AgentErrorCode::Driver,
                            format!("driver call panicked: {e}"),
                        ))
                    })
            }
        };
        if let (Some(uuid), "undefine-domain", Ok(_)) = (domain, name, &result) {
            // The domain is gone: so is its lock, unless a command waits on it (the map and
            // this command hold the only handles; new commands need the map's lock to take
            // one, so the count cannot grow while it is checked).
            let mut locks = self.domain_locks.lock().expect("domain locks");
            if locks.get(&uuid).is_some_and(|lock| Arc::strong_count(lock) == 2) {
                locks.remove(&uuid);
            }
        }
        if let Some(journal) = &self.journal {
            let line = serde_json::json!({
                "id": request.id,
                "job": request.job_id,
                "command": name,
                "domain": domain,
                "startMs": started_ms,
                "endMs": unix_ms(SystemTime::now()),
                "ok": result.is_ok(),
            });
            let mut file = journal.lock().expect("journal lock");
            if let Err(error) = writeln!(file, "{line}") {
                tracing::error!(host = %self.label, %error, "cannot write the command journal");
            }
        }
        match &result {
            Ok(_) => {
                tracing::info!(host = %self.label, command = name, id = %request.id, job = ?request.job_id, ms = started.elapsed().as_millis() as u64, "command done")
            }
            Err(error) => {
                tracing::warn!(host = %self.label, command = name, id = %request.id, job = ?request.job_id, %error, "command failed")
            }
        }
        result
    }
}

/// Answers the handshake with a refusal, logged on both sides.
async fn refuse<W: AsyncWrite + Unpin>(
    label: &str,
    peer: SocketAddr,
    writer: &mut W,
    reason: String,
) {
    tracing::warn!(host = %label, %peer, %reason, "link refused");
    let _ = write_frame(writer, &ServerHello::Refused { reason }).await;
    let _ = tokio::io::AsyncWriteExt::shutdown(writer).await;
}

/// The host's facts: the hypervisor's, with the network's addresses.
fn facts(driver: &dyn Driver, network: &dyn Network) -> Result<HostFacts, AgentError> {
    let mut facts = driver.facts()?;
    facts.addresses = network.addresses()?;
    Ok(facts)
}

fn drive(driver: &dyn Driver, network: &dyn Network, command: Command) -> Outcome {
    match command {
        Command::HostFacts => facts(driver, network).map(Reply::Facts),
        Command::ApplyNetwork(config) => network.apply(&config).map(Reply::Network),
        Command::NetworkStatus => network.status().map(Reply::Network),
        Command::ListDomains => driver.list().map(Reply::Domains),
        Command::DefineDomain(spec) => driver.define(&spec).map(|()| Reply::Done),
        Command::StartDomain { uuid } => driver.start(uuid).map(|()| Reply::Done),
        Command::ShutdownDomain { uuid } => driver.shutdown(uuid).map(|()| Reply::Done),
        Command::DestroyDomain { uuid } => driver.destroy(uuid).map(|()| Reply::Done),
        Command::RebootDomain { uuid } => driver.reboot(uuid).map(|()| Reply::Done),
        Command::SuspendDomain { uuid } => driver.suspend(uuid).map(|()| Reply::Done),
        Command::ResumeDomain { uuid } => driver.resume(uuid).map(|()| Reply::Done),
        Command::AttachDisk { uuid, disk } => driver.attach_disk(uuid, &disk).map(|()| Reply::Done),
        Command::DetachDisk { uuid, disk } => driver.detach_disk(uuid, &disk).map(|()| Reply::Done),
        Command::SnapshotDisk { uuid, disk, new_top } => {
            driver.snapshot_disk(uuid, &disk, &new_top).map(|()| Reply::Done)
        }
        Command::PullDisk { uuid, disk, base } => {
            driver.pull_disk(uuid, &disk, base.as_deref()).map(|()| Reply::Done)
        }
        Command::ResizeDisk { uuid, disk, size } => {
            driver.resize_disk(uuid, &disk, size).map(|()| Reply::Done)
        }
        Command::UndefineDomain { uuid } => driver.undefine(uuid).map(|()| Reply::Done),
        Command::CacheImage { .. }
        | Command::CreateRootVolume { .. }
        | Command::CreateDataVolume { .. }
        | Command::SnapshotVolume { .. }
        | Command::RebaseVolume { .. }
        | Command::ResizeVolume { .. }
        | Command::FlattenVolume { .. }
        | Command::DeleteVolume { .. }
        | Command::DescribeVolume { .. }
        | Command::CleanImageCache { .. }
        | Command::MarkStorage { .. }
        | Command::MountStorage { .. }
        | Command::StorageCapacity { .. }
        | Command::SweepPartialCopies { .. }
        | Command::DigestFile { .. }
        | Command::ReadFile { .. }
        | Command::WriteFile { .. }
        | Command::SealFile { .. } => {
            Err(AgentError::new(AgentErrorCode::BadRequest, "volume commands are not driver calls"))
        }
    }
}
