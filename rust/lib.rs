//! kvindex core: vLLM-compatible block keys, a bounded two-level LRU block index,
//! KV-event decoding and sharded per-pod application, and longest-prefix scoring.
//!
//! The core knows nothing of HTTP, ZMQ or Prometheus: it takes bytes, integers and
//! strings in whole batches. `python.rs` (feature `python`) is the only binding.

pub mod error;
pub mod events;
pub mod hashing;
pub mod index;
pub mod indexer;
pub mod memo;
pub mod msgpack;
pub mod scoring;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
pub use hashing::{Algorithm, BlockKey, Extras, TokenProcessor};
pub use index::{BlockIndex, IndexStats, PodId};
pub use indexer::{ApplyResult, Indexer, IndexerConfig, PodState};
pub use scoring::{PodScore, ScoreResult};
