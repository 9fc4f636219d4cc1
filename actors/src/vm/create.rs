//! Creating a VM: a flow (chain `vm.create`) whose every step has an undo.
//!
//! 1. `record`: charge a tenant's VM to its account's quota (under the account's lock, so
//!    creations at once cannot take one last slot), then write the VM record, state Created,
//!    with its tags (undo: delete them, the charge with them);
//! 2. `allocate-host`: pick a host and book its capacity (undo: give back what this VM booked
//!    on any host; bookings are keyed by VM, so the undo needs no memory of the choice);
//! 3. `allocate-nics`: an address on each L3 network (undo: give back every address this
//!    VM's NICs hold; NIC UUIDs derive from the VM and the network);
//! 4. `create-root-volume`: when the VM has an image, cache it on the host's primary storage
//!    and make a qcow2 root volume backed by it (undo: delete the volume);
//! 5. `start-domain`: define and start the domain on the host (undo: destroy and undefine it).
//!
//! A step's own changes to the VM record are written with the flow's checkpoint that
//! records the step's end (`FlowInfo::write_at_end`), so a creation makes one durable write
//! per step plus those of the host and L3 actors it asks for a booking and an address.
//!
//! The flow owns the VM record from the `record` step to its end: only its steps write it
//! (each with its checkpoint), and the VM actor, which owns it afterwards, reads it afresh at
//! the start of every operation (`vm::begin`) and refuses every operation on a VM still
//! `Created`, so the two never write it at once.
//!
//! A failure at any step rolls back everything before it, and the flow engine persists
//! progress, so a crash of the MN mid-creation is rolled back at the next start: no record,
//! booking, address, volume or domain is left behind. Other modules can add steps with the
//! flow engine's `insert_before`/`insert_after`.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use strato_proto::{Command, Reply};
use strato_runtime::{BoxError, ChainSpec, FlowInfo, FlowJob, Kind, Runtime, Step};
use strato_storage::{Batch, Db, Expect};
use uuid::Uuid;

use super::state::VmState;
use crate::allocator::{self, Need};
use crate::host::{self, Hosts, Overcommit};
use crate::l3::{self, L3s};
use crate::owners::{Charge, OwnerRecord, Quotas};
use crate::records::{
    HostRecord, ImageRecord, L2NetworkRecord, L3NetworkRecord, PrimaryStorageRecord, UsedIpRecord,
    VmNic, VmRecord, VolumeRecord,
};
use crate::tags::{SystemTag, UserTag, VM_RESOURCE_TYPE};

/// The chain's name.
pub const CREATE_CHAIN: &str = "vm.create";

/// What a creation asks for, and what its steps found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVm {
    /// The new VM's UUID.
    pub vm: Uuid,
    /// Its name.
    pub name: String,
    /// CPUs.
    pub cpu_num: u32,
    /// Memory in bytes.
    pub memory_size: u64,
    /// One NIC on each of these L3 networks.
    pub l3_networks: Vec<Uuid>,
    /// Only hosts of these clusters.
    pub clusters: Option<Vec<Uuid>>,
    /// Only this host.
    pub pinned_host: Option<Uuid>,
    /// The host chosen (set by `allocate-host`).
    pub host: Option<Uuid>,
    /// The NICs made (set by `allocate-nics`).
    pub nics: Vec<VmNic>,
    /// The image of its root volume (none: a diskless VM).
    #[serde(default)]
    pub image: Option<Uuid>,
    /// Addresses asked for by `staticIp` system tags, by L3 network: IPAM hands out exactly
    /// these or the creation fails.
    #[serde(default)]
    pub static_ips: Vec<(Uuid, Ipv4Addr)>,
    /// System tags to hang on the VM (checked by the caller), written with its record.
    #[serde(default)]
    pub system_tags: Vec<String>,
    /// User tags to hang on the VM, written with its record.
    #[serde(default)]
    pub user_tags: Vec<String>,
    /// The VM as the creation left it (set by `start-domain`): what the creation answers,
    /// even if another operation has changed or deleted it by the time the flow returns.
    #[serde(default)]
    pub created: Option<VmRecord>,
    /// The account the VM is charged to, with what it counts (none: the admin's VM).
    #[serde(default)]
    pub charge_to: Option<(Uuid, Charge)>,
}

