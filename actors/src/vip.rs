//! VIPs, elastic IPs and port forwarding rules: what the store says about them, changed
//! so that no two writers lose each other's change.
//!
//! A VIP is an address of a public L3 network, held in that network's IPAM under the VIP's
//! UUID. What uses it (one EIP, or port forwarding rules) and which private L3 network its
//! NICs are on are written on the VIP itself, in the same batch as the EIP or rule that
//! changes them, each record expected at the generation it was read at: two attachments at
//! once cannot both decide that the VIP is free, and a conflict is read again and decided
//! again, never answered. Port forwarding translates connections through an address of its
//! own on the private network (full NAT, so a guest's replies come back whatever its
//! gateway); that address is booked at the first rule's attachment and given back with the
//! last one's detachment.
//!
//! Where each VIP lives on the hosts is not stored: it is rendered from these records
//! ([`crate::network::render`]). The operations here ask the hosts concerned to apply their
//! network again.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use strato_runtime::Kind;
use strato_storage::{Batch, Db, Expect, IndexValue, Record, StoreError, Stored};
use uuid::Uuid;

use crate::cascade::Deleter;
use crate::host::{self, Hosts};
use crate::kinds::RemoveFuture;
use crate::l3::{self, L3Error, L3s};
use crate::landed;
use crate::network::{FLAT, provider_uuid};
use crate::records::{
    EipRecord, L3NetworkRecord, NetworkServiceL3RefRecord, PortForwardingRuleRecord, VipRecord,
    VmNic, VmRecord, vip_use,
};

/// Why a VIP, EIP or port forwarding change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    /// The store failed.
    #[error("the store failed")]
    Store(#[from] StoreError),
    /// The L3 network's addresses said no.
    #[error(transparent)]
    L3(#[from] L3Error),
    /// A resource named is not there.
    #[error("no {kind} with UUID {uuid}")]
    NotFound {
        /// Its kind's API name.
        kind: &'static str,
        /// Its UUID.
        uuid: Uuid,
    },
    /// A request field the records' state refuses.
    #[error("{field}: {message}")]
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
    /// The VIP, EIP, rule or NIC is taken by something else.
    #[error("{0}")]
    InUse(String),
}

fn not_found<R: Record>(uuid: Uuid) -> VipError {
    VipError::NotFound { kind: crate::kinds::of::<R>().api, uuid }
}

fn get<R: Record>(db: &Db, uuid: Uuid) -> Result<Stored<R>, VipError> {
    db.get::<R>(uuid)?.ok_or_else(|| not_found::<R>(uuid))
}

/// The owner under which port forwarding's own address on the private network is booked.
pub fn forwarding_owner(vip: Uuid) -> Uuid {
    Uuid::new_v5(&vip, b"port-forwarding")
}

/// A VM NIC a request names, with its VM.
#[derive(Clone, Debug)]
pub struct NicTarget {
    /// The VM.
    pub vm: VmRecord,
    /// The NIC.
    pub nic: VmNic,
}

/// The NIC `nic` and its VM, or `NotFound`.
pub fn nic_target(db: &Db, nic: Uuid) -> Result<NicTarget, VipError> {
    let missing = || VipError::NotFound { kind: "VmNic", uuid: nic };
    let vm_uuid =
        db.find::<VmRecord>("nic", &nic.into())?.into_iter().next().ok_or_else(missing)?;
    let vm = db.get::<VmRecord>(vm_uuid)?.ok_or_else(missing)?.record;
    let nic = vm.vm_nics.iter().find(|n| n.uuid == nic).cloned().ok_or_else(missing)?;
    Ok(NicTarget { vm, nic })
}

/// Creates VIP `vip` (its address, mask and gateway filled in here) on its L3 network,
/// with `requested` as its address if given. `extra` adds the VIP's tags and owner to the
/// same write, which is the address's booking: the VIP and its address land together.
pub async fn create_vip(
    db: &Db,
    l3s: &Kind<L3s>,
    vip: VipRecord,
    requested: Option<Ipv4Addr>,
    extra: impl FnOnce(&mut Batch) -> Result<(), StoreError> + Send + 'static,
) -> Result<VipRecord, VipError> {
    let l3 = get::<L3NetworkRecord>(db, vip.l3_network_uuid)?.record;
    if l3.l2_network_uuid.is_none() {
        return Err(VipError::Invalid {
            field: "l3NetworkUuid",
            message: format!(
                "L3 network {} is on no L2 network: a VIP's network must reach the hosts' bridges",
                l3.uuid
            ),
        });
    }
    let written = vip.clone();
    let ip = l3::allocate_ip_with(l3s, l3.uuid, vip.uuid, requested, move |ip, range, batch| {
        let mut vip = written;
        vip.ip = ip.to_string();
        vip.netmask = range.netmask.to_string();
        vip.gateway = range.gateway.to_string();
        batch.put(&vip, Expect::Absent)?;
        extra(batch)
    })
    .await?;
    tracing::debug!(vip = %vip.uuid, %ip, "VIP created");
    Ok(get::<VipRecord>(db, vip.uuid)?.record)
}

/// Creates EIP `eip` on its VIP, which must be unused or used by no other EIP. `extra` adds
/// the EIP's tags and owner to the same write.
pub async fn create_eip(
    db: &Db,
    eip: &mut EipRecord,
    extra: impl Fn(&mut Batch) -> Result<(), StoreError>,
) -> Result<(), VipError> {
    loop {
        let stored = get::<VipRecord>(db, eip.vip_uuid)?;
        let mut vip = stored.record;
        match vip.use_for.as_deref() {
            None => {}
            Some(vip_use::EIP) => {
                return Err(VipError::InUse(format!(
                    "VIP {} already has an EIP; one VIP carries one EIP",
                    vip.uuid
                )));
            }
            Some(other) => {
                return Err(VipError::InUse(format!(
                    "VIP {} is used for {other}; a VIP has one use",
                    vip.uuid
                )));
            }
        }
        vip.use_for = Some(vip_use::EIP.into());
        eip.vip_ip = vip.ip.clone();
        let mut batch = Batch::new();
        batch.put(&*eip, Expect::Absent)?;
        batch.put(&vip, Expect::Generation(stored.generation))?;
        extra(&mut batch)?;
        match db.commit(batch).await {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict { id, .. }) if id == vip.uuid => continue,
            Err(error) => return Err(error.into()),
        }
    }
}

