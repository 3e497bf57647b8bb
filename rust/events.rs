//! vLLM KV events (vLLM 0.10 -> 0.33): decoding of one msgpack batch
//! `[ts, [event, ...], data_parallel_rank?]`.
//!
//! Events are tagged unions, encoded as arrays `[tag, field...]` up to vLLM 0.23 and as maps
//! `{"type": tag, field: value}` from 0.24. Trailing defaulted fields may be missing, unknown
//! fields are ignored, and one bad event never loses the rest of its batch.
//!
//! SGLang's publisher (`sglang/srt/disaggregation/kv_events.py`) speaks the same contract: array
//! events up to 0.5.22, map events from 0.5.23. Its one field with no vLLM counterpart that
//! changes which blocks match is `cache_salt` (0.5.23, a string on the store): it becomes the
//! extra keys vLLM would have sent (see `salt_extras`), so a salted store is indexed under the
//! keys a request with that salt computes, and never under the unsalted ones.

use crate::error::{DecodeKind, Error, Result};
use crate::hashing::{check_token, Extras};
use crate::msgpack::{kind, Reader, Value};

/// An engine's block hash reduced to 64 bits (the value vLLM events carry by default).
pub type EngineHash = u64;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockStored {
    pub block_hashes: Vec<EngineHash>,
    pub parent_block_hash: Option<EngineHash>,
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    pub lora_id: Option<i64>,
    pub medium: Option<String>,
    pub lora_name: Option<String>,
    /// Per block: the canonical CBOR of its extra keys, or `None`.
    pub extra_keys: Option<Vec<Option<Vec<u8>>>>,
    /// Hybrid models (0.20+): the KV-cache group this store belongs to (nil: the only group).
    pub group_idx: Option<i64>,
    /// Hybrid models (0.22+): the group's KV-cache spec kind, as sent (a name, or an integer
    /// rendered in decimal), and its sliding window in tokens.
    pub kv_cache_spec_kind: Option<String>,
    pub kv_cache_spec_sliding_window: Option<i64>,
}

