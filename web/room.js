// chorus room page: a Clubhouse-style room on the official Millicast JS SDK
// (@millicast/sdk, the global `millicast`) and chorus's room socket. It is the
// example an app starts from: copy it, give it your backend's room tokens and
// your own look. Plain JS, no build step.
//
// A room is a stream named like the room. Everyone listens to it with a View
// (the few members talking right now, in a fixed set of tracks); a member on
// stage also publishes its microphone with its member id as sourceId. The room
// socket (/api/rooms/{room}/ws) tells who is on stage, who talks, the raised
// hands and the audience count, and takes the commands; chorus enforces them,
// so the page only shows state and sends what the buttons say.
'use strict';

// The page is /rooms/{room}; '..' is the server (its --base-path included).
const base = new URL('..', location.href);
const roomName = decodeURIComponent(location.pathname.replace(/\/+$/, '').split('/').pop());
millicast.Director.setEndpoint(base.href);

// What "host" means is the app's choice: here a member who may do everything.
const HOST_PERMISSIONS = [
  'room.member.promote', 'room.member.demote', 'room.member.remove',
  'room.member.audio_mute', 'room.member.audio_unmute',
  'room.self.audio_mute', 'room.self.audio_unmute',
];
// Tracks of the View: how many members can be heard at once.
const TRACKS = 3;

const $ = (id) => document.getElementById(id);

const S = {
  token: null,
  me: null,             // my member id (also my sourceId when I publish)
  you: null,            // my own member view {role, permissions, muted, ...}
  members: new Map(),   // memberId -> member view, for everyone on stage
  hands: new Map(),     // memberId -> userName, raised hands
  audienceCount: 0,
  socket: null,
  pending: new Map(),   // transId -> {resolve, reject}
  transId: 0,
  view: null,
  publisher: null,
  publishing: null,     // the promise of a Publish being set up
  promoted: null,       // member.promoted's director answer, used once
  mic: null,
  ended: false,
};

function setStatus(text, isError = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', isError);
}

function errorText(e) {
  if (e && typeof e.message === 'string') return e.message;
  return String(e);
}

const may = (permission) => !!(S.you && S.you.permissions.includes(permission));

// ------------------------------------------------------------------ joining

// Dev mode only: chorus mints the token itself for a page on the same machine.
// An app's backend does the same with POST /api/rooms/{room}/tokens and its API key.
async function devToken(as, userName) {
  const body = as === 'host'
    ? { user_name: userName, join_as: 'member', permissions: HOST_PERMISSIONS }
    : { user_name: userName, join_as: 'audience' };
  const r = await fetch(new URL(`api/dev/rooms/${encodeURIComponent(roomName)}/tokens`, base), {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
  });
  const answer = await r.json().catch(() => null);
  if (!r.ok) throw new Error((answer && answer.data && answer.data.message) || `HTTP ${r.status}`);
  return answer.data.token;
}

function showJoin() {
  $('join').hidden = false;
  $('join-curl').textContent =
    `curl -X POST ${new URL(`api/rooms/${encodeURIComponent(roomName)}/tokens`, base)} \\\n` +
    '  -H "Authorization: Bearer $CHORUS_API_KEY" -d \'{"user_name":"Ana","join_as":"audience"}\'\n' +
    `# then open ${new URL(`rooms/${encodeURIComponent(roomName)}`, base)}?token=<data.token>`;
  setStatus('Join the room.');
}

$('join-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const as = ev.submitter ? ev.submitter.value : 'listener';
  const name = ev.target.elements.name.value.trim();
  for (const b of ev.target.querySelectorAll('button')) b.disabled = true;
  try {
    const token = await devToken(as, name);
    $('join').hidden = true;
    join(token);
  } catch (e) {
    setStatus('Could not get a room token: ' + errorText(e), true);
    for (const b of ev.target.querySelectorAll('button')) b.disabled = false;
  }
});

// ------------------------------------------------------------- room socket

