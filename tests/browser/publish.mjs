#!/usr/bin/env node
// Publish corpus speakers to chorus with the official Millicast JS SDK
// (@millicast/sdk, unmodified) running in headless Debian Chromium.
//
//   node publish.mjs --endpoint http://127.0.0.1:8080 --stream panel \
//        --token devtoken --sources host,ana,bo [--corpus DIR] [--seconds 60]
//
// One page, one millicast.Publish per source, each with its own sourceId and
// its own corpus file (tests/corpus/panel/<sourceId>.opus unless --map
// SRC=FILE says otherwise; FILE may be a speaker id or a path). The source id
// "_" publishes without a sourceId (the stream's main/default source); its
// audio defaults to host.opus.
//
// --video SRC[,SRC...] (repeatable): those sources also send a VP8 video
// track (a 320x240 animated canvas at 30 fps, see harness.addVideo in
// lib.mjs) in the same MediaStream as their audio; the others stay audio
// only (disableVideo). Their stats lines get a "video" object with the
// outbound-rtp video counters (pliCount, firCount, keyFramesEncoded,
// framesEncoded, packetsSent, ...).
//
// stdout: one JSON object per line, e.g.
//   {"event":"published","sourceId":"ana","gen":1,...}
//   {"event":"error","sourceId":"ana","message":"..."}
//   {"event":"stopped","sourceId":"ana","gen":1,"reason":"command"}
// stdin: one command per line
//   republish ID   second Publish with the same sourceId while the first is
//                  live; once it is connected the first is stopped
//   stop ID        stop the live Publish of ID
//   start ID       publish ID again (after stop), or a new source
//   stats          print one stats line per live Publish now
//   quit           stop everything and exit
// EOF on stdin is not a quit: the tool runs until --seconds (default 60).
// Exit status: 0 if no error happened, 1 on any publish error, 2 on bad usage.

import { existsSync } from 'node:fs';
import readline from 'node:readline';
import {
  launchBrowser, openHarnessPage, corpusStream, addCanvasVideo, parseCommandLine, commonOptions,
  corpusFile, emitLine, one, sdkVersion, PAGE_WAIT_CONNECTED,
} from './lib.mjs';

const USAGE = `usage: node publish.mjs --endpoint URL --stream NAME --token TOKEN --sources ID[,ID...]
       [--corpus DIR] [--map SRC=FILE]... [--video SRC[,SRC...]] [--seconds N]
       [--codec vp8] [--dtx]
       [--no-loop] [--sequential] [--connect-timeout S] [--stats S]
       [--auto-reconnect] [--verbose]`;

const { args, usage } = parseCommandLine('publish.mjs', USAGE, process.argv.slice(2),
  ['dtx', 'loop', 'sequential', 'verbose', 'auto-reconnect']);
const { endpoint, streamName, token, corpusDir, connectTimeoutMs, loop, dtx, verbose } = commonOptions(args);
const sourcesArg = one(args.sources);
const seconds = Number(one(args.seconds) ?? 60);
const codec = String(one(args.codec) ?? 'vp8');
const sequential = !!one(args.sequential);
const statsEvery = Number(one(args.stats) ?? 0);
const autoReconnect = !!one(args['auto-reconnect']);

if (!streamName) usage('--stream is required');
if (!token) usage('--token is required (or set CHORUS_PUBLISH_TOKEN)');
if (!sourcesArg) usage('--sources is required');
if (!(seconds > 0)) usage('--seconds must be > 0');
try { new URL(endpoint); } catch { usage(`bad --endpoint ${endpoint}`); }

const sources = String(sourcesArg).split(',').map((s) => s.trim()).filter(Boolean);
const fileMap = {};
for (const m of [].concat(args.map ?? [])) {
  const eq = String(m).indexOf('=');
  if (eq <= 0) usage(`bad --map ${m} (want SRC=FILE)`);
  fileMap[m.slice(0, eq)] = m.slice(eq + 1);
}
const videoSources = new Set();
for (const v of [].concat(args.video ?? [])) {
  if (v === true || v === false) usage('--video needs SRC[,SRC...]');
  for (const s of String(v).split(',').map((x) => x.trim()).filter(Boolean)) videoSources.add(s);
}
const hasVideo = (id) => videoSources.has(id);
const VIDEO = { width: 320, height: 240, fps: 30 };

