/* llamahot shim: see llamahot.h.
 *
 * For a managed MUL_MAT_ID node (its src[0] is a routed-expert weight) of a small ubatch:
 *   ask=true:  set t->op = GGML_OP_NONE so llama's backend skips it, and ask to see it;
 *   ask=false: restore t->op, split the (token, k) entries into hot (expert in a published slot)
 *              and cold, compute each part compactly -- every expert with exactly the rows it had,
 *              in the same order -- hot from the slot tensor on the slot device, cold from the
 *              original weight on the CPU, and scatter the rows into t->data.
 * Nothing else in llama's graph is touched; ids and activations are only read.
 */
#define _GNU_SOURCE /* clock_gettime under -std=c11; dlsym's RTLD_DEFAULT */
#include "llamahot.h"

#include "ggml-alloc.h"
#include "ggml-cpu.h"

#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef LH_GGML_VERSION
#error "LH_GGML_VERSION must be defined by the build (the vendored ggml version)"
#endif

#define LH_ALIGN 64
#define LH_MAX_TIMED_THREADS 256
#define LH_TIMED_NODES 4   /* sliced nodes timed per graph: gate, up, down (+1) */
_Static_assert(sizeof(((struct lh_counters *) 0)->sliced_node_last_in_ns) == LH_TIMED_NODES * sizeof(int64_t),
               "lh_counters' per-node arrays hold LH_TIMED_NODES");
/* Weight bytes a CPU part must read before it is worth splitting over threads (~100 us on one core). */
#define LH_PARALLEL_MIN_BYTES ((size_t) 1 << 20)

static int64_t lh_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* One recognised MUL_MAT_ID weight (or a tensor known not to be one: moe_layer = -1). */
struct lh_weight_entry {
    const struct ggml_tensor * key;
    int32_t moe_layer;
    int32_t proj;
    bool offload_copy;   /* the scheduler's copy of the weight in a GPU split (lh_managed) */
};

/* The routed-expert weights of one MoE layer and their slot tensors. */
struct lh_layer {
    struct ggml_tensor * weight[LH_PROJ_COUNT];
    struct ggml_tensor * slot[LH_PROJ_COUNT];
    ggml_backend_buffer_t slot_buffer[LH_PROJ_COUNT];
    int32_t n_published;
};

/* A (k, token) entry of a node's ids, with the matrix (slot or expert) that computes it. */
struct lh_entry {
    int32_t k;
    int32_t token;
    int32_t matrix;
};

/* A MoE layer's expert FFN as llama built it: the gate/up matmuls, the nodes between them and
 * the down matmul (activation, biases, views), in topological order. Found at the down node's
 * ask by walking back from its input; recomputed by the shim in one go (one stop per layer). */
#define LH_FFN_MAX_NODES 32
#define LH_COLD_GRAPH_ROWS 16   /* persistent cold graphs per layer: 1 to this many rows */
struct lh_ffn {
    int32_t layer;
    struct ggml_tensor * down;
    const struct ggml_tensor * input;  /* the layer input the gate/up matmuls read */
    int32_t n_nodes;
    struct ggml_tensor * nodes[LH_FFN_MAX_NODES];
    enum ggml_op saved_op[LH_FFN_MAX_NODES + 1];   /* nodes, then down */
    int32_t n_mutated;
    struct ggml_tensor * mutated[LH_FFN_MAX_NODES + 1];
};

/* A host-memory weight used by the FFN (a routed-expert bias) and its copy on the GPU. */
#define LH_MAX_DEV_COPIES 256
struct lh_dev_copy {
    const struct ggml_tensor * src;
    struct ggml_tensor * dev;
    ggml_backend_buffer_t buffer;
};

/* Growable memory for one compact problem's inputs and outputs, as a ggml buffer. */
struct lh_scratch {
    ggml_backend_t backend;        /* whose buffer type it is allocated in */
    ggml_backend_buffer_t buffer;
    size_t size;
};

/* One part (hot, cold, or cold on the device) of the FFN on a compact list of n rows. */
struct lh_ffn_part {
    struct ggml_tensor * b;        /* [n_embd, 1, n] the layer input rows */
    struct ggml_tensor * ids;      /* [1, n] matrix index of each row: slot (hot) or expert (cold) */
    struct ggml_tensor * experts;  /* [1, n] expert of each row, for biases */
    struct ggml_tensor * out;      /* [n_embd, 1, n] */
    /* Where ids and experts sit after b in staging, and the inputs' bytes there. In the persistent
     * graph the three lie one after another in device memory and staging copies that layout, so one
     * copy uploads them (lh_part_one_upload); else at lh_pad steps, three copies. */
    size_t ids_at, experts_at, inputs_bytes;
    bool one_upload;
};

/* A persistent part graph for single-token decode (lh_part_graph_get). With GPU slots, one layer's hot
 * part built once with a fixed number of rows (n_expert_used; unused rows go to a slot no hot row uses
 * and are not read back), so the GPU backend gets the same graph every token and can replay it as a
 * CUDA graph instead of launching each kernel; freed with the slots it reads. On the CPU, one layer's
 * cold part per number of rows, so a stop builds and allocates nothing. Rebuilt if llama's FFN for the
 * layer changes. */
struct lh_part_graph {
    struct ggml_context * g;
    struct ggml_cgraph * graph;
    ggml_backend_buffer_t buffer;
    struct lh_ffn_part part;
    bool experts_used;             /* whether a bias reads part.experts */
    struct lh_miss_scratch * scratch; /* a device cold part's: the matrices its rows' experts go into */
    int64_t rows;
    bool ggml_matmuls;             /* built with LH_DEBUG_GGML_MATMULS (ggml's MUL_MAT_ID, not sliced) */
    uint64_t signature;            /* of the llama FFN it was cloned from */
    int32_t n_nodes;               /* that FFN's nodes: unchanged pointers (llama reused its graph) */
    const struct ggml_tensor * nodes[LH_FFN_MAX_NODES];  /* spare hashing the FFN at every stop */
};

/* Device matrices a layer's cold experts are copied into, rows of `n` experts, per projection; shared
 * by every layer whose expert weights have these types and shapes (stops run one at a time). */
#define LH_MAX_MISS_SCRATCH 8
struct lh_miss_scratch {
    struct ggml_tensor * matrix[LH_PROJ_COUNT];  /* like the layer's weights, with n experts (ne[2]) */
    ggml_backend_buffer_t buffer[LH_PROJ_COUNT];
};

struct lh_ctx {
    int32_t n_blocks;
    int32_t n_moe_layers;
    int32_t n_expert;
    int32_t * blk_to_moe;          /* [n_blocks] */

    /* Weight pointer -> (layer, proj). Open addressing; weights never move while a model lives. */
    struct lh_weight_entry * table;
    uint32_t table_cap;            /* power of two */
    uint32_t table_used;
    struct lh_layer * layers;      /* [n_moe_layers] */

    int64_t * counts;              /* [n_moe_layers][n_expert] */
    int64_t * hits;                /* [n_moe_layers] */
    int64_t * misses;              /* [n_moe_layers] */
    int64_t * last_routed;         /* [n_moe_layers][n_expert]: token clock of the last routing, 0 = never */
    int64_t token_clock;           /* tokens counted since creation or the last lh_reset_counters */
    int64_t ubatch_base;           /* token_clock at the start of the ubatch being counted */
    struct lh_counters counters;
    bool observing;                /* false: the callback stays installed but never stops the graph */
    int32_t observe_every;         /* single-token decodes observed: one in this many (lh_set_observe_every) */
    int32_t observe_burst;         /* ... this many in a row */
    int64_t single_decodes;        /* single-token decodes lh_before_decode saw while reading one in n */
    bool unread_decode;            /* the decode running now is not read (lh_before_decode) */
    ggml_backend_buffer_type_t last_ask_buft;  /* buffer type of the node last asked about (split starts) */
    int32_t * ids_copy;            /* router ids read back from device memory (lh_count_routing) */
    struct lh_weight_entry offload_entry;   /* the last offloaded weight copy classified (lh_managed) */
    size_t ids_cap;

    /* Slots (after lh_slots_init). */
    int32_t n_slots;
    int32_t slot_kind;
    int32_t prefill_bypass;
    int32_t n_threads;             /* CPU threads for the shim's own graphs */
    int64_t lone_row_idle_ns;      /* lh_set_lone_row_idle_ns; 0: off */
    int64_t last_parallel_end_ns;  /* when the shim's last multi-threaded CPU graph finished */
    int32_t * slot_of_expert;      /* [n_moe_layers][n_expert], -1 = cold */
    int32_t * expert_of_slot;      /* [n_moe_layers][n_slots], -1 = empty */
    /* Asynchronous slot loads (lh_set_fence): per layer, the loader's fence for copies into its
     * slots that may still be in flight (NULL: none), waited for once before its slots are read. */
    void ** fences;                /* [n_moe_layers] */
    int32_t (*wait_fence)(void * fence);
    ggml_backend_t cpu;            /* cold experts (and hot ones for host slots) */
    ggml_backend_t gpu;            /* hot experts for GPU slots */
    struct lh_scratch host_scratch;
    struct lh_scratch gpu_scratch;
    struct lh_entry * hot;         /* entry lists, grown as needed */
    struct lh_entry * cold;
    size_t entries_cap;
    float * shadow_out;            /* shadow mode: our result before comparing */
    /* Shadow mode, whole-FFN: a copy of the layer input taken right after the first gate/up matmul.
     * llama computes the rest of the FFN there, and gallocr may put the activation into the
     * input's memory once gate/up have read it (it does when both have the same size). */
    void * shadow_input;
    size_t shadow_input_cap;
    const struct ggml_tensor * shadow_input_of;   /* the tensor it copies */
    struct ggml_tensor shadow_input_view;         /* its header, data pointing at the copy */
    size_t shadow_cap;
    void * graph_mem;              /* metadata of the per-node compact graphs */
    size_t graph_mem_size;
    struct lh_pool * pool;         /* the stops' own threads (lh_set_pool), started on first use */
    int64_t pool_spin_ns;          /* < 0: off, ggml's graph compute */
    int64_t row_prefetch;          /* lh_sliced_mul_mat_id: bytes each thread prefetches ahead of its rows */
    void * sliced_scratch;         /* lh_sliced_mul_mat_id: each thread's quantized input rows */
    size_t sliced_scratch_size;
    size_t sliced_stride;          /* bytes per thread in it */
    /* When each thread entered and left each sliced node of the graph now computing (two cache lines
     * each): how long the team takes to start a stop's graph, and where the rest of it goes. */
    int64_t graph_seq, graph_t0_ns;
    struct {
        int64_t seq, n;                     /* the graph's seq, sliced nodes run in it so far */
        int64_t in[LH_TIMED_NODES], out[LH_TIMED_NODES]; /* ns after graph_t0_ns */
        char pad[2 * LH_ALIGN - (2 + 2 * LH_TIMED_NODES) * sizeof(int64_t)];
    } thread_in[LH_MAX_TIMED_THREADS];

    /* Layer FFN fast path: per layer, whether llama's FFN was recognised (1), not (-1) or not yet
     * tried (0); the FFN whose nodes are skipped right now; allocators for the compact graphs. */
    int8_t * ffn_mode;             /* [n_moe_layers] */
    struct lh_ffn ffn;
    bool ffn_pending;
    ggml_gallocr_t cpu_galloc;
    ggml_gallocr_t gpu_galloc;
    /* Host memory for the GPU part's inputs and outputs: pinned when the device offers it, so the
     * download is truly asynchronous (into pageable memory CUDA would block the CPU until the GPU
     * finished, and the cold part could not overlap the hot one). */
    void * staging;
    size_t staging_size;
    ggml_backend_buffer_type_t staging_buft;   /* the GPU's host buffer type, or NULL: malloc */
    ggml_backend_buffer_t staging_buffer;
    struct lh_dev_copy dev_copies[LH_MAX_DEV_COPIES];
    int32_t n_dev_copies;
    struct lh_part_graph * hot_graphs;  /* [n_moe_layers], GPU slots only, made on first use */
    struct lh_part_graph * cold_graphs; /* [n_moe_layers][LH_COLD_GRAPH_ROWS]: cold parts by rows, on first use */
    /* Cold experts on the device (lh_set_cold_on_device): this share of a single-token stop's cold
     * experts is copied into scratch matrices on the device and computed there, while the CPU
     * computes the rest. One scratch set per distinct shape of a layer's expert weights. */
    float cold_on_device;
    struct lh_miss_scratch miss_scratch[LH_MAX_MISS_SCRATCH];
    int32_t n_miss_scratch;
    struct lh_part_graph * dev_graphs; /* [n_moe_layers][LH_COLD_GRAPH_ROWS]: device cold parts by rows */
    /* The device cold rows' expert copies go on a stream of their own (a second backend on the GPU)
     * and the part waits for them with an event, so the hot part computes meanwhile; NULL where the
     * device has no events (the emulated GPU): the copies go on `gpu`, in order. */
    ggml_backend_t copy_gpu;
    ggml_backend_event_t copies_done;
    struct lh_entry * dev_cold;        /* the cold entries sent to the device; matrix = scratch row */
    int32_t * dev_expert_of;           /* scratch row -> expert (like expert_of_slot for slots) */
    size_t dev_cold_cap;

    /* lh_compute_here: a one-node graph on the calling thread. */
    struct ggml_threadpool * one_thread;   /* ggml's, for nodes the shim computes on its own thread */
    void * one_graph_mem;
    size_t one_graph_mem_size;
    void * one_work;
    size_t one_work_size;

    /* The node whose op we changed at ask=true, restored at ask=false. */
    struct ggml_tensor * pending;
    enum ggml_op pending_op;
    int32_t debug_flags;

    ggml_backend_sched_eval_callback user_cb;
    void * user_ud;
    bool user_wanted;              /* the user's answer at ask=true for the node now pending */

    /* Timeline mode: a ring of the latest callbacks. */
    struct lh_event * events;
    int64_t n_events;              /* recorded since the last lh_timeline */

    char error[256];
};

static void lh_error(struct lh_ctx * ctx, const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(ctx->error, sizeof(ctx->error), fmt, args);
    va_end(args);
}

static uint32_t lh_hash_ptr(const void * p) {
    uint64_t x = (uint64_t) (uintptr_t) p;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (uint32_t) x;
}

static size_t lh_pad(size_t n) {
    return (n + LH_ALIGN - 1) / LH_ALIGN * LH_ALIGN;
}

struct lh_ctx * lh_ctx_new(int32_t n_blocks, const int32_t * blk_to_moe, int32_t n_moe_layers, int32_t n_expert) {
    if (n_blocks <= 0 || n_moe_layers <= 0 || n_expert <= 0 || blk_to_moe == NULL) {
        return NULL;
    }
    struct lh_ctx * ctx = calloc(1, sizeof(*ctx));
    if (!ctx) {
        return NULL;
    }
    ctx->n_blocks = n_blocks;
    ctx->n_moe_layers = n_moe_layers;
    ctx->n_expert = n_expert;
    ctx->observing = true;
    ctx->observe_every = 1;
    ctx->observe_burst = 1;
    ctx->pool_spin_ns = -1;
    ctx->row_prefetch = LH_ROW_PREFETCH_DEFAULT;
    ctx->blk_to_moe = malloc(sizeof(int32_t) * (size_t) n_blocks);
    uint32_t cap = 64;
    while (cap < (uint32_t) n_blocks * LH_PROJ_COUNT * 4u) {
        cap <<= 1;
    }
    ctx->table_cap = cap;
    ctx->table = calloc(cap, sizeof(struct lh_weight_entry));
    ctx->layers = calloc((size_t) n_moe_layers, sizeof(struct lh_layer));
    ctx->counts = calloc((size_t) n_moe_layers * (size_t) n_expert, sizeof(int64_t));
    ctx->hits = calloc((size_t) n_moe_layers, sizeof(int64_t));
    ctx->misses = calloc((size_t) n_moe_layers, sizeof(int64_t));
    ctx->last_routed = calloc((size_t) n_moe_layers * (size_t) n_expert, sizeof(int64_t));
    ctx->slot_of_expert = malloc(sizeof(int32_t) * (size_t) n_moe_layers * (size_t) n_expert);
    ctx->ffn_mode = calloc((size_t) n_moe_layers, sizeof(int8_t));
    ctx->fences = calloc((size_t) n_moe_layers, sizeof(void *));
    if (!ctx->ffn_mode || !ctx->fences || !ctx->last_routed || !ctx->blk_to_moe || !ctx->table || !ctx->layers || !ctx->counts || !ctx->hits || !ctx->misses ||
        !ctx->slot_of_expert) {
        lh_ctx_free(ctx);
        return NULL;
    }
    memcpy(ctx->blk_to_moe, blk_to_moe, sizeof(int32_t) * (size_t) n_blocks);
    for (size_t i = 0; i < (size_t) n_moe_layers * (size_t) n_expert; i++) {
        ctx->slot_of_expert[i] = -1;
    }
    return ctx;
}

static void lh_slots_free(struct lh_ctx * ctx);
static void lh_part_graph_free(struct lh_part_graph * h);
static void lh_pool_free(struct lh_pool * p);
static void lh_miss_scratch_free(struct lh_miss_scratch * m);

static void lh_scratch_free(struct lh_scratch * s) {
    if (s->buffer) {
        ggml_backend_buffer_free(s->buffer);
    }
    s->buffer = NULL;
    s->size = 0;
}

void lh_ctx_free(struct lh_ctx * ctx) {
    if (!ctx) {
        return;
    }
    if (ctx->layers && ctx->slot_of_expert) {
        lh_slots_free(ctx);
    }
    lh_scratch_free(&ctx->host_scratch);
    lh_scratch_free(&ctx->gpu_scratch);
    for (int32_t i = 0; i < ctx->n_dev_copies; i++) {
        ggml_backend_buffer_free(ctx->dev_copies[i].buffer);
        free(ctx->dev_copies[i].dev);
    }
    if (ctx->cpu_galloc) {
        ggml_gallocr_free(ctx->cpu_galloc);
    }
    if (ctx->gpu_galloc) {
        ggml_gallocr_free(ctx->gpu_galloc);
    }
    if (ctx->staging_buffer) {
        ggml_backend_buffer_free(ctx->staging_buffer);
    } else {
        free(ctx->staging);
    }
    for (int32_t i = 0; i < ctx->n_miss_scratch; i++) {
        lh_miss_scratch_free(&ctx->miss_scratch[i]);
    }
    free(ctx->ffn_mode);
    free(ctx->fences);
    free(ctx->ids_copy);
    if (ctx->copies_done) {
        ggml_backend_event_free(ctx->copies_done);
    }
    if (ctx->copy_gpu) {
        ggml_backend_free(ctx->copy_gpu);
    }
    if (ctx->gpu) {
        ggml_backend_free(ctx->gpu);
    }
    if (ctx->cpu) {
        ggml_backend_free(ctx->cpu);
    }
    free(ctx->blk_to_moe);
    free(ctx->table);
    free(ctx->layers);
    free(ctx->counts);
    free(ctx->hits);
    free(ctx->misses);
    free(ctx->last_routed);
    free(ctx->slot_of_expert);
    free(ctx->expert_of_slot);
    free(ctx->hot);
    free(ctx->cold);
    free(ctx->shadow_out);
    free(ctx->events);
    free(ctx->shadow_input);
    lh_pool_free(ctx->pool);
    free(ctx->graph_mem);
    free(ctx->sliced_scratch);
    if (ctx->one_thread) {
        ggml_threadpool_free(ctx->one_thread);
    }
    free(ctx->one_graph_mem);
    free(ctx->one_work);
    free(ctx->hot_graphs);
    struct lh_part_graph * by_rows[2] = { ctx->cold_graphs, ctx->dev_graphs };
    for (int k = 0; k < 2; k++) {
        for (int32_t i = 0; by_rows[k] != NULL && i < ctx->n_moe_layers * LH_COLD_GRAPH_ROWS; i++) {
            lh_part_graph_free(&by_rows[k][i]);
        }
        free(by_rows[k]);
    }
    free(ctx->dev_cold);
    free(ctx->dev_expert_of);
    free(ctx);
}

