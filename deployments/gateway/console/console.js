// rag-serve console: chat with a knowledge base, manage knowledge bases, watch versions and rollouts.
// Plain DOM, no framework. Server text only ever reaches the page through textContent or attributes.

const KEY_STORE = "rag.console.key";
const CONVERSATIONS_STORE = "rag.console.conversations";
const ROLLOUT_ACTIVE = ["running", "held"];

const $ = (id) => document.getElementById(id);

// el("td", {class: "x", title: "…"}, "text", child) — strings become text nodes, never HTML.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function notice(message, kind = "error") {
  const box = $("notice");
  box.textContent = message;
  box.dataset.kind = kind;
  box.hidden = !message;
  clearTimeout(notice.timer);
  if (message) notice.timer = setTimeout(() => { box.hidden = true; }, kind === "error" ? 8000 : 3000);
}

// ---- API key and requests --------------------------------------------------------------------

const apiKey = () => localStorage.getItem(KEY_STORE);

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function showKeyForm(message) {
  $("key-message").textContent = message || "Enter the API key of this service. It is kept in this browser only.";
  $("key-form").hidden = false;
  $("key-cancel").hidden = apiKey() === null;
  $("api-key").value = "";
  $("api-key").focus();
}

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

// The message of an error body: `msg` on the knowledge-base routes, `error.message` elsewhere.
function errorMessage(body, status) {
  if (body && typeof body.msg === "string" && body.msg) return body.msg;
  if (body && body.error && body.error.message) return body.error.message;
  return `HTTP ${status}`;
}

async function failure(response) {
  const body = await response.json().catch(() => null);
  if (response.status === 401) showKeyForm(`The API key was refused: ${errorMessage(body, 401)}`);
  return new ApiError(errorMessage(body, response.status), response.status);
}

async function request(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (!response.ok) throw await failure(response);
  return response;
}

const getJson = async (path) => (await request(path)).json();
const postJson = async (path, body) => (await request(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
})).json();

// ---- formatting ------------------------------------------------------------------------------

function humanSize(bytes) {
  if (typeof bytes !== "number") return "—";
  const units = ["B", "KB", "MB", "GB"];
  let value = bytes, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

const localTime = (seconds) => (typeof seconds === "number" ? new Date(seconds * 1000).toLocaleString() : "—");
const ms = (seconds) => (typeof seconds === "number" ? `${Math.round(seconds * 1000)} ms` : "—");
const score = (value) => (typeof value === "number" ? value.toFixed(2) : "—");
const baseName = (path) => String(path ?? "").split("/").pop() || String(path ?? "");

function randomId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));  // works on plain http too, unlike randomUUID
  return "conv-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---- tabs ------------------------------------------------------------------------------------

let currentTab = "chat";
const tabLoaders = { chat: loadModels, knowledge: loadKnowledgeBases, versions: refreshVersions };

function showTab(name) {
  currentTab = name;
  for (const button of document.querySelectorAll("[data-tab]")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === name));
  }
  for (const panel of document.querySelectorAll("[data-panel]")) panel.hidden = panel.dataset.panel !== name;
  tabLoaders[name]().catch((e) => notice(e.message));
}

// ---- chat ------------------------------------------------------------------------------------

let models = [];
let conversations = loadConversations();
let current = conversations[0];
let running = null;  // the AbortController of the answer being streamed

function loadConversations() {
  try {
    const saved = JSON.parse(localStorage.getItem(CONVERSATIONS_STORE) || "[]");
    if (Array.isArray(saved) && saved.length) return saved;
  } catch { /* a damaged store starts afresh */ }
  return [newConversationRecord()];
}

function newConversationRecord() {
  return { id: randomId(), title: "New conversation", kb: null, turns: [] };
}

function saveConversations() {
  try {
    localStorage.setItem(CONVERSATIONS_STORE, JSON.stringify(conversations.slice(0, 30)));
  } catch { /* quota: keep them in memory only */ }
}

async function loadModels() {
  const body = await getJson("/v1/models");
  models = Array.isArray(body.data) ? body.data : [];
  const select = $("kb-select");
  const wanted = current.kb || select.value;
  select.replaceChildren(...models.map((m) => el("option", { value: m.id }, m.id)));
  if (models.some((m) => m.id === wanted)) select.value = wanted;
  showMode();
}

