// The conversation list beside the chat, independent of React like ChatClient. Without an
// account it lists the tokens this browser has (localStorage), each checked against the server;
// with an API key it lists what `GET /v1/conversations` returns. It tells the ChatClient which
// conversation to show, and hears from it about titles, activity, deletions and expiry.

import type { ApiResult } from './api';
import type { ChatClient, StorageLike } from './chatClient';
import {
  appendPage,
  byActivity,
  type ConversationItem,
  fromDocument,
  fromRow,
  neighbour,
  parseStored,
  serialize,
  touch,
  upsert,
  withTitle,
  without,
} from './conversationList';
import type { ConversationsApi, User, V1Failure, V1Result } from './conversationsApi';
import type { SessionDocument } from './protocol';

export const CONVERSATIONS_KEY = 'chat.conversations';
export const API_KEY = 'chat.apiKey';
export const NAME_KEY = 'chat.name';

export interface SidebarView {
  mode: 'anonymous' | 'account';
  /** The signed-in user (account mode). */
  user: User | null;
  items: ConversationItem[];
  /** More rows to load (account mode): "Load more". */
  nextCursor: string | null;
  loading: boolean;
  /** A failure of the list's own actions, until dismissed or replaced. */
  error: string | null;
  /** A key just registered: shown once, with a copy button, until dismissed. */
  newKey: string | null;
  /** The drawer on a phone-width screen. */
  drawerOpen: boolean;
}

const initialView: SidebarView = {
  mode: 'anonymous',
  user: null,
  items: [],
  nextCursor: null,
  loading: false,
  error: null,
  newKey: null,
  drawerOpen: false,
};

/** A v1 failure in the shape the start screen shows (ChatClient.begin). */
function asApiResult(result: V1Result<SessionDocument>): ApiResult {
  if (result.ok) return { ok: true, session: result.value };
  const f: V1Failure = result.failure;
  if (f.kind === 'invalid' || f.kind === 'rate_limited' || f.kind === 'network') {
    return { ok: false, failure: f };
  }
  return { ok: false, failure: { kind: 'server', message: f.message, status: 0 } };
}

export class Sidebar {
  private view: SidebarView = initialView;
  private readonly listeners = new Set<() => void>();
  private key: string | null = null;
  /** Conversations whose title was asked for once after their first message. */
  private titleAsked = new Set<string>();

  constructor(
    private readonly chat: ChatClient,
    private readonly api: ConversationsApi,
    private readonly storage: StorageLike | null,
  ) {}

  // --- React glue -------------------------------------------------------------------------

  subscribe = (listener: () => void): (() => void) => {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  };

  getSnapshot = (): SidebarView => this.view;

  private set(patch: Partial<SidebarView>): void {
    this.view = { ...this.view, ...patch };
    for (const listener of this.listeners) listener();
  }

  private setItems(update: (items: ConversationItem[]) => ConversationItem[]): void {
    const before = this.view.items;
    const items = update(before);
    this.set({ items });
    if (this.view.mode === 'anonymous') this.persist(before, items);
  }

  /**
   * Writes the change from `before` to `after` into the stored list as it is now, not the
   * whole list: another tab may have added a token since this one read it, and a token lost
   * is a conversation lost.
   */
  private persist(before: ConversationItem[], after: ConversationItem[]): void {
    const kept = new Map(after.map((i) => [i.id, i]));
    const gone = new Set(before.filter((i) => !kept.has(i.id)).map((i) => i.id));
    const old = new Map(before.map((i) => [i.id, i]));
    const changed = after.filter((i) => {
      const o = old.get(i.id);
      return !o || o.title !== i.title || o.updated !== i.updated;
    });
    if (gone.size === 0 && changed.length === 0 && this.read(CONVERSATIONS_KEY) !== null) return;
    let stored = parseStored(this.read(CONVERSATIONS_KEY)).filter((i) => !gone.has(i.id));
    for (const item of changed) stored = upsert(stored, item);
    this.write(CONVERSATIONS_KEY, serialize(stored));
  }

  /** Another tab changed the stored list: show it (nothing to write back). */
  private onStorage = (e: StorageEvent): void => {
    if (e.key !== CONVERSATIONS_KEY || this.view.mode !== 'anonymous') return;
    this.set({ items: parseStored(e.newValue) });
  };

  /** Stops listening to other tabs (the page is going away). */
  dispose(): void {
    if (typeof window !== 'undefined') window.removeEventListener('storage', this.onStorage);
  }

  // --- Start ------------------------------------------------------------------------------

