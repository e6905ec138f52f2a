import { useEffect, useSyncExternalStore } from 'react';
import type { ChatClient } from './chatClient';
import { ChatScreen } from './components/ChatScreen';
import { StartScreen } from './components/StartScreen';

export function App({ client }: { client: ChatClient }) {
  const view = useSyncExternalStore(client.subscribe, client.getSnapshot);

  useEffect(() => {
    client.init();
    const online = () => client.retryNow();
    window.addEventListener('online', online);
    return () => {
      window.removeEventListener('online', online);
      client.dispose();
    };
  }, [client]);

  return (
    <main className="app">
      {view.screen === 'start' ? (
        <StartScreen
          message={view.startMessage}
          busy={view.starting}
          onStart={(name) => void client.start(name)}
        />
      ) : (
        <ChatScreen view={view} client={client} />
      )}
    </main>
  );
}
