// One endpoint: facts, replicas with health, logs (with follow), events, autoscaling decisions and
// rules, tokens; modify, retry and delete.

import { call, get, readLines, send } from './api.js';
import { badge, bytes, check, clear, confirm, errorSlot, field, fill, h, notify, numberOrNull, panel, parseEnviron, table, when } from './dom.js';
import { replicaChips, urls } from './page-endpoints.js';

const EVERY_MS = 3000;
const LOG_LINES_KEPT = 2000;
const SOURCES = ['gateway', 'kernel', 'gpu', 'inference', 'inference_framework', 'prometheus'];
const COMPARATORS = ['GREATER_THAN', 'GREATER_THAN_OR_EQUAL', 'LESS_THAN', 'LESS_THAN_OR_EQUAL'];

function adminButton(ctx, label, onclick, props = {}) {
  const ro = ctx.session.read_only;
  return h('button', { type: 'button', ...props, disabled: ro || props.disabled, title: ro ? 'needs an admin key' : props.title, onclick }, label);
}

// Run an action: its error goes to the page's message line, never lost.
async function act(what, fn) {
  try {
    return await fn();
  } catch (err) {
    notify(`${what} failed: ${err.message}`);
    return undefined;
  }
}

function resources(r) {
  if (!r) return '—';
  const parts = [];
  if (r.gpus) parts.push(`${r.gpus} GPU`);
  if (r.gpu_share) parts.push(`${r.gpu_share} of a GPU`);
  if (r.cpu) parts.push(`${r.cpu} CPU`);
  if (r.mem) parts.push(`${bytes(r.mem)} memory`);
  return parts.join(', ') || 'no limits (CPU)';
}

