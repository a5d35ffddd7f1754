//! A single-producer, single-consumer byte ring in memory shared with
//! another process: one direction of a same-host pair. It carries the same
//! byte stream a TCP connection does (frames are parsed by the same reader),
//! so it knows nothing of frames; it is sans-IO: the caller rings the
//! doorbells it is told to.
//!
//! Layout of a region (`HEADER` bytes, then a power-of-two data area):
//!
//! | offset | field | written by |
//! |---|---|---|
//! | 0 | `head`: bytes ever written (u64) | producer |
//! | 128 | `tail`: bytes ever read (u64) | consumer |
//! | 256 | `reader_sleeps` (u32): the consumer will sleep until told | consumer sets, producer clears |
//! | 320 | `writer_waits` (u32): the producer waits for room | producer sets, consumer clears |
//! | 384 | `cancels` (16 x u64): ids of calls the producer cancelled, newest over oldest (0: none) | producer |
//!
//! Each counter sits on its own pair of cache lines, so the two sides never
//! write the same line.
//!
//! **Nothing read from the region is trusted.** Each side keeps its own
//! counter locally and only reads the other's; a value that cannot be right
//! (more bytes ready than the ring holds, a counter that went backwards) is
//! `Corrupt`, and the caller closes the pair. Offsets into the data area
//! are taken modulo its size, so no value the peer writes can make this
//! side touch memory outside the region.
//!
//! Doorbells (the eventcount pattern): a side about to sleep sets its flag,
//! then looks once more (`prepare_sleep`, `prepare_wait_for_room`); the
//! other side, after publishing its counter, swaps the flag to 0 and rings
//! the doorbell only if it was set. A full fence on both sides between the
//! store and the load keeps either from missing the other. A busy pipeline
//! therefore makes no system call per message.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};

/// Bytes before the data area.
pub(crate) const HEADER: usize = 512;
const HEAD: usize = 0;
const TAIL: usize = 128;
const READER_SLEEPS: usize = 256;
const WRITER_WAITS: usize = 320;
const CANCELS: usize = 384;
/// How many cancelled ids the header holds (the newest ones).
const CANCEL_SLOTS: usize = 16;

/// The peer wrote a value into the ring's header that cannot be right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Corrupt(pub(crate) String);

/// Whether the caller must ring the other side's doorbell (it announced
/// that it sleeps).
pub(crate) type Wake = bool;

/// A ring's memory: `len` bytes at `base`, 8-byte aligned, `len - HEADER` a
/// power of two, mapped (shared) for as long as the value lives.
pub(crate) struct Region {
    base: *mut u8,
    capacity: u64,
}

// SAFETY: the region is plain shared memory; every access goes through
// atomics (the header) or raw copies of bytes (the data area), whose
// exclusive use the ring's protocol gives each side.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    /// The size of a region whose data area holds `capacity` bytes.
    pub(crate) fn bytes_for(capacity: usize) -> usize {
        HEADER + capacity
    }

    /// # Safety
    /// `base` points to `len` bytes, 8-byte aligned, that stay mapped
    /// while the region (and any side or marks made from it) lives.
    pub(crate) unsafe fn new(base: *mut u8, len: usize) -> Result<Region, Corrupt> {
        let capacity = len.saturating_sub(HEADER);
        if !capacity.is_power_of_two() || !(base as usize).is_multiple_of(8) {
            return Err(Corrupt(format!(
                "a ring of {len} bytes is not a header plus a power of two"
            )));
        }
        Ok(Region {
            base,
            capacity: capacity as u64,
        })
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: `offset` is one of the header's 8-byte aligned fields,
        // inside the region (`new` checked it holds the header); atomics
        // may be shared with another process.
        unsafe { &*(self.base.add(offset) as *const AtomicU64) }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: as in `u64_at`.
        unsafe { &*(self.base.add(offset) as *const AtomicU32) }
    }

    /// How many bytes a side copies before it publishes its counter: a
    /// quarter of the ring, at most 64 KiB. Publishing only after a whole
    /// ring would make a large transfer alternate (the consumer empties
    /// the ring, then the producer refills it) instead of overlapping the
    /// two copies.
    fn chunk(&self) -> usize {
        (self.capacity as usize / 4).clamp(1, 64 << 10)
    }

    /// Copies `src` into the data area from stream position `pos` on,
    /// wrapping at its end. `src.len() <= capacity`.
    fn copy_in(&self, pos: u64, src: &[u8]) {
        let start = (pos % self.capacity) as usize;
        let first = src.len().min(self.capacity as usize - start);
        // SAFETY: both ranges lie in the data area (start < capacity, first
        // <= capacity - start, the rest <= start); the producer owns the
        // free part of the ring it writes, by the protocol.
        unsafe {
            let data = self.base.add(HEADER);
            std::ptr::copy_nonoverlapping(src.as_ptr(), data.add(start), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), data, src.len() - first);
        }
    }

    /// Copies from the data area at stream position `pos` into `dst`.
    fn copy_out(&self, pos: u64, dst: &mut [u8]) {
        let start = (pos % self.capacity) as usize;
        let first = dst.len().min(self.capacity as usize - start);
        // SAFETY: as in `copy_in`; the consumer owns the filled part. A
        // peer breaking the protocol can only change the bytes it gets.
        unsafe {
            let data = self.base.add(HEADER);
            std::ptr::copy_nonoverlapping(data.add(start), dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(data, dst.as_mut_ptr().add(first), dst.len() - first);
        }
    }
}

