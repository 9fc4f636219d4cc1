//! The API's wire types: what requests carry and what answers hold, in one place for the
//! server's handlers, the API catalog (whose OpenAPI schemas are derived from them), the CLI
//! and the programs that drive the API (the chaos and load runs).
//!
//! Every request type refuses unknown fields, so a misspelt parameter is a 400 naming it
//! rather than something silently ignored. A resource's creation is `{"params": ...,
//! "systemTags": [...], "userTags": [...]}` ([`Create`]); its actions are one enum in
//! ZStack's externally tagged shape, `{"startVmInstance": {...}}` ([`actions`]).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiError;

pub mod actions;
pub mod validate;

pub use strato_actors::canonical_uuid;

/// Parses a UUID the way every route and the access check do: only the canonical spelling
/// (36 lowercase hexadecimal digits and hyphens, as the API writes UUIDs) is accepted, so
/// one resource has one name and access is decided on the value the handler uses. Braces,
/// `urn:uuid:`, upper case, the simple form and anything else are a 400 naming `field`.
pub fn uuid_param(text: &str, field: &str) -> Result<Uuid, ApiError> {
    strato_actors::canonical_uuid(text).ok_or_else(|| {
            ApiError::invalid(
                field,
                format!(
                    "`{}` is not a UUID in its canonical form (like 3f1c1e0e-8d5b-4c4a-9f6e-0a2b3c4d5e6f)",
                    validate::printable(text)
                ),
            )
        })
}

/// Serde for the UUIDs a request body names: only the canonical spelling, as for a path's
/// ([`uuid_param`]), so a body's UUIDs have one name too (serde's own `Uuid` takes braces,
/// upper case, `urn:uuid:` and the simple form).
pub mod canonical {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer};
    use uuid::Uuid;

    fn parse<E: Error>(text: &str) -> Result<Uuid, E> {
        strato_actors::canonical_uuid(text).ok_or_else(|| {
            E::custom(format!(
                "`{}` is not a UUID in its canonical form (like 3f1c1e0e-8d5b-4c4a-9f6e-0a2b3c4d5e6f)",
                super::validate::printable(text)
            ))
        })
    }

    /// One UUID.
    pub fn uuid<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Uuid, D::Error> {
        parse(&String::deserialize(deserializer)?)
    }

    /// An optional UUID (`null` or absent: none; the field takes `#[serde(default)]`).
    pub fn option<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Uuid>, D::Error> {
        Option::<String>::deserialize(deserializer)?.as_deref().map(parse).transpose()
    }

    /// A list of UUIDs.
    pub fn list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Uuid>, D::Error> {
        Vec::<String>::deserialize(deserializer)?.iter().map(|t| parse(t)).collect()
    }
}

/// The inventory of a record: its JSON form, as the API shows it.
pub fn inventory<T: Serialize>(record: &T) -> Result<Value, ApiError> {
    serde_json::to_value(record).map_err(|e| ApiError::internal(&e))
}

/// A creation's body: the new resource's parameters and the tags to hang on it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Create<P> {
    /// The parameters.
    pub params: P,
    /// System tags (`hostname::web-1`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub system_tags: Vec<String>,
    /// User tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_tags: Vec<String>,
}

impl<P> Create<P> {
    /// A creation without tags.
    pub fn new(params: P) -> Self {
        Create { params, system_tags: Vec::new(), user_tags: Vec::new() }
    }
}

/// `202 Accepted`: where the job that carries the change is followed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Accepted {
    /// The job's URL (a path unless the server is configured with its external URL).
    pub location: String,
}

/// An error as every answer carries it: `{"error": {...}}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The error.
    pub error: ErrorBody,
}

/// An error's code, description and details.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The stable code (`VM.INVALID_STATE`): see the OpenAPI document's `x-strato-error-codes`.
    pub code: String,
    /// What happened, for a person.
    #[serde(default)]
    pub description: String,
    /// The field at fault, the placement trace, ...
    #[serde(default)]
    pub details: Value,
}

