/*
 * _touch_cdefs.h: what Python sees of _touch_source.c, for cffi.
 */

#define TOUCH_VERSION ...

size_t touch_pages(const uint64_t *pages, const uint64_t *flats, size_t count, uint64_t offset, uint8_t *seen,
                   int64_t *latencies, uint64_t *hits);
