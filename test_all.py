"""
Every test of AudioChat-mini, in the lecture's order (world, tokenizers, model, loss and samplers, caches, training
and chat, evaluation): known answers (read first: BPE, the mask, the loss by hand, the Gaussian sampler), equivalences
(backends, caches, test_chat_feeds_the_model_the_training_sequence), properties of metrics and edits, real commands.

    python test_all.py            # all, on a CPU in a few minutes; ends "N passed, M failed, K skipped"
    python test_all.py codec bpe  # the tests whose name contains one of these words
    python -m pytest test_all.py  # the same under pytest
"""
import contextlib, functools, io, itertools, json, os, random, re, subprocess, sys, tempfile, time
import traceback, warnings
from unittest import mock

os.environ.setdefault("OMP_NUM_THREADS", "2")  # the suite is sized for a 2-core machine
os.environ.setdefault("TQDM_DISABLE", "1")     # progress bars are for people, not for the test log
import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import eval as E
import simulate_data
import train
from simulate_data import (EDIT_KINDS, LISTENING_TURNS, MAX_DURATION, PLAN_ERROR_KINDS, SPLIT_SEEDS, PlanError,
                           UserAgent, call_to_text, caption, dry_signal, make_dialogue, make_listening_dialogue,
                           parse_calls, plan_to_text, render, run_calls, transcript, validate_plan)
from world import AMBIENCES, MUSIC, SFX, SR, VOCAB, VOICES, WORD_CODES, speech_duration, synth_speech
from tokenizer import BPETokenizer, AudioCodec, encode_dialogue, SPECIAL_TOKENS, HOP, FRAME_RATE, N_MELS, PATCH, LATENT_DIM
from model import AudioChatModel, ModelConfig, rotary, rotate, span_positions, transfusion_mask
from diffusion import add_noise, alpha_sigma, cfg, ddim_sample, dpmpp_2m_sample, sample_audio, sample_noise_levels, \
    shift_noise_level, transfusion_forcing_loss
from train import collate, parse_config
from sample import NO_PLAN_DURATION, Chat, SampleConfig, load_audio, save_turn, within_clip

TMP = tempfile.mkdtemp(prefix="audiochat_test_")  # scratch space shared by the tests of one run

class Skip(Exception):
    """Raised by a test that cannot run on this machine: the runner counts it as skipped."""
if "pytest" in sys.modules:   # under pytest a skip is pytest's own, so that pytest reports it
    Skip = sys.modules["pytest"].skip.Exception  # noqa: F811 (pytest's skip)

def raises(exc, fn, *words):
    """fn() must raise exc with every word in its message -> the exception."""
    try:
        fn()
    except exc as e:
        assert all(w in str(e) for w in words), f"{e!r} should mention {words}"
        return e
    raise AssertionError(f"expected {exc.__name__} mentioning {words}")

def expect_exit(fn, *words):
    """fn() must end in sys.exit with one line "error: ..." holding every word."""
    msg = str(raises(SystemExit, fn, *words))
    assert msg.startswith("error:") and "\n" not in msg, msg

@contextlib.contextmanager
def one_thread():
    """Ops this small only lose time to thread hand-offs (badly on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# the toy audio world (world.py) and the data simulator (simulate_data.py)

def _good_plan():
    return {"duration": 5.0, "sources": [
        {"id": 1, "type": "speech", "voice": "ava", "text": "the old dog runs home", "start": 0.4,
         "dur": speech_duration("ava", "the old dog runs home"), "gain_db": 0, "pan": -0.4},
        {"id": 2, "type": "sfx", "sound": "dog_bark", "start": 2.6, "dur": 0.5, "gain_db": -4, "pan": 0.6},
        {"id": 3, "type": "ambience", "sound": "rain", "start": 0.0, "dur": 5.0, "gain_db": -20, "pan": 0.0},
        {"id": 4, "type": "music", "sound": "piano", "start": 0.0, "dur": 5.0, "gain_db": -22, "pan": 0.0}]}

def test_validate_plan_and_tool_calls_refuse_with_the_kinds_eval_counts():
    """A wrong plan or turn of calls is a PlanError of a kind eval counts (never a TypeError); the plan stays as it was."""
    validate_plan(_good_plan())
    src = lambda i, **kw: lambda p: p["sources"][i].update(**kw)  # noqa: E731
    for mutate, kind, sid in [
            (src(1, start=4.8), "past_end", 2), (src(1, start=-0.5), "past_end", 2), (src(1, dur=0.9), "other", 2),
            (lambda p: p.update(duration=12.0), "past_end", 0), (src(0, dur=1.0), "other", 1), (src(1, pan=1.5), "other", 2),
            (lambda p: p["sources"].append(dict(p["sources"][0], id=5, start=0.9, pan=0.0)), "self_overlap", 5),
            (src(1, gain_db=12), "other", 2), (src(0, voice="zed"), "malformed", 0),
            (src(1, sound="meteor"), "malformed", 0), (src(2, sound="dog_bark"), "malformed", 0)]:
        p = _good_plan()
        mutate(p)
        assert raises(PlanError, lambda: validate_plan(p), *([f"source {sid}"] if sid else [])).kind == kind, (kind, p)
    story = parse_calls('new_story()\nspeak(ava, "the old dog runs home", left)\nsfx(dog_bark, while ava)\nambience(rain)')
    plan, again = run_calls(story, None, seed=0), run_calls(story, None, seed=0)   # a pure function of (calls, plan, seed)
    line, bark, rain = plan["sources"]
    assert plan == again != run_calls(story, None, seed=1) and [s["id"] for s in plan["sources"]] == [1, 2, 3]
    assert line["pan"] <= -0.5 and rain["dur"] == plan["duration"]   # on the left; the bed covers the story
    assert line["start"] <= bark["start"] < line["start"] + line["dur"]   # the bark while the line plays
    for kind, texts in {
            "syntax": ["hello", "speak(ben", 'speak(zed, "hi")', "", "remove(the bell)"],
            "unknown_ref": ["remove(3)", "set_gain(ben, louder)", "sfx(bell, after bell)", "remove(second dog_bark)",
                            'remove("go home")', "remove(rain)\nset_gain(rain, louder)"],
            "malformed": ['shout(ben, "go home")', 'speak(ben, "the old dragon")', "speak(ben)", "ambience(dog_bark)",
                          "replace(ava, rain)", "set_pan(ava, left, right)"],
            "self_overlap": ['speak(ava, "hello my friend", while ava)'],
            "past_end": ["new_story()\n" + "\n".join(['speak(dan, "the old dog runs home")'] * 4)],
            "other": ["\n".join(["set_gain(rain, much louder)"] * 4), "new_story()\nsfx(bell, end)", "sfx(bell)\nnew_story()"],
    }.items():
        for text in texts:
            assert raises(PlanError, lambda: run_calls(parse_calls(text), plan, seed=0)).kind == kind, text
    assert plan == again and raises(PlanError, lambda: run_calls(parse_calls("remove(ava)"), None, 0)).kind == "other"
    two = run_calls(parse_calls("sfx(dog_bark, end)"), plan, 0)   # two barks: the user says which, and so does a REF
    for ref, sid in [("first dog_bark", 2), ("second dog_bark", 4), ('"the old dog runs home"', 1), ("ava", 1)]:
        assert {s["id"] for s in run_calls(parse_calls(f"remove({ref})"), two, 0)["sources"]} == {1, 2, 3, 4} - {sid}, ref
    assert raises(PlanError, lambda: run_calls(parse_calls("remove(dog_bark)"), two, 0), "2 sources").kind == "unknown_ref"
    rng = np.random.default_rng(0)   # any text at all: calls that run, or a PlanError
    pieces = ["speak(", "sfx(", "remove(", "set_gain(", "replace(", "new_story()", ")", ", ", '"', "ava", "bell", "home",
              "after ava", "while ben", "much quieter", "left", "\n", "second bell", "x"]
    for _ in range(300):
        try:
            run_calls(parse_calls("".join(pieces[i] for i in rng.integers(len(pieces), size=rng.integers(1, 12)))), plan, 0)
        except PlanError as e:
            assert e.kind in PLAN_ERROR_KINDS

def test_tool_calls_of_every_dialogue_replay_to_its_plans():
    """Every audio turn's calls replay to its plan and tool message; each clip is answered by its transcript or caption."""
    edits, lengths = set(), (set(), set())
    for seed in [*range(12), *(SPLIT_SEEDS["listen"] + s for s in range(6))]:
        listening = seed >= SPLIT_SEEDS["listen"]   # 2-6 clips to understand; else a story, 1-2 edits and a clip
        d, audios = (make_listening_dialogue if listening else make_dialogue)(seed)
        turns, plan, clips = json.loads(json.dumps(d))["turns"], None, []
        phases, (lo, hi) = [u["intent"]["kind"] for u in turns[::2]], LISTENING_TURNS if listening else (3, 4)
        lengths[listening].add(n := len(phases))
        assert [t["role"] for t in turns] == ["user", "assistant"] * n and lo <= n <= hi
        assert phases == (["understand"] * n if listening else ["story", *["edit"] * (n - 2), "understand"])
        for u, a in zip(turns[::2], turns[1::2]):
            clips.append(a.get("audio", u.get("audio")))
            assert audios[clips[-1]].shape == (2, round(a["plan"]["duration"] * SR))
            if u["intent"]["kind"] != "understand":   # calls <-> text exactly; replayed by the studio
                assert "\n".join(map(call_to_text, parse_calls(a["text"]))) == a["text"]
                plan = run_calls(parse_calls(a["text"]), plan, d["seed"])
                assert plan == a["plan"] and a["tool"] == plan_to_text(plan) and 4.0 <= plan["duration"] <= MAX_DURATION
                assert len({s["voice"] for s in plan["sources"] if s["type"] == "speech"}) <= 2
                edits.add(u["intent"].get("edit"))
            else:   # a transcript (one line per speech source) or a caption (one per source), in time order
                said = u["intent"]["task"] == "transcribe"
                assert a["text"] == (transcript if said else caption)(a["plan"])
                starts = [float(x.split("-")[0]) for x in a["text"].splitlines()]
                assert starts == sorted(s["start"] for s in a["plan"]["sources"] if "voice" in s or not said)
        heard = [json.dumps(a["plan"]) for u, a in zip(turns[::2], turns[1::2]) if u["intent"]["kind"] == "understand"]
        assert clips == list(range(len(audios))) and len(set(heard)) == len(heard)   # fresh scenes
        assert listening or (2 <= len(turns[1]["plan"]["sources"]) <= 5 and json.dumps(turns[1]["plan"]) not in heard)
    assert len(edits - {None}) >= 4 and edits <= {None, *EDIT_KINDS} and all(len(n) > 1 for n in lengths), (edits, lengths)

