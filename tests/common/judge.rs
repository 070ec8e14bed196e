//! Attention problems judged as FlashAttention's tests judge a kernel: random problems (every
//! mask, bias, layout, GQA), the f64 oracle, the naive same-dtype computation, and the error
//! measures. Shared by tests/attention.rs (cpu backends) and tests/cuda_attention.rs.

use vistok::attention::{Attention, Bias, Mask, QkvLayout};
use vistok::{Backend, DType, Float, View, ViewMut};

use super::Rng;

/// Sizes of one problem.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub b: usize,
    pub h: usize,
    pub hkv: usize,
    pub nq: usize,
    pub nk: usize,
    pub d: usize,
    pub layout: QkvLayout,
}

impl Dims {
    pub fn q(&self) -> [usize; 4] {
        match self.layout {
            QkvLayout::Bhnd => [self.b, self.h, self.nq, self.d],
            QkvLayout::Bnhd => [self.b, self.nq, self.h, self.d],
        }
    }

    pub fn kv(&self) -> [usize; 4] {
        match self.layout {
            QkvLayout::Bhnd => [self.b, self.hkv, self.nk, self.d],
            QkvLayout::Bnhd => [self.b, self.nk, self.hkv, self.d],
        }
    }

    pub fn lse(&self) -> [usize; 3] {
        [self.b, self.h, self.nq]
    }

    /// Offset of `(b, head, token, 0)`.
    pub fn at(&self, heads: usize, n: usize, b: usize, head: usize, t: usize) -> usize {
        match self.layout {
            QkvLayout::Bhnd => ((b * heads + head) * n + t) * self.d,
            QkvLayout::Bnhd => ((b * n + t) * heads + head) * self.d,
        }
    }
}

/// Q, K, V and the options' data of one problem.
pub struct Data<T> {
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub bias: Vec<f32>,
    pub bias_dims: Vec<usize>,
    pub qseg: Vec<u32>,
    pub kseg: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaskKind {
    None,
    Causal,
    Window(usize, usize),
    Segments,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BiasKind {
    None,
    /// `[B or 1, Nk]`; the flag: batch dimension 1.
    Key(bool),
    /// `[B or 1, H or 1, Nq, Nk]`.
    Full(bool, bool),
}

#[derive(Debug, Clone, Copy)]
pub struct Opts {
    pub mask: MaskKind,
    pub bias: BiasKind,
    pub scale: Option<f32>,
    /// Magnitude of Q and K values.
    pub amp: f32,
}

/// A random problem; `seg_step`: one segment id in about `seg_step` steps to the next in the
/// sorted segment runs.
pub fn make<T: Float>(dm: &Dims, o: &Opts, seed: u64, seg_step: u64) -> Data<T> {
    let mut r = Rng(seed);
    let mut vals = |n: usize, amp: f32| -> Vec<T> { (0..n).map(|_| T::from_f32(r.uniform(-amp, amp))).collect() };
    let q = vals(dm.q().iter().product(), o.amp);
    let k = vals(dm.kv().iter().product(), o.amp);
    let v = vals(dm.kv().iter().product(), 1.0);
    let mut r = Rng(seed ^ 0x5eed);
    let bias_dims = match o.bias {
        BiasKind::None => vec![],
        BiasKind::Key(one) => vec![if one { 1 } else { dm.b }, dm.nk],
        BiasKind::Full(b1, h1) => vec![if b1 { 1 } else { dm.b }, if h1 { 1 } else { dm.h }, dm.nq, dm.nk],
    };
    let bias = (0..bias_dims.iter().product::<usize>())
        .map(|_| if r.next_u64().is_multiple_of(13) { f32::NEG_INFINITY } else { r.uniform(-2.0, 2.0) })
        .collect();
    // Segment ids: mostly non-decreasing runs (scales, frames), sometimes shuffled.
    let mut seg = |n: usize| -> Vec<u32> {
        let mut s = 0u32;
        let sorted = !r.next_u64().is_multiple_of(4);
        (0..n)
            .map(|_| {
                if sorted {
                    s += r.next_u64().is_multiple_of(seg_step) as u32;
                    s
                } else {
                    (r.next_u64() % 4) as u32
                }
            })
            .collect()
    };
    let qseg = seg(dm.nq);
    let kseg = seg(dm.nk);
    Data { q, k, v, bias, bias_dims, qseg, kseg }
}

pub fn attention<'a, T: Float>(o: &Opts, dm: &Dims, data: &'a Data<T>) -> Attention<'a> {
    let mut a = Attention::new().layout(dm.layout);
    if let Some(s) = o.scale {
        a = a.scale(s);
    }
    a.mask(match o.mask {
        MaskKind::None => Mask::None,
        MaskKind::Causal => Mask::Causal,
        MaskKind::Window(left, right) => Mask::Window { left, right },
        MaskKind::Segments => Mask::Segments { q: &data.qseg, k: &data.kseg },
    })
    .bias(match o.bias {
        BiasKind::None => Bias::None,
        BiasKind::Key(_) => Bias::Key(View::new(&data.bias, &data.bias_dims).unwrap()),
        BiasKind::Full(..) => Bias::Full(View::new(&data.bias, &data.bias_dims).unwrap()),
    })
}

