//! The storage layer's one error type.
//!
//! Every failure a caller of this crate can see is a [`StoreError`]. The variants say what
//! went wrong in terms a caller can act on (a conflict to retry, a record that cannot be read
//! by this build, a backend that refused a write); the backend's own error is kept as the
//! `source` so logs can print the whole chain.

use uuid::Uuid;

/// Why a record's bytes could not be turned back into a record (or the other way round).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The bytes are shorter than an envelope or do not start with a known envelope format.
    #[error("record envelope is malformed: {reason}")]
    Malformed {
        /// What was wrong with the envelope.
        reason: String,
    },
    /// The envelope names another record kind than the table expects.
    #[error("record kind mismatch: table expects `{expected}`, envelope says `{found}`")]
    KindMismatch {
        /// The kind the reader asked for.
        expected: &'static str,
        /// The kind written in the envelope.
        found: String,
    },
    /// The record was written with a schema version this build cannot read.
    #[error(
        "record `{kind}` has schema version {found}, this build reads versions up to {supported}"
    )]
    UnknownVersion {
        /// The record kind.
        kind: &'static str,
        /// The version in the envelope.
        found: u16,
        /// The newest version this build knows.
        supported: u16,
    },
    /// The payload did not decode as the record type.
    #[error("record `{kind}` payload does not decode")]
    Decode {
        /// The record kind.
        kind: &'static str,
        /// bincode's own error.
        #[source]
        source: bincode::error::DecodeError,
    },
    /// The record could not be encoded.
    #[error("record `{kind}` does not encode")]
    Encode {
        /// The record kind.
        kind: &'static str,
        /// bincode's own error.
        #[source]
        source: bincode::error::EncodeError,
    },
}

/// What a compare-and-swap expected to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Write whatever is there.
    Any,
    /// The record must not exist yet.
    Absent,
    /// The record must exist with exactly this generation.
    Generation(u64),
}

/// The storage layer's error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend (sled, or the file system under it) failed.
    #[error("storage backend `{backend}` failed during {operation}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// What we were doing.
        operation: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A record did not decode or encode.
    #[error("record {id} in table `{table}` is unreadable")]
    Codec {
        /// The table.
        table: &'static str,
        /// The record's key.
        id: Uuid,
        /// What the codec said.
        #[source]
        source: CodecError,
    },
    /// A compare-and-swap found another generation than it expected; nothing was written.
    #[error(
        "conflict on {table}/{id}: expected {expected:?}, found generation {found:?}; nothing was written"
    )]
    Conflict {
        /// The table.
        table: &'static str,
        /// The record's key.
        id: Uuid,
        /// What the writer expected.
        expected: Expect,
        /// The generation actually stored (`None`: absent).
        found: Option<u64>,
    },
    /// The batch was applied but could not be made durable; callers must treat it as failed.
    #[error("write was applied but could not be made durable")]
    NotDurable {
        /// The flush error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    pub(crate) fn backend(
        backend: &'static str,
        operation: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Backend { backend, operation, source: Box::new(source) }
    }
}

/// An error and its causes on one line (`outer: inner: innermost`), for messages that must
/// outlive the error itself (shared by several waiters, kept in records and snapshots).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