/// The ids of calls the producer cancelled (the header's `cancels`),
/// written and read without either side's lock: the producer marks a
/// cancel there at once (whoever holds the ring to write), and a thread
/// serving a request that came through the ring sees it before the
/// cancel's frame is read (that needs the reader, which may be asleep). A
/// mark is a hint the frame confirms: a peer can only mark its own calls,
/// as its frames can only cancel them, so marks are not checked.
pub(crate) struct CancelMarks {
    base: *const u8,
    /// The producer's count of marks made (the next slot, modulo the slots).
    made: AtomicUsize,
}

// SAFETY: as for `Region`: the words are touched as atomics only, and the
// mapping outlives the marks (the pipe owns both).
unsafe impl Send for CancelMarks {}
unsafe impl Sync for CancelMarks {}

impl CancelMarks {
    fn slot(&self, i: usize) -> &AtomicU64 {
        // SAFETY: slot `i % CANCEL_SLOTS` is an 8-byte aligned word of the
        // header, inside the region (`Region::new` checked it holds the
        // header); atomics may be shared with another process.
        unsafe { &*(self.base.add(CANCELS + 8 * (i % CANCEL_SLOTS)) as *const AtomicU64) }
    }

    /// The producer's side: marks call `id` cancelled, over the oldest mark.
    pub(crate) fn mark(&self, id: u64) {
        self.slot(self.made.fetch_add(1, Ordering::Relaxed))
            .store(id, Ordering::Release);
    }

    /// The consumer's side: whether call `id` (never 0) is among the newest
    /// cancelled ids.
    pub(crate) fn contains(&self, id: u64) -> bool {
        id != 0 && (0..CANCEL_SLOTS).any(|i| self.slot(i).load(Ordering::Acquire) == id)
    }
}

impl Region {
    /// The cancel marks in this region's header.
    pub(crate) fn cancel_marks(&self) -> CancelMarks {
        CancelMarks {
            base: self.base,
            made: AtomicUsize::new(0),
        }
    }
}

/// Takes the other side's "I sleep" flag, after this side published its
/// counter (and fenced): true if it was set (ring its doorbell). A plain
/// load first: a swap every chunk would take the line from the other
/// side's cache.
fn take_flag(flag: &AtomicU32) -> bool {
    flag.load(Ordering::Relaxed) != 0 && flag.swap(0, Ordering::AcqRel) != 0
}

/// The writing side. Its `head` is its own count, never read back.
pub(crate) struct Producer {
    region: Region,
    head: u64,
    /// The last `tail` read, to find a counter going backwards.
    seen_tail: u64,
}

impl Producer {
    /// The producer of a fresh (zeroed) region.
    pub(crate) fn new(region: Region) -> Producer {
        Producer {
            region,
            head: 0,
            seen_tail: 0,
        }
    }

    /// How many bytes it publishes at a time.
    pub(crate) fn chunk(&self) -> usize {
        self.region.chunk()
    }

