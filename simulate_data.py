"""
The agents that turn the toy audio world (world.py) into AudioChat-mini's training dialogues.

AudioChat trains on dialogues simulated by "AudioCopilot": LLM agents that play a user asking for audio
stories and edits, and a sound designer who answers by calling text-to-speech and text-to-audio tools
(world.py's). This file is that simulator at toy scale, deterministic: 16 kHz stereo stories rendered from
a plan by a pure-function mixer. The assistant's chain of thought is the sound designer's tool calls, in
the request's own terms; the studio lays them out as the plan.

    python simulate_data.py data              # the dataset `python train.py` simulates (train / listen / val / test)
    python simulate_data.py --demo out/demo   # 3 dialogues as markdown + wav + png

Read line by line: Part 1 the plan, 2 the mixer, 3 the tools and the studio, 4 the agents, 5 the dialogues.
Skim: 6 the picture, 7 the dataset writer. How the voices and sounds are made is world.py's (skim): this
file uses their names, their lengths (speech_duration, an effect's fixed length) and, in the mixer's
dry_signal, the synthesizers themselves, never how they work.
"""

import copy
import functools
import json
import multiprocessing as mp
import os
import re
import reprlib
import sys
import time
import zlib

import numpy as np
import torch

from tokenizer import AudioCodec, BPETokenizer
from world import (LINE_TEMPLATES, SFX, SOUNDS, SR, VOCAB, VOICES, WORD_CLASSES, ceil_tenth, fade, pick, rms,
                   speech_duration, synth_speech)

MIN_DURATION, MAX_DURATION = 1.0, 8.0   # seconds; stories are multiples of 0.1 s
MIN_STORY = 4.0                         # s: the studio pads a shorter story to this
GAIN_RANGE = (-30, 6)                   # dB, integers
TYPES = ("speech", "sfx", "ambience", "music")
N_TRAIN, N_LISTEN = 6000, 1500          # the dataset train.py simulates: dialogues, listening dialogues


# -----------------------------------------------------------------------------
# Part 1: the plan -- what the studio lays out, and the tool's answer the model reads
#
# A plan is {"duration": d, "sources": [...]}; every source has a persistent id, and start, dur,
# gain_db and pan in absolute terms. The model never writes one: it writes tool calls (Part 3) in
# the request's own terms, and the studio turns them into a plan. So the arithmetic on lengths the
# model cannot hear in advance (a line lasts as long as its voice takes to say it, an sfx as long
# as its sound) is the tools' job, as a real cascade's TTS and text-to-audio tools would do it (world.py).

PLAN_ERROR_KINDS = ("syntax", "unknown_ref", "malformed", "self_overlap", "past_end", "other")
SOURCE_KEYS = {"speech": ("id", "type", "voice", "text", "start", "dur", "gain_db", "pan"),
               **{t: ("id", "type", "sound", "start", "dur", "gain_db", "pan") for t in ("sfx", "ambience", "music")}}

class PlanError(ValueError):
    """A tool call the studio refuses, or an inconsistent plan: the message names the source and
    the problem, `kind` (one of PLAN_ERROR_KINDS) says which way it fails. syntax: a line that is
    not a tool call; unknown_ref: a call names no source, or several; malformed: an unknown
    tool, voice, word or sound, or a missing argument; self_overlap: a voice talks over itself;
    past_end: a source starts before 0 s or ends after the story; other: the rest."""

    def __init__(self, message, kind="other"):
        super().__init__(message)
        self.kind = kind

_show = reprlib.repr   # a value in an error message, cut short (a call may hold any text)

def derived_dur(src):
    """The dur in s a speech or sfx source has (None for beds, which last as long as the story).
    PlanError for an unknown voice, word or sound: checked here, before the world is asked."""
    if src["type"] == "speech":
        voice, text = src["voice"], src["text"]
        if not isinstance(voice, str) or voice not in VOICES:
            raise PlanError(f"unknown voice {_show(voice)}; the voices are {', '.join(VOICES)}", "malformed")
        words = text.split() if isinstance(text, str) else []
        if not words:
            raise PlanError(f"speech text must be a non-empty string of words, got {_show(text)}", "malformed")
        unknown = [w for w in words if w not in VOCAB]
        if unknown:
            raise PlanError(f"unknown word {_show(unknown[0])} in {_show(text)}: lines use the {len(VOCAB)}-word "
                            "vocabulary (VOCAB)", "malformed")
        return speech_duration(voice, text)
    if src.get("sound") not in SOUNDS[src["type"]]:
        raise PlanError(f"unknown {src['type']} sound {_show(src.get('sound'))}; the {src['type']} sounds are "
                        f"{', '.join(SOUNDS[src['type']])}", "malformed")
    return SFX[src["sound"]][0] if src["type"] == "sfx" else None

def validate_plan(plan):
    """Raise PlanError naming the source, the problem and its kind if the plan (as the studio
    builds it: the right keys and types) is inconsistent; else return None."""
    d = plan["duration"]
    if not MIN_DURATION <= d <= MAX_DURATION:
        raise PlanError(f"the story would last {d:.1f} s, outside the allowed {MIN_DURATION}-{MAX_DURATION} s", "past_end")
    for s in plan["sources"]:
        name, want = f"source {s['id']}", derived_dur(s)
        if want is not None and abs(s["dur"] - want) > 1e-6:
            raise PlanError(f"{name}: dur {s['dur']} s is wrong, it lasts {want} s")
        if s["start"] < -1e-6 or s["start"] + s["dur"] > d + 1e-6:
            raise PlanError(f"{name}: it plays {s['start']:.1f}-{s['start'] + s['dur']:.1f} s, outside the story "
                            f"(0-{d:.1f} s)", "past_end")
        if not GAIN_RANGE[0] <= s["gain_db"] <= GAIN_RANGE[1]:
            raise PlanError(f"{name}: gain_db {s['gain_db']} is outside {GAIN_RANGE[0]}..{GAIN_RANGE[1]} dB")
        if not -1 <= s["pan"] <= 1:
            raise PlanError(f"{name}: pan {s['pan']} is outside -1 (left) .. 1 (right)")
    lines = sorted((s for s in plan["sources"] if s["type"] == "speech"), key=lambda s: (s["voice"], s["start"]))
    for a, b in zip(lines, lines[1:]):
        if a["voice"] == b["voice"] and b["start"] < a["start"] + a["dur"] - 1e-6:
            raise PlanError(f"source {b['id']}: {b['voice']} talks over herself/himself: source {a['id']} lasts "
                            f"until {a['start'] + a['dur']:.1f} s but source {b['id']} starts at {b['start']} s",
                            "self_overlap")

def plan_to_text(plan):
    """Plan -> the studio's answer, as the model reads it (a tool message): the story's duration,
    then one line per source with its id, what it is, and where and how loud the studio put it.
        story 5.2 s
        1 ben "hello my friend" 0.3-1.5 s -2 dB pan -0.7
        2 dog_bark 1.6-2.4 s -5 dB pan 0.7"""
    rows = [f"story {plan['duration']:.1f} s"]
    for s in plan["sources"]:
        what = f'{s["voice"]} "{s["text"]}"' if s["type"] == "speech" else s["sound"]
        rows.append(f"{s['id']} {what} {s['start']:.1f}-{s['start'] + s['dur']:.1f} s {s['gain_db']} dB pan {s['pan'] + 0.0:.1f}")
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# Part 2: the mixer
#
# A source's dry (mono, unit-level) signal depends only on (seed, its id, its content). Gain and
# pan come after, so a volume or pan edit re-uses the dry signal and an edit never touches
# another source's stem. Dry signals are cached: re-rendering an edited plan only synthesizes
# what changed.

