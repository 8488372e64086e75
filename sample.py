"""
Chat with a trained AudioChat-mini: tell a story, edit it, understand audio — all in one dialogue.

    python sample.py --ckpt out/ckpt.pt --prompt "Tell a story: ava says \"the dog runs home\" in the rain." \
                     --edit "Make the rain quieter." --out_dir out/chat
    python sample.py --ckpt out/ckpt.pt --understand story.wav --request "Who says what, and when?"
    python sample.py --ckpt out/ckpt.pt                  # interactive: type a request, /edit, /understand FILE, /quit

Each audio turn prints the model's tool calls and writes `turn_K.wav`, `turn_K.json` (the
studio's plan) and `turn_K.png` (both channels' spectrograms with the plan's sources as a
timeline) into --out_dir.

How a turn runs (the same sequence layout as training, tokenizer.encode_dialogue):
  1. the user's words are appended to the KV cache;
  2. the tool calls (chain of thought) are decoded greedily, token by token, through the
     understanding layers only (SCT's cheap text path), until the model hands them to the tool;
  3. the studio (simulate_data.run_calls) lays them out; its plan is fed back as the tool's message,
     an audio span of the plan's duration is opened, and the audio is sampled after the cached
     prefix with DPM-Solver++ (or DDIM) and classifier-free guidance (diffusion.sample_audio);
  4. the clean audio is committed to the cache, so the next edit conditions on it, as in training.
A model trained with --cot=false (the paper's "no CoT" baseline) skips 2 and 3: its audio span
follows the request directly, NO_PLAN_DURATION long for a story, as long as the story for an edit.

Read line by line: Chat (_feed, _decode, generate, understand). Skim: load_audio / resample,
save_turn and the command line.
"""
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from tokenizer import HOP, PATCH, SPECIAL_TOKENS, AudioCodec
from simulate_data import MAX_DURATION, PlanError, parse_calls, plan_to_text, plot_story, run_calls
from world import SR
from diffusion import SAMPLERS, check_sampling, sample_audio
from train import load_checkpoint, one_line, opt, parse_config, pick_device

NO_PLAN_DURATION = 4.7   # s: a story's length without a chain of thought (no plan says it): the data's mean
TIMED_LINE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*-\s*(\d+(?:\.\d*)?)\s+(.+?)\s*$")   # an answer's "{start}-{end} {rest}"


# -----------------------------------------------------------------------------
# reading any audio the user hands us

def resample(wav, sr_in, sr_out=SR, zero_crossings=16):
    """(C, N) at sr_in Hz -> (C, round(N * sr_out / sr_in)) at sr_out Hz, by windowed-sinc
    interpolation: each output sample is a Hann-windowed sinc-weighted sum of the input samples
    within `zero_crossings` lobes of it, low-passed at the lower of the two Nyquist rates. Samples
    beyond either end count as silence, so the end of a clip never leaks into its start (as a
    periodic, FFT-based resampler's would)."""
    if sr_in == sr_out:
        return wav
    ratio = sr_out / sr_in
    cutoff = min(1.0, ratio)                 # of the input's Nyquist: no aliasing when downsampling
    reach = zero_crossings / cutoff          # kernel half-width, in input samples
    taps = np.arange(-int(reach), int(reach) + 2)
    N, n_out = wav.shape[-1], int(round(wav.shape[-1] * ratio))
    out = np.zeros(wav.shape[:-1] + (n_out,), dtype=np.float32)
    for start in range(0, n_out, 4096):      # in chunks: the (outputs, taps) weights stay small
        t = np.arange(start, min(start + 4096, n_out)) / ratio       # output times, in input samples
        idx = np.floor(t)[:, None].astype(np.int64) + taps            # (n, taps) input samples used
        x = t[:, None] - idx
        h = cutoff * np.sinc(cutoff * x) * np.where(np.abs(x) < reach, 0.5 + 0.5 * np.cos(np.pi * x / reach), 0.0)
        h = h * ((idx >= 0) & (idx < N))
        out[..., start:start + len(t)] = (wav[..., idx.clip(0, N - 1)] * h).sum(-1)
    return out

