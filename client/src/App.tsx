import { useEffect, useSyncExternalStore } from 'react';
import type { ChatClient } from './chatClient';
import { displayTitle } from './conversationList';
import { ChatScreen } from './components/ChatScreen';
import { DrawerButton } from './components/DrawerButton';
import { SidebarPanel } from './components/SidebarPanel';
import { StartScreen } from './components/StartScreen';
import type { Sidebar } from './sidebar';

export function App({ client, sidebar }: { client: ChatClient; sidebar: Sidebar }) {
  const view = useSyncExternalStore(client.subscribe, client.getSnapshot);
  const list = useSyncExternalStore(sidebar.subscribe, sidebar.getSnapshot);

  useEffect(() => {
    client.init();
    void sidebar.init();
    const online = () => client.retryNow();
    window.addEventListener('online', online);
    return () => {
      window.removeEventListener('online', online);
      client.dispose();
      sidebar.dispose();
    };
  }, [client, sidebar]);

  const item = list.items.find((i) => i.id === view.token);
  const title = item ? displayTitle(item) : displayTitle({ title: view.title });
  const drawer = <DrawerButton open={list.drawerOpen} onOpen={() => sidebar.openDrawer()} />;

  return (
    <div className="layout">
      <SidebarPanel view={list} sidebar={sidebar} currentId={view.token} />
      {/* Behind the open drawer nothing takes the focus or a click (the drawer is modal). */}
      <main className="app" inert={list.drawerOpen || undefined}>
        {view.screen === 'start' ? (
          <>
            <div className="bar start-bar">{drawer}</div>
            <StartScreen
              message={view.startMessage}
              busy={view.starting}
              initialName={sidebar.knownName()}
              onStart={(name) => void sidebar.newChat(name)}
            />
          </>
        ) : (
          <ChatScreen view={view} client={client} title={title} drawerButton={drawer} />
        )}
      </main>
    </div>
  );
}
