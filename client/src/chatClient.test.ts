import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { EXPIRED_TEXT } from './api';
import { type ChatClient, DELETED_TEXT, MIN_BACKOFF_MS, TOKEN_KEY, TOO_MANY_BACKOFF_MS } from './chatClient';
import { bot, FakeServer, flush, human, session, TOKEN } from './test/fakes';

let server: FakeServer;
let client: ChatClient;

beforeEach(() => {
  vi.useFakeTimers();
  server = new FakeServer();
  client = server.makeClient();
});

afterEach(() => {
  client.dispose();
  vi.useRealTimers();
});

/** Starts a session as Ann and opens its socket; the history load answers `messages`. */
async function startChat(messages = [human('h0', 'earlier'), bot('b0', 'h0', 'reply')]) {
  server.answer('/token', { status: 200, body: session() });
  server.answer('/refresh_token', { status: 200, body: session(messages) });
  await client.start('Ann');
  server.socket.open();
  await flush();
}

const view = () => client.getSnapshot();
const shown = () => view().chat.entries.map((e) => `${e.source}:${e.text}:${e.status}`);

describe('starting', () => {
  it("shows the server's own error for an empty name and stays on the start screen", async () => {
    server.answer('/token', {
      status: 400,
      body: { detail: { loc: 'name', msg: 'Enter a valid name' } },
    });
    await client.start('');
    expect(server.calls).toEqual(['POST /token?name=']);
    expect(view()).toMatchObject({ screen: 'start', startMessage: 'Enter a valid name' });
    expect(server.sockets).toHaveLength(0);
  });

  it('says so in words when the server is down or rate limits', async () => {
    server.answer('/token', 'network', {
      status: 429,
      body: { detail: 'Too many requests: try again in 3 s' },
      headers: { 'Retry-After': '3' },
    });
    await client.start('Ann');
    expect(view().startMessage).toMatch(/could not reach the server/i);
    await client.start('Ann');
    expect(view().startMessage).toBe('Too many requests: try again in 3 s');
  });

  it('keeps the token, opens the socket, then loads the history', async () => {
    await startChat();
    expect(localStorage.getItem(TOKEN_KEY)).toBe(TOKEN);
    expect(server.socket.url).toBe(`ws://page.test/chat?token=${TOKEN}`);
    expect(server.calls).toEqual(['POST /token?name=Ann', `GET /refresh_token?token=${TOKEN}`]);
    expect(view()).toMatchObject({ screen: 'chat', name: 'Ann', connection: 'open' });
    expect(shown()).toEqual(['human:earlier:sent', 'bot:reply:done']);
  });

  it('resumes a kept session after a reload', async () => {
    localStorage.setItem(TOKEN_KEY, TOKEN);
    server.answer('/refresh_token', { status: 200, body: session([human('h0', 'before')]) });
    client.init();
    expect(view().screen).toBe('chat');
    server.socket.open();
    await flush();
    expect(view().name).toBe('Ann');
    expect(shown()).toEqual(['human:before:sent']);
  });
});

