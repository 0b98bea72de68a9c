"""Shared fixtures: the shipped real corpora (../shared/data), binarized once per test session,
and a helper that runs the real fairseq command-line tools with `--user-dir fairseq_evomoe`."""

import gzip
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest
from filelock import FileLock

if os.environ.get("PYTEST_XDIST_WORKER"):  # several test processes share the cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_evomoe")


def shared_data_dir() -> Path:
    d = Path(os.environ.get("EVOMOE_DATA", REPO.parent / "shared" / "data"))
    if not (d / "multi30k").is_dir():
        raise RuntimeError(f"the shipped corpora were not found in {d}; set EVOMOE_DATA to the shared/data folder")
    return d


def cli(tool: str) -> str:
    """Path of a fairseq console script installed next to this Python."""
    path = Path(sys.executable).parent / tool
    return str(path) if path.exists() else tool


_FORK_SERVER = []  # the session's ForkServer, started by the first run that uses it


def fork_server():
    """The session's fork server for fairseq tools and Python scripts (tests/cli_server.py), or
    None with EVOMOE_TEST_FORK_SERVER=0."""
    if os.environ.get("EVOMOE_TEST_FORK_SERVER", "1") == "0":
        return None
    if not _FORK_SERVER:
        from cli_server import ForkServer

        _FORK_SERVER.append(ForkServer())
    return _FORK_SERVER[0]


@pytest.fixture(scope="session", autouse=True)
def _close_fork_server():
    yield
    while _FORK_SERVER:
        _FORK_SERVER.pop().close()


def python_for_scripts() -> str:
    """The interpreter a test runs `python scripts/x.py` with: the fork server's `python` shim
    (scripts run as in a fresh process, without paying torch's and fairseq's imports)."""
    server = fork_server()
    return server.python if server is not None else sys.executable


def script_env(**extra) -> dict:
    """os.environ for a test's shell scripts: PYTHON and PATH lead to the fork server's shims."""
    env = dict(os.environ, **extra)
    server = fork_server()
    if server is not None:
        env["PYTHON"] = server.python
        env["PATH"] = f"{server.bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def tool_path(tool: str) -> str:
    """The executable of a fairseq console script: the fork server's shim, else the installed script."""
    from cli_server import TOOLS

    server = fork_server()
    return server.tool(tool) if server is not None and tool in TOOLS else cli(tool)


