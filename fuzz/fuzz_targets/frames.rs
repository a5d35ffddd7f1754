//! Everything that reads network bytes, over arbitrary input:
//! `cargo fuzz run frames` (seed corpus in `fuzz/corpus/frames`, which
//! `tests/fuzz_corpus.rs` also runs as a normal test).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the bytes arrive, the second the limit.
    let (step, max, body) = match data {
        [a, b, rest @ ..] => (*a as usize + 1, 1u64 << (*b % 24), rest),
        _ => (1, 4096, data),
    };
    let out = rpcagent::fuzzing::read_stream(body, step, max);
    assert!(out.largest_payload as u64 <= max);
});