/// Creates port forwarding rule `rule` on its VIP, which must be unused or used for port
/// forwarding, by no rule of the same protocol on overlapping ports.
pub async fn create_port_forwarding_rule(
    db: &Db,
    rule: &mut PortForwardingRuleRecord,
    extra: impl Fn(&mut Batch) -> Result<(), StoreError>,
) -> Result<(), VipError> {
    loop {
        let stored = get::<VipRecord>(db, rule.vip_uuid)?;
        let mut vip = stored.record;
        if let Some(other) = vip.use_for.as_deref().filter(|u| *u != vip_use::PORT_FORWARDING) {
            return Err(VipError::InUse(format!(
                "VIP {} is used for {other}; a VIP has one use",
                vip.uuid
            )));
        }
        for other in rules_of(db, vip.uuid)? {
            if other.protocol_type == rule.protocol_type
                && other.vip_port_start <= rule.vip_port_end
                && rule.vip_port_start <= other.vip_port_end
            {
                return Err(VipError::InUse(format!(
                    "VIP {}'s {} ports {}-{} are forwarded by rule {} already",
                    vip.uuid,
                    other.protocol_type,
                    other.vip_port_start,
                    other.vip_port_end,
                    other.uuid
                )));
            }
        }
        vip.use_for = Some(vip_use::PORT_FORWARDING.into());
        rule.vip_ip = vip.ip.clone();
        let mut batch = Batch::new();
        batch.put(&*rule, Expect::Absent)?;
        // Written back even when unchanged: a rule created at once on overlapping ports
        // conflicts here and is checked again.
        batch.put(&vip, Expect::Generation(stored.generation))?;
        extra(&mut batch)?;
        match db.commit(batch).await {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict { id, .. }) if id == vip.uuid => continue,
            Err(error) => return Err(error.into()),
        }
    }
}

