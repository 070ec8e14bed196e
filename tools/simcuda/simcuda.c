/* simcuda: a stand-in for libcuda.so that runs kernels on kernels/ptx_sim.py.
 *
 * Why: the CUDA backend's host code (cudarc calls, buffer sizes, grids, parameter blocks,
 * multi-launch sequences, streams, the C ABI's device entry points) cannot run on machines
 * without a GPU. Loaded in place of the driver (LD_LIBRARY_PATH=<dir with libcuda.so.1>), this
 * library implements the part of the driver API the crate uses, synchronously and on host
 * memory, and runs every cuLaunchKernel on the strict PTX interpreter. The interpreter fails a
 * launch that reads or writes outside every live allocation of the launching context, writes a
 * byte twice with plain stores, reads a shared-memory byte its block did not write, reads an
 * unset register, etc.; the driver fails copies and
 * memsets that leave their allocation, frees of unknown pointers, zero-byte allocations, and
 * launches with more threads per block than the entry's `.maxntid`, with more dynamic shared
 * memory than the entry allows (48 KB unless raised by cuFuncSetAttribute), or on another
 * context's stream. scripts/sim-gpu-check.sh builds it, runs tools/simcuda/selftest.py, then the suites.
 *
 * It is a test tool, not a GPU: no concurrency between streams (every call completes before it
 * returns, which is one legal ordering of the real driver's; a launch writes every allocation
 * of its context back when it ends, so copies and memsets wait for running launches, under the
 * same lock), no timing, no JIT (a module is
 * checked by the interpreter's parser at the first launch), and device pointers are host
 * addresses (256-aligned). Environment:
 *   VISTOK_SIMCUDA_RUNNER  path of tools/simcuda/runner.py (default: compiled in)
 *   VISTOK_SIMCUDA_DEVICES number of devices (default 2)
 *   VISTOK_SIMCUDA_SMS     multiprocessors per device (default 132, as an H200)
 *   VISTOK_SIMCUDA_TRACE   1: print every launch to stderr
 * C99 + POSIX; no CUDA headers: the few types are declared here with the driver's ABI.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SIMCUDA_RUNNER
#define SIMCUDA_RUNNER "tools/simcuda/runner.py"
#endif

#define EXPORT __attribute__((visibility("default")))

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_PTX = 218,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_UNKNOWN = 999,
};

/* ------------------------------------------------------------------------------------------ */
/* State. One lock for everything: calls are short except launches, which are serialized.     */
/* ------------------------------------------------------------------------------------------ */

#define MAGIC_CTX 0x43545843u
#define MAGIC_STREAM 0x5354524du
#define MAGIC_EVENT 0x45564e54u
#define MAGIC_MODULE 0x4d4f444cu
#define MAGIC_FUNC 0x46554e43u

typedef struct Ctx {
    unsigned magic;
    int device;
    int refs; /* primary-context retain count */
} Ctx;

typedef struct Stream {
    unsigned magic;
    Ctx *ctx;
} Stream;

typedef struct Event {
    unsigned magic;
} Event;

typedef struct Module {
    unsigned magic;
    Ctx *ctx;
    char path[512]; /* the PTX text, written once for the interpreter */
    char *text;
} Module;

typedef struct Func {
    unsigned magic;
    Module *module;
    char name[256];
    size_t param_bytes;
    unsigned long long max_threads; /* from `.maxntid x, y, z`; 1024 when not declared */
    int max_dynamic_shared;         /* CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (48 KB default) */
} Func;

typedef struct Alloc {
    unsigned char *ptr;
    size_t size;
    Ctx *ctx;
} Alloc;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int initialized;
static int n_devices = 2;
static int n_sms = 132;
static int trace;
static Ctx contexts[16];
static Alloc *allocs;
static size_t n_allocs, cap_allocs;
static char workdir[256];
static unsigned long launch_count;
static pid_t runner_pid;
static FILE *runner_in, *runner_out;
static __thread Ctx *current;

