//! The CUDA C entry points (`vistok_cuda_*`) as a C caller sees them.
//!
//! Without the `cuda` feature every entry reports `NO_CUDA` with a message. With it: devices
//! and errors as values (no GPU here gives `NO_CUDA` / `NO_DEVICE`, never a crash), arguments
//! checked before the device is needed, and — with a GPU (else a `skipped:` line; failing when
//! `VISTOK_REQUIRE_GPU=1`) — attention through the C ABI on caller-allocated device memory and
//! a caller's stream, bit-identical to the Rust CUDA API (so within the tolerance
//! tests/cuda_attention.rs checks against the f64 oracle), also on two devices at once.
//! The families that need host handles (patchify, LFQ, FSQ, argmin, merge) are tested against
//! the cpu backend in `src/capi/cuda/tests.rs`.
#![cfg(feature = "capi")]

use std::ffi::{c_void, CStr};

use vistok::capi::attention::*;
use vistok::capi::cuda::*;
use vistok::capi::*;

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

fn require_gpu() -> bool {
    std::env::var("VISTOK_REQUIRE_GPU").as_deref() == Ok("1")
}

const FAKE: *const c_void = 0x1000 as *const c_void;
const FAKE_MUT: *mut c_void = 0x2000 as *mut c_void;

/// `vistok_cuda_attention_forward` with null stream and options.
#[allow(clippy::too_many_arguments)]
fn attention(
    dev: *const VistokCudaDevice,
    options: *const VistokAttentionOptions,
    dtype: VistokDType,
    q: *const c_void,
    qd: &[usize],
    kv: *const c_void,
    kd: &[usize],
    out: *mut c_void,
    lse: *mut c_void,
) -> VistokStatus {
    // SAFETY: valid dims arrays; the buffers are the caller's (fake ones are never reached).
    unsafe {
        vistok_cuda_attention_forward(
            dev,
            std::ptr::null_mut(),
            options,
            dtype,
            q,
            qd.as_ptr(),
            qd.len(),
            kv,
            kv,
            kd.as_ptr(),
            kd.len(),
            out,
            lse,
        )
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn every_entry_reports_no_cuda() {
    assert!(!require_gpu(), "VISTOK_REQUIRE_GPU=1 but this test binary was built without the cuda feature");
    let mut n = 7usize;
    // SAFETY: a valid out-pointer.
    expect_status(unsafe { vistok_cuda_device_count(&mut n) }, VistokStatus::NoCuda, "`cuda` feature");
    assert_eq!(n, 7, "nothing written on error");
    let mut dev = std::ptr::null_mut();
    // SAFETY: a valid out-pointer.
    expect_status(unsafe { vistok_cuda_device_new(0, &mut dev) }, VistokStatus::NoCuda, "`cuda` feature");
    assert!(dev.is_null());
    let d = [1usize, 1, 1, 32];
    let s = attention(std::ptr::null(), std::ptr::null(), VISTOK_DTYPE_F32, FAKE, &d, FAKE, &d, FAKE_MUT, FAKE_MUT);
    expect_status(s, VistokStatus::NoCuda, "`cuda` feature");
    let ns = std::ptr::null_mut();
    // SAFETY: every entry reports NoCuda before reading any argument.
    unsafe {
        let s = vistok_cuda_lfq_encode(
            std::ptr::null(),
            ns,
            std::ptr::null(),
            FAKE,
            1,
            d.as_ptr(),
            4,
            FAKE_MUT,
            d.as_ptr(),
            4,
        );
        expect_status(s, VistokStatus::NoCuda, "`cuda` feature");
        let s = vistok_cuda_fsq_encode_async(
            std::ptr::null(),
            ns,
            std::ptr::null(),
            FAKE,
            1,
            d.as_ptr(),
            4,
            FAKE_MUT,
            d.as_ptr(),
            4,
        );
        expect_status(s, VistokStatus::NoCuda, "`cuda` feature");
        let mut cb = std::ptr::null_mut();
        let s = vistok_cuda_codebook_new(std::ptr::null(), std::ptr::null(), 0, &mut cb);
        expect_status(s, VistokStatus::NoCuda, "`cuda` feature");
        let mut plan = std::ptr::null_mut();
        let s = vistok_cuda_merge_plan(std::ptr::null(), ns, FAKE, 1, d.as_ptr(), 3, 1, 0, &mut plan);
        expect_status(s, VistokStatus::NoCuda, "`cuda` feature");
        let s = vistok_cuda_unmerge(
            std::ptr::null(),
            ns,
            std::ptr::null(),
            1,
            FAKE,
            d.as_ptr(),
            3,
            FAKE_MUT,
            d.as_ptr(),
            3,
        );
        expect_status(s, VistokStatus::NoCuda, "`cuda` feature");
        // Freeing null is a no-op, with or without CUDA.
        vistok_cuda_device_free(std::ptr::null_mut());
        vistok_cuda_codebook_free(std::ptr::null_mut());
    }
}

#[cfg(feature = "cuda")]
mod with_cuda {
    use std::sync::Arc;

    use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
    use vistok::attention::{Attention, Bias, Mask};
    use vistok::cuda::{AttentionKernel, Gpu};
    use vistok::{bf16, DType, View};

    use super::*;

    /// Device `ordinal` through the C ABI, or `None` after a `skipped:` line.
    fn open(ordinal: usize) -> Option<*mut VistokCudaDevice> {
        let mut dev = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        let s = unsafe { vistok_cuda_device_new(ordinal, &mut dev) };
        if s == VistokStatus::Ok {
            return Some(dev);
        }
        let msg = last_error();
        assert!(matches!(s, VistokStatus::NoCuda | VistokStatus::NoDevice | VistokStatus::Driver), "{s:?}: {msg}");
        assert!(!msg.is_empty() && dev.is_null());
        assert!(!require_gpu(), "VISTOK_REQUIRE_GPU=1 but device {ordinal}: {msg}");
        eprintln!("skipped: no CUDA device {ordinal} ({msg})");
        None
    }

    #[test]
    fn devices_and_their_errors_are_values() {
        // SAFETY: null out-pointers are reported.
        unsafe {
            expect_status(vistok_cuda_device_count(std::ptr::null_mut()), VistokStatus::NullPointer, "out");
            expect_status(vistok_cuda_device_new(0, std::ptr::null_mut()), VistokStatus::NullPointer, "out");
        }
        let mut n = 0usize;
        // SAFETY: a valid out-pointer.
        match unsafe { vistok_cuda_device_count(&mut n) } {
            VistokStatus::Ok => {}
            s => {
                expect_status(s, VistokStatus::NoCuda, "CUDA");
                assert!(!require_gpu(), "VISTOK_REQUIRE_GPU=1 but {}", last_error());
            }
        }
        let mut dev = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        let s = unsafe { vistok_cuda_device_new(n + 1000, &mut dev) };
        assert!(matches!(s, VistokStatus::NoDevice | VistokStatus::NoCuda), "{s:?}");
        assert!(!last_error().is_empty() && dev.is_null());
        if let Some(dev) = open(0) {
            // SAFETY: the handle just made, unused elsewhere.
            unsafe { vistok_cuda_device_free(dev) };
        }
    }

    #[test]
    fn attention_arguments_are_checked_before_the_device() {
        let null = std::ptr::null();
        let no_opts = std::ptr::null();
        let (qd, kd) = ([1usize, 4, 16, 64], [1usize, 2, 24, 64]);
        let bf = VISTOK_DTYPE_BF16;
        let s = attention(null, no_opts, bf, FAKE, &qd, FAKE, &kd, FAKE_MUT, FAKE_MUT);
        expect_status(s, VistokStatus::NullPointer, "device");
        let s = attention(null, no_opts, 9, FAKE, &qd, FAKE, &kd, FAKE_MUT, FAKE_MUT);
        expect_status(s, VistokStatus::Invalid, "dtype");
        let s = attention(null, no_opts, VISTOK_DTYPE_U8, FAKE, &qd, FAKE, &kd, FAKE_MUT, FAKE_MUT);
        expect_status(s, VistokStatus::Unsupported, "u8");
        let s = attention(null, no_opts, bf, FAKE, &[1, 4, 16, 48], FAKE, &[1, 2, 24, 48], FAKE_MUT, FAKE_MUT);
        expect_status(s, VistokStatus::Unsupported, "head dimension");
        let s = attention(null, no_opts, bf, FAKE, &qd[..3], FAKE, &kd, FAKE_MUT, FAKE_MUT);
        expect_status(s, VistokStatus::Shape, "q");
        let s = attention(null, no_opts, bf, FAKE, &[1, 3, 16, 64], FAKE, &kd, FAKE_MUT, FAKE_MUT);
        expect_status(s, VistokStatus::Shape, "");
        let s = attention(null, no_opts, VISTOK_DTYPE_F32, 0x1002 as *const c_void, &qd, FAKE, &kd, FAKE_MUT, FAKE_MUT);
        expect_status(s, VistokStatus::Alignment, "q");
        let s = attention(null, no_opts, bf, FAKE, &qd, FAKE, &kd, std::ptr::null_mut(), FAKE_MUT);
        expect_status(s, VistokStatus::NullPointer, "out");
        let s = attention(null, no_opts, bf, FAKE, &[usize::MAX, 4, 16, 64], FAKE, &kd, FAKE_MUT, FAKE_MUT);
        assert!(matches!(s, VistokStatus::Overflow | VistokStatus::Shape), "{s:?}: {}", last_error());
        let opts = VistokAttentionOptions { mask: 77, ..zeroed_options() };
        let s = attention(null, &opts, bf, FAKE, &qd, FAKE, &kd, FAKE_MUT, FAKE_MUT);
        expect_status(s, VistokStatus::Invalid, "mask");
        let opts = VistokAttentionOptions { scale: f32::NAN, ..zeroed_options() };
        let s = attention(null, &opts, bf, FAKE, &qd, FAKE, &kd, FAKE_MUT, FAKE_MUT);
        assert!(matches!(s, VistokStatus::NonFinite | VistokStatus::Invalid), "{s:?}: {}", last_error());
    }

    fn zeroed_options() -> VistokAttentionOptions {
        VistokAttentionOptions {
            layout: VISTOK_QKV_BHND,
            scale: 0.0,
            mask: VISTOK_MASK_NONE,
            window_left: 0,
            window_right: 0,
            segments_q: std::ptr::null(),
            segments_k: std::ptr::null(),
            bias: VISTOK_BIAS_NONE,
            bias_data: std::ptr::null(),
            bias_dims: [0; 4],
            bias_rank: 0,
        }
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn dptr<T>(s: &Arc<CudaStream>, b: &CudaSlice<T>) -> *mut c_void {
        b.device_ptr(s).0 as *mut c_void
    }

    /// One causal, key-biased attention through the C ABI on device `ordinal`, on a stream of
    /// its own, checked bit for bit against the Rust CUDA API.
    fn attention_on(dev: *mut VistokCudaDevice, ordinal: usize) {
        let gpu = Gpu::new(ordinal).expect("the device the C handle opened");
        let s = gpu.context().new_stream().expect("a stream");
        let (b, h, hkv, nq, nk, d) = (2, 4, 2, 37, 70, 64);
        let (qd, kd) = ([b, h, nq, d], [b, hkv, nk, d]);
        let key_bias: Vec<f32> = (0..b * nk).map(|i| (i % 5) as f32 * 0.25).collect();
        let opts = VistokAttentionOptions {
            mask: VISTOK_MASK_CAUSAL,
            bias: VISTOK_BIAS_KEY,
            bias_data: key_bias.as_ptr(),
            bias_dims: [b, nk, 0, 0],
            bias_rank: 2,
            ..zeroed_options()
        };
        let to = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
        let (q, k, v) =
            (to(values(b * h * nq * d, 1)), to(values(b * hkv * nk * d, 2)), to(values(b * hkv * nk * d, 3)));
        let a = Attention::new().mask(Mask::Causal).bias(Bias::Key(View::new(&key_bias, &[b, nk]).unwrap()));
        let kernel = AttentionKernel::new(&gpu, &a, DType::BF16, &qd, &kd).unwrap();
        let (want_o, want_lse) = kernel.forward_lse_host(&q, &k, &v).unwrap();
        let (dq, dk, dv) = (s.clone_htod(&q).unwrap(), s.clone_htod(&k).unwrap(), s.clone_htod(&v).unwrap());
        let poison = vec![bf16::from_f32(-7.0); q.len()];
        let (o, lse) = (s.clone_htod(&poison).unwrap(), s.clone_htod(&vec![-7.0f32; b * h * nq]).unwrap());
        // SAFETY: device buffers of the given dims on this device; the stream is of its primary
        // context; `opts` points to live host arrays.
        let st = unsafe {
            vistok_cuda_attention_forward(
                dev,
                s.cu_stream() as *mut c_void,
                &opts,
                VISTOK_DTYPE_BF16,
                dptr(&s, &dq),
                qd.as_ptr(),
                4,
                dptr(&s, &dk),
                dptr(&s, &dv),
                kd.as_ptr(),
                4,
                dptr(&s, &o),
                dptr(&s, &lse),
            )
        };
        expect_status(st, VistokStatus::Ok, "");
        let (got_o, got_lse) = (s.clone_dtoh(&o).unwrap(), s.clone_dtoh(&lse).unwrap());
        s.synchronize().unwrap();
        assert_eq!(
            got_o.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want_o.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            got_lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want_lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn attention_matches_the_rust_cuda_api() {
        let Some(dev) = open(0) else { return };
        attention_on(dev, 0);
        // SAFETY: the handle made above, no use in flight.
        unsafe { vistok_cuda_device_free(dev) };
    }

    #[test]
    fn two_devices_at_once() {
        let n = vistok::cuda::device_count().unwrap_or(0);
        if n < 2 {
            eprintln!("skipped: {n} CUDA device(s), two-device test needs 2");
            return;
        }
        std::thread::scope(|scope| {
            for ordinal in 0..2 {
                scope.spawn(move || {
                    let dev = open(ordinal).expect("device listed by device_count");
                    // Once each on tools/simcuda (scripts/sim-gpu-check.sh), where launches are slow.
                    let reps = if std::env::var("VISTOK_SIMCUDA").as_deref() == Ok("1") { 1 } else { 3 };
                    for _ in 0..reps {
                        attention_on(dev, ordinal);
                    }
                    // SAFETY: the handle made above, no use in flight.
                    unsafe { vistok_cuda_device_free(dev) };
                });
            }
        });
    }
}
