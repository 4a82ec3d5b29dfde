"""aiopostcopy: a postcopy page-fault service for Linux on asyncio."""

__all__: list[str] = []