def test_studio_edits_leave_untouched_stems_identical():
    story = 'new_story()\nspeak(ava, "the old dog runs home")\nsfx(dog_bark)\nambience(rain)\nmusic(piano)'
    plan = run_calls(parse_calls(story), None, 7)
    _, before = render(plan, seed=7, stems=True)
    for text in ["sfx(bell, halfway, right)", "remove(dog_bark)", "set_gain(dog_bark, a bit louder)", "set_pan(dog_bark, left)",
                 "replace(dog_bark, knock)", 'replace("the old dog runs home", ben)', "replace(rain, wind)",
                 'speak(ben, "go home", after ava)']:
        edited = run_calls(parse_calls(text), plan, 7)
        _, after = render(edited, seed=7, stems=True)
        changed = {s["id"] for s in edited["sources"] if s not in plan["sources"]} | (set(before) - set(after))
        assert changed and all(np.array_equal(before[i], after[i]) == (i not in changed) for i in set(before) & set(after))

def test_render_is_seeded_and_every_sound_renders_cleanly():
    dry_signal.cache_clear()   # the cache must not be what makes it deterministic
    x = render(_good_plan(), seed=1)
    assert np.array_equal(x, render(_good_plan(), seed=1)) and not np.array_equal(x, render(_good_plan(), seed=2))
    assert x.shape == (2, 5 * SR) and x.dtype == np.float32
    rows = [{"type": "sfx", "sound": s, "dur": L} for s, (L, _) in SFX.items()]
    rows += [{"type": t, "sound": s, "dur": 3.0} for t, names in (("ambience", AMBIENCES), ("music", MUSIC)) for s in names]
    rows += [{"type": "speech", "voice": v, "text": "hello my friend", "dur": speech_duration(v, "hello my friend")}
             for v in VOICES]
    for i, r in enumerate(rows):
        x = render({"duration": 4.0, "sources": [{"id": 1, **r, "start": 0.2, "gain_db": 6, "pan": 0.3}]}, seed=i)
        assert np.isfinite(x).all() and np.abs(x).max() < 1.0, f"{r} clips"
        assert np.sqrt(np.mean(x[:, int(0.2 * SR): int((0.2 + r["dur"]) * SR)] ** 2)) > 0.01, f"{r} is (nearly) silent"
        assert np.abs(x[:, : int(0.2 * SR)]).max() == 0, f"{r} sounds before its start"
    loud = {**_good_plan(), "sources": [dict(s, gain_db=6) for s in _good_plan()["sources"]]}
    assert np.abs(render(loud, seed=0)).max() < 1.0   # a dense mix at full gain stays below clipping: the limiter

def test_speech_is_learnable():
    """Ridge regression on log-mels tells words of unseen voices and of an unseen seed, voices of unseen words."""
    from world import _one_slip
    codes = list(WORD_CODES.values())   # no two words one slip apart
    assert len(set(codes)) == len(VOCAB) >= 100 and not any(set(_one_slip(c)) & (set(codes) - {c}) for c in codes)
    words = VOCAB[::5][:22]   # 22 words x 6 voices x 3 seeds
    keys = [(v, w, s) for v in VOICES for w in words for s in range(3)]
    raws = [AudioCodec().encode_raw(np.stack([x, x]))[:, :32]
            for x in (synth_speech(v, w, np.random.default_rng(s)) for v, w, s in keys)]
    # a word: its frames at 12 time steps, standardised; a voice: its spectrum's mean and spread over the loud frames
    xw = torch.stack([(r - r.mean()) / r.std() for r in
                      (F.interpolate(r.T[None], 12, mode="linear", align_corners=True)[0].T.reshape(-1) for r in raws)])
    xv = torch.stack([torch.cat([r[loud].mean(0), r[loud].std(0)])
                      for r, loud in ((r, r.mean(1) > r.mean(1).max() - 4) for r in raws)])

    def accuracy(x, y, train_on):   # ridge regression onto one-hot classes, fitted on train_on's keys, tested on the rest
        m, y = torch.tensor([train_on(*k) for k in keys]), torch.tensor(y)
        mean, std = x[m].mean(0), x[m].std(0) + 1e-5
        z = lambda a: torch.cat([(a - mean) / std, torch.ones(len(a), 1)], 1)  # noqa: E731
        W = torch.linalg.solve(z(x[m]).T @ z(x[m]) + 100 * torch.eye(x.shape[1] + 1), z(x[m]).T @ F.one_hot(y[m]).float())
        return ((z(x[~m]) @ W).argmax(-1) == y[~m]).float().mean().item()
    word_y, voice_y = [words.index(w) for _, w, _ in keys], [list(VOICES).index(v) for v, _, _ in keys]
    accs = (accuracy(xw, word_y, lambda v, w, s: v in ("ava", "ben", "cleo", "dan")),
            accuracy(xw, word_y, lambda v, w, s: s < 2), accuracy(xv, voice_y, lambda v, w, s: words.index(w) % 3 != 0))
    print("  speech: word accuracy %.3f (unseen voices), %.3f (unseen seed); voice %.3f (unseen words)" % accs)
    assert accs[0] >= 0.85 and accs[1] >= 0.97 and accs[2] >= 0.9, accs   # measured 0.92, 1.00, 0.99

def test_user_agent_edits_any_small_plan():
    """Every edit kind, drawn many times on the smallest plans (one sfx; none; one speaker), ends and names valid sources."""
    one = {"id": 1, "start": 0.5, "gain_db": 0, "pan": 0.0}
    speaker = {"type": "speech", "voice": "ava", "text": "the dog", "dur": speech_duration("ava", "the dog")}
    for sources in ([{**one, "type": "sfx", "sound": "bell", "dur": 1.5}], [], [{**one, **speaker}]):
        plan = {"duration": 4.0, "sources": sources}
        validate_plan(plan)
        for seed in range(150):
            intent = UserAgent().edit_intent(plan, np.random.default_rng(seed), EDIT_KINDS[seed % len(EDIT_KINDS)])
            assert all(op.get("target", 1) == 1 for op in (intent["ops"] if intent["edit"] == "multi" else [intent])), intent

def test_dataset_on_disk():
    """tiny_dataset: its files, disjoint seed ranges, the dialogues as simulated, their clips as float16 raw log-mels."""
    out = tiny_dataset()
    meta, files = json.load(open(f"{out}/meta.json")), ["listen", "meta.json", "test", "tokenizer.json", "train", "val"]
    r = sorted(meta["seeds"].values())   # the splits' seed ranges
    assert sorted(os.listdir(out)) == [f if "." in f else f"{f}_0000.pt" for f in files] and meta["sr"] == SR
    assert meta["counts"] == {"train": 12, "listen": 3, "val": 4, "test": 4} and all(a[1] <= b[0] for a, b in zip(r, r[1:]))
    listen, shard = (torch.load(os.path.join(out, f"{split}_0000.pt"), weights_only=True) for split in ("listen", "train"))
    assert json.loads(listen["dialogues"][1]) == make_listening_dialogue(SPLIT_SEEDS["listen"] + 1)[0]
    (d, wavs), codec = make_dialogue(0), AudioCodec.from_state_dict(meta["codec"])   # seeded: the same in a worker
    assert len(shard["dialogues"]) == len(shard["audio"]) == 12 and shard["dialogues"][0] == json.dumps(d)
    assert len(shard["audio"][0]) == len(wavs) and all(lat.dtype == torch.float16 for lat in shard["audio"][0])
    assert all(torch.allclose(lat.float(), codec.encode_raw(wav), atol=0.02) for lat, wav in zip(shard["audio"][0], wavs))


# -----------------------------------------------------------------------------
# the tokenizers and the chat template (tokenizer.py)

@functools.lru_cache()
def _trained_tok():
    """A BPE trained on the text of 40 simulated dialogues (requests, plans, answers)."""
    tok = BPETokenizer()
    tok.train([t["text"] for seed in range(40) for t in make_dialogue(seed)[0]["turns"]], vocab_size=400)
    return tok

def test_bpe_known_merges_roundtrip_specials_save_load():
    tok = BPETokenizer()   # minbpe's Wikipedia example: "aaabdaaabac" -> aa=Z, Za=Y, Yb=X -> "XdXac"
    tok.train(["aaabdaaabac"], vocab_size=256 + 3 + len(SPECIAL_TOKENS))
    assert list(tok.merges.items()) == [((97, 97), 256), ((256, 97), 257), ((257, 98), 258)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99] and tok.decode([258, 100, 258, 97, 99]) == "aaabdaaabac"
    assert [tok.special(s) for s in SPECIAL_TOKENS] == list(range(259, tok.vocab_size))
    assert tok.encode("aaab aaab") == [258, 32, 258]  # two regex chunks, "aaab" and " aaab"
    tok = _trained_tok()   # and one trained on simulated dialogues: round trips, specials, unicode, save / load
    for text in ["", " ", "\n\n  x \t", "the old dog runs home", '{"start": 0.4, "gain_db": -12, "pan": -0.4}',
                 "héllo wörld ☔ 雨 🐕 -0.5e3 don't it's", "<|us<|user|>er|> <|nope|> <|pad|><|null|>",
                 "<|user|>Tell a story<|end|><|assistant|>{}<|audio|><|/audio|><|end|>"]:
        assert tok.decode(ids := tok.encode(text)) == text and all(0 <= i < tok.vocab_size == 400 for i in ids), text
    assert tok.encode("<|user|>hi<|end|>") == [tok.special("<|user|>")] + tok.encode("hi") + [tok.special("<|end|>")]
    plain = tok.encode_ordinary("<|audio|>")   # special strings in text stay text: no forged roles
    assert len(plain) > 1 and not set(plain) & set(tok.special_ids.values()) and tok.decode(plain) == "<|audio|>"
    unseen = [t["text"] for t in make_dialogue(100)[0]["turns"]]   # merges learned: unseen calls take < 0.6 token a byte
    assert len(tok.encode(unseen[1])) < 0.6 * len(unseen[1].encode())
    raises(KeyError, lambda: tok.special("<|foo|>"), "<|foo|>")
    tok.save(os.path.join(TMP, "tok.json"))
    tok2 = BPETokenizer.load(os.path.join(TMP, "tok.json"))
    assert tok2.merges == tok.merges and all(tok2.encode(t) == tok.encode(t) for t in unseen + ["<|user|>ünïcode<|end|>"])
    bad = dict(tok.state_dict(), special_tokens=SPECIAL_TOKENS[:-1])
    raises(ValueError, lambda: BPETokenizer.from_state_dict(bad), "special tokens")

def _scene(gains=((0.9, 0.3), (0.3, 0.9))):
    """2 s stereo: a harmonic tone with vibrato (panned by gains[0]), a noise burst (gains[1]), a faint ambience bed."""
    rng, t = np.random.default_rng(0), np.arange(2 * SR) / SR
    phase = 2 * np.pi * np.cumsum(220 * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))) / SR
    tone = 0.2 * sum(np.sin(k * phase) / k for k in range(1, 8)) * (t < 1.2)
    burst = 0.1 * rng.standard_normal(t.size) * ((t > 0.8) & (t < 1.6))
    return (np.stack([gains[0][c] * tone + gains[1][c] * burst for c in range(2)]) + 0.003 * rng.standard_normal((2, t.size))
            ).astype(np.float32)

