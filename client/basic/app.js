// The basic page's script: a file, not an inline <script>, so it runs under the server's
// Content-Security-Policy (script-src 'self').
'use strict';

const TOKEN_KEY = 'chat.token';
const MIN_BACKOFF = 500;
const MAX_BACKOFF = 10000;
// Errors without reply_to that mean "the message you just sent was not stored".
const SEND_ERRORS = new Set(['bad_request', 'too_large', 'rate_limited']);

const $ = (id) => document.getElementById(id);
const ui = {
  start: $('start'), nameForm: $('nameForm'), nameInput: $('nameInput'), nameBtn: $('nameBtn'),
  startMsg: $('startMsg'), chat: $('chat'), userName: $('userName'), newChat: $('newChat'),
  status: $('status'), banner: $('banner'), bannerText: $('bannerText'), bannerClose: $('bannerClose'),
  log: $('log'), typing: $('typing'), composer: $('composer'), input: $('input'),
  send: $('sendBtn'), stop: $('stopBtn'),
};

const S = {
  token: null, ws: null, timer: null, backoff: MIN_BACKOFF, resuming: false,
  stick: true,            // keep the conversation scrolled to the bottom
  byId: new Map(),        // message id -> bubble
  byReply: new Map(),     // human message id -> bot bubble answering it
  outbox: [],             // our human bubbles sent but not yet acknowledged
  awaiting: new Set(),    // ids of our human messages whose reply is pending
};

// --- Storage and HTTP ---------------------------------------------------------------------

function saveToken(token) {
  try { token ? localStorage.setItem(TOKEN_KEY, token) : localStorage.removeItem(TOKEN_KEY); }
  catch (e) { /* storage unavailable: the chat just won't survive a reload */ }
}

function loadToken() { try { return localStorage.getItem(TOKEN_KEY); } catch (e) { return null; } }

async function api(method, path) {
  const res = await fetch(path, { method, headers: { Accept: 'application/json' } });
  let body = null;
  try { body = await res.json(); } catch (e) { /* empty or non-JSON body */ }
  return { ok: res.ok, status: res.status, body };
}

function detailText(body) {
  const d = body && body.detail;
  if (d == null) return '';
  if (typeof d === 'string') return d;
  if (Array.isArray(d)) return d.map((x) => (x && x.msg) || JSON.stringify(x)).join('; ');
  return d.msg || JSON.stringify(d);
}

// --- Small UI helpers ---------------------------------------------------------------------

function setStatus(text) { ui.status.textContent = text; }
function showBanner(text) { ui.bannerText.textContent = text; ui.banner.hidden = false; }
function hideBanner() { ui.banner.hidden = true; }
function isOpen() { return !!S.ws && S.ws.readyState === WebSocket.OPEN; }

// Timestamps are ISO 8601 strings (UTC); a Date.now() number is accepted for local bubbles.
function toDate(ts) {
  const d = ts == null ? null : new Date(ts);
  return d && !Number.isNaN(d.getTime()) ? d : null;
}

function formatTime(d) {
  const today = d.toDateString() === new Date().toDateString();
  return today
    ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
    : d.toLocaleString([], { dateStyle: 'short', timeStyle: 'short' });
}

function scrollDown(force) { if (force || S.stick) ui.log.scrollTop = ui.log.scrollHeight; }

function updateControls() {
  const pending = S.outbox.length > 0 || S.awaiting.size > 0;
  const noReplyYet = S.outbox.length > 0 || [...S.awaiting].some((id) => !S.byReply.has(id));
  ui.send.disabled = !isOpen();
  ui.stop.hidden = !pending;
  ui.typing.hidden = !noReplyYet;
}

// --- Bubbles ------------------------------------------------------------------------------

// Static markup only: message text is always set with textContent.
const BUBBLE = '<div class="text"></div><div class="meta"><time></time><span class="note"></span></div>';

function makeBubble(source) {
  const li = document.createElement('li');
  li.className = 'msg ' + source;
  li.innerHTML = BUBBLE;
  return li;
}

function appendBubble(source) { return ui.log.appendChild(makeBubble(source)); }

const textOf = (li) => li.querySelector('.text');
function setText(li, s) { textOf(li).textContent = s; }
function setNote(li, s) { li.querySelector('.note').textContent = s; }

function setTime(li, ts) {
  const t = li.querySelector('time');
  const d = toDate(ts);
  t.textContent = d ? formatTime(d) : '';
  t.dateTime = d ? d.toISOString() : '';
  t.title = d ? d.toLocaleString() : '';
}

function register(li, m) {
  if (m.id != null) { li.dataset.id = String(m.id); S.byId.set(String(m.id), li); }
  if (m.reply_to != null) S.byReply.set(String(m.reply_to), li);
}

function settle(li) {
  li.classList.remove('streaming', 'pending', 'failed');
  li.dataset.settled = '1';
}

