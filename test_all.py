"""
Every test of AudioChat-mini, in the order of the lecture (world, tokenizers, model, loss and samplers, caches,
training and chat, evaluation): plain functions with plain asserts of known answers, equivalences (backends, caches,
training's sequence against the chat's), properties (of metrics, of edits) and commands that really run. Untimed.

    python test_all.py            # all, on a CPU in a few minutes; ends "N passed, M failed, K skipped"
    python test_all.py codec bpe  # the tests whose name contains one of these words
    python -m pytest test_all.py  # the same under pytest

Read first: the known-answer tests (BPE, the mask by hand, the loss by hand, the Gaussian sampler), the
template test (test_chat_feeds_the_model_the_training_sequence) and the metric properties. Skim the plumbing.
"""
import contextlib, copy, functools, io, itertools, json, os, random, re, shutil, subprocess, sys, tempfile, time, traceback, warnings
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
from simulate_data import (AMBIENCES, EDIT_KINDS, LISTENING_TURNS, MAX_DURATION, MUSIC, PLAN_ERROR_KINDS, SFX, SPLIT_SEEDS, SR,
                           VOCAB, VOICES, WORD_CODES, PlanError, UserAgent, call_to_text, caption, dry_signal, make_dialogue,
                           make_listening_dialogue, parse_calls, plan_to_text, render, run_calls, speech_duration, synth_speech,
                           transcript, validate_plan)
from tokenizer import BPETokenizer, AudioCodec, encode_dialogue, SPECIAL_TOKENS, HOP, FRAME_RATE, N_MELS, PATCH, LATENT_DIM
from model import AudioChatModel, ModelConfig, span_positions, transfusion_mask
from diffusion import add_noise, alpha_sigma, cfg, ddim_sample, dpmpp_2m_sample, sample_audio, sample_noise_levels, \
    shift_noise_level, transfusion_forcing_loss
from train import collate, parse_config
from sample import Chat, SampleConfig, load_audio, save_turn

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
# the toy audio world (simulate_data.py)

def _good_plan():
    return {"duration": 5.0, "sources": [
        {"id": 1, "type": "speech", "voice": "ava", "text": "the old dog runs home", "start": 0.4,
         "dur": speech_duration("ava", "the old dog runs home"), "gain_db": 0, "pan": -0.4},
        {"id": 2, "type": "sfx", "sound": "dog_bark", "start": 2.6, "dur": 0.5, "gain_db": -4, "pan": 0.6},
        {"id": 3, "type": "ambience", "sound": "rain", "start": 0.0, "dur": 5.0, "gain_db": -20, "pan": 0.0},
        {"id": 4, "type": "music", "sound": "piano", "start": 0.0, "dur": 5.0, "gain_db": -22, "pan": 0.0}]}

def test_validate_plan_kinds():
    """Every way a laid-out plan can be inconsistent raises PlanError of the kind eval counts, naming the source."""
    validate_plan(_good_plan())
    src = lambda i, **kw: lambda p: p["sources"][i].update(**kw)  # noqa: E731
    for mutate, kind, sid in [
            (src(1, start=4.8), "past_end", 2), (src(1, start=-0.5), "past_end", 2), (lambda p: p.update(duration=12.0), "past_end", None),
            (lambda p: p["sources"].append(dict(p["sources"][0], id=5, start=0.9, pan=0.0)), "self_overlap", 5),
            (src(1, dur=0.9), "other", 2), (src(0, dur=1.0), "other", 1), (src(1, gain_db=12), "other", 2), (src(1, pan=1.5), "other", 2),
            (src(0, voice="zed"), "malformed", None), (src(1, sound="meteor"), "malformed", None), (src(2, sound="dog_bark"), "malformed", None)]:
        p = copy.deepcopy(_good_plan())
        mutate(p)
        assert raises(PlanError, lambda: validate_plan(p), *([f"source {sid}"] if sid else [])).kind == kind, (kind, p)

def test_tool_calls_replay_and_every_refusal_has_its_kind():
    """Calls <-> text exactly; every simulated dialogue's calls replay to its plans; every way a turn's calls can be
    wrong is a PlanError of the kind eval counts (never a TypeError...), and leaves the plan as it was."""
    story = parse_calls('new_story()\nspeak(ava, "the old dog runs home", left)\nsfx(dog_bark, while 1)\nambience(rain)')
    plan = run_calls(story, None, seed=0)
    assert plan == run_calls(story, None, seed=0) != run_calls(story, None, seed=1)   # a pure function of (calls, plan, seed)
    line, bark, rain = plan["sources"]
    assert [s["id"] for s in plan["sources"]] == [1, 2, 3] and line["pan"] <= -0.5 and rain["dur"] == plan["duration"]
    assert line["start"] <= bark["start"] < line["start"] + line["dur"]
    for seed in range(8):
        d, prev = make_dialogue(seed)[0], None
        for a in d["turns"][1:-2:2]:
            assert "\n".join(map(call_to_text, parse_calls(a["text"]))) == a["text"]
            prev = run_calls(parse_calls(a["text"]), prev, d["seed"])
            assert prev == a["plan"] and a["tool"] == plan_to_text(prev)
    frozen = copy.deepcopy(plan)
    for text, kind in [("hello", "syntax"), ("speak(ben", "syntax"), ('speak(zed, "hi")', "syntax"), ("", "syntax"),
                       ('shout(ben, "go home")', "malformed"), ('speak(ben, "the old dragon")', "malformed"), ("speak(ben)", "malformed"),
                       ("ambience(dog_bark)", "malformed"), ("replace(1, rain)", "malformed"), ("set_pan(1, left, right)", "malformed"),
                       ("remove(9)", "unknown_id"), ("sfx(bell, after 7)", "unknown_id"),
                       ('speak(ava, "hello my friend", while 1)', "self_overlap"), ("\n".join(["set_gain(3, much louder)"] * 4), "other"),
                       ("new_story()\n" + "\n".join(['speak(dan, "the old dog runs home")'] * 4), "past_end"),
                       ("new_story()\nsfx(bell, end)", "other"), ("sfx(bell)\nnew_story()", "other")]:
        assert raises(PlanError, lambda: run_calls(parse_calls(text), plan, seed=0)).kind == kind, text
    assert plan == frozen and raises(PlanError, lambda: run_calls(parse_calls("remove(1)"), None, 0)).kind == "other"
    rng = np.random.default_rng(0)   # any text at all: calls that run, or a PlanError
    pieces = ["speak(", "sfx(", "remove(", "set_gain(", "replace(", "new_story()", ")", ", ", '"', "ava", "bell", "home", "after 2",
              "while 9", "much quieter", "left", "\n", "3", "x"]
    for _ in range(300):
        try:
            run_calls(parse_calls("".join(pieces[i] for i in rng.integers(len(pieces), size=rng.integers(1, 12)))), plan, 0)
        except PlanError as e:
            assert e.kind in PLAN_ERROR_KINDS

def test_studio_edits_leave_untouched_stems_identical():
    plan = run_calls(parse_calls('new_story()\nspeak(ava, "the old dog runs home")\nsfx(dog_bark)\nambience(rain)\nmusic(piano)'), None, 7)
    _, before = render(plan, seed=7, stems=True)
    for text in ["sfx(bell, halfway, right)", "remove(2)", "set_gain(2, a bit louder)", "set_pan(2, left)", "replace(2, knock)",
                 "replace(1, ben)", "replace(3, wind)", 'speak(ben, "go home", after 1)']:
        edited = run_calls(parse_calls(text), plan, 7)
        _, after = render(edited, seed=7, stems=True)
        changed = {s["id"] for s in edited["sources"] if s not in plan["sources"]} | (set(before) - set(after))
        assert changed and all(np.array_equal(before[i], after[i]) == (i not in changed) for i in set(before) & set(after)), text
    d, _ = make_dialogue(3)   # a whole dialogue: every source whose plan entry is unchanged keeps its stem
    plans = [t["plan"] for t in d["turns"] if t["role"] == "assistant" and "audio" in t]
    stems = [render(p, d["seed"], stems=True)[1] for p in plans]
    for p0, p1, s0, s1 in zip(plans, plans[1:], stems, stems[1:]):
        assert all(np.array_equal(s0[s["id"]], s1[s["id"]]) for s in p1["sources"] if s in p0["sources"])

def test_render_is_seeded_and_every_sound_renders_cleanly():
    (d1, a1), (d2, a2), (d3, _) = make_dialogue(11), make_dialogue(11), make_dialogue(12)
    assert json.dumps(d1) == json.dumps(d2) != json.dumps(d3) and len(a1) == len(a2) and all(map(np.array_equal, a1, a2))
    dry_signal.cache_clear()   # the cache must not be what makes it deterministic
    x = render(_good_plan(), seed=1)
    assert np.array_equal(x, render(_good_plan(), seed=1)) and not np.array_equal(x, render(_good_plan(), seed=2))
    assert x.shape == (2, 5 * SR) and x.dtype == np.float32
    rows = [{"type": "sfx", "sound": s, "dur": L} for s, (L, _) in SFX.items()]
    rows += [{"type": t, "sound": s, "dur": 3.0} for t, names in (("ambience", AMBIENCES), ("music", MUSIC)) for s in names]
    rows += [{"type": "speech", "voice": v, "text": "hello my friend", "dur": speech_duration(v, "hello my friend")} for v in VOICES]
    for i, r in enumerate(rows):
        name = r.get("sound", r.get("voice"))
        x = render({"duration": 4.0, "sources": [{"id": 1, **r, "start": 0.2, "gain_db": 6, "pan": 0.3}]}, seed=i)
        assert np.isfinite(x).all() and np.abs(x).max() < 1.0, f"{name} clips"
        assert np.sqrt(np.mean(x[:, int(0.2 * SR): int((0.2 + r["dur"]) * SR)] ** 2)) > 0.01, f"{name} is (nearly) silent"
        assert np.abs(x[:, : int(0.2 * SR)]).max() == 0, f"{name} sounds before its start"
    loud = {**_good_plan(), "sources": [dict(s, gain_db=6) for s in _good_plan()["sources"]]}
    assert np.abs(render(loud, seed=0)).max() < 1.0   # a dense mix at full gain stays below clipping: the limiter

