//! Typed tables, secondary indexes, compare-and-swap and group commit, over any [`Store`].
//!
//! [`Db`] is what the rest of Strato uses. A table holds one [`Record`] type keyed by UUID;
//! each record carries a *generation* (1 when created, +1 on every write) that writers can
//! compare-and-swap on. Secondary indexes are declared by the record type and are written in
//! the same atomic backend batch as the record, so a reader never sees a record without its
//! index entries or an index entry without its record.
//!
//! # Durability and group commit
//!
//! [`Db::commit`] returns only once the batch is durable. Writes are applied under one short
//! write lock (which also makes compare-and-swap and index maintenance race-free), then the
//! writer waits for a flush that covers its batch. One flusher thread runs flushes back to
//! back: every batch applied while a flush is in progress is covered by the next one, so
//! concurrent writers share flushes instead of paying one each. Under load the number of
//! flushes per second stays bounded by the device while acknowledged writes grow with the
//! number of writers.

use std::collections::{BTreeSet, HashMap};
use std::marker::PhantomData;
use std::ops::Bound;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use uuid::Uuid;

use crate::backend::{RawOp, Store};
use crate::codec;
use crate::error::{CodecError, Expect, StoreError};
use crate::keys::{self, IndexValue};

/// A secondary index declared by a record type.
pub struct Index<R> {
    /// The index's name, unique within its table (no `/`).
    pub name: &'static str,
    /// The values the record is indexed under (none, one, or several, such as a VM's IPs).
    pub values: fn(&R) -> Vec<IndexValue>,
}

impl<R> std::fmt::Debug for Index<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").field("name", &self.name).finish_non_exhaustive()
    }
}

/// A record type stored in its own table.
pub trait Record: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The table name and the kind written in every envelope (no `/`).
    const KIND: &'static str;
    /// The schema version this build writes.
    const VERSION: u16;

    /// The record's key.
    fn id(&self) -> Uuid;

    /// The secondary indexes of this table.
    fn indexes() -> &'static [Index<Self>]
    where
        Self: Sized,
    {
        &[]
    }

    /// Reads a payload written with an older schema version. The default refuses.
    fn upgrade(from_version: u16, payload: &[u8]) -> Result<Self, CodecError>
    where
        Self: Sized,
    {
        let _ = payload;
        Err(CodecError::UnknownVersion {
            kind: Self::KIND,
            found: from_version,
            supported: Self::VERSION,
        })
    }
}

/// A record as stored, with its generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored<R> {
    /// The record.
    pub record: R,
    /// Its generation: 1 when created, +1 for every write since.
    pub generation: u64,
}

/// How [`Db::commit`] makes writes durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Writers wait for a shared flush (the default).
    #[default]
    GroupCommit,
    /// Every commit flushes by itself (kept to measure what group commit saves).
    FlushEach,
}

type IndexEntries = Vec<(&'static str, IndexValue)>;

struct PendingWrite {
    table: &'static str,
    version: u16,
    id: Uuid,
    expect: Expect,
    /// The new payload and index entries; `None` deletes the record.
    new: Option<(Vec<u8>, IndexEntries)>,
    /// Decodes a stored value of this table into its index entries.
    old_entries: fn(&[u8]) -> Result<IndexEntries, CodecError>,
}

fn index_entries<R: Record>(record: &R) -> IndexEntries {
    R::indexes()
        .iter()
        .flat_map(|index| (index.values)(record).into_iter().map(move |v| (index.name, v)))
        .collect()
}

fn decode_record<R: Record>(bytes: &[u8]) -> Result<(R, u64), CodecError> {
    codec::decode(R::KIND, R::VERSION, R::upgrade, bytes)
}

fn stored_index_entries<R: Record>(bytes: &[u8]) -> Result<IndexEntries, CodecError> {
    if R::indexes().is_empty() {
        return Ok(Vec::new());
    }
    decode_record::<R>(bytes).map(|(record, _)| index_entries(&record))
}

/// A set of writes applied atomically by [`Db::commit`].
#[derive(Default)]
pub struct Batch {
    writes: Vec<PendingWrite>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.writes.iter().map(|w| (w.table, w.id, w.new.is_some())))
            .finish()
    }
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `record` if the stored generation matches `expect`.
    pub fn put<R: Record>(&mut self, record: &R, expect: Expect) -> Result<&mut Self, StoreError> {
        let payload = codec::encode_payload(R::KIND, record)
            .map_err(|source| StoreError::Codec { table: R::KIND, id: record.id(), source })?;
        self.writes.push(PendingWrite {
            table: R::KIND,
            version: R::VERSION,
            id: record.id(),
            expect,
            new: Some((payload, index_entries(record))),
            old_entries: stored_index_entries::<R>,
        });
        Ok(self)
    }

    /// Deletes record `id` of `R`'s table if the stored generation matches `expect`.
    pub fn delete<R: Record>(&mut self, id: Uuid, expect: Expect) -> &mut Self {
        self.writes.push(PendingWrite {
            table: R::KIND,
            version: R::VERSION,
            id,
            expect,
            new: None,
            old_entries: stored_index_entries::<R>,
        });
        self
    }

    /// Whether the batch has no writes.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

