//! IP address management for L3 networks: validated IP ranges and allocation.
//!
//! The L3 network's actor owns its allocations and runs them in its `ip-alloc` queue at
//! level 1, so this module can be plain functions over the set of used addresses: it never
//! sees two allocations at once, and "never one IP twice" reduces to "never return a used
//! address", which the property tests check. `ipnet` does the subnet arithmetic.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Why a range or an allocation was refused. `field` names the request field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// A field of an IP range is wrong.
    #[error("`{field}`: {reason}")]
    Invalid {
        /// The field (`startIp`, `endIp`, `netmask`, `gateway`).
        field: &'static str,
        /// What is wrong, for the user.
        reason: String,
    },
    /// The new range overlaps an existing one.
    #[error("the range {start}-{end} overlaps the existing range {other_start}-{other_end}")]
    Overlap {
        /// The new range's start.
        start: Ipv4Addr,
        /// The new range's end.
        end: Ipv4Addr,
        /// The existing range's start.
        other_start: Ipv4Addr,
        /// The existing range's end.
        other_end: Ipv4Addr,
    },
    /// Every address is taken.
    #[error("no free IP address is left in the L3 network's ranges")]
    Exhausted,
    /// A requested address cannot be had.
    #[error("the IP address {ip} {reason}")]
    Unavailable {
        /// The address asked for.
        ip: Ipv4Addr,
        /// Why not.
        reason: &'static str,
    },
}

/// A range of addresses of an L3 network, with its subnet and gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpRange {
    /// The first address handed out.
    pub start: Ipv4Addr,
    /// The last address handed out.
    pub end: Ipv4Addr,
    /// The subnet's mask.
    pub netmask: Ipv4Addr,
    /// The gateway (never handed out).
    pub gateway: Ipv4Addr,
}

/// The widest subnet a range may be in.
pub const MIN_PREFIX: u8 = 8;

