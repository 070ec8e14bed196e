//! An end-to-end image tokenization pipeline on the CPU, every compute step a vistok call:
//!
//! ```text
//! image (u8) → patchify (+ ImageNet normalisation) → self-attention over the tokens → ToMe
//! token merging → nearest codebook entry (argmin) and LFQ → token ids → lookup / decode →
//! unmerge → unpatchify → image (u8)
//! ```
//!
//! ```text
//! cargo run --release --example pipeline -- [--small] [--backend reference|cpu] [--threads N] [--reps R]
//! ```
//!
//! - default: 8 images of 3×224×224, 16×16 patches → 196 tokens × 768 channels per image,
//!   12 heads of 64, ToMe with r = 49 (25 %), a codebook of 1024 entries, LFQ with 48 groups of
//!   16 bits; `--small` (used by CI): 2 images of 3×64×64, a codebook of 256 entries.
//! - `--backend` picks the host backend (`cpu`, the default, or the scalar `reference`);
//!   `--threads N` sizes rayon's global pool; `--reps R` (default 5, 1 for `reference`) runs the pipeline R times and
//!   reports the fastest time of each stage and of a whole run.
//!
//! The images are synthetic (gradients, a wave, a disc, a little noise), the codebook is made of
//! the patches of *other* synthetic images and the LFQ code scale is fixed: nothing is trained,
//! so the reconstruction is lossy — the PSNR shows that the pipeline runs end to end and is
//! wired up right, not what a trained tokenizer would reach. The invariants (ids in range,
//! lookup returns codebook rows, unmerge restores N tokens, the merged sizes add up, unpatchify
//! inverts patchify exactly, …) are checked, and any failure exits non-zero.
use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Instant;

use vistok::merge::{MatchConfig, MergePlan, SourceMap};
use vistok::{
    Attention, Backend, BitOrder, Codebook, Layout, Lfq, LfqConfig, Metric, Normalize, PatchConfig, Patchify,
    QkvLayout, View, ViewMut,
};

/// Everything that sizes one run.
struct Config {
    batch: usize,
    side: usize,
    patch: usize,
    heads: usize,
    /// Codebook entries (a multiple of the 256 tokens of one 256×256 codebook image).
    codes: usize,
    lfq_groups: usize,
    lfq_bits: u32,
    backend: Backend,
    threads: Option<usize>,
    reps: usize,
}

type Res<T> = Result<T, String>;

fn parse_args() -> Res<Config> {
    let mut c = Config {
        batch: 8,
        side: 224,
        patch: 16,
        heads: 12,
        codes: 1024,
        lfq_groups: 48,
        lfq_bits: 16,
        backend: Backend::Cpu,
        threads: None,
        reps: 5,
    };
    let mut reps = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--small" => (c.batch, c.side, c.codes) = (2, 64, 256),
            "--backend" => {
                c.backend = match value("--backend")?.as_str() {
                    "cpu" => Backend::Cpu,
                    "reference" => Backend::Reference,
                    other => return Err(format!("--backend {other}: expected reference or cpu")),
                }
            }
            "--threads" => {
                let n = value("--threads")?;
                c.threads = Some(n.parse().ok().filter(|&n| n > 0).ok_or(format!("--threads {n}: expected N ≥ 1"))?);
            }
            "--reps" => {
                let n = value("--reps")?;
                reps = Some(n.parse().ok().filter(|&n| n > 0).ok_or(format!("--reps {n}: expected R ≥ 1"))?);
            }
            "-h" | "--help" => {
                println!("usage: pipeline [--small] [--backend reference|cpu] [--threads N] [--reps R]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other} (try --help)")),
        }
    }
    // The scalar reference is slow on the default size: one repetition unless asked.
    c.reps = reps.unwrap_or(if c.backend == Backend::Reference { 1 } else { c.reps });
    Ok(c)
}

