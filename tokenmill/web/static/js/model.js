// The model page: writes its API examples for this server's base URL and the page's model,
// shows one language at a time, and copies an example to the clipboard.
import { authRequired, baseUrl } from "./common.js";
import { exampleBodies, snippets } from "./snippets.js";

const page = document.getElementById("model-page");
const bodies = exampleBodies(page.dataset.model);
for (const [kind, body] of Object.entries(bodies)) {
  const code = snippets(baseUrl(), body, authRequired());
  for (const [language, text] of Object.entries(code)) {
    document.getElementById(`snippet-${language}-${kind}`).textContent = text;
  }
}
document.getElementById("base-url").textContent = baseUrl();

function showLanguage(language) {
  for (const node of page.querySelectorAll("[data-language]")) {
    node.hidden = node.dataset.language !== language;
  }
}
for (const radio of document.querySelectorAll('input[name="language"]')) {
  radio.addEventListener("change", () => showLanguage(radio.value));
}
showLanguage(document.querySelector('input[name="language"]:checked').value);

for (const button of page.querySelectorAll("button.copy")) {
  button.addEventListener("click", async () => {
    const text = document.getElementById(button.dataset.copy).textContent;
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed: select the text";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 2000);
  });
}
