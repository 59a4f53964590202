//! GGUF block weights on the GPU (lavapipe on machines without one): each block type's
//! kernels against the product of the dequantized weights, matrices whose rows mix
//! types, and grids past one dimension's limit. Errors are measured against the sum
//! of |w·x| over the dot product, the scale of f32 rounding in any order of summation.
use std::sync::Arc;

use burn::tensor::{Tensor, TensorData};
use half::f16;
use llama::graph::gpu::DeviceBlocks;
use llama::graph::quant::{GgmlType, QMatrix};

use crate::common::wgpu;

const TYPES: [GgmlType; 8] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Random blocks of `ty` whose f16 scales (and mins) are finite, of either sign.
fn random_matrix(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> QMatrix {
    let bb = ty.block_bytes();
    let n = rows * cols / ty.block_len();
    let mut bytes: Vec<u8> = (0..n * bb).map(|_| rng.next() as u8).collect();
    let halves: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q6K => &[208],
        _ => unreachable!("a block type"),
    };
    for b in 0..n {
        for &at in halves {
            let v = f16::from_f32(rng.unit() * 0.05).to_le_bytes();
            bytes[b * bb + at..b * bb + at + 2].copy_from_slice(&v);
        }
    }
    QMatrix::from_bytes(ty, rows, cols, bytes).expect("whole blocks")
}

/// Checks `x · Wᵀ` on the device against f64 sums over the host's dequantized rows.
fn check(w: &QMatrix, m: usize, rng: &mut Rng, what: &str) {
    let device = wgpu();
    let (n, k) = (w.rows(), w.cols());
    let x: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
    let blocks = DeviceBlocks::upload(Arc::new(w.clone()), &device).expect("upload");
    let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
    let got: Vec<f32> = blocks
        .matmul("test", xt)
        .expect("matmul")
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32");
    assert_eq!(got.len(), m * n, "{what}: output size");
    let wide = w.dequantize();
    let mut worst = 0f64;
    for r in 0..m {
        for c in 0..n {
            let (mut sum, mut mass) = (0f64, 0f64);
            for e in 0..k {
                let p = wide[c * k + e] as f64 * x[r * k + e] as f64;
                sum += p;
                mass += p.abs();
            }
            let err = (got[r * n + c] as f64 - sum).abs() / mass.max(1e-30);
            worst = worst.max(err);
            assert!(
                err <= 1e-4,
                "{what}: row {r} column {c}: {} vs {sum} (relative {err:.2e})",
                got[r * n + c]
            );
        }
    }
    assert!(worst.is_finite(), "{what}");
}

#[test]
fn every_block_type_matches_the_dequantized_product() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for ty in TYPES {
        // Three blocks of 32 (rows not a whole number of words for 18- and 22-byte
        // blocks), or two super-blocks of 256; an odd number of rows.
        let cols = if ty.block_len() == 32 { 96 } else { 512 };
        let w = random_matrix(ty, 37, cols, &mut rng);
        // 1..=8 rows take the fused kernel, more the widened weights and burn's matmul.
        for m in [1, 3, 8, 13] {
            check(&w, m, &mut rng, &format!("{} with {m} rows", ty.name()));
        }
    }
}

#[test]
fn rows_of_mixed_types_multiply_as_one_matrix() {
    let mut rng = Rng(42);
    let parts: Vec<QMatrix> = [
        (GgmlType::Q4K, 5),
        (GgmlType::Q6K, 7),
        (GgmlType::Q8_0, 3),
        (GgmlType::Q5K, 2),
        (GgmlType::Q4_1, 4),
        (GgmlType::Q5_0, 1),
    ]
    .into_iter()
    .map(|(ty, rows)| random_matrix(ty, rows, 256, &mut rng))
    .collect();
    let w = QMatrix::concat(&parts.iter().collect::<Vec<_>>()).expect("same width");
    assert_eq!(w.type_names(), "Q4_K+Q6_K+Q8_0+Q5_K+Q4_1+Q5_0");
    for m in [1, 11] {
        check(&w, m, &mut rng, &format!("mixed rows, {m} rows"));
    }
}

#[test]
fn grids_and_parts_past_their_limits() {
    // 270,000 rows: the GEMV's grid (8 weight rows a cube) wraps to a second row of
    // cubes (32,768 a row), and a long step widens the weights in 4,096-row parts.
    let mut rng = Rng(7);
    let w = random_matrix(GgmlType::Q8_0, 270_000, 32, &mut rng);
    for m in [1, 9] {
        check(&w, m, &mut rng, &format!("270,000 rows, {m} rows"));
    }
}

/// The fused attention kernel against attention computed in f64: grouped heads, head
/// sizes 32 to 256, keys before the step, a step of several rows, a sliding window
/// over a cache that keeps only its last positions.
#[test]
fn fused_attention_matches_its_definition() {
    use llama::graph::gpu::fused_attention;
    let device = wgpu();
    let mut rng = Rng(3);
    // (heads, kv heads, head dim, step rows, positions before, cached rows, window)
    let cases = [
        (9, 3, 64, 1, 40, 41, None),
        (4, 4, 256, 3, 10, 13, Some(5)),
        (8, 2, 32, 16, 0, 16, None),
        (6, 2, 128, 2, 100, 20, Some(10)),
    ];
    for (heads, kv, hd, seq, past, rows, window) in cases {
        let what = format!(
            "{heads}/{kv} heads of {hd}, {seq} rows after {past}, {rows} keys, window {window:?}"
        );
        let q: Vec<f32> = (0..seq * heads * hd).map(|_| rng.unit()).collect();
        let k: Vec<f32> = (0..rows * kv * hd).map(|_| rng.unit()).collect();
        let v: Vec<f32> = (0..rows * kv * hd).map(|_| rng.unit()).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let t = |x: &Vec<f32>, d: [usize; 2]| {
            Tensor::<2>::from_data(TensorData::new(x.clone(), d), &device)
        };
        let got = fused_attention(
            &t(&q, [seq, heads * hd]),
            &t(&k, [rows, kv * hd]),
            &t(&v, [rows, kv * hd]),
            (heads, kv, hd),
            scale,
            window,
            past,
            &device,
        )
        .expect("a GPU device and a short step take the fused kernel")
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32");
        let first_key = past + seq - rows;
        for i in 0..seq {
            for h in 0..heads {
                let g = h / (heads / kv);
                let qp = past + i;
                let visible: Vec<usize> = (0..rows)
                    .filter(|&j| {
                        let kp = first_key + j;
                        kp <= qp && window.is_none_or(|w| qp - kp < w)
                    })
                    .collect();
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        (0..hd)
                            .map(|d| {
                                q[(i * heads + h) * hd + d] as f64 * k[(j * kv + g) * hd + d] as f64
                            })
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let top = scores.iter().cloned().fold(f64::MIN, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
                let total: f64 = w.iter().sum();
                for d in 0..hd {
                    let want: f64 = visible
                        .iter()
                        .zip(&w)
                        .map(|(&j, p)| p * v[(j * kv + g) * hd + d] as f64)
                        .sum::<f64>()
                        / total;
                    let have = got[(i * heads + h) * hd + d] as f64;
                    assert!(
                        (have - want).abs() <= 1e-5,
                        "{what}: row {i} head {h} dim {d}: {have} vs {want}"
                    );
                }
            }
        }
    }
}
