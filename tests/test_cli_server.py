"""The tests' fork server (tests/cli_server.py) behaves as a fresh process would: exit status,
separate stdout and stderr, stdin, working directory, environment and PYTHONPATH, nothing of the
plugin imported in advance, and a run killed when its caller is."""

import os
import subprocess
import sys
import time

import pytest

from conftest import fork_server, python_for_scripts

pytestmark = pytest.mark.skipif(os.environ.get("EVOMOE_TEST_FORK_SERVER") == "0", reason="fork server switched off")


def py(code, *args, **kw):
    return subprocess.run([python_for_scripts(), "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw)


def test_exit_status_streams_and_stdin():
    p = subprocess.run([python_for_scripts(), "-c", "import sys; print(sys.stdin.read().upper()); "
                        "print('to stderr', file=sys.stderr); sys.exit(3)"], input="hello", capture_output=True,
                       text=True, timeout=120)
    assert (p.returncode, p.stdout, p.stderr) == (3, "HELLO\n", "to stderr\n")
    p = py("raise ValueError('boom')")
    assert p.returncode == 1 and "ValueError: boom" in p.stderr and p.stdout == ""


def test_argv_cwd_environment_and_pythonpath(tmp_path):
    (tmp_path / "helper_mod.py").write_text("VALUE = 7\n")
    code = ("import os, sys, json, helper_mod; print(json.dumps([sys.argv[1:], os.getcwd(), os.environ['X_TEST'], "
            "helper_mod.VALUE]))")
    p = py(code, "a", "--b", cwd=tmp_path.parent, env=dict(os.environ, X_TEST="y", PYTHONPATH=str(tmp_path)))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f'[["a", "--b"], "{tmp_path.parent}", "y", 7]'


def test_a_run_starts_as_a_fresh_process_would():
    """torch and fairseq are imported in advance (that is the saving); the plugin is not, and
    torch's thread count follows OMP_NUM_THREADS."""
    p = py("import sys, torch; print('fairseq_evomoe' in sys.modules, 'fairseq_cli.train' in sys.modules, "
           "torch.get_num_threads())", env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.stdout.split() == ["False", "False", "1"], p.stderr
    p = py("import sys; print(sys.executable)")
    assert p.stdout.strip() == python_for_scripts()  # so tools next to sys.executable are the shims too


def test_a_killed_caller_ends_its_run(tmp_path):
    marker = tmp_path / "alive"
    proc = subprocess.Popen([python_for_scripts(), "-c", "import time, sys\nwhile True:\n"
                             f"    open({str(marker)!r}, 'a').write('x')\n    time.sleep(0.1)"])
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists()
    proc.kill()
    proc.wait()
    time.sleep(1.0)  # the server polls its connection every 0.2 s
    size = marker.stat().st_size
    time.sleep(1.0)
    assert marker.stat().st_size == size, "the forked run kept running after its caller was killed"


def test_tools_and_other_interpreter_flags():
    server = fork_server()
    p = subprocess.run([server.tool("fairseq-train"), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--user-dir" in p.stdout
    p = subprocess.run([python_for_scripts(), "-V"], capture_output=True, text=True, timeout=60)  # the real interpreter
    assert p.returncode == 0 and sys.version.split()[0] in p.stdout + p.stderr
