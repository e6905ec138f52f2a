// The page's brain, independent of React: the session, the socket with reconnect and
// backoff, the recovery order (socket first, then history merged by id), and what each
// event and close code means. React reads it through subscribe/getSnapshot.

import { type ApiResult, createSession, EXPIRED_TEXT, refreshSession } from './api';
import {
  addLocal,
  applyAck,
  applyCommand,
  applyFinal,
  applyNotice,
  applyReplyError,
  applyToken,
  type ChatState,
  emptyState,
  failLost,
  failSending,
  mergeHistory,
  refusedIndex,
  removeEntry,
} from './chatState';
import {
  CLOSE_POLICY,
  CLOSE_RESYNC,
  CLOSE_TOO_BIG,
  CLOSE_TOO_SLOW,
  parseEvent,
  type ConversationEvent,
  SEND_ERRORS,
  type ServerEvent,
  type SessionDocument,
  type StoredMessage,
} from './protocol';

export const TOKEN_KEY = 'chat.token';
export const MIN_BACKOFF_MS = 500;
export const MAX_BACKOFF_MS = 15_000;
/** After `too_many_connections`: no tight loop; the user can also retry by hand. */
export const TOO_MANY_BACKOFF_MS = 60_000;

export const DELETED_TEXT = 'This conversation was deleted.';

export type Connection = 'none' | 'connecting' | 'open' | 'waiting';

export interface ChatView {
  screen: 'start' | 'chat';
  /** The conversation shown (its session token), or null on the start screen. */
  token: string | null;
  /** Its title, from the session document or a `conversation` event; null before one is set. */
  title: string | null;
  name: string;
  /** The start screen's message (the server's error, or why the session ended). */
  startMessage: string;
  starting: boolean;
  connection: Connection;
  /** Words for the connection line ("Connected", "Reconnecting in 2 s…"). */
  status: string;
  /** An error or warning for the user, until dismissed or replaced. */
  banner: string | null;
  chat: ChatState;
}

/** The part of the browser's WebSocket the client uses (a fake one in unit tests). */
export interface SocketLike {
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type SocketFactory = (url: string) => SocketLike;

export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

export interface ClientDeps {
  openSocket: SocketFactory;
  fetch: typeof fetch;
  storage: StorageLike | null;
  /** Base of the HTTP calls ('' for the page's own origin). */
  httpBase: string;
  /** Base of the socket URL, e.g. `ws://localhost:3500`. */
  wsBase: string;
  newClientId?: () => string;
}

const OPEN = 1;

/**
 * What the conversation list needs to hear about the conversation shown: each is called with
 * its token. The list keeps its titles and order in step with them, and when the shown
 * conversation is deleted or expires it chooses what to show next.
 */
export interface ChatHooks {
  /** The history was loaded (on every (re)connect): its title and last activity. */
  loaded?(session: SessionDocument): void;
  /** A message of this conversation was stored (ours or another tab's). */
  active?(token: string, timestamp: string): void;
  /** A `conversation` event `title` (PATCH or `/title`, maybe from another tab). */
  titled?(token: string, title: string | null): void;
  /** The conversation was deleted (a `conversation` event `deleted`). */
  deleted?(token: string): void;
  /** The conversation expired or no longer exists. */
  expired?(token: string): void;
}

const initialView: ChatView = {
  screen: 'start',
  token: null,
  title: null,
  name: '',
  startMessage: '',
  starting: false,
  connection: 'none',
  status: '',
  banner: null,
  chat: emptyState,
};

function seconds(ms: number): string {
  return `${Math.round(ms / 100) / 10} s`;
}

export class ChatClient {
  private view: ChatView = initialView;
  private readonly listeners = new Set<() => void>();
  private token: string | null = null;
  private ws: SocketLike | null = null;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private historyTimer: ReturnType<typeof setTimeout> | null = null;
  private backoff = MIN_BACKOFF_MS;
  /** Client ids sent on the current socket and not yet acknowledged. */
  private unacked = new Set<string>();
  /** Client ids sent on a socket that closed before their ack. */
  private lost = new Set<string>();
  private counter = 0;
  private hooks: ChatHooks = {};

  constructor(private readonly deps: ClientDeps) {}

  /** Who hears about the conversation shown (the conversation list). */
  setHooks(hooks: ChatHooks): void {
    this.hooks = hooks;
  }