def test_codec_shapes_patchify_normalize_and_roundtrip():
    """Frames, patches, normalisation; decoding keeps the log-mels (1 dB), the panning, and is finite far off the data."""
    assert (SR, FRAME_RATE, HOP, N_MELS, PATCH, LATENT_DIM) == (16000, 40, 400, 32, 2, 128)
    codec, x = AudioCodec(), _scene()
    raw = codec.encode_raw(x)
    assert raw.shape == (80, 64) and raw.dtype == torch.float32 and torch.equal(codec.encode_raw(torch.from_numpy(x)), raw)
    assert codec.encode_raw(x[:, :-1]).shape == (79, 64)  # T = N // HOP
    batch = codec.encode_raw(np.stack([x, x[::-1]]))   # a batch; the channels swapped: left and right mels swap
    assert batch.shape == (2, 80, 64) and torch.allclose(batch[0], raw) and torch.allclose(batch[1], raw.roll(32, -1))
    z, P, U = torch.randn(3, 40, 64), AudioCodec.patchify, AudioCodec.unpatchify
    p = P(z)
    assert p.shape == (3, 20, 128) and torch.equal(p[0, 3], torch.cat([z[0, 6], z[0, 7]])) and torch.equal(U(p), z)
    assert torch.equal(P(z[0]), p[0]) and torch.equal(U(p[0]), z[0])   # unbatched
    y = codec.decode_raw(raw)
    assert y.shape == (2, 80 * HOP) and y.dtype == torch.float32 and y.abs().max() < 1.5
    assert torch.equal(codec.decode_raw(raw), y) and (codec.encode_raw(y) - raw).abs().mean() < 0.3   # 0.23 nat = 1.0 dB
    for seg, want in ((slice(0, 12000), 9.0), (slice(20000, 25000), 1 / 9)):   # panning kept: tone L 3x R, burst R 3x L
        ratio = (y[0, seg] ** 2).sum() / (y[1, seg] ** 2).sum()
        assert abs(np.log(ratio.item() / want)) < np.log(1.25), (ratio, want)  # within 1 dB (measured 0.03 dB)
    raises(RuntimeError, lambda: AudioCodec().normalize(raw), "fit()")
    raises(ValueError, lambda: codec.encode_raw(x[:1]), "(2, N)")
    codec.fit([raw, codec.encode_raw(_scene(gains=((0.5, 0.5), (0.1, 1.0))))])
    z = codec.encode(x)   # normalised latents: encode(decode(z)) is close to z, in units of the per-dim std
    assert torch.allclose(codec.denormalize(z), raw, atol=1e-5) and (codec.encode(codec.decode(z)) - z).abs().mean() < 0.15
    assert torch.equal(AudioCodec.from_state_dict(json.loads(json.dumps(codec.state_dict()))).encode(x), z)
    for far in (8.0, 1e4, float("nan")):   # latents far off the data (a high CFG scale) still decode to finite audio
        assert torch.isfinite(codec.decode(torch.full((20, 64), far))).all()

def test_encode_dialogue_layout():
    """The chat template by hand: every token, which are CE targets (never the tool's plan) and plain words; the spans."""
    tok, lat = _trained_tok(), [torch.randn(8, 64), torch.randn(12, 64), torch.randn(4, 64)]  # 4, 6, 2 patches
    CALLS, GAIN, ANSWER, PT = 'new_story()\nsfx(bell)', "set_gain(bell, louder)", "0.4-2.1 ava: hi", plan_to_text(_good_plan())
    seq = encode_dialogue({"seed": 1, "turns": [   # a turn's "plan" never enters the sequence, its text does
        {"role": "user", "text": "Tell a story."}, {"role": "assistant", "text": CALLS, "tool": PT, "plan": {}, "audio": 0},
        {"role": "user", "text": "Louder."}, {"role": "assistant", "text": GAIN, "tool": PT, "plan": {}, "audio": 1},
        {"role": "user", "text": "Who speaks?", "audio": 2}, {"role": "assistant", "text": ANSWER, "plan": {}}]}, lat, tok)
    raises(IndexError, lambda: encode_dialogue({"turns": [{"role": "user", "text": "hi", "audio": 5}]}, lat, tok), "audio 5")
    U, A, T, END, AU, CLOSE, P = (tok.special(f"<|{s}|>") for s in "user assistant tool end audio /audio pad".split())
    w = tok.encode
    pieces = [  # (ids, the assistant's: a CE target, plain words); the tool's plan is read, never learned
        ([U], 0, 0), (w("Tell a story."), 0, 1), ([END, A], 0, 0), (w(CALLS), 1, 1), ([T], 1, 0), (w(PT), 0, 1),
        ([AU], 1, 0), ([P] * 4 + [CLOSE], 0, 0), ([END], 1, 0), ([U], 0, 0), (w("Louder."), 0, 1), ([END, A], 0, 0),
        (w(GAIN), 1, 1), ([T], 1, 0), (w(PT), 0, 1), ([AU], 1, 0), ([P] * 6 + [CLOSE], 0, 0), ([END], 1, 0), ([U], 0, 0),
        (w("Who speaks?"), 0, 1), ([AU] + [P] * 2 + [CLOSE, END, A], 0, 0), (w(ANSWER), 1, 1), ([END], 1, 0)]
    expect = [i for ids, _, _ in pieces for i in ids]
    assert seq["tokens"].tolist() == expect and seq["tokens"].dtype == seq["span_id"].dtype == torch.long
    assert seq["text_target"].tolist() == [bool(a) for ids, a, _ in pieces for _ in ids][1:] + [False]  # i learns token i+1
    assert seq["is_plain_text"].tolist() == [bool(p) for ids, _, p in pieces for _ in ids]
    span, audio = seq["span_id"], seq["audio"]   # spans 0, 1, 2 on the <|pad|> runs hold the patchified latents in order
    assert ((span >= 0) == (seq["tokens"] == P)).all() and seq["span_is_target"].tolist() == [True, True, False]
    assert span[span >= 0].tolist() == [0] * 4 + [1] * 6 + [2] * 2 and (audio[span < 0] == 0).all()
    assert audio.shape == (len(expect), 128) and torch.equal(audio[span >= 0], torch.cat([*map(AudioCodec.patchify, lat)]))


# -----------------------------------------------------------------------------
# the model (model.py)

def tiny_model(arch="sct", attn="sdpa", seed=0):
    """2 + 1 layers of width 32; the zero-initialised diffusion head and token shift get weights (caches must carry them)."""
    torch.manual_seed(seed)
    model = AudioChatModel(ModelConfig(vocab_size=40, latent_dim=8, n_layer=2, n_gen_layer=1, n_head=2, n_embd=32,
                                       block_size=128, arch=arch, attn=attn))
    torch.nn.init.normal_(model.diffusion_head.out.weight, std=0.1)
    torch.nn.init.normal_(model.shift.weight, std=0.3)
    return model

def random_sequence(layout, seed=0):
    """layout: list of ("text", n) / ("audio", n) pieces -> tokens (L,), audio (L, 8), span_id (L,): spans 0, 1, ..."""
    g, spans = torch.Generator().manual_seed(seed), itertools.count()
    span_id = torch.tensor([i for kind, n in layout for i in [-1 if kind == "text" else next(spans)] * n])
    return torch.randint(0, 40, span_id.shape, generator=g), torch.randn(len(span_id), 8, generator=g), span_id

def random_batch():
    """Two rows of 24: text 0-4, span 0 at 5-10, text, span 1 at 15-19, text; and text 0-8, spans at 9-12 and 15-21."""
    rows = [random_sequence([("text", 5), ("audio", 6), ("text", 4), ("audio", 5), ("text", 4)], seed=1),
            random_sequence([("text", 9), ("audio", 4), ("text", 2), ("audio", 7), ("text", 2)], seed=2)]
    tokens, audio, span_id = (torch.stack(z) for z in zip(*rows))
    t = torch.where(span_id >= 0, torch.rand(span_id.shape, generator=torch.Generator().manual_seed(3)), 0.0)
    return tokens, audio, t, span_id

def test_model_mask_rule_and_span_positions_by_hand():
    span_id, rows = torch.tensor([[-1, 0, 0, -1, 1, 1]]), "100000 111000 111000 111100 111111 111111".split()
    assert transfusion_mask(span_id)[0].int().tolist() == [list(map(int, r)) for r in rows]   # a span sees itself whole
    m = transfusion_mask(span_id, torch.tensor([[0, 0, 0, 1, 1, 1]]))[0]
    assert not m[3:, :3].any() and m[4, 5] and m[3, 3]  # nothing crosses documents
    span_id = torch.tensor([[-1, 0, 0, 0, -1, -1, 1, 1, -1, 2], [3, 3, -1, 4, 4, 4, 4, -1, -1, -1]])
    assert span_positions(span_id).tolist() == [[0, 0, 1, 2, 0, 0, 0, 1, 0, 0], [0, 1, 0, 0, 1, 2, 3, 0, 0, 0]]

def backend_outputs(attn, doc_id=None, device="cpu", arch="sct"):
    """tiny_model(arch, attn) on random_batch -> [logits, v] (0 on padding) and, but for flex on a CPU, every gradient."""
    grad, doc_id = attn != "flex" or device != "cpu", None if doc_id is None else doc_id.to(device)
    tokens, audio, t, span_id = (z.to(device) for z in random_batch())
    model, x = tiny_model(arch, attn).to(device), audio.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        logits, v = (y * (1 if doc_id is None else (doc_id >= 0)[..., None]) for y in model(tokens, x, t, span_id, doc_id))
    if grad:
        (logits.square().mean() + v.square().mean()).backward()
    return [logits, v] + ([x.grad, *(p.grad for p in model.parameters())] if grad else [])

def test_model_attention_backends_agree():
    """math, sdpa and flex: the same outputs, packed or not; math and sdpa the same gradients (SCT, and MoT's routing)."""
    for arch, doc_id in itertools.product(("sct", "mot"), (None, torch.tensor([[0] * 12 + [1] * 12, [0] * 20 + [-1] * 4]))):
        ref = backend_outputs("math", doc_id, arch=arch)   # two documents; one, then padding
        for b in ("sdpa", "flex"):
            assert all(torch.allclose(r, out, atol=1e-5) for r, out in zip(ref, backend_outputs(b, doc_id, arch=arch))), b

def test_model_flex_backward_on_cuda():
    """flex forward and backward against math on CUDA."""
    if not torch.cuda.is_available():
        raise Skip("no CUDA: FlexAttention has no backward on a CPU")
    pairs = list(zip(backend_outputs("math", device="cuda"), backend_outputs("flex", device="cuda")))
    assert len(pairs) > 2 and all(torch.allclose(a, b, atol=1e-4) for a, b in pairs)

