// y (m, n) = x (m, k) W^T (+ y) with W (n, k) packed once (sampling: the same weights every step).
// OpenBLAS packs W again on every call, which for sampling's few rows costs about an eighth of the
// time (README "Sampling speed"). Layout: panels of TAR_PANEL output columns; panel p holds, for each
// kk in 0..<k, the TAR_PANEL weights W[p * TAR_PANEL + j][kk] side by side (zeros past n).
// Each output element is one chain of fused multiply-adds over kk in order, from zero (or from y
// when accumulating): the bits depend on neither the row count, the row block nor the thread's
// panel range, so a sample does not depend on its batch or on the thread count.
#include "CSupport.h"
#include <immintrin.h>

#define TAR_PANEL TAR_PACKED_PANEL
#define TAR_ROWS 6
#define TAR_DEPTH 128

size_t tar_packed_floats(size_t n, size_t k) { return (n + TAR_PANEL - 1) / TAR_PANEL * TAR_PANEL * k; }

size_t tar_packed_panels(size_t n) { return (n + TAR_PANEL - 1) / TAR_PANEL; }

void tar_pack_weights(const float *w, size_t n, size_t k, size_t ldw, float *packed) {
    for (size_t p = 0; p < tar_packed_panels(n); p++) {
        float *panel = packed + p * TAR_PANEL * k;
        size_t cols = n - p * TAR_PANEL < TAR_PANEL ? n - p * TAR_PANEL : TAR_PANEL;
        // kk outer: the panel is written in order, and the 64 rows read stay in L1 for 16 kk each
        for (size_t kk = 0; kk < k; kk++) {
            const float *src = w + p * TAR_PANEL * ldw + kk;
            float *dst = panel + kk * TAR_PANEL;
            for (size_t j = 0; j < cols; j++) dst[j] = src[j * ldw];
            for (size_t j = cols; j < TAR_PANEL; j++) dst[j] = 0.0f;
        }
    }
}

// Rows [0, MR) of x against one panel, into y's columns [0, cols). MR is a constant at each call
// (the switch below), so the row loop unrolls into 4 * MR accumulators held in registers.
#define TAR_TILE(MR)                                                                              \
    __attribute__((target("avx512f"))) static void tar_tile_##MR(                                 \
        size_t k, const float *x, size_t ldx, const float *panel, float *y, size_t ldy, int cols, \
        int from_y) {                                                                             \
        __m512 c[MR][4];                                                                          \
        for (int i = 0; i < MR; i++)                                                              \
            for (int j = 0; j < 4; j++) {                                                         \
                int left = cols - 16 * j;                                                         \
                __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF                                   \
                                 : (__mmask16)(left > 0 ? (1u << left) - 1 : 0);                  \
                c[i][j] = from_y ? _mm512_maskz_loadu_ps(mask, y + i * ldy + 16 * j)             \
                                 : _mm512_setzero_ps();                                           \
            }                                                                                     \
        for (size_t kk = 0; kk < k; kk++) {                                                       \
            const float *b = panel + kk * TAR_PANEL;                                              \
            __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);                         \
            __m512 b2 = _mm512_loadu_ps(b + 32), b3 = _mm512_loadu_ps(b + 48);                    \
            for (int i = 0; i < MR; i++) {                                                        \
                __m512 a = _mm512_set1_ps(x[i * ldx + kk]);                                       \
                c[i][0] = _mm512_fmadd_ps(a, b0, c[i][0]);                                        \
                c[i][1] = _mm512_fmadd_ps(a, b1, c[i][1]);                                        \
                c[i][2] = _mm512_fmadd_ps(a, b2, c[i][2]);                                        \
                c[i][3] = _mm512_fmadd_ps(a, b3, c[i][3]);                                        \
            }                                                                                     \
        }                                                                                         \
        for (int i = 0; i < MR; i++)                                                              \
            for (int j = 0; j < 4; j++) {                                                         \
                int left = cols - 16 * j;                                                         \
                if (left <= 0) break;                                                             \
                __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);  \
                _mm512_mask_storeu_ps(y + i * ldy + 16 * j, mask, c[i][j]);                      \
            }                                                                                     \
    }

TAR_TILE(1)
TAR_TILE(2)
TAR_TILE(3)
TAR_TILE(4)
TAR_TILE(5)
TAR_TILE(6)

__attribute__((target("avx512f"))) void tar_sgemm_packed(
    size_t m, size_t n, size_t k, const float *x, size_t ldx, const float *packed, float *y, size_t ldy,
    int accumulate, size_t first_panel, size_t end_panel) {
    size_t row_blocks = (m + TAR_ROWS - 1) / TAR_ROWS;
    for (size_t p = first_panel; p < end_panel; p++) {
        const float *panel = packed + p * TAR_PANEL * k;
        int cols = (int)(n - p * TAR_PANEL < TAR_PANEL ? n - p * TAR_PANEL : TAR_PANEL);
        float *yp = y + p * TAR_PANEL;
        // k in blocks of TAR_DEPTH, so the panel's block (32 KB) stays in L1 while every row block
        // passes over it; each block's tile continues the sums from y, which keeps each element one
        // chain of multiply-adds in k order (starting from y when accumulating).
        for (size_t k0 = 0; k0 < k; k0 += TAR_DEPTH) {
            size_t kc = k - k0 < TAR_DEPTH ? k - k0 : TAR_DEPTH;
            int from_y = k0 > 0 || accumulate;
            const float *pk = panel + k0 * TAR_PANEL;
            // The packed weights two blocks ahead (the panels lie one after the other, so that is
            // the next k blocks or the next panel's) are fetched into L2 while this block's row
            // blocks run, a share before each, so that a block's first row block does not wait on
            // memory: sampling streams every weight from memory once a step. 1.08-1.17x on sampling
            // shapes with 300-450 MB of weights (README "Packed weights in sampling"). A prefetch
            // changes no sum, and past this call's panels it only warms other memory (it never faults).
            const char *ahead = (const char *)(pk + 2 * kc * TAR_PANEL);
            size_t lines = kc * TAR_PANEL * sizeof(float) / 64;
            for (size_t r = 0; r < m; r += TAR_ROWS) {
                size_t rb = r / TAR_ROWS;
                for (size_t line = rb * lines / row_blocks; line < (rb + 1) * lines / row_blocks; line++)
                    _mm_prefetch(ahead + 64 * line, _MM_HINT_T1);
                const float *xr = x + r * ldx + k0;
                float *yr = yp + r * ldy;
                switch (m - r < TAR_ROWS ? m - r : TAR_ROWS) {
                case 1: tar_tile_1(kc, xr, ldx, pk, yr, ldy, cols, from_y); break;
                case 2: tar_tile_2(kc, xr, ldx, pk, yr, ldy, cols, from_y); break;
                case 3: tar_tile_3(kc, xr, ldx, pk, yr, ldy, cols, from_y); break;
                case 4: tar_tile_4(kc, xr, ldx, pk, yr, ldy, cols, from_y); break;
                case 5: tar_tile_5(kc, xr, ldx, pk, yr, ldy, cols, from_y); break;
                default: tar_tile_6(kc, xr, ldx, pk, yr, ldy, cols, from_y); break;
                }
            }
        }
    }
}
