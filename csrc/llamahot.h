/* llamahot shim: mechanism only.
 *
 * The shim owns llama.cpp's scheduler eval callback (one slot per context) and recognises the
 * routed-expert MUL_MAT_ID nodes of a MoE model by their weight tensor. Python creates one
 * lh_ctx per llama context, passes lh_eval_callback + the lh_ctx as cb_eval/cb_eval_user_data,
 * and reads the counters as plain arrays. No policy here, no callbacks into Python per node.
 */
#ifndef LLAMAHOT_H
#define LLAMAHOT_H

#include <stdbool.h>
#include <stdint.h>

#include "ggml.h"
#include "ggml-backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin: from here to cdef-end, the API is also read by cffi (llamahot/_build_shim.py). */

/* Projection of a routed-expert weight, parsed from its name "blk.N.ffn_<proj>_exps.weight". */
enum lh_proj {
    LH_PROJ_GATE = 0,
    LH_PROJ_UP = 1,
    LH_PROJ_DOWN = 2,
    LH_PROJ_GATE_UP = 3,
    LH_PROJ_COUNT = 4,
};

/* Where slots live and hot work runs. */
enum lh_slot_kind {
    LH_SLOTS_HOST = 0,   /* CPU, in each weight's own buffer type: bit-exact, for tests and CI */
    LH_SLOTS_GPU = 1,    /* the first GPU device of ggml's registry (CUDA), standard layout */
    LH_SLOTS_EMULATED_GPU = 2, /* test-only: a second CPU backend standing in for the GPU, so the GPU
                                  code path (device buffers, async copies, device graphs) runs in CI */
    LH_SLOTS_IN_PLACE = 3, /* no slot memory: the experts stay in the model's own buffers (CUDA managed
                              memory) and llama.cpp computes every expert; the slot maps only say which
                              experts are resident in VRAM (hit counting), the callback only observes
                              routing, and the caller moves the pages */
};

/* Test-only checks. */
enum lh_debug_flags {
    LH_DEBUG_POISON = 1, /* fill a redirected node's output with NaN before writing it */
    LH_DEBUG_SHADOW = 2, /* let llama compute managed nodes, recompute them, compare every row */
    LH_DEBUG_PER_NODE = 4, /* redirect every expert matmul on its own (the fallback path) */
    LH_DEBUG_SKIP_COMPUTE = 8, /* benchmarks only: stop and skip as usual but compute nothing (the
                                  output is left as it was): the cost floor of the stops themselves */
    LH_DEBUG_TIMELINE = 16, /* record every callback (lh_timeline) to see where a token's time goes */
    LH_DEBUG_CALL_GRAPHS = 32, /* benchmarks: build the hot part's device graph per call, never the
                                  layer's persistent one (to measure what the persistent graph saves) */
    LH_DEBUG_GGML_MATMULS = 64, /* benchmarks: ggml's MUL_MAT_ID in single-token CPU graphs, never the
                                   shim's row-sliced node (to measure what the sliced node saves) */
    LH_DEBUG_ALL_THREADS = 128, /* tests: every stop's CPU graph on all threads, however little it reads
                                   (small fixtures would otherwise run on one) */
    LH_DEBUG_COLD_AFTER_SUBMIT = 256, /* benchmarks: a stop's cold rows start on the shim's threads only
                                         after the hot part is submitted to the GPU, the caller computing
                                         its share (to measure what starting them first saves) */
    LH_DEBUG_CALL_COLD_GRAPHS = 512, /* benchmarks: build a single-token stop's cold CPU graph per call, never
                                        the layer's persistent one (to measure what replaying it saves) */
    LH_DEBUG_SERIAL_ELEMENTWISE = 1024, /* benchmarks: the element-wise nodes between a pool graph's sliced
                                           matmuls (the GLU) on one thread between two barriers, never each
                                           thread's own slice (to measure what co-slicing saves) */
    LH_DEBUG_NO_SPLIT_START_STOPS = 2048, /* benchmarks: experts in place, unread steps run each device split
                                             in one piece (to measure what split_start_stops save) */
    LH_DEBUG_STAY_HOOKED = 4096, /* benchmarks: experts in place, unread steps keep the callback installed
                                    (lh_before_decode never removes it: to measure what removing it saves) */
};

/* Callbacks timeline mode keeps (a ring of the latest). */
enum { LH_TIMELINE_CAP = 65536 };

/* One callback seen in timeline mode: when, for which node, and which call. */
struct lh_event {
    int64_t t_ns;      /* monotonic clock */
    int32_t op;        /* the node's ggml_op */
    int8_t kind;       /* 1: ask, 0: answer (ask=false) begins, 2: answer ends */
    int8_t host;       /* the node's buffer is host memory (a CPU split), else device */
    int16_t unused;
    char name[32];     /* the node's name, truncated */
};

