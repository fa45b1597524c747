#!/usr/bin/env bash
# Builds the test environment from nothing: the real ComfyUI host from ../shared/host,
# a venv with the host's torch stack (torch itself shared between venvs: .ci/torch_base.sh), the host's requirements, the pack's requirements
# and the test tools. Idempotent: a step whose result is present is skipped.
#   LLMGA_HOST_VERSION  which ComfyUI of ../shared/host (default 0.33.0; also 0.3.64). One venv per host:
#                       their pins differ (0.33 pins its frontend, comfy-aimdo, comfy-kitchen, needs torchaudio).
#   LLMGA_VENV          venv folder        (default: <repo>/.venv-comfyui-<version>)
#   LLMGA_COMFYUI_DIR   unpacked ComfyUI   (default: ~/.cache/llmga-comfyui/ComfyUI-<version>, outside
#                       the project; never committed)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/.ci/shared_dir.sh"
. "$root/.ci/torch_base.sh"
torch_version=2.14.1
version=${LLMGA_HOST_VERSION:-0.33.0}
tarball="$shared/host/ComfyUI-$version.tar.gz"
if [ ! -f "$tarball" ]; then
  echo "[setup] no $tarball; LLMGA_HOST_VERSION must name a ComfyUI of $shared/host (0.33.0 or 0.3.64)" >&2
  exit 1
fi
venv=${LLMGA_VENV:-$root/.venv-comfyui-$version}
host=${LLMGA_COMFYUI_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llmga-comfyui/ComfyUI-$version}
py=${PYTHON:-python3}

if [ ! -f "$host/.llmga-unpacked" ]; then  # the stamp, not main.py: an interrupted unpack is redone
  echo "[setup] unpacking ComfyUI into $host"
  rm -rf "$host" && mkdir -p "$host"
  tar -C "$host" --strip-components=1 -xzf "$tarball"
  touch "$host/.llmga-unpacked"
fi

pip_quiet() {  # this machine's pip config names local wheel folders; their absence is not news
  "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location '" >&2)
}
stamp="$venv/.llmga-setup-$( (echo "shared torch $torch_version"; cat "$root/requirements.txt" \
  "$root/.ci/requirements-test.txt" "$host/requirements.txt") | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  # built from scratch whenever what it is built from changes, so nothing of an older layout stays
  if [ -e "$venv" ] && [ ! -L "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ]; then
    echo "[setup] $venv exists and is not a venv; give a new folder in LLMGA_VENV" >&2
    exit 2
  fi
  echo "[setup] creating venv $venv"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  echo "[setup] torch stack: the shared torch $torch_version, torchvision and torchaudio in the venv"
  torch_base "$venv" "$torch_version"
  pip_quiet install "torch==$torch_version" torchvision==0.29.1
  if grep -qE '^\s*torchaudio\s*$' "$host/requirements.txt"; then
    # 0.33's comfy/sd.py imports torchaudio; 2.11.1 (torch>=2.11) is the release that imports beside torch 2.14.1
    pip_quiet install "torch==$torch_version" torchaudio==2.11.1
  fi
  echo "[setup] installing host requirements"
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$host/requirements.txt" > "$venv/host-requirements.txt"
  pip_quiet install -r "$venv/host-requirements.txt" requests
  echo "[setup] installing pack and test requirements"
  pip_quiet install -r "$root/requirements.txt" -r "$root/.ci/requirements-test.txt"
  touch "$stamp"
fi
# The original's tokenizer stack (transformers 4.41.2, tokenizers 0.19.1; no torch) in a side venv: the
# tokenizer tests compare against it in a subprocess (tests/oracles/tokenizers_441.py).
oracle=${LLMGA_TOKENIZER_ORACLE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llmga-comfyui/venv-tok441}  # outside the project
if [ ! -f "$oracle/.llmga-ready" ]; then
  echo "[setup] creating the transformers 4.41 tokenizer oracle venv $oracle"
  rm -rf "$oracle" && "$py" -m venv "$oracle"
  "$oracle/bin/python" -m pip --disable-pip-version-check -q install transformers==4.41.2 tokenizers==0.19.1 \
    sentencepiece==0.2.0 protobuf 2> >(grep -v "^WARNING: Location '" >&2)
  touch "$oracle/.llmga-ready"
fi
# bitsandbytes 0.45.5, the last release without CPU kernels, in a side folder outside the project: the
# quantization tests load it instead of the venv's to see 8-bit/4-bit refused where bitsandbytes cannot run them.
old_bnb=${LLMGA_OLD_BITSANDBYTES:-${XDG_CACHE_HOME:-$HOME/.cache}/llmga-comfyui/bitsandbytes-0.45.5}
if [ ! -f "$old_bnb/.llmga-ready" ]; then
  echo "[setup] installing bitsandbytes 0.45.5 (no CPU kernels) into $old_bnb"
  rm -rf "$old_bnb"
  pip_quiet install --no-deps --target "$old_bnb" bitsandbytes==0.45.5
  touch "$old_bnb/.llmga-ready"
fi
# The frontend test drives the real ComfyUI frontend in Debian's headless Chromium via playwright-core.
if [ ! -x /usr/bin/chromium ]; then
  echo "[setup] installing Debian's chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if [ ! -d "$root/tests/frontend/node_modules/playwright-core" ]; then
  echo "[setup] installing playwright-core"
  (cd "$root/tests/frontend" && npm install --no-audit --no-fund --silent)
fi
# The newest ComfyUI frontend (pinned to the version tested) beside the host's own, outside the project: the
# frontend tests serve it from the same ComfyUI with --front-end-root (tests/test_frontend.py NEWEST_FRONTEND).
newest_frontend=1.58.1
frontend_dir=${LLMGA_FRONTEND_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llmga-comfyui/frontend-$newest_frontend}
if [ ! -f "$frontend_dir/.llmga-ready" ]; then
  echo "[setup] installing comfyui-frontend-package $newest_frontend into $frontend_dir"
  rm -rf "$frontend_dir"
  pip_quiet install --no-deps --target "$frontend_dir" "comfyui-frontend-package==$newest_frontend"
  touch "$frontend_dir/.llmga-ready"
fi
echo "[setup] ready: ComfyUI $version venv=$venv host=$host"
