//! Thread safety: every prepared object is `Send + Sync` (checked at compile time), and one
//! prepared object shared by many threads gives, in every thread, the bits a single-threaded
//! call gives — from 8 OS threads at once, from 8 OS threads while rayon's global pool is kept
//! busy by other work, and from inside rayon tasks (the cpu kernels use rayon themselves: none
//! of this may deadlock or mix up results). With the `cuda` feature: one context per device,
//! every device used at once from its own thread, and one device shared by several threads,
//! each against the cpu backend.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{bits, random_data, Rng};
use rayon::prelude::*;
use vistok::argmin::{Codebook, Metric, ResidualCodebooks};
use vistok::attention::{Attention, Bias, Mask, QkvLayout};
use vistok::merge::{MatchConfig, MergeMode, MergePlan, Selection, SourceMap};
use vistok::{
    bf16, f16, Backend, BitOrder, Element, Error, Fsq, FsqDim, FsqStats, Isa, Layout, Lfq, LfqConfig, LfqEntropy,
    LfqStats, Normalize, PatchConfig, Patchify, View, ViewMut,
};

// ---------------------------------------------------------------- Send + Sync, at compile time

const fn send_sync<T: Send + Sync>() {}

const _: () = {
    send_sync::<Patchify>();
    send_sync::<PatchConfig>();
    send_sync::<Normalize>();
    send_sync::<Lfq>();
    send_sync::<LfqConfig>();
    send_sync::<LfqStats>();
    send_sync::<LfqEntropy>();
    send_sync::<Fsq>();
    send_sync::<FsqDim>();
    send_sync::<FsqStats>();
    send_sync::<Codebook<f32>>();
    send_sync::<Codebook<f16>>();
    send_sync::<Codebook<bf16>>();
    send_sync::<ResidualCodebooks<f32>>();
    send_sync::<ResidualCodebooks<f16>>();
    send_sync::<ResidualCodebooks<bf16>>();
    send_sync::<Attention<'static>>();
    send_sync::<Mask<'static>>();
    send_sync::<Bias<'static>>();
    send_sync::<MatchConfig>();
    send_sync::<MergePlan>();
    send_sync::<SourceMap>();
    send_sync::<Selection>();
    send_sync::<View<'static, f32>>();
    send_sync::<ViewMut<'static, bf16>>();
    send_sync::<Backend>();
    send_sync::<Isa>();
    send_sync::<Error>();
};

#[cfg(feature = "cuda")]
const _: () = {
    use vistok::cuda::*;
    send_sync::<Gpu>();
    send_sync::<Function>();
    send_sync::<PatchifyKernel>();
    send_sync::<LfqKernel>();
    send_sync::<FsqKernel>();
    send_sync::<DeferredCheck>();
    send_sync::<CodebookGpu<f32>>();
    send_sync::<CodebookGpu<f16>>();
    send_sync::<CodebookGpu<bf16>>();
    send_sync::<AttentionKernel>();
    send_sync::<MergeKernel>();
    send_sync::<DevicePlan>();
};

// ---------------------------------------------------------------- the harness

const THREADS: usize = 8;
/// Calls per thread: several, so that calls overlap in time.
const ROUNDS: usize = 3;

/// Runs `body` while a background thread keeps rayon's global pool full of short busy tasks.
fn with_busy_pool<R>(body: impl FnOnce() -> R) -> R {
    let stop = AtomicBool::new(false);
    let batches = AtomicUsize::new(0);
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                (0..64).into_par_iter().for_each(|i| {
                    let t = Instant::now();
                    let mut x = i as u64;
                    while t.elapsed() < Duration::from_micros(200) {
                        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                });
                batches.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Let the pool fill up first.
        while batches.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        let r = body();
        stop.store(true, Ordering::Relaxed);
        r
    });
    assert!(batches.load(Ordering::Relaxed) > 0, "the busy work never ran");
    r
}

