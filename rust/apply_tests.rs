//! Unit tests of `apply.rs` (a child module: it sees the private items).

use std::collections::HashMap;

use crate::hashing::Extras;
use crate::index::{TIER_CPU, TIER_GPU};
use crate::testutil::{batch, cleared, removed, stored, tokens};
use crate::{Indexer, IndexerConfig};

fn indexer() -> Indexer {
    Indexer::new(IndexerConfig { shards: 1, ..Default::default() }).unwrap()
}

fn keys(ix: &Indexer, toks: &[u32]) -> Vec<u64> {
    ix.token_processor().block_keys(toks, &Extras::None)
}

fn counter(ix: &Indexer, name: &str) -> u64 {
    ix.counters().into_iter().collect::<HashMap<_, _>>()[name]
}

fn tiers(ix: &Indexer, pod: &str) -> (i64, i64) {
    let st = ix.pod_state(pod).unwrap();
    (st.blocks_by_tier[TIER_GPU as usize].1, st.blocks_by_tier[TIER_CPU as usize].1)
}

fn matched(ix: &Indexer, pod: &str, toks: &[u32]) -> u32 {
    let r = ix.score_tokens("m", toks, &Extras::None, None);
    r.scores.iter().find(|s| &*s.pod == pod).map_or(0, |s| s.matched_blocks)
}

#[test]
fn stored_blocks_chain_through_parents() {
    let ix = indexer();
    let t = tokens(48);
    let k = keys(&ix, &t);
    let r = ix.apply("p1", "m", Some(0), &batch(&[stored(&k[..2], None, &t[..32], Some("GPU"))])).unwrap();
    assert_eq!((r.events, r.stored_blocks), (1, 2));
    ix.apply("p1", "m", Some(1), &batch(&[stored(&k[2..], Some(k[1]), &t[32..], None)])).unwrap();
    let res = ix.score_tokens("m", &t, &Extras::None, None);
    assert_eq!((res.total_blocks, res.scores[0].matched_blocks), (3, 3));
    let st = ix.pod_state("p1").unwrap();
    assert_eq!((st.hash_matches, st.hash_mismatches, st.bridge_entries), (3, 0, 0));
    assert_eq!((st.last_seq, st.last_event_ts, st.dp_rank), (Some(1), Some(1.0), Some(0)));
    assert_eq!(st.models, vec![std::sync::Arc::from("m")]);
}

#[test]
fn an_unknown_parent_is_counted_and_never_guessed() {
    let ix = indexer();
    let t = tokens(32);
    let r = ix.apply("p", "m", None, &batch(&[stored(&[5, 6], Some(999), &t, None)])).unwrap();
    assert_eq!((r.events, r.unknown_parents, r.stored_blocks), (1, 1, 0));
    assert_eq!((counter(&ix, "unknown_parents"), counter(&ix, "unplaced_blocks")), (1, 2));
    assert_eq!(ix.pod_state("p").unwrap().unknown_parents, 1);
    assert_eq!(ix.stats().index.entries, 0);
    // neither as a chain root nor under the engine's hashes
    assert_eq!(matched(&ix, "p", &t), 0);
    assert_eq!(ix.lookup("m", &[5, 6], None), vec![vec![], vec![]]);
}

#[test]
fn a_parent_held_only_by_another_pod_still_places_the_child() {
    let ix = indexer();
    let t = tokens(32);
    let k = keys(&ix, &t);
    ix.apply("a", "m", None, &batch(&[stored(&k[..1], None, &t[..16], None)])).unwrap();
    let r = ix.apply("b", "m", None, &batch(&[stored(&k[1..], Some(k[0]), &t[16..], None)])).unwrap();
    assert_eq!((r.unknown_parents, r.stored_blocks), (0, 1));
    // b holds block 1 but not block 0: no prefix
    assert_eq!(matched(&ix, "b", &t), 0);
}

#[test]
fn gpu_and_cpu_copies_are_counted_per_tier() {
    let ix = indexer();
    let t = tokens(32);
    let k = keys(&ix, &t);
    ix.apply("p", "m", None, &batch(&[stored(&k, None, &t, Some("GPU"))])).unwrap();
    ix.apply("p", "m", None, &batch(&[stored(&k, None, &t, Some("cpu"))])).unwrap();
    assert_eq!(tiers(&ix, "p"), (2, 2));
    let best = &ix.score_tokens("m", &t, &Extras::None, None).scores[0];
    assert_eq!((best.matched_blocks, best.score), (2, 2.0)); // GPU weight wins per block
                                                             // removing the GPU copy leaves the CPU copy
    let r = ix.apply("p", "m", None, &batch(&[removed(&k, Some("GPU"))])).unwrap();
    assert_eq!(r.removed_blocks, 2);
    assert_eq!(tiers(&ix, "p"), (0, 2));
    let best = &ix.score_tokens("m", &t, &Extras::None, None).scores[0];
    assert_eq!(best.matched_blocks, 2);
    assert!((best.score - 1.6).abs() < 1e-9);
    assert_eq!(best.tier_blocks, vec![("CPU".to_string(), 2)]);
    // removing a copy that is not there removes nothing
    assert_eq!(ix.apply("p", "m", None, &batch(&[removed(&k, Some("GPU"))])).unwrap().removed_blocks, 0);
}

