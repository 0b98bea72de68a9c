"""A fork server for the fairseq command-line tools the tests run.

Starting `fairseq-train` costs seconds of imports (torch, fairseq, the plugin) before it does
anything. The server pays them once: it imports the tools' modules and `--user-dir fairseq_evomoe`,
then forks one child per request. The child takes the request's working directory, environment,
argv and thread count, sends its stdout and stderr to files, reloads the tool's module (so the
tool configures logging as it does in a fresh process) and calls the console script's
`cli_main`; its exit status is the tool's. The server itself never runs a tensor operation, so no
thread pool exists when it forks.

Only runs that name the plugin with `--user-dir` (the same path as the server's) come here; runs
that must see a process without the plugin, and multi-process launchers (torchrun,
fairseq-hydra-train), stay plain subprocesses.

Protocol (one JSON object per line over a socket pair): request {tool, args, cwd, env, stdout,
stderr} -> {"pid": child} -> {"rc": exit status}.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

TOOLS = {
    "fairseq-train": "fairseq_cli.train",
    "fairseq-generate": "fairseq_cli.generate",
    "fairseq-eval-lm": "fairseq_cli.eval_lm",
    "fairseq-preprocess": "fairseq_cli.preprocess",
    "fairseq-interactive": "fairseq_cli.interactive",
    "fairseq-validate": "fairseq_cli.validate",
}


class ForkServer:
    def __init__(self, user_dir: str):
        self.user_dir = user_dir
        self._sock, theirs = socket.socketpair()
        self._log = tempfile.NamedTemporaryFile(prefix="cli_server_", suffix=".log", delete=False)
        self._proc = subprocess.Popen(
            [sys.executable, __file__, str(theirs.fileno()), user_dir], pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        theirs.close()
        self._io = self._sock.makefile("rwb", buffering=0)

    def handles(self, tool: str, args) -> bool:
        """Whether a run can go through the server: a known tool with `--user-dir` at the server's path."""
        args = list(args)
        dirs = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--user-dir"]
        return tool in TOOLS and bool(dirs) and all(os.path.realpath(d) == os.path.realpath(self.user_dir) for d in dirs)

    def _read(self) -> dict:
        line = self._io.readline()
        if not line:
            raise RuntimeError(f"the fairseq fork server stopped; its log: {Path(self._log.name).read_text()[-4000:]}")
        return json.loads(line)

    def run(self, tool: str, args, cwd: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="cli_run_") as d:
            out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
            request = {"tool": tool, "args": list(args), "cwd": cwd, "env": env, "stdout": out, "stderr": err}
            self._io.write((json.dumps(request) + "\n").encode())
            pid = self._read()["pid"]
            self._sock.settimeout(timeout)
            try:
                rc = self._read()["rc"]
                timed_out = False
            except (socket.timeout, TimeoutError):
                os.kill(pid, 9)
                self._sock.settimeout(None)
                self._read()  # the killed child's status
                timed_out = True
            finally:
                self._sock.settimeout(None)
            stdout, stderr = Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace")
        cmd = [tool, *args]
        if timed_out:
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(cmd, rc, stdout, stderr)

    def close(self):
        self._io.close()
        self._sock.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        os.unlink(self._log.name)


def _run_child(request: dict) -> int:
    """In the forked child: become the requested command and run it; returns its exit status."""
    import importlib
    import logging
    import traceback

    import torch

    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        if os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        module = importlib.reload(sys.modules[TOOLS[request["tool"]]])  # its logging set-up, as at start-up
        sys.argv = [request["tool"], *request["args"]]
        module.cli_main()
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


def _serve(fd: int, user_dir: str):
    import argparse
    import importlib

    import fairseq.utils

    for module in TOOLS.values():
        importlib.import_module(module)
    fairseq.utils.import_user_module(argparse.Namespace(user_dir=user_dir))
    sock = socket.socket(fileno=fd)
    io = sock.makefile("rwb", buffering=0)
    for line in io:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            io.close()
            sock.close()
            os._exit(_run_child(request))
        io.write((json.dumps({"pid": pid}) + "\n").encode())
        _, status = os.waitpid(pid, 0)
        io.write((json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n").encode())


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2])
