// The server's JSON endpoints and small DOM helpers shared by the page's modules.

export const $ = (id) => document.getElementById(id);

// GET or POST JSON; an error answer ({"error", "detail"}) throws an Error with the detail as its message.
export async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const answer = await fetch(path, init);
  const value = await answer.json().catch(() => null);
  if (!answer.ok) {
    const error = new Error(value && value.detail ? value.detail : `${path}: HTTP ${answer.status}`);
    error.status = answer.status;
    throw error;
  }
  return value;
}

// A Blob or File as base64 (no data: prefix).
export function base64Of(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

export const pngData = (b64) => `data:image/png;base64,${b64}`;

export function notice(text) {
  const element = $("notice");
  element.textContent = text;
  element.hidden = !text;
}

export function fillSelect(select, options, selected) {
  select.replaceChildren(...options.map(([value, label]) => {
    const option = new Option(label, value);
    option.selected = value === selected;
    return option;
  }));
}
