//! Who may reach what: each kind's declared [`Access`], applied to a normal account's
//! request on the route's parsed path UUIDs, to what its queries list, and to the resources
//! a request names (an offering or network a new VM uses, a resource it tags).

use axum::http::Method;
use serde_json::Value;
use strato_actors::owners::{self, ADMIN};
use strato_storage::Db;
use uuid::Uuid;

use super::{Access, AccountRecord, Caller, forbidden, tenant};
use crate::error::ApiError;

/// A `/v1` route's template split into segments, with its UUID parameters parsed.
#[derive(Debug)]
pub(crate) struct PathIds {
    /// The template's segments after `/v1/` (`["vm-instances", "{uuid}", "actions"]`).
    segments: Vec<String>,
    /// The parsed value of each `{parameter}` segment, by position.
    ids: Vec<Option<Uuid>>,
}

impl PathIds {
    /// `template` is the route's, `raw` the request's path as sent, `params` the decoded
    /// parameters. A UUID is never percent-encoded: a parameter sent encoded is refused even
    /// when it decodes to a canonical UUID, so one resource has one spelling on the wire too.
    pub(crate) fn parse(
        template: &str,
        raw: &str,
        params: &[(String, String)],
    ) -> Result<PathIds, ApiError> {
        let segments: Vec<String> =
            template.trim_start_matches("/v1/").split('/').map(str::to_owned).collect();
        let raw: Vec<&str> = raw.trim_start_matches("/v1/").split('/').collect();
        let mut ids = Vec::with_capacity(segments.len());
        for (position, segment) in segments.iter().enumerate() {
            let id = match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => {
                    let value = params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
                    let sent = raw.get(position).copied().unwrap_or_default();
                    if sent.contains('%') {
                        return Err(ApiError::invalid(
                            name,
                            format!(
                                "`{}` is percent-encoded; send the UUID in its canonical form",
                                crate::types::validate::printable(sent)
                            ),
                        ));
                    }
                    Some(crate::types::uuid_param(value.unwrap_or_default(), name)?)
                }
                None => None,
            };
            ids.push(id);
        }
        Ok(PathIds { segments, ids })
    }

    fn kind(&self) -> &str {
        &self.segments[0]
    }

    /// The resource the path names: the parameter right after the kind.
    fn resource(&self) -> Option<Uuid> {
        self.ids.get(1).copied().flatten()
    }

    fn shape(&self) -> Vec<&str> {
        self.segments.iter().map(|s| if s.starts_with('{') { "{}" } else { s.as_str() }).collect()
    }
}

/// How a normal account may reach what the URL segment `segment` names: a kind's declared
/// access ([`strato_actors::kinds`]), or for the routes that are not a kind's: a tag by its
/// resource, a job its submitter's (looked up under the caller's account), the garbage
/// collector the admin's.
pub fn access_of(segment: &str) -> Access {
    match strato_actors::kinds::by_url(segment) {
        Some(kind) => kind.access,
        None => match segment {
            "tags" => Access::With("resourceUuid"),
            "api-jobs" => Access::Owned,
            _ => Access::AdminOnly,
        },
    }
}

/// The checks of a normal account's request against its route.
pub(crate) struct Route;

impl Route {
    /// Checks a normal account's request by its method and route, on the parsed UUIDs.
    pub(crate) fn check(
        db: &Db,
        caller: &Caller,
        method: &Method,
        path: &PathIds,
    ) -> Result<(), ApiError> {
        let segment = path.kind();
        let read = method == Method::GET;
        let access = access_of(segment);
        match access {
            Access::Itself => return Self::check_account_path(caller.account, method, path),
            Access::AdminOnly => {
                return Err(forbidden(format!("{segment} are managed by the admin account")));
            }
            Access::Shared if !read && path.segments.len() == 1 => {
                return Err(forbidden(format!("{segment} are created by the admin account")));
            }
            _ => {}
        }
        // A job is looked up under the caller's own account: another's is not found.
        if segment == "api-jobs" {
            return Ok(());
        }
        let Some(uuid) = path.resource() else {
            return Ok(());
        };
        // Nested admin routes under an owned kind do not exist; a resource's own paths
        // (`/{uuid}`, `/{uuid}/actions`, `/{uuid}/ip-ranges`) are judged by its owner.
        let owner = match access {
            Access::With(field) => match owning_resource(db, segment, field, uuid)? {
                Some(resource) => owners::owner_of(db, resource)?,
                None => ADMIN,
            },
            _ => owners::owner_of(db, uuid)?,
        };
        if owner == caller.account {
            return Ok(());
        }
        if access == Access::Shared && owner == ADMIN {
            return if read {
                Ok(())
            } else {
                Err(forbidden(format!("{uuid} is shared by the admin account; only it changes it")))
            };
        }
        Err(not_found_at(segment, uuid))
    }

