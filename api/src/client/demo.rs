//! A demonstration of the runtime on the embedded store, run by the README's main command
//! until the management node exists (the vertical-slice issue replaces it).
//!
//! It shows, on real sled files in the data directory, what the rest of Strato will stand on:
//! accounts as actors with keyed queues, a panic contained and the actor reloaded from the
//! store, a flow rolled back step by step, a garbage-collector job retried until it succeeds,
//! and the inspection snapshot the debug console will read. Balances persist: run it twice
//! and the second run starts from where the first stopped.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use strato_runtime::{
    ActorFilter, BoxError, ChainSpec, Entity, FlowInfo, Kind, KindConfig, Op, Runtime,
    RuntimeConfig, RuntimeError, Step, Trigger,
};
use strato_storage::{Batch, Db, Expect, Record};
use uuid::Uuid;

/// A demo account: a balance kept in the store.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Account {
    id: Uuid,
    name: String,
    balance: i64,
}

impl Record for Account {
    const KIND: &'static str = "demo-account";
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.id
    }
}

struct Accounts {
    db: Db,
}

impl Entity for Accounts {
    const KIND: &'static str = "demo-account";
    type State = Account;

    fn load(&self, id: Uuid) -> Result<Option<Account>, BoxError> {
        Ok(self.db.get::<Account>(id)?.map(|s| s.record))
    }
}

fn account_id(name: &str) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("strato-demo/{name}").as_bytes())
}

fn op(name: &'static str) -> Op {
    Op::within("balance", name, Duration::from_secs(10))
}

/// Adds `amount` to an account, durably, on the account's actor.
async fn deposit(kind: &Kind<Accounts>, id: Uuid, amount: i64) -> Result<i64, RuntimeError> {
    kind.call(id, op("deposit"), move |ctx| async move {
        let mut account = ctx.with_state(|a| a.clone());
        account.balance += amount;
        let mut batch = Batch::new();
        batch.put(&account, Expect::Any)?;
        ctx.entity().db.commit(batch).await?;
        ctx.with_state(|a| a.balance = account.balance);
        Ok(account.balance)
    })
    .await
}

