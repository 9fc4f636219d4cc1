//! Query benchmarks over 1,000,000 VMs written straight into a sled store: a VM by its NIC's
//! address, a page of 100 sorted by name, and a count of the running ones. First the engine
//! as the API runs it (parsing, the plan, reading the store, inventories), without HTTP;
//! then the same queries through the real management node and its HTTP API, on loopback.
//!
//! ```text
//! cargo bench -p strato-api --bench query
//! STRATO_BENCH_VMS=100000 cargo bench -p strato-api --bench query
//! ```
//!
//! The store is kept in `target/bench-data/` and reused by later runs with the same size.
//! Figures print as `bench <name> <key>=<value> ...` lines; BENCHMARKS.md records them.

#![allow(
    clippy::disallowed_methods,
    reason = "a synchronous program: it writes with the blocking commit, outside any runtime"
)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use strato_actors::records::{VmNic, VmRecord};
use strato_actors::vm::state::VmState;
use strato_api::query::StoreSource;
use strato_api::query::{self, Catalog, Query};
use strato_storage::{Batch, Db, Expect};
use uuid::Uuid;

const WORDS: [&str; 16] = [
    "web", "db", "cache", "queue", "build", "test", "edge", "proxy", "batch", "ml", "api", "auth",
    "mail", "log", "search", "git",
];

fn ip(i: u32) -> String {
    format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)
}

/// VM `i` of the bench's population: 60% Running, 30% Stopped, 10% in other states; names
/// in no particular order; one NIC each with a unique address; 1,000 hosts.
fn vm(i: u32) -> VmRecord {
    let mixed = i.wrapping_mul(2_654_435_761);
    let state = match mixed % 10 {
        0..=5 => VmState::Running,
        6..=8 => VmState::Stopped,
        _ => VmState::Paused,
    };
    VmRecord {
        uuid: Uuid::new_v4(),
        name: format!("{}-{:07}", WORDS[(mixed >> 8) as usize % WORDS.len()], mixed % 10_000_000),
        state,
        host_uuid: Some(Uuid::from_u128(u128::from(i % 1000) + 1)),
        last_host_uuid: None,
        cpu_num: 1 + i % 8,
        memory_size: 1 << 30,
        root_volume_path: Some(format!("/var/lib/strato/volumes/{i}.qcow2")),
        vm_nics: vec![VmNic {
            uuid: Uuid::new_v4(),
            l3_network_uuid: Uuid::from_u128(7),
            ip: ip(i),
            mac: format!("fa:16:3e:{:02x}:{:02x}:{:02x}", i >> 16 & 255, i >> 8 & 255, i & 255),
            bridge: Some("br0".into()),
        }],
    }
}

/// The bench's data directory for `count` VMs (the store is its `store`, as the MN's is).
fn data_dir(count: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bench-data")
        .join(format!("query-vms-{count}"))
}

/// Opens the bench store with `count` VMs, writing them the first time.
fn store(count: u32) -> Db {
    let dir = data_dir(count);
    let complete = dir.join("complete");
    if !complete.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("store")).expect("bench dir");
        let db = Db::open_sled(&dir.join("store")).expect("open store");
        let started = Instant::now();
        for chunk in (0..count).collect::<Vec<_>>().chunks(2000) {
            let mut batch = Batch::new();
            for &i in chunk {
                batch.put(&vm(i), Expect::Absent).expect("encode");
            }
            db.commit_blocking(batch).expect("write");
            let written = chunk[chunk.len() - 1] + 1;
            if written % 100_000 == 0 {
                eprintln!("  {written} VMs written ({:.0?})", started.elapsed());
            }
        }
        println!("bench query-load vms={count} seconds={:.1}", started.elapsed().as_secs_f64());
        drop(db);
        std::fs::write(&complete, b"").expect("marker");
    }
    let db = Db::open_sled(&dir.join("store")).expect("open store");
    // As the MN does at startup: a store written by older code gets its indexes and
    // counters (once; a marker makes later opens one read).
    let started = Instant::now();
    let added = strato_actors::kinds::ensure_indexes(&db).expect("indexes");
    if added > 0 || started.elapsed() > Duration::from_secs(1) {
        eprintln!("  indexes brought up to date in {:.1?}", started.elapsed());
    }
    db
}

