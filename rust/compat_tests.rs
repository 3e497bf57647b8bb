//! Publishers of vLLM's event contract other than vLLM itself (DESIGN §8): llm-d-inference-sim's
//! legacy shapes, where a zero `parent_block_hash` means "no parent".

use std::collections::HashMap;

use crate::hashing::Extras;
use crate::testutil::{batch, removed, stored, stored_map, tokens};
use crate::{Indexer, IndexerConfig};

type Stored = fn(&[u64], Option<u64>, &[u32], Option<&str>) -> Vec<u8>;

fn indexer() -> Indexer {
    Indexer::new(IndexerConfig { shards: 1, ..Default::default() }).unwrap()
}

fn counter(ix: &Indexer, name: &str) -> u64 {
    ix.counters().into_iter().collect::<HashMap<_, _>>()[name]
}

fn matched(ix: &Indexer, pod: &str, toks: &[u32]) -> u32 {
    let r = ix.score_tokens("m", toks, &Extras::None, None);
    r.scores.iter().find(|s| &*s.pod == pod).map_or(0, |s| s.matched_blocks)
}

/// Foreign (never ours) hashes, a zero root parent, children chained on foreign hashes and a
/// removal through the bridge, in one encoding.
fn zero_parent_is_a_root(enc: Stored) {
    let ix = indexer();
    let t = tokens(48);
    let r = ix.apply("sim", "m", Some(1), &batch(&[enc(&[0xa1, 0xa2], Some(0), &t[..32], Some("GPU"))])).unwrap();
    assert_eq!((r.stored_blocks, r.unknown_parents), (2, 0));
    assert_eq!((counter(&ix, "root_zero_parent"), counter(&ix, "unknown_parents")), (1, 0));
    assert_eq!(matched(&ix, "sim", &t), 2);
    let r = ix.apply("sim", "m", Some(2), &batch(&[enc(&[0xa3], Some(0xa2), &t[32..], Some("GPU"))])).unwrap();
    assert_eq!((r.stored_blocks, r.unknown_parents), (1, 0));
    assert_eq!(matched(&ix, "sim", &t), 3);
    let st = ix.pod_state("sim").unwrap();
    assert_eq!((st.hash_mismatches, st.bridge_entries, st.unknown_parents), (3, 3, 0));
    // the zero parent was a root: the keys are those of the prompt itself
    let keys = ix.token_processor().block_keys(&t, &Extras::None);
    assert_eq!(ix.lookup("m", &keys, None).iter().filter(|p| !p.is_empty()).count(), 3);
    let r = ix.apply("sim", "m", Some(3), &batch(&[removed(&[0xa2], Some("GPU"))])).unwrap();
    assert_eq!(r.removed_blocks, 1);
    assert_eq!(matched(&ix, "sim", &t), 1);
    assert_eq!(counter(&ix, "root_zero_parent"), 1);
}

#[test]
fn a_zero_parent_is_a_root_in_the_array_encoding() {
    zero_parent_is_a_root(stored);
}

#[test]
fn a_zero_parent_is_a_root_in_the_map_encoding() {
    zero_parent_is_a_root(stored_map);
}

#[test]
fn a_known_block_whose_engine_hash_is_zero_is_still_a_parent() {
    // vLLM's own behaviour stays exact: 0 is a real hash when the pod stored a block under it
    let ix = indexer();
    let t = tokens(32);
    ix.apply("p", "m", None, &batch(&[stored(&[0], None, &t[..16], None)])).unwrap();
    let r = ix.apply("p", "m", None, &batch(&[stored(&[7], Some(0), &t[16..], None)])).unwrap();
    assert_eq!((r.stored_blocks, r.unknown_parents), (1, 0));
    assert_eq!(counter(&ix, "root_zero_parent"), 0);
    assert_eq!(matched(&ix, "p", &t), 2);
}

#[test]
fn a_nil_parent_and_an_unknown_nonzero_parent_are_unchanged() {
    let ix = indexer();
    let t = tokens(32);
    let r = ix.apply("p", "m", None, &batch(&[stored_map(&[1], None, &t[..16], None)])).unwrap();
    assert_eq!((r.stored_blocks, r.unknown_parents), (1, 0));
    let r = ix.apply("p", "m", None, &batch(&[stored(&[2], Some(99), &t[16..], None)])).unwrap();
    assert_eq!((r.stored_blocks, r.unknown_parents), (0, 1));
    assert_eq!(counter(&ix, "root_zero_parent"), 0);
}
