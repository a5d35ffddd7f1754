//! A shared-memory ring written by a hostile peer (header included), read
//! as the same-host transport reads it: `cargo fuzz run ring` (seed corpus
//! in `fuzz/corpus/ring`, which `tests/fuzz_corpus.rs` also runs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let out = rpcagent::fuzzing::read_ring(data);
    // A corrupt header ends the pair; it is never also read as frames' end.
    assert!(!(out.corrupt && out.refused));
});