void lh_set_user_callback(struct lh_ctx * ctx, ggml_backend_sched_eval_callback cb, void * user_data) {
    ctx->user_cb = cb;
    ctx->user_ud = user_data;
}

int32_t lh_set_observe_every(struct lh_ctx * ctx, int32_t n, int32_t burst) {
    if (n < 1 || burst < 1 || (n > 1 && ctx->slot_kind != LH_SLOTS_IN_PLACE)) {
        lh_error(ctx, "observe_every and its burst must be >= 1, and observe_every 1 unless the experts stay in "
                 "place (every redirected ubatch is observed)");
        return -1;
    }
    ctx->observe_every = n;
    ctx->observe_burst = burst;
    return 0;
}

void lh_set_observing(struct lh_ctx * ctx, bool observing) {
    ctx->observing = observing;
}

int32_t lh_set_cold_on_device(struct lh_ctx * ctx, float share) {
    if (!(share >= 0.0f && share <= 1.0f)) {
        lh_error(ctx, "the share of cold experts computed on the device must be in 0..1");
        return -1;
    }
    if (share > 0.0f && ctx->gpu == NULL) {
        lh_error(ctx, "cold experts on the device need device slots (cuda or emulated-gpu)");
        return -1;
    }
    ctx->cold_on_device = share;
    return 0;
}

void lh_set_n_threads(struct lh_ctx * ctx, int32_t n_threads) {
    ctx->n_threads = n_threads > 0 ? n_threads : 1;
}

void lh_set_lone_row_idle_ns(struct lh_ctx * ctx, int64_t idle_ns) {
    ctx->lone_row_idle_ns = idle_ns > 0 ? idle_ns : 0;
}

void lh_set_pool(struct lh_ctx * ctx, int64_t spin_ns) {
    ctx->pool_spin_ns = spin_ns < 0 ? -1 : spin_ns;
    if (spin_ns < 0) {
        lh_pool_free(ctx->pool);
        ctx->pool = NULL;
    }
}

int32_t lh_set_row_prefetch(struct lh_ctx * ctx, int64_t bytes) {
    if (bytes < 0 || bytes > LH_ROW_PREFETCH_MAX) {
        lh_error(ctx, "row prefetch distance must be 0..%d bytes, got %lld", LH_ROW_PREFETCH_MAX, (long long) bytes);
        return -1;
    }
    ctx->row_prefetch = bytes;
    return 0;
}

void lh_set_debug(struct lh_ctx * ctx, int32_t flags) {
    if ((flags & LH_DEBUG_TIMELINE) && ctx->events == NULL) {
        ctx->events = calloc(LH_TIMELINE_CAP, sizeof(struct lh_event));
        if (ctx->events == NULL) {
            flags &= ~LH_DEBUG_TIMELINE;
        }
    }
    ctx->n_events = 0;
    ctx->debug_flags = flags;
}

static void lh_record(struct lh_ctx * ctx, const struct ggml_tensor * t, int8_t kind) {
    struct lh_event * e = &ctx->events[ctx->n_events++ % LH_TIMELINE_CAP];
    e->t_ns = lh_now_ns();
    e->op = (int32_t) t->op;
    e->kind = kind;
    e->host = t->buffer != NULL && ggml_backend_buffer_is_host(t->buffer);
    snprintf(e->name, sizeof(e->name), "%s", t->name);
}

int32_t lh_timeline(struct lh_ctx * ctx, struct lh_event * out, int32_t capacity) {
    if (ctx->events == NULL) {
        return 0;
    }
    const int64_t kept = ctx->n_events < LH_TIMELINE_CAP ? ctx->n_events : LH_TIMELINE_CAP;
    const int64_t n = kept < capacity ? kept : capacity;
    for (int64_t i = 0; i < n; i++) {
        out[i] = ctx->events[(ctx->n_events - n + i) % LH_TIMELINE_CAP];
    }
    ctx->n_events = 0;
    return (int32_t) n;
}

int64_t * lh_routing_counts(struct lh_ctx * ctx) { return ctx->counts; }
int64_t * lh_hits(struct lh_ctx * ctx) { return ctx->hits; }
int64_t * lh_misses(struct lh_ctx * ctx) { return ctx->misses; }
int64_t * lh_last_routed(struct lh_ctx * ctx) { return ctx->last_routed; }
int32_t * lh_slot_of_expert(struct lh_ctx * ctx) { return ctx->slot_of_expert; }
int32_t * lh_expert_of_slot(struct lh_ctx * ctx) { return ctx->expert_of_slot; }
const char * lh_last_error(const struct lh_ctx * ctx) { return ctx->error; }

void lh_get_counters(const struct lh_ctx * ctx, struct lh_counters * out) {
    *out = ctx->counters;
}

void lh_reset_counters(struct lh_ctx * ctx) {
    const int64_t known = ctx->counters.weights_known;
    const int64_t open = ctx->counters.open_mutations;
    memset(&ctx->counters, 0, sizeof(ctx->counters));
    ctx->single_decodes = 0;   /* the next single-token decode is read */
    ctx->counters.weights_known = known;
    ctx->counters.open_mutations = open;
    memset(ctx->counts, 0, sizeof(int64_t) * (size_t) ctx->n_moe_layers * (size_t) ctx->n_expert);
    memset(ctx->hits, 0, sizeof(int64_t) * (size_t) ctx->n_moe_layers);
    memset(ctx->misses, 0, sizeof(int64_t) * (size_t) ctx->n_moe_layers);
    memset(ctx->last_routed, 0, sizeof(int64_t) * (size_t) ctx->n_moe_layers * (size_t) ctx->n_expert);
    ctx->token_clock = 0;
}

const char * lh_built_ggml_version(void) {
    return LH_GGML_VERSION;
}

int32_t lh_layer_weight_count(const struct lh_ctx * ctx, int32_t layer) {
    if (layer < 0 || layer >= ctx->n_moe_layers) {
        return 0;
    }
    int32_t n = 0;
    for (int p = 0; p < LH_PROJ_COUNT; p++) {
        n += ctx->layers[layer].weight[p] != NULL;
    }
    return n;
}

/* ---- recognising managed weights ------------------------------------------------------------ */

/* Recognise a routed-expert weight by its canonical llama.cpp name. Called once per weight:
 * after that the weight is found by pointer. Weight copies the scheduler makes for big
 * ubatches ("CUDA0#blk.0...#0") are not weights and do not match. */
/* The MoE layer and projection of a routed-expert weight named `name` (the tensor's own name, or the
 * part of a scheduler copy's name that names its source), with w's shape. */
static void lh_classify_name(const struct lh_ctx * ctx, const char * name, const struct ggml_tensor * w,
                             int32_t * moe_layer, int32_t * proj) {
    *moe_layer = -1;
    *proj = -1;
    int blk = -1;
    char kind[16] = {0};
    int consumed = 0;
    if (sscanf(name, "blk.%d.ffn_%15[a-z_]%n", &blk, kind, &consumed) != 2) {
        return;
    }
    if (strcmp(name + consumed, ".weight") != 0 || blk < 0 || blk >= ctx->n_blocks) {
        return;
    }
    int32_t p;
    if (strcmp(kind, "gate_exps") == 0) {
        p = LH_PROJ_GATE;
    } else if (strcmp(kind, "up_exps") == 0) {
        p = LH_PROJ_UP;
    } else if (strcmp(kind, "down_exps") == 0) {
        p = LH_PROJ_DOWN;
    } else if (strcmp(kind, "gate_up_exps") == 0) {
        p = LH_PROJ_GATE_UP;
    } else {
        return;
    }
    if (ctx->blk_to_moe[blk] < 0 || w->ne[2] != ctx->n_expert || w->ne[3] != 1) {
        return;
    }
    *moe_layer = ctx->blk_to_moe[blk];
    *proj = p;
}

static void lh_classify_weight(const struct lh_ctx * ctx, const struct ggml_tensor * w, int32_t * moe_layer, int32_t * proj) {
    *moe_layer = -1;
    *proj = -1;
    if (w->buffer == NULL || ggml_backend_buffer_get_usage(w->buffer) != GGML_BACKEND_BUFFER_USAGE_WEIGHTS) {
        return;
    }
    lh_classify_name(ctx, w->name, w, moe_layer, proj);
}

/* llama.cpp offloads the expert matmuls of big ubatches (>= 32 tokens with CUDA) to the GPU: the
 * scheduler copies the weight into its split, naming the copy "<backend>#<weight name>#<copy>", and
 * makes new copies at every graph split (so they are parsed, not remembered). Their routing is
 * counted; nothing is redirected. */
static bool lh_classify_offload_copy(const struct lh_ctx * ctx, const struct ggml_tensor * w,
                                     struct lh_weight_entry * entry) {
    const char * first = strchr(w->name, '#');
    const char * last = strrchr(w->name, '#');
    if (first == NULL || last <= first + 1 || (size_t) (last - first - 1) >= sizeof(w->name)) {
        return false;
    }
    char source[sizeof(w->name)];
    memcpy(source, first + 1, (size_t) (last - first - 1));
    source[last - first - 1] = '\0';
    lh_classify_name(ctx, source, w, &entry->moe_layer, &entry->proj);
    entry->key = w;
    entry->offload_copy = true;
    return entry->moe_layer >= 0;
}

/* Find (or classify and remember) the weight of a MUL_MAT_ID node. */
static const struct lh_weight_entry * lh_lookup_weight(struct lh_ctx * ctx, const struct ggml_tensor * w) {
    const uint32_t mask = ctx->table_cap - 1;
    uint32_t i = lh_hash_ptr(w) & mask;
    while (ctx->table[i].key != NULL) {
        if (ctx->table[i].key == w) {
            return &ctx->table[i];
        }
        i = (i + 1) & mask;
    }
    static const struct lh_weight_entry unmanaged = { NULL, -1, -1, false };
    int32_t moe_layer, proj;
    lh_classify_weight(ctx, w, &moe_layer, &proj);
    /* Keep the table at most half full; past that, unmanaged tensors are simply re-classified. */
    if (moe_layer < 0 && ctx->table_used * 2 >= ctx->table_cap) {
        return &unmanaged;
    }
    if (ctx->table_used * 4 >= ctx->table_cap * 3) {
        return &unmanaged;  /* cannot happen for managed weights: the table is sized for them */
    }
    ctx->table[i].key = w;
    ctx->table[i].moe_layer = moe_layer;
    ctx->table[i].proj = proj;
    ctx->table[i].offload_copy = false;
    ctx->table_used++;
    if (moe_layer >= 0) {
        ctx->counters.weights_known++;
        ctx->layers[moe_layer].weight[proj] = (struct ggml_tensor *) w;
    }
    return &ctx->table[i];
}

static const struct lh_weight_entry * lh_managed(struct lh_ctx * ctx, const struct ggml_tensor * t) {
    if (!ctx->observing || t->op != GGML_OP_MUL_MAT_ID || t->src[0] == NULL) {
        return NULL;
    }
    const struct lh_weight_entry * e = lh_lookup_weight(ctx, t->src[0]);
    if (e->moe_layer >= 0) {
        return e;
    }
    return lh_classify_offload_copy(ctx, t->src[0], &ctx->offload_entry) ? &ctx->offload_entry : NULL;
}

/* Shapes and types the compact recomputation handles (all llama.cpp MoE FFNs today). */
static bool lh_redirectable(const struct ggml_tensor * t) {
    const struct ggml_tensor * b = t->src[1];
    const struct ggml_tensor * ids = t->src[2];
    return b != NULL && ids != NULL && t->type == GGML_TYPE_F32 && b->type == GGML_TYPE_F32 &&
           ids->type == GGML_TYPE_I32 && b->ne[3] == 1 && t->ne[3] == 1 && ids->ne[1] == b->ne[2] &&
           t->ne[1] == ids->ne[0] && t->ne[2] == ids->ne[1] && t->nb[0] == sizeof(float) &&
           b->nb[0] == sizeof(float);
}

/* ---- slots ---------------------------------------------------------------------------------- */

size_t lh_slot_bytes_per_layer(const struct lh_ctx * ctx) {
    size_t n = 0;
    for (int p = 0; p < LH_PROJ_COUNT; p++) {
        if (ctx->layers[0].slot[p]) {
            n += ggml_nbytes(ctx->layers[0].slot[p]);
        }
    }
    return n;
}

/* A tensor like w but with n_slots experts, allocated in its own buffer of type buft. */
static struct ggml_tensor * lh_new_slot_tensor(const struct ggml_tensor * w, int32_t n_slots,
                                               ggml_backend_buffer_type_t buft, ggml_backend_buffer_t * buffer) {
    struct ggml_tensor * s = calloc(1, sizeof(struct ggml_tensor));
    if (!s) {
        return NULL;
    }
    s->type = w->type;
    s->op = GGML_OP_NONE;
    for (int i = 0; i < GGML_MAX_DIMS; i++) {
        s->ne[i] = w->ne[i];
        s->nb[i] = w->nb[i];
    }
    s->ne[2] = n_slots;
    s->nb[3] = s->nb[2] * (size_t) n_slots;
    snprintf(s->name, sizeof(s->name), "lh_slots(%s)", w->name);
    const size_t size = ggml_backend_buft_get_alloc_size(buft, s);
    *buffer = ggml_backend_buft_alloc_buffer(buft, size + ggml_backend_buft_get_alignment(buft));
    if (*buffer == NULL) {
        free(s);
        return NULL;
    }
    ggml_backend_buffer_set_usage(*buffer, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    if (ggml_backend_tensor_alloc(*buffer, s, ggml_backend_buffer_get_base(*buffer)) != GGML_STATUS_SUCCESS) {
        ggml_backend_buffer_free(*buffer);
        *buffer = NULL;
        free(s);
        return NULL;
    }
    return s;
}

int32_t lh_slots_init(struct lh_ctx * ctx, int32_t kind, int32_t n_slots, int32_t prefill_bypass, int32_t n_threads) {
    if (ctx->n_slots > 0 || ctx->cpu != NULL) {
        lh_error(ctx, "slots are already initialised");
        return -1;
    }
    if (n_slots < 0 || n_slots > ctx->n_expert || prefill_bypass < 0) {
        lh_error(ctx, "n_slots must be in 0..%d", ctx->n_expert);
        return -1;
    }
    for (int32_t l = 0; l < ctx->n_moe_layers; l++) {
        if (ctx->layers[l].weight[LH_PROJ_DOWN] == NULL || lh_layer_weight_count(ctx, l) < 2) {
            lh_error(ctx, "the routed-expert weights of MoE layer %d were not seen in a decode", l);
            return -1;
        }
    }
    ctx->cpu = ggml_backend_cpu_init();
    if (!ctx->cpu) {
        lh_error(ctx, "could not create a CPU backend");
        return -1;
    }
    ctx->n_threads = n_threads > 0 ? n_threads : 1;
    ggml_backend_cpu_set_n_threads(ctx->cpu, ctx->n_threads);
    ctx->host_scratch.backend = ctx->cpu;
    ctx->cpu_galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(ctx->cpu));
    if (kind == LH_SLOTS_GPU) {
        ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
        if (!dev) {
            lh_error(ctx, "no GPU device in ggml's registry (is llama-cpp-python built with CUDA?)");
            return -1;
        }
        ctx->gpu = ggml_backend_dev_init(dev, NULL);
        if (!ctx->gpu) {
            lh_error(ctx, "could not initialise GPU device %s", ggml_backend_dev_name(dev));
            return -1;
        }
        /* A stream for the device cold rows' expert copies (without events: on `gpu`, in order). */
        ctx->copies_done = ggml_backend_event_new(dev);
        ctx->copy_gpu = ctx->copies_done ? ggml_backend_dev_init(dev, NULL) : NULL;
    } else if (kind == LH_SLOTS_EMULATED_GPU) {
        ctx->gpu = ggml_backend_cpu_init();
        if (!ctx->gpu) {
            lh_error(ctx, "could not create a CPU backend");
            return -1;
        }
        ggml_backend_cpu_set_n_threads(ctx->gpu, ctx->n_threads);
    } else if (kind != LH_SLOTS_HOST && kind != LH_SLOTS_IN_PLACE) {
        lh_error(ctx, "unknown slot kind %d", kind);
        return -1;
    }
    if (ctx->gpu) {
        ggml_backend_dev_t dev = ggml_backend_get_device(ctx->gpu);
        ctx->staging_buft = dev && kind == LH_SLOTS_GPU ? ggml_backend_dev_host_buffer_type(dev) : NULL;
        ctx->gpu_scratch.backend = ctx->gpu;
        ctx->gpu_galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(ctx->gpu));
    }
    ctx->slot_kind = kind;
    ctx->prefill_bypass = prefill_bypass;
    return lh_slots_resize(ctx, n_slots);
}

static void lh_part_graph_free(struct lh_part_graph * h) {
    if (h->buffer) {
        ggml_backend_buffer_free(h->buffer);
    }
    if (h->g) {
        ggml_free(h->g);
    }
    memset(h, 0, sizeof(*h));
}

/* Free every slot tensor and forget every published slot. */
static void lh_slots_free(struct lh_ctx * ctx) {
    if (ctx->hot_graphs) {  /* they read the slot tensors */
        for (int32_t l = 0; l < ctx->n_moe_layers; l++) {
            lh_part_graph_free(&ctx->hot_graphs[l]);
        }
    }
    for (int32_t l = 0; l < ctx->n_moe_layers; l++) {
        struct lh_layer * layer = &ctx->layers[l];
        for (int p = 0; p < LH_PROJ_COUNT; p++) {
            if (layer->slot_buffer[p]) {
                ggml_backend_buffer_free(layer->slot_buffer[p]);
            }
            free(layer->slot[p]);
            layer->slot[p] = NULL;
            layer->slot_buffer[p] = NULL;
        }
        layer->n_published = 0;
    }
    for (size_t i = 0; i < (size_t) ctx->n_moe_layers * (size_t) ctx->n_expert; i++) {
        ctx->slot_of_expert[i] = -1;
    }
    free(ctx->expert_of_slot);
    ctx->expert_of_slot = NULL;
    ctx->n_slots = 0;
    memset(ctx->fences, 0, sizeof(void *) * (size_t) ctx->n_moe_layers);  /* the loader waited for its copies */
}

