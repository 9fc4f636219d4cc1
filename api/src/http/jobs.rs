//! Jobs: following one (`GET /v1/api-jobs/{uuid}`, waiting for its end with
//! `waitSeconds`), cancelling an import, and the garbage collector's jobs.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, put};
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::{Answer, Api, Body, Method, actions};
use super::{Id, Shared, accepted, action, job_header};
use crate::auth;
use crate::error::ApiError;
use crate::jobs::{self, JobRecord, JobState};
use crate::mn::Mn;
use crate::types::actions::JobAction;

/// The area's APIs.
pub(super) fn apis() -> Vec<Api> {
    let mut apis = vec![Api::new(
        "GetJob",
        Method::Get,
        "/v1/api-jobs/{uuid}",
        Body::None,
        Answer::Immediate,
        "A job: 202 while it runs, then its result; waitSeconds=N waits for its end",
        || get(job),
    )];
    apis.extend(actions::<JobAction>("/v1/api-jobs/{uuid}/actions", job_actions));
    apis.push(Api::new(
        "QueryGCJob",
        Method::Get,
        "/v1/gc-jobs",
        Body::None,
        Answer::Immediate,
        "The garbage collector's jobs (admin)",
        || get(gc_jobs),
    ));
    apis
}

fn job_actions() -> MethodRouter<Arc<Mn>> {
    put(job_action)
}

/// `GET /v1/api-jobs/{uuid}`'s query: `waitSeconds` holds the answer until the job ends or
/// that many seconds pass (at most [`jobs::MAX_WAIT`]).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobQuery {
    wait_seconds: Option<String>,
}

fn job_wait(query: &JobQuery) -> Result<Duration, ApiError> {
    let Some(text) = &query.wait_seconds else { return Ok(Duration::ZERO) };
    let max = jobs::MAX_WAIT.as_secs();
    match text.parse::<u64>() {
        Ok(seconds) if seconds <= max => Ok(Duration::from_secs(seconds)),
        _ => Err(ApiError::invalid(
            "waitSeconds",
            format!("`{text}` is not a whole number of seconds from 0 to {max}"),
        )),
    }
}

async fn job(
    State(mn): Shared,
    Id(uuid): Id,
    Query(query): Query<JobQuery>,
) -> Result<Response, ApiError> {
    let wait = job_wait(&query)?;
    let account = auth::caller().map_or(strato_actors::owners::ADMIN, |c| c.account);
    let job: JobRecord = mn
        .jobs
        .wait(account, uuid, wait)
        .await?
        .ok_or_else(|| ApiError::not_found("ApiJob", uuid))?;
    Ok(match job.state {
        JobState::Running => {
            (StatusCode::ACCEPTED, Json(json!({ "state": "Running" }))).into_response()
        }
        JobState::Succeeded => {
            let inventory: Value = job
                .result
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok())
                .unwrap_or(Value::Null);
            (StatusCode::OK, Json(json!({ "inventory": inventory }))).into_response()
        }
        JobState::Failed => {
            let error = job
                .error_body()
                .unwrap_or_else(|| json!({ "error": { "code": crate::codes::INTERNAL.name } }));
            (StatusCode::OK, Json(error)).into_response()
        }
    })
}

/// How long `CancelApiJob` waits for the job it cancels to end.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

/// `PUT /v1/api-jobs/{uuid}/actions` `{"cancelApiJob": {}}`: cancels one of the caller's
/// running jobs, when it is one that can stop cleanly (an image import). The cancel is a job
/// of its own: it succeeds once the cancelled job has ended `SYS.JOB_CANCELLED`, and fails
/// `SYS.JOB_NOT_CANCELLED` when that job finished first.
async fn job_action(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (JobAction::CancelApiJob(_), keyed) = action::<JobAction>(&body, uuid)?;
    let account = auth::caller().map_or(strato_actors::owners::ADMIN, |c| c.account);
    let job: JobRecord =
        mn.jobs.find(account, uuid)?.ok_or_else(|| ApiError::not_found("ApiJob", uuid))?;
    if job.state != JobState::Running {
        return Err(ApiError::of(
            crate::codes::JOB_NOT_RUNNING,
            format!("job {uuid} ({}) has ended; there is nothing to cancel", job.api),
        ));
    }
    let token = mn.jobs.cancel_token(account, uuid).ok_or_else(|| {
        ApiError::of(
            crate::codes::JOB_NOT_CANCELLABLE,
            format!(
                "job {uuid} is a {} job, which cannot be cancelled; AddImage jobs can",
                job.api
            ),
        )
    })?;
    let m = mn.clone();
    let cancel = mn
        .jobs
        .submit(job_header(&headers)?, "CancelApiJob", &keyed, move |_| async move {
            token.cancel();
            let now = m
                .jobs
                .wait(account, uuid, CANCEL_WAIT)
                .await?
                .ok_or_else(|| ApiError::not_found("ApiJob", uuid))?;
            let code =
                now.error_body().and_then(|e| e["error"]["code"].as_str().map(str::to_owned));
            match now.state {
                JobState::Running => Err(ApiError::new(
                    crate::codes::JOB_CANCEL_TIMEOUT,
                    format!(
                        "job {uuid} was told to stop but still runs after {} s",
                        CANCEL_WAIT.as_secs()
                    ),
                    Value::Null,
                )),
                JobState::Failed if code.as_deref() == Some(crate::codes::JOB_CANCELLED.name) => {
                    Ok(json!({ "uuid": uuid, "api": now.api, "state": "Cancelled" }))
                }
                JobState::Succeeded | JobState::Failed => Err(ApiError::of(
                    crate::codes::JOB_NOT_CANCELLED,
                    format!("job {uuid} ended before it could be cancelled; GET it for its result"),
                )),
            }
        })
        .await?;
    Ok(accepted(&mn, cancel))
}

/// The garbage collector's jobs: what is left to clean up, with attempts, next run and
/// last error.
async fn gc_jobs(State(mn): Shared) -> Result<Json<Value>, ApiError> {
    let jobs = mn.runtime.gc().list()?;
    Ok(Json(json!({ "inventories": jobs })))
}
