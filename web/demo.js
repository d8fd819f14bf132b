// chorus demo: the example of using the official Millicast JS SDK
// (@millicast/sdk, loaded as the global `millicast` from sdk/millicast.umd.js)
// against a chorus server. Nothing here is specific to chorus except the
// Director endpoint: the page is served by chorus, so it points the SDK at
// the directory it was loaded from (the origin, or the origin plus chorus's
// --base-path behind a proxy). Plain JS, no build step.
//
// Publish: getUserMedia -> millicast.Publish with a sourceId.
// View:    millicast.View with N multiplexed audio tracks. The server sends
//   active   {sourceId}          a source started publishing
//   inactive {sourceId}          it stopped
//   vad      {mediaId, sourceId} the track with mid=mediaId now carries sourceId
//                                (null: the track is empty)
//   viewercount {viewercount}
// and the SDK fires one `track` event per received track (after the first
// `active`).
'use strict';

// At the root this is the origin (the SDK appends /api/director/...); under a
// base path the SDK posts both director calls to https://host/base itself,
// which chorus answers.
millicast.Director.setEndpoint(new URL('.', location.href).href);

const $ = (id) => document.getElementById(id);
let audioCtx = null; // one AudioContext for all level meters, made on a click

function audioContext() {
  if (!audioCtx) audioCtx = new AudioContext();
  if (audioCtx.state === 'suspended') audioCtx.resume();
  return audioCtx;
}

// A level meter: an AnalyserNode on a MediaStream, drawn into a .bar element.
function levelMeter(stream, bar) {
  const analyser = audioContext().createAnalyser();
  analyser.fftSize = 1024;
  const source = audioContext().createMediaStreamSource(stream);
  source.connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  let running = true;
  (function draw() {
    if (!running) return;
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    const db = 20 * Math.log10(Math.sqrt(sum / samples.length) || 1e-9);
    // -60 dBFS .. 0 dBFS -> 0 .. 100 %
    bar.style.width = Math.max(0, Math.min(100, (db + 60) / 60 * 100)) + '%';
    requestAnimationFrame(draw);
  })();
  return () => { running = false; source.disconnect(); bar.style.width = '0'; };
}

function setStatus(el, text, isError = false) {
  el.textContent = text;
  el.classList.toggle('error', isError);
}

function errorText(e) {
  if (e && typeof e.message === 'string') return e.message; // Error, or a server error {message}
  return String(e);
}

// ------------------------------------------------------------------ publish

const pub = { publish: null, stream: null, stopMeter: null };

$('pub-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const form = ev.target.elements;
  const streamName = form.stream.value.trim();
  const token = form.token.value.trim();
  const sourceId = form.sourceId.value.trim();
  $('pub-start').disabled = true;
  try {
    setStatus($('pub-status'), 'Asking for the microphone…');
    pub.stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: false });
    pub.stopMeter = levelMeter(pub.stream, $('pub-level'));

    const tokenGenerator = () => millicast.Director.getPublisher({ token, streamName });
    pub.publish = new millicast.Publish(null, tokenGenerator);
    pub.publish.on('connectionStateChange', (state) => {
      setStatus($('pub-status'), `Publishing to "${streamName}" as ${sourceId || 'the main source'}: ${state}`,
        state === 'failed');
    });
    setStatus($('pub-status'), 'Connecting…');
    await pub.publish.connect({
      mediaStream: pub.stream,
      sourceId: sourceId || undefined, // no sourceId: the stream's main source
      disableVideo: true,
      codec: 'vp8', // a video codec this browser has; no video is sent
    });
    $('pub-stop').disabled = false;
  } catch (e) {
    stopPublishing();
    setStatus($('pub-status'), 'Could not publish: ' + errorText(e), true);
  }
});

function stopPublishing() {
  if (pub.publish) pub.publish.stop();
  if (pub.stopMeter) pub.stopMeter();
  if (pub.stream) pub.stream.getTracks().forEach((t) => t.stop());
  Object.assign(pub, { publish: null, stream: null, stopMeter: null });
  $('pub-start').disabled = false;
  $('pub-stop').disabled = true;
}

$('pub-stop').addEventListener('click', () => {
  stopPublishing();
  setStatus($('pub-status'), 'Not publishing.');
});

// --------------------------------------------------------------------- view

const view = {
  view: null,
  rows: new Map(),      // mid -> {tr, sourceCell, bar, role, audio, stopMeter}
  sources: new Map(),   // sourceId ('' = main source) -> true while active
  pinned: '',
};

