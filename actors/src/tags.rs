//! Tags: user tags (free text a user hangs on any resource, for grouping and queries) and
//! system tags (text in declared patterns that change what Strato does with the resource).
//!
//! A system tag must match one of [`PATTERNS`] and its tokens must be valid, or it is
//! refused: a typo in `staticIp::...` silently ignored would hand the VM another address.
//! Each pattern names the resource types it applies to and whether a resource may hold more
//! than one tag of it. What the patterns do:
//!
//! - `hostname::{hostname}` (VMs): the guest's host name, checked as an RFC 1123 name.
//! - `userdata::{data}` (VMs): the guest's user data, base64, served by the metadata service.
//! - `sshkey::{key}` (VMs): an SSH public key the metadata service hands the guest.
//! - `snat::{l3NetworkUuid}` (L3 networks): the public network the Flat SNAT service of a
//!   private network takes its traffic out through (read when SNAT is attached).
//! - `staticIp::{l3NetworkUuid}::{ip}` (VMs): the VM's address on that network; IPAM hands
//!   out exactly that address at creation or fails the creation with why.
//! - `reservedMemory::{size}` (hosts): memory the allocator leaves to the host itself
//!   (`512M`, `2G`, or bytes); the host's booking checks honour it.
//!
//! Tags live in their own tables (`user-tag`, `system-tag`) indexed by resource, and are
//! deleted in the same atomic write as their resource ([`crate::records::delete_refs`]).

use std::marker::PhantomData;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use strato_storage::{Db, Index, IndexValue, Record, StoreError};
use uuid::Uuid;

/// Which of the two tag tables a tag lives in.
pub trait TagKind: Send + Sync + 'static {
    /// The table.
    const TABLE: &'static str;
    /// ZStack's name for the kind, as inventories show it (`type`).
    const NAME: &'static str;

    /// What a resource holds at most one tag of: a user tag's text; a system tag's slot
    /// (see [`slot`]).
    fn slot_key(tag: &str, resource_type: &str) -> String;
}

/// User tags.
#[derive(Debug)]
pub struct User;
/// System tags.
#[derive(Debug)]
pub struct System;

impl TagKind for User {
    const TABLE: &'static str = "user-tag";
    const NAME: &'static str = "User";

    fn slot_key(tag: &str, _resource_type: &str) -> String {
        tag.to_owned()
    }
}
impl TagKind for System {
    const TABLE: &'static str = "system-tag";
    const NAME: &'static str = "System";

    fn slot_key(tag: &str, resource_type: &str) -> String {
        match parse_system_tag(tag, resource_type) {
            Ok(parsed) => match slot(&parsed) {
                (name, Some(first)) => format!("{name}::{first}"),
                (name, None) => name.to_owned(),
            },
            // Not a tag this build can parse (checked before it is written): its own slot.
            Err(_) => tag.to_owned(),
        }
    }
}

/// What makes two system tags on one resource the same slot: the pattern, and the first
/// token for patterns that allow one per first token (`staticIp`, one per network).
pub fn slot<'a>(parsed: &Parsed<'a>) -> (&'static str, Option<&'a str>) {
    (parsed.pattern.name(), parsed.pattern.one_per_first_token.then(|| parsed.tokens[0]))
}

/// A tag on a resource.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", bound = "")]
pub struct TagRecord<K> {
    /// The tag's UUID.
    pub uuid: Uuid,
    /// The resource it is on.
    pub resource_uuid: Uuid,
    /// The resource's type, in ZStack's naming (`VmInstanceVO`).
    pub resource_type: String,
    /// The tag itself.
    pub tag: String,
    /// When it was created (seconds since the Unix epoch).
    pub create_date: u64,
    #[serde(skip)]
    kind: PhantomData<fn() -> K>,
}

impl<K> Clone for TagRecord<K> {
    fn clone(&self) -> Self {
        TagRecord {
            uuid: self.uuid,
            resource_uuid: self.resource_uuid,
            resource_type: self.resource_type.clone(),
            tag: self.tag.clone(),
            create_date: self.create_date,
            kind: PhantomData,
        }
    }
}

impl<K: TagKind> std::fmt::Debug for TagRecord<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TagRecord")
            .field("kind", &K::NAME)
            .field("uuid", &self.uuid)
            .field("resource_uuid", &self.resource_uuid)
            .field("tag", &self.tag)
            .finish()
    }
}

impl<K: TagKind> TagRecord<K> {
    /// A new tag on `resource_uuid` (of `resource_type`). Its UUID derives from the resource
    /// and the tag's slot, so that two tags of one slot, however concurrent their requests,
    /// are one record written `Absent` twice: the store takes one and refuses the other.
    pub fn new(resource_uuid: Uuid, resource_type: &str, tag: &str) -> Self {
        let create_date = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let slot = format!("{}/{}", K::TABLE, K::slot_key(tag, resource_type));
        TagRecord {
            uuid: Uuid::new_v5(&resource_uuid, slot.as_bytes()),
            resource_uuid,
            resource_type: resource_type.to_owned(),
            tag: tag.to_owned(),
            create_date,
            kind: PhantomData,
        }
    }
}