async fn balance(kind: &Kind<Accounts>, id: Uuid) -> Result<i64, RuntimeError> {
    kind.call(id, op("balance"), |ctx| async move { Ok(ctx.with_state(|a| a.balance)) }).await
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Transfer {
    from: Uuid,
    to: Uuid,
    amount: i64,
}

struct Debit {
    kind: Kind<Accounts>,
}

#[async_trait]
impl Step<Transfer> for Debit {
    async fn run(&self, t: &mut Transfer, _: &FlowInfo) -> Result<(), BoxError> {
        deposit(&self.kind, t.from, -t.amount).await?;
        Ok(())
    }

    async fn rollback(&self, t: &mut Transfer, _: &FlowInfo) -> Result<(), BoxError> {
        deposit(&self.kind, t.from, t.amount).await?;
        Ok(())
    }
}

/// Credits the destination, refusing the account named "frozen".
struct Credit {
    kind: Kind<Accounts>,
    frozen: Uuid,
}

#[async_trait]
impl Step<Transfer> for Credit {
    async fn run(&self, t: &mut Transfer, _: &FlowInfo) -> Result<(), BoxError> {
        if t.to == self.frozen {
            return Err("the destination account is frozen".into());
        }
        deposit(&self.kind, t.to, t.amount).await?;
        Ok(())
    }

    async fn rollback(&self, _: &mut Transfer, _: &FlowInfo) -> Result<(), BoxError> {
        // Credit fails before it changes anything, and succeeds completely otherwise.
        Ok(())
    }
}

/// Runs the demonstration in `data_dir`.
pub async fn run(data_dir: &Path) -> Result<(), BoxError> {
    std::fs::create_dir_all(data_dir)?;
    println!("Strato runtime demonstration (the management node and its API arrive next)");
    println!("  store: sled in {}", data_dir.display());
    let db = Db::open_sled(&data_dir.join("store"))?;
    let runtime = Runtime::start(RuntimeConfig::default(), db.clone())?;
    let kind = runtime.register(
        Accounts { db: db.clone() },
        KindConfig::default()
            .queue("balance", 1, 10_000)
            .restart_budget(5, Duration::from_secs(60)),
    );
    let names = ["alice", "bob", "frozen"];
    for name in names {
        let id = account_id(name);
        if db.get::<Account>(id)?.is_none() {
            let mut batch = Batch::new();
            batch.put(&Account { id, name: name.into(), balance: 1_000 }, Expect::Absent)?;
            db.commit(batch).await?;
        }
    }
    let [alice, bob, frozen] = names.map(account_id);

    runtime.flows().define(
        ChainSpec::new("demo.transfer")
            .step("debit", Debit { kind: kind.clone() })
            .step("credit", Credit { kind: kind.clone(), frozen }),
    );
    let recovered = runtime.flows().recover().await?;
    println!(
        "  flow recovery: {} resumed, {} rolled back from an earlier run",
        recovered.resumed.len(),
        recovered.rolled_back.len()
    );

    println!("\n1. keyed queues: 2,000 durable deposits on 3 accounts, one queue of level 1 each");
    let started = Instant::now();
    let deposits = (0..2_000).map(|i| deposit(&kind, [alice, bob, frozen][i % 3], 1));
    for result in futures::future::join_all(deposits).await {
        result?;
    }
    println!(
        "   done in {:.2}s; balances: alice {}, bob {}, frozen {}",
        started.elapsed().as_secs_f64(),
        balance(&kind, alice).await?,
        balance(&kind, bob).await?,
        balance(&kind, frozen).await?
    );

    println!("\n2. panic isolation: an operation changes bob in memory, then panics");
    let panicked = kind
        .call(bob, op("buggy"), |ctx| async move {
            ctx.with_state(|a| a.balance = -999_999);
            tokio::task::yield_now().await;
            if ctx.id() != Uuid::nil() {
                panic!("a bug in an operation");
            }
            Ok::<_, RuntimeError>(())
        })
        .await;
    println!("   the caller got: {}", panicked.expect_err("the operation panicked"));
    println!("   bob after the restart (reloaded from the store): {}", balance(&kind, bob).await?);

    println!("\n3. flows: transfer 100 from alice to frozen; credit fails, debit rolls back");
    let before = balance(&kind, alice).await?;
    let transfer = Transfer { from: alice, to: frozen, amount: 100 };
    let error = runtime.flows().run("demo.transfer", transfer, None).await.expect_err("frozen");
    println!("   {error}");
    println!("   alice before {before}, after {}", balance(&kind, alice).await?);

    println!("\n4. garbage collector: a clean-up that fails twice, then succeeds");
    let gc = runtime.gc();
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    gc.register_handler("demo.cleanup", move |what: String| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n < 3 {
                Err(format!("{what}: host unreachable (attempt {n})").into())
            } else {
                Ok(())
            }
        }
    });
    gc.start()?;
    gc.submit("demo.cleanup/volume-1", "demo.cleanup", &"volume-1".to_owned(), Trigger::default())
        .await?;
    let started = Instant::now();
    while !gc.list()?.is_empty() && started.elapsed() < Duration::from_secs(30) {
        if let Some(job) = gc.list()?.first()
            && job.attempts > 0
        {
            println!(
                "   job {}: attempts {}, last error: {}",
                job.name,
                job.attempts,
                job.last_error.as_deref().unwrap_or("-")
            );
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    println!(
        "   done after {} runs; jobs left: {}",
        attempts.load(Ordering::SeqCst),
        gc.list()?.len()
    );

    println!("\n5. inspection: what the debug console will show");
    let snapshot = runtime.snapshot(&ActorFilter::default()).await?;
    println!("   {:<14} {:>5} {:>11}", "kind", "live", "activations");
    for k in &snapshot.kinds {
        println!("   {:<14} {:>5} {:>11}", k.kind, k.counters.live, k.counters.activations);
    }
    println!("   {:<22} {:<8} {:>9} {:>8}  last error", "actor", "status", "processed", "restarts");
    for actor in &snapshot.actors {
        println!(
            "   {:<22} {:<8} {:>9} {:>8}  {}",
            format!("{}/{}", actor.kind, &actor.id.to_string()[..8]),
            format!("{:?}", actor.status),
            actor.processed,
            actor.restarts,
            actor.last_error.as_deref().unwrap_or("-")
        );
    }
    let path = data_dir.join("snapshot.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&snapshot)?)?;
    println!("   full snapshot (JSON): {}", path.display());
    runtime.shutdown();
    Ok(())
}
