// The search page of the Serve retrieval app: plain JS, no build step, same-origin API only.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    info: $("info"), layout: $("layout"), panel: $("reference-panel"), refEmpty: $("reference-empty"),
    refChosen: $("reference-chosen"), refImg: $("reference-img"), refCaption: $("reference-caption"),
    clearRef: $("clear-reference"), uploadNote: $("upload-note"), upload: $("upload"),
    gallery: $("gallery"), prev: $("gallery-prev"), next: $("gallery-next"), range: $("gallery-range"),
    form: $("query-form"), text: $("text"), textNote: $("text-note"), k: $("k"), dedupe: $("dedupe"),
    search: $("search"), error: $("error"), status: $("status"), download: $("download"),
    results: $("results"),
  };
  const FIELDS = { image: els.upload, image_id: els.refChosen, text: els.text, k: els.k, dedupe: els.dedupe };
  const PAGE_SIZE = 20;
  const state = {
    limits: { max_k: 100, default_k: 10, max_text_chars: 0, max_upload_bytes: 0, max_pixels: 0 },
    encoder: { uses_images: true, uses_texts: true },
    ref: null,              // null | {kind: "gallery", id, caption} | {kind: "upload", file, url}
    galleryOffset: 0,
    last: null,             // the last successful /search answer (for the download)
    controller: null,       // aborts a search that a newer one replaces
  };

  class ApiError extends Error {
    constructor(message, code = null, field = null) {
      super(message);
      Object.assign(this, { name: "ApiError", code, field });
    }
  }

  // fetch + JSON, turning the API's error envelope (or anything else that fails) into an ApiError.
  async function api(url, options = {}) {
    let resp;
    try {
      resp = await fetch(url, options);
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(`Cannot reach the server (${e.message}).`, "network");
    }
    let body = null;
    try { body = await resp.json(); } catch { /* not JSON: handled below */ }
    if (!resp.ok) {
      const err = body && body.error;
      if (err && err.message) throw new ApiError(err.message, err.code, err.field);
      const detail = body && body.detail;  // a plain FastAPI error, just in case
      const text = typeof detail === "string" ? detail : Array.isArray(detail) && detail[0] ? detail[0].msg : "";
      throw new ApiError(text || `The server answered ${resp.status} ${resp.statusText}`.trim(), String(resp.status));
    }
    if (body === null) throw new ApiError("The server's answer is not JSON.", "bad_response");
    return body;
  }

  const imageUrl = (id) => "/images/" + encodeURIComponent(id);
  const ms = (x) => (typeof x === "number" ? x.toFixed(1) : "?");

  function showError(err) {
    clearError();
    els.error.textContent = err.message || String(err);
    els.error.hidden = false;
    const field = err.field && FIELDS[err.field];
    if (field) field.setAttribute("aria-invalid", "true");
  }

  function clearError() {
    els.error.hidden = true;
    els.error.textContent = "";
    Object.values(FIELDS).forEach((el) => el.removeAttribute("aria-invalid"));
  }

  function thumbnail(src, alt) {
    const img = document.createElement("img");
    img.src = src;
    img.alt = alt;
    img.decoding = "async";
    img.addEventListener("error", () => img.classList.add("broken"));
    return img;
  }

  // ---- /info: the header line, the limits, and what the encoder can take ----
  async function loadInfo() {
    try {
      const info = await api("/info");
      Object.assign(state.limits, info.limits || {});
      Object.assign(state.encoder, info.encoder || {});
      const shards = info.shards || [];
      const rows = shards.reduce((n, s) => n + (s.rows || 0), 0) || info.gallery_rows || 0;
      const parts = [`Encoder ${state.encoder.name || "?"}`,
        `${rows.toLocaleString()} images in the index` + (shards.length > 1 ? ` (${shards.length} shards)` : "")];
      if (state.encoder.dim) parts.push(`${state.encoder.dim}-d embeddings`);
      if (!state.encoder.uses_images) parts.push("text-only encoder");
      els.info.textContent = parts.join(" · ");
    } catch (e) {
      els.info.textContent = "Index information is unavailable.";
      showError(e);
    }
    const { max_k, default_k, max_text_chars } = state.limits;
    els.k.max = String(max_k);
    els.k.value = String(default_k);
    if (max_text_chars) els.text.maxLength = max_text_chars;
    els.panel.hidden = state.encoder.uses_images === false;
    els.layout.classList.toggle("text-only", els.panel.hidden);
    els.text.disabled = state.encoder.uses_texts === false;
    els.textNote.hidden = state.encoder.uses_texts !== false;
  }

  // ---- the gallery: a page of thumbnails to pick a reference from ----
  async function loadGallery(offset) {
    try {
      const page = await api(`/gallery?offset=${Math.max(0, offset)}&limit=${PAGE_SIZE}`);
      state.galleryOffset = page.offset;
      els.gallery.replaceChildren(...page.items.map(galleryItem));
      const end = page.offset + page.items.length;
      els.range.textContent = page.total ? `${page.offset + 1}–${end} of ${page.total}` : "The gallery is empty.";
      els.prev.disabled = page.offset <= 0;
      els.next.disabled = end >= page.total;
      markReference();
    } catch (e) {
      showError(e);
    }
  }

  function galleryItem(item) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thumb";
    button.dataset.imageId = item.image_id;
    button.title = item.caption || item.image_id;
    button.append(thumbnail(imageUrl(item.image_id), item.caption || `Gallery image ${item.image_id}`));
    button.addEventListener("click", () =>
      setReference({ kind: "gallery", id: item.image_id, caption: item.caption }));
    li.append(button);
    return li;
  }

  // ---- the reference: a gallery image (by id) or an uploaded file ----
  function setReference(ref) {
    if (state.ref && state.ref.kind === "upload" && state.ref !== ref) URL.revokeObjectURL(state.ref.url);
    state.ref = ref;
    if (!ref || ref.kind !== "upload") els.upload.value = "";
    els.refEmpty.hidden = Boolean(ref);
    els.refChosen.hidden = !ref;
    els.uploadNote.hidden = !ref || ref.kind !== "upload";
    if (ref) {
      els.refImg.classList.remove("broken");
      els.refImg.src = ref.kind === "upload" ? ref.url : imageUrl(ref.id);
      els.refImg.alt = ref.kind === "upload" ? `Uploaded image ${ref.file.name}` : (ref.caption || `Gallery image ${ref.id}`);
      els.refCaption.textContent = ref.kind === "upload" ? `Uploaded: ${ref.file.name}` : (ref.caption || ref.id);
    } else {
      els.refImg.removeAttribute("src");
    }
    markReference();
  }

  function markReference() {
    const id = state.ref && state.ref.kind === "gallery" ? state.ref.id : null;
    els.gallery.querySelectorAll(".thumb").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.imageId === id)));
    els.results.querySelectorAll(".result").forEach((r) => r.classList.toggle("is-reference", r.dataset.imageId === id));
  }

  function onUpload() {
    const file = els.upload.files[0];
    if (!file) return;
    clearError();
    const max = state.limits.max_upload_bytes;
    if (max && file.size > max) {
      els.upload.value = "";
      showError(new ApiError(`${file.name} is ${(file.size / 1e6).toFixed(1)} MB; the limit is ${(max / 1e6).toFixed(1)} MB.`, "too_large", "image"));
      return;
    }
    setReference({ kind: "upload", file, url: URL.createObjectURL(file) });
  }

  // ---- search ----
  function readForm() {
    return { text: els.text.disabled ? "" : els.text.value.trim(), k: Number(els.k.value), dedupe: els.dedupe.checked };
  }

  async function search({ push = true } = {}) {
    clearError();
    const q = readForm();
    const ref = state.ref;
    const maxK = state.limits.max_k;
    if (!Number.isInteger(q.k) || q.k < 1 || q.k > maxK) {
      return showError(new ApiError(`k must be a whole number from 1 to ${maxK}.`, "bad_k", "k"));
    }
    if (!ref && !q.text) {
      return showError(new ApiError("Pick or upload a reference image, or type a modification text.", "empty_query"));
    }
    const body = new FormData();
    if (ref && ref.kind === "upload") body.append("image", ref.file, ref.file.name);
    if (ref && ref.kind === "gallery") body.append("image_id", ref.id);
    if (q.text) body.append("text", q.text);
    body.append("k", String(q.k));
    body.append("dedupe", String(q.dedupe));

    if (state.controller) state.controller.abort();
    const controller = (state.controller = new AbortController());
    els.results.setAttribute("aria-busy", "true");
    els.status.textContent = "Searching…";
    try {
      const answer = await api("/search", { method: "POST", body, signal: controller.signal });
      state.last = answer;
      renderResults(answer);
      writeURL(ref, q, push);
      const t = answer.timing_ms || {};
      els.status.textContent = `${answer.results.length} results in ${ms(t.total)} ms ` +
        `(encode ${ms(t.encode)} ms, search ${ms(t.search)} ms)`;
    } catch (e) {
      if (e.name === "AbortError") return;
      els.status.textContent = "";
      showError(e);
    } finally {
      if (state.controller === controller) {
        state.controller = null;
        els.results.removeAttribute("aria-busy");
      }
    }
  }

  function renderResults(answer) {
    els.results.replaceChildren(...answer.results.map(resultItem));
    const ref = state.ref;  // a reference restored from a URL has no caption yet: the results may have it
    const same = ref && ref.kind === "gallery" && !ref.caption && answer.results.find((r) => r.image_id === ref.id);
    if (same && same.caption) setReference({ ...ref, caption: same.caption });
    els.download.disabled = answer.results.length === 0;
    markReference();
  }

  function resultItem(r) {
    const li = document.createElement("li");
    li.className = "result";
    li.dataset.imageId = r.image_id;
    li.dataset.rank = String(r.rank);
    const pickable = state.encoder.uses_images !== false;  // a result can be the next reference
    const card = document.createElement(pickable ? "button" : "div");
    card.className = "card";
    const caption = r.caption || r.image_id;
    card.append(thumbnail(r.thumbnail_url || imageUrl(r.image_id), `Result ${r.rank}: ${caption}`));
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.innerHTML = '<span class="rank"></span><span class="score"></span><span class="caption"></span>';
    meta.querySelector(".rank").textContent = `#${r.rank}`;
    meta.querySelector(".score").textContent = Number(r.score).toFixed(3);
    meta.querySelector(".caption").textContent = r.category ? `${caption} (${r.category})` : caption;
    card.append(meta);
    if (pickable) {
      card.type = "button";
      card.title = "Use as the next reference";
      card.addEventListener("click", () => {
        setReference({ kind: "gallery", id: r.image_id, caption: r.caption });
        els.status.textContent = `Result #${r.rank} is the new reference: edit the text and search again.`;
        els.text.focus();
        els.text.select();
      });
    }
    li.append(card);
    return li;
  }

  // ---- the query in the URL ----
  function writeURL(ref, q, push) {
    const p = new URLSearchParams();
    if (ref && ref.kind === "gallery") p.set("image_id", ref.id);
    if (ref && ref.kind === "upload") p.set("upload", "1");  // the file itself cannot travel in a URL
    if (q.text) p.set("text", q.text);
    p.set("k", String(q.k));
    p.set("dedupe", String(q.dedupe));
    const search = "?" + p.toString();
    if (push && search !== location.search) history.pushState(null, "", search);
    else history.replaceState(null, "", search);
  }

  // Fills the form from the URL, then runs the query it holds (when it can).
  function runFromURL() {
    const p = new URLSearchParams(location.search);
    els.text.value = p.get("text") || "";
    els.k.value = p.get("k") || String(state.limits.default_k);
    els.dedupe.checked = p.get("dedupe") === "true";
    const imageId = state.encoder.uses_images === false ? null : p.get("image_id");
    if (p.has("upload")) {
      if (state.ref && state.ref.kind === "upload") return search({ push: false });
      setReference(null);
      els.status.textContent = "This query used an uploaded image, which a URL cannot hold: upload it again, then search.";
      return;
    }
    setReference(imageId ? { kind: "gallery", id: imageId, caption: null } : null);
    if (imageId || els.text.value.trim()) return search({ push: false });
    els.results.replaceChildren();
    els.status.textContent = "";
  }

  function download() {
    if (!state.last) return;
    const blob = new Blob([JSON.stringify(state.last, null, 2)], { type: "application/json" });
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = "cir-search.json";
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  async function init() {
    els.form.addEventListener("submit", (e) => { e.preventDefault(); search(); });
    els.upload.addEventListener("change", onUpload);
    els.clearRef.addEventListener("click", () => setReference(null));
    els.prev.addEventListener("click", () => loadGallery(state.galleryOffset - PAGE_SIZE));
    els.next.addEventListener("click", () => loadGallery(state.galleryOffset + PAGE_SIZE));
    els.download.addEventListener("click", download);
    window.addEventListener("popstate", runFromURL);
    await loadInfo();
    if (state.encoder.uses_images !== false) loadGallery(0);
    runFromURL();
  }

  init();
})();
