//! A small zero-copy MessagePack reader for KV event batches.
//!
//! It never allocates from a length it read (a 4-billion-element header in a 10-byte
//! message is an error, not an allocation), never recurses on nested input, and every
//! failure is an `Error::Decode`.

use crate::error::{DecodeKind, Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Nil,
    Bool(bool),
    /// Any integer, signed or not.
    Int(i128),
    Float(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    /// An array header: the elements follow.
    Array(u32),
    /// A map header: `2 * n` values follow.
    Map(u32),
    Ext(i8, &'a [u8]),
}

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// Deepest nesting `transcode_cbor` accepts.
pub const MAX_DEPTH: usize = 32;

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn pos(&self) -> usize {
        self.pos
    }
    pub fn set_pos(&mut self, p: usize) {
        self.pos = p.min(self.buf.len());
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(Error::decode(
                DecodeKind::Truncated,
                format!("truncated: wanted {n} bytes at offset {}", self.pos),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    #[inline]
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    #[inline]
    fn be<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    #[inline]
    fn container(&mut self, n: u32, per_item: usize) -> Result<u32> {
        // every element needs at least one byte: reject impossible lengths up front
        if (n as usize).saturating_mul(per_item) > self.remaining() {
            return Err(Error::decode(
                DecodeKind::Malformed,
                format!("container of {n} elements exceeds the {} bytes left", self.remaining()),
            ));
        }
        Ok(n)
    }

    #[inline]
    pub fn value(&mut self) -> Result<Value<'a>> {
        let m = self.u8()?;
        Ok(match m {
            0x00..=0x7f => Value::Int(m as i128),
            0x80..=0x8f => Value::Map(self.container((m & 0x0f) as u32, 2)?),
            0x90..=0x9f => Value::Array(self.container((m & 0x0f) as u32, 1)?),
            0xa0..=0xbf => Value::Str(self.take((m & 0x1f) as usize)?),
            0xc0 => Value::Nil,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4 => {
                let n = self.u8()? as usize;
                Value::Bin(self.take(n)?)
            }
            0xc5 => {
                let n = u16::from_be_bytes(self.be()?) as usize;
                Value::Bin(self.take(n)?)
            }
            0xc6 => {
                let n = u32::from_be_bytes(self.be()?) as usize;
                Value::Bin(self.take(n)?)
            }
            0xc7..=0xc9 => {
                let n = match m {
                    0xc7 => self.u8()? as usize,
                    0xc8 => u16::from_be_bytes(self.be()?) as usize,
                    _ => u32::from_be_bytes(self.be()?) as usize,
                };
                let t = self.u8()? as i8;
                Value::Ext(t, self.take(n)?)
            }
            0xca => Value::Float(f32::from_be_bytes(self.be()?) as f64),
            0xcb => Value::Float(f64::from_be_bytes(self.be()?)),
            0xcc => Value::Int(self.u8()? as i128),
            0xcd => Value::Int(u16::from_be_bytes(self.be()?) as i128),
            0xce => Value::Int(u32::from_be_bytes(self.be()?) as i128),
            0xcf => Value::Int(u64::from_be_bytes(self.be()?) as i128),
            0xd0 => Value::Int(self.u8()? as i8 as i128),
            0xd1 => Value::Int(i16::from_be_bytes(self.be()?) as i128),
            0xd2 => Value::Int(i32::from_be_bytes(self.be()?) as i128),
            0xd3 => Value::Int(i64::from_be_bytes(self.be()?) as i128),
            0xd4..=0xd8 => {
                let n = 1usize << (m - 0xd4);
                let t = self.u8()? as i8;
                Value::Ext(t, self.take(n)?)
            }
            0xd9 => {
                let n = self.u8()? as usize;
                Value::Str(self.take(n)?)
            }
            0xda => {
                let n = u16::from_be_bytes(self.be()?) as usize;
                Value::Str(self.take(n)?)
            }
            0xdb => {
                let n = u32::from_be_bytes(self.be()?) as usize;
                Value::Str(self.take(n)?)
            }
            0xdc => {
                let n = u16::from_be_bytes(self.be()?) as u32;
                Value::Array(self.container(n, 1)?)
            }
            0xdd => {
                let n = u32::from_be_bytes(self.be()?);
                Value::Array(self.container(n, 1)?)
            }
            0xde => {
                let n = u16::from_be_bytes(self.be()?) as u32;
                Value::Map(self.container(n, 2)?)
            }
            0xdf => {
                let n = u32::from_be_bytes(self.be()?);
                Value::Map(self.container(n, 2)?)
            }
            0xe0..=0xff => Value::Int((m as i8) as i128),
            0xc1 => return Err(Error::decode(DecodeKind::Malformed, "reserved msgpack marker 0xc1")),
        })
    }

    /// Read an unsigned int that fits in `u32` (fast path for token ids); `None` when the
    /// next value is anything else (the reader is then left where it was).
    #[inline]
    pub fn u32_fast(&mut self) -> Option<u32> {
        let b = self.buf.get(self.pos..)?;
        let (v, n) = match *b.first()? {
            m @ 0x00..=0x7f => (m as u32, 1),
            0xcc => (*b.get(1)? as u32, 2),
            0xcd => (u16::from_be_bytes([*b.get(1)?, *b.get(2)?]) as u32, 3),
            0xce => (u32::from_be_bytes([*b.get(1)?, *b.get(2)?, *b.get(3)?, *b.get(4)?]), 5),
            _ => return None,
        };
        self.pos += n;
        Some(v)
    }

    /// Skip one whole value (iteratively: deep nesting cannot overflow the stack).
    pub fn skip(&mut self) -> Result<()> {
        let mut pending: u64 = 1;
        while pending > 0 {
            pending -= 1;
            match self.value()? {
                Value::Array(n) => pending += n as u64,
                Value::Map(n) => pending += 2 * n as u64,
                _ => {}
            }
        }
        Ok(())
    }

    pub fn array(&mut self) -> Result<u32> {
        match self.value()? {
            Value::Array(n) => Ok(n),
            other => Err(Error::decode(DecodeKind::Shape, format!("expected an array, found {}", kind(&other)))),
        }
    }

    pub fn str(&mut self) -> Result<&'a str> {
        match self.value()? {
            Value::Str(s) => {
                std::str::from_utf8(s).map_err(|_| Error::decode(DecodeKind::Malformed, "string is not UTF-8"))
            }
            other => Err(Error::decode(DecodeKind::Shape, format!("expected a string, found {}", kind(&other)))),
        }
    }

    /// Read one value and write it as canonical CBOR (strings, ints, bytes, arrays, nil,
    /// bools, floats), as vLLM's `cbor2.dumps(..., canonical=True)` would for the same
    /// Python value. Maps and extension types are rejected.
    pub fn transcode_cbor(&mut self, out: &mut Vec<u8>) -> Result<()> {
        use crate::hashing::cbor;
        // explicit stack of remaining element counts per open array
        let mut stack: Vec<u32> = Vec::new();
        loop {
            match self.value()? {
                Value::Nil => out.push(cbor::NULL),
                Value::Bool(b) => out.push(if b { 0xf5 } else { 0xf4 }),
                Value::Int(i) => {
                    if !(-(1i128 << 64)..(1i128 << 64)).contains(&i) {
                        return Err(Error::decode(DecodeKind::OutOfRange, "integer out of CBOR range"));
                    }
                    cbor::int(out, i)
                }
                Value::Float(f) => {
                    out.push(0xfb);
                    out.extend_from_slice(&f.to_be_bytes());
                }
                Value::Str(s) => {
                    let s = std::str::from_utf8(s)
                        .map_err(|_| Error::decode(DecodeKind::Malformed, "string is not UTF-8"))?;
                    cbor::text(out, s)
                }
                Value::Bin(b) => cbor::bytes(out, b),
                Value::Array(n) => {
                    cbor::head(out, 4, n as u64);
                    if n > 0 {
                        if stack.len() >= MAX_DEPTH {
                            return Err(Error::decode(DecodeKind::Shape, "extra keys nested too deeply"));
                        }
                        stack.push(n);
                        continue;
                    }
                }
                Value::Map(_) | Value::Ext(..) => {
                    return Err(Error::decode(DecodeKind::Shape, "maps and extension types are not valid extra keys"))
                }
            }
            // one element completed: pop finished arrays
            loop {
                match stack.last_mut() {
                    None => return Ok(()),
                    Some(n) => {
                        *n -= 1;
                        if *n > 0 {
                            break;
                        }
                        stack.pop();
                    }
                }
            }
        }
    }
}

pub fn kind(v: &Value<'_>) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Bool(_) => "bool",
        Value::Int(_) => "int",
        Value::Float(_) => "float",
        Value::Str(_) => "str",
        Value::Bin(_) => "bin",
        Value::Array(_) => "array",
        Value::Map(_) => "map",
        Value::Ext(..) => "ext",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_int_width() {
        let cases: &[(&[u8], i128)] = &[
            (&[0x05], 5),
            (&[0xff], -1),
            (&[0xcc, 0xff], 255),
            (&[0xcd, 0x01, 0x00], 256),
            (&[0xce, 0, 1, 0, 0], 65536),
            (&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], u64::MAX as i128),
            (&[0xd0, 0x80], -128),
            (&[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0], i64::MIN as i128),
        ];
        for (b, want) in cases {
            assert_eq!(Reader::new(b).value().unwrap(), Value::Int(*want));
        }
    }

    #[test]
    fn impossible_lengths_and_truncation_are_errors() {
        assert!(Reader::new(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x00]).value().is_err());
        assert!(Reader::new(&[0xcf, 0x00]).value().is_err());
        assert!(Reader::new(&[0xc1]).value().is_err());
        assert!(Reader::new(&[]).value().is_err());
    }

    #[test]
    fn skip_handles_deep_nesting_without_recursion() {
        let mut b = vec![0x91u8; 100_000];
        b.push(0xc0);
        let mut r = Reader::new(&b);
        r.skip().unwrap();
        assert!(r.at_end());
    }

    #[test]
    fn transcodes_extra_keys_to_canonical_cbor() {
        // ["lora", ["mm", 3]] in msgpack
        let b = [0x92, 0xa4, b'l', b'o', b'r', b'a', 0x92, 0xa2, b'm', b'm', 0x03];
        let mut out = Vec::new();
        let mut r = Reader::new(&b);
        r.transcode_cbor(&mut out).unwrap();
        assert_eq!(out, vec![0x82, 0x64, b'l', b'o', b'r', b'a', 0x82, 0x62, b'm', b'm', 0x03]);
        assert!(r.at_end());
    }
}
