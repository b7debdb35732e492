// The catalog page: filters the server-rendered list by text, family and served status.
const search = document.getElementById("model-search");
const family = document.getElementById("family-filter");
const served = document.getElementById("served-filter");
const entries = [...document.querySelectorAll(".model-entry")];
const count = document.getElementById("catalog-count");

function apply() {
  const words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
  let shown = 0;
  for (const entry of entries) {
    const visible = words.every((w) => entry.dataset.text.includes(w))
      && (!family.value || entry.dataset.family === family.value)
      && (!served.value || entry.dataset.served === served.value);
    entry.hidden = !visible;
    shown += visible;
  }
  count.textContent = `${shown} of ${entries.length} models`;
  document.getElementById("catalog-empty").hidden = shown > 0;
}

for (const control of [search, family, served]) control.addEventListener("input", apply);
document.getElementById("catalog-filters").addEventListener("submit", (e) => e.preventDefault());
