// Drives the real ComfyUI frontend (headless Chromium) against a running server with the pack and tiny models,
// and records what a user would see; tests/test_frontend.py asserts on the report and the server's history.
//   node check_frontend.mjs CONFIG.json REPORT.json
// CONFIG: {server, screenshots, workflows: [{name, path, small}], stream: {workflow, model, max_new_tokens},
//          legacy: {name, workflow}, readme: {name}, missing_model: {workflow, folder, name, aside}}, where `small`
//          is the workflow's API twin at test size (tests/host.py).
// Checks, in order, on one page: every UI workflow loads (no missing node), converts to its API twin, is set to
// test size through its widgets and runs from the frontend's own queue; the prompt streams onto the node; an
// edit of the prompt re-runs only what is downstream; a stale edit is dropped; the copy button; the text comes
// back after a reload and when the saved workflow is opened again, and after an interrupted answer; a workflow
// saved before the edit inputs loads; hostile text stays text; with a single-file model removed from the server,
// the frontend's missing-models list offers it for download from the workflow's metadata. Right after the
// workflows ran, the queue / job history side panel is opened from the sidebar, as a user does, and what it lists
// is recorded; so are each workflow's note as the page shows it and where its nodes lie after the run.
import { chromium } from "playwright-core";
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const [configPath, reportPath] = process.argv.slice(2);
const config = JSON.parse(readFileSync(configPath, "utf8"));
mkdirSync(config.screenshots, { recursive: true });
const report = { frontend: null, console: [], workflows: {}, checks: {}, screenshots: [] };
const RUN_TIMEOUT_MS = 300000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"], // playwright gives each launch a fresh profile
});
const VIEWPORT = { width: 1500, height: 950 };
const context = await browser.newContext({ viewport: VIEWPORT });
await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: config.server });
const page = await context.newPage();
page.on("console", (m) => { if (m.type() === "error") report.console.push(m.text()); });
page.on("pageerror", (e) => report.console.push("pageerror: " + String(e)));
// how the server answered the page's requests for the job lists: "GET /api/jobs 404" -> how many times
const listRequests = {};
page.on("response", (r) => {
  const path = new URL(r.url()).pathname;
  if (/^\/(api\/)?(jobs|history|queue)(\/|$)/.test(path)) {
    const key = `${r.request().method()} ${path} ${r.status()}`;
    listRequests[key] = (listRequests[key] ?? 0) + 1;
  }
});

async function openApp() {
  await page.waitForFunction(
    () => window.app?.graph && window.LiteGraph?.registered_node_types?.LLMGAPromptGenerator && window.comfyAPI?.api?.api,
    null, { timeout: 120000 });
  // what the page hears from the server, in order; the test's listeners run after the pack's own
  await page.evaluate(() => {
    const api = window.comfyAPI.api.api;
    const log = (window.__llmgaEvents = []);
    const textOf = (id) => {
      const node = window.app.graph.getNodeById(Number(id)) ?? window.app.graph.getNodeById(id);
      const widget = node?.widgets?.find((w) => w.name === "llmga_output_text");
      return widget ? widget.llmgaArea.value : null;
    };
    for (const type of ["execution_start", "execution_cached", "executing", "executed", "progress",
                        "execution_success", "execution_error", "execution_interrupted", "llmga.partial_text"]) {
      api.addEventListener(type, (e) => {
        const d = e.detail ?? {};
        const node = d.node ?? d.display_node ?? null;
        // what the node's text box holds right after the pack handled this message
        log.push({ type, prompt_id: d.prompt_id ?? null, node, value: d.value ?? null, text: d.text ?? null,
                   nodes: d.nodes ?? null, shown: node !== null ? textOf(node) : null });
      });
    }
    const queue = api.queuePrompt.bind(api);
    window.__llmgaQueued = [];
    api.queuePrompt = async (...args) => {
      const answer = await queue(...args);
      window.__llmgaQueued.push(answer);
      return answer;
    };
  });
}

async function shot(name, nodeId = null) {
  if (nodeId !== null) {
    await page.evaluate((id) => {
      const node = window.app.graph.getNodeById(id);
      if (node && window.app.canvas?.centerOnNode) window.app.canvas.centerOnNode(node);
      window.app.graph.setDirtyCanvas(true, true);
    }, nodeId);
  }
  await page.waitForTimeout(250); // one frame for the canvas and the DOM widgets to follow
  const path = join(config.screenshots, `${name}.png`);
  await page.screenshot({ path });
  report.screenshots.push(path);
}

