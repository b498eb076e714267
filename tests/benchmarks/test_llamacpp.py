"""llama.cpp as a peer of the e2e benchmark: its build cache, its GGUF, its worker, its token check.

Everything but the last two tests runs without llama.cpp: the build module's "already built" logic
on fake cache directories, the converter's placeholder vocabulary on a fake model class, the
worker's run of a stand-in driver (a script printing what the real one prints), the job, and
the near-tie rule as the harness applies it. The GGUF test needs llama.cpp's sources, the
end-to-end test its compiled driver: both use the user's cached build
(``python -m benchmarks.e2e.llamacpp_build``) and are skipped, saying so, without it; CI does not
compile llama.cpp.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.e2e import llamacpp_build, worker
from benchmarks.e2e.__main__ import config_from, parser
from benchmarks.e2e.accelerate_peer import _strip
from benchmarks.e2e.cgroup import cgroups_usable
from benchmarks.e2e.compare import Comparison, PointPlan
from benchmarks.e2e.llamacpp_build import (
    CMAKE_FLAGS,
    LlamaCppBuild,
    driver_digest,
    ensure_built,
    expected_stamp,
    extract_vendored,
    find_build,
    is_built,
)
from benchmarks.e2e.llamacpp_convert import ensure_gguf, gguf_path, placeholder_vocab
from benchmarks.e2e.llamacpp_peer import (
    LlamaCppSetup,
    driver_argv,
    eos_token_ids,
    measurements,
    parse_driver_output,
    prepare,
    run_llamacpp,
)
from benchmarks.e2e.model import weight_files
from benchmarks.e2e.near_tie import BF16_EPS, ROUNDINGS, Parting, judge, partings, prefix, tolerance
from benchmarks.e2e.report import format_point
from benchmarks.e2e.results import Point, RunRecord, SystemResult, TokenMismatch
from benchmarks.e2e.runner import Runner, RunnerSettings
from benchmarks.e2e.systems import (
    NEAR_TIE_SYSTEMS,
    SYSTEMS,
    Budget,
    Inputs,
    describe_llamacpp,
    llamacpp_job,
)
from benchmarks.e2e.worker import ACCELERATE, LLAMACPP, REFERENCE_LOGITS, Job
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.units import GIB
from tests import numerics
from tests.checkpoints import BOS_ID, EOS_ID, VOCAB_SIZE, load_reference, make_checkpoint

# Evaluated at collection, before tests/conftest.py points the cache at an empty directory for the
# session: the user's cached llama.cpp, if built.
USER_ROOT = llamacpp_build.default_root()
BUILD = find_build(USER_ROOT)
SOURCES = LlamaCppBuild(USER_ROOT) if LlamaCppBuild(USER_ROOT).converter.is_file() else None
needs_sources = pytest.mark.skipif(
    SOURCES is None,
    reason=f"needs llama.cpp's sources in {USER_ROOT}: python -m benchmarks.e2e.llamacpp_build (CI does not)",
)
needs_build = pytest.mark.skipif(
    BUILD is None,
    reason=f"needs the cached llama.cpp build in {USER_ROOT}: python -m benchmarks.e2e.llamacpp_build "
    "(minutes of compiling; CI does not)",
)

BUDGET = Budget(0.5, 1 * GIB, 1 * GIB)


# ---- the build cache -------------------------------------------------------------------------


def _fake_build(root: Path, stamp: dict[str, object] | None = None) -> LlamaCppBuild:
    """A cache directory that looks built: a driver, the converter, and ``stamp`` (the expected one)."""
    build = LlamaCppBuild(root)
    build.driver.parent.mkdir(parents=True)
    build.driver.write_bytes(b"\x7fELF")
    build.sources.mkdir(parents=True)
    build.converter.write_text("# convert_hf_to_gguf.py\n")
    build.stamp.write_text(json.dumps(stamp if stamp is not None else expected_stamp()))
    return build


def test_a_complete_cache_is_built_and_anything_less_is_not(tmp_path: Path) -> None:
    assert not is_built(LlamaCppBuild(tmp_path / "empty"))
    build = _fake_build(tmp_path / "done")
    assert is_built(build) and find_build(build.root) == build
    build.driver.unlink()
    assert not is_built(build) and find_build(build.root) is None
    stale = _fake_build(tmp_path / "stale", {**expected_stamp(), "cmake_flags": ["-DGGML_NATIVE=OFF"]})
    assert not is_built(stale)
    other = _fake_build(tmp_path / "other", expected_stamp("0.3.1"))
    assert not is_built(other) and is_built(other, "0.3.1")
    garbled = _fake_build(tmp_path / "garbled")
    garbled.stamp.write_text("{not json")
    assert not is_built(garbled)


def test_an_existing_build_is_not_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = _fake_build(tmp_path / "done")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"ran {args[0] if args else kwargs}")

    monkeypatch.setattr("benchmarks.e2e.llamacpp_build.subprocess.run", refuse)
    monkeypatch.setattr("benchmarks.e2e.llamacpp_build.subprocess.Popen", refuse)
    lines: list[str] = []
    assert ensure_built(build.root, progress=lines.append) == build
    assert lines == []


def test_a_changed_driver_source_changes_the_stamp(tmp_path: Path) -> None:
    sources = tmp_path / "driver"
    shutil.copytree(llamacpp_build.DRIVER_SOURCES, sources)
    before = driver_digest(sources)
    assert before == driver_digest(llamacpp_build.DRIVER_SOURCES)
    (sources / "greedy_batched.cpp").write_text((sources / "greedy_batched.cpp").read_text() + "// edit\n")
    assert driver_digest(sources) != before
    assert expected_stamp()["cmake_flags"] == list(CMAKE_FLAGS)
    assert {"-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DGGML_BLAS=OFF", "-DLLAMA_CURL=OFF"} <= set(CMAKE_FLAGS)
    assert "-DCMAKE_BUILD_TYPE=Release" in CMAKE_FLAGS


def test_only_the_vendored_llama_cpp_is_extracted_from_the_sdist(tmp_path: Path) -> None:
    archive = tmp_path / "llama_cpp_python-0.0.1.tar.gz"
    files = {
        "llama_cpp_python-0.0.1/pyproject.toml": b"[project]\n",
        "llama_cpp_python-0.0.1/vendor/llama.cpp/.git": b"gitdir: ../../.git/modules/vendor/llama.cpp\n",
        "llama_cpp_python-0.0.1/vendor/llama.cpp/include/llama.h": b"// llama.h\n",
        "llama_cpp_python-0.0.1/vendor/llama.cpp/gguf-py/gguf/__init__.py": b"",
    }
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    target = tmp_path / "llama.cpp"
    extract_vendored(archive, target)
    found = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert found == ["gguf-py/gguf/__init__.py", "include/llama.h"]
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("pkg-1/README.md"), io.BytesIO(b""))
    with pytest.raises(ConfigError, match=r"holds no vendor/llama\.cpp/"):
        extract_vendored(empty, tmp_path / "nothing")


# ---- the GGUF --------------------------------------------------------------------------------


class _Writer:
    arch = "llama"

    def __init__(self) -> None:
        self.kv_data: list[dict[str, object]] = [{}]
        self.calls: list[str] = []

    def add_vocab_size(self, size: int) -> None:
        self.kv_data[0][f"{self.arch}.vocab_size"] = size


class _Converted:
    """Stands in for one of convert_hf_to_gguf's model classes."""

    model_arch = 7
    writes_vocab_size = True

    def __init__(self) -> None:
        self.gguf_writer = _Writer()
        self.hparams = {"vocab_size": 1024}

    def set_vocab(self) -> None:
        raise AssertionError("the tokenizer was asked for")

    def _set_vocab_none(self) -> None:
        self.gguf_writer.kv_data[0]["tokenizer.ggml.model"] = "none"

    def set_gguf_parameters(self) -> None:
        self.gguf_writer.kv_data[0]["llama.block_count"] = 2
        if self.writes_vocab_size:
            self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])


