//! Property tests of what arrives from the network: random and mutated msgpack batches never
//! panic the decoder or `Indexer::apply`, and the index stays within its bounds; junk tier
//! names from some pods never stop another pod's known media.

use std::collections::HashMap;

use crate::events::decode_batch;
use crate::hashing::Extras;
use crate::index::{MAX_TIERS, TIER_CPU, TIER_GPU};
use crate::testutil::{batch, cleared, removed, stored, tokens};
use crate::tiers::BUILTIN_TIERS;
use crate::{Indexer, IndexerConfig};

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

const MEDIA: &[&str] = &["GPU", "cpu", "DISK", "x1", "x2", "x3", "x4", "x5", "x6", "junk", "", " "];

/// A random msgpack value, biased towards the shapes events use.
fn value(r: &mut Rng, out: &mut Vec<u8>, depth: u32) {
    match r.below(if depth > 3 { 9 } else { 12 }) {
        0 => out.push(0xc0),
        1 => out.push(r.below(128) as u8),
        2 => {
            out.push(0xcf);
            out.extend_from_slice(&r.next().to_be_bytes());
        }
        3 => {
            out.push(0xd3);
            out.extend_from_slice(&(r.next() as i64).to_be_bytes());
        }
        4 => out.push(0xe0 | r.below(32) as u8),
        5 => {
            out.push(0xcb);
            out.extend_from_slice(&f64::from_bits(r.next()).to_be_bytes());
        }
        6 => {
            let s = *r.pick(&["BlockStored", "BlockRemoved", "AllBlocksCleared", "type", "medium", "GPU"]);
            out.push(0xa0 | s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
        7 => {
            let n = r.below(40) as usize;
            out.extend_from_slice(&[0xc4, n as u8]);
            out.extend((0..n).map(|_| r.next() as u8));
        }
        8 => out.push(*r.pick(&[0xc1, 0xc2, 0xc3, 0xdc, 0xdd, 0xde, 0xdf, 0xd9, 0xc6, 0xff])),
        9 | 10 => {
            let n = r.below(6) as usize;
            out.push(0x90 | n as u8);
            (0..n).for_each(|_| value(r, out, depth + 1));
        }
        _ => {
            let n = r.below(4) as usize;
            out.push(0x80 | n as u8);
            (0..n).for_each(|_| {
                value(r, out, depth + 1);
                value(r, out, depth + 1);
            });
        }
    }
}

/// A well-formed event over a small key and token space, so that stores chain and collide.
fn event(r: &mut Rng) -> Vec<u8> {
    let t = tokens(64);
    let hashes: Vec<u64> = (0..r.below(4)).map(|_| r.below(12)).collect();
    let medium = (r.below(4) > 0).then(|| *r.pick(MEDIA));
    match r.below(10) {
        0..=5 => {
            let n = hashes.len().min(4);
            let parent = (r.below(2) == 0).then(|| r.below(12));
            let toks: &[u32] = if r.below(5) == 0 { &[] } else { &t[..16 * n] };
            stored(&hashes[..n], parent, toks, medium)
        }
        6..=8 => removed(&hashes, medium),
        _ => cleared(),
    }
}

fn mutate(r: &mut Rng, p: &mut Vec<u8>) {
    for _ in 0..=r.below(4) {
        let len = p.len() as u64;
        match r.below(6) {
            0 if len > 0 => p[r.below(len) as usize] ^= 1 << r.below(8),
            1 if len > 0 => p[r.below(len) as usize] = *r.pick(&[0x00, 0x7f, 0x80, 0xc0, 0xc1, 0xcf, 0xdd, 0xff]),
            2 => p.truncate(r.below(len + 1) as usize),
            3 => {
                let at = r.below(len + 1) as usize;
                let mut v = Vec::new();
                value(r, &mut v, 0);
                p.splice(at..at, v);
            }
            4 if len > 0 => {
                let at = r.below(len) as usize;
                p.drain(at..(at + r.below(9) as usize).min(p.len()));
            }
            _ => {
                let at = r.below(len + 1) as usize;
                p.splice(at..at, [0xdd, 0xff, 0xff, 0xff, 0xff]);
            }
        }
    }
}

fn payload(r: &mut Rng) -> Vec<u8> {
    let events: Vec<Vec<u8>> = (0..r.below(5)).map(|_| event(r)).collect();
    let mut p = batch(&events);
    match r.below(4) {
        0 => {}
        1 => {
            p.clear();
            value(r, &mut p, 0);
        }
        _ => mutate(r, &mut p),
    }
    p
}

#[test]
fn random_payloads_never_panic_and_keep_the_bounds() {
    let (max_keys, max_per_key) = (48, 3);
    let cfg = IndexerConfig { shards: 1, max_keys, max_pods_per_key: max_per_key, ..Default::default() };
    let ix = Indexer::new(cfg).unwrap();
    let pods = ["a", "b", "c", "d", "e"];
    let keys: Vec<u64> = ix.token_processor().block_keys(&tokens(64), &Extras::None);
    // KVINDEX_PROPTEST_CASES / KVINDEX_PROPTEST_SEED run it longer or elsewhere
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let mut r = Rng(env("KVINDEX_PROPTEST_SEED", 0x9E37_79B9_7F4A_7C15) | 1);
    for case in 0..env("KVINDEX_PROPTEST_CASES", 4000) as u32 {
        let p = payload(&mut r);
        let _ = decode_batch(&p);
        let pod = *r.pick(&pods);
        ix.apply(pod, "m", Some(case as u64), &p).unwrap();
        if case % 50 == 0 {
            ix.inner().index.check(); // the shard layout's invariants (index_shard.rs)
            let st = ix.stats().index;
            assert!(st.keys <= max_keys as u64, "case {case}: {st:?}");
            assert!(st.entries <= (max_keys * max_per_key) as u64, "case {case}: {st:?}");
            for held in ix.lookup("m", &keys, None).iter().chain(&ix.lookup("m", &(0..12).collect::<Vec<_>>(), None)) {
                assert!(held.len() <= max_per_key, "case {case}: {held:?}");
            }
            let _ = ix.score_tokens("m", &tokens(64), &Extras::None, None);
            assert!(ix.tier_names().len() <= MAX_TIERS);
            for s in ix.pod_states() {
                let custom = s.blocks_by_tier.iter().filter(|(t, n)| *n > 0 && !BUILTIN_TIERS.contains(&t.as_str()));
                assert!(custom.count() <= ix.config().max_tiers_per_pod, "case {case}: {s:?}");
            }
        }
    }
    let c: HashMap<_, _> = ix.counters().into_iter().collect();
    assert!(c["batches_applied"] > 0 && c["batch_decode_errors"] > 0 && c["blocks_stored"] > 0, "{c:?}");
}

#[test]
fn junk_from_some_pods_never_stops_a_known_medium_of_another() {
    let ix = Indexer::new(IndexerConfig { shards: 1, ..Default::default() }).unwrap();
    let t = tokens(32);
    let k = ix.token_processor().block_keys(&t, &Extras::None);
    let refused = |ix: &Indexer| ix.counters().into_iter().find(|(n, _)| *n == "tiers_refused").unwrap().1;
    // many junk pods, each at its limit, with live entries in every junk tier
    for p in 0..8 {
        for j in 0..8 {
            let junk = batch(&[stored(&k[..1], None, &t[..16], Some(&format!("J{p}-{j}")))]);
            ix.apply(&format!("junk{p}"), "m", None, &junk).unwrap();
        }
    }
    assert!(refused(&ix) > 0);
    for medium in ["DISK", "gpu", "cpu", "fs", "OBJ", "STORAGE", "CXL"] {
        let r = ix.apply("b", "m", None, &batch(&[stored(&k, None, &t, Some(medium))])).unwrap();
        assert_eq!((r.events, r.stored_blocks, r.decode_errors), (1, 2, 0), "{medium}");
    }
    let best = &ix.score_tokens("m", &t, &Extras::None, Some(&["b"])).scores[0];
    assert_eq!((best.matched_blocks, best.score), (2, 2.0));
    let b = ix.pod_state("b").unwrap();
    assert_eq!((b.blocks_by_tier.len(), b.tiers_refused), (7, 0));
    assert_eq!(b.blocks_by_tier[TIER_GPU as usize], ("GPU".to_string(), 2));
    assert_eq!(b.blocks_by_tier[TIER_CPU as usize], ("CPU".to_string(), 2));
    // once the junk pods are cleared, their slots are reclaimed for new names
    for p in 0..8 {
        ix.clear_pod(&format!("junk{p}")).unwrap();
    }
    assert!(ix.flush(None));
    let before = ix.tier_names().len();
    let r = ix.apply("c", "m", None, &batch(&[stored(&k, None, &t, Some("LocalDiskBackend"))])).unwrap();
    assert_eq!(r.stored_blocks, 2);
    let names = ix.tier_names();
    assert!(names.len() < before && names.contains(&"LOCALDISKBACKEND".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with('J')));
    // a removal naming a tier nobody registered removes nothing and registers nothing
    let r = ix.apply("c", "m", None, &batch(&[removed(&k, Some("never"))])).unwrap();
    assert_eq!((r.events, r.removed_blocks), (1, 0));
    assert!(!ix.tier_names().contains(&"NEVER".to_string()));
    assert_eq!(
        ix.score_tokens("m", &t, &Extras::None, Some(&["c"])).scores[0].tier_blocks,
        [("LOCALDISKBACKEND".to_string(), 2)]
    );
}
