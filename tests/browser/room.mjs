#!/usr/bin/env node
// A room of participants, each a page of one headless Chromium (or Firefox
// ESR: the participant's `browser`) running the official Millicast JS SDK (@millicast/sdk, unmodified) against chorus.
// A participant may publish a corpus speaker (millicast.Publish with a
// sourceId) and/or view the stream (millicast.View with N multiplexed audio
// tracks, a pinned source and excluded sources). Viewers record every server
// event, an energy timeline per received track and inbound-rtp stats per mid.
//
//   node room.mjs --endpoint http://127.0.0.1:8080 --stream panel --token devtoken \
//        --seconds 30 --spec '[{"name":"p-ana","publish":"ana",
//                               "view":{"tracks":3,"pinned":"host","exclude":["ana"]}},
//                              {"name":"listener","view":{"tracks":3}}]'
//
// Spec: a JSON array (or {"participants":[...]}) of
//   name      unique participant name (required)
//   publish   corpus speaker id (tests/corpus/panel/<id>.opus) or a file path
//   sourceId  the publication's sourceId (default: the speaker id; null = the
//             stream's main source)
//   view      {tracks: N (default 3), pinned: SOURCE, exclude: [SOURCE...],
//              events: [...] (default active,inactive,vad,viewercount,stopped),
//              muted: true (the <audio> element that plays each track),
//              noRed: true (its offer leaves RFC 2198 RED out: it gets plain Opus)}
//   token, subscribeToken   this participant's publish / subscribe token (default: the
//             command line's); a room token works for both
//   room      a room token: the page opens the room socket of the room named --stream
//   publishLater  true: publish only on the `publish NAME` command
//   inSync    with publishLater: its corpus starts where the others' are then (a second
//             device of a member playing the same sound in step)
//   e2ee      a hex AES-128/256 key: the participant encrypts its published payloads end to end
//             (RTCRtpScriptTransform, AES-GCM) and decrypts every track it views with it
//   noLevel   true: its publish offer drops the RFC 6464 audio level extension
//   relay     true: its Publish and View connect through TURN only (peerConfig
//             iceTransportPolicy 'relay', with the director's iceServers)
//   priority  its Publish's priority (redundant ingest of one sourceId)
//   record    its Publish's record option (true: ask the server to record it)
//   publishEvents  its Publish's events (e.g. ["active","inactive","viewercount"])
//   autoReconnect  true: its Publish and View reconnect by themselves (the SDK's own
//             autoReconnect); `reconnect` lines say when they start
//   browser   "chromium" or "firefox" (default: $CHORUS_BROWSER, else chromium): the
//             engine its page runs in; each engine used is launched once
//
// Order: all pages open and decode their corpus; all publishers connect;
// all viewers connect (--viewers-first swaps the two); then every publisher
// starts its corpus at one common wall-clock instant (corpusStartAt), so the
// panel's turns overlap as in scenario.json. --seconds counts from that
// instant. Setup may take at most --setup-timeout seconds (default 30); the
// tool exits by itself at the latest setup-timeout + seconds + 15 s after start.
//
// stdout: one JSON line per event ({"t":<Date.now()>,"event":...,"name":...}):
//   starting, page, audio, room-joined, published, viewing, broadcast, track, pc-state,
//   corpus-start, room, room-response, room-closed, unpublished, project, unproject, left,
//   error, deadline, report, exit.
// The last line before exit is {"event":"report","participants":{...}}.
// stdin, one command a line:
//   project NAME SOURCE MID   view.project(SOURCE, [{media:'audio', mediaId: MID}])
//                             (SOURCE "_" = the main source; MID "main": no mediaId, the main
//                             track; MID "+": a recvonly track added first, renegotiated
//                             locally as View.addRemoteTrack means to: see lib.mjs)
//   select NAME [LAYER]       view.select(LAYER JSON, default {}); the answer is recorded
//   unproject NAME MID...     view.unproject([MID...])
//   room NAME COMMAND [JSON]  a room socket command (e.g. room host promote {"memberId":"m-x"})
//   publish NAME              publish now (with the credentials of the room's member.promoted
//                             event, if any) and start its corpus
//   unpublish NAME            stop NAME's Publish
//   leave NAME                close NAME's page abruptly (no view.stop())
//   crash NAME                crash NAME's renderer (no WebSocket close frame)
//   quit                      report and exit
// Exit status: 0; 1 after any SDK or server error (including a refused
// project/unproject); 2 on bad usage.

