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

/* Cumulative counters, read by Python between decode calls. */
struct lh_counters {
    int64_t ubatches;        /* ubatches that reached the first MoE layer */
    int64_t tokens;          /* tokens of those ubatches */
    int64_t managed_nodes;   /* managed MUL_MAT_ID nodes seen at ask=false */
    int64_t weights_known;   /* distinct routed-expert weights recognised so far */
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

/* The callback to install as llama_context_params.cb_eval, with the lh_ctx as cb_eval_user_data. */
bool lh_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);

/* Routed-expert counts, int64 [n_moe_layers][n_expert], owned by ctx. */
int64_t * lh_routing_counts(struct lh_ctx * ctx);
void      lh_get_counters(const struct lh_ctx * ctx, struct lh_counters * out);
void      lh_reset_counters(struct lh_ctx * ctx);

/* The ggml version the shim was compiled against (from the vendored headers). */
const char * lh_built_ggml_version(void);

/* cdef-end */

#ifdef __cplusplus
}
#endif

#endif