def test_model_bf16_autocast():
    """--dtype auto: float32 where bf16 does not pay (a CPU below width 256, MPS), bf16 on CUDA; under bf16 the
    matmuls run in it and the outputs stay float32's to bf16 precision."""
    assert [train.pick_dtype(*a) for a in (("auto", "cpu", 128), ("auto", "mps", 512), ("auto", "cuda", 128),
                                           ("bfloat16", "cpu", 128))] == ["float32", "float32", "bfloat16", "bfloat16"]
    model, (tokens, audio, t, span_id) = tiny_model(), random_batch()
    with torch.no_grad():
        for p in model.parameters():   # away from the zero-initialised heads: something to compare
            p.add_(0.05 * torch.randn_like(p))
    outputs = []
    for dtype in ("float32", "bfloat16"):
        with train.autocast_for("cpu", dtype):
            outputs.append(model(tokens, audio, t, span_id))
    (l32, v32), (l16, v16) = outputs
    assert l32.dtype == torch.float32 and l16.dtype == torch.bfloat16
    assert (l16.float() - l32).abs().max() < 0.05 * l32.abs().max() and (v16.float() - v32).abs().max() < 0.05 * v32.abs().max()

def test_model_what_each_output_sees():
    """No output sees the future, another row or document (rope); a span sees itself whole; sct's text never sees G."""
    model, (tokens, audio, t, span_id) = tiny_model(), random_batch()
    logits, v = model(tokens, audio, t, span_id)
    tok2, aud2, aud3 = tokens.clone(), audio.clone(), audio.clone()   # 2: a future text token, a later span; 3: span 0
    tok2[0, 13], aud2[0, 17], aud3[0, 9] = (tok2[0, 13] + 1) % 40, aud2[0, 17] + 1, aud3[0, 9] + 1   # (5-10), late in it ...
    (logits2, v2), (logits3, v3) = model(tok2, aud2, t, span_id), model(tokens, aud3, t, span_id)
    assert torch.allclose(logits[0, :13], logits2[0, :13], atol=1e-6) and torch.allclose(v[0, :13], v2[0, :13], atol=1e-6)
    assert not torch.allclose(logits[0, 17:], logits2[0, 17:], atol=1e-4)
    assert not torch.allclose(v[0, 5], v3[0, 5], atol=1e-4)  # ... reaches its first token
    assert torch.allclose(logits[0, :5], logits3[0, :5], atol=1e-6)  # but not the text before the span
    assert torch.equal(logits[1], logits3[1]) and torch.equal(v[1], v3[1])  # nor the other row
    q, k = torch.randn(2, 3, 1, 16), torch.randn(2, 3, 1, 16)   # rope: (m, n) scores as (m + c, n + c) ...
    scores = [(rotate(q, rotary(torch.tensor([m]), 16)) * rotate(k, rotary(torch.tensor([n]), 16))).sum(-1)
              for m, n in ((7, 3), (107, 103), (3, 7))]
    assert torch.allclose(scores[0], scores[1], atol=1e-4) and not torch.allclose(scores[0], scores[2], atol=1e-3)
    alone = model(tokens[:1, 14:], audio[:1, 14:], t[:1, 14:], span_id[:1, 14:])
    packed = model(tokens[:1], audio[:1], t[:1], span_id[:1], doc_id=torch.tensor([[1] * 14 + [0] * 10]))
    assert all(torch.allclose(a, p[:, 14:], atol=1e-5) for a, p in zip(alone, packed))   # ... so packing changes nothing
    for model in (model, tiny_model(arch="dense"), tiny_model(arch="mot")):
        logits, v = model(tokens, audio, t, span_id)
        with torch.no_grad():
            for p in model.blocks[model.config.n_layer:].parameters():
                p.add_(0.5 * torch.randn_like(p))
        (logits2, v2), (text_logits, none) = (model(tokens, audio, t, span_id, layers=k) for k in ("all", "text"))
        sct = model.config.arch == "sct"   # its text layers never see the generation layers; dense's and mot's do
        assert not torch.allclose(v, v2, atol=1e-4) and torch.allclose(logits, logits2, atol=1e-6) == sct, sct
        assert none is None and torch.allclose(text_logits, logits2, atol=1e-6), sct

def test_mot_sends_each_modality_through_its_own_weights():
    """MoT: text tokens use only the text copies, audio tokens only the audio copies; attention is shared."""
    mot, (tokens, audio, t, span_id) = tiny_model(arch="mot"), random_batch()
    for inputs, unused in (((tokens, audio, t, torch.full_like(span_id, -1)), "audio"), (random_batch(), None)):   # no span
        mot.zero_grad()
        logits, v = mot(*inputs)
        (logits.square().mean() + v.square().mean()).backward()
        grads = {name: p.grad is not None and p.grad.abs().sum() > 0 for name, p in mot.blocks.named_parameters()}
        assert all(g == (f".{unused}." not in name) for name, g in grads.items()), (unused, grads)
    n = {arch: sum(p.numel() for p in tiny_model(arch=arch).blocks.parameters()) for arch in ("sct", "dense", "mot")}
    assert n["sct"] == n["dense"] and n["mot"] == 2 * n["sct"]   # a copy of every block weight per modality
    sct, mot = (dict(tiny_model(arch=a).named_parameters()) for a in ("sct", "mot"))   # GPT-2's init, copy by copy
    for name, copy in (("attn.c_proj", "attn.c_proj.{}"), ("mlp.c_proj", "mlp.{}.c_proj")):
        std = [float(p.std()) for p in (sct[f"blocks.0.{name}.weight"], *(mot[f"blocks.0.{copy.format(m)}.weight"]
                                                                          for m in ("text", "audio")))]
        assert max(std) < 1.3 * min(std), (name, std)

def test_model_audio_embedding_norm_matches_text():
    """A patch enters at the text embeddings' mean norm, whatever its scale."""
    model, (tokens, audio, t, span_id) = tiny_model(), random_batch()
    model.shift = None   # the embeddings alone, without the token shift's mix of the previous one
    # the projection is odd in the patch, the conditions added (noise level, time in span) do not depend on it
    plus, minus = (model.embed(tokens, s * audio, t, span_id)[0] for s in (10.0, -10.0))
    norms = ((plus - minus) / 2)[span_id >= 0].norm(dim=-1)
    assert torch.allclose(norms, model.wte.weight.norm(dim=1).mean().expand_as(norms), rtol=1e-5)


# -----------------------------------------------------------------------------
# the loss (diffusion.py) on batches made by train.collate, the samplers, the caches

def test_noise_levels_one_per_span_clean_context_and_shift():
    t, ends = torch.linspace(0.05, 0.95, 19), torch.tensor([0.0, 1.0])
    for shift in (1.0, 3.0):   # the shift divides alpha / sigma by `shift`; the ends stay put
        (a, s), (a2, s2) = alpha_sigma(t), alpha_sigma(shift_noise_level(t, shift))
        assert torch.allclose(a2 / s2, a / s / shift, rtol=1e-4) and shift_noise_level(ends, shift).tolist() == [0, 1]
    B, n = 200, 5   # 3 text tokens, then 4 spans of 5; span 1 supplied by the user
    span_id = torch.cat([torch.full((B, 3), -1), torch.arange(4).repeat_interleave(n).repeat(B, 1)], 1)
    target = torch.tensor([True, False, True, True]).repeat(B, 1)
    t, shifted = (sample_noise_levels(span_id, target, shift=k, generator=torch.Generator().manual_seed(0)) for k in (1, 3))
    per_span, shifted = t[:, 3:].view(B, 4, n), shifted[:, 3:].view(B, 4, n)
    targets, user = per_span[:, [0, 2, 3], 0], per_span[:, 1, 0]
    assert (t[:, :3] == 0).all() and (per_span == per_span[..., :1]).all()   # text is clean; one t per span ...
    assert (targets[:, 0] != targets[:, 1]).all() and (targets[:, 1] != targets[:, 2]).all()  # ... each its own, ~ U(0, 1)
    assert abs(targets.mean().item() - 0.5) < 0.05 and 0.8 < (user == 0).float().mean().item() < 0.97 and user.max() <= 0.1
    assert torch.allclose(shifted[:, [0, 2, 3]], shift_noise_level(per_span[:, [0, 2, 3]], 3.0))
    assert (shifted[:, 1] == user[:, None]).all()   # the user's audio: mostly clean, else a small t, never shifted

def fake_dialogue(layout, is_target, seed):
    """A dict shaped like encode_dialogue's output (L tokens, 8-float latents); the last words are the assistant's."""
    tokens, audio, span_id = random_sequence(layout, seed=seed)
    text_target = torch.arange(len(tokens)).ge(len(tokens) - 6) & torch.arange(len(tokens)).lt(len(tokens) - 1)
    return {"tokens": tokens, "audio": torch.where((span_id >= 0)[:, None], audio, 0.0), "span_id": span_id,
            "span_is_target": torch.tensor(is_target), "text_target": text_target, "is_plain_text": span_id < 0}

def two_dialogues(n=(4, 3, 4)):
    """15 + n[0] tokens with an assistant span; 14 + n[1] + n[2] with a user's span, then an assistant's."""
    return [fake_dialogue([("text", 6), ("audio", n[0]), ("text", 9)], [True], seed=1),
            fake_dialogue([("text", 4), ("audio", n[1]), ("text", 3), ("audio", n[2]), ("text", 7)], [False, True], seed=2)]

def test_collate_and_the_loss_by_hand():
    """collate pads and packs; the loss is the mean CE of the text targets + 5 x the v-MSE of target spans."""
    d1, d2 = two_dialogues()
    p = collate([[d1, d2]], pad_id=39)   # packed in one row: no padding, spans counted across the row
    assert p["tokens"].shape == (1, 40) and not p["is_pad"].any() and p["span_id"][0, [19 + 4, 19 + 10]].tolist() == [1, 2]
    assert p["doc_id"][0].tolist() == [0] * 19 + [1] * 21 and p["span_is_target"][0].tolist() == [True, False, True]
    batch, model = collate([[d1], [d2]], pad_id=39), tiny_model()
    assert batch["tokens"].shape == (2, 21) and batch["span_is_target"].tolist() == [[True, False], [False, True]]  # padded
    assert batch["is_pad"][0, 19] and batch["tokens"][0, 19] == 39 and batch["span_id"][0, 19] == -1
    loss, ce, mse = transfusion_forcing_loss(model, batch, 38, cfg_drop_p=0.0, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)   # the same random draws, in the same order, then the loss token by token
    t = sample_noise_levels(batch["span_id"], batch["span_is_target"], generator=g)
    eps = torch.randn(batch["audio"].shape, generator=g)
    alpha, sigma = (a[..., None] for a in alpha_sigma(t))
    logits, v = model(batch["tokens"], alpha * batch["audio"] + sigma * eps, t, batch["span_id"], batch["doc_id"])
    ces, errs = [], []
    for b, i in itertools.product(range(2), range(batch["tokens"].size(1))):
        if batch["text_target"][b, i]:
            ces.append(-torch.log_softmax(logits[b, i], -1)[batch["tokens"][b, i + 1]])
        if batch["span_id"][b, i] >= 0 and batch["span_is_target"][b, batch["span_id"][b, i]]:
            errs.append(((v[b, i] - (alpha[b, i] * eps[b, i] - sigma[b, i] * batch["audio"][b, i])) ** 2).mean())
    ce_hand, mse_hand = torch.stack(ces).mean(), torch.stack(errs).mean()
    assert len(errs) == 8 and len(ces) == 10 and torch.allclose(loss, ce_hand + 5 * mse_hand, atol=1e-5)
    assert torch.allclose(ce, ce_hand, atol=1e-5) and torch.allclose(mse, mse_hand, atol=1e-6)
    assert transfusion_forcing_loss(model, batch, null_id=38, cfg_drop_p=1.0)[1] == 0  # text dropped to <|null|>: no CE
    batch = collate([[fake_dialogue([("text", 6), ("audio", 4), ("text", 9)], [False], 1)]], pad_id=39)   # no target span:
    loss, ce, mse = transfusion_forcing_loss(model, batch, null_id=38, cfg_drop_p=0.0)          # the text stage
    loss.backward()
    assert mse == 0 and loss == ce > 0   # loss = ce, and the generation layers are not even run
    assert all((p.grad is None) == (k >= model.config.n_layer) for k, b in enumerate(model.blocks) for p in b.parameters())

