//! The L3 network actor: owns its IP ranges and hands out addresses in its `ip-alloc`
//! queue at level 1 (ZStack's), so two allocations never race.
//!
//! Each address handed out is a [`UsedIpRecord`] whose UUID derives from (network, address)
//! and which is written with `Expect::Absent`: even a bug that let two allocations race
//! could not record one address twice.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use strato_runtime::{BoxError, Entity, Kind, KindConfig, Op, OpCtx, RuntimeError};
use strato_storage::{Batch, Db, Expect, StoreError};
use uuid::Uuid;

use crate::ipam::{self, IpRange, IpamError};
use crate::records::{L3NetworkRecord, NetworkServiceL3RefRecord, UsedIpRecord, VipRecord};

/// The L3 actor's state.
#[derive(Debug)]
pub struct L3Actor {
    record: L3NetworkRecord,
    generation: u64,
    used: BTreeSet<Ipv4Addr>,
    /// Where the next search for a free address begins.
    cursor: ipam::Cursor,
}

/// The L3 network actor kind.
#[derive(Debug)]
pub struct L3s {
    db: Db,
}

impl L3s {
    /// The kind, on `db`.
    pub fn new(db: Db) -> Self {
        L3s { db }
    }

    /// The kind's default queues.
    pub fn kind_config() -> KindConfig {
        KindConfig::default()
            .serial_queue("ip-alloc", 10_000)
            .idle_timeout(Some(Duration::from_secs(600)))
    }
}

impl Entity for L3s {
    const KIND: &'static str = "l3";
    type State = L3Actor;

    fn load(&self, id: Uuid) -> Result<Option<L3Actor>, BoxError> {
        let Some(stored) = self.db.get::<L3NetworkRecord>(id)? else { return Ok(None) };
        let mut used = BTreeSet::new();
        for ip_id in self.db.find::<UsedIpRecord>("l3", &id.into())? {
            if let Some(ip) = self.db.get::<UsedIpRecord>(ip_id)? {
                used.insert(ip.record.ip.parse()?);
            }
        }
        Ok(Some(L3Actor {
            record: stored.record,
            generation: stored.generation,
            used,
            cursor: ipam::Cursor::default(),
        }))
    }
}

/// Why an L3 operation failed.
#[derive(Debug, thiserror::Error)]
pub enum L3Error {
    /// The runtime did not run it.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The store failed.
    #[error("the store failed")]
    Store(#[from] StoreError),
    /// The addresses said no.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// Addresses are still held (by a creation in flight, or a VM): the network is not
    /// deleted from under them.
    #[error("{0} address(es) of the L3 network are still held")]
    InUse(usize),
    /// A service is still used on the network: what uses it must go first.
    #[error(
        "the network's {service} service carries VIPs {users:?} to its NICs: detach them first (DetachEip, DetachPortForwardingRule)"
    )]
    ServiceInUse {
        /// The service.
        service: String,
        /// The VIPs that use it.
        users: Vec<Uuid>,
    },
    /// A change the L3 network's state refuses (the field is named).
    #[error("{field}: {message}")]
    Invalid {
        /// The request field at fault.
        field: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
}

/// The owner of an L3's flat DHCP server address.
pub fn dhcp_server_owner(l3: Uuid) -> Uuid {
    Uuid::new_v5(&l3, b"flat-dhcp-server")
}

/// Writes `record` (and `batch`'s other writes) as the actor's new record, in its queue.
async fn store(
    ctx: &OpCtx<L3s>,
    record: L3NetworkRecord,
    mut batch: Batch,
) -> Result<L3NetworkRecord, L3Error> {
    let generation = ctx.with_state(|s| s.generation);
    batch.put(&record, Expect::Generation(generation))?;
    let written = ctx.entity().db.commit(batch).await?;
    let generation = written
        .iter()
        .find(|w| w.id == record.uuid)
        .and_then(|w| w.generation)
        .unwrap_or(generation);
    ctx.with_state(|s| {
        s.record = record.clone();
        s.generation = generation;
    });
    Ok(record)
}