def test_the_converted_vocabulary_is_placeholders_of_the_models_size() -> None:
    cls = placeholder_vocab(_Converted)
    assert issubclass(cls, _Converted) and cls.model_arch == 7 and "model_arch" in cls.__dict__
    model = cls()
    model.set_vocab()  # no tokenizer is read
    model.set_gguf_parameters()
    assert model.gguf_writer.kv_data[0] == {
        "tokenizer.ggml.model": "none",
        "llama.block_count": 2,
        "llama.vocab_size": 1024,
    }

    class _Silent(_Converted):
        model_arch = 8
        writes_vocab_size = False

    silent = placeholder_vocab(_Silent)()
    silent.set_gguf_parameters()  # the class writes no size: the placeholder adds it
    assert silent.gguf_writer.kv_data[0]["llama.vocab_size"] == 1024


def test_the_gguf_is_cached_beside_the_checkpoint_and_only_bf16_is_converted(tmp_path: Path) -> None:
    model = tmp_path / "e2e-2g-v2"
    model.mkdir()
    assert gguf_path(model) == tmp_path / "e2e-2g-v2-bf16.gguf"
    (model / "config.json").write_text(json.dumps({"dtype": "float32"}))
    with pytest.raises(ConfigError, match="float32, not bfloat16"):
        ensure_gguf(model, tmp_path / "no-sources")
    gguf_path(model).write_bytes(b"GGUF")  # already converted: returned, not converted again
    assert ensure_gguf(model, tmp_path / "no-sources") == gguf_path(model)
    assert gguf_path(model) in weight_files(model)  # evicted before each run, as the checkpoint


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("llamacpp") / "mixtral", "mixtral", dtype=torch.bfloat16)


