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
//! [`Db::commit`] returns only once the batch is durable. Writers hand their batches to one
//! committer thread and wait. The committer takes every batch queued since its last round
//! (a *group*), checks each batch's compare-and-swaps against the store plus the batches
//! before it in the group, applies the accepted ones in a single backend batch, flushes once,
//! and answers every writer of the group. A batch whose compare-and-swap fails is answered
//! with the conflict and contributes nothing; the others are unaffected.
//!
//! Combining matters more than sharing the flush alone: measured on sled, a flush running
//! beside concurrent writers slows every write, while one backend batch of 64 writes and one
//! flush costs little more than one write. Under load the group grows with the number of
//! writers, so durable writes per second grow while flushes per second stay bounded by the
//! device. Because one thread applies every write, compare-and-swap and index maintenance
//! need no other lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::marker::PhantomData;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
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

    /// The indexes whose entries are also counted per value, in the same atomic write, so
    /// that [`Db::count_index`] on them is one read however many records match (a VM's
    /// state). Each counted index must be one of [`Record::indexes`].
    fn counted_indexes() -> &'static [&'static str]
    where
        Self: Sized,
    {
        &[]
    }

    /// Whether a UUID of this table is never used for a second record once the first is
    /// deleted (random UUIDs minted by the one writer, as flows'). Such a table keeps no
    /// tombstones: the generation of a deleted record is not kept for a successor that
    /// cannot come, which saves a read and a write per record and the tombstones' growth.
    const IDS_NEVER_REUSED: bool = false;

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
    /// The table's counted indexes.
    counted: &'static [&'static str],
    /// Whether a delete leaves a tombstone (see [`Record::IDS_NEVER_REUSED`]).
    tombstones: bool,
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
            counted: R::counted_indexes(),
            tombstones: !R::IDS_NEVER_REUSED,
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
            counted: R::counted_indexes(),
            tombstones: !R::IDS_NEVER_REUSED,
        });
        self
    }

    /// Moves every write of `other` to the end of this batch.
    pub fn append(&mut self, mut other: Batch) -> &mut Self {
        self.writes.append(&mut other.writes);
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
    /// Counters of counted indexes that disagree with the table: (index, value, stored,
    /// expected).
    pub wrong_counts: Vec<(String, IndexValue, u64, u64)>,
}

impl IndexReport {
    /// Whether every index agrees with its table.
    pub fn is_consistent(&self) -> bool {
        self.missing.is_empty() && self.stale.is_empty() && self.wrong_counts.is_empty()
    }
}

/// The largest group the committer applies at once.
const MAX_GROUP: usize = 1024;

type CommitResult = Result<Vec<Written>, StoreError>;

/// Where the committer sends a writer's answer.
enum Reply {
    Blocking(std::sync::mpsc::SyncSender<CommitResult>),
    Async(oneshot::Sender<CommitResult>),
}

impl Reply {
    fn send(self, result: CommitResult) {
        // A writer that stopped waiting (a dropped future) no longer needs the answer.
        let _ = match self {
            Reply::Blocking(tx) => tx.send(result).map_err(|_| ()),
            Reply::Async(tx) => tx.send(result).map_err(|_| ()),
        };
    }
}

struct Request {
    batch: Batch,
    reply: Reply,
}

#[derive(Default)]
struct CommitQueue {
    requests: Vec<Request>,
    shutdown: bool,
}

struct Committer {
    queue: Mutex<CommitQueue>,
    work: Condvar,
    flushes: AtomicU64,
    groups: AtomicU64,
}