/// The outcome of one write of a committed batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The record's key.
    pub id: Uuid,
    /// Its generation after the write (`None` when deleted).
    pub generation: Option<u64>,
}

/// What [`Db::verify_indexes`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexReport {
    /// Records in the table.
    pub records: usize,
    /// Index entries that should exist and do not: (index, value, id).
    pub missing: Vec<(String, IndexValue, Uuid)>,
    /// Index entries that exist and should not (their record is gone or says otherwise).
    pub stale: Vec<(String, Uuid)>,
}

impl IndexReport {
    /// Whether every index agrees with its table.
    pub fn is_consistent(&self) -> bool {
        self.missing.is_empty() && self.stale.is_empty()
    }
}

#[derive(Debug, Default)]
struct CommitState {
    applied: u64,
    flushed: u64,
    /// The newest sequence number the flusher has tried to flush.
    attempted: u64,
    /// The newest flush failure: sequence numbers in `(after, through]` were not made durable.
    failure: Option<(u64, u64, String)>,
    flushes: u64,
    shutdown: bool,
}

#[derive(Debug)]
struct Commit {
    state: Mutex<CommitState>,
    /// Wakes the flusher when something was applied.
    work: Condvar,
    /// Wakes blocking waiters after a flush.
    done: Condvar,
    /// Wakes async waiters after a flush (the value is a flush counter).
    done_async: watch::Sender<u64>,
}

impl Commit {
    fn outcome(state: &CommitState, seq: u64) -> Option<Result<(), StoreError>> {
        if state.flushed >= seq {
            return Some(Ok(()));
        }
        match &state.failure {
            Some((after, through, message)) if seq > *after && seq <= *through => {
                Some(Err(StoreError::NotDurable { source: message.clone().into() }))
            }
            _ => None,
        }
    }
}

