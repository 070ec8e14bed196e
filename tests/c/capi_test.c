/*
 * The C side of tests/capi.rs: links libvistok, runs every kernel family on small data made by
 * an integer LCG (tests/capi.rs makes the same data), prints the results for the Rust side to
 * compare with its own API, and checks that bad input returns the documented statuses.
 *
 * Output: one line per result array, "name: v0 v1 ..." with every value as the 8-digit hex
 * of its 32 bits (u32 ids as they are, floats as their bit patterns, bf16 widened to f32
 * bits); lines starting with '#' are comments. Exit status 0 iff every check here passed.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vistok.h"

static int checks = 0;
static int failures = 0;

#define CHECK(cond, ...)                                           \
    do {                                                           \
        checks++;                                                  \
        if (!(cond)) {                                             \
            failures++;                                            \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);   \
            fprintf(stderr, __VA_ARGS__);                          \
            fprintf(stderr, "\n");                                 \
        }                                                          \
    } while (0)

/* A call that must succeed. */
#define OK(call)                                                                                 \
    do {                                                                                         \
        VistokStatus s_ = (call);                                                                \
        CHECK(s_ == VISTOK_STATUS_OK, "%s -> %s: %s", #call, vistok_status_name(s_), vistok_last_error()); \
    } while (0)

/* A call that must fail with `want` and leave a message. */
static void expect(VistokStatus got, VistokStatus want, const char *what) {
    const char *msg = vistok_last_error();
    CHECK(got == want, "%s: got %s, expected %s (%s)", what, vistok_status_name(got), vistok_status_name(want), msg);
    CHECK(msg != NULL && msg[0] != '\0', "%s: empty vistok_last_error()", what);
    printf("# %s -> %s: %s\n", what, vistok_status_name(got), msg);
}

/* The LCG both sides use (Knuth's MMIX constants; the high bits are the output). */
static uint64_t lcg;
static void seed(uint64_t s) { lcg = s; }
static uint32_t next_u32(void) {
    lcg = lcg * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(lcg >> 33);
}
/* k/16 with |k| <= 255: exact in f32, f16 and bf16. */
static float next_val(void) { return (float)((int32_t)(next_u32() % 511u) - 255) / 16.0f; }
static void fill_vals(float *v, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) v[i] = next_val() * scale;
}
static uint32_t bits(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    return b;
}
/* Exact for values bf16 can hold (all next_val() values). */
static uint16_t to_bf16(float x) { return (uint16_t)(bits(x) >> 16); }

static void print_u32(const char *name, const uint32_t *v, size_t n) {
    printf("%s:", name);
    for (size_t i = 0; i < n; i++) printf(" %08x", v[i]);
    printf("\n");
}
/* Counts: printed as their low 32 bits (the tests' counts are small). */
static void print_u64(const char *name, const uint64_t *v, size_t n) {
    printf("%s:", name);
    for (size_t i = 0; i < n; i++) printf(" %08x", (uint32_t)v[i]);
    printf("\n");
}
static void print_f32(const char *name, const float *v, size_t n) {
    printf("%s:", name);
    for (size_t i = 0; i < n; i++) printf(" %08x", bits(v[i]));
    printf("\n");
}
static void print_bf16(const char *name, const uint16_t *v, size_t n) {
    printf("%s:", name);
    for (size_t i = 0; i < n; i++) printf(" %08x", (uint32_t)v[i] << 16);
    printf("\n");
}

