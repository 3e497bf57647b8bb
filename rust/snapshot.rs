//! Snapshots: the whole index as a versioned binary stream, and loading one into a fresh
//! indexer (warm restart, a new replica warmed from a peer).
//!
//! # Format (version 1; integers little-endian, `var` = LEB128, `str` = var length + UTF-8)
//!
//! ```text
//! "KVIXSNAP" | version u32 | header length u32 | header | xxh3-64 of header u64
//! header:  block_size var | algorithm str | seed u8 (0/1) [str] | NONE_HASH (var len + bytes)
//!          | keeps digests u8 | written at (unix ms) u64 | keys at start u64
//! sections, each: tag u8 | payload length var | payload
//!   SEQS   (1)  count var, then (pod var, seq u64): each pod's last fully applied batch,
//!                read before any key is copied (a batch applied meanwhile is replayed again)
//!   TIERS  (2)  count var, then str per tier id ("" = free): names of the KEYS that follow
//!   KEYS   (3)  count var, then per key, the next to be evicted first (CLOCK order from the
//!                hand; a loader restores them in that order):
//!                model var | key u64 | flags u8 (1 digest, 2 referenced) | [24 digest bytes]
//!                | n var | n packed entries var ((pod << 4) | tier), least recent first
//!   MODELS (4)  count var, then str per model id
//!   PODS   (5)  count var, then per pod id: name str | flags u8 (1 active) | models (var
//!                count, var ids) | dp rank u8 [i64] | last event ts u8 [f64] | hash matches
//!                var | hash mismatches var | bridge count var, then (engine hash u64, n var,
//!                n keys u64)
//! END (0xFF) | keys u64 | entries u64 | xxh3-64 of every byte before this checksum u64
//! ```
//!
//! Writing never stops the index: each KEYS section is one index shard, copied under that
//! shard's lock alone (`BlockIndex::copy_shard`) and encoded after it is released; bridges
//! are cloned under their pod's lock alone. Nothing else is held (lock order: `indexer.rs`).
//! Loading checks the header (a mismatch is refused before anything else), walks the
//! sections and verifies the checksum, decodes every record without applying it, and only
//! then applies: a refused snapshot leaves the indexer as it was.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::error::{Error, Result, SnapshotKind};
use crate::hashing::BlockKey;
use crate::index::{entry_pod, entry_tier, pack, Entries, ModelId, PodId, Tier, MAX_PODS, MAX_TIERS};
use crate::indexer::{Indexer, Inner};
use crate::pods::PodInfo;
use crate::tiers::{Budget, TierGuard};

pub const MAGIC: &[u8; 8] = b"KVIXSNAP";
pub const VERSION: u32 = 1;
/// Chunks are at least this large (one shard, the header and the tail are never split).
const CHUNK: usize = 1 << 20;
const MAX_KEYS_PER_BRIDGE: u64 = 1 << 12;
const MAX_ENTRIES_PER_KEY: u64 = 1 << 16;
const MAX_NAME: usize = 1024;

mod tag {
    pub const SEQS: u8 = 1;
    pub const TIERS: u8 = 2;
    pub const KEYS: u8 = 3;
    pub const MODELS: u8 = 4;
    pub const PODS: u8 = 5;
    pub const END: u8 = 0xFF;
}

fn err(kind: SnapshotKind, detail: impl Into<String>) -> Error {
    Error::snapshot(kind, detail)
}

// -- encoding ---------------------------------------------------------------------------------