function corpusFileFor(id) {
  return corpusFile(fileMap[id] ?? (id === '_' ? 'host' : id), corpusDir);
}

// ---------------------------------------------------------------- output
let hadError = false;
const emit = emitLine;
function fail(sourceId, message, extra = {}) {
  hadError = true;
  emit({ event: 'error', sourceId, message, ...extra });
  process.stderr.write(`publish.mjs: error${sourceId !== undefined ? ` [${sourceId ?? '_'}]` : ''}: ${message}\n`);
}
const sid = (id) => (id === '_' ? null : id);

// ---------------------------------------------------------------- page side
// Added to the harness page; drives millicast.Publish instances.
const PAGE_JS = `
(() => {
  const emit = (ev) => window.__chorusEmit(ev);
  const live = {};        // key -> record of the current Publish for that source
  const gens = {};        // key -> last generation number
  const withTimeout = (p, ms, what) => Promise.race([p, new Promise((_, rej) =>
    setTimeout(() => rej(new Error(what + ' timed out after ' + ms + ' ms')), ms))]);
  const errText = (e) => {
    if (e === undefined || e === null) return String(e);
    if (typeof e === 'string') return e;
    if (e instanceof Error) return (e.name && e.name !== 'Error' ? e.name + ': ' : '') + e.message + (e.status ? ' (HTTP ' + e.status + ')' : '');
    try { return JSON.stringify(e); } catch { return String(e); }
  };
  const extmaps = (sdp) => (sdp || '').split(/\\r?\\n/).filter(l => l.startsWith('a=extmap:')).map(l => l.slice(9));
  // The answer's video m-section: its direction (inactive or port 0 means the
  // server refused video) and the payload type of VP8 if it kept it.
  function videoAnswer(sdp) {
    const sec = (sdp || '').split(/\\r?\\n(?=m=)/).find((x) => x.startsWith('m=video'));
    if (!sec) return { mline: false };
    const dir = /a=(sendrecv|sendonly|recvonly|inactive)/.exec(sec);
    const vp8 = /a=rtpmap:(\\d+) VP8\\/90000/i.exec(sec);
    const codecs = [...sec.matchAll(/a=rtpmap:\\d+ ([^\\/\\s]+)\\//g)].map((x) => x[1]);
    return { mline: true, port: Number(sec.split(' ')[1]), direction: dir ? dir[1] : null,
             vp8Pt: vp8 ? Number(vp8[1]) : null, codecs: [...new Set(codecs)] };
  }
  ${PAGE_WAIT_CONNECTED}

  async function start(key, o) {
    const gen = gens[key] = (gens[key] || 0) + 1;
    const sourceId = o.sourceId;
    const rec = { key, sourceId, gen, stopping: false, connected: false, p: null,
                  video: !!o.video, streamKey: o.streamKey };
    const tokenGenerator = () => millicast.Director.getPublisher({ token: o.token, streamName: o.streamName });
    const p = rec.p = new millicast.Publish(null, tokenGenerator, o.autoReconnect);
    p.on('connectionStateChange', (state) => {
      emit({ event: 'pc-state', sourceId, gen, state });
      if (rec.connected && !rec.stopping && (state === 'failed' || state === 'closed')) {
        emit({ event: 'error', sourceId, gen, fatal: true, message: 'peer connection ' + state + ' while publishing' });
      }
    });
    p.on('broadcastEvent', (ev) => emit({ event: 'broadcast', sourceId, gen, name: ev && ev.name, data: ev && ev.data }));
    p.on('reconnect', (ev) => emit({ event: 'reconnect', sourceId, gen, message: errText(ev && ev.error) }));
    const entry = window.harness.streams[o.streamKey];
    if (!entry) throw new Error('no media stream ' + o.streamKey);
    const t0 = performance.now();
    // Video only for --video sources (their stream then has a canvas track).
    const opts = { mediaStream: entry.stream, disableVideo: !o.video, codec: o.codec, dtx: o.dtx };
    if (o.video && entry.stream.getVideoTracks().length === 0) throw new Error('no video track in media stream ' + o.streamKey);
    if (sourceId !== null) opts.sourceId = sourceId;
    try {
      await withTimeout(p.connect(opts), o.connectTimeoutMs, 'Publish.connect()');
      const pc = p.getRTCPeerConnection();
      const signalled = performance.now();
      await waitConnected(pc, o.connectTimeoutMs);
      rec.connected = true;
      const ws = p.signaling && p.signaling.webSocket;
      if (p.signaling) p.signaling.on('wsConnectionClose', () => {
        if (!rec.stopping) emit({ event: 'ws-closed', sourceId, gen, message: 'signalling WebSocket closed by the server' });
      });
      const answer = pc.remoteDescription ? pc.remoteDescription.sdp : '';
      const offer = pc.localDescription ? pc.localDescription.sdp : '';
      const m = /a=rtpmap:(\\d+) opus\\/48000/i.exec(answer);
      const video = o.video ? videoAnswer(answer) : undefined;
      const info = {
        sourceId, gen,
        signallingMs: Math.round(signalled - t0),
        connectMs: Math.round(performance.now() - t0),
        publisherId: p.signaling ? p.signaling.serverId : undefined,
        wsUrl: ws ? ws.url.replace(/token=[^&]*/, 'token=…') : undefined,
        opusPt: m ? Number(m[1]) : null,
        offerAudioLevelExt: /urn:ietf:params:rtp-hdrext:ssrc-audio-level/.test(offer),
        answerAudioLevelExt: /urn:ietf:params:rtp-hdrext:ssrc-audio-level/.test(answer),
        answerExtmaps: extmaps(answer),
        // RFC 2198: Chrome offers red/48000/2; chorus's answer takes it.
        offerRed: /a=rtpmap:\\d+ red\\/48000/i.test(offer),
        answerRed: /a=rtpmap:\\d+ red\\/48000/i.test(answer),
        answerAudio: (/m=audio [^\\r\\n]*/.exec(answer) || [null])[0],
      };
      if (video) info.video = video;
      return info;
    } catch (e) {
      rec.stopping = true;
      try { p.stop(); } catch {}
      throw new Error(errText(e));
    } finally {
      if (rec.connected) {
        const prev = live[key];
        live[key] = rec;
        rec.replaces = prev ? prev.gen : undefined;
      }
    }
  }

  function stop(key, reason) {
    const rec = live[key];
    if (!rec) return null;
    rec.stopping = true;
    delete live[key];
    try { rec.p.stop(); } catch {}
    return { sourceId: rec.sourceId, gen: rec.gen, reason };
  }

  // Start a second Publish for key while the first is live; stop the first
  // once the second is connected.
  async function republish(key, o) {
    const old = live[key];
    if (!old) throw new Error('nothing live to republish');
    const oldRec = old;
    const info = await start(key, o);          // live[key] now points at the new one
    oldRec.stopping = true;
    try { oldRec.p.stop(); } catch {}
    return { info, stopped: { sourceId: oldRec.sourceId, gen: oldRec.gen, reason: 'replaced' } };
  }

  async function stats() {
    const out = [];
    for (const rec of Object.values(live)) {
      const pc = rec.p.getRTCPeerConnection();
      if (!pc) continue;
      const r = { sourceId: rec.sourceId, gen: rec.gen, state: pc.connectionState };
      const report = await pc.getStats();
      let video = null;
      report.forEach((s) => {
        if (s.type === 'outbound-rtp' && s.kind === 'audio') {
          r.packetsSent = s.packetsSent; r.bytesSent = s.bytesSent; r.ssrc = s.ssrc;
          r.retransmittedPacketsSent = s.retransmittedPacketsSent;
        }
        if (s.type === 'media-source' && s.kind === 'audio') { r.audioLevel = s.audioLevel; }
        if (s.type === 'remote-inbound-rtp' && s.kind === 'audio') {
          r.remotePacketsLost = s.packetsLost; r.roundTripTime = s.roundTripTime;
        }
        if (rec.video && s.type === 'outbound-rtp' && s.kind === 'video') {
          // pliCount/firCount: keyframe requests the server sent us (RTCP).
          video = {
            ssrc: s.ssrc, pliCount: s.pliCount, firCount: s.firCount, nackCount: s.nackCount,
            keyFramesEncoded: s.keyFramesEncoded, framesEncoded: s.framesEncoded,
            framesSent: s.framesSent, packetsSent: s.packetsSent, bytesSent: s.bytesSent,
            frameWidth: s.frameWidth, frameHeight: s.frameHeight,
            encoderImplementation: s.encoderImplementation,
            qualityLimitationReason: s.qualityLimitationReason,
          };
        }
      });
      if (rec.video) {
        // No outbound-rtp video entry means the video was not negotiated.
        r.video = video || { packetsSent: 0, missing: 'no outbound-rtp video stats' };
        r.video.canvasFrames = window.harness.videoFrames(rec.streamKey);
      }
      out.push(r);
    }
    return out;
  }

  function liveKeys() { return Object.keys(live); }
  window.pub = { start, stop, republish, stats, liveKeys };
})();
`;