static void test_patchify(void) {
    /* u8 NCHW [2, 3, 8, 12], 4x4 patches, ImageNet normalisation, f32 tokens, and back. */
    seed(1);
    enum { B = 2, C = 3, H = 8, W = 12, N = B * C * H * W, L = (H / 4) * (W / 4), P = C * 16 };
    uint8_t image[N], back[N];
    for (size_t i = 0; i < N; i++) image[i] = (uint8_t)(next_u32() % 256u);
    const float mean[3] = {0.485f, 0.456f, 0.406f}, std[3] = {0.229f, 0.224f, 0.225f};
    VistokPatchConfig cfg = {0};
    cfg.layout = VISTOK_LAYOUT_CHANNELS_FIRST;
    cfg.order = VISTOK_PATCH_ORDER_CPQ;
    cfg.patch[0] = 1;
    cfg.patch[1] = 4;
    cfg.patch[2] = 4;
    cfg.norm_channels = 3;
    cfg.scale = 1.0f / 255.0f;
    cfg.mean = mean;
    cfg.std = std;
    const size_t dims[4] = {B, C, H, W};
    VistokPatchify *plan = NULL;
    OK(vistok_patchify_new(&cfg, dims, 4, &plan));
    size_t td[3] = {0, 0, 0};
    OK(vistok_patchify_tokens_dims(plan, td));
    CHECK(td[0] == B && td[1] == L && td[2] == P, "tokens dims %zu %zu %zu", td[0], td[1], td[2]);
    static float tokens[B * L * P];
    OK(vistok_patchify_forward(plan, VISTOK_BACKEND_CPU, VISTOK_DTYPE_U8, image, N, VISTOK_DTYPE_F32, tokens, B * L * P));
    print_f32("patchify.tokens", tokens, B * L * P);
    OK(vistok_patchify_inverse(plan, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, tokens, B * L * P, VISTOK_DTYPE_U8, back, N));
    CHECK(memcmp(image, back, N) == 0, "patchify round trip is not exact");

    /* Errors. */
    expect(vistok_patchify_forward(plan, VISTOK_BACKEND_CPU, VISTOK_DTYPE_U8, image, N, VISTOK_DTYPE_U8, back, N),
           VISTOK_STATUS_UNSUPPORTED, "patchify u8 tokens");
    expect(vistok_patchify_forward(plan, VISTOK_BACKEND_CPU, VISTOK_DTYPE_U8, image, N - 1, VISTOK_DTYPE_F32, tokens,
                                   B * L * P),
           VISTOK_STATUS_LENGTH, "patchify short image");
    expect(vistok_patchify_forward(plan, VISTOK_BACKEND_CPU, 42, image, N, VISTOK_DTYPE_F32, tokens, B * L * P),
           VISTOK_STATUS_INVALID, "patchify unknown dtype");
    expect(vistok_patchify_forward(NULL, VISTOK_BACKEND_CPU, VISTOK_DTYPE_U8, image, N, VISTOK_DTYPE_F32, tokens,
                                   B * L * P),
           VISTOK_STATUS_NULL_POINTER, "patchify null plan");
    vistok_patchify_free(plan);

    /* f32 NHWC [1, 5, 7, 2], 2x2 patches, MAE order, zero padding, bf16 tokens. */
    enum { H2 = 5, W2 = 7, C2 = 2, N2 = H2 * W2 * C2, T2 = 3 * 4 * 8 };
    float image2[N2];
    fill_vals(image2, N2, 1.0f);
    VistokPatchConfig cfg2 = {0};
    cfg2.layout = VISTOK_LAYOUT_CHANNELS_LAST;
    cfg2.order = VISTOK_PATCH_ORDER_PQC;
    cfg2.patch[0] = 1;
    cfg2.patch[1] = 2;
    cfg2.patch[2] = 2;
    cfg2.pad = 1;
    const size_t dims2[4] = {1, H2, W2, C2};
    OK(vistok_patchify_new(&cfg2, dims2, 4, &plan));
    uint16_t tokens2[T2];
    OK(vistok_patchify_forward(plan, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, image2, N2, VISTOK_DTYPE_BF16, tokens2, T2));
    print_bf16("patchify.pad.tokens", tokens2, T2);
    vistok_patchify_free(plan);

    cfg2.pad = 0;
    expect(vistok_patchify_new(&cfg2, dims2, 4, &plan), VISTOK_STATUS_SHAPE, "patchify 5x7 image, 2x2 patch, no pad");
    cfg2.pad = 2;
    expect(vistok_patchify_new(&cfg2, dims2, 4, &plan), VISTOK_STATUS_INVALID, "patchify pad = 2");
    expect(vistok_patchify_new(NULL, dims2, 4, &plan), VISTOK_STATUS_NULL_POINTER, "patchify null config");
}

