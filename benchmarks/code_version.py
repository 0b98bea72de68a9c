"""The commit a benchmark or experiment ran, as recorded next to its results."""

import subprocess
from pathlib import Path


def commit(repo: Path) -> str:
    """The short commit hash of the checkout at `repo`, with " with uncommitted changes" when tracked
    files differ from it; "unknown ..." without git."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)
    except OSError:
        return "unknown (no git)"
    return (head.stdout.strip() or "unknown") + (" with uncommitted changes" if dirty.stdout.strip() else "")
