//! The query engine's view of the store: every declared kind read through its table and
//! indexes.
//!
//! The engine ([`crate::query`]) knows kinds by their URL names and indexes by the names the
//! declarations give; this module is the one table from those names to record types, and
//! turns records into the inventories the API shows. Reads are lazy where the engine can
//! stop early: a page sorted by an indexed field reads the index only as far as the page.

use serde_json::Value;
use strato_actors::records::{
    BackupStorageRecord, ClusterRecord, HostRecord, ImageRecord, InstanceOfferingRecord,
    L2NetworkRecord, L3NetworkRecord, PrimaryStorageRecord, VmRecord, ZoneRecord,
};
use strato_actors::tags::{SystemTag, UserTag};
use strato_storage::{Db, IndexValue, Record};
use uuid::Uuid;

use crate::auth::AccountRecord;
use crate::error::ApiError;
use crate::query::{FieldType, Inventories, Source};

/// Calls `$f::<R>(args)` with `R` the record type of the queryable kind `$kind` (its name in
/// URLs), or gives `$otherwise` for a kind that is not declared.
macro_rules! for_kind {
    ($kind:expr, $f:ident($($arg:expr),*), $otherwise:expr) => {
        match $kind {
            "zones" => $f::<ZoneRecord>($($arg),*),
            "clusters" => $f::<ClusterRecord>($($arg),*),
            "hosts" => $f::<HostRecord>($($arg),*),
            "instance-offerings" => $f::<InstanceOfferingRecord>($($arg),*),
            "l2-networks" => $f::<L2NetworkRecord>($($arg),*),
            "l3-networks" => $f::<L3NetworkRecord>($($arg),*),
            "vm-instances" => $f::<VmRecord>($($arg),*),
            "images" => $f::<ImageRecord>($($arg),*),
            "backup-storage" => $f::<BackupStorageRecord>($($arg),*),
            "primary-storage" => $f::<PrimaryStorageRecord>($($arg),*),
            "user-tags" => $f::<UserTag>($($arg),*),
            "system-tags" => $f::<SystemTag>($($arg),*),
            "accounts" => $f::<AccountRecord>($($arg),*),
            _ => $otherwise,
        }
    };
}

/// The store as the query engine reads it.
#[derive(Clone, Copy)]
pub struct StoreSource<'a> {
    db: &'a Db,
}

impl std::fmt::Debug for StoreSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSource").field("backend", &self.db.backend_name()).finish()
    }
}

impl<'a> StoreSource<'a> {
    /// Queries over `db`.
    pub fn new(db: &'a Db) -> Self {
        StoreSource { db }
    }

    /// The names of the indexes the record type behind `kind` declares, so a test can check
    /// the query declarations name only indexes that exist.
    pub fn declared_indexes(kind: &str) -> Option<Vec<&'static str>> {
        fn names<R: Record>() -> Option<Vec<&'static str>> {
            Some(R::indexes().iter().map(|i| i.name).collect())
        }
        for_kind!(kind, names(), None)
    }
}

/// The inventory of a record: its JSON form, as the API shows it.
pub fn inventory<T: serde::Serialize>(record: &T) -> Result<Value, ApiError> {
    serde_json::to_value(record).map_err(|e| ApiError::internal(&e))
}

fn index_value(value: &str, ty: FieldType) -> Option<IndexValue> {
    match ty {
        FieldType::Uuid => Uuid::parse_str(value).ok().map(IndexValue::Uuid),
        FieldType::Int => value.parse::<i64>().ok().map(IndexValue::I64),
        FieldType::Text => Some(IndexValue::from(value)),
    }
}

fn scan<R: Record>(db: &Db) -> Inventories<'_> {
    Box::new(db.scan::<R>().map(|stored| inventory(&stored?.record)))
}

fn read<R: Record>(db: &Db, ids: impl IntoIterator<Item = Uuid>) -> Result<Vec<Value>, ApiError> {
    let mut found = Vec::new();
    for id in ids {
        if let Some(stored) = db.get::<R>(id)? {
            found.push(inventory(&stored.record)?);
        }
    }
    Ok(found)
}

fn find<R: Record>(
    db: &Db,
    index: &str,
    value: &str,
    ty: FieldType,
) -> Result<Vec<Value>, ApiError> {
    if index == "#uuid" {
        return read::<R>(db, Uuid::parse_str(value).ok());
    }
    match index_value(value, ty) {
        Some(value) => read::<R>(db, db.find::<R>(index, &value)?),
        None => Ok(Vec::new()),
    }
}

fn ordered<'a, R: Record>(
    db: &'a Db,
    index: &str,
    descending: bool,
    skip: usize,
) -> Inventories<'a> {
    Box::new(db.scan_index::<R>(index, descending).skip(skip).filter_map(move |id| {
        match id.map_err(ApiError::from).and_then(|id| Ok(db.get::<R>(id)?)) {
            Ok(Some(stored)) => Some(inventory(&stored.record)),
            // Deleted between the index read and the record read.
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }))
}

fn count<R: Record>(
    db: &Db,
    index: &str,
    value: &str,
    ty: FieldType,
    at_most: usize,
) -> Result<usize, ApiError> {
    match index_value(value, ty) {
        Some(value) => Ok(db.count_index::<R>(index, &value, at_most)?),
        None => Ok(0),
    }
}

fn nothing<'a>() -> Inventories<'a> {
    Box::new(std::iter::empty())
}