/* Cumulative counters, read by Python between decode calls. */
struct lh_counters {
    int64_t ubatches;          /* ubatches that reached the first MoE layer */
    int64_t tokens;            /* tokens of those ubatches */
    int64_t managed_nodes;     /* managed MUL_MAT_ID nodes seen at ask=false */
    int64_t weights_known;     /* distinct routed-expert weights recognised so far */
    int64_t redirected_nodes;  /* expert matmul nodes computed by the shim from slots + original weights */
    int64_t ffn_redirects;     /* ... of which in whole-FFN mode: layers computed in one stop */
    int64_t gpu_runs;          /* redirects (a layer's FFN or one node) whose hot part ran on the device */
    int64_t persistent_gpu_runs; /* ... of which in the layer's persistent graph (single-token decode) */
    int64_t persistent_cpu_runs; /* single-token stops whose cold part ran the layer's persistent CPU graph
                                    for that many rows (no graph built or allocated) */
    int64_t gpu_input_copies;  /* host-to-device copies of those runs' inputs (rows, slot and expert
                                  ids): one per persistent run, whose inputs lie together */
    int64_t device_cold_rows;  /* cold (token, k) rows computed on the device (lh_set_cold_on_device) */
    int64_t persistent_dev_runs; /* stops whose device cold rows ran the layer's persistent graph for that
                                    many rows, their experts copied on a stream of their own (CUDA) */
    int64_t cpu_runs;          /* redirects whose CPU graph ran (each pays the threads' start and barriers) */
    int64_t cpu_rows;          /* (token, k) rows those CPU graphs computed */
    int64_t lone_row_runs;     /* ... of which single rows run on one thread (lh_set_lone_row_idle_ns) */
    int64_t sliced_matmuls;    /* expert matmuls of single-token CPU graphs computed as the shim's row-sliced node */
    int64_t sliced_graphs;     /* CPU graphs that ran sliced nodes, and when their threads first entered one,
                                  summed (ns after the graph's compute began): the first and the last thread */
    int64_t first_thread_in_ns;
    int64_t last_thread_in_ns;
    /* ... and for their k-th sliced node (gate, up, down), when the last thread entered and left it. */
    int64_t sliced_node_last_in_ns[4];
    int64_t sliced_node_last_out_ns[4];
    int64_t pool_graphs;       /* stops' CPU graphs run on the shim's own threads (lh_set_pool) */
    int64_t co_sliced_nodes;   /* ... their element-wise nodes each thread computed on its own slices */
    int64_t early_pool_graphs; /* ... of which started before the hot part's GPU submission: the workers
                                  compute the cold rows while the caller submits */
    int64_t fence_waits;       /* stops that waited for copies into their layer's slots (lh_set_fence) */
    int64_t row_prefetch_bytes; /* bytes the sliced matmuls' threads prefetched ahead of their rows */
    int64_t open_mutations;    /* nodes whose op is changed right now: 0 between decodes */
    int64_t split_start_stops; /* experts in place, unread ubatches: stops after a device split's first node
                                  (keeps llama.cpp's CUDA graph of the rest apart from a read ubatch's) */
    int64_t unhooked_decodes;  /* experts in place: unread decodes run without the callback (lh_before_decode) */
    int64_t shadow_rows;       /* rows compared in shadow mode */
    int64_t shadow_mismatches; /* rows that differed (bitwise) in shadow mode */
    /* Where the time of redirected nodes goes (nanoseconds, CLOCK_MONOTONIC). */
    int64_t redirect_ns;       /* all of it: split, launch, compute, wait, scatter */
    int64_t cpu_compute_ns;    /* the shim's CPU graph (cold part; hot part too on host slots); an early
                                  pool graph's includes the GPU submission made meanwhile */
    int64_t gpu_submit_ns;     /* uploading inputs and launching the hot part on the GPU */
    int64_t gpu_wait_ns;       /* waiting for the GPU after the CPU part finished */
    int64_t dev_copy_wait_ns;  /* ... of which for the device cold rows' expert copies (CUDA; the rest is
                                  their graph, the hot part and the downloads) */
    int64_t fence_wait_ns;     /* waiting for slot copies before a stop reads its slots (in redirect_ns) */
    int64_t stop_setup_ns;     /* a layer's stop before its GPU part or CPU graph starts: split, fence,
                                  graphs built and allocated, inputs gathered (in redirect_ns) */
    /* The stops' CPU graphs by their number of (token, k) rows (index 8: 8 or more) and the time
     * they took: what a graph costs whatever its size, and what each row adds. */
    int64_t cpu_runs_by_rows[9];
    int64_t cpu_ns_by_rows[9];
};

struct lh_ctx;

