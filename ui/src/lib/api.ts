// The one HTTP client of the UI. Pages call the typed methods here and never fetch() themselves,
// so the session token, error parsing and wire types live in one place.
//
// Every request carries the per-launch session token (the server injects it into index.html as
// <meta name="ld-session">) in the X-LD-Session header. Every failure becomes an ApiError with a
// `code` from a small enum; the UI branches on the code and shows message + hint, and never
// matches on message text.

/** Error codes the server sends in `{code, message, hint}` (ld-server's `Code` enum). */
export const SERVER_ERROR_CODES = [
  'invalid_request',
  'unauthorized',
  'forbidden',
  'not_found',
  'model_missing',
  'model_broken',
  'out_of_memory',
  'cancelled',
  'busy',
  'too_large',
  'conflict',
  'internal',
] as const;
export type ServerErrorCode = (typeof SERVER_ERROR_CODES)[number];

/**
 * Codes made up on this side, for failures that never got a server answer:
 * `network`: the request did not reach the app (app closed, connection refused);
 * `bad_response`: an answer came back but it was not what the app sends (not JSON, wrong shape).
 */
export type ClientErrorCode = 'network' | 'bad_response';
export type ErrorCode = ServerErrorCode | ClientErrorCode;

export const SESSION_HEADER = 'X-LD-Session';
export const SESSION_META = 'ld-session';

export class ApiError extends Error {
  readonly code: ErrorCode;
  /** What the user can do about it; null when there is nothing useful to add. */
  readonly hint: string | null;
  /** HTTP status, or null when no answer came back. */
  readonly status: number | null;

  constructor(code: ErrorCode, message: string, hint: string | null, status: number | null) {
    super(message);
    this.name = 'ApiError';
    this.code = code;
    this.hint = hint;
    this.status = status;
  }
}

// ---- Wire types (the JSON the server sends) ----

export interface Health {
  status: string;
  version: string;
}

export interface OsInfo {
  name: string;
  version: string;
  kernel: string;
  arch: string;
}

export interface CpuInfo {
  name: string;
  physical_cores: number | null;
  logical_cores: number;
  features: string[];
}

export interface MemoryInfo {
  total_bytes: number;
  available_bytes: number;
}

export interface GpuInfo {
  name: string;
  vram_total_bytes: number;
  vram_free_bytes: number;
  driver_version: string;
  cuda_version: string | null;
  compute_capability: string | null;
}

export interface GpuStatus {
  available: boolean;
  /** Plain-language reason when no GPU can be used; absent or null when one can. */
  reason?: string | null;
}

export interface BuildInfo {
  cuda: boolean;
  metal: boolean;
}

export interface SystemInfo {
  os: OsInfo;
  cpu: CpuInfo;
  memory: MemoryInfo;
  gpus: GpuInfo[];
  gpu_status: GpuStatus;
  build: BuildInfo;
  data_dir: string;
}

export type Precision = 'auto' | 'fp16' | 'fp32';
export type LowVram = 'auto' | 'on' | 'off';

/** What the user can change on the Settings page (PUT /api/v1/settings takes exactly this). */
export interface EditableSettings {
  default_model: string | null;
  prompt_prefix: string;
  prompt_suffix: string;
  negative_prompt: string;
  precision: Precision;
  low_vram: LowVram;
  allowed_origins: string[];
  models_dirs: string[];
  chat_writer: ChatWriterSettings;
  /** CLIP layers to skip when a job does not say (1 = none; 2 suits many anime models). */
  clip_skip: number;
  /**
   * A1111's "SD VAE": "Automatic" (the model's own, or <name>.vae.safetensors beside it), "None"
   * (the model's own only), or the name of a VAE file of GET /api/v1/networks.
   */
  vae: string;
  /** Pictures drawn on the processor use its bf16 matrix products (AVX-512 BF16 CPUs only). */
  cpu_bf16: boolean;
}

/**
 * An OpenAI-compatible chat server (llama.cpp, Ollama, LM Studio) that writes the prompts of chat
 * pictures. Off by default: the built-in writer needs nothing. Any failure falls back to it.
 */