@functools.lru_cache(maxsize=128)
def dry_signal(seed, sid, kind, name, text, dur):
    """Mono dry signal (round(dur * SR),) float32 of one source, read-only, from its own generator
    seeded by (seed, id, content) only; the content is what its sound is made of: its type, voice or
    sound name, text ("" for a sound) and dur in s, never where or how loud it plays."""
    rng = np.random.default_rng([seed, sid, zlib.crc32(f"{kind}|{name}|{text}|{dur}".encode())])
    n = round(dur * SR)
    if kind == "speech":
        x = synth_speech(name, text, rng)          # already at speech level (RMS 0.1)
    elif kind == "sfx":
        x = SFX[name][1](rng, n)
        x = 0.6 * x / (np.abs(x).max() + 1e-9)   # events: peak level
    else:
        x = SOUNDS[kind][name](rng, n)
        x = 0.1 * x / rms(x)                       # beds: RMS level
    x = fade(np.asarray(x, np.float32)[:n])
    x.flags.writeable = False
    return x

def limiter(x, threshold=0.75, ceiling=0.99):
    """Memoryless soft limiter: identity below `threshold`, a tanh knee above that never exceeds
    `ceiling`. Memoryless, because a compressor's release would let a loud new source change
    its neighbours' level, breaking 'an edit changes only what was asked'."""
    knee = threshold + (ceiling - threshold) * np.tanh((np.abs(x) - threshold) / (ceiling - threshold))
    return np.where(np.abs(x) > threshold, np.sign(x) * knee, x)

def render(plan, seed, stems=False):
    """Plan -> stereo mix (2, N) float32, N = duration * SR (PlanError if the plan is invalid).
    With stems=True -> (mix, {id: (2, N) stem}), stems taken before the limiter. Pan law:
    constant power (L^2 + R^2 = 1), pan in [-1, 1] -> left, right gains cos, sin of (pan + 1) pi / 4."""
    validate_plan(plan)
    n = round(plan["duration"] * SR)
    mix, out = np.zeros((2, n), np.float32), {}
    for s in plan["sources"]:
        name = s["voice"] if s["type"] == "speech" else s["sound"]
        i0, theta = round(s["start"] * SR), (s["pan"] + 1) * np.pi / 4
        seg = dry_signal(seed, s["id"], s["type"], name, s.get("text", ""), round(s["dur"], 1))[: n - i0]
        stem = out[s["id"]] = np.zeros((2, n), np.float32)
        for c, p in enumerate((np.cos(theta), np.sin(theta))):
            stem[c, i0:i0 + len(seg)] = 10 ** (s["gain_db"] / 20) * p * seg
        mix += stem
    mix = limiter(mix)
    return (mix, out) if stems else mix


# -----------------------------------------------------------------------------
# Part 3: the tools -- the assistant's chain of thought is the sound designer's tool calls
#
# A story or edit turn is a few calls, one per line, with arguments in the request's own terms:
#     speak(ben, "hello my friend", left)      a line; no placement in a new story: after the last one
#     sfx(dog_bark, while ben)                 during ben's line (also: start, end, halfway, after REF)
#     ambience(rain)                           a bed under the whole story (music(piano) too)
#     set_gain(dog_bark, much quieter)   set_pan(ben, right)   remove(second bell)
#     replace(ben, ava)   replace("hello my friend", "come home")   replace(rain, wind)
# A call names a source as the user does (REF): a voice with one line, a line's words in quotes, or
# a sound, "second bell" when there are several -- never by its id, which the model would have to
# look up in the plan. In an edit, a REF names a source of the story as the turn found it.
# The studio (run_calls) executes them: it derives every length, chooses the times, loudness and
# stereo positions the request leaves open, from generators seeded by (dialogue seed, source id),
# and answers with the laid-out plan (plan_to_text). The same calls on the same plan always give
# the same plan, and an edit touches only the sources its calls name.

TOOLS = {   # tool -> (required arguments, optional ones); an argument's kind is read from its value
    "new_story": ((), ()), "speak": (("voice", "text"), ("at", "side")), "sfx": (("sound",), ("at", "side")),
    "ambience": (("sound",), ()), "music": (("sound",), ()), "remove": (("ref",), ()),
    "set_gain": (("ref", "step"), ()), "set_pan": (("ref", "side"), ()), "replace": (("ref",), ("voice", "text", "sound")),
}
ARG_ORDER = ("ref", "voice", "text", "sound", "at", "side", "step")
STEPS = {"a bit louder": 3, "louder": 6, "much louder": 10, "a bit quieter": -3, "quieter": -6, "much quieter": -10}
SIDES = ("left", "right", "center")
PAN_RANGES = {"left": (-0.9, -0.5), "right": (0.5, 0.9), None: (-0.3, 0.3)}   # "center" is 0.0
GAIN_RANGES = {"speech": (-3, 0), "sfx": (-8, -2), "ambience": (-24, -14), "music": (-22, -14)}   # dB
ORDINALS = ("first", "second", "third", "fourth")
REF = re.compile(r'"[^"]*"|(?:(' + "|".join(ORDINALS) + r') )?(\w+)')   # "words" | voice | [ordinal] sound
PLACEMENT = re.compile(r"start|end|halfway|(after|while) (.+)")

def call_to_text(call):
    """{"name", "args"} -> one line, e.g. 'speak(ben, "hello my friend", after ava, left)'."""
    args = call["args"]
    return f"{call['name']}({', '.join(json.dumps(args[k]) if k == 'text' else args[k] for k in ARG_ORDER if k in args)})"

def parse_calls(text):
    """The model's text, one call per line -> [{"name", "args"}]. PlanError for anything else."""
    calls = []
    for line in text.strip().split("\n"):
        m = re.fullmatch(r"(\w+)\((.*)\)", line.strip())
        if not m:
            raise PlanError(f"not a tool call: {_show(line)}", "syntax")
        name, args = m[1], {}
        if name not in TOOLS:
            raise PlanError(f"unknown tool {_show(name)}; the tools are {', '.join(TOOLS)}", "malformed")
        for i, a in enumerate(re.findall(r'"[^"]*"|[^,\s][^,]*', m[2])):
            a = a.strip()
            kind = ("ref" if i == 0 and TOOLS[name][0][:1] == ("ref",) and REF.fullmatch(a) else
                    "text" if a[0] == '"' else "voice" if a in VOICES else
                    "sound" if any(a in SOUNDS[t] for t in SOUNDS) else "side" if a in SIDES else
                    "step" if a in STEPS else "at" if PLACEMENT.fullmatch(a) and REF.fullmatch(a.split(" ", 1)[-1]) else None)
            if kind is None or kind in args:
                raise PlanError(f"{name}: cannot read the argument {_show(a)}", "syntax" if kind is None else "malformed")
            args[kind] = a[1:-1] if kind == "text" else a
        required, optional = TOOLS[name]
        if set(required) - set(args) or set(args) - set(required) - set(optional) or (name == "replace" and len(args) != 2):
            raise PlanError(f"{name}: takes {', '.join(required + optional)}, got {_show(line.strip())}", "malformed")
        calls.append({"name": name, "args": args})
    return calls

def find(plan, sid, tool):
    """The source with id sid. PlanError if there is none (an edit's earlier call removed it)."""
    for s in plan["sources"]:
        if s["id"] == sid:
            return s
    raise PlanError(f"{tool}: source {sid} is gone (an earlier call removed it)", "unknown_ref")

