//! The IaaS domain, built on the runtime: what Strato manages and the rules it keeps.
//!
//! This crate will hold the resource records (zones, clusters, hosts, primary and backup
//! storage, images, instance offerings, L2 and L3 networks, VMs with their NICs and volumes),
//! one actor kind per resource with its state machine and queues, the flows that span
//! resources (creating a VM: allocate a host, an IP, a root volume, then define and start the
//! domain, each step with its rollback), the host allocator, IPAM, cascading deletes, tags
//! and the garbage-collector jobs that finish clean-ups the agents could not do at once.
//!
//! It depends on `strato-runtime` (actors, flows, GC, events), `strato-storage` (records
//! and indexes) and `strato-proto` (commands to host agents); it serves no HTTP and names no
//! storage engine.
//!
//! What exists so far: the VM state machine ([`vm::state`]), IPAM ([`ipam`]), the records
//! ([`records`]), the host actor with its agent link, reconciliation and redial
//! ([`host`]), and the VM actor as far as it applies what hosts observe ([`vm`]). The user's
//! VM operations, the create flow, the allocator and the other resources come next.

/// `text` as a UUID, when it is one in its canonical spelling (36 lowercase hexadecimal
/// digits and hyphens, as the API writes UUIDs), and only then: one resource has one name,
/// so access, tags and slots are decided on one value (braces, upper case, `urn:uuid:` and
/// the simple form are refused).
pub fn canonical_uuid(text: &str) -> Option<uuid::Uuid> {
    #[expect(clippy::disallowed_methods, reason = "the one lenient parse, checked at once")]
    let parsed = uuid::Uuid::try_parse(text).ok()?;
    (parsed.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()) == text).then_some(parsed)
}

/// Commits `batch`: `true` when it landed, `false` when another writer changed one of the
/// records it expects first (read them again and decide again: a conflict is retried by
/// the operation that met it, never answered to a user).
pub(crate) async fn landed(
    db: &strato_storage::Db,
    batch: strato_storage::Batch,
) -> Result<bool, strato_storage::StoreError> {
    match db.commit(batch).await {
        Ok(_) => Ok(true),
        Err(strato_storage::StoreError::Conflict { .. }) => Ok(false),
        Err(error) => Err(error),
    }
}

pub mod accounts;
pub mod allocator;
pub mod backup_storage;
pub mod cascade;
mod files;
pub mod host;
pub mod image_cache;
pub mod images;
pub mod ipam;
pub mod kinds;
pub mod l3;
pub mod local_storage;
pub mod maintenance;
pub mod network;
pub mod owners;
pub mod records;
pub mod shared_capacity;
pub mod snapshot;
pub mod tags;
pub mod vip;
pub mod vm;
pub mod volume;