/// Every port forwarding rule of VIP `vip`.
pub fn rules_of(db: &Db, vip: Uuid) -> Result<Vec<PortForwardingRuleRecord>, StoreError> {
    records(db, db.find::<PortForwardingRuleRecord>("vip", &vip.into())?)
}

fn records<R: Record>(db: &Db, ids: Vec<Uuid>) -> Result<Vec<R>, StoreError> {
    let mut out = Vec::new();
    for id in ids {
        out.extend(db.get::<R>(id)?.map(|s| s.record));
    }
    Ok(out)
}

/// Checks that `target`'s NIC may be reached through VIP `vip` by `service` (`Eip` or
/// `PortForwarding`): on another network than the VIP's, one with the Flat provider's
/// service, and the network the VIP's other attachments reach. Returns the network's
/// reference to that service.
fn check_target(
    db: &Db,
    vip: &VipRecord,
    target: &NicTarget,
    service: &str,
) -> Result<Stored<NetworkServiceL3RefRecord>, VipError> {
    let l3 = target.nic.l3_network_uuid;
    if l3 == vip.l3_network_uuid {
        return Err(VipError::Invalid {
            field: "vmNicUuid",
            message: format!(
                "NIC {} is on the VIP's own network {l3}: a VIP carries traffic to another network",
                target.nic.uuid
            ),
        });
    }
    if let Some(peer) = vip.peer_l3_network_uuid
        && peer != l3
    {
        return Err(VipError::Invalid {
            field: "vmNicUuid",
            message: format!(
                "VIP {} reaches NICs of L3 network {peer} already; its rules reach one private network",
                vip.uuid
            ),
        });
    }
    let reference = db
        .get::<NetworkServiceL3RefRecord>(NetworkServiceL3RefRecord::id_of(l3, service))?
        .filter(|r| r.record.network_service_provider_uuid == provider_uuid(FLAT));
    let Some(reference) = reference else {
        return Err(VipError::Invalid {
            field: "vmNicUuid",
            message: format!(
                "L3 network {l3} of NIC {} has no {service} service: attach the Flat provider's {service} to it (AttachNetworkServiceToL3Network)",
                target.nic.uuid
            ),
        });
    };
    if target.vm.state == crate::vm::state::VmState::Destroyed {
        return Err(VipError::Invalid {
            field: "vmNicUuid",
            message: format!("VM {} is destroyed", target.vm.uuid),
        });
    }
    Ok(reference)
}

/// Writes the service `reference` [`check_target`] found back unchanged, expected at the
/// generation read: a detachment of the service meanwhile (which refuses while the VIP is
/// used on that network) makes the attachment's write conflict and be decided again.
fn keep_service(
    batch: &mut Batch,
    reference: &Stored<NetworkServiceL3RefRecord>,
) -> Result<(), StoreError> {
    batch.put(&reference.record, Expect::Generation(reference.generation))?;
    Ok(())
}

/// Whether an EIP or rule attached to `current` is already on `nic` (`true`: nothing to
/// do) or free (`false`); attached elsewhere, it is refused, `detach` naming the API that
/// frees it.
fn already_on(
    current: Option<Uuid>,
    nic: Uuid,
    what: &str,
    detach: &str,
) -> Result<bool, VipError> {
    match current {
        Some(on) if on == nic => Ok(true),
        Some(on) => Err(VipError::InUse(format!(
            "{what} is attached to NIC {on}; detach it first ({detach})"
        ))),
        None => Ok(false),
    }
}

/// The hosts whose network VIP `vip` is (or may have been) in: those of the VMs of the
/// NICs its EIP and rules are attached to.
pub fn hosts_of_vip(db: &Db, vip: Uuid) -> Result<Vec<Uuid>, StoreError> {
    let mut nics: Vec<Uuid> =
        rules_of(db, vip)?.into_iter().filter_map(|r| r.vm_nic_uuid).collect();
    let eips: Vec<EipRecord> = records(db, db.find::<EipRecord>("vip", &vip.into())?)?;
    nics.extend(eips.into_iter().filter_map(|e| e.vm_nic_uuid));
    let mut hosts = Vec::new();
    for nic in nics {
        for vm in db.find::<VmRecord>("nic", &nic.into())? {
            if let Some(vm) = db.get::<VmRecord>(vm)? {
                hosts.extend(vm.record.host_uuid);
            }
        }
    }
    hosts.sort();
    hosts.dedup();
    Ok(hosts)
}