def test_speech_is_learnable():
    """The toy language can be learnt from log-mels by ridge regression (22 words x 6 voices x 3 seeds): words of
    unseen voices (0.92 measured), of an unseen seed (1.00), voices of unseen words (0.99); no two words one slip apart."""
    from simulate_data import _one_slip
    codes = list(WORD_CODES.values())
    assert len(set(codes)) == len(VOCAB) >= 100 and not any(set(_one_slip(c)) & set(codes[:i] + codes[i + 1:]) for i, c in enumerate(codes))
    words = VOCAB[::5][:22]
    keys = [(v, w, s) for v in VOICES for w in words for s in range(3)]
    raws = [AudioCodec().encode_raw(np.stack([x, x]))[:, :32] for x in (synth_speech(v, w, np.random.default_rng(s)) for v, w, s in keys)]
    # a word: its frames at 12 time steps, standardised; a voice: its spectrum's mean and spread over the loud frames
    xw = torch.stack([(r - r.mean()) / r.std() for r in
                      (F.interpolate(r.T[None], 12, mode="linear", align_corners=True)[0].T.reshape(-1) for r in raws)])
    xv = torch.stack([torch.cat([r[loud].mean(0), r[loud].std(0)]) for r, loud in ((r, r.mean(1) > r.mean(1).max() - 4) for r in raws)])

    def accuracy(x, y, train_on):   # ridge regression onto one-hot classes, fitted on train_on's keys, tested on the rest
        m, y = torch.tensor([train_on(*k) for k in keys]), torch.tensor(y)
        mean, std = x[m].mean(0), x[m].std(0) + 1e-5
        z = lambda a: torch.cat([(a - mean) / std, torch.ones(len(a), 1)], 1)  # noqa: E731
        W = torch.linalg.solve(z(x[m]).T @ z(x[m]) + 100 * torch.eye(x.shape[1] + 1), z(x[m]).T @ F.one_hot(y[m]).float())
        return ((z(x[~m]) @ W).argmax(-1) == y[~m]).float().mean().item()
    word_y, voice_y = [words.index(w) for _, w, _ in keys], [list(VOICES).index(v) for v, _, _ in keys]
    accs = (accuracy(xw, word_y, lambda v, w, s: v in ("ava", "ben", "cleo", "dan")), accuracy(xw, word_y, lambda v, w, s: s < 2),
            accuracy(xv, voice_y, lambda v, w, s: words.index(w) % 3 != 0))
    print(f"  speech: word accuracy {accs[0]:.3f} (unseen voices), {accs[1]:.3f} (unseen seed); voice {accs[2]:.3f} (unseen words)")
    assert accs[0] >= 0.85 and accs[1] >= 0.97 and accs[2] >= 0.9, accs

def test_user_agent_edits_any_small_plan():
    """Every edit kind, drawn many times on the smallest plans (one sfx; none; one speaker), ends and names valid sources."""
    one = {"id": 1, "start": 0.5, "gain_db": 0, "pan": 0.0}
    for sources in ([{**one, "type": "sfx", "sound": "bell", "dur": 1.5}], [],
                    [{**one, "type": "speech", "voice": "ava", "text": "the dog", "dur": speech_duration("ava", "the dog")}]):
        plan = {"duration": 4.0, "sources": sources}
        validate_plan(plan)
        for seed in range(150):
            intent = UserAgent().edit_intent(plan, np.random.default_rng(seed), EDIT_KINDS[seed % len(EDIT_KINDS)])
            assert all(op.get("target", 1) == 1 for op in (intent["ops"] if intent["edit"] == "multi" else [intent])), intent

def test_dialogue_structure():
    kinds = set()
    for seed in range(12):
        d, audios = make_dialogue(seed)
        turns = json.loads(json.dumps(d))["turns"]
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2) and 3 <= len(turns) // 2 <= 4
        assert turns[0]["intent"]["kind"] == "story" and all(isinstance(t["text"], str) for t in turns)
        for u, a in zip(turns[:-2:2], turns[1:-2:2]):
            p = a["plan"]
            validate_plan(p)
            assert a["tool"] == plan_to_text(p) and parse_calls(a["text"])   # an audio turn: its calls, the studio's plan
            assert 4.0 <= p["duration"] <= MAX_DURATION and audios[a["audio"]].shape == (2, round(p["duration"] * SR))
            assert len({s["voice"] for s in p["sources"] if s["type"] == "speech"}) <= 2
            kinds.add(u["intent"].get("edit"))
        u, a = turns[-2:]
        assert 2 <= len(turns[1]["plan"]["sources"]) <= 5 and a["plan"] != turns[1]["plan"]
        assert u["intent"]["kind"] == "understand" and u["audio"] == len(audios) - 1
        lines, srcs = a["text"].split("\n"), sorted(a["plan"]["sources"], key=lambda s: s["start"])
        if u["intent"]["task"] == "transcribe":   # one line per speech source, in time order; or one per source
            assert a["text"] == transcript(a["plan"])
            assert lines == [f"{s['start']:.1f}-{s['start'] + s['dur']:.1f} {s['voice']}: {s['text']}" for s in srcs if "voice" in s]
        else:
            assert a["text"] == caption(a["plan"]) and [float(x.split("-")[0]) for x in lines] == [s["start"] for s in srcs]
    assert len(kinds - {None}) >= 4 and kinds <= {None, *EDIT_KINDS}, kinds

