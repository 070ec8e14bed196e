//! Quick timing of the first bench shape at every ISA level (a development aid; the criterion
//! benches are the measurement of record).
use std::time::Instant;
use vistok::{Backend, Isa, Layout, Normalize, PatchConfig, Patchify, View, ViewMut};

fn main() -> vistok::Result<()> {
    // DIMS=b,c,h,w overrides the shape; the first argument picks one ISA level.
    let dims: Vec<usize> = match std::env::var("DIMS") {
        Ok(s) => s.split(',').map(|x| x.parse().expect("DIMS=b,c,h,w")).collect(),
        Err(_) => vec![32, 3, 256, 256],
    };
    let plan =
        Patchify::new(&PatchConfig::image(Layout::ChannelsFirst, 16, 16).normalize(Normalize::imagenet_u8()), &dims)?;
    let image: Vec<u8> = (0..dims.iter().product::<usize>()).map(|i| (i % 251) as u8).collect();
    let mut tokens = vec![0.0f32; plan.tokens_dims().iter().product()];
    let bytes = (image.len() + 4 * tokens.len()) as f64;
    let only = std::env::args().nth(1);
    for isa in Isa::ALL.into_iter().filter(|i| i.is_available() && only.as_deref().is_none_or(|o| o == i.name())) {
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            plan.forward(
                Backend::CpuIsa(isa),
                View::new(&image, &dims)?,
                ViewMut::new(&mut tokens, &plan.tokens_dims())?,
            )?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{:>6}: {:.2} ms  {:.1} GB/s", isa.name(), best * 1e3, bytes / best / 1e9);
    }
    // Ceilings for the same bytes: a fill of the output and a copy of the output size.
    let mut best = (f64::MAX, f64::MAX);
    let src = vec![1.0f32; tokens.len()];
    for _ in 0..20 {
        let t = Instant::now();
        tokens.fill(std::hint::black_box(2.0));
        best.0 = best.0.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        tokens.copy_from_slice(std::hint::black_box(&src));
        best.1 = best.1.min(t.elapsed().as_secs_f64());
    }
    let out = 4.0 * tokens.len() as f64;
    println!(
        "  fill: {:.2} ms  {:.1} GB/s;  copy: {:.2} ms {:.1} GB/s (read+write)",
        best.0 * 1e3,
        out / best.0 / 1e9,
        best.1 * 1e3,
        2.0 * out / best.1 / 1e9
    );
    Ok(())
}
