//! Attention cases: the shapes of the attention issue (`B×H×N×D`, self-attention, `Nq = Nk`),
//! f32 and bf16 on the cpu backend, the f64 reference on the small shapes only (it is naive),
//! plus one tiny `-ci` shape for fast tests.
//!
//! Flops: `4·B·H·Nq·Nk·D` (two matrix products), halved for causal masks, as FlashAttention
//! counts them; the softmax is not counted. Bytes: Q, K, V read once, O written once.
//!
//! The check compares the output of batch 0, head 0 with the reference computed on that head
//! alone (f64, from the inputs widened to f32): the whole problem would take the naive
//! reference minutes on the big shapes.

use std::rc::Rc;

use vistok::attention::{Attention, Mask};
use vistok::{bf16, DType, Float, View, ViewMut};

use super::{compare, Backend, Case, Check, Env, Peak, Runner, Shared};

/// One shape of the suite.
#[derive(Clone, Copy)]
struct Spec {
    b: usize,
    h: usize,
    n: usize,
    d: usize,
    causal: bool,
    ci: bool,
    /// Whether the reference gets a row.
    reference: bool,
}

impl Spec {
    fn name(&self) -> String {
        let mask = if self.causal { "-causal" } else { "" };
        let ci = if self.ci { "-ci" } else { "" };
        format!("{}x{}x{}x{}{mask}{ci}", self.b, self.h, self.n, self.d)
    }

    fn dims(&self) -> [usize; 4] {
        [self.b, self.h, self.n, self.d]
    }

    fn len(&self) -> usize {
        self.b * self.h * self.n * self.d
    }

    fn attention(&self) -> Attention<'static> {
        Attention::new().mask(if self.causal { Mask::Causal } else { Mask::None })
    }
}

pub fn cases(env: &Env) -> Result<Vec<Case>, String> {
    let _ = env;
    let s = |b, h, n, d, causal, reference| Spec { b, h, n, d, causal, ci: false, reference };
    let specs = [
        s(1, 12, 256, 64, false, true),
        s(1, 12, 1024, 64, false, false),
        s(1, 12, 4096, 64, false, false),
        s(1, 16, 1024, 128, false, false),
        s(1, 12, 1024, 64, true, false),
        // Not part of the suite: small enough for the test suite (`--filter '*-ci'`).
        Spec { b: 1, h: 2, n: 64, d: 32, causal: true, ci: true, reference: true },
    ];
    let mut out = vec![];
    for spec in specs {
        out.extend(shape::<f32>(spec));
        out.extend(shape::<bf16>(spec));
    }
    Ok(out)
}

/// Deterministic values in [−1, 1] (the shared `data` spans 0..250, which would make every
/// softmax one-hot).
fn values<T: Float>(n: usize, salt: usize) -> Vec<T> {
    (0..n)
        .map(|i| T::from_f32(((i.wrapping_add(salt).wrapping_mul(2_654_435_761) % 251) as f32) / 125.0 - 1.0))
        .collect()
}

/// Q, K, V of one shape and dtype.
struct Inputs<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
}

/// What the backends of one (shape, dtype) share.
struct Flow<T> {
    spec: Spec,
    input: Rc<Shared<Inputs<T>>>,
    /// Batch 0, head 0 of the output, from the reference on that head alone.
    oracle: Rc<Shared<Vec<f32>>>,
}

fn shape<T: Float>(spec: Spec) -> Vec<Case> {
    let input = Shared::new(move || {
        let n = spec.len();
        Ok(Inputs { q: values::<T>(n, 1), k: values::<T>(n, 2), v: values::<T>(n, 3) })
    });
    let oracle = {
        let input = input.clone();
        Shared::new(move || {
            let x = input.get()?;
            let head = spec.n * spec.d;
            let wide = |t: &[T]| t[..head].iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
            let (q, k, v) = (wide(&x.q), wide(&x.k), wide(&x.v));
            let dims = [1, 1, spec.n, spec.d];
            let mut o = vec![f32::NAN; head];
            let e = |e: vistok::Error| e.to_string();
            spec.attention()
                .forward(
                    vistok::Backend::Reference,
                    View::new(&q, &dims).map_err(e)?,
                    View::new(&k, &dims).map_err(e)?,
                    View::new(&v, &dims).map_err(e)?,
                    ViewMut::new(&mut o, &dims).map_err(e)?,
                )
                .map_err(e)?;
            Ok(o)
        })
    };
    let flops = 4 * (spec.b * spec.h * spec.n * spec.n * spec.d) as u64 / if spec.causal { 2 } else { 1 };
    let case = |backend: Backend, on: vistok::Backend| {
        let flow = Rc::new(Flow { spec, input: input.clone(), oracle: oracle.clone() });
        Case {
            family: "attention",
            backend,
            dtype: T::DTYPE.name().to_string(),
            shape: spec.name(),
            bytes: (4 * spec.len() * size_of::<T>()) as u64,
            flops,
            // bf16 runs on the bf16 dot-product instructions where the CPU has them (the
            // roofline falls back to the f32 FMA peak where it has not).
            peak: if T::DTYPE == DType::BF16 && backend == Backend::Cpu { Peak::Bf16 } else { Peak::F32 },
            setup: Box::new(move || {
                Ok(Box::new(HostRunner {
                    flow: flow.clone(),
                    backend: on,
                    out: vec![T::from_f32(f32::NAN); spec.len()],
                }) as Box<dyn Runner>)
            }),
        }
    };
    let mut cases = vec![];
    // The reference in f32 only: it computes in f64 whatever the input type.
    if spec.reference && T::DTYPE == DType::F32 {
        cases.push(case(Backend::Reference, vistok::Backend::Reference));
    }
    cases.push(case(Backend::Cpu, vistok::Backend::Cpu));
    cases
}

struct HostRunner<T> {
    flow: Rc<Flow<T>>,
    backend: vistok::Backend,
    out: Vec<T>,
}

impl<T: Float> Runner for HostRunner<T> {
    fn run(&mut self, n: u32) -> Result<(), String> {
        let x = self.flow.input.get()?;
        let spec = self.flow.spec;
        let dims = spec.dims();
        let e = |e: vistok::Error| e.to_string();
        let a = spec.attention();
        for _ in 0..n {
            a.forward(
                self.backend,
                View::new(std::hint::black_box(&x.q), &dims).map_err(e)?,
                View::new(&x.k, &dims).map_err(e)?,
                View::new(&x.v, &dims).map_err(e)?,
                ViewMut::new(&mut self.out, &dims).map_err(e)?,
            )
            .map_err(e)?;
        }
        Ok(())
    }

    fn check(self: Box<Self>) -> Result<Check, String> {
        if self.backend == vistok::Backend::Reference {
            return Ok(Check::Oracle);
        }
        let head = self.flow.spec.n * self.flow.spec.d;
        let got: Vec<f32> = self.out[..head].iter().map(|v| v.to_f32()).collect();
        // |O| ≤ 1; f32 within a few ulps of accumulated error, bf16 within its rounding of
        // inputs, probabilities and outputs.
        let tol = if T::DTYPE == DType::F32 { 1e-5 } else { 2e-2 };
        compare(&got, self.flow.oracle.get()?, tol)
    }
}
