"""The Python entry point a new user reaches for first: raee.build once, then raee.load(...)(texts)."""

from __future__ import annotations

import numpy as np
import pytest

import raee
from raee.spec import ModelSpec
from tests.fixtures_ray import tiny_llama_models
from tests.test_custom_tasks import write_task

MODEL = ModelSpec(factory=tiny_llama_models)


def test_build_then_load_then_call_like_a_pipeline(tmp_path):
    task = write_task(tmp_path, "csv")
    spec = str(tmp_path / "reviews.toml")
    db = str(tmp_path / "api.db")
    summary = raee.build(spec, db=db, model=MODEL, quiet=True)
    assert summary.n_in_db == 40
    with raee.load(spec, db=db, model=MODEL, k=4) as clf:
        out = clf("the acting is great", pairs="a stirring , funny and finally transporting film .")
        assert len(out) == 1 and set(out[0]) == {"label", "score", "exit_layer", "probs", "truncated", "policy"}
        answer = out[0]
        assert answer["label"] in task.words and answer["policy"] == "fused"
        assert answer["score"] == pytest.approx(max(answer["probs"].values()))
        assert abs(sum(answer["probs"].values()) - 1) < 1e-6
        two = clf(["complaining", "one long string of cliches ."], pairs=["it 's not as good as i hoped"] * 2,
                  policy="raee", neighbours=True)
        assert [o["policy"] for o in two] == ["raee", "raee"] and len(two[0]["neighbours"]) == 4
        assert {"id", "text", "label", "label_word", "distance"} <= set(two[0]["neighbours"][0])
        assert isinstance(clf.collection, str) and "reviews" in repr(clf)
    with raee.load(spec, db=db, model=MODEL, k=4) as again:  # closed: the Lite file can be opened again
        np.testing.assert_allclose(list(again("the acting is great", pairs="a stirring , funny and finally "
                                              "transporting film .")[0]["probs"].values()),
                                   list(answer["probs"].values()), atol=1e-6)


def test_unknown_facade_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'laod'"):
        raee.laod  # noqa: B018


def test_a_script_that_never_closes_its_classifier_ends_quietly(tmp_path):
    """The README's snippet as a script: no close(), no `with`. The exit database is released at exit, before the
    interpreter tears its modules down, so the script ends with status 0 and nothing on stderr but progress."""
    import subprocess
    import sys

    write_task(tmp_path, "csv")
    spec, db = str(tmp_path / "reviews.toml"), str(tmp_path / "api.db")
    raee.build(spec, db=db, model=MODEL, quiet=True)
    script = ("import raee\nfrom raee.spec import ModelSpec\nfrom tests.fixtures_ray import tiny_llama_models\n"
              f"clf = raee.load({spec!r}, db={db!r}, model=ModelSpec(factory=tiny_llama_models), k=4)\n"
              "print(clf('the acting is great', pairs='a stirring film .')[0]['label'])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip() in ("bad", "okay", "good"), out.stderr
    assert "Traceback" not in out.stderr and "Error" not in out.stderr, out.stderr
