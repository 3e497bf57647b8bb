//! Indexer configuration: the one place the index defaults are declared (the Python binding,
//! the service settings and the CLI read them from here) and the one place they are checked.

use crate::error::{Error, Result};
use crate::hashing::Algorithm;
use crate::index::MAX_TIERS;
use crate::tiers::{BUILTIN_TIERS, MAX_RESERVED_TIERS};

/// The defaults, as constants so the binding can use them in signatures.
pub mod defaults {
    use crate::hashing::Algorithm;

    pub const BLOCK_SIZE: usize = 16;
    pub const ALGORITHM: Algorithm = Algorithm::Sha256Cbor;
    pub const MAX_KEYS: usize = 10_000_000;
    pub const MAX_PODS_PER_KEY: usize = 64;
    /// 0 = one shard per core.
    pub const SHARDS: usize = 0;
    pub const QUEUE_CAPACITY: usize = 1024;
    pub const TIER_WEIGHTS: &[(&str, f64)] = &[("GPU", 1.0), ("CPU", 0.8)];
    /// Tiers not named in the weights weigh like this tier.
    pub const FALLBACK_TIER: &str = "CPU";
    pub const MAX_BRIDGE_PER_POD: usize = 4_000_000;
    pub const KEY_MEMO_BLOCKS: usize = 1 << 18;
    /// Tier names outside the built-in and configured ones a pod may use at once.
    pub const MAX_TIERS_PER_POD: usize = 4;
    /// Largest explicit shard count.
    pub const MAX_SHARDS: usize = 256;
}

#[derive(Clone, Debug)]
pub struct IndexerConfig {
    pub block_size: usize,
    pub hash_seed: Option<String>,
    pub algorithm: Algorithm,
    pub max_keys: usize,
    pub max_pods_per_key: usize,
    /// Event shards (worker threads); 0 = one per core.
    pub shards: usize,
    pub queue_capacity: usize,
    /// Tier name -> weight. Unnamed tiers weigh `default_weight`.
    pub tier_weights: Vec<(String, f64)>,
    pub default_weight: f64,
    /// Engine-hash -> key entries kept per pod at most.
    pub max_bridge_per_pod: usize,
    /// Blocks the read path's key memo remembers (SHA-256 algorithms only; 0 = off).
    pub key_memo_blocks: usize,
    /// Custom tier names (not built-in, not in `tier_weights`) one pod may use at once.
    pub max_tiers_per_pod: usize,
}

impl Default for IndexerConfig {
    fn default() -> Self {
        let (tier_weights, default_weight) = tier_weights(Vec::new()).expect("default tier weights are valid");
        IndexerConfig {
            block_size: defaults::BLOCK_SIZE,
            hash_seed: None,
            algorithm: defaults::ALGORITHM,
            max_keys: defaults::MAX_KEYS,
            max_pods_per_key: defaults::MAX_PODS_PER_KEY,
            shards: defaults::SHARDS,
            queue_capacity: defaults::QUEUE_CAPACITY,
            tier_weights,
            default_weight,
            max_bridge_per_pod: defaults::MAX_BRIDGE_PER_POD,
            key_memo_blocks: defaults::KEY_MEMO_BLOCKS,
            max_tiers_per_pod: defaults::MAX_TIERS_PER_POD,
        }
    }
}

/// The default tier weights with `overrides` applied (names trimmed, upper-cased), and the
/// weight of unnamed tiers (the `FALLBACK_TIER`'s). Built-in and weighted names together
/// are the reserved tiers (`tiers.rs`): at most `MAX_RESERVED_TIERS` of them.
pub fn tier_weights(overrides: Vec<(String, f64)>) -> Result<(Vec<(String, f64)>, f64)> {
    if overrides.len() > MAX_TIERS {
        return Err(too_many_weighted(overrides.len()));
    }
    let mut w: Vec<(String, f64)> = defaults::TIER_WEIGHTS.iter().map(|(n, v)| (n.to_string(), *v)).collect();
    for (k, v) in overrides {
        let k = k.trim().to_ascii_uppercase();
        if k.is_empty() {
            return Err(Error::invalid("tier_weights has an empty tier name"));
        }
        w.retain(|(n, _)| *n != k);
        w.push((k, v));
    }
    let extra = w.iter().filter(|(n, _)| !BUILTIN_TIERS.contains(&n.as_str())).count();
    if BUILTIN_TIERS.len() + extra > MAX_RESERVED_TIERS {
        return Err(too_many_weighted(extra));
    }
    let fallback = w.iter().find(|(n, _)| n == defaults::FALLBACK_TIER).map(|(_, v)| *v);
    let fallback_default = defaults::TIER_WEIGHTS.iter().find(|(n, _)| *n == defaults::FALLBACK_TIER).map(|(_, v)| *v);
    Ok((w, fallback.or(fallback_default).unwrap_or(0.0)))
}

