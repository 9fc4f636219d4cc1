//! Mounting shared primary storage (NFS) on the host: the MN asks each host of the storage's
//! clusters to mount it, at every connect and before the host is Connected, so no volume is
//! ever made in an empty mount point on the host's own disk.
//!
//! The mounter is a trait because a real NFS mount cannot be made on every machine (the
//! kernels Strato is tested on have no NFS client): [`Nfs4`] runs `mount -t nfs4`; [`Bind`]
//! bind-mounts the export's path from the host's own filesystem, so the rest of the path
//! (a per-host mount, files made through it, seen by every host) runs for real in tests.
//! Both are a repeat-safe step: a mount point already mounted is left as it is.

use std::path::Path;

use strato_proto::{AgentError, AgentErrorCode};

/// Mounts a shared storage's export at a mount point.
pub trait Mounter: Send + Sync {
    /// Mounts `url` (`server:/export`) at `mount_point` (made if missing), unless something
    /// is mounted there already.
    fn mount(&self, url: &str, mount_point: &Path) -> Result<(), AgentError>;
}

/// NFS version 4, by the kernel's client.
#[derive(Debug)]
pub struct Nfs4;

/// The export's path bind-mounted from the host's own filesystem (tests: no NFS client).
#[derive(Debug)]
pub struct Bind;

impl Mounter for Nfs4 {
    fn mount(&self, url: &str, mount_point: &Path) -> Result<(), AgentError> {
        split(url)?;
        mount_once(mount_point, &["-t", "nfs4", url])
    }
}

impl Mounter for Bind {
    fn mount(&self, url: &str, mount_point: &Path) -> Result<(), AgentError> {
        let (_, export) = split(url)?;
        mount_once(mount_point, &["--bind", export])
    }
}

/// `server:/export` as its two parts.
fn split(url: &str) -> Result<(&str, &str), AgentError> {
    // Split where the path starts, so an IPv6 server (`[fd00::1]:/export`) keeps its colons.
    match url.find(":/").map(|at| (&url[..at], &url[at + 1..])) {
        Some((server, export)) if !server.is_empty() => Ok((server, export)),
        _ => Err(AgentError::new(
            AgentErrorCode::BadRequest,
            format!("`{url}` is not an NFS export (`server:/path`)"),
        )),
    }
}

/// Whether something is mounted at `mount_point` in this process's mount namespace.
fn is_mounted(mount_point: &Path) -> Result<bool, AgentError> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| {
        AgentError::new(AgentErrorCode::Driver, format!("reading the mount table: {e}"))
    })?;
    let wanted = mount_point.display().to_string();
    // The fifth field is the mount point (spaces escaped as \040, which paths here lack).
    Ok(table.lines().any(|line| line.split(' ').nth(4) == Some(wanted.as_str())))
}

fn mount_once(mount_point: &Path, args: &[&str]) -> Result<(), AgentError> {
    let io = |what: &str, e: std::io::Error| {
        AgentError::new(AgentErrorCode::Driver, format!("{what} {}: {e}", mount_point.display()))
    };
    // Only the parent is resolved: a look at a mount point whose server stopped answering
    // would hang.
    let (Some(parent), Some(name)) = (mount_point.parent(), mount_point.file_name()) else {
        return Err(io("using", std::io::ErrorKind::InvalidInput.into()));
    };
    std::fs::create_dir_all(parent).map_err(|e| io("creating", e))?;
    let mount_point = parent.canonicalize().map_err(|e| io("resolving", e))?.join(name);
    if is_mounted(&mount_point)? {
        return Ok(());
    }
    std::fs::create_dir_all(&mount_point).map_err(|e| io("creating", e))?;
    // A server that does not answer must not hold the agent: `mount` gets a minute.
    let output = std::process::Command::new("timeout")
        .args(["60", "mount"])
        .args(args)
        .arg(&mount_point)
        .output()
        .map_err(|e| AgentError::new(AgentErrorCode::Driver, format!("cannot run mount: {e}")))?;
    if !output.status.success() {
        return Err(AgentError::new(
            AgentErrorCode::Driver,
            format!(
                "mounting {} failed: {}",
                mount_point.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        ));
    }
    tracing::info!(mount_point = %mount_point.display(), "shared storage mounted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_is_a_server_and_an_absolute_path() {
        assert_eq!(split("nfs.example:/srv/ps").unwrap(), ("nfs.example", "/srv/ps"));
        assert_eq!(split("[fd00::1]:/srv/ps").unwrap(), ("[fd00::1]", "/srv/ps"));
        for bad in ["/srv/ps", ":/srv/ps", "server:relative", "server"] {
            assert_eq!(split(bad).unwrap_err().code, AgentErrorCode::BadRequest, "{bad}");
        }
    }

    #[test]
    fn the_root_is_mounted_and_a_fresh_directory_is_not() {
        assert!(is_mounted(Path::new("/")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mounted(dir.path()).unwrap());
    }
}