/// Changes L3 `l3`'s record in its queue (DNS, host routes, MTU): `change` may refuse.
pub async fn update(
    l3s: &Kind<L3s>,
    l3: Uuid,
    name: &'static str,
    change: impl FnOnce(&mut L3NetworkRecord) -> Result<(), L3Error> + Send + 'static,
) -> Result<L3NetworkRecord, L3Error> {
    l3s.call(l3, op(name), move |ctx: OpCtx<L3s>| async move {
        let mut record = ctx.with_state(|s| s.record.clone());
        change(&mut record)?;
        store(&ctx, record, Batch::new()).await
    })
    .await
}

/// Gives L3 `l3` the services `types` of provider `provider` (their references written,
/// replacing another provider's of the same type), and, with DHCP, its DHCP server's
/// address from its ranges, all in one write.
pub async fn attach_services(
    l3s: &Kind<L3s>,
    l3: Uuid,
    provider: Uuid,
    types: Vec<String>,
) -> Result<L3NetworkRecord, L3Error> {
    l3s.call(l3, op("attach-services"), move |ctx: OpCtx<L3s>| async move {
        let mut record = ctx.with_state(|s| s.record.clone());
        let mut batch = Batch::new();
        let mut taken = None;
        if types.iter().any(|t| t == crate::network::service::DHCP) && record.dhcp_server_ip.is_none() {
            if record.ip_ranges.is_empty() {
                return Err(L3Error::Invalid {
                    field: "networkServices",
                    message: "flat DHCP needs an address for its server: add an IP range to the L3 network first".into(),
                });
            }
            let ip = ctx.with_state(|s| ipam::allocate_from(&s.record.ip_ranges, &s.used, None, &mut s.cursor))?;
            batch.put(
                &UsedIpRecord {
                    uuid: UsedIpRecord::id_of(l3, ip),
                    l3_network_uuid: l3,
                    ip: ip.to_string(),
                    owner: dhcp_server_owner(l3),
                },
                Expect::Absent,
            )?;
            record.dhcp_server_ip = Some(ip.to_string());
            taken = Some(ip);
        }
        for service in &types {
            batch.put(
                &NetworkServiceL3RefRecord {
                    uuid: NetworkServiceL3RefRecord::id_of(l3, service),
                    l3_network_uuid: l3,
                    network_service_provider_uuid: provider,
                    network_service_type: service.clone(),
                },
                Expect::Any,
            )?;
        }
        let record = store(&ctx, record, batch).await?;
        if let Some(ip) = taken {
            ctx.with_state(|s| s.used.insert(ip));
        }
        Ok(record)
    })
    .await
}

/// Takes services `types` of provider `provider` from L3 `l3` (those another provider
/// gives are left); without DHCP, its server's address is given back. Eip and
/// PortForwarding are refused while a VIP carries them to this network's NICs (an
/// attachment writes the service's reference back, so the two never cross unseen: the one
/// that loses its compare-and-swap decides again).
pub async fn detach_services(
    l3s: &Kind<L3s>,
    l3: Uuid,
    provider: Uuid,
    types: Vec<String>,
) -> Result<L3NetworkRecord, L3Error> {
    l3s.call(l3, op("detach-services"), move |ctx: OpCtx<L3s>| async move {
        let db = ctx.entity().db.clone();
        loop {
            let mut record = ctx.with_state(|s| s.record.clone());
            let mut batch = Batch::new();
            let mut dhcp_detached = false;
            for service in &types {
                let id = NetworkServiceL3RefRecord::id_of(l3, service);
                let Some(held) = db.get::<NetworkServiceL3RefRecord>(id)? else { continue };
                if held.record.network_service_provider_uuid != provider {
                    continue;
                }
                let users = vips_carrying(&db, l3, service)?;
                if !users.is_empty() {
                    return Err(L3Error::ServiceInUse { service: service.clone(), users });
                }
                batch.delete::<NetworkServiceL3RefRecord>(id, Expect::Generation(held.generation));
                dhcp_detached |= service == crate::network::service::DHCP;
            }
            let mut freed = None;
            if dhcp_detached && let Some(ip) = record.dhcp_server_ip.take() {
                let ip: Ipv4Addr = ip.parse().map_err(|_| L3Error::Invalid {
                    field: "dhcpServerIp",
                    message: format!("`{ip}` is not an address"),
                })?;
                batch.delete::<UsedIpRecord>(UsedIpRecord::id_of(l3, ip), Expect::Any);
                freed = Some(ip);
            }
            let record = match store(&ctx, record, batch).await {
                Err(L3Error::Store(StoreError::Conflict { .. })) => continue,
                written => written?,
            };
            if let Some(ip) = freed {
                ctx.with_state(|s| {
                    s.used.remove(&ip);
                    s.cursor.released(&s.record.ip_ranges, ip);
                });
            }
            return Ok(record);
        }
    })
    .await
}