int32_t lh_slots_resize(struct lh_ctx * ctx, int32_t n_slots) {
    if (ctx->cpu == NULL) {
        lh_error(ctx, "slots are not initialised (lh_slots_init)");
        return -1;
    }
    if (n_slots < 0 || n_slots > ctx->n_expert) {
        lh_error(ctx, "n_slots must be in 0..%d", ctx->n_expert);
        return -1;
    }
    lh_slots_free(ctx);
    ctx->expert_of_slot = malloc(sizeof(int32_t) * (size_t) ctx->n_moe_layers * (size_t) (n_slots > 0 ? n_slots : 1));
    if (!ctx->expert_of_slot) {
        lh_error(ctx, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < (size_t) ctx->n_moe_layers * (size_t) n_slots; i++) {
        ctx->expert_of_slot[i] = -1;
    }
    ctx->n_slots = n_slots;
    if (n_slots == 0 || ctx->slot_kind == LH_SLOTS_IN_PLACE) {
        return 0;
    }
    for (int32_t l = 0; l < ctx->n_moe_layers; l++) {
        struct lh_layer * layer = &ctx->layers[l];
        for (int p = 0; p < LH_PROJ_COUNT; p++) {
            const struct ggml_tensor * w = layer->weight[p];
            if (!w) {
                continue;
            }
            ggml_backend_buffer_type_t buft;
            if (ctx->slot_kind == LH_SLOTS_HOST) {
                /* The weight's own type (e.g. CPU_REPACK): the same kernels, bit for bit. */
                buft = ggml_backend_buffer_get_type(w->buffer);
            } else {
                if (!ggml_backend_buffer_is_host(w->buffer) || w->extra != NULL) {
                    /* Repacked CPU layouts (CPU_REPACK) keep per-tensor traits in ->extra. */
                    lh_error(ctx, "%s is not in plain host memory in the standard layout (repacked for the CPU? "
                             "load the model with use_extra_bufts=false); GPU slots need it", w->name);
                    lh_slots_free(ctx);
                    return -1;
                }
                buft = ggml_backend_get_default_buffer_type(ctx->gpu);
            }
            layer->slot[p] = lh_new_slot_tensor(w, n_slots, buft, &layer->slot_buffer[p]);
            if (!layer->slot[p]) {
                lh_error(ctx, "could not allocate %d slots for %s in %s (out of memory?)", n_slots, w->name,
                         ggml_backend_buft_name(buft));
                lh_slots_free(ctx);
                return -1;
            }
            if (ctx->slot_kind == LH_SLOTS_HOST) {
                /* Touch every page now, at load time, not in the first rebalances of the decode loop. */
                ggml_backend_buffer_clear(layer->slot_buffer[p], 0);
            }
        }
    }
    return 0;
}

static bool lh_valid_slot(const struct lh_ctx * ctx, int32_t layer, int32_t slot) {
    return layer >= 0 && layer < ctx->n_moe_layers && slot >= 0 && slot < ctx->n_slots;
}

int32_t lh_expert_slab(const struct lh_ctx * ctx, int32_t layer, int32_t proj, int32_t expert, void ** src, size_t * nbytes) {
    if (layer < 0 || layer >= ctx->n_moe_layers || proj < 0 || proj >= LH_PROJ_COUNT || expert < 0 ||
        expert >= ctx->n_expert || ctx->layers[layer].weight[proj] == NULL) {
        return -1;
    }
    const struct ggml_tensor * w = ctx->layers[layer].weight[proj];
    *src = (char *) w->data + (size_t) expert * w->nb[2];
    *nbytes = w->nb[2];
    return 0;
}

int32_t lh_weight_buffer(const struct lh_ctx * ctx, int32_t layer, int32_t proj, void ** base, size_t * size) {
    if (layer < 0 || layer >= ctx->n_moe_layers || proj < 0 || proj >= LH_PROJ_COUNT ||
        ctx->layers[layer].weight[proj] == NULL || ctx->layers[layer].weight[proj]->buffer == NULL) {
        return -1;
    }
    ggml_backend_buffer_t buffer = ctx->layers[layer].weight[proj]->buffer;
    *base = ggml_backend_buffer_get_base(buffer);
    *size = ggml_backend_buffer_get_size(buffer);
    return 0;
}

int32_t lh_slot_slab(const struct lh_ctx * ctx, int32_t layer, int32_t proj, int32_t slot, void ** dst, size_t * nbytes) {
    if (!lh_valid_slot(ctx, layer, slot) || proj < 0 || proj >= LH_PROJ_COUNT || ctx->layers[layer].slot[proj] == NULL) {
        return -1;
    }
    const struct ggml_tensor * s = ctx->layers[layer].slot[proj];
    *dst = (char *) s->data + (size_t) slot * s->nb[2];
    *nbytes = s->nb[2];
    return 0;
}

int32_t lh_slot_load(struct lh_ctx * ctx, int32_t layer, int32_t slot, int32_t expert) {
    if (!lh_valid_slot(ctx, layer, slot) || expert < 0 || expert >= ctx->n_expert) {
        lh_error(ctx, "bad slot load (layer %d, slot %d, expert %d)", layer, slot, expert);
        return -1;
    }
    if (ctx->expert_of_slot[(size_t) layer * ctx->n_slots + slot] >= 0) {
        lh_error(ctx, "slot %d of layer %d is published; unpublish it before loading", slot, layer);
        return -1;
    }
    for (int p = 0; p < LH_PROJ_COUNT; p++) {
        struct ggml_tensor * s = ctx->layers[layer].slot[p];
        if (!s) {
            continue;
        }
        void * src;
        size_t nbytes;
        lh_expert_slab(ctx, layer, p, expert, &src, &nbytes);
        if (ctx->slot_kind == LH_SLOTS_HOST) {
            /* Raw bytes: a repacked expert stays valid in a repacked slot (rows never straddle experts). */
            memcpy((char *) s->data + (size_t) slot * s->nb[2], src, nbytes);
        } else {
            ggml_backend_tensor_set(s, src, (size_t) slot * s->nb[2], nbytes);
        }
    }
    return 0;
}

int32_t lh_slot_publish(struct lh_ctx * ctx, int32_t layer, int32_t slot, int32_t expert) {
    if (!lh_valid_slot(ctx, layer, slot) || expert < 0 || expert >= ctx->n_expert) {
        lh_error(ctx, "bad publish (layer %d, slot %d, expert %d)", layer, slot, expert);
        return -1;
    }
    int32_t * of_slot = &ctx->expert_of_slot[(size_t) layer * ctx->n_slots + slot];
    int32_t * of_expert = &ctx->slot_of_expert[(size_t) layer * ctx->n_expert + expert];
    if (*of_slot >= 0 || *of_expert >= 0) {
        lh_error(ctx, "layer %d: slot %d or expert %d is already published", layer, slot, expert);
        return -1;
    }
    *of_slot = expert;
    *of_expert = slot;
    ctx->layers[layer].n_published++;
    return 0;
}

int32_t lh_slot_unpublish(struct lh_ctx * ctx, int32_t layer, int32_t slot) {
    if (!lh_valid_slot(ctx, layer, slot)) {
        lh_error(ctx, "bad unpublish (layer %d, slot %d)", layer, slot);
        return -1;
    }
    int32_t * of_slot = &ctx->expert_of_slot[(size_t) layer * ctx->n_slots + slot];
    if (*of_slot >= 0) {
        ctx->slot_of_expert[(size_t) layer * ctx->n_expert + *of_slot] = -1;
        *of_slot = -1;
        ctx->layers[layer].n_published--;
    }
    return 0;
}

/* ---- compact recomputation of one node ---------------------------------------------------- */

void lh_set_fence_waiter(struct lh_ctx * ctx, int32_t (*wait)(void * fence)) {
    ctx->wait_fence = wait;
}

int32_t lh_set_fence(struct lh_ctx * ctx, int32_t layer, void * fence) {
    if (layer < 0 || layer >= ctx->n_moe_layers || (fence != NULL && ctx->wait_fence == NULL)) {
        lh_error(ctx, "bad fence for layer %d (set a waiter first: lh_set_fence_waiter)", layer);
        return -1;
    }
    ctx->fences[layer] = fence;
    return 0;
}

/* Before a layer's slots are read: wait for the copies into them that may still be in flight. */
static bool lh_wait_fence(struct lh_ctx * ctx, int32_t layer) {
    void * fence = ctx->fences[layer];
    if (fence == NULL) {
        return true;
    }
    const int64_t t0 = lh_now_ns();
    const int32_t rc = ctx->wait_fence(fence);
    ctx->counters.fence_wait_ns += lh_now_ns() - t0;
    ctx->counters.fence_waits++;
    if (rc != 0) {
        lh_error(ctx, "waiting for the copies into layer %d's slots failed (error %d)", layer, rc);
        return false;
    }
    ctx->fences[layer] = NULL;
    return true;
}

static bool lh_grow(void ** p, size_t * cap, size_t need, size_t elem) {
    if (need <= *cap) {
        return true;
    }
    size_t n = *cap ? *cap : 64;
    while (n < need) {
        n *= 2;
    }
    void * q = realloc(*p, n * elem);
    if (!q) {
        return false;
    }
    *p = q;
    *cap = n;
    return true;
}

static void * lh_staging(struct lh_ctx * ctx, size_t size) {
    if (size <= ctx->staging_size) {
        return ctx->staging;
    }
    size_t n = (size_t) 1 << 16;
    while (n < size) {
        n *= 2;
    }
    if (ctx->staging_buft) {
        if (ctx->staging_buffer) {
            ggml_backend_buffer_free(ctx->staging_buffer);
        }
        ctx->staging_buffer = ggml_backend_buft_alloc_buffer(ctx->staging_buft, n);
        ctx->staging = ctx->staging_buffer ? ggml_backend_buffer_get_base(ctx->staging_buffer) : NULL;
    } else {
        void * p = realloc(ctx->staging, n);
        if (p == NULL) {
            return NULL;
        }
        ctx->staging = p;
    }
    ctx->staging_size = ctx->staging ? n : 0;
    return ctx->staging;
}

static bool lh_scratch_reserve(struct lh_scratch * s, size_t size) {
    if (size <= s->size) {
        return true;
    }
    lh_scratch_free(s);
    size_t n = 1 << 16;
    while (n < size) {
        n *= 2;
    }
    s->buffer = ggml_backend_alloc_buffer(s->backend, n);
    if (!s->buffer) {
        return false;
    }
    s->size = n;
    return true;
}

/* Place a tensor at *offset in a scratch buffer. */
static void lh_place(struct lh_scratch * s, struct ggml_tensor * t, size_t * offset) {
    ggml_backend_tensor_alloc(s->buffer, t, (char *) ggml_backend_buffer_get_base(s->buffer) + *offset);
    *offset += lh_pad(ggml_nbytes(t));
}

/* A compact MUL_MAT_ID over `n` entries of node t computed by matrix tensor `as`:
 * activations [ne10, 1, n], ids [1, n] -> out [ne0, 1, n]. Inputs are filled from t's sources. */
struct lh_part {
    struct ggml_tensor * b;
    struct ggml_tensor * ids;
    struct ggml_tensor * out;
};

static struct lh_part lh_build_part(struct ggml_context * g, struct ggml_tensor * as, const struct ggml_tensor * t, int64_t n) {
    struct lh_part part;
    part.b = ggml_new_tensor_3d(g, GGML_TYPE_F32, t->src[1]->ne[0], 1, n);
    part.ids = ggml_new_tensor_2d(g, GGML_TYPE_I32, 1, n);
    part.out = ggml_mul_mat_id(g, as, part.b, part.ids);
    return part;
}

static size_t lh_part_bytes(const struct ggml_tensor * t, int64_t n) {
    return lh_pad((size_t) t->src[1]->ne[0] * (size_t) n * sizeof(float)) + lh_pad((size_t) n * sizeof(int32_t)) +
           lh_pad((size_t) t->ne[0] * (size_t) n * sizeof(float));
}

/* Gather the activation rows and matrix indices of `entries` into host memory. */
/* Gather the activation rows of `entries` from b (one row only with one_token: every entry then
 * shares it) and their matrix indices; with `experts`, also each entry's expert (for biases),
 * mapped from slots by expert_of when given. */
static void lh_gather(const struct ggml_tensor * b, const struct lh_entry * entries, int64_t n, bool one_token,
                      const int32_t * expert_of, float * b_rows, int32_t * ids, int32_t * experts) {
    const size_t row = (size_t) b->ne[0] * sizeof(float);
    for (int64_t i = 0; i < n; i++) {
        if (!one_token || i == 0) {
            const int64_t i11 = entries[i].k % b->ne[1];
            memcpy((char *) b_rows + (size_t) i * row, (const char *) b->data + i11 * b->nb[1] + entries[i].token * b->nb[2], row);
        }
        ids[i] = entries[i].matrix;
        if (experts != NULL) {  /* only when a bias needs them */
            experts[i] = expert_of ? expert_of[entries[i].matrix] : entries[i].matrix;
        }
    }
}

static void lh_scatter(const struct ggml_tensor * t, const struct lh_entry * entries, int64_t n, const float * rows, char * dst) {
    const size_t row = (size_t) t->ne[0] * sizeof(float);
    for (int64_t i = 0; i < n; i++) {
        memcpy(dst + entries[i].k * t->nb[1] + entries[i].token * t->nb[2], (const char *) rows + (size_t) i * row, row);
    }
}

/* The expert a MUL_MAT_ID's ids route its k-th choice of token tok to. */
static int32_t lh_routed_expert(const struct ggml_tensor * ids, int64_t k, int64_t tok) {
    return *(const int32_t *) ((const char *) ids->data + k * ids->nb[0] + tok * ids->nb[1]);
}

/* Split a node's (token, k) entries into hot (expert in a published slot: matrix = slot) and cold
 * (matrix = expert), into ctx->hot / ctx->cold, in (token, k) order: the order in which llama's
 * kernels group each expert's rows. */
static bool lh_split_entries(struct lh_ctx * ctx, const struct ggml_tensor * ids, int32_t layer, bool has_slots,
                             int64_t * n_hot_out, int64_t * n_cold_out) {
    const int64_t n_used = ids->ne[0];
    const int64_t n_tokens = ids->ne[1];
    const int32_t * slot_of = ctx->slot_of_expert + (size_t) layer * ctx->n_expert;
    const size_t n_entries = (size_t) (n_used * n_tokens);
    size_t cap = ctx->entries_cap;
    if (!lh_grow((void **) &ctx->hot, &cap, n_entries, sizeof(struct lh_entry))) {
        return false;
    }
    cap = ctx->entries_cap;
    if (!lh_grow((void **) &ctx->cold, &cap, n_entries, sizeof(struct lh_entry))) {
        return false;
    }
    ctx->entries_cap = cap;
    int64_t n_hot = 0, n_cold = 0;
    for (int64_t tok = 0; tok < n_tokens; tok++) {
        for (int64_t k = 0; k < n_used; k++) {
            const int32_t e = lh_routed_expert(ids, k, tok);
            const int32_t s = has_slots ? slot_of[e] : -1;
            if (s >= 0) {
                ctx->hot[n_hot++] = (struct lh_entry) { (int32_t) k, (int32_t) tok, s };
            } else {
                ctx->cold[n_cold++] = (struct lh_entry) { (int32_t) k, (int32_t) tok, e };
            }
        }
    }
    *n_hot_out = n_hot;
    *n_cold_out = n_cold;
    return true;
}

/* Threads for a stop's CPU graph. Little work (small models, few cold experts): one thread, no OpenMP
 * region and barriers, which would cost more than they save. (Fewer threads for one or two experts
 * were slower on the H100 machine while stops came often: the work is bound by memory bandwidth.)
 * With lh_set_lone_row_idle_ns: a single row after that long without a parallel graph of the shim
 * runs on one thread too (the pool's threads may have gone to sleep; waking them looked like ~3 ms
 * per rare stop on the H100 machine's VM). */
static int32_t lh_stop_threads(const struct lh_ctx * ctx, int64_t rows, size_t weight_bytes, int64_t now) {
    if (ctx->debug_flags & LH_DEBUG_ALL_THREADS) {
        return ctx->n_threads;
    }
    if (weight_bytes < LH_PARALLEL_MIN_BYTES) {
        return 1;
    }
    if (rows == 1 && ctx->lone_row_idle_ns > 0 && now - ctx->last_parallel_end_ns > ctx->lone_row_idle_ns) {
        return 1;
    }
    return ctx->n_threads;
}

/* After a stop's CPU graph: if it ran sliced nodes, add when its threads entered and left them (the
 * first thread's entry, and per node the last thread's entry and exit) to the counters. */
static void lh_count_sliced_graph(struct lh_ctx * ctx, int32_t n_threads) {
    if (ctx->thread_in[0].seq != ctx->graph_seq) {
        return;  /* no sliced node ran in this graph */
    }
    int64_t first = INT64_MAX, last_in[LH_TIMED_NODES] = {0}, last_out[LH_TIMED_NODES] = {0};
    for (int32_t i = 0; i < n_threads && i < LH_MAX_TIMED_THREADS; i++) {
        if (ctx->thread_in[i].seq != ctx->graph_seq) {
            continue;
        }
        first = ctx->thread_in[i].in[0] < first ? ctx->thread_in[i].in[0] : first;
        for (int64_t k = 0; k < ctx->thread_in[i].n && k < LH_TIMED_NODES; k++) {
            last_in[k] = ctx->thread_in[i].in[k] > last_in[k] ? ctx->thread_in[i].in[k] : last_in[k];
            last_out[k] = ctx->thread_in[i].out[k] > last_out[k] ? ctx->thread_in[i].out[k] : last_out[k];
        }
    }
    ctx->counters.sliced_graphs++;
    ctx->counters.first_thread_in_ns += first;
    ctx->counters.last_thread_in_ns += last_in[0];
    for (int k = 0; k < LH_TIMED_NODES; k++) {
        ctx->counters.sliced_node_last_in_ns[k] += last_in[k];
        ctx->counters.sliced_node_last_out_ns[k] += last_out[k];
    }
}

/* ---- The stops' own threads (lh_set_pool) --------------------------------------------------- */
/* A single-token stop's CPU graph (sliced expert matmuls and the element-wise nodes between them)
 * can run on threads of the shim's own instead of an OpenMP region of ggml's: they wait for work
 * spinning on a counter, then sleep, so a stop reaches them in a few microseconds (an OpenMP region
 * took ~10 us alone and 15-20 us in the decode on the H100 machine; docs/NOTES.md, session 10).
 * Sliced nodes run on every thread, each its slice of rows as in ggml's team; the other nodes on the
 * caller with ggml's code (lh_compute_here); a barrier wherever a node's memory meets memory another
 * node touched since the last one. */
struct lh_pool_arg {
    struct lh_pool * pool;
    int32_t ith;
};

struct lh_pool {
    int32_t n;                        /* threads, the caller (ith 0) included */
    pthread_t * threads;              /* [n - 1] */
    struct lh_pool_arg * args;        /* [n - 1] */
    struct lh_ctx * ctx;
    /* Job g (a graph every thread runs its share of) is jobs[g % 2], written before generation moves
     * to g. The caller posts a job only after every thread joined the last one, so a slot is not
     * rewritten while a thread may read it. */
    struct ggml_cgraph * jobs[2];
    bool late_caller[2];              /* the job's rows on the workers alone (lh_pool_start_early) */
    atomic_int workers_done;          /* workers done with a late-caller job */
    atomic_llong generation;          /* one more per job */
    atomic_int arrived;
    atomic_llong barrier_generation;
    atomic_int sleepers;
    atomic_bool stop;
    atomic_bool failed;
    pthread_mutex_t mutex;
    pthread_cond_t wake;
};

static inline void lh_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void lh_pool_barrier(struct lh_pool * p, int32_t nth) {
    if (nth == 1) {
        return;
    }
    const long long g = atomic_load(&p->barrier_generation);
    if (atomic_fetch_add(&p->arrived, 1) == nth - 1) {
        atomic_store(&p->arrived, 0);
        atomic_fetch_add(&p->barrier_generation, 1);
    } else {
        while (atomic_load(&p->barrier_generation) == g) {
            lh_cpu_relax();
        }
    }
}

static void lh_sliced_mul_mat_id(struct ggml_tensor * dst, int ith, int nth, void * userdata);
/* Rows of a sliced node one thread computes: one range, or one in each half of a fused gate_up. */
struct lh_rows {
    int n;
    int64_t begin[2], end[2];
};
static void lh_sliced_rows(struct lh_ctx * ctx, struct ggml_tensor * dst, int ith, const struct lh_rows * rows);

/* Element-wise kernels of ggml's CPU backend that libggml-cpu exports without a public header (ops.h);
 * ggml's own code for a co-sliced node's slice (lh_co_slice). Weak: absent, those nodes run as before.
 * The parameters are ggml-cpu-impl.h's struct ggml_compute_params of the pinned ggml (the version is
 * checked when llamahot loads the shim). Not ggml_graph_compute: it enters ggml's global critical
 * section twice per call (ggml_cpu_init), which 16 threads at once would queue on. */
struct lh_ggml_compute_params {
    int ith, nth;
    size_t wsize;
    void * wdata;
    struct ggml_threadpool * threadpool;
    bool use_ref;
};
extern void ggml_compute_forward_glu(const struct lh_ggml_compute_params * params, struct ggml_tensor * dst) __attribute__((weak));
extern void ggml_compute_forward_add_id(const struct lh_ggml_compute_params * params, struct ggml_tensor * dst) __attribute__((weak));

/* ggml's element-wise kernels take SIMD steps of up to 16 floats (AVX-512) from a row's start and
 * finish its tail one by one: a slice that starts at a multiple of 16 and ends at one or at the
 * row's end gets every element from the same instructions as the whole row. */
#define LH_SLICE_ALIGN 16

/* Thread ith's rows [r0, r1) of n for nth threads: ggml's split, or (aligned) at multiples of
 * LH_SLICE_ALIGN. */
static void lh_slice(int64_t n, int ith, int nth, bool aligned, int64_t * r0, int64_t * r1) {
    if (!aligned) {
        *r0 = n * ith / nth;
        *r1 = n * (ith + 1) / nth;
        return;
    }
    const int64_t blocks = (n + LH_SLICE_ALIGN - 1) / LH_SLICE_ALIGN;
    const int64_t b0 = blocks * ith / nth, b1 = blocks * (ith + 1) / nth;
    *r0 = b0 * LH_SLICE_ALIGN < n ? b0 * LH_SLICE_ALIGN : n;
    *r1 = b1 * LH_SLICE_ALIGN < n ? b1 * LH_SLICE_ALIGN : n;
}

static bool lh_computes_nothing(const struct ggml_tensor * t) {
    return t->op == GGML_OP_NONE || t->op == GGML_OP_VIEW || t->op == GGML_OP_RESHAPE ||
           t->op == GGML_OP_PERMUTE || t->op == GGML_OP_TRANSPOSE;
}

/* Compute node n with ggml's own CPU code on the calling thread (a one-node graph, one thread):
 * for the element-wise nodes of a pool's graph: the same floats as on any number of threads. */
static bool lh_compute_here(struct lh_ctx * ctx, struct ggml_tensor * n) {
    if (ctx->one_thread == NULL) {
        struct ggml_threadpool_params params = ggml_threadpool_params_default(1);
        ctx->one_thread = ggml_threadpool_new(&params);
        if (ctx->one_thread == NULL) {
            return false;
        }
    }
    const size_t mem = ggml_graph_overhead_custom(1, false);
    if (!lh_grow(&ctx->one_graph_mem, &ctx->one_graph_mem_size, mem, 1)) {
        return false;
    }
    struct ggml_init_params params = { mem, ctx->one_graph_mem, true };
    struct ggml_context * g = ggml_init(params);
    if (g == NULL) {
        return false;
    }
    struct ggml_cgraph * graph = ggml_new_graph_custom(g, 1, false);
    ggml_graph_add_node(graph, n);
    struct ggml_cplan plan = ggml_graph_plan(graph, 1, ctx->one_thread);
    bool ok = true;
    if (plan.work_size > 0) {
        ok = lh_grow(&ctx->one_work, &ctx->one_work_size, plan.work_size, 1);
        plan.work_data = ctx->one_work;
    }
    ok = ok && ggml_graph_compute(graph, &plan) == GGML_STATUS_SUCCESS;
    ggml_free(g);
    return ok;
}

/* A node of the shim's row-sliced MUL_MAT_ID (ggml_custom_4d keeps the function first in op_params). */
static bool lh_is_sliced(const struct ggml_tensor * t) {
    ggml_custom_op_t fun = NULL;
    if (t->op == GGML_OP_CUSTOM) {
        memcpy(&fun, t->op_params, sizeof fun);
    }
    return fun == lh_sliced_mul_mat_id;
}

/* Whether a graph can run on the pool: every node computing something is sliced, or element-wise
 * (the same floats on one thread as on many). */
static bool lh_poolable(struct ggml_cgraph * g) {
    for (int i = 0; i < ggml_graph_n_nodes(g); i++) {
        const struct ggml_tensor * t = ggml_graph_node(g, i);
        switch (t->op) {
            case GGML_OP_GLU: case GGML_OP_UNARY: case GGML_OP_CLAMP: case GGML_OP_SCALE:
            case GGML_OP_MUL: case GGML_OP_ADD: case GGML_OP_ADD_ID:
                break;
            default:
                if (!lh_is_sliced(t) && !lh_computes_nothing(t)) {
                    return false;
                }
        }
    }
    return true;
}

/* Memory a graph's nodes read and wrote since the last barrier: [begin, end) ranges. */
#define LH_POOL_RANGES 64
struct lh_ranges {
    int32_t n;
    const char * begin[LH_POOL_RANGES];
    const char * end[LH_POOL_RANGES];
};

/* Whether t's memory meets a range of r; own_range: except a range that is exactly t's own memory
 * (a co-sliced node computed in place over its row source: each thread rewrites only its slice). */
static bool lh_ranges_meet(const struct lh_ranges * r, const struct ggml_tensor * t, bool own_range) {
    const char * b = (const char *) t->data, * e = b + ggml_nbytes(t);
    for (int32_t i = 0; i < r->n; i++) {
        if (b < r->end[i] && r->begin[i] < e && !(own_range && r->begin[i] == b && r->end[i] == e)) {
            return true;
        }
    }
    return false;
}

static void lh_ranges_add(struct lh_ranges * r, const struct ggml_tensor * t) {
    r->begin[r->n] = (const char *) t->data;
    r->end[r->n] = (const char *) t->data + ggml_nbytes(t);
    r->n++;
}

/* ---- Co-sliced element-wise nodes ----
 * Between a stop's sliced matmuls come element-wise nodes (the GLU; gpt-oss's bias ADD_IDs). Each
 * output element of those needs only the same element of its row sources, so where those are the
 * sliced matmuls' outputs (or halves of a fused gate_up's, or co-sliced nodes), every thread computes
 * the element-wise node on the very slice of every row it computed itself: no barrier before it, none
 * of the threads waiting while one computes it. The matmuls feeding it are then sliced at
 * LH_SLICE_ALIGN steps (the floats of a matmul row do not depend on the split; those of the
 * element-wise kernels do not either at those steps, see lh_slice). */

/* Sources of an element-wise node t that are rows like t's own output (the others, a bias table and
 * its ids, are only read): GLU's two halves, ADD_ID's rows. 0 if t is not of a kind computed here. */
static int lh_row_sources(const struct ggml_tensor * t) {
    if (t->op == GGML_OP_GLU && t->src[1] != NULL && ggml_compute_forward_glu != NULL) {
        return 2;   /* split form: gate and up rows */
    }
    if (t->op == GGML_OP_ADD_ID && ggml_compute_forward_add_id != NULL) {
        return 1;
    }
    return 0;
}

/* The sliced node r is a half of (a fused gate_up whose first or second half it views), else NULL. */
static const struct ggml_tensor * lh_half_of(const struct ggml_tensor * r) {
    const struct ggml_tensor * s = r->view_src;
    if (r->op != GGML_OP_VIEW || s == NULL || !lh_is_sliced(s) || s->ne[0] != 2 * r->ne[0] ||
        (r->view_offs != 0 && r->view_offs != (size_t) r->ne[0] * s->nb[0]) ||
        r->nb[1] != s->nb[1] || r->nb[2] != s->nb[2] || r->ne[1] != s->ne[1] || r->ne[2] != s->ne[2]) {
        return NULL;
    }
    return s;
}

/* How sliced node t of g is split: 1 at aligned steps where an element-wise node of a co-sliced kind
 * reads it whole, 2 at aligned steps in each half where one reads its halves (a fused gate_up: thread
 * k computes slice k of the gate and slice k of the up), else (or if both) 0, as ggml splits it. */
static int lh_slicing_for(struct ggml_cgraph * g, const struct ggml_tensor * t) {
    int how = 0;
    for (int j = 0; j < ggml_graph_n_nodes(g); j++) {
        const struct ggml_tensor * u = ggml_graph_node(g, j);
        for (int s = 0; s < lh_row_sources(u); s++) {
            const int use = u->src[s] == t ? 1 : lh_half_of(u->src[s]) == t ? 2 : 0;
            if (use != 0 && how != 0 && use != how) {
                return 0;
            }
            how = use != 0 ? use : how;
        }
    }
    return how;
}

/* Whether t is computed slice by slice: a sliced matmul, or an element-wise node of g whose row
 * sources all are (or are halves of one, split for that), with t's shape: every thread's slice of
 * them is then its own. */
static bool lh_co_sliced(struct ggml_cgraph * g, const struct ggml_tensor * t) {
    if (lh_is_sliced(t)) {
        return true;
    }
    const int n_row_src = lh_row_sources(t);
    if (n_row_src == 0 || t->type != GGML_TYPE_F32 || !ggml_is_contiguous_1(t)) {
        return false;
    }
    for (int s = 0; s < n_row_src; s++) {
        const struct ggml_tensor * r = t->src[s], * half = lh_half_of(r);
        if (r->type != GGML_TYPE_F32 || !ggml_are_same_shape(r, t) || !ggml_is_contiguous_1(r)) {
            return false;
        }
        const bool ok = half != NULL ? lh_slicing_for(g, half) == 2 :
                        lh_is_sliced(r) ? lh_slicing_for(g, r) == 1 : lh_co_sliced(g, r);
        if (!ok) {
            return false;
        }
    }
    return t->op != GGML_OP_ADD_ID || (t->src[1]->type == GGML_TYPE_F32 && t->src[1]->nb[0] == sizeof(float));
}

/* Thread ith of nth's rows of sliced node i of g (as lh_slicing_for splits it). */
static struct lh_rows lh_rows_for(struct ggml_cgraph * g, int i, int ith, int nth, bool co_slicing) {
    const struct ggml_tensor * t = ggml_graph_node(g, i);
    const int how = co_slicing ? lh_slicing_for(g, t) : 0;
    struct lh_rows rows = { .n = how == 2 ? 2 : 1 };
    lh_slice(how == 2 ? t->ne[0] / 2 : t->ne[0], ith, nth, how > 0, &rows.begin[0], &rows.end[0]);
    if (how == 2) {
        rows.begin[1] = rows.begin[0] + t->ne[0] / 2;
        rows.end[1] = rows.end[0] + t->ne[0] / 2;
    }
    return rows;
}

/* Columns [c0, c1) of every row of the co-sliced element-wise node t, by ggml's kernel for t's op on
 * views of that slice (t's row sources and a bias table sliced alike; ids whole). */
static void lh_co_slice(struct ggml_tensor * t, int64_t c0, int64_t c1) {
    if (c1 <= c0) {
        return;
    }
    struct ggml_tensor out = *t, src[GGML_MAX_SRC];
    for (int s = 0; s < GGML_MAX_SRC; s++) {
        if (t->src[s] == NULL) {
            continue;
        }
        src[s] = *t->src[s];
        if (s < lh_row_sources(t) || (t->op == GGML_OP_ADD_ID && s == 1)) {
            src[s].ne[0] = c1 - c0;
            src[s].data = (char *) src[s].data + c0 * src[s].nb[0];
        }
        out.src[s] = &src[s];
    }
    out.ne[0] = c1 - c0;
    out.data = (char *) out.data + c0 * out.nb[0];
    const struct lh_ggml_compute_params one = { .ith = 0, .nth = 1 };
    if (t->op == GGML_OP_GLU) {
        ggml_compute_forward_glu(&one, &out);
    } else {
        ggml_compute_forward_add_id(&one, &out);
    }
}

/* Whether the co-sliced node t computes in place over one of its row sources (gallocr reuses a row
 * source's memory for ADD_ID). */
static bool lh_in_place(const struct ggml_tensor * t) {
    for (int s = 0; s < lh_row_sources(t); s++) {
        if (t->src[s]->data == t->data) {
            return true;
        }
    }
    return false;
}

int64_t lh_check_co_slicing(int32_t n, int32_t rows, int32_t max_team) {
    if (ggml_compute_forward_glu == NULL || n < 1 || rows < 1 || max_team < 1) {
        return -1;
    }
    const size_t bytes = (size_t) n * (size_t) rows * sizeof(float);
    const size_t mem = (size_t) (GGML_GLU_OP_COUNT + 4) * (bytes + 256) + GGML_GLU_OP_COUNT * ggml_graph_overhead() +
                       64 * ggml_tensor_overhead() + ((size_t) 1 << 20);   /* + any work buffer of the compute */
    struct ggml_init_params params = { mem, NULL, false };
    struct ggml_context * g = ggml_init(params);
    float * sliced = malloc(bytes);
    if (g == NULL || sliced == NULL) {
        ggml_free(g);
        free(sliced);
        return -1;
    }
    struct ggml_tensor * a = ggml_new_tensor_2d(g, GGML_TYPE_F32, n, rows);
    struct ggml_tensor * b = ggml_new_tensor_2d(g, GGML_TYPE_F32, n, rows);
    uint32_t state = 12345;
    for (int64_t i = 0; i < (int64_t) n * rows; i++) {   /* values in [-8, 8): every branch of the kernels */
        state = state * 1664525u + 1013904223u;
        ((float *) a->data)[i] = (float) (state >> 8) / (float) (1 << 24) * 16.0f - 8.0f;
        state = state * 1664525u + 1013904223u;
        ((float *) b->data)[i] = (float) (state >> 8) / (float) (1 << 24) * 16.0f - 8.0f;
    }
    int64_t differ = 0;
    for (int op = 0; op < GGML_GLU_OP_COUNT; op++) {
        struct ggml_tensor * t = op == GGML_GLU_OP_SWIGLU_OAI ? ggml_swiglu_oai(g, a, b, 1.702f, 7.0f) :
                                 op == GGML_GLU_OP_SWIGLU_CLAMP ? ggml_swiglu_clamp(g, a, b, 7.0f) :
                                 ggml_glu_split(g, a, b, (enum ggml_glu_op) op);
        struct ggml_cgraph * graph = ggml_new_graph(g);
        ggml_build_forward_expand(graph, t);
        if (ggml_graph_compute_with_ctx(g, graph, 1) != GGML_STATUS_SUCCESS) {
            differ = -1;
            break;
        }
        for (int32_t team = 1; team <= max_team; team++) {
            struct ggml_tensor into = *t;
            into.data = sliced;
            memset(sliced, 0xff, bytes);   /* NaN: an element no slice wrote differs */
            for (int32_t me = 0; me < team; me++) {
                int64_t c0, c1;
                lh_slice(n, me, team, true, &c0, &c1);
                lh_co_slice(&into, c0, c1);
            }
            for (int64_t i = 0; i < (int64_t) n * rows; i++) {
                differ += memcmp(&sliced[i], (const float *) t->data + i, sizeof(float)) != 0;
            }
        }
    }
    ggml_free(g);
    free(sliced);
    return differ;
}

/* One thread's share of graph g (nth threads; every thread decides the same barriers). late_caller:
 * the caller (ith 0) is busy submitting the GPU part when the job starts, so the workers share the
 * rows and the element-wise nodes go to the first worker; the caller only waits for them at the end. */
static void lh_pool_run(struct lh_ctx * ctx, struct lh_pool * p, struct ggml_cgraph * g, int32_t ith, int32_t nth,
                        bool late_caller) {
    if (late_caller && ith == 0) {
        while (atomic_load(&p->workers_done) < nth - 1) {
            lh_cpu_relax();
        }
        return;
    }
    const int32_t me = late_caller ? ith - 1 : ith, team = late_caller ? nth - 1 : nth;
    const bool co_slicing = !(ctx->debug_flags & LH_DEBUG_SERIAL_ELEMENTWISE);
    struct lh_ranges read = { 0 }, written = { 0 };
    for (int i = 0; i < ggml_graph_n_nodes(g); i++) {
        struct ggml_tensor * t = ggml_graph_node(g, i);
        if (lh_computes_nothing(t)) {
            continue;
        }
        const bool sliced = lh_is_sliced(t), co_sliced = co_slicing && !sliced && lh_co_sliced(g, t);
        /* It reads what was written, or writes what was read or written, since the last barrier:
         * wait for the others (also when the lists are full). A co-sliced node's row sources hold
         * only what this thread wrote in the slice it reads. */
        bool meet = read.n + GGML_MAX_SRC >= LH_POOL_RANGES || written.n + 1 >= LH_POOL_RANGES ||
                    lh_ranges_meet(&read, t, false) || lh_ranges_meet(&written, t, co_sliced && lh_in_place(t));
        for (int s = 0; s < GGML_MAX_SRC && !meet; s++) {
            meet = t->src[s] != NULL && !(co_sliced && s < lh_row_sources(t)) && lh_ranges_meet(&written, t->src[s], false);
        }
        if (meet) {
            lh_pool_barrier(p, team);
            read.n = written.n = 0;
        }
        if (sliced) {
            const struct lh_rows rows = lh_rows_for(g, i, me, team, co_slicing);
            lh_sliced_rows(ctx, t, me, &rows);
        } else if (co_sliced) {
            int64_t c0, c1;
            lh_slice(t->ne[0], me, team, true, &c0, &c1);
            lh_co_slice(t, c0, c1);
            if (me == 0) {   /* atomic: the caller updates its counters while early workers run */
                __atomic_fetch_add(&ctx->counters.co_sliced_nodes, 1, __ATOMIC_RELAXED);
            }
        } else if (me == 0 && !lh_compute_here(ctx, t)) {
            atomic_store(&p->failed, true);
        }
        for (int s = 0; s < GGML_MAX_SRC; s++) {
            if (t->src[s] != NULL) {
                lh_ranges_add(&read, t->src[s]);
            }
        }
        lh_ranges_add(&written, t);
    }
    if (late_caller) {
        atomic_fetch_add(&p->workers_done, 1);  /* every row this worker wrote is before this */
    } else {
        lh_pool_barrier(p, nth);  /* the caller returns with every row written */
    }
}

static void * lh_pool_worker(void * arg) {
    struct lh_pool * p = ((struct lh_pool_arg *) arg)->pool;
    const int32_t ith = ((struct lh_pool_arg *) arg)->ith;
    long long seen = 0;
    for (;;) {
        int64_t spin_start = 0;
        long long g;
        for (int32_t spins = 0; (g = atomic_load(&p->generation)) == seen; spins++) {
            if (atomic_load(&p->stop)) {
                return NULL;
            }
            lh_cpu_relax();
            if ((spins & 255) == 255) {
                const int64_t now = lh_now_ns();
                spin_start = spin_start ? spin_start : now;
                if (now - spin_start >= p->ctx->pool_spin_ns) {
                    /* Sleep. The caller moves generation, then wakes sleepers under the mutex. */
                    pthread_mutex_lock(&p->mutex);
                    atomic_fetch_add(&p->sleepers, 1);
                    while (atomic_load(&p->generation) == seen && !atomic_load(&p->stop)) {
                        pthread_cond_wait(&p->wake, &p->mutex);
                    }
                    atomic_fetch_sub(&p->sleepers, 1);
                    pthread_mutex_unlock(&p->mutex);
                    spin_start = 0;
                }
            }
        }
        seen = g;
        lh_pool_run(p->ctx, p, p->jobs[g & 1], ith, p->n, p->late_caller[g & 1]);
    }
}

static void lh_pool_free(struct lh_pool * p) {
    if (p == NULL) {
        return;
    }
    pthread_mutex_lock(&p->mutex);
    atomic_store(&p->stop, true);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mutex);
    for (int32_t i = 0; i < p->n - 1; i++) {
        pthread_join(p->threads[i], NULL);
    }
    pthread_mutex_destroy(&p->mutex);
    pthread_cond_destroy(&p->wake);
    free(p->threads);
    free(p->args);
    free(p);
}

