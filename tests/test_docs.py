"""README.md and docs/*.md against the repository: every relative link and #anchor resolves, every repository
file a command names exists, and every --flag quoted with a command of this repository is one its argparse
parser defines. Host-free and fast: the parsers are read from the scripts' source, nothing is imported."""
from __future__ import annotations

import ast
import re
import shlex
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXPECTED_DOCS = {"nodes.md", "workflows.md", "models.md", "python-api.md", "fidelity.md", "speed-and-memory.md",
                 "serving.md", "troubleshooting.md", "tests.md"}

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!\\)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# a path inside this repository, as commands and prose name them
REPO_PATH = re.compile(r"(?<![\w./~-])((?:bench|tests|\.ci|workflows|llmga_core|nodes|web|docs)/[\w./*-]*[\w*])")
PYTHON_MODULE = re.compile(r"python\S*\s+-m\s+((?:llmga_core|tests|bench)(?:\.\w+)+)")
# the scripts whose flags are checked: python -m llmga_core.<X> and bench/<name>.py (also named bare)
SCRIPT = re.compile(r"(?:python\S*\s+-m\s+llmga_core\.(run_workflow|downloads|export)\b)|"
                    r"(?:(?<![\w/])(?:bench/)?((?:bench_\w+|gpu_dynamic_vram)\.py))")


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower-cased, punctuation removed except - and _, each
    space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def prose_and_code(path: Path):
    """(line number, text, in a code block) for every line; inline code is part of the text."""
    in_code = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        yield number, line, in_code


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line, in_code in prose_and_code(path):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_code or not match:
            continue
        anchor = github_anchor(match[1])
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return frozenset(found)


def commands(path: Path):
    """(where, text) for every line of a code block (backslash continuations joined) and every inline code
    span; prose lines come whole too, for the flags quoted beside a command in a table row."""
    pending = ""
    for number, line, in_code in prose_and_code(path):
        where = f"{path.relative_to(REPO)}:{number}"
        if in_code:
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            yield where, pending, True
            pending = ""
        else:
            yield where, line, False


def test_the_docs_are_the_expected_files():
    assert {p.name for p in (REPO / "docs").glob("*.md")} >= EXPECTED_DOCS
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 120  # a first screen


def test_github_anchor_rule():
    assert github_anchor("Run a workflow headless (the main job in one command)") == \
        "run-a-workflow-headless-the-main-job-in-one-command"
    assert github_anchor("Serving the MLLM from llama-server") == "serving-the-mllm-from-llama-server"
    assert github_anchor("`llmga_core` and friends: 1.5×") == "llmga_core-and-friends-15"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(doc):
    broken = []
    for number, line, in_code in prose_and_code(doc):
        if in_code:
            continue
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: …
                continue
            file_part, _, anchor = target.partition("#")
            linked = (doc.parent / file_part).resolve() if file_part else doc
            if not linked.exists():
                broken.append(f"{doc.name}:{number}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{doc.name}:{number}: {target} (no heading with that anchor in {linked.name})")
    assert not broken, "\n".join(broken)


def repo_paths_named(text: str) -> list[str]:
    return [p for p in REPO_PATH.findall(text) if "…" not in p and "<" not in p]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_repository_file_a_command_names_exists(doc):
    missing = []
    for where, text, in_code in commands(doc):
        spans = [text] if in_code else [m[2] for m in INLINE_CODE.finditer(text)]
        for span in spans:
            for path in repo_paths_named(span):
                if not list(REPO.glob(path.rstrip("/"))):
                    missing.append(f"{where}: {path}")
            for module in PYTHON_MODULE.findall(span):
                file = REPO / module.replace(".", "/")
                if not (file.with_suffix(".py").is_file() or (file / "__main__.py").is_file()):
                    missing.append(f"{where}: python -m {module}")
            for script in re.findall(r"(?<![\w/])((?:bench_\w+|gpu_dynamic_vram)\.py)", span):
                if not (REPO / "bench" / script).is_file():
                    missing.append(f"{where}: {script}")
    assert not missing, "\n".join(missing)


@lru_cache(maxsize=None)
def parser_flags(script: str) -> frozenset[str]:
    """The option strings of every add_argument call in the script's source, and argparse's --help."""
    path = REPO / ("llmga_core/" + script + ".py" if "." not in script else "bench/" + script)
    if not path.is_file():  # a package: its command line is in cli.py
        path = REPO / "llmga_core" / script / "cli.py"
    flags = {"--help", "-h"}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                      and a.value.startswith("-")}
    assert len(flags) > 2, f"no argparse options found in {path}"
    return frozenset(flags)


def flags_after(command: str) -> list[str]:
    """The --options of a command line (the value of --comfyui-args, ComfyUI's own arguments, skipped)."""
    try:
        words = shlex.split(command.replace("…", ""))
    except ValueError:
        words = command.split()
    found, skip = [], False
    for word in words:
        if skip:
            skip = False
            continue
        if word.startswith("--"):
            name = word.split("=", 1)[0]
            found.append(name)
            skip = name == "--comfyui-args" and "=" not in word
    return found


def quoted_flags(doc: Path):
    """(where, script, flag) for every flag in a command of a checked script, and for every inline code span
    that starts with -- after the script is named in the same line or, in a table, the same cell (a benchmark
    row's options)."""
    for where, text, in_code in commands(doc):
        if in_code:
            groups = [[text.split(" #")[0]]]
        else:
            cells = re.split(r"(?<!\\)\|", text) if text.lstrip().startswith("|") else [text]
            groups = [[m[2] for m in INLINE_CODE.finditer(cell)] for cell in cells]
        for spans in groups:
            script = None
            for span in spans:
                match = SCRIPT.search(span)
                if match:
                    script = match[1] or match[2]
                    for flag in flags_after(span[match.end():]):
                        yield where, script, flag
                elif script and not in_code and span.lstrip().startswith("--"):
                    for flag in flags_after(span):
                        yield where, script, flag


def test_the_flag_check_reads_commands_as_a_shell_does():
    assert flags_after(' x.json --set a=b --comfyui-args "--lowvram --cpu" --out o/') == ["--set", "--comfyui-args",
                                                                                           "--out"]
    assert flags_after(' x --comfyui-args="--base-directory /data" --download') == ["--comfyui-args", "--download"]
    assert {"--download", "--set", "--comfyui-args"} <= parser_flags("run_workflow")
    assert "--models-dir" in parser_flags("downloads") and "--gguf" in parser_flags("export")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_quoted_flag_of_a_command_exists_in_its_parser(doc):
    unknown = [f"{where}: {script} {flag}" for where, script, flag in quoted_flags(doc)
               if flag not in parser_flags(script)]
    assert not unknown, "\n".join(unknown)


def test_the_flags_check_sees_the_commands_the_docs_quote():
    """The checks above look at something: the commands README and docs/ give are found."""
    seen = {(script, flag) for doc in DOCS for _, script, flag in quoted_flags(doc)}
    assert {("run_workflow", "--download"), ("run_workflow", "--set"), ("run_workflow", "--out"),
            ("export", "--gguf"), ("bench_mllm.py", "--dtype")} <= seen
    named = {path for doc in DOCS for _, text, _ in commands(doc) for path in repo_paths_named(text)}
    assert {"workflows/api/llmga_t2i_sd15.json", "tests/test_fault_matrix.py", ".ci/run"} <= named
