//! Volumes on the host: the image cache, qcow2 root volumes and empty data volumes, made
//! with `qemu-img`.
//!
//! Every operation is safe to repeat: a file is built under a temporary name and renamed into
//! place, so a file that exists is complete, and a repeat finds it and returns it.
//!
//! The image cache is cleaned from what the files say, not from what the MN's records say:
//! a cached image is deleted only when no qcow2 file under the primary storage's volume
//! directories names it as its backing file (read from each file's header, which takes
//! microseconds where `qemu-img info` takes milliseconds). A cache handed out within the
//! grace period the MN gives is kept even if nothing uses it yet: a VM creation caches its
//! image and then, in a second command, makes its root volume on it. That protection holds
//! within one agent: an image cache directory is one host's own (local storage).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};

use strato_proto::qcow2::read_header;
use strato_proto::{AgentError, AgentErrorCode, Reply};
use tokio::process::Command;
use tokio::sync::RwLock;
use uuid::Uuid;

/// The image caches of this process: handing one out (read) and cleaning (write) exclude
/// each other, and when each cache was last handed out.
struct CacheGuard {
    turn: RwLock<()>,
    handed_out: Mutex<HashMap<PathBuf, Instant>>,
}

static CACHES: LazyLock<CacheGuard> =
    LazyLock::new(|| CacheGuard { turn: RwLock::new(()), handed_out: Mutex::new(HashMap::new()) });

fn io_error(what: &str, path: &Path, error: std::io::Error) -> AgentError {
    AgentError::new(AgentErrorCode::Driver, format!("{what} {}: {error}", path.display()))
}

async fn file_reply(path: &Path) -> Result<Reply, AgentError> {
    let meta = tokio::fs::metadata(path).await.map_err(|e| io_error("reading", path, e))?;
    Ok(Reply::File { path: path.display().to_string(), size: meta.len() })
}

async fn qemu_img(args: &[&str]) -> Result<(), AgentError> {
    let output = Command::new("qemu-img").args(args).output().await.map_err(|e| {
        AgentError::new(AgentErrorCode::Driver, format!("cannot run qemu-img: {e}"))
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(AgentError::new(
            AgentErrorCode::Driver,
            format!(
                "qemu-img {} failed: {}",
                args[0],
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        ))
    }
}

/// Makes the file `dest` once: `qemu-img` with the arguments `args` gives for a temporary
/// path, which is then renamed to `dest`. A `dest` that exists is complete (a rename made
/// it), so a repeat finds it and returns it.
async fn made_once(
    dest: &Path,
    args: impl FnOnce(&str) -> Vec<String>,
) -> Result<Reply, AgentError> {
    // One maker per file: two creations caching one image on a host at once would write the
    // same temporary file (seen in a chaos run as a failed creation).
    one_maker(dest, make_once(dest, args)).await
}

/// Runs `make`, which makes `dest`, as the only maker of `dest` in this process.
async fn one_maker<T>(dest: &Path, make: impl std::future::Future<Output = T>) -> T {
    let turn = MAKING.lock().expect("files being made").entry(dest.to_owned()).or_default().clone();
    let _turn = turn.lock().await;
    let made = make.await;
    let mut making = MAKING.lock().expect("files being made");
    if making.get(dest).is_some_and(|t| Arc::strong_count(t) <= 2) {
        making.remove(dest);
    }
    made
}

/// The files being made, each by one caller at a time.
static MAKING: LazyLock<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(Default::default);

async fn make_once(
    dest: &Path,
    args: impl FnOnce(&str) -> Vec<String>,
) -> Result<Reply, AgentError> {
    if tokio::fs::try_exists(dest).await.unwrap_or(false) {
        return file_reply(dest).await;
    }
    if let Some(dir) = dest.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(|e| io_error("creating", dir, e))?;
    }
    // Named for this process: agents sharing a directory (hosts on one shared storage) each
    // write their own, and the rename is atomic.
    let tmp = PathBuf::from(format!("{}.part-{}", dest.display(), std::process::id()));
    let args = args(&tmp.display().to_string());
    qemu_img(&args.iter().map(String::as_str).collect::<Vec<_>>()).await?;
    tokio::fs::rename(&tmp, dest).await.map_err(|e| io_error("renaming", &tmp, e))?;
    file_reply(dest).await
}

/// `qemu-img` arguments from string slices.
fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// Puts image `image` into `cache_dir` as qcow2, converting from `source` if missing.
pub async fn cache_image(image: Uuid, source: &str, cache_dir: &str) -> Result<Reply, AgentError> {
    let dest = PathBuf::from(cache_dir).join(format!("{image}.qcow2"));
    {
        // Handed out before a cleaning can look (the conversion itself needs no turn: its
        // file is new, so the grace spares it).
        let _turn = CACHES.turn.read().await;
        CACHES.handed_out.lock().expect("image cache guard").insert(dest.clone(), Instant::now());
        // And marked as new on disk, for the agents of other hosts sharing the storage,
        // whose cleaning sees the file's age but not this agent's memory.
        mark_new(&dest);
    }
    if !tokio::fs::try_exists(&dest).await.unwrap_or(false)
        && !tokio::fs::try_exists(source).await.unwrap_or(false)
    {
        return Err(AgentError::new(
            AgentErrorCode::NotFound,
            format!("image file {source} does not exist"),
        ));
    }
    made_once(&dest, |tmp| args(&["convert", "-O", "qcow2", source, tmp])).await
}

/// Sets the modification time of the file at `path` (if it exists) to now; a failure only
/// costs the cross-host protection, so it is logged.
fn mark_new(path: &Path) {
    let touched = std::fs::File::open(path).and_then(|f| f.set_modified(SystemTime::now()));
    match touched {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "a cached image handed out could not be marked new");
        }
    }
}