/// Calls `f` on each of `THREADS` inputs single-threaded (one caller, inside a one-thread
/// rayon pool: the expected bits), then again one call at a time on the global pool, from
/// `THREADS` OS threads at once (plain, and with rayon's global pool busy) and from inside rayon
/// tasks, asserting every call gives the expected bits.
fn check<I: Sync>(family: &str, inputs: &[I], f: impl Fn(&I) -> Vec<u32> + Sync) {
    assert_eq!(inputs.len(), THREADS);
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let want: Vec<Vec<u32>> = one.install(|| inputs.iter().map(&f).collect());
    // Different inputs give different outputs (else a mix-up between threads could go unseen).
    assert!(want.windows(2).any(|w| w[0] != w[1]), "{family}: every input gave the same output");
    assert!(want.iter().all(|w| !w.is_empty() && w.iter().any(|&x| x != 0)), "{family}: an empty or zero output");
    let compare = |how: &str, t: usize, got: &[u32]| {
        if got != want[t] {
            let i = got.iter().zip(&want[t]).position(|(g, w)| g != w).unwrap_or(got.len().min(want[t].len()));
            panic!("{family} ({how}), thread {t}: output differs from the single-threaded call at element {i}");
        }
    };
    let os_threads = |how: &str| {
        std::thread::scope(|s| {
            for (t, input) in inputs.iter().enumerate() {
                let (f, compare) = (&f, &compare);
                s.spawn(move || {
                    for _ in 0..ROUNDS {
                        compare(how, t, &f(input));
                    }
                });
            }
        })
    };
    inputs.iter().enumerate().for_each(|(t, input)| compare("one caller, global pool", t, &f(input)));
    os_threads("8 OS threads");
    with_busy_pool(|| os_threads("8 OS threads, rayon pool busy"));
    (0..THREADS * ROUNDS)
        .into_par_iter()
        .for_each(|i| compare("inside rayon tasks", i % THREADS, &f(&inputs[i % THREADS])));
}

fn to_bits<T: Element>(v: &[T]) -> impl Iterator<Item = u32> + '_ {
    v.iter().map(|&x| bits(x))
}

/// Uniform values in [lo, hi), `n` of them.
fn uniform(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed);
    (0..n).map(|_| r.uniform(lo, hi)).collect()
}

// ---------------------------------------------------------------- the families

#[test]
fn patchify_shared_plan() {
    let dims = [2, 3, 32, 48];
    let config = PatchConfig::image(Layout::ChannelsFirst, 8, 8).normalize(Normalize::imagenet_u8());
    let plan = Patchify::new(&config, &dims).unwrap();
    let td = plan.tokens_dims();
    let inputs: Vec<Vec<u8>> = (0..THREADS).map(|t| random_data(dims.iter().product(), 100 + t as u64)).collect();
    check("patchify", &inputs, |image| {
        let mut tokens = vec![0.0f32; td.iter().product()];
        let mut back = vec![0u8; image.len()];
        plan.forward(Backend::Cpu, View::new(image, &dims).unwrap(), ViewMut::new(&mut tokens, &td).unwrap()).unwrap();
        plan.inverse(Backend::Cpu, View::new(&tokens, &td).unwrap(), ViewMut::new(&mut back, &dims).unwrap()).unwrap();
        assert_eq!(&back, image, "unpatchify(patchify(x)) != x");
        to_bits(&tokens).chain(back.iter().map(|&b| b as u32)).collect()
    });
}

#[test]
fn lfq_shared_plan() {
    let lfq = Lfq::new(&LfqConfig::new(4, 9, BitOrder::LsbFirst).scale(0.5)).unwrap();
    let n = 301;
    let inputs: Vec<Vec<bf16>> = (0..THREADS).map(|t| random_data(n * lfq.channels(), 200 + t as u64)).collect();
    check("lfq", &inputs, |z| {
        let mut ids = vec![0u32; n * lfq.groups()];
        let mut codes = vec![f16::ZERO; n * lfq.channels()];
        lfq.encode(
            Backend::Cpu,
            View::new(z, &lfq.codes_dims(n)).unwrap(),
            ViewMut::new(&mut ids, &lfq.ids_dims(n)).unwrap(),
        )
        .unwrap();
        lfq.decode(
            Backend::Cpu,
            View::new(&ids, &lfq.ids_dims(n)).unwrap(),
            ViewMut::new(&mut codes, &lfq.codes_dims(n)).unwrap(),
        )
        .unwrap();
        ids.into_iter().chain(to_bits(&codes)).collect()
    });
}

