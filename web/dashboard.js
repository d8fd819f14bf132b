// The chorus dashboard: reads GET api/dashboard/events (server-sent events, one JSON snapshot
// per event) with fetch and a streamed body, because EventSource cannot send the API key as an
// Authorization header and a key in a URL ends up in logs and history. Every name shown comes
// from publishers, so it is set as text, never as HTML.
'use strict';

const $ = (id) => document.getElementById(id);
const FEED = 'api/dashboard/events';

let key = '';
let abort = null;
let retry = null;
let lastSnapshotAt = 0;

/** An element with attributes (`class`, `data-*`, `style`, `title`) and children (text or nodes). */
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === 'class') e.className = v;
    else if (k === 'style') e.style.cssText = v;
    else e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function setStatus(text, kind = '') {
  const s = $('status');
  s.textContent = text;
  s.className = 'status ' + kind;
}

/** A source's name as shown: "" is the stream's main source. */
const sourceName = (s) => (s === '' || s === null || s === undefined ? '(main)' : s);

/** A stable colour per source, so a source looks the same in every track and lane. */
function colour(source) {
  let h = 0;
  for (const ch of sourceName(source)) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return `hsl(${h % 360} 60% 45%)`;
}

const fmtTime = (ms) => new Date(ms).toISOString().slice(11, 23);
const fmtRate = (r) => (r === null || r === undefined ? '—' : Math.round(r).toString());

function stat(value, label) {
  return el('div', { class: 'stat' }, el('b', {}, value), el('span', {}, label));
}

function renderSummary(s) {
  const streams = s.streams.length;
  const sources = s.streams.reduce((n, st) => n + st.sources.length, 0);
  $('summary').replaceChildren(
    stat(s.node, 'this node'),
    stat(streams, 'streams'),
    stat(sources, 'sources'),
    stat(s.viewers, 'viewers'),
    stat(fmtRate(s.rates.originPacketsIn), 'packets in/s (origin)'),
    stat(fmtRate(s.rates.edgePacketsOut), 'packets out/s (edge)'),
    stat(`${s.clients}/${s.maxClients}`, 'dashboards'),
    stat(s.skipped, 'snapshots skipped'),
  );
}

function level(src) {
  // RFC 6464: 0 dBov is loudest, 127 silence; speech sits around 20-50.
  const l = src.level;
  const pct = l === null ? 0 : Math.max(0, Math.min(100, ((100 - l) / 100) * 100));
  return el('span', { class: 'meter', title: l === null ? 'no level' : `-${l} dBov` },
    el('span', { class: 'bar', style: `display:block;width:${pct.toFixed(0)}%` }));
}

function renderSources(st) {
  const rows = st.sources.map((src) => el('tr', {
    class: src.talking ? 'talking' : '',
    'data-source-row': sourceName(src.sourceId),
    'data-talking': src.talking,
  },
  el('td', {}, el('span', { class: 'dot', style: `display:inline-block;width:.6rem;height:.6rem;border-radius:50%;background:${colour(src.sourceId ?? '')}` }), ' ', sourceName(src.sourceId)),
  el('td', {}, level(src)),
  el('td', { class: 'num' }, src.level === null ? '—' : `-${src.level} dB`),
  el('td', {}, el('span', { class: 'badge' }, src.talking ? 'talking' : 'quiet')),
  el('td', { class: 'num' }, src.inTracks)));
  return el('table', {},
    el('tr', {}, el('th', {}, 'source'), el('th', {}, 'level'), el('th', { class: 'num' }, ''),
      el('th', {}, 'state'), el('th', { class: 'num' }, 'in tracks')),
    rows.length ? rows : el('tr', {}, el('td', { colspan: 5, class: 'muted' }, 'no source')));
}

function groupLabel(g) {
  const parts = [`group ${g.id}`, `${g.tracks.length} track${g.tracks.length === 1 ? '' : 's'}`,
    `main tracks: ${g.main === '' ? 'the main source' : g.main}`];
  if (g.excluded) parts.push(`${g.excluded} excluded`);
  if (g.fixed) parts.push(`${g.fixed} projected`);
  parts.push(`${g.viewers} viewer${g.viewers === 1 ? '' : 's'}`);
  return parts.join(' · ');
}

