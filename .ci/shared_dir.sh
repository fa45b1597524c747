# Sourced by the setup scripts: sets `shared` to the folder beside the project that holds host/ (the ComfyUI
# tarballs). LLMGA_SHARED_DIR wins; else ../shared beside this checkout; else, for a clone made elsewhere
# (git clone . /tmp/cleancheck), ../shared beside the repository it was cloned from.
shared=${LLMGA_SHARED_DIR:-$root/../shared}
if [ -z "${LLMGA_SHARED_DIR:-}" ] && [ ! -d "$shared/host" ]; then
  origin=$(git -C "$root" remote get-url origin 2>/dev/null || true)
  if [ -n "$origin" ] && [ -d "$origin/../shared/host" ]; then
    shared=$(cd "$origin/../shared" && pwd)
  fi
fi
