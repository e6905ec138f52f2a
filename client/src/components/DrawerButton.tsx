import { SIDEBAR_ID } from './SidebarPanel';

/** Opens the conversation list on a phone-width screen (hidden by CSS on a wide one). */
export function DrawerButton({ open, onOpen }: { open: boolean; onOpen: () => void }) {
  return (
    <button
      type="button"
      className="drawer-open"
      aria-controls={SIDEBAR_ID}
      aria-expanded={open}
      aria-label="Conversations"
      onClick={onOpen}
    >
      ☰
    </button>
  );
}
