//! Quotas: what a normal account's resources count, checked and charged under the account's
//! lock, so that two creations at once cannot both take the last slot.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;
use strato_actors::owners::{self, Charge, OwnerRecord};
use strato_storage::Db;
use uuid::Uuid;

use super::{AccountRecord, tenant, unauthenticated};
use crate::error::ApiError;

/// Per-account locks: a quota check and the write of what it admits happen under the lock.
#[derive(Debug, Default)]
pub struct QuotaLocks(std::sync::Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>);

impl QuotaLocks {
    /// The lock of `account`.
    pub fn of(&self, account: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        self.0.lock().expect("quota locks").entry(account).or_default().clone()
    }
}

/// Checks that `charge` more fits `account`'s quota.
pub fn check_quota(db: &Db, account: Uuid, charge: Charge) -> Result<(), ApiError> {
    let quota = db
        .get::<AccountRecord>(account)?
        .map(|a| a.record.quota)
        .ok_or_else(|| unauthenticated("the account no longer exists"))?;
    let used = owners::usage(db, account)?;
    let over = [
        ("vmNum", used.vm_num, charge.vm_num, quota.vm_num),
        ("cpuNum", used.cpu_num, charge.cpu_num, quota.cpu_num),
        ("memorySize", used.memory_size, charge.memory_size, quota.memory_size),
    ]
    .into_iter()
    .find(|(_, used, more, limit)| !strato_actors::host::fits_within(*used, *more, *limit));
    match over {
        Some((name, used, more, limit)) => Err(ApiError::new(
            crate::codes::QUOTA_EXCEEDED,
            format!(
                "quota {name} exceeded: the account uses {used}, this asks {more} more, the quota is {limit}; delete resources or ask the admin for more"
            ),
            json!({ "quota": name, "used": used, "requested": more, "limit": limit }),
        )),
        None => Ok(()),
    }
}

/// An ownership record for a new resource of the caller's, if the caller is a normal
/// account.
pub fn owner_for(resource: Uuid, resource_type: &str, charge: Charge) -> Option<OwnerRecord> {
    tenant().map(|account| OwnerRecord {
        resource_uuid: resource,
        resource_type: resource_type.to_owned(),
        account_uuid: account,
        charge,
    })
}
