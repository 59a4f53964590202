use std::ops::Range;
use std::sync::Arc;

use super::format::{dequantize, GgmlType};
use super::packed::Packed;

/// Memory that quantized rows are read from: a memory-mapped file or our own bytes.
pub trait Bytes: Send + Sync {
    fn bytes(&self) -> &[u8];
    /// A hint that `range` will not be read for a while (its rows were copied to a
    /// packed layout): a mapped file may drop those pages from memory; reading them
    /// again stays valid.
    fn release(&self, _range: Range<usize>) {}
}

impl<T: AsRef<[u8]> + Send + Sync> Bytes for T {
    fn bytes(&self) -> &[u8] {
        self.as_ref()
    }
}

/// A run of consecutive rows of one block type, stored at a constant distance: back to
/// back, or every other row of the store (a head's half of GGUF's permuted Q/K rows).
#[derive(Clone)]
struct Segment {
    ty: GgmlType,
    store: Arc<dyn Bytes>,
    /// Byte offset of the first row in `store`.
    offset: usize,
    rows: usize,
    /// Bytes from one row's start to the next's; the row size when back to back.
    step: usize,
}

impl Segment {
    /// Where row `i` of the segment starts in the store.
    fn at(&self, i: usize) -> usize {
        self.offset + i * self.step
    }

    /// `next` as more rows of this segment, if it continues it at the same step.
    fn extend(&mut self, next: &Segment, row_len: usize) -> bool {
        if self.ty != next.ty || !Arc::ptr_eq(&self.store, &next.store) {
            return false;
        }
        let last = self.at(self.rows - 1);
        let Some(step) = next.offset.checked_sub(last).filter(|&d| d >= row_len) else {
            return false;
        };
        // A one-row segment has no step of its own yet.
        let fits = |s: &Segment| s.rows == 1 || s.step == step;
        if !fits(self) || !fits(next) {
            return false;
        }
        self.step = step;
        self.rows += next.rows;
        true
    }
}

/// A `[rows, cols]` weight matrix whose rows are GGML blocks (Q8_0, Q4_0, Q4_1, Q5_0,
/// Q5_1, Q4_K or Q6_K), read where they are stored.
///
/// Rows are kept as segments into shared stores, so concatenating matrices (fused
/// Q/K/V), taking some of their rows (a split of a fused checkpoint matrix) or
/// reordering rows (GGUF's permuted Q/K heads) copies no weight bytes. Segments may
/// even differ in block type (a Q4_K Q next to a Q6_K V).
#[derive(Clone)]
pub struct QMatrix {
    cols: usize,
    rows: usize,
    segments: Vec<Segment>,
    /// First row of each segment.
    starts: Vec<usize>,
    /// The same rows interleaved for the grouped kernel (see [`QMatrix::pack`]).
    packed: Option<Arc<Packed>>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QMatrix[{}x{}, {}]",
            self.rows,
            self.cols,
            self.type_names()
        )
    }
}

/// Why a block matrix cannot be made.
fn check(ty: GgmlType, rows: usize, cols: usize) -> Result<usize, String> {
    if !ty.is_block_quantized() {
        return Err(format!("{} is not a block-quantized type", ty.name()));
    }
    ty.bytes_for(cols).map(|b| b * rows).ok_or_else(|| {
        format!(
            "a row of {cols} values is not a whole number of {} blocks of {}",
            ty.name(),
            ty.block_len()
        )
    })
}