impl<K: TagKind> Record for TagRecord<K> {
    const KIND: &'static str = K::TABLE;
    const VERSION: u16 = 1;

    fn id(&self) -> Uuid {
        self.uuid
    }

    fn indexes() -> &'static [Index<Self>] {
        &[
            Index { name: "resource", values: |t| vec![IndexValue::Uuid(t.resource_uuid)] },
            Index { name: "tag", values: |t| vec![t.tag.as_str().into()] },
        ]
    }
}

/// The resource type of VMs, in ZStack's naming.
pub const VM_RESOURCE_TYPE: &str = "VmInstanceVO";

/// A user tag.
pub type UserTag = TagRecord<User>;
/// A system tag.
pub type SystemTag = TagRecord<System>;

/// A system tag's pattern.
#[derive(Debug)]
pub struct Pattern {
    /// The pattern as users read it (`staticIp::{l3NetworkUuid}::{ip}`).
    pub format: &'static str,
    /// The resource types it applies to.
    pub resource_types: &'static [&'static str],
    /// Whether a resource may hold one tag of this pattern per first token (`staticIp`, one
    /// per network) rather than one in all.
    pub one_per_first_token: bool,
    check: fn(&[&str]) -> Result<(), String>,
}

impl Pattern {
    /// The pattern's name (the text before the first `::`).
    pub fn name(&self) -> &'static str {
        self.format.split("::").next().unwrap_or_default()
    }
}

/// Every system tag pattern.
pub static PATTERNS: &[Pattern] = &[
    Pattern {
        format: "hostname::{hostname}",
        resource_types: &["VmInstanceVO"],
        one_per_first_token: false,
        check: |t| check_hostname(t[0]),
    },
    Pattern {
        format: "staticIp::{l3NetworkUuid}::{ip}",
        resource_types: &["VmInstanceVO"],
        one_per_first_token: true,
        check: |t| {
            // Canonical only: the first token names the tag's slot, one per network.
            crate::canonical_uuid(t[0]).ok_or_else(|| {
                format!("`{}` is not an L3 network UUID in its canonical form", t[0])
            })?;
            t[1].parse::<Ipv4Addr>().map_err(|_| format!("`{}` is not an IPv4 address", t[1]))?;
            Ok(())
        },
    },
    Pattern {
        format: "userdata::{data}",
        resource_types: &["VmInstanceVO"],
        one_per_first_token: false,
        check: |t| user_data(t[0]).map(drop),
    },
    Pattern {
        format: "sshkey::{key}",
        resource_types: &["VmInstanceVO"],
        one_per_first_token: true,
        check: |t| check_ssh_key(t[0]),
    },
    Pattern {
        format: "snat::{l3NetworkUuid}",
        resource_types: &["L3NetworkVO"],
        one_per_first_token: false,
        check: |t| {
            crate::canonical_uuid(t[0]).map(drop).ok_or_else(|| {
                format!("`{}` is not an L3 network UUID in its canonical form", t[0])
            })
        },
    },
    Pattern {
        format: "reservedMemory::{size}",
        resource_types: &["HostVO"],
        one_per_first_token: false,
        check: |t| parse_size(t[0]).map(|_| ()),
    },
];

/// A system tag matched to its pattern.
#[derive(Debug)]
pub struct Parsed<'a> {
    /// The pattern.
    pub pattern: &'static Pattern,
    /// The tokens, in the pattern's order.
    pub tokens: Vec<&'a str>,
}

/// Matches `tag` on a resource of `resource_type` to its pattern and checks its tokens; the
/// error says what is wrong and lists the patterns.
pub fn parse_system_tag<'a>(tag: &'a str, resource_type: &str) -> Result<Parsed<'a>, String> {
    let parts: Vec<&str> = tag.split("::").collect();
    let known = || PATTERNS.iter().map(|p| p.format).collect::<Vec<_>>().join(", ");
    let pattern = PATTERNS
        .iter()
        .find(|p| p.name() == parts[0] && p.format.split("::").count() == parts.len())
        .ok_or_else(|| {
            format!("`{tag}` matches no system tag pattern; the patterns are: {}", known())
        })?;
    if !pattern.resource_types.contains(&resource_type) {
        return Err(format!(
            "`{}` applies to {}, not to {resource_type}",
            pattern.format,
            pattern.resource_types.join(", ")
        ));
    }
    let tokens = parts[1..].to_vec();
    if tokens.iter().any(|t| t.is_empty()) {
        return Err(format!("`{tag}` has an empty token; the pattern is {}", pattern.format));
    }
    (pattern.check)(&tokens).map_err(|e| format!("`{tag}`: {e}"))?;
    Ok(Parsed { pattern, tokens })
}

/// The most user data a VM carries, decoded (EC2's limit).
pub const MAX_USER_DATA: usize = 16 << 10;

