// The text a LLMGA node returns, shown on the node itself: the Prompt Generator's answer while it is written
// (the pack's "llmga.partial_text" websocket message), its prompt after the run, editable, with a copy button;
// the notes of the other nodes. What was shown is kept in node.properties (saved with the workflow, never sent
// with a prompt), so it comes back after a page reload or when the workflow is opened again.
// Model text is untrusted: it is only ever assigned to a textarea's .value or an element's .textContent.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const TEXT_NODES = new Set(["LLMGAPromptGenerator", "DiffRIRRestore", "LLMGALongCLIPTextEncode", "LLMGAEdit"]);
const EDITOR_NODE = "LLMGAPromptGenerator";
const WIDGET_NAME = "llmga_output_text";
const PROPERTY = "llmga_output";
const EDITED_PROMPT = "edited_prompt"; // the node's own inputs that carry an edit to the server
const EDITED_FROM = "edited_from";
const PARTIAL_TEXT_EVENT = "llmga.partial_text";
const LINE_PX = 16;
const MIN_TEXT_PX = 64;
const MAX_TEXT_PX = 420;
const NOTE_LINE_PX = 14;
const NOTES_MAX_PX = 84;
const BAR_PX = 30;

const streaming = new Set(); // views showing a partial answer, until their node's result (or the run's end)

const asText = (value) => (value === undefined || value === null ? "" : String(value));
// a textarea gives its value back with CR and CRLF as LF, so texts are compared in that form
const asShown = (text) => asText(text).replace(/\r\n?/g, "\n");
const firstText = (list) => (Array.isArray(list) && list.length ? asText(list[0]) : "");
const findWidget = (node, name) => node.widgets?.find((w) => w.name === name);

function setWidgetValue(node, name, value) {
  const widget = findWidget(node, name);
  if (!widget || widget.value === value) return;
  widget.value = value;
  widget.callback?.(value);
}

function hideEditInputs(node) {
  for (const name of [EDITED_PROMPT, EDITED_FROM]) {
    const widget = findWidget(node, name);
    if (!widget) continue;
    widget.hidden = true; // the text box below is their editor
    widget.computeSize = () => [0, -4]; // older LiteGraph without `hidden`
  }
}

// What one run left to show, as saved in node.properties[PROPERTY].
function stateFromMessage(node, message) {
  const notes = Array.isArray(message?.notes) ? message.notes.map(asText) : [];
  if (node.comfyClass === EDITOR_NODE && Array.isArray(message?.prompt)) {
    return {
      text: firstText(message.prompt),
      model_prompt: Array.isArray(message.model_prompt) ? firstText(message.model_prompt) : firstText(message.prompt),
      source_prompt: firstText(message.source_prompt),
      answer_id: firstText(message.answer_id),
      edit: firstText(message.edit),
      notes,
    };
  }
  const parts = Array.isArray(message?.text) ? message.text.map(asText) : [];
  return { text: parts.join("\n"), notes };
}

// lines of `text` at about 60 characters a line of the node's default width
const lineCount = (text) => text.split("\n").reduce((n, line) => n + 1 + Math.floor(line.length / 60), 0);

// the height the box asks of the node: the whole text up to MAX_TEXT_PX (then it scrolls), the notes, the buttons
function viewHeight(view) {
  const text = Math.min(MAX_TEXT_PX, Math.max(MIN_TEXT_PX, lineCount(view.area.value) * LINE_PX + 12));
  const notes = view.info.textContent ? Math.min(NOTES_MAX_PX, lineCount(view.info.textContent) * NOTE_LINE_PX + 4) : 0;
  return text + notes + BAR_PX;
}

function copyText(text) {
  if (navigator.clipboard?.writeText && window.isSecureContext) {
    return navigator.clipboard.writeText(text).catch(() => copyWithSelection(text));
  }
  copyWithSelection(text);
  return Promise.resolve();
}

function copyWithSelection(text) {
  // the fallback for pages served over plain http from another host, where navigator.clipboard is absent
  const scratch = document.createElement("textarea");
  scratch.value = text;
  scratch.setAttribute("readonly", "");
  scratch.style.position = "fixed";
  scratch.style.opacity = "0";
  document.body.appendChild(scratch);
  scratch.select();
  try {
    document.execCommand("copy");
  } finally {
    scratch.remove();
  }
}

