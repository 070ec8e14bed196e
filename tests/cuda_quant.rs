//! The CUDA LFQ / BSQ and FSQ backends against the cpu backend, bit for bit.
//!
//! One set of checks runs on two devices: the GPU (skipped, with a message, when there is
//! none, unless `VISTOK_REQUIRE_GPU=1`) and `kernels/ptx_sim.py`, a strict PTX interpreter that
//! runs the same PTX with the same host-built launches on the CPU (skipped when python3 is
//! missing; all emulated launches of a test share one interpreter process). Outputs are
//! poisoned before every launch (the interpreter also fails on any output byte left unwritten)
//! and compared bitwise with `Backend::Cpu` (itself bit-identical to the reference for LFQ and
//! to the reference up to counted near-ties for FSQ, see tests/lfq.rs and tests/fsq.rs). The
//! status word is checked too: clean inputs report nothing, NaN / bad ids report the element
//! the cpu backend names.

mod common;

#[cfg(not(feature = "cuda"))]
#[test]
fn skipped_without_cuda_feature() {
    common::skip_without_cuda_feature();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::common::gpu::{gpu, simulator};
    use super::common::{poison, Rng};
    use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    use proptest::prelude::*;
    use vistok::cuda::fsq::{self as cf, FsqKernel};
    use vistok::cuda::lfq::{self as cl, DeferredCheck, LfqKernel};
    use vistok::cuda::Gpu;
    use vistok::{bf16, f16, Backend, BitOrder, DType, Error, Family, Float, Fsq, Lfq, LfqConfig, View, ViewMut};

    // ---------------------------------------------------------------- devices

    // ---------------------------------------------------------------- the emulator

    struct SimBuf {
        name: &'static str,
        addr: u64,
        data: Vec<u8>,
        writable: bool,
        must_write: bool,
    }

    struct SimJob {
        module: &'static str,
        ptx: &'static str,
        kernel: String,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        params: Vec<u8>,
        bufs: Vec<SimBuf>,
    }

    type Verify = Box<dyn FnOnce(&[Vec<u8>])>;

    /// Emulated launches queued to run in one interpreter process; each verifies its own
    /// buffers (all of them, in order) afterwards.
    #[derive(Default)]
    struct Batch {
        jobs: Vec<(SimJob, Verify)>,
    }

    const SRC: u64 = 0x1000_0000;
    const DST: u64 = 0x8000_0000;
    const STATUS: u64 = 0x4000;
    const TABLE: u64 = 0x6000;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    impl Batch {
        fn add(&mut self, job: SimJob, verify: impl FnOnce(&[Vec<u8>]) + 'static) {
            self.jobs.push((job, Box::new(verify)));
        }

        fn run(self) {
            if self.jobs.is_empty() {
                return;
            }
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "vistok-quant-sim-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let mut entries = vec![];
            for (j, (job, _)) in self.jobs.iter().enumerate() {
                std::fs::write(dir.join(format!("{}.ptx", job.module)), job.ptx).unwrap();
                let mut bufs = vec![];
                for b in &job.bufs {
                    let file = format!("j{j}-{}.bin", b.name);
                    std::fs::write(dir.join(&file), &b.data).unwrap();
                    bufs.push(format!(
                        r#"{{"name": "{}", "addr": {}, "file": "{file}", "writable": {}, "must_write": {}, "out": "{file}.out"}}"#,
                        b.name, b.addr, b.writable, b.must_write
                    ));
                }
                entries.push(format!(
                    r#"{{"ptx": "{}.ptx", "kernel": "{}", "grid": [{}, {}, {}], "block": [{}, {}, {}], "params": "{}", "buffers": [{}]}}"#,
                    job.module,
                    job.kernel,
                    job.grid.0,
                    job.grid.1,
                    job.grid.2,
                    job.block.0,
                    job.block.1,
                    job.block.2,
                    hex(&job.params),
                    bufs.join(", ")
                ));
            }
            std::fs::write(dir.join("job.json"), format!(r#"{{"jobs": [{}]}}"#, entries.join(",\n"))).unwrap();
            let sim = simulator().expect("callers check simulator() first");
            let out = Command::new("python3").arg(sim).arg(dir.join("job.json")).output().unwrap();
            assert!(out.status.success(), "ptx_sim failed:\n{}", String::from_utf8_lossy(&out.stderr));
            for (j, (job, verify)) in self.jobs.into_iter().enumerate() {
                let outs: Vec<Vec<u8>> = job
                    .bufs
                    .iter()
                    .map(|b| std::fs::read(dir.join(format!("j{j}-{}.bin.out", b.name))).unwrap())
                    .collect();
                verify(&outs);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    enum Dev<'a> {
        Gpu(&'static Gpu),
        Sim(&'a mut Batch),
    }

    // ---------------------------------------------------------------- data and comparisons

    /// Buffer element types of these kernels: u32 ids and the float dtypes.
    trait Val: bytemuck::Pod + std::fmt::Debug {
        /// The bit pattern, for exact comparison.
        fn bits(self) -> u32 {
            bytemuck::bytes_of(&self).iter().rev().fold(0, |acc, &b| (acc << 8) | u32::from(b))
        }
    }
    impl Val for u32 {}
    impl Val for f32 {}
    impl Val for f16 {}
    impl Val for bf16 {}

    fn from_bytes<T: Val>(bytes: &[u8]) -> Vec<T> {
        let mut v = vec![<T as bytemuck::Zeroable>::zeroed(); bytes.len() / std::mem::size_of::<T>()];
        bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
        v
    }

    fn assert_same<T: Val>(what: &str, got: &[T], want: &[T]) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        if let Some(i) = (0..got.len()).find(|&i| got[i].bits() != want[i].bits()) {
            let n = (0..got.len()).filter(|&i| got[i].bits() != want[i].bits()).count();
            panic!("{what}: {n} of {} differ; first at {i}: got {:?}, want {:?}", got.len(), got[i], want[i]);
        }
    }

    /// `(family, location)` of a NaN error: the cuda backend's `NonFinite { what }`, or the cpu
    /// backend's message up to " is NaN".
    fn nan_location(e: &Error) -> (Family, String) {
        match e {
            Error::NonFinite { family, what } => (*family, what.clone()),
            Error::Invalid { family, msg } if msg.ends_with(" is NaN") => {
                (*family, msg.trim_end_matches(" is NaN").to_string())
            }
            other => panic!("not a NaN error: {other}"),
        }
    }

    /// The device result (outputs, status) against the cpu's: identical outputs when the cpu
    /// succeeds; when it fails, the same error (NaN: the same element).
    fn compare<O: Val>(what: &str, got: (Vec<O>, vistok::Result<()>), want: vistok::Result<Vec<O>>) {
        match (got, want) {
            ((out, Ok(())), Ok(w)) => assert_same(what, &out, &w),
            ((_, Err(g)), Err(w)) => {
                if matches!(g, Error::NonFinite { .. }) {
                    assert_eq!(nan_location(&g), nan_location(&w), "{what}");
                } else {
                    assert_eq!(g, w, "{what}");
                }
            }
            ((_, g), w) => panic!("{what}: device {g:?}, cpu {:?}", w.err()),
        }
    }

    /// Values that stress the sign test: both zeros, subnormals, huge values, infinities.
    fn lfq_data<T: Float>(n: usize, seed: u64) -> Vec<T> {
        let mut r = Rng(seed);
        (0..n)
            .map(|_| {
                T::from_f32(match r.next_u64() % 14 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => 1e-40,
                    3 => -1e-40,
                    4 => 6e-8,
                    5 => -6e-8,
                    6 => 1e30,
                    7 => f32::INFINITY,
                    8 => f32::NEG_INFINITY,
                    _ => r.uniform(-2.0, 2.0),
                })
            })
            .collect()
    }

    /// `z` whose f64 pre-rounding value is exactly `k + 0.5` for levels `l`.
    fn boundary_z(l: u32, k: f64) -> Option<f64> {
        let half_l = (l - 1) as f64 * 1.001 / 2.0;
        let offset = if l.is_multiple_of(2) { 0.5 } else { 0.0 };
        let y = (k + 0.5 + offset) / half_l;
        (y.abs() < 1.0).then(|| y.atanh() - (offset / half_l).atanh())
    }

    /// FSQ values: ordinary, planted within an ulp of rounding boundaries, saturating, ±0,
    /// subnormal.
    fn fsq_value(r: &mut Rng, l: u32) -> f32 {
        match r.next_u64() % 12 {
            0 => 0.0,
            1 => -0.0,
            2 => {
                f32::from_bits((r.next_u64() % 0x7f_ffff) as u32 + 1)
                    * if r.next_u64().is_multiple_of(2) { 1.0 } else { -1.0 }
            }
            3 => [1e30, -1e30, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, 20.0, -20.0][(r.next_u64() % 7) as usize],
            4..=6 => {
                let k = (r.next_u64() % l as u64) as f64 - (l / 2) as f64 - 1.0;
                match boundary_z(l, k) {
                    Some(z) if z as f32 != 0.0 => {
                        let nudge = (r.next_u64() % 3) as i32 - 1;
                        f32::from_bits(((z as f32).to_bits() as i32 + nudge) as u32)
                    }
                    _ => r.uniform(-3.0, 3.0),
                }
            }
            _ => r.uniform(-4.0, 4.0),
        }
    }

    fn fsq_data<T: Float>(fsq: &Fsq, n: usize, seed: u64) -> Vec<T> {
        let mut r = Rng(seed);
        (0..n).flat_map(|_| fsq.levels().to_vec()).map(|l| T::from_f32(fsq_value(&mut r, l))).collect()
    }

    // ---------------------------------------------------------------- cpu oracles

    fn cpu_lfq_encode<T: Float>(lfq: &Lfq, z: &[T]) -> vistok::Result<Vec<u32>> {
        let n = z.len() / lfq.channels();
        let mut ids = vec![0xDEAD_BEEF; n * lfq.groups()];
        lfq.encode(Backend::Cpu, View::new(z, &lfq.codes_dims(n))?, ViewMut::new(&mut ids, &lfq.ids_dims(n))?)?;
        Ok(ids)
    }

    fn cpu_lfq_decode<O: Float>(lfq: &Lfq, ids: &[u32]) -> vistok::Result<Vec<O>> {
        let n = ids.len() / lfq.groups();
        let mut codes = vec![poison::<O>(); n * lfq.channels()];
        lfq.decode(Backend::Cpu, View::new(ids, &lfq.ids_dims(n))?, ViewMut::new(&mut codes, &lfq.codes_dims(n))?)?;
        Ok(codes)
    }

    fn cpu_fsq_encode<T: Float>(fsq: &Fsq, z: &[T]) -> vistok::Result<Vec<u32>> {
        let n = z.len() / fsq.dim();
        let mut ids = vec![0xDEAD_BEEF; n];
        fsq.encode(Backend::Cpu, View::new(z, &[n, fsq.dim()])?, ViewMut::new(&mut ids, &[n])?)?;
        Ok(ids)
    }

    fn cpu_fsq_decode<O: Float>(fsq: &Fsq, ids: &[u32]) -> vistok::Result<Vec<O>> {
        let n = ids.len();
        let mut codes = vec![poison::<O>(); n * fsq.dim()];
        fsq.decode(Backend::Cpu, View::new(ids, &[n])?, ViewMut::new(&mut codes, &[n, fsq.dim()])?)?;
        Ok(codes)
    }

    // ---------------------------------------------------------------- one launch, either device

    /// How a launch is set up: the grid cap (small caps exercise the grid-stride loop), the
    /// input's element offset from an aligned base, whether the GPU path uses the deferred
    /// check.
    #[derive(Clone, Copy, Debug)]
    struct Opts {
        max_blocks: u32,
        offset: usize,
        deferred: bool,
    }

    const PLAIN: Opts = Opts { max_blocks: 1 << 20, offset: 0, deferred: false };

    type Stream = std::sync::Arc<cudarc::driver::CudaStream>;
    type Src<'a, I> = cudarc::driver::CudaView<'a, I>;
    type Dst<'a, O> = cudarc::driver::CudaViewMut<'a, O>;

    /// Runs `launch` on the GPU: the input `offset` elements into its buffer, the output poisoned
    /// with 16 poisoned guard elements after it, which must survive. Returns the output and
    /// the launch's result.
    fn gpu_run<I, O>(
        gpu: &Gpu,
        input: &[I],
        out_len: usize,
        o: Opts,
        launch: impl FnOnce(&Stream, &Src<'_, I>, &mut Dst<'_, O>) -> vistok::Result<()>,
    ) -> (Vec<O>, vistok::Result<()>)
    where
        I: Val + DeviceRepr,
        O: Val + DeviceRepr,
    {
        let stream = gpu.stream();
        // Poison around the input too; never an empty allocation.
        let pad = from_bytes::<I>(&vec![0x5A; (o.offset + 1) * std::mem::size_of::<I>()]);
        let mut host_in = pad[..o.offset].to_vec();
        host_in.extend_from_slice(input);
        host_in.push(pad[o.offset]);
        let src_all = stream.clone_htod(&host_in).unwrap();
        let src = src_all.slice(o.offset..o.offset + input.len());
        let guard = 16;
        let poisoned = from_bytes::<O>(&vec![0xA7; (out_len + guard) * std::mem::size_of::<O>()]);
        let mut dst = stream.clone_htod(&poisoned).unwrap();
        let r = {
            let mut view = dst.slice_mut(..out_len);
            launch(stream, &src, &mut view)
        };
        let all: Vec<O> = stream.clone_dtoh(&dst).unwrap();
        gpu.synchronize().unwrap();
        assert!(all[out_len..].iter().all(|&x| x.bits() == poisoned[0].bits()), "a kernel wrote past its output");
        (all[..out_len].to_vec(), r)
    }

    fn sim_bufs<I: Val, O: Val>(input: &[I], out_len: usize, o: Opts) -> (Vec<SimBuf>, u64) {
        let src = SRC + (o.offset * std::mem::size_of::<I>()) as u64;
        let bufs = vec![
            SimBuf {
                name: "src",
                addr: src,
                data: bytemuck::cast_slice(input).to_vec(),
                writable: false,
                must_write: false,
            },
            SimBuf {
                name: "dst",
                addr: DST,
                data: vec![0xA7; out_len * std::mem::size_of::<O>()],
                writable: true,
                must_write: true,
            },
            SimBuf { name: "status", addr: STATUS, data: vec![0; 8], writable: true, must_write: false },
        ];
        (bufs, src)
    }

    fn status_word(b: &[u8]) -> u64 {
        u64::from_le_bytes(b.try_into().unwrap())
    }

    fn lfq_encode_check<T: Float + Val + DeviceRepr>(dev: &mut Dev<'_>, lfq: &Lfq, z: Vec<T>, o: Opts) {
        let want = cpu_lfq_encode(lfq, &z);
        let m = z.len() / lfq.channels() * lfq.groups();
        let what = format!("lfq_encode_{} {:?} N·G = {m} {o:?}", T::DTYPE.name(), lfq.config());
        match dev {
            Dev::Gpu(g) => {
                let k = LfqKernel::new(g, lfq).unwrap().with_max_blocks(o.max_blocks);
                let got = gpu_run(g, &z, m, o, |s, src, dst| {
                    if o.deferred {
                        let mut check = DeferredCheck::new(s)?;
                        k.encode_deferred(s, src, dst, &mut check)?;
                        check.result()
                    } else {
                        k.encode(s, src, dst)
                    }
                });
                compare(&what, got, want);
            }
            Dev::Sim(batch) => {
                let (bufs, src) = sim_bufs::<T, u32>(&z, m, o);
                let l = cl::plan_encode(lfq, T::DTYPE, m, cl::Pointers { src, dst: DST, status: STATUS }, o.max_blocks)
                    .unwrap();
                let lfq = lfq.clone();
                let job = SimJob {
                    module: cl::MODULE,
                    ptx: cl::PTX,
                    kernel: l.name,
                    grid: l.grid,
                    block: l.block,
                    params: bytemuck::bytes_of(&l.params).to_vec(),
                    bufs,
                };
                batch.add(job, move |outs| {
                    let got = (from_bytes::<u32>(&outs[1]), cl::encode_status(&lfq, status_word(&outs[2])));
                    compare(&what, got, want);
                });
            }
        }
    }

    fn lfq_decode_check<O: Float + Val + DeviceRepr + ValidAsZeroBits>(
        dev: &mut Dev<'_>,
        lfq: &Lfq,
        ids: Vec<u32>,
        o: Opts,
    ) {
        let want = cpu_lfq_decode::<O>(lfq, &ids);
        let len = ids.len() * lfq.bits() as usize;
        let what = format!("lfq_decode_{} {:?} M = {} {o:?}", O::DTYPE.name(), lfq.config(), ids.len());
        match dev {
            Dev::Gpu(g) => {
                let k = LfqKernel::new(g, lfq).unwrap().with_max_blocks(o.max_blocks);
                let got = gpu_run(g, &ids, len, o, |s, src, dst| {
                    if o.deferred {
                        let mut check = DeferredCheck::new(s)?;
                        k.decode_deferred(s, src, dst, &mut check)?;
                        check.result()
                    } else {
                        k.decode(s, src, dst)
                    }
                });
                compare(&what, got, want);
            }
            Dev::Sim(batch) => {
                let (bufs, src) = sim_bufs::<u32, O>(&ids, len, o);
                let ptrs = cl::Pointers { src, dst: DST, status: STATUS };
                let l = cl::plan_decode(lfq, O::DTYPE, ids.len(), ptrs, o.max_blocks).unwrap();
                let lfq = lfq.clone();
                let job = SimJob {
                    module: cl::MODULE,
                    ptx: cl::PTX,
                    kernel: l.name,
                    grid: l.grid,
                    block: l.block,
                    params: bytemuck::bytes_of(&l.params).to_vec(),
                    bufs,
                };
                batch.add(job, move |outs| {
                    let got = (from_bytes::<O>(&outs[1]), cl::decode_status(&lfq, status_word(&outs[2])));
                    compare(&what, got, want);
                });
            }
        }
    }

    fn fsq_sim_job<P: bytemuck::Pod>(
        name: String,
        grid: (u32, u32, u32),
        params: &P,
        mut bufs: Vec<SimBuf>,
        fsq: &Fsq,
    ) -> SimJob {
        bufs.push(SimBuf {
            name: "table",
            addr: TABLE,
            data: bytemuck::cast_slice(&cf::table(fsq)).to_vec(),
            writable: false,
            must_write: false,
        });
        SimJob {
            module: cf::MODULE,
            ptx: cf::PTX,
            kernel: name,
            grid,
            block: (cf::BLOCK, 1, 1),
            params: bytemuck::bytes_of(params).to_vec(),
            bufs,
        }
    }

    fn fsq_encode_check<T: Float + Val + DeviceRepr>(dev: &mut Dev<'_>, fsq: &Fsq, z: Vec<T>, o: Opts) {
        let want = cpu_fsq_encode(fsq, &z);
        let n = z.len() / fsq.dim();
        let what = format!("fsq_encode_{} {:?} N = {n} {o:?}", T::DTYPE.name(), fsq.levels());
        match dev {
            Dev::Gpu(g) => {
                let k = FsqKernel::new(g, fsq).unwrap().with_max_blocks(o.max_blocks);
                let got = gpu_run(g, &z, n, o, |s, src, dst| {
                    if o.deferred {
                        let mut check = DeferredCheck::new(s)?;
                        k.encode_deferred(s, src, dst, &mut check)?;
                        check.result()
                    } else {
                        k.encode(s, src, dst)
                    }
                });
                compare(&what, got, want);
            }
            Dev::Sim(batch) => {
                let (bufs, src) = sim_bufs::<T, u32>(&z, n, o);
                let ptrs = cf::Pointers { src, dst: DST, status: STATUS, table: TABLE };
                let l = cf::plan_encode(fsq, T::DTYPE, n, ptrs, o.max_blocks).unwrap();
                let job = fsq_sim_job(l.name, l.grid, &l.params, bufs, fsq);
                let fsq = fsq.clone();
                batch.add(job, move |outs| {
                    let got = (from_bytes::<u32>(&outs[1]), cf::encode_status(&fsq, status_word(&outs[2])));
                    compare(&what, got, want);
                });
            }
        }
    }

    fn fsq_decode_check<O: Float + Val + DeviceRepr + ValidAsZeroBits>(
        dev: &mut Dev<'_>,
        fsq: &Fsq,
        ids: Vec<u32>,
        o: Opts,
    ) {
        let want = cpu_fsq_decode::<O>(fsq, &ids);
        let len = ids.len() * fsq.dim();
        let what = format!("fsq_decode_{} {:?} N = {} {o:?}", O::DTYPE.name(), fsq.levels(), ids.len());
        match dev {
            Dev::Gpu(g) => {
                let k = FsqKernel::new(g, fsq).unwrap().with_max_blocks(o.max_blocks);
                let got = gpu_run(g, &ids, len, o, |s, src, dst| {
                    if o.deferred {
                        let mut check = DeferredCheck::new(s)?;
                        k.decode_deferred(s, src, dst, &mut check)?;
                        check.result()
                    } else {
                        k.decode(s, src, dst)
                    }
                });
                compare(&what, got, want);
            }
            Dev::Sim(batch) => {
                let (bufs, src) = sim_bufs::<u32, O>(&ids, len, o);
                let ptrs = cf::Pointers { src, dst: DST, status: STATUS, table: TABLE };
                let l = cf::plan_decode(fsq, O::DTYPE, ids.len(), ptrs, o.max_blocks).unwrap();
                let job = fsq_sim_job(l.name, l.grid, &l.params, bufs, fsq);
                let fsq = fsq.clone();
                batch.add(job, move |outs| {
                    let got = (from_bytes::<O>(&outs[1]), cf::decode_status(&fsq, status_word(&outs[2])));
                    compare(&what, got, want);
                });
            }
        }
    }

    // ---------------------------------------------------------------- cases, by dtype index

    fn lfq_encode_t(dev: &mut Dev<'_>, t: usize, lfq: &Lfq, n: usize, seed: u64, o: Opts) {
        let len = n * lfq.channels();
        match t {
            0 => lfq_encode_check(dev, lfq, lfq_data::<f32>(len, seed), o),
            1 => lfq_encode_check(dev, lfq, lfq_data::<f16>(len, seed), o),
            _ => lfq_encode_check(dev, lfq, lfq_data::<bf16>(len, seed), o),
        }
    }

    fn random_ids(n: usize, bits: u32, seed: u64) -> Vec<u32> {
        let mut r = Rng(seed);
        (0..n).map(|_| (r.next_u64() as u32) >> (32 - bits)).collect()
    }

    fn lfq_decode_t(dev: &mut Dev<'_>, t: usize, lfq: &Lfq, ids: Vec<u32>, o: Opts) {
        match t {
            0 => lfq_decode_check::<f32>(dev, lfq, ids, o),
            1 => lfq_decode_check::<f16>(dev, lfq, ids, o),
            _ => lfq_decode_check::<bf16>(dev, lfq, ids, o),
        }
    }

    fn fsq_encode_t(dev: &mut Dev<'_>, t: usize, fsq: &Fsq, n: usize, seed: u64, o: Opts) {
        match t {
            0 => fsq_encode_check(dev, fsq, fsq_data::<f32>(fsq, n, seed), o),
            1 => fsq_encode_check(dev, fsq, fsq_data::<f16>(fsq, n, seed), o),
            _ => fsq_encode_check(dev, fsq, fsq_data::<bf16>(fsq, n, seed), o),
        }
    }

    fn fsq_decode_t(dev: &mut Dev<'_>, t: usize, fsq: &Fsq, ids: Vec<u32>, o: Opts) {
        match t {
            0 => fsq_decode_check::<f32>(dev, fsq, ids, o),
            1 => fsq_decode_check::<f16>(dev, fsq, ids, o),
            _ => fsq_decode_check::<bf16>(dev, fsq, ids, o),
        }
    }

    fn lfq(g: usize, d: u32, order: BitOrder, spherical: bool) -> Lfq {
        Lfq::new(&LfqConfig::new(g, d, order).spherical(spherical).scale(if spherical { 1.0 } else { 0.75 })).unwrap()
    }

    /// Small LFQ shapes covering: d = 1, 32, odd, ≥ 16 (two word blocks), every word block
    /// size; M below, at and above one warp step; several steps per warp (grid cap 1);
    /// unaligned inputs; both orders; BSQ codes.
    fn lfq_cases(dev: &mut Dev<'_>) {
        use BitOrder::{LsbFirst as Lsb, MsbFirst as Msb};
        #[rustfmt::skip]
        let cases: [(usize, u32, BitOrder, usize, u32, usize); 14] = [
            // (G, d, order, N, max_blocks, offset)
            (1, 18, Msb, 40, 1 << 20, 0),
            (2, 9, Lsb, 20, 1 << 20, 1),
            (4, 8, Lsb, 17, 1 << 20, 0),
            (1, 32, Msb, 33, 1 << 20, 0),
            (1, 31, Lsb, 7, 1 << 20, 3),
            (3, 1, Msb, 300, 1, 0),
            (1, 17, Lsb, 64, 1 << 20, 0),
            (2, 16, Msb, 16, 1 << 20, 0),
            (1, 15, Msb, 1, 1 << 20, 0),
            (5, 3, Lsb, 77, 1 << 20, 0),
            (1, 2, Msb, 290, 1, 1),
            (1, 7, Lsb, 32, 1 << 20, 0),
            (2, 5, Msb, 3, 1 << 20, 0),
            (1, 12, Lsb, 96, 2, 0),
        ];
        for (i, &(g, d, order, n, max_blocks, offset)) in cases.iter().enumerate() {
            let p = lfq(g, d, order, i % 3 == 1);
            let o = Opts { max_blocks, offset, deferred: i % 2 == 1 };
            lfq_encode_t(dev, i % 3, &p, n, i as u64, o);
            lfq_decode_t(dev, (i + 1) % 3, &p, random_ids(n * g, d, 100 + i as u64), o);
        }
    }

    /// Small FSQ codebooks: odd and even levels, a level of 1000 (clamp), one dimension, 32
    /// dimensions of 2, a 2^32 codebook; grid caps that make threads loop.
    fn fsq_cases(dev: &mut Dev<'_>) {
        #[rustfmt::skip]
        let cases: [(&[u32], usize, u32, usize); 8] = [
            // (levels, N, max_blocks, offset)
            (&[8, 5, 5, 5], 40, 1 << 20, 0),
            (&[8, 8, 8, 5, 5, 5], 24, 1 << 20, 1),
            (&[3], 300, 1, 0),
            (&[2; 32], 5, 1 << 20, 0),
            (&[1000, 7, 16], 30, 1 << 20, 0),
            (&[1 << 16, 1 << 16], 12, 1 << 20, 3),
            (&[4, 9, 2, 11], 33, 1 << 20, 0),
            (&[6, 6], 270, 1, 0),
        ];
        for (i, &(levels, n, max_blocks, offset)) in cases.iter().enumerate() {
            let fsq = Fsq::new(levels).unwrap();
            let o = Opts { max_blocks, offset, deferred: i % 2 == 0 };
            fsq_encode_t(dev, i % 3, &fsq, n, i as u64, o);
            let size = fsq.codebook_size();
            let mut r = Rng(50 + i as u64);
            let ids = (0..n).map(|_| (r.next_u64() % size) as u32).collect();
            fsq_decode_t(dev, (i + 2) % 3, &fsq, ids, o);
        }
    }

    /// NaN in z (first NaN in a later step than a second one; in the tail step; in the
    /// first element) and ids out of range: the status word names what the cpu names.
    fn error_cases(dev: &mut Dev<'_>) {
        // 300 tokens of 18 bits, one block of 8 warps: warp 0 meets step 8's NaN before warp 1
        // meets step 1's, which has the lower index and must win.
        let p = lfq(1, 18, BitOrder::MsbFirst, false);
        let step = 32 * 18;
        let planted =
            [(300, vec![8 * step + 5, step + 100]), (40, vec![40 * 18 - 1]), (40, vec![0, 5]), (40, vec![18 * 33 + 2])];
        for (k, (n, nans)) in planted.into_iter().enumerate() {
            let mut z = lfq_data::<f32>(n * 18, k as u64);
            for &i in &nans {
                z[i] = if k % 2 == 0 { f32::NAN } else { -f32::NAN };
            }
            let o = Opts { max_blocks: if k == 0 { 1 } else { 1 << 20 }, offset: 0, deferred: k % 2 == 1 };
            lfq_encode_check(dev, &p, z.clone(), o);
            let zh: Vec<f16> = z.iter().map(|&x| f16::from_f32(x)).collect();
            lfq_encode_check(dev, &p, zh, o);
            let zb: Vec<bf16> = z.iter().map(|&x| bf16::from_f32(x)).collect();
            lfq_encode_check(dev, &p, zb, o);
        }
        let p = lfq(2, 5, BitOrder::LsbFirst, false);
        let mut ids = random_ids(80, 5, 9);
        ids[71] = 1 << 5;
        ids[45] = u32::MAX;
        lfq_decode_check::<f32>(dev, &p, ids.clone(), Opts { max_blocks: 1, ..PLAIN });
        lfq_decode_check::<bf16>(dev, &p, ids, PLAIN);

        // FSQ, 300 tokens on one block: thread 5 meets token 261 (a later index) before
        // thread 100 meets token 100, which must win.
        let fsq = Fsq::new(&[8, 5, 5, 5]).unwrap();
        let one_block = Opts { max_blocks: 1, ..PLAIN };
        let mut z = fsq_data::<f32>(&fsq, 300, 3);
        z[4 * 261 + 1] = f32::NAN;
        z[4 * 100 + 3] = f32::NAN;
        fsq_encode_check(dev, &fsq, z.clone(), one_block);
        let zh: Vec<f16> = z.iter().map(|&x| f16::from_f32(x)).collect();
        fsq_encode_check(dev, &fsq, zh, Opts { deferred: true, ..one_block });
        let mut ids: Vec<u32> = (0..300).map(|i| i * 3).collect();
        ids[261] = 1000;
        ids[100] = u32::MAX;
        fsq_decode_check::<f16>(dev, &fsq, ids, one_block);
    }

    /// Every id of small codebooks: LFQ decode then encode gives the ids back (the device
    /// equals the cpu, which equals the ids); FSQ decodes every id, and its codes encode, as
    /// on the cpu.
    fn round_trips(dev: &mut Dev<'_>) {
        let p = lfq(1, 7, BitOrder::MsbFirst, true);
        let ids: Vec<u32> = (0..128).collect();
        lfq_decode_check::<f32>(dev, &p, ids.clone(), PLAIN);
        let codes = cpu_lfq_decode::<bf16>(&p, &ids).unwrap();
        assert_eq!(cpu_lfq_encode(&p, &codes).unwrap(), ids);
        lfq_encode_check(dev, &p, codes, PLAIN);
        let fsq = Fsq::new(&[5, 4, 3]).unwrap();
        let ids: Vec<u32> = (0..60).collect();
        fsq_decode_check::<f32>(dev, &fsq, ids.clone(), PLAIN);
        // (FSQ's encode is not the inverse of its decode: codes ±1 sit at the clamp, not on
        // level centres; the codes are still a good input to compare cpu and device.)
        let codes = cpu_fsq_decode::<f16>(&fsq, &ids).unwrap();
        fsq_encode_check(dev, &fsq, codes, PLAIN);
    }

    // ---------------------------------------------------------------- emulated (no GPU needed)

    fn emulate(f: impl FnOnce(&mut Dev<'_>)) {
        if simulator().is_none() {
            return;
        }
        let mut batch = Batch::default();
        f(&mut Dev::Sim(&mut batch));
        batch.run();
    }

    #[test]
    fn emulated_lfq_small_shapes() {
        emulate(lfq_cases);
    }

    #[test]
    fn emulated_fsq_small_shapes() {
        emulate(fsq_cases);
    }

    #[test]
    fn emulated_nan_and_bad_ids() {
        emulate(error_cases);
    }

    #[test]
    fn emulated_round_trips() {
        emulate(round_trips);
    }

    #[test]
    fn emulated_every_dtype_and_order() {
        // Each kernel entry with both bit orders, on a shape with a tail step.
        emulate(|dev| {
            for t in 0..3 {
                for order in [BitOrder::MsbFirst, BitOrder::LsbFirst] {
                    let p = lfq(2, 6, order, false);
                    lfq_encode_t(dev, t, &p, 19, t as u64, PLAIN);
                    lfq_decode_t(dev, t, &p, random_ids(38, 6, 7 + t as u64), PLAIN);
                }
                let fsq = Fsq::new(&[7, 4]).unwrap();
                fsq_encode_t(dev, t, &fsq, 37, t as u64, PLAIN);
                fsq_decode_t(dev, t, &fsq, (0..28).collect(), PLAIN);
            }
        });
    }

    // ---------------------------------------------------------------- host-side checks

    #[test]
    fn launches_cover_every_entry_and_refuse_bad_dtypes() {
        let p = lfq(1, 8, BitOrder::LsbFirst, false);
        let fsq = Fsq::new(&[8, 5]).unwrap();
        let lp = cl::Pointers { src: 0, dst: 0, status: 0 };
        let fp = cf::Pointers { src: 0, dst: 0, status: 0, table: 0 };
        let mut names = vec![];
        for t in cl::DTYPES {
            names.push(cl::plan_encode(&p, t, 5, lp, 1).unwrap().name);
        }
        for t in cl::DTYPES {
            names.push(cl::plan_decode(&p, t, 5, lp, 1).unwrap().name);
        }
        assert_eq!(names, cl::KERNEL_NAMES);
        let mut names = vec![];
        for t in cf::DTYPES {
            names.push(cf::plan_encode(&fsq, t, 5, fp, 1).unwrap().name);
        }
        for t in cf::DTYPES {
            names.push(cf::plan_decode(&fsq, t, 5, fp, 1).unwrap().name);
        }
        assert_eq!(names, cf::KERNEL_NAMES);
        assert!(matches!(
            cl::plan_encode(&p, DType::U8, 5, lp, 1),
            Err(Error::Unsupported { family: Family::Lfq, .. })
        ));
        assert!(matches!(
            cf::plan_decode(&fsq, DType::U8, 5, fp, 1),
            Err(Error::Unsupported { family: Family::Fsq, .. })
        ));
        let e = cf::plan_encode(&fsq, DType::F32, cf::MAX_TOKENS + 1, fp, 1).unwrap_err();
        assert!(matches!(e, Error::Unsupported { family: Family::Fsq, .. }), "{e}");
        // Code bits as the output dtype rounds ±v.
        let bsq = lfq(1, 3, BitOrder::MsbFirst, true);
        let l = cl::plan_decode(&bsq, DType::F16, 1, lp, 1).unwrap().params;
        let v = 1.0 / 3f32.sqrt();
        assert_eq!((l.code_pos, l.code_neg), (cl::code_bits::<f16>(v), cl::code_bits::<f16>(-v)));
    }

    #[test]
    fn gpu_new_without_a_device_is_an_error_not_a_panic() {
        match Gpu::new(0) {
            Ok(g) => {
                let p = lfq(1, 8, BitOrder::LsbFirst, false);
                assert!(LfqKernel::new(&g, &p).is_ok());
                assert!(FsqKernel::new(&g, &Fsq::new(&[8]).unwrap()).is_ok());
            }
            Err(e) => assert!(matches!(e, Error::NoCudaDriver | Error::NoDevice { .. } | Error::Driver(_)), "{e}"),
        }
    }

    // ---------------------------------------------------------------- on the GPU

    #[test]
    fn gpu_small_shapes() {
        let Some(g) = gpu() else { return };
        lfq_cases(&mut Dev::Gpu(g));
        fsq_cases(&mut Dev::Gpu(g));
        error_cases(&mut Dev::Gpu(g));
        round_trips(&mut Dev::Gpu(g));
    }

    #[test]
    fn gpu_bench_shapes() {
        // The issue's bench shapes (and odd sizes near them), every dtype.
        let Some(g) = gpu() else { return };
        if super::common::simulated() {
            // Millions of elements: hours on the interpreter; the other device tests cover the paths.
            return super::common::say_skipped("bench shapes on tools/simcuda");
        }
        let dev = &mut Dev::Gpu(g);
        for t in 0..3 {
            lfq_encode_t(dev, t, &lfq(1, 18, BitOrder::MsbFirst, false), 1 << 20, 1, PLAIN);
            lfq_encode_t(dev, t, &lfq(4, 8, BitOrder::LsbFirst, false), (1 << 20) + 3, 2, PLAIN);
            lfq_encode_t(dev, t, &lfq(1, 18, BitOrder::LsbFirst, true), 65536, 3, PLAIN);
            lfq_decode_t(dev, t, &lfq(1, 18, BitOrder::MsbFirst, false), random_ids(1 << 20, 18, 4), PLAIN);
            let fsq = Fsq::new(&[8, 8, 8, 5, 5, 5]).unwrap();
            fsq_encode_t(dev, t, &fsq, 1 << 20, 5, PLAIN);
            let mut r = Rng(6);
            fsq_decode_t(dev, t, &fsq, (0..1 << 20).map(|_| (r.next_u64() % 64000) as u32).collect(), PLAIN);
        }
    }

    #[test]
    fn gpu_bad_input_is_a_typed_error() {
        let Some(g) = gpu() else { return };
        let s = g.stream();
        let p = lfq(2, 9, BitOrder::LsbFirst, false);
        let k = LfqKernel::new(g, &p).unwrap();
        let z = s.alloc_zeros::<f32>(18 * 4 + 1).unwrap();
        let mut ids = s.alloc_zeros::<u32>(8).unwrap();
        assert!(matches!(k.encode(s, &z, &mut ids), Err(Error::Shape { family: Family::Lfq, .. })));
        let z = s.alloc_zeros::<f32>(18 * 4).unwrap();
        let mut short = s.alloc_zeros::<u32>(7).unwrap();
        let e = k.encode(s, &z, &mut short).unwrap_err();
        assert_eq!(e, Error::Length { family: Family::Lfq, what: "ids", expected: 8, got: 7 });
        let mut codes = s.alloc_zeros::<f16>(4 * 18 - 1).unwrap();
        let e = k.decode(s, &ids, &mut codes).unwrap_err();
        assert_eq!(e, Error::Length { family: Family::Lfq, what: "codes", expected: 72, got: 71 });
        let odd = s.alloc_zeros::<u32>(7).unwrap();
        assert!(matches!(k.decode(s, &odd, &mut codes), Err(Error::Shape { .. })));
        let fsq = Fsq::new(&[8, 5]).unwrap();
        let kf = FsqKernel::new(g, &fsq).unwrap();
        let z = s.alloc_zeros::<bf16>(9).unwrap();
        let mut ids = s.alloc_zeros::<u32>(4).unwrap();
        assert!(matches!(kf.encode(s, &z, &mut ids), Err(Error::Shape { family: Family::Fsq, .. })));
        let z = s.alloc_zeros::<bf16>(8).unwrap();
        let mut ids5 = s.alloc_zeros::<u32>(5).unwrap();
        let e = kf.encode(s, &z, &mut ids5).unwrap_err();
        assert_eq!(e, Error::Length { family: Family::Fsq, what: "ids", expected: 4, got: 5 });
        // Empty inputs are fine and launch nothing.
        let one = s.alloc_zeros::<f32>(1).unwrap();
        let mut one_id = s.alloc_zeros::<u32>(1).unwrap();
        let empty = one.slice(0..0);
        let mut none = one_id.slice_mut(0..0);
        k.encode(s, &empty, &mut none).unwrap();
        kf.encode(s, &empty, &mut none).unwrap();
        assert_eq!(k.encode_host::<f32>(&[]).unwrap(), Vec::<u32>::new());
        // The host helpers check lengths too.
        assert!(matches!(kf.encode_host(&[1.0f32; 3]), Err(Error::Shape { .. })));
        // A deferred check reports the latest launch, then can be reused.
        let mut check = DeferredCheck::new(s).unwrap();
        let nan = s.clone_htod(&[f32::NAN; 8]).unwrap();
        let mut ids = s.alloc_zeros::<u32>(4).unwrap();
        kf.encode_deferred(s, &nan, &mut ids, &mut check).unwrap();
        assert!(matches!(check.result(), Err(Error::NonFinite { family: Family::Fsq, .. })));
        assert!(check.result().is_ok(), "read once");
        let fine = s.clone_htod(&[0.5f32; 8]).unwrap();
        kf.encode_deferred(s, &nan, &mut ids, &mut check).unwrap();
        kf.encode_deferred(s, &fine, &mut ids, &mut check).unwrap();
        assert!(check.result().is_ok(), "the second launch was clean");
    }

    #[test]
    fn gpu_host_helpers_and_other_streams() {
        let Some(g) = gpu() else { return };
        let p = lfq(2, 3, BitOrder::MsbFirst, false);
        let k = LfqKernel::new(g, &p).unwrap();
        let ids = k.encode_host(&[1.0f32, -1.0, 1.0, -2.0, -0.0, 3.0]).unwrap();
        assert_eq!(ids, [0b101, 0b001]);
        let codes: Vec<f32> = k.decode_host(&ids).unwrap();
        assert_eq!(codes, [0.75, -0.75, 0.75, -0.75, -0.75, 0.75]);
        let stream = g.context().new_stream().unwrap();
        let z = stream.clone_htod(&lfq_data::<bf16>(6 * 50, 3)).unwrap();
        let mut ids = stream.alloc_zeros::<u32>(100).unwrap();
        k.encode(&stream, &z, &mut ids).unwrap();
        let got = stream.clone_dtoh(&ids).unwrap();
        assert_eq!(got, cpu_lfq_encode(&p, &lfq_data::<bf16>(6 * 50, 3)).unwrap());
    }

    // ---------------------------------------------------------------- random shapes on the GPU

    #[derive(Debug, Clone)]
    struct LfqCase {
        g: usize,
        d: u32,
        msb: bool,
        spherical: bool,
        n: usize,
        t_in: usize,
        t_out: usize,
        seed: u64,
        opts: Opts,
    }

    fn lfq_case() -> impl Strategy<Value = LfqCase> {
        (
            (1usize..=6, 1u32..=32, any::<bool>(), any::<bool>()),
            prop_oneof![0usize..=70, 0usize..=3000],
            (0usize..3, 0usize..3, any::<u64>()),
            (prop::sample::select(&[1u32, 2, 7, 1 << 20][..]), 0usize..3, any::<bool>()),
        )
            .prop_map(|((g, d, msb, spherical), n, (t_in, t_out, seed), (max_blocks, offset, deferred))| {
                LfqCase { g, d, msb, spherical, n, t_in, t_out, seed, opts: Opts { max_blocks, offset, deferred } }
            })
    }

    #[derive(Debug, Clone)]
    struct FsqCase {
        levels: Vec<u32>,
        n: usize,
        t_in: usize,
        t_out: usize,
        seed: u64,
        opts: Opts,
    }

    fn fsq_case() -> impl Strategy<Value = FsqCase> {
        (
            prop::collection::vec(2u32..=16, 1..=8),
            prop_oneof![0usize..=70, 0usize..=3000],
            (0usize..3, 0usize..3, any::<u64>()),
            (prop::sample::select(&[1u32, 3, 1 << 20][..]), 0usize..3, any::<bool>()),
        )
            .prop_map(|(levels, n, (t_in, t_out, seed), (max_blocks, offset, deferred))| FsqCase {
                levels,
                n,
                t_in,
                t_out,
                seed,
                opts: Opts { max_blocks, offset, deferred },
            })
    }

    fn runner(cases: u32) -> proptest::test_runner::TestRunner {
        let cases = super::common::sim_cap(cases as usize, 6) as u32; // tools/simcuda is slow
        let config = ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() };
        let rng = proptest::test_runner::TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha);
        proptest::test_runner::TestRunner::new_with_rng(config, rng)
    }

    #[test]
    fn gpu_random_lfq_shapes_match_cpu() {
        // A plain test driving proptest's runner, so that a missing GPU is a skip (or, with
        // VISTOK_REQUIRE_GPU=1, one failure); deterministic, so a failure reproduces.
        let Some(g) = gpu() else { return };
        let result = runner(256).run(&lfq_case(), |c| {
            let order = if c.msb { BitOrder::MsbFirst } else { BitOrder::LsbFirst };
            let p = lfq(c.g, c.d, order, c.spherical);
            let dev = &mut Dev::Gpu(g);
            lfq_encode_t(dev, c.t_in, &p, c.n, c.seed, c.opts);
            lfq_decode_t(dev, c.t_out, &p, random_ids(c.n * c.g, c.d, c.seed ^ 1), c.opts);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }

    #[test]
    fn gpu_random_fsq_shapes_match_cpu() {
        let Some(g) = gpu() else { return };
        let result = runner(256).run(&fsq_case(), |c| {
            let fsq = Fsq::new(&c.levels).unwrap();
            let dev = &mut Dev::Gpu(g);
            fsq_encode_t(dev, c.t_in, &fsq, c.n, c.seed, c.opts);
            let mut r = Rng(c.seed ^ 1);
            let ids = (0..c.n).map(|_| (r.next_u64() % fsq.codebook_size()) as u32).collect();
            fsq_decode_t(dev, c.t_out, &fsq, ids, c.opts);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}
