//! Weight-streaming speed of the CPU kernels per stored format: one product `x · Wᵀ` of 1, 4, 32 or
//! 64 rows against `[n, k]` matrices (`--n`, `--k`: 4096 each unless given) held as bf16, int8 and
//! int4 (epserve's schemes), cycling
//! over as many copies as make `--total-mb` of each format, so that a run either stays in the
//! caches (small totals) or streams from memory (totals beyond the last-level cache). Prints
//! weights/s and bytes/s per format (docs/benchmarks.md, "Quantized weights"). `bf16·b16` is the bf16
//! matrices multiplied with the rows rounded to bf16 (`--activations bf16`), `int8·a8` and `int4·a8`
//! the quantized ones with int8 activations (`--activations int8`). `--rows 1,4` limits the row counts.
//!
//!   cargo run --release -p epserve-model --example quant_kernels -- [--total-mb 64] [--iterations 3] \
//!     [--n 4096] [--k 4096] [--rows 1,4,32,64]

use std::time::Instant;

use epserve_model::kernels::{self, Weights};
use epserve_model::quant::{QuantMatrix, QuantScheme};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let (n, k) = (arg("--n", 4096), arg("--k", 4096));
    let args: Vec<String> = std::env::args().collect();
    let rows: Vec<usize> = args
        .iter()
        .position(|a| a == "--rows")
        .and_then(|i| args.get(i + 1))
        .map_or_else(|| vec![1, 4, 32, 64], |v| v.split(',').filter_map(|r| r.parse().ok()).collect());
    let total = arg("--total-mb", 64) as f64 * 1e6;
    let iterations = arg("--iterations", 3);
    let w: Vec<half::bf16> =
        (0..n * k).map(|i| half::bf16::from_f32(((i * 7919 % 1000) as f32 - 500.0) / 5000.0)).collect();
    let q8 = QuantMatrix::quantize(Weights::Bf16(&w), (n, k), QuantScheme::Int8).expect("int8");
    let q4 = QuantMatrix::quantize(Weights::Bf16(&w), (n, k), QuantScheme::Int4).expect("int4");
    let copies = |bytes: f64| (total / bytes).ceil().max(1.0) as usize;
    let bf16: Vec<Vec<half::bf16>> = (0..copies((n * k * 2) as f64)).map(|_| w.clone()).collect();
    let int8: Vec<QuantMatrix> = (0..copies(q8.bytes() as f64)).map(|_| q8.clone()).collect();
    let int4: Vec<QuantMatrix> = (0..copies(q4.bytes() as f64)).map(|_| q4.clone()).collect();
    println!(
        "[{n}, {k}] matrices, {:.0} MB of each format ({} / {} / {} copies), {iterations} passes",
        total / 1e6,
        bf16.len(),
        int8.len(),
        int4.len()
    );
    for m in rows {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 / 13.0).collect();
        let mut yt = vec![0f32; n * m];
        let formats: [(&str, Vec<Weights<'_>>, u64); 6] = [
            ("bf16", bf16.iter().map(|w| Weights::Bf16(w)).collect(), (n * k * 2) as u64),
            ("bf16·b16", bf16.iter().map(|w| Weights::Bf16Products(w)).collect(), (n * k * 2) as u64),
            ("int8", int8.iter().map(|q| Weights::Quant(q.view())).collect(), q8.bytes()),
            (
                "int8·a8",
                int8.iter().map(|q| Weights::Quant(q.view().with_int8_activations(true))).collect(),
                q8.bytes(),
            ),
            ("int4", int4.iter().map(|q| Weights::Quant(q.view())).collect(), q4.bytes()),
            (
                "int4·a8",
                int4.iter().map(|q| Weights::Quant(q.view().with_int8_activations(true))).collect(),
                q4.bytes(),
            ),
        ];
        for (name, matrices, bytes) in formats {
            for w in &matrices {
                kernels::rows_times_weight_t(&x, m, *w, n, k, &mut yt);
            }
            // As in a decode step: on the pool, its other threads kept awake between products.
            let t = Instant::now();
            kernels::on_pool(|| {
                kernels::warm_step(|| {
                    for _ in 0..iterations {
                        for w in &matrices {
                            kernels::rows_times_weight_t(&x, m, *w, n, k, &mut yt);
                        }
                    }
                })
            });
            let s = t.elapsed().as_secs_f64() / (iterations * matrices.len()) as f64;
            println!(
                "rows {m:>2}  {name:>8}: {:7.3} ms a matrix, {:6.1} G weights/s, {:6.1} GB/s",
                s * 1e3,
                (n * k) as f64 / s / 1e9,
                bytes as f64 / s / 1e9
            );
        }
    }
}
