"""The language model's CPU weights on transparent huge pages (llmga_core/mllm/huge_pages.py).

The kernel is the reference for where memory lies: /proc/self/smaps says which mapping holds an address and how
much of it is on huge pages (AnonHugePages). Values are compared with copies taken before the move.
"""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from llmga_core.mllm import huge_pages, load_mllm
from llmga_core.mllm.int8_weights import Int8Linear
from tests.fixtures.tiny_mllm import RELEASED_NAMES, shared_model_root

PROMPT = "a red fox in the snow at dawn"
WHY_NOT = huge_pages.unavailable()
needs_thp = pytest.mark.skipif(WHY_NOT is not None, reason=f"no transparent huge pages here: {WHY_NOT}")


def mapping_of(address: int) -> dict:
    """The /proc/self/smaps entry whose range holds `address`: start, end, its kB fields and VmFlags."""
    with open("/proc/self/smaps") as smaps:
        text = smaps.read()
    entry = None
    for line in text.splitlines():
        words = line.split()
        if not words[0].endswith(":"):  # a mapping's first line: "start-end perms offset device inode [path]"
            start, end = (int(part, 16) for part in words[0].split("-"))
            entry = {"start": start, "end": end} if start <= address < end else None
        elif entry is not None and words[0] == "VmFlags:":
            entry["VmFlags"] = words[1:]
            return entry
        elif entry is not None and len(words) == 3 and words[2] == "kB":
            entry[words[0][:-1]] = int(words[1])
    return {}


