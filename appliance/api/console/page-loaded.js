// Loaded: the endpoints that hold replicas now, as `appliance ps` lists them (memory claimed and in use,
// idle time, when keep_alive unloads each), each device's claims against its budget, and unload by hand.

import { call, get } from './api.js';
import { badge, bytes, errorSlot, fill, h, notify, panel, table } from './dom.js';
import { meter } from './page-gpus.js';

const EVERY_MS = 2000;

// Seconds as `appliance ps` counts them, in minutes or hours once they are long.
function duration(n) {
  const s = Math.round(n);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function unloadsIn(e) {
  if (e.pin) return h('span', { class: 'badge info' }, 'pinned');
  if (e.unloads_in_seconds === null || e.unloads_in_seconds === undefined) return h('span', { class: 'muted' }, 'never');
  return duration(e.unloads_in_seconds);
}

function device(m) {
  const where = m.device === 'host' ? 'Host memory' : `GPU ${m.device}`;
  return meter(`${where}: ${bytes(m.claimed)} of ${bytes(m.budget)} claimed`, m.budget ? (100 * m.claimed) / m.budget : null);
}

export function mount(main, ctx) {
  const list = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  const memory = h('div', {});
  const updated = h('span', { class: 'muted small', 'aria-live': 'polite' });
  const error = errorSlot();
  main.append(
    h('h1', {}, 'Loaded'),
    h('div', { class: 'bar' },
      h('span', { class: 'muted small' }, 'Endpoints with replicas now, as ', h('code', {}, 'appliance ps'), ' shows them.'),
      h('span', { class: 'spacer' }), updated),
    error.el,
    h('section', { class: 'panel', 'aria-label': 'Loaded endpoints' }, list),
    panel('Memory claimed', memory));

  async function unload(e, button) {
    button.disabled = true;
    try {
      const done = await call('POST', `/api/v1/endpoints/${encodeURIComponent(e.endpoint)}/unload`);
      notify(done.changed ? `Unloading ${e.endpoint}: its replicas drain and stop.` : `${e.endpoint} is already unloading.`, { ok: true });
    } catch (err) {
      notify(`Unloading ${e.endpoint} failed: ${err.message}`);
      button.disabled = false;
    }
  }

  function unloadButton(e) {
    if (e.pin) return '';
    const ro = ctx.session.read_only;
    return h('button', {
      type: 'button', class: 'quiet danger small-button', 'aria-label': `Unload ${e.endpoint}`, onclick: (event) => unload(e, event.currentTarget),
      disabled: ro, title: ro ? 'needs an admin key' : 'drain its replicas and stop them; its next request loads it again',
    }, 'Unload');
  }

  ctx.poll(async () => {
    try {
      const ps = await get('/api/v1/ps');
      error.clear();
      updated.textContent = `updated ${new Date().toLocaleTimeString()} · every ${EVERY_MS / 1000} s`;
      fill(list, table([
        { label: 'Endpoint', cell: (e) => h('a', { href: `#/endpoints/${encodeURIComponent(e.endpoint)}` }, e.endpoint) },
        { label: 'Status', cell: (e) => badge(e.status) },
        {
          label: 'Replicas', num: true,
          cell: (e) => h('span', { title: Object.entries(e.replicas).map(([id, state]) => `${id}: ${state}`).join('\n') }, Object.keys(e.replicas).length),
        },
        { label: 'GPUs', cell: (e) => e.gpus.join(', ') || '—' },
        { label: 'GPU claim', num: true, cell: (e) => (e.gpu_claim ? bytes(e.gpu_claim) : '—') },
        { label: 'Host claim', num: true, cell: (e) => (e.host_claim ? bytes(e.host_claim) : '—') },
        { label: 'GPU in use', num: true, cell: (e) => bytes(e.gpu_memory_used) },
        { label: 'In flight', num: true, cell: (e) => e.in_flight },
        { label: 'Idle', num: true, cell: (e) => duration(e.idle_seconds) },
        { label: 'Unloads in', cell: unloadsIn },
        { label: '', cell: unloadButton },
      ], ps.data, { empty: 'No endpoint is loaded. An on-demand endpoint loads on its first request.' }));
      fill(memory, ps.memory.length
        ? ps.memory.map(device)
        : h('p', { class: 'muted' }, 'No device has a memory budget: no GPU is seen and [residency] host_memory_budget is not set.'));
    } catch (err) {
      error.show(err);
    }
  }, EVERY_MS);
}
