// nijimi studio: the generation form, live progress and previews, the gallery, and dropping an image to load its
// settings. Plain ES modules against the server's A1111 API (/sdapi/v1/…) and its own endpoints (/nijimi/v1/…).

import { $, api, base64Of, fillSelect, notice, pngData } from "./api.js";
import { Explainer } from "./explain.js";
import { MaskPainter } from "./mask.js";

const NUMBERS = ["steps", "cfg_scale", "seed", "batch_size", "width", "height"];
const TEXTS = ["prompt", "negative_prompt", "sampler_name", "scheduler"];
const mask = new MaskPainter();
const explainer = new Explainer(() => formBody());
let controlImage = null; // base64 of the ControlNet image

// The form as an A1111 txt2img/img2img body (empty number fields left out: the server's defaults).
function formBody() {
  const body = {};
  for (const key of TEXTS) body[key] = $(key).value;
  for (const key of NUMBERS) {
    if ($(key).value !== "") body[key] = Number($(key).value);
  }
  if (!body.sampler_name) delete body.sampler_name;
  if (mask.init !== null) {
    body.init_images = [mask.init];
    body.denoising_strength = Number($("denoising_strength").value);
    const painted = mask.maskPng();
    if (painted !== null) body.mask = painted;
  }
  if ($("cn_enabled").checked && controlImage !== null) {
    body.alwayson_scripts = { controlnet: { args: [{
      enabled: true, image: controlImage, module: $("cn_module").value, model: $("cn_model").value,
      weight: Number($("cn_weight").value),
    }] } };
  }
  return body;
}

// Put txt2img fields (a gallery entry's, a dropped image's) into the form.
export function fillForm(fields) {
  for (const key of [...TEXTS, ...NUMBERS]) {
    if (fields[key] === undefined) continue;
    const value = fields[key] === null ? "" : String(fields[key]);
    if (key === "sampler_name" && value && ![...$(key).options].some((o) => o.value === value)) {
      $(key).add(new Option(value, value));
    }
    $(key).value = value;
  }
}

function setState(state, text, fraction) {
  $("status").dataset.state = state;
  $("status").textContent = text;
  if (fraction !== undefined) $("progress").value = fraction;
}

// Listen to one job's events (progress with previews) from before it is queued; resolves once the stream is open.
function follow(job) {
  const events = new EventSource(`/nijimi/v1/events?job=${encodeURIComponent(job)}&preview=1`);
  events.addEventListener("started", () => setState("running", "Started", 0));
  events.addEventListener("progress", (event) => {
    const p = JSON.parse(event.data);
    const batch = p.job_count > 1 ? ` (batch ${p.job_no + 1}/${p.job_count})` : "";
    setState("running", `Step ${p.sampling_step}/${p.sampling_steps}${batch}`, p.progress);
    if (p.current_image) $("preview").src = pngData(p.current_image);
  });
  return new Promise((resolve) => {
    events.onopen = () => resolve(events);
    events.onerror = () => resolve(events); // the answer still comes; only the live view is lost
  });
}

async function generate(event) {
  event.preventDefault();
  const body = formBody();
  const job = `page-${Date.now()}-${Math.floor(Math.random() * 1e9)}`;
  Object.assign(body, { force_task_id: job, save_images: true, send_images: true });
  $("go").disabled = true;
  $("cancel").disabled = false;
  setState("queued", "Queued", 0);
  const events = await follow(job);
  try {
    const answer = await api(`/sdapi/v1/${body.init_images ? "img2img" : "txt2img"}`, body);
    const info = JSON.parse(answer.info);
    if (answer.images.length) $("preview").src = pngData(answer.images[0]);
    const made = `${answer.images.length} image${answer.images.length === 1 ? "" : "s"}`;
    if (info.interrupted) setState("interrupted", `Interrupted (${made} finished)`);
    else setState("done", `Done: ${made}, seed ${info.seed}`, 1);
    notice(answer.warnings.length ? `Warnings: ${answer.warnings.join("; ")}` : "");
  } catch (error) {
    setState("failed", `Failed: ${error.message}`);
  } finally {
    events.close();
    $("go").disabled = false;
    $("cancel").disabled = true;
    await showGallery();
  }
}

function describe(fields) {
  const size = fields.width && fields.height ? `${fields.width}×${fields.height}` : "";
  return [`seed ${fields.seed}`, `${fields.steps} steps`, fields.sampler_name || "default sampler",
    fields.scheduler, `CFG ${fields.cfg_scale}`, size].filter(Boolean).join(", ");
}

