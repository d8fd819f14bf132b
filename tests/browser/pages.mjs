#!/usr/bin/env node
// Real pages a chorus server serves (the room page), each in its own context of one headless
// Chromium, driven one command at a time from stdin, as a person would: open, fill, click,
// wait for what the page shows, screenshot. Unlike room.mjs it injects nothing: what runs is the
// page's own script. The microphone is Chromium's fake capture device; with --fake-audio it
// plays that corpus file (decoded in the browser to a WAV first), looped.
//
//   node pages.mjs [--fake-audio tests/corpus/panel/ana.opus --from 5 --to 11.2] [--timeout S]
//
// stdin, one JSON command a line, {"cmd", "name" (the page), ...}; each gets exactly one reply
// line, in order:
//   {"cmd":"open","name":N,"url":U}              a new page (microphone allowed) at U, loaded
//   {"cmd":"fill","name":N,"selector":S,"text":T}  types T into the element
//   {"cmd":"click","name":N,"selector":S}        clicks the element once it is visible
//   {"cmd":"wait","name":N,"selector":S,"ms":M}  until an element is visible (default 10000 ms)
//   {"cmd":"gone","name":N,"selector":S,"ms":M}  until no visible element matches
//   {"cmd":"attr","name":N,"selector":S,"attr":A}  the attribute of the first match
//   {"cmd":"text","name":N,"selector":S}         the text of the first match
//   {"cmd":"count","name":N,"selector":S}        how many elements match, visible or not
//   {"cmd":"screenshot","name":N,"path":P}       a full-page PNG
//   {"cmd":"quit"}
// S is a Playwright selector (CSS, plus e.g. :has-text()).
// Reply: {"t", "event":"reply", "n", "cmd", "name", "ok", "ms", ...} (ok:false with "message").
// Also: {"event":"ready"} once Chromium is up, {"event":"console"} for page errors and
// warnings, {"event":"exit"}. The tool exits by itself after --timeout s (default 90).

import { writeFile, readFile, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { launchBrowser, parseCommandLine, emitLine, one } from './lib.mjs';

const USAGE = 'usage: node pages.mjs [--fake-audio FILE [--from S] [--to S]] [--timeout S]';
const { args, usage } = parseCommandLine('pages.mjs', USAGE, process.argv.slice(2), []);
const fakeAudio = one(args['fake-audio']);
const from = Number(one(args.from) ?? 0);
const to = Number(one(args.to) ?? Infinity);
const timeoutS = Number(one(args.timeout) ?? 90);
if (!(timeoutS > 0) || !(from >= 0) || !(to > from)) usage('bad --timeout, --from or --to');

setTimeout(() => {
  emitLine({ event: 'exit', code: 1, reason: 'timeout' });
  process.exit(1);
}, timeoutS * 1000).unref();

// 16-bit mono PCM WAV of samples (Float32, -1..1): what Chromium's fake capture reads.
function wav(samples, rate) {
  const b = Buffer.alloc(44 + samples.length * 2);
  b.write('RIFF', 0); b.writeUInt32LE(36 + samples.length * 2, 4); b.write('WAVE', 8);
  b.write('fmt ', 12); b.writeUInt32LE(16, 16); b.writeUInt16LE(1, 20); b.writeUInt16LE(1, 22);
  b.writeUInt32LE(rate, 24); b.writeUInt32LE(rate * 2, 28); b.writeUInt16LE(2, 32); b.writeUInt16LE(16, 34);
  b.write('data', 36); b.writeUInt32LE(samples.length * 2, 40);
  samples.forEach((s, i) => b.writeInt16LE(Math.round(Math.max(-1, Math.min(1, s)) * 32767), 44 + i * 2));
  return b;
}

// Decodes [from, to) of an Ogg Opus file in a blank page (Chromium's decoder) and appends 0.8 s
// of silence, so that a loop of it is a talker with pauses.
async function decodeToWav(browser, file, out) {
  const page = await browser.newPage();
  try {
    const b64 = (await readFile(file)).toString('base64');
    const { rate, pcm } = await page.evaluate(async ([data, f, t]) => {
      const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
      const ctx = new OfflineAudioContext(1, 48000, 48000);
      const buf = await ctx.decodeAudioData(bytes.buffer);
      const ch = buf.getChannelData(0);
      const cut = ch.subarray(Math.floor(f * buf.sampleRate), Math.min(ch.length, Math.floor(t * buf.sampleRate)));
      const all = new Float32Array(cut.length + Math.floor(0.8 * buf.sampleRate));
      all.set(cut);
      const i16 = new Int16Array(all.length);
      for (let i = 0; i < all.length; i++) i16[i] = Math.round(Math.max(-1, Math.min(1, all[i])) * 32767);
      let s = '';
      const u8 = new Uint8Array(i16.buffer);
      for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode(...u8.subarray(i, i + 0x8000));
      return { rate: buf.sampleRate, pcm: btoa(s) };
    }, [b64, from, to]);
    const raw = Buffer.from(pcm, 'base64');
    const samples = new Float32Array(raw.length / 2);
    for (let i = 0; i < samples.length; i++) samples[i] = raw.readInt16LE(i * 2) / 32767;
    await writeFile(out, wav(samples, rate));
    return { seconds: samples.length / rate, rate };
  } finally {
    await page.close();
  }
}

const dir = await mkdtemp(path.join(tmpdir(), 'chorus-pages-'));
const wavPath = path.join(dir, 'mic.wav');
const extraArgs = ['--use-fake-device-for-media-stream'];
// Chromium opens the file when a capture starts, not at launch: it is written below, before
// any page asks for the microphone.
if (fakeAudio) extraArgs.push(`--use-file-for-fake-audio-capture=${wavPath}`);
const browser = await launchBrowser({ kind: 'chromium', extraArgs });
let audio = null;
if (fakeAudio) audio = await decodeToWav(browser, path.resolve(String(fakeAudio)), wavPath);
emitLine({ event: 'ready', audio });

const pages = {};
let n = 0;
let exiting = false;

async function quit(code, reason) {
  if (exiting) return;
  exiting = true;
  await browser.close().catch(() => {});
  await rm(dir, { recursive: true, force: true }).catch(() => {});
  emitLine({ event: 'exit', code, reason });
  process.exit(code);
}
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => quit(130, sig));

