//! The CUDA patchify backend against the reference, bit for bit.
//!
//! One test body runs on two devices: the GPU (skipped, with a message, when there is none,
//! unless `VISTOK_REQUIRE_GPU=1`) and `kernels/ptx_sim.py`, a strict PTX interpreter that runs
//! the same PTX with the same host-built launches on the CPU (skipped when python3 is missing).
//! Outputs are poisoned before every launch and compared bitwise, element by element.

mod common;

#[cfg(not(feature = "cuda"))]
#[test]
fn skipped_without_cuda_feature() {
    common::skip_without_cuda_feature();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::common::gpu::{gpu, simulator};
    use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    use proptest::prelude::*;
    use vistok::cuda::patchify::{self as cp, GridShape, Mapping, Pointers, MAX_GRID_Y};
    use vistok::cuda::{Gpu, PatchifyKernel};
    use vistok::{
        bf16, f16, Backend, DType, Element, Error, Family, Float, Layout, Normalize, PatchConfig, PatchOrder, Patchify,
        View, ViewMut,
    };

    // ---------------------------------------------------------------- devices

    #[derive(Clone, Copy)]
    enum Device {
        Gpu(&'static Gpu),
        Sim,
    }

    /// How a launch is set up: element offsets of the buffers from an aligned base (to reach
    /// the unaligned paths), the grid's batch cap (to reach the batch loop; `MAX_GRID_Y` means
    /// the library's own sizing for this device), the poison byte, the patchify thread mapping.
    #[derive(Clone, Copy, Debug)]
    struct Opts {
        src_offset: usize,
        dst_offset: usize,
        max_grid_y: u32,
        poison: u8,
        mapping: Mapping,
    }

    /// The grid shape for a cap: samples `max_y` apart per thread.
    fn cap(max_y: u32) -> GridShape {
        GridShape::max_rows(max_y)
    }

    /// A kernel with the test's cap, or the library's own sizing when there is none.
    fn with_cap(k: PatchifyKernel, max_y: u32) -> PatchifyKernel {
        if max_y == MAX_GRID_Y {
            k
        } else {
            k.with_grid_shape(cap(max_y))
        }
    }

    const PLAIN: Opts =
        Opts { src_offset: 0, dst_offset: 0, max_grid_y: MAX_GRID_Y, poison: 0xFF, mapping: Mapping::RowRuns };
    const FLAT: Opts = Opts { mapping: Mapping::Flat, ..PLAIN };

    fn from_bytes<T: Element>(bytes: &[u8]) -> Vec<T> {
        let mut v = vec![<T as bytemuck::Zeroable>::zeroed(); bytes.len() / std::mem::size_of::<T>()];
        bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
        v
    }

    fn poisoned<T: Element>(n: usize, byte: u8) -> Vec<T> {
        from_bytes(&vec![byte; n * std::mem::size_of::<T>()])
    }

    // ---------------------------------------------------------------- the GPU

    type Stream = std::sync::Arc<cudarc::driver::CudaStream>;
    type Src<'a, I> = cudarc::driver::CudaView<'a, I>;
    type Dst<'a, O> = cudarc::driver::CudaViewMut<'a, O>;

    /// Runs `launch` on the GPU with guard elements around the output: `dst_offset` poisoned
    /// elements before and 16 after, which must survive.
    fn gpu_run<I, O>(
        gpu: &Gpu,
        input: &[I],
        out_len: usize,
        o: Opts,
        launch: impl FnOnce(&Stream, &Src<'_, I>, &mut Dst<'_, O>) -> vistok::Result<()>,
    ) -> Vec<O>
    where
        I: Element + DeviceRepr,
        O: Element + DeviceRepr + ValidAsZeroBits,
    {
        let stream = gpu.stream();
        let mut host_in = poisoned::<I>(o.src_offset, 0x5A);
        host_in.extend_from_slice(input);
        let src_all = stream.clone_htod(&host_in).unwrap();
        let src = src_all.slice(o.src_offset..);
        let guard = 16;
        let mut dst = stream.clone_htod(&poisoned::<O>(o.dst_offset + out_len + guard, o.poison)).unwrap();
        {
            let mut view = dst.slice_mut(o.dst_offset..o.dst_offset + out_len);
            launch(stream, &src, &mut view).unwrap();
        }
        let all: Vec<O> = stream.clone_dtoh(&dst).unwrap();
        gpu.synchronize().unwrap();
        let untouched = poisoned::<O>(1, o.poison)[0];
        let (before, rest) = all.split_at(o.dst_offset);
        let (out, after) = rest.split_at(out_len);
        assert!(before.iter().chain(after).all(|&x| bits(x) == bits(untouched)), "a kernel wrote outside its output");
        out.to_vec()
    }

    // ---------------------------------------------------------------- the emulator

    fn sim_dir() -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vistok-ptx-sim-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Runs one launch on kernels/ptx_sim.py. Buffers sit at fixed, 256-aligned bases plus the
    /// element offsets in `o`, each exactly as long as its data (any stray access fails).
    fn sim_run<I: Element, O: Element>(plan: &Patchify, forward: bool, input: &[I], out_len: usize, o: Opts) -> Vec<O> {
        let (si, so) = (std::mem::size_of::<I>() as u64, std::mem::size_of::<O>() as u64);
        let ptrs = Pointers {
            src: 0x1000_0000 + o.src_offset as u64 * si,
            dst: 0x8000_0000 + o.dst_offset as u64 * so,
            coef: 0x4000,
        };
        let (name, grid, block, params) = if forward {
            let l = cp::plan_forward_mapped(plan, I::DTYPE, O::DTYPE, ptrs, cap(o.max_grid_y), o.mapping).unwrap();
            (l.name, l.grid, l.block, bytemuck::bytes_of(&l.params).to_vec())
        } else {
            let l = cp::plan_inverse(plan, I::DTYPE, O::DTYPE, ptrs, cap(o.max_grid_y)).unwrap();
            (l.name, l.grid, l.block, bytemuck::bytes_of(&l.params).to_vec())
        };
        let dir = sim_dir();
        let write = |f: &str, b: &[u8]| std::fs::write(dir.join(f), b).unwrap();
        write("src.bin", bytemuck::cast_slice(input));
        write("dst.bin", bytemuck::cast_slice(&poisoned::<O>(out_len, o.poison)));
        write("coef.bin", bytemuck::cast_slice(&cp::coefficient_table(plan)));
        write("patchify.ptx", cp::PTX.as_bytes()); // exactly what the binary launches
        let job = format!(
            r#"{{"ptx": "patchify.ptx", "kernel": "{name}", "grid": [{}, {}, {}], "block": [{}, {}, {}], "params": "{}",
 "buffers": [{{"name": "src", "addr": {}, "file": "src.bin"}},
             {{"name": "coef", "addr": {}, "file": "coef.bin"}},
             {{"name": "dst", "addr": {}, "file": "dst.bin", "writable": true, "must_write": true, "out": "out.bin"}}]}}"#,
            grid.0,
            grid.1,
            grid.2,
            block.0,
            block.1,
            block.2,
            hex(&params),
            ptrs.src,
            ptrs.coef,
            ptrs.dst,
        );
        write("job.json", job.as_bytes());
        let sim = simulator().expect("callers check simulator() first");
        let out = Command::new("python3").arg(sim).arg(dir.join("job.json")).output().unwrap();
        assert!(out.status.success(), "ptx_sim failed on {name} ({o:?}):\n{}", String::from_utf8_lossy(&out.stderr));
        let result = from_bytes(&std::fs::read(dir.join("out.bin")).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    // ---------------------------------------------------------------- the shared body

    fn bits<T: Element>(x: T) -> u32 {
        bytemuck::bytes_of(&x).iter().rev().fold(0, |acc, &b| (acc << 8) | u32::from(b))
    }

    /// splitmix64, so failures reproduce from the seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
            lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
        }
    }

    /// Non-trivial finite data: all u8 values; floats over [-300, 300] with zeros of both signs,
    /// tiny and subnormal values, and values past f16's range.
    fn data<T: Element>(n: usize, seed: u64) -> Vec<T> {
        let mut r = Rng(seed);
        (0..n)
            .map(|_| match T::DTYPE {
                DType::U8 => T::from_f32((r.next() % 256) as f32),
                _ => T::from_f32(match r.next() % 32 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => r.uniform(-1e-3, 1e-3),
                    3 => r.uniform(-1.0, 1.0) * 1e-39,
                    4 => r.uniform(-1e5, 1e5),
                    _ => r.uniform(-300.0, 300.0),
                }),
            })
            .collect()
    }

    fn assert_same<T: Element>(what: &str, got: &[T], want: &[T]) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        if let Some(i) = (0..got.len()).find(|&i| bits(got[i]) != bits(want[i])) {
            let n = (0..got.len()).filter(|&i| bits(got[i]) != bits(want[i])).count();
            panic!(
                "{what}: {n} of {} elements differ; first at {i}: got {:?} ({:#x}), want {:?} ({:#x})",
                got.len(),
                got[i],
                bits(got[i]),
                want[i],
                bits(want[i])
            );
        }
    }

    fn check_forward<I, O>(dev: Device, plan: &Patchify, seed: u64, o: Opts)
    where
        I: Element + DeviceRepr,
        O: Float + DeviceRepr + ValidAsZeroBits,
    {
        let image = data::<I>(plan.image_dims().iter().product(), seed);
        let n: usize = plan.tokens_dims().iter().product();
        let mut want = poisoned::<O>(n, 0xFF);
        plan.forward(
            Backend::Reference,
            View::new(&image, plan.image_dims()).unwrap(),
            ViewMut::new(&mut want, &plan.tokens_dims()).unwrap(),
        )
        .unwrap();
        let got = match dev {
            Device::Gpu(g) => {
                let k = with_cap(PatchifyKernel::new(g, plan).unwrap(), o.max_grid_y).with_mapping(o.mapping);
                gpu_run(g, &image, n, o, |s, src, dst| k.forward(s, src, dst))
            }
            Device::Sim => sim_run::<I, O>(plan, true, &image, n, o),
        };
        let what = format!("{} {:?} {:?}", cp::kernel_name("patchify", I::DTYPE, O::DTYPE), plan.geometry(), o);
        assert_same(&what, &got, &want);
    }

    fn check_inverse<I, O>(dev: Device, plan: &Patchify, seed: u64, o: Opts)
    where
        I: Float + DeviceRepr,
        O: Element + DeviceRepr + ValidAsZeroBits,
    {
        let tokens = data::<I>(plan.tokens_dims().iter().product(), seed);
        let n: usize = plan.image_dims().iter().product();
        let mut want = poisoned::<O>(n, 0xFF);
        plan.inverse(
            Backend::Reference,
            View::new(&tokens, &plan.tokens_dims()).unwrap(),
            ViewMut::new(&mut want, plan.image_dims()).unwrap(),
        )
        .unwrap();
        let got = match dev {
            Device::Gpu(g) => {
                let k = with_cap(PatchifyKernel::new(g, plan).unwrap(), o.max_grid_y);
                gpu_run(g, &tokens, n, o, |s, src, dst| k.inverse(s, src, dst))
            }
            Device::Sim => sim_run::<I, O>(plan, false, &tokens, n, o),
        };
        let what = format!("{} {:?} {:?}", cp::kernel_name("unpatchify", I::DTYPE, O::DTYPE), plan.geometry(), o);
        assert_same(&what, &got, &want);
    }

    /// Runs pair `k` (0..24, in KERNEL_NAMES order) of one plan.
    fn check_pair(dev: Device, plan: &Patchify, k: usize, seed: u64, o: Opts) {
        macro_rules! pairs {
            ($($n:expr => $f:ident::<$i:ty, $o:ty>),* $(,)?) => {
                match k { $($n => $f::<$i, $o>(dev, plan, seed, o),)* _ => unreachable!() }
            };
        }
        pairs! {
            0 => check_forward::<u8, f32>, 1 => check_forward::<u8, f16>, 2 => check_forward::<u8, bf16>,
            3 => check_forward::<f32, f32>, 4 => check_forward::<f32, f16>, 5 => check_forward::<f32, bf16>,
            6 => check_forward::<f16, f32>, 7 => check_forward::<f16, f16>, 8 => check_forward::<f16, bf16>,
            9 => check_forward::<bf16, f32>, 10 => check_forward::<bf16, f16>, 11 => check_forward::<bf16, bf16>,
            12 => check_inverse::<f32, u8>, 13 => check_inverse::<f32, f32>, 14 => check_inverse::<f32, f16>,
            15 => check_inverse::<f32, bf16>, 16 => check_inverse::<f16, u8>, 17 => check_inverse::<f16, f32>,
            18 => check_inverse::<f16, f16>, 19 => check_inverse::<f16, bf16>, 20 => check_inverse::<bf16, u8>,
            21 => check_inverse::<bf16, f32>, 22 => check_inverse::<bf16, f16>, 23 => check_inverse::<bf16, bf16>,
        }
    }

    fn plan(layout: Layout, order: PatchOrder, pad: bool, norm: bool, patch: [usize; 3], dims: &[usize]) -> Patchify {
        let mut cfg = PatchConfig::video(layout, patch[0], patch[1], patch[2]).order(order).pad(pad);
        if norm {
            let c = if layout == Layout::ChannelsFirst { dims[1] } else { dims[dims.len() - 1] };
            let mean = (0..c).map(|i| 0.3 + 0.1 * i as f32).collect();
            let std = (0..c).map(|i| 0.2 + 0.05 * i as f32).collect();
            cfg = cfg.normalize(Normalize::new(1.0 / 255.0, mean, std));
        }
        Patchify::new(&cfg, dims).unwrap()
    }

    use Layout::{ChannelsFirst as Nchw, ChannelsLast as Nhwc};
    use PatchOrder::{Cpq, Pqc};

    /// Small shapes that reach every path: vector + vector load, vector + gather, scalar,
    /// padding (whole and partial vectors), video, the batch loop, unaligned buffers; patchify
    /// in both thread mappings (row runs: NCHW Cpq and NHWC Pqc, also with C = 3 and odd W).
    fn small_cases() -> Vec<(Patchify, Opts)> {
        let o = PLAIN;
        let mut cases = vec![
            (plan(Nchw, Cpq, false, true, [1, 4, 8], &[2, 3, 8, 16]), o),
            (plan(Nhwc, Cpq, false, false, [1, 4, 8], &[2, 8, 8, 3]), o),
            (plan(Nchw, Pqc, false, true, [1, 2, 2], &[1, 8, 4, 6]), o),
            (plan(Nhwc, Pqc, false, true, [1, 2, 2], &[2, 4, 4, 8]), o),
            (plan(Nhwc, Pqc, false, false, [1, 2, 3], &[1, 4, 6, 3]), o),
            (plan(Nchw, Cpq, true, true, [1, 4, 8], &[1, 2, 7, 21]), o),
            (plan(Nchw, Cpq, true, false, [1, 3, 8], &[1, 2, 7, 16]), o),
            (plan(Nchw, Cpq, true, true, [2, 2, 8], &[1, 2, 3, 4, 16]), o),
            (plan(Nhwc, Pqc, true, false, [2, 3, 2], &[1, 5, 4, 5, 8]), o),
            (plan(Nchw, Cpq, false, false, [1, 2, 8], &[5, 1, 2, 16]), Opts { max_grid_y: 2, ..o }),
            (plan(Nchw, Cpq, false, true, [1, 4, 8], &[2, 3, 4, 16]), Opts { src_offset: 1, ..o }),
            (plan(Nchw, Cpq, false, true, [1, 4, 8], &[2, 3, 4, 16]), Opts { dst_offset: 1, poison: 0x00, ..o }),
            (plan(Nchw, Cpq, false, false, [1, 1, 1], &[1, 1, 1, 1]), o),
            // Row runs of pw·C values: C = 3 wraps lane channels, padding cuts runs mid-vector.
            (plan(Nhwc, Pqc, false, true, [1, 2, 4], &[2, 4, 8, 3]), o),
            (plan(Nhwc, Pqc, true, true, [1, 3, 8], &[1, 4, 11, 3]), o),
            (plan(Nhwc, Pqc, true, true, [2, 2, 4], &[1, 3, 3, 7, 5]), Opts { max_grid_y: 1, ..o }),
            (plan(Nhwc, Pqc, false, true, [1, 2, 4], &[3, 2, 8, 3]), Opts { src_offset: 2, max_grid_y: 2, ..o }),
            (plan(Nchw, Cpq, true, true, [1, 2, 8], &[3, 2, 5, 19]), Opts { src_offset: 1, max_grid_y: 2, ..o }),
            (plan(Nchw, Cpq, false, true, [1, 2, 16], &[1, 3, 4, 64]), o),
        ];
        // The flat mapping on the cases the row runs took over.
        let flat: Vec<_> = cases
            .iter()
            .filter(|(p, _)| takes_row_runs(p))
            .map(|(p, o)| (p.clone(), Opts { mapping: Mapping::Flat, ..*o }))
            .collect();
        cases.extend(flat);
        cases
    }

    /// Whether u8 -> f32 patchify of `p` (aligned buffers) takes the row-run mapping.
    fn takes_row_runs(p: &Patchify) -> bool {
        let ptrs = Pointers { src: 0x1000, dst: 0x2000, coef: 0x3000 };
        let l = cp::plan_forward(p, DType::U8, DType::F32, ptrs, GridShape::ONE_SAMPLE_PER_THREAD).unwrap();
        l.params.common.flags & cp::FLAG_ROWS != 0
    }

    // ---------------------------------------------------------------- emulated (no GPU needed)

    #[test]
    fn emulated_every_pair_on_small_shapes() {
        if simulator().is_none() {
            return;
        }
        let cases = small_cases();
        // Every pair on the first case, then each case on a few pairs (the emulator is slow).
        for k in 0..24 {
            check_pair(Device::Sim, &cases[0].0, k, k as u64, cases[0].1);
        }
        for (i, (p, o)) in cases.iter().enumerate().skip(1) {
            for k in [i % 12, 12 + (i * 5) % 12] {
                check_pair(Device::Sim, p, k, (i * 24 + k) as u64, *o);
            }
        }
    }

    #[test]
    fn emulated_row_runs_every_patchify_pair() {
        if simulator().is_none() {
            return;
        }
        // Every patchify pair (4- and 8-lane entries) on row runs with C = 3 lane-channel wrap,
        // padding and the batch loop, then NCHW Cpq runs cut by the right edge, misaligned.
        let p = plan(Nhwc, Pqc, true, true, [1, 2, 8], &[2, 3, 10, 3]);
        assert!(takes_row_runs(&p));
        for k in 0..12 {
            check_pair(Device::Sim, &p, k, 300 + k as u64, Opts { max_grid_y: 1, ..PLAIN });
        }
        let p = plan(Nchw, Cpq, true, true, [1, 2, 8], &[2, 2, 3, 21]);
        assert!(takes_row_runs(&p));
        for k in [0, 2, 4, 7, 9] {
            check_pair(Device::Sim, &p, k, 400 + k as u64, PLAIN);
            check_pair(Device::Sim, &p, k, 500 + k as u64, Opts { src_offset: 1, ..PLAIN });
        }
        check_pair(Device::Sim, &p, 0, 600, Opts { dst_offset: 1, ..PLAIN }); // scalar fallback
        check_pair(Device::Sim, &p, 1, 601, FLAT);
    }

    #[test]
    fn emulated_eight_lane_entries() {
        if simulator().is_none() {
            return;
        }
        // pw = 8 makes the 8-lane entries (2-byte in and out) take their vector paths.
        let p = plan(Nchw, Cpq, true, true, [1, 2, 8], &[2, 2, 3, 16]);
        for k in [1, 2, 7, 8, 10, 11, 16, 18, 19, 20, 22, 23] {
            check_pair(Device::Sim, &p, k, 100 + k as u64, PLAIN);
        }
        let p = plan(Nhwc, Pqc, false, false, [1, 2, 2], &[1, 2, 4, 8]);
        for k in [7, 18] {
            check_pair(Device::Sim, &p, k, 200 + k as u64, Opts { max_grid_y: 1, ..PLAIN });
        }
    }

    #[test]
    fn launches_pick_the_expected_paths() {
        let ptrs = Pointers { src: 0x1000, dst: 0x2000, coef: 0x3000 };
        let path = |p: &Patchify, fwd: bool, i: DType, o: DType, ptrs: Pointers| {
            let c = if fwd {
                cp::plan_forward(p, i, o, ptrs, GridShape::ONE_SAMPLE_PER_THREAD).unwrap().params.common
            } else {
                cp::plan_inverse(p, i, o, ptrs, GridShape::ONE_SAMPLE_PER_THREAD).unwrap().params.common
            };
            (c.lanes, c.flags & cp::FLAG_VLOAD != 0, c.flags & cp::FLAG_ROWS != 0)
        };
        let bench = plan(Nchw, Cpq, false, false, [1, 16, 16], &[32, 3, 256, 256]);
        assert_eq!(path(&bench, true, DType::U8, DType::F32, ptrs), (4, true, true));
        assert_eq!(path(&bench, false, DType::F32, DType::U8, ptrs), (4, true, false));
        assert_eq!(path(&bench, true, DType::U8, DType::F32, Pointers { src: 0x1001, ..ptrs }), (4, false, true));
        assert_eq!(path(&bench, true, DType::U8, DType::F32, Pointers { dst: 0x2004, ..ptrs }), (1, false, false));
        let nhwc = plan(Nhwc, Cpq, false, false, [1, 16, 16], &[8, 512, 512, 3]);
        assert_eq!(path(&nhwc, true, DType::F32, DType::BF16, ptrs), (4, false, false));
        let mae = plan(Nhwc, Pqc, false, false, [1, 16, 16], &[8, 224, 224, 3]);
        assert_eq!(path(&mae, true, DType::U8, DType::F32, ptrs), (4, true, true));
        assert_eq!(path(&mae, true, DType::U8, DType::BF16, ptrs), (8, true, true));
        let video = plan(Nchw, Cpq, false, false, [2, 16, 16], &[4, 3, 16, 224, 224]);
        assert_eq!(path(&video, true, DType::U8, DType::F32, ptrs), (4, true, true));
        let odd = plan(Nhwc, Pqc, false, false, [1, 2, 3], &[1, 4, 6, 3]); // run of 9 values
        assert_eq!(path(&odd, true, DType::U8, DType::F32, ptrs), (1, false, false));
        let flat = |p: &Patchify| {
            let l = cp::plan_forward_mapped(p, DType::U8, DType::F32, ptrs, cap(32), Mapping::Flat).unwrap();
            (l.params.common.lanes, l.params.common.flags)
        };
        assert_eq!(flat(&bench), (4, cp::FLAG_VLOAD));
        assert_eq!(flat(&mae), (1, cp::FLAG_ROLE));
        let l = cp::plan_forward(&bench, DType::U8, DType::F32, ptrs, GridShape::ONE_SAMPLE_PER_THREAD).unwrap();
        assert_eq!((l.grid, l.block), ((192, 32, 1), (256, 1, 1)));
        let l = cp::plan_forward(&bench, DType::U8, DType::F32, ptrs, cap(5)).unwrap();
        assert_eq!(l.grid, (192, 5, 1));
        // One wave on 132 SMs: 1056 / 192 = 5 rows (7 or 6 samples per thread).
        let l = cp::plan_forward(&bench, DType::U8, DType::F32, ptrs, GridShape::for_sms(132)).unwrap();
        assert_eq!(l.grid, (192, 5, 1));
        // Rows are lowered to balance the samples per thread: 32 in 12 rows is 3 per thread,
        // 11 rows give the same.
        let l = cp::plan_forward(&bench, DType::U8, DType::F32, ptrs, cap(12)).unwrap();
        assert_eq!(l.grid, (192, 11, 1));
        let big = plan(Nchw, Cpq, false, false, [1, 16, 16], &[256, 3, 256, 256]);
        let l = cp::plan_forward(&big, DType::U8, DType::F32, ptrs, GridShape::for_sms(132)).unwrap();
        assert_eq!(l.grid, (192, 5, 1)); // 52 or 51 samples per thread
        let l = cp::plan_forward(&big, DType::U8, DType::F32, ptrs, GridShape::for_sms(1)).unwrap();
        assert_eq!(l.grid, (192, 1, 1)); // the sample alone is more than a wave
    }

    #[test]
    fn oversized_samples_are_unsupported_not_wrong() {
        // 2^31 + 2^16 pixels in one sample: too big for the kernels' 32-bit indices.
        let p = plan(Nchw, Cpq, false, false, [1, 1, 1], &[1, 1, 32769, 65536]);
        let ptrs = Pointers { src: 0, dst: 0, coef: 0 };
        let e = cp::plan_forward(&p, DType::U8, DType::F32, ptrs, GridShape::ONE_SAMPLE_PER_THREAD).unwrap_err();
        assert!(matches!(e, Error::Unsupported { family: Family::Patchify, .. }), "{e}");
        let e = cp::plan_inverse(&p, DType::F32, DType::U8, ptrs, GridShape::ONE_SAMPLE_PER_THREAD).unwrap_err();
        assert!(matches!(e, Error::Unsupported { family: Family::Unpatchify, .. }), "{e}");
        let e = cp::plan_forward(&p, DType::U8, DType::U8, ptrs, GridShape::ONE_SAMPLE_PER_THREAD).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    }

    #[test]
    fn gpu_new_without_a_device_is_an_error_not_a_panic() {
        // Whatever the machine, these return (no panic); without libcuda they say so.
        match Gpu::new(0) {
            Ok(g) => println!("GPU present: {:?}", g.name()),
            Err(e) => println!("no GPU: {e}"),
        }
        let e = Gpu::new(usize::MAX).unwrap_err();
        assert!(matches!(e, Error::NoCudaDriver | Error::NoDevice { .. } | Error::Driver(_)), "{e}");
        // SAFETY: only tries to dlopen libcuda by its usual names.
        let present = unsafe { cudarc::driver::sys::is_culib_present() };
        if !present {
            assert_eq!(Gpu::new(0).unwrap_err(), Error::NoCudaDriver);
            assert_eq!(vistok::cuda::device_count(), Err(Error::NoCudaDriver));
        }
    }

    // ---------------------------------------------------------------- on the GPU

    #[test]
    fn gpu_every_pair_on_small_shapes() {
        let Some(g) = gpu() else { return };
        for (i, (p, o)) in small_cases().iter().enumerate() {
            for k in 0..24 {
                check_pair(Device::Gpu(g), p, k, (i * 24 + k) as u64, *o);
                check_pair(Device::Gpu(g), p, k, (i * 24 + k) as u64, Opts { poison: !o.poison, ..*o });
            }
        }
    }

    #[test]
    fn gpu_bench_shapes() {
        let Some(g) = gpu() else { return };
        if super::common::simulated() {
            // Millions of elements: hours on the interpreter; the other device tests cover the paths.
            return super::common::say_skipped("bench shapes on tools/simcuda");
        }
        let image = plan(Nchw, Cpq, false, true, [1, 16, 16], &[32, 3, 256, 256]);
        check_pair(Device::Gpu(g), &image, 0, 1, PLAIN); // u8 -> f32
        check_pair(Device::Gpu(g), &image, 12, 2, PLAIN); // f32 -> u8
        let nhwc = plan(Nhwc, Cpq, false, true, [1, 16, 16], &[8, 512, 512, 3]);
        check_pair(Device::Gpu(g), &nhwc, 5, 3, PLAIN); // f32 -> bf16
        let video = plan(Nchw, Cpq, false, true, [2, 16, 16], &[4, 3, 16, 224, 224]);
        check_pair(Device::Gpu(g), &video, 0, 4, PLAIN);
        let mae = plan(Nhwc, Pqc, true, true, [1, 16, 16], &[4, 250, 250, 3]);
        check_pair(Device::Gpu(g), &mae, 0, 5, PLAIN);
        check_pair(Device::Gpu(g), &mae, 20, 6, PLAIN);
    }

    #[test]
    fn gpu_round_trip_is_exact() {
        let Some(g) = gpu() else { return };
        let cfg = PatchConfig::image(Nchw, 16, 16).normalize(Normalize::imagenet_u8());
        let p = Patchify::new(&cfg, &[4, 3, 64, 48]).unwrap();
        let k = PatchifyKernel::new(g, &p).unwrap();
        let image = data::<u8>(4 * 3 * 64 * 48, 9);
        let tokens: Vec<f32> = k.forward_host(&image).unwrap();
        let back: Vec<u8> = k.inverse_host(&tokens).unwrap();
        assert_eq!(back, image);
    }

    #[test]
    fn gpu_bad_input_is_a_typed_error() {
        let Some(g) = gpu() else { return };
        let p = plan(Nchw, Cpq, false, false, [1, 4, 4], &[2, 3, 8, 8]);
        let k = PatchifyKernel::new(g, &p).unwrap();
        let s = g.stream();
        let image = s.alloc_zeros::<u8>(2 * 3 * 64 - 1).unwrap();
        let mut tokens = s.alloc_zeros::<f32>(2 * 4 * 48).unwrap();
        let e = k.forward(s, &image, &mut tokens).unwrap_err();
        assert_eq!(e, Error::Length { family: Family::Patchify, what: "image", expected: 384, got: 383 });
        let image = s.alloc_zeros::<u8>(2 * 3 * 64).unwrap();
        let mut short = s.alloc_zeros::<f32>(2 * 4 * 48 + 1).unwrap();
        let e = k.forward(s, &image, &mut short).unwrap_err();
        assert_eq!(e, Error::Length { family: Family::Patchify, what: "tokens", expected: 384, got: 385 });
        let mut img = s.alloc_zeros::<u8>(2 * 3 * 64).unwrap();
        let e = k.inverse(s, &short, &mut img).unwrap_err();
        assert_eq!(e, Error::Length { family: Family::Unpatchify, what: "tokens", expected: 384, got: 385 });
        let e = k.forward_host::<u8, f32>(&[0u8; 3]).unwrap_err();
        assert!(matches!(e, Error::Length { family: Family::Patchify, what: "image", .. }));
        let e = k.inverse_host::<f32, u8>(&[0.0f32; 3]).unwrap_err();
        assert!(matches!(e, Error::Length { family: Family::Unpatchify, what: "tokens", .. }));
        // Nothing was launched: the buffers are still zero.
        assert!(s.clone_dtoh(&short).unwrap().iter().all(|&x| x == 0.0));
    }

    #[test]
    fn gpu_other_stream_and_module_cache() {
        let Some(g) = gpu() else { return };
        let p = plan(Nhwc, Pqc, false, true, [1, 2, 2], &[3, 4, 4, 4]);
        let k = PatchifyKernel::new(g, &p).unwrap();
        let stream = g.context().new_stream().unwrap();
        let image = data::<f16>(3 * 4 * 4 * 4, 11);
        let src = stream.clone_htod(&image).unwrap();
        let mut dst = stream.alloc_zeros::<f32>(3 * 4 * 16).unwrap();
        k.forward(&stream, &src, &mut dst).unwrap();
        let got = stream.clone_dtoh(&dst).unwrap();
        stream.synchronize().unwrap();
        let mut want = vec![0f32; 3 * 4 * 16];
        p.forward(
            Backend::Reference,
            View::new(&image, p.image_dims()).unwrap(),
            ViewMut::new(&mut want, &p.tokens_dims()).unwrap(),
        )
        .unwrap();
        assert_same("forward on a second stream", &got, &want);
        // A second Gpu on the same context reuses the loaded module.
        let g2 = Gpu::new(0).unwrap();
        let f1 = g.function(cp::MODULE, cp::PTX, "patchify_u8_f32").unwrap();
        let f2 = g2.function(cp::MODULE, cp::PTX, "patchify_u8_f32").unwrap();
        assert_eq!(f1.name(), f2.name());
        let e = g.function(cp::MODULE, cp::PTX, "patchify_u8_u8").unwrap_err();
        assert!(matches!(e, Error::MissingKernel { .. }), "{e}");
    }

    /// NaN inputs: NaN outputs where the reference has NaN (payloads may differ: the GPU
    /// returns its canonical NaN), bit-identical elsewhere; u8 images get 0.
    fn check_nan(dev: Device) {
        fn is_nan<T: Element>(x: T) -> bool {
            x.to_f32().is_nan()
        }
        fn same<T: Element>(got: &[T], want: &[T]) {
            for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                assert!(if is_nan(w) { is_nan(g) } else { bits(g) == bits(w) }, "element {i}: got {g:?}, want {w:?}");
            }
        }
        let p = plan(Nchw, Cpq, false, true, [1, 2, 4], &[1, 2, 4, 8]);
        let mut image = data::<f32>(64, 5);
        for i in (0..64).step_by(5) {
            image[i] = if i % 2 == 0 { f32::NAN } else { -f32::NAN };
        }
        let n = 64;
        macro_rules! fwd {
            ($o:ty) => {{
                let mut want = poisoned::<$o>(n, 0xFF);
                p.forward(
                    Backend::Reference,
                    View::new(&image, p.image_dims()).unwrap(),
                    ViewMut::new(&mut want, &p.tokens_dims()).unwrap(),
                )
                .unwrap();
                let got: Vec<$o> = match dev {
                    Device::Gpu(g) => {
                        let k = PatchifyKernel::new(g, &p).unwrap();
                        gpu_run(g, &image, n, PLAIN, |s, src, dst| k.forward(s, src, dst))
                    }
                    Device::Sim => sim_run::<f32, $o>(&p, true, &image, n, PLAIN),
                };
                same(&got, &want);
                got
            }};
        }
        let tokens: Vec<f32> = fwd!(f32);
        fwd!(f16);
        fwd!(bf16);
        let mut want = poisoned::<u8>(n, 0x77);
        p.inverse(
            Backend::Reference,
            View::new(&tokens, &p.tokens_dims()).unwrap(),
            ViewMut::new(&mut want, p.image_dims()).unwrap(),
        )
        .unwrap();
        let got: Vec<u8> = match dev {
            Device::Gpu(g) => {
                let k = PatchifyKernel::new(g, &p).unwrap();
                gpu_run(g, &tokens, n, PLAIN, |s, src, dst| k.inverse(s, src, dst))
            }
            Device::Sim => sim_run::<f32, u8>(&p, false, &tokens, n, PLAIN),
        };
        assert_eq!(got, want);
        assert!(image.iter().zip(&got).filter(|(x, _)| x.is_nan()).all(|(_, &y)| y == 0));
    }

    #[test]
    fn emulated_nan_inputs() {
        if simulator().is_some() {
            check_nan(Device::Sim);
        }
    }

    #[test]
    fn gpu_nan_inputs() {
        if let Some(g) = gpu() {
            check_nan(Device::Gpu(g));
        }
    }

    // ---------------------------------------------------------------- random shapes on the GPU

    #[derive(Debug, Clone)]
    struct Case {
        layout: Layout,
        order: PatchOrder,
        norm: bool,
        pad: bool,
        dims: Vec<usize>,
        patch: [usize; 3],
        pair: usize,
        seed: u64,
        opts: Opts,
    }

    /// One axis: patch p, whole patches g, and (when padding) a remainder r < p.
    fn axis(ps: &'static [usize], gmax: usize) -> impl Strategy<Value = (usize, usize, usize)> {
        (prop::sample::select(ps), 1..=gmax).prop_flat_map(|(p, g)| (Just(p), Just(g), 0..p))
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
            (1usize..=3, prop::sample::select(&[1usize, 2, 3, 4, 5, 8][..])),
            (axis(&[1, 2, 3], 3), axis(&[1, 2, 3, 4, 8, 16], 3), axis(&[1, 2, 3, 4, 5, 8, 16], 4)),
            (
                0usize..24,
                any::<u64>(),
                0usize..3,
                0usize..3,
                prop::sample::select(&[1u32, 2, MAX_GRID_Y][..]),
                any::<u8>(),
                any::<bool>(),
            ),
        )
            .prop_map(
                |((video, cl, pqc, norm, pad), (b, c), (at, ah, aw), (pair, seed, so, dso, gy, poison, flat))| {
                    let extent = |(p, g, r): (usize, usize, usize)| if pad { g * p + r } else { g * p };
                    let (pt, t) = if video { (at.0, extent(at)) } else { (1, 1) };
                    let (h, w) = (extent(ah), extent(aw));
                    let layout = if cl { Nhwc } else { Nchw };
                    let dims = match (video, layout) {
                        (false, Nchw) => vec![b, c, h, w],
                        (false, Nhwc) => vec![b, h, w, c],
                        (true, Nchw) => vec![b, c, t, h, w],
                        (true, Nhwc) => vec![b, t, h, w, c],
                    };
                    Case {
                        layout,
                        order: if pqc { Pqc } else { Cpq },
                        norm,
                        pad,
                        dims,
                        patch: [pt, ah.0, aw.0],
                        pair,
                        seed,
                        opts: Opts {
                            src_offset: so,
                            dst_offset: dso,
                            max_grid_y: gy,
                            poison,
                            mapping: if flat { Mapping::Flat } else { Mapping::RowRuns },
                        },
                    }
                },
            )
    }

    fn runner(cases: u32) -> proptest::test_runner::TestRunner {
        let cases = super::common::sim_cap(cases as usize, 6) as u32; // tools/simcuda is slow
        let config = ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() };
        let rng = proptest::test_runner::TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha);
        proptest::test_runner::TestRunner::new_with_rng(config, rng)
    }

    #[test]
    fn random_shapes_build_valid_launches() {
        // The GPU property test's cases, planned on the host: every case must be a valid plan
        // with launches for its pairs (so the one GPU run cannot fail on the test itself).
        runner(3000)
            .run(&case(), |case| {
                let p = plan(case.layout, case.order, case.pad, case.norm, case.patch, &case.dims);
                let ptrs = Pointers {
                    src: 0x100 + case.opts.src_offset as u64,
                    dst: 0x200 + case.opts.dst_offset as u64,
                    coef: 0x300,
                };
                for k in [case.pair, (case.pair + 12) % 24] {
                    let name = cp::KERNEL_NAMES[k];
                    let (fam, rest) = name.split_once('_').unwrap();
                    let (i, o) = rest.split_once('_').unwrap();
                    let dt = |s: &str| {
                        [DType::U8, DType::F32, DType::F16, DType::BF16].into_iter().find(|d| d.name() == s).unwrap()
                    };
                    let n = if fam == "patchify" {
                        cp::plan_forward(&p, dt(i), dt(o), ptrs, cap(case.opts.max_grid_y)).unwrap().name
                    } else {
                        cp::plan_inverse(&p, dt(i), dt(o), ptrs, cap(case.opts.max_grid_y)).unwrap().name
                    };
                    prop_assert_eq!(n, name);
                }
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn emulated_random_shapes() {
        if simulator().is_none() {
            return;
        }
        // A few of the GPU property test's cases on the emulator (small ones: it is slow).
        let mut runner = runner(200);
        let mut ran = 0;
        for _ in 0..200 {
            let case = proptest::strategy::ValueTree::current(&case().new_tree(&mut runner).unwrap());
            let p = plan(case.layout, case.order, case.pad, case.norm, case.patch, &case.dims);
            let n: usize = p.image_dims().iter().product::<usize>().max(p.tokens_dims().iter().product());
            if n > 1500 {
                continue;
            }
            check_pair(Device::Sim, &p, case.pair, case.seed, case.opts);
            ran += 1;
            if ran == 12 {
                break;
            }
        }
        assert!(ran >= 6, "too few small cases");
    }

    #[test]
    fn gpu_random_shapes_match_reference() {
        // A plain test driving proptest's runner, so that a missing GPU is a skip (or, with
        // VISTOK_REQUIRE_GPU=1, one failure) rather than a "failing case" to shrink and
        // persist; deterministic, so a failure on the GPU reproduces from the same binary.
        let Some(g) = gpu() else { return };
        let result = runner(300).run(&case(), |case| {
            let p = plan(case.layout, case.order, case.pad, case.norm, case.patch, &case.dims);
            check_pair(Device::Gpu(g), &p, case.pair, case.seed, case.opts);
            // And the mirror direction with the same shape.
            check_pair(Device::Gpu(g), &p, (case.pair + 12) % 24, case.seed ^ 1, case.opts);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}