// ---------------------------------------------------------------- main
let browser = null;
let page = null;
let exiting = false;

async function shutdown(code, reason) {
  if (exiting) return;
  exiting = true;
  // Never hang on shutdown.
  setTimeout(() => process.exit(code), 10_000).unref();
  try {
    if (page && !page.isClosed()) {
      const keys = await page.evaluate(() => window.pub ? window.pub.liveKeys() : []).catch(() => []);
      for (const k of keys) {
        const s = await page.evaluate(([kk, r]) => window.pub.stop(kk, r), [k, reason]).catch(() => null);
        if (s) emit({ event: 'stopped', ...s });
      }
      // give the SDK a moment to send its close/unpublish over the wire
      await new Promise((r) => setTimeout(r, 300));
    }
  } catch {}
  try { if (browser) await browser.close(); } catch {}
  emit({ event: 'exit', code, reason });
  process.exit(code);
}

for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => shutdown(hadError ? 1 : 130, sig));

async function prepareSource(id) {
  const file = corpusFileFor(id);
  if (!existsSync(file)) throw new Error(`corpus file for source ${id} not found: ${file}`);
  const info = await corpusStream(page, file, `src:${id}`, { loop, start: false });
  const video = hasVideo(id) ? await addCanvasVideo(page, `src:${id}`, { ...VIDEO, label: id }) : null;
  return { file, info, video };
}

