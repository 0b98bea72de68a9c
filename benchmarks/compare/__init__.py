"""The parts of benchmarks/compare_gates.py, one job per module:

  flags       gate configs and comparison options -> the fairseq-train command of a run
  commands    running an external tool with its output in a log file; progress lines
  settings    settings recorded as JSON: reading them back, describing how two differ
  data_cache  prepared corpora: one folder per data setting, reused only with the same settings
  evaluation  perplexity (lm) or BLEU (mt) of a trained run
  run_store   one run's folder: reused when its recorded settings match, else moved aside and retrained
  pool        the runs, several at a time, with progress and the list of failures
  report      the Markdown report: tables, plots and the plain-language verdict
  cli         the command-line options

Imported with benchmarks/ and scripts/ on sys.path (as they are when compare_gates.py runs); scripts/
provides plot_routing and the data-preparation and evaluation scripts.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