static struct lh_pool * lh_pool_new(struct lh_ctx * ctx, int32_t n) {
    struct lh_pool * p = calloc(1, sizeof *p);
    if (p == NULL) {
        return NULL;
    }
    p->n = n;
    p->ctx = ctx;
    pthread_mutex_init(&p->mutex, NULL);
    pthread_cond_init(&p->wake, NULL);
    p->threads = calloc((size_t) n, sizeof *p->threads);
    p->args = calloc((size_t) n, sizeof *p->args);
    int32_t started = 0;
    while (p->threads && p->args && started < n - 1) {
        p->args[started] = (struct lh_pool_arg) { p, started + 1 };
        if (pthread_create(&p->threads[started], NULL, lh_pool_worker, &p->args[started]) != 0) {
            break;
        }
        started++;
    }
    if (started < n - 1) {
        p->n = started + 1;  /* join the ones that started */
        lh_pool_free(p);
        return NULL;
    }
    return p;
}

static void lh_pool_post(struct lh_pool * p, struct ggml_cgraph * graph, bool late_caller) {
    const long long g = atomic_load(&p->generation) + 1;
    p->jobs[g & 1] = graph;
    p->late_caller[g & 1] = late_caller;
    atomic_store(&p->failed, false);
    atomic_store(&p->workers_done, 0);
    atomic_store(&p->generation, g);
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mutex);
        pthread_cond_broadcast(&p->wake);
        pthread_mutex_unlock(&p->mutex);
    }
}

