//! Causal grouped-query attention over host rows of keys and values ([`KvRows`]: f32,
//! or the f16 of a half-size KV cache), tiled the way flash attention is: a task takes
//! a block of query rows (positions, and the query heads that read one KV head) and
//! walks the keys in blocks of [`KEY_BLOCK`], keeping each row's running maximum, sum
//! and output (an online softmax). No score matrix is ever built, and each block of
//! keys and values is read from memory once per task and then from cache by every row
//! of the task, instead of once per row: a 2048-position prompt reads each key block
//! from cache 16 x group times over where it used to stream the whole cache per row.
//!
//! Tasks split the work across threads by KV head and query block in a prompt, and by
//! query head in a decode step (where one KV head would leave cores idle).
//!
//! A query row's output does not depend on which task it ran in: key blocks start at
//! absolute positions (multiples of [`KEY_BLOCK`]), each row takes only the keys it
//! sees (never a masked term), and every arithmetic step of a row is the same whatever
//! other rows share the tile. So a prompt's last position gives bitwise the same result
//! whether the prompt ran in one step, in chunks, or after a prefix copied from another
//! sequence, and a decode row the same whichever sequences share its step (what a
//! server needs for `seed` to mean the same text under any load).
//!
//! On CPUs with AVX2 + FMA + F16C every tile runs a hand-written kernel with its own
//! `exp` (`avx2`), reading f16 keys and values in place; elsewhere the plain loops run.
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::features::features;
use crate::norm::dot;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
mod blocks;

pub use blocks::{
    quantize_blocks, rotate_heads, rotation_len, BlockQ4_0, BlockQ8_0, KvBlock, KV_BLOCK,
};

/// Keys per block of the online softmax; blocks start at multiples of it (positions).
pub const KEY_BLOCK: usize = 64;
/// Query positions per task in a prompt.
const QUERY_BLOCK: usize = 16;
/// Query rows (positions by heads) times key rows under which a call runs on the
/// calling thread.
const SMALL: usize = 4096;

/// Shape of an attention call.
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub window: Option<usize>,
    /// Positions before this step.
    pub past: usize,
    /// Whether a query sees only keys not after it (decoders); `false`: every key
    /// (an encoder's bidirectional attention, all of one sequence in one step).
    pub causal: bool,
}

/// A page of a paged KV cache: the rows of [`KEY_BLOCK`] positions (fewer in a last
/// page still filling), shared between caches until one of them writes it.
pub type Page<T> = std::sync::Arc<Vec<T>>;

/// The pages of one layer's keys or values: page `i` holds positions
/// `i * KEY_BLOCK..`; the first `len` values count (every page but the last is full).
#[derive(Debug, Clone, Copy)]
pub struct Pages<'a, T> {
    pub pages: &'a [Page<T>],
    pub len: usize,
}

/// Keys or values as attention reads them: f32, or the f16 of a KV cache kept at half
/// the size; in one run of memory (the oldest row first), or in pages. A quantized
/// cache's rows are in pages of blocks ([`BlockQ8_0`], [`BlockQ4_0`]: each row a whole
/// number of blocks, `len` counting blocks), dequantized block by block as attention
/// reads them. Block rows hold keys and values rotated by [`rotate_heads`] (what
/// [`KvRows::to_f32`] gives back for them, rotated); attention rotates the query and
/// its output to match.
#[derive(Debug, Clone, Copy)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    PagedF32(Pages<'a, f32>),
    PagedF16(Pages<'a, half::f16>),
    PagedQ8_0(Pages<'a, BlockQ8_0>),
    PagedQ4_0(Pages<'a, BlockQ4_0>),
}

impl KvRows<'_> {
    /// Values (rows times width).
    pub fn len(&self) -> usize {
        match self {
            KvRows::F32(x) => x.len(),
            KvRows::F16(x) => x.len(),
            KvRows::PagedF32(p) => p.len,
            KvRows::PagedF16(p) => p.len,
            KvRows::PagedQ8_0(p) => p.len * KV_BLOCK,
            KvRows::PagedQ4_0(p) => p.len * KV_BLOCK,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32, in one run (borrowed when they are).
    pub fn to_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        use half::slice::HalfFloatSliceExt;
        use std::borrow::Cow;
        fn gather<T: Copy>(p: &Pages<T>, f: impl Fn(&[T], &mut Vec<f32>)) -> Vec<f32> {
            let mut out = Vec::with_capacity(p.len);
            for page in p.pages {
                let n = (p.len - out.len()).min(page.len());
                f(&page[..n], &mut out);
            }
            out
        }
        match self {
            KvRows::F32(x) => Cow::Borrowed(x),
            KvRows::F16(x) => {
                let mut out = vec![0f32; x.len()];
                x.convert_to_f32_slice(&mut out);
                Cow::Owned(out)
            }
            KvRows::PagedF32(p) => Cow::Owned(gather(p, |x, out| out.extend_from_slice(x))),
            KvRows::PagedF16(p) => {
                Cow::Owned(gather(p, |x, out| out.extend(x.iter().map(|v| v.to_f32()))))
            }
            KvRows::PagedQ8_0(p) => Cow::Owned(dequantize_pages(p)),
            KvRows::PagedQ4_0(p) => Cow::Owned(dequantize_pages(p)),
        }
    }
}

/// The first `p.len` blocks of `p`, dequantized.
fn dequantize_pages<B: KvBlock>(p: &Pages<B>) -> Vec<f32> {
    let mut out = Vec::with_capacity(p.len * KV_BLOCK);
    let mut left = p.len;
    for page in p.pages {
        let n = left.min(page.len());
        page[..n].iter().for_each(|b| b.dequantize(&mut out));
        left -= n;
    }
    out
}

/// Where the kernels find a position's row of keys or values.
trait Source<T>: Sync {
    /// The first value of position `pos`'s row.
    ///
    /// # Safety
    /// `pos` must be one of the source's positions (`..end()`, from its first).
    unsafe fn row(&self, pos: usize) -> *const T;
    /// One past the last position.
    fn end(&self) -> usize;
}

/// Rows in one run of memory, the first one position `first`'s.
struct Flat<'a, T> {
    data: &'a [T],
    first: usize,
    width: usize,
}

impl<T: Sync> Source<T> for Flat<'_, T> {
    unsafe fn row(&self, pos: usize) -> *const T {
        self.data.as_ptr().add((pos - self.first) * self.width)
    }

    fn end(&self) -> usize {
        self.first + self.data.len() / self.width
    }
}