static void test_lfq(void) {
    seed(2);
    enum { N = 37, G = 2, D = 5, CH = G * D };
    static float z[N * CH + 1];
    static uint16_t zb[N * CH];
    uint32_t ids[N * G], ids_b[N * G];
    static float codes[N * CH], u[N * CH];
    fill_vals(z, N * CH, 1.0f);
    for (size_t i = 0; i < N * CH; i++) zb[i] = to_bf16(z[i]);
    VistokLfqConfig cfg = {0};
    cfg.groups = G;
    cfg.bits = D;
    cfg.order = VISTOK_BIT_ORDER_MSB_FIRST;
    VistokLfq *lfq = NULL;
    OK(vistok_lfq_new(&cfg, &lfq));
    const size_t zd[2] = {N, CH}, idd[2] = {N, G};
    OK(vistok_lfq_encode(lfq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, z, zd, 2, ids, N * G));
    print_u32("lfq.ids", ids, N * G);
    OK(vistok_lfq_encode(lfq, VISTOK_BACKEND_REFERENCE, VISTOK_DTYPE_BF16, zb, zd, 2, ids_b, N * G));
    CHECK(memcmp(ids, ids_b, sizeof ids) == 0, "lfq: bf16 reference ids differ from f32 cpu ids");
    OK(vistok_lfq_decode(lfq, VISTOK_BACKEND_CPU, ids, idd, 2, VISTOK_DTYPE_F32, codes, N * CH));
    print_f32("lfq.codes", codes, N * CH);
    /* Usage statistics: ones per channel, the id histogram (2^5 bins). */
    uint64_t ones[CH], hist[1u << D];
    OK(vistok_lfq_statistics(lfq, VISTOK_BACKEND_CPU, ids, idd, 2, ones, CH, hist, 1u << D));
    print_u64("lfq.stats.ones", ones, CH);
    print_u64("lfq.stats.histogram", hist, 1u << D);
    uint64_t total = 0;
    for (size_t i = 0; i < (1u << D); i++) total += hist[i];
    CHECK(total == N * G, "lfq histogram sums to %llu", (unsigned long long)total);
    OK(vistok_lfq_statistics(lfq, VISTOK_BACKEND_CPU, ids, idd, 2, ones, CH, NULL, 0));
    expect(vistok_lfq_statistics(lfq, VISTOK_BACKEND_CPU, ids, idd, 2, ones, CH - 1, NULL, 0), VISTOK_STATUS_LENGTH,
           "lfq stats ones one short");
    expect(vistok_lfq_statistics(lfq, VISTOK_BACKEND_CPU, ids, idd, 2, NULL, CH, NULL, 0), VISTOK_STATUS_NULL_POINTER,
           "lfq stats null ones");
    expect(vistok_lfq_statistics(lfq, VISTOK_BACKEND_CPU, ids, idd, 2, hist, CH, hist + 4, 1u << D),
           VISTOK_STATUS_INVALID, "lfq stats histogram overlapping ones");
    for (size_t i = 0; i < N * CH; i++) {
        if (z[i] != 0.0f) CHECK(codes[i] == (z[i] > 0 ? 1.0f : -1.0f), "lfq code %zu", i);
    }

    /* Errors. */
    const size_t bad[2] = {N, CH + 1};
    expect(vistok_lfq_encode(lfq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, NULL, zd, 2, ids, N * G),
           VISTOK_STATUS_NULL_POINTER, "lfq null z");
    expect(vistok_lfq_encode(lfq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, z, zd, 2, ids, N * G - 1),
           VISTOK_STATUS_LENGTH, "lfq ids one short");
    expect(vistok_lfq_encode(lfq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, z, bad, 2, ids, N * G), VISTOK_STATUS_SHAPE,
           "lfq z [N, G*d + 1]");
    expect(vistok_lfq_encode(lfq, VISTOK_BACKEND_CPU, 99, z, zd, 2, ids, N * G), VISTOK_STATUS_INVALID,
           "lfq unknown dtype");
    expect(vistok_lfq_encode(lfq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_U8, z, zd, 2, ids, N * G),
           VISTOK_STATUS_UNSUPPORTED, "lfq u8 z");
    expect(vistok_lfq_encode(lfq, 7, VISTOK_DTYPE_F32, z, zd, 2, ids, N * G), VISTOK_STATUS_INVALID,
           "lfq unknown backend");
    expect(vistok_lfq_encode(lfq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, (const char *)z + 1, zd, 2, ids, N * G),
           VISTOK_STATUS_ALIGNMENT, "lfq misaligned z");
    uint32_t big = 1u << D;
    const size_t one[2] = {1, 1};
    VistokLfqConfig c1 = cfg;
    c1.groups = 1;
    VistokLfq *l1 = NULL;
    OK(vistok_lfq_new(&c1, &l1));
    expect(vistok_lfq_decode(l1, VISTOK_BACKEND_CPU, &big, one, 2, VISTOK_DTYPE_F32, codes, D), VISTOK_STATUS_INVALID,
           "lfq id 2^d");
    vistok_lfq_free(l1);
    float zn[CH] = {0};
    zn[3] = NAN;
    const size_t znd[2] = {1, CH};
    expect(vistok_lfq_encode(lfq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, zn, znd, 2, ids, G), VISTOK_STATUS_NON_FINITE,
           "lfq NaN");
    vistok_lfq_free(lfq);
    c1.bits = 33;
    expect(vistok_lfq_new(&c1, &lfq), VISTOK_STATUS_INVALID, "lfq 33 bits");
    c1.bits = 4;
    c1.order = 5;
    expect(vistok_lfq_new(&c1, &lfq), VISTOK_STATUS_INVALID, "lfq unknown bit order");

    /* BSQ, LSB first, with the normalised input. */
    VistokLfqConfig cs = {0};
    cs.groups = G;
    cs.bits = D;
    cs.order = VISTOK_BIT_ORDER_LSB_FIRST;
    cs.scale = 2.0f;
    cs.spherical = 1;
    OK(vistok_lfq_new(&cs, &lfq));
    OK(vistok_lfq_encode_normalized(lfq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, z, zd, 2, ids, N * G, VISTOK_DTYPE_F32,
                                    u, N * CH));
    print_u32("bsq.ids", ids, N * G);
    print_f32("bsq.u", u, N * CH);
    OK(vistok_lfq_decode(lfq, VISTOK_BACKEND_CPU, ids, idd, 2, VISTOK_DTYPE_F32, codes, N * CH));
    print_f32("bsq.codes", codes, N * CH);
    vistok_lfq_free(lfq);
}

static void test_fsq(void) {
    seed(3);
    enum { N = 41, D = 4 };
    const uint32_t levels[D] = {8, 5, 5, 5};
    float z[N * D], codes[N * D];
    uint32_t ids[N];
    fill_vals(z, N * D, 0.25f);
    VistokFsq *fsq = NULL;
    OK(vistok_fsq_new(levels, D, &fsq));
    uint64_t size = 0;
    OK(vistok_fsq_codebook_size(fsq, &size));
    CHECK(size == 1000, "fsq codebook size %llu", (unsigned long long)size);
    const size_t zd[2] = {N, D}, idd[1] = {N};
    OK(vistok_fsq_encode(fsq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, z, zd, 2, ids, N));
    print_u32("fsq.ids", ids, N);
    for (size_t i = 0; i < N; i++) CHECK(ids[i] < 1000, "fsq id %zu = %u", i, ids[i]);
    OK(vistok_fsq_decode(fsq, VISTOK_BACKEND_CPU, ids, idd, 1, VISTOK_DTYPE_F32, codes, N * D));
    print_f32("fsq.codes", codes, N * D);
    uint64_t lv[8 + 5 + 5 + 5], fh[1000];
    OK(vistok_fsq_statistics(fsq, VISTOK_BACKEND_CPU, ids, idd, 1, lv, 23, fh, 1000));
    print_u64("fsq.stats.levels", lv, 23);
    print_u64("fsq.stats.histogram", fh, 1000);
    OK(vistok_fsq_statistics(fsq, VISTOK_BACKEND_CPU, ids, idd, 1, NULL, 0, fh, 1000));
    expect(vistok_fsq_statistics(fsq, VISTOK_BACKEND_CPU, ids, idd, 1, lv, 22, NULL, 0), VISTOK_STATUS_LENGTH,
           "fsq stats levels one short");
    expect(vistok_fsq_statistics(fsq, VISTOK_BACKEND_CPU, ids, zd, 2, lv, 23, NULL, 0), VISTOK_STATUS_SHAPE,
           "fsq stats ids [N, D]");

    z[5] = NAN;
    expect(vistok_fsq_encode(fsq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, z, zd, 2, ids, N), VISTOK_STATUS_NON_FINITE,
           "fsq NaN");
    uint32_t bad = 1000;
    const size_t one[1] = {1};
    expect(vistok_fsq_decode(fsq, VISTOK_BACKEND_CPU, &bad, one, 1, VISTOK_DTYPE_F32, codes, D), VISTOK_STATUS_INVALID,
           "fsq id out of range");
    expect(vistok_fsq_decode(fsq, VISTOK_BACKEND_CPU, ids, idd, 1, VISTOK_DTYPE_F32, codes, N * D + 1),
           VISTOK_STATUS_LENGTH, "fsq codes one long");
    vistok_fsq_free(fsq);
    const uint32_t bad_levels[2] = {8, 1};
    expect(vistok_fsq_new(bad_levels, 2, &fsq), VISTOK_STATUS_INVALID, "fsq level 1");
    expect(vistok_fsq_new(NULL, 2, &fsq), VISTOK_STATUS_NULL_POINTER, "fsq null levels");
}