/* The pool with nth threads (nth > 1), started or restarted on first use. */
static struct lh_pool * lh_pool_get(struct lh_ctx * ctx, int32_t nth) {
    if (ctx->pool == NULL || ctx->pool->n != nth) {
        lh_pool_free(ctx->pool);
        ctx->pool = lh_pool_new(ctx, nth);
        if (ctx->pool == NULL) {
            lh_error(ctx, "could not start %d threads for the stops' CPU graphs", nth);
        }
    }
    return ctx->pool;
}

/* Run graph g on the pool with nth threads (1: on the caller alone, no thread woken). */
static bool lh_pool_compute(struct lh_ctx * ctx, struct ggml_cgraph * g, int32_t nth) {
    if (nth == 1) {
        struct lh_pool one = { .n = 1 };
        atomic_init(&one.failed, false);
        lh_pool_run(ctx, &one, g, 0, 1, false);
        return !atomic_load(&one.failed);
    }
    struct lh_pool * p = lh_pool_get(ctx, nth);
    if (p == NULL) {
        return false;
    }
    lh_pool_post(p, g, false);
    lh_pool_run(ctx, p, g, 0, nth, false);
    ctx->counters.pool_graphs++;
    return !atomic_load(&p->failed);
}

/* Whether a stop's CPU graph g runs on the pool (when the pool is on and g is made of nodes it runs). */
static bool lh_on_pool(const struct lh_ctx * ctx, struct ggml_cgraph * g) {
    return ctx->pool_spin_ns >= 0 && ggml_graph_n_nodes(g) > 0 && lh_poolable(g);
}

/* Whether a stop's CPU graph of `rows` rows reading `weight_bytes` runs on the pool, and on how many
 * threads (0: not on the pool). */
static int32_t lh_pool_threads(struct lh_ctx * ctx, struct ggml_cgraph * g, int64_t rows, size_t weight_bytes) {
    return lh_on_pool(ctx, g) ? lh_stop_threads(ctx, rows, weight_bytes, lh_now_ns()) : 0;
}

/* A stop with a GPU part: its cold rows start on the pool's workers before the caller submits the GPU
 * part (~15 us a stop on the H100 machine, during which the workers would only spin), and the caller
 * joins them in lh_finish. The rows are bound by memory, so the caller's share is not missed. Returns
 * the threads (0: not started; the graph runs in lh_finish as usual). */
static int32_t lh_pool_start_early(struct lh_ctx * ctx, struct ggml_cgraph * g, int64_t rows, size_t weight_bytes) {
    if (ctx->debug_flags & LH_DEBUG_COLD_AFTER_SUBMIT) {
        return 0;
    }
    const int32_t nth = lh_pool_threads(ctx, g, rows, weight_bytes);
    struct lh_pool * p = nth > 1 ? lh_pool_get(ctx, nth) : NULL;
    if (p == NULL) {
        return 0;
    }
    ctx->graph_seq++;
    ctx->graph_t0_ns = lh_now_ns();
    lh_pool_post(p, g, true);
    return nth;
}

/* The end of a redirect: the CPU part (while the GPU part, launched before, runs; early_threads > 0:
 * already started on the pool by lh_pool_start_early, so only joined here, whatever ok), the wait for
 * the GPU, then every row scattered into dst in t's layout. */
static bool lh_finish(struct lh_ctx * ctx, const struct ggml_tensor * t, struct ggml_cgraph * cpu_graph, bool gpu_used,
                      int64_t cpu_rows, size_t cpu_weight_bytes, int64_t t0, bool ok, int32_t early_threads,
                      int64_t n_cold, const float * cold_rows,
                      int64_t n_hot, const float * hot_rows, int64_t n_dev, const float * dev_rows, char * dst) {
    if (early_threads > 0 || (ok && ggml_graph_n_nodes(cpu_graph) > 0)) {
        int32_t n_threads = early_threads;
        if (early_threads > 0) {
            lh_pool_run(ctx, ctx->pool, cpu_graph, 0, early_threads, true);
            ok = ok && !atomic_load(&ctx->pool->failed);
            t0 = ctx->graph_t0_ns;
            ctx->counters.pool_graphs++;
            ctx->counters.early_pool_graphs++;
        } else {
            n_threads = lh_stop_threads(ctx, cpu_rows, cpu_weight_bytes, t0);
            ggml_backend_cpu_set_n_threads(ctx->cpu, n_threads);
            ctx->graph_seq++;
            ctx->graph_t0_ns = lh_now_ns();
            if (lh_on_pool(ctx, cpu_graph)) {
                ok = lh_pool_compute(ctx, cpu_graph, n_threads);
            } else {
                ok = ggml_backend_graph_compute(ctx->cpu, cpu_graph) == GGML_STATUS_SUCCESS;
            }
        }
        lh_count_sliced_graph(ctx, n_threads);
        for (int i = 0; i < ggml_graph_n_nodes(cpu_graph); i++) {
            ctx->counters.sliced_matmuls += lh_is_sliced(ggml_graph_node(cpu_graph, i));
        }
        ctx->counters.cpu_runs++;
        ctx->counters.cpu_rows += cpu_rows;
        ctx->counters.lone_row_runs += n_threads < ctx->n_threads && cpu_weight_bytes >= LH_PARALLEL_MIN_BYTES;
        const int64_t t1 = lh_now_ns();
        if (n_threads > 1) {
            ctx->last_parallel_end_ns = t1;
        }
        const int64_t bucket = cpu_rows < 8 ? cpu_rows : 8;
        ctx->counters.cpu_runs_by_rows[bucket]++;
        ctx->counters.cpu_ns_by_rows[bucket] += t1 - t0;
        ctx->counters.cpu_compute_ns += t1 - t0;
        t0 = t1;
    }
    if (gpu_used) {
        if (n_dev > 0 && ctx->copies_done != NULL) {
            const int64_t t1 = lh_now_ns();
            ggml_backend_event_synchronize(ctx->copies_done);
            ctx->counters.dev_copy_wait_ns += lh_now_ns() - t1;
        }
        ggml_backend_synchronize(ctx->gpu);
        ctx->counters.gpu_wait_ns += lh_now_ns() - t0;
    }
    if (ok && n_cold > 0) {
        lh_scatter(t, ctx->cold, n_cold, cold_rows, dst);
    }
    if (ok && n_hot > 0) {
        lh_scatter(t, ctx->hot, n_hot, hot_rows, dst);
    }
    if (ok && n_dev > 0) {
        lh_scatter(t, ctx->dev_cold, n_dev, dev_rows, dst);
    }
    return ok;
}

/* Compute node t (llama's op restored) from slots and original weight into dst (t's layout). */
static bool lh_compute_node(struct lh_ctx * ctx, const struct ggml_tensor * t, int32_t layer, int32_t proj, char * dst) {
    const struct ggml_tensor * ids = t->src[2];
    struct ggml_tensor * w = ctx->layers[layer].weight[proj];
    struct ggml_tensor * slots = ctx->layers[layer].slot[proj];

    int64_t n_hot, n_cold;
    if (!lh_split_entries(ctx, ids, layer, slots != NULL, &n_hot, &n_cold) || (n_hot > 0 && !lh_wait_fence(ctx, layer))) {
        return false;
    }

    /* Host scratch: the cold part, then the hot part; for GPU slots the hot part's host side is the
     * staging area. */
    const bool hot_on_gpu = ctx->gpu != NULL && n_hot > 0;
    char * stage = hot_on_gpu ? (char *) lh_staging(ctx, lh_part_bytes(t, n_hot)) : NULL;
    if (!lh_scratch_reserve(&ctx->host_scratch, lh_part_bytes(t, n_cold) + lh_part_bytes(t, n_hot)) ||
        (hot_on_gpu && (stage == NULL || !lh_scratch_reserve(&ctx->gpu_scratch, lh_part_bytes(t, n_hot))))) {
        return false;
    }
    const size_t graph_mem = ggml_tensor_overhead() * 16 + 2 * ggml_graph_overhead_custom(8, false);
    if (!lh_grow(&ctx->graph_mem, &ctx->graph_mem_size, graph_mem, 1)) {
        return false;
    }
    struct ggml_init_params params = { ctx->graph_mem_size, ctx->graph_mem, true };
    struct ggml_context * g = ggml_init(params);
    struct ggml_cgraph * cpu_graph = ggml_new_graph_custom(g, 8, false);
    struct ggml_cgraph * gpu_graph = ggml_new_graph_custom(g, 8, false);
    char * host_base = (char *) ggml_backend_buffer_get_base(ctx->host_scratch.buffer);
    size_t host_off = 0, gpu_off = 0;

    struct lh_part hot = {0}, cold = {0};
    if (n_cold > 0) {
        cold = lh_build_part(g, w, t, n_cold);
        lh_place(&ctx->host_scratch, cold.b, &host_off);
        lh_place(&ctx->host_scratch, cold.ids, &host_off);
        lh_place(&ctx->host_scratch, cold.out, &host_off);
        lh_gather(t->src[1], ctx->cold, n_cold, false, NULL, (float *) cold.b->data, (int32_t *) cold.ids->data, NULL);
        ggml_build_forward_expand(cpu_graph, cold.out);
    }
    /* Where the hot part's inputs are gathered and its output lands, in host memory. */
    float * hot_b_rows = (float *) (hot_on_gpu ? stage : host_base + host_off);
    int32_t * hot_ids = NULL;
    float * hot_out_rows = NULL;
    if (n_hot > 0) {
        hot = lh_build_part(g, slots, t, n_hot);
        if (hot_on_gpu) {
            lh_place(&ctx->gpu_scratch, hot.b, &gpu_off);
            lh_place(&ctx->gpu_scratch, hot.ids, &gpu_off);
            lh_place(&ctx->gpu_scratch, hot.out, &gpu_off);
            hot_ids = (int32_t *) ((char *) hot_b_rows + lh_pad(ggml_nbytes(hot.b)));
            hot_out_rows = (float *) ((char *) hot_ids + lh_pad(ggml_nbytes(hot.ids)));
            ggml_build_forward_expand(gpu_graph, hot.out);
        } else {
            lh_place(&ctx->host_scratch, hot.b, &host_off);
            lh_place(&ctx->host_scratch, hot.ids, &host_off);
            lh_place(&ctx->host_scratch, hot.out, &host_off);
            hot_ids = (int32_t *) hot.ids->data;
            hot_out_rows = (float *) hot.out->data;
            ggml_build_forward_expand(cpu_graph, hot.out);
        }
        lh_gather(t->src[1], ctx->hot, n_hot, false, NULL, hot_b_rows, hot_ids, NULL);
    }
    bool ok = true;
    int64_t t0 = lh_now_ns();
    if (hot_on_gpu) {
        /* Hot work first and asynchronously; the CPU computes the cold part meanwhile. */
        ggml_backend_tensor_set_async(ctx->gpu, hot.b, hot_b_rows, 0, ggml_nbytes(hot.b));
        ggml_backend_tensor_set_async(ctx->gpu, hot.ids, hot_ids, 0, ggml_nbytes(hot.ids));
        ctx->counters.gpu_input_copies += 2;
        ok = ggml_backend_graph_compute_async(ctx->gpu, gpu_graph) == GGML_STATUS_SUCCESS;
        ctx->counters.gpu_runs++;
        if (ok) {
            ggml_backend_tensor_get_async(ctx->gpu, hot.out, hot_out_rows, 0, ggml_nbytes(hot.out));
        }
        const int64_t t1 = lh_now_ns();
        ctx->counters.gpu_submit_ns += t1 - t0;
        t0 = t1;
    }
    const int64_t cpu_rows = n_cold + (hot_on_gpu ? 0 : n_hot);
    ok = lh_finish(ctx, t, cpu_graph, hot_on_gpu, cpu_rows, (size_t) cpu_rows * w->nb[2], t0, ok, 0, n_cold, n_cold > 0 ? (const float *) cold.out->data : NULL,
                   n_hot, hot_out_rows, 0, NULL, dst);
    ggml_free(g);
    return ok;
}

/* ---- the layer FFN fast path ------------------------------------------------------------------ */

static bool lh_ffn_has(const struct lh_ffn * f, const struct ggml_tensor * n) {
    for (int32_t i = 0; i < f->n_nodes; i++) {
        if (f->nodes[i] == n) {
            return true;
        }
    }
    return false;
}

/* A node of the FFN has llama's per-entry layout: [X, n_used, n_tokens] (views narrow dim 0). */
static bool lh_ffn_shape_ok(const struct ggml_tensor * n, const struct ggml_tensor * ids) {
    return n->type == GGML_TYPE_F32 && n->nb[0] == sizeof(float) && n->ne[1] == ids->ne[0] &&
           n->ne[2] == ids->ne[1] && n->ne[3] == 1;
}

static bool lh_is_weight(const struct ggml_tensor * t) {
    return t != NULL && t->buffer != NULL && ggml_backend_buffer_get_usage(t->buffer) == GGML_BACKEND_BUFFER_USAGE_WEIGHTS &&
           ggml_backend_buffer_is_host(t->buffer);
}

/* Collect, in post-order, the nodes that compute node n from the layer's gate/up matmuls. Only
 * ops whose result per (token, k) row depends on that row alone are accepted, so the same nodes
 * can be replayed on a compact list of rows; anything else makes the layer use per-node redirects. */
static bool lh_ffn_collect(struct lh_ctx * ctx, struct lh_ffn * f, struct ggml_tensor * n, const struct ggml_tensor * ids, int depth) {
    if (lh_ffn_has(f, n)) {
        return true;
    }
    if (depth > LH_FFN_MAX_NODES || f->n_nodes >= LH_FFN_MAX_NODES || !lh_ffn_shape_ok(n, ids)) {
        return false;
    }
    switch (n->op) {
        case GGML_OP_MUL_MAT_ID: {
            if (n->src[0] == NULL || n->src[2] != ids || !lh_redirectable(n)) {
                return false;
            }
            const struct lh_weight_entry * e = lh_lookup_weight(ctx, n->src[0]);
            if (e->moe_layer != f->layer || e->proj == LH_PROJ_DOWN) {
                return false;
            }
            break;  /* a leaf of the walk: its inputs are the layer input and the ids */
        }
        case GGML_OP_VIEW: {
            const struct ggml_tensor * src = n->view_src;
            if (src == NULL || n->src[0] != src || n->ne[1] != src->ne[1] || n->ne[2] != src->ne[2] ||
                n->nb[1] != src->nb[1] || n->nb[2] != src->nb[2] ||
                n->view_offs + (size_t) n->ne[0] * n->nb[0] > src->nb[1] ||
                !lh_ffn_collect(ctx, f, n->src[0], ids, depth + 1)) {
                return false;
            }
            break;
        }
        case GGML_OP_GLU:
            if (!lh_ffn_collect(ctx, f, n->src[0], ids, depth + 1) ||
                (n->src[1] != NULL && !lh_ffn_collect(ctx, f, n->src[1], ids, depth + 1))) {
                return false;
            }
            break;
        case GGML_OP_UNARY:
        case GGML_OP_CLAMP:
        case GGML_OP_SCALE:
            if (n->src[1] != NULL || !lh_ffn_collect(ctx, f, n->src[0], ids, depth + 1)) {
                return false;
            }
            break;
        case GGML_OP_MUL:
        case GGML_OP_ADD:
            if (!ggml_are_same_shape(n->src[0], n) || !ggml_are_same_shape(n->src[1], n) ||
                !lh_ffn_collect(ctx, f, n->src[0], ids, depth + 1) || !lh_ffn_collect(ctx, f, n->src[1], ids, depth + 1)) {
                return false;
            }
            break;
        case GGML_OP_ADD_ID:
            /* a routed-expert bias: bias[:, ids[k, token]] added to each row */
            if (n->src[2] != ids || !lh_is_weight(n->src[1]) || n->src[1]->type != GGML_TYPE_F32 ||
                !lh_ffn_collect(ctx, f, n->src[0], ids, depth + 1)) {
                return false;
            }
            break;
        default:
            return false;
    }
    f->nodes[f->n_nodes++] = n;
    return true;
}