#[test]
fn token_less_stores_place_known_blocks_only() {
    let ix = indexer();
    let t = tokens(32);
    let k = keys(&ix, &t);
    ix.apply("p", "m", None, &batch(&[stored(&k[..1], None, &t[..16], None)])).unwrap();
    // a CPU offload of block 0 (known) and block 1 (never stored with tokens)
    let r = ix.apply("p", "m", None, &batch(&[stored(&k, None, &[], Some("CPU"))])).unwrap();
    assert_eq!((r.stored_blocks, r.unknown_parents), (1, 1));
    assert_eq!(tiers(&ix, "p"), (1, 1));
    assert_eq!(counter(&ix, "unplaced_blocks"), 1);
    // a pod may offload a block another pod computed: the key is known to the index
    let r = ix.apply("q", "m", None, &batch(&[stored(&k[..1], None, &[], Some("CPU"))])).unwrap();
    assert_eq!((r.stored_blocks, r.unknown_parents), (1, 0));
    assert_eq!(tiers(&ix, "q"), (0, 1));
}

#[test]
fn all_blocks_cleared_empties_the_pod_but_keeps_it() {
    let ix = indexer();
    let t = tokens(32);
    ix.apply("p", "m", None, &batch(&[stored(&[1, 2], None, &t, Some("GPU"))])).unwrap();
    ix.apply("p", "m", None, &batch(&[stored(&[1], None, &[], Some("CPU"))])).unwrap();
    ix.apply("other", "m", None, &batch(&[stored(&[1, 2], None, &t, None)])).unwrap();
    let r = ix.apply("p", "m", Some(9), &batch(&[cleared()])).unwrap();
    assert_eq!((r.events, r.cleared), (1, 1));
    let st = ix.pod_state("p").unwrap();
    assert_eq!(st.blocks_by_tier.iter().map(|(_, n)| n).sum::<i64>(), 0);
    assert_eq!((st.bridge_entries, st.last_seq), (0, Some(9)));
    assert_eq!(st.models.len(), 1);
    assert_eq!(counter(&ix, "pods_cleared"), 1);
    assert_eq!(matched(&ix, "p", &t), 0);
    assert_eq!(matched(&ix, "other", &t), 2);
    // with its bridge gone, removals by the old foreign hashes reach nothing
    assert_eq!(ix.apply("other", "m", None, &batch(&[removed(&[1], None)])).unwrap().removed_blocks, 1);
    assert_eq!(ix.apply("p", "m", None, &batch(&[removed(&[1], None)])).unwrap().removed_blocks, 0);
}

#[test]
fn clear_and_remove_pod_through_the_shards() {
    let ix = indexer();
    let t = tokens(32);
    let k = keys(&ix, &t);
    ix.submit("a", "m", Some(0), batch(&[stored(&k, None, &t, None)])).unwrap();
    ix.submit("b", "m", Some(0), batch(&[stored(&k, None, &t, None)])).unwrap();
    ix.clear_pod("a").unwrap();
    assert!(ix.flush(None));
    assert_eq!((matched(&ix, "a", &t), matched(&ix, "b", &t)), (0, 2));
    assert_eq!(ix.pod_state("a").unwrap().last_seq, Some(0)); // cleared, not forgotten
    ix.remove_pod("b").unwrap();
    assert!(ix.flush(None));
    assert!(ix.pod_state("b").is_none());
    let names: Vec<_> = ix.pod_states().into_iter().map(|s| s.pod.to_string()).collect();
    assert_eq!(names, vec!["a"]);
    assert_eq!(ix.stats().pods, 1);
    assert_eq!(matched(&ix, "b", &t), 0);
    // unknown pods are a no-op
    ix.remove_pod("nobody").unwrap();
    ix.clear_pod("nobody").unwrap();
}

#[test]
fn a_removed_pod_comes_back_fresh_under_its_old_id() {
    let ix = indexer();
    let t = tokens(16);
    ix.apply("a", "m", Some(4), &batch(&[stored(&[1], None, &t, None)])).unwrap();
    ix.apply("b", "m", None, &batch(&[stored(&[2], None, &t, None)])).unwrap();
    ix.remove_pod("a").unwrap();
    assert!(ix.flush(None));
    ix.apply("c", "m", None, &batch(&[])).unwrap();
    // ids are never reused: c did not take a's id, and a returns with no state
    ix.apply("a", "m", None, &batch(&[])).unwrap();
    let a = ix.pod_state("a").unwrap();
    assert_eq!((a.last_seq, a.hash_mismatches, a.bridge_entries, a.batches_applied), (None, 0, 0, 1));
    assert_eq!(ix.pod_name(0).as_ref(), "a");
    assert_eq!(ix.pod_name(2).as_ref(), "c");
    assert_eq!(matched(&ix, "a", &t), 0);
    assert_eq!(matched(&ix, "b", &t), 1);
}

#[test]
fn bad_events_are_counted_without_failing_the_batch() {
    let ix = indexer();
    let t = tokens(16);
    let too_few_tokens = stored(&[1, 2], None, &t, None); // 16 tokens for 2 blocks of 16
    let ok = stored(&[3], None, &t, None);
    let r = ix.apply("p", "m", None, &batch(&[too_few_tokens, ok])).unwrap();
    assert_eq!((r.events, r.decode_errors, r.stored_blocks), (1, 1, 1));
    let r = ix.apply("p", "m", None, b"\xc1").unwrap();
    assert_eq!(r.decode_errors, 1);
    assert_eq!((counter(&ix, "event_decode_errors"), counter(&ix, "batch_decode_errors")), (1, 1));
}