#[test]
fn fsq_shared_plan() {
    let fsq = Fsq::new(&[8, 5, 5, 5]).unwrap();
    let n = 517;
    let inputs: Vec<Vec<f32>> = (0..THREADS).map(|t| uniform(n * 4, -3.0, 3.0, 300 + t as u64)).collect();
    check("fsq", &inputs, |z| {
        let mut ids = vec![0u32; n];
        let mut codes = vec![0.0f32; n * 4];
        fsq.encode(Backend::Cpu, View::new(z, &[n, 4]).unwrap(), ViewMut::new(&mut ids, &[n]).unwrap()).unwrap();
        fsq.decode(Backend::Cpu, View::new(&ids, &[n]).unwrap(), ViewMut::new(&mut codes, &[n, 4]).unwrap()).unwrap();
        ids.into_iter().chain(to_bits(&codes)).collect()
    });
}

/// argmin (with distances) and lookup through one shared codebook of element type `T`.
fn argmin_shared<T: vistok::Float>(metric: Metric, seed: u64) {
    let (k, d, n) = (300, 40, 97);
    let entries: Vec<T> = uniform(k * d, -1.0, 1.0, seed).into_iter().map(T::from_f32).collect();
    let cb = Codebook::new(View::new(&entries, &[k, d]).unwrap(), metric).unwrap();
    let inputs: Vec<Vec<T>> = (0..THREADS)
        .map(|t| uniform(n * d, -1.0, 1.0, seed + 1 + t as u64).into_iter().map(T::from_f32).collect())
        .collect();
    check(&format!("argmin {metric:?} {}", T::DTYPE.name()), &inputs, |x| {
        let (mut idx, mut dist) = (vec![0u32; n], vec![0.0f32; n]);
        let mut rows = vec![0.0f32; n * d];
        let xv = View::new(x, &[n, d]).unwrap();
        cb.argmin(
            Backend::Cpu,
            xv,
            ViewMut::new(&mut idx, &[n]).unwrap(),
            Some(ViewMut::new(&mut dist, &[n]).unwrap()),
        )
        .unwrap();
        cb.lookup(Backend::Cpu, View::new(&idx, &[n]).unwrap(), ViewMut::new(&mut rows, &[n, d]).unwrap()).unwrap();
        idx.iter().copied().chain(to_bits(&dist)).chain(to_bits(&rows)).collect()
    });
}

#[test]
fn argmin_shared_codebook_f32() {
    argmin_shared::<f32>(Metric::L2, 400);
    argmin_shared::<f32>(Metric::Cosine, 410);
}

#[test]
fn argmin_shared_codebook_bf16() {
    argmin_shared::<bf16>(Metric::L2, 420);
}

#[test]
fn residual_shared_codebooks() {
    let (k, d, n) = (64, 16, 50);
    let stages = (0..3)
        .map(|s| {
            let e = uniform(k * d, -1.0 / (s + 1) as f32, 1.0 / (s + 1) as f32, 450 + s as u64);
            Codebook::new(View::new(&e, &[k, d]).unwrap(), Metric::L2).unwrap()
        })
        .collect();
    let rq = ResidualCodebooks::new(stages).unwrap();
    let inputs: Vec<Vec<f32>> = (0..THREADS).map(|t| uniform(n * d, -1.5, 1.5, 460 + t as u64)).collect();
    check("residual quantize", &inputs, |x| {
        let mut ids = vec![0u32; n * 3];
        let mut q = vec![0.0f32; n * d];
        rq.quantize(
            Backend::Cpu,
            View::new(x, &[n, d]).unwrap(),
            ViewMut::new(&mut ids, &[n, 3]).unwrap(),
            None::<ViewMut<'_, f32>>,
        )
        .unwrap();
        rq.decode(Backend::Cpu, View::new(&ids, &[n, 3]).unwrap(), ViewMut::new(&mut q, &[n, d]).unwrap()).unwrap();
        ids.into_iter().chain(to_bits(&q)).collect()
    });
}

