# Shared helpers for the data and evaluation scripts (sourced, not run).
# shellcheck shell=bash

SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPTS_DIR/.." && pwd)"
USER_DIR="$REPO_DIR/fairseq_evomoe"
PY="${PYTHON:-python3}"

die() { echo "error: $*" >&2; exit 2; }
step() { echo "==> [$(date +%H:%M:%S)] $*" >&2; }

# need_value OPTION VALUE: fail clearly when an option was given without a value
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "option $1 needs a value (see --help)"; }

# need_data_and_checkpoint DATA CKPT: the evaluation scripts' two required options, given and present
need_data_and_checkpoint() {
  [[ -n "$1" ]] || { usage >&2; die "--data-bin is required"; }
  [[ -n "$2" ]] || { usage >&2; die "--checkpoint is required"; }
  [[ -d "$1" ]] || die "--data-bin $1 is not a folder"
  [[ -f "$2" ]] || die "--checkpoint $2 does not exist"
}

# unused_name PREFIX: PREFIX<time>, or PREFIX<time>-N, whichever does not exist yet
unused_name() {
  local stamp dest n=1
  stamp="$(date +%Y%m%d-%H%M%S)"
  dest="$1$stamp"
  while [[ -e "$dest" ]]; do n=$((n + 1)); dest="$1$stamp-$n"; done
  echo "$dest"
}

# move_aside PATH: rename PATH to a sibling PATH.previous-<time> that does not exist yet (never delete
# what an earlier run saved); prints the new name
move_aside() {
  local dest
  dest="$(unused_name "$1.previous-")"
  mv "$1" "$dest"
  echo "$dest"
}

# keep_earlier_preparation OUT NAME...: the named outputs of an earlier preparation in OUT (those
# that exist) are moved together to OUT/previous-<time>/ before they would be rewritten, and the
# script says so: a model trained on them needs that dictionary and sentencepiece model
keep_earlier_preparation() {
  local out="$1" dest="" n; shift
  for n in "$@"; do
    [[ -e "$out/$n" ]] || continue
    if [[ -z "$dest" ]]; then
      dest="$(unused_name "$out/previous-")"
      mkdir -p "$dest"
    fi
    mv "$out/$n" "$dest/"
  done
  [[ -z "$dest" ]] || echo "  an earlier preparation in $out ($(ls "$dest" | paste -sd' ' -)) was moved to $dest" >&2
}

# glue_task_info TASK: sets NUM_CLASSES, METRIC and PAIR of a GLUE task; exits with glue_data.py's
# message for an unknown task (`eval "$(...)"` of a failed command would go on)
glue_task_info() {
  local info
  info="$("$PY" "$SCRIPTS_DIR/glue_data.py" info --task "$1")" || exit 2
  eval "$info"
}

need_int() { [[ "$2" =~ ^[0-9]+$ ]] || die "option $1 must be a non-negative integer, got '$2'"; }

# default_data_dir: $EVOMOE_DATA, else ../shared/data next to the repository, else empty
default_data_dir() {
  if [[ -n "${EVOMOE_DATA:-}" ]]; then echo "$EVOMOE_DATA"
  elif [[ -d "$REPO_DIR/../shared/data" ]]; then (cd "$REPO_DIR/../shared/data" && pwd)
  else echo ""; fi
}

# fetch URL DEST: download with a progress bar (curl or wget); fails with the URL in the message
fetch() {
  local url="$1" dest="$2"
  if [[ -s "$dest" ]]; then step "already downloaded: $dest"; return 0; fi
  step "downloading $url"
  if command -v curl >/dev/null; then
    curl -fL --retry 3 --progress-bar -o "$dest.part" "$url" || die "download failed: $url (no internet? use the local mode instead)"
  elif command -v wget >/dev/null; then
    wget -q --show-progress -O "$dest.part" "$url" || die "download failed: $url (no internet? use the local mode instead)"
  else
    die "neither curl nor wget is installed; cannot download $url"
  fi
  mv "$dest.part" "$dest"
}

fairseq_tool() {  # the console script next to this Python when there is one
  local d; d="$(dirname "$(command -v "$PY")")"
  if [[ -x "$d/$1" ]]; then echo "$d/$1"; else echo "$1"; fi
}
