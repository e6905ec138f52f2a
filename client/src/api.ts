// The two HTTP calls, with every failure turned into words a person can act on.

import type { SessionDocument } from './protocol';

export type ApiFailure =
  | { kind: 'invalid'; message: string } // 400 on POST /token: the server's own words
  | { kind: 'expired'; message: string } // 400 on GET /refresh_token
  | { kind: 'rate_limited'; message: string; retryAfter: number }
  | { kind: 'server'; message: string; status: number }
  | { kind: 'network'; message: string };

export type ApiResult = { ok: true; session: SessionDocument } | { ok: false; failure: ApiFailure };

export const EXPIRED_TEXT = 'Your session expired. Start a new chat.';
const NETWORK_TEXT = 'Could not reach the server. Check your connection and try again.';

/** FastAPI's `detail` in its three shapes: a string, `{loc, msg}`, or a list of those. */
export function detailText(body: unknown): string {
  if (typeof body !== 'object' || body === null) return '';
  const detail = (body as { detail?: unknown }).detail;
  if (typeof detail === 'string') return detail;
  const msgOf = (d: unknown): string =>
    typeof d === 'object' && d !== null && typeof (d as { msg?: unknown }).msg === 'string'
      ? (d as { msg: string }).msg
      : JSON.stringify(d);
  if (Array.isArray(detail)) return detail.map(msgOf).join('; ');
  if (detail !== undefined && detail !== null) return msgOf(detail);
  return '';
}

async function call(
  fetchFn: typeof fetch,
  method: string,
  url: string,
  on400: 'invalid' | 'expired',
): Promise<ApiResult> {
  let response: Response;
  try {
    response = await fetchFn(url, { method, headers: { Accept: 'application/json' } });
  } catch {
    return { ok: false, failure: { kind: 'network', message: NETWORK_TEXT } };
  }
  let body: unknown = null;
  try {
    body = await response.json();
  } catch {
    // an empty or non-JSON body (a proxy's error page): described by the status below
  }
  if (response.ok) return { ok: true, session: body as SessionDocument };
  const detail = detailText(body);
  if (response.status === 400) {
    return on400 === 'expired'
      ? { ok: false, failure: { kind: 'expired', message: EXPIRED_TEXT } }
      : { ok: false, failure: { kind: 'invalid', message: detail || 'Enter a valid name' } };
  }
  if (response.status === 429) {
    const header = Number.parseInt(response.headers.get('Retry-After') ?? '', 10);
    const retryAfter = Number.isFinite(header) && header > 0 ? header : 5;
    const message = detail || `Too many requests: try again in ${retryAfter} s`;
    return { ok: false, failure: { kind: 'rate_limited', message, retryAfter } };
  }
  const message =
    response.status >= 500
      ? `The server is having trouble (HTTP ${response.status}). Try again in a moment.`
      : `The server refused the request (HTTP ${response.status})${detail ? `: ${detail}` : ''}`;
  return { ok: false, failure: { kind: 'server', message, status: response.status } };
}

export function createSession(fetchFn: typeof fetch, base: string, name: string): Promise<ApiResult> {
  return call(fetchFn, 'POST', `${base}/token?name=${encodeURIComponent(name)}`, 'invalid');
}

export function refreshSession(
  fetchFn: typeof fetch,
  base: string,
  token: string,
): Promise<ApiResult> {
  return call(fetchFn, 'GET', `${base}/refresh_token?token=${encodeURIComponent(token)}`, 'expired');
}
