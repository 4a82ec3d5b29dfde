/*
 * _source.c: the C side of aiopostcopy.uffd, compiled by cffi (API mode).
 *
 * These helpers only flatten and batch: each fills a kernel struct from plain
 * integers, makes one system call, and hands back 0 or the errno value (the
 * open helpers hand back the fd or -errno). They hold no state and make no
 * decision; every policy (retry, wake, what an errno means) is in Python.
 * The one exception to "no state" is the placing thread (apc_placer_*), a
 * queue of apc_place_run() calls run without the GIL; it decides nothing either.
 * cffi releases the GIL around each call, so a call that blocks (a fault
 * taken by apc_touch, a madvise waiting for its REMOVE event to be read)
 * never stalls the interpreter.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <linux/magic.h>
#include <linux/memfd.h>
#include <linux/userfaultfd.h>

/* ---- optional parts of the ABI ---------------------------------------- */

#ifdef UFFDIO_MOVE
#define HAS_MOVE 1
#define APC_FEATURE_MOVE UFFD_FEATURE_MOVE
#define APC_IOCTL_MOVE ((uint64_t)1 << _UFFDIO_MOVE)
#else
#define HAS_MOVE 0
#define APC_FEATURE_MOVE 0
#define APC_IOCTL_MOVE 0
#endif

#ifdef UFFDIO_POISON
#define HAS_POISON 1
#define APC_FEATURE_POISON UFFD_FEATURE_POISON
#define APC_IOCTL_POISON ((uint64_t)1 << _UFFDIO_POISON)
#else
#define HAS_POISON 0
#define APC_FEATURE_POISON 0
#define APC_IOCTL_POISON 0
#endif

#ifdef UFFD_FEATURE_WP_UNPOPULATED
#define HAS_WP_UNPOPULATED 1
#define APC_FEATURE_WP_UNPOPULATED UFFD_FEATURE_WP_UNPOPULATED
#else
#define HAS_WP_UNPOPULATED 0
#define APC_FEATURE_WP_UNPOPULATED 0
#endif

#ifdef UFFD_FEATURE_WP_ASYNC
#define HAS_WP_ASYNC 1
#define APC_FEATURE_WP_ASYNC UFFD_FEATURE_WP_ASYNC
#else
#define HAS_WP_ASYNC 0
#define APC_FEATURE_WP_ASYNC 0
#endif

#define APC_MSG_SLOTS 4

/* ---- opening ---------------------------------------------------------- */

int apc_open_dev(int flags)
{
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int err = errno;
    close(dev);
    return fd < 0 ? -err : fd;
}

int apc_open_syscall(int flags)
{
#ifdef SYS_userfaultfd
    long fd = syscall(SYS_userfaultfd, flags);
    return fd < 0 ? -errno : (int)fd;
#else
    (void)flags;
    return -ENOSYS;
#endif
}

/* ---- ioctls ----------------------------------------------------------- */

static int apc_ioctl(int fd, unsigned long request, void *arg)
{
    return ioctl(fd, request, arg) == 0 ? 0 : errno;
}

/* Bytes handled by the last placing call of this thread, for callers that
 * pass done == NULL (read it, like errno, with apc_last_done()). */
static __thread int64_t apc_done_tls;

int64_t apc_last_done(void)
{
    return apc_done_tls;
}

static int apc_finish(int rc, uint64_t len, int64_t reported, int64_t *done)
{
    /* The kernel writes bytes handled, or -errno when it handled none. */
    int64_t value = rc == 0 ? (int64_t)len : (reported > 0 ? reported : 0);
    *(done ? done : &apc_done_tls) = value;
    return rc;
}

int apc_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
    struct uffdio_api api;
    memset(&api, 0, sizeof api);
    api.api = UFFD_API;
    api.features = features;
    int rc = apc_ioctl(fd, UFFDIO_API, &api);
    *features_out = api.features;
    *ioctls_out = api.ioctls;
    return rc;
}

int apc_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)
{
    struct uffdio_register reg;
    memset(&reg, 0, sizeof reg);
    reg.range.start = start;
    reg.range.len = len;
    reg.mode = mode;
    int rc = apc_ioctl(fd, UFFDIO_REGISTER, &reg);
    *ioctls_out = rc == 0 ? reg.ioctls : 0;
    return rc;
}

int apc_unregister(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = { .start = start, .len = len };
    return apc_ioctl(fd, UFFDIO_UNREGISTER, &range);
}

int apc_wake(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = { .start = start, .len = len };
    return apc_ioctl(fd, UFFDIO_WAKE, &range);
}

