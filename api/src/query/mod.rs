//! The query API: `GET /v1/<kind>?q=...`, ZStack's hallmark, for every resource kind.
//!
//! Every kind is declared once ([`strato_actors::kinds`]): its fields with their types, and its relations
//! to other kinds (a field holding another resource's UUID, the resources pointing back at
//! this one, or a list of nested objects such as a VM's NICs). The engine knows nothing of
//! any kind beyond that declaration, so a later network service adds a join field (ZStack's
//! `vmNics.eip.vipIp`) by declaring a relation, without touching the engine. The same
//! declaration checks every condition: an unknown field or a value of the wrong type is a
//! 400 naming it and listing the valid fields.
//!
//! Conditions (`q=` repeated, AND-ed): `=`, `!=`, `>`, `>=`, `<`, `<=`, `?=` (in a comma
//! list), `!?=` (not in), `~=` (like, `%` as wildcard), `!~=`, and `field=null` /
//! `field!=null`. A path may cross relations to any depth (`vmNics.l3Network.name=pub`,
//! `host.cluster.zone.name=z1`); a condition on a list holds when one element satisfies it
//! (and a negative one when none satisfies its positive form). Then `sort=+field|-field`,
//! `start`, `limit` (default 1000), `count=true` (only the total), `replyWithCount=true`
//! (adds `total`) and `fields=a,b` (only those fields).
//!
//! Queries read the kinds' inventories as the API shows them, from a [`Source`] (the store,
//! through [`store`]; a normal account through [`tenant`]). The declarations also name the store's indexes, which
//! pick the plan (see [`Query::run`]): an equality on an indexed path reads only what the
//! index names; a sort on an indexed field walks the index and stops at a full page; a count
//! of one equality on a counted index is one read. That is what keeps queries over a million
//! VMs in milliseconds (BENCHMARKS.md). A join reads each related resource once per request,
//! by UUID or through the index of the field pointing back.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::error::ApiError;

pub mod store;
pub mod tenant;

pub use store::StoreSource;
pub use tenant::TenantSource;

pub use strato_actors::kinds::{Field, FieldType, Relation, Shape as Schema};

