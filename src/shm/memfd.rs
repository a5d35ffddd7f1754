//! Shared memory between two processes of one host, with no file in
//! `/dev/shm` (so a container's small `/dev/shm` does not matter): an
//! anonymous `memfd`, sealed so that neither side can shrink it under the
//! other's mapping (a read past a shrunk file's end would kill the reader
//! with SIGBUS), mapped by both, its descriptor passed over a Unix socket
//! with `SCM_RIGHTS`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Seals every mapping of ours relies on: the size never changes again.
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A shared mapping, unmapped on drop.
pub(crate) struct SharedMemory {
    ptr: *mut u8,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain memory; what lives in it is accessed through
// atomics and raw copies (see `ring`).
unsafe impl Send for SharedMemory {}
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    /// A new zeroed, sealed memfd of `len` bytes, mapped.
    pub(crate) fn create(name: &str, len: usize) -> io::Result<SharedMemory> {
        injected_failure("create")?;
        let cname = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: `cname` is NUL-terminated; the flags are valid.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain calls on our own descriptor.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0
            || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } != 0
        {
            return Err(io::Error::last_os_error());
        }
        SharedMemory::map(fd, len)
    }

    /// Maps a memfd a peer sent, after checking it is sealed against
    /// shrinking and holds at least `len` bytes.
    pub(crate) fn from_peer(fd: OwnedFd, len: usize) -> io::Result<SharedMemory> {
        injected_failure("map")?;
        // SAFETY: plain calls on a descriptor we own.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer's memory is not sealed",
            ));
        }
        // Memory on tmpfs only: a hugetlbfs memfd's pages can be taken
        // back by its owner, and touching them then raises SIGBUS.
        // SAFETY: `fs` is plain data, filled by fstatfs.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut fs) } != 0 || fs.f_type != libc::TMPFS_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer's memory is not plain shared memory (tmpfs)",
            ));
        }
        // SAFETY: `stat` is plain data, filled by fstat.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if (stat.st_size as u64) < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the peer's memory holds {} bytes, {len} expected", stat.st_size),
            ));
        }
        SharedMemory::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<SharedMemory> {
        // SAFETY: a fresh shared mapping of `len` bytes of our descriptor;
        // the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedMemory {
            ptr: ptr as *mut u8,
            len,
            fd,
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `map` with this length, and no
        // reference into it outlives `self` (regions borrow it by contract).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// The test hook `RPCAGENT_TEST_FAIL_SHM` is set to `step`. Read only when
/// a pair sets up its rings.
pub(crate) fn test_hook_is(step: &str) -> bool {
    std::env::var_os("RPCAGENT_TEST_FAIL_SHM").is_some_and(|v| v == step)
}

/// A test hook: `RPCAGENT_TEST_FAIL_SHM=create` makes making shared memory
/// fail as a refused `memfd_create` would, `=map` makes mapping a peer's
/// fail, so tests can check that a pair falls back to TCP.
fn injected_failure(step: &str) -> io::Result<()> {
    if test_hook_is(step) {
        return Err(io::Error::other(format!(
            "shared memory refused (RPCAGENT_TEST_FAIL_SHM={step})"
        )));
    }
    Ok(())
}

/// A test hook (`RPCAGENT_TEST_FAIL_SHM=corrupt`, on the side that accepts
/// the rings): for a few seconds from 300 ms on, a thread keeps writing an
/// impossible write counter over the ring at `offset` of `memory`, as a
/// broken or hostile peer would, through a mapping of its own (so that it
/// never touches memory unmapped under it).
pub(crate) fn corrupt_later_for_test(memory: &SharedMemory, offset: usize) -> io::Result<()> {
    // SAFETY: a close-on-exec dup of a live descriptor, owned by the result.
    let dup = unsafe { libc::fcntl(memory.fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let own = SharedMemory::map(unsafe { OwnedFd::from_raw_fd(dup) }, memory.len())?;
    std::thread::Builder::new()
        .name("rpcagent-test-corrupt".into())
        .spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            for _ in 0..5000 {
                // SAFETY: `offset` is the start of a ring region inside the
                // mapping `own` holds for the thread's life; its first 8 bytes
                // are the ring's write counter, an atomic u64 (8-aligned).
                let head = unsafe { &*(own.as_ptr().add(offset) as *const std::sync::atomic::AtomicU64) };
                head.store(u64::MAX / 3, std::sync::atomic::Ordering::Release);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })?;
    Ok(())
}

/// A control buffer with room for `fd_bytes` of descriptors (8-aligned).
fn control_buffer(fd_bytes: usize) -> Vec<u64> {
    // SAFETY: CMSG_SPACE is arithmetic.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    vec![0u64; space.div_ceil(8)]
}

/// A message header over one buffer and a control buffer; the pointers
/// must outlive its use.
fn message(iov: &mut libc::iovec, control: &mut [u64]) -> libc::msghdr {
    // SAFETY: `msghdr` is plain data, all zeros a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(control) as _;
    msg
}

/// Sends `bytes` with `fds` attached (`SCM_RIGHTS`) in one message.
pub(crate) fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let fd_bytes = std::mem::size_of_val(fds);
    let mut control = if fds.is_empty() {
        Vec::new()
    } else {
        control_buffer(fd_bytes)
    };
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut msg = message(&mut iov, &mut control);
    // SAFETY: every pointer in `msg` outlives the sendmsg call, and the
    // control buffer (when there are descriptors) holds one header with
    // `fd_bytes` of data (CMSG_SPACE).
    unsafe {
        if fds.is_empty() {
            msg.msg_control = std::ptr::null_mut();
            msg.msg_controllen = 0;
        } else {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(cmsg), fd_bytes);
        }
        let sent = libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        if sent as usize != bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "a short send of a descriptor message",
            ));
        }
    }
    Ok(())
}