/// A `userdata::` tag's data: base64, at most [`MAX_USER_DATA`] bytes decoded.
pub fn user_data(encoded: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let data = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| format!("user data is base64-encoded: {e}"))?;
    if data.len() > MAX_USER_DATA {
        return Err(format!(
            "user data is {} bytes; at most {MAX_USER_DATA} are accepted",
            data.len()
        ));
    }
    Ok(data)
}

/// An SSH public key: `<type> <base64> [comment]`, one line.
fn check_ssh_key(key: &str) -> Result<(), String> {
    let kind = key.split(' ').next().unwrap_or_default();
    let known =
        kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-") || kind.starts_with("sk-");
    if !known
        || key.split(' ').count() < 2
        || key.len() > 8 << 10
        || key.chars().any(char::is_control)
    {
        return Err(
            "an SSH public key is one line: its type (ssh-ed25519, ...), the key, a comment".into(),
        );
    }
    Ok(())
}

/// Whether `name` is a DNS host name (labels of letters, digits and '-').
pub fn check_hostname(name: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() <= 253 && name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a host name (letters, digits and '-', labels of 1 to 63 characters)"
        ))
    }
}

/// Parses a size: bytes, or a number with `K`, `M`, `G` or `T` (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" => 10,
        "M" | "MB" => 20,
        "G" | "GB" => 30,
        "T" | "TB" => 40,
        _ => return Err(format!("`{text}` is not a size (such as 512M or 2G)")),
    };
    let n: u64 =
        number.parse().map_err(|_| format!("`{text}` is not a size (such as 512M or 2G)"))?;
    n.checked_shl(shift)
        .filter(|bytes| bytes >> shift == n)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// The tags of `K` on `resource`.
pub fn of<K: TagKind>(db: &Db, resource: Uuid) -> Result<Vec<TagRecord<K>>, StoreError> {
    let mut tags = Vec::new();
    for id in db.find::<TagRecord<K>>("resource", &IndexValue::Uuid(resource))? {
        if let Some(stored) = db.get::<TagRecord<K>>(id)? {
            tags.push(stored.record);
        }
    }
    Ok(tags)
}

/// The tokens of the system tags of pattern `name` on `resource`.
pub fn system_tokens(db: &Db, resource: Uuid, name: &str) -> Result<Vec<Vec<String>>, StoreError> {
    Ok(of::<System>(db, resource)?
        .into_iter()
        .filter_map(|t| {
            let mut parts = t.tag.split("::").map(str::to_owned);
            (parts.next().as_deref() == Some(name)).then(|| parts.collect())
        })
        .collect())
}

/// The memory a host's `reservedMemory` tag keeps from VMs, in bytes (0 without one).
pub fn reserved_memory(db: &Db, host: Uuid) -> Result<u64, StoreError> {
    Ok(system_tokens(db, host, "reservedMemory")?
        .first()
        .and_then(|t| t.first())
        .and_then(|size| parse_size(size).ok())
        .unwrap_or(0))
}

/// The addresses a VM's `staticIp` tags ask for, by L3 network.
pub fn static_ips(tags: &[String]) -> Vec<(Uuid, Ipv4Addr)> {
    tags.iter()
        .filter_map(|tag| {
            let parsed = parse_system_tag(tag, "VmInstanceVO").ok()?;
            (parsed.pattern.name() == "staticIp").then_some(())?;
            Some((crate::canonical_uuid(parsed.tokens[0])?, parsed.tokens[1].parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_tags_must_match_a_pattern_with_valid_tokens() {
        let l3 = Uuid::new_v4();
        assert!(parse_system_tag("hostname::web-1.example", "VmInstanceVO").is_ok());
        assert!(parse_system_tag(&format!("staticIp::{l3}::10.0.0.9"), "VmInstanceVO").is_ok());
        assert!(parse_system_tag("reservedMemory::2G", "HostVO").is_ok());
        let refused = |tag: &str, on: &str| parse_system_tag(tag, on).unwrap_err();
        assert!(refused("colour::red", "VmInstanceVO").contains("hostname::{hostname}"));
        assert!(refused("hostname::-bad-", "VmInstanceVO").contains("not a host name"));
        assert!(refused("hostname::a::b", "VmInstanceVO").contains("matches no"));
        assert!(refused("staticIp::nope::10.0.0.9", "VmInstanceVO").contains("L3 network UUID"));
        // Another spelling of the network's UUID would be another slot: one network, two
        // static addresses.
        let upper = l3.to_string().to_uppercase();
        assert!(
            refused(&format!("staticIp::{upper}::10.0.0.9"), "VmInstanceVO").contains("canonical")
        );
        assert!(
            refused(&format!("staticIp::{{{l3}}}::10.0.0.9"), "VmInstanceVO").contains("canonical")
        );
        assert!(refused(&format!("staticIp::{l3}::10.0.0.999"), "VmInstanceVO").contains("IPv4"));
        assert!(refused("reservedMemory::lots", "HostVO").contains("not a size"));
        assert!(refused("reservedMemory::1G", "VmInstanceVO").contains("HostVO"));
        assert!(refused("hostname::", "VmInstanceVO").contains("empty token"));
    }

    #[test]
    fn sizes_read_as_powers_of_1024() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("G").is_err());
    }
}
