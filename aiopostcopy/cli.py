"""Command line: ``python -m aiopostcopy {demo,source,dest,bench,status,events,recover,cancel,set}``.

* ``demo``: a whole migration on this host with no arguments: a 256 MiB
  source image with a per-page pattern, a source process and the destination
  service on loopback, client processes touching pages while the background
  sweep runs, a progress bar, page-by-page verification and a summary.
* ``source``: serve block files to a destination (``--listen``, ``--block``).
* ``dest``: run the destination service against a source (``--source``,
  ``--block-dir``, ``--clients``, ``--json``).
* ``status``, ``events``, ``recover``, ``cancel``, ``set``: an operator's
  verbs on a running ``dest --control PATH`` (:mod:`aiopostcopy.tools.ctl`,
  docs/control.md).
* ``bench``: the benchmark runner (:mod:`aiopostcopy.tools.bench`): a C
  baseline and the service's scenarios over the shaped veth (or loopback).

Theory of operation
-------------------
``source`` and ``dest`` check their input before anything is opened
(:mod:`aiopostcopy.tools.preflight`), then run the library roles.  Whatever
ends a run (completion, a failure, bad input, a signal) goes through one
:class:`RunRecord`: it logs one line naming the cause and the object, writes
the ``--json`` report (every exit, success or not) and returns the exit
status below.  Logs go through :mod:`logging` to stderr (and ``--log-file``)
with timestamps; stdout carries only what was asked for there: the source's
``listening on`` line, or the JSON report with ``--json -`` (then the
announcement goes to stderr).  A traceback is printed only for a bug in
aiopostcopy itself, and only with ``-v``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import signal
import sys
import time
from typing import Any, NoReturn

from aiopostcopy import trace
from aiopostcopy.core.config import DestinationConfig, SourceConfig
from aiopostcopy.errors import (ConfigurationError, PostcopyError, SourceLostError, SourceUnreachableError,
                                TlsHandshakeError)
from aiopostcopy.loop import DestinationOptions, PostcopyDestination
from aiopostcopy.source import (BACKGROUND_SNDBUF, BACKGROUND_SNDBUF_QUIET, DEFAULT_LEASE, DEMAND_QUIET, PostcopySource,
                                SourceBlock)
from aiopostcopy.transport.tls import TlsConfig
from aiopostcopy.tools.preflight import check_port, check_source_blocks, prepare_block_dir

__all__ = ["main", "run", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_UNREACHABLE", "EXIT_CANCELLED",
           "EXIT_TLS", "EXIT_INTERRUPTED"]

EXIT_OK = 0  #: the migration completed and verified (source: the destination said Complete)
EXIT_FAILED = 1  #: the migration failed, was aborted, or did not verify
EXIT_USAGE = 2  #: bad arguments or input, refused before any page moved
EXIT_UNREACHABLE = 3  #: dest: the source could not be reached, or never completed its handshake
EXIT_CANCELLED = 4  #: dest: the operator cancelled the migration (control socket ``cancel``)
EXIT_TLS = 5  #: dest: the TLS handshake with the source failed (certificate, name, a peer without TLS)
EXIT_INTERRUPTED = 130  #: SIGINT or SIGTERM

EXIT_CODES = """exit status:
  0    the migration completed and every page verified (source: the destination said Complete)
  1    the migration failed, was aborted (--deadline) or did not verify
  2    bad arguments or input, refused before any page moved: an address, a block file,
       the block dir (created if missing; must be tmpfs or hugetlbfs, writable, with room),
       a stale block file, a busy port
  3    dest: the source could not be reached (see --wait) or never completed its handshake
  4    dest: cancelled by the operator (cancel on the --control socket, docs/control.md)
  5    dest: the TLS handshake with the source failed: its certificate is not from --tls-ca
       or does not carry its name, it refused ours, or one side runs without TLS
  130  interrupted (SIGINT or SIGTERM)"""

log = logging.getLogger("aiopostcopy")


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("aiopostcopy")
    except metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line naming the argument and the cause, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def parse_address(text: str) -> tuple[str, int] | str:
    """``HOST:PORT`` -> (host, port); anything with a slash is a Unix socket path."""
    if "/" in text:
        return text
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or a socket path, got {text!r}")
    try:
        return host.strip("[]"), check_port(int(port), text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_block(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _not_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


#: ``dest --nice``: measured with 4 clients x 2 faulting threads on 2 vCPUs (benchmarks/README.md)
DEFAULT_DEST_NICE = -5


def _nice(text: str) -> int | None:
    if text == "keep":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a nice value or 'keep', got {text!r}") from None
    if not -20 <= value <= 19:
        raise argparse.ArgumentTypeError(f"a nice value is -20..19, got {text}")
    return value


def _tls_options(parser: argparse.ArgumentParser, *, dest: bool) -> None:
    group = parser.add_argument_group("TLS with mutual authentication (all three, or none: plain TCP)")
    peer = "the source" if dest else "the destination"
    group.add_argument("--tls-cert", metavar="FILE", default=None, help="this side's certificate (PEM)")
    group.add_argument("--tls-key", metavar="FILE", default=None, help="its private key (PEM, unencrypted)")
    group.add_argument("--tls-ca", metavar="FILE", default=None,
                       help=f"the CA that must have signed {peer}'s certificate (PEM)")
    if dest:
        group.add_argument("--tls-server-name", metavar="NAME", default=None,
                           help="the name the source's certificate must carry (default: the host of --source)")


def tls_context(args: argparse.Namespace, *, server: bool) -> Any:
    """The ssl.SSLContext the TLS options ask for, or None without them.

    Raises:
        ConfigurationError: some but not all of them, or a file that cannot be used.
    """
    files = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-ca": args.tls_ca}
    given = [name for name, path in files.items() if path]
    if not given:
        if getattr(args, "tls_server_name", None):
            raise ConfigurationError("--tls-server-name needs --tls-cert, --tls-key and --tls-ca")
        return None
    if len(given) < len(files):
        missing = ", ".join(name for name in files if name not in given)
        raise ConfigurationError(f"TLS needs --tls-cert, --tls-key and --tls-ca: {missing} missing")
    config = TlsConfig(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    return config.server_context() if server else config.client_context()


def _logging_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log detail (debug)")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress line")
    common.add_argument("--log-file", default=None, help="also append the log (timestamped) to this file")
    common.add_argument("--json", default=None,
                        help="write the report here on every exit, success or not ('-': stdout, which then "
                             "carries nothing else)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m aiopostcopy", description=__doc__.split("\n\n")[0],
                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"aiopostcopy {version()}")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop (default uvloop)")
    sub = parser.add_subparsers(dest="command", required=True)
    from aiopostcopy.tools.demo import add_demo_arguments

    add_demo_arguments(sub.add_parser("demo", help="a whole migration on this host, verified page by page"))
    common = _logging_options()
    role = {"parents": [common], "epilog": EXIT_CODES, "formatter_class": argparse.RawDescriptionHelpFormatter}
    src = sub.add_parser("source", help="serve RAMBlocks to a destination", **role)
    src.add_argument("--listen", type=parse_address, default=("127.0.0.1", 4444),
                     help="HOST:PORT or socket path (default 127.0.0.1:4444, loopback only)")
    src.add_argument("--block", type=parse_block, action="append", required=True, help="NAME=PATH, repeatable")
    src.add_argument("--page-size", type=_positive(int), default=4096, help="page size of the blocks (4096, 2097152 or 1073741824)")
    src.add_argument("--window", type=_positive(int), default=SourceConfig().background_window_bytes,
                     help="background window bytes")
    src.add_argument("--run-pages", type=_positive(int), default=SourceConfig().background_run_pages,
                     help="pages per background run")
    src.add_argument("--sweep-bridge", type=_not_negative, default=SourceConfig().sweep_bridge_pages,
                     metavar="PAGES", help="send again a stretch of at most this many pages already sent (answers "
                                           "to faults) to keep a background run whole; at most an eighth of "
                                           "the run in all (0: never send a page twice)")
    src.add_argument("--sndbuf", type=int, default=BACKGROUND_SNDBUF,
                     help="SO_SNDBUF of the background connection while pages are being requested "
                          f"(default {BACKGROUND_SNDBUF}), 0 for kernel autotuning throughout")
    src.add_argument("--sndbuf-quiet", type=int, default=BACKGROUND_SNDBUF_QUIET,
                     help=f"SO_SNDBUF once no page was requested for {DEMAND_QUIET * 1000:g} ms "
                          f"(default {BACKGROUND_SNDBUF_QUIET}), 0: --sndbuf always")
    src.add_argument("--lease", type=_positive(float), default=DEFAULT_LEASE,
                     help=f"seconds a session is held with no channel open before the next destination may "
                          f"start (default {DEFAULT_LEASE:g})")
    src.add_argument("--sweep-after-idle", type=_positive(float), default=None, metavar="SECONDS",
                     help="demand first: hold the background stream until pages were requested and then "
                          "none for SECONDS (benchmarks measure the demand path alone this way)")
    src.add_argument("--answer", choices=("c", "python"), default="c",
                     help="who answers page requests on plain TCP: the C page server, with the GIL free "
                          "(default), or the Python path (as over TLS)")
    src.add_argument("--nice", type=_nice, default=None,
                     help="nice value of the thread answering page requests (default 'keep': as inherited). "
                          "-5 shortened a lone fault and lengthened many at once (benchmarks/README.md); "
                          "a value below the process's needs root or CAP_SYS_NICE, else it stays as it was")
    src.add_argument("--max-bandwidth", type=_rate, default=None, metavar="RATE",
                     help="cap the background stream: bytes/s, optional k/M/G suffix (powers of 1000); "
                          "replies to page requests are never held back")
    _tls_options(src, dest=False)
    dst = sub.add_parser("dest", help="run the destination service", **role)
    dst.add_argument("--source", type=parse_address, required=True, help="HOST:PORT or socket path of the source")
    dst.add_argument("--block-dir", default=None,
                     help="directory for the block files, created if missing; tmpfs or hugetlbfs (default: memfd)")
    dst.add_argument("--from-copy", action="store_true",
                     help="the block files in --block-dir (NAME or NAME.partial) hold an earlier copy: only the "
                          "pages the source finds changed (by page digest) migrate; the rest stay")
    dst.add_argument("--clients", default=None, help="Unix socket path where clients join")
    dst.add_argument("--vhost-user", metavar="SOCK", action="append", default=[],
                     help="attach the vhost-user back-end listening on SOCK as a postcopy client (repeatable)")
    dst.add_argument("--deadline", type=_positive(float), default=60.0,
                     help="seconds without progress from the source (no pages arriving, whatever the cause: "
                          "unreachable, silent, refusing); also bounds --wait; default 60")
    dst.add_argument("--wait", action="store_true", help="wait (up to --deadline) for a source that is not up yet")
    dst.add_argument("--handshake-timeout", type=_positive(float), default=10.0,
                     help="seconds a reachable source has to answer Hello (default 10)")
    dst.add_argument("--control", default=None, metavar="PATH",
                     help="the operator's control socket (owner-only; docs/control.md)")
    dst.add_argument("--max-bandwidth", type=_rate, default=None, metavar="RATE",
                     help="cap the background stream: bytes/s, optional k/M/G suffix (powers of 1000); "
                          "pages asked for by faults are never held back")
    dst.add_argument("--request", choices=("c", "python"), default="c",
                     help="who writes a fault's page request and places its answer: the C request and "
                          "reply lanes, before the bookkeeping (default; over TLS the reply lane only), or the "
                          "Python path")
    dst.add_argument("--nice", type=_nice, default=DEFAULT_DEST_NICE,
                     help=f"nice value of the thread serving faults while the migration runs (default "
                          f"{DEFAULT_DEST_NICE}: the workload threads it wakes do not preempt it; needs root or "
                          f"CAP_SYS_NICE, else it stays as it was; 'keep': leave it as inherited)")
    _tls_options(dst, dest=True)
    from aiopostcopy.tools.bench import add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="measure against a C baseline over the shaped veth"))
    from aiopostcopy.tools.ctl import add_control_arguments

    add_control_arguments(sub)
    return parser


def _rate(text: str) -> int | None:
    from aiopostcopy.destination.operator import parse_rate

    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def setup_logging(args: argparse.Namespace) -> None:
    """Timestamped log lines on stderr (and ``--log-file``) for the ``aiopostcopy`` loggers."""
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    formatter = logging.Formatter("%(asctime)s.%(msecs)03d %(name)s %(levelname)s %(message)s",
                                  datefmt="%Y-%m-%dT%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if args.log_file:
        try:
            handlers.append(logging.FileHandler(args.log_file, encoding="utf-8"))
        except OSError as exc:
            raise ConfigurationError(f"--log-file {args.log_file}: {exc.strerror}") from None
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def run(coro: Any, loop_name: str = "uvloop") -> Any:
    """Run ``coro`` on uvloop (or the stock loop when asked or when uvloop is missing)."""
    if loop_name == "uvloop":
        try:
            import uvloop

            return uvloop.run(coro)
        except ImportError:
            print("uvloop not installed: using the stock asyncio loop", file=sys.stderr)
    return asyncio.run(coro)


# ----------------------------------------------------------------------------- one run's record


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class RunRecord:
    """What one ``source`` or ``dest`` run reports on exit, whatever ends it."""

    def __init__(self, role: str, args: argparse.Namespace) -> None:
        self.role = role
        self.args = args
        self.log = logging.getLogger(f"aiopostcopy.{role}")
        self.fields: dict[str, Any] = {"role": role, "version": version(), "started_at": _now(),
                                       "blocks": [], "page_size": None}
        self.interrupted: str | None = None  #: the signal's name once one arrived

    def set_blocks(self, blocks: list[dict[str, Any]]) -> None:
        """The block table: name, size (bytes), page_size, path (None for a memfd)."""
        self.fields["blocks"] = blocks
        sizes = {b["page_size"] for b in blocks}
        self.fields["page_size"] = sizes.pop() if len(sizes) == 1 else None

    def finish(self, code: int, error: str | None = None, report: dict[str, Any] | None = None) -> int:
        """Log ``error`` (one line), write the JSON report, return ``code``."""
        if self.interrupted and code != EXIT_OK:
            code, error = EXIT_INTERRUPTED, f"interrupted by {self.interrupted}"
        if error is not None:
            self.log.error("%s", error)
        data = dict(report or {})
        data.update(self.fields, ok=code == EXIT_OK, exit_code=code, error=error, ended_at=_now())
        self._write_json(data)
        return code

    def fail(self, exc: BaseException) -> int:
        """Classify ``exc`` into an exit status and a one-line message; finish."""
        code, message = describe(exc, self.args)
        if code == EXIT_FAILED and not isinstance(exc, PostcopyError):
            self.log.debug("internal error", exc_info=exc)
        return self.finish(code, message)

    def _write_json(self, data: dict[str, Any]) -> None:
        path = self.args.json
        if path is None:
            return
        text = json.dumps(data, indent=2, default=str)
        if path == "-":
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            return
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as exc:
            self.log.error("cannot write --json %s: %s", path, exc.strerror)


def format_address(address: tuple[str, int] | str) -> str:
    if isinstance(address, str):
        return address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(exc: BaseException, args: argparse.Namespace) -> tuple[int, str]:
    """An exit status and one line naming the cause and the object."""
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, TlsHandshakeError):
        return EXIT_TLS, str(exc)
    if isinstance(exc, _Unreachable):
        return EXIT_UNREACHABLE, str(exc)
    if isinstance(exc, SourceLostError):
        return EXIT_UNREACHABLE, f"source {format_address(args.source)}: {_cause_text(exc)}"
    if isinstance(exc, FileExistsError):
        return EXIT_USAGE, (f"block file {exc.filename} already exists (a stale file would pass for migrated "
                            "memory): remove it or use an empty --block-dir")
    if isinstance(exc, PostcopyError):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return EXIT_USAGE, f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, OSError):
        return EXIT_FAILED, f"{exc.strerror or exc}"
    return EXIT_FAILED, f"internal error (a bug in aiopostcopy): {type(exc).__name__}: {exc} (-v shows where)"


def _cause_text(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    if isinstance(cause, PostcopyError):  # e.g. the source's Error: busy serving another session
        return str(cause)
    return str(exc)


class _Unreachable(Exception):
    """dest could not start a session with the source (exit status 3)."""


# ----------------------------------------------------------------------------- signals


class Interrupts:
    """SIGINT/SIGTERM: before :meth:`on_signal` is given a callback, cancel the
    running task (start-up ends at once); after, call it (e.g. abort cleanly).
    A second signal always cancels."""

    def __init__(self, record: RunRecord) -> None:
        self._record = record
        self._task = asyncio.current_task()
        self._callback: Any = None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._fire, sig)

    def on_signal(self, callback: Any) -> None:
        self._callback = callback

    def _fire(self, sig: int) -> None:
        first = self._record.interrupted is None
        self._record.interrupted = signal.Signals(sig).name
        if self._callback is None or not first:
            if self._task is not None:
                self._task.cancel()
            return
        result = self._callback()
        if asyncio.iscoroutine(result):
            asyncio.get_running_loop().create_task(result)


# ----------------------------------------------------------------------------- source


async def source_main(args: argparse.Namespace, record: RunRecord) -> int:
    interrupts = Interrupts(record)
    record.fields["listen"] = format_address(args.listen)
    try:
        check_source_blocks(args.block, args.page_size)
        blocks = [SourceBlock.from_path(name, path, page_size=args.page_size) for name, path in args.block]
    except (ConfigurationError, OSError) as exc:  # a file that changed under the checks
        return record.finish(EXIT_USAGE, describe(exc, args)[1])
    except ValueError as exc:
        return record.finish(EXIT_USAGE, str(exc))
    except asyncio.CancelledError:
        return record.finish(EXIT_INTERRUPTED, "interrupted")
    record.set_blocks([{"name": b.name, "size": b.length, "page_size": b.page_size, "path": path}
                       for b, (_, path) in zip(blocks, args.block)])
    try:
        tls = tls_context(args, server=True)
    except ConfigurationError as exc:
        for block in blocks:
            block.close()
        return record.finish(EXIT_USAGE, str(exc))
    record.fields["tls"] = tls is not None
    trace.start("source")
    config = SourceConfig(background_window_bytes=args.window, background_run_pages=args.run_pages,
                          sweep_bridge_pages=args.sweep_bridge)
    source = PostcopySource(blocks, config=config, background_sndbuf=args.sndbuf or None,
                            background_sndbuf_quiet=args.sndbuf_quiet or None, lease=args.lease,
                            sweep_after_idle=args.sweep_after_idle, tls=tls, max_bandwidth=args.max_bandwidth,
                            answer_in_c=args.answer == "c", urgent_nice=args.nice)
    try:
        where = await _listen(source, args.listen)
        record.fields["listen"] = where
        _announce(args, f"aiopostcopy source: listening on {where}")
        interrupts.on_signal(source.close)
        report = await source.wait_complete()
    except ConfigurationError as exc:
        return record.finish(EXIT_USAGE, str(exc))
    except asyncio.CancelledError:
        return record.finish(EXIT_INTERRUPTED, "interrupted")
    except Exception as exc:
        return record.fail(exc)
    finally:
        await source.close()
    record.log.info("%s: %d urgent, %d background, %d zero pages sent (urgent and background include pages "
                    "sent twice)", "complete" if report.complete else "stopped", report.pages_urgent,
                    report.pages_background, report.pages_zero)
    error = None if report.complete else "the destination left before completing"
    return record.finish(EXIT_OK if report.complete else EXIT_FAILED, error, _asdict(report))


async def _listen(source: PostcopySource, address: tuple[str, int] | str) -> str:
    try:
        if isinstance(address, str):
            return await source.listen_unix(address)
        host, port = await source.listen(*address)
    except OSError as exc:
        cause = exc.strerror or str(exc)
        if "address already in use" in str(exc).lower():
            cause = "address already in use"
        raise ConfigurationError(f"cannot listen on {format_address(address)}: {cause}") from None
    return format_address((host, port))


def _announce(args: argparse.Namespace, line: str) -> None:
    """The machine-read line: on stdout, unless stdout carries the JSON report."""
    stream = sys.stderr if args.json == "-" else sys.stdout
    print(line, file=stream, flush=True)


def _asdict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


# ----------------------------------------------------------------------------- dest


async def dest_main(args: argparse.Namespace, record: RunRecord) -> int:
    interrupts = Interrupts(record)
    record.fields.update(source=format_address(args.source), block_dir=args.block_dir)
    block_dir = None
    dest: PostcopyDestination | None = None
    if args.from_copy and args.block_dir is None:
        return record.finish(EXIT_USAGE, "--from-copy needs --block-dir, the directory that holds the copy")
    try:
        if args.block_dir is not None:
            block_dir = prepare_block_dir(args.block_dir)
            if block_dir.created:
                record.log.info("created block dir %s (%s)", block_dir.path, block_dir.fs_type)
        dest = await _start_dest(args, record)
        record.set_blocks(_dest_blocks(dest))
        record.log.info("%d blocks, userfaultfd via %s", len(dest.blocks), dest.uffd_mode)
        if not args.quiet:
            from aiopostcopy.tools.progress import ProgressLine

            dest.on_progress(ProgressLine(sys.stderr).update)
        interrupts.on_signal(lambda: dest.abort(f"interrupted by {record.interrupted}"))
        report = await dest.wait_complete()
    except asyncio.CancelledError:
        return await _dest_failed(record, dest, block_dir, EXIT_INTERRUPTED, "interrupted")
    except Exception as exc:
        code, message = describe(exc, args)
        if dest is not None and dest.state == "cancelled":
            code = EXIT_CANCELLED
        return await _dest_failed(record, dest, block_dir, code, message, exc)
    await dest.close()
    record.set_blocks(_dest_blocks(dest))  # complete block files have their final names now
    record.log.info("%s", report.format())
    if report.verified:
        return record.finish(EXIT_OK, None, report.to_dict())
    return record.finish(EXIT_FAILED, f"{report.integrity_pages} pages did not verify", report.to_dict())


async def _dest_failed(record: RunRecord, dest: PostcopyDestination | None, block_dir: Any, code: int,
                       message: str, exc: BaseException | None = None) -> int:
    report = None
    if dest is not None:
        try:
            report = (dest.status() if dest.state == "cancelled" else dest.statistics()).to_dict()
        except Exception:  # not started far enough to have figures
            report = None
        await dest.close()
    if block_dir is not None:
        block_dir.remove_if_empty()
    if exc is not None and code == EXIT_FAILED and not isinstance(exc, (PostcopyError, OSError)):
        record.log.debug("internal error", exc_info=exc)
    return record.finish(code, message, report)


async def _start_dest(args: argparse.Namespace, record: RunRecord) -> PostcopyDestination:
    """Start a destination; with ``--wait``, retry an unreachable source until ``--deadline``."""
    tls = tls_context(args, server=False)
    if tls is not None and isinstance(args.source, str) and not args.tls_server_name:
        raise ConfigurationError(f"TLS to the Unix socket {args.source} needs --tls-server-name (the name in the "
                                 "source's certificate)")
    record.fields["tls"] = tls is not None
    options = DestinationOptions(source=args.source, block_dir=args.block_dir, control_path=args.clients,
                                 from_copy=args.from_copy,
                                 source_deadline=args.deadline, session=DestinationConfig(),
                                 vhost_user=tuple(args.vhost_user), operator_path=args.control,
                                 max_bandwidth=args.max_bandwidth, tls=tls, tls_server_name=args.tls_server_name,
                                 nice=args.nice, request_lane=args.request == "c")
    give_up = time.monotonic() + args.deadline
    waited = False
    trace.start("dest")
    while True:
        dest = PostcopyDestination(options)
        try:
            await asyncio.wait_for(dest.start(), args.handshake_timeout)
            return dest
        except (SourceLostError, asyncio.TimeoutError) as exc:
            await dest.close()
            if isinstance(exc, TlsHandshakeError):  # no use waiting: the certificates must change
                raise
            address = format_address(args.source)
            if isinstance(exc, asyncio.TimeoutError):
                raise _Unreachable(f"source {address} accepted the connection but did not complete the "
                                   f"handshake within {args.handshake_timeout:g} s (--handshake-timeout)") from None
            if not isinstance(exc, SourceUnreachableError):
                raise _Unreachable(f"source {address} ended the handshake: {_cause_text(exc)}") from None
            if not args.wait:
                raise _Unreachable(f"cannot reach source {address}: {_cause_text(exc)} "
                                   "(start the source first, or pass --wait)") from None
            if time.monotonic() >= give_up:
                raise _Unreachable(f"cannot reach source {address}: {_cause_text(exc)} "
                                   f"(waited {args.deadline:g} s, --deadline)") from None
            if not waited:
                record.log.info("waiting up to %g s for source %s (%s)", args.deadline, address, _cause_text(exc))
                waited = True
            await asyncio.sleep(min(0.2, max(0.0, give_up - time.monotonic())))
        except BaseException:
            await dest.close()
            raise


def _dest_blocks(dest: PostcopyDestination) -> list[dict[str, Any]]:
    return [{"name": b.name, "size": b.length, "page_size": b.page_size, "path": dest.block_path(b.name)}
            for b in dest.blocks]


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from aiopostcopy.tools.demo import demo_main

        return run(demo_main(args), args.loop)
    if args.command == "bench":
        from aiopostcopy.tools.bench import bench_main

        return bench_main(args)
    if args.command in ("status", "events", "recover", "cancel", "set"):
        from aiopostcopy.tools.ctl import control_main

        return run(control_main(args), "asyncio")
    record = RunRecord(args.command, args)
    try:
        setup_logging(args)
        _check_json_path(args.json)
        role = source_main if args.command == "source" else dest_main
        return int(run(role(args, record), args.loop))
    except ConfigurationError as exc:
        if str(exc).startswith("--json "):
            args.json = None  # the report has nowhere to go: the one line says why
        return record.finish(EXIT_USAGE, str(exc))
    except KeyboardInterrupt:
        record.interrupted = record.interrupted or "SIGINT"
        return record.finish(EXIT_INTERRUPTED, "interrupted")


def _check_json_path(path: str | None) -> None:
    if path is None or path == "-":
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigurationError(f"--json {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigurationError(f"--json {path}: cannot write in {parent}")
