// The review pages' only script: reveal a blurred thumbnail in place, and keyboard
// shortcuts for a long queue. Every action also works without it (links and forms).
"use strict";

function reveal(container) {
  const link = container && container.querySelector("a.reveal");
  const img = container && container.querySelector("img.blurred");
  if (!link || !img) return;
  // The clear image is fetched only now: until this request the server sent a blurred one.
  img.src = link.href;
  img.classList.remove("blurred");
  img.classList.add("revealed");
  img.alt = img.alt.replace(", blurred", "");
  link.parentElement.textContent = "revealed";
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
  c: () => decide("confirm"),
  d: () => decide("dismiss"),
  e: () => decide("escalate"),
  m: () => {
    const note = selected() && selected().querySelector("textarea[name=note]");
    if (note) note.focus();
  },
};

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("a.reveal").forEach((link) => {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      reveal(link.closest("article.hit, figure.thumb"));
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
