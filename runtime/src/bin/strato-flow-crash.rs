//! A child process for the flow engine's crash tests: it runs flows whose steps leave marks
//! in a store, so a parent can SIGKILL it mid-chain and then check, in a second process, that
//! recovery rolled back (or resumed) everything.
//!
//! ```text
//! strato-flow-crash hang <dir> [--resumable]     run one flow; block inside step `c`
//! strato-flow-crash loop <dir>                    run flows forever, printing `done <tag>`
//! strato-flow-crash recover <dir> [--resumable]   recover, print a JSON report
//! ```
//!
//! Every step `s` of flow `tag` writes the mark `(tag, s)` when it runs and deletes it when it
//! rolls back. In `loop` mode every third flow fails at its last step. So after recovery,
//! every flow has either all of its marks (it completed) or none (it was rolled back).

use std::io::Write;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use strato_runtime::{BoxError, ChainSpec, FlowInfo, Runtime, RuntimeConfig, Step};
use strato_storage::{Batch, Db, Expect, Record};
use uuid::Uuid;

const CHAIN: &str = "crash-test";
const STEPS: [&str; 4] = ["a", "b", "c", "d"];
const MARKS: Uuid = Uuid::from_u128(0x3d6e_55a1_0c47_4f0b_9b7e_1a2c_7f44_e0d9);

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Mark {
    id: Uuid,
    tag: u64,
    step: String,
}

impl Record for Mark {
    const KIND: &'static str = "mark";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.id
    }
}

fn mark_id(tag: u64, step: &str) -> Uuid {
    Uuid::new_v5(&MARKS, format!("{tag}/{step}").as_bytes())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Ctx {
    tag: u64,
    hang_in: Option<String>,
    fail_in: Option<String>,
}

struct MarkStep {
    db: Db,
    /// Off in `recover` mode: a resumed step c must finish this time.
    may_hang: bool,
}

#[async_trait]
impl Step<Ctx> for MarkStep {
    async fn run(&self, ctx: &mut Ctx, flow: &FlowInfo) -> Result<(), BoxError> {
        if ctx.fail_in.as_deref() == Some(flow.step.as_str()) {
            return Err(format!("injected failure in step {}", flow.step).into());
        }
        let mut batch = Batch::new();
        let mark = Mark { id: mark_id(ctx.tag, &flow.step), tag: ctx.tag, step: flow.step.clone() };
        batch.put(&mark, Expect::Any)?;
        // Steps b and d leave their mark with their end (one write with the checkpoint);
        // a and c write it at once: a kill must leave both kinds all or nothing.
        match flow.step.as_str() {
            "b" | "d" => flow.write_at_end(batch),
            _ => drop(self.db.commit(batch).await?),
        }
        if self.may_hang && ctx.hang_in.as_deref() == Some(flow.step.as_str()) {
            println!("in-step {}", flow.step);
            std::io::stdout().flush()?;
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    async fn rollback(&self, ctx: &mut Ctx, flow: &FlowInfo) -> Result<(), BoxError> {
        let mut batch = Batch::new();
        batch.delete::<Mark>(mark_id(ctx.tag, &flow.step), Expect::Any);
        self.db.commit(batch).await?;
        Ok(())
    }
}

fn define(runtime: &Runtime, resumable: bool, may_hang: bool) {
    let mut spec = ChainSpec::new(CHAIN);
    if resumable {
        spec = spec.resumable();
    }
    for step in STEPS {
        spec = spec.step(step, MarkStep { db: runtime.db().clone(), may_hang });
    }
    runtime.flows().define(spec);
}

#[derive(Serialize)]
struct Report {
    resumed: usize,
    rolled_back: usize,
    unknown: usize,
    flows_left: usize,
    marks: Vec<(u64, String)>,
}

fn usage() -> ! {
    eprintln!("usage: strato-flow-crash hang|loop|recover <dir> [--resumable]");
    std::process::exit(2);
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(dir)) = (args.first(), args.get(1)) else { usage() };
    let resumable = args.iter().any(|a| a == "--resumable");
    let db = Db::open_sled(std::path::Path::new(dir))?;
    let runtime = Runtime::start(RuntimeConfig { arbiters: 1, ..Default::default() }, db.clone())?;
    define(&runtime, resumable, mode != "recover");
    match mode.as_str() {
        "hang" => {
            let ctx = Ctx { tag: 1, hang_in: Some("c".into()), fail_in: None };
            runtime.flows().run(CHAIN, ctx, None).await?;
        }
        "loop" => {
            for tag in 0.. {
                let fail_in = (tag % 3 == 2).then(|| "d".to_owned());
                let ctx = Ctx { tag, hang_in: None, fail_in };
                if runtime.flows().run(CHAIN, ctx, None).await.is_ok() {
                    println!("done {tag}");
                } else {
                    println!("failed {tag}");
                }
                if tag % 16 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        "recover" => {
            let report = runtime.flows().recover().await?;
            let mut marks = Vec::new();
            for mark in db.scan::<Mark>() {
                let mark = mark?.record;
                marks.push((mark.tag, mark.step));
            }
            marks.sort();
            let report = Report {
                resumed: report.resumed.len(),
                rolled_back: report.rolled_back.len(),
                unknown: report.unknown_chain.len(),
                flows_left: runtime.flows().in_progress()?.len(),
                marks,
            };
            println!("{}", serde_json::to_string(&report)?);
        }
        _ => usage(),
    }
    runtime.shutdown();
    Ok(())
}
