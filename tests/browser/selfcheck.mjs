#!/usr/bin/env node
// Checks the browser tooling without needing a chorus server:
// chromium launches, the harness page loads the Millicast SDK on the
// endpoint's origin, every corpus file decodes to a ~30 s AudioBuffer, and a
// corpus MediaStream really produces audio. Prints one JSON line per check
// and a closing "N passed, N failed" line; exit 0 only if all passed.
//
//   node selfcheck.mjs [--endpoint http://127.0.0.1:8080] [--corpus DIR]

import path from 'node:path';
import { readdirSync } from 'node:fs';
import {
  launchBrowser, openHarnessPage, decodeCorpusFile, corpusStream, parseArgs,
  DEFAULT_CORPUS, DEFAULT_ENDPOINT, sdkVersion,
} from './lib.mjs';

const { flags } = parseArgs(process.argv.slice(2));
const endpoint = String(flags.endpoint ?? DEFAULT_ENDPOINT);
const corpus = path.resolve(String(flags.corpus ?? DEFAULT_CORPUS));

let passed = 0, failed = 0;
function check(name, ok, detail = {}) {
  ok ? passed++ : failed++;
  process.stdout.write(JSON.stringify({ check: name, ok: !!ok, ...detail }) + '\n');
}

const browser = await launchBrowser({ endpoint });
try {
  check('chromium-launch', true, { version: browser.version() });
  const { page } = await openHarnessPage(browser, endpoint);
  const sdk = await page.evaluate(() => ({
    publish: typeof millicast.Publish, view: typeof millicast.View,
    director: typeof millicast.Director.getPublisher, logger: typeof millicast.Logger,
    endpoint: millicast.Director.getEndpoint(), origin: location.origin,
    secure: window.isSecureContext,
    levelExt: (RTCRtpSender.getCapabilities('audio').headerExtensions || []).map((h) => h.uri)
      .includes('urn:ietf:params:rtp-hdrext:ssrc-audio-level'),
  }));
  check('sdk-loaded', sdk.publish === 'function' && sdk.director === 'function', { sdkVersion: sdkVersion(), ...sdk });

  const files = readdirSync(corpus).filter((f) => f.endsWith('.opus')).sort();
  check('corpus-present', files.length > 0, { corpus, files });
  for (const f of files) {
    const info = await decodeCorpusFile(page, path.join(corpus, f));
    check(`decode:${f}`, info.duration > 29 && info.duration < 31 && info.sampleRate === 48000, info);
  }

  // A live MediaStream from a corpus file carries non-silent audio.
  if (files.length) {
    const first = path.join(corpus, files.includes('host.opus') ? 'host.opus' : files[0]);
    await corpusStream(page, first, 'check', { loop: true, start: true });
    const level = await page.evaluate(async () => {
      const h = window.harness;
      const ctx = h.audioContext();
      const src = ctx.createMediaStreamSource(h.streams.check.stream);
      const an = ctx.createAnalyser();
      an.fftSize = 2048;
      src.connect(an);
      const buf = new Float32Array(an.fftSize);
      let peak = 0;
      for (let i = 0; i < 40; i++) {
        await new Promise((r) => setTimeout(r, 50));
        an.getFloatTimeDomainData(buf);
        for (const v of buf) peak = Math.max(peak, Math.abs(v));
      }
      return { peak, state: ctx.state, tracks: h.streams.check.stream.getAudioTracks().length };
    });
    check('corpus-mediastream', level.tracks === 1 && level.peak > 0.001 && level.state === 'running', level);
  }
} catch (e) {
  check('exception', false, { message: String(e && e.message || e) });
} finally {
  await browser.close().catch(() => {});
}
process.stdout.write(`${passed} passed, ${failed} failed\n`);
process.exit(failed ? 1 : 0);
