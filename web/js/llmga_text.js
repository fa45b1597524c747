// Shows the text a LLMGA node returns in its ui ("text": [...]) on the node itself.
// Model output is untrusted: it is only ever assigned to a textarea's .value, never parsed as HTML.
import { app } from "../../../scripts/app.js";

const TEXT_NODES = new Set(["LLMGAPromptGenerator", "DiffRIRRestore", "LLMGALongCLIPTextEncode", "LLMGAEdit"]);
const WIDGET_NAME = "llmga_output_text";

function ensureTextWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (widget) return widget;
  const area = document.createElement("textarea");
  area.readOnly = true;
  area.className = "comfy-multiline-input llmga-output-text";
  area.placeholder = "The LLMGA output appears here after a run.";
  area.style.opacity = "0.9";
  widget = node.addDOMWidget(WIDGET_NAME, "llmga_text", area, {
    getValue: () => area.value,
    setValue: (v) => { area.value = v ?? ""; },
    serialize: false, // display only: never sent with the prompt, never saved in widgets_values
  });
  widget.serialize = false;
  widget.options = widget.options || {};
  widget.options.serialize = false;
  widget.llmgaArea = area;
  return widget;
}

app.registerExtension({
  name: "llmga.output_text",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TEXT_NODES.has(nodeData.name)) return;
    const previous = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      previous?.apply(this, arguments);
      const parts = message?.text;
      if (!parts || parts.length === 0) return;
      const widget = ensureTextWidget(this);
      widget.llmgaArea.value = parts.map((p) => String(p)).join("\n");
    };
  },
});