describe('conversation events', () => {
  it('sends a message with a client id and follows it to the final reply', async () => {
    await startChat([]);
    expect(client.send('  hello  ')).toBe(true);
    expect(server.socket.sentJson()).toEqual([{ type: 'message', msg: 'hello', client_id: 'c1' }]);
    expect(shown()).toEqual(['human:hello:sending']);
    const ws = server.socket;
    ws.emit({ type: 'ack', id: 'h1', msg: 'hello', timestamp: 'T', client_id: 'c1' });
    ws.emit({ type: 'token', id: 'b1', reply_to: 'h1', delta: 'Hi' });
    ws.emit({ type: 'token', id: 'b1', reply_to: 'h1', delta: ' there' });
    expect(shown()).toEqual(['human:hello:sent', 'bot:Hi there:streaming']);
    ws.emit({ type: 'message', id: 'b1', reply_to: 'h1', source: 'bot', msg: 'Hi there!', timestamp: 'T' });
    expect(shown()).toEqual(['human:hello:sent', 'bot:Hi there!:done']);
  });

  it('sends stop while a reply is generating', async () => {
    await startChat([]);
    client.stop();
    expect(server.socket.sentJson()).toEqual([{ type: 'stop' }]);
  });

  it('ignores unreadable frames and unknown event types', async () => {
    await startChat([]);
    const before = view().chat;
    server.socket.onmessage?.({ data: '{not json' });
    server.socket.emit({ type: 'brand_new_event', x: 1 });
    expect(view().chat).toBe(before);
  });

  it('marks a rate-limited message as not sent and says how long to wait; the socket stays', async () => {
    await startChat([]);
    client.send('too fast');
    server.socket.emit({
      type: 'error',
      code: 'rate_limited',
      detail: 'Too many messages: wait 3 s and send it again',
      retry_after: 3,
    });
    expect(shown()).toEqual(['human:too fast:failed']);
    expect(view().banner).toBe('Too many messages: wait 3 s and send it again');
    expect(view().connection).toBe('open');
    // "Send again" replaces the failed bubble with a new attempt.
    const key = view().chat.entries[0].key;
    expect(client.resend(key)).toBe(true);
    expect(shown()).toEqual(['human:too fast:sending']);
  });

  it('marks the message a send error names by client_id, not the oldest waiting one', async () => {
    await startChat([]);
    client.send('first');
    client.send('second');
    server.socket.emit({
      type: 'error',
      code: 'rate_limited',
      detail: 'Too many messages: wait 3 s and send it again',
      retry_after: 3,
      client_id: 'c2',
    });
    expect(shown()).toEqual(['human:first:sending', 'human:second:failed']);
    server.socket.emit({ type: 'ack', id: 'h1', msg: 'first', timestamp: 'T', client_id: 'c1' });
    expect(shown()).toEqual(['human:first:sent', 'human:second:failed']);
  });

  it('shows a queued notice on the message until its reply arrives', async () => {
    await startChat([]);
    client.send('anyone?');
    const ws = server.socket;
    ws.emit({ type: 'ack', id: 'h1', msg: 'anyone?', timestamp: 'T', client_id: 'c1' });
    ws.emit({ type: 'notice', code: 'queued', reply_to: 'h1', detail: 'No worker is running right now' });
    ws.emit({ type: 'notice', code: 'unknown_code', reply_to: 'h1', detail: 'ignored' });
    expect(view().chat.notices).toEqual({ h1: 'No worker is running right now' });
    ws.emit({ type: 'message', id: 'b1', reply_to: 'h1', source: 'bot', msg: 'yes', timestamp: 'T' });
    expect(view().chat.notices).toEqual({});
  });

  it('refuses to send while disconnected, in words', async () => {
    await startChat([]);
    server.always('/refresh_token', { status: 200, body: session() });
    server.socket.drop(1006);
    expect(client.send('hello?')).toBe(false);
    expect(view().banner).toMatch(/not connected/i);
  });
});

