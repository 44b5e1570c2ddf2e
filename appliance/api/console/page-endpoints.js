// Endpoints: status, replicas by state, URL and access, refreshed every few seconds.

import { get } from './api.js';
import { badge, errorSlot, fill, h, table } from './dom.js';

const EVERY_MS = 3000;

export function replicaChips(counts) {
  const entries = Object.entries(counts || {}).filter(([, n]) => n > 0);
  if (!entries.length) return h('span', { class: 'muted' }, 'none');
  return h('span', { class: 'chips' }, entries.map(([state, n]) => h('span', { class: `badge ${chipTone(state)}` }, `${n} ${state.toLowerCase()}`)));
}

function chipTone(state) {
  return { HEALTHY: 'ok', STARTING: 'info', PROVISIONING: 'info', DRAINING: 'info', UNHEALTHY: 'warn', FAILED: 'bad' }[state] || '';
}

export function urls(name) {
  return h('div', {},
    h('code', {}, `${location.origin}/v1`), h('span', { class: 'muted small' }, ` model "${name}"`), h('br'),
    h('code', { class: 'muted' }, `${location.origin}/endpoints/${name}/`));
}

export function mount(main, ctx) {
  const list = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  const updated = h('span', { class: 'muted small', 'aria-live': 'polite' });
  const error = errorSlot();
  main.append(
    h('h1', {}, 'Endpoints'),
    h('div', { class: 'bar' },
      ctx.session.read_only
        ? h('button', { type: 'button', disabled: true, title: 'needs an admin key' }, 'Create endpoint')
        : h('a', { class: 'button', href: '#/create' }, 'Create endpoint'),
      h('span', { class: 'spacer' }), updated),
    error.el,
    h('section', { class: 'panel', 'aria-label': 'Endpoint list' }, list));

  ctx.poll(async () => {
    try {
      const body = await get('/api/v1/endpoints?limit=1000');
      error.clear();
      updated.textContent = `updated ${new Date().toLocaleTimeString()} · every ${EVERY_MS / 1000} s`;
      fill(list, table([
        { label: 'Name', cell: (e) => h('a', { href: `#/endpoints/${encodeURIComponent(e.name)}` }, e.name) },
        { label: 'Status', cell: (e) => h('div', {}, badge(e.status), e.status_message ? h('div', { class: 'muted small' }, e.status_message) : null) },
        { label: 'Replicas', cell: (e) => h('div', {}, replicaChips(e.replica_counts), h('div', { class: 'muted small' }, `desired ${e.desired_replicas}`)) },
        { label: 'URL', cell: (e) => urls(e.name) },
        { label: 'Access', cell: (e) => (e.public ? badge('public') : h('span', { class: 'badge' }, 'private')) },
        { label: 'Runtime', cell: (e) => e.runtime },
      ], body.data, { empty: 'No endpoints yet. Create one from a model folder.' }));
    } catch (err) {
      error.show(err);
    }
  }, EVERY_MS);
}
