//! Writes a synthetic Llama family for experiments:
//! `cargo run --release -p smelt-core --example gen_family -- DIR LAYERS HIDDEN INTER VOCAB N [sparse]`
//! With `sparse`, shard files get headers only (sparse files of full length),
//! e.g. `DIR 80 8192 28672 128256 2 sparse` for a Llama-3-70B-shaped family.
fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 2 {
        eprintln!("usage: gen_family DIR [LAYERS HIDDEN INTER VOCAB N [sparse]]");
        std::process::exit(2);
    }
    let p = |i: usize, d: usize| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let hidden = p(3, 1024);
    let spec = smelt_core::synth::LlamaSpec {
        layers: p(2, 8),
        hidden,
        intermediate: p(4, 2816),
        vocab: p(5, 32000),
        heads: (hidden / 128).max(1),
        kv_heads: (hidden / 1024).max(1),
        dtype: smelt_core::DType::BF16,
        lm_head: true,
        shard_bytes: 5_000_000_000,
    };
    let root = std::path::Path::new(&a[1]);
    let n = p(6, 2);
    let t = std::time::Instant::now();
    if a.get(7).map(String::as_str) == Some("sparse") {
        for name in std::iter::once("base".to_string()).chain((1..=n).map(|k| format!("ft{k}"))) {
            smelt_core::synth::write_llama_sparse(&root.join(name), &spec)
                .expect("write sparse model");
        }
    } else {
        smelt_core::synth::write_family(root, &spec, 1, n as u64, 0.01).expect("write family");
    }
    eprintln!("generated in {:.1}s", t.elapsed().as_secs_f64());
}
