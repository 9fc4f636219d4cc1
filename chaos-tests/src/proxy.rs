//! The fault proxy: the MN reaches each agent through one, on loopback, so a run can cut,
//! delay, drop and duplicate what travels on the link without touching the machine's network.
//!
//! The link is TLS end to end (the proxy holds no key and reads nothing), so the proxy works
//! on TLS records (a 5-byte header whose last two bytes are the length, then the payload):
//! it delays, drops and duplicates whole records, never half of one. A dropped or duplicated
//! record is tampering that TLS detects, so it ends the connection at once, at whichever end
//! reads it, as tampering on a real network would: the MN notices, reconnects and resends by
//! command id. A partition holds records back (TCP would retransmit them after the cut heals)
//! until the MN gives up on the link by its own heartbeats and closes it; the agent ends its
//! side when the MN's close or its idle time reaches it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// What happens to the link's TLS records.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FrameFaults {
    /// The probability that a record is dropped.
    pub drop: f64,
    /// The probability that a record is sent twice.
    pub duplicate: f64,
    /// How long each record is held before it goes on.
    pub delay: Duration,
}

struct Shared {
    partitioned: AtomicBool,
    faults: Mutex<FrameFaults>,
    rng: Mutex<fastrand::Rng>,
}

/// One proxy in front of one agent.
#[derive(Clone)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards every connection to `target`; `seed` fixes
    /// which records the faults hit.
    pub async fn start(target: SocketAddr, seed: u64) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            partitioned: AtomicBool::new(false),
            faults: Mutex::new(FrameFaults::default()),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
        });
        let serving = shared.clone();
        tokio::spawn(async move {
            while let Ok((mn, _)) = listener.accept().await {
                let shared = serving.clone();
                tokio::spawn(async move {
                    let Ok(agent) = TcpStream::connect(target).await else { return };
                    let _ = (mn.set_nodelay(true), agent.set_nodelay(true));
                    let (mn_read, mn_write) = mn.into_split();
                    let (agent_read, agent_write) = agent.into_split();
                    let up = tokio::spawn(pump(mn_read, agent_write, shared.clone()));
                    let down = tokio::spawn(pump(agent_read, mn_write, shared));
                    // When either side ends, the whole connection ends.
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        Ok(FaultProxy { addr, shared })
    }

    /// Where the MN should dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts (`true`) or heals (`false`) the link.
    pub fn partition(&self, cut: bool) {
        self.shared.partitioned.store(cut, Ordering::SeqCst);
    }

    /// Sets the record faults (the default is none).
    pub fn set_faults(&self, faults: FrameFaults) {
        *self.shared.faults.lock().expect("faults lock") = faults;
    }
}

/// Reads one TLS record, header included.
async fn read_record(from: &mut OwnedReadHalf) -> Option<Vec<u8>> {
    let mut header = [0u8; 5];
    from.read_exact(&mut header).await.ok()?;
    let size = u16::from_be_bytes([header[3], header[4]]) as usize;
    let mut record = Vec::with_capacity(5 + size);
    record.extend_from_slice(&header);
    record.resize(5 + size, 0);
    from.read_exact(&mut record[5..]).await.ok()?;
    Some(record)
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: Arc<Shared>) {
    while let Some(record) = read_record(&mut from).await {
        while shared.partitioned.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let faults = *shared.faults.lock().expect("faults lock");
        let (dropped, duplicated) = {
            let mut rng = shared.rng.lock().expect("rng lock");
            (rng.f64() < faults.drop, rng.f64() < faults.duplicate)
        };
        if !faults.delay.is_zero() {
            tokio::time::sleep(faults.delay).await;
        }
        if dropped {
            continue;
        }
        if to.write_all(&record).await.is_err() {
            return;
        }
        if duplicated && to.write_all(&record).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}