static void test_argmin(void) {
    seed(4);
    enum { K = 50, D = 12, R = 3 * 7 };
    static float e[K * D], x[R * D], dist[R], q[R * D];
    static uint16_t eb[K * D], xb[R * D], qb[R * D];
    uint32_t idx[R];
    fill_vals(e, K * D, 1.0f);
    fill_vals(x, R * D, 1.0f);
    for (size_t i = 0; i < K * D; i++) eb[i] = to_bf16(e[i]);
    for (size_t i = 0; i < R * D; i++) xb[i] = to_bf16(x[i]);
    const size_t ed[2] = {K, D}, xd[3] = {3, 7, D}, id[2] = {3, 7};

    VistokCodebook *cb = NULL;
    OK(vistok_codebook_new(VISTOK_DTYPE_F32, e, ed, 2, VISTOK_METRIC_L2, &cb));
    OK(vistok_codebook_argmin(cb, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, x, xd, 3, idx, R, dist, R));
    print_u32("argmin.f32.idx", idx, R);
    print_f32("argmin.f32.dist", dist, R);
    OK(vistok_codebook_lookup(cb, VISTOK_BACKEND_CPU, idx, id, 2, VISTOK_DTYPE_F32, q, R * D));
    for (size_t r = 0; r < R; r++) CHECK(memcmp(q + r * D, e + idx[r] * D, D * 4) == 0, "lookup row %zu", r);
    OK(vistok_codebook_argmin(cb, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, x, xd, 3, idx, R, NULL, 0));
    expect(vistok_codebook_argmin(cb, VISTOK_BACKEND_CPU, VISTOK_DTYPE_BF16, xb, xd, 3, idx, R, NULL, 0),
           VISTOK_STATUS_UNSUPPORTED, "argmin bf16 x on an f32 codebook");
    /* Within x's R·D floats: 3·6·(D + 1) = 234 ≤ 252 (the dims promise that many readable). */
    const size_t xd_bad[3] = {3, 6, D + 1};
    expect(vistok_codebook_argmin(cb, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, x, xd_bad, 3, idx, 3 * 6, NULL, 0),
           VISTOK_STATUS_SHAPE, "argmin x last dim != D");
    expect(vistok_codebook_argmin(cb, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, x, xd, 3, idx, R, dist, R - 1),
           VISTOK_STATUS_LENGTH, "argmin dist one short");
    uint32_t big[1] = {K};
    const size_t one[1] = {1};
    expect(vistok_codebook_lookup(cb, VISTOK_BACKEND_CPU, big, one, 1, VISTOK_DTYPE_F32, q, D), VISTOK_STATUS_INVALID,
           "lookup index K");
    vistok_codebook_free(cb);
    expect(vistok_codebook_new(VISTOK_DTYPE_F32, e, ed, 2, 9, &cb), VISTOK_STATUS_INVALID, "codebook metric 9");
    expect(vistok_codebook_new(VISTOK_DTYPE_F32, e, ed, 1, VISTOK_METRIC_L2, &cb), VISTOK_STATUS_SHAPE,
           "codebook rank 1");

    OK(vistok_codebook_new(VISTOK_DTYPE_BF16, eb, ed, 2, VISTOK_METRIC_COSINE, &cb));
    OK(vistok_codebook_argmin(cb, VISTOK_BACKEND_CPU, VISTOK_DTYPE_BF16, xb, xd, 3, idx, R, dist, R));
    print_u32("argmin.bf16.idx", idx, R);
    print_f32("argmin.bf16.dist", dist, R);
    OK(vistok_codebook_lookup(cb, VISTOK_BACKEND_CPU, idx, id, 2, VISTOK_DTYPE_BF16, qb, R * D));
    for (size_t r = 0; r < R; r++) CHECK(memcmp(qb + r * D, eb + idx[r] * D, D * 2) == 0, "bf16 lookup row %zu", r);
    vistok_codebook_free(cb);
}

