// Shared helpers for driving the official Millicast JS SDK (@millicast/sdk)
// inside headless Debian Chromium (playwright-core) or Debian Firefox ESR
// (puppeteer-core over WebDriver BiDi) against a local chorus server.
//
// The harness page is served by request interception on the
// *server's own origin* (endpoint + '/__harness/...'), so the SDK's fetch()
// to /api/director/publish and its WebSocket to /ws are same-origin, and the
// server does not need to serve any HTML itself (nor answer CORS preflights).

import { chromium } from 'playwright-core';
import puppeteer from 'puppeteer-core';
import { readFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const DEFAULT_CORPUS = path.resolve(HERE, '..', 'corpus', 'panel');
export const DEFAULT_ENDPOINT = 'http://127.0.0.1:8080';
export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
export const FIREFOX = process.env.FIREFOX_PATH || '/usr/bin/firefox-esr';
/** The engines a page can run in; CHORUS_BROWSER picks the default one. */
export const BROWSERS = ['chromium', 'firefox'];
export const DEFAULT_BROWSER = process.env.CHORUS_BROWSER || 'chromium';

// Firefox's counterparts of the Chromium flags below: fake media, no permission prompts,
// autoplay (media elements and WebAudio) without a gesture, real host addresses in ICE
// candidates instead of mDNS names (chorus resolves no .local names), and no first-run,
// update or telemetry traffic.
export const FIREFOX_PREFS = {
  'media.navigator.streams.fake': true,
  'media.navigator.permission.disabled': true,
  'media.autoplay.default': 0,
  'media.autoplay.blocking_policy': 0,
  'media.autoplay.block-webaudio': false,
  'media.peerconnection.ice.obfuscate_host_addresses': false,
  'media.peerconnection.ice.loopback': true,
  'dom.min_background_timeout_value': 4,
  'app.update.enabled': false,
  'browser.shell.checkDefaultBrowser': false,
  'datareporting.policy.dataSubmissionEnabled': false,
  'toolkit.telemetry.enabled': false,
};

export const CHROMIUM_ARGS = [
  '--no-sandbox', // we run as root in a sandbox without user namespaces
  '--headless=new',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--autoplay-policy=no-user-gesture-required',
  '--use-fake-ui-for-media-stream',
  // Gather 127.0.0.1 host candidates too (Chrome skips loopback otherwise),
  // so ICE works in a network namespace that has nothing but lo.
  '--allow-loopback-in-peer-connection',
  // Keep timers and audio rendering going although nothing is "visible".
  '--disable-background-timer-throttling',
  '--disable-renderer-backgrounding',
  '--disable-backgrounding-occluded-windows',
];

const require = createRequire(import.meta.url);

/** Absolute path of a file inside the installed @millicast/sdk package. */
export function sdkFile(name = 'millicast.umd.js') {
  const pkgJson = require.resolve('@millicast/sdk/package.json');
  return path.join(path.dirname(pkgJson), 'dist', name);
}

/** Version string of the installed @millicast/sdk package. */
export function sdkVersion() {
  return require('@millicast/sdk/package.json').version;
}

/**
 * Launch Debian's chromium headless (or, with kind 'firefox', Debian's
 * firefox-esr: see launchFirefox). Playwright gives it a fresh temporary
 * --user-data-dir and removes it on close.
 */
export async function launchBrowser({ kind = DEFAULT_BROWSER, executablePath, extraArgs = [], endpoint } = {}) {
  if (kind === 'firefox') return launchFirefox({ executablePath });
  if (kind !== 'chromium') throw new Error(`unknown browser ${kind} (one of ${BROWSERS.join(', ')})`);
  executablePath = executablePath || CHROMIUM;
  if (!existsSync(executablePath)) {
    throw new Error(`chromium not found at ${executablePath}; run scripts/setup-test-deps.sh (or set CHROMIUM_PATH)`);
  }
  // CHORUS_CHROMIUM_ARGS: more flags from the caller, e.g. --ignore-certificate-errors for a
  // test's self-signed TLS proxy (tests/deploy.rs).
  const envArgs = (process.env.CHORUS_CHROMIUM_ARGS || '').split(/\s+/).filter(Boolean);
  const args = [...CHROMIUM_ARGS, ...extraArgs, ...envArgs];
  // Loopback http:// is already a secure context; for any other http
  // endpoint make Chromium treat it as one so WebRTC/WebAudio behave the same.
  if (endpoint && /^http:/.test(endpoint) && !/^http:\/\/(127\.|localhost|\[::1\])/.test(endpoint)) {
    args.push(`--unsafely-treat-insecure-origin-as-secure=${new URL(endpoint).origin}`);
  }
  const browser = await chromium.launch({ executablePath, args, headless: true, timeout: 30_000 });
  browser.chorusKind = 'chromium';
  return browser;
}

/**
 * Launch Debian's firefox-esr headless with puppeteer-core over WebDriver BiDi
 * (a fresh temporary profile with FIREFOX_PREFS, removed on close).
 *
 * Firefox gathers no ICE candidate on loopback (media.peerconnection.ice.loopback
 * notwithstanding) and none at all while the host has no default route: a test
 * runs it in a network namespace with a veth address and a default route, and
 * chorus's media on that address (tests/firefox.rs).
 */
export async function launchFirefox({ executablePath = FIREFOX } = {}) {
  if (!existsSync(executablePath)) {
    throw new Error(`firefox not found at ${executablePath}; run scripts/setup-test-deps.sh (or set FIREFOX_PATH)`);
  }
  const browser = await puppeteer.launch({
    browser: 'firefox', protocol: 'webDriverBiDi', executablePath, headless: true,
    extraPrefsFirefox: FIREFOX_PREFS, timeout: 30_000,
  });
  browser.chorusKind = 'firefox';
  return browser;
}

const HARNESS_HTML = `<!doctype html>
<html><head><meta charset="utf-8"><title>chorus harness</title></head>
<body>
<script src="millicast.umd.js"></script>
<script src="harness.js"></script>
</body></html>`;

// Runs inside the page. Keeps decoded corpus audio and live streams in
// window.harness so node-side code can refer to them by name.
const HARNESS_JS = `
(() => {
  const h = window.harness = {
    ctx: null,
    buffers: {},   // name -> AudioBuffer
    streams: {},   // name -> { stream, source, startedAt }
    audioContext() {
      if (!h.ctx) h.ctx = new AudioContext({ sampleRate: 48000, latencyHint: 'playback' });
      return h.ctx;
    },
    async decode(name, b64) {
      const bin = atob(b64);
      const bytes = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      const ctx = h.audioContext();
      const buf = await ctx.decodeAudioData(bytes.buffer);
      h.buffers[name] = buf;
      return { name, duration: buf.duration, sampleRate: buf.sampleRate,
               channels: buf.numberOfChannels, length: buf.length };
    },
    // AudioBufferSourceNode -> MediaStreamAudioDestinationNode -> MediaStream.
    // Chrome then encodes it with its own Opus encoder (and its own RFC 6464
    // ssrc-audio-level header extension) when it is sent over WebRTC.
    makeStream(name, bufferName, { loop = true, start = true } = {}) {
      const ctx = h.audioContext();
      const buf = h.buffers[bufferName];
      if (!buf) throw new Error('no decoded buffer ' + bufferName);
      const source = ctx.createBufferSource();
      source.buffer = buf;
      source.loop = !!loop;
      const dest = ctx.createMediaStreamDestination();
      dest.channelCount = 1;
      source.connect(dest);
      const entry = { stream: dest.stream, source, startedAt: null, ended: false };
      source.onended = () => { entry.ended = true; };
      h.streams[name] = entry;
      if (start) h.startStream(name);
      return { name, trackId: dest.stream.getAudioTracks()[0].id };
    },
    // Starts playback now (a no-op if already playing), offset seconds into the buffer.
    // startedWall is the wall clock (Date.now()) of the start, startedAt the AudioContext time.
    startStream(name, offset = 0) {
      const e = h.streams[name];
      if (!e) throw new Error('no media stream ' + name);
      if (e.startedAt === null) { e.source.start(0, offset); e.startedAt = h.ctx.currentTime; e.startedWall = Date.now(); }
      return { name, startedAt: e.startedAt, startedWall: e.startedWall, duration: e.source.buffer.duration, loop: e.source.loop };
    },
    // Starts playback when Date.now() reaches wallMs (pages of one browser
    // share the clock, so several pages can start their corpus together).
    startStreamAt(name, wallMs, offset = 0) {
      return new Promise((resolve, reject) => {
        setTimeout(() => { try { resolve(h.startStream(name, offset)); } catch (err) { reject(err); } },
                   Math.max(0, wallMs - Date.now()));
      });
    },
    // Adds a synthetic video track to h.streams[name].stream: a canvas with
    // a moving box, the label and a frame counter, redrawn by a timer (not
    // requestAnimationFrame, which headless pages may not run) and captured
    // with canvas.captureStream(fps). Every redraw changes pixels, so the
    // encoder keeps producing frames.
    addVideo(name, { width = 320, height = 240, fps = 30, label = name } = {}) {
      const e = h.streams[name];
      if (!e) throw new Error('no media stream ' + name);
      if (e.video) return { name, trackId: e.video.track.id, width, height, fps };
      const canvas = document.createElement('canvas');
      canvas.width = width; canvas.height = height;
      document.body.appendChild(canvas);
      const g = canvas.getContext('2d');
      const v = { canvas, frames: 0, timer: null, track: null };
      const box = Math.round(height / 4);
      const draw = () => {
        const n = v.frames++;
        g.fillStyle = '#203040'; g.fillRect(0, 0, width, height);
        const span = 2 * (width - box);
        const x = n * 4 % span; // bounce left-right
        g.fillStyle = 'hsl(' + (n * 3 % 360) + ',80%,55%)';
        g.fillRect(x < width - box ? x : span - x, (height - box) / 2 + Math.round(Math.sin(n / 10) * height / 4), box, box);
        g.fillStyle = '#fff'; g.font = 'bold 20px monospace';
        g.fillText(String(label), 8, 24);
        g.fillText('frame ' + n, 8, height - 10);
      };
      draw();
      const stream = canvas.captureStream(fps);
      v.track = stream.getVideoTracks()[0];
      v.timer = setInterval(draw, Math.round(1000 / fps));
      e.stream.addTrack(v.track);
      e.video = v;
      return { name, trackId: v.track.id, width, height, fps };
    },
    videoFrames(name) { const e = h.streams[name]; return e && e.video ? e.video.frames : null; },
    async resume() { const ctx = h.audioContext(); if (ctx.state !== 'running') await ctx.resume(); return ctx.state; },
  };
})();
`;

/**
 * Open a page whose origin is the chorus endpoint, with the Millicast SDK
 * loaded as global `millicast` and the helper object `window.harness`.
 * Nothing is requested from the server to load it.
 */
export async function openHarnessPage(browser, endpoint = DEFAULT_ENDPOINT, { sdk = 'millicast.umd.js', onConsole } = {}) {
  const origin = new URL(endpoint).origin;
  const sdkSource = await readFile(sdkFile(sdk), 'utf8');
  // The harness's own files, by path; null for any other request.
  const harnessFile = (url) => {
    if (!url.startsWith(`${origin}/__harness/`)) return null;
    const p = new URL(url).pathname;
    if (p.endsWith('/index.html') || p.endsWith('/__harness/')) return { status: 200, contentType: 'text/html; charset=utf-8', body: HARNESS_HTML };
    if (p.endsWith('/millicast.umd.js')) return { status: 200, contentType: 'application/javascript; charset=utf-8', body: sdkSource };
    if (p.endsWith('/harness.js')) return { status: 200, contentType: 'application/javascript; charset=utf-8', body: HARNESS_JS };
    return { status: 404, contentType: 'text/plain', body: 'not found' };
  };
  let context, page;
  if (browser.chorusKind === 'firefox') {
    // puppeteer: one interception for every request; the harness's files are answered, the
    // rest (the director's fetch) goes on to chorus.
    context = await browser.createBrowserContext();
    page = await context.newPage();
    await page.setRequestInterception(true);
    page.on('request', (req) => {
      if (req.isInterceptResolutionHandled()) return;
      const f = harnessFile(req.url());
      (f ? req.respond(f) : req.continue()).catch(() => { /* page closing */ });
    });
  } else {
    // The harness document comes from request interception, so Chromium does
    // not know it is a loopback page and its Local Network Access checks block
    // the SDK's WebSocket (net::ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS) and
    // WebRTC to 127.0.0.1. Granting 'local-network-access' (playwright maps it
    // to local-network + loopback-network) lifts that for the test page only.
    try {
      context = await browser.newContext({ permissions: ['microphone', 'local-network-access'] });
    } catch {
      context = await browser.newContext({ permissions: ['microphone'] });
    }
    page = await context.newPage();
    await page.route(`${origin}/__harness/**`, (route) => route.fulfill(harnessFile(route.request().url())));
  }
  if (onConsole) {
    page.on('console', (msg) => onConsole(msg.type(), msg.text()));
    page.on('pageerror', (err) => onConsole('pageerror', String(err && err.stack || err)));
  }
  await page.goto(`${origin}/__harness/index.html`, { waitUntil: 'load', timeout: 30_000 });
  const ok = await page.evaluate(() => typeof window.millicast === 'object' && typeof window.millicast.Publish === 'function' && typeof window.harness === 'object');
  if (!ok) throw new Error('harness page did not load the Millicast SDK (window.millicast.Publish missing)');
  await page.evaluate((ep) => window.millicast.Director.setEndpoint(ep), endpoint.replace(/\/$/, ''));
  return { context, page };
}

/**
 * Decode a corpus .opus file inside the page (Chromium's decodeAudioData
 * handles Ogg Opus). Returns {name, duration, sampleRate, channels, length}.
 */
export async function decodeCorpusFile(page, file, name = path.basename(file).replace(/\.[^.]+$/, '')) {
  const b64 = (await readFile(file)).toString('base64');
  return page.evaluate(([n, b]) => window.harness.decode(n, b), [name, b64]);
}

/**
 * Turn a corpus file into a live MediaStream in the page, stored as
 * window.harness.streams[name].stream. Options: loop (default true),
 * start (default true: start playback now).
 */
export async function corpusStream(page, file, name, { loop = true, start = true } = {}) {
  const info = await decodeCorpusFile(page, file, name);
  await page.evaluate(() => window.harness.resume());
  const s = await page.evaluate(([n, o]) => window.harness.makeStream(n, n, o), [name, { loop, start }]);
  return { ...info, ...s };
}

/**
 * Add an animated canvas video track (see harness.addVideo) to the MediaStream
 * window.harness.streams[name].stream. Options: width, height, fps, label.
 * Returns {name, trackId, width, height, fps}.
 */
export async function addCanvasVideo(page, name, opts = {}) {
  return page.evaluate(([n, o]) => window.harness.addVideo(n, o), [name, opts]);
}

/** Last value of a flag given more than once (parseArgs makes an array then). */
export const one = (v) => (Array.isArray(v) ? v[v.length - 1] : v);

/**
 * Command line of publish.mjs/room.mjs: parse argv (usage() on a parse error
 * or --help). usage(msg) prints "PROG: msg" and the usage text, exits 2.
 */
export function parseCommandLine(prog, usageText, argv, booleans) {
  const usage = (msg) => {
    if (msg) process.stderr.write(`${prog}: ${msg}\n`);
    process.stderr.write(usageText + '\n');
    process.exit(2);
  };
  let args;
  try {
    args = parseArgs(argv, { booleans: [...booleans, 'help'] }).flags;
  } catch (e) { usage(e.message); }
  if (args.help) usage();
  return { args, usage };
}

/** The options publish.mjs and room.mjs share, with their defaults. */
export function commonOptions(args) {
  return {
    endpoint: String(one(args.endpoint) ?? DEFAULT_ENDPOINT).replace(/\/$/, ''),
    streamName: one(args.stream),
    token: one(args.token) ?? process.env.CHORUS_PUBLISH_TOKEN,
    corpusDir: path.resolve(String(one(args.corpus) ?? DEFAULT_CORPUS)),
    connectTimeoutMs: 1000 * Number(one(args['connect-timeout']) ?? 20),
    loop: one(args.loop) !== false,
    dtx: !!one(args.dtx),
    verbose: !!one(args.verbose),
  };
}

/** A corpus speaker id (DIR/<id>.opus) or, if it has a '/' or '.', a file path. */
export function corpusFile(spec, corpusDir) {
  return /[/.]/.test(spec) ? path.resolve(spec) : path.join(corpusDir, `${spec}.opus`);
}

/** One JSON event line on stdout, stamped with Date.now(). */
export function emitLine(ev) {
  process.stdout.write(JSON.stringify({ t: Date.now(), ...ev }) + '\n');
}

/**
 * Page side: resolve once pc is connected, reject if it fails/closes first or
 * after ms. Injected into pages as source text (PAGE_WAIT_CONNECTED).
 */
function waitConnected(pc, ms) {
  return new Promise((resolve, reject) => {
    const done = () => { clearTimeout(timer); pc.removeEventListener('connectionstatechange', check); };
    const check = () => {
      if (pc.connectionState === 'connected') { done(); resolve(); }
      else if (pc.connectionState === 'failed' || pc.connectionState === 'closed') {
        done(); reject(new Error('peer connection ' + pc.connectionState + ' before connecting (ice=' + pc.iceConnectionState + ')'));
      }
    };
    const timer = setTimeout(() => { done(); reject(new Error('ICE/DTLS did not connect within ' + ms + ' ms (connectionState=' + pc.connectionState + ', iceConnectionState=' + pc.iceConnectionState + ')')); }, ms);
    pc.addEventListener('connectionstatechange', check);
    check();
  });
}
export const PAGE_WAIT_CONNECTED = waitConnected.toString();

/** Minimal --flag value / --flag parser: returns {flags, positional}. */
export function parseArgs(argv, { booleans = [] } = {}) {
  const flags = {};
  const positional = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) { positional.push(a); continue; }
    let key = a.slice(2);
    let val;
    const eq = key.indexOf('=');
    if (eq >= 0) { val = key.slice(eq + 1); key = key.slice(0, eq); }
    else if (key.startsWith('no-') && booleans.includes(key.slice(3))) { key = key.slice(3); val = false; }
    else if (booleans.includes(key)) val = true;
    else {
      if (i + 1 >= argv.length) throw new Error(`missing value for --${key}`);
      val = argv[++i];
    }
    if (key in flags) flags[key] = [].concat(flags[key], val); else flags[key] = val;
  }
  return { flags, positional };
}