export function mount(main, ctx, name) {
  const path = `/api/v1/endpoints/${encodeURIComponent(name)}`;
  const title = h('h1', {}, name);
  const facts = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  const replicas = h('div', {});
  const events = h('div', {});
  const decisions = h('div', {});
  const error = errorSlot();
  const modify = h('section', { class: 'panel', hidden: true, 'aria-label': 'Modify endpoint' });
  const logs = logPanel(ctx, name);
  const rules = h('div', {});
  const tokens = h('div', {});
  let current = null;

  const refresh = async () => {
    try {
      const [ep, reps, evs, decs] = await Promise.all([
        get(path), get(`${path}/replicas`), get(`${path}/events?limit=30`), get(`${path}/decisions?limit=20`),
      ]);
      error.clear();
      current = ep;
      drawFacts(ep);
      drawReplicas(reps.data);
      logs.replicas(reps.data);
      fill(events, table([
        { label: 'Time', cell: (e) => when(e.time) },
        { label: 'Kind', cell: (e) => h('code', {}, e.kind) },
        { label: 'Message', cell: (e) => e.message },
      ], evs.data, { empty: 'No events.' }));
      fill(decisions, table([
        { label: 'Time', cell: (e) => when(e.time) },
        { label: 'Kind', cell: (e) => h('code', {}, e.kind) },
        { label: 'Decision', cell: (e) => e.message },
      ], decs.data, { empty: 'No autoscaling decisions yet.' }));
    } catch (err) {
      error.show(err);
    }
  };

  function drawFacts(ep) {
    fill(title, ep.name, ' ', badge(ep.status));
    fill(facts, h('dl', { class: 'facts' },
      h('dt', {}, 'Status'), h('dd', {}, ep.status_message || ep.status),
      h('dt', {}, 'Replicas'), h('dd', {}, replicaChips(ep.replica_counts), ` desired ${ep.desired_replicas} (min ${ep.min_replicas}, max ${ep.max_replicas})`),
      h('dt', {}, 'URL'), h('dd', {}, urls(ep.name)),
      h('dt', {}, 'Access'), h('dd', {}, ep.public ? 'public: no key needed' : 'private: a key or token with the inference scope'),
      h('dt', {}, 'Runtime'), h('dd', {}, `${ep.runtime}, serves "${ep.served_model_name}"`),
      h('dt', {}, 'Model folder'), h('dd', {}, h('code', {}, ep.model_folder)),
      h('dt', {}, 'Resources'), h('dd', {}, resources(ep.resources)),
      h('dt', {}, 'Aliases'), h('dd', {}, ep.aliases.length ? ep.aliases.join(', ') : '—'),
      h('dt', {}, 'Environment'), h('dd', {}, Object.keys(ep.environ).length ? Object.entries(ep.environ).map(([k, v]) => `${k}=${v}`).join('  ') : '—'),
      h('dt', {}, 'Generation'), h('dd', {}, `${ep.generation} · updated ${when(ep.updated_at)} · from ${ep.source}`),
      ep.description ? [h('dt', {}, 'Description'), h('dd', {}, ep.description)] : null));
  }

  function drawReplicas(list) {
    fill(replicas, table([
      { label: 'Replica', cell: (r) => h('code', {}, r.id) },
      { label: 'State', cell: (r) => badge(r.state) },
      { label: 'Health', cell: (r) => h('div', {}, r.last_probe_result || '—',
        r.consecutive_failures ? h('div', { class: 'error small' }, `${r.consecutive_failures} failed probes in a row`) : null,
        r.last_probe_at ? h('div', { class: 'muted small' }, when(r.last_probe_at)) : null) },
      { label: 'PID / port', cell: (r) => `${r.pid ?? '—'} / ${r.port ?? '—'}` + (r.grpc_port ? ` (gRPC ${r.grpc_port})` : '') },
      { label: 'In flight', num: true, cell: (r) => r.inflight ?? 0 },
      { label: 'GPUs', cell: (r) => (r.gpus.length ? r.gpus.map((g) => g.slice(0, 12)).join(', ') + (r.gpu_share ? ` (${r.gpu_share})` : '') : '—') },
      { label: 'Restarts', num: true, cell: (r) => r.restarts },
      { label: 'Started', cell: (r) => when(r.started_at) },
      { label: 'Last error', cell: (r) => (r.last_error ? h('span', { class: 'error' }, r.last_error) : '—') },
      { label: 'Log', cell: (r) => h('button', { type: 'button', class: 'quiet small-button', onclick: () => logs.show(r.id) }, 'Show log') },
    ], list, { empty: 'No replicas (desired 0, or not started yet).' }));
  }

  function openModify() {
    const ep = current;
    if (!ep) return;
    const replicasIn = h('input', { type: 'number', min: 0, value: ep.replicas });
    const minIn = h('input', { type: 'number', min: 0, value: ep.min_replicas });
    const maxIn = h('input', { type: 'number', min: 0, value: ep.max_replicas });
    const publicIn = h('input', { type: 'checkbox', checked: ep.public });
    const descIn = h('input', { type: 'text', value: ep.description });
    const envIn = h('textarea', { rows: 3 });
    envIn.value = Object.entries(ep.spec.environ || {}).map(([k, v]) => `${k}=${v}`).join('\n');
    const save = h('button', { type: 'submit' }, 'Save changes');
    const form = h('form', {},
      h('h2', {}, 'Modify'),
      h('div', { class: 'grid' }, field('Replicas', replicasIn), field('Min replicas', minIn), field('Max replicas', maxIn), field('Description', descIn)),
      field('Environment (KEY=VALUE per line; a change restarts the replicas one by one)', envIn),
      h('div', { class: 'field' }, check('Public: open without a key', publicIn)),
      h('div', { class: 'bar' }, save, h('button', { type: 'button', class: 'quiet', onclick: () => { modify.hidden = true; } }, 'Cancel')));
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      await act('Saving', async () => {
        // Only what changed: an unchanged bound stays implicit (it follows `replicas`).
        const wanted = { replicas: numberOrNull(replicasIn), min_replicas: numberOrNull(minIn), max_replicas: numberOrNull(maxIn), public: publicIn.checked, description: descIn.value };
        const patch = Object.fromEntries(Object.entries(wanted).filter(([k, v]) => v !== ep[k]));
        const environ = parseEnviron(envIn.value);
        if (JSON.stringify(environ) !== JSON.stringify(ep.spec.environ || {})) patch.environ = environ;
        if (!Object.keys(patch).length) { modify.hidden = true; return; }
        await call('PATCH', path, patch);
        modify.hidden = true;
        notify(`Endpoint ${name} updated.`, { ok: true });
        await refresh();
      });
    });
    fill(modify, form);
    modify.hidden = false;
    replicasIn.focus();
  }

  const bar = h('div', { class: 'bar' },
    h('a', { class: 'button quiet', href: `#/chat/${encodeURIComponent(name)}` }, 'Chat test'),
    adminButton(ctx, 'Retry', () => act('Retry', async () => { await call('POST', `${path}/retry`); notify(`Retrying ${name}: failed replicas restart now.`, { ok: true }); await refresh(); })),
    adminButton(ctx, 'Modify', openModify, { class: 'quiet' }),
    adminButton(ctx, 'Delete', async () => {
      if (!(await confirm(`Delete endpoint ${name}?`, 'Its replicas stop and its URL stops answering. Keys and usage are kept.', 'Delete'))) return;
      await act('Delete', async () => { await call('DELETE', path); notify(`Endpoint ${name} deleted.`, { ok: true, carry: true }); location.hash = '#/endpoints'; });
    }, { class: 'danger' }),
    h('span', { class: 'spacer' }), h('a', { href: '#/endpoints' }, '← All endpoints'));

  main.append(title, bar, error.el, modify,
    h('section', { class: 'panel', 'aria-label': 'Endpoint facts' }, facts),
    panel('Replicas', replicas),
    logs.el,
    h('div', { class: 'row' },
      panel('Events', events),
      panel('Autoscaling decisions', decisions)),
    h('div', { class: 'row' },
      panel('Autoscaling rules', rules),
      panel('Tokens', tokens)));
  ctx.poll(refresh, EVERY_MS);
  rulesPanel(ctx, path, rules);
  tokensPanel(ctx, path, tokens);
}

