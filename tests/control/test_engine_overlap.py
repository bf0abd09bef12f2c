"""The engine launches decode step N+1 before it reads step N's tokens (control/inflight.py):
the launch order, tokens equal to the one-step-at-a-time reference, and finishing, aborting and
freeing while a launch is in flight."""

from __future__ import annotations

import pytest
from tiny_models import make_checkpoint

from spinserve.control.engine import LLMEngine
from spinserve.control.inflight import InFlight
from spinserve.control.request import PENDING
from spinserve.engines.build import build_engine
from spinserve.runtime.batch import ForwardMode
from spinserve.runtime.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 17, 99, 3], [42, 7, 7, 120, 64, 8, 1], [200, 31]]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("overlap")
    return build_engine(
        make_checkpoint("llama", d / "ckpt"), d / "engine", page_size=8, progress=False
    )


@pytest.fixture(scope="module")
def reference(engine_dir):
    """Greedy tokens of PROMPTS, one request at a time (nothing else in flight)."""
    eng = LLMEngine.from_engine_dir(engine_dir, device="cpu")
    return [eng.generate([p], GREEDY)[0].token_ids for p in PROMPTS]


def _engine(engine_dir, **kw) -> LLMEngine:
    """An engine whose kv.free fails if a launch still in flight (not waited for) decodes the
    request: on a GPU its kernels read the host-slot tables that the free rewrites."""
    eng = LLMEngine.from_engine_dir(engine_dir, device="cpu", **kw)
    free = eng.kv.free

    def guarded_free(request_id: str) -> None:
        launch = eng._inflight
        if launch is not None and not launch.done:
            assert all(r.request_id != request_id for r in launch.rows), "freed in flight"
        free(request_id)

    eng.kv.free = guarded_free
    return eng


def _run(eng: LLMEngine, params: list[SamplingParams]) -> dict[str, list]:
    for i, (p, sp) in enumerate(zip(PROMPTS, params)):
        eng.add_request(f"r{i}", p, sp)
    got: dict[str, list] = {f"r{i}": [] for i in range(len(PROMPTS))}
    while eng.has_unfinished():
        for out in eng.step():
            got[out.request_id].append(out)
    return got


def test_decode_launch_comes_before_the_previous_read(engine_dir, reference, monkeypatch):
    eng = _engine(engine_dir)
    log: list[str] = []
    forward, read = eng.runner.forward, InFlight.read

    def logged_forward(batch):
        log.append("prefill" if batch.mode is ForwardMode.PREFILL else "launch")
        return forward(batch)

    def logged_read(self):
        log.append("read")
        return read(self)

    eng.runner.forward = logged_forward
    monkeypatch.setattr(InFlight, "read", logged_read)
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", p, GREEDY)
    first = eng.step()  # prefill: first tokens sampled on the host
    assert log == ["prefill"] and [o.new_token_ids[0] for o in first] == [r[0] for r in reference]
    log.clear()
    assert eng.step() == [] and log == ["launch"]  # token 2 launched, nothing to read yet
    assert all(eng._requests[f"r{i}"].output_ids[-1] == PENDING for i in range(3))
    for step in range(3, GREEDY.max_tokens + 2):
        log.clear()
        outs = eng.step()
        # the previous launch's tokens, read after this step's launch (no launch after the last)
        assert log == (["launch", "read"] if step <= GREEDY.max_tokens else ["read"])
        assert sorted(o.request_id for o in outs) == ["r0", "r1", "r2"]
        for o in outs:
            i = int(o.request_id[1:])
            assert o.new_token_ids == [reference[i][step - 2]]
            assert o.finished == (step == GREEDY.max_tokens + 1)
    assert not eng.has_unfinished()
    eng.check_integrity()
    assert eng.kv.free_pages == eng.kv.capacity_pages


def test_stop_token_found_after_the_next_launch(engine_dir, reference):
    """r1 stops at a token it reads back only after the next step is launched: that step's
    token is dropped, and the other requests are unaffected."""
    stop_tok = reference[1][4]
    first = reference[1].index(stop_tok)
    params = [GREEDY, SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=(stop_tok,))]
    eng = _engine(engine_dir)
    got = _run(eng, params + [GREEDY])
    tokens = {r: [t for o in outs for t in o.new_token_ids] for r, outs in got.items()}
    assert tokens == {"r0": reference[0], "r1": reference[1][: first + 1], "r2": reference[2]}
    assert got["r1"][-1].finish_reason == "stop" and got["r1"][-1].finished
    assert [o.finished for o in got["r1"]].count(True) == 1
    eng.check_integrity()
    assert eng.kv.free_pages == eng.kv.capacity_pages


def test_length_finish_frees_pages_at_launch(engine_dir, reference):
    eng = _engine(engine_dir)
    eng.add_request("short", PROMPTS[0], SamplingParams(max_tokens=3, ignore_eos=True))
    eng.add_request("long", PROMPTS[1], GREEDY)
    outs = eng.step() + eng.step()  # token 1 of each (prefill); token 2 launched
    assert eng.kv.holds("short")
    outs += eng.step()  # token 3 (short's last) launched; token 2 read
    # out of the scheduler at once, its pages kept until the launch is read back
    assert eng._requests["short"] not in eng.scheduler.running and eng.kv.holds("short")
    assert "short" in eng._requests  # its last token is still on the device
    outs += eng.step()
    assert not eng.kv.holds("short") and eng.kv.holds("long")
    short = [o for o in outs if o.request_id == "short"]
    assert [o.new_token_ids[0] for o in short] == reference[0][:3]
    assert short[-1].finish_reason == "length" and short[-1].finished
    assert "short" not in eng._requests
    eng.check_integrity()
    while eng.has_unfinished():
        eng.step()
    assert eng.kv.free_pages == eng.kv.capacity_pages


def test_abort_with_a_token_in_flight(engine_dir, reference):
    eng = _engine(engine_dir)
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", p, GREEDY)
    before = [o.request_id for o in eng.step() + eng.step()]  # first tokens; token 2 launched
    assert eng._requests["r1"].output_ids[-1] == PENDING
    assert eng.abort("r1")
    eng.check_integrity()
    after: dict[str, list[int]] = {"r0": [], "r2": []}
    while eng.has_unfinished():
        for o in eng.step():
            assert o.request_id != "r1"
            after[o.request_id] += o.new_token_ids
    for rid, ref in (("r0", reference[0]), ("r2", reference[2])):
        assert after[rid] == ref[before.count(rid) :]
    eng.check_integrity()
    assert eng.kv.free_pages == eng.kv.capacity_pages


def test_preemption_waits_for_the_launch_in_flight(engine_dir, reference, monkeypatch):
    """A pool too small for every request: the scheduler preempts (freeing pages) only after
    waiting for the launch in flight; tokens still equal the one-at-a-time reference."""
    waits = []
    wait = InFlight.wait

    def logged_wait(self):
        waits.append(self.done)
        wait(self)

    monkeypatch.setattr(InFlight, "wait", logged_wait)
    eng = _engine(engine_dir, **{"cache.kv_cache_tokens": 32})  # 4 pages of 8 tokens
    got = _run(eng, [GREEDY] * 3)
    assert eng.stats()["num_preemptions"] > 0
    assert {r: [t for o in outs for t in o.new_token_ids] for r, outs in got.items()} == {
        f"r{i}": ref for i, ref in enumerate(reference)
    }
    assert waits  # fences and reads
    eng.check_integrity()
    assert eng.kv.free_pages == eng.kv.capacity_pages
