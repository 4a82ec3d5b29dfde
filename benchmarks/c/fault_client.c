/* fault_client: the C baseline's destination.  One TCP connection to page_server.
 *
 *   fault_client HOST PORT rr COUNT WARMUP
 *   fault_client HOST PORT fault PAGES TOUCHES THREADS SEED
 *   fault_client HOST PORT stream PAGES
 *   fault_client HOST PORT bulk PAGES
 *
 * Prints one JSON object on stdout; exit 0 only if every page checked held its page word.
 *
 * rr:     COUNT timed 16 B request / 4 KiB reply round trips (after WARMUP), one outstanding.
 * fault:  a memfd of PAGES pages mapped MAP_SHARED and registered with userfaultfd in MISSING
 *         mode.  THREADS toucher threads each read one word from TOUCHES distinct random pages
 *         (a shared permutation), timing each read.  One handler thread polls the userfaultfd,
 *         reads up to 64 fault messages per wake-up, sends one request per distinct page, then
 *         receives each reply into a page-aligned staging buffer and places it with UFFDIO_COPY,
 *         which wakes the faulting thread.  Reports every sample, faults per second and the
 *         handler thread's CPU time (the baseline's destination CPU for those faults).
 * stream: the same registered memfd; one request for all PAGES, received into a staging buffer
 *         and placed with UFFDIO_COPY whole received runs at a time (the sweep, done in C).
 * bulk:   one request for all PAGES, received into a 1 MiB buffer and dropped (the link).
 *
 * Throughput is bytes / (last byte - first byte).  Written from ioctl_userfaultfd(2) and
 * <linux/userfaultfd.h>; the service's own figures are compared against these.
 */
#include "cbench.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BATCH 64u
#define STREAM_PAGES 64u /* staging for the stream: 256 KiB */
#define BULK_BYTES (1u << 20)

struct region {
	char *base;
	uint64_t pages;
	int uffd;
};

struct fault_ctx {
	struct region *region;
	int sock;
	int stop_fd;
	char *staging;
	uint64_t handled;
	uint64_t cpu_ns;	/* the handler thread's CPU time: the baseline's destination CPU */
};

struct toucher {
	pthread_t thread;
	struct region *region;
	const uint64_t *pages;
	uint64_t count;
	uint64_t *samples;
	uint64_t bad;
	pthread_barrier_t *start;
};

static int connect_to(const char *host, const char *port)
{
	struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(port)) };
	int one = 1;
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0 || inet_pton(AF_INET, host, &sin.sin_addr) != 1)
		cb_die("socket/address");
	if (connect(fd, (struct sockaddr *)&sin, sizeof(sin)))
		cb_die("connect");
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return fd;
}

static void request(int sock, uint64_t first, uint32_t pages)
{
	struct cb_request req = { .op = CB_OP_PAGES, .pages = pages, .first = first };

	cb_send_all(sock, &req, sizeof(req));
}

static uint64_t rng_next(uint64_t *state)
{
	uint64_t x = *state;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *state = x;
}

static uint64_t arg_u64(const char *text, const char *what)
{
	char *end;
	unsigned long long v = strtoull(text, &end, 10);

	if (*text == '\0' || *end != '\0') {
		fprintf(stderr, "cbench: %s must be a number, got '%s'\n", what, text);
		exit(2);
	}
	return v;
}

/* ---------------------------------------------------------------- userfaultfd region */

static int open_uffd(void)
{
	struct uffdio_api api = { .api = UFFD_API, .features = 0 };
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);

	if (fd < 0 && errno == EINVAL) /* kernel older than 5.11: no user-mode-only flag */
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		cb_die("userfaultfd (vm.unprivileged_userfaultfd=1 or CAP_SYS_PTRACE needed)");
	if (ioctl(fd, UFFDIO_API, &api))
		cb_die("UFFDIO_API");
	return fd;
}

static void region_open(struct region *r, uint64_t pages)
{
	size_t len = pages * CB_PAGE;
	struct uffdio_register reg = { .range = { .len = len }, .mode = UFFDIO_REGISTER_MODE_MISSING };
	int memfd = memfd_create("cbench", MFD_CLOEXEC);

	if (memfd < 0 || ftruncate(memfd, (off_t)len))
		cb_die("memfd");
	r->base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (r->base == MAP_FAILED)
		cb_die("mmap");
	close(memfd);
	r->pages = pages;
	r->uffd = open_uffd();
	reg.range.start = (uintptr_t)r->base;
	if (ioctl(r->uffd, UFFDIO_REGISTER, &reg))
		cb_die("UFFDIO_REGISTER");
	if (!(reg.ioctls & (1ull << _UFFDIO_COPY))) {
		errno = ENOTSUP;
		cb_die("UFFDIO_COPY on this mapping");
	}
}

