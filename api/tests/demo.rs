//! The README's main command runs this demonstration: it must run to the end, twice on the
//! same data directory (the second run starts from what the first left).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demonstration_runs_twice_on_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    strato_api::client::demo::run(dir.path()).await.unwrap();
    strato_api::client::demo::run(dir.path()).await.unwrap();
    let snapshot: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("snapshot.json")).unwrap()).unwrap();
    let actors = snapshot["actors"].as_array().unwrap();
    assert_eq!(actors.len(), 3);
    assert!(actors.iter().any(|a| a["restarts"] == 1), "the demonstrated panic restarted one");
}
