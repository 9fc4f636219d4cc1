//! The records of accounts: the account itself (its inventory), its password hash and its
//! sessions and API keys, each in a table of its own.
//!
//! Only the account's record is ever handed out. The password hash lives apart
//! ([`CredentialRecord`]) so that no inventory can carry it by mistake, and a session's
//! record is kept under a digest of its token, never the token (the API's `auth` module
//! decides how). What accounts may do and how they log in is the API's, what their quotas
//! admit is [`crate::owners`]'; what is stored is here, beside the other records, so the
//! kind is declared with the others ([`crate::kinds`]).

use serde::{Deserialize, Serialize};
use strato_storage::{Index, IndexValue, Record};
use uuid::Uuid;

/// An account's type, in ZStack's naming.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountType {
    /// The admin.
    SystemAdmin,
    /// A tenant.
    Normal,
}

/// What a normal account may use at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Quota {
    /// VMs.
    pub vm_num: u64,
    /// Virtual CPUs over all VMs.
    pub cpu_num: u64,
    /// Memory over all VMs, in bytes.
    pub memory_size: u64,
    /// Data volumes (ZStack's `volume.data.num`).
    pub volume_data_num: u64,
    /// The data volumes' sizes in all, in bytes (ZStack's `volume.capacity`).
    pub volume_capacity: u64,
}

impl Default for Quota {
    /// ZStack's defaults.
    fn default() -> Self {
        Quota {
            vm_num: 20,
            cpu_num: 80,
            memory_size: 80 << 30,
            volume_data_num: 40,
            volume_capacity: 10 << 40,
        }
    }
}

/// Version 1 of [`Quota`], before volume quotas.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct QuotaV1 {
    vm_num: u64,
    cpu_num: u64,
    memory_size: u64,
}

/// Version 1 of [`AccountRecord`].
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct AccountRecordV1 {
    uuid: Uuid,
    name: String,
    account_type: AccountType,
    quota: QuotaV1,
    create_date: u64,
}

/// An account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountRecord {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its name, unique.
    pub name: String,
    /// Admin or normal.
    #[serde(rename = "type")]
    pub account_type: AccountType,
    /// Its quota (ignored for the admin).
    pub quota: Quota,
    /// When it was made (seconds since the Unix epoch).
    pub create_date: u64,
}

impl Record for AccountRecord {
    const KIND: &'static str = "account";
    const VERSION: u16 = 2;
    fn id(&self) -> Uuid {
        self.uuid
    }
    /// Version 1 accounts get ZStack's default volume quotas.
    fn upgrade(from_version: u16, payload: &[u8]) -> Result<Self, strato_storage::CodecError> {
        match from_version {
            1 => {
                let v1: AccountRecordV1 =
                    strato_storage::codec::decode_payload(Self::KIND, payload)?;
                Ok(AccountRecord {
                    uuid: v1.uuid,
                    name: v1.name,
                    account_type: v1.account_type,
                    quota: Quota {
                        vm_num: v1.quota.vm_num,
                        cpu_num: v1.quota.cpu_num,
                        memory_size: v1.quota.memory_size,
                        ..Quota::default()
                    },
                    create_date: v1.create_date,
                })
            }
            found => Err(strato_storage::CodecError::UnknownVersion {
                kind: Self::KIND,
                found,
                supported: Self::VERSION,
            }),
        }
    }
    fn indexes() -> &'static [Index<Self>] {
        &[Index { name: "name", values: |a| vec![a.name.as_str().into()] }]
    }
}

/// A version 1 account (quota: 7 VMs, 80 CPUs, 80 GiB), encoded, for the upgrade's test.
#[cfg(test)]
pub(crate) fn v1_payload_for_tests() -> Vec<u8> {
    let v1 = AccountRecordV1 {
        uuid: Uuid::new_v4(),
        name: "old".into(),
        account_type: AccountType::Normal,
        quota: QuotaV1 { vm_num: 7, cpu_num: 80, memory_size: 80 << 30 },
        create_date: 1,
    };
    strato_storage::codec::encode_payload(AccountRecord::KIND, &v1).expect("encodes")
}

/// An account's password hash, apart from the account so it is never handed out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRecord {
    /// The account.
    pub account_uuid: Uuid,
    /// The argon2 hash, in PHC string form.
    pub password_hash: String,
}

impl Record for CredentialRecord {
    const KIND: &'static str = "credential";
    const VERSION: u16 = 1;
    fn id(&self) -> Uuid {
        self.account_uuid
    }
}

/// A session or an API key.
///
/// The store never holds a token that works: a session's record is kept under a digest of
/// its token, and an API key's id is public (it names the key in the API) while its 256-bit
/// secret is kept as SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Its id: the digest of a session's token, or an API key's UUID.
    pub uuid: Uuid,
    /// The account.
    pub account_uuid: Uuid,
    /// When it expires (seconds since the Unix epoch; `None` for an API key without expiry).
    pub expired_date: Option<u64>,
    /// An API key's secret, as SHA-256 (`None` for a session).
    pub secret_sha256: Option<[u8; 32]>,
    /// What an API key is for.
    pub description: String,
}

impl Record for SessionRecord {
    const KIND: &'static str = "session";
    const VERSION: u16 = 1;
    fn id(&self) -> Uuid {
        self.uuid
    }
    fn indexes() -> &'static [Index<Self>] {
        &[Index { name: "account", values: |s| vec![IndexValue::Uuid(s.account_uuid)] }]
    }
}