def test_samplers_reproduce_a_gaussian_and_forward_formulas():
    mu, s = 1.5, 0.5

    def v_exact(x, t):   # the exact v for data x0 ~ N(mu, s^2): alpha E[eps | x_t] - sigma E[x0 | x_t]
        alpha, sigma = (a[:, None, None] for a in alpha_sigma(t))
        var = alpha ** 2 * s ** 2 + sigma ** 2   # of x_t ~ N(alpha mu, var)
        return alpha * sigma * (x - alpha * mu) / var - sigma * (mu + alpha * s ** 2 * (x - alpha * mu) / var)
    noise = torch.randn(4, 1000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, x in [("ddim", ddim_sample(v_exact, noise, steps=100)), ("dpmpp", dpmpp_2m_sample(v_exact, noise, steps=50))]:
        assert abs(x.mean() - mu) < 0.02 and abs(x.std() - s) < 0.02, (name, x.mean(), x.std())
    x0, eps, t = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.rand(2, 3)
    x_t, v = add_noise(x0, eps, t)
    alpha, sigma = (a[..., None] for a in alpha_sigma(t))
    assert torch.allclose(alpha * x_t - sigma * v, x0, atol=1e-6) and torch.allclose(sigma * x_t + alpha * v, eps, atol=1e-6)
    assert torch.equal(add_noise(x0, eps, torch.zeros(2, 3))[0], x0)  # t = 0 is clean
    v_c, v_u = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    assert torch.allclose(cfg(v_c, v_u, 1.0), v_c, atol=1e-6) and torch.equal(cfg(v_c, v_u, 0.0), v_u)
    assert torch.allclose(cfg(v_c, v_u, 3.0), v_u + 3 * (v_c - v_u))
    for sampler, steps in [(ddim_sample, 0), (dpmpp_2m_sample, 0), (ddim_sample, -1), (dpmpp_2m_sample, 2.5)]:
        raises(ValueError, lambda: sampler(v_exact, noise, steps), "steps")   # not the noise, nor zeros

def test_caches_match_full_forward():
    """The KV cache, and sample_audio after a cached prefix, give what full forwards give: logits, v, the latents."""
    layout = [("text", 5), ("audio", 4), ("text", 3), ("audio", 3), ("text", 3)]
    tokens, audio, span_id = (z[None] for z in random_sequence(layout, seed=4))
    t = torch.where(span_id >= 0, torch.rand(span_id.shape), 0.0)
    chunks = [slice(a, b) for a, b in itertools.pairwise([*range(6), 9, 10, 11, 12, 15, 16, 17, 18])]   # a span whole
    for arch in ("sct", "dense", "mot"):   # text: the U layers; a span: all layers, G catching up
        model = tiny_model(arch=arch)
        logits, v = model(tokens, audio, t, span_id)
        cache = model.new_cache(1)
        for sl in chunks:
            text = bool(span_id[0, sl.start] < 0)
            lg, vv = model.extend(cache, *(x[:, sl] for x in (tokens, audio, t, span_id)), layers="text" if text else "all")
            assert torch.allclose(lg, logits[:, sl], atol=1e-5) and (text or torch.allclose(vv, v[:, sl], atol=1e-5))
        assert len(cache) == tokens.size(1)
    seq = fake_dialogue([("text", 5), ("audio", 4), ("text", 3), ("audio", 5), ("text", 2)], [False, True], seed=6)
    for sampler, null_id, scale in (("ddim", 38, 3.0), ("dpmpp", 38, 3.0), ("dpmpp", None, 1.0)):   # guided or not
        prefix, n = E.prefix_rows(seq, 1, null_id, "cpu")   # all before span 1; with null_id, a row with words -> <|null|>
        with one_thread():
            x = [E.sample_after(model, prefix, n, 4, sampler, scale, torch.Generator().manual_seed(1), cached)
                 for cached in (True, False)]
        assert x[0].shape == (1, 5, 8) and torch.allclose(x[0], x[1], atol=1e-5), (sampler, null_id)
    cache, (tokens, audio, t, span_id), L = model.new_cache(1), prefix, prefix[0].size(1)   # the next token then sees the
    model.extend(cache, tokens, audio, t, span_id)                                         # clean span as a forward does
    x0 = sample_audio(model, cache, n, steps=3, sampler="dpmpp", cfg_scale=1.0)
    nxt = (torch.tensor([[3]]), torch.zeros(1, 1, 8), torch.zeros(1, 1), torch.tensor([[-1]]))   # a text token after it
    logits = model.extend(cache, *nxt, layers="text")[0]
    span = (torch.full((1, n), 3), x0, torch.zeros(1, n), torch.full((1, n), 1))
    full = model(*(torch.cat(z, 1) for z in zip((tokens, audio, torch.zeros_like(t), span_id), span, nxt)))[0]
    assert torch.allclose(logits[:, 0], full[:, -1], atol=1e-5) and len(cache) == L + n + 1


# -----------------------------------------------------------------------------
# training (train.py) and chat (sample.py), on a tiny simulated dataset

def test_overfit_one_batch():
    model, g, first = tiny_model(), torch.Generator().manual_seed(0), None
    batch = collate([[d] for d in two_dialogues((6, 5, 5))], pad_id=39)
    opt = model.configure_optimizers(weight_decay=0.0, learning_rate=5e-3, betas=(0.9, 0.95), device_type="cpu")
    with one_thread():
        for step in range(300):
            loss, ce, mse = transfusion_forcing_loss(model, batch, null_id=38, generator=g)
            first = first if step else (ce.item(), mse.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():  # average a few noise draws for a steady figure
        last = torch.tensor([transfusion_forcing_loss(model, batch, 38, cfg_drop_p=0, generator=g)[1:] for _ in range(20)])
    assert last[:, 0].mean() < 0.01 * first[0] and last[:, 1].mean() < 0.4 * first[1], (first, last.mean(0))

TINY = ["--n_layer=2", "--n_gen_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=2", "--block_size=1024",
        "--eval_iters=1", "--warmup_iters=2", "--device=cpu", "--text_iters=2"]   # both curriculum stages

def tiny_dataset():
    """12 train / 3 listen / 4 val / 4 test dialogues, simulated once per test run."""
    path = os.path.join(TMP, "data")
    if not os.path.exists(os.path.join(path, "meta.json")):
        simulate_data.write_dataset(path, n=12, n_eval=4, workers=2, n_listen=3)
    return path

def run_train(*flags):
    return train.train(parse_config(train.TrainConfig, [f"--data_dir={tiny_dataset()}", *TINY, *flags], train.PRESETS))

def untrained_checkpoint(name="untrained.pt", **model_args):
    """A 1+1-layer untrained model (ModelConfig model_args) on tiny_dataset's tokenizer and codec: its plans are garbage."""
    path = os.path.join(TMP, name)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tok, meta = BPETokenizer.load(f"{tiny_dataset()}/tokenizer.json"), json.load(open(f"{tiny_dataset()}/meta.json"))
        torch.manual_seed(0)
        model = AudioChatModel(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_gen_layer=1, n_head=2, n_embd=32, **model_args))
        train.save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), model.config, train.TrainConfig(), tok,
                              AudioCodec.from_state_dict(meta["codec"]), 0, None)
    return path

def test_train_resume_is_exact():
    """6 steps straight (writing checkpoint, log, plot) or 3 + resume for 3 more: the same losses; never backwards."""
    straight, half, printed = os.path.join(TMP, "straight"), os.path.join(TMP, "halves"), io.StringIO()
    flags = ["--eval_interval=3", "--lr_decay_iters=6"]
    with contextlib.redirect_stdout(printed):   # says: a dataset smaller than asked; the listening dialogues trained on
        rows = run_train(f"--out_dir={straight}", "--max_iters=6", *flags)
    assert all(x in printed.getvalue() for x in ("12 train dialogues, fewer than", "3 listen", "15 train dialogues packed"))
    assert all(os.path.getsize(os.path.join(straight, f)) for f in ("ckpt.pt", "log.csv", "loss.png"))
    assert [r["iter"] for r in rows] == [0, 1, 2, 3, 4, 5, 6] and rows[-1]["val_ce"] != ""
    assert {f"val_x0_t{k}" for k in range(5)} <= set(open(os.path.join(straight, "log.csv")).readline().strip().split(","))
    ckpt = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    assert ckpt["iter_num"] == 6 and {"model", "optimizer", "model_args", "config", "tokenizer", "codec"} <= set(ckpt)
    val = ckpt["val"]   # the last validation: losses, and the x0-hat error in 5 bins of t (near t = 1, still large)
    assert set(val) == {"loss", "ce", "mse", "x0_err"} and len(val["x0_err"]) == 5 and val["x0_err"][-1] > 0.5, val
    run_train(f"--out_dir={half}", "--max_iters=3", *flags)
    resumed = run_train(f"--out_dir={half}", "--max_iters=6", "--init_from=resume", *flags)
    a, b = ([float(r["loss"]) for r in rs if r.get("loss", "") != ""] for rs in (rows, resumed))
    assert len(a) == len(b) == 6 and np.allclose(a, b, rtol=1e-5, atol=1e-6), (a, b)
    files = [os.path.join(half, f) for f in ("ckpt.pt", "log.csv")]   # resuming backwards: refused, nothing touched
    before = [open(f, "rb").read() for f in files]
    expect_exit(lambda: run_train(f"--out_dir={half}", "--max_iters=1", "--init_from=resume", *flags), "already at step 6")
    assert [open(f, "rb").read() for f in files] == before

