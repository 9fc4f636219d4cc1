//! API jobs: every mutation is a job, persisted before the client hears `202`.
//!
//! A job has a UUID (the client's `X-Job-UUID`, or a new one), the account that submitted
//! it, the API name and a hash of the request body. Submitting the same UUID with the same
//! body returns the same job; with a different body it is a `409`.
//!
//! A job UUID is an idempotency key, and the client chooses it, so it is the caller's own:
//! the record is stored under a key derived from the account and the UUID ([`key`]), in the
//! jobs' own table, and nothing else (no owner record, no resource) is ever keyed by it. Two
//! accounts using the same UUID have two jobs, neither sees the other's, and naming another
//! resource's UUID as a job UUID touches nothing but a job. The job runs on a task; its record ends `Succeeded` with the
//! inventory or `Failed` with the error. At startup, jobs left `Running` by a previous process
//! end `Failed` (their flows having been rolled back by the flow recovery pass), so every
//! accepted job reaches a terminal state.
//!
//! A job whose work can stop cleanly at any moment (an image import) is submitted as
//! cancellable: its work watches a [`CancellationToken`] that `CancelApiJob` fires, and it
//! ends `Failed` with `SYS.JOB_CANCELLED` once it has undone what it began. Other jobs are
//! not cancellable: a VM flow stopped half-way is what its rollback exists for, not something
//! to start on a caller's whim. The tokens live in this process only ([`Jobs`]); a job a
//! previous process left running has already ended at recovery.
//!
//! A caller may wait for a job's end in its `GET` (`waitSeconds`, at most [`MAX_WAIT`]): the
//! job's task wakes the waiters once its end is stored. Polling instead cost the load run
//! most of its CPU (some sixty requests per VM on fresh connections, see BENCHMARKS.md).

use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use strato_storage::{Batch, Db, Expect, Record, StoreError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::ApiError;

/// Where a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum JobState {
    /// Running.
    Running,
    /// Done; `result` holds the inventory.
    Succeeded,
    /// Failed; `error` holds the error.
    Failed,
}

/// A persisted job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Its UUID, as the client knows it.
    pub uuid: Uuid,
    /// The account that submitted it.
    pub account: Uuid,
    /// The API call (`CreateVmInstance`, ...).
    pub api: String,
    /// A hash of the request body, to tell a repeat from a different request.
    pub body_hash: u64,
    /// Where it stands.
    pub state: JobState,
    /// The inventory, as JSON text.
    pub result: Option<String>,
    /// The error, as JSON text (with its HTTP status).
    pub error: Option<(u16, String)>,
    /// The resource the job creates, when known up front: after a crash, recovery looks at
    /// it to tell a creation that completed from one that was rolled back.
    pub resource: Option<Uuid>,
}

impl JobRecord {
    /// The error a failed job answers (`{"error": {...}}`), when it has one.
    pub fn error_body(&self) -> Option<Value> {
        self.error.as_ref().and_then(|(_, e)| serde_json::from_str(e).ok())
    }
}

impl Record for JobRecord {
    const KIND: &'static str = "api-job";
    const VERSION: u16 = 2;

    fn id(&self) -> Uuid {
        key(self.account, self.uuid)
    }
}

/// The namespace of job keys (a fixed random UUID).
const JOB_KEYS: Uuid = Uuid::from_u128(0x8f0e_63a4_5d2c_4f8e_9b71_2c3d_4e5f_6a7b);

/// Where `account`'s job `job` is stored.
pub fn key(account: Uuid, job: Uuid) -> Uuid {
    Uuid::new_v5(&JOB_KEYS, &[*account.as_bytes(), *job.as_bytes()].concat())
}

/// The account whose request is being served (the admin's for the MN's own work).
fn submitter() -> Uuid {
    crate::auth::caller().map_or(strato_actors::owners::ADMIN, |c| c.account)
}

/// The longest a caller may wait for a job's end in one request ([`Jobs::wait`]).
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// This node's jobs: their records in the store, and the ones running in this process, so
/// that `CancelApiJob` can fire a cancellable one's token and a caller waiting for a job's
/// end (`GET /v1/api-jobs/{uuid}?waitSeconds=N`) wakes the moment it is recorded rather than
/// polling for it.
#[derive(Clone, Debug)]
pub struct Jobs {
    db: Db,
    running: Arc<Mutex<HashMap<Uuid, Running>>>,
    ended: Arc<Mutex<std::collections::BTreeMap<(String, JobState), u64>>>,
}

/// A job running in this process, by job key ([`key`]).
#[derive(Debug)]
struct Running {
    /// Fired by `CancelApiJob`; only jobs submitted as cancellable have one.
    cancel: Option<CancellationToken>,
    /// Set once the job's end is in the store.
    ended: watch::Sender<bool>,
}

