//! Criterion benches of the core, the same cases as benches/test_core_bench.py runs through
//! Python (so the FFI cost shows). Numbers land in target/criterion and, via `make bench`,
//! in benches/out/criterion.txt; benches/report.py turns them into benches/out/REPORT.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvindex::hashing::{Algorithm, Extras, TokenProcessor};
use kvindex::indexer::{Indexer, IndexerConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};

const PODS: usize = 64;
const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.gen_range(0..128_000)).collect()
}

fn pod(i: usize) -> String {
    format!("10.0.{}.{}:8000", i / 256, i % 256)
}

/// An index holding `entries` (key, pod) entries over 64 pods: random keys held by 8 pods
/// each, plus the query prompt's blocks held in full by pod 0 and in part by pods 1..8.
fn populated(entries: usize, algorithm: Algorithm, query: &[u32], key_memo_blocks: usize) -> Indexer {
    let ix = Indexer::new(IndexerConfig {
        algorithm,
        max_keys: entries, // room for every key
        key_memo_blocks,
        ..Default::default()
    })
    .unwrap();
    let mut r = StdRng::seed_from_u64(7);
    let per_key = 8;
    let keys = entries / per_key;
    let mut batch: Vec<Vec<u64>> = vec![Vec::new(); PODS];
    for _ in 0..keys {
        let k: u64 = r.gen();
        let first = r.gen_range(0..PODS);
        for j in 0..per_key {
            batch[(first + j * 7) % PODS].push(k);
        }
    }
    for (i, keys) in batch.iter().enumerate() {
        ix.add_blocks(&pod(i), MODEL, keys, "GPU").unwrap();
    }
    let qk = ix.token_processor().block_keys(query, &Extras::None);
    ix.add_blocks(&pod(0), MODEL, &qk, "GPU").unwrap();
    for p in 1..8 {
        ix.add_blocks(&pod(p), MODEL, &qk[..qk.len() * p / 8], "GPU").unwrap();
    }
    ix
}

fn hashing(c: &mut Criterion) {
    let toks = tokens(8192, 1);
    let mut g = c.benchmark_group("hashing");
    g.throughput(Throughput::Elements((toks.len() / 16) as u64));
    for algo in Algorithm::ALL {
        let tp = TokenProcessor::new(16, None, algo).unwrap();
        g.bench_with_input(BenchmarkId::new("block_keys_8k", algo.name()), &toks, |b, t| {
            b.iter(|| black_box(tp.block_keys(t, &Extras::None)))
        });
    }
    g.finish();
}

fn index_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("index");
    let n = 100_000usize;
    g.throughput(Throughput::Elements(n as u64));
    let keys: Vec<u64> = {
        let mut r = StdRng::seed_from_u64(3);
        (0..n).map(|_| r.gen()).collect()
    };
    g.bench_function("add_remove_100k", |b| {
        let ix = Indexer::new(IndexerConfig { max_keys: 1 << 22, ..Default::default() }).unwrap();
        b.iter(|| {
            ix.add_blocks("10.0.0.1:8000", MODEL, &keys, "GPU").unwrap();
            ix.remove_blocks("10.0.0.1:8000", MODEL, &keys, "GPU").unwrap();
        })
    });
    g.finish();
}

fn scoring(c: &mut Criterion) {
    let mut g = c.benchmark_group("score");
    g.sample_size(30).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    let query = tokens(32_768, 11);
    for entries in [1_000_000usize, 10_000_000] {
        // sha256_cbor with the key memo (a prompt scored before: the steady state of routing
        // traffic), without it (every block hashed), and xxh3
        for (algo, memo, tag) in [
            (Algorithm::Sha256Cbor, 1 << 18, "sha256_cbor"),
            (Algorithm::Sha256Cbor, 0, "sha256_cbor-cold"),
            (Algorithm::Xxh3, 0, "xxh3"),
        ] {
            let ix = populated(entries, algo, &query, memo);
            for len in [1024usize, 8192, 32_768] {
                let q = &query[..len];
                let id = format!("{}tok/{}M/{}", len, entries / 1_000_000, tag);
                g.bench_function(BenchmarkId::from_parameter(id), |b| {
                    b.iter(|| black_box(ix.score_tokens(MODEL, q, &Extras::None, None)))
                });
            }
            let st = ix.stats().index;
            eprintln!(
                "memory: {} entries, {} keys, {} bytes used, {:.1} bytes/entry ({})",
                st.entries,
                st.keys,
                st.bytes_used,
                st.bytes_used as f64 / st.entries as f64,
                tag
            );
        }
    }
    g.finish();
}

criterion_group!(benches, hashing, index_ops, scoring);
criterion_main!(benches);
