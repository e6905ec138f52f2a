import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { type ChatClient, TOKEN_KEY } from './chatClient';
import { serialize } from './conversationList';
import { API_KEY, CONVERSATIONS_KEY, NAME_KEY, type Sidebar } from './sidebar';
import { FakeServer, flush, human, session } from './test/fakes';

const A = 'aaaaaaaa-1547-41ee-8b49-8e56d609ca33';
const B = 'bbbbbbbb-1547-41ee-8b49-8e56d609ca33';
const C = 'cccccccc-1547-41ee-8b49-8e56d609ca33';
const KEY = 'chat_k3yk3yk3yk3yk3yk3yk3yk3yk3yk3yk3yk3yk3yk3y';
const ANN = { user_id: 'u1', name: 'Ann', created: '2026-11-23T13:00:00Z' };

let server: FakeServer;
let client: ChatClient;
let sidebar: Sidebar;

beforeEach(() => {
  server = new FakeServer();
  ({ client, sidebar } = server.makeApp());
});

afterEach(() => client.dispose());

const doc = (token: string, title: string | null, ts: string) =>
  session([human(`h-${token}`, 'hi', ts)], 'Ann', { token, title });
const list = () => sidebar.getSnapshot().items.map((i) => `${i.id.slice(0, 1)}:${i.title}`);
const stored = () => JSON.parse(localStorage.getItem(CONVERSATIONS_KEY) ?? '[]') as { id: string }[];
const conv = (id: string) => `/v1/conversations/${id}`;

function keep(...items: { id: string; title: string | null; updated: string }[]) {
  localStorage.setItem(CONVERSATIONS_KEY, serialize(items));
}

/** The page's start: the chat resumes its token, the list loads. */
async function start() {
  client.init();
  await sidebar.init();
  await flush();
}

/** The chat's socket opens and its history (`refresh`) loads. */
async function connect(refresh: object) {
  server.answer('/refresh_token', { status: 200, body: refresh });
  server.socket.open();
  await flush();
}

