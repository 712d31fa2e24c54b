"""Run untrusted, model-written Python in a separate, resource-limited process (HumanEval, tool use).

run_code(code) starts `python -I -c GUARD` in a new session (process group) inside a throwaway temporary
directory, with a scrubbed environment, and sends the code on stdin. The guard, before any user code runs:
  1. reads the code, then points stdin at /dev/null (input() gets EOF);
  2. when started as root: moves into a fresh network namespace if the kernel allows it (best effort: no
     interfaces, so no network even for code that gets past step 5), then drops to uid/gid nobody, so the
     kernel refuses writes to files and directories nobody cannot write and signals to other users' processes
     (PRELOAD's modules are imported first: nobody may be unable to read the interpreter's own files);
  3. sets hard rlimits the code cannot raise again: address space (memory), CPU seconds, processes (1: no
     fork, no threads), file size (caps stdout/stderr too: they are files), open files, no core dumps;
  4. blocks ctypes / _posixsubprocess / multiprocessing imports and replaces the dangerous functions of
     os / posix / shutil / subprocess / socket with ones that raise PermissionError, and refuses to open files
     for writing outside the working directory;
  5. execs the code as __main__ in a fresh namespace (the guard's own names are not visible).
The caller waits with a wall-clock timeout and then SIGKILLs the whole process group; the working directory is
deleted afterwards. Nothing here uses signals or preexec_fn in the caller, so run_code is safe to call from
several threads at once (e.g. parallel HumanEval checks).

Limits, stated plainly: step 4 is a Python-level guard and can be bypassed by determined code (e.g. through
_io.FileIO); the kernel-enforced guarantees are those of steps 2-3 and the wall-clock kill. Run as a normal user
(no privilege drop), file writes outside the temp dir are only stopped by the Python guard, and the network only
by the socket guard. The code can still read any file its uid can read.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024
DEFAULT_OUTPUT_BYTES = 64 * 1024  # per stream; also the largest file the code may write
MAX_OPEN_FILES = 64
NOBODY = 65534
SETUP_FAILED = 97  # guard exit code when the sandbox itself could not be set up
# Imported before dropping to nobody, who may not be able to read the interpreter's own files: what HumanEval's
# problems and typical solutions import. Other modules are only importable if nobody can read them.
PRELOAD = ("array", "bisect", "cmath", "collections", "copy", "dataclasses", "datetime", "_strptime", "decimal",
           "encodings.ascii", "encodings.latin_1", "enum", "fractions", "functools", "hashlib", "heapq", "itertools",
           "json", "math", "numbers", "operator", "pathlib", "random", "re", "statistics", "string", "textwrap",
           "time", "typing", "unicodedata")
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

# Runs in the child as `python -I -c GUARD workdir memory_bytes cpu_seconds output_bytes`; the code comes on stdin.
GUARD = r'''
def _setup():
    import builtins, io, os, resource, shutil, socket, subprocess, sys
    import _socket, posix
    workdir, memory, cpu, fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    try:
        code = sys.stdin.buffer.read().decode("utf-8")
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        if os.geteuid() == 0:
            for name in PRELOAD:  # nobody may not be able to read the interpreter's files (e.g. under /root)
                __import__(name)
            try:
                import ctypes
                ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET, best effort
            except Exception:
                pass
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        limits = {"RLIMIT_AS": (memory, memory), "RLIMIT_DATA": (memory, memory), "RLIMIT_CPU": (cpu, cpu + 1),
                  "RLIMIT_NPROC": (1, 1), "RLIMIT_FSIZE": (fsize, fsize), "RLIMIT_NOFILE": (MAX_OPEN_FILES,) * 2,
                  "RLIMIT_CORE": (0, 0)}
        for name, value in limits.items():
            if hasattr(resource, name):
                resource.setrlimit(getattr(resource, name), value)
    except Exception as e:
        sys.stderr.write(f"sandbox setup failed: {e!r}\n")
        os._exit(SETUP_FAILED)

    def blocked(name):
        def refuse(*args, **kwargs):
            raise PermissionError(f"{name} is disabled in the sandbox")
        return refuse

    for module in (os, posix):
        for name in ("system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "setsid", "setpgid",
                     "setpgrp", "remove", "unlink", "rmdir", "removedirs", "rename", "renames",
                     "replace", "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown",
                     "link", "symlink", "chroot", "chdir", "fchdir", "setuid", "setgid", "setreuid", "setregid",
                     "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv",
                     "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn",
                     "posix_spawnp", "register_at_fork", "startfile"):
            if hasattr(module, name):
                setattr(module, name, blocked(f"{module.__name__}.{name}"))
    for name in ("rmtree", "move", "chown", "copytree", "make_archive", "unpack_archive"):
        setattr(shutil, name, blocked(f"shutil.{name}"))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, blocked(f"subprocess.{name}"))
    for module in (socket, _socket):
        for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo"):
            if hasattr(module, name):
                setattr(module, name, blocked(f"socket.{name}"))
    for name in ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing", "pty", "resource"):
        sys.modules[name] = None  # `import ctypes` now raises ImportError

    real_open, real_os_open, root = builtins.open, os.open, os.path.realpath(workdir)

    def inside_workdir(path):
        if isinstance(path, int):
            return True  # an already-open descriptor
        return os.path.commonpath([root, os.path.realpath(os.fsdecode(path))]) == root

    def open_guarded(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside_workdir(file):
            raise PermissionError(f"writing {file!r} outside the sandbox directory is not allowed")
        return real_open(file, mode, *args, **kwargs)

    def os_open_guarded(path, flags, *args, **kwargs):
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        if flags & writes and not inside_workdir(path):
            raise PermissionError(f"writing {path!r} outside the sandbox directory is not allowed")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = open_guarded
    os.open = os_open_guarded
    builtins.exit = builtins.quit = blocked("exit")
    return code

NOBODY, SETUP_FAILED, MAX_OPEN_FILES, PRELOAD = {NOBODY}, {SETUP_FAILED}, {MAX_OPEN_FILES}, {PRELOAD}
_code = _setup()
del _setup, NOBODY, SETUP_FAILED, MAX_OPEN_FILES, PRELOAD
exec(compile(_code, "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''.replace("{NOBODY}", str(NOBODY)).replace("{SETUP_FAILED}", str(SETUP_FAILED)).replace(
    "{MAX_OPEN_FILES}", str(MAX_OPEN_FILES)).replace("{PRELOAD}", repr(PRELOAD))


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not a failure of the code under test)."""