impl BlockStored {
    /// The engine's block size: the one sent, or (0 means unset, as llm-d-inference-sim sends
    /// it) the token count per hash; `None` when neither says.
    pub fn engine_block_size(&self) -> Option<usize> {
        let n = self.block_hashes.len();
        if self.block_size > 0 {
            Some(self.block_size as usize)
        } else if n > 0 && self.token_ids.len().is_multiple_of(n) {
            Some(self.token_ids.len() / n)
        } else {
            None
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockRemoved {
    pub block_hashes: Vec<EngineHash>,
    pub medium: Option<String>,
    /// Hybrid models (0.20+): the KV-cache group removing its copy (nil: the only group).
    pub group_idx: Option<i64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    BlockStored(BlockStored),
    BlockRemoved(BlockRemoved),
    AllBlocksCleared,
    /// A tag this version does not know: counted and skipped.
    Unknown(String),
}

#[derive(Debug)]
pub struct Batch {
    pub ts: f64,
    /// One entry per event in the batch, in order; a bad event is an `Err`.
    pub events: Vec<Result<Event>>,
    pub dp_rank: Option<i64>,
    /// Bytes followed the envelope (the events were still read; the batch is counted).
    pub trailing_bytes: bool,
}

/// Decode a whole batch. Fails only when the envelope itself is unreadable.
pub fn decode_batch(payload: &[u8]) -> Result<Batch> {
    let mut r = Reader::new(payload);
    let n = r.array()?;
    if n < 2 {
        return Err(Error::decode(DecodeKind::Shape, format!("batch envelope has {n} elements, expected at least 2")));
    }
    let ts = match r.value()? {
        Value::Float(f) => f,
        Value::Int(i) => i as f64,
        other => return Err(Error::decode(DecodeKind::Shape, format!("batch timestamp is {}", kind(&other)))),
    };
    let count = r.array()?;
    let mut events = Vec::with_capacity((count as usize).min(r.remaining()));
    for _ in 0..count {
        let start = r.pos();
        match decode_event(&mut r) {
            Ok(e) => events.push(Ok(e)),
            Err(e) => {
                // resynchronise on the next event, if this one is at least well-formed msgpack
                r.set_pos(start);
                if r.skip().is_err() {
                    events.push(Err(e));
                    return Ok(Batch { ts, events, dp_rank: None, trailing_bytes: false });
                }
                events.push(Err(e));
            }
        }
    }
    let mut dp_rank = None;
    if n >= 3 {
        if let Ok(Value::Int(i)) = r.value() {
            dp_rank = i64::try_from(i).ok();
        }
    }
    // envelope elements a future version may add, then nothing may follow
    let extra_ok = (3..n).all(|_| r.skip().is_ok());
    let trailing_bytes = !extra_ok || !r.at_end();
    Ok(Batch { ts, events, dp_rank, trailing_bytes })
}

fn hash_value(v: Value<'_>) -> Result<EngineHash> {
    match v {
        // every width and sign; negative Python hashes keep their two's-complement bits
        Value::Int(i) if i >= i64::MIN as i128 && i <= u64::MAX as i128 => Ok(i as u64),
        Value::Bin(b) if !b.is_empty() => {
            let tail = &b[b.len().saturating_sub(8)..];
            let mut a = [0u8; 8];
            a[8 - tail.len()..].copy_from_slice(tail);
            Ok(u64::from_be_bytes(a))
        }
        other => Err(Error::decode(DecodeKind::Shape, format!("block hash is {}", kind(&other)))),
    }
}

fn hashes(r: &mut Reader<'_>) -> Result<Vec<EngineHash>> {
    let n = r.array()?;
    let mut v = Vec::with_capacity(n as usize);
    for _ in 0..n {
        v.push(hash_value(r.value()?)?);
    }
    Ok(v)
}

fn opt_hash(r: &mut Reader<'_>) -> Result<Option<EngineHash>> {
    match r.value()? {
        Value::Nil => Ok(None),
        v => hash_value(v).map(Some),
    }
}

fn tokens(r: &mut Reader<'_>) -> Result<Vec<u32>> {
    let n = r.array()?;
    let mut v = Vec::with_capacity(n as usize);
    for _ in 0..n {
        if let Some(t) = r.u32_fast() {
            v.push(t);
            continue;
        }
        match r.value()? {
            Value::Int(i) => v.push(
                check_token(i)
                    .map_err(|_| Error::decode(DecodeKind::OutOfRange, format!("token id {i} out of range")))?,
            ),
            other => return Err(Error::decode(DecodeKind::Shape, format!("token id is {}", kind(&other)))),
        }
    }
    Ok(v)
}

fn opt_int(r: &mut Reader<'_>) -> Result<Option<i64>> {
    match r.value()? {
        Value::Nil => Ok(None),
        Value::Int(i) => {
            i64::try_from(i).map(Some).map_err(|_| Error::decode(DecodeKind::OutOfRange, "integer out of range"))
        }
        other => Err(Error::decode(DecodeKind::Shape, format!("expected an int, found {}", kind(&other)))),
    }
}

fn opt_str(r: &mut Reader<'_>) -> Result<Option<String>> {
    match r.value()? {
        Value::Nil => Ok(None),
        Value::Str(s) => std::str::from_utf8(s)
            .map(|s| Some(s.to_owned()))
            .map_err(|_| Error::decode(DecodeKind::Malformed, "string is not UTF-8")),
        other => Err(Error::decode(DecodeKind::Shape, format!("expected a string, found {}", kind(&other)))),
    }
}

/// A name or an integer (rendered in decimal); nil is `None`. Lenient: an enum's encoding may
/// change between versions, and this field must never cost the event.
fn opt_label(r: &mut Reader<'_>) -> Result<Option<String>> {
    match r.value()? {
        Value::Nil => Ok(None),
        Value::Str(s) => Ok(Some(String::from_utf8_lossy(s).into_owned())),
        Value::Int(i) => Ok(Some(i.to_string())),
        _ => Ok(None),
    }
}

fn extra_keys(r: &mut Reader<'_>) -> Result<Option<Vec<Option<Vec<u8>>>>> {
    let n = match r.value()? {
        Value::Nil => return Ok(None),
        Value::Array(n) => n,
        other => return Err(Error::decode(DecodeKind::Shape, format!("extra_keys is {}", kind(&other)))),
    };
    let mut v = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let start = r.pos();
        if let Value::Nil = r.value()? {
            v.push(None);
            continue;
        }
        r.set_pos(start);
        let mut out = Vec::new();
        r.transcode_cbor(&mut out)?;
        v.push(Some(out));
    }
    Ok(Some(v))
}

/// Field numbers shared by both encodings (array position - 1).
#[derive(Clone, Copy)]
enum Field {
    BlockHashes,
    Parent,
    TokenIds,
    BlockSize,
    LoraId,
    Medium,
    LoraName,
    ExtraKeys,
    GroupIdx,
    SpecKind,
    SlidingWindow,
    /// SGLang 0.5.23+: the request's cache salt (map encoding only).
    CacheSalt,
    Other,
}

fn stored_field(pos: usize) -> Field {
    match pos {
        0 => Field::BlockHashes,
        1 => Field::Parent,
        2 => Field::TokenIds,
        3 => Field::BlockSize,
        4 => Field::LoraId,
        5 => Field::Medium,
        6 => Field::LoraName,
        7 => Field::ExtraKeys,
        8 => Field::GroupIdx,
        9 => Field::SpecKind,
        10 => Field::SlidingWindow,
        _ => Field::Other,
    }
}

fn removed_field(pos: usize) -> Field {
    match pos {
        0 => Field::BlockHashes,
        1 => Field::Medium,
        2 => Field::GroupIdx,
        _ => Field::Other,
    }
}

fn named_field(name: &[u8]) -> Field {
    match name {
        b"block_hashes" => Field::BlockHashes,
        b"parent_block_hash" => Field::Parent,
        b"token_ids" => Field::TokenIds,
        b"block_size" => Field::BlockSize,
        b"lora_id" => Field::LoraId,
        b"medium" => Field::Medium,
        b"lora_name" => Field::LoraName,
        b"extra_keys" => Field::ExtraKeys,
        b"group_idx" => Field::GroupIdx,
        b"kv_cache_spec_kind" => Field::SpecKind,
        b"kv_cache_spec_sliding_window" => Field::SlidingWindow,
        b"cache_salt" => Field::CacheSalt,
        _ => Field::Other,
    }
}

#[derive(Default)]
struct Fields {
    stored: BlockStored,
    seen_hashes: bool,
    cache_salt: Option<String>,
}

fn read_field(r: &mut Reader<'_>, f: Field, out: &mut Fields) -> Result<()> {
    let s = &mut out.stored;
    match f {
        Field::BlockHashes => {
            s.block_hashes = hashes(r)?;
            out.seen_hashes = true;
        }
        Field::Parent => s.parent_block_hash = opt_hash(r)?,
        Field::TokenIds => s.token_ids = tokens(r)?,
        Field::BlockSize => {
            // 0 is "not set" (llm-d-inference-sim leaves it unset): the size then follows from
            // the token and hash counts, as for nil
            s.block_size = match opt_int(r)? {
                Some(b) if (0..=u32::MAX as i64).contains(&b) => b as u32,
                Some(b) => return Err(Error::decode(DecodeKind::BlockSize, format!("block_size {b} is negative"))),
                None => 0,
            }
        }
        Field::LoraId => s.lora_id = opt_int(r)?,
        Field::Medium => s.medium = opt_str(r)?,
        Field::LoraName => s.lora_name = opt_str(r)?,
        Field::ExtraKeys => s.extra_keys = extra_keys(r)?,
        Field::GroupIdx => s.group_idx = opt_int(r)?,
        Field::SpecKind => s.kv_cache_spec_kind = opt_label(r)?,
        Field::SlidingWindow => s.kv_cache_spec_sliding_window = opt_int(r)?,
        Field::CacheSalt => out.cache_salt = opt_str(r)?,
        Field::Other => r.skip()?,
    }
    Ok(())
}

fn finish(tag: &str, f: Fields) -> Result<Event> {
    match tag {
        "BlockStored" => {
            if !f.seen_hashes {
                return Err(Error::decode(DecodeKind::Shape, "BlockStored without block_hashes"));
            }
            let mut stored = f.stored;
            if stored.extra_keys.is_none() {
                stored.extra_keys = salt_extras(&stored, f.cache_salt.as_deref());
            }
            Ok(Event::BlockStored(stored))
        }
        "BlockRemoved" => {
            if !f.seen_hashes {
                return Err(Error::decode(DecodeKind::Shape, "BlockRemoved without block_hashes"));
            }
            let s = f.stored;
            Ok(Event::BlockRemoved(BlockRemoved {
                block_hashes: s.block_hashes,
                medium: s.medium,
                group_idx: s.group_idx,
            }))
        }
        "AllBlocksCleared" => Ok(Event::AllBlocksCleared),
        other => Ok(Event::Unknown(other.to_owned())),
    }
}

/// A store's `cache_salt` as the per-block extra keys vLLM sends for a salted request: the salt
/// (after the LoRA name, if any) on the chain's first block only — a store with a parent
/// inherits the salt through it — and the LoRA name on every block. `None` when nothing changes.
fn salt_extras(s: &BlockStored, salt: Option<&str>) -> Option<Vec<Option<Vec<u8>>>> {
    let salt = salt.filter(|x| !x.is_empty())?;
    if s.parent_block_hash.is_some() {
        return None; // the salt rides on the parent's key; the LoRA name stays with lora_name
    }
    let Extras::Request { first, rest } = Extras::for_request(s.lora_name.as_deref(), Some(salt)) else {
        return None;
    };
    let n = s.block_hashes.len();
    Some((0..n).map(|i| if i == 0 { first.clone() } else { rest.clone() }).collect())
}

pub fn decode_event(r: &mut Reader<'_>) -> Result<Event> {
    match r.value()? {
        Value::Array(n) => {
            if n == 0 {
                return Err(Error::decode(DecodeKind::Shape, "empty event array"));
            }
            let tag = r.str()?.to_owned();
            let by_pos: fn(usize) -> Field = match tag.as_str() {
                "BlockStored" => stored_field,
                "BlockRemoved" => removed_field,
                _ => |_| Field::Other,
            };
            let mut f = Fields::default();
            for pos in 0..(n as usize - 1) {
                read_field(r, by_pos(pos), &mut f)?;
            }
            finish(&tag, f)
        }
        Value::Map(n) => {
            let mut tag: Option<String> = None;
            let mut f = Fields::default();
            for _ in 0..n {
                let key = match r.value()? {
                    Value::Str(s) => s,
                    other => {
                        return Err(Error::decode(DecodeKind::Shape, format!("event field name is {}", kind(&other))))
                    }
                };
                if key == b"type" {
                    tag = Some(r.str()?.to_owned());
                } else {
                    read_field(r, named_field(key), &mut f)?;
                }
            }
            let tag = tag.ok_or_else(|| Error::decode(DecodeKind::Shape, "event map without \"type\""))?;
            finish(&tag, f)
        }
        other => Err(Error::decode(DecodeKind::Shape, format!("event is {}", kind(&other)))),
    }
}

#[cfg(test)]
#[path = "events_tests.rs"]
mod tests;
