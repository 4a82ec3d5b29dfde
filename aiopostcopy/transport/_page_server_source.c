/*
 * _page_server_source.c: the source's urgent channel answered in C.
 *
 * A source's urgent connection carries mostly Request frames, each a fault
 * (or the faults of one read) waiting on the destination. ps_serve() reads
 * the connection and answers every Request frame it can while the GIL is free:
 * for each run, pread() of the pages from the block's file, a scan for
 * all-zero pages, then the Pages (or Zero) frames of the whole Request in one
 * sendmsg(), byte for byte what the Python path writes (docs/protocol.md,
 * sections 3 and 4.4). It leaves everything else to Python, where the session
 * keeps the rules:
 *
 *   - it answers only a Request whose frame it fully understands (unsigned
 *     integers, runs inside their block, at most PS_MAX_RUNS runs of at most
 *     the block's run limit and PS_MAX_RUN_PAGES, pages of at most its staging,
 *     a Request's pages fitting it);
 *     any other frame, or a read that fails, is "declined": ps_serve() returns
 *     with the frame unconsumed and Python decodes (and rejects) it;
 *   - it logs every run it answered (ps_answer) and hands each batch over
 *     before it would block, so Python accounts them in the session between
 *     one request and the next (with account_idle_ms, after waiting about
 *     that long for another Request of the same burst, at most account_max_ms
 *     after the batch's first answer): by returning, or, with notify_fd, by a
 *     write to that eventfd while it goes on serving (another thread takes the
 *     log with ps_take_log());
 *   - its writes hold the connection's write lock (ps_lock/ps_unlock), which
 *     every other writer of the connection takes too, so a frame stays whole.
 *
 * The destination's end of the same channel is at the bottom of this file:
 * rq_send(), the request lane, writes the Request of a userfaultfd read's
 * faults before Python's bookkeeping, and rq_ask_runs() that of a self-served
 * client's ClientRequest (aiopostcopy/transport/request_lane.py).  Below it,
 * the self-served client's own lane: cl_faults() and cl_placed()
 * (aiopostcopy/transport/client_lane.py).
 */

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/time.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#define PS_VERSION 12        /* the layout page_server.py expects; bumped with any change to it */
#define PS_MAX_RUNS 64       /* runs of one Request answered here */
#define PS_MAX_RUN_PAGES 64  /* pages of one run answered here */
#define PS_MAX_BOUNDS (PS_MAX_RUN_PAGES + 1)  /* zero-stretch bounds of one run, at most */
#define PS_MAX_IOV 1024      /* buffers of one sendmsg */
#define PS_PREFIX 4          /* a frame's big-endian length prefix */

#define PS_DECLINED 1        /* the frame at in_start is Python's */
#define PS_ACCOUNT 2         /* answers logged, nothing more to answer without blocking */
#define PS_EOF 3             /* the peer closed its side (bytes may remain in the buffer) */
#define PS_ERROR (-1)        /* recv failed: error holds errno */

#define PS_TYPE_REQUEST 2
#define PS_TYPE_PAGES 3
#define PS_TYPE_ZERO 4

#define RQ_MAX_PAGES 64      /* pages of one Request written by rq_send */
#define RQ_FRAME_BYTES 2048  /* room for the frame of RQ_MAX_PAGES runs of the largest integers */
#define RQ_PENDING 4096     /* slots of the table of requested pages' fault addresses */
#define RQ_PLACED_FIELDS 5   /* per page rq_place placed: block, page, uffd, address, zero (1: a Zero answer) */
#define RQ_REQUESTED 1       /* asked for on the urgent channel, answer not arrived */
#define RQ_MISSING 0         /* the page state nobody asked for yet (aiopostcopy.core.pages) */
#define CL_NONE 0            /* a self-served client's page states (aiopostcopy.core.pager) */
#define CL_QUEUED 1
#define CL_ASKED 2
#define CL_KNOWN_PLACED 3
#define CL_TYPE_CLIENT_REQUEST 25  /* message codes (aiopostcopy.messages) */
#define CL_TYPE_PLACED 26
#define CL_MAX_FDS 64        /* descriptors one cl_receive() takes with its bytes */
#define PS_MAX_FDS 253       /* descriptors one recvmsg() can bring (Linux's SCM_MAX_FD) */
#define RQ_RECEIVE_FRAMES 32 /* frames one rq_receive_runs() takes at most */
#define RQ_RECEIVE_RUNS 15   /* runs of one frame it takes at most (a fixarray's) */
#define CL_MAX_RUN_PAGES (1ull << 32)  /* a run's longest count (aiopostcopy.messages.MAX_RUN_PAGES) */

struct ps_block {
    int fd;                  /* the block's file, read with pread */
    uint32_t page_size;      /* 0: never answered here */
    uint32_t max_run;        /* longest run answered whole */
    uint64_t pages;          /* pages in the block */
};

struct ps_answer {
    uint64_t first;
    uint32_t block;
    uint32_t count;
    uint32_t zero_pages;     /* pages of the run sent as zeros */
    uint32_t runs;           /* first run of a Request: its number of runs; else 0 */
    uint64_t asked_ns;       /* with timestamps: CLOCK_MONOTONIC when the Request was parsed */
    uint64_t sent_ns;        /* ... and when its answer was written; else 0 */
};

struct ps_server {
    int sock;
    pthread_mutex_t lock;
    const struct ps_block *blocks;
    uint32_t nblocks;
    uint8_t *inbuf;          /* received bytes: [in_start, in_end) not yet consumed */
    size_t in_cap, in_start, in_end;
    uint8_t *pages;          /* one Request's pages, read */
    size_t pages_cap;
    uint8_t *headers;        /* one Request's frame headers */
    size_t headers_cap;
    struct ps_answer *log;
    uint32_t log_cap, logged;
    int timestamps;          /* record asked_ns and sent_ns (tracing) */
    int account_idle_ms;     /* with answers logged, wait this long for another Request (0: none) */
    int account_max_ms;      /* ... but keep answers unaccounted at most this long after the first */
    int account_max_answers; /* ... and wait for no more once this many are logged (0: no bound) */
    int error;
    int notify_fd;           /* an eventfd: answers are handed over by a write to it, not a return (-1: none) */
    int rcvtimeo_ms;         /* the socket's SO_RCVTIMEO as ps_serve() last set it (0: none) */
    uint32_t batch;          /* answers logged since the last hand-over */
    pthread_mutex_t log_lock;    /* log and logged, which another thread takes with notify_fd */
};

/* The mutex is never destroyed: the memory holding it is freed when nothing can lock it. */
int ps_init(struct ps_server *s)
{
    if (pthread_mutex_init(&s->lock, NULL) != 0)
        return -1;
    return pthread_mutex_init(&s->log_lock, NULL) == 0 ? 0 : -1;
}

/* Answers logged, not yet taken (any thread). */
static uint32_t ps_logged(struct ps_server *s)
{
    pthread_mutex_lock(&s->log_lock);
    uint32_t n = s->logged;
    pthread_mutex_unlock(&s->log_lock);
    return n;
}

