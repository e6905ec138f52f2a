import { act, render, screen, within } from '@testing-library/react';
import userEvent from '@testing-library/user-event';
import { beforeEach, describe, expect, it } from 'vitest';
import { App } from './App';
import { TOKEN_KEY } from './chatClient';
import { serialize } from './conversationList';
import { CONVERSATIONS_KEY } from './sidebar';
import { bot, FakeServer, flush, human, session, TOKEN } from './test/fakes';

let server: FakeServer;

beforeEach(() => {
  server = new FakeServer();
});

function renderApp() {
  const app = server.makeApp();
  render(<App client={app.client} sidebar={app.sidebar} />);
  return app;
}

async function openChat(messages = [human('h0', 'earlier'), bot('b0', 'h0', 'an **old** reply')]) {
  localStorage.setItem(TOKEN_KEY, TOKEN);
  server.always('/refresh_token', { status: 200, body: session(messages) });
  server.always(`/v1/conversations/${TOKEN}`, { status: 200, body: session(messages) });
  const user = userEvent.setup();
  renderApp();
  await act(async () => {
    server.socket.open();
    await flush();
  });
  return user;
}

const emit = (event: object) => act(() => server.socket.emit(event));
const log = () => screen.getByRole('log', { name: 'Conversation' });

describe('start screen', () => {
  it("shows the server's error for an empty name, then starts the chat", async () => {
    const user = userEvent.setup();
    server.answer(
      'POST /v1/conversations',
      { status: 400, body: { detail: { loc: 'name', msg: 'Enter a valid name' } } },
      { status: 201, body: session([], 'Ann') },
    );
    server.always('/refresh_token', { status: 200, body: session([], 'Ann') });
    renderApp();
    await user.click(screen.getByRole('button', { name: 'Start chatting' }));
    expect(await screen.findByRole('alert')).toHaveTextContent('Enter a valid name');

    await user.type(screen.getByLabelText('Your name'), 'Ann{Enter}');
    expect(await screen.findByText('Ann')).toBeInTheDocument();
    expect(screen.getByLabelText('Message')).toBeInTheDocument();
  });
});