struct DbInner {
    store: Arc<dyn Store>,
    durability: Durability,
    committer: Arc<Committer>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for DbInner {
    fn drop(&mut self) {
        self.committer.queue.lock().expect("commit queue").shutdown = true;
        self.committer.work.notify_all();
        if let Some(handle) = self.thread.lock().expect("committer handle").take() {
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
        let committer = Arc::new(Committer {
            queue: Mutex::new(CommitQueue::default()),
            work: Condvar::new(),
            flushes: AtomicU64::new(0),
            groups: AtomicU64::new(0),
        });
        let group_limit = match durability {
            Durability::GroupCommit => MAX_GROUP,
            Durability::FlushEach => 1,
        };
        let thread = {
            let (store, committer) = (store.clone(), committer.clone());
            std::thread::Builder::new()
                .name("strato-store-commit".into())
                .spawn(move || run_committer(&*store, &committer, group_limit))
                .expect("spawn the store committer thread")
        };
        Db {
            inner: Arc::new(DbInner {
                store,
                durability,
                committer,
                thread: Mutex::new(Some(thread)),
            }),
        }
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.inner.store.backend_name()
    }

    /// How many flushes the committer has run (for benchmarks and tests).
    pub fn flush_count(&self) -> u64 {
        self.inner.committer.flushes.load(Ordering::Relaxed)
    }

    /// How many groups the committer has applied (for benchmarks and tests).
    pub fn group_count(&self) -> u64 {
        self.inner.committer.groups.load(Ordering::Relaxed)
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

    /// Every id `index` names, in value order (reversed when `reverse`), read lazily: a page
    /// sorted by an indexed field reads only as far as the page needs.
    pub fn scan_index<'s, R: Record>(
        &'s self,
        index: &str,
        reverse: bool,
    ) -> impl Iterator<Item = Result<Uuid, StoreError>> + use<'s, R> {
        let prefix = keys::index_prefix(R::KIND, index);
        let end = keys::prefix_end(&prefix);
        self.inner.store.range(&prefix, end.as_deref(), reverse).filter_map(|item| match item {
            Ok((key, _)) => keys::id_from_record_key(&key).map(Ok),
            Err(e) => Some(Err(e)),
        })
    }

    /// How many entries `index` holds for exactly `value`, counting no further than
    /// `at_most`: one read for a counted index, otherwise a key scan (no record is read; the
    /// cap makes it a cheap estimate).
    pub fn count_index<R: Record>(
        &self,
        index: &str,
        value: &IndexValue,
        at_most: usize,
    ) -> Result<usize, StoreError> {
        if R::counted_indexes().contains(&index) {
            let counter = self.inner.store.get(&keys::counter_key(R::KIND, index, value))?;
            return Ok((decode_counter(counter.as_deref()) as usize).min(at_most));
        }
        let prefix = keys::index_value_prefix(R::KIND, index, value);
        let end = keys::prefix_end(&prefix);
        self.inner.store.count_range(&prefix, end.as_deref(), at_most)
    }

    /// The sum of `index`'s counters over every value: the number of records when every
    /// record has exactly one value in it (a state), read in as many reads as there are
    /// values. `index` must be one of `R::counted_indexes`.
    pub fn counted_total<R: Record>(&self, index: &str) -> Result<usize, StoreError> {
        debug_assert!(R::counted_indexes().contains(&index), "{index} is not counted");
        let mut prefix = keys::counter_prefix(R::KIND);
        prefix.extend_from_slice(index.as_bytes());
        prefix.push(b'/');
        let end = keys::prefix_end(&prefix);
        let mut total: u64 = 0;
        for item in self.inner.store.range(&prefix, end.as_deref(), false) {
            let (_, value) = item?;
            total = total.saturating_add(decode_counter(Some(&value)));
        }
        Ok(usize::try_from(total).unwrap_or(usize::MAX))
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
    /// queued on the first poll, so dropping the future after that leaves the write to
    /// happen (durably) without telling the caller.
    pub async fn commit(&self, batch: Batch) -> Result<Vec<Written>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (tx, rx) = oneshot::channel();
        self.enqueue(Request { batch, reply: Reply::Async(tx) });
        rx.await.unwrap_or_else(|_| Err(self.committer_gone()))
    }

    /// Reads record `id`, applies `change` and writes it back with a compare-and-swap,
    /// again on the fresh record for as long as other writers get there first: an update
    /// for a record no actor owns, that loses no one's change and fails on no one's.
    /// Returns the record as written, or `None` when there is no such record.
    pub async fn update<R: Record>(
        &self,
        id: Uuid,
        mut change: impl FnMut(&mut R),
    ) -> Result<Option<R>, StoreError> {
        loop {
            let Some(stored) = self.get::<R>(id)? else { return Ok(None) };
            let mut record = stored.record;
            change(&mut record);
            let mut batch = Batch::new();
            batch.put(&record, Expect::Generation(stored.generation))?;
            match self.commit(batch).await {
                Ok(_) => return Ok(Some(record)),
                // Another writer's change landed first; each lost round is another's success.
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// [`Db::commit`] for threads that may block.
    pub fn commit_blocking(&self, batch: Batch) -> Result<Vec<Written>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.enqueue(Request { batch, reply: Reply::Blocking(tx) });
        rx.recv().unwrap_or_else(|_| Err(self.committer_gone()))
    }

    fn enqueue(&self, request: Request) {
        self.inner.committer.queue.lock().expect("commit queue").requests.push(request);
        self.inner.committer.work.notify_one();
    }

    fn committer_gone(&self) -> StoreError {
        StoreError::NotDurable { source: "the store's committer thread stopped".into() }
    }

    /// Builds the index entries `R` declares but the store lacks: a store written before an
    /// index was declared has none for it. A marker per table names the indexes as last
    /// built, so a store already up to date costs one read, not a scan. Call at startup,
    /// before anything writes `R`. Returns how many entries were added.
    pub fn ensure_indexes<R: Record>(&self) -> Result<usize, StoreError> {
        let marker = keys::index_marker_key(R::KIND);
        let declared: Vec<&str> = R::indexes().iter().map(|i| i.name).collect();
        let wanted = format!("{}|{}", declared.join(","), R::counted_indexes().join(","));
        let wanted = wanted.into_bytes();
        if self.inner.store.get(&marker)?.as_deref() == Some(&wanted[..]) {
            return Ok(0);
        }
        let report = self.verify_indexes::<R>()?;
        let added = report.missing.len();
        let mut ops: Vec<RawOp> = report
            .missing
            .into_iter()
            .map(|(index, value, id)| {
                RawOp::Put(keys::index_entry_key(R::KIND, &index, &value, id), Vec::new())
            })
            .collect();
        // Counters are rebuilt whole: those of indexes no longer counted go too.
        let prefix = keys::counter_prefix(R::KIND);
        let end = keys::prefix_end(&prefix);
        for item in self.inner.store.range(&prefix, end.as_deref(), false) {
            ops.push(RawOp::Delete(item?.0));
        }
        for ((index, value), n) in self.expected_counts::<R>()? {
            ops.push(RawOp::Put(keys::counter_key(R::KIND, index, &value), encode_counter(n)));
        }
        ops.push(RawOp::Put(marker, wanted));
        self.inner.store.apply(ops)?;
        self.inner.store.flush()?;
        if added > 0 {
            tracing::info!(table = R::KIND, added, "index entries backfilled");
        }
        Ok(added)
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
        let mut counts = self.expected_counts::<R>()?;
        let prefix = keys::counter_prefix(R::KIND);
        let end = keys::prefix_end(&prefix);
        let mut stored_counters = HashMap::new();
        for item in self.inner.store.range(&prefix, end.as_deref(), false) {
            let (key, value) = item?;
            stored_counters.insert(key, decode_counter(Some(&value)));
        }
        for ((index, value), n) in counts.drain() {
            let key = keys::counter_key(R::KIND, index, &value);
            let found = stored_counters.remove(&key).unwrap_or(0);
            if found != n {
                report.wrong_counts.push((index.to_owned(), value, found, n));
            }
        }
        report.wrong_counts.extend(
            stored_counters
                .into_values()
                .filter(|n| *n != 0)
                .map(|n| (String::from("?"), IndexValue::Bool(false), n, 0)),
        );
        Ok(report)
    }

    /// What the counters of `R`'s counted indexes should hold, from a scan of the table.
    fn expected_counts<R: Record>(
        &self,
    ) -> Result<HashMap<(&'static str, IndexValue), u64>, StoreError> {
        let mut counts = HashMap::new();
        if R::counted_indexes().is_empty() {
            return Ok(counts);
        }
        for stored in self.scan::<R>() {
            let record = stored?.record;
            let entries: BTreeSet<_> = index_entries(&record).into_iter().collect();
            for (index, value) in entries {
                if R::counted_indexes().contains(&index) {
                    *counts.entry((index, value)).or_insert(0) += 1;
                }
            }
        }
        Ok(counts)
    }
}

fn encode_counter(n: u64) -> Vec<u8> {
    n.to_be_bytes().to_vec()
}

fn decode_counter(bytes: Option<&[u8]>) -> u64 {
    bytes.and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes)
}

fn decode_stored<R: Record>(id: Uuid, bytes: &[u8]) -> Result<Stored<R>, StoreError> {
    let (record, generation) = decode_record::<R>(bytes).map_err(|source| StoreError::Codec {
        table: R::KIND,
        id,
        source,
    })?;
    Ok(Stored { record, generation })
}

/// The committer thread: applies queued batches group by group, one flush per group.
fn run_committer(store: &dyn Store, committer: &Committer, group_limit: usize) {
    loop {
        let group: Vec<Request> = {
            let mut queue = committer.queue.lock().expect("commit queue");
            while queue.requests.is_empty() && !queue.shutdown {
                queue = committer.work.wait(queue).expect("commit queue");
            }
            if queue.requests.is_empty() {
                return;
            }
            let take = queue.requests.len().min(group_limit);
            queue.requests.drain(..take).collect()
        };
        commit_group(store, committer, group);
    }
}

/// The chaos runs' store write errors (failpoint `store-apply`): the group fails as if the
/// backend had refused the write, and nothing of it is applied.
fn injected_apply_failure(store: &dyn Store) -> Result<(), StoreError> {
    fail::fail_point!("store-apply", |_| Err(StoreError::Backend {
        backend: store.backend_name(),
        operation: "apply",
        source: "write error injected by the store-apply failpoint".into(),
    }));
    let _ = store;
    Ok(())
}

fn commit_group(store: &dyn Store, committer: &Committer, group: Vec<Request>) {
    let mut overlay: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
    let mut ops = Vec::new();
    let mut accepted = Vec::with_capacity(group.len());
    for request in group {
        match prepare(store, &overlay, request.batch) {
            Ok(prepared) => {
                ops.extend(prepared.ops);
                overlay.extend(prepared.changes);
                accepted.push((request.reply, prepared.written));
            }
            Err(error) => request.reply.send(Err(error)),
        }
    }
    if accepted.is_empty() {
        return;
    }
    committer.groups.fetch_add(1, Ordering::Relaxed);
    let failure = injected_apply_failure(store)
        .and_then(|()| store.apply(ops))
        .map_err(|error| ("apply", error))
        .and_then(|()| {
            committer.flushes.fetch_add(1, Ordering::Relaxed);
            store.flush().map_err(|error| ("flush", error))
        });
    match failure {
        Ok(()) => {
            for (reply, written) in accepted {
                reply.send(Ok(written));
            }
        }
        Err((stage, error)) => {
            tracing::error!(
                error = &error as &dyn std::error::Error,
                stage,
                writes = accepted.len(),
                "store commit failed"
            );
            // Every writer of the group hears of it; the error is shared as text.
            let message = crate::error::error_chain(&error);
            for (reply, _) in accepted {
                reply.send(Err(match stage {
                    "apply" => StoreError::Backend {
                        backend: store.backend_name(),
                        operation: "apply",
                        source: message.clone().into(),
                    },
                    _ => StoreError::NotDurable { source: message.clone().into() },
                }));
            }
        }
    }
}

/// One batch checked and turned into backend operations.
struct Prepared {
    ops: Vec<RawOp>,
    /// Record keys this batch writes, with their new values (`None`: deleted).
    changes: HashMap<Vec<u8>, Option<Vec<u8>>>,
    written: Vec<Written>,
}

/// Checks `batch`'s compare-and-swaps against the store as the earlier batches of the group
/// (`overlay`) leave it, and computes its record and index operations.
fn prepare(
    store: &dyn Store,
    overlay: &HashMap<Vec<u8>, Option<Vec<u8>>>,
    batch: Batch,
) -> Result<Prepared, StoreError> {
    let mut changes: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
    let mut ops = Vec::new();
    let mut written = Vec::with_capacity(batch.writes.len());
    // Changes to counted indexes' counters, by counter key.
    let mut deltas: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
    for write in batch.writes {
        let key = keys::record_key(write.table, write.id);
        let current = match changes.get(&key).or_else(|| overlay.get(&key)) {
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
        let tombstone = keys::tombstone_key(write.table, write.id);
        let (new, generation) = match write.new {
            Some((payload, entries)) => {
                let previous = match current_generation {
                    Some(generation) => generation,
                    None if !write.tombstones => 0,
                    None => {
                        // Created (again): continue after the generation it had when deleted.
                        let stone =
                            match changes.get(&tombstone).or_else(|| overlay.get(&tombstone)) {
                                Some(value) => value.clone(),
                                None => store.get(&tombstone)?,
                            };
                        if stone.is_some() {
                            ops.push(RawOp::Delete(tombstone.clone()));
                            changes.insert(tombstone.clone(), None);
                        }
                        stone.and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes)
                    }
                };
                let generation = previous + 1;
                let value = codec::wrap(write.table, write.version, generation, &payload)
                    .map_err(codec_err)?;
                ops.push(RawOp::Put(key.clone(), value.clone()));
                changes.insert(key, Some(value));
                (entries.into_iter().collect(), Some(generation))
            }
            None => {
                ops.push(RawOp::Delete(key.clone()));
                changes.insert(key, None);
                if let Some(generation) = current_generation
                    && write.tombstones
                {
                    let stone = generation.to_be_bytes().to_vec();
                    ops.push(RawOp::Put(tombstone.clone(), stone.clone()));
                    changes.insert(tombstone, Some(stone));
                }
                (BTreeSet::new(), None)
            }
        };
        for (index, value) in old.difference(&new) {
            ops.push(RawOp::Delete(keys::index_entry_key(write.table, index, value, write.id)));
            if write.counted.contains(index) {
                *deltas.entry(keys::counter_key(write.table, index, value)).or_insert(0) -= 1;
            }
        }
        for (index, value) in new.difference(&old) {
            ops.push(RawOp::Put(
                keys::index_entry_key(write.table, index, value, write.id),
                Vec::new(),
            ));
            if write.counted.contains(index) {
                *deltas.entry(keys::counter_key(write.table, index, value)).or_insert(0) += 1;
            }
        }
        written.push(Written { id: write.id, generation });
    }
    for (key, delta) in deltas.into_iter().filter(|(_, delta)| *delta != 0) {
        let current = match changes.get(&key).or_else(|| overlay.get(&key)) {
            Some(value) => value.clone(),
            None => store.get(&key)?,
        };
        let n = decode_counter(current.as_deref()).saturating_add_signed(delta);
        let value = (n > 0).then(|| encode_counter(n));
        ops.push(match &value {
            Some(bytes) => RawOp::Put(key.clone(), bytes.clone()),
            None => RawOp::Delete(key.clone()),
        });
        changes.insert(key, value);
    }
    Ok(Prepared { ops, changes, written })
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
