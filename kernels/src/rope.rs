//! Rotate-half RoPE over host rows, in place, from precomputed `cos` / `sin` tables.

/// Rotate-half RoPE in place on `x [seq, heads * head_dim]`; `cos`, `sin` are the rows
/// `[seq, head_dim / 2]` of this step's positions.
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], head_dim: usize) {
    let half = head_dim / 2;
    let width = x.len() / (cos.len() / half);
    for (i, row) in x.chunks_exact_mut(width).enumerate() {
        let (c, s) = (
            &cos[i * half..(i + 1) * half],
            &sin[i * half..(i + 1) * half],
        );
        for head in row.chunks_exact_mut(head_dim) {
            let (x1, x2) = head.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (x1[j], x2[j]);
                x1[j] = a * c[j] - b * s[j];
                x2[j] = b * c[j] + a * s[j];
            }
        }
    }
}
