//! Every resource kind, declared once.
//!
//! A kind's declaration ([`Kind`]) says everything the rest of the system needs to know
//! about it that is not behaviour: the table its records live in, its segment in URLs, its
//! name in ZStack's API and type system, who may reach it ([`Access`]), the fields of its
//! inventory with their types, how it joins other kinds ([`Relation`]), which of its query
//! paths the store indexes, which kinds depend on it (deleted with it, or refusing its
//! deletion), and which actor kind runs it. The HTTP routes for reading, querying and
//! deleting, the API catalog, the query engine's schema, cascading deletes, the tag types,
//! the access rules, the debug console's kind list and the OpenAPI document are all derived
//! from [`KINDS`]; so is the list of indexes rebuilt at startup ([`ensure_indexes`]).
//!
//! Adding a kind is three things: its record (with its indexes), its declaration here, and
//! the handlers that create it and act on it (`docs/adding-a-resource.md`). One spelling of
//! each name is declared here and every other place derives from it; the tests below check
//! that the declarations agree with each other and with the records.

use std::future::Future;
use std::pin::Pin;

use serde::Serialize;
use serde_json::Value;
use strato_storage::{Batch, Db, Expect, IndexValue, Record, StoreError};
use uuid::Uuid;

use crate::accounts::{AccountRecord, CredentialRecord, SessionRecord};
use crate::cascade::{self, CascadeError, Deleter};
use crate::owners::OwnerRecord;
use crate::records::{
    AgentCertRecord, BackupStorageRecord, ClusterRecord, EipRecord, HostRecord, ImageRecord,
    InstanceOfferingRecord, L2NetworkRecord, L3NetworkRecord, NetworkServiceL3RefRecord,
    NetworkServiceProviderRecord, PortForwardingRuleRecord, PrimaryStorageRecord,
    SecurityGroupRecord, UsedIpRecord, VipRecord, VmRecord, ZoneRecord,
};
use crate::records::{
    DiskOfferingRecord, VolumeRecord, VolumeSnapshotRecord, VolumeSnapshotTreeRecord,
};
use crate::tags::{SystemTag, UserTag};

/// A field's type, for checking the values a query compares it with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldType {
    /// A UUID (compared as text).
    Uuid,
    /// Text.
    Text,
    /// A whole number.
    Int,
}

/// A field of an inventory.
#[derive(Debug)]
pub struct Field {
    /// Its name in the inventory (camelCase).
    pub name: &'static str,
    /// Its type.
    pub ty: FieldType,
}

/// How an inventory reaches other resources.
#[derive(Debug)]
pub enum Relation {
    /// `field` holds the UUID of a resource of the kind at URL segment `kind` (a VM's
    /// `host`).
    Ref {
        /// The join's name in query paths.
        name: &'static str,
        /// The field holding the UUID.
        field: &'static str,
        /// The kind referred to (its URL segment).
        kind: &'static str,
    },
    /// The resources of `kind` whose `field` (a query path of theirs) holds this one's UUID
    /// (a host's `vmInstance`). When `dependent`, they depend on this one: its deletion
    /// refuses while they exist (Permissive) or deletes them first (Enforcing).
    Back {
        /// The join's name in query paths.
        name: &'static str,
        /// The kind pointing here (its URL segment).
        kind: &'static str,
        /// Their query path that holds this one's UUID.
        field: &'static str,
        /// Whether they depend on this one.
        dependent: bool,
    },
    /// A list of nested objects in the inventory itself (a VM's `vmNics`).
    Nested {
        /// The list's field.
        name: &'static str,
        /// What each element holds.
        shape: &'static Shape,
    },
}

impl Relation {
    /// The join's name in query paths.
    pub fn name(&self) -> &'static str {
        match self {
            Relation::Ref { name, .. }
            | Relation::Back { name, .. }
            | Relation::Nested { name, .. } => name,
        }
    }
}

/// What an inventory (or a nested object in one) holds: fields and relations, and which
/// query paths the store indexes.
#[derive(Debug)]
pub struct Shape {
    /// What it is called in URLs (`vm-instances`), or in query errors for a nested object
    /// (`vm-nics`).
    pub name: &'static str,
    /// Its fields.
    pub fields: &'static [Field],
    /// Its relations (the tags' relations are added for a taggable kind, see
    /// [`Kind::relations`]).
    pub relations: &'static [Relation],
    /// Query paths the store indexes, with the index's name (`#uuid`: the record's own
    /// UUID): an equality on one reads only the records the index names.
    pub indexed: &'static [(&'static str, &'static str)],
    /// Fields whose index names every record exactly once: a sort on one walks the index in
    /// order, and a count of one equality counts its entries.
    pub sorted: &'static [(&'static str, &'static str)],
}

impl Shape {
    /// The field `name`.
    pub fn field(&self, name: &str) -> Option<&'static Field> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// Who a normal account may reach resources of a kind as (the admin reaches everything).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The admin's alone (403): the infrastructure.
    AdminOnly,
    /// Readable by all when the admin owns it, changed only by its owner (offerings,
    /// images, L3 networks).
    Shared,
    /// Its owner's alone; another account's answer as not found (404).
    Owned,
    /// Seen and changed with the resource whose UUID the field holds (tags: their
    /// resource's owner's alone).
    With(&'static str),
    /// An account: seen by itself alone.
    Itself,
}

/// How a kind's resources are deleted.
#[derive(Clone, Copy)]
pub enum Deletion {
    /// By `DELETE /v1/<kind>/{uuid}` with cascade ([`crate::cascade`]); the function removes
    /// one resource once its dependents are gone.
    Cascade(Remove),
    /// By a handler of its own (a VM's destroy, an account's deletion, a tag's); when a
    /// cascade reaches one as a dependent, the function (if any) removes it.
    Own(Option<Remove>),
    /// Not through the API.
    Never,
}

impl std::fmt::Debug for Deletion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Deletion::Cascade(_) => "Cascade",
            Deletion::Own(_) => "Own",
            Deletion::Never => "Never",
        })
    }
}