export interface ChatWriterSettings {
  enabled: boolean;
  /** Base address, e.g. http://127.0.0.1:11434/v1. */
  url: string;
  model: string;
  /** Sent as a bearer token when set. */
  api_key: string;
  /** Empty: the built-in instructions. */
  system_prompt: string;
  timeout_seconds: number;
}

/** GET /api/v1/settings: the editable part plus read-only facts. */
export interface Settings extends EditableSettings {
  data_dir: string;
  /** Set when the settings file was damaged and defaults are in use. */
  warning?: string | null;
}

export type ModelFamily = 'SD1' | 'SD2' | 'SDXL' | 'unknown';

export interface ModelInfo {
  name: string;
  family: ModelFamily;
  path: string;
  size_bytes: number;
  /** "diffusers" (a model folder), "safetensors" (a single file) or "pickle" (never loaded). */
  format: string;
  /** Why the model cannot be used as it is, in words for the user; null or absent when it can. */
  problem?: string | null;
  /** True for models in the app's own folder (downloaded by us, so deletable); false for folders the user pointed us at. */
  managed: boolean;
  /** The catalog entry it was downloaded from; null or absent for the user's own models. */
  catalog_id?: string | null;
  /** An SDXL refiner: offered as the Playground's "Refiner", not as a model of its own. */
  refiner: boolean;
  /** A few-step model (Turbo, Lightning, Hyper, LCM, or a merge of one). */
  fast: boolean;
  /** What a request for it starts from, read from its configs; null when unknown. */
  defaults?: ModelDefaults | null;
  /** A single file's sha256 and Civitai's 10-digit AutoV2 hash, once computed. */
  sha256?: string | null;
  short_hash?: string | null;
}

/** A model's own settings (GET /api/v1/models): a fast model's few steps and low CFG. */
export interface ModelDefaults {
  steps: number;
  cfg_scale: number;
  sampler: string;
  schedule: string;
  width: number;
  height: number;
}

/** One LoRA or textual-inversion embedding of GET /api/v1/networks. */
export interface NetworkFile {
  name: string;
  path: string;
  size_bytes: number;
}

/** One VAE file of GET /api/v1/networks: `name` is what the "vae" setting takes. */
export interface VaeFile {
  name: string;
  path: string;
  size_bytes: number;
  /** The model family the file says it is for; null when it does not say (most files). */
  family: ModelFamily | null;
}

/** GET /api/v1/networks: the LoRAs and embeddings a prompt can use, and the VAE files. */
export interface NetworkList {
  loras: NetworkFile[];
  embeddings: NetworkFile[];
  /** Absent from a server from before the VAE setting. */
  vaes?: VaeFile[];
}

/** One recommended model of GET /api/v1/catalog (models/catalog.toml plus this computer's facts). */
export interface CatalogEntry {
  id: string;
  name: string;
  /** Hugging Face repository id. */
  repo: string;
  revision: string;
  family: ModelFamily;
  variant: string | null;
  /** What lands on disk. */
  size_gb: number;
  /** The smallest NVIDIA card that runs it at its native size. */
  min_vram_gb: number;
  native_size: number;
  /** Usable without a graphics card. */
  cpu_ok: boolean;
  /** Needs only a few steps (Turbo, LCM). */
  fast: boolean;
  style: string[];
  licence: string;
  description: string;
  /** Runs well on this computer (GET /catalog only). */
  fits?: boolean;
  /** Already downloaded (GET /catalog only). */
  installed?: boolean;
}

export interface CatalogList {
  models: CatalogEntry[];
  /** The id the guided setup suggests. */
  suggested: string;
  /** Graphics memory the app can use; null: none (the processor draws). */
  vram_gb: number | null;
}

export type DownloadState = 'downloading' | 'done' | 'failed' | 'cancelled';

export interface DownloadProgress {
  /** The file being fetched ('' once all are in). */
  file: string;
  files_done: number;
  files_total: number;
  bytes_done: number;
  bytes_total: number;
}