  /** Listens to the chat, then loads the list: the account's if a key is kept, else ours. */
  async init(): Promise<void> {
    this.chat.setHooks({
      loaded: (doc) => this.onLoaded(doc),
      active: (id, timestamp) => this.onActive(id, timestamp),
      titled: (id, title) => this.setItems((items) => withTitle(items, id, title)),
      deleted: (id) => void this.dropped(id),
      expired: (id) => this.setItems((items) => without(items, id)),
    });
    if (typeof window !== 'undefined') window.addEventListener('storage', this.onStorage);
    const key = this.read(API_KEY);
    if (key) await this.signIn(key, false);
    else await this.loadAnonymous(true);
  }

  /**
   * This browser's tokens, shown at once, then each checked: a 404 drops it. `adopt`: the
   * conversation shown joins the list (at the page's start: the page before the sidebar kept
   * one token only).
   */
  private async loadAnonymous(adopt = false): Promise<void> {
    let items = parseStored(this.read(CONVERSATIONS_KEY));
    const current = this.chat.getSnapshot().token;
    if (adopt && current && !items.some((i) => i.id === current)) {
      items = [...items, { id: current, title: null, updated: new Date(0).toISOString() }];
    }
    this.set({ mode: 'anonymous', user: null, nextCursor: null, loading: true });
    this.setItems(() => items);
    await Promise.all(items.map((item) => this.check(item.id)));
    this.set({ loading: false });
    this.showSomething();
  }

  private async check(id: string): Promise<void> {
    const result = await this.api.get(id, id);
    if (this.view.mode !== 'anonymous') return;
    if (result.ok) {
      this.setItems((items) => (items.some((i) => i.id === id) ? upsert(items, fromDocument(result.value)) : items));
    } else if (result.failure.kind === 'not_found' || result.failure.kind === 'unauthorized') {
      this.setItems((items) => without(items, id));
    }
    // Any other failure (server down): the token stays, and the next load checks it again.
  }

  /** No conversation shown (first visit with a list, or the one shown is gone): the newest. */
  private showSomething(): void {
    const first = this.view.items[0];
    if (this.chat.getSnapshot().token === null && first) this.chat.open(first.id);
  }

  // --- Account ----------------------------------------------------------------------------

  /** Registers `name`; the key is kept here and shown once. */
  async register(name: string): Promise<boolean> {
    const result = await this.api.register(name);
    if (!result.ok) {
      this.set({ error: result.failure.message });
      return false;
    }
    // Kept at once: should the next call fail, the account is not lost with the key.
    this.write(API_KEY, result.value.api_key);
    this.set({ newKey: result.value.api_key });
    return this.signIn(result.value.api_key, true);
  }

  /** Uses a pasted key: checked with `GET /v1/users/me` before it is kept. */
  useKey(key: string): Promise<boolean> {
    return this.signIn(key.trim(), true);
  }

  private async signIn(key: string, byUser: boolean): Promise<boolean> {
    if (!key) {
      this.set({ error: 'Paste an API key.' });
      return false;
    }
    this.set({ loading: true });
    const me = await this.api.me(key);
    if (!me.ok) {
      const revoked = me.failure.kind === 'unauthorized';
      // A refused key is never kept; one the server could not check (down) is, for next time.
      if (revoked) this.remove(API_KEY);
      let message = me.failure.message;
      if (!byUser) {
        message = revoked
          ? `Signed out: ${message}`
          : `Could not load your account: ${message} This browser's conversations are shown.`;
      }
      this.set({ loading: false, error: message });
      if (!byUser) await this.loadAnonymous(true);
      return false;
    }
    this.key = key;
    this.write(API_KEY, key);
    this.write(NAME_KEY, me.value.name);
    this.set({ mode: 'account', user: me.value, items: [], nextCursor: null, error: null });
    await this.loadPage(null);
    this.showSomething();
    return true;
  }

  /** Forgets the key: the list goes back to this browser's own conversations. */
  async signOut(): Promise<void> {
    this.key = null;
    this.remove(API_KEY);
    this.set({ newKey: null, error: null });
    const shown = this.chat.getSnapshot().token;
    await this.loadAnonymous();
    // The conversation shown belongs to the account: not ours to show without the key.
    if (shown && !this.view.items.some((i) => i.id === shown)) {
      const first = this.view.items[0];
      if (first) this.chat.open(first.id);
      else this.chat.newChat();
    }
  }

  dismissKey(): void {
    this.set({ newKey: null });
  }

  async loadMore(): Promise<void> {
    if (this.view.nextCursor) await this.loadPage(this.view.nextCursor);
  }

  private async loadPage(cursor: string | null): Promise<void> {
    const key = this.key;
    if (!key) return;
    this.set({ loading: true });
    const result = await this.api.list(key, cursor);
    if (this.key !== key) return;
    if (!result.ok) {
      this.set({ loading: false, error: `Could not load the conversations: ${result.failure.message}` });
      return;
    }
    const { conversations, next_cursor } = result.value;
    this.set({
      loading: false,
      items: cursor ? appendPage(this.view.items, conversations) : byActivity(conversations.map(fromRow)),
      nextCursor: next_cursor,
    });
  }