/// A finished job's answer: the inventory it made or changed, or its error.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum JobReply {
    /// It succeeded.
    Done {
        /// What it made or changed.
        inventory: Value,
    },
    /// It failed.
    Failed(ErrorReply),
}

/// A list's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Inventories {
    /// The page.
    pub inventories: Vec<Value>,
    /// How many match in all (with `replyWithCount=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// `CreateZone`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZoneParams {
    /// Its name.
    pub name: String,
    /// A description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `CreateCluster`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterParams {
    /// Its name.
    pub name: String,
    /// Its zone.
    #[serde(deserialize_with = "canonical::uuid")]
    pub zone_uuid: Uuid,
    /// `KVM`, the only one.
    #[serde(default = "kvm")]
    pub hypervisor_type: String,
}

fn kvm() -> String {
    "KVM".into()
}

/// `AddKVMHost`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostParams {
    /// Its name.
    pub name: String,
    /// Where its agent listens.
    pub management_ip: String,
    /// The agent's port.
    #[serde(default = "agent_port")]
    pub agent_port: u16,
    /// Its cluster.
    #[serde(deserialize_with = "canonical::uuid")]
    pub cluster_uuid: Uuid,
}

fn agent_port() -> u16 {
    7070
}

/// `CreateInstanceOffering`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OfferingParams {
    /// Its name.
    pub name: String,
    /// Virtual CPUs (1 to 4096).
    pub cpu_num: u32,
    /// Memory in bytes (16 MiB to 64 TiB).
    pub memory_size: u64,
}

/// `CreateDiskOffering`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskOfferingParams {
    /// Its name.
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// The volumes' size in bytes (1 MiB to 64 TiB, whole MiB).
    pub disk_size: u64,
}

/// `CreateDataVolume`: a disk offering or a size.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataVolumeParams {
    /// Its name.
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// The disk offering giving its size.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "canonical::option"
    )]
    pub disk_offering_uuid: Option<Uuid>,
    /// Its size in bytes, without an offering (1 MiB to 64 TiB, whole MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size: Option<u64>,
    /// The primary storage to make it on (admin only; by default, the VM's cluster's).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "canonical::option"
    )]
    pub primary_storage_uuid: Option<Uuid>,
}

/// `CreateVolumeSnapshot`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSnapshotParams {
    /// Its name.
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
}

/// `CreateDataVolumeFromVolumeTemplate`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeFromTemplateParams {
    /// Its name.
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// The primary storage to make it on (admin only; by default, that of the cluster of
    /// the VM it is first attached to).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "canonical::option"
    )]
    pub primary_storage_uuid: Option<Uuid>,
}

/// `CreateRootVolumeTemplateFromRootVolume`, `CreateDataVolumeTemplateFromVolume`,
/// `CreateRootVolumeTemplateFromVolumeSnapshot`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RootTemplateParams {
    /// Its name.
    pub name: String,
    /// The backup storage it goes to (the first one named).
    #[serde(deserialize_with = "canonical::list")]
    pub backup_storage_uuids: Vec<Uuid>,
}

/// `CreateL2NoVlanNetwork`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L2Params {
    /// Its name.
    pub name: String,
    /// Its zone.
    #[serde(deserialize_with = "canonical::uuid")]
    pub zone_uuid: Uuid,
    /// The hosts' interface (`eth0`).
    pub physical_interface: String,
}

/// `CreateL2VlanNetwork`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L2VlanParams {
    /// Its name.
    pub name: String,
    /// Its zone.
    #[serde(deserialize_with = "canonical::uuid")]
    pub zone_uuid: Uuid,
    /// The hosts' interface the VLAN runs on (`eth0`).
    pub physical_interface: String,
    /// The VLAN id (1-4094).
    pub vlan: u16,
}

/// `CreateL2VxlanNetworkPool`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VxlanPoolParams {
    /// Its name.
    pub name: String,
    /// Its zone.
    #[serde(deserialize_with = "canonical::uuid")]
    pub zone_uuid: Uuid,
    /// The VTEP network (`10.0.0.0/24`): each host's tunnels end at its address in it.
    pub vtep_cidr: String,
    /// The first VNI its networks may take (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_vni: Option<u32>,
    /// The last (default 16777214).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_vni: Option<u32>,
}