/// Rows in pages of [`KEY_BLOCK`] positions from position 0.
struct Paged<'a, T> {
    pages: Pages<'a, T>,
    width: usize,
}

impl<T: Sync + Send> Source<T> for Paged<'_, T> {
    unsafe fn row(&self, pos: usize) -> *const T {
        self.pages
            .pages
            .get_unchecked(pos / KEY_BLOCK)
            .as_ptr()
            .add(pos % KEY_BLOCK * self.width)
    }

    fn end(&self) -> usize {
        self.pages.len / self.width
    }
}

/// One query row of a tile: query row `i` of the call, head `h`, seeing the keys at
/// positions `lo..hi`.
#[derive(Debug, Clone, Copy)]
struct Row {
    i: usize,
    h: usize,
    lo: usize,
    hi: usize,
}

/// What every tile of a call shares.
struct Geometry {
    hd: usize,
    /// Widths of a query row and of a key row.
    qw: usize,
    kw: usize,
    group: usize,
    scale: f32,
    /// Position of key row 0.
    first_key: usize,
}

impl Geometry {
    /// Column of head `h`'s KV head in a key row.
    fn col(&self, h: usize) -> usize {
        h / self.group * self.hd
    }
}

/// The tiles of a call, each a list of rows that read one KV head: blocks of
/// [`QUERY_BLOCK`] positions by the query heads of one KV head when that makes tasks
/// enough for every thread twice over, else by single query heads.
fn tiles(
    s: &AttentionShape,
    seq: usize,
    rows: usize,
    first_key: usize,
    small: bool,
) -> Vec<Vec<Row>> {
    let group = s.n_heads / s.n_kv_heads;
    let blocks = seq.div_ceil(QUERY_BLOCK);
    // A small call runs on one thread (see `tiled`): whole groups then, so each key
    // and value is read once for all the heads that read it.
    let per_tile = if small || s.n_kv_heads * blocks >= 2 * rayon::current_num_threads() {
        group
    } else {
        1
    };
    let end = first_key + rows;
    let mut out = Vec::with_capacity(blocks * s.n_heads / per_tile);
    for heads in (0..s.n_heads).step_by(per_tile) {
        for b in 0..blocks {
            let mut tile = Vec::with_capacity(QUERY_BLOCK * per_tile);
            for i in b * QUERY_BLOCK..((b + 1) * QUERY_BLOCK).min(seq) {
                let qp = s.past + i;
                // Keys not after the query (decoders), and inside the window.
                let hi = if s.causal { (qp + 1).min(end) } else { end };
                let lo = s
                    .window
                    .map_or(0, |w| (qp + 1).saturating_sub(w))
                    .max(first_key)
                    .min(hi);
                for h in heads..heads + per_tile {
                    tile.push(Row { i, h, lo, hi });
                }
            }
            out.push(tile);
        }
    }
    out
}

