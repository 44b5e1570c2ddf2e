// Usage per key and endpoint: totals, a stacked bar chart over time (inline SVG), and tables.

import { get } from './api.js';
import { errorSlot, field, fill, h, number, panel, s, table } from './dom.js';

const EVERY_MS = 10000;
const COLORS = ['#1f5fbf', '#2f9e5b', '#d9822b', '#8e44ad', '#c0392b', '#16a2b8', '#7f8c8d'];
const PERIODS = { '24h': { hours: 24, step: 1 }, '7d': { hours: 168, step: 6 }, '30d': { hours: 720, step: 24 } };
const METRICS = {
  requests: ['Requests', (r) => r.requests],
  tokens: ['Tokens (prompt + completion)', (r) => r.prompt_tokens + r.completion_tokens],
  completion: ['Completion tokens', (r) => r.completion_tokens],
  errors: ['Errors', (r) => r.errors],
};

const hourOf = (label) => Math.floor(Date.parse(`${label}:00:00Z`) / 3600000);

function sum(rows, by, value) {
  const out = new Map();
  for (const r of rows) {
    const k = by(r);
    const t = out.get(k) || { requests: 0, prompt_tokens: 0, completion_tokens: 0, errors: 0, label: k };
    t.requests += r.requests; t.prompt_tokens += r.prompt_tokens; t.completion_tokens += r.completion_tokens; t.errors += r.errors;
    out.set(k, t);
  }
  return [...out.values()].map((t) => ({ ...t, value: value(t) }));
}

// The axis top: the peak rounded up to 1, 2 or 5 times a power of ten.
function nice(peak) {
  const power = 10 ** Math.floor(Math.log10(peak));
  return [1, 2, 5, 10].map((m) => m * power).find((v) => v >= peak);
}

// Bars of `step` hours each, stacked by endpoint; the endpoints beyond the palette are one "other" series.
function chart(rows, period, metric, width) {
  const { hours, step } = PERIODS[period];
  const [label, value] = METRICS[metric];
  const now = Math.floor(Date.now() / 3600000);
  const first = now - hours + 1;
  const buckets = Math.ceil(hours / step);
  const ranked = sum(rows, (r) => r.endpoint, value).sort((a, b) => b.value - a.value).map((t) => t.label);
  const named = ranked.slice(0, COLORS.length - 1);
  const series = ranked.length > named.length ? [...named, 'other'] : named;
  const grid = Array.from({ length: buckets }, () => new Map());
  for (const r of rows) {
    const b = Math.floor((hourOf(r.hour) - first) / step);
    if (b < 0 || b >= buckets) continue;
    const name = named.includes(r.endpoint) ? r.endpoint : 'other';
    grid[b].set(name, (grid[b].get(name) || 0) + value(r));
  }
  const top = nice(Math.max(1, ...grid.map((m) => [...m.values()].reduce((a, v) => a + v, 0))));
  const W = Math.max(420, width);
  const H = 240;
  const left = 56;
  const bottom = 24;
  const plotW = W - left - 8;
  const plotH = H - bottom - 10;
  const barW = plotW / buckets;
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `${label} per ${step === 1 ? 'hour' : `${step} hours`}, stacked by endpoint; peak ${number(top)}` });
  for (const f of top >= 2 ? [0, 0.5, 1] : [0, 1]) {
    const y = 10 + plotH * (1 - f);
    svg.append(s('line', { x1: left, x2: W - 8, y1: y, y2: y, class: 'axis', 'stroke-dasharray': f ? '3 3' : null }),
      s('text', { x: left - 6, y: y + 4, 'text-anchor': 'end' }, number(Math.round(top * f))));
  }
  grid.forEach((m, b) => {
    let y = 10 + plotH;
    const start = new Date((first + b * step) * 3600000);
    series.forEach((name, i) => {
      const v = m.get(name) || 0;
      if (!v) return;
      const hgt = (plotH * v) / top;
      y -= hgt;
      svg.append(s('rect', { x: left + b * barW + 1, y, width: Math.max(1, barW - 2), height: hgt, fill: COLORS[i % COLORS.length] },
        s('title', {}, `${start.toLocaleString()}: ${name} ${number(v)}`)));
    });
  });
  const ticks = Math.min(buckets, 8);
  for (let t = 0; t < ticks; t++) {
    const b = Math.round((t * (buckets - 1)) / Math.max(1, ticks - 1));
    const at = new Date((first + b * step) * 3600000);
    const text = step >= 24 ? at.toLocaleDateString() : `${at.toLocaleDateString(undefined, { month: 'numeric', day: 'numeric' })} ${String(at.getHours()).padStart(2, '0')}:00`;
    svg.append(s('text', { x: left + (b + 0.5) * barW, y: H - 6, 'text-anchor': 'middle' }, text));
  }
  const legend = h('div', { class: 'legend' }, series.map((name, i) => {
    const swatch = h('i', {});
    swatch.style.background = COLORS[i % COLORS.length];
    return h('span', {}, swatch, name);
  }));
  return h('div', { class: 'chart' }, svg, series.length ? legend : h('p', { class: 'muted' }, 'No usage in this period.'));
}

