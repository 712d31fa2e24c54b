"""The code sandbox: results of ordinary programs, and containment of hostile ones (every hostile program is
reported as a failed ExecResult, never an exception or a crash in the caller)."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nanochat_core.sandbox import ExecResult, run_code

AS_ROOT = os.geteuid() == 0  # the sandbox then drops to nobody: the kernel enforces the file and process limits
REPO = Path(__file__).resolve().parents[1]


def mount_namespaces_work() -> bool:
    """Whether the kernel gives us the namespaces the sandbox asks for (root: plainly; anyone else: inside a user
    namespace) and a tmpfs mount in them."""
    probe = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
             f"assert libc.unshare(0x48020000 | {0 if AS_ROOT else 0x10000000}) == 0\n"
             "if os.getuid():\n    open('/proc/self/setgroups', 'w').write('deny')\n"
             "    open('/proc/self/uid_map', 'w').write(f'{os.getuid()} {os.getuid()} 1')\n"
             "assert libc.mount(None, b'/', None, (1 << 14) | (1 << 18), None) == 0\n"
             "assert libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, None) == 0\n")
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def test_happy_path_returns_stdout():
    result = run_code("import math\nprint('hello', math.factorial(5))")
    assert result == ExecResult(True, "hello 120\n", "", None, False, False)


def test_exception_is_a_failure_with_the_error_line():
    result = run_code("def f():\n    raise ValueError('boom')\nprint('before')\nf()")
    assert not result.success and result.stdout == "before\n"
    assert result.error == "ValueError: boom"
    assert "Traceback" in result.stderr and not result.timed_out and not result.memory_exceeded


def test_syntax_error_and_tricky_quoting():
    assert run_code("def f(:\n").error.startswith("SyntaxError")
    tricky = "print('''a \"b\" \\\\n'''); print(\"\\u00e9 ```\")"
    assert run_code(tricky).stdout == 'a "b" \\n\né ```\n'


def test_infinite_loop_is_killed_within_the_timeout():
    start = time.monotonic()
    result = run_code("while True:\n    pass", timeout=1.0)
    assert time.monotonic() - start < 3.0
    assert not result.success and result.timed_out and result.error == "timed out after 1s"


def test_sleeping_forever_is_killed_by_wall_time():
    start = time.monotonic()
    result = run_code("import time\ntime.sleep(60)", timeout=0.5, cpu_seconds=30)
    assert time.monotonic() - start < 3.0 and result.timed_out and not result.success


@pytest.mark.parametrize("code", ["x = bytearray(1 << 30)", "c = []\nwhile True:\n    c.append(b'x' * (1 << 24))"])
def test_memory_bomb_is_reported(code):
    result = run_code(code, timeout=5.0, memory_bytes=128 * 1024 * 1024)
    assert not result.success and result.memory_exceeded and not result.timed_out
    assert result.error == "MemoryError"


def test_fork_bomb_fails_fast():
    start = time.monotonic()
    result = run_code("import os\nwhile True:\n    os.fork()", timeout=5.0)
    assert not result.success and "PermissionError" in result.error
    assert time.monotonic() - start < 3.0


def test_threads_and_processes_are_refused_by_the_kernel():
    """RLIMIT_NPROC=1 (root drops to nobody first, as root ignores it): even a thread cannot be started."""
    result = run_code("import threading\nt = threading.Thread(target=print)\nt.start()")
    assert not result.success and "can't start new thread" in result.error


@pytest.mark.parametrize("code", [
    "import os\nos.system('echo pwned')",
    "import subprocess\nsubprocess.run(['echo', 'pwned'])",
    "import os\nos.kill(1, 9)",
    "import shutil\nshutil.rmtree('/tmp')",
    "import os\nos.execv('/bin/echo', ['echo', 'pwned'])",
    "import posix\nposix.system('echo pwned')",
    "import ctypes",
    "import _posixsubprocess",
    "import multiprocessing",
    "input()",
])
def test_dangerous_calls_fail(code):
    result = run_code(code)
    assert not result.success and result.error and "pwned" not in result.stdout


def test_os_system_does_not_run_the_command(tmp_path):
    marker = tmp_path / "marker"
    result = run_code(f"import os\nos.system('touch {marker}')")
    assert not result.success and not marker.exists()


def test_writes_stay_inside_the_working_directory(tmp_path):
    """Guaranteed: open()/os.open() for writing outside the working dir raise (Python guard); as root, the kernel
    also refuses the write (uid nobody) for a path nobody cannot write, even through a raw _io.FileIO."""
    target = tmp_path / "outside.txt"
    inside = run_code("open('local.txt', 'w').write('ok')\nprint(open('local.txt').read())")
    assert inside.success and inside.stdout == "ok\n"
    for code in (f"open({str(target)!r}, 'w').write('x')",
                 f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
                 f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)"):
        result = run_code(code)
        assert not result.success and "PermissionError" in result.error
    if AS_ROOT:
        bypass = run_code(f"import _io\n_io.FileIO({str(target)!r}, 'w')")
        assert not bypass.success and "Permission denied" in bypass.error or (  # /tmp private: no tmp_path there
            mount_namespaces_work() and "No such file or directory" in bypass.error)
    assert not target.exists()


def test_file_and_output_sizes_are_capped():
    result = run_code("print('x' * 10_000_000)", output_bytes=4096)
    assert not result.success and len(result.stdout) <= 4096
    assert result.error == "output or file size limit exceeded"
    big_file = run_code("open('big', 'wb').write(b'x' * 10_000_000)", output_bytes=4096)
    assert not big_file.success


def test_network_is_blocked():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')"
        result = run_code(code)
        assert not result.success and "PermissionError" in result.error
        raw = run_code(f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))")
        assert not raw.success
        with pytest.raises(TimeoutError):
            server.accept()  # nobody connected


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("FAKE_SECRET_KEY", "s3cr3t-value")
    result = run_code("import os\nprint(sorted(os.environ))\nprint(os.environ.get('FAKE_SECRET_KEY'))")
    assert result.success and "s3cr3t-value" not in result.stdout and "FAKE_SECRET_KEY" not in result.stdout


def test_guard_internals_are_invisible_and_workdir_is_removed():
    result = run_code("import os\nprint(os.getcwd())\nprint([k for k in globals() if k != 'os' and k[:2] != '__'])")
    assert result.success
    workdir, names = result.stdout.splitlines()
    assert names == "[]" and Path(workdir).name.startswith("nanochat-sandbox-")
    assert not Path(workdir).exists()


def test_concurrent_calls_from_threads():
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: run_code(f"print({i} * 2)"), range(8)))
    assert [r.stdout for r in results] == [f"{i * 2}\n" for i in range(8)]


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="timeout"):
        run_code("print(1)", timeout=0)
    with pytest.raises(ValueError, match="cpu_seconds"):
        run_code("print(1)", cpu_seconds=0)


@pytest.mark.parametrize("ending", ["import sys\nsys.exit(0)", "raise SystemExit(0)", "import os\nos._exit(0)",
                                    "import atexit, os\natexit.register(os._exit, 0)\nraise ValueError('x')"])
def test_exit_with_status_0_before_the_end_is_not_a_success(ending):
    result = run_code(f"print('started', flush=True)\n{ending}\nprint('the end')")
    assert not result.success and result.stdout == "started\n"
    assert "before the end" in result.error


@pytest.mark.skipif(not mount_namespaces_work(), reason="no mount namespaces here: writes outside the "
                                                         "working directory are only refused by the Python guard")
def test_nothing_the_code_writes_outlives_the_run():
    """Kernel-enforced, even through _io.FileIO (which gets past the Python guard): /tmp, /var/tmp,
    /dev/shm and the working directory are private tmpfs mounts that die with the run, and every other mount is
    read-only to the code."""
    name = f"nanochat-escape-{uuid.uuid4().hex}"
    # A world-writable dir on a mount the code sees read-only: not under /tmp (the checkout may be, as in CI), and
    # reachable by the uid the code runs as (nobody when we are root, else ourselves).
    outside = Path(tempfile.mkdtemp(prefix=".sandbox-escape-", dir="/" if os.geteuid() == 0 else Path.home()))
    outside.chmod(0o777)
    code = f"""
import _io
for d in ("/tmp", "/var/tmp", "/dev/shm", "."):
    _io.FileIO(d + "/{name}", "w").write(b"private")
    print(d, open(d + "/{name}").read())
try:
    _io.FileIO("{outside}/{name}", "w")
except OSError as e:
    print(e.strerror)
"""
    try:
        result = run_code(code)
        assert result.success, result.stderr
        assert result.stdout.splitlines() == ["/tmp private", "/var/tmp private", "/dev/shm private", ". private",
                                              "Read-only file system"]
        left = [p for p in (Path("/tmp", name), Path("/var/tmp", name), Path("/dev/shm", name),
                            outside / name) if p.exists()]
        assert left == []
    finally:
        shutil.rmtree(outside)
