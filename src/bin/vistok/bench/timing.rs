//! Wall-clock timing of one case: warm-up, then repeated samples; median, min and max per call.
//!
//! A sample is `calls` back-to-back runs timed together, with `calls` chosen so that a sample
//! lasts at least [`Budget::min_sample`] (a fast kernel is otherwise below the clock's
//! resolution, a device kernel below its launch overhead). The number of samples fills the
//! time budget, within [min, max]: a slow kernel (the scalar reference) gets few samples, a
//! fast one many.

use std::time::{Duration, Instant};

/// How long to spend on one case.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub warmup: Duration,
    pub measure: Duration,
    pub min_sample: Duration,
    pub min_samples: usize,
    pub max_samples: usize,
}

impl Budget {
    pub fn new(quick: bool) -> Budget {
        if quick {
            Budget {
                warmup: Duration::from_millis(100),
                measure: Duration::from_millis(500),
                min_sample: Duration::from_millis(2),
                min_samples: 5,
                max_samples: 30,
            }
        } else {
            Budget {
                warmup: Duration::from_millis(300),
                measure: Duration::from_secs(2),
                min_sample: Duration::from_millis(5),
                min_samples: 5,
                max_samples: 50,
            }
        }
    }
}

/// Seconds per call over the samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: usize,
    pub calls_per_sample: u32,
}

/// Times `run(n)` (which runs the kernel `n` times) under `budget`.
pub fn measure(budget: &Budget, mut run: impl FnMut(u32) -> Result<(), String>) -> Result<Stats, String> {
    // Warm-up: caches, page faults of the output, the thread pool, a device's JIT. At least one
    // call; the last one estimates the cost of a call.
    let start = Instant::now();
    let mut per_call;
    loop {
        let t = Instant::now();
        run(1)?;
        per_call = t.elapsed().as_secs_f64();
        if start.elapsed() >= budget.warmup {
            break;
        }
    }
    let per_call = per_call.max(1e-9);
    let calls = (budget.min_sample.as_secs_f64() / per_call).ceil().clamp(1.0, 1e6) as u32;
    let sample = per_call * f64::from(calls);
    let samples =
        ((budget.measure.as_secs_f64() / sample) as usize).clamp(budget.min_samples, budget.max_samples.max(1));
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        run(calls)?;
        times.push(t.elapsed().as_secs_f64() / f64::from(calls));
    }
    Ok(summarise(&mut times, calls))
}

fn summarise(times: &mut [f64], calls: u32) -> Stats {
    times.sort_by(f64::total_cmp);
    let n = times.len();
    let median = if n % 2 == 1 { times[n / 2] } else { 0.5 * (times[n / 2 - 1] + times[n / 2]) };
    Stats { median, min: times[0], max: times[n - 1], samples: n, calls_per_sample: calls }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_and_odd_counts() {
        let s = summarise(&mut [3.0, 1.0, 2.0], 1);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = summarise(&mut [4.0, 1.0, 2.0, 3.0], 1);
        assert_eq!(s.median, 2.5);
    }

    #[test]
    fn a_fast_call_is_batched_and_sampled_at_least_min_samples() {
        let b = Budget::new(true);
        let mut calls = 0u64;
        let s = measure(&b, |n| {
            calls += u64::from(n);
            Ok(())
        })
        .unwrap();
        assert!(s.calls_per_sample > 1 && s.samples >= b.min_samples && calls > 0);
    }
}
