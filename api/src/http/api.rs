//! What an API is, as the route table declares it: its ZStack name, method and path, what its
//! body takes (from the same serde types the handler parses it with), how it answers, and
//! its handler. The router is built from these rows ([`super::router`]); the catalog reads
//! them for the OpenAPI document and the CLI, so the three cannot disagree.

use std::sync::Arc;

use axum::routing::MethodRouter;
use serde_json::Value;
use strato_actors::kinds::Kind;
use utoipa::ToSchema;
use utoipa::openapi::{RefOr, Schema};

use crate::mn::Mn;

/// An HTTP method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// POST.
    Post,
    /// PUT.
    Put,
    /// DELETE.
    Delete,
}

impl Method {
    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
}

/// A body's JSON schema, and the named schemas it refers to (`#/components/schemas/...`).
#[derive(Debug, Clone)]
pub struct Described {
    /// The schema.
    pub schema: Value,
    /// The schemas it refers to, by name.
    pub components: Vec<(String, Value)>,
}

/// The schema of `T`, with the schemas it refers to.
pub fn schema<T: ToSchema>() -> Described {
    let mut refs = Vec::new();
    T::schemas(&mut refs);
    let json = |s: &RefOr<Schema>| serde_json::to_value(s).unwrap_or(Value::Null);
    Described {
        schema: json(&T::schema()),
        components: refs.iter().map(|(name, s)| (name.clone(), json(s))).collect(),
    }
}

/// What an API's request body is.
#[derive(Clone, Debug)]
pub enum Body {
    /// None.
    None,
    /// A creation: `{"params": {...}, "systemTags": [...], "userTags": [...]}`.
    Create(Described),
    /// An action, or a body in the same shape: `{"<action>": {...}}` (logging in is
    /// `{"logInByAccount": {...}}`).
    Action(&'static str, Described),
}

/// How an API answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `202` with a job's location; the job ends with `{"inventory": ...}` or an error.
    Job,
    /// `200` at once.
    Immediate,
    /// `200` with `{"inventories": [...]}` (and `total`), or `{"total": n}`.
    Query,
}

/// The APIs every kind has, derived from its declaration ([`strato_actors::kinds`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KindApi {
    /// `Query<Kind>`: `GET /v1/<kind>?q=...`.
    Query,
    /// `Get<Kind>`: `GET /v1/<kind>/{uuid}`.
    Get,
    /// `Delete<Kind>`: `DELETE /v1/<kind>/{uuid}` with cascade.
    Delete,
}

/// A handler: what serves an API's method and path (APIs sharing both share it).
pub type Handler = Arc<dyn Fn() -> MethodRouter<Arc<Mn>> + Send + Sync>;

/// One API.
#[derive(Clone)]
pub struct Api {
    /// Its name, as in ZStack (`CreateVmInstance`): the CLI's command.
    pub name: &'static str,
    /// The method.
    pub method: Method,
    /// The path, with `{name}` for path parameters.
    pub path: &'static str,
    /// The body.
    pub body: Body,
    /// How it answers.
    pub answer: Answer,
    /// What it does.
    pub summary: &'static str,
    /// The kind a derived API (a query, a read, a deletion) is of.
    pub of_kind: Option<(KindApi, &'static Kind)>,
    /// What serves it.
    pub handler: Handler,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("name", &self.name)
            .field("method", &self.method)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Api {
    /// An API served by `handler`.
    pub fn new(
        name: &'static str,
        method: Method,
        path: &'static str,
        body: Body,
        answer: Answer,
        summary: &'static str,
        handler: fn() -> MethodRouter<Arc<Mn>>,
    ) -> Api {
        Api { name, method, path, body, answer, summary, of_kind: None, handler: Arc::new(handler) }
    }

    /// A creation: `POST` on `path` with `{"params": <body>, ...}`, answered by a job.
    pub fn create(
        name: &'static str,
        path: &'static str,
        body: Described,
        summary: &'static str,
        handler: fn() -> MethodRouter<Arc<Mn>>,
    ) -> Api {
        Api::new(name, Method::Post, path, Body::Create(body), Answer::Job, summary, handler)
    }

    /// The query kind (`vm-instances`) of a query API.
    pub fn query_kind(&self) -> Option<&'static str> {
        match self.of_kind {
            Some((KindApi::Query, kind)) => Some(kind.url()),
            _ => None,
        }
    }

    /// The names of the path's parameters (`uuid`, `l2`, `cluster`).
    pub fn path_params(&self) -> Vec<&'static str> {
        self.path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect()
    }
}

/// Text made once for the life of the process (derived APIs' names, paths and summaries).
pub(crate) fn leak(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

/// One API per variant of the action enum `A` (see [`crate::types::actions`]): `PUT` on
/// `path`, named after the variant, summarized by its doc comment, its body the variant's
/// parameters, all served by `handler`.
pub fn actions<A: ToSchema>(
    path: &'static str,
    handler: fn() -> MethodRouter<Arc<Mn>>,
) -> Vec<Api> {
    let described = schema::<A>();
    let variants = described.schema["oneOf"].as_array().cloned().unwrap_or_default();
    variants
        .iter()
        .filter_map(|variant| {
            let (action, params) = variant["properties"].as_object()?.iter().next()?;
            let mut name = action.clone();
            name[..1].make_ascii_uppercase();
            // utoipa puts a variant's doc comment on its property.
            let summary =
                variant["description"].as_str().or(params["description"].as_str()).unwrap_or("");
            Some(Api::new(
                leak(name),
                Method::Put,
                path,
                Body::Action(
                    leak(action.clone()),
                    Described { schema: params.clone(), components: described.components.clone() },
                ),
                Answer::Job,
                leak(summary.to_owned()),
                handler,
            ))
        })
        .collect()
}
