// The conversation as pure data: every socket event and every history load is a function
// from one state to the next, so ordering and de-duplication are tested without a browser.

import type {
  AckEvent,
  CommandEvent,
  ErrorEvent,
  MessageEvent,
  NoticeEvent,
  StoredMessage,
  TokenEvent,
} from './protocol';
import { KNOWN_NOTICES } from './protocol';

export type EntryStatus =
  | 'sending' // ours, sent on the socket, no ack yet
  | 'failed' // ours, not stored (error event or connection lost before the ack)
  | 'sent' // a stored human message
  | 'streaming' // a reply being generated (token events)
  | 'done' // a final reply
  | 'stopped' // a final reply cut by a stop
  | 'error' // a final error answer
  | 'command'; // ours, a slash command the server answered (never stored)

export interface Entry {
  /** Stable key for rendering: the client id of our own messages, else the server id. */
  key: string;
  id?: string;
  source: 'human' | 'bot';
  text: string;
  timestamp?: string;
  replyTo?: string;
  clientId?: string;
  status: EntryStatus;
  error?: { code: string; detail: string };
  /** Why our message was not stored. */
  failReason?: string;
  /** A slash command's answer. */
  commandReply?: string;
  /** A final reply: prompt plus completion tokens, when the server counted them. */
  tokensUsed?: number;
}

export interface ChatState {
  entries: Entry[];
  /** Info lines on human messages (e.g. "queued"), by message id, cleared by the reply. */
  notices: Record<string, string>;
}

export const emptyState: ChatState = { entries: [], notices: {} };

const FINAL: ReadonlySet<EntryStatus> = new Set(['done', 'stopped', 'error']);
export const isFinal = (e: Entry): boolean => FINAL.has(e.status);

function replace(state: ChatState, index: number, entry: Entry): ChatState {
  const entries = state.entries.slice();
  entries[index] = entry;
  return { ...state, entries };
}

function append(state: ChatState, entry: Entry): ChatState {
  return { ...state, entries: [...state.entries, entry] };
}

function withoutNotice(state: ChatState, humanId: string | undefined): ChatState {
  if (humanId === undefined || !(humanId in state.notices)) return state;
  const notices = { ...state.notices };
  delete notices[humanId];
  return { ...state, notices };
}

/** The bot entry for an event: by reply id, else the one answering the same message. */
function findBot(state: ChatState, id: string | undefined, replyTo: string | undefined): number {
  if (id !== undefined) {
    const byId = state.entries.findIndex((e) => e.source === 'bot' && e.id === id);
    if (byId >= 0) return byId;
  }
  if (replyTo === undefined) return -1;
  return state.entries.findIndex((e) => e.source === 'bot' && e.replyTo === replyTo);
}

/** Our own message, shown before the server has acknowledged it. */
export function addLocal(state: ChatState, clientId: string, text: string, now: string): ChatState {
  return append(state, {
    key: clientId,
    clientId,
    source: 'human',
    text,
    timestamp: now,
    status: 'sending',
  });
}

export function applyAck(state: ChatState, ev: AckEvent): ChatState {
  const known = state.entries.findIndex((e) => e.source === 'human' && e.id === ev.id);
  if (known >= 0) return state;
  const mine =
    ev.client_id === undefined
      ? -1
      : state.entries.findIndex((e) => e.source === 'human' && e.clientId === ev.client_id);
  if (mine >= 0) {
    const entry = state.entries[mine];
    return replace(state, mine, {
      ...entry,
      id: ev.id,
      text: ev.msg,
      timestamp: ev.timestamp,
      status: 'sent',
      failReason: undefined,
    });
  }
  // Another tab's message on the same session.
  return append(state, {
    key: ev.id,
    id: ev.id,
    source: 'human',
    text: ev.msg,
    timestamp: ev.timestamp,
    status: 'sent',
  });
}

export function applyToken(state: ChatState, ev: TokenEvent): ChatState {
  const index = findBot(state, ev.id, ev.reply_to);
  if (index < 0) {
    return append(state, {
      key: ev.id,
      id: ev.id,
      source: 'bot',
      text: ev.delta,
      replyTo: ev.reply_to,
      status: 'streaming',
    });
  }
  const entry = state.entries[index];
  if (isFinal(entry)) return state; // a late token after the final reply
  // A different id for the same message: a worker died and another restarted the reply.
  const text = entry.id === ev.id ? entry.text + ev.delta : ev.delta;
  return replace(state, index, { ...entry, id: ev.id, text, status: 'streaming' });
}

