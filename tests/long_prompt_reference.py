"""Reference long-prompt encoders written the way LLMGA's code is structured (reference/long_prompt_and_unet.md
§1-§2): one flat 75·n+2 id row, windows cut out of it, one model call per window. Shared by the library's
tests (transformers models) and the host node's tests (the host CLIP).
"""
from __future__ import annotations

import torch

BOS, EOS = 49406, 49407
WORDS = ["red", "fox", "snowy", "forest", "dawn", "light", "soft", "tall", "trees", "river", "stone", "cloud"]


def words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def content_ids(tokenizer, text: str) -> list[int]:
    """What LLMGA takes from the tokenizer: input_ids without BOS/EOS."""
    return tokenizer(text).input_ids[1:-1]


def final_norm(model):
    return getattr(model, "text_model", model).final_layer_norm


def lpw_reference(runs, negative_runs, tokenizer, model, multiples, layer=None):
    """lpw_stable_diffusion's get_weighted_text_embeddings for explicit (text, weight) runs."""
    cap = 75 * multiples

    def tokenize(run_list):
        ids, weights = [], []
        for text, weight in run_list:
            t = content_ids(tokenizer, text)
            ids += t
            weights += [weight] * len(t)
        return ids[:cap], weights[:cap]

    pos, neg = tokenize(runs), tokenize(negative_runs)
    longest = max(len(pos[0]), len(neg[0]))
    n = max(1, min(multiples, (longest - 1) // 75 + 1))

    def embed(ids, weights):
        flat = torch.tensor([[BOS] + ids + [EOS] * (75 * n - len(ids)) + [EOS]])
        outs = []
        for i in range(n):
            window = flat[:, 75 * i: 75 * i + 77].clone()
            window[:, 0], window[:, -1] = flat[0, 0], flat[0, -1]
            with torch.no_grad():
                if layer is None:
                    outs.append(model(window).last_hidden_state)
                else:
                    outs.append(final_norm(model)(model(window, output_hidden_states=True).hidden_states[layer]))
        emb = torch.cat(outs, dim=1)
        w = torch.ones(77 * n)
        for t, weight in enumerate(weights):
            w[77 * (t // 75) + 1 + t % 75] = weight
        before = emb.mean()
        emb = emb * w[None, :, None]
        return emb * (before / emb.mean())

    return embed(*pos), embed(*neg), n


def training_reference(text, tokenizer, model):
    """get_text_index + get_unweighted_text_embeddings(no_boseos_middle=True) for one caption."""
    ids = tokenizer(text, max_length=302, truncation=True).input_ids[1:-1]
    n = max(1, min(4, (len(ids) - 1) // 75 + 1))
    flat = torch.tensor([[BOS] + ids + [EOS] * (75 * n - len(ids)) + [EOS]])
    if n == 1:
        with torch.no_grad():
            return model(flat).last_hidden_state
    outs = []
    for i in range(n):
        window = flat[:, 75 * i: 75 * i + 77].clone()
        window[:, 0], window[:, -1] = flat[0, 0], flat[0, -1]
        with torch.no_grad():
            out = model(window).last_hidden_state
        outs.append(out[:, :-1] if i == 0 else out[:, 1:] if i == n - 1 else out[:, 1:-1])
    return torch.cat(outs, dim=1)


def sdxl_reference(text, tiny, layer=-2):
    """pipeline_stable_diffusion_xl_lpw encode_prompt: both encoders, penultimate, 75·n+2, pooled rule."""
    hidden_parts, pooled = [], None
    for tokenizer, model in ((tiny.tokenizer, tiny.text_encoder), (tiny.tokenizer_2, tiny.text_encoder_2)):
        ids = tokenizer(text, max_length=302, truncation=True).input_ids[1:-1]
        n = max(1, min(4, (len(ids) - 1) // 75 + 1))
        pad = tokenizer.pad_token_id
        flat = torch.tensor([[BOS] + ids + [pad] * (75 * n - len(ids)) + [EOS]])
        outs, first_max = [], None
        for i in range(n):
            window = flat[:, 75 * i: 75 * i + 77].clone() if n > 1 else flat
            window[:, 0], window[:, -1] = flat[0, 0], flat[0, -1]
            with torch.no_grad():
                out = model(window, output_hidden_states=True)
            h = out.hidden_states[layer]
            if n > 1:
                h = h[:, :-1] if i == 0 else h[:, 1:] if i == n - 1 else h[:, 1:-1]
            outs.append(h)
            if model is tiny.text_encoder_2:
                # _SDXL2: keep the earlier pooled only where chunk 0's largest id beats this chunk's
                now_max = window.max(dim=1, keepdim=True).values
                if first_max is None:
                    pooled, first_max = out.text_embeds, now_max
                else:
                    pooled = torch.where(first_max > now_max, pooled, out.text_embeds)
        hidden_parts.append(torch.cat(outs, dim=1))
    return torch.cat(hidden_parts, dim=-1), pooled


def close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() <= tol, (a - b).abs().max().item()


def long_weighted(n_filler):
    runs = [("a photo of ", 1.0), ("red fox", 1.5), (", " + words(n_filler) + " ", 1.0), ("bright", 1 / 1.1),
            (" end", 1.0)]
    text = f"a photo of (red fox:1.5), {words(n_filler)} [bright] end"
    return text, runs