def run_cli(tool: str, *args, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs a fairseq command-line tool as a user would (through the fork server's shim)."""
    args = [str(a) for a in args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([tool_path(tool), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join([tool, *args])} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _head(src: Path, dst: Path, n: int, start: int = 0):
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rt", encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in itertools.islice(f, start, start + n):
            out.write(line)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, filled by build(folder) once per test run: under pytest-xdist the first
    worker that asks builds it (under a file lock) in the run's shared temporary folder and the
    others reuse it, where a session fixture would be built again in every worker."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above the workers' own
    out = root / name
    with FileLock(str(out) + ".lock"):
        if not (out / ".complete").exists():
            shutil.rmtree(out, ignore_errors=True)  # a build that failed part-way
            out.mkdir(parents=True)
            build(out)
            (out / ".complete").touch()
    return out


@pytest.fixture(scope="session")
def mt_data(tmp_path_factory) -> Path:
    """Multi30k De->En: 3,000 training pairs, 200 valid, 100 test, joined dictionary."""
    def build(folder):
        raw = folder / "raw"
        raw.mkdir()
        src = shared_data_dir() / "multi30k"
        for lang in ("de", "en"):
            _head(src / f"train.{lang}", raw / f"train.{lang}", 3000)
            _head(src / f"val.{lang}", raw / f"valid.{lang}", 200)
            _head(src / f"test_2016_flickr.{lang}", raw / f"test.{lang}", 100)
        run_cli(
            "fairseq-preprocess", "--source-lang", "de", "--target-lang", "en",
            "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
            "--destdir", folder / "bin", "--joined-dictionary", "--workers", "1", "--thresholdsrc", "2", "--thresholdtgt", "2",
        )
    return built_once(tmp_path_factory, "multi30k", build) / "bin"


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory) -> Path:
    """WikiText-2 (tokenized): 2,000 training lines, 200 valid, 200 test."""
    def build(folder):
        raw = folder / "raw"
        raw.mkdir()
        src = shared_data_dir() / "wikitext-2"
        _head(src / "train.txt.gz", raw / "train.txt", 2000)
        _head(src / "valid.txt", raw / "valid.txt", 200)
        _head(src / "test.txt", raw / "test.txt", 200)
        run_cli(
            "fairseq-preprocess", "--only-source", "--trainpref", raw / "train.txt", "--validpref", raw / "valid.txt",
            "--testpref", raw / "test.txt", "--destdir", folder / "bin", "--workers", "1", "--thresholdsrc", "2",
        )
    return built_once(tmp_path_factory, "wikitext2", build) / "bin"


# a tiny run, with --user-dir given as the relative path a user types (run_cli runs in the repository)
TINY_RUN = ["--user-dir", "fairseq_evomoe", "--cpu", "--seed", "1", "--optimizer", "adam", "--lr", "2e-3",
            "--num-workers", "0", "--max-update", "2", "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "1"]
# roberta_evomoe_tiny through every phase in 14 updates (spawn at 4, soft to 10, top-1 after)
ROBERTA_EVOMOE = ["--task", "evomoe_masked_lm", "--arch", "roberta_evomoe_tiny", "--criterion", "moe_masked_lm",
                  "--tokens-per-sample", "64", "--max-tokens", "1024", "--moe-capacity-factor", "0",
                  "--evomoe-diversify-updates", "4", "--dts-anneal-updates", "6"]


def tiny_lm_args(lm_data: Path, save) -> list:
    """fairseq-train's arguments for tiny_lm_checkpoint (transformer_lm_moe_tiny, one sentence per sample)."""
    return [lm_data, *TINY_RUN, "--task", "language_modeling", "--arch", "transformer_lm_moe_tiny", "--save-dir", save,
            "--criterion", "moe_cross_entropy", "--sample-break-mode", "eos", "--tokens-per-sample", "128",
            "--max-tokens", "1024", "--disable-validation"]


def trained_once(tmp_path_factory, name: str, train_args) -> Tuple[Path, subprocess.CompletedProcess]:
    """(save dir, fairseq-train's output) of `fairseq-train *train_args(save_dir)`, run once per test
    run (built_once); the tests that share it read it and copy it before changing anything."""
    def build(folder):
        proc = run_cli("fairseq-train", *train_args(folder / "ckpt"))
        (folder / "train.out").write_text(proc.stdout + "\n" + proc.stderr)
    folder = built_once(tmp_path_factory, name, build)
    return folder / "ckpt", subprocess.CompletedProcess([], 0, stdout=(folder / "train.out").read_text(), stderr="")


@pytest.fixture(scope="session")
def tiny_mt_checkpoint(mt_data, tmp_path_factory):
    """(save dir, training output) of transformer_moe_tiny (top-1, 4 experts) after 2 updates on
    Multi30k, for the tests that need a trained translation checkpoint and its log. It validates with
    --eval-bleu (fairseq then keeps numpy BLEU counts in the checkpoint) and buckets batches by length
    (--num-batch-buckets 2, a numpy code path)."""
    return trained_once(tmp_path_factory, "tiny_mt", lambda save: [
        mt_data, *TINY_RUN, "--task", "translation", "--arch", "transformer_moe_tiny", "--save-dir", save,
        "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--max-tokens", "1500",
        "--num-batch-buckets", "2", "--validate-interval-updates", "2", "--eval-bleu",
        "--eval-bleu-args", '{"beam": 1, "max_len_b": 5}'])


@pytest.fixture(scope="session")
def tiny_lm_checkpoint(lm_data, tmp_path_factory):
    """(save dir, training output) of transformer_lm_moe_tiny (top-1, 4 experts) after 2 updates on
    WikiText-2, one sentence per sample (tiny_lm_args)."""
    return trained_once(tmp_path_factory, "tiny_lm", lambda save: tiny_lm_args(lm_data, save))


@pytest.fixture(scope="session")
def roberta_evomoe_pretrained(lm_data, tmp_path_factory):
    """(save dir, training output) of roberta_evomoe_tiny pre-trained through every phase (spawn at
    4, soft to 10, top-1 to 14), for the GLUE and fine-tuning tests."""
    return trained_once(tmp_path_factory, "roberta_evomoe", lambda save: [
        lm_data, "--user-dir", USER_DIR, *ROBERTA_EVOMOE, "--optimizer", "adam", "--lr", "2e-3", "--max-update", "14",
        "--save-dir", save, "--cpu", "--seed", "1", "--num-workers", "0", "--disable-validation",
        "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "1"])


def json_logs(proc: subprocess.CompletedProcess, tag: str = "train_inner"):
    """The metric dicts fairseq printed with `--log-format json` for one log tag
    (`train_inner`, `train`, `valid`), values as floats where they parse."""
    import json

    rows = []
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        # fairseq-train prints "| train_inner | {...}"; the torchrun entry point "INFO:train_inner:{...}"
        if (f"| {tag} |" not in line and f":{tag}:" not in line) or "{" not in line:
            continue
        row = json.loads(line[line.index("{"):])
        rows.append({k: _num(v) for k, v in row.items()})
    return rows


def eval_lm_perplexity(proc: subprocess.CompletedProcess, data_dir: Path) -> float:
    """The perplexity fairseq-eval-lm printed, checked to be finite and below the vocabulary size
    (the perplexity of a uniform guess) of the dictionary in `data_dir`."""
    found = re.findall(r"Perplexity: (\S+)", proc.stdout + proc.stderr)
    assert found, f"fairseq-eval-lm printed no perplexity:\n{(proc.stdout + proc.stderr)[-2000:]}"
    ppl = float(found[-1])
    vocab = 4 + sum(1 for _ in open(data_dir / "dict.txt", encoding="utf-8"))  # with fairseq's 4 special symbols
    assert math.isfinite(ppl) and 1 < ppl < vocab, (ppl, vocab)
    return ppl


def translate_test_set(mt_data: Path, checkpoint, *extra, sentences: int = 100) -> None:
    """fairseq-generate (beam 2, at most 20 target tokens) of the test split of `mt_data` (100
    sentences) with `checkpoint`, checked to print one hypothesis (H- line) for each of the
    `sentences` source lines, mostly non-empty, and BLEU.
    --required-batch-size-multiple 1: with fairseq's default 8, batch_by_size drops the last batch
    when its size is not a multiple of 8 (here the 4 longest sentences), as in fairseq issue 5036."""
    gen = run_cli("fairseq-generate", mt_data, "--user-dir", USER_DIR, "--path", checkpoint, "--cpu",
                  "--gen-subset", "test", "--beam", "2", "--max-tokens", "2000", "--max-len-b", "20",
                  "--required-batch-size-multiple", "1", *extra)
    lines = gen.stdout.splitlines()
    sources = [line for line in lines if line.startswith("S-")]
    hyps = {int(line.split("\t")[0][2:]): (line.split("\t") + [""])[2] for line in lines if line.startswith("H-")}
    assert len(sources) == len(hyps) == sentences, (len(sources), len(hyps), gen.stdout[-2000:])
    assert sum(1 for h in hyps.values() if h.strip()) >= 0.9 * sentences, gen.stdout[-2000:]
    assert "BLEU4" in gen.stdout + gen.stderr


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


@pytest.fixture
def fairseq_config_conversion(monkeypatch):
    """Lets fairseq's convert_namespace_to_omegaconf run in this process: it uses hydra.experimental,
    which refuses to run once a test composed a config with version_base=None (test_configs.py; a
    process-wide setting), so hydra's compatibility version is set for the test's duration."""
    from hydra.version import VersionBase, __compat_version__

    monkeypatch.setattr(VersionBase.instance(), "version_base", __compat_version__)
