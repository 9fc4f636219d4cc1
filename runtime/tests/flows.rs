//! The flow engine: reverse rollback, failing rollbacks, extension points, persisted
//! progress, and recovery after SIGKILL of a real child process.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use strato_runtime::{BoxError, ChainSpec, FlowInfo, Runtime, RuntimeConfig, RuntimeError, Step};
use strato_storage::Db;
use tokio::sync::Notify;

mod common;
use common::Counter;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Ctx {
    visited: Vec<String>,
}

type Log = Arc<Mutex<Vec<String>>>;

/// A step that logs `run:<name>` / `rollback:<name>` and can be told to fail either.
/// A step's refusal, as a type of its own: the flow's caller gets it back by that type.
#[derive(Debug, thiserror::Error)]
#[error("{0} refused")]
struct Refused(String);

struct Probe {
    log: Log,
    fail_run: bool,
    fail_rollback: bool,
    gate: Option<Arc<Notify>>,
}

impl Probe {
    fn ok(log: &Log) -> Self {
        Probe { log: log.clone(), fail_run: false, fail_rollback: false, gate: None }
    }
}

#[async_trait]
impl Step<Ctx> for Probe {
    async fn run(&self, ctx: &mut Ctx, flow: &FlowInfo) -> Result<(), BoxError> {
        self.log.lock().unwrap().push(format!("run:{}", flow.step));
        ctx.visited.push(flow.step.clone());
        if let Some(gate) = &self.gate {
            gate.notified().await;
        }
        if self.fail_run {
            return Err(Box::new(Refused(flow.step.clone())));
        }
        Ok(())
    }

    async fn rollback(&self, _ctx: &mut Ctx, flow: &FlowInfo) -> Result<(), BoxError> {
        self.log.lock().unwrap().push(format!("rollback:{}", flow.step));
        if self.fail_rollback {
            return Err(format!("{} cannot be undone", flow.step).into());
        }
        Ok(())
    }
}

fn runtime() -> Runtime {
    Runtime::start(RuntimeConfig { arbiters: 1, ..Default::default() }, Db::in_memory()).unwrap()
}