function showMode() {
  const model = models.find((m) => m.id === $("kb-select").value);
  const hint = $("kb-mode");
  const entries = Object.entries((model && model.retrieval) || {});
  hint.textContent = entries.length
    ? "retrieval: " + entries.map(([v, info]) => (entries.length > 1 ? `${v} ${info.mode}` : info.mode)).join(", ")
    : "";
  hint.title = entries.map(([v, info]) => `${v}: ${info.mode}${info.language ? ` (${info.language})` : ""}`
    + (info.why ? ` — ${info.why}` : "")).join("\n");
}

function renderConversations() {
  $("conversation-list").replaceChildren(...conversations.map((c) => el("li", {},
    el("button", {
      type: "button", class: c === current ? "conversation active" : "conversation", title: c.id,
      "data-testid": "conversation",
      onclick: () => switchConversation(c),
    }, c.title))));
}

function switchConversation(conversation) {
  if (running) return;
  current = conversation;
  if (conversation.kb) $("kb-select").value = conversation.kb;
  showMode();
  renderChat();
}

function renderSources(sources) {
  return (sources || []).map((doc, i) => el("details", { class: "source", "data-testid": "source" },
    el("summary", {},
      el("span", { class: "source-name", title: doc.metadata?.source ?? "" },
        `[${i + 1}] ${baseName(doc.metadata?.source)}`),
      el("span", { class: "score", "data-testid": "source-score" }, score(doc.score))),
    el("pre", { class: "passage" }, doc.page_content ?? "")));
}

// One answer: sources first (as Chatchat shows them), the text, then who answered and how fast.
function answerView(turn) {
  const text = el("div", { class: "answer-text", "data-testid": "answer-text" }, turn.answer);
  const sources = el("div", { class: "sources" }, renderSources(turn.sources));
  const error = el("div", { class: "answer-error", "data-testid": "answer-error" }, turn.error || "");
  const meta = el("div", { class: "answer-meta muted", "data-testid": "answer-meta" });
  const box = el("div", { class: "answer", "data-testid": "answer", "data-state": turn.state || "done" },
    sources, text, error, meta);
  const update = () => {
    text.textContent = turn.answer;
    error.textContent = turn.error || "";
    error.hidden = !turn.error;
    box.dataset.state = turn.state || "done";
    const parts = [];
    if (turn.version) parts.push(`version ${turn.version}`);
    if (typeof turn.ttftMs === "number") parts.push(`first token ${turn.ttftMs} ms`);
    if (turn.stopped) parts.push("stopped");
    meta.textContent = parts.join(" · ");
  };
  update();
  return { box, sources, update };
}

function renderChat() {
  renderConversations();
  $("messages").replaceChildren(...current.turns.flatMap((turn) => [
    el("div", { class: "question", "data-testid": "question" }, turn.question),
    answerView(turn).box,
  ]));
  $("messages").scrollTop = $("messages").scrollHeight;
}

// Server-sent events from a fetch body: yields the `data:` payload of each event.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = done ? "" : events.pop();
      for (const event of events) {
        const lines = event.split(/\r?\n/).filter((l) => l.startsWith("data:"));
        if (lines.length) yield lines.map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      }
      if (done) return;
    }
  } finally {
    reader.cancel().catch(() => {});  // the caller stopped reading early (an error event): close the stream
  }
}

function history(turns) {
  const messages = [];
  for (const t of turns) {
    if (!t.answer.trim() || t.error) continue;  // a failed or empty answer is not history
    messages.push({ role: "user", content: t.question }, { role: "assistant", content: t.answer });
  }
  return messages;
}

function numberInput(id, min, max) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < min || value > max) {
    throw new Error(`${id}: must be between ${min} and ${max}`);
  }
  return value;
}