/** A catalog download (POST/GET /api/v1/downloads, and `download` events). */
export interface DownloadInfo {
  /** The catalog id. */
  id: string;
  name: string;
  state: DownloadState;
  progress: DownloadProgress | null;
  /** What went wrong, in words for people; set when failed. */
  error: string | null;
}

/** GET /api/v1/setup: what the first-start guide needs. */
export interface SetupInfo {
  has_model: boolean;
  suggested: CatalogEntry;
  downloads: DownloadInfo[];
  offline_hint: string;
}

/**
 * POST /api/v1/diagnostics/self-test: the built-in tiny model through the whole pipeline. Only
 * `ok` is relied on; the rest is shown when present.
 */
export interface SelfTestResult {
  ok: boolean;
  model?: string;
  /** "cpu", or the device the test ran on. */
  device?: string;
  load_ms?: number;
  steps?: number;
  step_ms?: number[];
  ms_per_step?: number;
  decode_ms?: number;
  total_ms?: number;
  /** Why it failed, with what to do. */
  error?: ErrorBody | null;
}

export interface ModelList {
  models: ModelInfo[];
  default: string | null;
}

export interface NameList {
  names: string[];
  default: string | null;
}

export type JobState = 'queued' | 'running' | 'done' | 'failed' | 'cancelled';
export type JobStage = 'waiting' | 'loading_model' | 'sampling' | 'decoding' | 'saving' | 'finished';

export interface ErrorBody {
  code: string;
  message: string;
  hint: string | null;
}

export interface ImageRecord {
  id: number;
  file?: string;
  prompt: string;
  negative_prompt: string;
  model: string | null;
  /** null for a picture added from the images folder without settings in it (also below). */
  sampler: string | null;
  schedule: string | null;
  steps: number | null;
  cfg_scale: number | null;
  seed: number | null;
  width: number;
  height: number;
  /** Unix milliseconds. */
  created_at: number;
  favourite: boolean;
  trashed: boolean;
  /** The A1111-style parameters text stored in the PNG. */
  parameters?: string | null;
}

export interface ImagePage {
  items: ImageRecord[];
  total: number;
}

export interface ImageQuery {
  search?: string;
  model?: string;
  favourites?: boolean;
  trash?: boolean;
  /** Unix milliseconds. */
  since?: number;
  until?: number;
  offset?: number;
  limit?: number;
}

export interface JobInfo {
  id: string;
  state: JobState;
  stage: JobStage;
  position: number | null;
  prompt: string;
  negative_prompt: string;
  model: string;
  width: number;
  height: number;
  steps: number;
  cfg_scale: number;
  sampler: string;
  schedule: string;
  seed: number;
  batch: number;
  image: number;
  step: number;
  /** Steps of one picture's whole run (a hires fix's second pass included). */
  total_steps?: number;
  progress: number;
  eta_ms: number | null;
  images: ImageRecord[];
  error: ErrorBody | null;
  /** What the app changed to make the picture fit or look right, in words for the user. */
  notes?: string[];
  created_at: number;
  started_at: number | null;
  finished_at: number | null;
  /** Milliseconds per sampling step (loading and decoding left out); null until measured. */
  step_ms?: number | null;
}

/** POST /api/v1/jobs. Leave a field out to get the preset's, then the app's default. */
export interface JobRequest {
  prompt: string;
  negative_prompt?: string;
  preset?: string;
  model?: string;
  width?: number;
  height?: number;
  steps?: number;
  cfg_scale?: number;
  sampler?: string;
  schedule?: string;
  /** -1: random. */
  seed?: number;
  seed_source?: 'cpu' | 'nv';
  batch_size?: number;
  clip_skip?: number;
  ignore_affixes?: boolean;
  /** An SDXL refiner model's name; it finishes the last steps. */
  refiner?: string;
  /** Where the refiner takes over, 0..1 of the steps (server default 0.8). */
  refiner_switch?: number;
  /** A second pass at a larger size (A1111's "Hires. fix"). */
  hires?: HiresRequest;
}

