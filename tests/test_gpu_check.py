"""bench/gpu_check.py, the GPU checks prepared as one command, kept from rotting by its CPU dry run.

The dry run (`python -m bench.gpu_check --dry-run`) runs every part at tiny sizes on the CPU, each in its own process,
as the GPU run does; its memory part starts the ComfyUI host (gpu_dynamic_vram --cpu-smoke), hence the host mark.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from numbers import Number
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def gpu_check(*args, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def number(value) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool) and value == value  # not NaN


@pytest.mark.host
def test_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "out"
    done = gpu_check("--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    table = (out / "gpu_check.txt").read_text()
    assert table.startswith("LLMGA GPU check (dry run, CPU)") and "decode:" in table
    assert (out / "gpu_check.log").is_file()
    assert report["dry_run"] is True and number(report["wall_s"])
    parts = report["parts"]
    assert list(parts) == ["decode-tiny-float16", "diffrir", "editing", "quantization", "memory"]
    for name, part in parts.items():
        # every part ran, or says why not (a module this environment lacks)
        assert part["status"] in ("ok", "not run"), (name, part.get("reason"), part.get("output_tail"))
        if part["status"] == "not run":
            assert part["reason"].endswith("missing"), (name, part)
        else:
            assert number(part["seconds"]) and number(part["limit_s"]) and part["seconds"] <= part["limit_s"] + 5

    for dtype in ("float16",):  # the GPU run's other dtype (bfloat16) runs the same code with fewer contenders
        decode = parts[f"decode-tiny-{dtype}"]["result"]
        for key in ("weight_bytes_per_token", "copy_GBps", "sum_GBps", "bound_tokens_per_s", "build_s", "seconds"):
            assert number(decode[key]) and decode[key] > 0, (dtype, key)
        assert decode["auto_picks"] == "static"  # a tiny model is not worth a compilation
        expected = {"pack auto", "pack dynamic", "transformers eager"}
        if dtype == "float16":  # every decoder, and transformers' static cache + compile
            expected |= {"pack compiled", "pack static", "transformers static+compile"}
        assert set(decode["contenders"]) == expected
        for name, contender in decode["contenders"].items():
            assert "error" not in contender, (dtype, name, contender)
            for key in ("first_call_s", "compile_s", "x_pack_auto"):
                assert number(contender[key]), (dtype, name, key)
            assert number(contender["tokens_per_s"]) and contender["tokens_per_s"] > 0, (dtype, name)
            assert number(contender["pct_bound"]), (dtype, name)
            assert contender["greedy_agree"] <= contender["greedy_of"] == len_of_reference(decode)
        for decoder in ("auto", "dynamic"):
            cancel = decode["cancel"][decoder]
            assert cancel["trials"] and cancel["tokens_per_block"] == 1
            for trial in cancel["trials"]:
                assert "error" not in trial, trial
                assert number(trial["latency_s"]) or "ended" in trial["note"]

    memory = parts["memory"]
    if memory["status"] == "ok":
        pack = memory["result"]["variants"]["pack"]
        assert "failed" not in pack, pack
        assert [p["phase"] for p in pack["phases"]] == ["mllm", "sdxl", "mllm again", "free"]
        assert all(number(p["mllm_on_device"]) for p in pack["phases"])
        assert pack["phases"][1]["error"] is None and pack["phases"][2]["same_output"]

    quantization = parts["quantization"]
    if quantization["status"] == "ok":
        result = quantization["result"]
        assert number(result["baseline"]["weight_bytes"])
        for name in ("int8", "8bit", "4bit"):
            variant = result["variants"][name]
            assert "error" not in variant, (name, variant)
            assert number(variant["weight_bytes"]) and variant["x_weight_bytes"] < 1
            assert 0 <= variant["next_token_agreement"] <= 1 and variant["greedy_prefix"] <= variant["greedy_of"]

    diffrir = parts["diffrir"]["result"]
    rows = diffrir["rows"]
    assert [row["side"] for row in rows if row["variant"] == "float32"] == diffrir["sizes"]
    for row in rows:  # each variant: numbers, or the error it met (float16 / bfloat16: see the report)
        if "error" not in row:
            assert number(row["mp_per_s"]) and row["mp_per_s"] > 0 and row["finite"]
            assert row["variant"] == diffrir["reference"] or number(row["max_abs_diff"])

    editing = parts["editing"]
    if editing["status"] == "ok":
        dtypes = editing["result"]["dtypes"]
        assert set(dtypes) == {"float32", "float16", "bfloat16"}
        for name, entry in dtypes.items():
            assert "error" not in entry, (name, entry)
            for key in ("img2img_s", "mask_s", "inversion_s", "resample_s", "edit_s", "x_img2img", "mask_fraction"):
                assert number(entry[key]), (name, key)
            if name != "float32":
                assert 0 <= entry["mask_agreement"] <= 1 and number(entry["edit_max_abs_diff"])


def len_of_reference(decode: dict) -> int:
    return decode["contenders"]["pack dynamic"]["tokens"]


def test_missing_modules_are_skipped_with_the_reason(tmp_path):
    """The device machine lacks diffusers, bitsandbytes and ComfyUI: those parts say so and nothing else runs."""
    out = tmp_path / "out"
    done = gpu_check("--dry-run", "--out", str(out), "--parts", "memory", "quantization", "editing",
                     "--hide", "diffusers", "bitsandbytes", "comfy_aimdo", env={"LLMGA_COMFYUI_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(
        ("memory", "quantization", "editing"), "not run")
    assert parts["editing"]["reason"] == "diffusers missing"
    assert parts["quantization"]["reason"] == "bitsandbytes missing"
    assert parts["memory"]["reason"].startswith("comfy_aimdo") and "ComfyUI host" in parts["memory"]["reason"]
    table = (out / "gpu_check.txt").read_text()
    assert "not run" in table and "diffusers missing" in table


@pytest.mark.host
def test_pack_carry_holds_what_the_device_lacks(tmp_path):
    done = gpu_check("--pack-carry", str(tmp_path))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    archive = tmp_path / "carry.tar.gz"
    assert archive.stat().st_size < 40 * 2 ** 20  # with the working tree, well inside the device's 64 MiB
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    host = next(name.split("/")[0] for name in names if name.startswith("ComfyUI-"))
    assert {f"{host}/main.py", f"{host}/comfy/model_management.py", f"{host}/comfy/sample.py"} <= names
    for package, member in (("diffusers", "__init__.py"), ("importlib_metadata", "__init__.py"),
                            ("torchsde", "__init__.py"), ("comfy_aimdo", "control.py"),
                            ("comfy_kitchen", "__init__.py"), ("bitsandbytes", "__init__.py")):
        if importlib.util.find_spec(package) is not None:  # what this venv has (the 0.3.64 one lacks comfy_aimdo)
            assert f"site/{package}/{member}" in names, package
    libraries = {Path(name).name for name in names if "libbitsandbytes_" in name}
    if importlib.util.find_spec("bitsandbytes") is not None:  # the device's torch is built for CUDA 13.0
        assert "libbitsandbytes_cuda130.so" in libraries
    assert not any("cuda12" in lib for lib in libraries)
    assert not any(name.endswith((".so", ".pyc")) for name in names if name.startswith("site/comfy_kitchen/"))
    assert not any(name.startswith((f"{host}/tests/", f"{host}/tests-unit/")) for name in names)