static void note(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("simcuda: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static int env_int(const char *name, int dflt) {
    const char *v = getenv(name);
    return v && *v ? atoi(v) : dflt;
}

static Ctx extra_contexts[16]; /* non-primary contexts (cuCtxCreate_v4); magic 0 when free */

static Ctx *as_ctx(void *p) {
    Ctx *c = (Ctx *)p;
    for (int i = 0; i < n_devices; i++)
        if (c == &contexts[i]) return c;
    for (int i = 0; i < 16; i++)
        if (c == &extra_contexts[i] && c->magic == MAGIC_CTX) return c;
    return NULL;
}

/* The context a stream handle belongs to: NULL (legacy default stream) and the per-thread
 * default stream (0x2) are the current context's. */
static Ctx *stream_ctx(void *s) {
    if (s == NULL || s == (void *)0x1 || s == (void *)0x2) return current;
    Stream *st = (Stream *)s;
    return st->magic == MAGIC_STREAM ? st->ctx : NULL;
}

/* The allocation holding [p, p + n), or NULL. */
static Alloc *find_alloc(CUdeviceptr p, size_t n) {
    for (size_t i = 0; i < n_allocs; i++) {
        uintptr_t s = (uintptr_t)allocs[i].ptr;
        if (p >= s && p - s <= allocs[i].size && n <= allocs[i].size - (p - s)) return &allocs[i];
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Init, devices, contexts.                                                                   */
/* ------------------------------------------------------------------------------------------ */

EXPORT CUresult cuInit(unsigned flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&lock);
    if (!initialized) {
        n_devices = env_int("VISTOK_SIMCUDA_DEVICES", 2);
        if (n_devices < 0) n_devices = 0;
        if (n_devices > 16) n_devices = 16;
        n_sms = env_int("VISTOK_SIMCUDA_SMS", 132);
        trace = env_int("VISTOK_SIMCUDA_TRACE", 0);
        for (int i = 0; i < 16; i++) contexts[i] = (Ctx){MAGIC_CTX, i, 0};
        initialized = 1;
    }
    pthread_mutex_unlock(&lock);
    return n_devices ? CUDA_SUCCESS : CUDA_ERROR_NO_DEVICE;
}

EXPORT CUresult cuDriverGetVersion(int *v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 12080;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetCount(int *n) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *n = n_devices;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal < 0 || ordinal >= n_devices) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (d < 0 || d >= n_devices) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "simcuda (ptx_sim) device %d", d);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) {
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (d < 0 || d >= n_devices) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = (size_t)1 << 32;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    if (d < 0 || d >= n_devices) return CUDA_ERROR_INVALID_DEVICE;
    switch (attr) {
    case 1: *v = 1024; break;                 /* MAX_THREADS_PER_BLOCK */
    case 2: *v = 1024; break;                 /* MAX_BLOCK_DIM_X */
    case 3: *v = 1024; break;                 /* MAX_BLOCK_DIM_Y */
    case 4: *v = 64; break;                   /* MAX_BLOCK_DIM_Z */
    case 5: *v = 2147483647; break;           /* MAX_GRID_DIM_X */
    case 6: *v = 65535; break;                /* MAX_GRID_DIM_Y */
    case 7: *v = 65535; break;                /* MAX_GRID_DIM_Z */
    case 8: *v = 49152; break;                /* MAX_SHARED_MEMORY_PER_BLOCK */
    case 10: *v = 32; break;                  /* WARP_SIZE */
    case 13: *v = 1980000; break;             /* CLOCK_RATE (kHz) */
    case 16: *v = n_sms; break;               /* MULTIPROCESSOR_COUNT */
    case 36: *v = 2619000; break;             /* MEMORY_CLOCK_RATE (kHz) */
    case 37: *v = 6144; break;                /* GLOBAL_MEMORY_BUS_WIDTH */
    case 38: *v = 60 << 20; break;            /* L2_CACHE_SIZE */
    case 39: *v = 2048; break;                /* MAX_THREADS_PER_MULTIPROCESSOR */
    case 41: *v = 1; break;                   /* UNIFIED_ADDRESSING */
    case 75: *v = 9; break;                   /* COMPUTE_CAPABILITY_MAJOR */
    case 76: *v = 0; break;                   /* COMPUTE_CAPABILITY_MINOR */
    case 81: *v = 233472; break;              /* MAX_SHARED_MEMORY_PER_MULTIPROCESSOR */
    case 82: *v = 65536; break;               /* MAX_REGISTERS_PER_MULTIPROCESSOR */
    case 97: *v = 232448; break;              /* MAX_SHARED_MEMORY_PER_BLOCK_OPTIN */
    case 115: *v = 1; break;                  /* MEMORY_POOLS_SUPPORTED */
    default:
        note("cuDeviceGetAttribute(%d): not modelled, answering 0", attr);
        *v = 0;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxRetain(void **pctx, CUdevice d) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    if (d < 0 || d >= n_devices) return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&lock);
    contexts[d].refs++;
    pthread_mutex_unlock(&lock);
    *pctx = &contexts[d];
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    if (d < 0 || d >= n_devices) return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&lock);
    CUresult r = contexts[d].refs > 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
    if (contexts[d].refs > 0) contexts[d].refs--;
    pthread_mutex_unlock(&lock);
    return r;
}

