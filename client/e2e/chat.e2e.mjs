// End-to-end test of the chat page in headless Chromium, against the real stack.
//
// Run by tests/e2e/test_browser.py, which starts Redis, the server (serving client/dist) and a
// worker with the local model, then answers this script's requests on stdin/stdout:
// a line `E2E {"need": "..."}` on stdout asks the harness to act (kill the server, start it
// again, expire the session, store a chosen bot reply); the harness answers with one line on
// stdin once it is done. Progress goes to stderr. Exit code 0 means every step passed.
//
// The page runs under the server's Content-Security-Policy: every `securitypolicyviolation`
// event and every console message about the policy fails the run. A local HTTP server here
// counts requests for the image a stored reply points to: the page must make none.
//
// Environment: BASE_URL (the server), CHROMIUM (default /usr/bin/chromium),
// SCREENSHOT (where to save the page), E2E_TIMEOUT_MS (per wait, default 90000).

import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const BASE_URL = process.env.BASE_URL;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SCREENSHOT = process.env.SCREENSHOT || '';
const TIMEOUT = Number(process.env.E2E_TIMEOUT_MS || 90_000);
if (!BASE_URL) throw new Error('BASE_URL is not set');

const stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

/** Asks the harness to do something and waits for its answer. */
async function ask(need, extra = {}) {
  process.stdout.write(`E2E ${JSON.stringify({ need, ...extra })}\n`);
  const { value, done } = await stdinLines.next();
  if (done || value.trim() !== 'ok') throw new Error(`harness did not do ${need}: ${value}`);
}

const log = (...args) => console.error('[e2e]', ...args);

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

// Counts how many different partial texts a streaming reply showed, to prove the reply
// grew token by token in the page (not only arrived whole).
function watchStreaming() {
  window.__partials = new Set();
  new MutationObserver(() => {
    for (const li of document.querySelectorAll('li[data-status="streaming"]')) {
      window.__partials.add(li.textContent);
    }
  }).observe(document, { subtree: true, childList: true, characterData: true, attributes: true });
}

// Every CSP violation the page reports goes to this script (through a binding that survives
// reloads), to be checked at the end.
function watchPolicy() {
  document.addEventListener('securitypolicyviolation', (e) => {
    window.__cspViolation(`${e.violatedDirective} blocked ${e.blockedURI || 'inline'} at ${e.sourceFile}:${e.lineNumber}`);
  });
}

