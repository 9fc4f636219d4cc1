//! Volumes on the host: the image cache, qcow2 root volumes and empty data volumes, made
//! with `qemu-img`.
//!
//! Every operation is safe to repeat: a file is built under a temporary name and renamed into
//! place, so a file that exists is complete, and a repeat finds it and returns it.

use std::path::{Path, PathBuf};

use strato_proto::{AgentError, AgentErrorCode, Reply};
use tokio::process::Command;
use uuid::Uuid;

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
    if tokio::fs::try_exists(dest).await.unwrap_or(false) {
        return file_reply(dest).await;
    }
    if let Some(dir) = dest.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(|e| io_error("creating", dir, e))?;
    }
    let tmp = PathBuf::from(format!("{}.part", dest.display()));
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

/// Creates the qcow2 root volume `volume` in `dir`, backed by `backing`.
pub async fn create_root_volume(
    volume: Uuid,
    backing: &str,
    dir: &str,
) -> Result<Reply, AgentError> {
    let dest = PathBuf::from(dir).join(format!("{volume}.qcow2"));
    made_once(&dest, |tmp| {
        args(&["create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", tmp])
    })
    .await
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
        let Reply::File { path, .. } = made else { panic!() };
        let info = std::process::Command::new("qemu-img").args(["info", &path]).output().unwrap();
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(info.contains("qcow2") && info.contains(&backing), "{info}");

        assert_eq!(delete_volume(&path).await.unwrap(), Reply::Done);
        assert_eq!(delete_volume(&path).await.unwrap(), Reply::Done, "deleting twice is fine");
        assert!(!Path::new(&path).exists());
    }
}
