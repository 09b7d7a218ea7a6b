//! Throughput of the packed CPU GEMM against candle's matmul (best of N,
//! interleaved so both see the same machine noise).
use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    let dev = Device::Cpu;
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    for &(m, k, n) in &[
        (2048usize, 768usize, 768usize),
        (2048, 768, 2048),
        (2048, 2048, 768),
        (512, 768, 32000),
        (16, 768, 2048),
    ] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let p = smelt_eval::cpu::Packed::new(&wv, n, k);
        let mut out = vec![0f32; m * n];
        let (mut dt, mut dt2) = (f64::MAX, f64::MAX);
        for _ in 0..reps {
            let t = Instant::now();
            let _ = a.matmul(&w.t().unwrap()).unwrap();
            dt = dt.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            smelt_eval::cpu::matmul(&av, m, &p, &mut out);
            dt2 = dt2.min(t.elapsed().as_secs_f64());
        }
        let f = 2.0 * (m * k * n) as f64 / 1e9;
        println!(
            "{m:>5} {k:>5} {n:>6}  candle {:6.1}  packed {:6.1} GFLOP/s",
            f / dt,
            f / dt2
        );
    }
}
