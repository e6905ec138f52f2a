// The wire contract as the page sees it: docs/protocol.md, the project's own contract (events,
// notices, error codes, rate and connection limits, close codes).

export type Source = 'human' | 'bot';

export interface ReplyError {
  code: string;
  detail: string;
}

/** A message as stored in the session document (`/token`, `/refresh_token`). */
export interface StoredMessage {
  id: string;
  source: Source;
  msg: string;
  timestamp: string;
  reply_to?: string;
  stopped?: boolean;
  error?: ReplyError;
  /** Bot replies: prompt plus completion tokens. */
  tokens_used?: number;
}

/** A session, which is also a conversation (API v1): its id is the token. */
export interface SessionDocument {
  token: string;
  name: string;
  session_start: string;
  messages: StoredMessage[];
  /** Set from the first message unless the user set one. */
  title?: string | null;
  /** The owning account; absent for an anonymous conversation. */
  user_id?: string | null;
}

export interface AckEvent {
  type: 'ack';
  id: string;
  msg: string;
  timestamp: string;
  client_id?: string;
}

export interface TokenEvent {
  type: 'token';
  id: string;
  reply_to: string;
  delta: string;
}

export interface MessageEvent {
  type: 'message';
  id: string;
  reply_to: string;
  source: 'bot';
  msg: string;
  timestamp: string;
  stopped?: boolean;
  tokens_used?: number;
}

export interface ErrorEvent {
  type: 'error';
  code: string;
  detail: string;
  reply_to?: string;
  retry_after?: number;
  /** The refused message command's `client_id`, when it had one. */
  client_id?: string;
}

export interface NoticeEvent {
  type: 'notice';
  code: string;
  detail: string;
  reply_to?: string;
}

/** A change to the conversation itself (API or slash command), sent to all its sockets. */
export interface ConversationEvent {
  type: 'conversation';
  change: 'title' | 'reset' | 'deleted';
  title?: string | null;
}

/** The answer to a slash command (`/help`, `/title …`), to the sending socket only. */
export interface CommandEvent {
  type: 'command';
  command: string;
  detail: string;
  title?: string | null;
  /** The `message` command's own, when it had one. */
  client_id?: string;
}

export type ServerEvent =
  | CommandEvent
  | AckEvent
  | TokenEvent
  | MessageEvent
  | ErrorEvent
  | NoticeEvent
  | ConversationEvent;

const CHANGES = new Set(['title', 'reset', 'deleted']);

/** Notice codes the page knows; any other notice is ignored, as the protocol asks. */
export const KNOWN_NOTICES = new Set(['queued']);

/** Errors without `reply_to` that mean "the message you just sent was not stored". */
export const SEND_ERRORS = new Set([
  'bad_request',
  'too_large',
  'rate_limited',
  'service_unavailable',
]);

export const CLOSE_POLICY = 1008;
export const CLOSE_TOO_BIG = 1009;
export const CLOSE_RESYNC = 1012;
export const CLOSE_TOO_SLOW = 1013;

const isString = (v: unknown): v is string => typeof v === 'string';

/** Parses one server frame; null for anything that is not a known, well-formed event. */
export function parseEvent(data: unknown): ServerEvent | null {
  if (!isString(data)) return null;
  let value: unknown;
  try {
    value = JSON.parse(data);
  } catch {
    return null;
  }
  if (typeof value !== 'object' || value === null) return null;
  const e = value as Record<string, unknown>;
  switch (e.type) {
    case 'ack':
      return isString(e.id) && isString(e.msg) ? (e as unknown as AckEvent) : null;
    case 'token':
      return isString(e.id) && isString(e.reply_to) && isString(e.delta)
        ? (e as unknown as TokenEvent)
        : null;
    case 'message':
      return isString(e.id) && isString(e.reply_to) && isString(e.msg)
        ? (e as unknown as MessageEvent)
        : null;
    case 'error':
      return isString(e.code) ? ({ detail: '', ...e } as unknown as ErrorEvent) : null;
    case 'notice':
      return isString(e.code) ? ({ detail: '', ...e } as unknown as NoticeEvent) : null;
    case 'command':
      return isString(e.command) ? ({ detail: '', ...e } as unknown as CommandEvent) : null;
    case 'conversation':
      return isString(e.change) && CHANGES.has(e.change) && (e.title == null || isString(e.title))
        ? (e as unknown as ConversationEvent)
        : null;
    default:
      return null;
  }
}
