//! LFQ cases: the shapes of the LFQ / FSQ issue, with the criterion benches' ids, on the host
//! backends, plus one tiny `-ci` shape for fast tests. Also the host-case machinery the FSQ
//! cases share ([`Quant`], [`host_cases`], [`signed`]).
//!
//! | id shape | G × d | what |
//! |---|---|---|
//! | `1048576x18` | 1 × 18 | MAGVIT-v2's 2^18 codebook: f32 and bf16 encode, f32 decode |
//! | `1048576x32` | 4 × 8 | group-wise LFQ (WeTok / Open-MAGVIT2 style), f32 encode |
//! | `65536x18` | 1 × 18 | a cache-resident batch, f32 encode |
//! | `1031x18-ci` | 2 × 9 | tests only (`--filter 'lfq/*-ci'`): odd N, two groups |
//!
//! Encode is `lfq/<backend>/<dtype>/<N>x<C>` (dtype of `z`), decode `lfq/<backend>/u32-f32/…`
//! (ids in, codes out). Bytes: what one call must move, input read + output written
//! (`N·C·size(z) + N·G·4` for encode, `N·G·4 + N·C·4` for decode). Flops: one comparison per
//! value of `z` (encode) or code written (decode), so that the cases sit on the roofline plot;
//! the kernels are memory-bound either way. MSB-first for d = 18 (vector-quantize-pytorch),
//! LSB-first for the group-wise shape (Open-MAGVIT2, WeTok).
//!
//! Data: LFQ on non-negative data is trivial (every bit 1), so `z` is a deterministic hash
//! mapped to `[−2, 2)`, centred on 0, with exact `±0` mixed in ([`signed`]). Decode reads hashed
//! ids below `2^d`. Every backend must match the reference bit for bit (ids and codes).

use std::rc::Rc;

use vistok::{bf16, BitOrder, Float, Lfq, LfqConfig, View, ViewMut};

use super::{compare, Backend, Case, Check, Env, Peak, Runner, Shared};

pub fn cases(env: &Env) -> Result<Vec<Case>, String> {
    let msb18 = LfqConfig::new(1, 18, BitOrder::MsbFirst);
    let grouped = LfqConfig::new(4, 8, BitOrder::LsbFirst);
    let ci = LfqConfig::new(2, 9, BitOrder::LsbFirst);
    let mut out = vec![];
    out.extend(encode::<f32>(env, msb18, 1 << 20, "")?);
    out.extend(encode::<bf16>(env, msb18, 1 << 20, "")?);
    out.extend(encode::<f32>(env, grouped, 1 << 20, "")?);
    out.extend(encode::<f32>(env, msb18, 1 << 16, "")?);
    out.extend(decode(env, msb18, 1 << 20, "")?);
    out.extend(encode::<f32>(env, ci, 1031, "-ci")?);
    out.extend(decode(env, ci, 1031, "-ci")?);
    Ok(out)
}

fn plan(config: LfqConfig) -> Result<Lfq, String> {
    Lfq::new(&config).map_err(|e| format!("built-in lfq shape {config:?}: {e}"))
}

fn encode<T: Float>(env: &Env, config: LfqConfig, n: usize, suffix: &str) -> Result<Vec<Case>, String> {
    let plan = plan(config)?;
    let (c, g) = (plan.channels(), plan.groups());
    Ok(host_cases(
        env,
        Quant {
            family: "lfq",
            dtype: T::DTYPE.name().to_string(),
            shape: format!("{n}x{c}{suffix}"),
            in_len: n * c,
            out_len: n * g,
            flops: (n * c) as u64,
            plan,
            input: Box::new(move || signed::<T>(n * c, 2.0)),
            op: |p, b, z, ids| {
                let n = ids.len() / p.groups();
                p.encode(b, View::new(z, &p.codes_dims(n))?, ViewMut::new(ids, &p.ids_dims(n))?)
            },
            check: |_, _, got, want| Ok(compare_ids(got, want)),
            poison: u32::MAX,
        },
    ))
}

fn decode(env: &Env, config: LfqConfig, n: usize, suffix: &str) -> Result<Vec<Case>, String> {
    let plan = plan(config)?;
    let (c, g, max) = (plan.channels(), plan.groups(), (plan.codebook_size() - 1) as u32);
    Ok(host_cases(
        env,
        Quant {
            family: "lfq",
            dtype: "u32-f32".to_string(),
            shape: format!("{n}x{c}{suffix}"),
            in_len: n * g,
            out_len: n * c,
            flops: (n * c) as u64,
            plan,
            input: Box::new(move || (0..n * g).map(|i| hash(i) as u32 & max).collect()),
            op: |p, b, ids, codes| {
                let n = ids.len() / p.groups();
                p.decode(b, View::new(ids, &p.ids_dims(n))?, ViewMut::new(codes, &p.codes_dims(n))?)
            },
            check: |_, _, got, want| compare(got, want, 0.0),
            poison: f32::NAN,
        },
    ))
}