static void test_residual(void) {
    /* Three stages (K = 9, 7, 5; D = 6) of shrinking scale, x [4, 3, 6]; f32, then bf16. */
    seed(8);
    enum { D = 6, S = 3, R = 4 * 3 };
    static const size_t ks[S] = {9, 7, 5};
    static const float scales[S] = {1.0f, 0.25f, 0.0625f};
    static float e[S][9 * D], x[R * D], recon[R * D], back[R * D];
    static uint16_t eb[S][9 * D], xb[R * D], backb[R * D];
    uint32_t idx[R * S];
    for (size_t s = 0; s < S; s++) fill_vals(e[s], ks[s] * D, scales[s]);
    fill_vals(x, R * D, 1.0f);
    for (size_t s = 0; s < S; s++)
        for (size_t i = 0; i < ks[s] * D; i++) eb[s][i] = to_bf16(e[s][i]);
    for (size_t i = 0; i < R * D; i++) xb[i] = to_bf16(x[i]);
    const size_t xd[3] = {4, 3, D}, id[3] = {4, 3, S};

    VistokCodebook *cb[S] = {NULL, NULL, NULL}, *cbb[S] = {NULL, NULL, NULL};
    for (size_t s = 0; s < S; s++) {
        const size_t ed[2] = {ks[s], D};
        OK(vistok_codebook_new(VISTOK_DTYPE_F32, e[s], ed, 2, VISTOK_METRIC_L2, &cb[s]));
        OK(vistok_codebook_new(VISTOK_DTYPE_BF16, eb[s], ed, 2, VISTOK_METRIC_L2, &cbb[s]));
    }
    VistokResidual *rq = NULL, *rqb = NULL;
    OK(vistok_residual_new((const VistokCodebook *const *)cb, S, &rq));
    OK(vistok_residual_new((const VistokCodebook *const *)cbb, S, &rqb));
    /* The stages were copied: the handles can go. */
    for (size_t s = 0; s < S; s++) {
        vistok_codebook_free(cb[s]);
        vistok_codebook_free(cbb[s]);
    }

    OK(vistok_residual_quantize(rq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, x, xd, 3, idx, R * S, VISTOK_DTYPE_F32,
                                recon, R * D));
    print_u32("residual.f32.idx", idx, R * S);
    print_f32("residual.f32.recon", recon, R * D);
    OK(vistok_residual_decode(rq, VISTOK_BACKEND_CPU, idx, id, 3, VISTOK_DTYPE_F32, back, R * D));
    CHECK(memcmp(back, recon, sizeof back) == 0, "residual decode(quantize) != recon");
    /* Without the reconstruction: the same indices. */
    uint32_t idx2[R * S];
    OK(vistok_residual_quantize(rq, VISTOK_BACKEND_REFERENCE, VISTOK_DTYPE_F32, x, xd, 3, idx2, R * S,
                                VISTOK_DTYPE_F32, NULL, 0));
    CHECK(memcmp(idx2, idx, sizeof idx) == 0, "residual reference indices != cpu indices");

    OK(vistok_residual_quantize(rqb, VISTOK_BACKEND_CPU, VISTOK_DTYPE_BF16, xb, xd, 3, idx, R * S, VISTOK_DTYPE_F32,
                                recon, R * D));
    print_u32("residual.bf16.idx", idx, R * S);
    print_f32("residual.bf16.recon", recon, R * D);
    OK(vistok_residual_decode(rqb, VISTOK_BACKEND_CPU, idx, id, 3, VISTOK_DTYPE_BF16, backb, R * D));
    /* The same sum, rounded once to bf16 (nearest, ties to even; no NaN here). */
    for (size_t i = 0; i < R * D; i++) {
        uint32_t u = bits(recon[i]);
        uint16_t want = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        CHECK(backb[i] == want, "bf16 residual decode %zu: %04x, expected %04x", i, backb[i], want);
    }

    /* Bad input. */
    expect(vistok_residual_quantize(rq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_BF16, xb, xd, 3, idx, R * S, VISTOK_DTYPE_F32,
                                    NULL, 0),
           VISTOK_STATUS_UNSUPPORTED, "residual bf16 x on f32 stages");
    expect(vistok_residual_quantize(rq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, x, xd, 3, idx, R * S - 1,
                                    VISTOK_DTYPE_F32, NULL, 0),
           VISTOK_STATUS_LENGTH, "residual indices one short");
    /* Within x's R·D floats: 4·2·(D + 1) = 56 ≤ 72. */
    const size_t xd_bad[3] = {4, 2, D + 1};
    expect(vistok_residual_quantize(rq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, x, xd_bad, 3, idx, 4 * 2 * S,
                                    VISTOK_DTYPE_F32, NULL, 0),
           VISTOK_STATUS_SHAPE, "residual x last dim != D");
    const size_t xd_flat[1] = {D};
    expect(vistok_residual_quantize(rq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, x, xd_flat, 1, idx, S, VISTOK_DTYPE_F32,
                                    NULL, 0),
           VISTOK_STATUS_SHAPE, "residual x rank 1");
    expect(vistok_residual_quantize(rq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, x, xd, 3, idx, R * S, VISTOK_DTYPE_F32,
                                    x, R * D),
           VISTOK_STATUS_INVALID, "residual recon overlapping x");
    float xn[R * D];
    memcpy(xn, x, sizeof xn);
    xn[7] = NAN;
    expect(vistok_residual_quantize(rq, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, xn, xd, 3, idx, R * S, VISTOK_DTYPE_F32,
                                    recon, R * D),
           VISTOK_STATUS_NON_FINITE, "residual NaN in x");
    uint32_t bad_idx[S] = {0, 7, 0}; /* stage 1 has 7 entries */
    const size_t one[2] = {1, S}, flat[1] = {S}, wrong_s[2] = {1, S - 1};
    expect(vistok_residual_decode(rq, VISTOK_BACKEND_CPU, bad_idx, one, 2, VISTOK_DTYPE_F32, back, D),
           VISTOK_STATUS_INVALID, "residual decode index out of range for stage 1");
    expect(vistok_residual_decode(rq, VISTOK_BACKEND_CPU, idx, flat, 1, VISTOK_DTYPE_F32, back, D),
           VISTOK_STATUS_SHAPE, "residual decode rank 1");
    expect(vistok_residual_decode(rq, VISTOK_BACKEND_CPU, idx, wrong_s, 2, VISTOK_DTYPE_F32, back, D),
           VISTOK_STATUS_SHAPE, "residual decode last dim != S");
    expect(vistok_residual_decode(rq, VISTOK_BACKEND_CPU, idx, one, 2, VISTOK_DTYPE_U8, back, D),
           VISTOK_STATUS_UNSUPPORTED, "residual decode to u8");
    expect(vistok_residual_decode(NULL, VISTOK_BACKEND_CPU, idx, one, 2, VISTOK_DTYPE_F32, back, D),
           VISTOK_STATUS_NULL_POINTER, "residual decode null handle");

    /* Construction errors: no stage, a null stage, mixed dtypes, different D. */
    VistokResidual *bad = NULL;
    const size_t ed[2] = {9, D}, ed5[2] = {9, D - 1};
    VistokCodebook *f = NULL, *b = NULL, *f5 = NULL;
    OK(vistok_codebook_new(VISTOK_DTYPE_F32, e[0], ed, 2, VISTOK_METRIC_L2, &f));
    OK(vistok_codebook_new(VISTOK_DTYPE_BF16, eb[0], ed, 2, VISTOK_METRIC_L2, &b));
    OK(vistok_codebook_new(VISTOK_DTYPE_F32, e[0], ed5, 2, VISTOK_METRIC_L2, &f5));
    const VistokCodebook *mixed[2] = {f, b}, *dims[2] = {f, f5}, *holes[2] = {f, NULL};
    expect(vistok_residual_new(mixed, 0, &bad), VISTOK_STATUS_SHAPE, "residual with no stage");
    expect(vistok_residual_new(NULL, 2, &bad), VISTOK_STATUS_NULL_POINTER, "residual null stages");
    expect(vistok_residual_new(holes, 2, &bad), VISTOK_STATUS_NULL_POINTER, "residual null stage 1");
    expect(vistok_residual_new(mixed, 2, &bad), VISTOK_STATUS_UNSUPPORTED, "residual f32 + bf16 stages");
    expect(vistok_residual_new(dims, 2, &bad), VISTOK_STATUS_SHAPE, "residual D = 6 and 5");
    expect(vistok_residual_new(mixed, 1, NULL), VISTOK_STATUS_NULL_POINTER, "residual null out");
    CHECK(bad == NULL, "a failed vistok_residual_new wrote its out pointer");
    vistok_codebook_free(f);
    vistok_codebook_free(b);
    vistok_codebook_free(f5);
    vistok_residual_free(rq);
    vistok_residual_free(rqb);
}

