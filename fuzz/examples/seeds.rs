//! Writes a seed corpus for every fuzz target into `fuzz/corpus/<target>/`:
//! valid inputs made by weir's own encoders, so that the fuzzer starts from
//! inputs that get deep and mutates from there. The corpus is not kept in
//! git; this program makes it again.
//!
//! Run: `cargo run --manifest-path fuzz/Cargo.toml --example seeds`.

use std::path::Path;

use weir_fuzz::seeds;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut written = 0;
    for (target, inputs) in [
        ("frame", seeds::frame()),
        ("record", seeds::record()),
        ("segment_recovery", seeds::segment_recovery()?),
        ("config", seeds::config()),
    ] {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (i, seed) in inputs.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:03}")), seed)?;
        }
        println!("{}: {} seeds in {}", target, inputs.len(), dir.display());
        written += inputs.len();
    }
    println!("{written} seeds written");
    Ok(())
}
