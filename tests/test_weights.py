"""llmga_core.weights: the one reader of configs, shard indexes, safetensors and pickles, and its errors.

Expected values are written out here (tensors saved with torch.save / safetensors, JSON by hand); the
error sentences are the vocabulary every model kind (MLLM, SD folders, DiffRIR) reports.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from llmga_core.weights import (MissingShardError, WeightFileError, check_weight_file, iter_weights, load_pickle,
                                load_weights, read_json, shard_files, tensor_shape)
from tests.fixtures.unsafe_pickle import CreatesAFile


def _message(exc_info) -> str:
    return str(exc_info.value)


def test_read_json(tmp_path):
    good = tmp_path / "config.json"
    good.write_text('{"hidden_size": 32}')
    assert read_json(good) == {"hidden_size": 32}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(WeightFileError) as e:
        read_json(bad)
    assert _message(e).startswith(f"{bad} is not valid JSON (") and _message(e).endswith("); download it again.")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(WeightFileError) as e:
        read_json(listed)
    assert _message(e) == f"{listed} does not hold a JSON object; download it again."
    with pytest.raises(WeightFileError, match="is not valid JSON"):
        read_json(tmp_path / "missing.json")


def _index(folder, weight_map):
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def test_shards_in_first_use_order_and_names_that_leave_the_folder_are_refused(tmp_path):
    for name in ("b.safetensors", "a.safetensors"):
        save_file({"x": torch.zeros(1)}, tmp_path / name)
    index = _index(tmp_path, {"w1": "b.safetensors", "w2": "a.safetensors", "w3": "b.safetensors"})
    assert shard_files(index) == (tmp_path / "b.safetensors", tmp_path / "a.safetensors")
    (tmp_path.parent / "outside.safetensors").write_bytes(b"")
    for name in ("../outside.safetensors", "sub/a.safetensors", str(tmp_path / "a.safetensors"), ".."):
        index = _index(tmp_path, {"w": name})
        with pytest.raises(WeightFileError) as e:
            shard_files(index)
        assert _message(e) == f"{index} names a shard outside its folder ({name!r}); download it again."
    index = _index(tmp_path, {})
    with pytest.raises(WeightFileError) as e:
        shard_files(index)
    assert _message(e) == f"{index} has no weight_map; download it again."


def test_missing_shard_is_also_a_file_not_found_error(tmp_path):
    index = _index(tmp_path, {"w": "gone.safetensors"})
    with pytest.raises(MissingShardError) as e:
        shard_files(index)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    assert _message(e) == f"Shard gone.safetensors listed in {index} is missing; download it again."


def test_safetensors_and_pickles_read_the_same_tensors(tmp_path):
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.bin")
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    assert check_weight_file(tmp_path / "w.safetensors") == ["a", "b"]
    assert tensor_shape(tmp_path / "w.safetensors", "a") == [2, 3]
    assert tensor_shape(tmp_path / "w.safetensors", "c") is None and tensor_shape(tmp_path / "w.bin", "a") is None
    for name in ("w.safetensors", "w.bin", "wrapped.pth", "legacy.bin"):
        if not name.endswith("safetensors"):
            assert check_weight_file(tmp_path / name) is None
        loaded = load_weights(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state), name
    assert dict(iter_weights(tmp_path / "w.safetensors")).keys() == {"a", "b"}
    save_file({"c": torch.ones(1)}, tmp_path / "second.safetensors")
    assert load_weights([tmp_path / "w.safetensors", tmp_path / "second.safetensors"]).keys() == {"a", "b", "c"}


def test_corrupt_files_are_named(tmp_path):
    save_file({"a": torch.zeros(100)}, tmp_path / "w.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "w.safetensors").read_bytes()[:40])
    torch.save({"a": torch.zeros(100)}, tmp_path / "w.bin")
    cut_bin = tmp_path / "cut.bin"
    cut_bin.write_bytes((tmp_path / "w.bin").read_bytes()[:-200])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    for path, kind in ((cut, "safetensors"), (cut_bin, "PyTorch"), (garbage, "PyTorch")):
        expected = f"{path} is corrupt or incomplete (not a readable {kind} file); download it again."
        for read in (check_weight_file, load_weights):
            with pytest.raises(WeightFileError) as e:
                read(path)
            assert _message(e) == expected, (path, read)
    not_tensors = tmp_path / "numbers.bin"
    torch.save({"a": 1}, not_tensors)
    with pytest.raises(WeightFileError) as e:
        load_weights(not_tensors)
    assert _message(e) == f"{not_tensors} does not hold a state dict of tensors; download it again."


def test_a_pickle_with_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.bin"
    torch.save({"a": torch.zeros(1), "hook": CreatesAFile(marker)}, path)
    for read in (load_pickle, load_weights):
        with pytest.raises(WeightFileError) as e:
            read(path)
        assert _message(e) == (f"{path} holds pickled objects other than tensors (io.open), so it was refused and "
                               f"nothing in it was run; use the model's .safetensors files or download it again "
                               f"from its release.")
    assert not marker.exists()