/// Runs `change` on VIP `vip`'s records and asks every host it was or is on to apply its
/// network again.
async fn refreshing<T>(
    db: &Db,
    hosts: &Kind<Hosts>,
    vip: Uuid,
    change: impl std::future::Future<Output = Result<T, VipError>>,
) -> Result<T, VipError> {
    let mut concerned = hosts_of_vip(db, vip)?;
    let out = change.await;
    concerned.extend(hosts_of_vip(db, vip)?);
    concerned.sort();
    concerned.dedup();
    for host in concerned {
        host::refresh_network(hosts, host);
    }
    out
}

/// The NICs an EIP is being attached to in this process. Two attachments of two EIPs to one
/// NIC would each find the NIC free (the EIPs are different records, so no compare-and-swap
/// sees the other); they take their turns here instead. One MN serves every request today;
/// several (issue 17's scale-out) will need the claim in the store.
static ATTACHING: std::sync::Mutex<BTreeSet<Uuid>> = std::sync::Mutex::new(BTreeSet::new());

/// A NIC's turn in [`ATTACHING`], given back when dropped.
struct NicTurn(Uuid);

impl NicTurn {
    async fn take(nic: Uuid) -> NicTurn {
        while !ATTACHING.lock().expect("attaching NICs").insert(nic) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        NicTurn(nic)
    }
}

impl Drop for NicTurn {
    fn drop(&mut self) {
        ATTACHING.lock().expect("attaching NICs").remove(&self.0);
    }
}

/// Attaches EIP `eip` to `target`'s NIC.
pub async fn attach_eip(
    db: &Db,
    hosts: &Kind<Hosts>,
    eip: Uuid,
    target: NicTarget,
) -> Result<EipRecord, VipError> {
    let vip_uuid = get::<EipRecord>(db, eip)?.record.vip_uuid;
    let _turn = NicTurn::take(target.nic.uuid).await;
    refreshing(db, hosts, vip_uuid, async {
        loop {
            // As the NIC is now: its VM may have gone since the request.
            let target = nic_target(db, target.nic.uuid)?;
            let stored = get::<EipRecord>(db, eip)?;
            let mut record = stored.record;
            let vip_stored = get::<VipRecord>(db, record.vip_uuid)?;
            let mut vip = vip_stored.record;
            if already_on(record.vm_nic_uuid, target.nic.uuid, &format!("EIP {eip}"), "DetachEip")?
            {
                return Ok(record);
            }
            if let Some(other) = db
                .find::<EipRecord>("nic", &target.nic.uuid.into())?
                .into_iter()
                .find(|e| *e != eip)
            {
                return Err(VipError::InUse(format!(
                    "NIC {} has EIP {other} already; a NIC has one",
                    target.nic.uuid
                )));
            }
            let service = check_target(db, &vip, &target, crate::network::service::EIP)?;
            record.vm_nic_uuid = Some(target.nic.uuid);
            record.guest_ip = Some(target.nic.ip.clone());
            vip.peer_l3_network_uuid = Some(target.nic.l3_network_uuid);
            let mut batch = Batch::new();
            batch.put(&record, Expect::Generation(stored.generation))?;
            batch.put(&vip, Expect::Generation(vip_stored.generation))?;
            keep_service(&mut batch, &service)?;
            if landed(db, batch).await? {
                return Ok(record);
            }
        }
    })
    .await
}