function join(token) {
  S.token = token;
  const url = new URL(`api/rooms/${encodeURIComponent(roomName)}/ws`, base);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  url.searchParams.set('token', token);
  setStatus('Connecting…');
  const ws = S.socket = new WebSocket(url);
  ws.onmessage = ({ data }) => {
    let m;
    try { m = JSON.parse(data); } catch { return; }
    if (m.type === 'event') onRoomEvent(m.name, m.data || {});
    else if (S.pending.has(m.transId)) {
      const p = S.pending.get(m.transId);
      S.pending.delete(m.transId);
      if (m.type === 'response') p.resolve(m.data); else p.reject(new Error((m.data && m.data.message) || 'refused'));
    }
  };
  // A refused token closes the socket before room.state; the server's reason is in the close.
  ws.onclose = (e) => {
    if (!S.ended) endRoom(`Disconnected from the room${e.reason ? ': ' + e.reason : ''} (${e.code}).`, true);
  };
}

// One command over the room socket; resolves with its response, rejects with the server's reason.
function cmd(name, data = {}) {
  return new Promise((resolve, reject) => {
    const transId = ++S.transId;
    S.pending.set(transId, { resolve, reject });
    S.socket.send(JSON.stringify({ type: 'cmd', transId, name, data }));
  });
}

// Buttons send a command; a refusal (a missing permission, a rate limit) is shown, not thrown.
async function act(name, data) {
  try { await cmd(name, data); } catch (e) { setStatus(`${name}: ${errorText(e)}`, true); }
}

function onRoomEvent(name, d) {
  switch (name) {
    case 'room.state':
      S.me = d.you.memberId;
      S.you = d.you;
      S.members = new Map(d.members.map((m) => [m.memberId, m]));
      S.hands = new Map(d.hands.map((h) => [h.memberId, h.userName]));
      S.audienceCount = d.audienceCount;
      $('room').hidden = false;
      $('me').dataset.state = d.you.role === 'member' ? 'connecting' : 'audience';
      setStatus(`In the room as ${d.you.userName}.`);
      listen();
      // Joined as a member: on stage from the start, with a publish token from the director.
      if (d.you.role === 'member') goOnStage();
      break;
    case 'member.joined':
    case 'member.updated':
      if (d.role === 'member') S.members.set(d.memberId, d); else S.members.delete(d.memberId);
      if (d.memberId === S.me) {
        const wasMember = S.you.role === 'member';
        S.you = d;
        // Sent back to the audience: chorus already stopped the publication.
        if (wasMember && d.role === 'audience') leaveStage();
      }
      break;
    case 'member.left':
      S.members.delete(d.memberId);
      break;
    case 'member.promoted':
      // My promotion: the data is a director answer to publish with (once).
      S.promoted = d;
      goOnStage();
      break;
    case 'member.talking': {
      const m = S.members.get(d.memberId);
      if (m) m.talking = d.talking;
      break;
    }
    case 'room.audience_count':
      S.audienceCount = d.count;
      break;
    case 'hand.raised':
      S.hands.set(d.memberId, d.userName);
      break;
    case 'hand.lowered':
      S.hands.delete(d.memberId);
      break;
    case 'room.removed':
      endRoom('You were removed from the room.');
      return;
  }
  render();
}

// Removed, disconnected or left: everything stops.
function endRoom(text, isError = false) {
  S.ended = true;
  leaveStage();
  if (S.view) S.view.stop();
  S.view = null;
  $('players').replaceChildren();
  if (S.socket && S.socket.readyState <= WebSocket.OPEN) S.socket.close();
  for (const p of S.pending.values()) p.reject(new Error('the room socket closed'));
  S.pending.clear();
  S.members.clear();
  S.hands.clear();
  setListening('off', 'no');
  setStatus(text, isError);
  $('me').dataset.state = 'ended';
  render();
}

// ---------------------------------------------------------------- listening