/* A non-primary context of device d, made current (as the driver does); at most 16 live. */
EXPORT CUresult cuCtxCreate_v4(void **pctx, void *params, unsigned flags, CUdevice d) {
    (void)flags;
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!pctx || params) return CUDA_ERROR_INVALID_VALUE;
    if (d < 0 || d >= n_devices) return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&lock);
    Ctx *c = NULL;
    for (int i = 0; i < 16 && !c; i++)
        if (extra_contexts[i].magic != MAGIC_CTX) c = &extra_contexts[i];
    if (c) *c = (Ctx){MAGIC_CTX, d, 1};
    pthread_mutex_unlock(&lock);
    if (!c) return CUDA_ERROR_OUT_OF_MEMORY;
    *pctx = c;
    current = c;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxDestroy_v2(void *ctx) {
    pthread_mutex_lock(&lock);
    int ok = 0;
    for (int i = 0; i < 16; i++)
        if (ctx == &extra_contexts[i] && extra_contexts[i].magic == MAGIC_CTX) {
            extra_contexts[i].magic = 0;
            ok = 1;
        }
    if (ok && current == ctx) current = NULL;
    pthread_mutex_unlock(&lock);
    return ok ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
}

EXPORT CUresult cuCtxSetCurrent(void *ctx) {
    if (ctx && !as_ctx(ctx)) return CUDA_ERROR_INVALID_CONTEXT;
    current = (Ctx *)ctx;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetCurrent(void **pctx) {
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    *pctx = current;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxPushCurrent_v2(void *ctx) { return cuCtxSetCurrent(ctx); }

EXPORT CUresult cuCtxPopCurrent_v2(void **pctx) {
    if (pctx) *pctx = current;
    current = NULL;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetDevice(CUdevice *d) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;
    *d = current->device;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSynchronize(void) { return current ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT; }

/* ------------------------------------------------------------------------------------------ */
/* Streams and events: every operation completes before its call returns.                     */
/* ------------------------------------------------------------------------------------------ */

EXPORT CUresult cuStreamCreate(void **ps, unsigned flags) {
    (void)flags;
    if (!ps) return CUDA_ERROR_INVALID_VALUE;
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;
    Stream *s = calloc(1, sizeof *s);
    if (!s) return CUDA_ERROR_OUT_OF_MEMORY;
    *s = (Stream){MAGIC_STREAM, current};
    *ps = s;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamCreateWithPriority(void **ps, unsigned flags, int priority) {
    (void)priority;
    return cuStreamCreate(ps, flags);
}

EXPORT CUresult cuStreamDestroy_v2(void *s) {
    Stream *st = (Stream *)s;
    if (!st || st->magic != MAGIC_STREAM) return CUDA_ERROR_INVALID_HANDLE;
    st->magic = 0;
    free(st);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamSynchronize(void *s) { return stream_ctx(s) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }
EXPORT CUresult cuStreamQuery(void *s) { return cuStreamSynchronize(s); }

EXPORT CUresult cuStreamGetCtx(void *s, void **pctx) {
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    Ctx *c = stream_ctx(s);
    if (!c) return CUDA_ERROR_INVALID_HANDLE;
    *pctx = c;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamWaitEvent(void *s, void *e, unsigned flags) {
    (void)flags;
    Event *ev = (Event *)e;
    if (!stream_ctx(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (!ev || ev->magic != MAGIC_EVENT) return CUDA_ERROR_INVALID_HANDLE;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventCreate(void **pe, unsigned flags) {
    (void)flags;
    if (!pe) return CUDA_ERROR_INVALID_VALUE;
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;
    Event *e = calloc(1, sizeof *e);
    if (!e) return CUDA_ERROR_OUT_OF_MEMORY;
    e->magic = MAGIC_EVENT;
    *pe = e;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventRecord(void *e, void *s) {
    Event *ev = (Event *)e;
    if (!ev || ev->magic != MAGIC_EVENT) return CUDA_ERROR_INVALID_HANDLE;
    return stream_ctx(s) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

EXPORT CUresult cuEventRecordWithFlags(void *e, void *s, unsigned flags) {
    (void)flags;
    return cuEventRecord(e, s);
}

EXPORT CUresult cuEventSynchronize(void *e) {
    Event *ev = (Event *)e;
    return ev && ev->magic == MAGIC_EVENT ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

EXPORT CUresult cuEventQuery(void *e) { return cuEventSynchronize(e); }

EXPORT CUresult cuEventElapsedTime(float *ms, void *a, void *b) {
    if (!ms || cuEventSynchronize(a) || cuEventSynchronize(b)) return CUDA_ERROR_INVALID_HANDLE;
    *ms = 1.0f; /* no timing here */
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventElapsedTime_v2(float *ms, void *a, void *b) { return cuEventElapsedTime(ms, a, b); }

EXPORT CUresult cuEventDestroy_v2(void *e) {
    Event *ev = (Event *)e;
    if (!ev || ev->magic != MAGIC_EVENT) return CUDA_ERROR_INVALID_HANDLE;
    ev->magic = 0;
    free(ev);
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------------------------ */
/* Memory.                                                                                     */
/* ------------------------------------------------------------------------------------------ */

static CUresult mem_alloc(CUdeviceptr *p, size_t n, Ctx *ctx) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    if (!ctx) return CUDA_ERROR_INVALID_CONTEXT;
    if (n == 0) return CUDA_ERROR_INVALID_VALUE; /* as cuMemAlloc documents */
    size_t rounded = (n + 255) / 256 * 256;
    void *m = aligned_alloc(256, rounded);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    memset(m, 0xA5, rounded); /* device memory starts as garbage, never zeros */
    pthread_mutex_lock(&lock);
    if (n_allocs == cap_allocs) {
        size_t cap = cap_allocs ? cap_allocs * 2 : 64;
        Alloc *a = realloc(allocs, cap * sizeof *a);
        if (!a) {
            pthread_mutex_unlock(&lock);
            free(m);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        allocs = a;
        cap_allocs = cap;
    }
    allocs[n_allocs++] = (Alloc){m, n, ctx};
    pthread_mutex_unlock(&lock);
    *p = (CUdeviceptr)(uintptr_t)m;
    return CUDA_SUCCESS;
}

static CUresult mem_free(CUdeviceptr p) {
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < n_allocs; i++) {
        if ((uintptr_t)allocs[i].ptr == p) {
            memset(allocs[i].ptr, 0xDD, allocs[i].size);
            free(allocs[i].ptr);
            allocs[i] = allocs[--n_allocs];
            pthread_mutex_unlock(&lock);
            return CUDA_SUCCESS;
        }
    }
    pthread_mutex_unlock(&lock);
    note("free of %#llx, which is not an allocation", p);
    return CUDA_ERROR_INVALID_VALUE;
}

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) { return mem_alloc(p, n, current); }
EXPORT CUresult cuMemAllocAsync(CUdeviceptr *p, size_t n, void *s) { return mem_alloc(p, n, stream_ctx(s)); }
EXPORT CUresult cuMemFree_v2(CUdeviceptr p) { return mem_free(p); }

EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, void *s) {
    if (!stream_ctx(s)) return CUDA_ERROR_INVALID_HANDLE;
    return mem_free(p);
}

EXPORT CUresult cuMemGetInfo_v2(size_t *free_b, size_t *total) {
    if (free_b) *free_b = (size_t)1 << 31;
    if (total) *total = (size_t)1 << 32;
    return CUDA_SUCCESS;
}

/* Device range [p, p + n) must lie inside one live allocation. */
static CUresult check_range(const char *what, CUdeviceptr p, size_t n) {
    if (n == 0) return CUDA_SUCCESS;
    pthread_mutex_lock(&lock);
    Alloc *a = find_alloc(p, n);
    pthread_mutex_unlock(&lock);
    if (!a) {
        note("%s: %zu bytes at %#llx are not inside one allocation", what, n, p);
        return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
    CUresult r = check_range("cuMemcpyHtoD", dst, n);
    if (r) return r;
    pthread_mutex_lock(&lock); /* not while a launch has the allocations out (see cuLaunchKernel) */
    if (n) memcpy((void *)(uintptr_t)dst, src, n);
    pthread_mutex_unlock(&lock);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
    CUresult r = check_range("cuMemcpyDtoH", src, n);
    if (r) return r;
    pthread_mutex_lock(&lock);
    if (n) memcpy(dst, (void *)(uintptr_t)src, n);
    pthread_mutex_unlock(&lock);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    CUresult r = check_range("cuMemcpyDtoD (dst)", dst, n);
    if (!r) r = check_range("cuMemcpyDtoD (src)", src, n);
    if (r) return r;
    pthread_mutex_lock(&lock);
    if (n) memmove((void *)(uintptr_t)dst, (void *)(uintptr_t)src, n);
    pthread_mutex_unlock(&lock);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, void *s) {
    if (!stream_ctx(s)) return CUDA_ERROR_INVALID_HANDLE;
    return cuMemcpyHtoD_v2(dst, src, n);
}

EXPORT CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, void *s) {
    if (!stream_ctx(s)) return CUDA_ERROR_INVALID_HANDLE;
    return cuMemcpyDtoH_v2(dst, src, n);
}

EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void *s) {
    if (!stream_ctx(s)) return CUDA_ERROR_INVALID_HANDLE;
    return cuMemcpyDtoD_v2(dst, src, n);
}

static CUresult memset_n(CUdeviceptr dst, const void *v, size_t w, size_t count, void *s) {
    if (!stream_ctx(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (dst % w) return CUDA_ERROR_INVALID_VALUE;
    CUresult r = check_range("cuMemset", dst, w * count);
    if (r) return r;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < count; i++) memcpy((unsigned char *)(uintptr_t)dst + i * w, v, w);
    pthread_mutex_unlock(&lock);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void *s) { return memset_n(d, &v, 1, n, s); }
EXPORT CUresult cuMemsetD16Async(CUdeviceptr d, unsigned short v, size_t n, void *s) { return memset_n(d, &v, 2, n, s); }
EXPORT CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, void *s) { return memset_n(d, &v, 4, n, s); }
EXPORT CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) { return memset_n(d, &v, 1, n, NULL); }
EXPORT CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned v, size_t n) { return memset_n(d, &v, 4, n, NULL); }

/* Pinned host memory: plain host memory here. */
EXPORT CUresult cuMemAllocHost_v2(void **p, size_t n) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    *p = aligned_alloc(256, (n + 255) / 256 * 256);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

EXPORT CUresult cuMemHostAlloc(void **p, size_t n, unsigned flags) {
    (void)flags;
    return cuMemAllocHost_v2(p, n);
}

EXPORT CUresult cuMemFreeHost(void *p) {
    free(p);
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------------------------ */
/* Modules and launches.                                                                       */
/* ------------------------------------------------------------------------------------------ */

static CUresult ensure_workdir(void) {
    if (workdir[0]) return CUDA_SUCCESS;
    const char *tmp = getenv("TMPDIR");
    snprintf(workdir, sizeof workdir, "%s/simcuda-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(workdir)) {
        note("mkdtemp: %s", strerror(errno));
        workdir[0] = 0;
        return CUDA_ERROR_UNKNOWN;
    }
    return CUDA_SUCCESS;
}

static void cleanup(void) {
    if (runner_in) {
        fclose(runner_in);
        runner_in = NULL;
        if (runner_out) fclose(runner_out);
        waitpid(runner_pid, NULL, 0);
    }
    if (workdir[0] && !getenv("VISTOK_SIMCUDA_KEEP")) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", workdir);
        if (system(cmd) != 0) note("could not remove %s", workdir);
    }
}

EXPORT CUresult cuModuleLoadData(void **pm, const void *image) {
    if (!pm || !image) return CUDA_ERROR_INVALID_VALUE;
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;
    const char *text = (const char *)image;
    if (!strstr(text, ".version") || !strstr(text, ".target")) return CUDA_ERROR_INVALID_PTX;
    pthread_mutex_lock(&lock);
    CUresult r = ensure_workdir();
    static int registered;
    if (!r && !registered) {
        atexit(cleanup);
        registered = 1;
    }
    static unsigned long n_modules;
    unsigned long id = n_modules++;
    pthread_mutex_unlock(&lock);
    if (r) return r;
    Module *m = calloc(1, sizeof *m);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    m->magic = MAGIC_MODULE;
    m->ctx = current;
    m->text = strdup(text);
    snprintf(m->path, sizeof m->path, "%s/module%lu.ptx", workdir, id);
    FILE *f = fopen(m->path, "w");
    if (!f || !m->text || fputs(text, f) < 0 || fclose(f) != 0) {
        free(m->text);
        free(m);
        return CUDA_ERROR_UNKNOWN;
    }
    *pm = m;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleUnload(void *mod) {
    Module *m = (Module *)mod;
    if (!m || m->magic != MAGIC_MODULE) return CUDA_ERROR_INVALID_HANDLE;
    m->magic = 0;
    free(m->text);
    /* the file stays: the interpreter caches parsed modules by path */
    free(m);
    return CUDA_SUCCESS;
}

/* `.visible .entry NAME(` ... `)`: the size of its single `.param .align A .b8 p[N]`, or 0 if
 * the entry is absent, (size_t)-1 if its parameter list is not one such block; `*max_threads`
 * (if not NULL) gets the block size its `.maxntid` allows. */
static size_t entry_param_bytes(const char *text, const char *name, unsigned long long *max_threads) {
    size_t nl = strlen(name);
    for (const char *p = strstr(text, ".entry"); p; p = strstr(p + 6, ".entry")) {
        const char *q = p + 6;
        while (*q == ' ' || *q == '\t') q++;
        if (strncmp(q, name, nl) != 0) continue;
        q += nl;
        while (*q == ' ' || *q == '\t' || *q == '\n') q++;
        if (*q != '(') continue;
        const char *close = strchr(q, ')');
        const char *b8 = strstr(q, ".b8");
        const char *br = b8 ? strchr(b8, '[') : NULL;
        if (!close || !b8 || b8 > close || !br || br > close) return (size_t)-1;
        if (strstr(b8 + 3, ".param") && strstr(b8 + 3, ".param") < close) return (size_t)-1;
        if (max_threads) {
            /* `.maxntid x, y, z` between the parameter list and the body */
            const char *body = strchr(close, '{');
            const char *mx = strstr(close, ".maxntid");
            *max_threads = 1024;
            if (mx && body && mx < body) {
                unsigned long long x = 1, y = 1, z = 1;
                int n = sscanf(mx + 8, " %llu , %llu , %llu", &x, &y, &z);
                if (n >= 1) *max_threads = x * (n >= 2 ? y : 1) * (n >= 3 ? z : 1);
            }
        }
        return (size_t)strtoull(br + 1, NULL, 10);
    }
    return 0;
}

EXPORT CUresult cuModuleGetFunction(void **pf, void *mod, const char *name) {
    Module *m = (Module *)mod;
    if (!pf || !name) return CUDA_ERROR_INVALID_VALUE;
    if (!m || m->magic != MAGIC_MODULE) return CUDA_ERROR_INVALID_HANDLE;
    unsigned long long max_threads = 1024;
    size_t bytes = entry_param_bytes(m->text, name, &max_threads);
    if (bytes == 0) return CUDA_ERROR_NOT_FOUND;
    if (bytes == (size_t)-1 || strlen(name) >= sizeof((Func *)0)->name) {
        note("entry %s: only one `.param .align A .b8 p[N]` block is modelled", name);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    Func *f = calloc(1, sizeof *f);
    if (!f) return CUDA_ERROR_OUT_OF_MEMORY;
    f->magic = MAGIC_FUNC;
    f->module = m;
    f->param_bytes = bytes;
    f->max_threads = max_threads;
    f->max_dynamic_shared = 49152;
    strcpy(f->name, name);
    *pf = f;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncGetAttribute(int *v, int attr, void *func) {
    Func *f = (Func *)func;
    if (!v || !f || f->magic != MAGIC_FUNC) return CUDA_ERROR_INVALID_VALUE;
    *v = attr == 0 ? 1024 : 0; /* MAX_THREADS_PER_BLOCK */
    return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncSetAttribute(void *func, int attr, int v) {
    Func *f = (Func *)func;
    if (!f || f->magic != MAGIC_FUNC) return CUDA_ERROR_INVALID_HANDLE;
    if (attr == 8) { /* MAX_DYNAMIC_SHARED_SIZE_BYTES: up to the opt-in limit (attribute 97) */
        if (v < 0 || v > 232448) return CUDA_ERROR_INVALID_VALUE;
        f->max_dynamic_shared = v;
    }
    return CUDA_SUCCESS;
}

static CUresult start_runner(void) {
    if (runner_in) return CUDA_SUCCESS;
    const char *runner = getenv("VISTOK_SIMCUDA_RUNNER");
    if (!runner || !*runner) runner = SIMCUDA_RUNNER;
    int to[2], from[2];
    if (pipe(to) || pipe(from)) return CUDA_ERROR_UNKNOWN;
    pid_t pid = fork();
    if (pid < 0) return CUDA_ERROR_UNKNOWN;
    if (pid == 0) {
        dup2(to[0], 0);
        dup2(from[1], 1);
        close(to[0]);
        close(to[1]);
        close(from[0]);
        close(from[1]);
        execlp("python3", "python3", runner, (char *)NULL);
        fprintf(stderr, "simcuda: cannot run python3 %s: %s\n", runner, strerror(errno));
        _exit(127);
    }
    close(to[0]);
    close(from[1]);
    runner_pid = pid;
    runner_in = fdopen(to[1], "w");
    runner_out = fdopen(from[0], "r");
    return runner_in && runner_out ? CUDA_SUCCESS : CUDA_ERROR_UNKNOWN;
}

static int write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = n ? fwrite(data, 1, n, f) : 0;
    return (fclose(f) != 0 || w != n) ? -1 : 0;
}

static int read_file(const char *path, void *data, size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    size_t r = n ? fread(data, 1, n, f) : 0;
    fclose(f);
    return r == n ? 0 : -1;
}

EXPORT CUresult cuLaunchKernel(void *func, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned shmem, void *s, void **params, void **extra) {
    Func *f = (Func *)func;
    if (!f || f->magic != MAGIC_FUNC) return CUDA_ERROR_INVALID_HANDLE;
    Ctx *ctx = stream_ctx(s);
    if (!ctx) return CUDA_ERROR_INVALID_HANDLE;
    if (ctx != f->module->ctx) {
        note("%s: launched on a stream of another context than its module's", f->name);
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if (!gx || !gy || !gz || !bx || !by || !bz || gy > 65535 || gz > 65535 || bz > 64 ||
        (unsigned long long)bx * by * bz > 1024) {
        note("%s: bad launch configuration grid (%u, %u, %u) block (%u, %u, %u)", f->name, gx, gy, gz, bx, by, bz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if ((unsigned long long)bx * by * bz > f->max_threads) {
        /* the real driver refuses it (CUDA_ERROR_INVALID_VALUE): ptxas sized the registers for .maxntid */
        note("%s: block (%u, %u, %u) exceeds the entry's .maxntid (%llu threads)", f->name, bx, by, bz, f->max_threads);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (extra != NULL || params == NULL || params[0] == NULL) {
        note("%s: only kernelParams with one parameter block are modelled", f->name);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (shmem > (unsigned)f->max_dynamic_shared) {
        /* the real driver refuses it: above 48 KB needs cuFuncSetAttribute first */
        note("%s: %u bytes of dynamic shared memory above the entry's limit (%d)", f->name, shmem, f->max_dynamic_shared);
        return CUDA_ERROR_INVALID_VALUE;
    }
    pthread_mutex_lock(&lock);
    CUresult r = start_runner();
    unsigned long id = launch_count++;
    char job[600], path[700];
    snprintf(job, sizeof job, "%s/job%lu.json", workdir, id);
    FILE *j = r ? NULL : fopen(job, "w");
    if (!j) {
        pthread_mutex_unlock(&lock);
        return CUDA_ERROR_UNKNOWN;
    }
    fprintf(j, "{\"ptx\": \"%s\", \"kernel\": \"%s\", \"grid\": [%u, %u, %u], \"block\": [%u, %u, %u],\n"
               " \"shared_reads\": \"written\", \"dynamic_shared\": %u, \"params\": \"",
            f->module->path, f->name, gx, gy, gz, bx, by, bz, shmem);
    const unsigned char *pb = (const unsigned char *)params[0];
    for (size_t i = 0; i < f->param_bytes; i++) fprintf(j, "%02x", pb[i]);
    fprintf(j, "\",\n \"buffers\": [");
    int first = 1, bad = 0;
    for (size_t i = 0; i < n_allocs; i++) {
        if (allocs[i].ctx != ctx) continue;
        snprintf(path, sizeof path, "%s/b%zu.bin", workdir, i);
        bad |= write_file(path, allocs[i].ptr, allocs[i].size);
        fprintf(j, "%s\n  {\"name\": \"alloc%zu\", \"addr\": %llu, \"file\": \"b%zu.bin\", \"writable\": true, \"out\": \"b%zu.out\"}",
                first ? "" : ",", i, (unsigned long long)(uintptr_t)allocs[i].ptr, i, i);
        first = 0;
    }
    fprintf(j, "]}\n");
    bad |= fclose(j) != 0;
    if (bad) {
        pthread_mutex_unlock(&lock);
        return CUDA_ERROR_UNKNOWN;
    }
    if (trace) note("launch %lu: %s grid (%u, %u, %u) block (%u, %u, %u)", id, f->name, gx, gy, gz, bx, by, bz);
    fprintf(runner_in, "%s\n", job);
    fflush(runner_in);
    char reply[4096];
    if (!fgets(reply, sizeof reply, runner_out)) {
        pthread_mutex_unlock(&lock);
        note("%s: the interpreter died", f->name);
        return CUDA_ERROR_LAUNCH_FAILED;
    }
    if (strncmp(reply, "ok", 2) != 0) {
        pthread_mutex_unlock(&lock);
        note("%s (grid %u, %u, %u; block %u, %u, %u) failed on the interpreter: %s", f->name, gx, gy, gz, bx, by, bz, reply);
        return CUDA_ERROR_LAUNCH_FAILED;
    }
    for (size_t i = 0; i < n_allocs; i++) {
        if (allocs[i].ctx != ctx) continue;
        snprintf(path, sizeof path, "%s/b%zu.out", workdir, i);
        bad |= read_file(path, allocs[i].ptr, allocs[i].size);
        unlink(path);
        snprintf(path, sizeof path, "%s/b%zu.bin", workdir, i);
        unlink(path);
    }
    if (!getenv("VISTOK_SIMCUDA_KEEP")) unlink(job);
    pthread_mutex_unlock(&lock);
    return bad ? CUDA_ERROR_UNKNOWN : CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------------------------ */
/* Errors.                                                                                     */
/* ------------------------------------------------------------------------------------------ */

static const char *error_name(CUresult r) {
    switch (r) {
    case CUDA_SUCCESS: return "CUDA_SUCCESS";
    case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
    case CUDA_ERROR_NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
    case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case CUDA_ERROR_INVALID_PTX: return "CUDA_ERROR_INVALID_PTX";
    case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
    case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case CUDA_ERROR_ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
    case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
    case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
    default: return "CUDA_ERROR_UNKNOWN";
    }
}

EXPORT CUresult cuGetErrorName(CUresult r, const char **s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    *s = error_name(r);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuGetErrorString(CUresult r, const char **s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    *s = error_name(r);
    return CUDA_SUCCESS;
}