/* Move up to cap of the oldest answers logged to out, in order (any thread): how many. */
uint32_t ps_take_log(struct ps_server *s, struct ps_answer *out, uint32_t cap)
{
    pthread_mutex_lock(&s->log_lock);
    uint32_t n = s->logged < cap ? s->logged : cap;
    memcpy(out, s->log, (size_t)n * sizeof *out);
    memmove(s->log, s->log + n, (size_t)(s->logged - n) * sizeof *out);
    s->logged -= n;
    pthread_mutex_unlock(&s->log_lock);
    return n;
}

void ps_lock(struct ps_server *s) { pthread_mutex_lock(&s->lock); }
void ps_unlock(struct ps_server *s) { pthread_mutex_unlock(&s->lock); }

/* ---- msgpack, the few forms a Request and an answer use ------------------ */

/* An unsigned integer at p (at most end): its value in *v, the bytes it took, or 0. */
static size_t ps_get_uint(const uint8_t *p, const uint8_t *end, uint64_t *v)
{
    size_t n;
    if (p >= end)
        return 0;
    if (*p <= 0x7f) {
        *v = *p;
        return 1;
    }
    switch (*p) {
    case 0xcc: n = 1; break;
    case 0xcd: n = 2; break;
    case 0xce: n = 4; break;
    case 0xcf: n = 8; break;
    default: return 0;       /* negative, not an integer: Python says why */
    }
    if ((size_t)(end - p) < 1 + n)
        return 0;
    uint64_t x = 0;
    for (size_t i = 1; i <= n; i++)
        x = (x << 8) | p[i];
    *v = x;
    return 1 + n;
}

/* The smallest encoding of v, as msgpack-python packs a non-negative int. */
static uint8_t *ps_put_uint(uint8_t *p, uint64_t v)
{
    int n;
    if (v <= 0x7f) {
        *p++ = (uint8_t)v;
        return p;
    }
    if (v <= 0xff) { *p++ = 0xcc; n = 1; }
    else if (v <= 0xffff) { *p++ = 0xcd; n = 2; }
    else if (v <= 0xffffffffu) { *p++ = 0xce; n = 4; }
    else { *p++ = 0xcf; n = 8; }
    for (int i = n - 1; i >= 0; i--)
        *p++ = (uint8_t)(v >> (8 * i));
    return p;
}

static uint8_t *ps_put_array(uint8_t *p, uint32_t n)
{
    if (n <= 15) {
        *p++ = (uint8_t)(0x90 | n);
    } else if (n <= 0xffff) {
        *p++ = 0xdc;
        *p++ = (uint8_t)(n >> 8);
        *p++ = (uint8_t)n;
    } else {
        *p++ = 0xdd;
        for (int i = 3; i >= 0; i--)
            *p++ = (uint8_t)(n >> (8 * i));
    }
    return p;
}

/* An unsigned integer at p in the smallest encoding (the one ps_put_uint writes), or 0. */
static size_t ps_get_smallest_uint(const uint8_t *p, const uint8_t *end, uint64_t *v)
{
    uint8_t again[9];
    size_t n = ps_get_uint(p, end, v);
    return n && (size_t)(ps_put_uint(again, *v) - again) == n ? n : 0;
}

/* A frame's length prefix: the big-endian length of its msgpack header. */
static uint32_t ps_get_prefix(const uint8_t *f)
{
    return ((uint32_t)f[0] << 24) | ((uint32_t)f[1] << 16) | ((uint32_t)f[2] << 8) | f[3];
}

static void ps_put_prefix(uint8_t *f, uint32_t length)
{
    f[0] = (uint8_t)(length >> 24);
    f[1] = (uint8_t)(length >> 16);
    f[2] = (uint8_t)(length >> 8);
    f[3] = (uint8_t)length;
}

/* ---- one Request --------------------------------------------------------- */

struct ps_run { uint64_t first; uint32_t block; uint32_t count; };

/* Parse the body [p, end) as a Request this server answers: its runs in runs[], their number,
 * or 0 to decline. */
static uint32_t ps_parse_request(const struct ps_server *s, const uint8_t *p, const uint8_t *end,
                                 struct ps_run *runs, size_t *bytes)
{
    uint32_t n;
    if (end - p < 3 || p[0] != 0x92 || p[1] != PS_TYPE_REQUEST)
        return 0;
    p += 2;
    if ((*p & 0xf0) == 0x90) {
        n = *p & 0x0f;
        p += 1;
    } else if (*p == 0xdc && end - p >= 3) {
        n = ((uint32_t)p[1] << 8) | p[2];
        p += 3;
    } else {
        return 0;
    }
    if (n == 0 || n > PS_MAX_RUNS)
        return 0;
    size_t total = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t block, first, count;
        size_t k;
        if (p >= end || *p++ != 0x93)
            return 0;
        if (!(k = ps_get_uint(p, end, &block))) return 0;
        p += k;
        if (!(k = ps_get_uint(p, end, &first))) return 0;
        p += k;
        if (!(k = ps_get_uint(p, end, &count))) return 0;
        p += k;
        if (block >= s->nblocks)
            return 0;
        const struct ps_block *b = &s->blocks[block];
        if (b->page_size == 0 || b->page_size % 8 || count == 0 || count > b->max_run
                || count > PS_MAX_RUN_PAGES || first >= b->pages || count > b->pages - first)
            return 0;
        total += (size_t)count * b->page_size;
        if (total > s->pages_cap)
            return 0;
        runs[i].block = (uint32_t)block;
        runs[i].first = first;
        runs[i].count = (uint32_t)count;
    }
    if (p != end)
        return 0;            /* trailing bytes: not a valid frame */
    *bytes = total;
    return n;
}