function renderGroups(st) {
  if (!st.groups.length) return el('p', { class: 'muted' }, 'no viewer here: no selection group');
  return st.groups.map((g) => el('div', { class: 'group', 'data-group': g.id, 'data-tracks': g.tracks.length },
    el('div', { class: 'label' }, groupLabel(g)),
    el('div', { class: 'tracks' }, g.tracks.map((occ, k) => (occ === null
      ? el('span', { class: 'track empty', 'data-track': k }, el('span', { class: 'n' }, `track ${k + 1}`), '—')
      : el('span', { class: 'track', 'data-track': k, 'data-source': sourceName(occ) },
        el('span', { class: 'n' }, `track ${k + 1}`),
        el('span', { class: 'dot', style: `background:${colour(occ)}` }), sourceName(occ)))))));
}

function renderStreams(s) {
  if (!s.streams.length) {
    $('streams').replaceChildren(el('p', { class: 'muted' }, 'No stream is live.'));
    return;
  }
  $('streams').replaceChildren(...s.streams.map((st) => el('div', { class: 'stream', 'data-stream': st.name },
    el('h3', {}, st.name, ' ', el('span', { class: 'muted' },
      st.viewers === null ? '' : `${st.viewers} viewer${st.viewers === 1 ? '' : 's'}`)),
    el('div', { class: 'cols' },
      el('div', {}, renderSources(st)),
      el('div', {}, renderGroups(st))))));
}

/** One lane per track now shown: its occupants over the window, from the switches. */
function renderTimeline(s) {
  const start = s.atMs - s.windowMs;
  const pos = (t) => `${(((Math.max(t, start) - start) / s.windowMs) * 100).toFixed(2)}%`;
  const lanes = [];
  for (const st of s.streams) {
    for (const g of st.groups) {
      g.tracks.forEach((now, k) => {
        const mine = s.switches.filter((w) => w.stream === st.name && w.group === g.key && w.track === k);
        const segs = [];
        let end = s.atMs;
        let occ = now;
        for (let i = mine.length - 1; i >= 0; i--) {
          segs.push([mine[i].atMs, end, occ]);
          end = mine[i].atMs;
          occ = mine[i].from;
        }
        segs.push([start, end, occ]);
        const bar = el('div', { class: 'bar-wrap' }, segs.filter(([, , o]) => o !== null).map(([a, b, o]) => {
          const width = ((b - Math.max(a, start)) / s.windowMs) * 100;
          return el('div', { class: 'seg', title: `${sourceName(o)} ${fmtTime(a)}–${fmtTime(b)}`,
            style: `left:${pos(a)};width:${width.toFixed(2)}%;background:${colour(o)}` }, width > 4 ? sourceName(o) : '');
        }));
        lanes.push(el('div', { class: 'lane' },
          el('div', { class: 'name', title: g.key }, `${st.name} · group ${g.id} · track ${k + 1}`), bar));
      });
    }
  }
  $('window-label').textContent = `(last ${Math.round(s.windowMs / 1000)} s, ${s.switches.length} switches${s.switchesDropped ? `, ${s.switchesDropped} dropped` : ''})`;
  if (!lanes.length) {
    $('timeline').replaceChildren(el('p', { class: 'muted' }, 'no track to show'));
  } else {
    $('timeline').replaceChildren(...lanes, el('div', { class: 'axis' }, el('div'),
      el('div', {}, el('span', {}, `-${Math.round(s.windowMs / 1000)} s`), el('span', {}, '-30 s'), el('span', {}, 'now'))));
  }
  const recent = s.switches.slice(-12).reverse();
  $('switches').replaceChildren(...recent.map((w) => el('li', {},
    `${fmtTime(w.atMs)} ${w.stream} group ${w.group.split('/')[0]} track ${w.track + 1}: `,
    w.from === null ? '—' : sourceName(w.from), ' → ', w.to === null ? '—' : sourceName(w.to))));
}

function renderNodes(s) {
  // The region column only where some node has one.
  const regions = s.nodes.some((n) => n.region);
  const names = ['node', 'kind', 'state', ...(regions ? ['region'] : []), 'viewers', 'publications', 'capacity', 'streams', 'heartbeat'];
  const head = el('tr', {}, names.map((h, i) => el('th', { class: i >= names.length - 5 ? 'num' : '' }, h)));
  const rows = s.nodes.map((n) => el('tr', {},
    el('td', {}, n.id), el('td', {}, n.kind), el('td', {}, n.state), regions ? el('td', {}, n.region ?? '—') : null,
    el('td', { class: 'num' }, n.viewers), el('td', { class: 'num' }, n.publications),
    el('td', { class: 'num' }, n.capacity ?? '∞'), el('td', { class: 'num' }, n.streams),
    el('td', { class: 'num' }, `${(n.heartbeatAgeMs / 1000).toFixed(1)} s ago`)));
  const err = s.registryError ? el('tr', {}, el('td', { colspan: 9, class: 'status error' }, `registry: ${s.registryError}`)) : null;
  $('nodes').replaceChildren(head, ...rows, ...(err ? [err] : []));
}

