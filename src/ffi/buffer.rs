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
    /// The library's allocation behind `data`.
    pub owner: *mut c_void,
}

impl rpcagent_buffer_t {
    pub(crate) const EMPTY: rpcagent_buffer_t = rpcagent_buffer_t {
        data: std::ptr::null_mut(),
        len: 0,
        owner: std::ptr::null_mut(),
    };

    /// Hands `bytes` to C without copying them.
    pub(crate) fn from_vec(bytes: Vec<u8>) -> rpcagent_buffer_t {
        if bytes.is_empty() {
            return rpcagent_buffer_t::EMPTY;
        }
        let mut owner = Box::new(bytes);
        rpcagent_buffer_t {
            data: owner.as_mut_ptr(),
            len: owner.len(),
            owner: Box::into_raw(owner).cast(),
        }
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
            // SAFETY: a non-NULL owner is the Box<Vec<u8>> from `from_vec`,
            // freed once: the buffer is zeroed right after.
            let bytes = unsafe { Box::from_raw(buf.owner.cast::<Vec<u8>>()) };
            crate::recycle_buffer(*bytes);
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