static int ps_read(const struct ps_block *b, uint8_t *to, uint64_t first, uint32_t count)
{
    size_t want = (size_t)count * b->page_size, got = 0;
    off_t at = (off_t)(first * b->page_size);
    while (got < want) {
        ssize_t n = pread(b->fd, to + got, want - got, at + (off_t)got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;       /* failed, or the file shrank: Python reports it */
        got += (size_t)n;
    }
    return 0;
}

typedef uint64_t __attribute__((may_alias)) ps_word;

static int ps_is_zero(const uint8_t *page, size_t size)
{
    const ps_word *w = (const ps_word *)page;     /* pages start 8-byte aligned */
    if (w[0] | w[size / 16] | w[size / 8 - 1])    /* most data pages end here */
        return 0;
    uint64_t acc = 0;
    for (size_t i = 0; i < size / 8; i++)
        acc |= w[i];
    return acc == 0;
}

/* The sweep's run, read and scanned with the GIL free: `count` pages from page `first` of the file
 * `fd` into `to`, then their all-zero pages as bounds (flattened [low, high) pairs relative to
 * `first`, as Pages.zeros) in `zeros`, which has room for count + 1 of them.  Returns the number of
 * bounds, or -1 if the read failed or came short: the caller reads again, and reports why. */
int ps_read_run(int fd, uint32_t page_size, uint64_t first, uint32_t count, uint8_t *to, uint32_t *zeros)
{
    struct ps_block b = { .fd = fd, .page_size = page_size };
    if (page_size == 0 || page_size % 8 || ps_read(&b, to, first, count) != 0)
        return -1;
    int n = 0;
    for (uint32_t k = 0; k < count; k++) {
        if (!ps_is_zero(to + (size_t)k * page_size, page_size))
            continue;
        if (n > 0 && zeros[n - 1] == k)
            zeros[n - 1] = k + 1;    /* extends the stretch before it */
        else {
            zeros[n++] = k;
            zeros[n++] = k + 1;
        }
    }
    return n;
}

static void ps_send_all(struct ps_server *s, struct iovec *iov, int n)
{
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    while (n > 0) {
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)n;
        ssize_t sent = sendmsg(s->sock, &msg, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            return;          /* the peer is gone: the answer is dropped, as the Python path drops it */
        }
        while (n > 0 && (size_t)sent >= iov->iov_len) {
            sent -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + sent;
            iov->iov_len -= (size_t)sent;
        }
    }
}