@dataclass(frozen=True)
class ExecResult:
    success: bool  # exit status 0 within every limit
    stdout: str
    stderr: str
    error: str | None  # one line saying why it failed (the exception line, "timed out after 5s", ...)
    timed_out: bool  # wall clock or CPU time ran out
    memory_exceeded: bool


def read_capped(f, limit: int) -> tuple[str, bool]:
    """The first `limit` bytes of a spooled output file, and whether there was more."""
    f.seek(0)
    data = f.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def last_line(text: str) -> str | None:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def describe_failure(returncode: int, stderr: str, timed_out: bool, timeout: float, output_capped: bool) -> str:
    if timed_out:
        return f"timed out after {timeout:g}s"
    if returncode == -signal.SIGXFSZ or output_capped or "[Errno 27]" in (last_line(stderr) or ""):  # EFBIG
        return "output or file size limit exceeded"
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return last_line(stderr) or f"exit status {returncode}"


def run_code(code: str, timeout: float = 5.0, memory_bytes: int = DEFAULT_MEMORY_BYTES, cpu_seconds: int | None = None,
             output_bytes: int = DEFAULT_OUTPUT_BYTES) -> ExecResult:
    """Execute `code` as a Python program under the limits above. Never raises for anything the code does;
    raises SandboxError only if the sandbox cannot be set up, ValueError for bad limits."""
    if timeout <= 0 or memory_bytes <= 0 or output_bytes <= 0:
        raise ValueError(f"timeout, memory_bytes and output_bytes must be > 0, got {timeout}, {memory_bytes}, "
                         f"{output_bytes}")
    cpu_seconds = cpu_seconds if cpu_seconds is not None else max(1, int(timeout + 0.999))
    if cpu_seconds < 1:
        raise ValueError(f"cpu_seconds must be >= 1, got {cpu_seconds}")
    with tempfile.TemporaryDirectory(prefix="nanochat-sandbox-") as workdir, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        if os.geteuid() == 0:
            os.chown(workdir, NOBODY, NOBODY)  # the code runs as nobody and may use its working directory
        args = [sys.executable, "-I", "-c", GUARD, workdir, str(memory_bytes), str(cpu_seconds), str(output_bytes)]
        env = {**SANDBOX_ENV, "HOME": workdir, "TMPDIR": workdir}
        proc = subprocess.Popen(args, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                start_new_session=True, close_fds=True)
        timed_out = False
        try:
            proc.communicate(code.encode("utf-8", errors="surrogateescape"), timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc.pid)  # still unreaped, so its pid is still our group id (no pid-reuse race)
        finally:
            proc.kill()  # no-op if it exited
            proc.wait()
        stdout, out_capped = read_capped(out, output_bytes)
        stderr, err_capped = read_capped(err, output_bytes)
    if proc.returncode == SETUP_FAILED and stderr.startswith("sandbox setup failed"):
        raise SandboxError(stderr.strip())
    timed_out = timed_out or proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    success = proc.returncode == 0 and not timed_out
    error = None if success else describe_failure(proc.returncode, stderr, timed_out, timeout, out_capped or err_capped)
    memory_exceeded = not success and "MemoryError" in (last_line(stderr) or "")
    return ExecResult(success, stdout, stderr, error, timed_out, memory_exceeded)