/** A local HTTP server that counts the requests it gets (the image a reply points to). */
async function countingServer() {
  const seen = [];
  const server = createServer((req, res) => {
    seen.push(req.url);
    res.writeHead(200, { 'Content-Type': 'image/png' }).end();
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${server.address().port}`, seen, close: () => server.close() };
}

const images = await countingServer();
const userDir = mkdtempSync(join(tmpdir(), 'chat-e2e-chromium-'));
// A persistent context gives the browser a fresh profile directory of its own.
// A phone-sized screen: the page must work there.
const context = await chromium.launchPersistentContext(userDir, {
  executablePath: CHROMIUM,
  headless: true,
  viewport: { width: 390, height: 760 },
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});

try {
  context.setDefaultTimeout(TIMEOUT);
  await context.addInitScript(watchStreaming);
  const violations = [];
  await context.exposeFunction('__cspViolation', (text) => violations.push(text));
  await context.addInitScript(watchPolicy);
  const page = await context.newPage();
  const pageErrors = [];
  page.on('pageerror', (err) => pageErrors.push(String(err)));
  const policyMessages = [];
  page.on('console', (msg) => {
    if (/content.security.policy/i.test(msg.text())) policyMessages.push(msg.text());
  });

  const log_ = page.getByRole('log', { name: 'Conversation' });
  const items = log_.locator('li.msg');
  const status = page.getByRole('status').first();
  const box = page.getByLabel('Message');

  /** Sends a message with the keyboard and waits for its reply to settle. */
  async function chat(text, expectedItems) {
    await box.fill(text);
    await box.press('Enter');
    // Our message is shown at once, before any reply.
    await log_.locator('li.human', { hasText: text }).last().waitFor();
    const reply = items.nth(expectedItems - 1);
    await reply.locator('xpath=self::li[@data-status="done" or @data-status="stopped"]').waitFor();
    return (await reply.innerText()).trim();
  }

  async function historyIds(token) {
    return page.evaluate(async (t) => {
      const r = await fetch(`/refresh_token?token=${encodeURIComponent(t)}`);
      const body = await r.json();
      return body.messages.map((m) => m.id);
    }, token);
  }

  async function shownIds() {
    return items.evaluateAll((lis) => lis.map((li) => li.dataset.id || ''));
  }

  // 1. Start screen: an empty name shows the server's error.
  log('open', BASE_URL);
  const answer = await page.goto(BASE_URL);
  const csp = answer?.headers()['content-security-policy'] ?? '';
  check(/script-src 'self'(;|$)/.test(csp) && /img-src 'self' data:(;|$)/.test(csp), `the page has its CSP: ${csp}`);
  // The counter works: a request made from here is counted (and then forgotten).
  await fetch(`${images.url}/probe.png`);
  check(images.seen.length === 1, 'the image server counts requests');
  images.seen.length = 0;
  // The watcher works, and the policy holds: a remote image added by hand is refused and
  // reported (then forgotten).
  await page.evaluate((src) => document.body.append(Object.assign(new Image(), { src })), `${images.url}/probe.png`);
  const seenViolation = Date.now() + TIMEOUT;
  while (violations.length === 0 && Date.now() < seenViolation) await new Promise((r) => setTimeout(r, 50));
  check(violations.length === 1 && /img-src/.test(violations[0]), `the CSP refused a remote image: ${violations}`);
  check(images.seen.length === 0, 'the refused image was not fetched');
  violations.length = 0;
  policyMessages.length = 0;
  await page.reload();
  await page.getByRole('button', { name: 'Start chatting' }).click();
  await page.getByRole('alert').filter({ hasText: 'Enter a valid name' }).waitFor();
  log('empty name refused with the server error');

  // 2. A name starts the chat; the socket connects.
  await page.getByLabel('Your name').fill('Ann');
  await page.getByLabel('Your name').press('Enter');
  await page.getByText('Chatting as').waitFor();
  check((await page.locator('.who bdi').innerText()) === 'Ann', 'the name is shown in <bdi>');
  await status.filter({ hasText: 'Connected' }).waitFor();
  const token = await page.evaluate(() => localStorage.getItem('chat.token'));
  check(token, 'the token is kept in localStorage');
  log('chat started, token kept');

  // 3. Send a message: it appears at once, the typing indicator shows, the reply streams in
  //    token by token and settles on the final message.
  await box.fill('Tell me a short story about a cat.');
  await box.press('Enter');
  await log_.locator('li.human', { hasText: 'short story about a cat' }).waitFor();
  await page.getByRole('button', { name: 'Stop the reply' }).waitFor();
  await items.nth(1).locator('xpath=self::li[@data-status="done"]').waitFor();
  const partials = await page.evaluate(() => window.__partials.size);
  check(partials >= 2, `the reply grew token by token (saw ${partials} partial texts)`);
  const firstReply = (await items.nth(1).innerText()).trim();
  check(firstReply.length > 0, 'the reply has text');
  await page.getByRole('button', { name: 'Stop the reply' }).waitFor({ state: 'detached' });
  check((await page.locator('.typing').innerText()).trim() === '', 'no typing indicator after the reply');
  check((await items.nth(0).locator('time').count()) === 1, 'messages carry a timestamp');
  log(`reply streamed (${partials} partial texts) and settled: ${JSON.stringify(firstReply.slice(0, 60))}`);
  if (SCREENSHOT) {
    await page.screenshot({ path: SCREENSHOT });
    log('screenshot saved to', SCREENSHOT);
  }

  // 4. Reload: the session and its history come back.
  const before = await shownIds();
  await page.reload();
  await status.filter({ hasText: 'Connected' }).waitFor();
  await items.nth(1).waitFor();
  check(JSON.stringify(await shownIds()) === JSON.stringify(before), 'history after reload');
  await page.getByText('Chatting as Ann').waitFor();
  log('history back after reload');

  // 5. Kill the server while a reply is being generated, then start it again: the page
  //    reconnects by itself and nothing is lost (the worker finished the reply meanwhile).
  await box.fill('And what did the cat do next?');
  await box.press('Enter');
  await log_.locator('li.human[data-status="sent"]', { hasText: 'what did the cat do next' }).waitFor();
  await items.nth(3).waitFor(); // the reply's first tokens (it may even be done already)
  const replyState = await items.evaluateAll((lis) => lis[3]?.dataset.status ?? 'not started');
  await ask('kill-server');
  log(`server killed (the reply was ${replyState})`);
  await status.filter({ hasText: /Reconnecting/ }).waitFor();
  check(await page.getByRole('button', { name: 'Send' }).isDisabled(), 'Send is disabled while offline');
  await ask('start-server');
  log('server started again');
  await status.filter({ hasText: 'Connected' }).waitFor();
  await items.nth(3).locator('xpath=self::li[@data-status="done" or @data-status="stopped"]').waitFor();
  const ids = await shownIds();
  check(ids.length === 4 && ids.every(Boolean), `four stored messages shown: ${ids}`);
  check(JSON.stringify(ids) === JSON.stringify(await historyIds(token)), 'the page matches the stored history');
  log('reconnected; the reply finished while the server was down is shown');

  // The new socket works: one more exchange.
  const third = await chat('Thanks!', 6);
  check(third.length > 0, 'a reply after the restart');
  log('chat works after the restart');

  // 5b. A reply with markdown images (one to the counting server): after a reload it is shown,
  //     the images as links, and the browser fetched nothing.
  const imageUrl = `${images.url}/chart.png?reader=ann`;
  await ask('add-reply', {
    token,
    question: 'Show me the chart.',
    reply: `Here it is: ![the chart](${imageUrl}) and ![ref][pic]\n\n[pic]: ${images.url}/ref.png`,
  });
  await page.reload();
  await status.filter({ hasText: 'Connected' }).waitFor();
  const imageReply = items.nth(7);
  await imageReply.getByText('Here it is').waitFor();
  await page.waitForTimeout(500); // anything the page would fetch has had time to go out
  check(images.seen.length === 0, `the page fetched no image: ${images.seen.join(', ')}`);
  check((await log_.locator('img').count()) === 0, 'no <img> in the conversation');
  check(violations.length === 0, `no CSP violation from the reply: ${violations.join('; ')}`);
  const imageLinks = imageReply.locator('a.image-link');
  check((await imageLinks.count()) === 2, 'both images are shown as links');
  check((await imageLinks.first().getAttribute('href')) === imageUrl, 'the link goes to the image');
  log('a reply with images: shown as links, nothing fetched');

  // 6. The session expires while the page is open: the next message brings the start
  //    screen back with a clear message, and the token is forgotten.
  await ask('expire-session', { token });
  await box.fill('Are you still there?');
  await box.press('Enter');
  await page.getByRole('alert').filter({ hasText: 'Your session expired' }).waitFor();
  await page.getByLabel('Your name').waitFor();
  check((await page.evaluate(() => localStorage.getItem('chat.token'))) === null, 'token forgotten');
  log('expired session (live socket) returns to the start screen');

  // 7. An expired token found at page load also returns to the start screen.
  await page.getByLabel('Your name').fill('Bob');
  await page.getByLabel('Your name').press('Enter');
  await status.filter({ hasText: 'Connected' }).waitFor();
  const token2 = await page.evaluate(() => localStorage.getItem('chat.token'));
  await ask('expire-session', { token: token2 });
  await page.reload();
  await page.getByRole('alert').filter({ hasText: 'Your session expired' }).waitFor();
  log('expired session (reload) returns to the start screen');

  check(pageErrors.length === 0, `no errors in the page: ${pageErrors.join('; ')}`);
  check(violations.length === 0, `no CSP violations: ${violations.join('; ')}`);
  check(policyMessages.length === 0, `no CSP messages in the console: ${policyMessages.join('; ')}`);
  check(images.seen.length === 0, `no image fetched: ${images.seen.join(', ')}`);
  log('no CSP violation and no image request during the whole run');
  process.stdout.write('E2E {"done": true}\n');
} finally {
  images.close();
  await context.close();
  rmSync(userDir, { recursive: true, force: true });
}
process.exit(0);
