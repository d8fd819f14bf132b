#!/usr/bin/env node
// Opens chorus's live dashboard (GET /dashboard) in headless Chromium and reports what its DOM
// shows as it changes: which source each group's track holds, and which sources are marked
// talking. Writes a screenshot of the page at the end.
//
//   node dashboard.mjs --endpoint http://127.0.0.1:8080 --key API_KEY \
//        [--seconds 60] [--screenshot target/dashboard.png]
//
// stdout: one JSON line per event, each with `t` (Date.now() ms in the page when the DOM
// changed, else in node):
//   page                the page loaded
//   status   text       the page's status line changed (e.g. "live: snapshot 1", "401: ...")
//   track    stream, group, tracks, track, source (null: empty)   a track's source changed
//   talking  stream, source, talking                              a source's talking state
//   screenshot path, exit
// stdin: `quit` takes the screenshot and exits; so does the end of --seconds (counted from
// the page load).
// Exit status: 0; 1 on a page error; 2 on bad usage.

import path from 'node:path';
import readline from 'node:readline';
import { launchBrowser, parseCommandLine, emitLine, one } from './lib.mjs';

const USAGE = 'usage: node dashboard.mjs --endpoint URL --key API_KEY [--seconds S] [--screenshot FILE]';
const { args, usage } = parseCommandLine('dashboard.mjs', USAGE, process.argv.slice(2), []);
const endpoint = String(one(args.endpoint) ?? '').replace(/\/$/, '');
const key = one(args.key);
const seconds = Number(one(args.seconds) ?? 60);
const shot = path.resolve(String(one(args.screenshot) ?? 'dashboard.png'));
if (!endpoint || key === undefined || !(seconds > 0)) usage('--endpoint and --key are required');

// Page side: watch the DOM, report each change of a track's source or a source's talking.
function watchDom() {
  const tracks = new Map();
  const talking = new Map();
  let status = '';
  const scan = () => {
    const t = Date.now();
    for (const st of document.querySelectorAll('[data-stream]')) {
      const stream = st.dataset.stream;
      for (const g of st.querySelectorAll('[data-group]')) {
        for (const tr of g.querySelectorAll('[data-track]')) {
          const k = `${stream}|${g.dataset.group}|${tr.dataset.track}`;
          const source = tr.dataset.source ?? null;
          if (tracks.get(k) !== source) {
            tracks.set(k, source);
            window.__dashEmit({
              t, event: 'track', stream, group: g.dataset.group, tracks: Number(g.dataset.tracks),
              track: Number(tr.dataset.track), source,
            });
          }
        }
      }
      for (const row of st.querySelectorAll('[data-source-row]')) {
        const k = `${stream}|${row.dataset.sourceRow}`;
        const on = row.dataset.talking === 'true';
        if (talking.get(k) !== on) {
          talking.set(k, on);
          window.__dashEmit({ t, event: 'talking', stream, source: row.dataset.sourceRow, talking: on });
        }
      }
    }
    const s = document.getElementById('status').textContent;
    // "live: snapshot N" changes every snapshot: report it only when it stops being live.
    const kind = s.startsWith('live:') ? 'live' : s;
    if (kind !== status) {
      status = kind;
      window.__dashEmit({ t, event: 'status', text: s });
    }
  };
  new MutationObserver(scan).observe(document.body, { subtree: true, childList: true, attributes: true, characterData: true });
  scan();
}

let browser;
let done = false;
async function finish(code) {
  if (done) return;
  done = true;
  try {
    if (browser && page) {
      await page.screenshot({ path: shot, fullPage: true });
      emitLine({ event: 'screenshot', path: shot });
    }
  } catch (e) {
    process.stderr.write(`dashboard.mjs: screenshot failed: ${e.message}\n`);
    code = 1;
  }
  try { await browser?.close(); } catch { /* already gone */ }
  emitLine({ event: 'exit', code });
  process.exit(code);
}

let page;
let deadline;
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (line.trim() === 'quit') { clearTimeout(deadline); finish(0); }
});

try {
  browser = await launchBrowser({ kind: 'chromium', endpoint });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  page.on('pageerror', (err) => {
    process.stderr.write(`dashboard.mjs: page error: ${err.stack || err}\n`);
    finish(1);
  });
  await page.exposeFunction('__dashEmit', (ev) => process.stdout.write(JSON.stringify(ev) + '\n'));
  // The key in the fragment: the page reads it and clears the address bar; no server sees it.
  await page.goto(`${endpoint}/dashboard#key=${encodeURIComponent(key)}`, { waitUntil: 'load', timeout: 30_000 });
  emitLine({ event: 'page' });
  await page.evaluate(watchDom);
  // --seconds counts from the page load: launching Chromium on a busy machine takes a while.
  deadline = setTimeout(() => finish(0), seconds * 1000);
} catch (e) {
  process.stderr.write(`dashboard.mjs: ${e.stack || e}\n`);
  finish(1);
}