describe('reconnecting', () => {
  it('reconnects with growing backoff, socket first, then merges the history', async () => {
    await startChat([]);
    client.send('sent before the drop');
    server.socket.emit({ type: 'ack', id: 'h1', msg: 'sent before the drop', timestamp: 'T', client_id: 'c1' });
    client.send('never acknowledged');
    // The server dies: the socket closes, and it cannot be reached for a while.
    server.answer('/refresh_token', 'network', 'network');
    server.socket.drop(1006);
    expect(view().connection).toBe('waiting');
    expect(server.sockets).toHaveLength(1);

    await vi.advanceTimersByTimeAsync(MIN_BACKOFF_MS);
    expect(server.sockets).toHaveLength(2);
    server.socket.drop(1006); // handshake fails: server still down
    await flush();
    expect(view().status).toMatch(/unreachable.*Reconnecting in 1 s/);

    await vi.advanceTimersByTimeAsync(2 * MIN_BACKOFF_MS - 1);
    expect(server.sockets).toHaveLength(2);
    await vi.advanceTimersByTimeAsync(1);
    expect(server.sockets).toHaveLength(3);
    server.socket.drop(1006);
    await flush();
    expect(view().status).toMatch(/Reconnecting in 2 s/);

    // The server is back; the reply finished while we were away.
    server.answer('/refresh_token', {
      status: 200,
      body: session([human('h1', 'sent before the drop'), bot('b1', 'h1', 'answered meanwhile')]),
    });
    await vi.advanceTimersByTimeAsync(4 * MIN_BACKOFF_MS);
    expect(server.sockets).toHaveLength(4);
    const callsBeforeOpen = server.calls.length;
    server.socket.open();
    await flush();
    expect(server.calls.length).toBe(callsBeforeOpen + 1); // history loaded after the open
    expect(view().connection).toBe('open');
    expect(shown()).toEqual([
      'human:sent before the drop:sent',
      'bot:answered meanwhile:done',
      'human:never acknowledged:failed',
    ]);
  });

  it('reconnects at once and reloads after close 1012 (resync) and 1013 (too slow)', async () => {
    await startChat([]);
    for (const code of [1012, 1013]) {
      server.answer('/refresh_token', { status: 200, body: session([human('h1', 'x')]) });
      server.socket.drop(code);
      await vi.advanceTimersByTimeAsync(MIN_BACKOFF_MS);
      server.socket.open();
      await flush();
      expect(view().connection).toBe('open');
    }
    expect(server.sockets).toHaveLength(3);
    expect(shown()).toEqual(['human:x:sent']);
  });

  it('explains a 1009 close (frame too big) and reconnects', async () => {
    await startChat([]);
    server.socket.drop(1009);
    expect(view().banner).toMatch(/too big/);
    await vi.advanceTimersByTimeAsync(MIN_BACKOFF_MS);
    expect(server.sockets).toHaveLength(2);
  });

  it('retries at once when the user asks', async () => {
    await startChat([]);
    server.socket.drop(1006);
    client.retryNow();
    expect(server.sockets).toHaveLength(2);
  });

  it('waits long after too_many_connections and does not treat its 1008 as expiry', async () => {
    await startChat([]);
    const detail = 'This session already has 5 open connections; close one and reconnect';
    server.socket.emit({ type: 'error', code: 'too_many_connections', detail });
    server.socket.drop(1008, 'Too many open connections for this session');
    expect(view()).toMatchObject({ screen: 'chat', banner: detail, connection: 'waiting' });
    expect(localStorage.getItem(TOKEN_KEY)).toBe(TOKEN);
    await vi.advanceTimersByTimeAsync(TOO_MANY_BACKOFF_MS - 1);
    expect(server.sockets).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(server.sockets).toHaveLength(2);
  });
});

describe('an expired session', () => {
  it('goes back to the start screen when the handshake is refused and the session is gone', async () => {
    localStorage.setItem(TOKEN_KEY, TOKEN);
    server.answer('/refresh_token', {
      status: 400,
      body: { detail: 'Session expired or does not exist' },
    });
    client.init();
    server.socket.drop(1006); // the browser sees a refused upgrade (HTTP 403) as 1006
    await flush();
    expect(view()).toMatchObject({ screen: 'start', startMessage: EXPIRED_TEXT });
    expect(localStorage.getItem(TOKEN_KEY)).toBeNull();
  });

  it('goes back to the start screen on a session_expired error', async () => {
    await startChat([]);
    client.send('hello?');
    server.socket.emit({ type: 'error', code: 'session_expired', detail: 'Session expired' });
    server.socket.drop(1008);
    expect(view()).toMatchObject({ screen: 'start', startMessage: EXPIRED_TEXT });
    expect(view().chat.entries).toEqual([]);
    await vi.advanceTimersByTimeAsync(60_000);
    expect(server.sockets).toHaveLength(1); // no reconnect
  });

  it('"New chat" forgets the session', async () => {
    await startChat([]);
    client.newChat();
    expect(view()).toMatchObject({ screen: 'start', startMessage: '' });
    expect(server.sockets[0].closedByClient).toBe(1000);
    expect(localStorage.getItem(TOKEN_KEY)).toBeNull();
  });
});

