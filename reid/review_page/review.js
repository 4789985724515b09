// The review page: one encounter at a time, every action sent to the server, which appends it to review.csv.
"use strict";

let state = null;
let current = null;

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "onclick") node.addEventListener("click", value);
    else if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function message(text, error = false) {
  $("message").textContent = text;
  $("message").className = error ? "error" : "";
}

function byId(id) {
  return state.encounters.find((e) => e.encounter_id === id);
}

function visible() {
  const filter = $("filter").value;
  const station = $("station").value;
  return state.encounters.filter((e) => {
    if (station && !e.queries.some((q) => q.station === station)) return false;
    if (filter === "review") return e.decision === "review" || e.decision === "new";
    if (filter === "known") return e.decision === "known";
    if (filter === "conflict") return e.review.status === "conflict";
    return true;
  });
}

function firstOpen(list, after = null) {
  const start = after === null ? 0 : list.findIndex((e) => e.encounter_id === after) + 1;
  const rest = [...list.slice(start), ...list.slice(0, start)];
  const open = rest.find((e) => e.review.status === "open" && !e.review.skipped) || rest.find((e) => e.review.status === "open");
  return open ? open.encounter_id : null;
}

async function load() {
  const response = await fetch("/api/state");
  state = await response.json();
  $("run").textContent = state.run;
  if (!$("reviewer").value) $("reviewer").value = localStorage.getItem("reid-reviewer") || state.reviewer || "";
  const stations = [...new Set(state.encounters.flatMap((e) => e.queries.map((q) => q.station)).filter(Boolean))].sort();
  for (const station of stations) $("station").append(el("option", { value: station }, station));
  current = firstOpen(visible()) || (visible()[0] || {}).encounter_id || null;
  render();
}

function render() {
  const { reviewed, total } = state.progress;
  const count = state.count ? ` · individuals: at least ${state.count.minimum}, at most ${state.count.maximum}` : "";
  $("progress").textContent = `reviewed ${reviewed} / ${total} (${total - reviewed} left)${count}`;
  const list = visible();
  $("list").replaceChildren(
    ...list.map((e) =>
      el(
        "li",
        {
          class: e.encounter_id === current ? "current" : "",
          "data-encounter": e.encounter_id,
          onclick: () => { current = e.encounter_id; render(); },
        },
        `${e.encounter_id} `,
        el("span", { class: "status" }, e.review.status === "confirmed" ? `✓ ${e.review.individual_id}` : e.review.status),
      ),
    ),
  );
  const encounter = current && byId(current);
  $("encounter").replaceChildren(...(encounter ? card(encounter) : [el("p", {}, "Nothing to show with this filter.")]));
}