int apc_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done)
{
    struct uffdio_copy copy = { .dst = dst, .src = src, .len = len, .mode = mode, .copy = 0 };
    int rc = apc_ioctl(fd, UFFDIO_COPY, &copy);
    return apc_finish(rc, len, copy.copy, done);
}

int apc_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
    struct uffdio_zeropage zero;
    memset(&zero, 0, sizeof zero);
    zero.range.start = start;
    zero.range.len = len;
    zero.mode = mode;
    int rc = apc_ioctl(fd, UFFDIO_ZEROPAGE, &zero);
    return apc_finish(rc, len, zero.zeropage, done);
}

/* Place pages [start, count) of a run at dst, in one call (one GIL release for the caller).
 * zeros holds nzeros flattened bounds [lo0, hi0, lo1, hi1, ...] of stretches of zero pages,
 * relative to the run, sorted and disjoint; every other page comes, in order, from the
 * packed payload at src. Data stretches: one UFFDIO_COPY each. Zero stretches: one
 * UFFDIO_ZEROPAGE each, or, when zero_src is not 0 (hugetlbfs has no ZEROPAGE), one
 * UFFDIO_COPY per page from the zeroed page at zero_src. This is mechanism only: at the
 * first error it stops and returns the errno, with *page_out the first page not placed
 * (a partial call's bytes counted); what an errno means is the caller's business. */
int apc_place_run(int fd, uint64_t dst, uint64_t src, uint64_t page_size, uint64_t count,
                  const uint64_t *zeros, uint64_t nzeros, uint64_t zero_src, uint64_t start,
                  uint64_t *page_out)
{
    uint64_t at = 0, data = 0;  /* page index; data pages before it */
    int64_t done = 0;
    int rc = 0;
    *page_out = start;
    if (nzeros % 2 || page_size == 0)
        return EINVAL;
    for (uint64_t k = 0, last = 0; k < nzeros; k += 2) {  /* check everything before placing anything */
        if (zeros[k] < last || zeros[k + 1] < zeros[k] || zeros[k + 1] > count)
            return EINVAL;
        last = zeros[k + 1];
    }
    for (uint64_t k = 0; k <= nzeros; k += 2) {
        uint64_t lo = k < nzeros ? zeros[k] : count, hi = k < nzeros ? zeros[k + 1] : count;
        uint64_t from = at > start ? at : start;
        if (from < lo) {  /* data pages [from, lo) */
            rc = apc_copy(fd, dst + from * page_size, src + (data + from - at) * page_size,
                          (lo - from) * page_size, 0, &done);
            if (rc) {
                *page_out = from + (uint64_t)done / page_size;
                return rc;
            }
        }
        data += lo - at;
        from = lo > start ? lo : start;
        if (from < hi && zero_src == 0) {  /* zero pages [from, hi) */
            rc = apc_zeropage(fd, dst + from * page_size, (hi - from) * page_size, 0, &done);
            if (rc) {
                *page_out = from + (uint64_t)done / page_size;
                return rc;
            }
        }
        for (uint64_t page = from; page < hi && zero_src != 0; page++) {
            rc = apc_copy(fd, dst + page * page_size, zero_src, page_size, 0, &done);
            if (rc) {
                *page_out = page;
                return rc;
            }
        }
        at = hi;
    }
    *page_out = count;
    return 0;
}

/* ---- the placing thread ------------------------------------------------ */

/*
 * A thread that runs apc_place_run() for queued jobs, so that placing the
 * background stream's pages takes no GIL at all. A placing thread written in
 * Python holds the GIL between its ioctls; when it runs at a raised nice value
 * (so that the fault path goes first) the scheduler leaves it off the CPU while
 * it holds the GIL, and the loop thread waits for it: a priority inversion.
 *
 * Jobs live in a ring of `capacity` slots shared with Python. Python fills the
 * slot `submitted % capacity` and bumps `submitted` under the mutex; the thread
 * runs jobs in order, writes each one's result into its own slot and then
 * publishes `placed` (release order), so Python reads finished slots without the
 * mutex. Python never reuses a slot it has not taken back, and a job marked
 * `notify` writes the eventfd when it is done (the loop watches it).
 * This is mechanism only: a job that stops (EEXIST, EAGAIN, any errno) reports
 * the errno and the first page not placed; Python decides what that means.
 */
#define APC_NICE_INHERIT (-100)  /* apc_placer_start: keep the nice value of the thread that starts it */

struct apc_job {
    /* written by Python before submitting: the arguments of apc_place_run() */
    uint64_t dst, src, page_size, count, zero_src, start;
    const uint64_t *zeros;
    uint64_t nzeros;
    int notify;                  /* write the eventfd when this job is done */
    /* written by the thread: 0 or the errno that stopped it, and the first page not placed */
    int error;
    uint64_t page;
};