/** The hires fix of a job request; every field may be left out for the server's default. */
export interface HiresRequest {
  /** How much larger (server default 2). */
  scale?: number;
  /** Final width/height instead of the scale. */
  width?: number;
  height?: number;
  /** Second-pass steps; 0: as many as the first pass. */
  steps?: number;
  /** How much the second pass redraws, above 0 up to 1 (server default 0.7). */
  denoise?: number;
  /** 'Latent', 'Latent (nearest)', 'Latent (nearest-exact)' or 'Lanczos'. */
  upscaler?: string;
}

/** Server-Sent Events of GET /api/v1/events; `type` is also the SSE event name. */
export type JobEvent =
  | { type: 'queued'; job: string; position: number }
  | { type: 'started'; job: string }
  | {
      type: 'progress';
      job: string;
      stage: JobStage;
      image: number;
      batch: number;
      step: number;
      steps: number;
      progress: number;
      eta_ms: number | null;
    }
  | { type: 'preview'; job: string; image: string }
  | { type: 'done'; job: string; images: number[] }
  | { type: 'failed'; job: string; error: ErrorBody }
  | { type: 'cancelled'; job: string };

export const JOB_EVENT_TYPES = ['queued', 'started', 'progress', 'preview', 'done', 'failed', 'cancelled'] as const;

export interface Preset {
  id: string;
  name: string;
  description: string;
  builtin: boolean;
  width: number | null;
  height: number | null;
  steps: number | null;
  cfg_scale: number | null;
  sampler: string | null;
  schedule: string | null;
  prompt_prefix: string;
  prompt_suffix: string;
  negative_prompt: string;
}

/** A preset as sent to POST/PUT: the id and `builtin` are the server's business. */
export type PresetInput = Omit<Preset, 'id' | 'builtin'> & { id?: string };

/** POST /api/v1/images/inspect: the parameters found in a PNG (null where it had none). */
export interface Inspected {
  source: 'a1111' | 'comfyui' | 'invokeai' | 'none' | string;
  prompt: string | null;
  negative_prompt: string | null;
  steps: number | null;
  cfg_scale: number | null;
  seed: number | null;
  width: number | null;
  height: number | null;
  sampler: string | null;
  schedule: string | null;
  model: string | null;
  /** What the PNG held, as found (text chunks or JSON). */
  raw?: unknown;
}

/** How readily "auto" draws a character during a chat. */
export type Eagerness = 'off' | 'low' | 'normal' | 'high';

export interface Character {
  /** Given by the server from the name. */
  id: string;
  name: string;
  /** What the character looks like. */
  appearance: string;
  /** A preset id; null: Portrait for portraits, Scene for scenes. */
  style: string | null;
  negative_prompt: string;
  /** The same seed keeps the same face. */
  seed: number | null;
  model: string | null;
  /** A gallery image id. */
  avatar: number | null;
  eagerness: Eagerness;
}

/** A character as sent to POST/PUT: the id is the server's business. */
export type CharacterInput = Omit<Character, 'id'>;

/** POST /api/v1/characters/{id}/portrait: optional overrides of the character's own settings. */
export interface PortraitOptions {
  model?: string;
  seed?: number;
  steps?: number;
  width?: number;
  height?: number;
}

/** "assistant" is what SillyTavern calls the character; the server takes both. */
export type ChatRole = 'user' | 'character' | 'system' | 'assistant';

export interface ChatMessage {
  role: ChatRole;
  name?: string;
  text: string;
}

export type IllustrateMode = 'portrait' | 'user' | 'scene' | 'last_message' | 'background' | 'auto';

/** A character in a chat request: one of ours by id or name, or described inline. */
export type CharacterRef = string | { name: string; appearance?: string };

export interface IllustrateRequest {
  messages: ChatMessage[];
  characters?: CharacterRef[];
  /** The user's persona, for "user" mode. */
  user?: CharacterRef;
  mode?: IllustrateMode;
  preset?: string;
  model?: string;
  width?: number;
  height?: number;
  steps?: number;
  seed?: number;
}

