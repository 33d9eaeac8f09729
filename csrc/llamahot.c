/* llamahot shim: see llamahot.h. */
#include "llamahot.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef LH_GGML_VERSION
#error "LH_GGML_VERSION must be defined by the build (the vendored ggml version)"
#endif

/* One recognised MUL_MAT_ID weight (or a tensor known not to be one: moe_layer = -1). */
struct lh_weight_entry {
    const struct ggml_tensor * key;
    int32_t moe_layer;
    int32_t proj;
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

    int64_t * counts;              /* [n_moe_layers][n_expert] */
    struct lh_counters counters;

    bool observing;                /* false: the callback stays installed but never stops the graph */

    ggml_backend_sched_eval_callback user_cb;
    void * user_ud;
    bool user_wanted;              /* the user's answer at ask=true for the node now pending */
};

static uint32_t lh_hash_ptr(const void * p) {
    uint64_t x = (uint64_t) (uintptr_t) p;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (uint32_t) x;
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
    ctx->blk_to_moe = malloc(sizeof(int32_t) * (size_t) n_blocks);
    uint32_t cap = 64;
    while (cap < (uint32_t) n_blocks * LH_PROJ_COUNT * 4u) {
        cap <<= 1;
    }
    ctx->table_cap = cap;
    ctx->table = calloc(cap, sizeof(struct lh_weight_entry));
    ctx->counts = calloc((size_t) n_moe_layers * (size_t) n_expert, sizeof(int64_t));
    if (!ctx->blk_to_moe || !ctx->table || !ctx->counts) {
        lh_ctx_free(ctx);
        return NULL;
    }
    memcpy(ctx->blk_to_moe, blk_to_moe, sizeof(int32_t) * (size_t) n_blocks);
    ctx->observing = true;
    return ctx;
}

void lh_ctx_free(struct lh_ctx * ctx) {
    if (!ctx) {
        return;
    }
    free(ctx->blk_to_moe);
    free(ctx->table);
    free(ctx->counts);
    free(ctx);
}

void lh_set_user_callback(struct lh_ctx * ctx, ggml_backend_sched_eval_callback cb, void * user_data) {
    ctx->user_cb = cb;
    ctx->user_ud = user_data;
}

void lh_set_observing(struct lh_ctx * ctx, bool observing) {
    ctx->observing = observing;
}

int64_t * lh_routing_counts(struct lh_ctx * ctx) {
    return ctx->counts;
}

void lh_get_counters(const struct lh_ctx * ctx, struct lh_counters * out) {
    *out = ctx->counters;
}

void lh_reset_counters(struct lh_ctx * ctx) {
    int64_t known = ctx->counters.weights_known;
    memset(&ctx->counters, 0, sizeof(ctx->counters));
    ctx->counters.weights_known = known;
    memset(ctx->counts, 0, sizeof(int64_t) * (size_t) ctx->n_moe_layers * (size_t) ctx->n_expert);
}

const char * lh_built_ggml_version(void) {
    return LH_GGML_VERSION;
}

/* Recognise a routed-expert weight by its canonical llama.cpp name. Called once per weight:
 * after that the weight is found by pointer. Weight copies the scheduler makes for big
 * ubatches ("CUDA0#blk.0...#0") are not weights and do not match. */
static void lh_classify_weight(const struct lh_ctx * ctx, const struct ggml_tensor * w, int32_t * moe_layer, int32_t * proj) {
    *moe_layer = -1;
    *proj = -1;
    if (w->buffer == NULL || ggml_backend_buffer_get_usage(w->buffer) != GGML_BACKEND_BUFFER_USAGE_WEIGHTS) {
        return;
    }
    int blk = -1;
    char kind[16] = {0};
    int consumed = 0;
    if (sscanf(w->name, "blk.%d.ffn_%15[a-z_]%n", &blk, kind, &consumed) != 2) {
        return;
    }
    if (strcmp(w->name + consumed, ".weight") != 0 || blk < 0 || blk >= ctx->n_blocks) {
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
    if (ctx->blk_to_moe[blk] < 0 || w->ne[2] != ctx->n_expert) {
        return;
    }
    *moe_layer = ctx->blk_to_moe[blk];
    *proj = p;
}

/* Find (or classify and remember) the weight of a MUL_MAT_ID node. */
static const struct lh_weight_entry * lh_lookup_weight(struct lh_ctx * ctx, const struct ggml_tensor * w) {
    uint32_t mask = ctx->table_cap - 1;
    uint32_t i = lh_hash_ptr(w) & mask;
    while (ctx->table[i].key != NULL) {
        if (ctx->table[i].key == w) {
            return &ctx->table[i];
        }
        i = (i + 1) & mask;
    }
    static const struct lh_weight_entry unmanaged = { NULL, -1, -1 };
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
    ctx->table_used++;
    if (moe_layer >= 0) {
        ctx->counters.weights_known++;
    }
    return &ctx->table[i];
}

/* The node whose routing we count: each MoE layer has exactly one down projection. */
static const struct lh_weight_entry * lh_counted_node(struct lh_ctx * ctx, const struct ggml_tensor * t) {
    if (!ctx->observing || t->op != GGML_OP_MUL_MAT_ID || t->src[0] == NULL) {
        return NULL;
    }
    const struct lh_weight_entry * e = lh_lookup_weight(ctx, t->src[0]);
    if (e->moe_layer < 0 || e->proj != LH_PROJ_DOWN) {
        return NULL;
    }
    return e;
}

static void lh_count_routing(struct lh_ctx * ctx, const struct ggml_tensor * t, int32_t moe_layer) {
    const struct ggml_tensor * ids = t->src[2];
    if (ids == NULL || ids->type != GGML_TYPE_I32 || ids->buffer == NULL || !ggml_backend_buffer_is_host(ids->buffer)) {
        return;
    }
    const int64_t n_used = ids->ne[0];
    const int64_t n_tokens = ids->ne[1];
    int64_t * row = ctx->counts + (size_t) moe_layer * (size_t) ctx->n_expert;
    for (int64_t tok = 0; tok < n_tokens; tok++) {
        const int32_t * sel = (const int32_t *) ((const char *) ids->data + tok * ids->nb[1]);
        for (int64_t k = 0; k < n_used; k++) {
            const int32_t e = *(const int32_t *) ((const char *) sel + k * ids->nb[0]);
            if (e >= 0 && e < ctx->n_expert) {
                row[e]++;
            }
        }
    }
    ctx->counters.managed_nodes++;
    if (moe_layer == 0) {
        ctx->counters.ubatches++;
        ctx->counters.tokens += n_tokens;
    }
}

bool lh_eval_callback(struct ggml_tensor * t, bool ask, void * user_data) {
    struct lh_ctx * ctx = (struct lh_ctx *) user_data;
    const struct lh_weight_entry * e = lh_counted_node(ctx, t);
    if (ask) {
        ctx->user_wanted = ctx->user_cb != NULL && ctx->user_cb(t, true, ctx->user_ud);
        return e != NULL || ctx->user_wanted;
    }
    /* ask=false: the scheduler computed every node up to and including t. */
    if (e != NULL) {
        lh_count_routing(ctx, t, e->moe_layer);
    }
    if (ctx->user_wanted) {
        ctx->user_wanted = false;
        return ctx->user_cb(t, false, ctx->user_ud);
    }
    return true;
}
