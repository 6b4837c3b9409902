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
      line("job " + msg.job + " done in " + msg.elapsed_ms + " ms: sha256^" + msg.rounds + " = " + msg.digest, "done");
    } else if (msg.type === "error") {
      line("job failed: " + msg.error, "system");
    } else {
      line(e.data);
    }
  };

  document.getElementById("job").addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = new URLSearchParams({
      ticket: ticket,
      text: document.getElementById("text").value,
      rounds: document.getElementById("rounds").value,
    });
    const res = await fetch("/jobs/", { method: "POST", body: body });
    const reply = await res.json().catch(() => ({}));
    if (res.status === 202) line("job " + reply.job + " queued on " + reply.channel, "system");
    else line("could not start the job: " + (reply.error || res.status), "system");
  });
})();
