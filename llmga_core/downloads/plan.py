"""What to fetch: the files a loader reads, checked against the Hub, and the plan of a download."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Optional

from .. import releases
from ..releases import RELEASES, VISION_TOWER, Release, _read_record, _record_path, target_folder


log = logging.getLogger("llmga")


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


