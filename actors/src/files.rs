//! Copying one file between two ends over the MN's links: the hosts' agents, backup
//! storage agents, or the MN's own file system as a source.
//!
//! The agents have no link to each other, and the MN's links are the only authenticated
//! ones, so the bytes go through the MN: read from the source in chunks, written into the
//! destination's `.part-copy-<transfer>` file, then sealed. The destination computes the
//! copy's size and SHA-256 and renames it into place only if they are the source's;
//! byte-identical files hold the same guest-visible content, which is what `qemu-img
//! compare` would check, and this check needs no machine to hold both files.

use std::time::SystemTime;

use strato_proto::{AgentError, AgentErrorCode, Command, LinkError, Reply};
use strato_runtime::Kind;
use uuid::Uuid;

use crate::backup_storage::{self, BackupStorages};
use crate::host::{self, HostError, Hosts};

/// One end of a copy.
#[derive(Clone)]
pub(crate) enum End {
    /// A host's agent.
    Host(Kind<Hosts>, Uuid),
    /// A backup storage's agent, on its own host.
    Store(Kind<BackupStorages>, Uuid),
    /// The MN's own file system (a source only: an image fetched from a URL).
    Node,
}

impl End {
    /// Sends a file command to this end.
    pub(crate) async fn send(
        &self,
        command: Command,
        deadline: SystemTime,
        job: Option<Uuid>,
    ) -> Result<Reply, HostError> {
        match self {
            End::Host(hosts, id) => host::command(hosts, *id, command, deadline, job).await,
            End::Store(stores, id) => {
                backup_storage::command(stores, *id, command, deadline, job).await
            }
            End::Node => on_node(command).await,
        }
    }

    fn label(&self) -> String {
        match self {
            End::Host(_, id) => format!("host {id}"),
            End::Store(_, id) => format!("backup storage {id}"),
            End::Node => "the MN".into(),
        }
    }
}

/// The two reading commands, on the MN's own files.
async fn on_node(command: Command) -> Result<Reply, HostError> {
    let failed = |what: &'static str, path: &str, e: std::io::Error| {
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => AgentErrorCode::NotFound,
            _ => AgentErrorCode::Driver,
        };
        HostError::Link(LinkError::Agent {
            command: what,
            error: AgentError::new(code, format!("{what} {path} on the MN: {e}")),
        })
    };
    match command {
        Command::DigestFile { path } => {
            let file = std::path::PathBuf::from(&path);
            let digest =
                tokio::task::spawn_blocking(move || strato_proto::digest::file_sha256(&file))
                    .await
                    .map_err(|e| failed("digest-file", &path, std::io::Error::other(e)))?;
            let (size, sha256) = digest.map_err(|e| failed("digest-file", &path, e))?;
            Ok(Reply::Digest { size, sha256 })
        }
        Command::ReadFile { path, offset, len } => {
            use tokio::io::{AsyncReadExt, AsyncSeekExt};
            let mut file =
                tokio::fs::File::open(&path).await.map_err(|e| failed("read-file", &path, e))?;
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| failed("read-file", &path, e))?;
            let mut data = Vec::with_capacity(len.min(strato_proto::msg::MAX_CHUNK) as usize);
            file.take(u64::from(len.min(strato_proto::msg::MAX_CHUNK)))
                .read_to_end(&mut data)
                .await
                .map_err(|e| failed("read-file", &path, e))?;
            Ok(Reply::Chunk(data))
        }
        other => Err(unexpected(other.name(), "the MN's files")),
    }
}

/// Whether the agent answered that the file does not exist.
pub(crate) fn is_not_found(error: &HostError) -> bool {
    matches!(error, HostError::Link(LinkError::Agent { error, .. }) if error.code == AgentErrorCode::NotFound)
}

/// An answer that does not fit the command `command` about `what`.
pub(crate) fn unexpected(command: &'static str, what: &str) -> HostError {
    HostError::Link(LinkError::Agent {
        command,
        error: AgentError::new(
            AgentErrorCode::Driver,
            format!("an answer that does not fit {command} for {what}"),
        ),
    })
}

/// A file copied and sealed.
pub(crate) struct Copied {
    /// Its size in bytes.
    pub(crate) size: u64,
    /// Its SHA-256, in hexadecimal.
    pub(crate) sha256: String,
    /// Whether the destination held the same file already (the copy was then dropped).
    pub(crate) existed: bool,
}

/// Copies `from_path` on `from` to `to_path` on `to`, in chunks, as transfer `transfer`
/// (which names the unsealed copy, `<to_path>.part-copy-<transfer>`), and seals it there.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn copy(
    from: &End,
    from_path: &str,
    to: &End,
    to_path: &str,
    transfer: Uuid,
    deadline: SystemTime,
    job: Option<Uuid>,
) -> Result<Copied, HostError> {
    let digest = Command::DigestFile { path: from_path.to_owned() };
    let Reply::Digest { size, sha256 } = from.send(digest, deadline, job).await? else {
        return Err(unexpected("digest-file", from_path));
    };
    let mut offset = 0u64;
    loop {
        let read = Command::ReadFile {
            path: from_path.to_owned(),
            offset,
            len: strato_proto::msg::MAX_CHUNK,
        };
        let Reply::Chunk(data) = from.send(read, deadline, job).await? else {
            return Err(unexpected("read-file", from_path));
        };
        let len = data.len() as u64;
        // Offset 0 is written even for an empty file: it starts the copy.
        if len > 0 || offset == 0 {
            let write = Command::WriteFile { path: to_path.to_owned(), transfer, offset, data };
            to.send(write, deadline, job).await?;
        }
        offset = offset.checked_add(len).ok_or_else(|| unexpected("read-file", from_path))?;
        if len < u64::from(strato_proto::msg::MAX_CHUNK) {
            break;
        }
    }
    let seal =
        Command::SealFile { path: to_path.to_owned(), transfer, size, sha256: sha256.clone() };
    let Reply::Sealed { existed } = to.send(seal, deadline, job).await? else {
        return Err(unexpected("seal-file", to_path));
    };
    tracing::info!(from = %from.label(), to = %to.label(), %from_path, %to_path, size, existed, job = ?job, "file copied and verified");
    Ok(Copied { size, sha256, existed })
}
