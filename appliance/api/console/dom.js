// DOM helpers. Text always goes in as text nodes (never as HTML), so nothing an API returns can
// become markup or script.

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function apply(el, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.setAttribute('class', value);
    else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else if (key === 'value') { el.value = value; el.defaultValue = value; } // a form's reset() goes back to the default
    else if (key === 'checked') { el.checked = value; el.defaultChecked = value; }
    else if (key === 'disabled' || key === 'hidden' || key === 'selected') el[key] = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  return el;
}

export function h(tag, props, ...children) {
  return append(apply(document.createElement(tag), props), children);
}

const SVG = 'http://www.w3.org/2000/svg';
export function s(tag, props, ...children) {
  return append(apply(document.createElementNS(SVG, tag), props), children);
}

export function clear(el) { el.replaceChildren(); return el; }

// Replace what `el` shows with `children` (arrays are flattened).
export function fill(el, ...children) { return append(clear(el), children); }

let fieldCount = 0;
let panelCount = 0;
// A titled section of a page, named by its heading (a landmark for screen readers and keyboard users).
export function panel(title, ...children) {
  const id = `p${++panelCount}`;
  return h('section', { class: 'panel', 'aria-labelledby': id }, h('h2', { id }, title), children);
}

// A labelled control: h('input') with a <label for> that names it.
export function field(labelText, control, hint) {
  control.id = control.id || `f${++fieldCount}`;
  return h('div', { class: 'field' }, h('label', { for: control.id }, labelText), control, hint ? h('p', { class: 'hint' }, hint) : null);
}

export function check(labelText, control) {
  control.id = control.id || `f${++fieldCount}`;
  return h('span', { class: 'check' }, control, h('label', { for: control.id, class: 'check' }, labelText));
}

const TONE = {
  HEALTHY: 'ok', active: 'ok', ok: 'ok',
  PROVISIONING: 'info', STARTING: 'info', PENDING: 'info', DRAINING: 'info',
  DEGRADED: 'warn', UNHEALTHY: 'warn', SCALED_TO_ZERO: 'idle', TERMINATING: 'idle', expired: 'warn',
  ERROR: 'bad', FAILED: 'bad', revoked: 'bad',
};
export function badge(text) {
  return h('span', { class: `badge ${TONE[text] || ''}` }, String(text).replace(/_/g, ' '));
}

export function table(columns, rows, { empty = 'Nothing yet.', caption } = {}) {
  if (!rows.length) return h('p', { class: 'empty' }, empty);
  return h('div', { class: 'scroll' }, h('table', {},
    caption ? h('caption', { class: 'muted small' }, caption) : null,
    h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col', class: c.num ? 'num' : null }, c.label)))),
    h('tbody', {}, rows.map((row) => h('tr', {}, columns.map((c) => h('td', { class: c.num ? 'num' : null }, c.cell(row))))))));
}

export function when(iso) {
  if (!iso) return '—';
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) return iso;
  const ago = (Date.now() - t.getTime()) / 1000;
  const stamp = t.toLocaleString();
  if (ago >= 0 && ago < 90) return `${stamp} (${Math.round(ago)} s ago)`;
  if (ago >= 0 && ago < 5400) return `${stamp} (${Math.round(ago / 60)} min ago)`;
  return stamp;
}

export function bytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v.toFixed(v >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

export function number(n) { return (n ?? 0).toLocaleString(); }

// The modal confirm dialog of the page: resolves true when the user confirms.
export function confirm(title, text, okLabel = 'Confirm') {
  const dialog = document.getElementById('confirm');
  document.getElementById('confirm-title').textContent = title;
  document.getElementById('confirm-text').textContent = text;
  document.getElementById('confirm-ok').textContent = okLabel;
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
    dialog.returnValue = 'cancel';
    dialog.showModal();
  });
}

// The page-wide message line: errors stay until dismissed, replaced or the page is left; successes too, in
// green. `carry`: it announces a move to another page, and stays there.
let carried = false;
export function notify(message, { ok = false, carry = false } = {}) {
  carried = carry;
  const box = document.getElementById('notice');
  document.getElementById('notice-text').textContent = message;
  box.classList.toggle('ok', ok);
  box.hidden = false;
}

export function dismiss() { document.getElementById('notice').hidden = true; }

// On leaving a page: its messages go, unless one was meant for the next page.
export function pageLeft() {
  if (!carried) dismiss();
  carried = false;
}

// A place in a page for a section's own error (a poll that failed), cleared when it succeeds again.
export function errorSlot() {
  const el = h('p', { class: 'error', role: 'alert', hidden: true });
  return {
    el,
    show(err) { el.textContent = err.message || String(err); el.hidden = false; },
    clear() { el.hidden = true; el.textContent = ''; },
  };
}

// Lines of KEY=VALUE into an object; a line without '=' is an error naming it.
export function parseEnviron(text) {
  const out = {};
  text.split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#')).forEach((line, i) => {
    const at = line.indexOf('=');
    if (at <= 0) throw new Error(`environment line ${i + 1} ("${line}") is not KEY=VALUE`);
    out[line.slice(0, at).trim()] = line.slice(at + 1);
  });
  return out;
}

export function numberOrNull(input) {
  const v = input.value.trim();
  return v === '' ? null : Number(v);
}