export function applyFinal(state: ChatState, ev: MessageEvent): ChatState {
  const index = findBot(state, ev.id, ev.reply_to);
  const entry: Entry = {
    key: index >= 0 ? state.entries[index].key : ev.id,
    id: ev.id,
    source: 'bot',
    text: ev.msg,
    timestamp: ev.timestamp,
    replyTo: ev.reply_to,
    status: ev.stopped === true ? 'stopped' : 'done',
    tokensUsed: ev.tokens_used,
  };
  const next = index >= 0 ? replace(state, index, entry) : append(state, entry);
  return withoutNotice(next, ev.reply_to);
}

/** An error that answers a message (it has `reply_to`): the final answer to that message. */
export function applyReplyError(state: ChatState, ev: ErrorEvent): ChatState {
  const replyTo = ev.reply_to;
  if (replyTo === undefined) return state;
  const index = findBot(state, undefined, replyTo);
  const previous = index >= 0 ? state.entries[index] : undefined;
  const entry: Entry = {
    key: previous?.key ?? `error-${replyTo}`,
    id: previous?.id,
    source: 'bot',
    text: '',
    timestamp: previous?.timestamp ?? new Date().toISOString(),
    replyTo,
    status: 'error',
    error: { code: ev.code, detail: ev.detail },
  };
  const next = index >= 0 ? replace(state, index, entry) : append(state, entry);
  return withoutNotice(next, replyTo);
}

/**
 * An error without `reply_to` about a message we sent: the oldest of our messages still
 * waiting for its ack was not stored (the server handles a socket's frames in order).
 */
/**
 * A send error: the message the error names by `client_id`, or, for an error that names none
 * (an older server, a plain-text frame), the oldest of ours still waiting for its ack.
 */
export function failSending(state: ChatState, reason: string, clientId?: string): ChatState {
  const index = refusedIndex(state, clientId);
  if (index < 0) return state;
  return replace(state, index, { ...state.entries[index], status: 'failed', failReason: reason });
}

/** Which of our messages a send error refuses (see failSending); -1 when none. */
export function refusedIndex(state: ChatState, clientId?: string): number {
  return state.entries.findIndex(
    (e) => e.status === 'sending' && (clientId === undefined || e.clientId === clientId),
  );
}

/**
 * After a reconnect and history merge: our messages sent on a socket that closed before
 * their ack (and not found in the history) were not stored.
 */
export function failLost(state: ChatState, clientIds: ReadonlySet<string>, reason: string): ChatState {
  const lost = (e: Entry): boolean =>
    e.status === 'sending' && e.clientId !== undefined && clientIds.has(e.clientId);
  if (!state.entries.some(lost)) return state;
  return {
    ...state,
    entries: state.entries.map((e) =>
      lost(e) ? { ...e, status: 'failed' as const, failReason: reason } : e,
    ),
  };
}

/**
 * A slash command's answer: our message that was the command (named by `client_id`, else our
 * oldest unacknowledged `/…`) shows it; with none left (a `/reset` already emptied the
 * conversation) the command and its answer are added.
 */
export function applyCommand(state: ChatState, ev: CommandEvent): ChatState {
  const isCommand = (e: Entry): boolean =>
    e.status === 'sending' &&
    (ev.client_id !== undefined
      ? e.clientId === ev.client_id
      : e.text.startsWith('/') && !e.text.startsWith('//'));
  const index = state.entries.findIndex(isCommand);
  if (index >= 0) {
    return replace(state, index, { ...state.entries[index], status: 'command', commandReply: ev.detail });
  }
  const key = `command-${ev.client_id ?? state.entries.length}`;
  return append(state, {
    key,
    clientId: ev.client_id,
    source: 'human',
    text: `/${ev.command}`,
    timestamp: new Date().toISOString(),
    status: 'command',
    commandReply: ev.detail,
  });
}

/** Takes one of our failed messages out of the conversation (to send it again). */
export function removeEntry(state: ChatState, key: string): ChatState {
  return { ...state, entries: state.entries.filter((e) => e.key !== key) };
}

export function applyNotice(state: ChatState, ev: NoticeEvent): ChatState {
  if (!KNOWN_NOTICES.has(ev.code) || ev.reply_to === undefined) return state;
  const answered = state.entries.some(
    (e) => e.source === 'bot' && e.replyTo === ev.reply_to && isFinal(e),
  );
  if (answered) return state;
  return { ...state, notices: { ...state.notices, [ev.reply_to]: ev.detail } };
}

