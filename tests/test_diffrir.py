"""DiffRIR: strict loading of the released layout, fidelity, exact tiling, errors, and the nodes.

Tiny seeded weights in the released file layout come from tests/fixtures/tiny_diffrir.py. The
fidelity reference below is written from the original (DiffRIR: DiffRIR/archs/S2_arch.py and
inference_diffrir.py), module by module on the
state dict with plain torch ops, independently of llmga_core.diffrir.
"""
from __future__ import annotations

import importlib
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from llmga_core.diffrir import DiffRIRConfig, DiffRIRS2, load_diffrir, restore
from tests.fixtures.tiny_diffrir import diffrir_state_dict, make_diffrir_weights
from tests.fixtures.unsafe_pickle import CreatesAFile

PRIOR = 32  # 4 · prior_feats of the tiny fixture
HINT = "use a DiffRIR x1/x2/x4 .pth or .safetensors file."


# ----------------------------------------------------------------------------- helpers


def reference_forward(sd, scale, generated, reference, mask, z):
    """DiffRIR's inference as DiffRIR: inference_diffrir.py runs it, on the whole image."""
    conv_w = {k[:-len(".weight")]: v for k, v in sd.items() if k.endswith(".weight")}

    def conv(t, key, groups=1):
        w = conv_w[key]
        return F.conv2d(t, w, sd.get(key + ".bias"), padding=w.shape[-1] // 2, groups=groups)

    def linear(t, key):
        return F.linear(t, sd[key + ".weight"], sd.get(key + ".bias"))

    def lrelu(t):
        return F.leaky_relu(t, 0.1)

    def count(prefix, suffix, start=0):
        n = start
        while f"{prefix}.{n}{suffix}" in sd:
            n += 1
        return n - start

    m = (mask >= 0.5).float()
    kept = (1 - m) * reference  # §3.4: the reference with the hole zeroed, no mask channel
    x = torch.cat([generated, kept if scale == 1 else F.pixel_unshuffle(kept, scale)], 1)
    multiple = {1: 32, 2: 16, 4: 8}[scale]
    x = F.pad(x, (0, (-x.shape[-1]) % multiple, 0, (-x.shape[-2]) % multiple), mode="reflect")
    feat = x if scale == 4 else F.pixel_unshuffle(x, 4 // scale)

    # §2.2 CPEN: convs, ResBlocks, mean over every pixel, MLP
    e = lrelu(conv(feat, "condition.E.0"))
    n_res = count("condition.E", ".body.0.weight", start=2)
    for i in range(2, 2 + n_res):
        e = conv(lrelu(conv(e, f"condition.E.{i}.body.0")), f"condition.E.{i}.body.2") + e
    for i in (2 + n_res, 4 + n_res, 6 + n_res):
        e = lrelu(conv(e, f"condition.E.{i}"))
    c = lrelu(linear(lrelu(linear(e.mean(dim=(2, 3)), "condition.mlp.0")), "condition.mlp.2"))

    # §2.3 the prior's diffusion: x0-prediction, deterministic posterior means from z
    steps = sd["diffusion.betas"].shape[0]
    k_v = z
    for t in reversed(range(steps)):
        h = lrelu(linear(torch.cat([c, torch.full((z.shape[0], 1), t / (10 * steps)), k_v], 1), "denoise.resmlp.0"))
        for i in range(2, 2 + count("denoise.resmlp", ".resmlp.0.weight", start=2)):
            h = lrelu(linear(h, f"denoise.resmlp.{i}.resmlp.0"))
        k_v = sd["diffusion.posterior_mean_coef1"][t] * h + sd["diffusion.posterior_mean_coef2"][t] * k_v

    # §2.4 DIRformer
    def block(x, key):
        b, ch, hh, ww = x.shape

        def norm(t, k):
            return t / torch.sqrt(t.var(dim=1, keepdim=True, unbiased=False) + 1e-5) * sd[k].view(1, -1, 1, 1)

        def modulate(t, k):
            sb = k_v @ sd[k].T
            return t * sb[:, :ch, None, None] + sb[:, ch:, None, None]

        heads = sd[f"{key}.attn.temperature"].shape[0]
        y = modulate(norm(x, f"{key}.norm1.body.weight"), f"{key}.attn.kernel.0.weight")
        q, k, v = conv(conv(y, f"{key}.attn.qkv"), f"{key}.attn.qkv_dwconv", groups=3 * ch).chunk(3, 1)
        q, k, v = (t.reshape(b, heads, ch // heads, hh * ww) for t in (q, k, v))
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a = torch.softmax(sd[f"{key}.attn.temperature"] * (q @ k.transpose(-1, -2)), dim=-1)
        x = x + conv((a @ v).reshape(b, ch, hh, ww), f"{key}.attn.project_out")
        y = modulate(norm(x, f"{key}.norm2.body.weight"), f"{key}.ffn.kernel.0.weight")
        u = conv(y, f"{key}.ffn.project_in")
        u1, u2 = conv(u, f"{key}.ffn.dwconv", groups=u.shape[1]).chunk(2, 1)
        return x + conv(F.gelu(u1) * u2, f"{key}.ffn.project_out")

    def stage(x, prefix):
        for i in range(count(prefix, ".norm1.body.weight")):
            x = block(x, f"{prefix}.{i}")
        return x

    e1 = stage(conv(feat, "G.patch_embed.proj"), "G.encoder_level1")
    e2 = stage(F.pixel_unshuffle(conv(e1, "G.down1_2.body.0"), 2), "G.encoder_level2")
    e3 = stage(F.pixel_unshuffle(conv(e2, "G.down2_3.body.0"), 2), "G.encoder_level3")
    lat = stage(F.pixel_unshuffle(conv(e3, "G.down3_4.body.0"), 2), "G.latent")
    d3 = stage(conv(torch.cat([F.pixel_shuffle(conv(lat, "G.up4_3.body.0"), 2), e3], 1), "G.reduce_chan_level3"),
               "G.decoder_level3")
    d2 = stage(conv(torch.cat([F.pixel_shuffle(conv(d3, "G.up3_2.body.0"), 2), e2], 1), "G.reduce_chan_level2"),
               "G.decoder_level2")
    d1 = stage(torch.cat([F.pixel_shuffle(conv(d2, "G.up2_1.body.0"), 2), e1], 1), "G.decoder_level1")
    r = stage(d1, "G.refinement")
    t = conv(F.pixel_shuffle(conv(F.pixel_shuffle(conv(r, "G.tail.0.0"), 2), "G.tail.0.2"), 2), "G.tail.1")
    sr = t + x[:, :3].repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    sr = sr[..., :reference.shape[-2], :reference.shape[-1]]
    return (sr * m + (1 - m) * reference).clamp(0, 1)  # §3.7–8: composite, then clamp


def images(scale, height, width, batch=1, seed=0):
    """Random generated image (at 1/scale), reference and a mask with two holes crossing tiles."""
    g = torch.Generator().manual_seed(seed)
    reference = torch.rand(batch, 3, height, width, generator=g)
    generated = torch.rand(batch, 3, height // scale, width // scale, generator=g)
    mask = torch.zeros(batch, 1, height, width)
    mask[:, :, height // 5: height // 5 + 37, width // 4: width - 9] = 1.0
    mask[:, :, height - 21:, 3:30] = 0.8  # an outpainting-like strip at the border, soft values ≥ 0.5
    mask[:, :, 5:9, 5:9] = 0.3  # below the threshold: preserved
    return generated, reference, mask


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffrir")
    return {scale: make_diffrir_weights(folder / f"tiny_x{scale}.pth", scale) for scale in (1, 2, 4)}


@pytest.fixture(scope="module")
def nets(weights):
    return {scale: load_diffrir(path) for scale, path in weights.items()}


def state_of(path):
    return torch.load(path, weights_only=True)["params_ema"]


# ----------------------------------------------------------------------------- structure and loading


@pytest.mark.parametrize("scale,params", [(1, 25_078_342), (2, 25_036_870), (4, 25_026_502)])
def test_released_configuration_has_the_released_sizes(scale, params):
    with torch.device("meta"):
        net = DiffRIRS2(DiffRIRConfig(scale=scale))
    state = net.state_dict()
    assert len(state) == 615
    assert sum(p.numel() for p in net.parameters()) == params
    assert sum(p.numel() for p in net.denoise.parameters()) == 197_376
    assert state["G.patch_embed.proj.weight"].shape[1] == {1: 96, 2: 60, 4: 51}[scale]
    assert net.G.encoder_level1[0].ffn.project_out.in_channels == 140
    assert net.G.latent[0].ffn.project_out.in_channels == 1126


def test_fixture_writes_the_released_key_names():
    with torch.device("meta"):
        released = DiffRIRS2(DiffRIRConfig(scale=2)).state_dict()
    tiny = diffrir_state_dict(2)
    assert set(tiny) == set(released) and len(tiny) == 615


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("scale", [1, 2, 4])
def test_loads_each_scale_and_format_strictly(tmp_path, scale, fmt):
    path = make_diffrir_weights(tmp_path / f"w.{fmt}", scale, fmt=fmt, seed=3)
    net = load_diffrir(path)
    assert net.scale == scale and not net.training
    assert net.config.dim == 8 and net.config.num_blocks == (13, 1, 1, 1)
    assert net.config.num_refinement_blocks == 13 and net.config.heads == (1, 2, 4, 8)
    assert net.config.ffn_hidden == (17, 35, 70, 140) and net.config.prior_feats == 8
    expected = diffrir_state_dict(scale, seed=3)
    got = net.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_params_is_used_only_without_params_ema(tmp_path, caplog):
    path = make_diffrir_weights(tmp_path / "p.pth", 1, key="params", seed=5)
    with caplog.at_level(logging.WARNING, logger="llmga"):
        net = load_diffrir(path)
    assert "p.pth has no 'params_ema'" in caplog.text and "using its 'params'" in caplog.text
    assert torch.equal(net.state_dict()["G.tail.1.weight"], diffrir_state_dict(1, seed=5)["G.tail.1.weight"])

    both = make_diffrir_weights(tmp_path / "both.pth", 1, key="both", seed=5)
    net = load_diffrir(both)  # its `params` are other weights, so equality below shows params_ema was used
    assert torch.equal(net.state_dict()["G.tail.1.weight"], diffrir_state_dict(1, seed=5)["G.tail.1.weight"])


def _edit(sd, edit):
    sd = dict(sd)
    edit(sd)
    return sd


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("G.refinement.3.ffn.dwconv.weight"),
     "bad.pth is not DiffRIR weights: it lacks 'G.refinement.3.ffn.dwconv.weight' (1 of the 615 expected keys "
     "missing); " + HINT),
    (lambda sd: sd.pop("diffusion.model.resmlp.0.weight"),
     "bad.pth is not DiffRIR weights: it lacks 'diffusion.model.resmlp.0.weight' (1 of the 615 expected keys "
     "missing); " + HINT),
    (lambda sd: sd.pop("diffusion.posterior_mean_coef2"),
     "bad.pth is not DiffRIR weights: it lacks 'diffusion.posterior_mean_coef2' (1 of the 615 expected keys "
     "missing); " + HINT),
    (lambda sd: sd.update({"G.extra.weight": torch.zeros(3)}),
     "bad.pth is not DiffRIR weights: it has the unexpected key 'G.extra.weight' (1 unexpected in all); " + HINT),
    (lambda sd: sd.update({"G.encoder_level1.0.attn.qkv.weight": torch.zeros(24, 9, 1, 1)}),
     "bad.pth does not match the DiffRIR architecture: 'G.encoder_level1.0.attn.qkv.weight' has shape "
     "(24, 9, 1, 1) where (24, 8, 1, 1) is expected; " + HINT),
    (lambda sd: sd.update({"condition.E.0.weight": torch.zeros(8, 60, 3, 3),
                           "diffusion.condition.E.0.weight": torch.zeros(8, 60, 3, 3)}),
     "bad.pth does not match the DiffRIR architecture: 'condition.E.0.weight' has shape (8, 60, 3, 3) where "
     "(8, 96, 3, 3) is expected; " + HINT),
    (lambda sd: sd.update({"G.patch_embed.proj.weight": torch.zeros(8, 7, 3, 3)}),
     "bad.pth is not DiffRIR weights: 'G.patch_embed.proj.weight' has shape (8, 7, 3, 3), while DiffRIR's first "
     "convolution takes 96 (x1), 60 (x2) or 51 (x4) channels; " + HINT),
    (lambda sd: sd.update({"diffusion.condition.mlp.0.bias": sd["condition.mlp.0.bias"] + 1}),
     "bad.pth is inconsistent: 'diffusion.condition.mlp.0.bias' differs from 'condition.mlp.0.bias', which the "
     "DiffRIR network shares; the file is damaged or not DiffRIR weights."),
    (lambda sd: sd.update({"diffusion.betas": sd["diffusion.betas"] * 1.01}),
     "bad.pth has a 'diffusion.betas' that differs from DiffRIR's linear 0.1–0.99 schedule over 4 steps; the "
     "file is damaged or not DiffRIR weights."),
])
def test_load_names_the_first_problem(tmp_path, edit, message):
    path = tmp_path / "bad.pth"
    torch.save({"params_ema": _edit(diffrir_state_dict(1), edit)}, path)
    with pytest.raises(ValueError) as error:
        load_diffrir(path)
    assert str(error.value) == message


def test_load_refuses_files_that_are_not_diffrir(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"params_ema": {"conv_first.weight": torch.zeros(64, 3, 3, 3)}}, other)
    with pytest.raises(ValueError, match=r"^other\.pth is not DiffRIR weights: it lacks "
                                         r"'G\.patch_embed\.proj\.weight'; use a DiffRIR"):
        load_diffrir(other)
    odd = tmp_path / "odd.pth"
    torch.save({"step": 3}, odd)
    with pytest.raises(ValueError) as error:
        load_diffrir(odd)
    assert str(error.value) == ("odd.pth holds no DiffRIR state dict (no 'params_ema' or 'params' entry and no "
                                "flat dict of tensors); " + HINT)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(ValueError) as error:
        load_diffrir(garbage)
    assert str(error.value) == (f"{garbage} is corrupt or incomplete (not a readable PyTorch file); "
                                "download it again.")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError) as error:
        load_diffrir(broken)
    assert str(error.value) == (f"{broken} is corrupt or incomplete (not a readable safetensors file); "
                                "download it again.")
    with pytest.raises(FileNotFoundError, match="DiffRIR weights not found"):
        load_diffrir(tmp_path / "missing.pth")


def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned.txt"
    sd = diffrir_state_dict(1)
    sd["G.patch_embed.proj.weight"] = CreatesAFile(marker)
    path = tmp_path / "evil.pth"
    torch.save({"params_ema": sd}, path)
    assert not marker.exists()
    with pytest.raises(ValueError) as error:
        load_diffrir(path)
    assert not marker.exists()
    assert str(error.value) == (f"{path} holds pickled objects other than tensors (io.open), so it was refused "
                                "and nothing in it was run; use the model's .safetensors files or download it "
                                "again from its release.")


# ----------------------------------------------------------------------------- fidelity and tiling


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_restore_matches_the_reference_forward(nets, weights, scale):
    sd = state_of(weights[scale])
    generated, reference, mask = images(scale, 76, 104, batch=2, seed=scale)
    z = torch.randn(2, PRIOR, generator=torch.Generator().manual_seed(9))
    expected = reference_forward(sd, scale, generated, reference, mask, z)
    got = restore(nets[scale], generated, reference, mask, noise=z)
    assert got.shape == (2, 3, 76, 104)
    assert (got - expected).abs().max().item() < 1e-4
    # the comparison is sensitive: the prior (from z) and the network visibly move the hole
    other = reference_forward(sd, scale, generated, reference, mask, z.flip(0))
    assert (other - expected).abs().max().item() > 1e-3
    hole = (mask >= 0.5).expand_as(expected)
    upsampled = generated.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    assert (expected - upsampled.clamp(0, 1))[hole].abs().mean().item() > 1e-2


@pytest.mark.parametrize("scale,height,width", [(1, 80, 120), (2, 84, 116), (4, 92, 100)])
@pytest.mark.parametrize("tile_size", [32, 64])
def test_tiled_equals_whole_image(nets, scale, height, width, tile_size):
    generated, reference, mask = images(scale, height, width, batch=2, seed=tile_size)
    z = torch.randn(2, PRIOR, generator=torch.Generator().manual_seed(1))
    for composite in (True, False):
        whole = restore(nets[scale], generated, reference, mask, noise=z, composite=composite)
        tiled = restore(nets[scale], generated, reference, mask, noise=z, tile_size=tile_size, composite=composite)
        assert (tiled - whole).abs().max().item() < 1e-4


def test_tile_size_is_rounded_down_to_32(nets):
    generated, reference, mask = images(1, 72, 72)
    a = restore(nets[1], generated, reference, mask, tile_size=63)
    b = restore(nets[1], generated, reference, mask, tile_size=32)
    assert torch.equal(a, b)


@pytest.mark.parametrize("tile_size", [None, 32])
@pytest.mark.parametrize("scale", [1, 4])
def test_preserved_pixels_come_back_bit_identical(nets, scale, tile_size):
    generated, reference, mask = images(scale, 64, 96, batch=2)
    reference[:, :, :2] = torch.tensor([0.1234567, 1e-8, 0.9999999]).view(1, 3, 1, 1)
    out = restore(nets[scale], generated, reference, mask, tile_size=tile_size)
    kept = (mask < 0.5).expand_as(reference)
    assert torch.equal(out[kept], reference[kept])
    assert not torch.equal(out[~kept], reference[~kept])
    assert out.min() >= 0 and out.max() <= 1


def test_mask_is_binarised_at_one_half(nets):
    generated, reference, mask = images(1, 64, 64)
    soft = mask.clone()
    soft[mask >= 0.5] = 0.5
    soft[(mask > 0) & (mask < 0.5)] = 0.4999
    binary = (mask >= 0.5).float()
    assert torch.equal(restore(nets[1], generated, reference, soft), restore(nets[1], generated, reference, binary))


def test_seed_draws_what_the_original_draws_first(nets):
    generated, reference, mask = images(2, 64, 64, batch=2)
    torch.manual_seed(1234)
    z = torch.randn(2, PRIOR)  # the original's first draw after torch.manual_seed on the CPU
    seeded = restore(nets[2], generated, reference, mask, seed=1234)
    assert torch.equal(seeded, restore(nets[2], generated, reference, mask, noise=z))
    assert not torch.equal(seeded, restore(nets[2], generated, reference, mask, seed=1235))


@pytest.mark.parametrize("tile_size", [None, 32])
def test_empty_and_full_masks(nets, weights, tile_size):
    generated, reference, _ = images(1, 64, 96, batch=2)
    empty = torch.zeros(2, 1, 64, 96)
    calls = []
    out = restore(nets[1], generated, reference, empty, tile_size=tile_size, progress=lambda d, t: calls.append((d, t)))
    assert torch.equal(out, reference)
    assert calls[-1][0] == calls[-1][1]

    full = torch.ones(2, 1, 64, 96)
    z = torch.randn(2, PRIOR, generator=torch.Generator().manual_seed(2))
    out = restore(nets[1], generated, reference, full, noise=z, tile_size=tile_size)
    expected = reference_forward(state_of(weights[1]), 1, generated, reference, full, z)
    assert (out - expected).abs().max().item() < 1e-4
    # the network saw no reference pixel: another reference gives the same result
    again = restore(nets[1], generated, torch.rand_like(reference), full, noise=z, tile_size=tile_size)
    assert torch.equal(out, again)


@pytest.mark.parametrize("tile_size", [None, 32])
def test_progress_counts_every_step_and_its_exceptions_propagate(nets, tile_size):
    generated, reference, mask = images(2, 64, 96, batch=2)
    calls = []
    restore(nets[2], generated, reference, mask, tile_size=tile_size, progress=lambda d, t: calls.append((d, t)))
    total = calls[0][1]
    assert [d for d, _ in calls] == list(range(1, total + 1)) and {t for _, t in calls} == {total}
    assert total == 2 if tile_size is None else total > 100

    class Interrupted(Exception):
        pass

    def interrupt(done, total):
        if done == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        restore(nets[2], generated, reference, mask, tile_size=32, progress=interrupt)


def _bad(gen_shape, ref_shape, mask_shape):
    return torch.rand(gen_shape), torch.rand(ref_shape), torch.ones(mask_shape)


@pytest.mark.parametrize("scale,args,kwargs,message", [
    (1, _bad((3, 40, 56), (1, 3, 40, 56), (1, 1, 40, 56)), {},
     "The generated image must be a B×3×h×w tensor; got (3, 40, 56)."),
    (1, _bad((1, 4, 40, 56), (1, 3, 40, 56), (1, 1, 40, 56)), {},
     "The generated image and the reference must have 3 (RGB) channels; got 4 and 3."),
    (1, _bad((1, 3, 40, 56), (1, 3, 40, 56), (1, 2, 40, 56)), {},
     "The mask must have 1 channel (or 3, one per colour); got 2."),
    (1, _bad((2, 3, 40, 56), (3, 3, 40, 56), (2, 1, 40, 56)), {},
     "The batch sizes differ: 2 generated image(s), 3 reference(s) and 2 mask(s); give one of each or the same "
     "number of each (one reference or mask serves every image)."),
    (2, _bad((1, 3, 40, 56), (1, 3, 81, 112), (1, 1, 81, 112)), {},
     "The reference is 112×81 pixels, which this x2 DiffRIR model cannot use: its width and height must be "
     "multiples of 2; crop or resize it."),
    (2, _bad((1, 3, 80, 112), (1, 3, 80, 112), (1, 1, 80, 112)), {},
     "The generated image is 112×80 pixels but this x2 DiffRIR model needs 56×40 (the 112×80 reference divided "
     "by 2)."),
    (1, _bad((1, 3, 40, 56), (1, 3, 80, 112), (1, 1, 80, 112)), {},
     "The generated image is 56×40 pixels but this x1 DiffRIR model needs 112×80 (the reference's size)."),
    (1, _bad((1, 3, 80, 112), (1, 3, 80, 112), (1, 1, 80, 100)), {},
     "The mask is 100×80 pixels but the reference is 112×80; give a mask of the reference's size."),
    (1, _bad((1, 3, 16, 40), (1, 3, 16, 40), (1, 1, 16, 40)), {},
     "The reference is 40×16 pixels, too small for DiffRIR's reflect padding; a x1 model needs at least 17 "
     "pixels on each side."),
    (4, _bad((1, 3, 4, 10), (1, 3, 16, 40), (1, 1, 16, 40)), {},
     "The reference is 40×16 pixels, too small for DiffRIR's reflect padding; a x4 model needs at least 20 "
     "pixels on each side."),
    (1, _bad((1, 3, 40, 56), (1, 3, 40, 56), (1, 1, 40, 56)), {"noise": torch.zeros(1, 256)},
     "noise must have shape (1, 32), one 32-value starting point of the prior diffusion per image; got (1, 256)."),
    (1, _bad((1, 3, 40, 56), (1, 3, 40, 56), (1, 1, 40, 56)), {"tile_size": 16},
     "tile_size must be 0 (the whole image at once; None too in Python) or at least 32 pixels; got 16."),
])
def test_bad_inputs_get_one_clear_sentence(nets, scale, args, kwargs, message):
    with pytest.raises(ValueError) as error:
        restore(nets[scale], *args, **kwargs)
    assert str(error.value) == message


@pytest.mark.parametrize("scale,side", [(1, 17), (2, 18), (4, 20)])
def test_smallest_accepted_size_runs(nets, scale, side):
    generated, reference, mask = images(scale, side, side)
    mask[:] = 1
    assert restore(nets[scale], generated, reference, mask, tile_size=32).shape == (1, 3, side, side)


# ----------------------------------------------------------------------------- nodes


@pytest.fixture(scope="module")
def node_module(comfy_inprocess):
    """nodes/diffrir.py imported as the host imports the pack (by path, relative imports).

    While other capabilities of the pack are still missing, the package __init__ cannot run;
    then the nodes subpackage is set up bare and only this node file is imported from it.
    """
    from tests.host import PACK_MODULE, REPO, import_pack_inprocess

    try:
        import_pack_inprocess()
    except ImportError:
        nodes_pkg = types.ModuleType(PACK_MODULE + ".nodes")
        nodes_pkg.__path__ = [str(REPO / "nodes")]
        sys.modules[PACK_MODULE + ".nodes"] = nodes_pkg
    return importlib.import_module(PACK_MODULE + ".nodes.diffrir")


@pytest.fixture(scope="module")
def model_folder(comfy_inprocess, node_module, tmp_path_factory):
    """A models/diffrir root (added the way extra_model_paths.yaml adds one) with tiny weights."""
    folder = tmp_path_factory.mktemp("models_diffrir")
    make_diffrir_weights(folder / "tiny_x1.pth", 1)
    make_diffrir_weights(folder / "tiny_x2.safetensors", 2, fmt="safetensors")
    (folder / "README.txt").write_text("where the DiffRIR weights came from")  # what users keep beside them
    comfy_inprocess.add_model_folder_path("diffrir", str(folder))
    return folder


def test_node_schemas(node_module):
    loader = node_module.DiffRIRLoader.define_schema()
    restorer = node_module.DiffRIRRestore.define_schema()
    assert [n.define_schema().node_id for n in node_module.NODES] == ["DiffRIRLoader", "DiffRIRRestore"]
    assert loader.category == restorer.category == "LLMGA/restoration"
    assert [i.id for i in loader.inputs] == ["model_name"]
    assert [i.id for i in restorer.inputs] == ["diffrir_model", "image", "reference", "mask", "seed", "tile_size"]
    assert loader.outputs[0].io_type == "DIFFRIR_MODEL" == restorer.inputs[0].io_type
    assert restorer.outputs[0].io_type == "IMAGE"
    assert all(i.tooltip for i in restorer.inputs[1:])


def test_loader_and_restore_nodes(comfy_inprocess, node_module, model_folder):
    options = node_module.DiffRIRLoader.define_schema().inputs[0].options
    assert "tiny_x1.pth" in options and "tiny_x2.safetensors" in options
    assert "README.txt" not in options  # only weight files are offered
    net = node_module.DiffRIRLoader.execute("tiny_x1.pth").result[0]
    assert net.scale == 1 and not net.training

    generated, reference, mask = images(1, 64, 96, batch=2)
    image = generated.movedim(1, -1)
    out = node_module.DiffRIRRestore.execute(net, image, reference.movedim(1, -1), mask[:, 0], seed=7, tile_size=32)
    expected = restore(net, generated, reference, mask, seed=7)
    assert out.ui is None
    assert out.result[0].shape == (2, 64, 96, 3)
    assert (out.result[0] - expected.movedim(1, -1)).abs().max().item() < 1e-4

    # one reference and one H×W mask broadcast to the batch
    single = node_module.DiffRIRRestore.execute(net, image, reference[:1].movedim(1, -1), mask[0, 0], seed=7,
                                                tile_size=0)
    expected = restore(net, generated, reference[:1].expand(2, -1, -1, -1), mask[:1].expand(2, -1, -1, -1), seed=7)
    assert torch.equal(single.result[0], expected.movedim(1, -1))


def test_restore_node_with_an_empty_mask_returns_the_reference_and_says_so(comfy_inprocess, node_module,
                                                                          model_folder, weights):
    net1 = node_module.DiffRIRLoader.execute("tiny_x1.pth").result[0]
    generated, reference, mask = images(1, 64, 96, batch=2)
    mask[1] = 0.3  # the second image has nothing regenerated (every value below 0.5)
    assert not torch.equal(generated[1], reference[1])  # so returning the generated image would fail
    out = node_module.DiffRIRRestore.execute(net1, generated.movedim(1, -1), reference.movedim(1, -1), mask[:, 0],
                                             seed=0, tile_size=512)
    result = out.result[0].movedim(-1, 1)
    assert torch.equal(result[1], reference[1])
    # the plain forward of the original composites (mask < 0.5 keeps the reference): the same image
    z = torch.randn(2, PRIOR, generator=torch.Generator().manual_seed(0))
    expected = reference_forward(state_of(weights[1]), 1, generated, reference, mask, z)
    assert torch.equal(expected[1], reference[1])
    assert (result[0] - expected[0]).abs().max().item() < 1e-4
    assert out.ui.as_dict() == {"text": ("DiffRIR: the mask of image 2 is empty, so nothing was restored there; "
                                         "it is returned as the reference.",)}

    # every mask empty: the references come back and the network never runs
    calls = []
    hook = net1.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        out = node_module.DiffRIRRestore.execute(net1, generated.movedim(1, -1), reference.movedim(1, -1),
                                                 torch.zeros(64, 96), seed=0, tile_size=0)
    finally:
        hook.remove()
    assert torch.equal(out.result[0], reference.movedim(1, -1)) and calls == []
    assert out.ui.as_dict()["text"] == ("DiffRIR: the masks of images 1, 2 are empty, so nothing was restored "
                                        "there; they are returned as the references.",)

    net2 = node_module.DiffRIRLoader.execute("tiny_x2.safetensors").result[0]
    generated, reference, _ = images(2, 64, 96)
    out = node_module.DiffRIRRestore.execute(net2, generated.movedim(1, -1), reference.movedim(1, -1),
                                             torch.zeros(64, 96), seed=0, tile_size=0)
    assert torch.equal(out.result[0], reference.movedim(1, -1))
    assert out.ui.as_dict()["text"] == ("DiffRIR: the mask of image 1 is empty, so nothing was restored there; "
                                        "it is returned as the reference.",)


def test_restore_node_errors_before_work(comfy_inprocess, node_module, model_folder):
    net = node_module.DiffRIRLoader.execute("tiny_x1.pth").result[0]
    generated, reference, mask = images(1, 64, 96, batch=3)
    with pytest.raises(ValueError) as error:
        node_module.DiffRIRRestore.execute(net, generated[:2].movedim(1, -1), reference.movedim(1, -1), mask[:, 0],
                                           seed=0, tile_size=0)
    assert str(error.value) == ("The batch sizes differ: 2 generated image(s), 3 reference(s) and 3 mask(s); give "
                                "one of each or the same number of each (one reference or mask serves every image).")
    with pytest.raises(ValueError, match=r"^The mask is 48×64 pixels but the reference is 96×64"):
        node_module.DiffRIRRestore.execute(net, generated.movedim(1, -1), reference.movedim(1, -1),
                                           torch.ones(64, 48), seed=0, tile_size=0)
    with pytest.raises(ValueError) as error:
        node_module.DiffRIRRestore.execute(net, generated.movedim(1, -1), reference.movedim(1, -1), mask[:, 0],
                                           seed=0, tile_size=16)
    assert str(error.value) == "tile_size must be 0 (the whole image at once; None too in Python) or at least 32 pixels; got 16."
    with pytest.raises(FileNotFoundError):
        node_module.DiffRIRLoader.execute("missing.pth")
    with pytest.raises(ValueError, match="must be a path inside"):
        node_module.DiffRIRLoader.execute("../tiny_x1.pth")


def test_restore_node_halves_the_tile_on_out_of_memory(comfy_inprocess, node_module, model_folder, caplog):
    import comfy.model_management as mm

    net = node_module.DiffRIRLoader.execute("tiny_x1.pth").result[0]
    generated, reference, mask = images(1, 64, 256)
    failures = {"left": 2}
    tiles = []

    def run_out_of_memory(module, args):  # the network's forward: args = (packed, z, tiled run or None)
        tiles.append(None if args[2] is None else args[2].tile_quarter * 4)
        if failures["left"]:
            failures["left"] -= 1
            raise mm.OOM_EXCEPTION("CUDA out of memory (simulated)")

    hook = net.register_forward_pre_hook(run_out_of_memory)
    try:
        with caplog.at_level("WARNING", logger="llmga"):
            out = node_module.DiffRIRRestore.execute(net, generated.movedim(1, -1), reference.movedim(1, -1),
                                                     mask[:, 0], seed=0, tile_size=0)
        assert tiles == [None, 128, 64]
        assert [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()] == [
            "DiffRIR ran out of memory; retrying with 128-pixel tiles.",
            "DiffRIR ran out of memory; retrying with 64-pixel tiles."]
        assert (out.result[0] - restore(net, generated, reference, mask).movedim(1, -1)).abs().max().item() < 1e-4

        tiles.clear()
        failures["left"] = 10
        with pytest.raises(mm.OOM_EXCEPTION):
            node_module.DiffRIRRestore.execute(net, generated.movedim(1, -1), reference.movedim(1, -1), mask[:, 0],
                                               seed=0, tile_size=128)
        assert tiles == [128, 64, 32]
        assert next(net.parameters()).device.type == "cpu"
    finally:
        hook.remove()


def test_smaller_tile_size_halves_to_a_multiple_of_32():
    from llmga_core.diffrir import smaller_tile_size

    # whole image first: half the longer side; then halving, each rounded down to a multiple of 32
    assert smaller_tile_size(None, 64, 256) == 128
    assert [smaller_tile_size(t, 64, 256) for t in (128, 64, 100, 95)] == [64, 32, 32, 32]
    assert smaller_tile_size(32, 64, 256) is None and smaller_tile_size(None, 50, 60) is None


def test_plan_restore_checks_plans_memory_and_names_empty_masks(nets):
    from llmga_core.diffrir import estimate_memory, plan_restore

    net = nets[1]
    generated, reference, mask = images(1, 64, 96, batch=3)
    mask[1] = 0.4  # below the threshold everywhere: nothing regenerated
    plan = plan_restore(net, generated, reference, mask, tile_size=64)
    weights = sum(p.numel() * 4 for p in net.parameters()) + sum(b.numel() * b.element_size() for b in net.buffers())
    # float32 generated image, reference, result and mask of three 96×64 images
    images_bytes = 3 * (3 + 3 + 3 + 1) * 64 * 96 * 4
    assert plan.empty == (1,) and plan.needs_network
    assert plan.memory_bytes == weights + estimate_memory(net, 64, 96, 64) + images_bytes
    assert plan.note == ("DiffRIR: the mask of image 2 is empty, so nothing was restored there; it is returned as "
                         "the reference.")
    # 0 means the whole image, as None does
    assert plan_restore(net, generated, reference, mask, tile_size=0).memory_bytes == \
        weights + estimate_memory(net, 64, 96, None) + images_bytes
    nothing = plan_restore(net, generated, reference, torch.zeros_like(mask))
    assert not nothing.needs_network and nothing.memory_bytes == 0 and nothing.empty == (0, 1, 2)
    with pytest.raises(ValueError, match="^The mask is 48×64 pixels but the reference is 96×64"):
        plan_restore(net, generated, reference, torch.ones(3, 1, 64, 48))


def test_one_reference_and_mask_serve_every_image_and_a_plan_is_not_checked_again(nets, monkeypatch):
    """Batches of 1 broadcast (one reference and mask for several generated images) to the same result as the
    expanded tensors; restore(plan=...) runs check_inputs only inside plan_restore."""
    from llmga_core.diffrir import plan_restore, restoration

    net = nets[2]
    generated, reference, mask = images(2, 64, 96, batch=3)
    one_reference, one_mask = reference[:1], mask[:1]
    noise = torch.randn(3, net.config.prior_dim, generator=torch.Generator().manual_seed(4))
    expected = restore(net, generated, one_reference.expand(3, -1, -1, -1).clone(),
                       one_mask.expand(3, -1, -1, -1).clone(), noise=noise, tile_size=32)
    checks = []
    original = restoration.check_inputs
    monkeypatch.setattr(restoration, "check_inputs", lambda *a, **k: checks.append(1) or original(*a, **k))
    plan = plan_restore(net, generated, one_reference, one_mask, noise=noise, tile_size=32)
    got = restore(net, generated, one_reference, one_mask, noise=noise, tile_size=32, plan=plan)
    assert len(checks) == 1
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_the_network_runs_in_bfloat16_close_to_float32(weights):
    """A half-precision load (as a GPU user may cast it) runs end to end; its pixels stay near float32's."""
    net32 = load_diffrir(weights[1])
    net16 = load_diffrir(weights[1]).to(torch.bfloat16)
    generated, reference, mask = images(1, 64, 96)
    noise = torch.randn(1, net32.config.prior_dim, generator=torch.Generator().manual_seed(3))
    full = restore(net32, generated, reference, mask, noise=noise)
    half = restore(net16, generated, reference, mask, noise=noise)
    assert half.dtype == reference.dtype and torch.isfinite(half).all()
    assert float((half - full).abs().mean()) < 0.05
