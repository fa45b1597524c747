"""UI-format (LiteGraph) <-> API-format workflow conversion, driven by the server's /object_info.

The UI workflows in workflows/ are what users drag into ComfyUI; their API twins in workflows/api/ are
what scripts queue. Tests convert each UI workflow to API format the way the frontend maps widgets
(positional widgets_values, an extra value after inputs with control_after_generate, links win over
widget values) and require it to equal the shipped twin, so the two can never drift apart.
The UI files are generated from the API twins by `api_to_ui`, with what only the canvas has: a Markdown note
(`note_text`: what the workflow does, its models with their sources and folders, its settings; the prompt never
carries it), the download metadata of single-file models in the loader's properties.models (the frontend's
missing-models list offers the file from it), and a layout with room for each node's pictures and text boxes.
After editing a twin, its description (DESCRIPTIONS) or a node's inputs or outputs, regenerate them on the
newest host (tests.host.HOST_VERSIONS[0]; a real one is started for /object_info):

    .venv-comfyui-0.33.0/bin/python -m tests.workflow_format          # rewrite workflows/*.json from workflows/api/
    .venv-comfyui-0.33.0/bin/python -m tests.workflow_format --check  # exit 1 if any is out of date
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _ordered_inputs(info: dict):
    """(name, spec, optional) in the node's declared order."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            yield name, info["input"][section][name], section == "optional"


