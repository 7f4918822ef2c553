// The draw-a-digit page: strokes on a black canvas, sent as a PNG after each stroke to POST /v1/predict.
"use strict";

const pad = document.getElementById("pad");
const ink = pad.getContext("2d");
const seen = document.getElementById("seen").getContext("2d");
const bars = document.getElementById("bars");
const status = document.getElementById("status");
let drawing = false;
let last = null;
let pending = null;  // the newest request: older answers that arrive late are ignored

function clearPad() {
  ink.fillStyle = "#000";
  ink.fillRect(0, 0, pad.width, pad.height);
  seen.fillStyle = "#000";
  seen.fillRect(0, 0, 28, 28);
  document.getElementById("prediction").textContent = "\u2013";
  document.getElementById("confidence").textContent = "";
  drawBars(new Array(10).fill(0), -1);
  status.textContent = "";
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
}

function stroke(to) {
  ink.strokeStyle = "#fff";
  ink.lineWidth = 18;
  ink.lineCap = "round";
  ink.lineJoin = "round";
  ink.beginPath();
  ink.moveTo(...last);
  ink.lineTo(...to);
  ink.stroke();
  last = to;
}

pad.addEventListener("pointerdown", (event) => {
  drawing = true;
  pad.setPointerCapture(event.pointerId);
  last = point(event);
  stroke(last);
});
pad.addEventListener("pointermove", (event) => { if (drawing) stroke(point(event)); });
for (const name of ["pointerup", "pointercancel"]) {
  pad.addEventListener(name, () => {
    if (!drawing) return;
    drawing = false;
    ask();
  });
}
document.getElementById("clear").addEventListener("click", clearPad);

function ask() {
  status.textContent = "reading\u2026";
  pad.toBlob(async (png) => {
    const form = new FormData();
    form.append("file", png, "drawing.png");
    const request = fetch("/v1/predict?return_image=1", { method: "POST", body: form });
    pending = request;
    try {
      const response = await request;
      const body = await response.json();
      if (request !== pending) return;
      if (!response.ok) { status.textContent = body.error || `error ${response.status}`; return; }
      show(body.results[0]);
    } catch (error) {
      status.textContent = `the server did not answer (${error})`;
    }
  }, "image/png");
}

function show(result) {
  if (result.error) { status.textContent = result.error; return; }
  document.getElementById("prediction").textContent = result.prediction;
  document.getElementById("confidence").textContent = `${(100 * result.confidence).toFixed(1)}% sure`;
  drawBars(result.probabilities, result.prediction);
  const image = seen.createImageData(28, 28);
  result.image.flat().forEach((value, i) => {
    image.data.set([value, value, value, 255], 4 * i);
  });
  seen.putImageData(image, 0, 0);
  status.textContent = "";
  document.body.dataset.predictions = String(Number(document.body.dataset.predictions) + 1);
}

function drawBars(probabilities, top) {
  bars.replaceChildren(...probabilities.map((p, digit) => {
    const row = document.createElement("li");
    row.className = digit === top ? "top" : "";
    row.innerHTML = `<span>${digit}</span><span class="track"><span class="fill"></span></span>` +
      `<span class="value">${(100 * p).toFixed(1)}%</span>`;
    row.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    return row;
  }));
}

async function describeModel() {
  try {
    const info = await (await fetch("/v1/model")).json();
    const accuracy = info.test_accuracy == null ? "" : `, ${(100 * info.test_accuracy).toFixed(2)}% on the MNIST test set`;
    document.getElementById("model").textContent = `${info.model} (${info.runtime})${accuracy}`;
  } catch (error) {
    document.getElementById("model").textContent = "model information unavailable";
  }
}

clearPad();
describeModel();
