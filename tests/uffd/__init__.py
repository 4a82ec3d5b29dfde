"""Real-kernel tests of aiopostcopy.uffd (userfaultfd and shared memory)."""