describe('without an account', () => {
  it("checks each kept token with the token itself: a 404 drops it, a server failure keeps it", async () => {
    keep(
      { id: A, title: 'kept A', updated: '2026-11-23T10:00:00Z' },
      { id: B, title: 'gone B', updated: '2026-11-23T11:00:00Z' },
      { id: C, title: 'kept C', updated: '2026-11-23T09:00:00Z' },
    );
    localStorage.setItem(TOKEN_KEY, A);
    server.answer(`GET ${conv(A)}`, { status: 200, body: doc(A, 'Server title A', '2026-11-23T12:00:00Z') });
    server.answer(`GET ${conv(B)}`, { status: 404, body: { detail: 'Conversation not found' } });
    server.answer(`GET ${conv(C)}`, { status: 503, body: { detail: 'down' } });
    await start();
    expect(server.made('GET', conv(A))[0].authorization).toBe(`Bearer ${A}`);
    expect(server.made('GET', conv(B))[0].authorization).toBe(`Bearer ${B}`);
    expect(list()).toEqual(['a:Server title A', 'c:kept C']);
    expect(stored().map((i) => i.id)).toEqual([A, C]);
    expect(sidebar.getSnapshot().loading).toBe(false);
  });

  it('adds the token kept by the page before the sidebar to the list', async () => {
    localStorage.setItem(TOKEN_KEY, A);
    server.answer(`GET ${conv(A)}`, { status: 200, body: doc(A, null, '2026-11-23T12:00:00Z') });
    await start();
    expect(list()).toEqual(['a:null']);
    expect(stored().map((i) => i.id)).toEqual([A]);
  });

  it('with no conversation shown, shows the newest one', async () => {
    keep({ id: A, title: 'A', updated: '2026-11-23T10:00:00Z' }, { id: B, title: 'B', updated: '2026-11-23T11:00:00Z' });
    server.always(`GET ${conv(A)}`, { status: 200, body: doc(A, 'A', '2026-11-23T10:00:00Z') });
    server.always(`GET ${conv(B)}`, { status: 200, body: doc(B, 'B', '2026-11-23T11:00:00Z') });
    await start();
    expect(client.getSnapshot().token).toBe(B);
    expect(server.socket.url).toContain(B);
  });

  it('"New chat" creates an anonymous conversation with the last name and keeps its token', async () => {
    localStorage.setItem(NAME_KEY, 'Ann');
    await start();
    server.answer('POST /v1/conversations', { status: 201, body: doc(A, null, '2026-11-23T12:00:00Z') });
    await sidebar.newChat();
    const [request] = server.made('POST', '/v1/conversations');
    expect(request).toMatchObject({ authorization: null, body: { name: 'Ann' } });
    expect(client.getSnapshot()).toMatchObject({ screen: 'chat', token: A });
    expect(stored().map((i) => i.id)).toEqual([A]);
  });

  it('"New chat" with no name known asks for one; the start screen sends what was typed', async () => {
    await start();
    await sidebar.newChat();
    expect(server.made('POST', '/v1/conversations')).toHaveLength(0);
    expect(client.getSnapshot().screen).toBe('start');
    server.answer('POST /v1/conversations', { status: 400, body: { detail: { loc: 'name', msg: 'Enter a valid name' } } });
    await sidebar.newChat('');
    expect(server.made('POST', '/v1/conversations')[0].body).toEqual({ name: '' });
    expect(client.getSnapshot()).toMatchObject({ screen: 'start', startMessage: 'Enter a valid name' });
    expect(list()).toEqual([]);
    server.answer('POST /v1/conversations', { status: 201, body: doc(A, null, '2026-11-23T12:00:00Z') });
    await sidebar.newChat('Ann');
    expect(server.made('POST', '/v1/conversations')[1]).toMatchObject({ body: { name: 'Ann' }, authorization: null });
    expect(client.getSnapshot().token).toBe(A);
    expect(stored().map((i) => i.id)).toEqual([A]);
    expect(localStorage.getItem(NAME_KEY)).toBe('Ann');
  });

  it('renames with the token as bearer; a refused title is shown in words', async () => {
    keep({ id: A, title: 'A', updated: '2026-11-23T10:00:00Z' });
    server.always(`GET ${conv(A)}`, { status: 200, body: doc(A, 'A', '2026-11-23T10:00:00Z') });
    await start();
    server.answer(`PATCH ${conv(A)}`, { status: 200, body: doc(A, 'Cats', '2026-11-23T10:00:00Z') });
    expect(await sidebar.rename(A, '  Cats ')).toBe(true);
    expect(server.made('PATCH', conv(A))[0]).toMatchObject({ authorization: `Bearer ${A}`, body: { title: 'Cats' } });
    expect(list()).toEqual(['a:Cats']);
    expect(stored()).toEqual([{ id: A, title: 'Cats', updated: '2026-11-23T10:00:00Z' }]);
    server.answer(`PATCH ${conv(A)}`, { status: 400, body: { detail: 'Title is empty' } });
    expect(await sidebar.rename(A, ' ')).toBe(false);
    expect(sidebar.getSnapshot().error).toBe('Could not rename: Title is empty');
    expect(list()).toEqual(['a:Cats']);
  });

  it('deleting the conversation shown switches to the next one; the last one, to a new one', async () => {
    keep({ id: A, title: 'A', updated: '2026-11-23T11:00:00Z' }, { id: B, title: 'B', updated: '2026-11-23T10:00:00Z' });
    localStorage.setItem(TOKEN_KEY, A);
    server.always(`GET ${conv(A)}`, { status: 200, body: doc(A, 'A', '2026-11-23T11:00:00Z') });
    server.always(`GET ${conv(B)}`, { status: 200, body: doc(B, 'B', '2026-11-23T10:00:00Z') });
    await start();
    await connect(doc(A, 'A', '2026-11-23T11:00:00Z'));
    server.answer(`DELETE ${conv(A)}`, { status: 204 });
    expect(await sidebar.delete(A)).toBe(true);
    expect(server.made('DELETE', conv(A))[0].authorization).toBe(`Bearer ${A}`);
    expect(list()).toEqual(['b:B']);
    expect(client.getSnapshot().token).toBe(B);
    expect(server.socket.url).toContain(B);
    await connect(doc(B, 'B', '2026-11-23T10:00:00Z'));

    server.answer(`DELETE ${conv(B)}`, { status: 404, body: { detail: 'Conversation not found' } });
    server.answer('POST /v1/conversations', { status: 201, body: doc(C, null, '2026-11-23T12:00:00Z') });
    expect(await sidebar.delete(B)).toBe(true); // already gone elsewhere: same outcome
    expect(server.made('POST', '/v1/conversations')[0].body).toEqual({ name: 'Ann' });
    expect(client.getSnapshot().token).toBe(C);
    expect(stored().map((i) => i.id)).toEqual([C]);
  });

  it('a failed delete keeps the conversation and says why', async () => {
    keep({ id: A, title: 'A', updated: '2026-11-23T11:00:00Z' });
    server.always(`GET ${conv(A)}`, { status: 200, body: doc(A, 'A', '2026-11-23T11:00:00Z') });
    await start();
    server.answer(`DELETE ${conv(A)}`, 'network');
    expect(await sidebar.delete(A)).toBe(false);
    expect(list()).toEqual(['a:A']);
    expect(sidebar.getSnapshot().error).toMatch(/Could not delete: Could not reach the server/);
  });

  it('follows the socket: a title from another tab, a deletion from another tab', async () => {
    keep({ id: A, title: 'A', updated: '2026-11-23T11:00:00Z' }, { id: B, title: 'B', updated: '2026-11-23T10:00:00Z' });
    localStorage.setItem(TOKEN_KEY, A);
    server.always(`GET ${conv(A)}`, { status: 200, body: doc(A, 'A', '2026-11-23T11:00:00Z') });
    server.always(`GET ${conv(B)}`, { status: 200, body: doc(B, 'B', '2026-11-23T10:00:00Z') });
    await start();
    await connect(doc(A, 'A', '2026-11-23T11:00:00Z'));
    server.socket.emit({ type: 'conversation', change: 'title', title: 'Renamed elsewhere' });
    expect(list()).toEqual(['a:Renamed elsewhere', 'b:B']);
    const socketA = server.socket;
    socketA.emit({ type: 'conversation', change: 'deleted' });
    socketA.drop(1008);
    await flush();
    expect(list()).toEqual(['b:B']);
    expect(client.getSnapshot().token).toBe(B);
    expect(server.made('DELETE', conv(A))).toHaveLength(0);
  });

  it("a conversation's first message moves it up and brings its title", async () => {
    keep({ id: A, title: null, updated: '2026-11-23T09:00:00Z' }, { id: B, title: 'B', updated: '2026-11-23T10:00:00Z' });
    localStorage.setItem(TOKEN_KEY, A);
    server.answer(`GET ${conv(A)}`, { status: 200, body: session([], 'Ann', { token: A, session_start: '2026-11-23T09:00:00Z' }) });
    server.always(`GET ${conv(B)}`, { status: 200, body: doc(B, 'B', '2026-11-23T10:00:00Z') });
    await start();
    await connect(session([], 'Ann', { token: A }));
    expect(list()).toEqual(['b:B', 'a:null']);
    server.answer(`GET ${conv(A)}`, { status: 200, body: doc(A, 'Tell me about cats', '2026-11-23T12:00:00Z') });
    server.socket.emit({ type: 'ack', id: 'h1', msg: 'Tell me about cats', timestamp: '2026-11-23T12:00:00Z' });
    await flush();
    expect(list()).toEqual(['a:Tell me about cats', 'b:B']);
  });

  it('an expired conversation leaves the list', async () => {
    keep({ id: A, title: 'A', updated: '2026-11-23T11:00:00Z' });
    localStorage.setItem(TOKEN_KEY, A);
    server.always(`GET ${conv(A)}`, 'network');
    await start();
    expect(list()).toEqual(['a:A']);
    server.answer('/refresh_token', { status: 400, body: { detail: 'Session expired or does not exist' } });
    server.socket.drop(1006);
    await flush();
    expect(list()).toEqual([]);
    expect(client.getSnapshot().screen).toBe('start');
  });

  it('the drawer closes on choosing a conversation and on "New chat"', async () => {
    keep({ id: A, title: 'A', updated: '2026-11-23T11:00:00Z' });
    server.always(`GET ${conv(A)}`, { status: 200, body: doc(A, 'A', '2026-11-23T11:00:00Z') });
    await start();
    sidebar.openDrawer();
    expect(sidebar.getSnapshot().drawerOpen).toBe(true);
    sidebar.select(A);
    expect(sidebar.getSnapshot().drawerOpen).toBe(false);
    sidebar.openDrawer();
    server.answer('POST /v1/conversations', { status: 201, body: doc(B, null, '2026-11-23T12:00:00Z') });
    await sidebar.newChat();
    expect(sidebar.getSnapshot().drawerOpen).toBe(false);
  });
});