static uint64_t ps_clock_ns(void)
{
    struct timespec t;
    if (clock_gettime(CLOCK_MONOTONIC, &t) != 0)
        return 0;
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static uint64_t ps_now_ns(const struct ps_server *s)
{
    return s->timestamps ? ps_clock_ns() : 0;
}

/* Answer the Request whose runs are parsed: 0 done (logged), -1 declined (nothing sent). */
static int ps_answer(struct ps_server *s, const struct ps_run *runs, uint32_t n)
{
    uint64_t asked = ps_now_ns(s);
    struct ps_answer answers[PS_MAX_RUNS];   /* logged once sent */
    struct iovec iov[PS_MAX_IOV];
    int niov = 0;
    uint8_t *data = s->pages;
    for (uint32_t i = 0; i < n; i++) {
        const struct ps_block *b = &s->blocks[runs[i].block];
        if (ps_read(b, data, runs[i].first, runs[i].count) != 0)
            return -1;
        data += (size_t)runs[i].count * b->page_size;
    }
    uint8_t *h = s->headers, *hend = s->headers + s->headers_cap;
    data = s->pages;
    for (uint32_t i = 0; i < n; i++) {
        const struct ps_block *b = &s->blocks[runs[i].block];
        uint32_t count = runs[i].count, size = b->page_size, zero = 0, nbounds = 0;
        uint32_t bounds[PS_MAX_BOUNDS];
        int in_zero = 0;
        /* the zero stretches, as Pages.zeros bounds relative to the run's first page: a run of
         * at most PS_MAX_RUN_PAGES pages changes between zero and data at most that many times */
        for (uint32_t k = 0; k < count; k++) {
            int z = ps_is_zero(data + (size_t)k * size, size);
            if (z != in_zero) {
                bounds[nbounds++] = k;
                in_zero = z;
            }
            zero += (uint32_t)z;
        }
        if (in_zero)
            bounds[nbounds++] = count;
        /* the frame header: 4 + at most 1 + 1 + 9 * 4 + 3 + 9 * nbounds bytes */
        if ((size_t)(hend - h) < 45 + 9 * (size_t)nbounds || niov + 2 + (int)nbounds / 2 + 1 > PS_MAX_IOV)
            return -1;
        uint8_t *start = h, *p = h + PS_PREFIX;
        uint64_t nbytes = (uint64_t)(count - zero) * size;
        if (nbytes == 0) {
            *p++ = 0x94;
            *p++ = PS_TYPE_ZERO;
            p = ps_put_uint(p, runs[i].block);
            p = ps_put_uint(p, runs[i].first);
            p = ps_put_uint(p, count);
        } else {
            *p++ = 0x96;
            *p++ = PS_TYPE_PAGES;
            p = ps_put_uint(p, runs[i].block);
            p = ps_put_uint(p, runs[i].first);
            p = ps_put_uint(p, count);
            p = ps_put_uint(p, nbytes);
            p = ps_put_array(p, nbounds);
            for (uint32_t k = 0; k < nbounds; k++)
                p = ps_put_uint(p, bounds[k]);
        }
        ps_put_prefix(start, (uint32_t)(p - start - PS_PREFIX));
        iov[niov].iov_base = start;
        iov[niov++].iov_len = (size_t)(p - start);
        h = p;
        /* the data pages: the stretches between the zero ones */
        uint32_t page = 0;
        for (uint32_t k = 0; k <= nbounds; k += 2) {
            uint32_t low = k < nbounds ? bounds[k] : count, high = k < nbounds ? bounds[k + 1] : count;
            if (low > page) {
                iov[niov].iov_base = data + (size_t)page * size;
                iov[niov++].iov_len = (size_t)(low - page) * size;
            }
            page = high;
        }
        data += (size_t)count * size;
        struct ps_answer *a = &answers[i];
        a->block = runs[i].block;
        a->first = runs[i].first;
        a->count = count;
        a->zero_pages = zero;
        a->runs = i == 0 ? n : 0;
        a->asked_ns = asked;
    }
    pthread_mutex_lock(&s->lock);
    ps_send_all(s, iov, niov);
    pthread_mutex_unlock(&s->lock);
    uint64_t sent = ps_now_ns(s);
    for (uint32_t i = 0; i < n; i++)
        answers[i].sent_ns = sent;
    pthread_mutex_lock(&s->log_lock);     /* room for n: ps_serve_loop() checked it before parsing */
    memcpy(s->log + s->logged, answers, (size_t)n * sizeof answers[0]);
    s->logged += n;
    pthread_mutex_unlock(&s->log_lock);
    s->batch += n;
    return 0;
}

/* ---- the loop ------------------------------------------------------------ */

/* With answers logged: how long (ms) recv() may wait for another Request before they go back
 * to Python, the lesser of account_idle_ms and what is left of account_max_ms since the first
 * of them was logged (at first_ns); <= 0: no wait (a full log, or account_max_answers logged,
 * or no account_idle_ms: none either). */
static int ps_account_wait(struct ps_server *s, uint64_t first_ns)
{
    if (s->account_idle_ms <= 0 || s->log_cap - ps_logged(s) < PS_MAX_RUNS
            || (s->account_max_answers > 0 && s->batch >= (uint32_t)s->account_max_answers))
        return 0;
    int64_t left_ms = ((int64_t)s->account_max_ms * 1000000 - (int64_t)(ps_clock_ns() - first_ns)) / 1000000;
    return left_ms < s->account_idle_ms ? (int)left_ms : s->account_idle_ms;
}

/* Give the socket SO_RCVTIMEO of ms (0: none) unless it has it: 0 on failure (errno set). */
static int ps_receive_timeout(struct ps_server *s, int ms)
{
    if (s->rcvtimeo_ms == ms)
        return 0;
    struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };
    if (setsockopt(s->sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0)
        return -1;
    s->rcvtimeo_ms = ms;
    return 0;
}

static int ps_serve_loop(struct ps_server *s);

/* With notify_fd: tell the thread that takes the log (one write to the eventfd); a new batch
 * begins. A failed write (the counter full: never in practice) leaves the answers logged for the
 * next hand-over or return. */
static void ps_hand_over(struct ps_server *s)
{
    uint64_t one = 1;
    while (write(s->notify_fd, &one, sizeof one) < 0 && errno == EINTR)
        ;
    s->batch = 0;
}

/* Answers logged that must go back to Python before the end of the stream or an error is told:
 * without notify_fd (with it, ps_serve() hands them over whatever it returns). */
static int ps_answers_first(struct ps_server *s)
{
    return s->notify_fd < 0 && ps_logged(s);
}

/* See ps_serve_loop(); the socket leaves with no SO_RCVTIMEO, as Python's blocking reads expect. */
int ps_serve(struct ps_server *s)
{
    s->batch = 0;            /* the log was taken, or (notify_fd) handed over, when the last call returned */
    int status = ps_serve_loop(s);
    if (ps_receive_timeout(s, 0) != 0 && status != PS_ERROR) {
        s->error = errno;
        status = PS_ERROR;   /* answers logged stay logged: Python accounts them, then reports this */
    }
    if (s->notify_fd >= 0 && ps_logged(s))
        ps_hand_over(s);     /* whatever the return: the thread watching the eventfd takes them */
    return status;
}

/*
 * Answer Requests from the buffer and the socket until Python is needed:
 *   PS_DECLINED  the frame at in_start is not one answered here;
 *   PS_ACCOUNT   a batch of answers is logged and no whole frame is buffered or waiting in the
 *                socket (without notify_fd), or the log is full, or (without notify_fd) the
 *                end of the stream or an error came with answers still logged (met again by
 *                the next call);
 *   PS_EOF       the peer closed (a partial frame may remain);
 *   PS_ERROR     recv failed, error = errno.
 * Called without the GIL; blocks in recv only with no batch logged. With a batch logged it
 * reads what the socket holds already without waiting, so a burst of Requests is answered
 * before the batch is handed over (one return to Python, one GIL hand-over, for the burst); the
 * end of the stream or an error met then is met again, and reported, by the next call.
 * With account_idle_ms > 0, when a batch is logged and the socket holds nothing, recv() waits
 * about account_idle_ms (the socket's SO_RCVTIMEO, set only when it changes; the kernel rounds
 * it up to its timer tick, 4 ms at HZ=250, and may overrun account_max_ms by one) for another
 * Request, so that Requests arriving microseconds apart (a burst of faults) are answered before
 * one hand-over, and the next Request wakes the recv() itself (no poll() and second recv()
 * between it and its answer); but it never keeps a batch longer than account_max_ms after its
 * first answer was logged (CLOCK_MONOTONIC), nor waits once account_max_answers are logged (a
 * short batch is handed over right after an answer, while the next fault's Request is still on
 * its way), and a full log returns at once. The end of the stream, an error, or a shutdown() of
 * the socket (how the source stops the thread) ends the wait: the answers are returned first as
 * above. account_idle_ms == 0: no wait, the batch is handed over as soon as the socket holds
 * nothing.
 * With notify_fd >= 0 a batch is handed over by a write to that eventfd instead of a return:
 * another thread takes the log (ps_take_log(), under log_lock) while this one goes on answering,
 * and never needs the GIL for it. It still returns for a full log, a declined frame, the end of
 * the stream and an error, and ps_serve() then hands over what is logged the same way.
 */
static int ps_serve_loop(struct ps_server *s)
{
    struct ps_run runs[PS_MAX_RUNS];
    /* when the batch's first answer was logged (0: none; only with account_idle_ms) */
    uint64_t first_ns = 0;
    for (;;) {
        size_t avail = s->in_end - s->in_start;
        if (avail >= PS_PREFIX) {
            const uint8_t *f = s->inbuf + s->in_start;
            size_t size = ps_get_prefix(f);
            if (avail >= 6 && (f[4] != 0x92 || f[5] != PS_TYPE_REQUEST))
                return PS_DECLINED;                   /* another message */
            if (size > s->in_cap - PS_PREFIX)
                return PS_DECLINED;                   /* larger than this buffer */
            if (avail >= PS_PREFIX + size) {
                if (s->log_cap - ps_logged(s) < PS_MAX_RUNS)
                    return PS_ACCOUNT;                /* a full log: taken on return, notify_fd or not */
                size_t bytes;
                uint32_t n = ps_parse_request(s, f + PS_PREFIX, f + PS_PREFIX + size, runs, &bytes);
                if (n == 0 || ps_answer(s, runs, n) != 0)
                    return PS_DECLINED;
                s->in_start += PS_PREFIX + size;
                if (first_ns == 0 && s->account_idle_ms > 0)
                    first_ns = ps_clock_ns();
                continue;
            }
        }
        if (s->in_start) {                            /* keep the partial frame at the front */
            memmove(s->inbuf, s->inbuf + s->in_start, avail);
            s->in_start = 0;
            s->in_end = avail;
        }
        /* no batch: wait as long as it takes; a batch: a little, for the burst's next Request
         * (the wait's SO_RCVTIMEO), or not at all (MSG_DONTWAIT) */
        int wait = s->batch ? ps_account_wait(s, first_ns) : 0;
        int flags = s->batch && wait <= 0 ? MSG_DONTWAIT : 0;
        if (flags == 0 && ps_receive_timeout(s, wait) != 0) {
            if (ps_answers_first(s))
                return PS_ACCOUNT;                    /* the next call meets the failure again */
            s->error = errno;
            return PS_ERROR;
        }
        ssize_t got = recv(s->sock, s->inbuf + s->in_end, s->in_cap - s->in_end, flags);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (s->batch && s->notify_fd >= 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                ps_hand_over(s);                      /* nothing came in time: the batch goes, serving goes on */
                first_ns = 0;
                continue;
            }
            if (ps_answers_first(s))                  /* nothing came (EAGAIN: in time), or an error: account first */
                return PS_ACCOUNT;
            s->error = errno;
            return PS_ERROR;
        }
        if (got == 0)
            return ps_answers_first(s) ? PS_ACCOUNT : PS_EOF;
        s->in_end += (size_t)got;
    }
}

/* ---- the destination's request lane -----------------------------------
 *
 * The other end of the urgent channel. When a userfaultfd read brings page
 * faults, rq_send() writes their Request before Python's bookkeeping runs:
 * it translates each fault's address with the fd's mapping table, keeps the
 * pages whose state byte is MISSING (each once, at most `budget` of them),
 * encodes one Request frame, byte for byte what the Python encoder makes
 * (docs/protocol.md, section 4.2: the pages in the order faulted, a page that
 * follows its predecessor in the same block joined to its run), and send()s it
 * without blocking. It changes no state: the session then accounts the same
 * faults the usual way, and the caller writes the rest of a short send.
 */