#[test]
fn attention_shared_options() {
    // [B, N, H, D] with grouped-query heads, a causal mask and a key bias, in f32 and bf16.
    let (b, n, h, hkv, d) = (2, 37, 4, 2, 32);
    let kb = uniform(b * n, -1.0, 0.0, 500);
    let attention =
        Attention::new().layout(QkvLayout::Bnhd).mask(Mask::Causal).bias(Bias::Key(View::new(&kb, &[b, n]).unwrap()));
    let (qd, kd) = ([b, n, h, d], [b, n, hkv, d]);
    let inputs: Vec<[Vec<f32>; 3]> = (0..THREADS)
        .map(|t| {
            let s = 510 + 3 * t as u64;
            [
                uniform(b * n * h * d, -2.0, 2.0, s),
                uniform(b * n * hkv * d, -2.0, 2.0, s + 1),
                uniform(b * n * hkv * d, -2.0, 2.0, s + 2),
            ]
        })
        .collect();
    check("attention", &inputs, |[q, k, v]| {
        let mut o = vec![0.0f32; q.len()];
        let mut lse = vec![0.0f32; b * h * n];
        attention
            .forward_lse(
                Backend::Cpu,
                View::new(q, &qd).unwrap(),
                View::new(k, &kd).unwrap(),
                View::new(v, &kd).unwrap(),
                ViewMut::new(&mut o, &qd).unwrap(),
                ViewMut::new(&mut lse, &[b, h, n]).unwrap(),
            )
            .unwrap();
        let to16 = |x: &[f32]| x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
        let (q16, k16, v16) = (to16(q), to16(k), to16(v));
        let mut o16 = vec![bf16::ZERO; q.len()];
        attention
            .forward(
                Backend::Cpu,
                View::new(&q16, &qd).unwrap(),
                View::new(&k16, &kd).unwrap(),
                View::new(&v16, &kd).unwrap(),
                ViewMut::new(&mut o16, &qd).unwrap(),
            )
            .unwrap();
        to_bits(&o).chain(to_bits(&lse)).chain(to_bits(&o16)).collect()
    });
}

#[test]
fn merge_plan_merge_unmerge() {
    // Each thread computes its own plan (the matcher), applies it, and unmerges; a plan built
    // once is also shared by every thread.
    let (b, n, cm, c) = (2, 50, 24, 12);
    let shared_metric = uniform(b * n * cm, -1.0, 1.0, 600);
    let shared =
        MergePlan::bipartite(Backend::Cpu, View::new(&shared_metric, &[b, n, cm]).unwrap(), &MatchConfig::new(13))
            .unwrap();
    let inputs: Vec<[Vec<f32>; 2]> = (0..THREADS)
        .map(|t| [uniform(b * n * cm, -1.0, 1.0, 610 + t as u64), uniform(b * n * c, -5.0, 5.0, 620 + t as u64)])
        .collect();
    check("merge", &inputs, |[metric, x]| {
        let plan =
            MergePlan::bipartite(Backend::Cpu, View::new(metric, &[b, n, cm]).unwrap(), &MatchConfig::new(13)).unwrap();
        let o = plan.out_tokens();
        let mut out: Vec<u32> = plan.slots().to_vec();
        for p in [&plan, &shared] {
            let (mut y, mut sizes) = (vec![0.0f32; b * o * c], vec![0.0f32; b * o]);
            let mut back = vec![0.0f32; b * n * c];
            p.merge(
                Backend::Cpu,
                View::new(x, &[b, n, c]).unwrap(),
                MergeMode::Mean,
                ViewMut::new(&mut y, &[b, o, c]).unwrap(),
            )
            .unwrap();
            out.extend(to_bits(&y));
            p.merge_weighted(
                Backend::Cpu,
                View::new(x, &[b, n, c]).unwrap(),
                None,
                ViewMut::new(&mut y, &[b, o, c]).unwrap(),
                ViewMut::new(&mut sizes, &[b, o]).unwrap(),
            )
            .unwrap();
            p.unmerge(Backend::Cpu, View::new(&y, &[b, o, c]).unwrap(), ViewMut::new(&mut back, &[b, n, c]).unwrap())
                .unwrap();
            out.extend(to_bits(&y).chain(to_bits(&sizes)).chain(to_bits(&back)));
        }
        // Pruning: DivPrune on the metric, EViT top-k on a score.
        let sel = Selection::div_prune(Backend::Cpu, View::new(metric, &[b, n, cm]).unwrap(), 9, true).unwrap();
        let score: Vec<f32> = x.iter().step_by(c).copied().collect();
        let top = Selection::top_k(Backend::Cpu, View::new(&score, &[b, n]).unwrap(), 7, false).unwrap();
        for s in [&sel, &top] {
            (0..b).for_each(|bi| out.extend_from_slice(s.kept(bi)));
        }
        out
    });
}

