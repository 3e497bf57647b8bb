//! Hybrid-attention pods through `Indexer::apply`: per-group entries and vLLM's hybrid hit.

use crate::hashing::Extras;
use crate::testutil::{batch, tokens};
use crate::{Indexer, IndexerConfig};

fn indexer() -> Indexer {
    Indexer::new(IndexerConfig { shards: 1, ..Default::default() }).unwrap()
}

fn text(b: &mut Vec<u8>, s: &str) {
    b.push(0xd9);
    b.push(s.len() as u8);
    b.extend_from_slice(s.as_bytes());
}

fn uint(b: &mut Vec<u8>, v: u64) {
    b.push(0xcf);
    b.extend_from_slice(&v.to_be_bytes());
}

fn hashes(b: &mut Vec<u8>, hs: &[u64]) {
    b.push(0xdd);
    b.extend_from_slice(&(hs.len() as u32).to_be_bytes());
    hs.iter().for_each(|&h| uint(b, h));
}

/// A map-form `BlockStored` of group `g` (spec `kind`, `window`), as vLLM >= 0.24 sends it.
fn stored(hs: &[u64], parent: Option<u64>, toks: &[u32], g: u8, kind: &str, window: Option<u64>) -> Vec<u8> {
    let mut b = vec![0x87 + u8::from(window.is_some())];
    text(&mut b, "type");
    text(&mut b, "BlockStored");
    text(&mut b, "block_hashes");
    hashes(&mut b, hs);
    text(&mut b, "parent_block_hash");
    match parent {
        Some(p) => uint(&mut b, p),
        None => b.push(0xc0),
    }
    text(&mut b, "token_ids");
    hashes(&mut b, &toks.iter().map(|&t| t as u64).collect::<Vec<_>>());
    text(&mut b, "block_size");
    b.push(0x10);
    text(&mut b, "group_idx");
    b.push(g);
    text(&mut b, "kv_cache_spec_kind");
    text(&mut b, kind);
    if let Some(w) = window {
        text(&mut b, "kv_cache_spec_sliding_window");
        uint(&mut b, w);
    }
    b
}

fn removed(hs: &[u64], g: u8) -> Vec<u8> {
    let mut b = vec![0x84];
    text(&mut b, "type");
    text(&mut b, "BlockRemoved");
    text(&mut b, "block_hashes");
    hashes(&mut b, hs);
    text(&mut b, "medium");
    text(&mut b, "GPU");
    text(&mut b, "group_idx");
    b.push(g);
    b
}

fn matched(ix: &Indexer, pod: &str, toks: &[u32]) -> u32 {
    let r = ix.score_tokens("m", toks, &Extras::None, None);
    r.scores.iter().find(|s| &*s.pod == pod).map_or(0, |s| s.matched_blocks)
}

const WINDOW: Option<u64> = Some(33); // two blocks of 16

/// gpt-oss's layout: group 0 full attention, group 1 sliding window.
fn both_groups(ix: &Indexer, pod: &str, toks: &[u32]) -> Vec<u64> {
    let k = ix.token_processor().block_keys(toks, &Extras::None);
    let full = stored(&k, None, toks, 0, "full_attention", None);
    let sliding = stored(&k, None, toks, 1, "sliding_window", WINDOW);
    ix.apply(pod, "m", None, &batch(&[full, sliding])).unwrap();
    k
}

#[test]
fn both_groups_give_the_full_hit() {
    let ix = indexer();
    let t = tokens(16 * 6);
    both_groups(&ix, "p", &t);
    assert_eq!(matched(&ix, "p", &t), 6);
    let st = ix.pod_state("p").unwrap();
    assert!(st.blocks_by_tier.contains(&("GPU".into(), 6)) && st.blocks_by_tier.contains(&("GPU#1".into(), 6)));
}

