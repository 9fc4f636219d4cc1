//! What the MN and an agent say to each other, inside the link's TLS session (see
//! [`crate::tls`]).
//!
//! A link starts with a handshake: the MN sends [`Hello`] (protocol version, the host it
//! takes the agent for, and how long the agent may wait for its next frame), and the agent
//! answers [`Welcome`] with its facts and every domain it knows, [`Enroll`] when it holds no
//! certificate from the MN yet (its bootstrap secret and public key; the MN answers with an
//! [`EnrollReply`] and the agent closes the link), or [`Refused`] with a reason both sides
//! log. After a welcome the MN sends [`ToAgent`] frames (requests and pings) and the agent
//! sends [`FromAgent`] frames (responses, pushed events and pongs), multiplexed by request
//! id.
//!
//! Every request carries an id and an absolute deadline. The agent refuses a request whose
//! deadline has passed, and answers a repeated id with the first result without acting twice,
//! so the MN can resend after a reconnect without fear.
//!
//! [`Hello`]: ClientHello
//! [`Welcome`]: ServerHello::Welcome
//! [`Enroll`]: ServerHello::Enroll
//! [`Refused`]: ServerHello::Refused

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The protocol version this build speaks. A handshake with another version is refused.
/// Version 2 is the link on TLS, with enrollment and without a token; version 3 adds the
/// host's network (its addresses in the facts, and the network commands); version 4 adds
/// the VIP namespaces (EIP, port forwarding, SNAT) to the network; version 5 adds data
/// volumes, their snapshots, describing a volume file and cleaning the image cache; version
/// 6 adds copying files between hosts (marks, digests, chunks) for local storage migration
/// and mounting and measuring primary storage.
pub const PROTOCOL_VERSION: u32 = 7;

/// The largest chunk a `ReadFile` or `WriteFile` carries: 4 MiB, well inside a frame.
pub const MAX_CHUNK: u32 = 4 << 20;

/// The MN's first frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    /// [`PROTOCOL_VERSION`] of the MN.
    pub protocol: u32,
    /// The host UUID the MN knows this agent as.
    pub host_uuid: Uuid,
    /// The agent ends the session when nothing (not even a ping) has come from the MN for
    /// this long, in milliseconds, so an MN that vanished without closing the connection (a
    /// power cut, a partition) does not hold the host's one session forever.
    pub idle_timeout_ms: u64,
}

/// The agent's answer to [`ClientHello`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ServerHello {
    /// The link is up.
    Welcome {
        /// The agent's protocol version.
        protocol: u32,
        /// What the host is.
        facts: HostFacts,
        /// Every domain the hypervisor has, for reconciliation.
        domains: Vec<DomainInfo>,
    },
    /// The agent holds no certificate from the MN yet and asks for one. It says this only to
    /// a client whose MN certificate it verified, so the secret goes to the MN alone.
    Enroll {
        /// The one-time secret from its bootstrap file.
        secret: String,
        /// Its raw ECDSA P-256 public key: the key of the certificate it presented in the
        /// handshake, which the MN checks.
        public_key: Vec<u8>,
    },
    /// The link is refused; the agent closes it.
    Refused {
        /// Why (protocol mismatch, another MN's session is live), for both sides' logs and the
        /// API.
        reason: String,
    },
}

/// The MN's answer to [`ServerHello::Enroll`]. The agent closes the link after it; enrolled,
/// it is dialed again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollReply {
    /// The certificate the MN's CA issued for the agent's key, PEM.
    Issued {
        /// The certificate.
        certificate: String,
    },
    /// The MN refused the secret or the key.
    Refused {
        /// Why, for the agent's log.
        reason: String,
    },
}

/// What the agent reports about its host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostFacts {
    /// The host's name.
    pub hostname: String,
    /// The hypervisor and driver (`libvirt test:///default`, `sim`).
    pub hypervisor: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// The agent's version.
    pub agent_version: String,
    /// The host's IPv4 addresses (where its VXLAN tunnels can end).
    pub addresses: Vec<InterfaceAddress>,
}

/// An IPv4 address of one of the host's interfaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceAddress {
    /// The interface.
    pub interface: String,
    /// The address.
    pub address: std::net::Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
}

