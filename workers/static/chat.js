"use strict";
// The chat page: one WebSocket to /ws/chat/<room>/, reconnecting with backoff. Everything users
// typed is inserted with textContent, never as HTML.
(function () {
  const match = location.pathname.match(/^\/chat\/([A-Za-z0-9_-]{1,50})\/$/);
  const room = match ? match[1] : "lobby";
  const log = document.getElementById("log");
  const status = document.getElementById("status");
  const form = document.getElementById("send");
  const handleInput = document.getElementById("handle");
  const messageInput = document.getElementById("message");
  const button = document.getElementById("send-button");
  document.getElementById("title").textContent = "Room " + room;
  document.title = room + " · Switchyard chat";
  handleInput.value = localStorage.getItem("switchyard.handle") || "";

  let socket = null;
  let retry = 0;

  function setStatus(text, cls) {
    status.textContent = text;
    status.className = cls || "";
  }

  function timeOf(ts) {
    const d = new Date(ts);
    return isNaN(d) ? "" : d.toLocaleTimeString();
  }

  function append(entry) {
    const div = document.createElement("div");
    div.className = "msg" + (entry.system ? " system" : "");
    if (entry.ts) {
      const ts = document.createElement("span");
      ts.className = "ts";
      ts.textContent = timeOf(entry.ts);
      ts.title = entry.ts;
      div.appendChild(ts);
    }
    if (entry.handle) {
      const h = document.createElement("span");
      h.className = "handle";
      h.textContent = entry.handle;
      div.appendChild(h);
    }
    const body = document.createElement("span");
    body.className = "body";
    body.textContent = entry.message;
    div.appendChild(body);
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 20;
    log.appendChild(div);
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function onFrame(data) {
    let msg;
    try { msg = JSON.parse(data); } catch (_) { msg = null; }
    if (!msg || typeof msg !== "object") {
      // A plain text broadcast (e.g. group_send("chat-room", {"text": "..."}) from Django).
      append({ system: true, message: String(data) });
      return;
    }
    if (msg.type === "history") {
      log.textContent = "";
      if (typeof msg.you === "string") {
        // Signed in (Django session or token): the server writes under this name.
        handleInput.value = msg.you;
        handleInput.readOnly = true;
        handleInput.title = "signed in as " + msg.you;
      }
      for (const m of msg.messages || []) append(m);
      append({ system: true, message: "joined " + room + (msg.messages && msg.messages.length ? "" : " (no earlier messages)") });
    } else if (msg.type === "message") {
      append(msg);
    } else if (msg.type === "error") {
      append({ system: true, message: "error: " + msg.error });
    } else if (typeof msg.message === "string") {
      append(msg);
    } else {
      append({ system: true, message: data });
    }
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(scheme + "//" + location.host + "/ws/chat/" + room + "/");
    setStatus("connecting…");
    socket.onopen = () => { retry = 0; setStatus("online", "online"); button.disabled = false; };
    socket.onmessage = (e) => onFrame(e.data);
    socket.onclose = () => {
      button.disabled = true;
      const delay = Math.min(10000, 500 * Math.pow(2, retry++)) * (0.5 + Math.random() / 2);
      setStatus("offline — reconnecting in " + Math.round(delay / 1000) + " s", "offline");
      setTimeout(connect, delay);
    };
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const handle = handleInput.value.trim();
    const message = messageInput.value;
    if (!handle || !message.trim() || !socket || socket.readyState !== WebSocket.OPEN) return;
    localStorage.setItem("switchyard.handle", handle);
    socket.send(JSON.stringify({ handle: handle, message: message }));
    messageInput.value = "";
    messageInput.focus();
  });

  connect();
})();