  // --- React glue -------------------------------------------------------------------------

  subscribe = (listener: () => void): (() => void) => {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  };

  getSnapshot = (): ChatView => this.view;

  private set(patch: Partial<ChatView>): void {
    this.view = { ...this.view, ...patch };
    for (const listener of this.listeners) listener();
  }

  private setChat(update: (chat: ChatState) => ChatState): void {
    const chat = update(this.view.chat);
    if (chat !== this.view.chat) this.set({ chat });
  }

  // --- Session lifecycle ------------------------------------------------------------------

  /** Resumes the session kept in the browser, if any. */
  init(): void {
    let token: string | null = null;
    try {
      token = this.deps.storage?.getItem(TOKEN_KEY) ?? null;
    } catch {
      token = null; // storage blocked: the chat just won't survive a reload
    }
    if (token) {
      this.token = token;
      this.set({ screen: 'chat', token });
      this.connect();
    }
  }

  /** Starts a session with `POST /token` (the tutorial's way in). */
  start(name: string): Promise<SessionDocument | null> {
    return this.begin(() => createSession(this.deps.fetch, this.deps.httpBase, name));
  }

  /**
   * Creates a conversation with `create` and shows it; on failure the start screen shows
   * why. Resolves to the new session, or null.
   */
  async begin(create: () => Promise<ApiResult>): Promise<SessionDocument | null> {
    this.set({ starting: true, startMessage: '' });
    const result = await create();
    if (!result.ok) {
      this.set({ starting: false, startMessage: result.failure.message });
      return null;
    }
    this.set({ starting: false });
    this.open(result.session.token, result.session);
    return result.session;
  }

  /**
   * Shows the conversation `token` (switching from any other): its socket is opened, then its
   * history loaded. `known` (a document already fetched) is shown until then.
   */
  open(token: string, known?: SessionDocument): void {
    if (token === this.token && !known) return;
    this.reset();
    this.token = token;
    this.saveToken(token);
    this.set({
      screen: 'chat',
      token,
      title: known?.title ?? null,
      name: known?.name ?? '',
      startMessage: '',
      chat: known ? mergeHistory(emptyState, known.messages) : emptyState,
    });
    this.connect();
  }

  /** "New chat": forget this session and ask for a name again. */
  newChat(): void {
    this.reset();
    this.set({ screen: 'start', startMessage: '' });
  }

  /** Closes the socket and timers (the page is going away); `init` can resume later. */
  dispose(): void {
    this.closeSocket();
    this.clearTimers();
  }

  private expire(): void {
    const token = this.token;
    this.reset();
    this.set({ screen: 'start', startMessage: EXPIRED_TEXT });
    if (token) this.hooks.expired?.(token);
  }

  /** The conversation shown was deleted (here or in another tab): the list picks what next. */
  private deleted(): void {
    const token = this.token;
    this.reset();
    this.set({ screen: 'start', startMessage: DELETED_TEXT });
    if (token) this.hooks.deleted?.(token);
  }

  private onConversation(event: ConversationEvent): void {
    const token = this.token;
    if (!token) return;
    if (event.change === 'title') {
      this.set({ title: event.title ?? null });
      this.hooks.titled?.(token, event.title ?? null);
    } else if (event.change === 'reset') {
      // The history was emptied: nothing shown so far is in it any more.
      this.unacked.clear();
      this.lost.clear();
      this.set({ chat: emptyState });
    } else {
      this.deleted();
    }
  }

  private reset(): void {
    this.closeSocket();
    this.clearTimers();
    this.token = null;
    this.saveToken(null);
    this.backoff = MIN_BACKOFF_MS;
    this.unacked.clear();
    this.lost.clear();
    this.set({
      token: null,
      title: null,
      name: '',
      chat: emptyState,
      banner: null,
      connection: 'none',
      status: '',
    });
  }

  private saveToken(token: string | null): void {
    try {
      if (token) this.deps.storage?.setItem(TOKEN_KEY, token);
      else this.deps.storage?.removeItem(TOKEN_KEY);
    } catch {
      // storage blocked: nothing to keep
    }
  }

  // --- User actions -----------------------------------------------------------------------