fn too_many_weighted(n: usize) -> Error {
    let max = MAX_RESERVED_TIERS - BUILTIN_TIERS.len();
    Error::invalid(format!(
        "tier_weights names {n} tiers besides the built-in {}; at most {max} are supported",
        BUILTIN_TIERS.join("/")
    ))
}

impl IndexerConfig {
    /// Every bound the indexer relies on (the token processor checks block size and seed).
    pub fn validate(&self) -> Result<()> {
        if self.max_keys == 0 {
            return Err(Error::invalid("max_keys must be at least 1"));
        }
        if self.max_pods_per_key == 0 {
            return Err(Error::invalid("max_pods_per_key must be at least 1"));
        }
        if self.max_tiers_per_pod == 0 || self.max_tiers_per_pod > MAX_TIERS {
            return Err(Error::invalid(format!("max_tiers_per_pod must be 1 to {MAX_TIERS}")));
        }
        if self.queue_capacity == 0 {
            return Err(Error::invalid("queue_capacity must be at least 1"));
        }
        for (name, w) in &self.tier_weights {
            if !w.is_finite() || *w < 0.0 {
                return Err(Error::invalid(format!("tier weight for {name} must be a finite number >= 0")));
            }
        }
        if !self.default_weight.is_finite() || self.default_weight < 0.0 {
            return Err(Error::invalid("default tier weight must be a finite number >= 0"));
        }
        Ok(())
    }

    /// Worker threads to start: `shards`, or one per core when 0.
    pub fn effective_shards(&self, cores: usize) -> usize {
        if self.shards == 0 {
            cores
        } else {
            self.shards.min(defaults::MAX_SHARDS)
        }
    }

    /// The weight of tier `name` (already upper-case).
    pub fn weight_of(&self, name: &str) -> f64 {
        self.tier_weights
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, w)| *w)
            .unwrap_or(self.default_weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unnamed_tiers_weigh_like_cpu() {
        let c = IndexerConfig::default();
        c.validate().unwrap();
        assert_eq!((c.weight_of("GPU"), c.weight_of("CPU"), c.weight_of("DISK")), (1.0, 0.8, 0.8));
        assert_eq!(c.effective_shards(6), 6);
        assert_eq!(IndexerConfig { shards: 1000, ..c }.effective_shards(6), defaults::MAX_SHARDS);
    }

    #[test]
    fn overrides_replace_and_move_the_fallback() {
        let (w, fallback) = tier_weights(vec![(" cpu ".to_string(), 0.5), ("disk".to_string(), 0.1)]).unwrap();
        assert_eq!(w, vec![("GPU".into(), 1.0), ("CPU".into(), 0.5), ("DISK".into(), 0.1)]);
        assert_eq!(fallback, 0.5);
        assert!(tier_weights(vec![(" ".to_string(), 1.0)]).is_err());
        let too_many = (0..=MAX_TIERS).map(|i| (format!("T{i}"), 1.0)).collect();
        assert!(tier_weights(too_many).is_err());
        // the built-in names do not count against the reserved room
        let room = MAX_RESERVED_TIERS - BUILTIN_TIERS.len();
        let ok = (0..room).map(|i| (format!("T{i}"), 1.0)).chain([("disk".to_string(), 0.5)]).collect();
        assert!(tier_weights(ok).is_ok());
        let over = (0..=room).map(|i| (format!("T{i}"), 1.0)).collect();
        assert!(tier_weights(over).is_err());
    }

    #[test]
    fn validate_rejects_zero_bounds_and_bad_weights() {
        assert!(IndexerConfig { max_keys: 0, ..Default::default() }.validate().is_err());
        assert!(IndexerConfig { queue_capacity: 0, ..Default::default() }.validate().is_err());
        assert!(IndexerConfig { max_tiers_per_pod: 0, ..Default::default() }.validate().is_err());
        assert!(IndexerConfig { max_tiers_per_pod: MAX_TIERS + 1, ..Default::default() }.validate().is_err());
        let bad = IndexerConfig { tier_weights: vec![("GPU".into(), f64::NAN)], ..Default::default() };
        assert!(matches!(bad.validate(), Err(Error::InvalidInput { .. })));
    }
}