import path from 'node:path';
import { existsSync, readFileSync } from 'node:fs';
import readline from 'node:readline';
import {
  launchBrowser, openHarnessPage, corpusStream, parseCommandLine, commonOptions, corpusFile, emitLine, one,
  installRoom, roomPublish, roomView, roomReport, startCorpusAt, sdkVersion, roomConnect, roomCommand,
  BROWSERS, DEFAULT_BROWSER,
} from './lib.mjs';

const T_START = Date.now();
const USAGE = `usage: node room.mjs (--spec JSON | --spec-file FILE) --endpoint URL --stream NAME
       [--token PUBLISH_TOKEN] [--subscribe-token TOKEN] [--corpus DIR] [--seconds S]
       [--sample-ms 50] [--stats-ms 1000] [--setup-timeout S] [--connect-timeout S]
       [--viewers-first] [--no-loop] [--dtx] [--verbose]`;

const { args, usage } = parseCommandLine('room.mjs', USAGE, process.argv.slice(2),
  ['viewers-first', 'loop', 'dtx', 'verbose']);
const { endpoint, streamName, token, corpusDir, connectTimeoutMs, loop, dtx, verbose } = commonOptions(args);
const subscribeToken = one(args['subscribe-token']);
const seconds = Number(one(args.seconds) ?? 30);
const sampleMs = Number(one(args['sample-ms']) ?? 50);
const statsMs = Number(one(args['stats-ms']) ?? 1000);
const setupTimeout = Number(one(args['setup-timeout']) ?? 30);
const viewersFirst = !!one(args['viewers-first']);

if (!streamName) usage('--stream is required');
if (!(seconds > 0)) usage('--seconds must be > 0');
if (!(sampleMs >= 10) || !(statsMs >= 100)) usage('--sample-ms must be >= 10 and --stats-ms >= 100');
try { new URL(endpoint); } catch { usage(`bad --endpoint ${endpoint}`); }

// ---------------------------------------------------------------- spec
let spec;
try {
  const text = one(args.spec) ?? (one(args['spec-file']) ? readFileSync(String(one(args['spec-file'])), 'utf8') : null);
  if (text === null) usage('--spec or --spec-file is required');
  spec = JSON.parse(text);
} catch (e) { usage(`bad spec: ${e.message}`); }
if (spec && !Array.isArray(spec) && Array.isArray(spec.participants)) spec = spec.participants;
if (!Array.isArray(spec) || spec.length === 0) usage('the spec must be a non-empty JSON array of participants');

