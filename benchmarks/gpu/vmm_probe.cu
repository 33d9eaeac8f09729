// Can one CUDA virtual range hold some experts in VRAM and the others in host memory, so that llama.cpp's
// own GPU kernels read hot experts at HBM speed and cold ones over PCIe, with no split of the graph?
// Maps 2 MB-granular chunks of one reserved range alternately to device memory and to host memory
// (cuMemCreate with CU_MEM_LOCATION_TYPE_HOST_NUMA), reads them with a kernel, and times a remap.
//   nvcc -O3 -arch=sm_90 benchmarks/gpu/vmm_probe.cu -lcuda -o /tmp/vmm_probe && /tmp/vmm_probe
#include <cuda.h>
#include <cuda_runtime.h>
#include <chrono>
#include <cstdio>
#include <vector>

#define CK(x) do { CUresult r_ = (x); if (r_ != CUDA_SUCCESS) { const char * s_; cuGetErrorString(r_, &s_); \
    printf("%s failed: %s\n", #x, s_); return 1; } } while (0)

__global__ void read_sum(const uint4 * p, size_t n, unsigned long long * out) {
    unsigned long long s = 0;
    for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x) {
        uint4 v = p[i];
        s += v.x + v.y + v.z + v.w;
    }
    if (s == 0x123456789abcdefULL) *out = s;   /* keeps the loads; no atomics in the way */
}

/* Every other chunk (odd: host memory) from `first`, `count` of them, in one kernel. */
__global__ void read_every_other(CUdeviceptr va, size_t gran, int first, int count, unsigned long long * out) {
    unsigned long long s = 0;
    const size_t per = gran / 16, n = per * count;
    for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x) {
        const uint4 v = ((const uint4 *) (va + (first + 2 * (i / per)) * gran))[i % per];
        s += v.x + v.y + v.z + v.w;
    }
    if (s == 0x123456789abcdefULL) *out = s;
}

static CUmemAllocationProp prop_for(bool host) {
    CUmemAllocationProp p = {};
    p.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    p.location.type = host ? CU_MEM_LOCATION_TYPE_HOST_NUMA : CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = 0;
    return p;
}

int main() {
    cudaFree(0);
    CK(cuInit(0));
    size_t gran_dev = 0, gran_host = 0;
    CUmemAllocationProp pd = prop_for(false), ph = prop_for(true);
    CK(cuMemGetAllocationGranularity(&gran_dev, &pd, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    CK(cuMemGetAllocationGranularity(&gran_host, &ph, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    const size_t gran = gran_dev > gran_host ? gran_dev : gran_host;
    printf("granularity: device %zu, host %zu bytes\n", gran_dev, gran_host);
    const int chunks = 512;                       /* 1 GiB at 2 MiB: half device, half host */
    CUdeviceptr va;
    CK(cuMemAddressReserve(&va, chunks * gran, 0, 0, 0));
    std::vector<CUmemGenericAllocationHandle> h(chunks);
    CUmemAccessDesc access = {};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = 0;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    for (int i = 0; i < chunks; i++) {
        CUmemAllocationProp p = prop_for(i % 2 == 1);
        CK(cuMemCreate(&h[i], gran, &p, 0));
        CK(cuMemMap(va + i * gran, gran, 0, h[i], 0));
        CK(cuMemSetAccess(va + i * gran, gran, &access, 1));
    }
    cudaMemset((void *) va, 1, chunks * gran);
    cudaDeviceSynchronize();
    printf("mapped %d chunks (odd ones in host memory), memset: %s\n", chunks, cudaGetErrorString(cudaGetLastError()));
    unsigned long long * out;
    cudaMalloc(&out, sizeof(*out));
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    for (int host = 0; host < 2; host++) {        /* read 64 chunks of one kind, one kernel per chunk */
        for (int rep = 0; rep < 3; rep++) {
            cudaEventRecord(a);
            for (int k = 0; k < 64; k++) {
                read_sum<<<264, 512>>>((const uint4 *) (va + (2 * k + host) * gran), gran / 16, out);
            }
            cudaEventRecord(b);
            cudaEventSynchronize(b);
            float ms = 0;
            cudaEventElapsedTime(&ms, a, b);
            if (rep == 2) printf("%s chunks: %.1f GB/s (%.1f us per 2.65 MB expert)\n", host ? "host  " : "device",
                                 64 * gran / (ms * 1e6), 2.65e6 / (64 * gran / (ms * 1e-3)) * 1e6);
        }
    }
    for (int host = 0; host < 2; host++) {        /* 128 chunks of one kind in one kernel: the link's rate */
        for (int rep = 0; rep < 3; rep++) {
            cudaEventRecord(a);
            read_every_other<<<1056, 512>>>(va, gran, host, 128, out);
            cudaEventRecord(b);
            cudaEventSynchronize(b);
            float ms = 0;
            cudaEventElapsedTime(&ms, a, b);
            if (rep == 2) printf("%s chunks, one kernel: %.1f GB/s\n", host ? "host  " : "device", 128 * gran / (ms * 1e6));
        }
    }
    /* Remap one chunk from host to device memory: what a slot load would be besides its copy. */
    CUmemGenericAllocationHandle fresh;
    auto t0 = std::chrono::steady_clock::now();
    CK(cuMemCreate(&fresh, gran, &pd, 0));
    auto t1 = std::chrono::steady_clock::now();
    CK(cuMemUnmap(va + gran, gran));
    CK(cuMemMap(va + gran, gran, 0, fresh, 0));
    CK(cuMemSetAccess(va + gran, gran, &access, 1));
    auto t2 = std::chrono::steady_clock::now();
    printf("remap one chunk: create %.1f us, unmap+map+access %.1f us\n",
           std::chrono::duration<double, std::micro>(t1 - t0).count(), std::chrono::duration<double, std::micro>(t2 - t1).count());
    read_sum<<<264, 512>>>((const uint4 *) (va + gran), gran / 16, out);
    printf("read after remap: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
    return 0;
}
