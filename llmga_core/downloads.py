"""Fetching LLMGA's released models from the Hugging Face Hub into the folders the loaders read (opt-in).

    python -m llmga_core.downloads llmga-Qwen2-0.5B-full-finetune                  # in the pack folder
    python -m llmga_core.downloads llmga-Qwen2-0.5B-full-finetune --models-dir /data/ComfyUI/models

Without --models-dir the files go to the models folder of the ComfyUI this pack is installed in
(<ComfyUI>/custom_nodes/<pack>); see `resolve_models_dir` for how a relative --models-dir is read.

Nothing here runs unless asked: listing models never touches the network. What it does:
- a catalogue of the releases (LLMGA's README model links): the name the loaders list,
  the Hub repository, and the models/ subfolder it goes in;
- only the files the loaders read are fetched: configs, tokenizer files and one set of weights (safetensors
  before .bin duplicates, the fp16 variant of an SD component before its full-precision copy, as the
  loaders prefer them); training leftovers (trainer_state.json, training_args.bin), other frameworks'
  weights and the SD safety checker (which ComfyUI never runs) are left on the Hub;
- progress in bytes through a callback (its exceptions, e.g. ComfyUI's interrupt, stop the download);
- resumable: a file's bytes go to <target>/.cache/llmga/partial/<path>.<etag>.incomplete and move into place
  only when complete; after an interrupt or a dropped connection the next run continues with a Range request
  (huggingface_hub 2.x deletes its own partial file when a download fails, so the partial file is kept here, and
  the bytes come through huggingface_hub's http_get with its endpoint, token, proxy and HF_HUB_OFFLINE rules);
- idempotent: <target>/.cache/llmga/<release>.json records what was fetched, so a complete download returns
  without any request;
- errors users meet are one DownloadError sentence: no network (naming the files and the folder to put them in
  by hand), a repository that does not exist, too little disk space.

Host-free and standard library at import (huggingface_hub is imported when a download starts), so the run
command (llmga_core.run_workflow) uses it too.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Optional
from urllib.parse import quote

from . import releases
from .console import live_bar_class
from .releases import (KIND_FOLDERS, RELEASES, VISION_TOWER, Release, _read_record, _record_path,  # noqa: F401
                       release_for_model, resume_hint, target_folder)

log = logging.getLogger("llmga")

__all__ = [
    "Release", "RELEASES", "KIND_FOLDERS", "DownloadError", "DownloadPlan", "RemoteFile", "find_release",
    "release_for_model", "target_folder", "is_complete", "plan_download", "run_downloads", "download",
    "needs_vision_tower", "select_files", "plans_for", "fetch_with_console", "resume_hint", "ConsoleProgress",
    "resolve_models_dir", "main",
]

Progress = Callable[[int, int, str], None]  # (bytes present, bytes in all, file being fetched)


# what to put where by hand, when the Hub cannot be asked which files a repository holds
_FILES_BY_HAND = {
    "mllm": "config.json, generation_config.json, the tokenizer files and the model*.safetensors weights (with "
            "model.safetensors.index.json when sharded)",
    "vision_tower": "config.json, preprocessor_config.json and model.safetensors (or pytorch_model.bin)",
    "sd": "model_index.json and the folders unet/, vae/, text_encoder/ (and text_encoder_2/ for SDXL), tokenizer/ "
          "(and tokenizer_2/) and scheduler/",
    "diffrir": "the DiffRIR .pth weights",
}
_TOKENIZER_FILES = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt"}
_WEIGHT_STEM = re.compile(r"(diffusion_pytorch_model|pytorch_model|model)([-.]|$)")
_WEIGHT_PREFERENCE = [("safetensors", True), ("safetensors", False), ("bin", True), ("bin", False)]


class DownloadError(RuntimeError):
    """A download that cannot go on; one sentence that says what to do."""


@dataclass(frozen=True)
class RemoteFile:
    path: str  # inside the repository and inside the target folder
    size: int
    etag: str  # the LFS sha256 or the git blob id: names the partial file, so a changed file never mixes bytes
    sha256: Optional[str] = None


@dataclass
class DownloadPlan:
    release: Release
    repo_id: str
    revision: str
    endpoint: str
    target: Path
    files: list[RemoteFile] = field(default_factory=list)
    commit: Optional[str] = None
    token: object = None
    complete: bool = False  # the local record says everything is there: nothing to ask the Hub

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def repo_url(self) -> str:
        return f"{self.endpoint}/{self.repo_id}"

    def partial_path(self, file: RemoteFile) -> Path:
        return self.target / ".cache" / "llmga" / "partial" / f"{file.path}.{file.etag[:16]}.incomplete"

    def present_bytes(self, file: RemoteFile) -> int:
        """Bytes of `file` already on disk: all of it, what a partial download holds, or what a shorter copy holds
        that will be resumed."""
        final = self.target / file.path
        if final.is_file():
            size = final.stat().st_size
            if size == file.size:
                return size
            if size < file.size and file.sha256 and not self.partial_path(file).exists():
                return size
        partial = self.partial_path(file)
        return min(partial.stat().st_size, file.size) if partial.is_file() else 0

    def missing(self) -> list[str]:
        return [f.path for f in self.files if not self._has(f)]

    def _has(self, file: RemoteFile) -> bool:
        final = self.target / file.path
        return final.is_file() and final.stat().st_size == file.size

    def write_record(self) -> None:
        record = _record_path(self.target, self.release.name)
        record.parent.mkdir(parents=True, exist_ok=True)
        data = {"release": self.release.name, "kind": self.release.kind, "repo_id": self.repo_id,
                "revision": self.revision, "commit": self.commit, "complete": not self.missing(),
                "files": {f.path: f.size for f in self.files}}
        temporary = record.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(temporary, record)


# ------------------------------------------------------------------------------------------------ catalogue

def find_release(name: str) -> Release:
    """A release by its name (the folder the loaders list) or by its repository id."""
    release = releases.find_release(name)
    if release is None:
        raise DownloadError(f"{name!r} is not a release this pack knows; choose one of "
                            f"{', '.join(RELEASES)} (python -m llmga_core.downloads --list).")
    return release


def is_complete(release: Release, root, *, repo_id: Optional[str] = None, revision: str = "main") -> bool:
    """True when an earlier download of `release` from `repo_id` finished and every file still has its size.
    Reads only local files."""
    target = target_folder(release, root)
    record = _read_record(target, release.name)
    if not record or not record.get("complete"):
        return False
    if record.get("repo_id") != (repo_id or release.repo_id) or record.get("revision") != revision:
        return False
    for path, size in record["files"].items():
        file = target / path
        if not file.is_file() or file.stat().st_size != size:
            return False
    return True


def needs_vision_tower(mllm_target, clip_vision_roots: Iterable) -> bool:
    """False when the loader would find the MLLM's vision tower (releases.find_vision_tower: beside or inside the
    MLLM folder, or in a clip_vision root as a folder or as its single .safetensors file); a tower this module
    downloaded counts only once complete."""
    roots = [Path(root) for root in clip_vision_roots]
    for root in roots:
        if _read_record(root / VISION_TOWER, VISION_TOWER) is not None:
            return not is_complete(RELEASES[VISION_TOWER], root)
    try:
        releases.find_vision_tower(Path(mllm_target), {}, None, search=roots)
    except releases.VisionTowerNotFoundError:
        return True
    return False


# ------------------------------------------------------------------------------------------------ choosing files

def _weight_class(path: str) -> Optional[tuple[str, bool]]:
    base = path.rsplit("/", 1)[-1]
    if not _WEIGHT_STEM.match(base):
        return None
    if base.endswith(".safetensors") or re.search(r"\.safetensors\.index(\.fp16)?\.json$", base):
        return "safetensors", ".fp16." in base
    if base.endswith(".bin") or re.search(r"\.bin\.index(\.fp16)?\.json$", base):
        return "bin", ".fp16." in base
    return None


def _best_weights(paths: Iterable[str]) -> list[str]:
    """One set of weights: the first kind present of fp16 safetensors, safetensors, fp16 .bin, .bin (with shards
    and index), the order in which the loaders pick them."""
    by_class: dict[tuple[str, bool], list[str]] = {}
    for path in paths:
        kind = _weight_class(path)
        if kind is not None:
            by_class.setdefault(kind, []).append(path)
    for kind in _WEIGHT_PREFERENCE:
        if kind in by_class:
            return sorted(by_class[kind])
    return []


def select_files(release: Release, paths: Iterable[str]) -> list[str]:
    """The repository files the loaders of `release` read."""
    paths = sorted(paths)
    top = [p for p in paths if "/" not in p]
    if release.kind == "mllm":
        return sorted([p for p in top if p in {"config.json", "generation_config.json"} | _TOKENIZER_FILES]
                      + _best_weights(top))
    if release.kind == "vision_tower":
        return sorted([p for p in top if p in ("config.json", "preprocessor_config.json")] + _best_weights(top))
    if release.kind == "sd":
        chosen = [p for p in top if p == "model_index.json"]
        by_folder: dict[str, list[str]] = {}
        for path in paths:
            if path.count("/") == 1:
                folder = path.split("/")[0]
                by_folder.setdefault(folder, []).append(path)
        for folder, files in sorted(by_folder.items()):
            if folder in ("unet", "vae", "text_encoder", "text_encoder_2"):
                chosen += [p for p in files if p.endswith("/config.json")] + _best_weights(files)
            elif folder in ("tokenizer", "tokenizer_2"):
                chosen += files
            elif folder in ("scheduler", "feature_extractor"):
                chosen += [p for p in files if p.endswith(".json")]
        return sorted(chosen)
    if release.kind == "diffrir":
        weights = [p for p in paths if p.lower().endswith((".pth", ".pt", ".safetensors"))]
        stems = {p.rsplit(".", 1)[0] for p in weights if p.lower().endswith(".safetensors")}
        return [p for p in weights if p.lower().endswith(".safetensors") or p.rsplit(".", 1)[0] not in stems]
    return [p for p in paths if p == release.name]  # vae: the one file


def _essentials_missing(release: Release, chosen: list[str]) -> list[str]:
    names = set(chosen)
    if release.kind in ("mllm", "vision_tower"):
        need = ["config.json"] + (["preprocessor_config.json"] if release.kind == "vision_tower" else [])
        missing = [n for n in need if n not in names]
        return missing + ([] if _best_weights(names) else ["weights (.safetensors or .bin)"])
    if release.kind == "sd":
        missing = [n for n in ("model_index.json", "unet/config.json") if n not in names]
        unet_weights = _best_weights(n for n in names if n.startswith("unet/"))
        return missing + ([] if unet_weights else ["unet weights"])
    return [] if chosen else [_FILES_BY_HAND.get(release.kind, release.name)]


def _safe_repo_path(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return (bool(parts) and "\\" not in path and not path.startswith("/") and ".." not in parts
            and parts[0] != ".cache" and all(part not in ("", ".") for part in path.split("/")))


# ------------------------------------------------------------------------------------------------ errors

def _network_errors() -> tuple[type, ...]:
    """The exception types of 'the network is not there' in every HTTP stack huggingface_hub has used."""
    found: list[type] = [ConnectionError, TimeoutError, socket.gaierror]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout", "ChunkedEncodingError"))):
        try:
            imported = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        found += [getattr(imported, n) for n in names if isinstance(getattr(imported, n, None), type)]
    return tuple(found)


def _reason(error: BaseException) -> str:
    from huggingface_hub.utils import OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    text = " ".join(str(error).split()) or type(error).__name__
    # requests (huggingface_hub < 1) wraps the socket's reason in pool and retry text; the reason is what says why
    reasons = re.findall(r"\[Errno -?\d+\] [^'\")]+", text)
    if reasons:
        return reasons[-1].strip()
    return text if len(text) <= 160 else text[:157] + "..."


def _by_hand(plan: DownloadPlan) -> str:
    missing = plan.missing() if plan.files else []
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        return f"{shown} from {plan.repo_url}"
    what = _FILES_BY_HAND.get(plan.release.kind, plan.release.name)
    return f"{what} from {plan.repo_url}"


def _no_network(plan: DownloadPlan, error: BaseException) -> DownloadError:
    return DownloadError(f"Cannot reach the Hugging Face Hub at {plan.endpoint} ({_reason(error)}), so "
                         f"{plan.release.name} was not downloaded: put {_by_hand(plan)} into {plan.target} by hand, "
                         f"or run the download again when the network is back.")


def _is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))


def _disk_full(plan: DownloadPlan, needed: int) -> DownloadError:
    free = shutil.disk_usage(_existing_parent(plan.target)).free
    return DownloadError(f"Not enough disk space for {plan.release.name}: it needs {_size(needed)} more but the disk "
                         f"of {plan.target} has {_size(free)} free; free some space (what was fetched is kept) and run "
                         f"the download again.")


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# ------------------------------------------------------------------------------------------------ planning

def plan_download(release: Release, root, *, repo_id: Optional[str] = None, revision: str = "main",
                  endpoint: Optional[str] = None, token=None) -> DownloadPlan:
    """What downloading `release` into the kind's folder `root` involves: the files to fetch with their sizes
    (one request to the Hub), or nothing at all (no request) when an earlier download of it is complete."""
    repo = (repo_id or "").strip() or release.repo_id
    if repo is None:
        raise DownloadError(f"{release.name} is not on the Hugging Face Hub ({release.note}); download the weights "
                            f"by hand into {target_folder(release, root)}, or give the repo_id of a Hub mirror you "
                            f"trust.")
    try:
        from huggingface_hub import HfApi, constants
    except ImportError:
        raise DownloadError("Downloading needs huggingface_hub; install it with `pip install huggingface_hub` "
                            "into ComfyUI's Python.") from None
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    plan = DownloadPlan(release, repo, revision, endpoint, target_folder(release, root), token=token)
    # read at each download: huggingface_hub < 1 applies HF_HUB_OFFLINE only to HTTP sessions made after it is set
    offline = constants.HF_HUB_OFFLINE
    if is_complete(release, root, repo_id=repo, revision=revision):
        record = _read_record(plan.target, release.name)
        plan.files = [RemoteFile(p, s, "") for p, s in record["files"].items()]
        plan.commit, plan.complete = record.get("commit"), True
        return plan
    record = _read_record(plan.target, release.name)
    if record and record.get("repo_id") == repo:  # an earlier attempt: its file list names what is still missing
        plan.files = [RemoteFile(p, s, "") for p, s in record["files"].items()]
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                       RevisionNotFoundError)

    from huggingface_hub.utils import OfflineModeIsEnabled

    try:
        if offline:
            raise OfflineModeIsEnabled("HF_HUB_OFFLINE is set")
        info = HfApi(endpoint=endpoint, token=token).model_info(repo, revision=revision, files_metadata=True)
    except OfflineModeIsEnabled as error:
        raise _no_network(plan, error) from None
    except GatedRepoError:
        raise DownloadError(f"{plan.repo_url} is gated: accept its terms on the Hub and log in (`hf auth login`, "
                            f"or set HF_TOKEN), then run the download again.") from None
    except RevisionNotFoundError:
        raise DownloadError(f"{plan.repo_url} has no revision {revision!r}; leave the revision at main or give one "
                            f"that exists.") from None
    except RepositoryNotFoundError:
        raise DownloadError(f"{plan.repo_url} does not exist (or is private); check the repo_id, or log in with "
                            f"`hf auth login` if it is yours.") from None
    except HfHubHTTPError as error:
        raise DownloadError(f"The Hub at {endpoint} answered {_status(error)} when asked for {repo}; try again "
                            f"later.") from None
    except _network_errors() as error:
        raise _no_network(plan, error) from None
    files = []
    for sibling in info.siblings or []:
        if not _safe_repo_path(sibling.rfilename):
            raise DownloadError(f"{plan.repo_url} lists a file outside its folder ({sibling.rfilename!r}), so "
                                f"nothing was downloaded from it.")
        files.append(sibling)
    by_path = {s.rfilename: s for s in files}
    chosen = select_files(release, by_path)
    missing = _essentials_missing(release, chosen)
    if missing:
        raise DownloadError(f"{plan.repo_url} has no {', '.join(missing)}, so it is not {_kind_name(release)}; "
                            f"check the repo_id.")
    plan.commit = info.sha
    plan.files = []
    for path in chosen:
        sibling = by_path[path]
        lfs = sibling.lfs
        sha256 = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
        size = sibling.size if sibling.size is not None else (lfs.get("size") if isinstance(lfs, dict) else None)
        if size is None:
            raise DownloadError(f"{plan.repo_url} did not give the size of {path}; try again later.")
        plan.files.append(RemoteFile(path, int(size), sha256 or sibling.blob_id or plan.commit or "0", sha256))
    return plan


def _status(error) -> str:
    response = getattr(error, "response", None)
    return str(getattr(response, "status_code", "an error"))


def _kind_name(release: Release) -> str:
    return {"mllm": "an LLMGA MLLM repository", "vision_tower": "a CLIP vision tower repository",
            "sd": "a diffusers pipeline repository", "diffrir": "a DiffRIR weights repository",
            "vae": "a VAE repository"}[release.kind]


# ------------------------------------------------------------------------------------------------ fetching

class _QuietBar:
    """Stands in for huggingface_hub's own tqdm bar: progress is reported through the callback instead."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _CountingFile:
    """The partial file as http_get writes it; each write reports the bytes on disk (after writing, so an
    exception raised by the report keeps every byte received)."""

    def __init__(self, handle, report: Callable[[int], None]):
        self._handle = handle
        self._report = report

    def write(self, data) -> int:
        written = self._handle.write(data)
        self._report(self._handle.tell())
        return written

    def seek(self, *args):
        return self._handle.seek(*args)

    def tell(self) -> int:
        return self._handle.tell()

    def truncate(self, *args):
        result = self._handle.truncate(*args)
        self._report(self._handle.tell())
        return result

    def flush(self):
        return self._handle.flush()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def run_downloads(plans: list[DownloadPlan], progress: Optional[Progress] = None) -> int:
    """Fetches what the plans lack, file by file; returns the bytes received. `progress(done, total, file)` is
    called with the bytes present of all plans together; an exception it raises stops the download, and what
    was received is kept for the next run."""
    report = progress or (lambda done, total, file: None)
    total = sum(p.total_bytes for p in plans)
    done = sum(p.present_bytes(f) for p in plans if not p.complete for f in p.files)
    done += sum(p.total_bytes for p in plans if p.complete)
    report(done, total, "")
    received = 0
    for plan in plans:
        if plan.complete:
            continue
        needed = sum(f.size - plan.present_bytes(f) for f in plan.files)
        if needed > shutil.disk_usage(_existing_parent(plan.target)).free:
            raise _disk_full(plan, needed)
        plan.target.mkdir(parents=True, exist_ok=True)
        plan.write_record()
        for file in plan.files:
            if plan._has(file):
                continue
            before = done
            done = _fetch(plan, file, done, total, report)
            received += done - before
        plan.write_record()
        plan.complete = True
    return received


