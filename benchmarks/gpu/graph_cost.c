/* Where the fixed cost of a stop's CPU graph goes: ggml's CPU backend timed on the graphs a stop
 * computes for single-token decode (one layer's cold experts: gate, up, GLU, down, Q4_K, Qwen3-30B-A3B
 * shapes), against graphs that isolate the parts: an OpenMP region with one tiny node, a chain of
 * tiny nodes (one barrier each), one expert matmul; and the same FFN computed by custom nodes that
 * quantize their input on every thread (no barrier inside a matmul) and give each thread one slice
 * of rows of every expert. The custom nodes call ggml's own from_float / vec_dot, so their rows must
 * equal ggml's bit for bit; the probe checks it.
 *
 *   gcc -O2 -std=c11 -Icsrc/vendor/include benchmarks/gpu/graph_cost.c -L$LIB -lggml-base -lggml-cpu \
 *       -Wl,-rpath,$LIB -lm -lpthread -o /tmp/graph_cost && /tmp/graph_cost [threads] [reps] [gap_us] [pages] [warm|cold] [prefetch_bytes]
 *
 * Between two graphs the main thread spins gap_us (a stop comes after a GPU split of llama's), so
 * the OpenMP team's threads wait as they do in a decode. Last, the same FFN on a pool of plain
 * threads that spin between tasks (no OpenMP region: one wake-up, one barrier between gate/up and
 * down, one join); its GLU is scalar, so its rows are timed, not compared. Weights rotate over 8 layers' experts
 * (2.7 GB) so they come from memory, as cold experts do; with "warm", the same experts every time
 * (from the caches: the compute alone). */
#define _GNU_SOURCE
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <fcntl.h>
#include <pthread.h>
#include <math.h>
#include <sys/mman.h>
#include <unistd.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { N_EMBD = 2048, N_FF = 768, N_EXPERT = 128, N_LAYERS = 8, MAX_ROWS = 8, MAX_THREADS = 64 };

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void spin_us(int us) {
    const int64_t end = now_ns() + (int64_t) us * 1000;
    while (now_ns() < end) {
    }
}

static int cmp_i64(const void * a, const void * b) {
    const int64_t x = *(const int64_t *) a, y = *(const int64_t *) b;
    return (x > y) - (x < y);
}

/* Per-thread scratch of the custom nodes: the input quantized to vec_dot_type, one row per expert. */
static char scratch[MAX_THREADS][MAX_ROWS * 4096];

/* When each thread entered the custom FFN's first node, after the graph's compute began. */
static int64_t graph_t0;
static struct { int64_t ns; char pad[56]; } thread_in[MAX_THREADS];

/* The custom nodes prefetch this many bytes ahead of the row they compute (0: the hardware alone). */
static int64_t prefetch_ahead;

static inline void prefetch_row(const char * p, size_t size) {
    for (size_t at = 0; at < size; at += 64) {
        __builtin_prefetch(p + at, 0, 3);
    }
}

/* gate and up rows [r0, r1) of every expert in ids, into dst [N_FF, n, 2] (gate at 0, up at 1). */
static void gate_up_rows(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    thread_in[ith].ns = now_ns() - graph_t0;
    const struct ggml_tensor * gate = dst->src[0], * up = dst->src[1], * b = dst->src[2], * ids = dst->src[3];
    const struct ggml_type_traits_cpu * tr = ggml_get_type_traits_cpu(gate->type);
    const struct ggml_type_traits_cpu * q = ggml_get_type_traits_cpu(tr->vec_dot_type);
    char * qb = scratch[ith];
    q->from_float((const float *) b->data, qb, b->ne[0]);
    const int64_t n = ids->ne[0], r0 = N_FF * ith / nth, r1 = N_FF * (ith + 1) / nth;
    for (int64_t e = 0; e < n; e++) {
        const int32_t id = ((const int32_t *) ids->data)[e];
        float * g = (float *) ((char *) dst->data + e * dst->nb[1]);
        float * u = (float *) ((char *) dst->data + e * dst->nb[1] + dst->nb[2]);
        for (int64_t r = r0; r < r1; r++) {
            if (prefetch_ahead) {
                prefetch_row((const char *) gate->data + id * gate->nb[2] + r * gate->nb[1] + prefetch_ahead, gate->nb[1]);
                prefetch_row((const char *) up->data + id * up->nb[2] + r * up->nb[1] + prefetch_ahead, up->nb[1]);
            }
            tr->vec_dot(b->ne[0], g + r, 0, (const char *) gate->data + id * gate->nb[2] + r * gate->nb[1], 0, qb, 0, 1);
            tr->vec_dot(b->ne[0], u + r, 0, (const char *) up->data + id * up->nb[2] + r * up->nb[1], 0, qb, 0, 1);
        }
    }
    (void) userdata;
}