def load_audio(audio):
    """A wav path or an array (N,), (N, C) or (C, N) at SR -> stereo float32 (2, N) at SR, N a
    multiple of 0.1 s. Other sample rates are resampled, mono is duplicated to stereo, longer than
    MAX_DURATION is refused with a clear message (ValueError)."""
    if isinstance(audio, (str, os.PathLike)):
        import soundfile as sf
        if not os.path.isfile(audio):
            raise ValueError(f"{audio!r} is {'a folder' if os.path.isdir(audio) else 'not there'}: give a wav file")
        try:
            wav, sr = sf.read(audio, dtype="float32", always_2d=True)
        except Exception as e:
            raise ValueError(f"cannot read {audio!r} as audio ({one_line(e)})")
        wav = wav.T
    else:
        wav, sr = np.asarray(audio), SR
        if np.issubdtype(wav.dtype, np.integer):   # PCM samples: scale to [-1, 1] as a wav reader would
            wav = wav / float(np.iinfo(wav.dtype).max)
        if not np.issubdtype(wav.dtype, np.floating):
            raise ValueError(f"expected a wav path or an array of real samples, got {type(audio).__name__} of {wav.dtype}")
        wav = wav.astype(np.float32)
        if wav.ndim == 1:
            wav = wav[None]
        elif wav.ndim == 2 and wav.shape[0] > 2:   # (N, C): channels last
            wav = wav.T
    if wav.ndim != 2 or wav.shape[0] not in (1, 2):
        raise ValueError(f"expected mono or stereo audio, got shape {tuple(wav.shape)}")
    if wav.shape[1] == 0:
        raise ValueError("the audio is empty (0 samples)")
    if not np.isfinite(wav).all():
        raise ValueError("the audio contains NaN or infinite samples")
    if np.abs(wav).max() > 100:
        raise ValueError(f"the audio's samples reach {np.abs(wav).max():.3g}: expected a waveform in [-1, 1]")
    seconds = wav.shape[1] / sr
    if seconds > MAX_DURATION:
        raise ValueError(f"the audio is {seconds:.1f} s long; this model understands at most {MAX_DURATION:.0f} s")
    wav = resample(wav, sr)
    if wav.shape[0] == 1:
        wav = np.repeat(wav, 2, axis=0)
    tenth = SR // 10  # whole tenths of a second: whole patches, as in training
    n = max(tenth, -(-wav.shape[1] // tenth) * tenth)
    return np.pad(wav, ((0, 0), (0, n - wav.shape[1])))


# -----------------------------------------------------------------------------
# the chat

@dataclass
class Turn:
    """What one assistant turn produced."""
    text: str                # the tool calls, or the answer
    plan: dict = None        # the studio's plan, or None
    wav: np.ndarray = None   # stereo (2, N) at SR, or None
    error: str = None        # the message, when the studio refused the calls
    failure: str = None      # and that PlanError's kind (simulate_data.PLAN_ERROR_KINDS)
    seconds: float = 0.0     # wall-clock time of the turn
    past_end: int = 0        # answer lines that placed sound past the clip's end (dropped, or cut at it)

class Chat:
    """One dialogue with the model. generate(instruction) starts a story, edit(instruction) changes
    the last one, understand(audio, request) answers about a clip; every turn conditions on the
    whole dialogue so far, exactly as in training.

        chat = Chat.from_checkpoint("out/ckpt.pt")
        story = chat.generate('Tell a story: ava says "the dog runs home" in the rain.')
        quieter = chat.edit("Make the rain quieter.")
        answer = chat.understand("clip.wav", "Who says what, and when?").text
    """

    def __init__(self, model, tok, codec, sampler="dpmpp", steps=25, cfg_scale=3.0, seed=0, max_new_tokens=400):
        check_sampling(sampler, steps)   # before the dialogue starts, not at its first audio span
        self.model, self.tok, self.codec = model.eval(), tok, codec
        self.sampler, self.steps, self.cfg_scale, self.max_new_tokens = sampler, steps, cfg_scale, max_new_tokens
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.guided, self.full = cfg_scale != 1.0, False
        self.seed, self.plan = seed, None   # the studio's layout seed and the current story's plan
        self.duration = None                # without a chain of thought: the current story's length, s
        # row 0: the dialogue; row 1 (with guidance): the same dialogue with every word -> <|null|>
        self.cache = model.new_cache(2 if self.guided else 1)
        self.ids = {name: tok.special(name) for name in SPECIAL_TOKENS}

    @classmethod
    def from_checkpoint(cls, path, device="auto", **kwargs):
        model, tok, codec, _ = load_checkpoint(path, pick_device(device))
        return cls(model, tok, codec, **kwargs)

    # ---- the cache, fed one chunk at a time ----

    def _check_room(self, n):
        """A turn that overflows the dialogue ends it: the cache would hold half a turn."""
        if self.full or len(self.cache) + n > self.model.config.block_size:
            self.full = True
            raise ValueError(f"the dialogue is full ({self.model.config.block_size} tokens): start a new Chat")

    def _feed(self, ids, plain, layers="text"):
        """Append text ids (a list) to the dialogue; plain marks words (nulled in the guidance row).
        -> the text logits of the last position, (V,)."""
        rows = [ids] + ([[self.ids["<|null|>"] if p else i for i, p in zip(ids, plain)]] if self.guided else [])
        tokens = torch.tensor(rows, device=self.device)
        (B, n), dev = tokens.shape, self.device
        self._check_room(n)
        logits, _ = self.model.extend(self.cache, tokens, torch.zeros(B, n, self.model.config.latent_dim, device=dev),
                                      torch.zeros(B, n, device=dev), torch.full((B, n), -1, device=dev), layers=layers)
        return logits[0, -1]

    def _say(self, *names):
        """Append special tokens, by name, as one chunk. -> the last one's text logits, (V,)."""
        return self._feed([self.ids[name] for name in names], [False] * len(names))

    def _user(self, text, then):
        """Open a user turn: <|user|> and the user's words. ValueError, before anything enters the
        dialogue, if the words are empty or not text, or if they and `then` more tokens would not fit."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"the request is empty: say what you want (got {text!r})")
        try:
            words = self.tok.encode_ordinary(text)
        except UnicodeError as e:
            raise ValueError(f"the request is not valid text ({e.reason})") from None
        self._check_room(len(words) + then)
        self._say("<|user|>")
        self._feed(words, [True] * len(words))

    def _feed_audio(self, z):
        """Commit a clean audio span z: (T // PATCH, 128) (the user's clip) to the cache."""
        n = z.shape[0]
        rows = 2 if self.guided else 1
        self._check_room(n)
        self.model.extend(self.cache, torch.full((rows, n), self.ids["<|pad|>"], device=self.device),
                          z[None].expand(rows, -1, -1).to(self.device), torch.zeros(rows, n, device=self.device),
                          torch.zeros(rows, n, dtype=torch.long, device=self.device), layers="all")

    @torch.no_grad()
    def _decode(self, logits):
        """Greedy decoding (the paper) until <|tool|>, <|audio|> or <|end|>. -> (text, stop id)."""
        out = []
        for _ in range(self.max_new_tokens):
            next_id = int(logits.argmax())
            special = next_id in (self.ids["<|tool|>"], self.ids["<|audio|>"], self.ids["<|end|>"])
            logits = self._feed([next_id], [not special])
            if special:
                return self.tok.decode(out), next_id
            out.append(next_id)
        self._say("<|end|>")
        return self.tok.decode(out), self.ids["<|end|>"]

    # ---- the turns ----

    @torch.no_grad()
    def generate(self, instruction):
        """A story from an instruction, or (as `edit`) a change to the last story: tool calls, the
        studio's plan, then audio that hears any earlier audio. -> Turn; ValueError for an empty
        instruction or a full dialogue."""
        start = time.time()
        self._user(instruction, then=3)   # <|user|>, <|end|>, <|assistant|>
        if not self.model.config.cot:   # the paper's "no CoT" baseline: the audio follows the request directly
            self._say("<|end|>", "<|assistant|>")
            self.duration = self.duration or NO_PLAN_DURATION   # an edit keeps the story's length
            wav = self._audio([], self.duration)
            return Turn(text="", wav=wav, seconds=time.time() - start)
        text, stop = self._decode(self._say("<|end|>", "<|assistant|>"))
        try:
            if stop != self.ids["<|tool|>"]:
                raise PlanError("the model wrote no tool calls for the studio", "syntax")
            plan = run_calls(parse_calls(text), self.plan, self.seed)
        except PlanError as e:   # close the turn with no audio; the story stays as it was
            close = {self.ids["<|tool|>"]: ["<|end|>"], self.ids["<|audio|>"]: ["<|/audio|>", "<|end|>"]}.get(stop)
            if close:
                self._say(*close)
            return Turn(text=text, error=f"the studio refused the calls: {e}", failure=e.kind, seconds=time.time() - start)
        wav = self._audio(self.tok.encode_ordinary(plan_to_text(plan)), plan["duration"])
        self.plan = plan
        return Turn(text=text, plan=plan, wav=wav, seconds=time.time() - start)

    def _audio(self, tool, duration):
        """Feed the tool's answer (ids) and <|audio|>, sample a span of `duration` s and close the
        turn. -> wav (2, N) at SR."""
        n_tokens = round(duration * SR / HOP) // PATCH
        self._check_room(len(tool) + n_tokens + 3)   # the plan, <|audio|>, the span, <|/audio|>, <|end|>
        self._feed(tool + [self.ids["<|audio|>"]], [True] * len(tool) + [False])
        z = sample_audio(self.model, self.cache, n_tokens, steps=self.steps, sampler=self.sampler,
                         cfg_scale=self.cfg_scale, generator=self.generator)[0]
        self._say("<|/audio|>", "<|end|>")
        return self.codec.decode(AudioCodec.unpatchify(z.float().cpu())).numpy()

    edit = generate   # the same turn: the tool calls say whether they start a story or change it

    @torch.no_grad()
    def given(self, instruction, calls, plan, wav):
        """Commit an audio turn made elsewhere (ground truth's) as if the model had made it: the
        request, the calls and the studio's plan (none without a chain of thought), then the clean
        audio wav (2, N) at SR. The paper's Table 5 edits from it. ValueError if it does not fit."""
        z = AudioCodec.patchify(self.codec.encode(torch.as_tensor(wav)))
        calls, tool = (self.tok.encode_ordinary(calls), self.tok.encode_ordinary(plan_to_text(plan))) if self.model.config.cot \
            else ([], [])
        self._user(instruction, then=len(calls) + len(tool) + len(z) + 6)
        self._say("<|end|>", "<|assistant|>")
        if self.model.config.cot:
            self._feed(calls + [self.ids["<|tool|>"]] + tool, [True] * len(calls) + [False] + [True] * len(tool))
        self._say("<|audio|>")
        self._feed_audio(z)
        self._say("<|/audio|>", "<|end|>")
        self.plan, self.duration = plan, plan["duration"]

    @torch.no_grad()
    def understand(self, audio, request="Who says what, and when?"):
        """Audio (a wav path or an array, see load_audio) + a request -> Turn whose text is the
        answer (a timed transcript, or every sound with its time span), kept inside the clip (within_clip;
        the dialogue keeps what the model wrote). ValueError for unreadable audio or an empty request,
        before anything enters the dialogue."""
        start = time.time()
        z = AudioCodec.patchify(self.codec.encode(load_audio(audio)))
        self._user(request, then=len(z) + 5)   # <|user|>, the clip in its markers, <|end|>, <|assistant|>
        self._say("<|audio|>")
        self._feed_audio(z)
        text, stop = self._decode(self._say("<|/audio|>", "<|end|>", "<|assistant|>"))
        if stop == self.ids["<|audio|>"]:  # an answer is text only: close the span the model opened
            self._say("<|/audio|>", "<|end|>")
        text, past_end = within_clip(text, len(z) * PATCH * HOP / SR)
        return Turn(text=text, past_end=past_end, seconds=time.time() - start)


def timed_line(line):
    """One answer line "{start}-{end} {rest}" (s) with start <= end -> its TIMED_LINE match, else None."""
    m = TIMED_LINE.match(line)
    return m if m and float(m[1]) <= float(m[2]) else None

def timed_lines(text):
    """An answer's timed lines -> [(start, end, rest)]; other lines are dropped."""
    return [(float(m[1]), float(m[2]), m[3]) for m in map(timed_line, text.splitlines()) if m]

def within_clip(answer, seconds):
    """An answer about a clip of `seconds` s -> (the answer, n): a timed line that starts at or past the
    clip's end is dropped, one that runs past it ends there; n counts them (0: the answer as it came).
    What the clip does not contain cannot be heard in it, so such a line is wrong whatever its words."""
    end, lines, n = math.floor(seconds * 10 + 1e-6) / 10, [], 0   # answers give times to 0.1 s
    for line in answer.splitlines(keepends=True):
        m = timed_line(line)
        if m and float(m[2]) > end + 1e-6:
            n += 1
            if float(m[1]) >= end:
                continue
            ending = line[len(line.rstrip("\r\n")):]
            line = f"{m[1]}-{end:.1f} {m[3]}{ending}"
        lines.append(line)
    return "".join(lines) if n else answer, n


# -----------------------------------------------------------------------------
# writing a turn for people: wav, plan, picture

def save_turn(turn, out_dir, name):
    """Write name.wav, name.json (the plan) and name.png (spectrograms + plan timeline). -> paths."""
    import soundfile as sf
    os.makedirs(out_dir, exist_ok=True)
    base, paths = os.path.join(out_dir, name), []
    if turn.plan is not None:
        paths.append(base + ".json")
        with open(base + ".json", "w") as f:
            json.dump(turn.plan, f, indent=1)
    if turn.wav is not None:
        paths += [base + ".wav", base + ".png"]
        sf.write(base + ".wav", turn.wav.T, SR)
        plot_story(turn.wav, turn.plan, base + ".png", title=name)
    return paths

def report(turn, out_dir, name):
    """Print a turn (the model's text and the studio's plan, or the refusal) and save its files."""
    print(f"[{name}] {turn.error}\n  model wrote: {turn.text[:300]}" if turn.error else f"[{name}] {turn.text}")
    if turn.past_end:
        print(f"  ({turn.past_end} line(s) of the answer placed sound past the clip's end: dropped, or cut at it)")
    if turn.plan:
        print("  studio: " + plan_to_text(turn.plan).replace("\n", "\n          "))
    for path in save_turn(turn, out_dir, name):
        print(f"  wrote {path}")


# -----------------------------------------------------------------------------
# command line

@dataclass
class SampleConfig:
    ckpt: str = opt("out/ckpt.pt", "checkpoint written by train.py")
    prompt: str = opt("", "story instruction (none and no --understand: interactive chat)")
    edit: list = opt(None, "edit instruction applied after the story; repeat for several")
    understand: str = opt("", "a wav file to understand (any sample rate, mono or stereo)")
    request: str = opt("Who says what, and when?", "what to ask about the --understand audio")
    out_dir: str = opt("out/chat", "where turn_K.wav/.json/.png go")
    sampler: str = opt("dpmpp", "DPM-Solver++(2M) on a Karras schedule, or DDIM", choices=tuple(SAMPLERS))
    steps: int = opt(25, "diffusion steps per audio span", lo=1, hi=1000)
    cfg: float = opt(3.0, "classifier-free guidance scale (1 = none)", lo=0.0, hi=20.0)
    seed: int = opt(0, "seed of the audio noise", lo=0, hi=2**31 - 1)
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")

def main(argv):
    config = parse_config(SampleConfig, argv)
    if config.edit and not config.prompt:
        sys.exit("error: --edit changes a story: give the story with --prompt too")
    if any(not e.strip() for e in config.edit or []):   # before the model loads and the story is told
        sys.exit("error: an --edit is empty: say what to change")
    if config.understand and (config.prompt or config.edit):
        sys.exit("error: --understand asks about a clip on its own: leave out --prompt and --edit")
    chat = Chat.from_checkpoint(config.ckpt, config.device, sampler=config.sampler, steps=config.steps,
                                cfg_scale=config.cfg, seed=config.seed)
    try:
        if config.understand:
            return report(chat.understand(config.understand, config.request), config.out_dir, "turn_0")
        if config.prompt:
            report(chat.generate(config.prompt), config.out_dir, "turn_0")
            for k, instruction in enumerate(config.edit or [], start=1):
                report(chat.edit(instruction), config.out_dir, f"turn_{k}")
            return
    except ValueError as e:
        sys.exit(f"error: {e}")
    print("AudioChat-mini. Type a story request; '/edit TEXT' edits it, '/understand FILE [REQUEST]' "
          "asks about a wav, '/quit' ends.")
    k = 0
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        except UnicodeDecodeError:
            print("error: that line is not valid UTF-8 text")
            continue
        if not line:
            continue
        if line == "/quit":
            break
        try:
            command, _, rest = line.partition(" ")
            if command == "/understand":
                path, _, request = rest.strip().partition(" ")
                if not path:
                    raise ValueError("say which wav: /understand FILE [REQUEST]")
                turn = chat.understand(path, request or config.request)
            elif command == "/edit":
                if chat.plan is None and chat.duration is None:
                    raise ValueError("there is no story to edit yet: ask for one first")
                turn = chat.edit(rest)
            elif command.startswith("/"):
                raise ValueError(f"unknown command {command}: /edit TEXT, /understand FILE [REQUEST], /quit")
            else:
                turn = chat.generate(line)
        except ValueError as e:  # bad audio, full dialogue: say so and keep chatting
            print(f"error: {e}")
            continue
        report(turn, config.out_dir, f"turn_{k}")
        k += 1

if __name__ == "__main__":
    main(sys.argv[1:])
