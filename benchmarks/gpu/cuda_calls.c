/* LD_PRELOAD probe: counts and times the CUDA runtime calls llama.cpp's CUDA backend makes, to see
 * what a decode step does on the host (kernel launches vs graph launches, captures, syncs).
 *   cc -O2 -shared -fPIC -I/usr/local/cuda/include -o /tmp/cuda_calls.so benchmarks/gpu/cuda_calls.c -ldl
 *   LD_PRELOAD=/tmp/cuda_calls.so python3 ...      (call cuda_calls_report()/cuda_calls_clear() via ctypes)
 */
#define _GNU_SOURCE
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

enum { LAUNCH, LAUNCH_EX, GRAPH_LAUNCH, BEGIN_CAPTURE, END_CAPTURE, INSTANTIATE, EXEC_UPDATE, STREAM_SYNC,
       MEMCPY_ASYNC, EVENT_RECORD, STREAM_WAIT_EVENT, GET_DEVICE, SET_DEVICE, N_CALLS };
static const char * NAMES[N_CALLS] = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch",
    "cudaStreamBeginCapture", "cudaStreamEndCapture", "cudaGraphInstantiate", "cudaGraphExecUpdate",
    "cudaStreamSynchronize", "cudaMemcpyAsync", "cudaEventRecord", "cudaStreamWaitEvent", "cudaGetDevice",
    "cudaSetDevice"};
static long counts[N_CALLS];
static double seconds[N_CALLS];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#define FORWARD(ID, SYMBOL, PARAMS, ARGS)                                   \
    cudaError_t SYMBOL PARAMS {                                             \
        static cudaError_t (*real) PARAMS;                                  \
        if (!real) real = (cudaError_t (*) PARAMS) dlsym(RTLD_NEXT, #SYMBOL); \
        const double start = now();                                         \
        cudaError_t result = real ARGS;                                     \
        seconds[ID] += now() - start;                                       \
        counts[ID]++;                                                       \
        return result;                                                      \
    }

FORWARD(LAUNCH, __cudaLaunchKernel, (const void * f, dim3 g, dim3 b, void ** a, size_t s, cudaStream_t st), (f, g, b, a, s, st))
FORWARD(LAUNCH_EX, cudaLaunchKernelExC, (const cudaLaunchConfig_t * c, const void * f, void ** a), (c, f, a))
FORWARD(GRAPH_LAUNCH, cudaGraphLaunch, (cudaGraphExec_t e, cudaStream_t s), (e, s))
FORWARD(BEGIN_CAPTURE, cudaStreamBeginCapture, (cudaStream_t s, enum cudaStreamCaptureMode m), (s, m))
FORWARD(END_CAPTURE, cudaStreamEndCapture, (cudaStream_t s, cudaGraph_t * g), (s, g))
FORWARD(INSTANTIATE, cudaGraphInstantiate, (cudaGraphExec_t * e, cudaGraph_t g, unsigned long long f), (e, g, f))
FORWARD(EXEC_UPDATE, cudaGraphExecUpdate, (cudaGraphExec_t e, cudaGraph_t g, cudaGraphExecUpdateResultInfo * i), (e, g, i))
FORWARD(STREAM_SYNC, cudaStreamSynchronize, (cudaStream_t s), (s))
FORWARD(MEMCPY_ASYNC, cudaMemcpyAsync, (void * d, const void * s, size_t n, enum cudaMemcpyKind k, cudaStream_t st), (d, s, n, k, st))
FORWARD(EVENT_RECORD, cudaEventRecord, (cudaEvent_t e, cudaStream_t s), (e, s))
FORWARD(STREAM_WAIT_EVENT, cudaStreamWaitEvent, (cudaStream_t s, cudaEvent_t e, unsigned int f), (s, e, f))
FORWARD(GET_DEVICE, cudaGetDevice, (int * d), (d))
FORWARD(SET_DEVICE, cudaSetDevice, (int d), (d))

void cuda_calls_clear(void) {
    memset(counts, 0, sizeof(counts));
    memset(seconds, 0, sizeof(seconds));
}

/* One line per call kind made since the last clear: count and host ms, each per `per` (e.g. tokens). */
void cuda_calls_report(const char * label, int per) {
    for (int i = 0; i < N_CALLS; i++) {
        if (counts[i]) {
            printf("%s: %-24s %9.1f calls %9.3f ms\n", label, NAMES[i], (double) counts[i] / per, seconds[i] * 1e3 / per);
        }
    }
    fflush(stdout);
}
