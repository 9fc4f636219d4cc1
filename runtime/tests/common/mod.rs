//! A small actor kind for the runtime's tests: counters stored in the store, with a count of
//! how often each was loaded (activation and every restart load it).

#![allow(
    clippy::disallowed_methods,
    reason = "a synchronous program: it writes with the blocking commit, outside any runtime"
)]
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strato_runtime::{BoxError, Entity, Kind, KindConfig, Runtime, RuntimeConfig};
use strato_storage::{Batch, Db, Expect, Record};
use uuid::Uuid;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub id: Uuid,
    pub value: u64,
}

impl Record for Counter {
    const KIND: &'static str = "counter";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.id
    }
}

pub struct Counters {
    pub db: Db,
    pub loads: Mutex<HashMap<Uuid, u32>>,
    pub load_delay: Duration,
}

impl Entity for Counters {
    const KIND: &'static str = "counter";
    type State = Counter;

    fn load(&self, id: Uuid) -> Result<Option<Counter>, BoxError> {
        *self.loads.lock().unwrap().entry(id).or_default() += 1;
        if !self.load_delay.is_zero() {
            std::thread::sleep(self.load_delay);
        }
        Ok(self.db.get::<Counter>(id)?.map(|s| s.record))
    }
}

impl Counters {
    pub fn loads(&self, id: Uuid) -> u32 {
        self.loads.lock().unwrap().get(&id).copied().unwrap_or(0)
    }
}

pub struct Harness {
    pub runtime: Runtime,
    pub kind: Kind<Counters>,
    pub db: Db,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.runtime.shutdown();
    }
}

pub fn harness(config: KindConfig) -> Harness {
    harness_with(config, Duration::ZERO)
}

pub fn harness_with(config: KindConfig, load_delay: Duration) -> Harness {
    let db = Db::in_memory();
    let runtime =
        Runtime::start(RuntimeConfig { arbiters: 2, ..Default::default() }, db.clone()).unwrap();
    let kind = runtime.register(
        Counters { db: db.clone(), loads: Mutex::new(HashMap::new()), load_delay },
        config,
    );
    Harness { runtime, kind, db }
}

impl Harness {
    pub fn create(&self, value: u64) -> Uuid {
        let id = Uuid::new_v4();
        let mut batch = Batch::new();
        batch.put(&Counter { id, value }, Expect::Absent).unwrap();
        self.db.commit_blocking(batch).unwrap();
        id
    }
}

pub type Shared<T> = Arc<Mutex<T>>;