/* Recognise the FFN that feeds the down node d. */
static bool lh_ffn_find(struct lh_ctx * ctx, struct lh_ffn * f, struct ggml_tensor * d, int32_t layer) {
    f->layer = layer;
    f->down = d;
    f->n_nodes = 0;
    f->n_mutated = 0;
    if (!lh_redirectable(d) || d->src[1]->ne[1] != d->src[2]->ne[0] ||
        !lh_ffn_collect(ctx, f, d->src[1], d->src[2], 0)) {
        return false;
    }
    /* Every gate/up projection of the layer appears exactly once, all reading the same input. */
    int32_t matmuls = 0;
    const struct ggml_tensor * input = NULL;
    for (int32_t i = 0; i < f->n_nodes; i++) {
        if (f->nodes[i]->op == GGML_OP_MUL_MAT_ID) {
            if (input != NULL && f->nodes[i]->src[1] != input) {
                return false;
            }
            input = f->nodes[i]->src[1];
            matmuls++;
        }
    }
    f->input = input;
    return matmuls == lh_layer_weight_count(ctx, layer) - 1;
}

/* Skip the FFN's nodes and the down node in llama's run (restored by lh_ffn_restore). */
static void lh_ffn_skip(struct lh_ctx * ctx, struct lh_ffn * f) {
    f->n_mutated = 0;
    for (int32_t i = 0; i <= f->n_nodes; i++) {
        struct ggml_tensor * n = i < f->n_nodes ? f->nodes[i] : f->down;
        if (n->op == GGML_OP_VIEW) {
            continue;  /* computes nothing */
        }
        f->saved_op[f->n_mutated] = n->op;
        f->mutated[f->n_mutated++] = n;
        n->op = GGML_OP_NONE;
    }
    ctx->counters.open_mutations += f->n_mutated;
}

static void lh_ffn_restore(struct lh_ctx * ctx, struct lh_ffn * f) {
    for (int32_t i = 0; i < f->n_mutated; i++) {
        f->mutated[i]->op = f->saved_op[i];
    }
    ctx->counters.open_mutations -= f->n_mutated;
    f->n_mutated = 0;
}

/* The GPU copy of a host weight (a bias), made on first use. */
static struct ggml_tensor * lh_dev_copy(struct lh_ctx * ctx, const struct ggml_tensor * w) {
    for (int32_t i = 0; i < ctx->n_dev_copies; i++) {
        if (ctx->dev_copies[i].src == w) {
            return ctx->dev_copies[i].dev;
        }
    }
    if (ctx->n_dev_copies >= LH_MAX_DEV_COPIES) {
        return NULL;
    }
    ggml_backend_buffer_t buffer = NULL;
    struct ggml_tensor * dev = lh_new_slot_tensor(w, (int32_t) w->ne[2], ggml_backend_get_default_buffer_type(ctx->gpu), &buffer);
    if (dev == NULL) {
        return NULL;
    }
    ggml_backend_tensor_set(dev, w->data, 0, ggml_nbytes(w));
    ctx->dev_copies[ctx->n_dev_copies++] = (struct lh_dev_copy) { w, dev, buffer };
    return dev;
}

/* A thread's rows of a sliced node, expert after expert, as one stream of bytes that a cursor prefetches
 * ahead of the rows being computed: the hardware prefetchers stop at every 4 KiB page and at every
 * expert, and a cold row waits for memory (on the H100 VM 4 KiB ahead made cold 1-8 row FFNs as fast as
 * warm ones, benchmarks/RESULTS.md, session 12). */
enum { LH_PF_SEGMENTS = 64 };
struct lh_row_stream {
    const char * base[LH_PF_SEGMENTS];
    size_t len[LH_PF_SEGMENTS];
    int n, seg;
    size_t off;
    int64_t bytes;   /* prefetched so far */
};

static void lh_row_stream_advance(struct lh_row_stream * s, size_t bytes) {
    while (bytes > 0 && s->seg < s->n) {
        const size_t room = s->len[s->seg] - s->off, step = bytes < room ? bytes : room;
        const char * p = s->base[s->seg] + s->off;
        for (size_t at = 0; at < step; at += 64) {
            __builtin_prefetch(p + at, 0, 3);
        }
        s->off += step;
        s->bytes += (int64_t) step;
        bytes -= step;
        if (s->off == s->len[s->seg]) {
            s->seg++;
            s->off = 0;
        }
    }
}

/* Single-token decode on the CPU: every expert has one row, so ggml's MUL_MAT_ID computes each
 * output element with one vec_dot of the input row quantized by from_float (its tiled kernels start
 * at 8 rows per expert). This node computes the same elements with the same two functions, but each
 * thread quantizes the input rows itself and takes one slice of rows of every expert: no barrier
 * inside the node (ggml's threads quantize the input together, then wait for each other). Same
 * kernels on the same operands: the same floats, bit for bit. Alone it saves 4-25 us of a 1-row
 * graph on the H100 machine; in the decode the gain is within noise (docs/NOTES.md, session 10).
 * dst is [rows of w, ids->ne[0], ids->ne[1]] as ggml_mul_mat_id's; thread ith computes `rows` of
 * every entry (its lh_slice; both halves' slices where a fused gate_up feeds a co-sliced GLU). Each
 * thread also stamps its first entry into a sliced node of the graph (thread_in): how long the team
 * took to start. */
static void lh_sliced_rows(struct lh_ctx * ctx, struct ggml_tensor * dst, int ith, const struct lh_rows * rows) {
    const bool timed = ith < LH_MAX_TIMED_THREADS;
    int64_t node = 0;
    if (timed) {
        if (ctx->thread_in[ith].seq != ctx->graph_seq) {
            ctx->thread_in[ith].seq = ctx->graph_seq;
            ctx->thread_in[ith].n = 0;
        }
        node = ctx->thread_in[ith].n++;
        if (node < LH_TIMED_NODES) {
            ctx->thread_in[ith].in[node] = lh_now_ns() - ctx->graph_t0_ns;
        }
    }
    const struct ggml_tensor * w = dst->src[0], * b = dst->src[1], * ids = dst->src[2];
    const struct ggml_type_traits_cpu * traits = ggml_get_type_traits_cpu(w->type);
    const enum ggml_type q_type = traits->vec_dot_type;
    const size_t q_row = ggml_row_size(q_type, b->ne[0]);
    char * q = (char *) ctx->sliced_scratch + (size_t) ith * ctx->sliced_stride;
    for (int64_t i12 = 0; i12 < b->ne[2]; i12++) {
        for (int64_t i11 = 0; i11 < b->ne[1]; i11++) {
            const char * row = (const char *) b->data + i11 * b->nb[1] + i12 * b->nb[2];
            char * q_dst = q + (size_t) (i11 + i12 * b->ne[1]) * q_row;
            if (q_type == b->type) {
                memcpy(q_dst, row, q_row);
            } else {
                ggml_get_type_traits_cpu(q_type)->from_float((const float *) row, q_dst, b->ne[0]);
            }
        }
    }
    const size_t row_bytes = w->nb[1];
    /* The prefetch cursor: this thread's slice of every entry's expert, in the order computed. */
    struct lh_row_stream pf;
    pf.n = pf.seg = 0;
    pf.off = 0;
    pf.bytes = 0;
    const int64_t ahead = ctx->row_prefetch;
    if (ahead > 0 && ids->ne[0] * ids->ne[1] * rows->n <= LH_PF_SEGMENTS) {
        for (int64_t t = 0; t < ids->ne[1]; t++) {
            for (int64_t i = 0; i < ids->ne[0]; i++) {
                const int32_t e = lh_routed_expert(ids, i, t);
                for (int k = 0; k < rows->n; k++) {
                    if (rows->end[k] > rows->begin[k]) {
                        pf.base[pf.n] = (const char *) w->data + e * w->nb[2] + rows->begin[k] * row_bytes;
                        pf.len[pf.n++] = (size_t) (rows->end[k] - rows->begin[k]) * row_bytes;
                    }
                }
            }
        }
        lh_row_stream_advance(&pf, (size_t) ahead);
    }
    for (int64_t t = 0; t < ids->ne[1]; t++) {
        for (int64_t i = 0; i < ids->ne[0]; i++) {
            const int32_t e = lh_routed_expert(ids, i, t);
            const char * x = q + (size_t) (i % b->ne[1] + t * b->ne[1]) * q_row;
            const char * m = (const char *) w->data + e * w->nb[2];
            float * out = (float *) ((char *) dst->data + i * dst->nb[1] + t * dst->nb[2]);
            for (int k = 0; k < rows->n; k++) {
                for (int64_t r = rows->begin[k]; r < rows->end[k]; r++) {
                    if (pf.n > 0) {
                        lh_row_stream_advance(&pf, row_bytes);
                    }
                    traits->vec_dot((int) w->ne[0], out + r, 0, m + r * w->nb[1], 0, x, 0, 1);
                }
            }
        }
    }
    if (pf.bytes > 0) {
        __atomic_fetch_add(&ctx->counters.row_prefetch_bytes, pf.bytes, __ATOMIC_RELAXED);
    }
    if (timed && node < LH_TIMED_NODES) {
        ctx->thread_in[ith].out[node] = lh_now_ns() - ctx->graph_t0_ns;
    }
}

static void lh_sliced_mul_mat_id(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    struct lh_rows rows = { .n = 1 };
    lh_slice(dst->ne[0], ith, nth, false, &rows.begin[0], &rows.end[0]);
    lh_sliced_rows((struct lh_ctx *) userdata, dst, ith, &rows);
}

/* A part's expert matmul w @ b: by lh_sliced_mul_mat_id where it gives ggml's floats (a single-token
 * part on the CPU over a plain host matrix whose type has a vec_dot; a repacked one keeps ggml's own
 * kernels), else ggml_mul_mat_id. */
static struct ggml_tensor * lh_part_mul_mat_id(struct lh_ctx * ctx, struct ggml_context * g, struct ggml_tensor * w,
                                               struct ggml_tensor * b, struct ggml_tensor * ids, bool cpu_one_token) {
    const struct ggml_type_traits_cpu * traits = ggml_get_type_traits_cpu(w->type);
    const bool sliceable = cpu_one_token && w->extra == NULL && w->buffer != NULL && ggml_backend_buffer_is_host(w->buffer) &&
        traits->vec_dot != NULL && (traits->vec_dot_type == b->type || ggml_get_type_traits_cpu(traits->vec_dot_type)->from_float != NULL) &&
        ggml_is_contiguous(b) && w->nb[0] == ggml_type_size(w->type) && !(ctx->debug_flags & LH_DEBUG_GGML_MATMULS);
    if (!sliceable) {
        return ggml_mul_mat_id(g, w, b, ids);
    }
    /* Each thread's quantized rows, a cache line apart; one stride for every node (the widest), for
     * as many threads as the stop may use (set_threads may have raised them since the last graph). */
    const size_t row_bytes = lh_pad(ggml_row_size(traits->vec_dot_type, b->ne[0]) * (size_t) (b->ne[1] * b->ne[2]));
    const size_t stride = row_bytes > ctx->sliced_stride ? row_bytes : ctx->sliced_stride;
    if (!lh_grow(&ctx->sliced_scratch, &ctx->sliced_scratch_size, (size_t) ctx->n_threads * stride, 1)) {
        return NULL;
    }
    ctx->sliced_stride = stride;
    struct ggml_tensor * args[3] = { w, b, ids };
    return ggml_custom_4d(g, GGML_TYPE_F32, w->ne[1], ids->ne[0], ids->ne[1], 1, args, 3, lh_sliced_mul_mat_id,
                          GGML_N_TASKS_MAX, ctx);
}

/* A part's staging layout for three uploads at lh_pad steps (see lh_ffn_part). */
static void lh_part_stage_layout(struct lh_ffn_part * part) {
    part->one_upload = false;
    part->ids_at = lh_pad(ggml_nbytes(part->b));
    part->experts_at = part->ids_at + lh_pad(ggml_nbytes(part->ids));
    part->inputs_bytes = part->experts_at + lh_pad(ggml_nbytes(part->experts));
}

/* An allocated part whose b, ids and experts lie one after another in one device buffer: stage them in
 * that layout and upload them with one copy (a copy costs the host ~3 us to issue; 48 stops a token). */
static void lh_part_one_upload(struct lh_ffn_part * part) {
    const char * b = (const char *) part->b->data, * ids = (const char *) part->ids->data, * experts = (const char *) part->experts->data;
    const size_t end = (size_t) (experts - b) + ggml_nbytes(part->experts);
    part->one_upload = part->b->buffer != NULL && part->b->buffer == part->ids->buffer && part->b->buffer == part->experts->buffer &&
        ids >= b + ggml_nbytes(part->b) && experts >= ids + ggml_nbytes(part->ids) &&
        end <= 2 * (ggml_nbytes(part->b) + 2 * ggml_nbytes(part->ids)) + 4096;   /* only alignment between them */
    if (part->one_upload) {
        part->ids_at = (size_t) (ids - b);
        part->experts_at = (size_t) (experts - b);
        part->inputs_bytes = lh_pad(end);
    } else {
        lh_part_stage_layout(part);
    }
}

/* Rows are laid out [X, 1, n] (one row per "token"), or, when every row belongs to one token whose
 * input is shared by all its experts (single-token decode), [X, n, 1] with one input row: the
 * input is then quantized once, as llama does, instead of once per expert. */
static bool lh_ffn_build_part(struct lh_ctx * ctx, struct ggml_context * g, const struct lh_ffn * f,
                              struct ggml_tensor * const * matrices, bool on_gpu, int64_t n, bool one_token,
                              struct lh_ffn_part * part) {
    struct ggml_tensor * clones[LH_FFN_MAX_NODES];
    const int64_t ne1 = one_token ? n : 1, ne2 = one_token ? 1 : n;
    part->b = ggml_new_tensor_3d(g, GGML_TYPE_F32, f->input->ne[0], 1, ne2);
    part->ids = ggml_new_tensor_2d(g, GGML_TYPE_I32, ne1, ne2);
    part->experts = ggml_new_tensor_2d(g, GGML_TYPE_I32, ne1, ne2);
    ggml_set_input(part->b);
    ggml_set_input(part->ids);
    ggml_set_input(part->experts);
    for (int32_t i = 0; i < f->n_nodes; i++) {
        const struct ggml_tensor * node = f->nodes[i];
        struct ggml_tensor * c = NULL;
        int32_t src_index[GGML_MAX_SRC];
        for (int j = 0; j < GGML_MAX_SRC; j++) {
            src_index[j] = -1;
            for (int32_t k = 0; k < i && node->src[j] != NULL; k++) {
                if (f->nodes[k] == node->src[j]) {
                    src_index[j] = k;
                }
            }
        }
        if (node->op == GGML_OP_MUL_MAT_ID) {
            const struct lh_weight_entry * e = lh_lookup_weight(ctx, node->src[0]);
            c = lh_part_mul_mat_id(ctx, g, matrices[e->proj], part->b, part->ids, !on_gpu && one_token);
            if (c == NULL) {
                return false;
            }
        } else if (node->op == GGML_OP_VIEW) {
            struct ggml_tensor * src = clones[src_index[0]];
            c = ggml_view_3d(g, src, node->ne[0], ne1, ne2, src->nb[1], src->nb[2], node->view_offs);
        } else {
            /* Same op and parameters on the compact rows. */
            c = ggml_new_tensor_3d(g, GGML_TYPE_F32, node->ne[0], ne1, ne2);
            c->op = node->op;
            memcpy(c->op_params, node->op_params, sizeof(c->op_params));
            for (int j = 0; j < GGML_MAX_SRC; j++) {
                if (node->src[j] == NULL) {
                    continue;
                }
                if (src_index[j] >= 0) {
                    c->src[j] = clones[src_index[j]];
                } else if (node->op == GGML_OP_ADD_ID && j == 1) {
                    c->src[j] = on_gpu ? lh_dev_copy(ctx, node->src[1]) : node->src[1];
                    if (c->src[j] == NULL) {
                        return false;
                    }
                } else if (node->op == GGML_OP_ADD_ID && j == 2) {
                    c->src[j] = part->experts;
                } else {
                    return false;  /* lh_ffn_collect admits no other inputs */
                }
            }
        }
        clones[i] = c;
    }
    /* The down projection of the activation rows. */
    int32_t act = -1;
    for (int32_t i = 0; i < f->n_nodes; i++) {
        if (f->nodes[i] == f->down->src[1]) {
            act = i;
        }
    }
    if (act < 0) {
        return false;
    }
    part->out = lh_part_mul_mat_id(ctx, g, matrices[LH_PROJ_DOWN], clones[act], part->ids, !on_gpu && one_token);
    if (part->out == NULL) {
        return false;
    }
    ggml_set_output(part->out);
    lh_part_stage_layout(part);
    return true;
}

static void lh_miss_scratch_free(struct lh_miss_scratch * m) {
    for (int p = 0; p < LH_PROJ_COUNT; p++) {
        if (m->buffer[p]) {
            ggml_backend_buffer_free(m->buffer[p]);
        }
        free(m->matrix[p]);
    }
    memset(m, 0, sizeof(*m));
}