/* blk_to_moe[b] is the MoE-layer index of block b, or -1 for a block without routed experts. */
struct lh_ctx * lh_ctx_new(int32_t n_blocks, const int32_t * blk_to_moe, int32_t n_moe_layers, int32_t n_expert);
void            lh_ctx_free(struct lh_ctx * ctx);

/* Chain an application's eval callback: it sees every node it asks for, as if it were alone. */
void lh_set_user_callback(struct lh_ctx * ctx, ggml_backend_sched_eval_callback cb, void * user_data);

/* Observing (the default) stops the graph after each MoE layer's down projection to count its
 * routing. Off, the callback stays installed but never stops: it costs only the scheduler's per-node asks. */
void lh_set_observing(struct lh_ctx * ctx, bool observing);
/* Experts in place (LH_SLOTS_IN_PLACE): observe one single-token decode in n (1, the default: all), so
 * the routing stops cost the decode 1/n as much, `burst` consecutive ones in every n * burst (a read next to
 * unread decodes costs llama.cpp's CUDA graphs a capture, see lh_before_decode); larger decodes are always
 * observed. Which decodes are read is decided by lh_before_decode: without it, every one is. -1 (see
 * lh_last_error) for n < 1, burst < 1, or n > 1 with slots that redirect. */
int32_t lh_set_observe_every(struct lh_ctx * ctx, int32_t n, int32_t burst);
/* Experts in place: call before each llama_decode (or before the decodes of one eval) of n_tokens tokens on
 * llama_ctx, the context whose cb_eval is this ctx. It decides whether the decode is read (observe_every)
 * and, for a single-token one that is not, removes the callback from llama_ctx's scheduler for it, so the
 * decode runs as stock does: llama.cpp's CUDA backend then replays its graph of each split without
 * comparing every node's properties, which it must do for every run a callback cuts. Any other decode
 * puts the callback back (llama.cpp also does at each graph it builds). (A read decode's first piece
 * shares its CUDA graph key, the split's first node, with an unread decode's whole split, so the first
 * unread decode after reads runs without a graph and the next captures it again: hence bursts.) Not with
 * an application's callback chained (it wants every decode). Returns 1 when the callback was removed,
 * else 0; other slot kinds: 0, nothing done. The scheduler is found through libllama's exported
 * llama_context::get_sched; without it the callback stays. */
int32_t lh_before_decode(struct lh_ctx * ctx, void * llama_ctx, int32_t n_tokens);

/* The callback to install as llama_context_params.cb_eval, with the lh_ctx as cb_eval_user_data. */
bool lh_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);

/* Routed-expert counts, int64 [n_moe_layers][n_expert], owned by ctx. */
int64_t * lh_routing_counts(struct lh_ctx * ctx);
/* Hot-slot hits and misses of managed ubatches (<= prefill_bypass tokens), int64 [n_moe_layers]. */
int64_t * lh_hits(struct lh_ctx * ctx);
int64_t * lh_misses(struct lh_ctx * ctx);
/* Recency, int64 [n_moe_layers][n_expert]: the token (1-based, counted since creation or the last
 * lh_reset_counters) at which each expert was last routed to; 0 = never. (The last MoE layer routes
 * only the rows whose logits are wanted.) */
int64_t * lh_last_routed(struct lh_ctx * ctx);
/* Published slot maps: int32 [n_moe_layers][n_expert] (slot or -1) and [n_moe_layers][n_slots] (expert or -1). */
int32_t * lh_slot_of_expert(struct lh_ctx * ctx);
int32_t * lh_expert_of_slot(struct lh_ctx * ctx);
void      lh_get_counters(const struct lh_ctx * ctx, struct lh_counters * out);
void      lh_reset_counters(struct lh_ctx * ctx);

/* Number of routed-expert weights recognised for a MoE layer (its projections). */
int32_t lh_layer_weight_count(const struct lh_ctx * ctx, int32_t layer);

/* Allocate n_slots slots per MoE layer on the slot device and enable redirection of ubatches of at
 * most prefill_bypass tokens. Needs every layer's weights recognised (one decode ran). 0 on success;
 * otherwise the reason is in lh_last_error(). n_threads: CPU threads for cold experts. */
int32_t lh_slots_init(struct lh_ctx * ctx, int32_t kind, int32_t n_slots, int32_t prefill_bypass, int32_t n_threads);
/* Replace every layer's slots by n_slots empty ones (all unpublished). No copy may be in flight. */
int32_t lh_slots_resize(struct lh_ctx * ctx, int32_t n_slots);
const char * lh_last_error(const struct lh_ctx * ctx);
/* Bytes of slot memory per MoE layer (all projections), after lh_slots_init. */
size_t lh_slot_bytes_per_layer(const struct lh_ctx * ctx);

/* One expert's slab of one projection: source in the weight (host memory), destination in the slot
 * (host or device memory). Same size; for copies driven from Python (cudaMemcpyAsync). */
