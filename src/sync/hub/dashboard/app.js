// @ts-check
// The hub dashboard: reads /api/events (server-sent events, read with fetch so that a Bearer token
// from the page's #token=… can be sent), keeps the fleet table and the rollouts up to date without
// a reload, plots each rollout over time in plain SVG, and calls the API for pause/resume/abort.
// Plain JavaScript checked by tsc (tsconfig.dashboard.json); no build step, no framework.

/**
 * @typedef {{ id: string, version: number, sha256: string }} AdapterRef
 * @typedef {{ deviceId: string, online: boolean, state: string, fleet?: string | null, group?: string | null,
 *   baseFingerprint?: string | null, active?: AdapterRef | null,
 *   transfer?: { adapter: { id: string, version: number }, received: number, total: number } | null,
 *   lastError?: { at: string, reason: string } | null }} DeviceStatus
 * @typedef {{ planned: number, pending: number, sent: number, activated: number, failed: number, rolledBack: number }} Counts
 * @typedef {{ stage: number, state: string, sentAt: string | null, doneAt: string | null, reason: string | null }} RolloutDevice
 * @typedef {{ id: string, status: string, adapter: AdapterRef, previous: AdapterRef | null, createdAt: string, updatedAt: string, stage: number,
 *   plan: string[][], stageStartedAt: string[], reason: string | null, devices: Record<string, RolloutDevice>,
 *   spec: { fleet: string, successThreshold: number, abortThreshold: number, abortMin: number, stageTimeoutMs: number, maxPerMinute: number | null, rollbackOnAbort: boolean },
 *   counts: Counts, stageCounts: Counts[] }} Rollout
 */

const token = new URLSearchParams(location.hash.slice(1)).get('token');
/** @type {Record<string, string>} */
const auth = token ? { authorization: `Bearer ${token}` } : {};
/** @type {Map<string, DeviceStatus>} */
const devices = new Map();
/** @type {Map<string, Rollout>} */
const rollouts = new Map();

/** @param {string} tag @param {Record<string, string>} [attrs] @param {(Node | string)[]} [children] */
function el(tag, attrs = {}, children = []) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  e.append(...children);
  return e;
}
const pct = (/** @type {number} */ x) => `${Math.round(x * 1000) / 10}%`;
const ref = (/** @type {AdapterRef | null | undefined} */ a) => (a ? `${a.id} v${a.version}` : '-');

function renderDevices() {
  const body = /** @type {HTMLTableSectionElement} */ (document.querySelector('#devices tbody'));
  const rows = [...devices.values()].sort((a, b) => (a.deviceId < b.deviceId ? -1 : 1)).map((d) =>
    el('tr', { 'data-device': d.deviceId }, [
      el('td', {}, [d.deviceId]),
      el('td', { class: d.online ? 'on' : 'off' }, [d.online ? d.state : 'offline']),
      el('td', {}, [`${d.fleet ?? '-'}${d.group ? `/${d.group}` : ''}`]),
      el('td', {}, [d.baseFingerprint ? d.baseFingerprint.slice(0, 12) : '-']),
      el('td', { class: 'active' }, [ref(d.active)]),
      el('td', {}, [d.transfer ? `${d.transfer.adapter.id} v${d.transfer.adapter.version} ${d.transfer.received}/${d.transfer.total}` : '-']),
      el('td', { class: 'err', title: d.lastError?.reason ?? '' }, [d.lastError?.reason ?? '-']),
    ]),
  );
  body.replaceChildren(...rows);
  /** @type {HTMLElement} */ (document.getElementById('device-count')).textContent = `${devices.size} device(s)`;
}