const DEFAULT_EVENTS = ['active', 'inactive', 'vad', 'viewercount', 'stopped'];
const participants = [];
{
  const names = new Set();
  for (const [i, p] of spec.entries()) {
    if (!p || typeof p !== 'object') usage(`spec[${i}] is not an object`);
    const name = p.name;
    if (typeof name !== 'string' || !name || /\s/.test(name)) usage(`spec[${i}].name must be a non-empty string without spaces`);
    if (names.has(name)) usage(`duplicate participant name ${name}`);
    names.add(name);
    const part = {
      name, publish: null, view: null,
      token: p.token ?? null, subscribeToken: p.subscribeToken ?? null, room: p.room ?? null,
      e2ee: p.e2ee ?? null, noLevel: !!p.noLevel, relay: !!p.relay, priority: p.priority ?? null,
      record: p.record ?? null,
      inSync: !!p.inSync, autoReconnect: !!p.autoReconnect, publishEvents: p.publishEvents ?? null,
      browser: p.browser ?? DEFAULT_BROWSER,
    };
    if (!BROWSERS.includes(part.browser)) usage(`${name}: browser must be one of ${BROWSERS.join(', ')}`);
    if (part.e2ee !== null && !/^([0-9a-fA-F]{32}|[0-9a-fA-F]{64})$/.test(part.e2ee)) usage(`${name}: e2ee must be a 32- or 64-digit hex key`);
    if (p.publish !== undefined && p.publish !== null) {
      const speaker = String(p.publish);
      const file = corpusFile(speaker, corpusDir);
      if (!existsSync(file)) usage(`${name}: corpus file not found: ${file}`);
      const stem = path.basename(file).replace(/\.[^.]+$/, '');
      const sourceId = 'sourceId' in p ? (p.sourceId === null || p.sourceId === '' ? null : String(p.sourceId)) : stem;
      part.publish = { speaker: stem, file, sourceId, later: !!p.publishLater };
    }
    if (p.view !== undefined && p.view !== null && p.view !== false) {
      const v = p.view === true ? {} : p.view;
      const tracks = v.tracks ?? 3;
      if (!Number.isInteger(tracks) || tracks < 0) usage(`${name}: view.tracks must be an integer >= 0`);
      const exclude = v.exclude ?? [];
      if (!Array.isArray(exclude)) usage(`${name}: view.exclude must be an array`);
      part.view = {
        tracks, pinned: v.pinned ?? null, exclude: exclude.map(String),
        events: v.events ?? DEFAULT_EVENTS, muted: v.muted !== false, noRed: !!v.noRed,
      };
    }
    if (!part.publish && !part.view && !part.room) usage(`${name} neither publishes, views nor joins a room`);
    participants.push(part);
  }
}
if (participants.some((p) => p.publish && !p.token) && !token) usage('--token is required to publish (or set CHORUS_PUBLISH_TOKEN)');
const byName = Object.fromEntries(participants.map((p) => [p.name, p]));

// ---------------------------------------------------------------- output
let hadError = false;
const emit = emitLine;
function fail(name, message, extra = {}) {
  hadError = true;
  emit({ event: 'error', name, message, ...extra });
  process.stderr.write(`room.mjs: error${name ? ` [${name}]` : ''}: ${message}\n`);
}
function cleanMsg(e) {
  let m = String((e && e.message) || e);
  m = m.replace(/^(page\.evaluate|page\.addScriptTag|page\.exposeFunction):\s*/, '').replace(/^Error: /, '').split('\n')[0];
  if (/Failed to fetch/.test(m) && !/could not reach/.test(m)) m += ` (could not reach ${endpoint}/api/director: is chorus running?)`;
  return m;
}

// ---------------------------------------------------------------- state
const browsers = {};      // engine -> its launched browser
let exiting = false;
let corpusStartAt = null;
const reports = {};       // name -> page report taken before the page went away

// Hard stop, whatever happens.
const hardMs = (setupTimeout + seconds + 15) * 1000;
setTimeout(() => {
  process.stderr.write(`room.mjs: error: hard time limit (${hardMs / 1000} s) reached, exiting\n`);
  emit({ event: 'exit', code: 1, reason: 'hard-limit' });
  process.exit(1);
}, hardMs).unref();

async function takeReport(p) {
  if (!p.page || p.page.isClosed()) return reports[p.name] ?? null;
  try {
    reports[p.name] = await Promise.race([roomReport(p.page), new Promise((r) => setTimeout(() => r(null), 5000))]) ?? reports[p.name];
  } catch { /* keep the last one */ }
  return reports[p.name] ?? null;
}

async function finalReport() {
  const out = {};
  await Promise.all(participants.map(async (p) => {
    const r = await takeReport(p);
    out[p.name] = {
      name: p.name,
      publish: p.publish ? { ...p.publish, ...(p.pubInfo || {}), corpus: p.corpus || null, ...(r && r.publish ? r.publish : {}) } : null,
      view: p.view ? { spec: p.view, ...(r && r.view ? r.view : {}) } : null,
      room: r && r.room ? r.room : null,
      e2ee: r && r.e2ee ? r.e2ee : null,
      left: p.left || null,
    };
  }));
  return out;
}