describe('two tabs', () => {
  it("never drops another tab's token, and shows the other tab's changes", async () => {
    localStorage.setItem(NAME_KEY, 'Ann');
    const otherServer = new FakeServer();
    const other = otherServer.makeApp();
    await start();
    await other.sidebar.init(); // the second tab's list is empty too
    server.answer('POST /v1/conversations', { status: 201, body: doc(A, null, '2026-11-23T12:00:00Z') });
    await sidebar.newChat(); // this tab adds A: the second tab's list does not have it
    otherServer.answer('POST /v1/conversations', { status: 201, body: doc(B, null, '2026-11-23T12:00:00Z') });
    await other.sidebar.newChat(); // the second tab adds B: A must stay stored
    expect(stored().map((i) => i.id).sort()).toEqual([A, B]);
    // This tab hears of B through the storage event.
    window.dispatchEvent(
      new StorageEvent('storage', { key: CONVERSATIONS_KEY, newValue: localStorage.getItem(CONVERSATIONS_KEY) }),
    );
    expect(list().sort()).toEqual(['a:null', 'b:null']);
    // A removal in one tab removes only that token.
    server.answer(`DELETE ${conv(B)}`, { status: 204 });
    await sidebar.delete(B);
    expect(stored().map((i) => i.id)).toEqual([A]);
    other.client.dispose();
    other.sidebar.dispose();
    sidebar.dispose();
  });
});

