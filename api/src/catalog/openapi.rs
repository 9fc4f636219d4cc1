//! The OpenAPI 3.1 document, generated from the API catalog ([`super`]): one
//! operation per method and path, bodies from the same serde structs the handlers validate
//! with (their `utoipa::ToSchema` schemas), queries from the query declarations, with the
//! fields each kind can be queried by (`x-strato-query-fields`). Served at
//! `/v1/openapi.json`; `api/openapi.json` is the committed copy, which a test keeps equal to
//! what the code generates (`strato openapi > api/openapi.json` refreshes it).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::{Answer, Api, Body, Described, Method};

fn path_parameter(name: &str) -> Value {
    json!({ "name": name, "in": "path", "required": true,
            "schema": { "type": "string", "format": "uuid" } })
}

fn query_parameters(kind: &str) -> Vec<Value> {
    let schema = crate::query::schema(kind).expect("a query API names a declared kind");
    let fields = crate::query::queryable_paths(schema);
    let q = |name: &str, description: &str, schema: Value| json!({ "name": name, "in": "query", "required": false, "description": description, "schema": schema });
    vec![
        {
            let mut condition = q(
                "q",
                "A condition: field, operator (= != > >= < <= ?= !?= ~= !~=) and value; repeat to AND them. Fields may cross relations (vmNics.ip).",
                json!({ "type": "array", "items": { "type": "string" } }),
            );
            condition["explode"] = json!(true);
            condition["x-strato-query-fields"] = json!(fields);
            condition
        },
        q("limit", "At most this many (default 1000)", json!({ "type": "integer", "minimum": 0 })),
        q("start", "Skip this many", json!({ "type": "integer", "minimum": 0 })),
        q("sort", "+field or -field", json!({ "type": "string" })),
        q("count", "Only the total", json!({ "type": "boolean" })),
        q("replyWithCount", "Add the total", json!({ "type": "boolean" })),
        q("fields", "Only these fields (comma-separated)", json!({ "type": "string" })),
    ]
}

fn action_body(action: &str, described: &Described) -> Value {
    json!({ "type": "object", "required": [action], "additionalProperties": false,
            "properties": { action: described.schema } })
}

