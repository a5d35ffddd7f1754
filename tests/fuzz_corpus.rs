//! The fuzz target's seed corpus (`fuzz/corpus/frames`), run as a normal
//! test with the same entry point and the same reading of the first bytes.

use rpcagent::fuzzing::read_stream;

#[test]
fn seed_corpus_is_read_without_panics() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/frames");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).expect("the seed corpus is committed") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        let (step, max, body) = match data.as_slice() {
            [a, b, rest @ ..] => (*a as usize + 1, 1u64 << (*b % 24), rest),
            _ => (1, 4096, &data[..]),
        };
        let out = read_stream(body, step, max);
        assert!(out.largest_payload as u64 <= max);
        seen += 1;
    }
    assert!(seen >= 10, "only {seen} seeds");
}

/// The ring target's seeds (`fuzz/corpus/ring`): frames a peer wrote into a
/// ring are read back, and impossible counters are found corrupt.
#[test]
fn ring_seed_corpus_is_read_without_panics() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/ring");
    let (mut seen, mut frames, mut corrupt) = (0, 0, 0);
    for entry in std::fs::read_dir(dir).expect("the seed corpus is committed") {
        let path = entry.unwrap().path();
        let out = rpcagent::fuzzing::read_ring(&std::fs::read(&path).unwrap());
        assert!(!(out.corrupt && out.refused), "{path:?}");
        if path.ends_with("head_beyond_ring") || path.ends_with("head_backwards") {
            assert!(out.corrupt, "{path:?} was not found corrupt");
        }
        frames += out.frames;
        corrupt += out.corrupt as usize;
        seen += 1;
    }
    assert!(seen >= 10, "only {seen} seeds");
    assert!(frames >= 5, "only {frames} frames read from the seeds");
    assert_eq!(corrupt, 2);
}
