//! Event application: one decoded batch at a time, on the pod's shard thread (or the caller's,
//! for `Indexer::apply`). Bad events are counted, never fatal to the batch; unknown parents
//! are counted and their blocks left unplaced, never guessed.

use std::sync::atomic::Ordering::Relaxed;

use smallvec::SmallVec;

use crate::bridge;
use crate::counters::C;
use crate::error::{DecodeKind, Error, Result};
use crate::events::{decode_batch, BlockRemoved, BlockStored, Event};
use crate::groups::{slot_name, GroupSpec, Kind, GROUP_SEP, MAX_GROUPS};
use crate::hashing::{cbor, BlockKey, Extras};
use crate::index::{ModelId, PodId};
use crate::indexer::Inner;
use crate::pods::PodInfo;
use crate::tiers::{Budget, TierGuard};

/// The KV-cache group of an event (none: group 0).
fn group_of(idx: Option<i64>) -> Result<u8> {
    match idx {
        None => Ok(0),
        Some(g) if (0..MAX_GROUPS as i64).contains(&g) => Ok(g as u8),
        Some(g) => Err(Error::decode(DecodeKind::Tier, format!("group_idx {g} is not in 0..{MAX_GROUPS}"))),
    }
}

/// The slot name of (`medium`, `group`); `None` for GPU in group 0 (the fixed slot).
fn slot_of(medium: Option<&str>, group: u8) -> Result<Option<String>> {
    if medium.is_some_and(|m| m.contains(GROUP_SEP)) {
        return Err(Error::decode(DecodeKind::Tier, format!("a medium never contains {GROUP_SEP:?}")));
    }
    Ok(match (medium, group) {
        (None, 0) => None,
        (Some(m), 0) => Some(m.to_string()),
        (m, g) => Some(slot_name(m.unwrap_or("GPU").trim(), g)),
    })
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApplyResult {
    pub events: u64,
    pub stored_blocks: u64,
    pub removed_blocks: u64,
    pub cleared: u64,
    pub decode_errors: u64,
    pub unknown_event_types: u64,
    pub unknown_parents: u64,
    pub dp_rank: Option<i64>,
}

/// The CBOR extra key `[value]` vLLM adds per block for a LoRA adapter.
fn lora_extra(name: Option<&str>, id: Option<i64>) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    cbor::head(&mut v, 4, 1);
    match (name, id) {
        (Some(n), _) if !n.is_empty() => cbor::text(&mut v, n),
        (_, Some(id)) if id > 0 => cbor::int(&mut v, id as i128),
        _ => return None,
    }
    Some(v)
}

/// The extra keys of a stored event's blocks, `ratio` kvindex blocks per engine block: explicit
/// per block (vLLM 0.17+, each engine block's keys on every kvindex block inside it), else the
/// LoRA name (0.14+) or id on every block. `expanded` holds the per-block copy when needed.
pub(crate) fn stored_extras<'a>(
    ev: &'a BlockStored,
    ratio: usize,
    expanded: &'a mut Vec<Option<Vec<u8>>>,
) -> Extras<'a> {
    match &ev.extra_keys {
        Some(per) if ratio == 1 => Extras::PerBlock(per),
        Some(per) => {
            *expanded = per.iter().flat_map(|e| std::iter::repeat_n(e.clone(), ratio)).collect();
            let expanded: &'a Vec<Option<Vec<u8>>> = expanded;
            Extras::PerBlock(expanded)
        }
        None => match lora_extra(ev.lora_name.as_deref(), ev.lora_id) {
            Some(v) => Extras::Request { first: Some(v.clone()), rest: Some(v) },
            None => Extras::None,
        },
    }
}