function showError(li, detail, code) {
  settle(li);
  li.classList.add('error');
  setText(li, detail || code || 'The reply failed.');
  setNote(li, code ? 'Reply failed (' + code + ')' : 'Reply failed');
}

// Render a stored message (from history or a socket event) into its bubble.
function applyMessage(li, m) {
  setTime(li, m.timestamp);
  if (m.source === 'human') { settle(li); setText(li, m.msg); setNote(li, ''); return; }
  if (m.error) return showError(li, m.error.detail, m.error.code);
  settle(li);
  setText(li, m.msg);
  li.classList.toggle('stopped', !!m.stopped);
  setNote(li, m.stopped ? 'stopped' : '');
}

function markFailed(li, reason) {
  li.classList.replace('pending', 'failed');
  setNote(li, 'Not sent: ' + reason);
}

// Our unacknowledged bubble for an ack (matched by the client_id we sent), or else our oldest
// one with the same text (history entries carry no client_id), taken out of the outbox.
function claimOutbox(text, clientId) {
  let i = clientId ? S.outbox.findIndex((li) => li.dataset.clientId === clientId) : -1;
  if (i < 0) i = S.outbox.findIndex((li) => li.dataset.text === String(text).trim());
  return i < 0 ? null : S.outbox.splice(i, 1)[0];
}

// The bot bubble for an event: by id, else a not-yet-identified bubble for the same question.
function findBot(m) {
  const known = m.id != null && S.byId.get(String(m.id));
  if (known) return known;
  const r = m.reply_to != null && S.byReply.get(String(m.reply_to));
  return r && !r.dataset.id ? r : null;
}

function findBubble(m) {
  return m.source === 'human' ? (S.byId.get(String(m.id)) || claimOutbox(m.msg)) : findBot(m);
}

// Merge the stored history in, de-duplicating by id and keeping the server's order.
function mergeHistory(messages) {
  let prev = null;
  for (const m of messages) {
    const li = findBubble(m) || makeBubble(m.source);
    if (prev ? li.previousElementSibling !== prev : ui.log.firstElementChild !== li) {
      if (prev) prev.after(li); else ui.log.prepend(li);
    }
    register(li, m);
    applyMessage(li, m);
    if (m.source === 'bot' && m.reply_to != null) S.awaiting.delete(String(m.reply_to));
    prev = li;
  }
  // Every stored question gets exactly one stored answer: a trailing one is still being answered.
  const last = messages[messages.length - 1];
  if (last && last.source === 'human') S.awaiting.add(String(last.id));
  updateControls();
  scrollDown(true);
}

// --- Socket events ------------------------------------------------------------------------

function onAck(f) {
  if (S.byId.has(String(f.id))) return;
  const mine = claimOutbox(f.msg, f.client_id);
  const li = mine || appendBubble('human');
  register(li, f);
  applyMessage(li, { ...f, source: 'human' });
  if (mine) { S.awaiting.add(String(f.id)); setNote(li, 'Delivered'); }
  updateControls();
  scrollDown(!!mine);
}

function onToken(f) {
  let li = findBot(f);
  if (!li) { li = appendBubble('bot'); li.classList.add('streaming'); }
  if (li.dataset.settled) return;
  register(li, f);
  textOf(li).append(f.delta || '');
  updateControls();
  scrollDown();
}

function onFinal(f) {
  const li = findBot(f) || appendBubble('bot');
  register(li, f);
  applyMessage(li, { ...f, source: 'bot' });
  if (f.reply_to != null) S.awaiting.delete(String(f.reply_to));
  updateControls();
  scrollDown();
}

function onError(f) {
  const text = f.detail || f.code || 'Something went wrong.';
  if (f.code === 'session_expired') return expire();
  if (f.reply_to != null) {
    const key = String(f.reply_to);
    const li = S.byReply.get(key) || appendBubble('bot');
    S.byReply.set(key, li);
    showError(li, text, f.code);
    S.awaiting.delete(key);
    scrollDown();
  } else {
    if (SEND_ERRORS.has(f.code) && S.outbox.length) markFailed(S.outbox.shift(), text);
    showBanner(text);
  }
  updateControls();
}

const HANDLERS = { ack: onAck, token: onToken, message: onFinal, error: onError };

function handleFrame(data) {
  let frame;
  try { frame = JSON.parse(data); } catch (e) { console.error('Unreadable frame from server:', data); return; }
  const handler = frame && HANDLERS[frame.type];
  if (handler) handler(frame);
}

// --- Connection ---------------------------------------------------------------------------

