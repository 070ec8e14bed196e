//! Shared helpers for the integration tests: deterministic non-trivial data and bitwise compare.
#![allow(dead_code)]

use vistok::{DType, Element};

/// splitmix64: a tiny deterministic generator, so failures reproduce from the seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
}

/// Random pixels of type `T`: full u8 range; floats spread over [-300, 300] with a few exact
/// zeros, negative zeros and tiny values mixed in (never all zeros).
pub fn random_data<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let mut r = Rng(seed);
    (0..n)
        .map(|_| match T::DTYPE {
            DType::U8 => T::from_f32((r.next_u64() % 256) as f32),
            _ => {
                let v = match r.next_u64() % 16 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => r.uniform(-1e-3, 1e-3),
                    _ => r.uniform(-300.0, 300.0),
                };
                T::from_f32(v)
            }
        })
        .collect()
}

/// The bit pattern of an element, for exact comparison (NaN payloads included).
pub fn bits<T: Element>(x: T) -> u32 {
    let b: &[u8] = bytemuck::bytes_of(&x);
    b.iter().rev().fold(0u32, |acc, &v| (acc << 8) | v as u32)
}

/// A poison value: for floats a NaN with a payload no kernel produces; for u8 a value we
/// check separately.
pub fn poison<T: Element>() -> T {
    match T::DTYPE {
        DType::U8 => T::from_f32(77.0),
        DType::F32 => bytemuck::cast_slice::<u32, T>(&[0x7fc0_1234])[0],
        _ => bytemuck::cast_slice::<u16, T>(&[0x7fd3])[0],
    }
}

/// Asserts `got == want` bit for bit, reporting the first mismatch.
pub fn assert_bits_eq<T: Element>(got: &[T], want: &[T], ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| bits(got[i]) != bits(want[i])) {
        let n = got.iter().zip(want).filter(|(g, w)| bits(**g) != bits(**w)).count();
        panic!("{ctx}: {n} mismatches, first at {i}: got {:?} want {:?}", got[i], want[i]);
    }
}

/// Says a test was skipped where a person sees it: straight to the process's stderr, which
/// the test harness does not capture (it captures only the print macros).
pub fn say_skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

/// Whether `VISTOK_REQUIRE_GPU=1`: then a missing GPU fails the tests instead of skipping them.
pub fn require_gpu() -> bool {
    std::env::var("VISTOK_REQUIRE_GPU").as_deref() == Ok("1")
}

/// Whether the "GPU" is tools/simcuda (`VISTOK_SIMCUDA=1`, set by scripts/sim-gpu-check.sh):
/// every launch then runs on the PTX interpreter, thousands of times slower than a device, so
/// the suites shrink their largest cases (never their checks) to fit.
#[allow(dead_code)] // not every suite has cases to shrink
pub fn simulated() -> bool {
    std::env::var("VISTOK_SIMCUDA").as_deref() == Ok("1")
}

/// `n` on a GPU, at most `sim` on tools/simcuda (see [`simulated`]).
#[allow(dead_code)]
pub fn sim_cap(n: usize, sim: usize) -> usize {
    if simulated() {
        n.min(sim)
    } else {
        n
    }
}

/// The body of each GPU suite's `skipped_without_cuda_feature` test.
pub fn skip_without_cuda_feature() {
    assert!(!require_gpu(), "VISTOK_REQUIRE_GPU=1 but this test binary was built without the cuda feature");
    say_skipped("built without the cuda feature");
}

#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod judge;
pub mod plans;
pub mod ptx;
