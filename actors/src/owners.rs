//! Who owns each resource, and what it counts against its owner's quota.
//!
//! Ownership is kept beside the resources, one record per owned resource keyed by the
//! resource's UUID (ZStack's `AccountResourceRefVO`), so adding accounts changed no resource
//! record and a resource type added later is owned the same way. A resource without an
//! ownership record belongs to the admin: everything written before accounts existed, and
//! the infrastructure only the admin creates. An ownership record goes with its resource
//! when the resource is deleted, in the same atomic write (see
//! [`crate::records::delete_refs`]).
//!
//! An owner record is also the resource's charge against its owner's quota. Charges are
//! checked and written under the account's lock ([`Quotas`]), so two creations at once
//! cannot both take the last slot: a VM's creation charges it in its flow's first step,
//! before the VM's record (whose undo takes the charge with it), and a change of offering
//! recharges it in the VM's lifecycle queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use strato_storage::{Batch, Db, Expect, Index, IndexValue, Record, StoreError};
use uuid::Uuid;

use crate::accounts::AccountRecord;

/// The admin account's UUID (ZStack's).
pub const ADMIN: Uuid = Uuid::from_u128(0x36c2_7e8f_f05c_4780_bf6d_2fa6_5700_f22e);

/// What a resource counts against its owner's quota.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Charge {
    /// VMs (1 for a VM).
    pub vm_num: u64,
    /// Virtual CPUs.
    pub cpu_num: u64,
    /// Memory in bytes.
    pub memory_size: u64,
    /// Data volumes (1 for a data volume).
    pub volume_data_num: u64,
    /// A data volume's size in bytes.
    pub volume_capacity: u64,
}

impl Charge {
    /// What a data volume of `size` bytes counts.
    pub fn data_volume(size: u64) -> Charge {
        Charge { volume_data_num: 1, volume_capacity: size, ..Charge::default() }
    }

    /// What going from `self` to `to` adds (nothing where it shrinks).
    pub fn growth_to(self, to: Charge) -> Charge {
        Charge {
            vm_num: to.vm_num.saturating_sub(self.vm_num),
            cpu_num: to.cpu_num.saturating_sub(self.cpu_num),
            memory_size: to.memory_size.saturating_sub(self.memory_size),
            volume_data_num: to.volume_data_num.saturating_sub(self.volume_data_num),
            volume_capacity: to.volume_capacity.saturating_sub(self.volume_capacity),
        }
    }
}

impl std::ops::Add for Charge {
    type Output = Charge;
    /// Saturating: a charge past `u64::MAX` is over every quota, never a small number.
    fn add(self, other: Charge) -> Charge {
        Charge {
            vm_num: self.vm_num.saturating_add(other.vm_num),
            cpu_num: self.cpu_num.saturating_add(other.cpu_num),
            memory_size: self.memory_size.saturating_add(other.memory_size),
            volume_data_num: self.volume_data_num.saturating_add(other.volume_data_num),
            volume_capacity: self.volume_capacity.saturating_add(other.volume_capacity),
        }
    }
}

/// Version 1 of [`Charge`], before volume quotas.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct ChargeV1 {
    vm_num: u64,
    cpu_num: u64,
    memory_size: u64,
}

/// Version 1 of [`OwnerRecord`].
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct OwnerRecordV1 {
    resource_uuid: Uuid,
    resource_type: String,
    account_uuid: Uuid,
    charge: ChargeV1,
}

/// The owner of one resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerRecord {
    /// The resource (the record's key).
    pub resource_uuid: Uuid,
    /// Its type, in ZStack's naming (`VmInstanceVO`, `Job`).
    pub resource_type: String,
    /// The owning account.
    pub account_uuid: Uuid,
    /// What it counts against the account's quota.
    pub charge: Charge,
}

impl Record for OwnerRecord {
    const KIND: &'static str = "owner";
    const VERSION: u16 = 2;