fn operation(apis: &[&Api], components: &mut BTreeMap<String, Value>) -> Value {
    let first = apis[0];
    let mut op = Map::new();
    if apis.len() == 1 {
        op.insert("operationId".into(), json!(first.name));
        op.insert("summary".into(), json!(first.summary));
    } else {
        // Several APIs share a method and path (actions): one operation, one body each.
        let names: Vec<&str> = apis.iter().map(|a| a.name).collect();
        op.insert("operationId".into(), json!(names.join("Or")));
        op.insert("summary".into(), json!(format!("One of: {}", names.join(", "))));
        op.insert("x-strato-apis".into(), json!(names));
    }
    let mut parameters: Vec<Value> = first.path_params().into_iter().map(path_parameter).collect();
    if let Some(kind) = first.query_kind() {
        parameters.extend(query_parameters(kind));
    }
    if first.method == Method::Delete && first.answer == Answer::Job {
        parameters.push(json!({ "name": "deleteMode", "in": "query", "required": false,
            "description": "Permissive refuses while something depends on the resource; Enforcing deletes dependents first",
            "schema": { "type": "string", "enum": ["Permissive", "Enforcing"] } }));
    }
    if first.name == "GetJob" {
        parameters.push(json!({ "name": "waitSeconds", "in": "query", "required": false,
            "description": "Hold the answer until the job ends or this many seconds pass (202 then)",
            "schema": { "type": "integer", "minimum": 0, "maximum": crate::jobs::MAX_WAIT.as_secs() } }));
    }
    if !parameters.is_empty() {
        op.insert("parameters".into(), json!(parameters));
    }
    let mut bodies = Vec::new();
    for api in apis {
        let body = match &api.body {
            Body::None => continue,
            Body::Create(d) => {
                components.extend(d.components.clone());
                json!({ "type": "object", "required": ["params"], "properties": {
                    "params": d.schema,
                    "systemTags": { "type": "array", "items": { "type": "string" } },
                    "userTags": { "type": "array", "items": { "type": "string" } } } })
            }
            Body::Action(action, d) => {
                components.extend(d.components.clone());
                action_body(action, d)
            }
        };
        bodies.push(body);
    }
    if !bodies.is_empty() {
        let schema = if bodies.len() == 1 { bodies.remove(0) } else { json!({ "oneOf": bodies }) };
        op.insert(
            "requestBody".into(),
            json!({ "required": true, "content": { "application/json": { "schema": schema } } }),
        );
    }
    let error = json!({ "description": "The error: code, description, details",
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorReply" } } } });
    let mut responses = Map::new();
    match first.answer {
        Answer::Job => {
            responses.insert(
                "202".into(),
                json!({ "description": "Accepted: follow the job at `location`",
                "headers": { "Location": { "schema": { "type": "string" } } },
                "content": { "application/json": { "schema": { "type": "object",
                    "properties": { "location": { "type": "string" } } } } } }),
            );
        }
        Answer::Immediate => {
            responses.insert(
                "200".into(),
                json!({ "description": "The answer",
                "content": { "application/json": { "schema": { "type": "object" } } } }),
            );
        }
        Answer::Query => {
            responses.insert(
                "200".into(),
                json!({ "description": "`inventories` (and `total`), or `total` alone",
                "content": { "application/json": { "schema": { "type": "object", "properties": {
                    "inventories": { "type": "array", "items": { "type": "object" } },
                    "total": { "type": "integer" } } } } } }),
            );
        }
    }
    for status in ["400", "401", "403", "404", "409"] {
        responses.insert(status.into(), error.clone());
    }
    op.insert("responses".into(), Value::Object(responses));
    if first.name == "LogInByAccount" {
        op.insert("security".into(), json!([]));
    }
    Value::Object(op)
}

/// The document.
pub fn document() -> Value {
    let mut grouped: BTreeMap<(&str, &str), Vec<&Api>> = BTreeMap::new();
    for api in super::all() {
        grouped.entry((api.path, api.method.as_str())).or_default().push(api);
    }
    let mut components: BTreeMap<String, Value> = BTreeMap::new();
    let mut paths: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
    for ((path, method), apis) in &grouped {
        let op = operation(apis, &mut components);
        paths.entry(path).or_default().insert(method.to_ascii_lowercase(), op);
    }
    components.insert(
        "ErrorReply".into(),
        json!({ "type": "object", "properties": { "error": { "type": "object", "properties": {
            "code": { "type": "string",
                "enum": crate::codes::ALL.iter().map(|c| c.name).collect::<Vec<_>>(),
                "description": "A stable code; x-strato-error-codes gives each one's HTTP status and meaning" },
            "description": { "type": "string" }, "details": {} } } },
            "x-strato-error-codes": crate::codes::ALL.iter().map(|c| json!({
                "code": c.name, "status": c.status.as_u16(), "meaning": c.meaning })).collect::<Vec<_>>() }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Strato",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The Strato IaaS control plane's API, in ZStack's v1 shape. Every request but LogInByAccount carries `Authorization: OAuth <session uuid>` (or `OAuth <key uuid>:<secret>` for an API key)."
        },
        "servers": [{ "url": "http://127.0.0.1:8080" }],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": { "session": { "type": "apiKey", "in": "header", "name": "Authorization",
                "description": "OAuth <session uuid>, from PUT /v1/accounts/login" } }
        },
        "security": [{ "session": [] }]
    })
}

/// The document as the committed file holds it (pretty, with a final newline).
pub fn pretty() -> String {
    let mut text = serde_json::to_string_pretty(&document()).expect("a JSON value prints");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI's check: the committed document is the one the code generates. On a difference,
    /// run `cargo run -p strato-api --bin strato -- openapi > api/openapi.json`.
    #[test]
    fn the_committed_document_is_the_generated_one() {
        let committed = include_str!("../../openapi.json");
        assert!(
            committed == pretty(),
            "api/openapi.json is stale: run `cargo run -p strato-api --bin strato -- openapi > api/openapi.json`"
        );
    }

    #[test]
    fn every_api_is_an_operation_with_its_parameters() {
        let doc = document();
        for api in crate::catalog::all() {
            let op = &doc["paths"][api.path][api.method.as_str().to_ascii_lowercase()];
            let id = op["operationId"].as_str().unwrap_or_default();
            assert!(id.split("Or").any(|n| n == api.name), "{} {}: {id}", api.name, api.path);
        }
        let create_vm = &doc["paths"]["/v1/vm-instances"]["post"];
        let params = &create_vm["requestBody"]["content"]["application/json"]["schema"]["properties"]
            ["params"];
        let required: Vec<&str> =
            params["required"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert!(
            required.contains(&"instanceOfferingUuid") && required.contains(&"name"),
            "{params}"
        );
        let query = &doc["paths"]["/v1/vm-instances"]["get"];
        assert_eq!(query["operationId"], "QueryVmInstance");
        let fields = query["parameters"][0]["x-strato-query-fields"].as_array().unwrap();
        assert!(fields.contains(&json!("vmNics.ip")) && fields.contains(&json!("userTags.tag")));
        // Every error code is published, with its status.
        let codes =
            doc["components"]["schemas"]["ErrorReply"]["x-strato-error-codes"].as_array().unwrap();
        assert_eq!(codes.len(), crate::codes::ALL.len());
        assert!(codes.contains(&json!({ "code": "VM.INVALID_STATE", "status": 409,
            "meaning": crate::codes::VM_INVALID_STATE.meaning })));
    }
}