def test_listening_dialogue_structure():
    """2-6 fresh scenes, each answered by its transcript or caption: learned in the joint stage, not in the text stage."""
    lengths = set()
    for seed in range(6):
        d, audios = make_listening_dialogue(SPLIT_SEEDS["listen"] + seed)
        turns = d["turns"]
        lengths.add(len(audios))
        assert [t["role"] for t in turns] == ["user", "assistant"] * len(audios) and LISTENING_TURNS[0] <= len(audios) <= LISTENING_TURNS[1]
        for k, (u, a) in enumerate(zip(turns[::2], turns[1::2])):
            validate_plan(a["plan"])
            assert u["intent"]["kind"] == "understand" and u["audio"] == k and audios[k].shape == (2, round(a["plan"]["duration"] * SR))
            assert a["text"] == (transcript if u["intent"]["task"] == "transcribe" else caption)(a["plan"])
        assert len({json.dumps(a["plan"]) for a in turns[1::2]}) == len(audios)   # distinct scenes
    assert len(lengths) > 1
    seq = encode_dialogue(d, [torch.zeros(a.shape[1] // 400 // 2 * 2, 64) for a in audios], _trained_tok())
    answers = sum(len(_trained_tok().encode_ordinary(a["text"])) + 1 for a in turns[1::2])
    assert int(seq["text_target"].sum()) == answers and not train.text_only(seq)["text_target"].any()

def test_dataset_on_disk():
    out = os.path.join(TMP, "dataset")
    simulate_data.write_dataset(out, n=4, n_eval=2, seed=0, workers=1, n_listen=2)
    assert sorted(os.listdir(out)) == ["listen_0000.pt", "meta.json", "test_0000.pt", "tokenizer.json", "train_0000.pt", "val_0000.pt"]
    meta, tok = json.load(open(f"{out}/meta.json")), BPETokenizer.load(f"{out}/tokenizer.json")
    ranges = sorted(meta["seeds"].values())   # disjoint seed ranges
    assert meta["counts"] == {"train": 4, "listen": 2, "val": 2, "test": 2} and meta["sr"] == SR
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    listen, shard = (torch.load(os.path.join(out, f"{split}_0000.pt"), weights_only=True) for split in ("listen", "train"))
    assert json.loads(listen["dialogues"][1]) == make_listening_dialogue(SPLIT_SEEDS["listen"] + 1)[0]
    assert len(shard["dialogues"]) == len(shard["audio"]) == 4
    d, codec = json.loads(shard["dialogues"][0]), AudioCodec.from_state_dict(meta["codec"])
    for lat, wav in zip(shard["audio"][0], make_dialogue(d["seed"])[1]):   # raw log-mels of the dialogue's clips, in float16
        assert lat.dtype == torch.float16 and lat.shape == (wav.shape[1] // 400, 64)
        assert torch.allclose(lat.float(), codec.encode_raw(wav), atol=0.02)
    assert tok.decode(tok.encode(d["turns"][1]["text"])) == d["turns"][1]["text"]


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
    assert [tok.special(s) for s in SPECIAL_TOKENS] == list(range(259, 259 + len(SPECIAL_TOKENS))) == list(range(259, tok.vocab_size))
    assert tok.encode("aaab aaab") == [258, 32, 258]  # two regex chunks, "aaab" and " aaab"
    tok = _trained_tok()   # and one trained on simulated dialogues: round trips, specials, unicode, save / load
    for text in ["", " ", "\n\n  x \t", "the old dog runs home", '{"start": 0.4, "gain_db": -12, "pan": -0.4}',
                 "héllo wörld ☔ 雨 🐕 -0.5e3 don't it's", "<|user|>Tell a story<|end|><|assistant|>{}<|audio|><|/audio|><|end|>",
                 "<|us<|user|>er|> <|nope|> <|pad|><|null|>"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and all(0 <= i < tok.vocab_size == 400 for i in ids), text
    assert tok.encode("<|user|>hi<|end|>") == [tok.special("<|user|>")] + tok.encode("hi") + [tok.special("<|end|>")]
    plain = tok.encode_ordinary("<|audio|>")   # special strings in text stay text: no forged roles
    assert len(plain) > 1 and not set(plain) & set(tok.special_ids.values()) and tok.decode(plain) == "<|audio|>"
    unseen = [t["text"] for t in make_dialogue(100)[0]["turns"]]   # merges learned: unseen calls take < 0.6 token a byte
    assert len(tok.encode(unseen[1])) < 0.6 * len(unseen[1].encode())
    raises(KeyError, lambda: tok.special("<|foo|>"), "<|foo|>")
    tok.save(os.path.join(TMP, "tok.json"))
    tok2 = BPETokenizer.load(os.path.join(TMP, "tok.json"))
    assert tok2.merges == tok.merges and all(tok2.encode(text) == tok.encode(text) for text in unseen + ["<|user|>ünïcode<|end|>"])
    raises(ValueError, lambda: BPETokenizer.from_state_dict(dict(tok.state_dict(), special_tokens=SPECIAL_TOKENS[:-1])), "special tokens")

def _scene(seconds=2.0, gains=((0.9, 0.3), (0.3, 0.9))):
    """Stereo scene: a harmonic tone with vibrato (panned by gains[0]), a noise burst (gains[1]), a faint bed."""
    rng, t = np.random.default_rng(0), np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(220 * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))) / SR
    tone = 0.2 * sum(np.sin(k * phase) / k for k in range(1, 8)) * (t < 1.2)
    burst = 0.1 * rng.standard_normal(t.size) * ((t > 0.8) & (t < 1.6))
    bed = 0.003 * rng.standard_normal((2, t.size))  # a faint ambience bed, as in every story
    return (np.stack([gains[0][c] * tone + gains[1][c] * burst for c in range(2)]) + bed).astype(np.float32)

def test_codec_shapes_patchify_normalize():
    assert (SR, FRAME_RATE, HOP, N_MELS, PATCH, LATENT_DIM) == (16000, 40, 400, 32, 2, 128)
    codec, x = AudioCodec(), _scene(1.0)
    raw = codec.encode_raw(x)
    assert raw.shape == (40, 64) and raw.dtype == torch.float32 and torch.equal(codec.encode_raw(torch.from_numpy(x)), raw)
    assert codec.encode_raw(x[:, :-1]).shape == (39, 64)  # T = N // HOP
    batch = codec.encode_raw(np.stack([x, x[::-1]]))
    assert batch.shape == (2, 40, 64) and torch.allclose(batch[0], raw) and torch.allclose(batch[1], raw.roll(32, -1))
    z = torch.randn(3, 40, 64)
    p = AudioCodec.patchify(z)
    assert p.shape == (3, 20, 128) and torch.equal(p[0, 3], torch.cat([z[0, 6], z[0, 7]])) and torch.equal(AudioCodec.unpatchify(p), z)
    assert torch.equal(AudioCodec.patchify(z[0]), p[0]) and torch.equal(AudioCodec.unpatchify(p[0]), z[0])
    codec.fit([raw, codec.encode_raw(_scene(1.0, gains=((0.5, 0.5), (0.1, 1.0))))])
    assert torch.allclose(codec.denormalize(codec.normalize(raw)), raw, atol=1e-5) and torch.allclose(codec.encode(x), codec.normalize(raw))
    assert torch.equal(AudioCodec.from_state_dict(json.loads(json.dumps(codec.state_dict()))).encode(x), codec.encode(x))
    raises(RuntimeError, lambda: AudioCodec().normalize(raw), "fit()")
    raises(ValueError, lambda: codec.encode_raw(x[:1]), "(2, N)")

def test_codec_roundtrip_quality():
    codec, x = AudioCodec(), _scene(2.0)
    raw = codec.encode_raw(x)
    y = codec.decode_raw(raw)
    assert y.shape == (2, 80 * HOP) and y.dtype == torch.float32 and y.abs().max() < 1.5 and torch.equal(codec.decode_raw(raw), y)
    assert (codec.encode_raw(y) - raw).abs().mean() < 0.3   # measured 0.23 nat = 1.0 dB mean log-mel distance
    for seg, want in ((slice(0, 12000), 9.0), (slice(20000, 25000), 1 / 9)):   # the panning survives: tone L 3x R, burst R 3x L
        ratio = (y[0, seg] ** 2).sum() / (y[1, seg] ** 2).sum()
        assert abs(np.log(ratio.item() / want)) < np.log(1.25), (ratio, want)  # within 1 dB (measured 0.03 dB)
    codec.fit([raw, codec.encode_raw(_scene(2.0, gains=((0.5, 0.5), (0.1, 1.0))))])
    z = codec.encode(x)   # normalised latents: encode(decode(z)) is close to z, in units of the per-dim std
    assert (codec.encode(codec.decode(z)) - z).abs().mean() < 0.15   # measured 0.10
    for far in (8.0, 1e4, float("nan")):   # latents far off the data (a high CFG scale) still decode to finite audio
        assert torch.isfinite(codec.decode(torch.full((20, 64), far))).all()

def test_encode_dialogue_layout():
    """The chat template by hand: every token, whether it is a CE target (the assistant's words, <|audio|>, <|end|>) and
    a plain word (what CFG drops); the spans' latents in order; a turn's "plan" never enters the sequence, its text does."""
    tok, lat = _trained_tok(), [torch.randn(8, 64), torch.randn(12, 64), torch.randn(4, 64)]  # 4, 6, 2 patches
    CALLS, PT, ANSWER, ignored = 'new_story()\nsfx(bell)', plan_to_text(_good_plan()), "0.4-2.1 ava: the old dog runs home", {"x": 1}
    seq = encode_dialogue({"seed": 1, "turns": [
        {"role": "user", "text": "Tell a story."}, {"role": "assistant", "text": CALLS, "tool": PT, "plan": ignored, "audio": 0},
        {"role": "user", "text": "Louder."}, {"role": "assistant", "text": "set_gain(1, louder)", "tool": PT, "plan": ignored, "audio": 1},
        {"role": "user", "text": "Who says what?", "audio": 2}, {"role": "assistant", "text": ANSWER, "plan": ignored}]}, lat, tok)
    raises(IndexError, lambda: encode_dialogue({"turns": [{"role": "user", "text": "hi", "audio": 5}]}, lat, tok), "audio 5")
    U, A, T, END, AU, CLOSE, P = map(tok.special, ("<|user|>", "<|assistant|>", "<|tool|>", "<|end|>", "<|audio|>", "<|/audio|>", "<|pad|>"))
    w = tok.encode
    pieces = [  # (ids, the assistant's: a CE target, plain words); the tool's plan is read, never learned
        ([U], 0, 0), (w("Tell a story."), 0, 1), ([END, A], 0, 0), (w(CALLS), 1, 1), ([T], 1, 0), (w(PT), 0, 1), ([AU], 1, 0),
        ([P] * 4 + [CLOSE], 0, 0), ([END], 1, 0),
        ([U], 0, 0), (w("Louder."), 0, 1), ([END, A], 0, 0), (w("set_gain(1, louder)"), 1, 1), ([T], 1, 0), (w(PT), 0, 1), ([AU], 1, 0),
        ([P] * 6 + [CLOSE], 0, 0), ([END], 1, 0),
        ([U], 0, 0), (w("Who says what?"), 0, 1), ([AU] + [P] * 2 + [CLOSE, END, A], 0, 0), (w(ANSWER), 1, 1), ([END], 1, 0)]
    expect = [i for ids, _, _ in pieces for i in ids]
    assert seq["tokens"].tolist() == expect and seq["tokens"].dtype == seq["span_id"].dtype == torch.long
    assert seq["text_target"].tolist() == [bool(a) for ids, a, _ in pieces for _ in ids][1:] + [False]  # i learns token i+1
    assert seq["is_plain_text"].tolist() == [bool(p) for ids, _, p in pieces for _ in ids]
    span = seq["span_id"]
    assert ((span >= 0) == (seq["tokens"] == P)).all() and seq["span_is_target"].tolist() == [True, True, False]
    for s in range(3):   # spans 0, 1, 2, each on consecutive positions, hold the patchified latents in order
        pos = (span == s).nonzero().flatten()
        assert (pos.diff() == 1).all() and torch.equal(seq["audio"][pos], AudioCodec.patchify(lat[s]))
    assert seq["audio"].shape == (len(expect), 128) and (seq["audio"][span < 0] == 0).all()


# -----------------------------------------------------------------------------
# the model (model.py)

def tiny_model(arch="sct", attn="sdpa", seed=0):
    """2 + 1 layers of width 32; the zero-initialised diffusion head and token shift get weights (caches must carry them)."""
    torch.manual_seed(seed)
    model = AudioChatModel(ModelConfig(vocab_size=40, latent_dim=8, n_layer=2, n_gen_layer=1, n_head=2, n_embd=32, block_size=128,
                                       arch=arch, attn=attn))
    torch.nn.init.normal_(model.diffusion_head.out.weight, std=0.1)
    torch.nn.init.normal_(model.shift.weight, std=0.3)
    return model

def random_sequence(layout, latent=8, seed=0):
    """layout: list of ("text", n) / ("audio", n) pieces -> tokens (L,), audio (L, latent), span_id (L,)."""
    g, span_id = torch.Generator().manual_seed(seed), []
    for k, (kind, n) in enumerate(layout):
        span_id += [-1] * n if kind == "text" else [sum(p[0] == "audio" for p in layout[:k])] * n
    return torch.randint(0, 40, (len(span_id),), generator=g), torch.randn(len(span_id), latent, generator=g), torch.tensor(span_id)

def random_batch():
    """Two rows of 24: text 0-4, span 0 at 5-10, text, span 1 at 15-19, text; and text 0-8, spans at 9-12 and 15-21."""
    rows = [random_sequence([("text", 5), ("audio", 6), ("text", 4), ("audio", 5), ("text", 4)], seed=1),
            random_sequence([("text", 9), ("audio", 4), ("text", 2), ("audio", 7), ("text", 2)], seed=2)]
    tokens, audio, span_id = (torch.stack(z) for z in zip(*rows))
    return tokens, audio, torch.where(span_id >= 0, torch.rand(span_id.shape, generator=torch.Generator().manual_seed(3)), 0.0), span_id

def test_model_mask_rule_and_span_positions_by_hand():
    span_id = torch.tensor([[-1, 0, 0, -1, 1, 1]])
    assert transfusion_mask(span_id)[0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                                            [1, 1, 1, 0, 0, 0],   # an audio token sees its whole span...
                                                            [1, 1, 1, 0, 0, 0],
                                                            [1, 1, 1, 1, 0, 0],   # ...text after it sees it causally
                                                            [1, 1, 1, 1, 1, 1],   # a later span sees earlier ones causally
                                                            [1, 1, 1, 1, 1, 1]]
    m = transfusion_mask(span_id, torch.tensor([[0, 0, 0, 1, 1, 1]]))[0]
    assert not m[3:, :3].any() and m[4, 5] and m[3, 3]  # nothing crosses documents
    span_id = torch.tensor([[-1, 0, 0, 0, -1, -1, 1, 1, -1, 2], [3, 3, -1, 4, 4, 4, 4, -1, -1, -1]])   # a span may open a chunk
    assert span_positions(span_id).tolist() == [[0, 0, 1, 2, 0, 0, 0, 1, 0, 0], [0, 1, 0, 0, 1, 2, 3, 0, 0, 0]]

def test_model_attention_backends_agree():
    """math, sdpa and flex: the same outputs, packed or not; math and sdpa the same gradients (no flex backward on a CPU)."""
    tokens, audio, t, span_id = random_batch()
    doc_id = torch.tensor([[0] * 12 + [1] * 12, [0] * 20 + [-1] * 4])   # two documents; one, then padding
    real = (doc_id >= 0)[..., None]   # padding's outputs are read by nothing, and backends may differ there
    outs = {}
    for b, doc in itertools.product(("math", "sdpa", "flex"), (None, doc_id)):
        model, x = tiny_model(attn=b), audio.clone().requires_grad_(b != "flex")   # the same seed: the same weights
        with torch.set_grad_enabled(b != "flex"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            logits, v = (y * real for y in model(tokens, x, t, span_id, doc))
        if b != "flex":
            (logits.square().mean() + v.square().mean()).backward()
        outs[b, doc is None] = [logits, v] + ([x.grad] + [p.grad for p in model.parameters()] if b != "flex" else [])
    for (b, nodoc), out in outs.items():
        for ref, other in zip(outs["math", nodoc], out):
            assert torch.allclose(ref, other, atol=1e-5), (b, nodoc, (ref - other).abs().max())

def test_model_flex_backward_on_cuda():
    """flex forward and backward against math on CUDA."""
    if not torch.cuda.is_available():
        raise Skip("no CUDA: FlexAttention has no backward on a CPU")
    tokens, audio, t, span_id, outs = *(z.cuda() for z in random_batch()), []
    for b in ("math", "flex"):
        model, x = tiny_model(attn=b).cuda(), audio.clone().requires_grad_(True)
        outs.append(model(tokens, x, t, span_id))
        (outs[-1][0].square().mean() + outs[-1][1].square().mean()).backward()
        outs[-1] += (x.grad, *(p.grad for p in model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*outs))

def test_model_mask_causality_and_span_bidirectional():
    """Nothing sees the future, but an audio token sees its whole span; a row never sees another (layout: random_batch)."""
    model, (tokens, audio, t, span_id) = tiny_model(), random_batch()
    logits, v = model(tokens, audio, t, span_id)
    tok2, aud2 = tokens.clone(), audio.clone()
    tok2[0, 13], aud2[0, 17] = (tok2[0, 13] + 1) % 40, aud2[0, 17] + 1.0   # a future text token, a later span
    logits2, v2 = model(tok2, aud2, t, span_id)
    assert torch.allclose(logits[0, :13], logits2[0, :13], atol=1e-6) and torch.allclose(v[0, :13], v2[0, :13], atol=1e-6)
    assert not torch.allclose(logits[0, 17:], logits2[0, 17:], atol=1e-4)
    aud3 = audio.clone()
    aud3[0, 9] += 1.0                          # a later token of span 0 ...
    logits3, v3 = model(tokens, aud3, t, span_id)
    assert not torch.allclose(v[0, 5], v3[0, 5], atol=1e-4)  # ... reaches an earlier token of it
    assert torch.allclose(logits[0, :5], logits3[0, :5], atol=1e-6)  # but not the text before the span
    assert torch.equal(logits[1], logits3[1]) and torch.equal(v[1], v3[1])  # nor the other row

def test_model_sct_text_ignores_generation_layers():
    tokens, audio, t, span_id = random_batch()
    for arch in ("sct", "dense"):
        model = tiny_model(arch=arch)
        logits, v = model(tokens, audio, t, span_id)
        with torch.no_grad():
            for p in model.blocks[model.config.n_layer:].parameters():
                p.add_(0.5 * torch.randn_like(p))
        logits2, v2 = model(tokens, audio, t, span_id)
        assert not torch.allclose(v, v2, atol=1e-4) and torch.allclose(logits, logits2, atol=1e-6) == (arch == "sct"), arch
        text_logits, none = model(tokens, audio, t, span_id, layers="text")  # the text stage's path
        assert none is None and torch.allclose(text_logits, logits2, atol=1e-6), arch

def test_rope_attention_sees_relative_positions():
    """A query at m and a key at n score as at m + c, n + c; so a dialogue packed after another gives the same outputs."""
    from model import rotary, rotate
    q, k = torch.randn(2, 3, 1, 16), torch.randn(2, 3, 1, 16)
    scores = [(rotate(q, rotary(torch.tensor([m]), 16)) * rotate(k, rotary(torch.tensor([n]), 16))).sum(-1)
              for m, n in ((7, 3), (107, 103), (3, 7))]
    assert torch.allclose(scores[0], scores[1], atol=1e-4) and not torch.allclose(scores[0], scores[2], atol=1e-3)
    model, (tokens, audio, t, span_id) = tiny_model(), random_batch()
    alone = model(tokens[:1, 14:], audio[:1, 14:], t[:1, 14:], span_id[:1, 14:])
    packed = model(tokens[:1], audio[:1], t[:1], span_id[:1], doc_id=torch.tensor([[1] * 14 + [0] * 10]))
    assert all(torch.allclose(a, p[:, 14:], atol=1e-5) for a, p in zip(alone, packed))

def test_model_audio_embedding_norm_matches_text():
    """A patch enters at the text embeddings' mean norm, whatever its scale (the paper's stabiliser): the rescaled projection
    is odd in the patch and the conditions added (noise level, time in span) do not depend on it, so it is (in(+x) - in(-x)) / 2."""
    model, (tokens, audio, t, span_id) = tiny_model(), random_batch()
    model.shift = None   # the embeddings alone, without the token shift's mix of the previous one
    plus, minus = (model.embed(tokens, s * audio, t, span_id)[0] for s in (10.0, -10.0))
    norms = ((plus - minus) / 2)[span_id >= 0].norm(dim=-1)
    assert torch.allclose(norms, model.wte.weight.norm(dim=1).mean().expand_as(norms), rtol=1e-5)


# -----------------------------------------------------------------------------
# the loss (diffusion.py) on batches made by train.collate, the samplers, the caches

def test_noise_levels_one_per_span_clean_context_and_shift():
    t = torch.linspace(0.05, 0.95, 19)
    for shift in (1.0, 3.0):   # the shift divides alpha / sigma by `shift`; the ends stay put
        (a, s), (a2, s2) = alpha_sigma(t), alpha_sigma(shift_noise_level(t, shift))
        assert torch.allclose(a2 / s2, a / s / shift, rtol=1e-4) and shift_noise_level(torch.tensor([0.0, 1.0]), shift).tolist() == [0, 1]
    B, n_spans, n = 200, 4, 5
    span_id = torch.cat([torch.full((B, 3), -1), torch.arange(n_spans).repeat_interleave(n).repeat(B, 1)], 1)  # text first
    is_target = torch.tensor([True, False, True, True]).repeat(B, 1)    # span 1 supplied by the user
    t = sample_noise_levels(span_id, is_target, generator=torch.Generator().manual_seed(0))
    per_span = t[:, 3:].view(B, n_spans, n)
    targets, user = per_span[:, [0, 2, 3], 0], per_span[:, 1, 0]
    assert (t[:, :3] == 0).all() and (per_span == per_span[..., :1]).all()   # text is clean; one t per span ...
    assert (targets[:, 0] != targets[:, 1]).all() and (targets[:, 1] != targets[:, 2]).all()  # ... each its own
    assert abs(targets.mean().item() - 0.5) < 0.05                      # t ~ U(0, 1)
    assert 0.8 < (user == 0).float().mean().item() < 0.97 and user.max() <= 0.1  # the user's: mostly clean, else small
    shifted = sample_noise_levels(span_id, is_target, shift=3.0, generator=torch.Generator().manual_seed(0))[:, 3:].view(B, n_spans, n)
    assert torch.allclose(shifted[:, [0, 2, 3]], shift_noise_level(per_span[:, [0, 2, 3]], 3.0))
    assert (shifted[:, 1] == user[:, None]).all()   # the user's audio is not shifted
    assert abs(shifted[:, [0, 2, 3], 0].median().item() - 0.795) < 0.05  # (2/pi) atan(3)

def fake_dialogue(layout, is_target, seed):
    """A dict shaped like tokenizer.encode_dialogue's output (L tokens, 8-float latents); the last words are the assistant's."""
    tokens, audio, span_id = random_sequence(layout, seed=seed)
    text_target = torch.arange(len(tokens)).ge(len(tokens) - 6) & torch.arange(len(tokens)).lt(len(tokens) - 1)
    return {"tokens": tokens, "audio": torch.where((span_id >= 0)[:, None], audio, 0.0), "span_id": span_id,
            "span_is_target": torch.tensor(is_target), "text_target": text_target, "is_plain_text": span_id < 0}

def two_rows(n_audio=(4, 3, 4)):
    """A batch of two dialogues: one with an assistant span, one with a user's span then an assistant's."""
    return collate([[fake_dialogue([("text", 6), ("audio", n_audio[0]), ("text", 9)], [True], seed=1)],
                    [fake_dialogue([("text", 4), ("audio", n_audio[1]), ("text", 3), ("audio", n_audio[2]), ("text", 7)],
                                   [False, True], seed=2)]], pad_id=39)

def test_collate_pads_and_packs():
    a = fake_dialogue([("text", 4), ("audio", 3), ("text", 8)], [True], seed=1)          # 15 tokens
    b = fake_dialogue([("text", 3), ("audio", 2), ("text", 2), ("audio", 2), ("text", 7)], [False, True], seed=2)  # 16
    batch = collate([[a], [b]], pad_id=39)
    assert batch["tokens"].shape == (2, 16) and batch["span_is_target"].tolist() == [[True, False], [False, True]]  # padded with False
    assert batch["is_pad"][0, 15] and batch["tokens"][0, 15] == 39 and batch["span_id"][0, 15] == -1
    packed = collate([[a, b]], pad_id=39)
    assert packed["tokens"].shape == (1, 31) and not packed["is_pad"].any() and packed["doc_id"][0].tolist() == [0] * 15 + [1] * 16
    assert packed["span_id"][0, 15 + 3] == 1 and packed["span_id"][0, 15 + 7] == 2  # spans counted across the row
    assert packed["span_is_target"][0].tolist() == [True, False, True]

def test_loss_equals_ce_plus_5_mse_by_hand():
    model, batch = tiny_model(), two_rows()
    loss, ce, mse = transfusion_forcing_loss(model, batch, null_id=38, cfg_drop_p=0.0, generator=torch.Generator().manual_seed(7))
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
    assert len(errs) == 8 and len(ces) == 10 and torch.allclose(ce, ce_hand, atol=1e-5) and torch.allclose(mse, mse_hand, atol=1e-6)
    assert torch.allclose(loss, ce_hand + 5 * mse_hand, atol=1e-5)
    assert transfusion_forcing_loss(model, batch, null_id=38, cfg_drop_p=1.0)[1] == 0  # text dropped to <|null|>: no CE
    batch = collate([[fake_dialogue([("text", 6), ("audio", 4), ("text", 9)], [False], 1)]], pad_id=39)   # no target span:
    loss, ce, mse = transfusion_forcing_loss(model, batch, null_id=38, cfg_drop_p=0.0)          # the text stage
    loss.backward()
    assert mse == 0 and loss == ce > 0   # loss = ce, and the generation layers are not even run
    assert all((p.grad is None) == (k >= model.config.n_layer) for k, block in enumerate(model.blocks) for p in block.parameters())

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

def test_kv_cache_matches_full_forward():
    """Text token by token (U layers), audio spans as chunks (all layers, G catching up): the outputs of one forward."""
    tokens, audio, span_id = (z[None] for z in random_sequence([("text", 5), ("audio", 4), ("text", 3), ("audio", 3), ("text", 3)], seed=4))
    t = torch.where(span_id >= 0, torch.rand(span_id.shape), 0.0)
    chunks = [*(slice(i, i + 1) for i in range(5)), slice(5, 9), *(slice(i, i + 1) for i in range(9, 12)), slice(12, 15),
              *(slice(i, i + 1) for i in range(15, 18))]
    for arch in ("sct", "dense"):
        model = tiny_model(arch=arch)
        logits, v = model(tokens, audio, t, span_id)
        cache = model.new_cache(1)
        for sl in chunks:
            text = bool(span_id[0, sl.start] < 0)
            lg, vv = model.extend(cache, tokens[:, sl], audio[:, sl], t[:, sl], span_id[:, sl], layers="text" if text else "all")
            assert torch.allclose(lg, logits[:, sl], atol=1e-5) and (text or torch.allclose(vv, v[:, sl], atol=1e-5)), (arch, sl)
        assert len(cache) == tokens.size(1)

def test_prefix_cache_sample_audio_matches_recompute():
    """sample_audio after a cached prefix gives the latents of a forward over it all per step (eval's baseline), guided
    or not, DDIM and DPM-Solver++; the next token then sees the clean span as a full forward does."""
    model = tiny_model()
    seq = fake_dialogue([("text", 5), ("audio", 4), ("text", 3), ("audio", 5), ("text", 2)], [False, True], seed=6)
    for sampler, null_id in (("ddim", 38), ("dpmpp", 38), ("dpmpp", None)):
        prefix, n = E.prefix_rows(seq, 1, null_id, "cpu")   # all before span 1; with null_id, a row with words -> <|null|>
        with one_thread():
            x = [E.sample_after(model, prefix, n, 4, sampler, 3.0 if null_id else 1.0, torch.Generator().manual_seed(1), cached)
                 for cached in (True, False)]
        assert x[0].shape == (1, 5, 8) and torch.allclose(x[0], x[1], atol=1e-5), (sampler, null_id, (x[0] - x[1]).abs().max())
    cache, (tokens, audio, t, span_id), L = model.new_cache(1), prefix, prefix[0].size(1)
    model.extend(cache, tokens, audio, t, span_id)
    x0 = sample_audio(model, cache, n, steps=3, sampler="dpmpp", cfg_scale=1.0)
    logits = model.extend(cache, torch.tensor([[3]]), torch.zeros(1, 1, 8), torch.zeros(1, 1), torch.tensor([[-1]]), layers="text")[0]
    full = model(F.pad(tokens, (0, n + 1), value=3), torch.cat([audio, x0, torch.zeros(1, 1, 8)], 1), torch.zeros(1, L + n + 1),
                 torch.cat([span_id, torch.full((1, n), 1), torch.tensor([[-1]])], 1))[0]
    assert torch.allclose(logits[:, 0], full[:, -1], atol=1e-5) and len(cache) == L + n + 1


# -----------------------------------------------------------------------------
# training (train.py) and chat (sample.py), on a tiny simulated dataset

def test_overfit_one_batch():
    model, batch, g, first = tiny_model(), two_rows((6, 5, 5)), torch.Generator().manual_seed(0), None
    opt = model.configure_optimizers(weight_decay=0.0, learning_rate=5e-3, betas=(0.9, 0.95), device_type="cpu")
    with one_thread():
        for step in range(300):
            loss, ce, mse = transfusion_forcing_loss(model, batch, null_id=38, generator=g)
            first = first if step else (ce.item(), mse.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():  # average a few noise draws for a steady figure
        last = torch.tensor([transfusion_forcing_loss(model, batch, 38, cfg_drop_p=0.0, generator=g)[1:] for _ in range(20)]).mean(0)
    assert last[0] < 0.01 * first[0] and last[1] < 0.4 * first[1], (first, last)

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

def untrained_checkpoint():
    """A 1+1-layer untrained model on tiny_dataset's tokenizer and codec: its plans are garbage."""
    path = os.path.join(TMP, "untrained.pt")
    if not os.path.exists(path):
        tok, meta = BPETokenizer.load(f"{tiny_dataset()}/tokenizer.json"), json.load(open(f"{tiny_dataset()}/meta.json"))
        torch.manual_seed(0)
        model = AudioChatModel(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_gen_layer=1, n_head=2, n_embd=32))
        train.save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), model.config, train.TrainConfig(), tok,
                              AudioCodec.from_state_dict(meta["codec"]), 0, None)
    return path

def test_train_writes_checkpoint_log_and_plot():
    out, printed = os.path.join(TMP, "train"), io.StringIO()
    with contextlib.redirect_stdout(printed):   # says: a dataset smaller than asked; the listening dialogues trained on
        rows = run_train(f"--out_dir={out}", "--max_iters=4", "--eval_interval=2")
    assert all(x in printed.getvalue() for x in ("holds 12 train dialogues, fewer than", "holds 3 listen", "15 train dialogues packed"))
    assert all(os.path.getsize(os.path.join(out, f)) for f in ("ckpt.pt", "log.csv", "loss.png"))
    assert [r["iter"] for r in rows][:4] == [0, 1, 2, 3] and rows[-1]["val_ce"] != ""
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["iter_num"] == 4 and {"model", "optimizer", "model_args", "config", "tokenizer", "codec"} <= set(ckpt)
    assert {f"val_x0_t{k}" for k in range(5)} <= set(open(os.path.join(out, "log.csv")).readline().strip().split(","))
    val = ckpt["val"]   # the last validation: losses, and the x0-hat error in 5 bins of the noise level
    assert set(val) == {"loss", "ce", "mse", "x0_err"} and len(val["x0_err"]) == 5
    assert val["x0_err"][-1] > 0.5, val   # nearly untrained: at t near 1 it knows almost nothing of x0

def test_text_only_stage_cuts_the_audio_and_the_answer_about_it():
    (d, audios), tok = make_dialogue(5), _trained_tok()
    seq = encode_dialogue(d, [torch.zeros(a.shape[1] // 400 // 2 * 2, 64) for a in audios], tok)
    text = train.text_only(seq)
    assert (text["span_id"] == -1).all() and len(text["span_is_target"]) == 0 and len(text["tokens"]) == int((seq["span_id"] < 0).sum())
    assert (text["tokens"] == tok.special("<|audio|>")).sum() == len(audios)   # the markers stay
    # every plan token is still learned; the answer (after the user's clip) is not
    words = tok.decode([int(x) for x, learn in zip(text["tokens"][1:], text["text_target"][:-1]) if learn])
    assert all(t["text"] in words for t in d["turns"] if "audio" in t and t["role"] == "assistant") and d["turns"][-1]["text"] not in words
    learned = int(seq["text_target"].sum()) - int(text["text_target"].sum())
    assert learned == len(tok.encode_ordinary(d["turns"][-1]["text"])) + 1   # the answer and its <|end|>

def test_train_resume_is_exact():
    """6 steps straight, or 3 + resume for 3 more: the same losses, step for step."""
    half, flags = os.path.join(TMP, "halves"), ["--eval_interval=3", "--lr_decay_iters=6"]
    straight = run_train(f"--out_dir={os.path.join(TMP, 'straight')}", "--max_iters=6", *flags)
    run_train(f"--out_dir={half}", "--max_iters=3", *flags)
    resumed = run_train(f"--out_dir={half}", "--max_iters=6", "--init_from=resume", *flags)
    a, b = ([float(r["loss"]) for r in rows if r.get("loss", "") != ""] for rows in (straight, resumed))
    assert len(a) == len(b) == 6 and np.allclose(a, b, rtol=1e-5, atol=1e-6), (a, b)
    files = [os.path.join(half, f) for f in ("ckpt.pt", "log.csv")]   # resuming backwards: refused, nothing touched
    before = [open(f, "rb").read() for f in files]
    expect_exit(lambda: run_train(f"--out_dir={half}", "--max_iters=1", "--init_from=resume", *flags), "already at step 6")
    assert [open(f, "rb").read() for f in files] == before

def test_command_lines_refuse_bad_flags_in_one_line():
    """train, sample and eval (train.parse_config): an unknown, mistyped or out-of-range flag is one line, before any work."""
    for cls, flags, word in [(train.TrainConfig, ["--nonsense=1"], "unknown argument"), (SampleConfig, ["--cfg=loud"], "--cfg"),
                             (train.TrainConfig, ["--max_iters=ten"], "--max_iters"), (train.TrainConfig, ["--n_listen=-1"], "--n_listen"),
                             (E.EvalConfig, ["--ckpt", "a.pt", "--bogus=1"], "--bogus")]:
        expect_exit(lambda: parse_config(cls, flags), word)
    for cls, flag, rule in [(train.TrainConfig, "--eval_interval=0", ">= 1"), (train.TrainConfig, "--log_interval=0", ">= 1"),
                            (train.TrainConfig, "--batch_size=0", ">= 1"), (train.TrainConfig, "--arch=foo", "sct | dense"),
                            (train.TrainConfig, "--noise_shift=nan", "finite"), (SampleConfig, "--steps=0", "1..1000"),
                            (SampleConfig, "--sampler=euler", "ddim | dpmpp"), (E.EvalConfig, "--steps=-1", "1..1000")]:
        expect_exit(lambda: parse_config(cls, [flag]), flag.split("=")[0], rule)   # off the menu or out of range
    for flags, words in [(["--n_embd=60", "--n_head=4"], "odd width 15"), (["--n_embd=96", "--n_head=32"], "odd width 3"),
                         (["--n_head=7"], "not divisible"), (["--attn=flex"], "--attn=sdpa")]:   # a shape or backend
        expect_exit(lambda: train.check_config(parse_config(train.TrainConfig, flags, train.PRESETS), "cpu"), *words)
    a_file = os.path.join(TMP, "a_file")
    open(a_file, "w").write("not a folder")
    for cls in (train.TrainConfig, SampleConfig, E.EvalConfig):   # an out dir that is a file: refused before any work
        expect_exit(lambda: parse_config(cls, [f"--out_dir={a_file}"]), "--out_dir", "is a file")
    expect_exit(lambda: run_train(f"--out_dir={os.path.join(TMP, 'nothing')}", "--init_from=resume"), "no checkpoint")
    r = subprocess.run([sys.executable, "train.py", "--max_iters=ten"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "error: --max_iters" in r.stderr and "Traceback" not in r.stderr, r.stderr[-300:]
    c = parse_config(E.EvalConfig, ["--ckpt", "a.pt", "--ckpt=b.pt", "--n", "3", "--steps=10"])
    assert c.ckpt == ["a.pt", "b.pt"] and c.n == 3 and c.steps == 10 and c.data_dir == "data"
    assert E.system_names(["out/ckpt.pt", "out/dense/ckpt.pt", "x/dense/ckpt.pt"]) == ["audiochat", "audiochat_dense", "audiochat_dense_2"]

def test_ddp_two_processes_on_cpu():
    out = os.path.join(TMP, "ddp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py", f"--data_dir={tiny_dataset()}",
                        f"--out_dir={out}", *TINY, "--max_iters=2", "--eval_interval=2"],
                       cwd=HERE, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and os.path.exists(os.path.join(out, "ckpt.pt")), r.stderr[-2000:]

def test_chat_feeds_the_model_the_training_sequence():
    """A simulated dialogue teacher-forced through sample.Chat (the model "chooses" its calls or answer; the rest, the
    studio's plan included, is Chat's code): Chat commits encode_dialogue's tokens, its guidance row nulls the words training drops for CFG, the
    user's clip enters as trained on, each span has its length; the audio turns come back and save as files."""
    d, audios = make_dialogue(5)
    chat = Chat.from_checkpoint(untrained_checkpoint(), "cpu", steps=1, cfg_scale=3.0, max_new_tokens=10_000, seed=d["seed"])
    tok, V, extend, decode, committed, forced = chat.tok, chat.model.config.vocab_size, chat.model.extend, chat._decode, [], []

    def recording_extend(cache, tokens, audio, t, span_id, layers="all", commit=True):
        if commit:   # (tokens, audio, span_id) of every chunk the cache keeps
            committed.append((tokens, audio, span_id))
        return extend(cache, tokens, audio, t, span_id, layers=layers, commit=commit)

    def choose():   # logits whose argmax is the next forced id
        return F.one_hot(torch.tensor(forced.pop(0) if forced else 0), V).float()

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
        kind = u["intent"]["kind"]
        reply = (chat.understand(audios[u["audio"]], u["text"]) if kind == "understand" else
                 (chat.generate if kind == "story" else chat.edit)(u["text"]))
        assert reply.text == a["text"] and not forced and not reply.error, (reply.text, reply.error)
        if "audio" in a:
            assert reply.plan == a["plan"] and reply.wav.shape == audios[a["audio"]].shape and np.isfinite(reply.wav).all()
            paths = save_turn(reply, os.path.join(TMP, "chat"), f"turn_{a['audio']}")
            assert [os.path.splitext(p)[1] for p in paths] == [".json", ".wav", ".png"] and all(map(os.path.getsize, paths))
    seq = encode_dialogue(d, [chat.codec.encode(a) for a in audios], tok)
    (tokens, audio, span_id), text, heard = (torch.cat(z, 1) for z in zip(*committed)), seq["span_id"] < 0, train.user_audio(seq)
    assert tokens.shape == (2, len(text)) and ((span_id < 0) == text).all()   # the same layout, the same span lengths
    assert torch.equal(tokens[0][text], seq["tokens"][text])
    assert torch.equal(tokens[1][text], torch.where(seq["is_plain_text"], tok.special("<|null|>"), seq["tokens"])[text])
    assert heard.any() and torch.allclose(audio[:, heard], seq["audio"][heard].expand(2, -1, -1), atol=1e-5)

def test_chat_cached_decoding_equals_full_recompute():
    """Chat's greedy decoding through the KV cache picks the tokens of eval's bench baseline (a forward per token)."""
    chat = Chat.from_checkpoint(untrained_checkpoint(), "cpu", cfg_scale=1.0, max_new_tokens=12)
    with torch.no_grad():   # random weights large enough that it writes varied tokens, not one repeated
        for k, p in enumerate(chat.model.parameters()):
            if p.dim() > 1:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(k))
    tok = chat.tok
    prompt = [tok.special("<|user|>"), *tok.encode_ordinary('Tell a story: ava says "the dog runs home".'),
              tok.special("<|end|>"), tok.special("<|assistant|>")]
    cached, _ = chat._decode(chat._feed(prompt, [False] * len(prompt)))
    stop = {tok.special("<|tool|>"), tok.special("<|audio|>"), tok.special("<|end|>")}
    recomputed = E.recompute_decode(chat.model, prompt, 12, stop)
    assert len(set(recomputed)) > 3 and cached == tok.decode([i for i in recomputed if i not in stop]), (cached, recomputed)

def test_chat_reports_an_invalid_plan_and_goes_on():
    chat = Chat.from_checkpoint(untrained_checkpoint(), "cpu", max_new_tokens=6)  # 6 tokens: never a whole plan
    for empty in (lambda: chat.generate(""), lambda: chat.edit("  "), lambda: chat.understand(np.zeros((2, SR)), "")):
        raises(ValueError, empty, "empty")
    assert len(chat.cache) == 0   # an empty request leaves the dialogue as it was
    turn = chat.generate('Tell a story: ava says "the dog runs home".')
    before = len(chat.cache)
    again = chat.edit("Make it quieter.")
    assert turn.wav is None and turn.plan is None and turn.error and again.wav is None and again.error and len(chat.cache) > before

def test_load_audio_resamples_and_refuses_long_audio():
    import soundfile as sf
    path = os.path.join(TMP, "mono44k.wav")
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(44100 * 1.25)) / 44100)).astype(np.float32), 44100)
    wav = load_audio(path)
    assert wav.shape == (2, 20800) and np.allclose(wav[0], wav[1])  # 1.25 s -> 1.3 s of whole tenths, mono -> stereo
    assert abs(np.argmax(np.abs(np.fft.rfft(wav[0, :16000]))) - 440) <= 1   # still at 440 Hz after resampling
    sf.write(path, np.zeros(16000 * 9, np.float32), 16000)
    raises(ValueError, lambda: load_audio(path), "at most")
    edge = np.zeros(2 * 44100, np.float32)   # silent 1 s, then loud to the last sample: its end must not wrap to 0 s
    edge[44100:] = 0.8 * np.sin(2 * np.pi * 440 * np.arange(44100) / 44100)
    sf.write(path, edge, 44100)
    wav = load_audio(path)
    assert np.abs(wav[:, :int(0.95 * SR)]).max() < 1e-3 and abs(np.abs(wav[:, int(1.1 * SR):]).max() - 0.8) < 0.01
    pcm = (0.5 * np.sin(np.arange(SR) / 10) * 32767).astype(np.int16)   # integer samples are scaled like a wav file's
    assert abs(np.abs(load_audio(pcm)).max() - 0.5) < 1e-3
    raises(ValueError, lambda: load_audio(np.full(SR, 1e30)), "[-1, 1]")   # finite, but no waveform
    raises(ValueError, lambda: load_audio(np.ones(SR, complex)), "real samples")

def test_corrupt_or_missing_checkpoint_is_one_clear_error():
    bad = os.path.join(TMP, "corrupt.pt")
    open(bad, "wb").write(b"this is not a checkpoint")
    for path in (bad, os.path.join(TMP, "missing.pt")):
        r = subprocess.run([sys.executable, "sample.py", f"--ckpt={path}", "--prompt=hello"], cwd=HERE, capture_output=True, text=True)
        assert r.returncode != 0 and "error:" in r.stderr and path in r.stderr and "Traceback" not in r.stderr, r.stderr[-500:]


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

def test_tcpwer_properties_collar_and_speaker_permutations():
    """All intervals overlapping, tcpWER is the word edit distance; else between it and len(ref) + len(hyp); a word
    outside the collar is a deletion plus an insertion; speakers are matched whatever their names and order."""
    rng = random.Random(0)
    for k in range(500):
        a, b = ([(w, s, s + (1.0 if k < 200 else rng.uniform(0, 2))) for w, s in
                 [(rng.choice("abcde"), 0.0 if k < 200 else rng.uniform(0, 10)) for _ in range(rng.randint(0, 8))]] for _ in range(2))
        r, plain = E.time_constrained_levenshtein(a, b), levenshtein([w for w, *_ in a], [w for w, *_ in b])
        assert r["errors"] == plain if k < 200 else plain <= r["errors"] <= len(a) + len(b)
        assert r["ins"] + r["del"] + r["sub"] == r["errors"] and r["ins"] - r["del"] == len(b) - len(a)   # a hyp word: matched, sub or ins
    counts = lambda r: (r["errors"], r["sub"], r["ins"], r["del"])  # noqa: E731
    ref = [("ava", 0.0, 2.0, "the old dog")]
    far = [("ava", 0.0, 1.4, "the old"), ("ava", 30.0, 30.5, "cat")]   # "cat" 28 s late: outside the 5 s collar
    assert counts(E.tcp_wer(ref, [("ava", 0.0, 2.0, "the old cat")], collar=5.0)) == (1, 1, 0, 0)
    assert counts(E.tcp_wer(ref, far, collar=5.0)) == (2, 0, 1, 1)
    assert counts(E.tcp_wer(ref, far, collar=40.0))[:2] == (1, 1)  # a collar wide enough makes it a substitution again
    ref = [("ava", 0.0, 1.5, "hello my friend"), ("ben", 1.0, 2.5, "the old dog runs home"), ("ava", 3.0, 4.0, "come here"),
           ("cleo", 4.0, 5.0, "go away")]
    hyp = [("ava", 0.1, 1.4, "hello my friend"), ("ben", 1.2, 2.5, "the dog runs home"), ("cleo", 3.0, 4.0, "come here now"),
           ("ava", 4.0, 5.0, "go away")]
    base = counts(E.tcp_wer(ref, hyp))
    renamed = [({"ava": "x", "ben": "y", "cleo": "z"}[s], a, b, t) for s, a, b, t in reversed(hyp)]
    for perm in itertools.permutations(["p", "q", "r"]):   # speakers are matched, whatever their names and order
        relabel = dict(zip(["ava", "ben", "cleo"], perm))
        assert counts(E.tcp_wer(ref, renamed)) == counts(E.tcp_wer(ref, [(relabel[s], a, b, t) for s, a, b, t in hyp])) == base
    crossed = E.tcp_wer([("ava", 0.0, 1.0, "a b")], [("ben", 0.0, 1.0, "a b")])
    assert E.tcp_wer(ref, ref)["errors"] == 0 < base[0] and crossed["errors"] == 0 and crossed["assignment"] == {"ava": "ben"}

def test_transcript_parser_and_true_answer():
    for ep in episodes():
        assert E.tcp_wer(E.reference_segments(ep.scene), E.parse_transcript(transcript(ep.scene)))["errors"] == 0
    text = "0.4-1.9 ava: the old dog runs\nnonsense line\n2.0-1.0 ben: backwards\n3.0-4.0 : nobody\n5.0-6.0 ben:"
    assert E.parse_transcript(text) == [("ava", 0.4, 1.9, "the old dog runs")]
    r = E.tcp_wer([("ava", 0.4, 1.9, "the old dog runs"), ("ben", 2.0, 3.0, "hello")], E.parse_transcript(text))
    assert (r["errors"], r["del"]) == (1, 1)   # the unparseable lines count as nothing: "hello" is missing

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
    d = sorted(float(torch.dist(a, b)) for a, b in itertools.combinations(x, 2))
    k = lambda a, b: np.exp(-float(torch.dist(a, b)) ** 2 / (2 * d[(len(d) - 1) // 2] ** 2))  # noqa: E731  (bandwidth: torch's median)
    xx, yy = (sum(k(z[i], z[j]) for i in range(len(z)) for j in range(len(z)) if i != j) / (len(z) * (len(z) - 1)) for z in (x, y))
    assert abs(E.kad(x, y) - 100 * (xx + yy - 2 * sum(k(a, b) for a in x for b in y) / 20)) < 1e-9
    x = torch.randn(50, 8, generator=g)
    for scale in (0.1, 1.0, 10.0):   # evaluated sets of very different spreads: the bandwidth is the reference's
        y = scale * torch.randn(40, 8, generator=g)
        assert E.kad(x, y) == E.kad(x, y, bandwidth=E.median_pairwise_distance(x)) != E.kad(x, y, bandwidth=E.median_pairwise_distance(y))

def test_caption_multiflam_and_plan_metrics():
    for ep in episodes():
        plan, lines = ep.story["plan"], caption(ep.story["plan"]).splitlines()
        assert E.caption_multiflam(caption(plan), plan) == 100.0 and E.caption_multiflam("garbage\n\n-", plan) == 0.0
        assert E.caption_multiflam("\n".join(lines[1:]), plan) == 100.0 * (len(lines) - 1) / len(lines)
        shifted = "\n".join(f"{float(a.split('-')[0]) + 20:.1f}-{float(a.split('-')[1]) + 20:.1f} {n}"
                            for a, n in (x.split(" ", 1) for x in lines))
        assert E.caption_multiflam(shifted, plan) == 0.0   # the right names at the wrong times
        assert E.plan_validity([None, "syntax", "past_end"]) == 100 / 3 and E.plan_validity([]) is None
        assert E.plan_recall(plan, plan) == 100.0 and E.plan_recall(plan, None) == 0.0
        assert E.plan_recall(plan, {**plan, "sources": plan["sources"][:-1]}) == 100.0 * (len(plan["sources"]) - 1) / len(plan["sources"])

def test_heldout_requests_stay_held_out_and_edits_are_scored_on_plans():
    words = lambda text: set(re.findall(r"[a-z']+", text.lower()))   # noqa: E731
    tables = [getattr(simulate_data, name) for name in dir(simulate_data) if name.endswith("_WORDS") or name.startswith("STORY_")
              or name in ("BED_JOINERS", "MULTI_WORDS")]
    known = words(json.dumps(tables, default=str)) | set(VOCAB) | set(VOICES) | words(" ".join(E.CLASSES).replace("_", " "))
    for story, sources, *edit in E.HELDOUT:   # every request has a word no phrase table uses
        assert all(words(text) - known for text in [story, *edit[:1]]), (story, edit)
        assert all(E.named(s)["type"] in ("speech", "sfx", "ambience", "music") for s in sources)
    plan = run_calls(parse_calls('new_story()\nspeak(ben, "where is my dog")\nsfx(dog_bark, left)\nambience(rain)'), None, 0)
    ben = "ben: where is my dog"
    for calls, change, done in [
            ("remove(2)", {"edit": "remove", "target": "dog_bark"}, True), ("remove(3)", {"edit": "remove", "target": "dog_bark"}, False),
            ("set_gain(1, quieter)", {"edit": "volume", "target": ben, "direction": "down"}, True),
            ("set_gain(1, louder)", {"edit": "volume", "target": ben, "direction": "down"}, False),
            ("replace(3, wind)", {"edit": "change", "target": "rain", "to": {"sound": "wind"}}, True),
            ("set_pan(2, right)\nremove(3)", {"edit": "move", "target": "dog_bark", "where": "right"}, False),   # and more
            ('speak(ava, "come here", end, right)', {"edit": "add", "source": "ava: come here", "where": "right"}, True),
            ("set_pan(1, left)\nremove(2)", {"edit": "multi", "ops": [{"edit": "move", "target": ben, "where": "left"},
                                                                   {"edit": "remove", "target": "dog_bark"}]}, True)]:
        assert E.plan_edit_done(change, plan, run_calls(parse_calls(calls), plan, 0)) == done, calls
    assert not E.plan_edit_done({"edit": "remove", "target": "dog_bark"}, plan, None)

TEST_JUDGE = os.path.join(TMP, "judge.pt")

@functools.lru_cache()
def judge():
    """A smaller judge than eval.py's (120 stories, 500 steps: ~1 min on 2 cores, ~91% frame F1 instead of ~95%)."""
    return E.load_or_train_judge(TEST_JUDGE, verbose=False, n_stories=120, steps=500)

@functools.lru_cache()
def episodes():
    """A few StoryGen-Eval-toy-like dialogues (test-range seeds), read as eval.py reads them."""
    return [E.episode(make_dialogue(seed)[0]) for seed in range(20_000_000, 20_000_012)]

@functools.lru_cache()
def edit_cases():
    """(episode, wav_before, wav_after, plan_before, plan_after, intent) for every edit turn."""
    return [(ep, render(before, ep.seed), render(e["plan"], ep.seed), before, e["plan"], e["intent"]) for ep in episodes()
            for before, e in zip([ep.story["plan"]] + [e["plan"] for e in ep.edits], ep.edits)]

def test_judge_quality_and_ground_truth_multiflam():
    j, eps = judge(), episodes()
    wavs = [render(ep.story["plan"], ep.seed) for ep in eps]
    scores = [E.multiflam(j, wav, ep.story["plan"]) for ep, wav in zip(eps, wavs)]
    # the same plans heard in another story's audio: what a judge that ignores the audio would give
    mismatched = [E.multiflam(j, wav, ep.story["plan"]) for ep, wav in zip(eps, wavs[1:] + wavs[:1])]
    assert j.info["frameF1"] >= 85 and np.mean(scores) >= 70 and np.mean(scores) >= np.mean(mismatched) + 30, (j.info, scores, mismatched)
    assert E.multiflam(j, None, eps[0].story["plan"]) == 0.0 == E.multiflam(j, np.zeros((2, 5 * SR), np.float32), eps[0].story["plan"])

def test_editflam_and_drift_on_right_and_wrong_edits():
    j, right, copied, drifts = judge(), [], [], []
    for ep, wb, wa, pb, pa, intent in edit_cases():
        right.append(E.edit_flam(j, wb, wa, pb, pa, intent, pb, ep.seed))
        copied.append(E.edit_flam(j, wb, wb, pb, pa, intent, pb, ep.seed))   # the previous audio presented as the edit
        d = E.delta_multiflam(j, wb, wa, pb, pa)
        if d is not None:
            drifts.append(d)
            assert E.delta_multiflam(j, wb, None, pb, pa) >= d   # an edit that lost the audio drifts more
    assert np.mean(right) >= 75 and np.mean(copied) <= 10 and np.mean(drifts) <= 10, (right, copied, drifts)
    for ep in episodes()[:6]:   # a removal: done; not heard; not in the plan; no audio
        plan = ep.story["plan"]
        target = max(plan["sources"], key=lambda s: s["gain_db"])   # a loud, clearly audible source
        after = {"duration": plan["duration"], "sources": [s for s in plan["sources"] if s is not target]}
        intent, wav, removed = {"kind": "edit", "edit": "remove", "target": target["id"]}, render(plan, ep.seed), render(after, ep.seed)
        assert [E.edit_flam(j, wav, w, plan, p, intent, plan, ep.seed) for w, p in
                ((removed, after), (wav, after), (removed, plan), (None, after))] == [100.0, 0.0, 0.0, 0.0]
    louder = {**plan, "sources": [dict(plan["sources"][0], gain_db=min(6, plan["sources"][0]["gain_db"] + 6)), *plan["sources"][1:]]}
    assert [s["id"] for s in E.untouched(plan, louder)] == [s["id"] for s in plan["sources"][1:]]   # what an edit leaves alone

def test_evaluate_end_to_end_writes_the_paper_tables():
    """An untrained checkpoint (garbage plans: its audio metrics 0 or missing, never a crash): eval.json, the report."""
    out = os.path.join(TMP, "eval")
    os.makedirs(out, exist_ok=True)
    judge()   # make sure the cache exists, then lend it
    shutil.copy(TEST_JUDGE, os.path.join(out, "judge.pt"))
    results = E.evaluate(E.EvalConfig(ckpt=[untrained_checkpoint()], n=2, data_dir=tiny_dataset(), out_dir=out, steps=2))
    assert json.load(open(os.path.join(out, "eval.json"))) == json.loads(json.dumps(results)) and os.path.isfile(f"{out}/eval.png")
    assert {"judge", "n", "systems", "listening"} <= set(results) and results["judge"]["frameF1"] >= 85 and results["n"] == 2
    page = open(os.path.join(out, "report.html")).read()   # the page, and every file it plays or shows
    linked = re.findall(r'src="([^"]+)"', page) + re.findall(r"src='([^']+)'", page)
    assert sum(x.endswith(".wav") for x in linked) >= 4 and "Dialogue 2" in page and all(os.path.isfile(f"{out}/{x}") for x in linked)
    assert list(results["systems"]) == ["ground_truth", "audiochat", "cascade", "cascade_no_context"]
    for name, r in results["systems"].items():   # the paper's three tables, for every system
        assert set(r) == {"storytelling", "editing", "understanding"} and set(r["understanding"]) == {"tcpWER", "captionMultiFLAM"}
        assert set(r["editing"]) == {"overall", *EDIT_KINDS} and {"editFLAM", "deltaMultiFLAM", "KAD"} <= set(r["editing"]["overall"])
        assert {"multiFLAM", "KAD", "planValidity", "planRecall", "latency_s", "rtf"} <= set(r["storytelling"]), name
    sy = results["systems"]
    gt, story, edit = sy["ground_truth"]["storytelling"], sy["audiochat"]["storytelling"], sy["audiochat"]["editing"]["overall"]
    assert gt["planValidity"] == 100 and gt["KAD"] is None and sy["cascade"]["understanding"]["tcpWER"] is None
    assert story["planValidity"] == story["multiFLAM"] == edit["editFLAM"] == 0 and edit["deltaMultiFLAM"] is None   # no audio, no drift
    failed = story["planFailures"]   # an untrained model writes no tool calls
    assert set(failed) == set(PLAN_ERROR_KINDS) and failed["syntax"] == sum(failed.values()) == 2, failed

def test_bench_causal_lm_baseline_is_the_models_own_text_path():
    """The training row's baseline is the model's own layers as a plain GPT, under the same document mask (the other rows':
    test_chat_cached_decoding_equals_full_recompute, test_prefix_cache_sample_audio_matches_recompute)."""
    dense = tiny_model(arch="dense")
    dense.shift = None   # a plain GPT: no token shift
    toks, doc_id = torch.randint(0, 38, (2, 11), generator=torch.Generator().manual_seed(2)), torch.tensor([[0] * 6 + [1] * 5] * 2)
    logits = torch.cat([dense(toks[:, a:b], torch.zeros(2, b - a, 8), torch.zeros(2, b - a), torch.full((2, b - a), -1))[0]
                        for a, b in ((0, 6), (6, 11))], 1)   # each document on its own
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), toks[:, 1:].flatten())
    assert torch.allclose(E.causal_lm_loss(dense, toks, doc_id), ce, atol=1e-5)

def test_bench_writes_bench_json():
    """`eval.py --bench`, small, with no checkpoint and an untrained one: bench.json holds its ratios, all finite and > 0."""
    def numbers(x, key=""):   # (key, number) for every number in a nested value (booleans are not numbers)
        if isinstance(x, (dict, list)):
            return [kv for k, v in (x.items() if isinstance(x, dict) else ((key, v) for v in x)) for kv in numbers(v, k)]
        return [(key, x)] if isinstance(x, (int, float)) and not isinstance(x, bool) else []
    for ckpt in ([], [untrained_checkpoint()]):
        out, j = os.path.join(TMP, f"bench{len(ckpt)}"), E.Judge(width=16)
        os.makedirs(out, exist_ok=True)
        torch.save({"model": j.state_dict(), "args": {"width": 16, "dilations": [c.dilation[0] for c in j.convs]}, "classes": E.CLASSES,
                    "info": {"frameF1": 50.0}}, os.path.join(out, "judge.pt"))
        config = parse_config(E.EvalConfig, ["--bench", f"--out_dir={out}", "--steps=2", "--device=cpu", f"--data_dir={tiny_dataset()}",
                                             *(f"--ckpt={c}" for c in ckpt)])
        with one_thread(), mock.patch.multiple(E, SAMPLER_RUNS=(("ddim", 4), ("dpmpp", 2)), SAMPLER_STORIES=1, E2E_STORIES=1,
                                               DECODE_TOKENS=6, BENCH_DIALOGUES=4):
            results = E.bench(config, repeats=1, model_overrides=dict(n_layer=1, n_gen_layer=1, n_head=2, n_embd=32, batch_size=2))
        assert json.load(open(os.path.join(out, "bench.json"))) == json.loads(json.dumps(results))
        assert results["training"]["slowdown"] > 0 and results["decoding"]["speedup"] > 0 and results["prefix_cache"]["rows"]
        assert ("rows" in results["samplers"]) == ("rtf" in results["end_to_end"]) == bool(ckpt)
        assert all(np.isfinite(x) and (x > 0 or (key in {"multiFLAM", "stderr", "with_audio"} and x == 0)) for key, x in numbers(results))


# -----------------------------------------------------------------------------
# runner: plain python, no pytest needed

def main(filters):
    counts, failed = {"PASS": 0, "FAIL": 0, "SKIP": 0}, []
    for name, fn in [(n, f) for n, f in globals().items() if n.startswith("test_") and (not filters or any(w in n for w in filters))]:
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
