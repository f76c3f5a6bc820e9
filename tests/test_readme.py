"""The README stays true: its method table lists every registered method, and it gives the two commands."""

from pathlib import Path

from fusion_bench.methods import list_methods

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_method_in_readme_table():
    missing = [m for m in list_methods() if f"| `{m}` |" not in README]
    assert not missing, f"README methods table lacks {missing}: regenerate it with `fusion_bench methods --markdown`"


def test_readme_gives_main_job_and_test_commands():
    assert ("apt-get install -y -qq dataset-fashion-mnist && pip install torch==2.13.0 && pip install -e . && fusion_bench"
            in README)
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q -x' in README
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "python -m pytest -q -x" in ci and "torch==2.13.0" in ci and "dataset-fashion-mnist" in ci
