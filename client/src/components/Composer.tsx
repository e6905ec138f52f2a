import { type FormEvent, type KeyboardEvent, useEffect, useId, useRef, useState } from 'react';

interface Props {
  connected: boolean;
  generating: boolean;
  /** Returns false when the message could not be sent (it then stays in the box). */
  onSend: (text: string) => boolean;
  onStop: () => void;
}

/** The message box: Enter sends, Shift+Enter starts a new line. */
export function Composer({ connected, generating, onSend, onStop }: Props) {
  const [text, setText] = useState('');
  const inputId = useId();
  const box = useRef<HTMLTextAreaElement>(null);

  // The Stop button goes away when the reply is final: keep keyboard focus in the page.
  useEffect(() => {
    if (!generating && document.activeElement === document.body) box.current?.focus();
  }, [generating]);

  const send = () => {
    if (!text.trim()) return;
    if (onSend(text)) setText('');
  };
  const submit = (e: FormEvent) => {
    e.preventDefault();
    send();
  };
  const keyDown = (e: KeyboardEvent<HTMLTextAreaElement>) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.nativeEvent.isComposing) {
      e.preventDefault();
      send();
    }
  };

  return (
    <form className="composer" onSubmit={submit}>
      <label htmlFor={inputId} className="sr-only">
        Message
      </label>
      <textarea
        id={inputId}
        ref={box}
        rows={2}
        value={text}
        placeholder="Type a message… (Shift+Enter for a new line)"
        onChange={(e) => setText(e.target.value)}
        onKeyDown={keyDown}
        autoFocus
      />
      {generating && (
        <button type="button" className="stop" onClick={onStop} aria-label="Stop the reply">
          Stop
        </button>
      )}
      <button type="submit" className="primary" disabled={!connected || !text.trim()}>
        Send
      </button>
    </form>
  );
}
