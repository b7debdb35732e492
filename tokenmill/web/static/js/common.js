// What every page shares: the API key (kept in this browser's localStorage, never put in a URL),
// calls to this server's API that turn OpenAI error bodies into messages, DOM building that only
// ever makes text nodes (never markup from data), and number formats.

const KEY_STORAGE = "tokenmill.apiKey";

export const authRequired = () =>
  document.querySelector('meta[name="tokenmill-auth"]')?.content === "required";

// The API's base URL as this browser reaches the server (same origin as the page).
export const baseUrl = () => `${location.origin}/v1`;

export const apiKey = () => localStorage.getItem(KEY_STORAGE) || "";

// Binds the page's API key field (macros.html) to localStorage; `onChange` runs after each edit.
export function bindKeyField(onChange = () => {}) {
  const input = document.getElementById("api-key");
  if (!input) return;
  input.value = apiKey();
  input.addEventListener("input", () => {
    const key = input.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    onChange(key);
  });
  document.getElementById("api-key-forget").addEventListener("click", () => {
    input.value = "";
    localStorage.removeItem(KEY_STORAGE);
    onChange("");
    input.focus();
  });
  document.getElementById("key-form").addEventListener("submit", (e) => e.preventDefault());
}

export function authHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

// An API error: `message` is the server's own (OpenAI's error.message), `code` its error.code.
export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// Throws ApiError for a response that is not 2xx, with the server's message when it sent one.
export async function raiseForStatus(response) {
  if (response.ok) return;
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const error = (await response.json()).error;
    if (error?.message) message = error.message;
    code = error?.code ?? null;
  } catch {
    // not an OpenAI error body: the status line says what there is to say
  }
  if (response.status === 401 && authRequired() && !apiKey()) {
    message = "This server needs an API key: enter one in the API key field.";
  }
  throw new ApiError(response.status, message, code);
}

// GET (or `init.method`) a JSON route of this server with the stored key.
export async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: authHeaders() });
  await raiseForStatus(response);
  return response.json();
}

// el("p", {class: "x"}, "text", child): an element whose children are nodes or plain text.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const integer = (n) => Number(n).toLocaleString("en-US");

// USD: cents from one cent up; below, two significant digits ($0.0000012), in exponent form
// below 1e-8 ($1.5e-10: a catalog may price a token at a picodollar).
export function usd(amount) {
  const size = Math.abs(amount);
  if (amount === 0 || size >= 0.01) return `$${amount.toFixed(2)}`;
  if (size < 1e-8) return `$${amount.toPrecision(2)}`;
  const digits = 1 - Math.floor(Math.log10(size));
  return `$${amount.toFixed(digits).replace(/0+$/, "")}`;
}
