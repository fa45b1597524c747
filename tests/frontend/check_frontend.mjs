// Drives the real ComfyUI frontend (headless Chromium) against a running server with the pack and tiny models,
// and records what a user would see; tests/test_frontend.py asserts on the report and the server's history.
//   node check_frontend.mjs CONFIG.json REPORT.json
// CONFIG: {server, screenshots, workflows: [{name, path, small}], stream: {workflow, model, max_new_tokens},
//          legacy: {name, workflow}}, where `small` is the workflow's API twin at test size (tests/host.py).
// Checks, in order, on one page: every UI workflow loads (no missing node), converts to its API twin, is set to
// test size through its widgets and runs from the frontend's own queue; the prompt streams onto the node; an
// edit of the prompt re-runs only what is downstream; a stale edit is dropped; the copy button; the text comes
// back after a reload and when the saved workflow is opened again, and after an interrupted answer; a workflow
// saved before the edit inputs loads; hostile text stays text. Right after the workflows ran, the queue / job
// history side panel is opened from the sidebar, as a user does, and what it lists is recorded.
import { chromium } from "playwright-core";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
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
const context = await browser.newContext({ viewport: { width: 1500, height: 950 } });
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
      Object.assign(record, await queueAndWait());
      record.shown = await shown();
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
    const sizeBefore = await page.evaluate((id) => [...window.app.graph.getNodeById(id).size], gen);
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
    return { ...run, generator: String(gen), size_before: sizeBefore, shown: await shown() };
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
    return { first, typed: afterTyping, run, prompt: await page.evaluate(
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
} finally {
  writeFileSync(reportPath, JSON.stringify(report, null, 2));
  await browser.close();
}
