//! The int8 matmul kernel against dequantize-then-f32, on awkward sizes and on every
//! code path.
use llama_graph::q8::{error_bound, matmul, Kernel, Q8Matrix, BLOCK};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_add(0x9E3779B97F4A7C15);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly small values with some large ones, as in real activations.
            let u = (x >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0;
            if x.is_multiple_of(17) {
                u * 20.0
            } else {
                u
            }
        })
        .collect()
}

fn reference(x: &[f32], n: usize, w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * rows];
    for t in 0..n {
        for r in 0..rows {
            out[t * rows + r] = (0..cols)
                .map(|c| x[t * cols + c] as f64 * w[r * cols + c] as f64)
                .sum::<f64>() as f32;
        }
    }
    out
}

#[test]
fn matches_dequantized_f32_within_the_format_bound() {
    for (n, rows, cols) in [
        (1, 37, 224),
        (3, 5, 32),
        (7, 129, 96),
        (1, 1, 576),
        (2, 300, 64),
    ] {
        let w = values(rows * cols, (rows * cols) as u64);
        let x = values(n * cols, n as u64 + 7);
        let q = Q8Matrix::quantize(&w, rows, cols).expect("whole blocks");
        let wd = q.dequantize();
        let want = reference(&x, n, &wd, rows, cols);
        for kernel in [Kernel::Auto, Kernel::Portable] {
            let got = matmul(&x, n, &q, kernel);
            for t in 0..n {
                for r in 0..rows {
                    let bound =
                        error_bound(&x[t * cols..(t + 1) * cols], &wd[r * cols..(r + 1) * cols]);
                    let (g, e) = (got[t * rows + r], want[t * rows + r]);
                    assert!((g - e).abs() <= bound, "{kernel:?} n={n} rows={rows} cols={cols} [{t},{r}]: {g} vs {e} (bound {bound})");
                }
            }
        }
    }
}

#[test]
fn quantization_error_is_at_most_half_a_step() {
    let w = values(8 * 64, 3);
    let q = Q8Matrix::quantize(&w, 8, 64).unwrap();
    for (block, deq) in w.chunks(BLOCK).zip(q.dequantize().chunks(BLOCK)) {
        let step = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        for (a, b) in block.iter().zip(deq) {
            assert!((a - b).abs() <= step / 2.0 + 1e-6);
        }
    }
    assert_eq!(q.bytes(), 8 * 64 + 8 * 2 * 4);
    assert!(Q8Matrix::quantize(&w, 16, 32).is_some());
    assert!(
        Q8Matrix::quantize(&values(30, 1), 1, 30).is_none(),
        "a partial block is refused"
    );
}

#[test]
fn zero_blocks_stay_zero() {
    let mut w = values(2 * 64, 5);
    w[..32].fill(0.0);
    let q = Q8Matrix::quantize(&w, 2, 64).unwrap();
    assert!(q.dequantize()[..32].iter().all(|v| *v == 0.0));
    let x = vec![0f32; 64];
    assert!(matmul(&x, 1, &q, Kernel::Auto).iter().all(|v| *v == 0.0));
}