def in_time_order(plan, key, value):
    """The sources whose `key` (voice, text or sound) is value, in time order: how a REF counts them."""
    return sorted((s for s in plan["sources"] if s.get(key) == value), key=lambda s: (s["start"], s["id"]))

def ref_of(plan, sid):
    """How the designer names source sid: 'ben' (his only line), '"hello my friend"' (one of
    several lines of its voice), 'bell' or 'second bell'."""
    s = find(plan, sid, "ref")
    key = "voice" if s["type"] == "speech" else "sound"
    same = in_time_order(plan, key, s[key])
    if len(same) == 1:
        return s[key]
    return json.dumps(s["text"]) if key == "voice" else f"{ORDINALS[same.index(s)]} {s['sound']}"

def resolve(plan, ref, tool):
    """A REF -> the one source of plan it names. PlanError (unknown_ref) for none or several."""
    ordinal, name = REF.fullmatch(ref).groups()
    key = "text" if ref[0] == '"' else "voice" if name in VOICES and not ordinal else "sound"   # "words" | voice | sound
    hits = in_time_order(plan, key, ref[1:-1] if key == "text" else name)
    if ordinal:
        hits = hits[ORDINALS.index(ordinal):][:1]
    if len(hits) != 1:
        have = ", ".join(ref_of(plan, s["id"]) for s in plan["sources"]) or "nothing"
        raise PlanError(f"{tool}: {_show(ref)} names {'no source' if not hits else f'{len(hits)} sources'} "
                        f"(the story has {have})", "unknown_ref")
    return hits[0]

def place(plan, src, at, ref, rng, last):
    """The start of a new foreground source, in s, from its placement `at` in the request's terms
    (start | end | halfway | after | while | None) and the source `ref` an after or while names;
    last: in a new story, the source told last (or None), else False."""
    d, D = src["dur"], plan["duration"]
    fg = [s for s in plan["sources"] if s["type"] in ("speech", "sfx")]
    new_story = last is not False
    if at in ("end", "halfway") and new_story:
        raise PlanError(f"{at}: a new story is told in order (after, while); 'end' and 'halfway' are for edits")
    if at is None and new_story:   # a story is told in order: after the last source not placed 'while' another
        at, ref = ("after", last) if last else ("start", None)
    if at == "start":
        start = rng.uniform(0.1, 0.5)
    elif at == "end":
        start = D - d - rng.uniform(0.0, 0.3)
    elif at == "halfway":
        start = D / 2 - d / 2 + rng.uniform(-0.3, 0.3)
    elif at == "while":
        start = ref["start"] + rng.uniform(0, max(0.0, ref["dur"] - 0.2))
    elif at == "after":   # lines by two voices may overlap a little, a voice never overlaps itself
        two_lines = src["type"] == ref["type"] == "speech"
        start = ref["start"] + ref["dur"] + (rng.uniform(-0.3 if two_lines else 0.0, 0.4) if new_story else rng.uniform(0.0, 0.3))
        for s in fg:
            if src["type"] == "speech" and s.get("voice") == src["voice"] and s["start"] <= start:
                start = max(start, s["start"] + s["dur"] + 0.1)
    else:     # anywhere: for a line, a time when its voice is silent
        free = [t / 10 for t in range(int((D - d) * 10 + 1e-6) + 1) if all(
            s.get("voice") != src.get("voice") or t / 10 >= s["start"] + s["dur"] or t / 10 + d <= s["start"] for s in fg)]
        start = pick(rng, free) if free else 0.0
    return min(max(0.0, ceil_tenth(start)), round(D - d, 1))

def run_calls(calls, plan, seed):
    """The studio: one turn's calls [{"name", "args"}] on the current plan (None before the first
    story) -> the new plan, a pure function of (calls, plan, seed). A story turn starts with
    new_story(); its duration is set after its sources, and its beds then cover it. New ids
    continue after the largest; a source's times, gain and pan come from default_rng([seed, id]).
    PlanError (the plan untouched) if a call is impossible."""
    if not calls:
        raise PlanError("no tool calls", "syntax")
    new_story = calls[0]["name"] == "new_story"
    if not new_story and plan is None:
        raise PlanError(f"{calls[0]['name']}: there is no story yet (start with new_story())")
    before, plan = plan, {"duration": MAX_DURATION, "sources": []} if new_story else copy.deepcopy(plan)
    last = None if new_story else False
    lookup = lambda ref, tool: find(plan, resolve(plan if new_story else before, ref, tool)["id"], tool)
    for c in calls[1:] if new_story else calls:
        name, a = c["name"], c["args"]
        if name == "new_story":
            raise PlanError("new_story() starts a turn, it cannot come in the middle of one")
        if name in ("speak", "sfx", "ambience", "music"):
            sid = max((s["id"] for s in plan["sources"]), default=0) + 1
            rng, kind = np.random.default_rng([seed, sid]), "speech" if name == "speak" else name
            src = {"id": sid, "type": kind, **{k: a[k] for k in ("voice", "text", "sound") if k in a}, "start": 0.0}
            src["dur"] = derived_dur(src) or plan["duration"]
            if kind in ("speech", "sfx"):   # a bed starts at 0 s and lasts the whole story
                m = PLACEMENT.fullmatch(a.get("at", ""))   # None: the call leaves the time open
                at, ref = (m[1] or m[0], m[2] and lookup(m[2], m[1])) if m else (None, None)
                src["start"] = place(plan, src, at, ref, rng, last)
            src["gain_db"] = int(rng.integers(GAIN_RANGES[kind][0], GAIN_RANGES[kind][1] + 1))
            src["pan"] = pan_for(a.get("side"), rng) if kind in ("speech", "sfx") else 0.0
            plan["sources"].append({k: src[k] for k in SOURCE_KEYS[kind]})
            if new_story and kind in ("speech", "sfx") and not a.get("at", "").startswith("while"):
                last = plan["sources"][-1]
            continue
        s = lookup(a["ref"], name)
        if name == "remove":
            plan["sources"].remove(s)
        elif name == "set_gain":
            s["gain_db"] += STEPS[a["step"]]
        elif name == "set_pan":
            s["pan"] = pan_for(a["side"], np.random.default_rng([seed, s["id"], 1]))
        else:   # replace: same id, new content; a longer one that would run past the end starts earlier
            key = next(k for k in ("voice", "text", "sound") if k in a)
            if key not in s:
                raise PlanError(f"replace: {a['ref']} is {s['type']}, it has no {key}", "malformed")
            s[key] = a[key]
            s["dur"] = derived_dur(s) or s["dur"]
            s["start"] = max(0.0, min(s["start"], round(plan["duration"] - s["dur"], 1)))
    if new_story:   # the story ends a little after its last sound; its beds cover all of it
        end = max((s["start"] + s["dur"] for s in plan["sources"] if s["type"] in ("speech", "sfx")), default=0.0)
        plan["duration"] = max(MIN_STORY, ceil_tenth(end + np.random.default_rng([seed, 0]).uniform(0.2, 0.6)))
        for s in plan["sources"]:
            if s["type"] in ("ambience", "music"):
                s["dur"] = plan["duration"]
    validate_plan(plan)
    return plan

def pan_for(side, rng):
    return 0.0 if side == "center" else round(float(rng.uniform(*PAN_RANGES[side])), 1) + 0.0


