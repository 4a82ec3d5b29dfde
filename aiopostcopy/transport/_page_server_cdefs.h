/*
 * _page_server_cdefs.h: what Python sees of _page_server_source.c, for cffi.
 * Structs end in "...;" so the compiler owns their layout.
 */

#define PS_VERSION ...
#define PS_MAX_RUNS ...
#define PS_MAX_RUN_PAGES ...
#define PS_DECLINED ...
#define PS_ACCOUNT ...
#define PS_EOF ...
#define PS_ERROR ...
#define RQ_MAX_PAGES ...
#define RQ_FRAME_BYTES ...
#define RQ_MISSING ...
#define RQ_REQUESTED ...
#define RQ_PENDING ...
#define RQ_PLACED_FIELDS ...
#define CL_NONE ...
#define CL_QUEUED ...
#define CL_ASKED ...
#define CL_KNOWN_PLACED ...
#define CL_TYPE_CLIENT_REQUEST ...
#define CL_TYPE_PLACED ...
#define CL_MAX_FDS ...
#define PS_MAX_FDS ...
#define RQ_RECEIVE_FRAMES ...
#define RQ_RECEIVE_RUNS ...

struct ps_block { int fd; uint32_t page_size; uint32_t max_run; uint64_t pages; ...; };

struct ps_answer { uint64_t first; uint32_t block; uint32_t count; uint32_t zero_pages; uint32_t runs;
                   uint64_t asked_ns; uint64_t sent_ns; ...; };

struct ps_server {
    int sock;
    const struct ps_block *blocks;
    uint32_t nblocks;
    uint8_t *inbuf;
    size_t in_cap, in_start, in_end;
    uint8_t *pages;
    size_t pages_cap;
    uint8_t *headers;
    size_t headers_cap;
    struct ps_answer *log;
    uint32_t log_cap, logged;
    int timestamps;
    int account_idle_ms;
    int account_max_ms;
    int account_max_answers;
    int error;
    int notify_fd;
    ...;
};

int ps_init(struct ps_server *s);
uint32_t ps_take_log(struct ps_server *s, struct ps_answer *out, uint32_t cap);
void ps_lock(struct ps_server *s);
void ps_unlock(struct ps_server *s);
int ps_serve(struct ps_server *s);
int ps_read_run(int fd, uint32_t page_size, uint64_t first, uint32_t count, uint8_t *to, uint32_t *zeros);

struct rq_pending { uint64_t block; uint64_t page; uint64_t address; int uffd; ...; };
struct rq_lane { uint8_t *const *states; const uint64_t *pages; const uint64_t *page_size; uint32_t nblocks;
                 struct rq_pending *pending; const uint8_t *zero_page; ...; };

size_t rq_take_runs(const uint8_t *buf, size_t len, uint32_t type, uint32_t max_runs, uint64_t max_blocks,
                    uint64_t *runs, uint32_t *nruns);
struct rq_reader { uint8_t *buf; size_t cap; uint32_t type; uint32_t max_runs; uint64_t max_blocks;
                   int fds[...]; uint32_t nfds; int truncated; uint64_t runs[...]; uint32_t frame_runs[...];
                   uint32_t nframes; size_t consumed; ...; };
int rq_receive_runs(struct rq_reader *r, int sock);
int rq_encode(const uint64_t *asked, uint32_t count, uint8_t *frame);
void rq_forget_fd(struct rq_lane *lane, int uffd);
void rq_remember(struct rq_lane *lane, uint64_t block, uint64_t page, uint64_t address, int uffd);
int rq_ask_runs(struct rq_lane *lane, int sock, int uffd, const uint64_t *bases, const uint64_t *runs, uint32_t nruns,
                uint32_t budget, uint64_t *asked, uint8_t *frame, int *frame_len, int *sent);
int rq_place(struct rq_lane *lane, const uint8_t *buf, size_t len, uint64_t *placed, uint32_t max_placed,
             size_t *consumed);
int rq_send(const struct rq_lane *lane, int sock, int uffd, const uint64_t *slots, uint32_t count,
            uint64_t pagefault_code, const uint64_t *table, uint32_t ntable, uint32_t budget,
            uint64_t *asked, uint8_t *frame, int *frame_len, int *sent);

struct cl_lane { uint8_t *const *states; const uint64_t *pages; const uint64_t *page_size; const uint64_t *base;
                 uint32_t nblocks; const uint64_t *table; uint32_t ntable; int uffd;
                 uint64_t faults, joined, woken_at_once, requested_pages, requests, placed_pages, wakes; ...; };

int cl_faults(struct cl_lane *lane, const uint64_t *slots, uint32_t count, uint64_t pagefault_code,
              uint64_t *asked, uint32_t *nasked, uint64_t *wakes, uint32_t *nwakes, uint64_t *tids,
              uint8_t *frame, int *frame_len, int sock, int *sent);
int cl_placed(struct cl_lane *lane, const uint8_t *buf, size_t len, uint64_t *runs, uint32_t max_runs,
              uint32_t *nruns, uint64_t *settled, size_t *consumed);
int cl_receive(struct cl_lane *lane, int sock, uint8_t *buf, size_t cap, int *fds, uint32_t max_fds, uint32_t *nfds,
               int *truncated, uint64_t *runs, uint32_t max_runs, uint32_t *nruns, uint64_t *settled,
               size_t *consumed, int *wake_error);
