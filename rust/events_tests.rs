//! Unit tests of `events.rs` (a child module: it sees the private items).

use super::*;

// minimal msgpack writer for tests
fn arr(n: usize) -> Vec<u8> {
    assert!(n < 16);
    vec![0x90 | n as u8]
}
fn s(x: &str) -> Vec<u8> {
    let mut v = vec![0xa0 | x.len() as u8];
    v.extend_from_slice(x.as_bytes());
    v
}
fn u64v(x: u64) -> Vec<u8> {
    let mut v = vec![0xcf];
    v.extend_from_slice(&x.to_be_bytes());
    v
}

#[test]
fn array_event_with_missing_trailing_fields() {
    let mut b = arr(3);
    b.extend([0xcb]);
    b.extend(1.5f64.to_be_bytes());
    b.extend(arr(2));
    // ["BlockRemoved", [7]]  (no medium)
    b.extend(arr(2));
    b.extend(s("BlockRemoved"));
    b.extend(arr(1));
    b.extend(u64v(7));
    // ["AllBlocksCleared"]
    b.extend(arr(1));
    b.extend(s("AllBlocksCleared"));
    b.push(0x01);
    let batch = decode_batch(&b).unwrap();
    assert_eq!(batch.ts, 1.5);
    assert_eq!(batch.dp_rank, Some(1));
    assert_eq!(batch.events.len(), 2);
    assert_eq!(
        batch.events[0].as_ref().unwrap(),
        &Event::BlockRemoved(BlockRemoved { block_hashes: vec![7], medium: None, group_idx: None })
    );
    assert_eq!(batch.events[1].as_ref().unwrap(), &Event::AllBlocksCleared);
}

#[test]
fn bad_event_is_skipped_and_the_rest_survives() {
    let mut b = arr(2);
    b.push(0x00);
    b.extend(arr(3));
    // a BlockRemoved whose hash is a string
    b.extend(arr(2));
    b.extend(s("BlockRemoved"));
    b.extend(arr(1));
    b.extend(s("x"));
    // an unknown event type
    b.extend(arr(2));
    b.extend(s("Future"));
    b.push(0x05);
    b.extend(arr(1));
    b.extend(s("AllBlocksCleared"));
    let batch = decode_batch(&b).unwrap();
    assert!(batch.events[0].is_err());
    assert_eq!(batch.events[1].as_ref().unwrap(), &Event::Unknown("Future".into()));
    assert_eq!(batch.events[2].as_ref().unwrap(), &Event::AllBlocksCleared);
    assert_eq!(batch.dp_rank, None);
    assert!(!batch.trailing_bytes);
    let mut more = b.clone();
    more.push(0x00);
    assert!(decode_batch(&more).unwrap().trailing_bytes);
}

#[test]
fn bin_and_negative_hashes() {
    assert_eq!(hash_value(Value::Bin(&[9; 32])).unwrap(), u64::from_be_bytes([9; 8]));
    assert_eq!(hash_value(Value::Bin(&[1, 2])).unwrap(), 0x0102);
    assert_eq!(hash_value(Value::Int(-1)).unwrap(), u64::MAX);
    assert!(hash_value(Value::Nil).is_err());
}

