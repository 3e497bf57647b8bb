//! The core's one error type. Nothing that arrives from the network panics: every
//! failure is a value of this enum, counted by the caller or mapped to an exception.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A caller passed something the core cannot work with (token id out of range,
    /// block size 0, unknown algorithm or tier...).
    InvalidInput(String),
    /// Bytes from an engine that are not a valid KV event batch or event.
    Decode(String),
    /// The indexer was closed and accepts no more work.
    Closed,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }
    pub fn decode(msg: impl Into<String>) -> Self {
        Error::Decode(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Error::Decode(m) => write!(f, "undecodable event data: {m}"),
            Error::Closed => f.write_str("the indexer is closed"),
        }
    }
}

impl std::error::Error for Error {}