function logPanel(ctx, name) {
  const select = h('select', {});
  const out = h('pre', { class: 'log', tabindex: '0', 'aria-label': 'Replica log', 'aria-live': 'off' });
  const follow = h('button', { type: 'button', 'aria-pressed': 'false' }, 'Follow');
  // The worker's access lines of passing health probes are left out unless asked for (they stay in the file).
  const probes = h('input', { type: 'checkbox' });
  const status = h('span', { class: 'muted small' });
  let following = null;
  let known = null;
  const lines = [];

  const write = (line) => {
    lines.push(line);
    if (lines.length > LOG_LINES_KEPT) lines.splice(0, lines.length - LOG_LINES_KEPT);
    const atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 8;
    out.textContent = lines.join('\n');
    if (atEnd || following) out.scrollTop = out.scrollHeight;
  };
  const stop = () => {
    if (following) following.abort();
    following = null;
    follow.setAttribute('aria-pressed', 'false');
    follow.textContent = 'Follow';
  };
  const base = () => `/api/v1/endpoints/${encodeURIComponent(name)}/replicas/${encodeURIComponent(select.value)}/logs?probes=${probes.checked ? 1 : 0}`;
  const load = async () => {
    stop();
    if (!select.value) return;
    lines.length = 0;
    out.textContent = '';
    try {
      const text = await (await send('GET', `${base()}&tail=200`)).text();
      text.split('\n').filter((l, i, all) => l || i < all.length - 1).forEach(write);
      status.textContent = `last ${Math.min(lines.length, 200)} lines`;
    } catch (err) {
      status.textContent = '';
      write(`(could not read the log: ${err.message})`);
    }
  };
  follow.addEventListener('click', async () => {
    if (following) { stop(); status.textContent = 'stopped following'; return; }
    if (!select.value) return;
    following = ctx.controller();
    follow.setAttribute('aria-pressed', 'true');
    follow.textContent = 'Following (stop)';
    lines.length = 0;
    status.textContent = 'following new lines…';
    const mine = following;
    try {
      const resp = await send('GET', `${base()}&tail=200&follow=1`, { signal: mine.signal });
      await readLines(resp, write);
      if (following === mine) status.textContent = 'the replica is gone: no more lines';
    } catch (err) {
      if (err.name !== 'AbortError') write(`(following stopped: ${err.message})`);
    } finally {
      if (following === mine) stop();
    }
  });
  select.addEventListener('change', load);
  probes.addEventListener('change', load);
  const el = panel('Log',
    h('div', { class: 'bar end' }, field('Replica', select), follow, h('button', { type: 'button', class: 'quiet', onclick: load }, 'Reload'),
      check('Show health probes', probes), status),
    out);
  return {
    el,
    show(id) { select.value = id; load(); out.focus(); },
    replicas(list) {
      const ids = list.map((r) => `${r.id}:${r.state}`).join(',');
      if (ids === known) return;
      known = ids;
      const chosen = select.value;
      follow.disabled = !list.length;
      if (!list.length) {
        stop();
        fill(select, h('option', { value: '' }, 'no replica'));
        out.textContent = '(no replica runs now: nothing to show)';
        return;
      }
      fill(select, list.map((r) => h('option', { value: r.id }, `${r.id} (${r.state.toLowerCase()})`)));
      if (list.some((r) => r.id === chosen)) select.value = chosen; // the same replica, its state relabelled
      else if (list.length && !following) load();
    },
  };
}