describe('chat screen', () => {
  it('shows the history with timestamps and markdown', async () => {
    await openChat();
    const items = within(log()).getAllByRole('listitem');
    expect(items).toHaveLength(2);
    expect(within(items[1]).getByText('old').tagName).toBe('STRONG');
    expect(items[0].querySelector('time')?.getAttribute('datetime')).toBe('2026-11-23T13:00:01.000Z');
  });

  it('sends on Enter, adds a line on Shift+Enter, and streams the reply', async () => {
    const user = await openChat([]);
    const box = screen.getByLabelText('Message');
    await user.type(box, 'line one{Shift>}{Enter}{/Shift}line two');
    expect(box).toHaveValue('line one\nline two');
    await user.keyboard('{Enter}');
    expect(box).toHaveValue('');
    expect(server.socket.sentJson()).toEqual([
      { type: 'message', msg: 'line one\nline two', client_id: 'c1' },
    ]);
    // Our message is there at once, the bot is typing, and Stop is offered.
    expect(within(log()).getByText(/line one/)).toBeInTheDocument();
    expect(screen.getByText('Bot is typing…')).toBeInTheDocument();
    await user.click(screen.getByRole('button', { name: 'Stop the reply' }));
    expect(server.socket.sentJson()[1]).toEqual({ type: 'stop' });

    await emit({ type: 'ack', id: 'h1', msg: 'line one\nline two', timestamp: '2026-11-23T13:05:00Z', client_id: 'c1' });
    await emit({ type: 'token', id: 'b1', reply_to: 'h1', delta: 'Par' });
    expect(within(log()).getByText('Par')).toBeInTheDocument();
    expect(screen.queryByText('Bot is typing…')).toBeNull();
    await emit({ type: 'token', id: 'b1', reply_to: 'h1', delta: 'tial' });
    expect(within(log()).getByText('Partial')).toBeInTheDocument();
    await emit({
      type: 'message',
      id: 'b1',
      reply_to: 'h1',
      source: 'bot',
      msg: 'Final `code`',
      timestamp: '2026-11-23T13:05:01Z',
    });
    expect(within(log()).getByText('code').tagName).toBe('CODE');
    expect(screen.queryByRole('button', { name: 'Stop the reply' })).toBeNull();
    // Focus was on Stop, which is gone: it returns to the message box.
    expect(box).toHaveFocus();
  });

  it('renders HTML in a reply as text, never as elements', async () => {
    await openChat([]);
    const evil = 'Look: <img src=x onerror="window.hacked=1"> and\n\n<script>window.hacked=2</script>';
    await emit({ type: 'message', id: 'b1', reply_to: 'hx', source: 'bot', msg: evil, timestamp: 'T' });
    const item = within(log()).getByText(/Look:/).closest('li') as HTMLElement;
    expect(item.querySelector('img, script')).toBeNull();
    expect(item).toHaveTextContent('<img src=x onerror="window.hacked=1">');
    // A block of raw HTML becomes a paragraph of text.
    expect(within(item).getByText('<script>window.hacked=2</script>').tagName).toBe('P');
    expect((window as unknown as { hacked?: number }).hacked).toBeUndefined();
  });

  it('shows the user name isolated in <bdi>, so an RTL name does not reorder the header', async () => {
    const rtl = 'שרה 42';
    localStorage.setItem(TOKEN_KEY, TOKEN);
    server.always('/refresh_token', { status: 200, body: session([], rtl) });
    server.always(`/v1/conversations/${TOKEN}`, { status: 200, body: session([], rtl) });
    renderApp();
    await act(async () => {
      server.socket.open();
      await flush();
    });
    const name = await screen.findByText(rtl);
    expect(name.tagName).toBe('BDI');
    expect(name.closest('.who')).toHaveTextContent(`Chatting as ${rtl}`);
  });

  it('shows an image in a reply as a link, never as <img>', async () => {
    await openChat([]);
    const md = 'See ![the chart](http://127.0.0.1:9/chart.png)';
    await emit({ type: 'message', id: 'b1', reply_to: 'hx', source: 'bot', msg: md, timestamp: 'T' });
    const item = within(log()).getByText(/See/).closest('li') as HTMLElement;
    expect(item.querySelector('img')).toBeNull();
    expect(within(item).getByText('[the chart]')).toHaveAttribute('href', 'http://127.0.0.1:9/chart.png');
  });

  it('renders code blocks and drops javascript: links', async () => {
    await openChat([]);
    const md = '```python\nprint("hi")\n```\n\n[click](javascript:alert(1)) [ok](https://example.com)';
    await emit({ type: 'message', id: 'b1', reply_to: 'hx', source: 'bot', msg: md, timestamp: 'T' });
    expect(within(log()).getByText('print("hi")').closest('pre')).not.toBeNull();
    expect(within(log()).getByText('click').getAttribute('href') ?? '').not.toMatch(/javascript/);
    expect(within(log()).getByText('ok')).toHaveAttribute('rel', 'noopener noreferrer');
  });

  it('shows errors in words: a failed reply, a rejected message, a lost connection', async () => {
    const user = await openChat([]);
    await emit({ type: 'ack', id: 'h1', msg: 'q', timestamp: 'T' });
    await emit({ type: 'error', reply_to: 'h1', code: 'model_unavailable', detail: 'The model is unavailable' });
    expect(within(log()).getByText('The model is unavailable')).toBeInTheDocument();
    expect(within(log()).getByText('Reply failed (model_unavailable)')).toBeInTheDocument();

    await user.type(screen.getByLabelText('Message'), 'x{Enter}');
    await emit({ type: 'error', code: 'too_large', detail: 'Message is too long (5000 > 4000)' });
    expect(screen.getAllByText('Message is too long (5000 > 4000)')).toHaveLength(2); // bubble + banner
    expect(screen.getByRole('button', { name: 'Send again' })).toBeInTheDocument();
    await user.click(screen.getByRole('button', { name: 'Dismiss' }));

    await act(() => server.socket.drop(1006));
    expect(screen.getByRole('status')).toHaveTextContent(/Connection lost. Reconnecting in/);
    expect(screen.getByRole('button', { name: 'Send' })).toBeDisabled();
    await user.click(screen.getByRole('button', { name: 'Reconnect now' }));
    expect(server.sockets).toHaveLength(2);
  });

  it("shows a reply's tokens_used", async () => {
    await openChat([]);
    await emit({ type: 'ack', id: 'h1', msg: 'q', timestamp: 'T' });
    await emit({ type: 'message', id: 'b1', reply_to: 'h1', source: 'bot', msg: 'a', timestamp: 'T', tokens_used: 30 });
    expect(within(log()).getByText('30 tokens')).toHaveAttribute('title', 'Prompt plus reply, in model tokens');
  });

  it('shows a queued notice under the message', async () => {
    await openChat([]);
    await emit({ type: 'ack', id: 'h1', msg: 'q', timestamp: 'T' });
    await emit({ type: 'notice', code: 'queued', reply_to: 'h1', detail: 'No worker is running right now; your message is queued.' });
    expect(screen.getByText(/your message is queued/)).toBeInTheDocument();
  });

  it('"New chat" creates a conversation with the same name and shows it', async () => {
    const user = await openChat();
    const other = '0b5bd3fa-7e0b-4a5e-9d3c-2f1e0c9a8b7d';
    server.answer('POST /v1/conversations', { status: 201, body: session([], 'Ann', { token: other }) });
    await user.click(screen.getByRole('button', { name: 'New chat' }));
    await act(flush);
    expect(server.made('POST', '/v1/conversations')[0].body).toEqual({ name: 'Ann' });
    expect(localStorage.getItem(TOKEN_KEY)).toBe(other);
    expect(server.socket.url).toBe(`ws://page.test/chat?token=${other}`);
    expect(within(log()).queryAllByRole('listitem').map((li) => li.textContent)).toEqual([
      'Say hello to start the conversation.',
    ]);
  });
});