RESUMES_PER_FILE = 5  # a connection that drops after sending bytes is resumed this often within one download


def _fetch(plan: DownloadPlan, file: RemoteFile, done: int, total: int, report: Progress,
           resumes: int = RESUMES_PER_FILE) -> int:
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import HfHubHTTPError, build_hf_headers

    final, partial = plan.target / file.path, plan.partial_path(file)
    partial.parent.mkdir(parents=True, exist_ok=True)
    if final.is_file():  # a copy of the wrong size: cut short by another tool, or damaged
        if final.stat().st_size < file.size and file.sha256 and not partial.exists():
            os.replace(final, partial)  # resumed like a partial download, and checked below
        else:
            final.unlink()
    start = partial.stat().st_size if partial.is_file() else 0
    if start > file.size:
        partial.unlink()
        done, start = done - min(start, file.size), 0
    # a resumed file is checked against the Hub's sha256 when there is one: bytes kept from before (a copy cut
    # short elsewhere, above all) may not be the start of this file
    verify = start > 0 and file.sha256 is not None
    base = done - start  # `done` counted the partial bytes already
    # the Hub's file URL, built here on plan.endpoint: hf_hub_url swaps in an endpoint only when its template (made
    # from HF_ENDPOINT at import) still matches
    url = (f"{plan.endpoint}/{plan.repo_id}/resolve/{quote(plan.commit or plan.revision, safe='')}/"
           f"{quote(file.path)}")
    options = {"tqdm_class": _QuietBar} if "tqdm_class" in inspect.signature(http_get).parameters else {}
    try:
        with open(partial, "r+b" if start else "wb") as handle:
            handle.seek(start)
            writer = _CountingFile(handle, lambda position: report(base + position, total, file.path))
            http_get(url, writer, resume_size=start, headers=build_hf_headers(token=plan.token),
                     expected_size=file.size, displayed_filename=file.path, **options)
    except DownloadError:
        raise
    except HfHubHTTPError as error:
        raise DownloadError(f"{plan.repo_url} answered {_status(error)} for {file.path}; run the download again "
                            f"later (what was fetched is kept).") from None
    except _network_errors() as error:
        kept = partial.stat().st_size if partial.is_file() else 0
        if kept > start and resumes > 0:
            # it sent bytes before it dropped: go on from there with a Range request (huggingface_hub 1.x retries
            # such drops itself, 0.x only some of them)
            log.info("The download of %s stopped at %s (%s); resuming.", file.path, _size(kept), _reason(error))
            return _fetch(plan, file, base + kept, total, report, resumes - 1)
        raise DownloadError(f"The download of {file.path} from {plan.repo_url} stopped ({_reason(error)}); "
                            f"{_size(kept)} of it are kept, so run the download again to resume it, or put "
                            f"{_by_hand(plan)} into {plan.target} by hand.") from None
    except OSError as error:
        if _is_disk_full(error):
            raise _disk_full(plan, file.size - (partial.stat().st_size if partial.is_file() else 0)) from None
        if partial.is_file() and partial.stat().st_size != file.size:  # the server sent another length
            raise DownloadError(f"{plan.repo_url} sent {partial.stat().st_size} bytes of {file.path} where it "
                                f"announced {file.size}; run the download again to resume it.") from None
        raise
    if verify and _sha256(partial) != file.sha256:
        partial.unlink()  # the shorter copy was not the start of this file: fetch it whole
        return _fetch(plan, file, base, total, report)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)
    return base + file.size


def download(name: str, root, *, repo_id: Optional[str] = None, revision: str = "main",
             endpoint: Optional[str] = None, token=None, progress: Optional[Progress] = None) -> Path:
    """Downloads the release `name` into the kind's folder `root` (e.g. models/LLM) and returns where it is."""
    plan = plan_download(find_release(name), root, repo_id=repo_id, revision=revision, endpoint=endpoint, token=token)
    run_downloads([plan], progress)
    return plan.target


# ------------------------------------------------------------------------------------------------ console

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
    from .run_workflow import default_comfyui_dir  # the run command's rule; standard library only

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


if __name__ == "__main__":
    sys.exit(main())
