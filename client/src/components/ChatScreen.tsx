import { type ReactNode, useEffect, useMemo, useRef } from 'react';
import type { ChatClient, ChatView } from '../chatClient';
import { activity, arrange } from '../chatState';
import { Composer } from './Composer';
import { MessageItem } from './MessageItem';

interface Props {
  view: ChatView;
  client: ChatClient;
  /** The conversation's title, as the list shows it. */
  title: string;
  /** Opens the conversation list on a phone-width screen. */
  drawerButton: ReactNode;
}

export function ChatScreen({ view, client, title, drawerButton }: Props) {
  const { chat } = view;
  const entries = useMemo(() => arrange(chat.entries), [chat.entries]);
  const { generating, typing } = useMemo(() => activity(chat), [chat]);
  const logRef = useRef<HTMLOListElement>(null);
  const stick = useRef(true);

  // Keep the newest message in view unless the reader scrolled up.
  useEffect(() => {
    const log = logRef.current;
    if (log && stick.current) log.scrollTop = log.scrollHeight;
  }, [entries, typing]);

  const connected = view.connection === 'open';

  return (
    <section className="chat" aria-label="Chat">
      <header className="bar">
        {drawerButton}
        <div className="heading">
          <h1 className="title">{title}</h1>
          <span className="who">
            {/* <bdi>: a right-to-left name must not reorder the words around it. */}
            Chatting as{' '}
            <strong>
              <bdi>{view.name || '…'}</bdi>
            </strong>
          </span>
        </div>
      </header>
      <div className={`status ${view.connection}`} role="status" aria-live="polite">
        <span>{view.status}</span>
        {view.connection === 'waiting' && (
          <button type="button" className="link" onClick={() => client.retryNow()}>
            Reconnect now
          </button>
        )}
      </div>
      {view.banner && (
        <div className="banner" role="alert">
          <span>{view.banner}</span>
          <button type="button" aria-label="Dismiss" onClick={() => client.dismissBanner()}>
            ×
          </button>
        </div>
      )}
      <ol
        className="log"
        ref={logRef}
        role="log"
        aria-live="polite"
        aria-label="Conversation"
        tabIndex={0}
        onScroll={(e) => {
          const el = e.currentTarget;
          stick.current = el.scrollHeight - el.scrollTop - el.clientHeight < 80;
        }}
      >
        {entries.length === 0 && <li className="empty-log">Say hello to start the conversation.</li>}
        {entries.map((entry) => (
          <MessageItem
            key={entry.key}
            entry={entry}
            notice={entry.id !== undefined ? chat.notices[entry.id] : undefined}
            onResend={(key) => client.resend(key)}
          />
        ))}
      </ol>
      <p className="typing" aria-live="polite">
        {typing ? 'Bot is typing…' : ''}
      </p>
      <Composer
        connected={connected}
        generating={generating}
        onSend={(text) => client.send(text)}
        onStop={() => client.stop()}
      />
    </section>
  );
}