    /// Bytes that fit now.
    pub(crate) fn room(&mut self) -> Result<u64, Corrupt> {
        let tail = self.region.u64_at(TAIL).load(Ordering::Acquire);
        let used = self.head.wrapping_sub(tail);
        if used > self.region.capacity || tail.wrapping_sub(self.seen_tail) > self.region.capacity {
            return Err(Corrupt(format!(
                "read counter {tail} is impossible (written {}, ring of {})",
                self.head, self.region.capacity
            )));
        }
        self.seen_tail = tail;
        Ok(self.region.capacity - used)
    }

    /// Writes as much of `parts` (from byte `skip` of their concatenation
    /// on) as fits; returns the bytes written, and whether to ring the
    /// consumer's doorbell. Bytes are published a chunk at a time (the
    /// consumer copies one out while this side copies the next in), and
    /// room freed meanwhile is used. A write that finds the consumer
    /// asleep stops after that chunk, so the caller rings at once.
    pub(crate) fn write<P: AsRef<[u8]>>(&mut self, parts: &[P], skip: usize) -> Result<(usize, Wake), Corrupt> {
        let chunk = self.region.chunk();
        let mut room = self.room()? as usize;
        let mut skip = skip;
        let (mut wrote, mut unpublished) = (0, 0);
        'parts: for part in parts {
            let part = part.as_ref();
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            let mut data = &part[skip..];
            skip = 0;
            while !data.is_empty() {
                if room == 0 {
                    // The bytes not yet published are not counted by the
                    // consumer's counter: they take room too.
                    room = (self.room()? as usize).saturating_sub(unpublished);
                    if room == 0 {
                        break 'parts;
                    }
                }
                let n = data.len().min(room).min(chunk - unpublished);
                self.region
                    .copy_in(self.head.wrapping_add(unpublished as u64), &data[..n]);
                (wrote, unpublished, room, data) = (wrote + n, unpublished + n, room - n, &data[n..]);
                if unpublished == chunk {
                    let wake = self.publish(unpublished);
                    unpublished = 0;
                    if wake {
                        return Ok((wrote, true));
                    }
                }
            }
        }
        let wake = unpublished > 0 && self.publish(unpublished);
        Ok((wrote, wake))
    }

    /// Makes `n` more written bytes visible; true if the consumer said it
    /// sleeps (the flag is taken: ring its doorbell).
    fn publish(&mut self, n: usize) -> Wake {
        self.head = self.head.wrapping_add(n as u64);
        self.region.u64_at(HEAD).store(self.head, Ordering::Release);
        fence(Ordering::SeqCst);
        take_flag(self.region.u32_at(READER_SLEEPS))
    }

    /// About to wait for `need` bytes of room: announces it, then looks
    /// again. True if the room is there already (do not wait).
    /// The flag is left set even then: taking it back could race with the
    /// consumer's swap and lose a ring another waiter needs; an extra ring
    /// costs the consumer one system call.
    pub(crate) fn prepare_wait_for_room(&mut self, need: u64) -> Result<bool, Corrupt> {
        let need = need.min(self.region.capacity);
        self.region.u32_at(WRITER_WAITS).store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        Ok(self.room()? >= need)
    }
}

/// The reading side. Its `tail` is its own count, never read back.
pub(crate) struct Consumer {
    region: Region,
    tail: u64,
}

impl Consumer {
    /// The consumer of a fresh (zeroed) region.
    pub(crate) fn new(region: Region) -> Consumer {
        Consumer { region, tail: 0 }
    }

    /// Bytes ready to read.
    pub(crate) fn ready(&self) -> Result<u64, Corrupt> {
        let head = self.region.u64_at(HEAD).load(Ordering::Acquire);
        let ready = head.wrapping_sub(self.tail);
        if ready > self.region.capacity {
            return Err(Corrupt(format!(
                "write counter {head} is impossible (read {}, ring of {})",
                self.tail, self.region.capacity
            )));
        }
        Ok(ready)
    }

    /// Reads up to `out.len()` bytes; returns how many, and whether to ring
    /// the producer's doorbell (it waits for room). Room is given back a
    /// chunk at a time (the producer refills it while this side copies
    /// on), and bytes written meanwhile are read too. A read that finds
    /// the producer waiting stops after that chunk, so the caller rings
    /// at once.
    pub(crate) fn read(&mut self, out: &mut [u8]) -> Result<(usize, Wake), Corrupt> {
        let chunk = self.region.chunk();
        let mut got = 0;
        let mut ready = 0;
        while got < out.len() {
            if ready == 0 {
                ready = self.ready()? as usize;
                if ready == 0 {
                    break;
                }
            }
            let n = (out.len() - got).min(ready).min(chunk);
            self.region.copy_out(self.tail, &mut out[got..got + n]);
            (got, ready) = (got + n, ready - n);
            self.tail = self.tail.wrapping_add(n as u64);
            self.region.u64_at(TAIL).store(self.tail, Ordering::Release);
            fence(Ordering::SeqCst);
            if take_flag(self.region.u32_at(WRITER_WAITS)) {
                return Ok((got, true));
            }
        }
        Ok((got, false))
    }