/** What a portrait or illustrate request did: a queued picture (with its job) or why not. */
export interface Illustrated {
  picture: boolean;
  mode: IllustrateMode | null;
  /** Why (or why not), in plain words. */
  reason: string;
  prompt: string | null;
  negative_prompt: string | null;
  writer: 'built_in' | 'chat_server' | null;
  /** Set when the chat server failed and the built-in writer was used. */
  note: string | null;
  job: JobInfo | null;
}

// ---- Client ----

export interface ApiClientOptions {
  /** Prefix for every path; '' means the page's own origin (the normal case). */
  baseUrl?: string;
  /** Session token; null or '' sends no header (e.g. the Vite dev server without LD_SESSION). */
  token?: string | null;
  /** Injected in tests; defaults to the global fetch. */
  fetch?: typeof fetch;
  /** Injected in tests; defaults to the browser's EventSource. */
  eventSource?: EventSourceFactory;
  /**
   * Fetches the session token again, after the server answered `unauthorized`: a server that
   * restarted (same address) has a new token, and a tab opened before still holds the old one.
   */
  refreshToken?: () => Promise<string | null>;
}

export interface RequestOptions {
  /** Sent as JSON. */
  body?: unknown;
  /** Sent as is (a PNG, TOML text) with this content type; wins over `body`. */
  raw?: { data: Blob | ArrayBuffer | Uint8Array | string; type: string };
  signal?: AbortSignal;
}

/** The part of EventSource the client uses; injected in tests. */
export interface EventSourceLike {
  addEventListener(type: string, listener: (event: MessageEvent) => void): void;
  onerror: ((event: Event) => void) | null;
  onopen: ((event: Event) => void) | null;
  close(): void;
}
export type EventSourceFactory = (url: string) => EventSourceLike;

export interface EventHandlers {
  onEvent: (event: JobEvent) => void;
  /** A catalog download changed (`event: download`). */
  onDownload?: (download: DownloadInfo) => void;
  /** Called on every (re)connection: a good moment to catch up with GET /jobs. */
  onOpen?: () => void;
  /** The stream dropped; EventSource reconnects by itself. */
  onError?: () => void;
}

export type ApiClient = ReturnType<typeof createApiClient>;