impl Jobs {
    /// The jobs kept in `db`.
    pub fn new(db: Db) -> Jobs {
        Jobs { db, running: Default::default(), ended: Default::default() }
    }

    /// `account`'s job `job`, if it has one.
    pub fn find(&self, account: Uuid, job: Uuid) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.db.get::<JobRecord>(key(account, job))?.map(|s| s.record))
    }

    /// `account`'s job `job` once it has ended, or as it stands after `timeout`.
    pub async fn wait(
        &self,
        account: Uuid,
        job: Uuid,
        timeout: Duration,
    ) -> Result<Option<JobRecord>, StoreError> {
        // Subscribed before the record is read: a job that ends in between has set `ended`
        // (it is set after the end is stored), so its end is never missed.
        let ended = self.lock().get(&key(account, job)).map(|r| r.ended.subscribe());
        let found = self.find(account, job)?;
        let (Some(record), Some(mut ended)) = (&found, ended) else { return Ok(found) };
        if record.state != JobState::Running || timeout.is_zero() {
            return Ok(found);
        }
        // An error means the job's task is gone without an end (the process is stopping):
        // the record read next says where it stands either way.
        let _ = tokio::time::timeout(timeout, ended.wait_for(|ended| *ended)).await;
        self.find(account, job)
    }

    /// How many jobs have ended in this process, by API and end state (for `/metrics`).
    pub fn ended(&self) -> Vec<(String, JobState, u64)> {
        let ended = self.ended.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        ended.iter().map(|((api, state), n)| (api.clone(), *state, *n)).collect()
    }

    /// The token of `account`'s running job `job`, if that job can be cancelled.
    pub fn cancel_token(&self, account: Uuid, job: Uuid) -> Option<CancellationToken> {
        self.lock().get(&key(account, job)).and_then(|r| r.cancel.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Running>> {
        // The map holds no invariant a panicking holder could break.
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Accepts a job: persists it and starts `work` on a task, or finds the earlier job with
    /// the same UUID. Returns the job's UUID.
    pub async fn submit<W, Fut>(
        &self,
        job_id: Option<Uuid>,
        api: &str,
        body: &Value,
        work: W,
    ) -> Result<Uuid, ApiError>
    where
        W: FnOnce(Uuid) -> Fut,
        Fut: Future<Output = Result<Value, ApiError>> + Send + 'static,
    {
        self.submit_for(job_id, api, body, None, work).await
    }

    /// [`Jobs::submit`] for a job that `CancelApiJob` may cancel: `work` gets the token it
    /// must watch, and must leave nothing behind when it fires.
    pub async fn submit_cancellable<W, Fut>(
        &self,
        job_id: Option<Uuid>,
        api: &str,
        body: &Value,
        work: W,
    ) -> Result<Uuid, ApiError>
    where
        W: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<Value, ApiError>> + Send + 'static,
    {
        let submission = Submission { job_id, api, body, resource: None };
        self.accept(submission, true, |_, token| work(token)).await
    }

    /// [`Jobs::submit`] for a job that creates `resource`: after a crash, recovery looks at
    /// it to tell a creation that completed from one that was rolled back.
    pub async fn submit_for<W, Fut>(
        &self,
        job_id: Option<Uuid>,
        api: &str,
        body: &Value,
        resource: Option<Uuid>,
        work: W,
    ) -> Result<Uuid, ApiError>
    where
        W: FnOnce(Uuid) -> Fut,
        Fut: Future<Output = Result<Value, ApiError>> + Send + 'static,
    {
        let submission = Submission { job_id, api, body, resource };
        self.accept(submission, false, |job, _| work(job)).await
    }

    /// Persists a job and starts it, with a token `CancelApiJob` can fire when `cancellable`.
    async fn accept<W, Fut>(
        &self,
        submission: Submission<'_>,
        cancellable: bool,
        work: W,
    ) -> Result<Uuid, ApiError>
    where
        W: FnOnce(Uuid, CancellationToken) -> Fut,
        Fut: Future<Output = Result<Value, ApiError>> + Send + 'static,
    {
        let Submission { job_id, api, body, resource } = submission;
        let uuid = job_id.unwrap_or_else(Uuid::new_v4);
        let account = submitter();
        let job_key = key(account, uuid);
        let body_hash = hash_of(api, body);
        let record = JobRecord {
            uuid,
            account,
            api: api.to_owned(),
            body_hash,
            state: JobState::Running,
            result: None,
            error: None,
            resource,
        };
        let mut batch = Batch::new();
        batch.put(&record, Expect::Absent)?;
        // Registered before the job is stored, so a cancel or a wait never finds it running
        // and unknown; a repeat of a running job leaves that job's entry alone.
        let token = CancellationToken::new();
        let registered = {
            let mut running = self.lock();
            let vacant = !running.contains_key(&job_key);
            if vacant {
                let cancel = cancellable.then(|| token.clone());
                running.insert(job_key, Running { cancel, ended: watch::channel(false).0 });
            }
            vacant
        };
        let committed = self.db.commit(batch).await;
        if committed.is_err() && registered {
            self.lock().remove(&job_key);
        }
        match committed {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => {
                let Some(existing) = self.find(account, uuid)? else {
                    // The job is new: what conflicted is the resource it creates.
                    return Err(ApiError::of(
                        crate::codes::RESOURCE_EXISTS,
                        "the resource this request creates exists already; send the request again",
                    ));
                };
                if existing.api == api && existing.body_hash == body_hash {
                    return Ok(uuid);
                }
                return Err(ApiError::new(
                    crate::codes::JOB_UUID_REUSED,
                    format!(
                        "job {uuid} already exists for a different request; use a new X-Job-UUID"
                    ),
                    json!({ "jobUuid": uuid }),
                ));
            }
            Err(error) => return Err(error.into()),
        }
        tracing::info!(job = %uuid, api, "job accepted");
        let work = work(uuid, token);
        let jobs = self.clone();
        let api = api.to_owned();
        // One span per job: what the job's task logs, and the actor operations it starts
        // (which carry the job id to the agents), name it.
        let span = tracing::info_span!("job", job = %uuid, api = %api);
        let task = async move {
            // Work outside an actor's queue (a detached volume's, say) that panics still
            // ends its job, as an operation in a queue does, rather than leaving it Running.
            let outcome = match futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(work))
                .await
            {
                Ok(outcome) => outcome,
                Err(_) => {
                    tracing::error!(job = %uuid, %api, "the job's work panicked");
                    Err(ApiError::new(
                        crate::codes::OPERATION_PANICKED,
                        "the operation stopped on a bug (it panicked); the request may be sent again",
                        serde_json::Value::Null,
                    ))
                }
            };
            let (state, result, error) = match outcome {
                Ok(inventory) => (JobState::Succeeded, Some(inventory.to_string()), None),
                Err(error) => {
                    tracing::warn!(job = %uuid, %api, code = %error.code, description = %error.description, "job failed");
                    (
                        JobState::Failed,
                        None,
                        Some((error.status.as_u16(), error.body().to_string())),
                    )
                }
            };
            let done = JobRecord {
                uuid,
                account,
                api: api.clone(),
                body_hash,
                state,
                result,
                error,
                resource,
            };
            let mut batch = Batch::new();
            if batch.put(&done, Expect::Any).is_ok()
                && let Err(error) = jobs.db.commit(batch).await
            {
                tracing::error!(job = %uuid, error = %strato_runtime::error_chain(&error), "could not record the job's end");
            }
            if registered && let Some(running) = jobs.lock().remove(&job_key) {
                running.ended.send_replace(true);
            }
            *jobs
                .ended
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry((api.clone(), state))
                .or_default() += 1;
            tracing::info!(job = %uuid, %api, ?state, "job finished");
        };
        tokio::spawn(tracing::Instrument::instrument(task, span));
        Ok(uuid)
    }
}

/// The error a cancelled job ends with.
pub fn cancelled() -> ApiError {
    ApiError::new(
        crate::codes::JOB_CANCELLED,
        "the job was cancelled (CancelApiJob); what it had begun was undone",
        Value::Null,
    )
}

fn hash_of(api: &str, body: &Value) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    api.hash(&mut hasher);
    body.to_string().hash(&mut hasher);
    hasher.finish()
}

