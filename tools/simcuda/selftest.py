#!/usr/bin/env python3
"""The stand-in driver's own checks (scripts/sim-gpu-check.sh runs them after building it):
what it must refuse, as the real driver does, and one launch that writes memory through the
interpreter. Usage: python3 tools/simcuda/selftest.py path/to/libcuda.so. Standard library only."""

import ctypes as C
import sys

PTX = b""".version 8.0
.target sm_80
.address_size 64
.visible .entry store7(
    .param .align 8 .b8 p[8]
)
.maxntid 64, 1, 1
{
    .reg .b64 %a;
    .reg .b32 %t, %v;
    .reg .b64 %o;
    ld.param.u64 %a, [p+0];
    mov.u32 %t, %tid.x;
    mul.wide.u32 %o, %t, 4;
    add.u64 %a, %a, %o;
    add.u32 %v, %t, 7;
    st.global.u32 [%a], %v;
    ret;
}
"""


def main():
    lib = C.CDLL(sys.argv[1])
    checks = 0

    def expect(what, got, want):
        nonlocal checks
        if got != want:
            raise SystemExit(f"simcuda self-test: {what}: got {got}, want {want}")
        checks += 1

    expect("cuInit", lib.cuInit(0), 0)
    ctx = C.c_void_p()
    expect("retain", lib.cuDevicePrimaryCtxRetain(C.byref(ctx), 0), 0)
    expect("device 99", lib.cuDevicePrimaryCtxRetain(C.byref(C.c_void_p()), 99), 101)
    expect("set current", lib.cuCtxSetCurrent(ctx), 0)
    mod = C.c_void_p()
    expect("load", lib.cuModuleLoadData(C.byref(mod), C.c_char_p(PTX)), 0)
    fn = C.c_void_p()
    expect("get function", lib.cuModuleGetFunction(C.byref(fn), mod, b"store7"), 0)
    expect("missing entry", lib.cuModuleGetFunction(C.byref(C.c_void_p()), mod, b"nope"), 500)
    dptr = C.c_ulonglong()
    expect("alloc", lib.cuMemAlloc_v2(C.byref(dptr), C.c_size_t(64 * 4)), 0)
    expect("zero-byte alloc", lib.cuMemAlloc_v2(C.byref(C.c_ulonglong()), C.c_size_t(0)), 1)
    host = (C.c_uint32 * 65)()
    expect("copy past the allocation", lib.cuMemcpyHtoD_v2(dptr, host, C.c_size_t(65 * 4)), 1)
    params = (C.c_ulonglong * 1)(dptr.value)
    args = (C.c_void_p * 1)(C.cast(params, C.c_void_p))
    expect("block over .maxntid", lib.cuLaunchKernel(fn, 1, 1, 1, 128, 1, 1, 0, None, args, None), 1)
    expect("launch", lib.cuLaunchKernel(fn, 1, 1, 1, 64, 1, 1, 0, None, args, None), 0)
    expect("copy back", lib.cuMemcpyDtoH_v2(host, dptr, C.c_size_t(64 * 4)), 0)
    expect("values the kernel stored", list(host[:64]), [t + 7 for t in range(64)])
    # 64 threads of 4 bytes overrun a 63 * 4 byte allocation: the interpreter refuses the launch.
    short = C.c_ulonglong()
    expect("alloc 63 words", lib.cuMemAlloc_v2(C.byref(short), C.c_size_t(63 * 4)), 0)
    params[0] = short.value
    expect("launch writing past its allocation", lib.cuLaunchKernel(fn, 1, 1, 1, 64, 1, 1, 0, None, args, None), 719)
    # Two blocks storing to the same words: the interpreter refuses plain stores writing twice.
    params[0] = dptr.value
    expect("launch writing a byte twice", lib.cuLaunchKernel(fn, 2, 1, 1, 64, 1, 1, 0, None, args, None), 719)
    expect("free 63 words", lib.cuMemFree_v2(short), 0)
    expect("free", lib.cuMemFree_v2(dptr), 0)
    expect("double free", lib.cuMemFree_v2(dptr), 1)
    print(f"simcuda self-test passed: {checks} checks")


if __name__ == "__main__":
    main()
