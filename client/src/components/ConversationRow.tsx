import { type FormEvent, type KeyboardEvent, useEffect, useRef, useState } from 'react';
import { type ConversationItem, displayTitle } from '../conversationList';

interface Props {
  item: ConversationItem;
  current: boolean;
  onSelect: (id: string) => void;
  onRename: (id: string, title: string) => Promise<boolean>;
  onDelete: (id: string) => Promise<boolean>;
}

type Mode = 'show' | 'rename' | 'confirm';

/** One conversation: choose it, rename it in place, or delete it after a confirmation. */
export function ConversationRow({ item, current, onSelect, onRename, onDelete }: Props) {
  const [mode, setMode] = useState<Mode>('show');
  const [title, setTitle] = useState('');
  const [busy, setBusy] = useState(false);
  const inputRef = useRef<HTMLInputElement>(null);
  const cancelRef = useRef<HTMLButtonElement>(null);
  const pickRef = useRef<HTMLButtonElement>(null);
  // After renaming or a kept conversation, the focus goes back to the conversation.
  const edited = useRef(false);
  const name = displayTitle(item);

  useEffect(() => {
    if (mode === 'rename') {
      inputRef.current?.focus();
      inputRef.current?.select();
    }
    if (mode === 'confirm') cancelRef.current?.focus();
    if (mode === 'show' && edited.current) pickRef.current?.focus();
    edited.current = mode !== 'show';
  }, [mode]);

  // Escape leaves the rename or the confirmation (and only that: not the drawer around it).
  const cancelOnEscape = (e: KeyboardEvent) => {
    if (e.key !== 'Escape') return;
    e.stopPropagation();
    setMode('show');
  };

  const save = async (e: FormEvent) => {
    e.preventDefault();
    setBusy(true);
    const ok = await onRename(item.id, title);
    setBusy(false);
    if (ok) setMode('show');
  };

  const confirmDelete = async () => {
    setBusy(true);
    const ok = await onDelete(item.id);
    setBusy(false);
    if (!ok) setMode('show');
  };

  if (mode === 'rename') {
    return (
      <li className="conv renaming">
        <form onSubmit={save} onKeyDown={cancelOnEscape}>
          <label className="sr-only" htmlFor={`title-${item.id}`}>
            New title for {name}
          </label>
          <input
            id={`title-${item.id}`}
            ref={inputRef}
            value={title}
            maxLength={200}
            onChange={(e) => setTitle(e.target.value)}
          />
          <button type="submit" disabled={busy || !title.trim()}>
            Save
          </button>
          <button type="button" onClick={() => setMode('show')}>
            Cancel
          </button>
        </form>
      </li>
    );
  }

  return (
    <li className={`conv${current ? ' current' : ''}`}>
      <button
        type="button"
        className="pick"
        ref={pickRef}
        aria-current={current ? 'page' : undefined}
        onClick={() => onSelect(item.id)}
      >
        <span className="conv-title">{name}</span>
      </button>
      {mode === 'confirm' ? (
        <div className="confirm" role="group" aria-label={`Delete ${name}?`} onKeyDown={cancelOnEscape}>
          <span>Delete this conversation?</span>
          <button type="button" className="danger" disabled={busy} onClick={() => void confirmDelete()}>
            Delete
          </button>
          <button type="button" ref={cancelRef} onClick={() => setMode('show')}>
            Keep
          </button>
        </div>
      ) : (
        <span className="conv-actions">
          <button
            type="button"
            aria-label={`Rename ${name}`}
            title="Rename"
            onClick={() => {
              setTitle(item.title ?? '');
              setMode('rename');
            }}
          >
            ✎
          </button>
          <button
            type="button"
            aria-label={`Delete ${name}`}
            title="Delete"
            onClick={() => setMode('confirm')}
          >
            ✕
          </button>
        </span>
      )}
    </li>
  );
}
