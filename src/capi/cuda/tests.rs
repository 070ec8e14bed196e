//! The CUDA C entry points with host handles built in Rust (the `vistok_*_new` constructors
//! live in the host modules): argument checks that need no GPU, then — with a device — every
//! family through the C ABI against the cpu backend, bit for bit.

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};

use super::super::{
    free_handle, vistok_last_error, AnyCodebook, VistokCodebook, VistokFsq, VistokLfq, VistokMergePlan, VistokPatchify,
    VistokStatus, VISTOK_DTYPE_BF16, VISTOK_DTYPE_F16, VISTOK_DTYPE_F32, VISTOK_DTYPE_U8,
};
use super::*;
use crate::argmin::{Codebook, Metric};
use crate::capi::merge::{VISTOK_MERGE_CLASS_TOKEN, VISTOK_MERGE_MODE_MEAN, VISTOK_MERGE_TENSOR_CORES};
use crate::{bf16, Backend, BitOrder, Fsq, Layout, Lfq, LfqConfig, MatchConfig, MergeMode, MergePlan, PatchConfig};
use crate::{Patchify, View, ViewMut};

fn last_error() -> String {
    // SAFETY: vistok_last_error returns a valid NUL-terminated string of this thread.
    unsafe { CStr::from_ptr(vistok_last_error()) }.to_string_lossy().into_owned()
}

#[track_caller]
fn expect_status(got: VistokStatus, want: VistokStatus, needle: &str) {
    let msg = last_error();
    assert_eq!(got, want, "message: {msg}");
    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
}

/// Deterministic values in [-2, 2) with a few exact zeros and repeats (ties).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 11 == 3 {
                0.0
            } else {
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            }
        })
        .collect()
}

const FAKE: *const c_void = 0x1000 as *const c_void;
const FAKE_MUT: *mut c_void = 0x2000 as *mut c_void;

fn lfq_handle() -> VistokLfq {
    VistokLfq(Lfq::new(&LfqConfig::new(2, 5, BitOrder::MsbFirst)).unwrap())
}

#[test]
fn host_checks_come_before_the_device() {
    let lfq = lfq_handle();
    let null_dev = std::ptr::null();
    let (zd, idd) = ([7usize, 10], [7usize, 2]);
    let enc = |dev, dtype, z, zd: &[usize], ids, idd: &[usize]| {
        // SAFETY: valid dims arrays; the pointers are never dereferenced (checks fail first).
        unsafe {
            vistok_cuda_lfq_encode(
                dev,
                std::ptr::null_mut(),
                &lfq,
                z,
                dtype,
                zd.as_ptr(),
                zd.len(),
                ids,
                idd.as_ptr(),
                idd.len(),
            )
        }
    };
    // Everything valid but the device: the device is the last thing checked.
    expect_status(enc(null_dev, VISTOK_DTYPE_F32, FAKE, &zd, FAKE_MUT, &idd), VistokStatus::NullPointer, "device");
    expect_status(enc(null_dev, 9, FAKE, &zd, FAKE_MUT, &idd), VistokStatus::Invalid, "dtype");
    expect_status(enc(null_dev, VISTOK_DTYPE_U8, FAKE, &zd, FAKE_MUT, &idd), VistokStatus::Unsupported, "u8");
    expect_status(enc(null_dev, VISTOK_DTYPE_F32, FAKE, &[7, 9], FAKE_MUT, &idd), VistokStatus::Shape, "[N, 10]");
    expect_status(enc(null_dev, VISTOK_DTYPE_F32, FAKE, &zd, FAKE_MUT, &[6, 2]), VistokStatus::Shape, "[7, 2]");
    expect_status(
        enc(null_dev, VISTOK_DTYPE_F32, std::ptr::null(), &zd, FAKE_MUT, &idd),
        VistokStatus::NullPointer,
        "z",
    );
    let odd = 0x1002 as *const c_void;
    expect_status(enc(null_dev, VISTOK_DTYPE_F32, odd, &zd, FAKE_MUT, &idd), VistokStatus::Alignment, "z");
    expect_status(
        enc(null_dev, VISTOK_DTYPE_F32, FAKE, &[usize::MAX, 10], FAKE_MUT, &[usize::MAX, 2]),
        VistokStatus::Overflow,
        "z",
    );
    // The asynchronous forms check the same arguments on the host.
    // SAFETY: valid dims arrays; the pointers are never dereferenced (checks fail first).
    let s = unsafe {
        vistok_cuda_lfq_encode_async(
            null_dev,
            std::ptr::null_mut(),
            &lfq,
            FAKE,
            1,
            zd.as_ptr(),
            2,
            FAKE_MUT,
            zd.as_ptr(),
            2,
        )
    };
    expect_status(s, VistokStatus::Shape, "ids dims");
    let fsq = VistokFsq(Fsq::new(&[8, 5]).unwrap());
    // SAFETY: as above.
    let s = unsafe {
        vistok_cuda_fsq_decode_async(
            null_dev,
            std::ptr::null_mut(),
            &fsq,
            FAKE,
            [3usize].as_ptr(),
            1,
            FAKE_MUT,
            3,
            [3usize, 2].as_ptr(),
            2,
        )
    };
    expect_status(s, VistokStatus::NullPointer, "device");
    // A null handle.
    // SAFETY: null handles and pointers are checked.
    let s = unsafe {
        vistok_cuda_lfq_decode(
            null_dev,
            std::ptr::null_mut(),
            std::ptr::null(),
            FAKE,
            idd.as_ptr(),
            2,
            FAKE_MUT,
            VISTOK_DTYPE_F32,
            zd.as_ptr(),
            2,
        )
    };
    expect_status(s, VistokStatus::NullPointer, "lfq");
}

