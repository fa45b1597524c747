"""Independent references that run outside the pack's environment."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class OriginalTokenizers:
    """A client of tokenizers_441.py running in the transformers 4.41 side venv (one process per session)."""

    def __init__(self):
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        venv = Path(os.environ.get("LLMGA_TOKENIZER_ORACLE_VENV") or cache / "llmga-comfyui" / "venv-tok441")
        python = venv / "bin" / "python"
        if not python.is_file():
            raise RuntimeError(f"The transformers 4.41 tokenizer oracle venv is missing ({venv}); run "
                               f"`bash .ci/setup_env.sh` to build it.")
        self.proc = subprocess.Popen([str(python), str(Path(__file__).with_name("tokenizers_441.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8")

    def ask(self, folder: Path, use_fast: bool, encode=(), decode=(), variants=None) -> dict:
        request = {"folder": str(folder), "use_fast": use_fast, "encode": list(encode),
                   "decode": [list(ids) for ids in decode]}
        if variants is not None:
            request["variants"] = list(variants)
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(f"transformers 4.41 failed on {folder}: {reply['error']}")
        assert reply["transformers"] == "4.41.2"
        return reply

    @staticmethod
    def use_fast(folder: Path) -> bool:
        """builder.py: use_fast=False except for names with mistral, gemma, qwen2 or phi-3 (lowercased)."""
        name = Path(folder).name.lower()
        return any(key in name for key in ("mistral", "gemma", "qwen2", "phi-3"))

    def encode(self, folder: Path, text: str) -> list[int]:
        return self.ask(folder, self.use_fast(folder), encode=[text])["encode"][0]

    def decode(self, folder: Path, ids) -> str:
        return self.ask(folder, self.use_fast(folder), decode=[ids])["decode"][0]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)
