"""UI-format (LiteGraph) <-> API-format workflow conversion, driven by the server's /object_info.

The UI workflows in workflows/ are what users drag into ComfyUI; their API twins in workflows/api/ are
what scripts queue. Tests convert each UI workflow to API format the way the frontend maps widgets
(positional widgets_values, an extra value after inputs with control_after_generate, links win over
widget values) and require it to equal the shipped twin, so the two can never drift apart.
The UI files are generated from the API twins by `api_to_ui`; after editing a twin or a node's inputs or
outputs, regenerate them on the newest host (tests.host.HOST_VERSIONS[0]; a real one is started for
/object_info):

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
        if node.get("mode", 0) != 0:
            continue  # muted / bypassed nodes are not sent
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


def api_to_ui(api: dict, object_info: dict, positions: dict | None = None, name: str | None = None) -> dict:
    """A LiteGraph workflow with the same graph; nodes laid out left to right by dependency depth.
    `name` (the file stem) makes the workflow id unique; without it the id derives from the node ids."""
    depth = {}

    def node_depth(nid):
        if nid not in depth:
            srcs = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((node_depth(s) for s in srcs), default=-1)
        return depth[nid]

    for nid in api:
        node_depth(nid)
    rows = {}  # column -> next free y
    nodes, links = [], []
    out_links = {}
    link_id = 0
    for nid in sorted(api, key=lambda n: (depth[n], int(n))):
        node = api[nid]
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for input_name, spec, optional in _ordered_inputs(info):
            value = node["inputs"].get(input_name)
            is_link = isinstance(value, list)
            if _is_widget(spec):
                default = spec[1].get("default") if len(spec) > 1 and isinstance(spec[1], dict) else None
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
        column = depth[nid]
        multiline = sum(1 for _, spec, _ in _ordered_inputs(info)
                        if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("multiline"))
        sockets = max(len(inputs) - sum(1 for i in inputs if "widget" in i), len(info["output"]))
        height = 40 + 22 * sockets + 28 * len(widgets) + 90 * multiline
        top = rows.get(column, 60)
        rows[column] = top + height + 60
        pos = (positions or {}).get(nid, [60 + column * 460, top])
        ui_node = {"id": int(nid), "type": node["class_type"], "pos": pos, "size": [400, height], "flags": {},
                   "order": 0, "mode": 0, "inputs": inputs, "outputs": [],
                   "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets}
        if node.get("_meta", {}).get("title"):
            ui_node["title"] = node["_meta"]["title"]
        nodes.append(ui_node)
    for order, ui_node in enumerate(sorted(nodes, key=lambda n: depth[str(n["id"])])):
        ui_node["order"] = order
        info = object_info[ui_node["type"]]
        names = info.get("output_name") or info["output"]
        for slot, (kind, output_name) in enumerate(zip(info["output"], names)):
            ui_node["outputs"].append({"name": output_name, "type": kind,
                                       "links": out_links.get((str(ui_node["id"]), slot), []),
                                       "slot_index": slot})
    seed = "llmga-workflow:" + name if name else repr(sorted(api))
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, seed)), "revision": 0,
            "last_node_id": max(int(n) for n in api), "last_link_id": link_id, "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4}


WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def render_ui(api_path: Path, object_info: dict) -> str:
    """The UI twin's file text for an API workflow, as shipped (2-space JSON, no final newline)."""
    return json.dumps(api_to_ui(json.loads(api_path.read_text()), object_info, name=api_path.stem), indent=2)


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