/* Place len bytes at page `page` from src; retries EAGAIN (mapping changing). */
static void place(struct region *r, uint64_t page, const char *src, uint64_t len)
{
	struct uffdio_copy copy = {
		.dst = (uintptr_t)(r->base + page * CB_PAGE), .src = (uintptr_t)src, .len = len, .mode = 0,
	};

	while (ioctl(r->uffd, UFFDIO_COPY, &copy)) {
		if (errno == EEXIST)
			return;
		if (errno != EAGAIN)
			cb_die("UFFDIO_COPY");
		if (copy.copy > 0) {
			copy.dst += (uint64_t)copy.copy;
			copy.src += (uint64_t)copy.copy;
			copy.len -= (uint64_t)copy.copy;
		}
		copy.copy = 0;
	}
}

static uint64_t region_check(struct region *r, const uint64_t *pages, uint64_t count)
{
	uint64_t bad = 0;

	for (uint64_t i = 0; i < count; i++) {
		uint64_t page = pages ? pages[i] : i;
		uint64_t word;

		memcpy(&word, r->base + page * CB_PAGE, sizeof(word));
		bad += word != cb_page_word(page);
	}
	return bad;
}

/* ---------------------------------------------------------------- fault handler */

/* Read every queued fault; return the distinct pages (at most BATCH) in out. */
static unsigned read_faults(struct fault_ctx *c, uint64_t *out)
{
	struct uffd_msg msgs[BATCH];
	unsigned n = 0;
	ssize_t got = read(c->region->uffd, msgs, sizeof(msgs));

	if (got < 0) {
		if (errno == EAGAIN || errno == EINTR)
			return 0;
		cb_die("read userfaultfd");
	}
	for (size_t i = 0; i < (size_t)got / sizeof(msgs[0]); i++) {
		uint64_t page;
		unsigned j;

		if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
			continue;
		page = (msgs[i].arg.pagefault.address - (uintptr_t)c->region->base) / CB_PAGE;
		for (j = 0; j < n && out[j] != page; j++)
			;
		if (j == n)
			out[n++] = page;
	}
	return n;
}

static void serve_faults(struct fault_ctx *c, const uint64_t *pages, unsigned n)
{
	struct cb_request reqs[BATCH];

	for (unsigned i = 0; i < n; i++)
		reqs[i] = (struct cb_request){ .op = CB_OP_PAGES, .pages = 1, .first = pages[i] };
	cb_send_all(c->sock, reqs, n * sizeof(reqs[0]));
	for (unsigned i = 0; i < n; i++) {
		cb_recv_all(c->sock, c->staging, CB_PAGE);
		place(c->region, pages[i], c->staging, CB_PAGE);
	}
	c->handled += n;
}

static void *fault_handler(void *arg)
{
	struct fault_ctx *c = arg;
	struct pollfd fds[2] = { { .fd = c->region->uffd, .events = POLLIN }, { .fd = c->stop_fd, .events = POLLIN } };
	uint64_t pages[BATCH];

	for (;;) {
		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			cb_die("poll");
		}
		if (fds[1].revents) {
			c->cpu_ns = cb_cpu_ns(CLOCK_THREAD_CPUTIME_ID);
			return NULL;
		}
		if (fds[0].revents & POLLIN) {
			unsigned n = read_faults(c, pages);

			if (n)
				serve_faults(c, pages, n);
		}
	}
}

static void *touch(void *arg)
{
	struct toucher *t = arg;

	pthread_barrier_wait(t->start);
	for (uint64_t i = 0; i < t->count; i++) {
		uint64_t page = t->pages[i];
		volatile uint64_t *word = (volatile uint64_t *)(t->region->base + page * CB_PAGE);
		uint64_t begin = cb_now_ns();
		uint64_t value = *word;

		t->samples[i] = cb_now_ns() - begin;
		t->bad += value != cb_page_word(page);
	}
	return NULL;
}