/// Creates the qcow2 root volume `volume` in `dir`, backed by `backing`; answers it
/// described (`Reply::Volume`).
pub async fn create_root_volume(
    volume: Uuid,
    backing: &str,
    dir: &str,
) -> Result<Reply, AgentError> {
    let _turn = CACHES.turn.read().await;
    if !tokio::fs::try_exists(backing).await.unwrap_or(false) {
        return Err(AgentError::new(
            AgentErrorCode::NotFound,
            format!("the cached image {backing} is gone: cache the image again"),
        ));
    }
    let dest = PathBuf::from(dir).join(format!("{volume}.qcow2"));
    made_once(&dest, |tmp| {
        args(&["create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", tmp])
    })
    .await?;
    // Its virtual size (the image's) is the volume's size.
    describe_volume(&dest.display().to_string()).await
}

/// Creates the empty qcow2 data volume `volume` of `size` bytes in `dir`.
pub async fn create_data_volume(volume: Uuid, size: u64, dir: &str) -> Result<Reply, AgentError> {
    let dest = PathBuf::from(dir).join(format!("{volume}.qcow2"));
    let size = size.to_string();
    made_once(&dest, |tmp| args(&["create", "-q", "-f", "qcow2", tmp, &size])).await
}

/// Freezes `top` as a snapshot: creates `new_top`, backed by it.
pub async fn snapshot_volume(top: &str, new_top: &str) -> Result<Reply, AgentError> {
    made_once(Path::new(new_top), |tmp| {
        args(&["create", "-q", "-f", "qcow2", "-b", top, "-F", "qcow2", tmp])
    })
    .await
}

/// Merges into `top` every layer of its chain above `base` (none: all of them), copying what
/// they held (`qemu-img rebase` in its safe mode). Repeating it is harmless: the top then
/// already has `base` as its backing file and nothing differs.
pub async fn rebase_volume(top: &str, base: Option<&str>) -> Result<Reply, AgentError> {
    match base {
        Some(base) => {
            qemu_img(&["rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top]).await?
        }
        None => qemu_img(&["rebase", "-q", "-f", "qcow2", "-b", "", top]).await?,
    }
    file_reply(Path::new(top)).await
}

/// Copies the chain whose top is `source` into the standalone qcow2 file `dest`.
pub async fn flatten_volume(source: &str, dest: &str) -> Result<Reply, AgentError> {
    made_once(Path::new(dest), |tmp| {
        args(&["convert", "-U", "-f", "qcow2", "-O", "qcow2", source, tmp])
    })
    .await
}

/// Grows the qcow2 file at `path` to `size` bytes (the same size again changes nothing;
/// `qemu-img` refuses to shrink without `--shrink`, which is never given).
pub async fn resize_volume(path: &str, size: u64) -> Result<Reply, AgentError> {
    qemu_img(&["resize", "-q", "-f", "qcow2", path, &size.to_string()]).await?;
    file_reply(Path::new(path)).await
}

/// Describes the volume file at `path` once no making of it is under way.
pub async fn describe_once_made(path: &str) -> Result<Reply, AgentError> {
    let turn = MAKING.lock().expect("files being made").get(Path::new(path)).cloned();
    if let Some(turn) = turn {
        drop(turn.lock().await);
    }
    describe_volume(path).await
}

/// Describes the volume file at `path`: its size on disk, virtual size and backing file.
pub async fn describe_volume(path: &str) -> Result<Reply, AgentError> {
    let file = PathBuf::from(path);
    let (meta, header) = tokio::task::spawn_blocking(move || {
        let meta = std::fs::metadata(&file)?;
        Ok::<_, std::io::Error>((meta, read_header(&file)?))
    })
    .await
    .map_err(|e| AgentError::new(AgentErrorCode::Driver, format!("reading {path}: {e}")))?
    .map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            AgentError::new(AgentErrorCode::NotFound, format!("{path} does not exist"))
        }
        _ => io_error("reading", Path::new(path), e),
    })?;
    let (virtual_size, backing) = header.unwrap_or((meta.len(), None));
    Ok(Reply::Volume {
        path: path.to_owned(),
        size: meta.len(),
        virtual_size,
        backing: backing.map(|b| b.display().to_string()),
    })
}

