//! Each resource's actions, as one enum in ZStack's externally tagged shape: `PUT
//! /v1/vm-instances/{uuid}/actions` with `{"stopVmInstance": {}}` is [`VmAction`]'s
//! `StopVmInstance`. A variant's name is its API's name (`StopVmInstance`), its doc comment
//! the API's summary, and its parameters a type of their own that refuses unknown fields;
//! the handler dispatches on the enum and the API catalog derives one API per variant, with
//! its schema, from the enum's own (`utoipa::ToSchema`). A body that names two actions, an
//! unknown one, or a parameter the action does not take is a 400 naming what is wrong.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{PasswordChange, QuotaParams};

/// An action that takes no parameters: `{}` (or `null`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct NoParams {}

impl<'de> Deserialize<'de> for NoParams {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Nothing;
        impl<'de> Visitor<'de> for Nothing {
            type Value = NoParams;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an empty object: this action takes no parameters")
            }

            fn visit_unit<E: de::Error>(self) -> Result<NoParams, E> {
                Ok(NoParams {})
            }

            fn visit_none<E: de::Error>(self) -> Result<NoParams, E> {
                Ok(NoParams {})
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NoParams, A::Error> {
                match map.next_key::<String>()? {
                    None => Ok(NoParams {}),
                    Some(key) => Err(de::Error::unknown_field(&key, &[])),
                }
            }
        }
        deserializer.deserialize_any(Nothing)
    }
}

/// The actions on a VM (`PUT /v1/vm-instances/{uuid}/actions`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum VmAction {
    /// Starts a VM (on a chosen host: a cold migration there first, admin only)
    StartVmInstance(Option<OnHost>),
    /// Stops a VM: gracefully, then forced
    StopVmInstance(NoParams),
    /// Reboots a VM
    RebootVmInstance(NoParams),
    /// Pauses a VM
    PauseVmInstance(NoParams),
    /// Resumes a paused VM
    ResumeVmInstance(NoParams),
    /// Recovers a destroyed VM
    RecoverVmInstance(NoParams),
    /// Expunges a destroyed VM
    ExpungeVmInstance(NoParams),
    /// Moves a stopped VM to another host of its cluster (cold; admin only)
    MigrateVm(Option<OnHost>),
    /// Changes a stopped VM's CPUs and memory
    ChangeInstanceOffering(ChangeInstanceOffering),
}

/// Where a VM starts or moves to.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OnHost {
    /// The host to start on or move to (admin only; none: the allocator picks).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::canonical::option"
    )]
    pub host_uuid: Option<Uuid>,
}

/// The offering a VM takes the size of.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChangeInstanceOffering {
    /// The instance offering.
    #[serde(deserialize_with = "super::canonical::uuid")]
    pub instance_offering_uuid: Uuid,
}

/// The actions on an L3 network (`PUT /v1/l3-networks/{uuid}/actions`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum L3Action {
    /// Adds a DNS server handed to the L3's guests
    AddDnsToL3Network(DnsParams),
    /// Removes a DNS server from an L3 network
    RemoveDnsFromL3Network(DnsParams),
    /// Adds a route handed to the L3's guests by DHCP
    AddHostRouteToL3Network(HostRouteParams),
    /// Removes a route from an L3 network
    RemoveHostRouteFromL3Network(HostRoutePrefix),
    /// Sets the MTU handed to the L3's guests
    SetL3NetworkMtu(MtuParams),
    /// Gives an L3 network services of providers
    AttachNetworkServiceToL3Network(NetworkServices),
    /// Takes services of providers from an L3 network
    DetachNetworkServiceFromL3Network(NetworkServices),
}

/// A DNS server.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsParams {
    /// Its IPv4 address.
    pub dns: String,
}

/// A route handed to guests.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostRouteParams {
    /// The destination network (`172.16.0.0/12`).
    pub prefix: String,
    /// The next hop, an address on the L3.
    pub nexthop: String,
}

/// The route to remove, by its destination.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostRoutePrefix {
    /// The destination network.
    pub prefix: String,
}

/// An MTU.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtuParams {
    /// Bytes, 68 to 9216.
    pub mtu: u32,
}

/// Services by provider: `{"<providerUuid>": ["DHCP", "DNS"]}`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkServices {
    /// The service types of each provider, by the provider's UUID.
    pub network_services: std::collections::BTreeMap<String, Vec<String>>,
}

/// The actions on a security group (`PUT /v1/security-groups/{uuid}/actions`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum SecurityGroupAction {
    /// Adds rules to a security group
    AddSecurityGroupRule(SecurityGroupRules),
    /// Deletes rules of a security group
    DeleteSecurityGroupRule(RuleUuids),
    /// Lets the NICs of an L3 network join a security group
    AttachSecurityGroupToL3Network(OnL3Network),
    /// Takes an L3 network from a security group
    DetachSecurityGroupFromL3Network(OnL3Network),
    /// Adds VM NICs to a security group
    AddVmNicToSecurityGroup(VmNics),
    /// Takes VM NICs out of a security group
    DeleteVmNicFromSecurityGroup(VmNics),
}

