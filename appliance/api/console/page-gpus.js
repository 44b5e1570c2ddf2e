// GPUs: utilisation and memory as NVML reports them, the memory replicas claim against each GPU's budget, and who holds it.

import { get } from './api.js';
import { badge, bytes, errorSlot, fill, h, table } from './dom.js';

const EVERY_MS = 2000;

// A labelled bar (also the Loaded page's memory lines); `percent` null shows n/a.
export function meter(label, percent) {
  const p = Math.max(0, Math.min(100, percent ?? 0));
  const fill = h('span', {});
  fill.style.width = `${p}%`; // through the CSSOM, which the style policy allows (style attributes it does not)
  return h('div', {},
    h('div', { class: 'bar small meter-label' }, h('span', {}, label), h('span', { class: 'spacer' }), h('strong', {}, percent === null || percent === undefined ? 'n/a' : `${Math.round(p)} %`)),
    h('div', { class: `meter${p >= 90 ? ' hot' : ''}`, role: 'meter', 'aria-label': label, 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': Math.round(p) },
      fill));
}

function card(g) {
  const memPct = g.memory_total ? (100 * g.memory_used) / g.memory_total : 0;
  return h('section', { class: 'panel', 'aria-label': `GPU ${g.index}` },
    h('h2', {}, `GPU ${g.index} · ${g.name} `, g.allowed ? null : h('span', { class: 'badge warn' }, 'not in [gpus] devices')),
    h('p', { class: 'muted small mono' }, g.uuid),
    meter('Utilisation', g.utilization_gpu),
    meter(`Memory ${bytes(g.memory_used)} of ${bytes(g.memory_total)}`, memPct),
    meter(`Claimed ${bytes(g.claimed)} of a ${bytes(g.budget)} budget`, g.budget ? (100 * g.claimed) / g.budget : null),
    h('p', { class: 'small' }, `MIG: ${g.mig_mode || 'n/a'}`),
    h('h3', {}, 'Held by'),
    g.held_by.length
      ? h('ul', {}, g.held_by.map((r) => h('li', {}, h('code', {}, r.replica), r.claim ? ` — claims ${bytes(r.claim)}` + (r.share ? ` (${r.share} share)` : '') : r.share ? ` — ${r.share} of it` : ' — whole GPU')))
      : h('p', { class: 'muted' }, 'no replica'),
    h('h3', {}, 'Processes'),
    g.processes.length ? table([
      { label: 'PID', cell: (p) => p.pid },
      { label: 'Memory', num: true, cell: (p) => bytes(p.used_memory) },
    ], g.processes) : h('p', { class: 'muted' }, 'none'));
}

export function mount(main, ctx) {
  const body = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  const updated = h('span', { class: 'muted small' });
  const error = errorSlot();
  main.append(h('h1', {}, 'GPUs'), h('div', { class: 'bar' }, h('span', { class: 'spacer' }), updated), error.el, body);
  ctx.poll(async () => {
    try {
      const gpus = await get('/api/v1/gpus');
      error.clear();
      updated.textContent = `updated ${new Date().toLocaleTimeString()} · every ${EVERY_MS / 1000} s`;
      if (!gpus.available) {
        fill(body, h('section', { class: 'panel', role: 'status' },
          h('h2', {}, badge('no NVML'), ' No GPU information on this box'),
          h('p', {}, 'NVML (the NVIDIA driver library) is not available, so the appliance sees no GPU. ',
            'Endpoints that ask for GPUs cannot be placed; endpoints without GPUs run on the CPU as usual.'),
          h('p', { class: 'muted' }, 'Reason: ', gpus.reason || 'not given')));
        return;
      }
      fill(body, gpus.data.length
        ? h('div', { class: 'gpus' }, gpus.data.map(card))
        : h('section', { class: 'panel' }, h('p', {}, 'NVML answers but reports no GPU.')));
    } catch (err) {
      error.show(err);
    }
  }, EVERY_MS);
}
