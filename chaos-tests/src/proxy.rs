//! The fault proxy: the MN reaches each agent through one, on loopback, so a run can cut,
//! delay, drop and duplicate what travels on the link without touching the machine's network.
//!
//! It understands the link's framing (a 4-byte big-endian length, then the payload), so it
//! drops and duplicates whole frames, as a lossy network under a message protocol would
//! deliver them, never half a frame. A partition holds frames back (TCP would retransmit them
//! after the cut heals) until the MN gives up on the link by its own heartbeats and closes it.
//! The first frame in each direction (the handshake) is never dropped or duplicated: the
//! faults are for the running link.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// What happens to the link's frames.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FrameFaults {
    /// The probability that a frame is dropped.
    pub drop: f64,
    /// The probability that a frame is sent twice.
    pub duplicate: f64,
    /// How long each frame is held before it goes on.
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
    /// which frames the faults hit.
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

    /// Sets the frame faults (the default is none).
    pub fn set_faults(&self, faults: FrameFaults) {
        *self.shared.faults.lock().expect("faults lock") = faults;
    }
}

async fn read_frame(from: &mut OwnedReadHalf) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    from.read_exact(&mut len).await.ok()?;
    let size = u32::from_be_bytes(len) as usize;
    let mut frame = Vec::with_capacity(4 + size);
    frame.extend_from_slice(&len);
    frame.resize(4 + size, 0);
    from.read_exact(&mut frame[4..]).await.ok()?;
    Some(frame)
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: Arc<Shared>) {
    let mut first = true;
    while let Some(frame) = read_frame(&mut from).await {
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
        if !first && dropped {
            continue;
        }
        if to.write_all(&frame).await.is_err() {
            return;
        }
        if !first && duplicated && to.write_all(&frame).await.is_err() {
            return;
        }
        first = false;
    }
    let _ = to.shutdown().await;
}