    /// Version 1 charges counted no volumes.
    fn upgrade(from_version: u16, payload: &[u8]) -> Result<Self, strato_storage::CodecError> {
        match from_version {
            1 => {
                let v1: OwnerRecordV1 = strato_storage::codec::decode_payload(Self::KIND, payload)?;
                Ok(OwnerRecord {
                    resource_uuid: v1.resource_uuid,
                    resource_type: v1.resource_type,
                    account_uuid: v1.account_uuid,
                    charge: Charge {
                        vm_num: v1.charge.vm_num,
                        cpu_num: v1.charge.cpu_num,
                        memory_size: v1.charge.memory_size,
                        ..Charge::default()
                    },
                })
            }
            found => Err(strato_storage::CodecError::UnknownVersion {
                kind: Self::KIND,
                found,
                supported: Self::VERSION,
            }),
        }
    }

    fn id(&self) -> Uuid {
        self.resource_uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[Index { name: "account", values: |o| vec![IndexValue::Uuid(o.account_uuid)] }]
    }
}

/// The account owning `resource` (the admin when no record names one).
pub fn owner_of(db: &Db, resource: Uuid) -> Result<Uuid, StoreError> {
    Ok(db.get::<OwnerRecord>(resource)?.map_or(ADMIN, |s| s.record.account_uuid))
}

/// Everything `account` owns.
pub fn owned_by(db: &Db, account: Uuid) -> Result<Vec<OwnerRecord>, StoreError> {
    let mut owned = Vec::new();
    for id in db.find::<OwnerRecord>("account", &IndexValue::Uuid(account))? {
        if let Some(stored) = db.get::<OwnerRecord>(id)? {
            owned.push(stored.record);
        }
    }
    Ok(owned)
}

/// What `account`'s resources count against its quota, in all.
pub fn usage(db: &Db, account: Uuid) -> Result<Charge, StoreError> {
    Ok(owned_by(db, account)?.into_iter().fold(Charge::default(), |sum, o| sum + o.charge))
}

/// Why a charge was not made.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    /// It does not fit the account's quota.
    #[error(
        "quota {quota} exceeded: the account uses {used}, this asks {requested} more, the quota is {limit}; delete resources or ask the admin for more"
    )]
    Exceeded {
        /// Which quota (`vmNum`, `cpuNum`, `memorySize`, `volumeDataNum`, `volumeCapacity`).
        quota: &'static str,
        /// What the account uses.
        used: u64,
        /// What the charge adds.
        requested: u64,
        /// The quota.
        limit: u64,
    },
    /// The account is gone.
    #[error("account {0} no longer exists")]
    NoAccount(Uuid),
    /// The store failed.
    #[error("the store failed")]
    Store(#[from] StoreError),
}

/// Checks that `charge` more fits `account`'s quota (the admin has none). Checked again under
/// the account's lock when a charge is made ([`Quotas::charge`]); alone, it refuses early.
pub fn check(db: &Db, account: Uuid, charge: Charge) -> Result<(), QuotaError> {
    if account == ADMIN {
        return Ok(());
    }
    let quota =
        db.get::<AccountRecord>(account)?.ok_or(QuotaError::NoAccount(account))?.record.quota;
    let used = usage(db, account)?;
    let over = [
        ("vmNum", used.vm_num, charge.vm_num, quota.vm_num),
        ("cpuNum", used.cpu_num, charge.cpu_num, quota.cpu_num),
        ("memorySize", used.memory_size, charge.memory_size, quota.memory_size),
        ("volumeDataNum", used.volume_data_num, charge.volume_data_num, quota.volume_data_num),
        ("volumeCapacity", used.volume_capacity, charge.volume_capacity, quota.volume_capacity),
    ]
    .into_iter()
    .find(|(_, used, more, limit)| !crate::host::fits_within(*used, *more, *limit));
    match over {
        Some((quota, used, requested, limit)) => {
            Err(QuotaError::Exceeded { quota, used, requested, limit })
        }
        None => Ok(()),
    }
}

/// Per-account locks: a quota check and the write of the charge it admits happen under the
/// account's lock.
#[derive(Debug, Default)]
pub struct Quotas(Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>);

impl Quotas {
    fn lock_of(&self, account: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        self.0.lock().expect("quota locks").entry(account).or_default().clone()
    }

    /// Charges new resource `owner.resource_uuid` to its account, if it fits: checked and
    /// written (durably) under the account's lock. Charging again what is charged changes
    /// nothing (a flow step run again after a crash).
    pub async fn charge(&self, db: &Db, owner: &OwnerRecord) -> Result<(), QuotaError> {
        let lock = self.lock_of(owner.account_uuid);
        let _one_at_a_time = lock.lock().await;
        if db.get::<OwnerRecord>(owner.resource_uuid)?.is_some_and(|s| s.record == *owner) {
            return Ok(());
        }
        check(db, owner.account_uuid, owner.charge)?;
        let mut batch = Batch::new();
        batch.put(owner, Expect::Any)?;
        db.commit(batch).await?;
        Ok(())
    }

