// Calls to the appliance from the console: the session cookie authenticates them, and every request
// that changes state repeats the session's CSRF token, as the server requires.

const UNSAFE = new Set(['POST', 'PATCH', 'PUT', 'DELETE']);
let csrfToken = null;
let onUnauthorized = () => {};

export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function setCsrfToken(token) { csrfToken = token; }
export function whenUnauthorized(handler) { onUnauthorized = handler; }

export function headers(method, extra = {}) {
  const out = { ...extra };
  if (UNSAFE.has(method) && csrfToken) out['X-CSRF-Token'] = csrfToken;
  return out;
}

// The message of an error answer: the OpenAI-shaped body's message, else the status line.
export async function errorOf(resp) {
  let message = `${resp.status} ${resp.statusText}`.trim();
  let code = '';
  try {
    const body = await resp.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || '';
      if (Array.isArray(body.error.problems) && body.error.problems.length > 1) message += '\n• ' + body.error.problems.join('\n• ');
    }
  } catch { /* not JSON: the status line says it */ }
  return new ApiError(message, resp.status, code);
}

// fetch to the appliance; an answer that is not 2xx is thrown as an ApiError with the server's message.
// A 401 means the session ended (logout elsewhere, revoked key): the console goes back to the login.
export async function send(method, path, { body, signal, accept } = {}) {
  const init = { method, credentials: 'same-origin', signal, headers: headers(method, accept ? { Accept: accept } : {}) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers['Content-Type'] = 'application/json';
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError(`the appliance did not answer (${err.message}); is it running?`, 0, 'network');
  }
  if (!resp.ok) {
    const err = await errorOf(resp);
    if (resp.status === 401 && !path.startsWith('/ui/login')) onUnauthorized(err);
    throw err;
  }
  return resp;
}

export async function call(method, path, body) {
  const resp = await send(method, path, { body });
  return resp.status === 204 ? null : resp.json();
}

export const get = (path) => call('GET', path);

// The text of a streamed body, piece by piece as it arrives.
async function readText(resp, onText) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onText(decoder.decode(value, { stream: true }));
  }
}

// Server-sent events from a streamed body: calls onEvent(eventName, data) for each event.
export async function readEvents(resp, onEvent) {
  let buffer = '';
  await readText(resp, (text) => {
    buffer += text.replace(/\r\n/g, '\n');
    let cut;
    while ((cut = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) event = line.slice(6).trim();
        else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      }
      if (data.length) onEvent(event, data.join('\n'));
    }
  });
}

// Text lines from a streamed body (a followed log): calls onLine(line) for each complete line.
export async function readLines(resp, onLine) {
  let buffer = '';
  await readText(resp, (text) => {
    buffer += text;
    const lines = buffer.split('\n');
    buffer = lines.pop();
    for (const line of lines) onLine(line);
  });
  if (buffer) onLine(buffer);
}
