//! Loading a snapshot (`snapshot.rs`): check, decode everything into staging, then apply.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

use smallvec::SmallVec;

use super::{entry_pod, entry_tier, pack, Budget, Error, Inner, ModelId, PodId, Result, SnapshotKind, Tier};
use super::{err, header_of, read_header, tag, walk, Header, Rd, MAX_ENTRIES_PER_KEY, MAX_KEYS_PER_BRIDGE, MAX_NAME};
use super::{TierGuard, MAX_PODS, MAX_TIERS};

/// What a load restored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub keys: u64,
    pub entries: u64,
    pub pods: u64,
    pub models: u64,
    pub bridge_entries: u64,
    /// Entries whose tier this index refused (`max_tiers_per_pod` smaller than the writer's).
    pub dropped_entries: u64,
}

struct PodRec<'a> {
    name: &'a str,
    active: bool,
    models: Vec<u32>,
    dp_rank: Option<i64>,
    last_ts: Option<f64>,
    matches: u64,
    mismatches: u64,
    /// The bridge records, still encoded (count, then entries).
    bridge: &'a [u8],
}

/// Everything but the keys, decoded; the keys checked.
struct Staged<'a> {
    models: Vec<&'a str>,
    pods: Vec<PodRec<'a>>,
    seqs: Vec<(usize, u64)>,
}

fn one<'a>(sections: &[(u8, &'a [u8])], t: u8, what: &str) -> Result<&'a [u8]> {
    let mut found = sections.iter().filter(|(x, _)| *x == t);
    match (found.next(), found.next()) {
        (Some((_, p)), None) => Ok(p),
        _ => Err(err(SnapshotKind::Corrupt, format!("expected one {what} section"))),
    }
}

fn name<'a>(r: &mut Rd<'a>, what: &str) -> Result<&'a str> {
    let s = r.str()?;
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(err(SnapshotKind::Corrupt, format!("{what} name of {} bytes", s.len())));
    }
    Ok(s)
}

fn describe(block_size: u64, algorithm: &str, seed: Option<&str>) -> String {
    format!("block_size={block_size}, hash_algo={algorithm}, hash_seed={}", seed.unwrap_or("(unset)"))
}

pub(super) fn check_header(inner: &Inner, h: &Header) -> Result<()> {
    let ours = header_of(inner);
    let same = h.block_size == ours.block_size
        && h.algorithm == ours.algorithm
        && h.none_hash == ours.none_hash
        && h.keeps_digests == ours.keeps_digests;
    if same {
        return Ok(());
    }
    Err(err(
        SnapshotKind::Mismatch,
        format!(
            "it was written by an index with {}, this one has {}",
            describe(h.block_size, &h.algorithm, h.seed.as_deref()),
            describe(ours.block_size, &ours.algorithm, ours.seed.as_deref())
        ),
    ))
}

fn finished(r: &Rd<'_>) -> Result<()> {
    if !r.done() {
        return Err(err(SnapshotKind::Corrupt, "a section has trailing bytes"));
    }
    Ok(())
}

/// An id that must be below `n`.
fn below(r: &mut Rd<'_>, n: usize, what: &str) -> Result<u64> {
    let v = r.var()?;
    if v >= n as u64 {
        return Err(err(SnapshotKind::Corrupt, format!("{what} {v} is out of range")));
    }
    Ok(v)
}

fn opt_u64(r: &mut Rd<'_>) -> Result<Option<u64>> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(r.u64()?)),
        _ => Err(err(SnapshotKind::Corrupt, "bad option flag")),
    }
}

