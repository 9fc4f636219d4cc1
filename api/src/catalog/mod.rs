//! The API catalog: every API as the route table declares it ([`crate::http::apis`]), looked
//! up by name for the CLI, with each body's parameters, and turned into the OpenAPI document
//! ([`openapi`]). The router is built from the same rows, so the server, the document and the
//! CLI cannot disagree. Parameters come from the same serde types the handlers parse bodies
//! with (through their `utoipa::ToSchema` derive); each kind's query, read and deletion come
//! from the kinds' declarations ([`strato_actors::kinds`]), and each resource's actions from
//! its action enum ([`crate::types::actions`]).

use serde_json::Value;

pub mod openapi;

pub use crate::http::api::{Answer, Api, Body, Described, KindApi, Method};

/// Every API.
pub fn all() -> impl Iterator<Item = &'static Api> {
    crate::http::apis().iter()
}

/// The API named `name` (any case).
pub fn named(name: &str) -> Option<&'static Api> {
    all().find(|a| a.name.eq_ignore_ascii_case(name))
}

/// One parameter of an API's body, for the CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// Its name (`instanceOfferingUuid`).
    pub name: String,
    /// Whether it must be given.
    pub required: bool,
    /// Its JSON type (`string`, `integer`, `array`, ...).
    pub json_type: String,
}

/// The body's parameters of `api` (the creation's `params`, the action's object, or the
/// body), required ones first.
pub fn params(api: &Api) -> Vec<Param> {
    let described = match &api.body {
        Body::None => return Vec::new(),
        Body::Create(d) | Body::Action(_, d) => d,
    };
    let mut schema = &described.schema;
    // An optional body (`null` or the object): the object.
    if let Some(object) = ["oneOf", "anyOf"]
        .iter()
        .filter_map(|k| schema[*k].as_array())
        .flatten()
        .find(|alternative| alternative["type"] != "null")
    {
        schema = object;
    }
    // Follow a reference to a named schema.
    if let Some(name) = schema["$ref"].as_str().and_then(|r| r.rsplit('/').next())
        && let Some((_, found)) = described.components.iter().find(|(n, _)| n == name)
    {
        schema = found;
    }
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut params: Vec<Param> = schema["properties"]
        .as_object()
        .map(|props| {
            props
                .iter()
                .map(|(name, prop)| Param {
                    name: name.clone(),
                    required: required.contains(&name.as_str()),
                    json_type: json_type(prop),
                })
                .collect()
        })
        .unwrap_or_default();
    params.sort_by(|a, b| b.required.cmp(&a.required).then(a.name.cmp(&b.name)));
    params
}

/// A property's JSON type, through `oneOf`/`type` lists (`["string", "null"]`).
fn json_type(prop: &Value) -> String {
    match &prop["type"] {
        Value::String(t) => t.clone(),
        Value::Array(types) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("string")
            .to_owned(),
        _ => prop["oneOf"]
            .as_array()
            .and_then(|alts| alts.iter().map(json_type).find(|t| t != "null"))
            .unwrap_or_else(|| "object".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_has_one_name_and_a_handler() {
        let mut names: Vec<&str> = all().map(|a| a.name).collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "two APIs share a name");
        let _ = crate::http::router();
    }

    #[test]
    fn parameters_come_from_the_types_that_parse_the_bodies() {
        let create = named("createvminstance").unwrap();
        let params = params(create);
        let required: Vec<&str> =
            params.iter().filter(|p| p.required).map(|p| p.name.as_str()).collect();
        assert_eq!(required, ["instanceOfferingUuid", "l3NetworkUuids", "name"]);
        assert!(params.iter().any(|p| p.name == "imageUuid" && !p.required));
        let l3s = params.iter().find(|p| p.name == "l3NetworkUuids").unwrap();
        assert_eq!(l3s.json_type, "array");
        assert_eq!(named("StartVmInstance").unwrap().path_params(), ["uuid"]);
        assert_eq!(named("QueryVmInstance").unwrap().query_kind(), Some("vm-instances"));
        assert_eq!(named("GetBackupStorage").unwrap().path, "/v1/backup-storage/{uuid}");
        assert_eq!(named("DeleteL2Network").unwrap().answer, Answer::Job);
        assert!(named("DeleteVmInstance").is_none(), "a VM's DELETE is DestroyVmInstance");
    }

    /// Each resource's actions come from its enum: one API per variant, named and summarized
    /// by it, taking its parameters.
    #[test]
    fn actions_come_from_their_enums() {
        let start = named("StartVmInstance").unwrap();
        assert_eq!((start.method, start.path), (Method::Put, "/v1/vm-instances/{uuid}/actions"));
        assert!(matches!(start.body, Body::Action("startVmInstance", _)));
        assert!(start.summary.starts_with("Starts a VM"), "{}", start.summary);
        assert_eq!(params(start).iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["hostUuid"]);
        let change = named("ChangeHostState").unwrap();
        let state = params(change);
        assert_eq!((state[0].name.as_str(), state[0].required), ("stateEvent", true));
        for name in ["StopVmInstance", "MigrateVm", "ChangeInstanceOffering", "ReconnectHost"] {
            assert!(named(name).is_some(), "{name}");
        }
        for name in ["UpdateQuota", "UpdateAccount", "CancelApiJob"] {
            assert_eq!(named(name).unwrap().answer, Answer::Job, "{name}");
        }
    }
}