function rulesPanel(ctx, path, box) {
  const list = h('div', {});
  const load = () => act('Loading rules', async () => {
    const body = await get(`${path}/autoscaling-rules`);
    fill(list, table([
      { label: 'Rule', cell: (r) => h('div', {}, `${r.metric_source}/${r.metric_name} ${r.comparator} ${r.threshold} → ${r.step_size > 0 ? '+' : ''}${r.step_size}`,
        r.warnings.map((w) => h('div', { class: 'error small' }, w))) },
      { label: 'Bounds', cell: (r) => `${r.bounds[0]}–${r.bounds[1]}` },
      { label: 'Cooldown', cell: (r) => `${r.cooldown_seconds} s` },
      { label: 'Last fired', cell: (r) => when(r.last_triggered_at) },
      { label: '', cell: (r) => adminButton(ctx, 'Delete', async () => {
        if (!(await confirm('Delete this rule?', `${r.metric_source}/${r.metric_name} ${r.comparator} ${r.threshold}`, 'Delete'))) return;
        await act('Deleting the rule', async () => { await call('DELETE', `${path}/autoscaling-rules/${r.id}`); await load(); });
      }, { class: 'quiet danger small-button' }) },
    ], body.data, { empty: 'No rules: the replica count stays as set.' }));
  });
  const source = h('select', {}, SOURCES.map((v) => h('option', { value: v }, v)));
  const metric = h('input', { type: 'text', value: 'queue_length', required: true });
  const comparator = h('select', {}, COMPARATORS.map((v) => h('option', { value: v }, v.toLowerCase().replace(/_/g, ' '))));
  const threshold = h('input', { type: 'number', step: 'any', value: '5', required: true });
  const step = h('input', { type: 'number', value: '1', required: true });
  const cooldown = h('input', { type: 'number', min: 0, value: '300' });
  const add = h('button', { type: 'submit', disabled: ctx.session.read_only, title: ctx.session.read_only ? 'needs an admin key' : null }, 'Add rule');
  const form = h('form', {}, h('h3', {}, 'Add a rule'),
    h('div', { class: 'grid' }, field('Source', source), field('Metric', metric), field('Comparator', comparator),
      field('Threshold', threshold), field('Step (+ out, − in)', step), field('Cooldown (s)', cooldown)), add);
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    act('Adding the rule', async () => {
      await call('POST', `${path}/autoscaling-rules`, {
        metric_source: source.value, metric_name: metric.value.trim(), comparator: comparator.value,
        threshold: Number(threshold.value), step_size: Number(step.value), cooldown_seconds: Number(cooldown.value || 0),
      });
      await load();
    });
  });
  box.append(list, form);
  load();
}

function tokensPanel(ctx, path, box) {
  if (ctx.session.read_only) {
    box.append(h('p', { class: 'muted' }, 'Tokens are listed and made with an admin key; this session is read-only.'));
    return;
  }
  const list = h('div', {});
  const shown = h('div', {});
  const load = () => act('Loading tokens', async () => {
    const body = await get(`${path}/tokens`);
    fill(list, table([
      { label: 'Name', cell: (t) => t.name },
      { label: 'Prefix', cell: (t) => h('code', {}, `${t.prefix}…`) },
      { label: 'Status', cell: (t) => badge(t.status) },
      { label: 'Valid until', cell: (t) => when(t.expires_at) },
      { label: '', cell: (t) => (t.status === 'revoked' ? '' : h('button', { type: 'button', class: 'quiet danger small-button', onclick: async () => {
        if (!(await confirm('Revoke this token?', `${t.name} (${t.prefix}…) stops working at once.`, 'Revoke'))) return;
        await act('Revoking the token', async () => { await call('DELETE', `${path}/tokens/${t.id}`); await load(); });
      } }, 'Revoke')) },
    ], body.data, { empty: 'No tokens.' }));
  });
  const duration = h('input', { type: 'text', value: '7d', required: true });
  const form = h('form', {}, h('h3', {}, 'Generate a token'), h('div', { class: 'bar' }, field('Valid for (e.g. 3600, 12h, 7d)', duration), h('button', { type: 'submit' }, 'Generate')));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    act('Generating the token', async () => {
      const made = await call('POST', `${path}/tokens`, { duration: duration.value.trim() });
      fill(shown, h('div', { class: 'secret', role: 'status' },
        h('strong', {}, 'Copy the token now: it is shown only this once.'), h('code', {}, made.token),
        h('button', { type: 'button', class: 'quiet', onclick: () => clear(shown) }, 'Done')));
      await load();
    });
  });
  box.append(shown, list, form);
  load();
}