export function createApiClient(options: ApiClientOptions = {}) {
  const baseUrl = options.baseUrl ?? '';
  let token = options.token ?? null;
  const doFetch = options.fetch ?? ((input, init) => globalThis.fetch(input, init));

  async function request<T>(method: string, path: string, opts: RequestOptions = {}, retried = false): Promise<T> {
    const headers: Record<string, string> = { Accept: 'application/json' };
    const sent = token;
    if (sent) headers[SESSION_HEADER] = sent;
    let body: BodyInit | undefined;
    if (opts.raw !== undefined) {
      headers['Content-Type'] = opts.raw.type;
      body = opts.raw.data as BodyInit;
    } else if (opts.body !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(opts.body);
    }

    let response: Response;
    try {
      response = await doFetch(baseUrl + path, {
        method,
        headers,
        body,
        signal: opts.signal,
        credentials: 'same-origin',
        cache: 'no-store',
      });
    } catch (err) {
      if (isAbort(err)) {
        throw new ApiError('cancelled', 'The request was stopped.', null, null);
      }
      throw networkError();
    }

    if (!response.ok) {
      const error = await errorFromResponse(response);
      // Once per request: a new token that differs from the one sent is worth one more try.
      if (error.code === 'unauthorized' && !retried && options.refreshToken) {
        const fresh = await options.refreshToken().catch(() => null);
        if (fresh && fresh !== sent) {
          token = fresh;
          return request<T>(method, path, opts, true);
        }
      }
      throw error;
    }

    const text = await readText(response);
    if (text === '') return undefined as T;
    try {
      return JSON.parse(text) as T;
    } catch {
      throw badResponse(response.status);
    }
  }

  const enc = encodeURIComponent;

  /** Opens the event stream; returns a function that closes it. */
  function events(handlers: EventHandlers): () => void {
    const make: EventSourceFactory =
      options.eventSource ?? ((url) => new EventSource(url) as unknown as EventSourceLike);
    const source = make(baseUrl + '/api/v1/events');
    for (const type of JOB_EVENT_TYPES) {
      source.addEventListener(type, (message) => {
        const event = parseEvent(type, message.data);
        if (event) handlers.onEvent(event);
      });
    }
    source.addEventListener('download', (message) => {
      const download = parseDownloadEvent(message.data);
      if (download) handlers.onDownload?.(download);
    });
    source.onopen = () => handlers.onOpen?.();
    source.onerror = () => handlers.onError?.();
    return () => source.close();
  }

  return {
    request,
    events,
    health: (signal?: AbortSignal) => request<Health>('GET', '/api/v1/health', { signal }),
    system: (signal?: AbortSignal) => request<SystemInfo>('GET', '/api/v1/system', { signal }),
    settings: (signal?: AbortSignal) => request<Settings>('GET', '/api/v1/settings', { signal }),
    saveSettings: (settings: EditableSettings) => request<Settings>('PUT', '/api/v1/settings', { body: settings }),

    models: (signal?: AbortSignal) => request<ModelList>('GET', '/api/v1/models', { signal }),
    /** Deletes a model Local Diffusers downloaded; the user's own files answer `forbidden`. */
    deleteModel: (name: string) => request<{ deleted: string }>('DELETE', `/api/v1/models/${enc(name)}`),
    /** Computes a single-file model's sha256 and AutoV2 hash (reads the whole file). */
    hashModel: (name: string) =>
      request<{ name: string; sha256: string; short_hash: string }>('POST', '/api/v1/models/hash', { body: { name } }),
    /** Converts a pickle (.ckpt) model to .safetensors in the app's models folder, without running it. */
    convertModel: (name: string) =>
      request<{ path: string; tensors: number; bytes: number }>('POST', '/api/v1/models/convert', { body: { name } }),
    /** The LoRAs and embeddings in the models folders. */
    networks: (signal?: AbortSignal) => request<NetworkList>('GET', '/api/v1/networks', { signal }),
    catalog: (signal?: AbortSignal) => request<CatalogList>('GET', '/api/v1/catalog', { signal }),
    setup: (signal?: AbortSignal) => request<SetupInfo>('GET', '/api/v1/setup', { signal }),
    downloads: (signal?: AbortSignal) => request<DownloadInfo[]>('GET', '/api/v1/downloads', { signal }),
    /** Starts a catalog download; starting one that failed or was cancelled resumes it. */
    startDownload: (id: string) => request<DownloadInfo>('POST', '/api/v1/downloads', { body: { id } }),
    cancelDownload: (id: string) => request<DownloadInfo>('POST', `/api/v1/downloads/${enc(id)}/cancel`),
    /** Runs the whole pipeline on the built-in tiny model; `not_found` from a server without it. */
    selfTest: () => request<SelfTestResult>('POST', '/api/v1/diagnostics/self-test'),
    samplers: async (signal?: AbortSignal): Promise<NameList> => {
      const r = await request<{ samplers: string[]; default: string | null }>('GET', '/api/v1/samplers', { signal });
      return { names: r.samplers, default: r.default };
    },
    schedules: async (signal?: AbortSignal): Promise<NameList> => {
      const r = await request<{ schedules: string[]; default: string | null }>('GET', '/api/v1/schedules', { signal });
      return { names: r.schedules, default: r.default };
    },

    createJob: (job: JobRequest) => request<JobInfo>('POST', '/api/v1/jobs', { body: job }),
    jobs: (signal?: AbortSignal) => request<JobInfo[]>('GET', '/api/v1/jobs', { signal }),
    job: (id: string) => request<JobInfo>('GET', `/api/v1/jobs/${enc(id)}`),
    cancelJob: (id: string) => request<JobInfo>('POST', `/api/v1/jobs/${enc(id)}/cancel`),

    images: (query: ImageQuery = {}, signal?: AbortSignal) =>
      request<ImagePage>('GET', `/api/v1/images${queryString(query)}`, { signal }),
    image: (id: number) => request<ImageRecord>('GET', `/api/v1/images/${id}`),
    setFavourite: (id: number, favourite: boolean) =>
      request<ImageRecord>('PUT', `/api/v1/images/${id}/favourite`, { body: { favourite } }),
    trashImage: (id: number) => request<unknown>('DELETE', `/api/v1/images/${id}`),
    restoreImage: (id: number) => request<ImageRecord>('POST', `/api/v1/images/${id}/restore`),
    emptyTrash: () => request<{ deleted: number }>('DELETE', '/api/v1/trash'),
    inspect: (png: Blob | ArrayBuffer) =>
      request<Inspected>('POST', '/api/v1/images/inspect', { raw: { data: png, type: 'image/png' } }),
    /** Addresses for <img src> and download links (plain GETs, no token needed). */
    imageFileUrl: (id: number) => `${baseUrl}/api/v1/images/${id}/file`,
    thumbnailUrl: (id: number) => `${baseUrl}/api/v1/images/${id}/thumbnail`,

    presets: (signal?: AbortSignal) => request<Preset[]>('GET', '/api/v1/presets', { signal }),
    createPreset: (preset: PresetInput) => request<Preset>('POST', '/api/v1/presets', { body: preset }),
    updatePreset: (id: string, preset: PresetInput) =>
      request<Preset>('PUT', `/api/v1/presets/${enc(id)}`, { body: preset }),
    deletePreset: (id: string) => request<unknown>('DELETE', `/api/v1/presets/${enc(id)}`),
    importPreset: (toml: string) =>
      request<Preset>('POST', '/api/v1/presets/import', { raw: { data: toml, type: 'application/toml' } }),
    presetExportUrl: (id: string) => `${baseUrl}/api/v1/presets/${enc(id)}/export`,

    characters: (signal?: AbortSignal) => request<Character[]>('GET', '/api/v1/characters', { signal }),
    character: (id: string) => request<Character>('GET', `/api/v1/characters/${enc(id)}`),
    createCharacter: (c: CharacterInput) => request<Character>('POST', '/api/v1/characters', { body: c }),
    updateCharacter: (id: string, c: CharacterInput) =>
      request<Character>('PUT', `/api/v1/characters/${enc(id)}`, { body: c }),
    deleteCharacter: (id: string) => request<unknown>('DELETE', `/api/v1/characters/${enc(id)}`),
    /** Our exported JSON, a card's JSON, or a SillyTavern/TavernAI card PNG, sent as is. */
    importCharacter: (data: Blob | ArrayBuffer, type: string) =>
      request<Character>('POST', '/api/v1/characters/import', { raw: { data, type } }),
    characterExportUrl: (id: string) => `${baseUrl}/api/v1/characters/${enc(id)}/export`,
    portrait: (id: string, options: PortraitOptions = {}) =>
      request<Illustrated>('POST', `/api/v1/characters/${enc(id)}/portrait`, { body: options }),
    illustrate: (req: IllustrateRequest) => request<Illustrated>('POST', '/api/v1/chat/illustrate', { body: req }),
  };
}