async function ask(question) {
  const kb = $("kb-select").value;
  if (!kb) { notice("no knowledge base to ask: is a version serving?"); return; }
  const body = {
    model: kb, stream: true, conversation_id: current.id,
    messages: [...history(current.turns), { role: "user", content: question }],
    top_k: numberInput("top-k", 1, 50), score_threshold: numberInput("score-threshold", -1, 1),
  };
  const conversation = current;
  const turn = { question, answer: "", sources: [], state: "streaming", version: null, ttftMs: null, error: null };
  conversation.kb = kb;
  if (!conversation.turns.length) conversation.title = question.slice(0, 40);
  conversation.turns.push(turn);
  renderChat();
  const view = answerView(turn);
  $("messages").lastChild.replaceWith(view.box);

  running = new AbortController();
  setRunning(true);
  const sent = performance.now();
  try {
    const response = await request("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: running.signal,
    });
    turn.version = response.headers.get("x-rag-version");
    view.update();
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) { turn.error = chunk.error.message || "the answer failed"; break; }
      if (Array.isArray(chunk.sources)) {
        turn.sources = chunk.sources;
        view.sources.replaceChildren(...renderSources(turn.sources));
      }
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        if (turn.ttftMs === null) turn.ttftMs = Math.round(performance.now() - sent);
        turn.answer += delta;
      }
      if (chunk.version) turn.version = chunk.version;
      view.update();
      $("messages").scrollTop = $("messages").scrollHeight;
    }
  } catch (e) {
    if (e.name === "AbortError") turn.stopped = true;
    else turn.error = e.message;
  } finally {
    turn.state = "done";
    view.update();
    running = null;
    setRunning(false);
    saveConversations();
  }
}

function setRunning(on) {
  $("chat-send").disabled = on;
  $("chat-stop").disabled = !on;
  $("new-conversation").disabled = on;
}

function bindChat() {
  $("kb-select").addEventListener("change", showMode);
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("chat-input").value.trim();
    if (!question || running) return;
    $("chat-input").value = "";
    ask(question).catch((e) => notice(e.message));
  });
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-stop").addEventListener("click", () => running && running.abort());
  $("new-conversation").addEventListener("click", () => {
    current = newConversationRecord();
    conversations.unshift(current);
    saveConversations();
    renderChat();
    $("chat-input").focus();
  });
  renderChat();
}

// ---- knowledge bases -------------------------------------------------------------------------

let selectedKb = null;
let polling = null;  // the timer of the job being watched

async function loadKnowledgeBases() {
  const body = await getJson("/knowledge_base/list_knowledge_bases");
  const kbs = Array.isArray(body.knowledge_bases) ? body.knowledge_bases
    : (body.data || []).map((name) => ({ knowledge_base_name: name }));
  $("kb-rows").replaceChildren(...kbs.map((kb) => {
    const name = kb.knowledge_base_name;
    const files = Array.isArray(kb.files) ? kb.files.length : kb.files;
    return el("tr", {
      "data-testid": "kb-row", "data-name": name, class: name === selectedKb ? "selected" : "",
      onclick: () => selectKb(name),
    },
    el("td", {}, name), el("td", {}, kb.kb_info ?? ""), el("td", {}, files ?? "—"),
    el("td", {}, kb.index_version ?? "—"), el("td", {}, kb.language ?? "—"),
    el("td", { title: kb.why ?? "" }, kb.retrieval_mode ?? "—"),
    el("td", {}, el("button", {
      type: "button", class: "danger small", "data-testid": "kb-delete",
      onclick: (event) => { event.stopPropagation(); deleteKb(name); },
    }, "Delete")));
  }));
  if (selectedKb && !kbs.some((kb) => kb.knowledge_base_name === selectedKb)) selectKb(null);
}

function selectKb(name) {
  selectedKb = name;
  for (const row of $("kb-rows").children) row.classList.toggle("selected", row.dataset.name === name);
  $("kb-detail").hidden = !name;
  $("kb-title").textContent = name || "";
  $("search-results").replaceChildren();
  if (name) loadFiles().catch((e) => notice(e.message));
  if (name) loadEvalSet().catch((e) => notice(e.message));
}

async function loadEvalSet() {
  const kb = selectedKb;
  const body = await getJson(`/knowledge_base/eval_set?knowledge_base_name=${encodeURIComponent(kb)}`);
  if (kb !== selectedKb) return;
  const items = body.data?.items || [];
  $("eval-summary").textContent = items.length
    ? `${items.length} evaluation questions: a rollout compares the candidate's recall@5 and citations on them with the `
      + "stable version's; run them with python -m scripts.evaluate"
    : "no golden set: POST one to /knowledge_base/eval_set (see the README) to have rollouts check answer quality";
  $("eval-rows").replaceChildren(...items.map((i) => el("tr", { "data-testid": "eval-row" },
    el("td", {}, i.question), el("td", {}, i.files.join(", ")), el("td", {}, (i.words || []).join(", ")))));
}

