//! The host's link loop: dialing the agent, enrolling an agent that asks, pinning its
//! certificate, reconciling what the hypervisor runs with the store on every (re)connect,
//! forwarding the agent's events to the VMs, and losing the link and redialing.
//!
//! The link is TLS with a certificate on each end: the MN presents its client certificate,
//! and the host's agent must present the certificate pinned for the host (an
//! [`AgentCertRecord`] beside the host's record). An agent that has no certificate yet asks
//! to enroll with its bootstrap secret: the actor spends the secret through the MN's CA
//! (`strato_proto::pki`), pins the certificate it issues before the agent gets it (so an
//! agent holding a certificate is always one the MN can recognise), sends it, and dials
//! again. A host without a pin (added again after a deletion) trusts and pins a certificate
//! this MN's CA issued.
//!
//! Connecting dials the agent, handshakes, records the host's facts and reconciles: every VM
//! the store places on the host is told what the hypervisor says of its domain, and a domain
//! no VM claims is reported as a *stranger* (an event and a list on the host), never adopted
//! or killed. Agent events (a domain started or destroyed behind the MN's back) reach the VMs
//! at once. This is the one part of the host actor that calls the VM actors.

use std::collections::HashSet;
use std::time::Duration;

use strato_proto::{
    AgentEvent, DomainInfo, DomainState, Enrollment, Fingerprint, Handshake, Link, LinkConfig,
    LinkError, Welcome,
};
use strato_runtime::{Kind, Op, OpCtx, RuntimeError};
use strato_storage::{Batch, Db, Expect};
use uuid::Uuid;

use super::{
    HostConfig, HostError, HostStatus, Hosts, StrangerFound, link_op, release, save, set_status,
};
use crate::records::{AgentCertRecord, VmRecord};
use crate::vm::state::Observation;
use crate::vm::{Vms, observe};

/// Connects host `id` if it is not connected. Returns once connected, or with why not (a
/// redial is then scheduled).
pub async fn connect(hosts: &Kind<Hosts>, id: Uuid) -> Result<(), HostError> {
    hosts.call(id, link_op("connect"), move |ctx| async move { connect_op(ctx).await }).await
}

/// Drops the link (if any) and connects again: `ReconnectHost`.
pub async fn reconnect(hosts: &Kind<Hosts>, id: Uuid) -> Result<(), HostError> {
    hosts
        .call(id, link_op("reconnect"), move |ctx| async move {
            if let Some(link) = ctx.with_state(|s| s.link.take()) {
                ctx.entity().forget_link(ctx.id());
                link.close();
            }
            connect_op(ctx).await
        })
        .await
}

