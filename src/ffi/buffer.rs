//! `rpcagent_buffer_t`: reply bytes owned by the library until freed.

use std::ffi::c_void;

/// Bytes handed to the caller (a call's reply). `owner` is the library's;
/// release the buffer with `rpcagent_buffer_free`.
#[repr(C)]
pub struct rpcagent_buffer_t {
    /// The bytes (NULL when `len` is 0).
    pub data: *mut u8,
    /// How many bytes.
    pub len: usize,
    /// The library's record of the allocation behind `data` (do not touch).
    pub owner: *mut c_void,
}

impl rpcagent_buffer_t {
    pub(crate) const EMPTY: rpcagent_buffer_t = rpcagent_buffer_t {
        data: std::ptr::null_mut(),
        len: 0,
        owner: std::ptr::null_mut(),
    };

    /// Hands `bytes` to C without copying them. `owner` records the
    /// vector's capacity (not a pointer: no allocation per reply for a
    /// box around the vector, which with many calls in flight cost the
    /// allocator's slow path on two threads).
    pub(crate) fn from_vec(bytes: Vec<u8>) -> rpcagent_buffer_t {
        if bytes.is_empty() {
            return rpcagent_buffer_t::EMPTY;
        }
        let mut bytes = std::mem::ManuallyDrop::new(bytes);
        rpcagent_buffer_t {
            data: bytes.as_mut_ptr(),
            len: bytes.len(),
            owner: std::ptr::without_provenance_mut(bytes.capacity()),
        }
    }

    /// The vector `from_vec` handed over, back.
    ///
    /// # Safety
    /// The buffer was filled by `from_vec` and not taken back since.
    unsafe fn take_vec(&self) -> Vec<u8> {
        // SAFETY: `data`, `len` and the capacity in `owner` are those of a
        // vector `from_vec` gave up (non-empty: `data` is its allocation),
        // by the caller's contract.
        unsafe { Vec::from_raw_parts(self.data, self.len, self.owner.addr()) }
    }
}

/// Frees the bytes and zeroes the buffer, so freeing it again (or freeing a
/// zeroed buffer, or NULL) is a no-op.
///
/// # Safety
/// `buf` is NULL or points at a buffer that is zeroed or was filled by this
/// library.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_buffer_free(buf: *mut rpcagent_buffer_t) {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: by the caller's contract `buf` is NULL or a valid buffer.
        let Some(buf) = (unsafe { buf.as_mut() }) else {
            return;
        };
        if !buf.owner.is_null() {
            // SAFETY: a non-NULL owner was set by `from_vec`; taken back
            // once: the buffer is zeroed right after.
            crate::recycle_buffer(unsafe { buf.take_vec() });
        }
        *buf = rpcagent_buffer_t::EMPTY;
    });
}

/// Writes a result into an optional out-buffer (NULL: the bytes are dropped).
///
/// # Safety
/// `out` is NULL or valid for a write of a buffer.
pub(crate) unsafe fn put_buffer(out: *mut rpcagent_buffer_t, bytes: Vec<u8>) {
    if !out.is_null() {
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { out.write(rpcagent_buffer_t::from_vec(bytes)) };
    }
}
