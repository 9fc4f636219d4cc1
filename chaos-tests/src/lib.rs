//! The chaos harness, `strato-chaos`: proves Strato under load and faults, with real
//! processes driven through the HTTP API.
//!
//! - [`load`]: a real management node and one agent process simulating many hosts; many VMs
//!   created through the API; the figures.
//! - [`peer`]: the workload Rally runs on Nova's fake driver (boot, wait, list, delete), for
//!   figures side by side with OpenStack's.
//! - [`run`]: a seeded chaos run: the real MN and one agent process per host, each behind a
//!   fault proxy ([`proxy`], [`cluster`]); a model-based random workload ([`workload`]); faults
//!   on a seeded schedule ([`faults`]); the invariants of DESIGN section 8 ([`checks`]).
//!
//! Nothing depends on this crate.

pub mod attach;
pub mod checks;
pub mod cluster;
pub mod faults;
pub mod hostnet;
pub mod load;
pub mod peer;
pub mod proxy;
pub mod run;
pub mod snapshots;
pub mod workload;

/// The harness's errors: anything that stops a run from being made (not a violation, which is
/// a finding).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Unix milliseconds at `instant` (the agents' journals are in Unix time).
pub fn unix_ms_at(instant: std::time::Instant) -> u64 {
    let now = std::time::SystemTime::now();
    let since = instant.elapsed();
    now.checked_sub(since)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}
