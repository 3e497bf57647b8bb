use super::*;
use crate::hashing::{Algorithm, Extras};
use crate::index::TIER_GPU;
use crate::testutil::{batch, removed, stored};
use crate::{IndexerConfig, SnapshotKind};

fn cfg() -> IndexerConfig {
    IndexerConfig { shards: 1, max_keys: 64, ..Default::default() }
}

fn ix(c: IndexerConfig) -> Indexer {
    Indexer::new(c).unwrap()
}

fn bytes(ix: &Indexer) -> Vec<u8> {
    ix.snapshot().flatten().collect()
}

fn toks(seed: u32, n: u32) -> Vec<u32> {
    (0..n).map(|i| seed * 1000 + i).collect()
}

fn scores(ix: &Indexer, t: &[u32]) -> Vec<(String, u32, String)> {
    let r = ix.score_tokens("m", t, &Extras::None, None);
    r.scores.iter().map(|s| (s.pod.to_string(), s.matched_blocks, format!("{:.3}", s.score))).collect()
}

fn assert_empty(ix: &Indexer) {
    assert_eq!(ix.stats().index.keys, 0);
    assert!(ix.pod_states().is_empty());
    assert_eq!(ix.stats().models, 0);
}

/// Two pods: one publishing our keys (GPU, CPU and a custom tier), one foreign hashes (bridge).
fn populated() -> Indexer {
    let a = ix(cfg());
    let t = toks(1, 64);
    let keys = a.token_processor().block_keys(&t, &Extras::None);
    a.apply("p1", "m", Some(7), &batch(&[stored(&keys, None, &t, None)])).unwrap();
    a.apply("p1", "m", Some(8), &batch(&[stored(&keys[..2], None, &[], Some("CPU"))])).unwrap();
    a.apply("p1", "m", Some(9), &batch(&[stored(&keys[..1], None, &[], Some("nvme"))])).unwrap();
    let u = toks(2, 48);
    a.apply("p2", "m", Some(3), &batch(&[stored(&[11, 22, 33], None, &u, Some("GPU"))])).unwrap();
    a.apply("p2", "m", Some(4), &batch(&[stored(&[44], None, &t[..16], None)])).unwrap();
    a
}

#[test]
fn round_trip_keeps_scores_pods_and_bridges() {
    let a = populated();
    let data = bytes(&a);
    let b = ix(cfg());
    let got = b.load_snapshot(&data).unwrap();
    assert_eq!((got.pods, got.models, got.bridge_entries, got.dropped_entries), (2, 1, 4, 0));
    assert_eq!(got.keys, a.stats().index.keys);
    assert_eq!(got.entries, a.stats().index.entries);
    for t in [toks(1, 64), toks(2, 48), toks(1, 20), toks(3, 32)] {
        assert_eq!(scores(&a, &t), scores(&b, &t));
    }
    let (sa, sb) = (a.pod_states(), b.pod_states());
    for (x, y) in sa.iter().zip(&sb) {
        assert_eq!(
            (&x.pod, &x.models, &x.blocks_by_tier, x.last_seq),
            (&y.pod, &y.models, &y.blocks_by_tier, y.last_seq)
        );
        assert_eq!((x.dp_rank, x.bridge_entries, x.hashes_match()), (y.dp_rank, y.bridge_entries, y.hashes_match()));
    }
    assert_eq!(b.inner().info(0).applied_seq(), Some(9));
    // a child of a restored block chains on its digest; a foreign hash still resolves
    let t = toks(1, 80);
    let keys = b.token_processor().block_keys(&t, &Extras::None);
    let r = b.apply("p1", "m", Some(10), &batch(&[stored(&keys[4..], Some(keys[3]), &t[64..], None)])).unwrap();
    assert_eq!((r.unknown_parents, r.stored_blocks), (0, 1));
    assert_eq!(scores(&b, &t)[0].1, 5);
    let r = b.apply("p2", "m", Some(5), &batch(&[removed(&[22], Some("GPU"))])).unwrap();
    assert_eq!(r.removed_blocks, 1);
    let u = toks(2, 48);
    let r = b.apply("p2", "m", Some(6), &batch(&[stored(&[55], Some(33), &toks(2, 64)[48..], None)])).unwrap();
    assert_eq!(r.unknown_parents, 0);
    assert_eq!(scores(&b, &u)[0].1, 1);
}