async function loadWorkflow(workflow, name) {
  return page.evaluate(async ({ wf, name }) => {
    const missing = wf.nodes.map((n) => n.type).filter((t) => !window.LiteGraph.registered_node_types[t]);
    await window.app.loadGraphData(wf, true, true, name);
    const prompt = await window.app.graphToPrompt();
    return { missing, output: prompt.output };
  }, { wf: workflow, name });
}

// Sets widgets by input name to the API values (what a user would type), then returns the frontend's prompt.
async function setWidgets(values) {
  return page.evaluate(async (values) => {
    for (const [id, entry] of Object.entries(values)) {
      const node = window.app.graph.getNodeById(Number(id));
      for (const [name, value] of Object.entries(entry.inputs)) {
        if (Array.isArray(value)) continue; // a link
        const widget = node?.widgets?.find((w) => w.name === name);
        if (widget && widget.value !== value) {
          widget.value = value;
          widget.callback?.(value);
        }
      }
    }
    return (await window.app.graphToPrompt()).output;
  }, values);
}

async function queueAndWait() {
  const before = await page.evaluate(() => window.__llmgaQueued.length);
  await page.evaluate(() => window.app.queuePrompt(0, 1));
  await page.waitForFunction((n) => window.__llmgaQueued.length > n, before, { timeout: 60000 });
  const answer = await page.evaluate((n) => window.__llmgaQueued[n], before);
  const promptId = answer?.prompt_id;
  if (!promptId) throw new Error("the frontend queued nothing: " + JSON.stringify(answer));
  await page.waitForFunction(
    (id) => window.__llmgaEvents.some((e) => e.prompt_id === id &&
      ["execution_success", "execution_error", "execution_interrupted"].includes(e.type)),
    promptId, { timeout: RUN_TIMEOUT_MS, polling: 200 });
  await page.waitForTimeout(300); // the executed messages' handlers have run; let the canvas settle
  const events = await page.evaluate((id) => window.__llmgaEvents.filter((e) => e.prompt_id === id ||
    (e.type === "llmga.partial_text" && e.prompt_id === id)), promptId);
  return { prompt_id: promptId, node_errors: answer.node_errors ?? {}, events };
}

// What the LLMGA text widgets of the open graph show.
async function shown() {
  return page.evaluate(() => {
    const out = {};
    for (const node of window.app.graph._nodes) {
      const widget = node.widgets?.find((w) => w.name === "llmga_output_text");
      const view = widget?.llmgaView;
      if (!view) continue;
      const value = (name) => node.widgets.find((w) => w.name === name)?.value ?? null;
      out[String(node.id)] = {
        type: node.comfyClass, text: view.area.value, tag: view.area.tagName, readOnly: view.area.readOnly,
        notes: view.info.textContent, status: view.status.textContent, size: [node.size[0], node.size[1]],
        edited_prompt: value("edited_prompt"), edited_from: value("edited_from"),
        edit_widgets_hidden: ["edited_prompt", "edited_from"].map(
          (n) => node.widgets.find((w) => w.name === n)?.hidden ?? null),
        property: node.properties?.llmga_output ?? null,
        serialized: widget.serialize !== false || widget.options?.serialize !== false,
      };
    }
    return out;
  });
}

// Where each node of the open graph lies after its previews and text boxes were laid out: its bounding box on the
// canvas (title bar included, as LiteGraph hit-tests it) and the size its contents ask for (computeSize).
async function layout() {
  await page.evaluate(() => window.app.graph.setDirtyCanvas(true, true));
  await page.waitForTimeout(250); // a frame: the frontend sizes nodes to their previews while drawing
  return page.evaluate(() => window.app.graph._nodes.map((node) => {
    const rect = node.boundingRect ?? node.getBounding?.();
    return { id: String(node.id), type: node.type, pos: [...node.pos], size: [...node.size],
             bounds: [...rect].slice(0, 4), wanted: node.computeSize ? [...node.computeSize()].slice(0, 2) : null };
  }));
}