@pytest.mark.slow
@needs_sources
def test_the_gguf_holds_the_checkpoints_weights_exactly(bf16_checkpoint: Path) -> None:
    assert SOURCES is not None
    gguf = ensure_gguf(bf16_checkpoint, SOURCES.sources)
    sys.path.insert(0, str(SOURCES.sources / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.remove(str(SOURCES.sources / "gguf-py"))
    reader = GGUFReader(gguf)
    fields = {name: field.contents() for name, field in reader.fields.items() if "token" not in name}
    assert reader.fields["tokenizer.ggml.model"].contents() == "none"
    assert fields["llama.vocab_size"] == VOCAB_SIZE and fields["llama.expert_count"] == 4
    tensors = {t.name: t for t in reader.tensors}
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for path in sorted(bf16_checkpoint.glob("*.safetensors")):
        weights.update(load_file(path))

    def bits(name: str) -> torch.Tensor:  # a GGUF tensor as the int16 bits of its bf16 values
        data = torch.from_numpy(tensors[name].data.copy())
        return data.view(torch.int16).reshape(tuple(int(d) for d in reversed(tensors[name].shape)))

    def as_bits(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(torch.int16)

    assert torch.equal(bits("token_embd.weight"), as_bits(weights["model.embed_tokens.weight"]))
    assert torch.equal(bits("output.weight"), as_bits(weights["lm_head.weight"]))
    prefix_ = "model.layers.1.block_sparse_moe.experts"
    for gguf_name, matrix in (("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")):
        stacked = torch.stack([weights[f"{prefix_}.{e}.{matrix}.weight"] for e in range(4)])
        assert torch.equal(bits(f"blk.1.{gguf_name}.weight"), as_bits(stacked)), gguf_name
    v = weights["model.layers.0.self_attn.v_proj.weight"]
    assert torch.equal(bits("blk.0.attn_v.weight"), as_bits(v))
    router = torch.from_numpy(tensors["blk.0.ffn_gate_inp.weight"].data.copy())  # kept in f32: exact
    assert torch.equal(router, weights["model.layers.0.block_sparse_moe.gate.weight"].float())


# ---- the worker: a stand-in driver -------------------------------------------------------------

FAKE_DRIVER = """#!{python}
import json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
prompts = [line.split() for line in open(args["--prompts"]) if line.strip()]
g = int(args["--new-tokens"])
tokens = [[len(p) + i for i in range(g)] for p in prompts]
print("llama.cpp says hello")
print(json.dumps({{"tokens": tokens, "prefill_s": 0.5, "decode_s": 1.5, "load_s": 0.25, "bytes_read": -1,
                  "n_ctx": 512, "n_batch": 8, "n_ubatch": 8, "threads": int(args["--threads"]),
                  "argv": sys.argv[1:]}}))
"""


@pytest.fixture
def fake_driver(tmp_path: Path) -> Path:
    path = tmp_path / "greedy_batched"
    path.write_text(FAKE_DRIVER.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _checkpoint_dir(tmp_path: Path, **generation: object) -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"eos_token_id": 2, "dtype": "bfloat16"}))
    if generation:
        (model / "generation_config.json").write_text(json.dumps(generation))
    return model


def test_the_worker_runs_the_driver_and_reports_its_measurements(tmp_path: Path, fake_driver: Path) -> None:
    model = _checkpoint_dir(tmp_path, eos_token_id=[2, 7])
    setup = LlamaCppSetup("0.3.36", fake_driver, tmp_path / "model-bf16.gguf")
    work = Inputs(model, [[1, 5, 6], [1, 8, 9]], 4, llamacpp=setup)
    job = llamacpp_job(work, setup)
    assert (job.system, job.kind, job.model, job.driver) == (
        LLAMACPP,
        LLAMACPP,
        str(setup.gguf),
        str(fake_driver),
    )
    assert job.eos_token_ids == [2, 7] and job.prompts == work.prompts and job.new_tokens == 4
    result = run_llamacpp(Job.load(_saved(job, tmp_path)))
    assert result["tokens"] == [[3, 4, 5, 6], [3, 4, 5, 6]]
    assert (result["generated_tokens"], result["decode_tokens"]) == (8, 6)
    assert (result["prefill_s"], result["decode_s"], result["load_s"]) == (0.5, 1.5, 0.25)
    assert result["compute_s"] is None and result["io_wait_s"] is None
    assert result["bytes_read"] == result["details"]["bytes_read_with_load"] >= 0  # the driver had none
    assert result["details"]["threads"] == len(os.sched_getaffinity(0)) and result["details"]["mmap"]
    describe = describe_llamacpp(job, setup, result["details"])
    assert "2 prompts as 2 parallel sequences, n_batch = n_ubatch = 6" in describe and "mmapped" in describe


def _saved(job: Job, tmp_path: Path) -> Path:
    path = tmp_path / "job.json"
    job.save(path)
    return path


def test_the_driver_is_asked_for_the_workload(tmp_path: Path) -> None:
    job = Job(LLAMACPP, LLAMACPP, "m.gguf", [[1, 2]], 3, driver="/bin/greedy_batched")
    argv = driver_argv(job, tmp_path / "p.txt", 2)
    assert argv == [
        "/bin/greedy_batched", "--model", "m.gguf", "--prompts", str(tmp_path / "p.txt"),
        "--new-tokens", "3", "--threads", "2",
    ]  # fmt: skip
    stops = Job(LLAMACPP, LLAMACPP, "m.gguf", [[1, 2]], 3, driver="d", eos_token_ids=[2, 7])
    assert driver_argv(stops, tmp_path / "p.txt", 2)[-2:] == ["--eos", "2,7"]


def test_a_failing_driver_is_a_failed_run_with_its_last_words(tmp_path: Path) -> None:
    failing = tmp_path / "failing"
    failing.write_text(
        f"#!{sys.executable}\nimport sys\nprint('cannot load m.gguf', file=sys.stderr)\nsys.exit(3)\n"
    )
    failing.chmod(0o755)
    job = Job(LLAMACPP, LLAMACPP, "m.gguf", [[1, 2]], 2, driver=str(failing))
    with pytest.raises(RuntimeError, match=r"the llama.cpp driver failed \(exit 3\): cannot load m.gguf"):
        run_llamacpp(job)


def test_driver_output_and_eos_parsing(tmp_path: Path) -> None:
    out = parse_driver_output('noise\n{"tokens": [[1]], "prefill_s": 1, "decode_s": 2, "load_s": 3}\n')
    assert out["tokens"] == [[1]]
    with pytest.raises(RuntimeError, match="printed no result"):
        parse_driver_output("load: adding 96 dummy tokens\n")
    job = Job(LLAMACPP, LLAMACPP, "m.gguf", [[1]], 1, driver="d")
    figures = measurements({**out, "bytes_read": 4096}, 10**6, job)
    assert figures["bytes_read"] == 4096 and figures["details"]["bytes_read_with_load"] == 10**6
    assert measurements({**out, "bytes_read": -1}, 10**6, job)["bytes_read"] == 10**6
    assert eos_token_ids(_checkpoint_dir(tmp_path)) == [2]  # config.json's, without a generation config
    assert eos_token_ids(_checkpoint_dir(tmp_path, eos_token_id=5)) == [5]


def test_llamacpp_is_a_system_of_the_command_line() -> None:
    assert LLAMACPP in SYSTEMS and NEAR_TIE_SYSTEMS == (LLAMACPP, ACCELERATE)
    config = config_from(parser().parse_args(["--systems", "llamacpp,klotski"]))
    assert list(config.systems) == ["llamacpp", "klotski"]


def test_an_unprepared_llamacpp_is_skipped_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = Inputs(tmp_path, [[1, 2]], 2, llamacpp=LlamaCppSetup("0.3.36", problem="cmake is not installed"))
    comparison = Comparison(_LogitsRunner({}), work, None, 1.0)  # type: ignore[arg-type]
    result = comparison._system(PointPlan([LLAMACPP], [1], None, 1), LLAMACPP, BUDGET)
    assert not result.ok and result.skipped == "llama.cpp cannot run: cmake is not installed"
    with pytest.raises(ConfigError, match="cmake is not installed"):
        llamacpp_job(work, work.llamacpp)  # type: ignore[arg-type]

    def no_cmake(root: Path | None) -> LlamaCppBuild:
        raise ConfigError("cmake configure failed (exit 127): cmake: not found")

    monkeypatch.setattr(llamacpp_build, "ensure_built", no_cmake)
    broken = prepare(tmp_path, tmp_path / "build")
    assert broken.problem == "cmake configure failed (exit 127): cmake: not found" and broken.driver is None


# ---- the token rule ----------------------------------------------------------------------------


def test_the_rule_is_the_one_of_tests_numerics() -> None:
    assert ROUNDINGS == numerics.ROUNDINGS
    assert torch.finfo(torch.bfloat16).eps == BF16_EPS
    row = torch.tensor([3.0, -10.0, 9.5])
    assert tolerance(row.tolist()) == numerics.logit_tolerance(torch.bfloat16, row)


def _rows(best: int, runner_up: int, margin: float, vocab: int = 16) -> list[float]:
    row = [-4.0] * vocab
    row[best], row[runner_up] = 10.0, 10.0 - margin
    return row


def test_partings_and_near_ties_as_numerics_compare_tokens_judges_them() -> None:
    expected = [[5, 6, 7], [1, 2, 3], [4, 4, 4]]
    got = [[5, 6, 7], [1, 0, 6], [4, 4, 3]]  # sequence 1 parts at 1, sequence 2 at 2
    found = partings("llamacpp", "bound", expected, got)
    assert found == [Parting(1, 1, 0, 2), Parting(2, 2, 3, 4)]
    assert prefix([[9, 9], [8], [7]], expected, found[0]) == [8, 1]
    close = (10.0 * ROUNDINGS * BF16_EPS) * 0.5  # half the tolerance at max|logit| = 10
    rows = [_rows(2, 0, close), _rows(4, 3, close)]
    check = judge("llamacpp", "bound", found, rows, sequences=3)
    assert (check.sequences, check.exact, check.near_tie) == (3, 1, 2)
    assert check.near_ties[0]["shortfall"] == pytest.approx(close)
    assert check.near_ties[0]["tolerance"] == pytest.approx(10.0 * ROUNDINGS * BF16_EPS)
    logits = [[torch.tensor(_rows(t, t, 0.0)) for t in seq] for seq in expected]
    logits[1][1], logits[2][2] = torch.tensor(rows[0]), torch.tensor(rows[1])
    agreed = numerics.compare_tokens(got, expected, logits, torch.bfloat16)
    assert agreed.parted == [1, 2]  # the test suite's own rule accepts the same partings


def test_a_real_divergence_or_a_missing_token_voids_the_comparison() -> None:
    far = 10.0 * ROUNDINGS * BF16_EPS * 2  # twice the tolerance
    with pytest.raises(
        TokenMismatch, match=r"llamacpp generated token 3 at prompt 0, position 1.*real divergence"
    ):
        judge("llamacpp", "bound", [Parting(0, 1, 3, 4)], [_rows(4, 3, far)], sequences=1)
    with pytest.raises(TokenMismatch, match=r"scores bound's token .* below its.*real divergence"):
        judge(
            "llamacpp", "bound", [Parting(0, 1, 4, 3)], [_rows(4, 3, far)], sequences=1
        )  # the reference's far
    with pytest.raises(TokenMismatch, match="generated nothing at prompt 0, position 2"):
        judge("llamacpp", "bound", partings("llamacpp", "bound", [[1, 2, 3]], [[1, 2]]), [[0.0]], sequences=1)
    with pytest.raises(TokenMismatch, match="returned 1 outputs for 2 prompts"):
        partings("llamacpp", "bound", [[1], [2]], [[1]])


def test_the_reference_logits_worker_gives_transformers_bf16_logits(bf16_checkpoint: Path) -> None:
    prompts = [[BOS_ID, 5, 6, 7], [BOS_ID, 9]]
    result = worker.run(Job(REFERENCE_LOGITS, REFERENCE_LOGITS, str(bf16_checkpoint), prompts, 1))
    model: Any = load_reference(bf16_checkpoint, torch.bfloat16)
    assert len(result["logits"]) == 2
    with torch.inference_mode():
        for ids, row in zip(prompts, result["logits"], strict=True):
            expected = model(torch.tensor([ids])).logits[0, -1].float()
            assert len(row) == VOCAB_SIZE and torch.equal(torch.tensor(row), expected)


class _LogitsRunner:
    """Runs nothing: answers reference-logits jobs from ``rows`` (by prefix), counting them."""

    def __init__(self, rows: dict[tuple[int, ...], list[float]]) -> None:
        self.rows = rows
        self.jobs: list[Job] = []

    def run(self, job: Job, limit_bytes: int | None) -> RunRecord:
        self.jobs.append(job)
        assert job.kind == REFERENCE_LOGITS and limit_bytes is None
        return RunRecord(
            job.system, True, {"logits": [self.rows[tuple(p)] for p in job.prompts]}, None, "rss"
        )


def _run(system: str, tokens: list[list[int]]) -> RunRecord:
    output = {"tokens": tokens, "generated_tokens": 4, "decode_tokens": 2, "prefill_s": 1.0, "decode_s": 1.0}
    return RunRecord(system, True, output, None, "rss")


def test_the_harness_checks_llamacpp_by_the_rule_and_reports_the_counts(tmp_path: Path) -> None:
    prompts = [[1, 10], [1, 11]]
    reference = [[5, 6], [7, 8]]
    close = 10.0 * ROUNDINGS * BF16_EPS * 0.25
    runner = _LogitsRunner({(1, 11, 7): _rows(8, 3, close)})  # the reference prefers 8, by a hair
    comparison = Comparison(runner, Inputs(tmp_path, prompts, 2), None, 1.0)  # type: ignore[arg-type]
    comparison._check([_run("bound", reference)])
    system = SystemResult(
        LLAMACPP, "llama.cpp", [_run(LLAMACPP, [[5, 6], [7, 3]]), _run(LLAMACPP, [[5, 6], [7, 3]])]
    )
    comparison._check_near_ties(system)
    assert len(runner.jobs) == 1 and runner.jobs[0].prompts == [[1, 11, 7]]  # one worker, each prefix once
    check = system.notes["token_check"]
    assert (check["sequences"], check["exact"], check["near_tie"]) == (4, 2, 2)
    table = format_point(Point(BUDGET, [system], None))
    assert "llamacpp tokens: 2 of 4 sequences exactly the reference's, 2 parted at a near-tie" in table
    assert "(first: prompt 1, position 1, token 3 for 8" in table
    comparison._check_near_ties(system)  # the logits are remembered: no second worker
    assert len(runner.jobs) == 1
    runner.rows[(1, 10)] = _rows(5, 6, 1.0)  # far beyond the tolerance
    diverged = SystemResult(LLAMACPP, "llama.cpp", [_run(LLAMACPP, [[6, 6], [7, 8]])])
    with pytest.raises(TokenMismatch, match="real divergence"):
        comparison._check_near_ties(diverged)


# ---- end to end, with the compiled driver ----------------------------------------------------


@pytest.mark.slow
@needs_build
def test_llamacpp_generates_the_reference_tokens_within_the_rule(
    bf16_checkpoint: Path, tmp_path: Path
) -> None:
    """The llamacpp job in a worker (in a memory cgroup where the machine allows) against transformers.

    The reference computes the checkpoint's bf16 weights in float32. llama.cpp keeps activations in
    float32 (ggml rounds only a matmul's input to bf16 and accumulates in float32), so it follows the
    model's float32 computation; transformers in bf16 rounds every activation, and on make_checkpoint's
    models, whose weights (std 0.3) amplify rounding, that drift alone exceeds the rule's tolerance
    (measured: one position of 24 where bf16 transformers prefers its token by 2.0, tolerance 0.33,
    and float32 transformers prefers llama.cpp's). The bench models are well conditioned: there
    llama.cpp matches the bf16 reference's tokens exactly (see benchmarks/e2e/README.md).
    """
    assert BUILD is not None
    setup = prepare(bf16_checkpoint, BUILD.root)
    assert setup.problem is None, setup.problem
    generator = torch.Generator().manual_seed(0)
    prompts = [[BOS_ID, *torch.randint(3, VOCAB_SIZE, (7,), generator=generator).tolist()] for _ in range(8)]
    new_tokens = 6
    work = Inputs(bf16_checkpoint, prompts, new_tokens, llamacpp=setup)
    runner = Runner(RunnerSettings(bf16_checkpoint, tmp_path / "scratch", use_cgroup=cgroups_usable()))
    record = runner.run(llamacpp_job(work, setup), 4 * GIB)
    assert record.ok, record.reason
    assert record.output["prefill_s"] > 0 and record.output["decode_s"] > 0
    assert record.output["details"]["n_batch"] == len(prompts) * 8 and record.output["details"]["mmap"]
    model: Any = load_reference(bf16_checkpoint, torch.float32)  # the bf16 weights, computed in float32
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=EOS_ID)  # fmt: skip
        reference = [_strip(row.tolist()[ids.shape[1] :], EOS_ID) for row in out]
        teacher = numerics.teacher_forced_prompts(prompts, reference)
        rows = [model(torch.tensor([p])).logits[0, -1] for p in teacher]
    logits = numerics.regroup(rows, reference)
    verdict = numerics.compare_tokens(record.tokens, reference, logits, torch.bfloat16)  # the bf16 tolerance
    assert verdict.compared >= len(prompts) and len(verdict.parted) < len(prompts), verdict