def test_text_only_stage_cuts_the_audio_and_the_answers_about_it():
    """The text stage keeps the <|audio|> markers and every plan, never an answer about a clip (the joint stage's)."""
    tok, AU = _trained_tok(), _trained_tok().special("<|audio|>")
    for d, audios in (make_dialogue(5), make_listening_dialogue(SPLIT_SEEDS["listen"])):
        seq = encode_dialogue(d, [torch.zeros(a.shape[1] // 400 // 2 * 2, 64) for a in audios], tok)
        text = train.text_only(seq)
        answers, calls = ([a["text"] for a in d["turns"][1::2] if ("audio" in a) == k] for k in (False, True))
        assert (text["span_id"] == -1).all() and text["span_is_target"].numel() == 0
        assert len(text["tokens"]) == (seq["span_id"] < 0).sum() and (text["tokens"] == AU).sum() == len(audios)
        words = tok.decode([int(x) for x, learn in zip(text["tokens"][1:], text["text_target"][:-1]) if learn])
        assert all(c in words for c in calls) and not any(x and x in words for x in answers)
        learned = int(seq["text_target"].sum()) - int(text["text_target"].sum())
        assert learned == sum(len(tok.encode_ordinary(x)) + 1 for x in answers)   # each answer and its <|end|>

def test_command_lines_refuse_bad_input_in_one_line():
    """train, sample, eval: a bad flag, out dir or checkpoint is one error line (no traceback), before any work."""
    TC, SC, EC = train.TrainConfig, SampleConfig, E.EvalConfig
    for cls, flags, word in [   # unknown, unparseable, off the menu or out of range: the flag named, and the rule
            (TC, "--nonsense=1", "unknown argument"), (SC, "--cfg=loud", "--cfg"), (TC, "--max_iters=ten", "--max_iters"),
            (TC, "--n_listen=-1", "--n_listen"), (EC, "--ckpt a.pt --bogus=1", "--bogus"), (TC, "--eval_interval=0", ">= 1"),
            (TC, "--log_interval=0", ">= 1"), (TC, "--batch_size=0", ">= 1"), (TC, "--arch=foo", "sct | dense"),
            (TC, "--noise_shift=nan", "finite"), (SC, "--steps=0", "1..1000"), (SC, "--sampler=euler", "ddim | dpmpp"),
            (EC, "--steps=-1", "1..1000")]:
        expect_exit(lambda: parse_config(cls, flags.split()), flags.split()[-1].split("=")[0], word)
    for flags, words in [(["--n_embd=60", "--n_head=4"], "odd width 15"), (["--n_embd=96", "--n_head=32"], "odd width 3"),
                         (["--n_head=7"], "not divisible"), (["--attn=flex"], "--attn=sdpa")]:   # a shape or backend
        expect_exit(lambda: train.check_config(parse_config(TC, flags, train.PRESETS), "cpu"), *words)
    a_file, missing = os.path.join(TMP, "a_file"), os.path.join(TMP, "missing.pt")
    open(a_file, "w").write("not a folder, nor a checkpoint")
    for cls in (TC, SC, EC):
        expect_exit(lambda: parse_config(cls, [f"--out_dir={a_file}"]), "--out_dir", "is a file")
    expect_exit(lambda: run_train(f"--out_dir={os.path.join(TMP, 'nothing')}", "--init_from=resume"), "no checkpoint")
    for cmd, word in [("train.py --max_iters=ten", "--max_iters"), (f"sample.py --prompt=hi --ckpt={a_file}", a_file),
                      (f"sample.py --prompt=hi --ckpt={missing}", missing)]:   # the real command lines
        r = subprocess.run([sys.executable, *cmd.split()], cwd=HERE, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "error:" in r.stderr and word in r.stderr and "Traceback" not in r.stderr, r.stderr
    c = parse_config(EC, ["--ckpt", "a.pt", "--ckpt=b.pt", "--n", "3", "--steps=10"])
    assert c.ckpt == ["a.pt", "b.pt"] and c.n == 3 and c.steps == 10 and c.data_dir == "data"
    names = E.system_names([f"{d}/ckpt.pt" for d in ("o", "o/dense", "x/dense")])   # eval's systems, one per checkpoint
    assert names == ["audiochat", "audiochat_dense", "audiochat_dense_2"]

def test_ddp_two_processes_on_cpu():
    out = os.path.join(TMP, "ddp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py", f"--out_dir={out}",
                        f"--data_dir={tiny_dataset()}", *TINY, "--max_iters=2", "--eval_interval=2"],
                       cwd=HERE, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and os.path.exists(os.path.join(out, "ckpt.pt")), r.stderr[-2000:]

def test_chat_feeds_the_model_the_training_sequence():
    """Teacher-forced through sample.Chat, a dialogue commits encode_dialogue's tokens and clips (CFG row: words nulled)."""
    d, audios = make_dialogue(5)
    chat = Chat.from_checkpoint(untrained_checkpoint(), "cpu", steps=1, cfg_scale=3.0, max_new_tokens=10_000, seed=d["seed"])
    tok, extend, decode, committed, forced = chat.tok, chat.model.extend, chat._decode, [], []

    def recording_extend(cache, tokens, audio, t, span_id, layers="all", commit=True):
        if commit:   # (tokens, audio, span_id) of every chunk the cache keeps
            committed.append((tokens, audio, span_id))
        return extend(cache, tokens, audio, t, span_id, layers=layers, commit=commit)

    def choose():   # logits whose argmax is the next forced id
        return F.one_hot(torch.tensor(forced.pop(0) if forced else 0), chat.model.config.vocab_size).float()

    def forced_decode(logits):   # Chat._decode as it is, with the model's choices replaced
        feed = chat._feed
        chat._feed = lambda ids, plain, layers="text": (feed(ids, plain, layers), choose())[1]
        try:
            return decode(choose())
        finally:
            del chat._feed   # Chat._feed again
    chat.model.extend, chat._decode = recording_extend, forced_decode
    for u, a in zip(d["turns"][::2], d["turns"][1::2]):
        forced[:] = tok.encode_ordinary(a["text"]) + [tok.special("<|tool|>" if "audio" in a else "<|end|>")]
        turn = {"story": chat.generate, "edit": chat.edit}.get(u["intent"]["kind"])   # else understand
        reply = turn(u["text"]) if turn else chat.understand(audios[u["audio"]], u["text"])
        assert reply.text == a["text"] and not forced and not reply.error, (reply.text, reply.error)
        if "audio" in a:   # the audio turns come back and save as files
            assert reply.plan == a["plan"] and reply.wav.shape == audios[a["audio"]].shape and np.isfinite(reply.wav).all()
            paths = save_turn(reply, os.path.join(TMP, "chat"), f"turn_{a['audio']}")
            assert [os.path.splitext(p)[1] for p in paths] == [".json", ".wav", ".png"] and all(map(os.path.getsize, paths))
    seq = encode_dialogue(d, [chat.codec.encode(a) for a in audios], tok)
    tokens, audio, span_id = (torch.cat(z, 1) for z in zip(*committed))
    text, heard = seq["span_id"] < 0, train.user_audio(seq)
    assert tokens.shape == (2, len(text)) and ((span_id < 0) == text).all()   # the same layout, the same span lengths
    assert torch.equal(tokens[0][text], seq["tokens"][text])
    assert torch.equal(tokens[1][text], torch.where(seq["is_plain_text"], tok.special("<|null|>"), seq["tokens"])[text])
    assert heard.any() and torch.allclose(audio[:, heard], seq["audio"][heard].expand(2, -1, -1), atol=1e-5)

def test_no_cot_trains_and_chats_without_a_plan():
    """--cot=false: an audio turn is <|assistant|><|audio|> span <|/audio|><|end|>, in training and in the chat;
    the chat's story is NO_PLAN_DURATION long, an edit keeps its length, and ground truth's turns can be given."""
    d, audios = make_dialogue(5)
    chat = Chat.from_checkpoint(untrained_checkpoint(), "cpu", steps=1, cfg_scale=1.0, seed=d["seed"])
    chat.model.config.cot, extend, committed = False, chat.model.extend, []
    chat.model.extend = lambda cache, tokens, *a, commit=True, **k: (committed.append(tokens) if commit else None,
                                                                     extend(cache, tokens, *a, commit=commit, **k))[1]
    turns = [chat.generate(d["turns"][0]["text"]), chat.edit(d["turns"][2]["text"])]
    assert all(t.text == "" and t.plan is None and t.wav.shape == (2, round(NO_PLAN_DURATION * SR)) for t in turns)
    seq = encode_dialogue({"turns": d["turns"][:4]}, [chat.codec.encode(t.wav) for t in turns], chat.tok, cot=False)
    text = seq["span_id"] < 0   # (a span's token ids are placeholders)
    assert torch.equal(torch.cat(committed, 1)[0][text], seq["tokens"][text]) and chat.tok.special("<|tool|>") not in seq["tokens"]
    learned = seq["tokens"][1:][seq["text_target"][:-1]].tolist()   # the model learns to open the audio, then to end
    assert learned == [chat.tok.special(s) for s in ("<|audio|>", "<|end|>") * 2]
    chat.model.config.cot = True   # ground truth's turn given: the same tokens as the training sequence
    given, committed[:] = Chat(chat.model, chat.tok, chat.codec, steps=1, cfg_scale=1.0), []
    given.given(d["turns"][0]["text"], d["turns"][1]["text"], d["turns"][1]["plan"], audios[0])
    seq = encode_dialogue({"turns": d["turns"][:2]}, [chat.codec.encode(audios[0])], chat.tok)
    text = seq["span_id"] < 0
    assert torch.equal(torch.cat(committed, 1)[0][text], seq["tokens"][text]) and given.plan == d["turns"][1]["plan"]

def test_chat_cached_decoding_equals_full_recompute_and_bad_turns_are_reported():
    """Cached greedy decoding = eval's recompute baseline; empty requests refused; invalid calls reported, chat goes on."""
    chat = Chat.from_checkpoint(untrained_checkpoint(), "cpu", cfg_scale=1.0, max_new_tokens=12)   # never a whole plan
    for empty in (lambda: chat.generate(""), lambda: chat.edit("  "), lambda: chat.understand(np.zeros((2, SR)), "")):
        raises(ValueError, empty, "empty")
    with torch.no_grad():   # random weights large enough that it writes varied tokens, not one repeated
        for k, p in enumerate(chat.model.parameters()):
            if p.dim() > 1:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(k))
    tok, stop = chat.tok, {chat.tok.special(s) for s in ("<|tool|>", "<|audio|>", "<|end|>")}
    prompt = [tok.special("<|user|>"), *tok.encode_ordinary('Tell a story: ava says "the dog runs home".'),
              tok.special("<|end|>"), tok.special("<|assistant|>")]
    assert len(chat.cache) == 0   # the empty requests left the dialogue as it was
    cached, _ = chat._decode(chat._feed(prompt, [False] * len(prompt)))
    recomputed = E.recompute_decode(chat.model, prompt, 12, stop)
    assert len(set(recomputed)) > 3 and cached == tok.decode([i for i in recomputed if i not in stop]), (cached, recomputed)
    before, turns = len(chat.cache), [chat.generate("Tell a story."), chat.edit("Make it quieter.")]
    assert all(t.wav is None and t.plan is None and t.error for t in turns) and len(chat.cache) > before

def test_load_audio_resamples_and_refuses_long_audio():
    import soundfile as sf
    path, t = os.path.join(TMP, "mono44k.wav"), np.arange(2 * 44100) / 44100
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t[:int(44100 * 1.25)])).astype(np.float32), 44100)
    wav = load_audio(path)
    assert wav.shape == (2, 20800) and np.allclose(wav[0], wav[1])  # 1.25 s -> 1.3 s of whole tenths, mono -> stereo
    assert abs(np.argmax(np.abs(np.fft.rfft(wav[0, :16000]))) - 440) <= 1   # still at 440 Hz after resampling
    sf.write(path, np.zeros(16000 * 9, np.float32), 16000)
    raises(ValueError, lambda: load_audio(path), "at most")
    sf.write(path, (0.8 * np.sin(2 * np.pi * 440 * t) * (t >= 1)).astype(np.float32), 44100)
    wav = load_audio(path)   # silent 1 s, then loud to the last sample: its end must not wrap to 0 s
    assert np.abs(wav[:, :int(0.95 * SR)]).max() < 1e-3 and abs(np.abs(wav[:, int(1.1 * SR):]).max() - 0.8) < 0.01
    pcm = (0.5 * np.sin(np.arange(SR) / 10) * 32767).astype(np.int16)   # integer samples are scaled like a wav file's
    assert abs(np.abs(load_audio(pcm)).max() - 0.5) < 1e-3
    raises(ValueError, lambda: load_audio(np.full(SR, 1e30)), "[-1, 1]")   # finite, but no waveform
    raises(ValueError, lambda: load_audio(np.ones(SR, complex)), "real samples")


