"""llmga_core.editing against an independent plain loop of the original's equations, on a tiny SD1.5 UNet.

The reference below (`ref_*`) is written from the original's edit (LLMGA: llmga/serve/cli-sd15-editing.py, its
pipeline llmga/diffusers/pipeline_semantic_stable_diffusion_img2img_solver_lpw_mask.py: generate_mask, invert and
the re-sampling, with the scheduler llmga/diffusers/scheduling_dpmsolver_multistep_inject.py) in numpy/torch float64 and imports nothing from llmga_core: ᾱ from the scaled_linear
betas, α/σ/λ per timestep, one UNet call per prediction, the solver written out per step.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from llmga_core import editing
from tests.fixtures.tiny_sd import CLIP_HIDDEN, build_unet_vae

LATENT = (4, 8, 8)  # the tiny UNet's sample_size 8, the tiny VAE's 64×64 images


# ------------------------------------------------------------------------------------------------
# The independent reference


def ref_alphas_cumprod() -> np.ndarray:
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def ref_timesteps(steps: int, skip: float) -> list[int]:
    start = 1000 - (skip / 100) * 1000 - 1  # the original's evaluation order (LLMGA invert)
    if steps == 1:
        return [int(start)]
    return [int(start + (1 - start) * k / (steps - 1)) for k in range(steps)]


class RefSchedule:
    def __init__(self, acp):
        self.acp = acp

    def alpha(self, t):
        return math.sqrt(self.acp[t])

    def sigma(self, t):
        return math.sqrt(1 - self.acp[t])

    def lam(self, t):
        return math.log(self.alpha(t) / self.sigma(t))


def ref_mask(unet, latents, noise, source, target, acp, t=500, ratio=3.0):
    sch = RefSchedule(acp)
    maps = []
    for n in range(latents.shape[0]):
        x = sch.alpha(t) * latents[n:n + 1] + sch.sigma(t) * noise[n:n + 1]
        maps.append((unet(x, t, target) - unet(x, t, source)).abs())
    m = torch.cat(maps).mean(dim=(0, 1))
    return m > (ratio / 2) * m.mean()


def ref_invert(unet, x0, noise, cond, uncond, acp, ts, guidance):
    sch = RefSchedule(acp)
    noised = [sch.alpha(t) * x0 + sch.sigma(t) * noise[k] for k, t in enumerate(ts)]
    zs, x, d_prev, h_prev = [], noised[0], None, None
    for k, s in enumerate(ts):
        t = ts[k + 1] if k + 1 < len(ts) else 0
        e_u, e_c = unet(x, s, uncond), unet(x, s, cond)
        eps = e_u + guidance * (e_c - e_u)
        d0 = (x - sch.sigma(s) * eps) / sch.alpha(s)
        h = sch.lam(t) - sch.lam(s)
        mu = sch.sigma(t) / sch.sigma(s) * math.exp(-h) * x + sch.alpha(t) * (1 - math.exp(-2 * h)) * d0
        if k > 0:
            d1 = (d0 - d_prev) / (h_prev / h)
            mu = mu + 0.5 * sch.alpha(t) * (1 - math.exp(-2 * h)) * d1
        x_next = noised[k + 1] if k + 1 < len(ts) else x0  # §9.2: the last target is the clean x0
        zs.append((x_next - mu) / (sch.sigma(t) * math.sqrt(1 - math.exp(-2 * h))))
        x, d_prev, h_prev = x_next, d0, h  # §9.3: each step's input is the noised latent
    return noised[0], torch.stack(zs)


def ref_resample(unet, x, zs, cond, uncond, mask, acp, ts, guidance):
    sch = RefSchedule(acp)
    m = mask.to(x.dtype)
    d_prev, h_prev = None, None
    for k, s in enumerate(ts):
        t = ts[k + 1] if k + 1 < len(ts) else 0
        e_u, e_c = unet(x, s, uncond), unet(x, s, cond)
        eps = e_u + guidance * (e_c - e_u) * m
        d0 = (x - sch.sigma(s) * eps) / sch.alpha(s)
        h = sch.lam(t) - sch.lam(s)
        mu = sch.sigma(t) / sch.sigma(s) * math.exp(-h) * x + sch.alpha(t) * (1 - math.exp(-2 * h)) * d0
        second_order = k > 0 and not (k == len(ts) - 1 and len(ts) < 15)  # §9.8
        if second_order:
            mu = mu + 0.5 * sch.alpha(t) * (1 - math.exp(-2 * h)) * (d0 - d_prev) / (h_prev / h)
        x = mu + sch.sigma(t) * math.sqrt(1 - math.exp(-2 * h)) * zs[k]
        d_prev, h_prev = d0, h
    return x


# ------------------------------------------------------------------------------------------------
# Fixtures


class Counted:
    """predict_noise over a diffusers UNet that records each call's batch size and timestep."""

    def __init__(self, unet):
        self.unet = unet
        self.calls: list[tuple[int, int]] = []

    def __call__(self, latents, t, embeds):
        assert isinstance(t, int) and embeds.shape[0] == latents.shape[0]
        self.calls.append((latents.shape[0], t))
        return self.unet(latents.to(self.unet.dtype), t, encoder_hidden_states=embeds.to(self.unet.dtype)).sample