    fn check_account_path(account: Uuid, method: &Method, path: &PathIds) -> Result<(), ApiError> {
        let mine = path.resource() == Some(account);
        match (method.clone(), path.shape().as_slice()) {
            (Method::GET, ["accounts"]) => Ok(()),
            // Sessions and API keys: the handlers act only on the caller's own.
            (_, ["accounts", "sessions", "{}"] | ["accounts", "api-keys", ..]) => Ok(()),
            (_, ["accounts"]) => Err(forbidden("only the admin account creates accounts".into())),
            (_, ["accounts", "{}", ..]) if !mine => {
                Err(ApiError::no::<AccountRecord>(path.resource().unwrap_or_default()))
            }
            (Method::GET, ["accounts", "{}"]) => Ok(()),
            // Its own actions: the handler lets a tenant change its password, not its quota.
            (Method::PUT, ["accounts", "{}", "actions"]) => Ok(()),
            _ => Err(forbidden("only the admin account manages accounts".into())),
        }
    }
}

/// The resource that `uuid` (at URL segment `segment`) is seen with: the UUID its `field`
/// holds. `tags` (a route for both tag kinds) looks in both.
fn owning_resource(
    db: &Db,
    segment: &str,
    field: &'static str,
    uuid: Uuid,
) -> Result<Option<Uuid>, ApiError> {
    let kinds: Vec<&strato_actors::kinds::Kind> = match strato_actors::kinds::by_url(segment) {
        Some(kind) => vec![kind],
        None => {
            strato_actors::kinds::KINDS.iter().filter(|k| k.access == Access::With(field)).collect()
        }
    };
    for kind in kinds {
        if let Some(inventory) = kind.table.inventory(db, uuid)? {
            return Ok(inventory[field].as_str().and_then(strato_actors::canonical_uuid));
        }
    }
    Ok(None)
}

/// "Not found", naming what the URL segment `segment` holds.
fn not_found_at(segment: &str, uuid: Uuid) -> ApiError {
    match strato_actors::kinds::by_url(segment) {
        Some(kind) => ApiError::not_found(kind.api, uuid),
        None => ApiError::not_found(segment, uuid),
    }
}

/// Whether `tenant` may see `item` of `kind` (a query's inventory).
pub fn visible(db: &Db, tenant: Uuid, kind: &str, item: &Value) -> Result<bool, ApiError> {
    let access = access_of(kind);
    let field = match access {
        Access::With(field) => field,
        _ => "uuid",
    };
    let Some(uuid) = item[field].as_str().and_then(strato_actors::canonical_uuid) else {
        return Ok(false);
    };
    if access == Access::Itself {
        return Ok(uuid == tenant);
    }
    let owner = owners::owner_of(db, uuid)?;
    Ok(match access {
        Access::AdminOnly | Access::Itself => false,
        Access::Shared => owner == tenant || owner == ADMIN,
        Access::Owned | Access::With(_) => owner == tenant,
    })
}

/// Checks that the caller may use resource `uuid` of `kind` in a request (an offering, an
/// image or a network a new VM names): a normal account must own it or, for a shared kind,
/// the admin must. Answers as not found otherwise.
pub fn may_use(db: &Db, kind: &str, uuid: Uuid) -> Result<(), ApiError> {
    let Some(tenant) = tenant() else { return Ok(()) };
    let owner = owners::owner_of(db, uuid)?;
    let ok = owner == tenant || (access_of(kind) == Access::Shared && owner == ADMIN);
    if ok { Ok(()) } else { Err(not_found_at(kind, uuid)) }
}

/// Checks that the caller may change resource `uuid` of `kind` (tag it): a normal account
/// must own it.
pub fn may_change(db: &Db, kind: &str, uuid: Uuid) -> Result<(), ApiError> {
    let Some(tenant) = tenant() else { return Ok(()) };
    let owner = owners::owner_of(db, uuid)?;
    if owner == tenant {
        Ok(())
    } else if access_of(kind) == Access::Shared && owner == ADMIN {
        Err(forbidden(format!("{uuid} is shared by the admin account; only it changes it")))
    } else {
        Err(not_found_at(kind, uuid))
    }
}

/// Refuses, for a normal account, a request naming a resource only the admin manages (a
/// host to place or move a VM on).
pub fn admin_only(what: &str) -> Result<(), ApiError> {
    match tenant() {
        Some(_) => Err(forbidden(format!("{what} is for the admin account"))),
        None => Ok(()),
    }
}
