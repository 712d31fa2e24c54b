"""Run untrusted, model-written Python in a separate, resource-limited process (HumanEval, tool use).

run_code(code) starts `python -I -c GUARD` in a new session (process group) inside a throwaway temporary
directory, with a scrubbed environment, and sends a random nonce and the code on stdin. The guard, before any
user code runs:
  1. reads the nonce and the code, then points stdin at /dev/null (input() gets EOF);
  2. moves into fresh mount, IPC and network namespaces (as root directly, otherwise inside a new user namespace
     that maps only the caller's own uid), where every mount is read-only except new, size-capped tmpfs mounts on
     /tmp, /var/tmp, /dev/shm and the working directory: whatever the code writes dies with the run, even through
     _io.FileIO; no network interfaces; no SysV IPC shared with anyone. Best effort: where the kernel refuses
     namespaces the code runs without them (as root, still without network if that one is allowed);
  3. when started as root: drops to uid/gid nobody, so the kernel refuses writes to files and directories nobody
     cannot write and signals to other users' processes (PRELOAD's modules are imported first: nobody may be
     unable to read the interpreter's own files); otherwise drops every capability the user namespace gave;
     either way sets no_new_privs;
  4. sets hard rlimits the code cannot raise again: address space (memory), CPU seconds, processes (1: no
     fork, no threads), file size (caps stdout/stderr too: they are files), open files, no core dumps;
  5. blocks ctypes / _posixsubprocess / multiprocessing imports and replaces the dangerous functions of
     os / posix / shutil / subprocess / socket with ones that raise PermissionError, and refuses to open files
     for writing outside the working directory;
  6. execs the code as __main__ in a fresh namespace (the guard's own names are not visible), and only if that
     returns writes the nonce to a pipe only the parent reads. Success is exit status 0 AND the nonce: code that
     ends the run early with status 0 (sys.exit(0), os._exit(0), an atexit or excepthook trick) fails.
The caller waits with a wall-clock timeout and then SIGKILLs the whole process group; the working directory is
deleted afterwards. Nothing here uses signals or preexec_fn in the caller, so run_code is safe to call from
several threads at once (e.g. parallel HumanEval checks).

Limits, stated plainly: step 5 is a Python-level guard and can be bypassed by determined code (e.g. through
_io.FileIO); the kernel-enforced guarantees are those of steps 2-4 and the wall-clock kill. Without namespaces
(step 2 refused), file writes outside the temp dir are only stopped by the Python guard (and, as root, by uid
nobody's permissions: /tmp stays writable) and the network only by the socket guard. The code can still read
any file its uid can read. The nonce proves the program reached its end, not that it is honest: it lives in the
guard's memory, which code in the same interpreter can dig out with introspection (sys._getframe, gc), and code
can game in-process tests in other ways (e.g. an object whose __eq__ is always True).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024
DEFAULT_OUTPUT_BYTES = 64 * 1024  # per stream; also the largest file the code may write
MAX_OPEN_FILES = 64
PRIVATE_TMP_BYTES = 16 * 1024 * 1024  # each private tmpfs (/tmp, /var/tmp, /dev/shm, working dir): it is memory
PRIVATE_TMP_INODES = 1024
NONCE_BYTES = 16
NOBODY = 65534
SETUP_FAILED = 97  # guard exit code when the sandbox itself could not be set up
# Imported before dropping to nobody, who may not be able to read the interpreter's own files: what HumanEval's
# problems and typical solutions import. Other modules are only importable if nobody can read them.
PRELOAD = ("array", "bisect", "cmath", "collections", "copy", "dataclasses", "datetime", "_strptime", "decimal",
           "encodings.ascii", "encodings.latin_1", "enum", "fractions", "functools", "hashlib", "heapq", "itertools",
           "json", "math", "numbers", "operator", "pathlib", "random", "re", "statistics", "string", "textwrap",
           "time", "typing", "unicodedata")
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

# Runs in the child as `python -I -c GUARD workdir memory_bytes cpu_seconds output_bytes verdict_fd`; stdin brings
# a one-line nonce, then the code. After the code returns, the guard writes the nonce to verdict_fd.
GUARD = r'''
def _isolate_filesystem(ctypes, libc, os, workdir, as_root):
    """Best effort, kernel-enforced: a private mount namespace (plus a user namespace when not root) in which
    every mount is read-only except fresh tmpfs mounts on /tmp, /var/tmp, /dev/shm and the working directory,
    all gone when the run ends; also private IPC and no network. False if the kernel refuses namespaces."""
    isolate = 0x00020000 | 0x08000000 | 0x40000000  # CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET
    if libc.unshare(isolate if as_root else isolate | 0x10000000) != 0:  # CLONE_NEWUSER: mounts without root
        if as_root:
            libc.unshare(0x40000000)  # at least no network
        return False

    def check(result, what):
        if result != 0:
            raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")

    try:
        if not as_root:  # map our own uid/gid only: the code stays who it was, with no capabilities (see _setup)
            uid, gid = os.getuid(), os.getgid()
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        # mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, {MOUNT_ATTR_RDONLY, 0, MS_PRIVATE, 0}): the whole tree
        # read-only and private (no mount of ours propagates out); older kernels lack it: private only, then
        attr = (ctypes.c_uint64 * 4)(1, 0, 1 << 18, 0)
        if libc.syscall(442, -100, b"/", 0x8000, attr, ctypes.sizeof(attr)) != 0:
            check(libc.mount(None, b"/", None, (1 << 14) | (1 << 18), None), "making / private")  # MS_REC|MS_PRIVATE
    except OSError:
        return False  # e.g. a security module that allows user namespaces but no mounts in them: run without
    flags = 2 | 4 | 8  # MS_NOSUID | MS_NODEV | MS_NOEXEC
    for target in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(target):
            check(libc.mount(b"tmpfs", target.encode(), b"tmpfs", flags, TMPFS_OPTIONS + b",mode=1777"), target)
    os.makedirs(workdir, exist_ok=True)  # under /tmp it is gone now: make it again
    check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", flags, TMPFS_OPTIONS + b",mode=0700"), workdir)
    if as_root:
        os.chown(workdir, NOBODY, NOBODY)
    os.chdir(workdir)
    return True

def _setup():
    import builtins, ctypes, io, os, resource, shutil, socket, subprocess, sys
    import _socket, posix
    workdir, memory, cpu, fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    verdict_fd = int(sys.argv[5])
    try:
        nonce, _, code = sys.stdin.buffer.read().partition(b"\n")  # the nonce lives only in report() below
        code = code.decode("utf-8")
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.set_inheritable(verdict_fd, False)
        as_root = os.geteuid() == 0
        if as_root:
            for name in PRELOAD:  # nobody may not be able to read the interpreter's files (e.g. under /root)
                __import__(name)
        libc = ctypes.CDLL(None, use_errno=True)
        _isolate_filesystem(ctypes, libc, os, workdir, as_root)
        if as_root:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        elif libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()) != 0:  # v3, all empty
            raise OSError(ctypes.get_errno(), "dropping the user namespace's capabilities")  # could undo mounts
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary gives privileges back
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
    write = posix.write  # the real one: the code may replace os.write / posix.write

    def report():  # the code ran to its end: tell the parent, on the channel only it reads
        write(verdict_fd, nonce)

    return code, report

NOBODY, SETUP_FAILED, MAX_OPEN_FILES, PRELOAD = {NOBODY}, {SETUP_FAILED}, {MAX_OPEN_FILES}, {PRELOAD}
TMPFS_OPTIONS = {TMPFS_OPTIONS}
_code, _report = _setup()
del _setup, _isolate_filesystem, NOBODY, SETUP_FAILED, MAX_OPEN_FILES, PRELOAD, TMPFS_OPTIONS
exec(compile(_code, "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
_report()
'''.replace("{NOBODY}", str(NOBODY)).replace("{SETUP_FAILED}", str(SETUP_FAILED)).replace(
    "{MAX_OPEN_FILES}", str(MAX_OPEN_FILES)).replace("{PRELOAD}", repr(PRELOAD)).replace(
    "{TMPFS_OPTIONS}", repr(f"size={PRIVATE_TMP_BYTES},nr_inodes={PRIVATE_TMP_INODES}".encode()))


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not a failure of the code under test)."""