async fn connect_op(ctx: OpCtx<Hosts>) -> Result<(), HostError> {
    if ctx.with_state(|s| s.link.as_ref().is_some_and(|l| !l.is_closed())) {
        return Ok(());
    }
    let id = ctx.id();
    let (ip, port) = ctx.with_state(|s| (s.record.management_ip.clone(), s.record.agent_port));
    let addr = match format!("{ip}:{port}").parse() {
        Ok(addr) => addr,
        Err(_) => {
            let error = format!("`{ip}:{port}` is not a socket address");
            set_status(&ctx, HostStatus::Disconnected, Some(error.clone())).await?;
            return Err(HostError::Link(LinkError::Refused { reason: error }));
        }
    };
    if ctx.with_state(|s| s.record.status != HostStatus::Disconnected) {
        set_status(&ctx, HostStatus::Connecting, None).await?;
    }
    let (link, welcome, mut events) = match dial(&ctx, addr).await {
        Ok(linked) => linked,
        Err(error) => {
            let message = strato_runtime::error_chain(&error);
            tracing::warn!(host = %id, %addr, error = %message, "cannot connect to the agent");
            set_status(&ctx, HostStatus::Disconnected, Some(message)).await?;
            schedule_redial(&ctx);
            return Err(error);
        }
    };
    ctx.entity().links.write().expect("links lock").insert(ctx.id(), link.clone());
    *ctx.entity().connects.write().expect("connects lock").entry(ctx.id()).or_insert(0) += 1;
    let epoch = ctx.with_state(|s| {
        s.epoch += 1;
        s.link = Some(link.clone());
        s.redial_attempts = 0;
        s.epoch
    });
    save(&ctx, |r| r.facts = Some(welcome.facts.clone())).await?;
    // Shared storage the host must mount is mounted before it is Connected: until then no
    // volume can be made in an empty mount point on its own disk.
    if let Err(error) = mount_shared_storage(&ctx, &link).await {
        let message = strato_runtime::error_chain(&error);
        tracing::warn!(host = %id, error = %message, "the host cannot mount its cluster's shared storage");
        ctx.with_state(|s| s.link = None);
        ctx.entity().forget_link(id);
        link.close();
        set_status(&ctx, HostStatus::Disconnected, Some(message)).await?;
        schedule_redial(&ctx);
        return Err(error);
    }
    set_status(&ctx, HostStatus::Connected, None).await?;
    reconcile(&ctx, &welcome.domains).await?;
    // The agent may have restarted or lost what it made: the network is sent whole on every
    // new link; hosts sharing a VXLAN pool with this one learn its (maybe new) VTEP, and
    // those sharing a SNAT learn whether it moved here.
    ctx.with_state(|s| s.applied_network = None);
    super::refresh_network(ctx.kind(), id);
    // Its local storage may have changed size since: measured again, in the background.
    let measuring = ctx.kind().clone();
    tokio::spawn(async move {
        if let Err(error) = super::measure_storage(&measuring, id).await {
            let error = strato_runtime::error_chain(&error);
            tracing::warn!(host = %id, %error, "the host's local storage was not measured; its disk bookings are not bounded until it is");
        }
    });
    let record = ctx.with_state(|s| s.record.clone());
    // Those sharing a SNAT with it too: its home may now be this host.
    let db = &ctx.entity().db;
    let mut peers = crate::network::tunnel_peers(db, &record)?;
    peers.extend(crate::network::snat_neighbours(db, &record)?);
    peers.sort();
    peers.dedup();
    for peer in peers {
        super::refresh_network(ctx.kind(), peer);
    }

    // Watch the link: its death and the agent's events.
    let (hosts, vms) = (ctx.kind().clone(), vms_kind(&ctx)?);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = link.closed() => break,
                event = events.recv() => match event {
                    Some(AgentEvent::DomainStateChanged { uuid, state }) => {
                        on_domain_event(&hosts, &vms, id, uuid, state).await;
                    }
                    None => break,
                },
            }
        }
        let _ = hosts
            .call(id, link_op("link-lost"), move |ctx| async move { link_lost(ctx, epoch).await })
            .await;
    });
    Ok(())
}

/// Dials the host's agent and checks its certificate; an agent asking to enroll is enrolled,
/// then dialed again.
async fn dial(
    ctx: &OpCtx<Hosts>,
    addr: std::net::SocketAddr,
) -> Result<(Link, Welcome, tokio::sync::mpsc::UnboundedReceiver<AgentEvent>), HostError> {
    let pin = ctx.with_state(|s| s.pin);
    let entity = ctx.entity();
    let (link, welcome, events, pinned) =
        dial_agent(&entity.db, &entity.config, ctx.id(), pin, addr).await?;
    ctx.with_state(|s| s.pin = Some(pinned));
    Ok((link, welcome, events))
}

/// Dials the agent of `id` (a host, or a backup storage's host) at `addr`, expecting the
/// certificate `pin`: an agent asking to enroll is enrolled, then dialed again, and an
/// agent whose certificate this MN's CA issued is pinned if none was. Answers the link and
/// the certificate now pinned.
pub(crate) async fn dial_agent(
    db: &Db,
    config: &HostConfig,
    id: Uuid,
    mut pin: Option<Fingerprint>,
    addr: std::net::SocketAddr,
) -> Result<(Link, Welcome, tokio::sync::mpsc::UnboundedReceiver<AgentEvent>, Fingerprint), HostError>
{
    let link_config = |pin| LinkConfig {
        addr,
        tls: config.pki.tls().clone(),
        pin,
        host_uuid: id,
        connect_timeout: config.connect_timeout,
        ping_interval: config.ping_interval,
        ping_timeout: config.ping_timeout,
        ping_failures: config.ping_failures,
    };
    let mut enrolled = false;
    loop {
        match Link::connect(&link_config(pin)).await? {
            Handshake::Linked { link, welcome, events, certificate } => {
                let welcome = *welcome;
                if pin != Some(certificate) {
                    tracing::info!(agent = %id, %certificate, "pinned the certificate this MN issued to the agent");
                    pin_certificate(db, id, certificate).await?;
                }
                return Ok((link, welcome, events, certificate));
            }
            // Once per connect: an agent that asks again did not keep its certificate.
            Handshake::Enroll(enrollment) if !enrolled => {
                pin = Some(enroll(db, config, id, *enrollment).await?);
                enrolled = true;
            }
            Handshake::Enroll(enrollment) => {
                let reason = "the agent asks to enroll again right after it enrolled; it did not keep its certificate (see its log)".to_owned();
                enrollment.refuse(reason.clone()).await;
                return Err(LinkError::Refused { reason }.into());
            }
        }
    }
}