function pageOpts(id) {
  return {
    sourceId: sid(id), token, streamName, streamKey: `src:${id}`,
    codec, dtx, autoReconnect, connectTimeoutMs, video: hasVideo(id),
  };
}

const prepared = new Set();
async function startSource(id) {
  if (!prepared.has(id)) {
    const { file, info, video } = await prepareSource(id);
    prepared.add(id);
    emit({ event: 'audio', sourceId: sid(id), file, duration: Number(info.duration.toFixed(3)), sampleRate: info.sampleRate, loop });
    if (video) emit({ event: 'video', sourceId: sid(id), width: video.width, height: video.height, fps: video.fps, trackId: video.trackId });
  }
  // Start the audio right before connecting (a no-op if already playing),
  // so the first packets carry the start of the recording.
  await page.evaluate((k) => window.harness.startStream(k), `src:${id}`);
  const info = await page.evaluate(([k, o]) => window.pub.start(k, o), [id, pageOpts(id)]);
  emit({ event: 'published', ...info });
  return info;
}

async function main() {
  const deadline = setTimeout(() => {
    emit({ event: 'deadline', seconds });
    shutdown(hadError ? 1 : 0, 'seconds');
  }, seconds * 1000);
  deadline.unref?.();

  emit({ event: 'starting', endpoint, stream: streamName, sources: sources.map(sid), video: [...videoSources].map(sid), sdk: sdkVersion(), codec, dtx, seconds });
  for (const v of videoSources) {
    if (!sources.includes(v)) process.stderr.write(`publish.mjs: note: --video ${v} is not in --sources (it gets video if started with "start ${v}")\n`);
  }
  for (const id of sources) {
    const f = corpusFileFor(id);
    if (!existsSync(f)) { fail(sid(id), `corpus file not found: ${f}`); return shutdown(1, 'error'); }
  }

  browser = await launchBrowser({ endpoint });
  browser.on('disconnected', () => { if (!exiting) { fail(undefined, 'chromium exited unexpectedly'); shutdown(1, 'error'); } });
  ({ page } = await openHarnessPage(browser, endpoint, {
    onConsole: (type, text) => {
      if (verbose || type === 'error' || type === 'pageerror') process.stderr.write(`[page ${type}] ${text}\n`);
    },
  }));
  page.on('crash', () => { fail(undefined, 'page crashed'); shutdown(1, 'error'); });
  await page.exposeFunction('__chorusEmit', (ev) => {
    if (ev && ev.event === 'error') fail(ev.sourceId, ev.message, { gen: ev.gen, fatal: ev.fatal });
    else emit(ev);
    if (ev && ev.event === 'error' && ev.fatal) shutdown(1, 'error');
  });
  await page.addScriptTag({ content: PAGE_JS });
  if (verbose) await page.evaluate(() => millicast.Logger.setLevel(millicast.Logger.DEBUG));

  const runOne = async (id) => {
    try { await startSource(id); return true; } catch (e) {
      fail(sid(id), `publish failed: ${cleanMsg(e)}`);
      return false;
    }
  };
  let ok;
  if (sequential) { ok = true; for (const id of sources) { if (!(await runOne(id))) { ok = false; break; } } }
  else ok = (await Promise.all(sources.map(runOne))).every(Boolean);
  if (!ok) return shutdown(1, 'error');
  emit({ event: 'all-published', sources: sources.map(sid) });

  if (statsEvery > 0) {
    setInterval(() => printStats(), statsEvery * 1000).unref();
  }

  const rl = readline.createInterface({ input: process.stdin, terminal: false });
  rl.on('line', (line) => { handleCommand(line.trim()).catch((e) => fail(undefined, cleanMsg(e))); });
  rl.on('close', () => { /* EOF: keep running until --seconds */ });
  // keep the event loop alive until the deadline
  setInterval(() => {}, 1 << 30);
}

