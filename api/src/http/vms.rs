//! VMs: creation (the `vm.create` flow, charged to a tenant's quota) and the actions on a VM
//! (one [`VmAction`] enum), each checked against the state table before a job is accepted.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{MethodRouter, delete, post, put};
use serde_json::{Value, json};
use strato_actors::kinds;
use strato_actors::owners::{self, Charge, OwnerRecord};
use strato_actors::records::{
    ClusterRecord, HostRecord, ImageRecord, InstanceOfferingRecord, L3NetworkRecord, VmRecord,
};
use strato_actors::vm::create::{self, CreateVm};
use strato_actors::vm::ops::{self, Lifecycle};
use strato_actors::vm::state::{self, VmOp};
use strato_runtime::FlowJob;
use uuid::Uuid;

use super::api::{Answer, Api, Body, Method, actions, schema};
use super::{Id, Shared, accepted, action, creation, get_record, job_header, tags};
use crate::auth;
use crate::error::ApiError;
use crate::mn::Mn;
use crate::types::actions::{ChangeInstanceOffering, OnHost, VmAction};
use crate::types::{VmParams, inventory, validate};

/// How long a VM operation may wait for its turn and run.
const OP_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a creation may take, its steps and their agent commands together: it may cache
/// an image on its host.
const CREATE_TIMEOUT: Duration = Duration::from_secs(1800);

/// The area's APIs.
pub(super) fn apis() -> Vec<Api> {
    let mut apis = vec![
        Api::create(
            "CreateVmInstance",
            "/v1/vm-instances",
            schema::<VmParams>(),
            "Creates and starts a VM",
            || post(create_vm),
        ),
        Api::new(
            "DestroyVmInstance",
            Method::Delete,
            "/v1/vm-instances/{uuid}",
            Body::None,
            Answer::Job,
            "Destroys a VM (recoverable until expunged)",
            || delete(destroy_vm),
        ),
    ];
    apis.extend(actions::<VmAction>("/v1/vm-instances/{uuid}/actions", vm_actions));
    apis
}

fn vm_actions() -> MethodRouter<Arc<Mn>> {
    put(vm_action)
}

async fn create_vm(
    State(mn): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (p, raw, tags): (VmParams, _, _) = creation(&body, kinds::of::<VmRecord>())?;
    validate::name("name", &p.name)?;
    let offering: InstanceOfferingRecord = get_record(&mn, p.instance_offering_uuid)?;
    auth::may_use(&mn.db, "instance-offerings", p.instance_offering_uuid)?;
    if p.l3_network_uuids.is_empty() {
        return Err(ApiError::invalid("l3NetworkUuids", "a VM needs at least one L3 network"));
    }
    for l3 in &p.l3_network_uuids {
        get_record::<L3NetworkRecord>(&mn, *l3)?;
        auth::may_use(&mn.db, "l3-networks", *l3)?;
    }
    if let Some(host) = p.host_uuid {
        auth::admin_only("placing a VM on a chosen host")?;
        get_record::<HostRecord>(&mn, host)?;
    }
    if let Some(image) = p.image_uuid {
        auth::may_use(&mn.db, "images", image)?;
        let image: ImageRecord = get_record(&mn, image)?;
        if image.status != "Ready" {
            return Err(ApiError::invalid(
                "imageUuid",
                format!("image {} is {}, not Ready", image.uuid, image.status),
            ));
        }
        if image.media_type != strato_actors::records::ROOT_VOLUME_TEMPLATE {
            return Err(ApiError::invalid(
                "imageUuid",
                format!(
                    "image {} is a {}: a VM boots from a RootVolumeTemplate (make data volumes from this one with CreateDataVolumeFromVolumeTemplate)",
                    image.uuid, image.media_type
                ),
            ));
        }
    }
    if let Some(cluster) = p.cluster_uuid {
        auth::admin_only("placing a VM in a chosen cluster")?;
        get_record::<ClusterRecord>(&mn, cluster)?;
    }
    let static_ips = tags::check_static_ips(&mn, &tags.system_tags, &p.l3_network_uuids)?;
    let m = mn.clone();
    let vm = Uuid::new_v4();
    let deadline = std::time::SystemTime::now() + CREATE_TIMEOUT;
    let charge = Charge {
        vm_num: 1,
        cpu_num: u64::from(offering.cpu_num),
        memory_size: offering.memory_size,
        ..Charge::default()
    };
    // A tenant's VM is charged to its quota by the creation's first step, under the
    // account's lock; this look refuses at once what does not fit now.
    let charge_to = auth::tenant().map(|tenant| (tenant, charge));
    if let Some((tenant, charge)) = charge_to {
        owners::check(&mn.db, tenant, charge)?;
    }
    let job = mn
        .jobs
        .submit_for(
            job_header(&headers)?,
            "CreateVmInstance",
            &raw,
            Some(vm),
            move |job| async move {
                let request = CreateVm {
                    vm,
                    name: p.name,
                    cpu_num: offering.cpu_num,
                    memory_size: offering.memory_size,
                    l3_networks: p.l3_network_uuids,
                    clusters: p.cluster_uuid.map(|c| vec![c]),
                    pinned_host: p.host_uuid,
                    host: None,
                    nics: vec![],
                    image: p.image_uuid,
                    static_ips,
                    system_tags: tags.system_tags,
                    user_tags: tags.user_tags,
                    created: None,
                    charge_to,
                };
                let job = FlowJob { id: Some(job), deadline: Some(deadline) };
                inventory(&create::create(&m.runtime, request, job).await?)
            },
        )
        .await?;
    Ok(accepted(&mn, job))
}

