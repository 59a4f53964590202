//! The block matmul kernels against dequantize-then-f32, for every block type, on
//! awkward sizes and on every code path; and the zero-copy row operations of QMatrix.
use llama_kernels::quant::kernels::{error_bound, QActs};
use llama_kernels::quant::{matmul, GgmlType, Kernel, QMatrix};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
    }
    /// Mostly small values with some large ones, as in real activations.
    fn activation(&mut self) -> f32 {
        let u = self.unit();
        if self.next().is_multiple_of(17) {
            u * 20.0
        } else {
            u
        }
    }
}

fn f16(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// Random blocks of `ty` for `rows x cols` values: random quants, sane scales.
fn random_blocks(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let blocks = rows * cols / ty.block_len();
    let mut out = Vec::new();
    for _ in 0..blocks {
        let mut b: Vec<u8> = (0..ty.block_bytes()).map(|_| rng.next() as u8).collect();
        let scale = 0.01 + 0.05 * rng.unit().abs();
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => b[..2].copy_from_slice(&f16(scale)),
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => {
                b[..2].copy_from_slice(&f16(scale));
                b[2..4].copy_from_slice(&f16(0.1 * rng.unit()));
            }
            GgmlType::Q6K => b[208..210].copy_from_slice(&f16(scale * 0.1)),
            _ => unreachable!(),
        }
        out.extend(b);
    }
    out
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

/// Checks `matmul(x, w)` on both paths against f64 sums over the dequantized weights:
/// tightly (f32 rounding only) against the activations as the kernels quantize them,
/// and within [`error_bound`] against the activations themselves.
fn check(w: &QMatrix, n: usize, rng: &mut Rng, what: &str) {
    let (rows, cols) = (w.rows(), w.cols());
    let wd = w.dequantize();
    assert_eq!(wd.len(), rows * cols);
    let x: Vec<f32> = (0..n * cols).map(|_| rng.activation()).collect();
    let acts = QActs::quantize(&x, n, cols);
    let xq: Vec<f32> = (0..n).flat_map(|t| acts.dequantize_row(t)).collect();
    let exact = reference(&xq, n, &wd, rows, cols);
    let want = reference(&x, n, &wd, rows, cols);
    for kernel in [
        Kernel::Auto,
        Kernel::Avx2,
        Kernel::Avx512Vnni,
        Kernel::Portable,
    ] {
        let got = matmul(&x, n, w, kernel);
        for t in 0..n {
            for r in 0..rows {
                let (xr, wr) = (&xq[t * cols..(t + 1) * cols], &wd[r * cols..(r + 1) * cols]);
                let magnitude: f32 = xr.iter().zip(wr).map(|(a, b)| (a * b).abs()).sum();
                let (g, e) = (got[t * rows + r], exact[t * rows + r]);
                assert!(
                    (g - e).abs() <= magnitude * 1e-5 + 1e-6,
                    "{what} {kernel:?} n={n} {rows}x{cols} [{t},{r}]: {g} vs {e} (same int8 activations)"
                );
                let bound = error_bound(&x[t * cols..(t + 1) * cols], wr);
                let e = want[t * rows + r];
                assert!(
                    (g - e).abs() <= bound,
                    "{what} {kernel:?} n={n} {rows}x{cols} [{t},{r}]: {g} vs {e} (bound {bound})"
                );
            }
        }
    }
}

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

#[test]
fn every_block_type_matches_dequantized_f32_within_the_bound() {
    let mut rng = Rng(0x9E3779B97F4A7C15);
    for ty in TYPES {
        let per = ty.block_len();
        // Rows that are no multiple of the SIMD width or the thread split; rows of one
        // block and of several; one and several activation rows; tasks of several
        // blocks of output rows at any thread count.
        for (n, rows, blocks) in [
            (1, 37, 3),
            (3, 5, 1),
            (2, 129, 2),
            (1, 1, 9),
            (5, 300, 1),
            (3, 1100, 1),
        ] {
            let cols = per * blocks;
            let bytes = random_blocks(ty, rows, cols, &mut rng);
            let w = QMatrix::from_bytes(ty, rows, cols, bytes).expect("whole blocks");
            check(&w, n, &mut rng, ty.name());
        }
    }
}

#[test]
fn the_bound_is_tight_enough_to_catch_a_wrong_kernel() {
    // A kernel that dropped one block's contribution would be off by about the block's
    // share of the sum: far more than the bound for blocks of this size.
    let mut rng = Rng(7);
    let (rows, cols) = (4, 64);
    let w = QMatrix::from_bytes(
        GgmlType::Q4_1,
        rows,
        cols,
        random_blocks(GgmlType::Q4_1, rows, cols, &mut rng),
    )
    .unwrap();
    let wd = w.dequantize();
    let x: Vec<f32> = (0..cols).map(|_| 1.0 + rng.unit().abs()).collect();
    let half: f32 = x[..32].iter().zip(&wd[..32]).map(|(a, b)| a * b).sum();
    assert!(half.abs() > error_bound(&x, &wd[..cols]), "{half}");
}

#[test]
fn rows_are_joined_reordered_and_sliced_without_copies() {
    let mut rng = Rng(99);
    let cols = 256;
    let a = QMatrix::from_bytes(
        GgmlType::Q4K,
        6,
        cols,
        random_blocks(GgmlType::Q4K, 6, cols, &mut rng),
    )
    .unwrap();
    let b = QMatrix::from_bytes(
        GgmlType::Q6K,
        3,
        cols,
        random_blocks(GgmlType::Q6K, 3, cols, &mut rng),
    )
    .unwrap();
    let ab = QMatrix::concat(&[&a, &b]).unwrap();
    assert_eq!((ab.rows(), ab.type_names().as_str()), (9, "Q4_K+Q6_K"));
    assert_eq!(ab.bytes(), a.bytes() + b.bytes());
    let (da, db, dab) = (a.dequantize(), b.dequantize(), ab.dequantize());
    assert_eq!(dab, [da.clone(), db.clone()].concat());
    // Mixed block types in one matmul.
    check(&ab, 2, &mut rng, "Q4_K+Q6_K");

    let order = [8, 0, 3, 3, 7];
    let picked = ab.select_rows(&order).unwrap();
    let want: Vec<f32> = order
        .iter()
        .flat_map(|&r| dab[r * cols..(r + 1) * cols].to_vec())
        .collect();
    assert_eq!(picked.dequantize(), want);
    check(&picked, 1, &mut rng, "reordered");
    assert_eq!(
        ab.slice_rows(5, 3).unwrap().dequantize(),
        dab[5 * cols..8 * cols].to_vec()
    );
    assert!(ab.select_rows(&[9]).is_none());
    assert!(ab.slice_rows(7, 3).is_none());
    let narrow = QMatrix::from_bytes(GgmlType::Q8_0, 1, 32, vec![0; 34]).unwrap();
    assert!(QMatrix::concat(&[&a, &narrow]).is_none(), "widths differ");
}

#[test]
fn every_other_row_is_two_runs_per_head() {
    // GGUF's Q/K rows undone: per head of 8 rows, rows 0, 2, 4, 6, then 1, 3, 5, 7.
    let mut rng = Rng(5);
    let (rows, cols) = (24, 96);
    let m = QMatrix::from_bytes(
        GgmlType::Q4_1,
        rows,
        cols,
        random_blocks(GgmlType::Q4_1, rows, cols, &mut rng),
    )
    .unwrap();
    let order: Vec<usize> = (0..rows / 8)
        .flat_map(|h| (0..8).map(move |i| h * 8 + if i < 4 { 2 * i } else { 2 * (i - 4) + 1 }))
        .collect();
    let picked = m.select_rows(&order).unwrap();
    assert_eq!(picked.segment_count(), 2 * rows / 8);
    let dm = m.dequantize();
    let want: Vec<f32> = order
        .iter()
        .flat_map(|&r| dm[r * cols..(r + 1) * cols].to_vec())
        .collect();
    assert_eq!(picked.dequantize(), want);
    for (i, &r) in order.iter().enumerate() {
        assert_eq!(picked.row(i), m.row(r), "row {i}");
    }
    check(&picked, 3, &mut rng, "strided");
    let packed = picked.pack().expect("24 Q4_1 rows pack");
    check(&packed, 2, &mut rng, "strided, packed");
    // A step that changes starts a new run; rows read back in order all the same.
    let uneven = m.select_rows(&[0, 2, 4, 5, 6, 9, 12]).unwrap();
    assert_eq!(uneven.segment_count(), 3);
    assert_eq!(
        uneven.dequantize(),
        [0, 2, 4, 5, 6, 9, 12]
            .iter()
            .flat_map(|&r| dm[r * cols..(r + 1) * cols].to_vec())
            .collect::<Vec<_>>()
    );
    assert_eq!(uneven.slice_rows(2, 3).unwrap().row(1), m.row(5));
}

#[test]
fn q5_blocks_read_as_the_format_defines() {
    // Q5_0: d = 0.5; bits 0 and 31 of the high word set; nibbles: weight 0 low 1,
    // weight 16 (high nibble of byte 0) 2, weight 31 (high nibble of byte 15) 15.
    let mut q5_0 = vec![0u8; 22];
    q5_0[..2].copy_from_slice(&f16(0.5));
    q5_0[2..6].copy_from_slice(&0x8000_0001u32.to_le_bytes());
    q5_0[6] = 0x21;
    q5_0[21] = 0xF0;
    // q = nibble | bit << 4: weight 0 is 17, 16 is 2, 31 is 31, the rest 0.
    let q = |i: usize| match i {
        0 => 17.0,
        16 => 2.0,
        31 => 31.0,
        _ => 0.0,
    };
    let m = QMatrix::from_bytes(GgmlType::Q5_0, 1, 32, q5_0.clone()).unwrap();
    let want: Vec<f32> = (0..32).map(|i| 0.5 * (q(i) - 16.0)).collect();
    assert_eq!(m.dequantize(), want);
    // Q5_1: the same quants with d = 0.25 and m = -1: weight = q d + m.
    let mut q5_1 = vec![0u8; 24];
    q5_1[..2].copy_from_slice(&f16(0.25));
    q5_1[2..4].copy_from_slice(&f16(-1.0));
    q5_1[4..].copy_from_slice(&q5_0[2..]);
    let m = QMatrix::from_bytes(GgmlType::Q5_1, 1, 32, q5_1).unwrap();
    let want: Vec<f32> = (0..32).map(|i| 0.25 * q(i) - 1.0).collect();
    assert_eq!(m.dequantize(), want);
    let mut rng = Rng(17);
    check(&m, 1, &mut rng, "Q5_1 by hand");
}

#[test]
fn bad_block_matrices_are_refused() {
    let err = QMatrix::from_bytes(GgmlType::Q4_1, 2, 48, vec![0; 200]).unwrap_err();
    assert!(err.contains("not a whole number of Q4_1 blocks"), "{err}");
    let err = QMatrix::from_bytes(GgmlType::Q4_1, 2, 64, vec![0; 79]).unwrap_err();
    assert!(err.contains("needs 80 bytes"), "{err}");
    let err = QMatrix::from_bytes(GgmlType::F32, 1, 1, vec![0; 4]).unwrap_err();
    assert!(err.contains("not a block-quantized type"), "{err}");
}

#[test]
fn q8_0_quantization_is_within_half_a_step() {
    let mut rng = Rng(3);
    let w: Vec<f32> = (0..8 * 64).map(|_| rng.activation()).collect();
    let q = QMatrix::quantize_q8_0(&w, 8, 64).unwrap();
    assert_eq!(q.bytes(), 8 * 2 * 34);
    for (block, deq) in w.chunks(32).zip(q.dequantize().chunks(32)) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        // The scale is rounded to f16, so the step is amax / 127 up to f16 precision.
        let step = amax / 127.0 * (1.0 + 1e-3);
        for (a, b) in block.iter().zip(deq) {
            assert!((a - b).abs() <= step / 2.0 + 1e-6, "{a} vs {b}");
        }
    }
    assert!(
        QMatrix::quantize_q8_0(&w, 16, 30).is_none(),
        "a partial block"
    );
    let zeros = QMatrix::quantize_q8_0(&[0.0; 64], 2, 32).unwrap();
    assert!(zeros.dequantize().iter().all(|v| *v == 0.0));
}