# -----------------------------------------------------------------------------
# Part 4: the agents (AudioCopilot at toy scale)
#
# The user agent samples an intent (structured: what it wants, which source ids it means) and
# words it from the phrase tables below; the designer agent answers the intent with tool calls.
# Both are rule-based; a real AudioCopilot puts LLMs at these two seams.

SOUND_WORDS = {   # name -> ([story clauses], [ways to refer to it: 'the ...'], [ways to ask for one])
    "dog_bark": (["a dog barks", "a dog starts barking", "there is a dog barking", "a dog lets out a bark"],
                 ["the dog bark", "the dog", "the bark", "the barking dog"],
                 ["a dog barking", "a bark from a dog", "a dog bark", "a barking dog"]),
    "knock": (["someone knocks on the door", "there is a knock at the door", "a knock comes at the door", "somebody knocks"],
              ["the knock", "the knock at the door", "the door knock", "the knock sound"],
              ["a knock", "a knock on the door", "some knocking", "a door knock"]),
    "bell": (["a bell rings", "a bell sounds", "a bell starts ringing", "we hear a bell"],
             ["the bell", "the ringing bell", "the bell sound"],
             ["a bell", "a ringing bell", "a bell ringing", "the sound of a bell"]),
    "footsteps": (["footsteps pass by", "someone walks by", "we hear footsteps", "footsteps go by"],
                  ["the footsteps", "the footstep sound", "the walking sound"],
                  ["some footsteps", "footsteps", "the sound of footsteps", "someone walking by"]),
    "glass_break": (["a glass shatters", "a glass breaks", "glass shatters", "someone drops a glass and it breaks"],
                    ["the breaking glass", "the glass", "the shattering glass", "the glass break"],
                    ["breaking glass", "a glass breaking", "a glass shattering", "the sound of breaking glass"]),
    "car_horn": (["a car horn honks", "a car honks", "someone honks a car horn", "a horn honks"],
                 ["the car horn", "the horn", "the honk", "the horn honk"],
                 ["a car horn", "a honking car", "a car honking", "a horn honk"]),
    "bird_chirp": (["a bird chirps", "a bird sings", "a little bird chirps", "there is a bird chirping"],
                   ["the bird", "the chirp", "the chirping bird", "the bird chirp"],
                   ["a chirping bird", "a bird chirp", "a bird chirping", "some birdsong"]),
    "thunder": (["thunder rumbles", "thunder rumbles in the distance", "there is a clap of thunder", "thunder roars"],
                ["the thunder", "the thunder rumble", "the rumble of thunder"],
                ["thunder", "a rumble of thunder", "a thunderclap", "some thunder"]),
    "clock_tick": (["a clock ticks", "a clock is ticking", "a clock ticks on the wall", "we hear a clock ticking"],
                   ["the ticking clock", "the clock", "the clock tick", "the clock sound"],
                   ["a ticking clock", "a clock ticking", "some clock ticks", "the tick of a clock"]),
    "applause": (["people applaud", "an audience applauds", "there is applause", "applause breaks out"],
                 ["the applause", "the round of applause", "the applause sound"],
                 ["applause", "a round of applause", "some applause", "an audience applauding"]),
    "whistle": (["someone whistles", "a whistle blows", "somebody blows a whistle", "a sharp whistle sounds"],
                ["the whistle", "the whistle blow", "the whistle sound"],
                ["a whistle", "someone whistling", "a whistle blow", "a sharp whistle"]),
    "door_creak": (["a door creaks open", "a door slowly creaks open", "a creaky door opens", "the door creaks"],
                   ["the creaking door", "the door creak", "the creak", "the creaky door"],
                   ["a creaking door", "a door creaking", "a creaky door", "a door creak"]),
    "phone_ring": (["a phone rings", "the phone rings", "a telephone rings", "a phone starts ringing"],
                   ["the phone", "the ringing phone", "the phone ring", "the telephone"],
                   ["a ringing phone", "a phone ringing", "a phone ring", "a telephone ring"]),
    "cat_meow": (["a cat meows", "a cat starts meowing", "there is a meowing cat", "a cat lets out a meow"],
                 ["the cat", "the meow", "the meowing cat", "the cat meow"],
                 ["a meowing cat", "a cat meowing", "a meow", "a cat's meow"]),
    "rain": (["in the rain", "with rain falling", "with rain pouring down", "with the sound of rain"],
             ["the rain", "the rain sound", "the rainfall"], ["rain", "some rain", "rainfall", "the sound of rain"]),
    "wind": (["in the wind", "with wind blowing", "with a strong wind", "out in the wind"],
             ["the wind", "the wind noise", "the wind sound"], ["wind", "some wind", "wind noise", "a windy atmosphere"]),
    "crowd": (["in a busy crowd", "in a noisy crowd", "with a crowd murmuring", "surrounded by a crowd"],
              ["the crowd", "the crowd noise", "the crowd sound"],
              ["crowd noise", "a crowd", "a crowd murmuring", "a noisy crowd"]),
    "piano": (["over soft piano music", "with piano music", "with a piano playing", "over a quiet piano tune"],
              ["the piano", "the piano music", "the piano track"],
              ["piano music", "a piano", "some piano", "a soft piano tune"]),
    "flute": (["with a flute melody", "over a flute tune", "with a flute playing", "over soft flute music"],
              ["the flute", "the flute music", "the flute melody"],
              ["a flute melody", "flute music", "some flute", "a flute tune"]),
}
WHERE_WORDS = {
    "left": [" on the left", " from the left", " on the left side", " from the left side", " in the left channel"],
    "right": [" on the right", " from the right", " on the right side", " from the right side", " in the right channel"],
    "center": [" in the center", " from the center", " right in the center", " at the center"],
    None: [""],
}
STORY_OPENINGS = ["Tell a story: ", "Make a scene where ", "Create an audio story: ", "I want a short clip where ",
                  "Please produce a scene in which ", "Voice a little story: ", "Story time: ", "I'd like a clip in which ",
                  "Please create a clip where ", "Let's do a scene where ", "Produce a short audio scene: ",
                  "Here is the scene: ", "Build a little scene: ", "I'm picturing this: ", "A short audio drama: ",
                  "Put together a clip where ", "Generate a scene in which ", "Design a sound scene where ", "New story: ",
                  "The scene goes like this: "]
STORY_JOINERS = [", then ", ". Then ", ", and then ", ", after that ", ". After that, ", ". Next, ", "; then ",
                 ", and after that ", ". Afterwards, ", ", and next ", ". A moment later, ", ", and a moment later "]
WHILE_WORDS = [" while {clause}", " as {clause}", ", and meanwhile {clause}", " and at the same time {clause}",
               " just as {clause}", ", and during that line {clause}"]   # a sound or a line during the line before
BED_JOINERS = [", {event}", ", all {event}", ". All of it {event}", ", from start to finish {event}"]
SAY_WORDS = ['{voice} says "{text}"{where}', '{voice}{where} says "{text}"', '"{text}," says {voice}{where}',
             '{voice} tells us "{text}"{where}', '{voice} goes "{text}"{where}', '"{text}," {voice} says{where}',
             '{voice} speaks up{where}: "{text}"', 'we hear {voice}{where} say "{text}"',
             '{voice} announces "{text}"{where}', '{voice} says the words "{text}"{where}',
             '{voice}{where} speaks the line "{text}"', '{voice} remarks "{text}"{where}']