  /** Sends a chat message; false (and a banner saying why) when it cannot be sent now. */
  send(text: string): boolean {
    const msg = text.trim();
    if (!msg) return false;
    const ws = this.ws;
    if (!ws || ws.readyState !== OPEN || this.view.connection !== 'open') {
      this.set({ banner: 'Not connected: your message was not sent. It will be possible again once reconnected.' });
      return false;
    }
    const clientId = this.deps.newClientId?.() ?? `c${Date.now().toString(36)}-${++this.counter}`;
    ws.send(JSON.stringify({ type: 'message', msg, client_id: clientId }));
    this.unacked.add(clientId);
    this.setChat((chat) => addLocal(chat, clientId, msg, new Date().toISOString()));
    return true;
  }

  /** Sends one of our failed messages again (it moves to the end of the conversation). */
  resend(key: string): boolean {
    const entry = this.view.chat.entries.find((e) => e.key === key && e.status === 'failed');
    if (!entry || !this.send(entry.text)) return false;
    this.setChat((chat) => removeEntry(chat, key));
    return true;
  }

  stop(): void {
    if (this.ws && this.ws.readyState === OPEN) this.ws.send(JSON.stringify({ type: 'stop' }));
  }

  dismissBanner(): void {
    this.set({ banner: null });
  }

  /** Reconnect now instead of waiting (a button, or the browser coming back online). */
  retryNow(): void {
    if (!this.token || this.ws) return;
    this.clearTimers();
    this.backoff = MIN_BACKOFF_MS;
    this.connect();
  }

  // --- Connection -------------------------------------------------------------------------

  private connect(): void {
    const token = this.token;
    if (!token) return;
    const url = `${this.deps.wsBase}/chat?token=${encodeURIComponent(token)}`;
    let ws: SocketLike;
    try {
      ws = this.deps.openSocket(url);
    } catch {
      this.scheduleReconnect('Could not open a connection.');
      return;
    }
    this.ws = ws;
    const seen = { opened: false, expired: false, tooMany: false };
    this.set({ connection: 'connecting', status: 'Connecting…' });

    ws.onopen = () => {
      if (this.ws !== ws) return;
      seen.opened = true;
      this.set({ connection: 'open', status: 'Connected' });
      // Recovery order: the socket is open (no event can be missed from now on), then
      // the history fills in whatever finished while we were away.
      this.loadHistory(ws);
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      const event = parseEvent(ev.data);
      if (event) this.handle(event, seen);
    };
    ws.onerror = () => {
      // always followed by a close event, which decides what to do
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      for (const id of this.unacked) this.lost.add(id);
      this.unacked.clear();
      this.onClosed(ev.code, seen);
    };
  }

  private onClosed(code: number, seen: { opened: boolean; expired: boolean; tooMany: boolean }): void {
    if (seen.expired) {
      this.expire();
      return;
    }
    if (seen.tooMany) {
      this.scheduleReconnect('Too many open connections for this session.', TOO_MANY_BACKOFF_MS);
      return;
    }
    if (!seen.opened || code === CLOSE_POLICY) {
      // The handshake was refused or the server is unreachable: a browser cannot tell
      // which, so ask the server whether the session still exists.
      void this.probe();
      return;
    }
    if (code === CLOSE_TOO_BIG) {
      this.set({ banner: 'The server closed the connection: a message was too big (over 1 MiB).' });
    }
    if (code === CLOSE_RESYNC || code === CLOSE_TOO_SLOW) {
      // The server asks us to reconnect and reload the history: do it at once.
      this.backoff = MIN_BACKOFF_MS;
    }
    this.scheduleReconnect('Connection lost.');
  }

  private async probe(): Promise<void> {
    const token = this.token;
    if (!token) return;
    this.set({ connection: 'waiting', status: 'Checking the session…' });
    const result = await refreshSession(this.deps.fetch, this.deps.httpBase, token);
    if (token !== this.token || this.ws) return;
    if (result.ok) {
      this.scheduleReconnect('Connection lost.');
    } else if (result.failure.kind === 'expired') {
      this.expire();
    } else if (result.failure.kind === 'rate_limited') {
      this.scheduleReconnect(result.failure.message, result.failure.retryAfter * 1000);
    } else {
      this.scheduleReconnect(
        result.failure.kind === 'network' ? 'The server is unreachable.' : result.failure.message,
      );
    }
  }