/// Checks now what the VM actor will check again: a refused operation is a 409 at once.
fn precheck(mn: &Mn, uuid: Uuid, op: VmOp) -> Result<(), ApiError> {
    let vm: VmRecord = get_record(mn, uuid)?;
    state::plan(vm.state, op)
        .map_err(|e| ApiError::from(strato_actors::vm::VmError::InvalidState(e)))?;
    Ok(())
}

async fn run_lifecycle(
    mn: Arc<Mn>,
    headers: &HeaderMap,
    uuid: Uuid,
    op: Lifecycle,
    api: &str,
    body: &Value,
) -> Result<Response, ApiError> {
    precheck(&mn, uuid, op.op())?;
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(headers)?, api, body, move |job| async move {
            let record = ops::operate(&m.vms, uuid, op, OP_TIMEOUT, Some(job)).await?;
            inventory(&record)
        })
        .await?;
    Ok(accepted(&mn, job))
}

/// `PUT /v1/vm-instances/{uuid}/actions`.
async fn vm_action(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (action, keyed): (VmAction, _) = action(&body, uuid)?;
    let (op, api) = match action {
        VmAction::StartVmInstance(Some(OnHost { host_uuid: Some(target) })) => {
            return start_on(mn, &headers, uuid, target, &keyed).await;
        }
        VmAction::MigrateVm(on) => {
            let target = on.and_then(|on| on.host_uuid);
            return migrate(mn, &headers, uuid, target, &keyed).await;
        }
        VmAction::ChangeInstanceOffering(ChangeInstanceOffering { instance_offering_uuid }) => {
            return change_offering(mn, &headers, uuid, instance_offering_uuid, &keyed).await;
        }
        VmAction::StartVmInstance(None | Some(OnHost { host_uuid: None })) => {
            (Lifecycle::Start, "StartVmInstance")
        }
        VmAction::StopVmInstance(_) => (Lifecycle::Stop, "StopVmInstance"),
        VmAction::RebootVmInstance(_) => (Lifecycle::Reboot, "RebootVmInstance"),
        VmAction::PauseVmInstance(_) => (Lifecycle::Pause, "PauseVmInstance"),
        VmAction::ResumeVmInstance(_) => (Lifecycle::Resume, "ResumeVmInstance"),
        VmAction::RecoverVmInstance(_) => (Lifecycle::Recover, "RecoverVmInstance"),
        VmAction::ExpungeVmInstance(_) => (Lifecycle::Expunge, "ExpungeVmInstance"),
    };
    run_lifecycle(mn, &headers, uuid, op, api, &keyed).await
}

/// Starting on a given host other than the VM's own is a cold migration, then a start.
async fn start_on(
    mn: Arc<Mn>,
    headers: &HeaderMap,
    uuid: Uuid,
    target: Uuid,
    keyed: &Value,
) -> Result<Response, ApiError> {
    auth::admin_only("starting a VM on a chosen host")?;
    get_record::<HostRecord>(&mn, target)?;
    let vm: VmRecord = get_record(&mn, uuid)?;
    precheck(&mn, uuid, VmOp::Start)?;
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(headers)?, "StartVmInstance", keyed, move |job| async move {
            if vm.host_uuid != Some(target) {
                ops::migrate(&m.vms, uuid, Some(target), ops::MIGRATE_TIMEOUT, Some(job)).await?;
            }
            inventory(&ops::operate(&m.vms, uuid, Lifecycle::Start, OP_TIMEOUT, Some(job)).await?)
        })
        .await?;
    Ok(accepted(&mn, job))
}

async fn migrate(
    mn: Arc<Mn>,
    headers: &HeaderMap,
    uuid: Uuid,
    target: Option<Uuid>,
    keyed: &Value,
) -> Result<Response, ApiError> {
    auth::admin_only("migrating a VM")?;
    if let Some(host) = target {
        get_record::<HostRecord>(&mn, host)?;
    }
    precheck(&mn, uuid, VmOp::Migrate)?;
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(headers)?, "MigrateVm", keyed, move |job| async move {
            inventory(&ops::migrate(&m.vms, uuid, target, ops::MIGRATE_TIMEOUT, Some(job)).await?)
        })
        .await?;
    Ok(accepted(&mn, job))
}

async fn change_offering(
    mn: Arc<Mn>,
    headers: &HeaderMap,
    uuid: Uuid,
    offering_uuid: Uuid,
    keyed: &Value,
) -> Result<Response, ApiError> {
    let offering: InstanceOfferingRecord = get_record(&mn, offering_uuid)?;
    auth::may_use(&mn.db, "instance-offerings", offering_uuid)?;
    precheck(&mn, uuid, VmOp::ChangeOffering)?;
    // A tenant's VM is charged its new size: the growth must fit the quota. The VM's
    // operation recharges it under the account's lock; this look refuses at once what does
    // not fit now.
    if let Some(owner) = mn.db.get::<OwnerRecord>(uuid)?.map(|s| s.record) {
        let growth = owner.charge.growth_to(Charge {
            cpu_num: u64::from(offering.cpu_num),
            memory_size: offering.memory_size,
            ..owner.charge
        });
        owners::check(&mn.db, owner.account_uuid, growth)?;
    }
    let m = mn.clone();
    let job = mn
        .jobs
        .submit(job_header(headers)?, "ChangeInstanceOffering", keyed, move |job| async move {
            let (cpu, memory) = (offering.cpu_num, offering.memory_size);
            inventory(
                &ops::change_offering(&m.vms, uuid, cpu, memory, OP_TIMEOUT, Some(job)).await?,
            )
        })
        .await?;
    Ok(accepted(&mn, job))
}

async fn destroy_vm(
    State(mn): Shared,
    Id(uuid): Id,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    run_lifecycle(
        mn,
        &headers,
        uuid,
        Lifecycle::Destroy,
        "DestroyVmInstance",
        &json!({ "uuid": uuid }),
    )
    .await
}