/// What removes one resource of a kind, its dependents being gone.
pub type Remove = for<'a> fn(&'a Deleter, Uuid) -> RemoveFuture<'a>;

/// The future of a [`Remove`].
pub type RemoveFuture<'a> = Pin<Box<dyn Future<Output = Result<(), CascadeError>> + Send + 'a>>;

/// One resource kind.
#[derive(Debug)]
pub struct Kind {
    /// Its name in ZStack's API (`VmInstance`): the APIs `Query<api>`, `Get<api>`,
    /// `Delete<api>`, and how errors name it.
    pub api: &'static str,
    /// Its resource type in ZStack (`VmInstanceVO`): what tags and ownership records name.
    pub vo: &'static str,
    /// Its records' table.
    pub table: &'static dyn Table,
    /// Its inventory: its URL segment, fields, relations and indexed paths.
    pub shape: Shape,
    /// Who a normal account may reach it as.
    pub access: Access,
    /// Whether user and system tags may be put on it.
    pub taggable: bool,
    /// How it is deleted.
    pub deletion: Deletion,
    /// The actor kind that runs its resources (`vm`), if any.
    pub actor: Option<&'static str>,
}

impl Kind {
    /// Its segment in URLs (`vm-instances`).
    pub fn url(&self) -> &'static str {
        self.shape.name
    }

    /// Its relations: those declared, then the tags', for a taggable kind.
    pub fn relations(&'static self) -> impl Iterator<Item = &'static Relation> {
        let tags: &'static [Relation] = if self.taggable { TAG_RELATIONS } else { &[] };
        self.shape.relations.iter().chain(tags)
    }

    /// The kinds depending on this one, with the index of theirs naming it.
    pub fn dependents(&'static self) -> impl Iterator<Item = (&'static Kind, &'static str)> {
        self.relations().filter_map(|relation| match relation {
            Relation::Back { kind, field, dependent: true, .. } => {
                let child = by_url(kind).expect("relations name declared kinds");
                let index = lookup(child.shape.indexed, field)
                    .expect("a dependency is found through an index of the dependent");
                Some((child, index))
            }
            _ => None,
        })
    }
}

impl Kind {
    /// The record-only kinds this one depends on (no actor owns their records), each with
    /// the field of this kind's inventory that names the resource depended on: a cluster's
    /// zone, an L3 network's L2 network. A resource run by an actor guards its dependents in
    /// its own queues (a host's fence, an L3 network's address queue).
    pub fn record_parents(&'static self) -> impl Iterator<Item = (&'static Kind, &'static str)> {
        KINDS.iter().filter(|parent| parent.actor.is_none()).flat_map(move |parent| {
            parent.relations().filter_map(move |relation| match relation {
                Relation::Back { kind, field, dependent: true, .. } if *kind == self.url() => {
                    Some((parent, *field))
                }
                _ => None,
            })
        })
    }
}

/// The index `declared` names for `path`.
pub fn lookup(declared: &[(&'static str, &'static str)], path: &str) -> Option<&'static str> {
    declared.iter().find(|(p, _)| *p == path).map(|(_, index)| *index)
}

/// A kind's table, whatever its record type: what the query engine, cascade, tags and the
/// console do with records of any kind, with records as their inventories (their JSON, in
/// ZStack's field names).
pub trait Table: Send + Sync + std::fmt::Debug + 'static {
    /// The table's name (the record type's `KIND`).
    fn name(&self) -> &'static str;
    /// The names of the indexes its record type declares.
    fn index_names(&self) -> Vec<&'static str>;
    /// Builds index entries a store written by an older build lacks (see
    /// `Db::ensure_indexes`); returns how many it added.
    fn ensure_indexes(&self, db: &Db) -> Result<usize, StoreError>;
    /// Whether record `id` exists.
    fn exists(&self, db: &Db, id: Uuid) -> Result<bool, StoreError>;
    /// Record `id`'s inventory.
    fn inventory(&self, db: &Db, id: Uuid) -> Result<Option<Value>, StoreError>;
    /// Every inventory, in UUID order.
    fn scan<'a>(&self, db: &'a Db) -> Inventories<'a>;
    /// The records `index` names for `value`, in UUID order.
    fn find(&self, db: &Db, index: &str, value: &IndexValue) -> Result<Vec<Uuid>, StoreError>;
    /// Every record `index` names, in value order (reversed when `descending`), lazily.
    fn scan_index<'a>(
        &self,
        db: &'a Db,
        index: &str,
        descending: bool,
    ) -> Box<dyn Iterator<Item = Result<Uuid, StoreError>> + 'a>;
    /// How many records `index` names for `value`, counting no further than `at_most`.
    fn count_index(
        &self,
        db: &Db,
        index: &str,
        value: &IndexValue,
        at_most: usize,
    ) -> Result<usize, StoreError>;
    /// How many records the table holds (by a counted index's counters when the record
    /// type keeps one, else a key scan).
    fn count(&self, db: &Db) -> Result<usize, StoreError>;
    /// Adds the deletion of record `id` to `batch`.
    fn delete_in(&self, batch: &mut Batch, id: Uuid);
    /// Adds to `batch` a write of record `id` as it is, expected at the generation it has
    /// now: the batch then fails if the record is changed or deleted before it commits, and
    /// its commit changes the record's generation. Returns false when there is no record.
    fn touch(&self, db: &Db, batch: &mut Batch, id: Uuid) -> Result<bool, StoreError>;
}

