/* Read bandwidth by working-set size: how much of the cache hierarchy a process really gets.
 *
 *   gcc -O3 -march=native -fopenmp -o /tmp/read_bandwidth tools/read_bandwidth.c
 *   /tmp/read_bandwidth            # 1 thread, then all threads (OMP_NUM_THREADS caps it)
 *
 * For each working set (KiB), every thread reads its share of one buffer over and over and
 * adds it up (8 independent accumulators, so the loads, not the adds, set the pace); the best
 * of 5 timings of at least 256 MiB of reads is printed in GB/s.  Where the figure drops from
 * cache speed to DRAM speed is the cache a second pass over a channels-last sample can hope
 * to hit (see benchmarks/RESULTS.md). */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static double sum_range(const double *a, size_t n)
{
    double s[8] = {0};
    for (size_t i = 0; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j];
    return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

static double gbs(const double *buf, size_t n, int threads)
{
    size_t passes = (256u << 20) / (n * sizeof(double)) + 1, best_bytes = passes * n * 8;
    double best = 1e30, sink = 0.0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
        {
            int t = omp_get_thread_num(), T = omp_get_num_threads();
            size_t lo = n * t / T, hi = n * (t + 1) / T;
            for (size_t p = 0; p < passes; p++) sink += sum_range(buf + lo, hi - lo);
        }
        double dt = now() - t0;
        if (dt < best) best = dt;
    }
    if (sink == 42.0) puts("");  /* keep the sums alive */
    return best_bytes / best / 1e9;
}

int main(void)
{
    static const size_t kib[] = {256, 512, 1024, 2048, 4096, 8192, 12288, 16384, 32768, 65536,
                                 131072, 262144};
    const int nsizes = sizeof kib / sizeof kib[0];
    size_t most = kib[nsizes - 1] * 1024 / sizeof(double);
    double *buf = malloc(most * sizeof(double));
    if (!buf) return 1;
    for (size_t i = 0; i < most; i++) buf[i] = (double)(i & 1023);
    int all = omp_get_max_threads();
    printf("%10s %12s %12s\n", "KiB", "1 thread", "all threads");
    for (int s = 0; s < nsizes; s++) {
        size_t n = kib[s] * 1024 / sizeof(double);
        printf("%10zu %12.1f %12.1f\n", kib[s], gbs(buf, n, 1), gbs(buf, n, all));
        fflush(stdout);
    }
    free(buf);
    return 0;
}