/// The relations a path may cross from `schema`: a kind's declared ones and its tags', or a
/// nested object's own.
fn relations(schema: &'static Schema) -> Box<dyn Iterator<Item = &'static Relation>> {
    match strato_actors::kinds::by_url(schema.name) {
        Some(kind) if std::ptr::eq(&kind.shape, schema) => Box::new(kind.relations()),
        _ => Box::new(schema.relations.iter()),
    }
}

fn relation(schema: &'static Schema, name: &str) -> Option<&'static Relation> {
    relations(schema).find(|r| r.name() == name)
}

/// The condition paths `schema` offers one relation deep (`name`, `vmNics.ip`,
/// `host.name`), for documentation and the CLI's completion.
pub fn queryable_paths(schema: &'static Schema) -> Vec<String> {
    let mut paths: Vec<String> = schema.fields.iter().map(|f| f.name.to_owned()).collect();
    for relation in relations(schema) {
        let target = match relation {
            Relation::Ref { kind, .. } | Relation::Back { kind, .. } => schema_of(kind),
            Relation::Nested { shape, .. } => shape,
        };
        paths.extend(target.fields.iter().map(|f| format!("{}.{}", relation.name(), f.name)));
    }
    paths
}

/// Every name a condition may start with in `schema`, for error messages.
fn valid_names(schema: &'static Schema) -> Vec<&'static str> {
    schema.fields.iter().map(|f| f.name).chain(relations(schema).map(Relation::name)).collect()
}

/// ZStack's shorthands for conditions on tags.
const TAG_ALIASES: [(&str, &str); 2] =
    [("__userTag__", "userTags.tag"), ("__systemTag__", "systemTags.tag")];

/// The schema of the kind at URL segment `kind`.
pub fn schema(kind: &str) -> Option<&'static Schema> {
    strato_actors::kinds::by_url(kind).map(|k| &k.shape)
}

/// A comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    In,
    NotIn,
    Like,
    NotLike,
}

impl Op {
    /// Longest first, so `!?=` is not read as `!` then `?=`.
    const TOKENS: [(&'static str, Op); 10] = [
        ("!?=", Op::NotIn),
        ("!~=", Op::NotLike),
        ("?=", Op::In),
        ("~=", Op::Like),
        ("!=", Op::Ne),
        (">=", Op::Ge),
        ("<=", Op::Le),
        ("=", Op::Eq),
        (">", Op::Gt),
        ("<", Op::Lt),
    ];

    fn negative(self) -> bool {
        matches!(self, Op::Ne | Op::NotIn | Op::NotLike)
    }

    fn positive(self) -> Op {
        match self {
            Op::Ne => Op::Eq,
            Op::NotIn => Op::In,
            Op::NotLike => Op::Like,
            other => other,
        }
    }
}

/// One checked condition.
#[derive(Clone, Debug)]
pub struct Condition {
    /// The path, split at dots.
    pub path: Vec<String>,
    /// The comparison.
    pub op: Op,
    /// The value (`None`: `null`).
    pub value: Option<String>,
    /// The type of the field the path ends at.
    pub ty: FieldType,
}

fn bad(field: &str, message: String, valid: &[&str]) -> ApiError {
    ApiError::invalid(field, format!("{message}; valid here: {}", valid.join(", ")))
}

/// Parses and checks `text` (`vmNics.ip=10.0.0.5`) against `schema`.
pub fn parse_condition(schema: &'static Schema, text: &str) -> Result<Condition, ApiError> {
    let at = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_'))
        .ok_or_else(|| ApiError::invalid("q", format!("`{text}` has no operator")))?;
    let (path_text, rest) = text.split_at(at);
    let path_text =
        TAG_ALIASES.iter().find(|(alias, _)| *alias == path_text).map_or(path_text, |(_, p)| p);
    let (op, value) = Op::TOKENS
        .iter()
        .find_map(|(token, op)| rest.strip_prefix(token).map(|v| (*op, v)))
        .ok_or_else(|| ApiError::invalid("q", format!("`{text}` has no operator")))?;
    let path: Vec<String> = path_text.split('.').map(str::to_owned).collect();
    // Walk the declarations to the field the path ends at.
    let mut here = schema;
    for (i, step) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        if last && let Some(field) = here.field(step) {
            let value = (value != "null").then(|| value.to_owned());
            check_value(path_text, field.ty, op, value.as_deref())?;
            return Ok(Condition { path, op, value, ty: field.ty });
        }
        match relation(here, step) {
            Some(Relation::Ref { kind, .. } | Relation::Back { kind, .. }) if !last => {
                here = crate::query::schema(kind).expect("relations name declared kinds");
            }
            Some(Relation::Nested { shape, .. }) if !last => here = shape,
            _ => {
                return Err(bad(
                    path_text,
                    format!("`{path_text}`: `{step}` is not a field of {}", here.name),
                    &valid_names(here),
                ));
            }
        }
    }
    Err(bad(path_text, format!("`{path_text}` names no field"), &valid_names(here)))
}

fn check_value(field: &str, ty: FieldType, op: Op, value: Option<&str>) -> Result<(), ApiError> {
    let Some(value) = value else {
        return match op {
            Op::Eq | Op::Ne => Ok(()),
            _ => Err(ApiError::invalid(field, format!("`{field}`: null takes only = or !="))),
        };
    };
    let values: Vec<&str> =
        if matches!(op, Op::In | Op::NotIn) { value.split(',').collect() } else { vec![value] };
    if matches!(op, Op::Like | Op::NotLike) {
        return Ok(());
    }
    for v in values {
        let ok = match ty {
            FieldType::Int => v.parse::<i64>().is_ok(),
            FieldType::Uuid => {
                matches!(op, Op::Gt | Op::Ge | Op::Lt | Op::Le)
                    || strato_actors::canonical_uuid(v).is_some()
            }
            FieldType::Text => true,
        };
        if !ok {
            return Err(ApiError::invalid(field, format!("`{field}` is {ty:?}; `{v}` is not one")));
        }
    }
    Ok(())
}

/// A stream of inventories, read as it is consumed.
pub type Inventories<'a> = Box<dyn Iterator<Item = Result<Value, ApiError>> + 'a>;

/// Where queries read inventories: the store behind the API, or test data. Index names are
/// those of the kinds' declarations (`indexed`, `sorted`); `#uuid` is a record's own UUID.
pub trait Source {
    /// Every inventory of `kind`, in UUID order.
    fn scan(&self, kind: &str) -> Inventories<'_>;
    /// The inventories of `kind` that `index` names for `value` (of type `ty`), in any order.
    fn find(
        &self,
        kind: &str,
        index: &str,
        value: &str,
        ty: FieldType,
    ) -> Result<Vec<Value>, ApiError>;
    /// Every inventory of `kind` in the order of `index` (one that names each record exactly
    /// once), then by UUID; the whole order reversed when `descending`. The first `skip` are
    /// passed over without being read.
    fn ordered(&self, kind: &str, index: &str, descending: bool, skip: usize) -> Inventories<'_>;
    /// How many records `index` names for `value`, counting no further than `at_most`. By
    /// default, what [`Source::find`] reads; a source with counters answers without reading.
    fn count(
        &self,
        kind: &str,
        index: &str,
        value: &str,
        ty: FieldType,
        at_most: usize,
    ) -> Result<usize, ApiError> {
        Ok(self.find(kind, index, value, ty)?.len().min(at_most))
    }
}

/// What one request has read, so a join reads each related resource once.
pub struct Catalog<'a> {
    source: &'a dyn Source,
    /// Resources read by UUID (`None`: not there).
    by_uuid: HashMap<(&'static str, String), Option<Value>>,
    /// Back references read through an index, by (kind, field, UUID).
    pointing: HashMap<(&'static str, &'static str, String), Vec<Value>>,
    /// Whole kinds read for back references no index covers.
    kinds: HashMap<&'static str, Vec<Value>>,
}

impl std::fmt::Debug for Catalog<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("read", &self.by_uuid.len()).finish_non_exhaustive()
    }
}

