// The search page of `tshsr-pipe serve`. Plain DOM: every piece of data becomes text through
// textContent or an attribute, never markup, so captions and ids cannot inject HTML.
"use strict";

const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4"];
const SVG = "http://www.w3.org/2000/svg";
const state = { info: null, rounds: [], selected: null };

function $(id) { return document.getElementById(id); }

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function imagePath(imageId) { return "/api/images/" + encodeURIComponent(imageId); }

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (error) { body = null; }
  if (!response.ok) {
    const detail = body && typeof body.detail === "string" ? body.detail : response.statusText;
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function setStatus(node, text, isError) {
  node.textContent = text;
  node.classList.toggle("error", Boolean(isError));
}

// The image (or a grey frame when there is no file) with the attended regions drawn in its
// own pixel coordinates: the SVG's viewBox is the image size, so boxes scale with the picture.
function frame(hit) {
  const [height, width] = hit.image_size;
  const box = element("div", "frame");
  box.style.aspectRatio = `${width} / ${height}`;
  if (hit.thumbnail) {
    const img = element("img");
    img.src = hit.thumbnail;
    img.alt = hit.image_id;
    box.appendChild(img);
  } else {
    box.appendChild(element("div", "nofile", "no image file"));
  }
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const fontSize = Math.max(width, height) / 16;
  hit.regions.forEach((region, i) => {
    const [x1, y1, x2, y2] = region.box;
    const colour = COLOURS[i % COLOURS.length];
    const rect = document.createElementNS(SVG, "rect");
    for (const [name, value] of [["x", x1], ["y", y1], ["width", x2 - x1], ["height", y2 - y1]]) {
      rect.setAttribute(name, String(value));
    }
    rect.setAttribute("stroke", colour);
    rect.setAttribute("vector-effect", "non-scaling-stroke");
    rect.setAttribute("class", "region");
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", String(x1 + fontSize * 0.2));
    label.setAttribute("y", String(y1 + fontSize * (1 + 1.2 * i)));
    label.setAttribute("font-size", String(fontSize));
    label.setAttribute("fill", colour);
    label.textContent = `${Math.round(100 * region.weight)}%`;
    svg.append(rect, label);
  });
  box.appendChild(svg);
  return box;
}

function boxList(hit) {
  const list = element("ul", "boxes");
  for (const region of hit.regions) {
    const coords = region.box.map((v) => Math.round(v)).join(", ");
    list.appendChild(element("li", "", `box [${coords}]: ${Math.round(100 * region.weight)}%`));
  }
  return list;
}

function moves(ranks) {
  const line = element("p", "moves", "rank per round: ");
  ranks.forEach((rank, i) => {
    if (i > 0) line.appendChild(document.createTextNode(" → "));
    const step = element("span", "", `#${rank}`);
    if (i > 0 && rank < ranks[i - 1]) step.className = "up";
    if (i > 0 && rank > ranks[i - 1]) step.className = "down";
    line.appendChild(step);
  });
  return line;
}

function figure(hit) {
  const node = element("figure", "result");
  node.dataset.imageId = hit.image_id;
  node.appendChild(frame(hit));
  const caption = element("figcaption");
  caption.append(element("span", "rank", `#${hit.rank}`), document.createTextNode(` · ${hit.score.toFixed(4)} · `),
                 element("span", "image-id", hit.image_id));
  node.appendChild(caption);
  if (!hit.thumbnail) node.appendChild(boxList(hit));
  if (hit.rank_by_round && hit.rank_by_round.length > 1) node.appendChild(moves(hit.rank_by_round));
  node.addEventListener("click", () => showImage(hit, node));
  return node;
}

function render(response) {
  const results = $("results");
  results.replaceChildren(...response.hits.map(figure));
  const ignored = (response.ignored_words || []).flat();
  let text = `top ${response.hits.length} of ${response.gallery_size} images · ${response.milliseconds.toFixed(0)} ms in the model`;
  if (ignored.length) text += ` · not in the vocabulary, ignored: ${ignored.join(", ")}`;
  setStatus($("status"), text, false);
}

function showRounds() {
  const section = $("rounds");
  section.hidden = state.rounds.length < 2;
  $("round-list").replaceChildren(...state.rounds.map((q) => element("li", "", q)));
}

async function search(event) {
  event.preventDefault();
  const query = $("query").value.trim();
  if (!query) return;
  state.rounds = [query];
  showRounds();
  setStatus($("status"), "searching…", false);
  try {
    const params = new URLSearchParams({ q: query, k: $("k").value });
    render(await getJSON(`/api/search?${params}`));
  } catch (error) {
    $("results").replaceChildren();
    setStatus($("status"), error.message, true);
  }
}

async function addRound() {
  const query = $("query").value.trim();
  if (!query) return;
  const queries = [...state.rounds, query];
  setStatus($("status"), "searching…", false);
  try {
    const response = await getJSON("/api/search", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ queries, k: Number($("k").value) }),
    });
    state.rounds = queries;
    showRounds();
    $("query").value = "";
    render(response);
  } catch (error) {
    setStatus($("status"), error.message, true);
  }
}

async function showImage(hit, node) {
  document.querySelectorAll(".result.selected").forEach((n) => n.classList.remove("selected"));
  node.classList.add("selected");
  const detail = $("detail");
  detail.hidden = false;
  $("detail-title").textContent = hit.image_id;
  const big = element("div", "result");
  big.appendChild(frame(hit));
  $("detail-figure").replaceChildren(big);
  $("captions").replaceChildren();
  $("own-captions").replaceChildren();
  state.selected = hit.image_id;
  setStatus($("captions-status"), "ranking captions…", false);
  try {
    const found = await getJSON(`${imagePath(hit.image_id)}/captions?k=10`);
    if (state.selected !== hit.image_id) return;  // another image was clicked meanwhile
    $("captions").replaceChildren(...found.captions.map((c) => {
      const item = element("li", c.ground_truth ? "gt" : "");
      item.append(element("span", "score", c.score.toFixed(4)), document.createTextNode(c.text));
      if (c.ground_truth) item.appendChild(document.createTextNode(" ✓"));
      return item;
    }));
    $("own-captions").replaceChildren(...found.own_captions.map((t) => element("li", "", t)));
    setStatus($("captions-status"), "✓ marks the image's own captions", false);
  } catch (error) {
    setStatus($("captions-status"), error.message, true);
  }
}

async function start() {
  $("search-form").addEventListener("submit", search);
  $("add-round").addEventListener("click", addRound);
  $("clear-rounds").addEventListener("click", () => { state.rounds = []; showRounds(); });
  $("close-detail").addEventListener("click", () => { $("detail").hidden = true; });
  try {
    const info = await getJSON("/api/info");
    state.info = info;
    $("query").maxLength = info.limits.max_query_chars;
    const captions = info.captions ? `${info.captions} captions` : "no caption gallery";
    $("about").textContent = `${info.checkpoint} · ${info.gallery_size} images · ${captions} · ` +
      `${info.ranker} scoring on ${info.device}`;
    const addRoundButton = $("add-round");
    addRoundButton.hidden = !info.multi_query;
    addRoundButton.title = info.multi_query === "mean"
      ? "Refine: rank by the mean score of all queries so far (this model reads one query at a time)"
      : "Refine: the model reads the queries together";
    $("rounds-note").textContent = info.multi_query === "mean"
      ? "Queries so far (images ranked by the mean of their scores):" : "Queries so far:";
  } catch (error) {
    setStatus($("about"), error.message, true);
  }
}

document.addEventListener("DOMContentLoaded", start);