/// Detaches EIP `eip` from its NIC (nothing to do if it is not attached), or deletes it
/// when `delete`.
async fn release_eip(db: &Db, eip: Uuid, delete: bool) -> Result<Option<EipRecord>, VipError> {
    loop {
        let Some(stored) = db.get::<EipRecord>(eip)? else {
            return if delete { Ok(None) } else { Err(not_found::<EipRecord>(eip)) };
        };
        let mut record = stored.record;
        let mut batch = Batch::new();
        let vip = db.get::<VipRecord>(record.vip_uuid)?;
        if let Some(vip_stored) = &vip {
            let mut vip = vip_stored.record.clone();
            vip.peer_l3_network_uuid = None;
            if delete {
                vip.use_for = None;
            }
            if vip != vip_stored.record {
                batch.put(&vip, Expect::Generation(vip_stored.generation))?;
            }
        }
        if delete {
            batch.delete::<EipRecord>(eip, Expect::Generation(stored.generation));
            crate::records::delete_refs(db, &mut batch, eip)?;
        } else if record.vm_nic_uuid.is_some() {
            record.vm_nic_uuid = None;
            record.guest_ip = None;
            batch.put(&record, Expect::Generation(stored.generation))?;
        } else {
            return Ok(Some(record));
        }
        if landed(db, batch).await? {
            return Ok(Some(record));
        }
    }
}

/// Deletes EIP `eip` (detached first), leaving its VIP unused.
pub async fn delete_eip(db: &Db, hosts: &Kind<Hosts>, eip: Uuid) -> Result<(), VipError> {
    let Some(vip) = db.get::<EipRecord>(eip)?.map(|s| s.record.vip_uuid) else { return Ok(()) };
    refreshing(db, hosts, vip, release_eip(db, eip, true)).await.map(drop)
}

/// Deletes port forwarding rule `rule` (detached first).
pub async fn delete_port_forwarding_rule(
    db: &Db,
    l3s: &Kind<L3s>,
    hosts: &Kind<Hosts>,
    rule: Uuid,
) -> Result<(), VipError> {
    let Some(vip) = db.get::<PortForwardingRuleRecord>(rule)?.map(|s| s.record.vip_uuid) else {
        return Ok(());
    };
    refreshing(db, hosts, vip, release_rule(db, l3s, rule, true)).await.map(drop)
}

/// Detaches EIP `eip` from its NIC.
pub async fn detach_eip(db: &Db, hosts: &Kind<Hosts>, eip: Uuid) -> Result<EipRecord, VipError> {
    let vip = get::<EipRecord>(db, eip)?.record.vip_uuid;
    refreshing(db, hosts, vip, async {
        release_eip(db, eip, false).await?.ok_or_else(|| not_found::<EipRecord>(eip))
    })
    .await
}

/// Attaches port forwarding rule `rule` to `target`'s NIC, booking the forwarding's own
/// address on the NIC's network if the VIP has none yet.
pub async fn attach_port_forwarding_rule(
    db: &Db,
    l3s: &Kind<L3s>,
    hosts: &Kind<Hosts>,
    rule: Uuid,
    target: NicTarget,
) -> Result<PortForwardingRuleRecord, VipError> {
    let vip_uuid = get::<PortForwardingRuleRecord>(db, rule)?.record.vip_uuid;
    let l3 = target.nic.l3_network_uuid;
    refreshing(db, hosts, vip_uuid, async {
        loop {
            // As the NIC is now: its VM may have gone since the request.
            let target = nic_target(db, target.nic.uuid)?;
            let stored = get::<PortForwardingRuleRecord>(db, rule)?;
            let mut record = stored.record;
            let vip_stored = get::<VipRecord>(db, record.vip_uuid)?;
            let mut vip = vip_stored.record;
            let what = format!("rule {rule}");
            if already_on(record.vm_nic_uuid, target.nic.uuid, &what, "DetachPortForwardingRule")? {
                return Ok(record);
            }
            let service =
                check_target(db, &vip, &target, crate::network::service::PORT_FORWARDING)?;
            vip.peer_l3_network_uuid = Some(l3);
            record.vm_nic_uuid = Some(target.nic.uuid);
            record.guest_ip = Some(target.nic.ip.clone());
            let attached = record.clone();
            let (rule_expected, vip_expected) =
                (Expect::Generation(stored.generation), Expect::Generation(vip_stored.generation));
            let write = move |vip: &VipRecord, batch: &mut Batch| -> Result<(), StoreError> {
                batch.put(&record, rule_expected)?;
                batch.put(vip, vip_expected)?;
                keep_service(batch, &service)
            };
            let written = if vip.private_ip.is_some() {
                let mut batch = Batch::new();
                write(&vip, &mut batch)?;
                landed(db, batch).await?
            } else {
                // The forwarding's own address is booked in the same write as the VIP that
                // names it: a conflict books nothing.
                let owner = forwarding_owner(vip.uuid);
                let booked = l3::allocate_ip_with(l3s, l3, owner, None, move |ip, _, batch| {
                    vip.private_ip = Some(ip.to_string());
                    write(&vip, batch)
                })
                .await;
                match booked {
                    Ok(_) => true,
                    Err(L3Error::Store(StoreError::Conflict { .. })) => false,
                    Err(error) => return Err(error.into()),
                }
            };
            if written {
                return Ok(attached);
            }
        }
    })
    .await
}

