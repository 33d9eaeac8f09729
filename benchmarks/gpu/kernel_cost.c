/* Is a cold row bound by memory or by the kernel? ggml's CPU mat-vec of one token through a Q4_K
 * [2048 x rows] weight (an expert's gate is 768 rows), timed in the plain layout (one vec_dot per row:
 * what the shim's sliced nodes and llamahot's cold rows use, llamahot loading without CPU repacking)
 * and in the CPU_REPACK buffer (q4_K_8x8 gemv: what stock llama uses for experts in RAM). Weights warm
 * (one copy, in the caches) or cold (copies rotating through more memory than the L3 holds).
 *
 *   bash benchmarks/gpu/graph_cost.sh OUT kernel   (on the device), or by hand:
 *   gcc -O2 -std=c11 -Icsrc/vendor/include benchmarks/gpu/kernel_cost.c -L$LIB -lggml-base -lggml-cpu -lggml \
 *       -Wl,-rpath,$LIB -lm -o /tmp/kernel_cost && /tmp/kernel_cost ROWS COPIES REPS THREADS
 * Prints mean / best microseconds per mat-vec and the weight bytes per second; both layouts' first
 * outputs (they may differ in the last bits: different kernels). */
#define _GNU_SOURCE
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double) t.tv_sec + (double) t.tv_nsec * 1e-9;
}

int main(int argc, char ** argv) {
    const int rows = argc > 1 ? atoi(argv[1]) : 768, copies = argc > 2 ? atoi(argv[2]) : 1;
    const int reps = argc > 3 ? atoi(argv[3]) : 1000, n_threads = argc > 4 ? atoi(argv[4]) : 1;
    const int K = 2048;
    ggml_backend_load_all();
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    ggml_backend_buffer_type_t * (*get_extra)(ggml_backend_dev_t) =
        (ggml_backend_buffer_type_t * (*)(ggml_backend_dev_t)) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    ggml_backend_buffer_type_t * extra = get_extra ? get_extra(dev) : NULL;
    ggml_backend_buffer_type_t repack = NULL;
    for (int i = 0; extra && extra[i]; i++) {
        if (strcmp(ggml_backend_buft_name(extra[i]), "CPU_REPACK") == 0) {
            repack = extra[i];
        }
    }
    ggml_backend_t be = ggml_backend_dev_init(dev, NULL);
    ggml_backend_cpu_set_n_threads(be, n_threads);
    const size_t bytes = ggml_row_size(GGML_TYPE_Q4_K, K) * (size_t) rows;
    float * f = malloc(sizeof(float) * (size_t) K * (size_t) rows);
    srand(1);
    for (size_t i = 0; i < (size_t) K * (size_t) rows; i++) {
        f[i] = ((float) rand() / (float) RAND_MAX - 0.5f) * 0.1f;
    }
    void * q = malloc(bytes);
    ggml_quantize_chunk(GGML_TYPE_Q4_K, f, q, 0, rows, K, NULL);
    float * x = malloc(sizeof(float) * K);
    for (int i = 0; i < K; i++) {
        x[i] = sinf((float) i * 0.1f);
    }
    for (int mode = 0; mode < 2; mode++) {
        ggml_backend_buffer_type_t buft = mode == 0 ? ggml_backend_cpu_buffer_type() : repack;
        if (buft == NULL) {
            printf("no CPU_REPACK buffer type\n");
            break;
        }
        struct ggml_context * cw = ggml_init((struct ggml_init_params) { ggml_tensor_overhead() * (size_t) (copies + 1), NULL, true });
        struct ggml_tensor ** w = malloc(sizeof(*w) * (size_t) copies);
        for (int c = 0; c < copies; c++) {
            w[c] = ggml_new_tensor_2d(cw, GGML_TYPE_Q4_K, K, rows);
        }
        ggml_backend_buffer_t wb = ggml_backend_alloc_ctx_tensors_from_buft(cw, buft);
        ggml_backend_buffer_set_usage(wb, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        for (int c = 0; c < copies; c++) {
            ggml_backend_tensor_set(w[c], q, 0, bytes);   /* CPU_REPACK repacks here */
        }
        const size_t n_meta = (size_t) (2 * copies + 2);
        struct ggml_context * cg = ggml_init((struct ggml_init_params) {
            ggml_tensor_overhead() * n_meta + ggml_graph_overhead_custom(4, false) * (size_t) copies, NULL, true });
        struct ggml_tensor * b = ggml_new_tensor_2d(cg, GGML_TYPE_F32, K, 1);
        struct ggml_cgraph ** g = malloc(sizeof(*g) * (size_t) copies);
        struct ggml_tensor ** out = malloc(sizeof(*out) * (size_t) copies);
        for (int c = 0; c < copies; c++) {
            out[c] = ggml_mul_mat(cg, w[c], b);
            g[c] = ggml_new_graph_custom(cg, 4, false);
            ggml_build_forward_expand(g[c], out[c]);
        }
        ggml_backend_buffer_t gb = ggml_backend_alloc_ctx_tensors(cg, be);
        ggml_backend_tensor_set(b, x, 0, sizeof(float) * K);
        double sum = 0, best = 1e9;
        int n = 0;
        for (int r = 0; r < reps + copies; r++) {
            const double t0 = now_s();
            ggml_backend_graph_compute(be, g[r % copies]);
            const double dt = now_s() - t0;
            if (r >= copies) {   /* the first round only touches the copies */
                sum += dt;
                n++;
                best = dt < best ? dt : best;
            }
        }
        float first[2];
        ggml_backend_tensor_get(out[0], first, 0, sizeof first);
        printf("%-7s rows %5d  copies %4d (%6.0f MB)  threads %2d:  mean %7.1f us  best %7.1f us  %6.1f GB/s  (out %.6f %.6f)\n",
               mode ? "repack" : "plain", rows, copies, (double) bytes * copies / 1e6, n_threads, sum / n * 1e6, best * 1e6,
               (double) bytes / (sum / n) / 1e9, first[0], first[1]);
        fflush(stdout);
        ggml_backend_buffer_free(gb);
        ggml_backend_buffer_free(wb);
        ggml_free(cg);
        ggml_free(cw);
        free(w);
        free(g);
        free(out);
    }
    return 0;
}