// Everyone, on stage or not, listens with a View: TRACKS multiplexed tracks
// carry whoever talks; my own source is excluded so that I never hear myself.
async function listen() {
  if (S.view) return;
  const tokenGenerator = () => millicast.Director.getSubscriber({
    streamName: roomName, streamAccountId: 'chorus', subscriberToken: S.token,
  });
  const v = S.view = new millicast.View(null, tokenGenerator);
  v.on('track', (e) => play(e.track));
  v.on('connectionStateChange', (state) => setListening(state, state));
  setListening('connecting', 'connecting…');
  try {
    await v.connect({
      disableVideo: true,
      multiplexedAudioTracks: TRACKS,
      excludedSourceIds: [S.me],
      events: ['active', 'inactive', 'vad', 'stopped'],
    });
  } catch (e) {
    S.view = null;
    setListening('failed', 'could not listen: ' + errorText(e));
  }
}

function setListening(state, text) {
  $('listening').dataset.state = state;
  $('listening').textContent = text;
}

// Each received track plays in its own <audio>; a browser that wants a click
// first gets the "Enable sound" button.
function play(track) {
  if (track.kind !== 'audio') return;
  const audio = new Audio();
  audio.srcObject = new MediaStream([track]);
  $('players').append(audio);
  audio.play().catch(() => { $('enable-sound').hidden = false; });
}

$('enable-sound').addEventListener('click', () => {
  for (const a of $('players').querySelectorAll('audio')) a.play().catch(() => {});
  $('enable-sound').hidden = true;
});

// ------------------------------------------------------------------ on stage

// Publish the microphone with my member id as sourceId. The first token is
// member.promoted's director answer when there is one; later ones (the SDK's
// reconnects, or joining as a member) come from the director with the room token.
function goOnStage() {
  if (S.publishing || S.ended) return S.publishing;
  S.publishing = (async () => {
    let first = S.promoted;
    S.promoted = null;
    try {
      $('me').dataset.state = 'connecting';
      render();
      S.mic = S.mic || await navigator.mediaDevices.getUserMedia({ audio: true, video: false });
      // Sent back (or out) while the browser asked for the microphone: nothing to publish.
      if (S.ended || !S.you || S.you.role !== 'member') { leaveStage(); return; }
      const tokenGenerator = () => {
        const c = first;
        first = null;
        return c ? Promise.resolve(c) : millicast.Director.getPublisher({ token: S.token, streamName: roomName });
      };
      const p = S.publisher = new millicast.Publish(null, tokenGenerator);
      p.on('connectionStateChange', (state) => {
        if (S.publisher !== p) return;
        $('me').dataset.state = state === 'connected' ? 'on-stage' : 'connecting';
        render();
      });
      await p.connect({ mediaStream: S.mic, sourceId: S.me, disableVideo: true, codec: 'vp8' });
    } catch (e) {
      const stillOnStage = !S.ended && S.you && S.you.role === 'member';
      leaveStage();
      if (stillOnStage) setStatus('Could not publish your microphone: ' + errorText(e), true);
    }
  })();
  return S.publishing;
}

// Stop publishing and release the microphone (the browser's recording light goes off).
function leaveStage() {
  if (S.publisher) S.publisher.stop();
  if (S.mic) S.mic.getTracks().forEach((t) => t.stop());
  Object.assign(S, { publisher: null, mic: null, publishing: null });
  if (!S.ended) $('me').dataset.state = 'audience';
}

// ---------------------------------------------------------------- rendering

const initials = (name) => name.split(/\s+/).filter(Boolean).slice(0, 2).map((w) => w[0].toUpperCase()).join('') || '?';

function button(action, label, memberId) {
  const b = document.createElement('button');
  b.type = 'button';
  b.dataset.action = action;
  b.dataset.memberId = memberId;
  b.textContent = label;
  return b;
}

