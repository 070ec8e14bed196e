//! Reference LFQ / BSQ: one id (or one code) at a time, straight from the contract in
//! [`crate::lfq`]. Slow and obvious on purpose.

use crate::dtype::Float;
use crate::error::Result;
use crate::lfq::{BitOrder, Lfq, LfqStats, HISTOGRAM_MAX_BITS};

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