describe('with an account', () => {
  const row = (id: string, title: string, updated: string) => ({ conversation_id: id, title, created: updated, updated, message_count: 2 });

  it('registers: the key is kept and shown once, the list comes from the server with the key', async () => {
    keep({ id: A, title: 'anonymous A', updated: '2026-11-23T11:00:00Z' });
    server.always(`GET ${conv(A)}`, { status: 200, body: doc(A, 'anonymous A', '2026-11-23T11:00:00Z') });
    await start();
    server.answer('POST /v1/users', { status: 201, body: { ...ANN, api_key: KEY } });
    server.answer('GET /v1/users/me', { status: 200, body: ANN });
    server.answer('GET /v1/conversations', {
      status: 200,
      body: { conversations: [row(B, 'Mine B', '2026-11-23T12:00:00Z')], next_cursor: 'p2' },
    });
    expect(await sidebar.register('Ann')).toBe(true);
    expect(server.made('POST', '/v1/users')[0].body).toEqual({ name: 'Ann' });
    expect(server.made('GET', '/v1/conversations')[0].authorization).toBe(`Bearer ${KEY}`);
    expect(localStorage.getItem(API_KEY)).toBe(KEY);
    expect(sidebar.getSnapshot()).toMatchObject({ mode: 'account', user: ANN, newKey: KEY, nextCursor: 'p2' });
    expect(list()).toEqual(['b:Mine B']);
    // The anonymous list is kept for later, not mixed in.
    expect(stored().map((i) => i.id)).toEqual([A]);
    sidebar.dismissKey();
    expect(sidebar.getSnapshot().newKey).toBeNull();

    server.answer('GET /v1/conversations', {
      status: 200,
      body: { conversations: [row(B, 'Mine B', '2026-11-23T12:00:00Z'), row(C, 'Mine C', '2026-11-23T08:00:00Z')], next_cursor: null },
    });
    await sidebar.loadMore();
    expect(server.made('GET', '/v1/conversations')[1].path).toBe('/v1/conversations?cursor=p2');
    expect(list()).toEqual(['b:Mine B', 'c:Mine C']);
    expect(sidebar.getSnapshot().nextCursor).toBeNull();
  });

  it('new chats, renames and deletions go with the key', async () => {
    localStorage.setItem(API_KEY, KEY);
    server.answer('GET /v1/users/me', { status: 200, body: ANN });
    server.answer('GET /v1/conversations', { status: 200, body: { conversations: [row(B, 'B', '2026-11-23T12:00:00Z')], next_cursor: null } });
    await start();
    expect(client.getSnapshot().token).toBe(B);
    server.answer('POST /v1/conversations', { status: 201, body: doc(C, null, '2026-11-23T13:00:00Z') });
    server.answer('POST /v1/conversations', { status: 201, body: doc(C, null, '2026-11-23T13:00:00Z') });
    await sidebar.newChat();
    expect(server.made('POST', '/v1/conversations')[0]).toMatchObject({ authorization: `Bearer ${KEY}`, body: { name: 'Ann' } });
    expect(localStorage.getItem(CONVERSATIONS_KEY)).toBeNull();
    await sidebar.newChat('Bob'); // the start screen's name, with the key
    expect(server.made('POST', '/v1/conversations')[1]).toMatchObject({ body: { name: 'Bob' }, authorization: `Bearer ${KEY}` });
    server.answer(`PATCH ${conv(B)}`, { status: 200, body: doc(B, 'New B', '2026-11-23T12:00:00Z') });
    await sidebar.rename(B, 'New B');
    expect(server.made('PATCH', conv(B))[0].authorization).toBe(`Bearer ${KEY}`);
    server.answer(`DELETE ${conv(B)}`, { status: 204 });
    await sidebar.delete(B);
    expect(server.made('DELETE', conv(B))[0].authorization).toBe(`Bearer ${KEY}`);
    expect(list()).toEqual(['c:null']);
  });

  it('a pasted key the server does not know is refused and not kept', async () => {
    await start();
    server.answer('GET /v1/users/me', { status: 401, body: { detail: 'Invalid credentials' } });
    expect(await sidebar.useKey('chat_wrong')).toBe(false);
    expect(sidebar.getSnapshot()).toMatchObject({ mode: 'anonymous', error: 'That API key is not valid.' });
    expect(localStorage.getItem(API_KEY)).toBeNull();
    expect(await sidebar.useKey('   ')).toBe(false);
    expect(sidebar.getSnapshot().error).toBe('Paste an API key.');
  });

  it('a kept key that was revoked: signed out, back to this browser\'s list', async () => {
    localStorage.setItem(API_KEY, KEY);
    keep({ id: A, title: 'A', updated: '2026-11-23T11:00:00Z' });
    server.answer('GET /v1/users/me', { status: 401, body: { detail: 'Invalid credentials' } });
    server.always(`GET ${conv(A)}`, { status: 200, body: doc(A, 'A', '2026-11-23T11:00:00Z') });
    await start();
    expect(sidebar.getSnapshot()).toMatchObject({ mode: 'anonymous', error: 'Signed out: That API key is not valid.' });
    expect(localStorage.getItem(API_KEY)).toBeNull();
    expect(list()).toEqual(['a:A']);
  });

  it("a kept key the server cannot check now (down) is kept; this browser's list is shown", async () => {
    localStorage.setItem(API_KEY, KEY);
    keep({ id: A, title: 'A', updated: '2026-11-23T11:00:00Z' });
    server.answer('GET /v1/users/me', { status: 503, body: { detail: 'down' } });
    server.always(`GET ${conv(A)}`, { status: 200, body: doc(A, 'A', '2026-11-23T11:00:00Z') });
    await start();
    expect(sidebar.getSnapshot()).toMatchObject({ mode: 'anonymous' });
    expect(sidebar.getSnapshot().error).toMatch(/^Could not load your account: The server is having trouble \(HTTP 503\)/);
    expect(localStorage.getItem(API_KEY)).toBe(KEY);
    expect(list()).toEqual(['a:A']);
  });

  it("a refused registration says why in the server's words, and keeps nothing", async () => {
    await start();
    server.answer(
      'POST /v1/users',
      { status: 403, body: { detail: 'Registration is closed: ask an admin' } },
      { status: 400, body: { detail: { loc: 'name', msg: 'Enter a valid name' } } },
      { status: 429, body: { detail: 'Too many requests: try again in 7 s' }, headers: { 'Retry-After': '7' } },
    );
    for (const expected of ['Registration is closed: ask an admin', 'Enter a valid name', 'Too many requests: try again in 7 s']) {
      expect(await sidebar.register('Ann')).toBe(false);
      expect(sidebar.getSnapshot()).toMatchObject({ mode: 'anonymous', error: expected, newKey: null });
    }
    expect(localStorage.getItem(API_KEY)).toBeNull();
  });

  it('a key just registered is kept even if the account cannot be loaded right after', async () => {
    await start();
    server.answer('POST /v1/users', { status: 201, body: { ...ANN, api_key: KEY } });
    server.answer('GET /v1/users/me', 'network');
    expect(await sidebar.register('Ann')).toBe(false);
    expect(localStorage.getItem(API_KEY)).toBe(KEY);
    expect(sidebar.getSnapshot().newKey).toBe(KEY);
  });

  it("signing out goes back to this browser's conversations and leaves the account's", async () => {
    localStorage.setItem(API_KEY, KEY);
    keep({ id: A, title: 'A', updated: '2026-11-23T11:00:00Z' });
    server.answer('GET /v1/users/me', { status: 200, body: ANN });
    server.answer('GET /v1/conversations', { status: 200, body: { conversations: [row(B, 'B', '2026-11-23T12:00:00Z')], next_cursor: null } });
    server.always(`GET ${conv(A)}`, { status: 200, body: doc(A, 'A', '2026-11-23T11:00:00Z') });
    await start();
    expect(client.getSnapshot().token).toBe(B);
    await sidebar.signOut();
    expect(localStorage.getItem(API_KEY)).toBeNull();
    expect(sidebar.getSnapshot()).toMatchObject({ mode: 'anonymous', user: null });
    expect(list()).toEqual(['a:A']);
    expect(client.getSnapshot().token).toBe(A);
  });
});