/// A frame from the MN after the handshake.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToAgent {
    /// A command to run.
    Request(Request),
    /// A heartbeat; the agent answers [`FromAgent::Pong`] with the same sequence number.
    Ping {
        /// Echoed back.
        seq: u64,
    },
}

/// A frame from the agent after the handshake.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FromAgent {
    /// The answer to a request.
    Response(Response),
    /// Something happened on the host.
    Event(AgentEvent),
    /// The answer to a ping.
    Pong {
        /// The ping's sequence number.
        seq: u64,
    },
}

/// A command with its id and deadline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Unique per command; a repeat gets the first result.
    pub id: Uuid,
    /// After this (ms since the Unix epoch) the agent refuses the command.
    pub deadline_unix_ms: u64,
    /// The job the command serves, for the agent's logs.
    pub job_id: Option<Uuid>,
    /// What to do.
    pub command: Command,
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The request's id.
    pub id: Uuid,
    /// What happened.
    pub result: Result<Reply, AgentError>,
}

/// A domain to define.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSpec {
    /// The VM's UUID (the domain's UUID).
    pub uuid: Uuid,
    /// The domain's name.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// The root volume's path on the host, if any.
    pub root_volume: Option<String>,
    /// Network interfaces.
    pub nics: Vec<NicSpec>,
    /// Data volumes, by device number.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
}

/// A data volume as a domain's disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The volume's UUID (its disk's serial, which the guest sees in `/dev/disk/by-id`).
    pub volume: Uuid,
    /// Its qcow2 file on the host.
    pub path: String,
    /// Its device number: 1 is the first data disk (`vdb`), up to 24 (`vdy`); 0 is the root.
    pub device_id: u32,
}

impl DiskSpec {
    /// The guest's name for the disk: `vdb` for device 1.
    pub fn target(&self) -> String {
        let letter = u8::try_from(self.device_id).ok().and_then(|d| b'a'.checked_add(d));
        format!("vd{}", char::from(letter.filter(u8::is_ascii_lowercase).unwrap_or(b'z')))
    }
}

/// A network interface of a domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// Its MAC address.
    pub mac: String,
    /// The host bridge it plugs into (none: a user-mode NIC).
    pub bridge: Option<String>,
}