function makeButton(label, className, title, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.title = title;
  button.className = "llmga-output-button " + className;
  button.style.cssText = "font-size:11px;padding:1px 8px;cursor:pointer;";
  button.addEventListener("click", (e) => {
    e.stopPropagation();
    onClick();
  });
  return button;
}

function ensureView(node) {
  const existing = findWidget(node, WIDGET_NAME);
  if (existing?.llmgaView) return existing.llmgaView;
  const editor = node.comfyClass === EDITOR_NODE;
  const box = document.createElement("div");
  box.className = "llmga-output";
  box.dataset.llmgaNode = String(node.id);
  box.style.cssText = "display:flex;flex-direction:column;gap:3px;width:100%;height:100%;";
  const area = document.createElement("textarea");
  area.className = "comfy-multiline-input llmga-output-text";
  area.dataset.llmgaNode = String(node.id);
  area.readOnly = true;
  area.spellcheck = false;
  area.placeholder = editor ? "The prompt appears here while it is written; edit it, then queue again."
                            : "The LLMGA output appears here after a run.";
  area.style.cssText = "flex:1 1 auto;min-height:48px;resize:none;box-sizing:border-box;width:100%;";
  const info = document.createElement("div");
  info.className = "llmga-output-notes";
  info.style.cssText = "font-size:11px;line-height:14px;opacity:0.8;white-space:pre-wrap;overflow-wrap:anywhere;" +
                       `max-height:${NOTES_MAX_PX}px;overflow-y:auto;flex:0 0 auto;`;
  const bar = document.createElement("div");
  bar.style.cssText = "display:flex;gap:6px;align-items:center;";
  const status = document.createElement("span");
  status.className = "llmga-output-status";
  status.style.cssText = "font-size:11px;opacity:0.7;flex:1;";
  const view = { node, box, area, info, status, editor, state: null, streaming: false };
  view.copy = makeButton("Copy", "llmga-copy", "Copy the text", () => {
    copyText(area.value).then(() => {
      status.textContent = "copied";
      setTimeout(() => { if (status.textContent === "copied") status.textContent = ""; }, 2000);
    });
  });
  bar.append(view.copy);
  if (editor) {
    view.revert = makeButton("Revert", "llmga-revert", "Drop your edit and use the model's prompt",
                             () => revertEdit(view));
    bar.append(view.revert);
  }
  bar.append(status);
  box.append(area, info, bar);
  // keys typed into the text box must not reach the canvas (delete, copy/paste of nodes …)
  for (const kind of ["keydown", "keyup", "keypress", "paste", "copy", "cut"]) {
    area.addEventListener(kind, (e) => e.stopPropagation());
  }
  area.addEventListener("input", () => onUserEdit(view));
  const widget = node.addDOMWidget(WIDGET_NAME, "llmga_text", box, {
    getValue: () => area.value,
    setValue: (v) => { area.value = asText(v); },
    getMinHeight: () => viewHeight(view),
    serialize: false, // display only: never sent with the prompt, never saved in widgets_values
  });
  widget.serialize = false;
  widget.options = widget.options || {};
  widget.options.serialize = false;
  widget.llmgaArea = area;
  widget.llmgaView = view;
  return view;
}

function grow(node) {
  const wanted = node.computeSize?.();
  if (!wanted) return;
  const width = Math.max(node.size[0], wanted[0]);
  const height = Math.max(node.size[1], wanted[1]);
  if (width !== node.size[0] || height !== node.size[1]) node.setSize?.([width, height]);
  node.setDirtyCanvas?.(true, true);
}

function editedPrompt(node) {
  return asText(findWidget(node, EDITED_PROMPT)?.value);
}

function render(view) {
  const { node, area, info, state } = view;
  view.streaming = false;
  streaming.delete(view);
  area.value = state ? asText(state.text) : "";
  const lines = [];
  if (state?.source_prompt) lines.push("source: " + state.source_prompt);
  for (const note of state?.notes ?? []) lines.push(note);
  info.textContent = lines.join("\n");
  info.style.display = lines.length ? "" : "none";
  if (view.editor) {
    area.readOnly = !state?.answer_id; // nothing to edit before the model has answered
    showEditStatus(view);
  } else {
    view.status.textContent = "";
  }
  grow(node);
}

