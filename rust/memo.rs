//! Key memo: the read path's shortcut around SHA-256 for prefixes it has already hashed.
//!
//! Routing traffic repeats prefixes (system prompts, documents, earlier turns), and with
//! vLLM's `sha256_cbor` hashing is most of a score's cost. The memo maps a fast 128-bit
//! chain over the same input — `f_i = xxh3_128(f_{i-1} || tokens_i || extras_i)` — to the
//! block's full chain value, so a seen block costs one xxh3 and one lookup instead of a
//! SHA-256. A miss computes the real digest from the previous chain value and records it.
//! Keys are therefore always the real `sha256_cbor` keys (a 128-bit collision is the only way
//! to be wrong). Bounded: two generations per shard; when the current one fills, it becomes
//! the old one and the previous old one is dropped (entries used since survive by promotion).

use hashbrown::HashMap;
use parking_lot::Mutex;

use crate::hashing::{Chain, Extras, TokenProcessor};

struct Generations {
    cur: HashMap<u128, Chain>,
    old: HashMap<u128, Chain>,
}

pub struct KeyMemo {
    shards: Box<[Mutex<Generations>]>,
    per_shard: usize,
}

impl KeyMemo {
    /// At most about `capacity` blocks (two generations of `capacity / 2`). 0 disables it.
    pub fn new(capacity: usize) -> Option<Self> {
        if capacity == 0 {
            return None;
        }
        let n = 16usize;
        let per_shard = (capacity / 2 / n).max(1);
        let shards = (0..n).map(|_| Mutex::new(Generations { cur: HashMap::new(), old: HashMap::new() })).collect();
        Some(KeyMemo { shards, per_shard })
    }

    fn shard(&self, f: u128) -> &Mutex<Generations> {
        &self.shards[(f as usize) & (self.shards.len() - 1)]
    }

    fn get(&self, f: u128) -> Option<Chain> {
        let mut g = self.shard(f).lock();
        if let Some(c) = g.cur.get(&f) {
            return Some(*c);
        }
        let c = g.old.remove(&f)?;
        self.insert(&mut g, f, c);
        Some(c)
    }

    fn put(&self, f: u128, c: Chain) {
        let mut g = self.shard(f).lock();
        self.insert(&mut g, f, c);
    }

    fn insert(&self, g: &mut Generations, f: u128, c: Chain) {
        if g.cur.len() >= self.per_shard {
            g.old = std::mem::take(&mut g.cur);
        }
        g.cur.insert(f, c);
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let g = s.lock();
                g.cur.len() + g.old.len()
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lazily the chain values of `tokens`' full blocks, from the root, through the memo.
    pub fn chain_iter<'a>(&'a self, tp: &'a TokenProcessor, tokens: &'a [u32], extras: &'a Extras<'a>) -> MemoIter<'a> {
        let root = tp.root();
        MemoIter {
            memo: self,
            tp,
            blocks: tokens.chunks_exact(tp.block_size()),
            fast: xxhash_rust::xxh3::xxh3_128(&root.0),
            chain: root,
            extras,
            i: 0,
            buf: Vec::with_capacity(tp.block_size() * 5 + 48),
            fbuf: Vec::with_capacity(tp.block_size() * 4 + 32),
        }
    }
}

pub struct MemoIter<'a> {
    memo: &'a KeyMemo,
    tp: &'a TokenProcessor,
    blocks: std::slice::ChunksExact<'a, u32>,
    fast: u128,
    chain: Chain,
    extras: &'a Extras<'a>,
    i: usize,
    buf: Vec<u8>,
    fbuf: Vec<u8>,
}

impl Iterator for MemoIter<'_> {
    type Item = Chain;
    fn next(&mut self) -> Option<Chain> {
        let block = self.blocks.next()?;
        let extra = self.extras.get(self.i);
        self.i += 1;
        self.fbuf.clear();
        self.fbuf.extend_from_slice(&self.fast.to_le_bytes());
        for &t in block {
            self.fbuf.extend_from_slice(&t.to_le_bytes());
        }
        if let Some(e) = extra {
            self.fbuf.push(0xff);
            self.fbuf.extend_from_slice(e);
        }
        self.fast = xxhash_rust::xxh3::xxh3_128(&self.fbuf);
        self.chain = match self.memo.get(self.fast) {
            Some(c) => c,
            None => {
                let c = self.tp.hash_block(&self.chain, block, extra, &mut self.buf);
                self.memo.put(self.fast, c);
                c
            }
        };
        Some(self.chain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::Algorithm;

    #[test]
    fn memo_keys_equal_direct_keys_cold_and_warm() {
        let tp = TokenProcessor::new(16, Some("42"), Algorithm::Sha256Cbor).unwrap();
        let memo = KeyMemo::new(64).unwrap();
        let toks: Vec<u32> = (0..16 * 20).map(|i| i * 7 % 1000).collect();
        let extras = Extras::for_request(Some("lora"), Some("salt"));
        let direct = tp.block_keys(&toks, &extras);
        for _ in 0..3 {
            let via: Vec<u64> = memo.chain_iter(&tp, &toks, &extras).map(|c| c.key()).collect();
            assert_eq!(via, direct);
        }
        // a prompt sharing only the first blocks diverges exactly where it should
        let mut other = toks.clone();
        other[16 * 5] += 1;
        let via: Vec<u64> = memo.chain_iter(&tp, &other, &extras).map(|c| c.key()).collect();
        assert_eq!(via, tp.block_keys(&other, &extras));
        assert_eq!(via[..5], direct[..5]);
        assert_ne!(via[5], direct[5]);
        // bounded: two generations of capacity / 2
        assert!(memo.len() <= 64 + 16);
    }
}
