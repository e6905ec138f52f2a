// Stand-ins for the browser's WebSocket and fetch, driven step by step by the tests.

import { vi } from 'vitest';
import { ChatClient, type SocketLike } from '../chatClient';
import { ConversationsApi } from '../conversationsApi';
import { Sidebar } from '../sidebar';
import type { SessionDocument, StoredMessage } from '../protocol';

export class FakeSocket implements SocketLike {
  readyState = 0;
  sent: string[] = [];
  closedByClient: number | null = null;
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;

  constructor(readonly url: string) {}

  send(data: string): void {
    if (this.readyState !== 1) throw new Error('send on a socket that is not open');
    this.sent.push(data);
  }

  close(code = 1000): void {
    this.closedByClient = code;
    this.readyState = 3;
  }

  // --- what the server does ---
  open(): void {
    this.readyState = 1;
    this.onopen?.({});
  }

  emit(event: object): void {
    this.onmessage?.({ data: JSON.stringify(event) });
  }

  drop(code = 1006, reason = ''): void {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  sentJson(): unknown[] {
    return this.sent.map((s) => JSON.parse(s) as unknown);
  }
}

type Reply = { status: number; body?: unknown; headers?: Record<string, string> } | 'network';

export interface SeenRequest {
  method: string;
  path: string;
  /** The `Authorization` header, if any. */
  authorization: string | null;
  body: unknown;
}

/**
 * A fetch whose answers the test queues per path (`/token`, `/refresh_token`), or per method
 * and path (`DELETE /v1/conversations/x`), which is looked up first.
 */
export class FakeServer {
  sockets: FakeSocket[] = [];
  calls: string[] = [];
  requests: SeenRequest[] = [];
  private replies = new Map<string, Reply[]>();
  private fallback = new Map<string, Reply>();

  answer(path: string, ...replies: Reply[]): void {
    this.replies.set(path, [...(this.replies.get(path) ?? []), ...replies]);
  }

  /** The answer once the queued ones are used up. */
  always(path: string, reply: Reply): void {
    this.fallback.set(path, reply);
  }

  fetch = vi.fn(async (input: RequestInfo | URL, init?: RequestInit): Promise<Response> => {
    const url = new URL(String(input), 'http://page.test');
    const method = init?.method ?? 'GET';
    this.calls.push(`${method} ${url.pathname}${url.search}`);
    const headers = new Headers(init?.headers);
    this.requests.push({
      method,
      path: `${url.pathname}${url.search}`,
      authorization: headers.get('Authorization'),
      body: typeof init?.body === 'string' ? (JSON.parse(init.body) as unknown) : undefined,
    });
    const reply = this.next(`${method} ${url.pathname}`) ?? this.next(url.pathname);
    if (!reply) throw new Error(`no answer queued for ${method} ${url.pathname}`);
    if (reply === 'network') throw new TypeError('Failed to fetch');
    // A minimal Response: settles in microtasks only, so fake timers stay in control.
    const { status, body } = reply;
    return {
      ok: status >= 200 && status < 300,
      status,
      headers: new Headers(reply.headers),
      json: async () => {
        if (body === undefined) throw new SyntaxError('Unexpected end of JSON input');
        return body;
      },
    } as unknown as Response;
  });

  private next(key: string): Reply | undefined {
    return this.replies.get(key)?.shift() ?? this.fallback.get(key);
  }

  get socket(): FakeSocket {
    const last = this.sockets[this.sockets.length - 1];
    if (!last) throw new Error('no socket opened');
    return last;
  }

  makeClient(storage: Storage = window.localStorage): ChatClient {
    let n = 0;
    return new ChatClient({
      openSocket: (url) => {
        const ws = new FakeSocket(url);
        this.sockets.push(ws);
        return ws;
      },
      fetch: this.fetch as unknown as typeof fetch,
      storage,
      httpBase: '',
      wsBase: 'ws://page.test',
      newClientId: () => `c${++n}`,
    });
  }

  /** The chat client and the conversation list beside it, as the page wires them. */
  makeApp(storage: Storage = window.localStorage): { client: ChatClient; sidebar: Sidebar } {
    const client = this.makeClient(storage);
    const api = new ConversationsApi(this.fetch as unknown as typeof fetch, '');
    return { client, sidebar: new Sidebar(client, api, storage) };
  }

  /** The requests made to `method path` (path without the query). */
  made(method: string, path: string): SeenRequest[] {
    return this.requests.filter((r) => r.method === method && r.path.split('?')[0] === path);
  }
}

export const TOKEN = '69a68d0c-1547-41ee-8b49-8e56d609ca33';

export function session(
  messages: StoredMessage[] = [],
  name = 'Ann',
  extra: Partial<SessionDocument> = {},
): SessionDocument {
  return { token: TOKEN, name, session_start: '2026-11-23T13:00:00.000000Z', messages, ...extra };
}

export const human = (id: string, msg: string, ts = '2026-11-23T13:00:01.000000Z'): StoredMessage => ({
  id,
  source: 'human',
  msg,
  timestamp: ts,
});

export const bot = (
  id: string,
  replyTo: string,
  msg: string,
  extra: Partial<StoredMessage> = {},
): StoredMessage => ({
  id,
  source: 'bot',
  msg,
  reply_to: replyTo,
  timestamp: '2026-11-23T13:00:02.000000Z',
  ...extra,
});

/** Lets pending promises (fetch answers) settle. */
export async function flush(): Promise<void> {
  for (let i = 0; i < 20; i++) await Promise.resolve();
}
