// The app's pages and hash-based routing (#/diagnostics). No router library: the page set is
// small and fixed, and a hash URL works when the UI is served from any path or a desktop shell.

export const PAGES = [
  { id: 'playground', title: 'Playground', summary: 'Make pictures from a description.' },
  { id: 'gallery', title: 'Gallery', summary: 'Every picture you have made.' },
  { id: 'models', title: 'Models', summary: 'The picture styles installed on this computer.' },
  { id: 'presets', title: 'Presets', summary: 'Saved settings for common kinds of pictures.' },
  { id: 'characters', title: 'Characters', summary: 'People and creatures you want to draw again.' },
  { id: 'diagnostics', title: 'Diagnostics', summary: 'What this computer has, and what Local Diffusers can use.' },
  { id: 'settings', title: 'Settings', summary: 'Where things are kept and how the app behaves.' },
] as const;

export type PageId = (typeof PAGES)[number]['id'];
export type Page = (typeof PAGES)[number];

export const DEFAULT_PAGE: PageId = 'playground';

export function hrefFor(id: PageId): string {
  return `#/${id}`;
}

/**
 * Page for a location hash. '' and '#/' give the default page; an unknown name gives null
 * (the app shows "page not found"). Anything after the page name ("#/gallery/42", "?x=1") is
 * left for the page itself.
 */
export function pageFromHash(hash: string): PageId | null {
  const path = hash.replace(/^#\/?/, '');
  const first = path.split(/[/?]/, 1)[0]?.toLowerCase() ?? '';
  if (first === '') return DEFAULT_PAGE;
  const page = PAGES.find((p) => p.id === first);
  return page ? page.id : null;
}

export function pageInfo(id: PageId): Page {
  // PAGES lists every PageId, so the lookup cannot miss.
  return PAGES.find((p) => p.id === id) as Page;
}
