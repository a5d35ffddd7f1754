//! Property tests of everything that reads network bytes: arbitrary and
//! mutated input never panics, never yields a payload above the limit, and
//! valid frames survive any split.

use proptest::prelude::*;
use rpcagent::fuzzing::{decode_payload, read_stream};
use rpcagent::wire::{self, HEADER_LEN, Header, Kind};

const KINDS: [Kind; 12] = [
    Kind::Hello,
    Kind::Welcome,
    Kind::Request,
    Kind::Response,
    Kind::Goodbye,
    Kind::Challenge,
    Kind::Proof,
    Kind::Cancel,
    Kind::Join,
    Kind::Table,
    Kind::Refused,
    Kind::Missing,
];

fn frame(kind: Kind, id: u64, name: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut h = Header::new(kind);
    h.request_id = id;
    wire::encode_frame(h, name, payload)
}

prop_compose! {
    fn any_frame()(kind in 0..KINDS.len(), id in any::<u64>(),
                   name in proptest::collection::vec(any::<u8>(), 0..=255),
                   payload in proptest::collection::vec(any::<u8>(), 0..5000)) -> Vec<u8> {
        frame(KINDS[kind], id, &name, &payload)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_headers_decode_within_limits(bytes in proptest::array::uniform32(any::<u8>()), tail in any::<[u8; 8]>(), max in 0u64..1 << 40) {
        // A valid magic and version, so the checks behind them are reached.
        let mut b = [0u8; HEADER_LEN];
        b[..32].copy_from_slice(&bytes);
        b[32..].copy_from_slice(&tail);
        b[..4].copy_from_slice(&wire::MAGIC);
        b[4] = wire::VERSION;
        if let Ok(h) = wire::decode_header(&b, max) {
            prop_assert!(h.name_len as usize <= wire::MAX_NAME_LEN);
            prop_assert!(h.payload_len <= max);
            prop_assert_eq!(wire::encode_header(&h), b);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..20_000), step in 1usize..5000, max in 0u64..100_000) {
        let out = read_stream(&data, step, max);
        prop_assert!(out.largest_payload as u64 <= max);
    }

    #[test]
    fn arbitrary_payloads_never_panic_any_decoder(kind in 0..KINDS.len(), payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
        decode_payload(KINDS[kind], &payload);
    }

    #[test]
    fn valid_frames_survive_any_split(frames in proptest::collection::vec(any_frame(), 1..8), step in 1usize..70_000) {
        let data: Vec<u8> = frames.concat();
        let out = read_stream(&data, step, 1 << 20);
        prop_assert!(!out.refused);
        prop_assert_eq!(out.frames, frames.len());
    }

    #[test]
    fn mutated_frames_are_read_or_refused_never_mishandled(
        frames in proptest::collection::vec(any_frame(), 1..6),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        step in 1usize..10_000,
    ) {
        let mut data: Vec<u8> = frames.concat();
        for (at, value) in flips {
            let i = at.index(data.len());
            data[i] = value;
        }
        data.truncate(cut.index(data.len() + 1));
        let out = read_stream(&data, step, 4096);
        prop_assert!(out.largest_payload <= 4096);
        prop_assert!(out.frames <= frames.len() + data.len() / HEADER_LEN);
    }
}