static void test_attention(void) {
    seed(5);
    enum { B = 1, H = 2, HKV = 1, N = 19, D = 16 };
    static float q[B * H * N * D], k[B * HKV * N * D], v[B * HKV * N * D], o[B * H * N * D], lse[B * H * N];
    fill_vals(q, B * H * N * D, 0.25f);
    fill_vals(k, B * HKV * N * D, 0.25f);
    fill_vals(v, B * HKV * N * D, 1.0f);
    const size_t qd[4] = {B, H, N, D}, kd[4] = {B, HKV, N, D};
    VistokAttentionOptions opts = {0};
    opts.mask = VISTOK_MASK_CAUSAL;
    OK(vistok_attention_forward(VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, q, qd, 4, k, kd, 4, v, kd, 4, o, B * H * N * D,
                                lse, B * H * N, &opts));
    print_f32("attn.o", o, B * H * N * D);
    print_f32("attn.lse", lse, B * H * N);
    /* Query 0 sees only key 0: its output is v[0]. */
    CHECK(memcmp(o, v, D * 4) == 0, "attention causal row 0");
    static float o2[B * H * N * D];
    OK(vistok_attention_forward(VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, q, qd, 4, k, kd, 4, v, kd, 4, o2, B * H * N * D,
                                NULL, 0, &opts));
    CHECK(memcmp(o, o2, sizeof o) == 0, "attention without lse differs");

    opts.mask = 17;
    expect(vistok_attention_forward(VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, q, qd, 4, k, kd, 4, v, kd, 4, o,
                                    B * H * N * D, NULL, 0, &opts),
           VISTOK_STATUS_INVALID, "attention mask 17");
    const size_t kd_bad[4] = {B, HKV, N, D + 1};
    expect(vistok_attention_forward(VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, q, qd, 4, k, kd_bad, 4, v, kd_bad, 4, o,
                                    B * H * N * D, NULL, 0, NULL),
           VISTOK_STATUS_SHAPE, "attention k with another D");
    expect(vistok_attention_forward(VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, q, qd, 4, k, kd, 4, v, kd, 4, o,
                                    B * H * N * D, lse, B * H * N + 1, NULL),
           VISTOK_STATUS_LENGTH, "attention lse one long");
}

