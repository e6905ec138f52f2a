/// <reference types="vitest/config" />
import react from '@vitejs/plugin-react';
import { defineConfig } from 'vite';

// `npm run dev` serves the page on :5173 and forwards the API and the socket to a running
// server (`make run`, or CHAT_SERVER=http://127.0.0.1:3501 for another one), so the page
// stays same-origin and the server's Origin check passes.
const target = process.env.CHAT_SERVER ?? 'http://127.0.0.1:3500';

export default defineConfig({
  plugins: [react()],
  server: {
    proxy: {
      '/token': target,
      '/refresh_token': target,
      '/test': target,
      '/healthz': target,
      '/readyz': target,
      '/chat': { target, ws: true },
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