/// The oracle: the f64 reference on the inputs widened to f32 (exactly), rounded once to f32.
pub fn oracle<T: Float>(a: &Attention<'_>, dm: &Dims, data: &Data<T>) -> (Vec<f32>, Vec<f32>) {
    let wide = |x: &[T]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
    let (q, k, v) = (wide(&data.q), wide(&data.k), wide(&data.v));
    let mut out = vec![f32::NAN; dm.q().iter().product()];
    let mut lse = vec![f32::NAN; dm.lse().iter().product()];
    a.forward_lse(
        Backend::Reference,
        View::new(&q, &dm.q()).unwrap(),
        View::new(&k, &dm.kv()).unwrap(),
        View::new(&v, &dm.kv()).unwrap(),
        ViewMut::new(&mut out, &dm.q()).unwrap(),
        ViewMut::new(&mut lse, &dm.lse()).unwrap(),
    )
    .unwrap();
    (out, lse)
}

/// Whether query `i` sees key `j` (written from the contract once more).
pub fn visible(o: &Opts, dm: &Dims, data: &Data<impl Float>, i: usize, j: usize) -> bool {
    let diag = i as i64 + dm.nk as i64 - dm.nq as i64;
    let j64 = j as i64;
    match o.mask {
        MaskKind::None => true,
        MaskKind::Causal => j64 <= diag,
        MaskKind::Window(l, r) => diag - (l.min(1 << 40) as i64) <= j64 && j64 <= diag + r.min(1 << 40) as i64,
        MaskKind::Segments => data.kseg[j] <= data.qseg[i],
    }
}

