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
        let Some(ebs) = ev.engine_block_size() else {
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
#[path = "apply_tests.rs"]
mod tests;