fn run(db: &Db, pairs: &[(&str, String)]) -> Value {
    let schema = query::schema("vm-instances").expect("declared");
    let pairs: Vec<(String, String)> =
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let source = StoreSource::new(db);
    Query::parse(schema, &pairs)
        .expect("valid")
        .run(schema, &mut Catalog::new(&source))
        .expect("runs")
}

/// Times `n` runs of `query(i)`; prints p50, p99 and max in milliseconds.
fn measure(name: &str, n: u32, mut query: impl FnMut(u32) -> usize) {
    let mut times: Vec<Duration> = (0..n)
        .map(|i| {
            let started = Instant::now();
            let found = query(i);
            assert!(found > 0, "{name}: nothing found");
            started.elapsed()
        })
        .collect();
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "bench {name} runs={n} p50_ms={:.3} p99_ms={:.3} max_ms={:.3}",
        ms(at(0.50)),
        ms(at(0.99)),
        ms(times[times.len() - 1])
    );
}

fn main() {
    let count: u32 =
        std::env::var("STRATO_BENCH_VMS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let db = store(count);
    let mut rng = fastrand::Rng::with_seed(7);
    let page = |body: &Value| body["inventories"].as_array().map_or(0, Vec::len);

    // Warm the cache the way a running server's would be.
    for i in 0..2000 {
        run(
            &db,
            &[("q", format!("vmNics.ip={}", ip(rng.u32(0..count)))), ("limit", i.to_string())],
        );
    }
    measure("query-vm-by-nic-ip", 5000, |_| {
        page(&run(&db, &[("q", format!("vmNics.ip={}", ip(rng.u32(0..count))))]))
    });
    measure("query-page-100-sorted-by-name", 200, |_| {
        page(&run(&db, &[("sort", "+name".into()), ("limit", "100".into())]))
    });
    measure("query-page-100-sorted-by-name-desc", 200, |_| {
        page(&run(&db, &[("sort", "-name".into()), ("limit", "100".into())]))
    });
    measure("query-page-100-sorted-by-name-start-10000", 100, |_| {
        let body = run(
            &db,
            &[("sort", "+name".into()), ("start", "10000".into()), ("limit", "100".into())],
        );
        page(&body)
    });
    measure("query-running-page-100-sorted-by-name", 100, |_| {
        let body = run(
            &db,
            &[("q", "state=Running".into()), ("sort", "+name".into()), ("limit", "100".into())],
        );
        page(&body)
    });
    measure("query-count-running", 30, |_| {
        let body = run(&db, &[("q", "state=Running".into()), ("count", "true".into())]);
        body["total"].as_u64().unwrap_or(0) as usize
    });
    drop(db);
    over_http(count, &mut rng);
}

/// The same queries through the management node's HTTP API (a real `Mn` on the bench's data
/// directory, axum on loopback, an admin session), as a client sees them.
fn over_http(count: u32, rng: &mut fastrand::Rng) {
    let runtime = tokio::runtime::Runtime::new().expect("tokio");
    let dir = data_dir(count);
    let api: std::net::SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        probe.local_addr().expect("its address")
    };
    let mn = runtime.block_on(async {
        let listener = strato_api::server::bind(api).await.expect("bind");
        let mn = strato_api::mn::Mn::start(&dir, None, Default::default(), Default::default())
            .await
            .expect("MN starts");
        tokio::spawn(strato_api::server::serve(mn.clone(), listener));
        mn
    });
    let password = strato_api::mn::admin_password(&dir).expect("the admin password");
    strato_api::client::log_in(api, "admin", &password).expect("log in");
    let get = |path: String| {
        let (status, body) = strato_api::client::request(api, "GET", &path, None).expect("answer");
        assert_eq!(status, 200, "{path}: {body}");
        body
    };
    let page = |body: &Value| body["inventories"].as_array().map_or(0, Vec::len);
    for _ in 0..500 {
        get(format!("/v1/vm-instances?q=vmNics.ip={}", ip(rng.u32(0..count))));
    }
    measure("http-vm-by-nic-ip", 2000, |_| {
        page(&get(format!("/v1/vm-instances?q=vmNics.ip={}", ip(rng.u32(0..count)))))
    });
    measure("http-page-100-sorted-by-name", 200, |_| {
        page(&get("/v1/vm-instances?sort=%2Bname&limit=100".into()))
    });
    measure("http-count-running", 200, |_| {
        get("/v1/vm-instances?q=state=Running&count=true".into())["total"].as_u64().unwrap_or(0)
            as usize
    });
    mn.shutdown();
}
