"""Fetching a planned download: resumable, with progress in bytes, into the folders the loaders read."""
from __future__ import annotations

import hashlib
import inspect
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import quote

from .plan import (DownloadError, DownloadPlan, Progress, RemoteFile, _by_hand, _disk_full, _existing_parent,
                   _is_disk_full, _network_errors, _reason, _size, _status, find_release, plan_download)

log = logging.getLogger("llmga")


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