// The Markdown note of the open graph as the page shows it: the canvas moved so the note's top-left corner is in
// view at scale 1; its widget's text, and whether the point on its heading shows that heading (nothing on top).
async function noteShown() {
  const notes = await page.evaluate(() => window.app.graph._nodes.filter((n) => n.type === "MarkdownNote")
    .map((n) => n.id));
  const out = [];
  for (const id of notes) {
    await page.evaluate((id) => {
      const canvas = window.app.canvas, node = window.app.graph.getNodeById(id);
      canvas.ds.scale = 1;
      canvas.ds.offset = [120 - node.pos[0], 160 - node.pos[1]];
      canvas.setDirty(true, true);
    }, id);
    await page.waitForTimeout(300); // DOM widgets follow the canvas on its next frame
    out.push(await page.evaluate((id) => {
      const node = window.app.graph.getNodeById(id);
      const element = node.widgets?.map((w) => w.element).find((e) => e instanceof HTMLElement) ?? null;
      const heading = element?.querySelector("h1, h2, h3") ?? null;
      const box = heading?.getBoundingClientRect();
      const hit = box ? document.elementFromPoint(box.left + Math.min(20, box.width / 2), box.top + box.height / 2)
        : null;
      return { id: String(id), title: node.title, text: element ? element.innerText : null,
               heading: heading?.textContent ?? null,
               heading_visible: !!(box && box.width > 0 && box.height > 0 && hit && heading.contains(hit)),
               widget_value: node.widgets?.[0]?.value ?? null };
    }, id));
  }
  return out;
}

// The whole open graph fitted into a viewport of `size` below the frontend's menus, without the minimap, for a
// picture of the workflow (the viewport is put back afterwards).
async function workflowShot(name, size) {
  const minimap = await page.evaluate(() => window.app.extensionManager?.setting?.get?.("Comfy.Minimap.Visible"));
  if (minimap) await page.evaluate(() => window.app.extensionManager.setting.set("Comfy.Minimap.Visible", false));
  await page.setViewportSize(size);
  try {
    await page.evaluate(() => document.activeElement?.blur?.()); // no focus ring on the text box
    await page.waitForFunction(() => !document.querySelector(".p-toast-message"), null, { timeout: 8000 })
      .catch(() => {}); // the "queued" / "completed" notes fade away
    await page.waitForTimeout(300);
    await page.evaluate(() => {
      const canvas = window.app.canvas, box = [Infinity, Infinity, -Infinity, -Infinity];
      canvas.deselectAll?.(); // no selection outline or selection toolbox in the picture
      for (const node of window.app.graph._nodes) {
        const [x, y, w, h] = node.boundingRect ?? node.getBounding();
        box[0] = Math.min(box[0], x); box[1] = Math.min(box[1], y);
        box[2] = Math.max(box[2], x + w); box[3] = Math.max(box[3], y + h);
      }
      // room for the sidebar on the left and the menus and the run button on top
      const area = canvas.canvas.getBoundingClientRect(), left = 72, top = 96, margin = 16;
      const scale = Math.min((area.width - left - margin) / (box[2] - box[0]),
                             (area.height - top - margin) / (box[3] - box[1]));
      canvas.ds.scale = scale;
      canvas.ds.offset = [left / scale - box[0], top / scale - box[1]];
      canvas.setDirty(true, true);
    });
    await page.waitForTimeout(500);
    const path = join(config.screenshots, `${name}.png`);
    await page.screenshot({ path });
    report.screenshots.push(path);
    return path;
  } finally {
    await page.setViewportSize(VIEWPORT);
    if (minimap) await page.evaluate(() => window.app.extensionManager.setting.set("Comfy.Minimap.Visible", true));
  }
}