/// A stream of inventories, read as it is consumed.
pub type Inventories<'a> = Box<dyn Iterator<Item = Result<Value, StoreError>> + 'a>;

/// The [`Table`] of record type `R`.
pub struct TableOf<R>(std::marker::PhantomData<fn() -> R>);

impl<R> TableOf<R> {
    /// The table of `R`.
    pub const fn new() -> Self {
        TableOf(std::marker::PhantomData)
    }
}

impl<R> Default for TableOf<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R: Record> std::fmt::Debug for TableOf<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Table({})", R::KIND)
    }
}

/// A record's inventory: its JSON form, as the API shows it.
pub fn inventory<T: Serialize>(record: &T) -> Result<Value, StoreError> {
    serde_json::to_value(record).map_err(|e| StoreError::Backend {
        backend: "inventory",
        operation: "serialize",
        source: e.into(),
    })
}

impl<R: Record + Serialize> Table for TableOf<R> {
    fn name(&self) -> &'static str {
        R::KIND
    }

    fn index_names(&self) -> Vec<&'static str> {
        R::indexes().iter().map(|i| i.name).collect()
    }

    fn ensure_indexes(&self, db: &Db) -> Result<usize, StoreError> {
        db.ensure_indexes::<R>()
    }

    fn exists(&self, db: &Db, id: Uuid) -> Result<bool, StoreError> {
        Ok(db.get::<R>(id)?.is_some())
    }

    fn inventory(&self, db: &Db, id: Uuid) -> Result<Option<Value>, StoreError> {
        db.get::<R>(id)?.map(|s| inventory(&s.record)).transpose()
    }

    fn scan<'a>(&self, db: &'a Db) -> Inventories<'a> {
        Box::new(db.scan::<R>().map(|stored| inventory(&stored?.record)))
    }

    fn find(&self, db: &Db, index: &str, value: &IndexValue) -> Result<Vec<Uuid>, StoreError> {
        db.find::<R>(index, value)
    }

    fn scan_index<'a>(
        &self,
        db: &'a Db,
        index: &str,
        descending: bool,
    ) -> Box<dyn Iterator<Item = Result<Uuid, StoreError>> + 'a> {
        Box::new(db.scan_index::<R>(index, descending))
    }

    fn count_index(
        &self,
        db: &Db,
        index: &str,
        value: &IndexValue,
        at_most: usize,
    ) -> Result<usize, StoreError> {
        db.count_index::<R>(index, value, at_most)
    }

    fn count(&self, db: &Db) -> Result<usize, StoreError> {
        match R::counted_indexes().first() {
            // Every record has exactly one value in a counted index (its state): the
            // counters add up to the table, in as many reads as there are values.
            Some(index) => db.counted_total::<R>(index),
            None => db.count::<R>(),
        }
    }

    fn delete_in(&self, batch: &mut Batch, id: Uuid) {
        batch.delete::<R>(id, Expect::Any);
    }

    fn touch(&self, db: &Db, batch: &mut Batch, id: Uuid) -> Result<bool, StoreError> {
        let Some(stored) = db.get::<R>(id)? else { return Ok(false) };
        batch.put(&stored.record, Expect::Generation(stored.generation))?;
        Ok(true)
    }
}

const fn f(name: &'static str, ty: FieldType) -> Field {
    Field { name, ty }
}

use FieldType::{Int, Text, Uuid as Id};

const fn back(name: &'static str, kind: &'static str, field: &'static str) -> Relation {
    Relation::Back { name, kind, field, dependent: true }
}

/// A NIC, as a VM's inventory nests it.
static VM_NIC: Shape = Shape {
    name: "vm-nics",
    fields: &[
        f("uuid", Id),
        f("ip", Text),
        f("mac", Text),
        f("l3NetworkUuid", Id),
        f("bridge", Text),
    ],
    relations: &[
        Relation::Ref { name: "l3Network", field: "l3NetworkUuid", kind: "l3-networks" },
        // An EIP follows its NIC's VM; it is detached, not deleted, with the VM.
        Relation::Back { name: "eip", kind: "eips", field: "vmNicUuid", dependent: false },
        Relation::Back {
            name: "portForwardingRules",
            kind: "port-forwarding",
            field: "vmNicUuid",
            dependent: false,
        },
        Relation::Back {
            name: "securityGroup",
            kind: "security-groups",
            field: "vmNics.vmNicUuid",
            dependent: false,
        },
    ],
    indexed: &[],
    sorted: &[],
};

/// A security group's rule, as its inventory nests it.
static SECURITY_GROUP_RULE: Shape = Shape {
    name: "security-group-rules",
    fields: &[
        f("uuid", Id),
        f("type", Text),
        f("protocol", Text),
        f("startPort", Int),
        f("endPort", Int),
        f("allowedCidr", Text),
        f("remoteSecurityGroupUuid", Id),
    ],
    relations: &[Relation::Ref {
        name: "remoteSecurityGroup",
        field: "remoteSecurityGroupUuid",
        kind: "security-groups",
    }],
    indexed: &[],
    sorted: &[],
};

