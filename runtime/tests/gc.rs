//! The garbage collector: merged duplicates, retries with backoff, event triggers, survival
//! across restarts, listing, panicking handlers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use strato_runtime::{
    BoxError, Event, EventMatcher, Gc, GcPolicy, GcRunResult, Runtime, RuntimeConfig, Trigger,
};
use strato_storage::Db;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Cleanup {
    volume: String,
}

#[derive(Clone, Debug)]
struct HostConnected {
    host: String,
}

impl Event for HostConnected {
    fn topic(&self) -> &'static str {
        "host.connected"
    }

    fn field(&self, name: &str) -> Option<String> {
        (name == "hostUuid").then(|| self.host.clone())
    }
}

fn policy(base_ms: u64, max_ms: u64) -> GcPolicy {
    GcPolicy {
        base_backoff: Duration::from_millis(base_ms),
        max_backoff: Duration::from_millis(max_ms),
        run_timeout: Duration::from_secs(5),
    }
}

fn start(db: Db, gc: GcPolicy) -> Runtime {
    Runtime::start(RuntimeConfig { arbiters: 2, gc, ..Default::default() }, db).unwrap()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < Duration::from_secs(10), "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn duplicates_merge_into_one_job() {
    let rt = start(Db::in_memory(), policy(10, 100));
    let gc = rt.gc();
    let first = gc
        .submit("delete-volume-v1", "volume", &Cleanup { volume: "v1".into() }, Trigger::default())
        .await
        .unwrap();
    let second = gc
        .submit(
            "delete-volume-v1",
            "volume",
            &Cleanup { volume: "v1-newer".into() },
            Trigger::every(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    assert_eq!(first, second);
    let jobs = gc.list().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].merged, 1);
    assert_eq!(jobs[0].trigger.every, Some(Duration::from_secs(60)));
    // The merged job carries the newer context.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    gc.register_handler("volume", move |c: Cleanup| {
        let seen = seen2.clone();
        async move {
            seen.lock().unwrap().push(c.volume);
            Ok::<(), BoxError>(())
        }
    });
    assert_eq!(gc.run_now(first).await.unwrap(), GcRunResult::Done);
    assert_eq!(*seen.lock().unwrap(), ["v1-newer"]);
    assert!(gc.list().unwrap().is_empty());
    rt.shutdown();
}

#[tokio::test]
async fn failed_runs_retry_with_backoff_and_are_listed_until_success() {
    let rt = start(Db::in_memory(), policy(40, 80));
    let gc = rt.gc();
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    gc.register_handler("flaky", move |_: Cleanup| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move { if n < 4 { Err(format!("agent unreachable (try {n})").into()) } else { Ok(()) } }
    });
    let started = Instant::now();
    gc.start().unwrap();
    gc.submit("flaky-1", "flaky", &Cleanup { volume: "v".into() }, Trigger::default())
        .await
        .unwrap();
    // While it fails, the listing shows attempts, the next run and the last error.
    eventually("two failed attempts", || {
        gc.list().unwrap().first().is_some_and(|job| job.attempts >= 2)
    })
    .await;
    let job = gc.list().unwrap().remove(0);
    assert!(job.last_error.as_deref().unwrap().contains("agent unreachable"));
    assert!(job.next_run_unix_ms > job.last_run_unix_ms.unwrap());
    eventually("job removed after success", || gc.list().unwrap().is_empty()).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
    // Backoff 40 + 80 + 80 ms (capped) separates the four attempts.
    assert!(started.elapsed() >= Duration::from_millis(200));
    rt.shutdown();
}

#[tokio::test]
async fn event_triggers_run_matching_jobs() {
    // A long backoff: after the first failure, only the event can make it run again soon.
    let rt = start(Db::in_memory(), policy(600_000, 600_000));
    let gc = rt.gc();
    let reachable = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicU32::new(0));
    let (flag, count) = (reachable.clone(), runs.clone());
    gc.register_handler("on-host", move |_: Cleanup| {
        count.fetch_add(1, Ordering::SeqCst);
        let ok = flag.load(Ordering::SeqCst);
        async move { if ok { Ok(()) } else { Err("host h1 is disconnected".into()) } }
    });
    gc.start().unwrap();
    gc.submit(
        "cleanup-on-h1",
        "on-host",
        &Cleanup { volume: "v".into() },
        Trigger::on_event(EventMatcher::topic("host.connected").field("hostUuid", "h1")),
    )
    .await
    .unwrap();
    eventually("first attempt failed", || {
        gc.list().unwrap().first().is_some_and(|j| j.attempts == 1)
    })
    .await;
    // An event for another host does not match.
    rt.events().publish(HostConnected { host: "h2".into() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    reachable.store(true, Ordering::SeqCst);
    rt.events().publish(HostConnected { host: "h1".into() });
    eventually("job ran on the event and is gone", || gc.list().unwrap().is_empty()).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    rt.shutdown();
}

#[tokio::test]
async fn jobs_survive_a_restart_and_run_once_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    {
        let rt = start(Db::open_sled(dir.path()).unwrap(), policy(600_000, 600_000));
        let gc = rt.gc();
        gc.register_handler("later", |_: Cleanup| async { Err::<(), BoxError>("not yet".into()) });
        gc.start().unwrap();
        gc.submit("survivor", "later", &Cleanup { volume: "v9".into() }, Trigger::default())
            .await
            .unwrap();
        eventually("failed once", || gc.list().unwrap()[0].attempts == 1).await;
        rt.shutdown();
    }
    let rt = start(Db::open_sled(dir.path()).unwrap(), policy(600_000, 600_000));
    let gc = rt.gc();
    let listed = gc.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].name.as_str(), listed[0].attempts), ("survivor", 1));
    assert_eq!(listed[0].last_error.as_deref(), Some("not yet"));
    let ran = Arc::new(std::sync::Mutex::new(None));
    let ran2 = ran.clone();
    gc.register_handler("later", move |c: Cleanup| {
        *ran2.lock().unwrap() = Some(c.volume);
        async { Ok::<(), BoxError>(()) }
    });
    // Its next run is ten minutes away, but startup runs every job once.
    gc.start().unwrap();
    eventually("ran at startup", || gc.list().unwrap().is_empty()).await;
    assert_eq!(ran.lock().unwrap().as_deref(), Some("v9"));
    rt.shutdown();
}

#[tokio::test]
async fn a_panicking_handler_is_contained_and_retried() {
    let rt = start(Db::in_memory(), policy(20, 40));
    let gc = rt.gc();
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    gc.register_handler("panicky", move |_: Cleanup| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                panic!("handler bug");
            }
            Ok::<(), BoxError>(())
        }
    });
    gc.start().unwrap();
    gc.submit("p", "panicky", &Cleanup { volume: "v".into() }, Trigger::default()).await.unwrap();
    eventually("retried after the panic", || gc.list().unwrap().is_empty()).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let id = Gc::job_id("p");
    assert!(gc.cancel(id).await.is_ok_and(|existed| !existed));
    rt.shutdown();
}

#[tokio::test]
async fn cancel_removes_a_job_without_running_it() {
    let rt = start(Db::in_memory(), policy(20, 40));
    let gc = rt.gc();
    let id = gc
        .submit("doomed", "none", &Cleanup { volume: "v".into() }, Trigger::default())
        .await
        .unwrap();
    assert!(gc.cancel(id).await.unwrap());
    assert!(gc.list().unwrap().is_empty());
    assert_eq!(gc.run_now(id).await.unwrap(), GcRunResult::Gone);
    rt.shutdown();
}