/// Detaches port forwarding rule `rule` (nothing to do if it is not attached), or deletes
/// it when `delete`; the last attached rule of its VIP gives the forwarding's address back.
async fn release_rule(
    db: &Db,
    l3s: &Kind<L3s>,
    rule: Uuid,
    delete: bool,
) -> Result<Option<PortForwardingRuleRecord>, VipError> {
    loop {
        let Some(stored) = db.get::<PortForwardingRuleRecord>(rule)? else {
            return if delete {
                Ok(None)
            } else {
                Err(not_found::<PortForwardingRuleRecord>(rule))
            };
        };
        let mut record = stored.record;
        // The VIP first: every change of its rules writes it, so its generation covers the
        // rules read after it.
        let vip_read = db.get::<VipRecord>(record.vip_uuid)?;
        let others: Vec<PortForwardingRuleRecord> =
            rules_of(db, record.vip_uuid)?.into_iter().filter(|r| r.uuid != rule).collect();
        let mut batch = Batch::new();
        let mut freed = None;
        if let Some(vip_stored) = vip_read {
            let mut vip = vip_stored.record.clone();
            if others.iter().all(|r| r.vm_nic_uuid.is_none()) {
                freed = vip.peer_l3_network_uuid.zip(vip.private_ip.take());
                vip.peer_l3_network_uuid = None;
            }
            if delete && others.is_empty() {
                vip.use_for = None;
            }
            // Written back even when unchanged: the decision above read the other rules.
            batch.put(&vip, Expect::Generation(vip_stored.generation))?;
        }
        if delete {
            batch.delete::<PortForwardingRuleRecord>(rule, Expect::Generation(stored.generation));
            crate::records::delete_refs(db, &mut batch, rule)?;
        } else if record.vm_nic_uuid.is_some() {
            record.vm_nic_uuid = None;
            record.guest_ip = None;
            batch.put(&record, Expect::Generation(stored.generation))?;
        } else {
            return Ok(Some(record));
        }
        let written = match freed.and_then(|(l3, ip)| Some((l3, ip.parse().ok()?))) {
            Some((l3, ip)) => {
                let owner = forwarding_owner(record.vip_uuid);
                commit_releasing(db, l3s, l3, ip, owner, batch).await?
            }
            None => landed(db, batch).await?,
        };
        if written {
            return Ok(Some(record));
        }
    }
}

