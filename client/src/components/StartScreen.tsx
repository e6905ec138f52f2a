import { type FormEvent, useId, useState } from 'react';

interface Props {
  message: string;
  busy: boolean;
  /** The name last used here (or the account's). */
  initialName?: string;
  onStart: (name: string) => void;
}

/** Asks for a name; the server decides what is valid and its error is shown as is. */
export function StartScreen({ message, busy, initialName = '', onStart }: Props) {
  const [name, setName] = useState(initialName);
  const inputId = useId();
  const messageId = useId();

  const submit = (e: FormEvent) => {
    e.preventDefault();
    onStart(name);
  };

  return (
    <section className="start" aria-labelledby={`${inputId}-title`}>
      <h1 id={`${inputId}-title`}>Start a chat</h1>
      <form onSubmit={submit} noValidate>
        <label htmlFor={inputId}>Your name</label>
        <input
          id={inputId}
          name="name"
          autoComplete="nickname"
          autoFocus
          value={name}
          onChange={(e) => setName(e.target.value)}
          aria-describedby={messageId}
          aria-invalid={message ? true : undefined}
        />
        <p id={messageId} className="start-message" role="alert">
          {message}
        </p>
        <button type="submit" className="primary" disabled={busy}>
          {busy ? 'Starting…' : 'Start chatting'}
        </button>
      </form>
    </section>
  );
}