static void print_samples(const uint64_t *samples, uint64_t count)
{
	printf("\"samples_ns\": [");
	for (uint64_t i = 0; i < count; i++)
		printf(i ? ",%llu" : "%llu", (unsigned long long)samples[i]);
	printf("]");
}

static uint64_t *permutation(uint64_t pages, uint64_t seed)
{
	uint64_t *perm = malloc(pages * sizeof(*perm));
	uint64_t state = seed * 2654435761u + 88172645463325252ull;

	if (!perm)
		cb_die("malloc");
	for (uint64_t i = 0; i < pages; i++)
		perm[i] = i;
	for (uint64_t i = pages - 1; i > 0; i--) {
		uint64_t j = rng_next(&state) % (i + 1), tmp = perm[i];

		perm[i] = perm[j];
		perm[j] = tmp;
	}
	return perm;
}

static int run_fault(int sock, uint64_t pages, uint64_t touches, unsigned threads, uint64_t seed)
{
	struct region r;
	struct fault_ctx ctx = { .region = &r, .sock = sock };
	struct toucher *ts = calloc(threads, sizeof(*ts));
	uint64_t *perm = permutation(pages, seed);
	uint64_t *samples = malloc(threads * touches * sizeof(*samples));
	uint64_t one = 1, bad = 0, begin, elapsed;
	pthread_barrier_t start;
	pthread_t handler;

	if (!ts || !samples || threads * touches > pages) {
		fprintf(stderr, "cbench: THREADS x TOUCHES must not exceed PAGES\n");
		return 2;
	}
	region_open(&r, pages);
	ctx.stop_fd = eventfd(0, EFD_CLOEXEC);
	ctx.staging = aligned_alloc(CB_PAGE, CB_PAGE);
	if (ctx.stop_fd < 0 || !ctx.staging || pthread_create(&handler, NULL, fault_handler, &ctx))
		cb_die("handler thread");
	pthread_barrier_init(&start, NULL, threads + 1);
	for (unsigned i = 0; i < threads; i++) {
		ts[i] = (struct toucher){ .region = &r, .pages = perm + i * touches, .count = touches,
					  .samples = samples + i * touches, .start = &start };
		if (pthread_create(&ts[i].thread, NULL, touch, &ts[i]))
			cb_die("toucher thread");
	}
	pthread_barrier_wait(&start);
	begin = cb_now_ns();
	for (unsigned i = 0; i < threads; i++) {
		pthread_join(ts[i].thread, NULL);
		bad += ts[i].bad;
	}
	elapsed = cb_now_ns() - begin;
	if (write(ctx.stop_fd, &one, sizeof(one)) != sizeof(one))
		cb_die("eventfd");
	pthread_join(handler, NULL);
	printf("{\"mode\": \"fault\", \"threads\": %u, \"faults\": %llu, \"handled\": %llu, \"elapsed_s\": %.6f, "
	       "\"faults_per_s\": %.1f, \"handler_cpu_ns\": %llu, \"bad_pages\": %llu, ",
	       threads, (unsigned long long)(threads * touches), (unsigned long long)ctx.handled, elapsed / 1e9,
	       threads * touches / (elapsed / 1e9), (unsigned long long)ctx.cpu_ns, (unsigned long long)bad);
	print_samples(samples, threads * touches);
	printf("}\n");
	return bad ? 1 : 0;
}

/* ---------------------------------------------------------------- rr, stream, bulk */

static int run_rr(int sock, uint64_t count, uint64_t warmup)
{
	char *reply = aligned_alloc(CB_PAGE, CB_PAGE);
	uint64_t *samples = malloc((count ? count : 1) * sizeof(*samples));
	uint64_t state = 12345, bad = 0;

	if (!reply || !samples)
		cb_die("malloc");
	for (uint64_t i = 0; i < warmup + count; i++) {
		uint64_t page = rng_next(&state) % 65536, word;
		uint64_t begin = cb_now_ns();

		request(sock, page, 1);
		cb_recv_all(sock, reply, CB_PAGE);
		if (i >= warmup)
			samples[i - warmup] = cb_now_ns() - begin;
		memcpy(&word, reply, sizeof(word));
		bad += word != cb_page_word(page);
	}
	printf("{\"mode\": \"rr\", \"bad_pages\": %llu, ", (unsigned long long)bad);
	print_samples(samples, count);
	printf("}\n");
	return bad ? 1 : 0;
}

