//! Building blocks of the same-host transport (issue 15): a byte ring in
//! memory shared with another process (`ring`), and that memory (`memfd`).
//! The transport that pairs ranks of one host through them is the next
//! step; until it lands, these are exercised by their unit tests and the
//! ring fuzz target only.
//!
//! This is one of the few places that talk to the OS (and to memory another
//! process writes): `unsafe` is allowed here, each block saying why.
#![allow(dead_code)] // wired in by the shared-memory transport (issue 15)

pub(crate) mod hostile;
pub(crate) mod memfd;
pub(crate) mod pipe;
pub(crate) mod ring;