impl QMatrix {
    /// `rows` rows of `cols` values of type `ty`, stored back to back in `store` from
    /// byte `offset` on.
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        store: Arc<dyn Bytes>,
        offset: usize,
    ) -> Result<QMatrix, String> {
        let need = check(ty, rows, cols)?;
        let have = store.bytes().len();
        if offset.checked_add(need).is_none_or(|end| end > have) {
            return Err(format!(
                "{rows}x{cols} {} needs {need} bytes from offset {offset}; the store has {have}",
                ty.name()
            ));
        }
        Ok(QMatrix {
            cols,
            rows,
            segments: vec![Segment {
                ty,
                store,
                offset,
                rows,
                step: ty.bytes_for(cols).unwrap_or(0),
            }],
            starts: vec![0],
            packed: None,
        })
    }

    /// A matrix over bytes of our own.
    pub fn from_bytes(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    ) -> Result<QMatrix, String> {
        Self::new(ty, rows, cols, Arc::new(bytes), 0)
    }

    /// Quantizes row-major f32 values to Q8_0 (blocks of 32 int8 values with an f16
    /// scale); `None` when `cols` is not a whole number of blocks.
    pub fn quantize_q8_0(data: &[f32], rows: usize, cols: usize) -> Option<QMatrix> {
        if !cols.is_multiple_of(32) || data.len() != rows * cols {
            return None;
        }
        let mut bytes = Vec::with_capacity(data.len() / 32 * 34);
        for block in data.chunks_exact(32) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = half::f16::from_f32(amax / 127.0);
            let inv = if d.to_f32() == 0.0 {
                0.0
            } else {
                1.0 / d.to_f32()
            };
            bytes.extend_from_slice(&d.to_le_bytes());
            bytes.extend(
                block
                    .iter()
                    .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
            );
        }
        Self::from_bytes(GgmlType::Q8_0, rows, cols, bytes).ok()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Weight bytes this matrix reads.
    pub fn bytes(&self) -> usize {
        self.segments
            .iter()
            .map(|s| s.rows * s.ty.bytes_for(self.cols).unwrap_or(0))
            .sum()
    }

    /// The block types of its rows, as `Q4_1` or `Q4_K+Q6_K`.
    pub fn type_names(&self) -> String {
        let mut names: Vec<&str> = self.segments.iter().map(|s| s.ty.name()).collect();
        names.dedup();
        names.join("+")
    }

    /// How many runs of rows it is kept as (each a few words of memory).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    fn segment_of(&self, row: usize) -> usize {
        self.starts.partition_point(|&s| s <= row) - 1
    }

    /// The block type and bytes of row `r`.
    pub fn row(&self, r: usize) -> (GgmlType, &[u8]) {
        let i = self.segment_of(r);
        let s = &self.segments[i];
        let len = s.ty.bytes_for(self.cols).unwrap_or(0);
        let at = s.at(r - self.starts[i]);
        (s.ty, &s.store.bytes()[at..at + len])
    }

    /// Calls `f(first_row, type, bytes)` for each run of consecutive rows of `range`
    /// stored back to back, in order; `bytes` holds the run's rows (one row at a time
    /// where they are not back to back).
    pub fn for_each_run(&self, range: Range<usize>, mut f: impl FnMut(usize, GgmlType, &[u8])) {
        if range.is_empty() {
            return;
        }
        let mut seg = self.segment_of(range.start);
        let mut r = range.start;
        while r < range.end {
            let s = &self.segments[seg];
            let len = s.ty.bytes_for(self.cols).unwrap_or(0);
            let seg_end = self.starts[seg] + s.rows;
            let end = if s.step == len {
                seg_end.min(range.end)
            } else {
                r + 1
            };
            let at = s.at(r - self.starts[seg]);
            f(r, s.ty, &s.store.bytes()[at..at + (end - r) * len]);
            r = end;
            if r == seg_end {
                seg += 1;
            }
        }
    }

    /// Row `r` as f32, appended to `out`.
    pub fn dequantize_row(&self, r: usize, out: &mut Vec<f32>) {
        let (ty, bytes) = self.row(r);
        dequantize(ty, bytes, out);
    }

    /// The whole matrix as row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        self.for_each_run(0..self.rows, |_, ty, bytes| dequantize(ty, bytes, &mut out));
        out
    }

    fn from_segments(cols: usize, parts: impl IntoIterator<Item = Segment>) -> QMatrix {
        let mut segments: Vec<Segment> = Vec::new();
        for s in parts.into_iter().filter(|s| s.rows > 0) {
            // Rows that continue the previous segment in the same store at its step join
            // it: GGUF's permuted Q/K rows make two segments per head, not one per row.
            if let Some(last) = segments.last_mut() {
                if last.extend(&s, s.ty.bytes_for(cols).unwrap_or(0)) {
                    continue;
                }
            }
            segments.push(s);
        }
        segments.shrink_to_fit();
        let mut starts = Vec::with_capacity(segments.len());
        let mut rows = 0;
        for s in &segments {
            starts.push(rows);
            rows += s.rows;
        }
        QMatrix {
            cols,
            rows,
            segments,
            starts,
            packed: None,
        }
    }

    /// This matrix with a copy of its rows interleaved eight at a time, which the
    /// matmul then reads instead of the rows (about twice as fast on AVX2); `None`
    /// unless the rows are a multiple of eight and all Q4_0 / Q4_1 or all Q4_K. Row
    /// operations on the result read the rows and drop the packed copy.
    pub fn pack(&self) -> Option<QMatrix> {
        let packed = Packed::new(self)?;
        Some(QMatrix {
            packed: Some(Arc::new(packed)),
            ..self.clone()
        })
    }

    pub(crate) fn packed(&self) -> Option<&Packed> {
        self.packed.as_deref()
    }

    /// Whether [`QMatrix::pack`] made this matrix.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// Tells the stores that these rows will not be read for a while (see
    /// [`Bytes::release`]).
    pub fn release_rows(&self) {
        for s in self.segments.iter().filter(|s| s.rows > 0) {
            let len = s.ty.bytes_for(self.cols).unwrap_or(0);
            s.store.release(s.offset..s.at(s.rows - 1) + len);
        }
    }

    /// Tells every store these matrices read from, once each, that none of it will be
    /// read for a while (see [`Bytes::release`]): also the pages next to their rows that
    /// reading them brought in.
    pub fn release_stores<'a>(matrices: impl IntoIterator<Item = &'a QMatrix>) {
        let mut seen: Vec<&Arc<dyn Bytes>> = Vec::new();
        for s in matrices.into_iter().flat_map(|m| &m.segments) {
            if !seen.iter().any(|x| Arc::ptr_eq(x, &s.store)) {
                s.store.release(0..s.store.bytes().len());
                seen.push(&s.store);
            }
        }
    }

    /// The rows of `parts` one after the other; `None` when their widths differ.
    pub fn concat(parts: &[&QMatrix]) -> Option<QMatrix> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        Some(Self::from_segments(
            cols,
            parts.iter().flat_map(|p| p.segments.iter().cloned()),
        ))
    }

    /// Rows `order[0]`, `order[1]`, ... of this matrix; `None` if one is out of range.
    pub fn select_rows(&self, order: &[usize]) -> Option<QMatrix> {
        if order.iter().any(|&r| r >= self.rows) {
            return None;
        }
        Some(Self::from_segments(
            self.cols,
            order.iter().map(|&r| {
                let i = self.segment_of(r);
                let s = &self.segments[i];
                let len = s.ty.bytes_for(self.cols).unwrap_or(0);
                Segment {
                    ty: s.ty,
                    store: s.store.clone(),
                    offset: s.at(r - self.starts[i]),
                    rows: 1,
                    step: len,
                }
            }),
        ))
    }

    /// Rows `start..start + len`; `None` past the end.
    pub fn slice_rows(&self, start: usize, len: usize) -> Option<QMatrix> {
        let order: Vec<usize> = (start..start.checked_add(len)?).collect();
        self.select_rows(&order)
    }
}
