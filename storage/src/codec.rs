//! The one place that turns records into bytes and back.
//!
//! A stored value is an *envelope* around a bincode payload:
//!
//! ```text
//! +--------+-----------+-----------+---------+------------+----------------+
//! | format | kind len  | kind      | version | generation | bincode payload|
//! | u8 = 1 | u16 (BE)  | utf-8     | u16 (BE)| u64 (BE)   | ...            |
//! +--------+-----------+-----------+---------+------------+----------------+
//! ```
//!
//! The kind and schema version let a record format evolve: a reader that finds an older
//! version calls the record's [`Record::upgrade`](crate::Record::upgrade), and one that finds a
//! newer version refuses with [`CodecError::UnknownVersion`] instead of misreading bytes. The
//! generation lives in the header so that compare-and-swap can check it without decoding the
//! payload. Keeping bincode behind this module means the payload encoding can be swapped
//! (the format byte would change) without touching any table code.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CodecError;

const FORMAT_V1: u8 = 1;

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// The decoded header of an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header<'a> {
    /// The record kind written by the producer.
    pub kind: &'a str,
    /// The schema version of the payload.
    pub version: u16,
    /// The record's generation (1 for a fresh record, +1 for every write).
    pub generation: u64,
    /// Where the payload starts in the value.
    pub payload_offset: usize,
}

/// Encodes `value` with its kind, schema version and generation.
pub fn encode<T: Serialize>(
    kind: &'static str,
    version: u16,
    generation: u64,
    value: &T,
) -> Result<Vec<u8>, CodecError> {
    let payload = encode_payload(kind, value)?;
    wrap(kind, version, generation, &payload)
}

/// Puts an already encoded payload into an envelope.
pub fn wrap(
    kind: &'static str,
    version: u16,
    generation: u64,
    payload: &[u8],
) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(1 + 2 + kind.len() + 2 + 8 + payload.len());
    out.push(FORMAT_V1);
    let kind_len = u16::try_from(kind.len()).map_err(|_| CodecError::Malformed {
        reason: format!("kind `{kind}` is longer than 65535 bytes"),
    })?;
    out.extend_from_slice(&kind_len.to_be_bytes());
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Encodes a bare payload, without an envelope (for values nested inside records, such as a
/// flow's context, which take their version from the record around them).
pub fn encode_payload<T: Serialize>(kind: &'static str, value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, bincode_config())
        .map_err(|source| CodecError::Encode { kind, source })
}

/// Decodes a bare payload written by [`encode_payload`].
pub fn decode_payload<T: DeserializeOwned>(
    kind: &'static str,
    bytes: &[u8],
) -> Result<T, CodecError> {
    let (value, _) = bincode::serde::decode_from_slice(bytes, bincode_config())
        .map_err(|source| CodecError::Decode { kind, source })?;
    Ok(value)
}

/// Reads an envelope's header without touching the payload.
pub fn header(bytes: &[u8]) -> Result<Header<'_>, CodecError> {
    let malformed = |reason: &str| CodecError::Malformed { reason: reason.to_owned() };
    let (&format, rest) = bytes.split_first().ok_or_else(|| malformed("empty value"))?;
    if format != FORMAT_V1 {
        return Err(CodecError::Malformed { reason: format!("unknown envelope format {format}") });
    }
    let kind_len = u16::from_be_bytes(
        rest.get(..2)
            .ok_or_else(|| malformed("truncated kind length"))?
            .try_into()
            .expect("2 bytes"),
    ) as usize;
    let kind_bytes = rest.get(2..2 + kind_len).ok_or_else(|| malformed("truncated kind"))?;
    let kind = std::str::from_utf8(kind_bytes).map_err(|_| malformed("kind is not utf-8"))?;
    let at = 2 + kind_len;
    let version = u16::from_be_bytes(
        rest.get(at..at + 2)
            .ok_or_else(|| malformed("truncated version"))?
            .try_into()
            .expect("2 bytes"),
    );
    let generation = u64::from_be_bytes(
        rest.get(at + 2..at + 10)
            .ok_or_else(|| malformed("truncated generation"))?
            .try_into()
            .expect("8 bytes"),
    );
    Ok(Header { kind, version, generation, payload_offset: 1 + at + 10 })
}

/// Decodes an envelope into a record of kind `kind`, upgrading older versions with `upgrade`.
pub fn decode<T: DeserializeOwned>(
    kind: &'static str,
    current_version: u16,
    upgrade: impl FnOnce(u16, &[u8]) -> Result<T, CodecError>,
    bytes: &[u8],
) -> Result<(T, u64), CodecError> {
    let head = header(bytes)?;
    if head.kind != kind {
        return Err(CodecError::KindMismatch { expected: kind, found: head.kind.to_owned() });
    }
    let payload = &bytes[head.payload_offset..];
    let value = match head.version {
        v if v == current_version => decode_payload(kind, payload)?,
        v if v < current_version => upgrade(v, payload)?,
        found => {
            return Err(CodecError::UnknownVersion { kind, found, supported: current_version });
        }
    };
    Ok((value, head.generation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        name: String,
        count: u32,
    }

    fn no_upgrade(v: u16, _: &[u8]) -> Result<Sample, CodecError> {
        Err(CodecError::UnknownVersion { kind: "sample", found: v, supported: 2 })
    }

    #[test]
    fn round_trip_keeps_value_and_generation() {
        let value = Sample { name: "vm-1".into(), count: 7 };
        let bytes = encode("sample", 2, 41, &value).unwrap();
        let (back, generation) = decode("sample", 2, no_upgrade, &bytes).unwrap();
        assert_eq!(back, value);
        assert_eq!(generation, 41);
        assert_eq!(header(&bytes).unwrap().kind, "sample");
    }

    #[test]
    fn newer_version_is_a_clear_error() {
        let bytes = encode("sample", 3, 1, &Sample { name: "x".into(), count: 1 }).unwrap();
        let err = decode::<Sample>("sample", 2, no_upgrade, &bytes).unwrap_err();
        assert!(matches!(err, CodecError::UnknownVersion { found: 3, supported: 2, .. }), "{err}");
    }

    #[test]
    fn older_version_goes_through_upgrade() {
        #[derive(serde::Serialize)]
        struct V1 {
            name: String,
        }
        let bytes = encode("sample", 1, 5, &V1 { name: "old".into() }).unwrap();
        let (value, _) = decode(
            "sample",
            2,
            |v, payload| {
                assert_eq!(v, 1);
                #[derive(serde::Deserialize)]
                struct V1 {
                    name: String,
                }
                let old: V1 = decode_payload("sample", payload)?;
                Ok(Sample { name: old.name, count: 0 })
            },
            &bytes,
        )
        .unwrap();
        assert_eq!(value, Sample { name: "old".into(), count: 0 });
    }

    #[test]
    fn wrong_kind_and_garbage_are_errors_not_panics() {
        let bytes = encode("other", 2, 1, &Sample { name: "x".into(), count: 1 }).unwrap();
        assert!(matches!(
            decode::<Sample>("sample", 2, no_upgrade, &bytes),
            Err(CodecError::KindMismatch { .. })
        ));
        for garbage in [&b""[..], &[1], &[1, 0, 200], &[9, 9, 9], &bytes[..bytes.len() - 3]] {
            assert!(decode::<Sample>("sample", 2, no_upgrade, garbage).is_err());
        }
    }
}