#[test]
fn host_checks_of_every_family() {
    let null_dev: *const VistokCudaDevice = std::ptr::null();
    let ns = std::ptr::null_mut();
    let plan = VistokPatchify(Patchify::new(&PatchConfig::image(Layout::ChannelsFirst, 4, 4), &[2, 3, 8, 12]).unwrap());
    let (im, tk) = ([2usize, 3, 8, 12], [2usize, 6, 48]);
    // SAFETY (all calls below): valid dims arrays and handles; the fake device addresses are
    // never dereferenced because a check fails first.
    unsafe {
        let s = vistok_cuda_patchify_forward(null_dev, ns, &plan, FAKE, 0, im.as_ptr(), 4, FAKE_MUT, 1, tk.as_ptr(), 3);
        expect_status(s, VistokStatus::NullPointer, "device");
        let s = vistok_cuda_patchify_forward(null_dev, ns, &plan, FAKE, 0, im.as_ptr(), 4, FAKE_MUT, 0, tk.as_ptr(), 3);
        expect_status(s, VistokStatus::Unsupported, "tokens_dtype");
        let s = vistok_cuda_patchify_forward(null_dev, ns, &plan, FAKE, 0, tk.as_ptr(), 3, FAKE_MUT, 1, tk.as_ptr(), 3);
        expect_status(s, VistokStatus::Shape, "image dims");
        let s = vistok_cuda_patchify_inverse(null_dev, ns, &plan, FAKE, 1, im.as_ptr(), 4, FAKE_MUT, 0, im.as_ptr(), 4);
        expect_status(s, VistokStatus::Shape, "tokens dims");

        let fsq = VistokFsq(Fsq::new(&[8, 5, 5]).unwrap());
        let (zd, idd) = ([4usize, 3], [4usize]);
        let s = vistok_cuda_fsq_encode(null_dev, ns, &fsq, FAKE, 2, zd.as_ptr(), 2, FAKE_MUT, idd.as_ptr(), 1);
        expect_status(s, VistokStatus::NullPointer, "device");
        let s = vistok_cuda_fsq_decode(null_dev, ns, &fsq, FAKE, zd.as_ptr(), 2, FAKE_MUT, 2, zd.as_ptr(), 2);
        expect_status(s, VistokStatus::Shape, "ids dims");
        let s =
            vistok_cuda_fsq_decode(null_dev, ns, &fsq, FAKE, idd.as_ptr(), 1, 0x2002 as *mut c_void, 1, zd.as_ptr(), 2);
        expect_status(s, VistokStatus::Alignment, "codes");

        let e = [1.0f32, 0.0, 0.0, 1.0];
        let cb = VistokCodebook(AnyCodebook::F32(Codebook::new(View::new(&e, &[2, 2]).unwrap(), Metric::L2).unwrap()));
        let mut out = std::ptr::null_mut();
        expect_status(vistok_cuda_codebook_new(null_dev, &cb, 0, &mut out), VistokStatus::NullPointer, "device");
        expect_status(vistok_cuda_codebook_new(null_dev, &cb, 6, &mut out), VistokStatus::Invalid, "flags");
        let mut mp = std::ptr::null_mut();
        let md = [2usize, 1, 4];
        let s = vistok_cuda_merge_plan(null_dev, ns, FAKE, 1, md.as_ptr(), 3, 1, 0, &mut mp);
        expect_status(s, VistokStatus::Shape, "N = 1");
        let s = vistok_cuda_merge_plan(null_dev, ns, FAKE, 1, md.as_ptr(), 2, 1, 0, &mut mp);
        expect_status(s, VistokStatus::Shape, "[B, N, C]");
        let s = vistok_cuda_merge_plan(null_dev, ns, FAKE, 1, [2usize, 4, 4].as_ptr(), 3, 1, 16, &mut mp);
        expect_status(s, VistokStatus::Invalid, "flags");

        let m = values(2 * 6 * 3, 5);
        let plan = VistokMergePlan(
            MergePlan::bipartite(Backend::Cpu, View::new(&m, &[2, 6, 3]).unwrap(), &MatchConfig::new(2)).unwrap(),
        );
        let (xd, od) = ([2usize, 6, 5], [2usize, 4, 5]);
        let s = vistok_cuda_merge(null_dev, ns, &plan, 0, 1, FAKE, xd.as_ptr(), 3, FAKE_MUT, od.as_ptr(), 3);
        expect_status(s, VistokStatus::NullPointer, "device");
        let s = vistok_cuda_merge(null_dev, ns, &plan, 7, 1, FAKE, xd.as_ptr(), 3, FAKE_MUT, od.as_ptr(), 3);
        expect_status(s, VistokStatus::Invalid, "mode");
        let s = vistok_cuda_merge(null_dev, ns, &plan, 1, 1, FAKE, od.as_ptr(), 3, FAKE_MUT, od.as_ptr(), 3);
        expect_status(s, VistokStatus::Shape, "x dims");
        let s = vistok_cuda_unmerge(null_dev, ns, &plan, 1, FAKE, od.as_ptr(), 3, FAKE_MUT, od.as_ptr(), 3);
        expect_status(s, VistokStatus::Shape, "out dims");
        let s = vistok_cuda_merge_weighted(
            null_dev,
            ns,
            &plan,
            1,
            FAKE,
            xd.as_ptr(),
            3,
            std::ptr::null(),
            FAKE_MUT,
            od.as_ptr(),
            3,
            FAKE_MUT,
        );
        expect_status(s, VistokStatus::NullPointer, "sizes");
    }
}