/// `CreateL2VxlanNetwork`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VxlanParams {
    /// Its name.
    pub name: String,
    /// The pool it is made from (its zone and clusters are the pool's).
    #[serde(deserialize_with = "canonical::uuid")]
    pub pool_uuid: Uuid,
    /// Its VNI (none: the pool's first free one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
}

/// `CreateSecurityGroup`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityGroupParams {
    /// Its name.
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
}

/// `CreateVip`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VipParams {
    /// Its name.
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// The public L3 network its address is taken from.
    #[serde(deserialize_with = "canonical::uuid")]
    pub l3_network_uuid: Uuid,
    /// The address wanted (any free one if absent).
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub required_ip: Option<Ipv4Addr>,
}

/// `CreateEip`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EipParams {
    /// Its name.
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// Its VIP (unused).
    #[serde(deserialize_with = "canonical::uuid")]
    pub vip_uuid: Uuid,
    /// The VM NIC to attach it to at once.
    #[serde(default, deserialize_with = "canonical::option")]
    pub vm_nic_uuid: Option<Uuid>,
}

/// `CreatePortForwardingRule`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortForwardingRuleParams {
    /// Its name.
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// Its VIP (unused, or used for port forwarding).
    #[serde(deserialize_with = "canonical::uuid")]
    pub vip_uuid: Uuid,
    /// The VIP's first port.
    pub vip_port_start: u16,
    /// The VIP's last port (the first if absent).
    #[serde(default)]
    pub vip_port_end: Option<u16>,
    /// The NIC's first port (the VIP's if absent).
    #[serde(default)]
    pub private_port_start: Option<u16>,
    /// The NIC's last port (as many ports as the VIP's range if absent).
    #[serde(default)]
    pub private_port_end: Option<u16>,
    /// `TCP` or `UDP`.
    pub protocol_type: String,
    /// Only sources in this network may connect (any if absent).
    #[serde(default)]
    pub allowed_cidr: Option<String>,
    /// The VM NIC to attach it to at once.
    #[serde(default, deserialize_with = "canonical::option")]
    pub vm_nic_uuid: Option<Uuid>,
}

/// `CreateL3Network`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L3Params {
    /// Its name.
    pub name: String,
    /// The L2 network it runs on.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "canonical::option"
    )]
    pub l2_network_uuid: Option<Uuid>,
    /// DNS servers handed to guests.
    #[serde(default)]
    pub dns: Vec<String>,
    /// The host bridge its NICs plug into (none: user-mode networking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

/// `AddIpRange`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RangeParams {
    /// The first address.
    #[schema(value_type = String, format = Ipv4)]
    pub start_ip: Ipv4Addr,
    /// The last address.
    #[schema(value_type = String, format = Ipv4)]
    pub end_ip: Ipv4Addr,
    /// The netmask.
    #[schema(value_type = String, format = Ipv4)]
    pub netmask: Ipv4Addr,
    /// The gateway.
    #[schema(value_type = String, format = Ipv4)]
    pub gateway: Ipv4Addr,
    /// A name, as ZStack takes one (kept for compatibility; ranges are not named here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `CreateVmInstance`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmParams {
    /// Its name.
    pub name: String,
    /// Its CPUs and memory.
    #[serde(deserialize_with = "canonical::uuid")]
    pub instance_offering_uuid: Uuid,
    /// One NIC on each.
    #[serde(deserialize_with = "canonical::list")]
    pub l3_network_uuids: Vec<Uuid>,
    /// Only this host (admin only).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "canonical::option"
    )]
    pub host_uuid: Option<Uuid>,
    /// Only this cluster (admin only).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "canonical::option"
    )]
    pub cluster_uuid: Option<Uuid>,
    /// The image of its root volume (none: a diskless VM).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "canonical::option"
    )]
    pub image_uuid: Option<Uuid>,
}

