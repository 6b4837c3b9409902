// Opens the chat room in two headless Chromium pages against a running Switchyard, sends a
// message (with characters that must not be interpreted as HTML) from one page, checks it shows
// in the other as text, and saves a screenshot.
// With EXPECT_RECONNECT=1 (server run with a short --websocket-lifetime) it also checks that both
// pages reconnect on their own after the server closes their sockets, and go on chatting.
// Usage: node chat.mjs BASE_URL SCREENSHOT_PATH
import { chromium } from "playwright-core";

const [base, screenshot] = process.argv.slice(2);
if (!base || !screenshot) {
  console.error("usage: node chat.mjs BASE_URL SCREENSHOT_PATH");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const room = "browser-" + Math.random().toString(36).slice(2, 8);
const text = `hello <b>bold</b> & "quotes" ${Date.now()}`;
// Upper bounds on waits for events, not delays: generous, because CI shares 2 cores with the
// server and Redis, and a busy host has stretched a page's steps to several seconds.
const timeout = 30000;

const browser = await chromium.launch({
  executablePath,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-quic", "--disable-component-update", "--disable-sync"],
});
let failed = false;
try {
  const context = await browser.newContext({ viewport: { width: 900, height: 700 } });
  // Counts the page's disconnects as they happen. Its "offline" status lasts only until the
  // reconnect (0.25-0.5 s): polling for it can miss it on a busy machine, an observer cannot.
  await context.addInitScript(() => {
    window.__offlineSeen = 0;
    document.addEventListener("DOMContentLoaded", () => {
      const status = document.getElementById("status");
      if (!status) return;
      new MutationObserver(() => {
        if (status.classList.contains("offline")) window.__offlineSeen += 1;
      }).observe(status, { attributes: true, attributeFilter: ["class"] });
    });
  });
  const alice = await context.newPage();
  const bob = await context.newPage();
  for (const page of [alice, bob]) {
    page.on("pageerror", (e) => { console.error("page error:", e.message); failed = true; });
    await page.goto(`${base}/chat/${room}/`, { timeout });
    await page.waitForSelector("#status.online", { timeout });
  }
  await alice.fill("#handle", "alice");
  await alice.fill("#message", text);
  await alice.click("#send-button");
  // Bob sees Alice's message, as text (no <b> element created from what she typed).
  const body = bob.locator("#log .msg .body", { hasText: text });
  await body.waitFor({ timeout });
  const shown = await body.textContent();
  if (shown !== text) throw new Error(`bob saw ${JSON.stringify(shown)}, expected ${JSON.stringify(text)}`);
  if (await bob.locator("#log b").count() !== 0) throw new Error("user text was rendered as HTML");
  const handle = await bob.locator("#log .msg", { hasText: text }).locator(".handle").textContent();
  if (handle !== "alice") throw new Error(`handle shown as ${JSON.stringify(handle)}`);
  // A late joiner gets the room's history.
  const carol = await context.newPage();
  await carol.goto(`${base}/chat/${room}/`, { timeout });
  await carol.locator("#log .msg .body", { hasText: text }).waitFor({ timeout });
  if (process.env.EXPECT_RECONNECT) {
    // The server closes sockets after a short lifetime: both pages must notice, reconnect by
    // themselves and go on chatting.
    for (const page of [alice, bob]) {
      await page.waitForFunction(
        () => window.__offlineSeen > 0 && document.querySelector("#status.online") !== null,
        null,
        { timeout, polling: 100 },
      );
    }
    const again = `after reconnect ${Date.now()}`;
    await alice.fill("#message", again);
    await alice.click("#send-button");
    await bob.locator("#log .msg .body", { hasText: again }).waitFor({ timeout });
  }
  await bob.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ ok: !failed, room, screenshot }));
} catch (e) {
  console.error("browser test failed:", e.message);
  failed = true;
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
