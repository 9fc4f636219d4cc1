//! The peer workload as a regression test: VMs booted and deleted at once on few hosts, with
//! nothing faulty, must all succeed. Concurrent deletes on one host once raced on the host's
//! record (its link and capacity queues both wrote it) and ended `SYS.INTERNAL`.

use std::path::Path;
use std::process::Command;

/// `strato-chaos`, with the `strato` and `strato-agent` binaries it starts beside it.
fn chaos_binary() -> &'static Path {
    let chaos = Path::new(env!("CARGO_BIN_EXE_strato-chaos"));
    for (package, binary) in [("strato-api", "strato"), ("strato-agent", "strato-agent")] {
        if !chaos.with_file_name(binary).exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "-p", package, "--bin", binary])
                .status()
                .unwrap();
            assert!(status.success(), "building {binary} failed");
        }
    }
    chaos
}

#[test]
fn concurrent_boots_and_deletes_on_few_hosts_all_succeed() {
    let out = Command::new(chaos_binary())
        .args(["peer-workload", "-m", "2", "-n", "120", "-c", "16"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the peer workload failed:\n{stdout}\n{stderr}");
    let phases: Vec<&str> = stdout.lines().filter(|l| l.contains(" phase=")).collect();
    assert_eq!(phases.len(), 4, "{stdout}");
    for phase in phases {
        assert!(phase.contains(" failed=0"), "{phase}");
    }
    assert!(stdout.contains(" vms_left=0 "), "{stdout}");
}