impl Inner {
    pub(crate) fn apply_batch(&self, pod: PodId, model: ModelId, seq: Option<u64>, payload: &[u8]) -> ApplyResult {
        let info = self.info(pod);
        if let Some(s) = seq {
            info.set_seq(s);
        }
        let mut res = ApplyResult::default();
        let batch = match decode_batch(payload) {
            Ok(b) => b,
            Err(_) => {
                self.counters.add(C::batch_decode_errors, 1);
                info.decode_errors.fetch_add(1, Relaxed);
                res.decode_errors = 1;
                info.set_applied(seq);
                return res;
            }
        };
        info.note_model(model);
        if batch.trailing_bytes {
            self.counters.add(C::batches_with_trailing_bytes, 1);
        }
        res.dp_rank = batch.dp_rank;
        if let Some(r) = batch.dp_rank {
            info.set_dp_rank(r);
        }
        info.set_ts(batch.ts);
        // the costly tier refreshes run at most once per batch
        let mut budget = Budget::default();
        for ev in batch.events {
            let outcome = match ev {
                Ok(Event::BlockStored(s)) => {
                    self.counters.add(C::events_block_stored, 1);
                    self.apply_stored(pod, model, &info, &s, &mut res, &mut budget)
                }
                Ok(Event::BlockRemoved(r)) => {
                    self.counters.add(C::events_block_removed, 1);
                    self.apply_removed(pod, model, &info, &r, &mut res)
                }
                Ok(Event::AllBlocksCleared) => {
                    self.counters.add(C::events_all_blocks_cleared, 1);
                    self.clear_pod(pod);
                    res.cleared += 1;
                    Ok(())
                }
                Ok(Event::Unknown(_)) => {
                    self.counters.add(C::events_unknown_type, 1);
                    info.unknown_types.fetch_add(1, Relaxed);
                    res.unknown_event_types += 1;
                    continue;
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => res.events += 1,
                Err(_) => {
                    self.counters.add(C::event_decode_errors, 1);
                    info.decode_errors.fetch_add(1, Relaxed);
                    res.decode_errors += 1;
                }
            }
        }
        info.batches.fetch_add(1, Relaxed);
        info.events.fetch_add(res.events, Relaxed);
        self.counters.add(C::batches_applied, 1);
        info.set_applied(seq);
        res
    }

    /// Drop every block of the pod (all tiers, all models) and its bridge. The pod still
    /// serves its models: `models` is kept (remove_pod resets it).
    pub(crate) fn clear_pod(&self, pod: PodId) {
        self.index.clear_pod(pod);
        let info = self.info(pod);
        info.bridge.lock().clear();
        // no entry left: no custom tier held (`tiers.rs` reclaims the slots when needed)
        info.tier_mask.store(0, Relaxed);
        // nor any group: the next stores teach them again (a restarted engine may serve
        // another model, whose groups must not linger with nothing in them)
        *info.groups.lock() = crate::groups::PodGroups::default();
        self.tiers.groups.forget(pod);
        self.counters.add(C::pods_cleared, 1);
    }

    /// Clear the pod and forget its state; its id stays reserved for its name.
    pub(crate) fn remove_pod(&self, pod: PodId) {
        self.clear_pod(pod);
        let info = self.info(pod);
        info.reset();
        info.active.store(false, Relaxed);
    }

    /// The slot of a store (its tier, and its KV-cache group: `groups.rs`), held until the
    /// event is applied. The group's spec is learnt once its slot is granted: a group refused
    /// for want of slots is left out of the pod's hits, not taken as holding nothing.
    fn stored_tier(&self, pod: PodId, info: &PodInfo, ev: &BlockStored, budget: &mut Budget) -> Result<TierGuard<'_>> {
        let group = group_of(ev.group_idx)?;
        let name = slot_of(ev.medium.as_deref(), group)?;
        let guard = self
            .store_tier(pod, info, name.as_deref(), budget)
            .map_err(|e| Error::decode(DecodeKind::Tier, e.to_string()))?;
        if ev.group_idx.is_some() {
            let bs = if ev.block_size > 0 { ev.block_size } else { self.tp.block_size() as u32 };
            let kind = Kind::from_event(ev.kv_cache_spec_kind.as_deref(), ev.kv_cache_spec_sliding_window);
            let mut groups = info.groups.lock();
            groups.unit = self.tp.block_size() as u32;
            if groups.learn(group, GroupSpec { kind, block_size: bs }) {
                self.tiers.groups.set(pod, &groups);
            }
        }
        Ok(guard)
    }