fn log_of(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

#[tokio::test]
async fn a_chain_runs_every_step_in_order_and_leaves_no_record() {
    let rt = runtime();
    let log = Log::default();
    rt.flows().define(
        ChainSpec::new("ok")
            .step("a", Probe::ok(&log))
            .step("b", Probe::ok(&log))
            .step("c", Probe::ok(&log)),
    );
    let before = rt.db().group_count();
    let ctx = rt.flows().run("ok", Ctx::default(), None).await.unwrap();
    assert_eq!(ctx.visited, ["a", "b", "c"]);
    assert_eq!(log_of(&log), ["run:a", "run:b", "run:c"]);
    // One durable write between two steps: "a started", "a done and b started", "b done and
    // c started", and the record's removal (a checkpoint per step ended and another per step
    // started would be seven).
    assert_eq!(rt.db().group_count() - before, 4);
    assert!(rt.flows().in_progress().unwrap().is_empty());
    assert_eq!(rt.flows().recent().last().unwrap().phase, "done");
    rt.shutdown();
}

/// A step that writes counter `id` (which must not exist) with its end, and logs.
struct EndWriter {
    log: Log,
    id: uuid::Uuid,
}

#[async_trait]
impl Step<Ctx> for EndWriter {
    async fn run(&self, _ctx: &mut Ctx, flow: &FlowInfo) -> Result<(), BoxError> {
        self.log.lock().unwrap().push(format!("run:{}", flow.step));
        let mut batch = strato_storage::Batch::new();
        batch.put(&Counter { id: self.id, value: 1 }, strato_storage::Expect::Absent)?;
        flow.write_at_end(batch);
        Ok(())
    }

    async fn rollback(&self, _ctx: &mut Ctx, flow: &FlowInfo) -> Result<(), BoxError> {
        self.log.lock().unwrap().push(format!("rollback:{}", flow.step));
        Ok(())
    }
}

/// Defines chain `name`: step a writes counter `a` at its end, then step b counter `b`.
fn define_writers(rt: &Runtime, name: &str, log: &Log, a: uuid::Uuid, b: uuid::Uuid) {
    rt.flows().define(
        ChainSpec::new(name)
            .step("a", EndWriter { log: log.clone(), id: a })
            .step("b", EndWriter { log: log.clone(), id: b }),
    );
}

async fn put_counter(rt: &Runtime, id: uuid::Uuid) {
    let mut batch = strato_storage::Batch::new();
    batch.put(&Counter { id, value: 7 }, strato_storage::Expect::Absent).unwrap();
    rt.db().commit(batch).await.unwrap();
}

#[tokio::test]
async fn a_steps_end_writes_go_with_its_checkpoint_and_a_failed_one_rolls_it_back() {
    let rt = runtime();
    let log = Log::default();
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    define_writers(&rt, "writes", &log, a, b);
    let before = rt.db().group_count();
    rt.flows().run("writes", Ctx::default(), None).await.unwrap();
    // "a started"; "a's writes, a done, b started"; "b's writes and the record's removal".
    assert_eq!(rt.db().group_count() - before, 3);
    assert_eq!(rt.db().get::<Counter>(a).unwrap().unwrap().record.value, 1);
    assert_eq!(rt.db().get::<Counter>(b).unwrap().unwrap().record.value, 1);

    // One step's end writes conflict: that step is rolled back with those before it (and
    // when it is the first, the second never runs).
    for (conflicting, expected) in
        [(0, vec!["run:a", "rollback:a"]), (1, vec!["run:a", "run:b", "rollback:b", "rollback:a"])]
    {
        log.lock().unwrap().clear();
        let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let name = format!("conflict-{conflicting}");
        define_writers(&rt, &name, &log, a, b);
        put_counter(&rt, [a, b][conflicting]).await;
        let error = rt.flows().run(&name, Ctx::default(), None).await.unwrap_err();
        let RuntimeError::FlowFailed { step, message, cause, .. } = error else {
            panic!("not a flow failure: {error:?}")
        };
        assert_eq!(step, ["a", "b"][conflicting]);
        assert!(message.contains("the step's end could not be saved"), "{message}");
        let conflict = cause.as_ref().and_then(|c| c.downcast_ref::<RuntimeError>());
        assert!(
            matches!(conflict, Some(RuntimeError::Store(e)) if matches!(**e, strato_storage::StoreError::Conflict { .. })),
            "{cause:?}"
        );
        assert_eq!(log_of(&log), expected);
        // Nothing of the failed step's end was written; the other record is as it was.
        let untouched = [b, a][conflicting];
        assert_eq!(
            rt.db().get::<Counter>(untouched).unwrap().map(|s| s.record.value),
            match conflicting {
                0 => None,
                _ => Some(1),
            }
        );
        assert!(rt.flows().in_progress().unwrap().is_empty());
    }
    rt.shutdown();
}

#[tokio::test]
async fn a_failing_step_rolls_back_itself_and_every_completed_step_in_reverse() {
    let rt = runtime();
    let log = Log::default();
    rt.flows().define(
        ChainSpec::new("fails")
            .step("a", Probe::ok(&log))
            .step("b", Probe::ok(&log))
            .step("c", Probe { fail_run: true, ..Probe::ok(&log) })
            .step("d", Probe::ok(&log)),
    );
    let error = rt.flows().run("fails", Ctx::default(), None).await.unwrap_err();
    match &error {
        RuntimeError::FlowFailed { chain, step, message, rollback_failures, cause } => {
            assert_eq!((chain.as_str(), step.as_str()), ("fails", "c"));
            assert!(message.contains("c refused"));
            assert!(rollback_failures.is_empty());
            // The step's error keeps its type through the flow: no text to parse.
            let refused = cause.as_ref().and_then(|c| c.downcast_ref::<Refused>());
            assert_eq!(refused.map(|r| r.0.as_str()), Some("c"));
        }
        other => panic!("expected FlowFailed, got {other:?}"),
    }
    assert_eq!(log_of(&log), ["run:a", "run:b", "run:c", "rollback:c", "rollback:b", "rollback:a"]);
    let recent = rt.flows().recent();
    let last = recent.last().unwrap();
    assert_eq!(last.phase, "rolled-back");
    assert_eq!(last.failure.as_ref().unwrap().0, "c");
    rt.shutdown();
}

#[tokio::test]
async fn a_failing_rollback_is_recorded_and_the_rest_still_roll_back() {
    let rt = runtime();
    let log = Log::default();
    rt.flows().define(
        ChainSpec::new("messy")
            .step("a", Probe::ok(&log))
            .step("b", Probe { fail_rollback: true, ..Probe::ok(&log) })
            .step("c", Probe { fail_run: true, ..Probe::ok(&log) }),
    );
    let error = rt.flows().run("messy", Ctx::default(), None).await.unwrap_err();
    let RuntimeError::FlowFailed { rollback_failures, .. } = &error else { panic!("{error:?}") };
    assert_eq!(rollback_failures.len(), 1);
    assert!(rollback_failures[0].starts_with("b: b cannot be undone"));
    assert!(error.to_string().contains("rollback also failed"));
    // A failing rollback is tried several times before it is given up.
    let tries = log_of(&log).iter().filter(|l| *l == "rollback:b").count();
    assert_eq!(tries, 6);
    assert_eq!(log_of(&log).last().unwrap(), "rollback:a");
    rt.shutdown();
}

/// A step whose undo fails the first `failures` times, as one whose actor panicked or whose
/// store write failed a moment ago.
struct FlakyUndo {
    log: Log,
    failures: Mutex<u32>,
}

#[async_trait]
impl Step<Ctx> for FlakyUndo {
    async fn run(&self, _ctx: &mut Ctx, flow: &FlowInfo) -> Result<(), BoxError> {
        self.log.lock().unwrap().push(format!("run:{}", flow.step));
        Ok(())
    }

    async fn rollback(&self, _ctx: &mut Ctx, flow: &FlowInfo) -> Result<(), BoxError> {
        self.log.lock().unwrap().push(format!("rollback:{}", flow.step));
        let mut failures = self.failures.lock().unwrap();
        if *failures > 0 {
            *failures -= 1;
            return Err("not now".into());
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_rollback_that_fails_for_a_moment_is_tried_again_and_leaves_nothing() {
    let rt = runtime();
    let log = Log::default();
    rt.flows().define(
        ChainSpec::new("flaky")
            .step("a", FlakyUndo { log: log.clone(), failures: Mutex::new(2) })
            .step("b", Probe { fail_run: true, ..Probe::ok(&log) }),
    );
    let error = rt.flows().run("flaky", Ctx::default(), None).await.unwrap_err();
    let RuntimeError::FlowFailed { rollback_failures, .. } = &error else { panic!("{error:?}") };
    assert!(rollback_failures.is_empty(), "{rollback_failures:?}");
    assert_eq!(
        log_of(&log),
        ["run:a", "run:b", "rollback:b", "rollback:a", "rollback:a", "rollback:a"]
    );
    rt.shutdown();
}

#[tokio::test]
async fn other_modules_insert_steps_before_and_after_named_steps() {
    let rt = runtime();
    let log = Log::default();
    rt.flows().define(ChainSpec::new("ext").step("a", Probe::ok(&log)).step("b", Probe::ok(&log)));
    rt.flows().insert_before::<Ctx>("ext", "b", "before-b", Probe::ok(&log)).unwrap();
    rt.flows().insert_after::<Ctx>("ext", "b", "after-b", Probe::ok(&log)).unwrap();
    rt.flows().insert_before::<Ctx>("ext", "a", "first", Probe::ok(&log)).unwrap();
    assert_eq!(
        rt.flows().steps_of::<Ctx>("ext").unwrap(),
        ["first", "a", "before-b", "b", "after-b"]
    );
    let ctx = rt.flows().run("ext", Ctx::default(), None).await.unwrap();
    assert_eq!(ctx.visited, ["first", "a", "before-b", "b", "after-b"]);
    assert!(matches!(
        rt.flows().insert_after::<Ctx>("ext", "zzz", "x", Probe::ok(&log)),
        Err(RuntimeError::Undefined { .. })
    ));
    assert!(matches!(
        rt.flows().insert_after::<Ctx>("nope", "a", "x", Probe::ok(&log)),
        Err(RuntimeError::Undefined { .. })
    ));
    rt.shutdown();
}

#[tokio::test]
async fn progress_is_persisted_while_a_step_runs() {
    let rt = runtime();
    let log = Log::default();
    let gate = Arc::new(Notify::new());
    rt.flows().define(
        ChainSpec::new("slow")
            .step("a", Probe::ok(&log))
            .step("b", Probe { gate: Some(gate.clone()), ..Probe::ok(&log) }),
    );
    let job = uuid::Uuid::new_v4();
    let flows = rt.clone();
    let task =
        tokio::spawn(async move { flows.flows().run("slow", Ctx::default(), Some(job)).await });
    let mut seen = None;
    for _ in 0..200 {
        let flows = rt.flows().in_progress().unwrap();
        if let Some(flow) = flows.into_iter().find(|f| f.current_step.as_deref() == Some("b")) {
            seen = Some(flow);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let flow = seen.expect("the flow is visible in the store while step b runs");
    assert_eq!((flow.chain.as_str(), flow.phase, flow.job_id), ("slow", "running", Some(job)));
    gate.notify_one();
    task.await.unwrap().unwrap();
    assert!(rt.flows().in_progress().unwrap().is_empty());
    rt.shutdown();
}

#[derive(Deserialize, Debug)]
struct Report {
    resumed: usize,
    rolled_back: usize,
    unknown: usize,
    flows_left: usize,
    marks: Vec<(u64, String)>,
}

const BIN: &str = env!("CARGO_BIN_EXE_strato-flow-crash");

fn recover(dir: &std::path::Path, resumable: bool) -> Report {
    let mut cmd = Command::new(BIN);
    cmd.arg("recover").arg(dir);
    if resumable {
        cmd.arg("--resumable");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "recover failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Starts `hang` mode, waits until the child is inside step c, and SIGKILLs it.
fn kill_inside_step_c(dir: &std::path::Path, resumable: bool) {
    let mut cmd = Command::new(BIN);
    cmd.arg("hang").arg(dir).stdout(Stdio::piped());
    if resumable {
        cmd.arg("--resumable");
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "in-step c");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

#[test]
fn sigkill_mid_chain_then_recovery_rolls_everything_back() {
    let dir = tempfile::tempdir().unwrap();
    kill_inside_step_c(dir.path(), false);
    let report = recover(dir.path(), false);
    assert_eq!((report.rolled_back, report.resumed, report.unknown), (1, 0, 0));
    assert!(report.marks.is_empty(), "step c's partial work and a, b were undone: {report:?}");
    assert_eq!(report.flows_left, 0);
    // A second recovery finds nothing to do.
    let again = recover(dir.path(), false);
    assert_eq!((again.rolled_back, again.resumed), (0, 0));
}

#[test]
fn sigkill_mid_chain_then_recovery_resumes_a_resumable_chain() {
    let dir = tempfile::tempdir().unwrap();
    kill_inside_step_c(dir.path(), true);
    let report = recover(dir.path(), true);
    assert_eq!((report.rolled_back, report.resumed), (0, 1));
    let steps: Vec<&str> = report.marks.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(steps, ["a", "b", "c", "d"]);
    assert_eq!(report.flows_left, 0);
}

#[test]
fn sigkill_at_random_moments_leaves_every_flow_all_or_nothing() {
    for round in 0..6u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut child =
            Command::new(BIN).arg("loop").arg(dir.path()).stdout(Stdio::piped()).spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (first_done, started) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in stdout.lines().map_while(Result::ok) {
                if line.starts_with("done ")
                    && lines.iter().all(|l: &String| !l.starts_with("done "))
                {
                    let _ = first_done.send(());
                }
                lines.push(line);
            }
            lines
        });
        // The kill lands at a random moment of a run that has got going: a child slow to
        // start (a loaded machine, a cold cache) has not been killed before its first flow.
        started.recv_timeout(Duration::from_secs(60)).expect("the child completes a first flow");
        std::thread::sleep(Duration::from_millis(fastrand_like(round) % 250));
        child.kill().unwrap();
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let done: Vec<u64> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("done "))
            .map(|t| t.parse().unwrap())
            .collect();
        assert!(!done.is_empty(), "the child completed some flows before it was killed");

        let report = recover(dir.path(), false);
        assert_eq!(report.flows_left, 0);
        let mut per_tag = std::collections::BTreeMap::<u64, usize>::new();
        for (tag, _) in &report.marks {
            *per_tag.entry(*tag).or_default() += 1;
        }
        for (tag, count) in &per_tag {
            assert_eq!(*count, 4, "round {round}: flow {tag} is half done: {count} marks");
            assert_ne!(tag % 3, 2, "flow {tag} failed its last step and must have no marks");
        }
        for tag in done {
            assert_eq!(per_tag.get(&tag), Some(&4), "acknowledged flow {tag} lost its marks");
        }
    }
}

/// A small deterministic spread of kill times.
fn fastrand_like(round: u64) -> u64 {
    round.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40
}

/// A step that holds the runtime, as real steps hold kinds.
struct HoldsRuntime {
    _runtime: Runtime,
}

#[async_trait]
impl Step<Ctx> for HoldsRuntime {
    async fn run(&self, _: &mut Ctx, _: &FlowInfo) -> Result<(), BoxError> {
        Ok(())
    }

    async fn rollback(&self, _: &mut Ctx, _: &FlowInfo) -> Result<(), BoxError> {
        Ok(())
    }
}

#[test]
fn shutdown_releases_the_store_even_when_steps_hold_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        // The second open fails ("could not acquire lock") if the first store is still open.
        let db = Db::open_sled(dir.path()).unwrap();
        let rt = Runtime::start(RuntimeConfig { arbiters: 1, ..Default::default() }, db).unwrap();
        rt.flows().define(ChainSpec::new("c").step("a", HoldsRuntime { _runtime: rt.clone() }));
        rt.gc().register_handler("k", {
            let held = rt.clone();
            move |_: ()| {
                let _ = &held;
                async { Ok::<(), BoxError>(()) }
            }
        });
        rt.shutdown();
    }
}

#[tokio::test]
async fn a_flow_whose_steps_all_ran_is_not_rolled_back_by_recovery() {
    use strato_runtime::{FlowPhase, FlowRecord};
    use strato_storage::{Batch, Expect};
    let rt = runtime();
    let log = Log::default();
    rt.flows().define(ChainSpec::new("done").step("a", Probe::ok(&log)).step("b", Probe::ok(&log)));
    // What a crash between the last step's save and the record's removal left behind in
    // builds that saved after every step.
    let record = FlowRecord {
        id: uuid::Uuid::new_v4(),
        chain: "done".into(),
        job_id: None,
        steps: vec!["a".into(), "b".into()],
        context: strato_storage::codec::encode_payload("flow", &Ctx::default()).unwrap(),
        phase: FlowPhase::Running { next: 2, in_step: false },
        failure: None,
        rollback_failures: vec![],
        started_unix_ms: 0,
        updated_unix_ms: 0,
        recovered: false,
    };
    let mut batch = Batch::new();
    batch.put(&record, Expect::Absent).unwrap();
    rt.db().commit(batch).await.unwrap();
    let report = rt.flows().recover().await.unwrap();
    assert_eq!((report.resumed.len(), report.rolled_back.len()), (1, 0));
    assert!(log_of(&log).is_empty(), "nothing ran or rolled back: {:?}", log_of(&log));
    assert!(rt.flows().in_progress().unwrap().is_empty());
    rt.shutdown();
}