# -----------------------------------------------------------------------------
# evaluation (eval.py): the metrics' definitions, the judge and the metrics on it, the benchmark end to end, and
# the speed bench (--bench): the equivalences its ratios rest on, and that it runs (never the timings)

def levenshtein(a, b):
    """Plain word edit distance, the textbook DP."""
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[len(b)]

def test_tcpwer_properties_collar_speaker_permutations_and_transcript_parser():
    """tcpWER: the edit distance if all overlap, else bounded; the collar; speakers matched; transcripts parse back;
    the chat keeps an answer inside its clip."""
    rng = random.Random(0)
    for k in range(500):
        a, b = ([(w, s, s + (1.0 if k < 200 else rng.uniform(0, 2))) for w, s in
                 [(rng.choice("abcde"), 0.0 if k < 200 else rng.uniform(0, 10)) for _ in range(rng.randint(0, 8))]]
                for _ in range(2))   # 200 pairs all overlapping, then at random times
        r, plain = E.time_constrained_levenshtein(a, b), levenshtein([w for w, *_ in a], [w for w, *_ in b])
        assert r["errors"] == plain if k < 200 else plain <= r["errors"] <= len(a) + len(b)
        assert r["ins"] + r["del"] + r["sub"] == r["errors"] and r["ins"] - r["del"] == len(b) - len(a)
    counts = lambda r: (r["errors"], r["sub"], r["ins"], r["del"])  # noqa: E731
    ref, far = [("ava", 0.0, 2.0, "the old dog")], [("ava", 0.0, 1.4, "the old"), ("ava", 30.0, 30.5, "cat")]  # 28 s late
    for hyp, collar, want in [([("ava", 0.0, 2.0, "the old cat")], 5.0, (1, 1, 0, 0)), (far, 5.0, (2, 0, 1, 1)),
                              (far, 40.0, (1, 1, 0, 0))]:   # "cat" outside the 5 s collar; a wider one: a substitution again
        assert counts(E.tcp_wer(ref, hyp, collar=collar)) == want, (hyp, collar)
    ref = [("ava", 0.0, 1.5, "hello my friend"), ("ben", 1.0, 2.5, "the old dog runs home"), ("ava", 3.0, 4.0, "come here"),
           ("cleo", 4.0, 5.0, "go away")]
    hyp = [("ava", 0.1, 1.4, "hello my friend"), ("ben", 1.2, 2.5, "the dog runs home"), ("cleo", 3.0, 4.0, "come here now"),
           ("ava", 4.0, 5.0, "go away")]
    base = counts(E.tcp_wer(ref, hyp))
    for perm in itertools.permutations("pqr"):   # speakers are matched, whatever their names and order
        renamed = [(dict(zip(["ava", "ben", "cleo"], perm))[s], a, b, t) for s, a, b, t in hyp]
        assert counts(E.tcp_wer(ref, renamed)) == counts(E.tcp_wer(ref, renamed[::-1])) == base
    cross = E.tcp_wer([("ava", 0.0, 1.0, "a b")], [("ben", 0.0, 1.0, "a b")])
    assert E.tcp_wer(ref, ref)["errors"] == 0 < base[0] and cross["errors"] == 0 and cross["assignment"] == {"ava": "ben"}
    for ep in episodes():
        assert E.tcp_wer(E.reference_segments(ep.scene), E.parse_transcript(transcript(ep.scene)))["errors"] == 0
    text = "0.4-1.9 ava: the old dog runs\nnonsense line\n2.0-1.0 ben: backwards\n3.0-4.0 : nobody\n5.0-6.0 ben:"
    assert E.parse_transcript(text) == [("ava", 0.4, 1.9, "the old dog runs")]
    r = E.tcp_wer([("ava", 0.4, 1.9, "the old dog runs"), ("ben", 2.0, 3.0, "hello")], E.parse_transcript(text))
    assert (r["errors"], r["del"]) == (1, 1)   # the unparseable lines count as nothing: "hello" is missing
    answer = "0.6-2.2 dan: come home\nnonsense line\n2.4-3.6 dan: come home\n0.0-2.0 rain"   # about a 2.0 s clip
    assert within_clip(answer, 2.0) == ("0.6-2.0 dan: come home\nnonsense line\n0.0-2.0 rain", 2)   # cut, dropped
    assert within_clip("0.45-3.0 x\r\n1.0-1.5 y\n", 2.35) == ("0.45-2.3 x\r\n1.0-1.5 y\n", 1)   # to the last whole tenth
    assert within_clip(answer, 4.0)[0] is answer   # nothing past the end: the answer as it came

def test_listening_profile_scores_exactly_the_answer_and_sees_the_clip():
    model, tok, codec, _ = train.load_checkpoint(untrained_checkpoint())
    eps, seqs = E.load_episodes(tiny_dataset(), 3), train.load_dataset(tiny_dataset(), "test", tok, codec)[:3]
    for ep, seq in zip(eps, seqs):   # the positions scored predict the answer's tokens, then <|end|>
        assert tok.decode(seq["tokens"][1:][E.answer_positions(seq)]) == ep.answer + "<|end|>"
    profile = E.listening_profile(model, seqs, [ep.task for ep in eps])
    assert sum(p["n"] for p in profile.values()) == 3 and set(profile) <= {"transcribe", "describe"}
    for p in profile.values():   # an untrained model is unsure either way, but the clip changes its logits
        assert 5 < p["ce_clip"] < 9 and p["ce_clip"] != p["ce_without_clip"]