async function loadFiles() {
  if (!selectedKb) return;
  const kb = selectedKb;
  const body = await getJson(`/knowledge_base/list_files?knowledge_base_name=${encodeURIComponent(kb)}`);
  if (kb !== selectedKb) return;
  $("file-rows").replaceChildren(...(body.data || []).map((f) => el("tr", { "data-testid": "file-row" },
    el("td", { title: f.in_db === false ? "not indexed" : "" }, f.file_name, f.in_db === false ? " (not indexed)" : ""),
    el("td", {}, humanSize(f.file_size)), el("td", {}, f.docs_count ?? "—"), el("td", {}, localTime(f.update_time)),
    el("td", { class: "actions" },
      el("button", { type: "button", class: "small secondary", "data-testid": "file-download",
        onclick: () => download(kb, f.file_name).catch((e) => notice(e.message)) }, "Download"),
      el("button", { type: "button", class: "small secondary", "data-testid": "file-reindex",
        onclick: () => fileJob("update_docs", kb, f.file_name, { wait: false }) }, "Re-index"),
      el("button", { type: "button", class: "small danger", "data-testid": "file-delete",
        onclick: () => confirm(`Delete ${f.file_name} from ${kb}?`)
          && fileJob("delete_docs", kb, f.file_name, { delete_content: true, wait: false }) }, "Delete")))));
}

async function download(kb, fileName) {
  const query = new URLSearchParams({ knowledge_base_name: kb, file_name: fileName });
  const blob = await (await request(`/knowledge_base/download_doc?${query}`)).blob();
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: baseName(fileName) });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

function fileJob(route, kb, fileName, extra) {
  postJson(`/knowledge_base/${route}`, { knowledge_base_name: kb, file_names: [fileName], ...extra })
    .then((body) => watchJob(body.data?.job_id, `${route === "delete_docs" ? "deleting" : "re-indexing"} ${fileName}`))
    .catch((e) => notice(e.message));
}

async function deleteKb(name) {
  if (!confirm(`Delete the knowledge base ${name} and all its files?`)) return;
  try {
    await postJson("/knowledge_base/delete_knowledge_base", { knowledge_base_name: name });
    notice(`deleted ${name}`, "info");
    if (selectedKb === name) selectKb(null);
    await loadKnowledgeBases();
  } catch (e) { notice(e.message); }
}

function showJob(text, fraction) {
  $("job").hidden = false;
  $("job-status").textContent = text;
  const bar = $("job-progress");
  if (fraction === null) bar.removeAttribute("value"); else bar.value = Math.max(0, Math.min(1, fraction));
}

// Multipart upload through XMLHttpRequest, for the progress of the request body itself.
function upload() {
  const files = Array.from($("upload-input").files || []);
  if (!selectedKb || !files.length) { notice("choose files to upload first"); return; }
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  form.append("knowledge_base_name", selectedKb);
  form.append("override", "true");
  form.append("wait", "false");
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/knowledge_base/upload_docs");
  for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
  xhr.upload.onprogress = (e) => e.lengthComputable
    && showJob(`sending ${files.length} file(s): ${Math.round((100 * e.loaded) / e.total)}%`, e.loaded / e.total);
  xhr.onerror = () => showJob("upload failed: the connection broke", 0);
  xhr.onload = () => {
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
    if (xhr.status === 401) showKeyForm(`The API key was refused: ${errorMessage(body, 401)}`);
    if (xhr.status < 200 || xhr.status >= 300) {
      showJob(`upload failed: ${errorMessage(body, xhr.status)}`, 0);
      return;
    }
    $("upload-input").value = "";
    watchJob(body?.data?.job_id, `upload of ${files.length} file(s)`);
  };
  showJob(`sending ${files.length} file(s)…`, 0);
  xhr.send(form);
}