    fn apply_stored(
        &self,
        pod: PodId,
        model: ModelId,
        info: &PodInfo,
        ev: &BlockStored,
        res: &mut ApplyResult,
        budget: &mut Budget,
    ) -> Result<()> {
        let guard = self.stored_tier(pod, info, ev, budget)?;
        let tier = guard.tier();
        let n = ev.block_hashes.len();
        let mut bridge = info.bridge.lock();
        if ev.token_ids.is_empty() {
            // a token-less copy (e.g. CPU offload): place the blocks we already know
            for &h in &ev.block_hashes {
                match bridge::resolve(&self.index, model, &bridge, h) {
                    Some(keys) => {
                        for k in keys {
                            self.index.add(model, pod, k, tier, None);
                            res.stored_blocks += 1;
                        }
                    }
                    None => {
                        self.counters.add(C::unplaced_blocks, 1);
                        info.unknown_parents.fetch_add(1, Relaxed);
                        res.unknown_parents += 1;
                    }
                }
            }
            self.counters.add(C::blocks_stored, res.stored_blocks);
            return Ok(());
        }
        let bs = self.tp.block_size();
        let ebs = if ev.block_size > 0 {
            ev.block_size as usize
        } else if n > 0 && ev.token_ids.len().is_multiple_of(n) {
            ev.token_ids.len() / n
        } else {
            return Err(Error::decode(DecodeKind::BlockSize, "BlockStored without block_size"));
        };
        if ebs % bs != 0 {
            self.counters.add(C::block_size_mismatches, 1);
            return Err(Error::decode(
                DecodeKind::BlockSize,
                format!("engine block size {ebs} is not a multiple of {bs}"),
            ));
        }
        if ev.token_ids.len() != n * ebs {
            return Err(Error::decode(
                DecodeKind::BlockSize,
                format!("BlockStored carries {} tokens for {n} blocks of {ebs}", ev.token_ids.len()),
            ));
        }
        let ratio = ebs / bs;
        let parent = match bridge::parent_chain(&self.index, &self.tp, model, &bridge, ev.parent_block_hash) {
            // legacy publishers (llm-d-inference-sim) write "no parent" as 0; a block whose
            // engine hash really is 0 and is known still chains on it (vLLM stays exact)
            None if ev.parent_block_hash == Some(0) => {
                self.counters.add(C::root_zero_parent, 1);
                Some(self.tp.root())
            }
            p => p,
        };
        let Some(parent) = parent else {
            self.counters.add(C::unknown_parents, 1);
            self.counters.add(C::unplaced_blocks, (n * ratio) as u64);
            info.unknown_parents.fetch_add(1, Relaxed);
            res.unknown_parents += 1;
            return Ok(());
        };
        let mut expanded = Vec::new();
        let extras = stored_extras(ev, ratio, &mut expanded);
        let keep = self.tp.algorithm().chains_on_digest();
        let mut keys: SmallVec<[BlockKey; 16]> = SmallVec::with_capacity(n * ratio);
        for chain in self.tp.chain_iter(&ev.token_ids, Some(parent), &extras, 0) {
            let k = chain.key();
            let hi = chain.hi();
            self.index.add(model, pod, k, tier, keep.then_some(&hi));
            keys.push(k);
        }
        res.stored_blocks += keys.len() as u64;
        self.counters.add(C::blocks_stored, keys.len() as u64);
        let r = bridge::record(&mut bridge, &ev.block_hashes, &keys, ratio, self.cfg.max_bridge_per_pod);
        info.hash_matches.fetch_add(r.matches, Relaxed);
        info.hash_mismatches.fetch_add(r.mismatches, Relaxed);
        self.counters.add(C::hash_matches, r.matches);
        self.counters.add(C::hash_mismatches, r.mismatches);
        self.counters.add(C::bridge_full, r.full);
        Ok(())
    }

    fn apply_removed(
        &self,
        pod: PodId,
        model: ModelId,
        info: &PodInfo,
        ev: &BlockRemoved,
        res: &mut ApplyResult,
    ) -> Result<()> {
        // a tier never registered holds nothing to remove (and is not registered by this)
        let name = slot_of(ev.medium.as_deref(), group_of(ev.group_idx)?)?;
        let guard = match &name {
            None => TierGuard::fixed(crate::index::TIER_GPU),
            Some(m) => match self.tiers.find(m) {
                Ok(Some(g)) => g,
                Ok(None) => return Ok(()),
                Err(e) => return Err(Error::decode(DecodeKind::Tier, e.to_string())),
            },
        };
        let tier = guard.tier();
        let mut bridge = info.bridge.lock();
        for &h in &ev.block_hashes {
            res.removed_blocks += bridge::remove(&self.index, model, pod, tier, &mut bridge, h);
        }
        self.counters.add(C::blocks_removed, res.removed_blocks);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
}