/// The device of these tests, or `None` after a `skipped:` line.
fn device() -> Option<&'static VistokCudaDevice> {
    static DEV: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let addr = DEV.get_or_init(|| {
        let mut dev = std::ptr::null_mut();
        // SAFETY: `dev` is a valid out-pointer.
        let s = unsafe { vistok_cuda_device_new(0, &mut dev) };
        if s != VistokStatus::Ok {
            let msg = last_error();
            assert!(matches!(s, VistokStatus::NoCuda | VistokStatus::NoDevice | VistokStatus::Driver), "{s:?}: {msg}");
            assert!(!msg.is_empty());
            assert!(std::env::var("VISTOK_REQUIRE_GPU").as_deref() != Ok("1"), "VISTOK_REQUIRE_GPU=1 but {msg}");
            eprintln!("skipped: no CUDA device ({msg})");
            return None;
        }
        Some(dev as usize) // leaked: shared by the tests of this binary
    });
    // SAFETY: a live handle, never freed.
    addr.map(|a| unsafe { &*(a as *const VistokCudaDevice) })
}

/// A non-default stream of the device (the C calls must not rely on the legacy stream).
fn stream(dev: &VistokCudaDevice) -> Arc<CudaStream> {
    dev.gpu.context().new_stream().expect("a stream")
}

fn up<T: DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
    s.clone_htod(v).expect("upload")
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(s: &Arc<CudaStream>, n: usize) -> CudaSlice<T> {
    s.alloc_zeros::<T>(n.max(1)).expect("alloc")
}

fn ptr<T>(s: &Arc<CudaStream>, b: &CudaSlice<T>) -> *mut c_void {
    b.device_ptr(s).0 as *mut c_void
}