#[test]
fn lru_order_survives_a_round_trip() {
    let c = IndexerConfig { shards: 1, max_keys: 100, algorithm: Algorithm::Xxh3, ..Default::default() };
    let a = ix(c.clone());
    for k in 0..100u64 {
        a.add_blocks(&format!("p{}", k % 3), "m", &[k], "GPU").unwrap();
    }
    a.add_blocks("p0", "m", &[5, 17], "CPU").unwrap(); // touched: most recent
    a.score_keys("m", &[40], None); // referenced: a second chance
    let b = ix(c);
    b.load_snapshot(&bytes(&a)).unwrap();
    for k in 1000..1060u64 {
        a.add_blocks("p1", "m", &[k], "GPU").unwrap();
        b.add_blocks("p1", "m", &[k], "GPU").unwrap();
    }
    let kept = |ix: &Indexer| (0..100u64).filter(|&k| ix.inner().index.contains(0, k)).collect::<Vec<_>>();
    let ka = kept(&a);
    assert!(ka.contains(&5) && ka.contains(&17) && ka.contains(&40) && !ka.contains(&0));
    assert_eq!(ka, kept(&b));
    assert_eq!(a.stats().index.keys, b.stats().index.keys);
}

#[test]
fn other_block_size_algorithm_or_seed_is_refused() {
    let data = bytes(&populated());
    for other in [
        IndexerConfig { block_size: 32, ..cfg() },
        IndexerConfig { algorithm: Algorithm::Xxh3, ..cfg() },
        IndexerConfig { hash_seed: Some("42".into()), ..cfg() },
    ] {
        let b = ix(other);
        let e = b.load_snapshot(&data).unwrap_err();
        assert!(matches!(e, Error::Snapshot { kind: SnapshotKind::Mismatch, .. }), "{e}");
        assert!(b.check_snapshot_header(&data[..100]).is_err());
        assert_empty(&b);
    }
    // the default seed spelled out is the same index
    let same = ix(IndexerConfig { hash_seed: Some(crate::hashing::DEFAULT_SEED.into()), ..cfg() });
    assert_eq!(same.check_snapshot_header(&data[..200]).unwrap().block_size, 16);
    let e = ix(cfg()).check_snapshot_header(b"not a snapshot at all").unwrap_err();
    assert!(matches!(e, Error::Snapshot { kind: SnapshotKind::Unsupported, .. }));
}

#[test]
fn truncated_or_flipped_data_is_refused_and_nothing_applied() {
    let data = bytes(&populated());
    let b = ix(cfg());
    for n in (0..data.len()).step_by(7).chain([data.len() - 1]) {
        let e = b.load_snapshot(&data[..n]).unwrap_err();
        assert!(matches!(e, Error::Snapshot { .. }), "prefix {n}: {e}");
        assert_empty(&b);
    }
    for i in (0..data.len()).step_by(5) {
        let mut bad = data.clone();
        bad[i] ^= 0x10;
        let e = b.load_snapshot(&bad).unwrap_err();
        assert!(matches!(e, Error::Snapshot { .. }), "flip at {i}: {e}");
        assert_empty(&b);
    }
    let mut longer = data.clone();
    longer.push(0);
    assert!(b.load_snapshot(&longer).is_err());
    // and the good data still loads; a second load is refused
    b.load_snapshot(&data).unwrap();
    let e = b.load_snapshot(&data).unwrap_err();
    assert!(matches!(e, Error::Snapshot { kind: SnapshotKind::NotEmpty, .. }));
}

#[test]
fn chunks_stream_shard_by_shard_and_an_empty_index_round_trips() {
    let big = ix(IndexerConfig { shards: 1, max_keys: 1 << 20, algorithm: Algorithm::Xxh3, ..Default::default() });
    let keys: Vec<u64> = (0..200_000).collect();
    big.add_blocks("p", "m", &keys, "GPU").unwrap();
    let mut w = big.snapshot();
    let chunks: Vec<Vec<u8>> = w.by_ref().collect();
    assert!(chunks.len() > 3, "{} chunks", chunks.len());
    assert!(w.max_lock_hold < Duration::from_secs(1));
    assert_eq!((w.keys, w.entries), (200_000, 200_000));
    let b = ix(IndexerConfig { shards: 1, max_keys: 1 << 20, algorithm: Algorithm::Xxh3, ..Default::default() });
    b.load_snapshot(&chunks.concat()).unwrap();
    assert_eq!(b.lookup("m", &[123_456], None)[0][0].1, b.tier_name(TIER_GPU));
    let empty = ix(cfg());
    let got = ix(cfg()).load_snapshot(&bytes(&empty)).unwrap();
    assert_eq!((got.keys, got.pods), (0, 0));
}
