//! One single-producer single-consumer ring of length-prefixed messages.
//!
//! Control block of a ring (offsets from its start in the header; the producer's and the
//! consumer's words sit 128 bytes apart so that they do not share a cache line):
//!
//! ```text
//! 0    tail u64: bytes ever published (producer writes)
//! 8    data_seq u32: bumped after each publish; the consumer sleeps on it
//! 12   consumer_sleeping u32: 1 while the consumer may be asleep
//! 128  head u64: bytes ever consumed (consumer writes)
//! 136  space_seq u32: bumped after each consume; the producer sleeps on it when the ring is full
//! 140  producer_sleeping u32: 1 while the producer may be asleep
//! ```
//!
//! A record is an 8-byte header (payload length u32, tag u32 = `REC1`) and the payload, padded to
//! 8 bytes. Positions only grow; the place in the data area is `position % ring_bytes`. Since both
//! positions and the ring size are multiples of 8, a record header never straddles the end of
//! the data area; a payload may, and is copied in two pieces. A record is published (tail moved
//! past it) only once it is whole, so a consumer that sees `tail - head` bytes must find whole
//! records in them: anything else is corruption.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::errors::ShmError;
use crate::futex;
use crate::segment::Segment;

const TAIL: usize = 0;
pub(crate) const DATA_SEQ: usize = 8;
const CONSUMER_SLEEPING: usize = 12;
const HEAD: usize = 128;
pub(crate) const SPACE_SEQ: usize = 136;
const PRODUCER_SLEEPING: usize = 140;

const RECORD_HEADER: usize = 8;
const RECORD_TAG: u32 = u32::from_le_bytes(*b"REC1");

/// How long a side spins (checking the ring) before it sleeps: long enough to catch an answer
/// already on its way, short enough not to take a core from the computation on a small host.
const SPIN: Duration = Duration::from_micros(20);
/// Longest single sleep: a side re-checks `closed` (and its own stop conditions) at least this often.
const MAX_SLEEP: Duration = Duration::from_millis(50);

fn padded(len: usize) -> usize {
    RECORD_HEADER + len.div_ceil(8) * 8
}

/// Waits for a word to change: a bounded spin, a few yields, then futex sleeps.
struct Backoff {
    started: Instant,
    yields: u32,
}

impl Backoff {
    fn new() -> Self {
        Backoff { started: Instant::now(), yields: 0 }
    }

    /// Whether to look again at once (still spinning or yielding) rather than sleep.
    fn spin(&mut self) -> bool {
        if self.started.elapsed() < SPIN {
            std::hint::spin_loop();
            return true;
        }
        if self.yields < 4 {
            self.yields += 1;
            std::thread::yield_now();
            return true;
        }
        false
    }
}

/// Sleeps on `seq` (last seen as `seen`) with `sleeping` raised, until it changes, `until`, or
/// [`MAX_SLEEP`]. The flag is raised before the caller's condition is checked again (by
/// `still_waiting`), and the other side bumps `seq` before it reads the flag: one of the two sees
/// the other, so a wake-up cannot be lost (and the timeout bounds the cost if it were).
fn sleep(
    seq: &AtomicU32,
    seen: u32,
    sleeping: &AtomicU32,
    until: Option<Instant>,
    still_waiting: impl FnOnce() -> bool,
) {
    sleeping.store(1, Ordering::SeqCst);
    if still_waiting() {
        let left = until.map_or(MAX_SLEEP, |u| u.saturating_duration_since(Instant::now()).min(MAX_SLEEP));
        if !left.is_zero() {
            futex::wait(seq, seen, left);
        }
    }
    sleeping.store(0, Ordering::SeqCst);
}

/// The writing end of a ring.
#[derive(Debug)]
pub struct Producer {
    segment: Arc<Segment>,
    ring: usize,
    /// Bytes published so far: this side's own count, never read back from the mapping.
    tail: u64,
}

impl Producer {
    pub(crate) fn new(segment: Arc<Segment>, ring: usize) -> Self {
        let tail = segment.ring_u64(ring, TAIL).load(Ordering::Acquire);
        Producer { segment, ring, tail }
    }

    pub fn segment(&self) -> &Arc<Segment> {
        &self.segment
    }

    /// The largest message the ring can carry.
    pub fn max_message(&self) -> usize {
        self.segment.ring_bytes() - RECORD_HEADER
    }

