"""The headless run command: its own logic, and end to end against the real ComfyUI (started by the command
itself, or a running server with --server) on tiny models."""
from __future__ import annotations

import json
import re
import time

import pytest

from llmga_core import run_workflow as rw
from tests.host import REPO

T2I = REPO / "workflows" / "api" / "llmga_t2i_sd15.json"


def test_set_by_input_name_node_id_class_or_title():
    wf = rw.load_api_workflow(T2I)
    rw.apply_settings(wf, ["steps=3", "2.seed=9", "LLMGAPromptGenerator.instruction=a \"quoted\" boat",
                           "Empty Latent Image.width=640", "cfg=6.5"])
    assert wf["6"]["inputs"]["steps"] == 3 and wf["6"]["inputs"]["cfg"] == 6.5
    assert wf["2"]["inputs"]["seed"] == 9 and wf["6"]["inputs"]["seed"] == 0
    assert wf["2"]["inputs"]["instruction"] == 'a "quoted" boat'
    assert wf["5"]["inputs"]["width"] == 640 and wf["5"]["inputs"]["height"] == 512


def test_set_never_overwrites_a_link_and_says_what_is_wrong():
    wf = rw.load_api_workflow(T2I)
    with pytest.raises(rw.WorkflowError, match="no node has a widget input 'text'"):
        rw.apply_settings(wf, ["text=hello"])  # the long-prompt text is linked to the MLLM's prompt
    with pytest.raises(rw.WorkflowError, match="must look like INPUT=VALUE"):
        rw.apply_settings(wf, ["steps"])


def test_files_that_are_not_api_workflows_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(rw.WorkflowError, match="is not valid JSON"):
        rw.load_api_workflow(bad)
    with pytest.raises(rw.WorkflowError, match="does not exist"):
        rw.load_api_workflow(tmp_path / "missing.json")
    bad.write_text(json.dumps({"a": 1}))
    with pytest.raises(rw.WorkflowError, match="not an API-format ComfyUI workflow"):
        rw.load_api_workflow(bad)


def test_missing_models_say_where_they_go(tmp_path):
    missing = [("LLMGAMLLMLoader", "llmga-Qwen2-7B-full-finetune", "LLM"),
               ("DiffRIRLoader", "DiffRIR_x2.pth", "diffrir")]
    text = rw.describe_missing(missing, str(tmp_path))
    assert f"{tmp_path}/LLM/llmga-Qwen2-7B-full-finetune" in text
    assert "huggingface.co/binxia/llmga-Qwen2-7B-full-finetune" in text
    assert f"{tmp_path}/diffrir/DiffRIR_x2.pth" in text and "DiffRIR release" in text
    assert f"{tmp_path}/clip_vision/clip-vit-large-patch14-336" in text


def test_missing_models_with_server_are_relative_to_that_servers_models_folder():
    text = rw.describe_missing([("LLMGACheckpointLoader", "llmga-sdxl-t2i", "diffusers")], None, "http://10.0.0.5:8188")
    assert "on the server at http://10.0.0.5:8188" in text and "relative to it" in text
    assert "  - llmga-sdxl-t2i for LLMGACheckpointLoader: diffusers/llmga-sdxl-t2i  " in text
    assert "huggingface.co/binxia/llmga-sdxl-t2i" in text and "--download" not in text  # not possible with --server
    text = rw.describe_missing([("VAELoader", "vae-ft-mse-840000-ema-pruned.safetensors", "vae")], "/c/models")
    assert ("/c/models/vae/vae-ft-mse-840000-ema-pruned.safetensors  [from huggingface.co/stabilityai/"
            "sd-vae-ft-mse-original, or run again with --download]") in text


def test_comfyui_args_may_begin_with_dashes_as_readme_writes_them():
    parse = lambda *argv: rw.build_parser().parse_args(rw.normalise_argv(list(argv)))  # noqa: E731
    assert parse("wf.json", "--comfyui-args", "--cpu").comfyui_args == ["--cpu"]
    args = parse("wf.json", "--comfyui-args", "--cpu --lowvram", "--comfyui-args=--base-directory /b", "--out", "o")
    assert args.comfyui_args == ["--cpu --lowvram", "--base-directory /b"] and args.out.name == "o"
    with pytest.raises(SystemExit):
        parse("wf.json", "--comfyui-args")  # a value is still required


def test_a_start_without_a_gpu_is_explained_with_what_to_do():
    # the last lines ComfyUI 0.3.64 logs when started without --cpu on a machine without a GPU
    log = ("Checkpoint files will always be loaded safely.\nTraceback (most recent call last):\n"
           "  File \"main.py\", line 149, in <module>\n    torch._C._cuda_init()\n"
           "RuntimeError: Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and "
           "installed a driver from http://www.nvidia.com/Download/index.aspx\n")
    line = rw.last_error_line(log)
    assert line.startswith("RuntimeError: Found no NVIDIA driver")
    assert "--comfyui-args=--cpu" in rw.start_failure_advice(line)
    assert "correct the --comfyui-args" in rw.start_failure_advice(
        "main.py: error: unrecognized arguments: --no-such-flag")