static void test_merge(void) {
    seed(6);
    enum { B = 2, N = 16, CM = 8, C = 6, R = 5, O = N - R };
    static float metric[B * N * CM], x[B * N * C], y[B * O * C], back[B * N * C], sizes[B * N], yw[B * O * C],
        sw[B * O];
    uint32_t slots[B * N];
    fill_vals(metric, B * N * CM, 1.0f);
    fill_vals(x, B * N * C, 1.0f);
    for (size_t i = 0; i < B * N; i++) sizes[i] = (float)(1 + next_u32() % 4u);
    const size_t md[3] = {B, N, CM}, xd[3] = {B, N, C}, yd[3] = {B, O, C};
    VistokMergePlan *plan = NULL;
    OK(vistok_merge_plan_new(VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, metric, md, 3, R, VISTOK_MERGE_CLASS_TOKEN, &plan));
    size_t pb = 0, pn = 0, po = 0;
    OK(vistok_merge_plan_dims(plan, &pb, &pn, &po));
    CHECK(pb == B && pn == N && po == O, "merge plan dims %zu %zu %zu", pb, pn, po);
    OK(vistok_merge_plan_slots(plan, slots, B * N));
    print_u32("merge.slots", slots, B * N);
    OK(vistok_merge_apply(plan, VISTOK_BACKEND_CPU, VISTOK_MERGE_MODE_MEAN, VISTOK_DTYPE_F32, x, xd, 3, y, B * O * C));
    print_f32("merge.mean", y, B * O * C);
    OK(vistok_merge_unmerge(plan, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, y, yd, 3, back, B * N * C));
    print_f32("merge.unmerge", back, B * N * C);
    for (size_t b = 0; b < B; b++)
        for (size_t t = 0; t < N; t++)
            CHECK(memcmp(back + (b * N + t) * C, y + (b * O + slots[b * N + t]) * C, C * 4) == 0, "unmerge %zu %zu", b,
                  t);
    OK(vistok_merge_apply_weighted(plan, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, x, xd, 3, sizes, B * N, yw, B * O * C, sw,
                                   B * O));
    print_f32("merge.wavg", yw, B * O * C);
    print_f32("merge.wavg.sizes", sw, B * O);

    /* A source map across two layers: this plan, then one on the merged tokens (R2 more). */
    enum { R2 = 3, O2 = O - R2 };
    static float y2[B * O2 * C], back2[B * N * C], msizes[B * O2], bias[B * O2];
    uint32_t mslots[B * N];
    VistokSourceMap *map = NULL;
    VistokMergePlan *plan2 = NULL;
    OK(vistok_source_map_new(B, N, &map));
    OK(vistok_source_map_apply(map, plan));
    OK(vistok_source_map_slots(map, mslots, B * N));
    CHECK(memcmp(mslots, slots, sizeof slots) == 0, "a map after one plan is that plan's slots");
    OK(vistok_merge_plan_new(VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, y, yd, 3, R2, 0, &plan2));
    OK(vistok_source_map_apply(map, plan2));
    size_t mb = 0, mn = 0, mo = 0;
    OK(vistok_source_map_dims(map, &mb, &mn, &mo));
    CHECK(mb == B && mn == N && mo == O2, "source map dims %zu %zu %zu", mb, mn, mo);
    OK(vistok_source_map_slots(map, mslots, B * N));
    print_u32("merge.map.slots", mslots, B * N);
    OK(vistok_source_map_sizes(map, msizes, B * O2));
    print_f32("merge.map.sizes", msizes, B * O2);
    OK(vistok_merge_apply(plan2, VISTOK_BACKEND_CPU, VISTOK_MERGE_MODE_MEAN, VISTOK_DTYPE_F32, y, yd, 3, y2, B * O2 * C));
    const size_t y2d[3] = {B, O2, C}, sd[2] = {B, O2};
    OK(vistok_source_map_unmerge(map, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, y2, y2d, 3, back2, B * N * C));
    print_f32("merge.map.unmerge", back2, B * N * C);
    OK(vistok_merge_size_bias(msizes, sd, 2, bias, B * O2));
    print_f32("merge.size_bias", bias, B * O2);
    expect(vistok_source_map_apply(map, plan), VISTOK_STATUS_SHAPE, "source map: a plan for other tokens");
    expect(vistok_source_map_sizes(map, msizes, B * O2 + 1), VISTOK_STATUS_LENGTH, "source map sizes one long");
    msizes[1] = 0.0f;
    expect(vistok_merge_size_bias(msizes, sd, 2, bias, B * O2), VISTOK_STATUS_INVALID, "size bias of a zero size");
    vistok_source_map_free(map);
    vistok_merge_plan_free(plan2);

    /* Pruning: EViT top-k with a class token and its fused token; DivPrune and a gather. */
    enum { K = 4, KD = 5 };
    static float score[B * N], top[B * (K + 2) * C], div[B * KD * C];
    uint32_t kept[B * KD];
    for (size_t i = 0; i < B * N; i++) score[i] = (float)(next_u32() % 64u) / 64.0f;
    const size_t scd[2] = {B, N};
    VistokSelection *sel = NULL;
    OK(vistok_selection_top_k(VISTOK_BACKEND_CPU, score, scd, 2, K, VISTOK_SELECTION_CLASS_TOKEN, &sel));
    size_t sb = 0, sn = 0, sk = 0, so = 0, sof = 0;
    OK(vistok_selection_dims(sel, &sb, &sn, &sk, &so, &sof));
    CHECK(sb == B && sn == N && sk == K && so == K + 1 && sof == K + 2, "selection dims %zu %zu %zu %zu %zu", sb, sn,
          sk, so, sof);
    OK(vistok_selection_kept(sel, kept, B * K));
    print_u32("prune.topk.kept", kept, B * K);
    OK(vistok_selection_gather(sel, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, x, xd, 3, 1, score, B * N, top,
                               B * (K + 2) * C));
    print_f32("prune.topk.fused", top, B * (K + 2) * C);
    expect(vistok_selection_gather(sel, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, x, xd, 3, 0, score, B * N, top,
                                   B * (K + 1) * C),
           VISTOK_STATUS_INVALID, "selection: a score without fused");
    expect(vistok_selection_gather(sel, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, x, xd, 3, 1, NULL, B * N, top,
                                   B * (K + 2) * C),
           VISTOK_STATUS_NULL_POINTER, "selection: fused without a score");
    vistok_selection_free(sel);
    OK(vistok_selection_div_prune(VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, metric, md, 3, KD, 0, &sel));
    OK(vistok_selection_kept(sel, kept, B * KD));
    print_u32("prune.div.kept", kept, B * KD);
    OK(vistok_selection_gather(sel, VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, x, xd, 3, 0, NULL, 0, div, B * KD * C));
    print_f32("prune.div.gather", div, B * KD * C);
    vistok_selection_free(sel);
    expect(vistok_selection_top_k(VISTOK_BACKEND_CPU, score, scd, 2, N, VISTOK_SELECTION_CLASS_TOKEN, &sel),
           VISTOK_STATUS_INVALID, "top-k: k above the tokens available");
    expect(vistok_selection_top_k(VISTOK_BACKEND_CPU, score, scd, 2, K, 2, &sel), VISTOK_STATUS_INVALID,
           "top-k flag 2");

    expect(vistok_merge_apply(plan, VISTOK_BACKEND_CPU, 2, VISTOK_DTYPE_F32, x, xd, 3, y, B * O * C),
           VISTOK_STATUS_INVALID, "merge mode 2");
    expect(vistok_merge_apply(plan, VISTOK_BACKEND_CPU, VISTOK_MERGE_MODE_SUM, VISTOK_DTYPE_F32, x, yd, 3, y,
                              B * O * C),
           VISTOK_STATUS_SHAPE, "merge x with the output's dims");
        expect(vistok_merge_plan_slots(plan, slots, B * N - 1), VISTOK_STATUS_LENGTH, "merge slots one short");
    expect(vistok_merge_apply(plan, VISTOK_BACKEND_CPU, VISTOK_MERGE_MODE_SUM, VISTOK_DTYPE_F32, x, xd, 3, x + 4,
                              B * O * C),
           VISTOK_STATUS_INVALID, "merge output overlapping x");
    vistok_merge_plan_free(plan);
    expect(vistok_merge_plan_new(VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, metric, md, 3, R, 8, &plan),
           VISTOK_STATUS_INVALID, "merge flag 8");
    expect(vistok_merge_plan_new(VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, metric, md, 3, R, 0, NULL),
           VISTOK_STATUS_NULL_POINTER, "merge null out");
}

