//! The API's one error type and its one mapping to HTTP.
//!
//! Every failure a client can see is an [`ApiError`]: a stable code from the one list of them
//! ([`crate::codes`]: `SYS.INVALID_ARGUMENT`, `VM.INVALID_STATE`, ...) with its HTTP status, a
//! message a user can act on, and details (the field at fault, the placement trace). Errors
//! from the layers below are mapped here and nowhere else, by their types; server-side
//! failures log their whole cause chain, and never answer it.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use strato_actors::host::HostError;
use strato_actors::l3::L3Error;
use strato_actors::owners::QuotaError;
use strato_actors::vm::VmError;
use strato_runtime::{RuntimeError, error_chain};

use crate::codes::Code;

/// An error as the API reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// The HTTP status.
    #[serde(skip, default = "internal_status")]
    pub status: StatusCode,
    /// A stable code.
    pub code: String,
    /// What happened, for a user.
    pub description: String,
    /// More: the field at fault, the placement trace, ...
    pub details: Value,
}

fn internal_status() -> StatusCode {
    StatusCode::INTERNAL_SERVER_ERROR
}

impl ApiError {
    /// An error of `code`, with what happened and details.
    pub fn new(code: Code, description: impl Into<String>, details: Value) -> Self {
        ApiError {
            status: code.status,
            code: code.name.to_owned(),
            description: description.into(),
            details,
        }
    }

    /// An error of `code` without details.
    pub fn of(code: Code, description: impl Into<String>) -> Self {
        ApiError::new(code, description, Value::Null)
    }

    /// 400: `field` is missing or wrong.
    pub fn invalid(field: &str, description: impl Into<String>) -> Self {
        ApiError::new(crate::codes::INVALID_ARGUMENT, description, json!({ "field": field }))
    }

    /// 404: no `kind` with this UUID.
    pub fn not_found(kind: &str, uuid: impl std::fmt::Display) -> Self {
        ApiError::new(
            crate::codes::RESOURCE_NOT_FOUND,
            format!("no {kind} with UUID {uuid}"),
            json!({ "resourceType": kind, "uuid": uuid.to_string() }),
        )
    }

    /// 404: no record of `R` with this UUID, named as its kind is ([`strato_actors::kinds`]).
    pub fn no<R: strato_storage::Record>(uuid: impl std::fmt::Display) -> Self {
        ApiError::not_found(strato_actors::kinds::of::<R>().api, uuid)
    }