  // --- Conversations ----------------------------------------------------------------------

  /** The name a new conversation gets: the account's, else the last one used here. */
  knownName(): string {
    return this.view.user?.name || this.chat.getSnapshot().name || this.read(NAME_KEY) || '';
  }

  /**
   * "New chat": `POST /v1/conversations` (with the key when there is one) named `typed` (the
   * start screen's, sent as typed: the server refuses a blank one in words) or else the known
   * name. With no name known the start screen asks for one.
   */
  async newChat(typed?: string): Promise<void> {
    this.set({ drawerOpen: false });
    const name = typed ?? this.knownName();
    if (typed === undefined && !name.trim()) {
      this.chat.newChat();
      return;
    }
    const key = this.key;
    const doc = await this.chat.begin(async () => asApiResult(await this.api.create(name, key)));
    if (!doc) return;
    this.write(NAME_KEY, doc.name);
    const item = fromDocument(doc);
    this.setItems((items) => upsert(items, { ...item, updated: new Date().toISOString() }));
  }

  /** Shows a conversation: the chat reconnects to it and loads its history. */
  select(id: string): void {
    this.set({ drawerOpen: false });
    this.chat.open(id);
  }

  async rename(id: string, title: string): Promise<boolean> {
    const result = await this.api.rename(id, title.trim(), this.bearer(id));
    if (!result.ok) {
      if (result.failure.kind === 'not_found') await this.dropped(id);
      else this.set({ error: `Could not rename: ${result.failure.message}` });
      return false;
    }
    this.setItems((items) => withTitle(items, id, result.value.title ?? null));
    this.set({ error: null });
    return true;
  }

  /** Deletes a conversation (the user confirmed); the chat moves to another one. */
  async delete(id: string): Promise<boolean> {
    const result = await this.api.remove(id, this.bearer(id));
    if (!result.ok && result.failure.kind !== 'not_found') {
      this.set({ error: `Could not delete: ${result.failure.message}` });
      return false;
    }
    await this.dropped(id);
    return true;
  }

  /** `id` is gone (deleted here or elsewhere): out of the list; if shown, show another. */
  private async dropped(id: string): Promise<void> {
    const next = neighbour(this.view.items, id);
    this.setItems((items) => without(items, id));
    const shown = this.chat.getSnapshot();
    if (shown.token !== id && shown.token !== null) return;
    if (next) this.chat.open(next);
    else await this.newChat();
  }

  dismissError(): void {
    this.set({ error: null });
  }

  openDrawer(): void {
    this.set({ drawerOpen: true });
  }

  closeDrawer(): void {
    this.set({ drawerOpen: false });
  }

  // --- From the chat ----------------------------------------------------------------------

  private onLoaded(doc: SessionDocument): void {
    if (this.view.mode === 'anonymous' && doc.name) this.write(NAME_KEY, doc.name);
    const item = fromDocument(doc);
    this.setItems((items) => {
      const old = items.find((i) => i.id === item.id);
      return old ? upsert(items, { ...old, title: item.title ?? old.title }) : items;
    });
  }

  /** A message was stored: the conversation moves up; its first one gives it a title. */
  private onActive(id: string, timestamp: string): void {
    this.setItems((items) => touch(items, id, timestamp));
    const item = this.view.items.find((i) => i.id === id);
    if (item && item.title === null && !this.titleAsked.has(id)) {
      this.titleAsked.add(id);
      void this.api.get(id, this.bearer(id)).then((result) => {
        if (result.ok && result.value.title) {
          const title = result.value.title;
          this.setItems((items) => withTitle(items, id, title));
        }
      });
    }
  }

  // --- Helpers ----------------------------------------------------------------------------

  /** The key opens the account's conversations; an anonymous one opens with its own token. */
  private bearer(id: string): string {
    return this.key ?? id;
  }

  private read(key: string): string | null {
    try {
      return this.storage?.getItem(key) ?? null;
    } catch {
      return null; // storage blocked: nothing kept
    }
  }

  private write(key: string, value: string): void {
    try {
      this.storage?.setItem(key, value);
    } catch {
      // storage blocked or full: the list just won't survive a reload
    }
  }

  private remove(key: string): void {
    try {
      this.storage?.removeItem(key);
    } catch {
      // storage blocked
    }
  }
}

/** The browser's localStorage, or null where it is blocked. */
export function browserStorage(): StorageLike | null {
  try {
    return window.localStorage;
  } catch {
    return null;
  }
}