/// Runs every tile with `run(geometry, rows, out [rows.len() * hd])` across threads
/// and gathers the rows into `[seq, n_heads * hd]`.
fn tiled<F>(q: &[f32], rows: usize, s: &AttentionShape, run: F) -> Vec<f32>
where
    F: Fn(&Geometry, &[Row], &mut [f32]) + Sync,
{
    let hd = s.head_dim;
    let (qw, kw) = (s.n_heads * hd, s.n_kv_heads * hd);
    let seq = q.len() / qw;
    let g = Geometry {
        hd,
        qw,
        kw,
        group: s.n_heads / s.n_kv_heads,
        scale: s.scale,
        // Key row `j` holds position `first_key + j`; the last row is the last query's.
        first_key: (s.past + seq).saturating_sub(rows),
    };
    // A call of a few thousand (query row, key) pairs or fewer (a decode step over a
    // short context, one of a batch's many) is a few microseconds: cheaper on this
    // thread than handed out, and a batch's calls run side by side anyway.
    let small = seq * s.n_heads * rows < SMALL;
    let tiles = tiles(s, seq, rows, g.first_key, small);
    let one = |t: &Vec<Row>| {
        let mut o = vec![0f32; t.len() * hd];
        run(&g, t, &mut o);
        o
    };
    let done: Vec<Vec<f32>> = if small {
        tiles.iter().map(one).collect()
    } else {
        tiles.par_iter().map(one).collect()
    };
    let mut out = vec![0f32; q.len()];
    for (t, o) in tiles.iter().zip(&done) {
        for (r, o) in t.iter().zip(o.chunks_exact(hd)) {
            out[r.i * qw + r.h * hd..][..hd].copy_from_slice(o);
        }
    }
    out
}

/// The key blocks a tile touches.
fn key_blocks(rows: &[Row]) -> std::ops::Range<usize> {
    let lo = rows.iter().map(|r| r.lo).min().unwrap_or(0);
    let hi = rows.iter().map(|r| r.hi).max().unwrap_or(0);
    lo / KEY_BLOCK..hi.div_ceil(KEY_BLOCK)
}

/// A tile in plain loops, the same steps as the AVX2 kernel: per key block and row,
/// the block's scores, the new running maximum, the block's exponentials and their sum,
/// and the block's weighted values added to the rescaled output.
fn tile_portable(q: &[f32], k: &[f32], v: &[f32], g: &Geometry, rows: &[Row], out: &mut [f32]) {
    let hd = g.hd;
    let mut max = vec![f32::NEG_INFINITY; rows.len()];
    let mut sum = vec![0f32; rows.len()];
    let mut p = [0f32; KEY_BLOCK];
    let mut acc = vec![0f32; hd];
    for b in key_blocks(rows) {
        let base = b * KEY_BLOCK;
        for (r, row) in rows.iter().enumerate() {
            let (a, e) = (row.lo.max(base), row.hi.min(base + KEY_BLOCK));
            if a >= e {
                continue;
            }
            let qh = &q[row.i * g.qw + row.h * hd..][..hd];
            let col = g.col(row.h);
            let key = |pos: usize| (pos - g.first_key) * g.kw + col;
            let mut m = f32::NEG_INFINITY;
            for pos in a..e {
                let x = dot(qh, &k[key(pos)..][..hd]) * g.scale;
                p[pos - base] = x;
                m = m.max(x);
            }
            let m = max[r].max(m);
            let alpha = (max[r] - m).exp();
            max[r] = m;
            let mut total = 0.0;
            for x in &mut p[a - base..e - base] {
                *x = (*x - m).exp();
                total += *x;
            }
            sum[r] = sum[r] * alpha + total;
            acc.fill(0.0);
            for pos in a..e {
                let w = p[pos - base];
                for (acc, v) in acc.iter_mut().zip(&v[key(pos)..][..hd]) {
                    *acc += w * v;
                }
            }
            for (o, acc) in out[r * hd..][..hd].iter_mut().zip(&acc) {
                *o = *o * alpha + acc;
            }
        }
    }
    normalize(out, &sum, hd);
}

/// Divides each row's output by its softmax sum (a row that saw no key stays 0).
fn normalize(out: &mut [f32], sum: &[f32], hd: usize) {
    for (o, &l) in out.chunks_exact_mut(hd).zip(sum) {
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        o.iter_mut().for_each(|o| *o *= inv);
    }
}

/// Causal grouped-query attention of `q [seq, n_heads * hd]` over `k`, `v`
/// `[rows, n_kv_heads * hd]` (the last `rows` positions, oldest first; paged rows are
/// every position from 0); query head `h` reads KV head `h / (n_heads / n_kv_heads)`.
/// Returns `[seq, n_heads * hd]`.
///
/// Keys and values of an f16 cache are read in place (converted as they are loaded),
/// and so are the blocks of a quantized one (each key's score summed block by block,
/// each block's dot product with the query times the block's scale; values added
/// block by block with the weight times the scale).
pub fn attention(q: &[f32], k: KvRows, v: KvRows, s: &AttentionShape) -> Vec<f32> {
    if let KvRows::PagedQ8_0(_) | KvRows::PagedQ4_0(_) = k {
        // Rotated keys and values: the query rotated alike leaves every score as it
        // is; the output, a sum of rotated values, is rotated back.
        let mut q = q.to_vec();
        rotate_heads(&mut q, s.head_dim);
        let mut out = unrotated(&q, k, v, s);
        rotate_heads(&mut out, s.head_dim);
        return out;
    }
    unrotated(q, k, v, s)
}