    /// 500, logging the cause chain under a reference the answer gives: the chain names the
    /// code's types and the layers' messages, which are for the operator, not the caller.
    pub fn internal(error: &(dyn std::error::Error + 'static)) -> Self {
        let chain = error_chain(error);
        let reference = uuid::Uuid::new_v4();
        tracing::error!(error = %chain, %reference, "internal error");
        ApiError::new(
            crate::codes::INTERNAL,
            format!(
                "the management node failed to serve the request; its log has the cause under reference {reference}"
            ),
            json!({ "reference": reference }),
        )
    }

    /// The JSON body: `{"error": {...}}`.
    pub fn body(&self) -> Value {
        json!({ "error": { "code": self.code, "description": self.description, "details": self.details } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<RuntimeError> for ApiError {
    fn from(error: RuntimeError) -> Self {
        match &error {
            RuntimeError::NotFound { actor } => ApiError::not_found(
                strato_actors::kinds::by_actor(actor.kind).map_or(actor.kind, |k| k.api),
                actor.id,
            ),
            RuntimeError::Busy { .. } => {
                ApiError::new(crate::codes::BUSY, error.to_string(), Value::Null)
            }
            RuntimeError::Timeout { .. } => {
                ApiError::new(crate::codes::TIMEOUT, error.to_string(), Value::Null)
            }
            RuntimeError::FlowFailed { chain, step, message, rollback_failures, cause } => {
                // What failed is told by the step's error's type; what failed inside (an
                // agent's or libvirt's message) goes in the details, which
                // `auth::exposure` keeps from tenants.
                let mut answer = cause.as_deref().and_then(step_failure).unwrap_or_else(|| {
                    // The step's own error, one level: what failed; its chain and the undo's
                    // failures go to the log, under the reference the answer gives.
                    let reference = uuid::Uuid::new_v4();
                    tracing::warn!(%chain, %step, error = %message, ?rollback_failures, %reference, "a flow failed");
                    let undone: Vec<&str> = rollback_failures
                        .iter()
                        .map(|f| f.split_once(':').map_or(f.as_str(), |(step, _)| step))
                        .collect();
                    ApiError::new(
                        crate::codes::OPERATION_FAILED,
                        if rollback_failures.is_empty() {
                            format!(
                                "{chain} failed at its step {step}; what it had done was undone"
                            )
                        } else {
                            format!(
                                "{chain} failed at its step {step}, and undoing it did not finish"
                            )
                        },
                        json!({
                            "cause": cause.as_ref().map_or_else(|| message.clone(), |c| c.to_string()),
                            "rollbackFailures": undone,
                            "reference": reference,
                        }),
                    )
                });
                if let Value::Object(details) = &mut answer.details {
                    details.insert("step".into(), json!(step));
                } else {
                    answer.details = json!({ "step": step });
                }
                answer
            }
            RuntimeError::Store(e) => store_error(e),
            // An operation that panicked is a bug, but a user is told which failure it was:
            // the actor was restarted and the next operation runs on a fresh state.
            RuntimeError::Internal { .. } => {
                tracing::error!(error = %error_chain(&error), "an operation panicked");
                ApiError::new(
                    crate::codes::OPERATION_PANICKED,
                    "the operation stopped on a bug (it panicked); its actor was restarted, so the request may be sent again",
                    Value::Null,
                )
            }
            RuntimeError::Failed { .. } | RuntimeError::Unavailable { .. } => {
                tracing::error!(error = %error_chain(&error), "an actor refuses operations");
                ApiError::new(crate::codes::ACTOR_UNAVAILABLE, error.to_string(), Value::Null)
            }
            RuntimeError::Shutdown => ApiError::new(
                crate::codes::SHUTTING_DOWN,
                "the management node is shutting down; send the request again once it is back",
                Value::Null,
            ),
            _ => ApiError::internal(&error),
        }
    }
}

/// The answer for a flow step's error that says by its type what failed: no host, no
/// address left, a host away. `None` for the rest (an operation that failed).
fn step_failure(cause: &(dyn std::error::Error + Send + Sync + 'static)) -> Option<ApiError> {
    use strato_actors::allocator::AllocError;
    use strato_actors::ipam::IpamError;
    use strato_actors::volume::VolumeError;
    if let Some(AllocError::NoHost { trace }) = cause.downcast_ref::<AllocError>() {
        return Some(no_host(trace));
    }
    if let Some(L3Error::Ipam(IpamError::Exhausted)) = cause.downcast_ref::<L3Error>() {
        return Some(ApiError::new(
            crate::codes::IP_EXHAUSTED,
            format!("{}: add an IP range or free addresses", IpamError::Exhausted),
            Value::Null,
        ));
    }
    if let Some(quota) = cause.downcast_ref::<QuotaError>() {
        return Some(quota_error(quota));
    }
    if let Some(&VolumeError::NoSharedRoom { storage, size }) = cause.downcast_ref::<VolumeError>()
    {
        return Some(VolumeError::NoSharedRoom { storage, size }.into());
    }
    if let Some(HostError::Network(strato_actors::network::NetworkError::NoVtep {
        host,
        pool,
        cidr,
    })) = cause.downcast_ref::<HostError>()
    {
        return Some(
            strato_actors::network::NetworkError::NoVtep {
                host: *host,
                pool: *pool,
                cidr: cidr.clone(),
            }
            .into(),
        );
    }
    let host = match cause.downcast_ref::<AllocError>() {
        Some(AllocError::Host(e)) => Some(e),
        _ => cause.downcast_ref::<HostError>(),
    };
    // An agent that answered with a failure is an operation that failed, not a host away.
    host.filter(|e| e.is_unreachable()).map(host_unavailable)
}

fn quota_error(error: &QuotaError) -> ApiError {
    match error {
        QuotaError::Exceeded { quota, used, requested, limit } => ApiError::new(
            crate::codes::QUOTA_EXCEEDED,
            error.to_string(),
            json!({ "quota": quota, "used": used, "requested": requested, "limit": limit }),
        ),
        QuotaError::NoAccount(_) => {
            ApiError::of(crate::codes::NOT_AUTHENTICATED, "the account no longer exists")
        }
        QuotaError::Store(e) => store_error(e),
    }
}

impl From<QuotaError> for ApiError {
    fn from(error: QuotaError) -> Self {
        quota_error(&error)
    }
}

fn no_host(trace: &[strato_actors::allocator::FilterStep]) -> ApiError {
    ApiError::new(
        crate::codes::NO_HOST,
        "no host can take the VM",
        json!({ "placementTrace": trace.iter().map(|s| format!("{} -> {}", s.filter, s.hosts_left)).collect::<Vec<_>>() }),
    )
}

fn host_unavailable(error: &HostError) -> ApiError {
    let reference = logged("a host is unreachable", error);
    ApiError::new(
        crate::codes::HOST_UNAVAILABLE,
        "the host is not reachable now; try again once it reconnects",
        json!({ "cause": error.to_string(), "reference": reference }),
    )
}

/// Logs `error`'s whole cause chain under a new reference, which the answer gives: the chain
/// names the layers' internals, for the operator's log, not for the caller.
fn logged(what: &str, error: &(dyn std::error::Error + 'static)) -> uuid::Uuid {
    let reference = uuid::Uuid::new_v4();
    tracing::warn!(error = %error_chain(error), %reference, "{what}");
    reference
}

impl From<VmError> for ApiError {
    fn from(error: VmError) -> Self {
        match error {
            VmError::Runtime(e) => e.into(),
            VmError::InvalidState(e) => ApiError::new(
                crate::codes::VM_INVALID_STATE,
                e.to_string(),
                json!({ "state": format!("{:?}", e.state), "allowed": e.allowed.iter().map(|o| format!("{o:?}")).collect::<Vec<_>>() }),
            ),
            VmError::Host(e) => e.into(),
            VmError::Quota(e) => e.into(),
            VmError::Store(e) => e.into(),
            VmError::Alloc(strato_actors::allocator::AllocError::Host(e)) => e.into(),
            VmError::Alloc(strato_actors::allocator::AllocError::Store(e)) => e.into(),
            VmError::Alloc(strato_actors::allocator::AllocError::NoHost { trace }) => {
                no_host(&trace)
            }
            VmError::Vip(e) => e.into(),
            VmError::Volume(e) => (*e).into(),
            VmError::HasDataVolumes { .. } => {
                ApiError::of(crate::codes::RESOURCE_IN_USE, error.to_string())
            }
            other => ApiError::internal(&other),
        }
    }
}

impl From<HostError> for ApiError {
    fn from(error: HostError) -> Self {
        match error {
            HostError::Runtime(e) => e.into(),
            HostError::Link(strato_proto::LinkError::Agent { error: ref agent, .. }) => {
                let reference = logged("a host's agent failed", &error);
                ApiError::new(
                    crate::codes::HOST_OPERATION_FAILED,
                    "the host's agent could not do it (details.agentCode says how it failed)",
                    json!({ "agentCode": format!("{:?}", agent.code), "cause": error.to_string(), "reference": reference }),
                )
            }
            HostError::Disconnected(_) | HostError::Link(_) => host_unavailable(&error),
            HostError::Store(e) => e.into(),
            HostError::Network(e) => e.into(),
            other => ApiError::internal(&other),
        }
    }
}

impl From<L3Error> for ApiError {
    fn from(error: L3Error) -> Self {
        match error {
            L3Error::Runtime(e) => e.into(),
            L3Error::Ipam(e) => {
                let field = match &e {
                    strato_actors::ipam::IpamError::Invalid { field, .. } => *field,
                    _ => "ipRange",
                };
                ApiError::new(
                    crate::codes::INVALID_IP_RANGE,
                    e.to_string(),
                    json!({ "field": field }),
                )
            }
            L3Error::Store(e) => e.into(),
            L3Error::InUse(_) => ApiError::of(crate::codes::RESOURCE_BUSY, error.to_string()),
            L3Error::ServiceInUse { .. } => {
                ApiError::of(crate::codes::RESOURCE_IN_USE, error.to_string())
            }
            L3Error::Invalid { field, message } => ApiError::invalid(field, message),
        }
    }
}

impl From<strato_actors::vip::VipError> for ApiError {
    fn from(error: strato_actors::vip::VipError) -> Self {
        use strato_actors::vip::VipError;
        match error {
            VipError::Store(e) => e.into(),
            VipError::L3(L3Error::Ipam(strato_actors::ipam::IpamError::Exhausted)) => ApiError::of(
                crate::codes::IP_EXHAUSTED,
                "no free IP address is left on the L3 network",
            ),
            VipError::L3(L3Error::Ipam(e @ strato_actors::ipam::IpamError::Unavailable { .. })) => {
                ApiError::invalid("requiredIp", e.to_string())
            }
            VipError::L3(e) => e.into(),
            VipError::NotFound { kind, uuid } => ApiError::not_found(kind, uuid),
            VipError::Invalid { field, message } => ApiError::invalid(field, message),
            VipError::InUse(message) => ApiError::of(crate::codes::VIP_IN_USE, message),
        }
    }
}

impl From<strato_actors::volume::VolumeError> for ApiError {
    fn from(error: strato_actors::volume::VolumeError) -> Self {
        use strato_actors::volume::VolumeError;
        match error {
            VolumeError::Runtime(e) => e.into(),
            VolumeError::Store(e) => e.into(),
            VolumeError::Host(e) => e.into(),
            VolumeError::Vm(e) => (*e).into(),
            VolumeError::Quota(e) => e.into(),
            VolumeError::NotFound { kind, uuid } => ApiError::not_found(kind, uuid),
            VolumeError::Invalid { field, message } => ApiError::invalid(field, message),
            VolumeError::InUse(message) => ApiError::of(crate::codes::VOLUME_IN_USE, message),
            VolumeError::NoRoom { host, .. } => ApiError::new(
                crate::codes::STORAGE_NO_ROOM,
                error.to_string(),
                json!({ "hostUuid": host.to_string() }),
            ),
            VolumeError::NoSharedRoom { storage, .. } => ApiError::new(
                crate::codes::STORAGE_NO_ROOM,
                error.to_string(),
                json!({ "primaryStorageUuid": storage.to_string() }),
            ),
            VolumeError::InvalidStatus { status, .. } => ApiError::new(
                crate::codes::VOLUME_INVALID_STATUS,
                error.to_string(),
                json!({ "status": status.as_str() }),
            ),
            VolumeError::VmState { state, .. } => ApiError::new(
                crate::codes::VM_INVALID_STATE,
                error.to_string(),
                json!({ "state": state }),
            ),
        }
    }
}

impl From<strato_actors::network::NetworkError> for ApiError {
    fn from(error: strato_actors::network::NetworkError) -> Self {
        use strato_actors::network::NetworkError;
        match error {
            NetworkError::Store(e) => e.into(),
            NetworkError::NoVtep { host, pool, ref cidr } => ApiError::new(
                crate::codes::NETWORK_NO_VTEP,
                error.to_string(),
                json!({ "host": host, "pool": pool, "vtepCidr": cidr }),
            ),
        }
    }
}

impl From<strato_actors::cascade::CascadeError> for ApiError {
    fn from(error: strato_actors::cascade::CascadeError) -> Self {
        use strato_actors::cascade::CascadeError;
        match error {
            CascadeError::HasDependents { resource, ref dependents } => ApiError::new(
                crate::codes::RESOURCE_IN_USE,
                error.to_string(),
                json!({ "resource": resource, "dependents": dependents }),
            ),
            CascadeError::NotFound(r) => ApiError::not_found(r.kind.api, r.uuid),
            CascadeError::Exists(resource) => ApiError::new(
                crate::codes::RESOURCE_EXISTS,
                error.to_string(),
                json!({ "resource": resource }),
            ),
            CascadeError::NotDeletable(resource) => ApiError::new(
                crate::codes::NOT_DELETABLE,
                error.to_string(),
                json!({ "resource": resource }),
            ),
            CascadeError::Busy(resource, _) => ApiError::new(
                crate::codes::RESOURCE_BUSY,
                error.to_string(),
                json!({ "resource": resource }),
            ),
            CascadeError::Vm(e) => e.into(),
            CascadeError::Host(e) => e.into(),
            CascadeError::L3(e) => e.into(),
            CascadeError::Vip(e) => e.into(),
            CascadeError::Volume(e) => (*e).into(),
            CascadeError::Runtime(e) => e.into(),
            CascadeError::Store(e) => e.into(),
        }
    }
}

impl From<strato_actors::maintenance::MaintenanceError> for ApiError {
    fn from(error: strato_actors::maintenance::MaintenanceError) -> Self {
        use strato_actors::maintenance::MaintenanceError;
        match error {
            MaintenanceError::Host(e) => e.into(),
            MaintenanceError::Vm(e) => e.into(),
            MaintenanceError::Store(e) => e.into(),
        }
    }
}

/// A store failure, by what a user can do about it. A conflict should never get here (each
/// record is written in its owner's queue, or by a compare-and-swap that retries); if one
/// does, sending the request again is the remedy, and it is no internal error. A backend
/// that failed (a full disk, an injected fault) wrote nothing durable: a 503 that names it.
impl From<strato_storage::StoreError> for ApiError {
    fn from(error: strato_storage::StoreError) -> Self {
        store_error(&error)
    }
}

fn store_error(error: &strato_storage::StoreError) -> ApiError {
    use strato_storage::StoreError;
    match error {
        StoreError::Conflict { .. } => {
            tracing::warn!(error = %error_chain(error), "a store conflict reached the API");
            ApiError::new(
                crate::codes::CONCURRENT_CHANGE,
                "what this request changes was changed by another at the same moment; nothing was written: send it again",
                Value::Null,
            )
        }
        StoreError::Backend { .. } | StoreError::NotDurable { .. } => {
            tracing::error!(error = %error_chain(error), "the store failed");
            ApiError::new(
                crate::codes::STORE_FAILED,
                "the management node's store failed, so nothing of this request was kept; try again, and tell the operator if it goes on",
                Value::Null,
            )
        }
        _ => ApiError::internal(error),
    }
}
