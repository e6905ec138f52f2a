import { useEffect, useRef } from 'react';
import type { Sidebar, SidebarView } from '../sidebar';
import { AccountPanel } from './AccountPanel';
import { ConversationRow } from './ConversationRow';

interface Props {
  view: SidebarView;
  sidebar: Sidebar;
  /** The conversation the chat shows. */
  currentId: string | null;
}

export const SIDEBAR_ID = 'conversations';
/** The widest screen with the drawer: `@media (max-width: 720px)` in styles.css. */
export const DRAWER_MAX_PX = 720;

/**
 * The conversation list. Beside the chat on a wide screen; on a phone-width one a drawer
 * (CSS decides) that the chat header's button opens and that closes on choosing, on Escape,
 * on its close button or a tap outside it, giving the focus back where it was.
 */
export function SidebarPanel({ view, sidebar, currentId }: Props) {
  const closeRef = useRef<HTMLButtonElement>(null);
  const opener = useRef<Element | null>(null);

  useEffect(() => {
    if (view.drawerOpen) {
      opener.current = document.activeElement;
      closeRef.current?.focus();
      // Escape closes the drawer wherever the focus is (it may have left with a deleted row).
      const onKey = (e: KeyboardEvent) => {
        if (e.key === 'Escape') sidebar.closeDrawer();
      };
      document.addEventListener('keydown', onKey);
      // Turned or resized to a wide screen: no drawer there, so it must not stay open (the chat
      // would stay inert behind it).
      const wide = window.matchMedia?.(`(min-width: ${DRAWER_MAX_PX + 1}px)`);
      const onWide = () => {
        if (wide?.matches) sidebar.closeDrawer();
      };
      wide?.addEventListener('change', onWide);
      return () => {
        document.removeEventListener('keydown', onKey);
        wide?.removeEventListener('change', onWide);
      };
    }
    const back = opener.current;
    opener.current = null;
    if (back instanceof HTMLElement && back.isConnected) back.focus();
  }, [view.drawerOpen, sidebar]);

  return (
    <>
      {view.drawerOpen && <div className="backdrop" onClick={() => sidebar.closeDrawer()} />}
      <nav
        id={SIDEBAR_ID}
        className={`sidebar${view.drawerOpen ? ' open' : ''}`}
        aria-label="Conversations"
      >
        <div className="sidebar-head">
          <button type="button" className="primary" onClick={() => void sidebar.newChat()}>
            New chat
          </button>
          <button
            type="button"
            className="drawer-close"
            ref={closeRef}
            aria-label="Close the conversation list"
            onClick={() => sidebar.closeDrawer()}
          >
            ×
          </button>
        </div>
        {view.error && (
          <div className="banner" role="alert">
            <span>{view.error}</span>
            <button type="button" aria-label="Dismiss" onClick={() => sidebar.dismissError()}>
              ×
            </button>
          </div>
        )}
        <ul className="conv-list" aria-label="Your conversations" aria-busy={view.loading || undefined}>
          {view.items.length === 0 && !view.loading && <li className="empty-list">No conversations yet.</li>}
          {view.items.map((item) => (
            <ConversationRow
              key={item.id}
              item={item}
              current={item.id === currentId}
              onSelect={(id) => sidebar.select(id)}
              onRename={(id, title) => sidebar.rename(id, title)}
              onDelete={(id) => sidebar.delete(id)}
            />
          ))}
        </ul>
        {view.nextCursor && (
          <button type="button" className="load-more" disabled={view.loading} onClick={() => void sidebar.loadMore()}>
            {view.loading ? 'Loading…' : 'Load more'}
          </button>
        )}
        <AccountPanel view={view} sidebar={sidebar} />
      </nav>
    </>
  );
}