impl<'a> Catalog<'a> {
    /// A catalog reading from `source`.
    pub fn new(source: &'a dyn Source) -> Self {
        Catalog { source, by_uuid: HashMap::new(), pointing: HashMap::new(), kinds: HashMap::new() }
    }

    /// The resource of `kind` with `uuid`.
    fn get(&mut self, kind: &'static str, uuid: &str) -> Result<Option<Value>, ApiError> {
        let key = (kind, uuid.to_owned());
        if let Some(found) = self.by_uuid.get(&key) {
            return Ok(found.clone());
        }
        let found = self.source.find(kind, "#uuid", uuid, FieldType::Uuid)?.into_iter().next();
        self.by_uuid.insert(key, found.clone());
        Ok(found)
    }

    /// The resources of `kind` whose `field` holds `uuid`.
    fn pointing_at(
        &mut self,
        kind: &'static str,
        field: &'static str,
        uuid: &str,
    ) -> Result<Vec<Value>, ApiError> {
        let key = (kind, field, uuid.to_owned());
        if let Some(found) = self.pointing.get(&key) {
            return Ok(found.clone());
        }
        let found = match schema_of(kind).indexed.iter().find(|(path, _)| *path == field) {
            Some((_, index)) => self.source.find(kind, index, uuid, FieldType::Uuid)?,
            None => {
                if !self.kinds.contains_key(kind) {
                    let all = self.source.scan(kind).collect::<Result<Vec<_>, _>>()?;
                    self.kinds.insert(kind, all);
                }
                self.kinds[kind].iter().filter(|other| other[field] == uuid).cloned().collect()
            }
        };
        self.pointing.insert(key, found.clone());
        Ok(found)
    }
}

/// The values `path` reaches from `item` (of `schema`), across relations.
fn reach(
    catalog: &mut Catalog<'_>,
    schema: &'static Schema,
    item: &Value,
    path: &[String],
) -> Result<Vec<Value>, ApiError> {
    let Some((step, rest)) = path.split_first() else { return Ok(vec![item.clone()]) };
    if rest.is_empty() && schema.field(step).is_some() {
        return Ok(match &item[step.as_str()] {
            Value::Array(values) => values.clone(),
            value => vec![value.clone()],
        });
    }
    let mut found = Vec::new();
    match relation(schema, step) {
        Some(Relation::Ref { field, kind, .. }) => {
            let target = schema_of(kind);
            let wanted: Vec<Value> = match &item[*field] {
                Value::Array(values) => values.clone(),
                value => vec![value.clone()],
            };
            for uuid in wanted.iter().filter_map(Value::as_str) {
                if let Some(other) = catalog.get(target.name, uuid)? {
                    found.extend(reach(catalog, target, &other, rest)?);
                }
            }
        }
        Some(Relation::Back { kind, field, .. }) => {
            let target = schema_of(kind);
            if let Some(me) = item["uuid"].as_str() {
                for other in catalog.pointing_at(target.name, field, me)? {
                    found.extend(reach(catalog, target, &other, rest)?);
                }
            }
        }
        Some(Relation::Nested { name, shape: nested }) => {
            for element in item[*name].as_array().into_iter().flatten() {
                found.extend(reach(catalog, nested, element, rest)?);
            }
        }
        None => {}
    }
    Ok(found)
}

fn schema_of(kind: &str) -> &'static Schema {
    schema(kind).expect("relations name declared kinds")
}