struct rq_pending {          /* where the fault that asked for a page was read */
    uint64_t block;
    uint64_t page;
    uint64_t address;        /* the page's address in the faulting fd's space */
    int uffd;                /* -1: a free slot */
};

struct rq_lane {
    uint8_t *const *states;  /* per block: one state byte per page */
    const uint64_t *pages;   /* per block: pages */
    const uint64_t *page_size;
    uint32_t nblocks;
    struct rq_pending *pending;  /* RQ_PENDING slots, by page (a newer page takes a slot over) */
    const uint8_t *zero_page;    /* zeros, at least the largest page: a Zero answer's source (NULL: not placed here) */
};

struct rq_reader {            /* rq_receive_runs()'s state, one per control connection */
    uint8_t *buf;                /* where it receives, cap bytes */
    size_t cap;
    uint32_t type;               /* the frames taken: [type, [[block, first, count], ...]] */
    uint32_t max_runs;           /* of at most max_runs runs (a fixarray's: never more than RQ_RECEIVE_RUNS) */
    uint64_t max_blocks;         /* each block below this */
    int fds[PS_MAX_FDS];         /* descriptors that came along (the caller owns them) */
    uint32_t nfds;
    int truncated;               /* the kernel had more descriptors (the extra ones are closed) */
    uint64_t runs[3 * RQ_RECEIVE_FRAMES * RQ_RECEIVE_RUNS];
    uint32_t frame_runs[RQ_RECEIVE_FRAMES];
    uint32_t nframes;
    size_t consumed;             /* bytes of the frames taken */
};

static struct rq_pending *rq_slot(const struct rq_lane *lane, uint64_t block, uint64_t page)
{
    uint64_t h = (page ^ (block * 0x9e3779b97f4a7c15ull)) * 0xff51afd7ed558ccdull;
    return &lane->pending[(h >> 32) % RQ_PENDING];
}

/* Remember that `page` of `block` is asked for and is to be placed through `uffd` at `address`
 * (the page's address in that fd's space): a page requested for a fault the lane did not read,
 * placed through the service's own mapping. */
void rq_remember(struct rq_lane *lane, uint64_t block, uint64_t page, uint64_t address, int uffd)
{
    if (block >= lane->nblocks || page >= lane->pages[block])
        return;
    struct rq_pending *e = rq_slot(lane, block, page);
    e->block = block;
    e->page = page;
    e->address = address;
    e->uffd = uffd;
}

/* Forget every requested page's fault read from `uffd` (the fd is retired, or its mappings changed). */
void rq_forget_fd(struct rq_lane *lane, int uffd)
{
    for (uint32_t i = 0; i < RQ_PENDING; i++)
        if (lane->pending[i].uffd == uffd)
            lane->pending[i].uffd = -1;
}

/* Where `address` falls in a mapping table: 0 with *block, *page and *page_address (the page's
 * address in that space) set, or -1 (no entry covers it, or it names no page of the blocks).
 * table: n entries of (start, length, block, offset), sorted by start, not overlapping; the
 * blocks: nblocks of them, each of pages[b] pages of page_size[b] bytes. */
static int ps_translate(const uint64_t *table, uint32_t n, uint32_t nblocks, const uint64_t *pages,
                        const uint64_t *page_size, uint64_t address, uint64_t *block, uint64_t *page,
                        uint64_t *page_address)
{
    uint32_t low = 0, high = n;
    while (low < high) {  /* the first entry starting after address */
        uint32_t mid = low + (high - low) / 2;
        if (table[4 * mid] <= address)
            low = mid + 1;
        else
            high = mid;
    }
    if (low == 0)
        return -1;
    const uint64_t *e = table + 4 * (low - 1);
    if (address - e[0] >= e[1] || e[2] >= nblocks)
        return -1;
    uint64_t b = e[2], p = (e[3] + address - e[0]) / page_size[b];
    if (p >= pages[b])
        return -1;
    *block = b;
    *page = p;
    *page_address = e[0] + p * page_size[b] - e[3];
    return 0;
}

/* The frame of a message of type `code` carrying `count` (<= RQ_MAX_PAGES) pages as runs, (block,
 * page) pairs in `asked` (a Request, or a self-served client's ClientRequest), into `frame`
 * (RQ_FRAME_BYTES): its length, or -1 for too many pages. */
static int rq_encode_runs(uint8_t code, const uint64_t *asked, uint32_t count, uint8_t *frame)
{
    uint64_t run_block[RQ_MAX_PAGES], run_first[RQ_MAX_PAGES], run_count[RQ_MAX_PAGES];
    uint32_t runs = 0;
    if (count > RQ_MAX_PAGES)
        return -1;
    for (uint32_t i = 0; i < count; i++) {
        uint64_t b = asked[2 * i], p = asked[2 * i + 1];
        if (runs && run_block[runs - 1] == b && p > run_first[runs - 1]  /* no wrap at 2^64 */
            && p - run_first[runs - 1] == run_count[runs - 1]) {
            run_count[runs - 1]++;
            continue;
        }
        run_block[runs] = b;
        run_first[runs] = p;
        run_count[runs] = 1;
        runs++;
    }
    uint8_t *p = ps_put_array(frame + PS_PREFIX, 2);
    *p++ = code;
    p = ps_put_array(p, runs);
    for (uint32_t r = 0; r < runs; r++) {
        p = ps_put_array(p, 3);
        p = ps_put_uint(p, run_block[r]);
        p = ps_put_uint(p, run_first[r]);
        p = ps_put_uint(p, run_count[r]);
    }
    ps_put_prefix(frame, (uint32_t)(p - frame - PS_PREFIX));
    return (int)(p - frame);
}

/* The Request frame of `count` (<= RQ_MAX_PAGES) pages, (block, page) pairs in `asked`, into
 * `frame` (RQ_FRAME_BYTES): its length, or -1 for too many pages. */
int rq_encode(const uint64_t *asked, uint32_t count, uint8_t *frame)
{
    return rq_encode_runs(PS_TYPE_REQUEST, asked, count, frame);
}

#define RQ_RUN_MAX_BYTES 22u  /* the longest run [block, first, count] as a shortcut takes it: 1 + 3 + 9 + 9 */

/* The frame at the front of buf[0, len) when it is whole and is [type, [[block, first, count], ...]]
 * of 1 to max_runs runs, each a fixarray of three unsigned integers (the form the encoders here
 * and in Python write): its runs in `runs` ((block, first, count) triples, *nruns of them) and its
 * length, prefix included, returned. What the decoder's own shortcut checks holds too: the frame
 * is at most RQ_RUN_MAX_BYTES a run (plus its 3 bytes of arrays and type), block < max_blocks,
 * first < 2^46, 1 <= count <= 2^32 (whether a run lies inside the blocks is the caller's). 0 for anything else (another message, another encoding, a frame not
 * whole, trailing bytes): the decoder then decodes it, and says why when it is bad. */