function openSocket() {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${proto}//${location.host}/chat?token=${encodeURIComponent(S.token)}`);
  S.ws = ws;
  setStatus('Connecting…');
  ws.onopen = () => {
    if (S.ws !== ws) return;
    S.backoff = MIN_BACKOFF;
    setStatus('Connected');
    updateControls();
  };
  ws.onmessage = (ev) => { if (S.ws === ws) handleFrame(ev.data); };
  ws.onclose = () => {
    if (S.ws !== ws) return;
    S.ws = null;
    updateControls();
    scheduleReconnect();
  };
}

function scheduleReconnect() {
  if (!S.token || S.timer) return;
  const delay = S.backoff;
  S.backoff = Math.min(S.backoff * 2, MAX_BACKOFF);
  setStatus(`Disconnected. Reconnecting in ${(delay / 1000).toFixed(1)} s…`);
  S.timer = setTimeout(() => { S.timer = null; resume(); }, delay);
}

// Reload the history (is the session still there?), then open the socket.
async function resume() {
  const token = S.token;
  if (!token || S.ws || S.resuming) return;
  S.resuming = true;
  setStatus('Loading conversation…');
  let r = null;
  try { r = await api('GET', '/refresh_token?token=' + encodeURIComponent(token)); }
  catch (e) { /* network down: retry below */ }
  finally { S.resuming = false; }
  if (token !== S.token) return;  // the user started a new chat meanwhile
  if (r && r.status === 400) return expire();
  if (!r || !r.ok) return scheduleReconnect();
  ui.userName.textContent = r.body.name;
  mergeHistory(r.body.messages || []);
  S.outbox.splice(0).forEach((li) => markFailed(li, 'connection lost, please resend'));
  updateControls();
  openSocket();
}

// --- Session lifecycle --------------------------------------------------------------------

function resetSession() {
  const ws = S.ws;
  clearTimeout(S.timer);
  Object.assign(S, { token: null, ws: null, timer: null, backoff: MIN_BACKOFF, outbox: [] });
  if (ws) ws.close();
  saveToken(null);
  S.byId.clear();
  S.byReply.clear();
  S.awaiting.clear();
  ui.log.replaceChildren();
  hideBanner();
  updateControls();
}

function showStart(message) {
  ui.chat.hidden = true;
  ui.start.hidden = false;
  ui.startMsg.textContent = message || '';
  ui.nameInput.focus();
}

function showChat(name) {
  ui.userName.textContent = name || '';
  ui.start.hidden = true;
  ui.chat.hidden = false;
  ui.input.focus();
}

function expire() {
  resetSession();
  showStart('Your session expired. Start a new chat.');
}

async function onStart(e) {
  e.preventDefault();
  ui.nameBtn.disabled = true;
  ui.startMsg.textContent = '';
  try {
    const r = await api('POST', '/token?name=' + encodeURIComponent(ui.nameInput.value.trim()));
    if (!r.ok) {
      const msg = r.status === 400 && r.body && r.body.detail && r.body.detail.msg;
      ui.startMsg.textContent = msg || `Error ${r.status}: ${detailText(r.body) || 'request failed'}`;
      return;
    }
    resetSession();
    S.token = r.body.token;
    saveToken(S.token);
    showChat(r.body.name);
    mergeHistory(r.body.messages || []);
    openSocket();
  } catch (err) {
    ui.startMsg.textContent = 'Could not reach the server. Check your connection and try again.';
  } finally {
    ui.nameBtn.disabled = false;
  }
}

function sendMessage() {
  const text = ui.input.value.trim();
  if (!text) return;
  if (!isOpen()) { showBanner('Not connected: your message was not sent.'); return; }
  const clientId = 'c' + Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  S.ws.send(JSON.stringify({ type: 'message', msg: text, client_id: clientId }));
  const li = appendBubble('human');
  li.classList.add('pending');
  li.dataset.text = text;
  li.dataset.clientId = clientId;
  setText(li, text);
  setTime(li, Date.now());
  setNote(li, 'Sending…');
  S.outbox.push(li);
  ui.input.value = '';
  updateControls();
  scrollDown(true);
}

function stopReply() {
  if (isOpen()) S.ws.send(JSON.stringify({ type: 'stop' }));
}

function init() {
  ui.nameForm.addEventListener('submit', onStart);
  ui.composer.addEventListener('submit', (e) => { e.preventDefault(); sendMessage(); });
  ui.input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); sendMessage(); }
  });
  ui.stop.addEventListener('click', stopReply);
  ui.newChat.addEventListener('click', () => { resetSession(); showStart(''); });
  ui.bannerClose.addEventListener('click', hideBanner);
  ui.log.addEventListener('scroll', () => {
    S.stick = ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 80;
  });
  window.addEventListener('online', () => {
    if (!S.token || S.ws) return;
    clearTimeout(S.timer);
    S.timer = null;
    S.backoff = MIN_BACKOFF;
    resume();
  });

  S.token = loadToken();
  if (S.token) { showChat(''); resume(); } else { showStart(''); }
}

init();
