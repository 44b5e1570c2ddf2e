// API keys: create (the secret is shown this once) and revoke.

import { call, get } from './api.js';
import { badge, check, clear, confirm, errorSlot, field, fill, h, notify, numberOrNull, table, when } from './dom.js';

export function mount(main, ctx) {
  main.append(h('h1', {}, 'API keys'));
  if (ctx.session.read_only) {
    main.append(h('section', { class: 'panel' }, h('p', {}, 'Keys are listed, created and revoked with an admin key; this session is read-only.')));
    return;
  }
  const secret = h('div', {});
  const list = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  const error = errorSlot();
  const all = h('input', { type: 'checkbox' });

  const load = async () => {
    try {
      const body = await get('/api/v1/keys?limit=1000');
      error.clear();
      const rows = body.data.filter((k) => all.checked || k.status === 'active');
      fill(list, table([
        { label: 'Name', cell: (k) => h('div', {}, k.name, k.id === ctx.session.key_id ? h('span', { class: 'muted small' }, ' (this session)') : null) },
        { label: 'Key', cell: (k) => h('code', {}, `${k.prefix}…`) },
        { label: 'Id', cell: (k) => h('code', { class: 'muted' }, k.id) },
        { label: 'Scopes', cell: (k) => k.scopes.join(', ') },
        { label: 'Endpoints', cell: (k) => (k.endpoints ? k.endpoints.join(', ') : 'all') },
        { label: 'Status', cell: (k) => badge(k.status) },
        { label: 'Created', cell: (k) => when(k.created_at) },
        { label: 'Expires', cell: (k) => (k.expires_at ? when(k.expires_at) : 'never') },
        { label: 'Last used', cell: (k) => when(k.last_used_at) },
        { label: '', cell: (k) => (k.status === 'revoked' ? '' : h('button', { type: 'button', class: 'quiet danger small-button', 'aria-label': `Revoke ${k.name}`, onclick: () => revoke(k) }, 'Revoke')) },
      ], rows, { empty: 'No active keys.' }));
    } catch (err) {
      error.show(err);
    }
  };

  async function revoke(k) {
    const own = k.id === ctx.session.key_id ? ' This is the key of this session: the console logs out.' : '';
    if (!(await confirm(`Revoke key ${k.name}?`, `Requests with ${k.prefix}… are refused from now on.${own}`, 'Revoke'))) return;
    try {
      await call('DELETE', `/api/v1/keys/${encodeURIComponent(k.id)}`);
      notify(`Key ${k.name} revoked.`, { ok: true });
      await load();
    } catch (err) {
      notify(`Revoking ${k.name} failed: ${err.message}`);
    }
  }

  const name = h('input', { type: 'text', required: true, maxlength: 100 });
  const scopes = ['inference', 'read', 'admin'].map((s) => [s, h('input', { type: 'checkbox', value: s, checked: s === 'inference' })]);
  const endpoints = h('input', { type: 'text', placeholder: 'all endpoints' });
  const expires = h('input', { type: 'text', placeholder: 'never' });
  const rpm = h('input', { type: 'number', min: 1, placeholder: 'no limit' });
  const tpm = h('input', { type: 'number', min: 1, placeholder: 'no limit' });
  const formError = h('p', { class: 'error', role: 'alert' });
  const form = h('form', { class: 'panel' }, h('h2', {}, 'Create a key'),
    h('div', { class: 'grid' }, field('Name', name), field('Endpoints', endpoints, 'comma-separated; empty: all'), field('Expires', expires, 'a duration or an ISO date; empty: never'),
      field('Requests/min', rpm), field('Tokens/min', tpm)),
    h('fieldset', {}, h('legend', {}, 'Scopes'), scopes.map(([s, box]) => check(s, box)),
      h('p', { class: 'hint' }, 'inference: call the gateway; read: read the admin API and this console; admin: everything.')),
    formError, h('button', { type: 'submit' }, 'Create key'));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    formError.textContent = '';
    const body = { name: name.value.trim(), scopes: scopes.filter(([, box]) => box.checked).map(([s]) => s) };
    const eps = endpoints.value.split(',').map((e) => e.trim()).filter(Boolean);
    if (eps.length) body.endpoints = eps;
    const exp = expires.value.trim();
    if (exp) body[/^\d+(\.\d+)?[smhdw]?$/.test(exp) ? 'expires_in' : 'expires_at'] = exp;
    if (numberOrNull(rpm)) body.rpm_limit = numberOrNull(rpm);
    if (numberOrNull(tpm)) body.tpm_limit = numberOrNull(tpm);
    try {
      const made = await call('POST', '/api/v1/keys', body);
      form.reset();
      const copy = h('button', { type: 'button', class: 'quiet' }, 'Copy');
      const value = h('code', { id: 'new-key' }, made.key);
      copy.addEventListener('click', async () => {
        try { await navigator.clipboard.writeText(made.key); copy.textContent = 'Copied'; } catch { copy.textContent = 'Select the key and copy it'; }
      });
      fill(secret, h('div', { class: 'secret', role: 'status' },
        h('strong', {}, `Key ${made.name} created. Copy it now: it is shown only this once and stored only as a hash.`),
        value, h('div', { class: 'bar' }, copy, h('button', { type: 'button', onclick: () => clear(secret) }, 'Done, hide it'))));
      copy.focus();
      await load();
    } catch (err) {
      formError.textContent = err.message;
    }
  });

  all.addEventListener('change', load);
  main.append(secret, form, error.el,
    h('section', { class: 'panel' }, h('div', { class: 'bar' }, h('h2', {}, 'Keys'), h('span', { class: 'spacer' }), check('Show revoked and expired', all)), list));
  load();
}