/// How long a host may take to mount one shared storage.
const MOUNT_TIME: std::time::Duration = std::time::Duration::from_secs(60);

/// Mounts, over the new `link`, each NFS primary storage attached to the host's cluster.
async fn mount_shared_storage(ctx: &OpCtx<Hosts>, link: &Link) -> Result<(), HostError> {
    let cluster = ctx.with_state(|s| s.record.cluster_uuid);
    for stored in ctx.entity().db.scan::<crate::records::PrimaryStorageRecord>() {
        let ps = stored?.record;
        let Some(mount_point) = ps.mount_path.clone() else { continue };
        if !ps.attached_cluster_uuids.contains(&cluster) {
            continue;
        }
        let command = strato_proto::Command::MountStorage { url: ps.url.clone(), mount_point };
        let deadline = std::time::SystemTime::now() + MOUNT_TIME;
        link.request_with_id(Uuid::new_v4(), command, deadline, None).await?;
    }
    Ok(())
}

/// Spends the agent's bootstrap secret, pins the certificate the CA issues for its key, and
/// sends it to the agent; answers the pin.
async fn enroll(
    db: &Db,
    config: &HostConfig,
    id: Uuid,
    enrollment: Enrollment,
) -> Result<Fingerprint, HostError> {
    let issued = match config.pki.enroll(enrollment.secret(), enrollment.public_key(), id) {
        Ok(issued) => issued,
        Err(error) => {
            enrollment.refuse(error.to_string()).await;
            return Err(error.into());
        }
    };
    // Pinned before the agent has it: an agent holding a certificate is one the MN knows.
    pin_certificate(db, id, issued.fingerprint).await?;
    enrollment.issue(issued.certificate).await?;
    tracing::info!(agent = %id, certificate = %issued.fingerprint, "agent enrolled");
    Ok(issued.fingerprint)
}

/// Records `fingerprint` as the pin of `id`'s agent.
async fn pin_certificate(db: &Db, id: Uuid, fingerprint: Fingerprint) -> Result<(), HostError> {
    let mut batch = Batch::new();
    batch.put(&AgentCertRecord { host_uuid: id, fingerprint }, Expect::Any)?;
    db.commit(batch).await?;
    Ok(())
}

fn vms_kind(ctx: &OpCtx<Hosts>) -> Result<Kind<Vms>, HostError> {
    ctx.runtime()
        .kind::<Vms>()
        .ok_or_else(|| HostError::Runtime(RuntimeError::UnknownKind { kind: "vm".into() }))
}

/// Tells every VM on the host what the hypervisor says, and reports strangers.
async fn reconcile(ctx: &OpCtx<Hosts>, domains: &[DomainInfo]) -> Result<(), HostError> {
    let id = ctx.id();
    let db = &ctx.entity().db;
    let vms = vms_kind(ctx)?;
    let on_host = db.find::<VmRecord>("host", &id.into())?;
    let claimed: HashSet<Uuid> = on_host.iter().copied().collect();
    for vm in &on_host {
        let state = domains.iter().find(|d| d.uuid == *vm).map(|d| d.state);
        observe(&vms, *vm, id, crate::vm::observation_of(state)).await;
    }
    // Bookings of VMs that are gone, or that live on another host, were left by an operation
    // the MN died in (or whose undo failed): give them back. A VM being created or migrated
    // books before its record names the host, so it keeps its booking.
    let stale: Vec<Uuid> = ctx.with_state(|s| s.record.reservations.keys().copied().collect());
    let mut released = Vec::new();
    for vm in stale {
        let keep = db.get::<VmRecord>(vm)?.is_some_and(|v| {
            v.record.host_uuid == Some(id)
                || matches!(
                    v.record.state,
                    crate::vm::state::VmState::Created | crate::vm::state::VmState::Migrating
                )
        }) || db
            .get::<crate::records::VolumeRecord>(vm)?
            // A data volume's disk booking: kept while the volume is here (or moving here).
            .is_some_and(|v| {
                v.record.host_uuid == Some(id)
                    || v.record.status == crate::records::VolumeStatus::Migrating
            });
        if !keep {
            released.push(vm);
        }
    }
    if !released.is_empty() {
        tracing::warn!(host = %id, vms = ?released, "bookings of VMs no longer on this host given back");
        // Through the capacity queue, which owns the bookings.
        if let Some(hosts) = ctx.runtime().kind::<Hosts>() {
            for vm in released {
                release(&hosts, id, vm).await?;
            }
        }
    }
    let mut strangers = Vec::new();
    for domain in domains {
        if claimed.contains(&domain.uuid) {
            continue;
        }
        // A VM recorded on another host (a migration's leftover) is no stranger to the MN,
        // but this copy is: report it all the same.
        tracing::warn!(host = %id, domain = %domain.uuid, name = %domain.name, "stranger domain on host");
        ctx.runtime().events().publish(StrangerFound { host: id, domain: domain.clone() });
        strangers.push(domain.uuid);
    }
    save(ctx, |r| r.strangers.clone_from(&strangers)).await
}