    /// Appends `message`, waiting (until `deadline`) for the consumer to make room.
    pub fn send(&mut self, message: &[u8], deadline: Instant) -> Result<(), ShmError> {
        let cap = self.segment.ring_bytes();
        let need = padded(message.len());
        if need > cap || u32::try_from(message.len()).is_err() {
            return Err(ShmError::TooLarge { len: message.len(), max: self.max_message() });
        }
        let seg = &self.segment;
        let (head, space_seq) = (seg.ring_u64(self.ring, HEAD), seg.ring_u32(self.ring, SPACE_SEQ));
        let free = |head: u64| -> Result<usize, ShmError> {
            let used = self.tail.wrapping_sub(head);
            if used > cap as u64 || !used.is_multiple_of(8) {
                return Err(ShmError::Corrupt(format!(
                    "consumer position {head} against producer position {}",
                    self.tail
                )));
            }
            Ok(cap - used as usize)
        };
        let mut backoff = Backoff::new();
        loop {
            if seg.is_closed() {
                return Err(ShmError::Closed);
            }
            let seen = space_seq.load(Ordering::SeqCst);
            if free(head.load(Ordering::Acquire))? >= need {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ShmError::Full);
            }
            if !backoff.spin() {
                let sleeping = seg.ring_u32(self.ring, PRODUCER_SLEEPING);
                sleep(space_seq, seen, sleeping, Some(deadline), || {
                    free(head.load(Ordering::SeqCst)).is_ok_and(|f| f < need) && !seg.is_closed()
                });
            }
        }
        let base = seg.data_start(self.ring);
        let at = (self.tail % cap as u64) as usize;
        let mut header = [0u8; RECORD_HEADER];
        header[..4].copy_from_slice(&(message.len() as u32).to_le_bytes());
        header[4..].copy_from_slice(&RECORD_TAG.to_le_bytes());
        seg.write_bytes(base + at, &header);
        let body = (at + RECORD_HEADER) % cap;
        let first = message.len().min(cap - body);
        seg.write_bytes(base + body, &message[..first]);
        seg.write_bytes(base, &message[first..]);
        self.tail += need as u64;
        seg.ring_u64(self.ring, TAIL).store(self.tail, Ordering::Release);
        let data_seq = seg.ring_u32(self.ring, DATA_SEQ);
        data_seq.fetch_add(1, Ordering::SeqCst);
        if seg.ring_u32(self.ring, CONSUMER_SLEEPING).load(Ordering::SeqCst) != 0 {
            futex::wake_all(data_seq);
        }
        Ok(())
    }
}

/// The reading end of a ring.
#[derive(Debug)]
pub struct Consumer {
    segment: Arc<Segment>,
    ring: usize,
    /// Bytes consumed so far: this side's own count.
    head: u64,
}

impl Consumer {
    pub(crate) fn new(segment: Arc<Segment>, ring: usize) -> Self {
        let head = segment.ring_u64(ring, HEAD).load(Ordering::Acquire);
        Consumer { segment, ring, head }
    }

    pub fn segment(&self) -> &Arc<Segment> {
        &self.segment
    }

    /// The next message into `buf` (replacing its contents); `Ok(false)` if none came before
    /// `until`. Messages already published are still delivered after the segment was closed;
    /// then [`ShmError::Closed`].
    pub fn recv(&mut self, buf: &mut Vec<u8>, until: Option<Instant>) -> Result<bool, ShmError> {
        let seg = self.segment.clone();
        let (tail, data_seq) = (seg.ring_u64(self.ring, TAIL), seg.ring_u32(self.ring, DATA_SEQ));
        let mut backoff = Backoff::new();
        loop {
            let seen = data_seq.load(Ordering::SeqCst);
            let published = tail.load(Ordering::Acquire);
            if self.available(published)? > 0 {
                self.take(published, buf)?;
                return Ok(true);
            }
            if seg.is_closed() {
                return Err(ShmError::Closed);
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                return Ok(false);
            }
            if !backoff.spin() {
                let sleeping = seg.ring_u32(self.ring, CONSUMER_SLEEPING);
                sleep(data_seq, seen, sleeping, until, || tail.load(Ordering::SeqCst) == self.head && !seg.is_closed());
            }
        }
    }

    /// Bytes published and not consumed, checked against the ring's size.
    fn available(&self, published: u64) -> Result<usize, ShmError> {
        let avail = published.wrapping_sub(self.head);
        if avail > self.segment.ring_bytes() as u64 || !avail.is_multiple_of(8) {
            return Err(ShmError::Corrupt(format!(
                "producer position {published} against consumer position {}",
                self.head
            )));
        }
        Ok(avail as usize)
    }

    fn take(&mut self, published: u64, buf: &mut Vec<u8>) -> Result<(), ShmError> {
        let seg = &self.segment;
        let cap = seg.ring_bytes();
        let avail = self.available(published)?;
        let base = seg.data_start(self.ring);
        let at = (self.head % cap as u64) as usize;
        let mut header = [0u8; RECORD_HEADER];
        seg.read_bytes(base + at, &mut header);
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let tag = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if tag != RECORD_TAG {
            return Err(ShmError::Corrupt(format!("record at {} has tag {tag:#010x}", self.head)));
        }
        let need = padded(len);
        if need > avail {
            return Err(ShmError::Corrupt(format!("record at {} says {len} bytes, only {avail} published", self.head)));
        }
        buf.clear();
        buf.resize(len, 0);
        let body = (at + RECORD_HEADER) % cap;
        let first = len.min(cap - body);
        seg.read_bytes(base + body, &mut buf[..first]);
        seg.read_bytes(base, &mut buf[first..]);
        self.head += need as u64;
        seg.ring_u64(self.ring, HEAD).store(self.head, Ordering::Release);
        let space_seq = seg.ring_u32(self.ring, SPACE_SEQ);
        space_seq.fetch_add(1, Ordering::SeqCst);
        if seg.ring_u32(self.ring, PRODUCER_SLEEPING).load(Ordering::SeqCst) != 0 {
            futex::wake_all(space_seq);
        }
        Ok(())
    }
}
