//! The query engine's view of the store: every declared kind read through its table and
//! indexes.
//!
//! The engine ([`super`]) knows kinds by their URL names and indexes by the names the
//! declarations give; the declarations ([`strato_actors::kinds`]) name each kind's table,
//! which reads its records as the inventories the API shows. Reads are lazy where the engine can
//! stop early: a page sorted by an indexed field reads the index only as far as the page.

use serde_json::Value;
use strato_actors::kinds::{self, Table};
use strato_storage::{Db, IndexValue};
use uuid::Uuid;

use super::{FieldType, Inventories, Source};
use crate::error::ApiError;

/// The table behind the kind at URL segment `kind`.
fn table(kind: &str) -> Option<&'static dyn Table> {
    kinds::by_url(kind).map(|k| k.table)
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
}

fn index_value(value: &str, ty: FieldType) -> Option<IndexValue> {
    match ty {
        FieldType::Uuid => strato_actors::canonical_uuid(value).map(IndexValue::Uuid),
        FieldType::Int => value.parse::<i64>().ok().map(IndexValue::I64),
        FieldType::Text => Some(IndexValue::from(value)),
    }
}

fn read(
    db: &Db,
    table: &dyn Table,
    ids: impl IntoIterator<Item = Uuid>,
) -> Result<Vec<Value>, ApiError> {
    let mut found = Vec::new();
    for id in ids {
        if let Some(inventory) = table.inventory(db, id)? {
            found.push(inventory);
        }
    }
    Ok(found)
}

fn nothing<'a>() -> Inventories<'a> {
    Box::new(std::iter::empty())
}

impl Source for StoreSource<'_> {
    fn scan(&self, kind: &str) -> Inventories<'_> {
        match table(kind) {
            Some(table) => Box::new(table.scan(self.db).map(|i| i.map_err(ApiError::from))),
            None => nothing(),
        }
    }

    fn find(
        &self,
        kind: &str,
        index: &str,
        value: &str,
        ty: FieldType,
    ) -> Result<Vec<Value>, ApiError> {
        let Some(table) = table(kind) else { return Ok(Vec::new()) };
        if index == "#uuid" {
            return read(self.db, table, strato_actors::canonical_uuid(value));
        }
        match index_value(value, ty) {
            Some(value) => read(self.db, table, table.find(self.db, index, &value)?),
            None => Ok(Vec::new()),
        }
    }

    fn ordered(&self, kind: &str, index: &str, descending: bool, skip: usize) -> Inventories<'_> {
        let Some(table) = table(kind) else { return nothing() };
        let db = self.db;
        Box::new(table.scan_index(db, index, descending).skip(skip).filter_map(move |id| {
            match id.and_then(|id| table.inventory(db, id)) {
                Ok(Some(inventory)) => Some(Ok(inventory)),
                // Deleted between the index read and the record read.
                Ok(None) => None,
                Err(e) => Some(Err(e.into())),
            }
        }))
    }

    fn count(
        &self,
        kind: &str,
        index: &str,
        value: &str,
        ty: FieldType,
        at_most: usize,
    ) -> Result<usize, ApiError> {
        match (table(kind), index_value(value, ty)) {
            (Some(table), Some(value)) => Ok(table.count_index(self.db, index, &value, at_most)?),
            _ => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use strato_actors::records::{VmNic, VmRecord};
    use strato_actors::vm::state::VmState;
    use strato_storage::{Batch, Expect};

    use super::*;
    use crate::query::{self, Catalog, Query};

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
        #[expect(clippy::disallowed_methods, reason = "a plain test, outside any runtime")]
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