/// splitmix64, for the synthetic data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// `b` NCHW RGB images of `side × side`: a colour gradient, a wave, a bright disc and ±6 of
/// noise, different for every image and seed (deterministic).
fn synthetic_images(b: usize, side: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(b * 3 * side * side);
    for _ in 0..b {
        let (kx, ky, phase) = (1.0 + 4.0 * rng.unit(), 1.0 + 4.0 * rng.unit(), std::f32::consts::TAU * rng.unit());
        let (cx, cy, rad) = (rng.unit(), rng.unit(), 0.1 + 0.2 * rng.unit());
        let tint = [rng.unit(), rng.unit(), rng.unit()];
        for (c, tint) in tint.iter().enumerate() {
            for y in 0..side {
                for x in 0..side {
                    let (fx, fy) = (x as f32 / side as f32, y as f32 / side as f32);
                    let mut v = 30.0 + 120.0 * (0.6 * fx + 0.4 * fy) * (0.5 + tint);
                    v += 40.0 * (std::f32::consts::TAU * (kx * fx + ky * fy) + phase + c as f32).sin();
                    if (fx - cx).powi(2) + (fy - cy).powi(2) < rad * rad {
                        v += 60.0 * tint;
                    }
                    v += (rng.next() % 13) as f32 - 6.0;
                    out.push(v.clamp(0.0, 255.0) as u8);
                }
            }
        }
    }
    out
}

/// Per-stage wall times (the fastest of the repetitions) and the work each stage does.
#[derive(Default)]
struct Timings {
    rows: Vec<(&'static str, f64, Work)>,
}

/// What a stage moves or computes, for its throughput.
#[derive(Clone, Copy)]
enum Work {
    Bytes(f64),
    Flops(f64),
}

impl Timings {
    fn time<R>(&mut self, name: &'static str, work: Work, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        let s = t.elapsed().as_secs_f64();
        match self.rows.iter_mut().find(|r| r.0 == name) {
            Some(row) => row.1 = row.1.min(s),
            None => self.rows.push((name, s, work)),
        }
        r
    }

    fn print(&self, images: usize, best_rep: f64) {
        println!("{:<26} {:>10} {:>16}", "stage", "ms", "throughput");
        let mut total = 0.0;
        for &(name, s, work) in &self.rows {
            total += s;
            let rate = match work {
                Work::Bytes(b) => format!("{:.1} GB/s", b / s / 1e9),
                Work::Flops(f) => format!("{:.1} GFLOP/s", f / s / 1e9),
            };
            println!("{name:<26} {:>10.3} {rate:>16}", s * 1e3);
        }
        let per_s = |s: f64| format!("{:.1} img/s", images as f64 / s);
        println!("{:<26} {:>10.3} {:>16}", "sum of the stages", total * 1e3, per_s(total));
        println!("{:<26} {:>10.3} {:>16}", "fastest run, wall", best_rep * 1e3, per_s(best_rep));
    }
}

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Res<()> {
    if ok {
        Ok(())
    } else {
        Err(format!("invariant violated: {}", what()))
    }
}

/// PSNR of `b` against `a` (u8 images), in dB, and the mean absolute error.
fn psnr(a: &[u8], b: &[u8]) -> (f64, f64) {
    let (mut se, mut ae) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = x as f64 - y as f64;
        se += d * d;
        ae += d.abs();
    }
    let mse = se / a.len() as f64;
    (10.0 * (255.0f64 * 255.0 / mse).log10(), ae / a.len() as f64)
}