/** "?search=cat&limit=50" from the set fields of an image query; "" when none is set. */
export function queryString(query: ImageQuery): string {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value === undefined || value === null || value === '' || value === false) continue;
    params.set(key, String(value));
  }
  const text = params.toString();
  return text ? `?${text}` : '';
}

/** One SSE message as a JobEvent; null when it is not one (a newer server's extra fields are fine). */
export function parseEvent(type: string, data: unknown): JobEvent | null {
  if (typeof data !== 'string') return null;
  try {
    const parsed = JSON.parse(data) as { type?: unknown; job?: unknown };
    if (typeof parsed !== 'object' || parsed === null || typeof parsed.job !== 'string') return null;
    return { ...parsed, type: (parsed.type as string | undefined) ?? type } as JobEvent;
  } catch {
    return null;
  }
}

/** One `download` SSE message as a DownloadInfo; null when it is not one. */
export function parseDownloadEvent(data: unknown): DownloadInfo | null {
  if (typeof data !== 'string') return null;
  try {
    const parsed = JSON.parse(data) as Record<string, unknown> | null;
    if (typeof parsed !== 'object' || parsed === null) return null;
    if (typeof parsed.id !== 'string' || typeof parsed.state !== 'string') return null;
    const { type: _type, ...info } = parsed;
    return {
      ...info,
      name: typeof info.name === 'string' ? info.name : info.id,
      progress: (info.progress as DownloadProgress | null | undefined) ?? null,
      error: typeof info.error === 'string' ? info.error : null,
    } as DownloadInfo;
  } catch {
    return null;
  }
}