// The whole room is redrawn on each event: a stage holds a handful of people.
function render() {
  const stage = $('stage');
  stage.replaceChildren();
  for (const m of S.members.values()) {
    const li = document.createElement('li');
    li.className = 'member';
    li.dataset.memberId = m.memberId;
    // The ring: member.talking (the edges' voice activity, talkspurt plus hangover).
    li.classList.toggle('talking', !!m.talking);
    li.classList.toggle('muted', !!m.muted);
    li.classList.toggle('me', m.memberId === S.me);
    const avatar = document.createElement('div');
    avatar.className = 'avatar';
    avatar.textContent = initials(m.userName);
    const name = document.createElement('div');
    name.className = 'name';
    name.textContent = m.userName + (m.memberId === S.me ? ' (you)' : '');
    const badge = document.createElement('div');
    badge.className = 'badge';
    badge.textContent = m.muted ? 'muted' : '';
    li.append(avatar, name, badge);
    if (m.memberId !== S.me) {
      const actions = document.createElement('div');
      actions.className = 'actions';
      if (m.muted && may('room.member.audio_unmute')) actions.append(button('audio.unmute', 'Unmute', m.memberId));
      if (!m.muted && may('room.member.audio_mute')) actions.append(button('audio.mute', 'Mute', m.memberId));
      if (may('room.member.demote')) actions.append(button('demote', 'To audience', m.memberId));
      if (may('room.member.remove')) actions.append(button('remove', 'Remove', m.memberId));
      li.append(actions);
    }
    stage.append(li);
  }
  $('stage-empty').hidden = S.members.size > 0;

  const hands = $('hands');
  hands.replaceChildren();
  for (const [memberId, userName] of S.hands) {
    const li = document.createElement('li');
    li.dataset.memberId = memberId;
    const name = document.createElement('span');
    name.className = 'name';
    name.textContent = userName + (memberId === S.me ? ' (you)' : '');
    li.append(name);
    // The audience is counted, not listed: a raised hand is how a host gets a listener's id.
    if (may('room.member.promote')) li.append(button('promote', 'Bring on stage', memberId));
    if (may('room.member.remove')) li.append(button('remove', 'Remove', memberId));
    hands.append(li);
  }
  $('hands-empty').hidden = S.hands.size > 0;
  $('audience-count').textContent = S.audienceCount;

  const you = S.you;
  const live = !S.ended && you;
  const onStage = live && you.role === 'member';
  const handUp = live && S.hands.has(S.me);
  $('me-name').textContent = you ? you.userName : '';
  $('raise-hand').hidden = !live || onStage || handUp;
  $('lower-hand').hidden = !live || onStage || !handUp;
  $('leave-stage').hidden = !onStage;
  $('mute-me').hidden = !onStage || you.muted || !may('room.self.audio_mute');
  $('unmute-me').hidden = !onStage || !you.muted || !may('room.self.audio_unmute');
  $('leave').hidden = !live;
  const state = $('me').dataset.state;
  $('me-status').textContent = !live ? ''
    : onStage ? (state !== 'on-stage' ? 'Going on stage…' : you.muted ? 'On stage, muted: nobody hears you.' : 'On stage: your microphone is live.')
      : handUp ? 'In the audience, hand raised.' : 'In the audience.';
}

// Host actions on stage cards and raised hands: one listener for all buttons.
for (const list of [$('stage'), $('hands')]) {
  list.addEventListener('click', (ev) => {
    const b = ev.target.closest('button[data-action]');
    if (b) act(b.dataset.action, { memberId: b.dataset.memberId });
  });
}
$('raise-hand').addEventListener('click', () => act('hand.raise'));
$('lower-hand').addEventListener('click', () => act('hand.lower'));
$('mute-me').addEventListener('click', () => act('audio.mute'));
$('unmute-me').addEventListener('click', () => act('audio.unmute'));
// Any member may step down by itself.
$('leave-stage').addEventListener('click', () => act('demote', { memberId: S.me }));
$('leave').addEventListener('click', () => endRoom('You left the room.'));

// ------------------------------------------------------------------- start

$('room-name').textContent = roomName;
document.title = `${roomName} · chorus room`;
const urlToken = new URLSearchParams(location.search).get('token');
if (urlToken) join(urlToken); else showJoin();
