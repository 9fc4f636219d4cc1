//! Every API, declared once: its ZStack name, method, path, body and answer. The router is
//! built from this table ([`router`]), the OpenAPI document is generated from it
//! ([`crate::openapi`]), and the CLI finds its commands and their parameters in it, so the
//! three cannot disagree. Parameters come from the same serde structs the handlers validate
//! bodies with (through their `utoipa::ToSchema` derive), and the query APIs come from the
//! kinds' declarations ([`strato_actors::kinds`]): each kind's query, read and deletion.

use std::sync::Arc;

use axum::Router;
use axum::routing::{MethodRouter, delete, get, post, put};
use serde::Deserialize;
use serde_json::Value;
use strato_actors::kinds::Kind;
use utoipa::ToSchema;
use utoipa::openapi::{RefOr, Schema};
use uuid::Uuid;

use crate::auth;
use crate::mn::Mn;
use crate::routes::{self as r};
use crate::tagging;

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

/// What an API's request body is.
#[derive(Clone, Copy, Debug)]
pub enum Body {
    /// None.
    None,
    /// A creation: `{"params": {...}, "systemTags": [...], "userTags": [...]}`.
    Create(fn() -> Described),
    /// An action, or a body in the same shape: `{"<action>": {...}}` (logging in is
    /// `{"logInByAccount": {...}}`).
    Action(&'static str, fn() -> Described),
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

/// One API.
#[derive(Debug)]
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

impl Api {
    /// The query kind (`vm-instances`) of a query API.
    pub fn query_kind(&self) -> Option<&'static str> {
        match self.of_kind {
            Some((KindApi::Query, kind)) => Some(kind.url()),
            _ => None,
        }
    }
}

/// Parameters of actions whose handlers read them from the action's object.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
struct OnHost {
    /// The host to start on or move to (admin only; none: the allocator picks).
    host_uuid: Option<Uuid>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
struct Offering {
    instance_offering_uuid: Uuid,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
struct StateEvent {
    /// enable, disable or maintain.
    state_event: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
struct Password {
    password: String,
    /// The current password (required when an account changes its own).
    old_password: Option<String>,
}

#[derive(Deserialize, ToSchema)]
struct Nothing {}

const fn api(
    name: &'static str,
    method: Method,
    path: &'static str,
    body: Body,
    answer: Answer,
    summary: &'static str,
) -> Api {
    Api { name, method, path, body, answer, summary, of_kind: None }
}

use Answer::{Immediate, Job};
use Method::{Delete, Get, Post, Put};

/// A body's JSON schema, and the named schemas it refers to (`#/components/schemas/...`).
#[derive(Debug, Clone)]
pub struct Described {
    /// The schema.
    pub schema: Value,
    /// The schemas it refers to, by name.
    pub components: Vec<(String, Value)>,
}

fn schema<T: ToSchema>() -> Described {
    let mut refs = Vec::new();
    T::schemas(&mut refs);
    let json = |s: &RefOr<Schema>| serde_json::to_value(s).unwrap_or(Value::Null);
    Described {
        schema: json(&T::schema()),
        components: refs.iter().map(|(name, s)| (name.clone(), json(s))).collect(),
    }
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

impl Api {
    /// The body's parameters (the creation's `params`, the action's object, or the body).
    pub fn params(&self) -> Vec<Param> {
        let described = match self.body {
            Body::None => return Vec::new(),
            Body::Create(f) | Body::Action(_, f) => f(),
        };
        let mut schema = described.schema;
        // Follow a reference to a named schema.
        if let Some(name) = schema["$ref"].as_str().and_then(|r| r.rsplit('/').next())
            && let Some((_, found)) = described.components.iter().find(|(n, _)| n == name)
        {
            schema = found.clone();
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

    /// The names of the path's parameters (`uuid`, `l2`, `cluster`).
    pub fn path_params(&self) -> Vec<&'static str> {
        self.path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect()
    }
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

/// Every API but those each kind has ([`DERIVED`]).
static APIS: &[Api] = &[
    api(
        "LogInByAccount",
        Put,
        "/v1/accounts/login",
        Body::Action("logInByAccount", schema::<auth::LogInByAccount>),
        Immediate,
        "Logs in; answers the session",
    ),
    api("LogOut", Delete, "/v1/accounts/sessions/{uuid}", Body::None, Immediate, "Ends a session"),
    api(
        "CreateAccount",
        Post,
        "/v1/accounts",
        Body::Create(schema::<auth::AccountParams>),
        Job,
        "Creates a normal account (admin)",
    ),
    api(
        "DeleteAccount",
        Delete,
        "/v1/accounts/{uuid}",
        Body::None,
        Job,
        "Deletes an account that owns nothing (admin)",
    ),
    api(
        "UpdateQuota",
        Put,
        "/v1/accounts/{uuid}/actions",
        Body::Action("updateQuota", schema::<auth::QuotaParams>),
        Job,
        "Sets an account's quota (admin)",
    ),
    api(
        "UpdateAccount",
        Put,
        "/v1/accounts/{uuid}/actions",
        Body::Action("updateAccount", schema::<Password>),
        Job,
        "Changes an account's password",
    ),
    api(
        "CreateApiKey",
        Post,
        "/v1/accounts/api-keys",
        Body::Create(schema::<auth::ApiKeyParams>),
        Immediate,
        "Creates an API key; its secret is shown once",
    ),
    api(
        "DeleteApiKey",
        Delete,
        "/v1/accounts/api-keys/{uuid}",
        Body::None,
        Immediate,
        "Deletes an API key",
    ),
    api(
        "CreateZone",
        Post,
        "/v1/zones",
        Body::Create(schema::<r::ZoneParams>),
        Job,
        "Creates a zone",
    ),
    api(
        "CreateCluster",
        Post,
        "/v1/clusters",
        Body::Create(schema::<r::ClusterParams>),
        Job,
        "Creates a cluster",
    ),
    api(
        "AddKVMHost",
        Post,
        "/v1/hosts/kvm",
        Body::Create(schema::<r::HostParams>),
        Job,
        "Adds a KVM host (its agent must be reachable)",
    ),
    api(
        "ReconnectHost",
        Put,
        "/v1/hosts/{uuid}/actions",
        Body::Action("reconnectHost", schema::<Nothing>),
        Job,
        "Reconnects a host's agent link",
    ),
    api(
        "ChangeHostState",
        Put,
        "/v1/hosts/{uuid}/actions",
        Body::Action("changeHostState", schema::<StateEvent>),
        Job,
        "Enables, disables or maintains a host",
    ),
    api(
        "CreateInstanceOffering",
        Post,
        "/v1/instance-offerings",
        Body::Create(schema::<r::OfferingParams>),
        Job,
        "Creates an instance offering",
    ),
    api(
        "CreateL2NoVlanNetwork",
        Post,
        "/v1/l2-networks/no-vlan",
        Body::Create(schema::<r::L2Params>),
        Job,
        "Creates a NoVlan L2 network",
    ),
    api(
        "AttachL2NetworkToCluster",
        Post,
        "/v1/l2-networks/{l2}/clusters/{cluster}",
        Body::None,
        Job,
        "Attaches an L2 network to a cluster",
    ),
    api(
        "CreateL3Network",
        Post,
        "/v1/l3-networks",
        Body::Create(schema::<r::L3Params>),
        Job,
        "Creates an L3 network",
    ),
    api(
        "AddIpRange",
        Post,
        "/v1/l3-networks/{uuid}/ip-ranges",
        Body::Create(schema::<r::RangeParams>),
        Job,
        "Adds an IP range to an L3 network",
    ),
    api(
        "CreateVmInstance",
        Post,
        "/v1/vm-instances",
        Body::Create(schema::<r::VmParams>),
        Job,
        "Creates and starts a VM",
    ),
    api(
        "DestroyVmInstance",
        Delete,
        "/v1/vm-instances/{uuid}",
        Body::None,
        Job,
        "Destroys a VM (recoverable until expunged)",
    ),
    api(
        "StartVmInstance",
        Put,
        "/v1/vm-instances/{uuid}/actions",
        Body::Action("startVmInstance", schema::<OnHost>),
        Job,
        "Starts a VM",
    ),
    api(
        "StopVmInstance",
        Put,
        "/v1/vm-instances/{uuid}/actions",
        Body::Action("stopVmInstance", schema::<Nothing>),
        Job,
        "Stops a VM: gracefully, then forced",
    ),
    api(
        "RebootVmInstance",
        Put,
        "/v1/vm-instances/{uuid}/actions",
        Body::Action("rebootVmInstance", schema::<Nothing>),
        Job,
        "Reboots a VM",
    ),
    api(
        "PauseVmInstance",
        Put,
        "/v1/vm-instances/{uuid}/actions",
        Body::Action("pauseVmInstance", schema::<Nothing>),
        Job,
        "Pauses a VM",
    ),
    api(
        "ResumeVmInstance",
        Put,
        "/v1/vm-instances/{uuid}/actions",
        Body::Action("resumeVmInstance", schema::<Nothing>),
        Job,
        "Resumes a paused VM",
    ),
    api(
        "RecoverVmInstance",
        Put,
        "/v1/vm-instances/{uuid}/actions",
        Body::Action("recoverVmInstance", schema::<Nothing>),
        Job,
        "Recovers a destroyed VM",
    ),
    api(
        "ExpungeVmInstance",
        Put,
        "/v1/vm-instances/{uuid}/actions",
        Body::Action("expungeVmInstance", schema::<Nothing>),
        Job,
        "Expunges a destroyed VM",
    ),
    api(
        "MigrateVm",
        Put,
        "/v1/vm-instances/{uuid}/actions",
        Body::Action("migrateVm", schema::<OnHost>),
        Job,
        "Moves a VM to another host (cold)",
    ),
    api(
        "ChangeInstanceOffering",
        Put,
        "/v1/vm-instances/{uuid}/actions",
        Body::Action("changeInstanceOffering", schema::<Offering>),
        Job,
        "Changes a stopped VM's CPUs and memory",
    ),
    api(
        "AddImageStoreBackupStorage",
        Post,
        "/v1/backup-storage/image-store",
        Body::Create(schema::<r::StorageParams>),
        Job,
        "Adds image-store backup storage",
    ),
    api(
        "AttachBackupStorageToZone",
        Post,
        "/v1/zones/{zone}/backup-storage/{bs}",
        Body::None,
        Job,
        "Attaches backup storage to a zone",
    ),
    api(
        "AddLocalPrimaryStorage",
        Post,
        "/v1/primary-storage/local-storage",
        Body::Create(schema::<r::StorageParams>),
        Job,
        "Adds local primary storage",
    ),
    api(
        "AttachPrimaryStorageToCluster",
        Post,
        "/v1/clusters/{cluster}/primary-storage/{ps}",
        Body::None,
        Job,
        "Attaches primary storage to a cluster",
    ),
    api(
        "AddImage",
        Post,
        "/v1/images",
        Body::Create(schema::<r::ImageParams>),
        Job,
        "Adds an image from a URL to backup storage",
    ),
    api(
        "CreateUserTag",
        Post,
        "/v1/user-tags",
        Body::Create(schema::<tagging::TagParams>),
        Job,
        "Tags a resource",
    ),
    api(
        "CreateSystemTag",
        Post,
        "/v1/system-tags",
        Body::Create(schema::<tagging::TagParams>),
        Job,
        "Adds a system tag (hostname, staticIp, reservedMemory)",
    ),
    api("DeleteTag", Delete, "/v1/tags/{uuid}", Body::None, Job, "Deletes a user or system tag"),
    api(
        "GetJob",
        Get,
        "/v1/api-jobs/{uuid}",
        Body::None,
        Immediate,
        "A job: 202 while it runs, then its result; waitSeconds=N waits for its end",
    ),
    api(
        "CancelApiJob",
        Put,
        "/v1/api-jobs/{uuid}/actions",
        Body::Action("cancelApiJob", schema::<r::CancelApiJob>),
        Job,
        "Cancels a running job that can stop cleanly (AddImage); it ends SYS.JOB_CANCELLED",
    ),
    api(
        "QueryGCJob",
        Get,
        "/v1/gc-jobs",
        Body::None,
        Immediate,
        "The garbage collector's jobs (admin)",
    ),
];

/// Text made once for the life of the process (the derived APIs' names, paths and
/// summaries).
fn leak(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

/// The APIs every kind has: its query, its read by UUID, and its deletion with cascade when
/// it is deleted that way.
static DERIVED: std::sync::LazyLock<Vec<Api>> = std::sync::LazyLock::new(|| {
    let mut apis = Vec::new();
    for kind in strato_actors::kinds::KINDS {
        let of = |api| Some((api, kind));
        apis.push(Api {
            name: leak(format!("Query{}", kind.api)),
            method: Get,
            path: leak(format!("/v1/{}", kind.url())),
            body: Body::None,
            answer: Answer::Query,
            summary: "Queries with conditions (q=field<op>value), sort, start, limit, count, replyWithCount and fields",
            of_kind: of(KindApi::Query),
        });
        apis.push(Api {
            name: leak(format!("Get{}", kind.api)),
            method: Get,
            path: leak(format!("/v1/{}/{{uuid}}", kind.url())),
            body: Body::None,
            answer: Immediate,
            summary: leak(format!("One {} by its UUID", kind.api)),
            of_kind: of(KindApi::Get),
        });
        if let strato_actors::kinds::Deletion::Cascade(_) = kind.deletion {
            apis.push(Api {
                name: leak(format!("Delete{}", kind.api)),
                method: Delete,
                path: leak(format!("/v1/{}/{{uuid}}", kind.url())),
                body: Body::None,
                answer: Job,
                summary: leak(format!(
                    "Deletes a {} (deleteMode=Permissive refuses while anything depends on it; Enforcing deletes that first)",
                    kind.api
                )),
                of_kind: of(KindApi::Delete),
            });
        }
    }
    apis
});

/// Every API.
pub fn all() -> impl Iterator<Item = &'static Api> {
    APIS.iter().chain(DERIVED.iter())
}

/// The API named `name`.
pub fn named(name: &str) -> Option<&'static Api> {
    all().find(|a| a.name.eq_ignore_ascii_case(name))
}

/// The handler of an API (APIs sharing a method and path share it).
fn handler(api: &Api) -> MethodRouter<Arc<Mn>> {
    match api.of_kind {
        Some((KindApi::Query, kind)) => return r::list(kind.url()),
        Some((KindApi::Get, kind)) => return r::one(kind),
        Some((KindApi::Delete, kind)) => return r::delete(kind),
        None => {}
    }
    match (api.method, api.path) {
        (Put, "/v1/accounts/login") => put(auth::log_in),
        (Delete, "/v1/accounts/sessions/{uuid}") => delete(auth::log_out),
        (Post, "/v1/accounts") => post(auth::create_account),
        (Delete, "/v1/accounts/{uuid}") => delete(auth::delete_account),
        (Put, "/v1/accounts/{uuid}/actions") => put(auth::account_action),
        (Post, "/v1/accounts/api-keys") => post(auth::create_api_key),
        (Delete, "/v1/accounts/api-keys/{uuid}") => delete(auth::delete_api_key),
        (Post, "/v1/zones") => post(r::create_zone),
        (Post, "/v1/clusters") => post(r::create_cluster),
        (Post, "/v1/hosts/kvm") => post(r::add_host),
        (Put, "/v1/hosts/{uuid}/actions") => put(r::host_action),
        (Post, "/v1/instance-offerings") => post(r::create_offering),
        (Post, "/v1/l2-networks/no-vlan") => post(r::create_l2),
        (Post, "/v1/l2-networks/{l2}/clusters/{cluster}") => post(r::attach_l2),
        (Post, "/v1/l3-networks") => post(r::create_l3),
        (Post, "/v1/l3-networks/{uuid}/ip-ranges") => post(r::add_ip_range),
        (Post, "/v1/vm-instances") => post(r::create_vm),
        (Delete, "/v1/vm-instances/{uuid}") => delete(r::destroy_vm),
        (Put, "/v1/vm-instances/{uuid}/actions") => put(r::vm_action),
        (Post, "/v1/backup-storage/image-store") => post(r::create_backup_storage),
        (Post, "/v1/zones/{zone}/backup-storage/{bs}") => post(r::attach_backup_storage),
        (Post, "/v1/primary-storage/local-storage") => post(r::create_primary_storage),
        (Post, "/v1/clusters/{cluster}/primary-storage/{ps}") => post(r::attach_primary_storage),
        (Post, "/v1/images") => post(r::add_image),
        (Post, "/v1/user-tags") => post(tagging::create_user_tag),
        (Post, "/v1/system-tags") => post(tagging::create_system_tag),
        (Delete, "/v1/tags/{uuid}") => delete(tagging::delete_tag),
        (Get, "/v1/api-jobs/{uuid}") => get(r::job),
        (Put, "/v1/api-jobs/{uuid}/actions") => put(r::job_action),
        (Get, "/v1/gc-jobs") => get(r::gc_jobs),
        (method, path) => {
            panic!("the catalog names {} {path}, which has no handler", method.as_str())
        }
    }
}

/// The API's routes, from the catalog: each (method, path) once.
pub fn router() -> Router<Arc<Mn>> {
    let mut router = Router::new();
    let mut routed: Vec<(Method, &str)> = Vec::new();
    for api in all() {
        if routed.contains(&(api.method, api.path)) {
            continue;
        }
        routed.push((api.method, api.path));
        router = router.route(api.path, handler(api));
    }
    router
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
        // Building the router finds a handler for every (method, path) or panics.
        let _ = router();
    }

    #[test]
    fn parameters_come_from_the_structs_that_validate_the_bodies() {
        let create = named("createvminstance").unwrap();
        let params = create.params();
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
}
