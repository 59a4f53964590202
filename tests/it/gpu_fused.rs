//! The one-kernel forms of RMSNorm, RoPE and the KV cache write on the GPU (lavapipe on
//! machines without one) against their definitions computed in f64 on the host: odd
//! widths, groups smaller and larger than a cube, positions read from the middle of the
//! angle tables, caches in f16 and f32, and a cache still shared when it is written.
use burn::tensor::{DType, Tensor, TensorData};
use half::f16;
use llama::graph::gpu;

use crate::common::{flex, wgpu};

struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.unit()).collect()
    }
}

fn f32s<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32")
}

#[test]
fn rms_norm_matches_its_definition() {
    let device = wgpu();
    let mut rng = Rng(11);
    // (rows, features, group): whole rows, per-head groups, groups narrower than a
    // cube's units and wider than they reach in one stride.
    let cases = [
        (1, 576, 576),
        (3, 960, 64),
        (2, 7, 7),
        (4, 12, 3),
        (2, 4100, 4100),
    ];
    let eps = 1e-5f32;
    for (rows, d, g) in cases {
        let x = rng.vec(rows * d);
        let w = rng.vec(g);
        let got = f32s(
            gpu::rms_norm(
                &Tensor::<2>::from_data(TensorData::new(x.clone(), [rows, d]), &device),
                &Tensor::<1>::from_data(TensorData::new(w.clone(), [g]), &device),
                eps,
                &device,
            )
            .expect("a GPU device takes the norm kernel"),
        );
        for (n, group) in x.chunks(g).enumerate() {
            let mean = group.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / g as f64;
            let inv = 1.0 / (mean + eps as f64).sqrt();
            for (i, &v) in group.iter().enumerate() {
                let want = v as f64 * inv * w[i] as f64;
                let have = got[n * g + i] as f64;
                assert!(
                    (have - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{rows}x{d} in groups of {g}: group {n} feature {i}: {have} vs {want}"
                );
            }
        }
    }
}

#[test]
fn rope_matches_its_definition() {
    let device = wgpu();
    let mut rng = Rng(12);
    // (rows, heads, head dim, first position, table positions)
    let cases = [
        (1, 9, 64, 40, 64),
        (5, 3, 128, 0, 8),
        (2, 2, 2, 3, 5),
        (16, 14, 64, 100, 200),
    ];
    for (seq, heads, hd, first, positions) in cases {
        let half = hd / 2;
        let x = rng.vec(seq * heads * hd);
        let angles: Vec<f32> = (0..positions * half)
            .map(|i| (i / half) as f32 * (1.0 + (i % half) as f32).recip())
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let table = |v: &Vec<f32>| {
            Tensor::<2>::from_data(TensorData::new(v.clone(), [positions, half]), &device)
        };
        let got = f32s(
            gpu::rope(
                &Tensor::<2>::from_data(TensorData::new(x.clone(), [seq, heads * hd]), &device),
                (&table(&cos), &table(&sin)),
                hd,
                first,
                &device,
            )
            .expect("a GPU device takes the rope kernel"),
        );
        for r in 0..seq {
            for h in 0..heads {
                for i in 0..half {
                    let t = (first + r) * half + i;
                    let (c, s) = (cos[t] as f64, sin[t] as f64);
                    let at = (r * heads + h) * hd + i;
                    let (x1, x2) = (x[at] as f64, x[at + half] as f64);
                    for (have, want) in [
                        (got[at], x1 * c - x2 * s),
                        (got[at + half], x2 * c + x1 * s),
                    ] {
                        assert!(
                            (have as f64 - want).abs() <= 1e-6,
                            "{seq} rows of {heads}x{hd} from {first}: row {r} head {h} \
                             pair {i}: {have} vs {want}"
                        );
                    }
                }
            }
        }
    }
    // Shapes the kernel does not take are left to the general path.
    let x = Tensor::<2>::zeros([1, 12], &device);
    let t = Tensor::<2>::zeros([4, 3], &device);
    assert!(
        gpu::rope(&x, (&t, &t), 8, 0, &device).is_none(),
        "head 8, tables of 3"
    );
    assert!(
        gpu::rope(&x, (&t, &t), 6, 4, &device).is_none(),
        "past the table"
    );
}

#[test]
fn kv_rows_are_written_rounded_to_the_cache_type() {
    // On the GPU by the kernel; on the CPU by burn's cast and slice assignment.
    for device in [wgpu(), flex()] {
        let mut rng = Rng(13);
        let (rows, width) = (10, 24);
        for dtype in [DType::F16, DType::F32] {
            for (at, n) in [(0, 1), (3, 4), (9, 1), (0, 10)] {
                let what = format!("{device:?}, {dtype:?}, {n} rows at {at}");
                let old = rng.vec(rows * width);
                let new = rng.vec(n * width);
                let cache =
                    Tensor::<2>::from_data(TensorData::new(old.clone(), [rows, width]), &device)
                        .cast(dtype);
                // A clone alive elsewhere: the write must not show through it.
                let kept = cache.clone();
                let new_t =
                    Tensor::<2>::from_data(TensorData::new(new.clone(), [n, width]), &device);
                let written = gpu::write_rows(cache, new_t, at);
                assert_eq!(written.dtype(), dtype, "{what}: the cache keeps its type");
                let round = |v: f32| match dtype {
                    DType::F16 => f16::from_f32(v).to_f32(),
                    _ => v,
                };
                let got = f32s(written);
                for r in 0..rows {
                    for c in 0..width {
                        let i = r * width + c;
                        let want = if (at..at + n).contains(&r) {
                            round(new[(r - at) * width + c])
                        } else {
                            round(old[i])
                        };
                        assert_eq!(got[i], want, "{what}: row {r} col {c}");
                    }
                }
                let before: Vec<f32> = old.iter().map(|&v| round(v)).collect();
                assert_eq!(f32s(kept), before, "{what}: the shared clone was written");
            }
        }
    }
}