@pytest.fixture(scope="module")
def models():
    unet, vae = build_unet_vae("sd15", seed=0)
    return {"unet32": unet, "unet64": build_unet_vae("sd15", seed=0)[0].double(), "vae": vae}


def plain(unet):
    @torch.no_grad()
    def predict(x, t, e):
        return unet(x.to(unet.dtype), t, encoder_hidden_states=e.to(unet.dtype)).sample
    return predict


def embeds(seed, length, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((1, length, CLIP_HIDDEN), generator=g).to(dtype)


@pytest.fixture(scope="module")
def case(models):
    """A seeded image's latents, draws and embeddings in float64 (lpw target of 2 chunks)."""
    vae = models["vae"]
    g = torch.Generator().manual_seed(1)
    image = torch.rand((1, 3, 64, 64), generator=g) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
    noise = editing.draw_noise(7, LATENT, steps=50, dtype=torch.float64)
    x0 = (dist.mode() * editing.LATENT_SCALE).double()
    mask_latents = editing.posterior_sample(dist.parameters.double(), noise.posterior) * editing.LATENT_SCALE
    return dict(image=image, x0=x0, mask_latents=mask_latents, noise=noise,
                source=embeds(10, 77), uncond=embeds(11, 77), target=embeds(12, 154), uncond154=embeds(11, 154),
                mask_source=embeds(13, 154), mask_target=embeds(14, 154))


def acp64():
    return torch.from_numpy(ref_alphas_cumprod())


def psnr(a, b):
    mse = ((a - b) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)  # images in −1..1 (peak-to-peak 2)


# ------------------------------------------------------------------------------------------------
# Schedule and draws


def test_timesteps_are_the_documented_truncated_linspace():
    ts = editing.timesteps()
    assert ts[:5] == [749, 733, 718, 703, 687] and ts[-5:] == [62, 46, 31, 16, 1]  # int(linspace(749, 1, 50))
    for steps, skip in [(50, 25), (10, 0), (30, 49.2), (1, 25), (749, 25), (1, 99.8), (2, 99.7)]:
        assert editing.timesteps(steps, skip) == ref_timesteps(steps, skip)
    assert editing.timesteps(30, 49.2)[0] == 506  # 1000 − 0.492·1000 − 1 = 506.99…, truncated
    assert editing.max_steps(25) == 749


def test_alphas_cumprod_is_the_scaled_linear_schedule_in_float32():
    acp = editing.scaled_linear_alphas_cumprod()
    assert acp.dtype == torch.float32 and acp.shape == (1000,)
    np.testing.assert_allclose(acp.double().numpy(), ref_alphas_cumprod(), rtol=2e-6)
    assert math.sqrt(1 - acp[0].item()) == pytest.approx(0.029155, abs=1e-6)  # σ_VP(t=0), §9.2


def test_draw_noise_follows_the_originals_order():
    shape, steps, maps = (4, 3, 2), 5, 3
    noise = editing.draw_noise(123, shape, steps=steps, maps=maps)
    g = torch.Generator().manual_seed(123)
    posterior = torch.randn((maps, *shape), generator=g)
    mask = torch.randn((maps, *shape), generator=g)
    per_t = [torch.randn((1, *shape), generator=g) for _ in range(steps)]  # t = 1 first (§9.4)
    assert torch.equal(noise.posterior, posterior) and torch.equal(noise.mask, mask)
    assert noise.inversion.shape == (steps, 1, *shape)
    for k in range(steps):
        assert torch.equal(noise.inversion[k], per_t[steps - 1 - k])


def test_posterior_sample_equals_diffusers_sampling(models):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    g = torch.Generator().manual_seed(5)
    moments = torch.randn((3, 8, 8, 8), generator=g)
    moments[:, 4:] = moments[:, 4:] * 20  # logvar beyond the ±30/20 clamp somewhere
    expected = DiagonalGaussianDistribution(moments).sample(torch.Generator().manual_seed(9))
    eps = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(editing.posterior_sample(moments, eps), expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Against the reference


def test_edit_mask_matches_reference(models, case):
    unet = plain(models["unet64"])
    got = editing.edit_mask(unet, case["mask_latents"], case["noise"].mask, case["mask_source"],
                            case["mask_target"], alphas_cumprod=acp64())
    want = ref_mask(unet, case["mask_latents"], case["noise"].mask, case["mask_source"], case["mask_target"],
                    ref_alphas_cumprod())
    assert got.dtype == torch.bool and got.shape == LATENT[1:]
    assert 0 < int(want.sum()) < want.numel()  # a partial mask, so equality means something
    assert torch.equal(got, want)


@pytest.mark.parametrize("steps", [50, 10])
def test_invert_and_resample_match_reference(models, case, steps):
    unet = plain(models["unet64"])
    ts = editing.timesteps(steps, 25)
    noise = case["noise"].inversion[:steps]
    x_start, zs = editing.invert(unet, case["x0"], noise, case["source"], case["uncond"],
                                 alphas_cumprod=acp64(), timesteps=ts, guidance=3.5)
    ref_start, ref_zs = ref_invert(unet, case["x0"], noise, case["source"], case["uncond"],
                                   ref_alphas_cumprod(), ref_timesteps(steps, 25), 3.5)
    assert zs.shape == (steps, 1, *LATENT) and x_start.shape == (1, *LATENT)
    torch.testing.assert_close(x_start, ref_start, rtol=0, atol=1e-5)
    torch.testing.assert_close(zs, ref_zs, rtol=0, atol=1e-5)

    mask = torch.zeros(LATENT[1:], dtype=torch.bool)
    mask[2:6, 1:5] = True
    got = editing.resample(unet, x_start, zs, case["target"], case["uncond154"], mask,
                           alphas_cumprod=acp64(), timesteps=ts, guidance=7.5)
    want = ref_resample(unet, ref_start, ref_zs, case["target"], case["uncond154"], mask,
                        ref_alphas_cumprod(), ref_timesteps(steps, 25), 7.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    print(f"\n{steps} steps, float64: max |Δz| {(zs - ref_zs).abs().max():.2e}, "
          f"max |Δlatents| {(got - want).abs().max():.2e}")


def test_float32_follows_the_float64_reference(models, case):
    ts = editing.timesteps(50, 25)
    f32 = {k: v.float() for k, v in case.items() if isinstance(v, torch.Tensor)}
    unet32 = plain(models["unet32"])
    x_start, zs = editing.invert(unet32, f32["x0"], case["noise"].inversion.float(), f32["source"], f32["uncond"],
                                 alphas_cumprod=editing.scaled_linear_alphas_cumprod(), timesteps=ts)
    mask = torch.ones(LATENT[1:], dtype=torch.bool)
    got = editing.resample(unet32, x_start, zs, f32["target"], f32["uncond154"], mask,
                           alphas_cumprod=editing.scaled_linear_alphas_cumprod(), timesteps=ts)
    assert got.dtype == torch.float32 and zs.dtype == torch.float32
    unet64 = plain(models["unet64"])
    ref_ts = ref_timesteps(50, 25)
    ref_start, ref_zs = ref_invert(unet64, case["x0"], case["noise"].inversion, case["source"], case["uncond"],
                                   ref_alphas_cumprod(), ref_ts, 3.5)
    want = ref_resample(unet64, ref_start, ref_zs, case["target"], case["uncond154"], mask.double(),
                        ref_alphas_cumprod(), ref_ts, 7.5)
    dz, dx = (zs.double() - ref_zs).abs().max().item(), (got.double() - want).abs().max().item()
    print(f"\nfloat32 against the float64 reference: max |Δz| {dz:.2e}, max |Δlatents| {dx:.2e}")
    assert dz < 1e-3 and dx < 5e-4  # float32 rounding, amplified where z divides by σ_t′·√(1 − e^(−2h))


def test_float16_runs_in_the_models_dtype(models, case):
    unet16 = build_unet_vae("sd15", seed=0)[0].half()
    ts = editing.timesteps(16, 25)
    acp = editing.scaled_linear_alphas_cumprod()
    x0 = torch.randn((1, *LATENT), generator=torch.Generator().manual_seed(4)).half()
    x_start, zs = editing.invert(plain(unet16), x0, case["noise"].inversion[:16].half(), case["source"].half(),
                                 case["uncond"].half(), alphas_cumprod=acp, timesteps=ts)
    out = editing.resample(plain(unet16), x_start, zs, case["source"].half(), case["uncond"].half(),
                           torch.ones(LATENT[1:], dtype=torch.bool), alphas_cumprod=acp, timesteps=ts, guidance=3.5)
    assert zs.dtype == out.dtype == torch.float16 and torch.isfinite(out).all()
    # Replaying the inversion's own prompt and guidance retraces it in float16 too (the same ops on the
    # same values), so x0 comes back to float16 rounding.
    assert (out.float() - x0.float()).abs().max().item() < 1e-2


# ------------------------------------------------------------------------------------------------
# Exact reconstruction


@pytest.mark.parametrize("latents", ["vae", "unit normal"])
def test_same_caption_and_guidance_with_a_full_mask_gives_back_x0(models, case, latents):
    unet = Counted(models["unet32"])
    vae = models["vae"]
    f32 = {k: v.float() for k, v in case.items() if isinstance(v, torch.Tensor)}
    # The tiny VAE's latents are small (|x0| ≲ 0.1); SD's scaled latents have unit scale, so try both.
    x0 = f32["x0"] if latents == "vae" else torch.randn((1, *LATENT), generator=torch.Generator().manual_seed(2))
    noise = editing.draw_noise(7, LATENT, steps=50)
    same = editing.EditEmbeds(f32["mask_source"], f32["mask_target"], f32["source"], f32["uncond"],
                              f32["source"], f32["uncond"])
    full = torch.ones(LATENT[1:], dtype=torch.bool)
    acp = editing.scaled_linear_alphas_cumprod()
    result = editing.edit(unet, x0, same, noise, alphas_cumprod=acp, mask=full, source_guidance=3.5,
                          target_guidance=3.5)
    assert result.edited and result.unet_calls == {"mask": 0, "inversion": 50, "resample": 50}
    error = (result.latents - x0).abs().max().item()
    assert error < 1e-4

    # The check can fail: the CLI's 7.5 target guidance does not retrace the 3.5 inversion.
    other = editing.edit(unet, x0, same, noise, alphas_cumprod=acp, mask=full, source_guidance=3.5,
                         target_guidance=7.5)
    assert (other.latents - x0).abs().max().item() > 1e-2

    if latents == "vae":
        with torch.no_grad():
            decoded = vae.decode(result.latents / editing.LATENT_SCALE).sample
            decoded_x0 = vae.decode(x0 / editing.LATENT_SCALE).sample
        vs_roundtrip, vs_input = psnr(decoded, decoded_x0), psnr(decoded, case["image"])
        print(f"\nreconstruction: max |latents − x0| {error:.2e}; PSNR of the decoded edit against the VAE's "
              f"decoding of x0 {vs_roundtrip:.1f} dB, against the input image {vs_input:.1f} dB (the tiny "
              f"random VAE's own round trip: {psnr(decoded_x0, case['image']):.1f} dB)")
        assert vs_roundtrip > 60
    else:
        print(f"\nreconstruction of unit-scale latents: max |latents − x0| {error:.2e}")


def test_below_15_steps_the_last_resampling_step_is_first_order(models):
    # §9.8: the inversion stays second order, so with 14 steps the replay no longer retraces it.
    unet = plain(models["unet32"])
    x0 = torch.randn((1, *LATENT), generator=torch.Generator().manual_seed(2))
    e = embeds(10, 77, torch.float32)
    u = embeds(11, 77, torch.float32)
    acp = editing.scaled_linear_alphas_cumprod()
    errors = {}
    for steps in (14, 15):
        ts = editing.timesteps(steps, 25)
        noise = editing.draw_noise(3, LATENT, steps=steps).inversion
        x_start, zs = editing.invert(unet, x0, noise, e, u, alphas_cumprod=acp, timesteps=ts)
        out = editing.resample(unet, x_start, zs, e, u, torch.ones(8, 8, dtype=torch.bool), alphas_cumprod=acp,
                               timesteps=ts, guidance=3.5)
        errors[steps] = (out - x0).abs().max().item()
    assert errors[15] < 1e-4 < 1e-2 < errors[14]


# ------------------------------------------------------------------------------------------------
# Empty and full masks


def test_a_mask_that_selects_nothing_returns_x0(models, case, caplog):
    unet = Counted(models["unet32"])
    f32 = {k: v.float() for k, v in case.items() if isinstance(v, torch.Tensor)}
    e = editing.EditEmbeds(f32["mask_source"], f32["mask_target"], f32["source"], f32["uncond"], f32["target"],
                           f32["uncond154"])
    seen = []
    with caplog.at_level(logging.INFO, logger="llmga"):
        result = editing.edit(unet, f32["x0"], e, editing.draw_noise(7, LATENT), mask=torch.zeros(8, 8),
                              alphas_cumprod=editing.scaled_linear_alphas_cumprod(),
                              progress=lambda done, total: seen.append((done, total)))
    assert not result.edited and torch.equal(result.latents, f32["x0"]) and not result.mask.any()
    assert unet.calls == [] and result.unet_calls == {"mask": 0, "inversion": 0, "resample": 0}
    assert seen == []
    assert "selects nothing" in caplog.text


def _pixelwise(shift_by_embeds: bool):
    """A deterministic stand-in UNet: ε = 0.1·x (+ the embeddings' mean when shift_by_embeds)."""
    def predict(latents, t, embeds):
        eps = 0.1 * latents
        return eps + embeds.mean(dim=(1, 2))[:, None, None, None] if shift_by_embeds else eps
    return predict


def test_a_computed_empty_mask_stops_after_the_mask_phase(case):
    # A prediction gap that is the same at every pixel is never above 1.5× its mean: empty mask.
    calls = []
    predict = _pixelwise(True)
    e = editing.EditEmbeds(case["mask_source"], case["mask_target"], case["source"], case["uncond"],
                           case["target"], case["uncond154"])
    result = editing.edit(lambda x, t, c: calls.append(t) or predict(x, t, c), case["x0"], e, case["noise"],
                          mask_latents=case["mask_latents"], alphas_cumprod=acp64())
    assert not result.edited and not result.mask.any() and torch.equal(result.latents, case["x0"])
    assert calls == [500] and result.unet_calls["mask"] == 1


def test_identical_predictions_give_a_full_mask_as_the_originals_zero_by_zero():
    latents = torch.randn(10, *LATENT, generator=torch.Generator().manual_seed(0))
    same = embeds(1, 77)
    mask = editing.edit_mask(_pixelwise(False), latents, torch.zeros_like(latents), same, same,
                             alphas_cumprod=acp64())
    assert mask.all()


# ------------------------------------------------------------------------------------------------
# Batching, progress and interruption


def test_unet_calls_are_batched(models, case):
    unet = Counted(models["unet64"])
    ts = editing.timesteps(12, 25)
    args = dict(alphas_cumprod=acp64())
    mask = editing.edit_mask(unet, case["mask_latents"], case["noise"].mask, case["mask_source"],
                             case["mask_target"], **args)
    assert unet.calls == [(20, 500)]  # 10 draws × (source, target) in one call
    unet.calls.clear()
    x_start, zs = editing.invert(unet, case["x0"], case["noise"].inversion[:12], case["source"], case["uncond"],
                                 timesteps=ts, **args)
    assert unet.calls == [(2, t) for t in ts]
    unet.calls.clear()
    out = editing.resample(unet, x_start, zs, case["target"], case["uncond154"], mask, timesteps=ts, **args)
    assert unet.calls == [(2, t) for t in ts]

    # Embeddings of different lengths cannot share a batch: one call per caption.
    unet.calls.clear()
    split_len = editing.resample(unet, x_start, zs, case["target"], case["uncond"], mask, timesteps=ts, **args)
    assert unet.calls == [(1, t) for t in ts for _ in range(2)]
    assert split_len.shape == out.shape

    # max_batch caps the latents per call and leaves the result as it was.
    unet.calls.clear()
    capped = editing.edit_mask(unet, case["mask_latents"], case["noise"].mask, case["mask_source"],
                               case["mask_target"], max_batch=8, **args)
    assert [b for b, _ in unet.calls] == [8, 8, 4] and torch.equal(capped, mask)
    unet.calls.clear()
    x1, zs1 = editing.invert(unet, case["x0"], case["noise"].inversion[:12], case["source"], case["uncond"],
                             timesteps=ts, max_batch=1, **args)
    assert unet.calls == [(1, t) for t in ts for _ in range(2)]
    torch.testing.assert_close(zs1, zs, rtol=0, atol=1e-9)

    e = editing.EditEmbeds(case["mask_source"], case["mask_target"], case["source"], case["uncond"],
                           case["target"], case["uncond154"])
    assert editing.unet_calls(12, embeds=e) == {"mask": 1, "inversion": 12, "resample": 12}
    assert editing.unet_calls(12, embeds=e, max_batch=8) == {"mask": 3, "inversion": 12, "resample": 12}
    assert editing.unet_calls(12, max_batch=1, mask=False) == {"mask": 0, "inversion": 24, "resample": 24}
    # the batch a host makes room for is the largest one the calls above really got
    assert editing.largest_unet_batch(embeds=e) == 20
    assert editing.largest_unet_batch(embeds=e, max_batch=8) == 8
    assert editing.largest_unet_batch(embeds=e, mask=False) == 2
    unequal = editing.EditEmbeds(case["source"], case["target"], case["source"], case["uncond154"],
                                 case["target"], case["uncond"])
    assert editing.largest_unet_batch(embeds=unequal) == 10  # neither phase can pair its captions


def test_edit_reports_progress_per_unet_call_over_all_phases(models, case):
    unet = Counted(models["unet64"])
    e = editing.EditEmbeds(case["mask_source"], case["mask_target"], case["source"], case["uncond"],
                           case["target"], case["uncond154"])
    seen = []
    noise = editing.draw_noise(7, LATENT, steps=8, dtype=torch.float64)
    result = editing.edit(unet, case["x0"], e, noise, mask_latents=case["mask_latents"], steps=8,
                          alphas_cumprod=acp64(), progress=lambda done, total: seen.append((done, total)))
    assert result.edited and 0 < int(result.mask.sum()) < 64
    assert len(unet.calls) == 17 and seen == [(i, 17) for i in range(1, 18)]
    assert result.unet_calls == {"mask": 1, "inversion": 8, "resample": 8}


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("phase", ["invert", "resample"])
def test_an_exception_from_progress_stops_the_phase(models, case, phase):
    unet = Counted(models["unet64"])
    ts = editing.timesteps(10, 25)
    args = dict(alphas_cumprod=acp64(), timesteps=ts)
    x_start, zs = editing.invert(plain(models["unet64"]), case["x0"], case["noise"].inversion[:10],
                                 case["source"], case["uncond"], **args)

    def progress(done, total):
        assert total == 10
        if done == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        if phase == "invert":
            editing.invert(unet, case["x0"], case["noise"].inversion[:10], case["source"], case["uncond"],
                           progress=progress, **args)
        else:
            editing.resample(unet, x_start, zs, case["target"], case["uncond154"], torch.ones(8, 8, dtype=torch.bool),
                             progress=progress, **args)
    assert len(unet.calls) == 3


# ------------------------------------------------------------------------------------------------
# Helpers for the node


def test_predict_noise_from_a_k_diffusion_denoiser_is_the_unets_eps(models):
    unet = models["unet64"]
    acp = acp64()
    log_sigmas = ((1 - acp) / acp).sqrt().log()

    def denoise(x, sigma, e):  # the host's EPS model: input scaled by 1/√(σ²+1), D = x − σ·ε
        t = int((log_sigmas - math.log(sigma)).abs().argmin())
        return x - sigma * plain(unet)(x / math.sqrt(sigma ** 2 + 1), t, e)

    predict = editing.predict_noise_from_denoiser(denoise, acp)
    x = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    e = embeds(1, 77).expand(2, -1, -1)
    for t in (749, 500, 16, 1):
        torch.testing.assert_close(predict(x, t, e), plain(unet)(x, t, e), rtol=0, atol=1e-9)


def test_mask_to_image_and_back():
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(3)) > 0.5
    image = editing.mask_to_image(mask, 64, 64)
    assert image.shape == (64, 64) and torch.equal(image[::8, ::8].bool(), mask)
    assert torch.equal(image.reshape(8, 8, 8, 8)[:, 0, :, 0].bool(), mask)
    assert torch.equal(editing.mask_from_image(image, 8, 8), mask)
    painted = torch.zeros(64, 64)
    painted[:8, :4] = 1  # half of the first latent pixel: kept (≥ 0.5)
    painted[8:16, :3] = 1  # 3/8 of the one below: dropped
    latent = editing.mask_from_image(painted, 8, 8)
    assert latent[0, 0] and not latent[1, 0] and int(latent.sum()) == 1


def test_prepare_image_centre_crops_then_resizes():
    wide = np.zeros((60, 100, 3), dtype=np.uint8)
    wide[:, 20:80] = (0, 255, 0)  # the centre square is green, the 20-pixel margins black
    prepared = editing.prepare_image(wide, size=64)
    assert prepared.cropped and prepared.original_size == (60, 100)
    assert prepared.image.shape == (64, 64, 3)
    assert torch.equal(prepared.image, torch.tensor([0.0, 1.0, 0.0]).expand(64, 64, 3))
    square = editing.prepare_image(torch.full((32, 32, 3), 0.5), size=16)
    assert not square.cropped and torch.allclose(square.image, torch.full((16, 16, 3), 128 / 255))


# ------------------------------------------------------------------------------------------------
# Bad inputs: one sentence each, before any UNet call


def one_sentence(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message.endswith(".") and ". " not in message[:-1], message
    return message


@pytest.mark.parametrize("steps, skip, words", [
    (0, 25, "steps must be a whole number from 1 to 749"),
    (750, 25, "steps must be a whole number from 1 to 749"),
    (2.5, 25, "steps must be a whole number"),
    (50, -1, "skip must be from 0 to 99.8"),
    (50, 100, "skip must be from 0 to 99.8"),
    (50, "25", "skip must be a number"),
])
def test_timesteps_out_of_range(steps, skip, words):
    with pytest.raises(ValueError) as excinfo:
        editing.timesteps(steps, skip)
    assert words in one_sentence(excinfo)


def test_shapes_that_do_not_fit(case):
    calls = []

    def unet(x, t, e):
        calls.append(t)
        return torch.zeros_like(x)

    acp, ts = acp64(), editing.timesteps(10, 25)
    x0, src, unc = case["x0"], case["source"], case["uncond"]
    noise = case["noise"].inversion[:10]
    bad = [
        (lambda: editing.invert(unet, x0, noise[:9], src, unc, alphas_cumprod=acp, timesteps=ts),
         "one map per timestep"),
        (lambda: editing.invert(unet, x0.expand(2, -1, -1, -1), noise, src, unc, alphas_cumprod=acp, timesteps=ts),
         "x0 must be a latent tensor of shape 1×C×h×w"),
        (lambda: editing.invert(unet, x0, noise, src[0], unc, alphas_cumprod=acp, timesteps=ts), "1×L×C"),
        (lambda: editing.invert(unet, x0, noise, src, unc, alphas_cumprod=acp, timesteps=ts[::-1]), "decrease"),
        (lambda: editing.invert(unet, x0, noise, src, unc, alphas_cumprod=acp[:500], timesteps=ts), "at most 499"),
        (lambda: editing.resample(unet, x0, noise, src, unc, torch.ones(64, 64, dtype=torch.bool),
                                  alphas_cumprod=acp, timesteps=ts), "mask_from_image"),
        (lambda: editing.resample(unet, x0, noise, src, unc, torch.full((8, 8), 2.0), alphas_cumprod=acp,
                                  timesteps=ts), "0..1"),
        (lambda: editing.edit_mask(unet, case["mask_latents"], case["noise"].mask[:3], src, src, alphas_cumprod=acp),
         "noise must have the latents' shape"),
        (lambda: editing.edit_mask(unet, case["mask_latents"], case["noise"].mask, src, src, alphas_cumprod=acp,
                                   threshold_ratio=0), "threshold_ratio must be a positive number"),
        (lambda: editing.edit_mask(unet, case["mask_latents"], case["noise"].mask, src, src, alphas_cumprod=acp,
                                   max_batch=0), "max_batch"),
        (lambda: editing.edit(unet, x0, editing.EditEmbeds(*(src,) * 6), case["noise"], alphas_cumprod=acp),
         "needs mask_latents"),
        (lambda: editing.edit(unet, x0, editing.EditEmbeds(*(src,) * 6), case["noise"], alphas_cumprod=acp,
                              mask=torch.ones(8, 8), steps=10), "noise.inversion must hold one map per timestep"),
        (lambda: editing.edit(unet, x0, editing.EditEmbeds(*(src,) * 6), case["noise"], alphas_cumprod=acp,
                              mask=torch.ones(8, 8), skip=120), "skip must be from 0 to 99.8"),
        (lambda: editing.edit(unet, x0, editing.EditEmbeds(*(src,) * 6), case["noise"], alphas_cumprod=acp,
                              mask_latents=case["mask_latents"], threshold_ratio=-1), "threshold_ratio"),
    ]
    for call, words in bad:
        with pytest.raises(ValueError) as excinfo:
            call()
        assert words in one_sentence(excinfo), str(excinfo.value)
    assert calls == []


def test_a_predict_noise_of_the_wrong_shape_is_named(case):
    with pytest.raises(ValueError) as excinfo:
        editing.invert(lambda x, t, e: x[:, :3], case["x0"], case["noise"].inversion[:10], case["source"],
                       case["uncond"], alphas_cumprod=acp64(), timesteps=editing.timesteps(10, 25))
    assert "predict_noise returned (2, 3, 8, 8) for latents of shape (2, 4, 8, 8)" in one_sentence(excinfo)
