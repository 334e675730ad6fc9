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
  'out_of_memory',
  'cancelled',
  'busy',
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

/** UI settings. Only `data_dir` is fixed so far; the rest is free-form until settings land. */
export interface Settings {
  data_dir: string;
  [key: string]: unknown;
}

// ---- Client ----

export interface ApiClientOptions {
  /** Prefix for every path; '' means the page's own origin (the normal case). */
  baseUrl?: string;
  /** Session token; null or '' sends no header (e.g. the Vite dev server without LD_SESSION). */
  token?: string | null;
  /** Injected in tests; defaults to the global fetch. */
  fetch?: typeof fetch;
}

export interface RequestOptions {
  body?: unknown;
  signal?: AbortSignal;
}

export type ApiClient = ReturnType<typeof createApiClient>;

export function createApiClient(options: ApiClientOptions = {}) {
  const baseUrl = options.baseUrl ?? '';
  const token = options.token ?? null;
  const doFetch = options.fetch ?? ((input, init) => globalThis.fetch(input, init));

  async function request<T>(method: string, path: string, opts: RequestOptions = {}): Promise<T> {
    const headers: Record<string, string> = { Accept: 'application/json' };
    if (token) headers[SESSION_HEADER] = token;
    let body: string | undefined;
    if (opts.body !== undefined) {
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

    if (!response.ok) throw await errorFromResponse(response);

    const text = await readText(response);
    if (text === '') return undefined as T;
    try {
      return JSON.parse(text) as T;
    } catch {
      throw badResponse(response.status);
    }
  }

  return {
    request,
    health: (signal?: AbortSignal) => request<Health>('GET', '/api/v1/health', { signal }),
    system: (signal?: AbortSignal) => request<SystemInfo>('GET', '/api/v1/system', { signal }),
    settings: (signal?: AbortSignal) => request<Settings>('GET', '/api/v1/settings', { signal }),
  };
}

/** Reads the session token the server put into index.html; null outside a browser. */
export function readSessionToken(doc: Pick<Document, 'querySelector'> | undefined = globalThis.document): string | null {
  const meta = doc?.querySelector<HTMLMetaElement>(`meta[name="${SESSION_META}"]`);
  const token = meta?.content.trim();
  return token ? token : null;
}

let defaultClient: ApiClient | null = null;

/** The client pages use: same origin, token from the page. Created on first use. */
export function api(): ApiClient {
  defaultClient ??= createApiClient({ token: readSessionToken() });
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