/// The ownership record (the charge) of the VM `c` creates.
fn owner_of(c: &CreateVm) -> Option<OwnerRecord> {
    c.charge_to.map(|(account, charge)| OwnerRecord {
        resource_uuid: c.vm,
        resource_type: VM_RESOURCE_TYPE.to_owned(),
        account_uuid: account,
        charge,
    })
}

/// The UUID of VM `vm`'s NIC on L3 `l3`.
pub fn nic_id(vm: Uuid, l3: Uuid) -> Uuid {
    Uuid::new_v5(&vm, l3.as_bytes())
}

/// A MAC address derived from the NIC's UUID, in QEMU's locally administered range.
fn mac_of(nic: Uuid) -> String {
    let b = nic.as_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// The VM record changed by `change`, as a batch that writes it if nobody else has since.
fn vm_write(
    db: &Db,
    vm: Uuid,
    change: impl FnOnce(&mut VmRecord),
) -> Result<(VmRecord, Batch), BoxError> {
    let stored =
        db.get::<VmRecord>(vm)?.ok_or_else(|| format!("VM {vm} vanished during creation"))?;
    let mut record = stored.record;
    change(&mut record);
    let mut batch = Batch::new();
    batch.put(&record, Expect::Generation(stored.generation))?;
    Ok((record, batch))
}

/// Changes the VM record with the step's end (one durable write for both).
fn write_vm_at_end(
    db: &Db,
    flow: &FlowInfo,
    vm: Uuid,
    change: impl FnOnce(&mut VmRecord),
) -> Result<VmRecord, BoxError> {
    let (record, batch) = vm_write(db, vm, change)?;
    flow.write_at_end(batch);
    Ok(record)
}

struct RecordStep {
    db: Db,
    quotas: Arc<Quotas>,
}

#[async_trait]
impl Step<CreateVm> for RecordStep {
    async fn run(&self, c: &mut CreateVm, flow: &FlowInfo) -> Result<(), BoxError> {
        if self.db.get::<VmRecord>(c.vm)?.is_some() {
            return Ok(()); // a repeat after a crash
        }
        // The charge is durable before the step ends: the lock it is checked under does not
        // outlast the step. Its undo is this step's: the VM's references go with its record.
        if let Some(owner) = owner_of(c) {
            self.quotas.charge(&self.db, &owner).await?;
        }
        let record = VmRecord {
            uuid: c.vm,
            name: c.name.clone(),
            state: VmState::Created,
            host_uuid: None,
            last_host_uuid: None,
            cpu_num: c.cpu_num,
            memory_size: c.memory_size,
            root_volume_path: None,
            vm_nics: Vec::new(),
        };
        let mut batch = Batch::new();
        batch.put(&record, Expect::Absent)?;
        for tag in &c.system_tags {
            batch.put(&SystemTag::new(c.vm, VM_RESOURCE_TYPE, tag), Expect::Absent)?;
        }
        for tag in &c.user_tags {
            batch.put(&UserTag::new(c.vm, VM_RESOURCE_TYPE, tag), Expect::Absent)?;
        }
        flow.write_at_end(batch);
        Ok(())
    }

    async fn rollback(&self, c: &mut CreateVm, _: &FlowInfo) -> Result<(), BoxError> {
        let mut batch = Batch::new();
        batch.delete::<VmRecord>(c.vm, Expect::Any);
        crate::records::delete_refs(&self.db, &mut batch, c.vm)?;
        self.db.commit(batch).await?;
        Ok(())
    }
}

struct AllocateHost {
    db: Db,
    hosts: Kind<Hosts>,
    overcommit: Overcommit,
}

#[async_trait]
impl Step<CreateVm> for AllocateHost {
    async fn run(&self, c: &mut CreateVm, flow: &FlowInfo) -> Result<(), BoxError> {
        // Its root volume books the image's size on the host's local storage (the file
        // grows toward the image's virtual size, which is not recorded).
        let disk = match c.image {
            Some(image) => self.db.get::<ImageRecord>(image)?.map_or(0, |i| i.record.size),
            None => 0,
        };
        let need = Need {
            cpu: c.cpu_num,
            memory: c.memory_size,
            disk,
            clusters: c.clusters.clone(),
            pinned: c.pinned_host,
            l2_clusters: l2_clusters(&self.db, &c.l3_networks)?,
        };
        let host = allocator::place(&self.hosts, c.vm, &need, self.overcommit).await?;
        c.host = Some(host);
        write_vm_at_end(&self.db, flow, c.vm, |r| r.host_uuid = Some(host)).map(drop)
    }

    async fn rollback(&self, c: &mut CreateVm, _: &FlowInfo) -> Result<(), BoxError> {
        // Wherever this VM booked capacity (the choice may not have been saved), give it back.
        for stored in self.db.scan::<HostRecord>() {
            let record = stored?.record;
            if record.reservations.contains_key(&c.vm) {
                host::release(&self.hosts, record.uuid, c.vm).await?;
            }
        }
        c.host = None;
        Ok(())
    }
}

/// The clusters every L2 network under `l3s` is attached to (`None` when no L3 names an L2).
fn l2_clusters(db: &Db, l3s: &[Uuid]) -> Result<Option<Vec<Uuid>>, BoxError> {
    let mut allowed: Option<Vec<Uuid>> = None;
    for l3 in l3s {
        let Some(l2) = db.get::<L3NetworkRecord>(*l3)?.and_then(|s| s.record.l2_network_uuid)
        else {
            continue;
        };
        let attached = match db.get::<L2NetworkRecord>(l2)? {
            // A VXLAN network reaches its pool's clusters.
            Some(stored) => crate::network::clusters_of(db, &stored.record)?,
            None => Vec::new(),
        };
        allowed = Some(match allowed {
            None => attached,
            Some(so_far) => so_far.into_iter().filter(|c| attached.contains(c)).collect(),
        });
    }
    Ok(allowed)
}

struct AllocateNics {
    db: Db,
    l3s: Kind<L3s>,
}

#[async_trait]
impl Step<CreateVm> for AllocateNics {
    async fn run(&self, c: &mut CreateVm, flow: &FlowInfo) -> Result<(), BoxError> {
        for l3 in c.l3_networks.clone() {
            let nic = nic_id(c.vm, l3);
            if c.nics.iter().any(|n| n.uuid == nic) {
                continue;
            }
            let requested = c.static_ips.iter().find(|(on, _)| *on == l3).map(|(_, ip)| *ip);
            let ip = l3::allocate_ip(&self.l3s, l3, nic, requested).await?;
            let bridge = match self.db.get::<L3NetworkRecord>(l3)? {
                Some(stored) => crate::network::nic_bridge(&self.db, &stored.record)?,
                None => None,
            };
            c.nics.push(VmNic {
                uuid: nic,
                l3_network_uuid: l3,
                ip: ip.to_string(),
                mac: mac_of(nic),
                bridge,
            });
        }
        let nics = c.nics.clone();
        write_vm_at_end(&self.db, flow, c.vm, |r| r.vm_nics = nics).map(drop)
    }

    async fn rollback(&self, c: &mut CreateVm, _: &FlowInfo) -> Result<(), BoxError> {
        // The record lets go of its NICs before their addresses are given back: an address
        // free while a record still shows it could be handed to another VM, and two records
        // would show it (found by chaos seed 12, under injected store errors).
        if let Some(stored) = self.db.get::<VmRecord>(c.vm)?
            && !stored.record.vm_nics.is_empty()
        {
            // Now, not at the rollback's end: before the addresses below are given back.
            let (_, batch) = vm_write(&self.db, c.vm, |r| r.vm_nics.clear())?;
            self.db.commit(batch).await?;
        }
        // Every address a NIC of this VM holds, whether or not the step saved it.
        for l3 in c.l3_networks.clone() {
            let nic = nic_id(c.vm, l3);
            for id in self.db.find::<UsedIpRecord>("l3", &l3.into())? {
                if let Some(used) = self.db.get::<UsedIpRecord>(id)?
                    && used.record.owner == nic
                {
                    let ip: Ipv4Addr = used.record.ip.parse()?;
                    l3::release_ip(&self.l3s, l3, ip, nic).await?;
                }
            }
        }
        c.nics.clear();
        Ok(())
    }
}

struct CreateRootVolume {
    db: Db,
    hosts: Kind<Hosts>,
}

/// The primary storage serving host `host`'s cluster.
pub(crate) fn primary_storage_of(db: &Db, host: Uuid) -> Result<PrimaryStorageRecord, BoxError> {
    let cluster =
        db.get::<HostRecord>(host)?.ok_or("the chosen host vanished")?.record.cluster_uuid;
    for stored in db.scan::<PrimaryStorageRecord>() {
        let ps = stored?.record;
        if ps.attached_cluster_uuids.contains(&cluster) {
            return Ok(ps);
        }
    }
    Err(format!("no primary storage is attached to cluster {cluster}").into())
}

#[async_trait]
impl Step<CreateVm> for CreateRootVolume {
    async fn run(&self, c: &mut CreateVm, flow: &FlowInfo) -> Result<(), BoxError> {
        let Some(image) = c.image else { return Ok(()) };
        let host = c.host.ok_or("no host was allocated")?;
        let ps = primary_storage_of(&self.db, host)?;
        let record = self
            .db
            .get::<ImageRecord>(image)?
            .ok_or_else(|| format!("image {image} vanished"))?
            .record;
        let source = crate::backup_storage::image_source(&self.db, &record)?
            .ok_or("the image is in no backup storage")?;
        // On shared storage the root volume books its image's size on the storage (on local
        // storage the host's booking, made by the allocator, holds it).
        let root = crate::records::root_volume_id(c.vm);
        if !ps.is_local()
            && !crate::shared_capacity::book(&self.db, ps.uuid, root, record.size).await?
        {
            let full =
                crate::volume::VolumeError::NoSharedRoom { storage: ps.uuid, size: record.size };
            return Err(full.into());
        }
        let backing = crate::backup_storage::cache_on_host(
            &self.hosts,
            host,
            image,
            &source,
            &ps.image_cache_dir(),
            volume_deadline(flow),
            flow.job_id,
        )
        .await?;
        let made = host::command(
            &self.hosts,
            host,
            Command::CreateRootVolume { volume: c.vm, backing, dir: ps.root_volumes_dir() },
            volume_deadline(flow),
            flow.job_id,
        )
        .await?;
        let Reply::Volume { path, virtual_size, .. } = made else {
            return Err("the agent did not create the volume".into());
        };
        let vm =
            write_vm_at_end(&self.db, flow, c.vm, |r| r.root_volume_path = Some(path.clone()))?;
        // Its record, owned as its VM, in the same write.
        let root = VolumeRecord::root(&vm, ps.uuid, host, path, virtual_size);
        let mut batch = Batch::new();
        batch.put(&root, Expect::Any)?;
        if let Some(owner) = owner_of(c) {
            let owner = OwnerRecord {
                resource_uuid: root.uuid,
                resource_type: "VolumeVO".into(),
                charge: Charge::default(),
                ..owner
            };
            batch.put(&owner, Expect::Any)?;
        }
        flow.write_at_end(batch);
        Ok(())
    }

    async fn rollback(&self, c: &mut CreateVm, flow: &FlowInfo) -> Result<(), BoxError> {
        let (Some(_), Some(host)) = (c.image, c.host) else { return Ok(()) };
        let root = crate::records::root_volume_id(c.vm);
        let mut batch = Batch::new();
        batch.delete::<VolumeRecord>(root, Expect::Any);
        crate::records::delete_refs(&self.db, &mut batch, root)?;
        self.db.commit(batch).await?;
        let ps = primary_storage_of(&self.db, host)?;
        if !ps.is_local() {
            crate::shared_capacity::unbook(&self.db, ps.uuid, root).await?;
        }
        // The agent names a volume after its UUID: the path needs no memory of the step.
        let path = format!("{}/{}.qcow2", ps.root_volumes_dir(), c.vm);
        let command = Command::DeleteVolume { path: path.clone() };
        match host::command(&self.hosts, host, command, deadline(flow), flow.job_id).await {
            Ok(_) => Ok(()),
            // The host is away: the volume goes when it is back (the GC's job).
            Err(error) if error.is_unreachable() => {
                super::ops::submit_delete_volume(self.hosts.runtime(), host, path).await?;
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }
}

struct StartDomain {
    db: Db,
    hosts: Kind<Hosts>,
}

/// How long a command on a domain may take at most: a hypervisor that answers pings but
/// hangs on a domain must not hold one of its host's command slots for the whole job.
const COMMAND_TIME: Duration = Duration::from_secs(120);

/// When a command on a domain must be answered by: the job's deadline, or [`COMMAND_TIME`]
/// from now if that is sooner (a rollback gets time of its own, see `FlowInfo::deadline`).
fn deadline(flow: &FlowInfo) -> SystemTime {
    flow.deadline_or(COMMAND_TIME).min(SystemTime::now() + COMMAND_TIME)
}

/// When a command on a volume must be answered by: the job's deadline (caching an image on
/// the host copies it, which may take as long as the job has).
fn volume_deadline(flow: &FlowInfo) -> SystemTime {
    flow.deadline_or(COMMAND_TIME)
}

#[async_trait]
impl Step<CreateVm> for StartDomain {
    async fn run(&self, c: &mut CreateVm, flow: &FlowInfo) -> Result<(), BoxError> {
        let host = c.host.ok_or("no host was allocated")?;
        // The VM stays Created until its domain runs: `Starting` belongs to the VM actor's
        // own start operation, so a VM found Starting with no operation running is known to
        // be left over by a crash (see `vm::begin`).
        let record = self.db.get::<VmRecord>(c.vm)?.ok_or("VM record vanished")?.record;
        // The guest asks for its address as it boots: its host's DHCP knows it first.
        host::apply_network(&self.hosts, host, flow.job_id).await?;
        host::command(
            &self.hosts,
            host,
            Command::DefineDomain(record.domain_spec(Vec::new())),
            deadline(flow),
            flow.job_id,
        )
        .await?;
        host::command(
            &self.hosts,
            host,
            Command::StartDomain { uuid: c.vm },
            deadline(flow),
            flow.job_id,
        )
        .await?;
        c.created = Some(write_vm_at_end(&self.db, flow, c.vm, |r| r.state = VmState::Running)?);
        Ok(())
    }

    async fn rollback(&self, c: &mut CreateVm, flow: &FlowInfo) -> Result<(), BoxError> {
        let Some(host) = c.host else { return Ok(()) };
        let (vm, job) = (c.vm, flow.job_id);
        let removed = async {
            host::command(
                &self.hosts,
                host,
                Command::DestroyDomain { uuid: vm },
                deadline(flow),
                job,
            )
            .await?;
            host::command(
                &self.hosts,
                host,
                Command::UndefineDomain { uuid: vm },
                deadline(flow),
                job,
            )
            .await
        }
        .await;
        match removed {
            Ok(_) => Ok(()),
            // The host is away: the domain goes when it is back (the GC's job).
            Err(error) if error.is_unreachable() => {
                super::ops::submit_destroy_domain(self.hosts.runtime(), host, vm).await?;
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }
}

/// Declares the `vm.create` chain. Call once at startup, before the flow recovery pass;
/// `quotas` are the VM kind's ([`super::Vms::quotas`]).
pub fn define(
    runtime: &Runtime,
    hosts: Kind<Hosts>,
    l3s: Kind<L3s>,
    quotas: Arc<Quotas>,
    overcommit: Overcommit,
) {
    let db = runtime.db().clone();
    runtime.flows().define(
        ChainSpec::new(CREATE_CHAIN)
            .step("record", RecordStep { db: db.clone(), quotas })
            .step(
                "allocate-host",
                AllocateHost { db: db.clone(), hosts: hosts.clone(), overcommit },
            )
            .step("allocate-nics", AllocateNics { db: db.clone(), l3s })
            .step("create-root-volume", CreateRootVolume { db: db.clone(), hosts: hosts.clone() })
            .step("start-domain", StartDomain { db, hosts }),
    );
}

/// Creates a VM and returns its record once it runs. The steps and their agent commands
/// inherit `job`'s deadline.
pub async fn create(
    runtime: &Runtime,
    request: CreateVm,
    job: FlowJob,
) -> Result<VmRecord, strato_runtime::RuntimeError> {
    let vm = request.vm;
    let done = runtime.flows().run(CREATE_CHAIN, request, job).await?;
    match done.created {
        Some(created) => Ok(created),
        // A flow recorded before `created` existed, resumed: the record as it is now.
        None => runtime.db().get::<VmRecord>(vm)?.map(|s| s.record).ok_or_else(|| {
            strato_runtime::RuntimeError::NotFound {
                actor: strato_runtime::ActorId { kind: "vm", id: vm },
            }
        }),
    }
}
