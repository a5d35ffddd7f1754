//! Socket plumbing shared by the rendezvous and the TCP transport: the
//! system calls std lacks, and framing a byte stream.

pub(crate) mod buffers;
pub(crate) mod framing;
pub(crate) mod resolve;
#[allow(unsafe_code)]
pub(crate) mod sys;
