/// <reference types="vitest/config" />
import type { ClientRequest } from 'node:http';
import react from '@vitejs/plugin-react';
import { defineConfig, type ProxyOptions } from 'vite';

// `npm run dev` serves the page on :5173 and forwards the API and the socket to a running
// server (`make run`, or CHAT_SERVER=http://127.0.0.1:3501 for another one). The proxy
// presents the server's own origin (Host and Origin), so the page stays same-origin for the
// server's WebSocket Origin check.
const target = process.env.CHAT_SERVER ?? 'http://127.0.0.1:3500';

const sameOrigin = (req: ClientRequest) => {
  if (req.getHeader('origin') !== undefined) req.setHeader('origin', target);
};

const forward: ProxyOptions = {
  target,
  changeOrigin: true,
  configure: (proxy) => {
    proxy.on('proxyReq', sameOrigin);
    proxy.on('proxyReqWs', sameOrigin);
  },
};

export default defineConfig({
  plugins: [react()],
  server: {
    proxy: {
      '/token': forward,
      '/refresh_token': forward,
      '/test': forward,
      '/healthz': forward,
      '/readyz': forward,
      '/health': forward,
      '/v1': forward,
      '/chat': { ...forward, ws: true },
    },
  },
  build: { outDir: 'dist', emptyOutDir: true },
  test: {
    environment: 'jsdom',
    setupFiles: ['./src/test/setup.ts'],
    include: ['src/**/*.test.{ts,tsx}'],
    restoreMocks: true,
  },
});