int32_t lh_expert_slab(const struct lh_ctx * ctx, int32_t layer, int32_t proj, int32_t expert, void ** src, size_t * nbytes);
int32_t lh_slot_slab(const struct lh_ctx * ctx, int32_t layer, int32_t proj, int32_t slot, void ** dst, size_t * nbytes);
/* The backend buffer that holds a recognised routed-expert weight: its base and size. */
int32_t lh_weight_buffer(const struct lh_ctx * ctx, int32_t layer, int32_t proj, void ** base, size_t * size);
/* Copy an expert into a slot now (all projections), synchronously. The slot must be unpublished. */
int32_t lh_slot_load(struct lh_ctx * ctx, int32_t layer, int32_t slot, int32_t expert);
/* A slot serves its expert only while published: publish after its copy completed (or, with a fence,
 * once it was issued), unpublish before overwriting it. */
int32_t lh_slot_publish(struct lh_ctx * ctx, int32_t layer, int32_t slot, int32_t expert);
int32_t lh_slot_unpublish(struct lh_ctx * ctx, int32_t layer, int32_t slot);
/* Asynchronous loads: publish a slot as soon as its copy is issued and give its layer a fence (e.g.
 * a CUDA event recorded after the layer's copies; it replaces the layer's previous one). Before the
 * layer's slots are next read, the shim calls wait(fence) once (0: the copies completed); if wait
 * fails, the stop fails. The waiter is set first; a NULL fence clears the layer's. */
void lh_set_fence_waiter(struct lh_ctx * ctx, int32_t (*wait)(void * fence));
int32_t lh_set_fence(struct lh_ctx * ctx, int32_t layer, void * fence);

void lh_set_debug(struct lh_ctx * ctx, int32_t flags);

/* CPU threads of the shim's own graphs (set at lh_slots_init; e.g. after llama_set_n_threads). */
void lh_set_n_threads(struct lh_ctx * ctx, int32_t n_threads);
/* A stop whose CPU graph computes a single row runs it on one thread when the shim ran no
 * multi-threaded graph for idle_ns (its threads may be asleep). 0 (default): off. */
void lh_set_lone_row_idle_ns(struct lh_ctx * ctx, int64_t idle_ns);

/* Run single-token stops' CPU graphs (sliced expert matmuls and element-wise nodes) on threads of the
 * shim's own, started on first use (as many as the stop's threads, the caller included), instead of
 * ggml's graph compute: idle threads spin for spin_ns, then sleep until the next stop. spin_ns < 0
 * (default): off, and the threads are joined. Bit-exact (the same kernels on the same rows). */
void lh_set_pool(struct lh_ctx * ctx, int64_t spin_ns);

/* The row-sliced expert matmuls of single-token CPU graphs: each thread prefetches `bytes` ahead of the
 * rows it computes, across its slices of the node's experts (0: off, the hardware prefetchers alone).
 * Default LH_ROW_PREFETCH_DEFAULT. Returns -1 (see lh_last_error) outside 0..LH_ROW_PREFETCH_MAX. */
enum { LH_ROW_PREFETCH_DEFAULT = 4096, LH_ROW_PREFETCH_MAX = 1048576 };
int32_t lh_set_row_prefetch(struct lh_ctx * ctx, int64_t bytes);

/* Single-token decode with device slots: this share (0..1, default 0) of a stop's cold experts is
 * copied to the device and computed there while the CPU computes the rest. Returns -1 (see
 * lh_last_error) for a share outside 0..1 or, above 0, without device slots. */
int32_t lh_set_cold_on_device(struct lh_ctx * ctx, float share);
/* Timeline mode: the events recorded since the last call (at most capacity, oldest dropped first);
 * returns how many were copied to out, and starts a new recording. */
int32_t lh_timeline(struct lh_ctx * ctx, struct lh_event * out, int32_t capacity);

/* Undo graph changes a computation left behind (one aborted between a node's ask and its answer):
 * call after every decode. Returns how many nodes it restored (0 normally). */
int32_t lh_restore(struct lh_ctx * ctx);

/* Self-check of co-slicing (tests): every GLU kind of ggml on `rows` rows of n pseudo-random floats,
 * computed whole by ggml's graph compute and slice by slice as a pool's threads compute it, for teams
 * of 1 to max_team threads. Returns the elements whose bits differ (0: co-slicing is exact on this
 * CPU), or -1 if ggml could not run it or the kernels are not exported. */
int64_t lh_check_co_slicing(int32_t n, int32_t rows, int32_t max_team);

/* The ggml version the shim was compiled against (from the vendored headers). */
const char * lh_built_ggml_version(void);

/* cdef-end */

#ifdef __cplusplus
}
#endif

#endif
