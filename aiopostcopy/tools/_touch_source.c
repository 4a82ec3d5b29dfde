/*
 * _touch_source.c: the workload's touching loop, run without the GIL.
 *
 * A workload thread stands for a guest's vCPU: it reads memory, and a page
 * that has not arrived stops it in the kernel until the service places it.
 * Done in Python, each touch took the thread several microseconds of
 * interpreter time and the process's GIL on either side of the wait, on the
 * same vCPUs as the service it measures; here a whole batch of touches is one
 * call, as a C program's thread would run them.
 *
 * touch_pages() touches, in order, byte `offset` of each page whose address is
 * pages[i]. flats[i] is the page's index in seen[], a byte per page shared by
 * the process's threads: the first thread to set it makes that touch the page's
 * first one here. Before a first touch, mincore(2) on the page's first 4 KiB
 * says whether it is in memory: if not (or if mincore fails), the touch is a
 * fault and its CLOCK_MONOTONIC duration in nanoseconds goes to latencies[]; if
 * so, it is a hit (*hits is incremented). Returns the number of faults timed.
 */

#include <stdint.h>
#include <stddef.h>
#include <time.h>
#include <sys/mman.h>

#define TOUCH_VERSION 1

static inline int64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

size_t touch_pages(const uint64_t *pages, const uint64_t *flats, size_t count, uint64_t offset, uint8_t *seen,
                   int64_t *latencies, uint64_t *hits)
{
    size_t faults = 0;
    unsigned char resident;
    for (size_t i = 0; i < count; i++) {
        uintptr_t page = (uintptr_t)pages[i];
        int first = __atomic_exchange_n(&seen[flats[i]], 1, __ATOMIC_RELAXED) == 0;
        int fault = first && (mincore((void *)page, 4096, &resident) != 0 || !(resident & 1));
        int64_t begin = monotonic_ns();
        (void)*(volatile const uint8_t *)(page + offset);
        int64_t took = monotonic_ns() - begin;
        if (fault)
            latencies[faults++] = took;
        else if (first)
            (*hits)++;
    }
    return faults;
}
