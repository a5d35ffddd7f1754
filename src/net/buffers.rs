//! Large message buffers, reused. A fresh multi-megabyte buffer costs a page
//! fault and a page of kernel zeroing per 4 KiB (the bulk of a large round
//! trip's CPU time); a buffer whose pages were already touched costs
//! neither. Replies this process has sent, and buffers the application hands
//! back, wait here for the next large message.

use parking_lot::Mutex;

/// Buffers smaller than this are not worth keeping.
const MIN_KEPT: usize = 1 << 20;
/// How many buffers are kept at most.
const MAX_KEPT: usize = 4;

static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer of exactly `len` bytes, reused when one fits (its old contents
/// are overwritten by the caller before anyone reads them).
pub(crate) fn take(len: usize) -> Vec<u8> {
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
            let mut buf = spare.swap_remove(i);
            drop(spare);
            if buf.len() >= len {
                buf.truncate(len);
            } else {
                buf.resize(len, 0);
            }
            return buf;
        }
    }
    let mut buf = vec![0u8; len];
    super::sys::prefer_huge_pages(&mut buf);
    buf
}

/// Keeps `buf` for a later large message (or drops it).
pub(crate) fn give_back(buf: Vec<u8>) {
    if buf.capacity() < MIN_KEPT {
        return;
    }
    let mut spare = SPARE.lock();
    if spare.len() == MAX_KEPT {
        // Make room by dropping the smallest.
        let smallest = spare
            .iter()
            .enumerate()
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)
            .expect("not empty");
        if spare[smallest].capacity() >= buf.capacity() {
            return;
        }
        spare.swap_remove(smallest);
    }
    spare.push(buf);
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
    }
}
