//! The [`Store`] trait: the narrow waist between typed tables and an ordered key-value engine.
//!
//! Everything above this trait (envelopes, indexes, compare-and-swap, group commit) is written
//! once in [`Db`](crate::Db); a backend only has to offer ordered reads, one atomic multi-key
//! write, and a flush that makes every applied write durable. That keeps the swap to another
//! engine (a distributed one for scale-out, say) a matter of one small impl.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::RwLock;

use crate::error::StoreError;

/// One write in an atomic batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawOp {
    /// Set `key` to `value`.
    Put(Vec<u8>, Vec<u8>),
    /// Remove `key` (absent keys are fine).
    Delete(Vec<u8>),
}

/// A key-value pair read from a backend.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// An iterator over key-value pairs in key order.
pub type KvIter<'a> = Box<dyn Iterator<Item = Result<KeyValue, StoreError>> + Send + 'a>;

/// An ordered key-value engine.
///
/// Implementations must make [`Store::apply`] atomic (after a crash, a batch is either wholly
/// present or wholly absent) and must make every batch applied before a [`Store::flush`] call
/// durable when that call returns. `apply` alone need not be durable.
pub trait Store: Send + Sync + 'static {
    /// A short name for logs and errors ("sled", "memory").
    fn backend_name(&self) -> &'static str;
    /// Reads one key.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Iterates `[start, end)` (an unbounded end when `None`), forwards or backwards.
    fn range(&self, start: &[u8], end: Option<&[u8]>, reverse: bool) -> KvIter<'_>;
    /// Counts the keys in `[start, end)`, at most `at_most` of them. Backends override it
    /// when they can count without copying keys and values out.
    fn count_range(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        at_most: usize,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.range(start, end, false).take(at_most) {
            item?;
            n += 1;
        }
        Ok(n)
    }
    /// Applies every op atomically.
    fn apply(&self, ops: Vec<RawOp>) -> Result<(), StoreError>;
    /// Makes everything applied so far durable.
    fn flush(&self) -> Result<(), StoreError>;
}

/// The embedded default: sled 0.34 in one directory.
pub struct SledStore {
    db: sled::Db,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").finish_non_exhaustive()
    }
}

const SLED: &str = "sled";

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let open = || {
            sled::Config::new()
                .path(dir)
                .mode(sled::Mode::HighThroughput)
                // Durability is ours to decide: `Db` flushes after every acknowledged batch,
                // so sled's own periodic flush would only add I/O.
                .flush_every_ms(None)
                .open()
        };
        // A store closed a moment ago in this process may still be locked while sled's
        // background threads let go of it: wait for that (up to 2 s), not for another
        // process, which holds the lock for as long as it runs.
        let started = std::time::Instant::now();
        loop {
            match open() {
                Ok(db) => return Ok(SledStore { db }),
                // sled reports it as an `Other` error with this text (sled 0.34's config.rs).
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && started.elapsed() < std::time::Duration::from_secs(2) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(StoreError::backend(SLED, "open", e)),
            }
        }
    }

    /// Bytes the store occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(|e| StoreError::backend(SLED, "size_on_disk", e))
    }
}

impl Store for SledStore {
    fn backend_name(&self) -> &'static str {
        SLED
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| StoreError::backend(SLED, "get", e))
    }

    fn range(&self, start: &[u8], end: Option<&[u8]>, reverse: bool) -> KvIter<'_> {
        let bounds = (
            Bound::Included(start.to_vec()),
            end.map_or(Bound::Unbounded, |e| Bound::Excluded(e.to_vec())),
        );
        let iter = self.db.range::<Vec<u8>, _>(bounds);
        let map = |item: sled::Result<(sled::IVec, sled::IVec)>| {
            item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(|e| StoreError::backend(SLED, "range", e))
        };
        if reverse { Box::new(iter.rev().map(map)) } else { Box::new(iter.map(map)) }
    }

    fn count_range(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        at_most: usize,
    ) -> Result<usize, StoreError> {
        let bounds = (
            Bound::Included(start.to_vec()),
            end.map_or(Bound::Unbounded, |e| Bound::Excluded(e.to_vec())),
        );
        let mut n = 0;
        // Keys only: sled hands out reference-counted views, so nothing is copied.
        for item in self.db.range::<Vec<u8>, _>(bounds).keys().take(at_most) {
            item.map_err(|e| StoreError::backend(SLED, "count", e))?;
            n += 1;
        }
        Ok(n)
    }

    fn apply(&self, ops: Vec<RawOp>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                RawOp::Put(k, v) => batch.insert(k, v),
                RawOp::Delete(k) => batch.remove(k),
            }
        }
        self.db.apply_batch(batch).map_err(|e| StoreError::backend(SLED, "apply", e))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|e| StoreError::backend(SLED, "flush", e))
    }
}

/// An in-memory store for tests and simulations; "durable" means "applied".
#[derive(Debug, Default)]
pub struct MemStore {
    map: RwLock<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemStore {
    fn backend_name(&self) -> &'static str {
        "memory"
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.read().expect("memory store lock").get(key).cloned())
    }

    fn range(&self, start: &[u8], end: Option<&[u8]>, reverse: bool) -> KvIter<'_> {
        // Copy the range out so the iterator holds no lock; tests and simulations only.
        let map = self.map.read().expect("memory store lock");
        let bounds = (
            Bound::Included(start.to_vec()),
            end.map_or(Bound::Unbounded, |e| Bound::Excluded(e.to_vec())),
        );
        let mut items: Vec<KeyValue> =
            map.range(bounds).map(|(k, v)| (k.clone(), v.clone())).collect();
        if reverse {
            items.reverse();
        }
        Box::new(items.into_iter().map(Ok))
    }

    fn apply(&self, ops: Vec<RawOp>) -> Result<(), StoreError> {
        let mut map = self.map.write().expect("memory store lock");
        for op in ops {
            match op {
                RawOp::Put(k, v) => {
                    map.insert(k, v);
                }
                RawOp::Delete(k) => {
                    map.remove(&k);
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
