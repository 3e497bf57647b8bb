//! Token processor: token ids -> chained 64-bit block keys, full blocks only.
//!
//! The default algorithm reproduces vLLM's `sha256_cbor` prefix-cache hash:
//! `block_i = SHA-256(canonical CBOR [parent_digest, [tokens], extra_keys|null])`, chained on
//! full 32-byte digests from `NONE_HASH = SHA-256(CBOR(seed))`; the key is the last 8 digest
//! bytes read big-endian, which is the value vLLM's KV events carry.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};

/// kvindex's 64-bit block key.
pub type BlockKey = u64;

/// The seed vLLM >= 0.29 uses for NONE_HASH when PYTHONHASHSEED is unset.
pub const DEFAULT_SEED: &str = "vllm-none-hash";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// vLLM `sha256_cbor`: chained on 32-byte digests.
    Sha256Cbor,
    /// vLLM 0.10.0-0.10.1 `sha256_cbor_64bit`: chained on the 64-bit values.
    Sha256Cbor64,
    /// xxh3-64 over the little-endian parent and tokens: fast, equal to no vLLM hash.
    Xxh3,
}

impl Algorithm {
    pub const ALL: [Algorithm; 3] = [Algorithm::Sha256Cbor, Algorithm::Sha256Cbor64, Algorithm::Xxh3];

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "sha256_cbor" => Ok(Algorithm::Sha256Cbor),
            "sha256_cbor_64bit" => Ok(Algorithm::Sha256Cbor64),
            "xxh3" | "xxh3_64" => Ok(Algorithm::Xxh3),
            other => Err(Error::invalid(format!(
                "unknown hash algorithm {other:?}; expected one of sha256_cbor, sha256_cbor_64bit, xxh3"
            ))),
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256Cbor => "sha256_cbor",
            Algorithm::Sha256Cbor64 => "sha256_cbor_64bit",
            Algorithm::Xxh3 => "xxh3",
        }
    }

    /// Whether a block's chain value is wider than its key (the index must then keep the
    /// rest of the digest to extend a chain from a parent known only by its key).
    pub fn chains_on_digest(self) -> bool {
        matches!(self, Algorithm::Sha256Cbor)
    }
}

/// The value a chain continues from: a full digest for `Sha256Cbor`, else the key
/// (big-endian in the last 8 bytes, so `key()` is the same rule for every algorithm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chain(pub [u8; 32]);

impl Chain {
    pub fn key(&self) -> BlockKey {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[24..]);
        u64::from_be_bytes(b)
    }
    pub fn from_key(key: BlockKey) -> Self {
        let mut d = [0u8; 32];
        d[24..].copy_from_slice(&key.to_be_bytes());
        Chain(d)
    }
    /// Rebuild a digest from its first 24 bytes (kept by the index) and its key.
    pub fn from_parts(hi: &[u8; 24], key: BlockKey) -> Self {
        let mut d = [0u8; 32];
        d[..24].copy_from_slice(hi);
        d[24..].copy_from_slice(&key.to_be_bytes());
        Chain(d)
    }
    pub fn hi(&self) -> [u8; 24] {
        let mut h = [0u8; 24];
        h.copy_from_slice(&self.0[..24]);
        h
    }
}

/// Extra keys per block, each already encoded as one canonical CBOR item (an array).
pub enum Extras<'a> {
    None,
    /// A request's extras: `rest` for every block, `first` for block 0 (which also carries
    /// the cache salt). `None` means CBOR null.
    Request {
        first: Option<Vec<u8>>,
        rest: Option<Vec<u8>>,
    },
    /// Explicit extras for each block (from a `BlockStored` event's `extra_keys`).
    PerBlock(&'a [Option<Vec<u8>>]),
}

impl<'a> Extras<'a> {
    /// vLLM's rule: `lora_name` first, then multimodal keys, then `cache_salt` on block 0.
    pub fn for_request(lora_name: Option<&str>, cache_salt: Option<&str>) -> Extras<'static> {
        let lora = lora_name.filter(|s| !s.is_empty());
        let salt = cache_salt.filter(|s| !s.is_empty());
        if lora.is_none() && salt.is_none() {
            return Extras::None;
        }
        let encode = |items: &[&str]| -> Option<Vec<u8>> {
            if items.is_empty() {
                return None;
            }
            let mut out = Vec::new();
            cbor::head(&mut out, 4, items.len() as u64);
            for s in items {
                cbor::text(&mut out, s);
            }
            Some(out)
        };
        let rest: Vec<&str> = lora.into_iter().collect();
        let first: Vec<&str> = lora.into_iter().chain(salt).collect();
        Extras::Request { first: encode(&first), rest: encode(&rest) }
    }

    /// Extras of block `i` (absolute index within what is being hashed).
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        match self {
            Extras::None => None,
            Extras::Request { first, rest } => {
                if i == 0 {
                    first.as_deref()
                } else {
                    rest.as_deref()
                }
            }
            Extras::PerBlock(v) => v.get(i).and_then(|o| o.as_deref()),
        }
    }
}