/// What the agent can be asked to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Report the host's facts.
    HostFacts,
    /// List every domain with its state.
    ListDomains,
    /// Define (or redefine, when stopped) a domain.
    DefineDomain(DomainSpec),
    /// Start a defined domain.
    StartDomain {
        /// The domain.
        uuid: Uuid,
    },
    /// Ask the guest to power off (ACPI).
    ShutdownDomain {
        /// The domain.
        uuid: Uuid,
    },
    /// Power the domain off at once.
    DestroyDomain {
        /// The domain.
        uuid: Uuid,
    },
    /// Reboot the guest.
    RebootDomain {
        /// The domain.
        uuid: Uuid,
    },
    /// Pause the domain.
    SuspendDomain {
        /// The domain.
        uuid: Uuid,
    },
    /// Unpause the domain.
    ResumeDomain {
        /// The domain.
        uuid: Uuid,
    },
    /// Remove the domain's definition (it must be off).
    UndefineDomain {
        /// The domain.
        uuid: Uuid,
    },
    /// Make sure `image` is in the host's image cache under `cache_dir`, copying it from
    /// `source` (a path on the host, such as the backup storage's) if it is missing.
    CacheImage {
        /// The image's UUID (the cache file's name).
        image: Uuid,
        /// Where the image is.
        source: String,
        /// The primary storage's image cache directory.
        cache_dir: String,
    },
    /// Create a qcow2 root volume backed by a cached image (answered `Reply::Volume`).
    CreateRootVolume {
        /// The volume's UUID (its file's name).
        volume: Uuid,
        /// The cached image it is backed by.
        backing: String,
        /// The directory to create it in.
        dir: String,
    },
    /// Create an empty qcow2 data volume of `size` bytes (succeeds if it exists).
    CreateDataVolume {
        /// The volume's UUID (its file's name).
        volume: Uuid,
        /// Its virtual size in bytes.
        size: u64,
        /// The directory to create it in.
        dir: String,
    },
    /// Plug a disk into a running domain (and into its definition).
    AttachDisk {
        /// The domain.
        uuid: Uuid,
        /// The disk.
        disk: DiskSpec,
    },
    /// Unplug a disk from a running domain (and from its definition); succeeds if it is
    /// not there.
    DetachDisk {
        /// The domain.
        uuid: Uuid,
        /// The disk.
        disk: DiskSpec,
    },
    /// Freeze a volume's top file as a snapshot (offline): a new top backed by it (succeeds
    /// if the new top exists).
    SnapshotVolume {
        /// The volume's top file, which becomes the snapshot's.
        top: String,
        /// The new top to create.
        new_top: String,
    },
    /// The same on a running domain's disk: libvirt's external, disk-only snapshot.
    SnapshotDisk {
        /// The domain.
        uuid: Uuid,
        /// The disk, as the domain has it now.
        disk: DiskSpec,
        /// The new top to create.
        new_top: String,
    },
    /// Merge into a volume's top (offline) every layer of its chain above `base` (none:
    /// every layer, the top then standing alone): `qemu-img rebase`, which copies what the
    /// dropped layers held.
    RebaseVolume {
        /// The volume's top file.
        top: String,
        /// The layer to keep as its backing file.
        base: Option<String>,
    },
    /// The same on a running domain's disk: a block pull, waited for.
    PullDisk {
        /// The domain.
        uuid: Uuid,
        /// The disk.
        disk: DiskSpec,
        /// The layer to keep as its backing file.
        base: Option<String>,
    },
    /// Copy a volume's chain, from `source` down, into one standalone qcow2 file `dest`
    /// (a template or a volume made from a snapshot); succeeds if `dest` exists.
    FlattenVolume {
        /// The top of the chain to copy.
        source: String,
        /// The file to make.
        dest: String,
    },
    /// Grow a volume's top file (offline) to `size` bytes.
    ResizeVolume {
        /// The volume's top file.
        path: String,
        /// Its new virtual size.
        size: u64,
    },
    /// Grow a running domain's disk to `size` bytes (the guest sees the new size).
    ResizeDisk {
        /// The domain.
        uuid: Uuid,
        /// The disk.
        disk: DiskSpec,
        /// Its new virtual size.
        size: u64,
    },
    /// Delete a volume file (succeeds if it is already gone).
    DeleteVolume {
        /// The volume's path.
        path: String,
    },
    /// Describe a volume file (its sizes and backing file); `NotFound` if it does not exist.
    /// It waits for a making of the same file under way, and for `domain`'s earlier
    /// commands, so that "not found" means the file will not appear from them.
    DescribeVolume {
        /// The volume's path.
        path: String,
        /// The domain whose commands may make it (a live snapshot's), if any.
        domain: Option<Uuid>,
    },
    /// Delete every cached image in `cache_dir` that no file under `volume_dirs` is backed
    /// by, keeping those made or handed out within `grace_secs`.
    CleanImageCache {
        /// The primary storage's image cache directory.
        cache_dir: String,
        /// The directories of the volumes and snapshots that may be backed by a cache.
        volume_dirs: Vec<String>,
        /// How recently made or handed out a cache must be to stay whatever uses it.
        grace_secs: u64,
    },
    /// Leave a mark file at `path` (in a primary storage's directory), so that another host
    /// can tell whether it sees this host's storage (`DescribeVolume` finds the mark there).
    MarkStorage {
        /// The mark's path.
        path: String,
    },
    /// Mount shared primary storage's export `url` (`server:/export`) at `mount_point`,
    /// unless something is mounted there already.
    MountStorage {
        /// The export.
        url: String,
        /// Where the host mounts it.
        mount_point: String,
    },
    /// The size and free space of the filesystem holding primary storage directory `dir`
    /// (made if missing), answered `Reply::Capacity`.
    StorageCapacity {
        /// The storage's directory on the host.
        dir: String,
    },
    /// Delete the unsealed copies (`*.part-copy-*`) directly in `dir` that nothing has
    /// written for `older_than_secs`: what copies cut by a dead MN left (a copy under way
    /// writes its file every chunk). A missing directory holds none.
    SweepPartialCopies {
        /// The directory.
        dir: String,
        /// How long a copy must have been untouched.
        older_than_secs: u64,
    },
    /// The size and SHA-256 digest of the file at `path` (`NotFound` if it does not exist).
    DigestFile {
        /// The file.
        path: String,
    },
    /// Read at most `len` bytes (no more than [`MAX_CHUNK`]) of the file at `path` from
    /// `offset` (answered `Reply::Chunk`; short at the file's end). It changes nothing, so
    /// the agent does not remember its answer for a repeat: it reads again.
    ReadFile {
        /// The file.
        path: String,
        /// Where to start.
        offset: u64,
        /// How many bytes at most.
        len: u32,
    },
    /// Write `data` at `offset` into transfer `transfer`'s incoming copy of `path` (its
    /// `.part-copy-<transfer>` file, started afresh at offset 0). Writing the same chunk
    /// again changes nothing; two transfers of one file write apart.
    WriteFile {
        /// The file being copied in.
        path: String,
        /// The transfer (one per move).
        transfer: Uuid,
        /// Where the chunk goes.
        offset: u64,
        /// The chunk (no more than [`MAX_CHUNK`] bytes).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Finish transfer `transfer`'s incoming copy of `path`: its size and digest must be
    /// `size` and `sha256` (the source's), then it is flushed and renamed into place
    /// (answered `Reply::Sealed`). Succeeds if `path` already holds exactly that content
    /// (saying so); refused if it holds something else.
    SealFile {
        /// The file being copied in.
        path: String,
        /// The transfer.
        transfer: Uuid,
        /// The source's size.
        size: u64,
        /// The source's SHA-256 digest, in hex.
        sha256: String,
    },
    /// Make the host's network what the MN wants: the whole of it, every time.
    ApplyNetwork(crate::net::NetworkConfig),
    /// Report the host's network as the agent finds it.
    NetworkStatus,
}

