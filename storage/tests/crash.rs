//! Kills a writing process with SIGKILL at random moments and checks, after every reopen,
//! that each acknowledged write is present and decodes and that every index agrees with its
//! table. The checking lives in the `strato-store-torture` binary so that the same harness
//! runs long soaks by hand; this test runs a short one and fails on any violation it reports.

use std::process::Command;

#[test]
fn acknowledged_writes_survive_sigkill() {
    let output = Command::new(env!("CARGO_BIN_EXE_strato-store-torture"))
        .args(["soak", "--iterations", "12", "--threads", "4"])
        .output()
        .expect("run the torture binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "torture run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("soak passed: 12 kills"), "{stdout}");
    // The run must have checked real writes, not only empty stores.
    let acked: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("soak passed: 12 kills, "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("acknowledged count in the summary");
    assert!(acked > 100, "only {acked} acknowledged writes were checked:\n{stdout}");
}
