//! Reference LFQ / BSQ: one id (or one code) at a time, straight from the contract in
//! [`crate::lfq`]. Slow and obvious on purpose.
//!
//! Public entry points: [`lfq_encode`](super::lfq_encode), [`lfq_decode`](super::lfq_decode).

use crate::dtype::Float;
use crate::error::Result;
use crate::lfq::{BitOrder, Lfq, LfqEntropy, LfqStats, EXACT_ENTROPY_MAX_BITS, HISTOGRAM_MAX_BITS};

/// The weight exponent of channel `k` of a group of `d` bits.
fn weight(order: BitOrder, d: usize, k: usize) -> usize {
    match order {
        BitOrder::MsbFirst => d - 1 - k,
        BitOrder::LsbFirst => k,
    }
}

/// z `[N, G·d]` → ids `[N, G]`; stops at the first NaN.
pub(crate) fn encode<T: Float>(p: &Lfq, z: &[T], ids: &mut [u32]) -> Result<()> {
    let d = p.bits() as usize;
    for (t, id) in ids.iter_mut().enumerate() {
        let mut value: u64 = 0;
        for k in 0..d {
            let i = t * d + k;
            let x = z[i].to_f32();
            if x.is_nan() {
                return Err(p.nan_error(i));
            }
            if x > 0.0 {
                value += 1u64 << weight(p.order(), d, k);
            }
        }
        *id = value as u32;
    }
    Ok(())
}

/// z → ids and the per-group L2-normalised z.
pub(crate) fn encode_normalized<T: Float, O: Float>(p: &Lfq, z: &[T], ids: &mut [u32], u: &mut [O]) -> Result<()> {
    encode(p, z, ids)?;
    let d = p.bits() as usize;
    for (zg, ug) in z.chunks(d).zip(u.chunks_mut(d)) {
        let mut sum = 0.0f64;
        for x in zg {
            let x = x.to_f32() as f64;
            sum += x * x;
        }
        let norm = sum.sqrt();
        for (x, o) in zg.iter().zip(ug.iter_mut()) {
            let x = x.to_f32();
            *o = if norm == 0.0 { O::from_f32(x) } else { O::from_f32((x as f64 / norm) as f32) };
        }
    }
    Ok(())
}

/// ids `[N, G]` → codes `[N, G·d]`; stops at the first id with bits at or above d.
pub(crate) fn decode<O: Float>(p: &Lfq, ids: &[u32], codes: &mut [O]) -> Result<()> {
    let d = p.bits() as usize;
    let v = p.code_value();
    for (t, &id) in ids.iter().enumerate() {
        if (id as u64) >= p.codebook_size() {
            return Err(p.bad_id_error(t, id));
        }
        for k in 0..d {
            let bit = (id as u64 >> weight(p.order(), d, k)) & 1;
            codes[t * d + k] = O::from_f32(if bit == 1 { v } else { -v });
        }
    }
    Ok(())
}

/// Ones per channel and the pooled id histogram, one id at a time.
pub(crate) fn statistics(p: &Lfq, ids: &[u32]) -> Result<LfqStats> {
    let (g, d) = (p.groups(), p.bits() as usize);
    let mut ones = vec![0u64; g * d];
    let mut histogram = (p.bits() <= HISTOGRAM_MAX_BITS).then(|| vec![0u64; p.codebook_size() as usize]);
    for (t, &id) in ids.iter().enumerate() {
        if (id as u64) >= p.codebook_size() {
            return Err(p.bad_id_error(t, id));
        }
        for k in 0..d {
            if (id as u64 >> weight(p.order(), d, k)) & 1 == 1 {
                ones[(t % g) * d + k] += 1;
            }
        }
        if let Some(h) = histogram.as_mut() {
            h[id as usize] += 1;
        }
    }
    Ok(LfqStats { tokens: ids.len() / g, ones, histogram })
}

/// `σ(a) = 1 / (1 + e^−a)`, without overflow.
fn sigmoid(a: f64) -> f64 {
    if a >= 0.0 {
        1.0 / (1.0 + (-a).exp())
    } else {
        a.exp() / (1.0 + a.exp())
    }
}

/// The binary entropy (nats) of `σ(a)`: `ln(1 + e^−|a|) + |a|·e^−|a| / (1 + e^−|a|)`.
fn binary_entropy_of_logit(a: f64) -> f64 {
    let u = (-a.abs()).exp();
    if u == 0.0 {
        0.0
    } else {
        u.ln_1p() + a.abs() * u / (1.0 + u)
    }
}

/// `−p ln p` with `0 ln 0 = 0`.
fn plogp(p: f64) -> f64 {
    if p > 0.0 {
        -p * p.ln()
    } else {
        0.0
    }
}

/// The entropy terms in f64, token by token, straight from the definitions in
/// [`crate::lfq`]; the exact codebook entropy enumerates all `2^d` codes of every token.
pub(crate) fn entropy<T: Float>(p: &Lfq, z: &[T], tau: f32, exact: bool) -> Result<LfqEntropy> {
    let (groups, d, c) = (p.groups(), p.bits() as usize, p.channels());
    if let Some(i) = z.iter().position(|x| x.to_f32().is_nan()) {
        return Err(p.nan_error(i));
    }
    let n = z.len() / c;
    let scale = 4.0 * tau as f64 * p.code_value() as f64;
    let exact = exact && p.bits() <= EXACT_ENTROPY_MAX_BITS;
    let mut per_token = vec![0.0; groups];
    let (mut ones, mut zeros) = (vec![0.0; c], vec![0.0; c]);
    let mut codes = vec![vec![0.0; if exact { 1 << d } else { 0 }]; groups];
    for row in z.chunks_exact(c) {
        for g in 0..groups {
            let a: Vec<f64> = row[g * d..(g + 1) * d].iter().map(|x| scale * x.to_f32() as f64).collect();
            for (k, &a) in a.iter().enumerate() {
                per_token[g] += binary_entropy_of_logit(a);
                ones[g * d + k] += sigmoid(a);
                zeros[g * d + k] += sigmoid(-a);
            }
            for (code, sum) in codes[g].iter_mut().enumerate() {
                let prob: f64 = a
                    .iter()
                    .enumerate()
                    .map(|(k, &a)| if (code >> k) & 1 == 1 { sigmoid(a) } else { sigmoid(-a) })
                    .product();
                *sum += prob;
            }
        }
    }
    let n = n as f64;
    let factorized =
        (0..groups).map(|g| (0..d).map(|k| plogp(ones[g * d + k] / n) + plogp(zeros[g * d + k] / n)).sum()).collect();
    Ok(LfqEntropy {
        tokens: z.len() / c,
        per_token: per_token.iter().map(|h| h / n).collect(),
        codebook: exact.then(|| codes.iter().map(|sums| sums.iter().map(|&s| plogp(s / n)).sum()).collect()),
        codebook_factorized: factorized,
        bit_probability: ones.iter().map(|o| o / n).collect(),
    })
}
