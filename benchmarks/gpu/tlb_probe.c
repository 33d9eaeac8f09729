// Does the page size of host memory change how fast a team of threads reads one cold expert?
// The shim's pool reads a random expert (3 matrices of ~0.88 MB, Qwen3-30B-A3B's Q4_K shapes) split in
// row slices over 15 threads; experts live in a 16 GB host buffer. This reads the same way from a buffer
// in 4 KiB pages and from one in transparent huge pages (madvise), and prints microseconds per expert.
//   gcc -O3 -march=native -pthread benchmarks/gpu/tlb_probe.c -o /tmp/tlb_probe && /tmp/tlb_probe [GiB] [threads]
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

enum { MATRICES = 3, EXPERTS_READ = 3000 };
static const size_t matrix_bytes = 884736;   /* 2048 x 768 Q4_K */
static const char * base;
static size_t n_experts;
static int n_threads;
static atomic_int seq, done;
static _Atomic size_t expert_now;
static atomic_int stop;
static volatile uint64_t sink[64 * 8];

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static uint64_t read_slice(const char * m, int ith, int nth) {
    const size_t per = (matrix_bytes / 64 + nth - 1) / nth * 64;
    const size_t a = per * ith, b = a + per < matrix_bytes ? a + per : matrix_bytes;
    const uint64_t * p = (const uint64_t *) (m + a);
    uint64_t s = 0;
    for (size_t i = 0; i < (b - a) / 8; i++) {
        s += p[i];
    }
    return s;
}

static void read_expert(size_t e, int ith, int nth) {
    uint64_t s = 0;
    for (int p = 0; p < MATRICES; p++) {   /* the three matrices of an expert lie in three tensors */
        s += read_slice(base + ((size_t) p * n_experts / MATRICES + e) * matrix_bytes, ith, nth);
    }
    sink[ith * 8] += s;
}

static void * worker(void * arg) {
    const int ith = (int) (intptr_t) arg;
    int seen = 0;
    while (!atomic_load(&stop)) {
        const int s = atomic_load(&seq);
        if (s == seen) {
            __builtin_ia32_pause();
            continue;
        }
        seen = s;
        read_expert(atomic_load(&expert_now), ith, n_threads);
        atomic_fetch_add(&done, 1);
    }
    return NULL;
}

static double run(const char * label, int advice, size_t bytes) {
    char * buf = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    madvise(buf, bytes, advice);
    memset(buf, 1, bytes);
    base = buf;
    n_experts = bytes / matrix_bytes / MATRICES * MATRICES;
    atomic_store(&stop, 0);
    pthread_t th[256];
    for (int i = 1; i < n_threads; i++) {
        pthread_create(&th[i], NULL, worker, (void *) (intptr_t) i);
    }
    double * t = malloc(sizeof(double) * EXPERTS_READ);
    uint64_t rng = 88172645463325252ULL;
    for (int k = 0; k < EXPERTS_READ; k++) {
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
        const size_t e = rng % (n_experts / MATRICES);
        atomic_store(&done, 0);
        const double t0 = now_us();
        atomic_store(&expert_now, e);
        atomic_fetch_add(&seq, 1);
        read_expert(e, 0, n_threads);
        while (atomic_load(&done) < n_threads - 1) {
            __builtin_ia32_pause();
        }
        t[k] = now_us() - t0;
        for (volatile int spin = 0; spin < 20000; spin++) {}   /* ~10-20 us apart, like stops */
    }
    atomic_store(&stop, 1);
    for (int i = 1; i < n_threads; i++) {
        pthread_join(th[i], NULL);
    }
    int cmp(const void * a, const void * b) { double x = *(const double *) a, y = *(const double *) b; return (x > y) - (x < y); }
    qsort(t, EXPERTS_READ, sizeof(double), cmp);
    const double med = t[EXPERTS_READ / 2];
    FILE * f = fopen("/proc/self/smaps_rollup", "r");
    char line[256]; long huge_kb = 0;
    while (f && fgets(line, sizeof line, f)) {
        sscanf(line, "AnonHugePages: %ld", &huge_kb);
    }
    if (f) fclose(f);
    printf("%-22s %2d threads: median %.1f us per expert (p10 %.1f, p90 %.1f), %.1f GB/s; AnonHugePages %ld MiB\n", label,
           n_threads, med, t[EXPERTS_READ / 10], t[EXPERTS_READ * 9 / 10], MATRICES * matrix_bytes / med / 1e3, huge_kb / 1024);
    free(t);
    munmap(buf, bytes);
    return med;
}

int main(int argc, char ** argv) {
    const size_t gib = argc > 1 ? strtoul(argv[1], NULL, 10) : 16;
    const int threads[] = { argc > 2 ? atoi(argv[2]) : 15, 1 };
    for (int i = 0; i < 2; i++) {
        n_threads = threads[i];
        run("4 KiB pages", MADV_NOHUGEPAGE, gib << 30);
        run("transparent huge pages", MADV_HUGEPAGE, gib << 30);
    }
    return 0;
}
