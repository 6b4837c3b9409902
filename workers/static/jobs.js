"use strict";
// The background-job page: a WebSocket on /ws/jobs/<ticket>/ joins the group jobs-<ticket>; the
// form POSTs the job with the same ticket, and the worker that ran it reports to that group.
(function () {
  const ticket = (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random()).replace(/[^A-Za-z0-9-]/g, "");
  const log = document.getElementById("log");
  const status = document.getElementById("status");
  const start = document.getElementById("start");

  function line(text, cls) {
    const div = document.createElement("div");
    div.className = "msg" + (cls ? " " + cls : "");
    div.textContent = text;
    log.appendChild(div);
  }

  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(scheme + "//" + location.host + "/ws/jobs/" + ticket + "/");
  socket.onopen = () => { status.textContent = "online"; status.className = "online"; start.disabled = false; };
  socket.onclose = () => { status.textContent = "offline (reload to reconnect)"; status.className = "offline"; start.disabled = true; };
  socket.onmessage = (e) => {
    let msg;
    try { msg = JSON.parse(e.data); } catch (_) { line(String(e.data)); return; }
    if (msg.type === "done") {
      const attempt = msg.attempt ? " (durable, attempt " + msg.attempt + ")" : "";
      pending.delete(msg.job);
      line("job " + msg.job + " done in " + msg.elapsed_ms + " ms" + attempt + ": sha256^" + msg.rounds + " = " + msg.digest, "done");
    } else if (msg.type === "error") {
      line("job failed: " + msg.error, "system");
    } else {
      line(e.data);
    }
  };

  // Durable jobs this page started and has not heard back from: a dead one shows up in the
  // dead letters (GET /api/jobs/dead) with its attempts and last error.
  const pending = new Map();
  async function checkDead() {
    if (pending.size === 0) return;
    const res = await fetch("/api/jobs/dead").catch(() => null);
    if (!res || res.status !== 200) return;
    const dead = await res.json().catch(() => []);
    for (const d of dead) {
      let job;
      try { job = JSON.parse(d.message).job; } catch (_) { continue; }
      if (pending.has(job)) {
        pending.delete(job);
        line("job " + job + " dead after " + d.attempts + " attempts: " + d.error, "system");
      }
    }
  }
  setInterval(checkDead, 2000);

  document.getElementById("job").addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = new URLSearchParams({
      ticket: ticket,
      text: document.getElementById("text").value,
      rounds: document.getElementById("rounds").value,
    });
    if (document.getElementById("durable").checked) {
      body.set("durable", "1");
      body.set("fail", document.getElementById("fail").value);
    }
    const res = await fetch("/jobs/", { method: "POST", body: body });
    const reply = await res.json().catch(() => ({}));
    if (res.status === 202) {
      if (body.get("durable")) pending.set(reply.job, Date.now());
      line("job " + reply.job + " queued on " + reply.channel, "system");
    }
    else line("could not start the job: " + (reply.error || res.status), "system");
  });
})();
