// Short messages in the corner ("Settings recalled", "Copied"), read out by screen readers.

export interface Toast {
  id: number;
  text: string;
  detail?: string | null;
  kind: 'info' | 'error';
}

class Toasts {
  items = $state<Toast[]>([]);
  #next = 1;

  show(text: string, kind: Toast['kind'] = 'info', detail: string | null = null, ms = 5000) {
    const id = this.#next++;
    this.items = [...this.items, { id, text, detail, kind }];
    setTimeout(() => this.dismiss(id), kind === 'error' ? ms * 2 : ms);
  }

  dismiss(id: number) {
    this.items = this.items.filter((t) => t.id !== id);
  }
}

export const toasts = new Toasts();