static void nothing(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) dst, (void) ith, (void) nth, (void) userdata;
}

/* down rows [r0, r1) of every expert: dst [N_EMBD, n], act [N_FF, n]. */
static void down_rows(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct ggml_tensor * down = dst->src[0], * act = dst->src[1], * ids = dst->src[2];
    const struct ggml_type_traits_cpu * tr = ggml_get_type_traits_cpu(down->type);
    const struct ggml_type_traits_cpu * q = ggml_get_type_traits_cpu(tr->vec_dot_type);
    const size_t row = ggml_row_size(tr->vec_dot_type, act->ne[0]);
    const int64_t n = ids->ne[0], r0 = N_EMBD * ith / nth, r1 = N_EMBD * (ith + 1) / nth;
    for (int64_t e = 0; e < n; e++) {
        q->from_float((const float *) ((const char *) act->data + e * act->nb[1]), scratch[ith] + e * row, act->ne[0]);
    }
    for (int64_t e = 0; e < n; e++) {
        const int32_t id = ((const int32_t *) ids->data)[e];
        float * o = (float *) ((char *) dst->data + e * dst->nb[1]);
        for (int64_t r = r0; r < r1; r++) {
            if (prefetch_ahead) {
                prefetch_row((const char *) down->data + id * down->nb[2] + r * down->nb[1] + prefetch_ahead, down->nb[1]);
            }
            tr->vec_dot(act->ne[0], o + r, 0, (const char *) down->data + id * down->nb[2] + r * down->nb[1], 0,
                        scratch[ith] + e * row, 0, 1);
        }
    }
    (void) userdata;
}

/* The experts' memory: "malloc" (ggml's way for a buffer), "file" (a file mapped read-only, as llama
 * maps a model), "small" / "huge" (anonymous, with transparent huge pages refused / asked for). */
static char * map_weights(const char * pages, size_t size) {
    if (strcmp(pages, "malloc") == 0) {
        return malloc(size);
    }
    if (strcmp(pages, "file") == 0) {
        /* written once through an anonymous mapping, then mapped again from the file (page cache) */
        const char * path = "/tmp/graph_cost_weights.bin";
        int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
        if (fd < 0 || ftruncate(fd, (off_t) size) != 0) {
            perror(path);
            return NULL;
        }
        char * m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        return m == MAP_FAILED ? NULL : m;
    }
    char * m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        return NULL;
    }
    madvise(m, size, strcmp(pages, "huge") == 0 ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    return m;
}

/* ---- a pool of plain threads: spin on a generation counter, one barrier primitive ---------- */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static struct {
    int n;
    pthread_t threads[MAX_THREADS];
    atomic_int generation;   /* bumped to start a task */
    atomic_int arrived;
    atomic_int barrier_generation;
    atomic_int stop;
    void (*task)(int ith, int nth);
} pool;

static void pool_barrier(void) {
    const int g = atomic_load_explicit(&pool.barrier_generation, memory_order_acquire);
    if (atomic_fetch_add_explicit(&pool.arrived, 1, memory_order_acq_rel) == pool.n - 1) {
        atomic_store_explicit(&pool.arrived, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&pool.barrier_generation, 1, memory_order_release);
    } else {
        while (atomic_load_explicit(&pool.barrier_generation, memory_order_acquire) == g) {
            cpu_relax();
        }
    }
}