/// Every regular file under `dir`, at any depth (none if `dir` does not exist).
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            files_under(&entry.path(), out)?;
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
    Ok(())
}

/// What a cleaning of an image cache found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// The cached images deleted.
    pub deleted: Vec<String>,
    /// The cached images kept (in use, or handed out within the grace period).
    pub kept: u64,
    /// The volume files read.
    pub volumes_read: u64,
}

/// Deletes every cached image in `cache_dir` that no qcow2 file under `volume_dirs` is
/// backed by and that was neither made nor handed out within `grace`. Unfinished `.part`
/// files older than `grace` go too (left by an agent that died making them).
pub async fn clean_image_cache(
    cache_dir: &str,
    volume_dirs: &[String],
    grace: Duration,
) -> Result<Cleaned, AgentError> {
    let _turn = CACHES.turn.write().await;
    let recent: BTreeSet<PathBuf> = {
        let mut handed_out = CACHES.handed_out.lock().expect("image cache guard");
        handed_out.retain(|_, at| at.elapsed() < grace);
        handed_out.keys().cloned().collect()
    };
    let cache_dir = PathBuf::from(cache_dir);
    let volume_dirs: Vec<PathBuf> = volume_dirs.iter().map(PathBuf::from).collect();
    let cleaned = tokio::task::spawn_blocking(move || -> std::io::Result<Cleaned> {
        let mut cleaned = Cleaned::default();
        let mut used = BTreeSet::new();
        for dir in &volume_dirs {
            let mut files = Vec::new();
            files_under(dir, &mut files)?;
            for file in files {
                cleaned.volumes_read += 1;
                // A file deleted meanwhile backs nothing.
                match read_header(&file) {
                    // Compared as the file system resolves them: `..` and links
                    // followed.
                    Ok(Some((_, Some(backing)))) => {
                        used.insert(std::fs::canonicalize(&backing).unwrap_or(backing));
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let mut cached = Vec::new();
        files_under(&cache_dir, &mut cached)?;
        let now = SystemTime::now();
        for file in cached {
            let age = std::fs::metadata(&file)?
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            let resolved = std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
            if used.contains(&resolved) || recent.contains(&file) || age < grace {
                cleaned.kept += 1;
                continue;
            }
            match std::fs::remove_file(&file) {
                Ok(()) => cleaned.deleted.push(file.display().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(cleaned)
    })
    .await
    .map_err(|e| AgentError::new(AgentErrorCode::Driver, format!("cleaning the image cache: {e}")))?
    .map_err(|e| io_error("cleaning the image cache in", Path::new("."), e))?;
    for path in &cleaned.deleted {
        tracing::info!(%path, "unused cached image deleted");
    }
    Ok(cleaned)
}

/// The size and free space of the filesystem holding `dir` (made if missing).
pub async fn storage_capacity(dir: &str) -> Result<Reply, AgentError> {
    let path = PathBuf::from(dir);
    let measured = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&path)?;
        rustix::fs::statvfs(&path).map_err(std::io::Error::from)
    })
    .await
    .map_err(|e| AgentError::new(AgentErrorCode::Driver, format!("measuring {dir}: {e}")))?
    .map_err(|e| io_error("measuring", Path::new(dir), e))?;
    let block = measured.f_frsize;
    Ok(Reply::Capacity {
        total: measured.f_blocks.saturating_mul(block),
        available: measured.f_bavail.saturating_mul(block),
    })
}

/// Deletes the unsealed copies directly in `dir` untouched for `older_than` (see
/// `Command::SweepPartialCopies`).
pub async fn sweep_partial_copies(dir: &str, older_than: Duration) -> Result<Reply, AgentError> {
    let path = PathBuf::from(dir);
    let swept = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<PathBuf>> {
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut swept = Vec::new();
        for entry in entries {
            let entry = entry?;
            if !entry.file_name().to_string_lossy().contains(".part-copy-") {
                continue;
            }
            let idle = entry.metadata()?.modified()?.elapsed().unwrap_or_default();
            if idle >= older_than {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => swept.push(entry.path()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(swept)
    })
    .await
    .map_err(|e| AgentError::new(AgentErrorCode::Driver, format!("sweeping {dir}: {e}")))?
    .map_err(|e| io_error("sweeping", Path::new(dir), e))?;
    for file in &swept {
        tracing::info!(file = %file.display(), "deleted an unsealed copy no transfer finished");
    }
    Ok(Reply::Done)
}

/// Leaves a mark file at `path`, which another host's agent looks for to tell whether the
/// two share the storage (a copy between them would then be a copy onto itself).
pub async fn mark_storage(path: &str) -> Result<Reply, AgentError> {
    let path = Path::new(path);
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(|e| io_error("creating", dir, e))?;
    }
    tokio::fs::write(path, b"strato storage mark\n")
        .await
        .map_err(|e| io_error("writing", path, e))?;
    Ok(Reply::Done)
}

fn not_found_or(what: &str, path: &Path, e: std::io::Error) -> AgentError {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            AgentError::new(AgentErrorCode::NotFound, format!("{} does not exist", path.display()))
        }
        _ => io_error(what, path, e),
    }
}

/// The size and SHA-256 of the file at `path`.
pub async fn digest_file(path: &str) -> Result<Reply, AgentError> {
    let file = PathBuf::from(path);
    let digest = tokio::task::spawn_blocking(move || strato_proto::digest::file_sha256(&file))
        .await
        .map_err(|e| AgentError::new(AgentErrorCode::Driver, format!("digesting {path}: {e}")))?;
    let (size, sha256) = digest.map_err(|e| not_found_or("digesting", Path::new(path), e))?;
    Ok(Reply::Digest { size, sha256 })
}

fn check_chunk(len: usize) -> Result<(), AgentError> {
    if len > strato_proto::msg::MAX_CHUNK as usize {
        return Err(AgentError::new(
            AgentErrorCode::BadRequest,
            format!("a chunk of {len} bytes exceeds {} bytes", strato_proto::msg::MAX_CHUNK),
        ));
    }
    Ok(())
}

/// Reads at most `len` bytes of the file at `path` from `offset`.
pub async fn read_file(path: &str, offset: u64, len: u32) -> Result<Reply, AgentError> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    check_chunk(len as usize)?;
    let file_path = Path::new(path);
    let mut file = tokio::fs::File::open(file_path)
        .await
        .map_err(|e| not_found_or("opening", file_path, e))?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(|e| io_error("seeking in", file_path, e))?;
    let mut data = Vec::with_capacity(len as usize);
    file.take(u64::from(len))
        .read_to_end(&mut data)
        .await
        .map_err(|e| io_error("reading", file_path, e))?;
    Ok(Reply::Chunk(data))
}

/// Where transfer `transfer`'s copy of `path` arriving from another host is written until
/// it is sealed.
pub fn incoming(path: &str, transfer: Uuid) -> PathBuf {
    PathBuf::from(format!("{path}.part-copy-{transfer}"))
}

/// Writes `data` at `offset` into transfer `transfer`'s incoming copy of `path` (offset 0
/// starts it afresh).
pub async fn write_file(
    path: &str,
    transfer: Uuid,
    offset: u64,
    data: &[u8],
) -> Result<Reply, AgentError> {
    use tokio::io::{AsyncSeekExt, AsyncWriteExt};
    check_chunk(data.len())?;
    let part = incoming(path, transfer);
    if let Some(dir) = part.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(|e| io_error("creating", dir, e))?;
    }
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true);
    if offset == 0 {
        options.create(true).truncate(true);
    }
    let mut file = options.open(&part).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => AgentError::new(
            AgentErrorCode::BadRequest,
            format!("no copy of {path} is under way: start it at offset 0"),
        ),
        _ => io_error("opening", &part, e),
    })?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(|e| io_error("seeking in", &part, e))?;
    file.write_all(data).await.map_err(|e| io_error("writing", &part, e))?;
    file.flush().await.map_err(|e| io_error("writing", &part, e))?;
    Ok(Reply::Done)
}