function galleryItem(entry) {
  const item = document.createElement("li");
  item.dataset.file = entry.file;
  const image = Object.assign(document.createElement("img"), { src: entry.url, alt: entry.fields.prompt });
  const caption = document.createElement("p");
  caption.className = "settings";
  caption.textContent = `${entry.fields.prompt} — ${describe(entry.fields)} (${entry.mode}, ${entry.model})`;
  const download = Object.assign(document.createElement("a"), {
    href: entry.url, download: entry.file, textContent: "Download",
  });
  download.setAttribute("aria-label", `Download ${entry.file}`);
  const use = Object.assign(document.createElement("button"), { type: "button", textContent: "Use settings" });
  use.setAttribute("aria-label", `Use the settings of ${entry.file}`);
  use.addEventListener("click", () => fillForm(entry.fields));
  const explain = Object.assign(document.createElement("button"), { type: "button", textContent: "Explain" });
  explain.setAttribute("aria-label", `Explain ${entry.file}`);
  explain.addEventListener("click", () => { explainer.choose(entry.file); showTab("explain"); });
  item.append(image, caption, download, use, explain);
  return item;
}

async function showGallery() {
  const entries = await api("/nijimi/v1/gallery");
  $("gallery").replaceChildren(...entries.slice().reverse().map(galleryItem));
  explainer.setImages(entries);
}

// A dropped image: its settings (nijimi, A1111 or ComfyUI) into the form, and its model chosen when it is here.
async function dropped(event) {
  event.preventDefault();
  const file = event.dataTransfer.files[0];
  if (!file) return;
  try {
    const recipe = await api("/nijimi/v1/recipe", { image: await base64Of(file) });
    fillForm(recipe.fields);
    const model = [...$("model").options].find((o) => recipe.model && o.value.split(" [")[0] === recipe.model);
    if (model && model.value !== $("model").value) {
      $("model").value = model.value;
      await switchModel();
    }
    const warned = recipe.warnings.length ? `; not reproduced: ${recipe.warnings.join("; ")}` : "";
    notice(`Loaded the settings of ${file.name} (${recipe.source})${warned}`);
  } catch (error) {
    notice(`${file.name}: ${error.message}`);
  }
}

async function switchModel() {
  setState("loading", `Loading ${$("model").value}…`);
  try {
    await api("/sdapi/v1/options", { sd_model_checkpoint: $("model").value });
    setState("idle", `Model ${$("model").value}`);
  } catch (error) {
    setState("failed", `Failed: ${error.message}`);
  }
}

// Add the chosen LoRA to the prompt as <lora:NAME:W>, or change its weight when the prompt has it.
function addLora() {
  const name = $("lora").value;
  if (!name) return;
  const tag = `<lora:${name}:${Number($("lora_weight").value)}>`;
  const escaped = name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  const existing = new RegExp(`<lora:${escaped}(:[^>]*)?>`);
  const prompt = $("prompt").value;
  $("prompt").value = existing.test(prompt) ? prompt.replace(existing, tag) : `${prompt.trimEnd()} ${tag}`.trim();
}

function showTab(name) {
  for (const tab of ["generate", "explain"]) {
    $(tab).hidden = tab !== name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
  }
}

async function optional(path, fallback) {
  try {
    return await api(path);
  } catch {
    return fallback;
  }
}

async function start() {
  const [models, options, samplers, schedulers, loras] = await Promise.all([
    api("/sdapi/v1/sd-models"), api("/sdapi/v1/options"), api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers"),
    api("/sdapi/v1/loras")]);
  fillSelect($("model"), models.map((m) => [m.title, m.title]), options.sd_model_checkpoint);
  fillSelect($("sampler_name"), [["", "model default"], ...samplers.map((s) => [s.name, s.name])], "");
  fillSelect($("scheduler"), schedulers.map((s) => [s.name, s.label]), "automatic");
  fillSelect($("lora"), loras.map((l) => [l.name, l.alias === l.name ? l.name : `${l.name} (${l.alias})`]));
  const [modules, cnModels] = await Promise.all([
    optional("/controlnet/module_list", { module_list: ["none"] }), optional("/controlnet/model_list", { model_list: [] })]);
  fillSelect($("cn_module"), modules.module_list.map((m) => [m, m]), "none");
  fillSelect($("cn_model"), cnModels.model_list.map((m) => [m, m]));
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", () => api("/sdapi/v1/interrupt", {}));
  $("model").addEventListener("change", switchModel);
  $("lora_add").addEventListener("click", addLora);
  $("cn_image").addEventListener("change", async (event) => {
    controlImage = event.target.files[0] ? await base64Of(event.target.files[0]) : null;
  });
  $("tab-generate").addEventListener("click", () => showTab("generate"));
  $("tab-explain").addEventListener("click", () => showTab("explain"));
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", dropped);
  await Promise.all([showGallery(), explainer.start()]);
  document.body.dataset.ready = "true";
}

start().catch((error) => notice(`The page could not start: ${error.message}`));