export function mount(main, ctx) {
  const period = h('select', {}, Object.keys(PERIODS).map((p) => h('option', { value: p }, `last ${p}`)));
  const metric = h('select', {}, Object.entries(METRICS).map(([k, [label]]) => h('option', { value: k }, label)));
  const totals = h('div', { class: 'totals', 'aria-live': 'polite' });
  const plot = h('div', {});
  const byKey = h('div', {});
  const byEndpoint = h('div', {});
  const error = errorSlot();
  let rows = [];

  const draw = () => {
    const [label, value] = METRICS[metric.value];
    fill(plot, h('h2', {}, `${label} over the ${period.selectedOptions[0].textContent}`), chart(rows, period.value, metric.value, plot.clientWidth || 900));
    const columns = (title) => [
      { label: title, cell: (t) => t.label || '(no key: public calls)' },
      { label: 'Requests', num: true, cell: (t) => number(t.requests) },
      { label: 'Prompt tokens', num: true, cell: (t) => number(t.prompt_tokens) },
      { label: 'Completion tokens', num: true, cell: (t) => number(t.completion_tokens) },
      { label: 'Errors', num: true, cell: (t) => number(t.errors) },
    ];
    const keyName = (r) => (r.key_id ? `${r.key_name || '?'} (${r.key_id})` : '');
    fill(byKey, table(columns('Key'), sum(rows, keyName, value).sort((a, b) => b.value - a.value), { empty: 'No usage.' }));
    fill(byEndpoint, table(columns('Endpoint'), sum(rows, (r) => r.endpoint, value).sort((a, b) => b.value - a.value), { empty: 'No usage.' }));
  };

  const load = async () => {
    try {
      const body = await get(`/api/v1/usage?since=${period.value}`);
      error.clear();
      rows = body.data;
      const t = body.totals;
      fill(totals, 
        h('div', {}, h('strong', {}, number(t.requests)), 'requests'),
        h('div', {}, h('strong', {}, number(t.prompt_tokens)), 'prompt tokens'),
        h('div', {}, h('strong', {}, number(t.completion_tokens)), 'completion tokens'),
        h('div', {}, h('strong', {}, number(t.errors)), 'errors'));
      draw();
    } catch (err) {
      error.show(err);
    }
  };

  period.addEventListener('change', load);
  metric.addEventListener('change', draw);
  main.append(h('h1', {}, 'Usage'),
    h('div', { class: 'bar' }, field('Period', period), field('Chart', metric)),
    error.el,
    h('section', { class: 'panel' }, totals, plot),
    h('div', { class: 'row' },
      panel('Per key', byKey),
      panel('Per endpoint', byEndpoint)),
    h('p', { class: 'muted small' }, 'Usage is counted in memory and written in batches; this page asks for the latest every 10 s.'));
  ctx.poll(load, EVERY_MS);
}