fn var(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn text(out: &mut Vec<u8>, s: &str) {
    var(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn section(out: &mut Vec<u8>, tag: u8, payload: &[u8]) {
    out.push(tag);
    var(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

/// What a snapshot's header says about the index that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub block_size: u64,
    pub algorithm: String,
    pub seed: Option<String>,
    pub none_hash: Vec<u8>,
    pub keeps_digests: bool,
    pub written_unix_ms: u64,
    pub keys_at_start: u64,
}

fn header_of(inner: &Inner) -> Header {
    let tp = &inner.tp;
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    Header {
        version: VERSION,
        block_size: tp.block_size() as u64,
        algorithm: tp.algorithm().name().to_string(),
        seed: tp.seed().map(str::to_owned),
        none_hash: tp.none_hash_bytes(),
        keeps_digests: tp.algorithm().chains_on_digest(),
        written_unix_ms: ms,
        keys_at_start: inner.index.stats().keys,
    }
}

fn encode_header(h: &Header) -> Vec<u8> {
    let mut body = Vec::new();
    var(&mut body, h.block_size);
    text(&mut body, &h.algorithm);
    body.push(h.seed.is_some() as u8);
    if let Some(s) = &h.seed {
        text(&mut body, s);
    }
    var(&mut body, h.none_hash.len() as u64);
    body.extend_from_slice(&h.none_hash);
    body.push(h.keeps_digests as u8);
    body.extend_from_slice(&h.written_unix_ms.to_le_bytes());
    body.extend_from_slice(&h.keys_at_start.to_le_bytes());
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&h.version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&xxh3_64(&body).to_le_bytes());
    out
}

/// One key as `BlockIndex::copy_shard` copies it.
pub struct KeyCopy {
    pub ikey: u64,
    pub model: ModelId,
    pub referenced: bool,
    pub digest: Option<[u8; 24]>,
    /// Packed entries, least recently touched first.
    pub entries: Entries,
}

impl KeyCopy {
    /// The block key (`ikey` with the model mixed out).
    pub fn key(&self) -> BlockKey {
        crate::index::model_key(self.model, self.ikey)
    }
}

#[derive(PartialEq, Eq)]
enum Stage {
    Start,
    Keys,
    Tail,
    Done,
}

/// The snapshot as an iterator of byte chunks (header and SEQS, then about 1 MiB of KEYS
/// sections per chunk, then MODELS, PODS and END). Each `next` copies what it encodes then.
pub struct SnapshotWriter {
    inner: Arc<Inner>,
    hasher: Xxh3,
    stage: Stage,
    shard: usize,
    tiers: Option<Vec<String>>,
    copy: Vec<KeyCopy>,
    scratch: Vec<u8>,
    /// Keys and entries written so far.
    pub keys: u64,
    pub entries: u64,
    /// Longest time one index shard's lock was held by this writer.
    pub max_lock_hold: Duration,
}

impl Indexer {
    /// Stream a snapshot of the index (see the module doc).
    pub fn snapshot(&self) -> SnapshotWriter {
        SnapshotWriter {
            inner: self.inner().clone(),
            hasher: Xxh3::new(),
            stage: Stage::Start,
            shard: 0,
            tiers: None,
            copy: Vec::new(),
            scratch: Vec::new(),
            keys: 0,
            entries: 0,
            max_lock_hold: Duration::ZERO,
        }
    }

    /// Load a snapshot into this indexer, which must hold no pod or model yet. On any error
    /// nothing was applied.
    pub fn load_snapshot(&self, data: &[u8]) -> Result<Loaded> {
        load(self.inner(), data)
    }

    /// Check a snapshot's header (the data may stop right after it) against this indexer.
    pub fn check_snapshot_header(&self, data: &[u8]) -> Result<Header> {
        let (h, _) = read_header(data)?;
        check_header(self.inner(), &h)?;
        Ok(h)
    }
}

impl SnapshotWriter {
    fn start(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&encode_header(&header_of(&self.inner)));
        let (pods, _) = self.inner.tables();
        let seqs: Vec<(usize, u64)> =
            pods.iter().enumerate().filter_map(|(i, p)| Some((i, p.applied_seq()?))).collect();
        let p = &mut self.scratch;
        p.clear();
        var(p, seqs.len() as u64);
        for (pod, seq) in seqs {
            var(p, pod as u64);
            p.extend_from_slice(&seq.to_le_bytes());
        }
        section(out, tag::SEQS, p);
    }

    /// Copy one shard under its lock (again if a tier slot was freed meanwhile), then encode.
    fn shard(&mut self, out: &mut Vec<u8>) {
        let (index, tiers) = (&self.inner.index, &self.inner.tiers);
        let mut snap = tiers.snapshot();
        for attempt in 0..3 {
            self.copy.clear();
            let t0 = Instant::now();
            index.copy_shard(self.shard, &mut self.copy);
            self.max_lock_hold = self.max_lock_hold.max(t0.elapsed());
            let now = tiers.snapshot();
            if now.generation == snap.generation || attempt == 2 {
                break;
            }
            snap = now;
        }
        self.shard += 1;
        if self.tiers.as_ref() != Some(&snap.names) {
            let p = &mut self.scratch;
            p.clear();
            var(p, snap.names.len() as u64);
            for n in &snap.names {
                text(p, n);
            }
            section(out, tag::TIERS, p);
            self.tiers = Some(snap.names);
        }
        if self.copy.is_empty() {
            return;
        }
        let p = &mut self.scratch;
        p.clear();
        var(p, self.copy.len() as u64);
        for k in &self.copy {
            var(p, k.model as u64);
            p.extend_from_slice(&k.key().to_le_bytes());
            p.push(k.digest.is_some() as u8 | (k.referenced as u8) << 1);
            if let Some(d) = &k.digest {
                p.extend_from_slice(d);
            }
            var(p, k.entries.len() as u64);
            for &e in &k.entries {
                var(p, e as u64);
            }
            self.entries += k.entries.len() as u64;
        }
        self.keys += self.copy.len() as u64;
        section(out, tag::KEYS, p);
    }

    fn tail(&mut self, out: &mut Vec<u8>) {
        let (pods, models) = self.inner.tables();
        let p = &mut self.scratch;
        p.clear();
        var(p, models.len() as u64);
        for m in &models {
            text(p, m);
        }
        section(out, tag::MODELS, p);
        p.clear();
        var(p, pods.len() as u64);
        for info in &pods {
            encode_pod(p, info);
        }
        section(out, tag::PODS, p);
    }
}

fn encode_pod(p: &mut Vec<u8>, info: &PodInfo) {
    text(p, &info.name);
    p.push(info.active.load(Relaxed) as u8);
    let models = info.models.lock().clone();
    var(p, models.len() as u64);
    for m in models {
        var(p, m as u64);
    }
    for v in [info.dp_rank().map(|r| r as u64), info.last_ts().map(f64::to_bits)] {
        p.push(v.is_some() as u8);
        if let Some(v) = v {
            p.extend_from_slice(&v.to_le_bytes());
        }
    }
    var(p, info.hash_matches.load(Relaxed));
    var(p, info.hash_mismatches.load(Relaxed));
    let bridge = info.bridge.lock().clone();
    var(p, bridge.len() as u64);
    for (h, keys) in &bridge {
        p.extend_from_slice(&h.to_le_bytes());
        var(p, keys.len() as u64);
        for k in keys {
            p.extend_from_slice(&k.to_le_bytes());
        }
    }
}

impl Iterator for SnapshotWriter {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            match self.stage {
                Stage::Start => {
                    self.start(&mut out);
                    self.stage = Stage::Keys;
                }
                Stage::Keys => {
                    while out.len() < CHUNK && self.shard < self.inner.index.num_shards() {
                        self.shard(&mut out);
                    }
                    if self.shard >= self.inner.index.num_shards() {
                        self.stage = Stage::Tail;
                    }
                }
                Stage::Tail => {
                    self.tail(&mut out);
                    out.push(tag::END);
                    out.extend_from_slice(&self.keys.to_le_bytes());
                    out.extend_from_slice(&self.entries.to_le_bytes());
                    self.hasher.update(&out);
                    out.extend_from_slice(&self.hasher.digest().to_le_bytes());
                    self.stage = Stage::Done;
                    return Some(out);
                }
                Stage::Done => return None,
            }
            if !out.is_empty() {
                self.hasher.update(&out);
                return Some(out);
            }
        }
    }
}