static void * pool_worker(void * arg) {
    const int ith = (int) (intptr_t) arg;
    int seen = 0;
    for (;;) {
        int g;
        while ((g = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen) {
            if (atomic_load_explicit(&pool.stop, memory_order_relaxed)) {
                return NULL;
            }
            cpu_relax();
        }
        seen = g;
        pool.task(ith, pool.n);
        pool_barrier();
    }
}

static void pool_run(void (*task)(int, int)) {
    pool.task = task;
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    task(0, pool.n);
    pool_barrier();
}

static void pool_start(int n) {
    pool.n = n;
    atomic_store(&pool.stop, 0);
    for (int i = 1; i < n; i++) {
        pthread_create(&pool.threads[i], NULL, pool_worker, (void *) (intptr_t) i);
    }
}

static void pool_stop(void) {
    atomic_store(&pool.stop, 1);
    for (int i = 1; i < pool.n; i++) {
        pthread_join(pool.threads[i], NULL);
    }
}

/* The pool's FFN: its operands. */
static struct {
    const char * gate, * up, * down;  /* the layer's expert matrices */
    const int32_t * ids;
    int rows;
    const float * input;
} job;
static float pool_gu[2][MAX_ROWS][N_FF], pool_act[MAX_ROWS][N_FF], pool_out[MAX_ROWS][N_EMBD];

static void pool_nothing(int ith, int nth) {
    (void) ith, (void) nth;
}

static void pool_ffn(int ith, int nth) {
    const struct ggml_type_traits_cpu * tr = ggml_get_type_traits_cpu(GGML_TYPE_Q4_K);
    const struct ggml_type_traits_cpu * q = ggml_get_type_traits_cpu(tr->vec_dot_type);
    const size_t in_row = ggml_row_size(GGML_TYPE_Q4_K, N_EMBD), ff_row = ggml_row_size(GGML_TYPE_Q4_K, N_FF);
    const size_t expert = in_row * N_FF;
    char * qb = scratch[ith];
    q->from_float(job.input, qb, N_EMBD);
    const int64_t r0 = N_FF * ith / nth, r1 = N_FF * (ith + 1) / nth;
    for (int e = 0; e < job.rows; e++) {
        const char * g = job.gate + job.ids[e] * expert, * u = job.up + job.ids[e] * expert;
        for (int64_t r = r0; r < r1; r++) {
            tr->vec_dot(N_EMBD, &pool_gu[0][e][r], 0, g + r * in_row, 0, qb, 0, 1);
            tr->vec_dot(N_EMBD, &pool_gu[1][e][r], 0, u + r * in_row, 0, qb, 0, 1);
            const float x = pool_gu[0][e][r];
            pool_act[e][r] = x / (1.0f + expf(-x)) * pool_gu[1][e][r];
        }
    }
    pool_barrier();
    const size_t q_row = ggml_row_size(tr->vec_dot_type, N_FF);
    for (int e = 0; e < job.rows; e++) {
        q->from_float(pool_act[e], qb + e * q_row, N_FF);
    }
    const int64_t d0 = N_EMBD * ith / nth, d1 = N_EMBD * (ith + 1) / nth;
    for (int e = 0; e < job.rows; e++) {
        const char * d = job.down + job.ids[e] * ff_row * N_EMBD;
        for (int64_t r = d0; r < d1; r++) {
            tr->vec_dot(N_FF, &pool_out[e][r], 0, d + r * ff_row, 0, qb + e * q_row, 0, 1);
        }
    }
}

struct layer {
    struct ggml_tensor * gate, * up, * down;
};

struct variant {
    const char * name;
    int rows;       /* cold experts in the graph (0: no weights) */
    int kind;       /* 0: region, 1: chain of 8, 2: gate matmul, 3: ggml FFN, 4: custom FFN */
};

int main(int argc, char ** argv) {
    const int n_threads = argc > 1 ? atoi(argv[1]) : 16;
    const int reps = argc > 2 ? atoi(argv[2]) : 2000;
    const int gap_us = argc > 3 ? atoi(argv[3]) : 200;
    const char * pages = argc > 4 ? argv[4] : "malloc";
    /* warm: the same experts every time (in the caches): what the compute alone costs. */
    const int warm = argc > 5 && strcmp(argv[5], "warm") == 0;
    prefetch_ahead = argc > 6 ? atoll(argv[6]) : 0;
    printf("%s experts; the custom nodes prefetch %lld bytes ahead\n", warm ? "warm (the same every graph)" : "cold (rotating)",
           (long long) prefetch_ahead);

    /* Weights: one expert quantized from random numbers, copied into every expert of every layer. */
    const size_t w_bytes = ggml_row_size(GGML_TYPE_Q4_K, N_EMBD) * N_FF * N_EXPERT;
    const size_t all_bytes = 3 * N_LAYERS * w_bytes;
    struct ggml_init_params wp = { 64 * ggml_tensor_overhead(), NULL, true };
    struct ggml_context * wctx = ggml_init(wp);
    char * wmem = map_weights(pages, all_bytes);
    if (wmem == NULL) {
        return 1;
    }
    struct layer layers[N_LAYERS];
    float * src = malloc(sizeof(float) * N_EMBD * N_FF);
    srand(1);
    for (int64_t i = 0; i < (int64_t) N_EMBD * N_FF; i++) {
        src[i] = ((float) rand() / RAND_MAX - 0.5f) * 0.1f;
    }
    void * one = malloc(w_bytes / N_EXPERT);
    for (int l = 0; l < N_LAYERS; l++) {
        layers[l].gate = ggml_new_tensor_3d(wctx, GGML_TYPE_Q4_K, N_EMBD, N_FF, N_EXPERT);
        layers[l].up = ggml_new_tensor_3d(wctx, GGML_TYPE_Q4_K, N_EMBD, N_FF, N_EXPERT);
        layers[l].down = ggml_new_tensor_3d(wctx, GGML_TYPE_Q4_K, N_FF, N_EMBD, N_EXPERT);
        struct ggml_tensor * w[3] = { layers[l].gate, layers[l].up, layers[l].down };
        for (int p = 0; p < 3; p++) {
            w[p]->data = wmem + (size_t) (3 * l + p) * w_bytes;
            ggml_quantize_chunk(GGML_TYPE_Q4_K, src, one, 0, w[p]->ne[1], w[p]->ne[0], NULL);
            for (int e = 0; e < N_EXPERT; e++) {
                memcpy((char *) w[p]->data + e * w[p]->nb[2], one, w[p]->nb[2]);
            }
        }
    }

    ggml_backend_t cpu = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(cpu, n_threads);
    const struct variant variants[] = {
        { "region (1 tiny node)", 0, 0 }, { "chain of 8 tiny nodes", 0, 1 }, { "gate matmul, 1 row", 1, 2 },
        { "ggml FFN, 1 row", 1, 3 }, { "custom FFN, 1 row", 1, 4 }, { "ggml FFN, 2 rows", 2, 3 },
        { "custom FFN, 2 rows", 2, 4 }, { "ggml FFN, 4 rows", 4, 3 }, { "custom FFN, 4 rows", 4, 4 },
        { "ggml FFN, 8 rows", 8, 3 }, { "custom FFN, 8 rows", 8, 4 },
    };
    const int n_variants = (int) (sizeof(variants) / sizeof(variants[0]));
    printf("threads %d, reps %d, gap %d us between graphs, weights in %s memory; median / p10 / p90 us per graph\n",
           n_threads, reps, gap_us, pages);
    static float ref[MAX_ROWS][MAX_ROWS * N_EMBD];  /* the ggml FFN's rows, per rows count */
    int64_t * t = malloc(sizeof(int64_t) * reps);
    int64_t * first_in = malloc(sizeof(int64_t) * reps), * last_in = malloc(sizeof(int64_t) * reps);
    for (int v = 0; v < n_variants; v++) {
        const struct variant * var = &variants[v];
        struct ggml_init_params gp = { 64 * ggml_tensor_overhead() + ggml_graph_overhead(), NULL, true };
        struct ggml_context * g = ggml_init(gp);
        struct ggml_tensor * b = ggml_new_tensor_3d(g, GGML_TYPE_F32, N_EMBD, 1, 1);
        struct ggml_tensor * ids = ggml_new_tensor_2d(g, GGML_TYPE_I32, var->rows > 0 ? var->rows : 1, 1);
        /* Weight views are set per repetition (layer rotation): tensors without data, pointed later. */
        struct ggml_tensor * wg = ggml_new_tensor_3d(g, GGML_TYPE_Q4_K, N_EMBD, N_FF, N_EXPERT);
        struct ggml_tensor * wu = ggml_new_tensor_3d(g, GGML_TYPE_Q4_K, N_EMBD, N_FF, N_EXPERT);
        struct ggml_tensor * wd = ggml_new_tensor_3d(g, GGML_TYPE_Q4_K, N_FF, N_EMBD, N_EXPERT);
        struct ggml_tensor * tiny = ggml_new_tensor_1d(g, GGML_TYPE_F32, 64);
        ggml_set_input(b);
        ggml_set_input(ids);
        struct ggml_tensor * out = NULL;
        if (var->kind <= 1) {
            out = tiny;
            for (int i = 0; i < (var->kind == 0 ? 1 : 8); i++) {
                out = ggml_custom_4d(g, GGML_TYPE_F32, 64, 1, 1, 1, &out, 1, nothing, GGML_N_TASKS_MAX, NULL);
            }
        } else if (var->kind == 2) {
            out = ggml_mul_mat_id(g, wg, b, ids);
        } else if (var->kind == 3) {
            struct ggml_tensor * gt = ggml_mul_mat_id(g, wg, b, ids);
            struct ggml_tensor * ut = ggml_mul_mat_id(g, wu, b, ids);
            out = ggml_mul_mat_id(g, wd, ggml_swiglu_split(g, gt, ut), ids);
        } else {
            struct ggml_tensor * args[4] = { wg, wu, b, ids };
            struct ggml_tensor * gu = ggml_custom_4d(g, GGML_TYPE_F32, N_FF, var->rows, 2, 1, args, 4, gate_up_rows, GGML_N_TASKS_MAX, NULL);
            struct ggml_tensor * gt = ggml_view_2d(g, gu, N_FF, var->rows, gu->nb[1], 0);
            struct ggml_tensor * ut = ggml_view_2d(g, gu, N_FF, var->rows, gu->nb[1], gu->nb[2]);
            struct ggml_tensor * act = ggml_swiglu_split(g, gt, ut);
            struct ggml_tensor * dargs[3] = { wd, act, ids };
            out = ggml_custom_4d(g, GGML_TYPE_F32, N_EMBD, var->rows, 1, 1, dargs, 3, down_rows, GGML_N_TASKS_MAX, NULL);
        }
        ggml_set_output(out);
        struct ggml_cgraph * graph = ggml_new_graph(g);
        ggml_build_forward_expand(graph, out);
        /* Inputs and intermediates in one CPU buffer; weights point into the layers. */
        wg->data = layers[0].gate->data;
        wu->data = layers[0].up->data;
        wd->data = layers[0].down->data;
        wg->buffer = wu->buffer = wd->buffer = NULL;
        ggml_gallocr_t galloc = ggml_gallocr_new(ggml_backend_cpu_buffer_type());
        if (!ggml_gallocr_alloc_graph(galloc, graph)) {
            fprintf(stderr, "alloc failed\n");
            return 1;
        }
        static float input[N_EMBD];
        for (int i = 0; i < N_EMBD; i++) {
            input[i] = sinf((float) i) * 0.5f;
        }
        uint64_t diff_rows = 0, compared = 0;
        for (int r = -50; r < reps; r++) {
            const int l = warm ? 0 : (r + 50) % N_LAYERS;
            wg->data = layers[l].gate->data;
            wu->data = layers[l].up->data;
            wd->data = layers[l].down->data;
            for (int e = 0; e < var->rows; e++) {
                ((int32_t *) ids->data)[e] = (int32_t) ((warm ? 0 : (r + 50) * 7) + e * 13) % N_EXPERT;
            }
            if (b->data != NULL) {  /* each time, as a stop gathers it: the allocator may reuse its memory */
                memcpy(b->data, input, sizeof(input));
            }
            spin_us(gap_us);
            const int64_t t0 = now_ns();
            graph_t0 = t0;
            ggml_backend_graph_compute(cpu, graph);
            const int64_t dt = now_ns() - t0;
            if (r >= 0) {
                t[r] = dt;
                if (var->kind == 4) {
                    int64_t first = INT64_MAX, last = 0;
                    for (int i = 0; i < n_threads; i++) {
                        first = thread_in[i].ns < first ? thread_in[i].ns : first;
                        last = thread_in[i].ns > last ? thread_in[i].ns : last;
                    }
                    first_in[r] = first;
                    last_in[r] = last;
                }
            }
            /* Same weights in every expert and layer: one reference per rows count. */
            if (var->kind >= 3 && r == -50 && var->kind == 3) {
                memcpy(ref[var->rows - 1], out->data, sizeof(float) * N_EMBD * var->rows);
            } else if (var->kind == 4) {
                compared++;
                diff_rows += memcmp(ref[var->rows - 1], out->data, sizeof(float) * N_EMBD * var->rows) != 0;
            }
        }
        qsort(t, reps, sizeof(int64_t), cmp_i64);
        printf("%-24s %8.1f %8.1f %8.1f", var->name, t[reps / 2] / 1e3, t[reps / 10] / 1e3, t[reps * 9 / 10] / 1e3);
        if (var->kind == 4) {
            printf("   bit-identical to ggml's: %s (%llu of %llu runs differ)", diff_rows == 0 ? "yes" : "NO",
                   (unsigned long long) diff_rows, (unsigned long long) compared);
            qsort(first_in, reps, sizeof(int64_t), cmp_i64);
            qsort(last_in, reps, sizeof(int64_t), cmp_i64);
            printf("; threads in after %.1f / %.1f us (first / last, median)", first_in[reps / 2] / 1e3, last_in[reps / 2] / 1e3);
        }
        printf("\n");
        ggml_gallocr_free(galloc);
        ggml_free(g);
    }
    /* The pool, started only now: its spinning threads must not take the cores from OpenMP's above. */
    pool_start(n_threads);
    static float input[N_EMBD];
    for (int i = 0; i < N_EMBD; i++) {
        input[i] = sinf((float) i) * 0.5f;
    }
    job.input = input;
    const int pool_rows[] = { 0, 1, 2, 4, 8 };
    for (int v = 0; v < 5; v++) {
        const int rows = pool_rows[v];
        int32_t ids[MAX_ROWS];
        for (int r = -50; r < reps; r++) {
            const int l = warm ? 0 : (r + 50) % N_LAYERS;
            job.gate = layers[l].gate->data;
            job.up = layers[l].up->data;
            job.down = layers[l].down->data;
            for (int e = 0; e < rows; e++) {
                ids[e] = (int32_t) ((warm ? 0 : (r + 50) * 7) + e * 13) % N_EXPERT;
            }
            job.ids = ids;
            job.rows = rows;
            spin_us(gap_us);
            const int64_t t0 = now_ns();
            pool_run(rows == 0 ? pool_nothing : pool_ffn);
            if (r >= 0) {
                t[r] = now_ns() - t0;
            }
        }
        qsort(t, reps, sizeof(int64_t), cmp_i64);
        char name[64];
        snprintf(name, sizeof(name), rows == 0 ? "pool: wake + join" : "pool FFN, %d row%s", rows, rows > 1 ? "s" : "");
        printf("%-24s %8.1f %8.1f %8.1f%s\n", name, t[reps / 2] / 1e3, t[reps / 10] / 1e3, t[reps * 9 / 10] / 1e3,
               rows ? "   (scalar GLU: timed, not compared)" : "");
    }
    pool_stop();
    free(t);
    free(first_in);
    free(last_in);
    ggml_backend_free(cpu);
    ggml_free(wctx);
    if (strcmp(pages, "file") == 0) {
        unlink("/tmp/graph_cost_weights.bin");
    }
    return 0;
}
