#!/usr/bin/env python3
"""Builds tests/corpus/call: a real recorded telephone call, one source per talker.

The recording and its annotation come from PyPI: pyannote.audio's sample (pyannote/audio/sample/:
sample.wav, 30 s, 16 kHz mono, two women on a telephone call; sample.rttm, the speaker turns
marked by hand; sample.stm, the words). The package, sample included, is MIT licensed
(pyannote_audio-*.dist-info/licenses/LICENSE).

The call is one mixed channel, so each talker's source is rebuilt from it:
- inside the talker's annotated turns, widened by PRE_S before and POST_S after, the recording
  itself (breaths, lip noise and soft onsets included, as the talker's microphone heard them);
- where the other talker speaks alone (by the annotation), and everywhere else, the line's own
  background noise (a stretch of the call with nobody speaking, looped), so the source's floor
  is the real one all along;
- 10 ms cross-fades at every boundary.
A third source, `line`, is the line's steady background noise (the stretch of the call before
anyone speaks, without the beep at 2.4 s and the rustle at 3.8 s, which are audible events, not
noise) looped: a participant who never talks.

Each source is encoded as a browser would (opusenc: 48 kHz, 20 ms frames, 32 kb/s VBR) and gets
`<id>.levels` (RFC 6464: -dBov of each 20 ms frame, what the browser measures before encoding)
and `<id>.turns` (the annotated turns, seconds, from the RTTM).

Run: python3 tests/corpus/build_call.py [WHEEL]   (needs opusenc from Debian opus-tools; without
WHEEL it fetches pyannote.audio==4.0.7 with `pip download --no-deps`).
"""

import array
import math
import os
import subprocess
import sys
import tempfile
import wave
import zipfile

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "call")
VERSION = "4.0.7"
PRE_S = 0.2
POST_S = 0.2
FADE_S = 0.01
# The stretch of the call with nobody speaking that stands for the line's noise floor.
QUIET = (4.0, 6.5)
NAMES = {"speaker90": "diane", "speaker91": "sheila"}


def fetch(tmp):
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
         f"pyannote.audio=={VERSION}"],
        check=True,
    )
    return os.path.join(tmp, f"pyannote_audio-{VERSION}-py3-none-any.whl")


def rttm(text):
    turns = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 8 and f[0] == "SPEAKER":
            start, dur = float(f[3]), float(f[4])
            turns.setdefault(NAMES[f[7]], []).append((start, start + dur))
    return turns


def inside(spans, t):
    return any(a <= t < b for a, b in spans)


def gate(n, sr, own, other):
    """Per sample: 1 = the recording, 0 = line noise, with FADE_S ramps."""
    widened = [(a - PRE_S, b + POST_S) for a, b in own]
    g = array.array("f", bytes(4 * n))
    for i in range(n):
        t = i / sr
        on = inside(widened, t) and (inside(own, t) or not inside(other, t))
        g[i] = 1.0 if on else 0.0
    # Ramps: a moving average over FADE_S.
    w = max(1, int(FADE_S * sr))
    out = array.array("f", bytes(4 * n))
    acc = 0.0
    for i in range(n):
        acc += g[i]
        if i >= w:
            acc -= g[i - w]
        out[i] = acc / min(i + 1, w)
    return out


def levels(samples, sr):
    f = sr // 50
    out = []
    for i in range(0, len(samples) - f + 1, f):
        s = sum(x * x for x in samples[i:i + f]) / f
        rms = math.sqrt(s) / 32768.0
        out.append(min(127, max(0, round(-20 * math.log10(max(rms, 1e-7))))))
    return out


def write_source(name, samples, sr, turns, note, turns_note):
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, f"{name}.wav")
        with wave.open(wav, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sr)
            w.writeframes(array.array("h", (max(-32768, min(32767, round(x))) for x in samples)).tobytes())
        subprocess.run(
            ["opusenc", "--quiet", "--bitrate", "32", "--vbr", "--framesize", "20",
             "--comp", "10", "--padding", "0", wav, os.path.join(OUT, f"{name}.opus")],
            check=True,
        )
    with open(os.path.join(OUT, f"{name}.levels"), "w") as f:
        f.write(f"# {name}: RFC 6464 level (-dBov) of each 20 ms frame. {note}\n")
        f.writelines(f"{l}\n" for l in levels(samples, sr))
    if turns is not None:
        with open(os.path.join(OUT, f"{name}.turns"), "w") as f:
            f.write(f"# {name}: {turns_note}\n")
            f.writelines(f"{a:.3f} {b:.3f}\n" for a, b in turns)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        wheel = sys.argv[1] if len(sys.argv) > 1 else fetch(tmp)
        with zipfile.ZipFile(wheel) as z:
            wav_bytes = z.read("pyannote/audio/sample/sample.wav")
            turns = rttm(z.read("pyannote/audio/sample/sample.rttm").decode())
        path = os.path.join(tmp, "sample.wav")
        with open(path, "wb") as f:
            f.write(wav_bytes)
        with wave.open(path) as w:
            sr, n = w.getframerate(), w.getnframes()
            call = array.array("h", w.readframes(n))
    os.makedirs(OUT, exist_ok=True)
    q0, q1 = int(QUIET[0] * sr), int(QUIET[1] * sr)
    quiet = call[q0:q1]
    noise = [quiet[i % len(quiet)] for i in range(n)]
    names = sorted(turns)
    for name in names:
        other = [s for o in names if o != name for s in turns[o]]
        g = gate(n, sr, turns[name], other)
        src = [g[i] * call[i] + (1.0 - g[i]) * noise[i] for i in range(n)]
        write_source(name, src, sr, sorted(turns[name]),
                     "Rebuilt from the call: its own turns, line noise between.",
                     f"annotated turns (start end, seconds), pyannote.audio {VERSION} sample.rttm")
    write_source("line", noise, sr, [],
                 "The call before anyone speaks, looped: never talks.",
                 "never talks: no turns")


if __name__ == "__main__":
    main()