function showEditStatus(view) {
  const edited = editedPrompt(view.node);
  view.revert.disabled = edited.trim() === "";
  if (!view.revert.disabled && view.state?.edit === "applied" && asShown(edited) === asShown(view.state.text)) {
    view.status.textContent = "your edit is the prompt";
  } else {
    view.status.textContent = view.revert.disabled ? "" : "edited: queue again to use it";
  }
}

function save(view) {
  view.node.properties = view.node.properties || {};
  view.node.properties[PROPERTY] = view.state;
}

function onUserEdit(view) {
  const { node, area, state } = view;
  if (!view.editor || !state?.answer_id || view.streaming) return;
  const text = area.value;
  const same = text === asShown(state.model_prompt) || text.trim() === "";
  setWidgetValue(node, EDITED_PROMPT, same ? "" : text);
  setWidgetValue(node, EDITED_FROM, same ? "" : state.answer_id);
  view.state = { ...state, text: same ? state.model_prompt : text, edit: same ? "none" : "pending" };
  save(view);
  showEditStatus(view);
  node.graph?.setDirtyCanvas?.(true, true);
  grow(node);
}

function revertEdit(view) {
  const { node, state } = view;
  setWidgetValue(node, EDITED_PROMPT, "");
  setWidgetValue(node, EDITED_FROM, "");
  if (state) {
    view.state = { ...state, text: state.model_prompt, edit: "none" };
    save(view);
  }
  render(view);
}

function showOutput(node, message) {
  const view = ensureView(node);
  view.state = stateFromMessage(node, message);
  if (view.editor && firstText(message?.edit) === "dropped") {
    // the edit was made for an earlier answer; the server used the new one
    setWidgetValue(node, EDITED_PROMPT, "");
    setWidgetValue(node, EDITED_FROM, "");
  }
  save(view);
  render(view);
}

function showPartial(node, text) {
  const view = ensureView(node);
  view.streaming = true;
  streaming.add(view);
  view.area.readOnly = true;
  view.area.value = asText(text);
  view.info.textContent = "";
  view.info.style.display = "none";
  view.status.textContent = "writing…";
  grow(node);
}

function nodeForExecutionId(id) {
  const graph = app.graph;
  if (!graph || id === undefined || id === null) return null;
  const key = String(id);
  const direct = graph.getNodeById?.(key) ?? graph.getNodeById?.(Number(key));
  if (direct) return direct;
  // a node inside a subgraph runs as "outer:inner"; the one on screen is the innermost id of the open graph
  const inner = key.split(":").pop();
  const shown = app.canvas?.graph;
  return shown?.getNodeById?.(inner) ?? shown?.getNodeById?.(Number(inner)) ?? null;
}

app.registerExtension({
  name: "llmga.output_text",
  setup() {
    api.addEventListener(PARTIAL_TEXT_EVENT, (event) => {
      const { node: id, text } = event.detail ?? {};
      const node = nodeForExecutionId(id);
      if (node && node.comfyClass === EDITOR_NODE) showPartial(node, text);
    });
    // a run that ended without the node's result (interrupted, an error): back to what the node showed before
    for (const type of ["execution_error", "execution_interrupted", "execution_success"]) {
      api.addEventListener(type, () => {
        for (const view of [...streaming]) render(view);
      });
    }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TEXT_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const hasText = (message?.text?.length ?? 0) > 0 || (message?.prompt?.length ?? 0) > 0;
      if (hasText) showOutput(this, message);
    };
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (nodeData.name === EDITOR_NODE) hideEditInputs(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      if (nodeData.name === EDITOR_NODE) hideEditInputs(this);
      const saved = this.properties?.[PROPERTY];
      if (saved && typeof saved === "object") {
        const view = ensureView(this);
        view.state = {
          text: asText(saved.text), model_prompt: asText(saved.model_prompt ?? saved.text),
          source_prompt: asText(saved.source_prompt), answer_id: asText(saved.answer_id), edit: asText(saved.edit),
          notes: Array.isArray(saved.notes) ? saved.notes.map(asText) : [],
        };
        render(view);
      }
      return result;
    };
  },
});