UNDERSTAND_WORDS = {
    "transcribe": ["Who says what, and when?", "Transcribe this clip with speakers and times.",
                   "Please write down what is said in this audio, with times.",
                   "Who is speaking here, and what do they say?", "Give me a time-stamped transcript of this.",
                   "What does each person say, and at what time?",
                   "Write out the dialogue with speaker names and timestamps.",
                   "List every spoken line with its speaker and start time.", "Transcribe the speech in this recording.",
                   "Which voices do you hear, and what does each one say?", "Tell me who speaks and when.",
                   "Transcribe this audio, speakers included."],
    "describe": ["Describe every sound in this clip with its time.", "What can you hear in this audio, and when?",
                 "List all the sources in this recording with start and end times.",
                 "Caption this clip: what happens when?", "Describe this audio from start to finish.",
                 "What sounds are in this clip, and where do they start and stop?",
                 "Break down this recording: every sound, every voice, with times.",
                 "Give a timeline of all the sounds you hear.",
                 "Which sound effects, voices and background sounds are in this clip?",
                 "Please describe what happens in this recording, second by second.",
                 "Write a caption for this audio with timestamps.", "Walk me through this clip sound by sound."],
}
REFER_WORDS = {   # voice: the only line of its voice; line: one of several
    "voice": ["{voice}", "{voice}'s line", "{voice}'s voice", "what {voice} says", "{voice}'s part"],
    "line": ['the line "{text}"', '{voice}\'s line "{text}"', '{voice}\'s "{text}"', 'the words "{text}"',
             'the "{text}" line'],
}
EDIT_KINDS = ("add", "remove", "change", "volume", "move", "multi")
EDIT_WORDS = {   # one edit: {ref} names the target, {new} a new sound, {voice} / {text} new speech
    "add_speech": ['let {voice} say "{text}"', 'add {voice} saying "{text}"', '{voice} should also say "{text}"',
                   'add a line from {voice}: "{text}"', 'add "{text}" spoken by {voice}',
                   'I want {voice} to say "{text}" too', 'put in a line where {voice} says "{text}"',
                   'insert {voice} saying "{text}"', 'also let {voice} say "{text}"'],
    "add_sfx": ["add {new}", "put in {new}", "I want {new} too", "insert {new}", "include {new}", "we also need {new}",
                "sneak in {new}", "slip in {new}", "let's hear {new}"],
    "add_bed": ["add {new} in the background", "put {new} under the entire scene", "we need {new} too",
                "lay {new} under the scene", "fill the background with {new}", "give the scene a backdrop of {new}",
                "put {new} in the background", "add {new} throughout", "underlay the scene with {new}"],
    "remove": ["remove {ref}", "take away {ref}", "take out {ref}", "I don't want {ref} anymore", "drop {ref}", "cut {ref}",
               "delete {ref}", "please remove {ref}", "take {ref} out", "leave out {ref}", "we don't need {ref}"],
    "change_sound": ["replace {ref} with {new}", "change {ref} into {new}", "use {new} instead of {ref}",
                     "swap {ref} for {new}", "turn {ref} into {new}", "make {ref} {new} instead", "switch {ref} to {new}",
                     "exchange {ref} for {new}", "put {new} where {ref} is"],
    "change_voice": ['let {voice} say "{old_text}" instead of {old_voice}',
                     '{voice} should say "{old_text}" instead of {old_voice}', 'give "{old_text}" to {voice}',
                     'give {old_voice}\'s line "{old_text}" to {voice}',
                     'I want {voice} to say "{old_text}", not {old_voice}', 'switch the voice of "{old_text}" to {voice}',
                     'recast "{old_text}" with {voice}', 'use {voice}\'s voice for "{old_text}"',
                     'replace {old_voice} with {voice} on "{old_text}"', '{voice} should read "{old_text}" instead'],
    "change_text": ['make {old_voice} say "{text}" instead of "{old_text}"', 'change "{old_text}" to "{text}"',
                    '{old_voice} should say "{text}" instead of "{old_text}"',
                    'replace the line "{old_text}" with "{text}"',
                    'instead of "{old_text}", {old_voice} should say "{text}"',
                    'let {old_voice} say "{text}" in place of "{old_text}"', 'change the words "{old_text}" to "{text}"',
                    'rewrite "{old_text}" as "{text}"', 'I want "{text}" instead of "{old_text}"',
                    'swap "{old_text}" for "{text}"'],
    "up": ["make {ref} {how}louder", "turn {ref} up{how_}", "{ref} should be {how}louder",
           "raise the volume of {ref}{how_}", "boost {ref}{how_}", "I want {ref} {how}louder", "bring {ref} up{how_}",
           "{ref} needs to be {how}louder", "push {ref} up{how_}", "increase the volume of {ref}{how_}",
           "{ref} is too quiet, turn it up{how_}"],
    "down": ["make {ref} {how}quieter", "turn {ref} down{how_}", "{ref} should be {how}softer", "lower {ref}{how_}",
             "bring {ref} down{how_}", "reduce the volume of {ref}{how_}", "I want {ref} {how}quieter",
             "{ref} needs to be {how}softer", "pull {ref} back{how_}", "{ref} is too loud, turn it down{how_}",
             "soften {ref}{how_}"],
    "move": ["move {ref} {to}", "pan {ref} {to}", "put {ref} {on}", "shift {ref} {to}", "{ref} should be {on}",
             "place {ref} {on}", "I want {ref} {on}", "send {ref} {to}", "position {ref} {on}"],
}
WHEN_WORDS = {
    "start": [" at the start", " at the beginning", " right at the beginning", " to open the scene"],
    "end": [" at the end", " right at the end", " to end the scene", " as the last thing"],
    "halfway": [" halfway through", " in the middle", " midway through", " around the middle"],
    None: [""],
}
AFTER_WORDS = [" after {ref}", " right after {ref}", " once {ref} is done", " just after {ref}", " directly after {ref}"]
HOW_WORDS = {   # volume steps in dB; each reads before 'louder' and, stripped, after 'up'
    3: ["a bit ", "slightly ", "a little ", "a touch "],
    6: [""],
    10: ["a lot ", "quite a bit ", "considerably ", "significantly "],
}
SIDE_WORDS = {   # side -> ([to move it there], [to say it is there])
    "left": (["to the left", "over to the left", "to the left side", "all the way to the left"],
             ["on the left", "on the left side", "in the left channel"]),
    "right": (["to the right", "over to the right", "to the right side", "all the way to the right"],
              ["on the right", "on the right side", "in the right channel"]),
    "center": (["to the center", "into the center", "back to the center", "over to the center"],
               ["in the center", "at the center", "right in the center"]),
}
MULTI_WORDS = ["{a} and {b}", "{a}, then {b}", "{a}. Also {b}", "{a}, and also {b}", "{a}; {b}", "{a}, plus {b}",
               "{a}. And {b}", "first {a}, then {b}"]

def random_line(rng, max_words=6):
    """A line of speech from LINE_TEMPLATES, e.g. 'the old dog runs home'."""
    while True:
        words = [pick(rng, WORD_CLASSES[w]) if w in WORD_CLASSES else w for w in pick(rng, LINE_TEMPLATES).split()]
        if len(words) <= max_words:
            return " ".join(words)

def side_of(pan):
    return "left" if pan <= -0.5 else "right" if pan >= 0.5 else "center" if abs(pan) < 0.05 else None

