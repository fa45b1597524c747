"""The command line (python -m llmga_core.downloads) and console progress."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional

from ..console import live_bar_class
from ..releases import KIND_FOLDERS, RELEASES, VISION_TOWER
from .fetch import run_downloads
from .plan import DownloadError, DownloadPlan, _size, find_release, needs_vision_tower, plan_download

log = logging.getLogger("llmga")


class ConsoleProgress:
    """Download progress for a person: a tqdm bar in bytes in a terminal; elsewhere (a log, a pipe) a line per
    quarter of the bytes."""

    def __init__(self, label: str, stream=None, live: Optional[bool] = None):
        self.label = label
        self.stream = stream or sys.stdout
        self.bar = None
        self.shown = -1
        self.tqdm = live_bar_class(self.stream, live)

    def __call__(self, done: int, total: int, file: str) -> None:
        if self.tqdm is not None:
            if self.bar is None:
                self.bar = self.tqdm(total=total, initial=done, unit="B", unit_scale=True, file=self.stream,
                                     desc=f"[llmga]   {self.label}", dynamic_ncols=True)
            self.bar.n = done
            self.bar.refresh()
            return
        quarter = 4 * done // max(total, 1)
        if quarter > self.shown:
            self.shown = quarter
            print(f"[llmga]   {self.label}: {100 * done // max(total, 1)}% ({_size(done)} of {_size(total)})",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def plans_for(name: str, models_dir: Path, *, repo_id=None, revision="main", endpoint=None, token=None,
              vision_tower: bool = True) -> list[DownloadPlan]:
    """The plans for one release in a models/ folder; an MLLM brings its vision tower unless it is there."""
    release = find_release(name)
    root = Path(models_dir) / release.subfolder
    plans = [plan_download(release, root, repo_id=repo_id, revision=revision, endpoint=endpoint, token=token)]
    tower_root = Path(models_dir) / KIND_FOLDERS["vision_tower"]
    if release.kind == "mllm" and vision_tower and needs_vision_tower(plans[0].target, [tower_root]):
        plans.append(plan_download(RELEASES[VISION_TOWER], tower_root, endpoint=endpoint, token=token))
    return plans


def fetch_with_console(plans: list[DownloadPlan], stream=None) -> None:
    """run_downloads with a ConsoleProgress and a line per release saying where it went."""
    stream = stream or sys.stdout
    for plan in plans:
        state = "complete already" if plan.complete else f"{_size(plan.total_bytes)} from {plan.repo_url}"
        print(f"[llmga] {plan.release.name} -> {plan.target} ({state})", file=stream, flush=True)
    if all(plan.complete for plan in plans):
        return
    bar = ConsoleProgress("downloading " + ", ".join(p.release.name for p in plans if not p.complete), stream)
    try:
        run_downloads(plans, bar)
    finally:
        bar.close()


def _current_folder() -> Path:
    """The folder the command runs in, as the shell names it: $PWD when it is the current folder (it keeps a
    symlinked pack folder's place inside ComfyUI/custom_nodes, which os.getcwd() resolves away)."""
    cwd = os.getcwd()
    pwd = os.environ.get("PWD")
    try:
        if pwd and os.path.isabs(pwd) and os.path.samefile(pwd, cwd):
            return Path(pwd)
    except OSError:
        pass
    return Path(cwd)


def _pack_comfyui() -> Optional[Path]:
    """The ComfyUI this pack is installed in (<ComfyUI>/custom_nodes/<pack>, a symlinked pack too), or None."""
    from ..run_workflow import default_comfyui_dir  # the run command's rule; standard library only

    return default_comfyui_dir()


def resolve_models_dir(models_dir=None, *, cwd=None, comfyui=None) -> tuple[Path, str]:
    """The absolute models folder a download goes to, and a few words on why.

    - no --models-dir: the models folder of `comfyui`, the ComfyUI this pack is installed in;
    - an absolute path (or one starting with ~): as given;
    - a relative path, run from inside that ComfyUI (the pack folder, say): read from the ComfyUI folder, so
      `models` and `ComfyUI/models` (the ComfyUI folder's own name, or "ComfyUI", first) both mean
      <ComfyUI>/models, wherever inside ComfyUI the command runs. A path that starts with . or .. is read from
      the current folder, as the shell reads it;
    - any other relative path: from the current folder.
    `cwd` is the current folder as the shell names it, `comfyui` the ComfyUI folder (None: not inside one).
    """
    cwd = Path(cwd) if cwd is not None else _current_folder()
    if models_dir is None:
        if comfyui is None:
            raise DownloadError("Give the models folder to download into with --models-dir (ComfyUI/models): this "
                                "pack is not inside a ComfyUI's custom_nodes folder, so there is no default.")
        return Path(os.path.normpath(Path(comfyui).absolute() / "models")), \
            f"the models folder of the ComfyUI this pack is installed in, {comfyui}"
    path = Path(models_dir).expanduser()
    if path.is_absolute():
        return Path(os.path.normpath(path)), "--models-dir"
    parts = path.parts
    here = re.match(r"\.\.?([/\\]|$)", str(models_dir))  # ./x and ../x (pathlib drops a leading ./)
    if comfyui is not None and parts and not here and parts[0] != "..":
        root = Path(comfyui).absolute()
        inside = cwd == root or root in cwd.parents
        if inside:
            if len(parts) > 1 and parts[0] in (root.name, "ComfyUI"):
                path = Path(*parts[1:])
            return Path(os.path.normpath(root / path)), \
                f"--models-dir {models_dir}, read from the ComfyUI folder {root}"
    return Path(os.path.normpath(cwd / path)), f"--models-dir {models_dir}, read from {cwd}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmga_core.downloads",
                                     description="Download released LLMGA models into ComfyUI's models folders.")
    parser.add_argument("names", nargs="*", help="release names (see --list), e.g. llmga-Qwen2-0.5B-full-finetune")
    parser.add_argument("--models-dir",
                        help="ComfyUI's models folder (default: the models folder of the ComfyUI this pack is "
                             "installed in; a relative path given inside that ComfyUI is read from its folder, so "
                             "'models' and 'ComfyUI/models' both mean <ComfyUI>/models)")
    parser.add_argument("--repo-id", help="fetch from this Hub repository instead (a mirror); one name only")
    parser.add_argument("--revision", default="main", help="branch, tag or commit (default main)")
    parser.add_argument("--endpoint", help="Hub address (default: HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--no-vision-tower", action="store_true",
                        help="with an MLLM, do not fetch its CLIP vision tower too")
    parser.add_argument("--list", action="store_true", help="list the releases (no network)")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for release in RELEASES.values():
            source = release.repo_id or f"not on the Hub: {release.note}"
            print(f"{release.name:45s} {source}  -> models/{release.subfolder}/")
        return 0 if args.list else 2
    try:
        if args.repo_id and len(args.names) > 1:
            raise DownloadError("--repo-id names one repository; download one release at a time with it.")
        for name in args.names:
            find_release(name)  # a typo is refused before anything else
        models_dir, why = resolve_models_dir(args.models_dir, comfyui=_pack_comfyui())
        print(f"[llmga] downloading into {models_dir} ({why})", flush=True)
        literal = Path(os.path.abspath(args.models_dir)) if args.models_dir is not None else None
        if literal is not None and literal != models_dir and literal.is_dir():
            print(f"[llmga] note: {literal} is not read by ComfyUI (a download from an older version of this "
                  f"command may have gone there); move what it holds into {models_dir}, or delete it.", flush=True)
        plans = []
        for name in args.names:
            plans += plans_for(name, models_dir, repo_id=args.repo_id, revision=args.revision,
                               endpoint=args.endpoint, vision_tower=not args.no_vision_tower)
        fetch_with_console(plans)
    except DownloadError as error:
        print(f"[llmga] error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[llmga] interrupted; run the same command again to resume (what was fetched is kept).",
              file=sys.stderr)
        return 130
    return 0


