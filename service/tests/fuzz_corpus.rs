//! Every input the fuzz targets' corpus keeps (`fuzz/corpus/<target>`: what cargo-fuzz found
//! interesting, minimised; add a crash's input there when fixing it) through the same properties the targets
//! check (`ckpt_core::fuzzing`, `ckpt_service::fuzzing`), on stable, so CI replays it on every
//! change. The sanitizer builds of the targets themselves are `.ci/fuzz-replay` (nightly).

use std::path::{Path, PathBuf};

use ckpt_core::fuzzing;
use ckpt_service::fuzzing::Harness;

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} holds no inputs: the kept corpus is gone", dir.display());
    inputs
}

/// Runs `property` on each kept input of `target`, naming the input that breaks it.
fn replay(target: &str, property: impl Fn(&[u8])) {
    let inputs = inputs(target);
    for path in &inputs {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| property(&bytes))).is_err() {
            panic!("the kept fuzz input {} breaks {target}'s property (its panic is above)", path.display());
        }
    }
    eprintln!("{target}: {} kept inputs replayed", inputs.len());
}

#[test]
fn the_kept_corpus_replays_through_the_parsers() {
    replay("commit_object", fuzzing::commit_object);
    replay("shard_index", fuzzing::shard_index);
    replay("stored_chunk", fuzzing::stored_chunk);
    replay("store_key", fuzzing::store_key_bytes);
}

#[test]
fn the_kept_corpus_replays_through_the_http_handlers() {
    let dir = tempfile::tempdir().unwrap();
    let harness = Harness::new(dir.path());
    replay("http", |data| harness.check_bytes(data));
}
