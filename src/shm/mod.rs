//! What the same-host stream (`transport::tcp::stream`) is made of: a byte
//! ring in memory shared with another process (`ring`), that memory and
//! passing it (`memfd`), one pair's two rings with their doorbells
//! (`pipe`), and a peer writing anything into a ring, for the fuzz target
//! (`hostile`).
//!
//! This is one of the few places that talk to the OS (and to memory another
//! process writes): `unsafe` is allowed here, each block saying why.

pub(crate) mod hostile;
pub(crate) mod memfd;
pub(crate) mod pipe;
pub(crate) mod ring;
