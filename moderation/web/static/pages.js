// The review pages' only script: reveal a blurred thumbnail in place, and keyboard
// shortcuts for a long queue. Every action also works without it (links and forms).
"use strict";

function withReveal(url) {
  return url + (url.includes("?") ? "&" : "?") + "reveal=1";
}

function reveal(container) {
  const figure = container && container.querySelector("figure.thumb");
  const scope = figure || container;
  const link = scope && scope.querySelector("a.reveal");
  if (!link || link.hidden) return;
  // The clear images are fetched only now: until this request the server sent blurred ones.
  scope.querySelectorAll("img.blurred").forEach((img) => {
    img.src = withReveal(img.dataset.src);
    img.classList.replace("blurred", "revealed");
    img.alt = img.alt.replace(", blurred", "");
  });
  link.hidden = true;
  scope.querySelector("a.reblur").hidden = false;
}

function reblur(container) {
  const figure = container && container.querySelector("figure.thumb");
  const scope = figure || container;
  const link = scope && scope.querySelector("a.reblur");
  if (!link || link.hidden) return;
  scope.querySelectorAll("img.revealed").forEach((img) => {
    img.src = img.dataset.src;
    img.classList.replace("revealed", "blurred");
    img.alt = img.alt + ", blurred";
  });
  link.hidden = true;
  scope.querySelector("a.reveal").hidden = false;
}

function toggleGrayscale() {
  const on = document.body.classList.toggle("grayscale");
  localStorage.setItem("moderation.grayscale", on ? "1" : "");
  document.querySelectorAll("button.grayscale-toggle").forEach((button) => {
    button.setAttribute("aria-pressed", on ? "true" : "false");
  });
}

// The undo offer lasts as long as the server will still take it back, then goes.
function startUndoCountdown() {
  const form = document.getElementById("undo");
  if (!form) return;
  const deadline = Date.now() + Number(form.dataset.leftMs || 0);
  const left = form.querySelector(".undo-left");
  const tick = () => {
    const ms = deadline - Date.now();
    if (ms <= 0) {
      form.remove();
      return;
    }
    if (left) left.textContent = String(Math.ceil(ms / 1000));
    setTimeout(tick, Math.min(ms, 250));
  };
  tick();
}

function undo() {
  const form = document.getElementById("undo");
  if (form) form.requestSubmit();
}

function cards() {
  return Array.from(document.querySelectorAll("article.hit"));
}

function selected() {
  return document.querySelector("article.hit.selected");
}

function select(card) {
  if (!card) return;
  const current = selected();
  if (current) current.classList.remove("selected");
  card.classList.add("selected");
  card.scrollIntoView({ block: "nearest" });
}

function move(step) {
  const all = cards();
  const index = all.indexOf(selected());
  select(all[Math.min(all.length - 1, Math.max(0, index + step))]);
}

function decide(outcome) {
  const card = selected();
  const button = card && card.querySelector(`button[name=outcome][value=${outcome}]`);
  if (button) button.form.requestSubmit(button);
}

const KEYS = {
  j: () => move(1),
  n: () => move(1),
  k: () => move(-1),
  r: () => reveal(selected() || document),
  b: () => reblur(selected() || document),
  g: () => toggleGrayscale(),
  u: () => undo(),
  c: () => decide("confirm"),
  d: () => decide("dismiss"),
  e: () => decide("escalate"),
  m: () => {
    const note = selected() && selected().querySelector("textarea[name=note]");
    if (note) note.focus();
  },
};

document.addEventListener("DOMContentLoaded", () => {
  if (localStorage.getItem("moderation.grayscale")) toggleGrayscale();
  document.querySelectorAll("button.grayscale-toggle").forEach((button) => {
    button.addEventListener("click", () => toggleGrayscale());
  });
  startUndoCountdown();
  document.querySelectorAll("a.reveal").forEach((link) => {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      reveal(link.closest("figure.thumb").parentElement);
    });
  });
  document.querySelectorAll("a.reblur").forEach((link) => {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      reblur(link.closest("figure.thumb").parentElement);
    });
  });
  cards().forEach((card) => card.addEventListener("click", () => select(card)));
  select(cards()[0]);
  document.body.dataset.shortcuts = "ready";
});

document.addEventListener("keydown", (event) => {
  const typing = event.target.closest && event.target.closest("input, textarea, select");
  if (typing) {
    if (event.key === "Escape") event.target.blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const action = KEYS[event.key];
  if (action) {
    event.preventDefault();
    action();
  }
});