/// `AddLocalPrimaryStorage`, `AddNfsPrimaryStorage`, `AddSharedMountPointPrimaryStorage`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageParams {
    /// Its name.
    pub name: String,
    /// Its directory (an absolute path).
    pub url: String,
    /// Its zone (primary storage).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "canonical::option"
    )]
    pub zone_uuid: Option<Uuid>,
}

/// `AddImageStoreBackupStorage`: a directory on its own host, served by an agent started
/// there with `--driver none`, or (without `hostname`) a directory on the MN that the hosts
/// read at the same path.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageStoreParams {
    /// Its name.
    pub name: String,
    /// Its directory (an absolute path, on its host).
    pub url: String,
    /// The host whose agent serves the directory (a name or an IP address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// That agent's port.
    #[serde(default = "agent_port")]
    pub agent_port: u16,
    /// ZStack's SSH login: accepted and shown, not used (the agent enrolls with a bootstrap
    /// secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// ZStack's SSH password: accepted and never stored, logged or shown.
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    /// ZStack's SSH port: accepted and shown, not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_port: Option<u16>,
}

/// `AddImage`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageParams {
    /// Its name.
    pub name: String,
    /// Where it comes from (`file://`, `http://`, `https://`).
    pub url: String,
    /// `qcow2` or `raw`.
    #[serde(default = "qcow2")]
    pub format: String,
    /// `RootVolumeTemplate` (the default: VMs boot from it) or `DataVolumeTemplate` (data
    /// volumes are made from it).
    #[serde(default = "root_volume_template")]
    pub media_type: String,
    /// The backup storage it goes to (the first one named).
    #[serde(deserialize_with = "canonical::list")]
    pub backup_storage_uuids: Vec<Uuid>,
}

fn qcow2() -> String {
    "qcow2".into()
}

fn root_volume_template() -> String {
    strato_actors::records::ROOT_VOLUME_TEMPLATE.into()
}

/// `CreateUserTag`, `CreateSystemTag`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TagParams {
    /// The resource tagged.
    #[serde(deserialize_with = "canonical::uuid")]
    pub resource_uuid: Uuid,
    /// Its type (`VmInstanceVO`).
    pub resource_type: String,
    /// The tag.
    pub tag: String,
}

/// What a normal account may use at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = Quota)]
pub struct QuotaParams {
    /// VMs.
    pub vm_num: u64,
    /// Virtual CPUs over all VMs.
    pub cpu_num: u64,
    /// Memory over all VMs, in bytes.
    pub memory_size: u64,
    /// Data volumes (ZStack's default 40 when absent).
    #[serde(default = "default_volume_data_num")]
    pub volume_data_num: u64,
    /// The data volumes' sizes in all, in bytes (ZStack's default 10 TiB when absent).
    #[serde(default = "default_volume_capacity")]
    pub volume_capacity: u64,
}

fn default_volume_data_num() -> u64 {
    strato_actors::accounts::Quota::default().volume_data_num
}

fn default_volume_capacity() -> u64 {
    strato_actors::accounts::Quota::default().volume_capacity
}

impl From<QuotaParams> for strato_actors::accounts::Quota {
    fn from(q: QuotaParams) -> Self {
        strato_actors::accounts::Quota {
            vm_num: q.vm_num,
            cpu_num: q.cpu_num,
            memory_size: q.memory_size,
            volume_data_num: q.volume_data_num,
            volume_capacity: q.volume_capacity,
        }
    }
}

/// `CreateAccount` (admin).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccountParams {
    /// Its name, one word.
    pub name: String,
    /// Its password (at least 8 characters).
    pub password: String,
    /// Its quota (ZStack's defaults when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaParams>,
}

/// `CreateApiKey`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiKeyParams {
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// How long the key works, in seconds (it works until deleted when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
}

/// `LogInByAccount`'s body: `{"logInByAccount": {...}}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogIn {
    /// The account and password.
    pub log_in_by_account: LogInByAccount,
}

/// An account's name and password.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogInByAccount {
    /// The account's name.
    pub account_name: String,
    /// Its password.
    pub password: String,
}

/// `updateAccount`'s parameters.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PasswordChange {
    /// The new password.
    pub password: String,
    /// The current password (required when an account changes its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_password: Option<String>,
}
