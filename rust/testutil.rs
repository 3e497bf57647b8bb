//! Test-only msgpack builders for event batches (array form, as vLLM <= 0.23 sends them).

fn uint(b: &mut Vec<u8>, v: u64) {
    b.push(0xcf);
    b.extend_from_slice(&v.to_be_bytes());
}

fn array_head(b: &mut Vec<u8>, n: usize) {
    b.push(0xdd);
    b.extend_from_slice(&(n as u32).to_be_bytes());
}

fn str(b: &mut Vec<u8>, s: &str) {
    b.push(0xd9);
    b.push(s.len() as u8);
    b.extend_from_slice(s.as_bytes());
}

fn opt_str(b: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => str(b, s),
        None => b.push(0xc0),
    }
}

pub fn tokens(n: u32) -> Vec<u32> {
    (0..n).collect()
}

/// `["BlockStored", hashes, parent, tokens, 16, nil, medium]`.
pub fn stored(hashes: &[u64], parent: Option<u64>, toks: &[u32], medium: Option<&str>) -> Vec<u8> {
    let mut b = Vec::new();
    array_head(&mut b, 7);
    str(&mut b, "BlockStored");
    array_head(&mut b, hashes.len());
    hashes.iter().for_each(|&h| uint(&mut b, h));
    match parent {
        Some(p) => uint(&mut b, p),
        None => b.push(0xc0),
    }
    array_head(&mut b, toks.len());
    toks.iter().for_each(|&t| uint(&mut b, t as u64));
    b.extend_from_slice(&[0x10, 0xc0]);
    opt_str(&mut b, medium);
    b
}

/// `["BlockRemoved", hashes, medium]`.
pub fn removed(hashes: &[u64], medium: Option<&str>) -> Vec<u8> {
    let mut b = Vec::new();
    array_head(&mut b, 3);
    str(&mut b, "BlockRemoved");
    array_head(&mut b, hashes.len());
    hashes.iter().for_each(|&h| uint(&mut b, h));
    opt_str(&mut b, medium);
    b
}

/// `["AllBlocksCleared"]`.
pub fn cleared() -> Vec<u8> {
    let mut b = Vec::new();
    array_head(&mut b, 1);
    str(&mut b, "AllBlocksCleared");
    b
}

/// `[1.0, events, 0]`.
pub fn batch(events: &[Vec<u8>]) -> Vec<u8> {
    let mut b = vec![0x93, 0xcb];
    b.extend_from_slice(&1.0f64.to_be_bytes());
    array_head(&mut b, events.len());
    events.iter().for_each(|e| b.extend_from_slice(e));
    b.push(0x00);
    b
}

/// The map form (vLLM >= 0.24, llm-d-inference-sim's "map" format) of `stored`:
/// `{"type": "BlockStored", "block_hashes", "parent_block_hash", "token_ids", "block_size": 16,
/// "medium"}` (a `None` parent is written as nil, a `None` medium is omitted).
pub fn stored_map(hashes: &[u64], parent: Option<u64>, toks: &[u32], medium: Option<&str>) -> Vec<u8> {
    let mut b = vec![0x85 + u8::from(medium.is_some())];
    str(&mut b, "type");
    str(&mut b, "BlockStored");
    str(&mut b, "block_hashes");
    array_head(&mut b, hashes.len());
    hashes.iter().for_each(|&h| uint(&mut b, h));
    str(&mut b, "parent_block_hash");
    match parent {
        Some(p) => uint(&mut b, p),
        None => b.push(0xc0),
    }
    str(&mut b, "token_ids");
    array_head(&mut b, toks.len());
    toks.iter().for_each(|&t| uint(&mut b, t as u64));
    str(&mut b, "block_size");
    b.push(0x10);
    if let Some(m) = medium {
        str(&mut b, "medium");
        str(&mut b, m);
    }
    b
}
