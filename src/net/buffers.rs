//! Large message buffers, reused. A fresh multi-megabyte buffer costs a page
//! fault and a page of kernel zeroing per 4 KiB (the bulk of a large round
//! trip's CPU time); a buffer whose pages were already touched costs
//! neither. Replies this process has sent, and buffers the application hands
//! back, wait here for the next large message. What is kept is bounded:
//! at most [`MAX_KEPT`] buffers of at least [`MIN_KEPT`] bytes each, and
//! [`MAX_KEPT_BYTES`] in all, per process.

use parking_lot::Mutex;

/// Buffers smaller than this are not worth keeping.
pub(crate) const MIN_KEPT: usize = 1 << 20;
/// How many buffers are kept at most.
pub(crate) const MAX_KEPT: usize = 4;
/// How many bytes the kept buffers hold at most, together (a 256 MiB round
/// trip needs two at its destination: the request's and the reply's).
pub(crate) const MAX_KEPT_BYTES: usize = 512 << 20;

static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer of exactly `len` bytes, reused when one fits (its old contents
/// are overwritten by the caller before anyone reads them).
pub(crate) fn take(len: usize) -> Vec<u8> {
    take_spare(len).unwrap_or_else(|| fresh(len))
}

/// A new zeroed buffer (the kernel maps its pages on first touch).
fn fresh(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    super::sys::prefer_huge_pages(&mut buf);
    buf
}

/// A kept buffer of exactly `len` bytes, if one fits (old contents).
fn take_spare(len: usize) -> Option<Vec<u8>> {
    take_kept(len).map(|mut buf| {
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        buf
    })
}

/// A kept buffer with room for `len` bytes, empty, if one fits.
pub(crate) fn take_spare_empty(len: usize) -> Option<Vec<u8>> {
    take_kept(len).map(|mut buf| {
        buf.clear();
        buf
    })
}

/// A kept buffer with room for `len` bytes, as it was given back.
fn take_kept(len: usize) -> Option<Vec<u8>> {
    if len >= MIN_KEPT {
        let mut spare = SPARE.lock();
        // The smallest that fits, and not one far too large for it.
        let best = spare
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len && b.capacity() / 2 <= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        if let Some(i) = best {
            return Some(spare.remove(i));
        }
    }
    None
}

/// Like [`take`], with every byte zero (a reused buffer is cleared: no
/// bytes of an earlier message show through).
pub(crate) fn take_zeroed(len: usize) -> Vec<u8> {
    // A fresh buffer is zero already (and not yet mapped): only a reused
    // one needs clearing.
    take_spare_zeroed(len).unwrap_or_else(|| fresh(len))
}

/// A kept buffer of exactly `len` bytes, cleared, if one fits.
pub(crate) fn take_spare_zeroed(len: usize) -> Option<Vec<u8>> {
    take_spare_empty(len).map(|mut buf| {
        buf.resize(len, 0);
        buf
    })
}

/// A copy of `data`, in a reused buffer when it is large.
pub(crate) fn copy_of(data: &[u8]) -> Vec<u8> {
    if data.len() < MIN_KEPT {
        return data.to_vec();
    }
    let mut buf = take(data.len());
    buf.copy_from_slice(data);
    buf
}

/// Keeps `buf` for a later large message (or drops it). The newest are
/// kept: room is made by dropping the oldest, so what is kept follows the
/// sizes in use now (keeping the largest instead, a run of 64 MiB calls
/// after 256 MiB ones found no buffer to fit and faulted every page: 0.9
/// GB/s instead of 2.8 on the TCP path here).
pub(crate) fn give_back(buf: Vec<u8>) {
    if buf.capacity() < MIN_KEPT || buf.capacity() > MAX_KEPT_BYTES {
        return;
    }
    let mut spare = SPARE.lock();
    let mut evicted = Vec::new();
    loop {
        let held: usize = spare.iter().map(|b| b.capacity()).sum();
        if spare.len() < MAX_KEPT && held + buf.capacity() <= MAX_KEPT_BYTES {
            break;
        }
        // Oldest first (taking one out keeps the others' order).
        evicted.push(spare.remove(0));
    }
    spare.push(buf);
    drop(spare);
    // Unmapping hundreds of MiB takes a while: not under the lock.
    drop(evicted);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_come_back_with_the_right_length() {
        let mut b = take(3 << 20);
        assert_eq!(b.len(), 3 << 20);
        b[0] = 7;
        let cap = b.capacity();
        give_back(b);
        let again = take(2 << 20);
        assert_eq!(again.len(), 2 << 20);
        assert_eq!(again.capacity(), cap);
        let small = take(100);
        assert_eq!(small, vec![0; 100]);
        let mut dirty = again;
        dirty.fill(9);
        give_back(dirty);
        assert!(take_zeroed(2 << 20).iter().all(|&b| b == 0));
        what_is_kept_stays_within_its_bounds();
    }

    /// Run by the test above (both use the one process-wide store).
    fn what_is_kept_stays_within_its_bounds() {
        // Fresh buffers are lazily mapped: these cost no real memory.
        for _ in 0..3 {
            give_back(vec![0u8; 300 << 20]);
        }
        for _ in 0..8 {
            give_back(vec![0u8; 2 << 20]);
        }
        let spare = SPARE.lock();
        let held: usize = spare.iter().map(|b| b.capacity()).sum();
        assert!(
            spare.len() <= MAX_KEPT && held <= MAX_KEPT_BYTES,
            "{} buffers, {held} bytes",
            spare.len()
        );
        // The newest are kept: the small ones that came last, not the
        // large ones before them (other tests give back small ones too).
        assert!(spare.iter().all(|b| b.capacity() < 300 << 20), "the oldest go first");
    }
}