  private scheduleReconnect(reason: string, delay?: number): void {
    if (!this.token || this.timer) return;
    const wait = delay ?? this.backoff;
    if (delay === undefined) this.backoff = Math.min(this.backoff * 2, MAX_BACKOFF_MS);
    this.set({ connection: 'waiting', status: `${reason} Reconnecting in ${seconds(wait)}…` });
    this.timer = setTimeout(() => {
      this.timer = null;
      this.connect();
    }, wait);
  }

  private loadHistory(ws: SocketLike): void {
    const token = this.token;
    if (!token) return;
    void refreshSession(this.deps.fetch, this.deps.httpBase, token).then((result) => {
      if (token !== this.token || this.ws !== ws) return;
      if (result.ok) {
        this.backoff = MIN_BACKOFF_MS;
        this.mergeStored(result.session.messages);
        this.set({ name: result.session.name, title: result.session.title ?? null });
        this.hooks.loaded?.(result.session);
        return;
      }
      if (result.failure.kind === 'expired') {
        this.expire();
        return;
      }
      const wait =
        result.failure.kind === 'rate_limited' ? result.failure.retryAfter * 1000 : this.backoff;
      this.set({ banner: `Could not load the conversation: ${result.failure.message}` });
      this.historyTimer = setTimeout(() => {
        this.historyTimer = null;
        if (this.ws === ws) this.loadHistory(ws);
      }, wait);
    });
  }

  private mergeStored(messages: StoredMessage[]): void {
    const lost = this.lost;
    this.lost = new Set();
    this.setChat((chat) =>
      failLost(
        mergeHistory(chat, messages),
        lost,
        'Not sent: the connection was lost before the server confirmed it.',
      ),
    );
  }

  private handle(
    event: ServerEvent,
    seen: { opened: boolean; expired: boolean; tooMany: boolean },
  ): void {
    switch (event.type) {
      case 'ack':
        if (event.client_id !== undefined) this.unacked.delete(event.client_id);
        this.setChat((chat) => applyAck(chat, event));
        if (this.token) this.hooks.active?.(this.token, event.timestamp);
        return;
      case 'token':
        this.setChat((chat) => applyToken(chat, event));
        return;
      case 'message':
        this.setChat((chat) => applyFinal(chat, event));
        return;
      case 'notice':
        this.setChat((chat) => applyNotice(chat, event));
        return;
      case 'conversation':
        this.onConversation(event);
        return;
      case 'command':
        // Never acknowledged: the answer is the confirmation.
        if (event.client_id !== undefined) this.unacked.delete(event.client_id);
        this.setChat((chat) => applyCommand(chat, event));
        return;
      case 'error':
        break;
    }
    const detail = event.detail || `Error: ${event.code}`;
    if (event.reply_to !== undefined) {
      this.setChat((chat) => applyReplyError(chat, event));
      return;
    }
    if (event.code === 'session_expired') {
      seen.expired = true;
      this.expire();
      return;
    }
    if (event.code === 'too_many_connections') {
      seen.tooMany = true;
      this.set({ banner: detail });
      return;
    }
    if (SEND_ERRORS.has(event.code)) {
      const named = event.client_id;
      const failed = this.view.chat.entries[refusedIndex(this.view.chat, named)];
      if (failed?.clientId !== undefined) this.unacked.delete(failed.clientId);
      this.setChat((chat) => failSending(chat, detail, named));
    }
    this.set({ banner: detail });
  }

  private closeSocket(): void {
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      try {
        ws.close(1000, 'bye');
      } catch {
        // already closed
      }
    }
  }

  private clearTimers(): void {
    if (this.timer) clearTimeout(this.timer);
    if (this.historyTimer) clearTimeout(this.historyTimer);
    this.timer = null;
    this.historyTimer = null;
  }
}

/** The client for the real browser: same-origin HTTP and socket, localStorage. */
export function browserClient(): ChatClient {
  let storage: StorageLike | null = null;
  try {
    storage = window.localStorage;
  } catch {
    storage = null;
  }
  const wsProto = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
  return new ChatClient({
    openSocket: (url) => new WebSocket(url) as unknown as SocketLike,
    fetch: (input, init) => window.fetch(input, init),
    storage,
    httpBase: '',
    wsBase: `${wsProto}//${window.location.host}`,
  });
}