/// Seals the incoming copy of `path`: its size and digest must be the source's, then it is
/// flushed to disk and renamed into place. A `path` that already holds exactly that content
/// (a repeat, or a copy that was sealed before the MN heard of it) is success; one holding
/// anything else is refused, never overwritten.
pub async fn seal_file(
    path: &str,
    transfer: Uuid,
    size: u64,
    sha256: &str,
) -> Result<Reply, AgentError> {
    let dest = PathBuf::from(path);
    one_maker(&dest.clone(), seal(dest, transfer, size, sha256)).await
}

async fn seal(dest: PathBuf, transfer: Uuid, size: u64, sha256: &str) -> Result<Reply, AgentError> {
    let path = dest.display().to_string();
    let digest = |file: PathBuf| async move {
        tokio::task::spawn_blocking(move || strato_proto::digest::file_sha256(&file))
            .await
            .map_err(|e| AgentError::new(AgentErrorCode::Driver, format!("digesting: {e}")))
    };
    if tokio::fs::try_exists(&dest).await.unwrap_or(false) {
        let found = digest(dest.clone()).await?.map_err(|e| io_error("digesting", &dest, e))?;
        if found == (size, sha256.to_owned()) {
            // A repeat's copy is not needed: the file is there.
            delete_volume(&incoming(&path, transfer).display().to_string()).await?;
            return Ok(Reply::Sealed { existed: true });
        }
        return Err(AgentError::new(
            AgentErrorCode::InvalidState,
            format!("{path} already holds other content: it was not overwritten"),
        ));
    }
    let part = incoming(&path, transfer);
    let arrived = digest(part.clone()).await?.map_err(|e| not_found_or("digesting", &part, e))?;
    if arrived != (size, sha256.to_owned()) {
        return Err(AgentError::new(
            AgentErrorCode::Driver,
            format!(
                "the copy of {path} is not the source's ({} bytes, sha256 {}; expected {size} bytes, sha256 {sha256}): copy it again",
                arrived.0, arrived.1
            ),
        ));
    }
    let file = tokio::fs::File::open(&part).await.map_err(|e| io_error("opening", &part, e))?;
    file.sync_all().await.map_err(|e| io_error("flushing", &part, e))?;
    tokio::fs::rename(&part, &dest).await.map_err(|e| io_error("renaming", &part, e))?;
    // A cached image copied in is as new as one converted: the cleaner's grace spares it
    // until the volume copied after it names it.
    CACHES.handed_out.lock().expect("image cache guard").insert(dest, Instant::now());
    Ok(Reply::Sealed { existed: false })
}

