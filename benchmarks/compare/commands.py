"""Running the comparison's external tools (data preparation, fairseq-train, the evaluation scripts)
and printing progress lines.

The other modules call `commands.run_command` through this module rather than importing the name,
so replacing it here (as the tests do, to run without fairseq) replaces it for every caller."""

import shlex
import subprocess
from pathlib import Path
from typing import Dict, List

from . import REPO


def log(msg: str) -> None:
    """Print `msg` as one line in a single write, so that lines of concurrent runs do not interleave."""
    print(msg + "\n", end="", flush=True)


def run_command(cmd: List[str], out_file: Path, env: Dict[str, str]) -> None:
    """Run `cmd` in the repository root, writing its command line and then its output to `out_file`;
    on failure, RuntimeError with the end of that log (the run is then reported as failed)."""
    with open(out_file, "w") as out:
        out.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        tail = Path(out_file).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"command failed ({proc.returncode}); log {out_file}:\n{tail}")