def test_kad_brute_force_reference_bandwidth_and_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    values = [E.kad(x, y + shift) for shift in (0.0, 0.25, 0.5, 1.0, 2.0)]   # ~0 for one distribution, growing with a shift
    assert abs(values[0]) < 0.5 and all(b > a for a, b in zip(values, values[1:])) and values[-1] > 20, values
    x, y = torch.randn(5, 3, generator=g).double(), torch.randn(4, 3, generator=g).double() + 0.5
    d = sorted(float(torch.dist(a, b)) for a, b in itertools.combinations(x, 2))   # the bandwidth: torch's median
    k = lambda a, b: np.exp(-float(torch.dist(a, b)) ** 2 / (2 * d[(len(d) - 1) // 2] ** 2))  # noqa: E731
    xx, yy = (np.mean([k(a, b) for a, b in itertools.permutations(z, 2)]) for z in (x, y))   # pairs of distinct rows
    assert abs(E.kad(x, y) - 100 * (xx + yy - 2 * sum(k(a, b) for a in x for b in y) / 20)) < 1e-9
    x, bw = torch.randn(50, 8, generator=g), E.median_pairwise_distance
    for scale in (0.1, 1.0, 10.0):   # evaluated sets of very different spreads: the bandwidth is the reference's
        y = scale * torch.randn(40, 8, generator=g)
        assert E.kad(x, y) == E.kad(x, y, bandwidth=bw(x)) != E.kad(x, y, bandwidth=bw(y))

def test_plan_and_caption_metrics_and_heldout_requests():
    """captionMultiFLAM, planValidity, planRecall, plan_edit_done by known answers; held-out wording is in no table."""
    assert E.plan_validity([None, "syntax", "past_end"]) == 100 / 3 and E.plan_validity([]) is None
    for ep in episodes():
        plan, lines = ep.story["plan"], caption(ep.story["plan"]).splitlines()   # a line per source
        assert E.caption_multiflam(caption(plan), plan) == 100.0 and E.caption_multiflam("garbage\n\n-", plan) == 0.0
        assert E.caption_multiflam("\n".join(lines[1:]), plan) == 100.0 * (len(lines) - 1) / len(lines)
        late = caption({**plan, "sources": [dict(s, start=s["start"] + 20) for s in plan["sources"]]})
        assert E.caption_multiflam(late, plan) == 0.0   # the right names at the wrong times
        assert E.plan_recall(plan, plan) == 100.0 and E.plan_recall(plan, None) == 0.0
        assert E.plan_recall(plan, {**plan, "sources": plan["sources"][:-1]}) == 100.0 * (len(lines) - 1) / len(lines)
    words = lambda text: set(re.findall(r"[a-z']+", text.lower()))   # noqa: E731
    tables = [getattr(simulate_data, name) for name in dir(simulate_data)
              if name.endswith("_WORDS") or name.startswith("STORY_") or name in ("BED_JOINERS", "MULTI_WORDS")]
    known = words(json.dumps(tables, default=str)) | set(VOCAB) | set(VOICES) | words(" ".join(E.CLASSES).replace("_", " "))
    for story, sources, *edit in E.HELDOUT:
        assert all(words(text) - known for text in [story, *edit[:1]]), (story, edit)
        assert all(E.named(s)["type"] in ("speech", "sfx", "ambience", "music") for s in sources)
    plan = run_calls(parse_calls('new_story()\nspeak(ben, "where is my dog")\nsfx(dog_bark, left)\nambience(rain)'), None, 0)
    ben, bark = "ben: where is my dog", {"edit": "remove", "target": "dog_bark"}
    down, left = {"edit": "volume", "target": ben, "direction": "down"}, {"edit": "move", "target": ben, "where": "left"}
    for calls, change, done in [
            ("remove(dog_bark)", bark, True), ("remove(rain)", bark, False), ("set_gain(ben, quieter)", down, True),
            ("set_gain(ben, louder)", down, False),
            ("replace(rain, wind)", {"edit": "change", "target": "rain", "to": {"sound": "wind"}}, True),
            ("set_pan(dog_bark, right)\nremove(rain)", {"edit": "move", "target": "dog_bark", "where": "right"}, False),
            ('speak(ava, "come here", end, right)', {"edit": "add", "source": "ava: come here", "where": "right"}, True),
            ("set_pan(ben, left)\nremove(dog_bark)", {"edit": "multi", "ops": [left, bark]}, True)]:
        assert E.plan_edit_done(change, plan, run_calls(parse_calls(calls), plan, 0)) == done, calls
    assert not E.plan_edit_done(bark, plan, None)

@functools.lru_cache()
def judge():
    """eval.py's judge, smaller (120 stories, 500 steps: ~1 min on 2 cores, ~91% frame F1, not ~95%), in TMP/eval."""
    return E.load_or_train_judge(os.path.join(TMP, "eval", "judge.pt"), verbose=False, n_stories=120, steps=500)

@functools.lru_cache()
def episodes():
    """A few StoryGen-Eval-toy-like dialogues (test-range seeds), read as eval.py reads them."""
    return [E.episode(make_dialogue(seed)[0]) for seed in range(20_000_000, 20_000_012)]

def test_judge_quality_multiflam_editflam_and_drift():
    """The judge hears the stories; editFLAM and deltaMultiFLAM tell right edits from wrong ones."""
    j, eps = judge(), episodes()
    wavs = [render(ep.story["plan"], ep.seed) for ep in eps]
    scores = [E.multiflam(j, wav, ep.story["plan"]) for ep, wav in zip(eps, wavs)]
    mismatched = [E.multiflam(j, wav, ep.story["plan"]) for ep, wav in zip(eps, wavs[1:] + wavs[:1])]   # another's audio
    assert j.info["frameF1"] >= 85 and np.mean(scores) >= max(70, np.mean(mismatched) + 30), (scores, mismatched)
    assert all(E.multiflam(j, w, eps[0].story["plan"]) == 0.0 for w in (None, np.zeros((2, 5 * SR), np.float32)))   # silence
    right, copied, drifts = [], [], []
    for ep in eps:
        for pb, e in zip([ep.story["plan"]] + [e["plan"] for e in ep.edits], ep.edits):   # every edit turn
            wb, wa, pa = render(pb, ep.seed), render(e["plan"], ep.seed), e["plan"]
            right.append(E.edit_flam(j, wb, wa, pb, pa, e["intent"], pb, ep.seed))
            copied.append(E.edit_flam(j, wb, wb, pb, pa, e["intent"], pb, ep.seed))   # the previous audio as the edit
            d = E.delta_multiflam(j, wb, wa, pb, pa)
            if d is not None:
                drifts.append(d)
                assert E.delta_multiflam(j, wb, None, pb, pa) >= d   # an edit that lost the audio drifts more
    assert np.mean(right) >= 75 and np.mean(copied) <= 10 and np.mean(drifts) <= 10, (right, copied, drifts)
    for ep, wav in zip(eps[:6], wavs):   # a removal: done; not heard; not in the plan; no audio
        plan = ep.story["plan"]
        target = max(plan["sources"], key=lambda s: s["gain_db"])   # a loud, clearly audible source
        after = {"duration": plan["duration"], "sources": [s for s in plan["sources"] if s is not target]}
        intent, removed = {"kind": "edit", "edit": "remove", "target": target["id"]}, render(after, ep.seed)
        assert [E.edit_flam(j, wav, w, plan, p, intent, plan, ep.seed) for w, p in
                ((removed, after), (wav, after), (removed, plan), (None, after))] == [100.0, 0.0, 0.0, 0.0]
    first, *rest = plan["sources"]   # what an edit leaves alone
    louder = {**plan, "sources": [dict(first, gain_db=min(6, first["gain_db"] + 6)), *rest]}
    assert [s["id"] for s in E.untouched(plan, louder)] == [s["id"] for s in rest]

def test_evaluate_end_to_end_writes_the_paper_tables():
    """An untrained checkpoint (garbage plans: its audio metrics 0 or missing, never a crash): eval.json, the report."""
    out, _ = os.path.join(TMP, "eval"), judge()   # the judge cached in out
    nocot = untrained_checkpoint("nocot/ckpt.pt", arch="mot", cot=False)   # an ablation beside it: no plans, no plan metrics
    results = E.evaluate(E.EvalConfig(ckpt=[untrained_checkpoint(), nocot], n=2, data_dir=tiny_dataset(), out_dir=out, steps=2))
    assert json.load(open(f"{out}/eval.json")) == json.loads(json.dumps(results)) and os.path.isfile(f"{out}/eval.png")
    assert {"judge", "n", "systems", "listening"} <= set(results) and results["n"] == 2
    page = open(os.path.join(out, "report.html")).read()   # the page, and every file it plays or shows
    src = re.findall(r"""src=["']([^"']+)""", page)
    assert sum(".wav" in x for x in src) >= 4 and "Dialogue 2" in page and all(os.path.isfile(f"{out}/{x}") for x in src)
    assert list(results["systems"]) == ["ground_truth", "audiochat", "cascade", "cascade_no_context", "audiochat_nocot",
                                        "audiochat_from_gt_audio"] and list(results["heldout"]) == ["audiochat"]
    no_plan, table5 = results["systems"]["audiochat_nocot"], results["systems"]["audiochat_from_gt_audio"]
    assert no_plan["storytelling"]["planValidity"] is no_plan["storytelling"]["planRecall"] is None
    assert no_plan["storytelling"]["multiFLAM"] is not None and no_plan["editing"]["overall"]["planValidity"] is None
    assert set(table5["storytelling"].values()) == {None} and table5["editing"]["overall"]["planValidity"] == 0
    for name, r in results["systems"].items():   # the paper's three tables, for every system
        assert set(r["understanding"]) == {"tcpWER", "captionMultiFLAM", "pastEnd"}
        assert set(r["editing"]) == {"overall", *EDIT_KINDS}
        assert {"editFLAM", "deltaMultiFLAM", "KAD"} <= set(r["editing"]["overall"]) and len(r) == 3
        assert {"multiFLAM", "KAD", "planValidity", "planRecall", "latency_s", "rtf"} <= set(r["storytelling"]), name
    sy, ours = results["systems"], results["systems"]["audiochat"]
    gt, story, edit = sy["ground_truth"]["storytelling"], ours["storytelling"], ours["editing"]["overall"]
    assert gt["planValidity"] == 100 and gt["KAD"] is None and sy["cascade"]["understanding"]["tcpWER"] is None
    assert sy["ground_truth"]["understanding"]["pastEnd"] == 0 and sy["cascade"]["understanding"]["pastEnd"] is None
    assert story["planValidity"] == story["multiFLAM"] == edit["editFLAM"] == 0 and edit["deltaMultiFLAM"] is None
    failed = story["planFailures"]   # an untrained model writes no tool calls
    assert set(failed) == set(PLAN_ERROR_KINDS) and failed["syntax"] == sum(failed.values()) == 2, failed

def test_bench_causal_lm_baseline_is_the_models_own_text_path():
    """The training row's baseline is the model's own layers as a plain GPT, under the same document mask."""
    dense = tiny_model(arch="dense")
    dense.shift = None   # a plain GPT: no token shift
    toks = torch.randint(0, 38, (2, 11), generator=torch.Generator().manual_seed(2))   # two documents of 6 and 5
    logits = torch.cat([dense(toks[:, a:b], torch.zeros(2, b - a, 8), torch.zeros(2, b - a), torch.full((2, b - a), -1))[0]
                        for a, b in ((0, 6), (6, 11))], 1)   # each document on its own
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), toks[:, 1:].flatten())
    assert torch.allclose(E.causal_lm_loss(dense, toks, torch.tensor([[0] * 6 + [1] * 5] * 2)), ce, atol=1e-5)

def test_bench_step_flops_by_hand():
    """MFU's numerator: 6 per weight per token, 12 n_layer n_embd per (query, key) pair of each packed document."""
    model = tiny_model()
    c, n = model.config, sum(p.numel() for p in model.parameters())
    batch = {"doc_id": torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]])}   # documents of 3, 2 and 4 tokens
    assert E.step_flops(model, batch) == 6 * n * 9 + 12 * (c.n_layer + c.n_gen_layer) * c.n_embd * (9 + 4 + 16)

def test_bench_writes_bench_json():
    """`eval.py --bench`, small, with no checkpoint and an untrained one: bench.json holds its ratios, all finite and > 0."""
    def numbers(x, key=""):   # (key, number) for every number in a nested value (booleans are not numbers)
        if isinstance(x, (dict, list)):
            return [kv for k, v in (x.items() if isinstance(x, dict) else ((key, v) for v in x)) for kv in numbers(v, k)]
        return [(key, x)] if isinstance(x, (int, float)) and not isinstance(x, bool) else []
    for ckpt in ([], [untrained_checkpoint()]):
        out, j = os.path.join(TMP, f"bench{len(ckpt)}"), E.Judge(width=16)   # an untrained judge, cached
        os.makedirs(out, exist_ok=True)
        torch.save(dict(model=j.state_dict(), args=j.args, classes=E.CLASSES, info={"frameF1": 50.0}), f"{out}/judge.pt")
        config = parse_config(E.EvalConfig, ["--bench", f"--out_dir={out}", "--steps=2", "--device=cpu",
                                             f"--data_dir={tiny_dataset()}", *(f"--ckpt={c}" for c in ckpt)])
        with one_thread(), mock.patch.multiple(E, SAMPLER_RUNS=(("ddim", 4), ("dpmpp", 2)), SAMPLER_STORIES=1, E2E_STORIES=1,
                                               DECODE_TOKENS=6, BENCH_DIALOGUES=4):
            results = E.bench(config, 1, dict(n_layer=1, n_gen_layer=1, n_head=2, n_embd=32, batch_size=2))   # 1 repeat
        assert json.load(open(os.path.join(out, "bench.json"))) == json.loads(json.dumps(results))
        assert results["training"]["slowdown"] > 0 and results["decoding"]["speedup"] > 0 and results["prefix_cache"]["rows"]
        assert ("rows" in results["samplers"]) == ("rtf" in results["end_to_end"]) == bool(ckpt)
        for key, x in numbers(results):   # finite and > 0; a few may be 0
            assert np.isfinite(x) and (x > 0 or (key in {"multiFLAM", "stderr", "with_audio"} and x == 0)), (key, x)


# -----------------------------------------------------------------------------
# runner: plain python, no pytest needed

def main(filters):
    counts, failed = {"PASS": 0, "FAIL": 0, "SKIP": 0}, []
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and (not filters or any(w in n for w in filters))]
    for name, fn in tests:
        t0, note, outcome = time.time(), "", "PASS"
        torch.manual_seed(0)
        np.random.seed(0)
        try:
            fn()
        except Skip as e:
            outcome, note = "SKIP", f": {e}"
        except (Exception, SystemExit) as e:   # a failing test, or one that calls sys.exit, must not stop the others
            traceback.print_exc()
            outcome, note = "FAIL", f": {type(e).__name__}: {e}"
            failed.append(name)
        counts[outcome] += 1
        print(f"{outcome} {name} ({time.time() - t0:.1f}s){note}", flush=True)
    print(f"\nfailed: {', '.join(failed)}" if failed else "")
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
