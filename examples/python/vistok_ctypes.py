#!/usr/bin/env python3
"""Calling vistok's C interface from Python with ctypes + numpy.

    cargo build --release --features capi
    python3 examples/python/vistok_ctypes.py target/release/libvistok.so

Runs LFQ encode, FSQ encode, patchify and codebook argmin on numpy arrays, checks each result
against numpy's own computation, checks one error status and its message, and exits non-zero on
any mismatch. Only ctypes and numpy are needed; the declarations below mirror include/vistok.h.
"""
import ctypes as C
import sys

import numpy as np

# Constants from include/vistok.h.
STATUS_OK, STATUS_LENGTH, STATUS_SHAPE = 0, 2, 3
DTYPE_U8, DTYPE_F32 = 0, 1
BACKEND_CPU = 1
BIT_ORDER_MSB_FIRST = 0
LAYOUT_CHANNELS_FIRST, PATCH_ORDER_CPQ = 0, 0
METRIC_L2 = 0

size_t_p = C.POINTER(C.c_size_t)
u32_p = C.POINTER(C.c_uint32)


class LfqConfig(C.Structure):
    _fields_ = [("groups", C.c_size_t), ("bits", C.c_uint32), ("order", C.c_uint32),
                ("scale", C.c_float), ("spherical", C.c_uint32)]


class PatchConfig(C.Structure):
    _fields_ = [("layout", C.c_uint32), ("order", C.c_uint32), ("patch", C.c_size_t * 3),
                ("pad", C.c_uint32), ("norm_channels", C.c_size_t), ("scale", C.c_float),
                ("mean", C.POINTER(C.c_float)), ("std", C.POINTER(C.c_float))]


def load(path):
    lib = C.CDLL(path)
    h = C.c_void_p  # opaque handles
    sig = {
        "vistok_last_error": ([], C.c_char_p),
        "vistok_version": ([u32_p, u32_p, u32_p], C.c_int),
        "vistok_lfq_new": ([C.POINTER(LfqConfig), C.POINTER(h)], C.c_int),
        "vistok_lfq_free": ([h], None),
        "vistok_lfq_encode": ([h, C.c_uint32, C.c_uint32, C.c_void_p, size_t_p, C.c_size_t, u32_p, C.c_size_t], C.c_int),
        "vistok_fsq_new": ([u32_p, C.c_size_t, C.POINTER(h)], C.c_int),
        "vistok_fsq_free": ([h], None),
        "vistok_fsq_encode": ([h, C.c_uint32, C.c_uint32, C.c_void_p, size_t_p, C.c_size_t, u32_p, C.c_size_t], C.c_int),
        "vistok_patchify_new": ([C.POINTER(PatchConfig), size_t_p, C.c_size_t, C.POINTER(h)], C.c_int),
        "vistok_patchify_free": ([h], None),
        "vistok_patchify_forward": ([h, C.c_uint32, C.c_uint32, C.c_void_p, C.c_size_t, C.c_uint32, C.c_void_p,
                                     C.c_size_t], C.c_int),
        "vistok_codebook_new": ([C.c_uint32, C.c_void_p, size_t_p, C.c_size_t, C.c_uint32, C.POINTER(h)], C.c_int),
        "vistok_codebook_free": ([h], None),
        "vistok_codebook_argmin": ([h, C.c_uint32, C.c_uint32, C.c_void_p, size_t_p, C.c_size_t, u32_p, C.c_size_t,
                                    C.POINTER(C.c_float), C.c_size_t], C.c_int),
    }
    for name, (args, res) in sig.items():
        f = getattr(lib, name)
        f.argtypes, f.restype = args, res
    return lib


