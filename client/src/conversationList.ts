// The sidebar's list as pure data: rows from the server or from this browser's own tokens,
// newest activity first, so the list logic is tested without a DOM or a server.

import type { ConversationRow } from './conversationsApi';
import type { SessionDocument } from './protocol';

export interface ConversationItem {
  /** The conversation id, which is its session token. */
  id: string;
  /** null until the first message (or the user) sets one. */
  title: string | null;
  /** Last activity (ISO 8601): the list's order. */
  updated: string;
}

export const UNTITLED = 'Untitled chat';

export const displayTitle = (item: { title: string | null }): string => item.title || UNTITLED;

/** A session document as a row: its last activity is its newest message, else its start. */
export function fromDocument(doc: SessionDocument): ConversationItem {
  const last = doc.messages[doc.messages.length - 1];
  return { id: doc.token, title: doc.title ?? null, updated: last?.timestamp ?? doc.session_start };
}

export function fromRow(row: ConversationRow): ConversationItem {
  return { id: row.conversation_id, title: row.title ?? null, updated: row.updated };
}

const time = (iso: string): number => {
  const t = Date.parse(iso);
  return Number.isNaN(t) ? 0 : t;
};

/** Newest activity first; equal times keep their order (sort is stable). */
export function byActivity(items: readonly ConversationItem[]): ConversationItem[] {
  return items.slice().sort((a, b) => time(b.updated) - time(a.updated));
}

/** Adds the item, or replaces the one with its id, and keeps the order. */
export function upsert(items: readonly ConversationItem[], item: ConversationItem): ConversationItem[] {
  return byActivity([item, ...items.filter((i) => i.id !== item.id)]);
}

export function without(items: readonly ConversationItem[], id: string): ConversationItem[] {
  return items.filter((i) => i.id !== id);
}

export function withTitle(
  items: readonly ConversationItem[],
  id: string,
  title: string | null,
): ConversationItem[] {
  return items.map((i) => (i.id === id ? { ...i, title } : i));
}

/** A message was stored at `timestamp`: the conversation moves up (never back in time). */
export function touch(
  items: readonly ConversationItem[],
  id: string,
  timestamp: string,
): ConversationItem[] {
  const item = items.find((i) => i.id === id);
  if (!item || time(timestamp) <= time(item.updated)) return items.slice();
  return upsert(items, { ...item, updated: timestamp });
}

/**
 * The next page of `GET /v1/conversations` after what is shown. A conversation active between
 * two page loads can come again on the next page: the newer row wins, once.
 */
export function appendPage(
  items: readonly ConversationItem[],
  rows: readonly ConversationRow[],
): ConversationItem[] {
  let next = items.slice();
  for (const row of rows) {
    const item = fromRow(row);
    const old = next.find((i) => i.id === item.id);
    if (!old) next.push(item);
    else if (time(item.updated) >= time(old.updated)) next = next.map((i) => (i.id === item.id ? item : i));
  }
  return next;
}

/** What to show after `id` goes: the one below it, else the one above, else none. */
export function neighbour(items: readonly ConversationItem[], id: string): string | null {
  const index = items.findIndex((i) => i.id === id);
  const rest = without(items, id);
  if (rest.length === 0) return null;
  return rest[Math.min(Math.max(index, 0), rest.length - 1)].id;
}

// --- This browser's anonymous tokens (localStorage) ---------------------------------------

const isItem = (v: unknown): v is ConversationItem => {
  if (typeof v !== 'object' || v === null) return false;
  const o = v as Record<string, unknown>;
  return (
    typeof o.id === 'string' &&
    o.id !== '' &&
    (o.title === null || typeof o.title === 'string') &&
    typeof o.updated === 'string'
  );
};

/** The stored list; anything unreadable (hand-edited, an older format) is skipped. */
export function parseStored(raw: string | null): ConversationItem[] {
  if (!raw) return [];
  let value: unknown;
  try {
    value = JSON.parse(raw);
  } catch {
    return [];
  }
  if (!Array.isArray(value)) return [];
  const seen = new Set<string>();
  const items: ConversationItem[] = [];
  for (const v of value) {
    if (isItem(v) && !seen.has(v.id)) {
      seen.add(v.id);
      items.push({ id: v.id, title: v.title, updated: v.updated });
    }
  }
  return byActivity(items);
}

export function serialize(items: readonly ConversationItem[]): string {
  return JSON.stringify(items.map(({ id, title, updated }) => ({ id, title, updated })));
}
