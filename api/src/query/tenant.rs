//! A normal account's view of the store for queries: only what its access lets it see
//! ([`crate::auth::visible`]), so lists, counts and joins never reveal another account's
//! resources.

use serde_json::Value;
use strato_storage::Db;
use uuid::Uuid;

use super::{FieldType, Inventories, Source};
use crate::auth::visible;
use crate::error::ApiError;

/// The store as a normal account's queries read it: only what [`visible`] lets it see, so
/// lists, counts and joins never reveal another account's resources.
pub struct TenantSource<'a> {
    /// The store's own view.
    pub inner: super::store::StoreSource<'a>,
    /// The store, for ownership.
    pub db: &'a Db,
    /// The account asking.
    pub tenant: Uuid,
}

impl std::fmt::Debug for TenantSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantSource").field("tenant", &self.tenant).finish_non_exhaustive()
    }
}

impl TenantSource<'_> {
    fn only_visible<'s>(&'s self, kind: &str, items: Inventories<'s>) -> Inventories<'s> {
        let kind = kind.to_owned();
        Box::new(items.filter_map(move |item| match item {
            Ok(item) => match visible(self.db, self.tenant, &kind, &item) {
                Ok(true) => Some(Ok(item)),
                Ok(false) => None,
                Err(e) => Some(Err(e)),
            },
            Err(e) => Some(Err(e)),
        }))
    }
}

impl Source for TenantSource<'_> {
    fn scan(&self, kind: &str) -> Inventories<'_> {
        self.only_visible(kind, self.inner.scan(kind))
    }

    fn find(
        &self,
        kind: &str,
        index: &str,
        value: &str,
        ty: FieldType,
    ) -> Result<Vec<Value>, ApiError> {
        let mut found = Vec::new();
        for item in self.inner.find(kind, index, value, ty)? {
            if visible(self.db, self.tenant, kind, &item)? {
                found.push(item);
            }
        }
        Ok(found)
    }

    fn ordered(&self, kind: &str, index: &str, descending: bool, skip: usize) -> Inventories<'_> {
        // What is skipped must be counted among the visible ones.
        Box::new(self.only_visible(kind, self.inner.ordered(kind, index, descending, 0)).skip(skip))
    }

    // `count` is the default: the store's counters count every account's records, so a
    // tenant's count reads what it sees.
}
