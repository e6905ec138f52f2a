import { describe, expect, it } from 'vitest';
import {
  activity,
  addLocal,
  applyAck,
  applyCommand,
  applyFinal,
  applyNotice,
  applyReplyError,
  applyToken,
  arrange,
  awaitingIds,
  type ChatState,
  emptyState,
  failLost,
  failSending,
  mergeHistory,
} from './chatState';
import { bot, human } from './test/fakes';

const T = '2026-11-23T13:00:00.000000Z';
const ack = (id: string, msg: string, client_id?: string) =>
  ({ type: 'ack', id, msg, timestamp: T, ...(client_id ? { client_id } : {}) }) as const;
const token = (id: string, reply_to: string, delta: string) =>
  ({ type: 'token', id, reply_to, delta }) as const;
const final = (id: string, reply_to: string, msg: string, stopped?: boolean) =>
  ({
    type: 'message',
    id,
    reply_to,
    source: 'bot',
    msg,
    timestamp: T,
    ...(stopped ? { stopped } : {}),
  }) as const;

const texts = (s: ChatState) => arrange(s.entries).map((e) => `${e.source}:${e.text}:${e.status}`);

describe('sending and acks', () => {
  it('shows our message at once and matches its ack by client_id', () => {
    let s = addLocal(emptyState, 'c1', 'hello', T);
    expect(texts(s)).toEqual(['human:hello:sending']);
    s = applyAck(s, ack('h1', 'hello', 'c1'));
    expect(s.entries).toHaveLength(1);
    expect(s.entries[0]).toMatchObject({ id: 'h1', status: 'sent', key: 'c1' });
  });

  it("adds another tab's message (an ack we did not ask for)", () => {
    const s = applyAck(addLocal(emptyState, 'c1', 'mine', T), ack('h9', 'theirs', 'other'));
    expect(texts(s)).toEqual(['human:mine:sending', 'human:theirs:sent']);
  });

  it('ignores a repeated ack', () => {
    const once = applyAck(emptyState, ack('h1', 'hi'));
    expect(applyAck(once, ack('h1', 'hi'))).toBe(once);
  });

  it('fails the oldest unacknowledged message on a send error that names none', () => {
    let s = addLocal(addLocal(emptyState, 'c1', 'a', T), 'c2', 'b', T);
    s = failSending(s, 'Too many messages: wait 3 s and send it again');
    expect(s.entries.map((e) => e.status)).toEqual(['failed', 'sending']);
    expect(s.entries[0].failReason).toContain('wait 3 s');
  });

  it('fails the message a send error names by client_id, not the oldest', () => {
    let s = addLocal(addLocal(emptyState, 'c1', 'a', T), 'c2', 'b', T);
    s = failSending(s, 'Too many messages: wait 3 s and send it again', 'c2');
    expect(s.entries.map((e) => e.status)).toEqual(['sending', 'failed']);
  });
});

describe('streaming replies', () => {
  const asked = applyAck(emptyState, ack('h1', 'hi'));

  it('grows token by token, then settles on the final text', () => {
    let s = applyToken(asked, token('b1', 'h1', 'Hel'));
    s = applyToken(s, token('b1', 'h1', 'lo '));
    expect(texts(s)).toEqual(['human:hi:sent', 'bot:Hello :streaming']);
    s = applyFinal(s, final('b1', 'h1', 'Hello'));
    expect(texts(s)).toEqual(['human:hi:sent', 'bot:Hello:done']);
  });

  it('ignores a token that arrives after the final reply', () => {
    const done = applyFinal(applyToken(asked, token('b1', 'h1', 'x')), final('b1', 'h1', 'x y'));
    expect(applyToken(done, token('b1', 'h1', 'late'))).toBe(done);
  });

  it('restarts the text when another worker restarts the reply under a new id', () => {
    let s = applyToken(asked, token('b1', 'h1', 'partial from a dead worker'));
    s = applyToken(s, token('b2', 'h1', 'Fresh'));
    expect(texts(s)).toEqual(['human:hi:sent', 'bot:Fresh:streaming']);
    s = applyFinal(s, final('b2', 'h1', 'Fresh start'));
    expect(s.entries.filter((e) => e.source === 'bot')).toHaveLength(1);
    expect(texts(s)).toEqual(['human:hi:sent', 'bot:Fresh start:done']);
  });

  it('marks a stopped reply, even an empty one', () => {
    const s = applyFinal(asked, final('b1', 'h1', '', true));
    expect(texts(s)).toEqual(['human:hi:sent', 'bot::stopped']);
  });

  it('shows an error answer in place of the partial reply', () => {
    let s = applyToken(asked, token('b1', 'h1', 'half'));
    s = applyReplyError(s, { type: 'error', reply_to: 'h1', code: 'timeout', detail: 'too slow' });
    expect(s.entries[1]).toMatchObject({ status: 'error', error: { code: 'timeout' } });
  });

  it('places replies after their own messages when they interleave (h1 h2 b1 b2)', () => {
    let s = applyAck(applyAck(emptyState, ack('h1', 'one')), ack('h2', 'two'));
    s = applyFinal(s, final('b1', 'h1', 'first'));
    s = applyFinal(s, final('b2', 'h2', 'second'));
    expect(texts(s)).toEqual([
      'human:one:sent',
      'bot:first:done',
      'human:two:sent',
      'bot:second:done',
    ]);
  });
});

