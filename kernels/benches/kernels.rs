//! The block matmul kernels on SmolLM2-135M's shapes: decode (one activation row) and
//! prefill (64 rows), for every block type, on the SIMD path and the portable one.
//! Throughput is the weight bytes read per call, so criterion prints the achieved GB/s
//! (decode reads every weight once per token, so this is the number that bounds it).
//!
//!   cargo bench -p llama-kernels --bench kernels [-- FILTER]
//!
//! Every type also runs packed (`Q4_1/packed/Auto` with VNNI where the CPU has it,
//! `Q4_1/packed/Avx2` without), the layout the CPU pipeline gives it. `memory/read`
//! beside them is this machine's read bandwidth (a sum over a 256 MiB buffer, on one
//! thread and on every thread): the roofline of decode.
//!
//! Threads: rayon's default (every core) unless `RAYON_NUM_THREADS` is set.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use llama_kernels::quant::{matmul, GgmlType, Kernel, QMatrix};
use llama_kernels::{attention, AttentionShape, KvRows};

/// Random blocks with sane f16 scales (speed does not depend on the values).
fn blocks(ty: GgmlType, rows: usize, cols: usize) -> QMatrix {
    let mut x = 0x9E3779B97F4A7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    let mut bytes = Vec::new();
    for _ in 0..rows * cols / ty.block_len() {
        let mut b: Vec<u8> = (0..ty.block_bytes()).map(|_| next() as u8).collect();
        match ty {
            GgmlType::Q6K => b[208..210].copy_from_slice(&scale),
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => {
                b[..2].copy_from_slice(&scale);
                b[2..4].copy_from_slice(&scale);
            }
            _ => b[..2].copy_from_slice(&scale),
        }
        bytes.extend(b);
    }
    QMatrix::from_bytes(ty, rows, cols, bytes).expect("whole blocks")
}

fn kernels(c: &mut Criterion) {
    // SmolLM2-135M: d_model 576, ffn 1536; gate+up fused is 3072 x 576, down 576 x 1536.
    let shapes: [(&str, usize, usize); 2] = [("gate_up", 3072, 576), ("down", 576, 1536)];
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];
    for (name, rows, cols) in shapes {
        for n in [1, 64] {
            let mut group = c.benchmark_group(format!("{name}_{rows}x{cols}_n{n}"));
            for ty in types {
                if !cols.is_multiple_of(ty.block_len()) {
                    continue; // K-quants need rows of whole 256-value super-blocks
                }
                let w = blocks(ty, rows, cols);
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| ((i % 7) as f32 - 3.0) * 0.1)
                    .collect();
                group.throughput(Throughput::Bytes(w.bytes() as u64));
                for kernel in [Kernel::Auto, Kernel::Portable] {
                    let id = BenchmarkId::new(format!("{}/{kernel:?}", ty.name()), n);
                    group.bench_function(id, |b| b.iter(|| matmul(&x, n, &w, kernel)));
                }
                if let Some(packed) = w.pack() {
                    for kernel in [Kernel::Auto, Kernel::Avx2] {
                        let id = BenchmarkId::new(format!("{}/packed/{kernel:?}", ty.name()), n);
                        group.bench_function(id, |b| b.iter(|| matmul(&x, n, &packed, kernel)));
                    }
                }
            }
            group.finish();
        }
    }
}

/// Read bandwidth: sums of u64 words over a buffer far larger than any cache.
fn memory(c: &mut Criterion) {
    use rayon::prelude::*;
    let words: Vec<u64> = (0..32u64 << 20).collect(); // 256 MiB
    let mut group = c.benchmark_group("memory");
    group.throughput(Throughput::Bytes((words.len() * 8) as u64));
    group.bench_function("read/1-thread", |b| {
        b.iter(|| words.iter().fold(0u64, |a, &w| a.wrapping_add(w)))
    });
    group.bench_function("read/all-threads", |b| {
        b.iter(|| {
            words
                .par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |a, &w| a.wrapping_add(w)))
                .reduce(|| 0, u64::wrapping_add)
        })
    });
    group.finish();
}

/// Causal attention over an f16 cache on SmolLM2-135M's heads (9 query heads, 3 KV
/// heads, 64 wide): a whole prompt of 64, 512 and 2048 positions in one step, and one
/// decode position on top of 2048; and the same over an f32 cache. Throughput is query
/// positions (tokens).
fn attention_bench(c: &mut Criterion) {
    let (n_heads, n_kv_heads, hd) = (9, 3, 64);
    let mut x = 0x2545F4914F6CDD1Du64;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let mut group = c.benchmark_group("attention");
    for (name, seq, past) in [
        ("prefill/64", 64, 0),
        ("prefill/512", 512, 0),
        ("prefill/2048", 2048, 0),
        ("decode/d2048", 1, 2048),
        ("decode/d128", 1, 128),
    ] {
        let rows = past + seq;
        let q: Vec<f32> = (0..seq * n_heads * hd).map(|_| 2.0 * rand()).collect();
        let k: Vec<half::f16> = (0..rows * n_kv_heads * hd)
            .map(|_| half::f16::from_f32(rand()))
            .collect();
        let v: Vec<half::f16> = (0..rows * n_kv_heads * hd)
            .map(|_| half::f16::from_f32(rand()))
            .collect();
        let s = AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            window: None,
            past,
            causal: true,
        };
        group.throughput(Throughput::Elements(seq as u64));
        group.bench_function(name, |b| {
            b.iter(|| attention(&q, KvRows::F16(&k), KvRows::F16(&v), &s))
        });
        // The same in pages of 64 positions, as a host KV cache holds them.
        let pages = |x: &[half::f16]| -> Vec<llama_kernels::Page<half::f16>> {
            x.chunks(llama_kernels::KEY_BLOCK * n_kv_heads * hd)
                .map(|c| std::sync::Arc::new(c.to_vec()))
                .collect()
        };
        let (kp, vp) = (pages(&k), pages(&v));
        group.bench_function(format!("{name}/paged"), |b| {
            b.iter(|| {
                let kr = KvRows::PagedF16(llama_kernels::Pages {
                    pages: &kp,
                    len: k.len(),
                });
                let vr = KvRows::PagedF16(llama_kernels::Pages {
                    pages: &vp,
                    len: v.len(),
                });
                attention(&q, kr, vr, &s)
            })
        });
        // The same over an f32 cache (no conversions).
        let (k, v): (Vec<f32>, Vec<f32>) = (
            k.iter().map(|x| x.to_f32()).collect(),
            v.iter().map(|x| x.to_f32()).collect(),
        );
        group.bench_function(format!("{name}/f32"), |b| {
            b.iter(|| attention(&q, KvRows::F32(&k), KvRows::F32(&v), &s))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = kernels, memory, attention_bench
}
criterion_main!(benches);