/* The device matrices (n experts per projection) a layer's cold experts can be copied into. */
static struct lh_miss_scratch * lh_miss_scratch_for(struct lh_ctx * ctx, int32_t layer_index, int64_t n) {
    const struct lh_layer * layer = &ctx->layers[layer_index];
    for (int32_t i = 0; i < ctx->n_miss_scratch; i++) {
        struct lh_miss_scratch * m = &ctx->miss_scratch[i];
        bool same = true;
        for (int p = 0; p < LH_PROJ_COUNT && same; p++) {
            const struct ggml_tensor * w = layer->weight[p], * x = m->matrix[p];
            same = w ? x != NULL && x->type == w->type && x->ne[0] == w->ne[0] && x->ne[1] == w->ne[1] && x->ne[2] >= n
                     : x == NULL;
        }
        if (same) {
            return m;
        }
    }
    if (ctx->n_miss_scratch >= LH_MAX_MISS_SCRATCH) {
        return NULL;
    }
    struct lh_miss_scratch * m = &ctx->miss_scratch[ctx->n_miss_scratch];
    memset(m, 0, sizeof(*m));
    for (int p = 0; p < LH_PROJ_COUNT; p++) {
        const struct ggml_tensor * w = layer->weight[p];
        if (w != NULL) {
            m->matrix[p] = lh_new_slot_tensor(w, (int32_t) n, ggml_backend_get_default_buffer_type(ctx->gpu), &m->buffer[p]);
            if (m->matrix[p] == NULL) {
                lh_miss_scratch_free(m);
                return NULL;
            }
        }
    }
    ctx->n_miss_scratch++;
    return m;
}

/* What a persistent part graph was cloned from: each FFN node's op, parameters and row size. */
static uint64_t lh_ffn_signature(const struct lh_ffn * f) {
    uint64_t h = 1469598103934665603ULL;  /* FNV-1a */
#define LH_MIX(p, n) for (size_t i_ = 0; i_ < (n); i_++) { h = (h ^ ((const uint8_t *) (p))[i_]) * 1099511628211ULL; }
    LH_MIX(&f->n_nodes, sizeof(f->n_nodes));
    for (int32_t i = 0; i < f->n_nodes; i++) {
        const struct ggml_tensor * n = f->nodes[i];
        LH_MIX(&n->op, sizeof(n->op));
        LH_MIX(n->op_params, sizeof(n->op_params));
        LH_MIX(&n->ne[0], sizeof(n->ne[0]));
        LH_MIX(&n->view_offs, sizeof(n->view_offs));
        for (int j = 0; j < GGML_MAX_SRC; j++) {
            const void * src = n->src[j];  /* the bias weights of ADD_ID (the rest is within the FFN) */
            LH_MIX(&src, sizeof(src));
        }
    }
#undef LH_MIX
    return h;
}

/* Which part a persistent graph computes (lh_part_graph_get). */
enum lh_part_kind {
    LH_PART_HOT,   /* on the device, from the slots */
    LH_PART_COLD,  /* on the CPU, from the original weights */
    LH_PART_DEV,   /* cold rows on the device, from scratch matrices their experts are copied into */
};

/* A layer's persistent graph for single-token decode, built on first use: its hot part on the device
 * (`rows` = n_expert_used, padded), or its cold part on the CPU, or the device share of its cold rows,
 * with exactly `rows` rows (one per row count up to LH_COLD_GRAPH_ROWS: a stop then only gathers its
 * inputs, no graph is built or allocated; ~5 us of a stop on the development box). */
static struct lh_part_graph * lh_part_graph_get(struct lh_ctx * ctx, const struct lh_ffn * f, int64_t rows,
                                                enum lh_part_kind kind) {
    struct lh_part_graph ** table = kind == LH_PART_HOT ? &ctx->hot_graphs : kind == LH_PART_COLD ? &ctx->cold_graphs : &ctx->dev_graphs;
    const int64_t per_layer = kind == LH_PART_HOT ? 1 : LH_COLD_GRAPH_ROWS;
    if (kind != LH_PART_HOT && (rows < 1 || rows > LH_COLD_GRAPH_ROWS)) {
        return NULL;
    }
    if (*table == NULL) {
        *table = calloc((size_t) (ctx->n_moe_layers * per_layer), sizeof(struct lh_part_graph));
        if (*table == NULL) {
            return NULL;
        }
    }
    struct lh_part_graph * h = &(*table)[f->layer * per_layer + (kind == LH_PART_HOT ? 0 : rows - 1)];
    const bool ggml_matmuls = ctx->debug_flags & LH_DEBUG_GGML_MATMULS;
    if (h->g != NULL && h->ggml_matmuls != ggml_matmuls) {
        lh_part_graph_free(h);  /* built the other way */
    }
    if (h->g != NULL && h->rows == rows && h->n_nodes == f->n_nodes &&
        memcmp(h->nodes, f->nodes, sizeof(f->nodes[0]) * (size_t) f->n_nodes) == 0) {
        return h;  /* the same llama graph as last time */
    }
    const uint64_t signature = lh_ffn_signature(f);
    if (h->g != NULL && h->rows == rows && h->signature == signature) {
        h->n_nodes = f->n_nodes;  /* a new llama graph with the same FFN */
        memcpy(h->nodes, f->nodes, sizeof(f->nodes[0]) * (size_t) f->n_nodes);
        return h;
    }
    /* The device part's scratch: shared by layers of one shape, allocated once, never moved. */
    struct lh_miss_scratch * scratch = kind == LH_PART_DEV ? lh_miss_scratch_for(ctx, f->layer, f->down->src[2]->ne[0]) : NULL;
    if (kind == LH_PART_DEV && scratch == NULL) {
        return NULL;
    }
    lh_part_graph_free(h);
    struct ggml_init_params params = {
        ggml_tensor_overhead() * (2 * LH_FFN_MAX_NODES + 16) + ggml_graph_overhead_custom(2 * LH_FFN_MAX_NODES + 8, false),
        NULL, true };
    struct lh_layer * layer = &ctx->layers[f->layer];
    struct ggml_tensor * const * matrices = kind == LH_PART_HOT ? layer->slot : kind == LH_PART_COLD ? layer->weight : scratch->matrix;
    h->g = ggml_init(params);
    if (h->g == NULL || !lh_ffn_build_part(ctx, h->g, f, matrices, kind != LH_PART_COLD, rows, true, &h->part)) {
        lh_part_graph_free(h);
        return NULL;
    }
    h->graph = ggml_new_graph_custom(h->g, 2 * LH_FFN_MAX_NODES + 8, false);
    ggml_build_forward_expand(h->graph, h->part.out);
    for (int i = 0; i < ggml_graph_n_nodes(h->graph); i++) {
        for (int j = 0; j < GGML_MAX_SRC; j++) {
            h->experts_used |= ggml_graph_node(h->graph, i)->src[j] == h->part.experts;
        }
    }
    h->buffer = ggml_backend_alloc_ctx_tensors(h->g, kind == LH_PART_COLD ? ctx->cpu : ctx->gpu);
    if (h->buffer == NULL) {
        lh_part_graph_free(h);
        return NULL;
    }
    if (kind != LH_PART_COLD) {
        lh_part_one_upload(&h->part);
    }
    h->scratch = scratch;
    h->rows = rows;
    h->ggml_matmuls = ggml_matmuls;
    h->signature = signature;
    h->n_nodes = f->n_nodes;
    memcpy(h->nodes, f->nodes, sizeof(f->nodes[0]) * (size_t) f->n_nodes);
    return h;
}

/* Staging for a device part: its inputs (input rows, matrix ids and expert ids, `rows` of them), then
 * the first n output rows. */
static size_t lh_part_stage_bytes(const struct lh_ffn_part * part, int64_t n, int64_t rows) {
    return part->inputs_bytes + lh_pad((size_t) n * (ggml_nbytes(part->out) / (size_t) rows));
}

/* Gather n entries' inputs into staging at `at` and upload them to a device part; rows beyond n
 * (padding: computed, never read back) get pad_matrix and the first entry's expert (a valid index
 * for a bias lookup). Returns where the part's first n output rows are to be downloaded. */
static float * lh_upload_part(struct lh_ctx * ctx, const struct lh_ffn_part * part, bool experts_used,
                              const struct ggml_tensor * input, const struct lh_entry * entries, int64_t n, int64_t rows,
                              const int32_t * expert_of, int32_t pad_matrix, bool one_token, char * at) {
    const size_t b_bytes = ggml_nbytes(part->b), i_bytes = ggml_nbytes(part->ids);
    int32_t * matrix_ids = (int32_t *) (at + part->ids_at);
    int32_t * expert_ids = (int32_t *) (at + part->experts_at);
    lh_gather(input, entries, n, one_token, expert_of, (float *) at, matrix_ids, expert_ids);
    for (int64_t i = n; i < rows; i++) {
        matrix_ids[i] = pad_matrix;
        expert_ids[i] = expert_ids[0];
    }
    if (part->one_upload) {
        /* b's header over the span of all three (a header only: ggml bounds a copy by its tensor). */
        struct ggml_tensor span = *part->b;
        const size_t bytes = part->experts_at + i_bytes;
        span.type = GGML_TYPE_I8;
        span.ne[0] = (int64_t) bytes;
        span.ne[1] = span.ne[2] = span.ne[3] = 1;
        span.nb[0] = 1;
        span.nb[1] = span.nb[2] = span.nb[3] = bytes;
        ggml_backend_tensor_set_async(ctx->gpu, &span, at, 0, bytes);
        ctx->counters.gpu_input_copies++;
    } else {
        ggml_backend_tensor_set_async(ctx->gpu, part->b, at, 0, b_bytes);
        ggml_backend_tensor_set_async(ctx->gpu, part->ids, matrix_ids, 0, i_bytes);
        ctx->counters.gpu_input_copies += 2;
        if (experts_used) {
            ggml_backend_tensor_set_async(ctx->gpu, part->experts, expert_ids, 0, i_bytes);
            ctx->counters.gpu_input_copies++;
        }
    }
    return (float *) (at + part->inputs_bytes);
}

/* Copy the experts of the device cold rows into their scratch rows, from pinned host memory (so
 * asynchronously), on the copy stream where there is one (the part waits for copies_done). */
static void lh_copy_dev_experts(struct lh_ctx * ctx, int32_t layer, const struct lh_miss_scratch * scratch, int64_t n_dev) {
    ggml_backend_t copier = ctx->copy_gpu != NULL ? ctx->copy_gpu : ctx->gpu;
    for (int64_t i = 0; i < n_dev; i++) {
        for (int p = 0; p < LH_PROJ_COUNT; p++) {
            const struct ggml_tensor * w = ctx->layers[layer].weight[p];
            if (w != NULL) {
                ggml_backend_tensor_set_async(copier, scratch->matrix[p], (const char *) w->data + ctx->dev_expert_of[i] * w->nb[2],
                                              (size_t) i * w->nb[2], w->nb[2]);
            }
        }
    }
    if (ctx->copy_gpu != NULL) {
        ggml_backend_event_record(ctx->copies_done, ctx->copy_gpu);
    }
}

/* Compute the down node's output (the layer's expert FFN per (token, k)) into dst: hot rows from
 * the slots (launched first when on the GPU), cold rows from the original weights on the CPU. */
static bool lh_compute_ffn(struct lh_ctx * ctx, const struct lh_ffn * f, char * dst) {
    const int64_t setup_start = lh_now_ns();
    const struct ggml_tensor * d = f->down;
    const struct ggml_tensor * ids = d->src[2];
    const int64_t n_tokens = ids->ne[1];
    const int32_t * expert_of = ctx->expert_of_slot ? ctx->expert_of_slot + (size_t) f->layer * ctx->n_slots : NULL;
    const bool has_slots = ctx->layers[f->layer].slot[LH_PROJ_DOWN] != NULL;

    int64_t n_hot, n_cold;
    if (!lh_split_entries(ctx, ids, f->layer, has_slots, &n_hot, &n_cold) || (n_hot > 0 && !lh_wait_fence(ctx, f->layer))) {
        return false;
    }

    const size_t graph_mem = ggml_tensor_overhead() * (4 * LH_FFN_MAX_NODES + 16) + 2 * ggml_graph_overhead_custom(2 * LH_FFN_MAX_NODES + 8, false);
    if (!lh_grow(&ctx->graph_mem, &ctx->graph_mem_size, graph_mem, 1)) {
        return false;
    }
    struct ggml_init_params params = { ctx->graph_mem_size, ctx->graph_mem, true };
    struct ggml_context * g = ggml_init(params);
    struct ggml_cgraph * cpu_graph = ggml_new_graph_custom(g, 2 * LH_FFN_MAX_NODES + 8, false);
    struct ggml_cgraph * gpu_graph = ggml_new_graph_custom(g, 2 * LH_FFN_MAX_NODES + 8, false);
    const bool hot_on_gpu = ctx->gpu != NULL && n_hot > 0;
    const bool one_token = n_tokens == 1 && f->input->ne[1] == 1;
    /* Single-token decode on the GPU: the layer's persistent graph (see lh_part_graph). Its unused
     * rows go to a slot no hot row uses, so every hot row's expert keeps exactly its own rows (a CPU
     * backend picks its kernels by rows per expert; bit-exactness on the emulated device needs it). */
    int32_t pad_slot = -1;
    if (hot_on_gpu && one_token && n_hot < ids->ne[0]) {
        for (int32_t s = 0; s < ctx->n_slots && pad_slot < 0; s++) {
            bool used = false;
            for (int64_t i = 0; i < n_hot && !used; i++) {
                used = ctx->hot[i].matrix == s;
            }
            pad_slot = used ? -1 : s;
        }
    }
    struct lh_part_graph * persistent = hot_on_gpu && one_token && (n_hot == ids->ne[0] || pad_slot >= 0) &&
        !(ctx->debug_flags & LH_DEBUG_CALL_GRAPHS) ? lh_part_graph_get(ctx, f, ids->ne[0], LH_PART_HOT) : NULL;
    /* Single-token decode: a share of the cold rows (the last n_dev cold entries) goes to the device.
     * Their experts are copied into scratch matrices (lh_copy_dev_experts) as soon as the CPU's rows
     * have started, and the layer's persistent graph for that many rows computes them there once the
     * copies are done, while the CPU computes the other cold rows: the DMA engine reads host memory
     * beside the CPU. */
    int64_t n_dev = 0;
    struct lh_part_graph * dev_graph = NULL;
    if (ctx->gpu != NULL && one_token && ctx->cold_on_device > 0.0f && n_cold > 0 &&
        !(ctx->debug_flags & LH_DEBUG_SKIP_COMPUTE)) {
        n_dev = (int64_t) ((float) n_cold * ctx->cold_on_device + 0.5f);  /* rounded; share <= 1 */
        dev_graph = n_dev > 0 ? lh_part_graph_get(ctx, f, n_dev, LH_PART_DEV) : NULL;
        size_t cap = ctx->dev_cold_cap, cap2 = ctx->dev_cold_cap;
        if (dev_graph == NULL || !lh_grow((void **) &ctx->dev_cold, &cap, (size_t) n_dev, sizeof(struct lh_entry)) ||
            !lh_grow((void **) &ctx->dev_expert_of, &cap2, (size_t) n_dev, sizeof(int32_t))) {
            n_dev = 0;  /* the CPU computes them all */
        } else {
            ctx->dev_cold_cap = cap < cap2 ? cap : cap2;
            n_cold -= n_dev;
            for (int64_t i = 0; i < n_dev; i++) {  /* entry i computes from scratch row i */
                ctx->dev_cold[i] = ctx->cold[n_cold + i];
                ctx->dev_expert_of[i] = ctx->dev_cold[i].matrix;
                ctx->dev_cold[i].matrix = (int32_t) i;
            }
        }
    }
    const bool gpu_used = hot_on_gpu || n_dev > 0;
    struct lh_ffn_part hot = {0}, cold = {0};
    bool ok = true;
    /* Single-token decode whose CPU graph is the cold part alone: the layer's persistent cold graph
     * with n_cold rows. */
    struct lh_part_graph * cold_graph = n_cold > 0 && one_token && (hot_on_gpu || n_hot == 0) &&
        !(ctx->debug_flags & LH_DEBUG_CALL_COLD_GRAPHS) ? lh_part_graph_get(ctx, f, n_cold, LH_PART_COLD) : NULL;
    if (ok && cold_graph != NULL) {
        /* Built when fewer threads may have been set: each thread's quantized rows, for all of them. */
        ok = lh_grow(&ctx->sliced_scratch, &ctx->sliced_scratch_size, (size_t) ctx->n_threads * ctx->sliced_stride, 1);
        cold = cold_graph->part;
        ctx->counters.persistent_cpu_runs++;
    } else if (ok && n_cold > 0) {
        ok = lh_ffn_build_part(ctx, g, f, ctx->layers[f->layer].weight, false, n_cold, one_token, &cold);
        ggml_build_forward_expand(cpu_graph, cold.out);
    }
    if (ok && n_hot > 0 && persistent == NULL) {
        ok = lh_ffn_build_part(ctx, g, f, ctx->layers[f->layer].slot, hot_on_gpu, n_hot, one_token, &hot);
        ggml_build_forward_expand(hot_on_gpu ? gpu_graph : cpu_graph, hot.out);
    }
    ok = ok && (ggml_graph_n_nodes(cpu_graph) == 0 || ggml_gallocr_alloc_graph(ctx->cpu_galloc, cpu_graph)) &&
         (ggml_graph_n_nodes(gpu_graph) == 0 || ggml_gallocr_alloc_graph(ctx->gpu_galloc, gpu_graph));
    if (!ok) {
        ggml_free(g);
        return false;
    }
    if (cold_graph != NULL) {
        cpu_graph = cold_graph->graph;
    }

    float * hot_out_rows = NULL, * dev_out_rows = NULL;
    if (n_cold > 0) {
        lh_gather(f->input, ctx->cold, n_cold, one_token, NULL, (float *) cold.b->data, (int32_t *) cold.ids->data,
                  (int32_t *) cold.experts->data);  /* experts: NULL if no bias uses them */
    }
    if (n_hot > 0 && !hot_on_gpu) {
        lh_gather(f->input, ctx->hot, n_hot, one_token, expert_of, (float *) hot.b->data, (int32_t *) hot.ids->data,
                  (int32_t *) hot.experts->data);
        hot_out_rows = (float *) hot.out->data;
    }
    size_t expert_bytes = 0;
    for (int p = 0; p < LH_PROJ_COUNT; p++) {
        const struct ggml_tensor * w = ctx->layers[f->layer].weight[p];
        expert_bytes += w ? w->nb[2] : 0;
    }
    const int64_t cpu_rows = n_cold + (hot_on_gpu ? 0 : n_hot);
    ctx->counters.stop_setup_ns += lh_now_ns() - setup_start;
    /* With a GPU part, the cold rows start first, on the pool's workers (lh_pool_start_early). */
    const int32_t early_threads = gpu_used ? lh_pool_start_early(ctx, cpu_graph, cpu_rows, (size_t) cpu_rows * expert_bytes) : 0;
    /* GPU part first: gather into staging (the hot part's, then the device cold part's), upload,
     * launch, download, all asynchronous. */
    int64_t t0 = lh_now_ns();
    if (n_dev > 0) {
        lh_copy_dev_experts(ctx, f->layer, dev_graph->scratch, n_dev);
    }
    if (gpu_used) {
        const struct lh_ffn_part * hot_part = persistent ? &persistent->part : &hot;
        const int64_t hot_rows = persistent ? persistent->rows : n_hot;
        const size_t hot_bytes = hot_on_gpu ? lh_part_stage_bytes(hot_part, n_hot, hot_rows) : 0;
        char * stage = (char *) lh_staging(ctx, hot_bytes + (n_dev > 0 ? lh_part_stage_bytes(&dev_graph->part, n_dev, n_dev) : 0));
        if (stage == NULL) {
            if (early_threads > 0) {
                lh_pool_run(ctx, ctx->pool, cpu_graph, 0, early_threads, true);  /* join before g goes */
            }
            ggml_free(g);
            return false;
        }
        if (hot_on_gpu) {
            hot_out_rows = lh_upload_part(ctx, hot_part, persistent ? persistent->experts_used : hot.experts->buffer != NULL,
                                          f->input, ctx->hot, n_hot, hot_rows, expert_of, pad_slot, one_token, stage);
        }
        if (persistent != NULL) {
            ok = ggml_backend_graph_compute_async(ctx->gpu, persistent->graph) == GGML_STATUS_SUCCESS;
        }
        if (ok && ggml_graph_n_nodes(gpu_graph) > 0) {
            ok = ggml_backend_graph_compute_async(ctx->gpu, gpu_graph) == GGML_STATUS_SUCCESS;
        }
        ctx->counters.gpu_runs += hot_on_gpu;
        ctx->counters.persistent_gpu_runs += persistent != NULL;
        if (ok && hot_on_gpu) {
            ggml_backend_tensor_get_async(ctx->gpu, hot_part->out, hot_out_rows, 0,
                                          (size_t) n_hot * (ggml_nbytes(hot_part->out) / (size_t) hot_rows));
        }
        if (ok && n_dev > 0) {  /* after the hot part: it computes while the copies finish */
            dev_out_rows = lh_upload_part(ctx, &dev_graph->part, dev_graph->experts_used, f->input, ctx->dev_cold, n_dev, n_dev,
                                          ctx->dev_expert_of, -1, one_token, stage + hot_bytes);
            if (ctx->copy_gpu != NULL) {
                ggml_backend_event_wait(ctx->gpu, ctx->copies_done);
            }
            ok = ggml_backend_graph_compute_async(ctx->gpu, dev_graph->graph) == GGML_STATUS_SUCCESS;
            if (ok) {
                ggml_backend_tensor_get_async(ctx->gpu, dev_graph->part.out, dev_out_rows, 0, ggml_nbytes(dev_graph->part.out));
            }
            ctx->counters.device_cold_rows += n_dev;
            ctx->counters.persistent_dev_runs++;
        }
        const int64_t t1 = lh_now_ns();
        ctx->counters.gpu_submit_ns += t1 - t0;
        t0 = t1;
    }
    ok = lh_finish(ctx, d, cpu_graph, gpu_used, cpu_rows, (size_t) cpu_rows * expert_bytes, t0, ok, early_threads, n_cold, n_cold > 0 ? (const float *) cold.out->data : NULL,
                   n_hot, hot_out_rows, n_dev, dev_out_rows, dst);
    ggml_free(g);
    return ok;
}