/// The actions on primary storage (`PUT /v1/primary-storage/{uuid}/actions`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum PrimaryStorageAction {
    /// Deletes the cached images no volume or snapshot file is backed by, on each host using
    /// the storage (an administrator's action; the node also does it periodically)
    CleanUpImageCacheOnPrimaryStorage(NoParams),
}

/// The actions on backup storage (`PUT /v1/backup-storage/{uuid}/actions`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum BackupStorageAction {
    /// Drops the link to an image store's agent and connects again, measuring its directory
    ReconnectBackupStorage(NoParams),
}

/// The actions on a data volume (`PUT /v1/volumes/{uuid}/actions`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum VolumeAction {
    /// Attaches a data volume to a VM: live on a running VM, into its definition when stopped
    AttachDataVolumeToVm(OnVm),
    /// Detaches a data volume from its VM
    DetachDataVolumeFromVm(NoParams),
    /// Recovers a deleted data volume
    RecoverDataVolume(NoParams),
    /// Expunges a deleted data volume with its file
    ExpungeDataVolume(NoParams),
    /// Grows a data volume (live on a running VM)
    ResizeDataVolume(NewSize),
    /// Moves a volume to another host's local storage (admin): a detached data volume with
    /// its snapshots, or a stopped VM's root volume with its VM; copied, verified, then
    /// deleted at the source
    LocalStorageMigrateVolume(ToHost),
}

/// The host a volume moves to.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToHost {
    /// The destination host (one of `LocalStorageGetVolumeMigratableHosts`).
    #[serde(deserialize_with = "super::canonical::uuid")]
    pub dest_host_uuid: Uuid,
}

/// A volume's new size.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewSize {
    /// Bytes: whole MiB, no less than the volume's size, at most 64 TiB.
    pub size: u64,
}

/// The actions on a volume snapshot (`PUT /v1/volume-snapshots/{uuid}/actions`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum VolumeSnapshotAction {
    /// Reverts a volume to a snapshot (its VM stopped, or the volume detached)
    RevertVolumeFromSnapshot(NoParams),
}

/// A VM.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OnVm {
    /// The VM.
    #[serde(deserialize_with = "super::canonical::uuid")]
    pub vm_instance_uuid: Uuid,
}

/// The actions on an EIP (`PUT /v1/eips/{uuid}/actions`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum EipAction {
    /// Attaches an EIP to a VM NIC
    AttachEip(OnVmNic),
    /// Detaches an EIP from its VM NIC
    DetachEip(NoParams),
}

/// The actions on a port forwarding rule (`PUT /v1/port-forwarding/{uuid}/actions`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum PortForwardingRuleAction {
    /// Attaches a port forwarding rule to a VM NIC
    AttachPortForwardingRule(OnVmNic),
    /// Detaches a port forwarding rule from its VM NIC
    DetachPortForwardingRule(NoParams),
}

/// A VM NIC.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OnVmNic {
    /// The NIC.
    #[serde(deserialize_with = "super::canonical::uuid")]
    pub vm_nic_uuid: Uuid,
}

/// Rules to add.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityGroupRules {
    /// The rules.
    pub rules: Vec<RuleParams>,
}

/// One rule: a direction, a protocol, ports and the other end.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleParams {
    /// `Ingress` or `Egress`.
    pub r#type: String,
    /// `TCP`, `UDP`, `ICMP` or `ALL`.
    pub protocol: String,
    /// The first port (TCP, UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_port: Option<i32>,
    /// The last port (TCP, UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i32>,
    /// The other end's network (default `0.0.0.0/0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_cidr: Option<String>,
    /// The other end: this group's members (instead of a network).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::canonical::option"
    )]
    pub remote_security_group_uuid: Option<Uuid>,
}

/// Rules by UUID.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleUuids {
    /// The rules.
    pub rule_uuids: Vec<String>,
}

/// An L3 network.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OnL3Network {
    /// The L3 network.
    #[serde(deserialize_with = "super::canonical::uuid")]
    pub l3_network_uuid: Uuid,
}

/// VM NICs by UUID.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmNics {
    /// The NICs.
    pub vm_nic_uuids: Vec<String>,
}

/// The actions on a host (`PUT /v1/hosts/{uuid}/actions`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum HostAction {
    /// Reconnects a host's agent link
    ReconnectHost(NoParams),
    /// Enables, disables or maintains a host
    ChangeHostState(ChangeHostState),
}

/// A host's new state.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChangeHostState {
    /// What to do.
    pub state_event: StateEvent,
}

/// What happens to a host's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum StateEvent {
    /// It takes new VMs.
    Enable,
    /// It keeps its VMs and takes no new ones.
    Disable,
    /// Its VMs move away (or stop), then it is in maintenance.
    Maintain,
}

/// The actions on an account (`PUT /v1/accounts/{uuid}/actions`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum AccountAction {
    /// Sets an account's quota (admin)
    UpdateQuota(QuotaParams),
    /// Changes an account's password
    UpdateAccount(PasswordChange),
}

/// The actions on a job (`PUT /v1/api-jobs/{uuid}/actions`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum JobAction {
    /// Cancels a running job that can stop cleanly (AddImage); it ends SYS.JOB_CANCELLED
    CancelApiJob(NoParams),
}