// What the frontend lists when a loaded workflow names model files the server lacks: the Missing Models dialog of
// frontends up to 1.2x, the missing-models section of the right side panel's errors / issues tab of later ones
// (opened from the toast's "View details", as a user does). Per listed file: its name, folder, whether a download
// is offered and the URL its "Copy URL" button copies.
async function missingModels(workflow, name) {
  const dialog = page.locator(".comfy-missing-models");
  const details = page.getByRole("button", { name: /view details/i }).first();
  await loadWorkflow(workflow, name);
  const seen = await Promise.any([dialog.waitFor({ state: "visible", timeout: 15000 }).then(() => "dialog"),
                                  details.waitFor({ state: "visible", timeout: 15000 }).then(() => "toast")])
    .catch(() => "none");
  const legacy = seen === "dialog";
  if (legacy) {
    const rows = [];
    for (const row of await dialog.locator("li").all()) {
      const label = (await row.locator("span[title]").first().innerText()).trim();
      await page.evaluate(() => navigator.clipboard.writeText(""));
      await row.getByRole("button", { name: "Copy URL" }).click();
      const [directory, file] = label.split(" / ");
      rows.push({ name: file, directory, download: await row.getByRole("button", { name: /^Download/ }).count() > 0,
                  url: await page.evaluate(() => navigator.clipboard.readText()) });
    }
    await shot(`missing-models-${name}`);
    await page.keyboard.press("Escape");
    await dialog.waitFor({ state: "hidden", timeout: 10000 }).catch(() => {});
    return { ui: "dialog", rows };
  }
  if (seen === "none") return { ui: "none", rows: [] };
  await details.click();
  const section = page.getByText("Missing Models", { exact: true }).first();
  await section.waitFor({ state: "visible", timeout: 10000 });
  await page.waitForTimeout(1000); // the model rows follow the folder listing
  const rows = [];
  const names = await page.evaluate(() => [...document.querySelectorAll("button[title]")]
    .filter((b) => b.textContent.trim() === b.title && /\.(safetensors|sft|ckpt|pt|pth|bin|gguf)$/.test(b.title))
    .map((b) => b.title));
  for (const file of names) {
    // its row: the nearest block around the name that also holds the folder line (or a Download button)
    const row = page.locator(`button[title="${file}"]`).first().locator(
      "xpath=ancestor::div[.//button[normalize-space()='Download'] or .//span[contains(@class,'text-2xs')]][1]");
    const copy = row.getByRole("button", { name: "Copy URL" });
    let url = null;
    if (await copy.count()) {
      await page.evaluate(() => navigator.clipboard.writeText(""));
      await copy.first().click();
      url = await page.evaluate(() => navigator.clipboard.readText());
    }
    const folder = row.locator('span[class*="text-2xs"]');
    rows.push({ name: file, directory: (await folder.count()) ? (await folder.first().innerText()).trim() : null,
                download: await row.locator("button", { hasText: /^\s*Download\s*$/ }).count() > 0, url });
  }
  await shot(`missing-models-${name}`);
  const toggle = page.locator('[aria-label="Toggle properties panel"], [data-testid="right-side-panel-toggle"]');
  if (await toggle.count()) await toggle.first().click().catch(() => {});
  return { ui: "panel", rows };
}

async function check(name, body) {
  try {
    report.checks[name] = await body();
  } catch (e) {
    report.checks[name] = { error: String(e?.stack ?? e) };
    await shot(`error-${name}`).catch(() => {});
  }
  writeFileSync(reportPath, JSON.stringify(report, null, 2));
}

// The rows a side panel lists, top to bottom, scrolled through (the lists are virtual: only the rows in view
// are in the DOM). "queue": the Queue tab of frontends up to 1.2x (a task per run: cover image, status, time,
// number of outputs); "job": the job lists of later frontends (a row per job: its id, a title and the time).
async function panelRows(panelSelector, kind) {
  return page.evaluate(async ({ panelSelector, kind }) => {
    const panel = document.querySelector(panelSelector);
    if (!panel) return null;
    const rowSelector = kind === "queue" ? ".task-item" : "[data-job-id]";
    const read = (el) => kind === "queue" ? {
      title: el.querySelector(".task-result-preview img")?.getAttribute("alt") ?? null,
      src: el.querySelector(".task-result-preview img")?.getAttribute("src") ?? null,
      status: el.querySelector(".status-tag-group .p-tag")?.className.match(/p-tag-(\w+)/)?.[1] ?? null,
      time: el.querySelector(".task-time")?.textContent ?? null,
      outputs: el.querySelector(".tag-wrapper:not(.status-tag-group) button")?.innerText.trim() ?? null,
    } : {
      id: el.dataset.jobId,
      texts: [...el.querySelectorAll("span[title]")].map((s) => s.textContent),
      src: el.querySelector("img")?.getAttribute("src") ?? null,
    };
    const first = panel.querySelector(rowSelector);
    let scroller = first?.parentElement ?? null;
    while (scroller && scroller !== document.body && !(scroller.scrollHeight > scroller.clientHeight + 1 &&
           /(auto|scroll)/.test(getComputedStyle(scroller).overflowY))) scroller = scroller.parentElement;
    if (scroller === document.body) scroller = null;
    const found = new Map();
    const grab = () => {
      const origin = scroller ? scroller.getBoundingClientRect().top - scroller.scrollTop : 0;
      for (const el of panel.querySelectorAll(rowSelector)) {
        const row = read(el);
        const key = JSON.stringify(row);
        if (!found.has(key)) found.set(key, { top: el.getBoundingClientRect().top - origin, row });
      }
    };
    const settle = () => new Promise((r) => setTimeout(r, 200));
    grab();
    if (scroller) {
      for (let i = 0; i < 500; i++) {
        const before = scroller.scrollTop;
        scroller.scrollTop = before + Math.max(40, scroller.clientHeight / 2);
        await settle();
        grab();
        if (scroller.scrollTop === before) break;
      }
      scroller.scrollTop = 0;
      await settle();
    }
    return [...found.values()].sort((a, b) => a.top - b.top).map((f) => f.row);
  }, { panelSelector, kind });
}