async function shutdown(code, reason) {
  if (exiting) return;
  exiting = true;
  setTimeout(() => { emit({ event: 'exit', code, reason, note: 'forced' }); process.exit(code); }, 15_000).unref();
  let report = {};
  try { report = await finalReport(); } catch (e) { process.stderr.write(`room.mjs: could not collect the report: ${cleanMsg(e)}\n`); }
  emit({ event: 'report', endpoint, stream: streamName, sdk: sdkVersion(), corpusStartAt, seconds, sampleMs, statsMs, participants: report });
  await Promise.all(participants.map((p) => (p.page && !p.page.isClosed()
    ? p.page.evaluate(() => window.room && window.room.stopAll()).catch(() => {}) : null)));
  await new Promise((r) => setTimeout(r, 300)); // let the SDK's close reach the server
  await Promise.all(Object.values(browsers).map((b) => b.close().catch(() => {})));
  code = code || (hadError ? 1 : 0);
  emit({ event: 'exit', code, reason });
  process.exit(code);
}
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => shutdown(hadError ? 1 : 130, sig));

// ---------------------------------------------------------------- setup
async function openPage(p) {
  const { page } = await openHarnessPage(browsers[p.browser], endpoint, {
    onConsole: (type, text) => {
      if (verbose || type === 'pageerror') process.stderr.write(`[${p.name} ${type}] ${text}\n`);
    },
  });
  p.page = page;
  page.on('crash', () => { if (!p.left) fail(p.name, 'page crashed'); });
  await installRoom(page, (ev) => {
    if (!ev) return;
    if (ev.event === 'error') { if (!exiting) fail(p.name, ev.message, { role: ev.role }); return; }
    emit({ ...ev, name: p.name });
  });
  if (verbose) await page.evaluate(() => millicast.Logger.setLevel(millicast.Logger.DEBUG));
  emit({ event: 'page', name: p.name });
  if (p.publish) {
    const info = await corpusStream(page, p.publish.file, 'corpus', { loop, start: false });
    p.corpus = { duration: Number(info.duration.toFixed(3)), loop };
    emit({ event: 'audio', name: p.name, sourceId: p.publish.sourceId, file: p.publish.file, duration: p.corpus.duration, loop });
  }
  if (p.room) {
    const url = `${endpoint.replace(/^http/, 'ws')}/api/rooms/${encodeURIComponent(streamName)}/ws?token=${encodeURIComponent(p.room)}`;
    const state = await roomConnect(page, url);
    emit({ event: 'room-joined', name: p.name, memberId: state.you && state.you.memberId, role: state.you && state.you.role });
  }
}

async function publishOne(p, extra = {}) {
  try {
    p.pubInfo = await roomPublish(p.page, {
      streamName, token: p.token ?? token, sourceId: p.publish.sourceId, streamKey: 'corpus', connectTimeoutMs, dtx, statsMs,
      e2ee: p.e2ee, noLevel: p.noLevel, priority: p.priority, record: p.record, autoReconnect: p.autoReconnect,
      events: p.publishEvents,
      peerConfig: p.relay ? { iceTransportPolicy: 'relay' } : null, ...extra,
    });
  } catch (e) { throw Object.assign(new Error(`publish failed: ${cleanMsg(e)}`), { participant: p.name }); }
  emit({ event: 'published', name: p.name, ...p.pubInfo });
}

async function viewOne(p) {
  const v = p.view;
  const connectOptions = { disableVideo: true, multiplexedAudioTracks: v.tracks, events: v.events };
  if (v.pinned !== null) connectOptions.pinnedSourceId = v.pinned;
  if (v.exclude.length) connectOptions.excludedSourceIds = v.exclude;
  if (p.relay) connectOptions.peerConfig = { iceTransportPolicy: 'relay' };
  let info;
  try {
    info = await roomView(p.page, {
      streamName, accountId: 'chorus', subscribeToken: p.subscribeToken ?? subscribeToken, connectOptions, muted: v.muted,
      sampleMs, statsMs, connectTimeoutMs, e2ee: p.e2ee, autoReconnect: p.autoReconnect, noRed: !!v.noRed,
    });
  } catch (e) { throw Object.assign(new Error(`view failed: ${cleanMsg(e)}`), { participant: p.name }); }
  emit({ event: 'viewing', name: p.name, ...info });
}