impl Source for StoreSource<'_> {
    fn scan(&self, kind: &str) -> Inventories<'_> {
        for_kind!(kind, scan(self.db), nothing())
    }

    fn find(
        &self,
        kind: &str,
        index: &str,
        value: &str,
        ty: FieldType,
    ) -> Result<Vec<Value>, ApiError> {
        for_kind!(kind, find(self.db, index, value, ty), Ok(Vec::new()))
    }

    fn ordered(&self, kind: &str, index: &str, descending: bool, skip: usize) -> Inventories<'_> {
        for_kind!(kind, ordered(self.db, index, descending, skip), nothing())
    }

    fn count(
        &self,
        kind: &str,
        index: &str,
        value: &str,
        ty: FieldType,
        at_most: usize,
    ) -> Result<usize, ApiError> {
        for_kind!(kind, count(self.db, index, value, ty, at_most), Ok(0))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use strato_actors::records::VmNic;
    use strato_actors::vm::state::VmState;
    use strato_storage::{Batch, Expect};

    use super::*;
    use crate::query::{self, Catalog, Query};

    #[test]
    fn the_declarations_name_only_indexes_the_records_declare() {
        for schema in query::SCHEMAS {
            let declared = StoreSource::declared_indexes(schema.kind)
                .unwrap_or_else(|| panic!("{} has no record type", schema.kind));
            for (path, index) in schema.indexed.iter().chain(schema.sorted) {
                assert!(
                    *index == "#uuid" || declared.contains(index),
                    "{}: `{path}` names index `{index}`, not one of {declared:?}",
                    schema.kind
                );
            }
            for sorted in schema.sorted {
                assert!(schema.indexed.contains(sorted), "{}: {sorted:?}", schema.kind);
            }
        }
    }

    fn vm(i: u32, name: &str, state: VmState) -> VmRecord {
        VmRecord {
            uuid: Uuid::from_u128(u128::from(i.wrapping_mul(2_654_435_761))),
            name: name.to_owned(),
            state,
            host_uuid: None,
            last_host_uuid: None,
            cpu_num: 1 + i % 3,
            memory_size: 1 << 30,
            root_volume_path: None,
            vm_nics: vec![VmNic {
                uuid: Uuid::from_u128(u128::from(i) << 64),
                l3_network_uuid: Uuid::nil(),
                ip: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                mac: String::new(),
                bridge: None,
            }],
        }
    }

    /// Pages and counts the store's indexes answer are those of reading and sorting everything.
    #[test]
    fn index_plans_answer_as_reading_everything_would() {
        let db = Db::in_memory();
        let names = ["web", "db", "web", "cache", "a\u{0}b", "Web", ""];
        let mut batch = Batch::new();
        // More than the planner's threshold for an unselective equality (2,000).
        for i in 0..3600 {
            let state = [VmState::Paused, VmState::Running, VmState::Running][i as usize % 3];
            batch.put(&vm(i, names[i as usize % names.len()], state), Expect::Absent).unwrap();
        }
        db.commit_blocking(batch).unwrap();
        let source = StoreSource::new(&db);
        let schema = query::schema("vm-instances").unwrap();
        let run = |pairs: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> =
                pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            Query::parse(schema, &pairs).unwrap().run(schema, &mut Catalog::new(&source)).unwrap()
        };
        let mut everything: Vec<Value> =
            source.scan("vm-instances").collect::<Result<_, _>>().unwrap();
        assert_eq!(everything.len(), 3600);
        for field in ["name", "state"] {
            everything.sort_by(|a, b| {
                query::sort_key(FieldType::Text, a, field).cmp(&query::sort_key(
                    FieldType::Text,
                    b,
                    field,
                ))
            });
            let uuids = |v: &Value| -> Vec<Value> {
                v["inventories"].as_array().unwrap().iter().map(|i| i["uuid"].clone()).collect()
            };
            let expected: Vec<Value> =
                everything.iter().skip(7).take(20).map(|i| i["uuid"].clone()).collect();
            let body = run(&[("sort", &format!("+{field}")), ("start", "7"), ("limit", "20")]);
            assert_eq!(uuids(&body), expected, "+{field}");
            let expected: Vec<Value> =
                everything.iter().rev().take(5).map(|i| i["uuid"].clone()).collect();
            let body = run(&[("sort", &format!("-{field}")), ("limit", "5")]);
            assert_eq!(uuids(&body), expected, "-{field}");
        }
        // The name index walked, with the state equality evaluated on what it reads.
        everything.sort_by(|a, b| {
            query::sort_key(FieldType::Text, a, "name").cmp(&query::sort_key(
                FieldType::Text,
                b,
                "name",
            ))
        });
        let expected: Vec<Value> = everything
            .iter()
            .filter(|vm| vm["state"] == "Running")
            .skip(3)
            .take(10)
            .map(|i| i["uuid"].clone())
            .collect();
        let body =
            run(&[("q", "state=Running"), ("sort", "+name"), ("start", "3"), ("limit", "10")]);
        assert_eq!(body["inventories"].as_array().unwrap().len(), 10);
        assert_eq!(
            body["inventories"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["uuid"].clone())
                .collect::<Vec<_>>(),
            expected
        );
        assert_eq!(run(&[("q", "state=Running"), ("count", "true")]), json!({ "total": 2400 }));
        assert_eq!(run(&[("q", "name=web"), ("count", "true")]), json!({ "total": 1029 }));
        let body = run(&[("q", "vmNics.ip=10.0.0.42")]);
        assert_eq!(body["inventories"][0]["uuid"], json!(vm(42, "", VmState::Running).uuid));
    }
}