fn like(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('%').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

fn compare(ty: FieldType, value: &Value, with: &str) -> Option<std::cmp::Ordering> {
    match ty {
        FieldType::Int => value.as_i64().zip(with.parse::<i64>().ok()).map(|(a, b)| a.cmp(&b)),
        FieldType::Text | FieldType::Uuid => value.as_str().map(|a| a.cmp(with)),
    }
}

fn holds(op: Op, ty: FieldType, value: &Value, with: &str) -> bool {
    use std::cmp::Ordering::*;
    match op {
        Op::Eq => compare(ty, value, with) == Some(Equal),
        Op::Gt => compare(ty, value, with) == Some(Greater),
        Op::Ge => matches!(compare(ty, value, with), Some(Greater | Equal)),
        Op::Lt => compare(ty, value, with) == Some(Less),
        Op::Le => matches!(compare(ty, value, with), Some(Less | Equal)),
        Op::In => with.split(',').any(|w| compare(ty, value, w) == Some(Equal)),
        Op::Like => match value {
            Value::String(text) => like(with, text),
            Value::Number(n) => like(with, &n.to_string()),
            _ => false,
        },
        Op::Ne | Op::NotIn | Op::NotLike => !holds(op.positive(), ty, value, with),
    }
}

/// Whether `item` (of `schema`) satisfies `condition`.
pub fn matches(
    catalog: &mut Catalog<'_>,
    schema: &'static Schema,
    item: &Value,
    condition: &Condition,
) -> Result<bool, ApiError> {
    let values = reach(catalog, schema, item, &condition.path)?;
    let present: Vec<&Value> = values.iter().filter(|v| !v.is_null()).collect();
    Ok(match &condition.value {
        None if condition.op == Op::Eq => present.is_empty(),
        None => !present.is_empty(),
        Some(with) if condition.op.negative() => {
            !present.iter().any(|v| holds(condition.op.positive(), condition.ty, v, with))
        }
        Some(with) => present.iter().any(|v| holds(condition.op, condition.ty, v, with)),
    })
}

/// A whole query: conditions and the shape of the answer.
#[derive(Debug, Default)]
pub struct Query {
    conditions: Vec<Condition>,
    sort: Option<(String, bool)>,
    start: usize,
    limit: usize,
    count: bool,
    reply_with_count: bool,
    fields: Option<Vec<String>>,
}

/// The default page size.
pub const DEFAULT_LIMIT: usize = 1000;

impl Query {
    /// Parses a query string's pairs (`q` repeated, and the paging and shaping options).
    pub fn parse(schema: &'static Schema, pairs: &[(String, String)]) -> Result<Self, ApiError> {
        let mut query = Query { limit: DEFAULT_LIMIT, ..Default::default() };
        let number = |name: &str, v: &str| {
            v.parse::<usize>().map_err(|_| {
                ApiError::invalid(name, format!("`{name}` must be a number, not `{v}`"))
            })
        };
        let flag = |name: &str, v: &str| match v {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(ApiError::invalid(name, format!("`{name}` must be true or false"))),
        };
        for (name, value) in pairs {
            match name.as_str() {
                "q" => query.conditions.push(parse_condition(schema, value)?),
                "limit" => query.limit = number("limit", value)?,
                "start" => query.start = number("start", value)?,
                "count" => query.count = flag("count", value)?,
                "replyWithCount" => query.reply_with_count = flag("replyWithCount", value)?,
                "sort" => {
                    let (descending, field) = match value.split_at_checked(1) {
                        Some(("-", field)) => (true, field),
                        // An unencoded `+` in a URL arrives as a space.
                        Some(("+" | " ", field)) => (false, field),
                        _ => (false, value.as_str()),
                    };
                    if schema.field(field).is_none() {
                        return Err(bad(
                            "sort",
                            format!("`{field}` is not a field of {}", schema.name),
                            &schema.fields.iter().map(|f| f.name).collect::<Vec<_>>(),
                        ));
                    }
                    query.sort = Some((field.to_owned(), descending));
                }
                "fields" => {
                    let fields: Vec<String> = value.split(',').map(str::to_owned).collect();
                    if let Some(unknown) = fields
                        .iter()
                        .find(|f| schema.field(f).is_none() && relation(schema, f).is_none())
                    {
                        return Err(bad(
                            "fields",
                            format!("`{unknown}` is not a field of {}", schema.name),
                            &valid_names(schema),
                        ));
                    }
                    query.fields = Some(fields);
                }
                other => {
                    return Err(ApiError::invalid(
                        other,
                        format!(
                            "`{other}` is not a query option; use q, limit, start, sort, count, replyWithCount or fields"
                        ),
                    ));
                }
            }
        }
        Ok(query)
    }

    /// Every field path the query names, with the option naming it (`q`, `sort`, `fields`).
    pub fn named_paths(&self) -> Vec<(&'static str, String)> {
        let conditions = self.conditions.iter().map(|c| ("q", c.path.join(".")));
        let sort = self.sort.iter().map(|(field, _)| ("sort", field.clone()));
        let fields = self.fields.iter().flatten().map(|f| ("fields", f.clone()));
        conditions.chain(sort).chain(fields).collect()
    }

    /// The single index an equality (or `?=`) on an indexed path reads, with its values.
    fn index_plan(
        &self,
        schema: &'static Schema,
    ) -> Option<(&'static str, FieldType, Vec<String>)> {
        self.conditions.iter().find_map(|c| {
            let index = lookup(schema.indexed, &c.path.join("."))?;
            match (c.op, &c.value) {
                (Op::Eq, Some(value)) => Some((index, c.ty, vec![value.clone()])),
                (Op::In, Some(values)) => {
                    Some((index, c.ty, values.split(',').map(str::to_owned).collect()))
                }
                _ => None,
            }
        })
    }

    /// Runs the query over `catalog`; returns the answer's body.
    ///
    /// The plan, cheapest first: a count of one equality on a `sorted` path counts index
    /// entries; an equality on an `indexed` path reads only what the index names; a sort on
    /// a `sorted` field walks that index in order and stops when the page is full (unless a
    /// total is wanted); anything else reads the kind in UUID order, and stops early too
    /// when there is no sort. Every condition is still evaluated on what is read: an index
    /// only narrows.
    pub fn run(
        &self,
        schema: &'static Schema,
        catalog: &mut Catalog<'_>,
    ) -> Result<Value, ApiError> {
        let source = catalog.source;
        if self.count
            && let [only] = self.conditions.as_slice()
            && let (Op::Eq, Some(value)) = (only.op, &only.value)
            && let Some(index) = lookup(schema.sorted, &only.path.join("."))
        {
            let total = source.count(schema.name, index, value, only.ty, usize::MAX)?;
            return Ok(serde_json::json!({ "total": total }));
        }
        let sorted_index = self.sort.as_ref().and_then(|(field, _)| lookup(schema.sorted, field));
        let wants_total = self.count || self.reply_with_count;
        // How many matches to pass over before the page starts (less what the source skips).
        let mut start = self.start;
        let mut equality = self.index_plan(schema);
        // An unselective equality (`state=Running` over a million VMs) beside a sort on an
        // indexed field: walking the sort's index and stopping at a full page reads less
        // than reading every match and sorting them.
        if let (Some((index, ty, values)), Some(_), false) = (&equality, sorted_index, wants_total)
        {
            let mut estimate = 0;
            for value in values {
                estimate += source.count(schema.name, index, value, *ty, UNSELECTIVE)?;
            }
            if estimate >= UNSELECTIVE {
                equality = None;
            }
        }
        let (candidates, in_order): (Inventories<'_>, bool) = match equality {
            Some((index, ty, values)) => {
                let mut found: Vec<Value> = Vec::new();
                let mut seen = std::collections::HashSet::new();
                for value in values {
                    for item in source.find(schema.name, index, &value, ty)? {
                        if seen.insert(item["uuid"].as_str().unwrap_or_default().to_owned()) {
                            found.push(item);
                        }
                    }
                }
                found.sort_by(|a, b| a["uuid"].as_str().cmp(&b["uuid"].as_str()));
                (Box::new(found.into_iter().map(Ok)), self.sort.is_none())
            }
            None => match (&self.sort, sorted_index) {
                (Some((_, descending)), Some(index)) => {
                    // With nothing to evaluate, the entries before the page need not be read.
                    let skip = if self.conditions.is_empty() && !wants_total { start } else { 0 };
                    start -= skip;
                    (source.ordered(schema.name, index, *descending, skip), true)
                }
                _ => (source.scan(schema.name), self.sort.is_none()),
            },
        };
        let mut page = Vec::new();
        let mut total = 0;
        'items: for item in candidates {
            if in_order && !wants_total && page.len() >= self.limit {
                break;
            }
            let item = item?;
            for condition in &self.conditions {
                if !matches(catalog, schema, &item, condition)? {
                    continue 'items;
                }
            }
            total += 1;
            if !in_order || (total > start && page.len() < self.limit && !self.count) {
                page.push(item);
            }
        }
        if self.count {
            return Ok(serde_json::json!({ "total": total }));
        }
        if !in_order {
            if let Some((field, descending)) = &self.sort {
                let ty = schema.field(field).map_or(FieldType::Text, |f| f.ty);
                page.sort_by(|a, b| {
                    let order = sort_key(ty, a, field).cmp(&sort_key(ty, b, field));
                    if *descending { order.reverse() } else { order }
                });
            }
            page = page.into_iter().skip(self.start).take(self.limit).collect();
        }
        let page: Vec<Value> = page
            .into_iter()
            .map(|item| match &self.fields {
                Some(fields) => {
                    let mut only = Map::new();
                    for field in fields {
                        only.insert(field.clone(), item[field.as_str()].clone());
                    }
                    Value::Object(only)
                }
                None => item,
            })
            .collect();
        let mut body = serde_json::json!({ "inventories": page });
        if self.reply_with_count {
            body["total"] = total.into();
        }
        Ok(body)
    }
}

