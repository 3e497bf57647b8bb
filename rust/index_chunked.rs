//! A growable array in fixed chunks: growing never copies or frees (a `Vec` that grows by
//! reallocating leaves freed blocks behind in the allocator, memory the process keeps).

use std::ops::{Index, IndexMut};

/// Elements per chunk: small enough that a shard's partly filled last chunk costs little.
const CHUNK: usize = 1024;

pub(super) struct Chunked<T> {
    chunks: Vec<Box<[T]>>,
    len: usize,
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Chunked { chunks: Vec::new(), len: 0 }
    }
}

impl<T: Clone> Chunked<T> {
    #[inline]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append `v` (`fill` initialises a new chunk's other slots).
    pub(super) fn push(&mut self, v: T, fill: T) {
        if self.len == self.chunks.len() * CHUNK {
            self.chunks.push(vec![fill; CHUNK].into_boxed_slice());
        }
        self.len += 1;
        let i = self.len - 1;
        self[i] = v;
    }

    /// Bytes held, chunk list included.
    pub(super) fn bytes(&self) -> usize {
        self.chunks.len() * CHUNK * std::mem::size_of::<T>() + self.chunks.capacity() * 16
    }
}

impl<T> Index<usize> for Chunked<T> {
    type Output = T;
    #[inline]
    fn index(&self, i: usize) -> &T {
        &self.chunks[i / CHUNK][i % CHUNK]
    }
}

impl<T> IndexMut<usize> for Chunked<T> {
    #[inline]
    fn index_mut(&mut self, i: usize) -> &mut T {
        &mut self.chunks[i / CHUNK][i % CHUNK]
    }
}