/// The naive computation in the element type, as FlashAttention's `attention_ref` does it
/// without upcasting: `Q·scale` rounded to T, scores accumulated in f32 and rounded to T, bias
/// added and rounded, softmax in f32, probabilities rounded to T, `P·V` accumulated in f32 and
/// rounded to T. Also the log-sum-exp of the rounded scores, in f32.
pub fn naive<T: Float>(o: &Opts, dm: &Dims, data: &Data<T>) -> (Vec<f32>, Vec<f32>) {
    let rt = |x: f32| T::from_f32(x).to_f32();
    let scale = o.scale.unwrap_or((1.0 / (dm.d as f64).sqrt()) as f32);
    let mut out = vec![0.0f32; dm.q().iter().product()];
    let mut lse = vec![0.0f32; dm.lse().iter().product()];
    let group = dm.h / dm.hkv;
    let mut s = vec![0.0f32; dm.nk];
    for b in 0..dm.b {
        for h in 0..dm.h {
            for i in 0..dm.nq {
                let qi = dm.at(dm.h, dm.nq, b, h, i);
                let qs: Vec<f32> = data.q[qi..][..dm.d].iter().map(|x| rt(x.to_f32() * scale)).collect();
                for (j, sj) in s.iter_mut().enumerate() {
                    let kj = dm.at(dm.hkv, dm.nk, b, h / group, j);
                    let dot = qs.iter().zip(&data.k[kj..][..dm.d]).fold(0.0f32, |acc, (x, y)| acc + x * y.to_f32());
                    let mut v = rt(dot);
                    v = match o.bias {
                        BiasKind::None => v,
                        BiasKind::Key(one) => rt(v + data.bias[if one { 0 } else { b * dm.nk } + j]),
                        BiasKind::Full(b1, h1) => {
                            let bb = if b1 { 0 } else { b };
                            let hh = if h1 { 0 } else { h };
                            let heads = if h1 { 1 } else { dm.h };
                            rt(v + data.bias[((bb * heads + hh) * dm.nq + i) * dm.nk + j])
                        }
                    };
                    *sj = if visible(o, dm, data, i, j) { v } else { f32::NEG_INFINITY };
                }
                let m = s.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                let oi = dm.at(dm.h, dm.nq, b, h, i);
                let li = (b * dm.h + h) * dm.nq + i;
                if m == f32::NEG_INFINITY {
                    out[oi..][..dm.d].fill(0.0);
                    lse[li] = f32::NEG_INFINITY;
                    continue;
                }
                let e: Vec<f32> = s.iter().map(|&x| (x - m).exp()).collect();
                let sum: f32 = e.iter().sum();
                let mut acc = vec![0.0f32; dm.d];
                for (j, ej) in e.iter().enumerate() {
                    let p = rt(ej / sum);
                    let vj = dm.at(dm.hkv, dm.nk, b, h / group, j);
                    for (a, v) in acc.iter_mut().zip(&data.v[vj..][..dm.d]) {
                        *a += p * v.to_f32();
                    }
                }
                for (o, a) in out[oi..][..dm.d].iter_mut().zip(&acc) {
                    *o = rt(*a);
                }
                lse[li] = m + sum.ln();
            }
        }
    }
    (out, lse)
}

/// Largest |got − want| over finite pairs; a −∞ (fully masked) must match exactly and any NaN
/// or other mismatch of finiteness fails.
pub fn max_err(got: impl Iterator<Item = f32>, want: &[f32], what: &str) -> f64 {
    let mut worst = 0.0f64;
    for (n, (g, &w)) in got.zip(want).enumerate() {
        assert!(!g.is_nan(), "{what}[{n}] is NaN (want {w})");
        if w.is_infinite() || g.is_infinite() {
            assert_eq!(g, w, "{what}[{n}]");
            continue;
        }
        worst = worst.max((g as f64 - w as f64).abs());
    }
    worst
}

/// Error budget beyond twice the naive error, given `magnitude`, the size of the largest
/// score. f32: a few ulps of that score (scores carry rounding errors proportional to their
/// size, and on small problems the naive code's own error can be luckily small: two f32
/// implementations with different summation orders differ by that much). f16 / bf16 outputs
/// (|V| ≤ 1): half an ulp of 1, the rounding of the output itself, which on a handful of rows
/// the naive code may happen to avoid. The lse: FlashAttention's 1e−5, relative.
pub fn atol<T: Float>(magnitude: f32, lse: bool) -> f64 {
    let f32_term = 8.0 * f32::EPSILON as f64 * magnitude.max(1.0) as f64;
    match T::DTYPE {
        DType::F32 => f32_term,
        _ if lse => 1e-5 * magnitude.max(1.0) as f64,
        DType::BF16 => 2f64.powi(-9),
        _ => 2f64.powi(-12),
    }
}
