// Loads every shipped UI workflow in the real ComfyUI frontend (headless Chromium) and reports, per
// workflow: node types the frontend does not know, and the API prompt the frontend itself builds
// (app.graphToPrompt). Then checks that text a LLMGA node returns is shown as text, not HTML.
// usage: node check_workflows.mjs SERVER_URL OUT_JSON WORKFLOW.json...
import { chromium } from "playwright-core";
import { readFileSync, writeFileSync } from "node:fs";

const [server, outPath, ...workflowPaths] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],  // playwright gives each launch a fresh profile
});
const result = { workflows: {}, console: [], text_display: null };
try {
  const page = await browser.newPage();
  page.on("console", (m) => { if (m.type() === "error") result.console.push(m.text()); });
  page.on("pageerror", (e) => result.console.push(String(e)));
  await page.goto(server, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.LLMGAPromptGenerator,
                             null, { timeout: 120000 });
  for (const path of workflowPaths) {
    const workflow = JSON.parse(readFileSync(path, "utf8"));
    result.workflows[path] = await page.evaluate(async (wf) => {
      const missing = wf.nodes.map((n) => n.type).filter((t) => !window.LiteGraph.registered_node_types[t]);
      await window.app.loadGraphData(wf, true, true, "llmga-test");
      const prompt = await window.app.graphToPrompt();
      return { missing, output: prompt.output };
    }, workflow);
  }
  // The prompt generator's text widget shows model text literally.
  const hostile = '<img src="x-llmga" onerror="window.__llmga_pwned=1"><b id="llmga-bold">bold</b>';
  result.text_display = await page.evaluate(async (text) => {
    const node = window.app.graph._nodes.find((n) => n.comfyClass === "LLMGAPromptGenerator");
    if (!node) return { error: "no LLMGAPromptGenerator in the last workflow" };
    node.onExecuted({ text: [text] });
    await new Promise((r) => setTimeout(r, 300));
    const widget = node.widgets.find((w) => w.name === "llmga_output_text");
    return {
      value: widget?.llmgaArea?.value ?? null,
      tag: widget?.llmgaArea?.tagName ?? null,
      injected: !!document.querySelector('img[src="x-llmga"]') || !!document.getElementById("llmga-bold"),
      pwned: window.__llmga_pwned === 1,
      serialized: widget ? widget.serialize !== false || widget.options?.serialize !== false : null,
    };
  }, hostile);
  result.hostile = hostile;
} finally {
  await browser.close();
}
writeFileSync(outPath, JSON.stringify(result, null, 2));
