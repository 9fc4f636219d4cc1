//! The one thing the MN and the agent read of a qcow2 file themselves: its header's virtual
//! size and backing file name (QEMU's format specification, "Header"), in microseconds
//! where `qemu-img info` takes milliseconds. Everything else about qcow2 is `qemu-img`'s.

use std::path::{Path, PathBuf};

/// A qcow2 file's virtual size and backing file (resolved against the file's directory, as
/// QEMU resolves it), read from its header; `None` for a file that is not qcow2.
pub fn read_header(path: &Path) -> std::io::Result<Option<(u64, Option<PathBuf>)>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let mut header = [0u8; 32];
    if file.read_exact(&mut header).is_err() || header[..4] != *b"QFI\xfb" {
        return Ok(None);
    }
    let be64 = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let offset = be64(8);
    let length = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
    let size = be64(24);
    // QEMU refuses backing file names over 1023 bytes; so does this.
    if offset == 0 || length == 0 || length > 1023 {
        return Ok(Some((size, None)));
    }
    let mut name = vec![0u8; length as usize];
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(&mut name)?;
    let name = PathBuf::from(String::from_utf8_lossy(&name).into_owned());
    let resolved = match path.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name,
    };
    Ok(Some((size, Some(resolved))))
}