/// Receives one message of at most `buf.len()` bytes and up to `max_fds`
/// descriptors; returns the bytes read and the descriptors (owned: closed
/// if dropped). A message whose descriptors were cut off is an error.
pub(crate) fn recv_with_fds(sock: &UnixStream, buf: &mut [u8], max_fds: usize) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = control_buffer(max_fds * std::mem::size_of::<RawFd>());
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut msg = message(&mut iov, &mut control);
    let mut fds = Vec::new();
    // SAFETY: as in `send_with_fds`; the kernel writes at most the control
    // buffer's length, and each header it returns is walked with the CMSG
    // macros within `msg_controllen`.
    unsafe {
        let got = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let n = ((*cmsg).cmsg_len as usize - (data as usize - cmsg as usize)) / std::mem::size_of::<RawFd>();
                for i in 0..n {
                    let raw = std::ptr::read_unaligned((data as *const RawFd).add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many descriptors in a message",
            ));
        }
        Ok((got as usize, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::ring::{Consumer, Producer, Region};

    #[test]
    fn a_memfd_passed_over_a_socket_maps_the_same_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let len = Region::bytes_for(4096);
        let mine = SharedMemory::create("rpcagent-test", len).unwrap();
        send_with_fds(&a, b"ring", &[mine.fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, mut fds) = recv_with_fds(&b, &mut buf, 4).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"ring"[..], 1));
        let theirs = SharedMemory::from_peer(fds.pop().unwrap(), len).unwrap();
        assert_ne!(mine.as_ptr(), theirs.as_ptr());
        // SAFETY: both mappings live to the end of the test.
        let (w, r) = unsafe { (Region::new(mine.as_ptr(), len), Region::new(theirs.as_ptr(), len)) };
        let (mut p, mut c) = (Producer::new(w.unwrap()), Consumer::new(r.unwrap()));
        assert_eq!(p.write(&[b"through the kernel's pages"], 0).unwrap().0, 26);
        let mut out = [0u8; 64];
        let (n, _) = c.read(&mut out).unwrap();
        assert_eq!(&out[..n], b"through the kernel's pages");
    }

    #[test]
    fn unsealed_or_short_memory_is_refused() {
        let small = SharedMemory::create("rpcagent-test", 4096).unwrap();
        // SAFETY: dup of a live descriptor, owned by the result.
        let dup = unsafe { OwnedFd::from_raw_fd(libc::dup(small.fd())) };
        assert!(SharedMemory::from_peer(dup, 8192).is_err(), "shorter than promised");
        // SAFETY: a fresh memfd without sealing, owned by the result.
        let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        let unsealed = unsafe { OwnedFd::from_raw_fd(raw) };
        assert_eq!(unsafe { libc::ftruncate(unsealed.as_raw_fd(), 8192) }, 0);
        assert!(SharedMemory::from_peer(unsealed, 8192).is_err(), "not sealed");
    }
}