/** Reads the session token the server put into index.html; null outside a browser. */
export function readSessionToken(doc: Pick<Document, 'querySelector'> | undefined = globalThis.document): string | null {
  const meta = doc?.querySelector<HTMLMetaElement>(`meta[name="${SESSION_META}"]`);
  const token = meta?.content.trim();
  return token ? token : null;
}

let defaultClient: ApiClient | null = null;

/** The session token of the page the server serves now (it changes when the server restarts). */
export async function fetchSessionToken(doFetch: typeof fetch = (i, o) => globalThis.fetch(i, o)): Promise<string | null> {
  const response = await doFetch('/', { cache: 'no-store', credentials: 'same-origin' });
  if (!response.ok) return null;
  const html = await response.text();
  return readSessionToken(new DOMParser().parseFromString(html, 'text/html'));
}

/** The client pages use: same origin, token from the page. Created on first use. */
export function api(): ApiClient {
  defaultClient ??= createApiClient({ token: readSessionToken(), refreshToken: () => fetchSessionToken() });
  return defaultClient;
}

/** Turns anything thrown into an ApiError, so pages have one shape to show. */
export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  return new ApiError(
    'internal',
    'Something went wrong in the app window.',
    'Reload the page. If it keeps happening, copy the report on the Diagnostics page.',
    null,
  );
}

// ---- Helpers ----

function isServerCode(value: unknown): value is ServerErrorCode {
  return typeof value === 'string' && (SERVER_ERROR_CODES as readonly string[]).includes(value);
}

function isAbort(err: unknown): boolean {
  return typeof err === 'object' && err !== null && (err as { name?: unknown }).name === 'AbortError';
}

async function readText(response: Response): Promise<string> {
  try {
    return await response.text();
  } catch {
    throw networkError();
  }
}

function networkError(): ApiError {
  return new ApiError(
    'network',
    'Can’t reach Local Diffusers.',
    'Check that the app is still running, then try again.',
    null,
  );
}

function badResponse(status: number): ApiError {
  return new ApiError(
    'bad_response',
    `The app sent an answer the page could not read (HTTP ${status}).`,
    'Reload the page. If it keeps happening, restart Local Diffusers.',
    status,
  );
}

/** Code to use when an error answer has no JSON body (a proxy page, an empty 404). */
function codeForStatus(status: number): ServerErrorCode {
  switch (status) {
    case 400:
    case 413:
    case 422:
      return 'invalid_request';
    case 401:
      return 'unauthorized';
    case 403:
      return 'forbidden';
    case 404:
      return 'not_found';
    case 429:
    case 503:
      return 'busy';
    default:
      return 'internal';
  }
}

async function errorFromResponse(response: Response): Promise<ApiError> {
  const status = response.status;
  let text = '';
  try {
    text = await response.text();
  } catch {
    // Body lost mid-way; fall back to the status below.
  }

  let parsed: unknown = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    parsed = null;
  }

  if (parsed !== null && typeof parsed === 'object') {
    const { code, message, hint } = parsed as Record<string, unknown>;
    if (typeof message === 'string' && message.trim() !== '') {
      return new ApiError(
        // A code this UI does not know yet (a newer server) still reads as an error of its status.
        isServerCode(code) ? code : codeForStatus(status),
        message,
        typeof hint === 'string' && hint.trim() !== '' ? hint : null,
        status,
      );
    }
  }

  return new ApiError(
    codeForStatus(status),
    `The app could not do that (HTTP ${status}).`,
    'Try again. If it keeps happening, copy the report on the Diagnostics page.',
    status,
  );
}