/// What `ip` is reserved for, if it is not an ordinary unicast address (RFC 6890's
/// special-purpose blocks that can never be a VM's: "this network", loopback, link-local,
/// multicast, reserved and the limited broadcast).
fn special_purpose(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.octets()[0] == 0 {
        Some("in 0.0.0.0/8 (\"this network\")")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_link_local() {
        Some("a link-local address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_broadcast() {
        Some("the limited broadcast address")
    } else if ip.octets()[0] >= 240 {
        Some("in the reserved block 240.0.0.0/4")
    } else {
        None
    }
}

impl IpRange {
    /// A range, if its fields are consistent: a contiguous netmask; start, end and gateway in
    /// one subnet; start not after end; neither the network nor the broadcast address inside.
    pub fn new(
        start: Ipv4Addr,
        end: Ipv4Addr,
        netmask: Ipv4Addr,
        gateway: Ipv4Addr,
    ) -> Result<Self, IpamError> {
        let prefix = ipnet::ipv4_mask_to_prefix(netmask).map_err(|_| IpamError::Invalid {
            field: "netmask",
            reason: format!("{netmask} is not a valid netmask (its ones must be contiguous)"),
        })?;
        if prefix > 30 {
            return Err(IpamError::Invalid {
                field: "netmask",
                reason: format!("a /{prefix} subnet has no room for hosts and a gateway"),
            });
        }
        if prefix < MIN_PREFIX {
            return Err(IpamError::Invalid {
                field: "netmask",
                reason: format!(
                    "a /{prefix} subnet is wider than any network a VM is on (at most /{MIN_PREFIX})"
                ),
            });
        }
        for (field, ip) in [("startIp", start), ("endIp", end), ("gateway", gateway)] {
            if let Some(what) = special_purpose(ip) {
                return Err(IpamError::Invalid {
                    field,
                    reason: format!("{ip} is {what}, not an address to give a VM"),
                });
            }
        }
        let net = Ipv4Net::new(start, prefix).expect("prefix checked").trunc();
        if start > end {
            return Err(IpamError::Invalid {
                field: "endIp",
                reason: format!("{end} comes before the start {start}"),
            });
        }
        for (field, ip) in [("endIp", end), ("gateway", gateway)] {
            if !net.contains(&ip) {
                return Err(IpamError::Invalid {
                    field,
                    reason: format!("{ip} is outside the subnet {net} of the start address"),
                });
            }
        }
        if start == net.network() {
            return Err(IpamError::Invalid {
                field: "startIp",
                reason: format!("{start} is the network address of {net}"),
            });
        }
        if end == net.broadcast() {
            return Err(IpamError::Invalid {
                field: "endIp",
                reason: format!("{end} is the broadcast address of {net}"),
            });
        }
        Ok(IpRange { start, end, netmask, gateway })
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.start <= ip && ip <= self.end
    }

    /// Whether two ranges share an address.
    pub fn overlaps(&self, other: &IpRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    /// How many addresses it can hand out.
    pub fn capacity(&self) -> u64 {
        let span = u64::from(u32::from(self.end)) - u64::from(u32::from(self.start)) + 1;
        span - u64::from(self.contains(self.gateway))
    }
}

/// Checks that `new` overlaps none of `existing`.
pub fn check_no_overlap(existing: &[IpRange], new: &IpRange) -> Result<(), IpamError> {
    match existing.iter().find(|r| r.overlaps(new)) {
        Some(other) => Err(IpamError::Overlap {
            start: new.start,
            end: new.end,
            other_start: other.start,
            other_end: other.end,
        }),
        None => Ok(()),
    }
}

/// Where the next first-fit search may begin: every address of the ranges before range
/// `range`, and of range `range` below `from`, is in use or a gateway.
///
/// Without it every allocation walked the network's used addresses from the first, which
/// made creating n VMs on one network quadratic (it led the MN's own code in the profile of
/// 10,000 creations). The owner of the used set keeps one cursor beside it, passes it to
/// [`allocate_from`] and tells it of every release ([`Cursor::released`]) and range change
/// ([`Cursor::reset`]); the answer is the same as a search from the first address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    range: usize,
    from: u32,
}

impl Cursor {
    /// Forgets what is known: the next search starts at the first address.
    pub fn reset(&mut self) {
        *self = Cursor::default();
    }

    /// Address `ip` is free again: the next search must not begin after it.
    pub fn released(&mut self, ranges: &[IpRange], ip: Ipv4Addr) {
        if let Some(range) = ranges.iter().position(|r| r.contains(ip)) {
            let at = Cursor { range, from: u32::from(ip) };
            if (at.range, at.from) < (self.range, self.from) {
                *self = at;
            }
        }
    }
}

/// Picks an address: `requested` if it is free and in a range, otherwise the lowest free
/// address of the first range that has one. Never returns a used address or a gateway.
pub fn allocate(
    ranges: &[IpRange],
    used: &BTreeSet<Ipv4Addr>,
    requested: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, IpamError> {
    allocate_from(ranges, used, requested, &mut Cursor::default())
}

/// [`allocate`], searching from `cursor` and moving it to the address handed out.
pub fn allocate_from(
    ranges: &[IpRange],
    used: &BTreeSet<Ipv4Addr>,
    requested: Option<Ipv4Addr>,
    cursor: &mut Cursor,
) -> Result<Ipv4Addr, IpamError> {
    if let Some(ip) = requested {
        let Some(range) = ranges.iter().find(|r| r.contains(ip)) else {
            return Err(IpamError::Unavailable {
                ip,
                reason: "is not in any IP range of the network",
            });
        };
        if ip == range.gateway {
            return Err(IpamError::Unavailable { ip, reason: "is the gateway" });
        }
        if used.contains(&ip) {
            return Err(IpamError::Unavailable { ip, reason: "is already in use" });
        }
        return Ok(ip);
    }
    for (index, range) in ranges.iter().enumerate().skip(cursor.range) {
        let start = match index == cursor.range {
            true => u32::from(range.start).max(cursor.from),
            false => u32::from(range.start),
        };
        let end = u32::from(range.end);
        if start > end {
            continue;
        }
        // Walk the used addresses of this range in order; the first gap is free.
        let mut candidate = start;
        let skip = |c: u32| used.contains(&Ipv4Addr::from(c)) || Ipv4Addr::from(c) == range.gateway;
        let found = 'search: {
            for taken in used.range(Ipv4Addr::from(start)..=range.end) {
                let taken = u32::from(*taken);
                while candidate < taken {
                    if !skip(candidate) {
                        break 'search Some(candidate);
                    }
                    candidate += 1;
                }
                if candidate == taken {
                    candidate = taken.saturating_add(1);
                }
            }
            while candidate <= end {
                if !skip(candidate) {
                    break 'search Some(candidate);
                }
                candidate += 1;
            }
            None
        };
        if let Some(found) = found {
            // Not past it: the caller may fail to record it, and then it is free still.
            *cursor = Cursor { range: index, from: found };
            return Ok(Ipv4Addr::from(found));
        }
    }
    *cursor = Cursor { range: ranges.len(), from: 0 };
    Err(IpamError::Exhausted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn range(start: &str, end: &str) -> IpRange {
        IpRange::new(ip(start), ip(end), ip("255.255.255.0"), ip("10.0.0.1")).unwrap()
    }

    #[test]
    fn ranges_are_validated_field_by_field() {
        let mask = ip("255.255.255.0");
        let bad = |s, e, m, g| IpRange::new(ip(s), ip(e), ip(m), ip(g)).unwrap_err();
        assert!(matches!(
            bad("10.0.0.2", "10.0.0.9", "255.0.255.0", "10.0.0.1"),
            IpamError::Invalid { field: "netmask", .. }
        ));
        assert!(matches!(
            bad("10.0.0.9", "10.0.0.2", "255.255.255.0", "10.0.0.1"),
            IpamError::Invalid { field: "endIp", .. }
        ));
        assert!(matches!(
            bad("10.0.0.2", "10.0.1.9", "255.255.255.0", "10.0.0.1"),
            IpamError::Invalid { field: "endIp", .. }
        ));
        assert!(matches!(
            bad("10.0.0.2", "10.0.0.9", "255.255.255.0", "10.9.0.1"),
            IpamError::Invalid { field: "gateway", .. }
        ));
        assert!(matches!(
            bad("10.0.0.0", "10.0.0.9", "255.255.255.0", "10.0.0.1"),
            IpamError::Invalid { field: "startIp", .. }
        ));
        assert!(matches!(
            bad("10.0.0.2", "10.0.0.255", "255.255.255.0", "10.0.0.1"),
            IpamError::Invalid { field: "endIp", .. }
        ));
        assert!(matches!(
            bad("10.0.0.2", "10.0.0.9", "0.0.0.0", "10.0.0.1"),
            IpamError::Invalid { field: "netmask", .. }
        ));
        for (start, end, gateway) in [
            ("127.0.0.2", "127.0.0.9", "127.0.0.1"),
            ("224.0.0.2", "224.0.0.9", "224.0.0.1"),
            ("169.254.0.2", "169.254.0.9", "169.254.0.1"),
            ("0.0.0.2", "0.0.0.9", "0.0.0.1"),
            ("240.0.0.2", "240.0.0.9", "240.0.0.1"),
        ] {
            assert!(
                matches!(
                    bad(start, end, "255.255.255.0", gateway),
                    IpamError::Invalid { field: "startIp", .. }
                ),
                "{start}"
            );
        }
        let ok = IpRange::new(ip("10.0.0.1"), ip("10.0.0.254"), mask, ip("10.0.0.1")).unwrap();
        assert_eq!(ok.capacity(), 253);
        assert!(
            check_no_overlap(&[range("10.0.0.10", "10.0.0.20")], &range("10.0.0.20", "10.0.0.30"))
                .is_err()
        );
        assert!(
            check_no_overlap(&[range("10.0.0.10", "10.0.0.20")], &range("10.0.0.21", "10.0.0.30"))
                .is_ok()
        );
    }

    #[test]
    fn allocation_skips_the_gateway_and_used_addresses_and_honours_requests() {
        let ranges =
            [IpRange::new(ip("10.0.0.1"), ip("10.0.0.4"), ip("255.255.255.0"), ip("10.0.0.1"))
                .unwrap()];
        let mut used = BTreeSet::new();
        for expected in ["10.0.0.2", "10.0.0.3", "10.0.0.4"] {
            let got = allocate(&ranges, &used, None).unwrap();
            assert_eq!(got, ip(expected));
            used.insert(got);
        }
        assert_eq!(allocate(&ranges, &used, None), Err(IpamError::Exhausted));
        used.remove(&ip("10.0.0.3"));
        assert_eq!(allocate(&ranges, &used, None).unwrap(), ip("10.0.0.3"));
        assert!(matches!(
            allocate(&ranges, &used, Some(ip("10.0.0.2"))),
            Err(IpamError::Unavailable { .. })
        ));
        assert!(matches!(
            allocate(&ranges, &used, Some(ip("10.0.0.1"))),
            Err(IpamError::Unavailable { .. })
        ));
        assert!(matches!(
            allocate(&ranges, &used, Some(ip("10.0.9.9"))),
            Err(IpamError::Unavailable { .. })
        ));
        assert_eq!(allocate(&ranges, &used, Some(ip("10.0.0.3"))).unwrap(), ip("10.0.0.3"));
    }

    proptest! {
        #[test]
        fn never_hands_out_an_address_twice(
            ops in proptest::collection::vec((any::<bool>(), 0u8..40), 1..200),
        ) {
            let ranges = [
                IpRange::new(ip("10.0.0.5"), ip("10.0.0.20"), ip("255.255.255.0"), ip("10.0.0.9")).unwrap(),
                IpRange::new(ip("10.0.0.30"), ip("10.0.0.35"), ip("255.255.255.0"), ip("10.0.0.1")).unwrap(),
            ];
            let capacity: u64 = ranges.iter().map(IpRange::capacity).sum();
            let mut used = BTreeSet::new();
            for (allocate_one, which) in ops {
                if allocate_one {
                    match allocate(&ranges, &used, None) {
                        Ok(got) => {
                            prop_assert!(ranges.iter().any(|r| r.contains(got)));
                            prop_assert!(ranges.iter().all(|r| r.gateway != got));
                            prop_assert!(used.insert(got), "{got} handed out twice");
                        }
                        Err(IpamError::Exhausted) => prop_assert_eq!(used.len() as u64, capacity),
                        Err(other) => prop_assert!(false, "unexpected {other}"),
                    }
                } else if let Some(ip) = used.iter().nth(which as usize % used.len().max(1)).copied() {
                    used.remove(&ip);
                }
            }
        }

        #[test]
        fn a_search_from_the_cursor_finds_what_a_search_from_the_first_address_finds(
            ops in proptest::collection::vec((0u8..3, 0u8..40), 1..300),
        ) {
            let mut ranges = vec![
                IpRange::new(ip("10.0.0.30"), ip("10.0.0.35"), ip("255.255.255.0"), ip("10.0.0.1")).unwrap(),
                IpRange::new(ip("10.0.0.5"), ip("10.0.0.20"), ip("255.255.255.0"), ip("10.0.0.9")).unwrap(),
            ];
            let mut used = BTreeSet::new();
            let mut cursor = Cursor::default();
            for (op, which) in ops {
                match op {
                    0 | 1 => {
                        let expected = allocate(&ranges, &used, None);
                        prop_assert_eq!(allocate_from(&ranges, &used, None, &mut cursor), expected.clone());
                        // Now and then the caller fails to record what it was given.
                        if let Ok(got) = expected && which % 7 != 0 {
                            used.insert(got);
                        }
                    }
                    _ if which == 39 && ranges.len() == 2 => {
                        ranges.push(IpRange::new(ip("10.0.0.40"), ip("10.0.0.42"), ip("255.255.255.0"), ip("10.0.0.1")).unwrap());
                        cursor.reset();
                    }
                    _ => {
                        if let Some(ip) = used.iter().nth(which as usize % used.len().max(1)).copied() {
                            used.remove(&ip);
                            cursor.released(&ranges, ip);
                        }
                    }
                }
            }
        }
    }
}