/// Bit-identical ids → [`Check::Exact`]; otherwise the largest difference of id values (any
/// difference fails: LFQ ids are exact by contract).
pub(super) fn compare_ids(got: &[u32], want: &[u32]) -> Check {
    let max_abs = got.iter().zip(want).map(|(&g, &w)| g.abs_diff(w)).max().unwrap_or(0);
    if max_abs == 0 && got.len() == want.len() {
        Check::Exact
    } else {
        Check::Differs { max_abs: if got.len() == want.len() { max_abs as f64 } else { f64::INFINITY }, tol: 0.0 }
    }
}

/// splitmix64 of the index: deterministic, the same on every machine.
pub(super) fn hash(i: usize) -> u64 {
    let mut z = (i as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` deterministic values uniform in `[−range, range)` (24-bit steps, centred on 0), with
/// one in 64 an exact `+0` or `−0` so the `z > 0` rule for zeros is exercised too.
pub(super) fn signed<T: Float>(n: usize, range: f32) -> Vec<T> {
    (0..n)
        .map(|i| {
            let h = hash(i);
            let v = match h & 63 {
                0 => 0.0,
                1 => -0.0,
                _ => ((h >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * range,
            };
            T::from_f32(v)
        })
        .collect()
}

/// A host kernel call: `plan` on `backend` from `input` to `output` (dims from the lengths).
pub(super) type HostOp<P, I, O> = fn(&P, vistok::Backend, &[I], &mut [O]) -> vistok::Result<()>;

/// Compares a backend's output with the reference's: `(plan, input, got, want)`.
pub(super) type CheckOp<P, I, O> = fn(&P, &[I], &[O], &[O]) -> Result<Check, String>;

/// One (plan, direction, dtype, shape) of a quantizer family: everything its cases need.
pub(super) struct Quant<P, I, O> {
    pub family: &'static str,
    pub dtype: String,
    pub shape: String,
    /// Elements read and written by one call.
    pub in_len: usize,
    pub out_len: usize,
    pub flops: u64,
    pub plan: P,
    /// Makes the input (deferred: only when a case of this shape passes the filter).
    pub input: Box<dyn Fn() -> Vec<I>>,
    pub op: HostOp<P, I, O>,
    pub check: CheckOp<P, I, O>,
    /// The value outputs start as, so that an element a kernel forgets to write shows up.
    pub poison: O,
}

/// What the backends of one [`Quant`] share: the plan, the input and the reference output
/// (each made at most once).
struct Flow<P, I, O> {
    plan: Rc<P>,
    input: Rc<Shared<Vec<I>>>,
    oracle: Rc<Shared<Vec<O>>>,
    out_len: usize,
    op: HostOp<P, I, O>,
    check: CheckOp<P, I, O>,
    poison: O,
}

impl<P, I, O: Copy> Flow<P, I, O> {
    fn share(&self) -> Self {
        Flow {
            plan: self.plan.clone(),
            input: self.input.clone(),
            oracle: self.oracle.clone(),
            out_len: self.out_len,
            op: self.op,
            check: self.check,
            poison: self.poison,
        }
    }
}

/// The reference and cpu cases of `q`.
pub(super) fn host_cases<P: 'static, I: 'static, O: Copy + 'static>(env: &Env, q: Quant<P, I, O>) -> Vec<Case> {
    let Quant { family, dtype, shape, in_len, out_len, flops, plan, input, op, check, poison } = q;
    let plan = Rc::new(plan);
    let input = Shared::new(move || Ok(input()));
    let oracle = {
        let (plan, input) = (plan.clone(), input.clone());
        Shared::new(move || {
            let mut y = vec![poison; out_len];
            op(&plan, vistok::Backend::Reference, input.get()?, &mut y).map_err(|e| e.to_string())?;
            Ok(y)
        })
    };
    let flow = Flow { plan, input, oracle, out_len, op, check, poison };
    let mut cases = vec![];
    for (backend, on) in [(Backend::Reference, vistok::Backend::Reference), (Backend::Cpu, vistok::Backend::Cpu)] {
        let flow = flow.share();
        cases.push(Case {
            family,
            backend,
            dtype: dtype.clone(),
            shape: shape.clone(),
            bytes: (in_len * size_of::<I>() + out_len * size_of::<O>()) as u64,
            flops,
            peak: Peak::F32,
            setup: Box::new(move || {
                let out = vec![flow.poison; flow.out_len];
                Ok(Box::new(HostRunner { flow: flow.share(), backend: on, out }) as Box<dyn Runner>)
            }),
        });
    }
    // The cuda rows go here (with `env.gpu`, as in cases/patchify.rs) once the LFQ / FSQ
    // kernels land.
    let _ = env;
    cases
}

struct HostRunner<P, I, O> {
    flow: Flow<P, I, O>,
    backend: vistok::Backend,
    out: Vec<O>,
}

impl<P, I, O: Copy> Runner for HostRunner<P, I, O> {
    fn run(&mut self, n: u32) -> Result<(), String> {
        let input = self.flow.input.get()?;
        for _ in 0..n {
            (self.flow.op)(&self.flow.plan, self.backend, std::hint::black_box(input), &mut self.out)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn check(self: Box<Self>) -> Result<Check, String> {
        if self.backend == vistok::Backend::Reference {
            self.flow.oracle.offer(self.out);
            return Ok(Check::Oracle);
        }
        (self.flow.check)(&self.flow.plan, self.flow.input.get()?, &self.out, self.flow.oracle.get()?)
    }
}
