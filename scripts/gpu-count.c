/*
 * Counts a process's CUDA memory copies (by direction, with bytes) and kernel
 * launches through CUPTI's activity records, the data Nsight Systems' `nsys
 * stats` reports, for hosts where nsys can't run. Loaded by the CUDA driver
 * itself through its injection hook, so the program under test is unchanged:
 *
 *   cc -shared -fPIC -O2 -I$CUPTI/include gpu-count.c -o libgpucount.so \
 *      -L$CUPTI/lib64 -lcupti
 *   CUDA_INJECTION64_PATH=$PWD/libgpucount.so GPU_COUNT_OUT=counts.txt prog
 *
 * At exit each CUDA process appends one line to GPU_COUNT_OUT (else stderr):
 *   cmd=<argv[0..2] joined by '+'> dtoh=N dtoh_bytes=B htod=N htod_bytes=B
 *   dtod=N kernels=N memsets=N dropped=N
 * scripts/gpu-bench.sh builds it on the GPU host and turns two runs that
 * differ only in the number of tokens into per-token figures.
 */
#include <cupti.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The leading fields every version of CUPTI's memcpy record shares. */
typedef struct {
    CUpti_ActivityKind kind;
    uint8_t copyKind;
    uint8_t srcKind;
    uint8_t dstKind;
    uint8_t flags;
    uint64_t bytes;
} MemcpyHead;

static unsigned long long n_dtoh, b_dtoh, n_htod, b_htod, n_dtod, n_kernels, n_memsets;
static size_t n_dropped;

#define BUFFER_SIZE (8u << 20)

static void CUPTIAPI requested(uint8_t **buffer, size_t *size, size_t *max_records) {
    *buffer = aligned_alloc(8, BUFFER_SIZE);
    *size = *buffer ? BUFFER_SIZE : 0;
    *max_records = 0;
}

static void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size,
                               size_t valid) {
    (void)stream;
    CUpti_Activity *record = NULL;
    while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
        switch (record->kind) {
        case CUPTI_ACTIVITY_KIND_MEMCPY: {
            const MemcpyHead *m = (const MemcpyHead *)record;
            if (m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOH) {
                n_dtoh++;
                b_dtoh += m->bytes;
            } else if (m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_HTOD) {
                n_htod++;
                b_htod += m->bytes;
            } else {
                n_dtod++;
            }
            break;
        }
        case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
        case CUPTI_ACTIVITY_KIND_KERNEL:
            n_kernels++;
            break;
        case CUPTI_ACTIVITY_KIND_MEMSET:
            n_memsets++;
            break;
        default:
            break;
        }
    }
    size_t dropped = 0;
    if (cuptiActivityGetNumDroppedRecords(ctx, stream, &dropped) == CUPTI_SUCCESS)
        n_dropped += dropped;
    (void)size;
    free(buffer);
}

static void report(void) {
    cuptiActivityFlushAll(1);
    char cmd[512] = "?";
    FILE *f = fopen("/proc/self/cmdline", "rb");
    if (f) {
        size_t n = fread(cmd, 1, sizeof cmd - 1, f);
        fclose(f);
        cmd[n] = 0;
        /* argv[0] (its last path part) + argv[1] + argv[2]. */
        char *base = strrchr(cmd, '/');
        char out[512];
        size_t len = 0, args = 0;
        for (char *p = base ? base + 1 : cmd; p < cmd + n && args < 3; p += strlen(p) + 1, args++)
            len += (size_t)snprintf(out + len, sizeof out - len, "%s%s", args ? "+" : "", p);
        memcpy(cmd, out, len + 1);
    }
    const char *path = getenv("GPU_COUNT_OUT");
    FILE *o = path ? fopen(path, "a") : NULL;
    fprintf(o ? o : stderr,
            "cmd=%s dtoh=%llu dtoh_bytes=%llu htod=%llu htod_bytes=%llu dtod=%llu kernels=%llu "
            "memsets=%llu dropped=%zu\n",
            cmd, n_dtoh, b_dtoh, n_htod, b_htod, n_dtod, n_kernels, n_memsets, n_dropped);
    if (o)
        fclose(o);
}

/* Called by the CUDA driver when CUDA_INJECTION64_PATH names this library. */
int InitializeInjection(void) {
    if (cuptiActivityRegisterCallbacks(requested, completed) != CUPTI_SUCCESS)
        return 0;
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
    atexit(report);
    return 1;
}