def test_plain_progress_keeps_whole_lines_and_few_of_them():
    import io

    out = io.StringIO()
    printer = rw.ProgressPrinter({"2": "LLMGA Prompt Generator", "6": "KSampler"}, stream=out, live=False)
    printer.executing("2")
    for step in range(1, 20):  # the MLLM stops at its end token after 19 of 512
        printer.progress("2", step, 512)
    printer.executing("6")
    for step in (1, 2):
        printer.progress("6", step, 2)
    printer.finish_node()
    lines = out.getvalue().splitlines()
    assert lines == ["[llmga] running LLMGA Prompt Generator", "[llmga]   LLMGA Prompt Generator: 1/512",
                     "[llmga]   LLMGA Prompt Generator: done at 19/512", "[llmga] running KSampler",
                     "[llmga]   KSampler: 1/2", "[llmga]   KSampler: 2/2"]
    assert "\r" not in out.getvalue()


# ------------------------------------------------------------------------------ end to end, real ComfyUI

def run_command(*argv, cwd=REPO, env=None, timeout=600):
    import os
    import subprocess
    import sys

    from tests.host import ONE_THREAD

    env = {**(env or os.environ), **ONE_THREAD}  # also for the ComfyUI it starts
    return subprocess.run([sys.executable, "-m", "llmga_core.run_workflow", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


SMALL = ["--set", "steps=2", "--set", "width=64", "--set", "height=64", "--set", "max_new_tokens=12",
         "--set", "dtype=float32"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ComfyUI with the tiny models and an empty input folder."""
    from tests.host import ONE_THREAD, ComfyServer, models_base

    srv = ComfyServer(models_base(tmp_path_factory.mktemp("rw_base")), env=ONE_THREAD).start()
    yield srv
    srv.stop()


@pytest.mark.host
def test_symlinked_pack_starts_its_comfyui_on_the_cpu_with_the_example_image(tmp_path):
    """README's command, literally, from ComfyUI/custom_nodes/<pack> where the pack folder is a symlink (as
    `ln -s` installs make it): ComfyUI is found, started on the CPU (no GPU here) and said so, the missing
    example image is uploaded from workflows/, and prompt_<node>.txt holds the bare prompt."""
    import os

    import torch

    from tests.host import comfyui_dir, models_base

    # a ComfyUI folder of its own: main.py links to the host (python resolves it, so the host's code runs),
    # and --base-directory points the host at this folder's models, custom_nodes and (empty) input
    comfyui = models_base(tmp_path / "ComfyUI")
    base = comfyui
    (comfyui / "main.py").symlink_to(comfyui_dir() / "main.py")
    pack = comfyui / "custom_nodes" / "comfyui-llmga"
    assert pack.is_symlink()
    out = tmp_path / "out"
    env = dict(os.environ, PWD=str(pack))  # what a shell that cd'ed into the link sets
    done = run_command("workflows/api/llmga_inpaint_sd15_diffrir.json", "--set", "instruction=a red door",
                       *SMALL, "--set", "tile_size=32",
                       "--comfyui-args", f"--base-directory {base} --database-url sqlite:///:memory:",
                       "--out", out, cwd=pack, env=env)
    log = (out / "comfyui.log").read_text(errors="replace")[-3000:] if (out / "comfyui.log").exists() else ""
    assert done.returncode == 0, done.stdout + done.stderr + log
    assert f"starting ComfyUI in {comfyui} " in done.stdout
    assert ("starts with --cpu" in done.stdout) == (not torch.cuda.is_available())
    assert "uploading the example image workflows/llmga_inpaint_example.png" in done.stdout
    assert (base / "input" / "llmga_inpaint_example.png").read_bytes() == \
        (REPO / "workflows" / "llmga_inpaint_example.png").read_bytes()
    assert list(out.glob("*.png"))
    prompt, notes = (out / "prompt_3.txt").read_text(), (out / "notes_3.txt").read_text()
    assert prompt and "[" not in prompt and "max_new_tokens" not in prompt
    assert "no <gen_image> tag" in notes and "stopped at max_new_tokens (12)" in notes
    # output is not a terminal: whole lines, all the command's own
    assert all(line.startswith("[llmga] ") for line in done.stdout.splitlines()), done.stdout
    assert "\r" not in done.stdout


@pytest.mark.host
def test_missing_models_name_the_folders_of_the_comfyui_it_started(tmp_path):
    """With --base-directory the list names <base>/models/…, not the ComfyUI folder; `--comfyui-args --cpu`
    is taken as README writes it."""
    from tests.host import comfyui_dir, models_base

    base = models_base(tmp_path / "base")
    workflow = json.loads(T2I.read_text())
    workflow["1"]["inputs"]["model_name"] = "llmga-Qwen2-7B-full-finetune"
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(workflow))
    done = run_command(path, "--comfyui", comfyui_dir(), "--comfyui-args", "--cpu",
                       "--comfyui-args", f"--base-directory {base} --database-url sqlite:///:memory:",
                       "--out", tmp_path / "out")
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"not installed in {base}/models:" in done.stderr
    assert f"{base}/models/LLM/llmga-Qwen2-7B-full-finetune  [from huggingface.co/binxia/" \
           f"llmga-Qwen2-7B-full-finetune, or run again with --download]" in done.stderr
    assert f"{base}/models/clip_vision/clip-vit-large-patch14-336" in done.stderr
    assert "starts with --cpu" not in done.stdout  # the user chose --cpu


@pytest.mark.host
def test_a_failed_start_shows_the_logs_last_error_line_and_what_to_do(tmp_path):
    from tests.host import comfyui_dir

    done = run_command(T2I, "--comfyui", comfyui_dir(), "--comfyui-args", "--cpu --no-such-flag",
                       "--out", tmp_path / "out", timeout=120)
    assert done.returncode == 2
    assert "ComfyUI exited with code 2 while starting: main.py: error: unrecognized arguments: --no-such-flag" \
        in done.stderr
    assert "correct the --comfyui-args" in done.stderr and str(tmp_path / "out" / "comfyui.log") in done.stderr


@pytest.mark.host
def test_with_server_missing_models_are_named_relative_to_its_models_folder(server, tmp_path):
    workflow = json.loads((REPO / "workflows" / "api" / "llmga_inpaint_sd15_diffrir.json").read_text())
    workflow["9"]["inputs"]["model_name"] = "DiffRIR_x4.pth"
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(workflow))
    done = run_command(path, "--server", server.url, "--out", tmp_path / "o", timeout=120)
    assert done.returncode == 2
    assert f"not installed on the server at {server.url}" in done.stderr and "relative to it" in done.stderr
    assert "  - DiffRIR_x4.pth for DiffRIRLoader: diffrir/DiffRIR_x4.pth  [from the DiffRIR release" in done.stderr
    assert "<ComfyUI>" not in done.stderr and server.alive()


@pytest.mark.host
def test_an_input_image_that_is_not_there_names_the_node_and_the_flag(server, tmp_path):
    workflow = json.loads((REPO / "workflows" / "api" / "llmga_similar_sd15.json").read_text())
    workflow["1"]["inputs"]["image"] = "my_holiday.png"
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(workflow))
    done = run_command(path, "--server", server.url, "--out", tmp_path / "o", *SMALL, timeout=120)
    assert done.returncode == 2
    assert "loads 'my_holiday.png', which is not in the server's input folder; pass --image 1=PATH" in done.stderr
    # and with the flag it runs
    picture = tmp_path / "mine.png"
    picture.write_bytes((REPO / "workflows" / "llmga_similar_example.png").read_bytes())
    done = run_command(path, "--server", server.url, "--out", tmp_path / "o", *SMALL, "--image", f"1={picture}",
                       timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "o" / "prompt_3.txt").is_file()
    # the same run again is all cached and over before a late listener could hear it end: it still returns
    (tmp_path / "o" / "prompt_3.txt").unlink()
    again = run_command(path, "--server", server.url, "--out", tmp_path / "o", *SMALL, "--image", f"1={picture}",
                        timeout=120)
    assert again.returncode == 0 and "[llmga] cached: " in again.stdout, again.stdout + again.stderr
    assert (tmp_path / "o" / "prompt_3.txt").is_file()


@pytest.mark.host
def test_in_a_terminal_each_node_gets_one_live_bar(server, tmp_path):
    """Through a pseudo-terminal: tqdm bars for the MLLM and the sampler, one line each, and no line of the
    command glued to a bar."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    cmd = [sys.executable, "-m", "llmga_core.run_workflow", str(T2I), "--server", server.url, "--out",
           str(tmp_path / "o"), *SMALL, "--set", "max_new_tokens=40", "--set", "seed=5"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
                            env={**os.environ, "TERM": "xterm"})
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 300  # a hung run fails with what it printed instead of blocking the suite
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if not ready:
            continue
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        chunks.append(data)
    else:
        proc.kill()
    os.close(master)
    assert proc.wait(60) == 0, b"".join(chunks).decode(errors="replace")
    text = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    lines = text.split("\n")
    bars = [line for line in lines if "%|" in line]
    assert len([b for b in bars if "LLMGA Prompt Generator" in b]) == 1, text
    assert len([b for b in bars if "KSampler" in b]) == 1, text
    assert "\r" in text  # redrawn in place
    assert re.search(r"[^\n\r]\[llmga\]", text) is None, text  # nothing glued to a bar