static int run_stream(int sock, uint64_t pages)
{
	struct region r;
	size_t cap = (size_t)STREAM_PAGES * CB_PAGE, fill = 0;
	char *staging = aligned_alloc(CB_PAGE, cap);
	uint64_t placed = 0, first_ns = 0, bad;
	double seconds;

	if (!staging)
		cb_die("malloc");
	region_open(&r, pages);
	request(sock, 0, (uint32_t)pages);
	while (placed < pages) {
		ssize_t n = recv(sock, staging + fill, cap - fill, 0);
		size_t whole;

		if (n <= 0) {
			if (n < 0 && errno == EINTR)
				continue;
			cb_die("stream recv");
		}
		if (!first_ns)
			first_ns = cb_now_ns();
		fill += (size_t)n;
		whole = fill / CB_PAGE;
		if (whole == 0)
			continue;
		place(&r, placed, staging, whole * CB_PAGE);
		placed += whole;
		fill -= whole * CB_PAGE;
		memmove(staging, staging + whole * CB_PAGE, fill);
	}
	seconds = (cb_now_ns() - first_ns) / 1e9;
	bad = region_check(&r, NULL, pages);
	printf("{\"mode\": \"stream\", \"bytes\": %llu, \"seconds\": %.6f, \"gbps\": %.4f, \"bad_pages\": %llu}\n",
	       (unsigned long long)(pages * CB_PAGE), seconds, pages * CB_PAGE / seconds / 1e9,
	       (unsigned long long)bad);
	return bad ? 1 : 0;
}

static int run_bulk(int sock, uint64_t pages)
{
	char *buf = malloc(BULK_BYTES);
	uint64_t total = pages * CB_PAGE, got = 0, first_ns = 0;
	double seconds;

	if (!buf)
		cb_die("malloc");
	request(sock, 0, (uint32_t)pages);
	while (got < total) {
		size_t want = total - got < BULK_BYTES ? (size_t)(total - got) : BULK_BYTES;
		ssize_t n = recv(sock, buf, want, 0);

		if (n <= 0) {
			if (n < 0 && errno == EINTR)
				continue;
			cb_die("bulk recv");
		}
		if (!first_ns)
			first_ns = cb_now_ns();
		got += (uint64_t)n;
	}
	seconds = (cb_now_ns() - first_ns) / 1e9;
	printf("{\"mode\": \"bulk\", \"bytes\": %llu, \"seconds\": %.6f, \"gbps\": %.4f, \"bad_pages\": 0}\n",
	       (unsigned long long)total, seconds, total / seconds / 1e9);
	return 0;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 3 ? argv[3] : "";
	int sock, rc;

	if (argc == 6 && !strcmp(mode, "rr")) {
		sock = connect_to(argv[1], argv[2]);
		rc = run_rr(sock, arg_u64(argv[4], "COUNT"), arg_u64(argv[5], "WARMUP"));
	} else if (argc == 8 && !strcmp(mode, "fault")) {
		uint64_t pages = arg_u64(argv[4], "PAGES"), threads = arg_u64(argv[6], "THREADS");

		if (pages == 0 || pages > CB_MAX_PAGES || threads == 0 || threads > 64) {
			fprintf(stderr, "cbench: PAGES 1..%u, THREADS 1..64\n", CB_MAX_PAGES);
			return 2;
		}
		sock = connect_to(argv[1], argv[2]);
		rc = run_fault(sock, pages, arg_u64(argv[5], "TOUCHES"), (unsigned)threads, arg_u64(argv[7], "SEED"));
	} else if (argc == 5 && (!strcmp(mode, "stream") || !strcmp(mode, "bulk"))) {
		uint64_t pages = arg_u64(argv[4], "PAGES");

		if (pages == 0 || pages > CB_MAX_PAGES) {
			fprintf(stderr, "cbench: PAGES 1..%u\n", CB_MAX_PAGES);
			return 2;
		}
		sock = connect_to(argv[1], argv[2]);
		rc = mode[0] == 's' ? run_stream(sock, pages) : run_bulk(sock, pages);
	} else {
		fprintf(stderr, "usage: fault_client HOST PORT {rr COUNT WARMUP | fault PAGES TOUCHES THREADS SEED"
				" | stream PAGES | bulk PAGES}\n");
		return 2;
	}
	close(sock);
	fflush(stdout);
	return rc;
}