fn down<T: DeviceRepr>(s: &Arc<CudaStream>, b: &CudaSlice<T>, n: usize) -> Vec<T> {
    let mut v = s.clone_dtoh(b).expect("download");
    s.synchronize().expect("sync");
    v.truncate(n);
    v
}

fn raw(s: &Arc<CudaStream>) -> *mut c_void {
    s.cu_stream() as *mut c_void
}

#[test]
fn lfq_and_fsq_match_the_cpu_backend() {
    let Some(dev) = device() else { return };
    let s = stream(dev);
    let lfq = lfq_handle();
    let n = 37;
    let z = values(n * 10, 1);
    let mut want = vec![0u32; n * 2];
    lfq.0.encode(Backend::Cpu, View::new(&z, &[n, 10]).unwrap(), ViewMut::new(&mut want, &[n, 2]).unwrap()).unwrap();
    let (dz, dids) = (up(&s, &z), zeros::<u32>(&s, n * 2));
    let (zd, idd) = ([n, 10], [n, 2]);
    // SAFETY: device buffers of the given dims on this device; the stream is of its context.
    let st = unsafe {
        vistok_cuda_lfq_encode(dev, raw(&s), &lfq, ptr(&s, &dz), 1, zd.as_ptr(), 2, ptr(&s, &dids), idd.as_ptr(), 2)
    };
    expect_status(st, VistokStatus::Ok, "");
    assert_eq!(down(&s, &dids, n * 2), want);
    let mut codes = vec![bf16::ZERO; n * 10];
    lfq.0
        .decode(Backend::Cpu, View::new(&want, &[n, 2]).unwrap(), ViewMut::new(&mut codes, &[n, 10]).unwrap())
        .unwrap();
    let dc = zeros::<bf16>(&s, n * 10);
    // SAFETY: as above.
    let st = unsafe {
        vistok_cuda_lfq_decode(dev, raw(&s), &lfq, ptr(&s, &dids), idd.as_ptr(), 2, ptr(&s, &dc), 3, zd.as_ptr(), 2)
    };
    expect_status(st, VistokStatus::Ok, "");
    assert_eq!(down(&s, &dc, n * 10), codes);
    // A NaN is found on the device and named.
    let mut bad = z.clone();
    bad[3 * 10 + 4] = f32::NAN;
    let db = up(&s, &bad);
    // SAFETY: as above.
    let st = unsafe {
        vistok_cuda_lfq_encode(dev, raw(&s), &lfq, ptr(&s, &db), 1, zd.as_ptr(), 2, ptr(&s, &dids), idd.as_ptr(), 2)
    };
    expect_status(st, VistokStatus::NonFinite, "z[3, 4]");
    // The asynchronous form does not report it; a NaN gives a 0 bit (as on the cpu backend).
    // SAFETY: as above.
    let st = unsafe {
        vistok_cuda_lfq_encode_async(
            dev,
            raw(&s),
            &lfq,
            ptr(&s, &db),
            1,
            zd.as_ptr(),
            2,
            ptr(&s, &dids),
            idd.as_ptr(),
            2,
        )
    };
    expect_status(st, VistokStatus::Ok, "");
    let mut zeroed = z.clone();
    zeroed[3 * 10 + 4] = 0.0;
    let mut want_nan = vec![0u32; n * 2];
    lfq.0
        .encode(Backend::Cpu, View::new(&zeroed, &[n, 10]).unwrap(), ViewMut::new(&mut want_nan, &[n, 2]).unwrap())
        .unwrap();
    assert_eq!(down(&s, &dids, n * 2), want_nan);

    let fsq = VistokFsq(Fsq::new(&[8, 5, 5, 3]).unwrap());
    let z = values(n * 4, 2);
    let mut ids = vec![0u32; n];
    fsq.0.encode(Backend::Cpu, View::new(&z, &[n, 4]).unwrap(), ViewMut::new(&mut ids, &[n]).unwrap()).unwrap();
    let (dz, dids) = (up(&s, &z), zeros::<u32>(&s, n));
    let (zd, idd) = ([n, 4], [n]);
    s.synchronize().unwrap(); // the legacy stream does not wait for a non-blocking one
                              // SAFETY: as above; the stream is the legacy default stream here.
    let st = unsafe {
        vistok_cuda_fsq_encode(
            dev,
            std::ptr::null_mut(),
            &fsq,
            ptr(&s, &dz),
            1,
            zd.as_ptr(),
            2,
            ptr(&s, &dids),
            idd.as_ptr(),
            1,
        )
    };
    expect_status(st, VistokStatus::Ok, "");
    assert_eq!(down(&s, &dids, n), ids);
    let mut codes = vec![0.0f32; n * 4];
    fsq.0.decode(Backend::Cpu, View::new(&ids, &[n]).unwrap(), ViewMut::new(&mut codes, &[n, 4]).unwrap()).unwrap();
    let dc = zeros::<f32>(&s, n * 4);
    // SAFETY: as above.
    let st = unsafe {
        vistok_cuda_fsq_decode(dev, raw(&s), &fsq, ptr(&s, &dids), idd.as_ptr(), 1, ptr(&s, &dc), 1, zd.as_ptr(), 2)
    };
    expect_status(st, VistokStatus::Ok, "");
    assert_eq!(
        down(&s, &dc, n * 4).iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        codes.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn patchify_matches_the_cpu_backend() {
    let Some(dev) = device() else { return };
    let s = stream(dev);
    let plan = VistokPatchify(Patchify::new(&PatchConfig::image(Layout::ChannelsLast, 4, 4), &[3, 8, 12, 3]).unwrap());
    let (im, tk) = ([3usize, 8, 12, 3], [3usize, 6, 48]);
    let (ni, nt) = (im.iter().product::<usize>(), tk.iter().product::<usize>());
    let image: Vec<u8> = (0..ni).map(|i| (i * 37 % 251) as u8).collect();
    let mut want = vec![0.0f32; nt];
    plan.0.forward(Backend::Cpu, View::new(&image, &im).unwrap(), ViewMut::new(&mut want, &tk).unwrap()).unwrap();
    let (di, dt) = (up(&s, &image), zeros::<f32>(&s, nt));
    // SAFETY: device buffers of the given dims on this device.
    let st = unsafe {
        vistok_cuda_patchify_forward(
            dev,
            raw(&s),
            &plan,
            ptr(&s, &di),
            0,
            im.as_ptr(),
            4,
            ptr(&s, &dt),
            1,
            tk.as_ptr(),
            3,
        )
    };
    expect_status(st, VistokStatus::Ok, "");
    let got = down(&s, &dt, nt);
    assert_eq!(
        got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    let mut back = vec![0u8; ni];
    plan.0.inverse(Backend::Cpu, View::new(&want, &tk).unwrap(), ViewMut::new(&mut back, &im).unwrap()).unwrap();
    let db = zeros::<u8>(&s, ni);
    // SAFETY: as above.
    let st = unsafe {
        vistok_cuda_patchify_inverse(
            dev,
            raw(&s),
            &plan,
            ptr(&s, &dt),
            1,
            tk.as_ptr(),
            3,
            ptr(&s, &db),
            0,
            im.as_ptr(),
            4,
        )
    };
    expect_status(st, VistokStatus::Ok, "");
    assert_eq!(down(&s, &db, ni), back);
    assert_eq!(back, image);
}

#[test]
fn argmin_and_lookup_match_the_cpu_backend() {
    let Some(dev) = device() else { return };
    let s = stream(dev);
    let (k, d, n) = (300, 7, 129);
    let e = values(k * d, 3);
    let host = Codebook::new(View::new(&e, &[k, d]).unwrap(), Metric::L2).unwrap();
    let cb = VistokCodebook(AnyCodebook::F32(host.clone()));
    let mut h = std::ptr::null_mut();
    // SAFETY: live handles, a valid out-pointer.
    expect_status(unsafe { vistok_cuda_codebook_new(dev, &cb, 0, &mut h) }, VistokStatus::Ok, "");
    let x = values(n * d, 4);
    let (mut idx, mut dist) = (vec![0u32; n], vec![0.0f32; n]);
    host.argmin(
        Backend::Cpu,
        View::new(&x, &[n, d]).unwrap(),
        ViewMut::new(&mut idx, &[n]).unwrap(),
        Some(ViewMut::new(&mut dist, &[n]).unwrap()),
    )
    .unwrap();
    let (dx, di, dd) = (up(&s, &x), zeros::<u32>(&s, n), zeros::<f32>(&s, n));
    let (xd, id) = ([n, d], [n]);
    // SAFETY: device buffers of the given dims on the codebook's device.
    let st = unsafe {
        vistok_cuda_argmin(h, raw(&s), ptr(&s, &dx), 1, xd.as_ptr(), 2, ptr(&s, &di), id.as_ptr(), 1, ptr(&s, &dd))
    };
    expect_status(st, VistokStatus::Ok, "");
    assert_eq!(down(&s, &di, n), idx);
    assert_eq!(
        down(&s, &dd, n).iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        dist.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    // SAFETY: as above.
    let st = unsafe {
        vistok_cuda_argmin(
            h,
            raw(&s),
            ptr(&s, &dx),
            2,
            xd.as_ptr(),
            2,
            ptr(&s, &di),
            id.as_ptr(),
            1,
            std::ptr::null_mut(),
        )
    };
    // Documented in include/vistok.h: UNSUPPORTED, as the host entry point says.
    expect_status(st, VistokStatus::Unsupported, "codebook's f32");
    let mut q = vec![0.0f32; n * d];
    host.lookup(Backend::Cpu, View::new(&idx, &[n]).unwrap(), ViewMut::new(&mut q, &[n, d]).unwrap()).unwrap();
    let dq = zeros::<f32>(&s, n * d);
    // SAFETY: as above.
    let st = unsafe { vistok_cuda_lookup(h, raw(&s), ptr(&s, &di), id.as_ptr(), 1, ptr(&s, &dq), 1, xd.as_ptr(), 2) };
    expect_status(st, VistokStatus::Ok, "");
    assert_eq!(down(&s, &dq, n * d), q);
    let bad = up(&s, &vec![k as u32; n]);
    // SAFETY: as above.
    let st = unsafe { vistok_cuda_lookup(h, raw(&s), ptr(&s, &bad), id.as_ptr(), 1, ptr(&s, &dq), 1, xd.as_ptr(), 2) };
    expect_status(st, VistokStatus::Invalid, "indices[0]");
    // SAFETY: a live handle with nothing in flight.
    unsafe { vistok_cuda_codebook_free(h) };
}

#[test]
fn merge_matches_the_cpu_backend() {
    let Some(dev) = device() else { return };
    let s = stream(dev);
    let (b, n, c, r) = (2, 13, 6, 4);
    let m = values(b * n * c, 6);
    let cfg = MatchConfig::new(r).class_token(true);
    let want = MergePlan::bipartite(Backend::Cpu, View::new(&m, &[b, n, c]).unwrap(), &cfg).unwrap();
    let dm = up(&s, &m);
    let md = [b, n, c];
    let mut p = std::ptr::null_mut();
    // SAFETY: a device buffer of the given dims; a valid out-pointer.
    let st = unsafe {
        vistok_cuda_merge_plan(dev, raw(&s), ptr(&s, &dm), 1, md.as_ptr(), 3, r, VISTOK_MERGE_CLASS_TOKEN, &mut p)
    };
    expect_status(st, VistokStatus::Ok, "");
    // SAFETY: the handle just made.
    let plan = unsafe { &*p };
    assert_eq!(plan.0.slots(), want.slots());
    for bi in 0..b {
        assert_eq!((plan.0.kept(bi), plan.0.merged(bi)), (want.kept(bi), want.merged(bi)));
    }
    let o = want.out_tokens();
    let mut y = vec![0.0f32; b * o * c];
    want.merge(
        Backend::Cpu,
        View::new(&m, &[b, n, c]).unwrap(),
        MergeMode::Mean,
        ViewMut::new(&mut y, &[b, o, c]).unwrap(),
    )
    .unwrap();
    let dy = zeros::<f32>(&s, b * o * c);
    let od = [b, o, c];
    // SAFETY: device buffers of the given dims.
    let st = unsafe {
        vistok_cuda_merge(
            dev,
            raw(&s),
            plan,
            VISTOK_MERGE_MODE_MEAN,
            1,
            ptr(&s, &dm),
            md.as_ptr(),
            3,
            ptr(&s, &dy),
            od.as_ptr(),
            3,
        )
    };
    expect_status(st, VistokStatus::Ok, "");
    assert_eq!(down(&s, &dy, b * o * c), y);
    let mut back = vec![0.0f32; b * n * c];
    want.unmerge(Backend::Cpu, View::new(&y, &[b, o, c]).unwrap(), ViewMut::new(&mut back, &[b, n, c]).unwrap())
        .unwrap();
    let dback = zeros::<f32>(&s, b * n * c);
    // SAFETY: as above.
    let st = unsafe {
        vistok_cuda_unmerge(dev, raw(&s), plan, 1, ptr(&s, &dy), od.as_ptr(), 3, ptr(&s, &dback), md.as_ptr(), 3)
    };
    expect_status(st, VistokStatus::Ok, "");
    assert_eq!(down(&s, &dback, b * n * c), back);
    let sizes: Vec<f32> = (0..b * n).map(|i| 1.0 + (i % 3) as f32).collect();
    let (mut yw, mut sw) = (vec![0.0f32; b * o * c], vec![0.0f32; b * o]);
    want.merge_weighted(
        Backend::Cpu,
        View::new(&m, &[b, n, c]).unwrap(),
        Some(View::new(&sizes, &[b, n]).unwrap()),
        ViewMut::new(&mut yw, &[b, o, c]).unwrap(),
        ViewMut::new(&mut sw, &[b, o]).unwrap(),
    )
    .unwrap();
    let (ds, dso) = (up(&s, &sizes), zeros::<f32>(&s, b * o));
    // SAFETY: as above.
    let st = unsafe {
        vistok_cuda_merge_weighted(
            dev,
            raw(&s),
            plan,
            1,
            ptr(&s, &dm),
            md.as_ptr(),
            3,
            ptr(&s, &ds),
            ptr(&s, &dy),
            od.as_ptr(),
            3,
            ptr(&s, &dso),
        )
    };
    expect_status(st, VistokStatus::Ok, "");
    assert_eq!((down(&s, &dy, b * o * c), down(&s, &dso, b * o)), (yw, sw));
    // SAFETY: the handle made above, no use in flight.
    unsafe { free_handle(p) };

    // VISTOK_MERGE_TENSOR_CORES with a bf16 metric: the Rust API's tensor-core plan.
    let mb: Vec<bf16> = m.iter().map(|&v| bf16::from_f32(v)).collect();
    let want = crate::cuda::MergeKernel::new(&dev.gpu)
        .and_then(|k| k.with_tensor_cores(true))
        .and_then(|k| k.plan_host(View::new(&mb, &[b, n, c]).unwrap(), &cfg))
        .unwrap();
    let dmb = up(&s, &mb);
    let mut p = std::ptr::null_mut();
    let flags = VISTOK_MERGE_CLASS_TOKEN | VISTOK_MERGE_TENSOR_CORES;
    // SAFETY: a device buffer of the given dims; a valid out-pointer.
    let st = unsafe { vistok_cuda_merge_plan(dev, raw(&s), ptr(&s, &dmb), 3, md.as_ptr(), 3, r, flags, &mut p) };
    expect_status(st, VistokStatus::Ok, "");
    // SAFETY: the handle just made; freed once, nothing in flight.
    unsafe {
        assert_eq!((*p).0, want);
        free_handle(p);
    }
}

#[test]
fn a_stream_of_another_context_is_refused() {
    let Some(dev) = device() else { return };
    // A non-primary context of the same device: its streams are not the device handle's.
    // cudarc creates it with cuCtxCreate_v4, which drivers before 12.5 lack (a missing symbol
    // panics in the dynamic loader): skip there.
    let mut version = 0;
    // SAFETY: a valid out-pointer; the driver library is loaded (`device()` found a GPU).
    let st = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    if st != cudarc::driver::sys::CUresult::CUDA_SUCCESS || version < 12050 {
        eprintln!("skipped: a second context needs a CUDA 12.5 driver (cuCtxCreate_v4), this one is {version}");
        return;
    }
    let Ok(other) = cudarc::driver::CudaContext::new_non_primary(dev.gpu.ordinal(), 0) else {
        eprintln!("skipped: cannot create a second context");
        return;
    };
    let s = other.new_stream().expect("a stream");
    let lfq = lfq_handle();
    let (zd, idd) = ([1usize, 10], [1usize, 2]);
    // SAFETY: the pointers are never used (the stream check fails first).
    let st = unsafe {
        vistok_cuda_lfq_encode(dev, raw(&s), &lfq, FAKE, VISTOK_DTYPE_F16, zd.as_ptr(), 2, FAKE_MUT, idd.as_ptr(), 2)
    };
    expect_status(st, VistokStatus::Invalid, "another CUDA context");
    dev.gpu.context().bind_to_thread().unwrap();
    let _ = VISTOK_DTYPE_BF16;
}