impl Command {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::HostFacts => "host-facts",
            Command::ListDomains => "list-domains",
            Command::DefineDomain(_) => "define-domain",
            Command::StartDomain { .. } => "start-domain",
            Command::ShutdownDomain { .. } => "shutdown-domain",
            Command::DestroyDomain { .. } => "destroy-domain",
            Command::RebootDomain { .. } => "reboot-domain",
            Command::SuspendDomain { .. } => "suspend-domain",
            Command::ResumeDomain { .. } => "resume-domain",
            Command::UndefineDomain { .. } => "undefine-domain",
            Command::CacheImage { .. } => "cache-image",
            Command::CreateRootVolume { .. } => "create-root-volume",
            Command::CreateDataVolume { .. } => "create-data-volume",
            Command::AttachDisk { .. } => "attach-disk",
            Command::DetachDisk { .. } => "detach-disk",
            Command::SnapshotVolume { .. } => "snapshot-volume",
            Command::SnapshotDisk { .. } => "snapshot-disk",
            Command::RebaseVolume { .. } => "rebase-volume",
            Command::PullDisk { .. } => "pull-disk",
            Command::ResizeVolume { .. } => "resize-volume",
            Command::FlattenVolume { .. } => "flatten-volume",
            Command::ResizeDisk { .. } => "resize-disk",
            Command::DeleteVolume { .. } => "delete-volume",
            Command::DescribeVolume { .. } => "describe-volume",
            Command::CleanImageCache { .. } => "clean-image-cache",
            Command::MarkStorage { .. } => "mark-storage",
            Command::MountStorage { .. } => "mount-storage",
            Command::StorageCapacity { .. } => "storage-capacity",
            Command::SweepPartialCopies { .. } => "sweep-partial-copies",
            Command::DigestFile { .. } => "digest-file",
            Command::ReadFile { .. } => "read-file",
            Command::WriteFile { .. } => "write-file",
            Command::SealFile { .. } => "seal-file",
            Command::ApplyNetwork(_) => "apply-network",
            Command::NetworkStatus => "network-status",
        }
    }

    /// The domain a command changes, if it changes one.
    pub fn domain(&self) -> Option<Uuid> {
        match self {
            Command::DefineDomain(spec) => Some(spec.uuid),
            Command::StartDomain { uuid }
            | Command::ShutdownDomain { uuid }
            | Command::DestroyDomain { uuid }
            | Command::RebootDomain { uuid }
            | Command::SuspendDomain { uuid }
            | Command::ResumeDomain { uuid }
            | Command::UndefineDomain { uuid }
            | Command::AttachDisk { uuid, .. }
            | Command::DetachDisk { uuid, .. }
            | Command::SnapshotDisk { uuid, .. }
            | Command::PullDisk { uuid, .. }
            | Command::ResizeDisk { uuid, .. } => Some(*uuid),
            Command::DescribeVolume { domain, .. } => *domain,
            Command::HostFacts
            | Command::ListDomains
            | Command::CacheImage { .. }
            | Command::CreateRootVolume { .. }
            | Command::CreateDataVolume { .. }
            | Command::SnapshotVolume { .. }
            | Command::RebaseVolume { .. }
            | Command::ResizeVolume { .. }
            | Command::FlattenVolume { .. }
            | Command::DeleteVolume { .. }
            | Command::CleanImageCache { .. }
            | Command::MarkStorage { .. }
            | Command::MountStorage { .. }
            | Command::StorageCapacity { .. }
            | Command::SweepPartialCopies { .. }
            | Command::DigestFile { .. }
            | Command::ReadFile { .. }
            | Command::WriteFile { .. }
            | Command::SealFile { .. }
            | Command::ApplyNetwork(_)
            | Command::NetworkStatus => None,
        }
    }
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Done; nothing to report.
    Done,
    /// The host's facts.
    Facts(HostFacts),
    /// The domains and their states.
    Domains(Vec<DomainInfo>),
    /// A file the agent made: its path and size in bytes.
    File {
        /// Where it is.
        path: String,
        /// Its size.
        size: u64,
    },
    /// The host's network as found (after an apply: as made).
    Network(crate::net::NetworkReport),
    /// A volume file as found.
    Volume {
        /// Where it is.
        path: String,
        /// Its size on disk in bytes.
        size: u64,
        /// Its virtual size in bytes (its size on disk if it is not qcow2).
        virtual_size: u64,
        /// The file it is backed by, if any.
        backing: Option<String>,
    },
    /// A copy sealed into place.
    Sealed {
        /// Whether the file was there already, with that content (nothing was renamed).
        existed: bool,
    },
    /// A filesystem's size and free space, in bytes.
    Capacity {
        /// Its size.
        total: u64,
        /// What an unprivileged writer may still use.
        available: u64,
    },
    /// A file's size and SHA-256 digest (hex).
    Digest {
        /// Its size in bytes.
        size: u64,
        /// Its digest.
        sha256: String,
    },
    /// Bytes read from a file (fewer than asked at its end).
    Chunk(#[serde(with = "serde_bytes")] Vec<u8>),
    /// What cleaning an image cache did.
    CacheCleaned {
        /// The cached images deleted.
        deleted: Vec<String>,
        /// How many stayed (in use or recent).
        kept: u64,
        /// How many volume files were read.
        volumes_read: u64,
    },
}