#[test]
fn packed_rows_match_dequantized_f32_within_the_bound() {
    // Q4_0 and Q4_1; Q5_0 and Q5_1; Q8_0.
    let mut rng = Rng(0xC0FFEE);
    for (ta, tb) in [
        (GgmlType::Q4_0, GgmlType::Q4_1),
        (GgmlType::Q5_0, GgmlType::Q5_1),
        (GgmlType::Q8_0, GgmlType::Q8_0),
    ] {
        // Groups of eight rows: one, five, seventeen and 130 (split across tasks, each of
        // several blocks of output rows); rows of one block and of several; activation rows
        // that are and are not multiples of four.
        for (rows, blocks, ns) in [
            (8, 1, [1, 4]),
            (40, 3, [2, 5]),
            (136, 7, [1, 9]),
            (1040, 1, [1, 3]),
        ] {
            let cols = 32 * blocks;
            let mut half_of = |ty| {
                let bytes = random_blocks(ty, rows / 2, cols, &mut rng);
                QMatrix::from_bytes(ty, rows / 2, cols, bytes).unwrap()
            };
            let (q40, q41) = (half_of(ta), half_of(tb));
            // Both types' rows in one matrix, and a group that straddles them.
            let mixed = QMatrix::concat(&[&q40, &q41]).unwrap();
            for w in [&q40, &q41, &mixed] {
                if w.rows() % 8 != 0 {
                    assert!(w.pack().is_none(), "{} rows are not whole groups", w.rows());
                    continue;
                }
                let packed = w.pack().expect("rows of a packed type in whole groups");
                assert!(packed.is_packed());
                assert_eq!(packed.dequantize(), w.dequantize(), "the rows are kept");
                for n in ns {
                    check(&packed, n, &mut rng, &format!("packed {}", w.type_names()));
                }
                assert!(
                    !packed.slice_rows(0, 8).unwrap().is_packed(),
                    "row operations read the rows"
                );
            }
        }
    }
    // Q4_K: one and three super-blocks, one group and three (split across tasks).
    for (rows, supers, ns) in [(8, 1, [1, 4]), (24, 3, [3, 6])] {
        let cols = 256 * supers;
        let bytes = random_blocks(GgmlType::Q4K, rows, cols, &mut rng);
        let w = QMatrix::from_bytes(GgmlType::Q4K, rows, cols, bytes).unwrap();
        let packed = w.pack().expect("Q4_K rows in whole groups");
        assert_eq!(packed.dequantize(), w.dequantize(), "the rows are kept");
        for n in ns {
            check(&packed, n, &mut rng, "packed Q4_K");
        }
        let q40 = QMatrix::from_bytes(
            GgmlType::Q4_0,
            8,
            cols,
            random_blocks(GgmlType::Q4_0, 8, cols, &mut rng),
        )
        .unwrap();
        // Groups of different layouts in one matrix (a fused Q/K/V of a K-quant mix)
        // pack; a group whose rows differ in layout does not.
        let mixed = QMatrix::concat(&[&w, &q40]).unwrap();
        let packed = mixed.pack().expect("Q4_K groups, then a Q4_0 group");
        check(&packed, 3, &mut rng, "packed Q4_K+Q4_0");
        let halves =
            QMatrix::concat(&[&w.slice_rows(0, 4).unwrap(), &q40.slice_rows(0, 4).unwrap()])
                .unwrap();
        assert!(halves.pack().is_none(), "a group of Q4_K and Q4_0 rows");
    }
    // Q6_K, and a fused matrix of Q4_K and Q6_K groups (a Q4_K_M file's Q/K/V).
    for (rows, supers, ns) in [(8, 1, [1, 4]), (24, 3, [3, 6]), (136, 2, [1, 5])] {
        let cols = 256 * supers;
        let bytes = random_blocks(GgmlType::Q6K, rows, cols, &mut rng);
        let w = QMatrix::from_bytes(GgmlType::Q6K, rows, cols, bytes).unwrap();
        let packed = w.pack().expect("Q6_K rows in whole groups");
        assert_eq!(packed.dequantize(), w.dequantize(), "the rows are kept");
        for n in ns {
            check(&packed, n, &mut rng, "packed Q6_K");
        }
        let bytes = random_blocks(GgmlType::Q4K, 16, cols, &mut rng);
        let q4k = QMatrix::from_bytes(GgmlType::Q4K, 16, cols, bytes).unwrap();
        let qkv = QMatrix::concat(&[&q4k, &w]).unwrap();
        check(
            &qkv.pack().expect("Q4_K and Q6_K groups"),
            2,
            &mut rng,
            "packed Q4_K+Q6_K",
        );
    }
    // Q5_K, and a fused matrix of Q5_K and Q6_K groups (a Q5_K_M file's Q/K/V).
    for (rows, supers, ns) in [(8, 1, [1, 4]), (24, 3, [3, 6])] {
        let cols = 256 * supers;
        let bytes = random_blocks(GgmlType::Q5K, rows, cols, &mut rng);
        let w = QMatrix::from_bytes(GgmlType::Q5K, rows, cols, bytes).unwrap();
        let packed = w.pack().expect("Q5_K rows in whole groups");
        assert_eq!(packed.dequantize(), w.dequantize(), "the rows are kept");
        for n in ns {
            check(&packed, n, &mut rng, "packed Q5_K");
        }
        let bytes = random_blocks(GgmlType::Q6K, 8, cols, &mut rng);
        let q6k = QMatrix::from_bytes(GgmlType::Q6K, 8, cols, bytes).unwrap();
        let qkv = QMatrix::concat(&[&w, &q6k]).unwrap();
        check(
            &qkv.pack().expect("Q5_K and Q6_K groups"),
            2,
            &mut rng,
            "packed Q5_K+Q6_K",
        );
    }
    let (q5k, q6k) = (
        QMatrix::from_bytes(GgmlType::Q5K, 4, 256, vec![0; 4 * 176]).unwrap(),
        QMatrix::from_bytes(GgmlType::Q6K, 4, 256, vec![0; 4 * 210]).unwrap(),
    );
    let straddling = QMatrix::concat(&[&q5k, &q6k]).unwrap();
    assert!(straddling.pack().is_none(), "a group of Q5_K and Q6_K rows");
}