fn main() -> ExitCode {
    match parse_args().and_then(|c| run(&c)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pipeline: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: &Config) -> Res<()> {
    let e = |e: vistok::Error| e.to_string();
    if let Some(n) = cfg.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().map_err(|e| e.to_string())?;
    }
    let be = cfg.backend;
    let (b, side, p) = (cfg.batch, cfg.side, cfg.patch);
    let image_dims = [b, 3, side, side];
    let config = PatchConfig::image(Layout::ChannelsFirst, p, p).normalize(Normalize::imagenet_u8());
    let patchify = Patchify::new(&config, &image_dims).map_err(e)?;
    let [_, n, c] = patchify.tokens_dims();
    let (h, d) = (cfg.heads, c / cfg.heads);
    ensure(h * d == c, || format!("{c} channels do not split into {h} heads"))?;
    let r = n / 4;
    let merge_config = MatchConfig::new(r);
    let n2 = n - merge_config.effective_r(n);
    let k = cfg.codes;
    let lfq = Lfq::new(&LfqConfig::new(cfg.lfq_groups, cfg.lfq_bits, BitOrder::MsbFirst).scale(0.8)).map_err(e)?;
    ensure(lfq.channels() == c, || format!("LFQ takes {} channels, tokens have {c}", lfq.channels()))?;
    let threads = if cfg!(feature = "rayon") { rayon::current_num_threads() } else { 1 };
    let backend = match be {
        Backend::Cpu => format!("cpu (isa {})", vistok::Isa::detect().name()),
        other => format!("{other:?}").to_lowercase(),
    };
    println!(
        "vistok pipeline: backend {backend}, {threads} threads, {b} images 3×{side}×{side} u8, \
         patch {p} → {n} tokens × {c}, {h} heads × {d}, ToMe r = {} → {n2} tokens, codebook {k} × {c} (L2), \
         LFQ {} groups × {} bits",
        n - n2,
        lfq.groups(),
        lfq.bits()
    );

    // ---------------------------------------------------------------- setup (not timed)
    let image = synthetic_images(b, side, 1);
    let code_images = k.div_ceil(256);
    let code_dims = [code_images, 3, 256, 256];
    let code_plan = Patchify::new(&config, &code_dims).map_err(e)?;
    let mut code_tokens = vec![0.0f32; code_plan.tokens_dims().iter().product()];
    let code_pixels = synthetic_images(code_images, 256, 2);
    let t = Instant::now();
    let code_view = ViewMut::new(&mut code_tokens, &code_plan.tokens_dims()).map_err(e)?;
    code_plan.forward(be, View::new(&code_pixels, &code_dims).map_err(e)?, code_view).map_err(e)?;
    let codebook = Codebook::new(View::new(&code_tokens[..k * c], &[k, c]).map_err(e)?, Metric::L2).map_err(e)?;
    println!(
        "setup: codebook of {k} entries from the patches of {code_images} other synthetic image(s), {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    // ---------------------------------------------------------------- sanity: exact round trip
    let tok_dims = [b, n, c];
    let mut tokens = vec![0.0f32; b * n * c];
    let mut back = vec![0u8; image.len()];
    patchify
        .forward(be, View::new(&image, &image_dims).map_err(e)?, ViewMut::new(&mut tokens, &tok_dims).map_err(e)?)
        .map_err(e)?;
    patchify
        .inverse(be, View::new(&tokens, &tok_dims).map_err(e)?, ViewMut::new(&mut back, &image_dims).map_err(e)?)
        .map_err(e)?;
    ensure(back == image, || "unpatchify(patchify(image)) is not the image".into())?;
    println!("sanity: unpatchify(patchify(image)) == image exactly ({} pixels)", image.len());

    // ---------------------------------------------------------------- the timed pipeline
    let mut attn = vec![0.0f32; b * n * c];
    let mut merged = vec![0.0f32; b * n2 * c];
    let mut sizes = vec![0.0f32; b * n2];
    let mut ids = vec![0u32; b * n2];
    let mut quant = vec![0.0f32; b * n2 * c];
    let mut unmerged = vec![0.0f32; b * n * c];
    let mut recon = vec![0u8; image.len()];
    let mut lfq_ids = vec![0u32; b * n2 * lfq.groups()];
    let mut lfq_codes = vec![0.0f32; b * n2 * c];
    let mut lfq_unmerged = vec![0.0f32; b * n * c];
    let mut lfq_recon = vec![0u8; image.len()];
    let (mut plan, mut map) = (None, None);
    let (f4, px) = (4.0, image.len() as f64);
    let (tok_b, merged_b) = (f4 * (b * n * c) as f64, f4 * (b * n2 * c) as f64);
    let qkv_dims = [b, n, h, d];
    let merged_dims = [b, n2, c];
    let attention = Attention::new().layout(QkvLayout::Bnhd);
    let mut times = Timings::default();
    let mut best_rep = f64::MAX;
    for _ in 0..cfg.reps {
        let rep = Instant::now();
        times
            .time("patchify", Work::Bytes(px + tok_b), || {
                patchify.forward(be, View::new(&image, &image_dims)?, ViewMut::new(&mut tokens, &tok_dims)?)
            })
            .map_err(e)?;
        // Self-attention with the patch tokens as Q = K = V, split into heads ([B, N, H, D]).
        let flops = 4.0 * (b * h * n * n * d) as f64;
        times
            .time("attention (Q=K=V)", Work::Flops(flops), || {
                let qkv = View::new(&tokens, &qkv_dims)?;
                attention.forward(be, qkv, qkv, qkv, ViewMut::new(&mut attn, &qkv_dims)?)
            })
            .map_err(e)?;
        // ToMe: the attention output is the similarity metric; the patch tokens are merged.
        let flops = 2.0 * (b * n.div_ceil(2) * (n / 2) * c) as f64;
        let p = times
            .time("merge: bipartite plan", Work::Flops(flops), || {
                MergePlan::bipartite(be, View::new(&attn, &tok_dims)?, &merge_config)
            })
            .map_err(e)?;
        times
            .time("merge: weighted average", Work::Bytes(tok_b + merged_b), || {
                p.merge_weighted(
                    be,
                    View::new(&tokens, &tok_dims)?,
                    None,
                    ViewMut::new(&mut merged, &merged_dims)?,
                    ViewMut::new(&mut sizes, &[b, n2])?,
                )
            })
            .map_err(e)?;
        let m = times
            .time("merge: source map", Work::Bytes(8.0 * (b * n) as f64), || -> vistok::Result<SourceMap> {
                let mut m = SourceMap::identity(b, n)?;
                m.apply(&p)?;
                Ok(m)
            })
            .map_err(e)?;
        let flops = 2.0 * (b * n2 * k * c) as f64;
        times
            .time("argmin (codebook)", Work::Flops(flops), || {
                codebook.argmin(be, View::new(&merged, &merged_dims)?, ViewMut::new(&mut ids, &[b, n2])?, None)
            })
            .map_err(e)?;
        times
            .time("lookup", Work::Bytes(merged_b), || {
                codebook.lookup(be, View::new(&ids, &[b, n2])?, ViewMut::new(&mut quant, &merged_dims)?)
            })
            .map_err(e)?;
        times
            .time("unmerge", Work::Bytes(merged_b + tok_b), || {
                m.unmerge(be, View::new(&quant, &merged_dims)?, ViewMut::new(&mut unmerged, &tok_dims)?)
            })
            .map_err(e)?;
        times
            .time("unpatchify", Work::Bytes(tok_b + px), || {
                patchify.inverse(be, View::new(&unmerged, &tok_dims)?, ViewMut::new(&mut recon, &image_dims)?)
            })
            .map_err(e)?;
        // LFQ on the same merged tokens, all 768 channels (vistok has no matmul for a projection).
        let lfq_tok = [b * n2, c];
        let lfq_id_dims = lfq.ids_dims(b * n2);
        let id_b = f4 * lfq_ids.len() as f64;
        times
            .time("lfq encode", Work::Bytes(merged_b + id_b), || {
                lfq.encode(be, View::new(&merged, &lfq_tok)?, ViewMut::new(&mut lfq_ids, &lfq_id_dims)?)
            })
            .map_err(e)?;
        times
            .time("lfq decode", Work::Bytes(id_b + merged_b), || {
                lfq.decode(be, View::new(&lfq_ids, &lfq_id_dims)?, ViewMut::new(&mut lfq_codes, &lfq_tok)?)
            })
            .map_err(e)?;
        times
            .time("lfq unmerge", Work::Bytes(merged_b + tok_b), || {
                m.unmerge(be, View::new(&lfq_codes, &merged_dims)?, ViewMut::new(&mut lfq_unmerged, &tok_dims)?)
            })
            .map_err(e)?;
        times
            .time("lfq unpatchify", Work::Bytes(tok_b + px), || {
                patchify.inverse(be, View::new(&lfq_unmerged, &tok_dims)?, ViewMut::new(&mut lfq_recon, &image_dims)?)
            })
            .map_err(e)?;
        best_rep = best_rep.min(rep.elapsed().as_secs_f64());
        (plan, map) = (Some(p), Some(m));
    }
    let (plan, map) = (plan.ok_or("no repetition ran")?, map.ok_or("no repetition ran")?);
    println!("\nfastest of {} run(s), per stage:", cfg.reps);
    times.print(b, best_rep);

    // ---------------------------------------------------------------- invariants
    ensure(plan.out_tokens() == n2 && map.out_tokens() == n2, || {
        format!("merging left {} tokens, expected {n2}", plan.out_tokens())
    })?;
    ensure(map.slots() == plan.slots(), || "a one-plan source map differs from the plan's slots".into())?;
    ensure(map.sizes() == sizes, || "merge_weighted's sizes differ from the source map's".into())?;
    ensure(sizes.chunks(n2).all(|s| s.iter().sum::<f32>() == n as f32), || "merged sizes do not add up to N".into())?;
    ensure(ids.iter().all(|&i| (i as usize) < k), || "an argmin index is out of range".into())?;
    let entries = codebook.entries();
    ensure(quant.chunks(c).zip(&ids).all(|(q, &i)| q == &entries[i as usize * c..][..c]), || {
        "lookup did not return codebook rows".into()
    })?;
    // Unmerge restores N tokens per image: token t holds the quantized value of its slot.
    let mut via_plan = vec![0.0f32; b * n * c];
    plan.unmerge(be, View::new(&quant, &merged_dims).map_err(e)?, ViewMut::new(&mut via_plan, &tok_dims).map_err(e)?)
        .map_err(e)?;
    ensure(via_plan == unmerged, || "SourceMap::unmerge differs from MergePlan::unmerge".into())?;
    for (bi, slots) in plan.slots().chunks(n).enumerate() {
        for (t, &s) in slots.iter().enumerate() {
            let got = &unmerged[(bi * n + t) * c..][..c];
            ensure(got == &quant[(bi * n2 + s as usize) * c..][..c], || format!("unmerged token [{bi}, {t}]"))?;
        }
    }
    let max_id = lfq.codebook_size();
    ensure(lfq_ids.iter().all(|&i| (i as u64) < max_id), || "an LFQ id is out of range".into())?;
    let v = lfq.code_value();
    ensure(lfq_codes.iter().all(|&q| q == v || q == -v), || "an LFQ code is not ±scale".into())?;
    // LFQ keeps every sign: the decoded code has the sign of the merged token (0 → −).
    ensure(merged.iter().zip(&lfq_codes).all(|(&z, &q)| (z > 0.0) == (q > 0.0)), || "LFQ lost a sign".into())?;

    // ---------------------------------------------------------------- report
    let mut used = HashMap::new();
    ids.iter().for_each(|&i| *used.entry(i).or_insert(0usize) += 1);
    let stats = lfq.statistics(be, View::new(&lfq_ids, &lfq.ids_dims(b * n2)).map_err(e)?).map_err(e)?;
    let lfq_used = stats.histogram.as_ref().map(|h| h.iter().filter(|&&x| x > 0).count());
    let (vq_psnr, vq_mae) = psnr(&image, &recon);
    let (lfq_psnr, lfq_mae) = psnr(&image, &lfq_recon);
    println!("\ntokens: {n} → {n2} per image after merging ({:.0} % fewer)", 100.0 * (n - n2) as f64 / n as f64);
    println!(
        "codebook usage: {} distinct of {k} entries over {} tokens; reconstruction PSNR {vq_psnr:.2} dB, mean |error| {vq_mae:.2} / 255",
        used.len(),
        ids.len()
    );
    println!(
        "LFQ: {} ids of {} bits, {} distinct; reconstruction PSNR {lfq_psnr:.2} dB, mean |error| {lfq_mae:.2} / 255",
        lfq_ids.len(),
        lfq.bits(),
        lfq_used.map_or("?".into(), |u| u.to_string())
    );
    println!("(untrained codebook / fixed LFQ scale: lossy by design; every invariant checked: ok)");
    Ok(())
}
