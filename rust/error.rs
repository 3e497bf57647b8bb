//! The core's one error type. Nothing that arrives from the network panics: every
//! failure is a value of this enum, counted by the caller or mapped to an exception
//! (in `python/errors.rs`, one exhaustive match).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A caller passed something the core cannot work with (token id out of range,
    /// block size 0, unknown algorithm, empty tier name...). `what` says which and why.
    InvalidInput { what: String },
    /// The pod table is full (pod ids are never reused).
    TooManyPods { max: u32 },
    /// A new tier name would exceed the tiers an index entry can encode.
    TooManyTiers { max: usize, tier: String },
    /// Bytes from an engine that are not a valid KV event batch or event.
    Decode(DecodeError),
    /// The OS refused a worker thread.
    Spawn { thread: String, reason: String },
    /// The indexer was closed and accepts no more work.
    Closed,
    /// A snapshot that cannot be loaded (`snapshot.rs`); nothing of it was applied.
    Snapshot { kind: SnapshotKind, detail: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// Written by an index with another block size, hash algorithm or seed.
    Mismatch,
    /// Not a kvindex snapshot, or a format version this build cannot read.
    Unsupported,
    /// The data ends early.
    Truncated,
    /// Checksum or structure wrong.
    Corrupt,
    /// The indexer already holds pods or models.
    NotEmpty,
}

/// What was wrong with an engine's bytes, plus a human detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub kind: DecodeKind,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeKind {
    /// The msgpack data ends early.
    Truncated,
    /// Not valid msgpack (reserved marker, impossible length, bad UTF-8...).
    Malformed,
    /// Valid msgpack, but not the shape of a batch or event (wrong type, missing field).
    Shape,
    /// An integer outside the range of its field.
    OutOfRange,
    /// Block size missing, not positive, or not compatible with ours; token count mismatch.
    BlockSize,
    /// A `medium` the index cannot hold as a tier.
    Tier,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(what: impl Into<String>) -> Self {
        Error::InvalidInput { what: what.into() }
    }
    pub fn decode(kind: DecodeKind, detail: impl Into<String>) -> Self {
        Error::Decode(DecodeError { kind, detail: detail.into() })
    }
    pub fn snapshot(kind: SnapshotKind, detail: impl Into<String>) -> Self {
        Error::Snapshot { kind, detail: detail.into() }
    }
    /// The decode kind, if this is a decode error.
    pub fn decode_kind(&self) -> Option<DecodeKind> {
        match self {
            Error::Decode(d) => Some(d.kind),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidInput { what } => write!(f, "invalid input: {what}"),
            Error::TooManyPods { max } => write!(f, "invalid input: too many pods (at most {max})"),
            Error::TooManyTiers { max, tier } => write!(f, "invalid input: too many tiers (at most {max}): {tier}"),
            Error::Decode(d) => write!(f, "undecodable event data: {}", d.detail),
            Error::Spawn { thread, reason } => write!(f, "cannot start thread {thread}: {reason}"),
            Error::Closed => f.write_str("the indexer is closed"),
            Error::Snapshot { detail, .. } => write!(f, "snapshot refused: {detail}"),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_keep_their_prefixes() {
        assert_eq!(Error::invalid("x").to_string(), "invalid input: x");
        assert_eq!(Error::TooManyPods { max: 3 }.to_string(), "invalid input: too many pods (at most 3)");
        let d = Error::decode(DecodeKind::Shape, "event is nil");
        assert_eq!(d.to_string(), "undecodable event data: event is nil");
        assert_eq!(d.decode_kind(), Some(DecodeKind::Shape));
        assert_eq!(Error::Closed.decode_kind(), None);
    }
}
