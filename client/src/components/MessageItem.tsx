import type { Entry } from '../chatState';
import { Markdown } from './Markdown';

function formatTime(iso: string | undefined): { label: string; title: string; iso: string } | null {
  if (!iso) return null;
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return null;
  const today = d.toDateString() === new Date().toDateString();
  const label = today
    ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
    : d.toLocaleString([], { dateStyle: 'short', timeStyle: 'short' });
  return { label, title: d.toLocaleString(), iso: d.toISOString() };
}

interface Props {
  entry: Entry;
  notice?: string;
  onResend?: (key: string) => void;
}

export function MessageItem({ entry, notice, onResend }: Props) {
  const time = formatTime(entry.timestamp);
  const who = entry.source === 'human' ? 'You' : 'Bot';
  let note = '';
  if (entry.status === 'sending') note = 'Sending…';
  else if (entry.status === 'stopped') note = 'Stopped';
  else if (entry.status === 'error') note = `Reply failed (${entry.error?.code ?? 'error'})`;

  return (
    <li
      className={`msg ${entry.source} ${entry.status}`}
      data-id={entry.id}
      data-status={entry.status}
      aria-busy={entry.status === 'streaming' || undefined}
    >
      <span className="sr-only">{who}: </span>
      <div className="text">
        {entry.status === 'error' ? (
          <p>{entry.error?.detail || 'The reply failed.'}</p>
        ) : entry.source === 'bot' ? (
          entry.text ? (
            <Markdown text={entry.text} />
          ) : entry.status === 'stopped' ? (
            <p className="empty">(stopped before any text)</p>
          ) : null
        ) : (
          <p className="plain">{entry.text}</p>
        )}
      </div>
      {entry.status === 'command' && (
        <p className="command-reply" role="status">
          {entry.commandReply}
        </p>
      )}
      {entry.status === 'failed' && (
        <div className="failed-note" role="alert">
          <span>{entry.failReason ?? 'Not sent.'}</span>
          {onResend && (
            <button type="button" className="link" onClick={() => onResend(entry.key)}>
              Send again
            </button>
          )}
        </div>
      )}
      {notice && (
        <p className="notice" role="status">
          {notice}
        </p>
      )}
      <div className="meta">
        {time && (
          <time dateTime={time.iso} title={time.title}>
            {time.label}
          </time>
        )}
        {note && <span className="note">{note}</span>}
        {entry.tokensUsed !== undefined && (
          <span className="tokens" title="Prompt plus reply, in model tokens">
            {entry.tokensUsed} tokens
          </span>
        )}
      </div>
    </li>
  );
}