describe('conversation sidebar', () => {
  const OTHER = '0b5bd3fa-7e0b-4a5e-9d3c-2f1e0c9a8b7d';

  async function twoChats() {
    localStorage.setItem(
      CONVERSATIONS_KEY,
      serialize([
        { id: TOKEN, title: 'Cats', updated: '2026-11-23T13:00:02Z' },
        { id: OTHER, title: 'Dogs', updated: '2026-11-23T12:00:00Z' },
      ]),
    );
    server.always(`/v1/conversations/${OTHER}`, {
      status: 200,
      body: session([human('d1', 'about dogs', '2026-11-23T12:00:00Z')], 'Ann', { token: OTHER, title: 'Dogs' }),
    });
    server.answer(`GET /v1/conversations/${TOKEN}`, { status: 200, body: session([], 'Ann', { title: 'Cats' }) });
    return openChat();
  }

  const nav = () => screen.getByRole('navigation', { name: 'Conversations' });

  it('lists the conversations, marks the current one, and switches on a click', async () => {
    const user = await twoChats();
    const cats = within(nav()).getByRole('button', { name: 'Cats' });
    const dogs = within(nav()).getByRole('button', { name: 'Dogs' });
    expect(cats).toHaveAttribute('aria-current', 'page');
    expect(dogs).not.toHaveAttribute('aria-current');
    expect(screen.getByRole('heading', { level: 1 })).toHaveTextContent('Cats');

    server.answer('/refresh_token', {
      status: 200,
      body: session([human('d1', 'about dogs', '2026-11-23T12:00:00Z')], 'Ann', { token: OTHER, title: 'Dogs' }),
    });
    await user.click(dogs);
    expect(server.socket.url).toBe(`ws://page.test/chat?token=${OTHER}`);
    await act(async () => {
      server.socket.open();
      await flush();
    });
    expect(within(nav()).getByRole('button', { name: 'Dogs' })).toHaveAttribute('aria-current', 'page');
    expect(within(log()).getByText('about dogs')).toBeInTheDocument();
    expect(screen.getByRole('heading', { level: 1 })).toHaveTextContent('Dogs');
  });

  it('renames with the keyboard: Enter saves, Escape cancels', async () => {
    const user = await twoChats();
    await user.click(within(nav()).getByRole('button', { name: 'Rename Dogs' }));
    const input = within(nav()).getByLabelText('New title for Dogs');
    expect(input).toHaveFocus();
    await user.keyboard('{Escape}');
    expect(within(nav()).queryByLabelText('New title for Dogs')).toBeNull();
    expect(within(nav()).getByRole('button', { name: 'Dogs' })).toHaveFocus();

    await user.click(within(nav()).getByRole('button', { name: 'Rename Dogs' }));
    server.answer(`PATCH /v1/conversations/${OTHER}`, { status: 200, body: session([], 'Ann', { token: OTHER, title: 'Puppies' }) });
    await user.keyboard('Puppies{Enter}');
    await act(flush);
    expect(server.made('PATCH', `/v1/conversations/${OTHER}`)[0].body).toEqual({ title: 'Puppies' });
    expect(within(nav()).getByRole('button', { name: 'Puppies' })).toBeInTheDocument();
  });

  it('asks before deleting; "Keep" keeps it, "Delete" deletes and shows another chat', async () => {
    const user = await twoChats();
    await user.click(within(nav()).getByRole('button', { name: 'Delete Cats' }));
    const confirm = within(nav()).getByRole('group', { name: 'Delete Cats?' });
    expect(within(confirm).getByRole('button', { name: 'Keep' })).toHaveFocus();
    await user.keyboard('{Enter}');
    expect(server.made('DELETE', `/v1/conversations/${TOKEN}`)).toHaveLength(0);
    expect(within(nav()).getByRole('button', { name: 'Cats' })).toBeInTheDocument();

    await user.click(within(nav()).getByRole('button', { name: 'Delete Cats' }));
    server.answer(`DELETE /v1/conversations/${TOKEN}`, { status: 204 });
    server.answer('/refresh_token', { status: 200, body: session([], 'Ann', { token: OTHER, title: 'Dogs' }) });
    await user.click(within(nav()).getByRole('button', { name: 'Delete' }));
    await act(flush);
    expect(within(nav()).queryByRole('button', { name: 'Cats' })).toBeNull();
    expect(server.socket.url).toBe(`ws://page.test/chat?token=${OTHER}`);
    expect(within(nav()).getByRole('button', { name: 'Dogs' })).toHaveAttribute('aria-current', 'page');
  });

  it('the drawer button opens the list, Escape closes it and gives the focus back', async () => {
    const user = await twoChats();
    const toggle = screen.getByRole('button', { name: 'Conversations' });
    expect(toggle).toHaveAttribute('aria-expanded', 'false');
    expect(toggle).toHaveAttribute('aria-controls', nav().id);
    await user.click(toggle);
    expect(nav()).toHaveClass('open');
    expect(toggle).toHaveAttribute('aria-expanded', 'true');
    expect(screen.getByRole('button', { name: 'Close the conversation list' })).toHaveFocus();
    expect(screen.getByRole('main', { hidden: true })).toHaveAttribute('inert');
    await user.keyboard('{Escape}');
    expect(screen.getByRole('main')).not.toHaveAttribute('inert');
    expect(nav()).not.toHaveClass('open');
    expect(toggle).toHaveFocus();

    // Escape in a rename inside the drawer cancels the rename only.
    await user.click(toggle);
    await user.click(within(nav()).getByRole('button', { name: 'Rename Dogs' }));
    await user.keyboard('{Escape}');
    expect(within(nav()).queryByLabelText('New title for Dogs')).toBeNull();
    expect(nav()).toHaveClass('open');
    // Choosing a conversation closes it.
    server.answer('/refresh_token', { status: 200, body: session([], 'Ann', { token: OTHER, title: 'Dogs' }) });
    await user.click(within(nav()).getByRole('button', { name: 'Dogs' }));
    expect(nav()).not.toHaveClass('open');
  });

  it('shows a registered key once, with a copy button', async () => {
    const user = await twoChats();
    const KEY = 'chat_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ';
    server.answer('POST /v1/users', { status: 201, body: { user_id: 'u1', name: 'Ann', created: 'T', api_key: KEY } });
    server.answer('GET /v1/users/me', { status: 200, body: { user_id: 'u1', name: 'Ann', created: 'T' } });
    server.answer('GET /v1/conversations', { status: 200, body: { conversations: [], next_cursor: null } });
    await user.click(screen.getByText('Account (optional)'));
    await user.type(screen.getByLabelText('Account name'), 'Ann{Enter}');
    await act(flush);
    expect(screen.getByTestId('api-key')).toHaveTextContent(KEY);
    await user.click(screen.getByRole('button', { name: 'Copy key' }));
    expect(await navigator.clipboard.readText()).toBe(KEY);
    expect(screen.getByText('Copied.')).toBeInTheDocument();
    await user.click(screen.getByRole('button', { name: 'Done' }));
    expect(screen.queryByTestId('api-key')).toBeNull();
    expect(screen.getByText('Signed in as')).toBeInTheDocument();
  });
});