class UserAgent:
    """The simulated user: request(phase, plan, rng) -> (its words, its intent)."""

    def request(self, phase, plan, rng):
        """phase: "story" | "edit" | "understand" -> (text, intent)."""
        if phase == "understand":
            task = pick(rng, ["transcribe", "describe"])
            return pick(rng, UNDERSTAND_WORDS[task]), {"kind": "understand", "task": task}
        story = phase == "story"
        intent = self.story_intent(rng) if story else self.edit_intent(plan, rng)
        return (self.word_story(intent, rng) if story else self.word_edit(intent, plan, rng)), intent

    def story_intent(self, rng):
        """1-3 lines by 1-2 voices, 0-2 sound effects, 0-2 beds: 2-5 sources whose foreground
        takes at most 4.6 s (the studio's story then lasts about 4-7 s)."""
        while True:
            voices = list(rng.choice(list(VOICES), size=int(rng.integers(1, 3)), replace=False))
            n_lines, n_sfx = int(rng.integers(len(voices), 4)), int(rng.integers(0, 3))
            beds = [b for b, p in (("ambience", 0.5), ("music", 0.3)) if rng.random() < p]
            if not 2 <= n_lines + n_sfx + len(beds) <= 5:
                continue
            events = [{"type": "speech", "voice": str(voices[i % len(voices)]), "text": random_line(rng),
                       "where": pick(rng, ["left", "right", "center", None, None])} for i in range(n_lines)]
            for _ in range(n_sfx):
                k = int(rng.integers(len(events) + 1))
                during = k > 0 and events[k - 1]["type"] == "speech" and rng.random() < 0.3
                events.insert(k, {"type": "sfx", "sound": pick(rng, list(SFX)), "during": during,
                                  "where": pick(rng, ["left", "right", None, None])})
            for i, e in enumerate(events):   # 'while' only right after a line (a later insert may split them)
                if e["type"] == "sfx":
                    e["during"] = e["during"] and events[i - 1]["type"] == "speech"
            if sum(derived_dur(e) for e in events if not e.get("during")) <= 4.6:
                beds = [{"type": b, "sound": pick(rng, list(SOUNDS[b]))} for b in beds]
                return {"kind": "story", "events": events, "beds": beds}

    def word_story(self, intent, rng):
        """A story intent in words: an opening, its events in order (a 'while' one joined to the
        line before it), then its beds."""
        parts = []
        for e in intent["events"]:
            where = pick(rng, WHERE_WORDS[e["where"]])
            clause = (pick(rng, SAY_WORDS).format(voice=e["voice"], text=e["text"], where=where) if e["type"] == "speech"
                      else pick(rng, SOUND_WORDS[e["sound"]][0]) + where)
            if e.get("during"):
                clause = parts.pop() + pick(rng, WHILE_WORDS).format(clause=clause)
            parts.append(clause)
        text = pick(rng, STORY_OPENINGS) + parts[0]
        for p in parts[1:]:
            j = pick(rng, STORY_JOINERS)
            text += j + (p[0].upper() + p[1:] if j.endswith(". ") else p)
        for b in intent["beds"]:
            text += pick(rng, BED_JOINERS).format(event=pick(rng, SOUND_WORDS[b["sound"]][0]))
        return text + "."

    def edit_intent(self, plan, rng, kind=None):
        """One edit of a random kind (or of `kind`) on a random source of the plan (ids in the intent)."""
        srcs = plan["sources"]
        kind = kind or pick(rng, EDIT_KINDS)
        if not srcs or kind == "remove" and len(srcs) == 1:   # an empty story, or a remove that would empty it
            kind = "add"
        if kind == "multi":   # two ops on different sources, at most one of them an add
            while True:       # redraw both: a fixed first op could admit no valid second one
                ops = [self.edit_intent(plan, rng, pick(rng, EDIT_KINDS[:-1])),
                       self.edit_intent(plan, rng, "add" if len(srcs) < 2 else pick(rng, EDIT_KINDS[:-1]))]
                adds, removes = ([op for op in ops if op["edit"] == e] for e in ("add", "remove"))
                targets = [op["target"] for op in ops if "target" in op]
                if len(adds) < 2 and len(removes) < len(srcs) and len(set(targets)) == len(targets) and \
                        not any(op.get("after") in targets for op in adds):
                    return {"kind": "edit", "edit": "multi", "ops": ops}
        if kind == "add":
            voices = sorted({s["voice"] for s in srcs if s["type"] == "speech"})
            choice = pick(rng, ["sfx", "sfx", "speech", "bed"])
            if choice == "speech":
                voice = pick(rng, voices) if len(voices) >= 2 or (voices and rng.random() < 0.5) else pick(rng, list(VOICES))
                new = {"type": "speech", "voice": voice, "text": random_line(rng, max_words=3)}
            elif choice == "bed" and not any(s["type"] in ("ambience", "music") for s in srcs):
                b = pick(rng, ["ambience", "music"])
                new = {"type": b, "sound": pick(rng, list(SOUNDS[b]))}
            else:   # a sound effect the story does not have yet
                new = {"type": "sfx", "sound": pick(rng, [s for s in SFX if s not in {x.get("sound") for x in srcs}])}
            op = {"kind": "edit", "edit": "add", "source": new, "when": None, "where": None}
            if new["type"] in ("speech", "sfx"):
                fg = [s for s in srcs if s["type"] in ("speech", "sfx")]
                op["when"] = pick(rng, [w for w in ("start", "end", "halfway", "after", None) if fg or w != "after"])
                op["where"] = pick(rng, ["left", "right", "center", None])
                if op["when"] == "after":
                    op["after"] = pick(rng, fg)["id"]
            return op
        target = pick(rng, srcs)
        op = {"kind": "edit", "edit": kind, "target": target["id"]}
        if kind == "change" and target["type"] != "speech":
            op["to"] = {"sound": pick(rng, [s for s in SOUNDS[target["type"]] if s != target["sound"]])}
        elif kind == "change" and rng.random() < 0.5:   # another voice, keeping the story at two voices at most
            others = sorted({s["voice"] for s in srcs if s["type"] == "speech" and s is not target})
            op["to"] = {"voice": pick(rng, [v for v in (others if len(others) >= 2 else VOICES) if v != target["voice"]])}
        elif kind == "change":
            op["to"] = {"text": random_line(rng, max_words=4)}
        elif kind == "volume":
            amount = pick(rng, [3, 6, 6, 10])
            can_up, can_down = target["gain_db"] + amount <= GAIN_RANGE[1], target["gain_db"] - amount >= GAIN_RANGE[0]
            up = can_up and (not can_down or rng.random() < 0.5)
            op.update(direction="up" if up else "down", amount=amount)
        elif kind == "move":
            op["where"] = pick(rng, [w for w in ("left", "right", "center") if w != side_of(target["pan"])])
        return op

    def refer(self, plan, sid, rng):
        """A phrase that picks out source sid unambiguously ("the bell", "the second bell", "ava",
        'the line "hello my friend"')."""
        s, ref = find(plan, sid, "refer"), ref_of(plan, sid)   # the designer's REF says what tells it apart
        if s["type"] == "speech":
            return pick(rng, REFER_WORDS["line" if ref[0] == '"' else "voice"]).format(**s)
        noun = pick(rng, SOUND_WORDS[s["sound"]][1])
        return noun if ref == s["sound"] else noun.replace("the ", f"the {ref.split()[0]} ", 1)

    def word_op(self, op, plan, rng):
        """One edit in words (EDIT_WORDS), lowercase, no final period."""
        if op["edit"] == "add":
            new = op["source"]
            kind = new["type"] if new["type"] in ("speech", "sfx") else "bed"
            words = {**new, "new": pick(rng, SOUND_WORDS[new["sound"]][2])} if "sound" in new else new
            what = pick(rng, EDIT_WORDS["add_" + kind]).format(**words)
            if kind == "bed":
                return what
            when = (pick(rng, AFTER_WORDS).format(ref=self.refer(plan, op["after"], rng)) if op["when"] == "after"
                    else pick(rng, WHEN_WORDS[op["when"]]))
            where = pick(rng, WHERE_WORDS[op["where"]])
            return what + (when + where if rng.random() < 0.5 else where + when)
        s, to = find(plan, op["target"], op["edit"]), op.get("to", {})   # a change's new voice, text or sound
        key = {"change": f"change_{next(iter(to), '')}", "volume": op.get("direction")}.get(op["edit"], op["edit"])
        how = pick(rng, HOW_WORDS[op["amount"]]) if "amount" in op else ""
        side = [pick(rng, ways) for ways in SIDE_WORDS[op["where"]]] if "where" in op else ("", "")
        words = dict(ref=self.refer(plan, s["id"], rng), voice=to.get("voice"), text=to.get("text"),
                     new=pick(rng, SOUND_WORDS[to["sound"]][2]) if "sound" in to else "", old_voice=s.get("voice"),
                     old_text=s.get("text"), how=how, how_=" " + how.strip() if how else "", to=side[0], on=side[1])
        return pick(rng, EDIT_WORDS[key]).format(**words)

    def word_edit(self, intent, plan, rng):
        """An edit intent in words: its one op, or its two joined (MULTI_WORDS); a sentence."""
        ops = [self.word_op(op, plan, rng) for op in intent.get("ops", [intent])]
        text = pick(rng, MULTI_WORDS).format(a=ops[0], b=ops[1]) if len(ops) == 2 else ops[0]
        return text[0].upper() + text[1:] + "."