#[test]
fn a_sliding_removal_outside_the_window_leaves_the_hit() {
    let ix = indexer();
    let t = tokens(16 * 6);
    let k = both_groups(&ix, "p", &t);
    let r = ix.apply("p", "m", None, &batch(&[removed(&k[..4], 1)])).unwrap();
    assert_eq!(r.removed_blocks, 4);
    assert_eq!(matched(&ix, "p", &t), 6);
    // the full-attention copies are still there
    assert_eq!(ix.lookup("m", &k[..1], None)[0].len(), 1);
    // a removal inside the window shortens it to the last window the group still holds
    ix.apply("p", "m", None, &batch(&[removed(&k[5..], 1)])).unwrap();
    assert_eq!(matched(&ix, "p", &t), 0);
}

#[test]
fn a_full_attention_removal_shortens_the_hit() {
    let ix = indexer();
    let t = tokens(16 * 6);
    let k = both_groups(&ix, "p", &t);
    ix.apply("p", "m", None, &batch(&[removed(&k[3..4], 0)])).unwrap();
    assert_eq!(matched(&ix, "p", &t), 3);
}

#[test]
fn sliding_window_blocks_alone_are_no_hit() {
    let ix = indexer();
    let t = tokens(16 * 4);
    let k = ix.token_processor().block_keys(&t, &Extras::None);
    let full_spec = stored(&k[..0], None, &[], 0, "full_attention", None);
    let sliding = stored(&k, None, &t, 1, "sliding_window", WINDOW);
    ix.apply("p", "m", None, &batch(&[full_spec, sliding])).unwrap();
    assert_eq!(matched(&ix, "p", &t), 0);
    assert!(ix.score_tokens("m", &t, &Extras::None, None).scores.is_empty());
}

#[test]
fn events_without_groups_stay_a_single_group() {
    let ix = indexer();
    let t = tokens(16 * 3);
    let k = ix.token_processor().block_keys(&t, &Extras::None);
    ix.apply("p", "m", None, &batch(&[crate::testutil::stored(&k, None, &t, None)])).unwrap();
    ix.apply("p", "m", None, &batch(&[crate::testutil::removed(&k[1..2], Some("GPU"))])).unwrap();
    assert_eq!(matched(&ix, "p", &t), 1);
    assert!(ix.inner().tiers.groups.view().is_empty());
    assert_eq!(ix.tier_names(), ["GPU", "CPU"]);
}

#[test]
fn bad_groups_are_refused_and_counted() {
    let ix = indexer();
    let t = tokens(16);
    let k = ix.token_processor().block_keys(&t, &Extras::None);
    let r = ix.apply("p", "m", None, &batch(&[stored(&k, None, &t, 16, "full_attention", None)])).unwrap();
    assert_eq!((r.decode_errors, r.stored_blocks), (1, 0));
    // more groups than the pod's custom slots: the extra groups are refused, counted per pod
    let per_pod = ix.config().max_tiers_per_pod as u8;
    let evs: Vec<_> = (0..=per_pod + 1).map(|g| stored(&k, None, &t, g, "sliding_window", WINDOW)).collect();
    let r = ix.apply("p", "m", None, &batch(&evs)).unwrap();
    assert_eq!(r.decode_errors, 1);
    assert_eq!(ix.pod_state("p").unwrap().tiers_refused, 1);
    // the refused group is left out of the hit (the others still serve it)
    assert_eq!(ix.pod_state("p").unwrap().kv_cache_groups.len(), per_pod as usize + 1);
    assert_eq!(matched(&ix, "p", &t), 1);
}

#[test]
fn a_cleared_or_removed_pod_forgets_its_groups() {
    let ix = indexer();
    let t = tokens(32);
    both_groups(&ix, "p", &t);
    assert_eq!(ix.inner().tiers.groups.view().len(), 1);
    // a restarted engine serving a plain model: no stale sliding group left without blocks
    ix.apply("p", "m", None, &batch(&[crate::testutil::cleared()])).unwrap();
    assert!(ix.pod_state("p").unwrap().kv_cache_groups.is_empty());
    let k = ix.token_processor().block_keys(&t, &Extras::None);
    ix.apply("p", "m", None, &batch(&[stored(&k, None, &t, 0, "full_attention", None)])).unwrap();
    assert_eq!(matched(&ix, "p", &t), 2);
    both_groups(&ix, "p", &t);
    ix.remove_pod("p").unwrap();
    assert!(ix.flush(None));
    assert!(ix.inner().tiers.groups.view().is_empty());
}
