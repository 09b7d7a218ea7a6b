//! Writes a synthetic Llama family: `cargo run --release -p smelt-core --example gen_family -- DIR LAYERS HIDDEN INTER VOCAB N`
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let p = |i: usize, d: usize| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let spec = smelt_core::synth::LlamaSpec {
        layers: p(2, 8),
        hidden: p(3, 1024),
        intermediate: p(4, 2816),
        vocab: p(5, 32000),
        heads: 16,
        kv_heads: 8,
        dtype: smelt_core::DType::BF16,
        lm_head: true,
        shard_bytes: 200_000_000,
    };
    let t = std::time::Instant::now();
    smelt_core::synth::write_family(std::path::Path::new(&a[1]), &spec, 1, p(6, 2) as u64, 0.01)
        .unwrap();
    eprintln!("generated in {:.1}s", t.elapsed().as_secs_f64());
}