function fromStored(m: StoredMessage, key: string): Entry {
  if (m.source === 'human') {
    return { key, id: m.id, source: 'human', text: m.msg, timestamp: m.timestamp, status: 'sent' };
  }
  return {
    key,
    id: m.id,
    source: 'bot',
    text: m.error ? '' : m.msg,
    timestamp: m.timestamp,
    replyTo: m.reply_to,
    status: m.error ? 'error' : m.stopped === true ? 'stopped' : 'done',
    error: m.error,
    tokensUsed: m.tokens_used,
  };
}

/**
 * Merges the stored history (oldest first) into what is shown, de-duplicating by id: stored
 * messages take the server's order and content; what only this page knows (a reply still
 * streaming, our unacknowledged messages) stays after them.
 */
export function mergeHistory(state: ChatState, messages: StoredMessage[]): ChatState {
  const rest = state.entries.slice();
  const take = (index: number): Entry | undefined =>
    index >= 0 ? rest.splice(index, 1)[0] : undefined;
  const stored: Entry[] = [];
  for (const m of messages) {
    let previous: Entry | undefined;
    if (m.source === 'human') {
      previous =
        take(rest.findIndex((e) => e.source === 'human' && e.id === m.id)) ??
        // Our message whose ack was lost with the connection: the history has it.
        take(rest.findIndex((e) => e.status === 'sending' && e.text === m.msg));
    } else {
      previous =
        take(rest.findIndex((e) => e.source === 'bot' && e.id === m.id)) ??
        take(rest.findIndex((e) => e.source === 'bot' && e.replyTo === m.reply_to));
    }
    const entry = fromStored(m, previous?.key ?? m.id);
    if (previous?.clientId !== undefined) entry.clientId = previous.clientId;
    stored.push(entry);
  }
  let next: ChatState = { ...state, entries: [...stored, ...rest] };
  for (const m of messages) {
    if (m.source === 'bot') next = withoutNotice(next, m.reply_to);
  }
  return next;
}

/**
 * Display order: each reply right after the message it answers (replies are matched by
 * `reply_to`, so `h1 h2 b1 b2` shows as h1 b1 h2 b2); a reply whose message is not in the
 * history (dropped by the history cap) keeps its own place.
 */
export function arrange(entries: readonly Entry[]): Entry[] {
  const humans = new Set(entries.filter((e) => e.source === 'human' && e.id).map((e) => e.id));
  const replies = new Map<string, Entry[]>();
  for (const e of entries) {
    if (e.source === 'bot' && e.replyTo !== undefined && humans.has(e.replyTo)) {
      const list = replies.get(e.replyTo) ?? [];
      list.push(e);
      replies.set(e.replyTo, list);
    }
  }
  const out: Entry[] = [];
  for (const e of entries) {
    if (e.source === 'bot' && e.replyTo !== undefined && humans.has(e.replyTo)) continue;
    out.push(e);
    if (e.source === 'human' && e.id !== undefined) out.push(...(replies.get(e.id) ?? []));
  }
  return out;
}

/**
 * Human messages still waiting for their final answer. Replies come in the order messages
 * were sent, so a stored message without a reply followed by an answered one was answered
 * too (its reply was dropped by the history cap): it is not waiting.
 */
export function awaitingIds(state: ChatState): string[] {
  const answered = new Set(
    state.entries.filter((e) => e.source === 'bot' && isFinal(e)).map((e) => e.replyTo),
  );
  const humans = state.entries.filter((e) => e.source === 'human' && e.status === 'sent');
  let lastAnswered = -1;
  humans.forEach((h, i) => {
    if (answered.has(h.id)) lastAnswered = i;
  });
  return humans
    .slice(lastAnswered + 1)
    .filter((h) => h.id !== undefined && !answered.has(h.id))
    .map((h) => h.id as string);
}

export interface Activity {
  /** Something of ours is not answered yet: offer Stop. */
  generating: boolean;
  /** The bot is working but no text has arrived yet: show the typing indicator. */
  typing: boolean;
}

export function activity(state: ChatState): Activity {
  const waiting = awaitingIds(state);
  const sending = state.entries.some((e) => e.status === 'sending');
  const streamingFor = new Set(
    state.entries.filter((e) => e.status === 'streaming').map((e) => e.replyTo),
  );
  return {
    generating: sending || waiting.length > 0,
    typing: sending || (waiting.length > 0 && !waiting.some((id) => streamingFor.has(id))),
  };
}
