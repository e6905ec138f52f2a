// The basic page (client/basic, served when there is no build) in headless Chromium under the
// server's Content-Security-Policy: it starts a chat with a right-to-left name (shown in
// <bdi>), sends a message and shows the reply, with no CSP violation and no page error.
//
// Run by tests/e2e/test_browser.py (test_basic_page_under_the_csp). Environment: BASE_URL,
// CHROMIUM (default /usr/bin/chromium), E2E_TIMEOUT_MS (per wait, default 90000).
// Exit code 0 means every step passed; progress and failures go to stderr.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const BASE_URL = process.env.BASE_URL;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const TIMEOUT = Number(process.env.E2E_TIMEOUT_MS || 90_000);
if (!BASE_URL) throw new Error('BASE_URL is not set');

const log = (...args) => console.error('[basic-e2e]', ...args);
function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

function watchPolicy() {
  document.addEventListener('securitypolicyviolation', (e) => {
    window.__cspViolation(`${e.violatedDirective} blocked ${e.blockedURI || 'inline'}`);
  });
}

const userDir = mkdtempSync(join(tmpdir(), 'chat-basic-e2e-'));
const context = await chromium.launchPersistentContext(userDir, {
  executablePath: CHROMIUM,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  context.setDefaultTimeout(TIMEOUT);
  const violations = [];
  await context.exposeFunction('__cspViolation', (text) => violations.push(text));
  await context.addInitScript(watchPolicy);
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (err) => problems.push(String(err)));
  page.on('console', (msg) => {
    if (/content.security.policy/i.test(msg.text())) problems.push(msg.text());
  });

  const answer = await page.goto(BASE_URL);
  check(/script-src 'self'/.test(answer?.headers()['content-security-policy'] ?? ''), 'the page has its CSP');
  const name = 'שרה 42';
  await page.getByLabel('Your name').fill(name);
  await page.getByLabel('Your name').press('Enter');
  await page.locator('#status', { hasText: 'Connected' }).waitFor();
  check((await page.locator('header bdi').innerText()) === name, 'the name is shown in <bdi>');
  log('chat started under the CSP');

  await page.getByLabel('Message').fill('Say hello.');
  await page.getByLabel('Message').press('Enter');
  const reply = page.locator('#log li.bot[data-settled="1"]').first();
  await reply.waitFor();
  check((await reply.innerText()).trim().length > 0, 'the reply has text');
  log('a reply arrived');

  check(violations.length === 0, `no CSP violations: ${violations.join('; ')}`);
  check(problems.length === 0, `no page errors: ${problems.join('; ')}`);
  log('no CSP violation, no page error');
} finally {
  await context.close();
  rmSync(userDir, { recursive: true, force: true });
}
process.exit(0);