/// A domain as the hypervisor sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainInfo {
    /// The domain's UUID.
    pub uuid: Uuid,
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: DomainState,
}

/// A domain's state, as libvirt reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DomainState {
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Shutting down.
    ShuttingDown,
    /// Off (defined, not running).
    Shutoff,
    /// Crashed.
    Crashed,
    /// Anything else.
    Other,
}

/// Something the agent pushes without being asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentEvent {
    /// A domain changed state (including behind the MN's back).
    DomainStateChanged {
        /// The domain.
        uuid: Uuid,
        /// Its new state; `None` when it no longer exists.
        state: Option<DomainState>,
    },
}

/// Why the agent did not do what it was asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct AgentError {
    /// What kind of failure.
    pub code: AgentErrorCode,
    /// What happened, for a user.
    pub message: String,
}

/// Kinds of agent failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentErrorCode {
    /// The request arrived after its deadline; nothing was done.
    DeadlineExceeded,
    /// No such domain or file.
    NotFound,
    /// The domain is in a state that does not allow this.
    InvalidState,
    /// The hypervisor or a tool failed.
    Driver,
    /// The request itself is wrong.
    BadRequest,
}

impl AgentError {
    /// An error of `code` with `message`.
    pub fn new(code: AgentErrorCode, message: impl Into<String>) -> Self {
        AgentError { code, message: message.into() }
    }
}
