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
use crate::records::{HostState, HostStatus, Reservation};

/// What a VM needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    /// CPUs.
    pub cpu: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Local primary storage in bytes (its root volume's virtual size; 0: none).
    pub disk: u64,
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

/// The clusters whose root volumes go to shared storage (the first primary storage
/// attached to them, as the creation picks it) that has no room for `disk` more bytes.
fn clusters_with_full_shared_storage(
    db: &strato_storage::Db,
    disk: u64,
) -> Result<std::collections::HashSet<Uuid>, strato_storage::StoreError> {
    let free = crate::shared_capacity::free_by_storage(db)?;
    let mut seen = std::collections::HashSet::new();
    let mut full = std::collections::HashSet::new();
    if free.values().all(|free| *free >= disk) {
        return Ok(full);
    }
    for stored in db.scan::<crate::records::PrimaryStorageRecord>() {
        let ps = stored?.record;
        let short = !ps.is_local() && free.get(&ps.uuid).is_some_and(|free| *free < disk);
        for cluster in ps.attached_cluster_uuids {
            if seen.insert(cluster) && short {
                full.insert(cluster);
            }
        }
    }
    Ok(full)
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
    type Keep<'a> = Box<dyn Fn(&HostSummary) -> bool + Send + Sync + 'a>;
    let mut filters: Vec<(String, Keep<'_>)> = Vec::new();
    if let Some(excluded) = excluded {
        filters.push((format!("not host {excluded}"), Box::new(move |h| h.uuid != excluded)));
    }
    if let Some(clusters) = &need.clusters {
        filters.push((
            "in the VM's clusters".into(),
            Box::new(|h| clusters.contains(&h.cluster_uuid)),
        ));
    }
    if let Some(l2_clusters) = &need.l2_clusters {
        filters.push((
            "clusters with the VM's L2 networks".into(),
            Box::new(|h| l2_clusters.contains(&h.cluster_uuid)),
        ));
    }
    if let Some(pinned) = need.pinned {
        filters.push((format!("is host {pinned}"), Box::new(move |h| h.uuid == pinned)));
    }
    filters.push(("state Enabled".into(), Box::new(|h| h.state == HostState::Enabled)));
    filters.push(("status Connected".into(), Box::new(|h| h.status == HostStatus::Connected)));
    let want = Reservation { cpu: need.cpu, memory: need.memory, disk: need.disk };
    filters.push((
        format!("free capacity for {} CPU and {} MiB", need.cpu, need.memory >> 20),
        Box::new(move |h| h.fits(Reservation { disk: 0, ..want }, overcommit)),
    ));
    if need.disk > 0 {
        filters.push((
            format!("free local storage for {} MiB", need.disk.div_ceil(1 << 20)),
            Box::new(move |h| h.fits(Reservation { cpu: 0, memory: 0, ..want }, overcommit)),
        ));
        let full = clusters_with_full_shared_storage(hosts.runtime().db(), need.disk)?;
        if !full.is_empty() {
            filters.push((
                format!("free shared storage for {} MiB", need.disk.div_ceil(1 << 20)),
                Box::new(move |h| !full.contains(&h.cluster_uuid)),
            ));
        }
    }
    // One pass over the directory, under its lock: each host is dropped by the first filter
    // it fails, and only the survivors' free memory and UUID are kept (cloning and sorting
    // every host for every VM led the allocator's profile at 1,000 hosts).
    let mut dropped = vec![0usize; filters.len()];
    let mut candidates: Vec<(u64, Uuid)> = Vec::new();
    let total =
        hosts.entity().for_each_host(|h| match filters.iter().position(|(_, keep)| !keep(h)) {
            Some(filter) => dropped[filter] += 1,
            None => candidates.push((h.memory.saturating_sub(h.reserved_memory), h.uuid)),
        });
    let mut trace = vec![FilterStep { filter: "all hosts".into(), hosts_left: total }];
    let mut left = total;
    for ((name, _), dropped) in filters.into_iter().zip(dropped) {
        left -= dropped;
        trace.push(FilterStep { filter: name, hosts_left: left });
    }
    // Rank: the most free memory first, which spreads VMs over hosts. The first choice
    // almost always books; the rest are ordered only when it does not.
    let first = candidates.iter().enumerate().min_by_key(|(_, (free, _))| std::cmp::Reverse(*free));
    if let Some((at, &(_, uuid))) = first {
        if host::reserve(hosts, uuid, vm, want, overcommit).await? {
            return Ok(uuid);
        }
        candidates.swap_remove(at);
        candidates.sort_by_key(|(free, _)| std::cmp::Reverse(*free));
        for &(_, uuid) in &candidates {
            if host::reserve(hosts, uuid, vm, want, overcommit).await? {
                return Ok(uuid);
            }
        }
        trace.push(FilterStep { filter: "booked in the host's queue".into(), hosts_left: 0 });
    }
    Err(AllocError::NoHost { trace })
}
