//! Event shards: one worker thread per shard, each draining a bounded queue, so a pod's
//! batches (always sent to the same shard, by FNV-1a of its id) apply in arrival order.
//! A full queue blocks the sender (push-back, counted).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender, TrySendError};
use parking_lot::Mutex;

use crate::counters::C;
use crate::error::{Error, Result};
use crate::index::{ModelId, PodId};
use crate::indexer::Inner;

pub enum Msg {
    Batch { pod: PodId, model: ModelId, seq: Option<u64>, payload: Vec<u8> },
    Clear(PodId),
    Remove(PodId),
    Barrier(Sender<()>),
    Stop,
}

/// FNV-1a, 64-bit: picks a pod's shard.
pub fn fnv1a(s: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in s {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub struct Shards {
    senders: Vec<Sender<Msg>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    closed: AtomicBool,
}

fn run(inner: &Inner, rx: crossbeam_channel::Receiver<Msg>) {
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Batch { pod, model, seq, payload } => {
                inner.apply_batch(pod, model, seq, &payload);
            }
            Msg::Clear(pod) => inner.clear_pod(pod),
            Msg::Remove(pod) => inner.remove_pod(pod),
            Msg::Barrier(ack) => {
                let _ = ack.send(());
            }
            Msg::Stop => break,
        }
    }
}

impl Shards {
    /// Start `n` workers with queues of `capacity` batches.
    pub fn start(inner: &Arc<Inner>, n: usize, capacity: usize) -> Result<Self> {
        let mut shards =
            Shards { senders: Vec::with_capacity(n), workers: Mutex::new(Vec::new()), closed: AtomicBool::new(false) };
        for i in 0..n {
            let (tx, rx) = bounded::<Msg>(capacity);
            let inner = inner.clone();
            let name = format!("kvindex-shard-{i}");
            let h = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || run(&inner, rx))
                .map_err(|e| Error::Spawn { thread: name, reason: e.to_string() })?;
            // on error, dropping `shards` closes the queues already started and their workers exit
            shards.senders.push(tx);
            shards.workers.get_mut().push(h);
        }
        Ok(shards)
    }

    pub fn count(&self) -> usize {
        self.senders.len()
    }

    pub fn shard_of(&self, pod: &str) -> usize {
        (fnv1a(pod.as_bytes()) % self.senders.len() as u64) as usize
    }

    /// Queue `msg` on `pod`'s shard. `Ok(false)`: the queue was full and the call waited.
    pub fn send(&self, inner: &Inner, pod: &str, msg: Msg) -> Result<bool> {
        if self.closed.load(Relaxed) {
            return Err(Error::Closed);
        }
        let tx = &self.senders[self.shard_of(pod)];
        match tx.try_send(msg) {
            Ok(()) => Ok(true),
            Err(TrySendError::Full(msg)) => {
                inner.counters.add(C::queue_pushbacks, 1);
                tx.send(msg).map_err(|_| Error::Closed)?;
                Ok(false)
            }
            Err(TrySendError::Disconnected(_)) => Err(Error::Closed),
        }
    }

    /// Wait until everything queued before this call is applied. False on timeout.
    pub fn flush(&self, timeout: Option<Duration>) -> bool {
        if self.closed.load(Relaxed) {
            return true;
        }
        let (tx, rx) = bounded::<()>(self.senders.len());
        for s in &self.senders {
            if s.send(Msg::Barrier(tx.clone())).is_err() {
                return true;
            }
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        for _ in 0..self.senders.len() {
            let ok = match deadline {
                Some(d) => rx.recv_deadline(d).is_ok(),
                None => rx.recv().is_ok(),
            };
            if !ok {
                return false;
            }
        }
        true
    }

    /// Apply what is queued, then stop the workers. Idempotent.
    pub fn close(&self) {
        if self.closed.swap(true, Relaxed) {
            return;
        }
        for s in &self.senders {
            let _ = s.send(Msg::Stop);
        }
        for h in self.workers.lock().drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_reference_values() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
