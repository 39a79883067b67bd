"""`ponderlm analyze`: the written numbers equal a direct count from model.infer / model.route; the page parses."""

import json
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import ponderlm
from ponderlm.analyze import analyze_run, measure, summarize
from ponderlm.rundir import RunDir
from ponderlm.cli import main
from ponderlm.config import load_config
from ponderlm.data import TokenShards
from ponderlm.errors import PonderError
from ponderlm.files import sha256_file
from ponderlm.methods import build_model
from ponderlm.train import train

MAX_TOKENS = 200  # 6 full windows of seq_len 32 and a ragged one of 8
SHOWN = 120


def naive_ranks(values):
    """Rank = strictly smaller values + mean position among equal ones (1-based); O(n^2), independent of analyze."""
    values = np.asarray(values)
    return np.array([(values < v).sum() + ((values == v).sum() + 1) / 2 for v in values])


def sharpen_router_in_checkpoint(run):
    """Large random router weights, written into the run's checkpoint, so tokens get 0, 1 or 2 kept steps."""
    path = RunDir(run).latest_checkpoint() / "model.safetensors"
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    generator = torch.Generator().manual_seed(0)
    state["router.weight"] = torch.randn(state["router.weight"].shape, generator=generator) * 2.0
    state["router.bias"] = torch.randn(state["router.bias"].shape, generator=generator)
    save_file(state, path, metadata=metadata)
    checksums = json.loads((path.parent / "checksums.json").read_text())  # a deliberate edit: record it
    (path.parent / "checksums.json").write_text(json.dumps({**checksums, path.name: sha256_file(path)}))


