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
// The conversation sidebar: a second chat, switching between the two, renaming (here, and from
// "another client" through the socket's `conversation` event), deleting with the
// confirmation, reloading (the list survives), and the drawer at phone width.
//
// Environment: BASE_URL (the server), CHROMIUM (default /usr/bin/chromium),
// SCREENSHOT (where to save the page), SIDEBAR_SCREENSHOT (the sidebar at desktop width),
// E2E_TIMEOUT_MS (per wait, default 90000).

import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const BASE_URL = process.env.BASE_URL;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SCREENSHOT = process.env.SCREENSHOT || '';
const SIDEBAR_SCREENSHOT = process.env.SIDEBAR_SCREENSHOT || '';
const PHONE = { width: 390, height: 760 };
const DESKTOP = { width: 1100, height: 700 };
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
  viewport: PHONE,
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
  const status = page.locator('.status[role="status"]');
  const box = page.getByLabel('Message');

  const nav = page.getByRole('navigation', { name: 'Conversations' });
  const toggle = page.getByRole('button', { name: 'Conversations' });
  const rows = nav.locator('li.conv');
  const current = nav.locator('button.pick[aria-current="page"]');
  const heading = page.locator('.chat h1');

  /** At phone width the list is a drawer: opened by the header's button. */
  async function openDrawer() {
    check(!(await nav.isVisible()), 'the drawer is closed');
    await toggle.click();
    await nav.waitFor({ state: 'visible' });
    check((await toggle.getAttribute('aria-expanded')) === 'true', 'the toggle says the drawer is open');
  }

  async function stored() {
    return page.evaluate(() => JSON.parse(localStorage.getItem('chat.conversations') || '[]'));
  }

  /** The conversation as the server has it, with its own token as the bearer. */
  async function serverDoc(id) {
    return page.evaluate(async (t) => {
      const r = await fetch(`/v1/conversations/${t}`, { headers: { Authorization: `Bearer ${t}` } });
      return { status: r.status, body: r.status === 200 ? await r.json() : null };
    }, id);
  }

  /** Waits until `fn` returns true (polling the page's state). */
  async function until(fn, what) {
    const end = Date.now() + TIMEOUT;
    while (!(await fn())) {
      if (Date.now() > end) throw new Error(`timed out: ${what}`);
      await page.waitForTimeout(100);
    }
  }

  async function sidebarSteps(first) {
    const firstDoc = await serverDoc(first);
    check(firstDoc.status === 200, `the first chat is a conversation: ${firstDoc.status}`);
    const firstTitle = firstDoc.body.title;
    check(firstTitle === 'Tell me a short story about a cat.', `titled by its first message: ${firstTitle}`);

    // The drawer: closed at phone width, opened by its button, closed by Escape.
    await openDrawer();
    check((await rows.count()) === 1, 'one conversation listed');
    check((await current.innerText()).trim() === firstTitle, 'the current one is marked');
    await page.keyboard.press('Escape');
    await nav.waitFor({ state: 'hidden' });
    check(await toggle.evaluate((el) => el === document.activeElement), 'the focus is back on the toggle');

    // A second chat: "New chat" in the drawer; the drawer closes on it.
    await openDrawer();
    await nav.getByRole('button', { name: 'New chat' }).click();
    await nav.waitFor({ state: 'hidden' });
    await page.getByText('Say hello to start the conversation.').waitFor();
    await status.filter({ hasText: 'Connected' }).waitFor();
    const second = await page.evaluate(() => localStorage.getItem('chat.token'));
    check(second && second !== first, 'a new conversation token');
    const reply = await chat('What is a dog?', 2);
    check(reply.length > 0, 'the second chat answers');
    await heading.filter({ hasText: 'What is a dog?' }).waitFor();
    check(JSON.stringify((await stored()).map((i) => i.id).sort()) === JSON.stringify([first, second].sort()), 'both tokens kept');
    log('a second chat, titled by its first message');

    // Switch back to the first: its history comes back on its own socket; the drawer closes.
    await openDrawer();
    check((await rows.count()) === 2, 'two conversations listed');
    check((await current.innerText()).trim() === 'What is a dog?', 'the new one is current');
    await nav.getByRole('button', { name: firstTitle, exact: true }).click();
    await nav.waitFor({ state: 'hidden' });
    await status.filter({ hasText: 'Connected' }).waitFor();
    await until(async () => JSON.stringify(await shownIds()) === JSON.stringify(await historyIds(first)), 'the first chat shown');
    check((await page.evaluate(() => localStorage.getItem('chat.token'))) === first, 'the first is current again');
    log('switched back to the first chat: its history is shown');

    // Rename the second from the list, with the keyboard.
    await openDrawer();
    await nav.getByRole('button', { name: 'Rename What is a dog?' }).click();
    await page.keyboard.press('Control+A');
    await page.keyboard.type('Dog questions');
    await page.keyboard.press('Enter');
    await nav.getByRole('button', { name: 'Dog questions', exact: true }).waitFor();
    check((await serverDoc(second)).body.title === 'Dog questions', 'the server has the new title');

    // Another client renames the first (shown): the socket's `conversation` event updates the
    // header and the list.
    const patched = await page.evaluate(async (t) => {
      const r = await fetch(`/v1/conversations/${t}`, {
        method: 'PATCH',
        headers: { Authorization: `Bearer ${t}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ title: 'Cat stories' }),
      });
      return r.status;
    }, first);
    check(patched === 200, `PATCH from another client: ${patched}`);
    await heading.filter({ hasText: 'Cat stories' }).waitFor();
    await nav.getByRole('button', { name: 'Cat stories', exact: true }).waitFor();
    check((await current.innerText()).trim() === 'Cat stories', 'the list shows the title from the event');
    log('renamed here and from another client');

    if (SIDEBAR_SCREENSHOT) {
      await page.keyboard.press('Escape');
      await page.setViewportSize(DESKTOP);
      await nav.waitFor({ state: 'visible' });
      check(!(await toggle.isVisible()), 'no drawer button at desktop width');
      await page.screenshot({ path: SIDEBAR_SCREENSHOT });
      await page.setViewportSize(PHONE);
      await nav.waitFor({ state: 'hidden' });
      log('sidebar screenshot saved to', SIDEBAR_SCREENSHOT);
    } else {
      await page.keyboard.press('Escape');
    }

    // Reload: both conversations and their titles are listed again, the first still current.
    await page.reload();
    await status.filter({ hasText: 'Connected' }).waitFor();
    await openDrawer();
    await nav.getByRole('button', { name: 'Dog questions', exact: true }).waitFor();
    check((await rows.count()) === 2, 'both conversations after a reload');
    check((await current.innerText()).trim() === 'Cat stories', 'the current one after a reload');

    // Delete the second (choose it, then delete the current one): a confirmation first; the
    // chat switches to the other one.
    await nav.getByRole('button', { name: 'Dog questions', exact: true }).click();
    await status.filter({ hasText: 'Connected' }).waitFor();
    await heading.filter({ hasText: 'Dog questions' }).waitFor();
    await openDrawer();
    await nav.getByRole('button', { name: 'Delete Dog questions' }).click();
    const confirm = nav.getByRole('group', { name: 'Delete Dog questions?' });
    await confirm.getByRole('button', { name: 'Keep' }).click();
    check((await rows.count()) === 2, '"Keep" keeps it');
    check((await serverDoc(second)).status === 200, 'still on the server');
    await nav.getByRole('button', { name: 'Delete Dog questions' }).click();
    await confirm.getByRole('button', { name: 'Delete' }).click();
    await nav.getByRole('button', { name: 'Dog questions', exact: true }).waitFor({ state: 'detached' });
    check((await serverDoc(second)).status === 404, 'deleted on the server');
    await heading.filter({ hasText: 'Cat stories' }).waitFor();
    await status.filter({ hasText: 'Connected' }).waitFor();
    await until(async () => JSON.stringify(await shownIds()) === JSON.stringify(await historyIds(first)), 'the first chat shown after the delete');
    check((await page.evaluate(() => localStorage.getItem('chat.token'))) === first, 'the current chat is the other one');
    check(JSON.stringify((await stored()).map((i) => i.id)) === JSON.stringify([first]), 'only the first token kept');
    log('deleted the current chat after a confirmation; switched to the other');

    // Reload again: the list survives with the one conversation left.
    if (await nav.isVisible()) await page.keyboard.press('Escape');
    await page.reload();
    await status.filter({ hasText: 'Connected' }).waitFor();
    await openDrawer();
    await nav.getByRole('button', { name: 'Cat stories', exact: true }).waitFor();
    check((await rows.count()) === 1, 'one conversation after the reload');
    await nav.getByRole('button', { name: 'Cat stories', exact: true }).click();
    await nav.waitFor({ state: 'hidden' });
    log('the list survives a reload; the drawer closes on choosing');
  }

  async function accountSteps() {
    await openDrawer();
    await nav.getByText('Account (optional)').click();
    await nav.getByLabel('Account name').fill('Carol');
    await nav.getByLabel('Account name').press('Enter');
    const apiKey = (await nav.getByTestId('api-key').innerText()).trim();
    check(/^chat_[A-Za-z0-9_-]{43}$/.test(apiKey), `the key is shown: ${apiKey.slice(0, 8)}…`);
    check((await page.evaluate(() => localStorage.getItem('chat.apiKey'))) === apiKey, 'the key is kept');
    await nav.getByRole('button', { name: 'Done' }).click();
    check((await nav.getByTestId('api-key').count()) === 0, 'the key is shown once');
    await nav.getByText('Signed in as Carol').waitFor();
    check((await rows.count()) === 0, 'a new account has no conversations');
    await page.keyboard.press('Escape');

    // The start screen's chat and a "New chat" both belong to the account.
    await page.getByLabel('Your name').fill('Carol');
    await page.getByLabel('Your name').press('Enter');
    await status.filter({ hasText: 'Connected' }).waitFor();
    await openDrawer();
    await nav.getByRole('button', { name: 'New chat' }).click();
    await status.filter({ hasText: 'Connected' }).waitFor();
    const listed = await page.evaluate(async (key) => {
      const r = await fetch('/v1/conversations', { headers: { Authorization: `Bearer ${key}` } });
      return (await r.json()).conversations.map((c) => c.conversation_id);
    }, apiKey);
    check(listed.length === 2, `the account has both conversations: ${listed}`);
    const shownToken = await page.evaluate(() => localStorage.getItem('chat.token'));
    check(listed[0] === shownToken, 'the newest first, and it is the one shown');

    // Reload: the list comes from the server.
    await page.reload();
    await status.filter({ hasText: 'Connected' }).waitFor();
    await openDrawer();
    await nav.getByText('Signed in as Carol').waitFor();
    await until(async () => (await rows.count()) === 2, 'the account list after a reload');
    check((await page.evaluate(() => localStorage.getItem('chat.conversations'))) === '[]', 'account chats are not kept as anonymous tokens');

    // Sign out: this browser's own list (empty by now) and the start screen.
    await nav.getByRole('button', { name: 'Sign out' }).click();
    await page.getByLabel('Your name').waitFor();
    check((await page.evaluate(() => localStorage.getItem('chat.apiKey'))) === null, 'the key is forgotten');
    check((await rows.count()) === 0, 'no anonymous conversation left');
    log('account: key shown once, its chats listed from the server after a reload, sign out');
  }

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

  // 5c. The sidebar: a second chat, switching, renaming, deleting, reloading, the drawer.
  await sidebarSteps(token);

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

  // 8. With an account: register (the key is shown once), chats belong to it, the list is the
  //    server's and survives a reload; signing out goes back to this browser's (empty) list.
  await accountSteps();

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