/** Cumulative activated and failed devices over time, stage starts as dashed lines: plain SVG. @param {Rollout} r */
function plot(r) {
  const W = 520, H = 140, L = 30, B = 18;
  const ns = 'http://www.w3.org/2000/svg';
  /** @param {string} tag @param {Record<string, string | number>} attrs */
  const s = (tag, attrs) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    return e;
  };
  const svg = s('svg', { class: 'plot', width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  const done = Object.values(r.devices).filter((d) => d.doneAt !== null);
  const t0 = Date.parse(r.createdAt);
  // The hub's clock, not the browser's: the time axis ends at the rollout's last transition.
  const t1 = Math.max(t0 + 1000, Date.parse(r.updatedAt), ...done.map((d) => Date.parse(/** @type {string} */ (d.doneAt))));
  const n = Math.max(1, Object.keys(r.devices).length);
  const x = (/** @type {number} */ t) => L + ((t - t0) / (t1 - t0)) * (W - L - 8);
  const y = (/** @type {number} */ v) => H - B - (v / n) * (H - B - 8);
  svg.append(s('line', { x1: L, y1: y(0), x2: W - 8, y2: y(0), stroke: '#98a2b3' }), s('line', { x1: L, y1: y(0), x2: L, y2: y(n), stroke: '#98a2b3' }));
  const label = (/** @type {string} */ text, /** @type {number} */ lx, /** @type {number} */ ly) => {
    const t = s('text', { x: lx, y: ly });
    t.textContent = text;
    return t;
  };
  svg.append(label(String(n), 4, y(n) + 4), label('0', 18, y(0) + 4), label(`${Math.round((t1 - t0) / 1000)} s`, W - 40, H - 4));
  r.stageStartedAt.forEach((at, i) => {
    svg.append(s('line', { x1: x(Date.parse(at)), y1: y(0), x2: x(Date.parse(at)), y2: y(n), stroke: '#d0d5dd', 'stroke-dasharray': '3 3' }), label(`stage ${i + 1}`, x(Date.parse(at)) + 2, 12));
  });
  for (const [kind, color] of /** @type {const} */ ([['activated', '#12b76a'], ['failed', '#f04438']])) {
    const times = done.filter((d) => (kind === 'activated' ? d.state === 'activated' || d.state === 'rolled-back' : d.state === 'failed' || d.state === 'refused' || d.state === 'timed-out')).map((d) => Date.parse(/** @type {string} */ (d.doneAt))).sort((a, b) => a - b);
    const pts = [`${x(t0)},${y(0)}`];
    times.forEach((t, i) => pts.push(`${x(t)},${y(i)}`, `${x(t)},${y(i + 1)}`));
    pts.push(`${x(t1)},${y(times.length)}`);
    svg.append(s('polyline', { points: pts.join(' '), fill: 'none', stroke: color, 'stroke-width': 2, class: `line-${kind}` }));
  }
  return svg;
}

/** @param {string} id @param {'pause' | 'resume' | 'abort'} action */
async function act(id, action) {
  const res = await fetch(`/api/rollouts/${id}/${action}`, { method: 'POST', headers: auth });
  const body = /** @type {Rollout & { error?: { message: string } }} */ (await res.json());
  if (!res.ok) return alert(`${action} ${id}: ${body.error?.message ?? res.status}`);
  rollouts.set(body.id, body);
  renderRollouts();
}

function renderRollouts() {
  const box = /** @type {HTMLElement} */ (document.getElementById('rollouts'));
  const list = [...rollouts.values()].sort((a, b) => (a.createdAt < b.createdAt ? 1 : -1));
  if (list.length === 0) return;
  box.replaceChildren(...list.map((r) => {
    const live = r.status === 'running' || r.status === 'paused';
    const stages = r.stageCounts.map((c, i) => {
      const w = (/** @type {number} */ k) => `width:${(100 * k) / Math.max(1, c.planned)}%`;
      return el('div', { class: `stage${i === r.stage && live ? ' current' : ''}`, 'data-stage': String(i) }, [
        el('div', { class: 'stage-progress' }, [`stage ${i + 1}: ${c.activated + c.rolledBack}/${c.planned} activated${c.failed ? `, ${c.failed} failed` : ''}${c.sent ? `, ${c.sent} in flight` : ''}`]),
        el('div', { class: 'bar' }, [el('span', { class: 'a', style: w(c.activated + c.rolledBack) }), el('span', { class: 'f', style: w(c.failed) }), el('span', { class: 's', style: w(c.sent) })]),
      ]);
    });
    const buttons = [];
    if (r.status === 'running') buttons.push(el('button', { 'data-action': 'pause' }, ['pause']));
    if (r.status === 'paused') buttons.push(el('button', { 'data-action': 'resume' }, ['resume']));
    if (live) buttons.push(el('button', { 'data-action': 'abort' }, ['abort']));
    for (const b of buttons) b.addEventListener('click', () => void act(r.id, /** @type {'pause' | 'resume' | 'abort'} */ (b.getAttribute('data-action'))));
    const sp = r.spec;
    return el('div', { class: 'rollout', 'data-rollout': r.id }, [
      el('h3', {}, [`${r.id}: ${ref(r.adapter)} → fleet ${sp.fleet} `, el('span', { class: `status ${r.status}` }, [r.status]), ` stage ${Math.min(r.stage + 1, r.plan.length)}/${r.plan.length}`]),
      el('div', { class: 'thresholds' }, [`success ≥ ${pct(sp.successThreshold)} per stage · abort at ≥ ${pct(sp.abortThreshold)} failed after ≥ ${sp.abortMin} · timeout ${sp.stageTimeoutMs / 1000} s · ${sp.maxPerMinute ?? '∞'}/min · rollback on abort: ${sp.rollbackOnAbort ? 'yes' : 'no'} · previous ${ref(r.previous)}`]),
      ...(r.reason ? [el('div', { class: 'err' }, [r.reason])] : []),
      el('div', { class: 'stages' }, stages),
      el('div', {}, buttons),
      plot(r),
    ]);
  }));
}

/** Reads the event stream; reconnects after a second when it ends. */
async function stream() {
  const conn = /** @type {HTMLElement} */ (document.getElementById('conn'));
  try {
    const res = await fetch('/api/events', { headers: auth });
    if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
    conn.textContent = 'live';
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let i;
      while ((i = buf.indexOf('\n\n')) >= 0) {
        const msg = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const event = /^event: (.*)$/m.exec(msg)?.[1];
        const data = /^data: (.*)$/m.exec(msg)?.[1];
        if (event && data) onEvent(event, JSON.parse(data));
      }
    }
  } catch (err) {
    conn.textContent = `disconnected (${err instanceof Error ? err.message : String(err)})`;
  }
  setTimeout(() => void stream(), 1000);
}

/** @param {string} event @param {unknown} data */
function onEvent(event, data) {
  if (event === 'hello') {
    const h = /** @type {{ devices: DeviceStatus[], rollouts: Rollout[] }} */ (data);
    for (const d of h.devices) devices.set(d.deviceId, d);
    for (const r of h.rollouts) rollouts.set(r.id, r);
  } else if (event === 'device') {
    const d = /** @type {DeviceStatus} */ (data);
    devices.set(d.deviceId, d);
  } else if (event === 'rollout') {
    const r = /** @type {Rollout} */ (data);
    rollouts.set(r.id, r);
  }
  scheduleRender();
}

let renderPending = false;
/** Many statuses a second arrive from a large fleet: draw at most once a frame. */
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    renderDevices();
    renderRollouts();
  });
}

void stream();