/// The VIPs that carry `service` (Eip or PortForwarding) to NICs of L3 `l3`.
fn vips_carrying(db: &Db, l3: Uuid, service: &str) -> Result<Vec<Uuid>, StoreError> {
    use crate::network::service;
    use crate::records::vip_use;
    let use_for = match service {
        service::EIP => vip_use::EIP,
        service::PORT_FORWARDING => vip_use::PORT_FORWARDING,
        _ => return Ok(Vec::new()),
    };
    Ok(db
        .find::<VipRecord>("peer-l3", &l3.into())?
        .into_iter()
        .filter_map(|id| db.get::<VipRecord>(id).transpose())
        .filter_map(|vip| vip.map(|v| v.record).ok())
        .filter(|vip| vip.use_for.as_deref() == Some(use_for))
        .map(|vip| vip.uuid)
        .collect())
}

fn op(name: &'static str) -> Op {
    Op::within("ip-alloc", name, Duration::from_secs(30))
}

/// Hands out an address of L3 `l3` to `owner` (`requested`, if given and free).
pub async fn allocate_ip(
    l3s: &Kind<L3s>,
    l3: Uuid,
    owner: Uuid,
    requested: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, L3Error> {
    allocate_ip_with(l3s, l3, owner, requested, |_, _, _| Ok(())).await
}

/// Hands out an address of L3 `l3` to `owner` (`requested`, if given and free), writing
/// what `with` adds (told the address and its range) in the same batch as the booking: the
/// owner's record and its booking land together or not at all, so an MN dying between the
/// two leaves no address booked for nothing. A conflict on what `with` wrote books nothing.
pub async fn allocate_ip_with(
    l3s: &Kind<L3s>,
    l3: Uuid,
    owner: Uuid,
    requested: Option<Ipv4Addr>,
    with: impl FnOnce(Ipv4Addr, &IpRange, &mut Batch) -> Result<(), StoreError> + Send + 'static,
) -> Result<Ipv4Addr, L3Error> {
    l3s.call(l3, op("allocate-ip"), move |ctx| async move {
        let (ip, range) = ctx.with_state(|s| {
            let ip = ipam::allocate_from(&s.record.ip_ranges, &s.used, requested, &mut s.cursor)?;
            let range = s.record.ip_ranges.iter().find(|r| r.contains(ip)).cloned();
            range.map(|range| (ip, range)).ok_or_else(|| L3Error::Invalid {
                field: "l3NetworkUuid",
                message: format!("address {ip} was handed out from no range of the network"),
            })
        })?;
        let record = UsedIpRecord {
            uuid: UsedIpRecord::id_of(l3, ip),
            l3_network_uuid: l3,
            ip: ip.to_string(),
            owner,
        };
        let mut batch = Batch::new();
        batch.put(&record, Expect::Absent)?;
        with(ip, &range, &mut batch)?;
        ctx.entity().db.commit(batch).await?;
        ctx.with_state(|s| s.used.insert(ip));
        Ok(ip)
    })
    .await
}

/// Gives address `ip` back if `owner` (a NIC) holds it; succeeds without acting otherwise.
pub async fn release_ip(
    l3s: &Kind<L3s>,
    l3: Uuid,
    ip: Ipv4Addr,
    owner: Uuid,
) -> Result<(), L3Error> {
    release_ip_with(l3s, l3, ip, owner, Batch::new()).await
}

/// Commits `batch` with the release of address `ip` if `owner` holds it (`batch` alone
/// otherwise): the change that stops naming the address and its release land together, so
/// an MN dying between the two leaves no address booked for nothing, and a repeat finds the
/// work done. A conflict on `batch` releases nothing.
pub async fn release_ip_with(
    l3s: &Kind<L3s>,
    l3: Uuid,
    ip: Ipv4Addr,
    owner: Uuid,
    mut batch: Batch,
) -> Result<(), L3Error> {
    l3s.call(l3, op("release-ip"), move |ctx| async move {
        // Only the owner's booking goes: a repeated release (after a crash, or by the GC)
        // must not free the address once someone else holds it.
        let held = ctx.entity().db.get::<UsedIpRecord>(UsedIpRecord::id_of(l3, ip))?;
        let releases = held.is_some_and(|used| used.record.owner == owner);
        if releases {
            batch.delete::<UsedIpRecord>(UsedIpRecord::id_of(l3, ip), Expect::Any);
        }
        if batch.is_empty() {
            return Ok(());
        }
        ctx.entity().db.commit(batch).await?;
        if releases {
            ctx.with_state(|s| {
                s.used.remove(&ip);
                s.cursor.released(&s.record.ip_ranges, ip);
            });
        }
        Ok(())
    })
    .await
}

/// Adds an IP range to L3 `l3`, refusing one that overlaps another.
pub async fn add_ip_range(
    l3s: &Kind<L3s>,
    l3: Uuid,
    range: IpRange,
) -> Result<L3NetworkRecord, L3Error> {
    l3s.call(l3, op("add-ip-range"), move |ctx: OpCtx<L3s>| async move {
        let (mut record, generation) = ctx.with_state(|s| (s.record.clone(), s.generation));
        ipam::check_no_overlap(&record.ip_ranges, &range)?;
        record.ip_ranges.push(range);
        let mut batch = Batch::new();
        batch.put(&record, Expect::Generation(generation))?;
        let written = ctx.entity().db.commit(batch).await?;
        ctx.with_state(|s| {
            s.record = record.clone();
            s.generation = written[0].generation.unwrap_or(generation);
            s.cursor.reset();
        });
        Ok(record)
    })
    .await
}

/// The addresses in use on L3 `l3`.
pub async fn used_ips(l3s: &Kind<L3s>, l3: Uuid) -> Result<BTreeSet<Ipv4Addr>, L3Error> {
    l3s.call(l3, op("used-ips"), |ctx| async move { Ok(ctx.with_state(|s| s.used.clone())) }).await
}

/// Deletes L3 `l3` (it must hold no addresses) and lets its actor go.
pub async fn delete(l3s: &Kind<L3s>, l3: Uuid) -> Result<(), L3Error> {
    l3s.call(l3, op("delete"), move |ctx| async move {
        // Whoever holds an address (a VM, or a creation whose VM record does not name its
        // NIC yet, so no dependents check can see it) gives it back first. The flat DHCP
        // server's address and the L3's service references go with it.
        let db = ctx.entity().db.clone();
        let dhcp_ip = ctx.with_state(|s| s.record.dhcp_server_ip.clone());
        let dhcp_ip: Option<Ipv4Addr> = dhcp_ip.and_then(|ip| ip.parse().ok());
        let held = ctx.with_state(|s| s.used.iter().filter(|ip| Some(**ip) != dhcp_ip).count());
        if held > 0 {
            return Err(L3Error::InUse(held));
        }
        let mut batch = Batch::new();
        batch.delete::<L3NetworkRecord>(l3, Expect::Any);
        if let Some(ip) = dhcp_ip {
            batch.delete::<UsedIpRecord>(UsedIpRecord::id_of(l3, ip), Expect::Any);
        }
        for id in db.find::<NetworkServiceL3RefRecord>("l3", &l3.into())? {
            batch.delete::<NetworkServiceL3RefRecord>(id, Expect::Any);
        }
        crate::records::delete_refs(&db, &mut batch, l3)?;
        db.commit(batch).await?;
        ctx.with_state(|s| {
            s.used.clear();
            s.cursor.reset();
        });
        ctx.passivate_when_idle();
        Ok(())
    })
    .await
}