// The Queue side panel of frontends up to 1.2x: its sidebar button opens it.
async function queueSidePanel() {
  const button = page.locator(".queue-tab-button");
  const panel = page.locator(".comfy-vue-side-bar-container");
  await button.click();
  await panel.waitFor({ state: "visible", timeout: 10000 });
  await page.waitForFunction(() => document.querySelector(".comfy-vue-side-bar-container .task-item"), null,
                             { timeout: 15000 }).catch(() => {});
  await page.waitForTimeout(500);
  const rows = await panelRows(".comfy-vue-side-bar-container", "queue");
  const title = await panel.locator(".comfy-vue-side-bar-header").innerText();
  await shot("queue-panel");
  await button.click();
  await panel.waitFor({ state: "hidden", timeout: 10000 });
  return { panel: "queue", title, rows };
}

// Later frontends: the job queue floats under the "N active" button; its menu docks it as the Job History side
// panel, which then has a sidebar button of its own (the setting Comfy.Queue.QPOV2; it stays docked).
async function jobHistorySidePanel(runs) {
  const overlay = page.locator('[data-testid="queue-progress-overlay"]');
  const more = overlay.locator('[aria-label="More options"]');
  for (let tries = 0; !(await more.isVisible()) && tries < 3; tries++) { // it may also be opening by itself
    await page.locator('[data-testid="queue-overlay-toggle"]').click();
    await more.waitFor({ state: "visible", timeout: 3000 }).catch(() => {});
  }
  await more.waitFor({ state: "visible", timeout: 10000 });
  const listed = (selector) => page.waitForFunction(({ selector, n }) =>
    document.querySelectorAll(`${selector} [data-job-id]`).length >= n, { selector, n: runs }, { timeout: 10000 })
    .catch(() => {}); // (none come where the host lacks /api/jobs)
  await listed('[data-testid="queue-progress-overlay"]');
  const floating = await panelRows('[data-testid="queue-progress-overlay"]', "job");
  await shot("queue-overlay");
  await more.click();
  await page.locator('[data-testid="docked-job-history-action"], [role^="menuitem"]')
    .filter({ hasText: /docked job history/i }).first().click();
  const panel = page.locator('[data-testid="job-history-sidebar"]');
  const button = page.locator('.job-history-tab-button, [data-testid="job-history-tab-button"]');
  await panel.waitFor({ state: "visible", timeout: 10000 });
  await button.click(); // docking opened it: the sidebar button closes it, and opens it again
  await panel.waitFor({ state: "hidden", timeout: 10000 });
  await button.click();
  await panel.waitFor({ state: "visible", timeout: 10000 });
  await listed('[data-testid="job-history-sidebar"]');
  await page.waitForTimeout(500);
  const rows = await panelRows('[data-testid="job-history-sidebar"]', "job");
  const text = await panel.innerText();
  await shot("queue-panel");
  await button.click();
  await panel.waitFor({ state: "hidden", timeout: 10000 });
  return { panel: "job-history", title: text.split("\n")[0], text, floating, rows };
}

function generatorId(workflow) {
  return workflow.nodes.find((n) => n.type === "LLMGAPromptGenerator")?.id ?? null;
}

