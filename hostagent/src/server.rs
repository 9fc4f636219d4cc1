//! The agent's end of the link: accepts the MN, checks the handshake, runs commands at most
//! once per id and never past their deadline, answers pings and pushes domain events.
//!
//! Commands run concurrently (each on its own task; driver calls on the blocking pool), so a
//! slow `start` does not hold up a ping. Results are remembered by command id (the last
//! [`REMEMBERED`] ids): a repeated id, even while the first is still running, gets the first
//! result and the driver is not called again.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use strato_proto::client::unix_ms;
use strato_proto::codec::{read_frame, write_frame};
use strato_proto::{
    AgentError, AgentErrorCode, AgentEvent, ClientHello, Command, FromAgent, PROTOCOL_VERSION,
    Reply, Request, Response, ServerHello, ToAgent,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OnceCell, broadcast, mpsc};
use uuid::Uuid;

use crate::driver::Driver;
use crate::volumes;

/// How many command results the agent remembers for repeats.
pub const REMEMBERED: usize = 65_536;

type Outcome = Result<Reply, AgentError>;

/// Results by command id, bounded.
#[derive(Default)]
struct Memory {
    results: HashMap<Uuid, Arc<OnceCell<Outcome>>>,
    order: VecDeque<Uuid>,
}

/// One agent serving one host.
pub struct Agent {
    token: String,
    driver: Arc<dyn Driver>,
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
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("label", &self.label).finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent for `driver`, accepting MNs that present `token`.
    pub fn new(label: &str, token: String, driver: Arc<dyn Driver>) -> Arc<Self> {
        Self::build(label, token, driver, None)
    }

    /// Like [`Agent::new`], and appends every command it executes to the file at `journal`:
    /// one JSON line with the command id, job, name, domain, start and end (Unix ms) and
    /// whether it succeeded. The chaos runs read it to check that no id ran twice and that
    /// no two jobs changed one domain at once.
    pub fn journaled(
        label: &str,
        token: String,
        driver: Arc<dyn Driver>,
        journal: &std::path::Path,
    ) -> std::io::Result<Arc<Self>> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(journal)?;
        Ok(Self::build(label, token, driver, Some(Mutex::new(file))))
    }

    fn build(
        label: &str,
        token: String,
        driver: Arc<dyn Driver>,
        journal: Option<Mutex<std::fs::File>>,
    ) -> Arc<Self> {
        let (events, _) = broadcast::channel(4096);
        driver.watch(events.clone());
        let (stop, _) = tokio::sync::watch::channel(false);
        Arc::new(Agent {
            token,
            driver,
            events,
            memory: Mutex::default(),
            label: label.to_owned(),
            stop,
            journal,
            domain_locks: Mutex::default(),
        })
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

    async fn link(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let hello = match tokio::time::timeout(
            Duration::from_secs(10),
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
        let refusal = if hello.protocol != PROTOCOL_VERSION {
            Some(format!(
                "protocol mismatch: the MN speaks version {}, this agent speaks {PROTOCOL_VERSION}",
                hello.protocol
            ))
        } else if hello.token != self.token {
            Some(
                "wrong token: start the agent with the token `strato agent-token` prints"
                    .to_owned(),
            )
        } else {
            None
        };
        if let Some(reason) = refusal {
            tracing::warn!(host = %self.label, %peer, %reason, "link refused");
            let _ = write_frame(&mut writer, &ServerHello::Refused { reason }).await;
            return;
        }
        // Subscribe before listing, so no change falls between the list and the events.
        let mut events = self.events.subscribe();
        let driver = self.driver.clone();
        let welcome = tokio::task::spawn_blocking(move || {
            Ok::<_, AgentError>((driver.facts()?, driver.list()?))
        })
        .await;
        let (facts, domains) = match welcome {
            Ok(Ok(welcome)) => welcome,
            Ok(Err(error)) => {
                let reason = format!("the agent cannot read its hypervisor: {error}");
                tracing::error!(host = %self.label, %reason, "link refused");
                let _ = write_frame(&mut writer, &ServerHello::Refused { reason }).await;
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
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                frame = read_frame::<_, ToAgent>(&mut reader) => match frame {
                    Ok(Some(ToAgent::Ping { seq })) => {
                        let _ = out.send(FromAgent::Pong { seq });
                    }
                    Ok(Some(ToAgent::Request(request))) => {
                        let (agent, out) = (self.clone(), out.clone());
                        tokio::spawn(async move {
                            let id = request.id;
                            let result = agent.execute(request).await;
                            let _ = out.send(FromAgent::Response(Response { id, result }));
                        });
                    }
                    Ok(None) => break,
                    Err(error) => {
                        tracing::warn!(host = %self.label, %peer, error = &error as &dyn std::error::Error, "link read failed");
                        break;
                    }
                },
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
        writer_task.abort();
        tracing::info!(host = %self.label, %peer, "MN link closed");
    }

    /// Runs a request once per id; repeats get the first result.
    async fn execute(self: Arc<Self>, request: Request) -> Outcome {
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
            Command::DeleteVolume { path } => volumes::delete_volume(&path).await,
            command => {
                let driver = self.driver.clone();
                tokio::task::spawn_blocking(move || drive(&*driver, command)).await.unwrap_or_else(
                    |e| {
                        Err(AgentError::new(
                            AgentErrorCode::Driver,
                            format!("driver call panicked: {e}"),
                        ))
                    },
                )
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

fn drive(driver: &dyn Driver, command: Command) -> Outcome {
    match command {
        Command::HostFacts => driver.facts().map(Reply::Facts),
        Command::ListDomains => driver.list().map(Reply::Domains),
        Command::DefineDomain(spec) => driver.define(&spec).map(|()| Reply::Done),
        Command::StartDomain { uuid } => driver.start(uuid).map(|()| Reply::Done),
        Command::ShutdownDomain { uuid } => driver.shutdown(uuid).map(|()| Reply::Done),
        Command::DestroyDomain { uuid } => driver.destroy(uuid).map(|()| Reply::Done),
        Command::RebootDomain { uuid } => driver.reboot(uuid).map(|()| Reply::Done),
        Command::SuspendDomain { uuid } => driver.suspend(uuid).map(|()| Reply::Done),
        Command::ResumeDomain { uuid } => driver.resume(uuid).map(|()| Reply::Done),
        Command::UndefineDomain { uuid } => driver.undefine(uuid).map(|()| Reply::Done),
        Command::CacheImage { .. }
        | Command::CreateRootVolume { .. }
        | Command::DeleteVolume { .. } => {
            Err(AgentError::new(AgentErrorCode::BadRequest, "volume commands are not driver calls"))
        }
    }
}
