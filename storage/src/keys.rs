//! How tables and indexes are laid out in the backend's single ordered key space.
//!
//! Every table and every index shares one ordered key space, so that a batch touching records
//! of several tables and their index entries is one atomic write in the backend:
//!
//! ```text
//! r/<table>/<uuid: 16 bytes>                          -> envelope (see `codec`)
//! i/<table>/<index>/<encoded value><uuid: 16 bytes>   -> empty
//! c/<table>/<index>/<encoded value>                   -> entries for the value (counted indexes)
//! ```
//!
//! Index values are encoded so that byte order equals value order, which makes equality a
//! prefix scan and a range of values a key range. Strings are escaped and terminated, so no
//! string's encoding is a prefix of another's.

use uuid::Uuid;

/// A value a secondary index is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IndexValue {
    /// Text: names, states, IP addresses.
    Str(String),
    /// Unsigned integers: sizes, timestamps.
    U64(u64),
    /// Signed integers.
    I64(i64),
    /// A reference to another record.
    Uuid(Uuid),
    /// A flag.
    Bool(bool),
}

impl From<&str> for IndexValue {
    fn from(value: &str) -> Self {
        IndexValue::Str(value.to_owned())
    }
}
impl From<String> for IndexValue {
    fn from(value: String) -> Self {
        IndexValue::Str(value)
    }
}
impl From<u64> for IndexValue {
    fn from(value: u64) -> Self {
        IndexValue::U64(value)
    }
}
impl From<i64> for IndexValue {
    fn from(value: i64) -> Self {
        IndexValue::I64(value)
    }
}
impl From<Uuid> for IndexValue {
    fn from(value: Uuid) -> Self {
        IndexValue::Uuid(value)
    }
}
impl From<bool> for IndexValue {
    fn from(value: bool) -> Self {
        IndexValue::Bool(value)
    }
}

const TAG_STR: u8 = 1;
const TAG_U64: u8 = 2;
const TAG_I64: u8 = 3;
const TAG_UUID: u8 = 4;
const TAG_BOOL: u8 = 5;

impl IndexValue {
    /// Appends the order-preserving encoding of this value.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            IndexValue::Str(s) => {
                out.push(TAG_STR);
                for &byte in s.as_bytes() {
                    out.push(byte);
                    if byte == 0 {
                        out.push(0xFF);
                    }
                }
                out.extend_from_slice(&[0, 1]);
            }
            IndexValue::U64(v) => {
                out.push(TAG_U64);
                out.extend_from_slice(&v.to_be_bytes());
            }
            IndexValue::I64(v) => {
                out.push(TAG_I64);
                out.extend_from_slice(&((*v as u64) ^ (1 << 63)).to_be_bytes());
            }
            IndexValue::Uuid(u) => {
                out.push(TAG_UUID);
                out.extend_from_slice(u.as_bytes());
            }
            IndexValue::Bool(b) => {
                out.push(TAG_BOOL);
                out.push(u8::from(*b));
            }
        }
    }
}

pub(crate) fn table_prefix(table: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(3 + table.len());
    key.extend_from_slice(b"r/");
    key.extend_from_slice(table.as_bytes());
    key.push(b'/');
    key
}

pub(crate) fn record_key(table: &str, id: Uuid) -> Vec<u8> {
    let mut key = table_prefix(table);
    key.extend_from_slice(id.as_bytes());
    key
}

/// Where a deleted record's last generation is kept (`g/<table>/<uuid>`), so a record
/// created again under the same UUID continues the count instead of restarting at 1: a
/// compare-and-swap on an old generation can then never match a new incarnation.
pub(crate) fn tombstone_key(table: &str, id: Uuid) -> Vec<u8> {
    let mut key = Vec::with_capacity(19 + table.len());
    key.extend_from_slice(b"g/");
    key.extend_from_slice(table.as_bytes());
    key.push(b'/');
    key.extend_from_slice(id.as_bytes());
    key
}

/// Where the names of a table's indexes, as last built, are kept (`m/<table>/indexes`): a
/// store opened by code declaring other indexes backfills them (see `Db::ensure_indexes`).
pub(crate) fn index_marker_key(table: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(10 + table.len());
    key.extend_from_slice(b"m/");
    key.extend_from_slice(table.as_bytes());
    key.extend_from_slice(b"/indexes");
    key
}

/// Where a counted index keeps how many entries it holds for one value
/// (`c/<table>/<index>/<encoded value>` -> u64, big-endian), so a count is one read.
pub(crate) fn counter_key(table: &str, index: &str, value: &IndexValue) -> Vec<u8> {
    let mut key = counter_prefix(table);
    key.extend_from_slice(index.as_bytes());
    key.push(b'/');
    value.encode_into(&mut key);
    key
}

/// The prefix of every counter of a table's indexes.
pub(crate) fn counter_prefix(table: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(3 + table.len());
    key.extend_from_slice(b"c/");
    key.extend_from_slice(table.as_bytes());
    key.push(b'/');
    key
}

pub(crate) fn id_from_record_key(key: &[u8]) -> Option<Uuid> {
    key.len().checked_sub(16).and_then(|at| Uuid::from_slice(&key[at..]).ok())
}

pub(crate) fn index_prefix(table: &str, index: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + table.len() + index.len());
    key.extend_from_slice(b"i/");
    key.extend_from_slice(table.as_bytes());
    key.push(b'/');
    key.extend_from_slice(index.as_bytes());
    key.push(b'/');
    key
}

pub(crate) fn index_value_prefix(table: &str, index: &str, value: &IndexValue) -> Vec<u8> {
    let mut key = index_prefix(table, index);
    value.encode_into(&mut key);
    key
}

pub(crate) fn index_entry_key(table: &str, index: &str, value: &IndexValue, id: Uuid) -> Vec<u8> {
    let mut key = index_value_prefix(table, index, value);
    key.extend_from_slice(id.as_bytes());
    key
}

/// The smallest key greater than every key that starts with `prefix`, if there is one.
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(v: &IndexValue) -> Vec<u8> {
        let mut out = Vec::new();
        v.encode_into(&mut out);
        out
    }

    fn value() -> impl Strategy<Value = IndexValue> {
        prop_oneof![
            ".{0,6}".prop_map(IndexValue::Str),
            proptest::collection::vec(0u8..3, 0..5)
                .prop_map(|b| IndexValue::Str(String::from_utf8(b).unwrap())),
            any::<u64>().prop_map(IndexValue::U64),
            any::<i64>().prop_map(IndexValue::I64),
            any::<bool>().prop_map(IndexValue::Bool),
            any::<u128>().prop_map(|n| IndexValue::Uuid(Uuid::from_u128(n))),
        ]
    }

    proptest! {
        #[test]
        fn encoding_preserves_order_and_is_prefix_free(a in value(), b in value()) {
            let (ea, eb) = (enc(&a), enc(&b));
            prop_assert_eq!(a.cmp(&b), ea.cmp(&eb));
            if a != b {
                prop_assert!(!ea.starts_with(&eb) && !eb.starts_with(&ea));
            }
        }
    }

    #[test]
    fn prefix_end_bounds_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xFF, 0xFF]), None);
    }
}
