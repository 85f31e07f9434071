//! A connection's bounded outbox: frames wait here for the connection's
//! writer thread. Producers (workers, the connection's reader, the event hub)
//! never touch the socket, so a client that stops reading holds up nobody
//! but its own generations.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

/// The outbox no longer takes frames (the connection is closing or gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryPushError {
    Full,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    /// No new frames; the writer sends what is queued, then stops.
    Draining,
    /// Queued frames are dropped; the writer stops now.
    Closed,
}

#[derive(Debug)]
struct State {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    mode: Mode,
}

#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    changed: Condvar,
    capacity: usize,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                bytes: 0,
                mode: Mode::Open,
            }),
            changed: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a frame, waiting while the outbox is full. A frame larger than
    /// the whole capacity is taken when the outbox is empty.
    pub fn push(&self, frame: Vec<u8>) -> Result<(), Closed> {
        let mut s = self.lock();
        loop {
            if s.mode != Mode::Open {
                return Err(Closed);
            }
            if s.frames.is_empty() || s.bytes + frame.len() <= self.capacity {
                break;
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.bytes += frame.len();
        s.frames.push_back(frame);
        self.changed.notify_all();
        Ok(())
    }

    /// Queue a frame only if there is room now (event fan-out never waits).
    pub fn try_push(&self, frame: Vec<u8>) -> Result<(), TryPushError> {
        let mut s = self.lock();
        if s.mode != Mode::Open {
            return Err(TryPushError::Closed);
        }
        if !s.frames.is_empty() && s.bytes + frame.len() > self.capacity {
            return Err(TryPushError::Full);
        }
        s.bytes += frame.len();
        s.frames.push_back(frame);
        self.changed.notify_all();
        Ok(())
    }

    /// Queue a small final frame (an answer to a waiter, an error) without
    /// waiting for room: whoever sends it must not wait on this client.
    pub fn force_push(&self, frame: Vec<u8>) -> Result<(), Closed> {
        let mut s = self.lock();
        if s.mode != Mode::Open {
            return Err(Closed);
        }
        s.bytes += frame.len();
        s.frames.push_back(frame);
        self.changed.notify_all();
        Ok(())
    }

    /// The writer's side: everything queued, concatenated, waiting until
    /// there is something; `None` once the outbox is closed (or drained).
    pub fn take_batch(&self) -> Option<Vec<u8>> {
        let mut s = self.lock();
        loop {
            match s.mode {
                Mode::Closed => return None,
                Mode::Draining if s.frames.is_empty() => return None,
                _ if !s.frames.is_empty() => break,
                _ => s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner()),
            }
        }
        let mut batch = Vec::with_capacity(s.bytes);
        for f in s.frames.drain(..) {
            batch.extend_from_slice(&f);
        }
        s.bytes = 0;
        self.changed.notify_all();
        Some(batch)
    }

    /// Stop taking frames; what is queued is still written.
    pub fn drain(&self) {
        let mut s = self.lock();
        if s.mode == Mode::Open {
            s.mode = Mode::Draining;
        }
        self.changed.notify_all();
    }

    /// Stop now: queued frames are dropped, waiting producers fail.
    pub fn close(&self) {
        let mut s = self.lock();
        s.mode = Mode::Closed;
        s.frames.clear();
        s.bytes = 0;
        self.changed.notify_all();
    }

    pub fn is_open(&self) -> bool {
        self.lock().mode == Mode::Open
    }

    /// Bytes waiting for the writer.
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_full_outbox_holds_the_producer_until_the_writer_takes_or_closes() {
        let out = Arc::new(Outbox::new(8));
        out.push(vec![1; 6]).unwrap();
        assert_eq!(out.try_push(vec![2; 4]), Err(TryPushError::Full));
        let producer = {
            let out = out.clone();
            std::thread::spawn(move || out.push(vec![3; 4]))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!producer.is_finished(), "waits while full");
        assert_eq!(out.take_batch(), Some(vec![1; 6]));
        producer.join().unwrap().unwrap();
        assert_eq!(out.take_batch(), Some(vec![3; 4]));

        out.push(vec![4; 8]).unwrap();
        let blocked = {
            let out = out.clone();
            std::thread::spawn(move || out.push(vec![5; 1]))
        };
        std::thread::sleep(Duration::from_millis(50));
        out.close();
        assert_eq!(blocked.join().unwrap(), Err(Closed));
        assert_eq!(out.take_batch(), None);
    }

    #[test]
    fn draining_writes_what_is_queued_then_ends() {
        let out = Outbox::new(1 << 10);
        out.push(b"ab".to_vec()).unwrap();
        out.push(b"cd".to_vec()).unwrap();
        out.drain();
        assert_eq!(out.push(b"x".to_vec()), Err(Closed));
        assert_eq!(out.take_batch(), Some(b"abcd".to_vec()));
        assert_eq!(out.take_batch(), None);
        // An oversized frame still goes through an empty outbox.
        let big = Outbox::new(4);
        big.push(vec![0; 100]).unwrap();
        assert_eq!(big.queued_bytes(), 100);
    }
}