function cleanMsg(e) {
  let m = String(e && e.message || e);
  // playwright wraps page exceptions as "page.evaluate: Error: ..."
  m = m.replace(/^page\.evaluate:\s*/, '').replace(/^Error: /, '').split('\n')[0];
  if (/Failed to fetch/.test(m)) m += ` (could not reach POST ${endpoint}/api/director/publish: is chorus running?)`;
  return m;
}

async function printStats() {
  if (exiting || !page) return;
  const rows = await page.evaluate(() => window.pub.stats()).catch(() => []);
  for (const r of rows) emit({ event: 'stats', ...r });
}

let queue = Promise.resolve();
function handleCommand(line) {
  // run commands one after another, in order
  queue = queue.then(() => runCommand(line));
  return queue;
}

async function runCommand(line) {
  if (!line || line.startsWith('#') || exiting) return;
  const [cmd, id] = line.split(/\s+/);
  switch (cmd) {
    case 'quit':
    case 'exit':
      return shutdown(hadError ? 1 : 0, 'quit');
    case 'stats':
      return printStats();
    case 'stop': {
      if (!id) return fail(undefined, 'usage: stop ID');
      const s = await page.evaluate(([k, r]) => window.pub.stop(k, r), [id, 'command']);
      if (s) emit({ event: 'stopped', ...s });
      else fail(sid(id), `stop: ${id} is not live`);
      return;
    }
    case 'start': {
      if (!id) return fail(undefined, 'usage: start ID');
      try { await startSource(id); } catch (e) { fail(sid(id), `publish failed: ${cleanMsg(e)}`); return shutdown(1, 'error'); }
      return;
    }
    case 'republish': {
      if (!id) return fail(undefined, 'usage: republish ID');
      try {
        const r = await page.evaluate(([k, o]) => window.pub.republish(k, o), [id, pageOpts(id)]);
        emit({ event: 'published', ...r.info, replaces: r.stopped.gen });
        emit({ event: 'stopped', ...r.stopped });
      } catch (e) {
        fail(sid(id), `republish failed: ${cleanMsg(e)}`);
        return shutdown(1, 'error');
      }
      return;
    }
    default:
      fail(undefined, `unknown command: ${line}`);
  }
}

main().catch((e) => {
  fail(undefined, cleanMsg(e));
  shutdown(1, 'error');
});