try {
  await page.goto(config.server, { waitUntil: "domcontentloaded" });
  await openApp();
  report.frontend = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);

  // 1. every shipped UI workflow: known nodes, its API twin, then a run at test size from the frontend's queue
  for (const entry of config.workflows) {
    const workflow = JSON.parse(readFileSync(entry.path, "utf8"));
    const record = (report.workflows[entry.name] = {});
    try {
      Object.assign(record, await loadWorkflow(workflow, entry.name));
      record.small_output = await setWidgets(entry.small);
      record.notes = await noteShown();
      Object.assign(record, await queueAndWait());
      record.shown = await shown();
      record.layout = await layout();
      await shot(`workflow-${entry.name}`, generatorId(workflow));
    } catch (e) {
      record.error = String(e?.stack ?? e);
    }
    writeFileSync(reportPath, JSON.stringify(report, null, 2));
  }

  // 1b. the queue / job history side panel, opened from the sidebar, lists the runs of step 1 (the server's
  // history and job list at that moment are recorded beside it)
  await check("queue_panel", async () => {
    const runs = Object.values(report.workflows).filter((w) => w.prompt_id).length;
    const legacy = (await page.locator(".queue-tab-button").count()) > 0;
    const result = legacy ? await queueSidePanel() : await jobHistorySidePanel(runs);
    const history = await fetch(`${config.server}/history`).then((r) => r.json());
    const jobs = await fetch(`${config.server}/api/jobs?status=completed,failed,cancelled`);
    return { ...result, requests: { ...listRequests }, server: {
      history: Object.keys(history), jobs_status: jobs.status,
      jobs: jobs.ok ? (await jobs.json()).jobs.map((j) => j.id) : null } };
  });

  const stream = config.stream;
  const streamWorkflow = JSON.parse(readFileSync(stream.path, "utf8"));
  const gen = generatorId(streamWorkflow);

  // 2. streaming: a long answer (a model that never writes its end token) shows on the node while it is written
  await check("stream", async () => {
    await loadWorkflow(streamWorkflow, "llmga-stream");
    const values = JSON.parse(JSON.stringify(stream.small));
    values[String(gen)].inputs.max_new_tokens = stream.max_new_tokens;
    for (const node of Object.values(values)) {
      if (node.class_type === "LLMGAMLLMLoader") node.inputs.model_name = stream.model;
    }
    await setWidgets(values);
    const sizeOf = (id) => {
      const node = window.app.graph.getNodeById(id);
      return { size: [...node.size], wanted: [...node.computeSize()].slice(0, 2) };
    };
    const sizeBefore = await page.evaluate(sizeOf, gen);
    await page.evaluate(() => window.app.queuePrompt(0, 1));
    // a picture of the node mid-answer (best effort: the run may already be over on a fast machine)
    await page.waitForFunction((id) => window.__llmgaEvents.some((e) => e.type === "llmga.partial_text" &&
      String(e.node) === String(id)), gen, { timeout: RUN_TIMEOUT_MS, polling: 50 }).catch(() => {});
    await shot("stream-while-writing", gen);
    const run = await (async () => {
      await page.waitForFunction(() => window.__llmgaQueued.length > 0, null, { timeout: 60000 });
      const promptId = await page.evaluate(() => window.__llmgaQueued[window.__llmgaQueued.length - 1].prompt_id);
      await page.waitForFunction((id) => window.__llmgaEvents.some((e) => e.prompt_id === id &&
        ["execution_success", "execution_error", "execution_interrupted"].includes(e.type)), promptId,
        { timeout: RUN_TIMEOUT_MS, polling: 200 });
      await page.waitForTimeout(300);
      return { prompt_id: promptId,
               events: await page.evaluate((id) => window.__llmgaEvents.filter((e) => e.prompt_id === id), promptId) };
    })();
    await shot("stream-done", gen);
    return { ...run, generator: String(gen), size_before: sizeBefore, size_after: await page.evaluate(sizeOf, gen),
             shown: await shown() };
  });

  // 3. editing the shown prompt: type into the node's text box and queue again
  const edited = "A hand-edited prompt: a lighthouse at dawn, calm sea, soft pastel light.";
  await check("edit", async () => {
    await loadWorkflow(streamWorkflow, "llmga-edit");
    await setWidgets(stream.small);
    const first = await queueAndWait(); // the model's answer for these inputs (generated or from the cache)
    const box = page.locator(`textarea.llmga-output-text[data-llmga-node="${gen}"]`);
    await page.evaluate((id) => window.app.canvas.centerOnNode(window.app.graph.getNodeById(id)), gen);
    await box.click();
    await box.fill(edited);
    const afterTyping = await shown();
    await shot("edit-typed", gen);
    const run = await queueAndWait();
    await shot("edit-rerun", gen);
    const picture = await workflowShot(`workflow-${config.readme.name}-after-edit`, { width: 1720, height: 800 });
    await page.evaluate((id) => window.app.canvas.centerOnNode(window.app.graph.getNodeById(id)), gen);
    return { first, typed: afterTyping, run, picture, prompt: await page.evaluate(
      async () => (await window.app.graphToPrompt()).output), shown: await shown(), edited, generator: String(gen) };
  });

  // 4. the instruction changes after the edit: a new answer, the edit is dropped and its widgets cleared
  await check("stale_edit", async () => {
    await page.evaluate((id) => {
      const node = window.app.graph.getNodeById(id);
      const widget = node.widgets.find((w) => w.name === "instruction");
      widget.value = "a lighthouse on a cliff in a storm, seen from the sea";
      widget.callback?.(widget.value);
    }, gen);
    const before = await shown();
    const run = await queueAndWait();
    await shot("edit-dropped", gen);
    return { before, run, shown: await shown(), generator: String(gen) };
  });

  // 5. copy button: the clipboard gets the text box's text (navigator.clipboard, then the selection fallback)
  await check("copy", async () => {
    await page.evaluate(() => navigator.clipboard.writeText(""));
    const button = page.locator(`.llmga-output[data-llmga-node="${gen}"] button.llmga-copy`);
    await button.click();
    await page.waitForFunction(async () => (await navigator.clipboard.readText()) !== "", null, { timeout: 10000 })
      .catch(() => {});
    const clipboard = await page.evaluate(() => navigator.clipboard.readText());
    // without navigator.clipboard (plain http from another host) the selection is copied
    const fallback = await page.evaluate(async (id) => {
      const copied = [];
      const listen = (e) => {
        const t = e.target;
        copied.push(t && "value" in t ? t.value.slice(t.selectionStart, t.selectionEnd) : String(getSelection()));
      };
      document.addEventListener("copy", listen, true);
      const saved = Object.getOwnPropertyDescriptor(Navigator.prototype, "clipboard");
      Object.defineProperty(Navigator.prototype, "clipboard", { configurable: true, get: () => undefined });
      try {
        document.querySelector(`.llmga-output[data-llmga-node="${id}"] button.llmga-copy`).click();
        await new Promise((r) => setTimeout(r, 100));
      } finally {
        Object.defineProperty(Navigator.prototype, "clipboard", saved);
        document.removeEventListener("copy", listen, true);
      }
      return copied;
    }, gen);
    await shot("copy", gen);
    return { clipboard, fallback, shown: await shown(), generator: String(gen) };
  });

  // 6. reload: the open workflow comes back with its text; then the saved workflow file opened again
  await check("reload", async () => {
    const saved = await page.evaluate(() => JSON.parse(JSON.stringify(window.app.graph.serialize())));
    const before = await shown();
    await page.reload({ waitUntil: "domcontentloaded" });
    await openApp();
    await page.waitForTimeout(500);
    const afterReload = await shown();
    await shot("reload", gen);
    const other = JSON.parse(readFileSync(config.workflows[0].path, "utf8"));
    await loadWorkflow(other, "llmga-other");
    await loadWorkflow(saved, "llmga-reopened");
    const afterReopen = await shown();
    await shot("reopen", gen);
    const prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
    const savedNode = saved.nodes.find((n) => n.id === gen);
    return { before, after_reload: afterReload, after_reopen: afterReopen, saved_properties: savedNode.properties,
             saved_widgets: savedNode.widgets_values, prompt, generator: String(gen) };
  });

  // 6b. a run interrupted while the answer streams: the node goes back to what it showed before
  await check("interrupted", async () => {
    const before = await shown();
    const during = await page.evaluate(async (id) => {
      const api = window.comfyAPI.api.api;
      const deliver = (message) => api.socket.dispatchEvent(
        new MessageEvent("message", { data: JSON.stringify(message) }));
      deliver({ type: "llmga.partial_text", data: { node: String(id), prompt_id: "stopped", text: "half an ans" } });
      await new Promise((r) => setTimeout(r, 100));
      const view = window.app.graph.getNodeById(id).widgets.find((w) => w.name === "llmga_output_text").llmgaView;
      const seen = { text: view.area.value, status: view.status.textContent, readOnly: view.area.readOnly };
      deliver({ type: "execution_interrupted", data: { prompt_id: "stopped", node_id: String(id),
                                                       node_type: "LLMGAPromptGenerator", executed: [] } });
      await new Promise((r) => setTimeout(r, 100));
      return seen;
    }, gen);
    return { before, during, after: await shown(), generator: String(gen) };
  });

  // 7. a workflow saved before the edit inputs existed still loads and converts (defaults for the new inputs)
  await check("legacy", async () => {
    const result = await loadWorkflow(config.legacy.workflow, "llmga-legacy");
    return { ...result, shown: await shown() };
  });

  // 8. hostile text through the real channels: the server's websocket messages as the page receives them
  const hostile = '<img src="x-llmga" onerror="window.__llmga_pwned=1"><b id="llmga-bold">bold</b>' +
                  '<script>window.__llmga_pwned=2</script> https://example.invalid/<i>x</i>';
  await check("hostile", async () => {
    await loadWorkflow(streamWorkflow, "llmga-hostile");
    const result = await page.evaluate(async ({ text, id }) => {
      const api = window.comfyAPI.api.api;
      const deliver = (message) => api.socket.dispatchEvent(
        new MessageEvent("message", { data: JSON.stringify(message) }));
      const graph = window.app.graph;
      const encoder = graph._nodes.find((n) => n.comfyClass === "LLMGALongCLIPTextEncode");
      deliver({ type: "llmga.partial_text", data: { node: String(id), prompt_id: "hostile", text } });
      await new Promise((r) => setTimeout(r, 200));
      const widget = () => graph.getNodeById(id).widgets.find((w) => w.name === "llmga_output_text");
      const partial = widget()?.llmgaView.area.value ?? null;
      const partialTag = widget()?.llmgaView.area.tagName ?? null;
      deliver({ type: "executed", data: { node: String(id), display_node: String(id), prompt_id: "hostile",
        output: { text: [text], prompt: [text], model_prompt: [text], source_prompt: [text], notes: [text],
                  answer_id: ["0123456789abcdef"], edit: ["none"] } } });
      if (encoder) {
        deliver({ type: "executed", data: { node: String(encoder.id), display_node: String(encoder.id),
          prompt_id: "hostile", output: { text: [text] } } });
      }
      await new Promise((r) => setTimeout(r, 300));
      const view = widget()?.llmgaView;
      const other = encoder?.widgets?.find((w) => w.name === "llmga_output_text")?.llmgaView;
      return {
        partial, partial_tag: partialTag,
        value: view?.area.value ?? null, tag: view?.area.tagName ?? null, notes: view?.info.textContent ?? null,
        other_value: other?.area.value ?? null, other_node: encoder ? encoder.comfyClass : null,
        injected: !!document.querySelector('img[src="x-llmga"]') || !!document.getElementById("llmga-bold"),
        pwned: window.__llmga_pwned ?? null,
        host_text_preview: graph._nodes.some((n) => n.widgets?.some((w) => w.name === "$$node-text-preview")),
      };
    }, { text: hostile, id: gen });
    await shot("hostile", gen);
    return { ...result, hostile };
  });

  // 9. a single-file model the server lacks: the frontend lists it, and offers its download from the workflow's
  // metadata (node.properties.models); the same workflow without the metadata, for comparison. The file is moved
  // aside for this check only, and the page reloaded so that the frontend asks the server for its lists again.
  await check("missing_models", async () => {
    const missing = config.missing_model;
    const file = join(missing.folder, missing.name);
    renameSync(file, missing.aside);
    try {
      await page.reload({ waitUntil: "domcontentloaded" });
      await openApp();
      await page.waitForTimeout(500);
      const options = await page.evaluate(async () => (await window.comfyAPI.api.api.getNodeDefs()).VAELoader
        .input.required.vae_name);
      const workflow = JSON.parse(readFileSync(missing.workflow, "utf8"));
      const withMetadata = await missingModels(workflow, "llmga-missing-model");
      const bare = JSON.parse(JSON.stringify(workflow));
      for (const node of bare.nodes) delete node.properties?.models;
      const withoutMetadata = await missingModels(bare, "llmga-missing-model-bare");
      return { listed_by_server: JSON.stringify(options).includes(missing.name), with_metadata: withMetadata,
               without_metadata: withoutMetadata };
    } finally {
      if (existsSync(missing.aside)) renameSync(missing.aside, file);
    }
  });
} finally {
  writeFileSync(reportPath, JSON.stringify(report, null, 2));
  await browser.close();
}