/* CUDA through the C ABI: with a GPU a device opens; without one (or without the `cuda`
   feature) the calls are error values with a message, never a crash. */
static void test_cuda_smoke(void) {
    size_t count = 99;
    VistokStatus s = vistok_cuda_device_count(&count);
    VistokCudaDevice *dev = NULL;
    VistokStatus d = vistok_cuda_device_new(0, &dev);
    if (d == VISTOK_STATUS_OK) {
        CHECK(s == VISTOK_STATUS_OK && count >= 1, "device 0 opened but count = %zu (%s)", count, vistok_status_name(s));
        printf("# cuda: %zu device(s), device 0 opened\n", count);
        vistok_cuda_device_free(dev);
    } else {
        CHECK(d == VISTOK_STATUS_NO_CUDA || d == VISTOK_STATUS_NO_DEVICE, "cuda device_new -> %s", vistok_status_name(d));
        CHECK(vistok_last_error()[0] != '\0', "cuda device_new: empty message");
        CHECK(dev == NULL, "cuda device_new wrote a handle on failure");
        printf("# cuda: skipped (%s: %s)\n", vistok_status_name(d), vistok_last_error());
    }
    expect(vistok_cuda_device_new(0, NULL), VISTOK_STATUS_NULL_POINTER, "cuda device_new null out");
    vistok_cuda_device_free(NULL);
    vistok_cuda_codebook_free(NULL);
}

int main(void) {
    uint32_t major = 99, minor = 99, patch = 99;
    OK(vistok_version(&major, &minor, &patch));
    printf("version: %08x %08x %08x\n", major, minor, patch);
    CHECK(vistok_last_error()[0] == '\0', "last error not cleared by a success");
    CHECK(strcmp(vistok_status_name(VISTOK_STATUS_SHAPE), "VISTOK_STATUS_SHAPE") == 0, "status name");
    CHECK(strcmp(vistok_status_name(-1), "VISTOK_STATUS_UNKNOWN") == 0, "unknown status name");
    expect(vistok_version(NULL, &minor, &patch), VISTOK_STATUS_NULL_POINTER, "version null major");

    /* Every free function takes NULL. */
    vistok_patchify_free(NULL);
    vistok_lfq_free(NULL);
    vistok_fsq_free(NULL);
    vistok_codebook_free(NULL);
    vistok_merge_plan_free(NULL);
    vistok_residual_free(NULL);

    test_patchify();
    test_lfq();
    test_fsq();
    test_argmin();
    test_residual();
    test_attention();
    test_merge();
    test_cuda_smoke();

    printf("# checks: %d, failures: %d\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