class TiedModel(nn.Module):
    """A decoder's shape in small: an input embedding tied to the output head, an untied second embedding, a plain
    linear layer, an int8 layer, a norm and a buffer that two modules hold (as rotary tables are); 13 MB in all,
    so whole huge pages fit."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(2048, 512)
        self.positions = nn.Embedding(1024, 512)  # read one row per token and held by nothing else: stays
        self.linear = nn.Linear(512, 2048)
        self.int8 = Int8Linear(nn.Linear(512, 1024), use_cpu_kernel=False)
        self.norm = nn.LayerNorm(512)
        self.head = nn.Linear(512, 2048, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("table", torch.randn(256, 512, generator=generator))
        self.norm.register_buffer("table", self.table)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


@needs_thp
def test_weights_move_onto_huge_pages_with_their_values_objects_and_ties():
    model = TiedModel()
    before = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    parameters = dict(model.named_parameters())
    positions_address = model.positions.weight.data_ptr()

    moved = huge_pages.place(model)

    # everything but the untied embedding, each tensor on a 64-byte boundary
    expected = sum(t.numel() * t.element_size() for n, t in before.items() if n != "positions.weight")
    assert expected <= moved < expected + 64 * len(before)
    assert dict(model.named_parameters()) == parameters  # the same Parameter objects
    assert model.head.weight is model.embed.weight  # the tie is kept
    assert model.norm.table is model.table  # so is the shared buffer
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.equal(tensor, before[name]), name
    assert model.positions.weight.data_ptr() == positions_address
    # one mapping holds them all, it starts on a huge page boundary and the kernel backs it with huge pages
    region = mapping_of(model.linear.weight.data_ptr())
    for tensor in (model.embed.weight, model.int8.weight, model.int8.scale, model.norm.bias, model.table):
        assert mapping_of(tensor.data_ptr())["start"] == region["start"]
    first = min(t.data_ptr() for n, t in [*model.named_parameters(), *model.named_buffers()]
                if n != "positions.weight")
    assert first % huge_pages.HUGE_PAGE == 0
    assert "hg" in region["VmFlags"]  # advised MADV_HUGEPAGE
    assert region["AnonHugePages"] >= 4 * 1024, region  # at least two of the ~6 whole 2 MiB pages
    assert mapping_of(positions_address).get("start") != region["start"]

    # the module still computes what it computed
    x = torch.randn(3, 512)
    with torch.no_grad():
        assert torch.equal(model.linear(x), x @ before["linear.weight"].T + before["linear.bias"])


@needs_thp
def test_weights_made_under_inference_mode_stay_inference_tensors():
    """ComfyUI runs every node under torch.inference_mode, so a model its loader node made has inference tensors
    for weights: they move as inference tensors (a parameter made so cannot hold a normal tensor, and a forward
    then fails with "Inference tensors do not track version counter"); a model made outside that mode keeps
    normal tensors even when placed inside it."""
    x = torch.randn(2, 512)
    with torch.inference_mode():
        made_inside = TiedModel()
        expected = made_inside.linear(x)
        assert huge_pages.place(made_inside) > 0
        assert all(t.is_inference() for t in [*made_inside.parameters(), *made_inside.buffers()])
        assert torch.equal(made_inside.linear(x), expected)
        assert "hg" in mapping_of(made_inside.linear.weight.data_ptr())["VmFlags"]
    made_outside = TiedModel()
    with torch.inference_mode():
        assert huge_pages.place(made_outside) > 0
    assert not any(t.is_inference() for t in [*made_outside.parameters(), *made_outside.buffers()])
    made_outside.linear.weight.data.add_(0)  # an in-place update outside inference mode, as before the move
    with torch.no_grad():
        assert torch.equal(made_outside.linear(x), made_inside.linear(x))


@needs_thp
def test_placing_twice_moves_nothing_and_a_moved_model_is_placed_again():
    model = TiedModel()
    assert huge_pages.place(model) > 0
    addresses = [t.data_ptr() for t in model.parameters()]
    assert huge_pages.place(model) == 0
    assert [t.data_ptr() for t in model.parameters()] == addresses
    # the host moved a weight away and back (a new allocation): the next decode places the model again
    model.linear.weight.data = model.linear.weight.data.clone()
    assert huge_pages.place(model) > 0
    assert mapping_of(model.linear.weight.data_ptr())["start"] == mapping_of(model.embed.weight.data_ptr())["start"]


@needs_thp
def test_the_mapping_goes_when_the_weights_leave_it():
    model = TiedModel()
    huge_pages.place(model)
    start = mapping_of(model.linear.weight.data_ptr())["start"]
    for module in model.modules():  # what a move to another device does: new storage for every tensor
        for name, tensor in module._parameters.items():
            if tensor is not None:
                tensor.data = tensor.data.clone()
        for name, tensor in module._buffers.items():
            module._buffers[name] = tensor.clone()
    gc.collect()
    with open("/proc/self/maps") as maps:
        starts = {int(line.split("-")[0], 16) for line in maps}
    assert start not in starts


def test_where_the_os_offers_none_nothing_moves(monkeypatch):
    monkeypatch.setattr(huge_pages, "unavailable", lambda: "transparent huge pages are switched off")
    model = TiedModel()
    addresses = [t.data_ptr() for t in model.parameters()]
    assert huge_pages.place(model) == 0
    assert [t.data_ptr() for t in model.parameters()] == addresses


@needs_thp
@pytest.mark.parametrize("family,quantization", [("qwen2", None), ("gemma", None), ("llama3", "int8")])
def test_a_cpu_decode_places_the_language_model_and_keeps_its_tokens(family, quantization):
    """The first CPU generate moves the language model (not the vision tower); the tokens are those of the same
    model with its weights left where the loader put them, for the compiled step and the dynamic loop."""
    folder = shared_model_root() / RELEASED_NAMES[family]
    loads = {"quantization": quantization} if quantization else {}
    kept, placed = load_mllm(folder, **loads), load_mllm(folder, **loads)
    kept.huge_pages = False
    kept_addresses = [t.data_ptr() for t in kept.model.parameters()]
    for decoder in ("dynamic", "auto"):
        kept.decoder = placed.decoder = decoder
        for task in ("chat", "text-to-image"):
            expected = kept.generate(PROMPT, task=task, max_new_tokens=12).token_ids
            assert placed.generate(PROMPT, task=task, max_new_tokens=12).token_ids == expected
    lm = placed.model.language_model
    moved = [t for m in lm.modules() if not isinstance(m, nn.Embedding)
             for t in [*m._parameters.values(), *m._buffers.values()] if t is not None and t.numel()]
    region = mapping_of(moved[0].data_ptr())
    assert "hg" in region["VmFlags"]
    assert all(region["start"] <= t.data_ptr() < region["end"] for t in moved)
    tower = next(placed.model.vision_tower.parameters()) if hasattr(placed.model, "vision_tower") else None
    if tower is not None:
        assert not region["start"] <= tower.data_ptr() < region["end"]
    assert [t.data_ptr() for t in kept.model.parameters()] == kept_addresses  # huge_pages = False: left alone


@needs_thp
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_a_model_loaded_and_run_under_inference_mode_as_comfyui_does(quantization):
    """ComfyUI's nodes run under torch.inference_mode: the load, the placement at the first decode and every later
    request there, with the tokens of the same model left on its loader's pages."""
    folder = shared_model_root() / RELEASED_NAMES["qwen2"]
    loads = {"quantization": quantization} if quantization else {}
    kept = load_mllm(folder, **loads)
    kept.huge_pages = False
    expected = kept.generate(PROMPT, task="text-to-image", max_new_tokens=10).token_ids
    with torch.inference_mode():
        placed = load_mllm(folder, **loads)
        for _ in range(2):
            assert placed.generate(PROMPT, task="text-to-image", max_new_tokens=10).token_ids == expected
    head = placed.model.language_model.get_output_embeddings().weight
    assert "hg" in mapping_of(head.data_ptr())["VmFlags"]
