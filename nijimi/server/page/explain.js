// The Explain tab: the views of GET /nijimi/v1/explain, run by POST /nijimi/v1/explain/<name> on a gallery image
// (views whose input is an image) or on the form's settings (views whose input is a prompt); each answer's panels
// are shown as labelled images, its info as JSON.

import { $, api, base64Of, fillSelect, pngData } from "./api.js";

export class Explainer {
  constructor(formBody) {
    this.formBody = formBody;
    this.views = [];
    this.images = [];
    $("explain_view").addEventListener("change", () => this.describe());
    $("explain_run").addEventListener("click", () => this.run());
  }

  async start() {
    try {
      this.views = await api("/nijimi/v1/explain");
    } catch (error) {
      this.views = [];
      $("explain_status").textContent = `No explain views on this server (${error.message}).`;
    }
    fillSelect($("explain_view"), this.views.map((v) => [v.name, v.title || v.name]));
    this.describe();
  }

  // The gallery's images (oldest first) as the choices of an image view; the newest is chosen.
  setImages(entries) {
    this.images = entries;
    const newest = entries.length ? entries[entries.length - 1].file : "";
    fillSelect($("explain_image"), entries.slice().reverse().map((e) => [e.file, e.file]), newest);
  }

  choose(file) {
    $("explain_image").value = file;
  }

  view() {
    return this.views.find((v) => v.name === $("explain_view").value);
  }

  describe() {
    const view = this.view();
    $("explain_about").textContent = !view ? "" : view.input === "image"
      ? "Runs on the gallery image chosen here (at the timesteps given, or the view's own)."
      : "Runs on the Generate tab's settings (prompt, seed, sampler …).";
  }

  async body(view) {
    if (view.input !== "image") {
      const words = $("explain_words").value.split(",").map((w) => w.trim()).filter(Boolean);
      return view.name === "attention" && words.length ? { ...this.formBody(), words } : this.formBody();
    }
    const entry = this.images.find((e) => e.file === $("explain_image").value);
    if (!entry) throw new Error("make an image first: this view explains a gallery image");
    const body = { image: await base64Of(await (await fetch(entry.url)).blob()) };
    const timesteps = $("explain_timesteps").value.split(/[\s,]+/).filter(Boolean).map(Number);
    if (timesteps.length) body.timesteps = timesteps;
    return body;
  }

  async run() {
    const view = this.view();
    if (!view) return;
    const status = $("explain_status");
    status.textContent = `Running ${view.name}…`;
    $("explain_panels").replaceChildren();
    $("explain_info").textContent = "";
    try {
      const answer = await api(`/nijimi/v1/explain/${encodeURIComponent(view.name)}`, await this.body(view));
      $("explain_panels").replaceChildren(...answer.panels.map((panel) => {
        const figure = document.createElement("figure");
        const caption = document.createElement("figcaption");
        caption.textContent = panel.label;
        const image = Object.assign(document.createElement("img"), { src: pngData(panel.image), alt: panel.label });
        image.onload = () => { // small images (latents' pixels) enlarged, plots shown near their own size
          image.style.width = `${Math.min(Math.max(image.naturalWidth, 128), 360)}px`;
          image.classList.toggle("pixels", image.naturalWidth < 128);
        };
        figure.append(image, caption);
        return figure;
      }));
      $("explain_info").textContent = JSON.stringify(answer.info, null, 2);
      const count = answer.panels.length;
      status.textContent = `${view.title || view.name}: ${count} panel${count === 1 ? "" : "s"}`;
    } catch (error) {
      status.textContent = `Failed: ${error.message}`;
    }
  }
}
