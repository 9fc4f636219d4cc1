//! What shared primary storage (SharedMountPoint, NFS) holds and what is booked on it.
//!
//! Local storage is booked on each host's record, in the host actor's `capacity` queue. A
//! shared storage belongs to no host, so its bookings live in a record of their own, one
//! per storage: the size last measured (by any host mounting it, at each connect and when
//! the storage is attached) and each volume's booking by UUID, so that booking again is
//! a change of size, and giving back twice gives back once. The record is written by
//! compare-and-swap, again on the fresh record when another writer got there first, so
//! concurrent bookings by different VM actors never fail on each other.
//!
//! As for local storage, a volume books its virtual size (ZStack's thick accounting): a
//! root volume its image's size, a data volume its size when it is made and again when it
//! grows. An unmeasured storage bounds nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use strato_storage::{Batch, Db, Expect, Record, StoreError};
use uuid::Uuid;

/// A shared storage's measured size and its bookings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SharedCapacityRecord {
    /// The storage's UUID.
    pub uuid: Uuid,
    /// The size of the file system holding it, in bytes (0: never measured).
    pub total: u64,
    /// What that file system had free when measured, in bytes.
    pub available_physical: u64,
    /// Each volume's booking, in bytes.
    pub bookings: BTreeMap<Uuid, u64>,
}

impl Record for SharedCapacityRecord {
    const KIND: &'static str = "shared-storage-capacity";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }
}

impl SharedCapacityRecord {
    /// Everything booked, in bytes.
    pub fn booked(&self) -> u64 {
        self.bookings.values().fold(0u64, |sum, size| sum.saturating_add(*size))
    }

    /// What can still be booked (everything, if it was never measured).
    pub fn free(&self) -> u64 {
        if self.total == 0 { u64::MAX } else { self.total.saturating_sub(self.booked()) }
    }
}

/// Applies `change` to storage `storage`'s record (made if it has none), again on the fresh
/// record while other writers get there first. Answers the record as written.
async fn change<T>(
    db: &Db,
    storage: Uuid,
    mut change: impl FnMut(&mut SharedCapacityRecord) -> Option<T>,
) -> Result<Option<T>, StoreError> {
    loop {
        let stored = db.get::<SharedCapacityRecord>(storage)?;
        let (mut record, expect) = match stored {
            Some(stored) => (stored.record, Expect::Generation(stored.generation)),
            None => (SharedCapacityRecord { uuid: storage, ..Default::default() }, Expect::Absent),
        };
        let Some(answer) = change(&mut record) else { return Ok(None) };
        let mut batch = Batch::new();
        batch.put(&record, expect)?;
        if crate::landed(db, batch).await? {
            return Ok(Some(answer));
        }
    }
}

/// Records storage `storage`'s size as a host measured it; the bookings stay.
pub async fn measured(
    db: &Db,
    storage: Uuid,
    total: u64,
    available: u64,
) -> Result<(), StoreError> {
    change(db, storage, |r| {
        (r.total, r.available_physical) = (total, available);
        Some(())
    })
    .await?;
    Ok(())
}

/// Books `size` bytes for `volume` on shared storage `storage` (replacing what it booked
/// before). False: the storage has no room for it, and nothing changed.
pub async fn book(db: &Db, storage: Uuid, volume: Uuid, size: u64) -> Result<bool, StoreError> {
    let booked = change(db, storage, |r| {
        let before = r.bookings.get(&volume).copied().unwrap_or(0);
        let others = r.booked().saturating_sub(before);
        let fits = r.total == 0 || others.checked_add(size).is_some_and(|all| all <= r.total);
        if !fits {
            return None;
        }
        r.bookings.insert(volume, size);
        Some(())
    })
    .await?;
    Ok(booked.is_some())
}

/// Gives back what `volume` booked on shared storage `storage` (nothing if it booked
/// nothing).
pub async fn unbook(db: &Db, storage: Uuid, volume: Uuid) -> Result<(), StoreError> {
    if db
        .get::<SharedCapacityRecord>(storage)?
        .is_none_or(|s| !s.record.bookings.contains_key(&volume))
    {
        return Ok(());
    }
    change(db, storage, |r| r.bookings.remove(&volume).map(|_| ())).await?;
    Ok(())
}

/// Adds to `batch` the return of what `volume` booked on shared storage `storage` (nothing if
/// it booked nothing), expected at the generation read: the caller's deletion of the
/// volume's record and the return land together or not at all, and a booking by another
/// volume meanwhile makes the caller decide again.
pub fn unbook_with(
    db: &Db,
    batch: &mut Batch,
    storage: Uuid,
    volume: Uuid,
) -> Result<(), StoreError> {
    let Some(stored) = db.get::<SharedCapacityRecord>(storage)? else { return Ok(()) };
    let mut record = stored.record;
    if record.bookings.remove(&volume).is_some() {
        batch.put(&record, Expect::Generation(stored.generation))?;
    }
    Ok(())
}

/// What can still be booked on each shared storage, by storage.
pub fn free_by_storage(db: &Db) -> Result<BTreeMap<Uuid, u64>, StoreError> {
    let mut free = BTreeMap::new();
    for stored in db.scan::<SharedCapacityRecord>() {
        let record = stored?.record;
        free.insert(record.uuid, record.free());
    }
    Ok(free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bookings_are_bounded_by_the_measured_size_and_given_back_once() {
        let db = Db::in_memory();
        let (storage, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        assert!(book(&db, storage, a, 70).await.unwrap(), "unmeasured: unbounded");
        measured(&db, storage, 100, 90).await.unwrap();
        assert!(!book(&db, storage, b, 40).await.unwrap(), "70 + 40 > 100");
        assert!(book(&db, storage, b, 30).await.unwrap());
        assert!(book(&db, storage, a, 60).await.unwrap(), "booking again changes the size");
        assert!(book(&db, storage, b, 40).await.unwrap(), "60 + 40 fits");
        unbook(&db, storage, a).await.unwrap();
        unbook(&db, storage, a).await.unwrap();
        let left = db.get::<SharedCapacityRecord>(storage).unwrap().unwrap().record;
        assert_eq!((left.booked(), left.free(), left.available_physical), (40, 60, 90));
    }
}