/// A security group's member NIC.
static SECURITY_GROUP_MEMBER: Shape = Shape {
    name: "security-group-members",
    fields: &[f("vmNicUuid", Id), f("vmInstanceUuid", Id)],
    relations: &[Relation::Ref {
        name: "vmInstance",
        field: "vmInstanceUuid",
        kind: "vm-instances",
    }],
    indexed: &[],
    sorted: &[],
};

static TAG_FIELDS: &[Field] = &[
    f("uuid", Id),
    f("resourceUuid", Id),
    f("resourceType", Text),
    f("tag", Text),
    f("createDate", Int),
];

/// The tags of every taggable resource: any such kind can be queried by them
/// (`userTags.tag=web`, or ZStack's `__userTag__=web`).
static TAG_RELATIONS: &[Relation] = &[
    Relation::Back { name: "userTags", kind: "user-tags", field: "resourceUuid", dependent: false },
    Relation::Back {
        name: "systemTags",
        kind: "system-tags",
        field: "resourceUuid",
        dependent: false,
    },
];

/// Every kind.
pub static KINDS: &[Kind] = &[
    Kind {
        api: "Zone",
        vo: "ZoneVO",
        table: &TableOf::<ZoneRecord>::new(),
        shape: Shape {
            name: "zones",
            fields: &[f("uuid", Id), f("name", Text), f("description", Text)],
            relations: &[
                back("cluster", "clusters", "zoneUuid"),
                back("l2Network", "l2-networks", "zoneUuid"),
            ],
            indexed: &[("uuid", "#uuid"), ("name", "name")],
            sorted: &[("name", "name")],
        },
        access: Access::AdminOnly,
        taggable: true,
        deletion: Deletion::Cascade(cascade::remove_record::<ZoneRecord>),
        actor: None,
    },
    Kind {
        api: "Cluster",
        vo: "ClusterVO",
        table: &TableOf::<ClusterRecord>::new(),
        shape: Shape {
            name: "clusters",
            fields: &[f("uuid", Id), f("name", Text), f("zoneUuid", Id), f("hypervisorType", Text)],
            relations: &[
                Relation::Ref { name: "zone", field: "zoneUuid", kind: "zones" },
                back("host", "hosts", "clusterUuid"),
            ],
            indexed: &[("uuid", "#uuid"), ("zoneUuid", "zone")],
            sorted: &[],
        },
        access: Access::AdminOnly,
        taggable: true,
        deletion: Deletion::Cascade(cascade::remove_record::<ClusterRecord>),
        actor: None,
    },
    Kind {
        api: "Host",
        vo: "HostVO",
        table: &TableOf::<HostRecord>::new(),
        shape: Shape {
            name: "hosts",
            fields: &[
                f("uuid", Id),
                f("name", Text),
                f("clusterUuid", Id),
                f("managementIp", Text),
                f("agentPort", Int),
                f("state", Text),
                f("status", Text),
                f("lastError", Text),
            ],
            relations: &[
                Relation::Ref { name: "cluster", field: "clusterUuid", kind: "clusters" },
                back("vmInstance", "vm-instances", "hostUuid"),
                // Its local storage's volumes go with it.
                back("volumes", "volumes", "hostUuid"),
            ],
            indexed: &[("uuid", "#uuid"), ("clusterUuid", "cluster"), ("status", "status")],
            sorted: &[("status", "status")],
        },
        access: Access::AdminOnly,
        taggable: true,
        deletion: Deletion::Cascade(cascade::remove_host),
        actor: Some("host"),
    },
    Kind {
        api: "InstanceOffering",
        vo: "InstanceOfferingVO",
        table: &TableOf::<InstanceOfferingRecord>::new(),
        shape: Shape {
            name: "instance-offerings",
            fields: &[f("uuid", Id), f("name", Text), f("cpuNum", Int), f("memorySize", Int)],
            relations: &[],
            indexed: &[("uuid", "#uuid")],
            sorted: &[],
        },
        access: Access::Shared,
        taggable: true,
        deletion: Deletion::Cascade(cascade::remove_record::<InstanceOfferingRecord>),
        actor: None,
    },
    Kind {
        api: "DiskOffering",
        vo: "DiskOfferingVO",
        table: &TableOf::<DiskOfferingRecord>::new(),
        shape: Shape {
            name: "disk-offerings",
            fields: &[f("uuid", Id), f("name", Text), f("description", Text), f("diskSize", Int)],
            // Volumes keep their size when their offering goes.
            relations: &[Relation::Back {
                name: "volumes",
                kind: "volumes",
                field: "diskOfferingUuid",
                dependent: false,
            }],
            indexed: &[("uuid", "#uuid"), ("name", "name")],
            sorted: &[("name", "name")],
        },
        access: Access::Shared,
        taggable: true,
        deletion: Deletion::Cascade(cascade::remove_record::<DiskOfferingRecord>),
        actor: None,
    },
    Kind {
        api: "Volume",
        vo: "VolumeVO",
        table: &TableOf::<VolumeRecord>::new(),
        shape: Shape {
            name: "volumes",
            fields: &[
                f("uuid", Id),
                f("name", Text),
                f("description", Text),
                f("type", Text),
                f("status", Text),
                f("size", Int),
                f("format", Text),
                f("diskOfferingUuid", Id),
                f("rootImageUuid", Id),
                f("primaryStorageUuid", Id),
                f("hostUuid", Id),
                f("installPath", Text),
                f("vmInstanceUuid", Id),
                f("deviceId", Int),
            ],
            relations: &[
                Relation::Ref { name: "vmInstance", field: "vmInstanceUuid", kind: "vm-instances" },
                Relation::Ref {
                    name: "diskOffering",
                    field: "diskOfferingUuid",
                    kind: "disk-offerings",
                },
                Relation::Ref { name: "image", field: "rootImageUuid", kind: "images" },
                // Expunged with the volume.
                Relation::Back {
                    name: "snapshots",
                    kind: "volume-snapshots",
                    field: "volumeUuid",
                    dependent: false,
                },
            ],
            indexed: &[
                ("uuid", "#uuid"),
                ("name", "name"),
                ("status", "status"),
                ("vmInstanceUuid", "vm"),
                ("hostUuid", "host"),
                ("diskOfferingUuid", "disk-offering"),
                ("primaryStorageUuid", "primary-storage"),
            ],
            sorted: &[("name", "name"), ("status", "status")],
        },
        access: Access::Owned,
        taggable: true,
        // DeleteDataVolume (Delay policy) and ExpungeDataVolume are its own APIs; a host's
        // deletion expunges the volumes on its local storage.
        deletion: Deletion::Own(Some(crate::volume::remove_volume)),
        actor: None,
    },
    Kind {
        api: "VolumeSnapshot",
        vo: "VolumeSnapshotVO",
        table: &TableOf::<VolumeSnapshotRecord>::new(),
        shape: Shape {
            name: "volume-snapshots",
            fields: &[
                f("uuid", Id),
                f("name", Text),
                f("description", Text),
                f("volumeUuid", Id),
                f("volumeType", Text),
                f("treeUuid", Id),
                f("parentUuid", Id),
                f("distance", Int),
                f("latest", Text),
                f("status", Text),
                f("size", Int),
                f("primaryStorageInstallPath", Text),
                f("primaryStorageUuid", Id),
            ],
            relations: &[
                Relation::Ref { name: "volume", field: "volumeUuid", kind: "volumes" },
                Relation::Ref { name: "tree", field: "treeUuid", kind: "volume-snapshot-trees" },
                Relation::Ref { name: "parent", field: "parentUuid", kind: "volume-snapshots" },
            ],
            indexed: &[
                ("uuid", "#uuid"),
                ("name", "name"),
                ("volumeUuid", "volume"),
                ("treeUuid", "tree"),
                ("parentUuid", "parent"),
            ],
            sorted: &[("name", "name")],
        },
        access: Access::With("volumeUuid"),
        taggable: true,
        // DeleteVolumeSnapshot (with its descendants) is its own API.
        deletion: Deletion::Own(None),
        actor: None,
    },
    Kind {
        api: "VolumeSnapshotTree",
        vo: "VolumeSnapshotTreeVO",
        table: &TableOf::<VolumeSnapshotTreeRecord>::new(),
        shape: Shape {
            name: "volume-snapshot-trees",
            fields: &[f("uuid", Id), f("volumeUuid", Id), f("current", Text)],
            relations: &[
                Relation::Ref { name: "volume", field: "volumeUuid", kind: "volumes" },
                Relation::Back {
                    name: "snapshots",
                    kind: "volume-snapshots",
                    field: "treeUuid",
                    dependent: false,
                },
            ],
            indexed: &[("uuid", "#uuid"), ("volumeUuid", "volume")],
            sorted: &[],
        },
        access: Access::With("volumeUuid"),
        taggable: false,
        deletion: Deletion::Never,
        actor: None,
    },
    Kind {
        api: "L2Network",
        vo: "L2NetworkVO",
        table: &TableOf::<L2NetworkRecord>::new(),
        shape: Shape {
            name: "l2-networks",
            fields: &[
                f("uuid", Id),
                f("name", Text),
                f("zoneUuid", Id),
                f("physicalInterface", Text),
                f("type", Text),
                f("vlan", Int),
                f("vni", Int),
                f("poolUuid", Id),
                f("vtepCidr", Text),
            ],
            relations: &[
                Relation::Ref { name: "zone", field: "zoneUuid", kind: "zones" },
                Relation::Ref { name: "pool", field: "poolUuid", kind: "l2-networks" },
                back("l3Network", "l3-networks", "l2NetworkUuid"),
                back("vxlanNetwork", "l2-networks", "poolUuid"),
            ],
            indexed: &[("uuid", "#uuid"), ("zoneUuid", "zone"), ("poolUuid", "pool")],
            sorted: &[],
        },
        access: Access::AdminOnly,
        taggable: true,
        deletion: Deletion::Cascade(cascade::remove_l2),
        actor: None,
    },
    Kind {
        api: "L3Network",
        vo: "L3NetworkVO",
        table: &TableOf::<L3NetworkRecord>::new(),
        shape: Shape {
            name: "l3-networks",
            fields: &[
                f("uuid", Id),
                f("name", Text),
                f("l2NetworkUuid", Id),
                f("bridge", Text),
                f("mtu", Int),
                f("dhcpServerIp", Text),
            ],
            relations: &[
                Relation::Ref { name: "l2Network", field: "l2NetworkUuid", kind: "l2-networks" },
                back("vmInstance", "vm-instances", "vmNics.l3NetworkUuid"),
                back("vip", "vips", "l3NetworkUuid"),
                // A VIP whose NICs' network goes is detached (with the VMs), not deleted.
                Relation::Back {
                    name: "peerVip",
                    kind: "vips",
                    field: "peerL3NetworkUuid",
                    dependent: false,
                },
                // Its services go with it (in the L3 actor's deletion), never holding it up.
                Relation::Back {
                    name: "networkServices",
                    kind: "network-service-l3-refs",
                    field: "l3NetworkUuid",
                    dependent: false,
                },
            ],
            indexed: &[("uuid", "#uuid"), ("name", "name"), ("l2NetworkUuid", "l2")],
            sorted: &[("name", "name")],
        },
        access: Access::Shared,
        taggable: true,
        deletion: Deletion::Cascade(cascade::remove_l3),
        actor: Some("l3"),
    },
    Kind {
        api: "NetworkServiceProvider",
        vo: "NetworkServiceProviderVO",
        table: &TableOf::<NetworkServiceProviderRecord>::new(),
        shape: Shape {
            name: "network-service-providers",
            fields: &[f("uuid", Id), f("name", Text), f("type", Text), f("description", Text)],
            relations: &[Relation::Back {
                name: "networkServiceL3NetworkRef",
                kind: "network-service-l3-refs",
                field: "networkServiceProviderUuid",
                dependent: false,
            }],
            indexed: &[("uuid", "#uuid"), ("type", "type")],
            sorted: &[],
        },
        access: Access::AdminOnly,
        taggable: false,
        deletion: Deletion::Never,
        actor: None,
    },
    Kind {
        api: "NetworkServiceL3NetworkRef",
        vo: "NetworkServiceL3NetworkRefVO",
        table: &TableOf::<NetworkServiceL3RefRecord>::new(),
        shape: Shape {
            name: "network-service-l3-refs",
            fields: &[
                f("uuid", Id),
                f("l3NetworkUuid", Id),
                f("networkServiceProviderUuid", Id),
                f("networkServiceType", Text),
            ],
            relations: &[
                Relation::Ref { name: "l3Network", field: "l3NetworkUuid", kind: "l3-networks" },
                Relation::Ref {
                    name: "networkServiceProvider",
                    field: "networkServiceProviderUuid",
                    kind: "network-service-providers",
                },
            ],
            indexed: &[
                ("uuid", "#uuid"),
                ("l3NetworkUuid", "l3"),
                ("networkServiceProviderUuid", "provider"),
            ],
            sorted: &[],
        },
        access: Access::AdminOnly,
        taggable: false,
        deletion: Deletion::Never,
        actor: None,
    },
    Kind {
        api: "SecurityGroup",
        vo: "SecurityGroupVO",
        table: &TableOf::<SecurityGroupRecord>::new(),
        shape: Shape {
            name: "security-groups",
            fields: &[f("uuid", Id), f("name", Text), f("description", Text), f("state", Text)],
            relations: &[
                Relation::Nested { name: "rules", shape: &SECURITY_GROUP_RULE },
                Relation::Nested { name: "vmNics", shape: &SECURITY_GROUP_MEMBER },
            ],
            indexed: &[
                ("uuid", "#uuid"),
                ("name", "name"),
                ("vmNics.vmInstanceUuid", "vm"),
                ("vmNics.vmNicUuid", "nic"),
            ],
            sorted: &[("name", "name")],
        },
        access: Access::Owned,
        taggable: true,
        deletion: Deletion::Cascade(cascade::remove_security_group),
        actor: None,
    },
    Kind {
        api: "Vip",
        vo: "VipVO",
        table: &TableOf::<VipRecord>::new(),
        shape: Shape {
            name: "vips",
            fields: &[
                f("uuid", Id),
                f("name", Text),
                f("description", Text),
                f("l3NetworkUuid", Id),
                f("ip", Text),
                f("netmask", Text),
                f("gateway", Text),
                f("useFor", Text),
                f("peerL3NetworkUuid", Id),
                f("state", Text),
            ],
            relations: &[
                Relation::Ref { name: "l3Network", field: "l3NetworkUuid", kind: "l3-networks" },
                Relation::Ref {
                    name: "peerL3Network",
                    field: "peerL3NetworkUuid",
                    kind: "l3-networks",
                },
                back("eip", "eips", "vipUuid"),
                back("portForwardingRules", "port-forwarding", "vipUuid"),
            ],
            indexed: &[
                ("uuid", "#uuid"),
                ("name", "name"),
                ("l3NetworkUuid", "l3"),
                ("peerL3NetworkUuid", "peer-l3"),
            ],
            sorted: &[("name", "name")],
        },
        access: Access::Owned,
        taggable: true,
        deletion: Deletion::Cascade(crate::vip::remove_vip),
        actor: None,
    },
    Kind {
        api: "Eip",
        vo: "EipVO",
        table: &TableOf::<EipRecord>::new(),
        shape: Shape {
            name: "eips",
            fields: &[
                f("uuid", Id),
                f("name", Text),
                f("description", Text),
                f("vipUuid", Id),
                f("vipIp", Text),
                f("vmNicUuid", Id),
                f("guestIp", Text),
                f("state", Text),
            ],
            relations: &[Relation::Ref { name: "vip", field: "vipUuid", kind: "vips" }],
            indexed: &[
                ("uuid", "#uuid"),
                ("name", "name"),
                ("vipUuid", "vip"),
                ("vmNicUuid", "nic"),
            ],
            sorted: &[("name", "name")],
        },
        access: Access::Owned,
        taggable: true,
        deletion: Deletion::Cascade(crate::vip::remove_eip),
        actor: None,
    },
    Kind {
        api: "PortForwardingRule",
        vo: "PortForwardingRuleVO",
        table: &TableOf::<PortForwardingRuleRecord>::new(),
        shape: Shape {
            name: "port-forwarding",
            fields: &[
                f("uuid", Id),
                f("name", Text),
                f("description", Text),
                f("vipUuid", Id),
                f("vipIp", Text),
                f("vipPortStart", Int),
                f("vipPortEnd", Int),
                f("privatePortStart", Int),
                f("privatePortEnd", Int),
                f("protocolType", Text),
                f("allowedCidr", Text),
                f("vmNicUuid", Id),
                f("guestIp", Text),
                f("state", Text),
            ],
            relations: &[Relation::Ref { name: "vip", field: "vipUuid", kind: "vips" }],
            indexed: &[
                ("uuid", "#uuid"),
                ("name", "name"),
                ("vipUuid", "vip"),
                ("vmNicUuid", "nic"),
            ],
            sorted: &[("name", "name")],
        },
        access: Access::Owned,
        taggable: true,
        deletion: Deletion::Cascade(crate::vip::remove_port_forwarding_rule),
        actor: None,
    },
    Kind {
        api: "VmInstance",
        vo: "VmInstanceVO",
        table: &TableOf::<VmRecord>::new(),
        shape: Shape {
            name: "vm-instances",
            fields: &[
                f("uuid", Id),
                f("name", Text),
                f("state", Text),
                f("hostUuid", Id),
                f("lastHostUuid", Id),
                f("cpuNum", Int),
                f("memorySize", Int),
                f("rootVolumePath", Text),
            ],
            relations: &[
                Relation::Ref { name: "host", field: "hostUuid", kind: "hosts" },
                Relation::Nested { name: "vmNics", shape: &VM_NIC },
                // Detached, not deleted, when the VM is expunged.
                Relation::Back {
                    name: "allVolumes",
                    kind: "volumes",
                    field: "vmInstanceUuid",
                    dependent: false,
                },
            ],
            indexed: &[
                ("uuid", "#uuid"),
                ("name", "name"),
                ("state", "state"),
                ("hostUuid", "host"),
                ("vmNics.ip", "ip"),
                ("vmNics.l3NetworkUuid", "l3"),
            ],
            sorted: &[("name", "name"), ("state", "state")],
        },
        access: Access::Owned,
        taggable: true,
        // The API's DELETE destroys a VM (recoverable); a cascade destroys and expunges it.
        deletion: Deletion::Own(Some(cascade::remove_vm)),
        actor: Some("vm"),
    },
    Kind {
        api: "Image",
        vo: "ImageVO",
        table: &TableOf::<ImageRecord>::new(),
        shape: Shape {
            name: "images",
            fields: &[
                f("uuid", Id),
                f("name", Text),
                f("url", Text),
                f("format", Text),
                f("mediaType", Text),
                f("size", Int),
                f("checksum", Text),
                f("status", Text),
            ],
            relations: &[],
            indexed: &[("uuid", "#uuid")],
            sorted: &[],
        },
        access: Access::Shared,
        taggable: true,
        deletion: Deletion::Never,
        actor: None,
    },
    Kind {
        api: "BackupStorage",
        vo: "BackupStorageVO",
        table: &TableOf::<BackupStorageRecord>::new(),
        shape: Shape {
            name: "backup-storage",
            fields: &[
                f("uuid", Id),
                f("name", Text),
                f("url", Text),
                f("type", Text),
                f("hostname", Text),
                f("status", Text),
                f("totalCapacity", Int),
                f("availableCapacity", Int),
            ],
            relations: &[],
            indexed: &[("uuid", "#uuid")],
            sorted: &[],
        },
        access: Access::AdminOnly,
        taggable: true,
        deletion: Deletion::Never,
        actor: Some("backup-storage"),
    },
    Kind {
        api: "PrimaryStorage",
        vo: "PrimaryStorageVO",
        table: &TableOf::<PrimaryStorageRecord>::new(),
        shape: Shape {
            name: "primary-storage",
            fields: &[
                f("uuid", Id),
                f("name", Text),
                f("url", Text),
                f("zoneUuid", Id),
                f("type", Text),
            ],
            relations: &[Relation::Ref { name: "zone", field: "zoneUuid", kind: "zones" }],
            indexed: &[("uuid", "#uuid")],
            sorted: &[],
        },
        access: Access::AdminOnly,
        taggable: true,
        deletion: Deletion::Never,
        actor: None,
    },
    Kind {
        api: "Account",
        vo: "AccountVO",
        table: &TableOf::<AccountRecord>::new(),
        shape: Shape {
            name: "accounts",
            fields: &[f("uuid", Id), f("name", Text), f("type", Text), f("createDate", Int)],
            relations: &[],
            indexed: &[("uuid", "#uuid"), ("name", "name")],
            sorted: &[("name", "name")],
        },
        access: Access::Itself,
        taggable: false,
        deletion: Deletion::Own(None),
        actor: None,
    },
    Kind {
        api: "UserTag",
        vo: "UserTagVO",
        table: &TableOf::<UserTag>::new(),
        shape: Shape {
            name: "user-tags",
            fields: TAG_FIELDS,
            relations: &[],
            indexed: &[("uuid", "#uuid"), ("resourceUuid", "resource"), ("tag", "tag")],
            sorted: &[("tag", "tag")],
        },
        access: Access::With("resourceUuid"),
        taggable: false,
        deletion: Deletion::Own(None),
        actor: None,
    },
    Kind {
        api: "SystemTag",
        vo: "SystemTagVO",
        table: &TableOf::<SystemTag>::new(),
        shape: Shape {
            name: "system-tags",
            fields: TAG_FIELDS,
            relations: &[],
            indexed: &[("uuid", "#uuid"), ("resourceUuid", "resource"), ("tag", "tag")],
            sorted: &[("tag", "tag")],
        },
        access: Access::With("resourceUuid"),
        taggable: false,
        deletion: Deletion::Own(None),
        actor: None,
    },
];