/// [`attention`] over the keys and values as given.
fn unrotated(q: &[f32], k: KvRows, v: KvRows, s: &AttentionShape) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if features().avx2_fma_f16c {
        let width = s.n_kv_heads * s.head_dim;
        let rows = k.len().min(v.len()) / width;
        let first = (s.past + q.len() / (s.n_heads * s.head_dim)).saturating_sub(rows);
        match (k, v) {
            (KvRows::F32(k), KvRows::F32(v)) => {
                let [k, v] = [k, v].map(|data| Flat { data, first, width });
                return simd(q, &k, &v, rows, s);
            }
            (KvRows::F16(k), KvRows::F16(v)) => {
                let [k, v] = [k, v].map(|data| Flat { data, first, width });
                return simd(q, &k, &v, rows, s);
            }
            (KvRows::PagedF32(k), KvRows::PagedF32(v)) if first == 0 => {
                let [k, v] = [k, v].map(|pages| Paged { pages, width });
                return simd(q, &k, &v, rows, s);
            }
            (KvRows::PagedF16(k), KvRows::PagedF16(v)) if first == 0 => {
                let [k, v] = [k, v].map(|pages| Paged { pages, width });
                return simd(q, &k, &v, rows, s);
            }
            // Blocks never straddle two heads when heads are whole blocks.
            (KvRows::PagedQ8_0(k), KvRows::PagedQ8_0(v))
                if first == 0 && s.head_dim.is_multiple_of(KV_BLOCK) =>
            {
                let width = width / KV_BLOCK;
                let [k, v] = [k, v].map(|pages| Paged { pages, width });
                return simd(q, &k, &v, rows, s);
            }
            (KvRows::PagedQ4_0(k), KvRows::PagedQ4_0(v))
                if first == 0 && s.head_dim.is_multiple_of(KV_BLOCK) =>
            {
                let width = width / KV_BLOCK;
                let [k, v] = [k, v].map(|pages| Paged { pages, width });
                return simd(q, &k, &v, rows, s);
            }
            _ => {}
        }
    }
    portable(q, k, v, s)
}

/// [`attention`] on the AVX2 kernel; the caller checks that the CPU has AVX2, FMA and
/// F16C.
#[cfg(target_arch = "x86_64")]
fn simd<T: avx2::Kv, S: Source<T>>(
    q: &[f32],
    k: &S,
    v: &S,
    rows: usize,
    s: &AttentionShape,
) -> Vec<f32> {
    tiled(q, rows, s, |g, rows, out| {
        // SAFETY: the caller's CPU has AVX2, FMA and F16C; every row's keys are inside
        // `k` and `v` (`tiled` bounds them by the rows given).
        unsafe { avx2::tile(q, k, v, g, rows, out) }
    })
}

