"""Reading a config file in a short-lived child process, for a master that must not stall.

The master forks a child — a copy of itself, so nothing is imported again — that reads the file,
validates it, checks its TLS files, pickles the config it built into a pipe and exits. Whatever a
file does to the reader happens in that child: the master's loop only waits on the pipe, and the
memory a big parse took goes back to the system when the child exits, instead of staying in the
master's heap (freed objects rarely give their arenas back) for every later worker to inherit.

The limits in source.py make every file cheap to read; the child's own limits are the second line:
a wall-clock deadline (``PARSE_TIMEOUT``, after which it is killed) and a cap on the address space
it may add to what it inherits (``PARSE_MEMORY``, past which allocations fail). A result that
cannot be had for any reason is a ConfigError, like a bad file: the caller reports one kind of
failure.

The pickle comes from our own fork over a pipe only it holds: it is trusted as much as the master.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import math
import os
import pickle
import resource
import signal
from dataclasses import dataclass
from typing import Any

from proxyd.config.loader import load_config_text_with_warnings, read_config_file
from proxyd.config.models import GatewayConfig
from proxyd.errors import ConfigError, ConfigIssue

__all__ = ["MAX_ISSUES", "PARSE_MEMORY", "PARSE_TIMEOUT", "Loaded", "load_isolated"]

PARSE_TIMEOUT = 30.0
PARSE_MEMORY = 1024 * 1024 * 1024  # bytes of address space beyond what the child inherits
# A child that has sent its result is exiting; this only bounds waiting to learn how it ended.
_EXIT_WAIT = 5.0
# The master keeps a failed reload's error (in /status) until the next reload: a file with a
# problem on each of its lines must not make that a large string. check-config lists them all.
MAX_ISSUES = 50


@dataclass(frozen=True)
class Loaded:
    config: GatewayConfig
    warnings: list[ConfigIssue]
    sha256: str  # of the bytes that were read: the file may have changed since


def _load(path: str) -> Loaded:
    """What the child does: everything ``run`` and ``check-config`` require of a file."""
    from proxyd.listener_tls import file_issues

    text = read_config_file(path)
    config, warnings = load_config_text_with_warnings(text, path)
    if issues := file_issues(config, path):
        raise ConfigError(issues)
    return Loaded(config, warnings, hashlib.sha256(text.encode("utf-8")).hexdigest())


async def load_isolated(path: str, *, timeout: float = PARSE_TIMEOUT,
                        memory: int = PARSE_MEMORY) -> Loaded:
    """Read and check ``path`` in a child process; raises ConfigError for any failure.

    Cancelling it kills the child at once: a master that is asked to stop does not wait.
    """
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    # Blocked across fork: a signal meant for the master that reached the child before it
    # dropped the master's handlers would be written to the master's signal wakeup fd.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(r)
        os.close(w)
        raise
    if pid == 0:
        _child(path, w, mask, timeout, memory)  # never returns
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(w)
    try:
        # Opened before anything can reap the child (the master's waitpid(-1) may, once it
        # has exited): the pidfd then still names this process, never a reused pid.
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        try:
            async with asyncio.timeout(timeout):
                payload = await _read_to_eof(loop, r)
        except TimeoutError:
            _kill(pid, pidfd)
            await _exit_status(loop, pid, pidfd)
            raise _failure(path, f"reading the config took longer than {timeout:g}s; "
                           "stopped it") from None
        except BaseException:
            _kill(pid, pidfd)  # cancelled: the caller is going away
            raise
        status = await _exit_status(loop, pid, pidfd)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    try:
        kind, value = pickle.loads(payload)
    except Exception:  # nothing, or a partial write: the child died before it finished
        raise _failure(path, f"the process reading the config {_ended(status)} without a "
                       "result") from None
    if kind == "ok":
        loaded: Loaded = value
        return loaded
    if kind == "issues":
        raise ConfigError(value)
    raise _failure(path, str(value))


def _failure(path: str, message: str) -> ConfigError:
    return ConfigError([ConfigIssue(path, None, None, "", message)])


def _ended(status: int | None) -> str:
    if status is None:
        return "ended"
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


async def _read_to_eof(loop: asyncio.AbstractEventLoop, fd: int) -> bytes:
    reader = asyncio.StreamReader()
    pipe = os.fdopen(fd, "rb", buffering=0)
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe)
    except BaseException:
        pipe.close()
        raise
    try:
        return await reader.read()
    finally:
        transport.close()


def _kill(pid: int, pidfd: int | None) -> None:
    with contextlib.suppress(ProcessLookupError):
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


async def _exit_status(loop: asyncio.AbstractEventLoop, pid: int, pidfd: int | None
                       ) -> int | None:
    """The child's exit status once it has exited; None when unknown: the master's own reaping
    (``waitpid(-1)``, which takes every child) may have got it first, and then has it."""
    if pidfd is not None:
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            async with asyncio.timeout(_EXIT_WAIT):
                await exited
        except TimeoutError:
            return None
        finally:
            loop.remove_reader(pidfd)
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if reaped else None


# -- in the child --------------------------------------------------------------------------------

def _child(path: str, fd: int, mask: Any, timeout: float, memory: int) -> None:
    code = 1
    try:
        _detach(fd, mask)
        # Even if the master is gone and nobody kills us: SIGALRM's default action ends us.
        signal.alarm(math.ceil(timeout) + 1)
        _cap_memory(memory)
        with contextlib.suppress(OSError):
            os.nice(10)  # the workers serving traffic come first
        result: tuple[str, Any]
        try:
            result = ("ok", _load(path))
        except ConfigError as exc:
            result = ("issues", _shortened(exc.issues, path))
        except MemoryError:
            result = ("error", f"reading the config needed more than the {memory >> 20} MiB "
                               "allowed; stopped it")
        except Exception as exc:  # whatever it is, the caller must hear of it
            result = ("error", f"cannot read the config: {type(exc).__name__}: {exc}")
        payload = memoryview(pickle.dumps(result, pickle.HIGHEST_PROTOCOL))
        while payload:
            payload = payload[os.write(fd, payload):]
        code = 0
    finally:
        os._exit(code)


def _shortened(issues: list[ConfigIssue], path: str) -> list[ConfigIssue]:
    if len(issues) <= MAX_ISSUES:
        return issues
    more = len(issues) - MAX_ISSUES
    return [*issues[:MAX_ISSUES], ConfigIssue(
        path, None, None, "", f"... and {more} more; `proxyd check-config` lists every one")]


def _detach(fd: int, mask: Any) -> None:
    """Drop what belongs to the master: its signal handlers and every descriptor but ours."""
    # Frozen, no master object is ever collected here: one holding a descriptor number would
    # close it, and that number may by then be the config file's.
    gc.freeze()
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError, TypeError):
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    keep = {0, 1, 2, fd}
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:
            with contextlib.suppress(OSError):
                os.close(int(name))


def _cap_memory(memory: int) -> None:
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + memory
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