function watchJob(jobId, what) {
  clearTimeout(polling);
  if (!jobId) { showJob(`${what}: done`, 1); loadFiles().catch((e) => notice(e.message)); return; }
  const poll = async () => {
    let view;
    try {
      view = (await getJson(`/knowledge_base/jobs/${encodeURIComponent(jobId)}`)).data;
    } catch (e) { showJob(`${what}: ${e.message}`, 0); return; }
    const chunks = view.chunks_total ? `, ${view.chunks_embedded}/${view.chunks_total} chunks embedded` : "";
    const eta = typeof view.eta_s === "number" ? `, about ${Math.ceil(view.eta_s)} s left` : "";
    const fraction = view.chunks_total ? view.chunks_embedded / view.chunks_total
      : view.files_total ? view.files_done / view.files_total : null;
    if (view.state === "failed") { showJob(`${what} failed: ${view.error || "unknown error"}`, 0); return; }
    if (view.state === "done") {
      showJob(`${what}: done (${view.files_done}/${view.files_total} files${chunks})`, 1);
      loadFiles().catch((e) => notice(e.message));
      loadKnowledgeBases().catch(() => {});
      return;
    }
    showJob(`${what}: ${view.state}, ${view.files_done}/${view.files_total} files${chunks}${eta}`,
      view.state === "queued" ? null : fraction);
    polling = setTimeout(poll, 500);
  };
  showJob(`${what}: queued`, null);
  poll();
}

async function search(query) {
  const docs = await postJson("/knowledge_base/search_docs",
    { query, knowledge_base_name: selectedKb, top_k: numberInput("top-k", 1, 50) ?? 5 });
  const results = $("search-results");
  if (!Array.isArray(docs) || !docs.length) {
    results.replaceChildren(el("p", { class: "muted" }, "no match"));
    return;
  }
  results.replaceChildren(...docs.map((doc) => el("div", { class: "search-result", "data-testid": "search-result" },
    el("div", { class: "muted" }, `${doc.metadata?.source ?? "?"} · score ${score(doc.score)}`),
    el("pre", { class: "passage" }, doc.page_content ?? ""))));
}

function bindKnowledge() {
  $("kb-refresh").addEventListener("click", () => loadKnowledgeBases().catch((e) => notice(e.message)));
  $("kb-create-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = $("kb-name-input").value.trim();
    try {
      await postJson("/knowledge_base/create_knowledge_base",
        { knowledge_base_name: name, kb_info: $("kb-info-input").value.trim() });
      $("kb-name-input").value = $("kb-info-input").value = "";
      notice(`created ${name}`, "info");
      await loadKnowledgeBases();
      selectKb(name);
    } catch (e) { notice(e.message); }
  });
  $("upload-button").addEventListener("click", upload);
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    search($("search-input").value.trim()).catch((e) => notice(e.message));
  });
}

// ---- versions and rollout --------------------------------------------------------------------

async function refreshVersions() {
  // /ready answers 503 while starting or draining, with the same body: read it either way.
  const readyResponse = await fetch("/ready", { headers: authHeaders() });
  const ready = await readyResponse.json().catch(() => ({}));
  // Statistics or rollout state unavailable (a 503 while the board starts): show what the others say.
  const problems = [];
  const tolerant = (path) => getJson(path).catch((e) => {
    problems.push(`${path.split("?")[0]}: ${e.message}`);
    return {};
  });
  const [stats, rollout] = await Promise.all([tolerant("/stats?window_s=60"), tolerant("/rollout")]);
  const weights = { ...(stats.weights || {}), ...(ready.weights || {}) };
  const perVersion = stats.versions || {};
  const names = [...new Set([...(ready.versions || []), ...Object.keys(weights), ...Object.keys(perVersion)])].sort();
  const serving = new Set(ready.serving || []), waiting = new Set(ready.waiting_for || []);
  $("ready-status").textContent = `gateway: ${ready.status ?? "unknown"} · in flight: ${ready.in_flight ?? "—"}`
    + (stats.draining ? " · draining" : "") + (problems.length ? ` · unavailable: ${problems.join("; ")}` : "");
  $("version-rows").replaceChildren(...names.map((name) => {
    const s = perVersion[name] || {};
    const cold = (ready.scaled_to_zero || {})[name] || [];
    const state = !serving.has(name) ? (waiting.has(name) ? "starting" : "not serving")
      : cold.length ? "scaled to zero" : "ready";
    const errorRate = typeof s.error_rate === "number" ? `${(100 * s.error_rate).toFixed(1)}%` : "—";
    // Running replicas per stage, as the autoscaler has them now (0 = scaled to zero, cold start on demand).
    const stages = (ready.replicas || {})[name] || {};
    const replicas = Object.keys(stages).sort().map((stage) => `${stage} ${stages[stage]}`).join(", ") || "—";
    return el("tr", { "data-testid": "version-row", "data-version": name },
      el("td", {}, name), el("td", {}, weights[name] ?? "—"),
      el("td", { class: `state-${state.replaceAll(" ", "-")}`, title: cold.length ? `cold: ${cold.join(", ")}` : "" }, state),
      el("td", { "data-testid": "version-replicas" }, replicas),
      el("td", {}, s.requests ?? "—"), el("td", {}, errorRate), el("td", {}, ms(s.ttft_p50_s)),
      el("td", {}, ms(s.ttft_p90_s)), el("td", {}, ms(s.ttft_p99_s)), el("td", {}, s.cold_starts ?? "—"),
      el("td", {}, s.in_flight ?? "—"));
  }));
  showRollout(rollout);
}