// ------------------------------------------------------------------ rooms
// Page side of room.mjs: one millicast.Publish and/or one millicast.View per
// page, and a recorder of what the View receives. It is written as a plain
// function and injected as its source text, so it runs in the page and may
// use nothing from this module.
function roomPage() {
  const emit = (ev) => { try { window.__roomEmit(ev); } catch { /* page closing */ } };
  const now = () => Date.now();
  const withTimeout = (p, ms, what) => {
    let timer;
    return Promise.race([p, new Promise((_, rej) => {
      timer = setTimeout(() => rej(new Error(what + ' timed out after ' + ms + ' ms')), ms);
    })]).finally(() => clearTimeout(timer));
  };
  // SDK rejections are Error objects (Director: FetchError with .status) or
  // the server's error data ({message}) for signalling commands.
  const errText = (e) => {
    if (e === undefined || e === null) return String(e);
    if (typeof e === 'string') return e;
    if (e instanceof Error) return (e.name && e.name !== 'Error' ? e.name + ': ' : '') + e.message + (e.status ? ' (HTTP ' + e.status + ')' : '');
    if (typeof e === 'object' && typeof e.message === 'string') return e.message;
    try { return JSON.stringify(e); } catch { return String(e); }
  };
  // The m-sections of an SDP: kind, mid, direction, ssrcs, msid, codecs.
  const sdpMedia = (sdp) => (sdp || '').split(/\r?\n(?=m=)/).filter((x) => x.startsWith('m=')).map((sec) => {
    const first = sec.split(/\r?\n/)[0].split(' ');
    const get = (re) => { const m = re.exec(sec); return m ? m[1] : null; };
    return {
      kind: first[0].slice(2), port: Number(first[1]),
      mid: get(/a=mid:(\S+)/),
      direction: get(/a=(sendrecv|sendonly|recvonly|inactive)\b/),
      msid: get(/a=msid:([^\r\n]+)/),
      ssrcs: [...new Set([...sec.matchAll(/a=ssrc:(\d+)/g)].map((m) => Number(m[1])))],
      codecs: [...new Set([...sec.matchAll(/a=rtpmap:\d+ ([^/\s]+)\//g)].map((m) => m[1]))],
    };
  });
  // waitConnected(pc, ms): see PAGE_WAIT_CONNECTED (injected next to this function).
  const STAT_FIELDS = ['ssrc', 'packetsReceived', 'packetsLost', 'packetsDiscarded', 'bytesReceived', 'jitter',
    'concealedSamples', 'silentConcealedSamples', 'totalSamplesReceived', 'concealmentEvents',
    'insertedSamplesForDeceleration', 'removedSamplesForAcceleration', 'jitterBufferDelay',
    'jitterBufferTargetDelay', 'jitterBufferEmittedCount', 'audioLevel', 'totalAudioEnergy',
    'totalSamplesDuration', 'lastPacketReceivedTimestamp', 'nackCount', 'fecPacketsReceived'];

  const R = window.room = { pub: null, view: null, publishRec: null, viewRec: null, roomRec: null, closing: false, timers: [], e2ee: {} };

  // End-to-end encryption with the browser's encoded transform (RTCRtpScriptTransform): a
  // worker seals every encoded frame with AES-GCM under a key the server never sees (12-byte
  // IV || ciphertext || 16-byte tag: 28 bytes of overhead) and opens it on the receiving side;
  // a frame that does not open is dropped and counted, one shorter than the overhead passes
  // in clear (chorus's silence frames). Counters by side and mid in R.e2ee.
  const E2EE_WORKER = `
    self.onrtctransform = async (ev) => {
      const t = ev.transformer;
      const { side, key, mid } = t.options;
      const c = { side, mid, frames: 0, failed: 0 };
      self.postMessage(c);
      const raw = new Uint8Array(key.match(/../g).map((h) => parseInt(h, 16)));
      let k;
      try {
        k = await crypto.subtle.importKey('raw', raw, 'AES-GCM', false, ['encrypt', 'decrypt']);
      } catch (e) {
        c.error = String(e) + ' (secure context: ' + self.isSecureContext + ')';
        self.postMessage(c);
        return;
      }
      await t.readable.pipeThrough(new TransformStream({
        async transform(frame, ctl) {
          const data = new Uint8Array(frame.data);
          try {
            if (side === 'send') {
              const iv = crypto.getRandomValues(new Uint8Array(12));
              const ct = new Uint8Array(await crypto.subtle.encrypt({ name: 'AES-GCM', iv }, k, data));
              const out = new Uint8Array(12 + ct.length);
              out.set(iv);
              out.set(ct, 12);
              frame.data = out.buffer;
            } else if (data.length < 28) {
              // Shorter than the overhead: not ours. chorus ends an emptied track with 3-byte
              // Opus silence frames in clear; they go to the decoder as they are.
              c.clear = (c.clear || 0) + 1;
              ctl.enqueue(frame);
              return;
            } else {
              frame.data = await crypto.subtle.decrypt({ name: 'AES-GCM', iv: data.subarray(0, 12) }, k, data.subarray(12));
            }
            c.frames++;
            ctl.enqueue(frame);
          } catch { c.failed++; }
          if ((c.frames + c.failed) % 25 === 0) self.postMessage(c);
        },
      })).pipeTo(t.writable);
    };`;
  let e2eeWorker = null;
  const e2eeTransform = (side, key, mid) => {
    if (!e2eeWorker) {
      e2eeWorker = new Worker(URL.createObjectURL(new Blob([E2EE_WORKER], { type: 'text/javascript' })));
      e2eeWorker.onmessage = (m) => { R.e2ee[m.data.side + ':' + m.data.mid] = m.data; };
      e2eeWorker.onerror = (e) => emit({ event: 'error', role: 'e2ee', message: 'e2ee worker: ' + (e.message || e), fatal: true });
    }
    return new RTCRtpScriptTransform(e2eeWorker, { side, key, mid: String(mid) });
  };
  // Chromium runs a transform only if it is set when its sender or receiver is made (set later,
  // it never sees a frame): with a key, every audio transceiver and track this page adds gets
  // one at once, encrypting what it sends and decrypting what it receives.
  let e2eeInstalled = false;
  const installE2ee = (key) => {
    if (e2eeInstalled) return;
    e2eeInstalled = true;
    let n = 0;
    const proto = RTCPeerConnection.prototype;
    const addTransceiver = proto.addTransceiver, addTrack = proto.addTrack;
    proto.addTransceiver = function (trackOrKind, init) {
      const tr = addTransceiver.call(this, trackOrKind, init);
      const kind = typeof trackOrKind === 'string' ? trackOrKind : trackOrKind.kind;
      const dir = (init && init.direction) || 'sendrecv';
      if (kind === 'audio' && dir === 'recvonly') tr.receiver.transform = e2eeTransform('recv', key, 'rx' + n++);
      else if (kind === 'audio' && typeof trackOrKind !== 'string') tr.sender.transform = e2eeTransform('send', key, 'tx' + n++);
      return tr;
    };
    proto.addTrack = function (track, ...streams) {
      const sender = addTrack.call(this, track, ...streams);
      if (track.kind === 'audio') sender.transform = e2eeTransform('send', key, 'tx' + n++);
      return sender;
    };
  };
  // Offers without the RFC 6464 audio level extension (createOffer patched while a Publish
  // connects): the server can then only use payload sizes for voice activity.
  const withoutAudioLevel = async (run) => {
    const orig = RTCPeerConnection.prototype.createOffer;
    RTCPeerConnection.prototype.createOffer = async function (...a) {
      const d = await orig.apply(this, a);
      return { type: d.type, sdp: d.sdp.replace(/^a=extmap:\d+ urn:ietf:params:rtp-hdrext:ssrc-audio-level\r?\n/mg, '') };
    };
    try { return await run(); } finally { RTCPeerConnection.prototype.createOffer = orig; }
  };

  // Offers that leave RFC 2198 RED out of every audio m-line (each audio transceiver's codec
  // preferences set without it while a View connects): a listener that cannot take RED, as
  // Firefox is, in a Chromium page.
  const withoutRed = async (run) => {
    const codecs = RTCRtpReceiver.getCapabilities('audio').codecs
      .filter((c) => c.mimeType.toLowerCase() !== 'audio/red');
    const orig = RTCPeerConnection.prototype.createOffer;
    RTCPeerConnection.prototype.createOffer = async function (...a) {
      for (const tr of this.getTransceivers()) {
        if (tr.receiver.track.kind === 'audio') tr.setCodecPreferences(codecs);
      }
      return orig.apply(this, a);
    };
    try { return await run(); } finally { RTCPeerConnection.prototype.createOffer = orig; }
  };

  // The ICE candidate pair a connection uses (getStats: the transport's selected pair), e.g.
  // local {type: 'relay', relayProtocol: 'tcp'}: tells a relayed session from a direct one.
  // Polled up to 2 s, as the pair may be reported a moment after 'connected'.
  const selectedPair = async (pc) => {
    for (let i = 0; i < 20; i++) {
      const report = await pc.getStats();
      let out = null;
      report.forEach((s) => {
        if (s.type !== 'transport' || !s.selectedCandidatePairId) return;
        const pair = report.get(s.selectedCandidatePairId);
        const l = pair && report.get(pair.localCandidateId), r = pair && report.get(pair.remoteCandidateId);
        if (l && r) {
          out = {
            local: { type: l.candidateType, protocol: l.protocol, relayProtocol: l.relayProtocol, address: l.address, port: l.port },
            remote: { type: r.candidateType, protocol: r.protocol, address: r.address, port: r.port },
          };
        }
      });
      if (out) return out;
      await new Promise((r) => setTimeout(r, 100));
    }
    return null;
  };
  // The ICE servers the SDK gave the RTCPeerConnection (from the director's answer), without
  // their credentials.
  const iceServersOf = (pc) => (pc.getConfiguration().iceServers || []).map((s) => ({ urls: s.urls, username: s.username }));

  function recordError(rec, role, message, fatal = false) {
    rec.errors.push([now(), message]);
    emit({ event: 'error', role, message, fatal });
  }

  // o: {streamName, token, sourceId (null = main source), streamKey, connectTimeoutMs, dtx, statsMs,
  //     e2ee (hex AES key: encrypt the payloads end to end), noLevel (offer no audio level),
  //     record (the SDK's publish record option),
  //     credentials (a director answer the first tokenGenerator call returns; later calls ask
  //     the director with token), roomCredentials (true: the room's member.promoted data)}
  R.publish = async (o) => {
    const rec = R.publishRec = { sourceId: o.sourceId, startAt: now(), pcStates: [], events: [], errors: [] };
    let credentials = o.credentials || (o.roomCredentials && R.roomRec && R.roomRec.credentials) || null;
    const tokenGenerator = () => {
      const c = credentials;
      credentials = null;
      return c ? Promise.resolve(c) : millicast.Director.getPublisher({ token: o.token, streamName: o.streamName });
    };
    if (o.e2ee) installE2ee(o.e2ee);
    // o.autoReconnect: the SDK's own reconnect (its reconnect events are recorded; the ends
    // it recovers from are not errors).
    const p = R.pub = new millicast.Publish(null, tokenGenerator, !!o.autoReconnect);
    rec.reconnects = [];
    p.on('reconnect', (r) => { rec.reconnects.push([now(), errText(r && r.error)]); emit({ event: 'reconnect', role: 'publish' }); });
    const stopping = () => R.closing || rec.stoppedAt;
    p.on('connectionStateChange', (s) => {
      rec.pcStates.push([now(), s]);
      emit({ event: 'pc-state', role: 'publish', state: s });
      if (rec.publishedAt && !stopping() && !o.autoReconnect && (s === 'failed' || s === 'closed')) recordError(rec, 'publish', 'publish peer connection ' + s);
    });
    p.on('broadcastEvent', (ev) => rec.events.push({ t: now(), name: ev && ev.name, data: ev && ev.data }));
    const entry = window.harness.streams[o.streamKey];
    if (!entry) throw new Error('no media stream ' + o.streamKey);
    const opts = { mediaStream: entry.stream, disableVideo: true, codec: 'vp8', dtx: !!o.dtx };
    if (o.sourceId !== null && o.sourceId !== undefined) opts.sourceId = o.sourceId;
    if (o.peerConfig) opts.peerConfig = o.peerConfig;
    if (o.priority !== null && o.priority !== undefined) opts.priority = o.priority;
    if (o.record !== null && o.record !== undefined) opts.record = o.record;
    if (o.events) opts.events = o.events;
    try {
      const connect = () => withTimeout(p.connect(opts), o.connectTimeoutMs, 'Publish.connect()');
      await (o.noLevel ? withoutAudioLevel(connect) : connect());
      rec.signalledAt = now();
      rec.offerSdp = p.getRTCPeerConnection().localDescription.sdp;
      await waitConnected(p.getRTCPeerConnection(), o.connectTimeoutMs);
    } catch (e) {
      try { p.stop(); } catch {}
      throw new Error(errText(e));
    }
    rec.publishedAt = now();
    rec.publisherId = p.signaling ? p.signaling.serverId : undefined;
    rec.pair = await selectedPair(p.getRTCPeerConnection());
    rec.iceServers = iceServersOf(p.getRTCPeerConnection());
    // outbound-rtp, media-source and remote-inbound-rtp (the server's RTCP
    // receiver reports) of the audio, every statsMs: tells a publisher that
    // stopped sending from a server that stopped forwarding.
    rec.stats = [];
    if (o.statsMs > 0) {
      const pc = p.getRTCPeerConnection();
      let busy = false;
      R.timers.push(setInterval(async () => {
        if (busy || R.closing || pc.connectionState === 'closed') return;
        busy = true;
        try {
          const row = { t: now() };
          const report = await pc.getStats();
          report.forEach((s) => {
            // The ICE path in use: a change of path shows as a new "pair".
            if (s.type === 'transport') {
              row.pairChanges = s.selectedCandidatePairChanges;
              const pair = report.get(s.selectedCandidatePairId);
              const l = pair && report.get(pair.localCandidateId), r = pair && report.get(pair.remoteCandidateId);
              if (l && r) row.pair = l.address + ':' + l.port + '/' + l.protocol + ' -> ' + r.address + ':' + r.port;
            }
          });
          report.forEach((s) => {
            if (s.kind !== 'audio') return;
            if (s.type === 'outbound-rtp') Object.assign(row, { ssrc: s.ssrc, packetsSent: s.packetsSent, bytesSent: s.bytesSent, nackCount: s.nackCount, retransmittedPacketsSent: s.retransmittedPacketsSent, targetBitrate: s.targetBitrate });
            if (s.type === 'media-source') Object.assign(row, { audioLevel: s.audioLevel, totalAudioEnergy: s.totalAudioEnergy, totalSamplesDuration: s.totalSamplesDuration });
            if (s.type === 'remote-inbound-rtp') Object.assign(row, { remotePacketsLost: s.packetsLost, remoteJitter: s.jitter, roundTripTime: s.roundTripTime, fractionLost: s.fractionLost });
          });
          rec.stats.push(row);
        } catch (e) { /* closing */ } finally { busy = false; }
      }, o.statsMs));
    }
    if (p.signaling) p.signaling.on('wsConnectionClose', () => {
      rec.wsClosedAt = now();
      if (!stopping() && !o.autoReconnect) recordError(rec, 'publish', 'publish signalling WebSocket closed by the server');
    });
    return { sourceId: o.sourceId, publishedAt: rec.publishedAt, publisherId: rec.publisherId,
             signallingMs: rec.signalledAt - rec.startAt, connectMs: rec.publishedAt - rec.startAt };
  };

  // o: {streamName, accountId, subscribeToken, connectOptions (ViewConnectOptions),
  //     muted, sampleMs, statsMs, connectTimeoutMs, e2ee (hex AES key: decrypt every track),
  //     noRed (offer no RFC 2198 RED: the server sends plain Opus)}
  R.view = async (o) => {
    const rec = R.viewRec = {
      options: o.connectOptions, muted: o.muted !== false, sampleMs: o.sampleMs, statsMs: o.statsMs,
      startAt: now(), events: [], tracks: {}, stats: {}, pcStates: [], errors: [], commands: [],
    };
    const ctx = window.harness.audioContext();
    if (ctx.state !== 'running') await ctx.resume();
    const sub = { streamName: o.streamName, streamAccountId: o.accountId || 'chorus' };
    if (o.subscribeToken) sub.subscriberToken = o.subscribeToken;
    const tokenGenerator = () => millicast.Director.getSubscriber(sub);
    if (o.e2ee) installE2ee(o.e2ee);
    const v = R.view = new millicast.View(null, tokenGenerator, null, !!o.autoReconnect);
    rec.reconnects = [];
    v.on('reconnect', (r) => { rec.reconnects.push([now(), errText(r && r.error)]); emit({ event: 'reconnect', role: 'view' }); });
    const analysers = {};
    v.on('broadcastEvent', (ev) => {
      const e = { t: now(), name: ev && ev.name, data: ev && ev.data };
      rec.events.push(e);
      emit({ event: 'broadcast', type: e.name, data: e.data });
    });
    v.on('connectionStateChange', (s) => {
      rec.pcStates.push([now(), s]);
      emit({ event: 'pc-state', role: 'view', state: s });
      if (rec.connectedAt && !R.closing && !o.autoReconnect && (s === 'failed' || s === 'closed')) recordError(rec, 'view', 'view peer connection ' + s);
    });
    v.on('error', (e) => recordError(rec, 'view', 'View error event: ' + errText(e)));
    // Chrome only feeds a remote track to WebAudio while a media element
    // plays it; a muted <audio> is enough (and keeps NetEq being pulled, so
    // totalSamplesReceived and concealment stats count). inbound-rtp
    // audioLevel then reads 0: the analyser is the level to use.
    v.on('track', (ev) => {
      const track = ev.track;
      const mid = ev.transceiver ? ev.transceiver.mid : null;
      const key = String(mid);
      const t = rec.tracks[key] = rec.tracks[key] || { mid, energy: [], trackEvents: [] };
      Object.assign(t, { kind: track.kind, trackId: track.id, trackAt: now(), streams: (ev.streams || []).map((s) => s.id) });
      emit({ event: 'track', mid, kind: track.kind, trackId: track.id });
      if (track.kind !== 'audio') return;
      for (const k of ['mute', 'unmute', 'ended']) track.addEventListener(k, () => t.trackEvents.push([now(), k]));
      const ms = new MediaStream([track]);
      const el = document.createElement('audio');
      el.muted = rec.muted; el.autoplay = true; el.srcObject = ms; el.dataset.mid = key;
      document.body.appendChild(el);
      el.play().catch((e) => recordError(rec, 'view', 'audio element for mid ' + key + ' did not play: ' + errText(e)));
      const an = ctx.createAnalyser();
      an.fftSize = 2048; // 42.7 ms at 48 kHz
      ctx.createMediaStreamSource(ms).connect(an);
      analysers[key] = { an, buf: new Float32Array(an.fftSize), t };
    });
    try {
      const connect = () => withTimeout(v.connect(o.connectOptions), o.connectTimeoutMs, 'View.connect()');
      await (o.noRed ? withoutRed(connect) : connect());
    } catch (e) {
      try { v.stop(); } catch {}
      throw new Error(errText(e));
    }
    rec.signalledAt = now();
    const pc = v.getRTCPeerConnection();
    rec.offer = sdpMedia(pc.localDescription && pc.localDescription.sdp);
    rec.answer = sdpMedia(pc.remoteDescription && pc.remoteDescription.sdp);
    rec.answerSdp = pc.remoteDescription ? pc.remoteDescription.sdp : null;
    rec.subscriberId = v.signaling ? v.signaling.serverId : undefined;
    rec.streamViewId = v.signaling ? v.signaling.streamViewId : undefined;
    if (v.signaling) v.signaling.on('wsConnectionClose', () => {
      rec.wsClosedAt = now();
      if (!R.closing && !o.autoReconnect) recordError(rec, 'view', 'view signalling WebSocket closed by the server');
    });
    try {
      await waitConnected(pc, o.connectTimeoutMs);
    } catch (e) {
      try { v.stop(); } catch {}
      throw new Error(errText(e));
    }
    rec.connectedAt = now();
    rec.pair = await selectedPair(pc);
    rec.iceServers = iceServersOf(pc);

    // RMS of the last 2048 samples of every received audio track.
    R.timers.push(setInterval(() => {
      const t = now();
      for (const a of Object.values(analysers)) {
        a.an.getFloatTimeDomainData(a.buf);
        let s = 0;
        for (let i = 0; i < a.buf.length; i++) s += a.buf[i] * a.buf[i];
        a.t.energy.push([t, Math.round(Math.sqrt(s / a.buf.length) * 1e5) / 1e5]);
      }
    }, o.sampleMs));
    // inbound-rtp per mid, with what the track's remote-outbound-rtp says of the server's
    // sender reports (reportsSent, and packetsSent as remotePacketsSent).
    let busy = false;
    R.timers.push(setInterval(async () => {
      if (busy || R.closing || pc.connectionState === 'closed') return;
      busy = true;
      try {
        const t = now();
        for (const tr of pc.getTransceivers()) {
          if (!tr.mid || tr.receiver.track.kind !== 'audio') continue;
          const report = await tr.receiver.getStats();
          const row = { t };
          let inbound = false;
          report.forEach((s) => {
            if (s.type === 'inbound-rtp') {
              inbound = true;
              for (const f of STAT_FIELDS) if (s[f] !== undefined) row[f] = s[f];
            } else if (s.type === 'remote-outbound-rtp') {
              row.reportsSent = s.reportsSent;
              row.remotePacketsSent = s.packetsSent;
            }
          });
          if (inbound) (rec.stats[tr.mid] = rec.stats[tr.mid] || []).push(row);
        }
      } catch (e) { /* closing */ } finally { busy = false; }
    }, o.statsMs));

    return {
      subscriberId: rec.subscriberId, signallingMs: rec.signalledAt - rec.startAt, connectMs: rec.connectedAt - rec.startAt,
      mids: rec.answer.map((m) => ({ mid: m.mid, kind: m.kind, direction: m.direction, ssrcs: m.ssrcs })),
    };
  };

  async function command(name, fn) {
    const rec = R.viewRec;
    if (!R.view || !rec) throw new Error('this participant does not view');
    const c = { t: now(), name };
    rec.commands.push(c);
    try { await fn(); c.ok = true; } catch (e) { c.ok = false; c.message = errText(e); }
    c.doneAt = now();
    return c;
  }
  // sourceId null = the main source
  // mid 'main': a mapping without mediaId (the main track); '+': a track added first with
  // View.addRemoteTrack (the SDK renegotiates locally), then projected into.
  // SDK 0.6.1's addRemoteTrack cannot renegotiate a view without video: its
  // onnegotiationneeded handler (updateMissingVideoExtensions) throws a TypeError when the
  // remote description has no video m-line, and the promise never settles. So '+' does by
  // hand what that handler means to do (SdpParser.renegotiate): a recvonly transceiver, a local
  // offer, and the previous answer with a copy of its first audio m-line for the new mid
  // (codecs and extensions, no SSRC), nothing sent to the server.
  R.addTrackByHand = async () => {
    const pc = R.view.getRTCPeerConnection();
    const sdkHandler = pc.onnegotiationneeded;
    pc.onnegotiationneeded = null;
    try {
      const tr = pc.addTransceiver('audio', { direction: 'recvonly' });
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      const mid = tr.mid;
      const parts = pc.remoteDescription.sdp.split(/\r\n(?=m=)/);
      const audio = parts.slice(1).find((m) => m.startsWith('m=audio'));
      const copy = audio.split('\r\n')
        .filter((l) => !/^a=(ssrc|ssrc-group|msid):/.test(l))
        .map((l) => (l.startsWith('a=mid:') ? 'a=mid:' + mid : /^a=(sendonly|recvonly|sendrecv|inactive)$/.test(l) ? 'a=sendonly' : l))
        .join('\r\n');
      let sdp = parts.join('\r\n').replace(/\r\n$/, '') + '\r\n' + copy.replace(/\r\n$/, '') + '\r\n';
      sdp = sdp.replace(/a=group:BUNDLE ([^\r\n]*)/, (all, mids) => 'a=group:BUNDLE ' + mids + ' ' + mid);
      await pc.setRemoteDescription({ type: 'answer', sdp });
      return mid;
    } finally {
      pc.onnegotiationneeded = sdkHandler;
    }
  };
  R.project = (sourceId, mid) => command('project', async () => {
    if (mid === '+') mid = await R.addTrackByHand();
    const mapping = mid === 'main' ? [{ media: 'audio' }] : [{ media: 'audio', mediaId: String(mid) }];
    return R.view.project(sourceId, mapping);
  }).then((c) => Object.assign(c, { sourceId, mid }));
  R.select = (layer) => command('select', () => R.view.select(layer)).then((c) => Object.assign(c, { layer }));
  R.unproject = (mids) => command('unproject', () => R.view.unproject(mids.map(String)))
    .then((c) => Object.assign(c, { mids }));

  // Stops the Publish on purpose (no error is recorded for its end).
  R.unpublish = (why) => {
    const rec = R.publishRec;
    if (!R.pub || !rec || rec.stoppedAt) return false;
    rec.stoppedAt = now();
    rec.stoppedBy = why;
    try { R.pub.stop(); } catch {}
    emit({ event: 'unpublished', why });
    return true;
  };

  // The room socket (/api/rooms/ROOM/ws?token=...): every event is recorded and emitted; a
  // member.promoted event's data (a director answer) is kept for R.publish's credentials; when
  // this participant is sent back to the audience, its Publish stops, as an app's would.
  R.roomConnect = (url) => new Promise((resolve, reject) => {
    const rec = R.roomRec = { url: url.replace(/token=[^&]*/, 'token=...'), events: [], commands: [], errors: [], me: null, credentials: null };
    const ws = R.roomWs = new WebSocket(url);
    let transId = 0;
    R.roomPending = {};
    ws.onmessage = (m) => {
      let msg;
      try { msg = JSON.parse(m.data); } catch { recordError(rec, 'room', 'room socket sent non-JSON'); return; }
      if (msg.type === 'event') {
        rec.events.push({ t: now(), name: msg.name, data: msg.data });
        emit({ event: 'room', type: msg.name, data: msg.data });
        if (msg.name === 'room.state') { rec.me = msg.data.you && msg.data.you.memberId; resolve(msg.data); }
        if (msg.name === 'member.promoted') rec.credentials = msg.data;
        if (msg.name === 'member.updated' && msg.data.memberId === rec.me && msg.data.role === 'audience') R.unpublish('demoted');
      } else if (R.roomPending[msg.transId]) {
        R.roomPending[msg.transId](msg);
        delete R.roomPending[msg.transId];
      }
    };
    ws.onclose = (e) => {
      rec.closedAt = now();
      rec.close = { code: e.code, reason: e.reason };
      if (!R.closing) emit({ event: 'room-closed', code: e.code, reason: e.reason });
      reject(new Error('room socket closed (' + e.code + ' ' + e.reason + ')'));
    };
    R.roomCmd = (name, data) => new Promise((res) => {
      const id = ++transId;
      const c = { t: now(), name, data };
      rec.commands.push(c);
      R.roomPending[id] = (msg) => {
        Object.assign(c, { doneAt: now(), ok: msg.type === 'response', data: msg.data });
        res(c);
      };
      ws.send(JSON.stringify({ type: 'cmd', transId: id, name, data: data || {} }));
    });
  });

  R.report = () => ({ publish: R.publishRec, view: R.viewRec, room: R.roomRec, e2ee: R.e2ee });
  R.stopAll = () => {
    R.closing = true;
    for (const t of R.timers) clearInterval(t);
    try { if (R.view) R.view.stop(); } catch {}
    try { if (R.pub) R.pub.stop(); } catch {}
    try { if (R.roomWs) R.roomWs.close(); } catch {}
  };
}

/**
 * Add the room helpers (window.room, see roomPage above) to a harness page.
 * onEvent(ev) receives the page's small events (broadcast, track, pc-state,
 * error).
 */
export async function installRoom(page, onEvent) {
  await page.exposeFunction('__roomEmit', (ev) => onEvent(ev));
  await page.addScriptTag({ content: `(() => {\n${PAGE_WAIT_CONNECTED}\n(${roomPage.toString()})();\n})();` });
}

/** Publish h.streams[o.streamKey] with millicast.Publish; see roomPage. */
export async function roomPublish(page, o) {
  return page.evaluate((oo) => window.room.publish(oo), o);
}

/** View with millicast.View and start recording; see roomPage. */
export async function roomView(page, o) {
  return page.evaluate((oo) => window.room.view(oo), o);
}

/** Open the room socket at url (resolves with room.state's data); see roomPage. */
export async function roomConnect(page, url) {
  return page.evaluate((u) => window.room.roomConnect(u), url);
}

/** One room command: {t, name, data, ok, doneAt}; see roomPage. */
export async function roomCommand(page, name, data) {
  return page.evaluate(([n, d]) => window.room.roomCmd(n, d), [name, data]);
}

/** Everything the page recorded: {publish, view, room}. */
export async function roomReport(page) {
  return page.evaluate(() => window.room.report());
}

/**
 * Start the corpus MediaStream `name` (made with corpusStream(..., {start:
 * false})) at wall clock wallMs. Returns {startedWall, startedAt, duration, loop}.
 */
export async function startCorpusAt(page, name, wallMs, offset = 0) {
  return page.evaluate(([n, w, o]) => window.harness.startStreamAt(n, w, o), [name, wallMs, offset]);
}