function renderDrops(s) {
  const counted = s.drops.filter((d) => d.count > 0).sort((a, b) => b.count - a.count);
  const rows = counted.map((d) => el('tr', { 'data-drop': `${d.side}:${d.reason}` },
    el('td', {}, d.side), el('td', {}, d.reason), el('td', { class: 'num' }, d.count)));
  $('drops').replaceChildren(
    el('tr', {}, el('th', {}, 'where'), el('th', {}, 'reason'), el('th', { class: 'num' }, 'count')),
    ...rows,
    el('tr', {}, el('td', { colspan: 3, class: 'muted' },
      `${s.drops.length - counted.length} other reasons at 0 (chorus_*_dropped_total in /metrics)`)));
}

function render(s) {
  lastSnapshotAt = Date.now();
  renderSummary(s);
  renderStreams(s);
  renderTimeline(s);
  renderNodes(s);
  renderDrops(s);
  document.body.dataset.seq = s.seq;
  setStatus(`live: snapshot ${s.seq} at ${fmtTime(s.atMs)} UTC, every ${s.periodMs} ms`, 'ok');
}

/** Splits a server-sent event stream into events: {event, data}. */
function* sseEvents(buffer) {
  let i;
  while ((i = buffer.text.indexOf('\n\n')) >= 0) {
    const block = buffer.text.slice(0, i);
    buffer.text = buffer.text.slice(i + 2);
    let event = 'message';
    const data = [];
    for (const line of block.split('\n')) {
      if (line.startsWith(':')) continue;
      const c = line.indexOf(':');
      const field = c < 0 ? line : line.slice(0, c);
      const value = c < 0 ? '' : line.slice(c + 1).replace(/^ /, '');
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
    }
    if (data.length) yield { event, data: data.join('\n') };
  }
}

function again(ms) {
  clearTimeout(retry);
  retry = setTimeout(connect, ms);
}

async function connect() {
  if (!key) {
    setStatus('enter the API key (chorus --api-key; in dev mode the generated one serve prints)');
    return;
  }
  if (abort) abort.abort();
  abort = new AbortController();
  setStatus('connecting…');
  let res;
  try {
    res = await fetch(FEED, {
      headers: { Authorization: `Bearer ${key}`, Accept: 'text/event-stream' },
      cache: 'no-store',
      signal: abort.signal,
    });
  } catch (e) {
    if (e.name === 'AbortError') return;
    setStatus(`cannot reach chorus (${e.message}); retrying`, 'error');
    again(2000);
    return;
  }
  if (!res.ok) {
    let message = res.statusText;
    try { message = (await res.json()).data.message; } catch { /* not JSON */ }
    setStatus(`${res.status}: ${message}`, 'error');
    // A wrong key stays wrong: wait for another one. Anything else may pass.
    if (res.status !== 401) again(3000);
    return;
  }
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  const buffer = { text: '' };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer.text += value.replace(/\r\n?/g, '\n');
      for (const ev of sseEvents(buffer)) {
        if (ev.event === 'snapshot') render(JSON.parse(ev.data));
      }
    }
    setStatus('the feed ended; reconnecting', 'error');
  } catch (e) {
    if (e.name === 'AbortError') return;
    setStatus(`the feed broke (${e.message}); reconnecting`, 'error');
  }
  again(1000);
}

// A snapshot comes every period: say so when they stop coming.
setInterval(() => {
  if (lastSnapshotAt && Date.now() - lastSnapshotAt > 3000 && $('status').classList.contains('ok')) {
    setStatus(`no snapshot for ${Math.round((Date.now() - lastSnapshotAt) / 1000)} s`, 'error');
  }
}, 1000);

$('key-form').addEventListener('submit', (e) => {
  e.preventDefault();
  key = $('key').value.trim();
  sessionStorage.setItem('chorus-dashboard-key', key);
  connect();
});

// The key may come in the fragment (#key=..., never sent to a server) or the query (?key=...);
// either way it leaves the address bar at once.
{
  const fromHash = new URLSearchParams(location.hash.slice(1)).get('key');
  const fromQuery = new URLSearchParams(location.search).get('key');
  key = fromHash || fromQuery || sessionStorage.getItem('chorus-dashboard-key') || '';
  if (fromHash || fromQuery) {
    sessionStorage.setItem('chorus-dashboard-key', key);
    history.replaceState(null, '', location.pathname);
  }
  $('key').value = key;
  connect();
}