async fn on_domain_event(
    hosts: &Kind<Hosts>,
    vms: &Kind<Vms>,
    host: Uuid,
    domain: Uuid,
    state: Option<DomainState>,
) {
    let claimed = hosts
        .entity()
        .db
        .get::<VmRecord>(domain)
        .ok()
        .flatten()
        .is_some_and(|vm| vm.record.host_uuid == Some(host));
    if claimed {
        // The event may be older than the VM's last operation: let the VM look now.
        crate::vm::observe_now(vms, domain, host).await;
    } else if state.is_some() {
        let _ = hosts
            .call(
                host,
                Op::within("link", "stranger", Duration::from_secs(30)),
                move |ctx| async move {
                    if ctx.with_state(|s| s.record.strangers.contains(&domain)) {
                        return Ok::<_, HostError>(());
                    }
                    tracing::warn!(host = %host, %domain, "stranger domain appeared on host");
                    ctx.runtime().events().publish(StrangerFound {
                        host,
                        domain: DomainInfo {
                            uuid: domain,
                            name: String::new(),
                            state: state.unwrap_or(DomainState::Other),
                        },
                    });
                    save(&ctx, |r| r.strangers.push(domain)).await
                },
            )
            .await;
    } else {
        // An undefined domain is nobody's stranger any more. (The domain of a VM destroyed
        // and expunged at once reports its shut-off after its record went, then this.)
        let _ = hosts
            .call(
                host,
                Op::within("link", "stranger-gone", Duration::from_secs(30)),
                move |ctx| async move {
                    if ctx.with_state(|s| !s.record.strangers.contains(&domain)) {
                        return Ok::<_, HostError>(());
                    }
                    save(&ctx, |r| r.strangers.retain(|d| *d != domain)).await
                },
            )
            .await;
    }
}

async fn link_lost(ctx: OpCtx<Hosts>, epoch: u64) -> Result<(), HostError> {
    if ctx.with_state(|s| s.epoch != epoch) {
        return Ok(()); // an old link; a newer one is up
    }
    ctx.with_state(|s| s.link = None);
    ctx.entity().forget_link(ctx.id());
    let id = ctx.id();
    tracing::warn!(host = %id, "lost the link to the agent");
    set_status(&ctx, HostStatus::Disconnected, Some("the link to the agent was lost".into()))
        .await?;
    let vms = vms_kind(&ctx)?;
    for vm in ctx.entity().db.find::<VmRecord>("host", &id.into())? {
        observe(&vms, vm, id, Observation::HostUnreachable).await;
    }
    schedule_redial(&ctx);
    Ok(())
}

/// Redials after a capped exponential backoff (once at a time).
fn schedule_redial(ctx: &OpCtx<Hosts>) {
    let config = &ctx.entity().config;
    let Some(delay) = ctx.with_state(|s| {
        if s.redial_scheduled {
            return None;
        }
        s.redial_scheduled = true;
        s.redial_attempts += 1;
        Some(config.redial_delay(s.redial_attempts))
    }) else {
        return;
    };
    let (hosts, id) = (ctx.kind().clone(), ctx.id());
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = hosts
            .call(id, link_op("redial"), move |ctx| async move {
                ctx.with_state(|s| s.redial_scheduled = false);
                connect_op(ctx).await
            })
            .await;
    });
}
