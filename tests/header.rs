//! The committed C header must be exactly what the build generates from the
//! Rust sources. Refresh it with `RPCAGENT_WRITE_HEADER=1 cargo build`.

#[test]
fn committed_header_matches_the_generated_one() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/rpcagent.h"));
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/rpcagent.h"))
        .expect("include/rpcagent.h is committed");
    assert!(
        generated == committed,
        "include/rpcagent.h is stale: run `RPCAGENT_WRITE_HEADER=1 cargo build` and commit it"
    );
}