#[test]
fn hybrid_group_fields_in_both_encodings() {
    // ["BlockRemoved", [7], "GPU", 1]
    let mut b = arr(4);
    b.extend(s("BlockRemoved"));
    b.extend(arr(1));
    b.extend(u64v(7));
    b.extend(s("GPU"));
    b.push(0x01);
    let want = BlockRemoved { block_hashes: vec![7], medium: Some("GPU".into()), group_idx: Some(1) };
    assert_eq!(decode_event(&mut Reader::new(&b)).unwrap(), Event::BlockRemoved(want));
    // {"type": "BlockStored", "block_hashes": [], "group_idx": 1,
    //  "kv_cache_spec_kind": "sliding_window", "kv_cache_spec_sliding_window": 128}
    let mut m = vec![0x85];
    for (k, v) in [("type", s("BlockStored")), ("block_hashes", arr(0)), ("group_idx", vec![0x01])] {
        m.extend(s(k));
        m.extend(v);
    }
    m.extend([0xb2]);
    m.extend(b"kv_cache_spec_kind");
    m.extend([0xae]);
    m.extend(b"sliding_window");
    m.extend([0xbc]);
    m.extend(b"kv_cache_spec_sliding_window");
    m.extend([0xcc, 128]);
    let Event::BlockStored(st) = decode_event(&mut Reader::new(&m)).unwrap() else { panic!() };
    assert_eq!(st.group_idx, Some(1));
    assert_eq!(st.kv_cache_spec_kind.as_deref(), Some("sliding_window"));
    assert_eq!(st.kv_cache_spec_sliding_window, Some(128));
    // an integer kind is kept as its decimal form, an odd one is dropped, never the event
    let mut a = arr(12);
    a.extend(s("BlockStored"));
    a.extend(arr(0));
    a.extend([0xc0, 0x90, 0x10, 0xc0, 0xc0, 0xc0, 0xc0, 0x00, 0x02, 0xc0]);
    let Event::BlockStored(st) = decode_event(&mut Reader::new(&a)).unwrap() else { panic!() };
    assert_eq!(
        (st.group_idx, st.kv_cache_spec_kind.as_deref(), st.kv_cache_spec_sliding_window),
        (Some(0), Some("2"), None)
    );
}

#[test]
fn sglang_cache_salt_becomes_vllm_extra_keys() {
    // {"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": P,
    //  "token_ids": [], "block_size": 16, "cache_salt": "s"}
    let event = |parent: Option<u64>, salt: Option<&str>, lora: Option<&str>| {
        let n = 4 + usize::from(parent.is_some()) + usize::from(salt.is_some()) + usize::from(lora.is_some());
        let mut m = vec![0x80 | n as u8];
        m.extend(s("type"));
        m.extend(s("BlockStored"));
        m.extend(s("block_hashes"));
        m.extend([0x92, 0x01, 0x02]);
        if let Some(p) = parent {
            m.extend(s("parent_block_hash"));
            m.extend(u64v(p));
        }
        m.extend(s("token_ids"));
        m.extend(arr(0));
        m.extend(s("block_size"));
        m.push(0x10);
        if let Some(x) = salt {
            m.extend(s("cache_salt"));
            m.extend(s(x));
        }
        if let Some(x) = lora {
            m.extend(s("lora_name"));
            m.extend(s(x));
        }
        let Event::BlockStored(st) = decode_event(&mut Reader::new(&m)).unwrap() else { panic!() };
        st
    };
    let want = |lora: Option<&str>| {
        let Extras::Request { first, rest } = Extras::for_request(lora, Some("s")) else { panic!() };
        Some(vec![first, rest])
    };
    // a chain root carries the salt on its first block, as a salted vLLM request would
    assert_eq!(event(None, Some("s"), None).extra_keys, want(None));
    assert_eq!(event(None, Some("s"), Some("ad")).extra_keys, want(Some("ad")));
    // a store with a parent inherits the salt through it; no salt (or an empty one) is no change
    assert_eq!(event(Some(9), Some("s"), None).extra_keys, None);
    assert_eq!(event(None, None, None).extra_keys, None);
    assert_eq!(event(None, Some(""), None).extra_keys, None);
}

#[test]
fn zero_block_size_is_unset_and_negative_is_refused() {
    // ["BlockStored", [7], nil, [], B]
    let event = |b: &[u8]| {
        let mut a = arr(5);
        a.extend(s("BlockStored"));
        a.extend([0x91, 0x07, 0xc0, 0x90]);
        a.extend(b);
        decode_event(&mut Reader::new(&a))
    };
    let Event::BlockStored(st) = event(&[0x00]).unwrap() else { panic!() };
    assert_eq!(st.block_size, 0);
    let Event::BlockStored(st) = event(&[0x10]).unwrap() else { panic!() };
    assert_eq!(st.block_size, 16);
    assert!(event(&[0xff]).is_err()); // -1
}

#[test]
fn envelope_errors() {
    assert!(decode_batch(&[]).is_err());
    assert!(decode_batch(&[0x91, 0x00]).is_err());
    assert!(decode_batch(&[0x92, 0xa1, b'x', 0x90]).is_err());
}
