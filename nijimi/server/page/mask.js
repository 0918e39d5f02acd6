// The init image of img2img and the inpaint mask painted over it: strokes go on a canvas of the init image's own
// pixel size laid over it; the mask sent is that canvas thresholded to black (keep) and white (repaint), A1111's
// `mask`.

import { $, base64Of } from "./api.js";

export class MaskPainter {
  constructor() {
    this.canvas = $("mask");
    this.context = this.canvas.getContext("2d");
    this.init = null; // base64 of the init image, or null
    this.painted = false;
    let last = null;
    const point = (event) => {
      const box = this.canvas.getBoundingClientRect();
      return [(event.clientX - box.left) * this.canvas.width / box.width,
              (event.clientY - box.top) * this.canvas.height / box.height];
    };
    this.canvas.addEventListener("pointerdown", (event) => {
      this.canvas.setPointerCapture(event.pointerId);
      last = point(event);
      this.stroke(last, last);
    });
    this.canvas.addEventListener("pointermove", (event) => {
      if (last === null) return;
      const here = point(event);
      this.stroke(last, here);
      last = here;
    });
    const end = () => { last = null; };
    this.canvas.addEventListener("pointerup", end);
    this.canvas.addEventListener("pointercancel", end);
    $("mask_clear").addEventListener("click", () => this.clear());
    $("init_remove").addEventListener("click", () => this.setInit(null));
    $("init_image").addEventListener("change", async (event) => {
      const file = event.target.files[0];
      if (file) this.setInit(await base64Of(file), file.type);
    });
  }

  // Show a new init image (base64; null removes it) and start with an empty mask of its size.
  setInit(b64, type = "image/png") {
    this.init = b64;
    $("mask_area").hidden = b64 === null;
    if (b64 === null) {
      $("init_image").value = "";
      return;
    }
    const image = $("init_preview");
    image.onload = () => {
      this.canvas.width = image.naturalWidth;
      this.canvas.height = image.naturalHeight;
      this.clear();
    };
    image.src = `data:${type};base64,${b64}`;
  }

  stroke(from, to) {
    const c = this.context;
    c.globalCompositeOperation = $("erase").checked ? "destination-out" : "source-over";
    c.strokeStyle = "rgb(255, 40, 90)";
    c.lineCap = "round";
    c.lineWidth = Number($("brush").value) || 1;
    c.beginPath();
    c.moveTo(...from);
    c.lineTo(...to);
    c.stroke();
    this.painted = true;
  }

  clear() {
    this.context.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.painted = false;
  }

  // The mask as a base64 PNG (white: painted, black: not), or null when nothing is painted.
  maskPng() {
    const { width, height } = this.canvas;
    const pixels = this.context.getImageData(0, 0, width, height);
    const out = new ImageData(width, height);
    let any = false;
    for (let i = 0; i < pixels.data.length; i += 4) {
      const value = pixels.data[i + 3] >= 128 ? 255 : 0;
      any ||= value > 0;
      out.data.set([value, value, value, 255], i);
    }
    if (!any) return null;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.getContext("2d").putImageData(out, 0, 0);
    return canvas.toDataURL("image/png").split(",", 2)[1];
  }
}
