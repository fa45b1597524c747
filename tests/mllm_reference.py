"""The independent reference MLLM of the greedy-token tests, written step by step from the original's CLI path
(LLMGA: llmga/serve/cli.py, llmga/llava/conversation.py, llmga/llava/mm_utils.py, llmga/llava/model/llava_arch.py).

Other means than the library: the prompt string written out literally per template, per-chunk
tokenization around <image> on the original's tokenizer stack (tests/oracles), the native model loaded
with transformers' own machinery (from_pretrained for CLIP, load_state_dict + resize_token_embeddings for
the LLM), CLIP pixels computed with numpy the way transformers 4.41's CLIPImageProcessor did, the
projector as two F.linear, and decoding WITHOUT a KV cache: every step runs the whole sequence again.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from packaging.version import Version
from PIL import Image


LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the human's questions.")
LLAMA2_SYS = ("You are LLMGA, a useful language and vision generation assistant. You can generate images according to "
              "the user's requirements. If the user wants you to inpaint or outpaint images, please imagine what is in "
              "the black mask parts of the image. If image generation is required, please provide a detailed "
              "description of the generated images in the form of <gen_image> DETAILED DESCRIPTION </gen_image>.")
LLAMA3_SYS = ("<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. You are "
              "able to understand the visual content that the user provides, and assist the user with a variety of "
              "tasks using natural language.")
QWEN_SYS = ("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
            "helpful and honest answers.")


def literal_prompt(family: str, turns: list[tuple[str, str | None]]) -> str:
    """The prompt string LLMGA: llmga/llava/conversation.py `get_prompt` renders for finished turns
    [(user, stored answer), …] + (user, None)."""
    out = ""
    if family == "vicuna":
        out = LLAVA_V1 + " "
        for user, answer in turns:
            out += "USER: " + user + " " + ("ASSISTANT: " + answer + "</s>" if answer else "ASSISTANT:")
    elif family in ("llama2", "mistral"):
        system = LLAMA2_SYS if family == "llama2" else ""
        for i, (user, answer) in enumerate(turns):
            if i == 0:
                user = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + user
            out += ("<s>" if i else "") + "[INST] " + user + " [/INST]"
            if answer:
                out += " " + answer + " </s>"
    elif family == "llama3":
        out = LLAMA3_SYS + "<|eot_id|>"
        for user, answer in turns:
            out += "<|start_header_id|>user<|end_header_id|>\n\n" + user + "<|eot_id|>"
            out += "<|start_header_id|>system<|end_header_id|>\n\n" + (answer + "<|eot_id|>" if answer else "")
    elif family == "qwen2":
        out = QWEN_SYS + "<|im_end|>"
        for user, answer in turns:
            out += "<|im_start|>user\n" + user + "<|im_end|>" + "<|im_start|>assistant\n"
            out += answer + "<|im_end|>" if answer else ""
    elif family == "phi3":
        for user, answer in turns:
            out += "<|user|>\n" + user + "<|end|>\n" + "<|assistant|>\n" + (answer + "<|end|>\n" if answer else "")
    elif family == "gemma":
        for user, answer in turns:
            out += "<start_of_turn>user\n" + user + "<end_of_turn>\n" + "<start_of_turn>model\n"
            out += answer + "<end_of_turn>\n<eos>" if answer else ""
    return out


def clip_pixels_441(image: Image.Image) -> torch.Tensor:
    """transformers 4.41 CLIPImageProcessor on a square PIL image: bicubic resize to 336, (centre crop no-op),
    float64 × 1/255 → float32, (x − mean) / std in float32."""
    resized = np.array(image.convert("RGB").resize((336, 336), Image.BICUBIC, reducing_gap=None))
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    return torch.from_numpy(((scaled - mean) / std).transpose(2, 0, 1).copy())[None]


class Reference:
    """The independent reference model of one folder (float32, CPU)."""

    def __init__(self, folder: Path, vision: Path, family: str, tokenizers):
        import transformers
        from safetensors.torch import load_file
        from transformers import CLIPVisionModel

        self.folder = folder
        self.tokenizers = tokenizers  # the original's tokenizer stack (transformers 4.41, tests/oracles)

        self.family = family
        cfg = json.loads((folder / "config.json").read_text())
        self.max_positions = cfg["tokenizer_model_max_length"]  # the cut applied when an image is present
        gen = json.loads((folder / "generation_config.json").read_text())
        native = {k: v for k, v in cfg.items() if not k.startswith(("mm_", "tokenizer_", "tune_", "freeze_", "use_mm"))
                  and k not in ("image_aspect_ratio", "model_type", "auto_map", "architectures", "_name_or_path",
                                "torch_dtype", "transformers_version")}
        if family == "phi3":
            native["rope_scaling"] = dict(native["rope_scaling"], type="longrope")  # 4.42+ name of "su"
        if family == "gemma":
            native["hidden_act"] = native.pop("hidden_activation")
        stem = {"vicuna": "Llama", "llama2": "Llama", "llama3": "Llama"}.get(family, {
            "mistral": "Mistral", "qwen2": "Qwen2", "phi3": "Phi3", "gemma": "Gemma"}.get(family))
        config = getattr(transformers, stem + "Config")(**native)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        self.lm = getattr(transformers, stem + "ForCausalLM")(config).eval()
        state = load_file(str(folder / "model.safetensors"))
        self.projector = {k.removeprefix("model.mm_projector."): v.float() for k, v in state.items()
                          if k.startswith("model.mm_projector.")}
        lm_state = {k: v.float() for k, v in state.items() if not k.startswith(("model.mm_projector.",
                                                                                "model.vision_tower."))}
        missing, unexpected = self.lm.load_state_dict(lm_state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        self.lm.tie_weights()
        facts = tokenizers.ask(folder, tokenizers.use_fast(folder))
        self.bos = facts["bos"]
        self.lm.resize_token_embeddings(facts["len"])  # what builder.py does after loading
        if family in ("mistral", "qwen2"):  # the original's float16-built rotary tables
            # one rotary module per model, or per attention layer before transformers 4.48
            rotary = [m for m in self.lm.modules() if type(m).__name__ == stem + "RotaryEmbedding"]
            assert rotary
            for module in rotary:
                module.register_forward_hook(lambda module, args, out: tuple(t.half().float() for t in out))
        # the keyword is `dtype` from transformers 4.56 on, `torch_dtype` before
        dtype_arg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        self.vision = CLIPVisionModel.from_pretrained(str(vision), attn_implementation="eager",
                                                      **{dtype_arg: torch.float32}).eval()
        eos = gen["eos_token_id"]
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.penalty = gen.get("repetition_penalty", 1.0)

    def chunk_ids(self, prompt: str) -> list[list[int]]:
        return [self.tokenizers.encode(self.folder, chunk) for chunk in prompt.split("<image>")]

    @torch.no_grad()
    def embeddings(self, prompt: str, image: Image.Image | None, half_pixels: bool = True) -> torch.Tensor:
        """The input sequence; half_pixels=False feeds the tower unrounded pixels (not the original's rule)."""
        embed = self.lm.get_input_embeddings()
        chunks = self.chunk_ids(prompt)
        bos = self.bos
        if len(chunks) == 1:
            return embed(torch.tensor(chunks[0]))
        assert len(chunks) == 2 and image is not None
        first, second = chunks
        if first and first[0] == bos:  # BOS kept once, dropped from the later chunk
            second = second[1:] if second and second[0] == bos else second
        side = max(image.size)
        # llmga/serve/cli.py: image_tensor = ...preprocess(image, return_tensors='pt')['pixel_values'].half()
        pixels = clip_pixels_441(image.resize((side, side), Image.LANCZOS))
        pixels = pixels.half().float() if half_pixels else pixels
        hidden = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states
        features = hidden[len(hidden) - 2][0, 1:]
        p = self.projector
        features = F.linear(F.gelu(F.linear(features, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])
        if self.family == "gemma" and self.embedding_scales():
            # LLaVA's Gemma scales the whole input sequence by sqrt(hidden), features included. transformers 4
            # does that in GemmaModel.forward on inputs_embeds; transformers 5 in the embedding layer, so only the
            # text it embeds: there the features are scaled here
            features = features * torch.tensor(self.lm.config.hidden_size ** 0.5)
        return torch.cat([embed(torch.tensor(first)), features, embed(torch.tensor(second))])[:self.max_positions]

    @torch.no_grad()
    def embedding_scales(self) -> bool:
        """Whether this transformers' embedding layer scales what it returns (observed, not looked up)."""
        embed = self.lm.get_input_embeddings()
        ids = torch.tensor([0, 1])
        return not torch.equal(embed(ids), embed.weight[ids])

    @torch.no_grad()
    def greedy(self, prompt: str, image: Image.Image | None, max_new_tokens: int) -> list[int]:
        from transformers import RepetitionPenaltyLogitsProcessor

        prefix = self.embeddings(prompt, image)
        penalty = RepetitionPenaltyLogitsProcessor(self.penalty) if self.penalty != 1.0 else None
        generated: list[int] = []
        for _ in range(max_new_tokens):
            new = self.lm.get_input_embeddings()(torch.tensor(generated, dtype=torch.long))
            logits = self.lm(inputs_embeds=torch.cat([prefix, new])[None]).logits[:, -1].float()
            if penalty is not None and generated:
                logits = penalty(torch.tensor([generated]), logits)
            generated.append(int(logits.argmax()))
            if generated[-1] in self.eos:
                break
        return generated

    def stored(self, ids: list[int]) -> str:
        """The CLIs' `tokenizer.decode(output_ids[0]).strip()` on the original's tokenizer."""
        return self.tokenizers.decode(self.folder, ids).strip()