@pytest.fixture(scope="module")
def p3_run(tiny_data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("analyze") / "p3"
    train(load_config("tiny", ["method=ponderlm3", f"data.path={tiny_data_dir}", "ponder.extra_steps=2",
                               "train.steps=4", "train.save_every=4", "train.eval_tokens=64"]), run, progress=False)
    sharpen_router_in_checkpoint(run)
    return run


@pytest.fixture(scope="module")
def analysed(p3_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("ponderlm.analyze.SHOWN_TOKENS", SHOWN)
        summary = analyze_run(p3_run, split="test", max_tokens=MAX_TOKENS, out_dir=out)
    return summary, out


@pytest.fixture(scope="module")
def direct_count(p3_run, tiny_data_dir):
    return direct_measurements(p3_run, tiny_data_dir)


def direct_measurements(run, data_dir, tau=None):
    """Per-position measurements computed here from the public model API (the full windows in one batch).

    Expected steps come from the router or gates on the converged Jacobi states for latent-slot methods (halting: the
    gates decoding runs, up to the step after the last kept one); None for the others (mor)."""
    model, tokenizer = ponderlm.load(run)
    seq_len, tau = model.config.data.seq_len, model.resolve_tau(tau)
    # (K + 1) T refinement passes: the parallel forward is the exact recurrence that analyze decodes.
    model.config.ponder.eval_refine_passes = (model.max_extra_steps + 1) * seq_len
    tokens = torch.from_numpy(TokenShards(data_dir, "test").read(0, MAX_TOKENS + 1).astype(np.int64))
    full = MAX_TOKENS // seq_len * seq_len
    pieces = [(tokens[:full].view(-1, seq_len), tokens[1:full + 1].view(-1, seq_len)),
              (tokens[full:MAX_TOKENS][None], tokens[full + 1:][None])]
    kept, expected, entropy, nll = [], [], [], []
    with torch.no_grad():
        for ids, targets in pieces:
            logits, used = model.infer(ids, tau)
            kept.append(used.flatten())
            if model.latent_slots:
                _, log_w = model.route(model.jacobi(ids, model.config.ponder.eval_refine_passes, tau))
                w = log_w[..., 1:].exp()
                if model.name == "halting":  # decoding computes the gates up to the step after the last kept one
                    w = w * (torch.arange(1, w.shape[-1] + 1) <= used[..., None] + 1)
                expected.append(w.sum(-1).flatten())  # E[k] = sum_{k>=1} w_k
            entropy.append(torch.distributions.Categorical(logits=logits.float()).entropy().flatten())
            nll.append(F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none").flatten())
    ids = tokens[:MAX_TOKENS].tolist()
    return {"ids": ids, "strings": [tokenizer.decode([i], skip_special_tokens=False) for i in ids],
            "kept": torch.cat(kept).numpy(), "expected": torch.cat(expected).numpy() if expected else None,
            "entropy": torch.cat(entropy).numpy(), "nll": torch.cat(nll).numpy()}


def test_analysis_json_equals_a_direct_count(analysed, direct_count):
    summary, out = analysed
    written = json.loads((out / "analysis.json").read_text())
    assert written == {k: v for k, v in summary.items() if k != "files"}
    d = direct_count
    assert written["method"] == "ponderlm3" and written["tokens"] == MAX_TOKENS and written["tau"] == 1e-4
    counts = np.bincount(d["kept"], minlength=3)
    assert written["kept_steps_counts"] == counts.tolist()
    assert (counts > 0).sum() >= 2  # the sharpened router really gives tokens different numbers of steps
    assert written["kept_steps_histogram"] == pytest.approx((counts / MAX_TOKENS).tolist())
    assert written["mean_kept_steps"] == pytest.approx(d["kept"].mean())
    assert written["mean_expected_steps"] == pytest.approx(d["expected"].mean(), rel=1e-4)
    assert written["fraction_pruned"] == pytest.approx((d["kept"] < 2).mean())
    assert written["mean_nll"] == pytest.approx(d["nll"].mean(), rel=1e-4)

    frequency = Counter(d["strings"])
    rows = written["per_token"]
    assert len(rows) == min(40, len(frequency))
    assert [r["count"] for r in rows] == sorted(frequency.values(), reverse=True)[: len(rows)]
    for row in rows:
        where = np.array([s == row["token"] for s in d["strings"]])
        assert row["count"] == frequency[row["token"]] == where.sum()
        assert row["mean_kept_steps"] == pytest.approx(d["kept"][where].mean())
        assert row["mean_expected_steps"] == pytest.approx(d["expected"][where].mean(), rel=1e-4, abs=1e-6)
        assert row["fraction_pruned"] == pytest.approx((d["kept"][where] < 2).mean())
        assert row["mean_entropy"] == pytest.approx(d["entropy"][where].mean(), rel=1e-4)
        assert row["mean_nll"] == pytest.approx(d["nll"][where].mean(), rel=1e-4)

    for steps, x in (("kept_steps", d["kept"]), ("expected_steps", d["expected"])):
        for target, y in (("entropy", d["entropy"]), ("nll", d["nll"])):
            found = written["correlations"][steps][target]
            assert found["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-4)
            ranks = np.corrcoef(naive_ranks(x), naive_ranks(y))[0, 1]
            # Ranks are not continuous: float noise between the two computations (batching, thread count) can
            # swap two nearly equal entropies or expected steps (the sharpened router puts many tokens at ~2.0),
            # moving Spearman by ~1e-4 per swap at 200 tokens. Tie handling itself is checked exactly in
            # test_summarize_counts_ties_and_undefined_correlations.
            assert found["spearman"] == pytest.approx(ranks, abs=0.01)


def test_files_exist_and_the_page_has_one_span_per_shown_token(analysed, direct_count):
    summary, out = analysed
    assert (out / "steps_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["files"]) == {"json", "histogram", "html"}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind

    class TokenSpans(HTMLParser):
        def __init__(self):
            super().__init__()
            self.titles, self.texts, self.inside, self.open_tags = [], [], False, []

        def handle_starttag(self, tag, attrs):
            if tag not in ("meta", "br"):  # void elements: no end tag
                self.open_tags.append(tag)
            attrs = dict(attrs)
            if tag == "span" and "title" in attrs:
                self.titles.append(attrs["title"])
                self.texts.append("")
                self.inside = True

        def handle_endtag(self, tag):
            assert self.open_tags.pop() == tag  # well nested
            self.inside = False

        def handle_data(self, data):
            if self.inside:
                self.texts[-1] += data

    page = (out / "analysis.html").read_text()
    parser = TokenSpans()
    parser.feed(page)
    parser.close()
    assert parser.open_tags == []
    assert parser.texts == direct_count["strings"][:SHOWN]
    assert parser.titles[:3] == [f"kept {k}, expected {e:.3f}"
                                 for k, e in zip(direct_count["kept"][:3], direct_count["expected"][:3])]
    assert "http" not in page and "src=" not in page  # self-contained


def test_summarize_counts_ties_and_undefined_correlations(monkeypatch):
    monkeypatch.setattr("ponderlm.analyze.TABLE_ROWS", 2)
    summary = summarize(["a", "b", "a", "c", "a"], kept_steps=[0, 2, 1, 2, 2],
                        expected_steps=[0.1, 1.9, 0.5, 1.5, 1.2], entropy=[1.0, 3.0, 2.0, 2.0, 2.5],
                        nll=[0.5, 4.0, 1.0, 3.0, 2.0], max_steps=2)
    assert summary["kept_steps_counts"] == [1, 1, 3] and summary["fraction_pruned"] == pytest.approx(0.4)
    assert [r["token"] for r in summary["per_token"]] == ["a", "b"]  # most frequent, then alphabetical
    a = summary["per_token"][0]
    assert a["count"] == 3 and a["mean_kept_steps"] == pytest.approx(1.0)
    assert a["fraction_pruned"] == pytest.approx(2 / 3) and a["mean_expected_steps"] == pytest.approx(0.6)
    # kept steps 0, 2, 1, 2, 2 rank with ties averaged: 0 -> 1, 1 -> 2, the three 2s -> 4
    spearman = np.corrcoef([1, 4, 2, 4, 4], naive_ranks([1.0, 3.0, 2.0, 2.0, 2.5]))[0, 1]
    assert summary["correlations"]["kept_steps"]["entropy"]["spearman"] == pytest.approx(spearman)
    constant = summarize(["a", "b"], [2, 2], [1.0, 1.5], [1.0, 2.0], [1.0, 2.0], max_steps=2)
    assert constant["correlations"]["kept_steps"]["nll"] == {"pearson": None, "spearman": None}
    assert constant["correlations"]["expected_steps"]["nll"]["pearson"] == pytest.approx(1.0)


def test_measure_matches_infer_and_the_router():
    torch.manual_seed(0)
    # With (K + 1) T = 48 refinement passes the parallel forward is the recurrence that exact scoring decodes.
    model = build_model(load_config("tiny", ["method=ponderlm3", "model.vocab_size=53", "ponder.extra_steps=2",
                                             "ponder.eval_refine_passes=48"])).eval()
    with torch.no_grad():
        model.router.weight.normal_(0, 2.0)
    ids, targets = torch.randint(0, 53, (2, 16)), torch.randint(0, 53, (2, 16))
    measured = measure(model, ids, targets, tau=1e-4)
    assert torch.equal(measure(model, ids, targets, tau=1e-4, scoring="jacobi")["kept_steps"], measured["kept_steps"])
    with torch.no_grad():
        logits, used = model.infer(ids, 1e-4)
        s, _ = model.route(model.jacobi(ids, model.config.ponder.eval_refine_passes, 1e-4))
    assert torch.equal(measured["kept_steps"], used) and len(used.unique()) > 1
    torch.testing.assert_close(measured["expected_steps"], (s * torch.arange(3)).sum(-1))
    torch.testing.assert_close(measured["nll"], F.cross_entropy(logits.transpose(1, 2), targets, reduction="none"))


@pytest.mark.parametrize("method", ["halting", "mor"])
def test_the_other_adaptive_methods_are_analysed_through_their_inference_path(method, tiny_data_dir, tmp_path):
    run = tmp_path / method
    train(load_config("tiny", [f"method={method}", f"data.path={tiny_data_dir}", "train.steps=2",
                               "train.eval_tokens=64"], shared=["ponder.extra_steps=2"]), run, progress=False)
    model, _ = ponderlm.load(run)
    tau = 0.5 if model.prunable else None  # fresh gates continue with about 0.5: this tau prunes about half
    summary = analyze_run(run, split="test", max_tokens=MAX_TOKENS, tau=tau, out_dir=tmp_path / "analysis")
    d = direct_measurements(run, tiny_data_dir, tau)
    assert summary["method"] == method and summary["tokens"] == MAX_TOKENS
    assert summary["kept_steps_counts"] == np.bincount(d["kept"], minlength=3).tolist()
    assert len(np.unique(d["kept"])) > 1  # tokens ran different numbers of extra steps
    assert summary["mean_nll"] == pytest.approx(d["nll"].mean(), rel=1e-4)
    if d["expected"] is not None:
        assert summary["mean_expected_steps"] == pytest.approx(d["expected"].mean(), rel=1e-4)
    assert 0 <= summary["mean_expected_steps"] <= 2
    assert (tmp_path / "analysis" / "analysis.html").is_file()


def test_other_methods_get_a_one_line_error(tiny_data_dir, tmp_path, capsys):
    run = tmp_path / "p2"
    train(load_config("tiny", ["method=ponderlm2", f"data.path={tiny_data_dir}", "ponder.extra_steps=1",
                               "train.steps=1", "train.eval_tokens=64"]), run, progress=False)
    with pytest.raises(PonderError, match="needs a run of an adaptive method"):
        analyze_run(run)
    assert main(["analyze", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ponderlm: error: analyze needs a run of an adaptive method")


def test_cli_prints_json_and_writes_the_files(p3_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", str(p3_run), "--split", "val", "--max-tokens", "64", "--tau", "0.01",
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tokens"] == 64 and printed["tau"] == 0.01 and printed["split"] == "val"
    assert {"mean_kept_steps", "mean_expected_steps", "correlations"} <= printed.keys()
    assert all((out / name).is_file() for name in ("analysis.json", "steps_histogram.png", "analysis.html"))
    (tmp_path / "a-file").write_text("x")
    assert main(["analyze", str(p3_run), "--out", str(tmp_path / "a-file")]) == 2
    assert "--out " in capsys.readouterr().err and (tmp_path / "a-file").read_text() == "x"
    assert main(["analyze", str(p3_run), "--tau", "1.5"]) == 2