function card(e) {
  const review = e.review;
  const why = [
    e.top_score !== null ? `top score ${e.top_score.toFixed(3)}` : null,
    e.margin !== null ? `lead over the runner-up ${e.margin.toFixed(3)}` : null,
    e.reason,
  ].filter(Boolean).join("; ");
  const side = review.side ? `${review.side} (corrected)` : [...new Set(e.queries.map((q) => q.side))].join(", ");
  const parts = [
    el("h2", { "data-encounter": e.encounter_id }, `${state.kind === "shared" ? "Partner individual" : "Encounter"} ${e.encounter_id}`),
    el(
      "p", {},
      "Software: ", el("span", { class: `badge ${e.decision}` }, e.decision), " ", el("b", {}, e.assigned || "—"),
      why ? ` (${why})` : "", ` · side ${side} · searched ${e.sides_searched || "?"}`,
    ),
    el(
      "p", { "data-testid": "review-status" },
      "Review: ", el("span", { class: `badge ${review.status}` }, review.status),
      review.individual_id ? el("b", { "data-testid": "confirmed-id" }, ` ${review.individual_id}`) : "",
      review.answers.length ? ` — ${review.answers.map((a) => `${a.reviewer}: ${a.action} ${a.individual_id}`).join("; ")}` : "",
    ),
    el("div", { class: "row" },
      e.queries.map((q) => el("figure", {}, el("img", { src: `/files/${q.thumb}`, alt: `query ${q.name}` }),
        el("figcaption", {}, q.name, el("br"), [q.station, q.timestamp].filter(Boolean).join(" · ")))),
    ),
    el("h3", {}, "Candidates"),
    el("div", { class: "row" },
      e.candidates.length ? e.candidates.map((c) => el("figure", {
          class: `candidate ${review.individual_id === c.individual_id ? "chosen" : ""}`,
        },
        c.thumb ? el("img", { src: `/files/${c.thumb}`, alt: `candidate ${c.individual_id}` }) : "",
        el("figcaption", {}, `#${c.rank} `, el("b", {}, c.individual_id), ` score ${c.score.toFixed(3)}`),
        el("button", { "data-action": "same", "data-rank": c.rank, onclick: () => act("same", { candidate_rank: c.rank }) },
          `Same as #${c.rank} [${c.rank}]`),
      )) : el("p", {}, "No candidate of this side in the gallery."),
    ),
  ];
  const evidence = e.candidates.filter((c) => c.evidence);
  if (evidence.length) {
    parts.push(el("details", {}, el("summary", {}, "Keypoint correspondences with each candidate"),
      el("div", { class: "row" }, evidence.map((c) => el("figure", { class: "evidence" },
        el("a", { href: `/files/${c.evidence}`, target: "_blank" }, el("img", { src: `/files/${c.evidence}`, alt: `correspondences with ${c.individual_id}` })),
        el("figcaption", {}, `#${c.rank} ${c.individual_id}`))))));
  }
  const others = state.new_individuals.filter((n) => n.encounter_id !== e.encounter_id);
  if (others.length) {
    parts.push(el("h3", {}, "New individuals found in this review"),
      el("div", { class: "row" }, others.map((n) => el("figure", {},
        n.thumb ? el("img", { src: `/files/${n.thumb}`, alt: `new individual ${n.label}` }) : "",
        el("figcaption", {}, el("b", {}, n.label), ` (first in ${n.encounter_id})`),
        el("button", { "data-action": "other", "data-id": n.label, onclick: () => act("other", { individual_id: n.label }) }, `Same as ${n.label}`)))));
  }
  const datalist = el("datalist", { id: "ids" }, [...state.known_ids, ...state.new_individuals.map((n) => n.label)].map((id) => el("option", { value: id })));
  const typed = el("input", { id: "typed-id", list: "ids", placeholder: "ID, e.g. KZ-0007 or new-2" });
  typed.addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); act("other", { individual_id: typed.value }); }
    if (event.key === "Escape") typed.blur();
  });
  const shared = state.kind === "shared";  // a partner's individual: confirm it is one of ours, or not
  parts.push(el("div", { class: "actions" },
    el("button", { "data-action": "new", onclick: () => act("new") }, shared ? "Not one of ours [n]" : "New individual [n]"),
    typed, datalist,
    el("button", { "data-action": "other", onclick: () => act("other", { individual_id: typed.value }) }, "Same as this ID [i]"),
    el("button", { "data-action": "unusable", onclick: () => act("unusable") }, "Not a flank / unusable [u]"),
    el("button", { "data-action": "wrong_side", onclick: () => act("wrong_side") }, "Side is wrong [s]"),
    el("button", { "data-action": "skip", onclick: () => act("skip") }, "Skip [k]"),
  ));
  return parts;
}

async function act(action, extra = {}) {
  const reviewer = $("reviewer").value.trim();
  if (!reviewer) {
    message("Enter your name as reviewer first: every action records who made it.", true);
    $("reviewer").focus();
    return;
  }
  localStorage.setItem("reid-reviewer", reviewer);
  const done = current;
  let response;
  try {
    response = await fetch("/api/action", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ reviewer, encounter_id: done, action, ...extra }),
    });
  } catch (error) {
    message(`Not saved: the review server does not answer (${error}). Start it again; nothing saved is lost.`, true);
    return;
  }
  const body = await response.json();
  if (!response.ok) {
    message(`Not saved: ${body.error}`, true);
    return;
  }
  state = body;
  message(`Saved: encounter ${done} — ${action}${body.written.individual_id ? ` ${body.written.individual_id}` : ""}.`);
  if (action !== "wrong_side") current = firstOpen(visible(), done) || done;
  render();
}

function step(offset) {
  const list = visible();
  const at = list.findIndex((e) => e.encounter_id === current);
  const next = list[Math.min(Math.max(at + offset, 0), list.length - 1)];
  if (next) { current = next.encounter_id; render(); }
}

document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return;
  if (event.ctrlKey || event.metaKey || event.altKey || !state || !current) return;
  const encounter = byId(current);
  if (/^[1-9]$/.test(event.key) && encounter.candidates.some((c) => c.rank === Number(event.key))) act("same", { candidate_rank: Number(event.key) });
  else if (event.key === "n") act("new");
  else if (event.key === "i") { event.preventDefault(); $("typed-id").focus(); }
  else if (event.key === "u") act("unusable");
  else if (event.key === "s") act("wrong_side");
  else if (event.key === "k") act("skip");
  else if (event.key === "ArrowRight") step(1);
  else if (event.key === "ArrowLeft") step(-1);
  else return;
  event.preventDefault();
});

for (const id of ["filter", "station"]) {
  $(id).addEventListener("change", () => {
    current = firstOpen(visible()) || (visible()[0] || {}).encounter_id || null;
    render();
  });
}

load().catch((error) => message(`Could not load the review: ${error}`, true));
