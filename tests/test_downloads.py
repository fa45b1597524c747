"""Downloading released models (llmga_core.downloads, the LLMGA Download Model node, the run command's
--download) against a stand-in Hub on 127.0.0.1 (tests/fixtures/hub_server.py) that serves tiny models built
by the fixtures in the released layouts, plus the training leftovers and duplicates a real repository holds."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmga_core import downloads
from llmga_core.downloads import DownloadError
from tests.fixtures.hub_server import StandInHub, repo_from_folder
from tests.host import REPO, free_port

QWEN = "llmga-Qwen2-0.5B-full-finetune"
QWEN_REPO = f"binxia/{QWEN}"
TOWER = "clip-vit-large-patch14-336"
TOWER_REPO = "openai/clip-vit-large-patch14-336"
SD15 = "llmga-sd15-t2i-v2"
DIFFRIR_MIRROR = "mirror/DiffRIR"
# what a released MLLM repo holds beside the files the loader reads (training leftovers, as LLMGA's training
# scripts save them: trainer_state.json, training_args.bin), and a .bin duplicate
MLLM_LEFTOVERS = {"training_args.bin": b"\x80\x04 trainer pickle", "README.md": b"# card\n",
                  "pytorch_model.bin": b"PK duplicate weights", "checkpoint-100/model.safetensors": b"old step"}
TOWER_LEFTOVERS = {"pytorch_model.bin": b"PK duplicate", "tf_model.h5": b"HDF", "flax_model.msgpack": b"msgpack",
                   "vocab.json": b"{}", "tokenizer.json": b"{}"}


def tree(folder: Path) -> dict[str, bytes]:
    """The files of a folder (its .cache/ bookkeeping left out) by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and ".cache" not in p.relative_to(folder).parts}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from tests.fixtures.tiny_diffrir import make_diffrir_weights
    from tests.fixtures.tiny_mllm import make_mllm_folder, make_vision_tower
    from tests.fixtures.tiny_sd import make_sd_folder

    root = tmp_path_factory.mktemp("released")
    mllm = make_mllm_folder(root / "LLM", "qwen2", sharded=True)  # writes trainer_state.json too, as training does
    tower = make_vision_tower(root / TOWER)
    sd = make_sd_folder(root / "diffusers", "sd15", fp16_variant=True, light=True)
    diffrir = make_diffrir_weights(root / "DiffRIR_x1.pth", scale=1)
    return {"mllm": mllm, "tower": tower, "sd": sd, "diffrir": diffrir}


@pytest.fixture
def hub(sources):
    with StandInHub() as server:
        server.add(QWEN_REPO, repo_from_folder(sources["mllm"], extra=MLLM_LEFTOVERS))
        server.add(TOWER_REPO, repo_from_folder(sources["tower"], extra=TOWER_LEFTOVERS))
        server.add(f"binxia/{SD15}", repo_from_folder(sources["sd"], extra={
            "safety_checker/config.json": b"{}", "safety_checker/model.safetensors": b"1.2 GB in the release",
            "README.md": b"# card\n"}))
        server.add(DIFFRIR_MIRROR, {"DiffRIR_x1.pth": sources["diffrir"].read_bytes(), "README.md": b"mirror\n"})
        yield server


def repo_paths(requests) -> list[str]:
    """The repository paths of file GETs (/<repo>/resolve/<revision>/<path>)."""
    from urllib.parse import unquote

    return [unquote(r.path.split("/resolve/", 1)[1].split("/", 1)[1]) for r in requests]


def mllm_files(sources) -> dict[str, bytes]:
    """What the loader reads: the fixture's folder as training saved it, minus its training leftover."""
    files = tree(sources["mllm"])
    del files["trainer_state.json"]
    return files


def greedy_tokens(folder: Path, tower: Path) -> list[int]:
    from llmga_core.mllm import load_mllm

    model = load_mllm(folder, vision_tower=tower, dtype=__import__("torch").float32)
    return list(model.generate("a red kite over the dunes", task="text-to-image", max_new_tokens=6).token_ids)


# ------------------------------------------------------------------------------------------------ library