/// [`attention`] in plain loops (f16 and block keys and values converted first).
fn portable(q: &[f32], k: KvRows, v: KvRows, s: &AttentionShape) -> Vec<f32> {
    let (k, v) = (k.to_f32(), v.to_f32());
    let (k, v): (&[f32], &[f32]) = (&k, &v);
    let rows = k.len().min(v.len()) / (s.n_kv_heads * s.head_dim);
    tiled(q, rows, s, |g, rows, out| {
        tile_portable(q, k, v, g, rows, out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention in f64 from its definition, for the query rows `which` (the others
    /// stay 0): query `i` (position `past + i`) sees the keys at positions not after it
    /// and, with a window `w`, within `w` of it.
    fn reference_rows(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: &AttentionShape,
        which: impl Iterator<Item = usize>,
    ) -> Vec<f32> {
        let hd = s.head_dim;
        let (qw, kw) = (s.n_heads * hd, s.n_kv_heads * hd);
        let (seq, rows) = (q.len() / qw, k.len() / kw);
        let first = s.past + seq - rows;
        let mut out = vec![0f32; q.len()];
        for i in which {
            let qp = s.past + i;
            for h in 0..s.n_heads {
                let g = h / (s.n_heads / s.n_kv_heads);
                let keys: Vec<usize> = (0..rows)
                    .filter(|&j| {
                        !s.causal
                            || (first + j <= qp && s.window.is_none_or(|w| qp - (first + j) < w))
                    })
                    .collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        (0..hd)
                            .map(|c| q[i * qw + h * hd + c] as f64 * k[j * kw + g * hd + c] as f64)
                            .sum::<f64>()
                            * s.scale as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = e.iter().sum();
                for c in 0..hd {
                    let o: f64 = keys
                        .iter()
                        .zip(&e)
                        .map(|(&j, p)| p * v[j * kw + g * hd + c] as f64)
                        .sum();
                    out[i * qw + h * hd + c] = (o / total) as f32;
                }
            }
        }
        out
    }

    fn reference(q: &[f32], k: &[f32], v: &[f32], s: &AttentionShape) -> Vec<f32> {
        let seq = q.len() / (s.n_heads * s.head_dim);
        reference_rows(q, k, v, s, 0..seq)
    }

    /// A xorshift stream of values in [-1, 1) (the block tests' too).
    pub(super) fn stream(mut x: u64) -> impl FnMut() -> f32 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_exp_is_within_two_ulps_of_exp() {
        assert!(
            features().avx2_fma_f16c,
            "this test checks the AVX2 + FMA exp, and this CPU has neither"
        );
        let mut x = -90.0f32;
        while x <= 89.0 {
            let got = unsafe { avx2::exp8_lanes([x; 8]) }[0];
            let want = (x as f64).exp();
            if (-87.3..=88.3).contains(&x) {
                let ulp = (want as f32).abs() * f32::EPSILON;
                assert!(
                    ((got as f64) - want).abs() <= 2.0 * ulp as f64,
                    "exp({x}) = {got}, want {want}"
                );
            } else {
                assert!(got.is_finite() && got >= 0.0, "exp({x}) = {got}");
            }
            x += 0.0123;
        }
    }

    #[test]
    fn host_attention_matches_its_definition() {
        let mut rand = stream(0x2545F4914F6CDD1D);
        // Decode (one query) and prefill; grouped and plain heads; head sizes with and
        // without a tail past the SIMD width; with and without a window.
        // Bidirectional (an encoder's whole input in one step) too.
        for (seq, rows, n_heads, n_kv_heads, head_dim, window, causal) in [
            (1, 1, 3, 1, 64, None, true),
            (1, 130, 9, 3, 64, None, true),
            (1, 77, 4, 4, 36, Some(5), true),
            (1, 9, 2, 1, 136, Some(20), true),
            (5, 12, 6, 2, 40, None, true),
            (4, 4, 2, 2, 16, Some(2), true),
            (7, 7, 12, 12, 32, None, false),
            (1, 1, 2, 2, 8, None, false),
        ] {
            let s = AttentionShape {
                n_heads,
                n_kv_heads,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
                window,
                past: rows - seq,
                causal,
            };
            let q: Vec<f32> = (0..seq * n_heads * head_dim)
                .map(|_| 3.0 * rand())
                .collect();
            let k: Vec<f32> = (0..rows * n_kv_heads * head_dim).map(|_| rand()).collect();
            let v: Vec<f32> = (0..rows * n_kv_heads * head_dim).map(|_| rand()).collect();
            // f32 keys and values, and the f16 of a half-size cache (against the
            // definition on the same rounded values).
            let (k16, v16): (Vec<half::f16>, Vec<half::f16>) = (
                k.iter().map(|&x| half::f16::from_f32(x)).collect(),
                v.iter().map(|&x| half::f16::from_f32(x)).collect(),
            );
            let (kr, vr): (Vec<f32>, Vec<f32>) = (
                k16.iter().map(|x| x.to_f32()).collect(),
                v16.iter().map(|x| x.to_f32()).collect(),
            );
            for (what, got, want) in [
                (
                    "f32",
                    attention(&q, KvRows::F32(&k), KvRows::F32(&v), &s),
                    reference(&q, &k, &v, &s),
                ),
                (
                    "f16",
                    attention(&q, KvRows::F16(&k16), KvRows::F16(&v16), &s),
                    reference(&q, &kr, &vr, &s),
                ),
            ] {
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5,
                        "{what} seq {seq} rows {rows} heads {n_heads}/{n_kv_heads} hd {head_dim} window {window:?} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// Random queries (scaled by `qs`), keys and values for `seq` positions after `past`.
    fn inputs(
        rand: &mut impl FnMut() -> f32,
        s: &AttentionShape,
        seq: usize,
        qs: f32,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let rows = s.past + seq;
        let kw = s.n_kv_heads * s.head_dim;
        let q = (0..seq * s.n_heads * s.head_dim)
            .map(|_| qs * rand())
            .collect();
        let k = (0..rows * kw).map(|_| rand()).collect();
        let v = (0..rows * kw).map(|_| rand()).collect();
        (q, k, v)
    }

    /// The tiled kernel against attention's definition at every scale of prompt, from
    /// one position to 4096 (block edges either side of 16 and 64 included), on the
    /// SIMD path (f32 and f16 keys) and the portable one. Errors are relative to the
    /// values' magnitude (the output is a convex combination of values in [-1, 1]).
    /// Long prompts check a sample of rows (the first and last 24 and every 61st)
    /// against the f64 definition; the kernel computes all of them.
    #[test]
    fn tiled_attention_matches_its_definition_from_1_to_4096_positions() {
        let mut rand = stream(0x9E3779B97F4A7C15);
        for seq in [
            1, 2, 3, 5, 8, 15, 16, 17, 31, 63, 64, 65, 100, 127, 128, 129, 255, 257, 513, 1000,
            2048, 4096,
        ] {
            let s = AttentionShape {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 64,
                scale: 0.125,
                window: None,
                past: 0,
                causal: true,
            };
            // Queries of spread 4: scores of standard deviation about 1, so attention
            // spreads over many keys (the hard case for a running sum).
            let (q, k, v) = inputs(&mut rand, &s, seq, 4.0);
            let which: Vec<usize> = (0..seq)
                .filter(|&i| seq <= 256 || i < 24 || i + 24 >= seq || i % 61 == 0)
                .collect();
            let want = reference_rows(&q, &k, &v, &s, which.iter().copied());
            let k16: Vec<half::f16> = k.iter().map(|&x| half::f16::from_f32(x)).collect();
            let v16: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            let (kr, vr): (Vec<f32>, Vec<f32>) = (
                k16.iter().map(|x| x.to_f32()).collect(),
                v16.iter().map(|x| x.to_f32()).collect(),
            );
            let want16 = reference_rows(&q, &kr, &vr, &s, which.iter().copied());
            let mut runs = vec![
                (
                    "simd f32",
                    attention(&q, KvRows::F32(&k), KvRows::F32(&v), &s),
                    &want,
                ),
                (
                    "simd f16",
                    attention(&q, KvRows::F16(&k16), KvRows::F16(&v16), &s),
                    &want16,
                ),
            ];
            if seq <= 1024 {
                runs.push((
                    "portable",
                    portable(&q, KvRows::F32(&k), KvRows::F32(&v), &s),
                    &want,
                ));
            }
            let qw = s.n_heads * s.head_dim;
            for (what, got, want) in runs {
                let mut worst = 0f32;
                for &i in &which {
                    for (g, w) in got[i * qw..(i + 1) * qw]
                        .iter()
                        .zip(&want[i * qw..(i + 1) * qw])
                    {
                        worst = worst.max((g - w).abs());
                    }
                }
                assert!(worst <= 1e-5, "{what} at {seq} positions: error {worst:e}");
            }
        }
    }

    /// A row's output is the same bits whichever call it is in: a prompt in one step,
    /// the same prompt in chunks of several sizes (each chunk after the cache of the
    /// ones before), and the last position as a decode step; with and without a window.
    #[test]
    fn a_rows_output_does_not_depend_on_the_call_it_is_in() {
        let mut rand = stream(0xD1B54A32D192ED03);
        for window in [None, Some(100)] {
            let seq = 300;
            let whole = AttentionShape {
                n_heads: 6,
                n_kv_heads: 2,
                head_dim: 40,
                scale: 0.15,
                window,
                past: 0,
                causal: true,
            };
            let (q, k, v) = inputs(&mut rand, &whole, seq, 3.0);
            let k16: Vec<half::f16> = k.iter().map(|&x| half::f16::from_f32(x)).collect();
            let v16: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            let (qw, kw) = (6 * 40, 2 * 40);
            let one = attention(&q, KvRows::F16(&k16), KvRows::F16(&v16), &whole);
            let one_portable = portable(&q, KvRows::F32(&k), KvRows::F32(&v), &whole);
            for chunk in [1, 7, 16, 64, 100, 299] {
                let mut past = 0;
                while past < seq {
                    let n = chunk.min(seq - past);
                    let s = AttentionShape { past, ..whole };
                    let qs = &q[past * qw..(past + n) * qw];
                    // The cache as a sliding window would hold it: the last w - 1
                    // positions before the chunk, then the chunk.
                    let first = window.map_or(0, |w| past.saturating_sub(w - 1));
                    let (ks, vs) = (
                        &k16[first * kw..(past + n) * kw],
                        &v16[first * kw..(past + n) * kw],
                    );
                    let got = attention(qs, KvRows::F16(ks), KvRows::F16(vs), &s);
                    let (kf, vf) = (
                        &k[first * kw..(past + n) * kw],
                        &v[first * kw..(past + n) * kw],
                    );
                    let got_portable = portable(qs, KvRows::F32(kf), KvRows::F32(vf), &s);
                    for (i, (g, w)) in got.iter().zip(&one[past * qw..]).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "window {window:?} chunk {chunk} at {past} [{i}]"
                        );
                    }
                    for (i, (g, w)) in got_portable
                        .iter()
                        .zip(&one_portable[past * qw..])
                        .enumerate()
                    {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "portable, window {window:?} chunk {chunk} at {past} [{i}]"
                        );
                    }
                    past += n;
                }
            }
        }
    }

    /// Keys and values in pages (a last page holding stale rows past the length, as a
    /// cache rewound and shared leaves it) give the same bits as in one run.
    #[test]
    fn paged_rows_read_as_one_run_does() {
        let mut rand = stream(0x94D049BB133111EB);
        for (seq, past) in [(1, 0), (1, 200), (70, 0), (33, 95), (1, 127), (130, 0)] {
            let s = AttentionShape {
                n_heads: 4,
                n_kv_heads: 1,
                head_dim: 72,
                scale: 0.12,
                window: None,
                past,
                causal: true,
            };
            let (q, k, v) = inputs(&mut rand, &s, seq, 3.0);
            let width = 72;
            let page = |x: &[f32]| -> Vec<Page<half::f16>> {
                let mut pages: Vec<Page<half::f16>> = x
                    .chunks(KEY_BLOCK * width)
                    .map(|c| Page::new(c.iter().map(|&x| half::f16::from_f32(x)).collect()))
                    .collect();
                // Stale rows after the last position.
                if let Some(last) = pages.last_mut() {
                    std::sync::Arc::make_mut(last)
                        .extend((0..width).map(|_| half::f16::from_f32(9.0)));
                }
                pages
            };
            let (kp, vp) = (page(&k), page(&v));
            let k16: Vec<half::f16> = k.iter().map(|&x| half::f16::from_f32(x)).collect();
            let v16: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            let flat = attention(&q, KvRows::F16(&k16), KvRows::F16(&v16), &s);
            let (kr, vr) = (
                KvRows::PagedF16(Pages {
                    pages: &kp,
                    len: k.len(),
                }),
                KvRows::PagedF16(Pages {
                    pages: &vp,
                    len: v.len(),
                }),
            );
            let paged = attention(&q, kr, vr, &s);
            assert!(
                flat.iter()
                    .zip(&paged)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "seq {seq} past {past}"
            );
            assert_eq!(kr.to_f32().len(), k.len());
            assert!(kr.to_f32().iter().zip(&k16).all(|(a, b)| *a == b.to_f32()));
        }
    }

    /// Rows of `width` values quantized into pages of [`KEY_BLOCK`] positions (a last
    /// page holding a stale row past the length, as a rewound cache leaves it), and
    /// the values they dequantize to.
    fn block_pages<B: KvBlock>(
        x: &[f32],
        width: usize,
        head_dim: usize,
    ) -> (Vec<Page<B>>, Vec<f32>) {
        let mut rotated = x.to_vec();
        rotate_heads(&mut rotated, head_dim);
        let mut pages: Vec<Page<B>> = rotated
            .chunks(KEY_BLOCK * width)
            .map(|c| Page::new(quantize_blocks(c).collect()))
            .collect();
        if let Some(last) = pages.last_mut() {
            let stale: Vec<f32> = vec![9.0; width];
            std::sync::Arc::make_mut(last).extend(quantize_blocks::<B>(&stale));
        }
        let mut deq = Vec::new();
        for b in pages.iter().flat_map(|p| p.iter()) {
            b.dequantize(&mut deq);
        }
        deq.truncate(x.len());
        (pages, deq)
    }

    /// The values rows of blocks hold, rotated back.
    fn held_values(stored: &[f32], head_dim: usize) -> Vec<f32> {
        let mut x = stored.to_vec();
        rotate_heads(&mut x, head_dim);
        x
    }

    /// Attention over `B` blocks (read in place, as `rows` makes them) against the f32
    /// kernel over the values the blocks dequantize to and against the f64 definition
    /// on them; and the distance the quantization itself moved the output, which must
    /// be more than 0 and at most `bound`.
    fn check_blocks<B: KvBlock>(
        what: &str,
        rows: for<'a> fn(Pages<'a, B>) -> KvRows<'a>,
        (q, k, v): (&[f32], &[f32], &[f32]),
        s: &AttentionShape,
        bound: f32,
    ) {
        let width = s.n_kv_heads * s.head_dim;
        let (kp, stored_k) = block_pages::<B>(k, width, s.head_dim);
        let (vp, stored_v) = block_pages::<B>(v, width, s.head_dim);
        let len = k.len() / KV_BLOCK;
        let (kb, vb) = (
            rows(Pages { pages: &kp, len }),
            rows(Pages { pages: &vp, len }),
        );
        assert_eq!(kb.len(), k.len());
        assert_eq!(kb.to_f32().as_ref(), stored_k.as_slice(), "{what}: to_f32");
        let (kr, vr) = (
            held_values(&stored_k, s.head_dim),
            held_values(&stored_v, s.head_dim),
        );
        let got = attention(q, kb, vb, s);
        let f32_kernel = attention(q, KvRows::F32(&kr), KvRows::F32(&vr), s);
        let want = reference(q, &kr, &vr, s);
        let exact = reference(q, k, v, s);
        let (mut kernel_err, mut def_err, mut quant_err) = (0f32, 0f32, 0f32);
        for ((g, f), (w, x)) in got.iter().zip(&f32_kernel).zip(want.iter().zip(&exact)) {
            kernel_err = kernel_err.max((g - f).abs());
            def_err = def_err.max((g - w).abs());
            quant_err = quant_err.max((g - x).abs());
        }
        let at = format!(
            "{what} past {} heads {}/{} hd {} window {:?}",
            s.past, s.n_heads, s.n_kv_heads, s.head_dim, s.window
        );
        assert!(
            kernel_err <= 2e-5,
            "{at}: against the f32 kernel {kernel_err:e}"
        );
        assert!(def_err <= 2e-5, "{at}: against the definition {def_err:e}");
        assert!(
            quant_err > 0.0 && quant_err <= bound,
            "{at}: quantization error {quant_err:e}"
        );
    }

    /// Q8_0 and Q4_0 caches: decode and prompts, grouped heads, windows, head sizes of
    /// one to eight blocks, lengths either side of the page edges.
    // (Closures, not the variants: a variant's lifetime is not higher-ranked.)
    #[allow(clippy::redundant_closure)]
    #[test]
    fn attention_over_blocks_matches_the_f32_kernel_on_their_values() {
        let mut rand = stream(0xA0761D6478BD642F);
        for (seq, past, n_heads, n_kv_heads, head_dim, window) in [
            (1, 0, 2, 1, 32, None),
            (1, 200, 9, 3, 64, None),
            (1, 63, 4, 2, 128, Some(40)),
            (1, 64, 14, 2, 64, None),
            (70, 0, 4, 1, 64, None),
            (33, 95, 8, 4, 96, None),
            (130, 0, 6, 2, 64, Some(50)),
            (1, 1000, 4, 1, 256, None),
        ] {
            let s = AttentionShape {
                n_heads,
                n_kv_heads,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
                window,
                past,
                causal: true,
            };
            // Keys and values of spread 2 with queries of spread 3: scores of several
            // units, as in a model.
            let (q, k, v) = inputs(&mut rand, &s, seq, 3.0);
            let k: Vec<f32> = k.iter().map(|x| 2.0 * x).collect();
            let v: Vec<f32> = v.iter().map(|x| 2.0 * x).collect();
            // Outputs are averages of values of magnitude up to 2. Rounded in a rotated
            // basis, a value's error is a mix of the rounding of a run of 64 values
            // (RMS step / sqrt(12), steps of 1/127 or 1/8 of a block's largest, about
            // 3): the sanity bounds are a tenth of the values' range for Q8_0 and half
            // of it for Q4_0 (first rows see a single key, so its value unaveraged).
            check_blocks::<BlockQ8_0>("q8_0", |p| KvRows::PagedQ8_0(p), (&q, &k, &v), &s, 0.1);
            check_blocks::<BlockQ4_0>("q4_0", |p| KvRows::PagedQ4_0(p), (&q, &k, &v), &s, 1.0);
        }
    }

    /// A row's output over blocks is the same bits whichever call it is in (the prompt
    /// in one step, in chunks, the last position as a decode step).
    #[test]
    fn a_rows_output_over_blocks_does_not_depend_on_the_call_it_is_in() {
        let mut rand = stream(0xE7037ED1A0B428DB);
        let whole = AttentionShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 64,
            scale: 0.125,
            window: None,
            past: 0,
            causal: true,
        };
        let seq = 200;
        let (q, k, v) = inputs(&mut rand, &whole, seq, 3.0);
        let (qw, kw) = (6 * 64, 2 * 64);
        let (kp, _) = block_pages::<BlockQ8_0>(&k, kw, 64);
        let (vp, _) = block_pages::<BlockQ8_0>(&v, kw, 64);
        fn rows(pages: &[Page<BlockQ8_0>], n: usize) -> KvRows<'_> {
            KvRows::PagedQ8_0(Pages {
                pages,
                len: n * 2 * 64 / KV_BLOCK,
            })
        }
        let one = attention(&q, rows(&kp, seq), rows(&vp, seq), &whole);
        for chunk in [1, 7, 64, 199] {
            let mut past = 0;
            while past < seq {
                let n = chunk.min(seq - past);
                let s = AttentionShape { past, ..whole };
                let got = attention(
                    &q[past * qw..(past + n) * qw],
                    rows(&kp, past + n),
                    rows(&vp, past + n),
                    &s,
                );
                for (i, (g, w)) in got.iter().zip(&one[past * qw..]).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "chunk {chunk} at {past} [{i}]");
                }
                past += n;
            }
        }
    }
}