// ---------------------------------------------------------------- CUDA: one context per device

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_devices_at_once() {
    common::skip_without_cuda_feature();
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_devices_at_once() {
    use common::{require_gpu, say_skipped};
    use vistok::cuda::{device_count, FsqKernel, Gpu, LfqKernel};

    let count = match device_count() {
        Ok(n) if n > 0 => n,
        Ok(_) => {
            assert!(!require_gpu(), "VISTOK_REQUIRE_GPU=1 but the driver reports no CUDA device");
            return say_skipped("no CUDA device");
        }
        Err(e) => {
            assert!(!require_gpu(), "VISTOK_REQUIRE_GPU=1 but no CUDA driver: {e}");
            return say_skipped(&e.to_string());
        }
    };
    let lfq = Lfq::new(&LfqConfig::new(3, 11, BitOrder::MsbFirst)).unwrap();
    let fsq = Fsq::new(&[8, 8, 8, 5, 5, 5]).unwrap();
    let n = common::sim_cap(4099, 259);
    // The cpu backend's answer for input `t`.
    let input = |t: usize| -> (Vec<bf16>, Vec<f32>) {
        (random_data(n * lfq.channels(), 700 + t as u64), uniform(n * fsq.dim(), -4.0, 4.0, 800 + t as u64))
    };
    let cpu = |z: &[bf16], y: &[f32]| -> (Vec<u32>, Vec<u32>) {
        let mut ids = vec![0u32; n * lfq.groups()];
        lfq.encode(
            Backend::Cpu,
            View::new(z, &lfq.codes_dims(n)).unwrap(),
            ViewMut::new(&mut ids, &lfq.ids_dims(n)).unwrap(),
        )
        .unwrap();
        let mut fids = vec![0u32; n];
        fsq.encode(Backend::Cpu, View::new(y, &[n, fsq.dim()]).unwrap(), ViewMut::new(&mut fids, &[n]).unwrap())
            .unwrap();
        (ids, fids)
    };
    let on_gpu = |gpu: &Gpu, t: usize| {
        let (z, y) = input(t);
        let lk = LfqKernel::new(gpu, &lfq).unwrap();
        let fk = FsqKernel::new(gpu, &fsq).unwrap();
        let got = (lk.encode_host(&z).unwrap(), fk.encode_host(&y).unwrap());
        assert!(got == cpu(&z, &y), "device {}: LFQ / FSQ ids differ from the cpu backend (input {t})", gpu.ordinal());
    };

    // Every device at once, one thread and one context each.
    if count == 1 {
        say_skipped("only one CUDA device: the several-devices case needs two (running the one-device cases)");
    }
    std::thread::scope(|s| {
        for ordinal in 0..count {
            let on_gpu = &on_gpu;
            s.spawn(move || {
                let gpu = Gpu::new(ordinal).unwrap_or_else(|e| panic!("opening device {ordinal}: {e}"));
                on_gpu(&gpu, ordinal);
            });
        }
    });
    // One thread switching between the devices (each launch binds its own context).
    let gpus: Vec<Gpu> = (0..count).map(|o| Gpu::new(o).unwrap()).collect();
    for round in 0..2 {
        gpus.iter().for_each(|g| on_gpu(g, 10 + round * count + g.ordinal()));
    }
    // One device (its kernels prepared once) shared by several threads.
    let gpu = &gpus[0];
    let (lk, fk) = (LfqKernel::new(gpu, &lfq).unwrap(), FsqKernel::new(gpu, &fsq).unwrap());
    std::thread::scope(|s| {
        for t in 0..4 {
            let (lk, fk, input, cpu) = (&lk, &fk, &input, &cpu);
            s.spawn(move || {
                for _ in 0..ROUNDS {
                    let (z, y) = input(20 + t);
                    let got = (lk.encode_host(&z).unwrap(), fk.encode_host(&y).unwrap());
                    assert!(got == cpu(&z, &y), "shared device 0, thread {t}: ids differ from the cpu backend");
                }
            });
        }
    });
}
