/* The C baseline's wire format and page contents, shared by page_server.c and fault_client.c.
 *
 * A request is 16 bytes: {u32 op, u32 pages, u64 first}, host byte order (both ends run on
 * this machine).  OP_PAGES asks for `pages` pages from `first`; the server replies with exactly
 * pages * CB_PAGE bytes.  Every page is filled with CB_FILL except its first 8 bytes, which hold
 * cb_page_word(page), so a receiver can check that each page landed where it belongs.
 */
#ifndef CBENCH_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* accept4, memfd_create */
#endif
#define CBENCH_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define CB_PAGE 4096u
#define CB_FILL 0xa5
#define CB_OP_PAGES 1u
#define CB_MAX_PAGES (1u << 20) /* 4 GiB in one request at most */

struct cb_request {
	uint32_t op;
	uint32_t pages;
	uint64_t first;
};

static inline uint64_t cb_page_word(uint64_t page)
{
	return page * 0x9e3779b97f4a7c15ull + 1;
}

static inline uint64_t cb_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* CPU time of a clock (CLOCK_PROCESS_CPUTIME_ID, CLOCK_THREAD_CPUTIME_ID), ns. */
static inline uint64_t cb_cpu_ns(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void cb_die(const char *what)
{
	fprintf(stderr, "cbench: %s: %s\n", what, errno ? strerror(errno) : "failed");
	exit(1);
}

/* Receive exactly len bytes; returns 0 on a clean EOF before the first byte, 1 when full. */
static inline int cb_recv_all(int fd, void *buf, size_t len)
{
	size_t got = 0;

	while (got < len) {
		ssize_t n = recv(fd, (char *)buf + got, len - got, 0);

		if (n > 0) {
			got += (size_t)n;
		} else if (n == 0) {
			if (got == 0)
				return 0;
			errno = ECONNRESET;
			cb_die("peer closed mid-message");
		} else if (errno != EINTR) {
			cb_die("recv");
		}
	}
	return 1;
}

static inline void cb_send_all(int fd, const void *buf, size_t len)
{
	size_t sent = 0;

	while (sent < len) {
		ssize_t n = send(fd, (const char *)buf + sent, len - sent, MSG_NOSIGNAL);

		if (n > 0)
			sent += (size_t)n;
		else if (n < 0 && errno != EINTR)
			cb_die("send");
	}
}

#endif