/// What a caller submitted.
struct Submission<'a> {
    job_id: Option<Uuid>,
    api: &'a str,
    body: &'a Value,
    resource: Option<Uuid>,
}

/// Ends every job a previous process left running: `Succeeded` when `completed` finds the
/// resource it created (its flow had finished), `Failed` otherwise (its flow was rolled back).
pub async fn recover(
    db: &Db,
    completed: impl Fn(&JobRecord) -> Option<Value>,
) -> Result<usize, StoreError> {
    let mut ended = 0;
    let running: Vec<JobRecord> = db
        .scan::<JobRecord>()
        .filter_map(|r| r.ok())
        .map(|s| s.record)
        .filter(|j| j.state == JobState::Running)
        .collect();
    for mut job in running {
        if let Some(inventory) = completed(&job) {
            job.state = JobState::Succeeded;
            job.result = Some(inventory.to_string());
            let mut batch = Batch::new();
            batch.put(&job, Expect::Any)?;
            db.commit(batch).await?;
            ended += 1;
            continue;
        }
        let error = ApiError::new(
            crate::codes::JOB_INTERRUPTED,
            "the management node restarted while this job ran; its changes were rolled back",
            Value::Null,
        );
        job.state = JobState::Failed;
        job.error = Some((error.status.as_u16(), error.body().to_string()));
        let mut batch = Batch::new();
        batch.put(&job, Expect::Any)?;
        db.commit(batch).await?;
        ended += 1;
    }
    Ok(ended)
}