/* ---- the callback ------------------------------------------------------------------------- */

static void lh_count_routing(struct lh_ctx * ctx, const struct ggml_tensor * t, int32_t moe_layer, bool managed_ubatch) {
    const struct ggml_tensor * ids = t->src[2];
    if (ids == NULL || ids->type != GGML_TYPE_I32 || ids->buffer == NULL) {
        return;
    }
    struct ggml_tensor ids_on_host;
    if (!ggml_backend_buffer_is_host(ids->buffer)) {
        /* Computed on the GPU (experts in place): read back (the scheduler synchronized before ask=false). */
        const size_t nbytes = ggml_nbytes(ids);
        size_t cap = ctx->ids_cap;
        if (!lh_grow((void **) &ctx->ids_copy, &cap, nbytes / sizeof(int32_t) + 1, sizeof(int32_t))) {
            return;
        }
        ctx->ids_cap = cap;
        ggml_backend_tensor_get(ids, ctx->ids_copy, 0, nbytes);
        ids_on_host = *ids;
        ids_on_host.data = ctx->ids_copy;
        ids = &ids_on_host;
    }
    const int64_t n_used = ids->ne[0];
    const int64_t n_tokens = ids->ne[1];
    int64_t * row = ctx->counts + (size_t) moe_layer * (size_t) ctx->n_expert;
    int64_t * last = ctx->last_routed + (size_t) moe_layer * (size_t) ctx->n_expert;
    const int32_t * slot_of = ctx->slot_of_expert + (size_t) moe_layer * (size_t) ctx->n_expert;
    if (moe_layer == 0) {  /* the first MoE layer sees every token of the ubatch */
        ctx->ubatch_base = ctx->token_clock;
        ctx->token_clock += n_tokens;
    }
    int64_t hits = 0;
    for (int64_t tok = 0; tok < n_tokens; tok++) {
        for (int64_t k = 0; k < n_used; k++) {
            const int32_t e = lh_routed_expert(ids, k, tok);
            if (e >= 0 && e < ctx->n_expert) {
                row[e]++;
                last[e] = ctx->ubatch_base + tok + 1;
                hits += slot_of[e] >= 0;
            }
        }
    }
    if (managed_ubatch) {
        ctx->hits[moe_layer] += hits;
        ctx->misses[moe_layer] += n_used * n_tokens - hits;
    }
    ctx->counters.managed_nodes++;
    if (moe_layer == 0) {
        ctx->counters.ubatches++;
        ctx->counters.tokens += n_tokens;
    }
}

/* Small ubatches with slots are redirected (or shadowed); the rest is only observed. */
static bool lh_wants_redirect(const struct lh_ctx * ctx, const struct ggml_tensor * t,
                              const struct lh_weight_entry * e) {
    if (ctx->cpu == NULL || ctx->slot_kind == LH_SLOTS_IN_PLACE || t->ne[2] > ctx->prefill_bypass ||
        e->offload_copy || !lh_redirectable(t)) {
        return false;
    }
    return ctx->layers[e->moe_layer].n_published > 0 || (ctx->debug_flags & LH_DEBUG_SHADOW);
}

/* Shadow mode: llama computed node t; recompute it (per node, or the whole FFN when t is the
 * down node of a recognised FFN) into a NaN-filled buffer and compare every row bitwise. */
static void lh_shadow_compare(struct lh_ctx * ctx, const struct ggml_tensor * t, int32_t layer, int32_t proj, const struct lh_ffn * ffn) {
    const size_t n = (size_t) (t->nb[2] / sizeof(float)) * (size_t) t->ne[2];
    size_t cap = ctx->shadow_cap;
    if (!lh_grow((void **) &ctx->shadow_out, &cap, n, sizeof(float))) {
        return;
    }
    ctx->shadow_cap = cap;
    for (size_t i = 0; i < n; i++) {
        ctx->shadow_out[i] = NAN;
    }
    bool ok;
    if (ffn != NULL) {
        struct lh_ffn copy = *ffn;
        if (ctx->shadow_input_of == ffn->input) {
            copy.input = &ctx->shadow_input_view;
        }
        ctx->shadow_input_of = NULL;
        ok = lh_compute_ffn(ctx, &copy, (char *) ctx->shadow_out);
    } else {
        ok = lh_compute_node(ctx, t, layer, proj, (char *) ctx->shadow_out);
    }
    const size_t row = (size_t) t->ne[0] * sizeof(float);
    for (int64_t tok = 0; tok < t->ne[2]; tok++) {
        for (int64_t k = 0; k < t->ne[1]; k++) {
            const size_t off = (size_t) (k * t->nb[1] + tok * t->nb[2]);
            ctx->counters.shadow_rows++;
            if (!ok || memcmp((const char *) t->data + off, (const char *) ctx->shadow_out + off, row) != 0) {
                ctx->counters.shadow_mismatches++;
            }
        }
    }
}

/* Shadow mode, whole-FFN: keep the layer input the gate/up matmul `t` has just read. */
static void lh_shadow_keep_input(struct lh_ctx * ctx, const struct ggml_tensor * t) {
    const struct ggml_tensor * input = t->src[1];
    const size_t n = ggml_nbytes(input);
    size_t cap = ctx->shadow_input_cap;
    if (!lh_grow(&ctx->shadow_input, &cap, n, 1)) {
        return;
    }
    ctx->shadow_input_cap = cap;
    memcpy(ctx->shadow_input, input->data, n);
    ctx->shadow_input_view = *input;
    ctx->shadow_input_view.data = ctx->shadow_input;
    ctx->shadow_input_of = input;
}

static void lh_poison(struct ggml_tensor * t) {
    for (int64_t tok = 0; tok < t->ne[2]; tok++) {
        for (int64_t k = 0; k < t->ne[1]; k++) {
            float * row = (float *) ((char *) t->data + k * t->nb[1] + tok * t->nb[2]);
            for (int64_t i = 0; i < t->ne[0]; i++) {
                row[i] = NAN;
            }
        }
    }
}

/* Compute a skipped node (or, with ffn, the skipped FFN ending at it) into its output. */
static void lh_redirect(struct lh_ctx * ctx, struct ggml_tensor * t, int32_t layer, int32_t proj, const struct lh_ffn * ffn) {
    const int64_t start = lh_now_ns();
    if (ctx->debug_flags & LH_DEBUG_POISON) {
        lh_poison(t);
    }
    ctx->error[0] = '\0';
    if (ctx->debug_flags & LH_DEBUG_SKIP_COMPUTE) {
        ctx->counters.ffn_redirects += ffn != NULL;
    } else if (ffn ? lh_compute_ffn(ctx, ffn, (char *) t->data) : lh_compute_node(ctx, t, layer, proj, (char *) t->data)) {
        ctx->counters.redirected_nodes += ffn ? lh_layer_weight_count(ctx, layer) : 1;
        ctx->counters.ffn_redirects += ffn != NULL;
    } else {
        fprintf(stderr, "llamahot: could not compute %s (%s); its output is invalid\n", t->name,
                ctx->error[0] ? ctx->error : "out of memory?");
    }
    ctx->counters.redirect_ns += lh_now_ns() - start;
}

/* At the down node's ask: recognise the layer's FFN so it can be computed in one stop. */
static bool lh_try_ffn(struct lh_ctx * ctx, struct ggml_tensor * t, int32_t layer) {
    if (ctx->ffn_mode[layer] < 0) {
        return false;
    }
    if (!lh_ffn_find(ctx, &ctx->ffn, t, layer)) {
        ctx->ffn_mode[layer] = -1;  /* llama built something else here: per-node redirects from now on */
        return false;
    }
    ctx->ffn_mode[layer] = 1;
    return true;
}

int32_t lh_restore(struct lh_ctx * ctx) {
    int32_t restored = 0;
    if (ctx->ffn_pending) {
        restored += ctx->ffn.n_mutated;
        lh_ffn_restore(ctx, &ctx->ffn);
        ctx->ffn_pending = false;
    }
    if (ctx->pending != NULL) {
        ctx->pending->op = ctx->pending_op;
        ctx->pending = NULL;
        ctx->counters.open_mutations--;
        restored++;
    }
    ctx->user_wanted = false;
    return restored;
}

/* Whole-FFN mode for this layer: one stop at the down node. Not with an application's callback
 * (it may stop the run between gate/up and down), nor in per-node debug mode, nor where llama
 * built an FFN the shim does not recognise. */
static bool lh_ffn_mode(const struct lh_ctx * ctx, int32_t layer) {
    return ctx->user_cb == NULL && !(ctx->debug_flags & LH_DEBUG_PER_NODE) && ctx->ffn_mode[layer] >= 0;
}

static bool lh_callback(struct lh_ctx * ctx, struct ggml_tensor * t, bool ask);

bool lh_eval_callback(struct ggml_tensor * t, bool ask, void * user_data) {
    struct lh_ctx * ctx = (struct lh_ctx *) user_data;
    if (!(ctx->debug_flags & LH_DEBUG_TIMELINE)) {
        return lh_callback(ctx, t, ask);
    }
    lh_record(ctx, t, ask ? 1 : 0);
    const bool answer = lh_callback(ctx, t, ask);
    if (!ask) {
        lh_record(ctx, t, 2);
    }
    return answer;
}

/* Experts in place, one single-token decode read in observe_every: a decode that is not read but still has the
 * callback (an application's is chained, or llama.cpp built a new graph and installed it again) stops once,
 * after the first node of each device split. Why: ggml-cuda keeps one CUDA graph per run of nodes, keyed by
 * the run's first node. A decode that is read runs its split in pieces (a stop per MoE layer) whose first
 * piece also starts at the split's first node, so each read made the whole split's graph be captured and
 * instantiated again on the steps after it (~10 ms a read on the H100, session 21). With this stop the big
 * run of an unread decode starts one node later: a key no piece of a read one has. A split starts where the
 * nodes' buffer type changes (the scheduler asks about nodes in order; lh_before_decode resets the last). */
static bool lh_stop_at_split_start(struct lh_ctx * ctx, const struct ggml_tensor * t) {
    if (!ctx->unread_decode || t->buffer == NULL) {
        return false;
    }
    const ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(t->buffer);
    const bool split_start = buft != ctx->last_ask_buft;
    ctx->last_ask_buft = buft;
    return split_start && !ggml_backend_buft_is_host(buft) && !(ctx->debug_flags & LH_DEBUG_NO_SPLIT_START_STOPS) &&
           t->op != GGML_OP_MUL_MAT_ID;
}

/* llama_context::get_sched() const, exported by libllama (C++: `this` is the one argument). */
typedef ggml_backend_sched_t (*lh_get_sched_fn)(const void * llama_ctx);

static lh_get_sched_fn lh_get_sched(void) {
    static lh_get_sched_fn fn;
    static bool looked;
    if (!looked) {
        /* The libraries are global (llamahot._shim loads them so); a libllama without it keeps the callback. */
        *(void **) &fn = dlsym(RTLD_DEFAULT, "_ZNK13llama_context9get_schedEv");
        looked = true;
    }
    return fn;
}

int32_t lh_before_decode(struct lh_ctx * ctx, void * llama_ctx, int32_t n_tokens) {
    if (ctx->slot_kind != LH_SLOTS_IN_PLACE) {
        return 0;
    }
    ctx->last_ask_buft = NULL;
    const int64_t period = (int64_t) ctx->observe_every * ctx->observe_burst;
    ctx->unread_decode = ctx->observing && ctx->observe_every > 1 && n_tokens == 1 &&
                         ctx->single_decodes++ % period >= ctx->observe_burst;
    const lh_get_sched_fn get_sched = lh_get_sched();
    ggml_backend_sched_t sched = get_sched != NULL && llama_ctx != NULL ? get_sched(llama_ctx) : NULL;
    if (sched == NULL) {
        return 0;
    }
    /* Nothing of in place needs the callback but reading the routing: an unread decode computes the same
     * either way (the experts are where llama.cpp put them). */
    const bool unhook = ctx->unread_decode && ctx->user_cb == NULL &&
                        !(ctx->debug_flags & (LH_DEBUG_STAY_HOOKED | LH_DEBUG_TIMELINE));
    ggml_backend_sched_set_eval_callback(sched, unhook ? NULL : lh_eval_callback, unhook ? NULL : ctx);
    ctx->counters.unhooked_decodes += unhook;
    return unhook;
}

static bool lh_callback(struct lh_ctx * ctx, struct ggml_tensor * t, bool ask) {
    if (ask) {
        ctx->user_wanted = ctx->user_cb != NULL && ctx->user_cb(t, true, ctx->user_ud);
        if (lh_stop_at_split_start(ctx, t)) {
            ctx->counters.split_start_stops++;
            return true;
        }
        const struct lh_weight_entry * e = lh_managed(ctx, t);
        if (e == NULL) {
            return ctx->user_wanted;
        }
        if (ctx->unread_decode) {
            /* Experts in place, a single-token decode not read (its stops would cost the GPU a sync each). */
            return ctx->user_wanted;
        }
        const bool shadow = ctx->debug_flags & LH_DEBUG_SHADOW;
        if (lh_wants_redirect(ctx, t, e)) {
            /* Whole-FFN mode: gate/up run on untouched (their nodes are skipped at the down node's
             * ask, before the run that contains them is computed); one stop, at the down node. */
            const bool ffn_mode = lh_ffn_mode(ctx, e->moe_layer);
            if (ffn_mode && e->proj != LH_PROJ_DOWN) {
                return shadow;  /* shadow: stop after it to keep the layer input (ask=false) */
            }
            if (ffn_mode && lh_try_ffn(ctx, t, e->moe_layer)) {
                if (!shadow) {
                    lh_ffn_skip(ctx, &ctx->ffn);
                }
                ctx->ffn_pending = true;
                return true;
            }
            if (!shadow) {
                /* Only this: inputs are not computed yet and t->data may alias earlier nodes. */
                ctx->pending = t;
                ctx->pending_op = t->op;
                t->op = GGML_OP_NONE;
                ctx->counters.open_mutations++;
            }
            return true;
        }
        return e->proj == LH_PROJ_DOWN || ctx->user_wanted;
    }

    /* ask=false: the scheduler computed every node up to and including t. */
    if (ctx->ffn_pending && ctx->ffn.down == t) {
        ctx->ffn_pending = false;
        lh_ffn_restore(ctx, &ctx->ffn);
        const int32_t layer = ctx->ffn.layer;
        if (ctx->debug_flags & LH_DEBUG_SHADOW) {
            lh_shadow_compare(ctx, t, layer, LH_PROJ_DOWN, &ctx->ffn);
        } else {
            lh_redirect(ctx, t, layer, LH_PROJ_DOWN, &ctx->ffn);
        }
        lh_count_routing(ctx, t, layer, true);
    } else if (ctx->pending == t) {
        t->op = ctx->pending_op;
        ctx->pending = NULL;
        ctx->counters.open_mutations--;
        const struct lh_weight_entry * e = lh_managed(ctx, t);
        lh_redirect(ctx, t, e->moe_layer, e->proj, NULL);
        if (e->proj == LH_PROJ_DOWN) {
            lh_count_routing(ctx, t, e->moe_layer, true);
        }
    } else {
        const struct lh_weight_entry * e = ctx->unread_decode ? NULL : lh_managed(ctx, t);
        if (e != NULL) {
            /* (a ubatch llama.cpp offloaded to the GPU is not the slots' to hit or miss) */
            const bool managed_ubatch = ctx->cpu != NULL && t->ne[2] <= ctx->prefill_bypass && !e->offload_copy;
            if (ctx->debug_flags & LH_DEBUG_SHADOW && lh_wants_redirect(ctx, t, e)) {
                if (e->proj != LH_PROJ_DOWN && lh_ffn_mode(ctx, e->moe_layer)) {
                    lh_shadow_keep_input(ctx, t);   /* compared as a whole FFN at the down node */
                } else {
                    lh_shadow_compare(ctx, t, e->moe_layer, e->proj, NULL);
                }
            }
            if (e->proj == LH_PROJ_DOWN) {
                lh_count_routing(ctx, t, e->moe_layer, managed_ubatch);
            }
        }
    }
    if (ctx->user_wanted) {
        ctx->user_wanted = false;
        return ctx->user_cb(t, false, ctx->user_ud);
    }
    return true;
}