$('view-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const form = ev.target.elements;
  const streamName = form.stream.value.trim();
  const subscriberToken = form.token.value.trim();
  const tracks = Math.max(0, Math.min(16, Number(form.tracks.value) || 0));
  const pinned = form.pinned.value.trim();
  const excluded = form.excluded.value.split(',').map((s) => s.trim()).filter(Boolean);
  $('view-start').disabled = true;
  audioContext(); // create it inside the click, so the browser lets it run

  const tokenGenerator = () => millicast.Director.getSubscriber({
    streamName,
    streamAccountId: 'chorus', // chorus has one account; any value works
    subscriberToken: subscriberToken || undefined,
  });
  const v = view.view = new millicast.View(null, tokenGenerator);
  view.pinned = pinned;
  v.on('broadcastEvent', onBroadcastEvent);
  v.on('track', onTrack);
  v.on('connectionStateChange', (state) => {
    setStatus($('view-status'), `Viewing "${streamName}": ${state}`, state === 'failed');
  });

  try {
    setStatus($('view-status'), 'Connecting…');
    await v.connect({
      disableVideo: true,
      multiplexedAudioTracks: tracks,
      pinnedSourceId: pinned || undefined,
      excludedSourceIds: excluded,
      events: ['active', 'inactive', 'vad', 'viewercount', 'stopped'],
    });
    ensureRows();
    $('view-stop').disabled = false;
  } catch (e) {
    stopViewing();
    setStatus($('view-status'), 'Could not view: ' + errorText(e), true);
  }
});

$('view-stop').addEventListener('click', () => {
  stopViewing();
  setStatus($('view-status'), 'Not viewing.');
});

function stopViewing() {
  if (view.view) view.view.stop();
  for (const row of view.rows.values()) {
    if (row.stopMeter) row.stopMeter();
    if (row.audio) { row.audio.srcObject = null; row.audio.remove(); }
  }
  view.view = null;
  view.rows.clear();
  view.sources.clear();
  $('tracks').tBodies[0].replaceChildren();
  $('viewercount').textContent = '—';
  renderSources();
  $('view-start').disabled = false;
  $('view-stop').disabled = true;
}

// One row per audio receiver, in m-line order: the first is the main track
// (the pinned source), the others are the multiplexed tracks.
function ensureRows() {
  const pc = view.view && view.view.getRTCPeerConnection();
  if (!pc) return;
  const mids = pc.getTransceivers()
    .filter((t) => t.receiver.track.kind === 'audio' && t.mid !== null)
    .map((t) => t.mid);
  mids.forEach((mid, i) => addRow(mid, i === 0 ? 'main' : 'multiplexed'));
}

function rowFor(mid) {
  ensureRows();
  return view.rows.get(String(mid)) || addRow(String(mid), 'multiplexed');
}

function addRow(mid, role) {
  if (view.rows.has(mid)) return view.rows.get(mid);
  const tr = document.createElement('tr');
  tr.innerHTML = '<td class="mid"></td><td class="role"></td><td class="source"></td>' +
    '<td class="level"><div class="meter"><div class="bar"></div></div></td>';
  tr.querySelector('.mid').textContent = mid;
  tr.querySelector('.role').textContent = role;
  const row = { tr, role, sourceCell: tr.querySelector('.source'), bar: tr.querySelector('.bar'), source: undefined };
  view.rows.set(mid, row);
  $('tracks').tBodies[0].append(tr);
  setRowSource(row, role === 'main' ? (view.pinned || '') : null);
  return row;
}

// source: a sourceId, '' for the main source, null for an empty track.
function setRowSource(row, source) {
  row.source = source;
  renderSources();
}

function renderRow(row) {
  // The main track carries the pinned (or main) source only while it is live.
  const live = row.source !== null && (row.role !== 'main' || view.sources.has(row.source));
  row.sourceCell.textContent = live ? (row.source || '(main source)') : '—';
  row.sourceCell.classList.toggle('empty-source', !live);
}

// Every received track plays through its own <audio> element and gets a meter.
function onTrack(event) {
  if (event.track.kind !== 'audio') return;
  const row = rowFor(event.transceiver.mid);
  const stream = new MediaStream([event.track]);
  row.audio = new Audio();
  row.audio.srcObject = stream;
  row.audio.play().catch((e) => setStatus($('view-status'), 'Press Start again to allow audio: ' + errorText(e), true));
  document.body.append(row.audio);
  if (row.stopMeter) row.stopMeter();
  row.stopMeter = levelMeter(stream, row.bar);
}

function onBroadcastEvent(event) {
  const data = event.data || {};
  switch (event.name) {
    case 'active':
      view.sources.set(data.sourceId || '', true);
      break;
    case 'inactive':
      view.sources.delete(data.sourceId || '');
      break;
    case 'vad': {
      setRowSource(rowFor(data.mediaId), data.sourceId === null || data.sourceId === undefined ? null : data.sourceId);
      return;
    }
    case 'viewercount':
      $('viewercount').textContent = data.viewercount;
      return;
    case 'stopped':
      setStatus($('view-status'), 'The stream stopped.');
      view.sources.clear();
      break;
  }
  renderSources();
}

// The stream's sources, marking the ones currently in a track.
function renderSources() {
  view.rows.forEach(renderRow);
  const list = $('sources');
  list.replaceChildren();
  for (const id of [...view.sources.keys()].sort()) {
    const mids = [...view.rows].filter(([, r]) => r.source === id).map(([mid]) => mid);
    const li = document.createElement('li');
    li.classList.toggle('heard', mids.length > 0);
    const name = document.createElement('span');
    name.textContent = id || '(main source)';
    const where = document.createElement('span');
    where.className = 'where';
    where.textContent = mids.length ? 'in track ' + mids.join(', ') : 'not in a track';
    li.append(name, where);
    list.append(li);
  }
  if (!list.children.length) list.innerHTML = '<li class="empty">—</li>';
}
