// Svelte compiler options shared by Vite and svelte-check.
/** @type {import('@sveltejs/vite-plugin-svelte').SvelteConfig} */
export default {
  compilerOptions: {
    // Runes only: no legacy component syntax anywhere in the app.
    runes: true,
  },
};