/// Commits `batch` with the release of `owner`'s booking of `ip` on L3 `l3`, through the
/// network's queue, so that both land or neither does; a network deleted since holds no
/// booking, and `batch` is committed alone. `false`: another writer changed a record
/// `batch` expects first (read them again and decide again).
async fn commit_releasing(
    db: &Db,
    l3s: &Kind<L3s>,
    l3: Uuid,
    ip: Ipv4Addr,
    owner: Uuid,
    batch: Batch,
) -> Result<bool, VipError> {
    if db.get::<L3NetworkRecord>(l3)?.is_none() {
        return Ok(landed(db, batch).await?);
    }
    match l3::release_ip_with(l3s, l3, ip, owner, batch).await {
        Ok(()) => Ok(true),
        Err(L3Error::Store(StoreError::Conflict { .. })) => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// Deletes VIP `vip`, once `may_go` allows it, giving back its addresses in the same
/// writes: the forwarding's own address first (the VIP written without it), then the VIP
/// with its public address. Each write is whole, so a deletion stopped between them and
/// repeated finishes the work. Returns the VIP as it was deleted, if it existed.
async fn delete_vip<E: From<VipError>>(
    db: &Db,
    l3s: &Kind<L3s>,
    vip: Uuid,
    may_go: impl Fn() -> Result<(), E>,
) -> Result<Option<VipRecord>, E> {
    let store = |error: StoreError| E::from(VipError::from(error));
    loop {
        let Some(stored) = db.get::<VipRecord>(vip).map_err(store)? else { return Ok(None) };
        let record = stored.record;
        let forwarding = record.peer_l3_network_uuid.zip(record.private_ip.clone());
        if let Some((l3, ip)) = forwarding.and_then(|(l3, ip)| Some((l3, ip.parse().ok()?))) {
            let mut cleared = record.clone();
            cleared.private_ip = None;
            let mut batch = Batch::new();
            batch.put(&cleared, Expect::Generation(stored.generation)).map_err(store)?;
            commit_releasing(db, l3s, l3, ip, forwarding_owner(vip), batch).await?;
            continue;
        }
        may_go()?;
        let mut batch = Batch::new();
        batch.delete::<VipRecord>(vip, Expect::Generation(stored.generation));
        crate::records::delete_refs(db, &mut batch, vip).map_err(store)?;
        let written = match record.ip.parse() {
            Ok(ip) => commit_releasing(db, l3s, record.l3_network_uuid, ip, vip, batch).await?,
            Err(_) => landed(db, batch).await.map_err(store)?,
        };
        if written {
            return Ok(Some(record));
        }
    }
}

/// Detaches port forwarding rule `rule` from its NIC.
pub async fn detach_port_forwarding_rule(
    db: &Db,
    l3s: &Kind<L3s>,
    hosts: &Kind<Hosts>,
    rule: Uuid,
) -> Result<PortForwardingRuleRecord, VipError> {
    let vip = get::<PortForwardingRuleRecord>(db, rule)?.record.vip_uuid;
    refreshing(db, hosts, vip, async {
        release_rule(db, l3s, rule, false)
            .await?
            .ok_or_else(|| not_found::<PortForwardingRuleRecord>(rule))
    })
    .await
}

/// Detaches the EIPs and port forwarding rules of NICs `nics` (a VM's, as it is expunged),
/// asking the hosts concerned to apply their network (port forwarding's home may move).
/// Safe to repeat: a detached one is left as it is.
pub async fn detach_nics(
    db: &Db,
    l3s: &Kind<L3s>,
    hosts: &Kind<Hosts>,
    nics: &[Uuid],
) -> Result<(), VipError> {
    for nic in nics {
        for eip in db.find::<EipRecord>("nic", &IndexValue::Uuid(*nic))? {
            let Some(vip) = db.get::<EipRecord>(eip)?.map(|e| e.record.vip_uuid) else { continue };
            refreshing(db, hosts, vip, release_eip(db, eip, false)).await?;
        }
        for rule in db.find::<PortForwardingRuleRecord>("nic", &IndexValue::Uuid(*nic))? {
            let Some(vip) = db.get::<PortForwardingRuleRecord>(rule)?.map(|r| r.record.vip_uuid)
            else {
                continue;
            };
            refreshing(db, hosts, vip, release_rule(db, l3s, rule, false)).await?;
        }
    }
    Ok(())
}

/// Deletes an EIP (detached first), leaving its VIP unused.
pub(crate) fn remove_eip(deleter: &Deleter, id: Uuid) -> RemoveFuture<'_> {
    Box::pin(async move { Ok(delete_eip(&deleter.db, &deleter.hosts, id).await?) })
}

/// Deletes a port forwarding rule (detached first).
pub(crate) fn remove_port_forwarding_rule(deleter: &Deleter, id: Uuid) -> RemoveFuture<'_> {
    Box::pin(async move {
        Ok(delete_port_forwarding_rule(&deleter.db, &deleter.l3s, &deleter.hosts, id).await?)
    })
}