/// The tables no kind names: what hangs on resources (pins, addresses, ownership, shared
/// storage's bookings) and what
/// accounts keep apart from their inventory (password hashes, sessions).
static INTERNAL_TABLES: &[&dyn Table] = &[
    &TableOf::<AgentCertRecord>::new(),
    &TableOf::<UsedIpRecord>::new(),
    &TableOf::<OwnerRecord>::new(),
    &TableOf::<CredentialRecord>::new(),
    &TableOf::<SessionRecord>::new(),
    &TableOf::<crate::shared_capacity::SharedCapacityRecord>::new(),
];

/// The kind at URL segment `url`.
pub fn by_url(url: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.url() == url)
}

/// The kind whose records live in `table`.
pub fn by_table(table: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.table.name() == table)
}

/// The kind of ZStack resource type `vo` (`VmInstanceVO`).
pub fn by_vo(vo: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.vo == vo)
}

/// The kind whose resources actor kind `actor` runs.
pub fn by_actor(actor: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.actor == Some(actor))
}

/// The kind of record type `R`.
pub fn of<R: Record>() -> &'static Kind {
    by_table(R::KIND).expect("every record type behind a kind is declared in KINDS")
}

/// Backfills the index entries every table declares (see `Db::ensure_indexes`): a store
/// written by an older build lacks the entries of indexes added since. Call at startup,
/// before anything writes. Returns how many entries were added.
pub fn ensure_indexes(db: &Db) -> Result<usize, StoreError> {
    let mut added = 0;
    for table in KINDS.iter().map(|k| k.table).chain(INTERNAL_TABLES.iter().copied()) {
        added += table.ensure_indexes(db)?;
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name a declaration gives is given once, and every name it uses resolves.
    #[test]
    fn the_declarations_agree_with_each_other_and_with_the_records() {
        let mut seen = std::collections::HashSet::new();
        for kind in KINDS {
            for (what, name) in [
                ("api", kind.api),
                ("vo", kind.vo),
                ("url", kind.url()),
                ("table", kind.table.name()),
            ] {
                assert!(seen.insert((what, name)), "two kinds share the {what} name {name}");
            }
            assert_eq!(by_url(kind.url()).map(|k| k.api), Some(kind.api));
            assert_eq!(by_vo(kind.vo).map(|k| k.api), Some(kind.api));
            assert_eq!(by_table(kind.table.name()).map(|k| k.api), Some(kind.api));
            let indexes = kind.table.index_names();
            for (path, index) in kind.shape.indexed.iter().chain(kind.shape.sorted) {
                assert!(
                    *index == "#uuid" || indexes.contains(index),
                    "{}: `{path}` names index `{index}`, not one of {indexes:?}",
                    kind.api
                );
            }
            for sorted in kind.shape.sorted {
                assert!(kind.shape.indexed.contains(sorted), "{}: {sorted:?}", kind.api);
            }
            for relation in kind.relations() {
                if let Relation::Ref { kind: other, .. } | Relation::Back { kind: other, .. } =
                    relation
                {
                    assert!(by_url(other).is_some(), "{}: no kind {other}", kind.api);
                }
            }
            // Resolves every dependency's index, or panics.
            let _ = kind.dependents().count();
        }
    }

    #[test]
    fn a_creation_guards_the_records_it_depends_on() {
        let parents = |url: &str| -> Vec<(&str, &str)> {
            by_url(url).unwrap().record_parents().map(|(k, f)| (k.url(), f)).collect()
        };
        assert_eq!(parents("clusters"), [("zones", "zoneUuid")]);
        // A VXLAN network guards its pool.
        assert_eq!(parents("l2-networks"), [("zones", "zoneUuid"), ("l2-networks", "poolUuid")]);
        assert_eq!(parents("hosts"), [("clusters", "clusterUuid")]);
        assert_eq!(parents("l3-networks"), [("l2-networks", "l2NetworkUuid")]);
        // A VM's host and L3 networks are run by actors, which guard their VMs themselves.
        assert!(parents("vm-instances").is_empty());
    }

    #[test]
    fn dependencies_are_those_cascade_walks() {
        let deps = |url: &str| -> Vec<(&str, &str)> {
            by_url(url).unwrap().dependents().map(|(k, i)| (k.url(), i)).collect()
        };
        assert_eq!(deps("zones"), [("clusters", "zone"), ("l2-networks", "zone")]);
        assert_eq!(deps("clusters"), [("hosts", "cluster")]);
        assert_eq!(deps("hosts"), [("vm-instances", "host"), ("volumes", "host")]);
        // A pool's VXLAN networks go before it.
        assert_eq!(deps("l2-networks"), [("l3-networks", "l2"), ("l2-networks", "pool")]);
        assert_eq!(deps("l3-networks"), [("vm-instances", "l3"), ("vips", "l3")]);
        // An EIP or rule goes before its VIP; a VM's NIC only detaches them.
        assert_eq!(deps("vips"), [("eips", "vip"), ("port-forwarding", "vip")]);
        assert!(deps("vm-instances").is_empty());
    }
}
