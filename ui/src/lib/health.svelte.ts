// The app's health as the page last saw it (GET /api/v1/health), shared by the header's status
// light and the Diagnostics page, so both show the same answer and a Refresh updates both.

import { api, toApiError, type ApiError, type Health } from './api';

class AppHealth {
  health = $state<Health | null>(null);
  error = $state<ApiError | null>(null);
  #inFlight: Promise<void> | null = null;

  /** Asks the server now; calls made while a check is running share it. */
  check(): Promise<void> {
    this.#inFlight ??= (async () => {
      try {
        this.health = await api().health();
        this.error = null;
      } catch (err) {
        this.error = toApiError(err);
      } finally {
        this.#inFlight = null;
      }
    })();
    return this.#inFlight;
  }
}

export const appHealth = new AppHealth();
