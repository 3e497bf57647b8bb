use super::*;

fn pods_of(ix: &BlockIndex, model: ModelId, key: BlockKey) -> Vec<(PodId, Tier)> {
    let mut out = SmallVec::new();
    ix.lookup_into(model, key, &mut out);
    let mut v: Vec<_> = out.iter().map(|&e| (entry_pod(e), entry_tier(e))).collect();
    v.sort();
    v
}

#[test]
fn add_remove_per_tier() {
    let ix = BlockIndex::new(100, 8, 4, false);
    ix.add(0, 1, 42, TIER_GPU, None);
    ix.add(0, 1, 42, TIER_CPU, None);
    ix.add(0, 2, 42, TIER_GPU, None);
    assert_eq!(pods_of(&ix, 0, 42), vec![(1, 0), (1, 1), (2, 0)]);
    assert!(ix.remove(0, 1, 42, TIER_GPU));
    assert!(!ix.remove(0, 1, 42, TIER_GPU));
    assert_eq!(pods_of(&ix, 0, 42), vec![(1, 1), (2, 0)]);
    assert!(ix.holds(0, 1, 42));
    assert_eq!(ix.stats().entries, 2);
}

#[test]
fn models_never_share_entries() {
    let ix = BlockIndex::new(100, 8, 4, false);
    ix.add(0, 1, 42, TIER_GPU, None);
    assert!(pods_of(&ix, 1, 42).is_empty());
    assert!(!ix.contains(1, 42));
}

#[test]
fn key_lru_evicts_least_recent() {
    let ix = BlockIndex::new(3, 8, 1, false);
    for k in 1..=3 {
        ix.add(0, 1, k, TIER_GPU, None);
    }
    let mut buf = SmallVec::new();
    ix.lookup_into(0, 1, &mut buf); // 1 becomes most recent
    ix.add(0, 1, 4, TIER_GPU, None); // evicts 2
    assert!(ix.contains(0, 1));
    assert!(!ix.contains(0, 2));
    assert!(ix.contains(0, 3) && ix.contains(0, 4));
    let st = ix.stats();
    assert_eq!((st.keys, st.entries, st.key_evictions), (3, 3, 1));
    assert_eq!(ix.pod_tier_counts(1)[0], 3);
}

#[test]
fn entry_lru_within_key() {
    let ix = BlockIndex::new(10, 2, 1, false);
    ix.add(0, 1, 7, TIER_GPU, None);
    ix.add(0, 2, 7, TIER_GPU, None);
    ix.add(0, 1, 7, TIER_GPU, None); // touch pod 1
    ix.add(0, 3, 7, TIER_GPU, None); // evicts pod 2
    assert_eq!(pods_of(&ix, 0, 7), vec![(1, 0), (3, 0)]);
    assert_eq!(ix.stats().entry_evictions, 1);
    assert_eq!(ix.pod_tier_counts(2)[0], 0);
    // pod 2's reverse set no longer names the key: clearing it removes nothing
    assert_eq!(ix.clear_pod(2), 0);
}

#[test]
fn clear_pod_only_touches_that_pod() {
    let ix = BlockIndex::new(1000, 8, 8, false);
    for k in 0..100 {
        ix.add(0, 1, k, TIER_GPU, None);
        ix.add(0, 2, k, TIER_CPU, None);
    }
    assert_eq!(ix.clear_pod(1), 100);
    assert_eq!(ix.stats().entries, 100);
    assert_eq!(pods_of(&ix, 0, 5), vec![(2, 1)]);
    assert_eq!(ix.clear_pod(2), 100);
    let st = ix.stats();
    assert_eq!((st.keys, st.entries), (0, 0));
}

#[test]
fn digests_are_kept_and_dropped_with_their_key() {
    let ix = BlockIndex::new(10, 8, 2, true);
    ix.add(0, 1, 9, TIER_GPU, Some(&[3; 24]));
    assert_eq!(ix.digest_hi(0, 9), Some([3; 24]));
    ix.remove(0, 1, 9, TIER_GPU);
    assert_eq!(ix.digest_hi(0, 9), None);
}

#[test]
fn a_node_stays_48_bytes_with_its_model() {
    assert!(std::mem::size_of::<Node>() <= 48);
}