async function setup() {
  emit({
    event: 'starting', endpoint, stream: streamName, sdk: sdkVersion(), seconds,
    participants: participants.map((p) => ({ name: p.name, publish: p.publish && p.publish.sourceId, speaker: p.publish && p.publish.speaker, view: p.view })),
  });
  for (const kind of new Set(participants.map((p) => p.browser))) {
    const b = browsers[kind] = await launchBrowser({ kind, endpoint });
    b.on('disconnected', () => { if (!exiting) { fail(null, `${kind} exited unexpectedly`); shutdown(1, 'error'); } });
    emit({ event: 'browser', kind, version: await b.version() });
  }
  await Promise.all(participants.map(openPage));
  const pubs = participants.filter((p) => p.publish && !p.publish.later);
  const views = participants.filter((p) => p.view);
  if (viewersFirst) { await Promise.all(views.map(viewOne)); await Promise.all(pubs.map(publishOne)); }
  else { await Promise.all(pubs.map(publishOne)); await Promise.all(views.map(viewOne)); }
  // Every corpus starts at the same instant.
  corpusStartAt = Date.now() + 300;
  await Promise.all(pubs.map(async (p) => {
    const s = await startCorpusAt(p.page, 'corpus', corpusStartAt);
    p.corpus = { ...p.corpus, startedWall: s.startedWall, scheduledWall: corpusStartAt };
    emit({ event: 'corpus-start', name: p.name, sourceId: p.publish.sourceId, startedWall: s.startedWall, scheduled: corpusStartAt });
  }));
  if (!pubs.length) corpusStartAt = Date.now();
}

// ---------------------------------------------------------------- commands
let queue = Promise.resolve();
function onLine(line) {
  queue = queue.then(() => runCommand(line.trim())).catch((e) => fail(null, cleanMsg(e)));
}

function target(name, needView) {
  const p = byName[name];
  if (!p) { fail(null, `no participant ${name}`); return null; }
  if (p.left || !p.page || p.page.isClosed()) { fail(name, `${name} has left`); return null; }
  if (needView && !p.view) { fail(name, `${name} does not view`); return null; }
  return p;
}