/// How many matches of an equality make it not worth reading them all when a sorted index
/// could be walked instead.
const UNSELECTIVE: usize = 2000;

/// The index a declaration names for `path`.
use strato_actors::kinds::lookup;

/// What a sort orders by: the field's value (missing ones first), then the UUID, which is
/// also the order of a `sorted` index's entries.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SortKey<'a> {
    /// A field with no value.
    Missing(&'a str),
    /// A whole number, then the UUID.
    Int(i64, &'a str),
    /// Text, then the UUID.
    Text(&'a str, &'a str),
}

/// The sort key of `item` for `field` of type `ty`.
pub fn sort_key<'a>(ty: FieldType, item: &'a Value, field: &str) -> SortKey<'a> {
    let uuid = item["uuid"].as_str().unwrap_or_default();
    let value = &item[field];
    match (ty, value.as_i64(), value.as_str()) {
        (FieldType::Int, Some(n), _) => SortKey::Int(n, uuid),
        (FieldType::Text | FieldType::Uuid, _, Some(text)) => SortKey::Text(text, uuid),
        _ => SortKey::Missing(uuid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Test data as the engine reads it: `data` gives each kind's inventories; indexes are
    /// computed from them as the store's would be (the names of the declarations).
    struct Data<'a>(&'a dyn Fn(&str) -> Vec<Value>);

    fn index_values(item: &Value, index: &str) -> Vec<Value> {
        let nics = item["vmNics"].as_array().cloned().unwrap_or_default();
        let field = |name: &str| vec![item[name].clone()];
        match index {
            "#uuid" => field("uuid"),
            "name" | "state" | "status" => field(index),
            "host" => field("hostUuid"),
            "ip" => nics.iter().map(|n| n["ip"].clone()).collect(),
            "l3" => nics.iter().map(|n| n["l3NetworkUuid"].clone()).collect(),
            "cluster" => field("clusterUuid"),
            "zone" => field("zoneUuid"),
            "l2" => field("l2NetworkUuid"),
            other => panic!("no index {other}"),
        }
    }

    impl Source for Data<'_> {
        fn scan(&self, kind: &str) -> Inventories<'_> {
            let mut all = (self.0)(kind);
            all.sort_by(|a, b| a["uuid"].as_str().cmp(&b["uuid"].as_str()));
            Box::new(all.into_iter().map(Ok))
        }

        fn find(
            &self,
            kind: &str,
            index: &str,
            value: &str,
            _: FieldType,
        ) -> Result<Vec<Value>, ApiError> {
            let mut found: Vec<Value> = (self.0)(kind)
                .into_iter()
                .filter(|item| index_values(item, index).iter().any(|v| v == value))
                .collect();
            // The store's order for one value is by UUID; the engine must not rely on it.
            found.reverse();
            Ok(found)
        }

        fn ordered(
            &self,
            kind: &str,
            index: &str,
            descending: bool,
            skip: usize,
        ) -> Inventories<'_> {
            let mut all = (self.0)(kind);
            let key = |v: &Value| {
                (
                    index_values(v, index)[0].as_str().map(str::to_owned),
                    v["uuid"].as_str().map(str::to_owned),
                )
            };
            all.sort_by_key(key);
            if descending {
                all.reverse();
            }
            Box::new(all.into_iter().skip(skip).map(Ok))
        }
    }

    fn fixture(kind: &str) -> Vec<Value> {
        match kind {
            "zones" => {
                vec![json!({ "uuid": "00000000-0000-0000-0000-00000000000a", "name": "z1" })]
            }
            "clusters" => vec![json!({ "uuid": "00000000-0000-0000-0000-00000000000c",
                "name": "c1", "zoneUuid": "00000000-0000-0000-0000-00000000000a" })],
            "hosts" => vec![
                json!({ "uuid": "00000000-0000-0000-0000-000000000001", "name": "h1",
                    "clusterUuid": "00000000-0000-0000-0000-00000000000c", "agentPort": 7070 }),
                json!({ "uuid": "00000000-0000-0000-0000-000000000002", "name": "h2",
                    "clusterUuid": "00000000-0000-0000-0000-00000000000d", "agentPort": 7071 }),
            ],
            "l3-networks" => {
                vec![json!({ "uuid": "00000000-0000-0000-0000-0000000000f1", "name": "pub" })]
            }
            "vm-instances" => vec![
                json!({ "uuid": "00000000-0000-0000-0000-000000000101", "name": "web-1",
                    "state": "Running", "cpuNum": 2, "hostUuid": "00000000-0000-0000-0000-000000000001",
                    "vmNics": [{ "ip": "10.0.0.5", "l3NetworkUuid": "00000000-0000-0000-0000-0000000000f1" }] }),
                json!({ "uuid": "00000000-0000-0000-0000-000000000102", "name": "db-1",
                    "state": "Stopped", "cpuNum": 4, "hostUuid": "00000000-0000-0000-0000-000000000002",
                    "vmNics": [] }),
                json!({ "uuid": "00000000-0000-0000-0000-000000000103", "name": "web-2",
                    "state": "Running", "cpuNum": 1, "hostUuid": null, "vmNics": [] }),
            ],
            _ => vec![],
        }
    }

    fn names(kind: &str, q: &[&str]) -> Vec<String> {
        let schema = schema(kind).unwrap();
        let pairs: Vec<(String, String)> = q
            .iter()
            .map(|p| p.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).unwrap())
            .collect();
        let body = Query::parse(schema, &pairs)
            .unwrap()
            .run(schema, &mut Catalog::new(&Data(&fixture)))
            .unwrap();
        body["inventories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn every_operator_and_null_test() {
        assert_eq!(names("vm-instances", &["q=state=Running"]), ["web-1", "web-2"]);
        assert_eq!(names("vm-instances", &["q=state!=Running"]), ["db-1"]);
        assert_eq!(names("vm-instances", &["q=cpuNum>1"]), ["web-1", "db-1"]);
        assert_eq!(names("vm-instances", &["q=cpuNum>=2", "q=cpuNum<=2"]), ["web-1"]);
        assert_eq!(names("vm-instances", &["q=cpuNum<2"]), ["web-2"]);
        assert_eq!(names("vm-instances", &["q=name?=db-1,web-2"]), ["db-1", "web-2"]);
        assert_eq!(names("vm-instances", &["q=name!?=db-1,web-2"]), ["web-1"]);
        assert_eq!(names("vm-instances", &["q=name~=web%"]), ["web-1", "web-2"]);
        assert_eq!(names("vm-instances", &["q=name!~=web%"]), ["db-1"]);
        assert_eq!(names("vm-instances", &["q=hostUuid=null"]), ["web-2"]);
        assert_eq!(names("vm-instances", &["q=hostUuid!=null"]), ["web-1", "db-1"]);
    }

    #[test]
    fn joins_through_declared_relations_to_any_depth() {
        assert_eq!(names("vm-instances", &["q=vmNics.ip=10.0.0.5"]), ["web-1"]);
        assert_eq!(names("vm-instances", &["q=vmNics.l3Network.name=pub"]), ["web-1"]);
        assert_eq!(names("vm-instances", &["q=host.cluster.zone.name=z1"]), ["web-1"]);
        assert_eq!(names("hosts", &["q=vmInstance.state=Running"]), ["h1"]);
        assert_eq!(names("hosts", &["q=vmInstance.state!=Running"]), ["h2"]);
    }

    #[test]
    fn paging_sorting_counting_and_fields() {
        assert_eq!(names("vm-instances", &["sort=-cpuNum"]), ["db-1", "web-1", "web-2"]);
        assert_eq!(names("vm-instances", &["sort=+name", "start=1", "limit=1"]), ["web-1"]);
        let schema = schema("vm-instances").unwrap();
        let pairs = vec![("q".into(), "state=Running".into()), ("count".into(), "true".into())];
        let body = Query::parse(schema, &pairs)
            .unwrap()
            .run(schema, &mut Catalog::new(&Data(&fixture)))
            .unwrap();
        assert_eq!(body, json!({ "total": 2 }));
        let pairs = vec![
            ("replyWithCount".into(), "true".into()),
            ("limit".into(), "1".into()),
            ("fields".into(), "uuid,name".into()),
        ];
        let body = Query::parse(schema, &pairs)
            .unwrap()
            .run(schema, &mut Catalog::new(&Data(&fixture)))
            .unwrap();
        assert_eq!(body["total"], 3);
        assert_eq!(body["inventories"][0].as_object().unwrap().len(), 2);
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused_with_the_valid_fields() {
        let schema = schema("vm-instances").unwrap();
        let error = parse_condition(schema, "colour=red").unwrap_err().description;
        assert!(
            error.contains("colour") && error.contains("hostUuid") && error.contains("vmNics"),
            "{error}"
        );
        let error = parse_condition(schema, "vmNics.l3Network.colour=red").unwrap_err().description;
        assert!(error.contains("l3-networks") && error.contains("l2NetworkUuid"), "{error}");
        assert!(parse_condition(schema, "cpuNum=two").is_err());
        assert!(parse_condition(schema, "hostUuid=not-a-uuid").is_err());
        assert!(parse_condition(schema, "cpuNum>null").is_err());
        assert!(parse_condition(schema, "state").is_err());
    }

    const HOSTS: [&str; 2] =
        ["00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000002"];

    /// A random VM: (name, state, NIC address, host, CPUs), as indexes into small value sets
    /// so conditions often match.
    fn vm_strategy()
    -> impl proptest::strategy::Strategy<Value = (usize, usize, Option<usize>, Option<usize>, i64)>
    {
        (
            0..3usize,
            0..2usize,
            proptest::option::of(0..4usize),
            proptest::option::of(0..2usize),
            1..5i64,
        )
    }

    /// The plain evaluator the engine is compared with: one condition, on one VM.
    fn plainly(vm: &Value, field: &str, op: &str, value: &str) -> bool {
        let values: Vec<Value> = match field {
            "vmNics.ip" => {
                vm["vmNics"].as_array().unwrap().iter().map(|n| n["ip"].clone()).collect()
            }
            "host.name" => HOSTS
                .iter()
                .position(|h| vm["hostUuid"] == *h)
                .map(|i| json!(HOST_NAMES[i]))
                .into_iter()
                .collect(),
            other => vec![vm[other].clone()].into_iter().filter(|v| !v.is_null()).collect(),
        };
        let eq = |v: &Value, w: &str| match v {
            Value::Number(n) => n.to_string() == w,
            Value::String(s) => s == w,
            _ => false,
        };
        let num = |v: &Value| v.as_i64().unwrap_or(0);
        match op {
            "=" => values.iter().any(|v| eq(v, value)),
            "!=" => !values.iter().any(|v| eq(v, value)),
            "?=" => values.iter().any(|v| value.split(',').any(|w| eq(v, w))),
            ">" => values.iter().any(|v| num(v) > value.parse::<i64>().unwrap()),
            "<" => values.iter().any(|v| num(v) < value.parse::<i64>().unwrap()),
            _ => unreachable!(),
        }
    }

    const HOST_NAMES: [&str; 2] = ["h1", "h2"];

    fn hosts() -> Vec<Value> {
        HOSTS
            .iter()
            .zip(HOST_NAMES)
            .map(|(uuid, name)| json!({ "uuid": uuid, "name": name }))
            .collect()
    }

    /// The plain order: by the field (missing values first), then by UUID.
    fn plain_order(field: &str, a: &Value, b: &Value) -> std::cmp::Ordering {
        let key = |v: &Value| {
            let text = v[field].as_str().map(str::to_owned);
            let number = v[field].as_i64();
            (number, text, v["uuid"].as_str().unwrap().to_owned())
        };
        key(a).cmp(&key(b))
    }

    proptest::proptest! {
        #[test]
        fn the_engine_with_its_indexes_agrees_with_a_plain_evaluator(
            vms in proptest::collection::vec(vm_strategy(), 0..25),
            conditions in proptest::collection::vec((0..6usize, 0..5usize, 0..4usize), 0..4),
            sort in proptest::option::of((0..4usize, proptest::bool::ANY)),
            start in 0..4usize,
            limit in 0..12usize,
            count in proptest::bool::ANY,
        ) {
            let names = ["a", "b", "c"];
            let states = ["Running", "Stopped"];
            let items: Vec<Value> = vms
                .iter()
                .enumerate()
                .map(|(i, (name, state, ip, host, cpu))| json!({
                    "uuid": format!("00000000-0000-0000-0000-{i:012}"),
                    "name": names[*name],
                    "state": states[*state],
                    "cpuNum": cpu,
                    "hostUuid": host.map(|h| HOSTS[h]),
                    "vmNics": ip.map(|ip| vec![json!({ "ip": format!("10.0.0.{ip}") })]).unwrap_or_default(),
                }))
                .collect();
            let fields = ["name", "state", "vmNics.ip", "hostUuid", "cpuNum", "host.name"];
            let mut pairs = Vec::new();
            let mut plain = Vec::new();
            for (field, op, value) in conditions {
                let field = fields[field];
                let value = match field {
                    "name" => names[value % 3].to_owned(),
                    "state" => states[value % 2].to_owned(),
                    "vmNics.ip" => format!("10.0.0.{value}"),
                    "hostUuid" => HOSTS[value % 2].to_owned(),
                    "host.name" => HOST_NAMES[value % 2].to_owned(),
                    _ => (value + 1).to_string(),
                };
                let ops: &[&str] = if field == "cpuNum" { &["=", "!=", ">", "<", "?="] } else { &["=", "!=", "?=", "=", "!="] };
                let op = ops[op];
                let value = if op == "?=" { format!("{value},{}", if field == "cpuNum" { "3".into() } else { value.clone() }) } else { value };
                pairs.push(("q".to_owned(), format!("{field}{op}{value}")));
                plain.push((field, op, value));
            }
            let mut expected: Vec<&Value> = items
                .iter()
                .filter(|vm| plain.iter().all(|(f, o, v)| plainly(vm, f, o, v)))
                .collect();
            if let Some((field, descending)) = sort {
                let field = ["name", "state", "cpuNum", "hostUuid"][field];
                pairs.push(("sort".to_owned(), format!("{}{field}", if descending { "-" } else { "+" })));
                expected.sort_by(|a, b| plain_order(field, a, b));
                if descending {
                    expected.reverse();
                }
            }
            let total = expected.len();
            let expected: Vec<&Value> =
                expected.into_iter().skip(start).take(limit).map(|v| &v["uuid"]).collect();
            pairs.push(("start".to_owned(), start.to_string()));
            pairs.push(("limit".to_owned(), limit.to_string()));
            pairs.push(("replyWithCount".to_owned(), "true".to_owned()));
            let schema = schema("vm-instances").unwrap();
            let data = |kind: &str| match kind {
                "vm-instances" => items.clone(),
                "hosts" => hosts(),
                _ => vec![],
            };
            let body = Query::parse(schema, &pairs).unwrap().run(schema, &mut Catalog::new(&Data(&data))).unwrap();
            let found: Vec<&Value> = body["inventories"].as_array().unwrap().iter().map(|v| &v["uuid"]).collect();
            proptest::prop_assert_eq!(found, expected);
            proptest::prop_assert_eq!(&body["total"], &json!(total));
            if count {
                pairs.push(("count".to_owned(), "true".to_owned()));
                let body = Query::parse(schema, &pairs).unwrap().run(schema, &mut Catalog::new(&Data(&data))).unwrap();
                proptest::prop_assert_eq!(body, json!({ "total": total }));
            }
        }
    }
}
