// The console: login, the page router (hash routes) and the polling every live page uses.

import { ApiError, call, send, setCsrfToken, whenUnauthorized } from './api.js';
import { clear, dismiss, field, fill, h, notify, pageLeft } from './dom.js';
import * as chat from './page-chat.js';
import * as create from './page-create.js';
import * as endpoint from './page-endpoint.js';
import * as endpoints from './page-endpoints.js';
import * as gpus from './page-gpus.js';
import * as keys from './page-keys.js';
import * as loaded from './page-loaded.js';
import * as usage from './page-usage.js';

const main = document.getElementById('main');
let session = null;
let unmount = () => {};

// What a page gets: the session, a place to draw, and timers that stop when the page is left.
function context() {
  const timers = new Set();
  const aborts = new Set();
  let live = true;
  return {
    session,
    get live() { return live; },
    // Run fn now and again `ms` after each run ends (never two at once); stops when the page is left.
    poll(fn, ms) {
      const run = async () => {
        if (!live) return;
        try { await fn(); } finally {
          if (live) timers.add(setTimeout(run, ms));
        }
      };
      run();
    },
    controller() {
      const c = new AbortController();
      aborts.add(c);
      return c;
    },
    stop() {
      live = false;
      timers.forEach(clearTimeout);
      aborts.forEach((c) => c.abort());
    },
  };
}

const PAGES = [
  [/^#\/endpoints\/([^/]+)$/, endpoint, 'endpoints'],
  [/^#\/endpoints\/?$/, endpoints, 'endpoints'],
  [/^#\/create$/, create, 'create'],
  [/^#\/chat(?:\/([^/]+))?$/, chat, 'chat'],
  [/^#\/keys$/, keys, 'keys'],
  [/^#\/gpus$/, gpus, 'gpus'],
  [/^#\/loaded$/, loaded, 'loaded'],
  [/^#\/usage$/, usage, 'usage'],
];

function route() {
  if (!session) return;
  const hash = location.hash || '#/endpoints';
  const found = PAGES.find(([pattern]) => pattern.test(hash));
  if (!found) { location.hash = '#/endpoints'; return; }
  const [pattern, page, nav] = found;
  const args = (hash.match(pattern) || []).slice(1).map((a) => (a === undefined ? undefined : decodeURIComponent(a)));
  unmount();
  pageLeft();
  clear(main);
  document.querySelectorAll('.top nav a').forEach((a) => {
    if (a.dataset.page === nav) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  });
  const ctx = context();
  unmount = () => ctx.stop();
  page.mount(main, ctx, ...args);
}

function showLogin(reason) {
  const shown = document.getElementById('login-error');
  if (!session && shown) { shown.textContent = reason || ''; return; } // a late answer: keep what is typed
  session = null;
  setCsrfToken(null);
  unmount();
  unmount = () => {};
  document.getElementById('top').hidden = true;
  document.title = 'Log in · appliance console';
  const key = h('input', { type: 'password', name: 'key', autocomplete: 'current-password', required: true, spellcheck: 'false' });
  const error = h('p', { class: 'error', role: 'alert', id: 'login-error' }, reason || '');
  const submit = h('button', { type: 'submit' }, 'Log in');
  const form = h('form', { class: 'panel', 'aria-describedby': 'login-error' },
    h('h1', {}, 'appliance console'),
    h('p', { class: 'muted' }, 'Log in with an API key that has the admin scope, or the read scope to look without changing anything. ',
      'The admin key is in ', h('code', {}, 'state_dir/admin.key'), '.'),
    field('API key', key),
    error,
    submit);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    submit.disabled = true;
    error.textContent = '';
    try {
      const resp = await send('POST', '/ui/login', { body: { key: key.value.trim() } });
      start(await resp.json());
    } catch (err) {
      error.textContent = err.message;
      key.focus();
    } finally {
      submit.disabled = false;
    }
  });
  fill(main, h('div', { class: 'login' }, form));
  key.focus();
}

function start(who) {
  session = who;
  setCsrfToken(who.csrf_token);
  document.getElementById('top').hidden = false;
  document.title = 'appliance console';
  const label = document.getElementById('who');
  label.textContent = `${who.name}${who.read_only ? ' · read-only' : ''}`;
  label.title = `key ${who.key_id}, scopes: ${who.scopes.join(', ')}`;
  route();
  main.focus(); // the login form is gone: keyboard focus starts at the page
}

whenUnauthorized((err) => showLogin(`${err.message}`));
window.addEventListener('hashchange', route);
document.getElementById('notice-close').addEventListener('click', dismiss);
document.getElementById('logout').addEventListener('click', async () => {
  try {
    await call('POST', '/ui/logout');
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) { notify(`Logging out failed: ${err.message}`); return; }
  }
  showLogin('Logged out.');
});

(async () => {
  let reason = '';
  try {
    const who = await call('GET', '/ui/session');
    if (who.logged_in) { start(who); return; }
    reason = who.reason;
  } catch (err) {
    reason = err.message;
  }
  showLogin(reason);
})();