size_t rq_take_runs(const uint8_t *buf, size_t len, uint32_t type, uint32_t max_runs, uint64_t max_blocks,
                    uint64_t *runs, uint32_t *nruns)
{
    *nruns = 0;
    if (len < PS_PREFIX + 4)
        return 0;
    uint32_t size = ps_get_prefix(buf);
    const uint8_t *h = buf + PS_PREFIX, *end = h + size;
    if (len - PS_PREFIX < size || size < 4 || h[0] != 0x92 || h[1] != type || h[2] < 0x91 || h[2] > 0x9f)
        return 0;
    uint32_t k = h[2] - 0x90u;
    if (k > max_runs || size > 3 + RQ_RUN_MAX_BYTES * k)  /* the decoder's shortcut's bound, as wire.py's */
        return 0;
    const uint8_t *q = h + 3;
    for (uint32_t j = 0; j < k; j++) {
        uint64_t *run = runs + 3 * j;
        size_t took = q < end && *q == 0x93;
        q += took;
        for (int v = 0; v < 3 && took; v++)
            q += took = ps_get_uint(q, end, &run[v]);
        if (!took || run[0] >= max_blocks || run[1] >= (1ull << 46) || run[2] == 0 || run[2] > (1ull << 32))
            return 0;
    }
    if (q != end)
        return 0;
    *nruns = k;
    return PS_PREFIX + size;
}

/* One recvmsg() of the control socket `sock` into buf[0, cap), non-blocking, descriptors taken
 * with it: in fds (*nfds of them, at most max_fds, which must not exceed PS_MAX_FDS; *truncated
 * when the kernel had more, the extra ones closed). Returns the bytes received (0: the peer
 * closed), or -errno (-EAGAIN: nothing there). */
static int ps_recv_fds(int sock, uint8_t *buf, size_t cap, int *fds, uint32_t max_fds, uint32_t *nfds,
                       int *truncated)
{
    union { struct cmsghdr align; uint8_t space[CMSG_SPACE(sizeof(int) * PS_MAX_FDS)]; } control;
    struct iovec iov = { .iov_base = buf, .iov_len = cap };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                          .msg_controllen = CMSG_SPACE(sizeof(int) * (max_fds < PS_MAX_FDS ? max_fds : PS_MAX_FDS)) };
    ssize_t got;
    *nfds = 0;
    *truncated = 0;
    do
        got = recvmsg(sock, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    while (got < 0 && errno == EINTR);
    if (got < 0)
        return -errno;
    *truncated = (msg.msg_flags & MSG_CTRUNC) != 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        const uint8_t *data = CMSG_DATA(c);
        uint32_t n = (uint32_t)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (uint32_t k = 0; k < n; k++) {  /* the space rounds up: more than max_fds may come */
            int fd;
            memcpy(&fd, data + k * sizeof(int), sizeof(int));
            if (*nfds < max_fds) {
                fds[(*nfds)++] = fd;
            } else {
                close(fd);
                *truncated = 1;
            }
        }
    }
    return (int)got;
}

/* The service side of a control connection, as cl_receive() is the client's: one recvmsg() of
 * `sock` into r->buf[0, r->cap), the decoder holding nothing (the bytes begin a frame), then, when
 * no descriptors came along, the whole frames at its front that rq_take_runs() takes (of r->type,
 * up to r->max_runs runs each, blocks below r->max_blocks), at most RQ_RECEIVE_FRAMES of them:
 * frame i's runs follow frame i-1's in r->runs, r->frame_runs[i] of them; r->nframes frames,
 * r->consumed bytes. Returns the bytes received (0: the peer closed), or -errno (-EAGAIN: nothing
 * there); the descriptors received in r->fds (r->nfds, r->truncated as ps_recv_fds() sets them).
 * What follows the frames taken is the decoder's. */
int rq_receive_runs(struct rq_reader *r, int sock)
{
    r->nframes = 0;
    r->consumed = 0;
    int got = ps_recv_fds(sock, r->buf, r->cap, r->fds, PS_MAX_FDS, &r->nfds, &r->truncated);
    if (got <= 0 || r->nfds || r->truncated)
        return got;
    size_t at = 0;
    uint64_t *next = r->runs;
    while (r->nframes < RQ_RECEIVE_FRAMES) {
        uint32_t n;
        size_t len = rq_take_runs(r->buf + at, (size_t)got - at, r->type, r->max_runs, r->max_blocks, next, &n);
        if (!len)
            break;
        r->frame_runs[r->nframes++] = n;
        next += 3 * (size_t)n;
        at += len;
    }
    r->consumed = at;
    return got;
}

/* Whether (block, page) is among the first n pairs of `asked`. */
static int rq_seen(const uint64_t *asked, uint32_t n, uint64_t block, uint64_t page)
{
    for (uint32_t j = 0; j < n; j++)
        if (asked[2 * j] == block && asked[2 * j + 1] == page)
            return 1;
    return 0;
}

/* send() a Request frame without blocking: *sent is what the socket took (0 when it failed: the
 * caller writes it all, and learns why). */