    /// About to sleep: announces it, then looks again. True if bytes
    /// arrived meanwhile (do not sleep).
    /// The flag is left set even then (see `prepare_wait_for_room`).
    pub(crate) fn prepare_sleep(&self) -> Result<bool, Corrupt> {
        self.region.u32_at(READER_SLEEPS).store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        Ok(self.ready()? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A region on the heap (8-byte aligned), for tests.
    struct Heap(Vec<u64>);

    impl Heap {
        fn new(capacity: usize) -> Heap {
            Heap(vec![0; Region::bytes_for(capacity) / 8])
        }
        fn region(&mut self) -> Region {
            // SAFETY: the vector outlives every region made of it in these tests.
            unsafe { Region::new(self.0.as_mut_ptr() as *mut u8, self.0.len() * 8) }.unwrap()
        }
        fn set_u64(&mut self, offset: usize, v: u64) {
            self.0[offset / 8] = v;
        }
    }

    #[test]
    fn bytes_cross_in_order_through_many_wraps() {
        let mut heap = Heap::new(64);
        let (mut p, mut c) = (Producer::new(heap.region()), Consumer::new(heap.region()));
        let sent: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (mut at, mut got) = (0, Vec::new());
        let mut buf = [0u8; 23];
        while got.len() < sent.len() {
            let end = (at + 37).min(sent.len());
            let (n, _) = p.write(&[&sent[at..end]], 0).unwrap();
            at += n;
            let (m, _) = c.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..m]);
        }
        assert_eq!(got, sent);
    }

    #[test]
    fn cancel_marks_hold_the_newest_ids() {
        let mut heap = Heap::new(64);
        let region = heap.region();
        let (marker, marks) = (region.cancel_marks(), region.cancel_marks());
        assert!(!marks.contains(0), "an empty slot is no id");
        assert!(!marks.contains(7));
        marker.mark(7);
        assert!(marks.contains(7));
        for id in 100..100 + CANCEL_SLOTS as u64 {
            marker.mark(id);
        }
        assert!(!marks.contains(7), "the oldest mark is overwritten");
        assert!(marks.contains(100) && marks.contains(99 + CANCEL_SLOTS as u64));
    }

    #[test]
    fn writes_split_parts_and_stop_when_full() {
        let mut heap = Heap::new(16);
        let (mut p, mut c) = (Producer::new(heap.region()), Consumer::new(heap.region()));
        let (n, _) = p.write(&[&b"abc"[..], b"defghij", b"klmnopqrstu"], 1).unwrap();
        assert_eq!(n, 16);
        assert_eq!(p.write(&[b"x"], 0).unwrap(), (0, false));
        let mut out = [0u8; 32];
        assert_eq!(c.read(&mut out).unwrap().0, 16);
        assert_eq!(&out[..16], b"bcdefghijklmnopq");
    }

    #[test]
    fn bytes_not_yet_published_count_against_the_room() {
        // A ring of 64 publishes every 16 bytes. With 54 unread, a write of
        // 30 fits 10 (not published yet when the room runs out); looking
        // again must not count those 10 as free.
        let mut heap = Heap::new(64);
        let (mut p, mut c) = (Producer::new(heap.region()), Consumer::new(heap.region()));
        let first: Vec<u8> = (0..54).collect();
        assert_eq!(p.write(&[&first], 0).unwrap().0, 54);
        let second: Vec<u8> = (100..130).collect();
        assert_eq!(p.write(&[&second], 0).unwrap().0, 10);
        let mut out = [0u8; 64];
        assert_eq!(c.read(&mut out).unwrap().0, 64);
        assert_eq!(&out[..54], &first[..]);
        assert_eq!(&out[54..], &second[..10]);
    }