    /// Writes a new resource with `write` if `owner`'s charge (which `write` stores) fits
    /// its account's quota: checked and written under the account's lock.
    pub async fn admit<T, E, F, Fut>(&self, db: &Db, owner: &OwnerRecord, write: F) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
        E: From<QuotaError>,
    {
        let lock = self.lock_of(owner.account_uuid);
        let _one_at_a_time = lock.lock().await;
        check(db, owner.account_uuid, owner.charge)?;
        write().await
    }

    /// Changes resource `resource`'s charge to `charge`, if its growth fits its owner's
    /// quota, under the account's lock. Returns the charge it had (to give back with
    /// [`Quotas::restore`] if what the charge is for does not happen), or `None` for a
    /// resource nobody but the admin owns.
    pub async fn recharge(
        &self,
        db: &Db,
        resource: Uuid,
        charge: Charge,
    ) -> Result<Option<OwnerRecord>, QuotaError> {
        let Some(owner) = db.get::<OwnerRecord>(resource)?.map(|s| s.record) else {
            return Ok(None);
        };
        let lock = self.lock_of(owner.account_uuid);
        let _one_at_a_time = lock.lock().await;
        // Read again under the lock: another change's charge is the one this grows from.
        let Some(stored) = db.get::<OwnerRecord>(resource)? else { return Ok(None) };
        let previous = stored.record;
        let growth = previous.charge.growth_to(charge);
        check(db, previous.account_uuid, growth)?;
        let mut batch = Batch::new();
        batch.put(
            &OwnerRecord { charge, ..previous.clone() },
            Expect::Generation(stored.generation),
        )?;
        // Only the resource's deletion writes its owner record without the lock: a conflict
        // means it is gone, and nothing is charged for it any more.
        match db.commit(batch).await {
            Ok(_) => Ok(Some(previous)),
            Err(StoreError::Conflict { .. }) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Gives back the charge `previous` had before a [`Quotas::recharge`] whose purpose did
    /// not happen, unless the resource is gone meanwhile.
    pub async fn restore(&self, db: &Db, previous: OwnerRecord) -> Result<(), QuotaError> {
        let lock = self.lock_of(previous.account_uuid);
        let _one_at_a_time = lock.lock().await;
        let Some(stored) = db.get::<OwnerRecord>(previous.resource_uuid)? else { return Ok(()) };
        let mut batch = Batch::new();
        batch.put(&previous, Expect::Generation(stored.generation))?;
        match db.commit(batch).await {
            Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::{AccountRecord, Quota};

    #[test]
    fn records_written_before_volume_quotas_count_no_volumes_and_get_the_default_quotas() {
        let owner = OwnerRecordV1 {
            resource_uuid: Uuid::new_v4(),
            resource_type: "VmInstanceVO".into(),
            account_uuid: Uuid::new_v4(),
            charge: ChargeV1 { vm_num: 1, cpu_num: 2, memory_size: 3 },
        };
        let payload = strato_storage::codec::encode_payload(OwnerRecord::KIND, &owner).unwrap();
        let upgraded = OwnerRecord::upgrade(1, &payload).unwrap();
        assert_eq!(upgraded.account_uuid, owner.account_uuid);
        assert_eq!(
            upgraded.charge,
            Charge { vm_num: 1, cpu_num: 2, memory_size: 3, ..Charge::default() }
        );
        assert!(OwnerRecord::upgrade(3, &payload).is_err());

        let account = AccountRecord::upgrade(1, &crate::accounts::v1_payload_for_tests()).unwrap();
        assert_eq!(account.quota, Quota { vm_num: 7, ..Quota::default() });
    }

    #[test]
    fn growth_counts_only_what_grows() {
        let from = Charge { cpu_num: 4, ..Charge::data_volume(10) };
        let to = Charge { cpu_num: 2, ..Charge::data_volume(25) };
        assert_eq!(from.growth_to(to), Charge { volume_capacity: 15, ..Charge::default() });
    }
}
