// Chat test: send a conversation to an endpoint (or to any OpenAI-compatible server) and watch the
// answer stream in, with the time to the first token and the tokens per second.

import { errorOf, get, headers, readEvents } from './api.js';
import { check, clear, field, fill, h } from './dom.js';

// The custom server's settings live only as long as the page is open (the token is a secret).
const custom = { on: false, base: '', token: '', model: '' };

export function mount(main, ctx, chosen) {
  const endpoint = h('select', {});
  const useCustom = h('input', { type: 'checkbox', checked: custom.on });
  const base = h('input', { type: 'url', placeholder: 'http://gpu-box:8000/v1', value: custom.base, spellcheck: 'false' });
  const token = h('input', { type: 'password', placeholder: 'none', value: custom.token, autocomplete: 'off' });
  const model = h('input', { type: 'text', value: custom.model, spellcheck: 'false' });
  const customBox = h('div', { hidden: !custom.on },
    field('Base URL', base, 'the server’s /v1 URL; the browser calls it directly, so it must allow this page’s origin (CORS)'),
    field('Token', token, 'sent as Authorization: Bearer'),
    field('Model', model));
  const system = h('textarea', { rows: 2, placeholder: 'optional' });
  const maxTokens = h('input', { type: 'number', min: 1, value: '256' });
  const temperature = h('input', { type: 'number', min: 0, max: 2, step: '0.1', value: '0.7' });
  const askUsage = h('input', { type: 'checkbox', checked: true });
  const transcript = h('ol', { class: 'transcript', 'aria-label': 'Conversation', 'aria-live': 'polite' });
  const input = h('textarea', { rows: 3, placeholder: 'Type a message; Enter sends, Shift+Enter starts a new line' });
  const sendButton = h('button', { type: 'submit' }, 'Send');
  const stopButton = h('button', { type: 'button', class: 'quiet', disabled: true }, 'Stop');
  const clearButton = h('button', { type: 'button', class: 'quiet' }, 'Clear conversation');
  const stat = (label) => { const v = h('strong', {}, '—'); return [h('div', {}, h('span', {}, label), v), v]; };
  const [ttftBox, ttft] = stat('Time to first token');
  const [rateBox, rate] = stat('Tokens/s');
  const [countBox, count] = stat('Tokens');
  const [totalBox, total] = stat('Total');
  const history = [];
  let running = null;

  useCustom.addEventListener('change', () => { custom.on = useCustom.checked; customBox.hidden = !custom.on; });
  base.addEventListener('input', () => { custom.base = base.value.trim(); });
  token.addEventListener('input', () => { custom.token = token.value; });
  model.addEventListener('input', () => { custom.model = model.value.trim(); });

  get('/api/v1/endpoints?limit=1000').then((body) => {
    fill(endpoint, body.data.length
      ? body.data.map((e) => h('option', { value: e.name, selected: e.name === chosen }, `${e.name} (${e.status.toLowerCase()})`))
      : h('option', { value: '' }, 'no endpoints yet'));
    if (chosen) endpoint.value = chosen;
  }).catch((err) => fill(endpoint, h('option', { value: '' }, `could not list endpoints: ${err.message}`)));

  function say(role, text) {
    const body = h('span', { class: 'text' }, text);
    const li = h('li', { class: role }, h('span', { class: 'role' }, role), body);
    transcript.append(li);
    transcript.scrollTop = transcript.scrollHeight;
    return { li, body };
  }

  function target() {
    if (custom.on) {
      if (!custom.base) throw new Error('enter the custom server’s base URL, e.g. http://gpu-box:8000/v1');
      if (!custom.model) throw new Error('enter the model name the custom server serves');
      const auth = custom.token ? { Authorization: `Bearer ${custom.token}` } : {};
      // Straight from the browser, without this console's cookie: the token given here is the only credential.
      return { url: `${custom.base.replace(/\/+$/, '')}/chat/completions`, model: custom.model, init: { credentials: 'omit', mode: 'cors', headers: auth } };
    }
    if (!endpoint.value) throw new Error('pick an endpoint (or use a custom server)');
    return { url: '/v1/chat/completions', model: endpoint.value, init: { credentials: 'same-origin', headers: headers('POST') } };
  }

  async function send(text) {
    let where;
    try { where = target(); } catch (err) { say('error', err.message); return; }
    history.push({ role: 'user', content: text });
    say('user', text);
    const reply = say('assistant', '');
    reply.li.setAttribute('aria-busy', 'true');
    [ttft, rate, count, total].forEach((v) => { v.textContent = '…'; });
    const messages = system.value.trim() ? [{ role: 'system', content: system.value.trim() }, ...history] : [...history];
    const body = { model: where.model, messages, stream: true, max_tokens: Number(maxTokens.value) || 256, temperature: Number(temperature.value) };
    if (askUsage.checked) body.stream_options = { include_usage: true };
    running = new AbortController();
    sendButton.disabled = true;
    stopButton.disabled = false;
    const started = performance.now();
    let first = null;
    let last = null;
    let chunks = 0;
    let usage = null;
    let answer = '';
    const show = () => {
      const now = performance.now();
      ttft.textContent = first === null ? '—' : `${Math.round(first - started)} ms`;
      const tokens = usage?.completion_tokens ?? chunks;
      count.textContent = usage ? `${tokens}` : `≈${tokens}`;
      const span = first !== null && last !== null ? (last - first) / 1000 : 0;
      rate.textContent = span > 0 && tokens > 1 ? ((tokens - 1) / span).toFixed(1) : '—';
      total.textContent = `${((now - started) / 1000).toFixed(2)} s`;
    };
    try {
      const resp = await fetch(where.url, {
        ...where.init, method: 'POST', signal: running.signal,
        headers: { ...where.init.headers, 'Content-Type': 'application/json', Accept: 'text/event-stream' }, body: JSON.stringify(body),
      });
      if (!resp.ok) throw await errorOf(resp);
      await readEvents(resp, (event, data) => {
        if (data.trim() === '[DONE]') return;
        const d = JSON.parse(data);
        if (event === 'error' || d.error) throw new Error((d.error && d.error.message) || data);
        if (d.usage) usage = d.usage;
        const piece = d.choices?.[0]?.delta?.content ?? d.choices?.[0]?.text ?? '';
        if (!piece) return;
        const now = performance.now();
        if (first === null) first = now;
        last = now;
        chunks += 1;
        answer += piece;
        reply.body.textContent = answer;
        transcript.scrollTop = transcript.scrollHeight;
        show();
      });
      history.push({ role: 'assistant', content: answer });
      if (!answer) reply.body.textContent = '(empty answer)';
    } catch (err) {
      const why = err.name === 'AbortError' ? 'stopped' : (err.message === 'Failed to fetch' && custom.on ? `${err.message}: the server did not answer, or does not allow this origin (CORS)` : err.message);
      running.abort(); // a failed stream is not read further
      say('error', why);
      if (answer) history.push({ role: 'assistant', content: answer });
    } finally {
      show();
      reply.li.removeAttribute('aria-busy');
      running = null;
      sendButton.disabled = false;
      stopButton.disabled = true;
      input.focus();
    }
  }

  const form = h('form', {}, field('Message', input), h('div', { class: 'bar' }, sendButton, stopButton, h('span', { class: 'spacer' }), clearButton));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || running) return;
    input.value = '';
    send(text);
  });
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) { event.preventDefault(); form.requestSubmit(); }
  });
  stopButton.addEventListener('click', () => running && running.abort());
  clearButton.addEventListener('click', () => { history.length = 0; clear(transcript); });

  main.append(h('h1', {}, 'Chat test'),
    h('div', { class: 'chat' },
      h('section', { class: 'panel', 'aria-label': 'Settings' },
        field('Endpoint', endpoint),
        h('div', { class: 'field' }, check('Use a custom OpenAI-compatible server', useCustom)), customBox,
        field('System prompt', system),
        h('div', { class: 'grid' }, field('Max tokens', maxTokens), field('Temperature', temperature)),
        h('div', { class: 'field' }, check('Ask for usage (exact token count)', askUsage))),
      h('section', { class: 'panel', 'aria-label': 'Conversation' },
        h('div', { class: 'stats', role: 'status' }, ttftBox, rateBox, countBox, totalBox),
        transcript, form)));
  ctx.controller().signal.addEventListener('abort', () => running && running.abort());
  input.focus();
}