/// Minimal canonical CBOR writer (shortest integer heads), enough for vLLM's hash input.
pub mod cbor {
    #[inline]
    pub fn head(out: &mut Vec<u8>, major: u8, n: u64) {
        let m = major << 5;
        if n < 24 {
            out.push(m | n as u8);
        } else if n <= u8::MAX as u64 {
            out.extend_from_slice(&[m | 24, n as u8]);
        } else if n <= u16::MAX as u64 {
            out.push(m | 25);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else if n <= u32::MAX as u64 {
            out.push(m | 26);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        } else {
            out.push(m | 27);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
    #[inline]
    pub fn int(out: &mut Vec<u8>, v: i128) {
        if v >= 0 {
            head(out, 0, v as u64);
        } else {
            head(out, 1, (-1 - v) as u64);
        }
    }
    pub fn text(out: &mut Vec<u8>, s: &str) {
        head(out, 3, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }
    pub fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        head(out, 2, b.len() as u64);
        out.extend_from_slice(b);
    }
    pub const NULL: u8 = 0xf6;

    /// Canonical CBOR unsigned ints for a run of token ids (the hot loop of hashing).
    #[inline]
    pub fn uints(out: &mut Vec<u8>, vals: &[u32]) {
        out.reserve(vals.len() * 5);
        for &v in vals {
            if v < 24 {
                out.push(v as u8);
            } else if v <= 0xff {
                out.extend_from_slice(&[24, v as u8]);
            } else if v <= 0xffff {
                let b = (v as u16).to_be_bytes();
                out.extend_from_slice(&[25, b[0], b[1]]);
            } else {
                let b = v.to_be_bytes();
                out.extend_from_slice(&[26, b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct TokenProcessor {
    block_size: usize,
    algorithm: Algorithm,
    seed: Option<String>,
    root: Chain,
}

impl TokenProcessor {
    pub fn new(block_size: usize, seed: Option<&str>, algorithm: Algorithm) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::invalid("block_size must be at least 1"));
        }
        if block_size > 1 << 16 {
            return Err(Error::invalid(format!("block_size {block_size} is larger than 65536")));
        }
        let s = seed.unwrap_or(DEFAULT_SEED);
        let root = match algorithm {
            Algorithm::Sha256Cbor | Algorithm::Sha256Cbor64 => {
                let mut buf = Vec::with_capacity(s.len() + 9);
                cbor::text(&mut buf, s);
                let d: [u8; 32] = Sha256::digest(&buf).into();
                if algorithm == Algorithm::Sha256Cbor {
                    Chain(d)
                } else {
                    Chain::from_key(Chain(d).key())
                }
            }
            Algorithm::Xxh3 => Chain::from_key(xxhash_rust::xxh3::xxh3_64(s.as_bytes())),
        };
        Ok(TokenProcessor { block_size, algorithm, seed: seed.map(str::to_owned), root })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
    pub fn seed(&self) -> Option<&str> {
        self.seed.as_deref()
    }
    pub fn root(&self) -> Chain {
        self.root
    }
    /// NONE_HASH as vLLM holds it: 32 digest bytes, or the 8-byte value for 64-bit algorithms.
    pub fn none_hash_bytes(&self) -> Vec<u8> {
        if self.algorithm.chains_on_digest() {
            self.root.0.to_vec()
        } else {
            self.root.0[24..].to_vec()
        }
    }

    /// Hash one full block. `buf` is scratch space reused across calls.
    pub fn hash_block(&self, parent: &Chain, tokens: &[u32], extra: Option<&[u8]>, buf: &mut Vec<u8>) -> Chain {
        buf.clear();
        match self.algorithm {
            Algorithm::Sha256Cbor | Algorithm::Sha256Cbor64 => {
                buf.push(0x83);
                if self.algorithm == Algorithm::Sha256Cbor {
                    cbor::bytes(buf, &parent.0);
                } else {
                    cbor::head(buf, 0, parent.key());
                }
                cbor::head(buf, 4, tokens.len() as u64);
                cbor::uints(buf, tokens);
                match extra {
                    Some(e) => buf.extend_from_slice(e),
                    None => buf.push(cbor::NULL),
                }
                let d: [u8; 32] = Sha256::digest(&buf[..]).into();
                if self.algorithm == Algorithm::Sha256Cbor {
                    Chain(d)
                } else {
                    Chain::from_key(Chain(d).key())
                }
            }
            Algorithm::Xxh3 => {
                buf.extend_from_slice(&parent.key().to_le_bytes());
                for &t in tokens {
                    buf.extend_from_slice(&t.to_le_bytes());
                }
                if let Some(e) = extra {
                    buf.push(0xff);
                    buf.extend_from_slice(e);
                }
                Chain::from_key(xxhash_rust::xxh3::xxh3_64(buf))
            }
        }
    }

    /// Lazily chain over the full blocks of `tokens`, starting from `parent`
    /// (the root when `None`). Block `i` of the iterator uses `extras.get(first_index + i)`.
    pub fn chain_iter<'a>(
        &'a self,
        tokens: &'a [u32],
        parent: Option<Chain>,
        extras: &'a Extras<'a>,
        first_index: usize,
    ) -> ChainIter<'a> {
        ChainIter {
            tp: self,
            blocks: tokens.chunks_exact(self.block_size),
            chain: parent.unwrap_or(self.root),
            extras,
            i: first_index,
            buf: Vec::with_capacity(self.block_size * 5 + 48),
        }
    }

    /// Keys of every full block of a request.
    pub fn block_keys(&self, tokens: &[u32], extras: &Extras<'_>) -> Vec<BlockKey> {
        self.chain_iter(tokens, None, extras, 0).map(|c| c.key()).collect()
    }
}

pub struct ChainIter<'a> {
    tp: &'a TokenProcessor,
    blocks: std::slice::ChunksExact<'a, u32>,
    chain: Chain,
    extras: &'a Extras<'a>,
    i: usize,
    buf: Vec<u8>,
}

impl Iterator for ChainIter<'_> {
    type Item = Chain;
    fn next(&mut self) -> Option<Chain> {
        let block = self.blocks.next()?;
        self.chain = self.tp.hash_block(&self.chain, block, self.extras.get(self.i), &mut self.buf);
        self.i += 1;
        Some(self.chain)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.blocks.size_hint()
    }
}

/// Parse token ids from any integer width, rejecting values outside 0..2^32-1.
pub fn check_token(t: i128) -> Result<u32> {
    u32::try_from(t).map_err(|_| Error::invalid(format!("token id {t} is outside 0..4294967295")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn none_hash_matches_vllm_for_seed_42() {
        let tp = TokenProcessor::new(16, Some("42"), Algorithm::Sha256Cbor).unwrap();
        assert_eq!(hex(&tp.none_hash_bytes()), "9fa6eb003f14425eb9c8e6baacfbcaab26257357b829c7bfa74ffcc4f31c1780");
    }

    #[test]
    fn default_seed_matches_vllm() {
        let tp = TokenProcessor::new(16, None, Algorithm::Sha256Cbor).unwrap();
        assert_eq!(hex(&tp.none_hash_bytes()), "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0");
        let toks: Vec<u32> = (1..=32).collect();
        assert_eq!(tp.block_keys(&toks, &Extras::None), vec![8866452693264111234, 807986237951177663]);
    }

    #[test]
    fn block0_cbor_bytes_match_vllm() {
        let tp = TokenProcessor::new(16, Some("42"), Algorithm::Sha256Cbor).unwrap();
        let toks: Vec<u32> = (1..=16).collect();
        let mut buf = Vec::new();
        let c = tp.hash_block(&tp.root(), &toks, None, &mut buf);
        assert_eq!(
            hex(&buf),
            "8358209fa6eb003f14425eb9c8e6baacfbcaab26257357b829c7bfa74ffcc4f31c1780900102030405060708090a0b0c0d0e0f10f6"
        );
        assert_eq!(c.key(), 16300212363532267629);
    }

    #[test]
    fn sixty_four_bit_variant_matches_vllm_0_10() {
        let tp = TokenProcessor::new(16, Some("42"), Algorithm::Sha256Cbor64).unwrap();
        assert_eq!(tp.root().key(), 12056132650316601216);
        let toks: Vec<u32> = (1..=32).collect();
        assert_eq!(tp.block_keys(&toks, &Extras::None), vec![9442596223568401980, 10401597220457154048]);
    }

    #[test]
    fn partial_block_is_not_hashed_and_extras_separate_spaces() {
        let tp = TokenProcessor::new(16, None, Algorithm::Xxh3).unwrap();
        let toks: Vec<u32> = (0..40).collect();
        let plain = tp.block_keys(&toks, &Extras::None);
        assert_eq!(plain.len(), 2);
        let lora = tp.block_keys(&toks, &Extras::for_request(Some("a"), None));
        let salt = tp.block_keys(&toks, &Extras::for_request(None, Some("b")));
        assert_ne!(plain[0], lora[0]);
        assert_ne!(plain[0], salt[0]);
        assert_ne!(lora[0], salt[0]);
        // the salt only enters block 0, but the chain carries it on
        assert_ne!(plain[1], salt[1]);
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(TokenProcessor::new(0, None, Algorithm::Sha256Cbor).is_err());
        assert!(Algorithm::parse("md5").is_err());
        assert!(check_token(-1).is_err());
        assert!(check_token(1 << 32).is_err());
        assert_eq!(check_token(7).unwrap(), 7);
    }
}