fn stage<'a>(sections: &[(u8, &'a [u8])]) -> Result<Staged<'a>> {
    let mut r = Rd::new(one(sections, tag::MODELS, "MODELS")?, SnapshotKind::Corrupt);
    let models = (0..r.count(1)?).map(|_| name(&mut r, "model")).collect::<Result<Vec<_>>>()?;
    finished(&r)?;
    let mut r = Rd::new(one(sections, tag::PODS, "PODS")?, SnapshotKind::Corrupt);
    let n = r.count(1)?;
    if n as u64 > MAX_PODS as u64 {
        return Err(err(SnapshotKind::Corrupt, "too many pods"));
    }
    let mut pods = Vec::with_capacity(n);
    for _ in 0..n {
        let name = name(&mut r, "pod")?;
        let active = r.u8()? & 1 != 0;
        let pod_models = (0..r.count(1)?)
            .map(|_| below(&mut r, models.len(), "model id").map(|m| m as u32))
            .collect::<Result<Vec<_>>>()?;
        let dp_rank = opt_u64(&mut r)?.map(|v| v as i64);
        let last_ts = opt_u64(&mut r)?.map(f64::from_bits);
        let (matches, mismatches) = (r.var()?, r.var()?);
        let start = r.p;
        for _ in 0..r.count(10)? {
            r.u64()?;
            let k = r.bounded(MAX_KEYS_PER_BRIDGE, "bridge key count")?;
            r.take(k as usize * 8)?;
        }
        let bridge = &r.d[start..r.p];
        pods.push(PodRec { name, active, models: pod_models, dp_rank, last_ts, matches, mismatches, bridge });
    }
    finished(&r)?;
    let mut r = Rd::new(one(sections, tag::SEQS, "SEQS")?, SnapshotKind::Corrupt);
    let seqs = (0..r.count(9)?)
        .map(|_| Ok((below(&mut r, pods.len(), "pod id")? as usize, r.u64()?)))
        .collect::<Result<Vec<_>>>()?;
    finished(&r)?;
    // the keys: checked here, decoded again when applied
    let mut named = 0u32;
    for &(t, payload) in sections {
        let mut r = Rd::new(payload, SnapshotKind::Corrupt);
        match t {
            tag::TIERS => {
                let n = r.count(1)?;
                if n > MAX_TIERS {
                    return Err(err(SnapshotKind::Corrupt, "too many tiers"));
                }
                named = (0..n).try_fold(0u32, |m, i| Ok::<_, Error>(m | ((!r.str()?.is_empty() as u32) << i)))?;
            }
            tag::KEYS => {
                for _ in 0..r.count(11)? {
                    key(&mut r, models.len(), pods.len(), named, &mut |_, _, _, _, _| {})?;
                }
            }
            _ => continue,
        }
        finished(&r)?;
    }
    Ok(Staged { models, pods, seqs })
}

type KeyFn<'f> = dyn FnMut(u32, u64, Option<&[u8; 24]>, &[u32], bool) + 'f;

/// Decode (and check) one key record; hand it to `sink`.
fn key(r: &mut Rd<'_>, models: usize, pods: usize, named: u32, sink: &mut KeyFn<'_>) -> Result<()> {
    let model = below(r, models, "model id")? as u32;
    let k = r.u64()?;
    let flags = r.u8()?;
    let digest: Option<[u8; 24]> = match flags & 1 {
        0 => None,
        _ => Some(r.take(24)?.try_into().expect("24 bytes")),
    };
    let n = r.bounded(MAX_ENTRIES_PER_KEY, "entries per key")?;
    let mut entries: SmallVec<[u32; 8]> = SmallVec::new();
    for _ in 0..n {
        let e = r.bounded(u32::MAX as u64, "entry")? as u32;
        if entry_pod(e) as usize >= pods || named & (1 << entry_tier(e)) == 0 {
            return Err(err(SnapshotKind::Corrupt, format!("entry {e:#x} names no pod or tier")));
        }
        entries.push(e);
    }
    if entries.is_empty() {
        return Err(err(SnapshotKind::Corrupt, "a key without entries"));
    }
    sink(model, k, digest.as_ref(), &entries, flags & 2 != 0);
    Ok(())
}

fn fresh(inner: &Inner) -> Result<()> {
    let (pods, models) = inner.tables();
    if !pods.is_empty() || !models.is_empty() {
        return Err(err(SnapshotKind::NotEmpty, "the index already holds pods or models; load into a fresh one"));
    }
    Ok(())
}