// -- decoding ---------------------------------------------------------------------------------

struct Rd<'a> {
    d: &'a [u8],
    p: usize,
    /// What running out of data means here (Truncated for the file, Corrupt in a section).
    short: SnapshotKind,
}

impl<'a> Rd<'a> {
    fn new(d: &'a [u8], short: SnapshotKind) -> Self {
        Rd { d, p: 0, short }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.d.len() - self.p < n {
            return Err(err(self.short, "the data ends early"));
        }
        self.p += n;
        Ok(&self.d[self.p - n..self.p])
    }
    fn u8(&mut self) -> Result<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn var(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(err(SnapshotKind::Corrupt, "a varint is too long"))
    }
    /// A count of items each at least `min` bytes long: never more than the bytes left.
    fn count(&mut self, min: usize) -> Result<usize> {
        let n = self.var()?;
        if n > ((self.d.len() - self.p) / min.max(1)) as u64 {
            return Err(err(self.short, format!("a count of {n} exceeds the data")));
        }
        Ok(n as usize)
    }
    fn bounded(&mut self, max: u64, what: &str) -> Result<u64> {
        let v = self.var()?;
        if v > max {
            return Err(err(SnapshotKind::Corrupt, format!("{what} {v} is out of range")));
        }
        Ok(v)
    }
    fn str(&mut self) -> Result<&'a str> {
        let n = self.count(1)?;
        std::str::from_utf8(self.take(n)?).map_err(|_| err(SnapshotKind::Corrupt, "a name is not UTF-8"))
    }
    fn done(&self) -> bool {
        self.p == self.d.len()
    }
}

