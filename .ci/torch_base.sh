#!/usr/bin/env bash
# Sourced by the setup scripts: `torch_base VENV VERSION` makes VENV see one shared torch install instead of its own.
# torch with its CUDA libraries is about 5.5 GB a copy (PyPI's Linux wheels are CUDA builds), and CI builds up to
# three venvs on torch 2.14.1; each venv gets a .pth that puts the shared folder on sys.path after its own
# site-packages, so pip counts torch as installed and everything the venv installs itself still wins.
#   LLMGA_TORCH_BASE_DIR   where the shared installs live (default ~/.cache/llmga-comfyui; one folder per version)
torch_base() {
  local venv=$1 version=$2 py=${PYTHON:-python3}
  local base=${LLMGA_TORCH_BASE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llmga-comfyui}/torch-$version
  if [ ! -f "$base/.llmga-ready" ]; then
    echo "[setup] installing torch $version once, into $base (shared by the venvs on it)"
    rm -rf "$base"
    "$py" -m pip --disable-pip-version-check -q --root-user-action=ignore install --target "$base" "torch==$version" \
      2> >(grep -v "^WARNING: Location '" >&2)
    touch "$base/.llmga-ready"
  fi
  local site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$base" > "$site/llmga-torch-base.pth"
}
