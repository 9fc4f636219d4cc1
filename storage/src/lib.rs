//! Strato's storage: the [`Store`] trait, its sled and in-memory backends, and [`Db`], the
//! typed, indexed, durable layer the rest of Strato uses.
//!
//! This is the only crate that names sled. Records are serde values encoded by one module,
//! [`codec`], as bincode inside a versioned envelope, so the backend and the encoding can each
//! be swapped if measurements call for it. The crate knows nothing of VMs or hosts: tables are
//! declared by the crates that own the records, through [`Record`].
//!
//! The contract callers rely on:
//! - a write ([`Db::commit`]) returns only once it is durable, and concurrent writers share
//!   flushes (group commit);
//! - a batch is atomic across tables, and index entries are written in the same batch as their
//!   record;
//! - every record carries a generation, and writes can compare-and-swap on it;
//! - a record this build cannot read is a [`CodecError`], never a panic.

mod backend;
pub mod codec;
mod db;
mod error;
mod keys;

pub use backend::{KeyValue, KvIter, MemStore, RawOp, SledStore, Store};
pub use db::{Batch, Db, Durability, Index, IndexReport, Record, Stored, Table, Written};
pub use error::{CodecError, Expect, StoreError, error_chain};
pub use keys::IndexValue;