def test_an_mllm_lands_where_the_loader_finds_it_with_progress_in_bytes(sources, hub, tmp_path, capsys):
    models = tmp_path / "models"
    events = []
    plans = downloads.plans_for(QWEN, models, endpoint=hub.url)
    assert [p.release.name for p in plans] == [QWEN, TOWER]  # the MLLM brings its vision tower
    downloads.run_downloads(plans, lambda done, total, file: events.append((done, total, file)))

    target, tower = models / "LLM" / QWEN, models / "clip_vision" / TOWER
    assert tree(target) == mllm_files(sources)
    assert tree(tower) == tree(sources["tower"])  # config, preprocessor config, model.safetensors: no duplicates
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.gets()}
    assert not fetched & {"training_args.bin", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack",
                          "README.md", "trainer_state.json"}
    total = sum(map(len, mllm_files(sources).values())) + sum(map(len, tree(sources["tower"]).values()))
    assert events[0][:2] == (0, total) and events[-1][:2] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(events, events[1:])) and len(events) > len(tree(target))
    # the downloaded model gives the tokens the model it was made from gives
    assert greedy_tokens(target, tower) == greedy_tokens(sources["mllm"], sources["tower"])

    # a complete download is neither fetched nor checked again: the command says so without a request
    asked = len(hub.requests)
    capsys.readouterr()
    assert downloads.main([QWEN, "--models-dir", str(models), "--endpoint", hub.url]) == 0
    out = capsys.readouterr().out
    assert len(hub.requests) == asked
    assert out == (f"[llmga] downloading into {models} (--models-dir)\n"
                   f"[llmga] {QWEN} -> {target} (complete already)\n")  # and its tower is in place


