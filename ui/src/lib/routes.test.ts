import { describe, expect, it } from 'vitest';
import { DEFAULT_PAGE, hrefFor, pageFromHash, PAGES } from './routes';

describe('pageFromHash', () => {
  it('opens the default page for an empty hash', () => {
    expect(pageFromHash('')).toBe(DEFAULT_PAGE);
    expect(pageFromHash('#')).toBe(DEFAULT_PAGE);
    expect(pageFromHash('#/')).toBe(DEFAULT_PAGE);
  });

  it('finds every page by its own link', () => {
    for (const page of PAGES) expect(pageFromHash(hrefFor(page.id))).toBe(page.id);
  });

  it('ignores what follows the page name and letter case', () => {
    expect(pageFromHash('#/gallery/42')).toBe('gallery');
    expect(pageFromHash('#/Diagnostics?tab=gpu')).toBe('diagnostics');
  });

  it('gives null for a page that does not exist', () => {
    expect(pageFromHash('#/nope')).toBeNull();
  });
});
