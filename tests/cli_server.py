"""A fork server for the fairseq command-line tools and Python scripts the tests run.

Every `fairseq-train` or `python scripts/x.py` a test starts spends seconds importing torch and
fairseq before it does anything. The server imports these two (and torch._dynamo, which every
fairseq run imports with its first optimizer) once and forks one process per run;
everything else (the plugin, `fairseq_cli`'s modules, the script) each run imports itself, as a
fresh process does.

Runs reach it through shims, small stdlib-only executables in `ForkServer.bin_dir`: one per
fairseq console script and one named `python`. A shim sends the server its argv, working
directory, environment and its stdin/stdout/stderr file descriptors, and exits with the run's exit
status; the forked run writes straight to the shim's own streams. So anything that starts a process
(a test, a shell script given `PYTHON=<bin_dir>/python` or `PATH=<bin_dir>:...`) uses it unchanged.
The `python` shim serves `python SCRIPT.py ...`, `python -c CODE ...` and `python -m MODULE ...`,
and hands anything else (other flags, no script) to the real interpreter.

In the forked run: the working directory, environment and argv are the caller's, PYTHONPATH is on
sys.path, a script's sys.executable is the `python` shim (so the tools it finds next to it and the
Python scripts it starts with it go through the server too), torch's thread count follows OMP_NUM_THREADS, logging is as a fresh process has it at that point (a tool starts
unconfigured and configures it on import; a script finds the handler `import fairseq` adds), and
sys.path[0] is the script's folder. A run ends when the
shim's connection closes (the caller killed it, e.g. on a timeout). The server itself never runs a
tensor operation, so no thread pool exists when it forks.
"""

import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = {
    "fairseq-train": "fairseq_cli.train",
    "fairseq-generate": "fairseq_cli.generate",
    "fairseq-eval-lm": "fairseq_cli.eval_lm",
    "fairseq-preprocess": "fairseq_cli.preprocess",
    "fairseq-interactive": "fairseq_cli.interactive",
    "fairseq-validate": "fairseq_cli.validate",
    "fairseq-hydra-train": "fairseq_cli.hydra_train",
}

SHIM = """#!/bin/sh
''''exec "{python}" -S "$0" "$@" # '''
import json, os, socket, sys
name, args = {name!r}, sys.argv[1:]
served = args[:1] in (["-c"], ["-m"]) and len(args) > 1 or args[:1] != [] and args[0].endswith(".py")
served = served and "--multiprocessing-fork" not in args  # multiprocessing's spawned children need their pipes
if name == "python" and not served:
    os.execv({python!r}, [{python!r}, *args])  # anything else: the real interpreter
s = socket.socket(socket.AF_UNIX)
try:
    s.connect({sock!r})
except OSError:  # the server is gone: run the real thing
    real = {python!r} if name == "python" else os.path.join(os.path.dirname({python!r}), name)
    os.execv(real, [real, *args])
socket.send_fds(s, [b"F"], [0, 1, 2])
s.sendall(json.dumps({{"name": name, "args": args, "cwd": os.getcwd(), "env": dict(os.environ),
                      "shim": os.path.abspath(sys.argv[0])}}).encode() + b"\\n")
reply = b""
while not reply.endswith(b"\\n"):
    chunk = s.recv(64)
    if not chunk:
        sys.exit(1)
    reply += chunk
sys.exit(json.loads(reply)["rc"])
"""  # line 2: a command to the shell, a string to Python (no limit on the interpreter path's length)


class ForkServer:
    def __init__(self):
        self._dir = Path(tempfile.mkdtemp(prefix="cli_server_"))
        self.socket_path = str(self._dir / "socket")
        self.bin_dir = self._dir / "bin"
        self.bin_dir.mkdir()
        for name in (*TOOLS, "python"):
            shim = self.bin_dir / name
            shim.write_text(SHIM.format(python=sys.executable, name=name, sock=self.socket_path))
            shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        self._log = open(self._dir / "server.log", "wb")
        self._proc = subprocess.Popen([sys.executable, __file__, self.socket_path], stdin=subprocess.DEVNULL,
                                      stdout=self._log, stderr=self._log)
        for _ in range(600):  # the socket exists within a second (bound before the imports)
            if os.path.exists(self.socket_path) or self._proc.poll() is not None:
                break
            time.sleep(0.05)

    @property
    def python(self) -> str:
        return str(self.bin_dir / "python")

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)

    def close(self):
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._log.close()
        shutil.rmtree(self._dir)


def _run(request: dict) -> int:
    """In the forked process: become the requested run; returns its exit status."""
    import importlib
    import logging
    import runpy
    import traceback
    import types

    import torch

    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
        sys.path[1:1] = extra  # as a fresh interpreter puts PYTHONPATH after the script's folder
        name, args = request["name"], request["args"]
        if name == "python":  # as for an interpreter started by this path: tools next to it are the shims
            sys.executable = request["shim"]
        if name == "python" and args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path[0] = ""
            main = types.ModuleType("__main__")
            sys.modules["__main__"] = main
            exec(compile(args[1], "<string>", "exec"), main.__dict__)
        elif name == "python" and args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif name == "python":
            script = os.path.abspath(args[0])
            sys.argv = [args[0], *args[1:]]
            sys.path[0] = os.path.dirname(script)
            runpy.run_path(script, run_name="__main__")
        else:
            # a console script configures logging before it imports fairseq (whose import adds a
            # handler when none exists): start from an unconfigured root logger, as it does
            root = logging.getLogger()
            for h in list(root.handlers):
                root.removeHandler(h)
            root.setLevel(logging.WARNING)
            sys.argv = [name, *args]
            sys.path[0] = os.path.dirname(sys.executable)
            importlib.import_module(TOOLS[name]).cli_main()
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    return code


def _supervise(conn: socket.socket):
    """In a forked process per connection: start the run, wait for it, send its exit status; kill
    it when the shim goes away first."""
    _, fds, _, _ = socket.recv_fds(conn, 1, 3)
    request = json.loads(conn.makefile("rb").readline())
    pid = os.fork()
    if pid == 0:
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        os._exit(_run(request))
    for fd in fds:
        os.close(fd)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        readable, _, _ = select.select([conn], [], [], 0.2)
        if readable and not conn.recv(1):  # the shim is gone
            os.kill(pid, signal.SIGKILL)
    try:
        conn.sendall((json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n").encode())
    except OSError:
        pass


def _serve(socket_path: str):
    server = socket.socket(socket.AF_UNIX)
    server.bind(socket_path)  # shims may connect now; they wait until the imports are done
    server.listen(64)
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (every fairseq run imports it: torch.optim does, at the first optimizer)
    import fairseq  # noqa: F401  (the tools' own modules are left to each run: importing them configures logging)

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the system
    parent = os.getppid()
    server.settimeout(5.0)
    while True:
        try:
            conn, _ = server.accept()
        except socket.timeout:
            if os.getppid() != parent:  # the test session is gone (killed): so is the server
                return
            continue
        conn.settimeout(None)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the supervisor waits for its run
            try:
                _supervise(conn)
            finally:
                os._exit(0)
        conn.close()


if __name__ == "__main__":
    _serve(sys.argv[1])