async function runCommand(line) {
  if (!line || line.startsWith('#') || exiting) return;
  const [cmd, name, ...rest] = line.split(/\s+/);
  switch (cmd) {
    case 'quit':
    case 'exit':
      return shutdown(0, 'quit');
    case 'project': {
      if (!name || rest.length !== 2) return fail(null, 'usage: project NAME SOURCE MID');
      const p = target(name, true); if (!p) return;
      const source = rest[0] === '_' ? null : rest[0];
      const c = await p.page.evaluate(([s, m]) => window.room.project(s, m), [source, rest[1]]);
      emit({ event: 'project', name, sourceId: source, mid: c.mid, ok: c.ok, message: c.message, ms: c.doneAt - c.t });
      if (!c.ok) fail(name, `project ${rest[0]} into mid ${rest[1]} refused: ${c.message}`, { command: 'project' });
      return;
    }
    case 'select': {
      // A refusal is an answer to record, not an error of the run.
      if (!name) return fail(null, 'usage: select NAME [LAYER-JSON]');
      const p = target(name, true); if (!p) return;
      let layer;
      try { layer = JSON.parse(rest.join(' ') || '{}'); } catch (e) { return fail(null, `select: bad JSON: ${e.message}`); }
      const c = await p.page.evaluate((l) => window.room.select(l), layer);
      emit({ event: 'select', name, layer, ok: c.ok, message: c.message, ms: c.doneAt - c.t });
      return;
    }
    case 'unproject': {
      if (!name || rest.length < 1) return fail(null, 'usage: unproject NAME MID...');
      const p = target(name, true); if (!p) return;
      const c = await p.page.evaluate((m) => window.room.unproject(m), rest);
      emit({ event: 'unproject', name, mids: rest, ok: c.ok, message: c.message, ms: c.doneAt - c.t });
      if (!c.ok) fail(name, `unproject ${rest.join(',')} refused: ${c.message}`, { command: 'unproject' });
      return;
    }
    case 'room': {
      if (!name || rest.length < 1) return fail(null, 'usage: room NAME COMMAND [JSON]');
      const p = target(name, false); if (!p) return;
      if (!p.room) return fail(name, `${name} has no room socket`);
      let data = {};
      try { data = rest.length > 1 ? JSON.parse(rest.slice(1).join(' ')) : {}; } catch (e) { return fail(name, `bad JSON for room ${rest[0]}: ${e.message}`); }
      const c = await roomCommand(p.page, rest[0], data);
      emit({ event: 'room-response', name, command: rest[0], ok: c.ok, data: c.data, ms: c.doneAt - c.t });
      return;
    }
    case 'publish': {
      if (!name) return fail(null, 'usage: publish NAME');
      const p = target(name, false); if (!p) return;
      if (!p.publish) return fail(name, `${name} has nothing to publish`);
      await publishOne(p, { roomCredentials: true });
      const at = Date.now();
      const offset = p.inSync && corpusStartAt ? ((at - corpusStartAt) / 1000) % p.corpus.duration : 0;
      const s = await startCorpusAt(p.page, 'corpus', at, offset);
      p.corpus = { ...p.corpus, startedWall: s.startedWall, scheduledWall: s.startedWall };
      emit({ event: 'corpus-start', name: p.name, sourceId: p.publish.sourceId, startedWall: s.startedWall, scheduled: s.startedWall });
      return;
    }
    case 'unpublish': {
      if (!name) return fail(null, 'usage: unpublish NAME');
      const p = target(name, false); if (!p) return;
      const stopped = await p.page.evaluate(() => window.room.unpublish('command'));
      emit({ event: 'unpublish', name, stopped });
      return;
    }
    case 'leave':
    case 'crash': {
      if (!name) return fail(null, `usage: ${cmd} NAME`);
      const p = target(name, false); if (!p) return;
      if (cmd === 'crash' && p.browser !== 'chromium') return fail(name, `crash needs chromium (${name} runs in ${p.browser})`);
      await takeReport(p);
      p.left = { t: Date.now(), how: cmd === 'leave' ? 'page.close' : 'renderer crash' };
      if (cmd === 'leave') await p.page.close();
      else {
        const cdp = await p.page.context().newCDPSession(p.page);
        const crashed = new Promise((r) => { p.page.once('crash', r); setTimeout(r, 3000); });
        cdp.send('Page.crash').catch(() => {}); // never answers: the renderer is gone
        await crashed;
      }
      emit({ event: 'left', name, how: p.left.how });
      return;
    }
    default:
      fail(null, `unknown command: ${line}`);
  }
}

// ---------------------------------------------------------------- main
async function main() {
  let setupTimer;
  const setupLimit = new Promise((_, rej) => {
    setupTimer = setTimeout(() => rej(new Error(`setup did not finish within ${setupTimeout} s`)), setupTimeout * 1000);
  });
  try {
    await Promise.race([setup(), setupLimit]);
  } catch (e) {
    fail(e.participant ?? null, cleanMsg(e));
    return shutdown(1, 'setup');
  } finally { clearTimeout(setupTimer); }
  if (exiting) return;
  const leftMs = Math.max(0, corpusStartAt + seconds * 1000 - Date.now());
  setTimeout(() => { emit({ event: 'deadline', seconds }); shutdown(0, 'seconds'); }, leftMs);
  const rl = readline.createInterface({ input: process.stdin, terminal: false });
  rl.on('line', onLine);
  rl.on('close', () => { /* EOF: run until --seconds */ });
}

main().catch((e) => { fail(null, cleanMsg(e)); shutdown(1, 'error'); });
