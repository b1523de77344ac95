/* A small cache of large freed output buffers, as a NumPy memory handler (NumPy >= 1.22).
 *
 * The outputs the fast paths allocate (forward y, backward dx) are made with this handler.
 * When such an array is freed, its buffer (if at least cin_pool_min bytes) is kept, up to
 * CIN_POOL_SLOTS buffers and cin_pool_limit bytes in all (the oldest freed first when either
 * would be passed), and a later output of exactly that size takes it back: its pages are
 * mapped already.  A fresh buffer of the sizes these outputs have is an mmap of untouched
 * pages (glibc maps anything over 32 MiB afresh every time, and often smaller ones after a
 * trim), and the kernel zeroes each page at first touch: a 64 MiB float64 backward into a
 * fresh dx took 14.5 ms against 6.5 ms into a mapped one on the Xeon VM, torch's 21 ms.
 *
 * Every buffer the handler makes starts CIN_POOL_PAD bytes into a page-aligned block (a
 * 2 MiB-aligned one from 4 MiB on, advised to be huge pages as a whole), the block's address
 * and the buffer's size stored just before it.  NumPy's own large arrays start 16 bytes into
 * a page, and partly on 4 KiB pages: a result at the same offset in its page has each of its
 * stores near the input loads of the same element 4 KiB apart (which the core takes for a
 * possible dependency), and a block not aligned to 2 MiB gets huge pages only in its aligned
 * interior.  Tiny-plane float32 backward into such a dx, Intel Xeon VM, 2 threads: 3 to 8 %
 * faster than into a plain malloc'd one.
 *
 * Only the GIL guards the cache: NumPy allocates and frees array data with the GIL held, and
 * so do the fast paths.  A free-threaded build (Py_GIL_DISABLED) compiles the cache out. */
#ifndef CIN_POOL_H
#define CIN_POOL_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#define CIN_POOL_SLOTS 4
#define CIN_POOL_PAD 2048
#define CIN_POOL_HUGE ((size_t)2 << 20)

typedef struct { void *p; size_t n; } cin_pool_block;
static cin_pool_block cin_pool_blocks[CIN_POOL_SLOTS];  /* oldest first */
static int cin_pool_count = 0;
static size_t cin_pool_bytes = 0;
#ifdef Py_GIL_DISABLED
static size_t cin_pool_limit = 0;
#else
static size_t cin_pool_limit = (size_t)256 << 20;
#endif
static size_t cin_pool_min = (size_t)1 << 20;

static void cin_pool_drop(int i)
{
    cin_pool_bytes -= cin_pool_blocks[i].n;
    memmove(cin_pool_blocks + i, cin_pool_blocks + i + 1,
            (size_t)(cin_pool_count - i - 1) * sizeof(cin_pool_block));
    cin_pool_count--;
}

/* A fresh buffer of n bytes, CIN_POOL_PAD into its block (see the top), or NULL. */
static void *cin_pool_new(size_t n)
{
    size_t align = n >= 2 * CIN_POOL_HUGE ? CIN_POOL_HUGE : 4096;
    void *base;
    if (n > SIZE_MAX - CIN_POOL_PAD || posix_memalign(&base, align, n + CIN_POOL_PAD) != 0)
        return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    /* as NumPy's own allocator does for 4 MiB and more: transparent huge pages where the
     * system gives them on request (fewer faults and TLB misses; advice, not a failure) */
    if (align == CIN_POOL_HUGE) madvise(base, n + CIN_POOL_PAD, MADV_HUGEPAGE);
#endif
    char *p = (char *)base + CIN_POOL_PAD;
    ((void **)p)[-1] = base;
    ((size_t *)p)[-2] = n;
    return p;
}

static void cin_pool_release(void *p) { free(((void **)p)[-1]); }

static void *cin_pool_malloc(void *ctx, size_t n)
{
    (void)ctx;
    if (n >= cin_pool_min)
        for (int i = cin_pool_count - 1; i >= 0; i--)
            if (cin_pool_blocks[i].n == n) {
                void *p = cin_pool_blocks[i].p;
                cin_pool_drop(i);
                return p;
            }
    return cin_pool_new(n);
}

static void *cin_pool_calloc(void *ctx, size_t k, size_t n)
{
    if (n && k > SIZE_MAX / n) return NULL;
    void *p = cin_pool_malloc(ctx, k * n);
    if (p != NULL) memset(p, 0, k * n);
    return p;
}

static void *cin_pool_realloc(void *ctx, void *p, size_t n)
{
    (void)ctx;
    if (p == NULL) return cin_pool_new(n);
    size_t old = ((size_t *)p)[-2];
    void *q = cin_pool_new(n);
    if (q == NULL) return NULL;  /* p stays valid, as realloc leaves it */
    memcpy(q, p, old < n ? old : n);
    cin_pool_release(p);
    return q;
}

/* Frees the oldest kept buffers until at most `slots` are kept and at most `limit` bytes. */
static void cin_pool_evict(size_t limit, int slots)
{
    while (cin_pool_count > 0 && (cin_pool_count > slots || cin_pool_bytes > limit)) {
        cin_pool_release(cin_pool_blocks[0].p);
        cin_pool_drop(0);
    }
}

/* Keeps p or frees it (n, NumPy's size of the array, is the size p was made with, which
 * its header holds: the header is what counts). */
static void cin_pool_free(void *ctx, void *p, size_t n)
{
    (void)ctx;
    if (p == NULL) return;
    n = ((size_t *)p)[-2];
    if (n < cin_pool_min || n > cin_pool_limit) {
        cin_pool_release(p);
        return;
    }
    cin_pool_evict(cin_pool_limit - n, CIN_POOL_SLOTS - 1);  /* room for p */
    cin_pool_blocks[cin_pool_count].p = p;
    cin_pool_blocks[cin_pool_count].n = n;
    cin_pool_count++;
    cin_pool_bytes += n;
}

static void cin_pool_clear(void) { cin_pool_evict(0, 0); }

/* limit 0: nothing is kept (and what is, is freed); returns the limit in force (always 0 on a
 * free-threaded build). */
static size_t cin_pool_set_limit(size_t limit)
{
#ifdef Py_GIL_DISABLED
    limit = 0;
#endif
    cin_pool_limit = limit;
    cin_pool_evict(limit, CIN_POOL_SLOTS);
    return cin_pool_limit;
}

static PyDataMem_Handler cin_pool_handler = {
    "cinstnorm_output_cache",
    1,
    {NULL, cin_pool_malloc, cin_pool_calloc, cin_pool_realloc, cin_pool_free},
};

#endif