struct DbInner {
    store: Arc<dyn Store>,
    write_lock: Mutex<()>,
    durability: Durability,
    commit: Arc<Commit>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for DbInner {
    fn drop(&mut self) {
        self.commit.state.lock().expect("commit state").shutdown = true;
        self.commit.work.notify_all();
        if let Some(handle) = self.flusher.lock().expect("flusher handle").take() {
            let _ = handle.join();
        }
    }
}

/// Typed, indexed, durable access to a [`Store`]. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    inner: Arc<DbInner>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.inner.store.backend_name())
            .field("durability", &self.inner.durability)
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Wraps `store` with group commit.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_durability(store, Durability::GroupCommit)
    }

    /// Opens the embedded sled store in `dir` with group commit.
    pub fn open_sled(dir: &std::path::Path) -> Result<Self, StoreError> {
        Ok(Self::new(Arc::new(crate::SledStore::open(dir)?)))
    }

    /// A fresh in-memory database.
    pub fn in_memory() -> Self {
        Self::new(Arc::new(crate::MemStore::new()))
    }

    /// Wraps `store` with the given durability mode.
    pub fn with_durability(store: Arc<dyn Store>, durability: Durability) -> Self {
        let (done_async, _) = watch::channel(0);
        let commit = Arc::new(Commit {
            state: Mutex::new(CommitState::default()),
            work: Condvar::new(),
            done: Condvar::new(),
            done_async,
        });
        let flusher = (durability == Durability::GroupCommit).then(|| {
            let (store, commit) = (store.clone(), commit.clone());
            std::thread::Builder::new()
                .name("strato-store-flush".into())
                .spawn(move || run_flusher(&*store, &commit))
                .expect("spawn the store flusher thread")
        });
        Db {
            inner: Arc::new(DbInner {
                store,
                write_lock: Mutex::new(()),
                durability,
                commit,
                flusher: Mutex::new(flusher),
            }),
        }
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.inner.store.backend_name()
    }

    /// How many flushes the group committer has run (for benchmarks and tests).
    pub fn flush_count(&self) -> u64 {
        self.inner.commit.state.lock().expect("commit state").flushes
    }

    /// Reads one record.
    pub fn get<R: Record>(&self, id: Uuid) -> Result<Option<Stored<R>>, StoreError> {
        let Some(bytes) = self.inner.store.get(&keys::record_key(R::KIND, id))? else {
            return Ok(None);
        };
        decode_stored::<R>(id, &bytes).map(Some)
    }

    /// Iterates every record of `R`'s table in key order.
    pub fn scan<R: Record>(&self) -> impl Iterator<Item = Result<Stored<R>, StoreError>> + '_ {
        let prefix = keys::table_prefix(R::KIND);
        let end = keys::prefix_end(&prefix);
        self.inner.store.range(&prefix, end.as_deref(), false).map(|item| {
            let (key, value) = item?;
            let id = keys::id_from_record_key(&key).unwrap_or_default();
            decode_stored::<R>(id, &value)
        })
    }

    /// Counts the records of `R`'s table (a key scan, no decoding).
    pub fn count<R: Record>(&self) -> Result<usize, StoreError> {
        let prefix = keys::table_prefix(R::KIND);
        let end = keys::prefix_end(&prefix);
        let mut n = 0;
        for item in self.inner.store.range(&prefix, end.as_deref(), false) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// The ids of records whose `index` contains exactly `value`, in id order.
    pub fn find<R: Record>(
        &self,
        index: &str,
        value: &IndexValue,
    ) -> Result<Vec<Uuid>, StoreError> {
        let prefix = keys::index_value_prefix(R::KIND, index, value);
        let end = keys::prefix_end(&prefix);
        self.index_ids(&prefix, end.as_deref(), false, usize::MAX)
    }

    /// The ids of records whose `index` value lies in `(lower, upper)`, in value order
    /// (reversed when `reverse`), at most `limit` of them.
    pub fn find_range<R: Record>(
        &self,
        index: &str,
        lower: Bound<&IndexValue>,
        upper: Bound<&IndexValue>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<Uuid>, StoreError> {
        let start = match lower {
            Bound::Unbounded => keys::index_prefix(R::KIND, index),
            Bound::Included(v) => keys::index_value_prefix(R::KIND, index, v),
            Bound::Excluded(v) => {
                let p = keys::index_value_prefix(R::KIND, index, v);
                keys::prefix_end(&p).unwrap_or(p)
            }
        };
        let end = match upper {
            Bound::Unbounded => keys::prefix_end(&keys::index_prefix(R::KIND, index)),
            Bound::Included(v) => keys::prefix_end(&keys::index_value_prefix(R::KIND, index, v)),
            Bound::Excluded(v) => Some(keys::index_value_prefix(R::KIND, index, v)),
        };
        self.index_ids(&start, end.as_deref(), reverse, limit)
    }

    fn index_ids(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<Uuid>, StoreError> {
        let mut ids = Vec::new();
        for item in self.inner.store.range(start, end, reverse).take(limit) {
            let (key, _) = item?;
            if let Some(id) = keys::id_from_record_key(&key) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Applies `batch` atomically and returns once it is durable.
    ///
    /// Nothing is written when any compare-and-swap fails. Cancel safety: the batch is
    /// applied before the first await, so dropping the future after that point leaves the
    /// write in place (and durable at the next flush) without telling the caller.
    pub async fn commit(&self, batch: Batch) -> Result<Vec<Written>, StoreError> {
        let (written, seq) = self.apply(batch)?;
        self.wait_durable(seq).await?;
        Ok(written)
    }

    /// [`Db::commit`] for threads that may block.
    pub fn commit_blocking(&self, batch: Batch) -> Result<Vec<Written>, StoreError> {
        let (written, seq) = self.apply(batch)?;
        self.wait_durable_blocking(seq)?;
        Ok(written)
    }

    fn apply(&self, batch: Batch) -> Result<(Vec<Written>, u64), StoreError> {
        let store = &*self.inner.store;
        let _guard = self.inner.write_lock.lock().expect("store write lock");
        let mut overlay: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        let mut ops = Vec::new();
        let mut written = Vec::with_capacity(batch.writes.len());
        for write in batch.writes {
            let key = keys::record_key(write.table, write.id);
            let current = match overlay.get(&key) {
                Some(value) => value.clone(),
                None => store.get(&key)?,
            };
            let codec_err = |source| StoreError::Codec { table: write.table, id: write.id, source };
            let current_generation = match &current {
                Some(bytes) => Some(codec::header(bytes).map_err(codec_err)?.generation),
                None => None,
            };
            let matches = match write.expect {
                Expect::Any => true,
                Expect::Absent => current_generation.is_none(),
                Expect::Generation(g) => current_generation == Some(g),
            };
            if !matches {
                return Err(StoreError::Conflict {
                    table: write.table,
                    id: write.id,
                    expected: write.expect,
                    found: current_generation,
                });
            }
            let old: BTreeSet<(&'static str, IndexValue)> = match &current {
                Some(bytes) => (write.old_entries)(bytes).map_err(codec_err)?.into_iter().collect(),
                None => BTreeSet::new(),
            };
            let (new, generation) = match write.new {
                Some((payload, entries)) => {
                    let generation = current_generation.unwrap_or(0) + 1;
                    let value = codec::wrap(write.table, write.version, generation, &payload)
                        .map_err(codec_err)?;
                    ops.push(RawOp::Put(key.clone(), value.clone()));
                    overlay.insert(key, Some(value));
                    (entries.into_iter().collect(), Some(generation))
                }
                None => {
                    ops.push(RawOp::Delete(key.clone()));
                    overlay.insert(key, None);
                    (BTreeSet::new(), None)
                }
            };
            for (index, value) in old.difference(&new) {
                ops.push(RawOp::Delete(keys::index_entry_key(write.table, index, value, write.id)));
            }
            for (index, value) in new.difference(&old) {
                ops.push(RawOp::Put(
                    keys::index_entry_key(write.table, index, value, write.id),
                    Vec::new(),
                ));
            }
            written.push(Written { id: write.id, generation });
        }
        if ops.is_empty() {
            return Ok((written, 0));
        }
        store.apply(ops)?;
        let seq = {
            let mut state = self.inner.commit.state.lock().expect("commit state");
            state.applied += 1;
            state.applied
        };
        self.inner.commit.work.notify_one();
        Ok((written, seq))
    }

    async fn wait_durable(&self, seq: u64) -> Result<(), StoreError> {
        if seq == 0 {
            return Ok(());
        }
        if self.inner.durability == Durability::FlushEach {
            return self.inner.store.flush();
        }
        let mut rx = self.inner.commit.done_async.subscribe();
        loop {
            if let Some(outcome) =
                Commit::outcome(&self.inner.commit.state.lock().expect("commit state"), seq)
            {
                return outcome;
            }
            // The sender lives as long as `self`, so `changed` cannot fail here.
            let _ = rx.changed().await;
        }
    }

    fn wait_durable_blocking(&self, seq: u64) -> Result<(), StoreError> {
        if seq == 0 {
            return Ok(());
        }
        if self.inner.durability == Durability::FlushEach {
            return self.inner.store.flush();
        }
        let mut state = self.inner.commit.state.lock().expect("commit state");
        loop {
            if let Some(outcome) = Commit::outcome(&state, seq) {
                return outcome;
            }
            state = self.inner.commit.done.wait(state).expect("commit state");
        }
    }

    /// Checks that every index of `R`'s table agrees with the table.
    pub fn verify_indexes<R: Record>(&self) -> Result<IndexReport, StoreError> {
        let mut report = IndexReport::default();
        let mut expected: BTreeSet<Vec<u8>> = BTreeSet::new();
        let mut expected_values = HashMap::new();
        for stored in self.scan::<R>() {
            let stored = stored?;
            report.records += 1;
            let id = stored.record.id();
            for (index, value) in index_entries(&stored.record) {
                let key = keys::index_entry_key(R::KIND, index, &value, id);
                expected_values.insert(key.clone(), (index, value, id));
                expected.insert(key);
            }
        }
        for index in R::indexes() {
            let prefix = keys::index_prefix(R::KIND, index.name);
            let end = keys::prefix_end(&prefix);
            for item in self.inner.store.range(&prefix, end.as_deref(), false) {
                let (key, _) = item?;
                if !expected.remove(&key) {
                    let id = keys::id_from_record_key(&key).unwrap_or_default();
                    report.stale.push((index.name.to_owned(), id));
                }
            }
        }
        for key in expected {
            let (index, value, id) = expected_values.remove(&key).expect("expected entry");
            report.missing.push((index.to_owned(), value, id));
        }
        Ok(report)
    }
}

fn decode_stored<R: Record>(id: Uuid, bytes: &[u8]) -> Result<Stored<R>, StoreError> {
    let (record, generation) = decode_record::<R>(bytes).map_err(|source| StoreError::Codec {
        table: R::KIND,
        id,
        source,
    })?;
    Ok(Stored { record, generation })
}

fn run_flusher(store: &dyn Store, commit: &Commit) {
    loop {
        let target = {
            let mut state = commit.state.lock().expect("commit state");
            while state.applied == state.attempted && !state.shutdown {
                state = commit.work.wait(state).expect("commit state");
            }
            if state.applied == state.attempted {
                return;
            }
            state.applied
        };
        let result = store.flush();
        {
            let mut state = commit.state.lock().expect("commit state");
            state.flushes += 1;
            state.attempted = target;
            match result {
                Ok(()) => state.flushed = target,
                Err(err) => {
                    tracing::error!(error = &err as &dyn std::error::Error, "store flush failed");
                    // Writers in (flushed, target] hear that their write is not durable; a
                    // later successful flush still covers it, so the range stays open.
                    state.failure = Some((state.flushed, target, err.to_string()));
                }
            }
        }
        commit.done.notify_all();
        commit.done_async.send_modify(|n| *n += 1);
    }
}

/// A typed view of one table, for code that works with a single record type.
#[derive(Debug)]
pub struct Table<R> {
    db: Db,
    _record: PhantomData<fn() -> R>,
}

impl<R> Clone for Table<R> {
    fn clone(&self) -> Self {
        Table { db: self.db.clone(), _record: PhantomData }
    }
}

impl<R: Record> Table<R> {
    /// The table of `R` in `db`.
    pub fn new(db: &Db) -> Self {
        Table { db: db.clone(), _record: PhantomData }
    }

    /// Reads one record.
    pub fn get(&self, id: Uuid) -> Result<Option<Stored<R>>, StoreError> {
        self.db.get::<R>(id)
    }

    /// Writes one record durably if its generation matches `expect`; returns the new one.
    pub async fn put(&self, record: &R, expect: Expect) -> Result<u64, StoreError> {
        let mut batch = Batch::new();
        batch.put(record, expect)?;
        let written = self.db.commit(batch).await?;
        Ok(written[0].generation.unwrap_or_default())
    }

    /// Deletes one record durably if its generation matches `expect`.
    pub async fn delete(&self, id: Uuid, expect: Expect) -> Result<(), StoreError> {
        let mut batch = Batch::new();
        batch.delete::<R>(id, expect);
        self.db.commit(batch).await.map(|_| ())
    }

    /// Iterates every record.
    pub fn scan(&self) -> impl Iterator<Item = Result<Stored<R>, StoreError>> + '_ {
        self.db.scan::<R>()
    }
}
