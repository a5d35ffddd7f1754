//! Generates the C header from the `extern "C"` surface in `src/ffi/`, and
//! gives the shared library a SONAME that carries the major version.
//!
//! The header goes to `$OUT_DIR/rpcagent.h`; `tests/header.rs` fails when
//! the committed `include/rpcagent.h` differs from it. Refresh the committed
//! copy with `RPCAGENT_WRITE_HEADER=1 cargo build`.

use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("rpcagent.h");
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap();
    let minor = std::env::var("CARGO_PKG_VERSION_MINOR").unwrap();
    let patch = std::env::var("CARGO_PKG_VERSION_PATCH").unwrap();

    let mut config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    config.after_includes = Some(format!(
        "\n#define RPCAGENT_VERSION_MAJOR {major}\n#define RPCAGENT_VERSION_MINOR {minor}\n#define RPCAGENT_VERSION_PATCH {patch}"
    ));
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_src(crate_dir.join("src/ffi/mod.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header")
        .write(&mut generated);
    let header = parenthesize_negative_defines(&String::from_utf8(generated).expect("UTF-8 header"));
    std::fs::write(&out, header).expect("write the header");
    if std::env::var_os("RPCAGENT_WRITE_HEADER").is_some() {
        std::fs::copy(&out, crate_dir.join("include/rpcagent.h")).expect("write include/rpcagent.h");
    }

    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,librpcagent.so.{major}");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=RPCAGENT_WRITE_HEADER");
}

/// `#define X -1` becomes `#define X (-1)`, so `a-X` never reads as `a--1`.
fn parenthesize_negative_defines(header: &str) -> String {
    header
        .lines()
        .map(
            |line| match line.strip_prefix("#define ").and_then(|rest| rest.split_once(' ')) {
                Some((name, value)) if value.starts_with('-') => format!("#define {name} ({value})"),
                _ => line.to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}