@dataclass(frozen=True)
class ExecResult:
    success: bool  # ran to the end of the program (exit status 0 alone is not enough) within every limit
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


def read_verdict(fd: int, size: int) -> bytes:
    """What the child wrote on the verdict pipe (at most size + 1 bytes, so extra bytes show), and close it."""
    try:
        os.set_blocking(fd, False)  # the child is reaped, but never hang on a pipe
        return os.read(fd, size + 1)
    except BlockingIOError:
        return b""
    finally:
        os.close(fd)


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
    if returncode == 0:  # sys.exit(0), os._exit(0), an atexit or excepthook trick: the code never reached its end
        last = last_line(stderr)
        return "exited with status 0 before the end of the program" + (f" (after {last})" if last else "")
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
    nonce = secrets.token_hex(NONCE_BYTES).encode()
    with tempfile.TemporaryDirectory(prefix="nanochat-sandbox-") as workdir, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        if os.geteuid() == 0:
            os.chown(workdir, NOBODY, NOBODY)  # the code runs as nobody and may use its working directory
        verdict_read, verdict_write = os.pipe()
        args = [sys.executable, "-I", "-c", GUARD, workdir, str(memory_bytes), str(cpu_seconds), str(output_bytes),
                str(verdict_write)]
        env = {**SANDBOX_ENV, "HOME": workdir, "TMPDIR": workdir}
        try:
            proc = subprocess.Popen(args, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True, pass_fds=(verdict_write,))
        finally:
            os.close(verdict_write)  # the child holds the only write end: EOF once it is gone
        timed_out = False
        try:
            proc.communicate(nonce + b"\n" + code.encode("utf-8", errors="surrogateescape"), timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc.pid)  # still unreaped, so its pid is still our group id (no pid-reuse race)
        finally:
            proc.kill()  # no-op if it exited
            proc.wait()
            completed = read_verdict(verdict_read, len(nonce)) == nonce
        stdout, out_capped = read_capped(out, output_bytes)
        stderr, err_capped = read_capped(err, output_bytes)
    if proc.returncode == SETUP_FAILED and stderr.startswith("sandbox setup failed"):
        raise SandboxError(stderr.strip())
    timed_out = timed_out or proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    success = proc.returncode == 0 and completed and not timed_out
    error = None if success else describe_failure(proc.returncode, stderr, timed_out, timeout, out_capped or err_capped)
    memory_exceeded = not success and "MemoryError" in (last_line(stderr) or "")
    return ExecResult(success, stdout, stderr, error, timed_out, memory_exceeded)