describe('history merge', () => {
  it('de-duplicates by id and keeps a reply still streaming', () => {
    let s = applyAck(emptyState, ack('h1', 'one'));
    s = applyFinal(s, final('b1', 'h1', 'first'));
    s = applyAck(s, ack('h2', 'two'));
    s = applyToken(s, token('b2', 'h2', 'stre'));
    s = mergeHistory(s, [human('h1', 'one'), bot('b1', 'h1', 'first'), human('h2', 'two')]);
    expect(texts(s)).toEqual([
      'human:one:sent',
      'bot:first:done',
      'human:two:sent',
      'bot:stre:streaming',
    ]);
  });

  it('adds replies that finished while disconnected and keeps the keys stable', () => {
    let s = applyAck(addLocal(emptyState, 'c1', 'q', T), ack('h1', 'q', 'c1'));
    s = applyToken(s, token('b1', 'h1', 'par'));
    s = mergeHistory(s, [human('h1', 'q'), bot('b1', 'h1', 'partial and done')]);
    expect(texts(s)).toEqual(['human:q:sent', 'bot:partial and done:done']);
    expect(s.entries[0].key).toBe('c1');
  });

  it('matches a stored error entry to the error event it came from', () => {
    let s = applyAck(emptyState, ack('h1', 'q'));
    s = applyReplyError(s, { type: 'error', reply_to: 'h1', code: 'model_error', detail: 'x' });
    s = mergeHistory(s, [
      human('h1', 'q'),
      bot('b1', 'h1', '', { error: { code: 'model_error', detail: 'x' } }),
    ]);
    expect(s.entries.filter((e) => e.source === 'bot')).toHaveLength(1);
    expect(s.entries[1]).toMatchObject({ id: 'b1', status: 'error' });
  });

  it('claims our message whose ack was lost, and fails the ones the server never stored', () => {
    let s = addLocal(addLocal(emptyState, 'c1', 'stored', T), 'c2', 'lost', T);
    s = mergeHistory(s, [human('h1', 'stored')]);
    s = failLost(s, new Set(['c1', 'c2']), 'connection lost');
    expect(texts(s)).toEqual(['human:stored:sent', 'human:lost:failed']);
  });

  it('copes with a capped history that starts with a bot message', () => {
    const s = mergeHistory(emptyState, [
      bot('b0', 'gone', 'orphan reply'),
      human('h1', 'kept'),
      bot('b1', 'h1', 'answer'),
    ]);
    expect(texts(s)).toEqual(['bot:orphan reply:done', 'human:kept:sent', 'bot:answer:done']);
    expect(awaitingIds(s)).toEqual([]);
  });

  it('does not wait for an old message whose reply the cap dropped', () => {
    const s = mergeHistory(emptyState, [
      human('h1', 'old'),
      human('h2', 'newer'),
      bot('b2', 'h2', 'answer'),
      human('h3', 'pending'),
    ]);
    expect(awaitingIds(s)).toEqual(['h3']);
  });
});

describe('notices and activity', () => {
  const queued = {
    type: 'notice',
    code: 'queued',
    reply_to: 'h1',
    detail: 'No worker is running right now; your message is queued.',
  } as const;

  it('shows a queued notice (even before the ack) and clears it with the reply', () => {
    let s = applyNotice(emptyState, queued);
    s = applyAck(s, ack('h1', 'hi'));
    expect(s.notices.h1).toContain('queued');
    s = applyFinal(s, final('b1', 'h1', 'answer'));
    expect(s.notices).toEqual({});
  });

  it('ignores notice codes it does not know', () => {
    expect(applyNotice(emptyState, { ...queued, code: 'something_new' })).toBe(emptyState);
  });

  it('types while waiting for the first token, and offers Stop until the reply is final', () => {
    let s = addLocal(emptyState, 'c1', 'hi', T);
    expect(activity(s)).toEqual({ generating: true, typing: true });
    s = applyAck(s, ack('h1', 'hi', 'c1'));
    expect(activity(s)).toEqual({ generating: true, typing: true });
    s = applyToken(s, token('b1', 'h1', 'x'));
    expect(activity(s)).toEqual({ generating: true, typing: false });
    s = applyFinal(s, final('b1', 'h1', 'x'));
    expect(activity(s)).toEqual({ generating: false, typing: false });
  });
});

describe('slash commands', () => {
  const local = (state: ChatState, id: string, text: string) => addLocal(state, id, text, 'T');

  it('answers our command named by client_id; it is not waiting for a reply', () => {
    let state = local(local(emptyState, 'c1', '/help'), 'c2', '/title Cats');
    state = applyCommand(state, { type: 'command', command: 'title', detail: "Title set to 'Cats'", client_id: 'c2' });
    expect(state.entries.map((e) => `${e.text}:${e.status}:${e.commandReply ?? ''}`)).toEqual([
      '/help:sending:',
      "/title Cats:command:Title set to 'Cats'",
    ]);
    state = applyCommand(state, { type: 'command', command: 'help', detail: 'Commands: /help …', client_id: 'c1' });
    expect(activity(state)).toEqual({ generating: false, typing: false });
  });

  it('without a client_id, answers our oldest unacknowledged /…, never a //… message', () => {
    let state = local(local(emptyState, 'c1', '//literal'), 'c2', '/help');
    state = applyCommand(state, { type: 'command', command: 'help', detail: 'Commands' });
    expect(state.entries.map((e) => e.status)).toEqual(['sending', 'command']);
  });

  it('adds the command when nothing is left to answer (a /reset emptied the conversation)', () => {
    const state = applyCommand(emptyState, { type: 'command', command: 'reset', detail: 'History cleared', client_id: 'c9' });
    expect(state.entries).toMatchObject([{ text: '/reset', status: 'command', commandReply: 'History cleared', source: 'human' }]);
  });
});
