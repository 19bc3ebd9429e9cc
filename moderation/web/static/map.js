// The embedding map: hover a point for its upload (blurred thumbnail and id), click it to
// open the upload, drag across the map to select a region and export it as CSV or JSON.
// Without this script the points are still links with a title each.
"use strict";

(function () {
  const svg = document.getElementById("embedding-map");
  if (!svg) return;
  const hover = document.getElementById("map-hover");
  const hoverImage = document.getElementById("map-hover-image");
  const hoverText = document.getElementById("map-hover-text");
  const band = document.getElementById("map-selection");
  const picked = document.getElementById("map-picked");
  const pickedCount = document.getElementById("map-picked-count");
  const pickedList = document.getElementById("map-picked-list");
  const points = Array.from(svg.querySelectorAll("a.point"));
  let selection = [];

  function describe(point) {
    const status = point.dataset.status === "no hit" ? "" : ", " + point.dataset.status;
    return "upload " + point.dataset.upload + ": " + point.dataset.label + status;
  }

  points.forEach((point) => {
    const show = () => {
      // The server blurs it; the clear image is on the upload's page, behind a reveal.
      hoverImage.src = "/review/uploads/" + point.dataset.upload + "/thumbnail";
      hoverImage.alt = "upload " + point.dataset.upload + ", blurred";
      hoverText.textContent = describe(point);
      hover.hidden = false;
    };
    point.addEventListener("mouseenter", show);
    point.addEventListener("focus", show);
  });

  // Page coordinates to the map's own (its viewBox), whatever size it is drawn at.
  function mapPoint(event) {
    const at = svg.createSVGPoint();
    at.x = event.clientX;
    at.y = event.clientY;
    return at.matrixTransform(svg.getScreenCTM().inverse());
  }

  let start = null;
  svg.addEventListener("pointerdown", (event) => {
    if (event.button !== 0 || event.target.closest("a.point")) return;  // a point: its link
    start = mapPoint(event);
    svg.setPointerCapture(event.pointerId);
    event.preventDefault();
  });
  svg.addEventListener("pointermove", (event) => {
    if (!start) return;
    const now = mapPoint(event);
    band.setAttribute("x", Math.min(start.x, now.x));
    band.setAttribute("y", Math.min(start.y, now.y));
    band.setAttribute("width", Math.abs(now.x - start.x));
    band.setAttribute("height", Math.abs(now.y - start.y));
  });
  svg.addEventListener("pointerup", (event) => {
    if (!start) return;
    const end = mapPoint(event);
    const [x0, x1] = [Math.min(start.x, end.x), Math.max(start.x, end.x)];
    const [y0, y1] = [Math.min(start.y, end.y), Math.max(start.y, end.y)];
    start = null;
    select(points.filter((point) => {
      const circle = point.querySelector("circle");
      const x = Number(circle.getAttribute("cx"));
      const y = Number(circle.getAttribute("cy"));
      return x >= x0 && x <= x1 && y >= y0 && y <= y1;
    }));
  });

  function select(chosen) {
    points.forEach((point) => point.classList.remove("picked"));
    selection = chosen;
    chosen.forEach((point) => point.classList.add("picked"));
    pickedCount.textContent = String(chosen.length);
    pickedList.replaceChildren(...chosen.map((point) => {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = "/review/uploads/" + point.dataset.upload;
      link.textContent = describe(point);
      item.append(link);
      return item;
    }));
    picked.hidden = chosen.length === 0;
    if (!chosen.length) {
      band.setAttribute("width", 0);
      band.setAttribute("height", 0);
    }
  }

  function rows() {
    return selection.map((point) => ({
      upload_id: Number(point.dataset.upload),
      banks: point.dataset.label,
      review: point.dataset.status,
    }));
  }

  function download(name, type, text) {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([text], { type }));
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  }

  function csvCell(value) {
    const text = String(value);
    // A cell a spreadsheet would run as a formula is kept as text.
    if (/^[=+\-@]/.test(text)) return csvCell("'" + text);
    return /[",\n]/.test(text) ? '"' + text.replaceAll('"', '""') + '"' : text;
  }

  document.getElementById("map-export-csv").addEventListener("click", () => {
    const lines = ["upload_id,banks,review"].concat(
      rows().map((row) => [row.upload_id, row.banks, row.review].map(csvCell).join(",")));
    download("map-selection.csv", "text/csv", lines.join("\n") + "\n");
  });
  document.getElementById("map-export-json").addEventListener("click", () => {
    download("map-selection.json", "application/json", JSON.stringify(rows(), null, 1));
  });
  document.getElementById("map-clear").addEventListener("click", () => select([]));
})();
