import { type FormEvent, useId, useState } from 'react';
import type { Sidebar, SidebarView } from '../sidebar';

interface Props {
  view: SidebarView;
  sidebar: Sidebar;
}

/** Signed in: who, and "Sign out". Otherwise: register with a name, or paste a key. */
export function AccountPanel({ view, sidebar }: Props) {
  if (view.newKey) return <NewKey apiKey={view.newKey} onDone={() => sidebar.dismissKey()} />;
  if (view.mode === 'account' && view.user) {
    return (
      <section className="account" aria-label="Account">
        <p>
          Signed in as{' '}
          <strong>
            <bdi>{view.user.name}</bdi>
          </strong>
        </p>
        <button type="button" onClick={() => void sidebar.signOut()}>
          Sign out
        </button>
      </section>
    );
  }
  return <SignIn sidebar={sidebar} />;
}

function SignIn({ sidebar }: { sidebar: Sidebar }) {
  const [name, setName] = useState('');
  const [key, setKey] = useState('');
  const [busy, setBusy] = useState(false);
  const id = useId();

  const run = (action: () => Promise<boolean>, clear: () => void) => async (e: FormEvent) => {
    e.preventDefault();
    setBusy(true);
    if (await action()) clear();
    setBusy(false);
  };

  return (
    <details className="account">
      <summary>Account (optional)</summary>
      <p className="hint">With an account your conversations are listed on any device.</p>
      <form onSubmit={run(() => sidebar.register(name), () => setName(''))}>
        <label htmlFor={`${id}-name`}>Account name</label>
        <input id={`${id}-name`} value={name} autoComplete="nickname" onChange={(e) => setName(e.target.value)} />
        <button type="submit" disabled={busy}>
          Register
        </button>
      </form>
      <form onSubmit={run(() => sidebar.useKey(key), () => setKey(''))}>
        <label htmlFor={`${id}-key`}>API key</label>
        <input
          id={`${id}-key`}
          type="password"
          value={key}
          autoComplete="off"
          spellCheck={false}
          onChange={(e) => setKey(e.target.value)}
        />
        <button type="submit" disabled={busy}>
          Use key
        </button>
      </form>
    </details>
  );
}

/** The key right after registration: the only time the server ever shows it. */
function NewKey({ apiKey, onDone }: { apiKey: string; onDone: () => void }) {
  const [copied, setCopied] = useState('');
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(apiKey);
      setCopied('Copied.');
    } catch {
      setCopied('Could not copy: select the key and copy it.');
    }
  };
  return (
    <section className="account new-key" aria-label="Your API key">
      <p>
        Your API key. It is shown <strong>only this once</strong>: keep it to sign in elsewhere.
      </p>
      <code className="key" data-testid="api-key">
        {apiKey}
      </code>
      <div className="row">
        <button type="button" onClick={() => void copy()}>
          Copy key
        </button>
        <button type="button" onClick={onDone}>
          Done
        </button>
      </div>
      <p role="status" className="hint">
        {copied}
      </p>
    </section>
  );
}