struct apc_placer {
    int fd, eventfd, niceness;
    struct apc_job *jobs;
    uint64_t capacity;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    uint64_t submitted;          /* under lock */
    uint64_t run;                /* the thread's own: the next job it runs */
    uint64_t placed;             /* jobs finished: stored by the thread (release), read by Python (acquire) */
    int stop;
    int tid;                     /* the thread's id, stored by the thread once it runs (release) */
    pthread_t thread;
};

static void *apc_placer_main(void *arg)
{
    struct apc_placer *p = arg;
    pthread_setname_np(pthread_self(), "postcopy-placer");  /* as top and perf show it */
    int tid = (int)syscall(SYS_gettid);
    if (p->niceness != APC_NICE_INHERIT)
        setpriority(PRIO_PROCESS, (id_t)tid, p->niceness);  /* failing is harmless */
    __atomic_store_n(&p->tid, tid, __ATOMIC_RELEASE);  /* after the nice value: Python may rely on it */
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->stop && p->run == p->submitted)
            pthread_cond_wait(&p->wake, &p->lock);
        if (p->stop)
            break;
        uint64_t end = p->submitted;
        pthread_mutex_unlock(&p->lock);
        for (; p->run < end; p->run++) {
            struct apc_job *job = &p->jobs[p->run % p->capacity];
            uint64_t page = job->start;
            job->error = apc_place_run(p->fd, job->dst, job->src, job->page_size, job->count, job->zeros,
                                       job->nzeros, job->zero_src, job->start, &page);
            job->page = page;
            __atomic_store_n(&p->placed, p->run + 1, __ATOMIC_RELEASE);
            if (job->notify) {
                uint64_t one = 1;
                ssize_t wrote = write(p->eventfd, &one, sizeof one);  /* EAGAIN: the counter is set already */
                (void)wrote;
            }
            if (__atomic_load_n(&p->stop, __ATOMIC_ACQUIRE))
                return NULL;
        }
        pthread_mutex_lock(&p->lock);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

int apc_placer_start(struct apc_placer *p, int fd, struct apc_job *jobs, uint64_t capacity, int eventfd,
                     int niceness)
{
    if (capacity == 0)
        return EINVAL;
    p->fd = fd;
    p->jobs = jobs;
    p->capacity = capacity;
    p->eventfd = eventfd;
    p->niceness = niceness;
    p->submitted = p->run = p->placed = 0;
    p->stop = 0;
    p->tid = 0;
    int rc = pthread_mutex_init(&p->lock, NULL);
    if (rc)
        return rc;
    rc = pthread_cond_init(&p->wake, NULL);
    if (rc)
        return rc;
    return pthread_create(&p->thread, NULL, apc_placer_main, p);
}

/* Hand the jobs Python wrote into slots [submitted, submitted + count) to the thread. */
void apc_placer_submit(struct apc_placer *p, uint64_t count)
{
    pthread_mutex_lock(&p->lock);
    p->submitted += count;
    pthread_mutex_unlock(&p->lock);
    pthread_cond_signal(&p->wake);  /* after the unlock: the thread wakes to a free mutex */
}

/* How many jobs have finished (their slots' results may be read). */
uint64_t apc_placer_placed(struct apc_placer *p)
{
    return __atomic_load_n(&p->placed, __ATOMIC_ACQUIRE);
}

/* The placing thread's id (for its scheduling class), or 0 until it runs. */
int apc_placer_tid(struct apc_placer *p)
{
    return __atomic_load_n(&p->tid, __ATOMIC_ACQUIRE);
}

/* Stop after the running job (the rest stay unplaced) and join the thread. */
int apc_placer_stop(struct apc_placer *p)
{
    pthread_mutex_lock(&p->lock);
    __atomic_store_n(&p->stop, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&p->lock);
    pthread_cond_signal(&p->wake);
    return pthread_join(p->thread, NULL);
}

int apc_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
    struct uffdio_continue cont;
    memset(&cont, 0, sizeof cont);
    cont.range.start = start;
    cont.range.len = len;
    cont.mode = mode;
    int rc = apc_ioctl(fd, UFFDIO_CONTINUE, &cont);
    return apc_finish(rc, len, cont.mapped, done);
}

int apc_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    struct uffdio_writeprotect wp;
    memset(&wp, 0, sizeof wp);
    wp.range.start = start;
    wp.range.len = len;
    wp.mode = mode;
    return apc_ioctl(fd, UFFDIO_WRITEPROTECT, &wp);
}

int apc_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
#if HAS_POISON
    struct uffdio_poison poison;
    memset(&poison, 0, sizeof poison);
    poison.range.start = start;
    poison.range.len = len;
    poison.mode = mode;
    int rc = apc_ioctl(fd, UFFDIO_POISON, &poison);
    return apc_finish(rc, len, poison.updated, done);
