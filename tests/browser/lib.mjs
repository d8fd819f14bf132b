// Shared helpers for driving the official Millicast JS SDK (@millicast/sdk)
// inside headless Debian Chromium against a local chorus server.
//
// The harness page is served by Playwright request interception on the
// *server's own origin* (endpoint + '/__harness/...'), so the SDK's fetch()
// to /api/director/publish and its WebSocket to /ws are same-origin, and the
// server does not need to serve any HTML itself (nor answer CORS preflights).

import { chromium } from 'playwright-core';
import { readFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const DEFAULT_CORPUS = path.resolve(HERE, '..', 'corpus', 'panel');
export const DEFAULT_ENDPOINT = 'http://127.0.0.1:8080';
export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

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
 * Launch Debian's chromium headless. Playwright gives it a fresh temporary
 * --user-data-dir and removes it on close.
 */
export async function launchBrowser({ executablePath = CHROMIUM, extraArgs = [], endpoint } = {}) {
  if (!existsSync(executablePath)) {
    throw new Error(`chromium not found at ${executablePath}; run scripts/setup-test-deps.sh (or set CHROMIUM_PATH)`);
  }
  const args = [...CHROMIUM_ARGS, ...extraArgs];
  // Loopback http:// is already a secure context; for any other http
  // endpoint make Chromium treat it as one so WebRTC/WebAudio behave the same.
  if (endpoint && /^http:/.test(endpoint) && !/^http:\/\/(127\.|localhost|\[::1\])/.test(endpoint)) {
    args.push(`--unsafely-treat-insecure-origin-as-secure=${new URL(endpoint).origin}`);
  }
  return chromium.launch({ executablePath, args, headless: true, timeout: 30_000 });
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
    // Starts playback now (a no-op if already playing). startedWall is the
    // wall clock (Date.now()) of the start, startedAt the AudioContext time.
    startStream(name) {
      const e = h.streams[name];
      if (!e) throw new Error('no media stream ' + name);
      if (e.startedAt === null) { e.source.start(); e.startedAt = h.ctx.currentTime; e.startedWall = Date.now(); }
      return { name, startedAt: e.startedAt, startedWall: e.startedWall, duration: e.source.buffer.duration, loop: e.source.loop };
    },
    // Starts playback when Date.now() reaches wallMs (pages of one browser
    // share the clock, so several pages can start their corpus together).
    startStreamAt(name, wallMs) {
      return new Promise((resolve, reject) => {
        setTimeout(() => { try { resolve(h.startStream(name)); } catch (err) { reject(err); } },
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
  // The harness document comes from request interception, so Chromium does
  // not know it is a loopback page and its Local Network Access checks block
  // the SDK's WebSocket (net::ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS) and
  // WebRTC to 127.0.0.1. Granting 'local-network-access' (playwright maps it
  // to local-network + loopback-network) lifts that for the test page only.
  let context;
  try {
    context = await browser.newContext({ permissions: ['microphone', 'local-network-access'] });
  } catch {
    context = await browser.newContext({ permissions: ['microphone'] });
  }
  const page = await context.newPage();
  const sdkSource = await readFile(sdkFile(sdk), 'utf8');
  await page.route(`${origin}/__harness/**`, async (route) => {
    const p = new URL(route.request().url()).pathname;
    if (p.endsWith('/index.html') || p.endsWith('/__harness/')) {
      return route.fulfill({ status: 200, contentType: 'text/html; charset=utf-8', body: HARNESS_HTML });
    }
    if (p.endsWith('/millicast.umd.js')) {
      return route.fulfill({ status: 200, contentType: 'application/javascript; charset=utf-8', body: sdkSource });
    }
    if (p.endsWith('/harness.js')) {
      return route.fulfill({ status: 200, contentType: 'application/javascript; charset=utf-8', body: HARNESS_JS });
    }
    return route.fulfill({ status: 404, contentType: 'text/plain', body: 'not found' });
  });
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