def _is_widget(spec) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _type_name(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _extra_widget_values(spec) -> list:
    """Values the frontend stores after a widget's own: the control_after_generate mode, the upload button."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (["fixed"] if opts.get("control_after_generate") else []) + (["image"] if opts.get("image_upload") else [])


def ui_to_api(ui: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] in UI_ONLY_TYPES:
            continue  # muted / bypassed nodes and notes are not sent
        info = object_info[node["type"]]
        linked = {inp["name"]: inp["link"] for inp in node.get("inputs", []) if inp.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs, cursor = {}, 0
        for name, spec, _optional in _ordered_inputs(info):
            if _is_widget(spec):
                if cursor < len(values):
                    inputs[name] = values[cursor]
                cursor += 1 + len(_extra_widget_values(spec))
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
        entry = {"inputs": inputs, "class_type": node["type"]}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        api[str(node["id"])] = entry
    return api


# Frontend-only node types: drawn on the canvas, never part of a prompt (the frontend's graphToPrompt skips them).
UI_ONLY_TYPES = {"Note", "MarkdownNote"}
NOTE_TYPE = "MarkdownNote"  # the frontend's Markdown note, as ComfyUI's own templates use

# Layout, in canvas units. A node's pos is the top of its body; its title bar (30) sits above it.
TITLE_HEIGHT = 30
TOP = 80
LEFT = 60
COLUMN_GAP = 70
ROW_GAP = TITLE_HEIGHT + 50  # from one node's bottom to the next one's body: its title and a clear gap
DEFAULT_WIDTH = 360
WIDTHS = {"LLMGAPromptGenerator": 460, "LoadImage": 400, "SaveImage": 460, "PreviewImage": 460,
          NOTE_TYPE: 540}
# Room for what a node shows below its widgets: the picture of LoadImage and of the saved / previewed images,
# the text box of the pack's text nodes (web/js/llmga_text.js: the Prompt Generator's box grows up to 420 for
# the text, 84 for the notes and 30 for its buttons; the other nodes show a few lines of notes).
SHOWN_HEIGHT = {"LoadImage": 360, "SaveImage": 480, "PreviewImage": 480, "LLMGAPromptGenerator": 540,
                "LLMGALongCLIPTextEncode": 150, "DiffRIRRestore": 150, "LLMGAEdit": 150}
NOTE_LINE_HEIGHT = 21  # a wrapped line of the note's Markdown, at about NOTE_LINE_CHARS characters
NOTE_LINE_CHARS = 64


def _node_height(class_type: str, inputs: list, widgets: list, info: dict, boxes: int) -> int:
    """Title-less height: the sockets, the widgets, `boxes` multiline text boxes and what the node shows."""
    sockets = max(len(inputs) - sum(1 for i in inputs if "widget" in i), len(info["output"]))
    return 40 + 22 * sockets + 28 * len(widgets) + 90 * boxes + SHOWN_HEIGHT.get(class_type, 0)


def _columns(depth: dict, heights: dict) -> list[list[str]]:
    """Node ids by column: one column per dependency depth, then runs of consecutive short columns stacked
    into one (the later depth below) while the stack stays within the tallest single column."""
    by_depth = {}
    for nid in sorted(depth, key=lambda n: (depth[n], int(n))):
        by_depth.setdefault(depth[nid], []).append(nid)
    stack = lambda ids: sum(heights[n] for n in ids) + ROW_GAP * (len(ids) - 1)  # noqa: E731
    limit = max(stack(ids) for ids in by_depth.values())
    columns = []
    for d in sorted(by_depth):
        if columns and stack(columns[-1] + by_depth[d]) <= limit:
            columns[-1] = columns[-1] + by_depth[d]
        else:
            columns.append(list(by_depth[d]))
    return columns


def api_to_ui(api: dict, object_info: dict, positions: dict | None = None, name: str | None = None,
              note: str | None = None) -> dict:
    """A LiteGraph workflow with the same graph; nodes laid out left to right by dependency depth, each with
    room for the picture or text it shows after a run. `name` (the file stem) makes the workflow id unique;
    without it the id derives from the node ids. `note` (Markdown) becomes a note node left of the graph;
    a loader whose file is a released single file (models_metadata) carries it in properties.models, which
    the frontend reads to offer the file for download when it is missing."""
    depth = {}

    def node_depth(nid):
        if nid not in depth:
            srcs = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((node_depth(s) for s in srcs), default=-1)
        return depth[nid]

    for nid in api:
        node_depth(nid)
    nodes, links = [], []
    out_links = {}
    link_id = 0
    heights = {}
    for nid in sorted(api, key=lambda n: (depth[n], int(n))):
        node = api[nid]
        info = object_info[node["class_type"]]
        inputs, widgets, boxes = [], [], 0
        for input_name, spec, optional in _ordered_inputs(info):
            value = node["inputs"].get(input_name)
            is_link = isinstance(value, list)
            if _is_widget(spec):
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                boxes += bool(opts.get("multiline")) and not is_link
                default = opts.get("default")
                if default is None and isinstance(spec[0], list) and spec[0]:
                    default = spec[0][0]
                widgets.append(default if is_link or value is None else value)
                widgets.extend(_extra_widget_values(spec))
                if is_link:
                    link_id += 1
                    inputs.append({"name": input_name, "type": _type_name(spec), "widget": {"name": input_name},
                                   "link": link_id})
                    links.append([link_id, int(value[0]), value[1], int(nid), len(inputs) - 1, _type_name(spec)])
                    out_links.setdefault((value[0], value[1]), []).append(link_id)
            else:
                entry = {"name": input_name, "type": spec[0], "link": None}
                if optional:
                    entry["shape"] = 7
                if is_link:
                    link_id += 1
                    entry["link"] = link_id
                    links.append([link_id, int(value[0]), value[1], int(nid), len(inputs), spec[0]])
                    out_links.setdefault((value[0], value[1]), []).append(link_id)
                inputs.append(entry)
        heights[nid] = _node_height(node["class_type"], inputs, widgets, info, boxes)
        properties = {"Node name for S&R": node["class_type"]}
        models = models_metadata(node)
        if models:
            properties["models"] = models
        ui_node = {"id": int(nid), "type": node["class_type"], "pos": None,
                   "size": [WIDTHS.get(node["class_type"], DEFAULT_WIDTH), heights[nid]], "flags": {},
                   "order": 0, "mode": 0, "inputs": inputs, "outputs": [], "properties": properties,
                   "widgets_values": widgets}
        if node.get("_meta", {}).get("title"):
            ui_node["title"] = node["_meta"]["title"]
        nodes.append(ui_node)
    columns = _columns(depth, heights)
    by_id = {str(n["id"]): n for n in nodes}
    tallest = max(sum(heights[n] for n in ids) + ROW_GAP * (len(ids) - 1) for ids in columns)
    x = LEFT
    last_id = max(int(n) for n in api)
    if note is not None:
        wrapped = sum(1 + len(line) // NOTE_LINE_CHARS for line in note.split("\n"))
        note_node = {"id": last_id + 1, "type": NOTE_TYPE, "pos": [x, TOP],
                     "size": [WIDTHS[NOTE_TYPE], max(tallest, 40 + NOTE_LINE_HEIGHT * wrapped)], "flags": {},
                     "order": 0, "mode": 0, "inputs": [], "outputs": [], "title": "About this workflow",
                     "properties": {}, "widgets_values": [note], "color": "#432", "bgcolor": "#653"}
        last_id += 1
        x += WIDTHS[NOTE_TYPE] + COLUMN_GAP
    for ids in columns:
        y = TOP
        for nid in ids:
            by_id[nid]["pos"] = (positions or {}).get(nid, [x, y])
            y += heights[nid] + ROW_GAP
        x += max(by_id[nid]["size"][0] for nid in ids) + COLUMN_GAP
    for order, ui_node in enumerate(sorted(nodes, key=lambda n: depth[str(n["id"])])):
        ui_node["order"] = order
        info = object_info[ui_node["type"]]
        names = info.get("output_name") or info["output"]
        for slot, (kind, output_name) in enumerate(zip(info["output"], names)):
            ui_node["outputs"].append({"name": output_name, "type": kind,
                                       "links": out_links.get((str(ui_node["id"]), slot), []),
                                       "slot_index": slot})
    if note is not None:
        note_node["order"] = len(nodes)
        nodes.insert(0, note_node)
    seed = "llmga-workflow:" + name if name else repr(sorted(api))
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, seed)), "revision": 0,
            "last_node_id": last_id, "last_link_id": link_id, "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4}


# ------------------------------------------------------------------------------------------------ the notes

HF = "https://huggingface.co"


def _release(class_type: str, input_name: str, value):
    """(models/ subfolder, release) for a loader's model input (release None when it is not a released one)."""
    from llmga_core.releases import release_for_model
    from llmga_core.run_workflow import MODEL_INPUTS

    folder = MODEL_INPUTS.get((class_type, input_name))
    if folder is None or not isinstance(value, str):
        return None
    return folder, release_for_model(folder, value)


def models_metadata(node: dict) -> list[dict]:
    """The frontend's model metadata for a loader of a single-file release on the Hub (the editing VAE):
    [{name, url, directory}], read by the frontend's missing-models check (in node.properties.models)."""
    found = []
    for input_name, value in node["inputs"].items():
        hit = _release(node["class_type"], input_name, value)
        if hit and hit[1] is not None and hit[1].repo_id and not hit[1].whole_folder:
            folder, release = hit
            found.append({"name": value, "url": f"{HF}/{release.repo_id}/resolve/main/{value}",
                          "directory": folder})
    return found


# What each shipped workflow does, and remarks on its settings (the settings themselves are read from the
# workflow). Markdown, shown in the note node of the UI workflow.
DESCRIPTIONS = {
    "llmga_quickstart": (
        "LLMGA quick start: text to image",
        "Type an idea into the **LLMGA Prompt Generator**; LLMGA's smallest MLLM (Qwen2-0.5B) writes a detailed "
        "prompt for it, shown in the node's text box (edit it there and queue again to use your words). The "
        "long-prompt CLIP encoder encodes the whole prompt as LLMGA's pipelines do, and llmga-sd15-t2i-v2 "
        "renders it at 512×512.\n\nWithout the browser, in the pack's folder: `python -m llmga_core.run_workflow "
        "workflows/api/llmga_quickstart.json --download` fetches the models below and runs it.",
        "`ipndm` on the `ddim_uniform` grid stands in for the original's PNDM (PLMS) scheduler."),
    "llmga_t2i_sd15": (
        "LLMGA: text to image (SD1.5)",
        "An idea → the MLLM (Vicuna-7B) writes a detailed prompt, shown and editable in the Prompt Generator's "
        "text box → long-prompt CLIP encoding → llmga-sd15-t2i-v2 at 512×512.",
        "`ipndm` on the `ddim_uniform` grid stands in for the original's PNDM (PLMS) scheduler."),
    "llmga_t2i_sdxl": (
        "LLMGA: text to image (SDXL)",
        "An idea → the MLLM (Llama-3-8B) writes a detailed prompt, shown and editable in the Prompt "
        "Generator's text box → long-prompt CLIP encoding (both SDXL text encoders, zero negative) → "
        "llmga-sdxl-t2i at 1024×1024.",
        "`euler` on `ddim_uniform` is the original's Euler with \"leading\" timestep spacing."),
    "llmga_inpaint_sd15_diffrir": (
        "LLMGA: inpainting + DiffRIR (SD1.5)",
        "Load an image whose transparent pixels are the hole (paint it in the mask editor). The MLLM sees the "
        "hole black and describes what belongs there → llmga-sd15-inpainting-v2 fills it through "
        "InpaintModelConditioning (image and mask resized to 512×512, mask binarised at 0.5) → DiffRIR ×1 "
        "removes the seams between the new and the kept pixels.",
        "`ipndm` on the `ddim_uniform` grid stands in for the original's PNDM (PLMS) scheduler."),
    "llmga_outpaint_sd15_diffrir": (
        "LLMGA: outpainting + DiffRIR (SD1.5)",
        "The image is padded (ImagePadForOutpaint, no feathering); the MLLM describes the whole picture → "
        "llmga-sd15-inpainting-v2 fills the new border (resized to 512×512) → DiffRIR ×1 removes the seams.",
        "`ipndm` on the `ddim_uniform` grid stands in for the original's PNDM (PLMS) scheduler."),
    "llmga_inpaint_sdxl_diffrir": (
        "LLMGA: inpainting + DiffRIR (SDXL)",
        "As the SD1.5 inpainting, with the MLLM Llama-3-8B and llmga-sdxl-inpainting-v2 at 1024×1024, zero "
        "negative → DiffRIR ×1.",
        "The original's strength 0.8 over 30 steps is KSamplerAdvanced's 30 steps from step 6; `euler` on "
        "`ddim_uniform` is its Euler with \"leading\" spacing."),
    "llmga_similar_sd15": (
        "LLMGA: similar image (SD1.5)",
        "Load a picture; the MLLM (Vicuna-7B, LLMGA's \"Generate a similar image.\") describes it → long-prompt "
        "CLIP encoding → llmga-sd15-t2i-v2 renders a new picture of the same content at 512×512.",
        "`ipndm` on the `ddim_uniform` grid stands in for the original's PNDM (PLMS) scheduler."),
    "llmga_similar_sdxl": (
        "LLMGA: similar image (SDXL)",
        "Load a picture; the MLLM (Llama-3-8B) describes it → long-prompt CLIP encoding → llmga-sdxl-t2i "
        "renders a new picture of the same content at 1024×1024.",
        "`euler` on `ddim_uniform` is the original's Euler with \"leading\" timestep spacing."),
    "llmga_edit_sd15": (
        "LLMGA: instruction editing (SD1.5)",
        "Load a picture and write an instruction (\"Make it snowy.\"). The MLLM (Vicuna-7B) writes a caption "
        "of the source image, then one of the target → **LLMGA Edit** edits the picture on llmga-sd15-t2i-v2 "
        "with the sd-vae-ft-mse VAE (at 512×512, as the original) → the edited image and the edit mask are "
        "saved.",
        "LLMGA Edit's values are the original editing script's defaults."),
    "llmga_dialogue_sd15": (
        "LLMGA: a prompt refined in a dialogue (SD1.5)",
        "Three chained Prompt Generators (Vicuna-7B) share one conversation: an idea (text-to-image), then two "
        "refinements (chat). Each turn's prompt is shown on its node; the third is rendered with "
        "llmga-sd15-t2i-v2 at 512×512.",
        "`ipndm` on the `ddim_uniform` grid stands in for the original's PNDM (PLMS) scheduler."),
}


def _fmt(value) -> str:
    return f"`{value}`" if isinstance(value, str) else str(value)


def _settings(api: dict) -> list[str]:
    """The settings of the workflow's generating nodes, as lines of a Markdown list."""
    lines = []

    def add(line):
        if line not in lines:
            lines.append(line)

    for nid in sorted(api, key=int):
        kind, inputs = api[nid]["class_type"], api[nid]["inputs"]
        value = {k: v for k, v in inputs.items() if not isinstance(v, list)}
        if kind == "LLMGAPromptGenerator":
            sampling = "greedy" if value["temperature"] == 0 else "sampled"
            add(f"Prompt Generator, task {_fmt(value['task'])}: {sampling} (temperature {value['temperature']}, "
                f"top_p {value['top_p']}), up to {value['max_new_tokens']} new tokens")
        elif kind == "KSampler":
            add(f"KSampler: {value['steps']} steps, CFG {value['cfg']}, {_fmt(value['sampler_name'])} / "
                f"{_fmt(value['scheduler'])}, denoise {value['denoise']}")
        elif kind == "KSamplerAdvanced":
            add(f"KSamplerAdvanced: {value['steps']} steps from step {value['start_at_step']}, CFG {value['cfg']}, "
                f"{_fmt(value['sampler_name'])} / {_fmt(value['scheduler'])}")
        elif kind == "EmptyLatentImage":
            add(f"Size: {value['width']}×{value['height']}")
        elif kind == "ImageScale":
            add(f"Image and mask resized to {value['width']}×{value['height']} ({value['upscale_method']})")
        elif kind == "ImagePadForOutpaint":
            add("Padding: " + ", ".join(f"{side} {value[side]}" for side in ("left", "top", "right", "bottom"))
                + f", feathering {value['feathering']}")
        elif kind == "LLMGALongCLIPTextEncode":
            add(f"Long-prompt encoding: pipeline {_fmt(value['pipeline'])}, layout {_fmt(value['layout'])}")
        elif kind == "LLMGAEdit":
            add("LLMGA Edit: " + ", ".join(f"{k} {v}" for k, v in value.items() if k != "seed"))
        elif kind == "DiffRIRRestore":
            add(f"DiffRIR Restore: tile_size {value['tile_size']} (bounds memory; the result is the same)")
    return lines


def _models(api: dict) -> tuple[list[str], list[str]]:
    """Each model the workflow loads, where it comes from and the folder it goes in (Markdown list lines), and
    the release names the download command takes."""
    from llmga_core.releases import RELEASES, VISION_TOWER

    lines, names = [], []
    for nid in sorted(api, key=int):
        node = api[nid]
        for input_name, value in node["inputs"].items():
            hit = _release(node["class_type"], input_name, value)
            if hit is None:
                continue
            folder, release = hit
            where = f"`models/{folder}/{value}/`" if release is not None and release.whole_folder \
                else f"`models/{folder}/`"
            if release is None:
                line = f"**{value}** → {where}"
            elif release.repo_id is None:
                line = (f"**{value}** (DiffRIR ×1 weights, on Google Drive only: the \"pretrained models\" of "
                        f"[Zj-BinXia/DiffRIR](https://github.com/Zj-BinXia/DiffRIR)) → {where}")
            elif release.whole_folder:
                line = f"**{value}**: [{release.repo_id}]({HF}/{release.repo_id}) → {where}"
            else:
                line = (f"**{value}**: [{release.repo_id}]({HF}/{release.repo_id}/blob/main/{value}) → {where}")
            if line in lines:
                continue
            lines.append(line)
            if release is not None and release.repo_id:
                names.append(value)
            if release is not None and release.kind == "mllm":
                tower = RELEASES[VISION_TOWER]
                line = (f"**{VISION_TOWER}** (the MLLM's vision tower): [{tower.repo_id}]({HF}/{tower.repo_id}) → "
                        f"`models/{tower.subfolder}/{VISION_TOWER}/`")
                if line not in lines:
                    lines.append(line)
    return lines, names


def note_text(name: str, api: dict) -> str:
    """The Markdown of a shipped workflow's note: what it does, its models and their folders, its settings."""
    if name not in DESCRIPTIONS:
        raise KeyError(f"workflows/api/{name}.json has no description in tests/workflow_format.py DESCRIPTIONS")
    title, what, remark = DESCRIPTIONS[name]
    models, names = _models(api)
    parts = [f"## {title}", "", what, "", "### Models", ""]
    parts += [f"- {line}" for line in models]
    parts += ["", "Download the Hub ones with the **LLMGA Download Model** node, or in the pack's folder (an MLLM "
              "comes with its vision tower):", "",
              "```", f"python -m llmga_core.downloads {' '.join(names)} --models-dir ComfyUI/models", "```", "",
              "Then press *r* in ComfyUI to refresh the model lists.", "", "### Settings", "",
              "The original's settings:", ""]
    parts += [f"- {line}" for line in _settings(api)]
    parts += ["", remark]
    return "\n".join(parts)


WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def render_ui(api_path: Path, object_info: dict) -> str:
    """The UI twin's file text for an API workflow, as shipped (2-space JSON, no final newline)."""
    api = json.loads(api_path.read_text())
    return json.dumps(api_to_ui(api, object_info, name=api_path.stem, note=note_text(api_path.stem, api)), indent=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Generate workflows/*.json from their API twins in workflows/api/.")
    parser.add_argument("--check", action="store_true", help="only report UI files that differ; exit 1 if any")
    args = parser.parse_args(argv)
    from .host import HOST_VERSIONS, ComfyServer, host_version

    if host_version() != HOST_VERSIONS[0]:
        print(f"the UI workflows are written on ComfyUI {HOST_VERSIONS[0]}; run this with LLMGA_HOST_VERSION unset "
              f"and .venv-comfyui-{HOST_VERSIONS[0]}/bin/python", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as base:
        server = ComfyServer(Path(base)).start()
        try:
            object_info = server.get("/object_info")
        finally:
            server.stop()
    stale = []
    for api_path in sorted((WORKFLOWS / "api").glob("*.json")):
        ui_path = WORKFLOWS / api_path.name
        text = render_ui(api_path, object_info)
        if ui_path.is_file() and ui_path.read_text() == text:
            continue
        stale.append(ui_path.name)
        if not args.check:
            ui_path.write_text(text)
    verb = "out of date" if args.check else "written"
    print(f"{verb}: {', '.join(stale)}" if stale else "all UI workflows match their API twins")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
