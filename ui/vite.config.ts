// Vite build for the web UI. The output (ui/dist) is embedded in ld-server, which serves it
// under a strict Content Security Policy: `script-src 'self'; style-src 'self'`. So the build
// must emit external .js/.css files only - no inline <script>, no inline <style>, no style="".
import { svelte } from '@sveltejs/vite-plugin-svelte';
import type { Plugin } from 'vite';
import { defineConfig } from 'vitest/config';

// `npm run dev` talks to a running server (the real one or tests/browser/mock-server.mjs).
// The server injects the per-launch session token into index.html; in dev, Vite serves
// index.html itself, so pass the token in LD_SESSION to get the same meta tag.
const apiUrl = process.env.LD_URL ?? 'http://127.0.0.1:7860';
const devToken = process.env.LD_SESSION ?? '';

function devSessionMeta(): Plugin {
  return {
    name: 'ld-dev-session-meta',
    apply: 'serve',
    transformIndexHtml(html) {
      if (!devToken) return html;
      return html.replace(
        '</head>',
        `  <meta name="ld-session" content="${devToken.replace(/[^A-Za-z0-9_-]/g, '')}">\n  </head>`,
      );
    },
  };
}

export default defineConfig({
  plugins: [svelte(), devSessionMeta()],
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    // The polyfill is an inline script, which the CSP would block.
    modulePreload: { polyfill: false },
    // Never turn assets into data: URLs; everything is a file served from 'self'.
    assetsInlineLimit: 0,
    // One CSS file for the whole app; it is small.
    cssCodeSplit: false,
    sourcemap: false,
  },
  server: {
    proxy: {
      '/api': {
        target: apiUrl,
        // The server checks Host (DNS-rebinding defence) and refuses foreign Origins, so make
        // proxied requests look like they came from the server's own page.
        changeOrigin: true,
        configure(proxy) {
          proxy.on('proxyReq', (req) => req.removeHeader('origin'));
        },
      },
    },
  },
  test: {
    include: ['src/**/*.test.ts'],
    environment: 'node',
  },
});