    #[test]
    fn a_large_write_is_published_a_chunk_at_a_time() {
        // The consumer sees the first chunk while the rest is unread: a
        // reader waking mid-write finds bytes before the write ends. A
        // sleeping reader is woken after the first chunk: the write stops
        // there so that the caller rings at once.
        let mut heap = Heap::new(1 << 16);
        let (mut p, c) = (Producer::new(heap.region()), Consumer::new(heap.region()));
        assert!(!c.prepare_sleep().unwrap());
        let data = vec![7u8; 1 << 15];
        assert_eq!(p.write(&[&data], 0).unwrap(), (1 << 14, true));
        assert_eq!(c.ready().unwrap(), 1 << 14);
        assert_eq!(p.write(&[&data[1 << 14..]], 0).unwrap(), (1 << 14, false));
        assert_eq!(c.ready().unwrap(), 1 << 15);
    }

    #[test]
    fn two_threads_stream_a_megabyte() {
        let mut heap = Heap::new(4096);
        let (mut p, mut c) = (Producer::new(heap.region()), Consumer::new(heap.region()));
        let total = 1 << 20;
        let writer = std::thread::spawn(move || {
            let data: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
            let mut at = 0;
            while at < total {
                at += p.write(&[&data[at..(at + 1000).min(total)]], 0).unwrap().0;
                if at < total && !p.prepare_wait_for_room(1).unwrap() {
                    std::thread::yield_now();
                }
            }
        });
        let mut buf = vec![0u8; 777];
        let mut got = 0usize;
        while got < total {
            let (n, _) = c.read(&mut buf).unwrap();
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, ((got + k) % 253) as u8);
            }
            got += n;
            if n == 0 {
                std::thread::yield_now();
            }
        }
        writer.join().unwrap();
    }

    #[test]
    fn doorbells_ring_only_for_a_side_that_announced_sleep() {
        let mut heap = Heap::new(8);
        let (mut p, mut c) = (Producer::new(heap.region()), Consumer::new(heap.region()));
        assert_eq!(p.write(&[b"a"], 0).unwrap(), (1, false));
        assert!(c.prepare_sleep().unwrap(), "a byte is ready: no sleep");
        assert_eq!(
            p.write(&[b"b"], 0).unwrap(),
            (1, true),
            "the flag stays: one spare ring"
        );
        let mut out = [0u8; 8];
        assert_eq!(c.read(&mut out).unwrap(), (2, false));
        assert!(!c.prepare_sleep().unwrap());
        assert_eq!(p.write(&[b"c"], 0).unwrap(), (1, true));
        assert_eq!(p.write(&[b"d"], 0).unwrap(), (1, false), "one ring per sleep");
        // The writer fills the ring and waits for room; a read wakes it.
        assert_eq!(p.write(&[b"efghij"], 0).unwrap().0, 6);
        assert!(!p.prepare_wait_for_room(1).unwrap());
        assert_eq!(c.read(&mut out[..1]).unwrap(), (1, true));
        assert!(p.prepare_wait_for_room(1).unwrap());
    }

    #[test]
    fn impossible_counters_are_corrupt() {
        let mut heap = Heap::new(16);
        let (mut p, c) = (Producer::new(heap.region()), Consumer::new(heap.region()));
        heap.set_u64(HEAD, 17);
        assert!(c.ready().is_err(), "more ready than the ring holds");
        heap.set_u64(HEAD, u64::MAX);
        assert!(c.ready().is_err(), "a counter gone backwards");
        heap.set_u64(TAIL, 5);
        assert!(p.room().is_err(), "read past what was written");
        heap.set_u64(TAIL, 0);
        assert_eq!(p.room().unwrap(), 16);
    }

    #[test]
    fn a_region_must_be_a_header_and_a_power_of_two() {
        let mut v = vec![0u64; 100];
        // SAFETY: the vector lives through the calls.
        assert!(unsafe { Region::new(v.as_mut_ptr() as *mut u8, HEADER + 24) }.is_err());
        assert!(unsafe { Region::new(v.as_mut_ptr() as *mut u8, HEADER) }.is_err());
        assert!(unsafe { Region::new((v.as_mut_ptr() as *mut u8).wrapping_add(1), HEADER + 16) }.is_err());
        assert!(unsafe { Region::new(v.as_mut_ptr() as *mut u8, HEADER + 16) }.is_ok());
    }
}
