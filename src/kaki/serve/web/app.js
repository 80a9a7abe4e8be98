// The chat page of `kaki serve` (kaki/serve/page.py serves it). Plain browser JavaScript, no build
// step and no dependencies. It talks only to its own server: GET info (model facts and sampling
// defaults) and POST v1/chat/completions with `stream: true` (server-sent events).
//
// Model output is never parsed as HTML: replies are rendered by building elements and setting
// their textContent (renderMarkdown), so `<script>` or `<img onerror=...>` in a reply is text.
"use strict";

(() => {
  const CHATS_KEY = "kaki.chats.v1"; // localStorage: conversations survive reloads
  const SETTINGS_KEY = "kaki.settings.v1";
  const API_KEY = "kaki.apiKey"; // sessionStorage: the key lives as long as the tab
  const FIELDS = ["system", "temperature", "top_p", "max_tokens", "seed"];

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  };

  let info = null; // GET info's answer
  let busy = null; // {controller, chat, msg} while a reply streams
  let streamView = null; // the streaming reply's content element, updated in place
  let pending = false; // a repaint of the streaming reply is scheduled
  const store = loadChats();
  const settings = loadSettings();

  // ------------------------------------------------------------------ storage

  function loadChats() {
    try {
      const s = JSON.parse(localStorage.getItem(CHATS_KEY));
      if (s && Array.isArray(s.chats)) {
        // A reply that was streaming when the page went away ended there.
        for (const c of s.chats) {
          for (const m of c.messages) if (m.status === "streaming") m.status = "stopped";
        }
        return s;
      }
    } catch (e) { /* unreadable: start afresh */ }
    return { chats: [], current: null };
  }

  function saveChats() {
    try {
      localStorage.setItem(CHATS_KEY, JSON.stringify(store));
    } catch (e) {
      showBanner(`This browser would not store the conversation (${e.message}); it will be lost on reload.`);
    }
  }

  function loadSettings() {
    try {
      const s = JSON.parse(localStorage.getItem(SETTINGS_KEY));
      if (s && typeof s === "object") return s;
    } catch (e) { /* unreadable: defaults */ }
    return {};
  }

  function apiKey() {
    return sessionStorage.getItem(API_KEY) || "";
  }

  // ------------------------------------------------------------------ conversations

  function newId() {
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  }

  function current() {
    let chat = store.chats.find((c) => c.id === store.current);
    if (!chat) {
      chat = { id: newId(), title: "", messages: [] };
      store.chats.unshift(chat);
      store.current = chat.id;
    }
    return chat;
  }

  function newChat() {
    stop();
    const chat = current();
    if (chat.messages.length) {
      const fresh = { id: newId(), title: "", messages: [] };
      store.chats.unshift(fresh);
      store.current = fresh.id;
    }
    saveChats();
    render();
    $("input").focus();
  }

  function switchChat(id) {
    stop();
    store.current = id;
    saveChats();
    render();
    closeChatsOnPhone();
  }

  function deleteChat(id) {
    if (busy && busy.chat.id === id) stop();
    store.chats = store.chats.filter((c) => c.id !== id);
    if (store.current === id) store.current = store.chats.length ? store.chats[0].id : null;
    saveChats();
    render();
  }

  // ------------------------------------------------------------------ server

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = apiKey();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  // The server's own words for a failed answer: kaki's `{"error": {"message"}}`, else the body.
  async function serverError(res) {
    let text = "";
    try {
      text = await res.text();
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return body.error.message;
      if (body && body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (e) { /* not JSON: the text itself */ }
    return text.slice(0, 500) || res.statusText;
  }

  function describeFailure(status, message, retryAfter) {
    if (status === 401) return `The server refused the API key (401): ${message}`;
    if (status === 503) {
      const when = retryAfter ? ` Try again in ${retryAfter} s.` : "";
      return `The server is busy or shutting down (503): ${message}.${when}`;
    }
    if (status >= 400 && status < 500) return `The server refused the request (${status}): ${message}`;
    return `The server failed (${status}): ${message}`;
  }

  function unreachable(e) {
    return `Cannot reach the kaki server at ${location.origin} (${e.message}). Is \`kaki serve\` still running?`;
  }

  async function loadInfo() {
    let res;
    try {
      res = await fetch("info", { headers: headers(), cache: "no-store" });
    } catch (e) {
      $("model").textContent = "not connected";
      showBanner(unreachable(e));
      return;
    }
    if (res.status === 401) {
      const message = await serverError(res);
      askKey(apiKey() ? `The server refused this key: ${message}` : "");
      $("model").textContent = "API key needed";
      return;
    }
    if (!res.ok) {
      showBanner(describeFailure(res.status, await serverError(res), res.headers.get("Retry-After")));
      return;
    }
    info = await res.json();
    $("key-form").hidden = true;
    hideBanner();
    showInfo();
  }

  function showInfo() {
    $("model").textContent = info.model;
    $("context").textContent = `context ${info.context_length.toLocaleString("en")} tokens`;
    const on = [];
    if (info.retrieval && info.retrieval.enabled) on.push("retrieval");
    if (info.moderation) on.push("moderation");
    $("features").textContent = on.join(" · ");
    showDefaults();
    render(); // replies are labelled with the model's name
  }

  function showDefaults() {
    if (!info) return;
    const d = info.defaults || {};
    $("set-temperature").placeholder = d.temperature ?? "";
    $("set-top_p").placeholder = d.top_p ?? "";
    $("set-max_tokens").placeholder = d.max_tokens ?? `up to ${info.context_length.toLocaleString("en")}`;
    $("set-seed").placeholder = d.seed ?? "random";
  }

  function askKey(error) {
    const form = $("key-form");
    form.hidden = false;
    $("key-error").hidden = !error;
    $("key-error").textContent = error || "";
    $("key-input").focus();
  }

  // ------------------------------------------------------------------ a reply

  // The request for `chat`'s history. Settings left empty are not sent, so the server's defaults
  // apply. Throws an Error naming the setting that is not a number.
  function requestBody(chat) {
    const messages = [];
    if ((settings.system || "").trim()) messages.push({ role: "system", content: settings.system });
    const ms = chat.messages;
    for (let i = 0; i < ms.length; i++) {
      const m = ms[i];
      // An exchange that got no answer (refused, failed) is left out with its question: resent,
      // a blocked message would block every later request of the conversation.
      const next = ms[i + 1];
      if (m.role === "user" && next && next.role === "assistant" && failed(next)) continue;
      if (m.role === "assistant" && (failed(m) || m.status === "streaming")) continue;
      messages.push({ role: m.role, content: m.content });
    }
    const body = { messages, stream: true, stream_options: { include_usage: true } };
    const number = (name, integer) => {
      const raw = String(settings[name] ?? "").trim();
      if (!raw) return;
      const x = Number(raw);
      if (!Number.isFinite(x) || (integer && !Number.isSafeInteger(x))) {
        throw new Error(`${name} must be ${integer ? "a whole number" : "a number"}, got "${raw}"`);
      }
      body[name] = x;
    };
    number("temperature");
    number("top_p");
    number("max_tokens", true);
    number("seed", true);
    // The model's suggested reply length, as `kaki chat` uses it; without it a reply that never
    // ends fills the whole context.
    const suggested = info && info.defaults && info.defaults.max_tokens;
    if (body.max_tokens === undefined && suggested) body.max_tokens = suggested;
    return body;
  }

  function failed(m) {
    return m.status === "error" || m.status === "refused";
  }

  async function generate(chat) {
    let body;
    try {
      body = requestBody(chat);
      $("settings-error").hidden = true;
    } catch (e) {
      $("settings-error").textContent = e.message;
      $("settings-error").hidden = false;
      openSettings(true);
      return;
    }
    const msg = { role: "assistant", content: "", status: "streaming" };
    chat.messages.push(msg);
    const controller = new AbortController();
    busy = { controller, chat, msg };
    render();
    hideBanner();
    const started = performance.now();
    let first = null;
    let usage = null;
    let done = false;
    try {
      const res = await fetch("v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!res.ok) {
        const message = await serverError(res);
        const text = describeFailure(res.status, message, res.headers.get("Retry-After"));
        fail(msg, text);
        if (res.status === 401) askKey(`The server refused this key: ${message}`);
        return;
      }
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done: end } = await reader.read();
        if (end) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
          if (!data) continue;
          if (data === "[DONE]") {
            done = true;
            continue;
          }
          const chunk = JSON.parse(data);
          if (chunk.error) {
            fail(msg, `The server stopped this reply: ${chunk.error.message}`);
            continue;
          }
          if (chunk.sources) msg.sources = chunk.sources;
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            if (choice.index !== 0) continue;
            const text = choice.delta && choice.delta.content;
            if (text) {
              if (first === null) first = performance.now();
              msg.content += text;
              repaint();
            }
            if (choice.finish_reason) msg.finish = choice.finish_reason;
            if (choice.finish_reason === "content_filter") {
              msg.status = "refused";
              msg.moderation = choice.moderation || null;
            }
          }
        }
      }
      if (msg.status === "streaming") {
        if (done) msg.status = "done";
        else fail(msg, "The connection closed before the reply finished. Did the server stop?");
      }
    } catch (e) {
      if (controller.signal.aborted) msg.status = "stopped";
      else if (e instanceof TypeError) fail(msg, unreachable(e));
      else fail(msg, `The reply could not be read: ${e.message}`);
    } finally {
      const ended = performance.now();
      if (usage && usage.completion_tokens) msg.stats = speed(usage.completion_tokens, started, first, ended);
      if (msg.stats) $("speed").textContent = `last reply ${msg.stats.tokens} tokens, ${msg.stats.rate.toFixed(1)} tok/s`;
      busy = null;
      saveChats();
      render();
    }
  }

  // Tokens per second of a reply: the decode rate after its first token (prefill excluded), or
  // over the whole request when the reply arrived at once (one token, or held back by moderation).
  function speed(tokens, started, first, ended) {
    const decode = first !== null && tokens > 1 && ended - first > 5 ? (tokens - 1) / ((ended - first) / 1000) : null;
    const rate = decode ?? tokens / Math.max((ended - started) / 1000, 1e-3);
    return { tokens, rate, seconds: (ended - started) / 1000 };
  }

  function fail(msg, text) {
    msg.status = "error";
    msg.error = text;
    showBanner(text);
  }

  function stop() {
    if (busy) busy.controller.abort(); // the server sees the disconnect and frees the slot
  }

  function send(text) {
    if (busy || !text.trim()) return;
    const chat = current();
    chat.messages.push({ role: "user", content: text });
    if (!chat.title) chat.title = text.trim().split("\n")[0].slice(0, 60);
    $("input").value = "";
    saveChats();
    generate(chat);
  }

  function regenerate() {
    const chat = current();
    if (busy || !chat.messages.length) return;
    if (chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
    generate(chat);
  }

  function editLast(index, text) {
    const chat = current();
    if (busy || !text.trim()) return;
    chat.messages.splice(index); // the edited message and what answered it
    chat.messages.push({ role: "user", content: text });
    if (index === 0) chat.title = text.trim().split("\n")[0].slice(0, 60);
    generate(chat);
  }

  // ------------------------------------------------------------------ rendering

  // Basic Markdown into `container`, built node by node: fenced code blocks become <pre><code>,
  // `- `/`1. ` lines lists, `#` lines headings, and inside text `code`, **bold** and *italics*.
  // Everything else, HTML included, stays text.
  function renderMarkdown(container, text) {
    const out = document.createDocumentFragment();
    // Models often start a reply with the space after "adept:"; it is not indentation.
    const lines = text.replace(/^\s+/, "").split("\n");
    let para = [];
    let list = null;
    const flush = () => {
      if (para.length) {
        const p = el("p");
        inline(p, para.join("\n"));
        out.append(p);
      }
      para = [];
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*```+\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flush();
        list = null;
        const code = [];
        // An unclosed fence (a reply still streaming) runs to the end.
        for (i++; i < lines.length && !/^\s*```+\s*$/.test(lines[i]); i++) code.push(lines[i]);
        const pre = el("pre");
        if (fence[1]) pre.dataset.lang = fence[1];
        pre.append(el("code", null, code.join("\n")));
        out.append(pre);
        continue;
      }
      if (!line.trim()) {
        flush();
        list = null;
        continue;
      }
      const item = line.match(/^\s*(?:[-*+]|(\d+)[.)])\s+(.*)$/);
      if (item) {
        flush();
        const tag = item[1] ? "OL" : "UL";
        if (!list || list.tagName !== tag) {
          list = el(tag.toLowerCase());
          out.append(list);
        }
        const li = el("li");
        inline(li, item[2]);
        list.append(li);
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      if (heading) {
        flush();
        list = null;
        const h = el("p", "heading");
        inline(h, heading[2]);
        out.append(h);
        continue;
      }
      list = null;
      para.push(line);
    }
    flush();
    container.replaceChildren(out);
  }

  const INLINE = /`([^`\n]+)`|\*\*(\S(?:[\s\S]*?\S)?)\*\*|\*([^\s*](?:[^*\n]*?[^\s*])?)\*/g;

  function inline(parent, text) {
    let at = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > at) parent.append(document.createTextNode(text.slice(at, m.index)));
      if (m[1] !== undefined) parent.append(el("code", null, m[1]));
      else if (m[2] !== undefined) {
        const b = el("strong");
        inline(b, m[2]);
        parent.append(b);
      } else {
        const i = el("em");
        inline(i, m[3]);
        parent.append(i);
      }
      at = m.index + m[0].length;
    }
    if (at < text.length) parent.append(document.createTextNode(text.slice(at)));
  }

  function render() {
    renderChats();
    renderMessages();
    const streaming = Boolean(busy);
    $("send").hidden = streaming;
    $("stop").hidden = !streaming;
  }

  function renderChats() {
    const list = $("chat-list");
    list.replaceChildren();
    for (const c of store.chats) {
      const li = el("li", c.id === store.current ? "chat current" : "chat");
      const open = el("button", "open", c.title || "New chat");
      open.type = "button";
      open.addEventListener("click", () => switchChat(c.id));
      const del = el("button", "delete", "×");
      del.type = "button";
      del.title = "Delete this conversation";
      del.setAttribute("aria-label", `Delete ${c.title || "this conversation"}`);
      del.addEventListener("click", () => deleteChat(c.id));
      li.append(open, del);
      list.append(li);
    }
  }

  function renderMessages() {
    const chat = current();
    const list = $("messages");
    list.replaceChildren();
    streamView = null;
    const ms = chat.messages;
    const lastUser = ms.map((m) => m.role).lastIndexOf("user");
    ms.forEach((m, i) => {
      const li = el("li", `msg ${m.role}${m.status ? " " + m.status : ""}`);
      li.append(el("div", "who", m.role === "user" ? "You" : info ? info.model : "Model"));
      const content = el("div", "content");
      if (m.role === "user") content.textContent = m.content;
      else renderMarkdown(content, m.content);
      li.append(content);
      if (m.role === "assistant") {
        if (m.status === "refused") li.append(el("div", "note refusal", refusal(m.moderation)));
        if (m.status === "stopped") li.append(el("div", "note", "Stopped."));
        if (m.status === "error") li.append(el("div", "note error", m.error));
        if (m.sources && m.sources.length) li.append(sourcesView(m.sources));
        if (m.stats) {
          li.append(el("div", "meta", `${m.stats.tokens} tokens · ${m.stats.rate.toFixed(1)} tok/s`));
        }
        if (busy && busy.msg === m) streamView = content;
      }
      const actions = el("div", "actions");
      if (!busy && m.role === "user" && i === lastUser) actions.append(button("Edit", "edit", () => startEdit(li, i)));
      if (!busy && m.role === "assistant" && i === ms.length - 1) {
        actions.append(button("Regenerate", "regenerate", regenerate));
      }
      if (actions.childElementCount) li.append(actions);
      list.append(li);
    });
    $("empty").hidden = ms.length > 0;
    list.lastElementChild?.scrollIntoView({ block: "end" });
  }

  function refusal(mod) {
    let text = "Refused by the server's moderation";
    if (mod) {
      const where = mod.where === "output" ? "the reply" : "the message";
      text += `: ${where} was flagged as ${mod.label} (${(mod.score * 100).toFixed(0)}%)`;
    }
    return text + ".";
  }

  function sourcesView(sources) {
    const box = el("details", "sources");
    box.open = true;
    box.append(el("summary", null, `Sources (${sources.length})`));
    const ol = el("ol");
    for (const s of sources) {
      const li = el("li", "source");
      const head = el("button", "source-title");
      head.type = "button";
      head.setAttribute("aria-expanded", "false");
      head.append(el("span", "title", s.title || "(untitled)"));
      const where = s.path || s.source || "";
      if (where) head.append(el("span", "path", s.line ? `${where}:${s.line}` : where));
      const passage = el("div", "passage", s.text || "");
      passage.hidden = true;
      head.addEventListener("click", () => {
        passage.hidden = !passage.hidden;
        head.setAttribute("aria-expanded", String(!passage.hidden));
      });
      li.append(head);
      // Only web addresses become links: a `javascript:` url from an index must not run.
      if (typeof s.url === "string" && /^https?:\/\//i.test(s.url)) {
        const a = el("a", "url", s.url);
        a.href = s.url;
        a.rel = "noopener noreferrer";
        a.target = "_blank";
        li.append(a);
      }
      li.append(passage);
      ol.append(li);
    }
    box.append(ol);
    return box;
  }

  function button(label, cls, onClick) {
    const b = el("button", cls, label);
    b.type = "button";
    b.addEventListener("click", onClick);
    return b;
  }

  function startEdit(li, index) {
    const chat = current();
    const box = el("textarea", "edit-box");
    box.value = chat.messages[index].content;
    box.rows = Math.min(10, box.value.split("\n").length + 1);
    const save = button("Send", "save-edit", () => editLast(index, box.value));
    const cancel = button("Cancel", "cancel-edit", renderMessages);
    box.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        editLast(index, box.value);
      } else if (e.key === "Escape") {
        renderMessages();
      }
    });
    const actions = el("div", "actions");
    actions.append(save, cancel);
    li.replaceChildren(li.firstChild, box, actions);
    box.focus();
  }

  // A streamed token repaints only the reply being written, once per frame.
  function repaint() {
    if (pending || !streamView) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      if (busy && streamView) {
        renderMarkdown(streamView, busy.msg.content);
        streamView.parentElement.scrollIntoView({ block: "end" });
      }
    });
  }

  function showBanner(text) {
    $("banner-text").textContent = text;
    $("banner").hidden = false;
  }

  function hideBanner() {
    $("banner").hidden = true;
  }

  function openSettings(open) {
    $("settings").hidden = !open;
    $("toggle-settings").setAttribute("aria-expanded", String(open));
  }

  function closeChatsOnPhone() {
    if (window.matchMedia("(max-width: 700px)").matches) {
      document.body.classList.remove("chats-open");
      $("toggle-chats").setAttribute("aria-expanded", "false");
    }
  }

  // ------------------------------------------------------------------ wiring

  function wire() {
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      send($("input").value);
    });
    $("input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        send($("input").value);
      }
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && busy) {
        e.preventDefault();
        stop();
      }
    });
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", newChat);
    $("banner-close").addEventListener("click", hideBanner);
    $("toggle-settings").addEventListener("click", () => openSettings($("settings").hidden));
    $("toggle-chats").addEventListener("click", () => {
      const open = document.body.classList.toggle("chats-open");
      $("toggle-chats").setAttribute("aria-expanded", String(open));
    });
    for (const name of FIELDS) {
      const input = $(`set-${name}`);
      input.value = settings[name] ?? "";
      input.addEventListener("input", () => {
        settings[name] = input.value;
        localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
      });
    }
    $("reset-settings").addEventListener("click", () => {
      for (const name of FIELDS) {
        settings[name] = "";
        $(`set-${name}`).value = "";
      }
      localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
    });
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      sessionStorage.setItem(API_KEY, key);
      $("key-input").value = "";
      loadInfo();
    });
  }

  wire();
  render();
  loadInfo();
})();