#else
    (void)fd; (void)start; (void)mode;
    return apc_finish(ENOSYS, len, 0, done);
#endif
}

int apc_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done)
{
#if HAS_MOVE
    struct uffdio_move move;
    memset(&move, 0, sizeof move);
    move.dst = dst;
    move.src = src;
    move.len = len;
    move.mode = mode;
    int rc = apc_ioctl(fd, UFFDIO_MOVE, &move);
    return apc_finish(rc, len, move.move, done);
#else
    (void)fd; (void)dst; (void)src; (void)mode;
    return apc_finish(ENOSYS, len, 0, done);
#endif
}

/* ---- reading events --------------------------------------------------- */

static void apc_flatten(const struct uffd_msg *msg, uint64_t *slot)
{
    slot[0] = msg->event;
    switch (msg->event) {
    case UFFD_EVENT_PAGEFAULT:
        slot[1] = msg->arg.pagefault.flags;
        slot[2] = msg->arg.pagefault.address;
        slot[3] = msg->arg.pagefault.feat.ptid;
        break;
    case UFFD_EVENT_FORK:
        slot[1] = msg->arg.fork.ufd;
        slot[2] = 0;
        slot[3] = 0;
        break;
    case UFFD_EVENT_REMAP:
        slot[1] = msg->arg.remap.from;
        slot[2] = msg->arg.remap.to;
        slot[3] = msg->arg.remap.len;
        break;
    case UFFD_EVENT_REMOVE:
    case UFFD_EVENT_UNMAP:
        slot[1] = msg->arg.remove.start;
        slot[2] = msg->arg.remove.end;
        slot[3] = 0;
        break;
    default:
        slot[1] = msg->arg.reserved.reserved1;
        slot[2] = msg->arg.reserved.reserved2;
        slot[3] = msg->arg.reserved.reserved3;
        break;
    }
}

int apc_read_msgs(int fd, void *buf, size_t n, uint64_t *out)
{
    struct uffd_msg *msgs = buf;
    ssize_t got = read(fd, msgs, n * sizeof *msgs);
    if (got < 0)
        return -errno;
    size_t count = (size_t)got / sizeof *msgs;
    for (size_t i = 0; i < count; i++)
        apc_flatten(&msgs[i], out + i * APC_MSG_SLOTS);
    return (int)count;
}

/* ---- memory ----------------------------------------------------------- */

int apc_mmap(uint64_t addr, uint64_t len, int prot, int flags, int fd, uint64_t off, uint64_t *out)
{
    void *p = mmap((void *)(uintptr_t)addr, len, prot, flags, fd, (off_t)off);
    if (p == MAP_FAILED)
        return errno;
    *out = (uint64_t)(uintptr_t)p;
    return 0;
}

int apc_munmap(uint64_t addr, uint64_t len)
{
    return munmap((void *)(uintptr_t)addr, len) == 0 ? 0 : errno;
}

int apc_mremap(uint64_t old_addr, uint64_t old_len, uint64_t new_len, int flags,
               uint64_t new_addr, uint64_t *out)
{
    void *p = mremap((void *)(uintptr_t)old_addr, old_len, new_len, flags,
                     (void *)(uintptr_t)new_addr);
    if (p == MAP_FAILED)
        return errno;
    *out = (uint64_t)(uintptr_t)p;
    return 0;
}

int apc_madvise(uint64_t addr, uint64_t len, int advice)
{
    return madvise((void *)(uintptr_t)addr, len, advice) == 0 ? 0 : errno;
}

int apc_fallocate(int fd, int mode, uint64_t offset, uint64_t len)
{
    return fallocate(fd, mode, (off_t)offset, (off_t)len) == 0 ? 0 : errno;
}

int apc_fstatfs(int fd, uint64_t *fs_type, uint64_t *block_size)
{
    struct statfs st;
    if (fstatfs(fd, &st) != 0)
        return errno;
    *fs_type = (uint64_t)st.f_type;
    *block_size = (uint64_t)st.f_bsize;
    return 0;
}

/* Read (or write `value` to) one byte every `stride` bytes of a range: a
 * user-space access, from C, with the GIL released. Lets a Python thread take
 * a userfaultfd fault without blocking every other thread. */
uint64_t apc_touch(uint64_t addr, uint64_t len, uint64_t stride, int write, int value)
{
    volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)addr;
    uint64_t sum = 0;
    if (stride == 0)
        stride = 1;
    for (uint64_t off = 0; off < len; off += stride) {
        if (write)
            p[off] = (uint8_t)value;
        else
            sum += p[off];
    }
    return sum;
}
