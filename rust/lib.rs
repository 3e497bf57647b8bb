//! kvindex core: vLLM-compatible block keys, a bounded two-level LRU block index,
//! KV-event decoding and sharded per-pod application, and longest-prefix scoring.
//!
//! The core knows nothing of HTTP, ZMQ or Prometheus: it takes bytes, integers and
//! strings in whole batches. `python/` (feature `python`) is the only binding and the only module that knows pyo3.
//!
//! Layout: `config` (settings and their defaults), `indexer` (the facade and read path,
//! with the lock order), `shards` (worker threads), `apply` (event application), `bridge`
//! (engine hash -> key), `pods` (names and per-pod records), `tiers` (tier names, bounded per
//! pod and reclaimed), `groups` (KV-cache groups of hybrid models and vLLM's hybrid hit rule), `counters`, `scoring`, `snapshot` (versioned dump and load of the index).

pub mod apply;
pub mod bridge;
pub mod config;
pub mod counters;
pub mod error;
pub mod events;
pub mod groups;
pub mod hashing;
pub mod index;
pub mod indexer;
pub mod memo;
pub mod msgpack;
pub mod pods;
pub mod scoring;
mod shards;
pub mod snapshot;
pub mod tiers;

#[cfg(test)]
mod compat_tests;
#[cfg(test)]
mod groups_tests;
#[cfg(feature = "python")]
mod python;
#[cfg(test)]
mod robustness;
#[cfg(test)]
mod testutil;

pub use apply::ApplyResult;
pub use config::IndexerConfig;
pub use error::{DecodeError, DecodeKind, Error, Result, SnapshotKind};
pub use hashing::{Algorithm, BlockKey, Extras, TokenProcessor};
pub use index::{BlockIndex, IndexStats, PodId};
pub use indexer::{FullStats, Indexer};
pub use pods::PodState;
pub use scoring::{PodScore, ScoreResult};