function page(name) {
  const p = pages[name];
  if (!p) throw new Error(`no page ${name}`);
  return p;
}

async function run(c) {
  const ms = c.ms ?? 10_000;
  const first = () => page(c.name).locator(c.selector).first();
  switch (c.cmd) {
    case 'open': {
      if (pages[c.name]) throw new Error(`page ${c.name} is open already`);
      const context = await browser.newContext({ permissions: ['microphone'], viewport: { width: 1000, height: 720 } });
      const p = await context.newPage();
      const name = c.name;
      p.on('console', (m) => {
        if (m.type() === 'error' || m.type() === 'warning') emitLine({ event: 'console', name, type: m.type(), text: m.text() });
      });
      p.on('pageerror', (e) => emitLine({ event: 'console', name, type: 'pageerror', text: String(e && e.stack || e) }));
      await p.goto(c.url, { waitUntil: 'load', timeout: 20_000 });
      pages[name] = p;
      return {};
    }
    case 'fill':
      await first().fill(c.text, { timeout: ms });
      return {};
    case 'click':
      await first().click({ timeout: ms });
      return {};
    case 'wait':
      await first().waitFor({ state: 'visible', timeout: ms });
      return {};
    case 'gone':
      await first().waitFor({ state: 'hidden', timeout: ms });
      return {};
    case 'attr':
      return { value: await first().getAttribute(c.attr, { timeout: ms }) };
    case 'text':
      return { value: await first().textContent({ timeout: ms }) };
    case 'count':
      return { value: await page(c.name).locator(c.selector).count() };
    case 'screenshot':
      await page(c.name).screenshot({ path: c.path, fullPage: true });
      return {};
    default:
      throw new Error(`unknown command ${c.cmd}`);
  }
}

// Commands run one after another: each reply says the page got there (or why not).
const rl = readline.createInterface({ input: process.stdin, terminal: false });
let queue = Promise.resolve();
rl.on('line', (line) => {
  if (!line.trim()) return;
  queue = queue.then(async () => {
    const i = ++n, began = Date.now();
    let c;
    try { c = JSON.parse(line); } catch (e) { c = { cmd: 'bad', line }; }
    if (c.cmd === 'quit') return quit(0, 'quit');
    const base = { event: 'reply', n: i, cmd: c.cmd, name: c.name, selector: c.selector };
    try {
      emitLine({ ...base, ok: true, ...(await run(c)), ms: Date.now() - began });
    } catch (e) {
      emitLine({ ...base, ok: false, ms: Date.now() - began, message: String(e.message || e).split('\n')[0] });
    }
  });
});
rl.on('close', () => { queue.then(() => quit(0, 'stdin closed')); });