class Vistok:
    def __init__(self, path):
        self.lib = load(path)

    def check(self, status, what):
        if status != STATUS_OK:
            raise RuntimeError(f"{what}: status {status}: {self.lib.vistok_last_error().decode()}")

    @staticmethod
    def dims(a):
        return (C.c_size_t * a.ndim)(*a.shape), a.ndim

    @staticmethod
    def ptr(a, t=C.c_void_p):
        assert a.flags["C_CONTIGUOUS"], "vistok takes dense row-major arrays"
        return a.ctypes.data_as(t)

    def lfq_encode(self, z, groups, bits):
        z = np.ascontiguousarray(z, dtype=np.float32)
        cfg = LfqConfig(groups, bits, BIT_ORDER_MSB_FIRST, 0.0, 0)
        h = C.c_void_p()
        self.check(self.lib.vistok_lfq_new(C.byref(cfg), C.byref(h)), "lfq_new")
        try:
            ids = np.empty((z.shape[0], groups), dtype=np.uint32)
            d, r = self.dims(z)
            self.check(self.lib.vistok_lfq_encode(h, BACKEND_CPU, DTYPE_F32, self.ptr(z), d, r, self.ptr(ids, u32_p),
                                                  ids.size), "lfq_encode")
            return ids
        finally:
            self.lib.vistok_lfq_free(h)

    def fsq_encode(self, z, levels):
        z = np.ascontiguousarray(z, dtype=np.float32)
        lv = np.ascontiguousarray(levels, dtype=np.uint32)
        h = C.c_void_p()
        self.check(self.lib.vistok_fsq_new(self.ptr(lv, u32_p), lv.size, C.byref(h)), "fsq_new")
        try:
            ids = np.empty(z.shape[0], dtype=np.uint32)
            d, r = self.dims(z)
            self.check(self.lib.vistok_fsq_encode(h, BACKEND_CPU, DTYPE_F32, self.ptr(z), d, r, self.ptr(ids, u32_p),
                                                  ids.size), "fsq_encode")
            return ids
        finally:
            self.lib.vistok_fsq_free(h)

    def patchify(self, image, p):
        """u8 NCHW image -> f32 tokens [B, L, C*p*p] (timm order), no normalisation."""
        image = np.ascontiguousarray(image, dtype=np.uint8)
        b, c, hh, ww = image.shape
        cfg = PatchConfig(LAYOUT_CHANNELS_FIRST, PATCH_ORDER_CPQ, (C.c_size_t * 3)(1, p, p), 0, 0, 0.0, None, None)
        h = C.c_void_p()
        d, r = self.dims(image)
        self.check(self.lib.vistok_patchify_new(C.byref(cfg), d, r, C.byref(h)), "patchify_new")
        try:
            tokens = np.empty((b, (hh // p) * (ww // p), c * p * p), dtype=np.float32)
            self.check(self.lib.vistok_patchify_forward(h, BACKEND_CPU, DTYPE_U8, self.ptr(image), image.size,
                                                        DTYPE_F32, self.ptr(tokens), tokens.size), "patchify")
            return tokens
        finally:
            self.lib.vistok_patchify_free(h)

    def codebook(self, entries):
        entries = np.ascontiguousarray(entries, dtype=np.float32)
        h = C.c_void_p()
        d, r = self.dims(entries)
        self.check(self.lib.vistok_codebook_new(DTYPE_F32, self.ptr(entries), d, r, METRIC_L2, C.byref(h)),
                   "codebook_new")
        return h

    def argmin(self, cb, x, n_out=None):
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0] if n_out is None else n_out
        idx = np.empty(n, dtype=np.uint32)
        dist = np.empty(n, dtype=np.float32)
        d, r = self.dims(x)
        status = self.lib.vistok_codebook_argmin(cb, BACKEND_CPU, DTYPE_F32, self.ptr(x), d, r, self.ptr(idx, u32_p),
                                                 idx.size, self.ptr(dist, C.POINTER(C.c_float)), dist.size)
        return status, idx, dist


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    v = Vistok(sys.argv[1])
    rng = np.random.default_rng(0)
    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    major, minor, patch = C.c_uint32(), C.c_uint32(), C.c_uint32()
    v.check(v.lib.vistok_version(C.byref(major), C.byref(minor), C.byref(patch)), "version")
    print(f"libvistok {major.value}.{minor.value}.{patch.value}")

    # LFQ: bit k of group g is z > 0, channel 0 the most significant bit. Nonzero inputs only, so
    # the sign of zero does not matter.
    groups, bits = 3, 6
    z = rng.choice([-1.0, 1.0], size=(257, groups * bits)) * rng.uniform(0.01, 3.0, size=(257, groups * bits))
    ids = v.lfq_encode(z, groups, bits)
    weights = 1 << np.arange(bits - 1, -1, -1)
    want = ((z.reshape(257, groups, bits) > 0) * weights).sum(axis=2).astype(np.uint32)
    check(np.array_equal(ids, want), "lfq encode == numpy sign bits")

    # FSQ: for odd levels the shift is 0, so level = round(tanh(z)·(L−1)(1+1e−3)/2) + ⌊L/2⌋
    # and id = Σ level_i·basis_i. Inputs stay clear of rounding boundaries.
    levels = np.array([5, 7, 3], dtype=np.uint32)
    target = rng.integers(0, levels, size=(100, 3))
    half_l = (levels - 1) * (1 + 1e-3) / 2
    zq = np.arctanh((target - levels // 2) / half_l)
    ids = v.fsq_encode(zq, levels)
    basis = np.cumprod(np.concatenate([[1], levels[:-1]]))
    lv = np.rint(np.tanh(zq.astype(np.float32).astype(np.float64)) * half_l) + levels // 2
    check(np.array_equal(ids, (lv * basis).sum(axis=1).astype(np.uint32)), "fsq encode == numpy levels")

    # Patchify: [B, C, H, W] -> [B, (H/p)(W/p), C·p·p] by reshape and transpose.
    image = rng.integers(0, 256, size=(2, 3, 32, 48), dtype=np.uint8)
    p = 16
    tokens = v.patchify(image, p)
    b, c, hh, ww = image.shape
    want = image.reshape(b, c, hh // p, p, ww // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    check(np.array_equal(tokens, want.astype(np.float32)), "patchify == numpy reshape/transpose")

    # Argmin: well-separated codes, x = a code plus small noise; numpy's full distance matrix.
    entries = rng.normal(size=(64, 8)).astype(np.float32) * 10
    pick = rng.integers(0, 64, size=500)
    x = entries[pick] + rng.normal(scale=0.1, size=(500, 8)).astype(np.float32)
    cb = v.codebook(entries)
    try:
        status, idx, dist = v.argmin(cb, x)
        v.check(status, "argmin")
        d2 = ((x[:, None, :].astype(np.float64) - entries[None, :, :]) ** 2).sum(axis=2)
        check(np.array_equal(idx, d2.argmin(axis=1)) and np.array_equal(idx, pick), "argmin == numpy distance matrix")
        check(np.allclose(dist, d2.min(axis=1), rtol=1e-4, atol=1e-5), "argmin distances")

        # An error: a too-short output is VISTOK_STATUS_LENGTH with a message naming it.
        status, _, _ = v.argmin(cb, x, n_out=499)
        msg = v.lib.vistok_last_error().decode()
        print(f"     (expected error: status {status}: {msg})")
        check(status == STATUS_LENGTH and "indices" in msg, "short output -> VISTOK_STATUS_LENGTH")
    finally:
        v.lib.vistok_codebook_free(cb)

    if failures:
        print(f"{len(failures)} check(s) failed")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
