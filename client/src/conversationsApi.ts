// The API v1 calls the sidebar makes (docs/protocol.md "API v1"): accounts and conversations.
// Each answer is either the body or a failure in words; 404 and 401 keep their own kinds,
// because the sidebar acts on them (a conversation that is gone, a key that is not valid).

import { detailText } from './api';
import type { SessionDocument } from './protocol';

export type V1Failure =
  | { kind: 'not_found'; message: string } // 404: gone, or not ours (never 403)
  | { kind: 'unauthorized'; message: string } // 401: the key is unknown or revoked
  | { kind: 'invalid'; message: string } // 400: the server's own words
  | { kind: 'forbidden'; message: string } // 403: registration is closed
  | { kind: 'rate_limited'; message: string; retryAfter: number }
  | { kind: 'server'; message: string; status: number }
  | { kind: 'network'; message: string };

export type V1Result<T> = { ok: true; value: T } | { ok: false; failure: V1Failure };

export interface User {
  user_id: string;
  name: string;
  created: string;
}

export interface Registration extends User {
  api_key: string;
}

export interface ConversationRow {
  conversation_id: string;
  title?: string | null;
  created: string;
  updated: string;
  message_count: number;
}

export interface ConversationPage {
  conversations: ConversationRow[];
  next_cursor: string | null;
}

const NETWORK_TEXT = 'Could not reach the server. Check your connection and try again.';

interface Options {
  /** An API key or, for an anonymous conversation, its own token. */
  bearer?: string | null;
  body?: unknown;
}

/** One v1 request; the failure says what went wrong in words a person can act on. */
export async function v1<T>(
  fetchFn: typeof fetch,
  method: string,
  url: string,
  { bearer, body }: Options = {},
): Promise<V1Result<T>> {
  const headers: Record<string, string> = { Accept: 'application/json' };
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response: Response;
  try {
    response = await fetchFn(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    return { ok: false, failure: { kind: 'network', message: NETWORK_TEXT } };
  }
  let parsed: unknown = null;
  if (response.status !== 204) {
    try {
      parsed = await response.json();
    } catch {
      // no JSON body (a proxy's error page): described by the status below
    }
  }
  if (response.ok) return { ok: true, value: parsed as T };
  return { ok: false, failure: failureOf(response, detailText(parsed)) };
}

function failureOf(response: Response, detail: string): V1Failure {
  switch (response.status) {
    case 400:
    case 422:
      return { kind: 'invalid', message: detail || 'The server refused the request' };
    case 401:
      return { kind: 'unauthorized', message: 'That API key is not valid.' };
    case 403:
      return { kind: 'forbidden', message: detail || 'Not allowed.' };
    case 404:
      return { kind: 'not_found', message: detail || 'Conversation not found' };
    case 429: {
      const header = Number.parseInt(response.headers.get('Retry-After') ?? '', 10);
      const retryAfter = Number.isFinite(header) && header > 0 ? header : 5;
      const message = detail || `Too many requests: try again in ${retryAfter} s`;
      return { kind: 'rate_limited', message, retryAfter };
    }
    default:
      return {
        kind: 'server',
        status: response.status,
        message:
          response.status >= 500
            ? `The server is having trouble (HTTP ${response.status}). Try again in a moment.`
            : `The server refused the request (HTTP ${response.status})${detail ? `: ${detail}` : ''}`,
      };
  }
}

/** The v1 routes, bound to one fetch and base URL. */
export class ConversationsApi {
  constructor(
    private readonly fetchFn: typeof fetch,
    private readonly base: string,
  ) {}

  register(name: string): Promise<V1Result<Registration>> {
    return v1(this.fetchFn, 'POST', `${this.base}/v1/users`, { body: { name } });
  }

  me(key: string): Promise<V1Result<User>> {
    return v1(this.fetchFn, 'GET', `${this.base}/v1/users/me`, { bearer: key });
  }

  /** A new conversation: owned by the key's user, or anonymous without a key. */
  create(name: string, key: string | null): Promise<V1Result<SessionDocument>> {
    return v1(this.fetchFn, 'POST', `${this.base}/v1/conversations`, { bearer: key, body: { name } });
  }

  list(key: string, cursor: string | null): Promise<V1Result<ConversationPage>> {
    const query = cursor ? `?cursor=${encodeURIComponent(cursor)}` : '';
    return v1(this.fetchFn, 'GET', `${this.base}/v1/conversations${query}`, { bearer: key });
  }

  get(id: string, bearer: string): Promise<V1Result<SessionDocument>> {
    return v1(this.fetchFn, 'GET', this.path(id), { bearer });
  }

  rename(id: string, title: string, bearer: string): Promise<V1Result<SessionDocument>> {
    return v1(this.fetchFn, 'PATCH', this.path(id), { bearer, body: { title } });
  }

  remove(id: string, bearer: string): Promise<V1Result<null>> {
    return v1(this.fetchFn, 'DELETE', this.path(id), { bearer });
  }

  private path(id: string): string {
    return `${this.base}/v1/conversations/${encodeURIComponent(id)}`;
  }
}
