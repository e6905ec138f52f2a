import { describe, expect, it } from 'vitest';
import {
  appendPage,
  byActivity,
  type ConversationItem,
  displayTitle,
  fromDocument,
  neighbour,
  parseStored,
  serialize,
  touch,
  upsert,
  withTitle,
  without,
} from './conversationList';
import { bot, human, session } from './test/fakes';

const item = (id: string, updated: string, title: string | null = null): ConversationItem => ({ id, title, updated });
const ids = (items: ConversationItem[]) => items.map((i) => i.id);

describe('conversation list', () => {
  it('takes a document\'s last activity from its newest message, else its start', () => {
    const doc = session([human('h1', 'hi', '2026-11-23T13:00:05Z'), bot('b1', 'h1', 'yo')], 'Ann', { title: 'hi' });
    expect(fromDocument(doc)).toEqual({ id: doc.token, title: 'hi', updated: '2026-11-23T13:00:02.000000Z' });
    expect(fromDocument(session([]))).toMatchObject({ title: null, updated: '2026-11-23T13:00:00.000000Z' });
  });

  it('orders by newest activity; upsert replaces by id and keeps the order', () => {
    const list = byActivity([item('a', '2026-01-01T00:00:00Z'), item('b', '2026-01-03T00:00:00Z'), item('c', '2026-01-02T00:00:00Z')]);
    expect(ids(list)).toEqual(['b', 'c', 'a']);
    expect(ids(upsert(list, item('a', '2026-01-04T00:00:00Z')))).toEqual(['a', 'b', 'c']);
    expect(upsert(list, item('d', '2026-01-01T12:00:00Z'))).toHaveLength(4);
  });

  it('moves a conversation up when a message is stored, never back in time', () => {
    const list = [item('b', '2026-01-03T00:00:00Z'), item('a', '2026-01-01T00:00:00Z')];
    expect(ids(touch(list, 'a', '2026-01-05T00:00:00Z'))).toEqual(['a', 'b']);
    expect(touch(list, 'b', '2026-01-02T00:00:00Z')).toEqual(list);
    expect(touch(list, 'unknown', '2026-01-09T00:00:00Z')).toEqual(list);
  });

  it('renames and removes by id', () => {
    const list = [item('a', 'T', 'old'), item('b', 'T')];
    expect(withTitle(list, 'a', 'new')[0].title).toBe('new');
    expect(ids(without(list, 'a'))).toEqual(['b']);
    expect(displayTitle(list[1])).toBe('Untitled chat');
  });

  it('appends a page without showing a row twice (the newer row wins)', () => {
    const list = [item('a', '2026-01-03T00:00:00Z'), item('b', '2026-01-02T00:00:00Z')];
    const next = appendPage(list, [
      { conversation_id: 'b', title: 'later', created: 'T', updated: '2026-01-04T00:00:00Z', message_count: 2 },
      { conversation_id: 'c', title: null, created: 'T', updated: '2026-01-01T00:00:00Z', message_count: 0 },
    ]);
    expect(ids(next)).toEqual(['a', 'b', 'c']);
    expect(next[1].title).toBe('later');
  });

  it('after a removal, shows the one below, else the one above, else none', () => {
    const list = [item('a', 'T'), item('b', 'T'), item('c', 'T')];
    expect(neighbour(list, 'b')).toBe('c');
    expect(neighbour(list, 'c')).toBe('b');
    expect(neighbour([item('a', 'T')], 'a')).toBeNull();
  });

  it('reads back what it stores, and skips what it cannot read', () => {
    const list = [item('a', '2026-01-02T00:00:00Z', 'A'), item('b', '2026-01-01T00:00:00Z')];
    expect(parseStored(serialize(list))).toEqual(list);
    expect(parseStored(null)).toEqual([]);
    expect(parseStored('{not json')).toEqual([]);
    expect(parseStored('{"id": "a"}')).toEqual([]);
    const mixed = JSON.stringify([{ id: 'a', title: null, updated: 'T' }, { id: 7 }, 'x', { id: 'a', title: null, updated: 'T' }, { id: '', title: null, updated: 'T' }]);
    expect(ids(parseStored(mixed))).toEqual(['a']);
  });
});
