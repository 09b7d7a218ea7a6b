//! Shared helpers for the CLI integration tests: run the real `smelt`
//! binary, read safetensors outputs back.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use smelt_core::io::ModelTensors;

pub fn smelt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smelt"))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `smelt merge CONFIG OUT ARGS...` in `cwd`.
pub fn merge(cwd: &Path, config: &Path, out: &Path, args: &[&str]) -> Output {
    smelt()
        .current_dir(cwd)
        .arg("merge")
        .arg(config)
        .arg(out)
        .arg("--quiet")
        .args(args)
        .output()
        .expect("smelt runs")
}

pub fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "smelt failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Every tensor of a model directory as (dtype name, shape, raw bytes).
pub fn read_model(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let m = ModelTensors::open_dir(dir, "out").expect("output readable");
    m.tensors
        .keys()
        .map(|n| {
            let (loc, bytes) = m.read_raw(n).expect("tensor readable");
            (
                n.clone(),
                (loc.dtype.safetensors_name().to_string(), loc.shape, bytes),
            )
        })
        .collect()
}

/// Every tensor decoded to f32.
pub fn read_values(dir: &Path) -> BTreeMap<String, smelt_core::Tensor> {
    let m = ModelTensors::open_dir(dir, "out").expect("output readable");
    m.tensors
        .keys()
        .map(|n| (n.clone(), m.read(n).expect("tensor readable")))
        .collect()
}

/// All files of a directory with their bytes.
pub fn dir_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).expect("file"),
            )
        })
        .collect()
}

pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write file");
}