EDIT_TOOLS = {"remove": "remove", "volume": "set_gain", "move": "set_pan", "change": "replace"}   # an edit's tool

class DesignerAgent:
    """The simulated sound designer: respond(plan, intent) -> tool calls. It reads the structured
    intent (an LLM agent would read the user's words and the plan) and says it as calls in the
    request's own terms; what the request leaves open (times, loudness, positions) is the studio's."""

    def respond(self, plan, intent):
        """(current plan or None, the user's intent) -> list of tool calls {"name", "args"}."""
        if intent["kind"] == "story":
            calls, lines = [{"name": "new_story", "args": {}}], []
            for e in intent["events"]:   # 'while' names the line just told: by its voice, or its words
                ref = lines and (lines[-1]["voice"] if [x["voice"] for x in lines].count(lines[-1]["voice"]) == 1
                                 else json.dumps(lines[-1]["text"]))
                calls.append(self.create(e, f"while {ref}" if e.get("during") else None, e["where"]))
                lines += [e] if e["type"] == "speech" else []
            return calls + [self.create(b, None, None) for b in intent["beds"]]
        calls = []
        for op in intent.get("ops", [intent]):
            e = op["edit"]
            if e == "add":
                at = f"after {ref_of(plan, op['after'])}" if op["when"] == "after" else op["when"]
                calls.append(self.create(op["source"], at, op["where"]))
                continue
            s = find(plan, op["target"], e)   # a line to change is named by its words, as the user does
            ref = json.dumps(s["text"]) if e == "change" and s["type"] == "speech" else ref_of(plan, s["id"])
            sign = 1 if op.get("direction") == "up" else -1
            args = ({"step": next(k for k, db in STEPS.items() if db == sign * op["amount"])} if e == "volume" else
                    {"side": op["where"]} if e == "move" else op.get("to", {}))
            calls.append({"name": EDIT_TOOLS[e], "args": {"ref": ref, **args}})
        return calls

    def create(self, src, at, side):
        """The call that creates src (dict with type and voice/text or sound), placed `at`, on `side`
        (both None for a bed)."""
        args = {k: src[k] for k in ("voice", "text", "sound") if k in src}
        args.update({k: v for k, v in (("at", at), ("side", side)) if v})
        return {"name": "speak" if src["type"] == "speech" else src["type"], "args": args}


# -----------------------------------------------------------------------------
# Part 5: dialogues
#
# A turn is {"role", "text", ...}: user turns carry the intent (and "audio" when the user supplies
# a clip); assistant audio turns carry the tool calls, the plan, its text and the index of the audio.

def transcript(plan):
    """Understanding answer, task transcribe: one line per utterance, by start time."""
    lines = sorted((s for s in plan["sources"] if s["type"] == "speech"), key=lambda s: (s["start"], s["voice"]))
    return "\n".join(f"{s['start']:.1f}-{s['start'] + s['dur']:.1f} {s['voice']}: {s['text']}" for s in lines)

def caption(plan):
    """Understanding answer, task describe: one line per source (its sound, or the voice for
    speech), by start time (ties by name)."""
    rows = sorted((s["start"], s["start"] + s["dur"], s.get("voice") or s["sound"]) for s in plan["sources"])
    return "\n".join(f"{a:.1f}-{b:.1f} {name}" for a, b, name in rows)

def _turn(plan, seed, phase, rng):
    """One user request + the designer's calls, run by the studio -> (text, intent, calls, new plan).
    The agents may propose the impossible (a line that no longer fits, a voice over itself): the
    studio refuses with a PlanError and the user asks for something else."""
    for _ in range(200):
        text, intent = UserAgent().request(phase, plan, rng)
        calls = DesignerAgent().respond(plan, intent)
        try:
            return text, intent, calls, run_calls(calls, plan, seed)
        except PlanError:
            continue
    raise RuntimeError(f"no feasible {phase} request found in 200 tries")

def understanding_turns(rng, audios):
    """The user supplies a fresh, independent scene and asks for its transcript or its caption
    -> [user turn, assistant turn]; the scene's audio is appended to audios."""
    text, intent = UserAgent().request("understand", None, rng)
    scene_seed = int(rng.integers(2 ** 31))
    scene = _turn(None, scene_seed, "story", rng)[3]
    audios.append(render(scene, scene_seed))
    answer = transcript(scene) if intent["task"] == "transcribe" else caption(scene)
    return [{"role": "user", "text": text, "audio": len(audios) - 1, "intent": {**intent, "scene_seed": scene_seed}},
            {"role": "assistant", "text": answer, "plan": scene}]

def make_dialogue(seed):
    """seed -> (dialogue dict (JSON-serialisable), audios: list of (2, N) float32). A story turn,
    1-2 edit turns (all rendered with the same seed, so untouched sources stay sample-identical),
    then an understanding turn about a fresh, independent scene. An assistant audio turn's text
    is its tool calls, its "tool" the studio's answer (plan_to_text), its "plan" that plan."""
    rng, plan, turns, audios = np.random.default_rng(seed), None, [], []
    for phase in ["story"] + ["edit"] * int(rng.integers(1, 3)):
        text, intent, calls, plan = _turn(plan, seed, phase, rng)
        audios.append(render(plan, seed))
        turns.append({"role": "user", "text": text, "intent": intent})
        turns.append({"role": "assistant", "text": "\n".join(map(call_to_text, calls)), "tool": plan_to_text(plan),
                      "plan": plan, "audio": len(audios) - 1})
    turns += understanding_turns(rng, audios)
    return {"seed": seed, "turns": turns}, audios

LISTENING_TURNS = (2, 6)   # understanding turns per listening dialogue (inclusive range)

