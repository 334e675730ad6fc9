// What the pickers offer: installed models, samplers, schedules and presets, loaded once and
// shared by the Playground, Gallery filters, Models and Presets pages.

import { api, toApiError, type ApiError, type ModelInfo, type NameList, type Preset } from './api';

class Catalog {
  models = $state<ModelInfo[]>([]);
  defaultModel = $state<string | null>(null);
  samplers = $state<NameList>({ names: [], default: null });
  schedules = $state<NameList>({ names: [], default: null });
  presets = $state<Preset[]>([]);
  loaded = $state(false);
  error = $state<ApiError | null>(null);
  #loading: Promise<void> | null = null;

  /** Loads everything; calls while loading share the same request. */
  load(force = false): Promise<void> {
    if (this.loaded && !force) return Promise.resolve();
    this.#loading ??= (async () => {
      try {
        const [models, samplers, schedules, presets] = await Promise.all([
          api().models(),
          api().samplers(),
          api().schedules(),
          api().presets(),
        ]);
        this.models = models.models;
        this.defaultModel = models.default;
        this.samplers = samplers;
        this.schedules = schedules;
        this.presets = presets;
        this.error = null;
        this.loaded = true;
      } catch (err) {
        this.error = toApiError(err);
      } finally {
        this.#loading = null;
      }
    })();
    return this.#loading;
  }

  async reloadPresets(): Promise<void> {
    this.presets = await api().presets();
  }

  async reloadModels(): Promise<void> {
    const models = await api().models();
    this.models = models.models;
    this.defaultModel = models.default;
  }

  /** The models a picture can be made with: SDXL refiners only finish another model's pictures. */
  get pickable(): ModelInfo[] {
    return this.models.filter((m) => !m.refiner);
  }

  /** SDXL refiners, offered under the Playground's Advanced settings. */
  get refiners(): ModelInfo[] {
    return this.models.filter((m) => m.refiner);
  }

  model(name: string): ModelInfo | null {
    const wanted = name || this.defaultModel || '';
    const models = this.pickable;
    return models.find((m) => m.name === wanted) ?? models[0] ?? null;
  }

  known() {
    return {
      models: this.pickable.map((m) => m.name),
      samplers: this.samplers.names,
      schedules: this.schedules.names,
    };
  }
}

export const catalog = new Catalog();