/// Deletes a volume file; succeeds when it is already gone.
pub async fn delete_volume(path: &str) -> Result<Reply, AgentError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(Reply::Done),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Reply::Done),
        Err(e) => Err(io_error("deleting", Path::new(path), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn images_are_cached_and_volumes_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("image.raw");
        std::fs::write(&source, vec![0u8; 1 << 20]).unwrap();
        let image = Uuid::new_v4();
        let cache = dir.path().join("cache").display().to_string();
        let first = cache_image(image, &source.display().to_string(), &cache).await.unwrap();
        let again = cache_image(image, "/nonexistent", &cache).await.unwrap();
        assert_eq!(first, again, "a cached image is not converted again");
        let Reply::File { path: backing, .. } = first else { panic!() };

        let volume = Uuid::new_v4();
        let vols = dir.path().join("vols").display().to_string();
        let made = create_root_volume(volume, &backing, &vols).await.unwrap();
        assert_eq!(made, create_root_volume(volume, &backing, &vols).await.unwrap());
        let Reply::Volume { path, virtual_size, .. } = made else { panic!() };
        assert_eq!(virtual_size, 1 << 20, "the image's size");
        let info = std::process::Command::new("qemu-img").args(["info", &path]).output().unwrap();
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(info.contains("qcow2") && info.contains(&backing), "{info}");

        assert_eq!(delete_volume(&path).await.unwrap(), Reply::Done);
        assert_eq!(delete_volume(&path).await.unwrap(), Reply::Done, "deleting twice is fine");
        assert!(!Path::new(&path).exists());
    }

    #[tokio::test]
    async fn a_cache_goes_only_when_no_file_is_backed_by_it_and_it_was_not_handed_out_lately() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("image.raw");
        std::fs::write(&source, vec![0u8; 1 << 20]).unwrap();
        let (source, cache) =
            (source.display().to_string(), dir.path().join("cache").display().to_string());
        let vols = dir.path().join("vols");
        let (used, unused) = (Uuid::new_v4(), Uuid::new_v4());
        let Reply::File { path: used_cache, .. } =
            cache_image(used, &source, &cache).await.unwrap()
        else {
            panic!()
        };
        let Reply::File { path: unused_cache, .. } =
            cache_image(unused, &source, &cache).await.unwrap()
        else {
            panic!()
        };
        // A root volume on the used cache, and a snapshot layer on the root volume, one
        // directory down, naming its backing file relatively (as QEMU allows).
        let root_dir = vols.join("root").display().to_string();
        let Reply::Volume { path: root, .. } =
            create_root_volume(Uuid::new_v4(), &used_cache, &root_dir).await.unwrap()
        else {
            panic!()
        };
        let layer = vols.join("root/deeper/layer.qcow2");
        std::fs::create_dir_all(layer.parent().unwrap()).unwrap();
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(format!("../{}", Path::new(&root).file_name().unwrap().to_str().unwrap()))
            .arg(&layer)
            .status()
            .unwrap();
        assert!(made.success());
        assert_eq!(
            read_header(&layer).unwrap(),
            Some((
                1 << 20,
                Some(vols.join("root/deeper/..").join(Path::new(&root).file_name().unwrap()))
            ))
        );
        let Reply::Volume { backing, virtual_size, .. } = describe_volume(&root).await.unwrap()
        else {
            panic!()
        };
        assert_eq!((backing.as_deref(), virtual_size), (Some(used_cache.as_str()), 1 << 20));
        assert_eq!(read_header(Path::new(&source)).unwrap(), None, "a raw file backs nothing");
        let missing = describe_volume("/nonexistent.qcow2").await.unwrap_err();
        assert_eq!(missing.code, AgentErrorCode::NotFound);

        // A file naming the used cache through `..` uses it as much.
        let sideways = vols.join("sideways.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(format!("../cache/{used}.qcow2"))
            .arg(&sideways)
            .status()
            .unwrap();
        assert!(made.success());
        let volume_dirs = [vols.display().to_string()];
        // Both were handed out just now: a grace period keeps both.
        let kept = clean_image_cache(&cache, &volume_dirs, Duration::from_secs(600)).await.unwrap();
        assert_eq!((kept.deleted.len(), kept.kept, kept.volumes_read), (0, 2, 3));
        // Without one, the unused cache goes and the used one stays.
        let cleaned = clean_image_cache(&cache, &volume_dirs, Duration::ZERO).await.unwrap();
        assert_eq!(cleaned.deleted, vec![unused_cache.clone()]);
        assert_eq!(cleaned.kept, 1);
        assert!(Path::new(&used_cache).exists() && !Path::new(&unused_cache).exists());
        // Once the root volume and the other file are deleted, nothing is backed by it.
        delete_volume(&root).await.unwrap();
        std::fs::remove_file(&sideways).unwrap();
        std::fs::remove_file(&layer).unwrap();
        let cleaned = clean_image_cache(&cache, &volume_dirs, Duration::ZERO).await.unwrap();
        assert_eq!(cleaned.deleted, vec![used_cache.clone()]);
        // A root volume on a cache that went is refused with a hint, not made broken.
        let gone = create_root_volume(Uuid::new_v4(), &used_cache, &root_dir).await.unwrap_err();
        assert_eq!(gone.code, AgentErrorCode::NotFound, "{gone:?}");
    }

    #[tokio::test]
    async fn two_creations_caching_one_image_at_once_both_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("image.raw");
        std::fs::write(&source, vec![7u8; 8 << 20]).unwrap();
        let (source, cache) =
            (source.display().to_string(), dir.path().join("cache").display().to_string());
        let image = Uuid::new_v4();
        let (a, b) =
            tokio::join!(cache_image(image, &source, &cache), cache_image(image, &source, &cache));
        assert_eq!(a.unwrap(), b.unwrap());
        assert!(MAKING.lock().unwrap().is_empty(), "no turn is left behind");
    }
}
