// Light, dark, or whatever the system uses. Applied as <html data-theme="...">, which app.css
// reads; remembered in localStorage.

export type ThemeChoice = 'system' | 'light' | 'dark';
const KEY = 'ld.theme';

function read(): ThemeChoice {
  try {
    const v = globalThis.localStorage?.getItem(KEY);
    return v === 'light' || v === 'dark' ? v : 'system';
  } catch {
    return 'system';
  }
}

class Theme {
  choice = $state<ThemeChoice>(read());

  set(choice: ThemeChoice) {
    this.choice = choice;
    try {
      globalThis.localStorage?.setItem(KEY, choice);
    } catch {
      // Not remembered; still applied for this visit.
    }
    this.apply();
  }

  apply() {
    const root = globalThis.document?.documentElement;
    if (!root) return;
    if (this.choice === 'system') delete root.dataset.theme;
    else root.dataset.theme = this.choice;
  }
}

export const theme = new Theme();