static void rq_write(int sock, const uint8_t *frame, int len, int *frame_len, int *sent)
{
    ssize_t w;
    *frame_len = len;
    do
        w = send(sock, frame, (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (w < 0 && errno == EINTR);
    *sent = w < 0 ? 0 : (int)w;
}

int rq_send(const struct rq_lane *lane, int sock, int uffd, const uint64_t *slots, uint32_t count,
            uint64_t pagefault_code, const uint64_t *table, uint32_t ntable, uint32_t budget,
            uint64_t *asked, uint8_t *frame, int *frame_len, int *sent)
{
    uint32_t n = 0;
    *frame_len = 0;
    *sent = 0;
    if (budget > RQ_MAX_PAGES)
        budget = RQ_MAX_PAGES;
    for (uint32_t i = 0; i < count && n < budget; i++) {
        const uint64_t *slot = slots + 4 * i;
        uint64_t block, page, page_address;
        if (slot[0] != pagefault_code || ps_translate(table, ntable, lane->nblocks, lane->pages, lane->page_size,
                                                      slot[2], &block, &page, &page_address))
            continue;
        if (lane->states[block][page] != RQ_MISSING || rq_seen(asked, n, block, page))
            continue;
        asked[2 * n] = block;
        asked[2 * n + 1] = page;
        n++;
        struct rq_pending *e = rq_slot(lane, block, page);
        e->block = block;
        e->page = page;
        e->address = page_address;
        e->uffd = uffd;
    }
    if (n == 0)
        return 0;
    rq_write(sock, frame, rq_encode(asked, n, frame), frame_len, sent);
    return (int)n;
}

/* The Request of a self-served client's faults (a ClientRequest's runs, `nruns` triples of block,
 * first, count in `runs`), written before the session accounts them, as rq_send() does for a read of
 * a delegated fd: each run of one page inside the blocks whose state byte is MISSING, once each, at
 * most `budget` of them, is asked for and remembered as placed through `uffd`, the service's own,
 * at bases[block] + page * page size (its address in the service's mapping). Returns how many
 * pages it asked for, listed in `asked` (0: none, nothing written). It changes no state. */
int rq_ask_runs(struct rq_lane *lane, int sock, int uffd, const uint64_t *bases, const uint64_t *runs, uint32_t nruns,
                uint32_t budget, uint64_t *asked, uint8_t *frame, int *frame_len, int *sent)
{
    uint32_t n = 0;
    *frame_len = 0;
    *sent = 0;
    if (budget > RQ_MAX_PAGES)
        budget = RQ_MAX_PAGES;
    for (uint32_t i = 0; i < nruns && n < budget; i++) {
        uint64_t block = runs[3 * i], page = runs[3 * i + 1];
        if (runs[3 * i + 2] != 1 || block >= lane->nblocks || page >= lane->pages[block]
            || lane->states[block][page] != RQ_MISSING || rq_seen(asked, n, block, page))
            continue;
        asked[2 * n] = block;
        asked[2 * n + 1] = page;
        n++;
        rq_remember(lane, block, page, bases[block] + page * lane->page_size[block], uffd);
    }
    if (n == 0)
        return 0;
    rq_write(sock, frame, rq_encode(asked, n, frame), frame_len, sent);
    return (int)n;
}

/* ---- the reply lane ------------------------------------------------------
 *
 * rq_place() reads the urgent channel's bytes that the decoder holds, from
 * a frame's start: while they begin with a whole answer of one page, in the
 * exact form the source writes with the smallest integer encodings (a Pages
 * frame [3, block, page, 1, nbytes, []] and its payload, or a Zero frame
 * [4, block, page, 1]), for a page that is REQUESTED and whose fault the
 * request lane remembers, it places the page with UFFDIO_COPY through the
 * userfaultfd that fault was read from, at the fault's page (from the payload,
 * or from the lane's zero page): one call puts the page in the shared memory
 * and wakes the faulting thread. It logs each page placed and stops at
 * anything else (another frame, a page without a remembered fault, a copy
 * that fails): the decoder takes it from there, and the caller accounts the
 * placed pages in the session, changing their state.
 */

int rq_place(struct rq_lane *lane, const uint8_t *buf, size_t len, uint64_t *placed, uint32_t max_placed,
             size_t *consumed)
{
    uint32_t n = 0;
    size_t at = 0;
    *consumed = 0;
    while (n < max_placed && len - at >= PS_PREFIX + 5) {
        const uint8_t *f = buf + at;
        uint32_t size = ps_get_prefix(f);
        const uint8_t *h = f + PS_PREFIX, *end = h + size;
        if (size > 31 || len - at - PS_PREFIX < size)
            break;
        int zero = size >= 5 && h[0] == 0x94 && h[1] == PS_TYPE_ZERO;
        if (zero)
            ;  /* [4, block, page, count]: no payload */
        else if (size >= 7 && h[0] == 0x96 && h[1] == PS_TYPE_PAGES && end[-1] == 0x90)
            end--;  /* [3, block, page, count, nbytes, []]: the empty zeros array last */
        else
            break;
        uint64_t field[4] = {0, 0, 0, 0};  /* block, page, count, payload bytes */
        const uint8_t *q = h + 2;
        size_t k = 1;
        for (int i = 0; i < (zero ? 3 : 4) && k; i++)
            q += k = ps_get_smallest_uint(q, end, &field[i]);
        uint64_t block = field[0], page = field[1], nbytes = zero ? 0 : field[3];
        if (!k || q != end || field[2] != 1 || block >= lane->nblocks || page >= lane->pages[block])
            break;
        if (zero ? lane->zero_page == NULL
                 : nbytes != lane->page_size[block] || len - at - PS_PREFIX - size < nbytes)
            break;
        if (lane->states[block][page] != RQ_REQUESTED)
            break;
        struct rq_pending *e = rq_slot(lane, block, page);
        if (e->uffd < 0 || e->block != block || e->page != page)
            break;
        struct uffdio_copy copy = {
            .dst = e->address, .len = lane->page_size[block], .mode = 0,
            .src = (uint64_t)(uintptr_t)(zero ? lane->zero_page : h + size),
        };
        if (ioctl(e->uffd, UFFDIO_COPY, &copy) != 0 || copy.copy != (int64_t)copy.len)
            break;  /* nothing placed, or a part: the decoder's way finds out which (EEXIST, EAGAIN, ...) */
        placed[RQ_PLACED_FIELDS * n] = block;
        placed[RQ_PLACED_FIELDS * n + 1] = page;
        placed[RQ_PLACED_FIELDS * n + 2] = (uint64_t)e->uffd;
        placed[RQ_PLACED_FIELDS * n + 3] = e->address;
        placed[RQ_PLACED_FIELDS * n + 4] = (uint64_t)zero;
        n++;
        e->uffd = -1;
        at += PS_PREFIX + size + nbytes;
    }
    *consumed = at;
    return (int)n;
}

/* ---- a self-served client's lane --------------------------------------------
 *
 * A self-served client serves its own userfaultfd: its pager thread reads the
 * faults, asks the service for their pages in a ClientRequest and, when a
 * Placed says a run is in the shared memory, wakes the threads waiting there
 * (docs/protocol.md, section 6). The pager keeps one state byte per page
 * (aiopostcopy/core/pager.py: CL_NONE, CL_QUEUED, CL_ASKED, CL_KNOWN_PLACED).
 * These are that path's per-page steps, each one C call over those bytes:
 *
 *   - cl_faults() takes the flattened messages of one read: each page fault's
 *     address is translated with the client's mapping table, a page nobody
 *     asked for becomes ASKED and goes in one ClientRequest frame (byte for
 *     byte what the Python encoder makes), a page asked for already is joined,
 *     a page known placed (dropped since: a fault again) goes back to NONE and
 *     is woken by the caller. It stops at the first message that is not a
 *     page fault, or whose address no mapping covers: Python takes those;
 *   - cl_placed() takes the control socket's bytes at a frame's start: while
 *     they are Placed frames of a few runs inside the blocks (the form the
 *     service writes), their pages become KNOWN_PLACED and each run is woken
 *     with UFFDIO_WAKE. It stops at anything else, which the decoder decodes;
 *     cl_receive() makes the socket's recvmsg() and then calls it.
 *
 * The caller uses cl_faults() only while the pager queues nothing (every
 * fault read is asked for at once), and cl_receive() while the client runs
 * and its decoder holds nothing; the lane keeps the pager's counts (cl_lane's
 * totals) and the caller adds them to its own.
 */

struct cl_lane {
    uint8_t *const *states;   /* per block: the pager's state byte per page */
    const uint64_t *pages;    /* per block: pages */
    const uint64_t *page_size;
    const uint64_t *base;     /* per block: its address here (each block mapped whole, once) */
    uint32_t nblocks;
    const uint64_t *table;    /* (start, length, block, offset) entries, sorted by start */
    uint32_t ntable;
    int uffd;
    uint64_t faults, joined, woken_at_once, requested_pages, requests, placed_pages, wakes;  /* totals */
};

/* One read's flattened messages (`count` of CL slots each, `slots`): returns how many were taken,
 * from the first; the rest start with a message that is not a page fault or lies outside the
 * table. The pages made ASKED are listed in `asked` ((block, page) pairs, *nasked of them, at most
 * RQ_MAX_PAGES: the read stops when it is full), their ClientRequest frame is in `frame`
 * (*frame_len bytes, 0: none) and, when `sock` is not -1, send()s it there without blocking
 * (*sent: the bytes the socket took; the caller holds every other writer off and writes the rest);
 * the (address, length) of each page known placed that faulted again is in `wakes` (*nwakes, at
 * most `count`), and each fault's thread id in `tids`. */
int cl_faults(struct cl_lane *lane, const uint64_t *slots, uint32_t count, uint64_t pagefault_code,
              uint64_t *asked, uint32_t *nasked, uint64_t *wakes, uint32_t *nwakes, uint64_t *tids,
              uint8_t *frame, int *frame_len, int sock, int *sent)
{
    uint32_t i, n = 0, w = 0;
    for (i = 0; i < count; i++) {
        const uint64_t *slot = slots + 4 * i;
        uint64_t block, page, page_address;
        if (slot[0] != pagefault_code || ps_translate(lane->table, lane->ntable, lane->nblocks, lane->pages,
                                                      lane->page_size, slot[2], &block, &page, &page_address))
            break;
        uint8_t *state = &lane->states[block][page];
        if (*state == CL_NONE) {
            if (n == RQ_MAX_PAGES)
                break;
            *state = CL_ASKED;
            asked[2 * n] = block;
            asked[2 * n + 1] = page;
            n++;
        } else if (*state == CL_KNOWN_PLACED) {  /* dropped since: a fault again asks again */
            *state = CL_NONE;
            wakes[2 * w] = slot[2] - slot[2] % lane->page_size[block];
            wakes[2 * w + 1] = lane->page_size[block];
            w++;
        } else {
            lane->joined++;  /* queued or asked for: the Placed that answers wakes it too */
        }
        tids[i] = slot[3];
    }
    lane->faults += i;
    lane->woken_at_once += w;
    lane->wakes += w;
    *nasked = n;
    *nwakes = w;
    *frame_len = 0;
    *sent = 0;
    if (n) {
        lane->requested_pages += n;
        lane->requests++;
        int len = rq_encode_runs(CL_TYPE_CLIENT_REQUEST, asked, n, frame);
        if (sock >= 0)
            rq_write(sock, frame, len, frame_len, sent);
        else
            *frame_len = len;
    }
    return (int)i;
}

/* The Placed frames at the front of buf[0, len): each run's pages made KNOWN_PLACED and the run
 * woken through the lane's userfaultfd. Returns the bytes of the frames taken (*consumed, a
 * frame's end) and, in *settled, how many of their pages were ASKED; the runs of the frames in
 * `runs` ((block, first, count) triples, *nruns, at most max_runs). 0 from the call, or -errno
 * when a wake failed (the runs of that frame up to the one that failed are marked; the client
 * fails). */
int cl_placed(struct cl_lane *lane, const uint8_t *buf, size_t len, uint64_t *runs, uint32_t max_runs,
              uint32_t *nruns, uint64_t *settled, size_t *consumed)
{
    size_t at = 0;
    uint32_t r = 0;
    *settled = 0;
    *consumed = 0;
    *nruns = 0;
    while (len - at >= PS_PREFIX + 3) {
        const uint8_t *f = buf + at;
        uint32_t size = ps_get_prefix(f);
        const uint8_t *h = f + PS_PREFIX, *end = h + size;
        if (len - at - PS_PREFIX < size || size < 3 || h[0] != 0x92 || h[1] != CL_TYPE_PLACED)
            break;
        uint32_t k = h[2] - 0x90u;  /* the runs' fixarray */
        if (h[2] < 0x91 || h[2] > 0x9f || r + k > max_runs)
            break;
        const uint8_t *q = h + 3;
        uint32_t j;
        for (j = 0; j < k; j++) {
            uint64_t *run = runs + 3 * (r + j);
            size_t took = q < end && *q == 0x93;
            q += took;
            for (int v = 0; v < 3 && took; v++)
                q += took = ps_get_uint(q, end, &run[v]);
            if (!took || run[0] >= lane->nblocks || run[2] == 0 || run[2] > CL_MAX_RUN_PAGES
                || run[1] >= lane->pages[run[0]] || run[2] > lane->pages[run[0]] - run[1])
                break;  /* not a run inside the blocks, or longer than a run may be: the decoder says why */
        }
        if (j < k || q != end)
            break;
        for (j = r; j < r + k; j++) {
            uint64_t block = runs[3 * j], first = runs[3 * j + 1], n = runs[3 * j + 2];
            uint8_t *state = lane->states[block] + first;
            for (uint64_t p = 0; p < n; p++) {
                *settled += state[p] == CL_ASKED;
                state[p] = CL_KNOWN_PLACED;
            }
            struct uffdio_range range = {
                .start = lane->base[block] + first * lane->page_size[block], .len = n * lane->page_size[block],
            };
            lane->placed_pages += n;
            lane->wakes++;
            if (ioctl(lane->uffd, UFFDIO_WAKE, &range) != 0) {
                int err = errno;
                *nruns = j + 1;
                *consumed = at + PS_PREFIX + size;
                return -err;
            }
        }
        r += k;
        at += PS_PREFIX + size;
    }
    *nruns = r;
    *consumed = at;
    return 0;
}

/* One recvmsg() of the control socket `sock` into buf[0, cap), the decoder holding nothing (the
 * bytes begin a frame), then cl_placed() over them when no descriptors came along. Returns the
 * bytes received (0: the peer closed), or -errno (-EAGAIN: nothing there). Descriptors received
 * are in fds (*nfds of them, at most max_fds; *truncated when the kernel had more), the bytes
 * cl_placed() took in *consumed, and a failed wake's -errno in *wake_error (0: none). */
int cl_receive(struct cl_lane *lane, int sock, uint8_t *buf, size_t cap, int *fds, uint32_t max_fds, uint32_t *nfds,
               int *truncated, uint64_t *runs, uint32_t max_runs, uint32_t *nruns, uint64_t *settled,
               size_t *consumed, int *wake_error)
{
    *nruns = 0;
    *settled = 0;
    *consumed = 0;
    *wake_error = 0;
    int got = ps_recv_fds(sock, buf, cap, fds, max_fds < CL_MAX_FDS ? max_fds : CL_MAX_FDS, nfds, truncated);
    if (got > 0 && *nfds == 0 && !*truncated)
        *wake_error = cl_placed(lane, buf, (size_t)got, runs, max_runs, nruns, settled, consumed);
    return got;
}