def make_listening_dialogue(seed):
    """seed -> (dialogue, audios) like make_dialogue, but only understanding turns: 2-6 fresh
    scenes to transcribe or describe. Hearing is learned from clips, and these give more clips
    per simulated second than full dialogues, spread over the positions of a sequence."""
    rng, turns, audios = np.random.default_rng(seed), [], []
    for _ in range(int(rng.integers(LISTENING_TURNS[0], LISTENING_TURNS[1] + 1))):
        turns += understanding_turns(rng, audios)
    return {"seed": seed, "turns": turns}, audios


# -----------------------------------------------------------------------------
# Part 6: pictures -- spectrograms of both channels over the plan's timeline

def plot_story(wav, plan, path, title=None):
    """Save a PNG: the log-mel spectrogram (the codec's view) of the left and right channels of
    wav (2, N), and beneath them the plan (or None) as a timeline, one row per source."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    raw = AudioCodec().encode_raw(wav).numpy()          # (T, 64): 32 left mels ++ 32 right mels
    dur, vmax = wav.shape[-1] / SR, raw.max()
    srcs = sorted(plan["sources"], key=lambda s: (s["start"], s["id"])) if plan else []
    fig, axes = plt.subplots(3, 1, figsize=(10, 5.5 + 0.3 * len(srcs)), sharex=True,
                             gridspec_kw={"height_ratios": [2, 2, 0.6 + 0.35 * max(1, len(srcs))]})
    for ax, ch, name in ((axes[0], raw[:, :32], "left"), (axes[1], raw[:, 32:], "right")):
        ax.imshow(ch.T, origin="lower", aspect="auto", extent=(0, dur, 0, 32), cmap="magma", vmin=vmax - 12, vmax=vmax)
        ax.set_ylabel(f"{name}\nmel band")
    for row, s in enumerate(srcs):
        label = f"{s['id']} {s['voice']}: {s['text']}" if s["type"] == "speech" else f"{s['id']} {s['sound']}"
        axes[2].barh(row, s["dur"], left=s["start"], color=f"C{TYPES.index(s['type'])}", alpha=0.8)
        axes[2].text(s["start"] + 0.03, row, f"{label}  ({s['gain_db']} dB, pan {s['pan']:+.1f})", va="center", fontsize=8)
    axes[2].set(ylim=(len(srcs) - 0.5, -0.5), yticks=[], xlim=(0, dur), xlabel="time (s)")
    axes[0].set_title(title or "", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Part 7: the dataset writer and the demo

SPLIT_SEEDS = {"train": 0, "val": 10_000_000, "test": 20_000_000, "listen": 30_000_000}  # disjoint (+ seed * 100M)
SHARD = 500   # dialogues per shard file

def _simulate(job):
    """Worker: (split, seed) -> (dialogue as JSON text, [raw log-mel (T, 64) float16 per audio])."""
    split, seed = job
    dialogue, audios = (make_listening_dialogue if split == "listen" else make_dialogue)(seed)
    codec = AudioCodec()
    return json.dumps(dialogue), [codec.encode_raw(a).to(torch.float16) for a in audios]

def write_dataset(out, n, n_eval=None, seed=0, workers=None, n_listen=0):
    """Simulate n train dialogues, n_listen listening dialogues (split "listen") and n_eval val and
    test dialogues each (default n // 10 within 20..200) into out/ as shards of raw log-mel frames;
    fit the codec statistics (first 1000 train dialogues) and the BPE (first 2000) on train; write
    meta.json last, so its presence marks a complete dataset. -> dialogues simulated per second."""
    from tqdm import tqdm
    n_eval = min(200, max(20, n // 10)) if n_eval is None else n_eval
    os.makedirs(out, exist_ok=True)
    counts, seeds, train_text, train_raw = {}, {}, [], []
    t0 = time.time()
    with mp.Pool(workers or os.cpu_count(), torch.set_num_threads, (1,)) as pool:   # a process per core, 1 thread each
        for split, count in (("train", n), ("listen", n_listen), ("val", n_eval), ("test", n_eval)):
            if count == 0:
                continue
            first = seed * 100_000_000 + SPLIT_SEEDS[split]
            seeds[split], counts[split] = [first, first + count], count
            dialogues, audio = [], []
            jobs = pool.imap(_simulate, [(split, s) for s in range(first, first + count)], chunksize=4)
            for i, (text, latents) in enumerate(tqdm(jobs, total=count, desc=split, unit="dialogue")):
                dialogues.append(text)
                audio.append(latents)
                if split == "train" and i < 2000:
                    train_text += [t["text"] for t in json.loads(text)["turns"]]
                    train_raw += [x.float() for x in latents] if i < 1000 else []
                if len(dialogues) == SHARD or i == count - 1:
                    torch.save({"dialogues": dialogues, "audio": audio}, os.path.join(out, f"{split}_{i // SHARD:04d}.pt"))
                    dialogues, audio = [], []
    rate = (n + n_listen + 2 * n_eval) / (time.time() - t0)
    tok = BPETokenizer()
    tok.train(train_text, vocab_size=1024)
    tok.save(os.path.join(out, "tokenizer.json"))
    meta = {"counts": counts, "sr": SR, "seeds": seeds, "shard_size": SHARD,
            "codec": AudioCodec().fit(train_raw).state_dict()}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    return rate

def write_demo(out, seeds=(1, 2, 3)):
    """A few complete dialogues a person can inspect: markdown, and a wav and a png per audio."""
    import soundfile as sf
    os.makedirs(out, exist_ok=True)
    for k, seed in enumerate(seeds):
        dialogue, audios = make_dialogue(seed)
        turns, md = dialogue["turns"], [f"# Dialogue {k} (seed {seed})", ""]
        for i, t in enumerate(turns):
            if t["role"] == "user":
                md += [f"**user:** {t['text']}", "", f"intent: `{json.dumps(t['intent'])}`", ""]
            else:   # an audio turn's text is its tool calls (the chain of thought), its "tool" the studio's plan
                md += ["**assistant** (tool calls):" if "tool" in t else "**assistant:**", "", "```", t["text"], "```", ""]
                md += ["**tool** (the studio's plan):", "", "```", t["tool"], "```", ""] if "tool" in t else []
            if "audio" in t:   # a user's clip is described by the plan of the assistant turn after it
                name = f"dialogue_{k}_audio_{t['audio']}"
                sf.write(os.path.join(out, name + ".wav"), audios[t["audio"]].T, SR)
                plot_story(audios[t["audio"]], t.get("plan") or turns[i + 1]["plan"], os.path.join(out, name + ".png"),
                           title=f"dialogue {k}, audio {t['audio']} ({t['role']})")
                md += [f"audio: `{name}.wav`", "", f"![]({name}.png)", ""]
        with open(os.path.join(out, f"dialogue_{k}.md"), "w") as f:
            f.write("\n".join(md))
    print(f"wrote {len(seeds)} dialogues (markdown, wav, png) to {out}/")

def main(argv):
    """python simulate_data.py DATA_DIR | python simulate_data.py --demo OUT_DIR"""
    if len(argv) == 1 and not argv[0].startswith("-"):
        rate = write_dataset(argv[0], n=N_TRAIN, n_listen=N_LISTEN)   # exactly train.py's dataset
        print(f"simulated {N_TRAIN} train + {N_LISTEN} listen + val + test dialogues ({rate:.1f} / s) -> {argv[0]}/")
    elif len(argv) == 2 and argv[0] == "--demo" and not argv[1].startswith("-"):
        write_demo(argv[1])
    else:
        sys.exit(f"error: usage: python simulate_data.py DATA_DIR | python simulate_data.py --demo OUT_DIR "
                 f"(got {' '.join(argv) or 'no arguments'})")


if __name__ == "__main__":
    main(sys.argv[1:])
