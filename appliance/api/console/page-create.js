// Create an endpoint from a model folder, after an optional dry run (Validate) whose states, log and
// verdict stream in as the server sends them.

import { call, readEvents, send } from './api.js';
import { badge, check, field, fill, h, notify, numberOrNull, parseEnviron } from './dom.js';

const RUNTIMES = ['custom', 'vllm', 'transformers', 'sglang', 'nim', 'huggingface-tgi', 'modular-max', 'llama-cpp', 'cmd'];
const LOG_LINES_SHOWN = 400;

export function mount(main, ctx) {
  const ro = ctx.session.read_only;
  const name = h('input', { type: 'text', required: true, pattern: '[A-Za-z0-9_\\-]{1,50}', autocomplete: 'off', spellcheck: 'false' });
  const folder = h('input', { type: 'text', required: true, placeholder: '/srv/models/llama', spellcheck: 'false' });
  const runtime = h('select', {}, h('option', { value: '' }, 'from the folder (custom when it has a model-definition)'), RUNTIMES.map((r) => h('option', { value: r }, r)));
  const replicas = h('input', { type: 'number', min: 0, value: '1' });
  const gpus = h('input', { type: 'number', min: 0, placeholder: '0' });
  const share = h('input', { type: 'number', min: 0, max: 1, step: '0.05', placeholder: 'e.g. 0.5' });
  const cpu = h('input', { type: 'number', min: 0, step: '0.5', placeholder: 'no limit' });
  const mem = h('input', { type: 'text', placeholder: 'e.g. 8gb' });
  const environ = h('textarea', { rows: 3, placeholder: 'HF_HOME=/srv/cache\nVLLM_LOGGING_LEVEL=INFO', spellcheck: 'false' });
  const extra = h('textarea', { rows: 2, placeholder: '--max-model-len=4096', spellcheck: 'false' });
  const isPublic = h('input', { type: 'checkbox' });
  const description = h('input', { type: 'text', maxlength: 500 });
  const validate = h('button', { type: 'button', class: 'quiet', disabled: ro }, 'Validate');
  const cancel = h('button', { type: 'button', class: 'quiet', hidden: true }, 'Cancel validation');
  const submit = h('button', { type: 'submit', disabled: ro }, 'Create endpoint');
  const formError = h('p', { class: 'error', role: 'alert' });
  const output = h('section', { class: 'panel', hidden: true, 'aria-label': 'Validation' });

  function spec() {
    const out = { name: name.value.trim(), model_folder: folder.value.trim() };
    if (runtime.value) out.runtime = runtime.value;
    out.replicas = numberOrNull(replicas) ?? 1;
    const res = {};
    if (numberOrNull(gpus)) res.gpus = numberOrNull(gpus);
    if (numberOrNull(share)) res.gpu_share = numberOrNull(share);
    if (numberOrNull(cpu)) res.cpu = numberOrNull(cpu);
    if (mem.value.trim()) res.mem = mem.value.trim();
    if (Object.keys(res).length) out.resources = res;
    const env = parseEnviron(environ.value);
    if (Object.keys(env).length) out.environ = env;
    const args = extra.value.split('\n').map((a) => a.trim()).filter(Boolean);
    if (args.length) out.extra_args = args;
    if (isPublic.checked) out.public = true;
    if (description.value.trim()) out.description = description.value.trim();
    return out;
  }

  const form = h('form', { class: 'panel', novalidate: true },
    h('div', { class: 'grid three' },
      field('Name', name, 'also the model name clients send'),
      field('Runtime', runtime),
      field('Replicas', replicas)),
    field('Model folder', folder, 'absolute path on this box: a Backend.AI model folder (model-definition.yaml) or a plain model folder'),
    h('fieldset', {}, h('legend', {}, 'Resources per replica'),
      h('div', { class: 'grid' }, field('Whole GPUs', gpus), field('GPU share', share), field('CPU cores', cpu), field('Memory', mem))),
    h('div', { class: 'grid two' },
      field('Environment (KEY=VALUE per line)', environ),
      field('Extra arguments (one per line)', extra)),
    field('Description', description),
    h('div', { class: 'field' }, check('Public: the gateway serves it without a key', isPublic)),
    formError,
    h('div', { class: 'bar' }, submit, validate, cancel,
      ro ? h('span', { class: 'muted' }, 'Read-only session: creating and validating need an admin key.') : null));

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    formError.textContent = '';
    submit.disabled = true;
    try {
      const made = await call('POST', '/api/v1/endpoints', spec());
      notify(`Endpoint ${made.name} created: its replicas are starting.`, { ok: true, carry: true });
      location.hash = `#/endpoints/${encodeURIComponent(made.name)}`;
    } catch (err) {
      formError.textContent = err.message;
    } finally {
      submit.disabled = ro;
    }
  });

  validate.addEventListener('click', async () => {
    formError.textContent = '';
    let body;
    try { body = spec(); } catch (err) { formError.textContent = err.message; return; }
    const run = ctx.controller();
    const stateList = h('ol', { class: 'states', 'aria-label': 'States' });
    const log = h('pre', { class: 'log short', tabindex: '0', 'aria-label': 'Log of the trial replica' });
    const now = h('p', { 'aria-live': 'polite' }, 'Starting a trial replica…');
    const verdict = h('div', { role: 'status' });
    const lines = [];
    fill(output, h('h2', {}, 'Validation'), now, stateList, h('h3', {}, 'Log'), log, verdict);
    output.hidden = false;
    validate.disabled = true;
    cancel.hidden = false;
    cancel.onclick = () => run.abort();
    try {
      const resp = await send('POST', '/api/v1/endpoints/validate', { body, signal: run.signal, accept: 'text/event-stream' });
      await readEvents(resp, (event, data) => {
        const d = JSON.parse(data);
        if (event === 'state') {
          stateList.append(h('li', {}, badge(d.state), ` after ${d.seconds.toFixed(1)} s`, d.reason ? ` — ${d.reason}` : ''));
          now.textContent = `Trial replica ${d.replica || ''} is ${d.state}.`;
        } else if (event === 'log') {
          lines.push(d.line);
          if (lines.length > LOG_LINES_SHOWN) lines.shift();
          log.textContent = lines.join('\n');
          log.scrollTop = log.scrollHeight;
        } else if (event === 'verdict') {
          now.textContent = d.ok ? 'Done.' : 'Done: the spec does not work.';
          fill(verdict, h('div', { class: `verdict ${d.ok ? 'ok' : 'bad'}` },
            h('strong', {}, d.ok ? 'Valid: ' : 'Invalid: '), d.reason, ` (${d.seconds.toFixed(1)} s)`,
            d.last_lines && d.last_lines.length ? h('pre', {}, d.last_lines.join('\n')) : null));
        }
      });
    } catch (err) {
      if (err.name === 'AbortError') now.textContent = 'Validation cancelled: the trial replica is stopped.';
      else fill(verdict, h('div', { class: 'verdict bad' }, h('strong', {}, 'Validation failed: '), err.message));
    } finally {
      validate.disabled = ro;
      cancel.hidden = true;
    }
  });

  main.append(h('h1', {}, 'Create endpoint'), form, output);
  name.focus();
}
