import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import { App } from './App';
import { browserClient } from './chatClient';
import { ConversationsApi } from './conversationsApi';
import { browserStorage, Sidebar } from './sidebar';
import './styles.css';

const root = document.getElementById('root');
if (!root) throw new Error('index.html has no #root element');
const client = browserClient();
const sidebar = new Sidebar(client, new ConversationsApi((input, init) => window.fetch(input, init), ''), browserStorage());
createRoot(root).render(
  <StrictMode>
    <App client={client} sidebar={sidebar} />
  </StrictMode>,
);