pub(super) fn load(inner: &Inner, data: &[u8]) -> Result<Loaded> {
    fresh(inner)?;
    let (header, start) = read_header(data)?;
    check_header(inner, &header)?;
    let (sections, keys, entries) = walk(data, start)?;
    let staged = stage(&sections)?;
    fresh(inner)?;
    Ok(apply(inner, &sections, &staged, keys, entries))
}

/// Apply checked data: cannot fail (a tier this index refuses drops its entries, counted).
fn apply(inner: &Inner, sections: &[(u8, &[u8])], st: &Staged<'_>, keys: u64, entries: u64) -> Loaded {
    let models: Vec<ModelId> = st.models.iter().map(|m| inner.model_id(m)).collect();
    let mut pods: Vec<PodId> = Vec::with_capacity(st.pods.len());
    let mut out =
        Loaded { keys, entries, pods: st.pods.len() as u64, models: models.len() as u64, ..Default::default() };
    for p in &st.pods {
        let id = inner.pod_id(p.name).expect("names were checked and the pod table was empty");
        let info = inner.info(id);
        for &m in &p.models {
            info.note_model(models[m as usize]);
        }
        if let Some(r) = p.dp_rank {
            info.set_dp_rank(r);
        }
        if let Some(ts) = p.last_ts {
            info.set_ts(ts);
        }
        info.hash_matches.store(p.matches, Relaxed);
        info.hash_mismatches.store(p.mismatches, Relaxed);
        let mut r = Rd::new(p.bridge, SnapshotKind::Corrupt);
        let mut bridge = info.bridge.lock();
        for _ in 0..r.var().unwrap_or(0) {
            let (Ok(h), Ok(n)) = (r.u64(), r.var()) else { break };
            let keys: SmallVec<[u64; 2]> = (0..n).filter_map(|_| r.u64().ok()).collect();
            bridge.insert(h, keys);
        }
        out.bridge_entries += bridge.len() as u64;
        drop(bridge);
        info.active.store(p.active, Relaxed);
        pods.push(id);
    }
    for &(pod, seq) in &st.seqs {
        let info = inner.info(pods[pod]);
        info.set_seq(seq);
        info.set_applied(Some(seq));
    }
    let mut names: Vec<String> = Vec::new();
    let mut tiers: HashMap<(usize, u8), Option<Tier>> = HashMap::new();
    let mut guards: Vec<TierGuard<'_>> = Vec::new();
    let mut mapped: SmallVec<[u32; 8]> = SmallVec::new();
    for &(t, payload) in sections {
        let mut r = Rd::new(payload, SnapshotKind::Corrupt);
        match t {
            tag::TIERS => {
                names = (0..r.var().unwrap_or(0)).filter_map(|_| r.str().ok().map(str::to_owned)).collect();
                tiers.clear();
            }
            tag::KEYS => {
                let n = r.var().unwrap_or(0);
                let mut sink = |m: u32, k: u64, d: Option<&[u8; 24]>, es: &[u32], referenced: bool| {
                    mapped.clear();
                    for &e in es {
                        let (p, tier) = (entry_pod(e) as usize, entry_tier(e));
                        let got = *tiers.entry((p, tier)).or_insert_with(|| {
                            let info = inner.info(pods[p]);
                            let name = names.get(tier as usize).map(String::as_str);
                            let g = inner.store_tier(pods[p], &info, name, &mut Budget::default()).ok()?;
                            let t = g.tier();
                            guards.push(g);
                            Some(t)
                        });
                        match got {
                            Some(t) => mapped.push(pack(pods[p], t)),
                            None => out.dropped_entries += 1,
                        }
                    }
                    if !mapped.is_empty() {
                        inner.index.restore(models[m as usize], k, d, &mapped, referenced);
                    }
                };
                for _ in 0..n {
                    let checked = key(&mut r, st.models.len(), st.pods.len(), u32::MAX, &mut sink);
                    debug_assert!(checked.is_ok());
                }
            }
            _ => {}
        }
    }
    drop(guards);
    out.entries -= out.dropped_entries.min(out.entries);
    out
}
