/* page_server: the C baseline's source.  Serves pages over one TCP connection.
 *
 *   page_server ADDR
 *
 * Listens on ADDR with an ephemeral port, prints the port on stdout, accepts ONE connection
 * (TCP_NODELAY), answers every 16-byte request (cbench.h) with the pages it asks for, and exits 0
 * when the client closes, after printing its CPU time on stdout ({"cpu_ns": N}: the baseline's
 * source CPU, start-up included).  Pages are produced in chunks of CHUNK_PAGES from one preallocated
 * buffer whose page words are rewritten per chunk, so a bulk request streams at memory speed and a
 * one-page request costs one send().
 */
#include "cbench.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <unistd.h>

#define CHUNK_PAGES 256u

static int listen_on(const char *addr)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t len = sizeof(sin);
	int one = 1;
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		cb_die("socket");
	if (inet_pton(AF_INET, addr, &sin.sin_addr) != 1) {
		errno = EINVAL;
		cb_die("address (IPv4 expected)");
	}
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&sin, sizeof(sin)) || listen(fd, 1))
		cb_die("bind/listen");
	if (getsockname(fd, (struct sockaddr *)&sin, &len))
		cb_die("getsockname");
	printf("%u\n", ntohs(sin.sin_port));
	fflush(stdout);
	return fd;
}

static void serve_pages(int fd, char *chunk, uint64_t first, uint32_t pages)
{
	while (pages) {
		uint32_t n = pages < CHUNK_PAGES ? pages : CHUNK_PAGES;

		for (uint32_t i = 0; i < n; i++) {
			uint64_t word = cb_page_word(first + i);

			memcpy(chunk + (size_t)i * CB_PAGE, &word, sizeof(word));
		}
		cb_send_all(fd, chunk, (size_t)n * CB_PAGE);
		first += n;
		pages -= n;
	}
}

int main(int argc, char **argv)
{
	struct cb_request req;
	int one = 1;
	int lfd, fd;
	char *chunk;

	if (argc != 2) {
		fprintf(stderr, "usage: page_server ADDR\n");
		return 2;
	}
	chunk = aligned_alloc(CB_PAGE, (size_t)CHUNK_PAGES * CB_PAGE);
	if (!chunk)
		cb_die("aligned_alloc");
	memset(chunk, CB_FILL, (size_t)CHUNK_PAGES * CB_PAGE);
	lfd = listen_on(argv[1]);
	fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0)
		cb_die("accept");
	close(lfd);
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	while (cb_recv_all(fd, &req, sizeof(req))) {
		if (req.op != CB_OP_PAGES || req.pages == 0 || req.pages > CB_MAX_PAGES) {
			errno = EPROTO;
			cb_die("bad request");
		}
		serve_pages(fd, chunk, req.first, req.pages);
	}
	close(fd);
	printf("{\"cpu_ns\": %llu}\n", (unsigned long long)cb_cpu_ns(CLOCK_PROCESS_CPUTIME_ID));
	return 0;
}