/// Deletes a VIP with nothing using it, with its addresses (see [`delete_vip`]).
pub(crate) fn remove_vip(deleter: &Deleter, id: Uuid) -> RemoveFuture<'_> {
    Box::pin(async move {
        let resource = crate::cascade::Resource { kind: crate::kinds::of::<VipRecord>(), uuid: id };
        let may_go = || {
            let dependents = deleter.dependents(resource)?;
            if dependents.is_empty() {
                return Ok(());
            }
            // Made while the deletion ran (its dependents were gone when it started).
            Err(crate::cascade::CascadeError::HasDependents { resource, dependents })
        };
        let Some(vip) = delete_vip(&deleter.db, &deleter.l3s, id, may_go).await? else {
            return Ok(());
        };
        // A SNAT's VIP leaves the host that held it.
        if let Some(private) = vip.peer_l3_network_uuid
            && let Some(l3) = deleter.db.get::<L3NetworkRecord>(private)?
        {
            for host in crate::network::hosts_of_l3(&deleter.db, &l3.record)? {
                host::refresh_network(&deleter.hosts, host);
            }
        }
        Ok(())
    })
}

/// The UUID of private L3 network `l3`'s SNAT VIP: one per network, whoever makes it.
pub fn snat_vip(l3: Uuid) -> Uuid {
    Uuid::new_v5(&l3, b"snat")
}

/// The public L3 network L3 `l3`'s `snat::` tag names, if any.
pub fn snat_public(db: &Db, l3: Uuid) -> Result<Option<Uuid>, StoreError> {
    Ok(crate::tags::system_tokens(db, l3, "snat")?
        .into_iter()
        .find_map(|t| t.first().and_then(|u| crate::canonical_uuid(u))))
}

/// Makes private L3 network `l3`'s SNAT VIP what its services say: booked on the public
/// network its `snat::` tag names while it has the Flat SNAT, gone otherwise. Safe to
/// repeat, and to run twice at once (the VIP's UUID is fixed).
pub async fn sync_snat(db: &Db, l3s: &Kind<L3s>, l3: Uuid) -> Result<(), VipError> {
    let wanted = if crate::network::services_of(db, l3)?.iter().any(|(provider, service)| {
        provider == crate::network::FLAT && service == crate::network::service::SNAT
    }) {
        snat_public(db, l3)?
    } else {
        None
    };
    let existing = db.get::<VipRecord>(snat_vip(l3))?.map(|s| s.record);
    if let Some(vip) = &existing
        && Some(vip.l3_network_uuid) != wanted
    {
        drop_vip(db, l3s, vip.uuid).await?;
    }
    let Some(public) = wanted else { return Ok(()) };
    if existing.is_some_and(|v| v.l3_network_uuid == public) {
        return Ok(());
    }
    let vip = VipRecord {
        uuid: snat_vip(l3),
        name: format!("snat-{l3}"),
        description: format!("the source NAT of L3 network {l3}"),
        l3_network_uuid: public,
        ip: String::new(),
        netmask: String::new(),
        gateway: String::new(),
        use_for: Some(vip_use::SNAT.into()),
        peer_l3_network_uuid: Some(l3),
        private_ip: None,
        state: "Enabled".into(),
    };
    match create_vip(db, l3s, vip, None, |_| Ok(())).await {
        // Another sync made it first.
        Err(VipError::L3(L3Error::Store(StoreError::Conflict { .. }))) => Ok(()),
        other => other.map(drop),
    }
}

/// Deletes VIP `vip` whatever uses it, with its addresses (a SNAT VIP going with its
/// service or its network).
pub async fn drop_vip(db: &Db, l3s: &Kind<L3s>, vip: Uuid) -> Result<(), VipError> {
    delete_vip(db, l3s, vip, || Ok(())).await.map(drop)
}
