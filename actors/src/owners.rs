//! Who owns each resource, and what it counts against its owner's quota.
//!
//! Ownership is kept beside the resources, one record per owned resource keyed by the
//! resource's UUID (ZStack's `AccountResourceRefVO`), so adding accounts changed no resource
//! record and a resource type added later is owned the same way. A resource without an
//! ownership record belongs to the admin: everything written before accounts existed, and
//! the infrastructure only the admin creates. An ownership record goes in the same atomic
//! write as its resource (see [`crate::records::delete_refs`]).

use serde::{Deserialize, Serialize};
use strato_storage::{Db, Index, IndexValue, Record, StoreError};
use uuid::Uuid;

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
}

impl std::ops::Add for Charge {
    type Output = Charge;
    /// Saturating: a charge past `u64::MAX` is over every quota, never a small number.
    fn add(self, other: Charge) -> Charge {
        Charge {
            vm_num: self.vm_num.saturating_add(other.vm_num),
            cpu_num: self.cpu_num.saturating_add(other.cpu_num),
            memory_size: self.memory_size.saturating_add(other.memory_size),
        }
    }
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
    const VERSION: u16 = 1;

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