function lastRule(state) {
  const last = (state.history || []).at(-1);
  if (!last || !last.rule || last.action === "continue") return "";  // promoted: every stage passed
  return `, decided by rule ${last.rule} at ${typeof last.step === "number" ? `step ${last.step + 1}` : last.step}`;
}

function showRollout(state) {
  const panel = $("rollout-panel");
  const active = ROLLOUT_ACTIVE.includes(state.status);
  const decisions = state.history || state.decisions || state.log || [];
  panel.hidden = !active && !decisions.length;
  $("last-rollout").textContent = !active && state.status && !["none", "unreadable"].includes(state.status)
    ? `last rollout: ${state.new} over ${state.stable}: ${state.status}${lastRule(state)}${state.reason ? ` (${state.reason})` : ""}`
    : "";
  if (panel.hidden) return;
  const steps = Array.isArray(state.steps) ? state.steps : null;
  const step = typeof state.step === "number" ? `step ${state.step + 1}${steps ? ` of ${steps.length}` : ""}` : "";
  panel.replaceChildren(...[
    el("h2", {}, active ? `Rollout in progress: ${state.new} replacing ${state.stable}`
      : `Last rollout: ${state.new} over ${state.stable}, ${state.status}`),
    active ? el("p", {}, [`status ${state.status}`, state.phase && `phase ${state.phase}`, step].filter(Boolean).join(" · "))
      : null,
    active && state.reason ? el("p", { class: "muted" }, state.reason) : null,
    active && steps ? el("ol", { class: "steps" }, steps.map((pct, i) => el("li", {
      class: i < state.step ? "passed" : i === state.step ? "current" : "",
    }, `${pct}%`))) : null,
    decisions.length ? el("table", { class: "grid" },
      el("thead", {}, el("tr", {}, el("th", {}, "Stage"), el("th", {}, "Percent"), el("th", {}, "Decision"),
        el("th", {}, "Rule"), el("th", {}, "Reason (the rule's numbers)"))),
      el("tbody", {}, decisions.map((d) => el("tr", { "data-testid": "rollout-decision" },
        el("td", {}, typeof d.step === "number" ? `step ${d.step + 1}` : (d.step ?? "—")), el("td", {}, d.percent ?? "—"),
        el("td", {}, d.action ?? ""), el("td", {}, d.rule ?? ""), el("td", {}, d.reason ?? ""))))) : null,
  ].filter(Boolean));
}

function pollVersions() {
  if (currentTab === "versions" && document.visibilityState === "visible" && $("key-form").hidden) {
    refreshVersions().catch((e) => notice(e.message));
  }
}

// ---- start -----------------------------------------------------------------------------------

function bindKeyForm() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORE, $("api-key").value.trim());  // empty: a deployment without keys
    $("key-form").hidden = true;
    notice("API key saved", "info");
    showTab(currentTab);
  });
  $("key-cancel").addEventListener("click", () => { $("key-form").hidden = true; });
  $("change-key").addEventListener("click", () => showKeyForm());
}

function start() {
  bindKeyForm();
  for (const button of document.querySelectorAll("[data-tab]")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  bindChat();
  bindKnowledge();
  setInterval(pollVersions, 2000);
  if (apiKey() === null) showKeyForm();
  else showTab("chat");
}

start();