describe('conversations', () => {
  it('switches: closes the old socket, opens one for the chosen token, loads its history', async () => {
    await startChat();
    const first = server.socket;
    const other = '0b5bd3fa-7e0b-4a5e-9d3c-2f1e0c9a8b7d';
    server.answer('/refresh_token', { status: 200, body: session([human('x1', 'other chat')], 'Ann', { token: other, title: 'Other' }) });
    client.open(other);
    expect(first.closedByClient).toBe(1000);
    expect(view()).toMatchObject({ screen: 'chat', token: other, chat: { entries: [] } });
    expect(localStorage.getItem(TOKEN_KEY)).toBe(other);
    expect(server.socket.url).toBe(`ws://page.test/chat?token=${other}`);
    server.socket.open();
    await flush();
    expect(shown()).toEqual(['human:other chat:sent']);
    expect(view().title).toBe('Other');
    // Events of the old socket no longer reach the page.
    first.emit({ type: 'ack', id: 'late', msg: 'late', timestamp: 'T' });
    expect(shown()).toEqual(['human:other chat:sent']);
  });

  it('takes a title event, empties the history on reset, and tells the list', async () => {
    const titled: string[] = [];
    client.setHooks({ titled: (token, title) => titled.push(`${token}:${title}`) });
    await startChat();
    server.socket.emit({ type: 'conversation', change: 'title', title: 'Cats' });
    expect(view().title).toBe('Cats');
    expect(titled).toEqual([`${TOKEN}:Cats`]);
    server.socket.emit({ type: 'conversation', change: 'reset' });
    expect(view().chat.entries).toEqual([]);
    expect(view().connection).toBe('open');
    server.socket.emit({ type: 'conversation', change: 'bogus' });
    expect(view().screen).toBe('chat');
  });

  it('on deleted: no reconnect and no probe, the list hears of it', async () => {
    const deleted: string[] = [];
    client.setHooks({ deleted: (token) => deleted.push(token) });
    await startChat();
    const calls = server.calls.length;
    server.socket.emit({ type: 'conversation', change: 'deleted' });
    server.socket.drop(1008, 'Conversation deleted');
    await flush();
    vi.advanceTimersByTime(60_000);
    expect(deleted).toEqual([TOKEN]);
    expect(view()).toMatchObject({ screen: 'start', startMessage: DELETED_TEXT, token: null });
    expect(server.sockets).toHaveLength(1);
    expect(server.calls).toHaveLength(calls);
    expect(localStorage.getItem(TOKEN_KEY)).toBeNull();
  });

  it('keeps tokens_used of a final reply, live and from the history', async () => {
    await startChat([human('h0', 'q'), bot('b0', 'h0', 'a', { tokens_used: 12 })]);
    expect(view().chat.entries[1].tokensUsed).toBe(12);
    server.socket.emit({ type: 'ack', id: 'h1', msg: 'q2', timestamp: 'T' });
    server.socket.emit({ type: 'message', id: 'b1', reply_to: 'h1', source: 'bot', msg: 'a2', timestamp: 'T', tokens_used: 30 });
    expect(view().chat.entries[3].tokensUsed).toBe(30);
  });
});

describe('slash commands', () => {
  it('a command is answered, never marked lost after a reconnect', async () => {
    await startChat([]);
    client.send('/help');
    expect(server.socket.sentJson()).toEqual([{ type: 'message', msg: '/help', client_id: 'c1' }]);
    server.socket.emit({ type: 'command', command: 'help', detail: 'Commands: /help, /reset', client_id: 'c1' });
    expect(shown()).toEqual(['human:/help:command']);
    expect(view().chat.entries[0].commandReply).toBe('Commands: /help, /reset');
    server.answer('/refresh_token', { status: 200, body: session([]) });
    server.socket.drop(1006);
    vi.advanceTimersByTime(MIN_BACKOFF_MS);
    server.socket.open();
    await flush();
    expect(shown()).toEqual(['human:/help:command']);
  });
});