def test_the_command_prints_progress_lines_and_fetches_only_what_is_missing(sources, hub, tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(sources["tower"], models / "clip_vision" / TOWER)  # a tower put there by hand
    assert downloads.main([QWEN, "--models-dir", str(models), "--endpoint", hub.url]) == 0
    out = capsys.readouterr().out.splitlines()
    size = sum(map(len, mllm_files(sources).values()))
    assert out[0] == f"[llmga] downloading into {models} (--models-dir)"  # before anything is asked of the Hub
    assert out[1] == f"[llmga] {QWEN} -> {models / 'LLM' / QWEN} ({size / 1e3:.1f} kB from {hub.url}/{QWEN_REPO})"
    assert out[-1] == f"[llmga]   downloading {QWEN}: 100% ({size / 1e3:.1f} kB of {size / 1e3:.1f} kB)"
    assert not any(TOWER_REPO in r.path for r in hub.requests)  # the tower was there: not asked for


# ------------------------------------------------------------------------------- where the command writes

def test_a_relative_models_dir_inside_comfyui_is_read_from_the_comfyui_folder(tmp_path):
    """README's `--models-dir ComfyUI/models`, typed in ComfyUI/custom_nodes/<pack>, means <ComfyUI>/models (not
    <pack>/ComfyUI/models); so do `models` and no --models-dir at all. Paths that start with . or .. and paths
    given outside that ComfyUI are read from the current folder, as the shell reads them."""
    comfyui = tmp_path / "ComfyUI"
    pack = comfyui / "custom_nodes" / "comfyui-llmga"
    models = comfyui / "models"

    def resolve(models_dir, cwd=pack, root=comfyui):  # as the command passes it: the string typed
        return downloads.resolve_models_dir(models_dir, cwd=cwd, comfyui=root)[0]

    assert resolve(None) == models
    assert resolve("ComfyUI/models") == models
    assert resolve("models") == models
    assert resolve("ComfyUI/models", cwd=comfyui / "input") == models
    assert resolve("../../models") == models
    assert resolve("./mine") == pack / "mine"
    assert resolve("models", cwd=comfyui) == models
    assert resolve("ComfyUI/models", cwd=tmp_path) == models  # outside ComfyUI: read from here
    assert resolve("elsewhere/models", cwd=tmp_path) == tmp_path / "elsewhere" / "models"
    assert resolve(str(tmp_path / "disk" / "models")) == tmp_path / "disk" / "models"
    assert resolve(".") == pack and resolve("..") == pack.parent
    portable = tmp_path / "comfy-0.33"  # a ComfyUI folder of another name: its own name or "ComfyUI" may lead
    inside = portable / "custom_nodes" / "comfyui-llmga"
    assert resolve("comfy-0.33/models", cwd=inside, root=portable) == portable / "models"
    assert resolve("ComfyUI/models", cwd=inside, root=portable) == portable / "models"
    assert downloads.resolve_models_dir(None, cwd=pack, comfyui=comfyui)[1] == \
        f"the models folder of the ComfyUI this pack is installed in, {comfyui}"
    with pytest.raises(DownloadError) as error:
        downloads.resolve_models_dir(None, cwd=tmp_path, comfyui=None)
    assert str(error.value) == ("Give the models folder to download into with --models-dir (ComfyUI/models): this "
                                "pack is not inside a ComfyUI's custom_nodes folder, so there is no default.")


def test_the_command_in_the_pack_folder_writes_into_comfyuis_models_folder_and_says_so_first(sources, hub, tmp_path):
    """The command as README gives it, run in ComfyUI/custom_nodes/comfyui-llmga (a symlink to this repository,
    as `ln -s` installs make it): the first line names <ComfyUI>/models, and the files land there."""
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "custom_nodes").mkdir(parents=True)
    (comfyui / "main.py").write_text("")
    pack = comfyui / "custom_nodes" / "comfyui-llmga"
    pack.symlink_to(REPO, target_is_directory=True)
    models = comfyui / "models"
    env = {**os.environ, "PWD": str(pack), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf")}

    def command(*args):
        done = subprocess.run([sys.executable, "-m", "llmga_core.downloads", QWEN, *args], cwd=pack, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.splitlines()

    out = command("--models-dir", "ComfyUI/models")
    assert out[0] == f"[llmga] downloading into {models} (--models-dir ComfyUI/models, read from the ComfyUI " \
                     f"folder {comfyui})"
    assert out[1].startswith(f"[llmga] {QWEN} -> {models / 'LLM' / QWEN} (")
    assert tree(models / "LLM" / QWEN) == mllm_files(sources)
    assert tree(models / "clip_vision" / TOWER) == tree(sources["tower"])
    assert not (REPO / "ComfyUI").exists()  # nothing went into the pack folder

    asked = len(hub.requests)  # no --models-dir: the same folder, where the download is complete already
    assert command() == [f"[llmga] downloading into {models} (the models folder of the ComfyUI this pack is "
                         f"installed in, {comfyui})", f"[llmga] {QWEN} -> {models / 'LLM' / QWEN} (complete already)"]
    assert len(hub.requests) == asked


def test_the_command_names_a_folder_an_older_version_filled_in_the_pack(sources, hub, tmp_path, monkeypatch, capsys):
    """An older version of the command wrote `--models-dir ComfyUI/models` into <pack>/ComfyUI/models, which
    ComfyUI never reads: the command now writes into <ComfyUI>/models and says what to do with the old folder."""
    comfyui = tmp_path / "ComfyUI"
    pack = comfyui / "custom_nodes" / "comfyui-llmga"
    stale = pack / "ComfyUI" / "models"
    (stale / "LLM").mkdir(parents=True)
    monkeypatch.chdir(pack)
    monkeypatch.setenv("PWD", str(pack))
    monkeypatch.setattr(downloads.cli, "_pack_comfyui", lambda: comfyui)
    assert downloads.main([QWEN, "--models-dir", "ComfyUI/models", "--endpoint", hub.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [
        f"[llmga] downloading into {comfyui / 'models'} (--models-dir ComfyUI/models, read from the ComfyUI folder "
        f"{comfyui})",
        f"[llmga] note: {stale} is not read by ComfyUI (a download from an older version of this command may have "
        f"gone there); move what it holds into {comfyui / 'models'}, or delete it."]
    assert tree(comfyui / "models" / "LLM" / QWEN) == mllm_files(sources)
    assert not list((stale / "LLM").iterdir())


def test_the_command_without_models_dir_outside_comfyui_asks_for_one(monkeypatch, capsys):
    monkeypatch.setattr(downloads.cli, "_pack_comfyui", lambda: None)
    assert downloads.main([QWEN]) == 2
    err = capsys.readouterr().err
    assert err == ("[llmga] error: Give the models folder to download into with --models-dir (ComfyUI/models): "
                   "this pack is not inside a ComfyUI's custom_nodes folder, so there is no default.\n")
    assert downloads.main(["llmga-no-such-model", "--models-dir", "m"]) == 2  # a typo: refused first
    assert "is not a release this pack knows" in capsys.readouterr().err


def test_an_interrupted_download_resumes_with_a_range_request(sources, hub, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from llmga_core.diffrir import load_diffrir

    data = sources["diffrir"].read_bytes()
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", len(data) // 4 + 1)
    root = tmp_path / "models" / "diffrir"

    class Cancelled(Exception):
        pass

    def cancel_halfway(done, total, file):
        if done >= total // 2:
            raise Cancelled  # what ComfyUI's ProgressBar raises on an interrupt

    with pytest.raises(Cancelled):
        downloads.download("DiffRIR", root, repo_id=DIFFRIR_MIRROR, endpoint=hub.url, progress=cancel_halfway)
    assert not (root / "DiffRIR_x1.pth").exists()  # nothing half-written where the loader looks
    partial, = (root / ".cache" / "llmga" / "partial").glob("DiffRIR_x1.pth.*.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < len(data) and partial.read_bytes() == data[:kept]

    assert downloads.download("DiffRIR", root, repo_id=DIFFRIR_MIRROR, endpoint=hub.url) == root
    first, second = hub.gets("DiffRIR_x1.pth")
    assert "Range" not in first.headers and second.headers["Range"] == f"bytes={kept}-"
    assert (root / "DiffRIR_x1.pth").read_bytes() == data and not partial.exists()
    assert sorted(tree(root)) == ["DiffRIR_x1.pth"]  # the mirror's README stays on the Hub
    assert load_diffrir(root / "DiffRIR_x1.pth").scale == 1


def test_a_dropped_connection_is_resumed_within_the_same_download(sources, hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub keeps what it received in whole chunks (10 MB); small ones here, for a small file
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 100)
    shard = "model-00001-of-00002.safetensors"
    hub.drop_after[shard] = 1000
    plan = downloads.plan_download(downloads.RELEASES[QWEN], tmp_path / "LLM", endpoint=hub.url)
    downloads.run_downloads([plan])
    first, second = hub.gets(shard)
    assert "Range" not in first.headers and second.headers["Range"] == "bytes=1000-"
    assert tree(tmp_path / "LLM" / QWEN) == mllm_files(sources)


def test_no_network_names_the_files_and_the_folder_to_put_them_in(sources, hub, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    root = tmp_path / "LLM"
    with pytest.raises(DownloadError) as error:
        downloads.download(QWEN, root, endpoint=closed)
    assert str(error.value) == (
        f"Cannot reach the Hugging Face Hub at {closed} ([Errno 111] Connection refused), so {QWEN} was not "
        f"downloaded: put config.json, generation_config.json, the tokenizer files and the model*.safetensors "
        f"weights (with model.safetensors.index.json when sharded) from {closed}/{QWEN_REPO} into {root / QWEN} by "
        f"hand, or run the download again when the network is back.")

    # after a download that stopped part-way the sentence names exactly the files still missing
    class Cancelled(Exception):
        pass

    def stop_after_config(done, total, file):
        if (root / QWEN / "config.json").exists():
            raise Cancelled

    with pytest.raises(Cancelled):
        downloads.download(QWEN, root, endpoint=hub.url, progress=stop_after_config)
    with pytest.raises(DownloadError) as error:
        downloads.download(QWEN, root, endpoint=closed)
    missing = sorted(set(mllm_files(sources)) - set(tree(root / QWEN)))
    assert "config.json" in tree(root / QWEN) and "model-00002-of-00002.safetensors" in missing
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    assert f"so {QWEN} was not downloaded: put {shown} from {closed}/{QWEN_REPO} into {root / QWEN} by hand" \
        in str(error.value)


def test_offline_mode_is_named_as_the_reason(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match=r"^Cannot reach the Hugging Face Hub at .* \(HF_HUB_OFFLINE is set\)"):
        downloads.download(QWEN, tmp_path / "LLM", endpoint=hub.url)
    assert not hub.requests


def test_an_sd_folder_brings_one_weight_set_per_component_and_no_safety_checker(sources, hub, tmp_path):
    from llmga_core.checkpoints import inspect_sd_folder

    root = tmp_path / "diffusers"
    downloads.download(SD15, root, endpoint=hub.url)
    got, source = inspect_sd_folder(root / SD15), inspect_sd_folder(sources["sd"])
    assert got.kind == source.kind == "sd15"
    # the weight files downloaded are exactly the ones the loader picks in the released folder (fp16 variants)
    weights = {p for p in tree(root / SD15) if p.endswith((".safetensors", ".bin"))}
    picked = {f.relative_to(sources["sd"]).as_posix() for f in
              source.unet_files + source.vae_files + source.text_encoder_files}
    assert weights == picked and all(".fp16." in p for p in picked)
    assert {"model_index.json", "unet/config.json", "scheduler/scheduler_config.json"} <= set(tree(root / SD15))
    assert not any(p.startswith("safety_checker/") or p == "README.md" for p in tree(root / SD15))
    for path, data in tree(root / SD15).items():
        assert data == (sources["sd"] / path).read_bytes()


def test_truncated_shard_names_the_file_and_the_command_that_resumes(sources, hub, tmp_path):
    from llmga_core.mllm import load_mllm

    models = tmp_path / "models"
    downloads.run_downloads(downloads.plans_for(QWEN, models, endpoint=hub.url))
    folder, tower = models / "LLM" / QWEN, models / "clip_vision" / TOWER
    shard = folder / "model-00002-of-00002.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # a copy cut short
    with pytest.raises(ValueError) as error:
        load_mllm(folder, vision_tower=tower)
    command = f"python -m llmga_core.downloads {QWEN} --models-dir {models}"
    assert str(error.value) == (f"{shard} is corrupt or incomplete (not a readable safetensors file); download it "
                                f"again: `{command}` (in the pack folder) resumes the download, or queue the LLMGA "
                                f"Download Model node with {QWEN}.")

    # the command, as a user runs it from the pack folder, fetches the rest of that shard only
    asked = len(hub.gets())
    argv = shlex.split(re.search(r"`([^`]+)`", str(error.value))[1])
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    new = hub.gets()[asked:]
    assert [r.path.rsplit("/", 1)[-1] for r in new] == [shard.name]
    assert new[0].headers["Range"] == f"bytes={len(whole) // 2}-"
    assert shard.read_bytes() == whole
    assert greedy_tokens(folder, tower) == greedy_tokens(sources["mllm"], sources["tower"])

    shard.unlink()  # a shard that is not there at all gets the same advice
    with pytest.raises(FileNotFoundError) as error:
        load_mllm(folder, vision_tower=tower)
    assert str(error.value) == (f"Shard {shard.name} listed in {folder / 'model.safetensors.index.json'} is "
                                f"missing; download it again: `{command}` (in the pack folder) resumes the download, "
                                f"or queue the LLMGA Download Model node with {QWEN}.")


def test_a_shorter_copy_that_is_not_the_files_start_is_fetched_whole(sources, hub, tmp_path):
    plan = downloads.plan_download(downloads.RELEASES[QWEN], tmp_path / "LLM", endpoint=hub.url)
    downloads.run_downloads([plan])
    shard = tmp_path / "LLM" / QWEN / "model-00001-of-00002.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(b"\0" * (len(whole) // 2))  # damaged, not cut short: resuming it would give wrong bytes
    asked = len(hub.gets())
    downloads.download(QWEN, tmp_path / "LLM", endpoint=hub.url)
    ranges = [r.headers.get("Range") for r in hub.gets()[asked:]]
    assert ranges == [f"bytes={len(whole) // 2}-", None]  # resumed, failed the Hub's sha256, fetched whole
    assert shard.read_bytes() == whole


def test_repositories_that_cannot_be_used_are_refused_in_one_sentence(sources, hub, tmp_path, monkeypatch):
    root = tmp_path / "LLM"
    hub.add("someone/escape", {"config.json": b"{}", "../../evil.json": b"{}", "model.safetensors": b"x"})
    with pytest.raises(DownloadError) as error:
        downloads.download(QWEN, root, repo_id="someone/escape", endpoint=hub.url)
    assert str(error.value) == (f"{hub.url}/someone/escape lists a file outside its folder ('../../evil.json'), so "
                                f"nothing was downloaded from it.")
    assert not hub.gets() and not (tmp_path / "evil.json").exists()

    with pytest.raises(DownloadError) as error:
        downloads.download(QWEN, root, repo_id="someone/missing", endpoint=hub.url)
    assert str(error.value) == (f"{hub.url}/someone/missing does not exist (or is private); check the repo_id, or "
                                f"log in with `hf auth login` if it is yours.")
    hub.add("someone/text-only", {"config.json": b"{}", "tokenizer.json": b"{}", "README.md": b""})
    with pytest.raises(DownloadError) as error:
        downloads.download(QWEN, root, repo_id="someone/text-only", endpoint=hub.url)
    assert str(error.value) == (f"{hub.url}/someone/text-only has no weights (.safetensors or .bin), so it is not "
                                f"an LLMGA MLLM repository; check the repo_id.")
    with pytest.raises(DownloadError) as error:
        downloads.download("DiffRIR", tmp_path / "diffrir", endpoint=hub.url)
    assert str(error.value) == ("DiffRIR is not on the Hugging Face Hub (x1, x2 and x4 weights, on Google Drive "
                                f"(github.com/Zj-BinXia/DiffRIR)); download the weights by hand into "
                                f"{tmp_path / 'diffrir'}, or give the repo_id of a Hub mirror you trust.")

    class Usage:
        free = 10

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage)  # a full disk, as the OS reports it
    with pytest.raises(DownloadError) as error:
        downloads.download(QWEN, root, endpoint=hub.url)
    needed = sum(map(len, mllm_files(sources).values()))
    assert str(error.value) == (f"Not enough disk space for {QWEN}: it needs {needed / 1e3:.1f} kB more but the disk "
                                f"of {root / QWEN} has 10 bytes free; free some space (what was fetched is kept) and "
                                f"run the download again.")
    assert not root.exists()  # nothing was started


# ------------------------------------------------------------------------------------------------ run command

def test_run_command_downloads_missing_models_with_progress(sources, hub, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants
    from llmga_core import run_workflow as rw

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)  # what HF_ENDPOINT sets at import
    models = tmp_path / "models"
    with pytest.raises(rw.WorkflowError) as error:
        rw.download_models([("LLMGAMLLMLoader", QWEN, "LLM"), ("DiffRIRLoader", "DiffRIR_x1.pth", "diffrir")],
                           models)
    assert str(error.value) == ("DiffRIR_x1.pth (DiffRIRLoader) is not on the Hugging Face Hub: download it by hand "
                                "from the DiffRIR release (github.com/Zj-BinXia/DiffRIR, 'pretrained models') into "
                                f"{models / 'diffrir'}.")
    assert not hub.gets()  # refused before anything was fetched
    vae = "vae-ft-mse-840000-ema-pruned.safetensors"
    hub.add("stabilityai/sd-vae-ft-mse-original", {vae: b"v" * 3000, "vae-ft-mse-840000-ema-pruned.ckpt": b"c" * 3000,
                                                   "README.md": b"card"})
    rw.download_models([("LLMGAMLLMLoader", QWEN, "LLM"), ("VAELoader", vae, "vae")], models)
    out = capsys.readouterr().out
    assert tree(models / "vae") == {vae: b"v" * 3000}  # the one file ComfyUI's VAELoader reads
    assert tree(models / "LLM" / QWEN) == mllm_files(sources) and tree(models / "clip_vision" / TOWER)
    assert f"[llmga] {QWEN} -> {models / 'LLM' / QWEN} (" in out and f"[llmga] {TOWER} -> " in out
    assert re.search(rf"\[llmga\]   downloading {QWEN}, {TOWER}, {vae}: 100% \(\d+\.\d MB of \d+\.\d MB\)", out), out

    text = rw.describe_missing([("LLMGAMLLMLoader", QWEN, "LLM")], str(models), command=["wf.json", "--out", "o"])
    assert text.endswith("\nDownload them with: python -m llmga_core.run_workflow wf.json --out o --download")
    text = rw.describe_missing([("LLMGAMLLMLoader", QWEN, "LLM")], None, "http://10.0.0.5:8188")
    assert text.endswith(f"\nOn that machine, python -m llmga_core.downloads {QWEN} --models-dir <its models "
                         f"folder> downloads them.")


# ------------------------------------------------------------------------------------------------ the node in ComfyUI

@pytest.mark.host
def test_the_node_downloads_with_progress_and_listing_never_touches_the_hub(sources, hub, tmp_path):
    from tests.host import ONE_THREAD, ComfyServer, ProgressWatch

    env = {**ONE_THREAD, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    server = ComfyServer(tmp_path / "base", env=env).start()
    try:
        from llmga_core.run_workflow import Server

        listing = Server(server.url)
        info = server.get("/object_info")
        assert info["LLMGADownloadModel"]["category"] == "LLMGA/loaders"
        assert listing.combo_options("LLMGAMLLMLoader", "model_name") == []
        assert QWEN in listing.combo_options("LLMGADownloadModel", "model")
        assert not hub.requests  # starting and listing asked the Hub nothing

        watch = ProgressWatch(server)
        download = {"d": {"class_type": "LLMGADownloadModel", "inputs": {"model": QWEN, "vision_tower": True}}}
        entry = server.run(download)
        assert entry["status"]["status_str"] == "success", server.log()[-3000:]
        models = tmp_path / "base" / "models"
        assert tree(models / "LLM" / QWEN) == mllm_files(sources)
        assert tree(models / "clip_vision" / TOWER) == tree(sources["tower"])
        total = sum(map(len, mllm_files(sources).values())) + sum(map(len, tree(sources["tower"]).values()))
        last = watch.last_progress(entry["prompt"][1], "d")
        assert last["max"] == total and last["value"] == total  # bytes on the node's progress bar
        mllm_mb = sum(map(len, mllm_files(sources).values())) / 1e6
        assert entry["outputs"]["d"]["text"][0].startswith(f"{QWEN}: {mllm_mb:.1f} MB from {hub.url}/{QWEN_REPO} in ")

        # the loader lists the downloaded folder, finds the tower in clip_vision, and the model writes a prompt
        assert listing.combo_options("LLMGAMLLMLoader", "model_name") == [QWEN]
        prompt = {"m": {"class_type": "LLMGAMLLMLoader", "inputs": {"model_name": QWEN, "dtype": "float32"}},
                  "g": {"class_type": "LLMGAPromptGenerator", "inputs": {
                      "mllm": ["m", 0], "task": "text-to-image", "instruction": "a red kite", "temperature": 0.0,
                      "top_p": 1.0, "max_new_tokens": 6, "seed": 0}},
                  "p": {"class_type": "PreviewAny", "inputs": {"source": ["g", 1]}}}
        entry = server.run(prompt)
        assert entry["status"]["status_str"] == "success", server.log()[-3000:]
        assert entry["outputs"]["p"]["text"][0]  # the answer

        # an SD folder, interrupted part-way: the next run fetches only what it lacks
        asked = len(hub.gets())
        hub.delay = 0.4
        prompt_id = server.queue({"s": {"class_type": "LLMGADownloadModel", "inputs": {"model": SD15}}})
        watch.wait_progress(prompt_id, "s", at_least=1)
        server.interrupt()
        entry = server.wait(prompt_id)
        assert entry["status"]["status_str"] == "error"
        assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
        before = repo_paths(hub.gets()[asked:])
        hub.delay = 0
        entry = server.run({"s": {"class_type": "LLMGADownloadModel", "inputs": {"model": SD15}}})
        assert entry["status"]["status_str"] == "success", server.log()[-3000:]
        after = repo_paths(hub.gets()[asked + len(before):])
        sd_files = tree(models / "diffusers" / SD15)
        # every file came over once: what arrived before the interrupt was kept, not fetched again
        assert before and after and sorted(before + after) == sorted(sd_files)
        for path, data in sd_files.items():
            assert data == (sources["sd"] / path).read_bytes()
        assert listing.combo_options("LLMGACheckpointLoader", "model_name") == [SD15]
        assert entry["outputs"]["s"]["text"][0].startswith(f"{SD15}: ")

        # queued again: nothing to do, no request; with a file deleted, it runs and fetches that file only
        asked = len(hub.requests)
        again = {"s": {"class_type": "LLMGADownloadModel", "inputs": {"model": SD15}}}
        entry = server.run(again)
        assert entry["status"]["status_str"] == "success" and len(hub.requests) == asked
        assert entry["outputs"]["s"]["text"][0] == f"{SD15}: already complete in {models / 'diffusers' / SD15}"
        (models / "diffusers" / SD15 / "unet" / "config.json").unlink()
        entry = server.run(again)
        assert entry["status"]["status_str"] == "success", server.log()[-3000:]
        assert repo_paths(hub.gets()[len(hub.gets()) - 1:]) == ["unet/config.json"]
        assert len([r for r in hub.requests[asked:] if "/resolve/" in r.path]) == 1
        assert tree(models / "diffusers" / SD15) == sd_files
        assert server.alive()
    finally:
        server.stop()
