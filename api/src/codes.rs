//! Every error code the API answers, listed once: its name, its HTTP status, and what it
//! means for the caller. An error can only be made from one of these (`ApiError`
//! takes a [`Code`]), so a code cannot be misspelt or given two statuses, and the OpenAPI
//! document publishes the list ([`ALL`], as `x-strato-error-codes`).
//!
//! A code names what really failed, so that a caller can act on it: a refusal the request's
//! own state explains (`VM.INVALID_STATE`, `HOST_ALLOCATION.NO_HOST`), a conflict with another
//! request, a failure of a part of the system (`HOST.UNAVAILABLE`, `SYS.STORE_FAILED`), or,
//! last, a bug (`SYS.INTERNAL`, `SYS.OPERATION_PANICKED`), which the chaos runs count as a
//! violation.

use axum::http::StatusCode;

/// A stable error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Code {
    /// Its name (`VM.INVALID_STATE`).
    pub name: &'static str,
    /// The HTTP status it answers with (a job that fails with it keeps it in its error).
    pub status: StatusCode,
    /// What it means, and what the caller can do.
    pub meaning: &'static str,
}

macro_rules! codes {
    ($($(#[$doc:meta])* $id:ident = $name:literal, $status:ident, $meaning:literal;)*) => {
        $(
            $(#[$doc])*
            pub const $id: Code = Code { name: $name, status: StatusCode::$status, meaning: $meaning };
        )*
        /// Every code, in the order listed here.
        pub const ALL: &[Code] = &[$($id),*];
    };
}

codes! {
    /// A parameter is missing or wrong; `details.field` names it.
    INVALID_ARGUMENT = "SYS.INVALID_ARGUMENT", BAD_REQUEST,
        "a parameter is missing or wrong (details.field names it); correct it and send again";
    /// No resource of that kind has that UUID (or the caller may not see it).
    RESOURCE_NOT_FOUND = "SYS.RESOURCE_NOT_FOUND", NOT_FOUND,
        "no such resource (or not one the caller may see)";
    /// The resource a creation makes exists already.
    RESOURCE_EXISTS = "SYS.RESOURCE_EXISTS", CONFLICT,
        "the resource this request creates exists already; send the request again";
    /// Something depends on the resource a deletion names.
    RESOURCE_IN_USE = "SYS.RESOURCE_IN_USE", CONFLICT,
        "other resources depend on this one (details.dependents); delete them first or use deleteMode=Enforcing";
    /// The resource is still being set up by another operation.
    RESOURCE_BUSY = "SYS.RESOURCE_BUSY", CONFLICT,
        "the resource is still being set up by another operation; try again";
    /// The kind is not deleted this way.
    NOT_DELETABLE = "SYS.NOT_DELETABLE", CONFLICT,
        "resources of this kind are not deleted with cascade";
    /// Another request changed the same thing at the same moment.
    CONCURRENT_CHANGE = "SYS.CONCURRENT_CHANGE", CONFLICT,
        "another request changed the same thing at the same moment and nothing was written; send it again";
    /// A multi-step operation failed and was undone.
    OPERATION_FAILED = "SYS.OPERATION_FAILED", CONFLICT,
        "a step of the operation failed (details.step); what it had done was undone";
    /// An operation stopped on a bug.
    OPERATION_PANICKED = "SYS.OPERATION_PANICKED", INTERNAL_SERVER_ERROR,
        "the operation stopped on a bug; its actor was restarted, so the request may be sent again";
    /// An actor refuses operations (over its restart budget, or its state unreadable).
    ACTOR_UNAVAILABLE = "SYS.ACTOR_UNAVAILABLE", SERVICE_UNAVAILABLE,
        "the resource's actor refuses operations for now; the operator's console shows why";
    /// A queue is full.
    BUSY = "SYS.BUSY", SERVICE_UNAVAILABLE,
        "the resource's queue is full; try again later";
    /// An operation did not start or end within its deadline.
    TIMEOUT = "SYS.TIMEOUT", GATEWAY_TIMEOUT,
        "the operation did not finish within its deadline";
    /// The store failed.
    STORE_FAILED = "SYS.STORE_FAILED", SERVICE_UNAVAILABLE,
        "the management node's store failed and nothing of this request was kept; try again, and tell the operator if it goes on";
    /// The node is stopping.
    SHUTTING_DOWN = "SYS.SHUTTING_DOWN", SERVICE_UNAVAILABLE,
        "the management node is shutting down; send the request again once it is back";
    /// A bug; the log has the cause under the reference the details give.
    INTERNAL = "SYS.INTERNAL", INTERNAL_SERVER_ERROR,
        "the management node failed to serve the request; its log has the cause under details.reference";
    /// The request's body is too large or cut off.
    BODY_TOO_LARGE = "SYS.BODY_TOO_LARGE", PAYLOAD_TOO_LARGE,
        "the request body is cut off or larger than the server takes";
    /// The request's body came too slowly.
    REQUEST_TIMEOUT = "SYS.REQUEST_TIMEOUT", REQUEST_TIMEOUT,
        "the request body did not arrive in time";
    /// The body is not of the type the route takes.
    UNSUPPORTED_MEDIA_TYPE = "SYS.UNSUPPORTED_MEDIA_TYPE", UNSUPPORTED_MEDIA_TYPE,
        "the request body is not of the content type this route takes";
    /// A job UUID (`X-Job-UUID`) names another request's job.
    JOB_UUID_REUSED = "SYS.JOB_UUID_REUSED", CONFLICT,
        "the X-Job-UUID names a job of a different request; use a new one";
    /// The node restarted while the job ran; its changes were rolled back.
    JOB_INTERRUPTED = "SYS.JOB_INTERRUPTED", INTERNAL_SERVER_ERROR,
        "the management node restarted while the job ran; its changes were rolled back";
    /// The job was cancelled and what it had begun undone.
    JOB_CANCELLED = "SYS.JOB_CANCELLED", CONFLICT,
        "the job was cancelled (CancelApiJob); what it had begun was undone";
    /// The job to cancel has ended.
    JOB_NOT_RUNNING = "SYS.JOB_NOT_RUNNING", CONFLICT,
        "the job has ended; there is nothing to cancel";
    /// The job to cancel is of a kind that cannot stop half-way.
    JOB_NOT_CANCELLABLE = "SYS.JOB_NOT_CANCELLABLE", CONFLICT,
        "the job cannot be cancelled (only AddImage jobs can)";
    /// The job to cancel finished before it could be.
    JOB_NOT_CANCELLED = "SYS.JOB_NOT_CANCELLED", CONFLICT,
        "the job ended before it could be cancelled; GET it for its result";
    /// The job told to stop still runs.
    JOB_CANCEL_TIMEOUT = "SYS.JOB_CANCEL_TIMEOUT", GATEWAY_TIMEOUT,
        "the job was told to stop but still runs; GET it to follow it";
    /// No live session or API key.
    NOT_AUTHENTICATED = "ID.NOT_AUTHENTICATED", UNAUTHORIZED,
        "log in (PUT /v1/accounts/login) and send Authorization: OAuth <session uuid>";
    /// The session or API key has expired.
    SESSION_EXPIRED = "ID.SESSION_EXPIRED", UNAUTHORIZED,
        "the session or API key has expired; log in again or make a new key";
    /// The caller may not do this.
    PERMISSION_DENIED = "ID.PERMISSION_DENIED", FORBIDDEN,
        "the caller's account may not do this (the admin's infrastructure, or a shared resource)";
    /// The current password given is wrong.
    WRONG_PASSWORD = "ID.WRONG_PASSWORD", FORBIDDEN,
        "oldPassword is not the account's current password";
    /// Too soon after a failed login.
    LOGIN_THROTTLED = "ID.LOGIN_THROTTLED", TOO_MANY_REQUESTS,
        "too soon after a failed login; wait details.retryAfterMs";
    /// Locked after too many failed logins.
    LOGIN_LOCKED = "ID.LOGIN_LOCKED", TOO_MANY_REQUESTS,
        "locked after too many failed logins; wait details.retryAfterMs";
    /// An account with that name exists.
    ACCOUNT_EXISTS = "ID.ACCOUNT_EXISTS", CONFLICT,
        "an account with that name exists";
    /// The account still owns resources.
    ACCOUNT_IN_USE = "ID.ACCOUNT_IN_USE", CONFLICT,
        "the account owns resources; delete them first";
    /// The request would take the account over its quota.
    QUOTA_EXCEEDED = "ID.QUOTA_EXCEEDED", CONFLICT,
        "the account's quota does not fit this (details.quota, used, requested, limit); delete resources or ask the admin for more";
    /// The VM's state does not allow the operation.
    VM_INVALID_STATE = "VM.INVALID_STATE", CONFLICT,
        "the VM's state does not allow this operation (details.state, details.allowed)";
    /// No host can take the VM.
    NO_HOST = "HOST_ALLOCATION.NO_HOST", CONFLICT,
        "no host can take the VM (details.placementTrace says which filter left none)";
    /// The host's agent cannot be reached now.
    HOST_UNAVAILABLE = "HOST.UNAVAILABLE", SERVICE_UNAVAILABLE,
        "the host is not reachable now; try again once it reconnects";
    /// The host's agent tried and failed.
    HOST_OPERATION_FAILED = "HOST.OPERATION_FAILED", BAD_GATEWAY,
        "the host's agent tried and failed (details.agentCode; details.cause, for the admin, says what the hypervisor or tool said)";
    /// A host has no address in a VXLAN pool's VTEP network.
    NETWORK_NO_VTEP = "NETWORK.NO_VTEP", CONFLICT,
        "a host of a cluster the VXLAN pool is attached to has no address in the pool's vtepCidr (details.host); give it one there or change the pool";
    /// The provider does not make that service.
    NETWORK_SERVICE_NOT_IMPLEMENTED = "NETWORK.SERVICE_NOT_IMPLEMENTED", BAD_REQUEST,
        "the network service provider lists the service but Strato does not make it (details.service); use the Flat provider's DHCP, DNS, HostRoute, Userdata, Eip, PortForwarding or SNAT";
    /// The VIP, EIP, rule or NIC is taken.
    VIP_IN_USE = "NETWORK.VIP_IN_USE", CONFLICT,
        "the VIP, EIP, port forwarding rule or NIC is used by something else (the message says what); detach or delete that first";
    /// The volume's status does not allow the operation.
    VOLUME_INVALID_STATUS = "VOLUME.INVALID_STATUS", CONFLICT,
        "the data volume's status does not allow this operation (details.status); the message says what to do";
    /// The volume is attached elsewhere.
    VOLUME_IN_USE = "VOLUME.IN_USE", CONFLICT,
        "the data volume is attached to another VM (the message says which); detach it first";
    /// The host's local primary storage has no room.
    STORAGE_NO_ROOM = "VOLUME.NO_ROOM", CONFLICT,
        "the host's local primary storage has no room for the volume (details.hostUuid); expunge volumes there or use another host";
    /// No address is left on the L3 network.
    IP_EXHAUSTED = "L3.IP_EXHAUSTED", CONFLICT,
        "no free IP address is left on the L3 network; add an IP range or free addresses";
    /// An IP range is wrong.
    INVALID_IP_RANGE = "L3.INVALID_IP_RANGE", BAD_REQUEST,
        "the IP range is wrong (details.field names what)";
    /// The tag's slot on the resource is taken.
    TAG_DUPLICATE = "TAG.DUPLICATE", CONFLICT,
        "the resource already has this tag, or one in its slot; delete it first";
    /// A staticIp tag names an address the VM no longer can get.
    STATIC_IP_TOO_LATE = "TAG.STATIC_IP_TOO_LATE", CONFLICT,
        "a staticIp tag applies when the NIC is made (at creation)";
    /// An image could not be imported from its URL.
    IMAGE_DOWNLOAD_FAILED = "IMAGE.DOWNLOAD_FAILED", BAD_GATEWAY,
        "the image could not be imported from its URL (details.cause)";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed_once() {
        let mut names: Vec<&str> = ALL.iter().map(|c| c.name).collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "a code is listed twice");
        for code in ALL {
            let (area, name) = code.name.split_once('.').expect("AREA.NAME");
            assert!(
                area.chars()
                    .chain(name.chars())
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                code.name
            );
            assert!(!code.meaning.is_empty(), "{}", code.name);
        }
    }
}
