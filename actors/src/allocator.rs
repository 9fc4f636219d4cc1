//! The host allocator: filters the hosts, ranks the survivors, and books capacity through
//! the chosen host's actor.
//!
//! Filtering reads the host actors' in-memory directory (cheap, possibly a moment stale); the booking is authoritative,
//! because it runs in the host actor's `capacity` queue at level 1 and checks again there. A
//! host that filled up meanwhile says no and the next candidate is tried. When no host is
//! left, the error carries the placement trace: each filter and how many hosts it left, so a
//! user can see *why* (ZStack's allocator trace).

use serde::Serialize;
use strato_runtime::Kind;
use uuid::Uuid;

use crate::host::{self, HostError, HostSummary, Hosts, Overcommit};
use crate::records::{HostState, HostStatus};

/// What a VM needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    /// CPUs.
    pub cpu: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Only hosts of these clusters (none: any).
    pub clusters: Option<Vec<Uuid>>,
    /// Only this host.
    pub pinned: Option<Uuid>,
    /// Only hosts of these clusters: those every L2 network of the VM is attached to (none:
    /// the VM's networks ask nothing).
    pub l2_clusters: Option<Vec<Uuid>>,
}

/// One filter of a placement and how many hosts it left.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FilterStep {
    /// The filter.
    pub filter: String,
    /// Hosts left after it.
    pub hosts_left: usize,
}

/// Why no host was found.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// The filters left no host; the trace says which one emptied the list.
    #[error("no host can take the VM: {}", render(.trace))]
    NoHost {
        /// Each filter and how many hosts it left.
        trace: Vec<FilterStep>,
    },
    /// The store failed.
    #[error("the store failed")]
    Store(#[from] strato_storage::StoreError),
    /// A host actor failed.
    #[error(transparent)]
    Host(#[from] HostError),
}

fn render(trace: &[FilterStep]) -> String {
    trace.iter().map(|s| format!("{} -> {}", s.filter, s.hosts_left)).collect::<Vec<_>>().join(", ")
}

/// Picks a host for VM `vm`'s `need` and books its capacity there. Returns the host.
pub async fn place(
    hosts: &Kind<Hosts>,
    vm: Uuid,
    need: &Need,
    overcommit: Overcommit,
) -> Result<Uuid, AllocError> {
    place_filtered(hosts, vm, need, None, overcommit).await
}

/// [`place`] on any host but `excluded` (a migration's source).
pub async fn place_excluding(
    hosts: &Kind<Hosts>,
    vm: Uuid,
    need: &Need,
    excluded: Uuid,
    overcommit: Overcommit,
) -> Result<Uuid, AllocError> {
    place_filtered(hosts, vm, need, Some(excluded), overcommit).await
}

async fn place_filtered(
    hosts: &Kind<Hosts>,
    vm: Uuid,
    need: &Need,
    excluded: Option<Uuid>,
    overcommit: Overcommit,
) -> Result<Uuid, AllocError> {
    let mut candidates: Vec<HostSummary> = hosts.entity().directory();
    let mut trace = vec![FilterStep { filter: "all hosts".into(), hosts_left: candidates.len() }];
    let mut filter =
        |name: String, keep: &dyn Fn(&HostSummary) -> bool, candidates: &mut Vec<HostSummary>| {
            candidates.retain(|h| keep(h));
            trace.push(FilterStep { filter: name, hosts_left: candidates.len() });
        };
    if let Some(excluded) = excluded {
        filter(format!("not host {excluded}"), &|h| h.uuid != excluded, &mut candidates);
    }
    if let Some(clusters) = &need.clusters {
        filter(
            "in the VM's clusters".into(),
            &|h| clusters.contains(&h.cluster_uuid),
            &mut candidates,
        );
    }
    if let Some(l2_clusters) = &need.l2_clusters {
        filter(
            "clusters with the VM's L2 networks".into(),
            &|h| l2_clusters.contains(&h.cluster_uuid),
            &mut candidates,
        );
    }
    if let Some(pinned) = need.pinned {
        filter(format!("is host {pinned}"), &|h| h.uuid == pinned, &mut candidates);
    }
    filter("state Enabled".into(), &|h| h.state == HostState::Enabled, &mut candidates);
    filter("status Connected".into(), &|h| h.status == HostStatus::Connected, &mut candidates);
    filter(
        format!("free capacity for {} CPU and {} MiB", need.cpu, need.memory >> 20),
        &|h| h.fits(need.cpu, need.memory, overcommit),
        &mut candidates,
    );
    // Rank: the most free memory first, which spreads VMs over hosts.
    candidates.sort_by_key(|h| std::cmp::Reverse(h.memory.saturating_sub(h.reserved_memory)));
    for candidate in &candidates {
        if host::reserve(hosts, candidate.uuid, vm, need.cpu, need.memory, overcommit).await? {
            return Ok(candidate.uuid);
        }
    }
    if !candidates.is_empty() {
        trace.push(FilterStep { filter: "booked in the host's queue".into(), hosts_left: 0 });
    }
    Err(AllocError::NoHost { trace })
}