fn read_header(data: &[u8]) -> Result<(Header, usize)> {
    let mut r = Rd::new(data, SnapshotKind::Truncated);
    if data.len() >= MAGIC.len() && &data[..MAGIC.len()] != MAGIC {
        return Err(err(SnapshotKind::Unsupported, "not a kvindex snapshot (bad magic)"));
    }
    r.take(MAGIC.len())?;
    let version = u32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(err(SnapshotKind::Unsupported, format!("format version {version}; this build reads {VERSION}")));
    }
    let len = u32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes")) as usize;
    let body = r.take(len)?;
    if xxh3_64(body) != r.u64()? {
        return Err(err(SnapshotKind::Corrupt, "header checksum mismatch"));
    }
    let mut h = Rd::new(body, SnapshotKind::Corrupt);
    let block_size = h.var()?;
    let algorithm = h.str()?.to_string();
    let seed = if h.u8()? != 0 { Some(h.str()?.to_string()) } else { None };
    let n = h.count(1)?;
    let none_hash = h.take(n)?.to_vec();
    let keeps_digests = h.u8()? != 0;
    let (written_unix_ms, keys_at_start) = (h.u64()?, h.u64()?);
    let header =
        Header { version, block_size, algorithm, seed, none_hash, keeps_digests, written_unix_ms, keys_at_start };
    Ok((header, r.p))
}

type Sections<'a> = Vec<(u8, &'a [u8])>;

/// The body's sections (tag, payload), checked against the END checksum.
fn walk(data: &[u8], start: usize) -> Result<(Sections<'_>, u64, u64)> {
    let mut r = Rd::new(data, SnapshotKind::Truncated);
    r.p = start;
    let mut out = Vec::new();
    loop {
        let t = r.u8()?;
        if t == tag::END {
            let (keys, entries) = (r.u64()?, r.u64()?);
            let at = r.p;
            if xxh3_64(&data[..at]) != r.u64()? {
                return Err(err(SnapshotKind::Corrupt, "checksum mismatch"));
            }
            if !r.done() {
                return Err(err(SnapshotKind::Corrupt, "bytes after the end"));
            }
            return Ok((out, keys, entries));
        }
        let n = r.var()?;
        if n > (data.len() - r.p) as u64 {
            return Err(err(SnapshotKind::Truncated, "the data ends early"));
        }
        out.push((t, r.take(n as usize)?));
    }
}

#[path = "snapshot_load.rs"]
mod load;
pub use load::Loaded;
use load::{check_header, load};

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod tests;
